"""Property: no record, however it is shaped, can raise out of the pipeline.

Real records (the capture's StandardLoggingPayload records and the SpendLogs export) get every JSON
type (null, bool, int, huge int, float, NaN, Infinity, string, over-long string, lone surrogate, NUL,
list, object, nesting 200 deep) at every field the code reads, top level and nested, and go through normalize,
dedupe, span building and a real store: SQLite through the bulk writer and through MLflow's
``log_spans``, and a real ``mlflow server``. Oracle: every line read ends in a stored trace (as one of
its attempts), as a dropped duplicate, or in the quarantine file, and the run never raises.

CI runs a few hundred examples in about a minute; for a soak run: LITELLM_INGEST_SOAK=20 pytest tests/test_fuzz_records.py
"""

from __future__ import annotations

import copy
import json
import math
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ingest.pipeline import RunOptions, Summary, run_batch
from tests.conftest import SAMPLE_LOGS, all_traces, read_capture

SOAK = int(os.environ.get("LITELLM_INGEST_SOAK", "0"))
CAPTURE = read_capture()
SPEND_ROWS = [json.loads(line) for line in (SAMPLE_LOGS / "spend_logs_export.jsonl").read_text().splitlines() if line.strip()]


def _schema_keys(name: str) -> list[str]:
    return list(json.loads((Path(__file__).parent.parent / "schemas" / name).read_text())["properties"])


SLP_PATHS: list[tuple[str, ...]] = [
    *((k,) for k in _schema_keys("standard_logging_payload.schema.json")),
    *(("metadata", k) for k in ("user_api_key_hash", "user_api_key_alias", "user_api_key_user_id", "user_api_key_team_alias")),
    *(("error_information", k) for k in ("error_code", "error_class", "llm_provider", "error_message", "traceback")),
    ("model_parameters", "tools"),
    ("model_parameters", "temperature"),
    ("messages", "0"),
    ("messages", "0", "content"),
    ("response", "choices"),
    ("response", "usage"),
    ("response", "usage", "prompt_tokens_details"),
    ("response", "usage", "prompt_tokens_details", "cached_tokens"),
    ("hidden_params", "additional_headers"),
    ("hidden_params", "additional_headers", "x-litellm-attempted-retries"),
    ("cost_breakdown", "input_cost"),
    ("cost_breakdown", "output_cost"),
    ("request_tags", "0"),
]
SPEND_PATHS: list[tuple[str, ...]] = [
    *((k,) for k in _schema_keys("spend_logs.schema.json")),
    ("proxy_server_request", "messages"),
    ("proxy_server_request", "temperature"),
]
NESTED_TEXT = ("metadata", "request_tags", "messages", "response", "proxy_server_request")
"""SpendLogs columns exported as JSON text: also fuzzed as the text of a fuzzed value."""


def nest(depth: int, kind: str) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31),
    st.integers(2**63, 2**80),
    st.integers(-(2**80), -(2**63) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e20, -1.0, 0.0, 1e308, 2.5]),
    st.text(max_size=12),
    st.sampled_from(["s" * 300, "v" * 9000]),
    st.sampled_from(["\ud800Hello", "x\udfff", "\udc00\ud800", "a\x00b", "\x00", "", "null", "2026-11-27T14:01:49.314Z", "sk-raw"]),
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


json_values = st.one_of(
    scalars,
    st.recursive(scalars, _containers, max_leaves=8),
    st.builds(nest, st.integers(1, 200), st.sampled_from(["list", "dict"])),
)


def set_path(record: dict, path: tuple[str, ...], value: Any) -> None:
    """Put ``value`` at ``path``, making (or replacing) the containers on the way."""
    node: Any = record
    for n, key in enumerate(path):
        last = n == len(path) - 1
        if key.isdigit():
            if not isinstance(node, list) or not node:
                return
            if last:
                node[0] = value
                return
            if not isinstance(node[0], dict if not path[n + 1].isdigit() else list):
                node[0] = {} if not path[n + 1].isdigit() else [{}]
            node = node[0]
            continue
        if last:
            node[key] = value
            return
        child = node.get(key)
        if isinstance(child, str) and key in NESTED_TEXT:
            try:
                child = json.loads(child)
            except ValueError:
                child = None
        wants_list = path[n + 1].isdigit()
        if not isinstance(child, list if wants_list else dict):
            child = [{}] if wants_list else {}
        node[key] = child
        node = child


