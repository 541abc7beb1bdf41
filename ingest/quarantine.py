"""Quarantine: where a record that cannot become a span goes, with enough to find and fix it.

One JSON object per line: source file, 1-based line number, byte offset of the line's start
(in the uncompressed stream), a reason code, a human-readable detail, and the raw line capped in
size. The good records around a bad one are never held back by it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import stat
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

RAW_CAP_BYTES = 64 * 1024

log = logging.getLogger("litellm-ingest.quarantine")


def first_line(e: BaseException | str, limit: int = 200) -> str:
    """An error in one line of at most ``limit`` characters (its type's name if it says nothing),
    for a log line, a quarantine reason or a one-line failure."""
    text = e if isinstance(e, str) else str(e)
    return (text.splitlines() or [""])[0][:limit] or type(e).__name__


class Reason(enum.StrEnum):
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
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    TOO_DEEP = "too_deep"


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


def _refuse_a_pipe(path: Path) -> None:
    """A pipe or a socket named as the quarantine file: a write there waits for a reader, for ever."""
    with contextlib.suppress(FileNotFoundError):
        mode = os.stat(path).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise OSError(errno.EINVAL, "a pipe or a socket is no quarantine file", str(path))


class QuarantineUnwritable(Exception):
    """The quarantine file cannot take records: a run must not go on and leave them unsaid (exit 7,
    as for a state that cannot be written)."""


REMEDY = "(--quarantine-file; default <state dir>/quarantine.jsonl)"


def unwritable(path: Path) -> str | None:
    """Why ``path`` cannot take quarantine records, told before a run reads a line; None when it can,
    or may (a full disk is met only by the write). The file is not made: a run that quarantines
    nothing leaves none."""
    try:
        _refuse_a_pipe(path)
        if path.is_dir():
            return "it is a folder"
        if path.exists():
            return None if os.access(path, os.W_OK) else "permission denied"
        folder = next((p for p in path.parents if os.path.lexists(p)), None)
        if folder is None or not folder.is_dir():
            return f"{folder} is no folder"
        return None if os.access(folder, os.W_OK | os.X_OK) else f"permission denied in {folder}"
    except OSError as e:
        return e.strerror or str(e)


def cannot_write(path: Path | None) -> str | None:
    """The line that says ``path`` cannot take quarantine records (:func:`unwritable`); None when it can."""
    if path is None or (why := unwritable(path)) is None:
        return None
    return f"cannot write the quarantine file {path}: {why} {REMEDY}"


class QuarantineWriter:
    """Appends quarantine records; a run that quarantines nothing creates no file.

    A file that cannot be written (disk full, read-only) stops a cron run (one line, exit 7; its
    checkpoint stays, so the next run quarantines the same lines again); one that cannot be
    written at all (a folder, no permission) stops it before it reads a line (:func:`unwritable`).
    The daemon (``hold``) must not stop sending the good calls for it: what cannot be written is
    kept in memory, up to ``HOLD_CAP_BYTES``, and written by the next pass that can; every record it
    has to let go of is named in the log with its file, line and reason, never dropped in silence."""

    HOLD_CAP_BYTES = 8 * 1024 * 1024

    def __init__(self, path: Path | None, hold: bool = False) -> None:
        self.path = path
        self.hold = hold
        self.counts: dict[str, int] = {}
        self.unwritten: list[tuple[bytes, QuarantineRecord]] = []
        self.failing: str | None = None
        self._torn = False
        self._said = 0.0
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
            at = datetime.now(UTC).isoformat()
            self.unwritten += [(orjson.dumps({**asdict(r), "quarantined_at": at}) + b"\n", r) for r in records]
            self._flush()

    def retry(self) -> None:
        """Write what a full disk kept back (the daemon, every pass)."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self.unwritten or self.path is None:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _refuse_a_pipe(self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o600)
            done = 0
            try:
                if self._torn and _ends_mid_line(self.path):
                    os.write(fd, b"\n")
                for line, _ in self.unwritten:
                    view = memoryview(line)
                    while view:
                        view = view[os.write(fd, view) :]
                    done += 1
            finally:
                os.close(fd)
                del self.unwritten[:done]
        except OSError as e:
            self._torn = True
            if not self.hold:
                raise QuarantineUnwritable(
                    f"cannot write the quarantine file {self.path}: {e.strerror or e} {REMEDY}; the run stops "
                    "here, and the next run reads these lines again"
                ) from e
            self._held_back(e)
            return
        if self.failing is not None:
            log.warning("the quarantine file %s is written again", self.path)
        self.failing, self._torn = None, False

    def _held_back(self, e: OSError) -> None:
        self.failing = f"{e.strerror or e}: {self.path}"
        size = sum(len(line) for line, _ in self.unwritten)
        while self.unwritten and size > self.HOLD_CAP_BYTES:
            line, r = self.unwritten.pop(0)
            size -= len(line)
            log.warning("quarantine record not kept (%s): %s line %d, %s: %s", self.failing, r.source, r.line, r.reason, r.detail)
        if time.monotonic() - self._said >= 60:
            self._said = time.monotonic()
            log.warning("cannot write the quarantine file (%s); %d record(s) kept in memory and written when it can be",
                        self.failing, len(self.unwritten))  # fmt: skip

    def abandon(self) -> None:
        """At exit: the records still unwritten are named in the log (their lines stay in the logs)."""
        with self._lock:
            for _, r in self.unwritten:
                log.warning("quarantine record not written (%s): %s line %d, %s: %s", self.failing, r.source, r.line, r.reason, r.detail)
            self.unwritten = []


def _ends_mid_line(path: Path) -> bool:
    """A write cut short by a full disk left part of a line: the next one must not continue it."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False
