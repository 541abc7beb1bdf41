"""SpendLogsDB: LiteLLM_SpendLogs read from a real PostgreSQL, as LiteLLM creates and fills it."""

from __future__ import annotations

import json
import uuid
from typing import Any

import polars as pl
import psycopg
import pytest

from ingest.normalize import normalize_isolating
from ingest.sources import SourceError, SourceUnavailable, is_database_url, read_chunks
from ingest.spans import _json_value, build_traces
from ingest.spendlogs_db import CONNECT_TIMEOUT_S, Page, SpendLogsDB, _libpq_url, prisma_schema, shown_database, silence_bound
from tests.conftest import Postgres, free_port
from tests.litellm_db import EXPORT, create_spendlogs_table, export_rows, insert_rows

COMPARED = [
    "call_key",
    "call_key_from",
    "litellm_call_id",
    "request_id",
    "call_type",
    "status",
    "start_us",
    "end_us",
    "first_token_us",
    "stream",
    "model",
    "model_group",
    "model_id",
    "provider",
    "api_base",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "cache_hit",
    "session",
    "user",
    "end_user",
    "key_user_id",
    "key_alias",
    "key_hash",
    "team",
    "request_tags",
    "error_class",
    "error_code",
    "error_message",
]


@pytest.fixture
def spendlogs(postgres: Postgres) -> str:
    """A fresh database holding LiteLLM's (empty) SpendLogs table."""
    url = postgres.new_database()
    create_spendlogs_table(url)
    return url


def read_all(src: SpendLogsDB, after: tuple[str, str] | None = None, **bounds: Any) -> list[Page]:
    return list(src.pages(after, **bounds))


def lines_of(pages: list[Page]) -> pl.DataFrame:
    return pl.concat([p.lines for p in pages]) if pages else pl.DataFrame()


def ids_of(pages: list[Page]) -> list[str]:
    return [rid for p in pages for rid in p.keys["request_id"].to_list()]


def file_canonical() -> pl.DataFrame:
    frames = [c.lines for c in read_chunks(EXPORT)]
    canonical, bad = normalize_isolating(pl.concat(frames))
    assert not bad
    return canonical


def row(request_id: str, start: str, **fields: Any) -> dict[str, Any]:
    """A minimal row as the proxy writes it (prompts not stored)."""
    base = {
        "request_id": request_id,
        "call_type": "acompletion",
        "api_key": "hashed",
        "spend": 0.001,
        "total_tokens": 30,
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "startTime": start,
        "endTime": start,
        "model": "gpt-4o-mini",
        "metadata": "{}",
        "request_tags": "[]",
        "messages": "{}",
        "response": "{}",
        "proxy_server_request": "{}",
        "status": "success",
        "litellm_call_id": f"call-{request_id}",
    }
    return {**base, **fields}


def test_is_database_url() -> None:
    for url in (
        "postgresql://u:p@h/db",
        "postgres://h/db",
        "postgresql+psycopg://h/db",
        "POSTGRESQL+asyncpg://h/db",
        " postgres+psycopg2://h",
    ):
        assert is_database_url(url), url
    for spec in ("logs/x.jsonl", "s3://bucket/x", "sqlite:///x.db", "mysql://h/db", "postgresql:/x", "./postgresql://x"):
        assert not is_database_url(spec), spec


