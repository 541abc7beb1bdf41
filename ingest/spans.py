"""Build spans: the record-to-trace mapping, the product's contract (README, "The trace").

Input is the deduped canonical frame, sorted by call then attempt start. This is the one place
that walks rows in Python: each record's nested payload (messages, response, parameters) is read
from its raw line here, and turned into encoding-neutral ``SpanData``. The sinks encode it: OTLP
protobuf for a server's ``/v1/traces`` (and for MLflow's own ``log_spans`` via
``Span.from_otel_proto``), or the stored JSON for the bulk SQL writer; tests check that all three
paths store the same thing.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import polars as pl
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as OtlpStatus

from ingest.dedupe import MAX_ATTEMPTS, format_rank
from ingest.ids import attempt_identity, mlflow_trace_id, otel_span_id, otel_trace_id
from ingest.mlflow_names import (
    INFO_SPAN_TYPES,
    MAX_CHARS_IN_TRACE_INFO_METADATA,
    MAX_TRACE_TAG_KEY_LENGTH,
    MAX_TRACE_TAG_VAL_LENGTH,
    SYSTEM_TRACE_TAGS,
    SpanAttributeKey,
    SpanLogLevel,
    SpanType,
    TokenUsageKey,
    TraceTagKey,
    tag_key_refused,
)
from ingest.normalize import loads_lenient
from ingest.scrub import Scrubber, default_scrubber

REDACTED = "[redacted]"
PROMPT_KEYS = ("messages", "input", "prompt")
MAX_CALL_TYPE_IN_NAME = 200
"""Session ids, users and the trace name are cut to what MLflow's columns hold (an over-long one
otherwise makes the store refuse the whole trace)."""
MAX_ATTRIBUTE_DEPTH = 24
"""Objects and arrays nested deeper go into OTLP as their JSON text: protobuf parsers (the server's)
refuse messages nested past 100 levels, and every JSON level is 2-3 protobuf levels."""
TAG_PREFIX = "litellm."
APP_TRACE_TAG = "litellm.app_trace_id"
"""Trace tag on a standalone trace: the client application's own trace of the call (``tr-...``)."""
PROXY_TRACE_ATTRIBUTE = "litellm.proxy_trace_id"
"""Attribute of the proxy span nested in the app's trace: our standalone trace of the call."""

_CHAT = {
    "completion",
    "acompletion",
    "anthropic_messages",
    "aanthropic_messages",
    "responses",
    "aresponses",
    "generate_content",
    "agenerate_content",
    "generate_content_stream",
    "agenerate_content_stream",
}
_TEXT = {"text_completion", "atext_completion"}
_EMBED = {"embedding", "aembedding"}
_RERANK = {"rerank", "arerank"}
_TRANSCRIBE = {"transcription", "atranscription"}
"""LiteLLM logs the audio a client sent as one user message holding the upload's name (a sha256 of
its bytes from the proxy): in the inputs it is the request's ``file``, not something a user said."""
_TOOL = {"call_mcp_tool", "list_mcp_tools"}
"""Operations of the MCP servers behind the proxy's gateway: a tool called, or their tools listed."""
_GUARDRAIL = {"moderation", "amoderation"}
_PASS_THROUGH = {"pass_through_endpoint"}
NO_PROMPT = "default-message-value"
"""What LiteLLM logs as the prompt of a call that has none (an MCP tool call or listing)."""


def span_type(call_type: str) -> str:
    """CHAT_MODEL as MLflow's OpenAI autolog types chat; EMBEDDING for (a)embedding (LiteLLM's callback says LLM);
    TOOL for what the proxy's MCP gateway asked its servers (a tool run, their tools listed: no
    model ran); GUARDRAIL for a moderation check."""
    if call_type in _CHAT:
        return SpanType.CHAT_MODEL
    if call_type in _EMBED:
        return SpanType.EMBEDDING
    if call_type in _RERANK:
        return SpanType.RERANKER
    if call_type in _TOOL:
        return SpanType.TOOL
    if call_type in _GUARDRAIL:
        return SpanType.GUARDRAIL
    return SpanType.LLM


@dataclass(frozen=True)
class Redaction:
    """What not to copy into MLflow: prompts ("messages"), completions ("responses"), or both."""

    messages: bool = False
    responses: bool = False

    @classmethod
    def parse(cls, value: str | None) -> Redaction:
        if not value:
            return cls()
        return cls(messages=value in ("messages", "all"), responses=value in ("responses", "all"))


@dataclass(slots=True)
class SpanData:
    """One span before encoding: the server sink turns it into OTLP protobuf (``to_otlp``), the
    bulk SQL writer into the JSON MLflow stores. Attributes hold plain values; None is left out."""

    trace_id: bytes
    span_id: bytes
    parent_id: bytes | None
    name: str
    start_us: int
    end_us: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    error: str | None = None

    def to_otlp(self) -> OtlpSpan:
        s = OtlpSpan(
            trace_id=self.trace_id,
            span_id=self.span_id,
            name=self.name,
            start_time_unix_nano=self.start_us * 1000,
            end_time_unix_nano=self.end_us * 1000,
        )
        s.kind = OtlpSpan.SPAN_KIND_CLIENT
        if self.parent_id:
            s.parent_span_id = self.parent_id
        _add_attributes(s.attributes, self.attributes)
        if self.error is None:
            s.status.code = OtlpStatus.STATUS_CODE_OK
        else:
            s.status.code = OtlpStatus.STATUS_CODE_ERROR
            s.status.message = self.error
        for name, time_ns, attrs in self.events:
            _add_attributes(s.events.add(name=name, time_unix_nano=time_ns).attributes, attrs)
        return s


@dataclass
class BuiltTrace:
    call_key: str
    trace_id: str
    data: list[SpanData]
    records: int
    start_us: int
    end_us: int
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    parent: tuple[str, str] | None = None
    """The client's trace context from its ``traceparent`` (32-hex trace id, 16-hex span id), if any."""
    _otlp: list[OtlpSpan] | None = field(default=None, repr=False)
    derived: Any = field(default=None, repr=False)
    """The rows the bulk writer inserts for this trace, when a backfill worker derived them already."""
    restore: Callable[[], BuiltTrace] | None = field(default=None, repr=False, compare=False)
    """Builds this trace again, spans and records, for a :meth:`slim` one that needs them after all."""
    joined: bool = False
    """Rebuilt with attempts of its call that MLflow already held (:func:`with_stored_attempts`)."""
    excess: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """Records of attempts a join left out, past the ``MAX_ATTEMPTS`` a call keeps."""

    @property
    def app_trace_id(self) -> str | None:
        """The MLflow id of the client application's own trace of this call."""
        return None if self.parent is None else "tr-" + self.parent[0]

    @property
    def spans(self) -> list[OtlpSpan]:
        """The spans as OTLP protobuf (built on first use)."""
        if self._otlp is None:
            self._otlp = [d.to_otlp() for d in self.whole().data]
        return self._otlp

    @property
    def span_count(self) -> int:
        return len(self.data) if self.data or self.derived is None else len(self.derived.spans)

    def slim(self, derived: Any) -> BuiltTrace:
        """This trace as the bulk writer's rows only, for a backfill worker to send back: spans and
        records are most of its size, and unpickling them cost the writing process more than
        inserting. The writer restores them (:meth:`whole`) only on the rare paths that need them:
        a trace the store already holds, or one it refuses."""
        return replace(self, data=[], rows=[], derived=derived, _otlp=None)

    def whole(self) -> BuiltTrace:
        """This trace with its spans and records (restored if it was sent :meth:`slim`)."""
        if not self.data and self.derived is not None:
            if self.restore is None:
                raise RuntimeError(f"trace {self.trace_id} was sent without its spans and cannot be built again here")
            again = self.restore()
            self.data, self.rows, self.restore = again.data, again.rows, None
        return self


def _json_value(value: Any) -> Any:
    """SpendLogs keeps JSON columns as JSON text; decode it, and treat ``{}``/``""`` as absent."""
    if isinstance(value, str):
        try:
            value = loads_lenient(value)
        except (ValueError, RecursionError):
            return value or None
    return value if value not in ({}, [], "", None) else None


def _logged_json(value: Any) -> Any:
    """A JSON column as logged (JSON text decoded), ``{}`` for nothing, as LiteLLM's callback shows it."""
    if isinstance(value, str):
        try:
            return loads_lenient(value)
        except (ValueError, RecursionError):
            return value
    return {} if value is None else value


def _text_of(value: Any, shape: type) -> Any:
    """``value`` decoded when it is JSON text of ``shape``, as other tools (and SpendLogs exports) write
    a payload's objects and lists; anything else, JSON text of another shape included, as it is."""
    if type(value) is not str or value.lstrip()[:1] not in ("{", "["):
        return value
    try:
        decoded = loads_lenient(value)
    except (ValueError, RecursionError):
        return value
    return decoded if isinstance(decoded, shape) else value


def _contents(messages: Any) -> Any:
    """Embedding/text inputs are logged as user messages; give back what the client sent."""
    if isinstance(messages, list) and all(isinstance(m, dict) and "content" in m for m in messages):
        items = [m["content"] for m in messages]
        return items[0] if len(items) == 1 else items
    return messages


def _body_of(messages: Any) -> dict[str, Any] | None:
    """A pass-through call's request body: LiteLLM logs it as the JSON text of one user message. As
    the inputs, MLflow reads a chat request's messages from it as from a chat call's."""
    if isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict):
        body = _text_of(messages[0].get("content"), dict)
        if isinstance(body, dict):
            return body
    return None


