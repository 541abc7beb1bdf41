"""Buckets through the command, against real servers on localhost (moto's S3 server, fake-gcs-server),
objects written exactly as LiteLLM's s3_v2 and gcs_bucket loggers write them: cron runs that read only
new objects, --since/--until listing only their days, a SIGKILL mid-backfill and a resume, bad objects
quarantined by key, one trace per call across a bucket and a file."""

from __future__ import annotations

import gzip
import json
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.buckets import BucketServer, put_gcs_batch, put_gcs_objects, put_s3_v2_batch_file, put_s3_v2_objects, server_env
from tests.conftest import all_traces, read_capture, reidentify, run_cli, write_jsonl

EXE = str(Path(sys.executable).parent / "litellm-ingest")
EXP = "buckets"


def run(server: BucketServer, *args: str, state: Path, uri: str, codes: tuple[int, ...] = (0,)) -> tuple[int, dict[str, Any], str]:
    env = {k: v for k, v in server.environ().items() if not k.startswith("MLFLOW_")}
    state_args = ("--state-dir", str(state)) if args[0] != "reconcile" else ()
    p = run_cli([*args, "--tracking-uri", uri, "--experiment-name", EXP, "--json", *state_args], Path.cwd(), env, 600)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode in codes, (p.returncode, p.stderr)
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {}), p.stderr


def calls_of(records: list[dict]) -> set[str]:
    return {r["litellm_call_id"] for r in records}


def trace_calls(uri: str) -> list[str]:
    return [t.info.tags["litellm.call_id"] for t in all_traces(uri, EXP, include_spans=False)]


def days_ago(n: float) -> list[dict]:
    capture = read_capture()
    return reidentify(capture, shift_s=round(time.time() - n * 86400 - min(r["startTime"] for r in capture)))


def test_s3_cron_reads_only_new_objects_in_every_layout(s3_server: BucketServer, tmp_path: Path) -> None:
    fs, bucket = s3_server.fs(), s3_server.new_bucket()
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    url = f"s3://{bucket}/litellm/"
    first = days_ago(3)
    keys = put_s3_v2_objects(fs, bucket, first, s3_path="litellm")
    _, s1, _ = run(s3_server, "batch", url, state=state, uri=uri)
    assert s1["objects_read"] == len(keys) == s1["objects"] and s1["traces_written"] == len(calls_of(first))

    hourly, batched, archived = days_ago(2), days_ago(1), days_ago(1.5)
    new = put_s3_v2_objects(fs, bucket, hourly, s3_path="litellm", granularity="hour")
    new += put_s3_v2_batch_file(fs, bucket, batched, s3_path="litellm")
    new += put_s3_v2_objects(fs, bucket, archived, s3_path="litellm", gzip=True)
    _, s2, _ = run(s3_server, "batch", url, state=state, uri=uri)
    assert s2["objects_read"] == len(new) and s2["quarantined"] == 0
    everything = first + hourly + batched + archived
    got = trace_calls(uri)
    assert sorted(got) == sorted(calls_of(everything))

    _, s3, _ = run(s3_server, "batch", url, state=state, uri=uri)
    assert s3["objects_read"] == 0 and s3["traces_written"] == 0
    code, report, _ = run(s3_server, "reconcile", url, state=state, uri=uri)
    assert code == 0 and report["missing_count"] == 0 and report["matched"] == len(calls_of(everything))

    (tmp_path / "m.db").unlink()
    _, s4, _ = run(s3_server, "batch", url, state=state, uri=uri)
    assert s4["state_replaced"] and s4["objects_read"] == len(keys) + len(new), "a new store at the same path gets every object again"
    assert sorted(trace_calls(uri)) == sorted(calls_of(everything))


