"""Make tests/data/litellm-1.110.2-calltypes.jsonl: a real proxy (tests/proxykit.py) with moderation, speech,
transcription, pass-through routes and an MCP server (fake_mcp.py), one call of each; prints the records.

    python -m tests.e2e.capture_calltypes WORKDIR > records.jsonl   (from the repo root, the test venv)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import requests

import tests.proxykit as pk
from tests.conftest import free_port

MODELS = """  - model_name: whisper-1
    litellm_params: {{model: openai/whisper-1, api_base: "{up}", api_key: fake-key}}
    model_info: {{mode: audio_transcription}}
  - model_name: tts-1
    litellm_params: {{model: openai/tts-1, api_base: "{up}", api_key: fake-key}}
    model_info: {{mode: audio_speech}}
{mcp}router_settings:"""


def main(work: Path) -> None:
    up_port = free_port()
    pk.CONFIG = pk.CONFIG.replace("{mcp}router_settings:", MODELS)
    ports = iter([up_port])
    pk.free_port = lambda: next(ports, None) or free_port()  # the upstream on a port known here, for OPENAI_API_BASE
    work.mkdir(parents=True, exist_ok=True)
    env = {"OPENAI_API_KEY": "fake-key", "OPENAI_API_BASE": f"http://127.0.0.1:{up_port}/v1"}
    with pk.running_proxy(work, [pk.OUR_LOGGER], env, mcp=True) as p:
        h = {"Authorization": f"Bearer {p.key}"}

        def post(path: str, **kw: object) -> requests.Response:
            r = requests.post(p.url + path, headers={**h, **kw.pop("headers", {})}, timeout=60, **kw)  # type: ignore[arg-type]
            r.raise_for_status()
            return r

        post("/v1/moderations", json={"model": "omni-moderation-latest", "input": "I will kill the process"})
        post("/v1/audio/speech", json={"model": "tts-1", "input": "hello world", "voice": "alloy"})
        post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"file": ("a.mp3", b"ID3fakeaudio", "audio/mpeg")})
        post("/fake-pt", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "through"}]})
        post("/mcp-rest/tools/call", json={"server_id": "weather", "name": "get_weather", "arguments": {"city": "Paris"}})
        mh = {"Accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-06-18"}
        init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "capture", "version": "1"}}
        started = post("/mcp/", headers=mh, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init})
        mh["mcp-session-id"] = started.headers["mcp-session-id"]
        post("/mcp/", headers=mh, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        post("/mcp/", headers=mh, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        call = {"name": "weather-get_weather", "arguments": {"city": "Rome"}}
        post("/mcp/", headers=mh, json={"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": call})
        question = [{"role": "user", "content": "via openai route"}]
        post("/openai/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": question})
        time.sleep(3)  # the logger writes after the response
        for r in p.records():
            r["model_map_information"] = None
            if r.get("response_cost_failure_debug_info"):
                r["response_cost_failure_debug_info"]["traceback_str"] = "(cut)"
            print(json.dumps(r))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
