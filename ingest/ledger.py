"""Ledger: which bucket objects and database rows a state has ingested, one row per item.

Files are followed by offset (:mod:`ingest.checkpoints`); objects are immutable and rows are
keyed, so what they need is a set: (source, key, version). A bucket of a million small objects
does not fit a JSON document rewritten after every step, so the ledger is a SQLite file beside
the JSON state, written in one transaction per acknowledged unit (WAL, synchronous=NORMAL: a
crash can lose the last commits, never corrupt it; losing them means re-reading a few objects,
and the ids are deterministic). Items are marked only after MLflow acknowledged every call they
hold, or after those calls were saved as held lines in the JSON state.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from ingest.checkpoints import StateError
from ingest.sources import Chunk

log = logging.getLogger(__name__)

ITEMS = {"key": pl.String, "version": pl.String, "at": pl.String}


def items_frame(keys: list[str], versions: list[str], at: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"key": keys, "version": versions, "at": at}, schema=ITEMS)


def state_db(path: Path, *ddl: str) -> sqlite3.Connection:
    """A SQLite file beside a state (autocommit, WAL, synchronous=NORMAL: a crash can lose the last
    commits, never corrupt it), its tables created if missing. A file that is not a database or fails
    SQLite's quick check (a disk fault, a copy taken mid-write) is set aside like a corrupt JSON state
    and started anew: what it held is re-read (ledger) or left standalone (nesting queue), never
    doubled, and the cron run or daemon is not stopped by it for good."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        checked = _inode(path)
        try:
            return _open_db(path, ddl)
        except sqlite3.DatabaseError as e:
            if not _is_corrupt(e):
                raise
            if _inode(path) == checked:
                kept = _set_aside(path)
                log.warning("the state database %s is corrupt (%s): kept as %s; starting it anew", path, e, kept)
            return _open_db(path, ddl)
    except (OSError, sqlite3.Error) as e:
        raise StateError(f"cannot open {path}: {e}") from e


def read_state_db(path: Path, *queries: tuple[str, tuple[object, ...]], timeout: float = 10) -> list[list[tuple]]:
    """The rows of each query on a state database, read-only (``status``, a dry run, a run's load)."""
    db = open_read_only(path, timeout)
    try:
        return [db.execute(sql, params).fetchall() for sql, params in queries]
    finally:
        db.close()


def open_read_only(path: Path, timeout: float = 10) -> sqlite3.Connection:
    """A read-only connection to a state database. A writer killed while it switched a new file to
    WAL leaves a hot journal that only a writable connection may roll back
    (SQLITE_READONLY_ROLLBACK): the file is then opened writable, as any run's own open would,
    rather than refused for ever. In a folder it may not write (``status`` on a read-only state dir),
    SQLite reads a WAL database only through its ``-shm``, which it cannot make there: with no
    ``-wal`` beside it, no writer has it open and the file alone is the whole database, read as
    immutable."""
    try:
        return _probed(path, "mode=ro", timeout)
    except sqlite3.OperationalError as e:
        if not _readonly(e):
            raise
    try:
        return _probed(path, "mode=rw", timeout)
    except sqlite3.OperationalError as e:
        if not _readonly(e) or path.with_name(path.name + "-wal").exists():
            raise
    return _probed(path, "mode=ro&immutable=1", timeout)


def _probed(path: Path, mode: str, timeout: float) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{path}?{mode}", uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except BaseException:
        db.close()
        raise
    return db


