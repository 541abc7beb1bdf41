"""The `litellm-ingest` command as a user runs it: real exit codes, real stores, real servers; the
script itself where the process matters (start-up, signals, limits, the quick start)."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    SAMPLE_LOGS,
    MlflowServer,
    all_traces,
    copies,
    copy_samples,
    fill,
    free_port,
    run_cli,
    start_mlflow_server,
    write_jsonl,
)

EXE = shutil.which("litellm-ingest") or str(Path(sys.executable).parent / "litellm-ingest")


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180, process: bool = False
) -> subprocess.CompletedProcess:
    """The command as cron runs it (no MLflow variables but ``env``); in this process unless
    ``process`` (see ``run_cli``)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    full_env.update(env or {})
    if process:
        return subprocess.run([EXE, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return run_cli(list(args), cwd, full_env, timeout)


def nonblank_lines(path: Path) -> int:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return sum(1 for line in data.split(b"\n") if line.strip())


def assert_one_clean_error_line(proc: subprocess.CompletedProcess, code: int, needle: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("litellm-ingest: error: ") and needle in lines[0], lines[0]


def test_default_store_is_local_sqlite_mlflow_db_that_mlflow_reads(tmp_path: Path, capture: list[dict]) -> None:
    proc = run("batch", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--json", cwd=tmp_path, process=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (tmp_path / "mlflow.db").exists()
    assert summary["tracking_uri"] == "sqlite:///mlflow.db"
    assert summary["experiment_name"] == "LiteLLM Proxy"
    traces = all_traces(f"sqlite:///{tmp_path / 'mlflow.db'}", "LiteLLM Proxy")
    assert len(traces) == summary["traces_written"] == summary["calls"] > 0


def test_env_vars_pick_server_and_experiment(mlflow_server, tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_EXPERIMENT_NAME": "from env var"}
    proc = run("batch", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(all_traces(mlflow_server.url, "from env var")) == json.loads(proc.stdout)["traces_written"] > 0
    assert not (tmp_path / "mlflow.db").exists()


def test_flags_override_env_vars(mlflow_server, tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_EXPERIMENT_NAME": "ignored"}
    proc = run(
        "batch",
        str(SAMPLE_LOGS / "proxy_calls.jsonl"),
        "--tracking-uri",
        mlflow_server.url,
        "--experiment-name",
        "from flag",
        "--json",
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["experiment_name"] == "from flag"
    assert len(all_traces(mlflow_server.url, "from flag")) > 0


def test_json_summary_counts_and_exit_code_for_quarantine(tmp_path: Path) -> None:
    q = tmp_path / "q.jsonl"
    proc = run(
        "batch",
        str(SAMPLE_LOGS),
        "--json",
        "--partial-timeout",
        "0",
        "--quarantine-file",
        str(q),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 's.db'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr
    s = json.loads(proc.stdout)
    bad_lines = sum(1 for _ in q.open())
    assert s["quarantined"] == bad_lines == sum(s["quarantined_by_reason"].values()) > 0
    assert s["records_read"] == sum(nonblank_lines(f) for f in SAMPLE_LOGS.iterdir() if ".json" in f.name)
    assert s["calls"] == s["traces_written"] == 45
    for rec in map(json.loads, q.open()):
        assert {"source", "line", "offset", "reason", "raw"} <= set(rec)
        assert Path(rec["source"]).name == "bad_input.jsonl"


def test_the_summary_names_the_quarantine_file_whole_without_a_terminal(tmp_path: Path) -> None:
    """Cron and pipes have no terminal: the summary was laid out for 80 columns and the quarantine
    file's path cut to an ellipsis; with --no-state the JSON result said "ok" beside exit 3."""
    q = tmp_path / ("a-long-folder-name-as-a-home-under-cron-may-have" * 2) / "quarantine.jsonl"
    store = ["--tracking-uri", f"sqlite:///{tmp_path / 's.db'}", "--partial-timeout", "0"]
    proc = run("batch", str(SAMPLE_LOGS), *store, "--quarantine-file", str(q), cwd=tmp_path)
    assert proc.returncode == 3 and q.exists(), proc.stderr
    assert f"-> {q}\n" in proc.stdout and not any(line != line.rstrip() for line in proc.stdout.splitlines()), proc.stdout
    stateless = run("batch", str(SAMPLE_LOGS), *store, "--no-state", "--json", cwd=tmp_path)
    assert stateless.returncode == 3 and json.loads(stateless.stdout)["result"] == "quarantined"


def test_clean_input_exits_zero_and_quiet_prints_nothing(tmp_path: Path) -> None:
    proc = run("batch", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "-q", "--tracking-uri", f"sqlite:///{tmp_path / 's.db'}", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc


def test_dry_run_builds_everything_and_writes_nothing(tmp_path: Path) -> None:
    proc = run("batch", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--dry-run", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["calls"] > 0 and s["traces_written"] == 0 and s["dry_run"] is True
    assert not (tmp_path / "mlflow.db").exists()


def test_a_dry_run_names_the_experiment_a_run_would_write_to(tmp_path: Path) -> None:
    """Without --experiment-name its summary said ``experiment None``, not the default a real run takes
    (nor "spans written 0" beside the traces it would write)."""
    logs = str(SAMPLE_LOGS / "proxy_calls.jsonl")
    proc = run("batch", logs, "--dry-run", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["experiment_name"] == "LiteLLM Proxy", proc.stdout + proc.stderr
    proc = run("batch", logs, "--dry-run", cwd=tmp_path, env={"MLFLOW_EXPERIMENT_NAME": "from env"})
    assert proc.returncode == 0 and "experiment 'from env'" in proc.stdout, proc.stdout + proc.stderr
    assert re.search(r"^traces \(dry run\) +25$", proc.stdout, re.M) and "spans written" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("command", ["batch", "backfill"])
def test_a_dry_run_quarantines_into_no_file_unless_given_one(tmp_path: Path, command: str) -> None:
    """A dry run counts the bad lines and writes no quarantine file of the state's: it appended them
    there, and the real run after it appended them again (each bad line quarantined twice)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(SAMPLE_LOGS / "bad_input.jsonl", logs)
    os.utime(logs / "bad_input.jsonl", (1_700_000_000, 1_700_000_000))
    store, state = ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], ["--state-dir", str(tmp_path / "st")]
    dry = run(command, str(logs), *store, *state, "--dry-run", "--json", cwd=tmp_path)
    assert dry.returncode == 3 and "Traceback" not in dry.stderr, dry.stderr
    bad = json.loads(dry.stdout)["quarantined"]
    assert bad > 0 and not (tmp_path / "st" / "quarantine.jsonl").exists() and not (tmp_path / "m.db").exists()
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").iterdir()), "a dry run leaves nothing in the state dir"
    assert json.loads(dry.stdout)["state_file"] is None and json.loads(dry.stdout)["result"] == "quarantined"
    said = run(command, str(logs), *store, *state, "--dry-run", cwd=tmp_path)
    assert re.search(r"^quarantined +\d+ .* -> not written \(dry run\)$", said.stdout, re.M), said.stdout

    asked = run(command, str(logs), *store, *state, "--dry-run", "--quarantine-file", str(tmp_path / "q.jsonl"), cwd=tmp_path)
    assert asked.returncode == 3 and len((tmp_path / "q.jsonl").read_text().splitlines()) == bad

    real = run(command, str(logs), *store, *state, "--json", cwd=tmp_path)
    assert real.returncode == 3, real.stderr
    assert len((tmp_path / "st" / "quarantine.jsonl").read_text().splitlines()) == json.loads(real.stdout)["quarantined"] == bad

    # a dry run takes no lock: it neither fails for a run holding it nor makes a run fail (it reads
    # that run's state, so nothing is new: exit 0)
    (lock,) = (tmp_path / "st").glob(f"{command}-*.lock")
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run(command, str(logs), *store, *state, "--dry-run", "-q", cwd=tmp_path).returncode == 0
        assert run(command, str(logs), *store, *state, "-q", cwd=tmp_path).returncode == 5


def test_a_file_named_twice_is_read_once(tmp_path: Path) -> None:
    """Relative and absolute, through a symlinked folder, and in a folder given with it."""
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(SAMPLE_LOGS / "proxy_calls.jsonl", logs)
    (tmp_path / "alias").symlink_to(logs)
    names = ["logs/proxy_calls.jsonl", str(logs / "proxy_calls.jsonl"), "alias/proxy_calls.jsonl", "logs"]
    proc = run("batch", *names, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--no-state", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["files"] == 1 and s["records_read"] == nonblank_lines(logs / "proxy_calls.jsonl")
    assert s["traces_written"] == s["calls"] == len(all_traces(f"sqlite:///{tmp_path / 'm.db'}", "LiteLLM Proxy"))


def test_a_state_dir_under_the_log_folder_is_never_read_as_logs(tmp_path: Path) -> None:
    """Its quarantine file was read as logs: every run quarantined it again (exit 3), more each time;
    reconcile counted it, and tail followed it (each line it wrote came back as another)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("proxy_calls.jsonl", "bad_input.jsonl"):
        shutil.copy(SAMPLE_LOGS / name, logs)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    env = {"LITELLM_INGEST_STATE_DIR": str(logs / ".ingest")}
    first = run("batch", str(logs), "--tracking-uri", uri, "--partial-timeout", "0", "--json", cwd=tmp_path, env=env)
    assert first.returncode == 3 and json.loads(first.stdout)["quarantined"] > 0, first.stderr
    quarantined = (logs / ".ingest" / "quarantine.jsonl").read_text()
    again = run("batch", str(logs), "--tracking-uri", uri, "--json", cwd=tmp_path, env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["records_read"] == 0, again.stdout + again.stderr
    check = run("reconcile", str(logs / "*"), "--tracking-uri", uri, cwd=tmp_path, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen(
        [EXE, "tail", str(logs), "--tracking-uri", uri],
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(6)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "quarantine.jsonl" not in err, err
    assert (logs / ".ingest" / "quarantine.jsonl").read_text() == quarantined


def test_missing_file_is_one_clear_line_exit_2(tmp_path: Path) -> None:
    proc = run("batch", str(tmp_path / "nope.jsonl"), cwd=tmp_path)
    assert_one_clean_error_line(proc, 2, "no such file or directory")


def test_glob_with_no_match_is_a_usage_error(tmp_path: Path) -> None:
    proc = run("batch", str(tmp_path / "*.jsonl"), cwd=tmp_path)
    assert_one_clean_error_line(proc, 2, "no files match")


@pytest.mark.parametrize("command", ["batch", "reconcile"])
def test_a_glob_that_matches_folders_reads_them_as_folders(tmp_path: Path, command: str) -> None:
    """``/var/log/litellm-*`` over one folder per pod said "no files match" (it matched two folders),
    and ``logs/*`` read the files beside the folders and skipped the folders, without a word."""
    logs = tmp_path / "logs"
    for pod, name in (("pod-a", "proxy_calls.jsonl"), ("pod-b", "spend_logs_export.jsonl")):
        (logs / pod).mkdir(parents=True)
        shutil.copy(SAMPLE_LOGS / name, logs / pod)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert run("batch", str(logs), "--tracking-uri", uri, "--no-state", "-q", cwd=tmp_path).returncode == 0
    for spec in (str(logs / "pod-*"), str(logs / "*")):
        if command == "batch":
            proc = run("batch", spec, "--dry-run", "--json", cwd=tmp_path)
            assert proc.returncode == 0 and json.loads(proc.stdout)["files"] == 2, (spec, proc.stdout, proc.stderr)
        else:
            proc = run("reconcile", spec, "--tracking-uri", uri, "--json", cwd=tmp_path)
            report = json.loads(proc.stdout or "{}")
            assert proc.returncode == 0 and report["calls_in_logs"] == report["matched"] > 0, (spec, proc.stdout, proc.stderr)


@pytest.mark.parametrize(
    ("command", "pattern", "needle"), [("batch", "(", "not a valid regular expression"), ("tail", "x*", "empty string")]
)
def test_a_bad_scrub_pattern_is_a_usage_error_naming_it(tmp_path: Path, command: str, pattern: str, needle: str) -> None:
    proc = run(command, str(tmp_path), "--scrub-pattern", "EMP-\\d+", "--scrub-pattern", pattern, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--scrub-pattern" in proc.stderr and repr(pattern) in proc.stderr and needle in proc.stderr, proc.stderr


def test_an_added_scrub_pattern_is_scrubbed_from_the_traces(tmp_path: Path, capture: list[dict]) -> None:
    rec = json.loads(json.dumps(capture[18]))
    rec["request_tags"] = [*rec["request_tags"], "employee:EMP-48213"]
    log = write_jsonl(tmp_path / "p.jsonl", [rec])
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    proc = run(
        "batch", str(log), "--tracking-uri", uri, "--experiment-name", "x", "--no-state", "-q", "--scrub-pattern", r"EMP-\d+", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    (trace,) = all_traces(uri, "x")
    assert trace.info.tags["employee"].startswith("[REDACTED:")
    assert "EMP-48213" not in json.dumps([trace.info.to_dict(), [s.to_dict() for s in trace.data.spans]])


def test_unreachable_mlflow_is_one_clear_line_exit_4(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = run("batch", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--tracking-uri", url, "--mlflow-timeout", "1", cwd=tmp_path)
    assert_one_clean_error_line(proc, 4, "cannot reach MLflow")


@pytest.mark.parametrize("uri", ["./mlruns", "databricks", "sqlite:///", "sqlite:///:memory:", "sqlite://"])
def test_a_file_store_or_a_hosted_uri_is_refused_in_one_line_and_nothing_is_made(tmp_path: Path, uri: str) -> None:
    """MLflow's file store (the default before MLflow 3, re-enabled by MLFLOW_ALLOW_FILE_STORE) cannot
    hold spans: it was a traceback from deep in the writer, after the folder had been made. A SQLite
    URI naming no file wrote every trace into an in-memory database, gone at exit, and said exit 0."""
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true"}
    args = ["batch", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--mlflow-timeout", "2", "--state-dir", str(tmp_path / "st")]
    proc = run(*args, cwd=tmp_path, env=env)
    said = {"./mlruns": "file store, which cannot hold traces", "databricks": "is not supported"}.get(uri, "names no database file")
    assert_one_clean_error_line(proc, 4, said)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    assert not list((tmp_path / "st").glob("batch-*.json")), "no state says it ingested anything"


@pytest.mark.parametrize(
    ("command", "uri", "said"),
    [
        ("batch", "http://", "(no host)"),
        ("batch", "http://[::1", "(Invalid IPv6 URL)"),
        ("batch", "https://:99999", "(Port out of range"),
        ("batch", "http://mlflow:port", "(Port could not be cast"),
        ("batch", "http://mlflow..internal:5000", "(a label of the host name is empty or too long)"),
        ("batch", "http://ml flow:5000", "(Failed to parse: Host 'ml flow' contains invalid character"),
        ("reconcile", "http://", "(no host)"),
        ("tail", "http://", "(no host)"),
        ("batch --dry-run", "http://", "(no host)"),
    ],
)
def test_a_malformed_server_uri_is_refused_in_one_line_as_a_uri_that_names_no_store(
    tmp_path: Path, command: str, uri: str, said: str
) -> None:
    """No host, a port that is no port, a host name no request can go to: exit 1, which says a bug
    (and a dry run, which opens no destination, said exit 0 for a URI the real run refuses)."""
    command, *flags = command.split()
    args = [command, *flags, str(SAMPLE_LOGS if command == "tail" else SAMPLE_LOGS / "proxy_calls.jsonl"), "--mlflow-timeout", "1"]
    state = ["--state-dir", str(tmp_path / "st")] if command != "reconcile" else []
    proc = run(*args, *state, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert_one_clean_error_line(proc, 4, f"tracking URI {uri} is not a server's address {said}")
    assert not (tmp_path / "mlflow.db").exists()


def _another_apps_database(db: Path, what: str) -> None:
    import sqlite3

    if what == "text":
        db.write_text("name,email\nada,ada@example.com\n")
        return
    con = sqlite3.connect(db)
    if what == "rows":
        con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        con.executemany("INSERT INTO customers VALUES (?, ?)", [(i, f"n{i}") for i in range(1000)])
    elif what == "empty table":
        con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    elif what == "view":
        con.execute("CREATE VIEW customers AS SELECT 1 AS id")
    elif what == "beside mlflow tables":
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        con.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
        con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    con.commit()
    con.close()


@pytest.mark.parametrize("what", ["rows", "empty table", "view", "beside mlflow tables", "text"])
@pytest.mark.parametrize("command", ["batch", "reconcile"])
def test_a_sqlite_file_that_is_not_an_mlflow_store_is_left_alone_in_one_line(tmp_path: Path, what: str, command: str) -> None:
    """A mistyped --tracking-uri naming another application's database was taken for a store left
    half-created (MLflow's tables held no rows): renamed away, replaced by a new store, exit 0. A
    file that is no database at all was told to run `mlflow db upgrade`."""
    db = tmp_path / "app.db"
    _another_apps_database(db, what)
    before = db.read_bytes()
    args = [command, str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--tracking-uri", f"sqlite:///{db}", "--mlflow-timeout", "2"]
    proc = run(*args, *(["--state-dir", str(tmp_path / "st")] if command == "batch" else []), cwd=tmp_path)
    said = f"{db} is not an MLflow store: it holds tables MLflow does not make (customers)"
    if what == "text":
        said = f"{db} is not a SQLite database"
    assert_one_clean_error_line(proc, 4, said)
    assert "left alone" in proc.stderr and "mlflow db upgrade" not in proc.stderr
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("app.db")) == ["app.db"], "nothing of ours beside it"


def test_a_store_that_cannot_be_created_on_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path: Path, small_disk: Path) -> None:
    """MLflow's schema does not fit: one line, exit 4, and the half-built file is removed at once
    (it was left taking the disk's last bytes until a later run cleaned it)."""
    fill(small_disk)
    proc = run("batch", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--tracking-uri", f"sqlite:///{small_disk / 'm.db'}", cwd=tmp_path)
    assert_one_clean_error_line(proc, 4, f"{small_disk / 'm.db'}")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "m.db.ingest-lock"]


@pytest.mark.parametrize(
    "args",
    [
        ["batch", "--settle", "-5"],
        ["batch", "--mlflow-timeout", "-1"],
        ["batch", "--batch-size", "0"],
        ["backfill", "--nest-grace", "-1"],
        ["tail", "--metrics-port", "99999"],
        ["tail", "--max-line-bytes", "0"],
        ["tail", "--batch-wait", "-0.5"],
        ["reconcile", "--limit", "-1"],
    ],
)
def test_an_option_out_of_its_range_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    """A negative settle or timeout was taken as none, a port past 65535 was a traceback."""
    from click.testing import CliRunner

    from ingest.cli import main

    result = CliRunner().invoke(main, [*args, str(tmp_path)])
    assert result.exit_code == 2 and "is not in the range" in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["backfill", "reconcile"])
@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_bad_time_is_a_usage_error_naming_its_option(tmp_path: Path, command: str, option: str) -> None:
    """It said only "Invalid value": which of --since and --until was wrong was left to guess."""
    proc = run(command, str(SAMPLE_LOGS), option, "yesterday", cwd=tmp_path)
    assert proc.returncode == 2 and f"Invalid value for '{option}': not an ISO date or time: 'yesterday'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", ["backfill", "reconcile"])
@pytest.mark.parametrize("window", [("2026-12-01", "2026-11-01"), ("2026-11-27T14:02:00Z", "2026-11-27T15:02:00+01:00")])
def test_a_window_that_holds_no_time_is_a_usage_error(tmp_path: Path, command: str, window: tuple[str, str]) -> None:
    """--since at or after --until was taken: a backfill counted every call outside the window and
    wrote none (exit 0), a reconcile reported that the logs and MLflow agree."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = run(command, str(SAMPLE_LOGS), "--since", window[0], "--until", window[1], "--tracking-uri", uri, cwd=tmp_path)
    assert proc.returncode == 2 and "--since must be before --until" in proc.stderr, (proc.returncode, proc.stdout, proc.stderr)
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("command", ["batch", "backfill", "reconcile", "tail"])
def test_an_empty_path_is_a_usage_error_not_the_current_folder(tmp_path: Path, command: str) -> None:
    """``litellm-ingest batch "$LOG_DIR"`` with the variable unset read the current folder: its state
    files and anything else there were taken for logs (and quarantined), or tail followed it."""
    (tmp_path / "stray.jsonl").write_text("not a log\n")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = run(command, "", "--tracking-uri", uri, cwd=tmp_path, timeout=20)
    assert proc.returncode == 2 and "an empty path names nothing" in proc.stderr, (proc.returncode, proc.stdout, proc.stderr)
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("pattern", ["", "**/*.jsonl", "litellm/*.jsonl"])
def test_a_tail_pattern_that_can_match_no_file_name_is_a_usage_error(tmp_path: Path, pattern: str) -> None:
    """The pattern is matched against names: one with a folder in it, or an empty one, followed nothing, silently."""
    proc = run("tail", str(SAMPLE_LOGS), "--pattern", pattern, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path, timeout=20)
    assert proc.returncode == 2 and "can match no file name" in proc.stderr, (proc.returncode, proc.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ["batch", "--settle", "nan"],
        ["batch", "--settle", "inf"],
        ["batch", "--mlflow-timeout", "nan", "--tracking-uri", "http://127.0.0.1:9"],
        ["backfill", "--nest-grace", "nan"],
        ["batch", "--reread-window", "nan"],
        ["reconcile", "--until", "2026-01-01", "--settle", "inf"],
        ["tail", "--batch-wait", "nan"],
    ],
)
def test_a_number_that_is_not_finite_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    """nan passed every range check: --settle nan or inf was a traceback's one line (exit 1, "a bug"),
    --mlflow-timeout nan retried an unreachable server forever."""
    proc = run(*args[:1], str(SAMPLE_LOGS), *args[1:], cwd=tmp_path, timeout=30)
    assert proc.returncode == 2 and "is not a finite number" in proc.stderr, (proc.returncode, proc.stderr)


def test_a_metrics_port_in_use_is_one_line_exit_2(tmp_path: Path) -> None:
    import socket

    from click.testing import CliRunner

    from ingest.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["tail", "--metrics-port", str(port), "--state-dir", str(tmp_path / "st"), str(tmp_path)])
    assert result.exit_code == 2, result.stderr
    expected = f"litellm-ingest: error: cannot serve /metrics on 127.0.0.1:{port}: Address already in use"
    assert result.stderr.strip().splitlines() == [expected]


@pytest.mark.parametrize("kind", ["KeyError", "PanicException", "OSError"])
def test_an_unexpected_error_is_one_line_exit_1_and_its_traceback_only_with_v(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """PanicException is polars' report of an internal failure (out of descriptors, a bug): a
    BaseException, it went past ``except Exception`` as a traceback. An unforeseen OSError is one
    line too, and ``-v`` printed no traceback for it, as the README says it does for exit 1."""
    from click.testing import CliRunner
    from polars.exceptions import PanicException

    from ingest import pipeline
    from ingest.cli import main

    def broken(*args: object) -> None:
        if kind == "OSError":
            raise OSError(5, "Input/output error", "/some/file")
        raise KeyError("a bug") if kind == "KeyError" else PanicException("a bug")

    monkeypatch.setattr(pipeline, "run_batch", broken)
    args = ["batch", "--no-state", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", str(SAMPLE_LOGS / "proxy_calls.jsonl")]
    quiet = CliRunner().invoke(main, args)
    assert quiet.exit_code == 1 and "Traceback" not in quiet.stderr, quiet.stderr
    shown = "'a bug'" if kind == "KeyError" else "a bug"
    expected = f"litellm-ingest: error: unexpected {kind}: {shown} (a bug: please report it with the traceback -v prints)"
    if kind == "OSError":
        expected = "litellm-ingest: error: Input/output error: /some/file"
    assert quiet.stderr.strip().splitlines() == [expected]
    loud = CliRunner().invoke(main, ["-v", *args])
    raised = "raise OSError" if kind == "OSError" else "raise KeyError"
    assert loud.exit_code == 1 and "Traceback" in loud.stderr and raised in loud.stderr


def test_unknown_experiment_id_is_refused_not_silently_accepted(mlflow_server, tmp_path: Path) -> None:
    proc = run(
        "batch", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--tracking-uri", mlflow_server.url, "--experiment-id", "987654", cwd=tmp_path
    )
    assert_one_clean_error_line(proc, 4, "experiment id 987654 does not exist")


def test_an_experiment_name_and_id_that_name_two_experiments_are_refused(tmp_path: Path) -> None:
    """MLflow's own client (LiteLLM's callback's) refuses the pair; the id won here, without a word,
    and the calls went to another experiment than the name the user set."""
    from mlflow import MlflowClient

    db = tmp_path / "m.db"
    uri = f"sqlite:///{db}"
    logs = str(SAMPLE_LOGS / "proxy_calls.jsonl")
    first = run("batch", logs, "--no-state", "-q", "--tracking-uri", uri, "--experiment-name", "A", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    other = MlflowClient(uri).create_experiment("B")
    env = {"MLFLOW_TRACKING_URI": f" {uri}\n", "MLFLOW_EXPERIMENT_NAME": "A", "MLFLOW_EXPERIMENT_ID": other}
    proc = run("batch", logs, "--no-state", cwd=tmp_path, env=env)
    assert_one_clean_error_line(proc, 4, f"experiment id {other} is 'B', not 'A'")
    assert all_traces(uri, "B") == []
    # the URI's spaces and newline were the env file's; a sqlite URI with a query is still that file
    agrees = run("reconcile", logs, "--tracking-uri", f"{uri}?timeout=20", "--experiment-name", "A", cwd=tmp_path)
    assert agrees.returncode == 0, agrees.stdout + agrees.stderr
    assert not [p.name for p in tmp_path.iterdir() if "\n" in p.name], "no file named after the newline"


def test_an_empty_experiment_variable_is_no_variable(tmp_path: Path) -> None:
    """``MLFLOW_EXPERIMENT_ID=`` (a compose file's ``${VAR}`` with nothing behind it) was taken for
    experiment "0", MLflow's Default: every call was written a second time, into another experiment."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    logs = str(SAMPLE_LOGS / "proxy_calls.jsonl")
    for env in ({}, {"MLFLOW_EXPERIMENT_ID": "", "MLFLOW_EXPERIMENT_NAME": ""}, {"MLFLOW_EXPERIMENT_ID": " "}):
        proc = run("batch", logs, "--state-dir", str(tmp_path / "st"), "-q", "--tracking-uri", uri, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
    calls = {json.loads(x)["litellm_call_id"] for x in Path(logs).read_text().splitlines()}
    assert len(all_traces(uri, "LiteLLM Proxy", include_spans=False)) == len(calls)
    assert all_traces(uri, "Default", include_spans=False) == []


def test_the_generic_api_loggers_batches_as_a_receiver_keeps_them_give_the_jsonls_traces(tmp_path: Path, capture: list[dict]) -> None:
    """LiteLLM's generic API logger POSTs JSON arrays of records: a receiver that appends each body as
    a line, or keeps one file per body (no final newline), gives the traces the JSONL gives."""
    from ingest.ids import mlflow_trace_id, otel_trace_id

    bodies = tmp_path / "bodies"
    bodies.mkdir()
    with (bodies / "appended.log").open("w") as f:
        for i in range(0, 24, 6):
            f.write(json.dumps(capture[i : i + 6]) + "\n")
    for n, i in enumerate(range(24, len(capture), 4)):
        (bodies / f"body-{n:04}.json").write_text(json.dumps(capture[i : i + 4]))
    db = f"sqlite:///{tmp_path / 'bodies.db'}"
    proc = run("batch", "--no-state", "--json", "--tracking-uri", db, str(bodies), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["records_read"] == len(capture)
    attempts: dict[str, int] = {}
    for r in capture:
        attempts[r["litellm_call_id"]] = attempts.get(r["litellm_call_id"], 0) + 1
    want = sorted((mlflow_trace_id(otel_trace_id("1", call)), 1 if n == 1 else n + 1) for call, n in attempts.items())
    assert sorted((t.info.trace_id, len(t.data.spans)) for t in all_traces(db, "LiteLLM Proxy")) == want


def test_all_good_lines_arrive_around_bad_ones(tmp_path: Path, capture: list[dict]) -> None:
    from tests.conftest import reidentify

    good = reidentify([r for r in capture if r["status"] == "success" and r["call_type"] == "acompletion"][:10])
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, good)
    lines = path.read_text().splitlines()
    mixed = []
    for i, line in enumerate(lines):
        mixed.append(line)
        mixed.append('{"broken": ' if i % 2 else "\x00not json")
    path.write_text("\n".join(mixed) + "\n")
    uri = f"sqlite:///{tmp_path / 's.db'}"
    proc = run("batch", str(path), "--json", "--tracking-uri", uri, "--experiment-name", "mixed", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout)["quarantined"] == len(lines)
    got = {t.info.tags["litellm.call_id"] for t in all_traces(uri, "mixed")}
    assert got == {r["litellm_call_id"] for r in good}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    password = "ingest-Test-Pass-123"
    server = start_mlflow_server(
        tmp_path_factory.mktemp("auth-server"),
        extra_args=("--app-name", "basic-auth"),
        env={"MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret"},
    )
    yield server.url, "admin", password
    server.stop()


def test_unauthorised_mlflow_is_one_clear_line_and_credentials_from_env_work(auth_server, tmp_path: Path) -> None:
    url, user, password = auth_server
    proc = run("batch", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--tracking-uri", url, "--mlflow-timeout", "2", cwd=tmp_path)
    assert_one_clean_error_line(proc, 4, "refused the request (401)")
    env = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
    ok = run("batch", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--tracking-uri", url, "--json", cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    os.environ.update(env)
    try:
        assert len(all_traces(url, "LiteLLM Proxy")) == json.loads(ok.stdout)["traces_written"] > 0
    finally:
        for k in env:
            os.environ.pop(k, None)


def test_two_working_directories_with_the_default_store_keep_separate_state(tmp_path: Path) -> None:
    """`sqlite:///mlflow.db` in two folders is two stores: the second must not think it ingested already."""
    state = tmp_path / "shared-state"
    counts = []
    for name in ("one", "two"):
        cwd = tmp_path / name
        cwd.mkdir()
        proc = run("batch", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--json", "--state-dir", str(state), cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        counts.append(json.loads(proc.stdout)["traces_written"])
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize(
    ("args", "code", "not_imported"),
    [
        (["--help"], 0, ("mlflow", "sqlalchemy", "pandas", "polars")),
        (["batch", "--help"], 0, ("mlflow", "sqlalchemy", "pandas", "polars")),
        (["batch", "--no-such-option", "x.jsonl"], 2, ("mlflow", "sqlalchemy", "pandas", "polars")),
        (["backfill", "--shard", "4/3", "x.jsonl"], 2, ("mlflow", "sqlalchemy", "pandas")),
        (["status", "--state-dir", "{state}"], 0, ("mlflow", "sqlalchemy", "pandas")),
        (["batch", "--no-state", "--dry-run", "-q", str(SAMPLE_LOGS / "proxy_calls.jsonl")], 0, ("psycopg",)),
    ],
)
def test_help_usage_errors_and_status_do_not_import_mlflow(
    tmp_path: Path, args: list[str], code: int, not_imported: tuple[str, ...]
) -> None:
    """``import mlflow`` alone takes ~1.8 s here: a command line that only asks for help, has a typo,
    or reads the state answers without it (the script's own entry, as installed); a run of files
    does without psycopg (the proxy database's driver)."""
    state = tmp_path / "state"
    if "{state}" in args:
        first = run(
            "batch",
            str(SAMPLE_LOGS / "proxy_calls.jsonl"),
            "-q",
            "--state-dir",
            str(state),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'm.db'}",
            cwd=tmp_path,
        )
        assert first.returncode == 0, first.stderr
    argv = [a.replace("{state}", str(state)) for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ingest", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == code, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "ingest" in imported and "click" in imported
    assert not imported & set(not_imported), sorted(imported & set(not_imported))


def unprivileged(args: list[str]) -> list[str]:
    """``args`` run without root's power to read any file (as root: CAP_DAC_OVERRIDE dropped)."""
    if os.geteuid() != 0:
        return args
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root without setpriv cannot be kept from reading a file")
    drop = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", "--", *args]


@pytest.mark.parametrize(
    ("state", "locked"), [("incremental", "file"), ("no-state", "file"), ("incremental", "folder"), ("incremental", "searchless folder")]
)
def test_a_file_that_may_not_be_read_is_named_and_the_others_are_ingested(
    tmp_path: Path, capture: list[dict], state: str, locked: str
) -> None:
    """logrotate's ``create 0600 root root`` makes a rotated file the ingester's user may not read:
    the whole cron run stopped (exit 2) and ingested nothing, every run. Now the others are
    ingested, the file is named, exit 8; once readable it is read, and nothing is doubled. A folder
    the run may not list (``olddir`` made ``0700`` by another user) was passed over in silence, exit 0;
    one it may list but not enter (``chmod -R 644``) stopped the run, nothing ingested, exit 1."""
    logs = tmp_path / "logs"
    logs.mkdir()
    calls = copies(capture, 3, "perm")
    names = ["proxy.jsonl.2", "old/proxy.jsonl.1" if locked != "file" else "proxy.jsonl.1", "proxy.jsonl"]
    files = [write_jsonl(logs / name, calls[i]) for i, name in enumerate(names)]
    if locked != "file":
        files[1] = files[1].parent
    files[1].chmod(0o644 if locked == "searchless folder" else 0)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    flags = ["--state-dir", str(tmp_path / "st")] if state == "incremental" else ["--no-state"]
    args = unprivileged([EXE, "batch", str(logs), "--tracking-uri", uri, "--json", *flags])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    first = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 8, (first.stdout, first.stderr)
    assert "Traceback" not in first.stderr and f"cannot read {files[1]}: permission denied" in first.stderr
    assert json.loads(first.stdout)["files_unreadable"] == 1
    got = {t.info.tags["litellm.call_id"] for t in all_traces(uri, "LiteLLM Proxy")}
    assert got == {r["litellm_call_id"] for r in calls[0] + calls[2]}
    files[1].chmod(0o644 if locked == "file" else 0o755)
    second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    traces = all_traces(uri, "LiteLLM Proxy")
    assert sorted(t.info.tags["litellm.call_id"] for t in traces) == sorted({r["litellm_call_id"] for c in calls for r in c})


def test_a_file_whose_name_is_not_utf8_is_ingested_and_named_readably(tmp_path: Path, capture: list[dict]) -> None:
    """Linux allows any bytes in a name (a share mounted from another system): every run failed on
    it with "surrogates not allowed" (exit 1), the files after it never read."""
    logs = tmp_path / "logs"
    logs.mkdir()
    name = os.fsdecode(b"proxy-\xff\xfe.jsonl")
    (logs / name).write_text("".join(json.dumps(r) + "\n" for r in capture) + "not json\n")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["batch", str(logs), "--tracking-uri", uri, "--state-dir", str(tmp_path / "st"), "--json"]
    first = run(*args, cwd=tmp_path)
    assert first.returncode == 3 and "Traceback" not in first.stderr, first.stderr
    (q,) = [json.loads(line) for line in (tmp_path / "st" / "quarantine.jsonl").read_text().splitlines()]
    assert q["source"] == str(logs / "proxy-\ufffd\ufffd.jsonl") and q["line"] == len(capture) + 1
    assert len(all_traces(uri, "LiteLLM Proxy")) == len({r["litellm_call_id"] for r in capture})
    again = run(*args, cwd=tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["records_read"] == 0, again.stderr
    status = run("status", "--state-dir", str(tmp_path / "st"), "--json", cwd=tmp_path)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr


def test_a_cron_run_whose_quarantine_file_cannot_be_written_stops_and_the_next_one_loses_nothing(
    tmp_path: Path, small_disk: Path, capture: list[dict]
) -> None:
    log = tmp_path / "logs" / "proxy.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps(r) + "\n" for r in capture[:20]) + "not json\n" + "".join(json.dumps(r) + "\n" for r in capture[20:]))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["batch", str(log), "--tracking-uri", uri, "--state-dir", str(tmp_path / "st"), "--quarantine-file", str(small_disk / "q.jsonl")]
    filler = fill(small_disk)
    assert_one_clean_error_line(
        run(*args, cwd=tmp_path), 7, f"cannot write the quarantine file {small_disk / 'q.jsonl'}: No space left on device"
    )
    filler.unlink()
    again = run(*args, cwd=tmp_path)
    assert again.returncode == 3, again.stderr
    (q,) = [json.loads(x) for x in (small_disk / "q.jsonl").read_text().splitlines()]
    assert (q["line"], q["reason"]) == (21, "malformed_json")
    assert len(all_traces(uri, "LiteLLM Proxy")) == len({r["litellm_call_id"] for r in capture})


@pytest.mark.parametrize("command", ["batch", "backfill"])
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("after_s", [0.3, 1.2])
def test_a_signal_while_the_command_starts_is_exit_130_in_one_line(tmp_path: Path, command: str, signum: str, after_s: float) -> None:
    """The first seconds load polars and MLflow (and a backfill's workers) before the command takes
    the signals over: a Ctrl-C there was click's "Aborted!" (exit 1, which says a bug) or a
    traceback from an import, and a SIGTERM killed it without a word."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    args = [EXE, command, str(SAMPLE_LOGS), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--state-dir", str(tmp_path / "st")]
    if command == "backfill":
        args += ["--workers", "2"]
    p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(after_s)
    p.send_signal(getattr(signal, signum))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err and "Aborted" not in err
    assert err.strip().splitlines()[-1].startswith("litellm-ingest: error: interrupted"), err
    deadline = time.monotonic() + 60  # a worker notices its parent is gone within a second of being up
    while time.monotonic() < deadline:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.killpg(p.pid, 0)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (OSError(""), "OSError"),
        (RuntimeError("\n"), "RuntimeError"),
        (ValueError("first\nsecond"), "first"),
        (KeyError("x" * 500), "'" + "x" * 199),
        ("", "str"),
    ],
)
def test_an_error_is_said_in_one_line_whatever_it_holds(error: BaseException | str, said: str) -> None:
    """Every log line and one-line failure goes through one helper: an error whose text is empty or
    starts with a newline was an IndexError inside the handler that was to report it."""
    from ingest.quarantine import first_line

    assert first_line(error) == said


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://ing:pa/SECRET@db.internal/mlflow", "postgresql://ing:***@db.internal/mlflow"),
        (
            "postgresql+psycopg://ing:pa/SECRET@db:5432/mlflow?sslmode=require",
            "postgresql+psycopg://ing:***@db:5432/mlflow?sslmode=require",
        ),
        ("postgresql://ing:p@SECRET@db/mlflow", "postgresql://ing:***@db/mlflow"),
        ("postgresql://ing:SECRET@db/mlflow?options=a@b", "postgresql://ing:***@db/mlflow?options=a@b"),
        ("https://user:SECRET@mlflow.example.com/", "https://user:***@mlflow.example.com/"),
        ("postgresql://db/mlflow?x=a@b", "postgresql://db/mlflow?x=a@b"),
        ("http://mlflow:5000/path@x", "http://mlflow:5000/path@x"),
        ("sqlite:////var/lib/mlflow.db", "sqlite:////var/lib/mlflow.db"),
        ("postgresql://ing@db/mlflow?sslmode=disable&password=SECRET", "postgresql://ing@db/mlflow?sslmode=disable&password=***"),
        ("postgresql+psycopg://db/mlflow?PASSWORD=SECRET&x=1", "postgresql+psycopg://db/mlflow?PASSWORD=***&x=1"),
        ("postgresql://db/litellm?sslmode=require&sslpassword=SECRET", "postgresql://db/litellm?sslmode=require&sslpassword=***"),
        ("https://SECRET@mlflow.example.com/", "https://***@mlflow.example.com/"),
        ("HTTP://SECRET@mlflow:5000", "HTTP://***@mlflow:5000"),
        ("https://mlflow.example.com/?access_token=SECRET&x=1", "https://mlflow.example.com/?access_token=***&x=1"),
        ("http://gw/mlflow?api-key=SECRET", "http://gw/mlflow?api-key=***"),
        ("postgresql://ing@db/mlflow?sslkey=/etc/k.pem", "postgresql://ing@db/mlflow?sslkey=/etc/k.pem"),
    ],
)
def test_a_password_is_never_shown_however_it_is_written(uri: str, shown: str) -> None:
    """SQLAlchemy takes a password with ``/`` unencoded (it runs to the first ``@``): it was shown
    whole, in the summary, the state file, status and error lines. A ``?password=`` (libpq takes
    it) was kept whole in a backfill's state, which names the proxy's database it reads."""
    from ingest.pipeline import input_id
    from ingest.stores import shown_uri

    assert shown_uri(uri) == shown and "SECRET" not in shown_uri(uri)
    if uri.startswith("postgresql"):
        assert input_id(uri) == shown


def test_a_token_given_as_the_servers_user_name_is_never_said(tmp_path: Path, mlflow_server: MlflowServer, experiment_name: str) -> None:
    """``https://TOKEN@host`` (how a gateway's token is often written) was shown whole in every line
    about the server with ``-v``, and kept in the state file, whose key names the destination."""
    log = str(SAMPLE_LOGS / "proxy_calls.jsonl")
    down = run("-v", "batch", log, "--mlflow-timeout", "2", "--tracking-uri", "http://tok-SECRET1@127.0.0.1:9/?token=SECRET2", cwd=tmp_path)
    assert down.returncode == 4, (down.returncode, down.stderr)
    assert "retrying" in down.stderr and "***@127.0.0.1:9" in down.stderr, down.stderr
    up_uri = mlflow_server.url.replace("://", "://tok-SECRET3@")
    up = run(
        "-v", "batch", log, "--tracking-uri", up_uri, "--experiment-name", experiment_name, "--state-dir", "st", "--json", cwd=tmp_path
    )
    assert up.returncode in (0, 3) and json.loads(up.stdout)["traces_written"], (up.returncode, up.stderr)
    state = "".join(p.read_text(errors="replace") for p in (tmp_path / "st").rglob("*") if p.is_file())
    assert "***@127.0.0.1" in state
    assert "SECRET" not in down.stdout + down.stderr + up.stdout + up.stderr + state


@pytest.mark.parametrize("what", ["device", "pipe", "folder", "dangling symlink"])
def test_a_store_path_that_is_no_regular_file_is_never_replaced(tmp_path: Path, what: str) -> None:
    """Anything but a file with data counted as no store: a device node (``sqlite:////dev/null`` as
    root) or a pipe was replaced by a new store, and a symlink to a store not made yet was replaced
    by a local file, its target never made. Now the first three are left alone in one line (exit 4),
    and the store is made where the link points, as SQLite itself opens it."""
    where = tmp_path / "store.db"
    if what == "device":
        try:
            os.mknod(where, 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # a private /dev/null
        except PermissionError:
            pytest.skip("mknod needs root")
    elif what == "pipe":
        os.mkfifo(where)
    elif what == "folder":
        where.mkdir()
    else:
        (tmp_path / "vol").mkdir()
        where.symlink_to(tmp_path / "vol" / "m.db")
    logs = str(SAMPLE_LOGS / "proxy_calls.jsonl")
    proc = run("batch", logs, "--no-state", "-q", "--tracking-uri", f"sqlite:///{where}", cwd=tmp_path)
    if what == "dangling symlink":
        assert proc.returncode == 0, proc.stderr
        assert where.is_symlink() and (tmp_path / "vol" / "m.db").is_file()
        assert all_traces(f"sqlite:///{where}", "LiteLLM Proxy", include_spans=False)
        return
    assert_one_clean_error_line(proc, 4, "not a database file; it was left alone")
    kind = {"device": stat.S_ISCHR, "pipe": stat.S_ISFIFO, "folder": stat.S_ISDIR}[what]
    assert kind(where.lstat().st_mode), "left as it was"


@pytest.mark.parametrize("stdout", ["disk full", "closed"])
def test_a_summary_that_cannot_be_printed_changes_no_exit_code(tmp_path: Path, stdout: str) -> None:
    """cron's ``>> log 2>&1`` on a full disk, or stdout closed (``>&-``): a traceback and exit 1 (a
    bug) after a run that did its work; the exit code is the run's (3: a line quarantined)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(SAMPLE_LOGS / "proxy_calls.jsonl", logs / "a.jsonl")
    (logs / "bad.jsonl").write_text("not json\n")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    redirect = ">/dev/full" if stdout == "disk full" else ">&-"
    command = f"exec {EXE} batch {logs} --state-dir {tmp_path / 'st'} --tracking-uri {uri} {redirect}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, timeout=180)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert len(all_traces(uri, "LiteLLM Proxy", include_spans=False)) > 0


def test_a_folder_of_small_files_under_a_low_descriptor_limit_is_read_whole(tmp_path: Path, capture: list[dict]) -> None:
    """``ulimit -n 64`` (a container's, a cron job's): a step held up to 256 small files open, and the
    files it could not open counted as waiting for their first line: exit 0, a fifth of them read."""
    import resource

    logs = tmp_path / "logs"
    records = [r for batch in copies(capture, 8, "fds") for r in batch]
    for i, r in enumerate(records):
        write_jsonl(logs / f"call-{i:05d}.json", [r])

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    args = [EXE, "batch", str(logs), "--state-dir", str(tmp_path / "st"), "--tracking-uri", uri, "--json"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["records_read"] == len(records) and summary["files_skipped"] == 0, summary
    assert len(all_traces(uri, "LiteLLM Proxy", include_spans=False)) == len({r["litellm_call_id"] for r in records})


def test_a_run_from_a_deleted_folder_is_told_so(tmp_path: Path) -> None:
    """MLflow's import fails in a deleted working folder: a cron run said it could not open the store
    (exit 4), and the daemon waited for MLflow for ever."""
    gone = tmp_path / "gone"
    gone.mkdir()
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for command in ("batch", "tail"):
        script = f"cd {gone} && rmdir {gone} && exec {EXE} {command} {SAMPLE_LOGS} --tracking-uri {uri} --state-dir {tmp_path / 'st'}"
        proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert_one_clean_error_line(proc, 2, "the current folder was deleted")
        gone.mkdir()


def test_status_of_a_state_dir_that_is_a_file_says_so(tmp_path: Path) -> None:
    """It said "no state in" the file, exit 0, while batch refuses the same state dir with exit 7."""
    (tmp_path / "f").write_text("x")
    for args, env in ((["--state-dir", str(tmp_path / "f")], {}), ([], {"LITELLM_INGEST_STATE_DIR": str(tmp_path / "f")})):
        proc = run("status", *args, cwd=tmp_path, env=env)
        assert_one_clean_error_line(proc, 7, "is not a folder")


def test_status_of_a_file_in_a_folder_it_may_not_enter_is_no_traceback(tmp_path: Path) -> None:
    """``status`` run as a user who may not enter the logs' folder printed a PermissionError traceback."""
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(SAMPLE_LOGS / "proxy_calls.jsonl", logs / "a.jsonl")
    state = tmp_path / "st"
    assert (
        run(
            "batch", str(logs), "--state-dir", str(state), "-q", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path
        ).returncode
        == 0
    )
    if os.geteuid() == 0:
        os.chown(logs, 65534, 65534)
    logs.chmod(0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    try:
        for extra in ([], ["--json"]):
            proc = subprocess.run(unprivileged([EXE, "status", "--state-dir", str(state), *extra]), cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert "a.jsonl" in proc.stdout
    finally:
        logs.chmod(0o755)


def test_an_empty_state_dir_or_quarantine_file_is_the_default_not_the_current_folder(tmp_path: Path) -> None:
    """``--state-dir "$DIR"`` with the variable unset was the current folder (its state files among
    whatever else was there), while an empty ``LITELLM_INGEST_STATE_DIR`` means the default."""
    work, state = tmp_path / "work", tmp_path / "state"
    work.mkdir()
    log = str(SAMPLE_LOGS / "proxy_calls.jsonl")
    proc = run(
        "batch", log, "--state-dir", "", "--quarantine-file", "", "--tracking-uri", f"sqlite:///{tmp_path / 's.db'}",
        cwd=work, env={"LITELLM_INGEST_STATE_DIR": str(state)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert list(work.iterdir()) == [] and any(state.iterdir())
    status = run("status", "--state-dir", "", "--json", cwd=work, env={"LITELLM_INGEST_STATE_DIR": str(state)})
    assert status.returncode == 0 and json.loads(status.stdout), status.stderr


@pytest.mark.parametrize("z", ["Z", "z"])
def test_a_utc_time_may_end_in_either_z(z: str) -> None:
    from ingest.cli import parse_time

    assert parse_time(f"2026-11-27T14:02:00{z}") == parse_time("2026-11-27T14:02:00+00:00") == 1_795_788_120_000_000


@pytest.mark.parametrize(
    ("when", "us"),
    [
        ("1970-02-19T08:22:25.641580", 4_263_745_641_580),
        ("2250-04-17T13:29:19.606051Z", 8_845_162_159_606_051),
        ("2252-01-20T22:01:40.372239+02:00", 8_900_740_900_372_239),
    ],
)
def test_a_bound_with_microseconds_is_read_to_the_microsecond(when: str, us: int) -> None:
    """``--since``/``--until`` bound calls to the microsecond: read through a float timestamp, these
    came out one early: a call a microsecond before ``--until`` was left out, one a microsecond
    before ``--since`` taken in."""
    from ingest.cli import parse_time

    assert parse_time(when) == us


def test_workers_past_four_per_core_are_refused_before_any_starts(tmp_path: Path) -> None:
    """``--workers 999999`` started that many processes, each with MLflow loaded."""
    proc = run("backfill", str(SAMPLE_LOGS), "--workers", "999999", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "--workers" in proc.stderr and "four per core" in proc.stderr, proc.stderr
    ok = run("backfill", str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--workers", "8", "--dry-run", "--json", cwd=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout)["calls"], ok.stderr


def test_the_summary_says_why_a_file_with_a_cut_last_line_waits(tmp_path: Path) -> None:
    """The quick start's first run: bad_input.jsonl's last line has no newline yet, and the summary
    said the file had "no complete line yet" beside the records read from it."""
    logs = tmp_path / "logs"
    logs.mkdir()
    line = (SAMPLE_LOGS / "proxy_calls.jsonl").read_bytes().split(b"\n", 1)[0]
    (logs / "cut.jsonl").write_bytes(line + b"\n" + line[:100])
    (logs / "started.jsonl").write_bytes(line[:100])
    store = ["--tracking-uri", f"sqlite:///{tmp_path / 's.db'}", "--state-dir", str(tmp_path / "st")]
    proc = run("batch", str(logs), *store, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    waiting = next(row for row in proc.stdout.splitlines() if row.startswith("files waiting"))
    assert waiting.split()[2] == "2" and "no complete line" not in waiting, waiting
    assert "a last line without its newline" in waiting and "--partial-timeout" in waiting, waiting


@pytest.mark.parametrize("command", ["batch", "backfill"])
def test_a_dry_run_beside_a_run_reads_that_runs_state(tmp_path: Path, command: str) -> None:
    """A dry run never opened MLflow, so its state was that of an experiment named "dry-run", which
    no run writes: beside a cron job it read every file again (unless given --experiment-id), not
    "the state as it is"."""
    logs = str(SAMPLE_LOGS / "proxy_calls.jsonl")
    args = [logs, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--state-dir", str(tmp_path / "st"), "--json"]
    assert run(command, *args, cwd=tmp_path).returncode == 0
    before = sorted(p.name for p in (tmp_path / "st").iterdir())
    dry = run(command, *args, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    s = json.loads(dry.stdout)
    assert (s["records_read"], s["files_unchanged"], s["experiment_id"]) == (0, 1, "1"), s
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == before


def test_a_stateless_batch_counts_the_bytes_it_read(tmp_path: Path) -> None:
    """Its summary said ``bytes_read: 0`` whatever it read (a stateful run counts them as its checkpoints move)."""
    proc = run("batch", "--no-state", "--dry-run", "--json", str(SAMPLE_LOGS), cwd=tmp_path)
    on_disk = sum(p.stat().st_size for p in SAMPLE_LOGS.iterdir() if ".jsonl" in p.name)
    assert json.loads(proc.stdout)["bytes_read"] == on_disk, proc.stderr


def test_the_quick_starts_first_run_on_a_fresh_clone_quarantines_the_bad_lines_and_exits_3(tmp_path: Path) -> None:
    """In a fresh clone every sample file has just been written. bad_input.jsonl started with the
    gzip's first line, so it was taken for a truncated copy of that file and waited whole for
    ``--partial-timeout``: the README's first command exited 0 and quarantined nothing."""
    logs = shutil.copytree(SAMPLE_LOGS, tmp_path / "sample_logs")
    for p in logs.iterdir():
        os.utime(p)
    store = ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--state-dir", str(tmp_path / "st")]
    proc = run("batch", str(logs), "--json", *store, cwd=tmp_path, process=True)
    s = json.loads(proc.stdout)
    assert proc.returncode == 3, proc.stderr
    assert s["calls"] == s["traces_written"] == 45 and s["files_skipped"] == 1, s
    assert s["quarantined"] == 6 and "truncated_line" not in s["quarantined_by_reason"], s


@pytest.mark.parametrize("what", ["folder", "under a file"])
def test_a_quarantine_file_that_cannot_be_written_is_said_before_a_line_is_read_and_the_next_run_reads_every_line(
    tmp_path: Path, what: str
) -> None:
    """A folder, or a path under a file, named as ``--quarantine-file``: the run wrote the calls
    before the first bad line, then ended with "Is a directory: …", exit 1 (a bug, said the README),
    every run after the same. Now it is told before a line is read, naming the option, exit 7 (a
    disk that fills under it: ``test_a_cron_run_whose_quarantine_file_cannot_be_written_…``), and a
    run with a file that can be written quarantines the bad lines once and writes every call."""
    logs = copy_samples(tmp_path / "logs")
    uri, state = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "st"
    if what == "folder":
        where = tmp_path / "q"
        where.mkdir()
    else:
        (tmp_path / "f").write_text("x")
        where = tmp_path / "f" / "q.jsonl"
    args = ["batch", str(logs), "--tracking-uri", uri, "--state-dir", str(state), "--partial-timeout", "0", "--json"]
    proc = run(*args, "--quarantine-file", str(where), cwd=tmp_path)
    assert_one_clean_error_line(proc, 7, f"cannot write the quarantine file {where}")
    assert "--quarantine-file" in proc.stderr
    assert not (tmp_path / "m.db").exists() or not all_traces(uri, "LiteLLM Proxy", include_spans=False), "told before a line is read"
    ok = run(*args, "--quarantine-file", str(tmp_path / "q.jsonl"), cwd=tmp_path)
    assert ok.returncode == 3, ok.stderr
    assert nonblank_lines(tmp_path / "q.jsonl") == json.loads(ok.stdout)["quarantined"] == 7
    got = [t.info.tags["litellm.call_id"] for t in all_traces(uri, "LiteLLM Proxy", include_spans=False)]
    assert len(got) == len(set(got)) == 45


@pytest.mark.parametrize("command", [("batch",), ("batch", "--experiment-id", "0"), ("reconcile",)], ids=["by name", "by id", "reconcile"])
def test_a_tracking_uri_with_a_wrong_path_names_the_address_not_the_experiment(mlflow_server, tmp_path: Path, command: tuple) -> None:
    """A server behind a path prefix given without it (or a prefix where there is none) answers every
    API path with its web server's 404 page: that was "experiment 'LiteLLM Proxy' does not exist"
    (check --experiment-name), or "create experiment: MLflow answered 404: <!doctype html>…". Now the
    address is named; a missing experiment on the right address is still said as such."""
    wrong = f"{mlflow_server.url}/mlflow"
    logs = str(SAMPLE_LOGS / "proxy_calls.jsonl")
    state = ("--state-dir", str(tmp_path / "st")) if command[0] == "batch" else ()
    proc = run(*command, logs, "--tracking-uri", wrong, *state, cwd=tmp_path)
    assert_one_clean_error_line(proc, 4, "answered")
    assert "no MLflow API at that address" in proc.stderr and "--tracking-uri" in proc.stderr and "does not exist" not in proc.stderr
    if command[0] == "reconcile":
        right = run(
            "reconcile", logs, "--tracking-uri", mlflow_server.url, "--experiment-name", f"none-{uuid.uuid4().hex[:8]}", cwd=tmp_path
        )
        assert_one_clean_error_line(right, 4, "does not exist")


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_an_experiment_id_that_is_no_number_is_a_usage_error(tmp_path: Path, how: str) -> None:
    """``--experiment-id abc`` was "cannot open the MLflow store …: Invalid experiment ID 'abc'", exit
    4, once the run had opened the store; now it is a usage error naming the option (and the variable)."""
    logs = str(SAMPLE_LOGS / "proxy_calls.jsonl")
    flag, env = (("--experiment-id", "abc"), {}) if how == "flag" else ((), {"MLFLOW_EXPERIMENT_ID": "abc"})
    proc = run("batch", logs, *flag, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--no-state", cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "'abc'" in proc.stderr and "--experiment-id" in proc.stderr, proc.stderr
    assert ("MLFLOW_EXPERIMENT_ID" in proc.stderr) == (how == "variable") and not (tmp_path / "m.db").exists()
    named = run("batch", logs, *flag, "--experiment-name", "named", "--dry-run", "-q", cwd=tmp_path, env=env)
    assert (named.returncode == 0) == (how == "variable"), "a run given a name does not read the variable's id"
