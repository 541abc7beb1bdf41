"""Cron batch: each run sends only what is new, through rotation, truncation and partial lines.

"Sent" is counted by the MLflow server itself (its Prometheus counter of spans received), not by
what the ingester claims; "present" is read back with MLflow's API.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from ingest.pipeline import RunOptions, run_batch, run_incremental
from tests.conftest import SUFFIX, all_traces, compressor, reidentify, spans_ingested, write_jsonl


def expected_spans(records: list[dict]) -> int:
    by_call: dict[str, int] = {}
    for r in records:
        by_call[r["litellm_call_id"]] = by_call.get(r["litellm_call_id"], 0) + 1
    return sum(1 if n == 1 else n + 1 for n in by_call.values())


def call_ids(records: list[dict]) -> set[str]:
    return {r["litellm_call_id"] for r in records}


def lines(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def whole_calls(capture: list[dict], start: int, stop: int) -> list[dict]:
    """Records of capture calls start..stop-1 (by first appearance), attempts kept together."""
    order: list[str] = []
    for r in capture:
        if r["litellm_call_id"] not in order:
            order.append(r["litellm_call_id"])
    chosen = set(order[start:stop])
    return [r for r in capture if r["litellm_call_id"] in chosen]


class Cron:
    """Runs `batch` the way cron would: same state dir, same destination, every time."""

    def __init__(self, uri: str, experiment: str, state_dir: Path) -> None:
        self.uri, self.experiment, self.state_dir = uri, experiment, state_dir

    def run(self, *paths: Path, partial_timeout_s: float = 3600.0):  # type: ignore[no-untyped-def]
        return run_incremental(
            RunOptions(
                paths=[str(p) for p in paths],
                tracking_uri=self.uri,
                experiment_name=self.experiment,
                state_dir=self.state_dir,
                quarantine_file=self.state_dir / "q.jsonl",
                partial_timeout_s=partial_timeout_s,
            ),
            "batch",
        )


@pytest.fixture
def cron(mlflow_server, tmp_path: Path) -> Cron:
    return Cron(mlflow_server.url, f"cron-{uuid.uuid4().hex[:8]}", tmp_path / "state")


@pytest.fixture
def batches(capture: list[dict]) -> list[list[dict]]:
    """Three disjoint sets of whole calls, fresh ids each test."""
    salt = uuid.uuid4().hex[:8]
    return [
        reidentify(whole_calls(capture, 0, 12), salt=salt),
        reidentify(whole_calls(capture, 12, 27), salt=salt),
        reidentify(whole_calls(capture, 27, 45), salt=salt),
    ]


def assert_present_exactly(cron: Cron, records: list[dict]) -> None:
    traces = all_traces(cron.uri, cron.experiment)
    got = [t.info.tags["litellm.call_id"] for t in traces]
    assert sorted(got) == sorted(call_ids(records))
    assert sum(len(t.data.spans) for t in traces) == expected_spans(records)


def test_second_run_sends_only_the_appended_calls(cron: Cron, mlflow_server, batches, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "proxy.jsonl"
    write_jsonl(log, batches[0])
    before = spans_ingested(mlflow_server)
    first = cron.run(log)
    assert spans_ingested(mlflow_server) - before == expected_spans(batches[0])
    assert first.traces_written == len(call_ids(batches[0]))

    with log.open("a") as f:
        f.write(lines(batches[1]))
    before = spans_ingested(mlflow_server)
    second = cron.run(log)
    assert spans_ingested(mlflow_server) - before == expected_spans(batches[1])
    assert second.records_read == len(batches[1])
    assert_present_exactly(cron, batches[0] + batches[1])

    before = spans_ingested(mlflow_server)
    third = cron.run(log)
    assert spans_ingested(mlflow_server) == before
    assert third.records_read == 0 and third.traces_written == 0


ROTATIONS = ["rename_create", "copytruncate", "rename_gzip", "rename_delete"]
NAMING = ["numbered", "timestamped"]


def rotate(log: Path, how: str, naming: str) -> Path | None:
    """Rotate ``log`` as logrotate would; return the rotated file (None if deleted)."""
    rotated = log.with_name(log.name + (".1" if naming == "numbered" else "-20261127T1400"))
    if how == "copytruncate":
        shutil.copyfile(log, rotated)
        with log.open("r+") as f:
            f.truncate(0)
        return rotated
    log.rename(rotated)
    if how == "rename_gzip":
        gz = rotated.with_name(rotated.name + ".gz")
        with rotated.open("rb") as src, gzip.open(gz, "wb") as dst:
            shutil.copyfileobj(src, dst)
        rotated.unlink()
        return gz
    if how == "rename_delete":
        rotated.unlink()
        return None
    return rotated


@pytest.mark.parametrize("naming", NAMING)
@pytest.mark.parametrize("how", ROTATIONS)
def test_rotation_between_cron_runs_loses_and_repeats_nothing(
    cron: Cron, mlflow_server, batches, tmp_path: Path, how: str, naming: str
) -> None:
    logdir = tmp_path / "logs"
    log = write_jsonl(logdir / "proxy.jsonl", batches[0])
    before = spans_ingested(mlflow_server)
    cron.run(logdir)
    if how != "rename_delete":
        with log.open("a") as f:  # written after the last run, before rotation: still unread
            f.write(lines(batches[1]))
    rotate(log, how, naming)
    with log.open("a") as f:
        f.write(lines(batches[2]))
    cron.run(logdir)
    sent = batches[0] + (batches[1] if how != "rename_delete" else []) + batches[2]
    assert spans_ingested(mlflow_server) - before == expected_spans(sent), "every span sent exactly once"
    assert_present_exactly(cron, sent)


def test_gzip_copy_of_an_ingested_file_is_recognised(cron: Cron, mlflow_server, batches, tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    log = write_jsonl(logdir / "proxy.jsonl", batches[0])
    cron.run(logdir)
    with log.open("rb") as src, gzip.open(logdir / "archive-copy.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    before = spans_ingested(mlflow_server)
    summary = cron.run(logdir)
    assert spans_ingested(mlflow_server) == before
    assert summary.records_read == 0


def test_replaced_file_with_the_same_first_line_is_read_again(cron: Cron, mlflow_server, batches, tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    first_record = batches[0][:1]
    log = write_jsonl(logdir / "proxy.jsonl", first_record + batches[1])
    cron.run(logdir)
    log.write_text(lines(first_record + batches[2]))  # truncated and rewritten: same first line, shorter
    os.utime(log, (time.time() + 1, time.time() + 1))
    summary = cron.run(logdir)
    assert summary.records_read == 1 + len(batches[2])
    assert_present_exactly(cron, first_record + batches[1] + batches[2])


def test_partial_last_line_waits_for_its_newline(cron: Cron, mlflow_server, batches, tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    log = write_jsonl(logdir / "proxy.jsonl", batches[0])
    tail = json.dumps(batches[1][0])
    with log.open("a") as f:
        f.write(tail[:100])
    first = cron.run(logdir)
    assert first.quarantined == 0
    assert batches[1][0]["litellm_call_id"] not in {t.info.tags["litellm.call_id"] for t in all_traces(cron.uri, cron.experiment)}
    with log.open("a") as f:
        f.write(tail[100:] + "\n")
    second = cron.run(logdir)
    assert second.records_read == 1
    assert batches[1][0]["litellm_call_id"] in {t.info.tags["litellm.call_id"] for t in all_traces(cron.uri, cron.experiment)}


def test_partial_line_of_a_quiet_file_is_quarantined_after_the_timeout(cron: Cron, batches, tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    log = write_jsonl(logdir / "proxy.jsonl", batches[0])
    with log.open("a") as f:
        f.write(json.dumps(batches[1][0])[:100])
    old = time.time() - 3600
    os.utime(log, (old, old))
    summary = cron.run(logdir, partial_timeout_s=600)
    assert summary.quarantined_by_reason == {"truncated_line": 1}
    again = cron.run(logdir, partial_timeout_s=600)
    assert again.quarantined == 0 and again.records_read == 0


def test_a_line_being_written_on_a_file_server_whose_clock_runs_behind_waits_for_its_newline(cron: Cron, batches, tmp_path: Path) -> None:
    """The file's modification time an hour behind this machine's clock (an NFS server's): a cron run
    that had seen it grow since its last run took the line being written for a cut one, quarantined
    it as ``truncated_line`` and its rest as ``malformed_json``: the call was lost."""
    logdir = tmp_path / "logs"
    log = write_jsonl(logdir / "proxy.jsonl", batches[0])
    skewed = lambda: os.utime(log, (time.time() - 3600, time.time() - 3600))  # noqa: E731
    skewed()
    assert cron.run(logdir, partial_timeout_s=600).quarantined == 0
    tail = json.dumps(batches[1][0])
    with log.open("a") as f:
        f.write(tail[:100])
    skewed()
    assert cron.run(logdir, partial_timeout_s=600).quarantined == 0, "the line being written was taken for a cut one"
    with log.open("a") as f:
        f.write(tail[100:] + "\n")
    skewed()
    later = cron.run(logdir, partial_timeout_s=600)
    assert later.quarantined == 0 and later.records_read == 1
    assert_present_exactly(cron, batches[0] + batches[1][:1])


def test_failed_attempt_is_held_across_runs_until_its_fallback_arrives(cron: Cron, mlflow_server, capture, tmp_path: Path) -> None:
    pair = [r for r in capture if r["litellm_call_id"].startswith("86f9bb02")]
    assert [r["status"] for r in pair] == ["failure", "success"]
    shift = time.time() - pair[1]["endTime"] - 5  # as if it happened seconds ago
    failure, success = reidentify(pair, shift_s=shift)
    logdir = tmp_path / "logs"
    log = write_jsonl(logdir / "proxy.jsonl", [failure])
    before = spans_ingested(mlflow_server)
    first = cron.run(logdir)
    assert first.calls_held == 1 and first.traces_written == 0
    assert spans_ingested(mlflow_server) == before, "a failure that may still be retried is not written yet"
    with log.open("a") as f:
        f.write(json.dumps(success) + "\n")
    second = cron.run(logdir)
    assert second.traces_written == 1
    (trace,) = all_traces(cron.uri, cron.experiment)
    assert trace.info.state.value == "OK"
    assert len(trace.data.spans) == 3
    assert spans_ingested(mlflow_server) - before == 3


def test_old_failures_are_not_held(cron: Cron, capture, tmp_path: Path) -> None:
    failures = reidentify([r for r in capture if r["litellm_call_id"].startswith("dbb95558")])
    logdir = tmp_path / "logs"
    write_jsonl(logdir / "proxy.jsonl", failures)
    summary = cron.run(logdir)
    assert summary.calls_held == 0 and summary.traces_written == 1
    (trace,) = all_traces(cron.uri, cron.experiment)
    assert trace.info.state.value == "ERROR"


def test_a_failure_stamped_years_ahead_is_written_at_once_and_said(cron: Cron, capture, tmp_path: Path) -> None:
    """A cron run against a proxy whose clock was years ahead: the failed call is not held until
    then (re-read every run), it is written now, and the summary's warnings say why."""
    now_shift = time.time() + 3 * 365 * 86400 - max(r["endTime"] for r in capture)
    failures = reidentify([r for r in capture if r["litellm_call_id"].startswith("dbb95558")], shift_s=now_shift)
    logdir = tmp_path / "logs"
    write_jsonl(logdir / "proxy.jsonl", failures)
    summary = cron.run(logdir)
    assert (summary.calls_held, summary.traces_written) == (0, 1)
    assert summary.warnings_by_kind == {"end_in_future": len(failures)}
    (trace,) = all_traces(cron.uri, cron.experiment)
    assert trace.info.state.value == "ERROR"
    again = cron.run(logdir)
    assert (again.records_read, again.calls_held, again.traces_written) == (0, 0, 0)


def test_file_without_a_complete_first_line_waits(cron: Cron, batches, tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    log.write_text(json.dumps(batches[0][0])[:50])
    first = cron.run(logdir)
    assert first.files_skipped == 1 and first.records_read == 0
    log.write_text(lines(batches[0]))
    second = cron.run(logdir)
    assert second.records_read == len(batches[0]) and second.files_skipped == 0

    # a last line waiting for its newline is a file waiting too; one compressed with xz is read as gzip is
    with log.open("a") as f:
        f.write(json.dumps(batches[1][0])[:50])
    third = cron.run(logdir)
    assert (third.files, third.files_skipped, third.records_read) == (1, 1, 0)
    (logdir / "proxy.jsonl.1.xz").write_bytes(lzma.compress(lines(batches[1]).encode()))
    fourth = cron.run(logdir)
    assert (fourth.files, fourth.files_skipped, fourth.records_read) == (2, 1, len(batches[1]))


def test_small_files_are_read_a_group_per_step_and_the_state_saved_once_per_group(tmp_path: Path, capture, monkeypatch) -> None:
    """300 one-record files: a step, a write and a state save each took ~80 ms a file (an hour for a
    synced bucket of 50,000 calls); grouped, a handful of each."""
    from ingest.checkpoints import State
    from ingest.pipeline import GROUP_MAX_FILES, small_file_groups

    records = [r for c in [reidentify(capture, i * 600.0, f"small-{i}") for i in range(7)] for r in c][:300]
    logs = tmp_path / "logs"
    for i, r in enumerate(records):
        write_jsonl(logs / f"{i:04d}.json", [r])
    big = write_jsonl(logs / "9999-big.jsonl", reidentify(capture, 99999.0, "big") * 30)
    files = sorted(logs.iterdir())
    groups = list(small_file_groups(files, 8 << 20))
    assert [len(g) for g in groups] == [GROUP_MAX_FILES, 300 - GROUP_MAX_FILES, 1] and groups[-1] == [big]

    saves = []
    real_save = State.save
    monkeypatch.setattr(State, "save", lambda self, data=None: (saves.append(1), real_save(self, data))[1])
    opts = RunOptions(paths=[str(logs)], tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment_name="small", state_dir=tmp_path / "st")
    summary = run_incremental(opts, "batch")
    assert summary.records_read == 300 + len(capture) * 30 and summary.files == 301
    assert summary.traces_written == len(call_ids(records)) + len(call_ids(capture))
    assert len(saves) < 20, len(saves)


def test_a_run_opens_only_the_files_that_changed_since_they_were_read(tmp_path: Path, capture, monkeypatch) -> None:
    """A folder of a per-call logger's files grows for months: every cron run opened and
    fingerprinted every file (7 s for 20,000 unchanged files, minutes for a year's). A file read to
    its end and untouched since (device, inode, size, mtime) is now skipped unopened; appended,
    touched, rewritten or new ones are read as before, a renamed one is still known."""
    from ingest.follow import Follower

    sets = [reidentify(whole_calls(capture, i * 9, i * 9 + 9), salt=f"{uuid.uuid4().hex[:6]}-{i}") for i in range(5)]
    logs = tmp_path / "logs"
    files = [write_jsonl(logs / f"p{i}.jsonl", recs) for i, recs in enumerate(sets[:3])]
    with gzip.open(logs / "old.jsonl.gz", "wt") as gz:
        gz.write(lines(sets[3]))
    cron = Cron(f"sqlite:///{tmp_path / 'm.db'}", "changed", tmp_path / "st")
    assert cron.run(logs).files_unchanged == 0

    opened: list[str] = []
    real_identify = Follower.identify
    monkeypatch.setattr(Follower, "identify", lambda self, path: (opened.append(path.name), real_identify(self, path))[1])
    again = cron.run(logs)
    assert (opened, again.files_unchanged, again.records_read) == ([], 4, 0)

    extra = sets[4][:3]
    with files[0].open("a") as f:
        f.write(lines(extra))
    later = time.time() + 5
    os.utime(files[1], (later, later))
    files[2].rename(logs / "p2.jsonl.1")
    new = write_jsonl(logs / "new.jsonl", sets[4][3:])
    third = cron.run(logs)
    assert sorted(opened) == sorted(["p0.jsonl", "p1.jsonl", new.name]) and third.files_unchanged == 2
    assert third.records_read == len(sets[4])
    traces = all_traces(cron.uri, cron.experiment)
    everything = [r for s in sets for r in s]
    assert sorted(t.info.tags["litellm.call_id"] for t in traces) == sorted(call_ids(everything))
    assert sum(len(t.data.spans) for t in traces) == expected_spans(everything)


def test_a_line_too_long_is_quarantined_once_and_the_next_run_reads_nothing(tmp_path: Path, capture) -> None:
    """The checkpoint after a line over the limit (40 MiB) lands at the file's end: its digest was taken
    through a reader sharing the chunk reader's offset, which then read part of the long line again
    as a line of its own, and saved a checkpoint past the end that every later run took for a
    rewritten file (everything read and quarantined again, exit 3, for good)."""
    before, after = reidentify(whole_calls(capture, 0, 2)), reidentify(whole_calls(capture, 2, 4))
    big = {**before[0], "litellm_call_id": f"big-{uuid.uuid4().hex[:6]}", "messages": [{"role": "user", "content": "A" * (40 << 20)}]}
    log = tmp_path / "logs" / "big.jsonl"
    write_jsonl(log, [*before, big, *after])
    cron = Cron(f"sqlite:///{tmp_path / 'm.db'}", "long-line", tmp_path / "st")

    first = cron.run(log.parent)
    assert (first.quarantined_by_reason, first.records_read) == ({"line_too_long": 1}, len(before) + len(after) + 1)
    (q,) = [json.loads(line) for line in (tmp_path / "st" / "q.jsonl").read_text().splitlines()]
    assert (q["line"], q["reason"]) == (len(before) + 1, "line_too_long")
    (doc,) = [json.loads(p.read_text()) for p in (tmp_path / "st").glob("batch-*.json")]
    assert [c["offset"] for c in doc["checkpoints"]] == [log.stat().st_size]

    again = cron.run(log.parent)
    assert (again.records_read, again.quarantined, again.files_unchanged) == (0, 0, 1)
    assert len((tmp_path / "st" / "q.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("damage", ["truncated", "bad_crc", "trailing_junk"])
def test_a_damaged_archive_gives_every_record_before_the_damage_and_quarantines_the_rest_once(tmp_path: Path, capture, damage: str) -> None:
    """A rotated archive cut short (a full disk, an interrupted copy), with a bad checksum, or with
    bytes after its end: the records that decompress were dropped with the 8 MiB block they came in
    (every one of them for a bad checksum), and the run said nothing but a log line and exited 0.
    Now each one is written, the rest is quarantined as unreadable (exit 3) once, and an archive
    copied again whole is read on from there."""
    records = [r | {"noise": os.urandom(300).hex()} for r in reidentify(whole_calls(capture, 0, 60))]
    whole = gzip.compress(lines(records).encode())
    damaged = {
        "truncated": whole[: len(whole) * 3 // 4],
        "bad_crc": whole[:-8] + b"\0\0\0\0" + whole[-4:],
        "trailing_junk": whole + b"junk",
    }[damage]
    readable = gzip.GzipFile(fileobj=__import__("io").BytesIO(damaged))
    text = b""
    try:
        while part := readable.read1(1 << 16):
            text += part
    except (EOFError, OSError):
        pass
    before = [json.loads(x) for x in text.split(b"\n")[:-1]]
    assert 0 < len(before) <= len(records) and (damage != "truncated" or len(before) < len(records))
    archive = tmp_path / "logs" / "proxy.jsonl.1.gz"
    archive.parent.mkdir()
    archive.write_bytes(damaged)
    os.utime(archive, (time.time() - 7200, time.time() - 7200))
    cron = Cron(f"sqlite:///{tmp_path / 'm.db'}", "damaged", tmp_path / "st")

    first = cron.run(archive.parent)
    assert first.quarantined_by_reason == {"unreadable": 1} and first.records_read == len(before) + 1, "each record, and the rest"
    (q,) = [json.loads(x) for x in (tmp_path / "st" / "q.jsonl").read_text().splitlines()]
    assert (q["source"], q["line"], q["reason"]) == (str(archive), len(before) + 1, "unreadable")
    by_call = {r["litellm_call_id"] for r in before}
    assert {t.info.tags["litellm.call_id"] for t in all_traces(cron.uri, cron.experiment, include_spans=False)} == by_call

    again = cron.run(archive.parent)
    assert (again.records_read, again.quarantined, again.files_unchanged) == (0, 0, 1)

    archive.write_bytes(whole)
    os.utime(archive, (time.time() - 3600, time.time() - 3600))
    mended = cron.run(archive.parent)
    assert (mended.quarantined, mended.records_read) == (0, len(records) - len(before))
    assert_present_exactly(cron, records)
    assert len((tmp_path / "st" / "q.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("damage", ["cut_in_its_first_line", "damaged_at_its_start", "cut_before_a_byte"])
def test_an_archive_damaged_before_its_first_newline_is_quarantined_once_it_is_quiet(tmp_path: Path, capture, damage: str) -> None:
    """An archive cut short inside its first line, or damaged before it gives a byte, had no first
    line to be known by: every run counted it as waiting ("quarantined once unchanged for
    --partial-timeout"), exit 0, for ever, even long after it last changed. Now, quiet, it is known
    by what it gives (or its first compressed bytes) and quarantined as unreadable, once; while it
    may still be being written it waits, as a plain file's first line does."""
    whole = gzip.compress(lines(reidentify(whole_calls(capture, 0, 10))).encode())
    damaged = {
        "cut_in_its_first_line": whole[:1500],
        "damaged_at_its_start": whole[:40] + bytes([whole[40] ^ 0xFF]) + whole[41:],
        "cut_before_a_byte": whole[:20],
    }[damage]
    archive = tmp_path / "logs" / "proxy.jsonl.1.gz"
    archive.parent.mkdir()
    archive.write_bytes(damaged)
    cron = Cron(f"sqlite:///{tmp_path / 'm.db'}", "damaged", tmp_path / "st")
    fresh = cron.run(archive.parent, partial_timeout_s=300)
    assert (fresh.files_skipped, fresh.quarantined) == (1, 0), "it may still be being written"
    os.utime(archive, (time.time() - 600, time.time() - 600))
    quiet = cron.run(archive.parent, partial_timeout_s=300)
    assert (quiet.quarantined_by_reason, quiet.files_skipped, quiet.result) == ({"unreadable": 1}, 0, "quarantined")
    (q,) = [json.loads(x) for x in (tmp_path / "st" / "q.jsonl").read_text().splitlines()]
    assert (q["source"], q["line"], q["reason"]) == (str(archive), 1, "unreadable")
    again = cron.run(archive.parent, partial_timeout_s=300)
    assert (again.records_read, again.quarantined, again.files_skipped) == (0, 0, 0)


@pytest.mark.parametrize("kind", ["gzip", "xz"])
def test_a_damaged_archive_read_without_a_state_gives_every_record_before_the_damage(tmp_path: Path, capture, kind: str) -> None:
    """``batch --no-state`` and ``reconcile`` read files whole, outside the follower: a cut archive
    stopped the run as "unexpected EOFError" (exit 1), the records before the damage with it."""
    records = [r | {"noise": os.urandom(300).hex()} for r in reidentify(whole_calls(capture, 0, 60))]
    whole = compressor(kind)(lines(records).encode())
    archive = tmp_path / "logs" / ("proxy.jsonl.1" + SUFFIX[kind])
    archive.parent.mkdir()
    archive.write_bytes(whole[: len(whole) * 3 // 4])
    quarantine = tmp_path / "q.jsonl"
    summary = run_batch(RunOptions(paths=[str(archive.parent)], dry_run=True, quarantine_file=quarantine))
    (q,) = [json.loads(x) for x in quarantine.read_text().splitlines()]
    assert (q["source"], q["reason"]) == (str(archive), "unreadable") and 1 < q["line"] < len(records)
    assert summary.quarantined_by_reason == {"unreadable": 1} and summary.records_read == q["line"], "each record, and the rest"
