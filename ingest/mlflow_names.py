"""The names MLflow reads from a trace (span attributes, tags, metadata keys, span types, limits), as
its stores keep them: a wire format, fixed once traces carry it; and the rule its stores check a
trace tag's key by.

Copied from ``mlflow.tracing.constant`` and friends rather than imported, because importing any part
of MLflow runs its whole ``__init__`` (1.3 s and about 230 MB here): a cron run that finds nothing
new must not pay that (:mod:`ingest.idle`). ``tests/test_mlflow_names.py`` checks every name against
the MLflow installed, so a rename there fails the suite instead of misplacing data.
"""

from __future__ import annotations

import posixpath
import re
from typing import Final


class SpanType:
    CHAT_MODEL: Final = "CHAT_MODEL"
    EMBEDDING: Final = "EMBEDDING"
    GUARDRAIL: Final = "GUARDRAIL"
    LLM: Final = "LLM"
    RERANKER: Final = "RERANKER"
    TOOL: Final = "TOOL"
    UNKNOWN: Final = "UNKNOWN"


class SpanAttributeKey:
    CHAT_TOOLS: Final = "mlflow.chat.tools"
    CHAT_USAGE: Final = "mlflow.chat.tokenUsage"
    INPUTS: Final = "mlflow.spanInputs"
    LLM_COST: Final = "mlflow.llm.cost"
    LOG_LEVEL: Final = "mlflow.spanLogLevel"
    MESSAGE_FORMAT: Final = "mlflow.message.format"
    MODEL: Final = "mlflow.llm.model"
    MODEL_PROVIDER: Final = "mlflow.llm.provider"
    OUTPUTS: Final = "mlflow.spanOutputs"
    REQUEST_ID: Final = "mlflow.traceRequestId"
    SESSION_ID: Final = "session.id"
    SPAN_TYPE: Final = "mlflow.spanType"
    TRACE_TAG_PREFIX: Final = "mlflow.traceTag."
    USER_ID: Final = "user.id"


class SpanLogLevel:
    DEBUG: Final = 10
    INFO: Final = 20
    ERROR: Final = 40


INFO_SPAN_TYPES: Final = frozenset({"LLM", "CHAT_MODEL", "TOOL", "RETRIEVER", "AGENT", "EMBEDDING"})
"""The span types MLflow gives the INFO level by default (``default_log_level_for_span_type``); the
others DEBUG. Its UI hides spans below the level a user picks, and a span without one counts as DEBUG."""


class TokenUsageKey:
    CACHE_CREATION_INPUT_TOKENS: Final = "cache_creation_input_tokens"
    CACHE_READ_INPUT_TOKENS: Final = "cache_read_input_tokens"


class TraceTagKey:
    SPANS_LOCATION: Final = "mlflow.trace.spansLocation"
    TRACE_NAME: Final = "mlflow.traceName"


SYSTEM_TRACE_TAGS: Final = frozenset(
    {"mlflow.artifactLocation", "mlflow.trace.spansLocation", "mlflow.trace.archiveLocation", "mlflow.trace.archivalFailure"}
)
"""Trace tags MLflow sets itself (its handlers' ``_HANDLER_BLOCKED_TRACE_TAGS``). MLflow 3.18's
``/v1/traces`` drops them from a root span's ``mlflow.traceTag.*``; ``log_spans`` takes them, so a
client's request tag could point the trace's spans or artifacts elsewhere. No request tag becomes one."""


class TraceMetadataKey:
    TRACE_INFO_FINALIZED: Final = "mlflow.trace.infoFinalized"
    TRACE_USER: Final = "mlflow.trace.user"


SPANS_IN_TRACKING_STORE: Final = "TRACKING_STORE"
"""``SpansLocation.TRACKING_STORE``: the spans are in the tracking store's own tables."""
MAX_CHARS_IN_TRACE_INFO_METADATA: Final = 250
MAX_TRACE_TAG_VAL_LENGTH: Final = 8000
MAX_TRACE_TAG_KEY_LENGTH: Final = 250
_TAG_KEY_CHARS: Final = re.compile(r"^[/\w.\- :]*$")


def tag_key_refused(key: str) -> bool:
    """Whether MLflow's store refuses ``key`` as a trace tag's key (``_validate_trace_tag``): a
    character outside its set, a name that reads as another path (``a//b``, ``./a``, ``/a``), or
    one too long. Span building checks every tag key with it, and a dry run or a worker must not
    load MLflow for that."""
    norm = posixpath.normpath(key)
    return (
        len(key) > MAX_TRACE_TAG_KEY_LENGTH
        or not _TAG_KEY_CHARS.fullmatch(key)
        or norm != key
        or norm == "."
        or norm.startswith(("..", "/"))
    )
