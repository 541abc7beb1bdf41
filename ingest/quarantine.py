"""Quarantine: where a record that cannot become a span goes, with enough to find and fix it.

One JSON object per line: source file, 1-based line number, byte offset of the line's start
(in the uncompressed stream), a reason code, a human-readable detail, and the raw line capped in
size. The good records around a bad one are never held back by it.
"""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import orjson

RAW_CAP_BYTES = 64 * 1024


class Reason(str, enum.Enum):
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    TRUNCATED_LINE = "truncated_line"
    NOT_AN_OBJECT = "not_an_object"
    WRONG_TYPE = "wrong_type"
    MISSING_TIME = "missing_time"
    BAD_TIME = "bad_time"
    MISSING_ID = "missing_id"
    LINE_TOO_LONG = "line_too_long"
    UNBUILDABLE = "unbuildable"
    UNWRITABLE = "unwritable"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class QuarantineRecord:
    source: str
    line: int
    offset: int
    reason: str
    detail: str
    raw: str
    raw_truncated: bool

    @classmethod
    def of(cls, source: str, line: int, offset: int, reason: Reason, detail: str, raw: bytes | str) -> QuarantineRecord:
        data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
        capped = data[:RAW_CAP_BYTES]
        return cls(
            source=source,
            line=line,
            offset=offset,
            reason=reason.value,
            detail=detail,
            raw=capped.decode("utf-8", "backslashreplace"),
            raw_truncated=len(data) > RAW_CAP_BYTES,
        )


class QuarantineWriter:
    """Appends quarantine records; a run that quarantines nothing creates no file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def write(self, records: list[QuarantineRecord]) -> None:
        if not records:
            return
        with self._lock:
            for r in records:
                self.counts[r.reason] = self.counts.get(r.reason, 0) + 1
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            at = datetime.now(timezone.utc).isoformat()
            payload = b"".join(orjson.dumps({**asdict(r), "quarantined_at": at}) + b"\n" for r in records)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, payload)
            finally:
                os.close(fd)
