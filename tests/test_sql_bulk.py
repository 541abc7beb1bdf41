"""The bulk SQL writer leaves exactly the rows MLflow's own ``log_spans`` leaves.

The same input goes into two fresh stores (SQLite files, or databases on a real PostgreSQL),
one through ``log_spans`` (``--sql-writer mlflow``) and one through the bulk writer; every row of
every table must match (experiments aside, whose creation times differ), and so must what
``MlflowClient.search_traces`` returns.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingest.pipeline import RunOptions, run_batch
from ingest.sink import StoreSink, Target, resolve_target
from ingest.spans import Redaction, build_traces
from tests.conftest import all_traces, copy_samples, past_shift, reidentify, spend_row, write_log
from tests.pgkit import PgCluster

EXPERIMENT = "bulk-equivalence"
EXE = str(Path(sys.executable).parent / "litellm-ingest")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def varied_input(capture: list[dict], tmp_path: Path) -> list[str]:
    """The sample logs plus copies that carry sessions, users, odd tags (one of JSON text) and cache hits."""
    logs = copy_samples(tmp_path / "logs")
    (logs / "bad_input.jsonl").unlink()
    shift = past_shift(capture, days=20)
    extra = reidentify(capture, shift, "bulk")
    for n, r in enumerate(extra):
        meta = r.setdefault("metadata", {}) or {}
        r["metadata"] = meta
        if n % 3 == 0:
            r["session_id"] = f"session-{n // 6}"
        if n % 4 == 0:
            meta["user_api_key_end_user_id"] = f"user-{n % 5}"
            r["end_user"] = f"user-{n % 5}"
        if n % 5 == 0:
            # A value that is JSON text: MLflow 3.18's log_spans no longer takes a JSON layer off it, its /v1/traces does.
            r["request_tags"] = [*(r.get("request_tags") or []), "team:a", "team:b", "odd key!:é", "plain", 'json:{"k": [1, "x"]}']
        if n % 7 == 0:
            r["cache_hit"] = True
    write_log(logs / "varied.jsonl", extra)
    spend = reidentify(capture, shift + 3600, "bulk-spend")
    write_log(logs / "spend_varied.jsonl", [spend_row(r, store_prompts=n % 2 == 0, naive=n % 3 != 0) for n, r in enumerate(spend)])
    return [str(logs)]


def ingest(uri: str, paths: list[str], writer: str, **kw: object) -> None:
    summary = run_batch(RunOptions(paths=paths, tracking_uri=uri, experiment_name=EXPERIMENT, sql_writer=writer, settle_s=0, **kw))  # type: ignore[arg-type]
    assert summary.traces_written > 0


def table_rows(uri: str) -> dict[str, list[tuple]]:
    """Every row of every table but experiments, sorted, read with SQLAlchemy (any backend)."""
    import sqlalchemy as sa

    engine = sa.create_engine(uri)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return {
                name: sorted((tuple(r) for r in conn.execute(sa.select(table))), key=repr)
                for name, table in meta.tables.items()
                if name != "experiments"
            }
    finally:
        engine.dispose()


def scalar(uri: str, sql: str) -> tuple:
    import sqlalchemy as sa

    engine = sa.create_engine(uri)
    try:
        with engine.connect() as conn:
            return tuple(conn.execute(sa.text(sql)).one())
    finally:
        engine.dispose()


def comparable_traces(uri: str) -> list[dict]:
    out = []
    for t in all_traces(uri, EXPERIMENT):
        d = t.to_dict()
        d["info"].pop("trace_location", None)
        out.append(d)
    return sorted(out, key=lambda d: d["info"]["trace_id"])


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """Two fresh stores of one backend: (for log_spans, for the bulk writer)."""
    monkeypatch.chdir(tmp_path)  # both stores get the same artifact root, hence the same artifact-location tags
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'via_log_spans.db'}", f"sqlite:///{tmp_path / 'via_bulk.db'}"
    pg = request.getfixturevalue("postgres")
    return pg.new_database(), pg.new_database()


def test_bulk_writer_leaves_every_row_log_spans_leaves(capture, tmp_path, stores):
    paths = varied_input(capture, tmp_path)
    a, b = stores
    ingest(a, paths, "mlflow")
    ingest(b, paths, "bulk")
    rows_a, rows_b = table_rows(a), table_rows(b)
    assert set(rows_a) == set(rows_b)
    assert len(rows_a["trace_info"]) > 100
    filled = scalar(b, "SELECT count(session_id), count(total_cost), count(input_tokens), count(request_preview) FROM trace_info")
    users = scalar(b, "SELECT count(*) FROM trace_request_metadata WHERE key = 'mlflow.trace.user'")
    assert all(filled) and all(users), (filled, users)
    for table in rows_a:
        assert rows_a[table] == rows_b[table], table
    assert comparable_traces(a) == comparable_traces(b)


def test_bulk_rerun_changes_nothing_but_mlflows_write_counter_as_log_spans_does(capture, tmp_path, stores):
    """A re-run writes no new rows and changes no data; like ``log_spans`` it bumps
    ``trace_info.db_payload_generation``, MLflow's count of writes to a trace."""
    paths = varied_input(capture, tmp_path)
    a, b = stores
    for _ in range(2):
        ingest(a, paths, "mlflow")
        ingest(b, paths, "bulk")
        if _ == 0:
            before = table_rows(b)
    after = table_rows(b)
    assert after == table_rows(a)
    assert {t: r for t, r in after.items() if t != "trace_info"} == {t: r for t, r in before.items() if t != "trace_info"}
    assert without_generation(b, after["trace_info"]) == without_generation(b, before["trace_info"])
    assert after["trace_info"] != before["trace_info"]


