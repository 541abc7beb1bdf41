"""The state file: its format pinned, and a state that cannot be trusted said so loudly, never
silently read as empty. Real `litellm-ingest batch` / `status` processes and a real SQLite store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ingest.checkpoints import STATE_VERSION, Checkpoint, State
from tests.conftest import copies, run_cli, sqlite_trace_count, write_log

# A version-1 document exactly as `State.save` wrote it (json.dump, indent=1); the current format is
# pinned byte for byte in tests/test_follow.py.
STATE_V1 = """{
 "version": 1,
 "mode": "batch",
 "destination": {
  "tracking_uri": "sqlite:////var/lib/mlflow.db",
  "experiment_id": "1"
 },
 "checkpoints": [
  {
   "fingerprint": "sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
   "path": "/var/log/litellm/requests.jsonl.1",
   "offset": 48213,
   "line": 7,
   "held": [
    [
     31000,
     5
    ],
    [
     40012,
     6
    ]
   ],
   "size": 52000,
   "updated_at": "2026-11-27T10:00:00+00:00",
   "done": false,
   "tail": "9a8b7c6d5e4f"
  },
  {
   "fingerprint": "sha256:aa@0123456789ab",
   "path": "/var/log/litellm/requests.jsonl.2.gz",
   "offset": 9000,
   "line": 3,
   "held": [],
   "size": 2100,
   "updated_at": null,
   "done": true,
   "tail": null
  }
 ],
 "last_run": {
  "started": "2026-11-27T10:00:00+00:00",
  "finished": "2026-11-27T10:00:05+00:00",
  "result": "ok"
 },
 "extra": {}
}"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k not in ("COLUMNS", "LINES")}
    proc = run_cli(list(args), cwd, env)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def ingested(tmp_path: Path, capture: list[dict]) -> tuple[list[str], Path, Path]:
    """A batch run done: its arguments (to run again), its state file, its store."""
    recs = copies(capture, 1, "state")[0]
    log = write_log(tmp_path / "logs" / "calls.jsonl", recs)
    db = tmp_path / "store.db"
    args = [
        "batch",
        str(log),
        "--tracking-uri",
        f"sqlite:///{db}",
        "--experiment-name",
        "state",
        "--state-dir",
        str(tmp_path / "st"),
        "--json",
    ]
    first = run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (state,) = (tmp_path / "st").glob("batch-*.json")
    return args, state, db


