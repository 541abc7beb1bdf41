"""Credentials planted in real records never reach MLflow, through every writer, as a user runs it.

33 distinct credentials, each with a fresh random body, are planted in real capture records and
SpendLogs rows at every place LiteLLM or a client can put one (error text, tracebacks, tags, URLs,
model parameters, key hash and alias, ids, prompts, responses). Real ``litellm-ingest`` processes
write them into SQLite (bulk writer and ``log_spans``), a real ``mlflow server`` and through the
``tail`` daemon; then everything is read back: the whole database dumped as SQL text, and every
trace through MLflow's API. No credential may appear, whole or as any 8-character piece of its
random body, and the traces must still carry their usage, cost, status and model.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import string
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import all_traces, reidentify, run_cli, spend_row, sqlite_trace_count, write_jsonl
from tests.tailkit import Daemon, wait_for

EXE = str(Path(sys.executable).parent / "litellm-ingest")
DEFAULT_SALT = "litellm-ingest/scrub/v1"  # the documented default (README, "Credentials in traces")
CHUNK = 8


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "LITELLM_INGEST_SCRUB_SALT"}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = run_cli(list(args), cwd, _env())
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return proc


def body(n: int = 24) -> str:
    """Random letters and digits (a digit guaranteed): unique enough that any 8 of them found means a leak."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n - 1)) + secrets.choice(string.digits)


