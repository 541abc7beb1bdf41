"""Backfill on many cores (``--workers``): real `litellm-ingest` processes into real SQLite files,
a real PostgreSQL and a real server. The promise: any number of workers writes what one process
writes, row for row, and a backfill killed with its workers mid-run leaves no process behind and
resumes to the same rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ingest.pipeline import Pipeline
from ingest.quarantine import QuarantineWriter
from ingest.workers import Emitted
from tests.conftest import Postgres, copies, sqlite_trace_count, write_log
from tests.followkit import RecordingSink
from tests.storekit import assert_same_as_one_writer, store_rows, trace_and_span_counts

EXE = str(Path(sys.executable).parent / "litellm-ingest")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def backfill_args(uri: str, logs: Path, state: Path, workers: int) -> list[str]:
    return [EXE, "backfill", str(logs), "--tracking-uri", uri, "--experiment-name", "fleet", "--state-dir", str(state)]


def backfill(uri: str, logs: Path, state: Path, workers: int) -> dict[str, Any]:
    args = [*backfill_args(uri, logs, state, workers), "--workers", str(workers), "--json"]
    p = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def archive(capture: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 540 real-shaped calls (retries and fallbacks among them) in three files: the first
    file's calls are built in-process (workers start after 256 calls), the rest by the workers."""
    d = tmp_path_factory.mktemp("archive")
    batches = copies(capture, 12, "workers")
    for i in range(3):
        write_log(d / f"proxy-{i}.jsonl", [r for b in batches[i * 4 : i * 4 + 4] for r in b])
    return d


@pytest.fixture(scope="module")
def one_worker(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[tuple[Any, ...]]]:
    d = tmp_path_factory.mktemp("one-worker")
    uri = f"sqlite:///{d / 'one.db'}"
    summary = backfill(uri, archive, d / "state", 1)
    assert summary["workers"] == 0 and summary["traces_written"] > 400
    return store_rows(uri)


def test_workers_write_what_one_writes_row_for_row_into_sqlite(archive: Path, one_worker: dict, tmp_path: Path) -> None:
    """--workers 3 into SQLite: this process writes, two build (sharded)."""
    uri = f"sqlite:///{tmp_path / 'two.db'}"
    summary = backfill(uri, archive, tmp_path / "state", 3)
    assert summary["workers"] == 2, "the workers must have started"
    assert summary["traces_written"] == len(one_worker["info"]) and summary["spans_written"] == len(one_worker["spans"])
    assert_same_as_one_writer(uri, one_worker)


def test_calls_the_store_holds_otherwise_are_merged_by_workers_as_one_process_merges_them(capture: list[dict], tmp_path: Path) -> None:
    """Workers send this process only the rows a new trace needs; a trace the store already holds
    with other spans (here: the second file's calls, written before with --redact all) takes
    MLflow's merge, which needs the spans: they are built again here. Same rows as one process."""
    logs, late = tmp_path / "logs", tmp_path / "late"
    batches = copies(capture, 8, "merge")
    write_log(logs / "proxy-1.jsonl", [r for b in batches[:6] for r in b])
    write_log(late / "proxy-2.jsonl", [r for b in batches[6:] for r in b])
    rows = {}
    for workers in (1, 3):
        uri = f"sqlite:///{tmp_path / f'w{workers}.db'}"
        first = [*backfill_args(uri, late, tmp_path / f"redacted-{workers}", 1), "--redact", "all", "-q"]
        assert subprocess.run(first, env=_env(), capture_output=True, text=True, timeout=300).returncode == 0
        redacted = store_rows(uri)["spans"]
        shutil.copy(late / "proxy-2.jsonl", logs)
        summary = backfill(uri, logs, tmp_path / f"state-{workers}", workers)
        assert summary["workers"] == (2 if workers == 3 else 0) and summary["traces_written"] > 300
        rows[workers] = store_rows(uri)
        assert {s[:2] for s in redacted} <= {s[:2] for s in rows[workers]["spans"]} and not redacted & rows[workers]["spans"]
    assert rows[3] == rows[1]


def test_two_workers_write_what_one_writes_row_for_row_into_postgresql(
    archive: Path, one_worker: dict, tmp_path: Path, postgres: Postgres
) -> None:
    uri = postgres.new_database()
    summary = backfill(uri, archive, tmp_path / "state", 2)
    assert summary["workers"] == 2
    assert_same_as_one_writer(uri, one_worker)


