"""Nesting the proxy's spans under the client application's own trace, against real MLflow.

The app side is MLflow's own client: ``@mlflow.trace``-style spans with an LLM span inside, and the
``traceparent`` MLflow's autolog would send from it (``get_tracing_context_headers_for_http_request``).
The proxy side is real capture records carrying that header, timed inside the app's LLM span.
Both sinks: a real ``mlflow server`` (OTLP) and a SQLite store (the default's kind).
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pytest
from mlflow.entities.span import SpanType
from mlflow.tracing import get_tracing_context_headers_for_http_request
from mlflow.tracing.constant import SpanAttributeKey

from ingest.pipeline import RunOptions, Summary, run_batch, run_incremental
from tests.conftest import all_traces, client_for, reidentify, write_jsonl


@pytest.fixture(params=["server", "sqlite"])
def uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "server":
        return request.getfixturevalue("mlflow_server").url
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@contextmanager
def app(uri: str) -> Iterator[str]:
    """MLflow's client tracing into ``uri``, in an experiment of its own (not the proxy's)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow.set_experiment(f"app-{uuid.uuid4().hex[:8]}").experiment_id
    finally:
        mlflow.flush_trace_async_logging()
        mlflow.set_tracking_uri(previous)


@contextmanager
def app_call(usage: bool = True) -> Iterator[dict[str, Any]]:
    """One app trace: ``agent`` > ``Completions`` (an LLM span); yields the header and the call's window."""
    out: dict[str, Any] = {}
    with mlflow.start_span("agent") as root:
        root.set_inputs({"question": "hi"})
        with mlflow.start_span("Completions", span_type=SpanType.CHAT_MODEL) as llm:
            llm.set_inputs({"messages": [{"role": "user", "content": "hi"}]})
            out["traceparent"] = get_tracing_context_headers_for_http_request()["traceparent"]
            out["llm_span"] = llm.span_id
            out["t0"] = time.time()
            time.sleep(0.05)
            out["t1"] = time.time()
            time.sleep(0.01)
            yield out
            llm.set_outputs({"choices": [{"message": {"role": "assistant", "content": "hello"}}]})
            if usage:
                llm.set_attribute(SpanAttributeKey.CHAT_USAGE, {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8})
        root.set_outputs("hello")
    out["trace_id"] = root.trace_id
    mlflow.flush_trace_async_logging()


def proxy_records(capture: list[dict], call: dict[str, Any], kind: str = "single", header: str = "traceparent") -> list[dict]:
    """Real records of one call (``single`` success or a ``fallback`` pair) inside the app's window, with its header."""
    by_id: dict[str, list[dict]] = {}
    for r in capture:
        if r["call_type"] == "acompletion":
            by_id.setdefault(r["litellm_call_id"], []).append(r)
    pick = next(rs for rs in by_id.values() if (len(rs) == 1 and rs[0]["status"] == "success") == (kind == "single") and len(rs) <= 2)
    if kind == "fallback":
        pick = next(rs for rs in by_id.values() if [r["status"] for r in rs] == ["failure", "success"])
    records = reidentify(pick)
    span = (call["t1"] - call["t0"]) / (len(records) + 1)
    for n, r in enumerate(records):
        r["startTime"] = round(call["t0"] + n * span * 0.5, 6)
        r["endTime"] = round(call["t0"] + (n + 1) * span, 6)
        r["completionStartTime"] = r["endTime"]
        r["session_id"] = "sess-1"
        md = r.setdefault("metadata", {}) or {}
        r["metadata"] = md
        rm = copy.deepcopy(md.get("requester_metadata") or {})
        rm.setdefault("headers", {})[header] = call["traceparent"]
        md["requester_metadata"] = rm
    return records


def ingest(uri: str, logs: Path, state: Path, experiment: str, **kw: Any) -> Summary:
    opts = RunOptions(paths=[str(logs)], tracking_uri=uri, experiment_name=experiment, state_dir=state,
                      quarantine_file=state / "q.jsonl", **kw)  # fmt: skip
    return run_incremental(opts, "batch")


def status_nesting(state: Path) -> dict[str, int]:
    """What ``litellm-ingest status --json`` says of nesting for the one state in ``state``."""
    from click.testing import CliRunner

    from ingest.cli import main

    result = CliRunner().invoke(main, ["status", "--state-dir", str(state), "--json"])
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.output)["runs"]
    return run["nesting"]


