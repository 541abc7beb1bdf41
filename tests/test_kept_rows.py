"""Rows a pipeline keeps from step to step (calls held for their retry, failures remembered for a
late one) must not keep the whole chunks they were read in: Polars' filtered strings still point
into their chunk's buffers."""

from __future__ import annotations

import gc
import time

import polars as pl

from ingest.dedupe import Kept, detached, text_bytes
from ingest.pipeline import Pipeline
from ingest.quarantine import QuarantineWriter
from ingest.sink import NullSink
from ingest.sources import Chunk, split_lines
from tests.followkit import line, record

PAD = "x" * 30_000


def _rss_mb() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // 2**20


def test_a_few_rows_kept_from_every_chunk_do_not_keep_every_chunk() -> None:
    """Shuffled history: each chunk leaves one call held (it ended within --settle of the newest)
    and one remembered as failed. Before, every chunk stayed in memory (about 6 MB each here), and a
    900 MB backfill of shuffled records peaked at 1.4 GB."""
    pipe = Pipeline(NullSink(), "1", QuarantineWriter(None), settle_s=120.0)  # type: ignore[arg-type]
    now = time.time() - 60
    offset = 0

    def feed(i: int) -> None:
        nonlocal offset
        recs = [record(f"ok-{i}-{j}", "success", now - 7200 + j, now - 7199 + j) for j in range(200)]
        recs += [record(f"held-{i}", "failure", now - 6, now - 5), record(f"failed-{i}", "failure", now - 601, now - 600)]
        recs += [record("newest", "success", now - 1, now)] if i == 0 else []
        data = "".join(line({**r, "pad": PAD}) for r in recs).encode()
        frame, _ = split_lines("x.jsonl", data, offset, i * 1000 + 1)
        offset += len(data)
        pipe.feed(Chunk("x.jsonl", frame))

    for i in range(5):
        feed(i)
    warm = _rss_mb()
    for i in range(5, 65):
        feed(i)
    grown = _rss_mb() - warm
    assert pipe.pending["call_key"].n_unique() == 65 and pipe.recent["call_key"].n_unique() == 65
    assert grown < 150, f"{grown} MB more after 60 chunks of ~6 MB, for 120 rows kept"
    pipe.flush(final=True)
    assert pipe.summary.calls == 65 * 202 + 1


def test_kept_rows_are_copied_out_only_once_they_pin_more_than_twice_their_size() -> None:
    chunk = pl.DataFrame({"raw": [f"{i:04d}" + "y" * 1000 for i in range(100)]})
    kept, size = Kept(), text_bytes(chunk)
    few = chunk.head(60)
    assert kept.keep(few, size) is few and kept.pinned == size
    fewer = chunk.head(10)
    again = kept.keep(fewer, 0)
    assert again is not fewer and again.equals(fewer) and kept.pinned == text_bytes(fewer)
    assert detached(chunk.clear()).height == 0
