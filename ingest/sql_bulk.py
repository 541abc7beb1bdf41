"""Bulk writer for SQL-backed MLflow stores: the rows ``log_spans`` would leave, written set-based.

MLflow's ``SqlAlchemyStore.log_spans`` spends ~11 ms of ORM work per trace (a ``session.merge``
per tag and metadata row, an UPDATE per trace), which caps a backfill at ~80 traces/s. For
traces that do not exist yet, every row it ends with can be computed up front, so this writer
derives them with MLflow's own helpers (span translation, content JSON, token and cost
aggregation, previews, tag validation), then inserts trace_info, trace_tags,
trace_request_metadata and spans with a few multi-row statements in one transaction, on MLflow's
own table models.

Traces that already exist take MLflow's own path: an identical re-send gets what ``log_spans``
gives one (its write counter bumped, the tags merged again), anything else goes through
``log_spans``, whose merge rules for a trace it already holds are the contract. A trace another
writer inserts between our check and our insert fails the transaction (a unique violation); the
sink writes the batch again, and this time it is an existing trace.

The derivation leans on MLflow internals, so it is used only on the schema revision and dialects
it was tested against (``test_sql_bulk.py`` compares every row with ``log_spans``, on SQLite and
PostgreSQL); anything else falls back to ``log_spans`` with one warning.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import json.encoder
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ingest.spans import MAX_ATTRIBUTE_DEPTH, BuiltTrace, SpanData, set_any

log = logging.getLogger(__name__)

TESTED_REVISIONS = frozenset({"dc11669786a5", "f4a9b2c7d1e6"})  # MLflow 3.17.x, 3.18.x
TESTED_DIALECTS = frozenset({"sqlite", "postgresql"})
SETTLED_COLUMNS = ("timestamp_ms", "execution_time_ms", "status", "request_preview", "response_preview", "trace_name", "session_id")
"""With the token and cost columns: the trace row's columns one write of a call sets from its spans
(not the client's request id, which is not ours)."""
SQLITE_CACHE_KIB = 65536
"""Page cache of the writing connection: trace ids are random, so every batch touches index pages
all over a big store; with SQLite's default 2 MiB most of them are read again from disk each time
(measured: inserts ~12% faster at 18k traces, the gap growing with the store)."""


_TRANSLATION_STEPS = (
    "translate_span_type_from_otel",
    "_get_input_value",
    "_get_output_value",
    "_get_token_usage",
    "_get_message_format",
    "_get_tool_definitions",
    "_get_model_name",
    "_get_model_provider",
)
_STORE_METHODS = (
    "_advance_db_payload_generations_for_db_span_writes",
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
        "SqlAlchemyStore",
        "RollupFamily",
    )
    if not all(hasattr(store_module, name) for name in needed):
        return None
    return store_module


_NO_SUCH_TABLE_TEXT = ("no such table", "no such column")
"""SQLite's answer to a query on a table or column its schema lacks (an ``OperationalError`` there, as
a lost connection is elsewhere: told apart by what it says)."""


def schema_revision(store: Any) -> str | None:
    """The store's alembic revision; None when its schema records none (no ``alembic_version`` table,
    an empty one, or one this role may not read). A database that cannot be reached or does not
    answer raises instead: that is an outage (retried, then exit 4), not a schema to fall back for."""
    from sqlalchemy import text

    try:
        with store.engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception as e:
        if schema_lacks_it(e):
            return None
        raise


def schema_lacks_it(e: BaseException) -> bool:
    """The database answered, refusing the query for what its schema is: PostgreSQL's class 42
    (undefined table or column, insufficient privilege), or SQLite's "no such table"."""
    from sqlalchemy.exc import DBAPIError

    if not isinstance(e, DBAPIError) or e.connection_invalidated:
        return False
    code = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
    if isinstance(code, str):
        return code.startswith("42")
    return any(t in str(e.orig).lower() for t in _NO_SUCH_TABLE_TEXT)


def unsupported_reason(store: Any) -> str | None:
    """Why the bulk path must not be used on this store (None: it may)."""
    from mlflow.tracing.otel import translation

    if _mlflow_parts() is None or not all(hasattr(translation, f) for f in _TRANSLATION_STEPS):
        return "this MLflow lacks internals the bulk writer derives rows with"
    dialect = store.engine.dialect.name
    if dialect not in TESTED_DIALECTS:
        return f"the bulk writer is not tested on {dialect}"
    revision = schema_revision(store)
    if revision is None:
        return "the store's schema records no revision (no readable alembic_version table)"
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
        self._insert_sql: dict[tuple[str, tuple[str, ...]], tuple[str, tuple[str, ...]]] = {}
        artifact_location = store.get_experiment(location).artifact_location
        self.deriver = RowDeriver(location, artifact_location, ascii_only=store.db_type == self.m.MSSQL)

    def write(self, traces: list[BuiltTrace]) -> None:
        if not traces:
            return
        if len({t.trace_id for t in traces}) < len(traces):
            self.store.log_spans(self.location, _mlflow_spans(traces))
            return
        self.store._run_with_deadlock_retry(self._write_once, traces)

    def _write_once(self, traces: list[BuiltTrace]) -> None:
        from sqlalchemy import select

        m = self.m
        by_id = {t.trace_id: t for t in traces}
        trace_ids = list(by_id)
        rows = {tid: by_id[tid].derived or self.deriver.derive(by_id[tid]) for tid in trace_ids}
        with self.store.ManagedSessionMaker(read_only=False) as session:
            if self.store.db_type == "sqlite":
                session.connection().exec_driver_sql(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
            existing = set(session.scalars(select(m.SqlTraceInfo.request_id).where(m.SqlTraceInfo.request_id.in_(trace_ids))))
            new_ids = [t for t in trace_ids if t not in existing]
            if new_ids:
                self._insert(session, new_ids, rows)
        if existing:
            # With rollups on, log_spans also queues rebuilds for a re-send: leave all of them to it.
            changed = sorted(existing) if m.rollups_enabled() else self._changed(sorted(existing), rows)
            same = [t for t in sorted(existing) if t not in set(changed)]
            if changed:
                self.store.log_spans(self.location, _mlflow_spans([by_id[t] for t in changed]))
            with self.store.ManagedSessionMaker(read_only=False) as session:
                if same:
                    self._resend_unchanged(session, same, rows)
                self._settle(session, sorted(existing), rows)

    def _settle(self, session: Any, trace_ids: list[str], rows: dict[str, _TraceRows]) -> None:
        """Existing traces end with the trace row one write of all their attempts leaves (the batch's
        trace has them all: the sink joined it to the attempts the store held). ``log_spans`` keeps a
        held trace's first state, previews and session, so a call first written with its failures
        alone would stay in state ERROR after its success. Compared with the stored row rather than
        done only when spans changed, so a run killed between the two steps is settled by the next."""
        from sqlalchemy import select, update

        m = self.m
        info = m.SqlTraceInfo
        columns = sorted({*SETTLED_COLUMNS, *m.TOKEN_COLUMN_BY_KEY.values(), *m.COST_COLUMN_BY_KEY.values()})
        query = select(info.request_id, *(getattr(info, c) for c in columns)).where(info.request_id.in_(trace_ids))
        stored = {tid: dict(zip(columns, values, strict=True)) for tid, *values in session.execute(query)}
        unsettled = []
        for tid in trace_ids:
            values = {c: rows[tid].info.get(c) for c in columns}
            if tid in stored and stored[tid] != values:
                session.execute(update(info).where(info.request_id == tid).values(**values))
                unsettled.append(tid)
        if metadata := [{"request_id": t, "key": k, "value": v} for t in unsettled for k, v in sorted(rows[t].metadata.items())]:
            m._bulk_upsert(session, m.SqlTraceMetadata, metadata)
        if unsettled and m.rollups_enabled():
            families = (m.RollupFamily.TRACE_METRIC, m.RollupFamily.ASSESSMENT)
            stamps = [rows[t].info["timestamp_ms"] for t in unsettled]
            m.enqueue_rollup_rebuild_partitions(session, [(f, int(self.location), stamps) for f in families])

    def _resend_unchanged(self, session: Any, trace_ids: list[str], rows: dict[str, _TraceRows]) -> None:
        """What ``log_spans`` changes on an identical re-send: the payload generation, and the
        re-merged tags (the artifact location aside)."""
        m = self.m
        self.store._advance_db_payload_generations_for_db_span_writes(session, trace_ids)
        tags = [
            {"request_id": t, "key": k, "value": v} for t in trace_ids for k, v in rows[t].tags.items() if k != m.MLFLOW_ARTIFACT_LOCATION
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
        tags = [{"request_id": t, "key": k, "value": v} for t in trace_ids for k, v in rows[t].tags.items()]
        metadata = [{"request_id": t, "key": k, "value": v} for t in trace_ids for k, v in sorted(rows[t].metadata.items())]
        for model, table_rows in (
            (m.SqlTraceInfo, [rows[t].info for t in trace_ids]),
            (m.SqlSpan, [s for t in trace_ids for s in rows[t].spans]),
            (m.SqlTraceMetadata, metadata),
            (m.SqlTraceTag, tags),
        ):
            if table_rows:
                self._insert_rows(session, model.__table__, table_rows)
        self.store._advance_db_payload_generations_for_db_span_writes(session, trace_ids)

    def _insert_rows(self, session: Any, table: Any, rows: list[dict[str, Any]]) -> None:
        """One executemany of the table's INSERT (compiled once by SQLAlchemy from MLflow's model);
        on SQLite the values go to the driver as they are, skipping SQLAlchemy's per-row processing,
        which costs as much as SQLite itself here."""
        from sqlalchemy import insert

        conn = session.connection()
        columns = tuple(rows[0])
        if conn.dialect.name != "sqlite" or any(c.default is not None for c in table.columns):
            session.execute(insert(table), rows)
            return
        key = (table.name, columns)
        if (compiled := self._insert_sql.get(key)) is None:
            statement = insert(table).compile(dialect=conn.dialect, column_keys=list(columns))
            compiled = self._insert_sql[key] = (str(statement), tuple(statement.positiontup or ()))
        sql, order = compiled
        conn.exec_driver_sql(sql, [tuple(r[c] for c in order) for r in rows])


class RowDeriver:
    """The store-free half of the bulk writer: a built trace -> every row ``log_spans`` would leave
    for it (no database access, so it is testable and movable on its own)."""

    def __init__(self, location: str, artifact_location: str, ascii_only: bool = False) -> None:
        self.location, self.artifact_location, self.ascii_only = location, artifact_location, ascii_only
        m = self.m = _mlflow_parts()
        self._parse = functools.lru_cache(maxsize=65536)(m._try_parse_json_string)
        self._valid_tag = functools.lru_cache(maxsize=65536)(m._validate_trace_tag)
        self._encode = m.TraceJSONEncoder(ensure_ascii=self.ascii_only).encode
        self._encode_text = json.encoder.encode_basestring_ascii if self.ascii_only else json.encoder.encode_basestring
        table = m.SqlTraceInfo.__table__
        self._info_columns = [c.name for c in table.columns if c.server_default is None and c.computed is None]
        self._experiment = SimpleNamespace(artifact_location=self.artifact_location)
        self._artifact_uri = self._artifact_template()
        self._kind = _stored_kind()

    def derive(self, trace: BuiltTrace) -> _TraceRows:
        """Every row a new trace ends with, computed as ``_log_spans_once`` computes it."""
        m = self.m
        ak = m.SpanAttributeKey
        trace_id = trace.trace_id
        spans = trace.data
        min_start_ms = min(s.start_us for s in spans) * 1000 // 1_000_000
        max_end_ms = max(s.end_us for s in spans) * 1000 // 1_000_000
        root_status = None
        usage_nodes, cost_nodes, span_rows = [], [], []
        session_id = user_id = root_dict = None
        trace_tags: dict[str, str] = {}
        encoded: dict[int, tuple[Any, str]] = {}
        for span in spans:
            span_id, parent_id = span.span_id.hex(), span.parent_id.hex() if span.parent_id else None
            span_dict = self._stored_dict(span, trace_id, encoded)
            attrs = span_dict["attributes"]
            usage_nodes.append(m._span_aggregation_node(span_id, parent_id, attrs, ak.CHAT_USAGE))
            cost_nodes.append(m._span_aggregation_node(span_id, parent_id, attrs, ak.LLM_COST))
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
                    "trace_id": trace_id,
                    "experiment_id": self.location,
                    "span_id": span_id,
                    "parent_span_id": parent_id,
                    "name": span.name,
                    "type": span.attributes.get(ak.SPAN_TYPE),
                    "status": "OK" if span.error is None else "ERROR",
                    "start_time_unix_nano": span.start_us * 1000,
                    "end_time_unix_nano": span.end_us * 1000,
                    "content": self._encode(span_dict),
                    "input_cost": m.finite_float_or_none(cost_values.get("input_cost")),
                    "output_cost": m.finite_float_or_none(cost_values.get("output_cost")),
                    "total_cost": m.finite_float_or_none(cost_values.get("total_cost")),
                    "model_name": m.bounded_model_dimension(self._parse(attrs.get(ak.MODEL))),
                    "model_provider": m.bounded_model_dimension(self._parse(attrs.get(ak.MODEL_PROVIDER))),
                }
            )
            if parent_id is None:
                if root_status is None:
                    root_status = m.TraceState.ERROR.value if span.error is not None else m.TraceState.OK.value
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
            blank = SimpleNamespace(request_preview=None, response_preview=None)
            previews = m.SqlAlchemyStore._update_trace_info_attributes(None, blank, root_dict)
            info.update({col.key: v for col, v in previews.items()})
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
        return _TraceRows(info, span_rows, self._tags(trace_id, trace_tags), metadata)

    def _stored_dict(self, span: SpanData, request_id: str, encoded: dict[int, tuple[Any, str]]) -> dict[str, Any]:
        """``translate_span_when_storing(Span.from_otel_proto(span.to_otlp()))`` without the protobuf
        round trip: attributes JSON-encoded once, then MLflow's storage translation. ``encoded``: the
        trace's containers already encoded, by identity (outputs and ``raw_llm_response`` are one
        object, so are an attempt's inputs and the root's)."""
        ak = self.m.SpanAttributeKey
        attributes = {}
        for k, v in span.attributes.items():
            if v is None:
                continue
            t = type(v)
            if t is not dict and t is not list:
                attributes[k] = self._attribute(v)
            elif (seen := encoded.get(id(v))) is not None:
                attributes[k] = seen[1]
            else:
                attributes[k] = self._attribute(v)
                encoded[id(v)] = (v, attributes[k])
        attributes[ak.REQUEST_ID] = self._encode(request_id)
        head = {
            "trace_id": _b64(span.trace_id),
            "span_id": _b64(span.span_id),
            "parent_span_id": _b64(span.parent_id) if span.parent_id else None,
            "name": span.name,
        }
        if self._kind is not None:
            head["kind"] = self._kind
        return translate_for_storage(
            {
                **head,
                "start_time_unix_nano": span.start_us * 1000,
                "end_time_unix_nano": span.end_us * 1000,
                "events": [
                    {"name": name, "time_unix_nano": t, "attributes": {k: _plain(v) for k, v in attrs.items() if v is not None}}
                    for name, t, attrs in span.events
                ],
                "status": {"code": "STATUS_CODE_OK" if span.error is None else "STATUS_CODE_ERROR", "message": span.error or ""},
                "attributes": attributes,
                "links": [],
            },
            span.attributes,
        )

    def _attribute(self, value: Any) -> str:
        """``dump_span_attribute_value`` of the value as it comes back from OTLP protobuf."""
        t = type(value)
        if t is str:
            return self._encode_text(value)
        if t is bool:
            return "true" if value else "false"
        if t is int and -(2**63) <= value < 2**63:
            return int.__repr__(value)
        if t is float and math.isfinite(value):
            return float.__repr__(value)
        text = self._encode(value)
        if (t is dict or t is list) and _LONG_DIGITS.search(text) is None and not _too_deep(text, value):
            return text
        return self._encode(_wire(value))

    def _root_tags(self, attrs: dict[str, Any]) -> dict[str, str]:
        m = self.m
        prefix = m.SpanAttributeKey.TRACE_TAG_PREFIX
        tags: dict[str, str] = {}
        for attr_key, attr_value in attrs.items():
            if not attr_key.startswith(prefix):
                continue
            try:
                key, value = self._valid_tag(attr_key[len(prefix) :], str(self._parse(attr_value)))
            except Exception:
                continue
            if key == m.TraceTagKey.TRACE_NAME:
                value = m.validate_trace_name(value)
            tags[key] = value
        return tags

    def _artifact_template(self) -> tuple[str, str] | None:
        """MLflow's artifact location tag around a trace id, so a trace's is two concatenations
        (MLflow's URI helper costs a tenth of deriving a trace); None if ids do not go in verbatim."""
        m = self.m
        probe, other = "tr-" + "0" * 32, "tr-" + "f" * 32
        value = m.SqlAlchemyStore._get_trace_artifact_location_tag(None, self._experiment, probe).value
        if value.count(probe) != 1:
            return None
        before, after = value.split(probe)
        if m.SqlAlchemyStore._get_trace_artifact_location_tag(None, self._experiment, other).value != before + other + after:
            return None
        return before, after

    def _tags(self, trace_id: str, trace_tags: dict[str, str]) -> dict[str, str]:
        """In the order ``log_spans`` writes them (a later key wins): artifact location, spans
        location, resource attributes (none here), then the root span's ``mlflow.traceTag.*``."""
        m = self.m
        if self._artifact_uri is not None and _TRACE_ID.fullmatch(trace_id):
            artifact = (m.MLFLOW_ARTIFACT_LOCATION, self._artifact_uri[0] + trace_id + self._artifact_uri[1])
        else:
            tag = m.SqlAlchemyStore._get_trace_artifact_location_tag(None, self._experiment, trace_id)
            artifact = (tag.key, tag.value)
        tags = {artifact[0]: artifact[1], m.TraceTagKey.SPANS_LOCATION: m.SpansLocation.TRACKING_STORE.value}
        tags.update({k: v for k, v in trace_tags.items() if k != m.TraceTagKey.TRACE_NAME})
        return tags


@functools.cache
def _stored_kind() -> str | None:
    """The ``kind`` MLflow's ``Span.to_dict`` stores for our spans (all sent as CLIENT), after
    ``name``; None where it stores none (3.17: the key arrived in 3.18)."""
    from mlflow.entities.span import Span

    probe = SpanData(trace_id=b"\x01" * 16, span_id=b"\x01" * 8, parent_id=None, name="probe", start_us=1, end_us=2)
    return Span.from_otel_proto(probe.to_otlp()).to_dict().get("kind")


def _mlflow_spans(traces: list[BuiltTrace]) -> list[Any]:
    return [mlflow_span(s) for t in traces for s in t.spans]


def mlflow_span(proto: Any) -> Any:
    """An OTLP span as MLflow's ``/v1/traces`` hands it to ``log_spans``, so a database store gets
    what a server stores: ``Span.from_otel_proto``, then (3.18) one JSON layer off a text attribute
    that is itself JSON. Up to 3.17 ``log_spans`` did that step in every case (``sanitize_attributes``)."""
    from mlflow.entities.span import Span

    span = Span.from_otel_proto(proto)
    if (strip := _strip_otlp_double_encoding()) is not None:
        span._span._attributes = strip(span._span._attributes)
    return span


@functools.cache
def _strip_otlp_double_encoding() -> Any:
    from mlflow.tracing.otel import translation

    return getattr(translation, "strip_otlp_double_encoding", None)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("utf-8")


_LONG_DIGITS = re.compile(r"\d{19}")
_TRACE_ID = re.compile(r"tr-[0-9a-f]{32}")


def _too_deep(text: str, value: Any) -> bool:
    """Nested past what ``set_any`` sends as structure (the deeper part goes as JSON text): counted
    only when the text has enough brackets to be that deep at all."""
    if text.count("[") + text.count("{") <= MAX_ATTRIBUTE_DEPTH:
        return False
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth >= MAX_ATTRIBUTE_DEPTH:
            return True
        if type(node) is dict:
            stack.extend((v, depth + 1) for v in node.values() if type(v) is dict or type(v) is list)
        elif type(node) is list:
            stack.extend((v, depth + 1) for v in node if type(v) is dict or type(v) is list)
    return False


def _plain(value: Any) -> Any:
    """An event attribute (text or a number) as MLflow decodes it from OTLP."""
    return value if type(value) is not int or -(2**63) <= value < 2**63 else _wire(value)


def _wire(value: Any) -> Any:
    """A value as MLflow decodes it from an OTLP AnyValue we encoded (integers beyond int64 become text)."""
    from mlflow.tracing.utils.otlp import _decode_otel_proto_anyvalue
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    av = AnyValue()
    set_any(av, value)
    return _decode_otel_proto_anyvalue(av)


@dataclass(slots=True)
class _TraceRows:
    info: dict[str, Any]
    spans: list[dict[str, Any]]
    tags: dict[str, str]
    metadata: dict[str, str]


def translate_for_storage(span_dict: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """MLflow's ``translate_span_when_storing`` (3.17) for a span dict whose attributes were
    JSON-encoded once from ``values``. Its first step, ``sanitize_attributes``, JSON-decodes every
    attribute twice to undo double encoding; only a text value that itself parses as a JSON string,
    object or array can be affected, so only those are decoded here. The rest is MLflow's own steps."""
    from mlflow.entities.span import SpanType
    from mlflow.tracing.constant import SpanAttributeKey
    from mlflow.tracing.otel import translation as tr
    from mlflow.tracing.utils import calculate_cost_by_model_and_token_usage, dump_span_attribute_value, try_json_loads

    attributes = span_dict["attributes"]
    for key, value in values.items():
        if type(value) is str and value.lstrip(" \t\n\r")[:1] in _JSON_OPENERS:
            with contextlib.suppress(ValueError):
                json.loads(value)
                attributes[key] = value
    events = span_dict["events"]
    # Its result is only used for a span without a type (or UNKNOWN); ours always have one.
    if values.get(SpanAttributeKey.SPAN_TYPE) in (None, SpanType.UNKNOWN) and (mlflow_type := tr.translate_span_type_from_otel(attributes)):
        current_raw = attributes.get(SpanAttributeKey.SPAN_TYPE)
        current_type = try_json_loads(current_raw) if current_raw else None
        if current_type in (None, SpanType.UNKNOWN):
            attributes[SpanAttributeKey.SPAN_TYPE] = dump_span_attribute_value(mlflow_type)
    if SpanAttributeKey.INPUTS not in attributes and (input_value := tr._get_input_value(attributes, events)):
        attributes[SpanAttributeKey.INPUTS] = input_value
    if SpanAttributeKey.OUTPUTS not in attributes and (output_value := tr._get_output_value(attributes, events)):
        attributes[SpanAttributeKey.OUTPUTS] = output_value
    if SpanAttributeKey.CHAT_USAGE not in attributes and (token_usage := tr._get_token_usage(attributes)):
        attributes[SpanAttributeKey.CHAT_USAGE] = dump_span_attribute_value(token_usage)
    if SpanAttributeKey.MESSAGE_FORMAT not in attributes and (message_format := tr._get_message_format(attributes)):
        attributes[SpanAttributeKey.MESSAGE_FORMAT] = dump_span_attribute_value(message_format)
    if SpanAttributeKey.CHAT_TOOLS not in attributes and (tools := tr._get_tool_definitions(attributes)):
        attributes[SpanAttributeKey.CHAT_TOOLS] = tools
    if SpanAttributeKey.MODEL not in attributes and (model_name := tr._get_model_name(attributes)):
        attributes[SpanAttributeKey.MODEL] = dump_span_attribute_value(model_name)
    if SpanAttributeKey.MODEL_PROVIDER not in attributes and (model_provider := tr._get_model_provider(attributes)):
        attributes[SpanAttributeKey.MODEL_PROVIDER] = dump_span_attribute_value(model_provider)
    if SpanAttributeKey.LLM_COST not in attributes and SpanAttributeKey.CHAT_USAGE in attributes and SpanAttributeKey.MODEL in attributes:
        try:
            usage = json.loads(attributes[SpanAttributeKey.CHAT_USAGE])
            model = json.loads(attributes[SpanAttributeKey.MODEL])
            provider = json.loads(attributes[SpanAttributeKey.MODEL_PROVIDER]) if SpanAttributeKey.MODEL_PROVIDER in attributes else None
            if cost := calculate_cost_by_model_and_token_usage(model, usage, provider):
                attributes[SpanAttributeKey.LLM_COST] = dump_span_attribute_value(cost)
        except Exception:
            log.debug("cost calculation during storage translation failed", exc_info=True)
    return span_dict


_JSON_OPENERS = ('"', "{", "[")
