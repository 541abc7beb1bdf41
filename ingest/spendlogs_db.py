"""Read LiteLLM_SpendLogs straight from the proxy's PostgreSQL database, read-only and incrementally.

Rows are read in keyset order (``"startTime"``, ``request_id``): a page starts after the last key
of the one before, so a resumed read neither skips nor repeats rows, whatever the table's size, and
each page is one short read-only transaction (no snapshot held on a busy proxy database). Every row
becomes one line of a line frame, serialized as the row's JSON export would print it (times as
naive UTC ISO text, JSON columns as JSON text), so ``normalize`` reads it exactly as an exported row.

The columns are taken from the table as it is (``information_schema.columns``): LiteLLM adds columns
over versions, and one added later or missing in an older proxy must not break the read.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote

import orjson
import polars as pl
import psycopg
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict

from ingest.buckets import WINDOW_SLACK
from ingest.ledger import Ledger, Unit, items_frame
from ingest.quarantine import QuarantineRecord, Reason
from ingest.sink import Watched
from ingest.sources import DEFAULT_MAX_LINE_BYTES, Chunk, SourceUnavailable
from ingest.stores import QUERY_PASSWORD, shown_uri

DEFAULT_TABLE = "LiteLLM_SpendLogs"
DEFAULT_PAGE_ROWS = 5000
DEFAULT_PAGE_BYTES = 64 * 1024 * 1024
REQUIRED_COLUMNS = ("request_id", "startTime", "endTime")
"""The keyset (request_id, startTime) and what normalize cannot do without (endTime)."""
JSON_COLUMNS_KIND = frozenset({"json", "jsonb"})
TIME_KINDS = frozenset({"timestamp without time zone", "timestamp with time zone", "date"})
TEXT_KINDS = frozenset({"text", "character varying", "character", "name", "citext"})
NATIVE_KINDS = frozenset({"integer", "bigint", "smallint", "double precision", "real", "boolean"})
CONNECT_TIMEOUT_S = 10
"""libpq's wait for a connection, and the longest the database may leave a read unanswered (``SpendLogsDB._answered``)
before it is asked, on a connection of its own, whether it still answers at all; a ``connect_timeout`` in the
URL (or ``PGCONNECT_TIMEOUT``) sets both instead (:func:`silence_bound`)."""
PING_S = 5
"""How long that question may go unanswered (libpq's connect timeout takes 2 s at least)."""
MIN_CONNECT_TIMEOUT_S = 2
"""libpq's floor for ``connect_timeout``."""
SLOW_READ_S = 300
"""The longest one read may run on a database that still answers (PostgreSQL's ``statement_timeout``,
unless the role or database sets one)."""
log = logging.getLogger("litellm-ingest.spendlogs_db")
EPOCH = datetime(1970, 1, 1)
REREAD = timedelta(hours=1)
"""How far before the newest row read a cron run reads again. LiteLLM inserts a row after its call
ended, from a queue flushed in batches (longer while its database was away), so a row can appear
behind rows already read; rows read before are skipped by request_id (the ledger remembers them
for twice this long)."""

T = TypeVar("T")


PRISMA_ONLY = frozenset(
    {
        "schema",
        "connection_limit",
        "pool_timeout",
        "pgbouncer",
        "socket_timeout",
        "statement_cache_size",
        "sslaccept",
        "sslidentity",
        "max_connection_lifetime",
        "max_idle_connection_lifetime",
    }
)
"""Parameters of a Prisma URL that libpq refuses ("invalid URI query parameter"). LiteLLM's
``DATABASE_URL`` is one: it writes ``?schema=`` itself, and its CLI appends ``connection_limit`` and
``pool_timeout``."""


def _libpq_url(url: str) -> str:
    """libpq knows ``postgresql://`` and ``postgres://`` only: drop a SQLAlchemy ``+driver``. A Prisma
    URL (LiteLLM's ``DATABASE_URL``) loses the parameters only Prisma knows (its ``schema`` is
    where the table is looked for: :func:`prisma_schema`); the rest of a URL is kept byte for byte
    (a ``+`` in a password stays a ``+``)."""
    scheme, sep, rest = url.strip().partition("://")
    return f"{scheme.split('+', 1)[0].lower()}{sep}{_without(rest, PRISMA_ONLY)}"


def _without(url: str, names: frozenset[str] | set[str]) -> str:
    """``url`` without the query parameters named ``names`` (by their decoded names), the rest byte for byte."""
    base, question, query = url.partition("?")
    pairs = _query(query)
    if not question or not names & {name for name, _ in pairs}:
        return url
    kept = [part for part, (name, _) in zip(query.split("&"), pairs, strict=True) if part and name not in names]
    return base + ("?" + "&".join(kept) if kept else "")


def _query(query: str) -> list[tuple[str, str]]:
    """A URL's query as (name, value) pairs, one per ``&`` part, percent-decoded as libpq decodes them."""
    return [(unquote(name), unquote(value)) for name, _, value in (part.partition("=") for part in query.split("&"))]


def prisma_schema(url: str) -> str | None:
    """The schema a Prisma URL names (``?schema=``, LiteLLM's ``DATABASE_SCHEMA``), the table's; None
    for none (the table is then looked for on the ``search_path``)."""
    named = [value for name, value in _query(url.partition("?")[2]) if name == "schema" and value]
    return named[-1] if named else None


def silence_bound(url: str) -> int:
    """The URL's ``connect_timeout`` (else ``PGCONNECT_TIMEOUT``, else ``CONNECT_TIMEOUT_S``), at libpq's 2 s floor:
    a user who set one for the proxy's database gets that bound, not ours over it (psycopg's keyword wins
    over the URL's parameter)."""
    try:
        given = conninfo_to_dict(_libpq_url(url)).get("connect_timeout") or os.environ.get("PGCONNECT_TIMEOUT")
        seconds = int(str(given).strip()) if given is not None else CONNECT_TIMEOUT_S
    except (psycopg.Error, ValueError):
        seconds = CONNECT_TIMEOUT_S
    return CONNECT_TIMEOUT_S if seconds <= 0 else max(MIN_CONNECT_TIMEOUT_S, seconds)


_TUNING = frozenset({"connect_timeout", *PRISMA_ONLY} - {"schema"})


def shown_database(url: str) -> str:
    """The database as said and as known by the state and ledger: password hidden, and without its
    ``connect_timeout`` or Prisma's pool settings (setting one must not make a run read the whole
    table again, nor a backfill start over)."""
    return shown_uri(_without(url, _TUNING))


def _password(url: str) -> str | None:
    netloc = url.partition("://")[2].partition("/")[0]
    user, at, _ = netloc.rpartition("@")
    if at and ":" in user:
        return user.split(":", 1)[1]
    found = QUERY_PASSWORD.search(url)
    return found.group(2) if found and found.group(2) else None


class _Text(str):
    """Text that was not valid UTF-8 (a SQL_ASCII database): decoded with U+FFFD, and its row quarantined as files' lines are."""


class _LenientTextLoader(Loader):
    """Text as UTF-8 that never raises: a SQL_ASCII database can hold any bytes, and one bad value must not stop the read."""

    def load(self, data: Any) -> str:
        raw = bytes(data)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return _Text(raw.decode("utf-8", "replace"))


@dataclass
class Page:
    """One page of rows: the line frame, their keys, and the keyset position after the last row.

    ``quarantined`` holds rows that never reach the frame (larger than a line may be, or text that
    was not UTF-8), as a file chunk's ``quarantined`` does; ``last`` moves past them too."""

    lines: pl.DataFrame
    keys: pl.DataFrame
    last: tuple[str, str]
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    quarantined_keys: list[tuple[str, int | None]] = field(default_factory=list)
    """(request_id, start) of each ``quarantined`` row: marked read like the others, so it is quarantined once."""


class _Heard:
    """When the database last answered a watched read (``SpendLogsDB._answered``): set by the thread
    reading, looked at by the one waiting for it."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def beat(self) -> None:
        self.at = time.monotonic()


@dataclass(frozen=True)
class _Column:
    name: str
    kind: str

    def select(self) -> sql.Composable:
        """The column as the page query reads it: text where Python's own types would lose or refuse something."""
        ident = sql.Identifier(self.name)
        if self.kind in TIME_KINDS or self.kind in JSON_COLUMNS_KIND or self.kind == "numeric":
            return sql.SQL("{}::text").format(ident)
        if self.kind in TEXT_KINDS or self.kind in NATIVE_KINDS:
            return ident
        return sql.SQL("to_jsonb({})::text").format(ident)

    def value(self, v: Any) -> Any:
        """The value as a JSON export of the row holds it."""
        if v is None:
            return None
        if self.kind in TIME_KINDS:
            return v[:10] + "T" + v[11:] if len(v) > 10 and v[10] == " " else v
        if self.kind == "numeric" or (self.kind not in TEXT_KINDS and self.kind not in NATIVE_KINDS and self.kind not in JSON_COLUMNS_KIND):
            return orjson.Fragment(v)
        if type(v) is float and not math.isfinite(v):
            return orjson.Fragment("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity"))
        return v