def opaque(n: int = 20) -> str:
    """A credential with no recognisable shape: only where it sits gives it away."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(n))


def fingerprint(secret: str) -> str:
    return f"[REDACTED:{hmac.new(DEFAULT_SALT.encode(), secret.encode(), hashlib.sha256).hexdigest()[:8]}]"


@dataclass
class Planted:
    records: list[dict] = field(default_factory=list)
    secrets: dict[str, tuple[str, str]] = field(default_factory=dict)
    """name -> (the credential as planted, its random body)"""
    content: set[str] = field(default_factory=set)
    """names planted in prompts or responses (verbatim with --no-scrub-content)"""

    def plant(self, name: str, value: str, secret_body: str, content: bool = False) -> str:
        assert all(secret_body not in b for _, b in self.secrets.values())
        self.secrets[name] = (value, secret_body)
        if content:
            self.content.add(name)
        return value

    def sk(self, name: str, prefix: str = "sk-", content: bool = False) -> str:
        b = body()
        return self.plant(name, prefix + b, b, content)

    def raw(self, name: str, content: bool = False) -> str:
        b = opaque()
        return self.plant(name, b, b, content)

    def calls(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for r in self.records:
            out.setdefault(r["litellm_call_id"], []).append(r)
        return out


def _nested(levels: int, leaf: Any) -> Any:
    for _ in range(levels):
        leaf = {"a": leaf}
    return leaf


def _plant(capture: list[dict]) -> Planted:
    p = Planted()
    a = reidentify([capture[23]])[0]  # a failed call (upstream 500)
    b1, b2 = reidentify([capture[28], capture[29]])  # a failed primary and its fallback's success: two attempts
    c_slp = reidentify([capture[24]])[0]  # a failure, as a SpendLogs row
    d_slp = reidentify([capture[18]])[0]  # a success with user, tags and a session, as a SpendLogs row

    shared = p.sk("alias shared by two records")
    akia = body(16).upper()
    p.plant("traceback AKIA", f"AKIA{akia}", akia)
    pem = body(64)
    p.plant("traceback PEM", pem, pem)
    err = a["error_information"]
    err["error_message"] = (
        "litellm.AuthenticationError: AuthenticationError: OpenAIException - "
        f"Incorrect API key provided: {p.sk('error message', 'sk-proj-')}. "
        "You can find your API key at https://platform.openai.com/account/api-keys."
    )
    err["traceback"] = (
        'Traceback (most recent call last):\n  File "litellm/main.py", line 1, in completion\n'
        f"    client = OpenAI(api_key='{p.raw('traceback dict repr')}', base_url=None)\n"
        f"botocore.exceptions.ClientError: {{'aws_access_key_id': 'AKIA{akia}'}}\n"
        f"ValueError: could not load -----BEGIN RSA PRIVATE KEY-----\n{pem}\n-----END RSA PRIVATE KEY-----\n"
        f'httpx.HTTPStatusError: 401 body={{"error":"invalid_grant","accessToken":"{p.raw("traceback camelCase name")}"}}\n'
        f"psycopg.OperationalError: connection failed: password: 'correct horse {p.raw('traceback quoted value of words')}'\n"
        f"request headers: Cookie: ai_user=abc; AppServiceAuthSession={p.raw('traceback cookie after ;')}\n"
    )
    a["request_tags"] = [
        *a["request_tags"],
        f"api_key:{p.sk('tag api_key:')}",
        p.sk("tag bare"),
        f"token:{p.raw('tag token:')}",
        f"API Key: {p.raw('tag API Key:')}",
    ]
    g = body(35)
    a["api_base"] = (
        f"https://generativelanguage.googleapis.com/v1beta/models/gemini-pro:generateContent?key={p.plant('api_base ?key=', 'AIza' + g, g)}"
    )
    a["model_parameters"] = {
        **a["model_parameters"],
        "api_key": p.raw("model_parameters.api_key"),
        "extra_headers": {"Authorization": f"Bearer {p.raw('model_parameters.extra_headers.Authorization')}"},
        "deep": _nested(30, {"credentials": {"refresh": p.raw("model_parameters credentials object 30 levels deep")}}),
    }
    a["metadata"]["user_api_key_hash"] = f"Bearer {p.sk('user_api_key_hash Bearer')}"
    a["metadata"]["user_api_key_alias"] = shared
    a["metadata"]["user_api_key_user_id"] = p.sk("user_api_key_user_id")
    a["end_user"] = p.sk("end_user")
    a["trace_id"] = a["session_id"] = p.sk("session id")
    a["messages"] = [{"role": "user", "content": f"my key is {p.sk('prompt', 'sk-ant-api03-', content=True)}, keep it"}]

    jwt_payload = body(40)
    jwt = p.plant("error JWT", f"eyJhbGciOiJIUzI1NiJ9.eyJ{jwt_payload}.{body(12)}", jwt_payload)
    b1["error_information"]["error_message"] = f"401 invalid token {jwt}"
    b1["api_base"] = f"https://litellm:{p.raw('api_base userinfo password')}@proxy.internal:4000/v1"
    b1["metadata"]["user_api_key_hash"] = f" {p.sk('user_api_key_hash leading space')}"
    b2["metadata"]["user_api_key_alias"] = shared
    pem = body(64)
    p.plant("vertex_credentials PEM", pem, pem)
    b2["model_parameters"] = {
        **b2["model_parameters"],
        "vertex_credentials": {
            "type": "service_account",
            "private_key": f"-----BEGIN PRIVATE KEY-----\n{pem}\n-----END PRIVATE KEY-----\n",
        },
    }
    b2["messages"] = [{"role": "user", "content": f"token for you: {p.sk('prompt of a fallback', 'hf_', content=True)}"}]
    b2["response"] = copy.deepcopy(b2["response"])
    b2["response"]["choices"][0]["message"]["content"] = f"Stored {p.sk('response', 'ghp_', content=True)} for later."

    c = spend_row(c_slp, store_prompts=True, naive=True)
    c["proxy_server_request"] = json.dumps(
        {
            "model": c_slp["model"],
            "messages": c_slp["messages"],
            "api_key": p.raw("SpendLogs proxy_server_request.api_key"),
            "extra_headers": {"x-api-key": p.raw("SpendLogs proxy_server_request x-api-key")},
            "metadata": {"aws_config": f"secretAccessKey={p.raw('SpendLogs proxy_server_request camelCase name in text')}"},
        }
    )
    c["api_key"] = p.sk("SpendLogs api_key column (raw, not a hash)")
    md = json.loads(c["metadata"])
    md["user_api_key_alias"] = p.sk("SpendLogs alias", "xai-")
    md["error_information"]["error_message"] = f"Error code: 401 - invalid key {p.sk('SpendLogs error', 'gsk_')}"
    c["metadata"] = json.dumps(md)
    c["request_tags"] = json.dumps([f"api_key:{p.sk('SpendLogs tag')}", "team:b"])
    c["end_user"] = p.sk("SpendLogs end_user")
    c["user"] = p.sk("SpendLogs user")

    d = spend_row(d_slp, store_prompts=True, naive=True)
    messages = [{"role": "user", "content": f"use {p.sk('SpendLogs prompt', content=True)} please"}]
    d["messages"] = json.dumps(messages)
    response = copy.deepcopy(d_slp["response"])
    response["choices"][0]["message"]["content"] = f"ok: {p.sk('SpendLogs response', 'sk_live_', content=True)}"
    d["response"] = json.dumps(response)
    d["session_id"] = p.sk("SpendLogs session")

    p.records = [a, b1, b2, c, d]
    assert len(p.secrets) >= 25
    return p


@pytest.fixture(scope="module")
def planted(capture: list[dict]) -> Planted:
    return _plant(capture)


@pytest.fixture(scope="module")
def log(planted: Planted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_jsonl(tmp_path_factory.mktemp("planted") / "calls.jsonl", planted.records)
    raw = path.read_text()
    assert all(value in raw or json.dumps(value)[1:-1] in raw for value, _ in planted.secrets.values())
    return path


# --- reading back ---------------------------------------------------------------------------------


def sqlite_dump(uri: str) -> str:
    db = uri.removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return "\n".join(con.iterdump())


def api_text(traces: list) -> str:
    """Every trace as MLflow's API returns it: info (previews, tags, metadata) and spans."""
    return json.dumps([{"info": t.info.to_dict(), "spans": [s.to_dict() for s in t.data.spans]} for t in traces], default=str)


