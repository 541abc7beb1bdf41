"""SpendLogs rows whose times are JSON numbers: what pandas' ``to_json`` writes by default.

``pd.read_sql('SELECT * FROM "LiteLLM_SpendLogs"', con).to_json(path, orient="records", lines=True)``
writes ``startTime``, ``endTime`` and ``completionStartTime`` as epoch milliseconds (``date_unit``
may make them seconds, microseconds or nanoseconds) and NaT as null. Such rows were taken for
payload records (number times) and quarantined ``bad_time``, the whole export unread.
"""

from __future__ import annotations

import copy
import json
import warnings
from datetime import UTC, datetime, timedelta

import pytest

from tests.test_normalize import EPOCH, SLP, SPEND, assert_quarantined, epoch_us, iso_us, run, spend_rows

START = datetime(2026, 11, 27, 10, 11, 12, 345678, tzinfo=UTC)
FIRST = START + timedelta(milliseconds=250, microseconds=1)
END = START + timedelta(seconds=1, microseconds=654321)


def us_of(dt: datetime) -> int:
    return (dt - EPOCH) // timedelta(microseconds=1)


def in_unit(dt: datetime, unit: str, extra_ns: int = 0) -> int:
    """The integer pandas writes for ``dt`` (plus ``extra_ns``) in ``date_unit`` ``unit`` (it truncates)."""
    ns = us_of(dt) * 1000 + extra_ns
    return ns // {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[unit]


