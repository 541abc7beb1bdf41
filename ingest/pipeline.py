"""The engine, top to bottom: sources -> normalize -> dedupe -> spans -> sink.

``batch`` and the later modes (backfill, tail) all run through :class:`Pipeline`; they differ only
in which bytes they feed it and when they call :meth:`Pipeline.finish`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from ingest.dedupe import DEFAULT_SETTLE_S, SentIndex, dedupe_and_split
from ingest.normalize import empty_canonical, normalize
from ingest.quarantine import QuarantineWriter
from ingest.sink import DEFAULT_TRACKING_URI, NullSink, Sink, Target, make_sink, resolve_target
from ingest.sources import DEFAULT_CHUNK_BYTES, Chunk, discover, read_chunks
from ingest.spans import BuiltTrace, Redaction, build_traces

DEFAULT_BATCH_TRACES = 200


def tracking_uri_from(flag: str | None) -> str:
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def experiment_from(name: str | None, exp_id: str | None) -> tuple[str | None, str | None]:
    if name or exp_id:
        return name, exp_id
    return os.environ.get("MLFLOW_EXPERIMENT_NAME"), os.environ.get("MLFLOW_EXPERIMENT_ID")


@dataclass
class Summary:
    files: int = 0
    records_read: int = 0
    quarantined: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    duplicates_dropped: int = 0
    calls: int = 0
    traces_written: int = 0
    spans_written: int = 0
    first_start: str | None = None
    last_end: str | None = None
    seconds: float = 0.0
    records_per_second: float = 0.0
    tracking_uri: str | None = None
    experiment_id: str | None = None
    experiment_name: str | None = None
    quarantine_file: str | None = None
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(us: int | None) -> str | None:
    return None if us is None else datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat()


class Pipeline:
    """One engine: feed it chunks, it writes finished calls to the sink and keeps the rest."""

    def __init__(
        self,
        sink: Sink,
        experiment_id: str,
        quarantine: QuarantineWriter,
        redact: Redaction = Redaction(),
        settle_s: float = DEFAULT_SETTLE_S,
        batch_traces: int = DEFAULT_BATCH_TRACES,
        on_written: Callable[[list[BuiltTrace]], None] | None = None,
    ) -> None:
        self.sink = sink
        self.experiment_id = experiment_id
        self.quarantine = quarantine
        self.redact = redact
        self.settle_s = settle_s
        self.batch_traces = batch_traces
        self.on_written = on_written
        self.pending = empty_canonical()
        self.sent = SentIndex()
        self.summary = Summary()
        self._first: int | None = None
        self._last: int | None = None

    def feed(self, chunk: Chunk) -> None:
        self.quarantine.write(chunk.quarantined)
        records, bad = normalize(chunk.lines)
        self.quarantine.write(bad)
        self.summary.records_read += records.height + len(bad) + len(chunk.quarantined)
        self._step(records, final=False)

    def finish(self) -> Summary:
        self._step(empty_canonical(), final=True)
        s = self.summary
        s.quarantined = self.quarantine.total
        s.quarantined_by_reason = dict(self.quarantine.counts)
        s.quarantine_file = str(self.quarantine.path) if self.quarantine.total and self.quarantine.path else None
        s.first_start, s.last_end = _iso(self._first), _iso(self._last)
        return s

    def _step(self, records: pl.DataFrame, final: bool) -> None:
        d = dedupe_and_split(self.pending, records, self.settle_s, final, self.sent)
        self.pending = d.held
        self.summary.duplicates_dropped += d.duplicates
        if d.ready.height:
            self._emit(d.ready)

    def _emit(self, ready: pl.DataFrame) -> None:
        batch: list[BuiltTrace] = []
        for trace in build_traces(ready, self.experiment_id, self.redact):
            batch.append(trace)
            if len(batch) >= self.batch_traces:
                self._write(batch)
                batch = []
        if batch:
            self._write(batch)

    def _write(self, batch: list[BuiltTrace]) -> None:
        spans = self.sink.write(batch)
        s = self.summary
        s.calls += len(batch)
        if not isinstance(self.sink, NullSink):
            s.traces_written += len(batch)
            s.spans_written += spans
        lo = min(t.start_us for t in batch)
        hi = max(t.end_us for t in batch)
        self._first = lo if self._first is None else min(self._first, lo)
        self._last = hi if self._last is None else max(self._last, hi)
        if self.on_written:
            self.on_written(batch)


@dataclass
class BatchOptions:
    paths: list[str]
    tracking_uri: str | None = None
    experiment_name: str | None = None
    experiment_id: str | None = None
    dry_run: bool = False
    quarantine_file: Path | None = None
    redact: Redaction = field(default_factory=Redaction)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    batch_traces: int = DEFAULT_BATCH_TRACES
    settle_s: float = DEFAULT_SETTLE_S
    mlflow_timeout_s: float = 60.0


def open_target(opts: BatchOptions) -> tuple[Target, Sink]:
    uri = tracking_uri_from(opts.tracking_uri)
    name, exp_id = experiment_from(opts.experiment_name, opts.experiment_id)
    if opts.dry_run:
        return Target(uri, exp_id or "dry-run", name), NullSink()
    target = resolve_target(uri, name, exp_id, opts.mlflow_timeout_s)
    return target, make_sink(target, opts.mlflow_timeout_s)


def run_batch(opts: BatchOptions) -> Summary:
    """Ingest every record in ``opts.paths`` once (no state: re-running is harmless, ids are deterministic)."""
    started = time.monotonic()
    files = discover(opts.paths)
    target, sink = open_target(opts)
    pipe = Pipeline(sink, target.experiment_id, QuarantineWriter(opts.quarantine_file), opts.redact, opts.settle_s, opts.batch_traces)
    try:
        for path in files:
            for chunk in read_chunks(path, chunk_bytes=opts.chunk_bytes):
                pipe.feed(chunk)
        summary = pipe.finish()
    finally:
        sink.close()
    summary.files = len(files)
    summary.tracking_uri, summary.experiment_id, summary.experiment_name = target.tracking_uri, target.experiment_id, target.experiment_name
    summary.dry_run = opts.dry_run
    summary.seconds = round(time.monotonic() - started, 3)
    summary.records_per_second = round(summary.records_read / summary.seconds, 1) if summary.seconds else 0.0
    return summary
