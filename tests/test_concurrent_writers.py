"""Several of our processes on one MLflow store at the same moment, as a fleet or an overlapping
backfill runs them: real `litellm-ingest` processes (and real writer processes for the tight races)
on real SQLite files and a real PostgreSQL.

The promise: any number of ingesters may open, create and write one store at once. Creating the
schema is serialized (and atomic on SQLite, so a kill cannot break the store), the experiment is
created once, and two writers storing the same trace merge it. Every store is compared row for row
with one written by a single process: nothing lost, nothing doubled.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy

from tests.conftest import Postgres, copies, write_log
from tests.storekit import assert_same_as_one_writer, store_rows

EXE = str(Path(sys.executable).parent / "litellm-ingest")
WRITERS = 3
EXPERIMENT = "fleet"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def start(uri: str, logs: Path, state: Path, cwd: Path, **env: str) -> subprocess.Popen:
    args = [EXE, "batch", str(logs), "--tracking-uri", uri, "--experiment-name", EXPERIMENT, "--state-dir", str(state), "-q"]
    return subprocess.Popen(args, cwd=cwd, env={**_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_together(uri: str, logs: Path, tmp: Path, n: int = WRITERS) -> None:
    """``n`` batch runs with their own state, started at the same moment; all must succeed."""
    procs = [start(uri, logs, tmp / f"state-{i}", tmp) for i in range(n)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"exit {p.returncode}: {err[-2000:]}"
        assert "Traceback" not in err and "error" not in err.lower(), err[-2000:]


@pytest.fixture(scope="module")
def fleet_logs(capture: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 600 records of real calls (retries and fallbacks among them) in three proxies' files."""
    d = tmp_path_factory.mktemp("fleet-logs")
    batches = copies(capture, 12, "fleet")
    for i in range(3):
        write_log(d / f"proxy-{i}.jsonl", [r for b in batches[i::3] for r in b])
    return d


@pytest.fixture(scope="module")
def reference(fleet_logs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[tuple[Any, ...]]]:
    """The same logs written by one process alone."""
    d = tmp_path_factory.mktemp("fleet-reference")
    uri = f"sqlite:///{d / 'ref.db'}"
    p = start(uri, fleet_logs, d / "state", d)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    rows = store_rows(uri)
    assert len(rows["info"]) > 100 and len(rows["spans"]) > len(rows["info"])
    return rows


def prepare(uri: str, tmp: Path) -> None:
    """Schema and experiment in place, no traces: an ingest of an empty folder."""
    (tmp / "empty").mkdir()
    p = start(uri, tmp / "empty", tmp / "prep-state", tmp)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err


@pytest.mark.parametrize("prepared", [False, True], ids=["fresh", "prepared"])
def test_writers_at_once_on_one_sqlite_store(fleet_logs: Path, reference: dict, tmp_path: Path, prepared: bool) -> None:
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    if prepared:
        prepare(uri, tmp_path)
    run_together(uri, fleet_logs, tmp_path)
    assert_same_as_one_writer(uri, reference)
    assert not list(tmp_path.glob(".shared.db.creating-*")), "a finished creation leaves no temporary file"


@pytest.mark.parametrize("prepared", [False, True], ids=["fresh", "prepared"])
def test_writers_at_once_on_one_postgresql_database(
    fleet_logs: Path, reference: dict, tmp_path: Path, postgres: Postgres, prepared: bool
) -> None:
    uri = postgres.new_database()
    if prepared:
        prepare(uri, tmp_path)
    run_together(uri, fleet_logs, tmp_path)
    assert_same_as_one_writer(uri, reference)


