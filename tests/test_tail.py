"""The tail daemon: real files, a real writer thread, real daemon processes, a real mlflow server."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.conftest import (
    all_traces,
    fill,
    forget_stores,
    free_port,
    hold_sqlite_lock,
    spans_ingested,
    sqlite_trace_count,
    start_mlflow_server,
    write_jsonl,
)
from tests.pgkit import PgCluster
from tests.tailkit import (
    Daemon,
    Opens,
    Writer,
    assert_sent_once,
    call_ids_in,
    fresh_calls,
    metric,
    rotate,
    spans_of,
    wait_for,
    wait_for_calls,
)


def assert_exactly(traces: list, calls: list[list[dict]]) -> None:
    got = sorted(t.info.tags["litellm.call_id"] for t in traces)
    assert got == sorted(c[0]["litellm_call_id"] for c in calls), "every call once, none extra"
    assert sum(len(t.data.spans) for t in traces) == spans_of(calls)


@pytest.fixture
def setup(mlflow_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    logdir = tmp_path / "logs"
    logdir.mkdir()
    experiment = f"tail-{uuid.uuid4().hex[:8]}"
    daemons: list[Daemon] = []

    def daemon(*extra: str) -> Daemon:
        d = Daemon(logdir, mlflow_server.url, experiment, tmp_path / "state", *extra)
        daemons.append(d)
        return d

    yield logdir, experiment, daemon
    for d in daemons:
        if d.alive():
            d.stop(signal.SIGKILL)


ROTATIONS = [
    ("rename_create", "numbered", "kept"),
    ("copytruncate", "timestamped", "kept"),
    ("rename_create", "timestamped", "gzipped"),
    ("copytruncate", "numbered", "gzipped"),
    ("rename_create", "numbered", "deleted"),
    ("copytruncate", "timestamped", "deleted"),
]
"""Every pair of a move, a naming and what becomes of the rotated file, in 6 real daemons rather than
all 12 triples: the logic under them is the in-process model's (``tests/test_follow.py``)."""


@pytest.mark.parametrize(("how", "naming", "keep"), ROTATIONS, ids=["-".join(r) for r in ROTATIONS])
def test_rotation_matrix_with_a_writer_appending(setup, mlflow_server, capture, how: str, naming: str, keep: str) -> None:
    logdir, experiment, daemon = setup
    log = logdir / "proxy.jsonl"
    calls = fresh_calls(capture)
    writer = Writer(log)
    writer.write_calls(calls[:5])
    before = spans_ingested(mlflow_server)
    d = daemon().start()
    thread = writer.in_thread(calls[5:], pause_s=0.05)
    time.sleep(0.3)
    with writer.lock:
        previous = rotate(log, how, naming, keep)
    time.sleep(3.0)
    with writer.lock:
        if previous is not None:
            previous.unlink()
        rotate(log, how, naming, keep, n=2)
    thread.join()
    traces = wait_for_calls(mlflow_server.url, experiment, calls)
    assert_sent_once(d, lambda: spans_ingested(mlflow_server) - before, calls)
    assert_exactly(traces, calls)


def test_copytruncate_under_a_writer_without_append_mode_loses_no_call_to_the_hole(setup, mlflow_server, capture) -> None:
    """A writer that keeps its file open without ``O_APPEND`` (a shell's ``>``, many loggers) writes
    on at its old offset after a copytruncate: the file starts with a hole, read as NUL bytes before
    the next record. That record was quarantined as malformed JSON; now every call lands once."""
    logdir, experiment, daemon = setup
    log = logdir / "proxy.jsonl"
    calls = fresh_calls(capture)
    before = spans_ingested(mlflow_server)
    d = daemon().start()
    with log.open("wb") as f:  # O_WRONLY | O_TRUNC, no O_APPEND
        for i, call in enumerate(calls):
            f.write("".join(json.dumps(r) + "\n" for r in call).encode())
            f.flush()
            if i in (10, 30):
                time.sleep(1.0)
                rotate(log, "copytruncate", "numbered", "kept", n=i)
            time.sleep(0.02)
    assert log.read_bytes().startswith(b"\0"), "the writer left a hole"
    traces = wait_for_calls(mlflow_server.url, experiment, calls)
    assert_sent_once(d, lambda: spans_ingested(mlflow_server) - before, calls)
    assert_exactly(traces, calls)
    quarantine = d.state_dir / "quarantine.jsonl"
    assert not quarantine.exists() or not quarantine.read_text().strip(), quarantine.read_text()[:500]


def test_restarts_deliver_everything_once(setup, mlflow_server, capture) -> None:
    logdir, experiment, daemon = setup
    log = logdir / "proxy.jsonl"
    calls = fresh_calls(capture, copies=2)
    parts = [calls[:15], calls[15:35], calls[35:55], calls[55:]]
    writer = Writer(log)
    writer.write_calls(parts[0])  # before the first start
    d = daemon().start()
    writer.write_calls(parts[1], pause_s=0.01)  # during the run
    wait_for_calls(mlflow_server.url, experiment, parts[0] + parts[1])
    assert d.stop(signal.SIGTERM) == 0
    writer.write_calls(parts[2])  # while the daemon is down
    before = spans_ingested(mlflow_server)
    d = daemon().start()
    writer.write_calls(parts[3], pause_s=0.01)  # after the restart
    traces = wait_for_calls(mlflow_server.url, experiment, calls)
    assert_sent_once(d, lambda: spans_ingested(mlflow_server) - before, parts[2] + parts[3])
    assert_exactly(traces, calls)


def test_sigkill_mid_stream_then_restart_loses_and_doubles_nothing(setup, mlflow_server, capture) -> None:
    logdir, experiment, daemon = setup
    log = logdir / "proxy.jsonl"
    calls = fresh_calls(capture, copies=3)
    writer = Writer(log)
    d = daemon().start()
    thread = writer.in_thread(calls, pause_s=0.01)
    time.sleep(0.8)
    d.stop(signal.SIGKILL)
    thread.join()
    d = daemon().start()
    traces = wait_for_calls(mlflow_server.url, experiment, calls)
    assert d.stop() == 0
    assert_exactly(traces, calls)


def test_partial_line_is_held_then_completed(setup, mlflow_server, capture) -> None:
    logdir, experiment, daemon = setup
    log = logdir / "proxy.jsonl"
    calls = fresh_calls(capture)[:6]
    Writer(log).write_calls(calls[:5])
    last = json.dumps(calls[5][0])
    with log.open("a") as f:
        f.write(last[:200])
    d = daemon("--partial-timeout", "30").start()
    wait_for_calls(mlflow_server.url, experiment, calls[:5])
    time.sleep(1.0)
    with log.open("a") as f:
        f.write(last[200:] + "\n")
    traces = wait_for_calls(mlflow_server.url, experiment, calls)
    assert d.stop() == 0
    assert_exactly(traces, calls)