def test_cron_lists_only_partitions_from_a_day_before_the_newest_it_read(s3_server: BucketServer, tmp_path: Path) -> None:
    fs, bucket = s3_server.fs(), s3_server.new_bucket()
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    url = f"s3://{bucket}/"
    old, recent = days_ago(10), days_ago(1)
    put_s3_v2_objects(fs, bucket, old)
    recent_keys = put_s3_v2_objects(fs, bucket, recent)
    _, s1, _ = run(s3_server, "batch", url, state=state, uri=uri)
    assert s1["objects"] == s1["objects_read"] > 0
    _, s2, _ = run(s3_server, "batch", url, state=state, uri=uri)
    assert s2["objects"] == len(recent_keys), "the old partition is listed again"
    late_records = days_ago(12)
    late = put_s3_v2_objects(fs, bucket, late_records)
    _, s3, _ = run(s3_server, "batch", url, state=state, uri=uri)
    assert s3["objects_read"] == 0, "a cron run read a partition more than a day older than the newest"
    _, b, _ = run(s3_server, "backfill", url, state=state, uri=uri)
    assert b["objects_read"] >= len(late)
    assert sorted(trace_calls(uri)) == sorted(calls_of(old) | calls_of(recent) | calls_of(late_records))


def test_each_prefix_of_one_bucket_keeps_its_own_cron_mark(s3_server: BucketServer, tmp_path: Path) -> None:
    """The newest day a cron run read was kept per bucket: a second prefix's listing, given on the
    same command line or added to the job later, started from the first one's newest day, and its
    older partitions were never listed (exit 0; ``reconcile`` found them missing); one that failed
    to fetch was said to be read again next run, and never was."""
    fs, bucket = s3_server.fs(), s3_server.new_bucket()
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    eu, us, team = days_ago(0.2)[:5], days_ago(4)[5:10], days_ago(6)[10:15]
    put_s3_v2_objects(fs, bucket, eu, s3_path="proxy-eu")
    put_s3_v2_objects(fs, bucket, us, s3_path="proxy-us")
    team_keys = put_s3_v2_objects(fs, bucket, team, s3_path="team-b")
    eu_url, us_url, team_url = (f"s3://{bucket}/{p}/" for p in ("proxy-eu", "proxy-us", "team-b"))
    code, s1, _ = run(s3_server, "batch", eu_url, us_url, state=state, uri=uri)
    assert code == 0 and sorted(trace_calls(uri)) == sorted(calls_of(eu) | calls_of(us)), s1
    code, s2, _ = run(s3_server, "batch", eu_url, us_url, team_url, state=state, uri=uri)
    assert code == 0 and s2["objects_read"] == len(team_keys) > 0, "a prefix added to the job is read whole"
    assert sorted(trace_calls(uri)) == sorted(calls_of(eu) | calls_of(us) | calls_of(team))
    code, s3, _ = run(s3_server, "batch", eu_url, us_url, team_url, state=state, uri=uri)
    assert code == 0 and s3["objects_read"] == 0
    (ledger,) = state.glob("batch-*.ledger.sqlite")
    with sqlite3.connect(ledger) as db:
        marks = dict(db.execute("SELECT name, value FROM meta").fetchall())
    assert sorted(k for k in marks if k.startswith("newest_day")) == ["newest_day /proxy-eu", "newest_day /proxy-us", "newest_day /team-b"]
    assert sorted(k for k in marks if k.startswith("forgotten_before")) == [
        "forgotten_before /proxy-eu",
        "forgotten_before /proxy-us",
        "forgotten_before /team-b",
    ], "each prefix forgets its own old partitions"


