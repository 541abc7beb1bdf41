"""Backfill on many cores: the build-and-write end of the pipeline spread over worker processes.

Reading, normalizing and dedupe stay in one process (streaming, bounded, checkpointed as ever);
the calls a step makes final are sharded by their key, so every attempt of a call lands in one
worker, which builds the call's spans as one process would. What a worker then does depends on
the store:

- SQLite takes one writer at a time: workers also derive the rows the bulk writer inserts, and
  this process inserts them, with every rule a write has (conflict merge, rejected-trace isolation);
  it counts as one of the N, so N-1 workers build.
- PostgreSQL: each worker writes its shard over its own connection, in parallel.
- A server: each worker posts its own batches, so N requests are in flight.

A step returns only when every worker acknowledged its part, so checkpoints mean what they mean
with one process, and the output is that of one process, row for row (deterministic ids, the same
builder). Calls that may nest into a client's trace stay in this process, beside the nester.

Workers start once a backfill has made a few hundred calls final: a small one never pays for
starting processes. They ignore the stop signals (this process decides when to stop) and exit when it dies.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from ingest.allocator import tune_collector
from ingest.quarantine import QuarantineRecord
from ingest.scrub import Scrubber
from ingest.sink import NullSink, Sink, StoreSink, Target, make_sink
from ingest.spans import BuiltTrace, Redaction
from ingest.warm import dead, processes, shutdown
from ingest.warm import executor as _executor

LIVENESS_S = 0.5
"""How often a wait for the workers checks that they are all still alive."""
START_AFTER_CALLS = 256
"""Workers start once a backfill has this many calls: a small one never pays for starting processes."""
DERIVE_TASK_CALLS = 100
"""Calls per task when this process writes: small enough that its inserts overlap the workers'
builds, and that what it builds itself at the end of a step keeps no worker waiting long."""
MIN_WRITE_CALLS = 400
"""Calls this process gathers (built by workers or itself) before it writes them, unless the step
has no more: a commit into a big SQLite store costs as much as inserting ~100 traces."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs to build (and write) exactly what this process would."""

    experiment_id: str
    redact: Redaction
    scrub: Scrubber
    batch_traces: int
    target: Target | None = None
    """Where workers write (a database or a server); None: they build, this process writes."""
    deadline_s: float = 300.0
    sql_writer: str = "bulk"
    deriver: tuple[str, str, bool] | None = None
    """The bulk writer's ``RowDeriver`` arguments, when workers derive rows for this process."""
    dry_run: bool = False
    token: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)
    """Names this configuration in the workers, which keep what they made of it (sinks, caches)."""


@dataclass
class Emitted:
    """A worker's account of a part it wrote."""

    calls: int = 0
    traces_written: int = 0
    spans_written: int = 0
    first_us: int | None = None
    last_us: int | None = None
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    calls_joined: int = 0


@dataclass
class Built:
    """A part a worker built for this process to write."""

    traces: list[BuiltTrace]
    quarantined: list[QuarantineRecord]


def pool_for(
    n: int, sink: Sink, target: Target, experiment_id: str, opts: Any, batch_traces: int, warm: list[ProcessPoolExecutor] | None = None
) -> WorkerPool | None:
    """The pool a backfill with ``n`` workers uses for this sink (None for one worker). Into SQLite
    this process is one of the ``n``: it inserts what the other ``n - 1`` build (measured on two
    cores: two builders beside the writer are slower than one, the writer needs its core).
    ``warm``: executors :func:`prestart` started, for the pool to use."""
    if n <= 1:
        return None
    base = dict(
        experiment_id=experiment_id, redact=opts.redact, scrub=opts.scrub, batch_traces=batch_traces, deadline_s=opts.mlflow_timeout_s
    )
    if isinstance(sink, NullSink):
        return WorkerPool(n, WorkerConfig(**base, dry_run=True), warm)
    if isinstance(sink, StoreSink) and sink.store.db_type == "sqlite":
        d = sink.bulk.deriver if sink.bulk is not None else None
        deriver = None if d is None else (d.location, d.artifact_location, d.ascii_only)
        return WorkerPool(n - 1, WorkerConfig(**base, deriver=deriver), warm)
    return WorkerPool(n, WorkerConfig(**base, target=target, sql_writer=opts.sql_writer), warm)


