"""No record can stop the ingester: poison records through the real CLI and real stores.

Each poison record sits among good ones; the run must not raise, must write the good calls, must
quarantine (or keep, with a warning) the poison one, and must move its checkpoint, so the next run
does not meet the same record again.
"""

from __future__ import annotations

import copy
import functools
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner
from mlflow.tracing.constant import SpanAttributeKey

from ingest.cli import main
from ingest.normalize import MAX_EPOCH_S
from ingest.pipeline import Pipeline
from ingest.quarantine import QuarantineWriter
from ingest.sink import SinkError, StoreSink, resolve_target
from ingest.spans import build_trace
from tests.conftest import all_traces, reidentify, write_jsonl


def good_records(capture: list[dict], tag: str) -> list[dict]:
    """Single-attempt, successful calls from the capture, with fresh ids."""
    ones = [r for r in capture if r["status"] == "success" and sum(x["litellm_call_id"] == r["litellm_call_id"] for x in capture) == 1]
    return reidentify(ones[:6], salt=tag)


def cli_batch(paths: list[Path], uri: str, experiment: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    """``litellm-ingest batch --json`` in-process; (exit code, summary, stderr). Any exception fails the test."""
    result = CliRunner().invoke(
        main, ["batch", *map(str, paths), "--tracking-uri", uri, "--experiment-name", experiment, "--json", *extra], catch_exceptions=True
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    return result.exit_code, summary, result.stderr


def quarantine_lines(tmp_path: Path) -> list[dict]:
    q = tmp_path / "state" / "quarantine.jsonl"
    return [json.loads(line) for line in q.read_text().split("\n") if line] if q.exists() else []


def write_with_poison(path: Path, good: list[dict], poison: str) -> tuple[Path, int]:
    """Good records with the poison line in the middle; the file and the poison's line number."""
    lines = [json.dumps(r) for r in good]
    at = len(lines) // 2
    lines.insert(at, poison)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path, at + 1


def poisoned(base: dict, change: Callable[[dict], None]) -> str:
    r = copy.deepcopy(base)
    change(r)
    return json.dumps(r)


QUARANTINED: dict[str, tuple[Callable[[dict], None], str, str]] = {
    "startTime 1e20": (lambda r: r.update(startTime=1e20), "bad_time", "startTime"),
    "endTime 1e20": (lambda r: r.update(endTime=1e20), "bad_time", "endTime"),
    "endTime in 2286": (lambda r: r.update(endTime=10_000_000_000.0), "bad_time", "endTime"),
    "response_cost true": (lambda r: r.update(response_cost=True), "wrong_type", "response_cost"),
    "prompt_tokens true": (lambda r: r.update(prompt_tokens=True), "wrong_type", "prompt_tokens"),
    "startTime true": (lambda r: r.update(startTime=True), "wrong_type", "startTime"),
    "ids true": (lambda r: r.update(litellm_call_id=True, id=True), "wrong_type", "id"),
}

KEPT: dict[str, tuple[Callable[[dict], None], str | dict[str, int] | None]] = {
    "model_parameters array": (lambda r: r.update(model_parameters=[1, {"a": 2}]), "dropped_model_parameters"),
    "model_parameters string": (lambda r: r.update(model_parameters="temperature=0"), "dropped_model_parameters"),
    "lone surrogate in a prompt": (lambda r: r["messages"][0].update(content="\ud800Hello"), "lone_surrogate"),
    "NaN cost": (lambda r: r.update(response_cost=float("nan")), "nan_response_cost"),
    "negative token count": (lambda r: r.update(completion_tokens=-3), "negative_completion_tokens"),
    "endTime before startTime": (
        lambda r: r.update(endTime=r["startTime"] - 5, completionStartTime=r["startTime"] - 5),  # a whole answer's is its end
        {"end_before_start": 1, "bad_completionStartTime": 1},
    ),
    "times at the last storable second": (
        lambda r: r.update(startTime=MAX_EPOCH_S - 1.5, endTime=MAX_EPOCH_S, completionStartTime=None),
        "end_in_future",
    ),
}


@pytest.mark.parametrize("case", list(QUARANTINED))
def test_a_poison_record_is_quarantined_with_file_line_and_reason_and_the_run_goes_on(
    case: str, capture: list[dict], tmp_path: Path, sqlite_uri: str, experiment_name: str
) -> None:
    change, reason, field = QUARANTINED[case]
    good = good_records(capture, case)
    path, line = write_with_poison(tmp_path / "logs" / "proxy.jsonl", good, poisoned(good[0] | {"litellm_call_id": "p", "id": "p"}, change))
    code, summary, _ = cli_batch([path], sqlite_uri, experiment_name)
    assert code == 3, summary
    q = quarantine_lines(tmp_path)
    assert [(x["source"], x["line"], x["reason"]) for x in q] == [(str(path), line, reason)]
    assert field in q[0]["detail"]
    assert summary["traces_written"] == len(good) == len(all_traces(sqlite_uri, experiment_name, include_spans=False))
    code, summary, _ = cli_batch([path], sqlite_uri, experiment_name)
    assert code == 0 and summary["records_read"] == 0, summary
    assert len(quarantine_lines(tmp_path)) == 1


@pytest.mark.parametrize("case", list(KEPT))
def test_an_odd_but_harmless_field_is_dropped_or_replaced_with_a_warning_and_the_record_kept(
    case: str, capture: list[dict], tmp_path: Path, sqlite_uri: str, experiment_name: str
) -> None:
    change, warning = KEPT[case]
    good = good_records(capture, case)
    path, _ = write_with_poison(
        tmp_path / "logs" / "proxy.jsonl", good, poisoned(good[0] | {"litellm_call_id": "odd", "id": "odd"}, change)
    )
    code, summary, _ = cli_batch([path], sqlite_uri, experiment_name)
    assert code == 0, (summary, quarantine_lines(tmp_path))
    assert summary["traces_written"] == len(good) + 1
    if warning:
        expected = warning if isinstance(warning, dict) else {warning: 1}
        assert summary["warnings_by_kind"] == expected and summary["warnings"] == sum(expected.values())
    traces = {t.info.tags["litellm.call_id"]: t for t in all_traces(sqlite_uri, experiment_name)}
    assert "odd" in traces and len(traces) == len(good) + 1
    code, summary, _ = cli_batch([path], sqlite_uri, experiment_name)
    assert code == 0 and summary["records_read"] == 0


def test_a_lone_surrogate_is_stored_as_a_replacement_character(
    capture: list[dict], tmp_path: Path, sqlite_uri: str, experiment_name: str
) -> None:
    r = good_records(capture, "surrogate")[0]
    r["messages"] = [{"role": "user", "content": "\ud800Hello"}]
    cli_batch([write_jsonl(tmp_path / "a.jsonl", [r])], sqlite_uri, experiment_name)
    (trace,) = all_traces(sqlite_uri, experiment_name)
    assert trace.data.spans[0].inputs["messages"] == [{"role": "user", "content": "\ufffdHello"}]


def test_a_boolean_is_not_taken_for_a_number_or_an_id(capture: list[dict], tmp_path: Path, sqlite_uri: str, experiment_name: str) -> None:
    """Two unrelated calls whose ids are ``true`` must not merge, nor a ``true`` cost count as 1.0."""
    good = good_records(capture, "bools")
    records = []
    for n, change in enumerate(
        [
            {"litellm_call_id": True, "id": True},
            {"litellm_call_id": True, "id": True},
            {"response_cost": True},
            {"prompt_tokens": True},
            {"startTime": True},
            {"endTime": False},
            {"completion_tokens": False},
            {"saved_cache_cost": True},
            {"trace_id": True},
        ]
    ):
        records.append(good[n % len(good)] | {"litellm_call_id": f"bool-{n}", "id": f"bool-{n}"} | change)
    code, summary, _ = cli_batch([write_jsonl(tmp_path / "b.jsonl", records)], sqlite_uri, experiment_name)
    assert code == 3
    assert summary["traces_written"] == 0
    assert summary["quarantined_by_reason"] == {"wrong_type": len(records)}


def test_spend_logs_ids_and_costs_of_another_type_are_quarantined(capture: list[dict], tmp_path: Path) -> None:
    from ingest.normalize import normalize
    from tests.conftest import spend_row

    rows = [spend_row(r, store_prompts=True, naive=False) for r in good_records(capture, "spend")[:4]]
    rows[0]["request_id"], rows[0]["litellm_call_id"] = 12, None
    rows[1]["spend"] = True
    rows[2]["total_tokens"] = False
    f = write_jsonl(tmp_path / "spend.jsonl", rows)
    from ingest.sources import read_chunks

    out, q = normalize(pl.concat([c.lines for c in read_chunks(f)]))
    assert [(x.line, x.reason) for x in q] == [(1, "wrong_type"), (2, "wrong_type"), (3, "wrong_type")]
    assert out.height == 1


def test_a_bom_on_the_first_line_does_not_quarantine_it(capture: list[dict], tmp_path: Path, sqlite_uri: str, experiment_name: str) -> None:
    good = good_records(capture, "bom")
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in good).encode())
    code, summary, _ = cli_batch([path], sqlite_uri, experiment_name)
    assert code == 0, quarantine_lines(tmp_path)
    assert summary["traces_written"] == len(good)


