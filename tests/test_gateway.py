"""MLflow behind a gateway that does not let the ingester through: a login page, or an ingress that
redirects some paths. ``requests`` followed a redirect, turning the OTLP POST into a GET that the
login page answered 200: the spans were counted as written and the checkpoints moved, while
MLflow never saw them. Now such an answer is an error, and nothing is marked read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import all_traces, copies, run_cli, soak_only, write_jsonl
from tests.tailkit import Daemon, metric, wait_for, wait_for_calls

LOGIN = b"<!doctype html><html><body><form action='/login'>Sign in</form></body></html>"


class Gateway:
    """A reverse proxy in front of a real MLflow server; ``blocks(method, path)`` picks the requests
    it answers itself: redirected to its login page (``how="redirect"``), answered with it
    (``"page"``), with a plain ``OK`` (``"ok"``), ``404`` (a server that does not serve the route,
    as ``mlflow server --gunicorn-opts`` left /v1/traces), ``502`` or ``503`` (its upstream down or
    busy), or not at all (``"stall"``: taken, never answered nor passed on, until ``released``)."""

    def __init__(self, upstream: str, how: str, blocks: Callable[[str, str], bool]) -> None:
        self.upstream, self.how, self.blocks = upstream, how, blocks
        self.stalled, self.released = threading.Event(), threading.Event()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/login"):
                    return self._answer(200, LOGIN, {"Content-Type": "text/html; charset=utf-8"})
                if gateway.blocks(self.command, self.path):
                    if gateway.how == "redirect":
                        return self._answer(302, b"", {"Location": f"{gateway.url}/login?next={self.path}"})
                    if gateway.how == "ok":
                        return self._answer(200, b"OK", {"Content-Type": "text/plain"})
                    if gateway.how in ("502", "503"):
                        return self._answer(int(gateway.how), b"<html><body>Unavailable</body></html>", {"Content-Type": "text/html"})
                    if gateway.how == "stall":
                        gateway.stalled.set()
                        gateway.released.wait(600)
                        return None
                    if gateway.how == "404":
                        return self._answer(404, b"<html><body>\n<h1>Not Found</h1>\n</body></html>", {"Content-Type": "text/html"})
                    return self._answer(200, LOGIN, {"Content-Type": "text/html; charset=utf-8"})
                skip = {"host", "content-length", "connection"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                r = requests.request(self.command, gateway.upstream + self.path, data=body, headers=headers, timeout=60)
                kept = {k: v for k, v in r.headers.items() if k.lower() in ("content-type", "content-encoding")}
                self._answer(r.status_code, r.content, kept)

            do_GET = do_POST = do_DELETE = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway(mlflow_server: Any) -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(how: str, blocks: Callable[[str, str], bool]) -> Gateway:
        made.append(Gateway(mlflow_server.url, how, blocks))
        return made[-1]

    yield make
    for g in made:
        g.close()


def _batch(uri: str, logs: Path, state: Path, experiment: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    args = ["batch", str(logs), "--tracking-uri", uri, "--experiment-name", experiment, "--state-dir", str(state), "--json"]
    return run_cli(args, Path.cwd(), env, 180)


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("redirect", "redirected POST /v1/traces (302) to http://127.0.0.1/login"),
        ("page", "answered POST /v1/traces with a web page"),
        ("ok", "answered the spans 200 with text/plain"),
        ("404", "send traces: MLflow answered 404, no OTLP route at /v1/traces"),
    ],
)
def test_a_gateway_that_keeps_the_spans_from_mlflow_fails_the_run_and_nothing_is_marked_read(
    gateway: Callable[..., Gateway], mlflow_server: Any, capture: list[dict], tmp_path: Path, how: str, said: str
) -> None:
    """Only the OTLP endpoint is kept from MLflow (an ingress routing it elsewhere, a login for
    writes): the experiment is found, the lookups go through, the spans do not."""
    experiment = f"gateway-{uuid.uuid4().hex[:8]}"
    calls = copies(capture, 1, experiment)[0]
    if how == "404":  # one call, a batch of one trace: it was quarantined as unwritable, exit 3, and lost
        calls = [r for r in calls if r["litellm_call_id"] == calls[0]["litellm_call_id"]]
    logs = write_jsonl(tmp_path / "logs" / "proxy.jsonl", calls).parent
    blocking = {"on": True}
    blocked = gateway(how, lambda method, path: blocking["on"] and method == "POST" and path == "/v1/traces")
    first = _batch(blocked.url, logs, tmp_path / "state", experiment)
    assert first.returncode == 4 and "Traceback" not in first.stderr, (first.stdout, first.stderr)
    assert said in first.stderr.replace(f":{blocked.server.server_address[1]}", ""), first.stderr
    assert len(first.stderr.strip().splitlines()) == 1 and not (tmp_path / "state" / "quarantine.jsonl").exists()
    assert all_traces(mlflow_server.url, experiment, missing_ok=True) == []
    blocking["on"] = False  # the same address (the state is per destination), now let through
    again = _batch(blocked.url, logs, tmp_path / "state", experiment)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["records_read"] == len(calls), "the first run marked lines read"
    assert len(all_traces(mlflow_server.url, experiment)) == len({r["litellm_call_id"] for r in calls})


def test_a_daemon_behind_a_gateway_that_redirects_its_writes_holds_them_until_it_lets_them_through(
    gateway: Callable[..., Gateway], mlflow_server: Any, capture: list[dict], tmp_path: Path
) -> None:
    experiment = f"gateway-{uuid.uuid4().hex[:8]}"
    by_call: dict[str, list[dict]] = {}
    for r in copies(capture, 1, experiment)[0]:
        by_call.setdefault(r["litellm_call_id"], []).append(r)
    calls = list(by_call.values())
    requests.post(f"{mlflow_server.url}/api/2.0/mlflow/experiments/create", json={"name": experiment}, timeout=30).raise_for_status()
    blocking = {"on": True}
    g = gateway("redirect", lambda method, path: blocking["on"] and method == "POST")
    logdir = tmp_path / "logs"
    write_jsonl(logdir / "proxy.jsonl", [r for c in calls for r in c])
    d = Daemon(logdir, g.url, experiment, tmp_path / "state").start()
    try:
        wait_for(lambda: "redirected POST" in d.log.read_text() or not d.alive(), 60, "the daemon to name the redirect")
        assert d.alive() and metric(d.metrics(), "litellm_ingest_mlflow_up") == 0, d.log.read_text()[-3000:]
        assert metric(d.metrics(), "litellm_ingest_spans_written_total") == 0
        assert all_traces(mlflow_server.url, experiment) == []
        blocking["on"] = False
        traces = wait_for_calls(mlflow_server.url, experiment, calls)
        assert sorted(t.info.tags["litellm.call_id"] for t in traces) == sorted({c[0]["litellm_call_id"] for c in calls})
        assert d.stop() == 0
    finally:
        if d.alive():
            d.stop()


def test_a_reconcile_whose_server_stops_answering_its_search_ends_with_exit_4_in_one_line(
    gateway: Callable[..., Gateway], mlflow_server: Any, capture: list[dict], tmp_path: Path
) -> None:
    """The server takes reconcile's trace search and never answers it (a stalled worker): the search
    went through MLflow's own client, whose 120 s timeout and retries held a cron reconcile for
    minutes. Now it is watched as a write is: given up after ``--mlflow-timeout`` (10 s
    at least), in one line, exit 4."""
    experiment = f"gateway-{uuid.uuid4().hex[:8]}"
    logs = write_jsonl(tmp_path / "logs" / "proxy.jsonl", copies(capture, 1, experiment)[0]).parent
    assert _batch(mlflow_server.url, logs, tmp_path / "state", experiment).returncode == 0
    g = gateway("stall", lambda method, path: path.startswith("/api/3.0/mlflow/traces/search"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    args = ["reconcile", str(logs), "--tracking-uri", g.url, "--experiment-name", experiment, "--mlflow-timeout", "3"]
    started = time.monotonic()
    proc = run_cli(args, Path.cwd(), env, 120)
    assert g.stalled.is_set(), "the search never reached the server"
    assert proc.returncode == 4 and time.monotonic() - started < 60, (time.monotonic() - started, proc.stderr[-2000:])
    assert "has not answered" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_server_started_with_gunicorn_opts_is_named_as_having_no_otlp_route(tmp_path: Path, capture: list[dict]) -> None:
    """``mlflow server --gunicorn-opts …`` (a common way to set its timeouts) serves MLflow's Flask app
    alone, without ``/v1/traces``: the run said only "MLflow answered 404" and the server's page.
    Now the one line says why and what to start the server with."""
    from tests.conftest import start_mlflow_server

    server = start_mlflow_server(tmp_path / "server", extra_args=("--gunicorn-opts", "--timeout 60"))
    try:
        logs = write_jsonl(tmp_path / "logs" / "proxy.jsonl", copies(capture, 1, "gunicorn")[0]).parent
        proc = _batch(server.url, logs, tmp_path / "state", "gunicorn")
    finally:
        server.stop()
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "no OTLP route at /v1/traces" in proc.stderr and "--gunicorn-opts" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(("how", "command"), [("stall", "batch"), ("503", "backfill")])
def test_a_server_that_stops_answering_or_fails_mid_run_ends_the_run_within_its_timeout(
    gateway: Callable[..., Gateway], mlflow_server: Any, capture: list[dict], tmp_path: Path, how: str, command: str
) -> None:
    """The server takes the spans of the first batches, then stops answering (a stalled worker) or
    answers 503. A run waited 120 s (the request's own timeout) for each batch's silent POST, and
    each batch queued in the step (in this process or a backfill worker) retried the outage for a
    whole ``--mlflow-timeout`` in turn: minutes past it. Now a request waits what is left of the
    timeout, and once one call has waited it out the rest of the run fails at once: exit 4 in one
    line within the timeout, and the next run writes every call once."""
    experiment = f"gateway-{uuid.uuid4().hex[:8]}"
    records = [r for copy in copies(capture, 10, experiment) for r in copy]
    logs = write_jsonl(tmp_path / "logs" / "proxy.jsonl", records).parent
    posts, blocking = iter(range(10**6)), {"on": True}
    g = gateway(how, lambda method, path: blocking["on"] and path == "/v1/traces" and next(posts) >= 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    args = [command, str(logs), "--tracking-uri", g.url, "--experiment-name", experiment, "--state-dir", str(tmp_path / "state")]
    extra = ["--batch-size", "20", "--mlflow-timeout", "12", *(["--workers", "2"] if command == "backfill" else [])]
    started = time.monotonic()
    proc = run_cli([*args, *extra], tmp_path, env, 100)
    took = time.monotonic() - started
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert took < 12 + 20, (took, proc.stderr)
    blocking["on"] = False
    g.released.set()
    again = run_cli(args, tmp_path, env, 180)
    assert again.returncode == 0, again.stderr[-2000:]
    got = [t.info.tags["litellm.call_id"] for t in all_traces(mlflow_server.url, experiment, include_spans=False)]
    assert sorted(got) == sorted({r["litellm_call_id"] for r in records})


@pytest.mark.parametrize(
    "run", [["backfill", "--workers", "2"], ["backfill", "--workers", "1"], pytest.param(["batch"], marks=soak_only)], ids=" ".join
)  # batch writes from one process as backfill --workers 1 does
def test_a_second_ctrl_c_stops_a_run_whose_writes_wait_on_a_silent_server_at_once(
    run: list[str], gateway: Callable[..., Gateway], mlflow_server: Any, capture: list[dict], tmp_path: Path
) -> None:
    """Ctrl-C twice stops at once (README). With workers, they ignore it and the run waited for each
    one's request to a server that stopped answering, up to ``--mlflow-timeout``; in one process the
    second Ctrl-C was swallowed while the other writes in flight were awaited, then the sender
    threads were joined, at the close and again at the interpreter's exit."""
    import signal

    experiment = f"gateway-{uuid.uuid4().hex[:8]}"
    records = [r for copy in copies(capture, 10, experiment) for r in copy]
    logs = write_jsonl(tmp_path / "logs" / "proxy.jsonl", records).parent
    blocking = {"on": True}
    g = gateway("stall", lambda method, path: blocking["on"] and path == "/v1/traces")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    args = [run[0], str(logs), "--tracking-uri", g.url, "--experiment-name", experiment, "--state-dir", str(tmp_path / "state"),
            *run[1:], "--batch-size", "20"]  # fmt: skip
    exe = str(Path(sys.executable).parent / "litellm-ingest")
    proc = subprocess.Popen([exe, *args, "--mlflow-timeout", "120"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert g.stalled.wait(120), "no write reached the server"
        time.sleep(2)
        for _ in range(2):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
        started = time.monotonic()
        _, err = proc.communicate(timeout=100)
        took = time.monotonic() - started
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert took < 10, (took, err[-2000:])
    blocking["on"] = False
    g.released.set()
    again = run_cli(args, tmp_path, env, 180)
    assert again.returncode == 0, again.stderr[-2000:]
    got = [t.info.tags["litellm.call_id"] for t in all_traces(mlflow_server.url, experiment, include_spans=False)]
    assert sorted(got) == sorted({r["litellm_call_id"] for r in records}), "every call once"
