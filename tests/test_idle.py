"""A cron run with nothing new is answered from its state, without loading MLflow (:mod:`ingest.idle`),
and says what the full run would have said; anything to do, or any doubt, goes to the full run."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingest import pipeline
from ingest.checkpoints import State
from ingest.ledger import NEST_QUEUE_SUFFIX
from ingest.nesting import NestQueue
from ingest.pipeline import RunOptions, run_incremental
from ingest.sink import SinkError
from tests.conftest import MlflowServer, Postgres, free_port, reidentify, sqlite_trace_count, write_jsonl

VARYING = ("seconds", "records_per_second")
"""What differs between two runs that did the same."""


class Runs:
    """Cron runs of one folder into one SQLite store, counting those that opened MLflow."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.logs, self.db, self.state_dir = tmp_path / "logs", tmp_path / "mlflow.db", tmp_path / "st"
        self.uri, self.experiment = f"sqlite:///{self.db}", "idle"
        self.opened = 0
        real = pipeline.open_target

        def counted(*a, **kw):  # type: ignore[no-untyped-def]
            self.opened += 1
            return real(*a, **kw)

        monkeypatch.setattr(pipeline, "open_target", counted)

    def run(self, **kw: object) -> dict:
        opts = RunOptions(paths=[str(self.logs)], tracking_uri=self.uri, experiment_name=self.experiment, state_dir=self.state_dir, **kw)  # type: ignore[arg-type]
        return run_incremental(opts, "batch").as_dict()

    @property
    def state_path(self) -> Path:
        (path,) = self.state_dir.glob("batch-*.json")
        return path

    def last_run(self) -> dict:
        return json.loads(self.state_path.read_text())["last_run"]


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capture: list[dict]) -> Runs:
    r = Runs(tmp_path, monkeypatch)
    calls = reidentify(capture, shift_s=-86400)
    write_jsonl(r.logs / "a.jsonl", calls[:20])
    write_jsonl(r.logs / "b.jsonl", calls[20:])
    first = r.run()
    assert (r.opened, first["records_read"]) == (1, len(calls))
    return r


def without(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in VARYING}