def test_rows_read_back_as_the_export_of_the_same_rows(spendlogs: str) -> None:
    insert_rows(spendlogs, export_rows())
    src = SpendLogsDB(spendlogs, page_rows=7)
    pages = read_all(src)
    assert [p.lines.height for p in pages] == [7] * 7
    assert not any(p.quarantined for p in pages)
    lines = lines_of(pages)
    assert lines.columns == ["source", "line_no", "offset", "raw", "truncated"]
    assert lines["line_no"].to_list() == list(range(1, 50))
    assert set(lines["source"]) == {f"{src.shown}#LiteLLM_SpendLogs"}
    db, bad = normalize_isolating(lines)
    assert not bad
    exported = file_canonical()
    assert db.height == exported.height == 49
    db, exported = db.sort("request_id"), exported.sort("request_id")
    for name in COMPARED:
        assert db[name].to_list() == exported[name].to_list(), name
    # messages and response, stored or not ({}), come through as in the export
    for a, b in zip(db.iter_rows(named=True), exported.iter_rows(named=True), strict=True):
        ra, rb = json.loads(a["raw"]), json.loads(b["raw"])
        assert ra["request_id"] == rb["request_id"] == a["request_id"]
        for key in ("messages", "response", "metadata", "request_tags", "proxy_server_request"):
            assert _json_value(ra[key]) == _json_value(rb[key]), key
    # and the traces built from them are the same, but for where each record was read
    built_db = {t.call_key: t for t in build_traces(db.sort("call_key", "start_us"), "1")}
    built_file = {t.call_key: t for t in build_traces(exported.sort("call_key", "start_us"), "1")}
    assert built_db.keys() == built_file.keys()
    for key, t in built_db.items():
        u = built_file[key]
        assert (t.trace_id, t.start_us, t.end_us, len(t.data)) == (u.trace_id, u.start_us, u.end_us, len(u.data))
        for sa, sb in zip(t.data, u.data, strict=True):
            assert (sa.span_id, sa.name, sa.start_us, sa.end_us, sa.error, sa.events) == (
                sb.span_id,
                sb.name,
                sb.start_us,
                sb.end_us,
                sb.error,
                sb.events,
            )
            attrs_a = {k: v for k, v in sa.attributes.items() if k != "litellm.log_source"}
            attrs_b = {k: v for k, v in sb.attributes.items() if k != "litellm.log_source"}
            assert attrs_a == attrs_b
            assert sa.attributes.get("litellm.log_source", src.source + ":").startswith(src.source + ":")
    # keys and the keyset position
    keys = pl.concat([p.keys for p in pages])
    assert keys.schema == pl.Schema({"request_id": pl.String, "start_us": pl.Int64})
    by_id = dict(zip(exported["request_id"], exported["start_us"], strict=True))
    assert all(by_id[r] == us for r, us in keys.iter_rows())
    assert keys["start_us"].is_sorted()
    last = pages[-1].last
    assert last[1] == keys["request_id"][-1]
    assert pages[-1].last[0].startswith("2026-11-27 ")


def test_keyset_pages_give_every_row_once_in_order_when_many_share_a_start(spendlogs: str) -> None:
    same = [row(f"r{i:03d}", "2026-11-27T10:00:00.500") for i in range(23)]
    before = [row(f"z{i}", "2026-11-27T09:59:59.999") for i in range(3)]
    after = [row(f"a{i}", "2026-11-27T10:00:00.501") for i in range(3)]
    insert_rows(spendlogs, same + before + after)
    pages = read_all(SpendLogsDB(spendlogs, page_rows=4))
    assert all(p.lines.height <= 4 for p in pages)
    assert ids_of(pages) == [f"z{i}" for i in range(3)] + [f"r{i:03d}" for i in range(23)] + [f"a{i}" for i in range(3)]
    for p in pages:
        assert p.last[1] == p.keys["request_id"][-1]
    assert len(pages) == 8  # 29 rows: 7 full pages and the last one that is not


def test_resume_after_a_position_and_rows_that_arrive_later(spendlogs: str) -> None:
    insert_rows(spendlogs, [row(f"r{i}", f"2026-11-27T10:00:0{i}.000") for i in range(6)])
    src = SpendLogsDB(spendlogs, page_rows=4)
    first = read_all(src)
    assert ids_of(first) == [f"r{i}" for i in range(6)]
    assert read_all(src, first[-1].last) == []
    assert ids_of(read_all(src, first[0].last)) == ["r4", "r5"]
    insert_rows(spendlogs, [row("r6", "2026-11-27T10:00:06.000"), row("r7", "2026-11-27T10:00:07.000")])
    again = read_all(src, first[-1].last)
    assert ids_of(again) == ["r6", "r7"]
    assert again[-1].lines["line_no"].to_list() == [9, 10]  # the running row number of this reader (8 rows read before)
    assert read_all(src, again[-1].last) == []
    # a position from another reader (the state file) is just text
    assert ids_of(read_all(SpendLogsDB(spendlogs), ("2026-11-27 10:00:05.5", ""))) == ["r6", "r7"]