@pytest.mark.parametrize("writer", ["bulk", "mlflow"])
def test_a_nul_in_a_prompt_is_written_to_postgresql(capture: list[dict], tmp_path: Path, postgres: Any, writer: str) -> None:
    good = good_records(capture, f"nul-{writer}")
    good[1]["messages"] = [{"role": "user", "content": "before\u0000after"}]
    good[2]["model"] = "gpt\u0000x"
    uri = postgres.new_database()
    path = write_jsonl(tmp_path / "nul.jsonl", good)
    code, summary, stderr = cli_batch([path], uri, "nul", "--sql-writer", writer)
    assert code == 0, (stderr, quarantine_lines(tmp_path))
    assert summary["traces_written"] == len(good)
    assert summary["warnings_by_kind"] == {"nul_char": 2}
    traces = {t.info.tags["litellm.call_id"]: t for t in all_traces(uri, "nul")}
    assert traces[good[1]["litellm_call_id"]].data.spans[0].inputs["messages"][0]["content"] == "before\ufffdafter"


def test_a_call_whose_spans_cannot_be_built_is_quarantined_and_the_others_written(
    capture: list[dict], tmp_path: Path, sqlite_uri: str, experiment_name: str
) -> None:
    """Defense in depth: whatever slips past normalize (here a canonical row whose raw line is not an
    object, which normalize never hands on) costs its call, not the batch."""
    from ingest.normalize import normalize

    good = good_records(capture, "unbuildable")
    f = write_jsonl(tmp_path / "u.jsonl", good)
    from ingest.sources import read_chunks

    frame, _ = normalize(pl.concat([c.lines for c in read_chunks(f)]))
    frame = frame.with_columns(raw=pl.when(pl.col("line_no") == 2).then(pl.lit("[1, 2]")).otherwise(pl.col("raw")))
    target = resolve_target(sqlite_uri, experiment_name, None)
    quarantine = QuarantineWriter(tmp_path / "q.jsonl")
    pipe = Pipeline(StoreSink(target), target.experiment_id, quarantine)
    pipe.emit(frame)
    q = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().split("\n") if line]
    assert [(x["line"], x["reason"]) for x in q] == [(2, "unbuildable")]
    assert q[0]["detail"].startswith("build: AttributeError")
    assert pipe.finish().traces_written == len(good) - 1 == len(all_traces(sqlite_uri, experiment_name, include_spans=False))