def _readonly(e: sqlite3.OperationalError) -> bool:
    return getattr(e, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_READONLY


class _Corrupt(sqlite3.DatabaseError):
    pass


def _open_db(path: Path, ddl: tuple[str, ...]) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if (check := db.execute("PRAGMA quick_check(1)").fetchone()) != ("ok",):
            raise _Corrupt(f"quick_check: {check[0] if check else 'no answer'}")
        for statement in ddl:
            db.execute(statement)
    except BaseException:
        db.close()
        raise
    return db


def _is_corrupt(e: sqlite3.DatabaseError) -> bool:
    if isinstance(e, _Corrupt):
        return True
    name = getattr(e, "sqlite_errorname", None)
    if name is not None:
        return name in ("SQLITE_NOTADB", "SQLITE_CORRUPT")
    return "not a database" in str(e) or "malformed" in str(e)


def _inode(path: Path) -> int | None:
    """Which file ``path`` is: another process may have set a corrupt one aside (and started anew) meanwhile."""
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _set_aside(path: Path) -> Path:
    """The database and its WAL and shared-memory files renamed ``<name>.corrupt-<UTC time>`` (a stale
    WAL beside a new file would be replayed into it)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for suffix in ("-wal", "-shm", ""):
        p = path.with_name(path.name + suffix)
        if p.exists():
            p.replace(p.with_name(f"{p.name}.corrupt-{stamp}"))
    return path.with_name(f"{path.name}.corrupt-{stamp}")


@dataclass
class Unit:
    """What one step of a keyed source reads: chunks to feed, and the items they came from."""

    source: str
    chunks: list[Chunk]
    items: pl.DataFrame
    bytes: int = 0
    failed: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    kind: str = "objects"
    """What its items are, for the summary: bucket ``objects`` or database ``rows``."""
    read: int | None = None
    """Items read, when not all of them are marked (database rows read only as a window's slack)."""


class Ledger:
    """The set of ingested items of one state. ``Ledger(None)`` remembers nothing (``--no-state``, dry runs)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._db = state_db(
                path,
                "CREATE TABLE IF NOT EXISTS items (source TEXT NOT NULL, key TEXT NOT NULL, version TEXT NOT NULL, "
                "at TEXT NOT NULL, PRIMARY KEY (source, key)) WITHOUT ROWID",
                "CREATE TABLE IF NOT EXISTS meta (source TEXT NOT NULL, name TEXT NOT NULL, value TEXT, PRIMARY KEY (source, name))",
            )

    @classmethod
    def beside(cls, state_path: Path, enabled: bool = True) -> Ledger:
        return cls(state_path.with_suffix(".ledger.sqlite") if enabled else None)

    def new(self, source: str, items: pl.DataFrame) -> pl.DataFrame:
        """``items`` minus those already ingested at the same version (a changed version is read again)."""
        if self._db is None or not items.height:
            return items
        keys = items["key"].to_list()
        rows: list[tuple[str, str]] = []
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            marks = ",".join("?" * len(part))
            rows += self._db.execute(f"SELECT key, version FROM items WHERE source = ? AND key IN ({marks})", (source, *part)).fetchall()
        if not rows:
            return items
        done = pl.DataFrame(rows, schema={"key": pl.String, "version": pl.String}, orient="row")
        return items.join(done, on=["key", "version"], how="anti", maintain_order="left")

    def mark(self, source: str, items: pl.DataFrame, meta: dict[str, str] | None = None) -> None:
        """Record ``items`` as ingested; each ``meta`` value is kept at the greatest one seen (a high-water mark)."""
        if self._db is None or (not items.height and not meta):
            return
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO items (source, key, version, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (source, key) DO UPDATE SET version = excluded.version, at = excluded.at",
                [(source, k, v, a) for k, v, a in items.select("key", "version", "at").iter_rows()],
            )
            for name, value in (meta or {}).items():
                self._db.execute(
                    "INSERT INTO meta (source, name, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (source, name) DO UPDATE SET value = max(value, excluded.value)",
                    (source, name, value),
                )

    def forget(self) -> None:
        """Forget every item and mark: they were ingested into a store that is gone (``State.bind``)."""
        if self._db is not None:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM items")
                self._db.execute("DELETE FROM meta")

    def drop_meta(self, source: str, name: str) -> None:
        """Forget a high-water mark that cannot be used (marks only ever grow otherwise)."""
        if self._db is not None:
            with self._db:
                self._db.execute("DELETE FROM meta WHERE source = ? AND name = ?", (source, name))

    def meta(self, source: str, name: str) -> str | None:
        if self._db is None:
            return None
        row = self._db.execute("SELECT value FROM meta WHERE source = ? AND name = ?", (source, name)).fetchone()
        return row[0] if row else None

    def forget_where(self, source: str, prefix: str, stale: Callable[[str], bool], batch: int = 10_000) -> int:
        """Forget the items of ``source`` whose key starts with ``prefix`` and that ``stale`` picks (read
        by primary key, a batch at a time: a ledger of millions of keys is never held whole)."""
        if self._db is None:
            return 0
        forgotten, after, past = 0, prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)  # the keys in between start with it
        while True:
            keys = [
                k
                for (k,) in self._db.execute(
                    "SELECT key FROM items WHERE source = ? AND key > ? AND key < ? ORDER BY key LIMIT ?", (source, after, past, batch)
                )
            ]
            if not keys:
                return forgotten
            after = keys[-1]
            if old := [k for k in keys if stale(k)]:
                with self._db:
                    self._db.executemany("DELETE FROM items WHERE source = ? AND key = ?", [(source, k) for k in old])
                forgotten += len(old)

    def prune(self, source: str, before: str) -> None:
        """Forget items whose ``at`` is before ``before`` (database rows older than the re-read window);
        those without one (a row whose start is no time, quarantined) are kept, or every run would read them again."""
        if self._db is not None:
            with self._db:
                self._db.execute("DELETE FROM items WHERE source = ? AND at < ? AND at <> ''", (source, before))

    def count(self, source: str | None = None) -> int:
        if self._db is None:
            return 0
        if source is None:
            return int(self._db.execute("SELECT count(*) FROM items").fetchone()[0])
        return int(self._db.execute("SELECT count(*) FROM items WHERE source = ?", (source,)).fetchone()[0])

    def sources(self) -> dict[str, int]:
        if self._db is None:
            return {}
        return dict(self._db.execute("SELECT source, count(*) FROM items GROUP BY source").fetchall())

    @staticmethod
    def describe(state_path: Path) -> list[dict[str, object]]:
        """Per source: items read and high-water marks, read-only (for ``status``); [] without a ledger."""
        path = state_path.with_suffix(".ledger.sqlite")
        if not path.exists():
            return []
        try:
            counts, marks = read_state_db(
                path, ("SELECT source, count(*), max(at) FROM items GROUP BY source", ()), ("SELECT source, name, value FROM meta", ())
            )
        except sqlite3.Error as e:
            return [{"source": str(path), "problem": str(e)}]
        out: dict[str, dict[str, object]] = {src: {"source": src, "items": n, "newest": at} for src, n, at in counts}
        for src, name, value in marks:
            out.setdefault(src, {"source": src, "items": 0, "newest": None})[name] = value
        return list(out.values())

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


NEST_QUEUE_SUFFIX = ".nest.sqlite"


def nest_pending(state_path: Path) -> int | None:
    """Calls waiting in the nesting queue beside a state, read-only (for ``status``, which should
    not import MLflow for it); None without a queue."""
    path = state_path.with_suffix(NEST_QUEUE_SUFFIX)
    if not path.exists():
        return None
    try:
        ((n,),) = read_state_db(path, ("SELECT count(*) FROM pending", ()))[0]
        return int(n)
    except sqlite3.Error:
        return None


def drop_nest_queue(state_path: Path) -> None:
    """A run with ``--no-nest`` empties the queue beside its state: its calls would wait for a
    lookup no run makes, shown as waiting by ``status`` for ever. They stay standalone, as written."""
    path = state_path.with_suffix(NEST_QUEUE_SUFFIX)
    n = nest_pending(state_path)
    if not n:
        return
    try:
        db = sqlite3.connect(path, timeout=10)
        try:
            with db:
                db.execute("DELETE FROM pending")
        finally:
            db.close()
    except sqlite3.Error as e:
        log.warning("could not empty the nesting queue %s: %s", path, e)
        return
    log.info("%d call(s) waiting for their app trace stay standalone only (--no-nest)", n)