def test_since_and_until_bound_the_rows_in_utc_whatever_the_session_time_zone(spendlogs: str) -> None:
    with psycopg.connect(spendlogs, autocommit=True) as con:
        name = con.info.dbname
        con.execute(f"ALTER DATABASE {name} SET timezone = 'Asia/Tokyo'")
        con.execute(f"ALTER DATABASE {name} SET datestyle = 'SQL, DMY'")
    insert_rows(spendlogs, [row(f"r{i}", f"2026-11-27T10:00:0{i}.250") for i in range(6)])
    base = 1_795_773_600_000_000  # 2026-11-27T10:00:00Z
    src = SpendLogsDB(spendlogs, page_rows=2)
    assert ids_of(read_all(src, since_us=base + 2_250_000)) == ["r2", "r3", "r4", "r5"]
    assert ids_of(read_all(src, until_us=base + 2_250_000)) == ["r0", "r1"]
    assert ids_of(read_all(src, since_us=base + 2_250_001, until_us=base + 4_250_001)) == ["r3", "r4"]
    pages = read_all(src)
    assert pages[0].keys["start_us"].to_list() == [base + 250_000, base + 1_250_000]
    assert json.loads(pages[0].lines["raw"][0])["startTime"] == "2026-11-27T10:00:00.25"
    canonical, bad = normalize_isolating(lines_of(pages))
    assert not bad and canonical["start_us"].to_list() == [base + i * 1_000_000 + 250_000 for i in range(6)]


def test_rows_without_stored_prompts_still_give_times_tokens_cost_and_status(spendlogs: str) -> None:
    rows = [r for r in export_rows() if r["messages"] == "{}" and r["response"] == "{}"]
    assert rows
    insert_rows(spendlogs, rows)
    canonical, bad = normalize_isolating(lines_of(read_all(SpendLogsDB(spendlogs))))
    assert not bad and canonical.height == len(rows)
    exported = {r["request_id"]: r for r in rows}
    for rec in canonical.iter_rows(named=True):
        src = exported[rec["request_id"]]
        assert rec["start_us"] is not None and rec["end_us"] >= rec["start_us"]
        assert (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]) == (
            src["prompt_tokens"],
            src["completion_tokens"],
            src["total_tokens"],
        )
        assert rec["cost"] == src["spend"] and rec["status"] == src["status"]
        assert _json_value(json.loads(rec["raw"])["messages"]) is None