def test_a_file_server_clock_behind_ours_does_not_cut_a_partial_line_in_two(setup, mlflow_server, capture, tmp_path: Path) -> None:
    """An NFS server whose clock runs two minutes behind stamps every write two minutes old: by its
    mtime alone the file had been quiet past --partial-timeout at once, so a line caught half
    written was quarantined as truncated and its other half as malformed JSON (a call lost).
    The daemon now also waits that long by its own clock."""
    logdir, experiment, daemon = setup
    log = logdir / "proxy.jsonl"
    calls = fresh_calls(capture)[:6]
    behind = lambda: os.utime(log, (time.time() - 120, time.time() - 120))  # noqa: E731
    Writer(log).write_calls(calls[:5])
    last = json.dumps(calls[5][0])
    with log.open("a") as f:
        f.write(last[:200])
    behind()
    d = daemon("--partial-timeout", "30").start()
    wait_for_calls(mlflow_server.url, experiment, calls[:5])
    time.sleep(2.0)
    with log.open("a") as f:
        f.write(last[200:] + "\n")
    behind()
    traces = wait_for_calls(mlflow_server.url, experiment, calls)
    assert d.stop() == 0
    assert_exactly(traces, calls)
    assert not (tmp_path / "state" / "quarantine.jsonl").exists()


def test_never_completed_line_and_overlong_line_go_to_quarantine(setup, mlflow_server, capture, tmp_path: Path) -> None:
    logdir, experiment, daemon = setup
    log = logdir / "proxy.jsonl"
    calls = fresh_calls(capture)[:4]
    writer = Writer(log)
    writer.write_calls(calls[:2])
    with log.open("a") as f:
        f.write('{"litellm_call_id": "x", "padding": "' + "y" * 300_000 + '"}\n')
    writer.write_calls(calls[2:])
    with log.open("a") as f:
        f.write('{"litellm_call_id": "never-finished", ')
    d = daemon("--max-line-bytes", "100000", "--partial-timeout", "2").start()
    wait_for_calls(mlflow_server.url, experiment, calls)
    q = tmp_path / "state" / "quarantine.jsonl"
    wait_for(lambda: q.exists() and len(q.read_text().splitlines()) == 2, 20, "two quarantine records")
    assert d.stop() == 0
    reasons = sorted(json.loads(line)["reason"] for line in q.read_text().splitlines())
    assert reasons == ["line_too_long", "truncated_line"]


def test_the_quarantine_file_rotated_under_a_running_daemon_loses_and_doubles_no_record(
    setup, mlflow_server, capture, tmp_path: Path
) -> None:
    """The quarantine file is opened for each write (``O_APPEND``): logrotate's rename (with or
    without ``create``) rotates it under a running daemon, as the README says, and a record goes to
    one file or the other, once."""
    logdir, experiment, daemon = setup
    log, q = logdir / "proxy.jsonl", tmp_path / "state" / "quarantine.jsonl"
    calls = fresh_calls(capture)[:2]
    writer = Writer(log)
    d = daemon().start()
    with log.open("a") as f:
        f.write("not json, first\n")
    wait_for(lambda: q.exists() and len(q.read_text().splitlines()) == 1, 20, "the first quarantine record")
    q.rename(q.with_name("quarantine.jsonl.1"))
    with log.open("a") as f:
        f.write("not json, second\n")
    writer.write_calls(calls)
    wait_for_calls(mlflow_server.url, experiment, calls)
    wait_for(lambda: q.exists() and len(q.read_text().splitlines()) == 1, 20, "the second record in a new file")
    assert d.stop() == 0
    rotated = [json.loads(line)["line"] for line in q.with_name("quarantine.jsonl.1").read_text().splitlines()]
    current = [json.loads(line)["line"] for line in q.read_text().splitlines()]
    assert (rotated, current) == ([1], [2])


def test_mlflow_outage_loses_nothing(tmp_path: Path, capture) -> None:
    server = start_mlflow_server(tmp_path / "outage-server")
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    experiment = "outage"
    calls = fresh_calls(capture, copies=2)
    d = Daemon(logdir, server.url, experiment, tmp_path / "state", "--mlflow-timeout", "120").start()
    try:
        writer = Writer(log)
        writer.write_calls(calls[:20], pause_s=0.01)
        wait_for_calls(server.url, experiment, calls[:20])
        server.stop()
        writer.write_calls(calls[20:40], pause_s=0.01)
        # Reported at the first failed write, long before the 120 s of retries run out.
        wait_for(lambda: "litellm_ingest_mlflow_up 0" in d.metrics(), 15, "the daemon to notice the outage")
        assert "MLflow unavailable" in d.log.read_text()
        assert requests.get(f"http://127.0.0.1:{d.metrics_port}/health", timeout=5).status_code == 503
        # Rotations that delete the rotated file while MLflow is down: the files made meanwhile are
        # held open (not read) by the daemon, or their lines would be gone when it comes back.
        for part in (calls[40:50], calls[50:60]):
            with writer.lock:
                rotate(log, "rename_create", "numbered", "deleted")
            writer.write_calls(part, pause_s=0.01)
            time.sleep(2.5)
        with writer.lock:
            rotate(log, "rename_create", "numbered", "deleted")
        server = start_mlflow_server(tmp_path / "outage-server", port=server.port, backend_uri=server.backend_uri)
        writer.write_calls(calls[60:], pause_s=0.01)
        traces = wait_for_calls(server.url, experiment, calls, timeout=120)
        assert_exactly(traces, calls)
        assert "litellm_ingest_mlflow_up 1" in d.metrics()
        assert d.stop() == 0
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)
        server.stop()


