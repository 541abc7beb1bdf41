"""End to end for "one trace from the app to the provider" (issue 13), with real processes only.

An app traces itself (``mlflow.openai.autolog()`` + ``@mlflow.trace``, experiment B) and calls a
LiteLLM proxy whose only callback is our JSONL logger; `litellm-ingest tail` follows the logs into
experiment A on the same `mlflow server`. Each call with autolog's ``traceparent`` must end up twice:
as its standalone trace in A, and as a proxy span (with one span per attempt) under the app's
``Completions``/``Embeddings`` span, while the app's own TraceInfo stays exactly what the app wrote.
Then stateless replays check that nothing doubles, that ``--no-nest`` touches no app trace, and that a
deleted app trace gets nothing written under its id.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Span, Trace, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey

from tests.conftest import all_traces, client_for
from tests.proxykit import E2E, OUR_LOGGER, by_call, running_proxy
from tests.tailkit import EXE, Daemon, metric, wait_for

pytestmark = pytest.mark.proxy
GRACE_S = 60
DELETED = "chain"
"""The scenario whose app trace is deleted before the last replay."""
NOT_COMPARED = (SpanAttributeKey.REQUEST_ID, SpanAttributeKey.SESSION_ID, SpanAttributeKey.USER_ID)
"""Attributes a nested attempt span may not share with its standalone twin: the trace it sits in, and what sets trace fields."""


@dataclass
class Call:
    """One client request as the app saw it, with the proxy's records of it (ordered by end time, as attempts are numbered)."""

    scenario: str
    call_id: str
    traceparent: str | None
    app_trace_id: str | None
    records: list[dict] = field(repr=False)

    @property
    def parent_span_id(self) -> str:
        return self.traceparent.split("-")[2] if self.traceparent else ""

    @property
    def name(self) -> str:
        return f"litellm-{self.records[-1]['call_type']}"


@dataclass
class Snapshot:
    """What MLflow holds at one moment: the ingester's traces by call id, and the app's traces by id."""

    standalone: dict[str, Trace]
    apps: dict[str, Trace]


def snapshot(uri: str, experiment: str, app_ids: list[str]) -> Snapshot:
    client = client_for(uri)
    return Snapshot(by_call(all_traces(uri, experiment)), {tid: client.get_trace(tid, display=False) for tid in app_ids})


def nested(trace: Trace, call_id: str) -> list[Span]:
    """The spans the ingester wrote into an app trace for one call (the app's own spans carry no litellm_call_id)."""
    return [s for s in trace.data.spans if s.attributes.get("litellm_call_id") == call_id]


def batch(logdir: Path, uri: str, experiment: str, state: Path, *extra: str) -> dict[str, Any]:
    """A stateless `litellm-ingest batch` of the proxy's logs; its JSON summary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    args = [EXE, "batch", str(logdir), "--tracking-uri", uri, "--experiment-name", experiment, "--no-state", "--json",
            "--state-dir", str(state), *extra]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def trace_ids_anywhere(uri: str) -> set[str]:
    """Every trace id on the server, in every experiment (deleted experiments included)."""
    client = client_for(uri)
    locations = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    out, token = set(), None
    while True:
        page = client.search_traces(locations=locations, max_results=500, page_token=token, include_spans=False)
        out |= {t.info.trace_id for t in page}
        token = page.token
        if not token:
            return out


def trace_exists(uri: str, trace_id: str) -> bool:
    """Asked both ways the ingester could ask: the store's batch lookup (no public client method) and get_trace."""
    client = client_for(uri)
    if client._tracing_client.store.batch_get_trace_infos([trace_id]):
        return True
    try:
        client.get_trace(trace_id, display=False)
    except MlflowException:
        return False
    return True


def calls_of(app: dict, records: list[dict]) -> list[Call]:
    traces = {s["name"]: s["trace_id"] for s in app["scenarios"]}
    by_id: dict[str, list[dict]] = {}
    for r in records:
        by_id.setdefault(r["litellm_call_id"], []).append(r)
    return [
        Call(q["scenario"], q["call_id"], q["traceparent"], traces[q["scenario"]],
             sorted(by_id[q["call_id"]], key=lambda r: (r["endTime"], r["startTime"])))
        for q in app["requests"]
    ]  # fmt: skip


