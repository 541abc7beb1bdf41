"""An attempt read in a later run than the rest of its call: an older archive backfilled after the
cron run read today's file, where each retried or fallen-back call's last attempt is. Real
`litellm-ingest` processes into SQLite, PostgreSQL and a real `mlflow server`.

Before, the late attempt was written as a call of its own: its one span took the root's id and
replaced the call's root (a fallback's success became the failed primary). Now the store's spans of
the call are read back and joined: the store ends as one run over both files leaves it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.conftest import Postgres, copies, run_cli, spend_row, start_mlflow_server, write_log
from tests.storekit import store_rows

SOAK = int(os.environ.get("LITELLM_INGEST_SOAK", "0"))


def _run(command: str, uri: str, state: Path, *paths: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    args = [command, *map(str, paths), "--tracking-uri", uri, "--experiment-name", "late", "--state-dir", str(state), "--json"]
    p = run_cli(args, Path.cwd(), env, 300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return json.loads(p.stdout)


def _refusing(sink: Any, refused: Callable[[str, str], bool]) -> list[str]:
    """Make ``sink``'s server answer 404 to the requests ``refused(method, path)`` picks (an older
    MLflow, injected in front of a real one); returns the paths it refused, as they come."""
    import requests

    real, paths = sink.http.request, []

    def older_server(method: str, path: str, **kw: Any) -> requests.Response:
        if not refused(method, path):
            return real(method, path, **kw)
        paths.append(path)
        answer = requests.Response()
        answer.status_code, answer._content = 404, b'{"error_code": "ENDPOINT_NOT_FOUND"}'
        return answer

    sink.http.request = older_server
    return paths


@pytest.fixture(scope="module")
def split(capture: list[dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(archive dir, today dir, calls): every call's last attempt in today's file, its earlier ones in the archive."""
    d = tmp_path_factory.mktemp("late")
    records = [r for batch in copies(capture, 3, "late") for r in batch]
    by_call: dict[str, list[dict]] = {}
    for r in records:
        by_call.setdefault(r["litellm_call_id"], []).append(r)
    last = {id(max(rs, key=lambda r: (r["endTime"], r["startTime"]))) for rs in by_call.values()}
    archive = write_log(d / "archive" / "proxy.jsonl.1", [r for r in records if id(r) not in last])
    today = write_log(d / "today" / "proxy.jsonl", [r for r in records if id(r) in last])
    os.utime(archive, (1_700_000_000, 1_700_000_000))
    assert sum(len(rs) > 1 for rs in by_call.values()) >= 9, "retries and fallbacks to split"
    return archive.parent, today.parent, len(by_call)


def _stores(store: Any, split: tuple[Path, Path, int], tmp_path: Path) -> tuple[dict, dict]:
    """The store one run over both files writes, and the one a cron run over today's file and then a
    backfill of the archive write. ``store(name)``: (tracking URI, the database's URI)."""
    archive, today, calls = split
    (one, one_db), (two, two_db) = store("one"), store("two")
    whole = _run("backfill", one, tmp_path / "state-one", archive, today)
    assert (whole["traces_written"], whole["calls_joined"]) == (calls, 0)
    first = _run("batch", two, tmp_path / "state-two", today)
    assert (first["traces_written"], first["calls_joined"]) == (calls, 0)
    later = _run("backfill", two, tmp_path / "state-two", archive)
    assert 0 < later["traces_written"] < calls and later["calls_joined"] == later["traces_written"], later
    return store_rows(one_db), store_rows(two_db)


def _assert_joined(reference: dict, joined: dict) -> None:
    """Every row as one run over both files writes it: spans, tags, metadata (token usage, cost) and
    the trace (state and previews included: the fallbacks here ask what their primaries asked)."""
    for table in ("info", "spans", "tags", "metadata"):
        extra, missing = sorted(joined[table] - reference[table]), sorted(reference[table] - joined[table])
        assert not extra and not missing, (table, extra[:2], missing[:2])


def test_an_attempt_read_a_run_later_joins_its_call_in_sqlite(split: tuple[Path, Path, int], tmp_path: Path) -> None:
    _assert_joined(*_stores(lambda name: (f"sqlite:///{tmp_path / name}.db",) * 2, split, tmp_path))


def test_an_attempt_read_a_run_later_joins_its_call_in_postgresql(
    split: tuple[Path, Path, int], tmp_path: Path, postgres: Postgres
) -> None:
    _assert_joined(*_stores(lambda name: (postgres.new_database(),) * 2, split, tmp_path))