class SpendLogsDB:
    """LiteLLM's SpendLogs table in the proxy's own database, as a source of line frames.

    The connection is opened on first use and kept; every read is a read-only transaction, and the
    session itself is read-only, so nothing here can write to the proxy's database."""

    def __init__(
        self, url: str, table: str = DEFAULT_TABLE, page_rows: int = DEFAULT_PAGE_ROWS, page_bytes: int = DEFAULT_PAGE_BYTES
    ) -> None:
        self.url = url
        self.table = table
        self.page_rows = max(1, page_rows)
        self.page_bytes = page_bytes
        self.max_row_bytes = DEFAULT_MAX_LINE_BYTES
        self.shown = shown_database(url)
        self.named_schema = prisma_schema(url)
        self.source = f"{self.shown}#{table}"
        """What the ledger and the state know the table by: not its ``connect_timeout`` (set one, and a run
        would read the whole table again)."""
        self.rows_read = 0
        self._secret = _password(url)
        self.silence_s = silence_bound(url)
        self._conn: psycopg.Connection | None = None
        self._schema: str | None = None
        self._columns: list[_Column] | None = None

    # --- connection -----------------------------------------------------------------------------

    def _error(self, what: str, e: BaseException) -> SourceUnavailable:
        """A one-line message that names the database (password hidden) and never quotes the password."""
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        detail = lines[0] if lines else type(e).__name__
        if self._secret:
            detail = detail.replace(self._secret, "***")
        return SourceUnavailable(f"{what} {self.shown}: {detail}")

    def _connect(self) -> psycopg.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            conn = psycopg.connect(_libpq_url(self.url), autocommit=True, connect_timeout=self.silence_s, application_name="litellm-ingest")
        except psycopg.Error as e:
            raise self._error("cannot connect to", e) from None
        conn.read_only = True
        for kind in ("text", "varchar", "bpchar", "name"):
            conn.adapters.register_loader(kind, _LenientTextLoader)

        def read_only(heard: _Heard) -> None:
            try:
                conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            except psycopg.Error as e:
                conn.close()
                raise self._error("cannot set up a read-only session on", e) from None

        self._answered("cannot set up a read-only session on", read_only)
        self._conn = conn
        return conn

    def _answered(self, what: str, call: Callable[[_Heard], T]) -> T:
        """``call`` (one read of the proxy database) run watched (:class:`ingest.sink.Watched`), and
        what it returned or raised. A database that stops answering without closing anything (a
        frozen host, a network partition: no error, the socket just stays silent) held a read for
        ever: a cron run or backfill never ended. Now a read left unanswered for ``silence_s``
        is ``SourceUnavailable`` (exit 8, one line), as a lost connection is here: a source is not
        retried within a run (nothing unread is marked read; the next run reads it), so the bound is
        the one libpq already gives a connection that does not answer, not the MLflow store's
        ``--mlflow-timeout`` (``DB_SILENCE_S`` at least), which is how long a lost connection to the
        store is retried. Silence is counted from the last answer (``call`` tells each row to
        ``heard``): a large page read steadily is not cut short. A database that still answers a
        ``SELECT 1`` on a new connection (:meth:`_answers`) is busy, not lost (a table locked by a
        migration, a sort of a large table without LiteLLM's index): it is waited for, within
        ``SLOW_READ_S``. The connection is abandoned, neither closed nor used again (the thread may
        still be blocked in it): the next read opens another."""
        heard = _Heard()
        try:
            watched = Watched(lambda: call(heard), "spendlogs-db")
        except RuntimeError as e:  # no thread can start (a pids limit): unavailable for now, as an unreachable database is
            raise self._error(what, e) from None
        started, said = heard.at, False
        while not watched.done.wait(max(0.0, heard.at + self.silence_s - time.monotonic())):
            if (silent := time.monotonic() - heard.at) < self.silence_s:
                continue
            if time.monotonic() - started < SLOW_READ_S + self.silence_s and self._answers():
                if not said:
                    log.info(
                        "%s %s: no rows for %.0fs, but the database answers: waiting (a lock or a slow query)", what, self.shown, silent
                    )
                    said = True
                heard.beat()
                continue
            self._conn = None
            raise SourceUnavailable(f"{what} {self.shown}: no answer for {silent:.0f}s (a frozen host or a network partition?)")
        return watched.result()

    def _answers(self) -> bool:
        """Whether the database answers ``SELECT 1`` on a connection of its own within ``PING_S`` (whatever
        the silence bound: a loaded host may take seconds to start a backend)."""

        def ping() -> None:
            with psycopg.connect(_libpq_url(self.url), autocommit=True, connect_timeout=PING_S, application_name="litellm-ingest") as c:
                c.execute("SELECT 1")

        try:
            watched = Watched(ping, "spendlogs-db-ping")
        except RuntimeError:
            return False
        if not watched.done.wait(PING_S):
            return False
        try:
            watched.result()
        except Exception:
            return False
        return True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> SpendLogsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _begin(self, conn: psycopg.Connection) -> None:
        """Per transaction, not per session: a transaction-pooling pgbouncer does not keep session settings."""
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        conn.execute("SET LOCAL DateStyle = 'ISO, MDY'")
        conn.execute(
            "SELECT set_config('statement_timeout', %s, true) WHERE current_setting('statement_timeout') = '0'", [f"{SLOW_READ_S}s"]
        )

    # --- table ----------------------------------------------------------------------------------

    def check(self) -> None:
        """Connect, find the table and its columns, and read nothing: fail early, in one line, on what a user must fix."""
        conn = self._connect()
        what = f"cannot read table {self.table!r} in"
        self._schema, self._columns = self._answered(what, lambda heard: self._find_table(conn, what))

    def _find_table(self, conn: psycopg.Connection, what: str) -> tuple[str, list[_Column]]:
        """The table's schema and columns (``check``; in a watched thread: it changes nothing of ``self``)."""
        try:
            with conn.transaction():
                self._begin(conn)
                named = (self.named_schema, self.table) if self.named_schema is not None else (self.table,)
                schema = conn.execute(
                    "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
                    [sql.Identifier(*named).as_string(conn)],
                ).fetchone()
                if schema is None:
                    raise SourceUnavailable(
                        f"no table {self.table!r} in {self.shown}"
                        + (f" in schema {self.named_schema!r}" if self.named_schema is not None else "")
                        + " (is this LiteLLM's database, with its migrations applied?)"
                    )
                # A role without SELECT sees no column in information_schema: said as the grant it lacks.
                conn.execute(sql.SQL("SELECT 1 FROM {}.{} LIMIT 0").format(sql.Identifier(schema[0]), sql.Identifier(self.table)))
                rows = conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                    [schema[0], self.table],
                ).fetchall()
                columns = [_Column(str(name), str(kind)) for name, kind in rows]
                missing = [c for c in REQUIRED_COLUMNS if c not in {col.name for col in columns}]
                if missing:
                    raise SourceUnavailable(
                        f"table {self.table!r} in {self.shown} has no column {', '.join(repr(m) for m in missing)} (or it cannot be read)"
                    )
        except psycopg.Error as e:
            raise self._error(what, e) from None
        return str(schema[0]), columns

    @property
    def columns(self) -> list[str]:
        """The table's column names as read (after ``check``)."""
        return [c.name for c in self._columns or []]

    # --- pages ----------------------------------------------------------------------------------

    def _query(self, after: tuple[str, str] | None, since_us: int | None, until_us: int | None) -> tuple[sql.Composed, list[Any]]:
        assert self._columns is not None and self._schema is not None
        start = sql.Identifier("startTime")
        where: list[sql.Composable] = []
        params: list[Any] = []
        if after is not None:
            where.append(sql.SQL("({}, request_id) > (%s, %s)").format(start))
            params += [after[0], after[1]]
        if since_us is not None:
            where.append(sql.SQL("{} >= %s").format(start))
            params.append(_sql_time(since_us))
        if until_us is not None:
            where.append(sql.SQL("{} < %s").format(start))
            params.append(_sql_time(until_us))
        start_us = sql.SQL(
            "CASE WHEN {s} >= '1970-01-01' AND {s} < '10000-01-01' THEN (extract(epoch FROM {s}) * 1000000)::bigint END"
        ).format(s=start)
        query = sql.SQL("SELECT {s}::text, request_id, {us}, {cols} FROM {schema}.{table}{where} ORDER BY {s}, request_id LIMIT %s").format(
            s=start,
            us=start_us,
            cols=sql.SQL(", ").join(c.select() for c in self._columns),
            schema=sql.Identifier(self._schema),
            table=sql.Identifier(self.table),
            where=sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
        )
        return query, [*params, self.page_rows]

    def pages(self, after: tuple[str, str] | None, since_us: int | None = None, until_us: int | None = None) -> Iterator[Page]:
        """Pages of rows after the keyset position ``after`` (None: from the first row), with ``since_us``
        <= startTime < ``until_us`` (epoch microseconds, UTC) when given, until the table has no more.

        Odd row content never raises here (it is left for normalize to quarantine or warn about, as for a
        file's lines); a lost connection or a dropped table does, as ``SourceUnavailable``."""
        if self._columns is None:
            self.check()
        while True:
            page, full = self._page(after, since_us, until_us)
            if page is None:
                return
            yield page
            after = page.last
            if not full:
                return

    def _page(self, after: tuple[str, str] | None, since_us: int | None, until_us: int | None) -> tuple[Page | None, bool]:
        """One page in one read-only transaction; whether it stopped for its row limit or byte budget (more may follow)."""
        conn = self._connect()
        query, params = self._query(after, since_us, until_us)
        what = f"cannot read table {self.table!r} in"
        page, full, self.rows_read = self._answered(what, lambda heard: self._read_page(conn, query, params, what, heard))
        return page, full

    def _read_page(
        self, conn: psycopg.Connection, query: sql.Composed, params: list[Any], what: str, heard: _Heard
    ) -> tuple[Page | None, bool, int]:
        """``_page``'s read, in a watched thread: it changes nothing of ``self`` (one abandoned may go on
        once the database answers again), and gives the rows read so far with the page."""
        assert self._columns is not None
        lines: list[str] = []
        keys: list[tuple[str, int | None]] = []
        bad: list[QuarantineRecord] = []
        bad_keys: list[tuple[str, int | None]] = []
        last: tuple[str, str] | None = None
        size = fetched = 0
        full = False
        first_line = self.rows_read + 1
        read = first_line - 1
        try:
            with conn.transaction():
                self._begin(conn)
                with conn.cursor(name="litellm_ingest_spendlogs") as cur:
                    cur.itersize = min(self.page_rows, 500)
                    cur.execute(query, params)
                    for row in cur:
                        heard.beat()
                        fetched += 1
                        start_text, request_id, start_us = row[0], row[1], row[2]
                        last = (start_text, request_id)
                        raw, odd = self._raw(row[3:])
                        read += 1
                        if odd is not None:
                            bad.append(QuarantineRecord.of(self.source, read, read - 1, odd[0], odd[1], raw))
                            bad_keys.append((request_id, start_us))
                            continue
                        lines.append(raw)
                        keys.append((request_id, start_us))
                        size += len(raw)
                        if size >= self.page_bytes:
                            full = True
                            break
        except psycopg.Error as e:
            raise self._error(what, e) from None
        if last is None:
            return None, False, first_line - 1
        full = full or fetched >= self.page_rows
        n = len(lines)
        skipped = {r.line for r in bad}
        numbers = [i for i in range(first_line, read + 1) if i not in skipped]
        frame = pl.DataFrame(
            {
                "source": pl.Series([self.source] * n, dtype=pl.String),
                "line_no": pl.Series(numbers, dtype=pl.Int64),
                "offset": pl.Series([i - 1 for i in numbers], dtype=pl.Int64),
                "raw": pl.Series(lines, dtype=pl.String),
                "truncated": pl.Series([False] * n, dtype=pl.Boolean),
            }
        )
        key_frame = pl.DataFrame(
            {"request_id": [k[0] for k in keys], "start_us": [k[1] for k in keys]}, schema={"request_id": pl.String, "start_us": pl.Int64}
        )
        return Page(frame, key_frame, last, bad, bad_keys), full, read

    def _raw(self, values: tuple[Any, ...]) -> tuple[str, tuple[Reason, str] | None]:
        """The row as one JSON object (request_id first, so a quarantine reader sees it first), and why it
        cannot be a line if it cannot (text that was not UTF-8, larger than a line may be)."""
        assert self._columns is not None
        row: dict[str, Any] = {}
        odd: tuple[Reason, str] | None = None
        for col, v in zip(self._columns, values, strict=True):
            if isinstance(v, _Text):
                odd = (Reason.INVALID_UTF8, f"column {col.name!r} is not valid UTF-8 (shown with U+FFFD)")
                v = str(v)
            row[col.name] = col.value(v)
        ordered = {"request_id": row.pop("request_id"), **row}
        raw = orjson.dumps(ordered).decode()
        if odd is None and len(raw) * 4 > self.max_row_bytes and len(raw.encode()) > self.max_row_bytes:
            odd = (Reason.LINE_TOO_LONG, f"row longer than {self.max_row_bytes} bytes as JSON")
        return raw, odd


