"""Checkpoints of files gone for good are forgotten (Filebeat's ``clean_removed``): a folder whose old
logs are deleted keeps a state as small as what is left, and a file that comes back is read again,
doubling nothing. A file renamed or compressed by rotation is not gone: its checkpoint follows it."""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from ingest import checkpoints
from ingest.checkpoints import FILES_DB_SUFFIX, Checkpoint, State
from ingest.cli import main
from ingest.follow import stat_key
from ingest.pipeline import RunOptions, run_incremental
from tests.conftest import all_traces, reidentify, write_jsonl
from tests.tailkit import Daemon, metric, wait_for

DESTINATION = {"tracking_uri": "sqlite:////var/lib/mlflow.db", "experiment_id": "1"}
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.fixture(params=["document", "settled"])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Checkpoints all in the state document, or past the threshold, settled in the files database."""
    if request.param == "settled":
        monkeypatch.setattr(checkpoints, "SETTLE_ABOVE", 3)
    return request.param


def files_state(tmp_path: Path, n: int = 8) -> tuple[State, list[Path]]:
    logs = tmp_path / "logs"
    logs.mkdir()
    st = State(tmp_path / "batch-a.json", "batch", DESTINATION)
    paths = []
    for i in range(n):
        p = logs / f"call-{i}.json"
        p.write_text("{}\n")
        st.checkpoints[key(i)] = Checkpoint(key(i), str(p.resolve()), offset=3, size=3, end_stat=stat_key(p.stat()))
        paths.append(p)
    st.save()
    return st, paths


def key(i: int) -> str:
    return f"sha256:{i:02d}"


def load(st: State) -> State:
    return State.load(st.path, st.mode, st.destination)


def rows(st: State) -> set[str]:
    db = st.path.with_suffix(FILES_DB_SUFFIX)
    if not db.exists():
        return set()
    with sqlite3.connect(db) as con:
        return {fp for (fp,) in con.execute("SELECT fingerprint FROM files")}


def test_a_file_gone_past_the_grace_is_forgotten_one_back_in_time_is_kept_and_a_load_agrees(
    tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    st, paths = files_state(tmp_path)
    paths[0].unlink()
    paths[1].unlink()
    paths[2].rename(tmp_path / "away")  # a volume unmounted, say
    assert st.forget_gone(3600, now=T0) == 0, "a first look only stamps what is gone"
    st.save()
    st = load(st)
    assert {k for k in st.checkpoints if st.checkpoints[k].gone_at} == {key(0), key(1), key(2)}

    (tmp_path / "away").rename(paths[2])  # back before the grace ends
    assert st.forget_gone(3600, now=T0 + HOUR / 2) == 0, "looks are an hour apart at most often"
    assert st.forget_gone(3600, now=T0 + HOUR) == 2
    assert len(st.checkpoints) == 6 and key(0) not in st.checkpoints and st.checkpoints[key(2)].gone_at is None
    st.save()

    with caplog.at_level(logging.WARNING):
        again = load(st)
        assert sorted(again.checkpoints) == [key(i) for i in range(2, 8)]
        assert len(again.checkpoints) == 6 and not caplog.records, [r.getMessage() for r in caplog.records]
    doc = json.loads(st.path.read_text())
    if layout == "settled":
        assert doc["files_db"]["files"] == 6 and rows(st) == {key(i) for i in range(2, 8)}
    else:
        assert [c["fingerprint"] for c in doc["checkpoints"]] == [key(i) for i in range(2, 8)] and rows(st) == set()
    assert again.forget_gone(3600, now=T0 + 3 * HOUR) == 0 and again.forget_gone(0, now=T0 + 9 * HOUR) == 0


def test_a_file_still_open_or_found_renamed_by_its_stat_is_not_gone_and_0_never_forgets(tmp_path: Path, layout: str) -> None:
    st, paths = files_state(tmp_path)
    renamed = st.checkpoints[key(1)].end_stat
    for p in paths[:3]:
        p.unlink()
    paths[2].write_text("{}\n{}\n")  # another file under its name: a rotation's new one
    assert st.forget_gone(0, now=T0) == 0 and all(st.checkpoints[key(i)].gone_at is None for i in range(3))
    for t in (T0, T0 + 2 * HOUR):
        forgotten = st.forget_gone(3600, busy={key(0)}, listed={renamed}, now=t)
        st.save()
        st = load(st)
    assert forgotten == 1 and sorted(st.checkpoints)[:2] == [key(0), key(1)] and key(2) not in st.checkpoints
    assert st.checkpoints[key(0)].gone_at is None and st.checkpoints[key(1)].gone_at is None


def first_forgotten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[State, list[Path]]:
    """A settled state whose first file was deleted, its checkpoint just forgotten (not saved yet)."""
    monkeypatch.setattr(checkpoints, "SETTLE_ABOVE", 3)
    st, paths = files_state(tmp_path)
    paths[0].unlink()
    st.forget_gone(3600, now=T0)
    st.save()
    assert st.forget_gone(3600, now=T0 + HOUR) == 1
    return st, paths


def test_a_crash_before_the_rows_are_deleted_forgets_them_at_the_next_look(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st, _ = first_forgotten(tmp_path, monkeypatch)
    monkeypatch.setattr(State, "_settle", lambda self: None)  # killed between the document and the database
    st.save()
    monkeypatch.undo()
    monkeypatch.setattr(checkpoints, "SETTLE_ABOVE", 3)
    st = load(st)
    assert key(0) in rows(st) and key(0) in st.checkpoints, "the row is there again, its stamp with it"
    assert st.forget_gone(3600, now=T0 + 2 * HOUR) == 1
    st.save()
    assert key(0) not in rows(st) and len(load(st).checkpoints) == 7


def test_a_forgotten_file_taken_on_again_before_the_save_is_written_not_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st, paths = first_forgotten(tmp_path, monkeypatch)
    st.checkpoints[key(0)] = Checkpoint(key(0), str(paths[0]), offset=99)
    st.save()
    again = load(st)
    assert again.checkpoints[key(0)].offset == 99 and len(again.checkpoints) == 8


# --- real runs -------------------------------------------------------------------------------------


def per_call_files(capture: list[dict], logs: Path, n: int) -> list[tuple[Path, list[dict]]]:
    """``n`` files of whole calls each, fresh ids, as a per-call logger (or a synced bucket) leaves them."""
    calls: dict[str, list[dict]] = {}
    for r in reidentify(capture, salt=uuid.uuid4().hex[:8]):
        calls.setdefault(r["litellm_call_id"], []).append(r)
    groups = list(calls.values())
    out = []
    for i in range(n):
        records = [r for c in groups[i::n] for r in c]
        out.append((write_jsonl(logs / f"calls-{i}.jsonl", records), records))
    return out


def assert_once(uri: str, experiment: str, records: list[dict]) -> None:
    traces = all_traces(uri, experiment)
    by_call: dict[str, int] = {}
    for r in records:
        by_call[r["litellm_call_id"]] = by_call.get(r["litellm_call_id"], 0) + 1
    assert sorted(t.info.tags["litellm.call_id"] for t in traces) == sorted(by_call)
    assert sum(len(t.data.spans) for t in traces) == sum(1 if n == 1 else n + 1 for n in by_call.values())


def test_cron_runs_forget_files_deleted_not_those_renamed_or_compressed_and_one_back_is_read_again_doubling_nothing(
    tmp_path: Path, capture: list[dict]
) -> None:
    logs = tmp_path / "logs"
    files = per_call_files(capture, logs, 6)
    everything = [r for _, recs in files for r in recs]
    uri, experiment = f"sqlite:///{tmp_path / 'mlflow.db'}", "forget"

    def run() -> dict:
        """A cron run, a look's grace (1 s) after the last one."""
        time.sleep(1.1)
        opts = RunOptions(paths=[str(logs)], tracking_uri=uri, experiment_name=experiment, state_dir=tmp_path / "st", forget_gone_s=1.0)
        return run_incremental(opts, "batch").as_dict()

    assert run()["records_read"] == len(everything)
    (logs / "kept").mkdir()
    shutil.copy2(files[0][0], logs / "kept" / "calls-0.jsonl")  # the user keeps a copy aside
    files[0][0].unlink()
    files[1][0].unlink()
    files[2][0].rename(logs / "calls-2.jsonl.1")  # rotated: the same file, unchanged, under a new name
    with gzip.open(logs / "calls-3.jsonl.gz", "wb") as gz:  # compressed: the copy, the original deleted
        gz.write(files[3][0].read_bytes())
    files[3][0].unlink()
    first = run()
    assert (first["records_read"], first["files_forgotten"]) == (0, 0), "the first look finds them gone and waits"
    shown = CliRunner().invoke(main, ["status", "--json", "--state-dir", str(tmp_path / "st")])
    gone = {Path(r["path"]).name for r in json.loads(shown.output)["files"] if r["gone_since"]}
    assert gone == {"calls-1.jsonl"}, shown.output
    second = run()
    assert (second["records_read"], second["files_forgotten"]) == (0, 1), "calls-1 is gone: calls-0 lives on in kept/"
    state = json.loads(next((tmp_path / "st").glob("batch-*.json")).read_text())
    places = sorted(Path(c["path"]).name for c in state["checkpoints"])
    assert places == ["calls-0.jsonl", "calls-2.jsonl.1", "calls-3.jsonl.gz", "calls-4.jsonl", "calls-5.jsonl"], places
    assert run()["records_read"] == 0, "what is left is all known, under its new names"

    write_jsonl(logs / "calls-1.jsonl", files[1][1])  # the deleted file comes back (restored from a backup)
    back = run()
    assert back["records_read"] == len(files[1][1]) and back["files_forgotten"] == 0
    assert_once(uri, experiment, everything)