def test_a_run_with_nothing_new_opens_no_mlflow_and_says_what_the_full_run_says(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    traces = sqlite_trace_count(runs.db)
    (runs.logs / "b.jsonl").rename(runs.logs / "b.jsonl.1")  # rotated while no run was looking: the same file
    (runs.logs / "b.jsonl").touch()  # and logrotate's `create`: a new file the proxy has not written yet
    before = runs.last_run()["finished"]
    idle = runs.run()
    assert runs.opened == 1, "nothing new: MLflow is not opened"
    assert (idle["files"], idle["files_unchanged"], idle["files_skipped"], idle["records_read"], idle["result"]) == (3, 2, 1, 0, "ok")
    assert runs.last_run()["finished"] >= before and runs.last_run()["summary"] == idle
    st = State.load(runs.state_path, "batch", json.loads(runs.state_path.read_text())["destination"])
    assert sorted(Path(c.path).name for c in st.checkpoints.values()) == ["a.jsonl", "b.jsonl.1"], "the checkpoint follows the rename"

    monkeypatch.setattr("ingest.idle.idle_run", lambda *a: None)
    full = runs.run()
    assert runs.opened == 2
    assert without(full) == without(idle)
    assert sqlite_trace_count(runs.db) == traces


def test_an_experiment_given_by_id_is_found_as_by_name(runs: Runs, capture: list[dict]) -> None:
    exp_id = runs.run()["experiment_id"]
    assert runs.opened == 1
    opts = RunOptions(paths=[str(runs.logs)], tracking_uri=runs.uri, experiment_id=exp_id, state_dir=runs.state_dir)
    assert run_incremental(opts, "batch").records_read == 0
    assert runs.opened == 1


@pytest.mark.parametrize("change", ["appended", "new file", "held", "nest queue", "corrupt state"])
def test_anything_to_do_goes_to_the_full_run(runs: Runs, capture: list[dict], change: str, caplog: pytest.LogCaptureFixture) -> None:
    more = reidentify(capture[:3], shift_s=-3600)
    expected_traces = sqlite_trace_count(runs.db)
    records = 0
    kw: dict = {}
    if change == "appended":
        with (runs.logs / "a.jsonl").open("a") as f:
            f.write(json.dumps(more[0]) + "\n")
        records, expected_traces = 1, expected_traces + 1
    elif change == "new file":
        write_jsonl(runs.logs / "c.jsonl", more)
        records, expected_traces = len(more), expected_traces + len({r["litellm_call_id"] for r in more})
    elif change == "held":
        failed = [r for r in capture if r["status"] == "failure"][:2]
        write_jsonl(runs.logs / "c.jsonl", reidentify(failed, shift_s=time.time() - max(r["endTime"] for r in failed) - 5))
        first = runs.run()  # failed seconds ago: held for a retry (--settle)
        assert first["calls_held"] > 0 and runs.opened == 2
        records = len(failed)  # read again from the state
    elif change == "nest queue":
        queue = NestQueue(runs.state_path.with_suffix(NEST_QUEUE_SUFFIX))
        queue.put([("tr-" + "a" * 32, "tr-" + "b" * 32, time.time_ns() // 1000 + 86_400_000_000, [])])  # waits a day
        queue.close()
    elif change == "corrupt state":
        runs.state_path.write_text('{"version": ')
        records = sum(1 for p in runs.logs.iterdir() for _ in p.open())
    opened = runs.opened
    summary = runs.run(**kw)
    assert runs.opened == opened + 1, f"{change}: the full run"
    assert summary["records_read"] == records
    assert sqlite_trace_count(runs.db) == expected_traces
    if change == "corrupt state":
        assert len(list(runs.state_dir.glob("*.corrupt-*"))) == 1, "set aside once, by the full run"
        assert sum("is corrupt" in r.message for r in caplog.records) == 1
    if change != "held":
        assert runs.run()["records_read"] == 0 and runs.opened == opened + (2 if change == "nest queue" else 1), "then idle again"


@pytest.mark.parametrize("where", ["last line", "first line"])
def test_a_line_waiting_for_its_newline_is_answered_idle_until_it_ends_or_the_file_goes_quiet(
    runs: Runs, capture: list[dict], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A line without its newline is read once it ends, or once its file is unchanged for
    ``--partial-timeout`` (then quarantined if bad): until then the full run reads nothing of it, so
    the runs in between are idle. They went to the full path (MLflow loaded) every time."""
    more = reidentify(capture[:2], shift_s=-3600)
    head = json.dumps(more[0]) + "\n" if where == "last line" else ""
    line = json.dumps(more[1])
    full = int(bool(head))  # a file's first run is a full one when it has a line to read
    c = runs.logs / "c.jsonl"
    c.write_text(head + line[: len(line) // 2])
    first = runs.run()
    assert (runs.opened, first["records_read"], first["files_skipped"]) == (1 + full, full, 1)
    idle = runs.run()
    assert runs.opened == 1 + full, "the line still waits: nothing to read"
    assert (idle["records_read"], idle["files_skipped"], idle["result"]) == (0, 1, "ok")
    with monkeypatch.context() as m:
        m.setattr("ingest.idle.idle_run", lambda *a: None)
        assert without(runs.run()) == without(idle), "what the full run says"
    with c.open("a") as f:
        f.write(line[len(line) // 2 :] + "\n")
    ended = runs.run()
    assert (runs.opened, ended["records_read"], ended["files_skipped"]) == (3 + full, 1, 0)
    with c.open("a") as f:
        f.write(json.dumps(reidentify(capture[:1], salt=f"whole-{where}")[0]))  # a whole record, no newline yet
    assert runs.run()["records_read"] == 1 and runs.opened == 4 + full, "read at once, as the full run reads it"
    d = runs.logs / "d.jsonl"
    d.write_text(head.replace(more[0]["litellm_call_id"], "d-first") + '{"litellm_call_id": "cut-short", "startTime": 1')
    runs.run()
    runs.run()
    assert runs.opened == 4 + 2 * full, "read once if it has a line, then idle"
    if head:  # renamed while its line waits: the checkpoint follows it, as the full run's follow() moves it
        d = d.rename(d.with_name("d.jsonl.1"))
        runs.run(forget_gone_s=1e-6)
        runs.run(forget_gone_s=1e-6)
        assert runs.opened == 4 + 2 * full, "still nothing to read"
        st = State.load(runs.state_path, "batch", json.loads(runs.state_path.read_text())["destination"])
        (ck,) = [c for c in st.checkpoints.values() if Path(c.path).name.startswith("d.")]
        assert (Path(ck.path).name, ck.gone_at) == ("d.jsonl.1", None), "not taken for gone, nor forgotten"
        st.close()
    os.utime(d, (time.time() - 400, time.time() - 400))  # unchanged past --partial-timeout (300 s)
    quiet = runs.run()
    assert (runs.opened, quiet["quarantined"], quiet["files_skipped"]) == (5 + 2 * full, 1, 0), "the full run quarantines it"
    assert runs.run()["records_read"] == 0 and runs.opened == 5 + 2 * full
    assert sqlite_trace_count(runs.db) == len({r["litellm_call_id"] for r in capture}) + 2 + 2 * full


def test_a_deleted_experiment_is_said_by_the_full_run(runs: Runs) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(runs.uri)
    client.delete_experiment(client.get_experiment_by_name(runs.experiment).experiment_id)
    with pytest.raises(Exception, match="is deleted"):
        runs.run()
    assert runs.opened == 2


BLOCKED = "import sys; sys.modules['mlflow'] = None; sys.argv[0] = 'litellm-ingest'; from ingest.cli import run; run()"
"""The command line with MLflow made unimportable: any import of it fails."""


def test_a_cron_run_with_nothing_new_runs_without_mlflow_and_one_with_work_does_not(runs: Runs, capture: list[dict]) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": runs.uri, "MLFLOW_EXPERIMENT_NAME": runs.experiment}
    args = ["batch", str(runs.logs), "--state-dir", str(runs.state_dir), "--json"]

    idle = subprocess.run([sys.executable, "-c", BLOCKED, *args], env=env, capture_output=True, text=True, timeout=120)
    assert idle.returncode == 0, idle.stderr
    assert json.loads(idle.stdout)["files_unchanged"] == 2

    with open(runs.state_path.with_suffix(".lock"), "a+") as lock:  # a run is working
        fcntl.flock(lock, fcntl.LOCK_EX)
        locked = subprocess.run([sys.executable, "-c", BLOCKED, *args], env=env, capture_output=True, text=True, timeout=120)
    assert locked.returncode == 5 and "another run holds the lock" in locked.stderr, locked.stderr

    write_jsonl(runs.logs / "c.jsonl", reidentify(capture[:1], shift_s=-3600))
    blocked = subprocess.run([sys.executable, "-c", BLOCKED, *args], env=env, capture_output=True, text=True, timeout=120)
    assert blocked.returncode != 0, "with work to do, the run needs MLflow: the block is real"
    full = subprocess.run([sys.executable, "-m", "ingest", *args], env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    assert json.loads(full.stdout)["traces_written"] == 1

    runs.db.unlink()  # rm mlflow.db, and something makes the store and the experiment again (same id, not the traces)
    made = f"from mlflow import MlflowClient; MlflowClient({runs.uri!r}).create_experiment({runs.experiment!r})"
    subprocess.run([sys.executable, "-c", made], env=env, check=True, capture_output=True, timeout=120)
    anew = subprocess.run([sys.executable, "-c", BLOCKED, *args], env=env, capture_output=True, text=True, timeout=120)
    assert anew.returncode != 0, "an experiment made anew is the full run's to find"
    again = subprocess.run([sys.executable, "-m", "ingest", *args], env=env, capture_output=True, text=True, timeout=300)
    summary = json.loads(again.stdout)
    assert summary["state_replaced"] and summary["records_read"] == sum(1 for p in runs.logs.iterdir() for _ in p.open())
    assert sqlite_trace_count(runs.db) == summary["traces_written"] > 0


def test_a_store_that_is_no_mlflow_store_goes_to_the_full_run(tmp_path: Path) -> None:
    from ingest.idle import sqlite_target

    db = tmp_path / "other.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE t (x)")
    assert sqlite_target(f"sqlite:///{db}", "idle", None) is None
    (tmp_path / "not-a-db.db").write_text("hello")
    assert sqlite_target(f"sqlite:///{tmp_path / 'not-a-db.db'}", "idle", None) is None
    assert sqlite_target(f"sqlite:///{tmp_path / 'missing.db'}", "idle", None) is None
    assert sqlite_target("postgresql://u@localhost/db", "idle", None) is None


class ServerRuns(Runs):
    """The same cron runs, into an MLflow server."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
        super().__init__(tmp_path, monkeypatch)
        self.uri, self.experiment = url, f"idle-{tmp_path.name[-24:]}"


@pytest.fixture
def server_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capture: list[dict], mlflow_server: MlflowServer) -> ServerRuns:
    r = ServerRuns(tmp_path, monkeypatch, mlflow_server.url)
    write_jsonl(r.logs / "a.jsonl", reidentify(capture[:6], shift_s=-86400))
    assert r.run()["traces_written"] > 0 and r.opened == 1, "no experiment of that name yet: the full run makes it"
    return r


def test_a_cron_run_into_a_server_with_nothing_new_asks_it_without_mlflow(server_runs: ServerRuns, capture: list[dict]) -> None:
    """The server is asked for the experiment (so a deleted one is said, as the full run says it), with
    MLflow's credentials read as MLflow reads them; nothing new, nothing else is sent."""
    r = server_runs
    env = {**os.environ, "MLFLOW_TRACKING_URI": r.uri, "MLFLOW_EXPERIMENT_NAME": r.experiment}
    args = ["batch", str(r.logs), "--state-dir", str(r.state_dir), "--json"]
    idle = subprocess.run([sys.executable, "-c", BLOCKED, *args], env=env, capture_output=True, text=True, timeout=120)
    assert idle.returncode == 0, idle.stderr
    assert (json.loads(idle.stdout)["files_unchanged"], json.loads(idle.stdout)["experiment_name"]) == (1, r.experiment)

    write_jsonl(r.logs / "b.jsonl", reidentify(capture[6:7], shift_s=-3600))
    blocked = subprocess.run([sys.executable, "-c", BLOCKED, *args], env=env, capture_output=True, text=True, timeout=120)
    assert blocked.returncode != 0, "with work to do, the run needs MLflow: the block is real"
    assert r.run()["traces_written"] == 1 and r.opened == 2

    from mlflow import MlflowClient

    client = MlflowClient(r.uri)
    client.delete_experiment(client.get_experiment_by_name(r.experiment).experiment_id)
    deleted = subprocess.run([sys.executable, "-c", BLOCKED, *args], env=env, capture_output=True, text=True, timeout=120)
    full = subprocess.run([sys.executable, "-m", "ingest", *args], env=env, capture_output=True, text=True, timeout=300)
    assert deleted.returncode == full.returncode == 4, (deleted.stderr, full.stderr)
    assert deleted.stderr == full.stderr and "is deleted" in full.stderr


def test_a_server_that_cannot_be_reached_is_waited_for_once(server_runs: ServerRuns) -> None:
    """The lookup is the full run's own: its failure ends the run, not a second wait in the full run."""
    server_runs.uri = f"http://127.0.0.1:{free_port()}"  # the server moved away
    with pytest.raises(SinkError, match="cannot reach MLflow"):
        server_runs.run(mlflow_timeout_s=0.5)
    assert server_runs.opened == 1


def test_a_cron_run_into_postgresql_with_nothing_new_reads_it_without_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capture: list[dict], postgres: Postgres
) -> None:
    """The experiment is read with SQLAlchemy alone. While another session holds the experiments
    table (a migration, a frozen host's silence), the run waits ``--mlflow-timeout`` (10 s at least)
    and ends as the full run would, without a second wait in it."""
    import sqlalchemy

    r = ServerRuns(tmp_path, monkeypatch, postgres.new_database())
    write_jsonl(r.logs / "a.jsonl", reidentify(capture[:6], shift_s=-86400))
    assert r.run()["traces_written"] > 0 and r.opened == 1
    env = {**os.environ, "MLFLOW_TRACKING_URI": r.uri, "MLFLOW_EXPERIMENT_NAME": r.experiment}
    args = ["batch", str(r.logs), "--state-dir", str(r.state_dir), "--json"]
    idle = subprocess.run([sys.executable, "-c", BLOCKED, *args], env=env, capture_output=True, text=True, timeout=120)
    assert idle.returncode == 0, idle.stderr
    assert json.loads(idle.stdout)["files_unchanged"] == 1

    engine = sqlalchemy.create_engine(r.uri)
    with engine.connect() as holder:
        holder.execute(sqlalchemy.text("LOCK TABLE experiments IN ACCESS EXCLUSIVE MODE"))
        with pytest.raises(SinkError, match=r"cannot open the MLflow store .*has not answered"):
            r.run(mlflow_timeout_s=0.5)
        assert r.opened == 1, "one wait, the lookup's: the full run was not started to wait again"
    engine.dispose()

    write_jsonl(r.logs / "b.jsonl", reidentify(capture[6:7], shift_s=-3600))
    blocked = subprocess.run([sys.executable, "-c", BLOCKED, *args], env=env, capture_output=True, text=True, timeout=120)
    assert blocked.returncode != 0, "with work to do, the run needs MLflow: the block is real"
    assert r.run()["traces_written"] == 1 and r.opened == 2
    assert r.run()["records_read"] == 0 and r.opened == 2


def test_a_postgresql_that_is_no_mlflow_store_goes_to_the_full_run(postgres: Postgres) -> None:
    """No schema yet, a table of that name that is not MLflow's, an id MLflow never gives: the full
    run makes, refuses or says them."""
    import sqlalchemy

    from ingest.sink import postgresql_target

    uri = postgres.new_database()
    assert postgresql_target(uri, "idle", None, 5) is None
    engine = sqlalchemy.create_engine(uri)
    with engine.begin() as con:
        con.execute(sqlalchemy.text("CREATE TABLE experiments (x int)"))
    engine.dispose()
    assert postgresql_target(uri, "idle", None, 5) is None
    assert postgresql_target(uri, None, "not-a-number", 5) is None
    assert postgresql_target("postgresql+nosuchdriver://u@127.0.0.1/db", "idle", None, 5) is None


def test_a_tls_setting_mlflow_would_refuse_is_said_as_such(tmp_path: Path, capture: list[dict]) -> None:
    write_jsonl(tmp_path / "logs" / "a.jsonl", capture[:1])
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "MLFLOW_TRACKING_INSECURE_TLS": "yes"}
    args = [sys.executable, "-m", "ingest", "batch", str(tmp_path / "logs"), "--state-dir", str(tmp_path / "st")]
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 4 and "MLFLOW_TRACKING_INSECURE_TLS value must be one of" in p.stderr, p.stderr
    assert "a bug" not in p.stderr and "Traceback" not in p.stderr
