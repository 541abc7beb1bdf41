"""Replay a LiteLLM log through LiteLLM's own ``mlflow`` callback (its ``MlflowLogger``, run in the
proxy's venv): the traces that callback would have written live for those calls, into
``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME``. Prints how many records it replayed.

    python callback_replay.py LOG.jsonl
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import litellm
from litellm.integrations.mlflow import MlflowLogger


def main(path: str) -> None:
    logger = MlflowLogger()
    replayed = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            kwargs = {
                "litellm_call_id": r["litellm_call_id"],
                "call_type": r["call_type"],
                "model": r["model"],
                "messages": r.get("messages"),
                "standard_logging_object": r,
                "optional_params": {},
            }
            start, end = (datetime.fromtimestamp(r[k], tz=UTC) for k in ("startTime", "endTime"))
            if r["status"] == "success":
                response = r.get("response")
                if isinstance(response, dict) and "choices" in response:
                    response = litellm.ModelResponse(**response)
                logger._handle_success(kwargs, response, start, end)
            else:
                logger._handle_failure(kwargs, None, start, end)
            replayed += 1
    print(replayed)


if __name__ == "__main__":
    main(sys.argv[1])