def _mcp_call(payload: dict[str, Any]) -> dict[str, Any] | None:
    """An MCP tool call's request as MCP's ``tools/call`` names it (tool and arguments), from the
    ``mcp_tool_call_metadata`` LiteLLM keeps in the metadata (its logged prompt is a placeholder)."""
    md = _text_of(payload.get("metadata"), dict)
    call = md.get("mcp_tool_call_metadata") if isinstance(md, dict) else None
    if not isinstance(call, dict) or not call.get("name"):
        return None
    return {"name": call.get("namespaced_tool_name") or call["name"], "arguments": call.get("arguments")}


@dataclass
class _Attempt:
    row: dict[str, Any]
    payload: dict[str, Any]
    inputs: dict[str, Any] | None
    outputs: Any
    params: dict[str, Any]
    raw_response: Any

    @functools.cached_property
    def stream(self) -> bool:
        """Streamed: the request's flag, else LiteLLM's (a failure's is null). The request's comes
        first: LiteLLM 1.60 to 1.72 logged ``stream: true`` for every chat success, streamed or not. A
        SpendLogs row has no flag, and the request only where the proxy stores prompts; without it,
        a first token before the end says so (LiteLLM stamps a whole answer's with its end)."""
        r = self.row
        if isinstance(self.params.get("stream"), bool):
            return self.params["stream"]
        if r["stream"]:
            return True
        return r["format"] == "spend_logs" and "stream" not in self.params and (r["first_token_us"] or r["end_us"]) < r["end_us"]

    @functools.cached_property
    def first_token_us(self) -> int | None:
        """When a streamed answer's first token came; none for a failure LiteLLM stamps with its end."""
        r = self.row
        first = r["first_token_us"]
        if not self.stream or not first or first > r["end_us"] or (first == r["end_us"] and r["status"] != "success"):
            return None
        return first


