"""Tail: a daemon that follows log files as the proxy writes them (``litellm-ingest tail``).

One watchdog observer for all watched directories (inotify instances are a limited resource;
``--polling`` switches to watchdog's polling observer for NFS and the like) only wakes the loop;
every second the loop also rescans, so a missed event costs at most that. Each file is followed
through an open descriptor keyed by its fingerprint, so a file renamed or deleted by rotation is
still read to its end, a copytruncate is seen (the descriptor's first line changes) and the copy
continues where the original stopped.

Lines are batched by time (``--batch-wait`` after the first change) and size, fed to the same
:class:`~ingest.pipeline.Pipeline` as batch mode, and checkpoints move only after MLflow
acknowledged the batch. While MLflow is down the daemon stops reading ahead, keeps its
checkpoints where they are, retries with backoff, and resumes from the checkpoints when MLflow is
back: a long outage loses nothing and memory stays bounded.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import gzip
import http.server
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from ingest.checkpoints import Checkpoint, State, destination_key, now_iso, state_path
from ingest.fingerprint import fingerprint, fingerprint_of, tail_digest
from ingest.pipeline import Pipeline, RunOptions, open_target
from ingest.quarantine import QuarantineWriter
from ingest.sink import SinkError
from ingest.sources import GZIP_MAGIC, TAIL_BYTES, Chunk, read_chunks, read_lines_at

log = logging.getLogger("litellm-ingest.tail")


@dataclass
class TailOptions(RunOptions):
    pattern: str = "*.jsonl*"
    polling: bool = False
    from_end: bool = False
    rescan_s: float = 1.0
    batch_wait_s: float = 0.25
    max_buffer_bytes: int = 64 * 1024 * 1024
    max_line_bytes: int = 4 * 1024 * 1024
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    shutdown_timeout_s: float = 10.0
    close_after_s: float = 5.0


@dataclass
class Metrics:
    records_read: int = 0
    traces_written: int = 0
    spans_written: int = 0
    quarantined: int = 0
    send_errors: int = 0
    send_retries: int = 0
    buffer_bytes: int = 0
    last_write: float = 0.0
    mlflow_up: bool = True
    lag: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def exposition(self) -> str:
        out = [
            "# TYPE litellm_ingest_records_read_total counter",
            f"litellm_ingest_records_read_total {self.records_read}",
            "# TYPE litellm_ingest_traces_written_total counter",
            f"litellm_ingest_traces_written_total {self.traces_written}",
            "# TYPE litellm_ingest_spans_written_total counter",
            f"litellm_ingest_spans_written_total {self.spans_written}",
            "# TYPE litellm_ingest_quarantined_total counter",
            f"litellm_ingest_quarantined_total {self.quarantined}",
            "# TYPE litellm_ingest_send_errors_total counter",
            f"litellm_ingest_send_errors_total {self.send_errors}",
            "# TYPE litellm_ingest_send_retries_total counter",
            f"litellm_ingest_send_retries_total {self.send_retries}",
            "# TYPE litellm_ingest_buffer_bytes gauge",
            f"litellm_ingest_buffer_bytes {self.buffer_bytes}",
            "# TYPE litellm_ingest_last_successful_write_timestamp_seconds gauge",
            f"litellm_ingest_last_successful_write_timestamp_seconds {self.last_write}",
            "# TYPE litellm_ingest_mlflow_up gauge",
            f"litellm_ingest_mlflow_up {int(self.mlflow_up)}",
            "# TYPE litellm_ingest_file_lag_bytes gauge",
        ]
        for path, lag in sorted(self.lag.items()):
            out.append(f'litellm_ingest_file_lag_bytes{{path="{_escape(path)}"}} {lag}')
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Watched:
    """One followed file: its fingerprint, checkpoint and an open descriptor that survives rotation."""

    def __init__(self, fp: str, ck: Checkpoint, path: Path, fd: int, gz: bool) -> None:
        self.fp, self.ck, self.path, self.fd, self.gz = fp, ck, path, fd, gz
        self.name = str(path)
        self.gone_since: float | None = None
        self.truncated = False

    def reader(self) -> BinaryIO:
        f = os.fdopen(os.dup(self.fd), "rb")
        f.seek(0)
        return gzip.GzipFile(fileobj=f, mode="rb") if self.gz else f  # type: ignore[return-value]

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def first_line_fp(self) -> str | None:
        with self.reader() as f:
            return fingerprint_of(f)

    def same_file(self, st: os.stat_result) -> bool:
        mine = os.fstat(self.fd)
        return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.event.set()


class Tailer:
    def __init__(self, opts: TailOptions, directories: list[Path]) -> None:
        self.opts = opts
        self.dirs = directories
        self.target, self.sink = open_target(opts)
        assert opts.state_dir is not None
        key = destination_key(self.target.tracking_uri, self.target.experiment_id)
        self.state = State.load(state_path(opts.state_dir, "batch", key), "tail", key)
        self.quarantine = QuarantineWriter(opts.quarantine_file)
        self.pipeline = self._new_pipeline()
        self.watched: dict[str, _Watched] = {}
        self.saved: dict[str, Checkpoint] = {}
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.metrics = Metrics()
        self._first_start = not self.state.checkpoints
        self._down_since: float | None = None
        self._last_down_log = 0.0
        self._needs_replay = True

    def _new_pipeline(self) -> Pipeline:
        return Pipeline.for_run(self.sink, self.target, self.opts, self.quarantine)

    # --- lifecycle ------------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        observer = PollingObserver(timeout=self.opts.rescan_s) if self.opts.polling else Observer()
        handler = _Wake(self.wake)
        for d in self.dirs:
            observer.schedule(handler, str(d), recursive=True)
        observer.start()
        server = self._serve_metrics()
        log.info("following %s (pattern %s) -> %s experiment %s", ", ".join(map(str, self.dirs)), self.opts.pattern,
                 self.target.tracking_uri, self.target.experiment_id)  # fmt: skip
        try:
            with self.state.locked():
                self.state.last_run = {"started": now_iso(), "result": "running", "pid": os.getpid(), "mode": "tail"}
                self.state.save()
                while not self.stopping.is_set():
                    self._iteration()
                    self.wake.wait(self.opts.rescan_s)
                    if self.wake.is_set() and not self.stopping.is_set():
                        time.sleep(self.opts.batch_wait_s)
                    self.wake.clear()
                self._shutdown()
        finally:
            observer.stop()
            observer.join(timeout=5)
            if server is not None:
                server.shutdown()
            for w in self.watched.values():
                w.close()
            self.sink.close()

    def _shutdown(self) -> None:
        """Flush what is read (bounded by the shutdown timeout), save checkpoints, and stop."""
        deadline = time.monotonic() + self.opts.shutdown_timeout_s
        self.sink.deadline_s = max(1.0, self.opts.shutdown_timeout_s)  # type: ignore[attr-defined]
        try:
            if self._needs_replay:
                self._replay_held()
            self._read_and_send(deadline)
            self.pipeline.flush(final=False)
            self._save()
        except SinkError as e:
            log.warning("MLflow unavailable at shutdown (%s); checkpoints stay at the last acknowledged line", e)
        self.state.last_run = {**self.state.last_run, "finished": now_iso(), "result": "stopped"}
        self.state.save()
        log.info("stopped")

    def _iteration(self) -> None:
        try:
            self._scan()
            if self._needs_replay:
                self._replay_held()
            self._read_and_send(None)
            self._close_idle()
            if self._down_since is not None:
                log.warning("MLflow is back after %.0fs; resumed", time.time() - self._down_since)
                self._down_since = None
            self.metrics.mlflow_up = True
        except SinkError as e:
            self._outage(e)

    def _outage(self, e: SinkError) -> None:
        """Keep checkpoints, forget what is in memory, wait, and start again from the checkpoints."""
        self.metrics.send_errors += 1
        self.metrics.mlflow_up = False
        now = time.time()
        if self._down_since is None:
            self._down_since = now
            self._last_down_log = now
            log.warning("MLflow unavailable (%s); holding checkpoints and retrying", e)
        elif now - self._last_down_log >= 60:
            self._last_down_log = now
            log.warning("MLflow still unavailable after %.0fs (%s)", now - self._down_since, e)
        for fp, w in self.watched.items():
            if fp in self.saved:
                w.ck = copy.deepcopy(self.saved[fp])
                self.state.checkpoints[fp] = w.ck
        self.pipeline = self._new_pipeline()
        self._needs_replay = True
        self.metrics.send_retries += 1
        self.metrics.buffer_bytes = 0
        delay = min(30.0, 1.0 * 2 ** min(self.metrics.send_retries, 5))
        self.stopping.wait(delay)

    # --- files ----------------------------------------------------------------------------------

    def _candidates(self) -> Iterator[Path]:
        for d in self.dirs:
            for root, _, names in os.walk(d):
                for name in sorted(names):
                    if fnmatch.fnmatch(name, self.opts.pattern):
                        yield Path(root) / name

    def _scan(self) -> None:
        """Match the files on disk to the followed ones: by inode first, then by fingerprint."""
        seen: set[str] = set()
        for path in self._candidates():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            current = next((w for w in self.watched.values() if not w.truncated and w.same_file(st)), None)
            if current is not None:
                now_fp = current.first_line_fp() if not current.gz else current.fp
                if current.gz or (now_fp in (current.fp, None) and st.st_size >= current.ck.offset):
                    seen.add(current.fp)
                    if current.path != path:
                        log.info("rotated: %s -> %s", current.path, path)
                        current.path = path
                    continue
                log.info("%s was truncated or rewritten in place", path)
                current.truncated = True
                current.gone_since = current.gone_since or time.monotonic()
            fp = fingerprint(path)
            if fp is None:
                continue
            w = self.watched.get(fp)
            if w is None:
                self._open(fp, path)
                seen.add(fp)
            elif w.truncated or w.first_line_fp() != fp:
                log.info("copytruncate: %s continues in %s at byte %d", w.name, path, w.ck.offset)
                self._reopen(w, path)
                seen.add(fp)
        for fp, w in self.watched.items():
            if fp not in seen and w.gone_since is None:
                w.gone_since = time.monotonic()
                log.info("%s was rotated away or deleted; reading it to its end", w.name)

    def _open(self, fp: str, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        gz = os.pread(fd, 2, 0) == GZIP_MAGIC
        ck = self.state.checkpoints.get(fp)
        if ck is None:
            ck = Checkpoint(fp, str(path.resolve()))
            if self._first_start and self.opts.from_end and not gz:
                ck.offset, ck.line = _last_newline(fd), 1
        ck.path = str(path.resolve())
        self.state.checkpoints[fp] = ck
        self.saved[fp] = copy.deepcopy(ck)
        w = _Watched(fp, ck, path, fd, gz)
        self.watched[fp] = w
        if ck.held:
            self._needs_replay = True
        log.info("following %s from byte %d", path, ck.offset)

    def _reopen(self, w: _Watched, path: Path) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            w.close()
            w.fd, w.path, w.gone_since, w.truncated = fd, path, None, False
            w.gz = os.pread(fd, 2, 0) == GZIP_MAGIC

    def _close_idle(self) -> None:
        for fp in list(self.watched):
            w = self.watched[fp]
            if w.gone_since is not None and time.monotonic() - w.gone_since >= self.opts.close_after_s and not w.ck.held:
                size = w.size() if not w.gz and not w.truncated else None
                if size is None or w.ck.offset >= size:
                    log.info("closed %s (rotated away, read to its end)", w.name)
                    w.close()
                    del self.watched[fp]
                    self.metrics.lag.pop(str(w.path), None)

    # --- reading and sending --------------------------------------------------------------------

    def _replay_held(self) -> None:
        """Lines of calls held back (by an earlier run, or before an outage) are read again first."""
        chunks = []
        for w in self.watched.values():
            if w.ck.held:
                with w.reader() as f:
                    chunks.append(read_lines_at(Path(w.name), w.ck.held, fileobj=f))
        self._needs_replay = False
        if chunks:
            self.pipeline.feed_many(chunks)

    def _read_and_send(self, deadline: float | None) -> None:
        """Read what is new in every file (up to the buffer cap), send it, then move checkpoints."""
        batch: list[tuple[_Watched, Chunk]] = []
        buffered = 0
        for w in list(self.watched.values()):
            if w.truncated:
                continue
            quiet = time.time() - os.fstat(w.fd).st_mtime > self.opts.partial_timeout_s
            start = w.ck.offset
            with w.reader() as f:
                for chunk in read_chunks(
                    Path(w.name), w.ck.offset, max(w.ck.line, 1), max_line_bytes=self.opts.max_line_bytes, final=w.gz or quiet, fileobj=f
                ):
                    batch.append((w, chunk))
                    buffered += chunk.end_offset - start
                    start = chunk.end_offset
                    if buffered >= self.opts.max_buffer_bytes:
                        break
            if buffered >= self.opts.max_buffer_bytes or (deadline is not None and time.monotonic() > deadline):
                break
        self.metrics.buffer_bytes = buffered
        if batch:
            before = self.pipeline.summary.traces_written, self.pipeline.summary.spans_written
            self.pipeline.feed_many([c for _, c in batch])
            self.pipeline.flush(final=False)
            s = self.pipeline.summary
            self.metrics.traces_written += s.traces_written - before[0]
            self.metrics.spans_written += s.spans_written - before[1]
            self.metrics.records_read = s.records_read
            self.metrics.quarantined = self.quarantine.total
            for w, chunk in batch:
                w.ck.offset, w.ck.line = chunk.end_offset, chunk.end_line
                if len(chunk.tail) >= min(TAIL_BYTES, chunk.end_offset) > 0:
                    w.ck.tail = tail_digest(chunk.tail)
            if s.traces_written > before[0]:
                self.metrics.last_write = time.time()
        else:
            self.pipeline.flush(final=False)
        self._save()
        self.metrics.buffer_bytes = 0

    def _save(self) -> None:
        stamp = now_iso()
        for fp, w in self.watched.items():
            w.ck.held = self.pipeline.held_positions({w.name})
            w.ck.updated_at = stamp
            if not w.gz:
                w.ck.size = w.size()
                self.metrics.lag[str(w.path)] = max(w.ck.size - w.ck.offset, 0)
            self.saved[fp] = copy.deepcopy(w.ck)
        self.state.last_run = {**self.state.last_run, "updated": stamp, "summary": self.pipeline.summary.as_dict()}
        self.state.save()

    # --- metrics ----------------------------------------------------------------------------------

    def _serve_metrics(self) -> http.server.ThreadingHTTPServer | None:
        if self.opts.metrics_port is None:
            return None
        tailer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, ctype, code = tailer.metrics.exposition().encode(), "text/plain; version=0.0.4", 200
                elif self.path.startswith("/health"):
                    m = tailer.metrics
                    doc = {"status": "ok" if m.mlflow_up else "mlflow_unavailable", "files": len(tailer.watched),
                           "traces_written": m.traces_written, "last_write": m.last_write}  # fmt: skip
                    body, ctype, code = json.dumps(doc).encode(), "application/json", 200 if m.mlflow_up else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer((self.opts.metrics_host, self.opts.metrics_port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
        log.info("metrics on http://%s:%d/metrics", self.opts.metrics_host, server.server_address[1])
        return server


def _last_newline(fd: int) -> int:
    """Offset just after the last newline (``--from-end`` skips whole lines only)."""
    size = os.fstat(fd).st_size
    pos = size
    while pos > 0:
        start = max(0, pos - 65536)
        block = os.pread(fd, pos - start, start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        pos = start
    return 0


def run_tail(opts: TailOptions, directories: list[Path]) -> None:
    tailer = Tailer(opts, directories)
    signal.signal(signal.SIGTERM, tailer.stop)
    signal.signal(signal.SIGINT, tailer.stop)
    tailer.run()
