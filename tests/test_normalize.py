"""Normalize: raw lines of both input formats -> canonical columns; bad lines -> quarantine, good ones kept."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import orjson
import polars as pl
import pytest

from ingest.normalize import CANONICAL, MAX_DEPTH, MAX_EPOCH_S, clean, normalize, too_deep
from ingest.quarantine import QuarantineRecord
from ingest.sources import read_chunks, split_lines
from tests.conftest import spend_row

ROOT = Path(__file__).resolve().parent.parent
SRC = "logs/proxy.jsonl"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SLP = "standard_logging_payload"
SPEND = "spend_logs"


# --- helpers -------------------------------------------------------------------------------------


def line_of(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def frame_of(
    items: list[object], source: str = SRC, start_offset: int = 0, start_line: int = 1
) -> tuple[pl.DataFrame, list[tuple[int, int]]]:
    """A line frame from records/strings, and the (line_no, offset) of each line computed by hand."""
    lines = [line_of(x).encode() for x in items]
    data = b"".join(b + b"\n" for b in lines)
    frame, bad = split_lines(source, data, start_offset, start_line)
    assert bad == []
    pos, off = [], start_offset
    for i, b in enumerate(lines):
        pos.append((start_line + i, off))
        off += len(b) + 1
    return frame, pos


def run(items: list[object], **kw) -> tuple[pl.DataFrame, list[QuarantineRecord], list[tuple[int, int]]]:
    frame, pos = frame_of(items, **kw)
    out, q = normalize(frame)
    return out, q, pos


def epoch_us(x: float | int | None) -> int | None:
    """Float epoch seconds (as JSON writes them: at most 6 decimals) -> exact integer microseconds."""
    if x is None:
        return None
    return int((Decimal(repr(x)) * 1_000_000).to_integral_value(rounding=ROUND_HALF_EVEN))


def iso_us(text: str | None) -> int | None:
    """Independent ISO parse (stdlib); naive means UTC."""
    if text is None:
        return None
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - EPOCH) // timedelta(microseconds=1)


def blank(v: str | None) -> str | None:
    return v if v not in (None, "") else None


def by_line(out: pl.DataFrame) -> dict[int, dict]:
    return {r["line_no"]: r for r in out.to_dicts()}


def assert_quarantined(
    q: list[QuarantineRecord], line_no: int, offset: int, reason: str, raw: str | None = None, source: str = SRC
) -> None:
    assert len(q) == 1, q
    r = q[0]
    assert (r.source, r.line, r.offset, r.reason) == (source, line_no, offset, reason), r
    assert r.detail
    if raw is not None:
        assert r.raw == raw


def assert_kept(out: pl.DataFrame, pos: list[tuple[int, int]], records: dict[int, dict], id_field: str = "litellm_call_id") -> None:
    """The lines at the given indexes are all in the output, at their own line and offset, with their own call key."""
    got = by_line(out)
    assert set(got) == {pos[i][0] for i in records}
    for i, rec in records.items():
        row = got[pos[i][0]]
        assert row["offset"] == pos[i][1]
        assert row["source"] == SRC
        assert row["call_key"] == rec[id_field]


def spend_rows(capture: list[dict]) -> list[dict]:
    """Every capture record as an exported SpendLogs row, the way make_samples.py writes them."""
    return [spend_row(r, store_prompts=i % 3 != 0, naive=i % 4 != 3) for i, r in enumerate(capture)]


@pytest.fixture
def good(capture: list[dict]) -> list[dict]:
    """Three distinct real records to surround a bad line with."""
    return [copy.deepcopy(capture[i]) for i in (0, 14, 23)]


# --- StandardLoggingPayload ------------------------------------------------------------------------


def test_slp_capture_maps_to_canonical(tmp_path: Path, capture: list[dict]) -> None:
    f = tmp_path / "proxy.jsonl"
    data = "".join(json.dumps(r) + "\n" for r in capture).encode()
    f.write_bytes(data)
    chunks = list(read_chunks(f, chunk_bytes=4096))
    out, q = normalize(pl.concat([c.lines for c in chunks]))
    assert q == []
    assert out.height == len(capture) == 49
    assert out.schema == pl.Schema(CANONICAL)
    rows = out.to_dicts()
    offset = 0
    for i, (row, r) in enumerate(zip(rows, capture, strict=True)):
        line = json.dumps(r)
        md = r["metadata"]
        ei = r.get("error_information") or {}
        assert row["source"] == str(f)
        assert row["line_no"] == i + 1
        assert row["offset"] == offset
        assert row["raw"] == line
        offset += len(line.encode()) + 1
        assert row["format"] == SLP
        assert row["call_key"] == r["litellm_call_id"]
        assert row["call_key_from"] == "litellm_call_id"
        assert row["litellm_call_id"] == r["litellm_call_id"]
        assert row["request_id"] == r["id"]
        assert row["litellm_trace_id"] == r["trace_id"]
        assert row["call_type"] == r["call_type"]
        assert row["status"] == r["status"]
        assert row["start_us"] == epoch_us(r["startTime"]), (i, r["startTime"])
        assert row["end_us"] == epoch_us(r["endTime"]), (i, r["endTime"])
        assert row["first_token_us"] == epoch_us(r["completionStartTime"])
        assert row["stream"] is bool(r["stream"])
        assert row["model"] == blank(r["model"])
        assert row["model_group"] == blank(r["model_group"])
        assert row["model_id"] == blank(r["model_id"])
        assert row["provider"] == blank(r["custom_llm_provider"])
        assert row["api_base"] == blank(r["api_base"])
        assert row["prompt_tokens"] == r["prompt_tokens"]
        assert row["completion_tokens"] == r["completion_tokens"]
        assert row["total_tokens"] == r["total_tokens"]
        assert row["cost"] == r["response_cost"]
        assert row["saved_cache_cost"] == r["saved_cache_cost"]
        assert row["cache_hit"] is bool(r["cache_hit"])
        assert row["session"] == (blank(r["session_id"]) or r["trace_id"])
        assert row["user"] == (blank(r["end_user"]) or md["user_api_key_user_id"])
        assert row["end_user"] == blank(r["end_user"])
        assert row["key_user_id"] == md["user_api_key_user_id"]
        assert row["key_alias"] == blank(md["user_api_key_alias"])
        assert row["key_hash"] == md["user_api_key_hash"]
        assert row["team"] == (blank(md["user_api_key_team_alias"]) or blank(md["user_api_key_team_id"]))
        assert row["request_tags"] == r["request_tags"]
        assert row["error_class"] == blank(ei.get("error_class"))
        assert row["error_code"] == blank(ei.get("error_code"))
        assert row["error_message"] == (blank(ei.get("error_message")) or blank(r["error_str"]))


def test_slp_capture_covers_the_interesting_cases(capture: list[dict]) -> None:
    """Guard: the mapping test above really sees streams, failures, a cache hit, end users and sessions."""
    out, q, _ = run(capture)
    assert q == []
    assert out["stream"].sum() == sum(1 for r in capture if r["stream"]) > 0
    assert out["cache_hit"].sum() == 1
    failures = out.filter(pl.col("status") == "failure")
    assert failures.height == sum(1 for r in capture if r["status"] == "failure") > 0
    assert failures["error_class"].null_count() == 0
    assert failures["error_code"].null_count() == 0
    assert failures["error_message"].null_count() == 0
    assert out.filter(pl.col("status") == "success")["error_class"].null_count() == out.filter(pl.col("status") == "success").height
    assert {"user-123", "user-456", "user-stream-7"} <= set(out["user"])
    assert {"sess-A", "sess-B", "sess-multiturn-001", "trace-explicit-001"} <= set(out["session"])
    assert out.filter(pl.col("user") == "user-stream-7")["request_tags"][0].to_list()[:2] == ["team:b", "feature:stream"]


def test_slp_session_id_wins_over_trace_id(capture: list[dict]) -> None:
    r = copy.deepcopy(capture[0])
    r["session_id"] = "sess-correlated"
    out, q, _ = run([r, capture[1]])
    assert q == []
    assert out["session"].to_list() == ["sess-correlated", capture[1]["trace_id"]]


def test_slp_user_falls_back_to_key_user_id(capture: list[dict]) -> None:
    a = copy.deepcopy(capture[0])
    a["end_user"] = "end-user-1"
    a["metadata"]["user_api_key_user_id"] = "key-user-1"
    b = copy.deepcopy(capture[0])
    b["end_user"] = ""
    b["metadata"]["user_api_key_user_id"] = "key-user-2"
    b["litellm_call_id"] = "other-call"
    c = copy.deepcopy(b)
    c["end_user"] = None
    c["metadata"]["user_api_key_user_id"] = None
    c["litellm_call_id"] = "third-call"
    out, q, _ = run([a, b, c])
    assert q == []
    assert out["user"].to_list() == ["end-user-1", "key-user-2", None]
    assert out["end_user"].to_list() == ["end-user-1", None, None]
    assert out["key_user_id"].to_list() == ["key-user-1", "key-user-2", None]


@pytest.mark.parametrize(
    "seconds",
    [1795788109.313645, 1795788109.000001, 1795788109.999999, 1795788110.0, 1795788110, 1.5e9 + 0.000005, 1795788161.7831693],
)
def test_slp_epoch_seconds_to_exact_microseconds(capture: list[dict], seconds: float) -> None:
    r = copy.deepcopy(capture[0])
    r["startTime"] = seconds
    r["endTime"] = seconds
    r["completionStartTime"] = seconds
    out, q, _ = run([r])
    assert q == []
    expected = int((Decimal(repr(seconds)) * 1_000_000).to_integral_value(rounding=ROUND_HALF_EVEN))
    assert out["start_us"][0] == out["end_us"][0] == out["first_token_us"][0] == expected


def test_slp_stream_true_false_null(capture: list[dict]) -> None:
    recs = []
    for i, v in enumerate([True, False, None]):
        r = copy.deepcopy(capture[0])
        r["litellm_call_id"] = f"call-{i}"
        r["stream"] = v
        recs.append(r)
    out, q, _ = run(recs)
    assert q == []
    assert out["stream"].to_list() == [True, False, False]


def test_slp_minimal_record(capture: list[dict]) -> None:
    """Only the required times and an id: the rest of the canonical columns are empty or defaulted."""
    r = {"litellm_call_id": "c-1", "startTime": 1795788109.5, "endTime": 1795788110.25}
    out, q, pos = run([r])
    assert q == []
    row = out.to_dicts()[0]
    assert (row["line_no"], row["offset"]) == pos[0]
    assert row["call_key"] == "c-1"
    assert row["start_us"] == 1795788109_500000
    assert row["end_us"] == 1795788110_250000
    assert row["first_token_us"] is None
    assert row["stream"] is False
    assert row["cache_hit"] is False
    assert row["status"] == "success"
    assert row["call_type"] == "completion"
    assert row["request_tags"] is None
    assert row["session"] is None
    assert row["user"] is None


# --- SpendLogs -------------------------------------------------------------------------------------


def assert_spend_row(row: dict, s: dict) -> None:
    md = s["metadata"] if isinstance(s["metadata"], dict) else json.loads(s["metadata"])
    tags = s["request_tags"] if isinstance(s["request_tags"], list) else json.loads(s["request_tags"])
    ei = md.get("error_information") or {}
    assert row["format"] == SPEND
    assert row["call_key"] == s["litellm_call_id"]
    assert row["call_key_from"] == "litellm_call_id"
    assert row["litellm_call_id"] == s["litellm_call_id"]
    assert row["request_id"] == s["request_id"]
    assert row["call_type"] == s["call_type"]
    assert row["status"] == s["status"]
    assert row["start_us"] == iso_us(s["startTime"])
    assert row["end_us"] == iso_us(s["endTime"])
    assert row["first_token_us"] == iso_us(s["completionStartTime"])
    assert row["cost"] == s["spend"]
    assert row["prompt_tokens"] == s["prompt_tokens"]
    assert row["completion_tokens"] == s["completion_tokens"]
    assert row["total_tokens"] == s["total_tokens"]
    assert row["model"] == blank(s["model"])
    assert row["model_group"] == blank(s["model_group"])
    assert row["model_id"] == blank(s["model_id"])
    assert row["provider"] == blank(s["custom_llm_provider"])
    assert row["api_base"] == blank(s["api_base"])
    assert row["cache_hit"] is (str(s["cache_hit"]).lower() == "true")
    assert row["session"] == blank(s["session_id"])
    assert row["user"] == (blank(s["end_user"]) or blank(s["user"]))
    assert row["key_user_id"] == blank(s["user"])
    assert row["key_hash"] == blank(s["api_key"])
    assert row["key_alias"] == blank(md["user_api_key_alias"])
    assert row["team"] == (blank(md["user_api_key_team_alias"]) or blank(md["user_api_key_team_id"]) or blank(s["team_id"]))
    assert row["request_tags"] == tags
    assert row["error_class"] == blank(ei.get("error_class"))
    assert row["error_code"] == blank(ei.get("error_code"))
    assert row["error_message"] == blank(ei.get("error_message"))


def test_spend_logs_capture_maps_to_canonical(capture: list[dict]) -> None:
    rows = spend_rows(capture)
    assert any(r["startTime"].endswith("+00:00") for r in rows)
    assert any(not r["startTime"].endswith("+00:00") for r in rows)
    out, q, pos = run(rows)
    assert q == []
    assert out.height == len(rows)
    assert out.schema == pl.Schema(CANONICAL)
    for row, s, (line_no, offset) in zip(out.to_dicts(), rows, pos, strict=True):
        assert (row["source"], row["line_no"], row["offset"]) == (SRC, line_no, offset)
        assert row["raw"] == json.dumps(s)
        assert_spend_row(row, s)
    # The error columns really are exercised: failures carry error_information in metadata.
    assert out.filter(pl.col("status") == "failure")["error_class"].null_count() == 0
    assert out["cache_hit"].sum() == 1


@pytest.mark.parametrize("column", ["metadata", "request_tags"])
@pytest.mark.parametrize("empty", ["", "  "])
def test_spend_logs_empty_text_column_is_no_value(capture: list[dict], column: str, empty: str) -> None:
    """A SpendLogs text column holding an empty string is nothing, as a NULL one: the row is a
    trace (it was quarantined whole, ``unbuildable`` by a polars ShapeError)."""
    rows = spend_rows(capture)[:3]
    rows[1] = {**rows[1], column: empty}
    out, q, _ = run(rows)
    assert q == [] and out.height == 3
    assert out["call_key"].null_count() == 0


def test_spend_logs_json_values_same_as_json_text(capture: list[dict]) -> None:
    as_text = spend_rows(capture)
    as_values = []
    for s in as_text:
        s = dict(s)
        s["metadata"] = json.loads(s["metadata"])
        s["request_tags"] = json.loads(s["request_tags"])
        as_values.append(s)
    out_t, q_t, _ = run(as_text)
    out_v, q_v, _ = run(as_values)
    assert q_t == [] and q_v == []
    for row, s in zip(out_v.to_dicts(), as_values, strict=True):
        assert_spend_row(row, s)
    skip = {"raw", "offset"}
    assert out_t.drop(*skip).to_dicts() == out_v.drop(*skip).to_dicts()


def test_spend_logs_null_metadata_and_tags(capture: list[dict]) -> None:
    s = spend_row(capture[0], store_prompts=False, naive=True)
    s["metadata"] = None
    s["request_tags"] = None
    out, q, _ = run([s])
    assert q == []
    row = out.to_dicts()[0]
    assert row["call_key"] == s["litellm_call_id"]
    assert row["request_tags"] is None
    assert row["key_alias"] is None
    assert row["error_class"] is None


def _spend_times(capture: list[dict], start: str, end: str, first: str | None = None) -> dict:
    s = spend_row(capture[0], store_prompts=False, naive=True)
    s["startTime"], s["endTime"], s["completionStartTime"] = start, end, first
    return s


START = datetime(2026, 11, 27, 10, 11, 12, 345678, tzinfo=UTC)
END = START + timedelta(seconds=1, microseconds=654321)


def _fmt(dt: datetime, sep: str = "T", frac: str = "us", tz: str = "") -> str:
    base = dt.strftime(f"%Y-%m-%d{sep}%H:%M:%S")
    if frac == "us":
        base += dt.strftime(".%f")
    elif frac == "ms":
        base += f".{dt.microsecond // 1000:03d}"
    return base + tz


def _local(dt: datetime, hours: int, minutes: int = 0) -> datetime:
    return dt.astimezone(timezone(timedelta(hours=hours, minutes=minutes)))


TIME_FORMS = {
    "naive_is_utc": lambda dt: _fmt(dt),
    "naive_ms": lambda dt: _fmt(dt, frac="ms"),
    "naive_no_fraction": lambda dt: _fmt(dt, frac=""),
    "Z": lambda dt: _fmt(dt, tz="Z"),
    "Z_no_fraction": lambda dt: _fmt(dt, frac="", tz="Z"),
    "plus_00_00": lambda dt: _fmt(dt, tz="+00:00"),
    "plus_02_00": lambda dt: _fmt(_local(dt, 2), tz="+02:00"),
    "minus_05_30": lambda dt: _fmt(_local(dt, -5, -30), tz="-05:30"),
    "plus_0200_compact": lambda dt: _fmt(_local(dt, 2), tz="+0200"),
    "space_separator": lambda dt: _fmt(dt, sep=" "),
    "space_separator_offset": lambda dt: _fmt(_local(dt, 2), sep=" ", tz="+02:00"),
    "short_plus_00": lambda dt: _fmt(dt, tz="+00"),
    "space_short_plus_00": lambda dt: _fmt(dt, sep=" ", tz="+00"),
    "short_plus_05": lambda dt: _fmt(_local(dt, 5), tz="+05"),
    "short_minus_03": lambda dt: _fmt(_local(dt, -3), tz="-03"),
    "lowercase_t": lambda dt: _fmt(dt, sep="t"),
    "lowercase_t_z": lambda dt: _fmt(dt, sep="t", tz="z"),
    "space_UTC": lambda dt: _fmt(dt, sep=" ", tz=" UTC"),
    "UTC": lambda dt: _fmt(dt, tz="UTC"),
    "psql_timestamptz_ms": lambda dt: _fmt(dt, sep=" ", frac="ms", tz="+00"),
}


def _truncate(dt: datetime, form: str) -> datetime:
    if "no_fraction" in form:
        return dt.replace(microsecond=0)
    if form.endswith("_ms") or "_ms_" in form:
        return dt.replace(microsecond=dt.microsecond // 1000 * 1000)
    return dt


@pytest.mark.parametrize("form", list(TIME_FORMS))
def test_spend_logs_iso_time_forms(capture: list[dict], form: str) -> None:
    fmt = TIME_FORMS[form]
    first = START + timedelta(milliseconds=250)
    s = _spend_times(capture, fmt(START), fmt(END), fmt(first))
    out, q, _ = run([s])
    assert q == []
    row = out.to_dicts()[0]
    expect = {k: (_truncate(v, form) - EPOCH) // timedelta(microseconds=1) for k, v in {"s": START, "e": END, "f": first}.items()}
    assert (row["start_us"], row["end_us"], row["first_token_us"]) == (expect["s"], expect["e"], expect["f"]), s["startTime"]


def test_spend_logs_offset_times_are_the_same_instant(capture: list[dict]) -> None:
    """One instant written four ways gives one start_us."""
    texts = [_fmt(START), _fmt(START, tz="Z"), _fmt(_local(START, 2), tz="+02:00"), _fmt(_local(START, -7), sep=" ", tz="-07:00")]
    rows = []
    for i, t in enumerate(texts):
        s = _spend_times(capture, t, _fmt(END, tz="Z"))
        s["litellm_call_id"] = f"call-{i}"
        rows.append(s)
    out, q, _ = run(rows)
    assert q == []
    assert out["start_us"].to_list() == [(START - EPOCH) // timedelta(microseconds=1)] * 4


@pytest.mark.parametrize(
    ("value", "expected"), [("True", True), ("False", False), ("true", True), (True, True), (False, False), (None, False)]
)
def test_spend_logs_cache_hit(capture: list[dict], value: object, expected: bool) -> None:
    s = spend_row(capture[0], store_prompts=False, naive=True)
    s["cache_hit"] = value
    out, q, _ = run([s])
    assert q == []
    assert out["cache_hit"].to_list() == [expected]


def test_spend_logs_request_id_only(capture: list[dict]) -> None:
    """Older exports have no litellm_call_id column: request_id is the call key."""
    s = spend_row(capture[0], store_prompts=False, naive=True)
    del s["litellm_call_id"]
    out, q, _ = run([s])
    assert q == []
    assert out["call_key"].to_list() == [s["request_id"]]
    assert out["call_key_from"].to_list() == ["request_id"]


# --- format detection ------------------------------------------------------------------------------


def test_mixed_formats_detected_per_record(capture: list[dict]) -> None:
    spend = spend_rows(capture)
    items: list[dict] = []
    kinds: list[str] = []
    for i in range(len(capture)):
        if i % 2:
            s = dict(spend[i])
            s["litellm_call_id"] = f"spend-{i}"
            items.append(s)
            kinds.append(SPEND)
        else:
            items.append(capture[i])
            kinds.append(SLP)
    out, q, pos = run(items)
    assert q == []
    assert out.height == len(items)
    got = by_line(out)
    for i, (item, kind) in enumerate(zip(items, kinds, strict=True)):
        row = got[pos[i][0]]
        assert row["offset"] == pos[i][1]
        assert row["format"] == kind
        if kind == SPEND:
            assert_spend_row(row, item)
        else:
            assert row["call_key"] == item["litellm_call_id"]
            assert row["start_us"] == epoch_us(item["startTime"])
            assert row["cost"] == item["response_cost"]
    # Output is in line order, whatever the formats.
    assert out["line_no"].to_list() == [p[0] for p in pos]


def test_slp_with_nested_request_id_and_spend_is_still_slp(capture: list[dict]) -> None:
    """Clients may send any metadata (a `request_id`, a `spend` budget); nested keys must not flip the format."""
    r = copy.deepcopy(capture[0])
    r["metadata"]["requester_metadata"] = {"request_id": "client-req-1", "spend": 1.5}
    out, q, _ = run([r])
    assert q == []
    row = out.to_dicts()[0]
    assert row["format"] == SLP
    assert row["call_key"] == r["litellm_call_id"]
    assert row["start_us"] == epoch_us(r["startTime"])


def test_slp_that_gains_top_level_request_id_and_spend_is_still_slp(capture: list[dict]) -> None:
    """SpendLogs' key names on a payload (a field a later proxy may add) do not make it a SpendLogs row: its times are numbers."""
    r = copy.deepcopy(capture[0]) | {"request_id": "req-1", "spend": 0.0001}
    out, q, _ = run([r])
    assert q == []
    row = out.to_dicts()[0]
    assert (row["format"], row["call_key"], row["start_us"]) == (SLP, r["litellm_call_id"], epoch_us(r["startTime"]))