def _attempt(row: dict[str, Any], redact: Redaction) -> _Attempt:
    """One record's span content. Nested fields may hold any JSON shape: one that is not what LiteLLM
    writes is left out (model_parameters) or passed on as it is (messages, response)."""
    payload = loads_lenient(row["raw"])
    params: dict[str, Any] = {}
    request: dict[str, Any] | None = None
    if row["format"] == "standard_logging_payload":
        mp = payload.get("model_parameters")
        params = mp if isinstance(mp, dict) else {}
        messages = _text_of(payload.get("messages"), list)
    else:
        request = _json_value(payload.get("proxy_server_request"))
        request = request if isinstance(request, dict) else None
        messages = _json_value(payload.get("messages"))
        if request:
            params = {k: v for k, v in request.items() if k not in ("messages", "input", "prompt", "model")}
            messages = messages or request.get("messages") or request.get("input") or request.get("prompt")
    kind = row["call_type"]
    if messages == [{"role": "user", "content": NO_PROMPT}]:
        messages = None
    inputs: dict[str, Any] = {"model": row["model_group"] or row["model"]}
    if kind in _PASS_THROUGH and not redact.messages and (body := _body_of(messages)) is not None:
        inputs, messages = {**inputs, **body}, None
    if messages is not None or redact.messages:  # no prompt logged: a null under its key was the whole request preview
        if kind in _EMBED:
            inputs["input"] = _contents(messages)
        elif kind in _TEXT:
            inputs["prompt"] = _contents(messages)
        elif kind in _TRANSCRIBE and not redact.messages:
            inputs["file"] = _contents(messages)
        else:
            inputs["messages"] = messages
    inputs.update({k: v for k, v in params.items() if v is not None})
    if row["end_user"] and "user" not in inputs:
        inputs["user"] = row["end_user"]
    outputs = _json_value(payload.get("response")) if row["status"] == "success" else None
    if kind in _PASS_THROUGH and isinstance(outputs, dict) and list(outputs) == ["response"]:
        outputs = _text_of(outputs["response"], dict)
    if kind == "call_mcp_tool" and (call := _mcp_call(payload)) is not None:
        inputs = {**call, "arguments": REDACTED} if redact.messages else call
    elif redact.messages:
        inputs = _redacted_prompt(inputs)
    raw_response = _logged_json(payload.get("response"))
    if redact.responses:
        outputs = REDACTED if outputs is not None else None
        raw_response = REDACTED
    return _Attempt(row, payload, inputs, outputs, params, raw_response)


def _redacted_prompt(inputs: dict[str, Any]) -> dict[str, Any]:
    """The prompt as one user message saying ``[redacted]``: MLflow's request preview then shows just
    that (from any other shape it shows the whole inputs, parameters included). A text completion's
    ``prompt`` becomes ``messages``, the one key the preview reads for it."""
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        if k in PROMPT_KEYS:
            out["messages" if k == "prompt" else k] = [{"role": "user", "content": REDACTED}]
        else:
            out[k] = v
    return out


