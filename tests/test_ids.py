"""Deterministic ids: trace ids per (experiment, call), span ids per attempt, millisecond attempt identity."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal

import pytest

from ingest.ids import attempt_identity, mlflow_trace_id, otel_span_id, otel_trace_id

CALL_A = "9e4865c9-262d-4671-a909-2f7a2e0b1c3d"
CALL_B = "152e487e-dcf9-497b-966f-9bbf6d000000"


def postgres_ms(start_us: int) -> int:
    """What Postgres timestamp(3) keeps of a microsecond timestamp: the millisecond, half rounded up (positive epochs)."""
    return int((Decimal(start_us) / 1000).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# --- trace ids ---------------------------------------------------------------------------


def test_trace_id_is_deterministic_for_experiment_and_call() -> None:
    assert otel_trace_id("1", CALL_A) == otel_trace_id("1", CALL_A)


def test_trace_id_differs_across_experiments() -> None:
    assert otel_trace_id("1", CALL_A) != otel_trace_id("2", CALL_A)


def test_trace_id_differs_across_call_keys() -> None:
    assert otel_trace_id("1", CALL_A) != otel_trace_id("1", CALL_B)


def test_trace_id_does_not_confuse_experiment_and_call_boundaries() -> None:
    # ("12", "3...") and ("1", "23...") must not hash alike.
    assert otel_trace_id("12", "3" + CALL_A) != otel_trace_id("1", "23" + CALL_A)


def test_trace_id_is_16_nonzero_bytes() -> None:
    tid = otel_trace_id("0", CALL_A)
    assert isinstance(tid, bytes)
    assert len(tid) == 16
    assert any(tid)


def test_mlflow_trace_id_is_tr_plus_32_hex_of_the_otel_id() -> None:
    tid = otel_trace_id("7", CALL_A)
    mid = mlflow_trace_id(tid)
    assert re.fullmatch(r"tr-[0-9a-f]{32}", mid)
    assert bytes.fromhex(mid[3:]) == tid


def test_mlflow_trace_id_matches_what_mlflow_derives_from_the_otel_id() -> None:
    from mlflow.tracing.utils import generate_mlflow_trace_id_from_otel_trace_id

    tid = otel_trace_id("7", CALL_A)
    assert mlflow_trace_id(tid) == generate_mlflow_trace_id_from_otel_trace_id(int.from_bytes(tid, "big"))


# --- span ids ----------------------------------------------------------------------------


def test_span_id_is_deterministic_and_8_bytes() -> None:
    tid = otel_trace_id("1", CALL_A)
    ident = attempt_identity(1_795_788_109_313_645, "success")
    assert otel_span_id(tid, ident) == otel_span_id(tid, ident)
    assert len(otel_span_id(tid, ident)) == 8
    assert any(otel_span_id(tid, ident))


def test_span_ids_distinct_per_attempt_identity() -> None:
    tid = otel_trace_id("1", CALL_A)
    starts = [1_795_788_134_647_679, 1_795_788_140_510_588]
    idents = [attempt_identity(s, st) for s in starts for st in ("success", "failure")]
    ids = [otel_span_id(tid, i) for i in ["root", *idents]]
    assert len(set(idents)) == 4
    assert len(set(ids)) == len(ids)


def test_span_id_depends_on_trace_id() -> None:
    ident = attempt_identity(1_795_788_109_313_645, "success")
    assert otel_span_id(otel_trace_id("1", CALL_A), ident) != otel_span_id(otel_trace_id("2", CALL_A), ident)
    assert otel_span_id(otel_trace_id("1", CALL_A), "root") != otel_span_id(otel_trace_id("1", CALL_B), "root")


# --- attempt identity --------------------------------------------------------------------


@pytest.mark.parametrize("sub_ms_us", [0, 1, 250, 499, 500, 501, 750, 999])
def test_attempt_identity_rounds_to_the_millisecond_like_postgres(sub_ms_us: int) -> None:
    start_us = 1_795_788_109_313_000 + sub_ms_us
    ms = postgres_ms(start_us)
    # A SpendLogs copy holds exactly that millisecond: its identity must be the payload record's.
    assert attempt_identity(start_us, "success") == attempt_identity(ms * 1000, "success")
    # ...and differ from the neighbouring milliseconds.
    assert attempt_identity(start_us, "success") != attempt_identity((ms - 1) * 1000, "success")
    assert attempt_identity(start_us, "success") != attempt_identity((ms + 1) * 1000, "success")


def test_attempt_identity_half_millisecond_rounds_up() -> None:
    base = 1_795_788_109_313_000
    assert attempt_identity(base + 500, "failure") == attempt_identity(base + 1000, "failure")
    assert attempt_identity(base + 499, "failure") == attempt_identity(base, "failure")
    assert attempt_identity(base - 500, "failure") == attempt_identity(base, "failure")
    assert attempt_identity(base - 501, "failure") == attempt_identity(base - 1000, "failure")


def test_attempt_identity_distinguishes_status() -> None:
    assert attempt_identity(1_795_788_109_313_645, "success") != attempt_identity(1_795_788_109_313_645, "failure")


def test_attempt_identity_matches_spend_logs_copy_for_every_capture_record(capture: list[dict]) -> None:
    for rec in capture:
        slp_us = int((Decimal(repr(rec["startTime"])) * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        spend_ms = int(Decimal(repr(rec["startTime"])).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP) * 1000)
        assert attempt_identity(slp_us, rec["status"]) == attempt_identity(spend_ms * 1000, rec["status"]), rec["litellm_call_id"]
