"""`reconcile`, `status`, `--redact` and the state lock, as a user runs them: real `litellm-ingest`
processes against a real `mlflow server` and real SQLite stores.

Every expected value is computed here from the input records (or the files on disk) with plain
Python, never taken from the ingester's own output.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import all_traces, client_for, copies, reidentify, run_cli, write_log
from tests.pgkit import PgCluster

EXE = str(Path(sys.executable).parent / "litellm-ingest")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _env() -> dict[str, str]:
    # As cron or a pipe runs it: no MLflow variables, no terminal size.
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k not in ("COLUMNS", "LINES")}


def run(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_cli(list(args), cwd, _env(), timeout)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def calls_of(records: list[dict]) -> dict[str, list[dict]]:
    calls: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        calls[r["litellm_call_id"]].append(r)
    return calls


def iso(t: float) -> str:
    return (EPOCH + timedelta(microseconds=round(t * 1_000_000))).isoformat()


def trace_infos(uri: str, experiment_name: str) -> list:
    return all_traces(uri, experiment_name, include_spans=False, missing_ok=False)


@pytest.fixture(params=["server", "sqlite"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The two sinks: a real `mlflow server` (OTLP + REST) and a SQLite tracking store."""
    if request.param == "server":
        return request.getfixturevalue("mlflow_server").url
    return f"sqlite:///{tmp_path / 'store.db'}"


# --- reconcile -------------------------------------------------------------------------------------


def reconcile(path_args: list[str], uri: str, experiment_name: str, cwd: Path, *extra: str) -> tuple[int, dict]:
    proc = run("reconcile", *path_args, "--tracking-uri", uri, "--experiment-name", experiment_name, "--json", *extra, cwd=cwd)
    no_traceback(proc)
    assert proc.returncode in (0, 6), (proc.returncode, proc.stderr[-3000:])
    return proc.returncode, json.loads(proc.stdout)


def test_reconcile_finds_a_deleted_trace_missing(tmp_path: Path, capture: list[dict], store_uri: str, experiment_name: str) -> None:
    recs = copies(capture, 1, "rec-missing")[0]
    path = write_log(tmp_path / "logs" / "calls.jsonl", recs)
    calls = calls_of(recs)
    target = ["--tracking-uri", store_uri, "--experiment-name", experiment_name]
    b = run("batch", str(path), *target, "--state-dir", str(tmp_path / "st"), "-q", cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]

    code, report = reconcile([str(path)], store_uri, experiment_name, tmp_path)
    assert code == 0, report
    assert report["calls_in_logs"] == report["matched"] == report["traces_in_mlflow"] == len(calls)
    assert report["missing"] == [] and report["extra"] == []

    # Delete one trace (a call with a retry: the trace with several spans) through MLflow's own API.
    victim = next(cid for cid, rs in calls.items() if len(rs) > 1)
    client = client_for(store_uri)
    exp_id = client.get_experiment_by_name(experiment_name).experiment_id
    infos = trace_infos(store_uri, experiment_name)
    trace_id = next(t.info.trace_id for t in infos if t.info.tags.get("litellm.call_id") == victim)
    client.delete_traces(exp_id, trace_ids=[trace_id])
    assert victim not in {t.info.tags.get("litellm.call_id") for t in trace_infos(store_uri, experiment_name)}

    code, report = reconcile([str(path)], store_uri, experiment_name, tmp_path)
    assert code == 6, report
    assert report["missing"] == [victim]
    assert report["extra"] == []
    assert report["matched"] == len(calls) - 1 and report["calls_in_logs"] == len(calls)


def test_reconcile_repair_writes_the_missing_calls_only_and_leaves_the_recent_ones(
    tmp_path: Path, capture: list[dict], store_uri: str, experiment_name: str
) -> None:
    """Traces deleted from MLflow: ``--repair`` writes them again, as they were, and touches no other;
    a call that ended less than ``--settle`` ago is left (a daemon may hold it for a retry)."""
    from tests.tailkit import fresh_calls

    recs = copies(capture, 1, "rec-repair")[0]
    path = write_log(tmp_path / "logs" / "calls.jsonl", recs)
    calls = calls_of(recs)
    target = ["--tracking-uri", store_uri, "--experiment-name", experiment_name]
    assert run("batch", str(path), *target, "--state-dir", str(tmp_path / "st"), "-q", cwd=tmp_path).returncode == 0
    client = client_for(store_uri)
    exp_id = client.get_experiment_by_name(experiment_name).experiment_id
    before = {t.info.tags["litellm.call_id"]: t for t in all_traces(store_uri, experiment_name)}
    victims = [next(c for c, rs in calls.items() if len(rs) > 1), next(c for c, rs in calls.items() if len(rs) == 1)]
    client.delete_traces(exp_id, trace_ids=[before[v].info.trace_id for v in victims])

    code, report = reconcile([str(path)], store_uri, experiment_name, tmp_path, "--repair")
    assert code == 0, report
    assert sorted(report["missing"]) == sorted(victims) and report["repaired"] == 2 and report["too_recent"] == []
    after = {t.info.tags["litellm.call_id"]: t for t in all_traces(store_uri, experiment_name)}
    assert after.keys() == before.keys()

    def shape(t: Any) -> tuple:
        spans = sorted((s.span_id, s.name, s.start_time_ns, s.end_time_ns, s.status.status_code) for s in t.data.spans)
        return t.info.trace_id, t.info.state, t.info.request_time, t.info.execution_duration, spans

    assert {c: shape(t) for c, t in after.items()} == {c: shape(t) for c, t in before.items()}

    recent = fresh_calls(capture)[0]
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in recent)
    code, report = reconcile([str(path)], store_uri, experiment_name, tmp_path, "--repair")
    assert code == 6 and report["repaired"] == 0 and report["too_recent"] == [recent[0]["litellm_call_id"]], report
    code, report = reconcile([str(path)], store_uri, experiment_name, tmp_path, "--repair", "--settle", "0")
    assert code == 0 and report["repaired"] == 1, report
    assert reconcile([str(path)], store_uri, experiment_name, tmp_path)[0] == 0