def set_any(av: AnyValue, value: Any, depth: int = 0) -> None:
    """Fill an OTLP AnyValue in place, byte-for-byte what MLflow's own exporter writes, but without its
    copy per nesting level (2-3x faster on LiteLLM payloads). Integers beyond int64 become text
    instead of failing the record, and so do objects nested past ``MAX_ATTRIBUTE_DEPTH``."""
    t = type(value)
    if value is None:
        return
    if t is str:
        try:
            av.string_value = value
        except (UnicodeEncodeError, ValueError):
            av.string_value = value.encode("utf-8", errors="replace").decode("utf-8")
    elif t is bool:
        av.bool_value = value
    elif t is int:
        try:
            av.int_value = value
        except ValueError:
            av.string_value = str(value)
    elif t is float:
        av.double_value = value
    elif (t is dict or t is list or t is tuple) and depth >= MAX_ATTRIBUTE_DEPTH:
        av.string_value = json.dumps(value, ensure_ascii=False, default=str)
    elif t is dict:
        kvl = av.kvlist_value
        kvl.SetInParent()
        add = kvl.values.add
        for k, v in value.items():
            set_any(add(key=k if type(k) is str else str(k)).value, v, depth + 1)
    elif t is list or t is tuple:
        arr = av.array_value
        arr.SetInParent()
        add = arr.values.add
        for x in value:
            set_any(add(), x, depth + 1)
    else:
        av.string_value = str(value)


def _add_attributes(target: Any, attrs: dict[str, Any]) -> None:
    """Append ``attrs`` (None values skipped) to a span's or an event's repeated attributes."""
    for key, value in attrs.items():
        if value is not None:
            set_any(target.add(key=key).value, value)


def _token_usage(a: _Attempt) -> dict[str, int] | None:
    r = a.row
    if r["prompt_tokens"] is None and r["completion_tokens"] is None and r["total_tokens"] is None:
        return None
    usage = {
        "input_tokens": r["prompt_tokens"] or 0,
        "output_tokens": r["completion_tokens"] or 0,
        "total_tokens": r["total_tokens"] if r["total_tokens"] is not None else (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0),
    }
    logged = _usage_logged(a)
    details = logged.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    for key, places in _CACHE_TOKENS.items():
        for in_details, name in places:
            if _count(v := (details if in_details else logged).get(name)):
                usage[key] = v
                break
    return usage


_CACHE_TOKENS = {
    TokenUsageKey.CACHE_READ_INPUT_TOKENS: ((True, "cached_tokens"), (False, "cache_read_input_tokens")),
    TokenUsageKey.CACHE_CREATION_INPUT_TOKENS: ((False, "cache_creation_input_tokens"), (True, "cache_creation_tokens")),
}
"""Prompt-cache counts, where LiteLLM's ``Usage`` puts them: OpenAI's in ``prompt_tokens_details``
(True), Anthropic's also at the top of the usage (False)."""


def _count(v: Any) -> bool:
    return type(v) is int and 0 < v < 2**63


def _usage_logged(a: _Attempt) -> dict[str, Any]:
    """The provider's usage as logged: the response's, or (a SpendLogs row of a proxy that stores no
    responses, ``'{}'``) the copy LiteLLM keeps in ``metadata.usage_object``."""
    response = _json_value(a.payload.get("response"))
    if isinstance(response, dict) and isinstance(response.get("usage"), dict):
        return response["usage"]
    md = _json_value(a.payload.get("metadata"))
    usage = md.get("usage_object") if isinstance(md, dict) else None
    return usage if isinstance(usage, dict) else {}


def _cost_breakdown(a: _Attempt) -> dict[str, Any] | None:
    cb = a.payload.get("cost_breakdown")
    if cb is None and a.row["format"] != "standard_logging_payload":
        md = _json_value(a.payload.get("metadata"))
        cb = md.get("cost_breakdown") if isinstance(md, dict) else None
    return cb if isinstance(cb, dict) else None


def _llm_cost(a: _Attempt, breakdown: dict[str, Any] | None) -> dict[str, float] | None:
    if a.row["cost"] is None:
        return None
    cost = {"total_cost": float(a.row["cost"])}
    for k in ("input_cost", "output_cost"):
        if breakdown and type(v := breakdown.get(k)) in (int, float) and math.isfinite(v):
            cost[k] = float(v)
    return cost


def _headers(a: _Attempt) -> dict[str, Any]:
    hp = _text_of(a.payload.get("hidden_params"), dict)
    headers = hp.get("additional_headers") if isinstance(hp, dict) else None
    return headers if isinstance(headers, dict) else {}


def _provider_model(row: dict[str, Any]) -> str | None:
    model, provider = row["model"], row["provider"]
    if model and provider and model.startswith(provider + "/"):
        return model[len(provider) + 1 :]
    return model


def _tools(a: _Attempt) -> list[Any] | None:
    tools = a.params.get("tools")
    return tools if isinstance(tools, list) and tools else None


