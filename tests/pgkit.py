"""A throwaway PostgreSQL cluster (initdb + pg_ctl in a temp dir): plain functions, no pytest, for
the ``postgres`` fixture and for bench/bench.py."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


def pg_bin(name: str) -> str | None:
    """A PostgreSQL program on PATH, else from the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    port: int

    def new_database(self) -> str:
        """A fresh, empty database on the cluster; its SQLAlchemy URI."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@dataclass
class PgCluster(Postgres):
    """A running cluster; ``stop()`` ends it and removes its directory."""

    base: Path = field(default_factory=Path)
    as_user: list[str] = field(default_factory=list)

    def _pg(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def halt(self) -> None:
        """Stop the server as a crash would (``-m immediate``), keeping its data: an outage."""
        self._pg(pg_bin("pg_ctl") or "pg_ctl", "-D", str(self.base / "data"), "-m", "immediate", "stop")

    def resume(self) -> None:
        """Start it again on the same port and data (crash recovery runs first)."""
        data, log = str(self.base / "data"), str(self.base / "server.log")
        self._pg(pg_bin("pg_ctl") or "pg_ctl", "-D", data, "-o", _options(self), "-l", log, "-w", "start")

    def freeze(self, sig: int = signal.SIGSTOP) -> None:
        """SIGSTOP the postmaster and every backend: a database that does not answer at all (a frozen
        host, a network partition), as opposed to one that refuses or drops connections.
        ``freeze(signal.SIGCONT)`` thaws it."""
        pm = int((self.base / "data" / "postmaster.pid").read_text().split()[0])
        kids = subprocess.run(["pgrep", "-P", str(pm)], capture_output=True, text=True).stdout.split()
        os.kill(pm, sig)
        for pid in map(int, kids):
            with contextlib.suppress(ProcessLookupError):  # a backend that ended since it was listed
                os.kill(pid, sig)

    @contextlib.contextmanager
    def frozen_at(
        self,
        uri: str,
        table: str,
        after_table: str | None = None,
        stop: Callable[[], None] | None = None,
        after_query: str | None = None,
    ) -> Iterator[Callable[[subprocess.Popen], None]]:
        """A process frozen out at exactly its first read of ``table``: the table is held locked (ACCESS
        EXCLUSIVE) by a session of ours, and the function given, called with the process, waits until
        one of its queries waits for that lock and then freezes the cluster (``freeze``; ``stop``: does
        that instead, e.g. ``halt``), so that query is never answered. On exit a frozen cluster is
        thawed and the lock released.

        Later than its first read: ``after_table``, at its first read of ``table`` after its first
        read of that other table (held there the same way until ``table`` is locked); ``after_query``
        (a LIKE pattern), at its next read of ``table`` once a query of it matching the pattern was
        seen (one under way finishes first: mid-table rather than at its first read)."""
        import psycopg

        dbname = uri.rsplit("/", 1)[1]
        connect = lambda: psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname)  # noqa: E731
        holder = connect()
        frozen = False

        def wait_until(proc: subprocess.Popen, query: str, arg: str, what: str) -> None:
            deadline = time.monotonic() + 60
            with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, autocommit=True) as watch:
                while not watch.execute(query, (arg,)).fetchone()[0]:  # type: ignore[index]
                    assert proc.poll() is None, f"the process ended before it {what}"
                    assert time.monotonic() < deadline, f"the process never {what}"
                    time.sleep(0.01)

        def wait_for_lock(proc: subprocess.Popen, on: str) -> None:
            wait_until(proc, "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND NOT granted", on, f"read {on}")

        def lock_table() -> None:
            nonlocal holder
            (second := connect()).execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            holder.close()
            holder = second

        def freeze_when_waiting(proc: subprocess.Popen) -> None:
            nonlocal frozen
            if after_table is not None:
                wait_for_lock(proc, after_table)  # held at ``after_table``: ``table`` is locked before it reads on
                lock_table()
            elif after_query is not None:
                seen = "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE %s"
                wait_until(proc, seen, after_query, f"ran a query like {after_query}")
                lock_table()
            wait_for_lock(proc, table)
            if stop is None:
                self.freeze()
                frozen = True
            else:
                stop()

        try:
            if after_query is None:
                holder.execute(f"LOCK TABLE {after_table or table} IN ACCESS EXCLUSIVE MODE")
            yield freeze_when_waiting
        finally:
            if frozen:
                self.freeze(signal.SIGCONT)
            with contextlib.suppress(Exception):  # a halted cluster took its session with it
                holder.close()

    def run_frozen_at(
        self, uri: str, table: str, args: list[str], what: str, after_query: str | None = None, **popen: object
    ) -> tuple[int, str]:
        """``args`` run as a process frozen out at its first read of ``table`` (``frozen_at``; at its
        next one after a query matching ``after_query`` when given): its exit code and stderr, or a
        test failure naming ``what`` if it still waits 30 s after the freeze."""
        with self.frozen_at(uri, table, after_query=after_query) as freeze_when_waiting:
            p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)  # type: ignore[call-overload]
            freeze_when_waiting(p)
            try:
                _, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                raise AssertionError(f"{what} still waits for the frozen database 30 s on") from None
        return p.returncode, err

    def stop(self) -> None:
        """Idempotent: a test may stop its cluster itself, and its fixture then stops it again."""
        if not self.base.exists():
            return
        with contextlib.suppress(subprocess.CalledProcessError):  # halted by the test already
            self.halt()
        shutil.rmtree(self.base, ignore_errors=True)


def start_postgres() -> PgCluster:
    """initdb + pg_ctl start in a temp dir: trust auth on 127.0.0.1, ``fsync=off``. As root it runs as
    the ``postgres`` user, since PostgreSQL refuses to run as root. FileNotFoundError if not installed."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise FileNotFoundError("PostgreSQL (initdb, pg_ctl) is not installed")
    base = Path(tempfile.mkdtemp(prefix="litellm-ingest-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    cluster = PgCluster(free_port(), base, as_user)
    data = base / "data"
    cluster._pg(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    cluster._pg(pg_ctl, "-D", str(data), "-o", _options(cluster), "-l", str(base / "server.log"), "-w", "start")
    return cluster


def _options(cluster: PgCluster) -> str:
    return f"-p {cluster.port} -k {cluster.base} -c listen_addresses=127.0.0.1 -c fsync=off"
