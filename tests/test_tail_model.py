"""Model-based test of the tail daemon (after Vector's file-source model test).

Hypothesis drives random sequences of: append whole calls, append half a line, complete it,
rotate by rename (kept, gzipped or deleted), copytruncate, restart the daemon (SIGTERM or
SIGKILL), stop and start MLflow. The model is just the list of calls written. Invariant, once
everything is quiet: the call ids in MLflow are exactly the calls written, each once.

The same model runs in-process against the file-following core in CI (tests/test_follow.py, hundreds
of sequences in seconds); this real-process version is the soak: LITELLM_INGEST_SOAK=50 pytest tests/test_tail_model.py
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from tests.conftest import all_traces, read_capture, start_mlflow_server
from tests.tailkit import Daemon, Writer, fresh_calls, rotate, spans_of, wait_for_calls

SOAK = int(os.environ.get("LITELLM_INGEST_SOAK", "0"))
SCAN_S = 2.0
"""Long enough for the daemon's next scan (every second) to have seen the current log."""


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    workdir = tmp_path_factory.mktemp("model-server")
    holder = {"server": start_mlflow_server(workdir)}
    yield holder
    holder["server"].stop()


@pytest.mark.skipif(not SOAK, reason="a soak: set LITELLM_INGEST_SOAK=N (tests/test_follow.py runs the model in-process in CI)")
def test_tail_model(model_server, tmp_path_factory: pytest.TempPathFactory) -> None:
    capture = read_capture()

    class TailModel(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.root = tmp_path_factory.mktemp("model")
            self.logdir = self.root / "logs"
            self.logdir.mkdir()
            self.log = self.logdir / "proxy.jsonl"
            self.log.touch()
            self.experiment = f"model-{uuid.uuid4().hex[:8]}"
            self.writer = Writer(self.log)
            self.pool = fresh_calls(capture, copies=3)
            self.partial: list[dict] | None = None
            self.rotations = 0
            self.mlflow_up = True
            self.daemon = self._daemon().start()
            self.log_seen_from = time.monotonic()

        def _daemon(self) -> Daemon:
            # Half lines wait as long as a sequence runs: the model completes every line it starts.
            return Daemon(self.logdir, model_server["server"].url, self.experiment, self.root / "state", "--partial-timeout", "600")

        def _take(self, n: int) -> list[list[dict]]:
            out, self.pool = self.pool[:n], self.pool[n:]
            if not self.pool:
                self.pool = fresh_calls(capture)
            return out

        @rule(n=st.integers(min_value=1, max_value=8))
        def append_calls(self, n: int) -> None:
            if self.partial is None:
                self.writer.write_calls(self._take(n))

        @precondition(lambda self: self.partial is None)
        @rule()
        def append_half_a_line(self) -> None:
            (call,) = self._take(1)
            call = call[:1]
            line = json.dumps(call[0])
            with self.writer.lock, self.log.open("a") as f:
                f.write(line[: len(line) // 2])
            self.partial = call

        @precondition(lambda self: self.partial is not None)
        @rule()
        def complete_the_line(self) -> None:
            assert self.partial is not None
            line = json.dumps(self.partial[0])
            with self.writer.lock, self.log.open("a") as f:
                f.write(line[len(line) // 2 :] + "\n")
            self.writer.written.append(self.partial)
            self.partial = None

        @precondition(lambda self: self.partial is None)
        @rule(how=st.sampled_from(["rename_create", "copytruncate"]), keep=st.sampled_from(["kept", "gzipped", "deleted"]))
        def rotate_log(self, how: str, keep: str) -> None:
            if how == "rename_create" and keep == "deleted":
                # a log made and deleted before any scan saw it (within a second, or while a daemon
                # restarts) is missed by any reader (README: "tail"); one a scan saw is not
                time.sleep(max(0.0, self.log_seen_from + SCAN_S - time.monotonic()))
            self.rotations += 1
            with self.writer.lock:
                left = rotate(self.log, how, "numbered" if self.rotations % 2 else "timestamped", keep, n=self.rotations)
            if left is not None:
                time.sleep(3.0)  # a copytruncate copy is deleted only at the next rotation, not the same instant
                left.unlink()
            self.log_seen_from = time.monotonic()

        @rule(sig=st.sampled_from([signal.SIGTERM, signal.SIGKILL]))
        def restart_daemon(self, sig: int) -> None:
            code = self.daemon.stop(sig)
            if sig == signal.SIGTERM:
                assert code == 0
            self.daemon = self._daemon().start()
            self.log_seen_from = time.monotonic()

        @precondition(lambda self: self.mlflow_up)
        @rule()
        def stop_mlflow(self) -> None:
            model_server["server"].stop()
            self.mlflow_up = False

        @precondition(lambda self: not self.mlflow_up)
        @rule()
        def start_mlflow(self) -> None:
            old = model_server["server"]
            model_server["server"] = start_mlflow_server(old.workdir, port=old.port, backend_uri=old.backend_uri)
            self.mlflow_up = True

        def teardown(self) -> None:
            try:
                if not getattr(self, "daemon", None):
                    return
                if not self.mlflow_up:
                    self.start_mlflow()
                if self.partial is not None:
                    self.complete_the_line()
                written = self.writer.written
                traces = wait_for_calls(model_server["server"].url, self.experiment, written, timeout=120)
                got = sorted(t.info.tags["litellm.call_id"] for t in traces)
                assert got == sorted(c[0]["litellm_call_id"] for c in written), "each call written is in MLflow exactly once"
                assert sum(len(t.data.spans) for t in all_traces(model_server["server"].url, self.experiment)) == spans_of(written)
            finally:
                if getattr(self, "daemon", None) and self.daemon.alive():
                    self.daemon.stop(signal.SIGKILL)

    TailModel.TestCase.settings = settings(
        max_examples=SOAK or 2,
        stateful_step_count=30 if SOAK else 8,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=not SOAK,
    )
    TailModel.TestCase().runTest()


def test_model_kit_counts_spans_like_the_ingester(tmp_path: Path) -> None:
    calls = fresh_calls(read_capture())
    assert spans_of(calls) == sum(1 if len(c) == 1 else len(c) + 1 for c in calls) > len(calls)