def _call_attributes(a: _Attempt, scrub: Scrubber) -> dict[str, Any]:
    """What LiteLLM's own mlflow callback puts on its span, plus what it leaves out."""
    r = a.row
    breakdown = _cost_breakdown(a)
    headers = _headers(a)
    ttft_ms = (first - r["start_us"]) / 1000 if (first := a.first_token_us) is not None else None
    return {
        "litellm_call_id": r["litellm_call_id"] or r["call_key"],
        "call_type": r["call_type"],
        "model": r["model"],
        "api_base": r["api_base"] or "",
        "cache_hit": r["cache_hit"],
        "response_cost": r["cost"],
        "saved_cache_cost": r["saved_cache_cost"],
        "request_tags": [tag for _, _, tag in scrubbed_tags(r["request_tags"], scrub)],
        "raw_llm_response": a.raw_response,
        "model_group": r["model_group"],
        "model_id": r["model_id"],
        "custom_llm_provider": r["provider"],
        "status": r["status"],
        "stream": a.stream,
        "request_id": r["request_id"],
        "litellm_trace_id": r["litellm_trace_id"],
        "end_user": r["end_user"],
        "user_api_key_user_id": r["key_user_id"],
        "user_api_key_alias": r["key_alias"],
        "user_api_key_hash": r["key_hash"],
        "team": r["team"],
        "cost_breakdown": breakdown,
        "attempted_retries": headers.get("x-litellm-attempted-retries"),
        "attempted_fallbacks": headers.get("x-litellm-attempted-fallbacks"),
        "duration_ms": (r["end_us"] - r["start_us"]) / 1000,
        "time_to_first_token_ms": ttft_ms,
        "error_class": r["error_class"],
        "error_code": r["error_code"],
        "litellm.log_source": f"{r['source']}:{r['line_no']}",
        "litellm.log_format": r["format"],
        SpanAttributeKey.CHAT_USAGE: _token_usage(a),
        SpanAttributeKey.LLM_COST: _llm_cost(a, breakdown),
        SpanAttributeKey.MODEL: _provider_model(r),
        SpanAttributeKey.MODEL_PROVIDER: r["provider"],
    }


def _io_attributes(a: _Attempt, outputs: Any) -> dict[str, Any]:
    kind = a.row["call_type"]
    chat = kind in _CHAT or kind in _TEXT
    return {
        SpanAttributeKey.SPAN_TYPE: span_type(kind),
        SpanAttributeKey.INPUTS: a.inputs,
        SpanAttributeKey.OUTPUTS: outputs,
        SpanAttributeKey.MESSAGE_FORMAT: "openai" if chat else None,
        SpanAttributeKey.CHAT_TOOLS: _tools(a) if chat else None,
    }


def _status_message(r: dict[str, Any]) -> str:
    message = r["error_message"] or r["status"]
    if r["error_class"] and r["error_class"] not in message:
        return f"{r['error_class']}: {message}"
    return message


def _status_and_events(span: SpanData, a: _Attempt) -> None:
    r = a.row
    if r["status"] != "success":
        message = _status_message(r)
        span.error = message
        err = a.payload.get("error_information") if isinstance(a.payload.get("error_information"), dict) else {}
        exception = {
            "exception.type": r["error_class"] or "Exception",
            "exception.message": message,
            "exception.stacktrace": err.get("traceback") or None,
            "error_code": r["error_code"],
            "llm_provider": err.get("llm_provider") or None,
        }
        span.events.append(("exception", r["end_us"] * 1000, exception))
    if (first := a.first_token_us) is not None:
        span.events.append(("first_token", first * 1000, {"time_to_first_token_ms": (first - r["start_us"]) / 1000}))


_TAG_BAD_CHARS = re.compile(r"[^/\w.\- :]")


@functools.lru_cache(maxsize=4096)
def _tag_key(key: str) -> str | None:
    """A tag key MLflow accepts (bad characters replaced), or None (also for a tag MLflow sets
    itself); checked once per distinct key."""
    key = _TAG_BAD_CHARS.sub("_", key.strip())[:MAX_TRACE_TAG_KEY_LENGTH] or "_"
    return None if key in SYSTEM_TRACE_TAGS or tag_key_refused(key) else key


def _tag(key: str, value: str) -> tuple[str, str] | None:
    valid = _tag_key(key)
    return None if valid is None else (valid, value[:MAX_TRACE_TAG_VAL_LENGTH])


def scrubbed_tags(tags: list[str] | None, scrub: Scrubber) -> Iterator[tuple[str, str, str]]:
    """(key, value, tag) of each ``k:v`` request tag (:meth:`Scrubber.tag`). A tag that is not text
    (a client's ``null``) is no tag."""
    for t in tags or []:
        if type(t) is str:
            yield scrub.tag(t)


def trace_tags(rows: list[dict[str, Any]], scrub: Scrubber | None = None) -> dict[str, str]:
    """request_tags ``k:v`` -> tag k=v (repeated keys keep every value, joined by ", "), plus filterable litellm.* tags.

    ``rows`` are in the order the attempts ended: the last one is the call's outcome. A tag is
    scrubbed (:func:`scrubbed_tags`) before its key is made valid: the marker in a key reads
    ``_REDACTED:<fingerprint>_``.
    """
    scrub = scrub or default_scrubber()
    values: dict[str, list[str]] = {}
    for r in rows:
        for k, v, _ in scrubbed_tags(r["request_tags"], scrub):
            bucket = values.setdefault(k, [])
            if v not in bucket:
                bucket.append(v)
    tags = {k: ", ".join(v for v in vs if v) if any(vs) else "" for k, vs in values.items()}
    final = rows[-1]
    tags.update(
        {
            f"{TAG_PREFIX}call_id": final["litellm_call_id"] or final["call_key"],
            f"{TAG_PREFIX}call_type": final["call_type"],
            f"{TAG_PREFIX}model": final["model"],
            f"{TAG_PREFIX}model_group": final["model_group"],
            f"{TAG_PREFIX}provider": final["provider"],
            f"{TAG_PREFIX}status": final["status"],
            f"{TAG_PREFIX}cache_hit": str(bool(final["cache_hit"])).lower(),
            f"{TAG_PREFIX}key_alias": final["key_alias"],
            f"{TAG_PREFIX}team": final["team"],
            f"{TAG_PREFIX}attempts": str(len(rows)) if len(rows) > 1 else None,
        }
    )
    out = {}
    for k, v in tags.items():
        if v is None:
            continue
        if (kv := _tag(k, scrub.field(k, v))) is not None:
            out[kv[0]] = kv[1]
    return out