def test_a_folder_dated_years_ahead_does_not_make_cron_runs_skip_todays_objects(s3_server: BucketServer, tmp_path: Path) -> None:
    """A replica whose clock is years ahead writes a folder of that day: the newest folder's day moved
    every later cron run's start there, and today's new objects were never listed again (nor was a
    mark an older run saved that way ever dropped)."""
    fs, bucket = s3_server.fs(), s3_server.new_bucket()
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    url = f"s3://{bucket}/"
    today, ahead = days_ago(0.1), days_ago(-3000)
    put_s3_v2_objects(fs, bucket, today[:3])
    put_s3_v2_objects(fs, bucket, ahead[:2])
    run(s3_server, "batch", url, state=state, uri=uri)
    later = today[3:6]
    put_s3_v2_objects(fs, bucket, later)
    run(s3_server, "batch", url, state=state, uri=uri)
    assert calls_of(later) <= set(trace_calls(uri)), "today's new objects were not listed"

    (ledger,) = state.glob("batch-*.ledger.sqlite")
    with sqlite3.connect(ledger) as db:
        assert db.execute("UPDATE meta SET value = '2099-01-01' WHERE name LIKE 'newest_day%'").rowcount == 1
    last = today[6:9]
    put_s3_v2_objects(fs, bucket, last)
    run(s3_server, "batch", url, state=state, uri=uri)
    assert calls_of(last) <= set(trace_calls(uri)), "a mark saved years ahead is dropped"


def test_since_until_list_only_the_days_they_cover(s3_server: BucketServer, tmp_path: Path) -> None:
    fs, bucket = s3_server.fs(), s3_server.new_bucket()
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    per_day = {n: days_ago(n) for n in (2, 4, 6, 8, 10)}
    keys = {n: put_s3_v2_objects(fs, bucket, recs, s3_path="logs") for n, recs in per_day.items()}
    day6 = min(r["startTime"] for r in per_day[6])
    since = datetime.fromtimestamp(day6, tz=UTC).date()
    until = since + timedelta(days=1)
    window = ("--since", since.isoformat(), "--until", until.isoformat())
    _, s, _ = run(s3_server, "backfill", f"s3://{bucket}/logs/", *window, state=state, uri=uri)
    inside = {r["litellm_call_id"] for r in per_day[6] if datetime.fromtimestamp(r["startTime"], tz=UTC).date() == since}
    assert s["objects"] == len(keys[6]), "listed partitions beyond the day asked for (and its slack)"
    assert sorted(trace_calls(uri)) == sorted(inside)


