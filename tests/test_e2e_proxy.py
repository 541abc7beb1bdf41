"""End to end with real processes: openai SDK -> LiteLLM proxy (our logger + LiteLLM's own mlflow
callback) -> fake upstream; JSONL files rotating -> `litellm-ingest tail` -> a real mlflow server.

The proxy runs in its own venv (tests/e2e/proxy-requirements.txt: it pins polars<2 and rich<14);
set LITELLM_PROXY_PYTHON to its python, or the fixture builds .proxy-venv once. Deselect locally
with ``-m "not proxy"``; CI runs it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, all_traces, free_port
from tests.tailkit import Daemon, wait_for

pytestmark = pytest.mark.proxy
E2E = ROOT / "tests" / "e2e"


def proxy_python() -> Path:
    """The proxy venv's python: $LITELLM_PROXY_PYTHON, or .proxy-venv built from the pinned requirements."""
    if env := os.environ.get("LITELLM_PROXY_PYTHON"):
        return Path(env)
    venv = ROOT / ".proxy-venv"
    reqs = E2E / "proxy-requirements.txt"
    stamp = venv / ".requirements-sha256"
    digest = hashlib.sha256(reqs.read_bytes()).hexdigest()
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
router_settings:
  num_retries: 2
  retry_after: 0
  fallbacks: [{{"broken-primary": ["gpt-4o-mini"]}}]
litellm_settings:
  callbacks: ["litellm_ingest_callback.logger", "mlflow"]
general_settings:
  master_key: {key}
"""

SHIM = "from ingest.proxy_logger import JsonlFileLogger\nlogger = JsonlFileLogger()\n"


@pytest.fixture(scope="module")
def e2e_run(mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    py = proxy_python()
    work = tmp_path_factory.mktemp("e2e")
    logdir, confdir = work / "logs", work / "conf"
    logdir.mkdir()
    confdir.mkdir()
    procs: list[subprocess.Popen] = []
    up_port, proxy_port = free_port(), free_port()
    up_log = work / "upstream.log"
    procs.append(subprocess.Popen([sys.executable, str(E2E / "fake_upstream.py"), str(up_port)], stdout=up_log.open("w"),
                                  stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    key = "sk-" + secrets.token_hex(16)
    (confdir / "config.yaml").write_text(CONFIG.format(up=f"http://127.0.0.1:{up_port}/v1", key=key))
    (confdir / "litellm_ingest_callback.py").write_text(SHIM)
    ours, theirs = f"e2e-ours-{uuid.uuid4().hex[:6]}", f"e2e-callback-{uuid.uuid4().hex[:6]}"
    requests.post(mlflow_server.url + "/api/2.0/mlflow/experiments/create", json={"name": theirs}, timeout=30).raise_for_status()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHON"))},
        "PYTHONPATH": str(ROOT),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_INGEST_LOG_PATH": str(logdir / "proxy.jsonl"),
        "LITELLM_INGEST_LOG_MAX_BYTES": "60000",
        "LITELLM_INGEST_LOG_BACKUPS": "1000",
        "LITELLM_INGEST_LOG_GZIP": "1",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_NAME": theirs,
        "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false",
    }
    proxy_log = work / "proxy.log"
    procs.append(
        subprocess.Popen(
            [
                str(py.parent / "litellm"),
                "--config",
                str(confdir / "config.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(proxy_port),
                "--num_workers",
                "1",
            ],
            stdout=proxy_log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
            start_new_session=True,
        )
    )
    daemon = None
    try:
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", 30, procs[0], up_log)
        wait_http(f"http://127.0.0.1:{proxy_port}/health/liveliness", 240, procs[1], proxy_log)
        daemon = Daemon(logdir, mlflow_server.url, ours, work / "state", "--settle", "30").start()
        driven = subprocess.run([str(py), str(E2E / "drive_calls.py"), f"http://127.0.0.1:{proxy_port}", key], capture_output=True,
                                text=True, timeout=600, env={k: v for k, v in env.items() if k != "PYTHONPATH"})  # fmt: skip
        assert driven.returncode == 0, driven.stderr[-4000:] + proxy_log.read_text()[-4000:]
        calls = json.loads(driven.stdout)
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
               "logdir": logdir, "records": read_logs(logdir)}  # fmt: skip
    finally:
        if daemon is not None and daemon.alive():
            assert daemon.stop() == 0
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)


def read_logs(logdir: Path) -> list[dict]:
    out = []
    for f in sorted(logdir.iterdir()):
        if ".jsonl" not in f.name or f.name.endswith((".lock", ".tmp")):
            continue
        data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        out += [json.loads(line) for line in data.splitlines() if line.strip()]
    return out


def by_call(traces: list) -> dict[str, object]:
    out: dict[str, object] = {}
    for t in traces:
        cid = t.info.tags["litellm.call_id"]
        assert cid not in out, f"{cid} has two traces"
        out[cid] = t
    return out


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
        if c["ok"]:
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
