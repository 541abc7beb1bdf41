"""End to end with real processes: openai SDK -> LiteLLM proxy (our logger + LiteLLM's own mlflow
callback) -> fake upstream; JSONL files rotating -> `litellm-ingest tail` -> a real mlflow server.

The proxy runs in its own venv (tests/e2e/proxy-requirements.txt: it pins polars<2 and rich<14);
set LITELLM_PROXY_PYTHON to its python, or the fixture builds .proxy-venv once. Deselect locally
with ``-m "not proxy"``; CI runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import all_traces
from tests.proxykit import E2E, OUR_LOGGER, Proxy, by_call, running_proxy
from tests.tailkit import Daemon, wait_for

pytestmark = pytest.mark.proxy

LOGGED_ONLY = {"mcp_tool": "call_mcp_tool", "pass_through": "pass_through_endpoint", "moderation": "moderation"}
"""Call kinds whose response may name no call id (LiteLLM's MCP gateway sends none): found in the log by call type."""


def _named_from_the_log(calls: list[dict], proxy: Proxy) -> None:
    for c in calls:
        if c["call_id"] is None and c["kind"] in LOGGED_ONLY:
            kind = LOGGED_ONLY[c["kind"]]

            def logged(kind: str = kind) -> list[dict]:
                return [r for r in proxy.records() if r["call_type"].removeprefix("a") == kind]

            wait_for(logged, 30, f"the {kind} call in the proxy's log")
            (record,) = logged()
            c["call_id"] = record["litellm_call_id"]


@pytest.fixture(scope="module")
def e2e_run(mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("e2e")
    ours, theirs = f"e2e-ours-{uuid.uuid4().hex[:6]}", f"e2e-callback-{uuid.uuid4().hex[:6]}"
    requests.post(mlflow_server.url + "/api/2.0/mlflow/experiments/create", json={"name": theirs}, timeout=30).raise_for_status()
    env = {
        "LITELLM_INGEST_LOG_MAX_BYTES": "60000",
        "LITELLM_INGEST_LOG_BACKUPS": "1000",
        "LITELLM_INGEST_LOG_GZIP": "1",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_NAME": theirs,
        "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false",
    }
    with running_proxy(work, [OUR_LOGGER, "mlflow"], env, mcp=True) as proxy:
        # --settle: 3 x the router's ~5 s backoff before a retry or fallback, so every call's attempts join in its first write
        daemon = Daemon(proxy.logdir, mlflow_server.url, ours, work / "state", "--settle", "15").start()
        try:
            calls = json.loads(proxy.run_client(E2E / "drive_calls.py", proxy.url, proxy.key))
            _named_from_the_log(calls, proxy)
            want = {c["call_id"] for c in calls}
            assert None not in want, [c for c in calls if c["call_id"] is None]

            def ours_complete() -> bool:
                try:
                    return want <= {t.info.tags.get("litellm.call_id") for t in all_traces(mlflow_server.url, ours)}
                except AssertionError:
                    return False

            wait_for(ours_complete, 120, "every call in our experiment")
            time.sleep(3)
            yield {"calls": calls, "ours": all_traces(mlflow_server.url, ours), "theirs": all_traces(mlflow_server.url, theirs),
                   "logdir": proxy.logdir, "records": proxy.records(), "names": (ours, theirs), "url": mlflow_server.url}  # fmt: skip
        finally:
            if daemon.alive():
                assert daemon.stop() == 0


def test_every_call_is_one_trace_across_rotation(e2e_run: dict) -> None:
    calls, ours = e2e_run["calls"], by_call(e2e_run["ours"])
    assert len(calls) >= 45
    assert set(ours) == {c["call_id"] for c in calls}, "none missing, none extra"
    rotated = [f for f in e2e_run["logdir"].iterdir() if f.name.startswith("proxy.jsonl.") and not f.name.endswith(".lock")]
    assert rotated, "the logger rotated at least once"
    attempts = defaultdict(int)
    for r in e2e_run["records"]:
        attempts[r["litellm_call_id"]] += 1
    joined = [c for c in calls if attempts[c["call_id"]] > 1]
    assert {c["kind"] for c in joined} >= {"fallback"}, "fallbacks logged failure + success under one call id"
    for c in joined:
        assert len(ours[c["call_id"]].data.spans) == attempts[c["call_id"]] + 1


def test_times_tokens_status_session_user_tags_match(e2e_run: dict) -> None:
    ours = by_call(e2e_run["ours"])
    records = defaultdict(list)
    for r in e2e_run["records"]:
        records[r["litellm_call_id"]].append(r)
    for c in e2e_run["calls"]:
        t, recs = ours[c["call_id"]], records[c["call_id"]]
        start_us = min(round(r["startTime"] * 1e6) for r in recs)
        end_us = max(round(r["endTime"] * 1e6) for r in recs)
        root = next(s for s in t.data.spans if s.parent_id is None)
        assert (root.start_time_ns, root.end_time_ns) == (start_us * 1000, end_us * 1000), c
        assert t.info.request_time == start_us // 1000
        assert t.info.state.value == ("OK" if c["ok"] else "ERROR"), c
        if c["ok"] and c["usage"]:
            usage = t.info.token_usage
            assert usage["input_tokens"] == c["usage"]["prompt_tokens"], c
            assert usage["total_tokens"] == c["usage"]["total_tokens"], c
        if c["session"]:
            assert t.info.trace_metadata["mlflow.trace.session"] == c["session"], c
        if c["user"]:
            assert t.info.trace_metadata["mlflow.trace.user"] == c["user"], c
        for tag in c["tags"]:
            k, _, v = tag.partition(":")
            assert k in t.info.tags and v in t.info.tags[k].split(", "), (c, t.info.tags)
        if c["kind"] == "embedding":
            assert root.span_type == "EMBEDDING"
        if c["stream"] and c["ok"]:
            final = max(recs, key=lambda r: r["endTime"])
            (ev,) = [e for s in t.data.spans for e in s.events if e.name == "first_token"]
            assert ev.timestamp == round(final["completionStartTime"] * 1e6) * 1000, c


def test_ours_carries_at_least_what_litellms_callback_carries(e2e_run: dict) -> None:
    ours = by_call(e2e_run["ours"])
    theirs = e2e_run["theirs"]
    assert len(theirs) >= len(e2e_run["calls"]) - 2, "the callback traced (nearly) every call too"
    compared = 0
    for cb in theirs:
        cb_root = next(s for s in cb.data.spans if s.parent_id is None)
        cid = cb_root.attributes.get("litellm_call_id")
        assert cid in ours, cid
        ours_spans = ours[cid].data.spans
        match = [
            s
            for s in ours_spans
            if abs(s.start_time_ns - cb_root.start_time_ns) <= 1000 and abs(s.end_time_ns - cb_root.end_time_ns) <= 1000
        ]
        assert match, (cid, cb_root.start_time_ns, [(s.start_time_ns, s.end_time_ns) for s in ours_spans])
        span = match[-1]
        cb_usage = cb_root.attributes.get("mlflow.chat.tokenUsage")
        if cb_usage:
            assert span.attributes["mlflow.chat.tokenUsage"]["input_tokens"] == cb_usage["input_tokens"], cid
            assert span.attributes["mlflow.chat.tokenUsage"]["output_tokens"] == cb_usage["output_tokens"], cid
        assert span.attributes["litellm_call_id"] == cid
        models = {span.attributes.get(k) for k in ("model", "model_group", "mlflow.llm.model")}
        assert cb_root.attributes.get("model") in models, (cid, cb_root.attributes.get("model"), models)
        for k, v in cb.info.tags.items():
            if k.startswith("mlflow."):
                continue
            assert k in ours[cid].info.tags and v in ours[cid].info.tags[k].split(", "), (cid, k, v)
        for attr in ("api_base", "cache_hit", "response_cost", "saved_cache_cost", "request_tags", "call_type"):
            if cb_root.attributes.get(attr) is not None:
                assert attr in span.attributes, (cid, attr)
        compared += 1
    assert compared == len(theirs)


def test_responses_anthropic_messages_and_text_completions_are_traced_like_chat_calls(e2e_run: dict) -> None:
    """The other routes clients use (the Responses API, Anthropic's Messages API as Claude Code sends
    it, text completions), streamed or not: MLflow's previews show the question and the answer the
    client got (its chat parsers read our inputs and outputs), typed as MLflow's own autolog types them."""
    ours = by_call(e2e_run["ours"])
    types = {"responses": "CHAT_MODEL", "anthropic_messages": "CHAT_MODEL", "text_completion": "LLM"}
    seen = set()
    for c in e2e_run["calls"]:
        if c["kind"] not in types:
            continue
        t = ours[c["call_id"]]
        root = next(s for s in t.data.spans if s.parent_id is None)
        assert root.span_type == types[c["kind"]], c
        assert root.attributes["mlflow.message.format"] == "openai", c
        assert root.attributes["call_type"].removeprefix("a") == c["kind"].removeprefix("a"), c
        assert c["answer"] and c["answer"] in t.info.response_preview, (c, t.info.response_preview)
        question = c["answer"].removeprefix("Deterministic answer to: ")
        assert question in t.info.request_preview, (c, t.info.request_preview)
        if c["kind"] != "text_completion":
            assert t.info.request_preview == question, "the preview is the question alone, as for a chat call"
            assert t.info.response_preview == c["answer"]
        seen.add((c["kind"], c["stream"]))
    assert seen == {("responses", False), ("responses", True), ("anthropic_messages", False), ("anthropic_messages", True),
                    ("text_completion", False)}  # fmt: skip


def test_image_generation_and_rerank_calls_are_traced_with_their_prompt_and_span_type(e2e_run: dict) -> None:
    ours = by_call(e2e_run["ours"])
    (img,) = [c for c in e2e_run["calls"] if c["kind"] == "image_generation"]
    t = ours[img["call_id"]]
    root = next(s for s in t.data.spans if s.parent_id is None)
    assert (root.span_type, t.info.request_preview) == ("LLM", "a red square on white")
    assert root.outputs["data"][0]["url"] == img["answer"]
    (rr,) = [c for c in e2e_run["calls"] if c["kind"] == "rerank"]
    t = ours[rr["call_id"]]
    root = next(s for s in t.data.spans if s.parent_id is None)
    assert (root.span_type, t.info.request_preview) == ("RERANKER", rr["query"])
    assert root.inputs["query"] == rr["query"] and root.inputs["documents"][0] == "Paris is the capital of France"
    assert json.dumps(root.outputs["results"]) == rr["answer"]
    assert t.info.trace_metadata["mlflow.trace.cost"], "LiteLLM prices a rerank per search unit"


def test_moderation_pass_through_and_mcp_tool_calls_are_traced_with_their_span_type_and_previews(e2e_run: dict) -> None:
    """The proxy's other gateways: a moderation is a guardrail; a pass-through route's body and answer
    (logged as JSON text) read as the question and the answer; a tool called through the MCP gateway
    (logged with a placeholder prompt) is a TOOL span whose inputs are the tool and its arguments."""
    ours = by_call(e2e_run["ours"])
    kinds = {c["kind"]: c for c in e2e_run["calls"]}
    roots = {k: next(s for s in ours[kinds[k]["call_id"]].data.spans if s.parent_id is None) for k in LOGGED_ONLY}
    assert roots["moderation"].span_type == "GUARDRAIL"
    assert roots["moderation"].inputs["messages"] == [{"role": "user", "content": "I will kill the process"}]
    assert ours[kinds["moderation"]["call_id"]].info.request_preview == "I will kill the process"
    pt = ours[kinds["pass_through"]["call_id"]]
    assert roots["pass_through"].inputs["messages"] == [{"role": "user", "content": "straight through"}]
    assert kinds["pass_through"]["answer"] and kinds["pass_through"]["answer"] in pt.info.response_preview, pt.info.response_preview
    assert "straight through" in pt.info.request_preview
    mcp = kinds["mcp_tool"]
    tool = roots["mcp_tool"]
    assert tool.span_type == "TOOL"
    assert tool.inputs["arguments"] == {"city": mcp["city"]} and "get_weather" in tool.inputs["name"], tool.inputs
    assert mcp["answer"] == f"Sunny in {mcp['city']}" and mcp["answer"] in json.dumps(tool.outputs), tool.outputs
    assert "default-message-value" not in ours[mcp["call_id"]].info.request_preview


def test_migrating_off_the_callback_leaves_one_trace_per_call_ours(e2e_run: dict, tmp_path: Path) -> None:
    """The callback's experiment (every call the live proxy made, traced live by LiteLLM's own
    callback: streamed, failed, retried, embeddings, MCP...) replayed from the proxy's logs with
    ``--replace-callback-traces``: every callback trace is deleted, and each call is one trace, ours."""
    theirs, url = e2e_run["names"][1], e2e_run["url"]
    before = all_traces(url, theirs, include_spans=False)
    assert before and not any("litellm.call_id" in t.info.tags for t in before)
    exe = str(Path(sys.executable).parent / "litellm-ingest")
    args = [exe, "batch", str(e2e_run["logdir"]), "--tracking-uri", url, "--experiment-name", theirs, "--no-state", "--json",
            "--replace-callback-traces"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    assert json.loads(proc.stdout)["callback_traces_replaced"] == len(before)
    after = all_traces(url, theirs, include_spans=False)
    assert sorted(t.info.tags.get("litellm.call_id") for t in after) == sorted(c["call_id"] for c in e2e_run["calls"])