def spans_by_id(uri: str, trace_id: str) -> dict[str, Any]:
    return {s.span_id: s for s in client_for(uri).get_trace(trace_id).data.spans}


def info_of(uri: str, trace_id: str) -> dict[str, Any]:
    """The app trace's TraceInfo, flattened: every field, tag and metadata entry."""
    d = client_for(uri).get_trace(trace_id).info.to_dict()
    flat = {k: v for k, v in d.items() if k not in ("tags", "trace_metadata")}
    flat |= {f"tag:{k}": v for k, v in d.get("tags", {}).items()}
    flat |= {f"meta:{k}": v for k, v in d.get("trace_metadata", {}).items()}
    return flat


def changed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def test_calls_nest_under_the_app_span_and_nothing_of_the_app_changes(uri: str, capture: list[dict], tmp_path: Path) -> None:
    with app(uri) as app_experiment:
        with app_call() as single:
            pass
        with app_call() as fallback:
            pass
    before = {t: info_of(uri, t) for t in (single["trace_id"], fallback["trace_id"])}
    app_spans = {t: set(spans_by_id(uri, t)) for t in before}
    records = {"single": proxy_records(capture, single), "fallback": proxy_records(capture, fallback, "fallback", header="TraceParent")}
    write_jsonl(tmp_path / "logs" / "proxy.jsonl", records["single"] + records["fallback"])
    proxy_experiment = f"proxy-{uuid.uuid4().hex[:8]}"

    summary = ingest(uri, tmp_path / "logs", tmp_path / "state", proxy_experiment)
    assert (summary.traces_written, summary.nested_calls, summary.app_traces_missing, summary.nest_pending) == (2, 2, 0, 0)

    standalone = {t.info.tags["litellm.call_id"]: t for t in all_traces(uri, proxy_experiment)}
    for name, call in (("single", single), ("fallback", fallback)):
        recs = records[name]
        tid = call["trace_id"]
        assert not changed(before[tid], info_of(uri, tid)), "the app trace's info is untouched"
        spans = spans_by_id(uri, tid)
        ours = {k: s for k, s in spans.items() if k not in app_spans[tid]}
        proxy = next(s for s in ours.values() if s.parent_id == call["llm_span"])
        attempts = sorted((s for s in ours.values() if s.parent_id == proxy.span_id), key=lambda s: s.start_time_ns)
        assert len(ours) == 1 + len(recs) and len(attempts) == len(recs)
        assert proxy.start_time_ns == round(min(r["startTime"] for r in recs) * 1e6) * 1000
        assert proxy.end_time_ns == round(max(r["endTime"] for r in recs) * 1e6) * 1000
        for span, rec in zip(attempts, sorted(recs, key=lambda r: r["startTime"]), strict=True):
            assert (span.start_time_ns, span.end_time_ns) == (round(rec["startTime"] * 1e6) * 1000, round(rec["endTime"] * 1e6) * 1000)
            assert span.status.status_code.value == ("OK" if rec["status"] == "success" else "ERROR")
            assert span.get_attribute("litellm_call_id") == rec["litellm_call_id"]
            assert span.get_attribute(SpanAttributeKey.SESSION_ID) is None, "nothing that sets trace-level fields"
            if rec["status"] == "success":
                usage = span.get_attribute(SpanAttributeKey.CHAT_USAGE)
                if client_for(uri).get_trace(tid).info.cost:
                    assert usage["total_tokens"] == rec["total_tokens"], "finalized app usage and cost: MLflow's own key"
                else:
                    assert usage is None and span.get_attribute("litellm.token_usage")["total_tokens"] == rec["total_tokens"]
        trace = standalone[recs[0]["litellm_call_id"]]
        assert trace.info.tags["litellm.app_trace_id"] == tid
        assert proxy.get_attribute("litellm.proxy_trace_id") == trace.info.trace_id
        assert proxy.status.status_code.value == "OK"
        assert client_for(uri).get_trace(tid).info.experiment_id == app_experiment

    again = ingest(uri, tmp_path / "logs", tmp_path / "state-2", proxy_experiment)
    assert again.nested_calls == 2
    for tid in before:
        assert not changed(before[tid], info_of(uri, tid))
        assert len(spans_by_id(uri, tid)) == len(app_spans[tid]) + (2 if tid == single["trace_id"] else 3), "a re-run adds no span"
    assert len(all_traces(uri, proxy_experiment, include_spans=False)) == 2


