"""A state of more files than its document keeps (a synced per-call bucket): their checkpoints are
settled into the files database beside it, and each save writes only what changed. In process,
with the threshold lowered; tests/test_backfill.py runs a real backfill past the real one."""

from __future__ import annotations

import gc
import json
import logging
import sqlite3
from pathlib import Path

import pytest

from ingest import checkpoints
from ingest.checkpoints import FILES_DB_SUFFIX, Checkpoint, State, StateError, all_states

DESTINATION = {"tracking_uri": "sqlite:////var/lib/mlflow.db", "experiment_id": "1"}


@pytest.fixture(autouse=True)
def few(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoints, "SETTLE_ABOVE", 3)


def state_of(path: Path, n: int) -> State:
    st = State(path, "batch", DESTINATION)
    for i in range(n):
        key = f"sha256:{i:02d}"
        st.checkpoints[key] = Checkpoint(key, f"/logs/day={i}/{i}.json", offset=10 * (i + 1), line=i + 2, size=10 * (i + 1))
    return st


def document(st: State) -> dict:
    return json.loads(st.path.read_text())


def rows(st: State) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(st.path.with_suffix(FILES_DB_SUFFIX)) as db:
        return {fp: (gen, json.loads(doc)["offset"]) for fp, gen, doc in db.execute("SELECT fingerprint, generation, doc FROM files")}


def load(st: State) -> State:
    return State.load(st.path, st.mode, st.destination)


def test_past_the_threshold_a_save_writes_only_the_checkpoints_that_moved_and_a_load_has_them_all(tmp_path: Path) -> None:
    small = state_of(tmp_path / "small.json", 3)
    small.save()
    assert len(document(small)["checkpoints"]) == 3 and "files_db" not in document(small)
    assert not small.path.with_suffix(FILES_DB_SUFFIX).exists()

    st = state_of(tmp_path / "batch-a.json", 5)
    st.save()
    doc = document(st)
    assert len(doc["checkpoints"]) == 5, "the first document holds them all: the database has none yet"
    generation = doc["files_db"]["generation"]
    assert doc["files_db"]["files"] == 5
    assert rows(st) == {f"sha256:{i:02d}": (generation, 10 * (i + 1)) for i in range(5)}

    st.save()
    assert document(st)["checkpoints"] == [], "settled: nothing moved since"
    st.checkpoints["sha256:02"].offset = 999
    st.checkpoints["sha256:new"] = Checkpoint("sha256:new", "/logs/new.json", offset=5)
    st.save()
    assert [c["fingerprint"] for c in document(st)["checkpoints"]] == ["sha256:02", "sha256:new"]
    assert document(st)["files_db"] == {"generation": generation, "files": 6}
    assert rows(st)["sha256:02"] == (generation, 999)

    again = load(st)
    assert again.checkpoints == st.checkpoints
    assert set(again.checkpoints.changed) == {"sha256:02", "sha256:new"}, "what the document held is settled again"
    again.save()
    again.save()
    assert document(again)["checkpoints"] == [] and load(again).checkpoints == st.checkpoints