@pytest.mark.parametrize("sent", ["whole", "slim"])
def test_a_trace_postgresql_rejects_is_quarantined_and_the_rest_of_its_batch_written(
    capture: list[dict], tmp_path: Path, postgres: Any, sent: str
) -> None:
    """Defense in depth at the sink: a batch the store rejects for its data is split down to the trace
    it will not take (here a user id longer than the metadata column allows). ``slim``: traces as a
    backfill worker sends them (derived rows only); the refused one's records, named in the
    quarantine, are built again from the part they came in."""
    from ingest.normalize import normalize
    from ingest.sources import read_chunks

    good = good_records(capture, "reject")
    f = write_jsonl(tmp_path / "r.jsonl", good)
    frame, _ = normalize(pl.concat([c.lines for c in read_chunks(f)]))
    uri = postgres.new_database()
    target = resolve_target(uri, "reject", None)
    quarantine = QuarantineWriter(tmp_path / "q.jsonl")
    pipe = Pipeline(StoreSink(target), target.experiment_id, quarantine)
    traces = [build_trace([row], target.experiment_id) for row in frame.iter_rows(named=True)]
    traces[2].data[0].attributes[SpanAttributeKey.USER_ID] = "u" * 9000
    if sent == "slim":
        deriver = pipe.sink.bulk.deriver  # type: ignore[attr-defined]
        rows = list(frame.iter_rows(named=True))
        traces = [t.slim(deriver.derive(t)) for t in traces]
        for t, row in zip(traces, rows, strict=True):
            t.restore = functools.partial(build_trace, [row], target.experiment_id)
        assert not any(t.rows or t.data for t in traces)
    written, _ = pipe._write_isolating(traces, SinkError("rejected", "rejected"))
    assert [t.call_key for t in written] == [t.call_key for t in traces if t is not traces[2]]
    q = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().split("\n") if line]
    assert [(x["line"], x["reason"]) for x in q] == [(3, "unwritable")]
    assert q[0]["detail"].startswith("sink: ")
    assert len(all_traces(uri, "reject", include_spans=False)) == len(good) - 1


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_batch_the_store_refuses_whole_for_its_data_is_quarantined_and_the_run_goes_on(
    capture: list[dict], tmp_path: Path, postgres: Any, store: str
) -> None:
    """Every trace of a batch refused, each for what it holds (a time past the store's integer range on
    SQLite, a user id past its column on PostgreSQL), was taken for a store refusing everything: the
    run stopped (exit 4) on every run over them, quarantining nothing. A store that refuses every
    trace for no reason of the trace's own still stops the run."""
    from ingest.normalize import normalize
    from ingest.sink import NullSink
    from ingest.sources import read_chunks

    good = good_records(capture, f"refused-{store}")[:3]
    frame, _ = normalize(pl.concat([c.lines for c in read_chunks(write_jsonl(tmp_path / "r.jsonl", good))]))
    uri = f"sqlite:///{tmp_path / 'store.db'}" if store == "sqlite" else postgres.new_database()
    target = resolve_target(uri, "refused", None)
    quarantine = QuarantineWriter(tmp_path / "q.jsonl")
    pipe = Pipeline(StoreSink(target), target.experiment_id, quarantine)
    traces = [build_trace([row], target.experiment_id) for row in frame.iter_rows(named=True)]
    for t in traces:
        if store == "sqlite":
            t.data[0].start_us = 2**62
        else:
            t.data[0].attributes[SpanAttributeKey.USER_ID] = "u" * 9000
    written, _ = pipe._write_isolating(traces, SinkError("rejected", "rejected"))
    assert written == []
    q = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().split("\n") if line]
    assert sorted((x["line"], x["reason"]) for x in q) == [(1, "unwritable"), (2, "unwritable"), (3, "unwritable")]

    class Refusing(NullSink):
        def write(self, traces: list) -> int:
            try:
                raise TypeError("the store's own fault")
            except TypeError as e:
                raise SinkError("refused", "rejected") from e

    with pytest.raises(SinkError):
        Pipeline(Refusing(), target.experiment_id, QuarantineWriter(tmp_path / "q2.jsonl"))._write_isolating(
            traces, SinkError("rejected", "rejected")
        )