def test_a_daemon_forgets_the_files_deleted_under_it_not_those_rotated_and_a_restart_reads_nothing_again(
    tmp_path: Path, capture: list[dict], experiment_name: str
) -> None:
    """Per-call files deleted, one renamed, and a log rotated while closed (renamed, a new file made
    under its name), its rotated file deleted later: the daemon finds the renamed ones by their stat
    (the old name holds another file), forgets the deleted ones, and a restart reads nothing again."""
    logs = tmp_path / "logs"
    files = per_call_files(capture, logs, 6)
    log = logs / "proxy.jsonl"
    files[5][0].rename(log)
    everything = [r for _, recs in files for r in recs]
    later = [{**r, "litellm_call_id": f"later-{r['litellm_call_id']}", "id": f"later-{r['id']}"} for r in files[5][1]]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ("--forget-gone-after", "1", "--close-inactive", "0")
    d = Daemon(logs, uri, experiment_name, tmp_path / "state", *args).start()

    def settled(calls: int) -> None:
        wait_for(lambda: metric(d.metrics(), "litellm_ingest_traces_written_total") >= calls, 60, "every call written")
        wait_for(lambda: metric(d.metrics(), "litellm_ingest_files_open") == 0, 30, "every file read and closed")

    def forgotten() -> float:
        return metric(d.metrics(), "litellm_ingest_files_forgotten_total")

    try:
        settled(len({r["litellm_call_id"] for r in everything}))
        files[0][0].unlink()
        files[1][0].unlink()
        files[2][0].rename(logs / "calls-2.jsonl.1")
        log.rename(logs / "proxy.jsonl.1")
        write_jsonl(log, later)
        settled(len({r["litellm_call_id"] for r in [*everything, *later]}))
        wait_for(lambda: forgotten() >= 2, 30, "the deleted files forgotten")
        time.sleep(2.5)  # two looks at least
        assert forgotten() == 2, "the renamed ones are not gone"
        (logs / "proxy.jsonl.1").unlink()
        wait_for(lambda: forgotten() >= 3, 30, "the rotated log's checkpoint forgotten once it is deleted")
        time.sleep(1.5)
        assert forgotten() == 3
    finally:
        assert d.stop() == 0
    said = re.findall(r"forgot the checkpoints of (\d+) file\(s\) gone", d.log.read_text())
    assert sum(map(int, said)) == 3, d.log.read_text()[-3000:]
    again = Daemon(logs, uri, experiment_name, tmp_path / "state", *args).start()
    try:
        time.sleep(2)
        assert metric(again.metrics(), "litellm_ingest_records_read_total") == 0
    finally:
        assert again.stop() == 0
    assert_once(uri, experiment_name, [*everything, *later])
