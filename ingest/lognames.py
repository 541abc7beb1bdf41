"""Which file names are logs: the names LiteLLM's loggers, ours and rotation tools give them. Its
own light module, so a backfill can size its input before anything heavy is imported."""

from __future__ import annotations

import re

COMPRESSED_SUFFIX = r"(?:\.(?:gz|xz|bz2|zst))?"
"""What rotation's compression appends to a name (gzip, xz, bzip2, zstd)."""
LOG_NAME = re.compile(rf"\.(jsonl|ndjson|json|log)(\.\d+)?{COMPRESSED_SUFFIX}$|\.(jsonl|ndjson|log)[.-][\w.-]*$")
SCRATCH_SUFFIXES = (".lock", ".tmp")
"""A logger's lock file and half-written rotation copies (``proxy.jsonl.lock`` of ours): never logs."""


def is_log_file(name: str) -> bool:
    """Names LiteLLM loggers and rotation tools produce: x.jsonl, x.jsonl.1, x.jsonl.2.gz (or .xz, .bz2, .zst), x.log-20260101."""
    return bool(LOG_NAME.search(name)) and not name.endswith(SCRATCH_SUFFIXES)


_ROTATED = re.compile(r"^.*\.(?:jsonl|ndjson|json|log)(?P<rest>(?:[.-].*)?)$", re.DOTALL)
"""The last log extension and what rotation appended to it: a host name in the file's name
(``litellm-api.log-collector.jsonl``, the logger's ``{host}``) is no rotation suffix."""
_NUMBERED = re.compile(rf"\.(\d+){COMPRESSED_SUFFIX}$")


def rotation_rank(name: str) -> tuple[int, int]:
    """Orders files of one modification time (timestamps tick every few milliseconds, so a rotation
    and the first write after it often share one) by rotation age: ``x.jsonl.2.gz`` before
    ``x.jsonl.1`` before ``x.jsonl-20261201`` before the live ``x.jsonl``. By name alone the live file
    would come first, and a fallback at the top of it be read before the failed primary that ends
    the rotated file."""
    m = _ROTATED.search(name)
    if m is None or not m.group("rest"):
        return (1, 0)
    numbered = _NUMBERED.fullmatch(m.group("rest"))
    return (0, -int(numbered.group(1))) if numbered else (0, 0)


def stream_of(name: str) -> str:
    """The log a file is a generation of: ``x.jsonl.2.gz``, ``x.jsonl.1``, ``x.jsonl-20261201`` and
    ``x.jsonl`` are all ``x.jsonl`` (one writer's, whose retries straddle its rotations)."""
    m = _ROTATED.search(name)
    return name if m is None else name[: m.start("rest")]
