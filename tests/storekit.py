"""Reading an MLflow store's tables directly: row-for-row comparison with a store one process wrote, and counts to poll."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy

Rows = dict[str, set[tuple[Any, ...]]]


def _without(content: str, attributes: tuple[str, ...]) -> str:
    span = json.loads(content)
    span["attributes"] = {k: v for k, v in span.get("attributes", {}).items() if k not in attributes}
    return json.dumps(span, sort_keys=True)


def store_rows(uri: str, span_attributes_aside: tuple[str, ...] = ()) -> Rows:
    """What a reader of the store sees, without the per-store parts (the artifact location, and
    the write counter a re-send bumps) and without the span attributes set aside (what differs
    by which copy of the input was written first, such as ``litellm.log_source``)."""
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as c:
            q = lambda sql: {tuple(r) for r in c.execute(sqlalchemy.text(sql))}  # noqa: E731
            return {
                "info": q(
                    "SELECT request_id, timestamp_ms, execution_time_ms, status, request_preview, response_preview, trace_name "
                    "FROM trace_info"
                ),
                "spans": {
                    (*r[:3], _without(r[3], span_attributes_aside) if span_attributes_aside else r[3])
                    for r in q("SELECT trace_id, span_id, parent_span_id, content FROM spans")
                },
                "tags": q("SELECT request_id, key, value FROM trace_tags WHERE key != 'mlflow.artifactLocation'"),
                "metadata": q("SELECT request_id, key, value FROM trace_request_metadata"),
                "experiments": q("SELECT name FROM experiments"),
            }
    finally:
        engine.dispose()


def assert_same_as_one_writer(
    uri: str, reference: Rows, span_attributes_aside: tuple[str, ...] = (), metadata_aside: tuple[str, ...] = ()
) -> None:
    """``reference``: store_rows of the single-writer store, with the same attributes set aside;
    ``metadata_aside``: metadata keys only this store may have."""
    rows = store_rows(uri, span_attributes_aside)
    rows["metadata"] = {r for r in rows["metadata"] if r[1] not in metadata_aside}
    assert rows["experiments"] == reference["experiments"]
    for table in ("info", "spans", "tags", "metadata"):
        extra, missing = sorted(map(str, rows[table] - reference[table])), sorted(map(str, reference[table] - rows[table]))
        assert not extra and not missing, f"{table}: {len(extra)} extra, {len(missing)} missing: {extra[:2]}, {missing[:2]}"


def trace_and_span_counts(uri: str, experiment: str) -> tuple[int, int]:
    """(traces, spans) committed in an experiment of a database store; (0, 0) before it exists."""
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as c:
            exp = c.execute(sqlalchemy.text("SELECT experiment_id FROM experiments WHERE name = :n"), {"n": experiment}).scalar()
            if exp is None:
                return 0, 0
            count = "SELECT count(*) FROM {} WHERE experiment_id = :e"
            return tuple(int(c.execute(sqlalchemy.text(count.format(t)), {"e": exp}).scalar()) for t in ("trace_info", "spans"))  # type: ignore[return-value]
    except sqlalchemy.exc.OperationalError:
        return 0, 0
    finally:
        engine.dispose()
