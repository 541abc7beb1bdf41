"""The polars decode dtypes, detect keys and required fields come from the JSON Schema files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from ingest.schemas import RecordSchema, all_schemas, dtype_for, load_schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "schemas"
SLP_FILE = SCHEMA_DIR / "standard_logging_payload.schema.json"
SPEND_FILE = SCHEMA_DIR / "spend_logs.schema.json"

SCALAR = {"string": pl.String(), "number": pl.Float64(), "integer": pl.Int64(), "boolean": pl.Boolean()}


def doc(path: Path) -> dict:
    return json.loads(path.read_text())


def by_name(name: str) -> RecordSchema:
    found = [s for s in all_schemas() if s.name == name]
    assert len(found) == 1, [s.name for s in all_schemas()]
    return found[0]


@pytest.fixture(scope="module")
def slp() -> RecordSchema:
    return load_schema(SLP_FILE)


@pytest.fixture(scope="module")
def spend() -> RecordSchema:
    return load_schema(SPEND_FILE)


def non_null_types(node: dict) -> set[str]:
    t = node.get("type", [])
    return ({t} if isinstance(t, str) else set(t)) - {"null"}


# --- which schemas exist, and how they are found -------------------------------------------------


def test_all_schemas_are_the_files_in_schemas_dir() -> None:
    names = {doc(p)["x-ingest"]["format"] for p in SCHEMA_DIR.glob("*.schema.json")}
    assert names == {"standard_logging_payload", "spend_logs"}
    assert {s.name for s in all_schemas()} == names
    assert {s.path.resolve() for s in all_schemas()} == {p.resolve() for p in SCHEMA_DIR.glob("*.schema.json")}


def test_most_specific_schema_first_and_default_last() -> None:
    schemas = all_schemas()
    assert [len(s.detect_keys) for s in schemas] == sorted((len(s.detect_keys) for s in schemas), reverse=True)
    # The StandardLoggingPayload has no detect keys: it is the fallback for any other object.
    assert schemas[-1].name == "standard_logging_payload"
    assert schemas[0].name == "spend_logs"


def test_all_schemas_equal_load_schema_of_each_file(slp: RecordSchema, spend: RecordSchema) -> None:
    assert by_name("standard_logging_payload") == slp
    assert by_name("spend_logs") == spend


# --- StandardLoggingPayload ----------------------------------------------------------------------


def test_slp_meta_from_file(slp: RecordSchema) -> None:
    meta = doc(SLP_FILE)["x-ingest"]
    assert slp.name == meta["format"] == "standard_logging_payload"
    assert slp.detect_keys == tuple(meta["detect_keys"]) == ()
    assert slp.time_encoding == "epoch_seconds"
    assert slp.required == ("startTime", "endTime")
    assert slp.id_fields == ("litellm_call_id", "id")


@pytest.mark.parametrize("name", ["startTime", "endTime", "completionStartTime", "response_time", "response_cost", "saved_cache_cost"])
def test_slp_epoch_and_money_fields_are_float64(slp: RecordSchema, name: str) -> None:
    assert slp.direct[name] == pl.Float64()


@pytest.mark.parametrize("name", ["prompt_tokens", "completion_tokens", "total_tokens"])
def test_slp_token_fields_are_int64(slp: RecordSchema, name: str) -> None:
    assert slp.direct[name] == pl.Int64()


@pytest.mark.parametrize("name", ["stream", "cache_hit"])
def test_slp_flags_are_boolean(slp: RecordSchema, name: str) -> None:
    assert slp.direct[name] == pl.Boolean()


@pytest.mark.parametrize("name", ["id", "litellm_call_id", "trace_id", "session_id", "status", "model", "end_user", "error_str"])
def test_slp_text_fields_are_string(slp: RecordSchema, name: str) -> None:
    assert slp.direct[name] == pl.String()


def test_every_single_scalar_property_maps_to_its_polars_type() -> None:
    for path in (SLP_FILE, SPEND_FILE):
        schema = load_schema(path)
        for key, node in doc(path)["properties"].items():
            types = non_null_types(node)
            if len(types) == 1 and (t := next(iter(types))) in SCALAR:
                got = schema.direct.get(key, schema.json_text.get(key))
                assert got == SCALAR[t], (path.name, key, got)


def test_slp_metadata_is_struct_of_user_api_key_fields(slp: RecordSchema) -> None:
    md = slp.direct["metadata"]
    assert isinstance(md, pl.Struct)
    declared = [k for k in doc(SLP_FILE)["properties"]["metadata"]["properties"] if k != "requester_metadata"]
    assert [f.name for f in md.fields] == declared, "requester_metadata is documented, read by path, never decoded"
    assert slp.request_headers == ("metadata", "requester_metadata", "headers")
    assert all(f.name.startswith("user_api_key_") for f in md.fields)
    assert {"user_api_key_hash", "user_api_key_alias", "user_api_key_user_id", "user_api_key_team_id"} <= {f.name for f in md.fields}
    assert all(f.dtype == pl.String() for f in md.fields)
    assert "metadata" not in slp.json_text


def test_slp_error_information_is_struct(slp: RecordSchema) -> None:
    ei = slp.direct["error_information"]
    assert isinstance(ei, pl.Struct)
    assert {f.name: f.dtype for f in ei.fields} == {k: pl.String() for k in doc(SLP_FILE)["properties"]["error_information"]["properties"]}
    assert {"error_code", "error_class", "error_message"} <= {f.name for f in ei.fields}


def test_slp_request_tags_is_list_of_string(slp: RecordSchema) -> None:
    assert slp.direct["request_tags"] == pl.List(pl.String())


@pytest.mark.parametrize("name", ["messages", "response", "model_parameters", "hidden_params", "cost_breakdown"])
def test_slp_unshaped_payloads_are_not_decoded(slp: RecordSchema, name: str) -> None:
    assert name in doc(SLP_FILE)["properties"]
    assert name not in slp.direct
    assert name not in slp.json_text
    assert name not in {f.name for f in slp.decode_dtype.fields}


def test_slp_has_no_json_text_fields(slp: RecordSchema) -> None:
    assert slp.json_text == {}


def test_decode_dtype_is_struct_of_direct_fields(slp: RecordSchema, spend: RecordSchema) -> None:
    for schema in (slp, spend):
        dt = schema.decode_dtype
        assert isinstance(dt, pl.Struct)
        assert {f.name: f.dtype for f in dt.fields} == schema.direct


def test_only_declared_properties_are_decoded(slp: RecordSchema, spend: RecordSchema) -> None:
    for schema, path in ((slp, SLP_FILE), (spend, SPEND_FILE)):
        declared = set(doc(path)["properties"])
        assert set(schema.direct) | set(schema.json_text) <= declared
        assert not set(schema.direct) & set(schema.json_text)


# --- SpendLogs -----------------------------------------------------------------------------------


def test_spend_meta_from_file(spend: RecordSchema) -> None:
    meta = doc(SPEND_FILE)["x-ingest"]
    assert spend.name == "spend_logs"
    assert spend.detect_keys == tuple(meta["detect_keys"]) == ("request_id", "spend")
    assert spend.time_encoding == "iso8601"
    # x-ingest.required wins over the JSON Schema's own `required` (which also lists request_id).
    assert spend.required == tuple(meta["required"]) == ("startTime", "endTime")
    assert spend.id_fields == ("litellm_call_id", "request_id")


def test_spend_number_times_from_file(spend: RecordSchema, slp: RecordSchema) -> None:
    """SpendLogs times may be numbers (pandas' to_json): read by magnitude; the payload keys tell such rows from payloads."""
    d = doc(SPEND_FILE)
    meta, props = d["x-ingest"], d["properties"]
    assert spend.time_types == frozenset(props["startTime"]["type"]) == {"string", "number"}
    assert set(props["endTime"]["type"]) == {"string", "number"}
    assert set(props["completionStartTime"]["type"]) == {"string", "number", "null"}
    assert spend.number_time_encoding == meta["number_time_encoding"] == "epoch_by_magnitude"
    assert spend.excluded_keys == tuple(meta["excluded_keys"])
    assert set(spend.excluded_keys) <= set(doc(SLP_FILE)["properties"]) - set(props)
    assert spend.direct["startTime"] == pl.String()  # numbers decode as their text
    assert slp.time_types == {"number"} and slp.number_time_encoding is None and slp.excluded_keys == ()


def test_required_falls_back_to_json_schema_required(tmp_path: Path) -> None:
    d = doc(SPEND_FILE)
    del d["x-ingest"]["required"]
    p = tmp_path / "spend_logs.schema.json"
    p.write_text(json.dumps(d))
    assert load_schema(p).required == tuple(d["required"]) == ("request_id", "startTime", "endTime")


def test_spend_json_text_fields(spend: RecordSchema) -> None:
    assert set(spend.json_text) == {k for k, v in doc(SPEND_FILE)["properties"].items() if v.get("x-json-text")}
    assert set(spend.json_text) == {"metadata", "request_tags"}
    assert "metadata" not in spend.direct
    assert "request_tags" not in spend.direct


def test_spend_metadata_json_text_is_struct(spend: RecordSchema) -> None:
    md = spend.json_text["metadata"]
    assert isinstance(md, pl.Struct)
    declared = doc(SPEND_FILE)["properties"]["metadata"]["properties"]
    assert [f.name for f in md.fields] == list(declared)
    user_fields = [f for f in md.fields if f.name.startswith("user_api_key_")]
    assert {f.name for f in user_fields} == {k for k in declared if k.startswith("user_api_key_")}
    assert all(f.dtype == pl.String() for f in user_fields)
    ei = {f.name: f.dtype for f in md.fields}["error_information"]
    assert isinstance(ei, pl.Struct)
    assert {f.name for f in ei.fields} == set(declared["error_information"]["properties"])


def test_spend_request_tags_json_text_is_list_of_string(spend: RecordSchema) -> None:
    assert spend.json_text["request_tags"] == pl.List(pl.String())


def test_spend_times_are_text(spend: RecordSchema) -> None:
    for name in ("startTime", "endTime", "completionStartTime"):
        assert spend.direct[name] == pl.String()


def test_spend_cache_hit_string_or_boolean_decodes_as_string(spend: RecordSchema) -> None:
    assert non_null_types(doc(SPEND_FILE)["properties"]["cache_hit"]) == {"string", "boolean"}
    assert spend.direct["cache_hit"] == pl.String()


def test_spend_numbers(spend: RecordSchema) -> None:
    assert spend.direct["spend"] == pl.Float64()
    for name in ("prompt_tokens", "completion_tokens", "total_tokens", "request_duration_ms"):
        assert spend.direct[name] == pl.Int64()


@pytest.mark.parametrize("name", ["messages", "response", "proxy_server_request"])
def test_spend_unshaped_payloads_are_not_decoded(spend: RecordSchema, name: str) -> None:
    assert name not in spend.direct
    assert name not in spend.json_text


# --- derivation rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ({"type": "string"}, pl.String()),
        ({"type": ["string", "null"]}, pl.String()),
        ({"type": ["number", "null"]}, pl.Float64()),
        ({"type": "integer"}, pl.Int64()),
        ({"type": ["boolean", "null"]}, pl.Boolean()),
        ({"type": ["integer", "number"]}, pl.Float64()),
        ({"type": ["string", "number", "null"]}, pl.String()),
        ({"type": ["string", "boolean"]}, pl.String()),
        ({"type": ["array", "null"], "items": {"type": "string"}}, pl.List(pl.String())),
        ({"type": "array", "items": {"type": ["integer", "null"]}}, pl.List(pl.Int64())),
        (
            {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "number"}}},
            pl.Struct({"a": pl.String(), "b": pl.Float64()}),
        ),
        ({"type": ["string", "array"], "x-json-text": True, "items": {"type": "string"}}, pl.List(pl.String())),
        ({"type": ["string", "object"], "x-json-text": True, "properties": {"a": {"type": "integer"}}}, pl.Struct({"a": pl.Int64()})),
    ],
)
def test_dtype_for_decoded(node: dict, expected: pl.DataType) -> None:
    assert dtype_for(node) == expected


