"""Resumable ingestion as a user runs it: real `litellm-ingest` processes killed (SIGKILL) and
interrupted (SIGINT) mid-run, then run again; `backfill --since/--until` boundaries; backfill and
batch keeping separate state; progress output off a terminal.

Every expected value (call ids, span counts, calls in/out of a window) is computed here from the
input records with plain Python, never taken from the ingester's own output.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.conftest import all_traces, copies, reidentify, run_cli, spans_ingested, sqlite_trace_count, write_jsonl, write_log

EXE = str(Path(sys.executable).parent / "litellm-ingest")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SETTLE_S = 120  # README: a call whose latest attempt failed is held until the input moved 120 s past it


# --- running the CLI -------------------------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k not in ("COLUMNS", "LINES")}
    env.update(extra or {})
    return env


def run(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_cli(list(args), cwd, _env(), timeout)


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([EXE, *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def no_traceback(proc: subprocess.CompletedProcess | tuple[str, str]) -> None:
    out, err = (proc.stdout, proc.stderr) if isinstance(proc, subprocess.CompletedProcess) else proc
    assert "Traceback" not in out and "Traceback" not in err, err[-3000:]


# --- building input --------------------------------------------------------------------------------


def us(t: float) -> int:
    return round(t * 1_000_000)


def big_input(logs: Path, capture: list[dict], tag: str) -> tuple[list[Path], list[list[dict]]]:
    """15 copies of the capture (675 calls, 735 records) in three files of 5 copies; the first one gzip."""
    cs = copies(capture, 15, tag)
    groups = [cs[0:5], cs[5:10], cs[10:15]]
    names = ["proxy.jsonl.2.gz", "proxy.jsonl.1", "proxy.jsonl"]
    files, per_file = [], []
    for name, group in zip(names, groups, strict=True):
        recs = [r for c in group for r in c]
        files.append(write_log(logs / name, recs))
        per_file.append(recs)
    return files, per_file


def calls_of(records: list[dict]) -> dict[str, list[dict]]:
    calls: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        calls[r["litellm_call_id"]].append(r)
    return calls


def attempts(recs: list[dict]) -> int:
    """Distinct attempts of one call: (start to the millisecond, status)."""
    return len({(round(r["startTime"] * 1000), r["status"]) for r in recs})


def expected_spans(records: list[dict]) -> dict[str, int]:
    """Per call id: one span for a single-attempt call, a root plus one per attempt otherwise."""
    out = {}
    for cid, recs in calls_of(records).items():
        n = attempts(recs)
        out[cid] = 1 if n == 1 else 1 + n
    return out


def held_at_end(records: list[dict]) -> set[str]:
    """Calls of a file whose last-ending attempt failed within the settle window of the newest end read."""
    watermark = max(r["endTime"] for r in records)
    held = set()
    for cid, recs in calls_of(records).items():
        last = max(recs, key=lambda r: (r["endTime"], r["startTime"]))
        if last["status"] != "success" and last["endTime"] > watermark - SETTLE_S:
            held.add(cid)
    return held


# --- reading MLflow --------------------------------------------------------------------------------


def trace_infos(uri: str, experiment_name: str) -> list:
    return all_traces(uri, experiment_name, include_spans=False, missing_ok=True)


def call_ids(infos: list) -> list[str]:
    return [t.info.tags.get("litellm.call_id") for t in infos]


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout)


# --- 1. SIGKILL at several points ------------------------------------------------------------------


def test_batch_killed_with_sigkill_at_several_points_then_completed_has_every_call_once(tmp_path: Path, capture: list[dict]) -> None:
    files, per_file = big_input(tmp_path / "logs", capture, "kill")
    records = [r for recs in per_file for r in recs]
    want_spans = expected_spans(records)
    assert len(want_spans) == 675 and sum(want_spans.values()) > len(want_spans)
    db = tmp_path / "store.db"
    args = ["batch", *map(str, files), "--tracking-uri", f"sqlite:///{db}", "--experiment-name", "killed"]
    # Small transactions: the last kill point (the third file's first commit) leaves most of that file unwritten.
    args += ["--state-dir", str(tmp_path / "state"), "--batch-size", "25", "-q"]
    n0, n1 = len(calls_of(per_file[0])), len(calls_of(per_file[1]))

    # Kill points by what has been committed, so they fall mid-run on any machine: during start-up; after
    # the first writes of the first file (no checkpoint yet: it is all re-sent); 0.15 s after the next run's
    # first new commit (in the middle of building or writing a batch); mid second file; mid third file.
    kill_points: list[tuple[str, str, float]] = [
        ("start-up", "seconds", 1.0),
        ("first file, first batch committed", "traces", 100),
        ("0.15 s after this run's first new commit", "after-growth", 0.15),
        ("second file", "traces", n0 + 100),
        ("third file", "traces", n0 + n1 + 1),
    ]
    killed_at = []
    for what, kind, value in kill_points:
        n_start = sqlite_trace_count(db)
        t0 = time.monotonic()
        grew_at: float | None = None
        p = start(*args, cwd=tmp_path)
        while p.poll() is None:
            n, now = sqlite_trace_count(db), time.monotonic()
            if grew_at is None and n > n_start:
                grew_at = now
            if (
                (kind == "seconds" and now - t0 >= value)
                or (kind == "traces" and n >= value)
                or (kind == "after-growth" and grew_at is not None and now - grew_at >= value)
            ):
                break
            time.sleep(0.05)
        assert p.poll() is None, f"run finished before the kill point {what!r}: {p.communicate()}"
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=30)
        assert p.returncode == -signal.SIGKILL
        killed_at.append((what, round(time.monotonic() - t0, 1), sqlite_trace_count(db)))
    assert killed_at[-1][2] < len(want_spans), "the last kill came too late to leave work for the final run"

    print("killed at (what, seconds into the run, traces committed):", killed_at)
    final = run(*args, cwd=tmp_path)
    assert final.returncode == 0, (killed_at, final.stderr[-3000:])
    no_traceback(final)

    traces = all_traces(f"sqlite:///{db}", "killed")
    ids = call_ids(traces)
    assert len(ids) == len(set(ids)), "a call has two traces"
    assert set(ids) == set(want_spans), (killed_at, len(set(want_spans) - set(ids)), len(set(ids) - set(want_spans)))
    got_spans = {t.info.tags["litellm.call_id"]: len(t.data.spans) for t in traces}
    wrong = {cid: (got_spans[cid], n) for cid, n in want_spans.items() if got_spans[cid] != n}
    assert not wrong, (killed_at, list(wrong.items())[:10])
    assert sum(got_spans.values()) == sum(want_spans.values())


# --- 2. backfill interrupted by SIGINT resumes -----------------------------------------------------


def test_backfill_interrupted_by_sigint_resumes_where_it_stopped(
    tmp_path: Path, capture: list[dict], mlflow_server, experiment_name: str
) -> None:
    files, per_file = big_input(tmp_path / "logs", capture, "sigint")
    records = [r for recs in per_file for r in recs]
    want = expected_spans(records)
    total_spans = sum(want.values())
    # Small batches: an interrupt then falls between acknowledged writes of one chunk, not only between files.
    args = ["backfill", *map(str, files), "--tracking-uri", mlflow_server.url, "--experiment-name", experiment_name]
    args += ["--state-dir", str(tmp_path / "state"), "--batch-size", "50"]
    # Signal once the first file's calls are all in MLflow (but those held for a retry at its end): the
    # checkpoint of a file moves when its chunk is done, so there is saved progress to resume from.
    first_file_written = len(calls_of(per_file[0])) - len(held_at_end(per_file[0]))
    spans_before = spans_ingested(mlflow_server)

    p = start(*args, cwd=tmp_path)
    seen = 0
    while p.poll() is None and seen < first_file_written:
        seen = len(trace_infos(mlflow_server.url, experiment_name))
        time.sleep(0.05)
    assert p.poll() is None, f"backfill finished before it could be interrupted: {p.communicate()}"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, out, err[-3000:])
    no_traceback((out, err))
    assert "progress is saved" in err, err
    written_before_resume = len(trace_infos(mlflow_server.url, experiment_name))
    assert 0 < written_before_resume < len(want)

    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    no_traceback(again)
    assert re.search(r"\bresumed\b", again.stderr), again.stderr
    m = re.search(r"^records read\s+(\d+)\s*$", again.stdout, re.M)
    assert m, again.stdout
    assert int(m.group(1)) < len(records), "the second run started over"

    sent = spans_ingested(mlflow_server) - spans_before
    assert sent < 2 * total_spans, f"{sent} spans sent for {total_spans}: the second run started over"
    ids = call_ids(trace_infos(mlflow_server.url, experiment_name))
    assert len(ids) == len(set(ids))
    missing = set(want) - set(ids)
    assert not missing, f"{len(missing)} call(s) never written after the resume: {sorted(missing)[:10]}"
    assert set(ids) == set(want)
    assert sent >= total_spans


# --- 3. --since / --until boundaries ---------------------------------------------------------------


def retime(rec: dict, start_us: int, duration_us: int = 200_000) -> dict:
    """A copy of a record starting exactly at `start_us` (all its times moved together)."""
    r = copy.deepcopy(rec)
    old_start = us(r["startTime"])
    r["startTime"] = start_us / 1e6
    r["endTime"] = (start_us + duration_us) / 1e6
    if r.get("completionStartTime") is not None:
        r["completionStartTime"] = (start_us + min(us(rec["completionStartTime"]) - old_start, duration_us)) / 1e6
    return r


def iso(t_us: int, tz: timezone = UTC) -> str:
    return (EPOCH + timedelta(microseconds=t_us)).astimezone(tz).isoformat()


@pytest.fixture
def window_input(tmp_path: Path, capture: list[dict]) -> dict:
    """Calls with known start times around a boundary T (with microseconds), before/after sets computed here."""
    t_s = int(time.time() - 20 * 86400)
    t_us = t_s * 1_000_000 + 789_012
    first_start = min(r["startTime"] for r in capture)
    last_end = max(r["endTime"] for r in capture)
    before = reidentify(capture, (t_us / 1e6 - 600) - last_end, "win-before")  # all of it ends 10 min before T
    after = reidentify(capture, (t_us / 1e6 + 600) - first_start, "win-after")  # all of it starts 10 min after T
    single = next(r for r in capture if r["status"] == "success" and len(calls_of(capture)[r["litellm_call_id"]]) == 1)
    pair = next(recs for recs in calls_of(capture).values() if len(recs) == 2 and recs[0]["status"] != recs[1]["status"])
    pair = sorted(pair, key=lambda r: r["startTime"])
    at_t = retime(reidentify([single], 0, "win-at")[0], t_us)
    just_before = retime(reidentify([single], 0, "win-minus-1us")[0], t_us - 1)
    just_after = retime(reidentify([single], 0, "win-plus-1us")[0], t_us + 1)
    fail, ok = reidentify(pair, 0, "win-straddle")
    straddle = [retime(fail, t_us - 3_000_000), retime(ok, t_us + 500_000)]  # first attempt before T, retry after
    records = [*before, just_before, straddle[0], at_t, just_after, straddle[1], *after]
    path = write_jsonl(tmp_path / "logs" / "window.jsonl", records)
    starts = {cid: min(us(r["startTime"]) for r in recs) for cid, recs in calls_of(records).items()}
    return {
        "path": path,
        "t_us": t_us,
        "records": records,
        "spans": expected_spans(records),
        "before": {c for c, s in starts.items() if s < t_us},
        "after": {c for c, s in starts.items() if s >= t_us},
        "at": at_t["litellm_call_id"],
        "just_before": just_before["litellm_call_id"],
        "straddle": ok["litellm_call_id"],
    }


def test_backfill_until_then_since_splits_at_the_boundary_half_open(tmp_path: Path, mlflow_server, experiment_name, window_input) -> None:
    w = window_input
    before, after, spans = w["before"], w["after"], w["spans"]
    assert w["at"] in after and w["just_before"] in before and w["straddle"] in before
    assert len(before) == len(after) == 47 and spans[w["straddle"]] == 3
    common = [str(w["path"]), "--tracking-uri", mlflow_server.url, "--experiment-name", experiment_name, "--json"]
    common += ["--state-dir", str(tmp_path / "state")]
    t_z = iso(w["t_us"]).replace("+00:00", "Z")
    t_plus2 = iso(w["t_us"], timezone(timedelta(hours=2)))
    assert t_plus2.endswith("+02:00") and ".789012" in t_plus2

    spans_before = spans_ingested(mlflow_server)
    until = run("backfill", *common, "--until", t_z, cwd=tmp_path)
    assert until.returncode == 0, until.stderr[-3000:]
    u = summary_of(until)
    assert set(call_ids(trace_infos(mlflow_server.url, experiment_name))) == before, "--until T keeps exactly the calls started before T"
    assert (u["calls"], u["traces_written"], u["calls_outside_range"]) == (len(before), len(before), len(after))
    assert u["spans_written"] == sum(spans[c] for c in before)

    since = run("backfill", *common, "--since", t_plus2, cwd=tmp_path)
    assert since.returncode == 0, since.stderr[-3000:]
    s = summary_of(since)
    assert (s["calls"], s["traces_written"], s["calls_outside_range"]) == (len(after), len(after), len(before))
    assert s["spans_written"] == sum(spans[c] for c in after)

    infos = trace_infos(mlflow_server.url, experiment_name)
    ids = call_ids(infos)
    assert len(ids) == len(set(ids)) and set(ids) == before | after
    assert spans_ingested(mlflow_server) - spans_before == sum(spans.values()), "some call was written by both runs"
    at_trace = next(t for t in infos if t.info.tags["litellm.call_id"] == w["at"])
    assert at_trace.info.timestamp_ms == w["t_us"] // 1000


def test_iso_times_with_offsets_name_the_same_instant(tmp_path: Path, window_input) -> None:
    """[T written with +02:00, T + 1 us written with -05:30) holds exactly the call that starts at T."""
    w = window_input
    since = iso(w["t_us"], timezone(timedelta(hours=2)))
    until = iso(w["t_us"] + 1, timezone(-timedelta(hours=5, minutes=30)))
    assert since.endswith("+02:00") and until.endswith("-05:30")
    proc = run("backfill", str(w["path"]), "--dry-run", "--json", "--since", since, "--until", until, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(proc)
    assert (s["calls"], s["calls_outside_range"]) == (1, len(w["before"]) + len(w["after"]) - 1), (since, until, s)
    assert s["first_start"] is not None and s["first_start"].startswith(iso(w["t_us"])[:26]), s["first_start"]


@pytest.mark.parametrize("bound", [("--until", "9999-12-31T23:59:59"), ("--since", "0001-01-01"), ("--until", "0001-01-02")])
def test_a_window_at_the_ends_of_the_calendar_is_a_window(tmp_path: Path, window_input, bound: tuple[str, str]) -> None:
    """The bucket partitions a window may hold are its days with one day of slack: past 9999-12-31 or
    before 0001-01-01 that overflowed after every file was read, so the held calls were never
    written, every run, and ``reconcile`` failed the same way."""
    w = window_input
    calls = len(w["before"]) + len(w["after"])
    store = ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--experiment-name", "ends"]
    proc = run("backfill", str(w["path"]), *store, "--state-dir", str(tmp_path / "st"), "--json", "--workers", "1", *bound, cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    inside = 0 if bound[1] == "0001-01-02" else calls
    assert (summary_of(proc)["traces_written"], sqlite_trace_count(tmp_path / "m.db")) == (inside, inside)
    check = run("reconcile", str(w["path"]), *store, *bound, cwd=tmp_path)
    no_traceback(check)
    assert check.returncode == 0, check.stderr[-3000:]


def test_a_call_outside_the_window_is_never_deleted_by_the_backfill(tmp_path: Path, capture: list[dict]) -> None:
    """``--until`` T: the backfill read a failed attempt of a call that started after T (the cron
    job's, written whole), then its success in the next run. Remembered as written failed though it
    was outside the window, the call was deleted before its rewrite (``--sql-writer mlflow``) and
    the rewrite, outside the window, never came: the cron job's trace was gone."""
    import sqlite3

    records = [r for c in copies(capture, 1, "window-delete") for r in c]
    by_call = calls_of(records)
    fail, ok = next(rs for rs in by_call.values() if len(rs) == 2 and rs[0]["status"] != "success" and rs[1]["status"] == "success")
    write_log(tmp_path / "live" / "proxy.jsonl", [fail, ok])
    write_log(tmp_path / "archive" / "a.jsonl", [fail])
    store = ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--sql-writer", "mlflow", "--json"]
    assert run("batch", str(tmp_path / "live"), *store, "--state-dir", str(tmp_path / "cron"), cwd=tmp_path).returncode == 0
    until = ["--until", iso(us(fail["startTime"]) - 60_000_000), "--state-dir", str(tmp_path / "bf"), "--workers", "1"]
    assert run("backfill", str(tmp_path / "archive"), *store, *until, cwd=tmp_path).returncode == 0
    write_log(tmp_path / "archive" / "b.jsonl", [ok])
    later = run("backfill", str(tmp_path / "archive"), *store, *until, cwd=tmp_path)
    assert later.returncode == 0, later.stderr[-3000:]
    assert summary_of(later)["calls_outside_range"] == 0  # counted out once, by the run that left its call out
    with sqlite3.connect(tmp_path / "m.db") as con:
        assert con.execute("SELECT status FROM trace_info").fetchall() == [("OK",)]
        assert con.execute("SELECT count(*) FROM spans").fetchone() == (3,)


def test_a_call_left_out_before_since_stays_out_when_its_retry_comes_in_the_next_run(tmp_path: Path, capture: list[dict]) -> None:
    """``--since`` between a failure and its retry, the retry read by the next run over the same
    window: the run that left the failure out remembered it only in memory, so the retry alone (it
    starts inside the window) was written as the call. The calls left out are kept in the state."""
    records = [r for c in copies(capture, 1, "since-resume") for r in c]
    retried = (rs for rs in calls_of(records).values() if len(rs) == 2 and rs[0]["status"] != "success" and rs[1]["status"] == "success")
    fail, ok = next(retried)
    since = ["--since", iso((us(fail["startTime"]) + us(ok["startTime"])) // 2)]
    args = ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--state-dir", str(tmp_path / "st"), "--json", "--workers", "1", *since]
    write_log(tmp_path / "archive" / "a.jsonl", [fail])
    first = run("backfill", str(tmp_path / "archive"), *args, cwd=tmp_path)
    assert first.returncode == 0 and summary_of(first)["calls_outside_range"] == 1, first.stderr[-3000:]
    write_log(tmp_path / "archive" / "b.jsonl", [ok])
    later = run("backfill", str(tmp_path / "archive"), *args, cwd=tmp_path)
    assert later.returncode == 0, later.stderr[-3000:]
    assert (summary_of(later)["traces_written"], summary_of(later)["calls_outside_range"]) == (0, 0)
    assert sqlite_trace_count(tmp_path / "m.db") == 0


# --- 4. backfill and batch keep separate state -----------------------------------------------------


def test_batch_after_backfill_reads_everything_and_changes_nothing(tmp_path: Path, capture: list[dict]) -> None:
    cs = copies(capture, 2, "indep")
    files = [write_log(tmp_path / "logs" / "old.jsonl.1.gz", cs[0]), write_log(tmp_path / "logs" / "old.jsonl", cs[1])]
    records = cs[0] + cs[1]
    want = expected_spans(records)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    common = [*map(str, files), "--tracking-uri", uri, "--experiment-name", "both", "--state-dir", str(tmp_path / "state"), "--json"]

    bf = run("backfill", *common, cwd=tmp_path)
    assert bf.returncode == 0, bf.stderr[-3000:]
    assert summary_of(bf)["records_read"] == len(records)

    def snapshot() -> dict[str, tuple]:
        return {
            t.info.tags["litellm.call_id"]: (t.info.trace_id, len(t.data.spans), json.dumps(t.info.token_usage), str(t.info.state))
            for t in all_traces(uri, "both")
        }

    after_backfill = snapshot()
    assert set(after_backfill) == set(want)
    assert {c: v[1] for c, v in after_backfill.items()} == want

    b = run("batch", *common, cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    s = summary_of(b)
    assert s["records_read"] == len(records), "batch must not start from the backfill's position"
    assert s["calls"] == len(want) and s["files_resumed"] == 0
    assert snapshot() == after_backfill, "re-sending the same calls changed MLflow"

    # ...and the batch run did not move the backfill's own position: it has nothing left to read.
    bf2 = run("backfill", *common, cwd=tmp_path)
    assert bf2.returncode == 0, bf2.stderr[-3000:]
    assert summary_of(bf2)["records_read"] == 0


# --- 5. progress off a terminal --------------------------------------------------------------------


def test_backfill_progress_without_a_terminal_is_plain_text(tmp_path: Path, capture: list[dict]) -> None:
    recs = copies(capture, 1, "notty")[0]
    path = write_log(tmp_path / "logs" / "p.jsonl", recs)
    proc = run("backfill", str(path), "--dry-run", "--state-dir", str(tmp_path / "st"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_traceback(proc)
    for stream in (proc.stderr, proc.stdout):
        assert "\x1b[" not in stream and "\r" not in stream, repr(stream[:500])
    assert any(line.startswith("backfill: ") for line in proc.stderr.splitlines()), proc.stderr
    assert re.search(rf"^records read\s+{len(recs)}\s*$", proc.stdout, re.M), proc.stdout


# --- 5. a call across a rotation ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "backfill"])
def test_a_call_whose_attempts_straddle_rotated_files_is_one_whole_trace(tmp_path: Path, capture: list[dict], mode: str) -> None:
    """The proxy rotated between a call's failed attempt and its fallback, twice: the attempts sit at
    the end of one file and the start of the next. Names sort newest first (``proxy.jsonl`` before
    ``proxy.jsonl.1``), so files are read by age: read in name order, each fallback was written
    first and its failed attempt, read later, replaced its span (one span instead of three)."""
    pair = next(recs for recs in calls_of(capture).values() if len(recs) == 2 and recs[0]["status"] != recs[1]["status"])
    fail, ok = sorted(pair, key=lambda r: r["startTime"])
    cs = copies(capture, 3, "straddle")
    straddles = [reidentify([fail, ok], cs[i][-1]["endTime"] + 5 - fail["startTime"], f"across-rotation-{i}") for i in range(2)]
    files = {
        "proxy.jsonl.2.gz": [*cs[0], straddles[0][0]],
        "proxy.jsonl.1": [straddles[0][1], *cs[1], straddles[1][0]],
        "proxy.jsonl": [straddles[1][1], *cs[2]],
    }
    for age, (name, recs) in enumerate(files.items()):
        os.utime(write_log(tmp_path / "logs" / name, recs), (time.time() - 300 + age * 60,) * 2)
    db = tmp_path / "store.db"
    target = ["--tracking-uri", f"sqlite:///{db}", "--state-dir", str(tmp_path / "st"), "--json"]
    proc = run(mode, str(tmp_path / "logs"), *target, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_traceback(proc)
    import sqlite3

    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT t.value, count(s.span_id), i.status FROM trace_tags t JOIN trace_info i ON i.request_id = t.request_id "
        "JOIN spans s ON s.trace_id = t.request_id WHERE t.key = 'litellm.call_id' GROUP BY t.value, i.status"
    ).fetchall()
    got = {cid: (spans, status) for cid, spans, status in rows}
    records = [r for recs in files.values() for r in recs]
    assert {cid: spans for cid, (spans, _) in got.items()} == expected_spans(records)
    for s in straddles:
        assert got[s[0]["litellm_call_id"]] == (3, "OK"), "the failed attempt, the fallback and their root, one trace"


# --- 5. a synced bucket: thousands of small files --------------------------------------------------


def test_a_directory_of_per_call_files_is_read_in_groups_killed_and_resumed_once_each(tmp_path: Path, capture: list[dict]) -> None:
    """``aws s3 sync`` of a per-call logger's bucket: one small file per record, a call's retry or
    fallback in another file than its first attempt, a gzip one, one without a final newline, one
    with a bad line. Small files are read as one step per group; a SIGKILL mid-run and a re-run
    end with every call once, each attempt a span, and the bad line quarantined by file and line."""
    records = [r for c in copies(capture, 8, "perfile") for r in c]
    logs = tmp_path / "bucket"
    for i, r in enumerate(records):
        name = f"{int(r['startTime'])}-{i:05d}.json" + (".gz" if i == 7 else "")
        path = logs / f"day={i % 3}" / name
        if i == 11:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(r))
        else:
            write_log(path, [r])
    bad = logs / "day=0" / "0-bad.json"
    extra = next(r for r in copies(capture, 1, "perfile-bad")[0] if r["status"] == "success")
    bad.write_text(json.dumps(extra) + "\n{not json\n")
    want_spans = expected_spans([*records, extra])
    db, state = tmp_path / "store.db", tmp_path / "state"
    args = ["backfill", str(logs), "--tracking-uri", f"sqlite:///{db}", "--experiment-name", "perfile", "--state-dir", str(state)]
    args += ["--workers", "1", "--batch-size", "20", "--json"]

    p = start(*args, cwd=tmp_path)
    while p.poll() is None and sqlite_trace_count(db) < 40:
        time.sleep(0.02)
    assert p.poll() is None, f"finished before the kill: {p.communicate()}"
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    assert 0 < sqlite_trace_count(db) < len(want_spans), "killed mid-run"

    final = run(*args, cwd=tmp_path)
    no_traceback(final)
    assert final.returncode == 3, final.stderr[-3000:]
    summary = summary_of(final)
    assert summary["files"] == len(records) + 1 and summary["files_skipped"] == 0
    traces = all_traces(f"sqlite:///{db}", "perfile")
    got = {t.info.tags["litellm.call_id"]: len(t.data.spans) for t in traces}
    assert len(got) == len(traces), "a call has two traces"
    assert got == want_spans
    assert any(n > 1 for n in got.values()), "some calls had attempts in two files"
    (q,) = [json.loads(line) for line in (state / "quarantine.jsonl").read_text().splitlines()]
    assert (q["source"], q["line"], q["reason"]) == (str(bad), 2, "malformed_json")

    again = summary_of(run(*args, cwd=tmp_path))
    assert (again["records_read"], again["traces_written"], again["files_unchanged"]) == (0, 0, len(records) + 1), "none opened"


def test_a_bucket_of_more_files_than_the_state_document_keeps_is_resumed_and_skipped_through_its_database(
    tmp_path: Path, capture: list[dict]
) -> None:
    """Past ``SETTLE_ABOVE`` files the checkpoints are settled into the SQLite file beside the state
    (each step writes only what it moved). A SIGKILL after that began and a re-run end with every
    call once, each attempt a span; a third run opens no file; the document keeps only the last
    moves; ``status`` lists every file."""
    import sqlite3

    from ingest.checkpoints import FILES_DB_SUFFIX, SETTLE_ABOVE

    records = [r for c in copies(capture, SETTLE_ABOVE // len(capture) + 12, "settle") for r in c]
    logs = tmp_path / "bucket"
    for i, r in enumerate(records):
        write_log(logs / f"day={i % 7}" / f"{int(r['startTime'])}-{i:05d}.json", [r])
    db, state = tmp_path / "store.db", tmp_path / "state"
    args = ["backfill", str(logs), "--tracking-uri", f"sqlite:///{db}", "--state-dir", str(state), "--workers", "1", "--json"]

    p = start(*args, cwd=tmp_path)
    while p.poll() is None and not list(state.glob(f"*{FILES_DB_SUFFIX}")):
        time.sleep(0.02)
    assert p.poll() is None, f"finished before the kill: {p.communicate()}"
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    want = expected_spans(records)
    assert 0 < sqlite_trace_count(db) < len(want), "killed mid-run"

    final = run(*args, cwd=tmp_path)
    no_traceback(final)
    assert final.returncode == 0, final.stderr[-3000:]
    with sqlite3.connect(db) as con:
        got = con.execute(
            "SELECT t.value, count(DISTINCT t.request_id), count(s.span_id) FROM trace_tags t "
            "JOIN spans s ON s.trace_id = t.request_id WHERE t.key = 'litellm.call_id' GROUP BY t.value"
        ).fetchall()
    assert {cid: traces for cid, traces, _ in got} == dict.fromkeys(want, 1), "a call lost or doubled"
    assert {cid: spans for cid, _, spans in got} == want

    again = summary_of(run(*args, cwd=tmp_path))
    assert (again["records_read"], again["traces_written"], again["files_unchanged"]) == (0, 0, len(records)), "none opened"
    (doc_path,) = state.glob("backfill-*.json")
    doc = json.loads(doc_path.read_text())
    assert doc["files_db"]["files"] == len(records) and len(doc["checkpoints"]) <= 256, "the document keeps only the last moves"
    status = subprocess.run([EXE, "status", "--state-dir", str(state), "--json"], env=_env(), capture_output=True, text=True, timeout=120)
    assert sorted(f["path"] for f in json.loads(status.stdout)["files"]) == sorted(str(p.resolve()) for p in logs.rglob("*.json"))