def test_writers_at_once_through_one_server_create_the_experiment_once(fleet_logs: Path, tmp_path: Path, mlflow_server: Any) -> None:
    from tests.conftest import all_traces

    name = f"fleet-{time.time_ns()}"
    procs = [
        subprocess.Popen(
            [
                EXE,
                "batch",
                str(fleet_logs),
                "--tracking-uri",
                mlflow_server.url,
                "--experiment-name",
                name,
                "--state-dir",
                str(tmp_path / f"s{i}"),
                "-q",
            ],
            cwd=tmp_path,
            env=_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WRITERS)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    assert [e.name for e in client.search_experiments(filter_string=f"name = '{name}'")] == [name]
    traces = all_traces(mlflow_server.url, name, include_spans=False)
    assert len(traces) == len({t.info.trace_id for t in traces}) > 100


APP = """
import sys, time
from pathlib import Path
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("my-app")
running, stop = Path(sys.argv[2]), Path(sys.argv[3])

@mlflow.trace
def answer(q):
    with mlflow.start_span("retrieve") as s:
        s.set_inputs({"q": q})
    return q.upper()

during = 0
while not stop.exists():
    answer("question")
    print(mlflow.get_last_active_trace_id(), flush=True)
    during += running.exists()
    time.sleep(0.05)
mlflow.flush_trace_async_logging()
print("during", during, flush=True)
"""


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_an_app_tracing_into_the_same_sqlite_file_and_the_ui_reading_it_lose_nothing_while_a_backfill_writes(
    fleet_logs: Path, reference: dict, tmp_path: Path, journal: str
) -> None:
    """The quick start's ``sqlite:///mlflow.db`` is also where the user's own app traces (MLflow's fluent
    API, a trace every 50 ms) and what ``mlflow ui`` reads. Our commits hold SQLite's write lock well
    under MLflow's 20 s busy timeout, so no app trace is lost or raises, and no search fails. A store
    its user switched to WAL (for readers beside a writer) stays in WAL."""
    from tests.conftest import start_mlflow_server

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    prepare(uri, tmp_path)
    with sqlite3.connect(db) as con:
        assert con.execute(f"PRAGMA journal_mode={journal}").fetchone() == (journal,)
    server = start_mlflow_server(tmp_path / "ui", backend_uri=uri)
    running, stop = tmp_path / "running", tmp_path / "stop"
    app = subprocess.Popen(
        [sys.executable, "-c", APP, uri, str(running), str(stop)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert app.stdout is not None
        first = app.stdout.readline().strip()
        assert first.startswith("tr-"), "the app traces"
        running.touch()
        args = [
            EXE,
            "backfill",
            str(fleet_logs),
            "--tracking-uri",
            uri,
            "--experiment-name",
            EXPERIMENT,
            "--state-dir",
            str(tmp_path / "s"),
            "-q",
        ]
        ours = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        search = {"locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": "1"}}], "max_results": 100}
        answers = []
        while ours.poll() is None:
            answers.append(requests.post(f"{server.url}/api/3.0/mlflow/traces/search", json=search, timeout=120).status_code)
        running.unlink()
        _, err = ours.communicate()
        stop.touch()
        out, app_err = app.communicate(timeout=120)
    finally:
        stop.touch()
        if app.poll() is None:
            app.kill()
        server.stop()
    assert ours.returncode == 0 and not err, err[-2000:]
    assert answers and set(answers) == {200}, answers
    assert app.returncode == 0 and "Traceback" not in app_err and "Failed to send" not in app_err, app_err[-2000:]
    assert int(out.split()[-1]) > 0, "the app traced while the backfill wrote"
    app_ids = {first, *(w for w in out.split() if w.startswith("tr-"))}
    with sqlite3.connect(db) as con:
        spans = dict(con.execute("SELECT trace_id, count(*) FROM spans GROUP BY trace_id").fetchall())
    assert {t: spans.get(t) for t in app_ids} == dict.fromkeys(app_ids, 2), "every app trace is stored whole"
    rows = {table: {r for r in found if r[0] not in app_ids} for table, found in store_rows(uri).items()}
    assert rows["experiments"] == reference["experiments"] | {("my-app",)}
    assert all(rows[t] == reference[t] for t in ("info", "spans", "tags", "metadata")), "our traces: as one writer alone leaves them"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone() == (journal,)
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# --- kills while the schema is being created ------------------------------------------------------