def test_spend_logs_nested_deeper_than_polars_json_path_reads_is_still_spend_logs(capture: list[dict]) -> None:
    """polars' JSON path lookup gives up on a line nested over 128 levels: the ISO times still make it a SpendLogs row."""
    s = spend_rows(capture)[1] | {"response": "@deep@"}
    line = json.dumps(s).replace('"@deep@"', "[" * 130 + "1" + "]" * 130)
    out, q, _ = run([line])
    assert q == []
    row = out.to_dicts()[0]
    assert (row["format"], row["call_key"], row["start_us"]) == (SPEND, s["litellm_call_id"], iso_us(s["startTime"]))
    assert row["request_tags"] == json.loads(s["request_tags"])
    assert_spend_row(row, s)


def test_slp_nested_deeper_than_polars_json_path_reads_keeps_its_traceparent(capture: list[dict]) -> None:
    trace, span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    r = copy.deepcopy(capture[0]) | {"some_new_field": "@deep@"}
    r["metadata"]["requester_metadata"] = {"headers": {"traceparent": f"00-{trace}-{span}-01"}}
    out, q, _ = run([json.dumps(r).replace('"@deep@"', '{"a": ' * 130 + "1" + "}" * 130)])
    assert q == []
    assert out.select("parent_trace_id", "parent_span_id").row(0) == (trace, span)


