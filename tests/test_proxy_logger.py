"""The proxy-side logger: whole lines under concurrency, rotation the tail daemon follows, never raising."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import multiprocessing
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from ingest.proxy_logger import JsonlFileLogger
from ingest.sources import discover
from tests.tailkit import Daemon, fresh_calls, spans_of, wait_for, wait_for_calls


def read_all_lines(directory: Path, name: str) -> list[bytes]:
    out: list[bytes] = []
    for f in sorted(directory.glob(name + "*")):
        if f.name.endswith((".lock", ".tmp")):
            continue
        data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        out += data.splitlines(keepends=True)
    return out


def _worker(path: str, n: int, tag: str) -> None:
    logger = JsonlFileLogger(path, max_bytes=20_000, backups=1000)
    pad = "x" * 900
    for i in range(n):
        logger.write_record({"standard_logging_object": {"id": f"{tag}-{i}", "pad": pad}})


def test_threads_and_processes_never_interleave_or_tear_lines_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "proxy.jsonl"
    logger = JsonlFileLogger(path, max_bytes=20_000, backups=1000)
    pad = "y" * 700

    def in_thread(t: int) -> None:
        for i in range(150):
            logger.write_record({"standard_logging_object": {"id": f"t{t}-{i}", "pad": pad, "text": "é\u2028\n"}})

    procs = [multiprocessing.get_context("fork").Process(target=_worker, args=(str(path), 150, f"p{p}")) for p in range(3)]
    for p in procs:
        p.start()
    threads = [threading.Thread(target=in_thread, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = read_all_lines(path.parent, "proxy.jsonl")
    ids = [json.loads(line)["id"] for line in lines]  # every line is whole JSON
    assert all(line.endswith(b"\n") for line in lines)
    assert sorted(ids) == sorted([f"t{t}-{i}" for t in range(6) for i in range(150)] + [f"p{p}-{i}" for p in range(3) for i in range(150)])
    assert len(list(path.parent.glob("proxy.jsonl.*[0-9]"))) > 10, "rotation happened many times"
    assert all(f.stat().st_size <= 20_000 for f in path.parent.glob("proxy.jsonl*") if not f.name.endswith(".lock"))
    assert logger.errors == 0


def test_async_hooks_write_the_standard_logging_object(tmp_path: Path, capture: list[dict]) -> None:
    logger = JsonlFileLogger(tmp_path / "a.jsonl", max_bytes=0)

    async def drive() -> None:
        await asyncio.gather(
            *(
                (logger.async_log_success_event if r["status"] == "success" else logger.async_log_failure_event)(
                    {"standard_logging_object": r}, None, None, None
                )
                for r in capture
            )
        )

    asyncio.run(drive())
    got = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert sorted(json.dumps(r, sort_keys=True) for r in got) == sorted(json.dumps(r, sort_keys=True) for r in capture)
    logger.log_success_event({"no": "payload"}, None, None, None)
    assert logger.written == len(capture)


def test_keeps_n_backups_and_gzips_them_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "proxy.jsonl"
    logger = JsonlFileLogger(path, max_bytes=5_000, backups=3, compress=True)
    for i in range(60):
        logger.write_record({"standard_logging_object": {"id": i, "pad": "z" * 400}})
    wait_for(lambda: not list(tmp_path.glob("proxy.jsonl.[0-9]")), 10, "background gzip")
    rotated = sorted(f.name for f in tmp_path.glob("proxy.jsonl.*") if not f.name.endswith(".lock"))
    assert rotated == ["proxy.jsonl.1.gz", "proxy.jsonl.2.gz", "proxy.jsonl.3.gz"]
    oldest_first = [tmp_path / f"proxy.jsonl.{n}.gz" for n in (3, 2, 1)] + [path]
    ids = [
        json.loads(line)["id"]
        for f in oldest_first
        for line in (gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()).splitlines()
    ]
    assert ids == list(range(ids[0], 60)), "the newest lines are kept, in order, none missing in between"


def test_a_gzipped_file_keeps_the_time_of_its_last_line(tmp_path: Path) -> None:
    """As gzip does: readers take a file's modification time for its age (``sources.oldest_first``)."""
    logger = JsonlFileLogger(tmp_path / "proxy.jsonl", backups=3, compress=True)
    rotated = tmp_path / "proxy.jsonl.1"
    rotated.write_text('{"id": 1}\n')
    os.utime(rotated, (1_700_000_000, 1_700_000_000))
    logger._compress(os.open(rotated, os.O_RDONLY))
    gz = tmp_path / "proxy.jsonl.1.gz"
    assert not rotated.exists() and gz.stat().st_mtime == 1_700_000_000
    logger.write_record({"standard_logging_object": {"id": 2}})
    assert discover([str(tmp_path)]) == [gz, tmp_path / "proxy.jsonl"]