def _sql_time(us: int) -> str:
    """Epoch microseconds as a literal PostgreSQL compares with a UTC ``timestamp`` column (or, in a UTC session, a ``timestamptz``)."""
    try:
        at = EPOCH + timedelta(microseconds=us)
    except OverflowError:
        return "infinity" if us > 0 else "-infinity"
    return at.isoformat(sep=" ", timespec="microseconds")


def db_units(
    db: SpendLogsDB, ledger: Ledger, since_us: int | None = None, until_us: int | None = None, reread: timedelta = REREAD
) -> Iterator[Unit]:
    """New rows as units, a page each: from ``reread`` before the newest row a previous run read,
    rows it read already skipped by request_id (rows inserted late are still found).

    ``since_us``/``until_us`` bound calls, not rows (the pipeline selects a call by its first
    attempt's start): rows are read ``WINDOW_SLACK`` either side, so a retry across a bound stays
    with its call, and only rows starting inside are marked read. One read as slack is read again by
    the window's next run (within ``reread``): a call it dropped as started before ``since`` is still
    whole there when its retry has been inserted since, not that retry alone."""
    after: tuple[str, str] | None = None
    horizon = datetime.now(UTC).replace(tzinfo=None) + MARK_AHEAD
    if newest := ledger.meta(db.source, "newest_start"):
        mark = _mark_time(newest)
        if mark is None or mark > horizon:
            log.warning(
                "%s: the newest row start a run kept (%s) is no time or in the future; reading the table from its start", db.source, newest
            )
            ledger.drop_meta(db.source, "newest_start")
        elif mark - datetime.min > 2 * reread:
            start = mark - reread
            after = (start.isoformat(sep=" ", timespec="microseconds"), "")
            ledger.prune(db.source, _at(int((start - reread - EPOCH) / timedelta(microseconds=1))))
    now_us = int((datetime.now(UTC).replace(tzinfo=None) - EPOCH) / timedelta(microseconds=1))
    slack_us = WINDOW_SLACK // timedelta(microseconds=1)
    lo = None if since_us is None else since_us - slack_us
    hi = None if until_us is None else until_us + slack_us
    for page in db.pages(after, lo, hi):
        keys = page.keys
        bad_ids, bad_starts = [k for k, _ in page.quarantined_keys], [us for _, us in page.quarantined_keys]
        starts = [*keys["start_us"].to_list(), *bad_starts]
        items = items_frame([*keys["request_id"].to_list(), *bad_ids], [""] * len(starts), [_at(us) for us in starts])
        new = ledger.new(db.source, items)
        lines, quarantined = page.lines, page.quarantined
        if new.height < items.height:
            fresh = set(new["key"].to_list())
            lines = lines.filter(keys["request_id"].is_in(new["key"].implode()))
            quarantined = [q for q, k in zip(quarantined, bad_ids, strict=True) if k in fresh]
        chunk = Chunk(db.source, lines.with_columns(file=pl.lit(db.source)), quarantined)
        sane = [min(us, now_us) for us in starts if us is not None]  # a replica's clock ahead must not hide the others' rows
        meta = {"newest_start": _sql_time(max(sane))} if sane else {}
        yield Unit(db.source, [chunk], _inside(new, since_us, until_us), meta=meta, kind="rows", read=new.height)


