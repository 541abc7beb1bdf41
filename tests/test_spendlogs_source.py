"""SpendLogs straight from LiteLLM's PostgreSQL, through the command: cron runs with rows added
between them (late ones too), rows without prompts, one trace per call across the database and the
proxy's own log file, and a password that never leaves the URL."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest

from ingest.sources import SourceUnavailable
from ingest.spendlogs_db import CONNECT_TIMEOUT_S, DEFAULT_PAGE_ROWS, MIN_CONNECT_TIMEOUT_S, PING_S
from tests.conftest import Postgres, all_traces, read_capture, reidentify, run_cli, soak_only, write_jsonl
from tests.litellm_db import TABLE, create_spendlogs_table, insert_rows, row_from_payload
from tests.pgkit import PgCluster

EXE = str(Path(sys.executable).parent / "litellm-ingest")
EXP = "spendlogs-db"
SILENCE_S = MIN_CONNECT_TIMEOUT_S
"""The silence bound the frozen-database tests give in the URL (``connect_timeout``): the shortest libpq takes."""


def run(*args: str, state: Path, uri: str, check: bool = True) -> tuple[int, dict[str, Any], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    p = run_cli([*args, "--tracking-uri", uri, "--experiment-name", EXP, "--state-dir", str(state), "--json"], Path.cwd(), env, 300)
    assert "Traceback" not in p.stderr, p.stderr
    if check:
        assert p.returncode == 0, p.stderr
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {}), p.stderr


@pytest.fixture
def litellm_db(postgres: Postgres) -> str:
    url = postgres.new_database()
    create_spendlogs_table(url)
    return url


def _calls(records: list[dict]) -> set[str]:
    return {r["litellm_call_id"] for r in records}


def test_cron_over_the_database_reads_new_and_late_rows_once(litellm_db: str, tmp_path: Path) -> None:
    records = reidentify(read_capture(), shift_s=-86400 * 3)
    first, later = records[:30], records[30:]
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    insert_rows(litellm_db, [row_from_payload(r) for r in first])
    _, s1, _ = run("batch", litellm_db, state=tmp_path / "st", uri=uri)
    assert s1["db_rows"] == 30 and s1["traces_written"] == len(_calls(first))

    late = dict(later[-1])
    late_row = row_from_payload(late)
    newest = max(r["startTime"] for r in first)
    late["startTime"], late["endTime"] = newest - 600, newest - 590
    late_row = row_from_payload(late)
    insert_rows(litellm_db, [row_from_payload(r) for r in later[:-1]] + [late_row])
    _, s2, _ = run("batch", litellm_db, state=tmp_path / "st", uri=uri)
    assert s2["db_rows"] == len(later)
    traces = all_traces(uri, EXP, include_spans=False)
    assert {t.info.tags["litellm.call_id"] for t in traces} >= _calls(records) - {None}
    assert len(traces) == len(_calls(records))

    _, s3, _ = run("batch", litellm_db, state=tmp_path / "st", uri=uri)
    assert s3["db_rows"] == 0 and s3["traces_written"] == 0
    assert len(all_traces(uri, EXP, include_spans=False)) == len(_calls(records))


def test_rows_without_stored_prompts_become_traces_with_times_tokens_cost_and_status(litellm_db: str, tmp_path: Path) -> None:
    records = [r for r in reidentify(read_capture(), shift_s=-86400) if r["status"] == "success"][:5]
    insert_rows(litellm_db, [row_from_payload(r, store_prompts=False) for r in records])
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run("batch", litellm_db, state=tmp_path / "st", uri=uri)
    by_call = {t.info.tags["litellm.call_id"]: t for t in all_traces(uri, EXP)}
    for r in records:
        t = by_call[r["litellm_call_id"]]
        assert t.info.state.value == "OK"
        assert t.info.request_time == int(r["startTime"] * 1000) or abs(t.info.request_time - r["startTime"] * 1000) <= 1
        usage = t.info.token_usage or {}
        assert usage.get("input_tokens") == r["prompt_tokens"] and usage.get("output_tokens") == r["completion_tokens"]
        assert t.info.trace_metadata.get("mlflow.trace.cost") is not None or t.info.cost is not None  # type: ignore[attr-defined]


def test_a_call_in_the_log_file_and_the_database_is_one_trace(litellm_db: str, tmp_path: Path) -> None:
    records = reidentify(read_capture(), shift_s=-86400 * 2)
    insert_rows(litellm_db, [row_from_payload(r) for r in records])
    log = write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
    both, alone = f"sqlite:///{tmp_path / 'both.db'}", f"sqlite:///{tmp_path / 'alone.db'}"
    run("batch", str(log), litellm_db, state=tmp_path / "st", uri=both)
    run("batch", str(log), state=tmp_path / "st2", uri=alone)
    ids_both = sorted(t.info.trace_id for t in all_traces(both, EXP, include_spans=False))
    ids_alone = sorted(t.info.trace_id for t in all_traces(alone, EXP, include_spans=False))
    assert ids_both == ids_alone and len(ids_both) == len(_calls(records))


def test_the_database_password_stays_in_the_url(litellm_db: str, tmp_path: Path) -> None:
    secret = "pw-7c1d0e55-never-shown"
    url = litellm_db.replace("postgres@", f"postgres:{secret}@")
    insert_rows(litellm_db, [row_from_payload(r) for r in reidentify(read_capture()[:3], shift_s=-3600)])
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    _, summary, err = run("batch", url, state=tmp_path / "st", uri=uri)
    assert summary["db_rows"] == 3
    status = subprocess.run([EXE, "status", "--state-dir", str(tmp_path / "st"), "--json"], capture_output=True, text=True, timeout=60)
    kept = b"".join(p.read_bytes() for p in (tmp_path / "st").rglob("*") if p.is_file())
    assert secret not in json.dumps(summary) + err + status.stdout and secret.encode() not in kept
    assert "***" in status.stdout
    db = (tmp_path / "m.db").read_bytes()
    assert secret.encode() not in db

    code, _, err = run("batch", url.replace(url.split("@")[1].split("/")[0], "127.0.0.1:1"), state=tmp_path / "st3", uri=uri, check=False)
    assert code == 8 and "cannot connect" in err and secret not in err and len(err.strip().splitlines()) == 1


def test_litellms_own_database_url_is_read_as_prisma_reads_it(litellm_db: str, tmp_path: Path) -> None:
    """LiteLLM's ``DATABASE_URL`` is a Prisma URL: LiteLLM writes ``?schema=`` into it (its tables in
    that schema, ``DATABASE_SCHEMA``) and its CLI appends ``connection_limit`` and ``pool_timeout``.
    libpq refused each (exit 8, "invalid URI query parameter"), and the table was looked for on the
    default search_path only. Pool settings do not change which rows a state has read."""
    import psycopg

    records = reidentify(read_capture(), shift_s=-3600)
    insert_rows(litellm_db, [row_from_payload(r) for r in records[:3]])
    with psycopg.connect(litellm_db, autocommit=True) as con:
        con.execute('CREATE SCHEMA "LiteLLM Proxy"')
        con.execute(f'ALTER TABLE "{TABLE}" SET SCHEMA "LiteLLM Proxy"')
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    prisma = f"{litellm_db}?schema=LiteLLM%20Proxy&connection_limit=10&pool_timeout=60"
    _, first, _ = run("batch", prisma, state=state, uri=uri)
    assert first["db_rows"] == 3 and first["traces_written"] == len(_calls(records[:3]))
    with psycopg.connect(litellm_db, autocommit=True) as con:  # insert_rows writes into public
        con.execute(f'ALTER TABLE "LiteLLM Proxy"."{TABLE}" SET SCHEMA public')
    insert_rows(litellm_db, [row_from_payload(records[3])])
    with psycopg.connect(litellm_db, autocommit=True) as con:
        con.execute(f'ALTER TABLE "{TABLE}" SET SCHEMA "LiteLLM Proxy"')
    _, second, _ = run("batch", f"{litellm_db}?schema=LiteLLM%20Proxy&pgbouncer=true", state=state, uri=uri)
    assert second["db_rows"] == 1, "the same database and schema: only the new row"
    code, _, err = run("batch", litellm_db, state=tmp_path / "st2", uri=uri, check=False)
    assert code == 8 and "no table" in err, "without the schema the table is not on the search path"


def test_a_run_killed_mid_table_resumes_and_loses_and_doubles_nothing(litellm_db: str, tmp_path: Path) -> None:
    import signal
    import sqlite3
    import time

    capture = read_capture()
    base = -86400 * 20
    # A first page of rows (marked in the ledger as one) and a quarter page more: the kill lands after the first mark
    copies = math.ceil(1.25 * DEFAULT_PAGE_ROWS / len(capture))
    records = [r for i in range(copies) for r in reidentify(capture, shift_s=base + i * 120, salt=f"k{i}")]
    insert_rows(litellm_db, [row_from_payload(r) for r in records])
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    args = [EXE, "backfill", litellm_db, "--tracking-uri", uri, "--experiment-name", EXP, "--state-dir", str(state), "--json"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def marked() -> int:
        for p in state.glob("backfill-*.ledger.sqlite"):
            try:
                with sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=1) as db:
                    return int(db.execute("SELECT count(*) FROM items").fetchone()[0])
            except sqlite3.Error:
                return 0
        return 0

    deadline = time.monotonic() + 300
    while marked() == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = marked()
    assert 0 < done < len(records), f"the kill did not land mid-table ({done} of {len(records)} rows)"
    _, s, _ = run("backfill", litellm_db, state=state, uri=uri)
    assert s["db_rows"] == len(records) - done
    got = [t.info.tags["litellm.call_id"] for t in all_traces(uri, EXP, include_spans=False)]
    assert len(got) == len(set(got)) and set(got) == _calls(records)


@pytest.mark.parametrize("command", [pytest.param("batch", marks=soak_only), "backfill"])  # one SpendLogsDB reads for both
def test_a_run_whose_proxy_database_stops_answering_mid_table_ends_with_exit_8_in_one_line(
    tmp_path: Path, command: str, own_postgres: PgCluster
) -> None:
    """The proxy's PostgreSQL frozen (SIGSTOP) once a first page of rows was read, at the run's read of
    the next (held there by a lock, then frozen): a read on an open connection had no bound (libpq's
    connect timeout only), and a cron run or backfill sat in it for ever. Now it is an unavailable
    source once silent for the URL's ``connect_timeout`` (``CONNECT_TIMEOUT_S`` without one; psycopg's
    keyword argument overrode the user's): one line, exit 8; and the next run, the database thawed
    and the URL without its ``connect_timeout``, reads what was left and writes every call once."""
    pg = own_postgres
    url = pg.new_database()
    create_spendlogs_table(url)
    capture = read_capture()
    copies = math.ceil(1.25 * DEFAULT_PAGE_ROWS / len(capture))  # a full page, then a quarter page more
    records = [r for i in range(copies) for r in reidentify(capture, shift_s=-86400 * 20 + i * 120, salt=f"f{i}")]
    insert_rows(url, [row_from_payload(r) for r in records])
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    timed = f"{url}?connect_timeout={SILENCE_S}"  # the state knows the table without it: the next run reads on
    args = [EXE, command, timed, "--tracking-uri", uri, "--experiment-name", EXP, "--state-dir", str(state), "--json"]
    code, err = pg.run_frozen_at(url, f'"{TABLE}"', args, f"the {command}", after_query="%litellm_ingest_spendlogs%", env=env)
    assert code == 8, err[-2000:]
    assert "no answer for" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    silent = int(re.search(r"no answer for (\d+)s", err).group(1))  # type: ignore[union-attr]
    assert SILENCE_S <= silent < CONNECT_TIMEOUT_S, err
    _, s, _ = run(command, url, state=state, uri=uri)
    assert 0 < s["db_rows"] < len(records)  # the first page was kept as read
    got = [t.info.tags["litellm.call_id"] for t in all_traces(uri, EXP, include_spans=False)]
    assert len(got) == len(set(got)) and set(got) == _calls(records)


def test_a_proxy_database_busy_past_the_silence_bound_is_waited_for_not_taken_for_a_frozen_one(
    tmp_path: Path, own_postgres: PgCluster
) -> None:
    """The SpendLogs table locked mid-read (a LiteLLM migration, a VACUUM FULL) for longer than
    ``CONNECT_TIMEOUT_S``: the read waits for the lock, the database answers everything else. That
    silence was taken for a frozen host, and every run over a busy database ended with exit 8. Now a
    database that answers a ``SELECT 1`` on a connection of its own is waited for: the run reads every
    row once the lock is gone (a backfill reads the database the same way: ``SpendLogsDB``)."""
    pg = own_postgres
    url = pg.new_database()
    create_spendlogs_table(url)
    capture = read_capture()
    copies = math.ceil(1.25 * DEFAULT_PAGE_ROWS / len(capture))
    records = [r for i in range(copies) for r in reidentify(capture, shift_s=-86400 * 20 + i * 120, salt=f"b{i}")]
    insert_rows(url, [row_from_payload(r) for r in records])
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    timed = f"{url}?connect_timeout={SILENCE_S}"  # the state knows the table without it: the next run reads on
    args = [EXE, "batch", timed, "--tracking-uri", uri, "--experiment-name", EXP, "--state-dir", str(state), "--json"]
    with pg.frozen_at(url, f'"{TABLE}"', stop=lambda: None, after_query="%litellm_ingest_spendlogs%") as held:
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        held(p)
        time.sleep(SILENCE_S + PING_S + 1)  # past the silence bound and a ping's wait
        assert p.poll() is None, p.communicate()[1][-2000:]
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert json.loads(out)["db_rows"] == len(records)
    got = [t.info.tags["litellm.call_id"] for t in all_traces(uri, EXP, include_spans=False)]
    assert len(got) == len(set(got)) and set(got) == _calls(records)


def test_a_read_the_database_keeps_working_on_is_given_up_after_the_slow_read_bound(
    litellm_db: str, postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that answers but never finishes the read: PostgreSQL's own ``statement_timeout``
    (``SLOW_READ_S``) ends it, in one line that says so."""
    import psycopg

    from ingest import spendlogs_db

    insert_rows(litellm_db, [row_from_payload(r) for r in reidentify(read_capture()[:3], shift_s=-3600, salt="slow")])
    monkeypatch.setattr(spendlogs_db, "SLOW_READ_S", 2)
    with psycopg.connect(litellm_db) as holder:
        holder.execute(f'LOCK TABLE "{TABLE}" IN ACCESS EXCLUSIVE MODE')
        db = spendlogs_db.SpendLogsDB(litellm_db)
        started = time.monotonic()
        with pytest.raises(SourceUnavailable, match="statement timeout"):
            db.check()
        assert time.monotonic() - started < CONNECT_TIMEOUT_S
        db.close()