def ledger_count(state: Path) -> int:
    found = list(state.glob("backfill-*.ledger.sqlite"))
    if not found:
        return 0
    try:
        with sqlite3.connect(f"file:{found[0]}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT count(*) FROM items").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_a_backfill_killed_mid_bucket_resumes_and_loses_nothing(s3_server: BucketServer, tmp_path: Path) -> None:
    fs, bucket = s3_server.fs(), s3_server.new_bucket()
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    records = [r for n in range(12) for r in days_ago(5 + n * 0.01)]
    keys = put_s3_v2_objects(fs, bucket, records, s3_path="logs")
    env = {k: v for k, v in s3_server.environ().items() if not k.startswith("MLFLOW_")}
    args = [EXE, "backfill", f"s3://{bucket}/logs/", "--tracking-uri", uri, "--experiment-name", EXP, "--state-dir", str(state), "--json"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while ledger_count(state) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = ledger_count(state)
    assert 0 < done < len(keys), f"the kill did not land mid-run ({done} of {len(keys)})"
    _, s, _ = run(s3_server, "backfill", f"s3://{bucket}/logs/", state=state, uri=uri)
    assert s["objects_read"] <= len(keys) - done
    got = trace_calls(uri)
    assert len(got) == len(set(got)) and set(got) == calls_of(records)


def test_a_bad_object_is_quarantined_by_its_key_and_the_rest_are_read(s3_server: BucketServer, tmp_path: Path) -> None:
    fs, bucket = s3_server.fs(), s3_server.new_bucket()
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    records = days_ago(2)
    keys = put_s3_v2_objects(fs, bucket, records, s3_path="logs")
    day = keys[0].rsplit("/", 1)[0]
    fs.pipe(f"{bucket}/{day}/broken.json", b'{"id": "half-written", "startTime": 17')
    fs.pipe(f"{bucket}/{day}/damaged.json.gz", gzip.compress(json.dumps(records[0]).encode())[:300])
    _, s, _ = run(s3_server, "batch", f"s3://{bucket}/logs/", state=state, uri=uri, codes=(3,))
    assert s["quarantined"] == 2 and s["objects_read"] == len(keys) + 2
    bad = [json.loads(line) for line in Path(s["quarantine_file"]).read_text().splitlines()]
    assert {b["source"] for b in bad} == {f"s3://{bucket}/{day}/broken.json", f"s3://{bucket}/{day}/damaged.json.gz"}
    assert sorted(trace_calls(uri)) == sorted(calls_of(records))
    _, again, _ = run(s3_server, "batch", f"s3://{bucket}/logs/", state=state, uri=uri)
    assert again["quarantined"] == 0 and again["objects_read"] == 0


def test_no_credentials_or_no_bucket_is_one_line_and_exit_8(s3_server: BucketServer, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    _, _, err = run(s3_server, "batch", "s3://no-such-bucket-here/x/", state=tmp_path / "st", uri=uri, codes=(8,))
    assert "no such bucket" in err and len(err.strip().splitlines()) == 1
    env = {k: v for k, v in s3_server.environ().items() if not k.startswith(("MLFLOW_", "AWS_ACCESS", "AWS_SECRET"))}
    p = subprocess.run(
        [EXE, "batch", f"s3://{s3_server.new_bucket()}/", "--tracking-uri", uri, "--state-dir", str(tmp_path / "st")],
        env={**env, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 8 and "credentials" in p.stderr.lower() and "Traceback" not in p.stderr


def test_a_bucket_server_that_cannot_be_reached_is_one_line_and_exit_8(gcs_server: BucketServer, tmp_path: Path) -> None:
    """gcsfs logs a request that ran out of retries at ERROR with two tracebacks (about 50 lines)
    before raising it: the run's own line is the only one."""
    closed = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:1"}
    env = {k: v for k, v in gcs_server.environ().items() if not k.startswith("MLFLOW_")} | closed
    p = subprocess.run(
        [EXE, "batch", "gs://bucket/", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--state-dir", str(tmp_path / "st")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 8, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "cannot list gs://bucket/" in p.stderr


def test_a_call_in_a_bucket_and_a_file_is_one_trace(s3_server: BucketServer, tmp_path: Path) -> None:
    fs, bucket = s3_server.fs(), s3_server.new_bucket()
    records = days_ago(4)
    put_s3_v2_objects(fs, bucket, records)
    log = write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run(s3_server, "batch", str(log), f"s3://{bucket}/", state=tmp_path / "st", uri=uri)
    got = trace_calls(uri)
    assert len(got) == len(set(got)) == len(calls_of(records))


def stored_calls(fs: Any, bucket: str) -> set[str]:
    """The calls the bucket's objects hold (gcs_bucket's per-call mode overwrites some: see tests/buckets.py)."""
    out: set[str] = set()
    for path in fs.find(bucket):
        for line in fs.cat(path).splitlines():
            if line.strip():
                out.add(json.loads(line)["litellm_call_id"])
    return out


def test_gcs_both_modes(gcs_server: BucketServer, tmp_path: Path) -> None:
    fs = gcs_server.fs()
    per_call, batched = gcs_server.new_bucket(), gcs_server.new_bucket()
    put_gcs_objects(fs, per_call, days_ago(3), folder="proxy")
    batch_records = days_ago(2)
    put_gcs_batch(fs, batched, batch_records[:20])
    put_gcs_batch(fs, batched, batch_records[20:])
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    _, s, _ = run(gcs_server, "batch", f"gs://{per_call}/proxy/", f"gs://{batched}", state=state, uri=uri)
    expected = stored_calls(fs, per_call) | calls_of(batch_records)
    assert s["quarantined"] == 0 and sorted(trace_calls(uri)) == sorted(expected)
    put_gcs_batch(fs, batched, (more := days_ago(1)))
    _, s2, _ = run(gcs_server, "batch", f"gs://{per_call}/proxy/", f"gs://{batched}", state=state, uri=uri)
    assert s2["objects_read"] == 1 and s2["traces_written"] == len(calls_of(more))


def test_a_partition_is_listed_a_page_at_a_time(s3_server: BucketServer, gcs_server: BucketServer, monkeypatch: Any) -> None:
    import ingest.buckets as buckets

    monkeypatch.setattr(buckets, "LIST_PAGE", 700)
    for server, scheme in ((s3_server, "s3"), (gcs_server, "gs")):
        fs, bucket = server.fs(), server.new_bucket()
        fs.pipe({f"{bucket}/logs/2026-11-01/{i:05d}.json": b"{}" for i in range(2100)})
        with server_env(server):
            b = buckets.Bucket.parse(f"{scheme}://{bucket}/logs/")
            pages = list(b.listing(f"{bucket}/logs/2026-11-01"))
        assert len(pages) >= 3 and max(len(p) for p in pages) <= 1000, scheme
        keys = [e["name"] for p in pages for e in p]
        assert len(keys) == len(set(keys)) == 2100, scheme


def test_shard_over_three_runs_writes_every_call_of_a_bucket_once(s3_server: BucketServer, tmp_path: Path) -> None:
    """Every shard reads the bucket whole (a call's attempts are separate objects) and writes the calls
    whose id hashes to it: together every call once, whole, each shard some."""
    fs, bucket = s3_server.fs(), s3_server.new_bucket()
    records = days_ago(3) + days_ago(2)
    put_s3_v2_objects(fs, bucket, records, s3_path="logs")
    sharded = f"sqlite:///{tmp_path / 'sharded.db'}"
    written = []
    for i in (1, 2, 3):
        _, s, _ = run(s3_server, "backfill", f"s3://{bucket}/logs/", "--shard", f"{i}/3", state=tmp_path / f"machine-{i}", uri=sharded)
        assert s["traces_written"] + s["calls_other_shards"] == len(calls_of(records))
        written.append(s["traces_written"])
    assert all(written) and sum(written) == len(calls_of(records)), written
    got = trace_calls(sharded)
    assert len(got) == len(set(got)) and set(got) == calls_of(records)
    from tests.test_backfill import expected_spans

    assert {t.info.tags["litellm.call_id"]: len(t.data.spans) for t in all_traces(sharded, EXP)} == expected_spans(records)


def test_keys_with_glob_characters_are_read_not_taken_for_gone(s3_server: BucketServer, tmp_path: Path) -> None:
    """s3_v2 with the team prefix puts the team alias in every key: ``ml [eu]`` made fsspec's ``cat``
    take the key for a pattern that matched nothing, and the object was marked read as vanished:
    its calls silently lost, every run."""
    fs, bucket = s3_server.fs(), s3_server.new_bucket()
    records = days_ago(1)[:8]
    for i, r in enumerate(records):
        r["metadata"] = {**(r.get("metadata") or {}), "user_api_key_team_alias": ["ml [eu]", "web*", "a?b", "web"][i % 4]}
    keys = put_s3_v2_objects(fs, bucket, records, s3_path="litellm", use_team_prefix=True)
    assert any("[" in k for k in keys) and any("*" in k for k in keys)
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    _, s, _ = run(s3_server, "batch", f"s3://{bucket}/litellm/", state=state, uri=uri)
    assert (s["objects_read"], s["records_read"]) == (len(keys), len(records))
    assert sorted(trace_calls(uri)) == sorted(calls_of(records))


def test_reconcile_claims_no_agreement_when_objects_could_not_be_fetched(
    s3_env: BucketServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch that fails (a throttled or refused GET) leaves the object's calls uncompared: batch
    says exit 8 for it, and reconcile said the logs and MLflow agree (exit 0). The refused object's
    call, written by the batch, is then a trace no call read matches: it is listed, but not claimed
    as a difference (exit 6 made a throttled fetch look like a stray trace)."""
    from click.testing import CliRunner

    from ingest.buckets import Bucket
    from ingest.cli import main

    fs, bucket = s3_env.fs(), s3_env.new_bucket()
    records = days_ago(2)
    put_s3_v2_objects(fs, bucket, records, s3_path="logs")
    uri, url = f"sqlite:///{tmp_path / 'm.db'}", f"s3://{bucket}/logs/"
    _, s, _ = run(s3_env, "batch", url, state=tmp_path / "st", uri=uri)
    assert s["traces_written"] == len(calls_of(records))
    agree = CliRunner().invoke(main, ["reconcile", url, "--tracking-uri", uri, "--experiment-name", EXP, "--json"])
    assert agree.exit_code == 0, agree.output

    fetch = Bucket.fetch
    by_start = sorted(records, key=lambda r: r["startTime"])
    middle = next(r for r in by_start[1:-1] if sum(o["litellm_call_id"] == r["litellm_call_id"] for o in records) == 1)

    def refused(self: Bucket, keys: list[str]) -> dict[str, bytes | BaseException]:
        got = fetch(self, keys)
        return {**got, **{k: PermissionError("403 Forbidden") for k in keys if k.endswith(f"_{middle['id']}.json")}}

    monkeypatch.setattr(Bucket, "fetch", refused)
    args = ["reconcile", url, "--tracking-uri", uri, "--experiment-name", EXP]
    short = CliRunner().invoke(main, [*args, "--json"])
    report = json.loads(short.output)
    assert short.exit_code == 8 and report["unreadable"] and all(f"s3://{bucket}" in u for u in report["unreadable"]), short.output
    assert (report["missing"], report["extra"], report["extra_confirmed"]) == ([], [middle["litellm_call_id"]], False), report
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 8 and "not in the logs read (may be calls of what was not read)" in text.output, text.output


def test_a_call_whose_attempts_sit_in_two_groups_of_objects_is_counted_once(s3_server: BucketServer, tmp_path: Path) -> None:
    """A run fetches a bucket's new objects in groups of 256 and feeds them one group at a time: a
    failed attempt followed by more than ``--settle`` of other calls in its group is written as
    failed, and its success in the next group rewrites the call. The call was counted twice: the
    summary said more calls than the store held (as for a late attempt joined to its trace)."""
    fs, bucket = s3_server.fs(), s3_server.new_bucket()
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    calls: dict[str, list[dict]] = {}
    for r in days_ago(1):
        calls.setdefault(r["litellm_call_id"], []).append(r)
    retried = sorted(
        next(c for c in calls.values() if c[0]["status"] != "success" and c[-1]["status"] == "success"), key=lambda r: r["startTime"]
    )
    single = next(c for c in calls.values() if len(c) == 1)[0]
    start = retried[0]["startTime"]
    failed = retried[:-1]
    fillers = [r for i in range(256 - len(failed)) for r in reidentify([single], shift_s=start + 1 + i - single["startTime"])]
    late = {**retried[-1], **{k: retried[-1][k] + 400 for k in ("startTime", "endTime", "completionStartTime")}}
    records = failed + fillers + [late]
    put_s3_v2_objects(fs, bucket, records, s3_path="litellm")
    code, s, _ = run(s3_server, "batch", f"s3://{bucket}/litellm/", state=state, uri=uri)
    assert code == 0 and s["objects_read"] == len(records), s
    assert s["traces_rewritten"] == 1 and s["traces_written"] == len(calls_of(records)) + 1, "the case is exercised: written again"
    assert s["calls"] == len(trace_calls(uri)) == len(calls_of(records)), s