def without_generation(uri: str, rows: list[tuple]) -> list[tuple]:
    import sqlalchemy as sa

    engine = sa.create_engine(uri)
    columns = [c["name"] for c in sa.inspect(engine).get_columns("trace_info")]
    engine.dispose()
    i = columns.index("db_payload_generation")
    return [r[:i] + r[i + 1 :] for r in rows]


def _write(uri: str, writer: str, frame_paths: list[str], redact: Redaction) -> None:
    from ingest.normalize import normalize
    from ingest.sources import discover, read_chunks

    target = resolve_target(uri, EXPERIMENT, None)
    sink = StoreSink(target, writer=writer)
    assert (sink.bulk is not None) == (writer == "bulk")
    for path in discover(frame_paths):
        for chunk in read_chunks(path):
            records, _ = normalize(chunk.lines)
            records = records.sort("call_key", "start_us")
            sink.write(list(build_traces(records, target.experiment_id, redact)))


def test_a_changed_resend_of_existing_traces_leaves_the_rows_of_one_write_of_it(capture, tmp_path, stores):
    """Existing traces are merged by ``log_spans``, then their trace row is settled: a re-send with
    other content (here, redacted) leaves the rows one write of that content leaves, previews
    included. ``log_spans`` alone keeps the first write's previews: the prompts the re-send
    redacts stay readable in the trace list."""
    logs = write_log(tmp_path / "logs" / "calls.jsonl", reidentify(capture, past_shift(capture), "resend"))
    fresh, b = stores
    _write(b, "bulk", [str(logs)], Redaction())
    first = table_rows(b)
    _write(b, "bulk", [str(logs)], Redaction(messages=True))
    _write(fresh, "bulk", [str(logs)], Redaction(messages=True))
    rows, once = table_rows(b), table_rows(fresh)
    assert rows["spans"] != first["spans"]
    assert {t: r for t, r in rows.items() if t != "trace_info"} == {t: r for t, r in once.items() if t != "trace_info"}
    assert without_generation(b, rows["trace_info"]) == without_generation(fresh, once["trace_info"])
    redacted = "SELECT count(*) FROM trace_info WHERE request_preview LIKE '%redacted%'"
    assert scalar(b, redacted)[0] > 0 and scalar(b, redacted) == scalar(fresh, redacted)


