"""Nest: a call's spans under the client application's own MLflow trace, when it has one.

An app traced with ``mlflow.openai.autolog()`` sends a W3C ``traceparent`` with every request, and
the proxy logs it (``normalize`` reads it into ``parent_trace_id``/``parent_span_id``). Once a
call's standalone trace is acknowledged, its app trace is looked up (one query per write batch, in
any experiment); if it is there, the call's proxy span and attempt spans are written into it. If
not yet (the app exports asynchronously), the call waits in a queue beside the state until
``grace`` after it ended, looked up again at every poll, and then stays standalone only (counted).

What MLflow does with spans sent for a trace it holds, and the rule each fact sets here:

- A trace is written into only when it is finished (OK or ERROR) and its spans are in the tracking
  store: ``IN_PROGRESS`` means the app has not exported it yet, and ``log_spans`` marks the trace's
  spans as being in the tracking store, which would hide spans kept anywhere else. MLflow's client
  exports a trace's spans first and its finalized info (usage, cost) a moment later: within the
  grace a call waits for that too, so the attempts' attributes do not depend on when we looked.
- A root span sets the trace's state and previews, and session, user and ``mlflow.traceTag.*``
  attributes set its metadata and tags: nested spans are never roots and carry none of those.
- MLflow recomputes a trace's token usage and cost from its spans unless the app finalized them, and
  prices any span that has usage and a model but no cost: attempts carry MLflow's usage and cost
  attributes only where the app trace has finalized both, and otherwise the same values as
  ``litellm.token_usage`` and ``litellm.cost``.
- A span outside the trace's time window would stretch a trace the app did not finalize: a proxy
  clock that disagrees with the app's is corrected into the window (1 ms of slack either side).
- Spans sent for a trace id that does not exist create a trace, stuck ``IN_PROGRESS``. An app trace
  deleted between the lookup and the write is recreated that way, so every write is followed by a
  second lookup, and a trace found ``IN_PROGRESS`` then is such an orphan and deleted.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ingest.ledger import NEST_QUEUE_SUFFIX, state_db
from ingest.mlflow_names import SPANS_IN_TRACKING_STORE, SpanAttributeKey, TraceMetadataKey, TraceTagKey
from ingest.sink import LOOKUP_CHUNK, Sink, SinkError, looked_up
from ingest.spans import BuiltTrace, SpanData, nested_spans

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 60.0
WRITE_CHUNK = 500
"""Calls per write: large enough that a batch is one request, small enough for any server."""
WINDOW_SLACK_US = 1000
FINISHED = frozenset({"OK", "ERROR"})
USAGE_FALLBACK = {SpanAttributeKey.CHAT_USAGE: "litellm.token_usage", SpanAttributeKey.LLM_COST: "litellm.cost"}


@dataclass(frozen=True)
class AppTrace:
    """What nesting needs to know of the app's trace."""

    trace_id: str
    experiment_id: str
    start_us: int
    end_us: int
    finalized: bool
    """MLflow's client has written the trace's final info (it does so after the spans)."""
    totals_final: bool
    """The app finalized its token usage and cost: MLflow will not recompute them from our spans."""

    @classmethod
    def of(cls, info: Any) -> AppTrace | None:
        """From MLflow's TraceInfo; None for a trace that must not be written into (yet)."""
        state = getattr(info.state, "value", str(info.state))
        if state not in FINISHED or info.tags.get(TraceTagKey.SPANS_LOCATION) != SPANS_IN_TRACKING_STORE:
            return None
        finalized = info.trace_metadata.get(TraceMetadataKey.TRACE_INFO_FINALIZED) == "true"
        start_ms = int(info.request_time)
        return cls(
            info.trace_id,
            info.experiment_id,
            start_ms * 1000,
            (start_ms + int(info.execution_duration or 0)) * 1000,
            finalized,
            finalized and bool(info.token_usage) and bool(getattr(info, "cost", None)),
        )


