"""Benchmark: throughput and peak memory of litellm-ingest on generated input, with figures printed.

The input is the real capture in sample_logs/ re-identified N times (fresh call ids, shifted
times, retries/fallbacks kept together). Each measured run is its own process, so its peak RSS
(from wait4) is its own.

    python bench/bench.py                      # sizes 5000,50000 records, dry run + SQLite + server + scaling out
    python bench/bench.py --sizes 2000 --skip-server --skip-callback
    python bench/bench.py --only-scrub        # just the credential scrubber's cost (in-process, seconds)
    python bench/bench.py --only-buckets      # objects/s and traces/s from an S3-compatible server (moto)
    python bench/bench.py --only-nesting      # traces/s with every call nested into an app's trace, and without
    python bench/bench.py --only-parse        # MB/s and records/s: orjson loop, decode, normalize (old/new), --dry-run
    python bench/bench.py --only-scaling      # 1/2/4 tail daemons and backfill --workers 1/2 on PostgreSQL, direct and via a server
    python bench/bench.py --only-files        # a directory of one-record files (a synced per-call bucket): files/s

No assertions: these are the figures the README quotes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import polars as pl

if TYPE_CHECKING:
    import psycopg

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("litellm-ingest") or str(Path(sys.executable).parent / "litellm-ingest")


def capture() -> list[dict]:
    out = []
    for f in (ROOT / "sample_logs" / "proxy_calls.jsonl.1.gz", ROOT / "sample_logs" / "proxy_calls.jsonl"):
        data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        out += [json.loads(line) for line in data.splitlines() if line.strip()]
    return out


def generate(path: Path, records: int) -> tuple[int, int]:
    """Write ``records`` lines; return (records, calls)."""
    base = capture()
    span = max(r["endTime"] for r in base) - min(r["startTime"] for r in base) + 1
    written = calls = copy = 0
    with path.open("w") as out:
        while written < records:
            salt = uuid.uuid4().hex[:8]
            ids: dict[str, str] = {}
            for r in base:
                if written >= records:
                    break
                r = dict(r)
                old = r["litellm_call_id"]
                if old not in ids:
                    ids[old] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{salt}/{old}"))
                    calls += 1
                r["litellm_call_id"] = ids[old]
                r["id"] = ids[old] if r["id"] == old else f"{r['id']}-{salt}"
                for k in ("startTime", "endTime", "completionStartTime"):
                    if r.get(k) is not None:
                        r[k] = round(r[k] + copy * span - 86400 * 30, 6)
                out.write(json.dumps(r) + "\n")
                written += 1
            copy += 1
    return written, calls


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run a command; return (seconds, peak RSS in MiB, stdout)."""
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) not in (0, 3):
        raise RuntimeError(f"{args} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return seconds, usage.ru_maxrss // 1024, out.decode()


def measured(label: str, recs: int, calls: int, mb: float, t: float, rss: int, in_run: float | None = None) -> list[tuple[str, ...]]:
    """A table row for a whole-process run, and with ``in_run`` (the run's own seconds) one without Python start-up."""
    rows = [(label, f"{recs / t:,.0f}", f"{mb / t:,.1f}", f"{rss}", f"{calls / t:,.1f}")]
    if in_run:
        label = f"  same run, without process start-up ({t - in_run:.1f} s of imports)"
        rows.append((label, f"{recs / in_run:,.0f}", "-", "-", f"{calls / in_run:,.1f}"))
    return rows


def orjson_loop(path: Path) -> float:
    start = time.monotonic()
    with path.open("rb") as f:
        for line in f:
            orjson.loads(line)
    return time.monotonic() - start


def orjson_kept(path: Path, schema: dict[str, pl.DataType] | None = None) -> float:
    """The orjson loop keeping what it decodes, as any parse stage must (the bare loop frees each
    record before the next, which is several times faster); with ``schema``, into a frame of those
    fields, as a parse stage built on orjson would end."""
    start = time.monotonic()
    with path.open("rb") as f:
        rows = [orjson.loads(line) for line in f]
    if schema is not None:
        pl.from_dicts(rows, schema=schema)
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, backend_uri: str | None = None, workers: int = 1) -> tuple[subprocess.Popen, str]:
    """An ``mlflow server`` (no job runner) on a free port: on SQLite in ``workdir`` unless ``backend_uri``."""
    port = free_port()
    backend_uri = backend_uri or f"sqlite:///{workdir / 'server.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--default-artifact-root", str(workdir / "art"), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=workdir,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    import requests

    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            break
        try:
            if requests.get(url + "/health", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.3)
    raise RuntimeError("mlflow server did not start")


