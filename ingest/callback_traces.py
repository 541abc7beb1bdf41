"""LiteLLM's own ``mlflow`` callback writing into the experiment we write: each call it traced is then
shown twice, its trace and ours (README, "LiteLLM's own callback in the same experiment").

Both read ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME``, so a proxy with the callback on and
this tool pointed as the README says end up in one experiment. The callback's traces are told from
ours by MLflow's own search: named ``litellm-<call type>`` as ours are, but without the
``litellm.call_id`` tag every trace of ours carries (the callback keeps the call id in its one span).

Looking is a search over the times of the calls just written; it never fails a run. With
``--replace-callback-traces`` the callback's trace of a call is deleted once the experiment holds
ours of it, found by its id and covering the callback's start: one trace per call, ours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ingest.ids import mlflow_trace_id, otel_trace_id
from ingest.mlflow_names import TraceTagKey
from ingest.quarantine import first_line
from ingest.spans import TAG_PREFIX

log = logging.getLogger(__name__)

CALL_ID_TAG = f"{TAG_PREFIX}call_id"
CALLBACK_FILTER = f"trace.name LIKE 'litellm-%' AND tags.`{CALL_ID_TAG}` IS NULL"
SLACK_MS = 1
"""The callback's start may be a millisecond before ours of the same call: both read one float, ours
rounds it to the microsecond, the callback truncates ``int(start.timestamp() * 1e9)``."""
SAMPLE = 100
"""At most this many of the callback's traces are counted per look: enough to say they are there."""
PAGE = 100
"""Traces read (with their spans) per page when replacing."""
EVERY_S = 3600.0
"""How often a daemon that does not replace them looks again (over the calls it wrote since)."""
REPLACE_EVERY_S = 30.0
"""How often a run or a daemon that replaces them does (a look per write searched the same times
over and over: a backfill's workers each write calls from all over a step's time range)."""

LOOK_THREAD = "callback-traces"
"""The threads a look reads MLflow in: what MLflow's database layer logs in them (a query that failed
for want of the database, dumped with its traceback even before it raises) is dropped, as the look
says its own failure in one line (:func:`ingest.stores.quiet_dependency_logs` does so for the rest
unless ``-v``)."""

Reader = Callable[[Callable[[], Any], str], Any]
"""Runs one read of MLflow (``call``, described as ``what``): watched, given up on time."""


def _not_a_look(record: logging.LogRecord) -> bool:
    return record.threadName != LOOK_THREAD


for _name in ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "mlflow.tracing.client", "mlflow.utils.rest_utils"):
    logging.getLogger(_name).addFilter(_not_a_look)


def is_callback_trace(info: Any) -> bool:
    """A trace LiteLLM's callback wrote (reconcile's search pages hold them beside ours)."""
    tags = info.tags or {}
    return str(tags.get(TraceTagKey.TRACE_NAME, "")).startswith("litellm-") and CALL_ID_TAG not in tags


@dataclass(frozen=True)
class CallbackTrace:
    trace_id: str
    call_id: str | None
    """The ``litellm_call_id`` of its one span; None for a trace of another shape (never replaced)."""
    start_ms: int


Page = tuple[list[tuple[Any, list[Any] | None]], str | None]
"""(TraceInfo, its spans or None) of each trace of a page of a search, and the next page's token."""


def searcher(uri: str, experiment_id: str, store: Any | None) -> Callable[[str, int, str | None, bool], Page]:
    """MLflow's search of the experiment, spans optional: through the database store the sink has
    open (a client of its own opened it again, a sixth of a small cron run), else MLflow's client."""
    if store is not None:

        def in_store(flt: str, n: int, token: str | None, spans: bool) -> Page:
            infos, after = store.search_traces(locations=[experiment_id], filter_string=flt, max_results=n, page_token=token)
            if not spans:
                return [(i, None) for i in infos], after
            held = {t.info.trace_id: t.data.spans for t in store.batch_get_traces([i.trace_id for i in infos if is_callback_trace(i)])}
            return [(i, held.get(i.trace_id, [])) for i in infos], after

        return in_store
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)

    def through_client(flt: str, n: int, token: str | None, spans: bool) -> Page:
        page = client.search_traces(locations=[experiment_id], filter_string=flt, max_results=n, page_token=token, include_spans=spans)
        return [(t.info, t.data.spans if spans and t.data else None) for t in page], page.token

    return through_client


def _searched(
    search: Callable[[str, int, str | None, bool], Page], lo_us: int, hi_us: int, read: Reader, spans: bool, limit: int | None
) -> list[CallbackTrace]:
    flt = f"{CALLBACK_FILTER} AND trace.timestamp_ms >= {lo_us // 1000 - SLACK_MS} AND trace.timestamp_ms <= {hi_us // 1000}"
    n = PAGE if limit is None else min(PAGE, limit)
    out: list[CallbackTrace] = []
    token = None
    while True:
        page, token = read(lambda token=token: search(flt, n, token, spans), "search for the callback's traces")
        theirs = ((info, s) for info, s in page if is_callback_trace(info))
        out += [CallbackTrace(info.trace_id, _call_id(info, s) if spans else None, info.request_time) for info, s in theirs]
        if not token or (limit is not None and len(out) >= limit):
            return out


def _call_id(info: Any, spans: list[Any] | None) -> str | None:
    """The call id of a trace of the callback's shape: one span, named as the trace, that carries it."""
    spans = spans or []
    if len(spans) != 1 or spans[0].parent_id is not None or spans[0].name != info.tags.get(TraceTagKey.TRACE_NAME):
        return None
    cid = spans[0].attributes.get("litellm_call_id")
    return cid if isinstance(cid, str) and cid else None