def test_odd_rows_never_raise_and_the_rows_around_them_come_through(spendlogs: str) -> None:
    insert_rows(spendlogs, [row("a-before", "2026-11-27T10:00:00.000"), row("z-after", "2026-11-27T10:00:09.000")])
    nullable = [
        "request_duration_ms",
        "completionStartTime",
        "model_id",
        "model_group",
        "custom_llm_provider",
        "api_base",
        "user",
        "metadata",
        "cache_hit",
        "cache_key",
        "request_tags",
        "team_id",
        "organization_id",
        "end_user",
        "requester_ip_address",
        "messages",
        "response",
        "session_id",
        "status",
        "mcp_namespaced_tool_name",
        "billing_agent_id",
        "agent_id",
        "proxy_server_request",
        "litellm_call_id",
    ]
    with psycopg.connect(spendlogs, autocommit=True) as con:
        t = "2026-11-27 10:00:0{}"
        con.execute(
            'INSERT INTO "LiteLLM_SpendLogs" (request_id, call_type, "startTime", "endTime", ' + ", ".join(f'"{c}"' for c in nullable) + ")"
            " VALUES ('b-nulls', '', %s, %s, " + ", ".join("NULL" for _ in nullable) + ")",
            [t.format(1), t.format(1)],
        )
        odd_json = """ INSERT INTO "LiteLLM_SpendLogs"
            (request_id, call_type, "startTime", "endTime", metadata, request_tags, messages, response, proxy_server_request)
            VALUES (%s, 'acompletion', %s, %s, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb)"""
        con.execute(odd_json, ["c-json-scalars", t.format(2), t.format(2), '"text"', "5", "null", "true", "[1, 2]"])
        con.execute(odd_json, ["d-json-shapes", t.format(3), t.format(3), "[]", '{"a": 1}', '"hi"', "[]", '"x"'])
        con.execute(
            odd_json,
            [
                "e-nul-escape",
                t.format(4),
                t.format(4),
                "{}",
                '["\\u00e9", "日本"]',
                '[{"role": "user", "content": "é \\" \\\\ \\n"}]',
                "{}",
                "{}",
            ],
        )
        con.execute(
            'INSERT INTO "LiteLLM_SpendLogs" (request_id, call_type, "startTime", "endTime", spend, total_tokens, response)'
            " VALUES ('f-nan', 'acompletion', %s, %s, 'NaN', -5, %s::jsonb)",
            [t.format(5), t.format(5), json.dumps({"big": "x" * 3_000_000})],
        )
        con.execute(
            'INSERT INTO "LiteLLM_SpendLogs" (request_id, call_type, "startTime", "endTime", "completionStartTime")'
            " VALUES ('g-bad-times', 'acompletion', %s, 'infinity', '0001-01-01 BC')",
            [t.format(6)],
        )
        con.execute(
            'INSERT INTO "LiteLLM_SpendLogs" (request_id, call_type, "startTime", "endTime") VALUES (%s, %s, %s, %s)',
            ["h-weird id \"'\\ 日本", "acompletion", t.format(7), t.format(7)],
        )
    src = SpendLogsDB(spendlogs, page_rows=3)
    pages = read_all(src)
    assert ids_of(pages)[0] == "a-before" and ids_of(pages)[-1] == "z-after"
    assert len(ids_of(pages)) == 9 and not any(p.quarantined for p in pages)
    warnings: dict[str, int] = {}
    canonical, bad = normalize_isolating(lines_of(pages), warnings)
    assert canonical.height + len(bad) == 9
    got = set(canonical["request_id"])
    assert {"a-before", "z-after", "b-nulls", "e-nul-escape", "f-nan", "h-weird id \"'\\ 日本"} <= got
    assert warnings.get("nan_spend") == 1
    nulls = canonical.filter(pl.col("request_id") == "b-nulls").row(0, named=True)
    assert nulls["status"] == "success" and nulls["litellm_call_id"] is None and nulls["call_key"] == "b-nulls"
    reasons = {json.loads(q.raw)["request_id"]: q.reason for q in bad}
    assert reasons.get("g-bad-times") == "bad_time"
    assert "c-json-scalars" not in reasons and "c-json-scalars" in canonical["request_id"].to_list()  # metadata dropped, row kept
    e = json.loads(canonical.filter(pl.col("request_id") == "e-nul-escape")["raw"][0])
    assert _json_value(e["messages"]) == [{"role": "user", "content": 'é " \\ \n'}]
    # a row larger than a line may be is quarantined (as a file's over-long line), and the read goes on
    small = SpendLogsDB(spendlogs, page_rows=3)
    small.max_row_bytes = 1_000_000
    pages = read_all(small)
    quarantined = [q for p in pages for q in p.quarantined]
    assert [(q.reason, json.loads(q.raw[: q.raw.index(",")] + "}")["request_id"]) for q in quarantined] == [("line_too_long", "f-nan")]
    assert quarantined[0].raw_truncated and quarantined[0].source == small.source
    assert len(ids_of(pages)) == 8 and pages[-1].last[1] == "z-after"


