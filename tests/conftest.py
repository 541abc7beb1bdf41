"""Shared fixtures: the real capture, re-identified records, a real `mlflow server`, a real SQLite store."""

from __future__ import annotations

import atexit
import contextlib
import copy
import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.pgkit import PgCluster, Postgres, free_port, start_postgres

# s3_server, gcs_server, s3_env, gcs_env: one of each per session, for every module (a module that imports them
# instead gets its own)
pytest_plugins = ["tests.buckets"]

ROOT = Path(__file__).resolve().parent.parent
SOAK = int(os.environ.get("LITELLM_INGEST_SOAK", "0"))
soak_only = pytest.mark.skipif(not SOAK, reason="the same code as a sibling variant CI runs: LITELLM_INGEST_SOAK=1 runs it too")
"""A variant of a real-process test that differs from a sibling only in a path the sibling runs
too: CI's time goes to the variants that differ."""
SAMPLE_LOGS = ROOT / "sample_logs"
CAPTURE_FILES = [SAMPLE_LOGS / "proxy_calls.jsonl.1.gz", SAMPLE_LOGS / "proxy_calls.jsonl"]

os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# MLflow prices a span without a cost from its model catalog, first trying a download (3 retries, ~7 s
# without network, once per process) before its bundled copy: the bundled copy at once, as offline.
os.environ.setdefault("MLFLOW_MODEL_CATALOG_URI", "")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="litellm-ingest-tests-cache-")
"""Tests keep their empty MLflow schema (``ingest.stores``) out of the user's own cache (removed at exit)."""
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)
MLFLOW_TARGET_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")
for var in MLFLOW_TARGET_VARS:
    os.environ.pop(var, None)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, at most 4. Most tests wait on the processes they start (a
    daemon, a server, PostgreSQL), about one core per worker; more workers than cores only turn
    those waits into timeouts."""
    return max(1, min(os.cpu_count() or 1, 4))


def read_capture() -> list[dict]:
    """The 49 real StandardLoggingPayload records, in file order (rotated .gz part first)."""
    import gzip

    out = []
    for f in CAPTURE_FILES:
        data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        out += [json.loads(line) for line in data.splitlines() if line.strip()]
    return out


@pytest.fixture(scope="session")
def capture() -> list[dict]:
    return read_capture()


def reidentify(records: list[dict], shift_s: float = 0.0, salt: str | None = None) -> list[dict]:
    """Copies of real records with fresh call ids (attempts of one call stay together) and shifted times."""
    salt = salt or uuid.uuid4().hex[:8]
    ids: dict[str, str] = {}
    out = []
    for r in records:
        r = copy.deepcopy(r)
        old = r["litellm_call_id"]
        new = ids.setdefault(old, str(uuid.uuid5(uuid.NAMESPACE_URL, f"{salt}/{old}")))
        r["litellm_call_id"] = new
        if r["id"] == old:
            r["id"] = new
        else:
            r["id"] = f"{r['id']}-{salt}"
        for k in ("startTime", "endTime", "completionStartTime"):
            if r.get(k) is not None:
                r[k] = round(r[k] + shift_s, 6)
        out.append(r)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def zstd_frames(data: bytes) -> bytes:
    """``data`` as two zstd frames with their checksums, the second without its size (as ``zstd``
    writes from a pipe, logrotate's way)."""
    import zstandard

    c, half = zstandard.ZstdCompressor(write_checksum=True), len(data) // 2
    stream = c.compressobj()
    return c.compress(data[:half]) + stream.compress(data[half:]) + stream.flush()


def compressor(kind: str) -> Callable[[bytes], bytes]:
    """How rotation compresses a log: by ``gzip``, ``xz``, ``bzip2`` (its smallest, 100 kB blocks: a
    cut file still holds whole ones) or ``zstd`` (several frames)."""
    import bz2
    import functools
    import gzip
    import lzma

    bzip2 = functools.partial(bz2.compress, compresslevel=1)
    return {"gzip": gzip.compress, "xz": lzma.compress, "bzip2": bzip2, "zstd": zstd_frames}[kind]


def decompressor(kind: str) -> Callable[[bytes], bytes]:
    """The inverse of :func:`compressor`, by each format's own library (zstandard's reader told to read every frame)."""
    import bz2
    import gzip
    import io
    import lzma

    import zstandard

    def zstd(data: bytes) -> bytes:
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()

    return {"gzip": gzip.decompress, "xz": lzma.decompress, "bzip2": bz2.decompress, "zstd": zstd}[kind]


COMPRESSIONS = ["gzip", "xz", "bzip2", "zstd"]
SUFFIX = {"gzip": ".gz", "xz": ".xz", "bzip2": ".bz2", "zstd": ".zst"}


def write_log(path: Path, records: list[dict]) -> Path:
    """JSON lines; gzip'd when the name ends in .gz."""
    if path.suffix == ".gz":
        import gzip

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
        return path
    return write_jsonl(path, records)


def past_shift(capture: list[dict], days: float = 30) -> float:
    """A whole-second shift that puts the capture's first call `days` ago (history, whatever the clock says)."""
    return float(round(time.time() - days * 86400 - min(r["startTime"] for r in capture)))


def copies(capture: list[dict], n: int, tag: str, spacing_s: float = 600.0) -> list[list[dict]]:
    """n re-identified copies of the capture, `spacing_s` apart, in time order, 40+ days in the past."""
    base = past_shift(capture, days=40)
    return [reidentify(capture, base + i * spacing_s, f"{tag}-{i}") for i in range(n)]


def _load_make_samples():  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_samples", SAMPLE_LOGS / "make_samples.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


spend_row = _load_make_samples().spend_row
"""A SpendLogs row built from a payload record the way the proxy fills the table (sample_logs/make_samples.py)."""


@dataclass
class MlflowServer:
    url: str
    backend_uri: str
    proc: subprocess.Popen
    workdir: Path
    port: int

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_mlflow_server(
    workdir: Path,
    port: int | None = None,
    backend_uri: str | None = None,
    timeout_s: float = 90.0,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    workers: int = 1,
) -> MlflowServer:
    """A real `mlflow server` (uvicorn, `workers` processes, no job runner) on a free localhost port."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    backend_uri = backend_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    log = open(workdir / f"server-{port}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend_uri,
            "--default-artifact-root",
            str(workdir / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            *extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=workdir,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(workdir / f'server-{port}.log').read_text()[-2000:]}")
        try:
            if requests.get(url + "/health", timeout=1).ok:
                return MlflowServer(url, backend_uri, proc, workdir, port)
        except requests.RequestException:
            pass
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start in time")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real server for the session, with Prometheus metrics so tests can count what reached it."""
    workdir = tmp_path_factory.mktemp("mlflow-server")
    (workdir / "prometheus").mkdir()
    server = start_mlflow_server(workdir, extra_args=("--expose-prometheus", str(workdir / "prometheus")))
    yield server
    server.stop()


def spans_ingested(server: MlflowServer) -> int:
    """Spans the server has accepted over OTLP since it started (its own counter): what really reached MLflow."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("mlflow_spans_ingested_total{"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _cluster() -> Iterator[PgCluster]:
    """A real PostgreSQL cluster (initdb + pg_ctl in a temp dir, trust auth on 127.0.0.1, fsync off;
    tests/pgkit.py), stopped after its tests; skipped where PostgreSQL is not installed. As root it
    runs as the `postgres` user."""
    try:
        cluster = start_postgres()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One cluster for the session, shared: a database each (``new_database``)."""
    yield from _cluster()


@pytest.fixture
def own_postgres() -> Iterator[PgCluster]:
    """A cluster of the test's own, to crash, freeze or restart (the test thaws what it froze)."""
    yield from _cluster()


def sqlite_trace_count(db: Path) -> int:
    """Rows in a SQLite store's trace table, read-only (what has been committed so far)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5) as con:
            return int(con.execute("SELECT COUNT(*) FROM trace_info").fetchone()[0])
    except sqlite3.Error:
        return 0


def hold_sqlite_lock(db: Path, seconds: float) -> subprocess.Popen:
    """Another process holding a SQLite store's write lock (a long write transaction) for ``seconds``."""
    code = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True); time.sleep(float(sys.argv[2]))\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def experiment_name() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def client_for(uri: str):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def all_traces(uri: str, experiment_name: str, include_spans: bool = True, missing_ok: bool = False) -> list:
    """Every trace of an experiment, read back through MLflow's own API (spans optional)."""
    c = client_for(uri)
    exp = c.get_experiment_by_name(experiment_name)
    if exp is None and missing_ok:
        return []
    assert exp is not None, f"experiment {experiment_name} not found"
    out, token = [], None
    while True:
        page = c.search_traces(locations=[exp.experiment_id], max_results=500, page_token=token, include_spans=include_spans)
        out += list(page)
        token = page.token
        if not token:
            return out


