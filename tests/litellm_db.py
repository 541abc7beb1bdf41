"""Test support: LiteLLM's own LiteLLM_SpendLogs table in a PostgreSQL database, filled as the proxy fills it.

The DDL is what Prisma generates for ``model LiteLLM_SpendLogs`` in LiteLLM's schema.prisma (String ->
TEXT, Float -> DOUBLE PRECISION, Int -> INTEGER, DateTime -> TIMESTAMP(3), Json -> JSONB, @id -> primary
key, @@index -> indexes), as litellm_proxy_extras' migrations leave it. Rows go in the way LiteLLM's
ledger writer (litellm/repositories/spend_log_insert.py) inserts them: one ``jsonb_populate_recordset``
over the rows, JSON columns parsed from the JSON text the proxy builds (so stored as JSONB values), times
as UTC (``_ensure_datetime_utc``) into ``timestamp(3) without time zone``.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

TABLE = "LiteLLM_SpendLogs"
JSON_COLUMNS = frozenset({"metadata", "request_tags", "messages", "response", "proxy_server_request"})
TIME_COLUMNS = frozenset({"startTime", "endTime", "completionStartTime", "created_at", "updated_at"})
EXPORT = Path(__file__).resolve().parent.parent / "sample_logs" / "spend_logs_export.jsonl"

SPENDLOGS_DDL = """
CREATE TABLE "LiteLLM_SpendLogs" (
    "request_id" TEXT NOT NULL,
    "call_type" TEXT NOT NULL,
    "api_key" TEXT NOT NULL DEFAULT '',
    "spend" DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    "total_tokens" INTEGER NOT NULL DEFAULT 0,
    "prompt_tokens" INTEGER NOT NULL DEFAULT 0,
    "completion_tokens" INTEGER NOT NULL DEFAULT 0,
    "startTime" TIMESTAMP(3) NOT NULL,
    "endTime" TIMESTAMP(3) NOT NULL,
    "request_duration_ms" INTEGER,
    "completionStartTime" TIMESTAMP(3),
    "model" TEXT NOT NULL DEFAULT '',
    "model_id" TEXT DEFAULT '',
    "model_group" TEXT DEFAULT '',
    "custom_llm_provider" TEXT DEFAULT '',
    "api_base" TEXT DEFAULT '',
    "user" TEXT DEFAULT '',
    "metadata" JSONB DEFAULT '{}',
    "cache_hit" TEXT DEFAULT '',
    "cache_key" TEXT DEFAULT '',
    "request_tags" JSONB DEFAULT '[]',
    "team_id" TEXT,
    "organization_id" TEXT,
    "end_user" TEXT,
    "requester_ip_address" TEXT,
    "messages" JSONB DEFAULT '{}',
    "response" JSONB DEFAULT '{}',
    "session_id" TEXT,
    "status" TEXT,
    "mcp_namespaced_tool_name" TEXT,
    "billing_agent_id" TEXT,
    "agent_id" TEXT,
    "proxy_server_request" JSONB DEFAULT '{}',
    "litellm_call_id" TEXT,
    "created_at" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updated_at" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "LiteLLM_SpendLogs_pkey" PRIMARY KEY ("request_id")
);
CREATE INDEX "LiteLLM_SpendLogs_startTime_idx" ON "LiteLLM_SpendLogs"("startTime");
CREATE INDEX "LiteLLM_SpendLogs_startTime_request_id_idx" ON "LiteLLM_SpendLogs"("startTime", "request_id");
CREATE INDEX "LiteLLM_SpendLogs_end_user_idx" ON "LiteLLM_SpendLogs"("end_user");
CREATE INDEX "LiteLLM_SpendLogs_session_id_idx" ON "LiteLLM_SpendLogs"("session_id");
CREATE INDEX "LiteLLM_SpendLogs_litellm_call_id_idx" ON "LiteLLM_SpendLogs"("litellm_call_id");
CREATE INDEX "LiteLLM_SpendLogs_api_key_startTime_idx" ON "LiteLLM_SpendLogs"("api_key", "startTime");
"""


def create_spendlogs_table(url: str) -> None:
    """Create LiteLLM_SpendLogs (and its indexes) as LiteLLM's Prisma schema defines it for PostgreSQL."""
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(SPENDLOGS_DDL)


def _utc_text(value: Any) -> Any:
    """A time as LiteLLM hands it over: aware, in UTC (``_ensure_datetime_utc``); naive export text is UTC already."""
    if not isinstance(value, str):
        return value
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat()


def stored(row: dict[str, Any]) -> dict[str, Any]:
    """An export-shaped row as the proxy's writer passes it to PostgreSQL: JSON text parsed, times UTC."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in JSON_COLUMNS and isinstance(value, str):
            value = json.loads(value)
        elif key in TIME_COLUMNS:
            value = _utc_text(value)
        out[key] = value
    return out


def insert_rows(url: str, rows: list[dict[str, Any]], table: str = TABLE) -> None:
    """Insert export-shaped rows the way LiteLLM's writer does (``jsonb_populate_recordset``); a key the
    table has no column for is ignored, as the record type ignores it. ``created_at``/``updated_at``
    default to now when a row has none."""
    if not rows:
        return
    with psycopg.connect(url, autocommit=True) as con:
        have = {
            r[0].decode() if isinstance(r[0], bytes) else r[0]  # a SQL_ASCII database gives bytes
            for r in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s AND table_schema = 'public'", [table]
            )
        }
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            values = {k: v for k, v in stored(row).items() if k in have}
            groups.setdefault(tuple(values), []).append(values)
        for columns, group in groups.items():
            cols = ", ".join(f'"{c}"' for c in columns)
            con.execute(
                f'INSERT INTO "{table}" ({cols}) SELECT {cols} FROM jsonb_populate_recordset(NULL::"{table}", %s::jsonb)',
                [json.dumps(group)],
            )


def export_rows(path: Path = EXPORT) -> list[dict[str, Any]]:
    """The sample export's rows (``SELECT row_to_json(t) FROM "LiteLLM_SpendLogs" t``, JSON columns as JSON text)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@functools.cache
def _make_samples() -> ModuleType:
    """sample_logs/make_samples.py, loaded once (its spend_row is a pure function; loading it per row cost 1.5 ms a row)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_samples", EXPORT.parent / "make_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row_from_payload(slp: dict[str, Any], store_prompts: bool = False) -> dict[str, Any]:
    """A StandardLoggingPayload record (the capture's lines) as the SpendLogs row the proxy writes for it."""
    return _make_samples().spend_row(slp, store_prompts=store_prompts, naive=True)