def live(st: State) -> int:
    """This state's checkpoints alive in memory, whoever holds them."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Checkpoint and o.__dict__.get("_owner") is st.checkpoints)


def test_a_settled_checkpoint_no_one_holds_is_let_go_and_read_again_when_asked(tmp_path: Path) -> None:
    """A daemon over a folder of per-call files kept every file's checkpoint in memory for its life
    (about half a kilobyte each). Settled and unchanged, one nobody else holds is let go; one still
    held (a file being followed) is the one given out, and a change to it is saved."""
    st = state_of(tmp_path / "batch-a.json", 50)
    assert live(st) == 50, "none settled yet"
    st.save()
    assert live(st) == 0 and len(st.checkpoints) == 50, "settled in the database the first save made"

    held = st.checkpoints["sha256:07"]
    assert st.checkpoints["sha256:07"] is held and live(st) == 1
    held.offset = 4242
    st.save()
    assert [c["offset"] for c in document(st)["checkpoints"]] == [4242]
    assert st.checkpoints["sha256:07"] is held
    held.line = 99
    st.save()
    assert [(c["offset"], c["line"]) for c in document(st)["checkpoints"]] == [(4242, 99)], "changed again after it was settled"
    del held
    assert live(st) == 0
    assert (st.checkpoints["sha256:07"].offset, st.checkpoints["sha256:07"].line) == (4242, 99)

    st.checkpoints["sha256:new"] = Checkpoint("sha256:new", "/logs/new.json", offset=5)
    assert len(st.checkpoints) == 51
    st.save()
    st.save()
    assert live(st) == 0 and len(st.checkpoints) == 51 and document(st)["files_db"]["files"] == 51
    assert {k: c.offset for k, c in st.checkpoints.items()} == {k: c.offset for k, c in load(st).checkpoints.items()}
    assert len(st.checkpoints.values()) == 51 and st.checkpoints["sha256:new"].offset == 5

    again = load(st)
    again.save()
    assert live(again) == 0, "as after a load"
    assert {k: c.offset for k, c in again.checkpoints.items()} == {k: c.offset for k, c in st.checkpoints.items()}


def test_a_checkpoint_replaced_by_another_of_the_same_key_is_the_one_written(tmp_path: Path) -> None:
    st = state_of(tmp_path / "batch-a.json", 5)
    st.save()
    old = st.checkpoints["sha256:01"]
    st.checkpoints["sha256:01"] = Checkpoint("sha256:01", "/logs/again.json", offset=3)
    old.offset = 12345
    st.save()
    assert [(c["path"], c["offset"]) for c in document(st)["checkpoints"]] == [("/logs/again.json", 3)]
    assert load(st).checkpoints["sha256:01"].offset == 3


def test_a_crash_between_the_document_and_the_database_loses_no_move(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = state_of(tmp_path / "batch-a.json", 5)
    st.save()
    st.checkpoints["sha256:01"].offset = 777
    with monkeypatch.context() as m:
        m.setattr(State, "_settle", lambda self: None)  # the process dies just after the document's rename
        st.save()
    assert rows(st)["sha256:01"][1] == 20
    assert load(st).checkpoints["sha256:01"].offset == 777, "the document is newer than the database, and wins"

    st.checkpoints["sha256:03"].offset = 888
    with monkeypatch.context() as m:
        m.setattr(checkpoints.State, "_settle", _raising)
        with pytest.raises(StateError, match="checkpoints database"):
            st.save()
    assert load(st).checkpoints["sha256:03"].offset == 888
    st.save()
    assert {c["fingerprint"] for c in document(st)["checkpoints"]} == {"sha256:01", "sha256:03"}, "kept until settled"
    st.save()
    assert document(st)["checkpoints"] == [] and rows(st)["sha256:03"][1] == 888


def _raising(self: State) -> None:
    raise StateError(f"cannot write the checkpoints database {self.db_path}: disk I/O error")


def test_rows_of_another_generation_are_never_read(tmp_path: Path) -> None:
    """A state file deleted to start over, or a state bound to an experiment made anew: the rows
    beside it belonged to the old one, and would skip files the new store never got."""
    st = state_of(tmp_path / "batch-a.json", 5)
    st.experiment_created = 1
    st.save()
    st.path.unlink()
    assert load(st).checkpoints == {}

    st.save()
    before = document(st)["files_db"]["generation"]
    fresh = load(st)
    assert fresh.bind(2) and fresh.checkpoints == {}
    for i in range(4):
        fresh.checkpoints[f"sha256:n{i}"] = Checkpoint(f"sha256:n{i}", f"/logs/n{i}.json", offset=1)
    fresh.save()
    assert document(fresh)["files_db"]["generation"] != before
    assert set(load(fresh).checkpoints) == {f"sha256:n{i}" for i in range(4)}
    assert set(rows(fresh)) == {f"sha256:n{i}" for i in range(4)}, "the old generation's rows are dropped"

    fresh.bind(3)
    fresh.checkpoints["sha256:one"] = Checkpoint("sha256:one", "/logs/one.json", offset=1)
    fresh.save()
    assert "files_db" not in document(fresh) and set(load(fresh).checkpoints) == {"sha256:one"}


def test_a_missing_or_corrupt_files_database_is_said_and_its_files_are_read_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    st = state_of(tmp_path / "batch-a.json", 5)
    st.save()
    st.checkpoints["sha256:00"].offset = 1
    st.save()
    st.close()
    db = st.path.with_suffix(FILES_DB_SUFFIX)
    for p in tmp_path.glob(db.name + "*"):
        p.unlink()
    with caplog.at_level(logging.WARNING):
        gone = load(st)
    assert set(gone.checkpoints) == {"sha256:00"} and gone.settled_lost == 4
    assert "4 file checkpoints fewer" in caplog.text

    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE files (fingerprint TEXT PRIMARY KEY, generation TEXT NOT NULL, doc TEXT NOT NULL)")
        gen = document(st)["files_db"]["generation"]
        rows_in = [("sha256:01", gen, '{"fingerprint": "sha256:01", "path": "/x", "offset": "many"}'), ("sha256:02", gen, "[1]")]
        con.executemany("INSERT INTO files VALUES (?, ?, ?)", [*rows_in, ("sha256:03", gen, '{"fingerprint": "sha256:03", "path": "/y"}')])
    odd = load(st)
    assert odd.settled_lost == 1, "counted, not read: a row that is no checkpoint is found when its file is looked up"
    assert odd.checkpoints.get("sha256:01") is None, "rows that are no checkpoint are left out"
    assert set(odd.checkpoints) == {"sha256:00", "sha256:03"}
    odd.checkpoints["sha256:01"] = Checkpoint("sha256:01", "/x", offset=1)
    assert len(odd.checkpoints) == 4, "its row was counted: a checkpoint in its place is no new file"
    odd.close()
    for p in tmp_path.glob(db.name + "*"):
        p.unlink()
    db.write_bytes(b"not a database" * 100)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        corrupt = load(st)
    assert set(corrupt.checkpoints) == {"sha256:00"} and "cannot be used" in caplog.text
    corrupt.checkpoints["sha256:00"].offset = 2
    corrupt.save()
    settled = corrupt.checkpoints._settled
    assert settled is not None and settled.get("sha256:00").offset == 2, "a checkpoint let go is read from the database made anew"
    corrupt.close()
    assert list(tmp_path.glob(db.name + ".corrupt-*")), "set aside, as a corrupt ledger is"
    assert load(st).checkpoints["sha256:00"].offset == 2


def test_a_files_database_that_cannot_be_read_stops_the_run_and_status_says_so(tmp_path: Path) -> None:
    st = state_of(tmp_path / "batch-a.json", 5)
    st.save()
    st.close()
    db = st.path.with_suffix(FILES_DB_SUFFIX)
    for p in tmp_path.glob(db.name + "*"):
        p.unlink()
    db.mkdir()
    with pytest.raises(StateError, match="cannot read the checkpoints database"):
        load(st)
    (problem,) = all_states(tmp_path)
    assert "checkpoints database" in problem["problem"]


def test_status_lists_the_settled_checkpoints_with_the_document_s_own(tmp_path: Path) -> None:
    st = state_of(tmp_path / "batch-a.json", 5)
    st.save()
    st.checkpoints["sha256:04"].offset = 4444
    st.save()
    (doc,) = all_states(tmp_path)
    assert sorted((c["fingerprint"], c["offset"]) for c in doc["checkpoints"]) == sorted((k, c.offset) for k, c in st.checkpoints.items())


_KILLED_MID_WRITE = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=DELETE")
db.execute("PRAGMA cache_size=2")
db.execute("BEGIN IMMEDIATE")
db.executemany("INSERT INTO files VALUES (?, 'other', ?)", [(f"spill:{i}", "x" * 2000) for i in range(500)])
print("spilled", flush=True)
time.sleep(60)
"""