def test_host_in_the_path_gives_each_replica_its_own_file(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Replicas on one shared volume: ``{host}`` (the pod name) keeps their files apart, rotation included."""
    import socket

    loggers = []
    for host in ("litellm-7d9f-abc12", "litellm-7d9f/x y"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        monkeypatch.setenv("LITELLM_INGEST_LOG_PATH", str(tmp_path / "logs" / "requests-{host}.jsonl"))
        loggers.append(JsonlFileLogger(max_bytes=3_000, backups=10))
    assert [lg.path.name for lg in loggers] == ["requests-litellm-7d9f-abc12.jsonl", "requests-litellm-7d9f_x_y.jsonl"]
    for n in range(20):
        for i, lg in enumerate(loggers):
            lg.write_record({"standard_logging_object": {"id": f"{i}-{n}", "pad": "z" * 400}})
    for i, lg in enumerate(loggers):
        lines = read_all_lines(lg.path.parent, lg.path.name)
        assert sorted(json.loads(line)["id"] for line in lines) == sorted(f"{i}-{n}" for n in range(20))
        assert list(lg.path.parent.glob(lg.path.name + ".1")), "rotated under its own name"


@pytest.mark.parametrize(
    ("gzip_given", "size_given", "compress", "max_bytes", "said"),
    [
        ("True", "100MB", True, 100 * 1024**2, 0),
        ("ON", "64KiB", True, 64 * 1024, 0),
        ("0", " 5000 ", False, 5000, 0),
        ("enabled", "-1", False, 100 * 1024**2, 2),
        ("", "a lot", False, 100 * 1024**2, 1),
    ],
)
def test_the_settings_are_read_as_people_write_them_and_one_not_read_is_said(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch, caplog, gzip_given: str, size_given: str, compress: bool, max_bytes: int, said: int
) -> None:
    """``LITELLM_INGEST_LOG_GZIP=True`` left rotated files unzipped and ``100MB`` rotated at 100 MiB by
    chance (it fell back to the default), in silence; ``-1`` rotated at every line."""
    monkeypatch.setenv("LITELLM_INGEST_LOG_GZIP", gzip_given)
    monkeypatch.setenv("LITELLM_INGEST_LOG_MAX_BYTES", size_given)
    with caplog.at_level(logging.WARNING, logger="litellm-ingest.proxy-logger"):
        logger = JsonlFileLogger(tmp_path / "x.jsonl")
    assert (logger.compress, logger.max_bytes) == (compress, max_bytes)
    warned = [r.getMessage() for r in caplog.records if r.name == "litellm-ingest.proxy-logger"]
    assert len(warned) == said, warned
    assert all(w.startswith("LITELLM_INGEST_LOG_") for w in warned), warned


@pytest.mark.parametrize(("given", "mode", "said"), [("", 0o640, 0), ("600", 0o600, 0), ("0o660", 0o660, 0), ("rw-r-----", 0o640, 1),
                                                     ("200", 0o640, 1)])  # fmt: skip
def test_the_logs_are_not_for_every_user_of_the_host_rotated_and_gzipped_alike(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch, caplog, given: str, mode: int, said: int
) -> None:
    """The files hold every prompt and response; they were made 0644, readable by every user of the
    host. Now 0640 unless ``LITELLM_INGEST_LOG_MODE`` says otherwise, the gzipped copies too."""
    monkeypatch.setenv("LITELLM_INGEST_LOG_MODE", given)
    old = os.umask(0o002)
    try:
        with caplog.at_level(logging.WARNING, logger="litellm-ingest.proxy-logger"):
            logger = JsonlFileLogger(tmp_path / "x.jsonl", max_bytes=2_000, backups=3, compress=True)
        for i in range(8):
            logger.write_record({"standard_logging_object": {"id": f"m-{i}", "pad": "x" * 600}})
        wait_for(lambda: len(list(tmp_path.glob("x.jsonl.*.gz"))) >= 2, 10, "two rotated files gzipped")
    finally:
        os.umask(old)
    logs = [f for f in tmp_path.iterdir() if not f.name.endswith(".lock")]
    assert {f.name for f in logs} >= {"x.jsonl", "x.jsonl.1.gz", "x.jsonl.2.gz"}, logs
    assert {f.name: f.stat().st_mode & 0o777 for f in logs} == {f.name: mode for f in logs}
    warned = [r.getMessage() for r in caplog.records if r.name == "litellm-ingest.proxy-logger"]
    assert len(warned) == said and all("LITELLM_INGEST_LOG_MODE" in w for w in warned), warned


def test_never_raises_into_the_proxy(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    logger = JsonlFileLogger(blocker / "proxy.jsonl")
    logger.write_record({"standard_logging_object": {"id": 1}})
    logger.write_record({"standard_logging_object": {"bad": {1, 2}}})
    assert logger.errors == 2 and logger.written == 0


def test_tail_daemon_follows_the_logger_through_its_rotations(mlflow_server, capture, tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    logger = JsonlFileLogger(logdir / "proxy.jsonl", max_bytes=60_000, backups=50, compress=True)
    experiment = f"logger-{uuid.uuid4().hex[:8]}"
    calls = fresh_calls(capture, copies=2)
    logdir.mkdir()
    daemon = Daemon(logdir, mlflow_server.url, experiment, tmp_path / "state").start()
    try:
        for call in calls:
            for r in call:
                logger.write_record({"standard_logging_object": r})
            time.sleep(0.01)
        traces = wait_for_calls(mlflow_server.url, experiment, calls)
        assert sorted(t.info.tags["litellm.call_id"] for t in traces) == sorted(c[0]["litellm_call_id"] for c in calls)
        assert sum(len(t.data.spans) for t in traces) == spans_of(calls)
        assert len(list(logdir.glob("proxy.jsonl.*.gz"))) >= 5
    finally:
        assert daemon.stop() == 0


_FULL_DISK_CHILD = r"""
import json, logging, os, resource, signal, sys
from ingest.proxy_logger import JsonlFileLogger
logging.basicConfig(level=logging.INFO)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
records = json.loads(sys.argv[2])
lg = JsonlFileLogger(sys.argv[1], max_bytes=0)
lg.write_record({"standard_logging_object": records[0]})
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(sys.argv[1]) + 200, hard))
for r in records[1:-1]:
    lg.write_record({"standard_logging_object": r})
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
lg.write_record({"standard_logging_object": records[-1]})
print(lg.written, lg.errors)
"""


def test_a_full_disk_tears_no_line_for_the_next_record_to_join_and_is_said_once_not_per_request(
    tmp_path: Path, capture: list[dict]
) -> None:
    """A write the disk could hold only part of left half a line: the next record, once there was
    room, was appended to it, and both were one malformed line (the call logged after the outage
    lost too). The full disk is a file-size limit in a child process: the same short write, then an
    error. Each request then logged a traceback in the proxy's log; now one line says it, and one
    more, once lines are written again, how many were lost after it."""
    import subprocess
    import sys

    records = [dict(r, litellm_call_id=f"full-{i}") for i, r in enumerate(capture[:6])]
    path = tmp_path / "logs" / "requests.jsonl"
    args = [sys.executable, "-c", _FULL_DISK_CHILD, str(path), json.dumps(records)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["2", "4"], out.stderr[-2000:]
    lines = path.read_bytes().splitlines()
    assert [json.loads(x)["litellm_call_id"] for x in lines] == ["full-0", "full-5"]
    said = [x for x in out.stderr.splitlines() if "litellm-ingest" in x]
    assert "Traceback" not in out.stderr and len(said) == 2, out.stderr[-2000:]
    assert "could not write 1 request log line(s)" in said[0] and "File too large" in said[0], said
    assert "again (3 more not written)" in said[1], said


@pytest.mark.parametrize("encoder", ["orjson", "json"])
def test_text_the_ingester_could_not_read_is_written_so_it_can(
    tmp_path: Path, capture: list[dict], encoder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half an emoji a client cut (a lone surrogate) was written as raw bytes, invalid UTF-8, and the
    call quarantined; a dict with a key that is no string made ``json`` refuse the record, not logged.
    A NaN cost is written null (``NaN`` is no JSON to other readers). With orjson (the proxy has it)
    and without (the logger on the proxy's path alone)."""
    from ingest import proxy_logger
    from ingest.normalize import normalize
    from ingest.sources import read_chunks

    if encoder == "json":
        monkeypatch.setattr(proxy_logger, "orjson", None)
    lg = JsonlFileLogger(tmp_path / "requests.jsonl", max_bytes=0)
    cut = dict(capture[0], litellm_call_id="cut", messages=[{"role": "user", "content": "hi \ud83d"}])
    keyed = dict(capture[0], litellm_call_id="keyed", metadata={**capture[0]["metadata"], "by_id": {7: "x"}})
    nan = dict(capture[0], litellm_call_id="no-cost", response_cost=float("nan"), metadata={**capture[0]["metadata"], "x": [float("inf")]})
    both = dict(cut, litellm_call_id="both", response_cost=float("nan"))
    for r in (cut, keyed, nan, both):
        lg.write_record({"standard_logging_object": r})
    assert (lg.written, lg.errors) == (4, 0)
    frame, bad = normalize(next(read_chunks(tmp_path / "requests.jsonl")).lines)
    assert not bad and sorted(frame["call_key"].to_list()) == ["both", "cut", "keyed", "no-cost"]
    assert frame.filter(pl.col("call_key").is_in(["no-cost", "both"]))["cost"].is_null().all()
    assert b"NaN" not in (tmp_path / "requests.jsonl").read_bytes() and b"Infinity" not in (tmp_path / "requests.jsonl").read_bytes()


