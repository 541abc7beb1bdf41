"""The allocator settings a batch or backfill starts with (figures: ``bench/bench.py --only-sqlite``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ingest.__main__ as entry
from ingest import allocator
from tests.conftest import CAPTURE_FILES


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["backfill", "logs/"], "backfill"),
        (["-v", "batch", "-x"], "batch"),
        (["--verbose", "tail", "d"], "tail"),
        (["--help"], None),
        ([], None),
    ],
)
def test_the_command_is_found_after_the_group_flags(argv: list[str], command: str | None) -> None:
    assert allocator.command_of(argv) == command


TUNED = [(["batch", "x"], True), (["-v", "backfill", "x"], True), (["tail", "d"], False), (["status"], False)]


@pytest.mark.parametrize(("argv", "tuned"), TUNED)
def test_only_batch_and_backfill_are_tuned(monkeypatch: pytest.MonkeyPatch, argv: list[str], tuned: bool) -> None:
    calls: list[str] = []
    monkeypatch.setattr(allocator, "tune", lambda: calls.append("tune") or [])
    monkeypatch.setattr("ingest.cli.run", lambda: calls.append("cli"))
    monkeypatch.setattr(sys, "argv", ["litellm-ingest", *argv])
    entry.run()
    assert calls == (["tune", "cli"] if tuned else ["cli"])


def test_a_process_gets_every_setting_before_polars_loads() -> None:
    """In a fresh process: polars appends ours after its own defaults (so ours wins), glibc takes
    each value through ``mallopt``, and the environment carries them to the worker processes."""
    code = (
        "import json, os; from ingest.allocator import GLIBC, tune; applied = tune(); import polars;"
        "print(json.dumps([applied, {k: os.environ.get(k) for k in ('_RJEM_MALLOC_CONF', *GLIBC)}]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF" and not k.startswith("MALLOC_")}
    applied, seen = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    conf = seen.pop("_RJEM_MALLOC_CONF")
    assert conf.endswith("," + allocator.JEMALLOC_CONF) and "dirty_decay_ms:500" in conf
    assert seen == {name: str(value) for name, (_, value) in allocator.GLIBC.items()}
    assert "_RJEM_MALLOC_CONF" in applied
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION"):
        assert set(allocator.GLIBC) <= set(applied)


def test_what_the_user_set_is_kept() -> None:
    env = {"_RJEM_MALLOC_CONF": "dirty_decay_ms:0", "MALLOC_TOP_PAD_": "0"}
    applied = allocator.tune(env)
    assert env["_RJEM_MALLOC_CONF"] == "dirty_decay_ms:0" and env["MALLOC_TOP_PAD_"] == "0"
    assert "_RJEM_MALLOC_CONF" not in applied and "MALLOC_TOP_PAD_" not in applied


def test_too_late_for_jemalloc_once_polars_is_loaded() -> None:
    import polars  # noqa: F401  (loaded here, not left to whichever test ran before)

    env: dict[str, str] = {}
    allocator.tune(env)
    assert "polars" in sys.modules and "_RJEM_MALLOC_CONF" not in env


_FREEZE = """
import gc, json, sys
from pathlib import Path
from ingest.pipeline import RunOptions, run_batch
before = gc.get_freeze_count()
run_batch(RunOptions(paths=[sys.argv[1]], tracking_uri="sqlite:///" + sys.argv[2]))
after_run = gc.get_freeze_count()
from ingest.allocator import tune_collector
tune_collector()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a
del a, b
print(json.dumps({"before": before, "after_run": after_run, "again": gc.get_freeze_count(), "collected": gc.collect(),
                  "threshold": gc.get_threshold()[0]}))
"""


def test_a_run_freezes_its_start_up_heap_once_and_still_collects_what_it_drops(tmp_path: Path) -> None:
    """MLflow's, SQLAlchemy's and polars' objects are taken out of every full collection once the
    store is open, and young objects are collected less often; a second call freezes nothing more
    (what a run holds by then stays collectable), and a cycle dropped afterwards is still freed."""
    args = [sys.executable, "-c", _FREEZE, str(CAPTURE_FILES[1]), str(tmp_path / "mlflow.db")]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["before"] == 0 and out["after_run"] > 100_000, out
    assert out["again"] == out["after_run"], out
    assert out["collected"] >= 2, out
    assert out["threshold"] == allocator.YOUNG_THRESHOLD, out
