"""A daemon (and a cron run) at its start and its stop, with real processes: a destination that
refuses it for good stops it (exit 4) while one that is down, busy or locked for now is waited
for; SIGTERM ends it within --shutdown-timeout even while MLflow holds a request unanswered."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from ingest.sink import OtlpSink, SinkError, Target
from tests.conftest import all_traces, copies, free_port, hold_sqlite_lock, sqlite_trace_count, write_jsonl
from tests.tailkit import EXE, Daemon, Writer, fresh_calls, wait_for, wait_for_calls
from tests.test_gateway import Gateway
from tests.test_tail import assert_exactly


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def _run(command: str, logs: Path, uri: str, state: Path, *extra: str, timeout: float) -> tuple[int, str, float]:
    """``litellm-ingest <command>``: its exit code, stderr and seconds taken (a daemon gets a metrics port)."""
    args = [EXE, command, str(logs), "--tracking-uri", uri, "--state-dir", str(state), *extra]
    if command == "tail":
        args += ["--metrics-port", str(free_port())]
    started = time.monotonic()
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"`{command}` still running after {timeout:.0f}s: {err[-1500:]}")
    return proc.returncode, err, time.monotonic() - started


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("litellm-ingest: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def password_role(postgres: Any) -> Iterator[str]:
    """A role that logs in with a password on the session's cluster (every other role: trust); its name."""
    hba = postgres.base / "data" / "pg_hba.conf"
    kept = hba.read_text()
    hba.write_text("host all pw_ingest 127.0.0.1/32 scram-sha-256\n" + kept)
    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname="postgres", autocommit=True) as con:
        con.execute("CREATE ROLE pw_ingest LOGIN SUPERUSER PASSWORD 'right'")
        con.execute("SELECT pg_reload_conf()")
    yield "pw_ingest"
    hba.write_text(kept)


@pytest.mark.parametrize("wrong", ["password", "role", "database"])
def test_a_database_that_refuses_the_credentials_or_has_no_such_database_stops_the_daemon_and_the_run_at_once(
    postgres: Any, password_role: str, tmp_path: Path, capture: list[dict], wrong: str
) -> None:
    """A wrong password, role or database name was taken for an outage: the daemon said "MLflow
    unavailable at start … waiting" for ever (/health 503) and a cron run retried it for
    --mlflow-timeout. The server answered, and refused: exit 4 in one line, at once."""
    database = postgres.new_database().rsplit("/", 1)[1]
    uri = {
        "password": f"postgresql://{password_role}:wrong@127.0.0.1:{postgres.port}/{database}",
        "role": f"postgresql://nobody_here@127.0.0.1:{postgres.port}/{database}",
        "database": f"postgresql://postgres@127.0.0.1:{postgres.port}/no_such_database",
    }[wrong]
    logs = tmp_path / "logs"
    write_jsonl(logs / "proxy.jsonl", capture[:5])
    said = {"password": "password authentication failed", "role": 'role "nobody_here" does not exist'}
    said["database"] = 'database "no_such_database" does not exist'
    for command in ("batch", "tail"):
        code, err, took = _run(command, logs, uri, tmp_path / f"state-{command}", "--mlflow-timeout", "60", timeout=25)
        line = _one_error_line(err)
        assert code == 4 and said[wrong] in line and "wrong" not in line, err
        assert "unavailable at start" not in err and took < 20, (took, err)


def test_database_refusals_are_told_from_outages(postgres: Any, password_role: str) -> None:
    """The classification under it, on the driver's real errors: a refusal is never retried, a
    connection refused (a server not up yet) and a server starting up are."""
    from ingest.sink import _transient_db
    from ingest.stores import refused_by_database

    def error(**kw: Any) -> Exception:
        try:
            psycopg.connect(host="127.0.0.1", dbname="postgres", connect_timeout=5, **kw).close()
        except psycopg.OperationalError as e:
            return e
        raise AssertionError(f"connected with {kw}")

    for refusal in (error(port=postgres.port, user=password_role, password="wrong"), error(port=postgres.port, user="nobody_here")):
        assert refused_by_database(refusal) and not _transient_db(refusal), refusal
    starting = psycopg.OperationalError("connection failed: … failed: FATAL:  the database system is starting up")
    for outage in (error(port=free_port(), user="postgres"), starting):
        assert not refused_by_database(outage) and _transient_db(outage), outage