def _held_lock(path: Path) -> Any:
    """The logger's ``flock`` taken as another proxy worker rotating would hold it."""
    import fcntl

    lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def test_a_write_waiting_for_the_lock_leaves_the_proxys_event_loop_serving(tmp_path: Path) -> None:
    """The async hooks wrote on the proxy's event loop: a wait for the ``flock`` (another worker
    rotating or gzipping, a slow or network disk) held every request the loop serves. Now the loop
    ticks on while the write waits, and the line is written once the lock is free."""
    path = tmp_path / "requests.jsonl"
    logger = JsonlFileLogger(path, max_bytes=0)
    lock = _held_lock(path)
    threading.Timer(1.5, lock.close).start()  # frees the lock even if the loop is held

    async def drive() -> tuple[int, bytes]:
        hook = asyncio.create_task(logger.async_log_success_event({"standard_logging_object": {"id": "held"}}, None, None, None))
        ticks, until = 0, time.monotonic() + 0.8
        while time.monotonic() < until:
            await asyncio.sleep(0.01)
            ticks += 1
        before = path.read_bytes() if path.exists() else b""
        await hook
        return ticks, before

    ticks, before = asyncio.run(drive())
    assert ticks >= 20, f"the event loop ran {ticks} times in 0.8 s while a write waited"
    assert before == b""
    assert [json.loads(x)["id"] for x in path.read_bytes().splitlines()] == ["held"]
    assert (logger.written, logger.errors) == (1, 0)