def test_a_full_disk_under_the_state_does_not_stop_the_daemon_and_loses_and_doubles_nothing(
    tmp_path: Path, capture, small_disk: Path
) -> None:
    """The state dir fills up: the daemon goes on sending (what it sent is sent again after a
    restart, changing nothing), says so once, /health 503 "state_unsaved"; once there is room the
    state is saved again and a restart reads nothing twice. It was a traceback and an exit."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    calls = fresh_calls(capture, copies=2)
    writer = Writer(logdir / "proxy.jsonl")
    d = Daemon(logdir, uri, "full", small_disk / "state").start()
    try:
        writer.write_calls(calls[:10])
        wait_for_calls(uri, "full", calls[:10])
        filler = fill(small_disk)
        writer.write_calls(calls[10:30])
        wait_for_calls(uri, "full", calls[:30])
        wait_for(lambda: "litellm_ingest_state_saved 0" in d.metrics(), 15, "the daemon to say the state is not saved")
        health = requests.get(f"http://127.0.0.1:{d.metrics_port}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "state_unsaved"
        assert d.log.read_text().count("No space left on device; ingesting on") == 1, d.log.read_text()
        filler.unlink()
        writer.write_calls(calls[30:])
        assert_exactly(wait_for_calls(uri, "full", calls), calls)
        wait_for(lambda: "the state is saved again" in d.log.read_text(), 15, "the state to be saved again")
        assert requests.get(f"http://127.0.0.1:{d.metrics_port}/health", timeout=5).json()["status"] == "ok"
        assert d.stop() == 0
        d = Daemon(logdir, uri, "full", small_disk / "state").start()
        time.sleep(2)
        assert "litellm_ingest_records_read_total 0" in d.metrics(), "a restart reads nothing twice"
        assert d.stop() == 0
        assert_exactly(wait_for_calls(uri, "full", calls), calls)
        assert "Traceback" not in d.log.read_text()
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)


def test_a_daemon_told_to_stop_while_it_waits_for_mlflow_stops_at_once(tmp_path: Path) -> None:
    import threading

    from ingest.metrics import Metrics
    from ingest.tail import TailOptions, wait_for_mlflow

    opts = TailOptions(paths=[str(tmp_path)], tracking_uri=f"http://127.0.0.1:{free_port()}", state_dir=tmp_path, mlflow_timeout_s=1)
    stopping, metrics = threading.Event(), Metrics(ready=False)
    threading.Timer(3, stopping.set).start()
    started = time.monotonic()
    assert wait_for_mlflow(opts, metrics, stopping) is None
    assert 3 <= time.monotonic() - started < 10 and metrics.mlflow_up is False and metrics.down_since is not None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_daemon_stopped_while_it_waits_for_mlflow_keeps_a_copy_of_a_deleted_log(tmp_path: Path, capture, sig: int) -> None:
    """Stopped while it waits for MLflow, a daemon lets go of the files it held: one a rotation
    deleted meanwhile (keeping no copy) was gone with its lines, in silence (exit 0, "stopped
    while waiting"). It is copied into the state dir as soon as it is seen deleted (a SIGKILL
    after that takes nothing) and at the stop, which says so; the next start (MLflow up) writes
    every call once and deletes the copy. A file still there is not copied."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    calls = fresh_calls(capture)
    Writer(log).write_calls(calls[:3])
    Writer(logdir / "other.jsonl").write_calls(calls[3:5])
    d = Daemon(logdir, url, "late", tmp_path / "state").start()
    server = None
    try:
        wait_for(lambda: "litellm_ingest_files_open 2\n" in d.metrics(), 30, "the daemon to hold both files")
        rotate(log, "rename_create", "numbered", "deleted")
        kept = tmp_path / "state" / "kept-logs"
        if sig == signal.SIGKILL:
            wait_for(lambda: [p.name for p in kept.rglob("*.jsonl")] == ["proxy.jsonl"], 30, "the copy of the deleted file")
            d.stop(signal.SIGKILL)
        else:
            assert d.stop() == 0
            said = [line for line in d.log.read_text().splitlines() if "deleted by a rotation that kept no copy" in line]
            assert len(said) == 1 and "kept a copy" in said[0] and str(log) in said[0] and "other.jsonl" not in said[0], d.log.read_text()
            assert "stopped while waiting for MLflow" in d.log.read_text()
        assert [p.name for p in kept.rglob("*.jsonl")] == ["proxy.jsonl"]
        server = start_mlflow_server(tmp_path / "late-server", port=port)
        d = Daemon(logdir, url, "late", tmp_path / "state").start()
        assert_exactly(wait_for_calls(url, "late", calls[:5], timeout=120), calls[:5])
        wait_for(lambda: not list(kept.rglob("*.jsonl")), 30, "the copy to be deleted once read")
        assert d.stop() == 0
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)
        if server is not None:
            server.stop()


@pytest.mark.parametrize("how", ["rename_create", "copytruncate"])
def test_a_daemon_killed_during_an_outage_loses_nothing_of_a_log_deleted_meanwhile(tmp_path: Path, capture, how: str) -> None:
    """MLflow goes down under a running daemon, calls are logged, and a rotation deletes the log
    keeping no copy: the daemon holds it open, unread. SIGKILLed then, it took those lines with it.
    It now copies such a file into the state dir while the outage lasts, and the next start writes
    every call once and deletes the copy. A copytruncate whose copy is deleted at once (``rotate
    0``) lost them even without the kill: the daemon passed over a copy of the file it held."""
    server = start_mlflow_server(tmp_path / "srv")
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    calls = fresh_calls(capture)
    writer = Writer(log)
    writer.write_calls(calls[:3])
    d = Daemon(logdir, server.url, "kill", tmp_path / "state").start()
    try:
        wait_for_calls(server.url, "kill", calls[:3])
        server.stop()
        writer.write_calls(calls[3:8])
        wait_for(lambda: "litellm_ingest_mlflow_up 0" in d.metrics(), 30, "the daemon to notice the outage")
        with writer.lock:
            copy = rotate(log, how, "numbered", "deleted")
        if copy is not None:
            wait_for(lambda: f"holding {copy}" in d.log.read_text(), 30, "the daemon to hold the copy")
            copy.unlink()
            writer.write_calls(calls[8:10])
        kept = tmp_path / "state" / "kept-logs"
        name = "proxy.jsonl" if copy is None else copy.name
        wait_for(lambda: [p.name for p in kept.rglob("*.jsonl*")] == [name], 30, "the copy of the deleted file")
        d.stop(signal.SIGKILL)
        server = start_mlflow_server(tmp_path / "srv", port=server.port, backend_uri=server.backend_uri)
        d = Daemon(logdir, server.url, "kill", tmp_path / "state").start()
        written = calls[:8] if copy is None else calls[:10]
        assert_exactly(wait_for_calls(server.url, "kill", written, timeout=120), written)
        wait_for(lambda: not list(kept.rglob("*.jsonl*")), 30, "the copy to be deleted once read")
        assert d.stop() == 0
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)
        server.stop()


def rotated_while_a_call_hangs(
    d: Daemon, writer: Writer, calls: list[list[dict]], hang: Callable[[], object], hung: Callable[[], bool]
) -> None:
    """Calls 3-5 logged as one call to MLflow starts to hang (``hang``; ``hung`` once the daemon says
    so), 6-8 logged and not read, a copytruncate whose copy the daemon must hold while the call
    hangs, the copy deleted (``rotate 0``), the rest logged: what ends the hang is the caller's."""
    hang()
    writer.write_calls(calls[3:6])
    wait_for(hung, 20, "the daemon to say a call to MLflow hangs")
    writer.write_calls(calls[6:9])
    with writer.lock:
        copy = rotate(writer.log, "copytruncate", "numbered", "deleted")
    assert copy is not None
    wait_for(lambda: f"holding {copy}" in d.log.read_text(), 10, "the daemon to hold the copy while the call hangs")
    copy.unlink()
    writer.write_calls(calls[9:])


def test_a_copytruncate_copy_deleted_while_a_write_waits_on_a_sqlite_lock_takes_nothing(tmp_path: Path, capture) -> None:
    """Another process holds the SQLite store's write lock (a backup, an app tracing into the same
    file): the daemon's write waits up to 20 s for it, in one call. The daemon held its files only
    between a write's tries, so a copytruncate whose copy was deleted within that wait (``rotate 0``)
    took the lines written after the last read. Now a call waited for longer than a rescan holds the
    files as the pauses do: the copy is opened unread, and read once the lock is released."""
    db = tmp_path / "m.db"
    uri = f"sqlite:///{db}"
    logdir = tmp_path / "logs"
    logdir.mkdir()
    calls = fresh_calls(capture)[:11]
    writer = Writer(logdir / "proxy.jsonl")
    writer.write_calls(calls[:3])
    d = Daemon(logdir, uri, "locked", tmp_path / "state", "--mlflow-timeout", "2").start()
    holders: list[subprocess.Popen] = []
    try:
        wait_for_calls(uri, "locked", calls[:3])
        rotated_while_a_call_hangs(
            d, writer, calls, lambda: holders.append(hold_sqlite_lock(db, 60)), lambda: "MLflow unavailable" in d.log.read_text()
        )
        assert "database is locked" not in d.log.read_text(), "still in the first try: its pauses held nothing yet"
        holders[0].terminate()
        holders[0].wait(timeout=10)
        assert_exactly(wait_for_calls(uri, "locked", calls, timeout=90), calls)
        assert d.stop() == 0
    finally:
        for holder in holders:
            holder.kill()
        if d.alive():
            d.stop(signal.SIGKILL)