def test_a_nested_time_key_of_another_type_leaves_the_format_to_the_keys(capture: list[dict]) -> None:
    s = spend_rows(capture)[1] | {"response": {"startTime": 5, "endTime": None}}
    p = copy.deepcopy(capture[0])
    p["metadata"]["requester_metadata"] = {"startTime": "2026-01-01T00:00:00"}
    out, q, _ = run([s, p])
    assert q == []
    assert out["format"].to_list() == [SPEND, SLP]


def test_spend_logs_key_order_and_spacing_do_not_matter(capture: list[dict]) -> None:
    s = spend_row(capture[0], store_prompts=False, naive=True)
    reordered = {k: s[k] for k in sorted(s, reverse=True)}
    compact = json.dumps(s, separators=(",", ":"))
    out, q, _ = run([reordered, compact])
    assert q == []
    assert out["format"].to_list() == [SPEND, SPEND]
    assert out["call_key"].to_list() == [s["litellm_call_id"]] * 2


# --- bad input: each quarantined precisely, the good lines around it kept --------------------------


def test_json_nested_deeper_than_a_record_is_read_to_says_so(good: list[dict]) -> None:
    """It was ``malformed_json``, "not strict JSON (Python's json reads it)": valid, and no fix offered."""
    deep = dict(good[0], litellm_call_id="0000-deep", messages=[{"role": "user", "content": "x"}])
    bad = json.dumps(deep).replace('"x"', '{"a": [' * 600 + '"x"' + "]}" * 600)
    out, q, pos = run([good[0], bad, good[1]])
    assert_quarantined(q, *pos[1], "too_deep", raw=bad)
    assert "1,024 levels" in q[0].detail
    assert_kept(out, pos, {0: good[0], 2: good[1]})