def test_reconcile_shows_a_call_id_that_is_a_key_as_its_tag_holds_it_and_repairs_it_by_the_raw_id(
    tmp_path: Path, capture: list[dict], experiment_name: str
) -> None:
    """A client may send its key as the call id: MLflow's ``litellm.call_id`` holds it scrubbed, and
    so does every list reconcile prints, while ``--repair`` still finds the call by its raw id."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    written, keyed = [r for r in copies(capture, 1, "rec-key")[0] if r["status"] == "success"][:2]
    k = "sk-proj-" + hashlib.sha256(os.urandom(8)).hexdigest()[:32] + "T3BlbkFJ"
    keyed = {**keyed, "litellm_call_id": k}
    marker = f"[REDACTED:{hmac.new(b'litellm-ingest/scrub/v1', k.encode(), hashlib.sha256).hexdigest()[:8]}]"
    target = ["--tracking-uri", uri, "--experiment-name", experiment_name]
    batch = run(
        "batch", str(write_log(tmp_path / "a" / "calls.jsonl", [written])), *target, "--state-dir", str(tmp_path / "st"), cwd=tmp_path
    )
    assert batch.returncode == 0, batch.stderr[-3000:]
    path = str(write_log(tmp_path / "b" / "calls.jsonl", [keyed]))

    text = run("reconcile", path, *target, cwd=tmp_path)
    code, report = reconcile([path], uri, experiment_name, tmp_path)
    assert k not in text.stdout + text.stderr and f"  {marker}" in text.stdout
    assert code == 6 and report["missing"] == [marker], report
    code, report = reconcile([path], uri, experiment_name, tmp_path, "--repair", "--settle", "0")
    assert code == 0 and report["repaired"] == 1 and report["missing"] == [marker], report
    assert marker in {t.info.tags["litellm.call_id"] for t in all_traces(uri, experiment_name)}


def test_reconcile_passes_over_the_state_dir_it_is_given_under_the_logs(tmp_path: Path, capture: list[dict]) -> None:
    """A state dir kept under the logs folder (``--state-dir logs/state``) is passed over by the runs,
    but reconcile had no ``--state-dir``: it read the state files and every quarantined line as bad
    input, and counted them as quarantined."""
    logs = tmp_path / "logs"
    recs = copies(capture, 1, "rec-own")[0]
    write_log(logs / "calls.jsonl", recs)
    (logs / "bad.jsonl").write_text('{"not": "a record"\n' * 3)
    uri, state = f"sqlite:///{tmp_path / 'store.db'}", logs / "state"
    b = run("batch", str(logs), "--tracking-uri", uri, "--experiment-name", "own", "--state-dir", str(state), "--json", cwd=tmp_path)
    assert b.returncode == 3 and json.loads(b.stdout)["quarantined"] == 3, b.stderr[-3000:]
    assert (state / "quarantine.jsonl").exists()
    code, report = reconcile([str(logs)], uri, "own", tmp_path, "--state-dir", str(state))
    assert code == 0 and report["quarantined"] == 3 and report["calls_in_logs"] == len(calls_of(recs)), report


def test_a_repair_passes_over_the_runs_quarantine_file_though_it_writes_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--repair`` writes no quarantine file (bad lines were quarantined by the runs that read them),
    and so passed over only the state dir: a ``--quarantine-file`` under the logs was read as logs."""
    from ingest import reconcile as reconciling
    from ingest.pipeline import RunOptions, Summary
    from ingest.reconcile import Report, repair

    quarantine = tmp_path / "logs" / "bad" / "quarantine.jsonl"
    opts = RunOptions(paths=[str(tmp_path / "logs")], state_dir=tmp_path / "state", quarantine_file=quarantine)
    seen: list[RunOptions] = []
    monkeypatch.setattr(reconciling, "run_batch", lambda o: seen.append(o) or Summary())
    report = Report("sqlite:///x.db", "1", shown={"call-1": "call-1"}, ended={"call-1": 0})
    repair(opts, report, now_us=10**18)
    (used,) = seen
    assert used.quarantine_file is None and Path(os.path.realpath(quarantine)) in used.own() and used.only_calls == {"call-1"}


