"""The record-to-trace mapping (the contract), checked against the real capture record by record.

Every expectation is computed here from the input record dicts; the spans are read back through
MLflow's own ``Span.from_otel_proto``, as the sinks hand them to MLflow.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import polars as pl
import pytest
from conftest import SAMPLE_LOGS, read_capture, reidentify
from mlflow.entities.span import Span, SpanType
from mlflow.entities.span_status import SpanStatusCode

from ingest.dedupe import dedupe
from ingest.ids import mlflow_trace_id
from ingest.normalize import normalize
from ingest.sources import split_lines
from ingest.spans import BuiltTrace, Redaction, SpanData, build_trace, build_traces, span_type, stored_span, with_stored_attempts

EXP = "17"
CALLBACK_ATTRIBUTES = [
    "litellm_call_id",
    "call_type",
    "model",
    "api_base",
    "cache_hit",
    "mlflow.chat.tokenUsage",
    "raw_llm_response",
    "response_cost",
    "saved_cache_cost",
    "request_tags",
]

CAPTURE = read_capture()


# --- helpers -----------------------------------------------------------------------------


def frame_of(records: list[dict], source: str = "proxy_calls.jsonl") -> pl.DataFrame:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    lines, bad = split_lines(source, data, 0, 1)
    frame, quarantined = normalize(lines)
    assert not bad and not quarantined, (bad, quarantined)
    return dedupe(frame)[0]


def trace_of(records: list[dict], redact: Redaction = Redaction(), experiment: str = EXP) -> BuiltTrace:
    """Build the one trace of records that all belong to one call."""
    frame = frame_of(records)
    assert frame["call_key"].n_unique() == 1
    return build_trace(list(frame.iter_rows(named=True)), experiment, redact)


def spans(trace: BuiltTrace) -> list[Span]:
    return [Span.from_otel_proto(s) for s in trace.spans]


def ns(seconds: float) -> int:
    """Epoch seconds (as logged, microsecond precision) -> nanoseconds, exact to the microsecond."""
    return int((Decimal(repr(seconds)) * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP)) * 1000


def by_call(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        out[r["litellm_call_id"]].append(r)
    return out


CALLS = by_call(CAPTURE)
SINGLE = [c for c, rs in CALLS.items() if len(rs) == 1]
MULTI = [c for c, rs in CALLS.items() if len(rs) > 1]


def final_record(records: list[dict]) -> dict:
    """The attempt that decided the call: the one that ended last (also the one logged last)."""
    return max(records, key=lambda r: r["endTime"])


@pytest.fixture(scope="module")
def built() -> dict[str, BuiltTrace]:
    return {t.call_key: t for t in build_traces(frame_of(CAPTURE), EXP)}


def attempt_span(built: dict[str, BuiltTrace], rec: dict) -> Span:
    """The span that stands for one record: the root of a one-record call, else the matching child."""
    ss = spans(built[rec["litellm_call_id"]])
    if len(ss) == 1:
        return ss[0]
    want = "OK" if rec["status"] == "success" else "ERROR"
    matches = [s for s in ss[1:] if s.start_time_ns == ns(rec["startTime"]) and s.status.status_code == want]
    assert len(matches) == 1, f"no single attempt span for {rec['id']}"
    return matches[0]


def each_record(pred: Any = None) -> list[dict]:
    return [r for r in CAPTURE if pred is None or pred(r)]


def rid(r: dict) -> str:
    return f"{r['litellm_call_id'][:8]}-{r['status']}"


def leaves(value: Any) -> Iterator[str]:
    """Every string inside a (decoded) attribute value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v)


def all_strings(span: Span) -> list[str]:
    out = list(leaves(span.attributes))
    out.append(span.status.description or "")
    for ev in span.events:
        out.append(ev.name)
        out += list(leaves(ev.attributes))
    return out