def test_a_server_that_takes_a_write_and_goes_silent_is_an_outage_and_its_files_are_held(tmp_path: Path, capture) -> None:
    """The MLflow server is frozen (SIGSTOP: the connection is taken, no answer comes) under a daemon
    sending traces: the send waited out the request's 120 s with ``/health`` "ok", and held no file
    meanwhile, so a copytruncate's copy deleted then took the lines written after the last read. Now
    the silence is an outage past ``--mlflow-timeout``, the files are held while the request hangs,
    and once the server answers every call is written once."""
    server = start_mlflow_server(tmp_path / "srv")
    logdir = tmp_path / "logs"
    logdir.mkdir()
    calls = fresh_calls(capture)[:11]
    writer = Writer(logdir / "proxy.jsonl")
    writer.write_calls(calls[:3])
    d = Daemon(logdir, server.url, "silent", tmp_path / "state", "--mlflow-timeout", "2").start()
    health = lambda: requests.get(f"http://127.0.0.1:{d.metrics_port}/health", timeout=5).json()["status"]  # noqa: E731
    try:
        wait_for_calls(server.url, "silent", calls[:3])
        rotated_while_a_call_hangs(
            d, writer, calls, lambda: os.killpg(server.proc.pid, signal.SIGSTOP), lambda: health() == "mlflow_unavailable"
        )
        os.killpg(server.proc.pid, signal.SIGCONT)
        assert_exactly(wait_for_calls(server.url, "silent", calls, timeout=90), calls)
        assert d.stop() == 0
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
        if d.alive():
            d.stop(signal.SIGKILL)
        server.stop()


def test_a_daemon_started_while_mlflow_is_down_waits_for_it(tmp_path: Path, capture) -> None:
    """A reboot that brings the proxy and its daemon up before MLflow: the daemon serves /health
    (503), says once that it waits, and sends everything once MLflow answers (stopped while it
    waits: ``test_a_daemon_told_to_stop_while_it_waits_for_mlflow_stops_at_once``). Rotations that
    delete the rotated file meanwhile take nothing: the daemon holds the files open while it waits."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    calls = fresh_calls(capture, copies=2)
    writer = Writer(log)
    writer.write_calls(calls[:10])
    d = Daemon(logdir, url, "late", tmp_path / "state").start()
    server = None
    try:
        wait_for(lambda: "waiting for it" in d.log.read_text(), 30, "the daemon to say it waits for MLflow")
        assert requests.get(f"http://127.0.0.1:{d.metrics_port}/health", timeout=5).status_code == 503
        wait_for(lambda: "litellm_ingest_files_open 1\n" in d.metrics(), 15, "the file it holds to be counted open")
        for part in (calls[10:20], calls[20:30]):
            time.sleep(2.5)
            rotate(log, "rename_create", "numbered", "deleted")
            writer.write_calls(part)
        time.sleep(2.5)
        assert "litellm_ingest_files_open 3\n" in d.metrics(), "the two deleted files are held open too"
        assert d.alive(), d.log.read_text()
        server = start_mlflow_server(tmp_path / "late-server", port=port)
        writer.write_calls(calls[30:])
        assert_exactly(wait_for_calls(url, "late", calls, timeout=120), calls)
        wait_for(lambda: "litellm_ingest_mlflow_up 1" in d.metrics(), 15, "the daemon to report MLflow up")
        assert d.stop() == 0
        log = d.log.read_text()
        assert log.count("waiting for it") == 1 and "MLflow is back" in log and "Traceback" not in log, log
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)
        if server is not None:
            server.stop()


@pytest.mark.parametrize("sql_writer", ["bulk", "mlflow"])
def test_an_experiment_purged_under_the_daemon_stops_it_and_its_calls_wait_for_the_next_start(
    tmp_path: Path, capture, sql_writer: str
) -> None:
    """The experiment deleted and purged (``mlflow gc``) while the daemon writes: each call arriving
    alone was quarantined as unwritable (no log line, /health ok) and lost; several at once were an
    outage held for ever. Now it stops, exit 4, as at start, and the next start (the experiment
    made anew under its name) writes them. Through ``log_spans`` too (MLflow's "no experiment" was
    taken for an outage there)."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    logdir, state = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    calls = fresh_calls(capture)[:4]
    writer = Writer(logdir / "proxy.jsonl")
    writer.write_calls(calls[:2])
    d = Daemon(logdir, uri, "purged", state, "--sql-writer", sql_writer).start()
    try:
        wait_for_calls(uri, "purged", calls[:2])
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("purged")
        assert exp is not None
        client.delete_experiment(exp.experiment_id)
        mlflow_cli = str(Path(sys.executable).parent / "mlflow")
        gc = [mlflow_cli, "gc", "--backend-store-uri", uri, "--tracking-uri", uri, "--experiment-ids", exp.experiment_id]
        subprocess.run(gc, check=True, capture_output=True)
        writer.write_calls(calls[2:3])
        assert d.proc is not None
        assert d.proc.wait(timeout=90) == 4, d.log.read_text()[-3000:]
        assert f"experiment id {exp.experiment_id} no longer exists" in d.log.read_text()
        assert not (state / "quarantine.jsonl").exists() or not (state / "quarantine.jsonl").read_text().strip()
        writer.write_calls(calls[3:])
        d = Daemon(logdir, uri, "purged", state, "--sql-writer", sql_writer).start()
        assert_exactly(wait_for_calls(uri, "purged", calls), calls)
        assert d.stop() == 0
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)


def test_a_sqlite_store_deleted_under_the_daemon_stops_it_and_the_next_start_writes_every_call_into_the_new_one(
    tmp_path: Path, capture
) -> None:
    """``rm mlflow.db`` (or a backup moved into its place) while the daemon runs: SQLite refuses
    every write to the file the daemon still has open (``attempt to write a readonly database``),
    and the daemon held that outage for ever, saying MLflow was unavailable. Now it stops, exit 4,
    naming the store; the next start makes the store anew and writes every call into it."""
    db = tmp_path / "m.db"
    uri = f"sqlite:///{db}"
    logdir, state = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    calls = fresh_calls(capture)[:4]
    writer = Writer(logdir / "proxy.jsonl")
    writer.write_calls(calls[:2])
    d = Daemon(logdir, uri, "gone", state).start()
    try:
        wait_for_calls(uri, "gone", calls[:2])
        db.unlink()
        writer.write_calls(calls[2:3])
        assert d.proc is not None
        assert d.proc.wait(timeout=90) == 4, d.log.read_text()[-3000:]
        assert f"the store {db} was deleted or replaced while this process had it open" in d.log.read_text()
        assert "MLflow unavailable" not in d.log.read_text()
        writer.write_calls(calls[3:])
        d = Daemon(logdir, uri, "gone", state).start()
        forget_stores()  # this process's MLflow client still reads the deleted file
        assert_exactly(wait_for_calls(uri, "gone", calls), calls)
        assert d.stop() == 0
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)