@pytest.fixture(autouse=True)
def _isolated_cwd_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the default state dir (quarantine file) inside the test's tmp dir; and no MLflow target
    left in the environment for the next test of this worker (``mlflow.set_experiment`` sets
    ``MLFLOW_EXPERIMENT_ID`` there, and the processes a test starts inherit it)."""
    monkeypatch.setenv("LITELLM_INGEST_STATE_DIR", str(tmp_path / "state"))
    yield
    for name in MLFLOW_TARGET_VARS:
        os.environ.pop(name, None)


IN_PROCESS_COMMANDS = ("batch", "reconcile", "status")
"""Commands :func:`run_cli` runs in this process: they end on their own and start no process."""

PYTHON_WARNING_FILTERS = (
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
)
"""The interpreter's own warning filters (no ``-W``): what the script runs with."""


class _Stderr:
    """``sys.stderr`` as it is when written to (click's runner swaps it in)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@contextlib.contextmanager
def _as_a_new_process(cwd: Path, env: dict[str, str]) -> Iterator[None]:
    """What a new ``litellm-ingest`` process starts with, for a command run in this one: exactly
    ``env`` (with the script's own defaults) and ``cwd``; no store open (MLflow keeps an engine per
    database URI for the process's life, and one on a store deleted since writes into the deleted
    file); warnings and log records of WARNING and up printed to stderr, as the script's
    ``logging.basicConfig`` and the interpreter's filters print them; the stop signals given back
    after."""
    import logging
    import warnings

    from ingest import STOP_SIGNALS
    from ingest.__main__ import DATABASE_DEFAULTS, OFFLINE_DEFAULTS

    forget_stores()
    saved_env, saved_signals = dict(os.environ), {s: signal.getsignal(s) for s in STOP_SIGNALS}
    root = logging.getLogger()
    saved_level, said = root.level, logging.StreamHandler(_Stderr())  # type: ignore[arg-type]
    said.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    os.environ.clear()
    os.environ.update({**OFFLINE_DEFAULTS, **DATABASE_DEFAULTS, **env})
    root.addHandler(said)
    root.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.chdir(cwd):
            warnings.resetwarnings()
            for action, category, module in reversed(PYTHON_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line)
            )
            yield
    finally:
        root.removeHandler(said)
        root.setLevel(saved_level)
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        forget_stores()


MLFLOW_STORES = (
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.store.jobs.sqlalchemy_store",
)


def forget_stores() -> None:
    """The stores this process opened (ours and MLflow's, by URI) and MLflow's engines (by database
    URI) closed and forgotten: a process keeps them for its life."""
    if (ours := sys.modules.get("ingest.stores")) is not None:
        ours._STORES.clear()
    if (registry := sys.modules.get("mlflow.tracking._tracking_service.registry")) is not None:
        registry.TrackingStoreRegistry._get_store_with_resolved_uri.cache_clear()
    for name in MLFLOW_STORES:
        engines = getattr(getattr(sys.modules.get(name), "SqlAlchemyStore", None), "_engine_map", None)
        for engine in list(engines.values()) if engines else []:
            engine.dispose()
        if engines:
            engines.clear()


def run_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``litellm-ingest args`` with exactly ``env`` in ``cwd``: what it prints and exits with.
    ``batch``, ``reconcile`` and ``status`` run in this process through click's runner, set up as a
    new process would be (:func:`_as_a_new_process`), without the 2-3 s of CPU each process spends
    importing MLflow: the suite runs hundreds. A traceback out of the command is printed to
    ``stderr`` as the script would print it; one that hangs past ``timeout`` ends this test worker.
    ``-v`` (logging set up for the process) and the other commands start the real script, as do
    the tests of the process itself (signals, kills, start-up, the quick start), which call it
    themselves."""
    exe = str(Path(sys.executable).parent / "litellm-ingest")
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in IN_PROCESS_COMMANDS or {"--help", "-v", "--verbose"} & set(args):
        return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    import traceback

    from click.testing import CliRunner

    from ingest.cli import main

    faulthandler.dump_traceback_later(timeout, exit=True)  # a hung run ends this worker, not the suite
    try:
        with _as_a_new_process(cwd, env):
            result = CliRunner().invoke(main, list(args))
    finally:
        faulthandler.cancel_dump_traceback_later()
    stderr = result.stderr
    if result.exc_info is not None and not isinstance(result.exc_info[1], SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess([exe, *args], result.exit_code, result.stdout, stderr)


def copy_samples(dest: Path) -> Path:
    shutil.copytree(SAMPLE_LOGS, dest, ignore=shutil.ignore_patterns("*.py", "README*"))
    return dest


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 1 MiB tmpfs (root only; CI runs as root): a disk that really fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler
