"""Dedupe: one trace per call id, one span per distinct attempt.

An attempt is identified by (call key, start time to the millisecond, status): LiteLLM writes one
record per attempt (a failed try, then its retry or fallback), and the same attempt delivered
twice (overlapping backfill files, a logger retry, a SpendLogs export of the same call) agrees
on all three even across formats (SpendLogs keeps milliseconds). When copies differ, the richer
format wins (StandardLoggingPayload over SpendLogs), then the first one read.

Calls are handed on only when final: a call whose latest attempt failed may still get its retry
or fallback record, and MLflow keeps a trace's first state and previews on a re-send, so such a
call is held until the stream or this machine's clock has moved ``settle`` past it, it has been
held ``settle`` by the monotonic clock, or the input ends.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import polars as pl

from ingest.schemas import all_schemas

FORMAT_PRIORITY = {"standard_logging_payload": 0}
DEFAULT_SETTLE_S = 120.0
MAX_ATTEMPTS = 100
"""Attempts one call keeps: LiteLLM's retries and fallbacks make a handful. An id on thousands of
records is an id reused (a client's own ``x-litellm-call-id``, a retry storm of one request), and
such a "call" was held whole in memory while it kept failing, or read back and rewritten whole
at every chunk while it kept succeeding."""


def attempt_key() -> list[pl.Expr]:
    return [pl.col("call_key"), ((pl.col("start_us") + 500) // 1000).alias("start_ms"), pl.col("status")]


class SentIndex:
    """Attempts already handed to the sink, ~20 bytes each (a 64-bit hash, a priority, an end time).

    Lets a later copy of an attempt (the same S3 batch twice, a SpendLogs export of calls already
    read from payload logs) be dropped instead of re-sent: a poorer copy must not overwrite the
    richer span MLflow already has. A richer copy arriving later is still sent (it upgrades).

    A daemon runs for months, so the index keeps the ``cap`` attempts that ended last (cut to three
    quarters when it grows past it): memory stays flat and each batch's merge stays cheap. A copy of
    an attempt older than that is sent again, which MLflow merges as any re-send.
    """

    CAP = 2_000_000

    def __init__(self, cap: int = CAP) -> None:
        self.cap = cap
        self.frame = pl.DataFrame(schema={"_h": pl.UInt64, "_prio": pl.Int32, "_end": pl.Int64})

    @staticmethod
    def _hash() -> pl.Expr:
        return pl.struct(*attempt_key()).hash(seed=7).alias("_h")

    def drop_sent(self, frame: pl.DataFrame) -> tuple[pl.DataFrame, int]:
        if not frame.height or not self.frame.height:
            return frame, 0
        keyed = frame.with_columns(self._hash(), _prio=_priority())
        seen = keyed.join(self.frame.drop("_end"), on="_h", how="left", suffix="_sent")
        keep = seen.filter(pl.col("_prio_sent").is_null() | (pl.col("_prio") < pl.col("_prio_sent")))
        return keep.drop("_h", "_prio", "_prio_sent"), frame.height - keep.height

    def add(self, frame: pl.DataFrame) -> None:
        new = frame.select(self._hash(), _prio=_priority(), _end=pl.col("end_us").cast(pl.Int64))
        merged = pl.concat([self.frame, new]).group_by("_h").agg(pl.col("_prio").min(), pl.col("_end").max())
        if merged.height > self.cap:
            merged = merged.sort("_end", descending=True).head(self.cap * 3 // 4)
        self.frame = merged


@dataclass
class Deduped:
    ready: pl.DataFrame
    held: pl.DataFrame
    duplicates: int
    excess: pl.DataFrame
    """Attempts of calls past their first ``MAX_ATTEMPTS`` (in the order they ran): not written."""
    full: list[str]
    """Ready calls with all the attempts a call keeps: any later attempt of theirs is excess."""
    held_calls: pl.DataFrame
    """A row per held call: ``call_key``, ``last_end`` (what its wait is measured from)."""


def _format_order() -> dict[str, int]:
    names = [s.name for s in all_schemas()]
    return {n: FORMAT_PRIORITY.get(n, 1 + i) for i, n in enumerate(names)}


def format_rank(name: object) -> int:
    """How rich a copy read from this format is: lower is richer, an unknown one is the poorest."""
    order = _format_order()
    return order.get(name, len(order)) if isinstance(name, str) else len(order)


def _priority() -> pl.Expr:
    order = _format_order()
    return pl.col("format").replace_strict(order, default=len(order), return_dtype=pl.Int32)


def dedupe(frame: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Drop re-delivered copies of an attempt; rows come back sorted by call, then attempt start."""
    if not frame.height:
        return frame, 0
    out = (
        frame.with_columns(*attempt_key(), _prio=_priority(), _seq=pl.int_range(pl.len()))
        .sort("_prio", "_seq")
        .unique(subset=["call_key", "start_ms", "status"], keep="first", maintain_order=True)
        .sort("call_key", "start_us", "_seq")
        .drop("_prio", "_seq", "start_ms")
    )
    return out, frame.height - out.height


def detached(frame: pl.DataFrame) -> pl.DataFrame:
    """A copy of ``frame`` that owns its data (see :class:`Kept`)."""
    if not frame.height:
        return frame
    buf = io.BytesIO()
    frame.write_ipc(buf)
    buf.seek(0)
    return pl.read_ipc(buf)


def text_bytes(frame: pl.DataFrame) -> int:
    """The bytes of the records' lines: what a frame of them holds, near enough."""
    return int(frame["raw"].str.len_bytes().sum()) if frame.height else 0  # type: ignore[arg-type]


class Kept:
    """Rows kept from step to step (calls held for their retry, failures remembered for a late one).

    A filtered frame's strings still point into the buffers of the whole chunk they were read in
    (Polars' string views): a few rows kept from each chunk kept every chunk alive, and a backfill
    of shuffled history grew by the size of its input (1.4 GB for 900 MB read). They are copied out
    once what they may point into is more than twice their own size: each byte read is copied at
    most about once."""

    def __init__(self) -> None:
        self.pinned = 0

    def keep(self, frame: pl.DataFrame, added: int) -> pl.DataFrame:
        """``frame``, to be kept, now that it may also point into ``added`` bytes of new chunks."""
        live = text_bytes(frame)
        self.pinned += added
        if live * 2 < self.pinned:
            frame, self.pinned = detached(frame), live
        return frame


def per_call(frame: pl.DataFrame) -> pl.DataFrame:
    """A row per call of deduped rows: its outcome (the attempt that ended last), its end, its attempts."""
    return frame.group_by("call_key").agg(
        last_status=pl.col("status").sort_by("end_us", "start_us").last(),
        last_end=pl.col("end_us").max(),
        attempts=pl.len(),
    )


def cut_attempts(
    frame: pl.DataFrame, max_attempts: int = MAX_ATTEMPTS, calls: pl.DataFrame | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Deduped rows as each call's first ``max_attempts`` attempts, by end time, and the rest
    (``calls``: their :func:`per_call`, when known)."""
    if not frame.height or int((per_call(frame) if calls is None else calls)["attempts"].max()) <= max_attempts:  # type: ignore[arg-type]
        return frame, frame.clear()
    order = frame.sort("call_key", "end_us", "start_us").with_columns(_n=pl.int_range(pl.len()).over("call_key"))
    keep = pl.col("_n") < max_attempts
    return order.filter(keep).drop("_n").sort("call_key", "start_us", maintain_order=True), order.filter(~keep).drop("_n")


def split_final(
    frame: pl.DataFrame,
    settle_s: float = DEFAULT_SETTLE_S,
    final: bool = False,
    now_us: int | None = None,
    horizon_us: int | None = None,
    calls: pl.DataFrame | None = None,
    waited: pl.DataFrame | None = None,
    hold_ahead: bool = False,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split deduped rows into calls that are final now and calls to hold for a retry/fallback.

    A call's outcome is its attempt that ended last: a fallback's success record carries the
    original request's start time, earlier than the failed primary it replaced. The watermark is
    the newest end time read, or ``now_us`` (wall clock) at the end of a run: history older than
    the settle window is final, a failure from the last minutes may still get its retry (unless it
    has all the attempts a call keeps). ``waited`` (``call_key``, ``last_end``): calls held for
    ``settle`` already, by a clock that does not step; they are final whatever the watermark says.
    A call that ends past ``horizon_us`` (a proxy clock far ahead of this one, a bogus time) moves
    no watermark: it would make every other failure final without its wait. It is final at once,
    unless ``hold_ahead`` (a process that lives to see ``waited``): by the watermark alone it would
    wait until the wall clock got there. ``calls``: the rows' :func:`per_call`, when known.
    """
    if final or not frame.height:
        return frame, frame.clear()
    calls = per_call(frame) if calls is None else calls
    plausible = calls if horizon_us is None else calls.filter(pl.col("last_end") <= horizon_us)
    watermark = max(int(plausible["last_end"].max() or 0), now_us or 0)  # type: ignore[arg-type]
    waits = (pl.col("last_status") != "success") & (pl.col("last_end") > watermark - int(settle_s * 1_000_000))
    hold = (calls if hold_ahead else plausible).filter(waits & (pl.col("attempts") < MAX_ATTEMPTS))
    if waited is not None and waited.height:
        hold = hold.join(waited, on=["call_key", "last_end"], how="anti")
    held = pl.col("call_key").is_in(hold["call_key"].implode())
    return frame.filter(~held), frame.filter(held)


def dedupe_and_split(
    pending: pl.DataFrame,
    new: pl.DataFrame,
    settle_s: float,
    final: bool,
    sent: SentIndex | None = None,
    now_us: int | None = None,
    horizon_us: int | None = None,
    waited: pl.DataFrame | None = None,
    hold_ahead: bool = False,
) -> Deduped:
    """Merge held rows with a new chunk, dedupe (against what was sent too), split into ready and held calls.

    The caller adds ``ready`` to ``sent`` once MLflow acknowledged it, not before.
    """
    resent = 0
    if sent is not None:
        new, resent = sent.drop_sent(new)
    merged = pl.concat([pending, new], how="vertical") if pending.height else new
    deduped, dups = dedupe(merged)
    calls = per_call(deduped)
    deduped, excess = cut_attempts(deduped, calls=calls)
    if excess.height:
        calls = per_call(deduped)
    ready, held = split_final(deduped, settle_s, final, now_us, horizon_us, calls, waited, hold_ahead)
    held_keys = held["call_key"].implode()
    full = calls.filter(pl.col("attempts") >= MAX_ATTEMPTS, ~pl.col("call_key").is_in(held_keys))["call_key"]
    held_calls = calls.filter(pl.col("call_key").is_in(held_keys)).select("call_key", "last_end")
    return Deduped(ready, held, dups + resent, excess, full.to_list(), held_calls)