MARK_AHEAD = timedelta(days=1)
"""A kept newest start further ahead of this machine's clock (saved by an older version, which let a
row ahead move it) is dropped. A row starting ahead of the clock (a replica's wrong clock,
``'infinity'``) moves where the next run reads from no further than the clock: the others' rows
inserted after it would be passed over."""


def _mark_time(text: str) -> datetime | None:
    """The kept newest start as naive UTC (a ``timestamptz`` column gives one with an offset); None if no time."""
    try:
        at = datetime.fromisoformat(text.replace(" ", "T"))
    except ValueError:
        return None
    return at.astimezone(UTC).replace(tzinfo=None) if at.tzinfo is not None else at


def _inside(items: pl.DataFrame, since_us: int | None, until_us: int | None) -> pl.DataFrame:
    """The rows starting in [since, until), and those with no start (quarantined: marked, so quarantined once)."""
    if since_us is None and until_us is None:
        return items
    start = pl.col("at").cast(pl.Int64, strict=False)
    inside = pl.lit(True)
    if since_us is not None:
        inside = inside & (start >= since_us)
    if until_us is not None:
        inside = inside & (start < until_us)
    return items.filter(start.is_null() | inside)


def _at(us: int | None) -> str:
    """Start time as ledger text that sorts as it compares (``prune`` compares it)."""
    return "" if us is None else f"{us:020d}"
