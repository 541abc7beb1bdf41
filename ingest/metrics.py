"""Metrics: the tail daemon's Prometheus ``/metrics`` and ``/health``, served apart from its loop.

The counters are plain fields the daemon updates; the HTTP server runs in its own thread and only
reads them, so a slow scrape never delays ingestion and a stuck loop still answers ``/health``.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("litellm-ingest.metrics")


class MetricsError(Exception):
    """The metrics endpoint cannot listen where it was told to (a port in use, an unknown host)."""


@dataclass
class Metrics:
    records_read: int = 0
    traces_written: int = 0
    spans_written: int = 0
    calls_joined: int = 0
    """Calls joined to attempts MLflow already held of them (read in an earlier run or pass)."""
    traces_rewritten: int = 0
    """Calls written as failed, then written whole with their state set right when a retry or
    fallback succeeded later (in place, or after a delete where MLflow cannot set a state)."""
    quarantined: int = 0
    send_errors: int = 0
    send_retries: int = 0
    errors: int = 0
    """Passes that failed for another reason than MLflow (each is retried)."""
    state_errors: int = 0
    state_saved: bool = True
    """False while the state cannot be written (disk full, read-only): ``/health`` says "state_unsaved"."""
    buffer_bytes: int = 0
    held_lines: int = 0
    files: int = 0
    quarantine_unwritten: int = 0
    """Quarantine records the file could not take (disk full), kept in memory: ``/health`` says "quarantine_unwritten"."""
    files_open: int = 0
    """Files with an open descriptor; the rest of ``files`` were read to their end and closed while idle."""
    nested_calls: int = 0
    app_traces_missing: int = 0
    nest_pending: int = 0
    callback_traces: int = 0
    """Traces of LiteLLM's own mlflow callback found among the calls written (each such call is shown twice)."""
    callback_traces_replaced: int = 0
    files_forgotten: int = 0
    """Checkpoints of files gone for ``--forget-gone-after``, forgotten."""
    last_write: float = 0.0
    mlflow_up: bool = True
    down_since: float | None = None
    down_at: float | None = None
    """``time.monotonic()`` when the outage ``down_since`` dates began: how long it lasts is measured
    here, as the wall clock may step (NTP, a VM resumed) while MLflow is away."""
    ready: bool = True
    """False from the daemon's start until its first pass over the files (``/health`` says "starting")."""
    lag: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def exposition(self) -> str:
        out: list[str] = []
        for name, kind, value in (
            ("records_read_total", "counter", self.records_read),
            ("traces_written_total", "counter", self.traces_written),
            ("spans_written_total", "counter", self.spans_written),
            ("calls_joined_total", "counter", self.calls_joined),
            ("traces_rewritten_total", "counter", self.traces_rewritten),
            ("quarantined_total", "counter", self.quarantined),
            ("send_errors_total", "counter", self.send_errors),
            ("send_retries_total", "counter", self.send_retries),
            ("errors_total", "counter", self.errors),
            ("state_save_errors_total", "counter", self.state_errors),
            ("state_saved", "gauge", int(self.state_saved)),
            ("nested_calls_total", "counter", self.nested_calls),
            ("app_traces_missing_total", "counter", self.app_traces_missing),
            ("nest_pending", "gauge", self.nest_pending),
            ("callback_traces_seen", "gauge", self.callback_traces),
            ("callback_traces_replaced_total", "counter", self.callback_traces_replaced),
            ("buffer_bytes", "gauge", self.buffer_bytes),
            ("held_lines", "gauge", self.held_lines),
            ("files_followed", "gauge", self.files),
            ("files_open", "gauge", self.files_open),
            ("files_forgotten_total", "counter", self.files_forgotten),
            ("quarantine_unwritten", "gauge", self.quarantine_unwritten),
            ("last_successful_write_timestamp_seconds", "gauge", self.last_write),
            ("mlflow_up", "gauge", int(self.mlflow_up)),
        ):
            out += [f"# TYPE litellm_ingest_{name} {kind}", f"litellm_ingest_{name} {value}"]
        out.append("# TYPE litellm_ingest_file_lag_bytes gauge")
        for path, lag in sorted(self.lag.items()):
            out.append(f'litellm_ingest_file_lag_bytes{{path="{_escape(path)}"}} {lag}')
        return "\n".join(out) + "\n"

    def health(self) -> tuple[int, dict[str, Any]]:
        status = (
            "mlflow_unavailable"
            if not self.mlflow_up
            else "state_unsaved"
            if not self.state_saved
            else "quarantine_unwritten"
            if self.quarantine_unwritten
            else "ok"
            if self.ready
            else "starting"
        )
        doc = {
            "status": status,
            "files": self.files,
            "traces_written": self.traces_written,
            "last_write": self.last_write,
            "mlflow_down_since": self.down_since,
        }
        return (200 if status == "ok" else 503), doc


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def serve(metrics: Callable[[], Metrics], host: str, port: int) -> http.server.ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/health`` from a daemon thread; ``shutdown()`` the result to stop."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            m = metrics()
            if self.path.startswith("/metrics"):
                body, ctype, code = m.exposition().encode(), "text/plain; version=0.0.4", 200
            elif self.path.startswith("/health"):
                code, doc = m.health()
                body, ctype = json.dumps(doc).encode(), "application/json"
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    try:
        server = http.server.ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise MetricsError(f"cannot serve /metrics on {host}:{port}: {e.strerror or e}") from e
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server
