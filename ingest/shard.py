"""``--shard I/N``: N machines split one archive of log files into one MLflow.

A file belongs to shard ``blake2b(fingerprint) mod N``: the fingerprint (:mod:`ingest.fingerprint`)
is what the checkpoints already know a file by, so a renamed or compressed copy of a file lands on the
same machine as the original (and continues its checkpoint there), and every machine computes the
same split from the same bytes whatever the paths are mounted as. ``hashlib``, not ``hash()``:
Python salts the latter per process. A file without a fingerprint (empty, or no line yet) has no
records: every shard skips it, as an unsharded run does.

Attempts of one call can straddle two files (a retry logged just after a rotation). Each machine
also reads the neighbours of its files in the discovered order, the previous file's tail and the
next file's head, without checkpointing, counting or quarantining them; a call is written only
by the shard of the file holding its earliest record, so exactly one machine writes it, whole.

Buckets and databases are read whole by every shard, each writing the calls whose id hashes to
it: a call's attempts are spread over objects and rows, and writing, not reading, is what N
machines share.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ingest.fingerprint import fingerprint_of
from ingest.normalize import normalize_isolating
from ingest.sources import DAMAGED, Chunk, open_log, read_chunks

EDGE_CHUNKS = 8
"""At most this many chunks of a neighbour's edge are read as context (bounded memory and time)."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"{text!r} is not I/N (for example 1/3)")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1 or not 1 <= index <= count:
            raise ValueError(f"{text!r}: I must be from 1 to N, and N at least 1")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, identity: str) -> bool:
        """``identity``: a fingerprint, or a checkpoint key (``fingerprint@path-hash`` for a diverged copy)."""
        digest = hashlib.blake2b(identity.split("@", 1)[0].encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index - 1


def file_fingerprint(path: Path) -> str | None:
    """The fingerprint a backfill identifies ``path`` by (an archive is finished: no line is awaited)."""
    try:
        with open_log(path) as f:
            return fingerprint_of(f, unterminated_ok=True)
    except DAMAGED:
        return None


def _records(chunk: Chunk, key: str) -> pl.DataFrame:
    records, _ = normalize_isolating(chunk.lines.with_columns(file=pl.lit(key)))
    return records


def edge_head(path: Path, key: str, window_us: int, chunk_bytes: int) -> Iterator[pl.DataFrame]:
    """The records of ``path``'s first ``window_us`` (by start time), chunk by chunk."""
    first: int | None = None
    for n, chunk in enumerate(_safe_chunks(path, chunk_bytes)):
        records = _records(chunk, key)
        if records.height:
            yield records
            first = first if first is not None else int(records["start_us"].min())  # type: ignore[arg-type]
            if int(records["start_us"].max()) >= first + window_us:  # type: ignore[arg-type]
                return
        if n + 1 >= EDGE_CHUNKS:
            return


def edge_tail(path: Path, key: str, window_us: int, chunk_bytes: int) -> pl.DataFrame | None:
    """The records of ``path``'s last ``window_us`` (by end time): the whole file is read (a compressed file
    has no other way to its end), only the last chunks are parsed."""
    last: deque[Chunk] = deque(maxlen=EDGE_CHUNKS)
    for chunk in _safe_chunks(path, chunk_bytes):
        last.append(chunk)
    frames: list[pl.DataFrame] = []
    newest: int | None = None
    for chunk in reversed(last):
        records = _records(chunk, key)
        if not records.height:
            continue
        frames.append(records)
        newest = newest if newest is not None else int(records["end_us"].max())  # type: ignore[arg-type]
        if int(records["end_us"].min()) < newest - window_us:  # type: ignore[arg-type]
            break
    return pl.concat(frames[::-1]) if frames else None


def _safe_chunks(path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    """A neighbour that cannot be read whole gives what it can: it is its own shard's to report."""
    try:
        yield from read_chunks(path, chunk_bytes=chunk_bytes)
    except (*DAMAGED, ValueError):
        return