def read_back_us(dt: datetime, unit: str, extra_ns: int = 0) -> int:
    """What the ingester must make of it: the instant to the microsecond the unit holds (ns rounded)."""
    value = in_unit(dt, unit, extra_ns)
    return {"s": value * 10**6, "ms": value * 10**3, "us": value, "ns": (value + 500) // 1000}[unit]


def spend_with_times(capture: list[dict], i: int = 1, **times: object) -> dict:
    s = copy.deepcopy(spend_rows(capture)[i])
    s.update(times)
    return s


# --- what pandas writes --------------------------------------------------------------------------


@pytest.mark.parametrize("unit", [None, "s", "ms", "us", "ns"])
def test_pandas_to_json_export_is_read_as_spend_logs(capture: list[dict], unit: str | None) -> None:
    """The real thing: rows through a DataFrame with datetime columns and ``to_json`` (default unit: ms)."""
    pd = pytest.importorskip("pandas")
    rows = spend_rows(capture)
    rows[0]["startTime"], rows[0]["endTime"] = START.isoformat(), END.isoformat()
    rows[0]["completionStartTime"] = None  # NaT: pandas writes null
    df = pd.DataFrame(rows)
    for col in ("startTime", "endTime", "completionStartTime", "created_at", "updated_at"):
        df[col] = pd.to_datetime(df[col], format="ISO8601", utc=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas 3 warns that the default will become ISO text
        text = df.to_json(orient="records", lines=True, **({"date_unit": unit} if unit else {}))
    lines = text.splitlines()
    assert f'"startTime":{in_unit(START, unit or "ms")},' in lines[0]
    assert '"completionStartTime":null' in lines[0]
    out, q, _ = run(lines)
    assert q == []
    assert out.height == len(rows)
    assert set(out["format"]) == {SPEND}
    assert out["call_key"].to_list() == [r["litellm_call_id"] for r in rows]
    assert out["cost"].to_list() == pytest.approx([r["spend"] for r in rows], rel=1e-9)  # to_json keeps 10 digits
    first = out.row(0, named=True)
    assert (first["start_us"], first["end_us"], first["first_token_us"]) == (
        read_back_us(START, unit or "ms"),
        read_back_us(END, unit or "ms"),
        None,
    )
    for row, s in list(zip(out.to_dicts(), rows, strict=True))[1:]:
        # The capture's times are whole milliseconds: every unit but seconds gives them exactly.
        for key, name in (("start_us", "startTime"), ("end_us", "endTime"), ("first_token_us", "completionStartTime")):
            expect = iso_us(s[name])
            if expect is not None and unit == "s":
                expect = expect // 10**6 * 10**6
            assert row[key] == expect, (key, s[name], unit)


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_number_times_to_the_microsecond_the_unit_holds(capture: list[dict], unit: str) -> None:
    """The JSON pandas writes, by hand: integers in the unit; nanoseconds round to the nearest microsecond."""
    s = spend_with_times(capture, startTime=0, endTime=0, completionStartTime=0)
    line = json.dumps(s)
    for name, dt, ns in (("startTime", START, 901), ("endTime", END, 499), ("completionStartTime", FIRST, 500)):
        line = line.replace(f'"{name}": 0', f'"{name}": {in_unit(dt, unit, ns)}')
    out, q, _ = run([line])
    assert q == []
    row = out.row(0, named=True)
    assert row["format"] == SPEND
    assert row["call_key"] == s["litellm_call_id"]
    assert (row["start_us"], row["end_us"], row["first_token_us"]) == (
        read_back_us(START, unit, 901),
        read_back_us(END, unit, 499),
        read_back_us(FIRST, unit, 500),
    )
    if unit == "ns":
        assert row["start_us"] == us_of(START) + 1 and row["end_us"] == us_of(END) and row["first_token_us"] == us_of(FIRST) + 1
    if unit == "us":
        assert (row["start_us"], row["end_us"], row["first_token_us"]) == (us_of(START), us_of(END), us_of(FIRST))


@pytest.mark.parametrize(
    ("value", "expect_us"),
    [
        (1795788109.345678, 1795788109345678),  # float seconds, as a payload writes them
        (1795788109345.678, 1795788109345678),  # float milliseconds
        (1.795788109345e12, 1795788109345000),  # an exponent
        (0, 0),  # the epoch itself
        (99_999_999_999, None),  # seconds, but past 2262: a bad time, not milliseconds
        (10**11, 10**11 * 1000),  # the least milliseconds: 1973-03-03T09:46:40Z
        (10**14 - 1, (10**14 - 1) * 1000),  # the last milliseconds (5138): past 2262, a bad time
        (10**14, 10**14),  # the least microseconds
        (10**17, 10**14),  # the least nanoseconds
        (2**63 - 1, None),  # nanoseconds past 2262
        (2**64, None),  # beyond int64
        (-1, None),  # before 1970
    ],
)
def test_number_time_units_by_magnitude(capture: list[dict], value: float, expect_us: int | None) -> None:
    s = spend_with_times(capture, startTime=value, endTime=value, completionStartTime=None)
    if expect_us is not None and expect_us > 9_223_372_036 * 10**6:
        expect_us = None
    out, q, pos = run([s])
    if expect_us is None:
        assert_quarantined(q, *pos[0], "bad_time")
        return
    assert q == []
    assert (out["format"].item(), out["start_us"].item(), out["end_us"].item()) == (SPEND, expect_us, expect_us)


def test_number_and_iso_times_mix_in_one_row_and_one_file(capture: list[dict]) -> None:
    iso = spend_rows(capture)[2]
    mixed = spend_with_times(capture, startTime=in_unit(START, "ms"), endTime=END.isoformat(), completionStartTime=FIRST.timestamp())
    out, q, _ = run([iso, mixed])
    assert q == []
    assert out["format"].to_list() == [SPEND, SPEND]
    assert out.row(0, named=True)["start_us"] == iso_us(iso["startTime"])
    row = out.row(1, named=True)
    assert (row["start_us"], row["end_us"], row["first_token_us"]) == (read_back_us(START, "ms"), us_of(END), us_of(FIRST))


@pytest.mark.parametrize("value", ["1795788109345", "1795788109.3", "1e12"])
def test_text_of_a_number_is_still_no_time(capture: list[dict], value: str) -> None:
    """Only a JSON number is an epoch time: a string holding one is neither ISO nor a number."""
    s = spend_with_times(capture, startTime=value)
    out, q, pos = run([spend_rows(capture)[0], s])
    assert_quarantined(q, *pos[1], "bad_time")
    assert "startTime" in q[0].detail
    assert out.height == 1


def test_pandas_row_nested_deeper_than_polars_json_path_reads_is_still_spend_logs(capture: list[dict]) -> None:
    s = spend_with_times(capture, startTime=in_unit(START, "ms"), endTime=in_unit(END, "ms"), response="@deep@")
    line = json.dumps(s).replace('"@deep@"', "[" * 130 + "1" + "]" * 130)
    out, q, _ = run([line])
    assert q == []
    assert (out["format"].item(), out["start_us"].item()) == (SPEND, read_back_us(START, "ms"))


# --- payload records are what they were ----------------------------------------------------------


def test_payloads_are_unchanged_beside_pandas_rows(capture: list[dict]) -> None:
    """Every payload of the capture stays a payload, read as before, among SpendLogs rows with number times;
    also one with SpendLogs' key names nested (client metadata) and one that gains them at the top."""
    nested = copy.deepcopy(capture[3])
    nested["metadata"]["requester_metadata"] = {"request_id": "client-req-1", "spend": 1.5}
    gained = copy.deepcopy(capture[5]) | {"request_id": "req-1", "spend": 0.0001}
    deep = copy.deepcopy(capture[7]) | {"request_id": "req-2", "spend": 0.5, "some_new_field": "@deep@"}
    payloads = [*copy.deepcopy(capture), nested, gained]
    spend = [spend_with_times(capture, i, startTime=in_unit(START, "ms") + i, endTime=in_unit(END, "ms") + i) for i in range(3)]
    items: list[object] = [*payloads, *spend, json.dumps(deep).replace('"@deep@"', '{"a": ' * 130 + "1" + "}" * 130)]
    out, q, _ = run(items)
    assert q == []
    assert out["format"].to_list() == [SLP] * len(payloads) + [SPEND] * 3 + [SLP]
    for row, p in zip(out.to_dicts(), [*payloads, *spend, deep], strict=True):
        if row["format"] == SLP:
            assert row["call_key"] == p["litellm_call_id"]
            assert (row["start_us"], row["end_us"]) == (epoch_us(p["startTime"]), epoch_us(p["endTime"]))
            assert row["cost"] == p["response_cost"]
