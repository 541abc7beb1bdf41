"""The engine, top to bottom: sources -> normalize -> dedupe -> spans -> sink, checkpoints beside.

``batch`` (cron), ``backfill`` and ``tail`` all run through :class:`Pipeline`; they differ only in
which bytes they feed it and how they keep checkpoints. A checkpoint moves only after every call
read up to it was acknowledged by MLflow (or is still held, and then its line is named in the
checkpoint to be read again): a run killed at any moment and run again loses nothing, and the
deterministic ids make the little it re-sends harmless.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from ingest import StopNow
from ingest.allocator import tune_collector
from ingest.buckets import Bucket, days_window, is_bucket_url, mark_horizon
from ingest.callback_traces import LOOK_THREAD, CallbackWatch
from ingest.checkpoints import FORGET_AFTER_S, Checkpoint, State, destination_key, now_iso, state_path
from ingest.dedupe import DEFAULT_SETTLE_S, MAX_ATTEMPTS, Kept, SentIndex, dedupe_and_split, text_bytes
from ingest.ids import mlflow_trace_id, otel_trace_id
from ingest.ledger import Ledger, Unit, drop_nest_queue
from ingest.lognames import stream_of
from ingest.nesting import DEFAULT_GRACE_S, Nester, NestQueue
from ingest.normalize import empty_canonical, error_text, normalize_isolating
from ingest.quarantine import QuarantineRecord, QuarantineUnwritable, QuarantineWriter, Reason, cannot_write, first_line
from ingest.scrub import Scrubber, default_scrubber
from ingest.shard import Shard, edge_head, edge_tail, file_fingerprint
from ingest.sink import (
    DEFAULT_EXPERIMENT_NAME,
    NullSink,
    Sink,
    SinkError,
    Target,
    answered_in_time,
    check_uri,
    make_sink,
    refused_for_its_data,
    resolve_target,
)
from ingest.sources import (
    DEFAULT_CHUNK_BYTES,
    Chunk,
    descriptor_limit,
    discover,
    file_chunks,
    is_database_url,
    own_paths,
)
from ingest.spans import BuiltTrace, Redaction, build_trace, group_calls
from ingest.stores import StoreSetupError, tracking_uri_from
from ingest.warm import for_files, shutdown
from ingest.workers import Built, Emitted, WorkerPool, pool_for

if TYPE_CHECKING:
    from ingest.follow import Followed, Follower

Normalized = tuple[pl.DataFrame, list[QuarantineRecord]]
DEFAULT_BATCH_TRACES = 200
DEFAULT_BATCH_TRACES_SQL = 2000
DEFAULT_PARTIAL_TIMEOUT_S = 300.0
FULL_CALLS_KEPT = 100_000
"""Ids of calls a run remembers in each set that only grows: calls that reached ``MAX_ATTEMPTS``
(their later attempts are quarantined), calls left out of ``--since/--until`` that may come back."""
FUTURE_TOLERANCE_S = 3600.0
"""How far past this machine's clock a call may end and still move the point the others wait from (a
proxy clock somewhat ahead); beyond it, or beyond ``--settle`` if longer, it is counted under the
``end_in_future`` warning and final at once, unless ``hold_ahead`` (a daemon holds it ``--settle``
by the monotonic clock)."""


log = logging.getLogger("litellm-ingest.pipeline")


def experiment_from(name: str | None, exp_id: str | None) -> tuple[str | None, str | None]:
    """The flags, else the environment; an empty variable is no variable (a compose file's ``${VAR}``
    with nothing behind it: an empty id was taken for MLflow's "Default" experiment, 0)."""
    if name or exp_id:
        return name, exp_id
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or None, (os.environ.get("MLFLOW_EXPERIMENT_ID") or "").strip() or None


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class Summary:
    files: int = 0
    files_skipped: int = 0
    files_resumed: int = 0
    files_unchanged: int = 0
    files_other_shards: int = 0
    files_forgotten: int = 0
    objects: int = 0
    objects_read: int = 0
    objects_failed: int = 0
    files_unreadable: int = 0
    bytes_listed: int = 0
    bytes_skipped: int = 0
    """Bytes of the files this run leaves unread: read to their end before, or another shard's. The
    progress leaves them out of what is to read (a resumed run, or shard 1 of 3, ended at a fraction
    of its bar, its ETA as many times too long)."""
    db_rows: int = 0
    records_read: int = 0
    quarantined: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    warnings: int = 0
    warnings_by_kind: dict[str, int] = field(default_factory=dict)
    duplicates_dropped: int = 0
    calls: int = 0
    calls_outside_range: int = 0
    calls_held: int = 0
    calls_other_shards: int = 0
    traces_rewritten: int = 0
    calls_joined: int = 0
    traces_written: int = 0
    spans_written: int = 0
    nested_calls: int = 0
    app_traces_missing: int = 0
    nest_failed: int = 0
    nest_pending: int = 0
    callback_traces: int = 0
    """Traces of LiteLLM's own mlflow callback found among the calls written (up to ``callback_traces.SAMPLE``)."""
    callback_traces_replaced: int = 0
    """With ``--replace-callback-traces``: the callback's traces deleted, their calls' traces ours."""
    workers: int = 0
    bytes_read: int = 0
    first_start: str | None = None
    last_end: str | None = None
    seconds: float = 0.0
    records_per_second: float = 0.0
    tracking_uri: str | None = None
    experiment_id: str | None = None
    experiment_name: str | None = None
    quarantine_file: str | None = None
    state_file: str | None = None
    state_corrupt_copy: str | None = None
    state_replaced: str | None = None
    dry_run: bool = False
    result: str = "ok"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(us: int | None) -> str | None:
    return None if us is None else datetime.fromtimestamp(us / 1e6, tz=UTC).isoformat()


class Pipeline:
    """One engine: feed it chunks; it writes finished calls to the sink and holds the rest."""

    def __init__(
        self,
        sink: Sink,
        experiment_id: str,
        quarantine: QuarantineWriter,
        redact: Redaction = Redaction(),
        settle_s: float = DEFAULT_SETTLE_S,
        batch_traces: int = DEFAULT_BATCH_TRACES,
        since_us: int | None = None,
        until_us: int | None = None,
        scrub: Scrubber | None = None,
        nester: Nester | None = None,
        pool: WorkerPool | None = None,
    ) -> None:
        self.sink = sink
        self.nester = nester
        self.pool = pool
        self.experiment_id = experiment_id
        self.quarantine = quarantine
        self.redact = redact
        self.settle_s = settle_s
        self.batch_traces = batch_traces
        self.since_us = since_us
        self.until_us = until_us
        self.scrub = scrub or default_scrubber()
        self.pending = empty_canonical()
        self.inflight = empty_canonical()
        self.recent = empty_canonical()
        self._pending_kept, self._recent_kept = Kept(), Kept()
        self.recent_failed: set[str] = set()
        self.remember_s = max(600.0, 10 * settle_s)
        self.left_out: set[str] = set()
        self.full_calls: set[str] = set()
        self.sent = SentIndex()
        self.summary = Summary()
        self.clock: Callable[[], int] = now_us
        self.ticks: Callable[[], float] = time.monotonic
        self.hold_ahead = False
        """Hold calls that end past the horizon too (a daemon: it lives to see their wait end)."""
        self._held_since = pl.DataFrame(schema={"call_key": pl.String, "last_end": pl.Int64, "since": pl.Float64})
        self.before_write: Callable[[], None] | None = None
        self.shard: Shard | None = None
        self.only_calls: frozenset[str] | None = None
        self.warnings: dict[str, int] = {}
        self._first: int | None = None
        self._last: int | None = None
        self.callbacks: CallbackWatch | None = None
        """Looks for LiteLLM's own callback writing the same calls into the experiment (:mod:`ingest.callback_traces`)."""

    @classmethod
    def for_run(
        cls,
        sink: Sink,
        target: Target,
        opts: RunOptions,
        quarantine: QuarantineWriter | None = None,
        nest_queue: NestQueue | None = None,
        workers: int = 1,
        warm: list[Any] | None = None,
    ) -> Pipeline:
        """``nest_queue``: where calls wait for their app trace between runs (none: looked up once, at write time).
        ``workers``: processes that build and write big steps (a backfill's ``--workers``)."""
        if quarantine is None and (said := cannot_write(opts.quarantine_file)) is not None:
            raise QuarantineUnwritable(said)
        nester = Nester(sink, nest_queue, opts.nest_grace_s) if opts.nest and not isinstance(sink, NullSink) else None
        batch = opts.batch_traces or (DEFAULT_BATCH_TRACES if target.is_server else DEFAULT_BATCH_TRACES_SQL)
        pipe = cls(
            sink,
            target.experiment_id,
            quarantine or QuarantineWriter(opts.quarantine_file),
            opts.redact,
            opts.settle_s,
            batch,
            opts.since_us,
            opts.until_us,
            opts.scrub,
            nester,
            pool_for(workers, sink, target, target.experiment_id, opts, batch, warm),
        )
        if not isinstance(sink, NullSink):
            pipe.callbacks = CallbackWatch(sink, target, _quick_read(sink, target), opts.replace_callback_traces)
        return pipe

    def normalize(self, chunk: Chunk, warnings: dict[str, int] | None = None) -> Normalized:
        """``warnings``: where this chunk's are counted (a thread normalizing ahead keeps its own,
        so the counts are never raced)."""
        return normalize_isolating(chunk.lines, self.warnings if warnings is None else warnings)

    def feed(self, chunk: Chunk, normalized: Normalized | None = None) -> None:
        """Normalize (unless ``normalized`` already is, see :func:`normalized_ahead`), dedupe and write
        what is final; returns once MLflow acknowledged it."""
        self.quarantine.write(chunk.quarantined)
        records, bad = normalized or self.normalize(chunk)
        self.quarantine.write(bad)
        self.summary.records_read += records.height + len(bad) + len(chunk.quarantined)
        self._step(records, final=False)

    def feed_many(self, chunks: list[Chunk]) -> None:
        """Several chunks (of several files) as one step: one dedupe, one round of writes."""
        if len(chunks) == 1:
            self.feed(chunks[0])
            return
        frames = []
        for chunk in chunks:
            self.quarantine.write(chunk.quarantined)
            self.summary.records_read += len(chunk.quarantined)
            frames.append(chunk.lines)
        merged = Chunk("", pl.concat(frames, how="diagonal") if frames else chunks[0].lines)
        records, bad = normalize_isolating(merged.lines, self.warnings)
        self.quarantine.write(bad)
        self.summary.records_read += records.height + len(bad)
        self._step(records, final=False)

    def feed_context(self, records: pl.DataFrame) -> None:
        """Normalized records of another shard's file (:mod:`ingest.shard`): they complete calls
        that straddle into this shard's files, and are neither counted nor quarantined here."""
        self._step(records, final=False)

    def flush(self, final: bool) -> None:
        """End of input: write held calls that are final by now (all of them with ``final``)."""
        self._step(empty_canonical(), final=final, at=self.clock())

    def restore_recent(self, lines: pl.DataFrame) -> None:
        """Calls written as failed by an earlier run (saved lines): a late retry of one still rewrites it whole."""
        records, bad = normalize_isolating(lines)
        self.quarantine.write(bad)
        self.recent = pl.concat([self.recent, records])
        self.recent_failed = set(self.recent["call_key"].unique().to_list()) if self.recent.height else set()

    def finish(self) -> Summary:
        s = self.summary
        s.calls_held = int(self.pending["call_key"].n_unique()) if self.pending.height else 0
        s.quarantined = self.quarantine.total
        s.quarantined_by_reason = dict(self.quarantine.counts)
        s.quarantine_file = str(self.quarantine.path) if self.quarantine.total and self.quarantine.path else None
        s.warnings, s.warnings_by_kind = sum(self.warnings.values()), dict(self.warnings)
        s.first_start, s.last_end = _iso(self._first), _iso(self._last)
        self.count_nesting()
        return s

    def close_workers(self, at_once: bool = False) -> None:
        if self.pool is not None:
            self.pool.close(at_once)
            self.summary.workers = self.pool.started

    def count_nesting(self) -> None:
        if self.nester is not None:
            c, s = self.nester.counts, self.summary
            s.nested_calls, s.app_traces_missing, s.nest_failed, s.nest_pending = c.nested, c.missing, c.failed, self.nester.pending

    def _step(self, records: pl.DataFrame, final: bool, at: int | None = None) -> None:
        new, resent = self.sent.drop_sent(records)
        excess = None
        if self.full_calls and new.height:
            full = pl.col("call_key").is_in(sorted(self.full_calls))
            excess, new = new.filter(full), new.filter(~full)
        pending = self.pending
        if self.recent.height and new.height:
            late = pl.col("call_key").is_in(new["call_key"].implode())
            pending = pl.concat([pending, self.recent.filter(late)])
        horizon = self.clock() + int(max(self.settle_s, FUTURE_TOLERANCE_S) * 1_000_000)
        if new.height and (ahead := int((new["end_us"] > horizon).sum())):
            self.warnings["end_in_future"] = self.warnings.get("end_in_future", 0) + ahead
        waited = None if at is None else self._held_since.filter(pl.col("since") <= self.ticks() - self.settle_s)
        d = dedupe_and_split(pending, new, self.settle_s, final, None, at, horizon, waited, self.hold_ahead)
        self.pending = self._pending_kept.keep(d.held, text_bytes(new))
        self._note_held(d.held_calls)
        self.summary.duplicates_dropped += d.duplicates + resent
        excess = pl.concat([excess, d.excess]) if excess is not None else d.excess
        self._quarantine_excess(list(self._in_shard(excess, count=False).iter_rows(named=True)) if excess.height else [])
        self._remember_full(d.full)
        ready = self._selected(self._in_shard(d.ready))
        if ready.height:
            self.inflight = ready
            emitted = self._in_range(ready)
            self._delete_before_rewrite(emitted)
            if self._remember_failures(emitted) and self.before_write is not None:
                self.before_write()
            self.emit(emitted)
            self.sent.add(ready)
            self.inflight = self.inflight.clear()

    def _note_held(self, held: pl.DataFrame) -> None:
        """When each held call's wait began, by the monotonic clock: a wall clock stepped back (NTP, a
        VM resumed) while the proxy is quiet held a failure that much longer than ``settle``, and one
        stepped back past the horizon wrote the proxy's failures at once. A call whose last attempt
        changed waits anew from then."""
        joined = held.join(self._held_since, on=["call_key", "last_end"], how="left")
        self._held_since = joined.with_columns(pl.col("since").fill_null(self.ticks()))

    def _remember_full(self, calls: Iterable[str]) -> None:
        if len(self.full_calls) > FULL_CALLS_KEPT:
            self.full_calls.clear()
        self.full_calls.update(calls)

    def _quarantine_excess(self, excess: list[dict[str, Any]]) -> None:
        """Attempts of a call past the ``MAX_ATTEMPTS`` it keeps (read together, or joined to what
        MLflow holds), and every later one this run reads: quarantined (this shard's), the call's
        trace its first attempts."""
        if not excess:
            return
        self._remember_full(r["call_key"] for r in excess)
        detail = f"its call id is on more than {MAX_ATTEMPTS} attempts (an id reused, not retries): its trace is the first {MAX_ATTEMPTS}"
        self.quarantine.write(_quarantined(excess, Reason.TOO_MANY_ATTEMPTS, detail))

    def _delete_before_rewrite(self, ready: pl.DataFrame) -> None:
        """MLflow keeps a trace's first state on a re-send: a call written as failed whose retry or
        fallback succeeded later is deleted first, then written whole (its failed attempts are in
        ``recent``, saved, so a kill between the two loses nothing), unless the sink sets the
        state itself (the bulk writer settles the trace row; a server takes ``StartTraceV3``).
        Any other late attempt is joined by the sink to the spans MLflow holds, with no delete."""
        if not self.recent_failed:
            return
        last = pl.col("status").sort_by("end_us", "start_us").last()
        outcome = ready.group_by("call_key").agg(last.alias("last"))
        recent = sorted(self.recent_failed)
        flipped = outcome.filter((pl.col("last") == "success") & pl.col("call_key").is_in(recent))["call_key"].to_list()
        if flipped:
            if not self.sink.settles:
                self.sink.delete([mlflow_trace_id(otel_trace_id(self.experiment_id, k)) for k in flipped])
            self.summary.traces_rewritten += len(flipped)
            self.summary.calls -= len(flipped)  # counted when written as failed; the write that follows counts them again
            self.recent_failed.difference_update(flipped)

    def _remember_failures(self, ready: pl.DataFrame) -> bool:
        """Keep the rows of calls about to be written as failed for a while: if a retry or fallback of
        one still turns up (later than --settle), the call is rewritten whole, with every attempt span.

        Done before the write (after any delete), and saved by ``before_write``: a process killed
        right after MLflow acknowledged the write still knows. True when what is kept changed."""
        last = pl.col("status").sort_by("end_us", "start_us").last().over("call_key")
        failed = ready.filter(last != "success")
        before = self.recent.height
        recent = self.recent.filter(~pl.col("call_key").is_in(ready["call_key"].implode())) if before else self.recent
        if not failed.height and recent.height == before:
            return False
        recent = pl.concat([recent, failed]) if failed.height else recent
        if recent.height:
            horizon = int(recent["end_us"].max()) - int(self.remember_s * 1_000_000)  # type: ignore[arg-type]
            recent = recent.filter(pl.col("end_us").max().over("call_key") >= horizon)
        self.recent = self._recent_kept.keep(recent, text_bytes(ready) if failed.height else 0)
        self.recent_failed = set(recent["call_key"].unique().to_list()) if recent.height else set()
        return True

    def _in_shard(self, ready: pl.DataFrame, count: bool = True) -> pl.DataFrame:
        """With ``--shard``: a call read from files belongs to the shard of the file holding its
        earliest record; one read from a bucket or a database (every shard reads those whole) to the
        shard its call id hashes to. Dropped before anything else, so a call another shard writes is
        never remembered, deleted or rewritten here."""
        shard = self.shard
        if shard is None or not ready.height:
            return ready
        files = [f for f in ready["file"].unique().to_list() if f and shard.owns(f)]
        read_here = pl.col("file").is_null() | pl.col("file").is_in(files) | pl.col("source").str.contains("://", literal=True)
        first = ready.group_by("call_key").agg(pl.col("file", "source").sort_by("start_us", "file").first(), read_here.any().alias("here"))
        owned = [k for k, f, src, _ in first.iter_rows() if (shard.owns(k) if "://" in (src or "") else not f or shard.owns(f))]
        if count:  # not the calls only another shard's edges hold: read again whenever a file beside them is
            self.summary.calls_other_shards += int(first["here"].sum()) - len(owned)
        return ready if len(owned) == first.height else ready.filter(pl.col("call_key").is_in(owned))

    def _selected(self, ready: pl.DataFrame) -> pl.DataFrame:
        """With ``only_calls``: the others are dropped before anything, as another shard's are."""
        if self.only_calls is None or not ready.height:
            return ready
        return ready.filter(pl.col("call_key").is_in(sorted(self.only_calls)))

    def _in_range(self, ready: pl.DataFrame) -> pl.DataFrame:
        """--since/--until select calls by their first attempt's start, half-open: [since, until).

        A call left out is remembered while a late attempt of it may still come, so that it stays
        out and is counted once: one that started before --since and ended within ``remember_s`` of
        it (as long as a late retry rejoins a call written as failed; read after the call was final,
        that attempt alone starts inside the window, and was written as the call), and one after
        --until whose last attempt failed (its late retry was counted out again)."""
        if self.since_us is None and self.until_us is None:
            return ready
        calls = ready.group_by("call_key").agg(
            pl.col("start_us").min(), pl.col("end_us").max(), last_status=pl.col("status").sort_by("end_us", "start_us").last()
        )
        met = pl.col("call_key").is_in(sorted(self.left_out)) if self.left_out else pl.lit(False)
        early = pl.lit(False) if self.since_us is None else pl.col("start_us") < self.since_us
        late = pl.lit(False) if self.until_us is None else pl.col("start_us") >= self.until_us
        out = calls.filter(met | early | late)
        if not out.height:
            return ready
        self.summary.calls_outside_range += out.filter(~met).height
        may_return = late & (pl.col("last_status") != "success")
        if self.since_us is not None:
            may_return = may_return | (early & (pl.col("end_us") >= self.since_us - int(self.remember_s * 1_000_000)))
        again = out.filter(~met & may_return)["call_key"].to_list()
        if len(self.left_out) + len(again) > FULL_CALLS_KEPT:
            self.left_out.clear()
        self.left_out.update(again)
        return ready.filter(~pl.col("call_key").is_in(out["call_key"].implode()))

    def emit(self, ready: pl.DataFrame) -> None:
        """Build and write final calls; returns once every one is acknowledged, or raises the first
        failure after all settled. With a worker pool, big steps are built (and written) by the
        workers, except calls that may nest into a client's trace, which stay beside the nester."""
        pool = self.pool
        if pool is None or not pool.worth(ready):
            self._send(self._built(ready))
            return
        nests = pl.col("parent_trace_id").is_not_null().any().over("call_key") if self.nester is not None else pl.lit(False)
        here, there = ready.filter(nests), ready.filter(~nests)
        if not pool.writes:
            built_there = self._built_by(pool.build(there, self._build_here))
            self._send_batches(itertools.chain(_batches(self._built(here), self.batch_traces), built_there))
            return
        remote = pool.write(there)
        stop_the_rest = _StopTheRest()
        for future in remote:
            stop_the_rest.watch(future)
        failure: BaseException | None = None
        try:
            self._send(self._built(here))
        except BaseException as e:
            failure = e
            for future in remote:
                future.cancel()
        _settle([(done, lambda done: self._account_emitted(pool.result(done))) for done in remote], failure)

    def _built(self, ready: pl.DataFrame) -> Iterator[BuiltTrace]:
        return built_traces(ready, self.experiment_id, self.redact, self.scrub, self.quarantine.write)

    def _built_by(self, arrivals: Iterable[list[tuple[pl.DataFrame, Built]]]) -> Iterator[list[BuiltTrace]]:
        """The parts that arrived together as one write: this process inserts them while workers
        build the next. A slim trace can be built again here from the part's frame."""
        for parts in arrivals:
            traces: list[BuiltTrace] = []
            for frame, part in parts:
                self.quarantine.write(part.quarantined)
                for trace in part.traces:
                    if not trace.data:
                        trace.restore = functools.partial(self._rebuild, frame, trace.call_key)
                traces += part.traces
            if traces:
                yield traces

    def _build_here(self, part: pl.DataFrame) -> Built:
        quarantined: list[QuarantineRecord] = []
        return Built(list(built_traces(part, self.experiment_id, self.redact, self.scrub, quarantined.extend)), quarantined)

    def _rebuild(self, frame: pl.DataFrame, call_key: str) -> BuiltTrace:
        return build_trace(frame.filter(pl.col("call_key") == call_key).rows(named=True), self.experiment_id, self.redact, self.scrub)

    def _account_emitted(self, part: Emitted) -> None:
        self.quarantine.write(part.quarantined)
        self._count(part.calls, part.traces_written, part.spans_written, part.first_us, part.last_us, part.calls_joined)

    def _send(self, traces: Iterable[BuiltTrace]) -> None:
        self._send_batches(_batches(traces, self.batch_traces))

    def _send_batches(self, batches: Iterable[list[BuiltTrace]]) -> None:
        """Send batches, a few in flight (building the next overlaps sending the last).

        A call whose spans cannot be built, or that the store rejects, is quarantined and the rest
        written: no record can stop the run. Outages still raise (the calls are held for a retry)."""
        sent: list[tuple[Future[Any], Callable[[Future[Any]], None]]] = []
        stop_the_rest = _StopTheRest()
        try:
            for batch in batches:
                if stop_the_rest.failed:
                    break
                future = self.sink.submit(batch)
                stop_the_rest.watch(future)
                sent.append((future, functools.partial(self._account_sent, batch)))
        except StopNow:
            raise
        except BaseException:
            _settle(sent)
            raise
        _settle(sent)

    def _account_sent(self, written: list[BuiltTrace], future: Future[int]) -> None:
        try:
            spans = future.result()
        except SinkError as e:
            if e.kind != "rejected":
                raise
            written, spans = self._write_isolating(written, e)
        self._account(written, spans)
        if self.nester is not None:
            self.nester.after_write(written)

    def _write_isolating(self, batch: list[BuiltTrace], error: SinkError) -> tuple[list[BuiltTrace], int]:
        """A batch the store rejected, written in halves down to the traces it will not take, which are
        quarantined. If it takes none of them, the store (not the data) is the problem, and that
        raises; unless each was refused for what it holds (:func:`~ingest.sink.refused_for_its_data`):
        a batch of nothing but such traces would otherwise stop every run over them. A trace refused
        alone is first checked against the experiment: one deleted, or gone with a store made anew,
        refuses every write, and quarantining them one by one (a quiet proxy's calls) lost them all."""
        written: list[BuiltTrace] = []
        refused: list[tuple[BuiltTrace, SinkError]] = []
        spans = 0

        def attempt(part: list[BuiltTrace], why: SinkError) -> None:
            nonlocal spans
            if len(part) == 1:
                refused.append((part[0], why))
                return
            for half in (part[: len(part) // 2], part[len(part) // 2 :]):
                try:
                    spans += self.sink.write(half)
                    written.extend(half)
                except SinkError as e:
                    if e.kind != "rejected":
                        raise
                    attempt(half, e)

        attempt(batch, error)
        if not written and not all(refused_for_its_data(why) for _, why in refused):
            if problem := self.sink.experiment_problem():
                raise SinkError(problem, kind="refused") from error
            if len(batch) > 1:
                raise error
        for trace, why in refused:
            self.quarantine.write(_quarantined(trace.whole().rows, Reason.UNWRITABLE, f"sink: {why}"))
        return written, spans

    def _account(self, batch: list[BuiltTrace], spans: int) -> None:
        self._quarantine_excess([r for t in batch for r in t.excess])
        if batch:
            written = not isinstance(self.sink, NullSink)
            lo, hi = min(t.start_us for t in batch), max(t.end_us for t in batch)
            joined = sum(t.joined for t in batch)
            self._count(len(batch) - joined, len(batch) if written else 0, spans if written else 0, lo, hi, joined)

    def _count(self, calls: int, traces: int, spans: int, lo: int | None, hi: int | None, joined: int = 0) -> None:
        """``calls``: those first written now; a call joined to what MLflow held of it (``joined``) was
        counted when first written, by this run or an earlier one, as a call rewritten whole was:
        ``traces_written`` counts its write again (a call's attempts in two groups of bucket objects
        of one run were two calls)."""
        s = self.summary
        s.calls, s.traces_written, s.spans_written = s.calls + calls, s.traces_written + traces, s.spans_written + spans
        s.calls_joined += joined
        if lo is not None and hi is not None:
            self._first = lo if self._first is None else min(self._first, lo)
            self._last = hi if self._last is None else max(self._last, hi)
            if traces and self.callbacks is not None:
                self.callbacks.wrote(lo, hi)
                if self.callbacks.replace:  # else a run looks at its end, a daemon after each pass
                    self.look_for_callback_traces()

    def look_for_callback_traces(self, force: bool = False) -> None:
        """LiteLLM's own callback writing these calls into this experiment too (:mod:`ingest.callback_traces`)."""
        if self.callbacks is not None:
            self.callbacks.look(force)
            self.summary.callback_traces = self.callbacks.found
            self.summary.callback_traces_replaced = self.callbacks.replaced


def _quick_read(sink: Sink, target: Target) -> Callable[[Callable[[], Any], str], Any]:
    """A read of MLflow that is tried once and given up after ``--mlflow-timeout`` (30 s at most),
    outside the sink's outage reports: an answer that is only nice to have."""
    limit = min(sink.deadline_s, 30.0)

    def cutoff() -> float | None:
        """A stopping daemon's deadline (:meth:`Sink.give_up_at`), which this read keeps too."""
        return getattr(sink, "cutoff", None)

    return lambda call, what: answered_in_time(call, what, target.shown_uri, limit, cutoff=cutoff, give_up_s=limit, thread=LOOK_THREAD)


def _failed_for_the_store(future: Future[Any]) -> bool:
    """A write that failed for the store's sake (an outage, a lock), not for what its traces hold."""
    if not future.done() or future.cancelled():
        return False
    e = future.exception()
    return e is not None and not (isinstance(e, SinkError) and e.kind == "rejected")


class _StopTheRest:
    """A done-callback: once a write fails for the store's sake, the writes still queued beside it are
    cancelled. Each would wait out the same outage (a locked SQLite store, a server gone) for a whole
    ``--mlflow-timeout`` in turn, and a run past its timeout by that many times. ``failed`` tells the
    sender to build and queue no more."""

    def __init__(self) -> None:
        self.futures: list[Future[Any]] = []
        self.failed = False

    def watch(self, future: Future[Any]) -> None:
        self.futures.append(future)
        future.add_done_callback(self)

    def __call__(self, done: Future[Any]) -> None:
        if _failed_for_the_store(done):
            self.failed = True
            for queued in list(self.futures):
                queued.cancel()


def _batches(traces: Iterable[BuiltTrace], size: int) -> Iterator[list[BuiltTrace]]:
    batch: list[BuiltTrace] = []
    for trace in traces:
        batch.append(trace)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def normalized_ahead(pipe: Pipeline, chunks: Iterable[Chunk]) -> Iterator[tuple[Chunk, Normalized]]:
    """Each chunk with its normalized records, the next one normalized in a thread while the caller
    writes this one. Normalizing is polars (it leaves the GIL), writing is mostly Python building
    spans: on two cores they overlap. Only one chunk is read ahead, and only its reading is ahead of
    the checkpoint, which moves as ever once the caller returns from a chunk."""
    it = iter(chunks)

    def normalize(chunk: Chunk) -> tuple[Normalized, dict[str, int]]:
        warnings: dict[str, int] = {}
        return pipe.normalize(chunk, warnings), warnings

    with ThreadPoolExecutor(1, thread_name_prefix="normalize") as ahead:
        chunk = next(it, None)
        pending = ahead.submit(normalize, chunk) if chunk is not None else None
        while chunk is not None and pending is not None:
            normalized, warnings = pending.result()
            following = next(it, None)
            pending = ahead.submit(normalize, following) if following is not None else None
            for kind, n in warnings.items():
                pipe.warnings[kind] = pipe.warnings.get(kind, 0) + n
            yield chunk, normalized
            chunk = following


def _quarantined(rows: list[dict[str, Any]], reason: Reason, detail: str) -> list[QuarantineRecord]:
    """Every record of a call, each with its own file, line and offset."""
    return [QuarantineRecord.of(r["source"], r["line_no"], r["offset"], reason, detail, r["raw"]) for r in rows]


def built_traces(
    ready: pl.DataFrame, experiment_id: str, redact: Redaction, scrub: Scrubber, quarantine: Callable[[list[QuarantineRecord]], None]
) -> Iterator[BuiltTrace]:
    """Each call's trace; a call whose spans cannot be built is quarantined, never stops the rest."""
    for rows in group_calls(ready):
        try:
            yield build_trace(rows, experiment_id, redact, scrub)
        except Exception as e:
            quarantine(_quarantined(rows, Reason.UNBUILDABLE, f"build: {error_text(e)}"))


@dataclass
class RunOptions:
    paths: list[str]
    tracking_uri: str | None = None
    experiment_name: str | None = None
    experiment_id: str | None = None
    dry_run: bool = False
    quarantine_file: Path | None = None
    redact: Redaction = field(default_factory=Redaction)
    scrub: Scrubber = field(default_factory=default_scrubber)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    batch_traces: int | None = None
    settle_s: float = DEFAULT_SETTLE_S
    mlflow_timeout_s: float = 60.0
    sql_writer: str = "bulk"
    state_dir: Path | None = None
    partial_timeout_s: float = DEFAULT_PARTIAL_TIMEOUT_S
    since_us: int | None = None
    until_us: int | None = None
    nest: bool = True
    nest_grace_s: float = DEFAULT_GRACE_S
    workers: int = 1
    replace_callback_traces: bool = False
    warm: list[Any] | None = None
    """Worker processes the command line started before it loaded MLflow (``warm.for_backfill``):
    the run takes them over."""
    shard: Shard | None = None
    reread_s: float = 3600.0
    """The proxy's database: how far before the newest row start read a cron run reads again (``--reread-window``)."""
    forget_gone_s: float = FORGET_AFTER_S
    """How long a file is gone before its checkpoint is forgotten (``--forget-gone-after``; 0 never)."""
    stop: threading.Event = field(default_factory=threading.Event)
    only_calls: frozenset[str] | None = None
    """Write these calls only (``reconcile --repair``: the ones missing from MLflow)."""

    passed_over: tuple[Path, ...] = ()
    """More files of ours to pass over (a repair writes no quarantine file, but must not read the runs' as logs)."""

    def own(self) -> tuple[Path, ...]:
        """This run's own files, never read as logs: its state dir and quarantine file."""
        return (*own_paths(self.state_dir, self.quarantine_file), *self.passed_over)


def resolve_run_target(opts: RunOptions, *, create: bool, stoppable: bool = False) -> Target:
    """The one place a command's destination is resolved (flags, then ``MLFLOW_*``), so reconcile
    checks exactly where batch, backfill and tail write; only writers may ``create`` the experiment.
    ``stoppable``: a run's first Ctrl-C (``opts.stop``) ends the wait for MLflow, at once."""
    name, exp_id = experiment_from(opts.experiment_name, opts.experiment_id)
    stop = opts.stop if stoppable else None
    target = resolve_target(tracking_uri_from(opts.tracking_uri), name, exp_id, opts.mlflow_timeout_s, create=create, stop=stop)
    if name and exp_id and target.experiment_name != name:
        raise SinkError(
            f"experiment id {exp_id} is {target.experiment_name!r}, not {name!r}: the experiment name and id given "
            "(--experiment-name / MLFLOW_EXPERIMENT_NAME, --experiment-id / MLFLOW_EXPERIMENT_ID) name two experiments; give one",
            kind="rejected",
        )
    return target


def open_target(
    opts: RunOptions, find_timeout_s: float | None = None, *, stateful: bool = False, stoppable: bool = False
) -> tuple[Target, Sink]:
    """The destination and its sink. ``find_timeout_s``: how long finding it and opening its sink may
    retry, when shorter than the sink's ``--mlflow-timeout`` (the daemon probing at start). ``stateful``:
    a dry run that reads a state looks the experiment up, creating nothing, so it reads the state a
    run keeps. ``stoppable``: see :func:`resolve_run_target` (a run's, not the daemon's)."""
    if opts.dry_run:
        name, exp_id = experiment_from(opts.experiment_name, opts.experiment_id)
        check_uri(uri := tracking_uri_from(opts.tracking_uri))
        if stateful:
            try:
                return resolve_run_target(replace(opts, mlflow_timeout_s=0.0), create=False, stoppable=stoppable), NullSink()
            except SinkError as e:  # no store or experiment yet, or MLflow away: read as a first run would
                log.info("dry run: no state of a run read (%s)", e)
        # the experiment a real run would write to, not None: the summary names it
        return Target(uri, exp_id or "dry-run", name or (None if exp_id else DEFAULT_EXPERIMENT_NAME)), NullSink()
    finding = opts if find_timeout_s is None else replace(opts, mlflow_timeout_s=find_timeout_s)
    target = resolve_run_target(finding, create=True, stoppable=stoppable)
    return target, make_sink(target, opts.mlflow_timeout_s, opts.sql_writer, find_timeout_s)


Progress = Callable[[str, Chunk | None, Summary], None]


@dataclass
class Inputs:
    """What the command line named, by kind: local files (discovered), buckets, SpendLogs databases."""

    files: list[Path]
    buckets: list[Bucket]
    databases: list[Any] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)
    """Files this process may not read (permissions): the others are ingested, these named and read next run."""

    @classmethod
    def of(cls, paths: list[str], own: tuple[Path, ...] = ()) -> Inputs:
        """``own``: this run's state dir and quarantine file, never read as logs (:func:`~ingest.sources.is_own`)."""
        local = [p for p in paths if not is_bucket_url(p) and not is_database_url(p)]
        unreadable: list[Path] = []
        databases = [p for p in paths if is_database_url(p)]
        if databases:
            from ingest.spendlogs_db import SpendLogsDB
        return cls(
            discover(local, unreadable, own) if local else [],
            [Bucket.parse(p) for p in paths if is_bucket_url(p)],
            [SpendLogsDB(p) for p in databases],
            unreadable,
        )

    def report_unreadable(self, summary: Summary) -> None:
        self.name_unreadable("the other files are ingested; this one is read once it can be")
        summary.files_unreadable = len(self.unreadable)

    def name_unreadable(self, then: str) -> None:
        """One line on stderr for each file this process may not read or folder it may not list."""
        for path in self.unreadable:
            log.warning("cannot read %s: permission denied (%s)", path, then)

    def check(self) -> None:
        """Reach every bucket and database before anything is written (one clear line if one cannot be)."""
        for b in self.buckets:
            b.check()
        for db in self.databases:
            db.check()


def input_id(spec: str) -> str:
    """How a backfill's state names an input: files by absolute path, URLs as given (passwords hidden)."""
    if is_bucket_url(spec):
        return spec
    if is_database_url(spec):
        from ingest.spendlogs_db import shown_database

        return shown_database(spec)
    return str(Path(spec).resolve())


def remote_units(inputs: Inputs, ledger: Ledger, opts: RunOptions, summary: Summary, mode: str = "batch") -> Iterator[Unit]:
    """The new objects of every bucket, then the new rows of every database, as units to feed.

    A cron run lists only date partitions from a day before the newest one it finished;
    ``--since/--until`` list only the days they cover, and read only the rows that start in them,
    with ``WINDOW_SLACK`` either side (the pipeline selects the calls). With ``--shard`` every
    shard reads them whole (attempts of one call are spread over objects and rows) and writes the
    calls whose id hashes to it."""
    lo, hi = days_window(opts.since_us, opts.until_us)

    def listed(objects: int, new: int, size: int) -> None:
        summary.objects += objects
        summary.bytes_listed += size

    for b in inputs.buckets:
        start = lo
        if mode == "batch" and ledger.meta(b.source, "newest_day") is not None:
            ledger.drop_meta(b.source, "newest_day")  # an older version's mark for the whole bucket, whatever prefix set it
        if mode == "batch" and start is None and (newest := ledger.meta(b.source, b.day_mark)):
            if date.fromisoformat(newest) > mark_horizon():
                ledger.drop_meta(b.source, b.day_mark)
            else:
                start = date.fromisoformat(newest) - timedelta(days=1)
                b.forget_before(ledger, start)
        yield from b.units(ledger, start, hi, opts.chunk_bytes, on_listed=listed)
    for db in inputs.databases:
        from ingest.spendlogs_db import db_units

        yield from db_units(db, ledger, opts.since_us, opts.until_us, timedelta(seconds=opts.reread_s))


def _settle(sent: list[tuple[Future[Any], Callable[[Future[Any]], None]]], failure: BaseException | None = None) -> None:
    """Await every write sent and account for each; then raise the first failure (``failure`` first).
    A second stop signal is not swallowed meanwhile: it raises at once (the step is read again)."""
    for future, account in sent:
        if future.cancelled():
            continue  # not written: the failure that cancelled it raises below, and the calls are held
        try:
            account(future)
        except StopNow:
            raise
        except BaseException as e:
            failure = failure or e
    if failure is not None:
        raise failure


def _mlflow_failed(e: Exception) -> bool:
    """MLflow itself failed the run: a last look would only wait on it again."""
    from mlflow.exceptions import MlflowException

    return isinstance(e, SinkError | StoreSetupError | MlflowException)


def _count(unit: Unit, summary: Summary) -> None:
    if unit.kind == "rows":
        summary.db_rows += unit.items.height if unit.read is None else unit.read
    else:
        summary.objects_read += unit.items.height
        summary.objects_failed += unit.failed
    summary.bytes_read += unit.bytes


def run_batch(opts: RunOptions) -> Summary:
    """Stateless: ingest every record in ``opts.paths`` (re-running is harmless, ids are deterministic)."""
    started = time.monotonic()
    inputs = Inputs.of(opts.paths, opts.own())
    inputs.check()
    target, sink = open_target(opts, stoppable=True)
    tune_collector()
    pipe = Pipeline.for_run(sink, target, opts)
    pipe.only_calls = opts.only_calls
    inputs.report_unreadable(pipe.summary)
    try:
        for group in small_file_groups(inputs.files, opts.chunk_bytes, group_max_files()):
            if len(group) > 1:
                pipe.feed_many([c for path in group for c in _counted(file_chunks(path, opts.chunk_bytes), pipe.summary)])
                if opts.stop.is_set():
                    raise KeyboardInterrupt
                continue
            for chunk, normalized in normalized_ahead(pipe, _counted(file_chunks(group[0], opts.chunk_bytes), pipe.summary)):
                pipe.feed(chunk, normalized)
                if opts.stop.is_set():
                    raise KeyboardInterrupt
        for unit in remote_units(inputs, Ledger(None), opts, pipe.summary, mode="backfill"):
            if unit.chunks:
                pipe.feed_many(unit.chunks)
            _count(unit, pipe.summary)
            if opts.stop.is_set():
                raise KeyboardInterrupt
        pipe.flush(final=True)
        pipe.look_for_callback_traces(force=True)
        summary = pipe.finish()
        summary.result = outcome(summary)
    except StopNow:
        sink.close(at_once=True)
        raise
    finally:
        sink.close()
    return _close(summary, inputs.files, target, opts, started)


def _counted(chunks: Iterator[Chunk], summary: Summary) -> Iterator[Chunk]:
    """A file's chunks, their bytes on disk counted as they are read (a stateful run counts them as
    its checkpoints move)."""
    disk = 0
    for chunk in chunks:
        summary.bytes_read += max(chunk.disk_offset - disk, 0)
        disk = max(disk, chunk.disk_offset)
        yield chunk


def outcome(summary: Summary) -> str:
    """What a finished run says it did, in its summary and the state's ``last_run``."""
    if summary.objects_failed or summary.files_unreadable:
        what = f"{summary.objects_failed} object(s)" if summary.objects_failed else f"{summary.files_unreadable} file(s)"
        return f"incomplete: {what} could not be read (read again next run)"
    return "quarantined" if summary.quarantined else "ok"


def _close(summary: Summary, files: list[Path], target: Target, opts: RunOptions, started: float) -> Summary:
    summary.files = len(files)
    summary.tracking_uri, summary.experiment_id, summary.experiment_name = target.shown_uri, target.experiment_id, target.experiment_name
    summary.dry_run = opts.dry_run
    summary.seconds = round(time.monotonic() - started, 3)
    summary.records_per_second = round(summary.records_read / summary.seconds, 1) if summary.seconds else 0.0
    return summary


def run_incremental(opts: RunOptions, mode: str, progress: Progress | None = None) -> Summary:
    """Ingest only what is new since the last run of this mode into this destination.

    Per file (by fingerprint, :mod:`ingest.follow`): continue after the last acknowledged line,
    after first feeding the lines the last run left unacknowledged. An unterminated last line is
    left for later unless the file is compressed (complete) or has not been written to for
    ``partial_timeout_s`` (then it is quarantined as truncated).
    """
    from ingest.follow import Follower

    started = time.monotonic()
    inputs = Inputs.of(opts.paths, opts.own())
    inputs.check()
    if mode == "batch":
        from ingest.idle import idle_run

        if (idle := idle_run(opts, inputs, started)) is not None:
            return idle
    files = inputs.files
    warm = _prestart(opts, files) if mode == "backfill" else []
    try:
        target, sink = open_target(opts, stateful=True, stoppable=True)
    except BaseException:
        shutdown(warm)
        raise
    tune_collector()
    assert opts.state_dir is not None
    key = destination_key(target.tracking_uri, target.experiment_id)
    if mode == "backfill":
        key |= {"paths": sorted(input_id(p) for p in opts.paths), "since": opts.since_us, "until": opts.until_us}
        if opts.shard is not None:
            key["shard"] = str(opts.shard)
    state = State.load(state_path(opts.state_dir, mode, key), mode, key)
    pipe: Pipeline | None = None
    try:
        with state.read_only() if opts.dry_run else state.locked():
            # the SQLite files beside the state are opened (and a corrupt one set aside) only under its lock
            ledger = Ledger.beside(state.path, enabled=not opts.dry_run)
            queue = NestQueue.beside(state.path) if opts.nest and not opts.dry_run else None
            if not opts.nest and not opts.dry_run:
                drop_nest_queue(state.path)
            pipe = Pipeline.for_run(sink, target, opts, nest_queue=queue, workers=opts.workers if mode == "backfill" else 1, warm=warm)
            pipe.shard = opts.shard
            inputs.report_unreadable(pipe.summary)
            follower = Follower(
                state,
                pipe,
                chunk_bytes=opts.chunk_bytes * (4 if pipe.pool is not None else 1),
                partial_timeout_s=opts.partial_timeout_s,
                dry_run=opts.dry_run,
            )
            state.last_run = {"started": now_iso(), "result": "running", "pid": os.getpid()}
            try:
                if state.bind(target.created_ms):
                    ledger.forget()
                follower.restore()
                follower.save()
                if opts.shard is None:
                    unchanged = follower.unchanged(files)
                    pipe.summary.files_unchanged = len(unchanged)
                    pipe.summary.bytes_skipped = sum(map(size_of, unchanged))
                    groups = small_file_groups([p for p in files if p not in unchanged], follower.chunk_bytes, group_max_files())
                    for group in groups:
                        if len(group) == 1:
                            _ingest_file(group[0], follower, opts, progress)
                        else:
                            _ingest_files(group, follower, opts, progress)
                else:
                    files = _ingest_shard(files, opts.shard, follower, opts, progress)
                for unit in remote_units(inputs, ledger, opts, pipe.summary, mode):
                    _ingest_unit(unit, follower, ledger, opts, progress)
                pipe.flush(final=False)
                if pipe.nester is not None:
                    pipe.nester.poll(force=True)
                pipe.look_for_callback_traces(force=True)
                summary = pipe.finish()
                summary.result = outcome(summary)
                summary.files_forgotten = follower.forget_gone(opts.forget_gone_s)  # after every file this run saw was matched
            except KeyboardInterrupt as e:
                pipe.close_workers(at_once=True)  # a second Ctrl-C stops at once, whatever the workers wait on
                if isinstance(e, StopNow):
                    sink.close(at_once=True)
                elif opts.stop.is_set() and opts.replace_callback_traces:  # Ctrl-C, SIGTERM: the last look, as at an end
                    pipe.look_for_callback_traces(force=True)
                summary = pipe.finish()
                summary.result = "interrupted"
                raise
            except Exception as e:
                if opts.replace_callback_traces and not _mlflow_failed(e):  # what was written before it failed
                    pipe.look_for_callback_traces(force=True)
                summary = pipe.finish()
                summary.result = f"failed: {first_line(e)}"
                raise
            finally:
                pipe.close_workers()
                follower.close()
                ledger.close()
                if queue is not None:
                    queue.close()
                _close(summary, files, target, opts, started)
                summary.state_file = None if opts.dry_run else str(state.path)
                summary.state_corrupt_copy = str(state.corrupt_copy) if state.corrupt_copy else None
                summary.state_replaced = state.replaced
                state.last_run = {
                    "started": state.last_run.get("started"),
                    "finished": now_iso(),
                    "result": summary.result,
                    "summary": summary.as_dict(),
                }
                follower.save()
    finally:
        if pipe is not None:
            pipe.close_workers()
        else:
            shutdown(warm)
        sink.close()
    return summary


def _prestart(opts: RunOptions, files: list[Path]) -> list[Any]:
    """Workers started before the store is opened: the ones the command line started before it
    loaded MLflow, else started now if the files alone are big enough to use them (buckets and
    databases start theirs at the first big step)."""
    if opts.warm is not None:
        warm, opts.warm = opts.warm, None
        return warm
    return for_files(files, opts.workers, opts.dry_run, opts.tracking_uri)


def _ingest_unit(unit: Unit, follower: Follower, ledger: Ledger, opts: RunOptions, progress: Progress | None) -> None:
    """Feed a unit; once it returned (every final call acknowledged, the rest saved as held lines by
    content), its items are marked read: a kill at any moment re-reads at most this unit."""
    pipe = follower.pipeline
    if unit.chunks:
        pipe.feed_many(unit.chunks)
    follower.save()
    ledger.mark(unit.source, unit.items, unit.meta)
    _count(unit, pipe.summary)
    if progress:
        progress(unit.source, None, pipe.summary)
    if opts.stop.is_set():
        raise KeyboardInterrupt


def _ingest_shard(files: list[Path], shard: Shard, follower: Follower, opts: RunOptions, progress: Progress | None) -> list[Path]:
    """This shard's files, each between the edges of its neighbours from other shards (:mod:`ingest.shard`);
    returns this shard's files. A file it read to its end before and untouched since is neither
    fingerprinted nor opened (a compressed one would be decompressed whole to find its end); only this
    shard reads a file, so it is this shard's. Which foreign file followed each of its files is
    kept in that file's checkpoint (``edge``), settled with it (a state of an older version kept
    them all in its document: read once, then dropped)."""
    pipe = follower.pipeline
    window = int(pipe.remember_s * 1_000_000)
    unchanged = follower.unchanged(files)
    pipe.summary.files_unchanged = len(unchanged)
    fps = [None if p in unchanged else file_fingerprint(p) for p in files]
    foreign = [fp is not None and not shard.owns(fp) for fp in fps]
    pipe.summary.bytes_skipped = sum(size_of(p) for p, other in zip(files, foreign, strict=True) if other or p in unchanged)
    legacy: dict[str, str] = follower.state.extra.pop("shard_edges", None) or {}

    prev_in_stream, next_in_stream = _stream_neighbours(files)

    def tails(prevs: list[int]) -> None:
        for j in prevs:
            if (tail := edge_tail(files[j], fps[j], window, opts.chunk_bytes)) is not None:  # type: ignore[arg-type]
                pipe.feed_context(tail)

    def heads(nexts: list[int]) -> None:
        for j in nexts:
            for head in edge_head(files[j], fps[j], window, opts.chunk_bytes):  # type: ignore[arg-type]
                pipe.feed_context(head)

    def rejoin(path: Path, ck: Checkpoint, nexts: list[int], after: str) -> None:
        """Another shard's file now follows ``path`` (the archive grew): a call whose retry starts it
        is this shard's (its earliest record is here), so ``path``'s end is read again with it."""
        if (ck.edge or legacy.get(str(path))) != after and (own := file_fingerprint(path)) is not None:
            if (tail := edge_tail(path, own, window, opts.chunk_bytes)) is not None:
                pipe.feed_context(tail)
            heads(nexts)

    mine = []
    for i, path in enumerate(files):
        if foreign[i]:
            pipe.summary.files_other_shards += 1
            continue
        mine.append(path)
        nexts = [j for j in dict.fromkeys((i + 1, next_in_stream[i])) if j is not None and j < len(files) and foreign[j]]
        prevs = [j for j in dict.fromkeys((i - 1, prev_in_stream[i])) if j is not None and j >= 0 and foreign[j]]
        after = ",".join(fps[j] for j in nexts) or None  # type: ignore[misc]
        ck = unchanged.get(path)
        if ck is None:
            key, read = _ingest_file(path, follower, opts, progress, functools.partial(tails, prevs))
            ck = follower.state.checkpoints.get(key) if key is not None else None
            held = key is not None and pipe.pending.height and pipe.pending.filter(pl.col("file") == key).height
            if ck is not None and after is not None and (read or held):
                heads(nexts)
                ck.edge = after
        if ck is not None and after is not None:
            rejoin(path, ck, nexts, after)
            if ck.edge != after:
                ck.edge = after
    return mine


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _stream_neighbours(files: list[Path]) -> tuple[list[int | None], list[int | None]]:
    """For each file (oldest first), the file before and after it of its own log (``stream_of``, in its
    folder): replicas rotating at about the same time interleave their generations, and a retry that
    starts ``a.jsonl`` continues a call that ends ``a.jsonl.1``, not the other replica's file between them."""
    prev: list[int | None] = [None] * len(files)
    nxt: list[int | None] = [None] * len(files)
    last: dict[tuple[Path, str], int] = {}
    for i, path in enumerate(files):
        stream = (path.parent, stream_of(path.name))
        if (j := last.get(stream)) is not None:
            prev[i], nxt[j] = j, i
        last[stream] = i
    return prev, nxt


GROUP_MAX_FILES = 256
"""Small files read as one step at most (each is held open until the step is acknowledged)."""


def group_max_files() -> int:
    """Small files held open at once by one step: within a quarter of the descriptor limit (raised to
    its ceiling first), whose lack made the files past it count as waiting, exit 0."""
    return max(1, min(GROUP_MAX_FILES, descriptor_limit() // 4))


def small_file_groups(files: list[Path], budget: int, max_files: int = GROUP_MAX_FILES) -> Iterator[list[Path]]:
    """The files in order, consecutive small ones grouped up to ``budget`` bytes (a synced bucket of
    per-call objects is thousands of 15 KB files: one step, one write and one state save each made
    them ~80 ms a file); any other file alone."""
    group: list[Path] = []
    size = 0
    for path in files:
        try:
            n = path.stat().st_size
        except OSError:
            n = budget
        if n > budget // 8:
            if group:
                yield group
                group, size = [], 0
            yield [path]
            continue
        if group and (size + n > budget or len(group) >= max_files):
            yield group
            group, size = [], 0
        group.append(path)
        size += n
    if group:
        yield group


def _ingest_files(paths: list[Path], follower: Follower, opts: RunOptions, progress: Progress | None) -> None:
    """Small files as one step: fed together, then every checkpoint moved and the state saved once
    (what :func:`_ingest_file` does for one file, per chunk). A file that shares a checkpoint with
    one already in the step (the same first line: a copy, or one that continues it) starts the next
    step, so it is read from where the other one left off, as one by one."""
    read: list[tuple[Followed, list[Chunk]]] = []
    try:
        for path in paths:
            f = _identified(follower, path)
            if f is not None and any(f.key == g.key for g, _ in read):
                f.close()
                _feed_files(read, follower, opts, progress)
                read = []
                f = _identified(follower, path)
            if f is None:
                continue
            if not _taken_on(follower, f):
                follower.forget(f.key)
                continue
            read.append((f, list(follower.chunks(f))))
        _feed_files(read, follower, opts, progress)
    finally:
        for f, _ in read:
            follower.forget(f.key)


def _feed_files(read: list[tuple[Followed, list[Chunk]]], follower: Follower, opts: RunOptions, progress: Progress | None) -> None:
    pipe = follower.pipeline
    try:
        if chunks := [c for _, got in read for c in got]:
            pipe.feed_many(chunks)
        for f, got in read:
            disk = 0 if f.compressed else f.ck.offset
            for chunk in got:
                disk = _advanced(follower, f, chunk, disk)
            _stamped(follower, f)
        follower.save()
    finally:
        for f, _ in read:
            follower.forget(f.key)
    if progress and read:
        progress(str(read[-1][0].path), None, pipe.summary)
    if opts.stop.is_set():
        raise KeyboardInterrupt


def _identified(follower: Follower, path: Path) -> Followed | None:
    """``path`` opened and matched to its checkpoint; None (counted as waiting) until it has a first line."""
    f = follower.identify(path)
    if f is None and (e := follower.out_of_descriptors) is not None:
        raise OSError(e.errno, f"{e.strerror} (the descriptor limit, ulimit -n, is too low for this run)", str(path))
    if f is None:
        follower.pipeline.summary.files_skipped += 1
    return f


def _stamped(follower: Follower, f: Followed) -> None:
    """``f`` read as far as it can be now; one whose last line waits for its newline counts as
    waiting, as one with no first line does."""
    follower.stamp(f)
    if not f.compressed and f.ck.offset < f.size():
        follower.pipeline.summary.files_skipped += 1


def _taken_on(follower: Follower, f: Followed) -> bool:
    """``f`` followed (counted as resumed if it has a checkpoint); False for a compressed file read to its end."""
    follower.follow(f)
    if f.ck.offset:
        follower.pipeline.summary.files_resumed += 1
    if follower.is_done(f):
        follower.stamp(f)
        return False
    return True


def _advanced(follower: Follower, f: Followed, chunk: Chunk, disk: int) -> int:
    """``f``'s checkpoint moved past ``chunk``, its bytes on disk counted; the new position on disk."""
    follower.advance(f, chunk)
    follower.pipeline.summary.bytes_read += max(chunk.disk_offset - disk, 0)
    return chunk.disk_offset


def _ingest_file(
    path: Path, follower: Follower, opts: RunOptions, progress: Progress | None, before: Callable[[], None] | None = None
) -> tuple[str | None, bool]:
    """Returns the file's checkpoint key (None: no fingerprint yet) and whether anything new was read;
    ``before`` runs just before its first new chunk is fed."""
    pipe = follower.pipeline
    f = _identified(follower, path)
    if f is None:
        return None, False
    read = False
    try:
        if not _taken_on(follower, f):
            return f.key, False
        disk = 0 if f.compressed else f.ck.offset
        for chunk, normalized in normalized_ahead(pipe, follower.chunks(f)):
            if not read and before is not None:
                before()
            read = True
            pipe.feed(chunk, normalized)
            disk = _advanced(follower, f, chunk, disk)
            follower.save()
            if progress:
                progress(str(path), chunk, pipe.summary)
            if opts.stop.is_set():
                raise KeyboardInterrupt
        _stamped(follower, f)
    finally:
        follower.forget(f.key)
    return f.key, read
