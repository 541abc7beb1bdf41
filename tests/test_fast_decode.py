"""The fast decode (``read_ndjson`` over joined lines, bisected on failure) against the reference
(``json_decode`` alone): the same canonical frame, warnings and quarantine records for every line.

``read_ndjson`` and ``json_decode`` disagree on many values (read_ndjson refuses ``1.0`` for an
integer, ``true`` for a number, a string for a list, a ``null`` line; it accepts an object or
array for a text field and writes it as JSON text, where json_decode fails). The corpus puts
each of those, and the usual bad lines, at every field the schemas declare, among real records.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from ingest import normalize as norm
from ingest.normalize import decode_objects, fast_decode, normalize_isolating, safe_decode
from ingest.schemas import all_schemas
from ingest.sources import read_chunks
from tests.conftest import SAMPLE_LOGS

HOLE = "\x01hole"
"""Stands for a value in a record's JSON text, replaced by raw JSON (so NaN, huge integers and
duplicate keys can be written)."""

ODD_VALUES = [
    '"x"', '""', '"{not json"', '"[1]"', '"{\\"a\\": 1}"', "5", "-5", "1.5", "1.0", "1e3", "-0", "99999999999999999999",
    "-99999999999999999999", "9223372036854775808", "true", "false", "null", "{}", '{"x": "a"}', '{"x": {"y": 1}}',
    "[]", "[1]", '["a"]', '["a", 1]', "[null]", '[{"x": "a"}]', "[[1]]", '"1"', '"true"', "NaN", "Infinity", "1e400",
    '"\\u0000"', '"a\\ud800b"', '"\\ud83d\\ude00"', '"\\u2028"',
]  # fmt: skip

BAD_LINES = [
    "null", "[1, 2]", "5", '"text"', "{", '{"startTime": 1', "{'single': 1}", '{"a": 1} {"a": 2}', '{"a": 1}}',
    '{"a": "tab\there"}', '{"a": 1}\x00', "\u00a0{}", "not json at all", "{}",
]  # fmt: skip


def _records() -> list[str]:
    """The real records: the capture (payload format) and the SpendLogs export."""
    lines: list[str] = []
    for f in (SAMPLE_LOGS / "proxy_calls.jsonl.1.gz", SAMPLE_LOGS / "proxy_calls.jsonl", SAMPLE_LOGS / "spend_logs_export.jsonl"):
        data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        lines += [line for line in data.decode().splitlines() if line.strip()]
    return lines


def _with_value(record: dict, path: tuple[str, ...], value: str, duplicate: bool = False) -> str:
    """The record's JSON text with the field at ``path`` holding the raw JSON ``value``."""
    rec = json.loads(json.dumps(record))
    node = rec
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = HOLE
    text = json.dumps(rec)
    hole = json.dumps(HOLE)
    if duplicate:
        return text.replace(hole, f'{value}, "{path[-1]}": "second"')
    return text.replace(hole, value)


