"""Real captures written by older LiteLLM proxies (tests/data/litellm-<version>.jsonl: our logger in
a 1.60.8, 1.72.6 and 1.85.7 proxy, driven with the capture's mix) ingested into a SQLite store.

Expected values come from each record as its version wrote it, with plain json: 1.60 and 1.72 log
no ``litellm_call_id`` (``id`` is the upstream response id on chat successes, else the call id),
no ``session_id`` (1.60 no ``trace_id`` either), and ``stream: true`` on every chat success, streamed or not.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from ingest.pipeline import RunOptions, run_batch
from tests.conftest import ROOT, all_traces

VERSIONS = ["1.60.8", "1.72.6", "1.85.7"]


def records(version: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "tests" / "data" / f"litellm-{version}.jsonl").read_text().splitlines()]


def us(t: float) -> int:
    return round(t * 1_000_000)


@pytest.mark.parametrize("version", VERSIONS)
def test_an_older_litellm_capture_becomes_one_trace_per_call_as_logged(
    version: str, sqlite_uri: str, experiment_name: str, tmp_path: Path
) -> None:
    recs = records(version)
    calls: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        calls[r.get("litellm_call_id") or r["id"]].append(r)
    s = run_batch(RunOptions(paths=[str(ROOT / "tests" / "data" / f"litellm-{version}.jsonl")], tracking_uri=sqlite_uri,
                             experiment_name=experiment_name, quarantine_file=tmp_path / "q.jsonl", settle_s=0))  # fmt: skip
    assert s.quarantined == 0 and not s.warnings_by_kind, (s.quarantined_by_reason, s.warnings_by_kind)
    traces = {t.info.tags["litellm.call_id"]: t for t in all_traces(sqlite_uri, experiment_name)}
    assert set(traces) == set(calls)
    for cid, rs in calls.items():
        info, spans = traces[cid].info, traces[cid].data.spans
        attempts = {(round(r["startTime"], 3), r["status"]) for r in rs}  # a record the proxy logged twice is one attempt
        final = max(rs, key=lambda r: (r["endTime"], r["startTime"]))
        assert len(spans) == (1 if len(attempts) == 1 else len(attempts) + 1), cid
        assert info.request_time == min(us(r["startTime"]) for r in rs) // 1000, cid
        assert info.state.value == ("OK" if final["status"] == "success" else "ERROR"), cid
        assert info.token_usage["input_tokens"] == final["prompt_tokens"], cid
        assert info.token_usage["output_tokens"] == final["completion_tokens"], cid
        cost = json.loads(info.trace_metadata["mlflow.trace.cost"])["total_cost"] if final["response_cost"] else 0
        assert cost == pytest.approx(final["response_cost"] or 0, abs=1e-15), cid
        assert info.trace_metadata.get("mlflow.trace.session") == (final.get("session_id") or final["trace_id"]), cid
        assert info.trace_metadata["mlflow.trace.user"] == (final["end_user"] or final["metadata"]["user_api_key_user_id"]), cid
        for tag in final["request_tags"]:
            k, _, v = tag.partition(":")
            assert v.strip() in info.tags[k.strip()], (cid, tag)
        root = next(sp for sp in spans if sp.parent_id is None)
        assert root.span_type == ("EMBEDDING" if final["call_type"] == "aembedding" else "CHAT_MODEL"), cid
        if final["call_type"] == "acompletion":
            assert root.attributes["mlflow.message.format"] == "openai", cid
        if final["status"] == "success" and final["model_parameters"]:
            first_token = [e for sp in spans for e in sp.events if e.name == "first_token"]
            assert len(first_token) == (1 if final["model_parameters"].get("stream") else 0), cid
            if final["model_group"]:
                assert root.attributes["mlflow.llm.model"] == final["model"].removeprefix(final["custom_llm_provider"] + "/"), cid