def test_a_version_1_state_reads_back_to_the_same_checkpoints_and_is_written_back_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "batch-000000000000.json"
    path.write_text(STATE_V1)
    doc = json.loads(STATE_V1)
    state = State.load(path, "batch", doc["destination"])
    assert list(state.checkpoints.values()) == [
        Checkpoint(
            fingerprint="sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
            path="/var/log/litellm/requests.jsonl.1",
            offset=48213,
            line=7,
            size=52000,
            updated_at="2026-11-27T10:00:00+00:00",
            done=False,
            tail="9a8b7c6d5e4f",
            legacy_held=[(31000, 5), (40012, 6)],
        ),
        Checkpoint("sha256:aa@0123456789ab", "/var/log/litellm/requests.jsonl.2.gz", 9000, 3, 2100, None, True, None),
    ]
    assert state.last_run == doc["last_run"] and state.extra == {} and state.corrupt_copy is None
    state.save()
    saved = json.loads(path.read_text())
    assert saved["version"] == STATE_VERSION == 3 and saved["held"] == [] and saved["recent"] == []
    assert saved["checkpoints"][0] == doc["checkpoints"][0]
    assert saved["checkpoints"][1] == {k: v for k, v in doc["checkpoints"][1].items() if k != "held"}
    assert State.load(path, "batch", doc["destination"]).checkpoints == state.checkpoints
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_a_corrupt_state_is_copied_aside_said_on_stderr_and_in_the_summary_and_the_run_starts_afresh(
    tmp_path: Path, capture: list[dict]
) -> None:
    args, state, db = ingested(tmp_path, capture)
    traces = sqlite_trace_count(db)
    bad = state.read_bytes()[: state.stat().st_size // 2]
    state.write_bytes(bad)

    status = run("status", "--state-dir", str(state.parent), cwd=tmp_path)
    assert status.returncode == 7, status.stdout + status.stderr
    assert str(state) in status.stdout and "corrupt" in status.stdout, status.stdout

    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    (copy,) = state.parent.glob(f"{state.name}.corrupt-*")
    assert copy.read_bytes() == bad
    assert "corrupt" in again.stderr and str(copy) in again.stderr, again.stderr
    summary = json.loads(again.stdout)
    assert summary["state_corrupt_copy"] == str(copy)
    assert summary["records_read"] > 0, "started from an empty state: everything read again"
    assert sqlite_trace_count(db) == traces, "read again without a duplicate"
    assert json.loads(state.read_text())["version"] == STATE_VERSION

    status = run("status", "--state-dir", str(state.parent), "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["corrupt_copies"] == [str(copy)]


SHAPES = {
    "a checkpoint's path is a number": lambda d: {**d, "checkpoints": [{**c, "path": 5} for c in d["checkpoints"]]},
    "an offset is text": lambda d: {**d, "checkpoints": [{**c, "offset": "12"} for c in d["checkpoints"]]},
    "held is an object": lambda d: {**d, "held": {"a": 1}},
    "destination is text": lambda d: {**d, "destination": "x"},
    "mode is a number": lambda d: {**d, "mode": 3},
    "a held line of other types": lambda d: {**d, "held": [{"file": 1, "source": 2, "line": "x", "offset": None, "raw": 5}]},
}


@pytest.mark.parametrize("change", list(SHAPES), ids=list(SHAPES))
def test_a_state_of_whole_json_but_fields_of_other_types_is_corrupt_for_status_and_set_aside_by_a_run(
    tmp_path: Path, capture: list[dict], change: str
) -> None:
    """Only the top-level shape was checked: ``status`` died in a traceback, a run in "unexpected
    TypeError" (exit 1), and a held line of other types was dropped without a word."""
    args, state, db = ingested(tmp_path, capture)
    traces = sqlite_trace_count(db)
    state.write_text(json.dumps(SHAPES[change](json.loads(state.read_text()))))

    status = run("status", "--state-dir", str(state.parent), cwd=tmp_path)
    assert status.returncode == 7 and "Traceback" not in status.stderr, status.stdout + status.stderr
    assert str(state) in status.stdout and "corrupt" in status.stdout, status.stdout

    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert json.loads(again.stdout)["state_corrupt_copy"] is not None
    assert sqlite_trace_count(db) == traces


def _damage_pages(path: Path) -> None:
    """Garbage over every page after the first: the header still says SQLite, the tables do not."""
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    data[page:] = bytes(range(256)) * ((len(data) - page) // 256 + 1)
    path.write_bytes(bytes(data[: max(len(data), 2 * page)]))


def test_a_corrupt_ledger_is_set_aside_and_its_items_are_read_again(tmp_path: Path, caplog) -> None:
    from ingest.ledger import Ledger, items_frame

    path = tmp_path / "batch-x.ledger.sqlite"
    ledger = Ledger(path)
    items = items_frame([f"day={i % 7}/{i:06d}.json" for i in range(3000)], ["v1"] * 3000, ["2026-11-27"] * 3000)
    ledger.mark("s3://b/logs", items)
    assert ledger.new("s3://b/logs", items).height == 0
    ledger.close()
    _damage_pages(path)
    damaged = path.read_bytes()

    with caplog.at_level("WARNING", logger="ingest.ledger"):
        again = Ledger(path)
    kept = sorted(p.name for p in tmp_path.glob("*.corrupt-*"))
    assert [n.split(".corrupt-")[0] for n in kept] == ["batch-x.ledger.sqlite"], kept
    assert (tmp_path / kept[0]).read_bytes() == damaged
    assert "corrupt" in caplog.text and kept[0] in caplog.text
    assert again.new("s3://b/logs", items).height == 3000, "a lost ledger re-reads (ids are deterministic), it skips nothing"
    again.mark("s3://b/logs", items.head(10))
    assert again.count() == 10
    again.close()
    from ingest.checkpoints import corrupt_copies

    assert [p.name for p in corrupt_copies(tmp_path)] == kept


def test_corrupt_state_databases_do_not_stop_the_cron_job_for_good(tmp_path: Path, capture: list[dict]) -> None:
    """The ledger and the nesting queue beside a state: one not a database at all, one with damaged
    pages; the next run sets both aside, says so, and neither loses nor doubles a trace."""
    args, state, db = ingested(tmp_path, capture)
    traces = sqlite_trace_count(db)
    ledger, queue = state.with_suffix(".ledger.sqlite"), state.with_suffix(".nest.sqlite")
    assert ledger.exists() and queue.exists()
    ledger.write_bytes(b"\x00garbage, not SQLite" * 100)
    _damage_pages(queue)

    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{ledger} is corrupt" in again.stderr and f"{queue} is corrupt" in again.stderr, again.stderr
    assert sqlite_trace_count(db) == traces
    status = run("status", "--state-dir", str(state.parent), "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    kept = json.loads(status.stdout)["corrupt_copies"]
    assert {Path(k).name.split(".corrupt-")[0] for k in kept} >= {ledger.name, queue.name}, kept
    assert run(*args, cwd=tmp_path).returncode == 0, "and the run after is quiet"


def test_a_run_that_finds_the_state_locked_leaves_its_databases_alone(tmp_path: Path, capture: list[dict]) -> None:
    """Only the run holding the state's lock may set a corrupt database aside: one that exits with
    code 5 must not move the file the working run has open."""
    import fcntl

    args, state, _ = ingested(tmp_path, capture)
    ledger = state.with_suffix(".ledger.sqlite")
    ledger.write_bytes(b"not SQLite")
    with state.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = run(*args, cwd=tmp_path)
    assert second.returncode == 5, second.stderr
    assert ledger.read_bytes() == b"not SQLite" and not list(state.parent.glob("*.corrupt-*"))


def test_a_state_from_a_newer_version_stops_the_run_with_code_7_and_is_left_as_it_is(tmp_path: Path, capture: list[dict]) -> None:
    args, state, _ = ingested(tmp_path, capture)
    newer = json.loads(state.read_text()) | {"version": STATE_VERSION + 1}
    state.write_text(json.dumps(newer))
    before = state.read_bytes()

    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("litellm-ingest: error: ") and "newer" in lines[0] and str(state) in lines[0], lines
    assert state.read_bytes() == before
    assert not list(state.parent.glob("*.corrupt-*"))

    status = run("status", "--state-dir", str(state.parent), "--json", cwd=tmp_path)
    assert status.returncode == 7
    (shown,) = json.loads(status.stdout)["runs"]
    assert shown["state_file"] == str(state) and "newer" in shown["problem"]


def test_an_unreadable_state_stops_the_run_with_code_7_and_is_left_as_it_is(tmp_path: Path, capture: list[dict]) -> None:
    """Root reads any file, so unreadable here is a directory where the state file should be."""
    args, state, _ = ingested(tmp_path, capture)
    state.unlink()
    state.mkdir()
    (state / "keep").write_text("x")

    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read the state file" in lines[0] and str(state) in lines[0], lines
    assert (state / "keep").read_text() == "x"

    status = run("status", "--state-dir", str(state.parent), cwd=tmp_path)
    assert status.returncode == 7 and "cannot read" in status.stdout, status.stdout + status.stderr


def test_a_state_that_cannot_be_written_stops_the_run_with_code_7_and_the_next_run_loses_and_doubles_nothing(
    tmp_path: Path, capture: list[dict]
) -> None:
    """A full disk under the state dir (its tmp file on /dev/full): one line naming the file and exit 7,
    never a checkpoint past what MLflow has; what was written meanwhile is sent again later, changing
    nothing. It was a traceback from deep in the ledger or the JSON writer."""
    args, state, db = ingested(tmp_path, capture)
    calls_before = sqlite_trace_count(db)
    more = copies(capture, 2, "state-more")[1]
    with (tmp_path / "logs" / "calls.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in more)
    state.with_suffix(".json.tmp").symlink_to("/dev/full")

    full = run(*args, cwd=tmp_path)
    assert full.returncode == 7, full.stdout + full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot write the state file {state}: No space left on device" in lines[0], lines

    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    calls = calls_before + len({r["litellm_call_id"] for r in more})
    assert sqlite_trace_count(db) == calls == calls_before + json.loads(again.stdout)["calls"]
    assert json.loads(run(*args, cwd=tmp_path).stdout)["records_read"] == 0


def test_a_complete_tmp_file_left_by_a_crash_is_preferred_over_a_corrupt_state(tmp_path: Path, capture: list[dict]) -> None:
    args, state, _ = ingested(tmp_path, capture)
    shutil.copy(state, state.with_suffix(".json.tmp"))
    state.write_text('{"version": 1, "checkpoints": [')

    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["records_read"] == 0, "continued from the tmp file's checkpoints"
    assert "corrupt" not in again.stderr and not list(state.parent.glob("*.corrupt-*"))


def test_a_store_deleted_and_made_anew_at_the_same_path_gets_every_call_again(tmp_path: Path, capture: list[dict]) -> None:
    """The quick start run twice with ``rm mlflow.db`` between: the new store's experiment has the
    old one's id, and a state that only knew the id skipped every line (0 traces, exit 0)."""
    args, _, db = ingested(tmp_path, capture)
    traces = sqlite_trace_count(db)
    assert traces > 0 and json.loads(run(*args, cwd=tmp_path).stdout)["records_read"] == 0
    db.unlink()
    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["state_replaced"] and "created anew" in again.stderr
    assert sqlite_trace_count(db) == traces == summary["traces_written"]
    third = json.loads(run(*args, cwd=tmp_path).stdout)
    assert third["records_read"] == 0 and third["state_replaced"] is None, "the state now belongs to the new store"


def test_a_server_tells_when_the_experiment_was_created_whether_it_creates_or_finds_it(mlflow_server) -> None:
    """What tells a store made anew from the old one through a server: the experiment's creation
    time, on the path that creates it and on the one that finds it."""
    from ingest.sink import resolve_target

    name = f"anew-{time.time_ns()}"
    before = int(time.time() * 1000)
    created = resolve_target(mlflow_server.url, name, None)
    found = resolve_target(mlflow_server.url, name, None)
    by_id = resolve_target(mlflow_server.url, None, created.experiment_id)
    assert created.created_ms is not None and before - 5_000 <= created.created_ms <= int(time.time() * 1000) + 5_000
    assert created.created_ms == found.created_ms == by_id.created_ms


def test_a_state_naming_a_file_whose_name_is_not_utf8_is_saved_and_read_back(tmp_path: Path) -> None:
    """A log file name with bytes that are not UTF-8 is a str with surrogates: orjson refuses it, so
    the state is written by ``json`` instead, and reads back the same."""
    path = tmp_path / "batch-x.json"
    state = State(path, "batch", {"tracking_uri": "sqlite:///x.db", "experiment_id": "1"})
    odd = os.fsdecode(b"/var/log/litellm/caf\xe9.jsonl")
    state.checkpoints["sha256:ab"] = Checkpoint("sha256:ab", odd, offset=10, line=2)
    state.held = [{"file": "sha256:ab", "source": odd, "line": 1, "offset": 0, "raw": '{"content": "caf\u00e9 \u2603"}'}]
    state.save()
    again = State.load(path, "batch", state.destination)
    assert again.checkpoints["sha256:ab"].path == odd and again.held == state.held
    plain = tmp_path / "batch-y.json"
    state.path = plain
    state.checkpoints["sha256:ab"].path = "/var/log/litellm/caf\u00e9.jsonl"
    state.held = [h | {"source": "/var/log/litellm/caf\u00e9.jsonl"} for h in state.held]
    state.save()
    assert "caf\u00e9" in plain.read_text(encoding="utf-8"), "written as UTF-8 by orjson"
    assert State.load(plain, "batch", state.destination).held == state.held


def status_of(state_dir: Path, *extra: str) -> tuple[int, str]:
    """``status --state-dir`` in process: its exit code and output."""
    from click.testing import CliRunner

    from ingest.cli import main

    result = CliRunner().invoke(main, ["status", "--state-dir", str(state_dir), *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, result.output


ACCEPTED = {
    "no field but the version": ({"version": 3}, {"mode": "batch", "files": 0}),
    "a checkpoint with no offset": (
        {"version": 3, "mode": "batch", "checkpoints": [{"fingerprint": "sha256:0123456789abcdef0123", "path": "/no/such.jsonl"}]},
        {"mode": "batch", "files": 1, "offset": 0},
    ),
    "a summary that is no object": (
        {"version": 3, "mode": "batch", "last_run": {"summary": "x", "result": "ok"}},
        {"mode": "batch", "files": 0},
    ),
    "a files database named, no checkpoints listed": (
        {"version": 3, "mode": "batch", "files_db": {"generation": "g"}},
        {"mode": "batch", "files": 0},
    ),
}


@pytest.mark.parametrize("case", list(ACCEPTED), ids=list(ACCEPTED))
def test_status_reads_a_state_a_run_accepts_as_the_run_reads_it(tmp_path: Path, case: str) -> None:
    """Fields a run defaults (a checkpoint's offset, the mode, the checkpoint list) were indexed by
    ``status``: a KeyError or AttributeError traceback, exit 1, over a state the runs go on using."""
    doc, shown = ACCEPTED[case]
    (tmp_path / "batch-0123456789ab.json").write_text(json.dumps(doc))
    code, out = status_of(tmp_path, "--json")
    assert code == 0, out
    report = json.loads(out)
    assert [r["mode"] for r in report["runs"]] == [shown["mode"]] and "problem" not in report["runs"][0]
    assert len(report["files"]) == shown["files"]
    if "offset" in shown:
        assert report["files"][0]["offset"] == shown["offset"]
    code, out = status_of(tmp_path)
    assert code == 0 and "unexpected" not in out, out


def test_status_shows_the_state_a_run_would_load_a_whole_tmp_file_winning(tmp_path: Path) -> None:
    """A run killed between writing its state's tmp file and the rename leaves the newer state in
    ``<state>.json.tmp``, and the next run loads it; ``status`` showed the older one beside it (a lag
    the next run did not read), and a state never renamed at all not at all."""
    ck = {"fingerprint": "sha256:0123456789abcdef0123", "path": str(tmp_path / "a.jsonl"), "offset": 10}
    older = {"version": 3, "mode": "batch", "checkpoints": [ck], "last_run": {"result": "ok", "started": "older"}}
    newer = {**older, "checkpoints": [{**ck, "offset": 20}], "last_run": {"result": "ok", "started": "newer"}}
    (tmp_path / "batch-0123456789ab.json").write_text(json.dumps(older))
    (tmp_path / "batch-0123456789ab.json.tmp").write_text(json.dumps(newer))
    (tmp_path / "backfill-ba9876543210.json.tmp").write_text(json.dumps({**newer, "mode": "backfill"}))
    (tmp_path / "batch-ffffffffffff.json").write_text(json.dumps(older))
    (tmp_path / "batch-ffffffffffff.json.tmp").write_text(json.dumps(newer)[:-9])  # torn: the rename never came
    state = State.load(tmp_path / "batch-0123456789ab.json", "batch", {})
    assert state.checkpoints[ck["fingerprint"]].offset == 20, "what a run loads"
    code, out = status_of(tmp_path, "--json")
    assert code == 0, out
    runs = {Path(r["state_file"]).name: r for r in json.loads(out)["runs"]}
    assert sorted(runs) == ["backfill-ba9876543210.json", "batch-0123456789ab.json", "batch-ffffffffffff.json"]
    assert runs["batch-0123456789ab.json"]["started"] == "newer" and runs["backfill-ba9876543210.json"]["started"] == "newer"
    assert runs["batch-ffffffffffff.json"]["started"] == "older"
    assert sorted(f["offset"] for f in json.loads(out)["files"]) == [10, 20, 20]


def test_status_says_a_files_database_lost_its_checkpoints(tmp_path: Path) -> None:
    """A state of more than a thousand files keeps their checkpoints in ``<state>.files.sqlite``; with
    it deleted or corrupt every run warns and reads those files again, while ``status`` listed no
    file and said nothing."""
    doc = {"version": 3, "mode": "batch", "checkpoints": [], "files_db": {"generation": "g", "files": 1005}, "last_run": {"result": "ok"}}
    (tmp_path / "batch-0123456789ab.json").write_text(json.dumps(doc))
    code, out = status_of(tmp_path, "--json")
    assert code == 0 and json.loads(out)["runs"][0]["files_lost"] == 1005, out
    code, out = status_of(tmp_path)
    assert code == 0 and "lost 1005 file checkpoint(s)" in out and "reads those files again" in out, out


def test_status_of_a_state_dir_it_may_not_list_fails_with_exit_7(tmp_path: Path, capture: list[dict]) -> None:
    """A state dir this user may not read was "no state in …", exit 0: as if nothing was ever
    ingested, while a run over it fails (exit 7)."""
    from tests.test_cli import unprivileged

    state = tmp_path / "state"
    state.mkdir()
    (state / "batch-0123456789ab.json").write_text(json.dumps({"version": 3, "mode": "batch"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"LITELLM_INGEST_STATE_DIR": str(state)}
    exe = str(Path(shutil.which("litellm-ingest") or "litellm-ingest"))
    state.chmod(0o300)
    try:
        proc = subprocess.run(unprivileged([exe, "status", "--json"]), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        state.chmod(0o755)
    assert proc.returncode == 7 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert f"cannot read the state dir {state}: Permission denied" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