def callback_style(url: str, base: list[dict], n: int) -> float:
    """LiteLLM's callback way: MlflowClient.start_trace/end_trace per call, synchronous (drops nothing)."""
    code = f"""
import json, os, time
os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"
import mlflow
from mlflow import MlflowClient
mlflow.set_tracking_uri({url!r})
exp = mlflow.set_experiment("bench-callback")
c = MlflowClient()
recs = json.load(open({str(Path(tempfile.gettempdir()) / "bench-callback.json")!r}))
t = time.monotonic()
for r in recs:
    s = c.start_trace(name="litellm-" + r["call_type"], span_type="LLM", inputs={{"messages": r["messages"]}},
                      attributes={{"litellm_call_id": r["litellm_call_id"], "model": r["model"]}},
                      tags={{"User-Agent": "x"}}, start_time_ns=int(r["startTime"] * 1e9))
    c.end_trace(s.trace_id, outputs=r["response"], end_time_ns=int(r["endTime"] * 1e9))
print(time.monotonic() - t)
"""
    recs = [base[i % len(base)] for i in range(n)]
    (Path(tempfile.gettempdir()) / "bench-callback.json").write_text(json.dumps(recs))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def tail_latency(url: str, work: Path, rate: float, seconds: float) -> tuple[float, float, int]:
    """Append calls at a steady rate to a followed file; time each until MLflow returns its trace."""
    import requests
    from mlflow import MlflowClient

    logdir = work / "tail-logs"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    log.touch()
    experiment = f"bench-tail-{uuid.uuid4().hex[:6]}"
    port = free_port()
    daemon = subprocess.Popen(
        [EXE, "tail", str(logdir), "--tracking-uri", url, "--experiment-name", experiment, "--state-dir", str(work / "tail-state"),
         "--metrics-port", str(port), "--settle", "5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(300):
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        client = MlflowClient(tracking_uri=url)
        exp_id = client.get_experiment_by_name(experiment).experiment_id
        base = [r for r in capture() if r["status"] == "success"]
        appended: dict[str, float] = {}
        seen: dict[str, float] = {}
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < seconds or len(seen) < len(appended):
            if time.monotonic() - start < seconds and i < (time.monotonic() - start) * rate:
                r = dict(base[i % len(base)])
                r["litellm_call_id"] = r["id"] = str(uuid.uuid4())
                r["startTime"], r["endTime"] = time.time() - 0.5, time.time()
                r["completionStartTime"] = r["endTime"]
                with log.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                appended[r["litellm_call_id"]] = time.monotonic()
                i += 1
            for t in client.search_traces(locations=[exp_id], max_results=500, include_spans=False):
                cid = t.info.tags.get("litellm.call_id")
                if cid in appended and cid not in seen:
                    seen[cid] = time.monotonic()
            if time.monotonic() - start > seconds + 60:
                break
            time.sleep(0.05)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=30)
    lat = sorted(seen[c] - appended[c] for c in seen)
    return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.95))], len(lat)