def callback_traces(search: Callable[[str, int, str | None, bool], Page], lo_us: int, hi_us: int, read: Reader) -> list[str]:
    """Ids of (up to ``SAMPLE``) traces of LiteLLM's callback in the experiment that start between
    ``lo_us`` and ``hi_us``, by MLflow's search (a SQL store or a server alike)."""
    return [t.trace_id for t in _searched(search, lo_us, hi_us, read, spans=False, limit=SAMPLE)]


class CallbackWatch:
    """Looks for the callback's traces over the times of the calls a run (or a daemon) wrote: says
    so once per process, or (``replace``) deletes each one whose call the experiment holds of ours."""

    def __init__(self, sink: Any, target: Any, read: Reader, replace: bool = False) -> None:
        self.sink, self.target, self.read, self.replace = sink, target, read, replace
        self.lo: int | None = None
        self.hi: int | None = None
        self.found = 0
        self.replaced = 0
        self.said = False
        self._failed = False
        self._search: Callable[[str, int, str | None, bool], Page] | None = None
        self._again: tuple[int, int] | None = None
        """Times looked over once: looked over again at the next look."""
        self._looked: float | None = None

    @property
    def search(self) -> Callable[[str, int, str | None, bool], Page]:
        if self._search is None:
            self._search = searcher(self.target.tracking_uri, self.target.experiment_id, getattr(self.sink, "store", None))
        return self._search

    def wrote(self, lo_us: int, hi_us: int) -> None:
        self.lo = lo_us if self.lo is None else min(self.lo, lo_us)
        self.hi = hi_us if self.hi is None else max(self.hi, hi_us)

    def look(self, force: bool = False) -> None:
        """Search the times written since the last look, at most every ``EVERY_S`` (``REPLACE_EVERY_S``
        when replacing) unless ``force``d (a run's end, a daemon's stop). A search that fails (MLflow
        away, a server too old for the filter) keeps its window for the next look.

        Replacing, each time is looked over twice, at two looks in a row: the callback's export
        is asynchronous, so a daemon's write can reach MLflow before the callback's trace of the
        same call, which the first look then cannot see."""
        again = self._again if self.replace else None
        if (self.lo is None or self.hi is None) and again is None:
            return
        now = time.monotonic()
        every = REPLACE_EVERY_S if self.replace else EVERY_S
        if not force and self._looked is not None and now - self._looked < every:
            return
        self._looked = now
        try:
            if self.replace:
                new = None if self.lo is None or self.hi is None else (self.lo, self.hi)
                lo, hi = min(w[0] for w in (new, again) if w), max(w[1] for w in (new, again) if w)
                self.replaced += self._replace(lo, hi)
                self._again = new
            else:
                found = callback_traces(self.search, self.lo, self.hi, self.read)
                self.found = max(self.found, len(found))
                self._say(found)
        except Exception as e:
            if self.replace and getattr(e, "kind", None) == "unauthorized":
                self._refused(e)
                return
            level = logging.WARNING if self.replace and not self._failed else logging.DEBUG
            self._failed = True
            what = "replace LiteLLM's callback traces (tried again at the next look)" if self.replace else "look for the callback's traces"
            log.log(level, "could not %s: %s", what, first_line(e))
            return
        self.lo = self.hi = None

    def _refused(self, e: Exception) -> None:
        """MLflow refuses this user deletes (a server's auth, EDIT but not MANAGE): say so once and go
        on as without the option, counting what is left. Asked again at each look, each searched every
        callback trace written so far again, and was refused again."""
        self.replace, self.said = False, True
        log.warning(
            "may not delete LiteLLM's callback traces in experiment %s (%s): they stay, each call it traced shown twice; "
            "--replace-callback-traces needs a user who may delete traces (MANAGE)",
            self.target.experiment_id,
            first_line(e),
        )

    def _replace(self, lo_us: int, hi_us: int) -> int:
        """Delete the callback's traces in the window whose call the experiment holds of ours: our
        trace's id is the call's, and its time covers the callback's start (a call id reused later
        names another call; ``SLACK_MS`` either side). The rest (calls not in these logs) are left."""
        from ingest.sink import looked_up

        t = self.target
        found = _searched(self.search, lo_us, hi_us, self.read, spans=True, limit=None)
        by_ours: dict[str, list[CallbackTrace]] = {}
        for cb in found:
            if cb.call_id is not None:
                by_ours.setdefault(mlflow_trace_id(otel_trace_id(t.experiment_id, cb.call_id)), []).append(cb)
        if not by_ours:
            return 0
        held = {i.trace_id: i for i in looked_up(self.sink, sorted(by_ours)) if str(i.experiment_id) == str(t.experiment_id)}
        doomed = [
            cb.trace_id
            for tid, info in held.items()
            for cb in by_ours[tid]
            if info.request_time - SLACK_MS <= cb.start_ms <= info.request_time + (info.execution_duration or 0) + SLACK_MS
        ]
        for i in range(0, len(doomed), PAGE):
            self.sink.delete(doomed[i : i + PAGE])
        return len(doomed)

    def _say(self, found: list[str]) -> None:
        if not found or self.said:
            return
        self.said = True
        t = self.target
        many = f"{len(found)}+" if len(found) >= SAMPLE else str(len(found))
        name = f"{t.experiment_name!r} (id {t.experiment_id})" if t.experiment_name else f"id {t.experiment_id}"
        log.warning(
            "experiment %s also holds %s trace(s) of LiteLLM's own mlflow callback (e.g. %s) among the calls written: "
            "each call it traced is shown twice, its trace and ours. Turn the callback off and pass --replace-callback-traces "
            "(deletes its trace of each call written), or send ours to another experiment (MLFLOW_EXPERIMENT_NAME)",
            name,
            many,
            found[0],
        )
