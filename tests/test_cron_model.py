"""The daemon's model (``tests/test_follow.py``) run as a cron job: the same appends, half lines, late
retries, rotations (rename, gzip, copytruncate) and deletions, with ``batch`` runs in process into a
real SQLite store between them. Most runs find nothing new and are answered from the state without
MLflow (:mod:`ingest.idle`); with the checkpoints of files gone forgotten at every run, a rotated
file must never be taken for gone. At the end every call is one trace with every attempt, and a run
reads nothing again."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import initialize, rule

from ingest import checkpoints, idle
from ingest.pipeline import RunOptions, run_incremental
from tests.conftest import all_traces
from tests.test_follow import SOAK, FollowModel, _forget_only_what_is_gone


class CronModel(FollowModel):
    STORE: str = ""

    def _start(self) -> Any:
        return None

    @initialize()
    def setup(self) -> None:
        super().setup()
        self.clock = time.time() - 30 * 86400  # old calls: final at once, a late retry rewrites its trace
        self.experiment = f"cron-{uuid.uuid4().hex[:8]}"
        self.runs: list[dict] = []

    @rule()
    def cron_run(self) -> None:
        opts = RunOptions(
            paths=[str(self.logdir)],
            tracking_uri=self.STORE,
            experiment_name=self.experiment,
            state_dir=self.state_dir,
            partial_timeout_s=1e9,
            forget_gone_s=1e-6,
        )
        self.runs.append(run_incremental(opts, "batch").as_dict())
        self.rotated = dict.fromkeys(self.rotated, True)

    @rule()
    def cron_runs_twice(self) -> None:
        """The next run usually finds nothing new: the idle run's turn."""
        self.cron_run()
        self.cron_run()

    # the daemon's own rules are not a cron job's
    def step(self) -> None: ...
    def restart(self) -> None: ...
    def kill(self) -> None: ...
    def die_right_after_the_next_acknowledged_write(self) -> None: ...
    def sink_goes_down(self) -> None: ...
    def sink_comes_back(self) -> None: ...

    def teardown(self) -> None:
        if not hasattr(self, "runs"):
            return
        if self.partial is not None:
            self.complete_the_line()
        while self.open_calls:
            self.append_the_retry(0)
        self.cron_run()
        got: dict[str, Any] = {}
        for t in all_traces(self.STORE, self.experiment, missing_ok=True):
            cid = t.info.tags["litellm.call_id"]
            assert cid not in got, f"{cid} is two traces"
            got[cid] = t
        missing = sorted(set(self.calls) - set(got), key=lambda c: int(c.split("-")[1]))
        assert not missing and not set(got) - set(self.calls), f"missing {missing}, extra {sorted(set(got) - set(self.calls))}"
        for cid, recs in self.calls.items():
            want_spans = 1 if len(recs) == 1 else len(recs) + 1
            assert len(got[cid].data.spans) == want_spans, (cid, recs, [s.name for s in got[cid].data.spans])
            final = max(recs, key=lambda r: (r["endTime"], r["startTime"]))
            assert got[cid].info.state.value == ("OK" if final["status"] == "success" else "ERROR"), cid
        self.cron_run()
        assert self.runs[-1]["records_read"] == 0, "a run once every call is written reads nothing again"
        assert sum(r["quarantined"] for r in self.runs) == 0, self.runs


def test_every_call_arrives_once_whole_through_cron_runs_rotations_and_deletions(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong: list[str] = []
    monkeypatch.setattr(checkpoints.Checkpoints, "forget", _forget_only_what_is_gone(checkpoints.Checkpoints.forget, wrong))
    answered: Counter[str] = Counter()
    real = idle.idle_run

    def counted(*a: Any) -> Any:
        summary = real(*a)
        answered["idle" if summary is not None else "full"] += 1
        return summary

    monkeypatch.setattr(idle, "idle_run", counted)
    root = tmp_path_factory.mktemp("cron-model")
    store = f"sqlite:///{root / 'mlflow.db'}"
    init = lambda self: FollowModel.__init__(self, root)  # noqa: E731
    machine = type("Model", (CronModel,), {"__init__": init, "STORE": store})
    machine.TestCase.settings = settings(
        max_examples=12 * max(SOAK, 1), stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()
    assert not wrong, wrong[:3]
    assert answered["idle"] > 10 and answered["full"] > 10, answered