@pytest.mark.parametrize("where", ["sqlite", "server"])
def test_an_experiment_name_mlflow_does_not_take_stops_the_daemon(
    mlflow_server: Any, tmp_path: Path, capture: list[dict], where: str
) -> None:
    """MLflow refuses names over 500 characters: that is the configuration's fault (exit 4), not an
    outage to wait out (the daemon waited for ever on a SQLite store)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if where == "sqlite" else mlflow_server.url
    logs = tmp_path / "logs"
    write_jsonl(logs / "proxy.jsonl", capture[:5])
    code, err, _ = _run("tail", logs, uri, tmp_path / "state", "--experiment-name", "n" * 600, timeout=30)
    assert code == 4 and "exceeds the maximum length of 500" in _one_error_line(err), err
    assert "unavailable at start" not in err, err


@pytest.mark.parametrize("status", [502, 503])
def test_a_daemon_started_while_the_server_answers_5xx_waits_for_it(
    mlflow_server: Any, tmp_path: Path, capture: list[dict], status: int
) -> None:
    """A gateway answering 502/503 (MLflow restarting behind it, its store busy) at start: the
    daemon exited 4 after its 5-second probe; it waits (/health 503), then sends everything."""
    down = {"on": True}
    gateway = Gateway(mlflow_server.url, str(status), lambda method, path: down["on"])
    logdir = tmp_path / "logs"
    logdir.mkdir()
    calls = fresh_calls(capture)[:6]
    Writer(logdir / "proxy.jsonl").write_calls(calls)
    experiment = f"5xx-{uuid.uuid4().hex[:8]}"
    d = Daemon(logdir, gateway.url, experiment, tmp_path / "state").start()
    try:
        wait_for(lambda: "waiting for it" in d.log.read_text(), 20, "the daemon to say it waits for MLflow")
        time.sleep(8)  # past the 5-second probe that used to end in exit 4
        assert d.alive(), d.log.read_text()
        assert requests.get(f"http://127.0.0.1:{d.metrics_port}/health", timeout=5).status_code == 503
        down["on"] = False
        assert_exactly(wait_for_calls(mlflow_server.url, experiment, calls, timeout=60), calls)
        assert d.stop() == 0
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)
        gateway.close()


@pytest.fixture
def locked_store(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A complete SQLite store with the experiment "locked": its URI and file."""
    from ingest.sink import resolve_target

    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    resolve_target(uri, "locked", None)
    yield uri, db


def test_a_sqlite_store_locked_past_the_timeout_is_said_so_and_never_given_migration_advice(
    locked_store: tuple[str, Path], tmp_path: Path, capture: list[dict]
) -> None:
    """Another process holding the store: the run waited 30 s whatever --mlflow-timeout said, then
    exited 4 blaming the schema ("run `mlflow db upgrade`"), later SQLite's own words. Now: retried
    for --mlflow-timeout, then one line saying another process holds it."""
    uri, db = locked_store
    logs = tmp_path / "logs"
    write_jsonl(logs / "proxy.jsonl", capture[:5])
    holder = hold_sqlite_lock(db, 40)
    try:
        code, err, took = _run("batch", logs, uri, tmp_path / "state", "--experiment-name", "locked", "--mlflow-timeout", "4", timeout=30)
    finally:
        holder.kill()
        holder.wait()
    line = _one_error_line(err)
    assert code == 4 and "locked by another process" in line and "upgrade" not in line, err
    assert took < 20, (took, err)


def test_a_lock_taken_while_a_run_writes_ends_it_at_its_timeout_and_the_next_run_writes_the_rest(
    locked_store: tuple[str, Path], tmp_path: Path, capture: list[dict]
) -> None:
    """Another process locks the store after the run wrote some traces. Each try of a write waits 20 s
    for the lock (MLflow's SQLite sessions), and the run looked at its deadline only between tries:
    with --mlflow-timeout 21 it ended 40 s after the lock, saying "database is locked". Now the
    tries share one deadline, and the line names the lock; the next run writes every call once."""
    uri, db = locked_store
    logs = tmp_path / "logs"
    records = [r for copy in copies(capture, 30, "lock") for r in copy]
    write_jsonl(logs / "proxy.jsonl", records)
    args = [EXE, "batch", str(logs), "--tracking-uri", uri, "--state-dir", str(tmp_path / "state"), "--experiment-name", "locked"]
    proc = subprocess.Popen([*args, "--batch-size", "20", "--mlflow-timeout", "21"], env=_env(), stderr=subprocess.PIPE, text=True)
    holder = None
    try:
        wait_for(lambda: sqlite_trace_count(db) > 0 or proc.poll() is not None, 60, "the run's first traces")
        holder = hold_sqlite_lock(db, 120)
        locked_at = time.monotonic()
        assert proc.poll() is None, "the run ended before the lock: give it more calls"
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - locked_at
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        proc.kill()
    line = _one_error_line(err)
    assert proc.returncode == 4 and "locked by another process" in line and "21s" in line, err
    assert took < 21 + 8, (took, err)
    assert subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120).returncode == 0
    got = [t.info.tags["litellm.call_id"] for t in all_traces(uri, "locked", include_spans=False)]
    assert sorted(got) == sorted({r["litellm_call_id"] for r in records})


