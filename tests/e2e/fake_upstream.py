"""A deterministic OpenAI-compatible upstream for the end-to-end test (run as its own process).

Chat completions (plain, tool calls, SSE streaming with a final usage chunk), the Responses API
(plain and SSE events; LiteLLM also sends Anthropic ``/v1/messages`` for an OpenAI model there),
text completions, embeddings (float or base64), and scripted failures by model name: ``FAIL_500*`` always 500, ``FAIL_429*`` always 429,
``FLAKY_429*`` 429 on the first attempt of each distinct request, then 200.

    python fake_upstream.py PORT
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import struct
import sys
import threading
import time

_seen: set[str] = set()
_lock = threading.Lock()
_counter = [0]


def _next_id() -> str:
    with _lock:
        _counter[0] += 1
        return f"chatcmpl-e2e{_counter[0]:05d}"


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


def _text_of(content: object) -> str:
    """A message's text: a string, or the text of its content parts."""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def _form_field(raw: bytes, name: str) -> str:
    """One text field of a multipart form (an audio upload's ``model``)."""
    marker = f'name="{name}"'.encode()
    _, _, rest = raw.partition(marker)
    return rest.split(b"\r\n\r\n", 1)[-1].split(b"\r\n", 1)[0].decode(errors="replace") if rest else ""


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json(200, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        multipart = self.headers.get("Content-Type", "").startswith("multipart/")
        body = {"model": _form_field(raw, "model")} if multipart else json.loads(raw or b"{}")
        model = str(body.get("model", ""))
        if "FAIL_500" in model:
            return self._json(500, {"error": {"message": f"fake upstream: deterministic internal error ({model})", "type": "server_error"}})
        if "FAIL_429" in model:
            return self._json(429, {"error": {"message": "fake upstream: rate limited", "type": "rate_limit_error"}})
        if "FLAKY_429" in model:
            key = hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()
            with _lock:
                first = key not in _seen
                _seen.add(key)
            if first:
                return self._json(429, {"error": {"message": "fake upstream: rate limited once", "type": "rate_limit_error"}})
        for suffix, route in self.ROUTES:
            if self.path.endswith(suffix):
                return route(self, body, model)
        return self._json(404, {"error": {"message": f"no route {self.path}"}})

    def _embeddings(self, body: dict, model: str) -> None:
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        data = []
        for i, text in enumerate(inputs):
            vec = [((hash(str(text)) >> k) % 100) / 100.0 for k in range(8)]
            emb = base64.b64encode(struct.pack("<8f", *vec)).decode() if body.get("encoding_format") == "base64" else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(_tokens(str(t)) for t in inputs)
        self._json(200, {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _image(self, body: dict, model: str) -> None:
        """A 1x1 PNG per image asked for, as base64 (``response_format: b64_json``) or a URL."""
        png = base64.b64encode(bytes.fromhex(
            "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
            "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
        )).decode()  # fmt: skip
        n = int(body.get("n") or 1)
        item = {"b64_json": png} if body.get("response_format") == "b64_json" else {"url": "http://127.0.0.1/fake.png"}
        self._json(200, {"created": int(time.time()), "data": [{**item, "revised_prompt": body.get("prompt")} for _ in range(n)]})

    def _rerank(self, body: dict, model: str) -> None:
        """Cohere's rerank: the documents by descending relevance (longer first)."""
        docs = [d if isinstance(d, str) else str(d.get("text", "")) for d in body.get("documents") or []]
        order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))[: body.get("top_n") or len(docs)]
        results = [{"index": i, "relevance_score": round(1 - k / (len(docs) + 1), 3)} for k, i in enumerate(order)]
        self._json(200, {"id": _next_id(), "results": results, "meta": {"billed_units": {"search_units": 1}}})

    def _text(self, body: dict, model: str) -> None:
        prompt = body.get("prompt")
        prompt = prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))
        text = f" and then: {prompt}"
        usage = {"prompt_tokens": _tokens(prompt), "completion_tokens": _tokens(text), "total_tokens": _tokens(prompt) + _tokens(text)}
        self._json(200, {"id": _next_id().replace("chatcmpl", "cmpl"), "object": "text_completion", "created": int(time.time()),
                         "model": model, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                         "usage": usage})  # fmt: skip

    def _responses(self, body: dict, model: str) -> None:
        """OpenAI's Responses API: one output message; streamed as its typed SSE events."""
        given = body.get("input")
        items = [given] if isinstance(given, str) else [_text_of(i.get("content") if isinstance(i, dict) else i) for i in given or []]
        last = items[-1] if items else ""
        text = f"Deterministic answer to: {last}"
        rid, mid = _next_id().replace("chatcmpl", "resp"), _next_id().replace("chatcmpl", "msg")
        n_in = sum(_tokens(i) for i in items) + _tokens(str(body.get("instructions") or ""))
        usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": _tokens(text),
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": n_in + _tokens(text)}  # fmt: skip
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"type": "message", "id": mid, "status": "completed", "role": "assistant", "content": [part]}
        response = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "completed", "model": model,
                    "output": [item], "usage": usage, "error": None, "incomplete_details": None,
                    "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                    "parallel_tool_calls": True, "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
                    "store": True, "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
                    "top_p": 1.0, "truncation": "disabled", "user": None, "metadata": {}}  # fmt: skip
        if not body.get("stream"):
            time.sleep(0.05)
            return self._json(200, response)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        seq = [0]

        def send(kind: str, **fields: object) -> None:
            event = {"type": kind, "sequence_number": seq[0], **fields}
            seq[0] += 1
            data = f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        started = {**response, "status": "in_progress", "output": [], "usage": None}
        time.sleep(0.1)
        send("response.created", response=started)
        send("response.in_progress", response=started)
        send("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "content": []})
        send("response.content_part.added", item_id=mid, output_index=0, content_index=0, part={**part, "text": ""})
        for i, w in enumerate(text.split(" ")):
            send("response.output_text.delta", item_id=mid, output_index=0, content_index=0, delta=w if i == 0 else " " + w)
            time.sleep(0.02)
        send("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text)
        send("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part)
        send("response.output_item.done", output_index=0, item=item)
        send("response.completed", response=response)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _moderations(self, body: dict, model: str) -> None:
        """OpenAI's moderation: flagged when the input says "kill"."""
        given = body.get("input")
        texts = [given] if isinstance(given, str) else list(given or [])
        results = [{"flagged": "kill" in str(t), "categories": {"violence": "kill" in str(t)},
                    "category_scores": {"violence": 0.9 if "kill" in str(t) else 0.01}} for t in texts]  # fmt: skip
        self._json(200, {"id": "modr-e2e", "model": model, "results": results})

    def _speech(self, body: dict, model: str) -> None:
        """Text to speech: a few bytes of "audio"."""
        data = b"ID3fake-mp3-" + str(body.get("input", "")).encode()[:32]
        self.send_response(200)
        self.send_header("Content-Type", "audio/mpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _transcription(self, body: dict, model: str) -> None:
        self._json(200, {"text": "a fake transcript of the upload", "usage": {"type": "duration", "seconds": 3}})

    def _chat(self, body: dict, model: str) -> None:
        messages = body.get("messages") or []
        last = str(messages[-1].get("content", "")) if messages else ""
        prompt_tokens = sum(_tokens(str(m.get("content") or "")) for m in messages)
        if body.get("tools"):
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_e2e",
                        "type": "function",
                        "function": {"name": body["tools"][0]["function"]["name"], "arguments": '{"city": "Paris"}'},
                    }
                ],
            }
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": f"Deterministic answer to: {last}"}
            finish = "stop"
        completion_tokens = _tokens(message["content"] or "") + (5 if body.get("tools") else 0)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
        cid, created = _next_id(), int(time.time())
        if not body.get("stream"):
            time.sleep(0.05)
            return self._json(
                200,
                {"id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": "fp_e2e",
                 "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage},
            )  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(obj: dict | str) -> None:
            data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        words = (message["content"] or "").split(" ")
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        time.sleep(0.1)
        for i, w in enumerate(words):
            delta = {"role": "assistant", "content": w} if i == 0 else {"content": " " + w}
            send({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            time.sleep(0.02)
        send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        send({**base, "choices": [], "usage": usage})
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    ROUTES = (  # by path suffix, first match: /chat/completions before /completions
        ("/embeddings", _embeddings),
        ("/chat/completions", _chat),
        ("/images/generations", _image),
        ("/rerank", _rerank),
        ("/responses", _responses),
        ("/completions", _text),
        ("/moderations", _moderations),
        ("/audio/speech", _speech),
        ("/audio/transcriptions", _transcription),
    )


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.serve_forever()