def nested(depth: int, opener: str = "[") -> str:
    """A record whose message content takes it to ``depth`` levels (the record is one, messages two, the message three)."""
    closer = {"[": "]", '{"a": ': "}"}[opener]
    record = {"litellm_call_id": f"0000-depth-{depth}", "messages": [{"role": "user", "content": "@x@"}]}
    inner = depth - 3
    return json.dumps(record).replace('"@x@"', opener * inner + '"x"' + closer * inner)


def test_one_level_past_the_limit_is_too_deep_on_every_polars(good: list[dict]) -> None:
    """polars before 2.1 reads a line past orjson's 1,024 levels: such a record was ingested, its
    deep part kept as JSON text, where 2.1 quarantines it."""
    past = json.dumps(good[0] | json.loads(nested(MAX_DEPTH + 1)))
    out, q, pos = run([good[0], past, good[1]])
    assert_quarantined(q, *pos[1], "too_deep", raw=past)
    assert_kept(out, pos, {0: good[0], 2: good[1]})


def orjson_depth_refused(line: str) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError as e:
        return str(e).startswith("depth limit exceeded")
    return False


def test_too_deep_finds_exactly_the_lines_orjson_refuses_for_depth() -> None:
    """The check normalize runs where polars reads past the limit (before 2.1; 2.1 refuses these lines
    itself), run here on any polars: brackets inside strings, or a line cut short, are not depth."""
    lines = [
        nested(MAX_DEPTH),
        nested(MAX_DEPTH + 1),
        nested(MAX_DEPTH, '{"a": '),
        nested(MAX_DEPTH + 1, '{"a": '),
        nested(5000),
        json.dumps({"content": "{[" * 5000}),
        json.dumps({"a": [[1]] * 3000}),
        nested(MAX_DEPTH + 1)[:-600],
        '{"a": 1}',
    ]
    deep = too_deep(pl.Series("raw", lines))
    assert deep == [i for i, line in enumerate(lines) if orjson_depth_refused(line)] == [1, 3, 4]


def test_malformed_json(good: list[dict]) -> None:
    bad = '{"id": "chatcmpl-broken", "litellm_call_id": "0000-broken", "startTime": 1795788109.3,'
    out, q, pos = run([good[0], bad, good[1]])
    assert_quarantined(q, *pos[1], "malformed_json", raw=bad)
    assert_kept(out, pos, {0: good[0], 2: good[1]})


def test_truncated_last_line(tmp_path: Path, good: list[dict]) -> None:
    lines = [json.dumps(r) for r in good]
    cut = lines[2][: len(lines[2]) // 2]
    f = tmp_path / "proxy.jsonl"
    f.write_bytes((lines[0] + "\n" + lines[1] + "\n" + cut).encode())
    frame = pl.concat([c.lines for c in read_chunks(f, chunk_bytes=1000)])
    out, q = normalize(frame)
    pos = [(1, 0), (2, len(lines[0]) + 1), (3, len(lines[0]) + len(lines[1]) + 2)]
    assert_quarantined(q, *pos[2], "truncated_line", raw=cut, source=str(f))
    assert {r["line_no"]: (r["offset"], r["call_key"]) for r in out.to_dicts()} == {
        1: (pos[0][1], good[0]["litellm_call_id"]),
        2: (pos[1][1], good[1]["litellm_call_id"]),
    }


def test_complete_last_line_without_newline_is_kept(tmp_path: Path, good: list[dict]) -> None:
    f = tmp_path / "proxy.jsonl"
    f.write_bytes((json.dumps(good[0]) + "\n" + json.dumps(good[1])).encode())
    out, q = normalize(pl.concat([c.lines for c in read_chunks(f)]))
    assert q == []
    assert out["call_key"].to_list() == [good[0]["litellm_call_id"], good[1]["litellm_call_id"]]


@pytest.mark.parametrize("bad", ["42", '"a string"', "null", "true"])
def test_not_an_object(good: list[dict], bad: str) -> None:
    out, q, pos = run([good[0], bad, good[1]])
    assert_quarantined(q, *pos[1], "not_an_object", raw=bad)
    assert_kept(out, pos, {0: good[0], 2: good[1]})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("startTime", "yesterday"),
        ("endTime", "tomorrow"),
        ("prompt_tokens", "many"),
        ("response_cost", {"usd": 1}),
    ],
)
def test_slp_wrong_type(good: list[dict], field: str, value: object) -> None:
    bad = copy.deepcopy(good[1])
    bad[field] = value
    out, q, pos = run([good[0], bad, good[2]])
    assert_quarantined(q, *pos[1], "wrong_type", raw=json.dumps(bad))
    assert field in q[0].detail
    assert_kept(out, pos, {0: good[0], 2: good[2]})


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize(("field", "value"), [("litellm_call_id", "5"), ("startTime", '"2026-01-01"'), ("response_cost", "true")])
def test_a_strict_field_given_twice_is_checked_at_each_value(good: list[dict], field: str, value: str, first: bool) -> None:
    """polars reads a key given twice at its first value, Python's json at its last: neither may pass as another type."""
    text = json.dumps(good[1])
    line = f'{{"{field}": {value}, {text[1:]}' if first else f'{text[:-1]}, "{field}": {value}}}'
    out, q, pos = run([good[0], line, good[2]])
    assert_quarantined(q, *pos[1], "wrong_type", raw=line)
    assert field in q[0].detail
    assert_kept(out, pos, {0: good[0], 2: good[2]})