def test_a_kill_while_creating_a_sqlite_store_never_breaks_it(tmp_path: Path, fleet_logs: Path, reference: dict) -> None:
    """SIGKILL at several moments of MLflow's schema creation (a few seconds of migrations, with no
    cached empty schema to copy): the next run always opens the store and writes everything."""
    db = tmp_path / "killed.db"
    uri = f"sqlite:///{db}"
    (tmp_path / "empty").mkdir()
    for delay in (0.0, 0.4, 1.0, 2.0):
        p = start(uri, tmp_path / "empty", tmp_path / "kill-state", tmp_path, XDG_CACHE_HOME="/dev/null")
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".killed.db.creating-*")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, "the run finished before it could be killed"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if db.exists():  # the migrations ended within the delay (an idle, fast machine): only a whole store is put in place
            tables, versions = _schema(db)
            assert any(name == "alembic_version" for name, _ in tables) and versions, "a killed creation leaves no half-made store behind"
            break
    p = start(uri, fleet_logs, tmp_path / "state", tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert_same_as_one_writer(uri, reference)
    assert not list(tmp_path.glob(".killed.db.creating-*"))


def _schema(db: Path) -> tuple[list[tuple[str, str]], list[tuple[str, ...]]]:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        tables = sorted(con.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL"))
        return tables, [tuple(r) for t, _ in tables if t.startswith(("alembic", "workspaces")) for r in con.execute(f"SELECT * FROM {t}")]
    finally:
        con.close()


def test_new_sqlite_stores_are_copies_of_a_cached_empty_schema_checked_before_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building MLflow's schema runs every migration (seconds); the empty result is kept in the
    user's cache and copied for the next new store. A damaged copy is never used, and no cache
    (none writable) only means building each time. (Two builds differ in the order of some
    constraints, MLflow's migrations iterate sets: a copy is compared with what it copied.)"""
    from ingest.stores import _create_sqlite_aside, _schema_template, _sqlite_schema_state

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    template = _schema_template()
    assert not template.exists()
    _create_sqlite_aside(tmp_path / "built.db")
    assert template.exists(), "the first new store leaves its empty schema in the cache"
    _create_sqlite_aside(tmp_path / "copied.db")
    assert _schema(tmp_path / "copied.db") == _schema(tmp_path / "built.db")

    template.write_bytes(b"not a database" * 100)
    _create_sqlite_aside(tmp_path / "after-damage.db")
    assert _sqlite_schema_state(tmp_path / "after-damage.db") == "complete"
    assert _sqlite_schema_state(template) == "complete", "a damaged template is replaced by a good one"

    monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null")
    _create_sqlite_aside(tmp_path / "no-cache.db")
    assert _sqlite_schema_state(tmp_path / "no-cache.db") == "complete"
    assert not list(tmp_path.glob(".*.creating-*"))


def test_a_kill_while_creating_a_postgresql_schema_never_breaks_it(
    tmp_path: Path, fleet_logs: Path, reference: dict, postgres: Postgres
) -> None:
    """SIGKILL once MLflow's first tables exist (its migrations running), at two moments: the next run
    finishes the schema and writes everything."""
    uri = postgres.new_database()
    engine = sqlalchemy.create_engine(uri)
    (tmp_path / "empty").mkdir()
    tables = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
    seen = []
    for delay in (0.0, 0.5):
        p = start(uri, tmp_path / "empty", tmp_path / "kill-state", tmp_path)
        deadline = time.monotonic() + 60
        with engine.connect() as c:
            while c.execute(sqlalchemy.text(tables)).scalar() == 0 and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        with engine.connect() as c:
            seen.append(c.execute(sqlalchemy.text(tables)).scalar())
    engine.dispose()
    assert any(n > 0 for n in seen), f"never killed while the schema was being made: {seen}"
    p = start(uri, fleet_logs, tmp_path / "state", tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert_same_as_one_writer(uri, reference)


def _half_created(db: Path, *, with_experiment: bool) -> None:
    """What MLflow itself leaves when killed mid-migration: the first tables, and an Alembic
    scratch table of a migration that never finished."""
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    InitialBase.metadata.create_all(engine)
    with engine.begin() as c:
        c.execute(sqlalchemy.text("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)"))
        if with_experiment:
            c.execute(sqlalchemy.text("INSERT INTO experiments (experiment_id, name, lifecycle_stage) VALUES (7, 'mine', 'active')"))
    engine.dispose()


def test_a_store_left_half_created_and_empty_is_moved_aside_and_created_anew(tmp_path: Path, fleet_logs: Path, reference: dict) -> None:
    db = tmp_path / "broken.db"
    _half_created(db, with_experiment=False)
    p = start(f"sqlite:///{db}", fleet_logs, tmp_path / "state", tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    (aside,) = tmp_path.glob("broken.db.incomplete-*Z")  # named by UTC time, as a corrupt state is
    assert "half-created" in err and str(aside.name) in err
    assert "_alembic_tmp_experiments" in {r[0] for r in sqlite3.connect(aside).execute("SELECT name FROM sqlite_master")}
    assert_same_as_one_writer(f"sqlite:///{db}", reference)


def test_a_half_created_store_that_holds_data_is_left_alone_with_a_clear_error(tmp_path: Path, fleet_logs: Path) -> None:
    db = tmp_path / "broken.db"
    _half_created(db, with_experiment=True)
    before = db.read_bytes()
    p = start(f"sqlite:///{db}", fleet_logs, tmp_path / "state", tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 4
    assert "Traceback" not in err and "holds data" in err and "mlflow db upgrade" in err
    assert db.read_bytes() == before
    assert not list(tmp_path.glob("broken.db.incomplete-*"))


@pytest.mark.parametrize(
    "data",
    [
        "INSERT INTO params (key, value, run_uuid) VALUES ('lr', '0.1', 'r1')",
        "INSERT INTO experiments (experiment_id, name, lifecycle_stage) VALUES (7, 'mine', 'active')",
        "INSERT INTO _alembic_tmp_experiments (experiment_id) VALUES (7)",
    ],
)
def test_a_half_created_store_holds_data_in_any_of_mlflows_tables(tmp_path: Path, data: str) -> None:
    """Only experiments, runs, traces and registered models were counted: rows anywhere else in
    MLflow's tables were taken for an empty store and moved aside."""
    from ingest.stores import _sqlite_schema_state

    db = tmp_path / "broken.db"
    _half_created(db, with_experiment=False)
    assert _sqlite_schema_state(db) == "empty"
    with sqlite3.connect(db) as con:
        con.execute(data)
    assert _sqlite_schema_state(db) == "has-data"


_KILLED_WITH_FRAMES_IN_ITS_WAL = """
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA journal_mode=WAL")
con.execute("PRAGMA wal_autocheckpoint=0")  # the commits stay in the -wal, as a crashed server's last ones do
for _ in range(20):
    con.execute("UPDATE trace_tags SET value = value || 'x'")
os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_new_store_never_reads_the_journal_or_wal_a_deleted_store_left_behind(
    tmp_path: Path, fleet_logs: Path, reference: dict, journal: str
) -> None:
    """A store whose writer died in a commit, then deleted (``rm mlflow.db`` to start over), leaves its
    hot ``-journal`` (or, in WAL mode, its ``-wal`` and ``-shm``): the store created under that name
    must not take the old store's pages from them (it did: a malformed store, the run failing with
    exit 4 and the new store broken for good)."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    p = start(uri, fleet_logs, tmp_path / "state-1", tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    killer = _KILLED_WITH_FRAMES_IN_ITS_WAL if journal == "wal" else _KILLED_MID_COMMIT
    killed = subprocess.run([sys.executable, "-c", killer, str(db)], capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = db.with_name(db.name + ("-wal" if journal == "wal" else "-journal"))
    assert left.stat().st_size > 10_000, "the kill must leave the old store's pages beside it, or this test tests nothing"
    db.unlink()
    p = start(uri, fleet_logs, tmp_path / "state-2", tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert_same_as_one_writer(uri, reference)


_KILLED_MID_COMMIT = """
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA cache_size=1")  # pages spill into the store mid-transaction: its journal is hot
con.execute("BEGIN")
for i in range(2000):
    con.execute("INSERT INTO trace_tags(key, value, request_id) VALUES (?, ?, 'tr-killed')", (f"k{i}", "v" * 500))
os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_store_whose_writer_was_killed_mid_commit_opens_as_of_its_last_commit(
    tmp_path: Path, fleet_logs: Path, reference: dict, journal: str
) -> None:
    """A writer SIGKILLed inside a transaction leaves a hot journal, which only a connection that may
    write can roll back: the next run (and a reader) must roll it back and go on, not take the store
    for one with an incomplete schema and refuse it. In WAL mode it leaves a ``-wal`` holding frames
    of no commit, which the next run must ignore, the store left in WAL."""
    db = tmp_path / "store.db"
    uri = f"sqlite:///{db}"
    p = start(uri, fleet_logs, tmp_path / "state-1", tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    with sqlite3.connect(db) as con:
        con.execute(f"PRAGMA journal_mode={journal}")
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_COMMIT, str(db)], capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    journal_file = db.with_name(db.name + ("-wal" if journal == "wal" else "-journal"))
    assert journal_file.exists() and journal_file.stat().st_size > 0, "the kill must leave a hot journal, or this test tests nothing"
    p = start(uri, fleet_logs, tmp_path / "state-2", tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert_same_as_one_writer(uri, reference)
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM trace_tags WHERE request_id = 'tr-killed'").fetchone() == (0,)
        assert con.execute("PRAGMA journal_mode").fetchone() == (journal,)
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# --- the tight race: the same traces inserted by several writers in the same instant -------------


def _race_writer(uri: str, logs: str, batch: int, barrier: Any, results: Any) -> None:
    """Build the traces, then write them in small batches, each batch by every writer at the same moment."""
    import logging

    from ingest.normalize import normalize
    from ingest.sink import StoreSink, resolve_target
    from ingest.sources import discover, read_chunks
    from ingest.spans import build_traces

    conflicts = []
    handler = logging.Handler()
    handler.emit = lambda record: conflicts.append(record) if "concurrent writer" in record.getMessage() else None  # type: ignore[method-assign]
    logging.getLogger("ingest.sink").addHandler(handler)
    logging.getLogger("ingest.sink").setLevel(logging.INFO)
    target = resolve_target(uri, EXPERIMENT, None)
    sink = StoreSink(target, deadline_s=60)
    traces = []
    for path in discover([logs]):
        for chunk in read_chunks(path):
            records, _ = normalize(chunk.lines)
            traces += build_traces(records.sort("call_key", "start_us"), target.experiment_id)
    barrier.wait(timeout=120)
    failures = []
    for i in range(0, len(traces), batch):
        barrier.wait(timeout=120)  # every batch raced by every writer at once
        try:
            sink.write(traces[i : i + batch])
        except Exception as e:
            failures.append(f"{type(e).__name__}: {str(e)[:300]}")
    results.put((len(conflicts), failures))


def race(uri: str, logs: Path, writers: int = 4, batch: int = 10) -> int:
    """Run the writers; return how many conflicts they met (and merged)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=_race_writer, args=(uri, str(logs), batch, barrier, results)) for _ in range(writers)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [f for _, fs in outcomes for f in fs] == []
    return sum(c for c, _ in outcomes)


def test_the_same_traces_inserted_at_the_same_instant_merge_on_postgresql(
    fleet_logs: Path, reference: dict, postgres: Postgres, tmp_path: Path
) -> None:
    uri = postgres.new_database()
    prepare(uri, tmp_path)
    conflicts = race(uri, fleet_logs)
    assert conflicts > 0, "the writers never collided: this test did not test the race"
    assert_same_as_one_writer(uri, reference)


def test_the_same_traces_inserted_at_the_same_instant_on_sqlite(fleet_logs: Path, reference: dict, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'race.db'}"
    prepare(uri, tmp_path)
    race(uri, fleet_logs)
    assert_same_as_one_writer(uri, reference)


def test_a_database_password_is_never_printed_or_kept(fleet_logs: Path, postgres: Postgres, tmp_path: Path) -> None:
    """The store's password (PostgreSQL here trusts 127.0.0.1, so any password opens it) stays out
    of the summary, the errors and the state file."""
    password = "pw-" + os.urandom(8).hex()
    uri = postgres.new_database().replace("postgres@", f"postgres:{password}@")
    state = tmp_path / "state"
    ok = subprocess.run(
        [EXE, "batch", str(fleet_logs), "--tracking-uri", uri, "--state-dir", str(state), "--json"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ":***@" in ok.stdout and password not in ok.stdout + ok.stderr
    down = uri.replace(f":{postgres.port}/", f":{postgres.port + 1}/")
    failed = subprocess.run(
        [EXE, "batch", str(fleet_logs), "--tracking-uri", down, "--state-dir", str(state), "--mlflow-timeout", "1"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert failed.returncode == 4 and ":***@" in failed.stderr and password not in failed.stdout + failed.stderr
    status = subprocess.run([EXE, "status", "--state-dir", str(state)], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert status.returncode == 0 and password not in status.stdout
    kept = [p for p in state.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert kept == []