def build_trace(
    rows: list[dict[str, Any]], experiment_id: str, redact: Redaction = Redaction(), scrub: Scrubber | None = None
) -> BuiltTrace:
    """One call (its deduped records) -> its spans, every string in them scrubbed of credentials.

    Attempts are numbered in the order they ran, by end time: LiteLLM stamps a fallback's success
    with the request's start, so by start it would come before the failed primary it followed.
    Values that are cut to a length are scrubbed before the cut (a marker is longer than a short
    key), the rest in one pass over the finished spans, which every sink encodes from.
    """
    scrub = scrub or default_scrubber()
    attempts = sorted((_attempt(r, redact) for r in rows), key=lambda a: (a.row["end_us"], a.row["start_us"]))
    first, final = attempts[0], attempts[-1]
    call_key = rows[0]["call_key"]
    tid = otel_trace_id(experiment_id, call_key)
    root_id = otel_span_id(tid, "root")
    name = f"litellm-{scrub.text(final.row['call_type'])[:MAX_CALL_TYPE_IN_NAME]}"
    start_us = min(r["start_us"] for r in rows)
    end_us = max(r["end_us"] for r in rows)
    root = SpanData(tid, root_id, None, name, start_us, end_us)
    by_end = sorted(rows, key=lambda r: (r["end_us"], r["start_us"]))
    parent = next(((r["parent_trace_id"], r["parent_span_id"]) for r in reversed(by_end) if r.get("parent_trace_id")), None)
    session = next((scrub.text(r["session"])[:MAX_CHARS_IN_TRACE_INFO_METADATA] for r in reversed(by_end) if r["session"]), None)
    user = next((scrub.text(r["user"])[:MAX_TRACE_TAG_VAL_LENGTH] for r in reversed(by_end) if r["user"]), None)
    root_attrs: dict[str, Any] = {
        SpanAttributeKey.SESSION_ID: session,
        SpanAttributeKey.USER_ID: user,
        **{SpanAttributeKey.TRACE_TAG_PREFIX + k: v for k, v in trace_tags(by_end, scrub).items()},
        SpanAttributeKey.TRACE_TAG_PREFIX + TraceTagKey.TRACE_NAME: name,
        SpanAttributeKey.TRACE_TAG_PREFIX + APP_TRACE_TAG: None if parent is None else "tr-" + parent[0],
    }
    if len(attempts) == 1:
        root.attributes = {**_io_attributes(first, first.outputs), **_call_attributes(first, scrub), **root_attrs}
        _status_and_events(root, first)
        spans = [root]
    else:
        spans = _joined(root, [_attempt_span(tid, a, scrub) for a in attempts], root_attrs)
    for span in spans:
        _set_log_level(span)
    scrub.spans(spans)
    return BuiltTrace(call_key, mlflow_trace_id(tid), spans, len(rows), start_us, end_us, rows, parent)


def _set_log_level(span: SpanData) -> None:
    """The level MLflow gives a span it finishes: ERROR for one that failed, else by its type (INFO for
    a model call). Its UI hides spans below the level a user picks, and one without a level counts as
    DEBUG: at INFO a call's only span vanished. A failed call's root is ERROR too, not only its attempt."""
    if span.error is not None:
        level = SpanLogLevel.ERROR
    else:
        level = SpanLogLevel.INFO if span.attributes.get(SpanAttributeKey.SPAN_TYPE) in INFO_SPAN_TYPES else SpanLogLevel.DEBUG
    span.attributes.pop(SpanAttributeKey.LOG_LEVEL, None)  # last, as one build puts it: a rebuilt call is stored byte for byte
    span.attributes[SpanAttributeKey.LOG_LEVEL] = level


def _attempt_span(tid: bytes, a: _Attempt, scrub: Scrubber) -> SpanData:
    """One attempt as a child span, before it is numbered and put under the root (:func:`_joined`)."""
    r = a.row
    span = SpanData(tid, otel_span_id(tid, attempt_identity(r["start_us"], r["status"])), None, "", r["start_us"], r["end_us"])
    span.attributes = {**_io_attributes(a, a.outputs), **_call_attributes(a, scrub)}
    _status_and_events(span, a)
    return span