def test_an_id_given_twice_with_its_own_type_is_read_at_its_first_value(good: list[dict]) -> None:
    line = '{"litellm_call_id": "first", ' + json.dumps(good[1] | {"litellm_call_id": "last"})[1:]
    out, q, _ = run([line])
    assert q == []
    assert out["call_key"].to_list() == ["first"]


@pytest.mark.parametrize(("field", "value"), [("prompt_tokens", "many"), ("spend", "lots"), ("completion_tokens", [1])])
def test_spend_logs_wrong_type(capture: list[dict], field: str, value: object) -> None:
    rows = spend_rows(capture)[:3]
    rows[1][field] = value
    out, q, pos = run(rows)
    assert_quarantined(q, *pos[1], "wrong_type", raw=json.dumps(rows[1]))
    assert_kept(out, pos, {0: rows[0], 2: rows[2]})


@pytest.mark.parametrize("value", ["{not json", json.dumps(["a", "list"]), json.dumps({"user_api_key_alias": ["x"]})])
def test_spend_logs_metadata_text_of_wrong_shape(capture: list[dict], value: str) -> None:
    """The metadata is dropped with a warning; the row, its times, tokens and cost are kept."""
    rows = spend_rows(capture)[:3]
    rows[1]["metadata"] = value
    frame, _ = frame_of(rows)
    warnings: dict[str, int] = {}
    out, q = normalize(frame, warnings)
    assert q == [] and warnings == {"dropped_metadata": 1}
    assert out["line_no"].to_list() == [1, 2, 3] and out["key_alias"][1] is None


@pytest.mark.parametrize("missing", [("startTime",), ("endTime",), ("startTime", "endTime")])
def test_slp_missing_time(good: list[dict], missing: tuple[str, ...]) -> None:
    bad = copy.deepcopy(good[1])
    for k in missing:
        del bad[k]
    out, q, pos = run([good[0], bad, good[2]])
    assert_quarantined(q, *pos[1], "missing_time", raw=json.dumps(bad))
    assert_kept(out, pos, {0: good[0], 2: good[2]})


@pytest.mark.parametrize("field", ["startTime", "endTime"])
def test_slp_null_time_is_missing(good: list[dict], field: str) -> None:
    bad = copy.deepcopy(good[1])
    bad[field] = None
    out, q, pos = run([good[0], bad, good[2]])
    assert_quarantined(q, *pos[1], "missing_time")
    assert_kept(out, pos, {0: good[0], 2: good[2]})


@pytest.mark.parametrize("missing", [("startTime",), ("endTime",)])
def test_spend_logs_missing_time(capture: list[dict], missing: tuple[str, ...]) -> None:
    rows = spend_rows(capture)[:3]
    for k in missing:
        del rows[1][k]
    out, q, pos = run(rows)
    assert_quarantined(q, *pos[1], "missing_time")
    assert_kept(out, pos, {0: rows[0], 2: rows[2]})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("startTime", "not a time"),
        ("endTime", "yesterday at noon"),
        ("startTime", "2026-13-45T99:00:00"),
        ("startTime", "2026-02-30T10:00:00Z"),
        ("endTime", ""),
        ("startTime", "1795788109.3"),
        ("startTime", "1969-12-31T23:59:59"),
        ("startTime", "0001-01-01T00:00:00"),
        ("endTime", "2262-04-11T23:47:17Z"),
        ("endTime", "9999-12-31T23:59:59"),
    ],
)
def test_spend_logs_bad_time(capture: list[dict], field: str, value: object) -> None:
    """An ISO field that is not an ISO time is a bad time (text of a number too: a JSON number is an
    epoch time, ``tests/test_spend_logs_number_times.py``)."""
    rows = spend_rows(capture)[:3]
    rows[1][field] = value
    out, q, pos = run(rows)
    assert_quarantined(q, *pos[1], "bad_time", raw=json.dumps(rows[1]))
    assert_kept(out, pos, {0: rows[0], 2: rows[2]})


@pytest.mark.parametrize(("field", "value"), [("startTime", -1.0), ("endTime", MAX_EPOCH_S + 1), ("startTime", 10_000_000_000.0)])
def test_slp_time_outside_what_the_store_holds_is_a_bad_time(good: list[dict], field: str, value: float) -> None:
    """Span times are int64 epoch nanoseconds: a time past 2262-04-11 (or before 1970) is a bad time, not a sink error."""
    bad = copy.deepcopy(good[1]) | {field: value, "completionStartTime": None}
    out, q, pos = run([good[0], bad, good[2]])
    assert_quarantined(q, *pos[1], "bad_time")
    assert field in q[0].detail and "2262" in q[0].detail
    assert_kept(out, pos, {0: good[0], 2: good[2]})


def test_the_last_storable_second_is_a_time_in_both_formats(good: list[dict], capture: list[dict]) -> None:
    slp = copy.deepcopy(good[0]) | {"startTime": MAX_EPOCH_S - 1, "endTime": float(MAX_EPOCH_S), "completionStartTime": None}
    spend = spend_rows(capture)[1] | {"startTime": "2262-04-11T23:47:15Z", "endTime": "2262-04-11T23:47:16Z", "completionStartTime": None}
    out, q, _ = run([slp, spend])
    assert q == []
    assert out["end_us"].to_list() == [MAX_EPOCH_S * 1_000_000] * 2
    assert out["end_us"].max() * 1000 < 2**63  # type: ignore[operator]


def test_an_end_before_the_start_is_the_start_with_a_warning(good: list[dict], capture: list[dict]) -> None:
    slp = copy.deepcopy(good[1]) | {"endTime": good[1]["startTime"] - 2.5}
    spend = spend_rows(capture)[2] | {"startTime": "2026-01-01T10:00:05Z", "endTime": "2026-01-01T10:00:00Z"}
    frame, pos = frame_of([good[0], slp, spend])
    warnings: dict[str, int] = {}
    out, q = normalize(frame, warnings)
    assert q == []
    assert warnings == {"end_before_start": 2, "bad_completionStartTime": 2}  # each first token now past its end
    got = by_line(out)
    assert got[pos[0][0]]["end_us"] == epoch_us(good[0]["endTime"])
    assert got[pos[1][0]]["end_us"] == got[pos[1][0]]["start_us"] == epoch_us(slp["startTime"])
    assert got[pos[2][0]]["end_us"] == got[pos[2][0]]["start_us"] == iso_us("2026-01-01T10:00:05+00:00")


def test_a_first_token_time_outside_the_call_is_dropped_with_a_warning(good: list[dict], capture: list[dict]) -> None:
    """A completionStartTime before the start or after the end (a clock stepped mid-call) became a
    first-token event outside its span and a negative time_to_first_token_ms: dropped, and said."""
    start = good[1]["startTime"]
    before = copy.deepcopy(good[1]) | {"endTime": start + 2.0, "completionStartTime": start - 10.0, "stream": True}
    after = copy.deepcopy(good[2]) | {"startTime": start, "endTime": start + 2.0, "completionStartTime": start + 10.0, "stream": True}
    inside = copy.deepcopy(good[0]) | {"startTime": start, "endTime": start + 2.0, "completionStartTime": start + 0.5, "stream": True}
    span = {"startTime": "2026-01-01T10:00:05Z", "endTime": "2026-01-01T10:00:06Z"}
    rows = spend_rows(capture)
    early = rows[2] | span | {"completionStartTime": "2026-01-01T09:59:05Z"}
    backwards = rows[3] | span | {"endTime": "2026-01-01T10:00:00Z", "completionStartTime": "2026-01-01T10:00:00Z"}
    frame, pos = frame_of([before, after, inside, early, backwards])
    warnings: dict[str, int] = {}
    out, q = normalize(frame, warnings)
    assert q == []
    assert warnings == {"bad_completionStartTime": 4, "end_before_start": 1}
    got = by_line(out)
    assert [got[line]["first_token_us"] for line, _ in pos] == [None, None, epoch_us(start + 0.5), None, None]
    assert got[pos[0][0]]["start_us"] == epoch_us(start) and got[pos[4][0]]["end_us"] == iso_us("2026-01-01T10:00:05+00:00")


