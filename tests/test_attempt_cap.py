"""One call id on more attempts than a call makes (an id reused, a retry storm): its trace keeps the
first ``MAX_ATTEMPTS``, the rest are quarantined, and nothing about it grows with the input.

A storm that kept failing was held whole in memory (and in the daemon's state) for as long as it
went on; one that kept succeeding was read back and rewritten whole at every chunk (quadratic)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest

from ingest.dedupe import MAX_ATTEMPTS, cut_attempts, split_final
from tests.conftest import all_traces, run_cli
from tests.followkit import RecordingSink, line, record


def _rows(n: int, status: str = "failure") -> pl.DataFrame:
    return pl.DataFrame({"call_key": ["c"] * n, "status": [status] * n, "start_us": list(range(n)), "end_us": [n - i for i in range(n)]})


def test_a_call_keeps_its_first_attempts_by_the_order_they_ran_and_is_no_longer_held() -> None:
    kept, rest = cut_attempts(_rows(MAX_ATTEMPTS + 5))
    assert kept.height == MAX_ATTEMPTS and rest.height == 5
    assert sorted(kept["end_us"]) == list(range(1, MAX_ATTEMPTS + 1)), "the attempts that ended first"
    assert kept["start_us"].is_sorted()
    ready, held = split_final(kept, settle_s=1e9)
    assert (ready.height, held.height) == (MAX_ATTEMPTS, 0), "a call with all its attempts waits for no retry"
    ready, held = split_final(kept.head(MAX_ATTEMPTS - 1), settle_s=1e9)
    assert (ready.height, held.height) == (0, MAX_ATTEMPTS - 1)
    same, none = cut_attempts(_rows(3))
    assert same.height == 3 and none.height == 0


def test_a_failing_storm_fed_chunk_by_chunk_is_never_held_past_the_attempts_a_call_keeps() -> None:
    from ingest.pipeline import Pipeline
    from ingest.quarantine import QuarantineWriter
    from ingest.sources import Chunk, split_lines

    sink, writer = RecordingSink(), QuarantineWriter(None)
    pipe = Pipeline(sink, "1", writer, settle_s=1e6)
    total, held = 3 * MAX_ATTEMPTS, []
    for n in range(0, total, 10):
        data = "".join(line(record("storm", "failure", 1000.0 + i, 1000.5 + i, i)) for i in range(n, n + 10))
        data += line(record(f"other-{n}", "success", 1000.0 + n, 1001.0 + n))
        frame, _ = split_lines("x.jsonl", data.encode(), n * 100_000, n + 1)
        pipe.feed(Chunk("x.jsonl", frame))
        held.append(pipe.pending.filter(pl.col("call_key") == "storm").height)
    pipe.flush(final=True)
    assert max(held) < MAX_ATTEMPTS, held
    calls = sink.calls()
    assert len(calls["storm"]["spans"]) == MAX_ATTEMPTS + 1 and calls["storm"]["state"] == "ERROR"
    assert len(calls) == 1 + total // 10, "every other call written"
    assert writer.counts == {"too_many_attempts": total - MAX_ATTEMPTS}
    assert pipe.summary.calls == len(calls)


def _batch(tmp_path: Path, uri: str, experiment: str, log: Path) -> dict:
    args = ["batch", str(log), "--tracking-uri", uri, "--experiment-name", experiment, "--json", "--settle", "0"]
    args += ["--state-dir", str(tmp_path / "state"), "--quarantine-file", str(tmp_path / "quarantine.jsonl")]
    proc = run_cli(args, tmp_path, dict(os.environ), 300)
    assert proc.returncode in (0, 3) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("status", ["success", "failure"])
def test_an_id_reused_over_runs_keeps_one_trace_of_its_first_attempts_in_a_real_store(tmp_path: Path, status: str) -> None:
    """Attempts joined to the trace MLflow holds (a later run's) stop at ``MAX_ATTEMPTS`` too: the
    rest are quarantined with file and line, and the other calls of the same files are written."""
    uri, experiment = f"sqlite:///{tmp_path / 'store.db'}", f"cap-{status}"
    parts = [(0, 60), (60, 120), (120, 130)]
    for k, (lo, hi) in enumerate(parts):
        recs = [record("reused", status, 1000.0 + i, 1000.5 + i, i) for i in range(lo, hi)]
        recs += [record(f"call-{k}-{i}", "success", 1000.0 + i, 1000.2 + i) for i in range(5)]
        log = tmp_path / f"part{k}.jsonl"
        log.write_text("".join(line(r) for r in recs))
        summary = _batch(tmp_path, uri, experiment, log)
        assert summary["quarantined"] == max(0, hi - max(lo, MAX_ATTEMPTS)), summary
    traces = {t.info.tags["litellm.call_id"]: t for t in all_traces(uri, experiment)}
    assert len(traces) == 1 + 5 * len(parts)
    reused = traces["reused"]
    assert len(reused.data.spans) == MAX_ATTEMPTS + 1
    starts = sorted(s.start_time_ns for s in reused.data.spans if s.parent_id is not None)
    assert starts == [int((1000.0 + i) * 1e9) for i in range(MAX_ATTEMPTS)], "the first attempts, none twice"
    lines = [json.loads(x) for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert {q["reason"] for q in lines} == {"too_many_attempts"}
    assert sorted((Path(q["source"]).name, q["line"]) for q in lines) == [("part1.jsonl", n) for n in range(41, 61)] + [
        ("part2.jsonl", n) for n in range(1, 11)
    ]
