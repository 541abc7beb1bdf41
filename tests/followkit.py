"""Test kit for the file-following core in-process: a recording sink, small records, a tailer without MLflow.

``RecordingSink`` keeps what MLflow would: traces by id, spans merged by span id on a re-send, a
trace's first state kept until the trace is deleted (MLflow does not change a trace's state on a
re-send, which is why a late retry deletes and rewrites). Like the real sinks, it joins a late
attempt to the spans it holds of the call (``sink.join_held``, tested against real stores in
``tests/test_late_attempts.py``). After OTel's ``emittest``.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ingest.sink import SinkError, Target
from ingest.spans import BuiltTrace, with_stored_attempts
from ingest.tail import Tailer, TailOptions

TARGET = Target("memory://recording", "1", "recording")


class Crash(BaseException):
    """The process dies right after MLflow acknowledged a write, before anything else happens."""


class RecordingSink:
    deadline_s = 0.0
    settles = False

    def __init__(self) -> None:
        self.traces: dict[str, dict[str, Any]] = {}
        self.up = True
        self.on_retry = None
        self.writes = 0
        self.crash_after_write = False

    def give_up_at(self, deadline: float) -> None:
        pass

    def _check(self) -> None:
        if not self.up:
            raise SinkError("recording sink is down")

    def write(self, traces: list[BuiltTrace]) -> int:
        self._check()
        self.writes += 1
        for t in traces:
            rec = self.traces.setdefault(t.trace_id, {"call": t.call_key, "spans": {}, "state": None, "data": {}})
            with_stored_attempts(t, list(rec["data"].values()))
            for d in t.data:
                rec["spans"][d.span_id] = d.name
                rec["data"][d.span_id] = d
                if d.parent_id is None and rec["state"] is None:
                    rec["state"] = "ERROR" if d.error else "OK"
        if self.crash_after_write:
            self.crash_after_write = False
            raise Crash
        return sum(len(t.data) for t in traces)

    def submit(self, traces: list[BuiltTrace]) -> Future[int]:
        done: Future[int] = Future()
        try:
            done.set_result(self.write(traces))
        except Exception as e:
            done.set_exception(e)
        return done

    def delete(self, trace_ids: list[str]) -> None:
        self._check()
        for t in trace_ids:
            self.traces.pop(t, None)

    def ping(self) -> None:
        self._check()

    def experiment_problem(self) -> str | None:
        return None

    def close(self) -> None:
        pass

    def calls(self) -> dict[str, dict[str, Any]]:
        return {rec["call"]: rec for rec in self.traces.values()}


def record(call_id: str, status: str, start_s: float, end_s: float, n: int = 0) -> dict[str, Any]:
    """A small StandardLoggingPayload of one attempt."""
    ok = status == "success"
    return {
        "id": call_id,
        "litellm_call_id": call_id,
        "call_type": "acompletion",
        "status": status,
        "startTime": start_s,
        "endTime": end_s,
        "model": "gpt-4o-mini",
        "custom_llm_provider": "openai",
        "messages": [{"role": "user", "content": f"question {call_id} #{n}"}],
        "response": {"choices": [{"message": {"role": "assistant", "content": "answer"}}]} if ok else None,
        "prompt_tokens": 5,
        "completion_tokens": 2 if ok else 0,
        "total_tokens": 7 if ok else 5,
        "response_cost": 0.0001 if ok else 0.0,
        "error_information": None if ok else {"error_class": "RateLimitError", "error_message": "429 slow down"},
    }


def line(rec: dict[str, Any]) -> str:
    return json.dumps(rec) + "\n"


def tailer(logdir: Path, state_dir: Path, sink: RecordingSink, settle_s: float, **kw: Any) -> Tailer:
    opts = TailOptions(
        paths=[str(logdir)],
        state_dir=state_dir,
        quarantine_file=state_dir / "quarantine.jsonl",
        settle_s=settle_s,
        partial_timeout_s=1e9,
        close_after_s=0.0,
        max_backoff_s=0.0,
        **kw,
    )
    return Tailer(opts, [logdir], destination=(TARGET, sink))  # type: ignore[arg-type]