def _insert_one(url: str, request_id: str, start: str, column_type: str = "timestamp", response: str | None = None) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        c.execute(
            'INSERT INTO "LiteLLM_SpendLogs" (request_id, call_type, "startTime", "endTime", litellm_call_id, status, prompt_tokens, '
            f"completion_tokens, total_tokens, spend, response) VALUES (%s, 'acompletion', %s::{column_type}, %s::{column_type}, %s, "
            "'success', 10, 20, 30, 0.01, %s)",
            [request_id, start, start, f"c-{request_id}", response],
        )


@pytest.mark.parametrize("odd", ["2099-01-01 00:00:00", "infinity", "two hours ahead"])
def test_a_row_from_a_wrong_clock_neither_hides_the_rows_after_it_nor_stops_the_cron_job(litellm_db: str, tmp_path: Path, odd: str) -> None:
    """The newest start a run read is where the next one reads from: a replica's clock in 2099 put it
    there, and every row inserted later was never read (exit 0); ``'infinity'`` made every later run
    fail; a clock two hours ahead hid the next hour of every other replica's rows. Where the next
    run reads from moves no further than this machine's clock."""
    import psycopg

    with psycopg.connect(litellm_db) as c:
        now = c.execute("SELECT (now() at time zone 'utc')::timestamp(0)").fetchone()[0]
    if odd == "two hours ahead":
        odd = str(now + timedelta(hours=2))
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    _insert_one(litellm_db, "a", str(now))
    run("batch", litellm_db, state=state, uri=uri)
    _insert_one(litellm_db, "skewed", odd)
    first, _, _ = run("batch", litellm_db, state=state, uri=uri, check=False)
    assert first in (0, 3)
    _insert_one(litellm_db, "b", str(now))
    later, s, _ = run("batch", litellm_db, state=state, uri=uri, check=False)
    assert later == 0 and s["quarantined"] == 0, "nothing quarantined twice"
    got = {t.info.tags["litellm.call_id"] for t in all_traces(uri, EXP, include_spans=False)}
    assert got == {"c-a", "c-b"} | ({"c-skewed"} if odd != "infinity" else set())


