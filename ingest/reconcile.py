"""Reconcile: which calls in the logs have no trace in MLflow, and which traces have no call in the logs.

The logs are read through the same normalize/dedupe stages as ingestion (no sink), and each
call's expected trace id is derived exactly as the ingester derives it; MLflow's traces are
listed through its own search API (no spans loaded). Calls are compared by call id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import polars as pl

from ingest.callback_traces import CALL_ID_TAG, Reader, is_callback_trace
from ingest.dedupe import dedupe
from ingest.ids import mlflow_trace_id, otel_trace_id
from ingest.ledger import Ledger
from ingest.normalize import normalize_isolating
from ingest.pipeline import Inputs, RunOptions, Summary, remote_units, resolve_run_target, run_batch
from ingest.quarantine import QuarantineWriter
from ingest.sources import Chunk, file_chunks, shown


@dataclass
class Report:
    tracking_uri: str
    experiment_id: str
    calls_in_logs: int = 0
    traces_in_mlflow: int = 0
    matched: int = 0
    missing: list[str] = field(default_factory=list)
    """Call ids as the ``litellm.call_id`` tag holds them (scrubbed: a client may send its key as the id)."""
    extra: list[str] = field(default_factory=list)
    callback_traces: int = 0
    """Traces LiteLLM's own mlflow callback wrote in the window: not compared (they are not ours), counted."""
    quarantined: int = 0
    window: tuple[int | None, int | None] = (None, None)
    """The start times compared: --since/--until, else the logs' calls'; (None, None) when neither
    was given and the logs hold no call (no window: no trace is extra)."""
    unreadable: list[str] = field(default_factory=list)
    """Files this process may not read and folders it may not list (named on stderr): their calls
    were not compared, so an agreement is not claimed (exit 8)."""
    repaired: int | None = None
    """With ``--repair``: the missing calls written since (None: no repair asked for)."""
    too_recent: list[str] = field(default_factory=list)
    """Missing calls that ended within the settle window: a daemon may still hold them for a retry,
    so ``--repair`` leaves them (written now, a later retry could not change their state)."""
    ended: dict[str, int] = field(default_factory=dict, repr=False)
    """End time of each missing call, by its raw call key (what ``--repair`` selects by)."""
    shown: dict[str, str] = field(default_factory=dict, repr=False)
    """Raw call key -> as it is shown."""

    @property
    def differences(self) -> list[str]:
        """The extra traces that count as a difference: none while something could not be read,
        since each may be a call of what was not read (they are still listed)."""
        return [] if self.unreadable else self.extra

    @property
    def ok(self) -> bool:
        return not self.missing and not self.differences

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ended")
        d.pop("shown")
        d["missing_count"], d["extra_count"] = len(self.missing), len(self.extra)
        d["extra_confirmed"] = not self.unreadable
        return d


def calls_in_logs(opts: RunOptions) -> tuple[pl.DataFrame, int, list[str]]:
    """(call_key, first start, last end) of every call in the logs within [since, until), the
    quarantine count, and the files and folders that may not be read (each named on stderr)."""
    calls = pl.DataFrame(schema={"call_key": pl.String, "start_us": pl.Int64, "end_us": pl.Int64})
    latest = [pl.col("start_us").min(), pl.col("end_us").max()]
    quarantine = QuarantineWriter(None)
    inputs = Inputs.of(opts.paths, opts.own())
    inputs.check()
    inputs.name_unreadable("its calls are not compared; reconcile again once it can be read")
    unread = [shown(p) for p in inputs.unreadable]
    for chunk in _chunks(inputs, opts, unread):
        quarantine.write(chunk.quarantined)
        records, bad = normalize_isolating(chunk.lines)
        quarantine.write(bad)
        deduped, _ = dedupe(records)
        part = deduped.group_by("call_key").agg(latest)
        calls = pl.concat([calls, part]).group_by("call_key").agg(latest)
    if opts.since_us is not None:
        calls = calls.filter(pl.col("start_us") >= opts.since_us)
    if opts.until_us is not None:
        calls = calls.filter(pl.col("start_us") < opts.until_us)
    return calls, quarantine.total, unread


def _chunks(inputs: Inputs, opts: RunOptions, unread: list[str]) -> Iterator[Chunk]:
    """Every chunk of the logs; objects that could not be fetched (each named in a warning) are
    added to ``unread``, as files that may not be read are."""
    for path in inputs.files:
        yield from file_chunks(path, opts.chunk_bytes)
    for unit in remote_units(inputs, Ledger(None), opts, Summary(), mode="backfill"):
        if unit.failed:
            unread.append(f"{unit.failed} object(s) of {unit.source}")
        yield from unit.chunks