def _opened(pid: int, path: Path) -> bool:
    """Has process ``pid`` a descriptor open on ``path``?"""
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())
    except OSError:
        return False


@pytest.mark.parametrize("waits_on", ["sqlite-locked", "server-503"])
def test_one_ctrl_c_while_a_run_waits_for_mlflow_before_reading_stops_it_at_once(
    waits_on: str, locked_store: tuple[str, Path], request: pytest.FixtureRequest, tmp_path: Path, capture: list[dict]
) -> None:
    """A run that has read nothing has nothing to finish. A Ctrl-C while it waited for MLflow at its
    start (a store another process holds locked, a server answering 503) was heard only when the wait
    ended, a whole ``--mlflow-timeout`` later, and the run then exited 4 as if MLflow had failed it;
    SQLite waits in its C code, where a second Ctrl-C was merged with the first. Now one stops it at
    once (exit 130), and the next run writes every call once."""
    uri, db = locked_store
    logs = tmp_path / "logs"
    records = [r for copy in copies(capture, 2, "stop-at-start") for r in copy]
    write_jsonl(logs / "proxy.jsonl", records)
    holder = gateway = None
    if waits_on == "sqlite-locked":
        holder = hold_sqlite_lock(db, 120)
        command, waiting = ["batch", "--no-state"], None
    else:
        mlflow_server = request.getfixturevalue("mlflow_server")
        uri, asked = mlflow_server.url, threading.Event()
        down = {"on": True}
        gateway = Gateway(uri, "503", lambda method, path: asked.set() or down["on"])
        uri, command, waiting = gateway.url, ["backfill", "--state-dir", str(tmp_path / "state")], asked
    args = [EXE, *command, str(logs), "--tracking-uri", uri, "--experiment-name", "locked"]
    proc = subprocess.Popen([*args, "--mlflow-timeout", "60"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if waiting is None:
            wait_for(lambda: _opened(proc.pid, db) or proc.poll() is not None, 60, "the run to open the locked store")
        else:
            assert waiting.wait(60), "the run asked the server nothing"
        time.sleep(1.5)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - stopped
    finally:
        proc.kill()
        if holder is not None:
            holder.kill()
            holder.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "interrupted" in _one_error_line(err), err
    assert took < 10, (took, err[-2000:])
    if gateway is not None:
        down["on"] = False
    try:
        again = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=180)
        assert again.returncode == 0, again.stderr[-2000:]
        got = [t.info.tags["litellm.call_id"] for t in all_traces(uri, "locked", include_spans=False)]
        assert sorted(got) == sorted({r["litellm_call_id"] for r in records}), "every call once"
    finally:
        if gateway is not None:
            gateway.close()


def test_a_daemon_started_while_its_sqlite_store_is_locked_waits_and_then_writes_everything(
    locked_store: tuple[str, Path], tmp_path: Path, capture: list[dict]
) -> None:
    """A locked store is busy, not refusing: the daemon exited 4 ("cannot read the SQLite store");
    it waits, and writes every call once the lock is released."""
    uri, db = locked_store
    logdir = tmp_path / "logs"
    logdir.mkdir()
    calls = fresh_calls(capture)[:6]
    Writer(logdir / "proxy.jsonl").write_calls(calls)
    holder = hold_sqlite_lock(db, 12)
    d = Daemon(logdir, uri, "locked", tmp_path / "state").start()
    try:
        wait_for(lambda: "waiting for it" in d.log.read_text(), 30, "the daemon to say it waits for the store")
        assert "locked by another process" in d.log.read_text()
        holder.wait(timeout=30)
        assert_exactly(wait_for_calls(uri, "locked", calls, timeout=60), calls)
        assert d.stop() == 0
    finally:
        holder.kill()
        if d.alive():
            d.stop(signal.SIGKILL)


def test_sigterm_ends_the_daemon_within_the_shutdown_timeout_while_mlflow_does_not_answer(
    mlflow_server: Any, tmp_path: Path, capture: list[dict]
) -> None:
    """Each request waited out its 120 s timeout, twice, after SIGTERM (exit ~4 minutes later; systemd's
    TimeoutStopSec=30 SIGKILLs it first). Now the request is abandoned at --shutdown-timeout after
    the signal, exit 0, and what it carried waits in the state: the next start writes every call once."""
    stalling = {"on": False}  # POST /v1/traces taken and never answered: MLflow behind a balancer that lost it
    gateway = Gateway(mlflow_server.url, "stall", lambda method, path: stalling["on"] and method == "POST" and path == "/v1/traces")
    logdir = tmp_path / "logs"
    logdir.mkdir()
    calls = fresh_calls(capture, copies=2)[:12]
    writer = Writer(logdir / "proxy.jsonl")
    experiment = f"stall-{uuid.uuid4().hex[:8]}"
    d = Daemon(logdir, gateway.url, experiment, tmp_path / "state", "--shutdown-timeout", "3").start()
    again = Daemon(logdir, mlflow_server.url, experiment, tmp_path / "state")
    try:
        writer.write_calls(calls[:6])
        wait_for_calls(mlflow_server.url, experiment, calls[:6], timeout=30)
        stalling["on"] = True
        writer.write_calls(calls[6:])
        assert gateway.stalled.wait(30), d.log.read_text()
        time.sleep(1)
        started = time.monotonic()
        assert d.stop(timeout=20) == 0
        assert time.monotonic() - started < 3 + 3, "out within --shutdown-timeout (and the time to save and exit)"
        assert "saved for the next start" in d.log.read_text(), d.log.read_text()
        again.start()
        assert_exactly(wait_for_calls(mlflow_server.url, experiment, calls, timeout=60), calls)
        assert again.stop() == 0
    finally:
        for daemon in (d, again):
            if daemon.alive():
                daemon.stop(signal.SIGKILL)
        gateway.close()


def test_a_daemon_stopped_before_mlflow_first_answered_says_so_not_that_it_waited(tmp_path: Path) -> None:
    """SIGTERM while the first request to MLflow is still unanswered (not yet an outage): out within
    --shutdown-timeout, exit 0, and the log says it stopped before MLflow answered, not that it was
    waiting for an MLflow it never found down."""
    gateway = Gateway("http://127.0.0.1:9", "stall", lambda method, path: True)
    (tmp_path / "logs").mkdir()
    d = Daemon(tmp_path / "logs", gateway.url, "never", tmp_path / "state", "--mlflow-timeout", "60", "--shutdown-timeout", "3")
    try:
        d.start(ready=False)
        assert gateway.stalled.wait(60), d.log.read_text()
        started = time.monotonic()
        assert d.stop(timeout=20) == 0
        assert time.monotonic() - started < 3 + 3, "out within --shutdown-timeout (and the time to exit)"
        said = d.log.read_text()
        assert "stopped before MLflow answered" in said and "waiting for MLflow" not in said, said
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)
        gateway.close()


