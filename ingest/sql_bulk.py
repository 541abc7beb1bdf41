"""Bulk writer for SQL-backed MLflow stores: the rows ``log_spans`` would leave, written set-based.

MLflow's ``SqlAlchemyStore.log_spans`` spends ~11 ms of ORM work per trace (a ``session.merge``
per tag and metadata row, an UPDATE per trace), which caps a backfill at ~80 traces/s. For
traces that do not exist yet, every row it ends with can be computed up front, so this writer
derives them with MLflow's own helpers (span translation, content JSON, token and cost
aggregation, previews, tag validation), then inserts trace_info, trace_tags,
trace_request_metadata and spans with a few multi-row statements in one transaction, on MLflow's
own table models.

Traces that already exist take MLflow's own path: an identical re-send is skipped (MLflow would
change nothing), anything else goes through ``log_spans``, whose merge rules for a trace it
already holds are the contract. The derivation leans on MLflow internals, so it is used only on
the schema revision and dialects it was tested against (``test_sql_bulk.py`` compares every row
with ``log_spans``); anything else falls back to ``log_spans`` with one warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from mlflow.entities.span import Span

log = logging.getLogger(__name__)

TESTED_REVISIONS = frozenset({"dc11669786a5"})  # MLflow 3.17.x
TESTED_DIALECTS = frozenset({"sqlite"})


_STORE_METHODS = (
    "_advance_db_payload_generations_for_db_span_writes",
    "_get_trace_status_from_root_span",
    "_update_trace_info_attributes",
    "_get_trace_artifact_location_tag",
    "_run_with_deadlock_retry",
    "ManagedSessionMaker",
)


def _mlflow_parts() -> Any:
    """The MLflow internals the derivation uses, or None if this MLflow lacks any of them."""
    from mlflow.store.tracking import sqlalchemy_store as store_module

    needed = (
        "SqlTraceInfo",
        "SqlTraceTag",
        "SqlTraceMetadata",
        "SqlSpan",
        "TraceJSONEncoder",
        "translate_span_when_storing",
        "_span_aggregation_node",
        "aggregate_usage_from_span_nodes",
        "aggregate_cost_from_span_nodes",
        "validate_session_id",
        "_try_parse_json_string",
        "bounded_model_dimension",
        "finite_float_or_none",
        "token_count_or_none",
        "TOKEN_COLUMN_BY_KEY",
        "COST_COLUMN_BY_KEY",
        "_validate_trace_tag",
        "validate_trace_name",
        "SpanAttributeKey",
        "GenAiSemconvKey",
        "TraceTagKey",
        "TraceMetadataKey",
        "TraceState",
        "SpansLocation",
        "MSSQL",
        "rollups_enabled",
        "enqueue_rollup_rebuild_partitions",
        "_bulk_upsert",
        "MLFLOW_ARTIFACT_LOCATION",
        "RollupFamily",
    )
    if not all(hasattr(store_module, name) for name in needed):
        return None
    return store_module


def schema_revision(store: Any) -> str | None:
    from sqlalchemy import text

    try:
        with store.engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception:
        return None


def unsupported_reason(store: Any) -> str | None:
    """Why the bulk path must not be used on this store (None: it may)."""
    if _mlflow_parts() is None:
        return "this MLflow lacks internals the bulk writer derives rows with"
    dialect = store.engine.dialect.name
    if dialect not in TESTED_DIALECTS:
        return f"the bulk writer is not tested on {dialect}"
    revision = schema_revision(store)
    if revision not in TESTED_REVISIONS:
        return f"schema revision {revision} is not one the bulk writer was tested against"
    for name in _STORE_METHODS:
        if not hasattr(store, name):
            return f"this MLflow's store lacks {name}"
    return None


class BulkSpanWriter:
    """``log_spans(location, spans)`` with the same outcome, new traces written set-based."""

    def __init__(self, store: Any, location: str) -> None:
        self.store = store
        self.location = location
        self.m = _mlflow_parts()
        self._experiment: Any = None
        table = self.m.SqlTraceInfo.__table__ if self.m else None
        self._info_columns = [c.name for c in table.columns if c.server_default is None and c.computed is None] if table is not None else []

    def log_spans(self, spans: list[Span]) -> None:
        if spans:
            self.store._run_with_deadlock_retry(self._log_once, spans)

    def _log_once(self, spans: list[Span]) -> None:
        from sqlalchemy import select
        from sqlalchemy.exc import IntegrityError

        m = self.m
        by_trace: dict[str, list[Span]] = defaultdict(list)
        for span in spans:
            by_trace[span.trace_id].append(span)
        trace_ids = list(by_trace)
        rows = {tid: self._derive(tid, by_trace[tid]) for tid in trace_ids}
        with self.store.ManagedSessionMaker(read_only=False) as session:
            existing = set(session.scalars(select(m.SqlTraceInfo.request_id).where(m.SqlTraceInfo.request_id.in_(trace_ids))))
        new_ids = [t for t in trace_ids if t not in existing]
        if new_ids:
            try:
                with self.store.ManagedSessionMaker(read_only=False) as session:
                    self._insert(session, new_ids, rows)
            except IntegrityError:
                log.info("a trace of this batch appeared concurrently; writing the batch through log_spans")
                self.store.log_spans(self.location, [s for t in new_ids for s in by_trace[t]])
        if existing:
            changed = self._changed(sorted(existing), rows)
            same = [t for t in sorted(existing) if t not in set(changed)]
            if m.rollups_enabled():
                changed, same = sorted(existing), []
            if same:
                with self.store.ManagedSessionMaker(read_only=False) as session:
                    self._resend_unchanged(session, same, rows)
            if changed:
                self.store.log_spans(self.location, [s for t in changed for s in by_trace[t]])

    def _resend_unchanged(self, session: Any, trace_ids: list[str], rows: dict[str, _TraceRows]) -> None:
        """What ``log_spans`` changes on an identical re-send: the payload generation, and the
        re-merged tags (the artifact location aside)."""
        m = self.m
        self.store._advance_db_payload_generations_for_db_span_writes(session, trace_ids)
        tags = [
            {"request_id": t, "key": k, "value": v}
            for t in trace_ids
            for k, v in self._tags(t, rows[t]).items()
            if k != m.MLFLOW_ARTIFACT_LOCATION
        ]
        m._bulk_upsert(session, m.SqlTraceTag, tags)

    def _changed(self, trace_ids: list[str], rows: dict[str, _TraceRows]) -> list[str]:
        """Existing traces whose stored spans differ from this batch's (an identical re-send changes nothing)."""
        from sqlalchemy import select

        m = self.m
        stored: dict[str, set[tuple[str, str]]] = defaultdict(set)
        with self.store.ManagedSessionMaker(read_only=True) as session:
            query = select(m.SqlSpan.trace_id, m.SqlSpan.span_id, m.SqlSpan.content).where(m.SqlSpan.trace_id.in_(trace_ids))
            for tid, sid, content in session.execute(query):
                stored[tid].add((sid, content))
        return [t for t in trace_ids if stored[t] != {(r["span_id"], r["content"]) for r in rows[t].spans}]

    def _insert(self, session: Any, trace_ids: list[str], rows: dict[str, _TraceRows]) -> None:
        from sqlalchemy import insert

        m = self.m
        if m.rollups_enabled():
            partitions: list[Any] = []
            for tid in trace_ids:
                r = rows[tid]
                ts = r.info["timestamp_ms"]
                exp = int(self.location)
                partitions += [(family, exp, [ts, ts]) for family in (m.RollupFamily.TRACE_METRIC, m.RollupFamily.ASSESSMENT)]
                partitions += [(m.RollupFamily.SPAN_COST, exp, [int(s["start_time_unix_nano"]) // 1_000_000]) for s in r.spans]
            m.enqueue_rollup_rebuild_partitions(session, partitions)
        tags = [{"request_id": t, "key": k, "value": v} for t in trace_ids for k, v in self._tags(t, rows[t]).items()]
        metadata = [{"request_id": t, "key": k, "value": v} for t in trace_ids for k, v in sorted(rows[t].metadata.items())]
        for model, table_rows in (
            (m.SqlTraceInfo, [rows[t].info for t in trace_ids]),
            (m.SqlSpan, [s for t in trace_ids for s in rows[t].spans]),
            (m.SqlTraceMetadata, metadata),
            (m.SqlTraceTag, tags),
        ):
            if table_rows:
                session.execute(insert(model.__table__), table_rows)
        self.store._advance_db_payload_generations_for_db_span_writes(session, trace_ids)

    def _tags(self, trace_id: str, rows: _TraceRows) -> dict[str, str]:
        """In the order ``log_spans`` writes them (a later key wins): artifact location, spans
        location, resource attributes, then the root span's ``mlflow.traceTag.*``."""
        m = self.m
        if self._experiment is None:
            self._experiment = self.store.get_experiment(self.location)
        artifact = self.store._get_trace_artifact_location_tag(self._experiment, trace_id)
        tags = {artifact.key: artifact.value, m.TraceTagKey.SPANS_LOCATION: m.SpansLocation.TRACKING_STORE.value}
        tags.update(rows.resource_tags)
        tags.update({k: v for k, v in rows.trace_tags.items() if k != m.TraceTagKey.TRACE_NAME})
        return tags

    def _derive(self, trace_id: str, spans: list[Span]) -> _TraceRows:
        """Every row a new trace ends with, computed as ``_log_spans_once`` computes it."""
        m, store = self.m, self.store
        ak = m.SpanAttributeKey
        min_start_ms = min(s.start_time_ns for s in spans) // 1_000_000
        end_times = [s.end_time_ns for s in spans if s.end_time_ns is not None]
        max_end_ms = (max(end_times) // 1_000_000) if end_times else None
        root_status = store._get_trace_status_from_root_span(spans)
        usage_nodes, cost_nodes, span_rows = [], [], []
        session_id = user_id = root_dict = None
        trace_tags: dict[str, str] = {}
        for span in spans:
            span_dict = m.translate_span_when_storing(span)
            attrs = span_dict.get("attributes", {})
            usage_nodes.append(m._span_aggregation_node(span.span_id, span.parent_id, attrs, ak.CHAT_USAGE))
            cost_nodes.append(m._span_aggregation_node(span.span_id, span.parent_id, attrs, ak.LLM_COST))
            span_cost = None
            if attrs:
                if session_id is None and (sid := attrs.get(ak.SESSION_ID) or attrs.get(m.GenAiSemconvKey.CONVERSATION_ID)):
                    session_id = m.validate_session_id(m._try_parse_json_string(sid))
                if user_id is None and (uid := attrs.get("user.id")):
                    user_id = m._try_parse_json_string(uid)
                span_cost = attrs.get(ak.LLM_COST)
            cost_values: dict[str, Any] = {}
            if span_cost:
                with contextlib.suppress(TypeError, ValueError):
                    cost_values = json.loads(span_cost)
            span_rows.append(
                {
                    "trace_id": span.trace_id,
                    "experiment_id": self.location,
                    "span_id": span.span_id,
                    "parent_span_id": span.parent_id,
                    "name": span.name,
                    "type": span.span_type,
                    "status": span.status.status_code,
                    "start_time_unix_nano": span.start_time_ns,
                    "end_time_unix_nano": span.end_time_ns,
                    "content": json.dumps(span_dict, cls=m.TraceJSONEncoder, ensure_ascii=store.db_type == m.MSSQL),
                    "input_cost": m.finite_float_or_none(cost_values.get("input_cost")),
                    "output_cost": m.finite_float_or_none(cost_values.get("output_cost")),
                    "total_cost": m.finite_float_or_none(cost_values.get("total_cost")),
                    "model_name": m.bounded_model_dimension(m._try_parse_json_string(attrs.get(ak.MODEL))),
                    "model_provider": m.bounded_model_dimension(m._try_parse_json_string(attrs.get(ak.MODEL_PROVIDER))),
                }
            )
            if span.parent_id is None:
                root_dict = span_dict
                trace_tags.update(self._root_tags(attrs))
        info: dict[str, Any] = dict.fromkeys(self._info_columns)
        info.update(
            request_id=trace_id,
            experiment_id=self.location,
            timestamp_ms=min_start_ms,
            execution_time_ms=(max_end_ms - min_start_ms) if max_end_ms else None,
            status=root_status or m.TraceState.IN_PROGRESS.value,
            session_id=session_id or None,
        )
        if root_dict is not None:
            blank = m.SqlTraceInfo(request_preview=None, response_preview=None)
            info.update({col.key: v for col, v in store._update_trace_info_attributes(blank, root_dict).items()})
        if m.TraceTagKey.TRACE_NAME in trace_tags:
            info["trace_name"] = trace_tags[m.TraceTagKey.TRACE_NAME]
        usage = m.aggregate_usage_from_span_nodes(usage_nodes) or {}
        for key, column in m.TOKEN_COLUMN_BY_KEY.items():
            if (value := m.token_count_or_none(usage.get(key))) is not None:
                info[column] = value
        cost = m.aggregate_cost_from_span_nodes(cost_nodes) or {}
        for key, column in m.COST_COLUMN_BY_KEY.items():
            if (value := m.finite_float_or_none(cost.get(key))) is not None:
                info[column] = value
        metadata = {m.TraceMetadataKey.TRACE_USER: user_id} if user_id else {}
        return _TraceRows(info, span_rows, trace_tags, _resource_tags(m, spans), metadata)

    def _root_tags(self, attrs: dict[str, Any]) -> dict[str, str]:
        m = self.m
        prefix = m.SpanAttributeKey.TRACE_TAG_PREFIX
        tags: dict[str, str] = {}
        for attr_key, attr_value in attrs.items():
            if not attr_key.startswith(prefix):
                continue
            try:
                key, value = m._validate_trace_tag(attr_key[len(prefix) :], str(m._try_parse_json_string(attr_value)))
            except Exception:
                continue
            if key == m.TraceTagKey.TRACE_NAME:
                value = m.validate_trace_name(value)
            tags[key] = value
        return tags


def _resource_tags(m: Any, spans: list[Span]) -> dict[str, str]:
    resource = next((r for s in spans if (r := getattr(s._span, "resource", None)) is not None and r.attributes), None)
    if resource is None:
        return {}
    tags: dict[str, str] = {}
    for key, value in resource.attributes.items():
        if key.startswith(("telemetry.sdk.", "mlflow.")):
            continue
        try:
            key, value = m._validate_trace_tag(key, value if isinstance(value, str) else json.dumps(value))
        except Exception:
            continue
        tags[key] = value
    return tags


@dataclass(slots=True)
class _TraceRows:
    info: dict[str, Any]
    spans: list[dict[str, Any]]
    trace_tags: dict[str, str]
    resource_tags: dict[str, str]
    metadata: dict[str, str]
