"""LiteLLM's own `mlflow` callback writing the same calls into the experiment we write (both read
MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME, so following the README with the callback on does
this): each such call is shown twice, and every run, the daemon and reconcile say so.

The callback's traces are made by LiteLLM's own ``MlflowLogger`` (tests/e2e/callback_replay.py,
run in the proxy's venv) replaying the same log; what is expected is counted from MLflow's own
search, never from the ingester's output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import all_traces, copies, reidentify, run_cli, write_jsonl, write_log
from tests.proxykit import E2E, _clean_env, proxy_python
from tests.tailkit import Daemon, metric, wait_for

SAID = "trace(s) of LiteLLM's own mlflow callback"


def replay_callback(log: Path, uri: str, experiment: str, creds: dict[str, str] | None = None) -> int:
    """LiteLLM's callback replays ``log`` into ``experiment`` (as the user ``creds`` name); the number of its traces there."""
    mlflow_env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment, "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false"}
    env = _clean_env(mlflow_env | (creds or {}))
    proc = subprocess.run([str(proxy_python()), str(E2E / "callback_replay.py"), str(log)], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return len(callback_traces(uri, experiment))


def callback_traces(uri: str, experiment: str) -> list:
    return [t for t in all_traces(uri, experiment, include_spans=False, missing_ok=True) if "litellm.call_id" not in t.info.tags]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = run_cli(list(args), cwd, env, 300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def window(records: list[dict]) -> tuple[str, str]:
    start = datetime.fromtimestamp(min(r["startTime"] for r in records), tz=UTC)
    end = datetime.fromtimestamp(max(r["endTime"] for r in records), tz=UTC)
    return (start - timedelta(hours=1)).isoformat(), (end + timedelta(hours=1)).isoformat()


def test_a_run_into_the_experiment_litellms_callback_writes_says_each_call_it_traced_is_shown_twice(
    tmp_path: Path, capture: list[dict]
) -> None:
    records = reidentify(capture)
    log = write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    theirs = replay_callback(log, uri, "shared")
    assert theirs == len(records), "the callback traced every attempt"

    shared = run("batch", str(log), "--tracking-uri", uri, "--experiment-name", "shared", "--no-state", "--json", cwd=tmp_path)
    assert shared.returncode == 0, shared.stderr
    assert shared.stderr.count(SAID) == 1, shared.stderr
    assert "'shared'" in shared.stderr and "pass --replace-callback-traces" in shared.stderr
    summary = json.loads(shared.stdout)
    assert summary["callback_traces"] == theirs
    assert summary["traces_written"] == len({r["litellm_call_id"] for r in records}), "ours are written all the same"

    dry = run("batch", str(log), "--tracking-uri", uri, "--experiment-name", "shared", "--dry-run", "--json", cwd=tmp_path)
    assert dry.returncode == 0 and SAID not in dry.stderr, "a dry run writes nothing, so it looks for nothing"
    assert json.loads(dry.stdout)["callback_traces"] == 0

    apart = run("batch", str(log), "--tracking-uri", uri, "--experiment-name", "ours", "--no-state", "--json", cwd=tmp_path)
    assert apart.returncode == 0 and SAID not in apart.stderr, apart.stderr
    assert json.loads(apart.stdout)["callback_traces"] == 0

    since, until = window(records)
    for experiment, expected in (("shared", theirs), ("ours", 0)):
        args = ("reconcile", str(log), "--tracking-uri", uri, "--experiment-name", experiment, "--since", since, "--until", until)
        report = run(*args, "--json", cwd=tmp_path)
        assert report.returncode == 0, (report.stdout, report.stderr)
        assert json.loads(report.stdout)["callback_traces"] == expected
        text = run(*args, cwd=tmp_path).stdout
        assert (f"also in the window: {theirs} trace(s) of LiteLLM's own mlflow callback" in text) == bool(expected), text


def test_a_daemon_into_a_server_the_callback_writes_too_says_it_once_and_counts_them(
    mlflow_server, tmp_path: Path, capture: list[dict], experiment_name: str
) -> None:
    records = reidentify(capture)
    log = write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
    theirs = replay_callback(log, mlflow_server.url, experiment_name)
    assert theirs == len(records)
    d = Daemon(log.parent, mlflow_server.url, experiment_name, tmp_path / "state").start()
    try:
        calls = len({r["litellm_call_id"] for r in records})
        wait_for(lambda: metric(d.metrics(), "litellm_ingest_traces_written_total") >= calls, 60, "every call written")
        wait_for(lambda: metric(d.metrics(), "litellm_ingest_callback_traces_seen") > 0, 30, "the callback's traces seen")
        assert metric(d.metrics(), "litellm_ingest_callback_traces_seen") <= theirs
    finally:
        assert d.stop() == 0
    assert d.log.read_text().count(SAID) == 1, d.log.read_text()[-3000:]
    assert len(callback_traces(mlflow_server.url, experiment_name)) == theirs, "the callback's traces are left as they are"


def shifted(record: dict, by_s: float) -> dict:
    r = {**record}
    for k in ("startTime", "endTime", "completionStartTime"):
        if r.get(k) is not None:
            r[k] = r[k] + by_s
    return r


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_replace_deletes_the_callbacks_trace_of_each_call_written_and_nothing_else(
    request: pytest.FixtureRequest, tmp_path: Path, capture: list[dict], store: str
) -> None:
    """Migrating: the callback traced every call, then the user replays the logs with
    --replace-callback-traces (a batch into SQLite; a backfill whose two workers write into
    PostgreSQL). Each call ends as one trace, ours; the callback's traces of calls not in these
    logs, and of a call id it reused at another time, stay; a re-run deletes nothing more."""
    # PostgreSQL: past the 256 calls after which a backfill's workers take the steps, and write them
    records = reidentify(capture) if store == "sqlite" else [r for c in copies(capture, 7, "pg", spacing_s=60) for r in c]
    log = write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
    elsewhere = reidentify(capture[:5], shift_s=records[0]["startTime"] - capture[0]["startTime"])
    first = min(records, key=lambda r: r["startTime"])
    reused = shifted(first, max(r["endTime"] for r in records) - first["startTime"] - 1)  # same id, later, inside the window
    assert reused["startTime"] > max(r["endTime"] for r in records if r["litellm_call_id"] == first["litellm_call_id"])
    if store == "sqlite":
        uri = callback_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("postgres").new_database()
        callback_uri = uri.replace("postgresql://", "postgresql+psycopg://")  # the proxy's venv has psycopg 3
    replayed = write_jsonl(tmp_path / "callback.jsonl", [*records, *elsewhere, reused])
    theirs = replay_callback(replayed, callback_uri, "shared")
    assert theirs == len(records) + len(elsewhere) + 1

    def replace(state: str) -> dict:
        how = ["batch", "--no-state"] if store == "sqlite" else ["backfill", "--workers", "2", "--batch-size", "5", "--state-dir", state]
        target = ("--tracking-uri", uri, "--experiment-name", "shared")
        proc = run(*how, str(log), *target, "--json", "--replace-callback-traces", cwd=tmp_path)
        assert proc.returncode == 0 and SAID not in proc.stderr, proc.stderr
        return json.loads(proc.stdout)

    summary = replace(str(tmp_path / "one"))
    assert summary["callback_traces_replaced"] == len(records)
    assert store == "sqlite" or summary["workers"] == 2
    calls = {r["litellm_call_id"] for r in records}
    ours = [t for t in all_traces(callback_uri, "shared", include_spans=False) if "litellm.call_id" in t.info.tags]
    assert sorted(t.info.tags["litellm.call_id"] for t in ours) == sorted(calls), "one trace per call, ours"
    left = callback_traces(callback_uri, "shared")
    assert len(left) == len(elsewhere) + 1, "the calls not in these logs and the reused id keep the callback's trace"
    assert {t.info.request_time for t in left} >= {int(reused["startTime"] * 1000)}

    assert replace(str(tmp_path / "two"))["callback_traces_replaced"] == 0
    assert len(callback_traces(callback_uri, "shared")) == len(elsewhere) + 1


def test_replace_in_a_backfill_with_workers_and_a_daemon_through_a_server(
    mlflow_server, tmp_path: Path, capture: list[dict], experiment_name: str
) -> None:
    """The same through a real server: a backfill whose workers build the calls, and a daemon whose
    writes reach MLflow before the callback's traces of the same calls (its export is asynchronous):
    they are replaced all the same, at the next look (its metrics count them)."""
    records = reidentify(capture)
    archive = write_jsonl(tmp_path / "archive" / "old.jsonl", records)
    live = reidentify(capture)
    log = write_jsonl(tmp_path / "logs" / "proxy.jsonl", live)
    assert replay_callback(archive, mlflow_server.url, experiment_name) == len(records)

    proc = run("backfill", str(archive), "--tracking-uri", mlflow_server.url, "--experiment-name", experiment_name, "--workers", "2",
               "--batch-size", "5", "--json", "--replace-callback-traces", "--state-dir", str(tmp_path / "bf"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["callback_traces_replaced"] == len(records)
    assert callback_traces(mlflow_server.url, experiment_name) == []

    d = Daemon(log.parent, mlflow_server.url, experiment_name, tmp_path / "state", "--replace-callback-traces").start()
    try:
        calls = len({r["litellm_call_id"] for r in live})
        wait_for(lambda: metric(d.metrics(), "litellm_ingest_traces_written_total") >= calls, 60, "every live call written")
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGSTOP)  # no look while the callback's traces arrive late
        try:
            assert replay_callback(log, mlflow_server.url, experiment_name) == len(live)
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        wait_for(lambda: metric(d.metrics(), "litellm_ingest_callback_traces_replaced_total") >= len(live), 120, "the callback's replaced")
        assert metric(d.metrics(), "litellm_ingest_callback_traces_replaced_total") == len(live)
    finally:
        assert d.stop() == 0
    assert callback_traces(mlflow_server.url, experiment_name) == []
    ours = [t for t in all_traces(mlflow_server.url, experiment_name, include_spans=False) if "litellm.call_id" in t.info.tags]
    assert len(ours) == len({r["litellm_call_id"] for r in [*records, *live]})
    assert SAID not in d.log.read_text()


def test_a_look_while_the_database_is_down_says_one_line_and_no_traceback(
    own_postgres, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The look is the last thing a run does: a database that went down since its last write (or
    crashes under it) fails it, and MLflow's own database layer dumps the failed query with its
    traceback before raising (a backfill riding out a PostgreSQL crash printed one with ``-v``).
    The look says its failure in one line, and keeps its window for the next look."""
    import logging

    from ingest.callback_traces import CallbackWatch
    from ingest.pipeline import _quick_read
    from ingest.sink import make_sink, resolve_target

    caplog.set_level(logging.DEBUG, logger="mlflow")  # as `litellm-ingest -v`, and more: all MLflow says shows
    target = resolve_target(own_postgres.new_database(), "shared", None)
    sink = make_sink(target, deadline_s=5)
    watch = CallbackWatch(sink, target, _quick_read(sink, target))
    watch.wrote(1_700_000_000_000_000, 1_700_000_100_000_000)
    own_postgres.stop()
    with caplog.at_level(logging.DEBUG):
        watch.look(force=True)
    sink.close()
    ours = [r for r in caplog.records if r.name == "ingest.callback_traces"]
    assert len(ours) == 1 and "could not look for the callback's traces" in ours[0].getMessage(), caplog.text
    assert not [r for r in caplog.records if r.name.startswith("mlflow") and r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text
    assert (watch.lo, watch.hi) == (1_700_000_000_000_000, 1_700_000_100_000_000), "the window waits for the next look"


def on_a_millisecond_the_callback_floors_below(record: dict) -> dict:
    """``record`` moved (by under 50 ms) to start on a whole millisecond whose float LiteLLM's
    callback turns into the millisecond before (``int(start.timestamp() * 1e9)``, truncated), as
    about one call in 2,700 of a live proxy starts; ours reads the same float as that millisecond."""
    ms = int(record["startTime"] * 1000) + 1
    while int((ms / 1000) * 1e9) // 1_000_000 == ms:
        ms += 1
    moved = shifted(record, ms / 1000 - record["startTime"])
    moved["startTime"] = ms / 1000
    return moved


def test_replace_deletes_the_callbacks_trace_that_starts_a_truncated_millisecond_before_ours(tmp_path: Path, capture: list[dict]) -> None:
    """Both read the call's start from one float: ours rounds it to the microsecond, the callback
    truncates its nanoseconds, so its trace may start 1 ms before ours. It is still the call's."""
    calls: dict[str, list[dict]] = {}
    for r in reidentify(capture):
        calls.setdefault(r["litellm_call_id"], []).append(r)
    records = [on_a_millisecond_the_callback_floors_below(rs[0]) for rs in calls.values() if len(rs) == 1]
    log = write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert replay_callback(log, uri, "shared") == len(records)
    theirs = {t.info.request_time for t in callback_traces(uri, "shared")}
    assert theirs == {round(r["startTime"] * 1000) - 1 for r in records}, "each starts 1 ms before the call"

    proc = run("batch", str(log), "--tracking-uri", uri, "--experiment-name", "shared", "--no-state", "--json",
               "--replace-callback-traces", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["callback_traces_replaced"] == len(records)
    assert callback_traces(uri, "shared") == []


@pytest.mark.parametrize("stop", ["ctrl_c", "failure"])
def test_a_backfill_stopped_by_ctrl_c_or_a_failure_replaces_the_callbacks_traces_of_what_it_wrote_before_it_stopped(
    stop: str, tmp_path: Path, capture: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM) finishes the step in hand and saves; a run that fails (its state or
    quarantine unwritable, a worker dead: not MLflow away) saves what it wrote. Those calls are
    written, and the run continued after them never writes them again. It stopped without the last
    look, so the callback's traces of the calls written since the one before stayed, for good."""
    from click.testing import CliRunner

    from ingest import STOP_SIGNALS, cli
    from ingest.checkpoints import StateError

    first, second = (write_log(tmp_path / "logs" / f"proxy-{i}.jsonl", [r for c in cs for r in c]) for i, cs in
                     enumerate((copies(capture, 3, "first"), copies(capture, 3, "second", spacing_s=7200))))  # fmt: skip
    assert min(f.stat().st_size for f in (first, second)) > 1 << 20, "each file a step of its own"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    theirs = replay_callback(second, uri, "shared")
    assert theirs == sum(1 for line in second.open() if line.strip())
    update = cli._Progress.update

    def ctrl_c_in_the_second_file(self: cli._Progress, path: str, chunk: object, summary: object) -> None:
        update(self, path, chunk, summary)
        if path == str(second):
            if stop == "failure":
                raise StateError("cannot save the state: No space left on device")
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cli._Progress, "update", ctrl_c_in_the_second_file)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    args = ["backfill", str(tmp_path / "logs"), "--tracking-uri", uri, "--experiment-name", "shared", "--workers", "1",
            "--state-dir", str(tmp_path / "state"), "--replace-callback-traces", "-q"]  # fmt: skip
    try:
        stopped = CliRunner().invoke(cli.main, args)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stop == "failure":
        assert stopped.exit_code == 7 and "No space left" in stopped.output, stopped.output
    else:
        assert stopped.exit_code == 130 and "progress is saved" in stopped.output, stopped.output
    monkeypatch.setattr(cli._Progress, "update", update)
    resumed = CliRunner().invoke(cli.main, args)
    assert resumed.exit_code == 0, resumed.output
    assert callback_traces(uri, "shared") == [], "the calls written before the stop are one trace each, ours"