@pytest.fixture(scope="module")
def nest_run(mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Run everything once (app + tail daemon, then three replays), keeping what MLflow held after each step."""
    uri, work = mlflow_server.url, tmp_path_factory.mktemp("nest")
    a, b, c, d = (f"nest-{x}-{uuid.uuid4().hex[:6]}" for x in "abcd")
    out: dict[str, Any] = {"uri": uri, "experiments": (a, b, c, d)}
    with running_proxy(work, [OUR_LOGGER]) as proxy:
        daemon = Daemon(proxy.logdir, uri, a, work / "state", "--nest-grace", str(GRACE_S)).start()
        try:
            first_seen: dict[str, float] = {}
            with ThreadPoolExecutor(1) as pool:
                app_run = pool.submit(proxy.run_client, E2E / "app_calls.py", uri, b, proxy.url, proxy.key)
                while not app_run.done():
                    for t in all_traces(uri, a, include_spans=False, missing_ok=True):
                        first_seen.setdefault(t.info.tags["litellm.call_id"], time.time())
                    time.sleep(0.5)
                app = json.loads(app_run.result())
            wanted = {q["call_id"] for q in app["requests"]}
            assert None not in wanted, app["requests"]
            wait_for(lambda: wanted <= {r["litellm_call_id"] for r in proxy.records()}, 30, "the proxy to log every call")
            calls = calls_of(app, proxy.records())
            app_ids = [s["trace_id"] for s in app["scenarios"] if s["trace_id"]]

            def all_written() -> bool:
                try:
                    s = snapshot(uri, a, app_ids)
                except AssertionError:
                    return False
                return wanted <= set(s.standalone) and all(
                    len(nested(s.apps[c.app_trace_id], c.call_id)) == 1 + len(c.records) for c in calls if c.app_trace_id
                )

            wait_for(all_written, GRACE_S + 60, "every call standalone in A and nested into its app trace")
            time.sleep(3)  # past the daemon's next poll of its nest queue (every 2 s): what it writes then counts too
            out.update(app=app, calls=calls, first_seen=first_seen, daemon=snapshot(uri, a, app_ids), metrics=daemon.metrics())
            assert daemon.stop() == 0
        finally:
            if daemon.alive():
                daemon.stop()
    out["replay_summary"] = batch(proxy.logdir, uri, a, work / "replay")
    out["replay"] = snapshot(uri, a, app_ids)
    out["no_nest_summary"] = batch(proxy.logdir, uri, d, work / "no-nest", "--no-nest")
    out["no_nest"] = snapshot(uri, d, app_ids)
    deleted = next(s for s in app["scenarios"] if s["name"] == DELETED)
    client = client_for(uri)
    client.delete_traces(deleted["info"]["trace_location"]["mlflow_experiment"]["experiment_id"], trace_ids=[deleted["trace_id"]])
    out["missing_summary"] = batch(proxy.logdir, uri, c, work / "missing", "--nest-grace", "0")
    out["missing"] = by_call(all_traces(uri, c))
    out["deleted"] = deleted["trace_id"]
    out["anywhere"] = trace_ids_anywhere(uri)
    yield out


def traced(run: dict[str, Any]) -> list[Call]:
    return [c for c in run["calls"] if c.traceparent]


def test_the_app_sent_autologs_traceparent_and_the_proxy_logged_it(nest_run: dict) -> None:
    calls = nest_run["calls"]
    assert {c.scenario for c in calls} == {"chain", "agent", "stream", "tools", "fallback", "failing", "concurrent", "bare", "delayed",
                                           "no_mlflow"}  # fmt: skip
    for c in calls:
        header = c.records[-1]["metadata"].get("requester_metadata", {}).get("headers", {}).get("traceparent")
        assert header == c.traceparent, c
        if c.scenario == "no_mlflow":
            assert c.traceparent is None and c.app_trace_id is None
            continue
        version, trace_hex, span_hex, flags = c.traceparent.split("-")
        assert (version, flags, len(span_hex)) == ("00", "03", 16), c
        assert c.app_trace_id == f"tr-{trace_hex}", c
    assert [len(c.records) for c in calls if c.scenario == "fallback"] == [2]
    assert len([c for c in calls if c.scenario == "concurrent"]) == 4
    assert len({c.app_trace_id for c in calls if c.scenario == "concurrent"}) == 1, "the threads' calls share the app's trace"


def test_every_traced_call_has_a_proxy_span_under_its_traceparent_span(nest_run: dict) -> None:
    apps, standalone = nest_run["daemon"].apps, nest_run["daemon"].standalone
    for c in traced(nest_run):
        app = apps[c.app_trace_id]
        spans = {s.span_id: s for s in app.data.spans}
        caller = spans[c.parent_span_id]
        assert caller.name in ("Completions", "Embeddings") and caller.attributes.get("litellm_call_id") is None, c
        (proxy_span,) = [s for s in nested(app, c.call_id) if s.parent_id == c.parent_span_id]
        assert proxy_span.trace_id == c.app_trace_id
        assert proxy_span.name == c.name, c
        start_us = min(round(r["startTime"] * 1e6) for r in c.records)
        end_us = max(round(r["endTime"] * 1e6) for r in c.records)
        assert (proxy_span.start_time_ns, proxy_span.end_time_ns) == (start_us * 1000, end_us * 1000), c
        assert proxy_span.attributes["litellm.proxy_trace_id"] == standalone[c.call_id].info.trace_id, c
        assert proxy_span.attributes["litellm_call_id"] == c.call_id
        final_ok = c.records[-1]["status"] == "success"
        assert proxy_span.status.status_code.value == ("OK" if final_ok else "ERROR"), c
    for s in (scen for scen in nest_run["app"]["scenarios"] if scen["trace_id"]):
        app = apps[s["trace_id"]]
        own = [sp for sp in app.data.spans if sp.attributes.get("litellm_call_id") is None]
        assert len(own) == json.loads(s["info"]["trace_metadata"][TraceMetadataKey.SIZE_STATS])["num_spans"], "the app's spans are all kept"


def _expected_attributes(twin: Span, n: int, app_info: dict[str, Any]) -> dict[str, Any]:
    """The standalone attempt's attributes as the nested attempt must carry them, numbered. Usage and cost keep
    MLflow's keys only where the app finalized both its own (else MLflow would recompute, counting ours twice, or
    price our usage): an app trace written by MLflow's client has, by the time it is finished."""
    meta = app_info["trace_metadata"]
    final = meta.get(TraceMetadataKey.TRACE_INFO_FINALIZED) == "true" and {TraceMetadataKey.TOKEN_USAGE, TraceMetadataKey.COST} <= set(meta)
    rename = {} if final else {SpanAttributeKey.CHAT_USAGE: "litellm.token_usage", SpanAttributeKey.LLM_COST: "litellm.cost"}
    return {**{rename.get(k, k): v for k, v in _comparable(twin).items()}, "attempt": n}