def tag_pairs(request_tags: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t in request_tags:
        if ":" in t:
            k, v = t.split(":", 1)
            out.setdefault(k.strip(), []).append(v.strip())
        else:
            out.setdefault(t.strip(), []).append("")
    return out


# --- structure: one trace per call, root span, attempts ------------------------------------


def test_one_trace_per_call(built: dict[str, BuiltTrace]) -> None:
    assert set(built) == set(CALLS)
    for call, trace in built.items():
        assert trace.records == len(CALLS[call])
        otel_ids = {s.trace_id for s in trace.spans}
        assert len(otel_ids) == 1
        assert trace.trace_id == mlflow_trace_id(otel_ids.pop())


@pytest.mark.parametrize("call", SINGLE)
def test_one_record_call_is_one_root_span_named_litellm_call_type(built: dict[str, BuiltTrace], call: str) -> None:
    (rec,) = CALLS[call]
    (root,) = spans(built[call])
    assert root.parent_id is None
    assert root.name == f"litellm-{rec['call_type']}"
    assert root.attributes["mlflow.traceTag.mlflow.traceName"] == f"litellm-{rec['call_type']}"


def test_plain_chat_root_span_is_named_litellm_acompletion(built: dict[str, BuiltTrace]) -> None:
    rec = CAPTURE[0]
    assert rec["call_type"] == "acompletion"
    (root,) = spans(built[rec["litellm_call_id"]])
    assert root.name == "litellm-acompletion"


@pytest.mark.parametrize("call", MULTI)
def test_multi_attempt_call_is_root_plus_one_child_per_attempt_in_time_order(built: dict[str, BuiltTrace], call: str) -> None:
    recs = CALLS[call]
    root, *children = spans(built[call])
    assert root.parent_id is None
    assert root.name == f"litellm-{final_record(recs)['call_type']}"
    assert len(children) == len(recs)
    assert all(c.parent_id == root.span_id for c in children)
    assert len({root.span_id, *(c.span_id for c in children)}) == len(recs) + 1
    ran = sorted(recs, key=lambda r: (r["endTime"], r["startTime"]))
    assert [(c.start_time_ns, c.end_time_ns) for c in children] == [(ns(r["startTime"]), ns(r["endTime"])) for r in ran]
    assert [c.status.status_code for c in children] == ["OK" if r["status"] == "success" else "ERROR" for r in ran]
    assert [(c.name, c.attributes["attempt"]) for c in children] == [(f"{root.name} attempt {n}", n) for n in range(1, len(recs) + 1)]


def test_fallback_stamped_with_the_requests_start_is_numbered_after_the_failed_primary_it_followed() -> None:
    """LiteLLM logs the primary's failure, then the fallback's success with the request's start time (before the primary's)."""
    (call,) = [c for c, rs in CALLS.items() if len(rs) == 2 and rs[1]["status"] == "success" and rs[1]["startTime"] < rs[0]["startTime"]]
    primary, fallback = CALLS[call]
    assert primary["status"] == "failure" and primary["endTime"] < fallback["endTime"]
    root, *children = spans(trace_of([primary, fallback]))
    assert [(c.name, c.attributes["attempt"], c.status.status_code) for c in children] == [
        (f"{root.name} attempt 1", 1, SpanStatusCode.ERROR),
        (f"{root.name} attempt 2", 2, SpanStatusCode.OK),
    ]
    assert [(c.start_time_ns, c.end_time_ns) for c in children] == [
        (ns(primary["startTime"]), ns(primary["endTime"])),
        (ns(fallback["startTime"]), ns(fallback["endTime"])),
    ], "the logged times are kept, the fallback's start before the primary's included"
    assert root.start_time_ns == ns(fallback["startTime"]) and root.end_time_ns == ns(fallback["endTime"])
    assert root.status.status_code == SpanStatusCode.OK and root.outputs == fallback["response"]
    again = spans(trace_of([fallback, primary]))
    assert [(c.span_id, c.name) for c in again] == [(c.span_id, c.name) for c in [root, *children]], "the read order does not matter"


@pytest.mark.parametrize("call", MULTI)
def test_multi_attempt_root_spans_first_start_to_last_end(built: dict[str, BuiltTrace], call: str) -> None:
    recs = CALLS[call]
    root = spans(built[call])[0]
    assert root.start_time_ns == min(ns(r["startTime"]) for r in recs)
    assert root.end_time_ns == max(ns(r["endTime"]) for r in recs)


@pytest.mark.parametrize("call", MULTI)
def test_multi_attempt_root_status_is_final_attempts(built: dict[str, BuiltTrace], call: str) -> None:
    """Failure then success (retry / fallback): the call succeeded, so the trace (root status) is OK."""
    final = final_record(CALLS[call])
    root = spans(built[call])[0]
    assert root.status.status_code == ("OK" if final["status"] == "success" else "ERROR"), root.status


@pytest.mark.parametrize("call", MULTI)
def test_multi_attempt_root_outputs_are_final_attempts_response(built: dict[str, BuiltTrace], call: str) -> None:
    final = final_record(CALLS[call])
    root = spans(built[call])[0]
    assert root.outputs == final["response"]


# --- span types --------------------------------------------------------------------------


@pytest.mark.parametrize("rec", each_record(lambda r: r["call_type"] == "acompletion"), ids=rid)
def test_span_type_acompletion_is_chat_model(built: dict[str, BuiltTrace], rec: dict) -> None:
    assert attempt_span(built, rec).span_type == SpanType.CHAT_MODEL


@pytest.mark.parametrize("rec", each_record(lambda r: r["call_type"] == "aembedding"), ids=rid)
def test_span_type_aembedding_is_embedding_not_llm(built: dict[str, BuiltTrace], rec: dict) -> None:
    s = attempt_span(built, rec)
    assert s.span_type == SpanType.EMBEDDING
    assert s.span_type != SpanType.LLM
    assert s.attributes["mlflow.spanType"] == "EMBEDDING"  # a plain string, not JSON-quoted


def test_span_type_atext_completion_is_llm() -> None:
    rec = reidentify([CAPTURE[0]])[0]
    rec["call_type"] = "atext_completion"
    (root,) = spans(trace_of([rec]))
    assert root.name == "litellm-atext_completion"
    assert root.span_type == SpanType.LLM
    assert span_type("atext_completion") == SpanType.LLM
    assert span_type("acompletion") == SpanType.CHAT_MODEL
    assert span_type("aembedding") == SpanType.EMBEDDING


CALL_TYPES = [json.loads(line) for line in (SAMPLE_LOGS.parent / "tests/data/litellm-1.110.2-calltypes.jsonl").read_text().splitlines()]
"""Real records of a LiteLLM 1.110.2 proxy (our logger) for moderation, speech, transcription, two
pass-through routes (a configured ``pass_through_endpoints`` path, ``/openai/...``), MCP tool calls
(``/mcp-rest/tools/call`` and JSON-RPC ``tools/call`` at ``/mcp/``) and an MCP tool listing, against
tests/e2e/fake_upstream.py and tests/e2e/fake_mcp.py; made with tests/e2e/capture_calltypes.py.
``model_map_information`` (9 KB of LiteLLM's price map each) and a cost traceback are cut."""


def of_type(*kinds: str) -> list[dict]:
    return [r for r in CALL_TYPES if r["call_type"] in kinds]


@pytest.mark.parametrize("rec", CALL_TYPES, ids=lambda r: r["call_type"])
def test_every_other_call_type_is_one_span_with_litellms_tokens_and_cost(rec: dict) -> None:
    (root,) = spans(trace_of([rec]))
    assert root.attributes["mlflow.chat.tokenUsage"]["total_tokens"] == rec["total_tokens"]
    assert root.attributes["mlflow.llm.cost"]["total_cost"] == rec["response_cost"]
    assert root.outputs is not None
    assert "default-message-value" not in json.dumps(root.inputs), "LiteLLM's placeholder for no prompt is no prompt"


def test_span_type_of_the_other_chat_routes_and_of_mcp_operations() -> None:
    for kind in ("anthropic_messages", "aanthropic_messages", "generate_content_stream", "agenerate_content_stream"):
        assert span_type(kind) == SpanType.CHAT_MODEL, kind
    assert span_type("call_mcp_tool") == span_type("list_mcp_tools") == SpanType.TOOL
    assert span_type("moderation") == span_type("amoderation") == SpanType.GUARDRAIL
    for kind in ("aspeech", "atranscription", "pass_through_endpoint"):
        assert span_type(kind) == SpanType.LLM, kind


@pytest.mark.parametrize("rec", of_type("call_mcp_tool"), ids=lambda r: r["metadata"]["user_api_key_request_route"])
def test_an_mcp_tool_call_is_a_tool_span_with_the_tool_and_its_arguments(rec: dict) -> None:
    call = rec["metadata"]["mcp_tool_call_metadata"]
    (root,) = spans(trace_of([rec]))
    assert root.span_type == SpanType.TOOL
    assert root.inputs == {"name": call["namespaced_tool_name"], "arguments": call["arguments"]}
    assert root.outputs == rec["response"]
    (redacted,) = spans(trace_of([rec], Redaction(messages=True)))
    assert redacted.inputs == {"name": call["namespaced_tool_name"], "arguments": "[redacted]"}


@pytest.mark.parametrize("rec", of_type("atranscription"), ids=lambda r: r["metadata"]["user_api_key_request_route"])
def test_a_transcription_shows_the_file_sent_not_a_user_message(rec: dict) -> None:
    (root,) = spans(trace_of([rec]))
    assert root.inputs == {"model": rec["model_group"] or rec["model"], "file": rec["messages"][0]["content"]}
    assert root.outputs["text"] == rec["response"]["text"]
    (redacted,) = spans(trace_of([rec], Redaction(messages=True)))
    assert rec["messages"][0]["content"] not in json.dumps(redacted.inputs)


@pytest.mark.parametrize("rec", of_type("list_mcp_tools"), ids=lambda r: r["metadata"]["user_api_key_request_route"])
def test_an_mcp_tool_listing_is_a_tool_span_with_the_tools_listed(rec: dict) -> None:
    """No model runs when the gateway lists its servers' tools: not an LLM span, and no chat to render."""
    (root,) = spans(trace_of([rec]))
    assert root.span_type == SpanType.TOOL
    assert root.outputs == rec["response"] and rec["response"][0]["name"]
    assert "mlflow.message.format" not in root.attributes
    assert "default-message-value" not in json.dumps(root.inputs)


@pytest.mark.parametrize("rec", of_type("pass_through_endpoint"), ids=lambda r: r["metadata"]["user_api_key_request_route"])
def test_a_pass_through_call_shows_the_request_and_response_bodies(rec: dict) -> None:
    """LiteLLM logs the body as the JSON text of one user message and the answer as JSON text under
    ``response``; decoded, MLflow's previews read the question and the answer from them."""
    body, answer = json.loads(rec["messages"][0]["content"]), json.loads(rec["response"]["response"])
    (root,) = spans(trace_of([rec]))
    assert root.inputs == {"model": rec["model"], **body}
    assert root.outputs == answer
    assert body["messages"] and answer["choices"][0]["message"]["content"]
    (redacted,) = spans(trace_of([rec], Redaction(messages=True)))
    assert redacted.inputs == {"model": rec["model"], "messages": [{"role": "user", "content": "[redacted]"}]}


# --- times -------------------------------------------------------------------------------


@pytest.mark.parametrize("rec", CAPTURE, ids=rid)
def test_times_exact_to_the_microsecond(built: dict[str, BuiltTrace], rec: dict) -> None:
    s = attempt_span(built, rec)
    assert s.start_time_ns == ns(rec["startTime"])
    assert s.end_time_ns == ns(rec["endTime"])


@pytest.mark.parametrize("rec", each_record(lambda r: r["stream"] is True), ids=rid)
def test_streamed_call_has_first_token_event_at_completion_start_time(built: dict[str, BuiltTrace], rec: dict) -> None:
    events = [e for e in attempt_span(built, rec).events if e.name == "first_token"]
    assert len(events) == 1
    assert events[0].timestamp == ns(rec["completionStartTime"])
    expected_ms = (ns(rec["completionStartTime"]) - ns(rec["startTime"])) / 1e6
    assert events[0].attributes["time_to_first_token_ms"] == pytest.approx(expected_ms)


@pytest.mark.parametrize("rec", each_record(lambda r: not r["stream"]), ids=rid)
def test_non_streamed_call_has_no_first_token_event(built: dict[str, BuiltTrace], rec: dict) -> None:
    assert [e for e in attempt_span(built, rec).events if e.name == "first_token"] == []


# --- inputs / outputs --------------------------------------------------------------------


@pytest.mark.parametrize("rec", each_record(lambda r: r["call_type"] == "acompletion"), ids=rid)
def test_inputs_carry_messages_and_model_parameters(built: dict[str, BuiltTrace], rec: dict) -> None:
    inputs = attempt_span(built, rec).inputs
    assert inputs.get("messages") == rec["messages"], "a prompt not logged is no key: a null was the whole request preview"
    for k in ("tools", "tool_choice", "stream", "temperature", "max_tokens", "user"):
        if rec["model_parameters"].get(k) is not None:
            assert inputs[k] == rec["model_parameters"][k], k


def test_tool_call_inputs_carry_tools_tool_choice_and_stream(built: dict[str, BuiltTrace]) -> None:
    rec = next(r for r in CAPTURE if r["model_parameters"].get("tool_choice"))
    inputs = attempt_span(built, rec).inputs
    assert inputs["messages"] == rec["messages"]
    assert inputs["tools"] == rec["model_parameters"]["tools"]
    assert inputs["tool_choice"] == rec["model_parameters"]["tool_choice"]
    assert inputs["stream"] == rec["model_parameters"]["stream"]


def test_messages_given_as_json_text_are_the_chat_and_other_text_stays_text() -> None:
    """A tool or LiteLLM version writing ``messages`` as JSON text (a string holding the list) left one
    string in the inputs instead of the chat; an embedding's input was that text too. Text that is no
    JSON list (an object, a quoted string, a plain prompt) is kept as it was logged."""
    chat = next(r for r in CAPTURE if r["call_type"] == "acompletion" and r["status"] == "success")
    embed = next(r for r in CAPTURE if r["call_type"] == "aembedding" and len(r["messages"]) > 1)
    (span,) = spans(trace_of([copy.deepcopy(chat) | {"messages": json.dumps(chat["messages"])}]))
    assert span.inputs["messages"] == chat["messages"]
    (span,) = spans(trace_of([copy.deepcopy(embed) | {"messages": json.dumps(embed["messages"])}]))
    assert span.inputs["input"] == [m["content"] for m in embed["messages"]]
    for odd in ('{"role": "user"}', '"[]"', "[broken", "plain prompt"):
        (span,) = spans(trace_of([copy.deepcopy(chat) | {"messages": odd}]))
        assert span.inputs["messages"] == odd


@pytest.mark.parametrize("rec", each_record(lambda r: r["call_type"] == "aembedding"), ids=rid)
def test_embedding_inputs_carry_input_text(built: dict[str, BuiltTrace], rec: dict) -> None:
    texts = [m["content"] for m in rec["messages"]]
    inputs = attempt_span(built, rec).inputs
    assert "messages" not in inputs
    assert inputs["input"] == (texts[0] if len(texts) == 1 else texts)


@pytest.mark.parametrize("rec", each_record(lambda r: r["status"] == "success"), ids=rid)
def test_outputs_are_the_response(built: dict[str, BuiltTrace], rec: dict) -> None:
    assert attempt_span(built, rec).outputs == rec["response"]


@pytest.mark.parametrize("rec", each_record(lambda r: r["call_type"] == "acompletion"), ids=rid)
def test_chat_message_format_is_openai(built: dict[str, BuiltTrace], rec: dict) -> None:
    assert attempt_span(built, rec).attributes["mlflow.message.format"] == "openai"


def test_tool_call_record_has_chat_tools(built: dict[str, BuiltTrace]) -> None:
    recs = [r for r in CAPTURE if r["model_parameters"].get("tools")]
    assert recs
    for rec in recs:
        attrs = attempt_span(built, rec).attributes
        assert attrs["mlflow.message.format"] == "openai"
        assert attrs["mlflow.chat.tools"] == rec["model_parameters"]["tools"]


def test_record_without_tools_has_no_chat_tools(built: dict[str, BuiltTrace]) -> None:
    assert "mlflow.chat.tools" not in attempt_span(built, CAPTURE[0]).attributes


SPEND_ROWS = [json.loads(line) for line in (SAMPLE_LOGS / "spend_logs_export.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("row", SPEND_ROWS, ids=lambda r: r["request_id"][:20])
def test_a_spend_logs_row_of_a_streamed_call_has_its_first_token_as_the_payload_does(row: dict) -> None:
    """A SpendLogs row has no stream flag (and, where the proxy stores no prompts, no request): its
    streamed calls had no first token event and ``stream`` false, the promised stream timing lost on
    a backfill from the proxy's database. A first token before the end says it was streamed."""
    (root,) = spans(trace_of([row]))
    payload = [r for r in CAPTURE if r["litellm_call_id"] == row.get("litellm_call_id") and r["status"] == row["status"]]
    if not payload:
        pytest.skip("no payload copy of this row")
    streamed = payload[0]["stream"] is True
    events = [e for e in root.events if e.name == "first_token"]
    assert root.attributes["stream"] is streamed
    assert len(events) == streamed
    if streamed:
        assert abs(events[0].timestamp - ns(payload[0]["completionStartTime"])) < 1_000_000, "to the millisecond SpendLogs keeps"


@pytest.mark.parametrize("rec", each_record(lambda r: r["status"] == "failure" and r["model_parameters"].get("stream")), ids=rid)
def test_a_streamed_request_that_failed_is_streamed_with_no_first_token(built: dict[str, BuiltTrace], rec: dict) -> None:
    """LiteLLM logs a failure's stream flag as null and its first token time as its end: the span
    said ``stream`` false while its inputs said true."""
    span = attempt_span(built, rec)
    assert rec["stream"] is None and rec["completionStartTime"] == rec["endTime"]
    assert span.attributes["stream"] is True and span.inputs["stream"] is True
    assert "time_to_first_token_ms" not in span.attributes and not [e for e in span.events if e.name == "first_token"]


@pytest.mark.parametrize("call", MULTI)
def test_a_joined_calls_root_names_the_model_that_served_it(built: dict[str, BuiltTrace], call: str) -> None:
    """Without its own model the root took the one MLflow reads from its inputs (the first attempt's:
    the fallback's failed primary); a count by model saw the failed one twice."""
    root, *children = spans(built[call])
    for key in ("mlflow.llm.model", "mlflow.llm.provider"):
        assert root.attributes[key] == children[-1].attributes[key], key
    if call.startswith("da446ac3"):
        assert root.attributes["mlflow.llm.model"] != children[0].attributes["mlflow.llm.model"]


# --- usage and cost ----------------------------------------------------------------------


@pytest.mark.parametrize("rec", CAPTURE, ids=rid)
def test_token_usage_equals_record_tokens(built: dict[str, BuiltTrace], rec: dict) -> None:
    usage = attempt_span(built, rec).attributes["mlflow.chat.tokenUsage"]
    assert usage["input_tokens"] == rec["prompt_tokens"]
    assert usage["output_tokens"] == rec["completion_tokens"]
    assert usage["total_tokens"] == rec["total_tokens"]


def test_hidden_params_given_as_json_text_keeps_the_retry_and_fallback_counts() -> None:
    """A tool or LiteLLM version writing ``hidden_params`` as JSON text (a string holding the object)
    lost the counts read from its headers. Text of another shape, or no JSON, is left as it is."""
    rec = next(r for r in CAPTURE if ((r["hidden_params"] or {}).get("additional_headers") or {}).get("x-litellm-attempted-retries"))
    headers = rec["hidden_params"]["additional_headers"]
    (span,) = spans(trace_of([copy.deepcopy(rec) | {"hidden_params": json.dumps(rec["hidden_params"])}]))
    assert span.attributes["attempted_retries"] == headers["x-litellm-attempted-retries"]
    assert span.attributes.get("attempted_fallbacks") == headers.get("x-litellm-attempted-fallbacks")
    for odd in ('["not", "an", "object"]', '"{}"', "{broken", "plain text", ""):
        (span,) = spans(trace_of([copy.deepcopy(rec) | {"hidden_params": odd}]))
        assert "attempted_retries" not in span.attributes, odd


@pytest.mark.parametrize("rec", CAPTURE, ids=rid)
def test_llm_cost_total_is_response_cost_and_parts_from_cost_breakdown(built: dict[str, BuiltTrace], rec: dict) -> None:
    cost = attempt_span(built, rec).attributes["mlflow.llm.cost"]
    assert cost["total_cost"] == pytest.approx(rec["response_cost"])
    cb = rec.get("cost_breakdown") or {}
    for k in ("input_cost", "output_cost"):
        if isinstance(cb.get(k), (int, float)):
            assert cost[k] == pytest.approx(cb[k]), k


@pytest.mark.parametrize(
    ("usage", "where", "expected"),
    [
        ({"prompt_tokens_details": {"cached_tokens": 1920}}, "response", {"cache_read_input_tokens": 1920}),
        ({"prompt_tokens_details": {"cached_tokens": 1920}}, "usage_object", {"cache_read_input_tokens": 1920}),
        (
            {"cache_creation_input_tokens": 2048, "cache_read_input_tokens": 64, "prompt_tokens_details": {"cached_tokens": 0}},
            "response",
            {"cache_creation_input_tokens": 2048, "cache_read_input_tokens": 64},
        ),
        ({"prompt_tokens_details": {"cache_creation_tokens": 512}}, "usage_object", {"cache_creation_input_tokens": 512}),
        ({"prompt_tokens_details": {"cached_tokens": -1, "cache_creation_tokens": "9"}}, "response", {}),
    ],
    ids=["openai", "spend logs without responses", "anthropic", "creation in details", "not counts"],
)
def test_prompt_cache_tokens_are_kept_wherever_litellm_logs_them(usage: dict, where: str, expected: dict) -> None:
    """Anthropic's cache writes (MLflow has a key for them) were dropped, and so was every cache count
    of a SpendLogs row whose proxy stores no responses (``'{}'``; LiteLLM keeps ``usage_object``)."""
    row = copy.deepcopy(next(r for r in SPEND_ROWS if r["response"] == "{}" and r["status"] == "success"))
    md = json.loads(row["metadata"])
    md["usage_object"] = {"prompt_tokens": 2100, "total_tokens": 2130, **(usage if where == "usage_object" else {})}
    row["metadata"] = json.dumps(md)
    if where == "response":
        row["response"] = json.dumps({"id": "x", "choices": [], "usage": usage})
    (root,) = spans(trace_of([row]))
    got = root.attributes["mlflow.chat.tokenUsage"]
    assert {k: v for k, v in got.items() if k.startswith("cache")} == expected


def test_priced_call_cost_parts(built: dict[str, BuiltTrace]) -> None:
    rec = next(r for r in CAPTURE if r["status"] == "success" and r["response_cost"] and r["cost_breakdown"]["output_cost"])
    cb = rec["cost_breakdown"]
    cost = attempt_span(built, rec).attributes["mlflow.llm.cost"]
    assert cost == pytest.approx({"total_cost": rec["response_cost"], "input_cost": cb["input_cost"], "output_cost": cb["output_cost"]})


# --- failures ----------------------------------------------------------------------------


@pytest.mark.parametrize("rec", each_record(lambda r: r["status"] == "success"), ids=rid)
def test_success_status_ok(built: dict[str, BuiltTrace], rec: dict) -> None:
    s = attempt_span(built, rec)
    assert s.status.status_code == SpanStatusCode.OK
    assert [e for e in s.events if e.name == "exception"] == []


@pytest.mark.parametrize("rec", each_record(lambda r: r["status"] != "success"), ids=rid)
def test_failure_status_error_with_message_and_exception_event(built: dict[str, BuiltTrace], rec: dict) -> None:
    err = rec["error_information"]
    s = attempt_span(built, rec)
    assert s.status.status_code == SpanStatusCode.ERROR
    assert err["error_message"] in s.status.description
    (ev,) = [e for e in s.events if e.name == "exception"]
    assert ev.timestamp == ns(rec["endTime"])
    assert ev.attributes["exception.type"] == err["error_class"]
    assert err["error_message"] in ev.attributes["exception.message"]
    if err["traceback"]:
        assert ev.attributes["exception.stacktrace"] == err["traceback"]


@pytest.mark.parametrize("call", [c for c in SINGLE if CALLS[c][0]["status"] != "success"])
def test_failed_one_record_call_root_is_error(built: dict[str, BuiltTrace], call: str) -> None:
    (root,) = spans(built[call])
    assert root.status.status_code == SpanStatusCode.ERROR
    assert root.attributes["mlflow.traceTag.litellm.status"] == CALLS[call][0]["status"]


# --- session, user, tags -----------------------------------------------------------------


@pytest.mark.parametrize("call", list(CALLS))
def test_root_session_id_is_session_id_else_trace_id(built: dict[str, BuiltTrace], call: str) -> None:
    final = final_record(CALLS[call])
    root = spans(built[call])[0]
    assert root.attributes["session.id"] == (final["session_id"] or final["trace_id"])


def test_capture_sessions_become_session_ids(built: dict[str, BuiltTrace]) -> None:
    sessions = {spans(t)[0].attributes["session.id"] for t in built.values()}
    named = {r["trace_id"] for r in CAPTURE if r["trace_id"].startswith("sess-")}
    assert {"sess-A", "sess-B"} <= named
    assert named <= sessions
    sess_a = [c for c, rs in CALLS.items() if rs[0]["trace_id"] == "sess-A"]
    assert len(sess_a) == 2
    assert {spans(built[c])[0].attributes["session.id"] for c in sess_a} == {"sess-A"}


def test_session_id_field_wins_over_trace_id() -> None:
    rec = reidentify([CAPTURE[0]])[0]
    rec["session_id"] = "sess-correlated"
    (root,) = spans(trace_of([rec]))
    assert root.attributes["session.id"] == "sess-correlated"


@pytest.mark.parametrize("call", list(CALLS))
def test_root_user_id_is_end_user_else_key_user_id(built: dict[str, BuiltTrace], call: str) -> None:
    final = final_record(CALLS[call])
    root = spans(built[call])[0]
    assert root.attributes["user.id"] == (final["end_user"] or final["metadata"]["user_api_key_user_id"])


def test_end_user_becomes_user_id(built: dict[str, BuiltTrace]) -> None:
    rec = next(r for r in CAPTURE if r["end_user"] == "user-123")
    assert spans(built[rec["litellm_call_id"]])[0].attributes["user.id"] == "user-123"


@pytest.mark.parametrize("call", list(CALLS))
def test_trace_tags_from_request_tags_keep_every_value(built: dict[str, BuiltTrace], call: str) -> None:
    root = spans(built[call])[0]
    tags = tag_pairs([t for r in CALLS[call] for t in r["request_tags"] or []])
    assert tags
    for k, values in tags.items():
        got = root.attributes[f"mlflow.traceTag.{k}"]
        want = list(dict.fromkeys(v for v in values if v))
        if want:
            assert got.split(", ") == want, k
        else:
            assert got == "", k


def test_repeated_user_agent_tag_keeps_both_values(built: dict[str, BuiltTrace]) -> None:
    rec = CAPTURE[0]
    values = [t.split(":", 1)[1].strip() for t in rec["request_tags"] if t.split(":", 1)[0].strip() == "User-Agent"]
    assert len(set(values)) == 2
    got = spans(built[rec["litellm_call_id"]])[0].attributes["mlflow.traceTag.User-Agent"]
    for v in values:
        assert v in got.split(", ")


def test_client_tags_become_trace_tags(built: dict[str, BuiltTrace]) -> None:
    rec = next(r for r in CAPTURE if "team:b" in (r["request_tags"] or []))
    attrs = spans(built[rec["litellm_call_id"]])[0].attributes
    assert attrs["mlflow.traceTag.team"] == "b"
    assert attrs["mlflow.traceTag.feature"] == "stream"


def test_a_request_tag_naming_a_tag_mlflow_sets_itself_is_no_trace_tag() -> None:
    """MLflow 3.18's ``/v1/traces`` drops these; ``log_spans`` (and so the bulk writer) would let them
    move the trace's spans or artifacts, so no sink gets them."""
    rec = reidentify([CAPTURE[0]])[0]
    rec["request_tags"] = ["mlflow.trace.spansLocation:ARTIFACT_REPO", "mlflow.artifactLocation:file:///x", "team:a"]
    (root,) = spans(trace_of([rec]))
    assert root.attributes["mlflow.traceTag.team"] == "a"
    assert not {k for k in root.attributes if k.startswith(("mlflow.traceTag.mlflow.artifact", "mlflow.traceTag.mlflow.trace."))}


def test_bare_tag_gets_empty_value() -> None:
    rec = reidentify([CAPTURE[0]])[0]
    rec["request_tags"] = ["prod", "team:a", *rec["request_tags"]]
    (root,) = spans(trace_of([rec]))
    assert root.attributes["mlflow.traceTag.prod"] == ""
    assert root.attributes["mlflow.traceTag.team"] == "a"


@pytest.mark.parametrize("call", list(CALLS))
def test_litellm_filter_tags(built: dict[str, BuiltTrace], call: str) -> None:
    final = final_record(CALLS[call])
    attrs = spans(built[call])[0].attributes
    expected = {
        "litellm.model": final["model"],
        "litellm.model_group": final["model_group"],
        "litellm.provider": final["custom_llm_provider"],
        "litellm.status": final["status"],
        "litellm.cache_hit": "true" if final["cache_hit"] else "false",
        "litellm.call_id": final["litellm_call_id"],
    }
    for k, v in expected.items():
        if v:
            assert attrs[f"mlflow.traceTag.{k}"] == v, k


def test_cache_hit_record_is_tagged(built: dict[str, BuiltTrace]) -> None:
    rec = next(r for r in CAPTURE if r["cache_hit"] is True)
    attrs = spans(built[rec["litellm_call_id"]])[0].attributes
    assert attrs["mlflow.traceTag.litellm.cache_hit"] == "true"
    assert attrs["cache_hit"] is True
    assert attrs["saved_cache_cost"] == pytest.approx(rec["saved_cache_cost"])


# --- LiteLLM callback attributes ---------------------------------------------------------


@pytest.mark.parametrize("rec", each_record(lambda r: r["status"] == "success"), ids=rid)
def test_callback_attributes_on_successful_attempt(built: dict[str, BuiltTrace], rec: dict) -> None:
    attrs = attempt_span(built, rec).attributes
    missing = [k for k in CALLBACK_ATTRIBUTES if k not in attrs]
    assert not missing
    assert attrs["litellm_call_id"] == rec["litellm_call_id"]
    assert attrs["call_type"] == rec["call_type"]
    assert attrs["model"] == rec["model"]
    assert attrs["api_base"] == rec["api_base"]
    assert attrs["cache_hit"] is bool(rec["cache_hit"])
    assert attrs["raw_llm_response"] == rec["response"]
    assert attrs["response_cost"] == pytest.approx(rec["response_cost"])
    assert attrs["saved_cache_cost"] == pytest.approx(rec["saved_cache_cost"])
    assert attrs["request_tags"] == rec["request_tags"]


def test_callback_attributes_present_on_failed_attempts(built: dict[str, BuiltTrace]) -> None:
    """LiteLLM's callback sets all of these on every span, failures included (raw_llm_response = the logged response)."""
    problems = []
    for rec in each_record(lambda r: r["status"] != "success"):
        attrs = attempt_span(built, rec).attributes
        missing = [k for k in CALLBACK_ATTRIBUTES if k not in attrs]
        if missing:
            logged = {"raw_llm_response": rec["response"], "api_base": rec["api_base"]}
            problems.append(f"{rid(rec)}: missing {missing}, the record logs {[logged.get(k) for k in missing]}")
        for k, want in (("litellm_call_id", rec["litellm_call_id"]), ("call_type", rec["call_type"]), ("model", rec["model"])):
            if attrs.get(k) != want:
                problems.append(f"{rid(rec)}: {k}={attrs.get(k)!r}, want {want!r}")
        if attrs.get("request_tags") != rec["request_tags"]:
            problems.append(f"{rid(rec)}: request_tags differ")
    assert not problems, "\n".join(problems)


# --- secrets and redaction ---------------------------------------------------------------

RAW_KEY = "sk-Abc123LiveSecretKey0987654321"


def _marker(secret: str) -> str:
    import hashlib
    import hmac

    return f"[REDACTED:{hmac.new(b'litellm-ingest/scrub/v1', secret.encode(), hashlib.sha256).hexdigest()[:8]}]"


def test_raw_key_in_payload_hash_field_becomes_its_marker() -> None:
    rec = reidentify([CAPTURE[18]])[0]
    rec["metadata"]["user_api_key_hash"] = RAW_KEY
    trace = trace_of([rec])
    for proto, s in zip(trace.spans, spans(trace), strict=True):
        assert RAW_KEY.encode() not in proto.SerializeToString()
        assert not any(RAW_KEY in v for v in all_strings(s))
    assert spans(trace)[0].attributes["user_api_key_hash"] == _marker(RAW_KEY)


def test_a_hex_key_hash_is_kept_as_logged() -> None:
    rec = reidentify([CAPTURE[18]])[0]
    rec["metadata"]["user_api_key_hash"] = "88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b"
    assert spans(trace_of([rec]))[0].attributes["user_api_key_hash"] == rec["metadata"]["user_api_key_hash"]


def test_raw_key_in_spend_logs_api_key_becomes_its_marker() -> None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("make_samples", Path(__file__).resolve().parents[1] / "sample_logs" / "make_samples.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = reidentify([CAPTURE[18]])[0]
    rec["metadata"]["user_api_key_hash"] = RAW_KEY
    row = mod.spend_row(rec, store_prompts=True, naive=True)
    assert row["api_key"] == RAW_KEY
    trace = trace_of([row])
    for proto, s in zip(trace.spans, spans(trace), strict=True):
        assert RAW_KEY.encode() not in proto.SerializeToString()
        assert not any(RAW_KEY in v for v in all_strings(s))
    assert spans(trace)[0].attributes["user_api_key_hash"] == _marker(RAW_KEY)


def _message_texts(rec: dict) -> list[str]:
    out = []
    for m in rec["messages"] or []:
        if isinstance(m.get("content"), str):
            out.append(m["content"])
    return [t for t in out if len(t) >= 4]


def _response_texts(rec: dict) -> list[str]:
    resp = rec["response"] or {}
    out = []
    for c in resp.get("choices") or []:
        msg = c.get("message") or {}
        if isinstance(msg.get("content"), str):
            out.append(msg["content"])
        for tc in msg.get("tool_calls") or []:
            out.append(tc["function"]["arguments"])
    for d in resp.get("data") or []:
        if isinstance(d.get("embedding"), str):
            out.append(d["embedding"])
    return [t for t in out if len(t) >= 4]


@pytest.mark.parametrize("call", list(CALLS))
def test_redaction_removes_messages_and_responses_keeps_usage_and_cost(call: str) -> None:
    recs = CALLS[call]
    trace = trace_of(copy.deepcopy(recs), Redaction(messages=True, responses=True))
    secrets = [t for r in recs for t in _message_texts(r) + _response_texts(r)]
    ss = spans(trace)
    for s in ss:
        strings = all_strings(s)
        leaked = [t for t in secrets if any(t in v for v in strings)]
        assert not leaked, f"{s.name}: {leaked}"
    for rec in recs:
        s = ss[0] if len(ss) == 1 else next(c for c in ss[1:] if c.start_time_ns == ns(rec["startTime"]))
        usage = s.attributes["mlflow.chat.tokenUsage"]
        assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
            rec["prompt_tokens"],
            rec["completion_tokens"],
            rec["total_tokens"],
        )
        assert s.attributes["mlflow.llm.cost"]["total_cost"] == pytest.approx(rec["response_cost"])


def test_redaction_of_a_chat_call_replaces_messages_and_response() -> None:
    rec = next(r for r in CAPTURE if r["model_parameters"].get("tools"))
    (root,) = spans(trace_of([rec], Redaction(messages=True, responses=True)))
    assert root.inputs["messages"] != rec["messages"]
    assert root.outputs != rec["response"]
    assert root.attributes["raw_llm_response"] != rec["response"]
    # what is not message text stays
    assert root.inputs["tools"] == rec["model_parameters"]["tools"]


def test_redaction_of_messages_only_keeps_the_response() -> None:
    rec = CAPTURE[4]
    (root,) = spans(trace_of([rec], Redaction(messages=True)))
    # (the fake upstream echoes the prompt in its answer, so look at the inputs only)
    assert not any(t in v for v in leaves(root.inputs) for t in _message_texts(rec))
    assert root.outputs == rec["response"]


def test_redaction_of_responses_only_keeps_the_messages() -> None:
    rec = CAPTURE[4]
    (root,) = spans(trace_of([rec], Redaction(responses=True)))
    assert not any(t in v for v in all_strings(root) for t in _response_texts(rec))
    assert root.inputs["messages"] == rec["messages"]


def test_no_redaction_by_default_keeps_messages() -> None:
    rec = CAPTURE[4]
    (root,) = spans(trace_of([rec]))
    assert root.inputs["messages"] == rec["messages"]


# --- determinism -------------------------------------------------------------------------


def _serialized(traces: list[BuiltTrace]) -> list[list[bytes]]:
    return [[s.SerializeToString(deterministic=True) for s in t.spans] for t in traces]


def test_identical_input_gives_byte_identical_spans() -> None:
    one = list(build_traces(frame_of(CAPTURE), EXP))
    two = list(build_traces(frame_of(copy.deepcopy(CAPTURE)), EXP))
    assert [t.trace_id for t in one] == [t.trace_id for t in two]
    assert _serialized(one) == _serialized(two)


def _shape(traces: list[BuiltTrace]) -> dict[str, list[tuple]]:
    return {
        t.call_key: [
            (s.trace_id, s.span_id, s.parent_span_id, s.start_time_unix_nano, s.end_time_unix_nano, s.status.code) for s in t.spans
        ]
        for t in traces
    }


def test_input_order_and_redelivery_do_not_change_span_ids_or_times() -> None:
    one = list(build_traces(frame_of(CAPTURE), EXP))
    two = list(build_traces(frame_of(CAPTURE[::-1] + CAPTURE[:10]), EXP))
    assert _shape(two) == _shape(one)


def test_other_experiment_gives_other_trace_ids() -> None:
    a = {t.call_key: t.trace_id for t in build_traces(frame_of(CAPTURE), "1")}
    b = {t.call_key: t.trace_id for t in build_traces(frame_of(CAPTURE), "2")}
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_attribute_encoding_is_byte_identical_to_mlflows_exporter(capture: list[dict]) -> None:
    """Our faster AnyValue encoder writes exactly what MLflow's own OTLP exporter writes."""
    from mlflow.tracing.utils.otlp import _set_otel_proto_anyvalue
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    from ingest.spans import set_any

    samples = [*capture, {"empty_list": [], "empty_dict": {}, "nested": [None, {"x": None, "y": [1.5, True, "s"]}], "t": (1, 2)}]
    for value in samples:
        theirs, ours = AnyValue(), AnyValue()
        _set_otel_proto_anyvalue(theirs, value)
        set_any(ours, value)
        assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    big = AnyValue()
    set_any(big, {"n": 2**70})
    assert big.kvlist_value.values[0].value.string_value == str(2**70)


# --- joining attempts MLflow already holds ----------------------------------------------------


def _held(trace: BuiltTrace) -> list[SpanData]:
    """The trace's spans as MLflow hands them back (decoded from what the sinks send)."""
    return [stored_span(s, trace.data[0].trace_id) for s in spans(trace)]


def _encoded(trace: BuiltTrace) -> list[bytes]:
    return [d.to_otlp().SerializeToString(deterministic=True) for d in trace.data]


def _parts(call: str) -> tuple[list[dict], BuiltTrace]:
    """The call's rows (one frame, so each keeps its line) and the trace of all of them."""
    rows = list(frame_of(CALLS[call]).iter_rows(named=True))
    return rows, build_trace(rows, EXP)


@pytest.mark.parametrize("call", MULTI)
def test_an_attempt_read_after_the_rest_of_its_call_was_written_joins_it_as_one_build_would(call: str) -> None:
    """Whichever attempt comes late (a failed primary after its fallback, a success after its failures),
    the call rebuilt from MLflow's spans and the late attempt is the trace of every attempt, byte for byte."""
    rows, whole = _parts(call)
    for late in range(len(rows)):
        written = build_trace([r for i, r in enumerate(rows) if i != late], EXP)
        trace = build_trace([rows[late]], EXP)
        assert with_stored_attempts(trace, _held(written))
        assert _encoded(trace) == _encoded(whole), f"attempt {late + 1} read late"
        assert (trace.start_us, trace.end_us) == (whole.start_us, whole.end_us)


@pytest.mark.parametrize("call", MULTI[:3] + SINGLE[:3])
def test_a_trace_that_has_every_attempt_mlflow_holds_is_left_as_built(call: str) -> None:
    """A re-run, or a richer copy of attempts already written: nothing to join, the new build goes as it is."""
    rows, whole = _parts(call)
    for held in (whole, *(build_trace([r], EXP) for r in rows)):
        trace = build_trace(rows, EXP)
        assert not with_stored_attempts(trace, _held(held))
        assert _encoded(trace) == _encoded(whole)


def test_a_copy_of_one_attempt_of_a_written_call_rebuilds_the_whole_call_not_its_root() -> None:
    """Before, a re-delivered copy of a fallback's failed primary replaced the call's root with itself."""
    (call,) = [c for c, rs in CALLS.items() if len(rs) == 2 and rs[1]["status"] == "success" and rs[1]["startTime"] < rs[0]["startTime"]]
    rows, whole = _parts(call)
    copy_of_primary = build_trace([rows[0] if rows[0]["status"] == "failure" else rows[1]], EXP)
    assert with_stored_attempts(copy_of_primary, _held(whole))
    assert _encoded(copy_of_primary) == _encoded(whole)
    root = spans(copy_of_primary)[0]
    assert root.status.status_code == SpanStatusCode.OK and root.attributes["attempts"] == 2


def test_a_joined_call_nests_every_attempt_under_the_app_span() -> None:
    """The copy nested into the client's trace is made from the joined spans, not from the late rows alone."""
    from ingest.spans import nested_spans

    rows, whole = _parts(MULTI[0])
    parent = ("ab" * 16, "cd" * 8)
    trace = build_trace(rows[:1], EXP)
    assert with_stored_attempts(trace, _held(build_trace(rows[1:], EXP)))
    trace.parent = whole.parent = parent
    assert [d.to_otlp() for d in nested_spans(trace)] == [d.to_otlp() for d in nested_spans(whole)]
    assert len(nested_spans(trace)) == len(rows) + 1