@pytest.mark.parametrize(
    "node",
    [
        {"type": ["object", "null"]},
        {"type": "array"},
        {"type": "array", "items": {"type": "object"}},
        {"type": ["array", "object", "string", "null"]},
        {"type": ["string", "object"], "properties": {"a": {"type": "string"}}},
        {"type": ["string", "array"], "items": {"type": "string"}},
        {},
    ],
)
def test_dtype_for_read_whole(node: dict) -> None:
    assert dtype_for(node) is None


def test_struct_leaves_out_unshaped_members() -> None:
    node = {"type": "object", "properties": {"a": {"type": "string"}, "blob": {"type": "object"}}}
    assert dtype_for(node) == pl.Struct({"a": pl.String()})


# --- a schema edit is picked up ------------------------------------------------------------------


def test_added_property_is_picked_up(tmp_path: Path) -> None:
    d = doc(SLP_FILE)
    d["properties"]["new_field_2027"] = {"type": ["integer", "null"]}
    d["properties"]["new_shape_2027"] = {"type": ["object", "null"], "properties": {"x": {"type": "array", "items": {"type": "string"}}}}
    d["properties"]["new_blob_2027"] = {"type": ["object", "null"]}
    d["properties"]["metadata"]["properties"]["user_api_key_project_id"] = {"type": ["string", "null"]}
    p = tmp_path / "standard_logging_payload.schema.json"
    p.write_text(json.dumps(d))

    before = load_schema(SLP_FILE)
    after = load_schema(p)
    assert "new_field_2027" not in before.direct
    assert after.direct["new_field_2027"] == pl.Int64()
    assert after.direct["new_shape_2027"] == pl.Struct({"x": pl.List(pl.String())})
    assert "new_blob_2027" not in after.direct
    assert "user_api_key_project_id" in {f.name for f in after.direct["metadata"].fields}
    assert "new_field_2027" in {f.name for f in after.decode_dtype.fields}
    # Everything that was there before is unchanged.
    assert {k: v for k, v in after.direct.items() if k in before.direct and k != "metadata"} == {
        k: v for k, v in before.direct.items() if k != "metadata"
    }
    assert after.path == p