OwnPg = tuple[PgCluster, str, Path]


@pytest.fixture
def own_pg(tmp_path: Path, own_postgres: PgCluster) -> OwnPg:
    """A PostgreSQL cluster of the test's own (``own_postgres``), a database in it and an empty log folder."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    return own_postgres, own_postgres.new_database(), logdir


def test_a_postgresql_outage_under_the_bulk_writer_loses_nothing(tmp_path: Path, capture, own_pg: OwnPg) -> None:
    """MLflow on PostgreSQL written directly: the database crashes (``pg_ctl -m immediate``) and comes
    back on the same port while the proxy keeps logging; the daemon waits, then writes every call once."""
    pg, uri, logdir = own_pg
    experiment = "pg-outage"
    calls = fresh_calls(capture, copies=2)
    d = Daemon(logdir, uri, experiment, tmp_path / "state", "--mlflow-timeout", "120").start()
    try:
        writer = Writer(logdir / "proxy.jsonl")
        writer.write_calls(calls[:20], pause_s=0.01)
        wait_for_calls(uri, experiment, calls[:20])
        pg.halt()
        writer.write_calls(calls[20:60], pause_s=0.01)
        wait_for(lambda: "litellm_ingest_mlflow_up 0" in d.metrics(), 30, "the daemon to notice the outage")
        time.sleep(2)
        pg.resume()
        writer.write_calls(calls[60:], pause_s=0.01)
        assert_exactly(wait_for_calls(uri, experiment, calls, timeout=120), calls)
        assert "litellm_ingest_mlflow_up 1" in d.metrics()
        assert d.stop() == 0
        log = d.log.read_text()
        assert "MLflow unavailable" in log and "MLflow is back" in log
        assert "Traceback" not in log, "the outage is one line, not a traceback per retry"
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)


def test_a_postgresql_that_stops_answering_is_an_outage_and_does_not_hold_a_stop(tmp_path: Path, capture, own_pg: OwnPg) -> None:
    """PostgreSQL frozen (SIGSTOP: no error, the socket just stays silent) under the bulk writer: the
    daemon sat in a read for as long as it lasted, ``/health`` "ok" and nothing said, and SIGTERM was
    unheeded until the database answered again. Now the silence is an outage past
    ``--mlflow-timeout``, a stop ends within ``--shutdown-timeout``, and the next start writes every
    call once. The files are held while that one call hangs: a copytruncate's copy deleted meanwhile
    is opened unread, and copied into the state dir once deleted."""
    pg, uri, logdir = own_pg
    experiment = "pg-frozen"
    calls = fresh_calls(capture)
    daemon = lambda: Daemon(logdir, uri, experiment, tmp_path / "state", "--mlflow-timeout", "2", "--shutdown-timeout", "3")  # noqa: E731
    d, frozen = daemon().start(), False
    try:
        log = logdir / "proxy.jsonl"
        writer = Writer(log)
        writer.write_calls(calls[:10])
        wait_for_calls(uri, experiment, calls[:10])
        pg.freeze()
        frozen = True
        writer.write_calls(calls[10:30])
        health = lambda: requests.get(f"http://127.0.0.1:{d.metrics_port}/health", timeout=5).json()["status"]  # noqa: E731
        wait_for(lambda: health() == "mlflow_unavailable", 20, "the daemon to say the database does not answer")
        assert "MLflow unavailable" in d.log.read_text()
        writer.write_calls(calls[30:33])
        with writer.lock:
            copy = rotate(log, "copytruncate", "numbered", "deleted")
        assert copy is not None
        wait_for(lambda: f"holding {copy}" in d.log.read_text(), 10, "the daemon to hold the copy while a call hangs")
        copy.unlink()
        kept = tmp_path / "state" / "kept-logs"
        wait_for(lambda: [p.name for p in kept.rglob("*.jsonl*")] == [copy.name], 10, "a copy of the deleted copy")
        assert d.proc is not None
        started = time.monotonic()
        os.killpg(d.proc.pid, signal.SIGTERM)
        code = d.proc.wait(timeout=30)
        assert code == 0 and time.monotonic() - started < 3 + 5, "the stop waited for the frozen database"
        d.proc = None
        pg.freeze(signal.SIGCONT)
        frozen = False
        writer.write_calls(calls[33:])
        d = daemon().start()
        assert_exactly(wait_for_calls(uri, experiment, calls), calls)
        assert d.stop() == 0
        assert "Traceback" not in d.log.read_text()
    finally:
        if frozen:
            pg.freeze(signal.SIGCONT)
        if d.alive():
            d.stop(signal.SIGKILL)


def test_a_daemon_whose_postgresql_stops_answering_while_it_finds_its_experiment_still_stops_on_sigterm(
    tmp_path: Path, capture, own_pg: OwnPg
) -> None:
    """PostgreSQL frozen (SIGSTOP) just as a starting daemon reads the experiment on a connection it
    has open (held there by a lock, then frozen): finding the experiment was no watched call, and
    the daemon sat in that read for ever, SIGTERM unheeded. Now it stops within
    ``--shutdown-timeout``, and the next start writes every call once."""
    pg, uri, logdir = own_pg
    experiment = "pg-frozen-start"
    calls = fresh_calls(capture)[:20]
    daemon = lambda: Daemon(logdir, uri, experiment, tmp_path / "state", "--mlflow-timeout", "2", "--shutdown-timeout", "3")  # noqa: E731
    d = daemon().start()
    try:
        writer = Writer(logdir / "proxy.jsonl")
        writer.write_calls(calls[:10])
        wait_for_calls(uri, experiment, calls[:10])
        assert d.stop() == 0
        with pg.frozen_at(uri, "experiments") as freeze_when_waiting:
            d = daemon().start(ready=False)
            assert d.proc is not None
            freeze_when_waiting(d.proc)
            time.sleep(1)
            started = time.monotonic()
            os.killpg(d.proc.pid, signal.SIGTERM)
            try:
                code = d.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pytest.fail("SIGTERM unheeded while the daemon waits for the frozen database: " + d.log.read_text()[-2000:])
            assert code == 0 and time.monotonic() - started < 3 + 5, "the stop waited for the frozen database"
            d.proc = None
        writer.write_calls(calls[10:])
        d = daemon().start()
        assert_exactly(wait_for_calls(uri, experiment, calls), calls)
        assert d.stop() == 0
        assert "Traceback" not in d.log.read_text()
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)


@pytest.mark.parametrize("how", ["halted", "frozen"])
def test_a_daemon_whose_postgresql_goes_down_as_it_reads_the_schema_revision_reports_it_and_keeps_the_bulk_writer(
    tmp_path: Path, capture, how: str, own_pg: OwnPg
) -> None:
    """PostgreSQL halted (``pg_ctl -m immediate``: the connection dropped, new ones refused) or frozen
    (SIGSTOP: no answer at all) just as a starting daemon's sink reads the schema revision (held there
    by a lock on ``alembic_version``, taken once the experiment was read). Halted, that read failing
    was taken for an unknown revision, and the daemon wrote through the slower ``log_spans`` for as
    long as it ran, blaming "schema revision None"; either way opening the sink then retried for the
    whole ``--mlflow-timeout`` saying nothing. Now it is an outage at start, said within seconds and
    waited for, and once the database answers the daemon writes every call with the bulk writer."""
    pg, uri, logdir = own_pg
    experiment = "pg-down-at-revision"
    calls = fresh_calls(capture)[:20]
    daemon = lambda: Daemon(logdir, uri, experiment, tmp_path / "state", "--mlflow-timeout", "120")  # noqa: E731
    d = daemon().start()
    try:
        writer = Writer(logdir / "proxy.jsonl")
        writer.write_calls(calls[:10])
        wait_for_calls(uri, experiment, calls[:10])
        assert d.stop() == 0
        stop = pg.halt if how == "halted" else None
        with pg.frozen_at(uri, "alembic_version", after_table="experiments", stop=stop) as stop_when_reading:
            d = daemon().start(ready=False)
            assert d.proc is not None
            stop_when_reading(d.proc)
            wait_for(lambda: "MLflow unavailable at start" in d.log.read_text(), 30, "the daemon to say the database is down")
        if how == "halted":
            pg.resume()
        writer.write_calls(calls[10:])
        assert_exactly(wait_for_calls(uri, experiment, calls), calls)
        assert d.stop() == 0
        log = d.log.read_text()
        assert "log_spans" not in log and "Traceback" not in log, log[-3000:]
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)


def test_the_daemons_experiment_check_on_a_postgresql_that_stops_answering_does_not_stall_it(
    tmp_path: Path, capture, monkeypatch, own_pg: OwnPg
) -> None:
    """The running daemon asks every ``EXPERIMENT_CHECK_S`` (60 s, shortened here in-process) whether
    its experiment was deleted: with PostgreSQL frozen (SIGSTOP) that read must not hold the loop.
    A pass of it, the check included, ends within ``--mlflow-timeout`` (and a little), the check
    saying "cannot tell" rather than stopping the daemon; once thawed, the calls are written."""
    import threading

    import ingest.tail as tail

    pg, uri, logdir = own_pg
    experiment = "pg-frozen-check"
    calls = fresh_calls(capture)[:10]
    opts = tail.TailOptions(
        paths=[str(logdir)], tracking_uri=uri, experiment_name=experiment, state_dir=tmp_path / "state", mlflow_timeout_s=2, settle_s=0
    )
    tailer, frozen = tail.Tailer(opts, [logdir]), False
    try:
        tailer.step()  # a first pass while the database answers (the store keeps its connections pooled)
        monkeypatch.setattr(tail, "EXPERIMENT_CHECK_S", 0.0)
        checked = tailer._experiment_checked
        pg.freeze()
        frozen = True
        started = time.monotonic()
        stepping = threading.Thread(target=tailer.step, daemon=True)
        stepping.start()
        stepping.join(timeout=2 + 10)
        assert not stepping.is_alive(), "the daemon's experiment check waits for the frozen database"
        assert tailer._experiment_checked > checked and time.monotonic() - started < 2 + 10
        assert tailer.refused is None and not tailer.stopping.is_set()
        pg.freeze(signal.SIGCONT)
        frozen = False
        Writer(logdir / "proxy.jsonl").write_calls(calls)
        deadline = time.monotonic() + 60
        while len(call_ids_in(uri, experiment)) < len(calls) and time.monotonic() < deadline:
            tailer.step()
            time.sleep(0.2)
        assert_exactly(wait_for_calls(uri, experiment, calls, timeout=5), calls)
    finally:
        if frozen:
            pg.freeze(signal.SIGCONT)
        tailer.close()


def test_metrics_health_and_status_while_running(setup, mlflow_server, capture, tmp_path: Path) -> None:
    import subprocess

    from tests.tailkit import EXE

    logdir, experiment, daemon = setup
    log = logdir / "proxy.jsonl"
    calls = fresh_calls(capture)[:10]
    Writer(log).write_calls(calls)
    d = daemon().start()
    wait_for_calls(mlflow_server.url, experiment, calls)
    wait_for(lambda: "litellm_ingest_traces_written_total 10" in d.metrics(), 10, "metrics to count 10 traces")
    m = d.metrics()
    assert f"litellm_ingest_records_read_total {sum(len(c) for c in calls)}" in m
    assert f'litellm_ingest_file_lag_bytes{{path="{log}"}} 0' in m
    health = requests.get(f"http://127.0.0.1:{d.metrics_port}/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    status = subprocess.run([EXE, "status", "--state-dir", str(tmp_path / "state"), "--json"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0
    files = json.loads(status.stdout)["files"]
    assert [f["offset"] for f in files if f["path"] == str(log.resolve())] == [log.stat().st_size]
    assert d.stop() == 0


def test_from_end_skips_existing_content_on_first_start_only(setup, mlflow_server, capture) -> None:
    """Only what the files held when the daemon first started is skipped: a file empty then, one
    made later and the file a rotation makes are read whole (they were skipped to their end, for
    as long as the first run lasted), and so is everything after a restart."""
    logdir, experiment, daemon = setup
    log, empty = logdir / "proxy.jsonl", logdir / "other.jsonl"
    calls = fresh_calls(capture)[:30]
    writer = Writer(log)
    writer.write_calls(calls[:6])
    empty.touch()
    d = daemon("--from-end").start()
    time.sleep(1.5)
    writer.write_calls(calls[6:12])
    Writer(empty).write_calls(calls[12:16])
    Writer(logdir / "new.jsonl").write_calls(calls[16:20])
    with writer.lock:
        rotate(log, "rename_create", "numbered", "kept")
    writer.write_calls(calls[20:24])
    wait_for_calls(mlflow_server.url, experiment, calls[6:24])
    assert d.stop() == 0
    writer.write_calls(calls[24:27])
    d = daemon("--from-end").start()
    writer.write_calls(calls[27:])
    traces = wait_for_calls(mlflow_server.url, experiment, calls[6:])
    assert d.stop() == 0
    assert_exactly(traces, calls[6:])


def test_from_end_after_a_first_start_that_found_no_file_skips_nothing(mlflow_server, capture, tmp_path: Path) -> None:
    """A daemon first started before the proxy wrote anything saved no checkpoint: restarted with the
    same flags, it took that start for its first and skipped what had been written meanwhile."""
    logdir, experiment = tmp_path / "later-logs", f"tail-{uuid.uuid4().hex[:8]}"
    logdir.mkdir()
    calls = fresh_calls(capture)[:8]
    d = Daemon(logdir, mlflow_server.url, experiment, tmp_path / "state-first", "--from-end").start()
    time.sleep(1.5)
    assert d.stop() == 0
    Writer(logdir / "proxy.jsonl").write_calls(calls)
    d = Daemon(logdir, mlflow_server.url, experiment, tmp_path / "state-first", "--from-end").start()
    try:
        traces = wait_for_calls(mlflow_server.url, experiment, calls)
        assert d.stop() == 0
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)
    assert_exactly(traces, calls)


def test_polling_observer_follows_files_too(setup, mlflow_server, capture) -> None:
    logdir, experiment, daemon = setup
    calls = fresh_calls(capture)[:8]
    d = daemon("--polling").start()
    Writer(logdir / "sub" / "proxy.jsonl" if (logdir / "sub").mkdir() is None else logdir).write_calls(calls)
    traces = wait_for_calls(mlflow_server.url, experiment, calls)
    assert d.stop() == 0
    assert_exactly(traces, calls)


def test_fallback_later_than_settle_rewrites_the_trace_with_its_final_state(setup, mlflow_server, capture) -> None:
    from tests.conftest import all_traces, client_for, reidentify

    logdir, experiment, daemon = setup
    log = logdir / "proxy.jsonl"
    pair = [r for r in capture if r["litellm_call_id"].startswith("86f9bb02")]
    failure, success = reidentify(pair, shift_s=time.time() - pair[1]["endTime"])
    d = daemon("--settle", "1").start()
    with log.open("a") as f:
        f.write(json.dumps(failure) + "\n")
    wait_for(lambda: [t.info.state.value for t in all_traces(mlflow_server.url, experiment)] == ["ERROR"], 30, "the failure written alone")
    (failed,) = all_traces(mlflow_server.url, experiment)
    client_for(mlflow_server.url).set_trace_tag(failed.info.trace_id, "reviewed", "yes")
    with log.open("a") as f:
        f.write(json.dumps(success) + "\n")

    def rewritten() -> bool:
        traces = all_traces(mlflow_server.url, experiment)
        return len(traces) == 1 and traces[0].info.state.value == "OK" and len(traces[0].data.spans) == 3

    wait_for(rewritten, 30, "the call rewritten whole, state OK")
    (trace,) = all_traces(mlflow_server.url, experiment)
    assert trace.info.tags["litellm.attempts"] == "2" and trace.info.response_preview
    assert trace.info.tags["reviewed"] == "yes", "settled in place: not deleted and written again"
    assert d.stop() == 0


def test_an_earlier_attempt_found_late_joins_its_call_in_mlflow(setup, mlflow_server) -> None:
    """A fallback's trace is in MLflow when its failed primary turns up in a file found late: the
    daemon reads the call's spans back and writes it whole (root and both attempts, state OK).
    Sent alone, the failed attempt's one span would have replaced the fallback's (the same span id)."""
    from tests.followkit import line, record

    logdir, experiment, daemon = setup
    now = time.time() - 60
    cid = f"late-{uuid.uuid4().hex[:8]}"
    fail, ok = record(cid, "failure", now - 4, now - 3, 0), record(cid, "success", now - 2, now - 1, 1)
    (logdir / "proxy.jsonl").write_text(line(ok))
    d = daemon().start()
    wait_for_calls(mlflow_server.url, experiment, [[ok]])
    (logdir / "proxy.jsonl.1").write_text(line(fail))
    wait_for_calls(mlflow_server.url, experiment, [[fail, ok]])
    wait_for(lambda: "litellm_ingest_calls_joined_total 1" in d.metrics(), 20, "the batch to be counted (after its trace is settled)")
    (trace,) = all_traces(mlflow_server.url, experiment)
    assert (trace.info.state.value, trace.info.request_time) == ("OK", int(fail["startTime"] * 1000))
    assert trace.info.request_preview == fail["messages"][0]["content"]  # the first attempt's, as one write of both
    spans = sorted((s.name, s.status.status_code.value) for s in trace.data.spans)
    assert spans == [("litellm-acompletion", "OK"), ("litellm-acompletion attempt 1", "ERROR"), ("litellm-acompletion attempt 2", "OK")]
    assert d.stop() == 0


def test_a_directory_of_more_files_than_the_descriptor_limit_is_followed_whole(tmp_path: Path, capture) -> None:
    """One file per call (a per-call logger's bucket synced to a folder), more files than the process
    may open: the daemon died on "Too many open files" (a polars panic went past its error handling)
    after about 250 of them. Now it closes files read to their end and opens them when they change."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    calls = fresh_calls(capture, copies=13)
    for i, call in enumerate(calls):
        write_jsonl(logdir / f"call-{i:04d}.jsonl", call)
    uri, experiment = f"sqlite:///{tmp_path / 'store.db'}", f"fds-{uuid.uuid4().hex[:6]}"
    daemon = Daemon(logdir, uri, experiment, tmp_path / "state", fd_limit=256).start()
    try:
        wait_for(lambda: sqlite_trace_count(tmp_path / "store.db") >= len(calls) or not daemon.alive(), 120, "every call")
        assert daemon.alive(), daemon.log.read_text()[-3000:]
        later = fresh_calls(capture)[:3]
        for i, call in enumerate(later):
            write_jsonl(logdir / f"late-{i}.jsonl", call)
        with (logdir / "call-0000.jsonl").open("a") as f:
            f.write(json.dumps(later[0][0] | {"litellm_call_id": "appended-" + uuid.uuid4().hex, "id": uuid.uuid4().hex}) + "\n")
        wait_for(lambda: sqlite_trace_count(tmp_path / "store.db") >= len(calls) + 4, 60, "the files written later")
        metrics = daemon.metrics()
        assert daemon.stop() == 0
    finally:
        if daemon.alive():
            daemon.stop(signal.SIGKILL)
    log = daemon.log.read_text()
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
    assert f"litellm_ingest_files_followed {len(calls) + 3}" in metrics
    assert sqlite_trace_count(tmp_path / "store.db") == len(calls) + 4
    assert_exactly([t for t in all_traces(uri, experiment) if not t.info.tags["litellm.call_id"].startswith("appended-")], calls + later)


def test_a_folder_made_after_the_daemon_started_or_made_anew_is_followed(tmp_path: Path, capture) -> None:
    """A sidecar started before the proxy made its log folder exited with a usage error (a restart
    loop under Kubernetes); a folder deleted and made again is followed on, as it was."""
    import shutil

    logdir = tmp_path / "logs"
    calls = fresh_calls(capture)
    uri, experiment = f"sqlite:///{tmp_path / 'store.db'}", f"later-{uuid.uuid4().hex[:6]}"
    daemon = Daemon(logdir, uri, experiment, tmp_path / "state").start()
    try:
        wait_for(lambda: "does not exist" in daemon.log.read_text() or not daemon.alive(), 30, "the daemon to say so")
        assert daemon.alive(), daemon.log.read_text()[-3000:]
        write_jsonl(logdir / "proxy.jsonl", [r for c in calls[:20] for r in c])
        wait_for_calls(uri, experiment, calls[:20])
        shutil.rmtree(logdir)
        wait_for(lambda: daemon.log.read_text().count("does not exist") == 2, 30, "the daemon to see the folder gone")
        write_jsonl(logdir / "proxy.jsonl", [r for c in calls[20:] for r in c])
        assert_exactly(wait_for_calls(uri, experiment, calls), calls)
        assert daemon.log.read_text().count("exists now") == 2 and daemon.stop() == 0
    finally:
        if daemon.alive():
            daemon.stop(signal.SIGKILL)


@pytest.mark.parametrize("there", ["pipe", "file"])
def test_a_followed_path_that_is_no_folder_is_said_to_be_none_and_followed_once_it_is(tmp_path: Path, capture, there: str) -> None:
    """A FIFO given as the folder, or a folder replaced by a file while followed, was "does not exist"
    and "cannot list: permission denied" at once, neither true. (A file given as the folder at start
    is click's usage error.)"""
    logdir = tmp_path / "logs"
    if there == "pipe":
        os.mkfifo(logdir)
    else:
        logdir.mkdir()
    calls = fresh_calls(capture)
    uri, experiment = f"sqlite:///{tmp_path / 'store.db'}", f"nofolder-{uuid.uuid4().hex[:6]}"
    daemon = Daemon(logdir, uri, experiment, tmp_path / "state").start()
    try:
        if there == "file":
            wait_for(lambda: "following" in daemon.log.read_text() or not daemon.alive(), 30, "the daemon to start")
            logdir.rmdir()
            logdir.write_text("not a folder\n")
        wait_for(lambda: "is no folder" in daemon.log.read_text() or not daemon.alive(), 30, "the daemon to say so")
        time.sleep(1.5)
        said = daemon.log.read_text()
        assert daemon.alive() and f"{logdir} is no folder (a {there})" in said, said[-3000:]
        assert "permission denied" not in said and "does not exist" not in said, said[-3000:]
        logdir.unlink()
        write_jsonl(logdir / "proxy.jsonl", [r for c in calls for r in c])
        assert_exactly(wait_for_calls(uri, experiment, calls), calls)
        assert daemon.log.read_text().count("exists now") == 1 and daemon.stop() == 0
    finally:
        if daemon.alive():
            daemon.stop(signal.SIGKILL)


@pytest.mark.parametrize("folder_mode", [0, 0o644], ids=["folder unlistable", "folder listable, not enterable"])
def test_a_file_the_daemon_may_not_read_is_named_once_and_read_when_it_can_be(tmp_path: Path, capture, folder_mode: int) -> None:
    """It was passed over in silence on every scan; so was a folder it may not list, or not enter."""
    from tests.test_cli import unprivileged

    logdir = tmp_path / "logs"
    logdir.mkdir()
    calls = fresh_calls(capture, copies=3)
    readable, locked = write_jsonl(logdir / "a.jsonl", [r for c in calls[:45] for r in c]), logdir / "b.jsonl"
    write_jsonl(locked, [r for c in calls[45:90] for r in c])
    folder = write_jsonl(logdir / "old" / "c.jsonl", [r for c in calls[90:] for r in c]).parent
    locked.chmod(0)
    folder.chmod(folder_mode)
    uri, experiment = f"sqlite:///{tmp_path / 'store.db'}", f"perm-{uuid.uuid4().hex[:6]}"
    wrap = tuple(unprivileged([]))
    daemon = Daemon(logdir, uri, experiment, tmp_path / "state", wrap=wrap).start()
    try:
        wait_for_calls(uri, experiment, calls[:45])
        time.sleep(2.5)
        assert daemon.log.read_text().count(f"cannot read {locked}: permission denied") == 1
        assert daemon.log.read_text().count(f"cannot list {folder}: permission denied") == 1
        locked.unlink()  # what the daemon kept of it goes with it (a dated rotation leaves a new name each time)
        time.sleep(2.5)
        write_jsonl(tmp_path / "b.jsonl", [r for c in calls[45:90] for r in c]).chmod(0)
        (tmp_path / "b.jsonl").rename(locked)  # unreadable from its first sight
        time.sleep(2.5)
        assert daemon.log.read_text().count(f"cannot read {locked}: permission denied") == 2
        locked.chmod(0o644)
        folder.chmod(0o755)
        assert_exactly(wait_for_calls(uri, experiment, calls), calls)
        assert readable.exists() and daemon.stop() == 0
    finally:
        if daemon.alive():
            daemon.stop(signal.SIGKILL)


def test_an_empty_metrics_host_serves_on_loopback_only(tmp_path: Path) -> None:
    """``--metrics-host "$HOST"`` with the variable unset bound every address (``""``), while the
    default is 127.0.0.1: another loopback address stands in for the network here."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    daemon = Daemon(logdir, f"sqlite:///{tmp_path / 'store.db'}", f"mh-{uuid.uuid4().hex[:6]}", tmp_path / "state", "--metrics-host", "")
    daemon.start()
    try:
        assert requests.get(f"http://127.0.0.1:{daemon.metrics_port}/health", timeout=5).ok
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.2:{daemon.metrics_port}/health", timeout=5)
        assert daemon.stop() == 0
    finally:
        if daemon.alive():
            daemon.stop(signal.SIGKILL)


def test_an_idle_daemon_opens_no_file_it_has_read_whole_nor_wakes_itself(tmp_path: Path, capture) -> None:
    """Idle beside gzipped rotations, the daemon opened them several times a second: a gzip of a file
    it had read was opened and decompressed at every scan (never parked), one it followed was
    decompressed whole every pass until ``--close-inactive`` (300 s), and the inotify events of its own
    opens woke the next pass after ``--batch-wait`` instead of the next rescan (1 s). A file still
    without a whole first line is opened once a scan, no more."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    calls = fresh_calls(capture, copies=2)
    live, unseen, partial = logdir / "proxy.jsonl", logdir / "older.jsonl.9.gz", logdir / "partial.jsonl"
    with gzip.open(unseen, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for c in calls[:10] for r in c)
    partial.write_text('{"litellm_call_id": "not yet')
    live.touch()
    uri, experiment = f"sqlite:///{tmp_path / 'store.db'}", f"idle-{uuid.uuid4().hex[:6]}"
    daemon = Daemon(logdir, uri, experiment, tmp_path / "state", "--partial-timeout", "600").start()
    try:
        with Opens(logdir) as opens:
            writer, lines = Writer(live), sum(len(c) for c in calls[:10])
            for n, call in enumerate(calls[10:16], 1):
                writer.write_calls([call])
                lines += len(call)
                wait_for(
                    lambda lines=lines: metric(daemon.metrics(), "litellm_ingest_records_read_total") >= lines, 30, f"{lines} lines read"
                )
                rotate(live, "rename_create", "numbered", "gzipped", n)
            wait_for_calls(uri, experiment, calls[:16])
            # until then each gzip is a copy of a file still followed
            wait_for(lambda: daemon.log.read_text().count("(rotated away, read to its end)") >= 6, 30, "the rotated files closed")
            time.sleep(2)  # the scan that finds its gzip a copy of a file read
            before = opens.counts.copy()
            time.sleep(6)  # idle: six rescans
            idle = opens.since(before)
        assert daemon.stop() == 0
    finally:
        if daemon.alive():
            daemon.stop(signal.SIGKILL)
    assert all(before[f"proxy.jsonl.{n}.gz"] for n in range(1, 7)), f"the rotations seen: {before}"
    assert not {name: n for name, n in idle.items() if name.endswith(".gz")}, f"gzips read whole opened while idle: {idle}"
    # each scan opens it twice (by name, then its own reader); before, 14-70 times in the 6 s
    assert idle[partial.name] <= 2 * (6 + 2), f"opened more than once a rescan: {idle}"