def test_a_hot_journal_a_killed_writer_left_is_rolled_back_not_a_stop(tmp_path: Path) -> None:
    """A writer SIGKILLed while it switched a new files database to WAL (a backfill killed as it began
    settling) leaves a hot rollback journal, which a read-only connection refuses
    (SQLITE_READONLY_ROLLBACK): the re-run, ``status`` and the ledger's readers had said "cannot read the
    checkpoints database" for ever. The journal is rolled back: the committed rows are read, the
    killed transaction's are not."""
    import signal
    import subprocess
    import sys

    from ingest.ledger import Ledger, nest_pending

    st = state_of(tmp_path / "batch-a.json", 5)
    st.save()
    st.close()
    db = st.path.with_suffix(FILES_DB_SUFFIX)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_MID_WRITE, str(db)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "spilled"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert db.with_name(db.name + "-journal").exists(), "a hot journal is left"

    (doc,) = all_states(tmp_path)
    assert "problem" not in doc and len(doc["checkpoints"]) == 5
    assert set(load(st).checkpoints) == {f"sha256:{i:02d}" for i in range(5)}
    assert all(gen != "other" for gen, _ in rows(st).values()), "the killed transaction is rolled back"

    ledger_ddl = "CREATE TABLE items (source TEXT, at TEXT); CREATE TABLE meta (source TEXT, name TEXT, value TEXT)"
    for name, ddl, insert in (
        (".ledger.sqlite", ledger_ddl, "items VALUES (?, ?)"),
        (".nest.sqlite", "CREATE TABLE pending (doc TEXT, at TEXT)", "pending VALUES (?, ?)"),
    ):
        path = st.path.with_suffix(name)
        with sqlite3.connect(path) as con:
            con.executescript(ddl)
            con.execute(f"INSERT INTO {insert}", ("s3://a", "2026-01-01"))
        con.close()
        script = _KILLED_MID_WRITE.replace("files VALUES (?, 'other', ?)", insert)
        child = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "spilled"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert path.with_name(path.name + "-journal").exists()
    assert [(d["source"], d["items"]) for d in Ledger.describe(st.path)] == [("s3://a", 1)]
    assert nest_pending(st.path) == 1


