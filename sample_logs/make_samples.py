"""Rebuild sample_logs/ from the real LiteLLM 1.110.2 capture in ../shared/litellm-capture/.

- proxy_calls.jsonl.1.gz + proxy_calls.jsonl: the capture's 49 StandardLoggingPayload lines,
  untouched, split the way a size-rotated, gzipped log looks (first 20 lines rotated).
- spend_logs_export.jsonl: the same calls as exported LiteLLM_SpendLogs rows, built field by field
  the way LiteLLM's proxy (spend_tracking_utils.get_logging_payload) fills the table, and written
  as `SELECT row_to_json(t) FROM "LiteLLM_SpendLogs" t` prints it (naive UTC times at millisecond
  precision, JSON columns as JSON text). The proxy's default stores no prompts ("{}"), which every
  third row keeps; the others carry messages and response as with store_prompts_in_spend_logs.
- bad_input.jsonl: one example of each common kind of bad line, between re-delivered good lines.

Run: python sample_logs/make_samples.py [path/to/proxy_calls.jsonl]
"""

from __future__ import annotations

import gzip
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPTURE = HERE.parent.parent / "shared" / "litellm-capture" / "proxy_calls.jsonl"


def iso_ms(epoch: float | None, naive: bool = True) -> str | None:
    if epoch is None:
        return None
    dt = datetime.fromtimestamp(round(epoch, 3), tz=UTC)
    text = dt.isoformat(timespec="milliseconds")
    return text.replace("+00:00", "") if naive else text


def spend_row(slp: dict, store_prompts: bool, naive: bool) -> dict:
    md = slp["metadata"]
    clean_md = {
        "user_api_key": md.get("user_api_key_hash"),
        "user_api_key_alias": md.get("user_api_key_alias"),
        "user_api_key_team_id": md.get("user_api_key_team_id"),
        "user_api_key_org_id": md.get("user_api_key_org_id"),
        "user_api_key_user_id": md.get("user_api_key_user_id"),
        "user_api_key_team_alias": md.get("user_api_key_team_alias"),
        "spend_logs_metadata": md.get("spend_logs_metadata"),
        "requester_ip_address": md.get("requester_ip_address"),
        "user_agent": md.get("user_agent"),
        "status": slp["status"],
        "error_information": slp.get("error_information"),
        "usage_object": md.get("usage_object"),
        "cost_breakdown": slp.get("cost_breakdown"),
        "litellm_call_id": slp["litellm_call_id"],
        "additional_usage_values": {},
    }
    return {
        "request_id": slp["id"],
        "call_type": slp["call_type"],
        "api_key": md.get("user_api_key_hash") or "",
        "spend": slp["response_cost"],
        "total_tokens": slp["total_tokens"],
        "prompt_tokens": slp["prompt_tokens"],
        "completion_tokens": slp["completion_tokens"],
        "startTime": iso_ms(slp["startTime"], naive),
        "endTime": iso_ms(slp["endTime"], naive),
        "request_duration_ms": round((slp["endTime"] - slp["startTime"]) * 1000),
        "completionStartTime": iso_ms(slp.get("completionStartTime"), naive),
        "model": slp["model"],
        "model_id": slp.get("model_id") or "",
        "model_group": slp.get("model_group") or "",
        "custom_llm_provider": slp.get("custom_llm_provider") or "",
        "api_base": slp.get("api_base") or "",
        "user": md.get("user_api_key_user_id") or "",
        "metadata": json.dumps(clean_md),
        "cache_hit": str(bool(slp.get("cache_hit"))),
        "cache_key": "Cache OFF",
        "request_tags": json.dumps(slp.get("request_tags") or []),
        "team_id": md.get("user_api_key_team_id") or "",
        "organization_id": md.get("user_api_key_org_id") or "",
        "end_user": slp.get("end_user") or "",
        "requester_ip_address": slp.get("requester_ip_address"),
        "messages": json.dumps(slp["messages"]) if store_prompts else "{}",
        "response": json.dumps(slp["response"]) if store_prompts else "{}",
        "session_id": slp.get("session_id") or slp.get("trace_id"),
        "status": slp["status"],
        "mcp_namespaced_tool_name": None,
        "agent_id": None,
        "proxy_server_request": "{}",
        "litellm_call_id": slp["litellm_call_id"],
        "created_at": iso_ms(slp["endTime"], naive),
        "updated_at": iso_ms(slp["endTime"], naive),
    }


def main() -> None:
    capture = Path(sys.argv[1]) if len(sys.argv) > 1 else CAPTURE
    lines = capture.read_bytes().splitlines(keepends=True)
    with open(HERE / "proxy_calls.jsonl.1.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.writelines(lines[:20])
    (HERE / "proxy_calls.jsonl").write_bytes(b"".join(lines[20:]))

    records = [json.loads(line) for line in lines]
    with open(HERE / "spend_logs_export.jsonl", "w") as out:
        for i, slp in enumerate(records):
            out.write(json.dumps(spend_row(slp, store_prompts=i % 3 != 0, naive=i % 4 != 3)) + "\n")

    good = lines[0].decode().rstrip("\n")
    wrong_type = json.loads(good)
    wrong_type["startTime"] = "yesterday"
    no_times = json.loads(good)
    del no_times["startTime"], no_times["endTime"]
    no_ids = json.loads(good)
    no_ids["litellm_call_id"] = None
    no_ids["id"] = None
    # A re-delivered line that starts no other file: a file is known by its first line, and one
    # starting as the gzip does, shorter than it and just written (a fresh clone), waits as a
    # truncated copy would (the quick start then quarantined nothing).
    bad = [
        lines[1].decode().rstrip("\n"),
        '{"id": "chatcmpl-broken", "litellm_call_id": "0000-broken", "startTime": 1795788109.3,',
        json.dumps(wrong_type),
        json.dumps(no_times),
        json.dumps(no_ids),
        '"not an object"',
        good,
    ]
    with open(HERE / "bad_input.jsonl", "wb") as out:
        out.write(("\n".join(bad) + "\n").encode())
        out.write(b'{"id": "latin1-\xe9t\xe9", "startTime": 1.0, "endTime": 2.0}\n')
        out.write(good[: len(good) // 2].encode())


if __name__ == "__main__":
    main()
