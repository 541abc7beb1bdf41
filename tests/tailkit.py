"""Test kit for the tail daemon: a real daemon process, a real writer thread, real rotations."""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import requests

from tests.conftest import all_traces, free_port, reidentify

EXE = shutil.which("litellm-ingest") or str(Path(sys.executable).parent / "litellm-ingest")


def fresh_calls(capture: list[dict], copies: int = 1, shift_to_now: bool = True) -> list[list[dict]]:
    """Whole calls (attempts together) of the capture with fresh ids, times moved to just now."""
    out: list[list[dict]] = []
    base_end = max(r["endTime"] for r in capture)
    for _ in range(copies):
        shift = (time.time() - base_end - 1) if shift_to_now else 0.0
        recs = reidentify(capture, shift_s=shift, salt=uuid.uuid4().hex[:8])
        calls: dict[str, list[dict]] = {}
        for r in recs:
            calls.setdefault(r["litellm_call_id"], []).append(r)
        out += list(calls.values())
    return out


def spans_of(calls: list[list[dict]]) -> int:
    return sum(1 if len(c) == 1 else len(c) + 1 for c in calls)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics: {text}")


def assert_sent_once(d: Daemon, sent: Callable[[], int], calls: list[list[dict]]) -> None:
    """The daemon read each line of ``calls`` once and sent each span once, but for the attempts
    it wrote again on purpose: a failure read before its fallback's line was written, with the
    writer's time past ``--settle``, is written as failed, then written whole with its state set; an
    attempt read after its call was written is joined to it, the call's spans sent again.

    ``sent`` counts the spans MLflow took in since before this daemon started; read after it stopped,
    so anything it sent after its last pass counts too."""
    lines = sum(len(c) for c in calls)
    wait_for(lambda: metric(d.metrics(), "litellm_ingest_records_read_total") >= lines, 30, f"{lines} lines read")
    m = d.metrics()
    assert d.stop() == 0
    assert metric(m, "litellm_ingest_records_read_total") == lines, "no line read twice"
    counted = int(metric(m, "litellm_ingest_spans_written_total"))
    assert sent() == counted, "MLflow took in exactly the spans the daemon counted as sent"
    redone = int(metric(m, "litellm_ingest_traces_rewritten_total") + metric(m, "litellm_ingest_calls_joined_total"))
    retried = [c for c in calls if len(c) > 1]
    assert redone <= len(retried), "only calls of several attempts are written again"
    most = max((spans_of([c]) - 1 for c in retried), default=0)
    assert redone <= counted - spans_of(calls) <= redone * most, "nothing sent twice but what was written again"


class Daemon:
    """`litellm-ingest tail` as a real process."""

    def __init__(
        self, logdir: Path, uri: str, experiment: str, state_dir: Path, *extra: str, fd_limit: int | None = None, wrap: tuple[str, ...] = ()
    ) -> None:
        """``fd_limit``: the process's descriptor limit; ``wrap``: a command it runs under (``setpriv …``)."""
        self.logdir, self.uri, self.experiment, self.state_dir, self.extra = logdir, uri, experiment, state_dir, extra
        self.fd_limit, self.wrap = fd_limit, wrap
        self.proc: subprocess.Popen | None = None
        self.metrics_port = free_port()
        self.log = state_dir.parent / f"tail-{uuid.uuid4().hex[:6]}.log"

    def start(self, ready: bool = True) -> Daemon:
        """Start it; ``ready``: wait until ``/health`` is past "starting" (it is not while finding MLflow)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        args = [
            *self.wrap, EXE, "tail", str(self.logdir), "--tracking-uri", self.uri, "--experiment-name", self.experiment,
            "--state-dir", str(self.state_dir), "--batch-wait", "0.1", "--settle", "3", "--partial-timeout", "3",
            "--metrics-port", str(self.metrics_port), "--mlflow-timeout", "5", *self.extra,
        ]  # fmt: skip
        limit = self.fd_limit

        def limited() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),  # noqa: SIM115
            env=env,
            start_new_session=True,
            preexec_fn=limited,
        )
        if not ready:
            return self
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if requests.get(f"http://127.0.0.1:{self.metrics_port}/health", timeout=1).json()["status"] != "starting":
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError("tail daemon did not come up: " + self.log.read_text())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text


class Writer:
    """Appends whole lines like the proxy's logger does; rotation takes the same lock (no line tears)."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.lock = threading.Lock()
        self.written: list[list[dict]] = []

    def write_calls(self, calls: list[list[dict]], pause_s: float = 0.0) -> None:
        for call in calls:
            with self.lock, self.log.open("a") as f:
                for r in call:
                    f.write(json.dumps(r) + "\n")
            self.written.append(call)
            if pause_s:
                time.sleep(pause_s)

    def in_thread(self, calls: list[list[dict]], pause_s: float) -> threading.Thread:
        t = threading.Thread(target=self.write_calls, args=(calls, pause_s), daemon=True)
        t.start()
        return t


def rotate(log: Path, how: str, naming: str, keep: str, n: int = 1) -> Path | None:
    """logrotate's moves: rename+create or copytruncate; numbered or timestamped; kept, gzipped or deleted.

    Deleted means: right away after a rename (the daemon still holds the file open), but for
    copytruncate only at the next rotation (logrotate's ``rotate 1``): a copy deleted the moment it
    is made takes the lines nobody read yet with it, for any reader.
    """
    suffix = f".{n}" if naming == "numbered" else time.strftime("-%Y%m%dT%H%M%S") + f"{n}"
    rotated = log.with_name(log.name + suffix)
    if how == "copytruncate":
        shutil.copyfile(log, rotated)
        with log.open("r+") as f:
            f.truncate(0)
    else:
        log.rename(rotated)
        log.touch()
    if keep == "gzipped":
        with rotated.open("rb") as src, gzip.open(rotated.with_name(rotated.name + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        rotated.unlink()
        return None
    if keep == "deleted":
        if how == "copytruncate":
            return rotated
        rotated.unlink()
    return None


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def call_ids_in(uri: str, experiment: str) -> list[str]:
    try:
        return [t.info.tags["litellm.call_id"] for t in all_traces(uri, experiment)]
    except AssertionError:
        return []


def wait_for_calls(uri: str, experiment: str, calls: list[list[dict]], timeout: float = 60) -> list:
    """Every call's trace, once each has all its spans (a call split across two of the daemon's
    batches is visible before its last attempt's span arrives), or what is there at the timeout."""
    want = {c[0]["litellm_call_id"] for c in calls}
    deadline = time.monotonic() + timeout
    wait_for(lambda: want <= set(call_ids_in(uri, experiment)), timeout, f"{len(want)} calls in MLflow")
    while True:
        time.sleep(0.5)
        traces = all_traces(uri, experiment)
        if sum(len(t.data.spans) for t in traces) >= spans_of(calls) or time.monotonic() > deadline:
            return traces


class Opens:
    """Counts the opens of each file in a folder, by inotify (as any process sees them): what a daemon
    reads while nothing changes shows here."""

    def __init__(self, folder: Path) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        self.counts: Counter[str] = Counter()
        counts = self.counts

        class Handler(FileSystemEventHandler):
            def on_opened(self, event: FileSystemEvent) -> None:
                counts[os.path.basename(str(event.src_path))] += 1

        self.observer = Observer()
        self.observer.schedule(Handler(), str(folder))

    def __enter__(self) -> Opens:
        self.observer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)

    def since(self, before: Counter[str]) -> Counter[str]:
        return self.counts - before