def server_ceiling(url: str, path: Path, batch: int = 200, clients: int = 1) -> tuple[float, int]:
    """The server's own OTLP ceiling: our spans for the same input, pre-encoded and gzip'd, posted in a
    tight loop by ``clients`` concurrent connections (enough to keep a server's workers busy)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from ingest.dedupe import dedupe
    from ingest.normalize import normalize
    from ingest.sink import otlp_request
    from ingest.sources import read_chunks
    from ingest.spans import build_traces

    exp = requests.post(url + "/api/2.0/mlflow/experiments/create", json={"name": f"bench-ceiling-{uuid.uuid4().hex[:6]}"}, timeout=30)
    exp_id = exp.json()["experiment_id"]
    import polars as pl

    frame = pl.concat([normalize(chunk.lines)[0] for chunk in read_chunks(path)])
    traces = list(build_traces(dedupe(frame)[0], exp_id))  # deduped whole: no trace in two batches posted at once
    bodies = [gzip.compress(otlp_request(traces[i : i + batch]).SerializeToString(), 5) for i in range(0, len(traces), batch)]
    headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip", "x-mlflow-experiment-id": exp_id}
    local = threading.local()

    def post(body: bytes) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        local.session.post(url + "/v1/traces", data=body, headers=headers, timeout=300).raise_for_status()

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(post, bodies))
    return len(traces) / (time.monotonic() - start), len(traces)


def scrub_cost(path: Path, repeat: int = 3) -> tuple[float, float, int]:
    """Building spans, µs per trace, with the default credential scrubber and with a no-op one: in
    process, on the normalized and deduped records, best of ``repeat`` (a fresh scrubber each time,
    as each run starts with one)."""
    from ingest.dedupe import dedupe
    from ingest.normalize import normalize
    from ingest.scrub import Scrubber
    from ingest.sources import split_lines
    from ingest.spans import build_trace, group_calls

    class NoScrub(Scrubber):
        def text(self, s: str) -> str:
            return s

        def field(self, name: str, value: object) -> object:
            return value

        def spans(self, spans: object) -> None:
            return None

    lines, _ = split_lines(str(path), path.read_bytes(), 0, 1)
    frame = dedupe(normalize(lines)[0])[0]
    calls = list(group_calls(frame))

    def best(make: type[Scrubber]) -> float:
        times = []
        for _ in range(repeat):
            scrub = make()
            t0 = time.perf_counter()
            for rows in calls:
                build_trace(rows, "1", scrub=scrub)
            times.append(time.perf_counter() - t0)
        return min(times) / len(calls) * 1e6

    return best(Scrubber), best(NoScrub), len(calls)


def bucket_figures(work: Path, n_records: int, env: dict[str, str]) -> list[tuple[str, str, str, str, str]]:
    """Objects/s and traces/s reading an S3-compatible server on this machine (moto_server): the
    records once as per-call objects (``s3_v2``'s default, one JSON object each, no newline, in
    date partitions) and once as batch files (``s3_batch_file_upload``, 500 records each)."""
    import s3fs

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    s3env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    rows: list[tuple[str, str, str, str, str]] = []
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=s3env["AWS_ENDPOINT_URL"], key="bench", secret="bench")
        fs.mkdir("bench-logs")
        path = work / "bucket-input.jsonl"
        recs, calls = generate(path, n_records)
        lines = path.read_bytes().splitlines()
        per_call: dict[str, bytes] = {}
        for line in lines:
            r = orjson.loads(line)
            day = time.strftime("%Y-%m-%d", time.gmtime(r["startTime"]))
            per_call[f"bench-logs/calls/{day}/{r['id']}.json"] = line
        batches = {f"bench-logs/batches/{i // 500:05d}/batch_{i}.jsonl": b"\n".join(lines[i : i + 500]) for i in range(0, len(lines), 500)}
        fs.pipe(per_call)
        fs.pipe(batches)
        start = time.monotonic()
        fs.cat(list(per_call), on_error="return")
        ceiling = len(per_call) / (time.monotonic() - start)
        label = f"moto's own GET rate: fs.cat of the {len(per_call)} objects, nothing else"
        rows.append((label, "-", "-", "-", f"objects/s {ceiling:,.0f}"))
        mb = path.stat().st_size / 1e6
        for label, url, objects in (
            ("per-call objects", "s3://bench-logs/calls/", len(per_call)),
            ("batch files", "s3://bench-logs/batches/", len(batches)),
        ):
            _, rss, out = run_measured([EXE, "batch", "--no-state", "--dry-run", "--json", url], {**env, **s3env})
            in_run = json.loads(out)["seconds"]
            rows.append(
                (
                    f"bucket, {objects} {label}, fetch+parse (dry run), {recs} records",
                    f"{recs / in_run:,.0f}",
                    f"{mb / in_run:,.1f}",
                    f"{rss}",
                    f"objects/s {objects / in_run:,.0f}",
                )
            )
            db = work / f"bucket-{objects}.db"
            _, rss, out = run_measured([EXE, "batch", "--json", "--tracking-uri", f"sqlite:///{db}", url], {**env, **s3env})
            in_run = json.loads(out)["seconds"]
            rows.append(
                (
                    f"bucket, {objects} {label}, batch into SQLite (bulk), {calls} calls",
                    f"{recs / in_run:,.0f}",
                    f"{mb / in_run:,.1f}",
                    f"{rss}",
                    f"{calls / in_run:,.1f}",
                )
            )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
    return rows


def with_traceparents(src: Path, dest: Path) -> dict[str, tuple[str, str, float, float]]:
    """``src`` with a client ``traceparent`` on every record (one app trace per call, as autolog
    sends it); returns call id -> (app trace hex, LLM span hex, first start, last end)."""
    calls: dict[str, tuple[str, str, float, float]] = {}
    with src.open() as inp, dest.open("w") as out:
        for line in inp:
            r = json.loads(line)
            cid = r["litellm_call_id"]
            t, sp, lo, hi = calls.get(cid) or (uuid.uuid5(uuid.NAMESPACE_URL, cid).hex, uuid.uuid4().hex[:16], r["startTime"], r["endTime"])
            calls[cid] = (t, sp, min(lo, r["startTime"]), max(hi, r["endTime"]))
            md = r.setdefault("metadata", {})
            md.setdefault("requester_metadata", {}).setdefault("headers", {})["traceparent"] = f"00-{t}-{sp}-03"
            out.write(json.dumps(r) + "\n")
    return calls


def app_traces(db: str, calls: dict[str, tuple[str, str, float, float]]) -> None:
    """One finished app trace per call (an agent span and its LLM span), written with MLflow's own log_spans."""
    from mlflow.entities.span import Span
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

    from ingest.stores import store_for

    store = store_for(db)
    exp = store.create_experiment("bench-app")
    spans = []
    for t, llm, lo, hi in calls.values():
        root = uuid.uuid4().bytes[:8]
        for sid, parent, name in ((root, b"", "agent"), (bytes.fromhex(llm), root, "Completions")):
            s = OtlpSpan(trace_id=bytes.fromhex(t), span_id=sid, parent_span_id=parent, name=name)
            s.start_time_unix_nano, s.end_time_unix_nano = int((lo - 0.01) * 1e9), int((hi + 0.01) * 1e9)
            s.status.code = 1
            spans.append(Span.from_otel_proto(s))
        if len(spans) >= 1000:
            store.log_spans(exp, spans)
            spans = []
    if spans:
        store.log_spans(exp, spans)


def nesting_figures(work: Path, n_records: int, env: dict[str, str]) -> list[tuple[str, str, str, str, str]]:
    """Batch into SQLite where every call's app trace exists: nesting on, and off (``--no-nest``)."""
    plain, traced = work / "nest-plain.jsonl", work / "nest-traced.jsonl"
    recs, _ = generate(plain, n_records)
    calls = with_traceparents(plain, traced)
    mb = traced.stat().st_size / 1e6
    rows: list[tuple[str, str, str, str, str]] = []
    t, rss, _ = run_measured([EXE, "batch", "--no-state", "--dry-run", "--json", str(plain)], env)
    rows.append((f"no sink, {recs} records without a traceparent", f"{recs / t:,.0f}", f"{mb / t:,.1f}", f"{rss}", "-"))
    t, rss, _ = run_measured([EXE, "batch", "--no-state", "--dry-run", "--json", str(traced)], env)
    rows.append((f"no sink, {recs} records each with a traceparent", f"{recs / t:,.0f}", f"{mb / t:,.1f}", f"{rss}", "-"))
    base = work / "nest-base.db"
    app_traces(f"sqlite:///{base}", calls)
    for label, extra in (("--no-nest", ["--no-nest"]), ("nesting every call", [])):
        db = work / f"nest-{len(extra)}.db"
        shutil.copyfile(base, db)
        t, rss, out = run_measured([EXE, "batch", "--no-state", "--json", "--tracking-uri", f"sqlite:///{db}", *extra, str(traced)], env)
        summary = json.loads(out)
        label = f"batch into SQLite, {len(calls)} calls whose app traces exist, {label} ({summary['nested_calls']} nested)"
        rows += measured(label, recs, len(calls), mb, t, rss, summary["seconds"])
    return rows