def test_reconcile_reports_traces_of_other_logs_in_the_window_as_extra(
    tmp_path: Path, capture: list[dict], store_uri: str, experiment_name: str
) -> None:
    first, second = copies(capture, 2, "rec-extra", spacing_s=3600)
    f1 = write_log(tmp_path / "logs" / "first.jsonl", first)
    f2 = write_log(tmp_path / "other" / "second.jsonl", second)
    args = [str(f1), str(f2), "--tracking-uri", store_uri, "--experiment-name", experiment_name, "--state-dir", str(tmp_path / "st"), "-q"]
    b = run("batch", *args, cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    both = first + second
    since, until = iso(min(r["startTime"] for r in both) - 1), iso(max(r["startTime"] for r in both) + 1)

    code, report = reconcile([str(f1)], store_uri, experiment_name, tmp_path, "--since", since, "--until", until)
    assert code == 6, report
    assert report["extra"] == sorted(calls_of(second)), "the second file's calls are in MLflow, not in the logs given"
    assert report["missing"] == []
    assert report["calls_in_logs"] == report["matched"] == len(calls_of(first))
    assert report["traces_in_mlflow"] == len(calls_of(both))


def test_a_window_that_cuts_a_millisecond_counts_no_call_on_the_wrong_side_as_extra(tmp_path: Path, capture: list[dict]) -> None:
    """MLflow searches by the millisecond, the logs are cut by the microsecond: a call starting 1 µs
    before ``--since``, or at ``--until``, is outside the window on the logs' side, but was in it on
    MLflow's, and reported extra (exit 6) on a store that holds exactly the logs."""
    records = copies(capture, 1, "rec-edge")[0]
    log = write_log(tmp_path / "logs" / "edge.jsonl", records)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    b = run("batch", str(log), "--tracking-uri", uri, "--experiment-name", "edge", "--state-dir", str(tmp_path / "st"), "-q", cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    starts: dict[str, int] = {}
    for r in records:
        us = round(r["startTime"] * 1_000_000)
        starts[r["litellm_call_id"]] = min(starts.get(r["litellm_call_id"], us), us)
    inside = sorted(u for u in starts.values() if u % 1000 not in (0, 999))
    first, last = inside[1], inside[-2]
    since, until = (EPOCH + timedelta(microseconds=first + 1)).isoformat(), (EPOCH + timedelta(microseconds=last)).isoformat()
    code, report = reconcile([str(log)], uri, "edge", tmp_path, "--since", since, "--until", until)
    assert (code, report["extra"], report["missing"]) == (0, [], []), report
    assert report["calls_in_logs"] == report["matched"] == sum(first + 1 <= u < last for u in starts.values())


@pytest.mark.parametrize("locked", ["file", "folder"])
def test_reconcile_names_a_file_it_may_not_read_and_claims_no_agreement(tmp_path: Path, capture: list[dict], locked: str) -> None:
    """A file the run may not read, or a folder it may not list, was passed over in silence: the
    calls in it were never compared and reconcile reported agreement (exit 0), where batch over the
    same folder names it and exits 8. Now it is named too: exit 8, or 6 when something differs."""
    from tests.test_cli import unprivileged

    logs = tmp_path / "logs"
    calls = copies(capture, 3, f"rec-locked-{locked}")
    names = ["proxy.jsonl.2", "old/proxy.jsonl.1" if locked == "folder" else "proxy.jsonl.1", "proxy.jsonl"]
    files = [write_log(logs / name, calls[i]) for i, name in enumerate(names)]
    hidden = files[1].parent if locked == "folder" else files[1]
    hidden.chmod(0)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    target = ["--tracking-uri", uri, "--experiment-name", "locked"]

    def as_user(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(unprivileged([EXE, *args]), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
        no_traceback(proc)
        return proc

    assert as_user("batch", str(logs), *target, "--no-state", "-q").returncode == 8
    proc = as_user("reconcile", str(logs), *target, "--json")
    assert proc.returncode == 8, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    named = [line for line in proc.stderr.splitlines() if str(hidden) in line]
    assert len(named) == 1 and f"cannot read {hidden}: permission denied" in named[0], proc.stderr
    report = json.loads(proc.stdout)
    assert report["unreadable"] == [str(hidden)]
    assert (report["missing"], report["extra"]) == ([], [])
    assert report["calls_in_logs"] == report["matched"] == len(calls_of(calls[0] + calls[2]))

    victim = sorted(calls_of(calls[2]))[0]
    trace_id = next(t.info.trace_id for t in trace_infos(uri, "locked") if t.info.tags.get("litellm.call_id") == victim)
    client = client_for(uri)
    client.delete_traces(client.get_experiment_by_name("locked").experiment_id, trace_ids=[trace_id])
    proc = as_user("reconcile", str(logs), *target)
    assert proc.returncode == 6, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert f"cannot read {hidden}: permission denied" in proc.stderr, "named when something differs as well"
    assert victim in proc.stdout.split() and "could not be read" in proc.stdout


@pytest.mark.parametrize("logs", ["empty", "bad lines only", "unreadable"])
def test_reconcile_of_logs_that_hold_no_call_lists_no_trace_extra(tmp_path: Path, capture: list[dict], logs: str) -> None:
    """Logs with no call (a freshly rotated file, only bad lines, a file it may not read) have no
    time window: the search went unbounded and every trace of the experiment was listed extra
    (exit 6). Only --since/--until then give a window, and the traces in it are extra."""
    from tests.test_cli import unprivileged

    recs = copies(capture, 1, f"rec-nocall-{logs.replace(' ', '-')}")[0]
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    target = ["--tracking-uri", uri, "--experiment-name", "nocall"]
    written = run("batch", str(write_log(tmp_path / "written" / "calls.jsonl", recs)), *target, "--no-state", "-q", cwd=tmp_path)
    assert written.returncode == 0, written.stderr[-3000:]
    log = tmp_path / "logs" / "proxy.jsonl"
    log.parent.mkdir()
    if logs == "unreadable":
        write_log(log, recs).chmod(0)
    else:
        log.write_text("" if logs == "empty" else 'not json\n{"id": 1}\n')
    code = 8 if logs == "unreadable" else 0

    def as_user(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(unprivileged([EXE, *args]), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
        no_traceback(proc)
        return proc

    text = as_user("reconcile", str(log), *target)
    assert text.returncode == code, (text.returncode, text.stdout[-2000:], text.stderr[-2000:])
    assert text.stdout.splitlines()[:2] == [
        "calls in logs: 0  traces in MLflow: 0  matched: 0  missing: 0  extra: 0",
        "the logs hold no call: no time window, so no trace is extra (--since/--until give one)",
    ], text.stdout
    assert (f"cannot read {log}: permission denied" in text.stderr) == (logs == "unreadable"), text.stderr
    report = json.loads(as_user("reconcile", str(log), *target, "--json").stdout)
    assert (report["extra"], report["missing"], report["window"]) == ([], [], [None, None]), report
    assert report["quarantined"] == (2 if logs == "bad lines only" else 0)

    since, until = iso(min(r["startTime"] for r in recs) - 1), iso(max(r["startTime"] for r in recs) + 1)
    windowed = as_user("reconcile", str(log), *target, "--json", "--since", since, "--until", until)
    assert windowed.returncode == (8 if logs == "unreadable" else 6), (windowed.returncode, windowed.stderr[-2000:])
    report = json.loads(windowed.stdout)
    assert report["extra"] == sorted(calls_of(recs)), "a window given: the traces in it match no call"
    assert report["extra_confirmed"] == (logs != "unreadable"), "the file not read holds them: not claimed extra"


# --- status ----------------------------------------------------------------------------------------


def first_line_digest(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return hashlib.sha256(data[: data.index(b"\n") + 1]).hexdigest()


def run_with(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """As `run`, with these MLflow variables set (and no flags naming the target)."""
    proc = run_cli(list(args), cwd, _env() | env)
    no_traceback(proc)
    return proc


def experiments(uri: str) -> list[tuple[str, str, str]]:
    from mlflow.entities import ViewType

    return sorted((e.experiment_id, e.name, e.lifecycle_stage) for e in client_for(uri).search_experiments(view_type=ViewType.ALL))


@pytest.mark.parametrize("by", ["MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"])
def test_reconcile_checks_the_experiment_the_mlflow_variables_name_as_batch_writes_to(
    tmp_path: Path, capture: list[dict], store_uri: str, experiment_name: str, by: str
) -> None:
    recs = copies(capture, 1, f"rec-env-{by}")[0]
    path = write_log(tmp_path / "logs" / "calls.jsonl", recs)
    written = run_with(
        "batch", str(path), "-q", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": store_uri, "MLFLOW_EXPERIMENT_NAME": experiment_name}
    )
    assert written.returncode == 0, written.stderr[-3000:]
    exp_id = client_for(store_uri).get_experiment_by_name(experiment_name).experiment_id
    before = experiments(store_uri)

    env = {"MLFLOW_TRACKING_URI": store_uri, by: experiment_name if by == "MLFLOW_EXPERIMENT_NAME" else exp_id}
    proc = run_with("reconcile", str(path), "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["experiment_id"] == exp_id
    assert report["matched"] == report["calls_in_logs"] == len(calls_of(recs))
    assert experiments(store_uri) == before, "reconcile created an experiment"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_reconcile_of_an_experiment_that_does_not_exist_fails_with_code_4_and_creates_nothing(
    tmp_path: Path, capture: list[dict], store_uri: str, experiment_name: str, how: str
) -> None:
    recs = copies(capture, 1, f"rec-none-{how}")[0]
    path = write_log(tmp_path / "logs" / "calls.jsonl", recs)
    written = run("batch", str(path), "--tracking-uri", store_uri, "--experiment-name", experiment_name, "-q", cwd=tmp_path)
    assert written.returncode == 0, written.stderr[-3000:]
    before = experiments(store_uri)
    missing = f"{experiment_name}-typo"

    env = {"MLFLOW_TRACKING_URI": store_uri} | ({"MLFLOW_EXPERIMENT_NAME": missing} if how == "environment" else {})
    flags = ["--experiment-name", missing] if how == "flag" else []
    proc = run_with("reconcile", str(path), *flags, cwd=tmp_path, env=env)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("litellm-ingest: error: ") and repr(missing) in lines[0], proc.stderr
    assert experiments(store_uri) == before, "reconcile created an experiment"


def test_reconcile_of_the_default_experiment_creates_nothing_even_when_the_store_is_empty(tmp_path: Path, capture: list[dict]) -> None:
    """With no experiment given, reconcile looks for "LiteLLM Proxy" as batch would, but never creates it, nor the store."""
    path = write_log(tmp_path / "logs" / "calls.jsonl", copies(capture, 1, "rec-default")[0])
    db = tmp_path / "absent.db"
    proc = run_with("reconcile", str(path), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert proc.returncode == 4 and "does not exist" in proc.stderr, proc.stderr
    assert not db.exists(), "reconcile created a SQLite store"

    other = run("batch", str(path), "--tracking-uri", f"sqlite:///{db}", "--experiment-name", "something else", "-q", cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]
    before = experiments(f"sqlite:///{db}")
    proc = run_with("reconcile", str(path), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert proc.returncode == 4 and "'LiteLLM Proxy'" in proc.stderr, proc.stderr
    assert experiments(f"sqlite:///{db}") == before


def test_reconcile_of_a_postgresql_that_stops_answering_ends_with_exit_4_in_one_line(
    tmp_path: Path, capture: list[dict], own_postgres: PgCluster
) -> None:
    """PostgreSQL frozen (SIGSTOP) as reconcile searches the traces (held at that read by a lock, then
    frozen): the search went to the store directly, not through the sink's watched calls, and a
    cron reconcile sat in it for ever. Now it gives up after ``--mlflow-timeout`` (10 s at least)
    in one line, exit 4."""
    pg = own_postgres
    uri = pg.new_database()
    write_log(tmp_path / "logs" / "proxy.jsonl", [r for b in copies(capture, 3, "pg-frozen") for r in b])
    target = ["--tracking-uri", uri, "--experiment-name", "fleet", "--mlflow-timeout", "3"]
    batch = run("batch", str(tmp_path / "logs"), *target, "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert batch.returncode == 0, batch.stderr[-2000:]
    code, err = pg.run_frozen_at(
        uri, "trace_info", [EXE, "reconcile", str(tmp_path / "logs"), *target], "reconcile", cwd=tmp_path, env=_env()
    )
    assert code == 4, err[-2000:]
    assert "has not answered" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]


def test_status_after_batch_shows_each_file_its_offset_and_lag(tmp_path: Path, capture: list[dict]) -> None:
    cs = copies(capture, 3, "status")
    plain = [write_log(tmp_path / "logs" / "a.jsonl", cs[0]), write_log(tmp_path / "logs" / "b.jsonl", cs[1])]
    gz = write_log(tmp_path / "logs" / "c.jsonl.1.gz", cs[2])
    state = tmp_path / "state"
    store = f"sqlite:///{tmp_path / 's.db'}"
    b = run("batch", *map(str, [*plain, gz]), "--tracking-uri", store, "--state-dir", str(state), "-q", cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]

    st = run("status", "--state-dir", str(state), "--json", cwd=tmp_path)
    assert st.returncode == 0, st.stderr[-3000:]
    doc = json.loads(st.stdout)
    rows = {Path(r["path"]): r for r in doc["files"]}
    assert set(rows) == {p.resolve() for p in [*plain, gz]}
    for p in [*plain, gz]:
        fp = rows[p.resolve()]["fingerprint"]
        assert fp.startswith("sha256:") and len(fp) >= 7 + 16 and first_line_digest(p).startswith(fp[7:]), (p, fp)
    assert len({r["fingerprint"] for r in rows.values()}) == 3
    for p in plain:
        r = rows[p.resolve()]
        size = p.stat().st_size
        assert (r["offset"], r["size"], r["lag_bytes"], r["held_lines"]) == (size, size, 0, 0), r
    assert rows[gz.resolve()]["offset"] == len(gzip.decompress(gz.read_bytes())), "a gzip file's offset counts uncompressed bytes"
    assert len(doc["runs"]) == 1 and doc["runs"][0]["mode"] == "batch" and doc["runs"][0]["result"] == "ok", doc["runs"]

    # The proxy appends a record: that is the lag.
    extra = reidentify([cs[0][0]], 3600, "status-appended")
    line = (json.dumps(extra[0]) + "\n").encode()
    old = plain[0].stat().st_size
    with open(plain[0], "ab") as f:
        f.write(line)
    doc = json.loads(run("status", "--state-dir", str(state), "--json", cwd=tmp_path).stdout)
    rows = {Path(r["path"]): r for r in doc["files"]}
    r = rows[plain[0].resolve()]
    assert (r["offset"], r["size"], r["lag_bytes"]) == (old, old + len(line), len(line)), r
    assert rows[plain[1].resolve()]["lag_bytes"] == 0

    # A compressed file still being written (cut short): read up to the cut, and its lag is not its
    # size on disk less the uncompressed offset (that said 0, or some meaningless number).
    cut = tmp_path / "logs" / "d.jsonl.2.gz"
    whole = gzip.compress(b"".join((json.dumps(r) + "\n").encode() for r in reidentify(cs[0], 7200, "status-cut")))
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    assert run("batch", str(cut), "--tracking-uri", store, "--state-dir", str(state), "-q", cwd=tmp_path).returncode == 0
    doc = json.loads(run("status", "--state-dir", str(state), "--json", cwd=tmp_path).stdout)
    rows = {Path(r["path"]): r for r in doc["files"]}
    r = rows[cut.resolve()]
    assert r["offset"] > 0 and r["lag_bytes"] is None and r.get("compressed") == "gzip", r
    assert rows[gz.resolve()]["compressed"] == "gzip" and rows[gz.resolve()]["lag_bytes"] == 0
    assert rows[plain[1].resolve()]["compressed"] is None

    # Human output (no terminal): every file named in full, and the last run's result.
    human = run("status", "--state-dir", str(state), cwd=tmp_path)
    assert human.returncode == 0, human.stderr[-3000:]
    no_traceback(human)
    problems = [f"path {p.resolve()} not shown" for p in [*plain, gz] if str(p.resolve()) not in human.stdout]
    run_line = next(x for x in human.stdout.splitlines() if x.startswith("batch ->"))
    if not re.search(r"\bok\b", run_line):
        problems.append(f"last run result 'ok' not shown: {run_line!r}")
    last = json.loads(state_file.read_text())["last_run"] if (state_file := next(state.glob("batch-*.json"), None)) else {}
    if not (last.get("started") and f"{last['started']} .. {last.get('finished')}" in run_line):
        problems.append(f"last run's start and end ({last.get('started')}, {last.get('finished')}) not shown: {run_line!r}")
    assert not problems, "\n".join([*problems, human.stdout])


def test_status_of_a_state_dir_it_may_not_write_reads_its_wal_databases(tmp_path: Path, capture: list[dict]) -> None:
    """The state databases are in WAL mode, which SQLite reads only through a ``-shm`` file it makes
    beside them: ``status`` on a read-only state dir (a sidecar's read-only mount, another user) said
    "0 read (problem attempt to write a readonly database)" for the ledger, once a run had closed it."""
    from tests.test_cli import unprivileged

    state = tmp_path / "state"
    b = run("batch", str(write_log(tmp_path / "a.jsonl", copies(capture, 1, "ro")[0])), "--tracking-uri",
            f"sqlite:///{tmp_path / 's.db'}", "--state-dir", str(state), "-q", cwd=tmp_path)  # fmt: skip
    assert b.returncode == 0, b.stderr[-3000:]
    assert next(state.glob("*.ledger.sqlite")) and not list(state.glob("*-shm")), "WAL databases, closed"
    state.chmod(0o555)
    try:
        ro = subprocess.run(unprivileged([EXE, "status", "--state-dir", str(state), "--json"]), cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        state.chmod(0o755)
    assert ro.returncode == 0 and "readonly" not in ro.stdout + ro.stderr, (ro.stdout[-2000:], ro.stderr[-2000:])
    writable = run("status", "--state-dir", str(state), "--json", cwd=tmp_path)
    assert json.loads(ro.stdout) == json.loads(writable.stdout)


def test_reconcile_of_a_wal_store_in_a_folder_it_may_not_write_says_why(tmp_path: Path, capture: list[dict]) -> None:
    """SQLite reads a store in WAL mode only through a ``-shm`` file it makes beside it: in a folder the
    user may not write (and no process holding the store open) reconcile said only SQLite's "attempt
    to write a readonly database". Now the line says what the folder needs."""
    import sqlite3

    from tests.test_cli import unprivileged

    store = tmp_path / "store"
    log = write_log(tmp_path / "a.jsonl", copies(capture, 1, "wal")[0])
    uri = f"sqlite:///{store / 'mlflow.db'}"
    b = run("batch", str(log), "--tracking-uri", uri, "--state-dir", str(tmp_path / "s"), "-q", cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    with sqlite3.connect(store / "mlflow.db") as con:
        assert con.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    con.close()
    assert not (store / "mlflow.db-shm").exists(), "closed: no -shm to read it through"
    store.chmod(0o555)
    try:
        ro = subprocess.run(unprivileged([EXE, "reconcile", str(log), "--tracking-uri", uri]), cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=240)  # fmt: skip
    finally:
        store.chmod(0o755)
    assert ro.returncode == 4 and "Traceback" not in ro.stderr, ro.stderr[-2000:]
    assert "WAL mode" in ro.stderr and "folder must be writable" in ro.stderr, ro.stderr[-2000:]


def test_status_with_nothing_ingested_yet(tmp_path: Path) -> None:
    state = tmp_path / "never-used"
    js = run("status", "--state-dir", str(state), "--json", cwd=tmp_path)
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout)["files"] == [] and json.loads(js.stdout)["runs"] == []
    human = run("status", "--state-dir", str(state), cwd=tmp_path)
    assert human.returncode == 0 and human.stdout.strip() and human.stderr == "", human
    no_traceback(human)


# --- redact ----------------------------------------------------------------------------------------


def message_texts(rec: dict) -> list[str]:
    out = []
    for m in rec.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else m
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return [t for t in out if len(t.strip()) >= 4]


def response_texts(rec: dict) -> list[str]:
    resp = rec.get("response")
    if not isinstance(resp, dict):
        return []
    out = [(c.get("message") or {}).get("content") for c in resp.get("choices") or [] if isinstance(c, dict)]
    return [t for t in out if isinstance(t, str) and len(t.strip()) >= 4]


def strings(obj: Any) -> Iterator[str]:
    """Every string in a value, JSON text decoded too (attributes hold JSON)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from strings(v)
    elif isinstance(obj, str):
        yield obj
        if obj[:1] in ("{", "[", '"'):
            try:
                decoded = json.loads(obj)
            except ValueError:
                return
            if decoded != obj:
                yield from strings(decoded)
    elif obj is not None:
        yield str(obj)


def found(texts: set[str], values: list[str]) -> set[str]:
    return {t for t in texts if any(t in v for v in values)}


def test_redact_keeps_texts_out_but_usage_and_cost_in(tmp_path: Path, capture: list[dict]) -> None:
    recs = copies(capture, 1, "redact")[0]
    path = write_log(tmp_path / "logs" / "calls.jsonl", recs)
    calls = calls_of(recs)
    prompts = {t for r in recs for t in message_texts(r)}
    answers = {t for r in recs for t in response_texts(r)}
    assert len(prompts) > 20 and len(answers) > 20
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"

    b = run("batch", str(path), "--tracking-uri", uri, "--experiment-name", "all", "--redact", "all", "--no-state", "-q", cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    traces = all_traces(uri, "all")
    assert {t.info.tags["litellm.call_id"] for t in traces} == set(calls)
    for t in traces:
        everything = [*strings(t.info.to_dict()), *(s for span in t.data.spans for s in strings(span.to_dict()))]
        leaked = found(prompts | answers, everything)
        assert not leaked, (t.info.tags["litellm.call_id"], sorted(leaked)[:5])

        rs = calls[t.info.tags["litellm.call_id"]]
        want_usage = {
            "input_tokens": sum(r["prompt_tokens"] for r in rs),
            "output_tokens": sum(r["completion_tokens"] for r in rs),
            "total_tokens": sum(r["total_tokens"] for r in rs),
        }
        usage = t.info.token_usage or {}
        assert {k: usage.get(k) for k in want_usage} == want_usage, (t.info.tags["litellm.call_id"], usage)
        assert t.info.cost is not None and t.info.cost["total_cost"] == pytest.approx(
            sum(r["response_cost"] for r in rs), rel=1e-9, abs=1e-15
        )

    b = run(
        "batch", str(path), "--tracking-uri", uri, "--experiment-name", "msgs", "--redact", "messages", "--no-state", "-q", cwd=tmp_path
    )
    assert b.returncode == 0, b.stderr[-3000:]
    traces = all_traces(uri, "msgs")
    assert {t.info.tags["litellm.call_id"] for t in traces} == set(calls)
    for t in traces:
        cid = t.info.tags["litellm.call_id"]
        inputs = [s for span in t.data.spans for s in strings(span.inputs)]
        outputs = [s for span in t.data.spans for s in strings(span.outputs)]
        assert inputs, cid
        leaked = found(prompts, inputs)
        assert not leaked, (cid, sorted(leaked)[:5])
        want = {a for r in calls[cid] for a in response_texts(r)}
        assert found(want, outputs) == want, (cid, sorted(want - found(want, outputs))[:3])


# --- lock ------------------------------------------------------------------------------------------


def test_second_run_on_the_same_state_exits_5_at_once(tmp_path: Path, capture: list[dict]) -> None:
    cs = copies(capture, 3, "lock")
    log = write_log(tmp_path / "logs" / "p.jsonl", [r for c in cs for r in c])
    db = tmp_path / "store.db"
    state = tmp_path / "state"
    args = ["batch", str(log), "--tracking-uri", f"sqlite:///{db}", "--experiment-name", "locked", "--state-dir", str(state), "-q"]
    assert run(*args, cwd=tmp_path, timeout=120).returncode == 0
    (state_file,) = state.glob("batch-*.json")
    # Another run in the middle of its work: a real process holding this state's lock as a run does.
    holder_code = (
        "import sys, time; from pathlib import Path; from ingest.checkpoints import State\n"
        "with State(Path(sys.argv[1]), 'batch', {}).locked():\n    print('locked', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(state_file)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        second = run(*args, cwd=tmp_path, timeout=120)
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.communicate(timeout=30)

    no_traceback(second)
    assert second.returncode == 5, (second.returncode, second.stdout, second.stderr[-3000:])
    assert took < 60, f"the second run took {took:.1f}s: it waited for the lock instead of leaving"
    lines = [x for x in second.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, second.stderr
    locks = list(state.glob("*.lock"))
    assert len(locks) == 1, locks
    assert lines[0].startswith("litellm-ingest: error: ") and str(locks[0]) in lines[0], lines[0]
    assert f"pid {holder.pid}" in lines[0], lines[0]
    assert second.stdout == ""


def _retried_across(tmp_path: Path, capture: list[dict], gap_s: float) -> tuple[Path, list[dict], dict]:
    """Two files: a retried call's failure ends ``calls.jsonl.1``, its retry starts ``calls.jsonl``
    ``gap_s`` later (longer than ``--settle``: a late retry); the rest of a copy of the capture around."""
    recs, later = copies(capture, 2, f"across-{gap_s}")
    calls = calls_of(recs)
    pair = next(rs for rs in calls.values() if [r["status"] for r in rs] == ["failure", "success"])
    rest = [r for r in recs if r["litellm_call_id"] != pair[0]["litellm_call_id"]]
    fail, ok = dict(pair[0]), dict(pair[1])
    shift = max(r["endTime"] for r in rest) + 1 - fail["startTime"]
    fail["startTime"], fail["endTime"] = fail["startTime"] + shift, fail["endTime"] + shift
    ok["startTime"], ok["endTime"] = fail["endTime"] + gap_s, fail["endTime"] + gap_s + 1
    others = [r for r in later if r["startTime"] < later[0]["startTime"] + 5]
    moved = fail["endTime"] + gap_s / 2 - later[0]["startTime"]
    for r in others:  # other calls between the two attempts: the input moves on past --settle
        r["startTime"], r["endTime"] = r["startTime"] + moved, r["endTime"] + moved
    logs = tmp_path / "logs"
    older = write_log(logs / "calls.jsonl.1", [*rest, fail, *others])
    with older.open("a") as f:
        f.write("\n" * 1_200_000)  # read as a step of its own
    write_log(logs / "calls.jsonl", [ok])
    os.utime(older, (time.time() - 60, time.time() - 60))
    return logs, [*rest, fail, *others, ok], {"failure": fail, "success": ok}


def test_reconcile_of_the_newer_file_alone_finds_a_call_begun_in_the_older_one(tmp_path: Path, capture: list[dict]) -> None:
    """The call's trace starts with its failure, in the rotated file not given: it fell outside the
    window the given file spans, and was named missing (exit 6) and "repaired" for ever."""
    logs, _, _ = _retried_across(tmp_path, capture, gap_s=5)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert run("batch", str(logs), "--tracking-uri", uri, "--experiment-name", "E", "--state-dir", str(tmp_path / "st"), "-q",
               cwd=tmp_path).returncode == 0  # fmt: skip
    code, report = reconcile([str(logs / "calls.jsonl")], uri, "E", tmp_path)
    assert (code, report["missing"], report["matched"]) == (0, [], 1), report


def test_repair_counts_a_call_once_however_often_it_was_written(tmp_path: Path, capture: list[dict]) -> None:
    """A deleted call whose retry came later than ``--settle`` is written as failed, then rewritten
    whole: "repaired: 2 of the 1 missing", exit 6, though the call was back."""
    logs, _, pair = _retried_across(tmp_path, capture, gap_s=600)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert run("batch", str(logs), "--tracking-uri", uri, "--experiment-name", "E", "--state-dir", str(tmp_path / "st"), "-q",
               cwd=tmp_path).returncode == 0  # fmt: skip
    client = client_for(uri)
    victim = next(t.info.trace_id for t in trace_infos(uri, "E") if t.info.tags["litellm.call_id"] == pair["success"]["litellm_call_id"])
    client.delete_traces(client.get_experiment_by_name("E").experiment_id, trace_ids=[victim])
    code, report = reconcile([str(logs)], uri, "E", tmp_path, "--repair")
    assert (code, report["repaired"]) == (0, 1), report
    (back,) = [t for t in all_traces(uri, "E") if t.info.trace_id == victim]
    assert back.info.state.value == "OK" and len(back.data.spans) == 3


def test_repair_writes_a_call_from_a_proxy_clock_ahead(tmp_path: Path, capture: list[dict]) -> None:
    """A call that ends two days ahead of this machine's clock is written at once by batch; repair
    took it for one that ended "less than --settle ago" and never wrote it back."""
    recs = reidentify([r for r in capture if r["status"] == "success"][:1], time.time() + 2 * 86400 - capture[0]["startTime"], "ahead")
    path = write_log(tmp_path / "logs" / "a.jsonl", recs)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert run("batch", str(path), "--tracking-uri", uri, "--experiment-name", "E", "--no-state", "-q", cwd=tmp_path).returncode == 0
    client = client_for(uri)
    client.delete_traces(client.get_experiment_by_name("E").experiment_id, trace_ids=[t.info.trace_id for t in trace_infos(uri, "E")])
    code, report = reconcile([str(path)], uri, "E", tmp_path, "--repair")
    assert (code, report["repaired"], report["too_recent"]) == (0, 1, []), report
    assert len(trace_infos(uri, "E")) == 1


def test_an_xz_file_is_read_by_a_stateless_batch_and_compared_by_reconcile(tmp_path: Path, capture: list[dict]) -> None:
    """An xz archive was named in a warning and not read by batch --no-state, and reconcile exited 8
    with it unread (read as text before that: 30 invalid_utf8 lines, and "missing 0")."""
    import lzma

    logs = tmp_path / "logs"
    old, new = copies(capture, 2, "xz")
    (logs).mkdir()
    (logs / "calls.jsonl.1.xz").write_bytes(lzma.compress("".join(json.dumps(r) + "\n" for r in old).encode()))
    write_log(logs / "calls.jsonl", new)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = run("batch", str(logs), "--tracking-uri", uri, "--experiment-name", "E", "--no-state", "--json", cwd=tmp_path)
    no_traceback(proc)
    summary = json.loads(proc.stdout)
    assert proc.returncode == 0 and (summary["quarantined"], summary["records_read"]) == (0, len(old) + len(new)), proc.stdout
    proc = run("reconcile", str(logs), "--tracking-uri", uri, "--experiment-name", "E", "--json", cwd=tmp_path)
    no_traceback(proc)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and (report["unreadable"], report["missing"]) == ([], []), proc.stdout


def test_status_does_not_measure_a_rotated_files_lag_against_the_file_now_at_its_path(tmp_path: Path, capture: list[dict]) -> None:
    """After a rotation the checkpoint's path holds the new file: its size was shown, and a lag of 0,
    while the rotated file had lines unread."""
    first, more, new = copies(capture, 3, "st-rot")
    log = write_log(tmp_path / "logs" / "calls.jsonl", first)
    assert run("batch", str(log.parent), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--state-dir", str(tmp_path / "st"), "-q",
               cwd=tmp_path).returncode == 0  # fmt: skip
    with log.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in more)
    log.rename(log.with_name("calls.jsonl.1"))
    write_log(log, new[:3])
    proc = run("status", "--state-dir", str(tmp_path / "st"), "--json", cwd=tmp_path)
    no_traceback(proc)
    (row,) = [r for r in json.loads(proc.stdout)["files"] if r["path"] == str(log.resolve())]
    assert row["replaced"] and row["lag_bytes"] is None and row["size"] is None, row
    table = run("status", "--state-dir", str(tmp_path / "st"), cwd=tmp_path)
    assert "another file now" in table.stdout, table.stdout


def test_status_tells_backfills_of_other_windows_apart(tmp_path: Path, capture: list[dict]) -> None:
    """Each ``--since``/``--until`` window keeps a state of its own: two backfills of one folder showed
    as two identical header lines and two identical file rows (the window only in ``--json``, as
    epoch microseconds)."""
    from ingest.pipeline import RunOptions, run_incremental

    log = write_log(tmp_path / "logs" / "a.jsonl", copies(capture, 1, "windows")[0])
    store, state = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "state"
    for since, until in ((None, None), (1_000_000_000_000_000, 2_000_000_000_000_000)):
        opts = RunOptions(paths=[str(log)], tracking_uri=store, state_dir=state, since_us=since, until_us=until)
        run_incremental(opts, "backfill")
    st = run("status", "--state-dir", str(state), cwd=tmp_path)
    assert st.returncode == 0, st.stderr[-3000:]
    window = "[--since 2001-09-09T01:46:40Z --until 2033-05-18T03:33:20Z]"
    assert sum(line.startswith(f"backfill {window} -> ") for line in st.stdout.splitlines()) == 1, st.stdout
    assert sum(line.startswith("backfill -> ") for line in st.stdout.splitlines()) == 1, st.stdout
    assert sum(f"backfill {window}" in line and str(log) in line for line in st.stdout.splitlines()) == 1, st.stdout
