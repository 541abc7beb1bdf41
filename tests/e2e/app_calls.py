"""An app that traces itself with MLflow and calls a LiteLLM proxy; prints what it sent and what MLflow held, as JSON.

It uses ``mlflow.openai.autolog()`` and ``@mlflow.trace`` the way MLflow's docs combine them, so every
OpenAI SDK request carries autolog's ``traceparent``. Each request's header and the proxy's
``x-litellm-call-id`` are recorded by an httpx hook on the SDK's client; each trace's TraceInfo is
read back from the tracking server right after the trace ends (export is synchronous), as the
"before" the ingester must not change.

Runs in the proxy's venv (mlflow, openai):  python app_calls.py TRACKING_URI EXPERIMENT PROXY_URL API_KEY
"""

from __future__ import annotations

import os

os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"

import contextvars
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import mlflow
import openai
from mlflow import MlflowClient
from mlflow.entities import SpanType

URI, EXPERIMENT, PROXY, KEY = sys.argv[1:5]
DELAY_S = 15.0
"""The delayed trace ends this long after its call: it reaches MLflow well after the proxy logged the call."""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip

SCENARIO: contextvars.ContextVar[str] = contextvars.ContextVar("scenario")
requests_seen: list[dict[str, Any]] = []
scenarios: list[dict[str, Any]] = []
_lock = threading.Lock()


def _on_response(response: httpx.Response) -> None:
    """What went out and what came back, per HTTP request (the SDK does not retry: max_retries=0)."""
    with _lock:
        requests_seen.append(
            {
                "scenario": SCENARIO.get(None),
                "path": response.request.url.path,
                "traceparent": response.request.headers.get("traceparent"),
                "call_id": response.headers.get("x-litellm-call-id"),
                "status": response.status_code,
                "at": time.time(),
            }
        )


mlflow.set_tracking_uri(URI)
mlflow.set_experiment(EXPERIMENT)
mlflow.openai.autolog()
client = openai.OpenAI(base_url=PROXY + "/v1", api_key=KEY, max_retries=0, timeout=60,
                       http_client=httpx.Client(event_hooks={"response": [_on_response]}, timeout=60))  # fmt: skip


def ask(question: str, model: str = "gpt-4o-mini", **kw: Any) -> str | None:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw).choices[0].message.content


@mlflow.trace
def chain(question: str) -> str | None:
    return ask(f"Answer briefly: {question}")


@mlflow.trace(span_type=SpanType.AGENT)
def agent(question: str) -> str | None:
    client.embeddings.create(model="text-embedding-3-small", input=question)
    plan = ask(f"Plan how to answer: {question}")
    return ask(f"Follow the plan: {plan}")


@mlflow.trace
def stream(question: str) -> str:
    chunks = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": question}], stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@mlflow.trace
def tools(question: str) -> Any:
    response = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": question}], tools=TOOLS)
    return [c.function.name for c in response.choices[0].message.tool_calls or []]


@mlflow.trace
def fallback(question: str) -> str | None:
    return ask(question, model="broken-primary")


@mlflow.trace
def failing(question: str) -> str:
    try:
        return str(ask(question, model="always-500"))
    except openai.APIStatusError as e:
        return f"gave up: {e.status_code}"


@mlflow.trace
def fan_out(n: int) -> list[str | None]:
    """Threads do not inherit MLflow's active span: each runs in a copy of this context."""
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(contextvars.copy_context().run, ask, f"concurrent {i}") for i in range(n)]
        return [f.result() for f in futures]


def bare(question: str) -> str | None:
    """No ``@mlflow.trace`` around it: autolog's span is the trace's root."""
    return ask(question)


@mlflow.trace
def delayed(question: str) -> str | None:
    answer = ask(question)
    time.sleep(DELAY_S)
    return answer


def no_mlflow(question: str) -> None:
    """A client that knows nothing of MLflow: a plain POST, no traceparent."""
    r = httpx.post(f"{PROXY}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}]})  # fmt: skip
    _on_response(r)
    r.raise_for_status()


def run(name: str, fn: Callable[..., Any], *args: Any) -> None:
    """One scenario; then its trace id and the TraceInfo the tracking server holds for it."""
    token = SCENARIO.set(name)
    before = mlflow.get_last_active_trace_id(thread_local=True)
    try:
        fn(*args)
    finally:
        SCENARIO.reset(token)
    trace_id = mlflow.get_last_active_trace_id(thread_local=True)
    traced = trace_id is not None and trace_id != before
    info = MlflowClient(URI).get_trace(trace_id).info.to_dict() if traced else None
    with _lock:
        scenarios.append({"name": name, "trace_id": trace_id if traced else None, "info": info, "ended_at": time.time()})


def main() -> None:
    slow = threading.Thread(target=run, args=("delayed", delayed, "a question whose trace ends late"))
    slow.start()
    run("chain", chain, "what is a span?")
    run("agent", agent, "why trace?")
    run("stream", stream, "stream me a story")
    run("tools", tools, "weather in Paris")
    run("fallback", fallback, "fall back please")
    run("failing", failing, "this one is doomed")
    run("concurrent", fan_out, 4)
    run("bare", bare, "no decorator here")
    run("no_mlflow", no_mlflow, "who traces me?")
    slow.join()
    print(json.dumps({"scenarios": scenarios, "requests": requests_seen}))


if __name__ == "__main__":
    main()