def test_text_that_is_not_utf8_is_quarantined_not_raised(postgres: Postgres) -> None:
    with psycopg.connect(postgres.new_database().rsplit("/", 1)[0] + "/postgres", autocommit=True) as con:
        name = "t_sqlascii_" + str(free_port())
        con.execute(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    url = postgres.new_database().rsplit("/", 1)[0] + "/" + name
    create_spendlogs_table(url)
    insert_rows(url, [row("a", "2026-11-27T10:00:00"), row("c", "2026-11-27T10:00:02")])
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(
            """INSERT INTO "LiteLLM_SpendLogs" (request_id, call_type, "startTime", "endTime", model)"""
            """ VALUES ('b', 'acompletion', '2026-11-27 10:00:01', '2026-11-27 10:00:01',"""
            """ convert_from('\\x676f6f64ff'::bytea, 'SQL_ASCII'))"""
        )
    pages = read_all(SpendLogsDB(url))
    assert ids_of(pages) == ["a", "c"]
    [q] = pages[0].quarantined
    assert q.reason == "invalid_utf8" and "'model'" in q.detail and q.line == 2
    assert pages[0].lines["line_no"].to_list() == [1, 3] and pages[0].last[1] == "c"


def test_unknown_and_missing_columns(spendlogs: str, postgres: Postgres) -> None:
    with psycopg.connect(spendlogs, autocommit=True) as con:
        con.execute(
            'ALTER TABLE "LiteLLM_SpendLogs" ADD COLUMN future_tags TEXT[], ADD COLUMN future_id UUID, ADD COLUMN future_cost NUMERIC'
        )
        con.execute('ALTER TABLE "LiteLLM_SpendLogs" ADD COLUMN future_at TIMESTAMPTZ, ADD COLUMN future_doc JSON')
    insert_rows(spendlogs, export_rows()[:3])
    with psycopg.connect(spendlogs, autocommit=True) as con:
        con.execute(
            """UPDATE "LiteLLM_SpendLogs" SET future_tags = ARRAY['a', 'b"c'], future_id = gen_random_uuid(),
               future_cost = 12345678901234567890.5, future_at = '2026-01-01 00:00:00+02', future_doc = '{"k": [1, 2]}'"""
        )
    pages = read_all(SpendLogsDB(spendlogs))
    raw = json.loads(pages[0].lines["raw"][0])
    assert raw["future_tags"] == ["a", 'b"c'] and raw["future_cost"] == 12345678901234567890.5
    assert raw["future_at"] == "2025-12-31T22:00:00+00" and raw["future_doc"] == '{"k": [1, 2]}'
    canonical, bad = normalize_isolating(lines_of(pages))
    assert not bad and canonical.height == 3

    older = postgres.new_database()
    create_spendlogs_table(older)
    with psycopg.connect(older, autocommit=True) as con:
        for col in ("completionStartTime", "litellm_call_id", "session_id", "metadata", "request_tags", "messages", "response", "status"):
            con.execute(f'ALTER TABLE "LiteLLM_SpendLogs" DROP COLUMN "{col}"')
    insert_rows(older, export_rows()[:5])
    canonical, bad = normalize_isolating(lines_of(read_all(SpendLogsDB(older))))
    assert not bad and canonical.height == 5
    assert canonical["call_key_from"].to_list() == ["request_id"] * 5 and canonical["first_token_us"].null_count() == 5


def test_check_says_what_is_wrong_in_one_line_without_the_password(postgres: Postgres) -> None:
    url = postgres.new_database()
    secret = "s3cr3t-Pa55"
    with_password = url.replace("postgres@", f"postgres:{secret}@")
    with pytest.raises(SourceUnavailable, match="no table 'LiteLLM_SpendLogs'") as e:  # exit 8: migrations may come
        SpendLogsDB(with_password).check()
    assert secret not in str(e.value) and "postgres:***@" in str(e.value)
    create_spendlogs_table(url)
    SpendLogsDB(with_password).check()
    role = f"no_grant_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(f"CREATE ROLE {role} LOGIN")
    with pytest.raises(SourceError, match="permission denied") as e:  # it was told as missing columns
        SpendLogsDB(url.replace("postgres@", f"{role}@")).check()
    assert "no column" not in str(e.value)
    with pytest.raises(SourceUnavailable, match="no table 'Other'"):
        SpendLogsDB(url, table="Other").check()

    port = free_port()
    unreachable = f"postgresql+psycopg://ingest:{secret}@127.0.0.1:{port}/litellm"
    with pytest.raises(SourceError, match="cannot connect to") as e:
        SpendLogsDB(unreachable).check()
    message = str(e.value)
    assert secret not in message and "\n" not in message and f"127.0.0.1:{port}" in message

    no_db = with_password.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(SourceError, match="no_such_db") as e:
        SpendLogsDB(no_db).check()
    assert secret not in str(e.value) and "\n" not in str(e.value)

    in_query = f"postgresql://postgres@127.0.0.1:{port}/litellm?sslmode=disable&password={secret}"
    with pytest.raises(SourceError, match="cannot connect to") as e:
        SpendLogsDB(in_query).check()
    assert secret not in str(e.value) and "password=***" in str(e.value) and secret not in SpendLogsDB(in_query).source

    no_role = url.replace("postgres@", f"nobody:{secret}@")
    with pytest.raises(SourceError, match="nobody") as e:
        SpendLogsDB(no_role).check()
    assert secret not in str(e.value)

    with psycopg.connect(url, autocommit=True) as con:
        con.execute('ALTER TABLE "LiteLLM_SpendLogs" DROP COLUMN "endTime"')
    with pytest.raises(SourceError, match="no column 'endTime'"):
        SpendLogsDB(url).check()


def test_the_session_is_read_only(spendlogs: str) -> None:
    insert_rows(spendlogs, [row("r0", "2026-11-27T10:00:00")])
    src = SpendLogsDB(spendlogs)
    assert ids_of(read_all(src)) == ["r0"]
    conn = src._connect()
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("""INSERT INTO "LiteLLM_SpendLogs" (request_id, call_type, "startTime", "endTime") VALUES ('x', '', now(), now())""")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), conn.transaction():
        conn.execute("""DELETE FROM "LiteLLM_SpendLogs" """)
    assert conn.execute("SHOW transaction_read_only").fetchone() == ("on",)
    src.close()
    assert ids_of(read_all(src)) == ["r0"]  # reconnects