def test_records_nested_a_thousand_deep_are_stored_not_refused(capture: list[dict], tmp_path: Path) -> None:
    """orjson parses up to 1,024 levels; encoding such a prompt again in the bulk writer ran past
    Python's default recursion limit (the caller's frames count too): the record was refused as
    unwritable, and a batch of nothing but such records stopped every run."""
    rs = good_records(capture, "thousand")[:2]
    lines = []
    for r, depth in zip(rs, (990, 1020), strict=True):
        lines.append(json.dumps(r | {"messages": "@@"}).replace('"@@"', "[" * depth + '"deep"' + "]" * depth))
    path = tmp_path / "deep.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    code, summary, _ = cli_batch([path], uri, "deep")
    assert (code, summary["traces_written"], summary["quarantined"]) == (0, 2, 0)
    assert len(all_traces(uri, "deep")) == 2


def test_the_tail_daemon_lives_through_poison_records(mlflow_server: Any, capture: list[dict], tmp_path: Path) -> None:
    """The daemon used to exit 1 on each of these, and again on every restart."""
    from tests.tailkit import Daemon, Writer, fresh_calls, wait_for, wait_for_calls

    logdir = tmp_path / "logs"
    logdir.mkdir()
    experiment = f"tail-poison-{uuid.uuid4().hex[:8]}"
    calls = fresh_calls(capture)[:4]
    log = logdir / "proxy.jsonl"
    writer = Writer(log)
    writer.write_calls(calls[:2])
    base = calls[0][0]
    with log.open("a") as f:
        f.write(poisoned(base | {"litellm_call_id": "p1", "id": "p1"}, lambda r: r.update(startTime=1e20)) + "\n")
        f.write(poisoned(base | {"litellm_call_id": "p2", "id": "p2"}, lambda r: r.update(model_parameters=["x"])) + "\n")
        f.write(poisoned(base | {"litellm_call_id": "p3", "id": "p3"}, lambda r: r.update(messages=[{"content": "\ud800Hi"}])) + "\n")
    writer.write_calls(calls[2:])
    d = Daemon(logdir, mlflow_server.url, experiment, tmp_path / "state").start()
    try:
        kept = [[base | {"litellm_call_id": k, "id": k}] for k in ("p2", "p3")]
        wait_for_calls(mlflow_server.url, experiment, calls + kept)
        q = tmp_path / "state" / "quarantine.jsonl"
        wait_for(lambda: q.exists(), 20, "a quarantine record")
        assert [(x["line"], x["reason"]) for x in quarantine_lines(tmp_path)] == [(sum(len(c) for c in calls[:2]) + 1, "bad_time")]
        assert d.alive()
    finally:
        assert d.stop() == 0


