"""Checkpoints: per file, how far the ingester got, kept beside the pipeline.

One versioned JSON document per (mode, destination), written Vector-style: to a tmp file,
fsync'd, renamed over the stable file, so a crash leaves one whole state; a surviving tmp file
is preferred on load if it is complete. A checkpoint names, for a file fingerprint, the byte
after the last line that was fully handled. The lines of calls MLflow has not acknowledged yet
(held for a retry or fallback, or in flight when the run stopped) are kept in the same document
by content, with the file, line and offset they came from: a rotation that renames, compresses,
truncates or deletes their file cannot take them away, and they are fed first on the next run.
Version 1 named held lines by offset only; it is read and upgraded.

A state that cannot be trusted is never silently read as empty (that would re-read, and
re-send, everything): a file from a newer version or one that cannot be read is a
:class:`StateError` and nothing is overwritten; a corrupt one (unparseable, truncated) is copied
as ``<file>.corrupt-<UTC time>`` with a warning and the run starts from an empty state
(harmless, ids are deterministic, but the user is told).

A lock file (``flock``) keeps two runs of the same state from working at once.

A state of more than ``SETTLE_ABOVE`` files (a synced bucket of a per-call logger: one file per
call) would make every step rewrite a document that grows with every file ever read. Its
checkpoints are settled instead into a SQLite file beside it (``<state>.files.sqlite``), and the
document keeps only those changed since: it is written first, then they are upserted, so a crash
between the two finds them in the document, which wins on load. They are read when a run asks for
them, by fingerprint or by ``end_stat`` (an index on the row's JSON, so a version that writes rows
without knowing it keeps it right), never all at a load: a run costs what its files do, not every
file the state ever read. The rows belong to the document that names their generation: a state
deleted, replaced or bound to a new experiment starts from none of them.

The checkpoint of a file gone from where it was last read is forgotten a grace after a look first
found it gone (:meth:`State.forget_gone`), from the document and the database alike: a folder
whose old logs are deleted keeps a state as small as what is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import stat
import uuid
import weakref
from collections.abc import Callable, Collection, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

STATE_VERSION = 3
SETTLE_ABOVE = 1000
"""More checkpoints than this are settled into the files database (see the module doc)."""
FORGET_AFTER_S = 86400.0
"""How long a file is gone from its last known path before its checkpoint is forgotten (``--forget-gone-after``)."""
FORGET_LOOK_S = 3600.0
"""Looks for files gone are at most this often (a stat per file the state knows)."""
FILES_LOOKED = "files_looked"
"""The state's ``extra`` key: when the last look for files gone was."""
FILES_DB_SUFFIX = ".files.sqlite"
END_STAT = "CASE WHEN json_valid(doc) THEN json_extract(doc, '$.end_stat') END"
FILES_DDL = (
    "CREATE TABLE IF NOT EXISTS files (fingerprint TEXT PRIMARY KEY, generation TEXT NOT NULL, doc TEXT NOT NULL) WITHOUT ROWID",
    f"CREATE INDEX IF NOT EXISTS files_end_stat ON files (generation, {END_STAT})",
)
"""The files database; its index on an expression of ``doc`` is kept right by any version that writes a row."""


def _v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 1 named held lines by offset in each checkpoint; they stay there as ``legacy_held``
    and are read from their file once, then saved by content."""
    return {**doc, "version": 2, "held": [], "recent": []}


def _v2_to_v3(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 3 is version 2 as the versions that added digests with a line's start (``2:``),
    ``end_stat``, ``edge`` and the files database write it: unchanged, the number tells a version
    that knows none of them to refuse the state rather than read its files again, or whole."""
    return {**doc, "version": 3}


_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2, 2: _v2_to_v3}
"""Version n -> n + 1, for every n < STATE_VERSION: an older state is upgraded, never discarded."""

log = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
    end_stat: str | None = None
    """``device:inode:size:mtime_ns`` of the file when it was read to its end: a run that finds it
    so skips it unopened (:meth:`ingest.follow.Follower.unchanged`)."""
    edge: str | None = None
    """``--shard``: the fingerprint of another shard's file that followed this one when its end was
    last read with that file's head (:func:`ingest.pipeline._ingest_shard`)."""
    gone_at: str | None = None
    """When a look first found nothing at ``path`` (:meth:`State.forget_gone`); cleared when it is back."""

    changes = 0
    """How many times a field was set (not a field itself)."""

    def __setattr__(self, name: str, value: Any) -> None:
        """Every change is counted, and reported to the state holding this checkpoint (:class:`Checkpoints`)."""
        object.__setattr__(self, name, value)
        object.__setattr__(self, "changes", self.changes + 1)
        owner = self.__dict__.get("_owner")
        if owner is not None:
            owner._touched(self)

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
            end_stat=d["end_stat"] if isinstance(d.get("end_stat"), str) else None,
            edge=d["edge"] if isinstance(d.get("edge"), str) else None,
            gone_at=d["gone_at"] if isinstance(d.get("gone_at"), str) else None,
        )

    def as_dict(self) -> dict[str, Any]:
        """Field by field, not ``dataclasses.asdict`` (its deep copy was most of a save of a state
        with thousands of files)."""
        d = {
            "fingerprint": self.fingerprint,
            "path": self.path,
            "offset": self.offset,
            "line": self.line,
            "size": self.size,
            "updated_at": self.updated_at,
            "done": self.done,
            "tail": self.tail,
        }
        if self.legacy_held:
            d["held"] = list(self.legacy_held)
        if self.end_stat is not None:
            d["end_stat"] = self.end_stat
        if self.edge is not None:
            d["edge"] = self.edge
        if self.gone_at is not None:
            d["gone_at"] = self.gone_at
        return d


