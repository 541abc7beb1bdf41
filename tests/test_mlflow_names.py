"""The names copied in :mod:`ingest.mlflow_names` are MLflow's own: a rename in MLflow fails here, not
as traces whose chat, tokens or type MLflow no longer reads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.entities.span import SpanType
from mlflow.entities.span_log_level import SpanLogLevel
from mlflow.tracing import constant
from mlflow.utils import validation

from ingest import mlflow_names
from tests.conftest import CAPTURE_FILES

CLASSES = {
    mlflow_names.SpanType: SpanType,
    mlflow_names.SpanAttributeKey: constant.SpanAttributeKey,
    mlflow_names.SpanLogLevel: SpanLogLevel,
    mlflow_names.TokenUsageKey: constant.TokenUsageKey,
    mlflow_names.TraceTagKey: constant.TraceTagKey,
    mlflow_names.TraceMetadataKey: constant.TraceMetadataKey,
}


@pytest.mark.parametrize("ours", CLASSES, ids=lambda c: c.__name__)
def test_every_name_copied_is_mlflows(ours: type) -> None:
    names = [n for n in vars(ours) if n.isupper()]
    assert names
    for name in names:
        assert getattr(ours, name) == getattr(CLASSES[ours], name), f"{ours.__name__}.{name}"


def test_the_default_log_level_of_each_span_type_is_mlflows() -> None:
    from mlflow.tracing.utils.default_log_level import default_log_level_for_span_type

    types = [v for k, v in vars(SpanType).items() if k.isupper() and isinstance(v, str)]
    assert len(types) > len(mlflow_names.INFO_SPAN_TYPES)
    for kind in types:
        ours = mlflow_names.SpanLogLevel.INFO if kind in mlflow_names.INFO_SPAN_TYPES else mlflow_names.SpanLogLevel.DEBUG
        assert ours == default_log_level_for_span_type(kind), kind


def test_the_location_and_limits_are_mlflows() -> None:
    assert constant.SpansLocation.TRACKING_STORE.value == mlflow_names.SPANS_IN_TRACKING_STORE
    assert mlflow_names.MAX_CHARS_IN_TRACE_INFO_METADATA == constant.MAX_CHARS_IN_TRACE_INFO_METADATA
    assert mlflow_names.MAX_TRACE_TAG_VAL_LENGTH == validation.MAX_TRACE_TAG_VAL_LENGTH


def test_the_tags_mlflow_sets_itself_are_mlflows() -> None:
    from mlflow.server.handlers import _HANDLER_BLOCKED_TRACE_TAGS

    assert _HANDLER_BLOCKED_TRACE_TAGS <= mlflow_names.SYSTEM_TRACE_TAGS


def test_the_engine_imports_without_mlflow() -> None:
    """What a cron run with nothing new loads: the command line, the engine and its state."""
    heavy = "('mlflow', 'sqlalchemy', 'pandas')"
    code = f"import sys, ingest.cli, ingest.pipeline, ingest.idle; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _mlflow_refuses(key: str) -> bool:
    """MLflow's verdict. Up to 3.17 its check was ``re.match(r"^[...]*$")``, whose ``$`` let one
    trailing newline through; 3.18 uses ``fullmatch`` and refuses it, as our copy does on both."""
    if key.endswith("\n"):
        return True
    try:
        validation._validate_trace_tag(key, "")
    except Exception:
        return True
    return False


TAG_KEYS = ["a", "a/b", "a//b", "./a", "a/.", "a/../b", "..a", "/a", "a/", ".", "..", "a:b c-d.e_f", "a\n", "a\tb", "ü"]
TAG_KEYS += ["a" * 250, "a" * 251, "", " "]


@pytest.mark.parametrize("key", TAG_KEYS)
def test_tag_keys_refused_as_mlflow_refuses_them(key: str) -> None:
    assert mlflow_names.tag_key_refused(key) == _mlflow_refuses(key)


@given(st.text(alphabet=st.sampled_from("ab/.:- _\n\tü#"), max_size=12) | st.text(max_size=300))
@settings(max_examples=400, deadline=None)
def test_any_tag_key_refused_as_mlflow_refuses_it(key: str) -> None:
    assert mlflow_names.tag_key_refused(key) == _mlflow_refuses(key)


def test_a_dry_run_builds_its_spans_without_mlflow(tmp_path) -> None:
    """The no-sink stage (and a ``--dry-run`` worker) checks tag keys with the copy, so it never pays MLflow's import."""
    heavy = "('mlflow', 'pandas')"
    code = (
        "import sys\nfrom ingest.pipeline import RunOptions, run_batch\n"
        "s = run_batch(RunOptions(paths=[sys.argv[1]], dry_run=True))\nassert s.calls > 0, s\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(CAPTURE_FILES[1])], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


CREDENTIALS = "[mlflow]\nmlflow_tracking_username = file-user\nmlflow_tracking_password = file-pass\n"
ENVS = [
    {},
    {"MLFLOW_TRACKING_USERNAME": "env-user"},
    {"MLFLOW_TRACKING_USERNAME": "env-user", "MLFLOW_TRACKING_PASSWORD": "env-pass", "MLFLOW_TRACKING_TOKEN": "tok"},
    {"MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_INSECURE_TLS": "TRUE"},
    {"MLFLOW_TRACKING_INSECURE_TLS": "0", "MLFLOW_TRACKING_SERVER_CERT_PATH": "/ca.pem", "MLFLOW_TRACKING_CLIENT_CERT_PATH": "/c.pem"},
    {"MLFLOW_TRACKING_INSECURE_TLS": "1"},
    {"MLFLOW_TRACKING_INSECURE_TLS": "yes"},
]


@pytest.mark.parametrize("file", [None, CREDENTIALS, "[other]\nx = 1\n"], ids=["no file", "file", "no section"])
@pytest.mark.parametrize("env", ENVS, ids=lambda e: ",".join(f"{k[16:]}={v}" for k, v in e.items()) or "none")
def test_credentials_are_read_as_mlflow_reads_them(tmp_path, monkeypatch: pytest.MonkeyPatch, env: dict, file: str | None) -> None:
    from mlflow.utils.credentials import get_default_host_creds

    from ingest.mlflow_creds import host_creds

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in [n for n in os.environ if n.startswith("MLFLOW_TRACKING_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if file is not None:
        (tmp_path / ".mlflow").mkdir()
        (tmp_path / ".mlflow" / "credentials").write_text(file)

    def read(fn):  # type: ignore[no-untyped-def]
        try:
            c = fn()
        except ValueError as e:
            return str(e)
        return (c.username, c.password, c.token, c.ignore_tls_verification, c.client_cert_path, c.server_cert_path)

    assert read(host_creds) == read(lambda: get_default_host_creds("http://x"))