def _declared_paths() -> dict[str, list[tuple[str, ...]]]:
    """Every field each schema decodes, nested ones by their path."""

    def walk(dtype: pl.DataType, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
        out = [prefix] if prefix else []
        if isinstance(dtype, pl.Struct):
            for f in dtype.fields:
                out += walk(f.dtype, (*prefix, f.name))
        return out

    paths = {}
    for schema in all_schemas():
        fields = dict(schema.direct)
        fields.update(schema.json_text)
        paths[schema.name] = walk(pl.Struct(fields), ())
    return paths


def corpus() -> list[str]:
    """Real records, and each declared field of the smallest record of each format given every odd value."""
    records = _records()
    by_format = {}
    for line in sorted(records, key=len):
        by_format.setdefault("spend_logs" if '"spend"' in line else "standard_logging_payload", json.loads(line))
    rng = random.Random(7)
    lines = list(records)
    for fmt, paths in _declared_paths().items():
        for path in paths:
            for value in ODD_VALUES:
                lines.append(_with_value(by_format[fmt], path, value, duplicate=rng.random() < 0.2))
    lines += BAD_LINES
    lines += [json.dumps({**by_format["standard_logging_payload"], "added_tomorrow": {"deep": [1, {"x": None}]}, "more": NAN})]
    lines.append("\ufeff" + records[1])
    return lines


NAN = float("nan")
CORPUS = corpus()


def _normalize_file(path: Path, fast: bool, chunk_bytes: int) -> tuple[list[pl.DataFrame], list, dict[str, int]]:
    warnings: dict[str, int] = {}
    frames, quarantined = [], []
    for chunk in read_chunks(path, chunk_bytes=chunk_bytes):
        quarantined += chunk.quarantined
        out, bad = normalize_isolating(chunk.lines, warnings, fast=fast)
        frames.append(out)
        quarantined += bad
    return frames, quarantined, warnings


def assert_same(path: Path, chunk_bytes: int = 8 * 1024 * 1024) -> tuple[int, int]:
    """Fast and reference normalize agree on ``path``; return (records kept, quarantined)."""
    fast = _normalize_file(path, True, chunk_bytes)
    slow = _normalize_file(path, False, chunk_bytes)
    assert len(fast[0]) == len(slow[0])
    for a, b in zip(fast[0], slow[0], strict=True):
        assert_frame_equal(a, b)
    assert fast[1] == slow[1]
    assert fast[2] == slow[2]
    return sum(f.height for f in fast[0]), len(fast[1])


def test_corpus_gives_identical_results(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    bad_input = (SAMPLE_LOGS / "bad_input.jsonl").read_bytes()
    path.write_bytes(bad_input + "\n".join(CORPUS).encode() + b'\n{"startTime": 1.5, "endTime": 2')
    kept, quarantined = assert_same(path)
    assert kept > 100 and quarantined > 500, "the corpus must exercise both good and bad lines"


def test_corpus_in_small_chunks(tmp_path: Path) -> None:
    """Chunks of a few lines: bisection boundaries fall elsewhere, and short ranges go straight to json_decode."""
    path = tmp_path / "mixed.jsonl"
    lines = list(CORPUS)
    random.Random(3).shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    assert_same(path, chunk_bytes=256 * 1024)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(range(len(CORPUS))), min_size=1, max_size=150), st.integers(0, 3))
def test_any_mix_gives_identical_results(tmp_path: Path, picks: list[int], copies: int) -> None:
    good = _records()
    lines = [CORPUS[i] for i in picks] + good * copies
    random.Random(len(picks)).shuffle(lines)
    path = tmp_path / f"mix-{len(picks)}-{copies}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert_same(path)


def test_decode_matches_json_decode_for_every_shape() -> None:
    """Value by value against ``json_decode``, with nested shapes the schemas may declare one day."""
    inner = pl.Struct({"x": pl.String(), "k": pl.Int64()})
    dtype = pl.Struct(
        {
            "s": pl.String(), "i": pl.Int64(), "f": pl.Float64(), "b": pl.Boolean(), "ls": pl.List(pl.String()),
            "st": inner, "lst": pl.List(inner), "li": pl.List(pl.Int64()), "lls": pl.List(pl.List(pl.String())),
        }
    )  # fmt: skip
    values = [v for v in ODD_VALUES if v not in ("NaN", "Infinity")] + ['[{"x": {"q": 1}}]', '[["a"], [{"b": 1}]]', '{"k": 1.5}']
    lines = []
    for name in dtype.to_schema():
        for v in values:
            lines += [f'{{"{name}": {v}}}', f'{{"{name}": {v}, "{name}": "dup"}}', f'{{"st": {{"{name}": {v}}}}}']
            lines += [f'{{"lst": [{{"x": {v}}}, {{"x": "ok"}}]}}', f'{{"ls": ["a", {v}]}}', f'{{"lls": [[{v}]]}}']
    lines += BAD_LINES
    texts = pl.Series("raw", lines)
    want, want_err = safe_decode(texts, dtype)
    got, got_err = fast_decode(texts, dtype)
    assert got.dtype == want.dtype
    mismatched = [(lines[i], a, b) for i, (a, b) in enumerate(zip(want.to_list(), got.to_list(), strict=True)) if a != b]
    assert mismatched == []
    assert got.is_null().to_list() == want.is_null().to_list()
    assert sorted(got_err) == sorted(want_err)