class Checkpoints(MutableMapping[str, Checkpoint]):
    """A state's checkpoints by key, with those set or changed since they were last settled
    (``changed``): a save finds them without a walk over every file the state knows. Those settled
    in the files database are read when asked for (by key, or by :meth:`with_end_stats`): a run
    costs what its files do, not every file the state ever read. A walk reads them all.

    Once settled and unchanged, a checkpoint is held only weakly: a daemon over a folder of per-call
    files keeps in memory the checkpoints of the files it follows (their ``Followed`` hold them), not
    one for every file it ever read. A live one is always the one given out, so a change to it is
    seen whoever holds it; one let go is read from the database again when asked for."""

    def __init__(self, settled: Settled | None = None) -> None:
        self._held: dict[str, Checkpoint] = {}
        """Checkpoints the database lacks as they are (all of them while there is no database)."""
        self._weak: weakref.WeakValueDictionary[str, Checkpoint] = weakref.WeakValueDictionary()
        """Settled and unchanged since: the database has them as they are."""
        self.changed: dict[str, Checkpoint] = {}
        self._settled = settled
        self._new: set[str] = set()
        """Keys held here that the files database does not have yet (``len`` is its count and theirs)."""
        self._forgotten: set[str] = set()
        """Keys forgotten (:meth:`forget`) whose rows the files database still has, until the next settle deletes them."""

    def _live(self, key: str) -> Checkpoint | None:
        ck = self._held.get(key)
        return ck if ck is not None else self._weak.get(key)

    def _take(self, ck: Checkpoint) -> Checkpoint:
        """A checkpoint read from the files database: the live one of its key if there is one, else
        this one, held weakly (it is as settled)."""
        if (live := self._live(ck.fingerprint)) is not None:
            return live
        self._weak[ck.fingerprint] = ck
        object.__setattr__(ck, "_owner", self)
        return ck

    def _touched(self, ck: Checkpoint) -> None:
        """``ck`` changed: if it is this state's checkpoint of its key, the next save writes it."""
        key = ck.fingerprint
        if self._held.get(key) is ck:
            self.changed[key] = ck
        elif self._weak.get(key) is ck:
            del self._weak[key]
            self._held[key] = self.changed[key] = ck

    def __getitem__(self, key: str) -> Checkpoint:
        if (ck := self._live(key)) is not None:
            return ck
        if self._settled is not None and key not in self._forgotten and (ck := self._settled.get(key)) is not None:
            return self._take(ck)
        raise KeyError(key)

    def __setitem__(self, key: str, ck: Checkpoint) -> None:
        if self._settled is not None and key not in self and key not in self._settled.bad:
            self._new.add(key)
        self._weak.pop(key, None)
        self._forgotten.discard(key)  # its file came back: the row is written anew, not deleted
        self._held[key] = ck
        object.__setattr__(ck, "_owner", self)
        self.changed[key] = ck

    def __delitem__(self, key: str) -> None:
        raise TypeError("checkpoints are dropped only by forget(): a file gone for good, whose copy returning would be read again")

    def forget(self, key: str) -> None:
        """Drop the checkpoint of a file gone for good (:meth:`State.forget_gone`); its row in the files
        database is deleted at the next settle, after the document that no longer counts it."""
        ck = self._held.pop(key, None) or self._weak.pop(key, None)
        if ck is not None:
            object.__setattr__(ck, "_owner", None)
        self.changed.pop(key, None)
        if self._settled is not None and key not in self._new and key not in self._forgotten:
            self._forgotten.add(key)
            self._settled.count -= 1
        self._new.discard(key)

    def take_forgotten(self) -> set[str]:
        """The keys whose rows are to be deleted now (given back by :meth:`unforget` if that fails)."""
        out, self._forgotten = self._forgotten, set()
        return out

    def unforget(self, keys: set[str]) -> None:
        self._forgotten |= keys

    def places(self) -> Iterator[tuple[str, Any, Any, Any]]:
        """(key, path, gone_at, end_stat) of every checkpoint, those settled read from the files database
        a page at a time, as text (no checkpoint is built): a look over a million files costs their stats."""
        seen: set[str] = set()
        for key, ck in [*self._held.items(), *self._weak.items()]:
            seen.add(key)
            yield key, ck.path, ck.gone_at, ck.end_stat
        if self._settled is not None:
            for key, path, gone_at, end_stat in self._settled.places():
                if key not in seen and key not in self._forgotten:
                    yield key, path, gone_at, end_stat

    def __iter__(self) -> Iterator[str]:
        keys = dict.fromkeys(self._held)
        keys.update(dict.fromkeys(self._weak.keys()))
        if self._settled is not None:
            keys.update(dict.fromkeys(ck.fingerprint for ck in self._settled.all() if ck.fingerprint not in self._forgotten))
        return iter(list(keys))

    def values(self) -> list[Checkpoint]:  # type: ignore[override]
        """Every checkpoint, those settled read in one query (not one per key)."""
        out = dict(self._weak.items())  # only the live ones, even if one dies meanwhile
        out.update(self._held)
        if self._settled is not None:
            for ck in self._settled.all():
                if ck.fingerprint not in out and ck.fingerprint not in self._forgotten:
                    out[ck.fingerprint] = self._take(ck)
        return list(out.values())

    def __len__(self) -> int:
        return len(self._held) if self._settled is None else self._settled.count + len(self._new)

    def clear(self) -> None:
        self.close()
        self._held.clear()
        self._weak.clear()
        self.changed.clear()
        self._settled = None
        self._new.clear()
        self._forgotten.clear()

    def attach(self, settled: Settled, in_it: set[str]) -> None:
        """The files database was just made, with the checkpoints of keys ``in_it`` (a run passed
        ``SETTLE_ABOVE`` files): from now on those unchanged since are held weakly, as after a load."""
        self._settled = settled
        self._new = {k for k in self._held if k not in in_it}
        for key in [k for k in self._held if k not in self.changed]:
            self._weak[key] = self._held.pop(key)

    def with_end_stats(self, keys: set[str]) -> dict[str, Checkpoint]:
        """The checkpoints whose ``end_stat`` is one of ``keys``, by it: an indexed look-up, not a walk."""
        out = {c.end_stat: c for c in self._held.values() if c.end_stat in keys}
        if self._settled is not None and keys:
            for ck in self._settled.with_end_stats(keys):
                if ck.fingerprint not in self._held and ck.fingerprint not in self._forgotten and ck.end_stat is not None:
                    out.setdefault(ck.end_stat, self._take(ck))
        return out

    def end_stats(self) -> dict[str, str]:
        """Every ``end_stat`` with its key (a daemon's start), read as text: no checkpoint is built."""
        skip = self._held.keys() | self._forgotten
        out = {} if self._settled is None else {s: fp for fp, s in self._settled.end_stats() if fp not in skip}
        out.update((c.end_stat, c.fingerprint) for c in self._held.values() if c.end_stat)
        return out

    def close(self) -> None:
        """Close the files database (opened again when asked)."""
        if self._settled is not None:
            self._settled.close()

    def settled(self, ck: Checkpoint, changes: int) -> None:
        """``ck`` as it was at ``changes`` is in the files database: unless it changed since, no document
        needs it, and it is held weakly."""
        key = ck.fingerprint
        if self._settled is not None and key in self._new:
            self._new.discard(key)
            self._settled.count += 1
        if ck.changes == changes and self.changed.get(key) is ck:
            del self.changed[key]
            if self._settled is not None and self._held.get(key) is ck:
                self._weak[key] = self._held.pop(key)


HELD_FIELDS = ("file", "source", "line", "offset", "raw")


class LockedError(Exception):
    """Another run holds this state's lock."""


class StateError(Exception):
    """A state file that must not be replaced (written by a newer version, or unreadable), or one
    that cannot be written."""


class CorruptState(ValueError):
    """A state file that is not a whole state document (unparseable, truncated, wrong shape)."""


