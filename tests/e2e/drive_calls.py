"""Drive ~55 calls through a LiteLLM proxy with the openai SDK (and Anthropic's ``/v1/messages`` over
httpx, as Claude Code sends it); print what the client saw, as JSON.

Runs in the proxy's venv (it has the openai SDK):  python drive_calls.py BASE_URL API_KEY
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
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


def _other(kind: str, stream: bool, call_id: str | None, usage: dict[str, Any] | None, answer: str) -> dict[str, Any]:
    """What the client saw of a call made on another route; usage in the chat API's terms."""
    return {"kind": kind, "model": "gpt-4o-mini", "call_id": call_id, "ok": True, "usage": usage, "user": None, "tags": [],
            "session": None, "stream": stream, "answer": answer}  # fmt: skip


def responses(question: str, stream: bool = False) -> dict[str, Any]:
    """OpenAI's Responses API (``/v1/responses``)."""
    kw: dict[str, Any] = {"model": "gpt-4o-mini", "input": question, "instructions": "Answer in one line."}
    if not stream:
        raw = client.responses.with_raw_response.create(**kw)
        r = raw.parse()
        u, text = r.usage, r.output_text
    else:
        raw = client.responses.with_raw_response.create(**kw, stream=True)
        done = [e for e in raw.parse() if e.type == "response.completed"]
        u, text = done[-1].response.usage, done[-1].response.output_text
    usage = {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens, "total_tokens": u.total_tokens}
    return _other("responses", stream, raw.headers.get("x-litellm-call-id"), usage, text)


def messages(question: str, stream: bool = False) -> dict[str, Any]:
    """Anthropic's Messages API (``/v1/messages``), content as blocks."""
    body = {"model": "gpt-4o-mini", "max_tokens": 200, "stream": stream,
            "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}]}  # fmt: skip
    r = httpx.post(BASE.removesuffix("/v1") + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60)
    r.raise_for_status()
    if not stream:
        d = r.json()
        u, text = d["usage"], "".join(b.get("text", "") for b in d["content"])
    else:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        u = {"input_tokens": 0, "output_tokens": 0}
        for e in events:
            u.update({k: v for k, v in (e.get("message", {}).get("usage") or e.get("usage") or {}).items() if v})
        text = "".join(e["delta"].get("text", "") for e in events if e.get("type") == "content_block_delta")
    n_in, n_out = u["input_tokens"], u["output_tokens"]
    usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
    return _other("anthropic_messages", stream, r.headers.get("x-litellm-call-id"), usage, text)


def text_completion(prompt: str) -> dict[str, Any]:
    raw = client.completions.with_raw_response.create(model="gpt-4o-mini", prompt=prompt)
    r = raw.parse()
    return _other("text_completion", False, raw.headers.get("x-litellm-call-id"), r.usage.model_dump(), r.choices[0].text)


def image(prompt: str) -> dict[str, Any]:
    raw = client.images.with_raw_response.generate(model="dall-e-3", prompt=prompt)
    return _other("image_generation", False, raw.headers.get("x-litellm-call-id"), None, raw.parse().data[0].url or "")


def rerank(query: str, documents: list[str]) -> dict[str, Any]:
    """Cohere's rerank route, as LiteLLM serves it (``/v1/rerank``)."""
    body = {"model": "rerank-english", "query": query, "documents": documents, "top_n": 2}
    r = httpx.post(BASE.removesuffix("/v1") + "/v1/rerank", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    r.raise_for_status()
    return {**_other("rerank", False, r.headers.get("x-litellm-call-id"), None, json.dumps(r.json()["results"])), "query": query}


def moderation(text: str) -> dict[str, Any]:
    raw = client.moderations.with_raw_response.create(model="omni-moderation-latest", input=text)
    return {**_other("moderation", False, raw.headers.get("x-litellm-call-id"), None, str(raw.parse().results[0].flagged)),
            "model": "omni-moderation-latest"}  # fmt: skip


def pass_through(question: str) -> dict[str, Any]:
    """A pass-through route (``/fake-pt``): LiteLLM forwards the body as it came and logs it as text."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}]}
    r = httpx.post(BASE.removesuffix("/v1") + "/fake-pt", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    r.raise_for_status()
    return _other("pass_through", False, r.headers.get("x-litellm-call-id"), None, r.json()["choices"][0]["message"]["content"])


def mcp_tool(city: str) -> dict[str, Any]:
    """A tool call through the proxy's MCP gateway (streamable HTTP, as an MCP client speaks it). Its
    response names no call id: the test finds it in the log by its call type."""
    url = BASE.removesuffix("/v1") + "/mcp/"
    h = {"Authorization": f"Bearer {KEY}", "Accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-06-18"}

    def rpc(body: dict[str, Any]) -> httpx.Response:
        r = httpx.post(url, json={"jsonrpc": "2.0", **body}, headers=h, timeout=60)
        r.raise_for_status()
        return r

    init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "e2e", "version": "1"}}
    h["mcp-session-id"] = rpc({"id": 1, "method": "initialize", "params": init}).headers["mcp-session-id"]
    rpc({"method": "notifications/initialized"})
    r = rpc({"id": 2, "method": "tools/call", "params": {"name": "weather-get_weather", "arguments": {"city": city}}})
    data = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")] or [r.json()]
    answer = "".join(c.get("text", "") for d in data for c in d.get("result", {}).get("content", []))
    return {**_other("mcp_tool", False, r.headers.get("x-litellm-call-id"), None, answer), "model": "MCP: weather-get_weather",
            "city": city}  # fmt: skip


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
    calls += [responses("what is MLflow?"), responses("stream what LiteLLM is", stream=True)]
    calls += [messages("what is the capital of France?"), messages("stream a haiku", stream=True)]
    calls.append(text_completion("Once upon a time"))
    calls += [image("a red square on white"), rerank("capital of France", ["Paris is the capital of France", "Berlin", "Madrid"])]
    calls += [moderation("I will kill the process"), pass_through("straight through"), mcp_tool("Rome")]
    calls += slow.result()
    print(json.dumps(calls))


if __name__ == "__main__":
    main()