def test_a_hook_litellm_cancels_for_its_time_limit_still_writes_its_line_in_order(tmp_path: Path) -> None:
    """LiteLLM cancels a callback past its time limit (20 s): cancelling the wait must not cancel
    the write, of that line or of the lines queued behind it."""
    path = tmp_path / "requests.jsonl"
    logger = JsonlFileLogger(path, max_bytes=0)
    lock = _held_lock(path)
    threading.Timer(3, lock.close).start()  # frees the lock even if the loop is held

    async def drive() -> int:
        hooks = [logger.async_log_success_event({"standard_logging_object": {"id": i}}, None, None, None) for i in range(5)]
        results = await asyncio.gather(*(asyncio.wait_for(h, 0.3) for h in hooks), return_exceptions=True)
        return sum(isinstance(r, (asyncio.TimeoutError, asyncio.CancelledError)) for r in results)

    assert asyncio.run(drive()) == 5, "the hooks held the loop: none was cancelled"
    assert not path.exists()
    lock.close()
    wait_for(lambda: logger.written == 5, 10, "the five lines written")
    assert [json.loads(x)["id"] for x in path.read_bytes().splitlines()] == [0, 1, 2, 3, 4]


def test_lines_past_what_may_wait_for_a_stuck_disk_are_counted_once_not_held_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that does not answer (a dead NFS server) would let lines pile up in the proxy's
    memory for ever; past ``LITELLM_INGEST_LOG_BUFFER`` they are not written, said as a full disk is."""
    monkeypatch.setenv("LITELLM_INGEST_LOG_BUFFER", "2KiB")
    path = tmp_path / "requests.jsonl"
    logger = JsonlFileLogger(path, max_bytes=0)
    assert logger.buffer == 2048
    lock = _held_lock(path)
    threading.Timer(3, lock.close).start()
    pad = "p" * 900

    async def drive() -> None:
        hooks = [logger.async_log_success_event({"standard_logging_object": {"id": i, "pad": pad}}, None, None, None) for i in range(6)]
        await asyncio.gather(*(asyncio.wait_for(h, 0.3) for h in hooks), return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="litellm-ingest.proxy-logger"):
        asyncio.run(drive())
        lock.close()
        wait_for(lambda: logger.written == 2, 10, "the two lines that could wait written")
        logger.write_record({"standard_logging_object": {"id": "after"}})
    assert [json.loads(x)["id"] for x in path.read_bytes().splitlines()] == [0, 1, "after"]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert "could not write 1 request log line(s)" in said[0] and "bytes of earlier lines still wait for the disk" in said[0], said
    assert "again (3 more not written)" in said[1], said
    assert logger.errors == 4


_STOPPING_PROXY = """
import asyncio, fcntl, sys, threading
from ingest.proxy_logger import JsonlFileLogger
lg = JsonlFileLogger(sys.argv[1], max_bytes=0)
lock = open(sys.argv[1] + ".lock", "a")
fcntl.flock(lock, fcntl.LOCK_EX)  # another worker rotating: every write waits
threading.Timer(1.0, lock.close).start()

