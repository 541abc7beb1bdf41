"""Test kit for the end-to-end modules: a real LiteLLM proxy, in its own venv, in front of the fake upstream.

The proxy venv (tests/e2e/proxy-requirements.txt: it pins polars<2 and rich<14) is $LITELLM_PROXY_PYTHON,
or .proxy-venv built once from the pinned requirements. Our JSONL logger is always one of its callbacks.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from mlflow.entities import Trace

from tests.conftest import ROOT, free_port

E2E = ROOT / "tests" / "e2e"
OUR_LOGGER = "litellm_ingest_callback.logger"

CONFIG = """
model_list:
  - model_name: gpt-4o-mini
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "{up}", api_key: fake-key}}
  - model_name: text-embedding-3-small
    litellm_params: {{model: openai/text-embedding-3-small, api_base: "{up}", api_key: fake-key}}
  - model_name: broken-primary
    litellm_params: {{model: openai/FAIL_500-primary, api_base: "{up}", api_key: fake-key}}
  - model_name: always-500
    litellm_params: {{model: openai/FAIL_500-nofallback, api_base: "{up}", api_key: fake-key}}
  - model_name: flaky
    litellm_params: {{model: openai/FLAKY_429-model, api_base: "{up}", api_key: fake-key}}
  - model_name: dall-e-3
    litellm_params: {{model: openai/dall-e-3, api_base: "{up}", api_key: fake-key}}
  - model_name: rerank-english
    litellm_params: {{model: cohere/rerank-english-v3.0, api_base: "{up}", api_key: fake-key}}
  - model_name: omni-moderation-latest
    litellm_params: {{model: openai/omni-moderation-latest, api_base: "{up}", api_key: fake-key}}
{mcp}router_settings:
  num_retries: 2
  retry_after: 0
  fallbacks: [{{"broken-primary": ["gpt-4o-mini"]}}]
litellm_settings:
  callbacks: {callbacks}
general_settings:
  master_key: {key}
  pass_through_endpoints:
    - {{path: "/fake-pt", target: "{up}/chat/completions"}}
"""
MCP = """mcp_servers:
  weather: {{url: "http://127.0.0.1:{port}/mcp", transport: http}}
"""
"""With ``mcp=True``: the proxy's MCP gateway in front of tests/e2e/fake_mcp.py (one tool, ``get_weather``)."""

SHIM = "from ingest.proxy_logger import JsonlFileLogger\nlogger = JsonlFileLogger()\n"


def proxy_python() -> Path:
    """The proxy venv's python: $LITELLM_PROXY_PYTHON, or .proxy-venv built from the pinned requirements
    (once: the test workers collect at the same time, and the first builds it while the others wait)."""
    if env := os.environ.get("LITELLM_PROXY_PYTHON"):
        return Path(env)
    venv = ROOT / ".proxy-venv"
    reqs = E2E / "proxy-requirements.txt"
    stamp = venv / ".requirements-sha256"
    digest = hashlib.sha256(reqs.read_bytes()).hexdigest()
    with (ROOT / ".proxy-venv.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == digest):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(reqs)], check=True)
            stamp.write_text(digest)
    return venv / "bin" / "python"


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not come up: {log.read_text()[-4000:]}")


def wait_mcp(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until the MCP server accepts connections (it answers no plain GET)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            return
        time.sleep(0.3)
    raise AssertionError(f"the MCP server did not come up: {log.read_text()[-4000:]}")


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without MLflow's or Python's settings (they belong to the test venv), plus ``extra``."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHON"))}
    return {**kept, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **extra}


@dataclass
class Proxy:
    url: str
    key: str
    logdir: Path
    python: Path
    log: Path

    def run_client(self, script: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
        """Run a client script in the proxy's venv (it has openai and mlflow); its stdout. Fails with both logs' tails."""
        proc = subprocess.run([str(self.python), str(script), *args], capture_output=True, text=True, timeout=timeout,
                              env=_clean_env(env or {}))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:] + self.log.read_text()[-4000:]
        return proc.stdout

    def records(self) -> list[dict]:
        """Every line the proxy logged so far, rotated (and gzipped) files first."""
        out = []
        for f in sorted(self.logdir.iterdir()):
            if ".jsonl" not in f.name or f.name.endswith((".lock", ".tmp")):
                continue
            data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
            out += [json.loads(line) for line in data.splitlines() if line.strip()]
        return out


def by_call(traces: list[Trace]) -> dict[str, Trace]:
    """The ingester's traces by their call id (tag ``litellm.call_id``); a call with two traces fails."""
    out: dict[str, Trace] = {}
    for t in traces:
        cid = t.info.tags["litellm.call_id"]
        assert cid not in out, f"{cid} has two traces"
        out[cid] = t
    return out


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@contextmanager
def running_proxy(work: Path, callbacks: list[str], env: dict[str, str] | None = None, mcp: bool = False) -> Iterator[Proxy]:
    """The fake upstream and a LiteLLM proxy (1 worker, a fresh master key) logging JSONL into ``work/logs``,
    with a pass-through route (``/fake-pt``) to the upstream's chat completions.

    ``callbacks`` name the proxy's callbacks (OUR_LOGGER is ours); ``env`` is added to the proxy's
    environment (log rotation, LiteLLM's own mlflow callback's settings); ``mcp``: an MCP server
    behind the proxy's gateway (``weather``). All are stopped on exit.
    """
    logdir, confdir = work / "logs", work / "conf"
    logdir.mkdir()
    confdir.mkdir()
    up_port, proxy_port, mcp_port = free_port(), free_port(), free_port()
    key = "sk-" + secrets.token_hex(16)
    servers = MCP.format(port=mcp_port) if mcp else ""
    config = CONFIG.format(up=f"http://127.0.0.1:{up_port}/v1", key=key, callbacks=json.dumps(callbacks), mcp=servers)
    (confdir / "config.yaml").write_text(config)
    (confdir / f"{OUR_LOGGER.split('.')[0]}.py").write_text(SHIM)
    py = proxy_python()
    up_log, proxy_log, mcp_log = work / "upstream.log", work / "proxy.log", work / "mcp.log"
    procs = [subprocess.Popen([sys.executable, str(E2E / "fake_upstream.py"), str(up_port)], stdout=up_log.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)]  # fmt: skip
    try:
        if mcp:
            procs.append(subprocess.Popen([str(py), str(E2E / "fake_mcp.py"), str(mcp_port)], stdout=mcp_log.open("w"),
                                          stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
            wait_mcp(mcp_port, procs[-1], mcp_log)
        proxy_env = _clean_env({"PYTHONPATH": str(ROOT), "LITELLM_INGEST_LOG_PATH": str(logdir / "proxy.jsonl"), **(env or {})})
        args = [str(py.parent / "litellm"), "--config", str(confdir / "config.yaml"), "--host", "127.0.0.1", "--port", str(proxy_port),
                "--num_workers", "1"]  # fmt: skip
        procs.append(subprocess.Popen(args, stdout=proxy_log.open("w"), stderr=subprocess.STDOUT, env=proxy_env, cwd=work,
                                      start_new_session=True))  # fmt: skip
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", 30, procs[0], up_log)
        wait_http(f"http://127.0.0.1:{proxy_port}/health/liveliness", 240, procs[-1], proxy_log)
        yield Proxy(f"http://127.0.0.1:{proxy_port}", key, logdir, py, proxy_log)
    finally:
        _stop(procs)
