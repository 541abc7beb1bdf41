"""Checkpoints: per file, how far the ingester got, kept beside the pipeline.

One versioned JSON document per (mode, destination), written Vector-style: to a tmp file,
fsync'd, renamed over the stable file, so a crash leaves one whole state; a surviving tmp file
is preferred on load if it is complete. A checkpoint names, for a file fingerprint, the byte
after the last line that was fully handled. The lines of calls MLflow has not acknowledged yet
(held for a retry or fallback, or in flight when the run stopped) are kept in the same document
by content, with the file, line and offset they came from: a rotation that renames, compresses,
truncates or deletes their file cannot take them away, and they are fed first on the next run.
Version 1 named held lines by offset only; it is read and upgraded.

A lock file (``flock``) keeps two runs of the same state from working at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STATE_VERSION = 2
READ_VERSIONS = (1, 2)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Checkpoint:
    fingerprint: str
    path: str
    offset: int = 0
    line: int = 1
    size: int | None = None
    updated_at: str | None = None
    done: bool = False
    tail: str | None = None
    legacy_held: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Checkpoint:
        return cls(
            fingerprint=d["fingerprint"],
            path=d["path"],
            offset=int(d.get("offset", 0)),
            line=int(d.get("line", 1)),
            legacy_held=[(int(o), int(n)) for o, n in d.get("held", [])],
            size=d.get("size"),
            updated_at=d.get("updated_at"),
            done=bool(d.get("done", False)),
            tail=d.get("tail"),
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.legacy_held:
            del d["legacy_held"]
        else:
            d["held"] = d.pop("legacy_held")
        return d


HELD_FIELDS = ("file", "source", "line", "offset", "raw")


class LockedError(Exception):
    """Another run holds this state's lock."""


@dataclass
class State:
    """The checkpoints of one mode (batch, backfill) for one destination."""

    path: Path
    mode: str
    destination: dict[str, Any]
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)
    held: list[dict[str, Any]] = field(default_factory=list)
    recent: list[dict[str, Any]] = field(default_factory=list)
    last_run: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, mode: str, destination: dict[str, Any]) -> State:
        doc = _read_json(path.with_suffix(path.suffix + ".tmp")) or _read_json(path) or {}
        state = cls(path, mode, destination)
        for d in doc.get("checkpoints", []):
            ck = Checkpoint.from_dict(d)
            state.checkpoints[ck.fingerprint] = ck
        state.held = [h for h in doc.get("held", []) if _is_line(h)]
        state.recent = [h for h in doc.get("recent", []) if _is_line(h)]
        state.last_run = doc.get("last_run", {})
        state.extra = doc.get("extra", {})
        return state

    def document(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "destination": self.destination,
            "checkpoints": [c.as_dict() for c in self.checkpoints.values()],
            "held": self.held,
            "recent": self.recent,
            "last_run": self.last_run,
            "extra": self.extra,
        }

    def save(self) -> None:
        doc = self.document()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[State]:
        """Hold this state's lock for a run; raise LockedError at once if another run has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_suffix(".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise LockedError(f"another run holds the lock {lock_path} (pid {holder})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield self
        finally:
            os.close(fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") not in READ_VERSIONS:
        return None
    return doc


def _is_line(h: Any) -> bool:
    return isinstance(h, dict) and all(k in h for k in HELD_FIELDS)


def destination_key(tracking_uri: str, experiment_id: str) -> dict[str, Any]:
    """What a state belongs to. A relative SQLite path is made absolute: two working directories
    each with their own ``sqlite:///mlflow.db`` are two destinations, not one."""
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        tracking_uri = "sqlite:///" + str(Path(tracking_uri[len("sqlite:///") :]).resolve())
    return {"tracking_uri": tracking_uri, "experiment_id": experiment_id}


def state_path(state_dir: Path, mode: str, key: dict[str, Any]) -> Path:
    """One state file per mode and destination (and, for backfill, per input selection)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return state_dir / f"{mode}-{digest}.json"


def all_states(state_dir: Path) -> list[dict[str, Any]]:
    """Every state document in a state dir (for ``status``)."""
    out = []
    for p in sorted(state_dir.glob("*.json")):
        doc = _read_json(p)
        if doc is not None:
            out.append({"file": str(p), **doc})
    return out