def leaks(text: str, planted: Planted, allowed: set[str] = frozenset()) -> dict[str, str]:
    """Planted credentials found in ``text``: whole, or any 8-character piece of their random body."""
    found = {}
    for name, (value, secret_body) in planted.secrets.items():
        if name in allowed:
            continue
        if value in text:
            found[name] = value
            continue
        for i in range(len(secret_body) - CHUNK + 1):
            if secret_body[i : i + CHUNK] in text:
                found[name] = secret_body[i : i + CHUNK]
                break
    return found


def by_call(traces: list) -> dict[str, Any]:
    return {t.info.tags["litellm.call_id"]: t for t in traces}


def assert_nothing_dropped(traces: list, planted: Planted) -> None:
    """The scrub must not take data with it: every call's trace, with its usage, cost, status and model."""
    calls = planted.calls()
    got = by_call(traces)
    assert set(got) == set(calls)
    for cid, recs in calls.items():
        t = got[cid]
        final = max(recs, key=lambda r: r["endTime"])
        want_state = "OK" if final["status"] == "success" else "ERROR"
        assert t.info.state.value == want_state, (cid, t.info.state)
        usage = t.info.token_usage or {}
        assert usage.get("input_tokens") == sum(r["prompt_tokens"] for r in recs), (cid, usage)
        assert usage.get("total_tokens") == sum(r["total_tokens"] for r in recs), (cid, usage)
        cost = sum(r.get("response_cost", r.get("spend")) or 0 for r in recs)
        assert (t.info.cost or {}).get("total_cost", 0) == pytest.approx(cost, rel=1e-9, abs=1e-15), cid
        assert t.info.tags["litellm.model"] == final["model"], cid
        assert len(t.data.spans) == (1 if len(recs) == 1 else len(recs) + 1)


def assert_one_marker_for_one_key(traces: list, planted: Planted) -> None:
    shared = planted.secrets["alias shared by two records"][0]
    aliases = [t.info.tags.get("litellm.key_alias") for t in traces if t.info.tags.get("litellm.key_alias", "").startswith("[REDACTED:")]
    assert aliases.count(fingerprint(shared)) == 2, aliases
    a = next(t for t in traces if t.info.tags.get("litellm.key_alias") == fingerprint(shared) and len(t.data.spans) == 1)
    hashed = planted.secrets["user_api_key_hash Bearer"][0]
    assert a.data.spans[0].attributes["user_api_key_hash"] == fingerprint(hashed)
    assert fingerprint(planted.secrets["tag api_key:"][0]) == a.info.tags["api_key"]


# --- the stores -----------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["bulk", "mlflow"])
def test_no_planted_credential_reaches_a_sqlite_store(planted: Planted, log: Path, tmp_path: Path, writer: str) -> None:
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    run("batch", str(log), "--tracking-uri", uri, "--experiment-name", "scrub", "--sql-writer", writer, "--no-state", "-q", cwd=tmp_path)
    traces = all_traces(uri, "scrub")
    assert not leaks(sqlite_dump(uri), planted)
    assert not leaks(api_text(traces), planted)
    assert_nothing_dropped(traces, planted)
    assert_one_marker_for_one_key(traces, planted)