class WorkerPool:
    """N single-process executors, one per shard, so a shard's tasks run in the order given."""

    def __init__(self, n: int, config: WorkerConfig, warm: list[ProcessPoolExecutor] | None = None) -> None:
        self.n = n
        self.config = config
        self._warm = list(warm or [])
        self._shards: list[ProcessPoolExecutor] = []
        self._closed: list[ProcessPoolExecutor] = []
        self.calls_seen = 0

    @property
    def writes(self) -> bool:
        """Workers write themselves (a database other than SQLite, a server, a dry run)."""
        return self.config.target is not None or self.config.dry_run

    def worth(self, ready: pl.DataFrame) -> bool:
        """Whether this step goes to the workers (a step of a call or two is not worth a round trip)."""
        calls = ready["call_key"].n_unique() if ready.height else 0
        self.calls_seen += calls
        return calls >= 2 * self.n and self.calls_seen >= START_AFTER_CALLS

    def write(self, ready: pl.DataFrame) -> list[Future[Emitted]]:
        """Each shard's calls, written by its worker in tasks of one write batch."""
        return [self._submit(i, _write_part, part) for i, part in self._parts(ready, self.config.batch_traces)]

    def build(self, ready: pl.DataFrame, here: Callable[[pl.DataFrame], Built]) -> Iterator[list[tuple[pl.DataFrame, Built]]]:
        """Each shard's calls built (and their rows derived) by its worker, in parts, each yielded
        with the frame it was built from, several at a time: this process writes what is done once
        it has ``MIN_WRITE_CALLS`` or the step has no more. While it waits and a worker has parts
        queued behind the one it is building, this process takes the last one and builds it
        (``here``), so neither side idles, whatever their speeds on this machine."""
        submitted = [(i, self._submit(i, _build_part, part), part) for i, part in self._parts(ready, DERIVE_TASK_CALLS)]
        frames = {f: part for _, f, part in submitted}
        shard_of = {f: i for i, f, _ in submitted}
        pending = list(frames)
        gathered: list[tuple[pl.DataFrame, Built]] = []
        try:
            while pending:
                done = [f for f in pending if f.done()]
                pending = [f for f in pending if f not in done]
                gathered += [(frames[f], result_of(f)) for f in done]
                if gathered and (not pending or sum(len(b.traces) for _, b in gathered) >= MIN_WRITE_CALLS):
                    yield gathered
                    gathered = []
                    continue
                if not done and (stolen := _backlog_taken(pending, shard_of)) is not None:
                    pending.remove(stolen)
                    gathered.append((frames[stolen], here(frames[stolen])))
                    continue
                if pending:
                    self.wait_any(pending)
            if gathered:
                yield gathered
        finally:
            for f in frames:
                f.cancel()

    def wait_any(self, pending: list[Future[Any]]) -> None:
        """Until one of ``pending`` is done; raises WorkerDied as soon as a worker is gone."""
        while not wait(pending, timeout=LIVENESS_S, return_when=FIRST_COMPLETED)[0]:
            if any(dead(ex) for ex in self._shards):
                raise WorkerDied(f"a backfill worker process died ({_exit_of(self._shards)}); run the same command again to continue")

    def result(self, future: Future[Any]) -> Any:
        """``future``'s result, checking on the workers while it is not there (see :meth:`wait_any`)."""
        self.wait_any([future])
        return result_of(future)

    @property
    def started(self) -> int:
        """Worker processes started (0 until a step was worth them)."""
        return len(self._shards) or len(self._closed)

    def close(self, at_once: bool = False) -> None:
        """``at_once``: the workers are killed, not waited for (see :func:`ingest.warm.shutdown`)."""
        shutdown(self._shards, at_once)
        self._closed += self._shards
        self._shards = []
        shutdown(self._warm, at_once)
        self._warm = []

    def _submit(self, shard: int, fn: Any, part: pl.DataFrame) -> Future[Any]:
        if not self._shards:
            self._shards = [self._warm.pop(0) if self._warm else _executor() for _ in range(self.n)]
            shutdown(self._warm)
            self._warm = []
        try:
            return self._shards[shard].submit(fn, self.config, part)
        except BrokenProcessPool as e:
            raise WorkerDied.of(e) from None

    def _parts(self, ready: pl.DataFrame, calls_per_part: int) -> Iterator[tuple[int, pl.DataFrame]]:
        """(shard, frame) in the frame's call order: shard by a hash of the call key, then cut each
        shard into parts of whole calls."""
        keyed = ready.with_columns((pl.col("call_key").hash(seed=14) % self.n).alias("_shard")).with_columns(
            (pl.col("call_key").rank("dense").over("_shard") // calls_per_part).alias("_part")
        )
        for (shard, _), part in keyed.partition_by("_shard", "_part", maintain_order=True, as_dict=True).items():
            yield int(shard), part.drop("_shard", "_part")  # type: ignore[call-overload]


class WorkerDied(RuntimeError):
    """A worker process ended mid-task (killed, out of memory): the step is not acknowledged."""

    @classmethod
    def of(cls, e: BrokenProcessPool) -> WorkerDied:
        return cls(f"a backfill worker process died ({e}); run the same command again to continue")


def _exit_of(executors: list[ProcessPoolExecutor]) -> str:
    codes = [p.exitcode for ex in executors for p in processes(ex) if p.exitcode is not None]
    if codes and codes[0] < 0:
        return f"killed by signal {-codes[0]}"
    return f"exit code {codes[0]}" if codes else "the pool is broken"


def result_of(done: Future[Any]) -> Any:
    try:
        return done.result()
    except BrokenProcessPool as e:
        raise WorkerDied.of(e) from None


def _backlog_taken(pending: list[Future[Any]], shard_of: dict[Future[Any], int]) -> Future[Any] | None:
    """The last pending part queued behind another of its shard, cancelled (None if every worker
    is on its last part, or already took it)."""
    first = {}
    for f in pending:
        first.setdefault(shard_of[f], f)
    return next((f for f in reversed(pending) if first[shard_of[f]] is not f and f.cancel()), None)


_workers: dict[str, _Worker] = {}


class _Worker:
    def __init__(self, config: WorkerConfig) -> None:
        from ingest.pipeline import Pipeline

        self.config = config
        self.deriver = None
        if config.deriver is not None:
            from ingest.sql_bulk import RowDeriver

            self.deriver = RowDeriver(*config.deriver)
        self.pipe: Any = None
        if config.target is not None or config.dry_run:
            sink = NullSink() if config.dry_run or config.target is None else make_sink(config.target, config.deadline_s, config.sql_writer)
            self.quarantine = _Collected()
            self.pipe = Pipeline(
                sink, config.experiment_id, self.quarantine, config.redact, batch_traces=config.batch_traces, scrub=config.scrub
            )  # type: ignore[arg-type]
        tune_collector()


class _Collected:
    """A quarantine writer that keeps its records, for this process to write to the real file."""

    path = None

    def __init__(self) -> None:
        self.records: list[QuarantineRecord] = []

    def write(self, records: list[QuarantineRecord]) -> None:
        self.records.extend(records)

    def take(self) -> list[QuarantineRecord]:
        out, self.records = self.records, []
        return out


def _worker_for(config: WorkerConfig) -> _Worker:
    worker = _workers.get(config.token)
    if worker is None:
        worker = _workers[config.token] = _Worker(config)
    return worker


def _write_part(config: WorkerConfig, part: pl.DataFrame) -> Emitted:
    worker = _worker_for(config)
    assert worker.pipe is not None
    pipe = worker.pipe
    s = pipe.summary
    before = (s.calls, s.traces_written, s.spans_written, s.calls_joined)
    pipe._first = pipe._last = None
    pipe.emit(part)
    counts = (s.calls - before[0], s.traces_written - before[1], s.spans_written - before[2])
    return Emitted(*counts, pipe._first, pipe._last, worker.quarantine.take(), s.calls_joined - before[3])


def _build_part(config: WorkerConfig, part: pl.DataFrame) -> Built:
    """A trace whose rows cannot be derived goes without: this process derives them again as it
    writes, and isolates the failure there exactly as one process would."""
    from ingest.pipeline import built_traces

    worker = _worker_for(config)
    config = worker.config
    quarantined: list[QuarantineRecord] = []
    traces = list(built_traces(part, config.experiment_id, config.redact, config.scrub, quarantined.extend))
    if worker.deriver is not None:
        for i, trace in enumerate(traces):
            with contextlib.suppress(Exception):
                traces[i] = trace.slim(worker.deriver.derive(trace))
    return Built(traces, quarantined)