def test_bad_lines_cost_a_bisection_not_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """One bad line among many good ones: only a short range around it goes through json_decode."""
    calls: list[int] = []
    real = norm.safe_decode
    inside = [False]

    def counting(texts: pl.Series, dtype: pl.DataType) -> tuple[pl.Series, dict[int, str]]:
        if inside[0]:
            return real(texts, dtype)
        calls.append(texts.len())
        inside[0] = True
        try:
            return real(texts, dtype)
        finally:
            inside[0] = False

    monkeypatch.setattr(norm, "safe_decode", counting)
    good = [line for line in _records() if '"spend"' not in line]
    lines = good * 10
    lines.insert(137, '{"startTime": 1.5, "endTime": 2, "total_tokens": 1.0}')
    lines.insert(301, "{")
    schema = all_schemas()[-1]
    decoded, errors = fast_decode(pl.Series("raw", lines), schema.decode_dtype)
    assert sorted(errors) == [301]
    assert decoded.len() == len(lines)
    assert sum(calls) <= 2 * norm.FAST_FALLBACK_LINES
    calls.clear()
    assert fast_decode(pl.Series("raw", good * 10), schema.decode_dtype)[1] == {}
    assert calls == []


TEXT_LOG = [  # blank lines never reach normalize (``sources._drop_blank``)
    "2026-11-27 14:01:49 INFO litellm.proxy: POST /v1/chat/completions 200 OK",
    'INFO:     127.0.0.1:51234 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
    "Traceback (most recent call last):",
    '  File "/app/proxy_server.py", line 10, in <module> {',
    "}",
    "[1, 2]",
    "\ufeff" + '{"startTime": 1.5}',
]


@pytest.mark.parametrize("fast", [True, False])
def test_lines_that_cannot_be_objects_decode_as_the_reference_does_without_being_decoded(
    monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """A proxy's text log in a folder read: its lines were bisected down to one by one, a polars
    pass or more each (~1,000 lines/s). Now only lines inside ``{`` … ``}`` reach the decoder, and
    every line comes out as ``json_decode`` alone gives it: the same values and nulls, and a row
    that fails there fails here."""
    schema = all_schemas()[-1]
    lines = [*TEXT_LOG * 40, *CORPUS[:200], *BAD_LINES]
    random.Random(5).shuffle(lines)
    texts = pl.Series("raw", lines)
    want, want_err = safe_decode(texts, schema.decode_dtype)
    seen: list[str] = []
    real = norm.fast_decode if fast else norm.safe_decode

    def watching(part: pl.Series, dtype: pl.DataType) -> tuple[pl.Series, dict[int, str]]:
        seen.extend(part.to_list())
        return real(part, dtype)

    monkeypatch.setattr(norm, "fast_decode" if fast else "safe_decode", watching)
    got, got_err = decode_objects(texts, schema.decode_dtype, fast)
    assert got.to_list() == want.to_list()
    null_rows = set(want.is_null().arg_true().to_list())  # a ``null`` line: no error, no record, quarantined as "not an object"
    assert set(want_err) <= set(got_err) <= set(want_err) | null_rows
    assert not set(seen) & set(TEXT_LOG), "a line that cannot be an object was decoded"


def test_new_fields_need_no_schema_change(tmp_path: Path) -> None:
    """Fields the proxy may add tomorrow, of any shape, are ignored by both paths alike."""
    records = [json.loads(line) for line in _records()]
    extra = {"new_scalar": 1, "new_object": {"a": [1, {"b": None}]}, "new_list": [[1], "x"], "metadata_v2": {"model": {"x": 1}}}
    path = tmp_path / "new.jsonl"
    path.write_text("".join(json.dumps({**r, **extra}) + "\n" for r in records))
    kept, quarantined = assert_same(path)
    assert (kept, quarantined) == (len(records), 0)