@pytest.mark.server
def test_no_planted_credential_reaches_an_mlflow_server(planted: Planted, log: Path, tmp_path: Path, mlflow_server: Any) -> None:
    experiment = f"scrub-{secrets.token_hex(4)}"
    run("batch", str(log), "--tracking-uri", mlflow_server.url, "--experiment-name", experiment, "--no-state", "-q", cwd=tmp_path)
    traces = all_traces(mlflow_server.url, experiment)
    assert not leaks(api_text(traces), planted)
    assert not leaks(sqlite_dump(mlflow_server.backend_uri), planted)
    stored = b"".join(p.read_bytes() for p in (mlflow_server.workdir / "artifacts").rglob("*") if p.is_file())
    assert not leaks(stored.decode("utf-8", "replace"), planted)
    assert_nothing_dropped(traces, planted)
    assert_one_marker_for_one_key(traces, planted)


def test_redact_all_shows_only_the_marker_in_the_request_preview(planted: Planted, log: Path, tmp_path: Path, capture: list[dict]) -> None:
    both = write_jsonl(tmp_path / "logs" / "both.jsonl", planted.records + reidentify(capture))
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    run("batch", str(both), "--tracking-uri", uri, "--experiment-name", "redacted", "--redact", "all", "--no-state", "-q", cwd=tmp_path)
    traces = all_traces(uri, "redacted")
    assert len(traces) == len(planted.calls()) + len({r["litellm_call_id"] for r in capture})
    assert not leaks(sqlite_dump(uri), planted)
    previews = {t.info.request_preview for t in traces}
    assert previews == {"[redacted]"}, sorted(p or "" for p in previews)[:3]
    root_inputs = [t.data.spans[0].inputs for t in traces]
    assert any("temperature" in i or "api_key" in i for i in root_inputs)  # the parameters are still in the inputs
    assert_nothing_dropped([t for t in traces if t.info.tags["litellm.call_id"] in planted.calls()], planted)


def test_no_scrub_content_keeps_prompts_and_responses_but_scrubs_the_rest(planted: Planted, log: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    run("batch", str(log), "--tracking-uri", uri, "--experiment-name", "verbatim", "--no-scrub-content", "--no-state", "-q", cwd=tmp_path)
    dump = sqlite_dump(uri)
    traces = all_traces(uri, "verbatim")
    assert set(leaks(dump, planted)) == planted.content
    assert set(leaks(api_text(traces), planted)) == planted.content
    assert_nothing_dropped(traces, planted)


def test_the_tail_daemon_scrubs_as_batch_does(planted: Planted, tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    db = tmp_path / "store.db"
    uri = f"sqlite:///{db}"
    daemon = Daemon(logdir, uri, "tailed", tmp_path / "state").start()
    try:
        write_jsonl(logdir / "proxy.jsonl", planted.records)
        wait_for(lambda: sqlite_trace_count(db) == len(planted.calls()), 60, "the planted calls in MLflow")
    finally:
        assert daemon.stop() == 0
    traces = all_traces(uri, "tailed")
    assert not leaks(sqlite_dump(uri), planted)
    assert not leaks(api_text(traces), planted)
    assert_nothing_dropped(traces, planted)


def test_what_stays_on_the_host_with_raw_lines_is_readable_by_its_owner_only(planted: Planted, log: Path, tmp_path: Path) -> None:
    """The state holds the raw lines of calls not settled yet (here every call: ``--settle`` is long),
    keys quoted by a failure among them, and the quarantine file holds bad lines verbatim: both
    were written ``0644`` in a folder anyone could list."""
    state = tmp_path / "fresh" / "state"
    quarantine = state / "quarantine.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"litellm_call_id": "q", "api_key": "sk-' + "Q" * 40 + '", "startTime": "x"\n')
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    args = ["batch", str(log), str(bad), "--tracking-uri", uri, "--state-dir", str(state), "--settle", "1e9", "-q"]
    proc = subprocess.run([EXE, *args], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (doc,) = state.glob("batch-*.json")
    assert json.loads(doc.read_text())["held"] or json.loads(doc.read_text())["recent"], "raw lines are kept"
    for path in (doc, quarantine):
        assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
    assert state.stat().st_mode & 0o077 == 0, oct(state.stat().st_mode)
