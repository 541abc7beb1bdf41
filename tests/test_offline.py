"""A replay reaches nothing but its inputs and its MLflow: MLflow's pricing of a call logged without a
cost uses the catalog it ships, unless the user points ``MLFLOW_MODEL_CATALOG_URI`` somewhere."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import all_traces, write_jsonl

EXE = str(Path(sys.executable).parent / "litellm-ingest")


EMPTY_CATALOG = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{"models": {}}'


class Listener:
    """A local TCP port that counts connections and answers each with an empty model catalog."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(EMPTY_CATALOG)
                except OSError:
                    pass


@pytest.fixture
def listener() -> Iterator[Listener]:
    it = Listener()
    yield it
    it.sock.close()


def _uncosted(capture: list[dict], tmp_path: Path) -> Path:
    record = dict(next(r for r in capture if r["call_type"] == "acompletion" and r["status"] == "success" and r["prompt_tokens"]))
    record["response_cost"] = None
    path = tmp_path / "calls.jsonl"
    write_jsonl(path, [record])
    return path


def _batch(tmp_path: Path, logs: Path, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    db = tmp_path / "mlflow.db"
    proc = subprocess.run(
        [EXE, "batch", "--no-state", "--json", "--tracking-uri", f"sqlite:///{db}", str(logs)],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (trace,) = all_traces(f"sqlite:///{db}", "LiteLLM Proxy", include_spans=False)
    return json.loads(trace.info.trace_metadata.get("mlflow.trace.cost") or "{}")


def test_a_call_logged_without_cost_is_priced_offline(tmp_path: Path, capture: list[dict], listener: Listener) -> None:
    """Every proxy variable points at the listener: a download MLflow tried would reach it."""
    proxy = f"http://127.0.0.1:{listener.port}"
    proxies = {name: proxy for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}
    cost = _batch(tmp_path, _uncosted(capture, tmp_path), **proxies, NO_PROXY="")
    assert listener.connections == 0
    assert cost.get("total_cost", 0) > 0, "priced from the catalog MLflow ships"


def test_the_users_catalog_address_is_kept(tmp_path: Path, capture: list[dict], listener: Listener) -> None:
    _batch(tmp_path, _uncosted(capture, tmp_path), MLFLOW_MODEL_CATALOG_URI=f"http://127.0.0.1:{listener.port}/catalog")
    assert listener.connections >= 1