def test_slp_all_ids_null(good: list[dict]) -> None:
    bad = copy.deepcopy(good[1])
    bad["litellm_call_id"] = None
    bad["id"] = None
    out, q, pos = run([good[0], bad, good[2]])
    assert_quarantined(q, *pos[1], "missing_id", raw=json.dumps(bad))
    assert_kept(out, pos, {0: good[0], 2: good[2]})


def test_slp_all_ids_absent(good: list[dict]) -> None:
    bad = copy.deepcopy(good[1])
    del bad["litellm_call_id"], bad["id"]
    out, q, pos = run([good[0], bad, good[2]])
    assert_quarantined(q, *pos[1], "missing_id")
    assert_kept(out, pos, {0: good[0], 2: good[2]})


def test_spend_logs_all_ids_null(capture: list[dict]) -> None:
    rows = spend_rows(capture)[:3]
    rows[1]["litellm_call_id"] = None
    rows[1]["request_id"] = None
    out, q, pos = run(rows)
    assert_quarantined(q, *pos[1], "missing_id")
    assert_kept(out, pos, {0: rows[0], 2: rows[2]})


def test_slp_id_used_when_call_id_unusable(good: list[dict]) -> None:
    r = copy.deepcopy(good[1])
    r["litellm_call_id"] = "None"
    out, q, _ = run([r])
    assert q == []
    assert out["call_key"].to_list() == [r["id"]]
    assert out["call_key_from"].to_list() == ["id"]
    assert out["litellm_call_id"].to_list() == [None]


@pytest.mark.parametrize("placeholder", ["None", "none", "null", "", "  ", "undefined", "NaN"])
def test_placeholder_ids_get_a_content_hash(good: list[dict], placeholder: str) -> None:
    bad = copy.deepcopy(good[1])
    bad["litellm_call_id"] = placeholder
    bad["id"] = placeholder
    other = copy.deepcopy(bad)
    other["response_cost"] = 12.5
    out, q, pos = run([good[0], bad, good[2], other])
    assert q == []
    got = by_line(out)
    assert set(got) == {p[0] for p in pos}
    key = got[pos[1][0]]["call_key"]
    assert key.startswith("sha256:")
    assert len(key) > len("sha256:") + 16
    assert got[pos[1][0]]["call_key_from"] == "content_hash"
    assert got[pos[1][0]]["offset"] == pos[1][1]
    assert got[pos[0][0]]["call_key"] == good[0]["litellm_call_id"]
    assert got[pos[2][0]]["call_key"] == good[2]["litellm_call_id"]
    # Another record gets another key.
    assert got[pos[3][0]]["call_key"].startswith("sha256:")
    assert got[pos[3][0]]["call_key"] != key
    # The same line gives the same key: in another frame, another file, at another offset and line.
    again, q2, _ = run([good[2], good[0], bad], source="elsewhere/other.jsonl", start_offset=12345, start_line=77)
    assert q2 == []
    assert again.filter(pl.col("line_no") == 79)["call_key"].to_list() == [key]


def test_spend_logs_none_ids_get_a_content_hash(capture: list[dict]) -> None:
    rows = spend_rows(capture)[:3]
    rows[1]["litellm_call_id"] = "None"
    rows[1]["request_id"] = "None"
    out, q, pos = run(rows)
    assert q == []
    key = by_line(out)[pos[1][0]]["call_key"]
    assert key.startswith("sha256:")
    out2, _, _ = run([rows[1]])
    assert out2["call_key"].to_list() == [key]


def test_unknown_extra_field_is_ingested_unchanged(good: list[dict]) -> None:
    r = copy.deepcopy(good[1])
    r["new_field_2027"] = {"x": [1]}
    r["another_new_one"] = [{"deep": {"er": None}}, 3, "s"]
    out, q, pos = run([good[0], r, good[2]])
    assert q == []
    row = by_line(out)[pos[1][0]]
    assert row["raw"] == json.dumps(r)
    assert json.loads(row["raw"])["new_field_2027"] == {"x": [1]}
    assert row["call_key"] == r["litellm_call_id"]
    assert row["start_us"] == epoch_us(r["startTime"])
    assert row["cost"] == r["response_cost"]
    assert_kept(out, pos, {0: good[0], 1: r, 2: good[2]})


@pytest.mark.parametrize(
    ("path", "number", "warning"),
    [
        (("new_field_2027",), "1e400", "nan_new_field_2027"),
        (("response_cost",), "-1E+400", "nan_response_cost"),
        (("response", "usage"), "1e0400", "nan_response"),
        (("spend",), "2.5e999", "nan_spend"),
    ],
)
def test_a_number_beyond_a_double_is_null_with_a_warning_and_the_record_kept(
    good: list[dict], capture: list[dict], path: tuple[str, ...], number: str, warning: str
) -> None:
    """``1e400`` is valid JSON that Python's json reads as infinity: repaired like ``Infinity``, not malformed."""
    r = spend_rows(capture)[1] if path == ("spend",) else copy.deepcopy(good[1])
    node = r
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "@big@"
    frame, pos = frame_of([good[0], json.dumps(r).replace('"@big@"', number), good[2]])
    warnings: dict[str, int] = {}
    out, q = normalize(frame, warnings)
    assert q == []
    assert warnings == {warning: 1}
    row = by_line(out)[pos[1][0]]
    assert row["call_key"] == r["litellm_call_id"]
    stored = json.loads(row["raw"])
    for key in path:
        stored = stored[key]
    assert stored is None
    assert row["cost"] == (None if path[-1] in ("response_cost", "spend") else r["response_cost"])


def test_an_integer_beyond_a_double_is_cleaned_to_null() -> None:
    warnings: dict[str, int] = {}
    limit = 2**1024 - 2**970
    assert clean({"a": [limit, -limit, limit - 1, 2**80, 1.5], "b": 1}, warnings) == {"a": [None, None, limit - 1, 2**80, 1.5], "b": 1}
    assert warnings == {"nan_a": 2}


def test_spend_logs_unknown_extra_field_is_ingested_unchanged(capture: list[dict]) -> None:
    s = spend_row(capture[0], store_prompts=True, naive=True)
    s["new_field_2027"] = {"x": [1]}
    out, q, _ = run([s])
    assert q == []
    assert out["raw"].to_list() == [json.dumps(s)]
    assert_spend_row(out.to_dicts()[0], s)


def test_blank_lines_are_skipped_silently(good: list[dict]) -> None:
    items: list[object] = ["", good[0], "   ", "", good[1], "\t", "\r", good[2], ""]
    out, q, pos = run(items)
    assert q == []
    assert_kept(out, pos, {1: good[0], 4: good[1], 7: good[2]})


def test_empty_frame() -> None:
    frame, _ = split_lines(SRC, b"", 0, 1)
    out, q = normalize(frame)
    assert q == []
    assert out.height == 0
    assert out.schema == pl.Schema(CANONICAL)


def test_quarantine_and_output_together_in_one_frame(good: list[dict], capture: list[dict]) -> None:
    """Several different bad lines and both formats in one frame: each bad line gets its own reason."""
    spend = spend_rows(capture)[5]
    no_time = copy.deepcopy(good[1])
    del no_time["startTime"]
    no_ids = copy.deepcopy(good[2])
    no_ids["litellm_call_id"] = no_ids["id"] = None
    bad_time = dict(spend, startTime="soon", litellm_call_id="x-1")
    items: list[object] = [good[0], "{oops", spend, '["x"]', no_time, bad_time, no_ids, good[1] | {"litellm_call_id": "ok-2"}]
    out, q, pos = run(items)
    assert sorted((r.line, r.offset, r.reason) for r in q) == [
        (*pos[1], "malformed_json"),
        (*pos[3], "not_an_object"),
        (*pos[4], "missing_time"),
        (*pos[5], "bad_time"),
        (*pos[6], "missing_id"),
    ]
    assert [(r["line_no"], r["offset"], r["call_key"]) for r in out.to_dicts()] == [
        (*pos[0], good[0]["litellm_call_id"]),
        (*pos[2], spend["litellm_call_id"]),
        (*pos[7], "ok-2"),
    ]


