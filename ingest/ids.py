"""Deterministic ids: the same call in the same experiment always becomes the same trace.

The trace id hashes the experiment id with the call key: MLflow files spans under the trace's
first experiment whatever the request says, so without the experiment two experiments on one
server fed the same logs would share (and silently steal) traces. Span ids hash the trace id with
the attempt's identity, so re-sending a record changes nothing.
"""

from __future__ import annotations

import hashlib

NAMESPACE = b"litellm-ingest/v1"


def _digest(*parts: str) -> bytes:
    h = hashlib.sha256(NAMESPACE)
    for p in parts:
        h.update(b"\x00")
        h.update(p.encode("utf-8", "surrogatepass"))
    return h.digest()


def otel_trace_id(experiment_id: str, call_key: str) -> bytes:
    """16 bytes, never all zero (OTLP treats that as invalid)."""
    d = _digest("trace", experiment_id, call_key)[:16]
    return d if any(d) else b"\x00" * 15 + b"\x01"


def otel_span_id(trace_id: bytes, identity: str) -> bytes:
    """8 bytes for one span of a trace; ``identity`` is "root" or an attempt identity."""
    d = _digest("span", trace_id.hex(), identity)[:8]
    return d if any(d) else b"\x00" * 7 + b"\x01"


def mlflow_trace_id(otel_id: bytes) -> str:
    """The id MLflow gives a trace received over OTLP (``tr-`` + the OTel trace id in hex)."""
    return "tr-" + otel_id.hex()


def attempt_identity(start_us: int, status: str) -> str:
    return f"attempt:{(start_us + 500) // 1000}:{status}"