@pytest.mark.parametrize("request_kind", ["OTLP POST", "DeleteTraces"])
def test_no_request_outlives_the_shutdown_deadline_a_delete_neither(request_kind: str) -> None:
    """A server that takes connections and never answers (a stalled ``mlflow server``): once the
    deadline passes, a request under way is abandoned as "stopped". The delete before a call is
    rewritten went through MLflow's own REST client and waited out its timeouts and retries."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    sink = OtlpSink(Target(uri, "1", "x"), deadline_s=60.0)
    sink.give_up_at(time.monotonic() + 1.0)
    raised: list[BaseException] = []

    def send() -> None:
        try:
            if request_kind == "DeleteTraces":
                sink.delete(["tr-0123456789abcdef0123456789abcdef"])
            else:
                sink.http.request("POST", "/v1/traces", data=b"")
        except BaseException as e:
            raised.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(5.0)
    listener.close()
    assert not sender.is_alive(), "still waiting for MLflow 4 s past the deadline"
    assert isinstance(raised[0], SinkError) and raised[0].kind == "stopped", raised


def test_sighup_stops_the_daemon_as_sigterm_does_and_a_restart_reads_nothing_twice(tmp_path: Path, capture: list[dict]) -> None:
    """The terminal of a daemon run in the foreground closed (an ssh session ended), or ``kill -HUP``:
    it died at once (exit 129), unflushed and unsaved."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    calls = fresh_calls(capture)[:6]
    Writer(logdir / "proxy.jsonl").write_calls(calls)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    daemons = [Daemon(logdir, uri, "hup", tmp_path / "state").start()]
    try:
        assert_exactly(wait_for_calls(uri, "hup", calls), calls)
        assert daemons[0].stop(signal.SIGHUP) == 0
        daemons.append(again := Daemon(logdir, uri, "hup", tmp_path / "state").start())
        wait_for(lambda: _metric_says(again, "litellm_ingest_mlflow_up 1"), 30, "the restarted daemon")
        time.sleep(1.0)
        assert _metric_says(again, "litellm_ingest_records_read_total 0"), "the restart read a line again"
        assert again.stop(signal.SIGHUP) == 0
    finally:
        for d in daemons:
            if d.alive():
                d.stop(signal.SIGKILL)


def _metric_says(d: Daemon, line: str) -> bool:
    try:
        return line in d.metrics()
    except requests.RequestException:
        return False