def traces_in_mlflow(
    uri: str,
    experiment_id: str,
    since_us: int | None,
    until_us: int | None,
    read: Reader | None = None,
    callbacks: list[str] | None = None,
) -> dict[str, str]:
    """trace id -> litellm call id, for the traces this tool wrote (they carry ``litellm.call_id``).
    ``read`` runs each read of MLflow (a database store's sink watches it: see ``StoreSink.read``);
    the ids of LiteLLM's own callback's traces in the window go to ``callbacks``."""
    from mlflow import MlflowClient

    read = read or _direct
    client = read(lambda: MlflowClient(tracking_uri=uri), "open the MLflow store")
    clauses = []
    if since_us is not None:
        clauses.append(f"trace.timestamp_ms >= {since_us // 1000}")
    if until_us is not None:
        clauses.append(f"trace.timestamp_ms < {-(-until_us // 1000)}")
    out: dict[str, str] = {}
    token = None
    while True:
        page = read(
            lambda token=token: client.search_traces(
                locations=[experiment_id],
                filter_string=" AND ".join(clauses) or None,
                max_results=500,
                page_token=token,
                include_spans=False,
            ),
            "search traces",
        )
        for t in page:
            if (cid := t.info.tags.get(CALL_ID_TAG)) is not None and not _past_edge(client, t.info, since_us, until_us, read):
                out[t.info.trace_id] = cid
            elif callbacks is not None and is_callback_trace(t.info):
                callbacks.append(t.info.trace_id)
        token = page.token
        if not token:
            return out


def _direct(call: Callable[[], Any], what: str) -> Any:
    return call()


def _past_edge(client: Any, info: Any, since_us: int | None, until_us: int | None, read: Reader = _direct) -> bool:
    """A trace of the window's first or last millisecond (all MLflow's search can tell) that starts
    outside the window by its spans' microseconds, as the logs' side is cut: it is not in the window."""
    ms = info.timestamp_ms
    edge = (since_us is not None and ms == since_us // 1000) or (until_us is not None and ms == (until_us - 1) // 1000)
    if not edge:
        return False
    spans = read(lambda: client.get_trace(info.trace_id), "read a trace").data.spans
    if not spans:
        return False
    start_us = min(s.start_time_ns for s in spans) // 1000
    return (since_us is not None and start_us < since_us) or (until_us is not None and start_us >= until_us)


def reconcile(opts: RunOptions) -> Report:
    """Read-only: the destination is resolved as batch resolves it, and nothing is created in it."""
    target = resolve_run_target(opts, create=False)
    calls, quarantined, unreadable = calls_in_logs(opts)
    expected = {mlflow_trace_id(otel_trace_id(target.experiment_id, k)): k for k in calls["call_key"].to_list()}
    since, until = opts.since_us, opts.until_us
    if since is None and until is None and calls.height:
        since, until = int(calls["start_us"].min()), int(calls["start_us"].max()) + 1  # type: ignore[arg-type]
    # no call and no --since/--until: no window, and a search without one made every trace extra
    unbounded = since is None and until is None
    from ingest.sink import make_sink

    # a database store is read through a sink: a database that stops answering (a frozen host, a
    # network partition) held reconcile in a read for ever; now it is exit 4 after --mlflow-timeout
    sink = make_sink(target, opts.mlflow_timeout_s)
    try:
        read = getattr(sink, "read", None)
        callbacks: list[str] = []
        actual = {} if unbounded else traces_in_mlflow(target.tracking_uri, target.experiment_id, since, until, read, callbacks)
        found = _held(sink, target, sorted(expected.keys() - actual.keys()))
    finally:
        sink.close()
    report = Report(target.shown_uri, target.experiment_id, quarantined=quarantined, window=(since, until), unreadable=unreadable)
    report.calls_in_logs = len(expected)
    report.callback_traces = len(callbacks)
    report.traces_in_mlflow = len(actual)
    report.traces_in_mlflow += len(found)
    report.matched = len(expected.keys() & (actual.keys() | found))
    missing = {expected[t] for t in expected.keys() - actual.keys() - found}
    report.shown = {k: opts.scrub.text(k) for k in missing}
    report.missing = sorted(report.shown.values())
    report.extra = sorted(actual[t] for t in actual.keys() - expected.keys())
    report.ended = {k: e for k, e in calls.select("call_key", "end_us").iter_rows() if k in missing}
    return report


def _held(sink: Any, target: Any, trace_ids: list[str]) -> set[str]:
    """Those of ``trace_ids`` the experiment holds, looked up by id: a call's trace starts with its
    earliest attempt, which may lie outside the window the logs given span (a rotated file not given,
    a SpendLogs export's times rounded to the millisecond), and the window search passed it over."""
    if not trace_ids:
        return set()
    from ingest.sink import SinkError, looked_up

    try:
        return {info.trace_id for info in looked_up(sink, trace_ids) if str(info.experiment_id) == target.experiment_id}
    except SinkError as e:
        if e.kind in ("unreachable", "server", "stopped"):  # not there now: no answer to report
            raise
        return set()  # a server that does not serve the lookup: the window's answer stands


def repair(opts: RunOptions, report: Report, now_us: int) -> Summary:
    """Write the calls ``report`` found missing, read from the same logs and built exactly as batch
    builds them (so ``opts`` carries the runs' redaction and scrubbing); every other call is dropped
    before it is built, and bad lines, quarantined by the runs that read them, are only counted.
    Calls that ended within ``opts.settle_s`` are left (``Report.too_recent``)."""
    recent_from = now_us - int(opts.settle_s * 1_000_000)
    recent = {
        k for k in report.shown if recent_from < report.ended.get(k, 0) <= now_us
    }  # ahead of our clock: written at once, as batch does
    report.too_recent = sorted(report.shown[k] for k in recent)
    wanted = frozenset(report.shown.keys() - recent)
    summary = run_batch(replace(opts, only_calls=wanted, quarantine_file=None, passed_over=opts.own())) if wanted else Summary()
    report.repaired = summary.calls  # each call once: one written as failed, then rewritten whole with its retry, is one
    return summary