def test_an_attempt_read_a_run_later_joins_its_call_through_a_server(split: tuple[Path, Path, int], tmp_path: Path) -> None:
    servers = []

    def server(name: str) -> tuple[str, str]:
        servers.append(start_mlflow_server(tmp_path / name))
        return servers[-1].url, servers[-1].backend_uri

    try:
        _assert_joined(*_stores(server, split, tmp_path))
    finally:
        for s in servers:
            s.stop()


def _two_stores(db: str, tmp_path: Path, request: pytest.FixtureRequest) -> list[tuple[str, str]]:
    """Two new stores of a kind, each as (tracking URI, the database's URI)."""
    if db == "sqlite":
        return [(f"sqlite:///{tmp_path / name}.db",) * 2 for name in ("one", "two")]
    if db == "postgresql":
        postgres = request.getfixturevalue("postgres")
        return [(postgres.new_database(),) * 2 for _ in range(2)]
    servers = [start_mlflow_server(tmp_path / name) for name in ("one", "two")]
    request.addfinalizer(lambda: [s.stop() for s in servers])
    return [(s.url, s.backend_uri) for s in servers]


@pytest.mark.parametrize("db", ["sqlite", "postgresql", "server"])
def test_a_spend_logs_export_read_after_the_payload_logs_keeps_every_prompt_and_response(
    db: str, capture: list[dict], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A SpendLogs export of calls already read from the payload logs (the README's history
    backfill after the cron job) holds poorer copies of the same attempts: no prompt unless the
    proxy stored them, no stream timing, millisecond times. Read in the same run the payload copy
    wins; read by a later run it replaced the richer spans (prompts and responses blanked). Now the
    store ends as one run over both leaves it, row for row."""
    records = [r for batch in copies(capture, 2, "spend-later") for r in batch]
    payload = write_log(tmp_path / "logs" / "proxy.jsonl", records)
    export = write_log(tmp_path / "export" / "spend_logs.jsonl", [spend_row(r, store_prompts=False, naive=True) for r in records])
    (one, one_db), (two, two_db) = _two_stores(db, tmp_path, request)
    _run("backfill", one, tmp_path / "state-one", payload, export)
    _run("batch", two, tmp_path / "state-two", payload)
    later = _run("backfill", two, tmp_path / "state-two", export)
    assert later["calls_joined"] == later["traces_written"] > 0 and later["calls"] == 0, "counted as calls when first written"
    _assert_joined(store_rows(one_db), store_rows(two_db))


@pytest.mark.parametrize("db", ["sqlite", "postgresql", "server"])
def test_a_success_read_by_a_run_that_never_saw_its_failure_ends_the_trace_as_one_write(
    db: str, split: tuple[Path, Path, int], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The archive's failed primaries are written first, as failed calls; their fallbacks' successes
    are read by a run with a state of its own (a lost state directory, another host's cron),
    which remembers no failure to delete. ``log_spans`` keeps a held trace's first state and previews:
    the bulk writer settles the trace row, so the store ends as one run over both files, state OK.
    A server is told the state through ``StartTraceV3``, which also marks those traces' info final."""
    archive, today, calls = split
    (one, one_db), (two, two_db) = _two_stores(db, tmp_path, request)
    _run("backfill", one, tmp_path / "state-one", archive, today)
    first = _run("batch", two, tmp_path / "state-archive", archive)
    assert first["traces_written"] < calls
    first_info = {r for r in store_rows(two_db)["info"] if r[3] == "ERROR"}
    later = _run("batch", two, tmp_path / "state-today", today)
    assert later["calls_joined"] == first["traces_written"], later
    reference, joined = store_rows(one_db), store_rows(two_db)
    flipped = {r[0] for r in first_info} - {r[0] for r in reference["info"] if r[3] == "ERROR"}
    assert flipped and all(r[3] == "OK" for r in joined["info"] if r[0] in flipped)
    if db == "server":
        final = {r for r in joined["metadata"] if r[1] == "mlflow.trace.infoFinalized"}
        assert {r[0] for r in final} == flipped
        joined["metadata"] -= final
    _assert_joined(reference, joined)


def test_a_failed_call_whose_fallback_the_next_run_reads_is_settled_in_place_keeping_what_users_added(
    capture: list[dict], tmp_path: Path
) -> None:
    """The next cron run remembers the call it wrote as failed; into a database store it writes the
    call whole and settles the trace row instead of deleting the trace first (as through a server):
    state OK, and a tag a user set on the failed trace meanwhile is still there."""
    from ingest.pipeline import RunOptions, run_incremental
    from tests.conftest import all_traces, client_for, reidentify, write_jsonl

    uri, logs, state = f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "logs", tmp_path / "state"
    failure, success = reidentify([r for r in capture if r["litellm_call_id"].startswith("86f9bb02")], salt="settle")
    opts = RunOptions(paths=[str(logs)], tracking_uri=uri, experiment_name="settle", state_dir=state, settle_s=0.0)
    write_jsonl(logs / "proxy.jsonl", [failure])
    assert run_incremental(opts, "batch").traces_written == 1
    (trace,) = all_traces(uri, "settle")
    assert trace.info.state.value == "ERROR"
    client_for(uri).set_trace_tag(trace.info.trace_id, "reviewed", "yes")
    write_jsonl(logs / "proxy.jsonl", [failure, success])
    assert run_incremental(opts, "batch").traces_rewritten == 1
    (trace,) = all_traces(uri, "settle")
    assert (trace.info.state.value, len(trace.data.spans), trace.info.tags.get("reviewed")) == ("OK", 3, "yes")


def test_a_server_that_does_not_serve_reading_traces_back_is_named_once_and_written_to_as_before(
    mlflow_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An older server without ``batchGetInfos`` answers 404 (injected here in front of a real one):
    the batch is written (nothing to join then), the log says so once, and no later batch asks again."""
    import uuid

    from ingest.sink import OtlpSink, resolve_target
    from tests.conftest import all_traces
    from tests.followkit import record
    from tests.test_spans import trace_of

    name = f"no-reads-{uuid.uuid4().hex[:8]}"
    sink = OtlpSink(resolve_target(mlflow_server.url, name, None))
    lookups = _refusing(sink, lambda method, path: "/mlflow/traces/batchGet" in path)
    try:
        for call in ("a", "b"):
            trace = trace_of([record(f"{name}-{call}", "success", 100.0, 101.0)], experiment=sink.target.experiment_id)
            assert sink.write([trace]) == 1
    finally:
        sink.close()
    assert len(lookups) == 1 and [r.levelname for r in caplog.records if "does not serve reading traces back" in r.message] == ["WARNING"]
    assert len(all_traces(mlflow_server.url, name)) == 2


def test_a_server_that_does_not_take_a_traces_state_is_named_once_and_the_pipeline_deletes_instead(
    mlflow_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``StartTraceV3`` answered 404 (injected in front of a real server): the spans are written,
    the log says so once, and the sink no longer says it settles, so the pipeline goes back to
    deleting a call written as failed before its success."""
    import uuid

    from ingest.sink import OtlpSink, resolve_target
    from tests.conftest import all_traces
    from tests.followkit import record
    from tests.test_spans import trace_of

    name = f"no-state-{uuid.uuid4().hex[:8]}"
    sink = OtlpSink(resolve_target(mlflow_server.url, name, None))
    refused = _refusing(sink, lambda method, path: method == "POST" and path == "/api/3.0/mlflow/traces")
    fail, ok = record(f"{name}-call", "failure", 100.0, 101.0, 0), record(f"{name}-call", "success", 102.0, 103.0, 1)
    try:
        assert sink.settles
        for rows in ([fail], [fail, ok], [fail, ok]):
            sink.write([trace_of(rows, experiment=sink.target.experiment_id)])
    finally:
        sink.close()
    assert len(refused) == 1 and not sink.settles
    assert [r.levelname for r in caplog.records if "does not take a trace's final state" in r.message] == ["WARNING"]
    (trace,) = all_traces(mlflow_server.url, name)
    assert (len(trace.data.spans), trace.info.state.value) == (3, "ERROR")


def test_an_outage_during_the_lookup_is_reported_at_once_as_for_a_write(tmp_path: Path) -> None:
    """The lookup before a write goes through the sink's own session: a server that is down is
    reported to the daemon at the first failure (it used to take the MLflow client's own retries)."""
    import time

    from ingest.sink import OtlpSink, SinkError, resolve_target
    from tests.followkit import record
    from tests.test_spans import trace_of

    server = start_mlflow_server(tmp_path / "server")
    sink = OtlpSink(resolve_target(server.url, "outage", None), deadline_s=1.0)
    server.stop()
    failures: list[Exception] = []
    sink.on_retry = failures.append
    started = time.monotonic()
    with pytest.raises(SinkError, match="cannot reach MLflow"):
        sink.write([trace_of([record("down", "success", 100.0, 101.0)], experiment=sink.target.experiment_id)])
    assert failures and time.monotonic() - started < 10
    sink.close()


def test_any_split_of_a_calls_attempts_over_runs_ends_as_one_write_of_them_all(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Property, in-process into real SQLite stores: the attempts of retried and fallen-back calls
    (the capture's, and a call failing twice before it succeeds, each attempt asking the same) spread
    over three runs in any way, some read twice, end as one write of every attempt leaves them, row
    for row: a call first written with only its failures ends in state OK when its success is read."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ingest.sink import make_sink, resolve_target
    from ingest.spans import build_trace, group_calls
    from tests.conftest import read_capture
    from tests.followkit import record
    from tests.test_spans import frame_of

    capture = read_capture()
    ids = {r["litellm_call_id"] for r in capture}
    multi = [r for r in capture if sum(x["litellm_call_id"] == r["litellm_call_id"] for x in capture) > 1]
    three = [
        record("thrice", "failure", 100.0, 101.0),
        record("thrice", "failure", 102.0, 103.0),
        record("thrice", "success", 104.0, 105.0),
    ]
    single = next(r for r in capture if r["litellm_call_id"] in ids and r not in multi)
    rows = list(frame_of([*multi, *three, single]).iter_rows(named=True))
    n = 0

    def store(rows_per_run: list[list[dict]]) -> dict:
        nonlocal n
        n += 1
        uri = f"sqlite:///{tmp_path_factory.mktemp('split') / f'{n}.db'}"
        sink = make_sink(resolve_target(uri, "split", None))
        try:
            for run in rows_per_run:
                by_call = sorted(run, key=lambda r: (r["call_key"], r["start_us"]))
                traces = [build_trace(c, sink.target.experiment_id) for c in group_calls(pl.DataFrame(by_call, infer_schema_length=None))]
                sink.write(traces)
        finally:
            sink.close()
        return store_rows(uri)

    reference = store([rows])

    @settings(max_examples=25 * max(SOAK, 1), deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.sets(st.integers(0, 2), min_size=1), min_size=len(rows), max_size=len(rows)))
    def split(runs_of: list[set[int]]) -> None:
        got = store([[r for r, runs in zip(rows, runs_of, strict=True) if run in runs] for run in range(3)])
        for table in ("info", "spans", "tags", "metadata"):
            assert got[table] == reference[table], table

    split()


def _thrice(call: str) -> tuple[dict, dict, dict]:
    """A call failing twice before it succeeds: its attempts, in the order they ran."""
    from tests.followkit import record

    return record(call, "failure", 100.0, 101.0, 0), record(call, "failure", 102.0, 103.0, 1), record(call, "success", 104.0, 105.0, 2)


def _seen(trace: Any) -> tuple[Any, ...]:
    """What a reader sees of a trace, its id aside (ids hash the experiment)."""
    i = trace.info
    spans = sorted((s.name, s.start_time_ns, s.end_time_ns, s.status.status_code.value) for s in trace.data.spans)
    meta = {k: i.trace_metadata.get(k) for k in ("mlflow.trace.tokenUsage", "mlflow.trace.cost", "mlflow.trace.session")}
    return (i.request_time, i.execution_duration, i.state.value, i.request_preview, i.response_preview, meta, spans)


@pytest.mark.parametrize("db", ["sqlite", "server"])
def test_an_attempt_read_after_its_trace_was_settled_still_moves_its_times_and_tokens(
    db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A call failing twice before it succeeds, its attempts read by three runs: the later failure,
    then the success (the trace is settled to OK; through a server that marks its info final), then
    the earlier failure. The trace ends as one write of all three: it starts at the earliest
    attempt and counts its tokens, though a server no longer moves a final trace's times itself."""
    import uuid

    from ingest.sink import make_sink, resolve_target
    from tests.conftest import all_traces
    from tests.test_spans import trace_of

    uri = request.getfixturevalue("mlflow_server").url if db == "server" else f"sqlite:///{tmp_path / 'store.db'}"
    name = f"settled-{uuid.uuid4().hex[:8]}"
    first, second, success = _thrice(f"{name}-call")

    def write(experiment: str, runs: list[list[dict]]) -> tuple[Any, ...]:
        sink = make_sink(resolve_target(uri, experiment, None))
        try:
            for rows in runs:
                sink.write([trace_of(rows, experiment=sink.target.experiment_id)])
        finally:
            sink.close()
        (trace,) = all_traces(uri, experiment)
        return _seen(trace)

    reference = write(f"{name}-one", [[first, second, success]])
    assert reference[2] == "OK" and reference[0] == 100_000
    assert write(name, [[second], [success], [first]]) == reference


def test_a_server_settle_counts_in_the_attempts_another_ingester_wrote_meanwhile(mlflow_server: Any) -> None:
    """Two ingesters write attempts of one call at once: B joins the failure it found and posts its
    success, and A writes the call's first failure right after B's post, before B settles. B's
    settle then reads the trace whole again, so the info it sets (final, through a server) still
    starts at A's attempt, as one write of all three."""
    import uuid

    from ingest.sink import OtlpSink, resolve_target
    from tests.conftest import all_traces
    from tests.test_spans import trace_of

    name = f"meanwhile-{uuid.uuid4().hex[:8]}"
    first, second, success = _thrice(f"{name}-call")
    a, b = (OtlpSink(resolve_target(mlflow_server.url, name, None)) for _ in range(2))
    one = OtlpSink(resolve_target(mlflow_server.url, f"{name}-one", None))
    exp = a.target.experiment_id
    try:
        a.write([trace_of([second], experiment=exp)])
        post = b._post

        def and_then_a(*args: Any) -> None:
            post(*args)
            a.write([trace_of([first], experiment=exp)])

        b._post = and_then_a  # type: ignore[method-assign]
        b.write([trace_of([success], experiment=exp)])
        one.write([trace_of([first, second, success], experiment=one.target.experiment_id)])
    finally:
        for s in (a, b, one):
            s.close()
    (got,), (want,) = all_traces(mlflow_server.url, name), all_traces(mlflow_server.url, f"{name}-one")
    assert _seen(got) == _seen(want) and _seen(want)[:3] == (100_000, 5_000, "OK")


@pytest.mark.parametrize("bound", ["since", "until"])
def test_a_retry_later_than_settle_across_a_bound_stays_in_the_window_of_its_first_attempt(bound: str) -> None:
    """``--since`` between a failure and a retry read after the failure was final (a Retry-After
    longer than --settle): the failure was left out, then the retry alone was written as the call
    and counted both in and out of the window. It is left out with its call, counted once; across
    ``--until`` the call keeps its retry (rewritten whole, as any late retry of a failed call)."""
    from ingest.pipeline import Pipeline
    from ingest.quarantine import QuarantineWriter
    from ingest.sources import Chunk, split_lines
    from tests.followkit import RecordingSink, line, record

    sink = RecordingSink()
    pipe = Pipeline(sink, "1", QuarantineWriter(None), settle_s=120.0, **{f"{bound}_us": 100_500_000})  # type: ignore[arg-type]
    attempts = (record("c", "failure", 100.0, 101.0), record("o", "success", 300.0, 301.0), record("c", "success", 400.0, 401.0, 1))
    for n, rec in enumerate(attempts):
        frame, _ = split_lines("x.jsonl", line(rec).encode(), n * 10_000, n + 1)
        pipe.feed(Chunk("x.jsonl", frame))
    pipe.flush(final=True)
    calls = sink.calls()
    if bound == "since":
        assert set(calls) == {"o"}
    else:
        assert set(calls) == {"c"} and (calls["c"]["state"], len(calls["c"]["spans"])) == ("OK", 3)
    assert (pipe.summary.calls, pipe.summary.calls_outside_range) == (1, 1)


def test_a_call_after_until_whose_retry_comes_late_is_counted_out_once() -> None:
    """A failure after ``--until`` was counted outside the window, then its retry (read after the
    call was final) counted it again."""
    from ingest.pipeline import Pipeline
    from ingest.quarantine import QuarantineWriter
    from ingest.sources import Chunk, split_lines
    from tests.followkit import RecordingSink, line, record

    sink = RecordingSink()
    pipe = Pipeline(sink, "1", QuarantineWriter(None), settle_s=120.0, until_us=150_000_000)  # type: ignore[arg-type]
    attempts = (record("in", "success", 100.0, 101.0), record("d", "failure", 200.0, 201.0), record("x", "success", 500.0, 501.0))
    for n, rec in enumerate((*attempts, record("d", "success", 600.0, 601.0, 1))):
        frame, _ = split_lines("x.jsonl", line(rec).encode(), n * 10_000, n + 1)
        pipe.feed(Chunk("x.jsonl", frame))
    pipe.flush(final=True)
    assert set(sink.calls()) == {"in"}
    assert (pipe.summary.calls, pipe.summary.calls_outside_range) == (1, 2)