def fit(spans: list[SpanData], app: AppTrace) -> list[SpanData]:
    """The nested spans as they go into this app trace: inside its time window, usage and cost
    under MLflow's keys only where the app finalized its own."""
    lo, hi = app.start_us - WINDOW_SLACK_US, app.end_us + WINDOW_SLACK_US

    def clamp(us: int) -> int:
        return min(max(us, lo), hi)

    renames = {} if app.totals_final else USAGE_FALLBACK
    out = []
    for s in spans:
        attrs = {renames.get(k, k): v for k, v in s.attributes.items()} if renames else s.attributes
        events = [(name, min(max(t, lo * 1000), hi * 1000), a) for name, t, a in s.events]
        out.append(replace(s, start_us=clamp(s.start_us), end_us=clamp(s.end_us), attributes=attrs, events=events))
    return out


def span_to_json(s: SpanData) -> dict[str, Any]:
    return {
        "trace": s.trace_id.hex(),
        "span": s.span_id.hex(),
        "parent": s.parent_id.hex() if s.parent_id else None,
        "name": s.name,
        "start": s.start_us,
        "end": s.end_us,
        "attributes": s.attributes,
        "events": s.events,
        "error": s.error,
    }


def span_from_json(d: dict[str, Any]) -> SpanData:
    return SpanData(
        bytes.fromhex(d["trace"]),
        bytes.fromhex(d["span"]),
        bytes.fromhex(d["parent"]) if d["parent"] else None,
        d["name"],
        d["start"],
        d["end"],
        d["attributes"],
        [(name, t, a) for name, t, a in d["events"]],
        d["error"],
    )


class NestQueue:
    """Calls waiting for their app trace, in a SQLite file beside the state: a daemon restarted (or
    the next cron run) goes on waiting where the last one stopped, until each call's due time.

    A call is known here by its standalone trace id (column ``call_key``, named before this rule),
    never by its call id, which a client may set to its key: the file keeps nothing the traces
    would not show. A queue written before holds call ids until their grace is over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = state_db(
            path,
            "CREATE TABLE IF NOT EXISTS pending (app_trace TEXT NOT NULL, call_key TEXT NOT NULL, due_us INTEGER NOT NULL, "
            "spans TEXT NOT NULL, PRIMARY KEY (app_trace, call_key)) WITHOUT ROWID",
        )
        self.size = self._count()

    @classmethod
    def beside(cls, state_path: Path) -> NestQueue:
        return cls(state_path.with_suffix(NEST_QUEUE_SUFFIX))

    def _count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM pending").fetchone()[0])

    def put(self, entries: list[tuple[str, str, int, list[SpanData]]]) -> None:
        if not entries:
            return
        rows = [(a, c, due, json.dumps([span_to_json(s) for s in spans], default=str)) for a, c, due, spans in entries]
        with self._db:
            self._db.executemany(
                "INSERT INTO pending (app_trace, call_key, due_us, spans) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (app_trace, call_key) DO UPDATE SET due_us = excluded.due_us, spans = excluded.spans",
                rows,
            )
        self.size = self._count()

    def app_traces(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT app_trace FROM pending ORDER BY app_trace")]

    def entries(self, app_traces: list[str]) -> list[tuple[str, str, int, list[SpanData]]]:
        """(app trace, call key, due time, spans) of the calls waiting for these app traces."""
        out: list[tuple[str, str, int, list[SpanData]]] = []
        for i in range(0, len(app_traces), LOOKUP_CHUNK):
            part = app_traces[i : i + LOOKUP_CHUNK]
            rows = self._db.execute(
                f"SELECT app_trace, call_key, due_us, spans FROM pending WHERE app_trace IN ({','.join('?' * len(part))})", part
            ).fetchall()
            out += [(a, c, due, [span_from_json(d) for d in json.loads(text)]) for a, c, due, text in rows]
        return out

    def remove(self, keys: Iterable[tuple[str, str]]) -> None:
        keys = list(keys)
        if not keys:
            return
        with self._db:
            self._db.executemany("DELETE FROM pending WHERE app_trace = ? AND call_key = ?", list(keys))
        self.size = self._count()

    def expire(self, now_us: int) -> int:
        """Forget the calls whose wait is over; how many."""
        with self._db:
            n = self._db.execute("DELETE FROM pending WHERE due_us <= ?", (now_us,)).rowcount
        self.size = self._count()
        return n

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class Waiting:
    """A call's nested spans and the app trace they go into."""

    app_trace: str
    call: str
    """The call's standalone trace id: a hash of its call id, which may be a key."""
    due_us: int
    spans: list[SpanData]