@pytest.mark.parametrize("guard", ["TESTED_REVISIONS", "TESTED_DIALECTS"])
def test_untested_schema_or_dialect_falls_back_to_log_spans_with_one_warning(capture, tmp_path, stores, monkeypatch, caplog, guard):
    import ingest.sql_bulk as sql_bulk

    monkeypatch.setattr(sql_bulk, guard, frozenset())
    _, b = stores
    logs = write_log(tmp_path / "logs" / "calls.jsonl", reidentify(capture, past_shift(capture), "fallback"))
    with caplog.at_level(logging.WARNING, logger="ingest.sink"):
        ingest(b, [str(logs)], "bulk", batch_traces=5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "log_spans" in warnings[0], warnings
    assert len(all_traces(b, EXPERIMENT, include_spans=False)) == len({r["litellm_call_id"] for r in capture})


def test_store_sink_uses_bulk_writer_on_the_tested_stores(stores):
    target: Target = resolve_target(stores[1], EXPERIMENT, None)
    assert StoreSink(target).bulk is not None
    assert StoreSink(target, writer="mlflow").bulk is None


def test_a_store_whose_schema_records_no_revision_falls_back_to_log_spans_saying_so(stores, caplog):
    """No ``alembic_version`` table (SQLite's "no such table", PostgreSQL's undefined table): the one
    case of an unknown revision, so the sink falls back to ``log_spans`` and says why (it said
    "schema revision None", as for a database that was merely unreachable at that moment)."""
    import sqlalchemy as sa

    uri = stores[1]
    target: Target = resolve_target(uri, EXPERIMENT, None)  # the store opened, and kept by this process
    engine = sa.create_engine(uri)
    with engine.begin() as c:
        c.execute(sa.text("DROP TABLE alembic_version"))
    engine.dispose()
    with caplog.at_level(logging.WARNING, logger="ingest.sink"):
        assert StoreSink(target, deadline_s=5).bulk is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "records no revision" in warnings[0], warnings


def _halted_at_schema_revision(pg: PgCluster, tmp_path: Path, capture: list[dict], timeout_s: str, back_after_s: float | None) -> tuple:
    """A batch into PostgreSQL whose database is halted (``pg_ctl -m immediate``: its connection
    dropped, new ones refused) exactly as the sink reads the schema revision (held there by a lock on
    ``alembic_version``, taken once the store was opened and the experiment read), and started again
    ``back_after_s`` later (never: None). Its exit code, stderr and the calls it had to write."""
    uri = pg.new_database()
    ingest(uri, [str(write_log(tmp_path / "first" / "calls.jsonl", reidentify(capture, past_shift(capture), "first")))], "bulk")
    records = reidentify(capture, past_shift(capture, days=10), "halted")
    logs = write_log(tmp_path / "logs" / "calls.jsonl", records)
    args = [EXE, "-v", "batch", str(logs), "--tracking-uri", uri, "--experiment-name", EXPERIMENT, "--state-dir", str(tmp_path / "st")]
    with pg.frozen_at(uri, "alembic_version", after_table="experiments", stop=pg.halt) as halt_when_reading:
        p = subprocess.Popen([*args, "--mlflow-timeout", timeout_s], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        halt_when_reading(p)
        if back_after_s is not None:
            time.sleep(back_after_s)
            pg.resume()
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError("the batch still runs 120 s after its database was halted: " + p.communicate()[1][-2000:]) from None
    return p.returncode, err, uri, {r["litellm_call_id"] for r in records}


def test_a_postgresql_down_while_the_schema_revision_is_read_is_waited_for_and_keeps_the_bulk_writer(capture, tmp_path, own_postgres):
    """The database goes down just as the sink reads its schema revision and is back 2 s later: that
    read failing was taken for an unknown revision, and the whole run wrote through the slower
    ``log_spans``, its one warning blaming "schema revision None". Now it is an outage like any
    other, retried within ``--mlflow-timeout``: the run keeps the bulk writer and writes every call."""
    pg = own_postgres
    code, err, uri, calls = _halted_at_schema_revision(pg, tmp_path, capture, "60", back_after_s=2.0)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert "log_spans" not in err and "open the MLflow store failed" in err, err[-3000:]
    assert len(all_traces(uri, EXPERIMENT, include_spans=False)) == len(calls) + len({r["litellm_call_id"] for r in capture})


def test_a_postgresql_that_stays_down_from_the_schema_revision_read_ends_the_run_with_exit_4_in_one_line(capture, tmp_path, own_postgres):
    """The database goes down as the schema revision is read and stays down: the run switched to
    ``log_spans`` with a misleading warning, then failed its writes. Now it is the outage it is:
    retried for ``--mlflow-timeout``, then exit 4 in one line, naming the store."""
    pg = own_postgres
    code, err, _, _ = _halted_at_schema_revision(pg, tmp_path, capture, "3", back_after_s=None)
    lines = [line for line in err.strip().splitlines() if " INFO " not in line]
    assert code == 4 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and "cannot open the MLflow store" in lines[0] and "log_spans" not in err, err[-3000:]


def test_with_sql_trace_rollups_on_the_rebuild_queue_matches_log_spans_too(capture, tmp_path, monkeypatch):
    """MLflow's opt-in rollups: the bulk writer queues the same partition rebuilds ``log_spans`` does."""
    monkeypatch.setenv("MLFLOW_SQL_TRACE_ROLLUPS_ENABLED", "true")
    monkeypatch.chdir(tmp_path)
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    logs = write_log(tmp_path / "logs" / "calls.jsonl", reidentify(capture, past_shift(capture), "rollups"))
    ingest(a, [str(logs)], "mlflow")
    ingest(b, [str(logs)], "bulk")
    rows_a, rows_b = table_rows(a), table_rows(b)
    queued = [t for t in rows_b if "rollup" in t and rows_b[t]]
    assert queued, sorted(rows_b)
    for table in rows_a:
        assert rows_a[table] == rows_b[table], table


@pytest.mark.parametrize("fate", ["deleted", "replaced"])
def test_a_write_into_a_sqlite_store_deleted_or_replaced_since_it_was_opened_is_refused_at_once(
    capture: list[dict], tmp_path: Path, fate: str
) -> None:
    """SQLite refuses every write to a file unlinked or renamed over while open (``readonly``): a
    run said "attempt to write a readonly database", and a daemon took it for an outage, held for
    ever. The sink tells it from an outage by the file at the path: refused at once, naming the
    store, and the experiment check says the same."""
    from ingest.normalize import normalize
    from ingest.sink import SinkError
    from ingest.sources import discover, read_chunks

    db = tmp_path / "m.db"
    target = resolve_target(f"sqlite:///{db}", EXPERIMENT, None)
    sink = StoreSink(target, deadline_s=60)
    logs = write_log(tmp_path / "logs" / "calls.jsonl", reidentify(capture, past_shift(capture), "gone"))
    (chunk,) = [c for p in discover([str(logs)]) for c in read_chunks(p)]
    traces = list(build_traces(normalize(chunk.lines)[0].sort("call_key", "start_us"), target.experiment_id))
    assert sink.experiment_problem() is None
    sink.write(traces[:2])
    if fate == "deleted":
        db.unlink()
    else:
        shutil.copy(db, tmp_path / "backup.db")
        os.replace(tmp_path / "backup.db", db)  # a backup restored in its place
    started = time.monotonic()
    with pytest.raises(SinkError) as refused:
        sink.write(traces[2:])
    assert time.monotonic() - started < 10, "not retried as an outage"
    said = f"the store {db} was deleted or replaced while this process had it open"
    assert refused.value.kind == "refused" and said in str(refused.value)
    assert said in (sink.experiment_problem() or "")