def test_a_payload_nested_200_deep_is_stored_alike_by_the_bulk_writer_and_log_spans(capture: list[dict], tmp_path: Path) -> None:
    """Past MAX_ATTRIBUTE_DEPTH levels a value goes on as JSON text (protobuf parsers refuse deeper
    messages); both writers store the same thing."""
    deep: Any = "bottom"
    for _ in range(200):
        deep = {"a": [deep]}
    r = good_records(capture, "deep")[0]
    r["model_parameters"] = {"tools": [deep]}
    path = write_jsonl(tmp_path / "deep.jsonl", [r])
    stored = []
    for writer in ("bulk", "mlflow"):
        uri = f"sqlite:///{tmp_path / writer}.db"
        code, summary, _ = cli_batch([path], uri, "deep", "--sql-writer", writer)
        assert code == 0 and summary["traces_written"] == 1
        (trace,) = all_traces(uri, "deep")
        stored.append(trace.data.spans[0].inputs)
    assert stored[0] == stored[1]
    assert json.dumps(stored[0]).count("bottom") == 1


@pytest.mark.parametrize("writer", ["bulk", "mlflow"])
def test_over_long_session_user_call_type_and_tags_are_cut_to_fit_postgresql(
    capture: list[dict], tmp_path: Path, postgres: Any, writer: str
) -> None:
    """Each of these made PostgreSQL (and MLflow's own validation) refuse the trace."""
    good = good_records(capture, f"long-{writer}")
    good[0]["session_id"] = "s" * 300
    good[1]["call_type"] = "c" * 5000
    good[2]["model"] = "m" * 10000
    good[3]["end_user"] = "u" * 9000
    good[4]["request_tags"] = ["k:" + "v" * 9000]
    uri = postgres.new_database()
    code, summary, stderr = cli_batch([write_jsonl(tmp_path / "long.jsonl", good)], uri, "long", "--sql-writer", writer)
    assert code == 0, (stderr, quarantine_lines(tmp_path))
    assert summary["traces_written"] == len(good) == len(all_traces(uri, "long", include_spans=False))


@pytest.mark.parametrize("stateful", [False, True], ids=["no-state", "with-state"])
def test_warnings_of_chunks_normalized_ahead_are_each_counted_once(capture: list[dict], tmp_path: Path, stateful: bool) -> None:
    """Each chunk is normalized in a thread while the one before it is built: its warnings reach the
    summary once each, whichever thread counted them, with or without state."""
    from ingest.pipeline import RunOptions, run_batch, run_incremental

    records = reidentify([r | {"completion_tokens": -3} for r in capture], salt="ahead")
    for i in range(1, 8):
        records += reidentify([r | {"completion_tokens": -3} for r in capture], shift_s=i * 3600.0, salt=f"ahead-{i}")
    path = write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
    opts = RunOptions(paths=[str(path)], dry_run=True, chunk_bytes=64 * 1024, state_dir=tmp_path / "state")
    summary = run_incremental(opts, "batch") if stateful else run_batch(opts)
    assert summary.records_read == len(records) and path.stat().st_size > 20 * opts.chunk_bytes
    assert summary.warnings_by_kind == {"negative_completion_tokens": len(records)}