def _joined(root: SpanData, attempts: list[SpanData], root_attrs: dict[str, Any]) -> list[SpanData]:
    """A call of several attempts (in the order they ran): the root sums them up from their spans
    alone, so attempts read back from MLflow join new ones the same way (:func:`with_stored_attempts`)."""
    first, final = attempts[0].attributes, attempts[-1].attributes
    costs = [a.attributes.get("response_cost") for a in attempts]
    costs = [c for c in costs if c is not None]
    root.attributes = {
        SpanAttributeKey.SPAN_TYPE: final.get(SpanAttributeKey.SPAN_TYPE),
        SpanAttributeKey.INPUTS: first.get(SpanAttributeKey.INPUTS),
        SpanAttributeKey.OUTPUTS: final.get(SpanAttributeKey.OUTPUTS),
        SpanAttributeKey.MESSAGE_FORMAT: first.get(SpanAttributeKey.MESSAGE_FORMAT),
        SpanAttributeKey.CHAT_TOOLS: first.get(SpanAttributeKey.CHAT_TOOLS),
        SpanAttributeKey.MODEL: final.get(SpanAttributeKey.MODEL),
        SpanAttributeKey.MODEL_PROVIDER: final.get(SpanAttributeKey.MODEL_PROVIDER),
        **{k: final.get(k) for k in ("litellm_call_id", "call_type", "model", "model_group", "status")},
        "attempts": len(attempts),
        "response_cost": sum(costs) if costs else None,
        "request_tags": final.get("request_tags") or [],
        **root_attrs,
    }
    root.error = attempts[-1].error
    for n, span in enumerate(attempts, start=1):
        span.parent_id = root.span_id
        span.name = f"{root.name} attempt {n}"
        span.attributes = {**span.attributes, "attempt": n}
    return [root, *attempts]


_PROXY_SPAN_KEYS = frozenset(
    {
        SpanAttributeKey.SPAN_TYPE,
        SpanAttributeKey.LOG_LEVEL,
        SpanAttributeKey.INPUTS,
        SpanAttributeKey.OUTPUTS,
        SpanAttributeKey.MESSAGE_FORMAT,
        SpanAttributeKey.MODEL,
        SpanAttributeKey.MODEL_PROVIDER,
        "litellm_call_id",
        "call_type",
        "model",
        "model_group",
        "status",
        "attempts",
        "response_cost",
        "request_tags",
    }
)
_TRACE_LEVEL_KEYS = (SpanAttributeKey.SESSION_ID, SpanAttributeKey.USER_ID, SpanAttributeKey.TRACE_TAG_PREFIX)
"""What sets the fields of the trace a span is in: the app's trace keeps its own."""


def nested_spans(trace: BuiltTrace) -> list[SpanData]:
    """The call as spans of the client's own trace: one proxy span, child of the ``traceparent``
    span and covering the call, and under it one span per attempt with what the standalone trace's
    attempt carries, minus anything that sets trace-level fields (session, user, tags).

    Ids hash the client's trace id with the call and the attempt (not our experiment): however many
    runs or ingesters write a call, its spans in the app's trace are the same spans."""
    assert trace.parent is not None
    tid, parent_id = bytes.fromhex(trace.parent[0]), bytes.fromhex(trace.parent[1])
    root = trace.data[0]
    attempts = trace.data[1:] or [root]
    proxy_id = otel_span_id(tid, f"proxy:{trace.call_key}")
    proxy = SpanData(tid, proxy_id, parent_id, root.name, trace.start_us, trace.end_us, error=root.error)
    proxy.attributes = {k: v for k, v in root.attributes.items() if k in _PROXY_SPAN_KEYS}
    proxy.attributes.setdefault("attempts", len(attempts))
    proxy.attributes[PROXY_TRACE_ATTRIBUTE] = trace.trace_id
    out = [proxy]
    for n, span in enumerate(attempts, start=1):
        identity = f"proxy:{trace.call_key}:{_identity(span)}"
        name = f"{root.name} attempt {n}"
        child = SpanData(tid, otel_span_id(tid, identity), proxy_id, name, span.start_us, span.end_us, error=span.error)
        child.attributes = {k: v for k, v in span.attributes.items() if not k.startswith(_TRACE_LEVEL_KEYS)}
        child.attributes["attempt"] = n
        child.events = list(span.events)
        out.append(child)
    return out


def _identity(attempt: SpanData) -> str:
    """An attempt span's identity, from what the span itself carries (also when read back from MLflow)."""
    return attempt_identity(attempt.start_us, str(attempt.attributes.get("status")))