def test_added_json_text_property_is_picked_up(tmp_path: Path) -> None:
    d = doc(SPEND_FILE)
    d["properties"]["mcp_info"] = {"type": ["string", "object", "null"], "x-json-text": True, "properties": {"tool": {"type": "string"}}}
    d["x-ingest"]["detect_keys"] = ["request_id", "spend", "mcp_info"]
    p = tmp_path / "spend_logs.schema.json"
    p.write_text(json.dumps(d))
    s = load_schema(p)
    assert s.json_text["mcp_info"] == pl.Struct({"tool": pl.String()})
    assert "mcp_info" not in s.direct
    assert s.detect_keys == ("request_id", "spend", "mcp_info")


def test_an_installed_package_reads_its_own_schemas_beside_a_foreign_schemas_package(tmp_path: Path) -> None:
    """The wheel puts ``schemas/`` at ``ingest/schemas``; the folder beside ``ingest`` is then
    site-packages' ``schemas``, which another distribution may ship (PyPI has one of that name): it
    was read instead, and a run quarantined every record as unbuildable (exit 3)."""
    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "ingest", site / "ingest", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(SCHEMA_DIR, site / "ingest" / "schemas")
    (site / "schemas").mkdir()
    (site / "schemas" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "from ingest.schemas import all_schemas; print(' '.join(sorted(s.name for s in all_schemas())))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == sorted(s.name for s in all_schemas())