def _comparable(span: Span) -> dict[str, Any]:
    return {k: v for k, v in span.attributes.items() if k not in NOT_COMPARED and not k.startswith(SpanAttributeKey.TRACE_TAG_PREFIX)}


def test_attempt_spans_match_the_records_and_the_standalone_attempts(nest_run: dict) -> None:
    apps, standalone = nest_run["daemon"].apps, nest_run["daemon"].standalone
    infos = {s["trace_id"]: s["info"] for s in nest_run["app"]["scenarios"]}
    for c in traced(nest_run):
        spans = nested(apps[c.app_trace_id], c.call_id)
        (proxy_span,) = [s for s in spans if s.parent_id == c.parent_span_id]
        attempts = sorted((s for s in spans if s.parent_id == proxy_span.span_id), key=lambda s: s.name)
        assert len(attempts) == len(c.records) == len(spans) - 1, c
        own = standalone[c.call_id].data.spans
        twins = own if len(own) == 1 else sorted((s for s in own if s.parent_id is not None), key=lambda s: s.name)
        for n, (span, twin, r) in enumerate(zip(attempts, twins, c.records, strict=True), start=1):
            assert span.name == f"{c.name} attempt {n}", c
            assert (span.start_time_ns, span.end_time_ns) == (round(r["startTime"] * 1e6) * 1000, round(r["endTime"] * 1e6) * 1000), c
            assert span.status.status_code.value == ("OK" if r["status"] == "success" else "ERROR"), c
            assert (span.status.status_code, span.status.description) == (twin.status.status_code, twin.status.description), c
            assert [(e.name, e.timestamp, e.attributes) for e in span.events] == [(e.name, e.timestamp, e.attributes) for e in twin.events]
            assert _comparable(span) == _expected_attributes(twin, n, infos[c.app_trace_id]), c
            if c.scenario == "stream":
                (first,) = [e for e in span.events if e.name == "first_token"]
                assert first.timestamp == round(r["completionStartTime"] * 1e6) * 1000
        if c.scenario == "fallback":
            assert [s.status.status_code.value for s in attempts] == ["ERROR", "OK"]
        if c.scenario == "failing":
            assert {s.status.status_code.value for s in attempts} == {"ERROR"}


def test_standalone_traces_stay_in_the_ingesters_experiment_tagged_with_the_app_trace(nest_run: dict) -> None:
    standalone = nest_run["daemon"].standalone
    assert set(standalone) == {c.call_id for c in nest_run["calls"]}, "one trace per call in A, no more"
    for c in nest_run["calls"]:
        t = standalone[c.call_id]
        assert t.info.tags.get("litellm.app_trace_id") == c.app_trace_id, c
        assert {s.trace_id for s in t.data.spans} == {t.info.trace_id}
        assert len(t.data.spans) == (1 if len(c.records) == 1 else 1 + len(c.records)), c