@dataclass
class State:
    """The checkpoints of one mode (batch, backfill) for one destination."""

    path: Path
    mode: str
    destination: dict[str, Any]
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    held: list[dict[str, Any]] = field(default_factory=list)
    recent: list[dict[str, Any]] = field(default_factory=list)
    last_run: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    corrupt_copy: Path | None = None
    experiment_created: int | None = None
    """The creation time of the experiment this state's lines were delivered to (see :meth:`bind`)."""
    replaced: str | None = None
    files_db: str | None = None
    """The generation of the settled checkpoints in the files database; None while they are all in the document."""
    settled_lost: int = 0
    """Checkpoints the document counted in the files database that it no longer has (their files are read again)."""
    _pending: list[tuple[Checkpoint, int, dict[str, Any]]] = field(default_factory=list, repr=False)
    _db: sqlite3.Connection | None = field(default=None, repr=False)
    _db_generation: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path, mode: str, destination: dict[str, Any]) -> State:
        """The saved state; a surviving whole tmp file wins (the crash came after it was written).

        Raises StateError for a newer or unreadable file; a corrupt one is copied aside (see module doc).
        """
        corrupt_copy = None
        try:
            doc = saved_document(path) or {}
        except CorruptState as e:
            corrupt_copy = path.with_name(f"{path.name}.corrupt-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
            try:
                shutil.copy2(path, corrupt_copy)
            except OSError as copy_error:
                raise StateError(f"the state file {path} is corrupt ({e}) and cannot be copied aside: {copy_error}") from e
            log.warning(
                "the state file %s is corrupt (%s): a copy is kept as %s; starting from an empty state (every file is read again)",
                path,
                e,
                corrupt_copy,
            )
            doc = {}
        state = cls.from_document(path, mode, destination, doc)
        state.corrupt_copy = corrupt_copy
        return state

    @classmethod
    def from_document(cls, path: Path, mode: str, destination: dict[str, Any], doc: dict[str, Any]) -> State:
        """The state a document :func:`read_state` returned holds."""
        state = cls(path, mode, destination)
        if (generation := _generation(doc)) is not None:
            state.files_db = generation
            state.checkpoints = Checkpoints(Settled(path.with_suffix(FILES_DB_SUFFIX), generation))
        for d in doc.get("checkpoints", []):
            ck = Checkpoint.from_dict(d)
            state.checkpoints[ck.fingerprint] = ck
        if state.files_db is not None:
            expected = doc["files_db"].get("files")
            if isinstance(expected, int) and (lost := expected - len(state.checkpoints)) > 0:
                state.settled_lost = lost
                log.warning("%s holds %d file checkpoints fewer than its state counts: those files are read again", state.db_path, lost)
        state.held = [h for h in doc.get("held", []) if _is_line(h)]
        state.recent = [h for h in doc.get("recent", []) if _is_line(h)]
        state.last_run = doc.get("last_run", {})
        state.extra = doc.get("extra", {})
        created = doc.get("experiment_created")
        state.experiment_created = created if isinstance(created, int) and not isinstance(created, bool) else None
        return state

    def bind(self, created_ms: int | None) -> bool:
        """Tie the state to the experiment it delivers to, by its creation time. A store deleted and
        made anew at the same address (``rm mlflow.db``, a dropped database) gives its experiment the
        same id, so the same state file: its checkpoints would skip every line the old store had,
        and the new one would never get them. Such a state starts over (every file is read again;
        the traces' ids are fixed, so nothing is doubled where they still exist). True if it did."""
        old = self.experiment_created
        if created_ms is None:
            return False
        self.experiment_created = created_ms
        if old is None or old == created_ms:
            return False
        self.checkpoints.clear()
        self.files_db = None
        self.held.clear()
        self.recent.clear()
        self.replaced = f"the experiment was created anew ({_iso_ms(created_ms)}; this state was for one created {_iso_ms(old)})"
        log.warning("%s: its checkpoints are dropped and every file is read again", self.replaced)
        return True

    @property
    def db_path(self) -> Path:
        return self.path.with_suffix(FILES_DB_SUFFIX)

    def document(self) -> dict[str, Any]:
        """The document to write; once settling, with only the checkpoints changed since they were settled."""
        if self.files_db is None and len(self.checkpoints) > SETTLE_ABOVE:
            self.files_db = uuid.uuid4().hex
        if self.files_db is None:
            checkpoints = [c.as_dict() for c in self.checkpoints.values()]
            self._pending = []
        else:
            changed = list(self.checkpoints.changed.values())
            checkpoints = [c.as_dict() for c in changed]
            self._pending = [(c, c.changes, d) for c, d in zip(changed, checkpoints, strict=True)]
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "destination": self.destination,
            "checkpoints": checkpoints,
            "held": self.held,
            "recent": self.recent,
            "last_run": self.last_run,
            "extra": self.extra,
            "experiment_created": self.experiment_created,
            **({"files_db": {"generation": self.files_db, "files": len(self.checkpoints)}} if self.files_db is not None else {}),
        }

    def save(self, data: bytes | None = None) -> None:
        """Write the state (``data``: its :meth:`document` encoded, if just done) whole or not at all; one
        that cannot be written (disk full, read-only) is a StateError naming it, the file before it untouched.
        Only its owner may read it: it holds the raw lines of calls not yet settled, an upstream 401
        quoting the key it was sent among them (MLflow gets them scrubbed)."""
        data = encode_state(self.document()) if data is None else data
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StateError(f"cannot write the state file {self.path}: {e.strerror or e}") from e
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._settle()

    def forget_gone(self, after_s: float, busy: Collection[str] = (), listed: Collection[str] = (), now: datetime | None = None) -> int:
        """Forget the checkpoints of files gone from their last known path for ``after_s`` (Filebeat's
        ``clean_removed``, Vector's expiry of removed files): a folder whose old logs are deleted
        keeps a state as small as what is left. A file gone is stamped at a look (``gone_at``) and
        forgotten at the first look ``after_s`` later that still finds nothing there; one back by
        then keeps its checkpoint. A forgotten file that comes back is read again, which doubles
        nothing (the trace ids are fixed). A file is there when its path holds it (:func:`holds`), or
        (``listed``: the stat keys of the files a daemon's scan found read to their end, unopened)
        when its ``end_stat`` is listed: a closed file renamed, the old name a rotation's new file. A
        run that finds a file under a new name (renamed, compressed) moves its path there.
        ``busy``: the keys of files a daemon still has open.
        Looks are at most ``min(after_s, FORGET_LOOK_S)`` apart, whatever runs them; ``after_s``
        0 never forgets. The number forgotten."""
        if after_s <= 0:
            return 0
        now = now or datetime.now(UTC)
        last = _when(self.extra.get(FILES_LOOKED))
        if last is not None and last <= now and (now - last).total_seconds() < min(after_s, FORGET_LOOK_S):
            return 0
        self.extra[FILES_LOOKED] = now.isoformat(timespec="milliseconds")
        gone: list[tuple[str, datetime | None]] = []
        back: list[str] = []
        for key, path, gone_at, end_stat in self.checkpoints.places():
            if key in busy or not isinstance(path, str) or not os.path.isabs(path):
                continue
            there = holds(path, end_stat)
            if there is None:  # unreadable is not gone: a folder without permission, a mount away
                continue
            if not there and end_stat not in listed:
                gone.append((key, _when(gone_at)))
            elif gone_at is not None:
                back.append(key)
        for key in back:
            if (ck := self.checkpoints.get(key)) is not None:
                ck.gone_at = None
        forgotten = 0
        for key, since in gone:
            if since is not None and since <= now and (now - since).total_seconds() >= after_s:
                self.checkpoints.forget(key)
                forgotten += 1
            elif (since is None or since > now) and (ck := self.checkpoints.get(key)) is not None:
                ck.gone_at = now.isoformat(timespec="milliseconds")
        return forgotten

    def _settle(self) -> None:
        """Upsert the checkpoints the document just written holds into the files database, after it:
        the next document can leave them out. Rows of an older generation are dropped, and those of
        checkpoints forgotten (the document no longer counts them)."""
        pending, self._pending = self._pending, []
        forgotten = self.checkpoints.take_forgotten()
        if self.files_db is None or not (pending or forgotten):
            return
        try:
            if self._db is None:
                from ingest.ledger import state_db

                self._db = state_db(self.db_path, *FILES_DDL)
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                if self._db_generation != self.files_db:
                    self._db.execute("DELETE FROM files WHERE generation <> ?", (self.files_db,))
                self._db.executemany("DELETE FROM files WHERE fingerprint = ?", [(k,) for k in sorted(forgotten)])
                self._db.executemany(
                    "INSERT INTO files (fingerprint, generation, doc) VALUES (?, ?, ?) "
                    "ON CONFLICT (fingerprint) DO UPDATE SET generation = excluded.generation, doc = excluded.doc",
                    [(c.fingerprint, self.files_db, orjson.dumps(d).decode()) for c, _, d in pending],
                )
        except sqlite3.Error as e:
            self.checkpoints.unforget(forgotten)
            raise StateError(f"cannot write the checkpoints database {self.db_path}: {e}") from e
        self._db_generation = self.files_db
        for c, changes, _ in pending:
            self.checkpoints.settled(c, changes)
        if (settled := self.checkpoints._settled) is None:
            with contextlib.suppress(StateError):  # not attached: every checkpoint stays in memory, as before the database
                self.checkpoints.attach(Settled(self.db_path, self.files_db), {c.fingerprint for c, _, _ in pending})
        else:
            settled.written()

    def _index(self) -> None:
        """A files database written before it was looked up by ``end_stat`` gets its index (a run
        with nothing to settle would otherwise scan it every time)."""
        settled = self.checkpoints._settled
        if self.files_db is None or self._db is not None or settled is None or settled.indexed():
            return
        from ingest.ledger import state_db

        with contextlib.suppress(StateError):  # a database that cannot be opened is said on its first settle
            self._db = state_db(self.db_path, *FILES_DDL)

    def close(self) -> None:
        self.checkpoints.close()
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextlib.contextmanager
    def read_only(self) -> Iterator[State]:
        """This state for a dry run: read as it is, without its lock (it writes nothing, so it
        neither waits for a run nor makes one fail for the lock)."""
        try:
            yield self
        finally:
            self.close()

    @contextlib.contextmanager
    def locked(self) -> Iterator[State]:
        """Hold this state's lock for a run; raise LockedError at once if another run has it."""
        lock_path = self.path.with_suffix(".lock")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StateError(f"cannot create the lock file {lock_path}: {e.strerror or e}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise LockedError(f"another run holds the lock {lock_path} (pid {holder})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._index()
            yield self
        finally:
            self.close()
            os.close(fd)


def holds(path: str, end_stat: Any) -> bool | None:
    """Whether ``path`` holds the file a checkpoint was taken on: one of its inode when it was read
    to its end (``end_stat``; a rotation's new file under the old name is another), else any file;
    None when it cannot be told. The device is not compared: an NFS mount may get another number."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):
        return None
    if not isinstance(end_stat, str):
        return True
    inode = end_stat.split(":")[1:2]
    return not inode or inode[0] == str(st.st_ino)


def _when(text: Any) -> datetime | None:
    """An ISO time this module wrote; None for anything else."""
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode_state(doc: dict[str, Any]) -> bytes:
    """The state as JSON (UTF-8, indented): orjson, ~30x faster than ``json`` with an indent (which
    has no C encoder), for a state of thousands of files or 8 MiB of held lines rewritten each step.
    Anything orjson refuses (a lone surrogate) goes through ``json``."""
    try:
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(doc, indent=1).encode()


def saved_document(path: Path) -> dict[str, Any] | None:
    """The state document saved at ``path``, as a run loads it: a whole ``<path>.tmp`` that survived
    its rename (the crash came after it was written) wins. Raises as :func:`read_state` for ``path``."""
    try:
        doc = read_state(path.with_suffix(path.suffix + ".tmp"))
    except (StateError, CorruptState):
        doc = None
    return doc if doc is not None else read_state(path)


def read_state(path: Path) -> dict[str, Any] | None:
    """A state document at the current version (older ones upgraded), None if there is no file.

    Raises StateError (newer version, unreadable) or CorruptState.
    """
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise StateError(f"cannot read the state file {path}: not a regular file")
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read the state file {path}: {e.strerror or e}") from e
    try:
        doc = json.loads(text)
        version = doc["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CorruptState(f"version {version!r}")
        if version > STATE_VERSION:
            raise StateError(
                f"the state file {path} was written by a newer litellm-ingest (state version {version}, this one reads "
                f"{STATE_VERSION}): upgrade litellm-ingest, or move the file away to start over"
            )
        while doc["version"] < STATE_VERSION:
            doc = _UPGRADES[doc["version"]](doc)
        if (problem := _shape_problem(doc)) is not None:
            raise CorruptState(problem)
        for d in doc.get("checkpoints", []):
            Checkpoint.from_dict(d)
    except (StateError, CorruptState):
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CorruptState(f"{type(e).__name__}: {str(e)[:120]}") from e
    return doc


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "fingerprint": (str,),
    "path": (str,),
    "offset": (int,),
    "line": (int,),
    "size": (int, type(None)),
    "updated_at": (str, type(None)),
    "done": (bool,),
    "tail": (str, type(None)),
}
_LINE_TYPES: dict[str, tuple[type, ...]] = {"file": (str,), "source": (str,), "line": (int,), "offset": (int,), "raw": (str,)}


def _typed(d: Any, types: dict[str, tuple[type, ...]], required: tuple[str, ...]) -> bool:
    """``d`` is an object whose fields have their types (an int is no bool), the ``required`` present."""
    if not isinstance(d, dict) or any(k not in d for k in required):
        return False
    return all(k not in d or (isinstance(d[k], t) and not (isinstance(d[k], bool) and bool not in t)) for k, t in types.items())


def _shape_problem(doc: Any) -> str | None:
    """What makes a parsed document no state (a file edited by hand, or by another program): a field
    of another type would be a traceback in ``status`` or a run's first save, not a state set aside."""
    if not isinstance(doc, dict):
        return "not a state document"
    for key, kind in (("checkpoints", list), ("held", list), ("recent", list), ("last_run", dict), ("extra", dict), ("destination", dict)):
        if not isinstance(doc.get(key, kind()), kind):
            return f"{key!r} is not a {kind.__name__}"
    if not isinstance(doc.get("mode", ""), str):
        return "'mode' is not text"
    for d in doc.get("checkpoints", []):
        if not _typed(d, _FIELD_TYPES, ("fingerprint", "path")):
            return f"a checkpoint of another shape: {str(d)[:120]}"
    for key in ("held", "recent"):
        if not all(_is_line(h) for h in doc.get(key, [])):
            return f"a line in {key!r} of another shape"
    return None


def _is_line(h: Any) -> bool:
    return _typed(h, _LINE_TYPES, HELD_FIELDS)


def destination_key(tracking_uri: str, experiment_id: str) -> dict[str, Any]:
    """What a state belongs to. A relative SQLite path is made absolute: two working directories
    each with their own ``sqlite:///mlflow.db`` are two destinations, not one."""
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        tracking_uri = "sqlite:///" + str(Path(tracking_uri[len("sqlite:///") :]).resolve())
    from ingest.stores import shown_uri

    return {"tracking_uri": shown_uri(tracking_uri), "experiment_id": experiment_id}


def state_path(state_dir: Path, mode: str, key: dict[str, Any]) -> Path:
    """One state file per mode and destination (and, for backfill, per input selection)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return state_dir / f"{mode}-{digest}.json"


def has_state(state_dir: Path, mode: str) -> bool:
    """Whether ``state_dir`` holds a state of ``mode`` for any destination (:func:`state_path`'s names)."""
    return any(state_dir.glob(f"{mode}-*.json"))


def all_states(state_dir: Path) -> list[dict[str, Any]]:
    """Every state in a state dir (for ``status``), read as a run reads it (a surviving tmp file wins,
    a field a run defaults is defaulted) and left as it is (a corrupt one is not copied aside). One
    that cannot be used says why in ``problem``; ``files_lost`` counts the checkpoints its files
    database no longer has (a run reads their files again). A state dir that cannot be listed is a
    StateError: "no state" would say nothing was ever ingested."""
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StateError(f"cannot read the state dir {state_dir}: {e.strerror or e}") from e
    out: list[dict[str, Any]] = []
    for name in sorted({n.removesuffix(".tmp") for n in names if n.endswith((".json", ".json.tmp"))}):
        p = state_dir / name
        mode = name.split("-")[0]
        try:
            doc = saved_document(p)
            if doc is not None:
                out.append({"file": str(p), **_as_shown(p, doc), "mode": doc.get("mode") or mode})
        except CorruptState as e:
            out.append({"file": str(p), "mode": mode, "problem": f"corrupt: {e}"})
        except StateError as e:
            out.append({"file": str(p), "mode": mode, "problem": str(e)})
    return out


def _as_shown(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with every checkpoint (those settled in the files database too) as a run reads it."""
    checkpoints = [Checkpoint.from_dict(d).as_dict() for d in doc.get("checkpoints", [])]
    last_run = doc.get("last_run", {})
    if not isinstance(last_run.get("summary", {}), dict):
        last_run = {k: v for k, v in last_run.items() if k != "summary"}
    lost = 0
    if (generation := _generation(doc)) is not None:
        inline = {d["fingerprint"] for d in checkpoints}
        checkpoints = [c.as_dict() for c in settled_checkpoints(path, generation) if c.fingerprint not in inline] + checkpoints
        counted = doc["files_db"].get("files")
        lost = max(counted - len(checkpoints), 0) if isinstance(counted, int) and not isinstance(counted, bool) else 0
    return {**doc, "checkpoints": checkpoints, "last_run": last_run, "files_lost": lost}


def _checkpoint(text: str) -> Checkpoint | None:
    """A row as a checkpoint; None for one that is not (left out: its file is read again)."""
    try:
        return Checkpoint.from_dict(orjson.loads(text))
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def _generation(doc: dict[str, Any]) -> str | None:
    files_db = doc.get("files_db")
    generation = files_db.get("generation") if isinstance(files_db, dict) else None
    return generation if isinstance(generation, str) else None


def settled_checkpoints(state_path: Path, generation: str) -> list[Checkpoint]:
    """The checkpoints of this generation in the files database beside a state, all of them (see :class:`Settled`)."""
    settled = Settled(state_path.with_suffix(FILES_DB_SUFFIX), generation)
    try:
        return settled.all()
    finally:
        settled.close()


class Settled:
    """The checkpoints of one generation in the files database beside a state, read when asked for
    (read-only). A missing or corrupt database has none (said once as a warning: their files are
    read again, which doubles nothing); one that cannot be read is a StateError."""

    def __init__(self, path: Path, generation: str) -> None:
        self.path, self.generation = path, generation
        self._db: sqlite3.Connection | None = None
        self._unusable = not path.exists()
        self.bad: set[str] = set()
        """Fingerprints whose row was found to be no checkpoint (counted in ``count``)."""
        counted = self._rows("SELECT count(*) FROM files WHERE generation = ?")
        self.count: int = counted[0][0] if counted else 0
        """Its rows, a row that is no checkpoint among them (left out when read: its file is read again)."""

    def _rows(self, sql: str, *params: object) -> list[tuple]:
        if self._unusable:
            return []
        from ingest.ledger import _is_corrupt, open_read_only

        try:
            if self._db is None:
                self._db = open_read_only(self.path, timeout=60)
            return self._db.execute(sql, (self.generation, *params)).fetchall()
        except sqlite3.DatabaseError as e:
            if _is_corrupt(e) or "no such table" in str(e):
                log.warning("the checkpoints database %s cannot be used (%s): its files are read again", self.path, e)
                self._unusable = True
                self.close()
                return []
            raise StateError(f"cannot read the checkpoints database {self.path}: {e}") from e

    def written(self) -> None:
        """Rows were just written to the database: one missing or set aside as corrupt at the load is
        there now, and is read (the checkpoints let go from memory are read from it)."""
        if self._unusable:
            self._unusable = False
            self.close()

    def indexed(self) -> bool:
        """Missing, unusable, or with its ``end_stat`` index."""
        return self._unusable or bool(self._rows("SELECT 1 FROM sqlite_master WHERE name = 'files_end_stat' AND ? IS NOT NULL"))

    def get(self, fingerprint: str) -> Checkpoint | None:
        rows = self._rows("SELECT doc FROM files WHERE generation = ? AND fingerprint = ?", fingerprint)
        if (ck := _checkpoint(rows[0][0]) if rows else None) is None and rows:
            self.bad.add(fingerprint)
        return ck

    def with_end_stats(self, keys: set[str]) -> list[Checkpoint]:
        sql = f"SELECT doc FROM files WHERE generation = ? AND {END_STAT} IN (SELECT value FROM json_each(?))"
        return [ck for (text,) in self._rows(sql, json.dumps(sorted(keys))) if (ck := _checkpoint(text)) is not None]

    def end_stats(self) -> list[tuple[str, str]]:
        sql = f"SELECT fingerprint, {END_STAT} FROM files WHERE generation = ? AND {END_STAT} IS NOT NULL"
        return [(fp, s) for fp, s in self._rows(sql) if isinstance(s, str)]

    def all(self) -> list[Checkpoint]:
        return [ck for (text,) in self._rows("SELECT doc FROM files WHERE generation = ?") if (ck := _checkpoint(text)) is not None]

    def places(self, page: int = 10_000) -> Iterator[tuple[str, Any, Any, Any]]:
        """(fingerprint, path, gone_at, end_stat) of each row, a page at a time (by key: a page is one indexed range)."""
        after = ""
        fields = ", ".join(f"CASE WHEN json_valid(doc) THEN json_extract(doc, '$.{k}') END" for k in ("path", "gone_at", "end_stat"))
        while rows := self._rows(
            f"SELECT fingerprint, {fields} FROM files WHERE generation = ? AND fingerprint > ? ORDER BY fingerprint LIMIT ?",
            after,
            page,
        ):
            yield from rows
            after = rows[-1][0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def corrupt_copies(state_dir: Path) -> list[Path]:
    """The copies of corrupt state files and state databases that runs kept aside (for a look; nothing
    reads them). A database's WAL and shared-memory files lie beside its copy, not listed."""
    return sorted(p for p in state_dir.glob("*.corrupt-*") if ".json.corrupt-" in p.name or ".sqlite.corrupt-" in p.name)
