"""An `mlflow server` with MLflow's own basic auth (``--app-name basic-auth``), written to by a user
who is not an admin but manages the proxy's experiment, as a team would set it up.

MLflow's auth refuses such a user a lookup (``batchGetInfos``) that names a trace it does not hold
yet, which is every lookup of a new batch: every run failed with exit 4 and a message blaming the
credentials. Traces are now looked up one at a time there, so calls are written, a late attempt
joins its call, and a call nests into an app trace the user may edit."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import requests

from tests.conftest import MlflowServer, all_traces, reidentify, run_cli, start_mlflow_server, write_jsonl
from tests.test_nesting import app, app_call, proxy_records, spans_by_id

ADMIN = ("admin", "Admin-Pass-12345")
USER = ("ingest", "Ingest-Pass-12345")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    env = {"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret"}
    server = start_mlflow_server(tmp_path_factory.mktemp("auth-server"), extra_args=("--app-name", "basic-auth"), env=env)
    try:
        answer = requests.post(f"{server.url}/api/2.0/mlflow/users/create", json={"username": USER[0], "password": USER[1]}, auth=ADMIN)
        assert answer.ok, answer.text
        yield server
    finally:
        server.stop()


def grant(server: MlflowServer, experiment: str, permission: str) -> str:
    """The experiment (made by the admin if need be), with ``permission`` on it for the user."""
    got = requests.get(f"{server.url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment}, auth=ADMIN)
    if got.ok:
        exp_id = got.json()["experiment"]["experiment_id"]
    else:
        made = requests.post(f"{server.url}/api/2.0/mlflow/experiments/create", json={"name": experiment}, auth=ADMIN)
        assert made.ok, made.text
        exp_id = made.json()["experiment_id"]
    body = {"resource_type": "experiment", "resource_id": exp_id, "username": USER[0], "permission": permission}
    answer = requests.post(f"{server.url}/api/3.0/mlflow/users/permissions/grant", json=body, auth=ADMIN)
    assert answer.ok, answer.text
    return exp_id


def batch(server: MlflowServer, logs: Path, state: Path, experiment: str, *extra: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_USERNAME": USER[0], "MLFLOW_TRACKING_PASSWORD": USER[1]}
    p = run_cli(
        ["batch", str(logs), "--tracking-uri", server.url, "--experiment-name", experiment, "--state-dir", str(state),
         "--json", "--mlflow-timeout", "20", *extra],
        Path.cwd(), env, 300,
    )  # fmt: skip
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return json.loads(p.stdout)


def as_admin(server: MlflowServer) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}


def test_a_user_who_manages_the_experiment_writes_every_call_and_a_late_attempt_joins_its_call(
    auth_server: MlflowServer, capture: list[dict], tmp_path: Path
) -> None:
    grant(auth_server, "proxy-auth", "MANAGE")
    records = reidentify([r for r in capture if r["call_type"] == "acompletion"])
    by_call: dict[str, list[dict]] = {}
    for r in records:
        by_call.setdefault(r["litellm_call_id"], []).append(r)
    fallback = next(rs for rs in by_call.values() if [r["status"] for r in rs] == ["failure", "success"])
    first = [r for r in records if r is not fallback[1]]
    logs, state = tmp_path / "logs", tmp_path / "state"
    write_jsonl(logs / "proxy.jsonl", first)
    s1 = batch(auth_server, logs, state, "proxy-auth", "--settle", "0")
    assert s1["traces_written"] == len(by_call)
    write_jsonl(logs / "later.jsonl", [fallback[1]])
    batch(auth_server, logs, state, "proxy-auth", "--settle", "0")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in as_admin(auth_server).items():
            mp.setenv(k, v)
        traces = {t.info.tags["litellm.call_id"]: t for t in all_traces(auth_server.url, "proxy-auth")}
    assert set(traces) == set(by_call)
    joined = traces[fallback[0]["litellm_call_id"]]
    assert joined.info.state.value == "OK" and len(joined.data.spans) == 3, "the late success joined the failure: root and two attempts"


def test_a_call_nests_into_an_app_trace_the_user_may_edit(auth_server: MlflowServer, capture: list[dict], tmp_path: Path) -> None:
    grant(auth_server, "proxy-auth-nest", "MANAGE")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in as_admin(auth_server).items():
            mp.setenv(k, v)
        with app(auth_server.url) as app_experiment, app_call() as call:
            pass
        name = mlflow.MlflowClient(auth_server.url).get_experiment(app_experiment).name
    grant(auth_server, name, "EDIT")
    write_jsonl(tmp_path / "logs" / "proxy.jsonl", proxy_records(capture, call))
    summary = batch(auth_server, tmp_path / "logs", tmp_path / "state", "proxy-auth-nest")
    assert (summary["traces_written"], summary["nested_calls"]) == (1, 1)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in as_admin(auth_server).items():
            mp.setenv(k, v)
        assert len(spans_by_id(auth_server.url, call["trace_id"])) == 2 + 2, "the proxy span and its attempt"


def test_a_user_who_may_not_delete_replaces_nothing_and_the_run_counts_the_callbacks_traces_as_without_the_option(
    auth_server: MlflowServer, capture: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--replace-callback-traces by a user with EDIT (writes, may not delete): the first delete is
    refused, said once, and the run goes on as it would without the option (it counts the
    callback's traces, which stay); every later write used to search the callback's traces of all
    it wrote so far again, look each up one request at a time, and be refused again."""
    from tests.test_callback_beside import SAID, callback_traces, replay_callback

    grant(auth_server, "proxy-no-delete", "EDIT")
    records = reidentify(capture[:15])
    log = write_jsonl(tmp_path / "logs" / "proxy.jsonl", records)
    for k, v in as_admin(auth_server).items():
        monkeypatch.setenv(k, v)  # the reads here are the admin's
    theirs = replay_callback(log, auth_server.url, "proxy-no-delete", as_admin(auth_server))
    assert theirs == len(records)

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_USERNAME": USER[0], "MLFLOW_TRACKING_PASSWORD": USER[1]}
    p = run_cli(
        ["batch", str(log), "--tracking-uri", auth_server.url, "--experiment-name", "proxy-no-delete", "--no-state", "--json",
         "--batch-size", "5", "--replace-callback-traces"],
        Path.cwd(), env, 300,
    )  # fmt: skip
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.count("may not delete LiteLLM's callback traces") == 1, p.stderr
    assert SAID not in p.stderr, "said once"
    summary = json.loads(p.stdout)
    assert summary["callback_traces"] == theirs and summary["callback_traces_replaced"] == 0
    calls = {r["litellm_call_id"] for r in records}
    assert summary["traces_written"] == len(calls)
    ours = [t for t in all_traces(auth_server.url, "proxy-no-delete", include_spans=False) if "litellm.call_id" in t.info.tags]
    assert sorted(t.info.tags["litellm.call_id"] for t in ours) == sorted(calls)
    assert len(callback_traces(auth_server.url, "proxy-no-delete")) == theirs