@dataclass
class NestCounts:
    nested: int = 0
    missing: int = 0
    failed: int = 0


class Nester:
    """Puts each written call into its app trace, now or once the app trace arrives (see the module)."""

    def __init__(
        self,
        sink: Sink,
        queue: NestQueue | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], int] = lambda: time.time_ns() // 1000,
        poll_s: float = 2.0,
    ) -> None:
        self.sink = sink
        self.queue = queue
        self.grace_us = int(grace_s * 1_000_000)
        self.clock = clock
        self.poll_s = poll_s
        self.counts = NestCounts()
        self._polled = 0.0
        self.off = False
        """The destination does not serve looking traces up (an MLflow older than this API): every call
        stays standalone only, as with ``--no-nest``, and is counted as not nested."""

    @property
    def pending(self) -> int:
        return self.queue.size if self.queue is not None else 0

    def after_write(self, traces: list[BuiltTrace]) -> None:
        """Their standalone traces were acknowledged: nest those whose app trace is there, queue the rest.

        A call whose app trace is there but not finalized yet waits too, within its grace."""
        calls = [t for t in traces if t.parent is not None]
        if not calls:
            return
        found = self._find({t.app_trace_id for t in calls if t.app_trace_id})
        if found is None:
            self.counts.failed += len(calls)
            return
        now = self.clock()
        ready: list[Waiting] = []
        waiting: list[Waiting] = []
        given_up: list[tuple[str, str]] = []
        for t in calls:
            assert t.app_trace_id is not None
            app = found.get(t.app_trace_id)
            due = min(t.end_us, now) + self.grace_us  # a proxy clock ahead of ours does not stretch the wait
            can_wait = self.queue is not None and now < due
            if app is None and not can_wait:
                self.counts.missing += 1
                given_up.append((t.app_trace_id, t.trace_id))
                continue
            try:
                call = Waiting(t.app_trace_id, t.trace_id, due, nested_spans(t))
            except Exception as e:
                self.counts.failed += 1
                given_up.append((t.app_trace_id, t.trace_id))
                log.warning("could not build the nested spans of the call of trace %s: %s", t.trace_id, e)
                continue
            (ready if app is not None and (app.finalized or not can_wait) else waiting).append(call)
        self._write(ready, found)
        if self.queue is not None:
            self.queue.remove([*given_up, *((c.app_trace, c.call) for c in ready)])  # an earlier write's entry counts no more
            self.queue.put([(c.app_trace, c.call, c.due_us, c.spans) for c in waiting])

    def poll(self, force: bool = False) -> None:
        """Look up the app traces the queue waits for (at most every ``poll_s`` unless forced):
        nest the calls whose trace arrived (finalized, or finished when their wait is over), give up
        on those whose wait is over and whose trace did not."""
        if self.queue is None or not self.queue.size or (not force and time.monotonic() - self._polled < self.poll_s):
            return
        self._polled = time.monotonic()
        now = self.clock()
        found = self._find(set(self.queue.app_traces()))
        if found is None:
            self.counts.failed += self.queue.expire(2**62)
            return
        if found:
            entries = [Waiting(*e) for e in self.queue.entries(sorted(found))]
            ready = [c for c in entries if found[c.app_trace].finalized or c.due_us <= now]
            self._write(self._current(ready), found)
            self.queue.remove((c.app_trace, c.call) for c in ready)
        self.counts.missing += self.queue.expire(now)

    def _current(self, calls: list[Waiting]) -> list[Waiting]:
        """Those queued calls whose spans are still the call MLflow holds. Another ingester that read
        more of a call (its success, after the failure queued here) rewrote its standalone trace and
        nests it itself: written now, the older spans here would undo that (same span ids)."""
        held = {info.trace_id: info for info in looked_up(self.sink, [c.call for c in calls])}
        current = []
        for c in calls:
            info = held.get(c.call)
            if info is None or _holds(info, c.spans[0]):
                current.append(c)
            else:
                log.info("the call of trace %s was rewritten since it was queued (by another ingester): it is nested by that one", c.call)
        return current

    def _find(self, app_trace_ids: set[str]) -> dict[str, AppTrace] | None:
        """The finished app traces among these; None once the destination turned out not to serve the lookup."""
        if self.off:
            return None
        try:
            infos = looked_up(self.sink, sorted(app_trace_ids))
        except SinkError as e:
            if e.kind not in ("rejected", "refused"):
                raise
            self.off = True
            log.warning("%s: calls stay standalone, not nested into their app's trace (it cannot be looked up)", e)
            return None
        found: dict[str, AppTrace] = {}
        for info in infos:
            try:
                app = AppTrace.of(info)
            except (AttributeError, TypeError, ValueError) as e:
                log.warning("app trace %s has a TraceInfo nesting cannot read (%s); its calls stay standalone", info, e)
                continue
            if app is not None:
                found[app.trace_id] = app
        return found

    def _write(self, ready: list[Waiting], found: dict[str, AppTrace]) -> None:
        for i in range(0, len(ready), WRITE_CHUNK):
            part = ready[i : i + WRITE_CHUNK]
            by_experiment: dict[str, list[Waiting]] = {}
            for c in part:
                by_experiment.setdefault(found[c.app_trace].experiment_id, []).append(c)
            written: list[Waiting] = []
            for experiment_id, group in by_experiment.items():
                try:
                    self.sink.write_spans([s for c in group for s in fit(c.spans, found[c.app_trace])], experiment_id)
                except SinkError as e:
                    if e.kind != "rejected":
                        raise
                    written += self._write_one_by_one(group, found)
                    continue
                written += group
            self.counts.nested += len(written)
            self._remove_orphans(Counter(c.app_trace for c in written))

    def _write_one_by_one(self, calls: list[Waiting], found: dict[str, AppTrace]) -> list[Waiting]:
        """A write the store refused, call by call: the calls it still refuses stay standalone. The calls written."""
        written = []
        for c in calls:
            app = found[c.app_trace]
            try:
                self.sink.write_spans(fit(c.spans, app), app.experiment_id)
                written.append(c)
            except SinkError as e:
                if e.kind != "rejected":
                    raise
                self.counts.failed += 1
                log.warning("could not nest the call of trace %s into app trace %s: %s", c.call, app.trace_id, e)
        return written

    def _remove_orphans(self, calls: Counter[str]) -> None:
        """An app trace deleted between lookup and write was recreated by the write: delete it again.
        ``calls``: how many calls were just written into each app trace."""
        if not calls:
            return
        orphans: dict[str, list[str]] = {}
        for info in self.sink.trace_infos(sorted(calls)):
            if getattr(info.state, "value", str(info.state)) not in FINISHED:
                orphans.setdefault(info.experiment_id, []).append(info.trace_id)
        for experiment_id, ids in orphans.items():
            log.info("%d app trace(s) were deleted while their calls were nested; removed what the write recreated", len(ids))
            self.sink.delete(ids, experiment_id)
            lost = sum(calls[i] for i in ids)
            self.counts.nested -= lost
            self.counts.missing += lost


def _holds(info: Any, proxy: SpanData) -> bool:
    """The standalone trace ``info`` is the call whose proxy span this is: the same state and end."""
    try:
        state = getattr(info.state, "value", str(info.state))
        end_ms = int(info.request_time) + int(info.execution_duration or 0)
    except (AttributeError, TypeError, ValueError):
        return True
    return (state == "ERROR") == (proxy.error is not None) and abs(end_ms - proxy.end_us // 1000) <= 1