def stored_span(span: Any, trace_id: bytes) -> SpanData:
    """A span MLflow holds (``mlflow.entities.Span``) as ``SpanData``, as it would be sent again."""
    attributes = {k: v for k, v in span.attributes.items() if k != SpanAttributeKey.REQUEST_ID}
    events = [(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events]
    error = (span.status.description or "ERROR") if span.status.status_code.value == "ERROR" else None
    parent = bytes.fromhex(span.parent_id) if span.parent_id else None
    start_us, end_us = span.start_time_ns // 1000, (span.end_time_ns or span.start_time_ns) // 1000
    return SpanData(trace_id, bytes.fromhex(span.span_id), parent, span.name, start_us, end_us, attributes, events, error)


def _attempts_of(spans: list[SpanData], root_id: bytes) -> tuple[SpanData, list[SpanData]]:
    """(root, attempts) of one standalone trace, each attempt as an unnumbered span with no parent:
    the root's children (their ids hash their identity already), or the root itself when it is the
    call's only attempt, under the id its identity hashes to."""
    root = next(s for s in spans if s.span_id == root_id)
    children = [s for s in spans if s.parent_id == root_id]
    if not children:
        attrs = {k: v for k, v in root.attributes.items() if not k.startswith(_TRACE_LEVEL_KEYS)}
        return root, [replace(root, span_id=otel_span_id(root.trace_id, _identity(root)), attributes=attrs, events=list(root.events))]
    return root, [
        replace(c, parent_id=None, attributes={k: v for k, v in c.attributes.items() if k != "attempt"}, events=list(c.events))
        for c in children
    ]


def _with_attempts_tag(trace_level: dict[str, Any], attempts: int) -> dict[str, Any]:
    """The root's trace-level attributes with the attempts tag where ``build_trace`` puts it (before
    the trace name), so a joined call is stored byte for byte as one run over all its attempts stores it."""
    key, before = SpanAttributeKey.TRACE_TAG_PREFIX + f"{TAG_PREFIX}attempts", SpanAttributeKey.TRACE_TAG_PREFIX + TraceTagKey.TRACE_NAME
    out: dict[str, Any] = {}
    for k, v in trace_level.items():
        if k == before:
            out[key] = str(attempts)
        if k != key:
            out[k] = v
    out.setdefault(key, str(attempts))
    return out


def with_stored_attempts(trace: BuiltTrace, stored: list[SpanData]) -> bool:
    """Join a call's attempts that MLflow already holds (written by an earlier run) to the ones being
    written, so that an attempt read late (an older archive backfilled after today's file) adds its
    span instead of replacing the call's root with itself. True when ``trace`` was rebuilt.

    An attempt in both keeps the richer copy (a payload record's over a SpendLogs row's: a spend
    export read after the payload logs must not blank the prompt MLflow has), the new one if equal.
    The trace-level fields (session, user, tags, name) are those of the side holding the call's
    final attempt, the other side's filling gaps."""
    data = trace.whole().data
    tid, root_id = data[0].trace_id, data[0].span_id
    if not any(s.span_id == root_id for s in stored):
        return False
    new_root, new = _attempts_of(data, root_id)
    old_root, old = _attempts_of(stored, root_id)
    rank = {a.span_id: format_rank(a.attributes.get("litellm.log_format")) for a in new}
    missing = [a for a in old if a.span_id not in rank or format_rank(a.attributes.get("litellm.log_format")) < rank[a.span_id]]
    if not missing:
        return False
    kept = {a.span_id for a in missing}
    attempts = sorted([a for a in new if a.span_id not in kept] + missing, key=lambda a: (a.end_us, a.start_us))
    if len(attempts) > MAX_ATTEMPTS:  # an id reused: each join read back and rewrote a trace that only grew
        left = {a.span_id for a in attempts[MAX_ATTEMPTS:]}
        attempts = attempts[:MAX_ATTEMPTS]
        trace.excess = [r for r in trace.rows if otel_span_id(tid, attempt_identity(r["start_us"], r["status"])) in left]
    if len(attempts) == 1:
        trace.data = [old_root]
        _set_log_level(old_root)
        trace.start_us, trace.end_us = old_root.start_us, old_root.end_us
        trace._otlp, trace.derived, trace.joined = None, None, True
        return True
    last, other = (old_root, new_root) if any(attempts[-1] is a for a in missing) else (new_root, old_root)
    trace_level = [{k: v for k, v in r.attributes.items() if k.startswith(_TRACE_LEVEL_KEYS) and v is not None} for r in (last, other)]
    root_attrs = _with_attempts_tag(trace_level[1] | trace_level[0], len(attempts))
    root = SpanData(tid, root_id, None, last.name, min(a.start_us for a in attempts), max(a.end_us for a in attempts))
    trace.data = _joined(root, attempts, root_attrs)
    for span in trace.data:
        _set_log_level(span)
    trace.start_us, trace.end_us = root.start_us, root.end_us
    trace._otlp, trace.derived, trace.joined = None, None, True
    return True


def group_calls(frame: pl.DataFrame) -> Iterator[list[dict[str, Any]]]:
    """Consecutive rows of one call (the frame is sorted by call, then attempt start)."""
    batch: list[dict[str, Any]] = []
    for row in frame.iter_rows(named=True):
        if batch and row["call_key"] != batch[0]["call_key"]:
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def build_traces(
    frame: pl.DataFrame, experiment_id: str, redact: Redaction = Redaction(), scrub: Scrubber | None = None
) -> Iterable[BuiltTrace]:
    for rows in group_calls(frame):
        yield build_trace(rows, experiment_id, redact, scrub)