# --- a big frame ---------------------------------------------------------------------------------


def test_big_frame_three_bad_lines(capture: list[dict]) -> None:
    light = [{k: v for k, v in r.items() if k not in ("model_map_information", "hidden_params", "messages", "response")} for r in capture]
    n = 2000
    items: list[object] = []
    expected: dict[int, str] = {}
    for i in range(n):
        r = dict(light[i % len(light)])
        r["litellm_call_id"] = f"call-{i:05d}"
        r["startTime"] = round(r["startTime"] + i, 6)
        r["endTime"] = round(r["endTime"] + i, 6)
        items.append(r)
    bad_at = {3: '{"litellm_call_id": "x", "startTime": 1.0,', 1024: '["array"]', 1999: dict(light[0], startTime="yesterday")}
    for i, b in bad_at.items():
        items[i] = b
    for i in range(n):
        if i not in bad_at:
            expected[i] = f"call-{i:05d}"
    out, q, pos = run(items)
    assert len(q) == 3
    assert sorted((r.line, r.offset, r.reason) for r in q) == [
        (*pos[3], "malformed_json"),
        (*pos[1024], "not_an_object"),
        (*pos[1999], "wrong_type"),
    ]
    assert out.height == 1997
    assert [(r["line_no"], r["offset"], r["call_key"]) for r in out.select("line_no", "offset", "call_key").to_dicts()] == [
        (*pos[i], expected[i]) for i in sorted(expected)
    ]
    starts = dict(zip(out["call_key"], out["start_us"], strict=True))
    for i in (0, 4, 1023, 1025, 1998):
        assert starts[f"call-{i:05d}"] == epoch_us(items[i]["startTime"])  # type: ignore[index]


# --- JSON arrays (the generic API logger's batches) -------------------------------------------------


def test_a_line_holding_an_array_of_records_is_one_record_per_element_at_that_line(capture: list[dict]) -> None:
    """LiteLLM's generic API logger sends batches as JSON arrays (``log_format: json_array``, its
    default); a receiver appending each body as a line made them all ``not_an_object``."""
    slp = [r for r in capture if r["status"] == "success"][:5]
    rows = spend_rows(capture)[10:12]
    out, q, pos = run([slp[0], slp[1:4], [], [rows[0], rows[1]], slp[4]])
    assert q == []
    spend_keys = [r["litellm_call_id"] or r["request_id"] for r in rows[:2]]
    assert out["call_key"].to_list() == [r["litellm_call_id"] for r in slp[:4]] + spend_keys + [slp[4]["litellm_call_id"]]
    assert out["line_no"].to_list() == [pos[0][0]] + [pos[1][0]] * 3 + [pos[3][0]] * 2 + [pos[4][0]]
    assert out["offset"].to_list() == [pos[0][1]] + [pos[1][1]] * 3 + [pos[3][1]] * 2 + [pos[4][1]]
    assert out["format"].to_list() == [SLP] * 4 + [SPEND] * 2 + [SLP]


def test_an_element_of_an_array_that_is_no_record_is_quarantined_alone_and_a_broken_array_whole(capture: list[dict]) -> None:
    good_one = capture[0]
    out, q, pos = run([[good_one, 42], '[{"id": "x", "startTime": 1'])
    assert out["call_key"].to_list() == [good_one["litellm_call_id"]]
    got = sorted((r.line, r.offset, r.reason) for r in q)
    assert got == [(pos[0][0], pos[0][1], "not_an_object"), (pos[1][0], pos[1][1], "malformed_json")]
    assert next(r for r in q if r.reason == "not_an_object").raw == "42"