def test_two_workers_through_a_server_write_every_call_once(archive: Path, one_worker: dict, tmp_path: Path, mlflow_server: Any) -> None:
    from tests.conftest import all_traces

    name = f"workers-{os.getpid()}-{time.monotonic_ns()}"
    args = [*backfill_args(mlflow_server.url, archive, tmp_path / "state", 2), "--workers", "2", "--json"]
    args[args.index("fleet")] = name
    p = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["workers"] == 2
    traces = all_traces(mlflow_server.url, name)
    calls = sorted(t.info.tags["litellm.call_id"] for t in traces)
    assert calls == sorted(v for _, k, v in one_worker["tags"] if k == "litellm.call_id"), "every call once"
    assert sum(len(t.data.spans) for t in traces) == len(one_worker["spans"])


def _workers(pid: int) -> list[int]:
    """The backfill's worker processes (not multiprocessing's resource tracker)."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _started_with_workers(uri: str, logs: Path, state: Path, db: Path) -> tuple[subprocess.Popen, list[int]]:
    """A backfill with two building workers, returned once a step they built was committed."""
    proc = subprocess.Popen([*backfill_args(uri, logs, state, 3), "--workers", "3", "-q"], env=_env(), stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    before_workers: int | None = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        workers = _workers(proc.pid)
        if len(workers) == 2:
            count = sqlite_trace_count(db)
            before_workers = count if before_workers is None else before_workers
            if count > before_workers:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"the backfill ended before it could be killed: give it more input ({workers}, {before_workers})"
    return proc, workers


def _gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(w) for w in pids):
        time.sleep(0.1)
    return not any(_alive(w) for w in pids)


def test_a_backfill_whose_worker_or_itself_is_killed_mid_run_leaves_no_process_behind_and_resumes_to_the_same_rows(
    capture: list[dict], tmp_path: Path
) -> None:
    logs, db = tmp_path / "logs", tmp_path / "killed.db"
    batches = copies(capture, 36, "kill")
    for i in range(9):
        write_log(logs / f"proxy-{i}.jsonl", [r for b in batches[i * 4 : i * 4 + 4] for r in b])
    uri = f"sqlite:///{db}"

    proc, workers = _started_with_workers(uri, logs, tmp_path / "state", db)
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "worker process died" in err and "Traceback" not in err, err[-2000:]
    assert _gone(workers), "a worker outlived its backfill"

    proc, workers = _started_with_workers(uri, logs, tmp_path / "state", db)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert workers and _gone(workers), "a worker outlived its killed backfill"

    backfill(uri, logs, tmp_path / "state", 2)
    reference = f"sqlite:///{tmp_path / 'ref.db'}"
    backfill(reference, logs, tmp_path / "ref-state", 1)
    assert_same_as_one_writer(uri, store_rows(reference))


def _marked(mark: str) -> list[int]:
    """Processes whose environment carries ``mark`` (a backfill's workers inherit it)."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"LITELLM_TEST_MARK={mark}".encode() in env.read_bytes() and _alive(int(env.parent.name)):
                found.append(int(env.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_to_the_backfills_process_group_stops_it_as_interrupted_and_it_resumes_to_the_same_rows(
    capture: list[dict], tmp_path: Path, sig: signal.Signals
) -> None:
    """``timeout``, a closed terminal and systemd's stop signal the whole process group, workers
    included: they died of it (SIGTERM, SIGHUP), and the run ended with exit 1, "a backfill worker
    process died", instead of finishing the step in hand, saving and exiting 130."""
    logs, db = tmp_path / "logs", tmp_path / "stopped.db"
    batches = copies(capture, 36, "group")
    for i in range(9):
        write_log(logs / f"proxy-{i}.jsonl", [r for b in batches[i * 4 : i * 4 + 4] for r in b])
    uri = f"sqlite:///{db}"
    args = [*backfill_args(uri, logs, tmp_path / "state", 3), "--workers", "3", "-q"]
    proc = subprocess.Popen(args, env=_env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, workers = time.monotonic() + 120, []
    while time.monotonic() < deadline and proc.poll() is None and not (len(workers) == 2 and sqlite_trace_count(db) > 300):
        workers = _workers(proc.pid)
        time.sleep(0.02)
    assert proc.poll() is None, "the backfill ended before it could be stopped: give it more input"
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "progress is saved" in err and "Traceback" not in err, err[-2000:]
    assert _gone(workers), "a worker outlived its backfill"

    backfill(uri, logs, tmp_path / "state", 2)
    reference = f"sqlite:///{tmp_path / 'ref.db'}"
    backfill(reference, logs, tmp_path / "ref-state", 1)
    assert_same_as_one_writer(uri, store_rows(reference))


def test_workers_started_before_a_store_that_cannot_be_opened_are_gone_with_the_run(capture: list[dict], tmp_path: Path) -> None:
    """A big backfill starts its workers before it opens the store; when that fails it says so in
    one line and leaves no worker behind."""
    logs = tmp_path / "logs"
    write_log(logs / "proxy.jsonl", copies(capture, 1, "prestart")[0])
    with (logs / "proxy.jsonl").open("a") as f:
        f.write("x" * (5 << 20) + "\n")  # never read: big enough to start workers at once
    mark = f"{os.getpid()}-{time.monotonic_ns()}"
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the store's directory should be")
    args = [*backfill_args(f"sqlite:///{blocked / 'x.db'}", logs, tmp_path / "state", 3), "--workers", "3"]
    p = subprocess.run(args, env={**_env(), "LITELLM_TEST_MARK": mark}, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert _marked(mark) == [], "the run must stop its workers itself (not leave them to notice their parent is gone)"


_WARM = """
import json, os, sys
from ingest.warm import for_backfill, shutdown
big, small, uri = sys.argv[1:4]
cases = {
    "sqlite": ([big], 3, False, uri),
    "postgresql": ([big, "s3://bucket/logs/"], 3, False, "postgresql://u@localhost/db"),
    "env": ([big], 2, False, None),
    "small": ([small], 3, False, uri),
    "dry_run": ([big], 3, True, uri),
    "one": ([big], 1, False, uri),
    "missing": ([big, big + ".missing"], 3, False, uri),
}
out = {}
for name, args in cases.items():
    warm = for_backfill(*args)
    out[name] = len({ex.submit(os.getpid).result(timeout=120) for ex in warm} - {os.getpid()})
    shutdown(warm)
out["mlflow_loaded_here"] = "mlflow" in sys.modules
print(json.dumps(out))
"""


def test_a_big_backfill_starts_its_workers_before_this_process_loads_mlflow(tmp_path: Path) -> None:
    """The command line starts a big backfill's workers first thing, from a module that loads
    neither MLflow nor the pipeline, so their start-up (~2 s of imports each) overlaps this
    process's; only for local files big enough, n-1 of them into SQLite, none for a dry run."""
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_bytes(b"{}\n" * (2 << 20))
    small.write_bytes(b"{}\n")
    env = {**_env(), "MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}
    p = subprocess.run(
        [sys.executable, "-c", _WARM, str(big), str(small), f"sqlite:///{tmp_path / 'm.db'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout) == {
        "sqlite": 2,
        "postgresql": 3,
        "env": 2,
        "small": 0,
        "dry_run": 0,
        "one": 0,
        "missing": 0,
        "mlflow_loaded_here": False,
    }


def test_sizing_a_backfill_for_an_early_start_reads_no_more_of_the_listing_than_it_needs(tmp_path: Path) -> None:
    """Log names only, directories recursively, globs; a path that names nothing means no early start
    (the run stops at once); and a big archive is not listed to its end here (the run lists it)."""
    from ingest.warm import _local_bytes

    mib = 1 << 20
    for name, size in (("a.jsonl", 3), ("b.jsonl", 3), ("notes.txt", 10), ("sub/c.jsonl.1", 1), ("sub/c.jsonl.lock", 5)):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * (size * mib))
    assert _local_bytes([str(tmp_path)], 100 * mib) == 7 * mib
    assert _local_bytes([str(tmp_path / "*.jsonl"), "s3://bucket/x/", "postgresql://u@h/db"], 100 * mib) == 6 * mib
    assert _local_bytes([str(tmp_path / "notes.txt")], 100 * mib) == 10 * mib, "a file named on the command line counts as it is"
    assert 4 * mib <= _local_bytes([str(tmp_path)], 4 * mib) < 7 * mib
    assert _local_bytes([str(tmp_path / "a.jsonl"), str(tmp_path / "missing.jsonl")], 1) == 0
    assert _local_bytes([str(tmp_path / "a.jsonl"), str(tmp_path / "*.gz")], 1) == 0


def test_a_backfill_rides_through_a_postgresql_crash_at_its_start_and_in_its_middle(
    capture: list[dict], tmp_path: Path, own_postgres: Any
) -> None:
    """The database is down when the backfill starts, comes back, then crashes (``pg_ctl -m
    immediate``) while two workers write to it and comes back again, each time within
    ``--mlflow-timeout``: the backfill waits it out and ends with every call once, exit 0. With
    ``-v`` the workers' retries are logged, as one process's are (they were not)."""
    from tests.tailkit import spans_of

    pg = own_postgres
    try:
        uri = pg.new_database()
        records = [r for b in copies(capture, 60, "pg-crash") for r in b]
        write_log(tmp_path / "logs" / "proxy.jsonl", records)
        calls: dict[str, list[dict]] = {}
        for r in records:
            calls.setdefault(r["litellm_call_id"], []).append(r)

        def counted(sql: str) -> int:
            import psycopg

            try:
                with psycopg.connect(uri, connect_timeout=2) as con:
                    return int(con.execute(sql).fetchone()[0])
            except psycopg.Error:
                return 0

        pg.halt()
        exe, *rest = backfill_args(uri, tmp_path / "logs", tmp_path / "state", 2)
        args = [exe, "-v", *rest, "--workers", "2", "--json"]
        with socket.create_server(("127.0.0.1", pg.port)) as down:  # answers nothing: a database not up yet
            down.settimeout(120)
            p = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            down.accept()[0].close()
            time.sleep(1.5)
            assert p.poll() is None, "the backfill gave up on a database down at its start: " + p.communicate()[1][-2000:]
        pg.resume()
        deadline = time.monotonic() + 120
        while counted("SELECT count(*) FROM trace_info") < 100 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.poll() is None, "the backfill ended before the crash it was to ride through: " + p.communicate()[1][-2000:]
        pg.halt()
        time.sleep(3)
        pg.resume()
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
        assert any("[worker" in line and "retrying" in line for line in err.splitlines()), err[-3000:]
        summary = json.loads(out)
        assert summary["workers"] == 2 and summary["traces_written"] == len(calls)
        assert counted("SELECT count(*) FROM trace_info") == len(calls)
        assert counted("SELECT count(*) FROM spans") == spans_of(list(calls.values()))
    finally:
        pg.stop()


@pytest.mark.parametrize("when", ["at_its_start", "mid_run"])
def test_a_backfill_into_a_postgresql_that_stops_answering_ends_with_exit_4_and_a_rerun_completes(
    capture: list[dict], tmp_path: Path, own_postgres: Any, when: str
) -> None:
    """PostgreSQL frozen (SIGSTOP: no error, the socket just stays silent) before the backfill opens
    its store, or mid-run: the backfill sat in a connect or a read for as long as it lasted, saying
    nothing, whatever ``--mlflow-timeout``. Now it gives up in one line (exit 4), and a run after
    the database answers again writes every call once."""
    import sqlalchemy

    from tests.tailkit import spans_of

    def traces() -> int:
        try:
            return trace_and_span_counts(uri, "fleet")[0]
        except sqlalchemy.exc.ProgrammingError:  # no schema yet
            return 0

    pg, frozen = own_postgres, False
    try:
        uri = pg.new_database()
        records = [r for b in copies(capture, 100, "pg-frozen") for r in b]
        write_log(tmp_path / "logs" / "proxy.jsonl", records)
        calls = {r["litellm_call_id"] for r in records}
        args = [*backfill_args(uri, tmp_path / "logs", tmp_path / "state", 1), "--workers", "1", "--mlflow-timeout", "3"]
        if when == "at_its_start":
            pg.freeze()
            frozen = True
        p = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not frozen:
            deadline = time.monotonic() + 60
            while traces() < 100 and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert p.poll() is None, "the backfill ended before the database froze: " + p.communicate()[1][-2000:]
            pg.freeze()
            frozen = True
        _, err = p.communicate(timeout=40)
        # at its start libpq's connect timeout (PGCONNECT_TIMEOUT, 10 s) and the watch on finding the
        # experiment (10 s at least) run out together: either may say it
        said = ("connection timeout expired", "has not answered") if when == "at_its_start" else ("has not answered",)
        assert p.returncode == 4 and any(s in err for s in said) and "Traceback" not in err, err[-2000:]
        pg.freeze(signal.SIGCONT)
        frozen = False
        backfill(uri, tmp_path / "logs", tmp_path / "state", 1)
        by_call: dict[str, list[dict]] = {}
        for r in records:
            by_call.setdefault(r["litellm_call_id"], []).append(r)
        assert trace_and_span_counts(uri, "fleet") == (len(calls), spans_of(list(by_call.values())))
    finally:
        if frozen:
            pg.freeze(signal.SIGCONT)
        pg.stop()


def test_a_batch_whose_postgresql_stops_answering_while_it_finds_its_experiment_ends_with_exit_4(
    capture: list[dict], tmp_path: Path, own_postgres: Any
) -> None:
    """PostgreSQL frozen (SIGSTOP) as a cron batch reads the experiment on the connection it opened
    (held at that read by a lock, then frozen): finding the experiment was no watched call, and the
    run sat in that read for ever. Now it gives up after ``--mlflow-timeout`` (10 s at least) in one
    line, exit 4."""
    pg = own_postgres
    try:
        uri = pg.new_database()
        write_log(tmp_path / "logs" / "proxy.jsonl", [r for b in copies(capture, 3, "pg-frozen-find") for r in b])
        args = [EXE, "batch", str(tmp_path / "logs"), "--tracking-uri", uri, "--experiment-name", "fleet", "--mlflow-timeout", "3"]
        first = subprocess.run([*args, "--state-dir", str(tmp_path / "s1")], env=_env(), capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr[-2000:]
        code, err = pg.run_frozen_at(uri, "experiments", [*args, "--state-dir", str(tmp_path / "s2")], "the batch", env=_env())
        assert code == 4, err[-2000:]
        assert "has not answered" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    finally:
        pg.stop()


def test_a_workers_account_of_joined_calls_counts_each_call_once() -> None:
    """A worker reports the calls it first wrote, its joined ones apart (counted when first
    written): this process adds them as they are, not taking the joined ones off twice."""
    pipe = Pipeline(RecordingSink(), "1", QuarantineWriter(None), settle_s=1e9)  # type: ignore[arg-type]
    worker = Pipeline(RecordingSink(), "1", QuarantineWriter(None), settle_s=1e9)  # type: ignore[arg-type]
    written = [SimpleNamespace(start_us=1, end_us=2, joined=joined, excess=[]) for joined in (False, False, False, True)]
    worker._account(written, 9)  # type: ignore[arg-type]
    s = worker.summary
    assert (s.calls, s.traces_written, s.calls_joined) == (3, 4, 1)
    pipe._account_emitted(Emitted(s.calls, s.traces_written, s.spans_written, 1, 2, [], s.calls_joined))
    assert (pipe.summary.calls, pipe.summary.traces_written, pipe.summary.calls_joined) == (3, 4, 1)


def test_a_workers_store_opened_while_the_database_restarts_is_waited_for(own_postgres: Any) -> None:
    """Each backfill worker opens its own store after the main process did: a PostgreSQL restarting
    then (or full of clients) stopped the backfill with exit 1, "a bug", where one process waits."""
    import threading

    from ingest.sink import SinkError, StoreSink, Target

    pg = own_postgres
    try:
        uri = pg.new_database()
        StoreSink(Target(uri, "0", None), deadline_s=30).close()
        pg.halt()
        threading.Timer(3.0, pg.resume).start()
        started = time.monotonic()
        sink = StoreSink(Target(uri + "?application_name=worker", "0", None), deadline_s=60)
        assert time.monotonic() - started >= 2.5
        sink.close()
        pg.halt()
        with pytest.raises(SinkError) as refused:
            StoreSink(Target(uri + "?application_name=late", "0", None), deadline_s=1)
        assert refused.value.kind == "unreachable"
        pg.resume()
    finally:
        pg.stop()
