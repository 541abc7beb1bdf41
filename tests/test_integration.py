"""End to end against real MLflow: sample_logs/ into a SQLite store and into a real `mlflow server`.

Expected values are computed here from the raw capture records with plain json, independently of
the ingester, and compared with what MLflow's own API returns.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow.entities.span_log_level import SpanLogLevel

from ingest.pipeline import RunOptions, run_batch
from tests.conftest import SAMPLE_LOGS, all_traces, client_for


def expected_calls(capture: list[dict]) -> dict[str, list[dict]]:
    calls: dict[str, list[dict]] = defaultdict(list)
    for r in capture:
        calls[r["litellm_call_id"]].append(r)
    for recs in calls.values():
        recs.sort(key=lambda r: r["startTime"])
    return calls


def us(t: float) -> int:
    return round(t * 1_000_000)


def by_call_id(traces: list) -> dict[str, object]:
    out = {}
    for t in traces:
        cid = t.info.tags["litellm.call_id"]
        assert cid not in out, f"call {cid} has two traces"
        out[cid] = t
    return out


def ingest(uri: str, experiment: str, tmp_path: Path, paths: list[str] | None = None):  # type: ignore[no-untyped-def]
    return run_batch(
        RunOptions(
            paths=paths or [str(SAMPLE_LOGS)],
            tracking_uri=uri,
            experiment_name=experiment,
            quarantine_file=tmp_path / "quarantine.jsonl",
        )
    )


def assert_matches_capture(traces: list, capture: list[dict]) -> None:
    calls = expected_calls(capture)
    got = by_call_id(traces)
    assert set(got) == set(calls), "every call exactly one trace, none extra"
    for cid, recs in calls.items():
        t = got[cid]
        first, final = recs[0], max(recs, key=lambda r: (r["endTime"], r["startTime"]))
        start_us = min(us(r["startTime"]) for r in recs)
        end_us = max(us(r["endTime"]) for r in recs)
        info = t.info
        assert info.request_time == start_us // 1000, cid
        assert info.execution_duration == end_us // 1000 - start_us // 1000, cid
        assert info.state.value == ("OK" if final["status"] == "success" else "ERROR"), cid
        usage = info.token_usage
        assert usage["input_tokens"] == sum(r["prompt_tokens"] for r in recs), cid
        assert usage["output_tokens"] == sum(r["completion_tokens"] for r in recs), cid
        assert usage["total_tokens"] == sum(r["total_tokens"] for r in recs), cid
        cost = json.loads(info.trace_metadata["mlflow.trace.cost"])
        assert cost["total_cost"] == pytest.approx(sum(r["response_cost"] for r in recs), rel=1e-9, abs=1e-15), cid
        session = final["session_id"] or final["trace_id"]
        assert info.trace_metadata["mlflow.trace.session"] == session, cid
        user = final["end_user"] or final["metadata"]["user_api_key_user_id"]
        assert info.trace_metadata["mlflow.trace.user"] == user, cid
        for tag in final["request_tags"]:
            k, _, v = tag.partition(":")
            assert k.strip() in info.tags, (cid, tag)
            assert v.strip() in info.tags[k.strip()], (cid, tag)
        assert info.tags.get("litellm.model_group") == (final["model_group"] or None), cid
        assert info.tags["litellm.status"] == final["status"], cid
        spans = t.data.spans
        root = next(s for s in spans if s.parent_id is None)
        assert root.start_time_ns == start_us * 1000 and root.end_time_ns == end_us * 1000, cid
        assert root.name == f"litellm-{final['call_type']}"
        want_type = "EMBEDDING" if final["call_type"] == "aembedding" else "CHAT_MODEL"
        assert root.span_type == want_type, cid  # and the level MLflow's UI filters spans by:
        assert root.log_level == (SpanLogLevel.INFO if final["status"] == "success" else SpanLogLevel.ERROR), cid
        if len(recs) == 1:
            assert len(spans) == 1, cid
        else:
            children = sorted((s for s in spans if s.parent_id == root.span_id), key=lambda s: s.start_time_ns)
            assert len(children) == len(recs) == len(spans) - 1, cid
            for child, rec in zip(children, recs, strict=True):
                assert child.start_time_ns == us(rec["startTime"]) * 1000, cid
                assert child.status.status_code.value == ("OK" if rec["status"] == "success" else "ERROR"), cid
                assert child.log_level == (SpanLogLevel.INFO if rec["status"] == "success" else SpanLogLevel.ERROR), cid
        if final["stream"] and final["status"] == "success":
            attempt = next(s for s in spans if s.start_time_ns == us(final["startTime"]) * 1000 and (len(recs) == 1 or s.parent_id))
            ev = [e for e in attempt.events if e.name == "first_token"]
            assert len(ev) == 1 and ev[0].timestamp == us(final["completionStartTime"]) * 1000, cid
        if first["call_type"] == "acompletion":
            assert root.attributes["mlflow.message.format"] == "openai"
        assert root.inputs, cid


@pytest.mark.server
def test_sample_logs_into_server_match_capture_and_rerun_changes_nothing(mlflow_server, capture, experiment_name, tmp_path):
    s1 = ingest(mlflow_server.url, experiment_name, tmp_path)
    traces = all_traces(mlflow_server.url, experiment_name)
    assert s1.traces_written == len(traces) == len({r["litellm_call_id"] for r in capture})
    assert_matches_capture(traces, capture)
    tokens = sum(t.info.token_usage["total_tokens"] for t in traces)
    spans = sum(len(t.data.spans) for t in traces)

    s2 = ingest(mlflow_server.url, experiment_name, tmp_path)
    again = all_traces(mlflow_server.url, experiment_name)
    assert s2.traces_written == s1.traces_written
    assert len(again) == len(traces)
    assert sum(t.info.token_usage["total_tokens"] for t in again) == tokens
    assert sum(len(t.data.spans) for t in again) == spans
    assert {t.info.trace_id for t in again} == {t.info.trace_id for t in traces}
    # the re-send's traces all held and unchanged: none is settled (which would mark its info final)
    seen = lambda t: (t.info.request_time, t.info.execution_duration, t.info.state, t.info.request_preview, t.info.trace_metadata)  # noqa: E731
    assert {t.info.trace_id: seen(t) for t in again} == {t.info.trace_id: seen(t) for t in traces}
    assert not any("mlflow.trace.infoFinalized" in t.info.trace_metadata for t in again)


def test_sample_logs_into_sqlite_store_match_capture_and_rerun_changes_nothing(sqlite_uri, capture, experiment_name, tmp_path):
    s1 = ingest(sqlite_uri, experiment_name, tmp_path)
    assert s1.quarantined == 7, s1.quarantined_by_reason
    traces = all_traces(sqlite_uri, experiment_name)
    assert_matches_capture(traces, capture)
    s2 = ingest(sqlite_uri, experiment_name, tmp_path)
    again = all_traces(sqlite_uri, experiment_name)
    assert s2.traces_written == s1.traces_written == len(again) == len(traces)
    assert sum(t.info.token_usage["total_tokens"] for t in again) == sum(t.info.token_usage["total_tokens"] for t in traces)


def _comparable(trace) -> dict:  # type: ignore[no-untyped-def]
    info = trace.info
    skip_tags = {"mlflow.artifactLocation"}
    spans = []
    for s in sorted(trace.data.spans, key=lambda s: (s.start_time_ns, s.name)):
        attrs = {k: v for k, v in s.attributes.items() if k != "mlflow.traceRequestId"}
        spans.append(
            (
                s.name,
                s.span_type,
                s.start_time_ns,
                s.end_time_ns,
                s.status.status_code.value,
                s.status.description,
                json.dumps(attrs, sort_keys=True),
                [(e.name, e.timestamp, json.dumps(e.attributes, sort_keys=True)) for e in s.events],
            )
        )
    return {
        "state": info.state.value,
        "request_time": info.request_time,
        "execution_duration": info.execution_duration,
        "tags": {k: v for k, v in info.tags.items() if k not in skip_tags},
        "metadata": {k: v for k, v in info.trace_metadata.items() if k != "mlflow.sourceRun"},
        "request_preview": info.request_preview,
        "response_preview": info.response_preview,
        "spans": spans,
    }


@pytest.mark.server
def test_server_and_sqlite_sinks_store_the_same_traces(mlflow_server, sqlite_uri, experiment_name, tmp_path):
    ingest(mlflow_server.url, experiment_name, tmp_path)
    ingest(sqlite_uri, experiment_name, tmp_path)
    via_server = by_call_id(all_traces(mlflow_server.url, experiment_name))
    via_store = by_call_id(all_traces(sqlite_uri, experiment_name))
    assert set(via_server) == set(via_store)
    for cid in via_server:
        assert _comparable(via_server[cid]) == _comparable(via_store[cid]), cid


@pytest.mark.server
def test_same_logs_into_two_experiments_on_one_server_do_not_collide(mlflow_server, tmp_path):
    one = ingest(mlflow_server.url, "collide-a", tmp_path, [str(SAMPLE_LOGS / "proxy_calls.jsonl")])
    two = ingest(mlflow_server.url, "collide-b", tmp_path, [str(SAMPLE_LOGS / "proxy_calls.jsonl")])
    a = all_traces(mlflow_server.url, "collide-a")
    b = all_traces(mlflow_server.url, "collide-b")
    assert len(a) == one.traces_written and len(b) == two.traces_written and len(a) > 0
    assert not {t.info.trace_id for t in a} & {t.info.trace_id for t in b}


@pytest.mark.server
def test_existing_experiment_id_is_used_and_trace_readable_by_get_trace(mlflow_server, capture, tmp_path):
    client = client_for(mlflow_server.url)
    exp_id = client.create_experiment("by-id-target")
    s = run_batch(
        RunOptions(
            paths=[str(SAMPLE_LOGS / "proxy_calls.jsonl")],
            tracking_uri=mlflow_server.url,
            experiment_id=exp_id,
            quarantine_file=tmp_path / "q.jsonl",
        )
    )
    assert s.experiment_id == exp_id
    traces = client.search_traces(locations=[exp_id], max_results=500)
    assert len(traces) == s.traces_written > 0
    full = client.get_trace(traces[0].info.trace_id)
    assert full.data.spans and full.info.experiment_id == exp_id
