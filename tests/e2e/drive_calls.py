"""Drive ~50 calls through a LiteLLM proxy with the openai SDK; print what the client saw, as JSON.

Runs in the proxy's venv (it has the openai SDK):  python drive_calls.py BASE_URL API_KEY
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai

BASE, KEY = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=60)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip


def chat(
    kind: str,
    model: str = "gpt-4o-mini",
    content: str = "hello",
    *,
    user: str | None = None,
    tags: list[str] | None = None,
    session: str | None = None,
    stream: bool = False,
    tools: bool = False,
    history: list[dict] | None = None,
) -> dict[str, Any]:
    messages = [*(history or []), {"role": "user", "content": content}]
    extra: dict[str, Any] = {}
    if tags:
        extra["metadata"] = {"tags": tags}
    if session:
        extra["litellm_session_id"] = session
    kw: dict[str, Any] = {"model": model, "messages": messages, "extra_body": extra or None}
    if user:
        kw["user"] = user
    if tools:
        kw["tools"] = TOOLS
    out: dict[str, Any] = {"kind": kind, "model": model, "user": user, "tags": tags or [], "session": session, "stream": stream, "ok": True}
    try:
        if stream:
            raw = client.chat.completions.with_raw_response.create(**kw, stream=True, stream_options={"include_usage": True})
            out["call_id"] = raw.headers.get("x-litellm-call-id")
            usage = None
            for chunk in raw.parse():
                if chunk.usage:
                    usage = chunk.usage
            out["usage"] = usage.model_dump() if usage else None
        else:
            raw = client.chat.completions.with_raw_response.create(**kw)
            out["call_id"] = raw.headers.get("x-litellm-call-id")
            out["usage"] = raw.parse().usage.model_dump()
    except openai.APIStatusError as e:
        out.update(ok=False, status_code=e.status_code, call_id=e.response.headers.get("x-litellm-call-id"), usage=None)
    return out


def embed(kind: str, text: str | list[str], encoding: str | None = None) -> dict[str, Any]:
    kw: dict[str, Any] = {"model": "text-embedding-3-small", "input": text}
    if encoding:
        kw["encoding_format"] = encoding
    raw = client.embeddings.with_raw_response.create(**kw)
    usage = raw.parse().usage.model_dump()
    call_id = raw.headers.get("x-litellm-call-id")
    return {
        "kind": kind,
        "model": kw["model"],
        "call_id": call_id,
        "ok": True,
        "usage": usage,
        "user": None,
        "tags": [],
        "session": None,
        "stream": False,
    }


def backed_off() -> list[dict[str, Any]]:
    """The calls the proxy's router retries or falls back (each waits out its backoff, ~5 s for a 500), all at once."""
    jobs = [("retried_429", "flaky", f"flaky {i}") for i in range(2)]
    jobs += [("fallback", "broken-primary", f"fallback {i}") for i in range(3)]
    jobs += [("hard_failure", "always-500", f"doomed {i}") for i in range(2)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: chat(job[0], model=job[1], content=job[2]), jobs))


def main() -> None:
    # First, and beside the others: their backoffs overlap the rest, and the failed-only calls (held for the
    # daemon's --settle, counted from their end) start their wait at once instead of after everything else.
    slow = ThreadPoolExecutor(max_workers=1).submit(backed_off)
    calls: list[dict[str, Any]] = []
    for i in range(8):
        calls.append(chat("plain", content=f"plain question {i}"))
    calls.append(chat("tagged", content="tagged call", tags=["team:e2e", "feature:tags", "bare-tag"], user="user-e2e-1"))
    calls.append(chat("user", content="a user call", user="user-e2e-2"))
    history: list[dict] = []
    for turn in range(3):
        c = chat("session", content=f"turn {turn}", session="sess-e2e-multi", history=history)
        history += [{"role": "user", "content": f"turn {turn}"}, {"role": "assistant", "content": f"answer {turn}"}]
        calls.append(c)
    for i in range(2):
        calls.append(chat("tools", content=f"weather in Paris {i}", tools=True))
    for i in range(4):
        calls.append(chat("stream", content=f"stream me {i}", stream=True, tags=["feature:stream"] if i == 0 else None))
    for i in range(3):
        calls.append(embed("embedding", f"embed this {i}"))
    calls.append(embed("embedding", ["first text", "second text"], encoding="float"))
    calls.append(embed("embedding", "base64 please", encoding="base64"))
    with ThreadPoolExecutor(max_workers=6) as pool:
        calls += list(pool.map(lambda i: chat("concurrent", content=f"concurrent {i}", session="sess-e2e-concurrent"), range(12)))
    for i in range(4):
        calls.append(chat("plain", content=f"after concurrency {i}"))
    calls += slow.result()
    print(json.dumps(calls))


if __name__ == "__main__":
    main()
