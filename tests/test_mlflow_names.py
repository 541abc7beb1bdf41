"""The names copied in :mod:`ingest.mlflow_names` are MLflow's own: a rename in MLflow fails here, not
as traces whose chat, tokens or type MLflow no longer reads."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.entities.span import SpanType
from mlflow.tracing import constant
from mlflow.utils import validation

from ingest import mlflow_names

CLASSES = {
    mlflow_names.SpanType: SpanType,
    mlflow_names.SpanAttributeKey: constant.SpanAttributeKey,
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


def test_the_location_and_limits_are_mlflows() -> None:
    assert constant.SpansLocation.TRACKING_STORE.value == mlflow_names.SPANS_IN_TRACKING_STORE
    assert mlflow_names.MAX_CHARS_IN_TRACE_INFO_METADATA == constant.MAX_CHARS_IN_TRACE_INFO_METADATA
    assert mlflow_names.MAX_TRACE_TAG_VAL_LENGTH == validation.MAX_TRACE_TAG_VAL_LENGTH


def test_the_engine_imports_without_mlflow() -> None:
    """What a cron run with nothing new loads: the command line, the engine and its state."""
    heavy = "('mlflow', 'sqlalchemy', 'pandas')"
    code = f"import sys, ingest.cli, ingest.pipeline, ingest.idle; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