def test_a_run_reads_the_settled_checkpoints_of_the_files_it_sees_not_every_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cron run over a synced per-call bucket (old files deleted) had read every checkpoint ever
    settled into objects at each load: 100k of them were 2.6 s and 358 MB a run, growing for ever.
    They are looked up by key and by stat key, as its files need; a walk still has them all."""
    from ingest.follow import Follower, stat_key

    logs = tmp_path / "logs"
    logs.mkdir()
    seen = [logs / f"{i}.json" for i in range(3)]
    for p in seen:
        p.write_text("{}\n")
    st = state_of(tmp_path / "batch-a.json", 60)
    for i, p in enumerate(seen[:2]):
        st.checkpoints[f"sha256:{i:02d}"].end_stat = stat_key(p.stat())
    st.checkpoints["sha256:59"].end_stat = "1:2:3:4"
    st.save()
    st.save()
    with sqlite3.connect(st.path.with_suffix(FILES_DB_SUFFIX)) as db:
        db.execute("DROP INDEX IF EXISTS files_end_stat")  # as a version before the look-ups wrote it

    built: list[str] = []
    from_dict = Checkpoint.from_dict.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Checkpoint, "from_dict", classmethod(lambda cls, d: built.append(d["fingerprint"]) or from_dict(cls, d)))
    again = load(st)
    assert built == [] and len(again.checkpoints) == 60 and again.settled_lost == 0
    with again.locked():
        follower = Follower(again, None)  # type: ignore[arg-type]
        assert {p.name: c.fingerprint for p, c in follower.unchanged(seen).items()} == {"0.json": "sha256:00", "1.json": "sha256:01"}
        assert again.checkpoints["sha256:30"].offset == 310 and "sha256:99" not in again.checkpoints
        follower.park_stamped()
        assert follower.parked == {stat_key(p.stat()) for p in seen[:2]} | {"1:2:3:4"}
        assert sorted(built) == ["sha256:00", "sha256:01", "sha256:30"], "only the checkpoints of the files seen are read"
        again.checkpoints["sha256:new"] = Checkpoint("sha256:new", "/logs/new.json", offset=1)
        again.checkpoints["sha256:30"].offset = 1
        again.save()
    assert document(again)["files_db"]["files"] == 61
    with sqlite3.connect(st.path.with_suffix(FILES_DB_SUFFIX)) as db:
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'files_end_stat'").fetchone(), "an older database is indexed"
    built.clear()
    assert len(set(load(st).checkpoints)) == 61 and len(set(built)) == 61, "a walk (status) still has them all"