@st.composite
def fuzzed_record(draw: st.DrawFn) -> str:
    """One real record (either format) with one to three fields set to arbitrary JSON, as a JSON line."""
    spend = draw(st.booleans())
    base = copy.deepcopy(draw(st.sampled_from(SPEND_ROWS if spend else CAPTURE)))
    paths = SPEND_PATHS if spend else SLP_PATHS
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        value = draw(json_values)
        if spend and path[0] in NESTED_TEXT and len(path) == 1 and draw(st.booleans()):
            value = json.dumps(value)
        set_path(base, path, value)
    return json.dumps(base)


batches = st.lists(fuzzed_record(), min_size=1, max_size=4)


def ingest(lines: list[str], uri: str, workdir: Path, writer: str = "bulk") -> tuple[Summary, Path, str]:
    """Lines (plus two untouched real records) through a whole batch run into a fresh experiment."""
    run = uuid.uuid4().hex[:10]
    path = workdir / f"{run}.jsonl"
    path.write_text("".join(line + "\n" for line in [json.dumps(CAPTURE[0]), *lines, json.dumps(SPEND_ROWS[1])]))
    quarantine = workdir / f"{run}.quarantine.jsonl"
    experiment = f"fuzz-{run}"
    opts = RunOptions(paths=[str(path)], tracking_uri=uri, experiment_name=experiment, quarantine_file=quarantine, sql_writer=writer)
    summary = run_batch(opts)
    return summary, quarantine, experiment


def records_in_traces_sqlite(db: Path, experiment_id: str) -> int:
    """Attempts stored: a single-attempt call is one span, a call of n attempts n+1."""
    with sqlite3.connect(db) as con:
        counts = con.execute("SELECT count(*) FROM spans WHERE experiment_id = ? GROUP BY trace_id", (int(experiment_id),)).fetchall()
    return sum(1 if n == 1 else n - 1 for (n,) in counts)


def assert_every_line_accounted_for(summary: Summary, quarantine: Path, lines: int, in_traces: int) -> None:
    # split on newlines only: a raw line may hold U+2028 or U+0085, which str.splitlines also splits on
    quarantined = [q for q in quarantine.read_text().split("\n") if q] if quarantine.exists() else []
    assert len(quarantined) == summary.quarantined
    for q in map(json.loads, quarantined):
        assert q["source"] and q["line"] >= 1 and q["reason"] and q["detail"], q
    assert summary.calls_held == 0
    assert summary.records_read == lines
    assert (in_traces, summary.duplicates_dropped, summary.quarantined, lines) == (
        lines - summary.duplicates_dropped - summary.quarantined,
        summary.duplicates_dropped,
        summary.quarantined,
        lines,
    ), summary


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("writer", ["bulk", "mlflow"])
def test_no_record_of_any_shape_raises_out_of_a_run_into_sqlite(workdir: Path, writer: str) -> None:
    db = workdir / f"{writer}.db"
    uri = f"sqlite:///{db}"

    @settings(
        max_examples=(SOAK * 100) or (200 if writer == "bulk" else 40),
        deadline=None,
        derandomize=not SOAK,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batches)
    def check(lines: list[str]) -> None:
        summary, quarantine, _ = ingest(lines, uri, workdir, writer)
        assert_every_line_accounted_for(summary, quarantine, len(lines) + 2, records_in_traces_sqlite(db, summary.experiment_id or ""))

    check()


def test_no_record_of_any_shape_raises_out_of_a_run_into_an_mlflow_server(mlflow_server: Any, workdir: Path) -> None:
    """Fewer runs, many fuzzed records each: the server's cost is per request, not per record."""

    @settings(max_examples=SOAK or 3, deadline=None, derandomize=not SOAK, suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(st.lists(fuzzed_record(), min_size=30, max_size=60))
    def check(lines: list[str]) -> None:
        summary, quarantine, experiment = ingest(lines, mlflow_server.url, workdir)
        traces = all_traces(mlflow_server.url, experiment, missing_ok=True)
        in_traces = sum(1 if len(t.data.spans) == 1 else len(t.data.spans) - 1 for t in traces)
        assert_every_line_accounted_for(summary, quarantine, len(lines) + 2, in_traces)

    check()