def parse_figures(path: Path, env: dict[str, str], repeat: int = 7) -> list[tuple[str, str, str, str, str]]:
    """The parse stage alone, in process: the lines are read into chunks first, then decoded
    (json_decode alone vs read_ndjson bisected) and normalized with each, the four interleaved and
    each the best of ``repeat`` (other load on the machine drifts); then the whole no-sink run as a
    process."""
    sys.path.insert(0, str(ROOT))
    from ingest.normalize import fast_decode, normalize_isolating, safe_decode
    from ingest.schemas import all_schemas
    from ingest.sources import read_chunks

    mb = path.stat().st_size / 1e6
    chunks = [c.lines for c in read_chunks(path)]
    recs = sum(c.height for c in chunks)
    dtype = all_schemas()[-1].decode_dtype
    runs = {
        f"decode only, json_decode alone (before), {len(chunks)} chunks": lambda: [safe_decode(c["raw"], dtype) for c in chunks],
        f"decode only, read_ndjson bisected, {len(chunks)} chunks": lambda: [fast_decode(c["raw"], dtype) for c in chunks],
        "normalize in process, json_decode alone (before)": lambda: [normalize_isolating(c, {}, False) for c in chunks],
        "normalize in process, read_ndjson bisected": lambda: [normalize_isolating(c, {}, True) for c in chunks],
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            best[label] = min(best[label], time.perf_counter() - start)
    t = min(orjson_loop(path) for _ in range(3))
    rows = [(f"orjson loop over the file's lines, {recs} records", f"{recs / t:,.0f}", f"{mb / t:,.1f}", "-", "-")]
    narrow = {f.name: f.dtype for f in dtype.fields}
    for label, keep in (("orjson loop keeping the records", None), ("orjson loop into a frame of the read fields", narrow)):
        t = min(orjson_kept(path, keep) for _ in range(3))
        rows.append((label, f"{recs / t:,.0f}", f"{mb / t:,.1f}", "-", "-"))
    rows += [(label, f"{recs / t:,.0f}", f"{mb / t:,.1f}", "-", "-") for label, t in best.items()]
    t, rss, out = run_measured([EXE, "batch", "--no-state", "--dry-run", "--json", str(path)], env)
    summary = json.loads(out)
    rows += measured(f"ours, no sink (batch --dry-run), {recs} records", recs, summary["calls"], mb, t, rss, summary["seconds"])
    text = path.with_name("proxy-text.log")  # the proxy's own log in a folder read: every line quarantined
    text.write_text("".join(f"2026-11-27 14:01:{i % 60:02d} INFO litellm.proxy: POST /v1/chat/completions 200 OK\n" for i in range(recs)))
    t, rss, out = run_measured([EXE, "batch", "--no-state", "--dry-run", "--json", str(text)], env)
    seconds = json.loads(out)["seconds"]
    rows.append((f"a text log (no record, every line quarantined), {recs} lines, run time", f"{recs / seconds:,.0f}", "-", "-", "-"))
    return rows


def store_trace_count(con: psycopg.Connection, experiment: str) -> int:
    """Traces committed so far in a PostgreSQL store's experiment (0 before MLflow made its tables);
    ``con`` in autocommit, so a failed query leaves it usable."""
    import psycopg

    sql = "SELECT count(*) FROM trace_info t JOIN experiments e ON t.experiment_id = e.experiment_id WHERE e.name = %s"
    try:
        row = con.execute(sql, (experiment,)).fetchone()
        return int(row[0]) if row else 0
    except psycopg.Error:
        return 0


def daemons_run(uri: str, db: str, dirs: list[Path], calls: int, work: Path) -> tuple[float, float, float, int, int]:
    """One ``tail`` daemon per folder (files written whole beforehand), all started at once; the store
    polled until it holds every call. Returns (traces/s from the first trace seen to the last, traces/s
    from launch, seconds from launch to the first trace, the largest daemon's peak RSS MiB, traces seen
    at the first poll)."""
    import psycopg

    experiment = f"bench-daemons-{uuid.uuid4().hex[:6]}"
    logs = [work / f"{experiment}-{i}.log" for i in range(len(dirs))]
    daemons = []
    con = psycopg.connect(db, autocommit=True)
    launched = time.monotonic()
    for i, d in enumerate(dirs):
        args = [EXE, "tail", str(d), "--tracking-uri", uri, "--experiment-name", experiment,
                "--state-dir", str(work / f"{experiment}-state-{i}"), "--settle", "3", "--partial-timeout", "3"]  # fmt: skip
        with logs[i].open("wb") as log:
            daemons.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True))
    first = last = None
    first_count = 0
    try:
        deadline = launched + max(300.0, calls / 10)
        while time.monotonic() < deadline:
            n = store_trace_count(con, experiment)
            now = time.monotonic()
            if n and first is None:
                first, first_count = now, n
            if n >= calls:
                last = now
                break
            if any(p.poll() is not None for p in daemons):
                raise RuntimeError(f"a tail daemon exited: {[p.read_text()[-1000:] for p in logs]}")
            time.sleep(0.1)
    finally:
        rss = 0
        for p in daemons:
            if p.returncode is None:
                os.killpg(p.pid, signal.SIGTERM)
                _, _, usage = os.wait4(p.pid, 0)
                rss = max(rss, usage.ru_maxrss // 1024)
    got = store_trace_count(con, experiment)
    con.close()
    if first is None or last is None:
        raise RuntimeError(f"daemons wrote {got} of {calls} traces in time")
    rate = (calls - first_count) / (last - first) if last > first else float("nan")
    return rate, calls / (last - launched), first - launched, rss, first_count


def rate_cell(rate: float) -> str:
    return "-" if rate != rate else f"{rate:,.1f}"


def scaling_figures(
    work: Path,
    n_records: int,
    env: dict[str, str],
    server_workers: int = 2,
    call_rates: tuple[float, ...] = (10, 100, 1000),
    daemon_counts: tuple[int, ...] = (1, 2, 4),
) -> tuple[list[tuple[str, str, str, str, str]], list[str]]:
    """Scaling out, on one PostgreSQL (fsync=off) on this machine: 1, 2 and 4 ``tail`` daemons at once
    (the same records split over their files) directly and through an ``mlflow server --workers``
    on it, with that server's own ceiling; ``backfill --workers`` 1 and 2 into SQLite, PostgreSQL
    and the server; then what a call rate needs. Returns (rows, summary lines)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.pgkit import start_postgres

    rows: list[tuple[str, str, str, str, str]] = []
    direct, via_server = "PostgreSQL directly (bulk)", f"server --workers {server_workers}"
    cluster = start_postgres()
    server = None
    try:
        server_db = cluster.new_database()
        direct_db = cluster.new_database()
        (work / "pg-server").mkdir()
        server, url = start_server(work / "pg-server", server_db, server_workers)
        clients = 2 * server_workers
        ceiling_path, warm = work / "scaling-ceiling.jsonl", work / "scaling-warm.jsonl"
        generate(ceiling_path, min(n_records, 5000))
        generate(warm, 100)
        server_ceiling(url, warm, batch=10, clients=clients)  # every worker's first requests (lazy imports) out of the figures
        before, n_ceiling = server_ceiling(url, ceiling_path, clients=clients)
        per_k: dict[tuple[str, int], float] = {}
        for k in daemon_counts:
            dirs = [work / f"daemons-{k}-{i}" for i in range(k)]
            calls = recs = 0
            for i, d in enumerate(dirs):
                d.mkdir()
                r, c = generate(d / "proxy.jsonl", n_records // k + (i < n_records % k))
                recs, calls = recs + r, calls + c
            for via, uri, db in ((direct, direct_db, direct_db), (via_server, url, server_db)):
                rate, with_startup, startup, rss, first_count = daemons_run(uri, db, dirs, calls, work)
                per_k[(via, k)] = rate
                label = (
                    f"tail x{k} -> {via}, {calls} calls in {k} files: first trace to last / from launch "
                    f"(launch to first trace {startup:.1f} s, {first_count} by then)"
                )
                rows.append((label, "-", "-", f"{rss}", f"{rate_cell(rate)} / {with_startup:,.1f}"))
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
        after, _ = server_ceiling(url, ceiling_path, clients=clients)
        rows.append(
            (
                f"server's own OTLP ceiling, --workers {server_workers}, {clients} clients, {n_ceiling} traces, before/after",
                "-",
                "-",
                "-",
                f"{before:,.1f} / {after:,.1f}",
            )
        )
        path = work / "scaling-backfill.jsonl"
        recs, calls = generate(path, n_records)
        mb = path.stat().st_size / 1e6
        backfill_tps: dict[tuple[str, int], float] = {}
        for w in (1, 2):
            for name, uri in (
                ("SQLite (bulk)", f"sqlite:///{work / f'backfill-{w}.db'}"),
                ("PostgreSQL (bulk)", cluster.new_database()),
                (f"server --workers {server_workers}", url),
            ):
                tag = uuid.uuid4().hex[:6]
                args = [EXE, "backfill", str(path), "--workers", str(w), "--json", "--tracking-uri", uri,
                        "--experiment-name", f"bench-backfill-{tag}", "--state-dir", str(work / f"bf-{tag}")]  # fmt: skip
                t, rss, out = run_measured(args, env)
                summary = json.loads(out)
                written = summary["traces_written"]
                backfill_tps[(name, w)] = written / summary["seconds"]
                rows += measured(
                    f"backfill --workers {w} -> {name}, {recs} records / {written} traces", recs, written, mb, t, rss, summary["seconds"]
                )
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        cluster.stop()

    import math

    ceiling = (before + after) / 2
    direct1, via1 = per_k[(direct, 1)], per_k[(via_server, 1)]
    best = max((r for (v, _), r in per_k.items() if v == direct and r == r), default=float("nan"))
    lines = [
        f"scaling: all on this {os.cpu_count()}-core machine (daemons, PostgreSQL with fsync=off, server): one daemon "
        f"{rate_cell(direct1)} traces/s into PostgreSQL directly, {rate_cell(via1)} through the server; the most daemons together "
        f"took directly {rate_cell(best)}/s; the server's ceiling {ceiling:,.1f}/s at {server_workers} workers "
        f"= {ceiling / server_workers:,.1f}/s per worker (mean of before and after)"
    ]
    gains = ", ".join(f"{name} x{backfill_tps[(name, 2)] / backfill_tps[(name, 1)]:.2f}" for name, w in backfill_tps if w == 1)
    lines.append(f"backfill: --workers 2 over --workers 1 (traces_written / the run's own seconds): {gains}")
    for r in call_rates:
        if direct1 == direct1 and via1 == via1:
            lines.append(
                f"sizing: {r:g} calls/s needs {math.ceil(r / direct1)} daemon(s) into PostgreSQL directly, or "
                f"{math.ceil(r / via1)} daemon(s) and {math.ceil(r / (ceiling / server_workers))} server worker(s) through a server"
            )
        else:
            lines.append("sizing: every trace landed by the first poll, no rate: use a larger --scaling-records")
            break
    return rows, lines


def print_rows(rows: list[tuple[str, str, str, str, str]]) -> None:
    header = ("stage", "records/s", "MB/s", "peak RSS MiB", "traces/s")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(5)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def scrub_line(path: Path) -> str:
    with_scrub, without, n = scrub_cost(path)
    return (
        f"scrubbing: building spans {with_scrub:,.0f} µs/trace with the credential scrubber, {without:,.0f} µs without "
        f"(+{with_scrub - without:,.0f} µs, +{100 * (with_scrub - without) / without:.0f}%), over {n} traces"
    )


def files_figures(work: Path, n_files: int, env: dict[str, str]) -> list[tuple[str, ...]]:
    """A synced bucket of a per-call logger: ``n_files`` one-record files in date folders, backfilled
    (default --workers) into a new SQLite store, run again (nothing new: every file is known), and
    read by ``batch --no-state --dry-run``."""
    path = work / "files-input.jsonl"
    recs, calls = generate(path, n_files)
    root = work / "bucket"
    for i, line in enumerate(path.read_text().splitlines()):
        day = root / f"day={i % 30:02d}"
        day.mkdir(parents=True, exist_ok=True)
        (day / f"{i:07d}.json").write_text(line)
    mb = path.stat().st_size / 1e6
    rows: list[tuple[str, ...]] = []
    store, state = f"sqlite:///{work / 'files.db'}", str(work / "files-state")
    backfill = [EXE, "backfill", "--json", "--tracking-uri", store, "--state-dir", state, str(root)]
    t, rss, out = run_measured(backfill, env)
    label = f"backfill of {recs} one-record files into SQLite ({calls} calls)"
    rows += measured(label, recs, calls, mb, t, rss, json.loads(out)["seconds"])
    t, rss, out = run_measured(backfill, env)
    rows.append((f"  the same backfill again: {recs} files known, nothing new", f"{recs / t:,.0f} files/s", "-", f"{rss}", "-"))
    t, rss, out = run_measured([EXE, "batch", "--no-state", "--dry-run", "--json", str(root)], env)
    rows += measured(f"batch --no-state --dry-run of the {recs} files", recs, calls, mb, t, rss, json.loads(out)["seconds"])
    rows.append(tail_over_files(work, root, recs, calls, env))
    return rows


def tail_over_files(work: Path, root: Path, files: int, calls: int, env: dict[str, str]) -> tuple[str, ...]:
    """A ``tail`` daemon started on the folder (its default descriptor budget): seconds until every
    call is a trace in a new SQLite store, then its CPU over 10 idle seconds (a scan a second)."""
    import sqlite3

    db = work / "files-tail.db"
    args = [
        EXE,
        "tail",
        str(root),
        "--pattern",
        "*.json",
        "--tracking-uri",
        f"sqlite:///{db}",
        "--state-dir",
        str(work / "files-tail-state"),
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def traces() -> int:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return int(con.execute("SELECT count(*) FROM trace_info").fetchone()[0])
        except sqlite3.Error:
            return 0

    def cpu_s() -> float:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    started = time.monotonic()
    try:
        while traces() < calls:
            if proc.poll() is not None or time.monotonic() - started > max(600.0, files / 5):
                raise RuntimeError(f"the tail daemon wrote {traces()} of {calls} traces")
            time.sleep(0.2)
        took = time.monotonic() - started
        before = cpu_s()
        time.sleep(10)
        idle = (cpu_s() - before) / 10
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    label = f"tail daemon started on the {files} files (SQLite): all traces in, then idle"
    return (label, f"{files / took:,.0f} files/s", "-", "-", f"{took:.1f} s; idle: {idle:.1%} of a core")


def sqlite_figures(work: Path, path: Path, n_records: int, env: dict[str, str]) -> tuple[list[tuple[str, ...]], float, str]:
    """Into a new local SQLite store each: ``batch`` (one process) and ``backfill`` at 1 and at the
    default ``--workers`` (the machine's cores). A throwaway run first, so that every measured
    store is made as a user's second one is (a copy of the cached empty schema, see ``ingest.stores``).
    Returns (rows, the best whole-process traces/s, a summary line)."""
    recs, calls = generate(path, n_records)
    mb = path.stat().st_size / 1e6
    warm = work / "warm.jsonl"
    generate(warm, 10)
    run_measured([EXE, "batch", "--no-state", "--json", "--tracking-uri", f"sqlite:///{work / 'warm.db'}", str(warm)], env)
    rows: list[tuple[str, ...]] = []
    rates: dict[str, tuple[float, float]] = {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    runs = [("batch", ["batch", "--no-state"]), ("backfill --workers 1", ["backfill", "--workers", "1"])]
    runs.append((f"backfill --workers {cores} (the default)", ["backfill", "--workers", str(cores)]))
    for label, command in runs:
        db, state = work / f"sqlite-{len(rates)}.db", work / f"sqlite-state-{len(rates)}"
        args = [EXE, *command, "--json", "--tracking-uri", f"sqlite:///{db}", str(path)]
        t, rss, out = run_measured(args + (["--state-dir", str(state)] if command[0] == "backfill" else []), env)
        summary = json.loads(out)
        assert summary["traces_written"] == calls, summary
        rates[label] = (calls / t, calls / summary["seconds"])
        row = f"ours, {label} into local SQLite (bulk writer), {recs} records / {calls} calls"
        rows += measured(row, recs, calls, mb, t, rss, summary["seconds"])
    best = max(rates, key=lambda k: rates[k][0])
    line = "SQLite: " + "; ".join(f"{k} {w:,.0f} traces/s whole process ({r:,.0f} in the run)" for k, (w, r) in rates.items())
    return rows, rates[best][0], line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5000,50000", help="records per generated input, comma-separated")
    ap.add_argument("--sink-records", type=int, default=20000, help="records for the bulk SQLite run")
    ap.add_argument(
        "--slow-records", type=int, default=2000, help="records for the runs through MLflow's per-row writers (log_spans, server)"
    )
    ap.add_argument("--callback-calls", type=int, default=200)
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--skip-callback", action="store_true")
    ap.add_argument("--skip-tail", action="store_true")
    ap.add_argument("--tail-rate", type=float, default=5.0, help="calls/s appended in the tail latency run")
    ap.add_argument("--tail-seconds", type=float, default=20.0)
    ap.add_argument("--only-scrub", action="store_true", help="print only the credential scrubber's cost and exit")
    ap.add_argument("--only-buckets", action="store_true", help="print only the bucket figures (moto S3 server) and exit")
    ap.add_argument("--skip-buckets", action="store_true")
    ap.add_argument("--only-nesting", action="store_true", help="print only the nesting figures (SQLite) and exit")
    ap.add_argument("--nesting-records", type=int, default=5000, help="records for the nesting figures")
    ap.add_argument("--only-files", action="store_true", help="print only the figures for a directory of one-record files and exit")
    ap.add_argument("--files", type=int, default=5000, help="one-record files for --only-files")
    ap.add_argument("--only-sqlite", action="store_true", help="print only the runs into local SQLite (--sink-records) and exit")
    ap.add_argument("--only-parse", action="store_true", help="print only the parse stage figures (first of --sizes) and exit")
    ap.add_argument("--bucket-records", type=int, default=5000, help="records uploaded as objects for the bucket figures")
    ap.add_argument("--only-scaling", action="store_true", help="print only the scaling-out figures (PostgreSQL, server) and exit")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--scaling-records", type=int, default=20000, help="records per daemons run (split over the daemons) and per backfill")
    ap.add_argument("--scaling-server-workers", type=int, default=2, help="--workers of the PostgreSQL-backed server")
    ap.add_argument("--scaling-daemons", default="1,2,4", help="how many daemons run at once, comma-separated (1 comes first)")
    ap.add_argument("--call-rates", default="10,100,1000", help="calls/s to size daemons and server workers for")
    args = ap.parse_args()
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(name, None)  # every run names a store of the bench's own: an inherited experiment id is in none of them
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="litellm-ingest-bench-"))
    rows: list[tuple[str, str, str, str, str]] = []
    env = {"LITELLM_INGEST_STATE_DIR": str(work / "state")}
    print(f"machine: {os.cpu_count()} cores, {os.uname().machine}, Python {sys.version.split()[0]}; workdir {work}", flush=True)
    if args.only_scrub:
        path = work / "scrub-input.jsonl"
        generate(path, sizes[0])
        print(scrub_line(path))
        shutil.rmtree(work, ignore_errors=True)
        return
    if args.only_buckets:
        print_rows(bucket_figures(work, args.bucket_records, env))
        shutil.rmtree(work, ignore_errors=True)
        return
    if args.only_nesting:
        print_rows(nesting_figures(work, args.nesting_records, env))
        shutil.rmtree(work, ignore_errors=True)
        return
    if args.only_sqlite:
        sqlite_rows, _, sqlite_line = sqlite_figures(work, work / "sink-input.jsonl", args.sink_records, env)
        print_rows(sqlite_rows)
        print(sqlite_line)
        shutil.rmtree(work, ignore_errors=True)
        return
    if args.only_files:
        print_rows(files_figures(work, args.files, env))
        shutil.rmtree(work, ignore_errors=True)
        return
    if args.only_parse:
        path = work / "parse-input.jsonl"
        generate(path, sizes[0])
        print_rows(parse_figures(path, env))
        shutil.rmtree(work, ignore_errors=True)
        return
    rates = tuple(float(r) for r in args.call_rates.split(","))
    daemon_counts = tuple(sorted({1, *(int(k) for k in args.scaling_daemons.split(","))}))
    if args.only_scaling:
        scaling_rows, scaling_lines = scaling_figures(work, args.scaling_records, env, args.scaling_server_workers, rates, daemon_counts)
        print_rows(scaling_rows)
        print("\n".join(scaling_lines))
        shutil.rmtree(work, ignore_errors=True)
        return

    rss_by_size = []
    for n in sizes:
        path = work / f"input-{n}.jsonl"
        recs, calls = generate(path, n)
        mb = path.stat().st_size / 1e6
        t = orjson_loop(path)
        rows.append((f"orjson loop (parse only), {recs} records", f"{recs / t:,.0f}", f"{mb / t:,.1f}", "-", "-"))
        t, rss, _ = run_measured([EXE, "batch", "--no-state", "--dry-run", "--json", str(path)], env)
        rows.append((f"ours, no sink (parse+normalize+dedupe+build), {recs} records", f"{recs / t:,.0f}", f"{mb / t:,.1f}", f"{rss}", "-"))
        rss_by_size.append((n, rss))

    path = work / "sink-input.jsonl"
    sqlite_rows, sqlite_tps, sqlite_line = sqlite_figures(work, path, args.sink_records, env)
    rows += sqlite_rows
    scrubbing = scrub_line(path)

    slow = work / "slow-input.jsonl"
    recs, calls = generate(slow, args.slow_records)
    mb = slow.stat().st_size / 1e6
    t, rss, _ = run_measured(
        [EXE, "batch", "--no-state", "--json", "--sql-writer", "mlflow", "--tracking-uri", f"sqlite:///{work / 'slow.db'}", str(slow)], env
    )
    rows += measured(f"ours, batch into local SQLite via MLflow's log_spans, {recs} records / {calls} calls", recs, calls, mb, t, rss)
    path = slow

    callback_tps = None
    if not args.skip_callback:
        t = callback_style(f"sqlite:///{work / 'callback.db'}", capture(), args.callback_calls)
        callback_tps = args.callback_calls / t
        rows.append(
            (f"callback-style start/end_trace (sync) into SQLite, {args.callback_calls} calls", "-", "-", "-", f"{callback_tps:,.1f}")
        )
    tail_line = ceiling_line = None
    if not args.skip_server:
        server, url = start_server(work)
        try:
            before, n_ceiling = server_ceiling(url, path)
            t, rss, out = run_measured([EXE, "batch", "--no-state", "--json", "--tracking-uri", url, str(path)], env)
            after, _ = server_ceiling(url, path)
            ceiling = (before + after) / 2
            in_run = json.loads(out)["seconds"]
            rows += measured(f"ours, batch into mlflow server (OTLP), {calls} calls", recs, calls, mb, t, rss, in_run)
            server_tps = calls / in_run
            rows.append(
                (
                    f"server's own OTLP ceiling (pre-encoded, tight loop), {n_ceiling} traces, before/after ours",
                    "-",
                    "-",
                    "-",
                    f"{before:,.1f} / {after:,.1f}",
                )
            )
            share = 100 * server_tps / ceiling
            ceiling_line = (
                f"server: ours {server_tps:,.1f} traces/s (start-up excluded, as in the ceiling; {calls / t:,.1f} with it) "
                f"= {share:.0f}% of the server's own ceiling ({ceiling:,.1f}/s, mean of before and after)"
            )
            if not args.skip_tail:
                p50, p95, n_lat = tail_latency(url, work, args.tail_rate, args.tail_seconds)
                rows.append((f"tail: append -> visible in MLflow, {n_lat} calls at {args.tail_rate:g}/s", "-", "-", "-", "-"))
                tail_line = f"tail latency: p50 {p50:.2f} s, p95 {p95:.2f} s over {n_lat} calls at {args.tail_rate:g} calls/s"
            if not args.skip_callback:
                t = callback_style(url, capture(), args.callback_calls)
                rows.append(
                    (
                        f"callback-style start/end_trace (sync) into the server, {args.callback_calls} calls",
                        "-",
                        "-",
                        "-",
                        f"{args.callback_calls / t:,.1f}",
                    )
                )
        finally:
            os.killpg(server.pid, signal.SIGTERM)

    if not args.skip_buckets:
        rows += bucket_figures(work, args.bucket_records, env)
    scaling_lines: list[str] = []
    if not args.skip_scaling:
        scaling_rows, scaling_lines = scaling_figures(work, args.scaling_records, env, args.scaling_server_workers, rates, daemon_counts)
        rows += scaling_rows
    print_rows(rows)
    if len(rss_by_size) > 1:
        (n0, r0), (n1, r1) = rss_by_size[0], rss_by_size[-1]
        print(
            f"memory: peak RSS {r0} MiB at {n0} records, {r1} MiB at {n1} records ({(r1 - r0) / r0 * 100:+.0f}% for {n1 / n0:.0f}x input)"
        )
    print(scrubbing)
    print(sqlite_line)
    if ceiling_line:
        print(ceiling_line)
    if tail_line:
        print(tail_line)
    for line in scaling_lines:
        print(line)
    if callback_tps:
        print(
            f"headline: into SQLite {sqlite_tps:,.0f} traces/s (whole process) = {sqlite_tps / callback_tps:.1f}x "
            f"the callback-style writer into SQLite ({callback_tps:.1f}/s)"
        )
    else:
        print(f"headline: into SQLite {sqlite_tps:,.0f} traces/s (whole process)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
