"""A fleet of proxies, one MLflow on PostgreSQL: several daemons and a backfill writing at once.

Real parts throughout: a real PostgreSQL, real ``litellm-ingest tail`` daemons and a ``backfill``
process, the project's own logger writing (and rotating) each replica's file, and, for the second
way of writing, a real ``mlflow server --workers 2`` on the database. The input overlaps the way a
fleet's does: a replica's file copied into another replica's folder (re-delivered, before the run
and during it), and an archive the backfill reads that holds some of what the daemons follow.
One daemon is SIGKILLed mid-run and restarted on its state. The end: traces == distinct calls,
spans == attempts (plus a root for a call of several), nothing doubled, every row equal to a store
one ``batch`` process wrote from the union of the input.

The README's shared-volume layout (every replica's logger writing ``litellm-{host}.jsonl`` into
one folder, one daemon for the folder) is the last test.

Soak: ``LITELLM_INGEST_SOAK=N`` has each replica log N batches during the run and SIGKILLs N
daemons (in turn) instead of one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy

from ingest.proxy_logger import JsonlFileLogger
from tests.conftest import Postgres, copies, start_mlflow_server, write_log
from tests.storekit import Rows, assert_same_as_one_writer, store_rows, trace_and_span_counts
from tests.tailkit import EXE, Daemon, spans_of

EXPERIMENT = "fleet"
REPLICAS = 3
MAX_BYTES = 250_000  # the capture's records are ~15 KB: a replica's logger rotates every ~16 records
ASIDE = ("litellm.log_source",)  # file:line: differs by which copy of a call reached the store
SOAK = int(os.environ.get("LITELLM_INGEST_SOAK", "0"))
LIVE = max(1, SOAK)  # batches each replica's proxy logs while the daemons run, and SIGKILLs among them


def calls_of(records: list[dict]) -> list[list[dict]]:
    """Records grouped by call (attempts together), in first-seen order."""
    calls: dict[str, list[dict]] = {}
    for r in records:
        calls.setdefault(r["litellm_call_id"], []).append(r)
    return list(calls.values())


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


@pytest.fixture(scope="module")
def batches(capture: list[dict]) -> list[list[dict]]:
    """Copies of the real capture (45 calls, 53 spans each) with their own call ids: one per replica's
    file before the run, one only in the archive, LIVE per replica logged during the run."""
    return copies(capture, 4 + REPLICAS * LIVE, "fleet")


@pytest.fixture(scope="module")
def reference(batches: list[list[dict]], tmp_path_factory: pytest.TempPathFactory) -> Rows:
    """The union of the fleet's input, written once by one `batch` process."""
    d = tmp_path_factory.mktemp("fleet-reference")
    for i, b in enumerate(batches):
        write_log(d / "logs" / f"part-{i}.jsonl", b)
    uri = f"sqlite:///{d / 'ref.db'}"
    args = [EXE, "batch", str(d / "logs"), "--tracking-uri", uri, "--experiment-name", EXPERIMENT, "--state-dir", str(d / "state"), "-q"]
    done = subprocess.run(args, cwd=d, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return store_rows(uri, ASIDE)


def wait_converged(db: str, want: tuple[int, int], busy: Callable[[], bool], timeout: float = 120, idle_s: float = 15.0) -> tuple[int, int]:
    """Poll the database until it holds `want` (traces, spans) and nobody is still busy, or nothing
    changed for idle_s once they are done (a loss: longer than any daemon's --settle)."""
    deadline = time.monotonic() + timeout
    last, since = (-1, -1), time.monotonic()
    while time.monotonic() < deadline:
        now = trace_and_span_counts(db, EXPERIMENT)
        if now == want and not busy():
            return now
        if now != last or busy():
            last, since = now, time.monotonic()
        elif time.monotonic() - since > idle_s:
            return now
        time.sleep(0.5)
    return last


def traces_per_call(db: str) -> Counter:
    """How many traces each call has, by the call id tag every trace carries."""
    engine = sqlalchemy.create_engine(db)
    try:
        with engine.connect() as c:
            return Counter(v for (v,) in c.execute(sqlalchemy.text("SELECT value FROM trace_tags WHERE key = 'litellm.call_id'")))
    finally:
        engine.dispose()


def log_sources(db: str) -> set[str]:
    """The folders of the files the stored attempt spans say they were read from."""
    sources = set()
    for r in store_rows(db)["spans"]:
        source = json.loads(json.loads(r[3])["attributes"].get("litellm.log_source", "null"))
        if source:
            sources.add(str(Path(source.rsplit(":", 1)[0]).parent))
    return sources


def side_by_side(daemons: list[Daemon], action: Callable[[Daemon], object]) -> list:
    """Start or stop daemons at once: each costs a few seconds (imports, the last flush)."""
    with ThreadPoolExecutor(len(daemons)) as pool:
        return list(pool.map(action, daemons))


def relay(records: list[dict], logger: JsonlFileLogger, pace_s: float) -> None:
    """What a replica's proxy does: every attempt a line, through the logger, calls a moment apart."""
    for call in calls_of(records):
        for r in call:
            logger.write_record({"standard_logging_object": r})
        time.sleep(pace_s)


def redeliver(records: list[dict], dest: Path, staging: Path) -> None:
    """A file copied into a replica's folder whole (written aside, then renamed in), as a copy tool delivers."""
    write_log(staging / dest.name, records)
    os.replace(staging / dest.name, dest)


@pytest.mark.parametrize("via", ["bulk", pytest.param("server", marks=pytest.mark.server)])
def test_three_daemons_and_a_backfill_at_once_on_one_postgresql(
    via: str, batches: list[list[dict]], reference: Rows, postgres: Postgres, tmp_path: Path
) -> None:
    """Three replicas' daemons (one SIGKILLed mid-run) and a backfill, overlapping input, one
    PostgreSQL database written directly (bulk writer) or through `mlflow server --workers 2`."""
    db = postgres.new_database()
    server = start_mlflow_server(tmp_path / "server", backend_uri=db, workers=2) if via == "server" else None
    uri = server.url if server else db
    b = batches
    pods = [tmp_path / "replicas" / f"pod-{i}" for i in range(REPLICAS)]
    loggers = [JsonlFileLogger(p / f"litellm-pod-{i}.jsonl", max_bytes=MAX_BYTES, backups=100, compress=i == 2) for i, p in enumerate(pods)]
    staging = tmp_path / "staging"
    for i, lg in enumerate(loggers):
        relay(b[i], lg, 0.0)
    redeliver(b[0], pods[1] / "litellm-pod-0.jsonl", staging)
    archive = tmp_path / "archive"
    write_log(archive / "litellm-2025-old.jsonl.gz", b[3])
    write_log(archive / "litellm-pod-2.jsonl.1.gz", b[2])
    write_log(archive / "litellm-pod-0.jsonl.gz", b[0])
    backfill = subprocess.Popen(
        [EXE, "backfill", str(archive), "--tracking-uri", uri, "--experiment-name", EXPERIMENT, "--state-dir", str(tmp_path / "bf"), "-q"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    daemons = [Daemon(p, uri, EXPERIMENT, tmp_path / f"state-{i}") for i, p in enumerate(pods)]
    started = time.monotonic()
    try:
        side_by_side(daemons, Daemon.start)
        live = [[r for x in b[4 + i * LIVE : 4 + (i + 1) * LIVE] for r in x] for i in range(REPLICAS)]
        writers = [threading.Thread(target=relay, args=(live[i], lg, 0.05), daemon=True) for i, lg in enumerate(loggers)]
        for t in writers:
            t.start()
        for k in range(LIVE):
            time.sleep(1.0)
            victim = (1 + k) % REPLICAS
            assert daemons[victim].stop(signal.SIGKILL) == -signal.SIGKILL
            daemons[victim] = Daemon(pods[victim], uri, EXPERIMENT, tmp_path / f"state-{victim}").start()
        for t in writers:
            t.join(timeout=60 * LIVE)
        redeliver(live[1], pods[2] / "litellm-pod-1.jsonl.redelivered", staging)
        _, err = backfill.communicate(timeout=300)
        assert backfill.returncode == 0, err[-2000:]
        calls = calls_of([r for x in b for r in x])
        want = (len(calls), spans_of(calls))
        got = wait_converged(db, want, busy=lambda: any(t.is_alive() for t in writers))
        elapsed = time.monotonic() - started
        assert side_by_side(daemons, Daemon.stop) == [0] * REPLICAS, [d.log.read_text()[-2000:] for d in daemons]
        assert got == want, f"{via}: (traces, spans) {got}, want {want}"
        per_call = traces_per_call(db)
        assert set(per_call) == {c[0]["litellm_call_id"] for c in calls} and set(per_call.values()) == {1}
        # through a server, a call a daemon wrote with its failure alone (read past --settle before its
        # fallback's line was written) is settled with StartTraceV3, which marks its info final
        assert_same_as_one_writer(db, reference, ASIDE, ("mlflow.trace.infoFinalized",) if server else ())
        assert log_sources(db) <= {*map(str, pods), str(archive)}, "every attempt names the file it was read from"
        for i, p in enumerate(pods):
            assert len(list(p.glob(f"litellm-pod-{i}.jsonl.[0-9]*"))) >= 2, f"pod-{i}'s logger rotated while its daemon followed"
        assert not [q for q in tmp_path.glob("state-*/quarantine.jsonl") if q.stat().st_size]
        print(f"\n{via}: {want[0]} calls, {want[1]} spans converged {elapsed:.1f}s after the daemons were started")
    finally:
        for d in daemons:
            if d.alive():
                d.stop(signal.SIGKILL)
        if backfill.poll() is None:
            backfill.kill()
        if server is not None:
            server.stop()


def test_one_daemon_follows_every_replica_file_on_a_shared_volume(
    batches: list[list[dict]], postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's Kubernetes example as far as one machine goes: three pods (two proxy workers
    each) log to one shared folder through LITELLM_INGEST_LOG_PATH=/logs/litellm-{host}.jsonl,
    rotating and gzipping; one `tail --polling` daemon for the folder writes every call once."""
    shared = tmp_path / "logs"
    shared.mkdir()
    monkeypatch.setenv("LITELLM_INGEST_LOG_PATH", str(shared / "litellm-{host}.jsonl"))
    monkeypatch.setenv("LITELLM_INGEST_LOG_MAX_BYTES", str(MAX_BYTES))
    monkeypatch.setenv("LITELLM_INGEST_LOG_BACKUPS", "50")
    monkeypatch.setenv("LITELLM_INGEST_LOG_GZIP", "1")
    pods = [f"litellm-7d9f8c-{s}" for s in ("x2k4p", "q8z1m", "b7n3v")]
    workers: list[JsonlFileLogger] = []
    for pod in pods:
        monkeypatch.setattr(socket, "gethostname", lambda pod=pod: pod)
        workers += [JsonlFileLogger(), JsonlFileLogger()]
    assert len({w.path for w in workers}) == len(pods)
    uri = postgres.new_database()
    daemon = Daemon(shared, uri, EXPERIMENT, tmp_path / "state", "--polling").start()  # as on NFS
    try:
        threads = [threading.Thread(target=relay, args=(b, w, 0.01), daemon=True) for b, w in zip(batches[:6], workers, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        calls = calls_of([r for x in batches[:6] for r in x])
        want = (len(calls), spans_of(calls))
        got = wait_converged(uri, want, busy=lambda: False)
        assert daemon.stop() == 0
        assert got == want, f"(traces, spans) {got}, want {want}"
        per_call = traces_per_call(uri)
        assert set(per_call) == {c[0]["litellm_call_id"] for c in calls} and set(per_call.values()) == {1}
        for pod in pods:
            assert list(shared.glob(f"litellm-{pod}.jsonl.*.gz")), f"{pod}'s file rotated and gzipped under its own name"
        assert sorted(f.name for f in shared.iterdir() if f.suffix == ".jsonl") == sorted(f"litellm-{p}.jsonl" for p in pods)
        assert not (tmp_path / "state" / "quarantine.jsonl").exists()
    finally:
        if daemon.alive():
            daemon.stop(signal.SIGKILL)