def test_page_byte_budget_ends_a_page_early(spendlogs: str) -> None:
    insert_rows(spendlogs, [row(f"r{i}", f"2026-11-27T10:00:0{i}", response=json.dumps({"t": "x" * 5000})) for i in range(6)])
    pages = read_all(SpendLogsDB(spendlogs, page_rows=100, page_bytes=12_000))
    assert [p.lines.height for p in pages] == [3, 3]
    assert ids_of(pages) == [f"r{i}" for i in range(6)]


@pytest.mark.parametrize(
    ("url", "env", "bound"),
    [
        ("postgresql://u:pw@h/db", None, CONNECT_TIMEOUT_S),
        ("postgresql+psycopg://u:pw@h/db?sslmode=disable&connect_timeout=3", None, 3),
        ("postgresql://h/db?connect_timeout=1", None, 2),
        ("postgresql://h/db?connect_timeout=soon", None, CONNECT_TIMEOUT_S),
        ("postgresql://h/db?connect_timeout=0", None, CONNECT_TIMEOUT_S),
        ("postgresql://h/db", "4", 4),
        ("postgresql://h/db?connect_timeout=6", "4", 6),
    ],
)
def test_the_urls_connect_timeout_bounds_a_silent_read_and_is_not_part_of_the_tables_name(
    url: str, env: str | None, bound: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg's keyword argument overrode a ``connect_timeout`` the user gave in the URL; it is the
    silence bound now (libpq's 2 s floor; 0 or no number: ours). The table's name in the state and
    ledger leaves it out, so setting one does not read the table again."""
    if env is None:
        monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("PGCONNECT_TIMEOUT", env)
    assert silence_bound(url) == bound
    assert "connect_timeout" not in shown_database(url) and "pw" not in shown_database(url)
    assert SpendLogsDB(url).source == SpendLogsDB(url.partition("?")[0]).source or "sslmode" in url


def test_a_prisma_url_loses_only_prismas_own_parameters_and_any_other_url_is_kept_byte_for_byte() -> None:
    """libpq refuses Prisma's parameters; a URL without them is not rewritten (decoding and encoding it
    again turned a ``+`` in a password into a space)."""
    plain = "postgresql://u:p@h/db?sslmode=require&password=s3cr+t&application_name=a%2Bb"
    assert _libpq_url(plain) == plain and prisma_schema(plain) is None
    prisma = "postgresql+psycopg://u@h/db?schema=LiteLLM%20Proxy&connection_limit=10&password=s3cr+t&pool_timeout=60&pgbouncer=true"
    assert _libpq_url(prisma) == "postgresql://u@h/db?password=s3cr+t"
    assert prisma_schema(prisma) == "LiteLLM Proxy"
    assert _libpq_url("postgresql://h/db?schema=x") == "postgresql://h/db"
    assert shown_database(prisma) == shown_database("postgresql+psycopg://u@h/db?schema=LiteLLM%20Proxy&password=s3cr+t")
    # a parameter's name is read as libpq reads it, percent-decoded, by what is sent and what is kept alike
    encoded = "postgresql://h/db?connection%5Flimit=10&connect%5Ftimeout=5&sslmode=require"
    assert _libpq_url(encoded) == "postgresql://h/db?connect%5Ftimeout=5&sslmode=require"
    assert shown_database(encoded) == shown_database("postgresql://h/db?sslmode=require") == "postgresql://h/db?sslmode=require"