def test_an_app_trace_that_is_not_there_gets_nothing_written_under_its_id(uri: str, capture: list[dict], tmp_path: Path) -> None:
    """Deleted before ingest, never sampled, or never exported: the call is standalone only, and no
    trace appears under the app's id."""
    with app(uri) as app_experiment:
        with app_call() as deleted:
            pass
        with app_call() as unsampled:
            pass
    client_for(uri).delete_traces(app_experiment, trace_ids=[deleted["trace_id"]])
    unsampled["traceparent"] = unsampled["traceparent"][:-2] + "00"
    records = proxy_records(capture, deleted) + proxy_records(capture, unsampled)
    write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
    proxy_experiment = f"proxy-{uuid.uuid4().hex[:8]}"

    summary = ingest(uri, tmp_path / "logs", tmp_path / "state", proxy_experiment, nest_grace_s=0.0)
    assert (summary.traces_written, summary.nested_calls, summary.app_traces_missing) == (2, 0, 1)
    store_ids = {t.info.trace_id for t in all_traces(uri, proxy_experiment, include_spans=False)}
    assert len(store_ids) == 2
    left = client_for(uri).search_traces(locations=[app_experiment], include_spans=False)
    assert [t.info.trace_id for t in left] == [unsampled["trace_id"]], "no orphan under the deleted id"
    with pytest.raises(Exception, match=r"not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        client_for(uri).get_trace(deleted["trace_id"])
    tags = {t.info.tags["litellm.call_id"]: t.info.tags.get("litellm.app_trace_id") for t in all_traces(uri, proxy_experiment)}
    assert sorted(map(str, tags.values())) == sorted(["None", deleted["trace_id"]]), "an unsampled header links nothing"
    assert len(spans_by_id(uri, unsampled["trace_id"])) == 2, "the unsampled app trace is left alone"


def test_a_call_waits_for_its_app_trace_across_runs_and_then_nests(uri: str, capture: list[dict], tmp_path: Path) -> None:
    """The app exports its trace when its root span ends, after the proxy logged the call: the first run
    writes the call standalone and queues it; the next run (no new lines) finds the app trace and nests it."""
    proxy_experiment = f"proxy-{uuid.uuid4().hex[:8]}"
    logs, state = tmp_path / "logs", tmp_path / "state"
    with app(uri), app_call() as call:
        write_jsonl(logs / "proxy.jsonl", proxy_records(capture, call))
        first = ingest(uri, logs, state, proxy_experiment)
        assert (first.traces_written, first.nested_calls, first.nest_pending, first.app_traces_missing) == (1, 0, 1, 0)
        assert status_nesting(state) == {"nested_calls": 0, "app_traces_missing": 0, "nest_pending": 1}
    second = ingest(uri, logs, state, proxy_experiment)
    assert (second.traces_written, second.nested_calls, second.nest_pending) == (0, 1, 0)
    assert status_nesting(state) == {"nested_calls": 1, "app_traces_missing": 0, "nest_pending": 0}
    assert len(spans_by_id(uri, call["trace_id"])) == 2 + 2, "the proxy span and its one attempt"


def test_without_finalized_app_usage_the_attempts_keep_usage_out_of_the_app_totals(uri: str, capture: list[dict], tmp_path: Path) -> None:
    with app(uri), app_call(usage=False) as call:
        pass
    before = info_of(uri, call["trace_id"])
    assert not client_for(uri).get_trace(call["trace_id"]).info.token_usage
    records = proxy_records(capture, call)
    write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
    assert ingest(uri, tmp_path / "logs", tmp_path / "state", f"proxy-{uuid.uuid4().hex[:8]}").nested_calls == 1
    assert not changed(before, info_of(uri, call["trace_id"]))
    attempt = next(s for s in spans_by_id(uri, call["trace_id"]).values() if s.name.endswith("attempt 1"))
    assert attempt.get_attribute(SpanAttributeKey.CHAT_USAGE) is None
    assert attempt.get_attribute("litellm.token_usage")["total_tokens"] == records[0]["total_tokens"]


def test_no_nest_and_stateless_runs(capture: list[dict], tmp_path: Path, sqlite_uri: str) -> None:
    with app(sqlite_uri), app_call() as call:
        pass
    write_jsonl(tmp_path / "logs" / "proxy.jsonl", proxy_records(capture, call))
    off = ingest(sqlite_uri, tmp_path / "logs", tmp_path / "state", "proxy", nest=False)
    assert (off.traces_written, off.nested_calls) == (1, 0)
    assert len(spans_by_id(sqlite_uri, call["trace_id"])) == 2
    once = run_batch(RunOptions(paths=[str(tmp_path / "logs")], tracking_uri=sqlite_uri, experiment_name="proxy",
                                quarantine_file=tmp_path / "q.jsonl"))  # fmt: skip
    assert (once.nested_calls, once.nest_pending) == (1, 0)
    assert len(spans_by_id(sqlite_uri, call["trace_id"])) == 4
    tags = json.dumps([t.info.tags for t in all_traces(sqlite_uri, "proxy", include_spans=False)])
    assert call["trace_id"] in tags


TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("traceparent", TP, ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")),
        ("TraceParent", TP, ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")),
        ("traceparent", " " + TP, ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")),
        ("traceparent", "\t" + TP + " \t", ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")),
        ("traceparent", '"' + TP, None),
        ("traceparent", TP[:-2] + "03", ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")),
        ("traceparent", "01" + TP[2:] + "-future-field", ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")),
        ("traceparent", TP[:-2] + "00", None),
        ("traceparent", TP[:-2] + "02", None),
        ("traceparent", TP + "-extra", None),
        ("traceparent", "00-" + "0" * 32 + "-b7ad6b7169203331-01", None),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01", None),
        ("traceparent", "ff" + TP[2:], None),
        ("traceparent", TP.upper(), None),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01", None),
        ("traceparent", "", None),
        ("x-traceparent", TP, None),
    ],
)
def test_traceparent_is_read_case_insensitively_and_validated(capture: list[dict], name: str, value: str, expected: Any) -> None:
    import polars as pl

    from ingest.normalize import normalize

    rec = copy.deepcopy(next(r for r in capture if r["call_type"] == "acompletion"))
    rec["metadata"].setdefault("requester_metadata", {}).setdefault("headers", {})[name] = value
    rec["messages"] = [{"role": "user", "content": '{"traceparent": "' + TP + '"}'}]
    line = json.dumps(rec)
    frame = pl.DataFrame({"source": ["f"], "line_no": [1], "offset": [0], "raw": [line], "truncated": [False]})
    warnings: dict[str, int] = {}
    out, bad = normalize(frame, warnings)
    assert not bad
    got = out.select("parent_trace_id", "parent_span_id").row(0)
    assert got == (expected or (None, None))
    sampled_out = value.endswith(("-00", "-02")) and value.startswith("00")
    assert ("invalid_traceparent" in warnings) == (expected is None and name == "traceparent" and not sampled_out)


def test_fit_moves_spans_into_the_app_window_and_keeps_usage_out_unless_final() -> None:
    from ingest.nesting import AppTrace, fit
    from ingest.spans import SpanData

    usage = {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
    span = SpanData(b"\x01" * 16, b"\x02" * 8, b"\x03" * 8, "s", 5_000, 20_000, {SpanAttributeKey.CHAT_USAGE: usage, "x": 1},
                    [("first_token", 19_000_000, {})])  # fmt: skip
    app = AppTrace("tr-" + "01" * 16, "1", 10_000, 30_000, finalized=False, totals_final=False)
    (fitted,) = fit([span], app)
    assert (fitted.start_us, fitted.end_us) == (9_000, 20_000), "1 ms of slack, then clamped"
    assert fitted.attributes == {"litellm.token_usage": usage, "x": 1}
    assert span.attributes[SpanAttributeKey.CHAT_USAGE] == usage, "the queued spans are not changed"
    (final,) = fit([span], replace_final(app))
    assert final.attributes[SpanAttributeKey.CHAT_USAGE] == usage


def replace_final(app: Any) -> Any:
    import dataclasses

    return dataclasses.replace(app, totals_final=True)


def test_the_queue_survives_a_restart_and_expires_by_due_time(tmp_path: Path) -> None:
    from ingest.ledger import nest_pending
    from ingest.nesting import NestQueue
    from ingest.spans import SpanData

    spans = [SpanData(b"\x01" * 16, b"\x02" * 8, None, "proxy", 1, 2, {"a": [1, {"b": None}]}, [("e", 1000, {"k": "v"})], "boom")]
    q = NestQueue(tmp_path / "s.nest.sqlite")
    q.put([("tr-a", "call-1", 100, spans), ("tr-a", "call-2", 300, spans), ("tr-b", "call-3", 200, spans)])
    q.put([("tr-a", "call-1", 150, spans)])
    q.close()
    q = NestQueue(tmp_path / "s.nest.sqlite")
    assert (q.size, q.app_traces()) == (3, ["tr-a", "tr-b"])
    (entry,) = [e for e in q.entries(["tr-a"]) if e[1] == "call-1"]
    assert entry[2:] == (150, spans)
    assert q.expire(200) == 2 and q.size == 1
    assert nest_pending(tmp_path / "s.json") == 1


def test_a_queued_call_is_kept_by_its_trace_id_not_by_a_call_id_that_is_a_key(capture: list[dict], tmp_path: Path) -> None:
    """A client may send its key as the call id: the queue file keeps the call's trace id instead."""
    import polars as pl

    from ingest.nesting import Nester, NestQueue
    from ingest.normalize import normalize
    from ingest.sink import NullSink
    from ingest.spans import build_trace, group_calls

    k = "sk-proj-" + uuid.uuid4().hex + "T3BlbkFJ"
    call = {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01", "t0": time.time() - 1, "t1": time.time()}
    records = [{**r, "litellm_call_id": k} for r in proxy_records(capture, call)]
    frame = pl.DataFrame({"source": ["f"] * len(records), "line_no": list(range(len(records))), "offset": list(range(len(records))),
                          "raw": [json.dumps(r) for r in records], "truncated": [False] * len(records)})  # fmt: skip
    (trace,) = [build_trace(rows, "1") for rows in group_calls(normalize(frame)[0])]
    assert trace.call_key == k
    queue = NestQueue(tmp_path / "s.nest.sqlite")
    Nester(NullSink(), queue).after_write([trace])
    assert queue.size == 1 and [e[1] for e in queue.entries(queue.app_traces())] == [trace.trace_id]
    queue.close()
    assert not [f for f in tmp_path.iterdir() if k.encode() in f.read_bytes()]


@pytest.mark.parametrize("calls", [1, 2])
def test_an_app_trace_deleted_between_lookup_and_write_leaves_no_orphan(
    capture: list[dict], tmp_path: Path, sqlite_uri: str, calls: int
) -> None:
    """The write recreates a trace deleted after the lookup (MLflow creates what it does not hold);
    the check after the write finds it unfinished and deletes it. Each call in it is counted missing
    (two: an SDK's retry of one request, with one traceparent), not each app trace."""
    from ingest.nesting import Nester
    from ingest.pipeline import Pipeline, resolve_run_target
    from ingest.quarantine import QuarantineWriter
    from ingest.sink import make_sink

    with app(sqlite_uri) as app_experiment, app_call() as call:
        pass
    opts = RunOptions(paths=[], tracking_uri=sqlite_uri, experiment_name="proxy")
    target = resolve_run_target(opts, create=True)
    sink = make_sink(target)
    original = sink.write_spans

    def deleted_first(spans: list, experiment_id: str) -> int:
        client_for(sqlite_uri).delete_traces(app_experiment, trace_ids=[call["trace_id"]])
        return original(spans, experiment_id)

    sink.write_spans = deleted_first  # type: ignore[method-assign]
    nester = Nester(sink)
    pipe = Pipeline(sink, target.experiment_id, QuarantineWriter(tmp_path / "q.jsonl"), nester=nester)
    write_jsonl(tmp_path / "logs" / "p.jsonl", [r for _ in range(calls) for r in proxy_records(capture, call)])
    from ingest.sources import read_chunks

    for chunk in read_chunks(tmp_path / "logs" / "p.jsonl"):
        pipe.feed(chunk)
    pipe.flush(final=True)
    assert (nester.counts.nested, nester.counts.missing) == (0, calls)
    assert not client_for(sqlite_uri).search_traces(locations=[app_experiment], include_spans=False)
    assert len(all_traces(sqlite_uri, "proxy", include_spans=False)) == calls


def test_a_call_rewritten_after_it_was_queued_is_nested_whole_once(capture: list[dict], tmp_path: Path, sqlite_uri: str) -> None:
    """A fallback whose failure was written (and queued: the app trace was not exported yet) before
    its success arrived: the rewrite nests both attempts, and the stale queued entry never
    overwrites them."""
    logs, state = tmp_path / "logs", tmp_path / "state"
    with app(sqlite_uri), app_call() as call:
        failure, success = proxy_records(capture, call, "fallback")
        write_jsonl(logs / "proxy.jsonl", [failure])
        first = ingest(sqlite_uri, logs, state, "proxy", settle_s=0.0)
        assert (first.traces_written, first.nest_pending) == (1, 1)
    write_jsonl(logs / "proxy.jsonl", [failure, success])
    second = ingest(sqlite_uri, logs, state, "proxy", settle_s=0.0)
    assert (second.traces_rewritten, second.nested_calls, second.nest_pending) == (1, 1, 0)
    third = ingest(sqlite_uri, logs, state, "proxy", settle_s=0.0)
    assert (third.nested_calls, third.nest_pending) == (0, 0)
    spans = spans_by_id(sqlite_uri, call["trace_id"])
    proxy = next(s for s in spans.values() if s.parent_id == call["llm_span"])
    assert proxy.status.status_code.value == "OK" and proxy.get_attribute("attempts") == 2
    assert len([s for s in spans.values() if s.parent_id == proxy.span_id]) == 2


def test_a_trace_whose_info_is_not_finalized_is_waited_for_then_nested_without_mlflow_totals(
    capture: list[dict], tmp_path: Path, sqlite_uri: str
) -> None:
    """MLflow's client writes a trace's spans, then its final info; an app exporting over OTLP never
    writes the latter. Within the grace a call waits for it; after, it nests with litellm.* totals."""
    from mlflow.entities.span import Span
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

    from ingest.stores import store_for

    now = time.time()
    call = {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01", "t0": now - 0.5, "t1": now - 0.1}
    trace_hex, span_hex = call["traceparent"].split("-")[1:3]
    store = store_for(sqlite_uri)
    experiment = store.create_experiment("otlp-app")
    root = OtlpSpan(trace_id=bytes.fromhex(trace_hex), span_id=b"\x01" * 8, name="agent")
    llm = OtlpSpan(trace_id=bytes.fromhex(trace_hex), span_id=bytes.fromhex(span_hex), parent_span_id=b"\x01" * 8, name="LLM")
    for s in (root, llm):
        s.start_time_unix_nano, s.end_time_unix_nano, s.status.code = int((now - 1) * 1e9), int(now * 1e9), 1
    store.log_spans(experiment, [Span.from_otel_proto(root), Span.from_otel_proto(llm)])
    records = proxy_records(capture, call)
    write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
    first = ingest(sqlite_uri, tmp_path / "logs", tmp_path / "state", "proxy", nest_grace_s=8.0)
    assert (first.nested_calls, first.nest_pending) == (0, 1)
    time.sleep(max(0.0, records[0]["endTime"] + 8.5 - time.time()))
    second = ingest(sqlite_uri, tmp_path / "logs", tmp_path / "state", "proxy", nest_grace_s=8.0)
    assert (second.nested_calls, second.nest_pending, second.app_traces_missing) == (1, 0, 0)
    attempt = next(s for s in spans_by_id(sqlite_uri, "tr-" + trace_hex).values() if s.name.endswith("attempt 1"))
    assert attempt.get_attribute(SpanAttributeKey.CHAT_USAGE) is None
    assert attempt.get_attribute("litellm.token_usage")["total_tokens"] == records[0]["total_tokens"]


def test_the_sqlite_default_nests_an_app_writing_to_the_same_file(
    capture: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No tracking URI anywhere: the app and `litellm-ingest batch` (a real process) both use ./mlflow.db."""
    import os
    import subprocess

    from tests.tailkit import EXE

    monkeypatch.chdir(tmp_path)
    with app("sqlite:///mlflow.db") as app_experiment, app_call() as call:
        pass
    write_jsonl(tmp_path / "logs" / "proxy.jsonl", proxy_records(capture, call))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([EXE, "batch", "logs", "--json", "--state-dir", "state"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["tracking_uri"], summary["experiment_name"]) == ("sqlite:///mlflow.db", "LiteLLM Proxy")
    assert (summary["traces_written"], summary["nested_calls"]) == (1, 1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trace = client_for(uri).get_trace(call["trace_id"])
    assert trace.info.experiment_id == app_experiment
    assert [s.name for s in trace.data.spans if s.parent_id == call["llm_span"]] == ["litellm-acompletion"]


def test_nested_span_ids_depend_on_the_app_trace_and_the_call_only(capture: list[dict]) -> None:
    """Two ingesters (two experiments, either sink) write a call's spans into the app trace as the same spans."""
    import polars as pl

    from ingest.normalize import normalize
    from ingest.spans import build_trace, group_calls, nested_spans

    call = {"traceparent": TP, "t0": 1_700_000_000.0, "t1": 1_700_000_001.0}
    rows = proxy_records(capture, call, "fallback")
    lines = [json.dumps(r) for r in rows]
    frame = pl.DataFrame({"source": ["f"] * 2, "line_no": [1, 2], "offset": [0, 1], "raw": lines, "truncated": [False] * 2})
    (calls,) = list(group_calls(normalize(frame)[0]))
    a, b = build_trace(calls, "1"), build_trace(calls, "2")
    assert a.trace_id != b.trace_id, "standalone traces are per experiment"
    ids = [[(s.trace_id, s.span_id, s.parent_id) for s in nested_spans(t)] for t in (a, b)]
    assert ids[0] == ids[1]
    assert {s.trace_id.hex() for s in nested_spans(a)} == {TP.split("-")[1]}
    assert len({s.span_id for s in nested_spans(a)} | {s.span_id for s in a.data}) == 3 + 3


def test_lookups_are_one_query_per_write_batch_not_one_per_call(capture: list[dict]) -> None:
    """A batch of calls from many app traces: one lookup before the write, one after (orphans), one write."""
    import polars as pl

    from ingest.nesting import Nester
    from ingest.normalize import normalize
    from ingest.sink import NullSink
    from ingest.spans import build_trace, group_calls

    class Recording(NullSink):
        def __init__(self) -> None:
            self.lookups: list[list[str]] = []
            self.writes = 0

        def trace_infos(self, trace_ids: list[str]) -> list[Any]:
            self.lookups.append(trace_ids)
            now_ms = int(time.time() * 1000)
            meta = {"mlflow.trace.infoFinalized": "true"}
            return [
                SimpleNamespace(trace_id=t, experiment_id="7", state="OK", tags={"mlflow.trace.spansLocation": "TRACKING_STORE"},
                                trace_metadata=meta, request_time=now_ms - 60_000, execution_duration=120_000, token_usage=None, cost=None)
                for t in trace_ids
            ]  # fmt: skip

        def write_spans(self, spans: list, experiment_id: str) -> int:
            self.writes += 1
            return len(spans)

    records = []
    for _ in range(40):
        call = {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01", "t0": time.time() - 1, "t1": time.time()}
        records += proxy_records(capture, call)
    frame = pl.DataFrame({"source": ["f"] * len(records), "line_no": list(range(len(records))), "offset": list(range(len(records))),
                          "raw": [json.dumps(r) for r in records], "truncated": [False] * len(records)})  # fmt: skip
    traces = [build_trace(rows, "1") for rows in group_calls(normalize(frame)[0].sort("call_key", "start_us"))]
    sink = Recording()
    nester = Nester(sink)
    nester.after_write(traces)
    assert (len(sink.lookups), sink.writes, nester.counts.nested) == (2, 1, 40)
    assert len(sink.lookups[0]) == 40


def nowhere_call(offset_s: float = 0.0) -> dict[str, Any]:
    """A call from an app whose trace never reaches MLflow, ``offset_s`` from now by the proxy's clock."""
    t0 = time.time() + offset_s
    return {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01", "t0": t0, "t1": t0 + 0.05}


def test_a_server_that_does_not_serve_trace_lookups_leaves_calls_standalone_and_writes_every_call(
    mlflow_server: Any, capture: list[dict], tmp_path: Path
) -> None:
    """An older server without ``batchGetInfos`` (a 404, from a gateway in front of a real one): the
    nesting lookup failed the run (exit 4) and the checkpoint never moved, so every call after the
    first nested one was never written; the dedupe lookup was already named once and passed over."""
    from tests.test_gateway import Gateway

    gateway = Gateway(mlflow_server.url, "404", lambda method, path: "/mlflow/traces/batchGet" in path)
    try:
        with app(mlflow_server.url), app_call() as call:
            pass
        records = proxy_records(capture, call) + reidentify([r for r in capture if r["call_type"] == "acompletion"])
        write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
        experiment = f"proxy-{uuid.uuid4().hex[:8]}"
        summary = ingest(gateway.url, tmp_path / "logs", tmp_path / "state", experiment)
    finally:
        gateway.close()
    calls = {r["litellm_call_id"] for r in records}
    assert summary.traces_written == len(calls) and (summary.nested_calls, summary.nest_failed, summary.nest_pending) == (0, 1, 0)
    assert len(all_traces(mlflow_server.url, experiment, include_spans=False)) == len(calls)
    assert len(spans_by_id(mlflow_server.url, call["trace_id"])) == 2, "the app trace is left as it was"


def test_a_proxy_clock_ahead_does_not_stretch_the_wait_for_an_app_trace(capture: list[dict], tmp_path: Path, sqlite_uri: str) -> None:
    """The wait was measured from the call's end by the proxy's clock: a day ahead, the call waited
    (shown as waiting) a day past ``--nest-grace``."""
    from ingest.sink import resolve_target

    resolve_target(sqlite_uri, "proxy", None)  # the store made beforehand: making it takes seconds, past the grace
    write_jsonl(tmp_path / "logs" / "proxy.jsonl", proxy_records(capture, nowhere_call(offset_s=86400)))
    first = ingest(sqlite_uri, tmp_path / "logs", tmp_path / "state", "proxy", nest_grace_s=2.0)
    assert (first.nest_pending, first.app_traces_missing) == (1, 0)
    time.sleep(2.2)
    second = ingest(sqlite_uri, tmp_path / "logs", tmp_path / "state", "proxy", nest_grace_s=2.0)
    assert (second.nest_pending, second.app_traces_missing) == (0, 1)


def test_a_call_whose_wait_ends_as_its_success_arrives_is_counted_missing_once(
    capture: list[dict], tmp_path: Path, sqlite_uri: str
) -> None:
    """A fallback's failure queued by one run, its success read by the next after the grace: the call
    was counted as missing by the write and again when its stale queue entry expired."""
    from ingest.sink import resolve_target

    resolve_target(sqlite_uri, "proxy", None)  # the store made beforehand: making it takes seconds, past the grace
    failure, success = proxy_records(capture, nowhere_call(), "fallback")
    logs, state = tmp_path / "logs", tmp_path / "state"
    write_jsonl(logs / "proxy.jsonl", [failure])
    first = ingest(sqlite_uri, logs, state, "proxy", settle_s=0.0, nest_grace_s=2.0)
    assert (first.traces_written, first.nest_pending) == (1, 1)
    time.sleep(2.2)
    write_jsonl(logs / "proxy.jsonl", [failure, success])
    second = ingest(sqlite_uri, logs, state, "proxy", settle_s=0.0, nest_grace_s=2.0)
    assert (second.traces_rewritten, second.app_traces_missing, second.nest_pending) == (1, 1, 0)


def test_a_run_with_no_nest_leaves_nothing_waiting(capture: list[dict], tmp_path: Path, sqlite_uri: str) -> None:
    """Calls queued by a run that nested stayed "waiting" in ``status`` for ever once runs went on with
    ``--no-nest``: no run looked them up or expired them."""
    logs, state = tmp_path / "logs", tmp_path / "state"
    write_jsonl(logs / "proxy.jsonl", proxy_records(capture, nowhere_call()))
    assert ingest(sqlite_uri, logs, state, "proxy", nest_grace_s=60.0).nest_pending == 1
    assert status_nesting(state)["nest_pending"] == 1
    ingest(sqlite_uri, logs, state, "proxy", nest=False)
    assert status_nesting(state)["nest_pending"] == 0


def test_a_call_queued_by_an_ingester_that_saw_less_of_it_does_not_undo_a_fuller_nesting(
    capture: list[dict], tmp_path: Path, sqlite_uri: str
) -> None:
    """Two ingesters on overlapping logs: B saw only a fallback's failure (a copy taken mid-write)
    and queued it while the app trace was not exported; A read the whole call and nested it. B's
    next poll wrote its older spans over A's (the same span ids): the proxy span ERROR, one attempt."""
    with app(sqlite_uri), app_call() as call:
        failure, success = proxy_records(capture, call, "fallback")
        write_jsonl(tmp_path / "b" / "proxy.jsonl", [failure])
        assert ingest(sqlite_uri, tmp_path / "b", tmp_path / "state-b", "proxy", settle_s=0.0).nest_pending == 1
    write_jsonl(tmp_path / "a" / "proxy.jsonl", [failure, success])
    assert ingest(sqlite_uri, tmp_path / "a", tmp_path / "state-a", "proxy", settle_s=0.0).nested_calls == 1
    later = ingest(sqlite_uri, tmp_path / "b", tmp_path / "state-b", "proxy", settle_s=0.0)
    assert (later.nested_calls, later.nest_pending) == (0, 0)
    spans = spans_by_id(sqlite_uri, call["trace_id"])
    proxy = next(s for s in spans.values() if s.parent_id == call["llm_span"])
    assert proxy.status.status_code.value == "OK" and proxy.get_attribute("attempts") == 2
    assert len([s for s in spans.values() if s.parent_id == proxy.span_id]) == 2
