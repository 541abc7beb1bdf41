"""Which file names are logs: the names LiteLLM's loggers, ours and rotation tools give them. Its
own light module, so a backfill can size its input before anything heavy is imported."""

from __future__ import annotations

import re

LOG_NAME = re.compile(r"\.(jsonl|ndjson|json|log)(\.\d+)?(\.gz)?$|\.(jsonl|ndjson|log)[.-][\w.-]*$")
SCRATCH_SUFFIXES = (".lock", ".tmp")
"""A logger's lock file and half-written rotation copies (``proxy.jsonl.lock`` of ours): never logs."""


def is_log_file(name: str) -> bool:
    """Names LiteLLM loggers and rotation tools produce: x.jsonl, x.jsonl.1, x.jsonl.2.gz, x.log-20260101."""
    return bool(LOG_NAME.search(name)) and not name.endswith(SCRATCH_SUFFIXES)