def test_a_polars_panic_on_one_line_quarantines_that_line_and_normalizes_the_rest(
    tmp_path: Path, capture: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """polars reports an internal failure as PanicException, a BaseException: it went past the
    bisection that isolates a line normalize fails on, and stopped the run."""
    from polars.exceptions import PanicException

    import ingest.normalize as normalize_module

    real = normalize_module.normalize

    def panics_on_poison(lines: pl.DataFrame, *args: object, **kw: object):  # type: ignore[no-untyped-def]
        if lines["raw"].str.contains("poison-marker").any():
            raise PanicException("called `Option::unwrap()` on a `None` value")
        return real(lines, *args, **kw)

    monkeypatch.setattr(normalize_module, "normalize", panics_on_poison)
    records = [dict(r) for r in capture[:9]]
    records[4]["litellm_call_id"] = "poison-marker"
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, bad = normalize_module.normalize_isolating(pl.concat([c.lines for c in read_chunks(f)]))
    assert out.height == 8 and [(q.line, q.reason) for q in bad] == [(5, "unbuildable")]
    assert "PanicException" in bad[0].detail


@pytest.mark.parametrize("fast", [True, False])
def test_a_spend_row_whose_metadata_or_tags_are_not_of_their_shape_keeps_its_call(capture: list[dict], fast: bool) -> None:
    """Metadata that is a JSON string or no JSON, tags that are an object: the whole row was
    quarantined, its call's times, tokens and cost lost. The field is dropped with a warning."""
    rows = spend_rows(capture)[:4]
    rows[0]["metadata"] = json.dumps("just a string")
    rows[1]["metadata"] = "not json {"
    rows[2]["request_tags"] = json.dumps({"team": "a"})
    frame, _ = frame_of(rows)
    warnings: dict[str, int] = {}
    out, quarantined = normalize(frame, warnings, fast)
    assert quarantined == [] and out.height == 4
    assert warnings == {"dropped_metadata": 2, "dropped_request_tags": 1}
    kept, _, _ = run(rows[3:])
    assert out["total_tokens"].to_list()[:3] == [r["total_tokens"] for r in rows[:3]]
    place = ("line_no", "offset", "file")
    assert out.drop(place).row(3, named=True) == kept.drop(place).row(0, named=True), "a good row is read as alone"


@pytest.mark.parametrize("fast", [True, False])
def test_slp_metadata_or_error_information_of_another_shape_keeps_the_call(capture: list[dict], fast: bool) -> None:
    """metadata as JSON text (as SpendLogs exports write it), error_information as a plain string,
    metadata as an array or with a key field holding an object: the whole record was quarantined,
    its call's times, tokens and cost lost. JSON text of the shape is decoded; another shape is
    left out with a warning."""
    base = [r for r in capture if r["status"] == "success"][:5]
    rows = copy.deepcopy(base)
    rows[0]["metadata"] = json.dumps(rows[0]["metadata"])
    rows[1]["error_information"] = "upstream said no"
    rows[2]["metadata"] = ["not", "an", "object"]
    rows[3]["metadata"]["user_api_key_alias"] = {"nested": 1}
    frame, _ = frame_of(rows)
    warnings: dict[str, int] = {}
    out, quarantined = normalize(frame, warnings, fast)
    assert quarantined == [] and out.height == 5
    assert warnings == {"dropped_error_information": 1, "dropped_metadata": 2}
    assert out["total_tokens"].to_list() == [r["total_tokens"] for r in base]
    assert out["cost"].to_list() == [r["response_cost"] for r in base]
    alone, _, _ = run(base[:1])
    place = ("line_no", "offset", "raw")
    assert out.drop(place).row(0, named=True) == alone.drop(place).row(0, named=True), "metadata text read as the object"
    assert out["key_hash"].to_list()[2:4] == [None, None]


@pytest.mark.parametrize("fast", [True, False])
def test_a_field_the_call_does_without_of_another_type_keeps_the_call(capture: list[dict], fast: bool) -> None:
    """A SpendLogs row whose ``request_duration_ms`` (never read) is text, as in an export made
    from CSV, was quarantined whole; so was a payload whose ``stream`` or ``cache_hit`` is the text
    ``"true"``. Text of the field's type is read as that value; other text is left out with a warning."""
    spend = spend_rows(capture)[:2]
    spend[0]["request_duration_ms"] = str(spend[0]["request_duration_ms"])
    slp = copy.deepcopy([r for r in capture if r["status"] == "success" and r["stream"]][:3])
    slp[0]["stream"] = "true"
    slp[1]["cache_hit"] = "false"
    slp[2]["stream"] = "yes"
    frame, _ = frame_of([*spend, *slp])
    warnings: dict[str, int] = {}
    out, quarantined = normalize(frame, warnings, fast)
    assert quarantined == [] and out.height == 5
    assert warnings == {"dropped_stream": 1}
    assert out["stream"].to_list()[2:] == [True, True, False]
    assert out["cache_hit"].to_list()[3] is False
    assert out["total_tokens"].to_list() == [r["total_tokens"] for r in [*spend, *slp]]


@pytest.mark.parametrize("fast", [True, False])
def test_a_token_count_written_as_a_whole_float_is_the_count(capture: list[dict], fast: bool) -> None:
    """``"prompt_tokens": 12.0`` (pandas writes an integer column with a null that way, JavaScript
    may too) quarantined the whole record as not an integer. It is the count; 12.5 is still refused."""
    base = [r for r in capture if r["status"] == "success"][:3]
    rows = copy.deepcopy(base)
    rows[0]["prompt_tokens"] = float(rows[0]["prompt_tokens"])
    rows[0]["total_tokens"] = float(rows[0]["total_tokens"])
    rows[1]["completion_tokens"] = rows[1]["completion_tokens"] + 0.5
    spend = spend_rows(capture)[:1]
    spend[0]["total_tokens"] = float(spend[0]["total_tokens"])
    frame, _ = frame_of([*rows, *spend])
    out, quarantined = normalize(frame, None, fast)
    assert [(q.line, q.reason) for q in quarantined] == [(2, "wrong_type")]
    assert out["prompt_tokens"].to_list()[0] == base[0]["prompt_tokens"]
    assert out["total_tokens"].to_list() == [base[0]["total_tokens"], base[2]["total_tokens"], spend_rows(capture)[0]["total_tokens"]]


@pytest.mark.parametrize("fast", [True, False])
def test_token_counts_given_only_in_response_usage_are_the_counts(capture: list[dict], fast: bool) -> None:
    """A tool or LiteLLM version logging the counts only in ``response.usage`` (absent or null at the
    top level) left the call without token usage. They are read there under the top level's rules: a
    whole float is the count; text or a fraction is none, a negative count none with a warning. A
    count the top level gives wins, and a failure with no response has none."""
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    base = [r for r in capture if r["status"] == "success" and r["call_type"] == "acompletion"][:5]
    rows = [*copy.deepcopy(base), copy.deepcopy(next(r for r in capture if r["status"] != "success"))]
    for r in rows[:4] + rows[5:]:
        for f in counts:
            r[f] = None
    for f in counts:
        del rows[0][f]
    rows[2]["response"]["usage"] |= {"prompt_tokens": 12.0, "completion_tokens": "3", "total_tokens": 7.5}
    rows[3]["response"]["usage"]["completion_tokens"] = -1
    rows[4]["response"]["usage"]["prompt_tokens"] = 999
    frame, _ = frame_of(rows)
    warnings: dict[str, int] = {}
    out, quarantined = normalize(frame, warnings, fast)
    assert quarantined == [] and out.height == 6
    assert warnings == {"negative_completion_tokens": 1}
    got = out.select(counts).rows()
    usage = [tuple(r["response"]["usage"][f] for f in counts) for r in base]
    assert got[:2] == usage[:2]
    assert got[2] == (12, None, None)
    assert got[3] == (usage[3][0], None, usage[3][2])
    assert got[4] == tuple(base[4][f] for f in counts)
    assert got[5] == (None, None, None)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("as_text", [True, False], ids=["response as JSON text", "response as an object"])
def test_a_spend_logs_rows_counts_missing_are_read_from_its_response_as_text_or_object(
    capture: list[dict], fast: bool, as_text: bool
) -> None:
    """A SpendLogs row's ``response`` is JSON text, as LiteLLM stores it: its ``usage`` was looked for
    only in an object (and the prefilter missed its escaped ``\\"usage\\"``), so a row with its
    counts null at the top level had none."""
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    base = next(r for r in capture if r["status"] == "success" and r["call_type"] == "acompletion")
    row = spend_row(base, store_prompts=True, naive=False)
    row["prompt_tokens"] = None
    del row["total_tokens"], row["completion_tokens"]
    if not as_text:
        row["response"] = json.loads(row["response"])
    frame, _ = frame_of([row])
    out, quarantined = normalize(frame, None, fast)
    assert quarantined == [] and out.select(counts).rows() == [tuple(base["response"]["usage"][f] for f in counts)]


@pytest.mark.parametrize("value", ["1795788117.5", "2026-11-27T14:01:55Z", True])
def test_a_first_token_time_of_another_type_keeps_the_call_without_it(good: list[dict], value: object) -> None:
    """A payload's completionStartTime as text quarantined the whole call, while an unparsable one
    in a SpendLogs row only loses the first-token time with a warning: the same now, both ways."""
    r = copy.deepcopy(good[1]) | {"completionStartTime": value}
    frame, _ = frame_of([good[0], r])
    warnings: dict[str, int] = {}
    out, quarantined = normalize(frame, warnings)
    assert quarantined == [] and out.height == 2
    assert warnings == {"bad_completionStartTime": 1}
    row = out.to_dicts()[1]
    assert (row["first_token_us"], row["start_us"], row["total_tokens"]) == (None, epoch_us(r["startTime"]), r["total_tokens"])


@pytest.mark.parametrize("fast", [True, False])
def test_payload_request_tags_given_as_json_text_of_a_list_are_the_tags(capture: list[dict], fast: bool) -> None:
    """``"request_tags": "[\\"team-a\\", \\"prod\\"]"`` had become one tag, the whole text (``__team-a__
    _prod__`` in MLflow). Text of a list of strings is that list, in order with the rows around it;
    a plain string, broken JSON or a list of other things stays the one tag it was."""
    rows = copy.deepcopy([r for r in capture if r["status"] == "success"][:6])
    rows[1]["request_tags"] = json.dumps(["team-a", "prod"])
    rows[2]["request_tags"] = " [] "
    rows[3]["request_tags"] = "team-b"
    rows[4]["request_tags"] = "[not json"
    rows[5]["request_tags"] = json.dumps([{"k": "v"}])
    frame, _ = frame_of(rows)
    out, quarantined = normalize(frame, {}, fast)
    assert quarantined == []
    assert out["request_tags"].to_list() == [
        rows[0]["request_tags"],
        ["team-a", "prod"],
        [],
        ["team-b"],
        ["[not json"],
        [json.dumps([{"k": "v"}])],
    ]


def test_call_ids_that_differ_only_in_what_cannot_be_stored_are_not_taken_for_one(good: list[dict]) -> None:
    """``req-\\ud800``, ``req-\\udc00`` and ``req-\\u0000`` all read as ``req-\\ufffd``: three calls were
    one, two joined as attempts and the third dropped as a copy. Such an id names no call: each is
    known by its next id (``id``) as a call without ``litellm_call_id`` is."""
    rows = [copy.deepcopy(good[0]) | {"litellm_call_id": f"req-{c}", "id": f"resp-{i}"} for i, c in enumerate(["\ud800", "\udc00", "\x00"])]
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    frame, _ = split_lines("calls.jsonl", lines, 0, 1)
    out, quarantined = normalize(frame)
    assert quarantined == [] and out["call_key"].to_list() == ["resp-0", "resp-1", "resp-2"]
