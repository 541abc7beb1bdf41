"""Dedupe: one row per distinct attempt, richer format wins; held calls; attempts already sent."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import polars as pl
import pytest
from conftest import read_capture, reidentify

from ingest.dedupe import DEFAULT_SETTLE_S, SentIndex, dedupe, dedupe_and_split, split_final
from ingest.normalize import normalize
from ingest.sources import split_lines
from tests.conftest import spend_row

ROOT = Path(__file__).resolve().parent.parent
SLP = "standard_logging_payload"
SPEND = "spend_logs"


def frame_of(records: list[dict], source: str = "input.jsonl") -> pl.DataFrame:
    """Canonical frame of JSON-lines records (payload records and SpendLogs rows alike), in the given order."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    lines, bad = split_lines(source, data, 0, 1)
    frame, quarantined = normalize(lines)
    assert not bad and not quarantined, (bad, quarantined)
    assert frame.height == len(records)
    return frame


def us(seconds: float) -> int:
    return int((Decimal(repr(seconds)) * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def by_call(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        out[r["litellm_call_id"]].append(r)
    return out


CAPTURE = read_capture()
MULTI_ATTEMPT = [call for call, recs in by_call(CAPTURE).items() if len(recs) > 1]
FAILED_ONLY = [call for call, recs in by_call(CAPTURE).items() if all(r["status"] != "success" for r in recs)]


def final_record(records: list[dict]) -> dict:
    """The attempt that decided the call: the one that ended last."""
    return max(records, key=lambda r: r["endTime"])


def test_capture_has_retry_and_fallback_pairs() -> None:
    # Sanity on the fixture the tests below rely on: failure then success, same call id.
    assert len(MULTI_ATTEMPT) == 4
    for call in MULTI_ATTEMPT:
        assert [r["status"] for r in by_call(CAPTURE)[call]] == ["failure", "success"]


# --- dedupe ------------------------------------------------------------------------------


@pytest.mark.parametrize("copies", [2, 3, 5])
def test_exact_redeliveries_collapse_to_one_row(capture: list[dict], copies: int) -> None:
    rec = capture[0]
    out, dups = dedupe(frame_of([rec] * copies))
    assert out.height == 1
    assert dups == copies - 1
    assert out["call_key"].to_list() == [rec["litellm_call_id"]]
    assert out["line_no"].to_list() == [1]  # the first one read is kept


def test_redeliveries_interleaved_with_other_calls(capture: list[dict]) -> None:
    recs = capture[:6]
    out, dups = dedupe(frame_of(recs + recs[::-1] + recs[2:4]))
    assert dups == len(recs) + 2
    assert sorted(out["call_key"].to_list()) == sorted(r["litellm_call_id"] for r in recs)


def test_whole_capture_has_no_duplicates_and_keeps_every_attempt(capture: list[dict]) -> None:
    out, dups = dedupe(frame_of(capture))
    assert dups == 0
    assert out.height == len(capture)
    assert out["call_key"].n_unique() == len({r["litellm_call_id"] for r in capture})


def test_output_sorted_by_call_then_attempt_start(capture: list[dict]) -> None:
    out, _ = dedupe(frame_of(capture[::-1]))
    keys = list(zip(out["call_key"].to_list(), out["start_us"].to_list(), strict=True))
    assert keys == sorted(keys)


@pytest.mark.parametrize("order", ["slp_first", "spend_first"])
@pytest.mark.parametrize("idx", [0, 11, 15, 23, 26, 27, 37])
def test_same_attempt_as_slp_and_spend_logs_keeps_slp(capture: list[dict], idx: int, order: str) -> None:
    slp = capture[idx]
    row = spend_row(slp, store_prompts=True, naive=True)
    records = [slp, row] if order == "slp_first" else [row, slp]
    out, dups = dedupe(frame_of(records))
    assert dups == 1
    assert out.height == 1
    assert out["format"].to_list() == [SLP]
    assert out["start_us"].to_list() == [us(slp["startTime"])]


@pytest.mark.parametrize("order", ["slp_first", "spend_first"])
def test_whole_capture_with_its_spend_logs_export_keeps_every_slp_copy(capture: list[dict], order: str) -> None:
    rows = [spend_row(r, store_prompts=i % 3 != 0, naive=i % 4 != 3) for i, r in enumerate(capture)]
    records = capture + rows if order == "slp_first" else rows + capture
    out, dups = dedupe(frame_of(records))
    assert dups == len(capture)
    assert out.height == len(capture)
    assert set(out["format"].to_list()) == {SLP}


@pytest.mark.parametrize("sub_ms_us", [499, 500, 501])
def test_spend_logs_copy_at_half_millisecond_collapses(capture: list[dict], sub_ms_us: int) -> None:
    """Postgres timestamp(3) rounds a .xxx500 start up; the payload copy must still match it."""
    slp = dict(capture[0])
    whole = int(slp["startTime"])
    start_us = whole * 1_000_000 + 313_000 + sub_ms_us
    slp["startTime"] = float(Decimal(start_us) / 1_000_000)
    assert us(slp["startTime"]) == start_us
    row = spend_row(slp, store_prompts=True, naive=True)
    ms = int((Decimal(start_us) / 1000).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    row["startTime"] = datetime.fromtimestamp(ms // 1000, tz=UTC).replace(tzinfo=None).isoformat() + f".{ms % 1000:03d}"
    for records in ([slp, row], [row, slp]):
        out, dups = dedupe(frame_of(records))
        assert (out.height, dups) == (1, 1)
        assert out["format"].to_list() == [SLP]


def test_spend_logs_copy_of_a_different_attempt_is_kept(capture: list[dict]) -> None:
    """A SpendLogs row of the failure and a payload record of the success are two attempts, not copies."""
    fail, ok = by_call(capture)[MULTI_ATTEMPT[0]]
    out, dups = dedupe(frame_of([spend_row(fail, True, True), ok]))
    assert dups == 0
    assert out.height == 2
    assert out["status"].to_list() == ["failure", "success"]
    assert out["format"].to_list() == [SPEND, SLP]


@pytest.mark.parametrize("call", MULTI_ATTEMPT)
def test_distinct_attempts_of_one_call_are_all_kept_sorted_by_start(call: str) -> None:
    recs = by_call(CAPTURE)[call]
    for ordering in (recs, recs[::-1]):
        out, dups = dedupe(frame_of(ordering + ordering))
        assert dups == len(recs)
        mine = out.filter(pl.col("call_key") == call)
        expected = sorted((us(r["startTime"]), r["status"]) for r in recs)
        assert list(zip(mine["start_us"].to_list(), mine["status"].to_list(), strict=True)) == expected


def test_empty_frame(capture: list[dict]) -> None:
    empty = frame_of([capture[0]]).clear()
    out, dups = dedupe(empty)
    assert (out.height, dups) == (0, 0)


# --- split_final -------------------------------------------------------------------------


def _deduped(records: list[dict]) -> pl.DataFrame:
    return dedupe(frame_of(records))[0]


def test_failed_call_ending_at_the_watermark_is_held() -> None:
    failed = by_call(CAPTURE)[FAILED_ONLY[0]]
    ready, held = split_final(_deduped(failed))
    assert ready.height == 0
    assert held["call_key"].unique().to_list() == [FAILED_ONLY[0]]


@pytest.mark.parametrize("call", FAILED_ONLY)
def test_failed_call_held_within_settle_window_then_released(call: str) -> None:
    failed = by_call(CAPTURE)[call]
    later = next(r for r in CAPTURE if r["status"] == "success" and r["endTime"] > max(f["endTime"] for f in failed) + 1)
    gap_s = later["endTime"] - max(f["endTime"] for f in failed)
    frame = _deduped([*failed, later])
    ready, held = split_final(frame, settle_s=gap_s + 0.5)
    assert held["call_key"].unique().to_list() == [call]
    assert later["litellm_call_id"] in ready["call_key"].to_list()
    ready, held = split_final(frame, settle_s=gap_s - 0.5)
    assert held.height == 0
    assert sorted(ready["call_key"].unique().to_list()) == sorted({call, later["litellm_call_id"]})


def test_held_call_released_once_watermark_passes_default_settle() -> None:
    failed = by_call(CAPTURE)[FAILED_ONLY[0]]
    fail_end = max(f["endTime"] for f in failed)
    ready, held = split_final(_deduped(failed))
    assert ready.height == 0 and held.height == len(failed)
    # A later call whose end is past the failure's end + settle moves the watermark past it.
    base = CAPTURE[0]
    later = reidentify([base], shift_s=fail_end + DEFAULT_SETTLE_S + 1 - base["endTime"])[0]
    merged = dedupe(pl.concat([held, frame_of([later], source="later.jsonl")]))[0]
    ready, held = split_final(merged)
    assert held.height == 0
    assert set(ready["call_key"].to_list()) == {FAILED_ONLY[0], later["litellm_call_id"]}


def test_held_call_not_released_while_watermark_inside_window() -> None:
    failed = by_call(CAPTURE)[FAILED_ONLY[0]]
    fail_end = max(f["endTime"] for f in failed)
    base = CAPTURE[0]
    later = reidentify([base], shift_s=fail_end + DEFAULT_SETTLE_S - 1 - base["endTime"])[0]
    ready, held = split_final(_deduped([*failed, later]))
    assert held["call_key"].unique().to_list() == [FAILED_ONLY[0]]
    assert ready["call_key"].to_list() == [later["litellm_call_id"]]


def test_success_released_at_once() -> None:
    ok = next(r for r in CAPTURE if r["status"] == "success")
    ready, held = split_final(_deduped([ok]))
    assert held.height == 0
    assert ready["call_key"].to_list() == [ok["litellm_call_id"]]


@pytest.mark.parametrize("call", MULTI_ATTEMPT)
def test_call_whose_final_attempt_succeeded_released_at_once(call: str) -> None:
    """Failure then success (retry or fallback): the call is over, nothing more can come for it."""
    recs = by_call(CAPTURE)[call]
    assert final_record(recs)["status"] == "success"
    ready, held = split_final(_deduped(recs))
    assert held.height == 0, f"held a call whose final attempt succeeded: {held.select('start_us', 'end_us', 'status').rows()}"
    assert ready.height == len(recs)


def test_final_true_releases_everything(capture: list[dict]) -> None:
    frame = _deduped(capture)
    ready, held = split_final(frame, final=True)
    assert held.height == 0
    assert ready.height == frame.height


def test_whole_capture_holds_only_recent_failed_calls(capture: list[dict]) -> None:
    frame = _deduped(capture)
    watermark_s = max(r["endTime"] for r in capture)
    settle = 30.0
    expected_held = set()
    for call, recs in by_call(capture).items():
        last = final_record(recs)
        if last["status"] != "success" and last["endTime"] > watermark_s - settle:
            expected_held.add(call)
    assert expected_held  # the capture ends with failures in its last 30 s (e.g. the unknown-model 400)
    ready, held = split_final(frame, settle_s=settle)
    assert set(held["call_key"].to_list()) == expected_held
    assert set(ready["call_key"].to_list()) == {r["litellm_call_id"] for r in capture} - expected_held
    assert ready.height + held.height == frame.height


def test_a_call_ending_past_the_horizon_is_final_at_once_and_moves_no_watermark() -> None:
    """A failure stamped years ahead (a skewed proxy clock, a bogus time) would be held until the
    wall clock got there, and as the watermark it would release every other failure unheld."""
    failed = by_call(CAPTURE)[FAILED_ONLY[0]]
    fail_end = max(f["endTime"] for f in failed)
    other = by_call(CAPTURE)[FAILED_ONLY[1]]
    future = reidentify(other, shift_s=3 * 365 * 86400)
    frame = _deduped([*failed, *future])
    horizon = us(fail_end + 3600)
    ready, held = split_final(frame, horizon_us=horizon)
    assert held["call_key"].unique().to_list() == [FAILED_ONLY[0]], "the real failure still waits for its retry"
    assert set(ready["call_key"].to_list()) == {future[0]["litellm_call_id"]}
    ready, held = split_final(frame)
    assert held["call_key"].unique().to_list() == [future[0]["litellm_call_id"]], "without a horizon: the old behaviour"
    within = reidentify(other, shift_s=fail_end + 60 - max(r["endTime"] for r in other))
    ready, held = split_final(_deduped([*failed, *within]), horizon_us=horizon)
    assert set(held["call_key"].unique().to_list()) == {FAILED_ONLY[0], within[0]["litellm_call_id"]}


# --- dedupe_and_split across chunks ------------------------------------------------------


def test_held_failure_joins_its_fallback_from_a_later_chunk() -> None:
    call = MULTI_ATTEMPT[1]
    fail, ok = by_call(CAPTURE)[call]
    first = dedupe_and_split(frame_of([fail]).clear(), frame_of([fail]), DEFAULT_SETTLE_S, final=False)
    assert first.ready.height == 0 and first.held.height == 1
    second = dedupe_and_split(first.held, frame_of([ok], source="next.jsonl"), DEFAULT_SETTLE_S, final=False)
    assert second.held.height == 0
    assert second.ready["status"].to_list() == ["failure", "success"]


# --- SentIndex ---------------------------------------------------------------------------


def test_sent_index_empty_drops_nothing(capture: list[dict]) -> None:
    frame = _deduped(capture[:3])
    kept, dropped = SentIndex().drop_sent(frame)
    assert dropped == 0
    assert kept.equals(frame)


def test_sent_index_drops_later_exact_copy(capture: list[dict]) -> None:
    sent = SentIndex()
    sent.add(_deduped(capture[:5]))
    kept, dropped = sent.drop_sent(frame_of(capture[:5], source="again.jsonl"))
    assert (kept.height, dropped) == (0, 5)


def test_sent_index_drops_poorer_spend_logs_copy_after_slp(capture: list[dict]) -> None:
    sent = SentIndex()
    sent.add(_deduped(capture[:5]))
    rows = [spend_row(r, store_prompts=False, naive=True) for r in capture[:5]]
    kept, dropped = sent.drop_sent(frame_of(rows, source="spend.jsonl"))
    assert (kept.height, dropped) == (0, 5)


def test_sent_index_lets_slp_upgrade_a_sent_spend_logs_copy(capture: list[dict]) -> None:
    sent = SentIndex()
    rows = [spend_row(r, store_prompts=False, naive=True) for r in capture[:5]]
    sent.add(_deduped(rows))
    kept, dropped = sent.drop_sent(frame_of(capture[:5]))
    assert dropped == 0
    assert kept.height == 5
    assert set(kept["format"].to_list()) == {SLP}
    # Once the SLP copy is sent too, neither copy goes again.
    sent.add(kept)
    assert sent.drop_sent(frame_of(capture[:5]))[1] == 5
    assert sent.drop_sent(frame_of(rows, source="spend.jsonl"))[1] == 5


def test_sent_index_keeps_unsent_attempts_of_a_sent_call(capture: list[dict]) -> None:
    fail, ok = by_call(capture)[MULTI_ATTEMPT[0]]
    sent = SentIndex()
    sent.add(_deduped([fail]))
    kept, dropped = sent.drop_sent(frame_of([fail, ok, capture[0]], source="more.jsonl"))
    assert dropped == 1
    assert kept["status"].to_list() == ["success", "success"]
    assert set(kept["call_key"].to_list()) == {ok["litellm_call_id"], capture[0]["litellm_call_id"]}


def test_sent_index_stays_bounded_and_keeps_the_attempts_that_ended_last(capture: list[dict]) -> None:
    """A daemon's index must not grow for months: past its cap it keeps the newest three quarters."""
    sent = SentIndex(cap=40)
    batches = [_deduped(reidentify(capture[:10], shift_s=3600.0 * i, salt=f"cap-{i}")) for i in range(12)]
    for b in batches:
        sent.add(b)
        assert sent.frame.height <= 40
    assert sent.drop_sent(batches[-1])[1] == batches[-1].height, "the newest are still known"
    assert sent.drop_sent(batches[0])[1] == 0, "the oldest were let go (a copy of them is merged by MLflow)"


def test_dedupe_and_split_counts_resent_copies(capture: list[dict]) -> None:
    sent = SentIndex()
    first = dedupe_and_split(frame_of([capture[0]]).clear(), frame_of(capture[:4]), DEFAULT_SETTLE_S, final=True, sent=sent)
    assert (first.ready.height, first.duplicates) == (4, 0)
    sent.add(first.ready)  # the pipeline does this once MLflow acknowledged the write
    again = frame_of(capture[:4] + capture[:1], source="again.jsonl")
    second = dedupe_and_split(first.held, again, DEFAULT_SETTLE_S, final=True, sent=sent)
    assert second.ready.height == 0
    assert second.duplicates == 5


def test_late_retry_rewrites_the_call_with_every_attempt(capture: list[dict]) -> None:
    """A fallback that arrives after its failure was already written (later than --settle) still joins it."""
    from ingest.pipeline import Pipeline
    from ingest.quarantine import QuarantineWriter
    from ingest.sink import NullSink
    from ingest.sources import split_lines

    written: list[list[int]] = []

    class Recording(NullSink):
        def write(self, traces):  # type: ignore[no-untyped-def]
            written.append([len(t.spans) for t in traces])
            return 0

    fail, ok = [r for r in capture if r["litellm_call_id"].startswith("86f9bb02")]
    pipe = Pipeline(Recording(), "1", QuarantineWriter(None), settle_s=0.0)
    for n, rec in enumerate((fail, ok)):
        frame, _ = split_lines("x.jsonl", (json.dumps(rec) + "\n").encode(), n * 100_000, n + 1)
        from ingest.sources import Chunk

        pipe.feed(Chunk("x.jsonl", frame))
    assert written == [[1], [3]], "first the failure alone, then the whole call: root + both attempts"