def test_the_app_trace_info_is_what_the_app_wrote(nest_run: dict) -> None:
    for s in nest_run["app"]["scenarios"]:
        if s["trace_id"]:
            assert nest_run["daemon"].apps[s["trace_id"]].info.to_dict() == s["info"], s["name"]


def test_a_client_without_mlflow_gets_no_nested_spans_and_no_made_up_trace(nest_run: dict) -> None:
    uri, (a, b, _, _) = nest_run["uri"], nest_run["experiments"]
    (c,) = [c for c in nest_run["calls"] if c.scenario == "no_mlflow"]
    app_traces = all_traces(uri, b)
    kept = set(nest_run["daemon"].apps) - {nest_run["deleted"]}
    assert {t.info.trace_id for t in app_traces} == kept, "the ingester made no trace in the app's experiment"
    assert not [s for t in app_traces for s in nested(t, c.call_id)]
    assert not trace_exists(uri, "tr-" + uuid.UUID(c.records[-1]["trace_id"]).hex)
    assert [t.info.trace_id for t in all_traces(uri, a) if nested(t, c.call_id)] == [nest_run["daemon"].standalone[c.call_id].info.trace_id]


def test_the_daemon_writes_the_standalone_at_once_and_nests_a_late_app_trace_within_grace(nest_run: dict) -> None:
    (c,) = [c for c in nest_run["calls"] if c.scenario == "delayed"]
    app = nest_run["daemon"].apps[c.app_trace_id]
    app_end_s = (app.info.request_time + app.info.execution_duration) / 1000
    assert app_end_s - c.records[-1]["endTime"] > 10, "the app's trace reached MLflow well after the proxy logged the call"
    assert nest_run["first_seen"][c.call_id] < app_end_s - 5, "the standalone trace did not wait for the app's"
    assert len(nested(app, c.call_id)) == 2
    m = nest_run["metrics"]
    rewritten = metric(m, "litellm_ingest_traces_written_total") - len(nest_run["calls"])
    n = len(traced(nest_run))
    assert n <= metric(m, "litellm_ingest_nested_calls_total") <= n + rewritten, "every call, once per time it was written"
    assert metric(m, "litellm_ingest_app_traces_missing_total") == 0


def differences(before: Any, after: Any, path: str = "") -> list[str]:
    """Where two JSON-like values differ, as readable paths (a failed equality of whole snapshots says nothing)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after), key=str)
        return [d for k in keys for d in differences(before.get(k, "<absent>"), after.get(k, "<absent>"), f"{path}/{k}")]
    if isinstance(before, list | tuple) and isinstance(after, list | tuple) and len(before) == len(after):
        return [d for i, (x, y) in enumerate(zip(before, after, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if before == after else [f"{path}: {str(before)[:120]} -> {str(after)[:120]}"]


def _contents(snap: Snapshot) -> dict[str, Any]:
    return {
        "standalone": {cid: [s.to_dict() for s in t.data.spans] for cid, t in snap.standalone.items()},
        "apps": {tid: ({s.span_id: s.to_dict() for s in t.data.spans}, t.info.to_dict()) for tid, t in snap.apps.items()},
    }


def test_a_replay_into_the_same_experiment_changes_nothing(nest_run: dict) -> None:
    summary = nest_run["replay_summary"]
    assert (summary["nested_calls"], summary["app_traces_missing"], summary["nest_pending"]) == (len(traced(nest_run)), 0, 0), summary
    assert not (changed := differences(_contents(nest_run["daemon"]), _contents(nest_run["replay"]))), "\n".join(changed)


def test_no_nest_writes_standalone_traces_only(nest_run: dict) -> None:
    summary = nest_run["no_nest_summary"]
    assert summary["nested_calls"] == 0, summary
    assert set(nest_run["no_nest"].standalone) == {c.call_id for c in nest_run["calls"]}
    assert not (changed := differences(_contents(nest_run["replay"])["apps"], _contents(nest_run["no_nest"])["apps"])), "\n".join(changed)


def test_a_deleted_app_trace_gets_nothing_and_its_call_stays_standalone(nest_run: dict) -> None:
    uri, deleted, summary = nest_run["uri"], nest_run["deleted"], nest_run["missing_summary"]
    assert not trace_exists(uri, deleted)
    assert deleted not in nest_run["anywhere"]
    (c,) = [c for c in nest_run["calls"] if c.app_trace_id == deleted]
    t = nest_run["missing"][c.call_id]
    assert t.info.tags["litellm.app_trace_id"] == deleted
    assert set(nest_run["missing"]) == {c.call_id for c in nest_run["calls"]}
    assert (summary["app_traces_missing"], summary["nested_calls"], summary["nest_pending"]) == (1, len(traced(nest_run)) - 1, 0), summary