async def serve() -> None:
    for i in range(50):
        asyncio.ensure_future(lg.async_log_success_event({"standard_logging_object": {"id": i}}, None, None, None))
    await asyncio.sleep(0.2)

asyncio.run(serve())  # the proxy stops: its loop is gone, the hooks cancelled, the lines still wait
"""


def test_lines_waiting_for_the_disk_when_the_proxy_stops_are_written_before_it_exits(tmp_path: Path) -> None:
    """The writer thread is no daemon: a proxy stopping (its event loop closed, the hooks awaiting their
    writes cancelled) exits once the lines handed over are written, all of them, in order."""
    import subprocess
    import sys

    path = tmp_path / "requests.jsonl"
    out = subprocess.run([sys.executable, "-c", _STOPPING_PROXY, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert [json.loads(x)["id"] for x in path.read_bytes().splitlines()] == list(range(50))


def _forked_worker(path: str, start: int) -> None:
    from ingest.proxy_logger import jsonl_logger_for_test  # type: ignore[attr-defined]

    async def serve() -> None:
        for i in range(start, start + 5):
            await jsonl_logger_for_test.async_log_success_event({"standard_logging_object": {"id": i}}, None, None, None)

    asyncio.run(serve())


def test_a_worker_forked_while_the_logger_writes_has_a_writer_and_locks_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy whose workers fork from a parent that logs (a preloaded app) inherited the parent's
    writer thread as a dead one, and its lock as held if the fork came mid-write: lines handed over
    were never written and each hook waited for ever. Each process starts with its own."""
    import fcntl

    from ingest import proxy_logger

    path = tmp_path / "requests.jsonl"
    logger = JsonlFileLogger(path, max_bytes=0)
    monkeypatch.setattr(proxy_logger, "jsonl_logger_for_test", logger, raising=False)
    flock = _held_lock(path)
    loop = asyncio.new_event_loop()
    writing = loop.create_task(logger.async_log_success_event({"standard_logging_object": {"id": 0}}, None, None, None))
    loop.run_until_complete(asyncio.sleep(0.1))
    wait_for(lambda: logger._lock.locked(), 10, "the parent's writer inside its write")
    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=_forked_worker, args=(str(path), 10 * (n + 1)), daemon=True) for n in range(2)]
    for w in workers:
        w.start()
    fcntl.flock(flock, fcntl.LOCK_UN)  # the workers hold the same open lock file: closing it here alone frees nothing
    flock.close()
    loop.run_until_complete(writing)
    loop.close()
    try:
        for w in workers:
            w.join(30)
            assert w.exitcode == 0, "a forked worker's hooks never returned"
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
    ids = sorted(json.loads(x)["id"] for x in path.read_bytes().splitlines())
    assert ids == [0, *range(10, 15), *range(20, 25)]