def test_a_timestamptz_table_is_read_by_every_cron_run(postgres: Postgres, tmp_path: Path) -> None:
    """A SpendLogs table whose times are ``timestamp with time zone``: the second run failed on the
    kept newest start, which then had an offset (exit 1, every run after the first)."""
    import psycopg

    url = postgres.new_database()
    create_spendlogs_table(url)
    with psycopg.connect(url, autocommit=True) as c:
        for col in ("startTime", "endTime"):
            c.execute(f'ALTER TABLE "LiteLLM_SpendLogs" ALTER COLUMN "{col}" TYPE timestamptz USING "{col}" AT TIME ZONE \'UTC\'')
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    _insert_one(url, "tz-a", "2026-11-01 10:00:00+00", "timestamptz")
    run("batch", url, state=state, uri=uri)
    _insert_one(url, "tz-b", "2026-11-01 11:00:00+00", "timestamptz")
    run("batch", url, state=state, uri=uri)
    _, s, _ = run("batch", url, state=state, uri=uri)
    assert s["db_rows"] == 0
    assert {t.info.tags["litellm.call_id"] for t in all_traces(uri, EXP, include_spans=False)} == {"c-tz-a", "c-tz-b"}


def test_a_row_too_big_to_read_is_quarantined_once(litellm_db: str, tmp_path: Path) -> None:
    """Rows quarantined before they reach a line (too big, not UTF-8) were never marked read, so every
    run within the re-read window quarantined them again (exit 3 each time)."""
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    _insert_one(litellm_db, "big", "2026-11-01 10:00:00", response=json.dumps({"text": "x" * (17 << 20)}))
    _insert_one(litellm_db, "small", "2026-11-01 10:00:01")
    code, s, _ = run("batch", litellm_db, state=state, uri=uri, check=False)
    assert code == 3 and s["quarantined_by_reason"] == {"line_too_long": 1}
    again, s2, _ = run("batch", litellm_db, state=state, uri=uri, check=False)
    assert again == 0 and s2["quarantined"] == 0
    assert len((state / "quarantine.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize(("window", "read"), [(None, False), ("14400", True)], ids=["default hour", "four hours"])
def test_a_row_inserted_later_than_the_reread_window_is_read_when_the_window_is_widened(
    litellm_db: str, tmp_path: Path, window: str | None, read: bool
) -> None:
    """A proxy whose database was away for hours inserts its queued rows late, behind rows a cron
    run read already: ``--reread-window`` reaches back as far as that; rows read once stay read once."""
    records = reidentify(read_capture(), shift_s=-86400 * 3)
    first, late = records[:30], dict(records[30])
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    widen = ["--reread-window", window] if window else []
    insert_rows(litellm_db, [row_from_payload(r) for r in first])
    run("batch", litellm_db, *widen, state=tmp_path / "st", uri=uri)
    newest = max(r["startTime"] for r in first)
    late["startTime"], late["endTime"] = newest - 3 * 3600, newest - 3 * 3600 + 10
    insert_rows(litellm_db, [row_from_payload(late)])
    _, s2, _ = run("batch", litellm_db, *widen, state=tmp_path / "st", uri=uri)
    assert s2["db_rows"] == (1 if read else 0)
    got = {t.info.tags["litellm.call_id"] for t in all_traces(uri, EXP, include_spans=False)}
    assert (late["litellm_call_id"] in got) is read
    _, s3, _ = run("batch", litellm_db, *widen, state=tmp_path / "st", uri=uri)
    assert s3["db_rows"] == 0 and s3["traces_written"] == 0


def _retried(records: list[dict]) -> tuple[dict, dict]:
    """The first call of ``records`` whose first attempt failed and whose retry succeeded."""
    fail = next(r for r in records if r["status"] == "failure" and sum(x["litellm_call_id"] == r["litellm_call_id"] for x in records) == 2)
    return fail, next(r for r in records if r["litellm_call_id"] == fail["litellm_call_id"] and r is not fail)


def _iso(epoch_s: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(epoch_s, UTC).isoformat()


def test_a_retry_across_since_or_until_is_one_call_in_the_window_of_its_first_attempt(litellm_db: str, tmp_path: Path) -> None:
    """The window was applied to rows in SQL: with the cut between a failure and its retry, ``--until``
    wrote the failure alone (ERROR), ``--since`` the retry alone (joined to it, counted in both), and
    reconcile agreed with both. Rows are read with a day of slack either side, and the pipeline
    selects the calls, as for files."""
    records = reidentify(read_capture(), shift_s=-86400 * 4)
    insert_rows(litellm_db, [row_from_payload(r) for r in records])
    fail, retry = _retried(records)
    assert fail["startTime"] + 0.5 < retry["startTime"]
    cut = _iso(fail["startTime"] + 0.5)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    _, before, _ = run("backfill", litellm_db, "--until", cut, "--workers", "1", state=tmp_path / "st", uri=uri)
    (trace,) = [t for t in all_traces(uri, EXP) if t.info.tags["litellm.call_id"] == fail["litellm_call_id"]]
    assert (trace.info.state.value, trace.info.tags.get("litellm.attempts"), len(trace.data.spans)) == ("OK", "2", 3)
    _, after, _ = run("backfill", litellm_db, "--since", cut, "--workers", "1", state=tmp_path / "st", uri=uri)
    calls = _calls(records)
    assert before["calls"] + after["calls"] == len(calls) and after["calls_joined"] == 0
    assert (before["calls_outside_range"], after["calls_outside_range"]) == (after["calls"], before["calls"])
    assert len(all_traces(uri, EXP, include_spans=False)) == len(calls)
    assert before["db_rows"] == after["db_rows"] == len(records)


def test_a_call_started_before_since_stays_out_when_its_retry_is_inserted_after_a_run_read_its_failure(
    litellm_db: str, tmp_path: Path
) -> None:
    """Rows read only as a window's slack are not marked read: the window's next run reads the
    failure again beside its retry (inserted since, after a long Retry-After), and the call stays
    out of the window; marked, the retry alone was written as a call of it."""
    records = reidentify(read_capture(), shift_s=-86400 * 5)
    fail, retry = _retried(records)
    retry["startTime"], retry["endTime"] = retry["startTime"] + 300, retry["endTime"] + 300
    later = reidentify(read_capture(), shift_s=-86400 * 5 + 200)  # the input moves past --settle: the failure is final
    since = ["--since", _iso(fail["startTime"] + 0.5), "--workers", "1"]
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    insert_rows(litellm_db, [row_from_payload(r) for r in records + later if r is not retry])
    _, first, _ = run("backfill", litellm_db, *since, state=tmp_path / "st", uri=uri)
    assert first["calls_outside_range"] > 0
    insert_rows(litellm_db, [row_from_payload(retry)])
    _, second, _ = run("backfill", litellm_db, *since, state=tmp_path / "st", uri=uri)
    assert second["traces_written"] == 0
    assert fail["litellm_call_id"] not in {t.info.tags["litellm.call_id"] for t in all_traces(uri, EXP, include_spans=False)}
