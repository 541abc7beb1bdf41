"""Open a database MLflow store when any number of our processes may open it at once.

MLflow creates a missing schema (``create_all`` then every Alembic migration) in whichever process
opens the store first, with no lock: two processes doing it at once collide (``table ... already
exists``, ``UniqueViolation``), and on SQLite, whose migrations are not transactional, a process
killed halfway leaves a store no later run can open. So setting a store up is serialized here:
- SQLite: an ``flock`` on a file beside the database, and a fresh schema is built in a temporary
  file that is renamed into place once complete, so the database either does not exist or is whole.
  A store left half-created by someone else (MLflow's tables only, no data in them) is moved aside
  and created anew; any other file (another application's database, not a database) is left alone.
- PostgreSQL (and other servers): a session-level advisory lock; PostgreSQL's DDL is transactional.

The lock is held while the store is opened and the experiment found or created (``setup_lock``),
never while writing: concurrent writes are the database's business (and the sink's retries).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import re
import stat
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ingest.quarantine import first_line

log = logging.getLogger(__name__)

ADVISORY_LOCK_KEY = zlib.crc32(b"litellm-ingest: mlflow store setup")
"""One fixed key for every process of ours: setting up stores is rare and short."""
LOCK_SUFFIX = ".ingest-lock"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_STORES: dict[str, Any] = {}


def quiet_dependency_logs(verbose: bool) -> None:
    """Our own one-line reports stand for what the libraries under us log on the way.

    MLflow's SQL store logs each query that fails for want of the database at ERROR, with its whole
    traceback (about a hundred lines), then raises it: during a database outage that is one such
    dump per retry, for a failure the sink already reports in one line and retries. Those records
    are dropped unless ``verbose``; every other MLflow record passes. The drivers' and HTTP
    library's warnings (a connection lost mid-pipeline, a retried request) show only with
    ``verbose``. MLflow sets its own loggers' level when it is imported (after this), from
    ``MLFLOW_LOGGING_LEVEL``: that is set too, unless the user set it. The bucket clients log a
    request that ran out of retries at ERROR with its traceback, then raise it for the source to
    report in one line (and Google's auth library warns of each fallback it tries): they show only
    with ``verbose``."""
    level = logging.WARNING if verbose else logging.ERROR
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))
    for noisy in ("alembic", "mlflow", "urllib3", "psycopg"):
        logging.getLogger(noisy).setLevel(level)
    for client in ("gcsfs", "s3fs", "aiobotocore", "botocore", "fsspec", "google.auth"):
        logging.getLogger(client).setLevel(logging.WARNING if verbose else logging.CRITICAL)
    if not verbose:
        logging.getLogger("mlflow.store.db.utils").addFilter(_not_a_caught_db_error)


def _not_a_caught_db_error(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("SQLAlchemy database error")


class StoreSetupError(Exception):
    """The store cannot be opened or created; one line for the user. ``kind`` as ``SinkError``'s:
    "unreachable" is worth retrying, "rejected" is not."""

    def __init__(self, message: str, kind: str = "rejected") -> None:
        super().__init__(message)
        self.kind = kind


def causes(e: BaseException) -> Iterator[BaseException]:
    """``e`` and what caused it, each once (MLflow and SQLAlchemy wrap the driver's error)."""
    seen: set[int] = set()
    node: BaseException | None = e
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        yield node
        node = node.__cause__ or node.__context__


_REFUSAL_SQLSTATES = frozenset({"28000", "28P01", "3D000"})
"""invalid_authorization_specification (an unknown role, no pg_hba.conf entry), invalid_password,
invalid_catalog_name (no such database)."""
_REFUSAL_TEXT = re.compile(
    r"password authentication failed|authentication failed for user|no password supplied|no pg_hba\.conf entry"
    r"|\b(role|database) \"[^\"]*\" does not exist|permission denied for database"
    r"|access denied for user|unknown database|login failed for user",  # MySQL, SQL Server
    re.IGNORECASE,
)


def refused_by_database(e: BaseException) -> bool:
    """The database server answered and refuses these credentials or this database (a wrong password,
    an unknown role or database): no retry changes that, unlike a connection refused, a timeout or
    a server starting up. psycopg gives no SQLSTATE for a failed connection: its text tells."""
    for node in causes(e):
        for err in (node, getattr(node, "orig", None)):
            if getattr(err, "sqlstate", None) in _REFUSAL_SQLSTATES or getattr(err, "pgcode", None) in _REFUSAL_SQLSTATES:
                return True
        if _REFUSAL_TEXT.search(str(node)):
            return True
    return False


def locked_sqlite(e: BaseException) -> bool:
    """SQLite's busy answer (another process holds a write lock), anywhere in ``e``'s causes."""
    return any("database is locked" in str(node) or "database table is locked" in str(node) for node in causes(e))


def tracking_uri_from(flag: str | None) -> str:
    """The store a run writes to: the flag, else ``MLFLOW_TRACKING_URI``, else a local ``mlflow.db``;
    without the spaces and newline an env file may leave around it (a file named ``mlflow.db\\n``)."""
    return (flag or os.environ.get("MLFLOW_TRACKING_URI") or "").strip() or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI (None for any other URI, or an in-memory database)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


@contextlib.contextmanager
def setup_lock(uri: str) -> Iterator[None]:
    """Serialize setting up the store at ``uri`` among our processes (waits for the holder)."""
    if uri.startswith("sqlite:"):
        path = sqlite_path(uri)
        with _file_lock(path) if path is not None else contextlib.nullcontext():
            yield
    elif uri.startswith(("postgresql", "postgres")):
        with _advisory_lock(uri):
            yield
    else:
        yield


@contextlib.contextmanager
def _file_lock(db: Path) -> Iterator[None]:
    _refuse_not_a_store(db)
    lock = db.with_name(db.name + LOCK_SUFFIX)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        # A folder we cannot write in: nothing can be created there either, so there is nothing to serialize.
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _advisory_lock(uri: str) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(uri, poolclass=NullPool)
    try:
        conn = engine.connect()
    except Exception as e:
        engine.dispose()
        kind = "rejected" if refused_by_database(e) else "unreachable"
        raise StoreSetupError(f"cannot open the MLflow store {shown_uri(uri)}: {first_line(e)}", kind=kind) from e
    try:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
        yield
    finally:
        with contextlib.suppress(Exception):
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
        conn.close()
        engine.dispose()


def open_store(uri: str, *, create: bool = True, busy_s: float = 30.0) -> Any:
    """MLflow's tracking store for ``uri`` (one per URI per process), its schema created if missing.

    Call it inside ``setup_lock(uri)``. A reader passes ``create=False``: a SQLite store that is not
    complete is then an error, never repaired or created. ``busy_s``: how long reading a SQLite
    store's schema waits for another process's write lock."""
    if uri not in _STORES:
        path = sqlite_path(uri)
        if path is not None and create:
            _prepare_sqlite(path, busy_s)
        elif path is not None:
            state, foreign, revision = _inspect(path, busy_s) if path.is_file() else ("missing", [], None)
            _refuse_unusable(path, state, foreign, revision)
            if state != "complete":
                raise StoreSetupError(f"{path} is not a complete MLflow store (missing, or its schema is incomplete or outdated)")
        if path is None:
            _refuse_other_schema(uri)
        from mlflow.tracking._tracking_service.utils import _get_store

        _STORES[uri] = _get_store(uri)
    return _STORES[uri]


def store_for(uri: str) -> Any:
    """The store this process already opened for ``uri``, else opened under the setup lock."""
    if uri in _STORES:
        return _STORES[uri]
    with setup_lock(uri):
        return open_store(uri)


def _prepare_sqlite(db: Path, busy_s: float = 30.0) -> None:
    """Leave ``db`` either absent-and-then-complete or as it was: a fresh schema is built aside (beside
    the file a symlink names, as SQLite itself would open it: not in the link's place)."""
    if db.is_symlink():
        db = Path(os.path.realpath(db))
    _refuse_not_a_file(db)
    if db.is_file() and db.stat().st_size > 0:
        state, foreign, revision = _inspect(db, busy_s)
        if state == "complete":
            return
        if state in ("foreign", "not-sqlite"):
            raise StoreSetupError(_not_a_store(db, state, foreign))
        if revision in RELEASE_HEADS or (state == "newer" and revision is not None):
            # an older MLflow's store, empty or not: moved aside, it was a file its server no longer saw written
            raise StoreSetupError(other_schema_message(str(db), revision, f"sqlite:///{db}"), kind="rejected")
        if state == "has-data":
            raise StoreSetupError(
                f"the MLflow store {db} has an incomplete or outdated schema and holds data: "
                "take a backup and run `mlflow db upgrade sqlite:///<path>`"
            )
        aside = db.with_name(f"{db.name}.incomplete-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        log.warning("the MLflow store %s was left half-created (it holds no data): moved to %s and created anew", db, aside)
        for suffix in JOURNALS:  # its journal or write-ahead log goes with it (see _drop_orphan_journals)
            if (part := db.with_name(db.name + suffix)).exists():
                part.rename(aside.with_name(aside.name + suffix))
        db.rename(aside)
    _create_sqlite_aside(db)


def _refuse_not_a_store(db: Path) -> None:
    """Another application's database, or a file that is no database, is refused before our lock file
    is made beside it: it is left alone, and nothing of ours is left next to it."""
    _refuse_not_a_file(db)
    try:
        held = db.is_file() and db.stat().st_size > 0
    except OSError:
        return
    if held:
        try:
            state, foreign, revision = _inspect(db, busy_s=0.1)
        except StoreSetupError:  # locked, or unreadable: told under the lock, with the run's patience
            return
        _refuse_unusable(db, state, foreign, revision)


def _refuse_unusable(db: Path, state: str, foreign: list[str], revision: str | None) -> None:
    """A store no run may open or create over: a newer MLflow's, another application's database, no SQLite file."""
    if state == "newer" and revision is not None:
        raise StoreSetupError(other_schema_message(str(db), revision, f"sqlite:///{db}"), kind="rejected")
    if state in ("foreign", "not-sqlite"):
        raise StoreSetupError(_not_a_store(db, state, foreign))


def _refuse_not_a_file(db: Path) -> None:
    """A device, a pipe, a socket or a folder where the store should be is never replaced by one
    (``sqlite:////dev/null`` made a store in /dev/null's place)."""
    try:
        mode = db.stat().st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a pipe or a socket"
        raise StoreSetupError(f"{db} is {what}, not a database file; it was left alone (check --tracking-uri / MLFLOW_TRACKING_URI)")


def _not_a_store(db: Path, state: str, foreign: list[str]) -> str:
    """The one line for a file that is no MLflow store (``foreign`` or ``not-sqlite``): never touched."""
    if state == "not-sqlite":
        what = f"{db} is not a SQLite database (or is a damaged one)"
    else:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        what = f"{db} is not an MLflow store: it holds tables MLflow does not make ({shown})"
    return f"{what}; it was left alone (check --tracking-uri / MLFLOW_TRACKING_URI)"


def locked_message(db: Path | str, e: BaseException, outcome: str = "nothing was written") -> str:
    """The one line for a SQLite store another process holds locked past our patience."""
    return (f"the MLflow store {db} is locked by another process (a long write, a backup, `mlflow gc`?): "
            f"{first_line(e)}; {outcome}")  # fmt: skip


def _sqlite_schema_state(db: Path) -> str:
    """``complete``; ``empty`` (no schema, or a half-built one holding nothing); ``has-data`` (an
    incomplete or outdated schema holding data); ``foreign`` (tables, views or triggers MLflow does
    not make beside an incomplete schema: another application's database); ``newer`` (a newer MLflow's
    store: a revision this MLflow does not know); ``not-sqlite``."""
    return _inspect(db)[0]


_CORE_TABLES = frozenset({"experiments", "trace_info", "alembic_version"})
"""Tables every MLflow 3 store has: with a revision this MLflow's migrations do not know, a newer MLflow's
store (3.18 adds tables of its own), not another application's database."""


def _inspect(db: Path, busy_s: float = 30.0) -> tuple[str, list[str], str | None]:
    """:func:`_sqlite_schema_state`, the names of what MLflow does not make in ``db``, and the schema
    revision it records (None: none)."""
    import sqlite3

    mlflow_tables = _mlflow_tables()
    # Read-write (never created: mode=rw), so a writer killed mid-commit is rolled back as any
    # SQLite connection does; read-only, SQLite refuses to read past its hot journal. A file the
    # system does not let us write is opened read-only all the same.
    con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=busy_s)
    try:
        schema = list(con.execute("SELECT type, name, tbl_name FROM sqlite_master"))
        tables = {name for kind, name, _ in schema if kind == "table"}
        version = None
        if "alembic_version" in tables:
            version = next(iter(con.execute("SELECT version_num FROM alembic_version")), (None,))[0]
        partial = any(t.startswith("_alembic_tmp_") for t in tables)
        if not partial and version == _latest_revision() and mlflow_tables <= tables:
            return "complete", [], version
        if version is not None and version != _latest_revision() and tables >= _CORE_TABLES and not _older_revision(version):
            return "newer", [], version
        # Each table, view, index and trigger belongs to a table (a view to itself).
        foreign = sorted({table for _, _, table in schema if not _is_mlflow_table(table, mlflow_tables)})
        if foreign:
            return "foreign", foreign, version
        return ("has-data" if _holds(con, tables) else "empty"), [], version
    except sqlite3.DatabaseError as e:
        if "not a database" in str(e) or "malformed" in str(e):
            return "not-sqlite", [], None
        if locked_sqlite(e):  # never a schema's state: retried, then said so (a daemon waits for it)
            raise StoreSetupError(locked_message(db, e), kind="unreachable") from e
        raise StoreSetupError(f"cannot read the SQLite store {db}: {first_line(e)}{_wal_hint(db, e)}") from e
    finally:
        con.close()


def _wal_hint(db: Path, e: Exception) -> str:
    """Why a store in WAL mode may not be read: SQLite reads one only through a ``-shm`` file beside
    it, which it must make when no process has the store open (`mlflow ui` fails there the same way)."""
    if "readonly" not in str(e):
        return ""
    try:
        with open(db, "rb") as f:
            wal = f.read(20)[18:20] == b"\x02\x02"
    except OSError:
        return ""
    return f" (a store in WAL mode is read through {db.name}-shm beside it: its folder must be writable by this user)" if wal else ""


@functools.cache
def _mlflow_tables() -> frozenset[str]:
    """Every table MLflow's schema has (its migrations create no other), and Alembic's."""
    import mlflow.store.db.utils  # noqa: F401  (imports MLflow's table definitions)
    from mlflow.store.db.base_sql_model import Base

    return frozenset(Base.metadata.tables) | {"alembic_version"}


def _is_mlflow_table(name: str, mlflow_tables: frozenset[str]) -> bool:
    """MLflow's, an Alembic migration's scratch copy of one, or SQLite's own (``sqlite_sequence``)."""
    return name in mlflow_tables or name.startswith(("_alembic_tmp_", "sqlite_"))


def _create_sqlite_aside(db: Path) -> None:
    """MLflow's schema built (or copied from the cached template) in a temporary file beside
    ``db``, renamed into place once complete."""
    db.parent.mkdir(parents=True, exist_ok=True)
    for stale in db.parent.glob(f".{db.name}.creating-*"):
        stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
    template = _schema_template()
    try:
        if not _copied(template, tmp):
            _build_schema(tmp, db)
            _keep_template(tmp, template)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _drop_orphan_journals(db)
        os.replace(tmp, db)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise StoreSetupError(f"creating the MLflow store {db} failed: {e.strerror or e}") from e
        raise
    dir_fd = os.open(db.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


JOURNALS = ("-journal", "-wal", "-shm")
"""What SQLite keeps beside a database file, and reads as that file's whatever file has its name."""


def _drop_orphan_journals(db: Path) -> None:
    """A ``-journal``, ``-wal`` or ``-shm`` left where no store is (a store deleted after a writer died
    in a commit: a hot journal, or committed frames in its write-ahead log) is removed before the new
    store takes that name: SQLite would roll the old store's pages back into the new one, or replay
    them from the log (a malformed store). SQLite drops such files itself when it creates a database;
    a file renamed into place is not created by SQLite."""
    with contextlib.suppress(OSError):
        if db.stat().st_size > 0:  # another process made a store there meanwhile: its journals are its own
            return
    for suffix in JOURNALS:
        orphan = db.with_name(db.name + suffix)
        if orphan.exists():
            log.warning("removed %s, left by a store that is no longer there: the new store would have read it", orphan)
            orphan.unlink(missing_ok=True)


OLDEST_SERVER = (3, 14)
"""The oldest MLflow server our traces arrive whole in (measured): 3.13 stores session and user ids
JSON-quoted and drops some tags, 3.7 to 3.12 drop every trace tag (call id, trace name), 3.4 to 3.6
refuse gzip'd OTLP, and before 3.4 there is no ``/v1/traces``."""
RELEASE_HEADS = {
    "bda7b8c39065": "3.1",
    "71994744cf8e": "3.4",
    "1bd49d398cd2": "3.8",
    "7d34483879f0": "3.12",
    "da6fb0208061": "3.13",
    "b7e2c1a4d9f3": "3.16",
    "dc11669786a5": "3.17",
}
"""Schema revisions of MLflow releases (measured), to name the MLflow that made a store."""


def _refuse_other_schema(uri: str) -> None:
    """A database server's store is opened only with no MLflow schema yet or with this MLflow's own:
    MLflow upgrades an older schema in place when it opens it (a table of its own is missing), and the
    older MLflow server on that database can then no longer open it (measured: a 3.4 store after one
    run of ours)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    from ingest.sql_bulk import schema_lacks_it

    engine = sqlalchemy.create_engine(uri, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            revision = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
    except Exception as e:
        if schema_lacks_it(e):
            return
        raise
    finally:
        engine.dispose()
    if revision is not None and revision != _latest_revision():
        raise StoreSetupError(other_schema_message(shown_uri(uri), revision, shown_uri(uri)), kind="rejected")


def other_schema_message(store: str, revision: str, uri: str) -> str:
    """The one line for a store whose schema another MLflow made: which, and what to do. An older one
    is most often an earlier litellm-ingest's own (its MLflow pinned one release back): the command
    that upgrades it is given whole."""
    import mlflow

    mine = mlflow.__version__
    made_by = f"MLflow {RELEASE_HEADS[revision]}'s" if revision in RELEASE_HEADS else "another MLflow's"
    if _older_revision(revision):
        return (f"the MLflow store {store} has {made_by} schema (revision {revision}), older than this litellm-ingest's "
                f"MLflow {mine} writes; left as it is, since opening it would upgrade it and that MLflow could no longer "
                f"open it: take a backup and run `mlflow db upgrade {uri}` (and upgrade to MLflow {mine} any server on it), "
                f"or give its server's http:// address (MLflow {'.'.join(map(str, OLDEST_SERVER))} or newer)")  # fmt: skip
    return (f"the MLflow store {store} has schema revision {revision}, which this litellm-ingest's MLflow {mine} does not "
            "know (a newer MLflow made it?): install that MLflow beside litellm-ingest, or give its server's http:// "
            "address; it was left as it is")  # fmt: skip


def _older_revision(revision: str) -> bool:
    """``revision`` is one of this MLflow's own migrations (so the store is older)."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    try:
        return ScriptDirectory.from_config(_get_alembic_config("sqlite://")).get_revision(revision) is not None
    except Exception:
        return False


def _schema_template() -> Path:
    """An empty store of this MLflow's schema, kept in the user's cache: MLflow builds one by running
    every migration since its first (~2 s), the same file each time for one MLflow version."""
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "litellm-ingest"
    return cache / f"mlflow-{mlflow.__version__}-{_latest_revision()}.db"


@functools.cache
def _latest_revision() -> str:
    """The head of MLflow's migrations: alembic reads its ~200 revision files for each lookup (~40 ms)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return str(_get_latest_schema_revision())


def _copied(template: Path, tmp: Path) -> bool:
    """``tmp`` is a copy of the template, checked complete and empty (False: build it instead)."""
    import shutil

    try:
        shutil.copyfile(template, tmp)
    except OSError:
        return False
    with contextlib.suppress(StoreSetupError):
        if _sqlite_schema_state(tmp) == "complete" and _holds_nothing(tmp):
            return True
    tmp.unlink(missing_ok=True)
    return False


def _keep_template(built: Path, template: Path) -> None:
    """Best effort: a cache that cannot be written only means the next store is built again."""
    import shutil

    part = template.with_name(f".{template.name}.{os.getpid()}")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, part)
        os.replace(part, template)
    except OSError as e:
        log.debug("could not keep an empty MLflow schema in %s: %s", template, e)
        with contextlib.suppress(OSError):
            part.unlink()


def _holds(con: Any, tables: set[str], where_experiment: str = "experiment_id != 0") -> int:
    """Tables of MLflow's holding rows that MLflow's migrations and store do not put there
    themselves (the schema's version, the default workspace, the default experiment)."""
    seeded = {"alembic_version": "0", "workspaces": "name != 'default'", "experiments": where_experiment}
    holds = 0
    for table in sorted(t for t in tables if t in _mlflow_tables() or t.startswith("_alembic_tmp_")):
        where = seeded.get(table, "1")
        holds += con.execute(f'SELECT EXISTS (SELECT 1 FROM "{table}" WHERE {where})').fetchone()[0]
    return holds


def _holds_nothing(db: Path) -> bool:
    """Not even the default experiment: a template is copied as MLflow's migrations left it."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return _holds(con, tables, where_experiment="1") == 0
    except sqlite3.DatabaseError:
        return False
    finally:
        con.close()


def _build_schema(tmp: Path, db: Path) -> None:
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}", poolclass=NullPool)

    @sqlalchemy.event.listens_for(engine, "connect")
    def unsynced(conn: Any, _: Any) -> None:
        """The file is not the store until it is renamed, after one fsync: its ~100 migration
        commits need no journal file and no fsync each (a second of a first run)."""
        conn.execute("PRAGMA journal_mode=MEMORY")
        conn.execute("PRAGMA synchronous=OFF")

    try:
        _initialize_tables(engine)
    except Exception as e:
        raise StoreSetupError(f"creating MLflow's schema in {db} failed: {first_line(e)}") from e
    finally:
        engine.dispose()


QUERY_PASSWORD = re.compile(r"([?&][^=&#]*password=)([^&#]*)", re.IGNORECASE)
"""A password libpq (and SQLAlchemy, for PostgreSQL) also takes from the query string (``password``,
``sslpassword`` for a client key)."""

QUERY_SECRET = re.compile(r"([?&][^=&#]*(?:token|secret|key|sig|signature|credential|auth)[^=&#]*=)([^&#]*)", re.IGNORECASE)
"""What a server's address may carry in its query string behind a gateway (``?token=``, ``?api_key=``,
a signed URL's ``sig``); for a server only, so a database URI's ``sslkey=`` path (part of a backfill's
state key) stays as it was."""


def shown_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***``, in its user info or its query string (for a
    server, a lone user name and a token too: ``https://TOKEN@host`` is how a token is often given):
    what messages, summaries and the state file say (and a backfill's state key is made of)."""
    shown = QUERY_PASSWORD.sub(r"\1***", _userinfo_hidden(uri))
    return QUERY_SECRET.sub(r"\1***", shown) if shown[:4].lower() == "http" else shown


def _userinfo_hidden(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    netloc, slash, path = rest.partition("/")
    if "@" not in netloc and not scheme.startswith("http") and (m := _SQLALCHEMY_USERINFO.match(rest)):
        return f"{scheme}://{m.group('user')}:***@{rest[m.end() :]}"
    user, at, host = netloc.rpartition("@")
    if not at:
        return uri
    if ":" not in user:
        return f"{scheme}://***@{host}{slash}{path}" if scheme.lower().startswith("http") else uri
    return f"{scheme}://{user.split(':', 1)[0]}:***@{host}{slash}{path}"


_SQLALCHEMY_USERINFO = re.compile(r"(?P<user>[^:/@?]*):(?P<password>[^@]*)@")
"""How SQLAlchemy reads a database URI's user and password: the password runs to the first ``@``,
``/`` included (``postgresql://u:pa/ss@host/db`` is taken as written, unencoded)."""
