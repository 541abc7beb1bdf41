"""Normalize: raw lines of either input format -> one canonical frame, bad records -> quarantine.

Everything here is polars over the whole chunk. Each format's typed fields (the dtype derived
from its schema file) are decoded in one ``read_ndjson`` pass over the chunk's joined lines; a
range that fails is bisected until the bad lines are isolated, and those go through
``json_decode`` (``safe_decode``), the reference the results must equal, so one bad record costs
O(log n) extra passes and never the good records around it. Nested payloads (messages,
response, ...) stay in the raw line and are read only when a span is built.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

import orjson
import polars as pl
from polars.exceptions import ComputeError, InvalidOperationError, PanicException

from ingest.quarantine import QuarantineRecord, Reason
from ingest.schemas import RecordSchema, all_schemas
from ingest.sources import utf16_hint

CANONICAL: dict[str, pl.DataType] = {
    "file": pl.String(),
    "source": pl.String(),
    "line_no": pl.Int64(),
    "offset": pl.Int64(),
    "raw": pl.String(),
    "format": pl.String(),
    "call_key": pl.String(),
    "call_key_from": pl.String(),
    "litellm_call_id": pl.String(),
    "request_id": pl.String(),
    "litellm_trace_id": pl.String(),
    "call_type": pl.String(),
    "status": pl.String(),
    "start_us": pl.Int64(),
    "end_us": pl.Int64(),
    "first_token_us": pl.Int64(),
    "stream": pl.Boolean(),
    "model": pl.String(),
    "model_group": pl.String(),
    "model_id": pl.String(),
    "provider": pl.String(),
    "api_base": pl.String(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "total_tokens": pl.Int64(),
    "cost": pl.Float64(),
    "saved_cache_cost": pl.Float64(),
    "cache_hit": pl.Boolean(),
    "session": pl.String(),
    "user": pl.String(),
    "end_user": pl.String(),
    "key_user_id": pl.String(),
    "key_alias": pl.String(),
    "key_hash": pl.String(),
    "team": pl.String(),
    "request_tags": pl.List(pl.String()),
    "error_class": pl.String(),
    "error_code": pl.String(),
    "error_message": pl.String(),
    "parent_trace_id": pl.String(),
    "parent_span_id": pl.String(),
}

UNUSABLE_IDS = ["", "none", "null", "undefined", "nan"]


def empty_canonical() -> pl.DataFrame:
    return pl.DataFrame(schema=CANONICAL)


def _field(*path: str) -> pl.Expr:
    expr = pl.col("rec")
    for name in path:
        expr = expr.struct.field(name)
    return expr


def _text(expr: pl.Expr) -> pl.Expr:
    """A string field with empty strings taken as absent."""
    return pl.when(expr.str.strip_chars() != "").then(expr)


def _usable_id(expr: pl.Expr) -> pl.Expr:
    """An id that names one call: not a placeholder, and holding no NUL or replacement character
    (a lone surrogate decodes to U+FFFD: ``req-\\ud800`` and ``req-\\udc00`` read as one id, and two
    calls were joined into one trace, or one dropped as the other's copy)."""
    usable = expr.is_not_null() & ~expr.str.strip_chars().str.to_lowercase().is_in(UNUSABLE_IDS)
    return pl.when(usable & ~expr.str.contains(r"[\x00\x{FFFD}]")).then(expr)


MAX_EPOCH_S = (2**63 - 1) // 10**9
"""2262-04-11T23:47:16Z, the last whole second int64 epoch nanoseconds (MLflow's and OTel's span
times) hold: a time past it (or before 1970) could not be stored, so it is a bad time here, not an
error at the sink."""
MAX_EPOCH_US = MAX_EPOCH_S * 1_000_000
MAX_TIME_TEXT = "2262-04-11T23:47:16Z"


def _epoch_seconds_us(expr: pl.Expr) -> pl.Expr:
    return pl.when((expr >= 0) & (expr <= MAX_EPOCH_S)).then((expr * 1_000_000).round().cast(pl.Int64, strict=False))


def _storable_us(us: pl.Expr) -> pl.Expr:
    """Epoch microseconds within what the store holds (1970 to ``MAX_EPOCH_S``), else null."""
    return pl.when((us >= 0) & (us <= MAX_EPOCH_US)).then(us)


def _iso_us(expr: pl.Expr) -> pl.Expr:
    """ISO 8601 text -> epoch microseconds, UTC. Naive times are UTC (Prisma stores UTC). The date
    and time may be parted by ``T``, ``t`` or a space, and UTC written ``Z``, ``+00`` (psql's text
    of a ``timestamptz``) or `` UTC``."""
    norm = (
        expr.str.strip_chars()
        .str.replace(r"^(\d{4}-\d\d-\d\d)[ tT]", "${1}T")
        .str.replace(r"(?:[Zz]|[ ]?UTC)$", "+00:00")
        .str.replace(r"([+-]\d\d)(\d\d)$", "${1}:${2}")
        .str.replace(r"([+-]\d\d)$", "${1}:00")
    )
    aware = norm.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%:z", strict=False, time_unit="us", time_zone="UTC")
    naive = norm.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="us").dt.replace_time_zone("UTC")
    return _storable_us(pl.coalesce(aware, naive).dt.epoch("us"))


EPOCH_S_BELOW, EPOCH_MS_BELOW, EPOCH_US_BELOW = 10**11, 10**14, 10**17
"""``epoch_by_magnitude``: a number below 1e11 is epoch seconds (to the year 5138, so every time
the store holds), below 1e14 milliseconds, below 1e17 microseconds, else nanoseconds. Each value is
read on its own. Now is about 1.8e9 s, 1.8e12 ms, 1.8e15 us, 1.8e18 ns, so the unit is told apart
for every time from 1973-03-03T09:46:40Z (1e11 ms) on; an earlier time in a finer unit is read in a
coarser one (a time in 1970 in ms as seconds: some other year, no call's)."""
_NUMBER = r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_NUMBER_TEXT = rf"^{_NUMBER}$"


def _epoch_by_magnitude_us(text: pl.Expr, name: str) -> pl.Expr:
    """Field ``name`` decoded as text, where the line gave a JSON number (polars decodes a number
    given for a text field as its digits) -> epoch microseconds, in the unit its size says
    (``EPOCH_S_BELOW`` ...); null for anything else. Text of a number (``"1764923456.1"``) is no
    number: the line is searched for the key holding such a string, which leaves it to be read as
    ISO text (and fail). Whole numbers are scaled as integers, exactly (nanoseconds round to the
    nearest microsecond, half up); fractional ones as doubles, rounded as payload times are."""
    whole = text.str.to_integer(strict=False)
    whole_us = (
        pl.when(whole < EPOCH_S_BELOW)
        .then(whole * 1_000_000)
        .when(whole < EPOCH_MS_BELOW)
        .then(whole * 1_000)
        .when(whole < EPOCH_US_BELOW)
        .then(whole)
        .otherwise((whole - 500) // 1_000 + 1)  # round(whole / 1000), half up, without overflowing int64
    )
    value = text.cast(pl.Float64, strict=False)
    value_us = (
        pl.when(value < EPOCH_S_BELOW)
        .then(value * 1e6)
        .when(value < EPOCH_MS_BELOW)
        .then(value * 1e3)
        .when(value < EPOCH_US_BELOW)
        .then(value)
        .otherwise(value / 1e3)
    )
    quoted = pl.col("raw").str.contains(rf'"{name}"[ \t\r\n]*:[ \t\r\n]*"{_NUMBER}"')
    us = pl.coalesce(whole_us, value_us.round().cast(pl.Int64, strict=False))
    return _storable_us(pl.when(text.str.contains(_NUMBER_TEXT) & (value >= 0) & ~quoted).then(us))


def _time_us(schema: RecordSchema, name: str, numbers: bool = False) -> pl.Expr:
    """A time field -> epoch microseconds, null when it is none. ``numbers``: the part has number
    times of a text-time format (``number_time_encoding``), read as that says."""
    raw = _field(name)
    if schema.time_encoding != "iso8601":
        return _epoch_seconds_us(raw)
    if numbers and schema.number_time_encoding == "epoch_by_magnitude":
        return pl.coalesce(_epoch_by_magnitude_us(raw, name), _iso_us(raw))
    return _iso_us(raw)


def _has_number_times(part: pl.DataFrame, schema: RecordSchema, names: list[str]) -> bool:
    """Whether a decoded part of a text-time format holds a time that may be a JSON number: the
    only part where ``_time_us`` reads numbers (and searches the lines for quoted ones)."""
    if schema.time_encoding != "iso8601" or schema.number_time_encoding is None or not part.height:
        return False
    return bool(part.select(pl.any_horizontal([_field(n).str.contains(_NUMBER_TEXT) for n in names]).any()).item())


def safe_decode(texts: pl.Series, dtype: pl.DataType) -> tuple[pl.Series, dict[int, str]]:
    """``json_decode`` that isolates failing rows by bisection instead of failing the batch."""
    try:
        return texts.str.json_decode(dtype), {}
    except (ComputeError, InvalidOperationError) as e:
        if texts.len() == 1:
            return pl.Series(texts.name, [None], dtype=dtype), {0: str(e).split("\n", 1)[0]}
    mid = texts.len() // 2
    left, left_err = safe_decode(texts.slice(0, mid), dtype)
    right, right_err = safe_decode(texts.slice(mid), dtype)
    return left.append(right), {**left_err, **{i + mid: m for i, m in right_err.items()}}


FAST_FALLBACK_LINES = 32
"""A failing range this short goes to ``safe_decode`` whole: bisecting it further with
``read_ndjson`` would cost more passes than ``json_decode`` over it once."""


def fast_decode(texts: pl.Series, dtype: pl.Struct) -> tuple[pl.Series, dict[int, str]]:
    """``safe_decode``'s result at ``read_ndjson``'s speed (about twice ``json_decode``'s here).

    The lines are joined and read as NDJSON with the schema's fields only. ``read_ndjson`` is
    stricter than ``json_decode`` on numbers, booleans, lists and null lines (it fails where the
    other converts) and looser on text (it writes an object or array given for a string field as
    its JSON text): a range that fails is halved until the failing lines are among a few, which
    ``safe_decode`` decodes, and rows with a text value that may be such JSON are decoded again by
    ``safe_decode``. So every line gets exactly what ``json_decode`` gives it, or its error."""
    if not texts.len() or not dtype.fields or texts.null_count() or texts.str.contains("\n", literal=True).any():
        return safe_decode(texts, dtype)
    frame = _read_ndjson(texts, dtype)
    if frame is None:
        if texts.len() <= FAST_FALLBACK_LINES:
            return safe_decode(texts, dtype)
        mid = texts.len() // 2
        left, left_err = fast_decode(texts.slice(0, mid), dtype)
        right, right_err = fast_decode(texts.slice(mid), dtype)
        return left.append(right), {**left_err, **{i + mid: m for i, m in right_err.items()}}
    decoded = frame.to_struct(texts.name)
    loose = _maybe_json_text(frame)
    if not loose.any():
        return decoded, {}
    idx = loose.arg_true()
    redone, errors = safe_decode(texts.gather(idx), dtype)
    merged = pl.concat(
        [
            pl.DataFrame({"i": pl.int_range(0, texts.len(), eager=True, dtype=pl.UInt32), "v": decoded}).filter(~loose),
            pl.DataFrame({"i": idx, "v": redone}),
        ]
    )
    return merged.sort("i")["v"].alias(texts.name), {int(idx[i]): m for i, m in errors.items()}


_JSON_SPACE = " \t\r\n"


def decode_objects(texts: pl.Series, dtype: pl.Struct, fast: bool = True) -> tuple[pl.Series, dict[int, str]]:
    """``fast_decode`` (``safe_decode`` unless ``fast``) of the lines that may be JSON objects; the
    others (no ``{`` … ``}`` inside JSON's whitespace: a text log's lines, say the proxy's own log
    in a folder read) are errors at once, null in the result. Bisecting down to each of them cost a
    polars pass or more a line: a text log was read at about 1,000 lines/s."""
    stripped = texts.str.strip_chars(_JSON_SPACE)
    shaped = (stripped.str.starts_with("{") & stripped.str.ends_with("}")).fill_null(False)
    decode = fast_decode if fast else safe_decode
    if shaped.all():
        return decode(texts, dtype)
    idx, others = shaped.arg_true(), (~shaped).arg_true()
    values, errs = decode(texts.gather(idx), dtype)
    errors = {int(idx[i]): m for i, m in errs.items()} | {i: "not a JSON object" for i in others.to_list()}
    nulls = pl.Series("v", [None] * others.len(), dtype=dtype)
    merged = pl.concat([pl.DataFrame({"i": idx, "v": values}), pl.DataFrame({"i": others, "v": nulls})])
    return merged.sort("i")["v"].alias(texts.name), errors


def _read_ndjson(texts: pl.Series, dtype: pl.Struct) -> pl.DataFrame | None:
    """The lines read as NDJSON into ``dtype``'s fields, or None when a line fails (or is not one record).
    Joined as bytes: through a Python ``str`` the join would cost a third of the read. Rechunked:
    the reader's pieces would make every later step over the chunk align them (2-3x slower)."""
    try:
        joined = texts.str.join("\n").cast(pl.Binary).item()
        frame = pl.read_ndjson(joined, schema={f.name: f.dtype for f in dtype.fields})
    except (Exception, PanicException):
        return None
    return frame.rechunk() if frame.height == texts.len() else None


_JSONISH = r"^[{\[]"


def _maybe_json_text(frame: pl.DataFrame) -> pl.Series:
    """Rows where a text value anywhere in ``frame`` starts like a JSON object or array. Structs are
    flattened first and all fields checked in one sequential select: a few hundred rows per chunk,
    so the cost is per expression, not per value."""
    while structs := [c for c, t in frame.schema.items() if isinstance(t, pl.Struct)]:
        frame = frame.with_columns(pl.col(c).name.prefix_fields(f"{c}.") for c in structs).unnest(structs)
    checks = [e for c, t in frame.schema.items() if (e := _jsonish(pl.col(c), t)) is not None]
    if not checks:
        return pl.repeat(False, frame.height, eager=True, dtype=pl.Boolean)
    return frame.select_seq(pl.any_horizontal(checks).fill_null(False)).to_series()


def _jsonish(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr | None:
    if isinstance(dtype, pl.String):
        return expr.str.contains(_JSONISH)
    if isinstance(dtype, pl.Struct):
        parts = [e for f in dtype.fields if (e := _jsonish(expr.struct.field(f.name), f.dtype)) is not None]
        return pl.any_horizontal(parts) if parts else None
    if isinstance(dtype, pl.List) and (inner := _jsonish(pl.element(), dtype.inner)) is not None:
        return expr.list.eval(inner).list.any()
    return None


_JSON_TYPES: dict[type, str] = {str: "string", bool: "boolean", int: "integer", float: "number", dict: "object", list: "array"}


def _type_ok(value: object, dtype: pl.DataType) -> bool:
    if value is None:
        return True
    if isinstance(dtype, pl.String):
        return not isinstance(value, (dict, list))
    if isinstance(dtype, pl.Boolean):
        return isinstance(value, bool)
    if isinstance(dtype, (pl.Int64, pl.Float64)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(dtype, pl.List):
        return isinstance(value, list) and all(_type_ok(v, dtype.inner) for v in value)
    if isinstance(dtype, pl.Struct):
        return isinstance(value, dict) and all(_type_ok(value.get(f.name), f.dtype) for f in dtype.fields)
    return True


def explain_failure(line: str, dtype: pl.Struct, truncated: bool, field_prefix: str = "") -> tuple[Reason, str]:
    """Why a line did not decode, in words a user can act on (runs only for bad lines)."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            if truncated:
                return Reason.TRUNCATED_LINE, f"last line has no newline and is not complete JSON ({e})"
            return Reason.MALFORMED_JSON, f"{e}{utf16_hint(line) if chr(0) in line else ''}"
        if str(e).startswith("depth limit exceeded"):
            return Reason.TOO_DEEP, f"nested deeper than the 1,024 levels a record is read to (LiteLLM's own loggers write none such): {e}"
        return Reason.MALFORMED_JSON, f"not strict JSON (Python's json reads it): {e}"
    if not isinstance(value, dict):
        return Reason.NOT_AN_OBJECT, f"a JSON {_JSON_TYPES.get(type(value), 'null')}, not an object"
    return Reason.WRONG_TYPE, _mismatch(value, dtype, field_prefix) or "a field has a type the schema does not allow"


def _mismatch(value: dict[str, Any], dtype: pl.Struct, prefix: str) -> str | None:
    """The first field (nested ones by their dotted path) whose JSON type the schema does not allow."""
    for f in dtype.fields:
        v = value.get(f.name)
        if _type_ok(v, f.dtype):
            continue
        if isinstance(f.dtype, pl.Struct) and isinstance(v, dict) and (inner := _mismatch(v, f.dtype, f"{prefix}{f.name}.")):
            return inner
        return f"field {prefix + f.name!r}: expected {_dtype_word(f.dtype)}, got {_JSON_TYPES.get(type(v), 'value')}"
    return None


def _dtype_word(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.String):
        return "string"
    if isinstance(dtype, pl.Boolean):
        return "boolean"
    if isinstance(dtype, (pl.Int64, pl.Float64)):
        return "number"
    if isinstance(dtype, pl.List):
        return f"array of {_dtype_word(dtype.inner)}"
    return "object"


Warnings = dict[str, int]

_OVERFLOW = r"(?-u:[0-9][eE]\+?[0-9]{3,}[ \t\r\n,\]}])"
"""A number that may overflow a double (``1e400``): valid JSON, which Python's ``json`` reads as
infinity and orjson and polars refuse. It must end as a number ends, so hex ids (``...1e234...``)
do not send their lines to be repaired. An integer of 309 digits or more (no exponent) is not
looked for: a digit-run regex has no literal to seek, and would make this scan over every line
several times slower."""
_REPAIR_HINT = rf"NaN|Infinity|\\u0000|\\u[dD][89a-fA-F]|{_OVERFLOW}"
"""Lines that may hold what orjson and polars refuse (NaN, Infinity, overflowing numbers) or misread
(polars reads a lone surrogate escape as NUL), or what PostgreSQL cannot store (NUL)."""
_HIGH = r"\\u[dD][89abAB][0-9a-fA-F]{2}"
_LOW = r"\\u[dD][c-fC-F][0-9a-fA-F]{2}"

STRICT_FIELDS = frozenset(
    {
        "id",
        "litellm_call_id",
        "request_id",
        "trace_id",
        "session_id",
        "startTime",
        "endTime",
        "completionStartTime",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "response_cost",
        "saved_cache_cost",
        "spend",
    }
)
"""Ids, times, token counts and costs: a value of another JSON type must not pass as one (polars
would read ``true`` as 1 and ``5`` as the id "5")."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def loads_lenient(text: str) -> Any:
    """JSON as LiteLLM writes it (Python's ``json``: NaN, Infinity, lone surrogates), made safe to
    store: orjson first (fast, strict), Python's ``json`` for what it rejects, then ``clean``."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = json.loads(text)
        return clean(value, None)
    return clean(value, None) if "\\u0000" in text else value


_DOUBLE_LIMIT = 2**1024 - 2**970
"""The least integer that rounds to infinity as a double (orjson and polars refuse it)."""


def clean(value: Any, warnings: Warnings | None, field: str = "") -> Any:
    """Lone surrogates and NULs become U+FFFD (no UTF-8 encoder, protobuf or PostgreSQL takes them),
    NaN, infinities and integers beyond a double become null; each counted in ``warnings`` by kind
    and top-level field."""
    t = type(value)
    if t is str:
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
            _warn(warnings, "nul_char")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = _SURROGATE.sub("\ufffd", value)
            _warn(warnings, "lone_surrogate")
        return value
    if (t is float and not math.isfinite(value)) or (t is int and not -_DOUBLE_LIMIT < value < _DOUBLE_LIMIT):
        _warn(warnings, f"nan_{field or 'value'}")
        return None
    if t is dict:
        return {clean(k, warnings, field): clean(v, warnings, field or k) for k, v in value.items()}
    if t is list:
        return [clean(v, warnings, field) for v in value]
    return value


def _warn(warnings: Warnings | None, kind: str, n: int = 1) -> None:
    if warnings is not None:
        warnings[kind] = warnings.get(kind, 0) + n


def _no_nul(frame: pl.DataFrame) -> pl.DataFrame:
    """Text decoded from JSON-text columns (SpendLogs metadata, request_tags) may hold NULs (polars
    also reads a lone surrogate escape as one): U+FFFD, as ``clean`` does for the rest."""
    text = [c for c, t in frame.schema.items() if t == pl.String and c != "raw"]
    return frame.with_columns(
        *(pl.col(c).str.replace_all("\x00", "\ufffd", literal=True) for c in text),
        pl.col("request_tags").list.eval(pl.element().str.replace_all("\x00", "\ufffd", literal=True)),
    )


_ODD_PARAMETERS = r'[{,]\s*"model_parameters"\s*:\s*[^{n\s]'
"""``model_parameters`` that is not an object (nor null): the span builder leaves it out, the summary says so."""


def _repair(lines: pl.DataFrame, warnings: Warnings | None) -> pl.DataFrame:
    """Rewrite the few lines orjson and polars cannot take as they are (NaN, Infinity, lone surrogates)
    or that hold NULs, so everything downstream reads plain, storable JSON. Found by a regex over the
    batch; only those lines are parsed one by one, and a line Python's ``json`` rejects too is left for
    the decode step to quarantine."""
    raw = pl.col("raw")
    hinted = lines.select(raw.str.contains(_REPAIR_HINT)).to_series()
    if not hinted.any():
        return lines
    idx = hinted.arg_true()
    pairs = raw.str.count_matches(_HIGH + _LOW)
    only_pairs = (raw.str.count_matches(_HIGH) == pairs) & (raw.str.count_matches(_LOW) == pairs)
    needed = lines.select(raw.gather(idx)).select(raw.str.contains(rf"NaN|Infinity|\\u0000|{_OVERFLOW}") | ~only_pairs).to_series()
    idx = idx.filter(needed)
    fixed: list[str] = []
    for text in lines["raw"].gather(idx).to_list():
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            fixed.append(text)
            continue
        fixed.append(json.dumps(clean(value, warnings), ensure_ascii=False))
    return lines.with_columns(raw=lines["raw"].scatter(idx, pl.Series(fixed, dtype=pl.String)))


def _expand_arrays(lines: pl.DataFrame) -> pl.DataFrame:
    """A line holding a JSON array is one record per element, each at the line's file, line and
    offset: LiteLLM's generic API logger sends its batches as arrays (``log_format: json_array``, its
    default), and a receiver that appends each request body as a line keeps them so. An empty array
    is no record; an element that is not an object is quarantined on its own."""
    arrays = lines.select(pl.col("raw").str.contains(r"^\s*\[")).to_series()
    if not arrays.any():
        return lines
    idx = arrays.arg_true()
    elements: list[list[str]] = []
    for text in lines["raw"].gather(idx).to_list():
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = None
        elements.append([orjson.dumps(v).decode() for v in value] if isinstance(value, list) else [text])
    expanded = lines[idx].with_columns(raw=pl.Series(elements, dtype=pl.List(pl.String))).explode("raw").drop_nulls("raw")
    return pl.concat([lines.filter(~arrays), expanded]).sort("source", "offset", maintain_order=True)


def _strict_pattern(schema: RecordSchema) -> str | None:
    """A regex that matches every line where one of the strict fields may hold a value of another
    JSON type (it may also match nested keys of the same name: those lines are only checked)."""
    bad_start = {"string": r'[^"n \t\r\n]', "number": r"[^-0-9n \t\r\n]", "integer": r"(?:[^0-9n \t\r\n]|[0-9]{19}|[0-9]+[.eE])"}
    by_kind: dict[str, list[str]] = {}
    for name, kind in schema.scalar_types.items():
        if name in STRICT_FIELDS and kind in bad_start and not (kind == "string" and name.endswith("Time")):
            by_kind.setdefault(kind, []).append(name)
    parts = [rf'"(?:{"|".join(names)})"[ \t\r\n]*:[ \t\r\n]*{bad_start[kind]}' for kind, names in by_kind.items()]
    return "|".join(parts) or None


def _loads_with_members(text: str) -> tuple[Any, list[tuple[str, Any]]]:
    """Python's ``json`` of ``text``, and its top-level object's members in order, a key given twice
    kept twice (the outermost object is the last one the hook sees)."""
    objects: list[list[tuple[str, Any]]] = []

    def keep(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append(pairs)
        return dict(pairs)

    value = json.loads(text, object_pairs_hook=keep)
    return value, objects[-1] if isinstance(value, dict) else []


def _check_types(
    value: dict[str, Any], pairs: list[tuple[str, Any]], schema: RecordSchema, warnings: Warnings | None
) -> tuple[str | None, bool]:
    """(why a record's strict field has the wrong JSON type, or None; whether a field was dropped or
    rewritten: a whole-number float count is read as the integer).

    Every value of a key the record gives twice is checked (``pairs``, its top-level members in
    order): polars reads the first, Python's ``json`` the last, and neither may pass as the other type."""
    dropped = False
    for name, v in pairs:
        kind = schema.scalar_types.get(name)
        if name not in STRICT_FIELDS or kind is None or v is None:
            continue
        if kind == "string" and type(v) is not str:
            return f"field {name!r}: expected string, got {_JSON_TYPES.get(type(v), 'value')}", dropped
        if kind == "number" and type(v) not in (int, float) and name == "completionStartTime":
            _warn(warnings, "bad_completionStartTime")  # the call without its first-token time, as for an unparsable one
            value[name] = None
            dropped = True
            continue
        if kind == "number" and type(v) not in (int, float):
            return f"field {name!r}: expected number, got {_JSON_TYPES.get(type(v), 'value')}", dropped
        if kind == "integer":
            if type(v) is float and v.is_integer():  # 44.0: how pandas and JavaScript write a count
                v = value[name] = int(v)
                dropped = True
            if type(v) is not int:
                return f"field {name!r}: expected integer, got {_JSON_TYPES.get(type(v), 'value')}", dropped
            if v < 0 or v >= 2**63:
                _warn(warnings, f"{'negative' if v < 0 else 'huge'}_{name}")
                value[name] = None
                dropped = True
    return None, dropped


def _strict_types(part: pl.DataFrame, schema: RecordSchema, warnings: Warnings | None) -> tuple[pl.DataFrame, list[QuarantineRecord]]:
    """Quarantine lines whose id, time, token count or cost has another JSON type; drop (with a
    warning) token counts that are negative or beyond int64."""
    pattern = _strict_pattern(schema)
    if pattern is None or not part.height:
        return part, []
    suspect = part.select(pl.col("raw").str.contains(pattern)).to_series()
    if not suspect.any():
        return part, []
    idx = suspect.arg_true()
    texts = part["raw"].gather(idx).to_list()
    bad: list[int] = []
    details: dict[int, str] = {}
    fixed = list(texts)
    for n, text in enumerate(texts):
        try:
            value, members = _loads_with_members(text)
        except (ValueError, RecursionError):
            continue
        if not isinstance(value, dict):
            continue
        why, dropped = _check_types(value, members, schema, warnings)
        if why is not None:
            bad.append(int(idx[n]))
            details[int(idx[n])] = why
        elif dropped:
            fixed[n] = json.dumps(value, ensure_ascii=False)
    part = part.with_columns(raw=part["raw"].scatter(idx, pl.Series(fixed, dtype=pl.String)))
    if not bad:
        return part, []
    rows = part.with_row_index("_i").filter(pl.col("_i").is_in(bad))
    quarantined = [
        QuarantineRecord.of(r["source"], r["line_no"], r["offset"], Reason.WRONG_TYPE, details[r["_i"]], r["raw"])
        for r in rows.iter_rows(named=True)
    ]
    return part.with_row_index("_i").filter(~pl.col("_i").is_in(bad)).drop("_i"), quarantined


_TIME_VALUE = r'"(?:startTime|endTime)"[ \t\r\n]*:[ \t\r\n]*'


def _time_json_type(raw: pl.Expr) -> pl.Expr:
    """The JSON type ("string" or "number") every ``startTime``/``endTime`` key in the line holds,
    else null. Counted by regex, not read by JSON path: polars' path reader gives up (null) on a
    line nested over 128 levels, and a nested key of the same name rarely holds another type (if
    one does, the type is unknown and the keys decide)."""
    keys = raw.str.count_matches(_TIME_VALUE)
    return (
        pl.when(keys == 0)
        .then(pl.lit(None, dtype=pl.String))
        .when(raw.str.count_matches(_TIME_VALUE + '"') == keys)
        .then(pl.lit("string"))
        .when(raw.str.count_matches(_TIME_VALUE + "-?[0-9]") == keys)
        .then(pl.lit("number"))
    )


def detect_format(lines: pl.DataFrame) -> pl.Series:
    """Which schema each line belongs to, from its top-level keys and the JSON type of its times.

    A literal search for the keys, then a regex over the lines that have them, finds candidate
    lines (a key cannot occur unescaped inside a JSON string). A candidate is the schema's when its
    times have a JSON type only that schema declares for ``startTime`` (SpendLogs' ISO text: a
    payload that gains SpendLogs' key names still has number times). When the type does not tell
    (times absent, null or of mixed types; or numbers, which a payload has and a SpendLogs row
    exported by pandas too), the top-level keys do, since a nested object (client metadata) may hold
    the same key names: one of the schema's ``detect_keys`` must be at the top level (for numbers,
    the regex's find is enough) and none of its ``excluded_keys`` (the payload's ``response_cost``
    ...). Those are looked up by JSON path, only on lines holding the key's name at all.
    """
    schemas = all_schemas()
    default = schemas[-1]
    fmt = pl.repeat(default.name, lines.height, eager=True, dtype=pl.String)
    raw = pl.col("raw")
    for schema in reversed(schemas[:-1]):
        candidate = lines.select(pl.all_horizontal([raw.str.contains(f'"{k}"', literal=True) for k in schema.detect_keys])).to_series()
        if candidate.any():
            as_keys = pl.all_horizontal([raw.str.contains(rf'[{{,]\s*"{k}"\s*:') for k in schema.detect_keys])
            candidate.scatter(candidate.arg_true(), lines.filter(candidate).select(as_keys).to_series())
        if not candidate.any():
            continue
        texts = lines["raw"].filter(candidate)
        time_type = texts.to_frame().select(_time_json_type(raw)).to_series()
        by_keys = (time_type.is_null() | time_type.is_in(sorted(schema.time_types & default.time_types))).fill_null(True)
        confirmed = time_type.is_in(sorted(schema.time_types)).fill_null(False) & ~by_keys
        if by_keys.any():
            idx = by_keys.arg_true()
            confirmed.scatter(idx, _keys_say(texts.gather(idx), time_type.gather(idx), schema))
        hit = candidate.clone()
        hit.scatter(candidate.arg_true(), confirmed)
        fmt = pl.select(pl.when(hit).then(pl.lit(schema.name)).otherwise(fmt)).to_series()
    return fmt


def _keys_say(texts: pl.Series, time_type: pl.Series, schema: RecordSchema) -> pl.Series:
    """Whether lines whose times do not tell their format are ``schema``'s by their top-level keys
    (see ``detect_format``)."""
    ok = pl.repeat(True, texts.len(), eager=True, dtype=pl.Boolean)
    unknown = time_type.is_null()
    if unknown.any() and schema.detect_keys:
        idx = unknown.arg_true()
        ok.scatter(idx, _any_at_top(texts.gather(idx), schema.detect_keys))
    if schema.excluded_keys:
        names = [pl.col(texts.name).str.contains(f'"{k}"', literal=True) for k in schema.excluded_keys]
        named = texts.to_frame().select(pl.any_horizontal(names)).to_series()
        if named.any():
            idx = named.arg_true()
            ok.scatter(idx, ok.gather(idx) & ~_any_at_top(texts.gather(idx), schema.excluded_keys))
    return ok


def _any_at_top(texts: pl.Series, keys: tuple[str, ...]) -> pl.Series:
    """Whether each line has one of ``keys`` at its top level, with a value other than null."""
    found = pl.DataFrame([_path_text(texts, (k,)).is_not_null().alias(k) for k in keys])
    return found.select(pl.any_horizontal(pl.all())).to_series()


def _path_text(raw: pl.Series, path: tuple[str, ...]) -> pl.Series:
    """``str.json_path_match`` of a top-level path, also on lines polars' path reader gives up on
    (nested over 128 levels anywhere: null for every path, even the ``startTime`` each record has).
    Those few are read with Python's ``json`` instead, so a deep response does not silently drop
    the record's metadata or trace context."""
    text = raw.str.json_path_match("$." + ".".join(path))
    maybe = text.is_null()
    if not maybe.any():
        return text
    idx = maybe.arg_true()
    idx = idx.filter(raw.gather(idx).str.json_path_match("$.startTime").is_null())
    if not len(idx):
        return text
    found: list[str | None] = []
    for line in raw.gather(idx).to_list():
        try:
            value: Any = json.loads(line)
        except (ValueError, RecursionError):
            value = None
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        found.append(value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    return text.scatter(idx, pl.Series(found, dtype=pl.String))


TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
_USAGE_COUNT = r'[{,]"%s":(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)[,}]'
"""A count's JSON number in ``response.usage`` as the path reader writes it back (compact): a string
or boolean there is no count, as at the top level."""


def _tags_from_text(frame: pl.DataFrame) -> pl.DataFrame:
    """A payload's ``request_tags`` given as JSON text of a list (``"[\"team-a\", \"prod\"]"``, as
    SpendLogs exports and tools that stringify lists write it) decodes as one tag, the whole text:
    it is read as the list it holds. Text that is no list of strings stays the one tag it was."""
    if not frame.height:
        return frame
    first = pl.col("request_tags").list.first().str.strip_chars()
    texty = (pl.col("request_tags").list.len() == 1) & first.str.starts_with("[") & first.str.ends_with("]")
    rows = frame.with_row_index("_i").filter(texty.fill_null(False))
    if not rows.height:
        return frame
    values, _ = safe_decode(rows["request_tags"].list.first(), pl.List(pl.String()))
    decoded = pl.DataFrame({"_i": rows["_i"], "_tags": values})
    return (
        frame.with_row_index("_i")
        .join(decoded, on="_i", how="left", maintain_order="left")
        .with_columns(request_tags=pl.coalesce("_tags", "request_tags"))
        .drop("_i", "_tags")
    )


def _tokens_from_usage(frame: pl.DataFrame, warnings: Warnings | None) -> pl.DataFrame:
    """Token counts a record gives only in ``response.usage`` (absent or null at the top level, as
    some tools and LiteLLM versions write them) are read from there, under the top level's rules: a
    whole float is the count, a negative one or one beyond int64 is dropped with its warning; a
    ``response`` that is JSON text (a SpendLogs row's) is read inside. Only rows missing a count,
    and naming a usage, are read for it (a path lookup parses the whole line):
    a clean chunk costs a null count per column."""
    if not frame.height or not any(frame[f].null_count() for f in TOKEN_FIELDS):
        return frame
    named = pl.col("raw").str.contains('"usage"', literal=True) | pl.col("raw").str.contains('\\"usage\\"', literal=True)
    missing = pl.any_horizontal(pl.col(f).is_null() for f in TOKEN_FIELDS) & named
    idx = frame.select(missing).to_series().arg_true()
    if not len(idx):
        return frame
    raw = frame["raw"].gather(idx)
    usage = _path_text(raw, ("response", "usage"))
    if usage.null_count():  # a SpendLogs row's response is JSON text: its usage is inside that text
        usage = usage.fill_null(_path_text(raw, ("response",)).str.json_path_match("$.usage"))
    rows = frame.select(pl.col(f).gather(idx) for f in TOKEN_FIELDS).with_columns(_usage=usage)
    columns: list[pl.Series] = []
    for f in TOKEN_FIELDS:
        text = pl.when(pl.col(f).is_null()).then(pl.col("_usage").str.extract(_USAGE_COUNT % f, 1))
        whole, number = text.str.to_integer(strict=False), text.cast(pl.Float64, strict=False)
        found = rows.select(
            value=pl.coalesce(
                pl.col(f),
                pl.when(whole >= 0)
                .then(whole)
                .when(whole.is_null() & (number == number.floor()) & (number >= 0) & (number < 2.0**63))
                .then(number.cast(pl.Int64)),
            ),
            negative=(number < 0).sum(),
            huge=(number >= 2.0**63).sum(),
        )
        for kind in ("negative", "huge"):
            if n := found[kind][0]:
                _warn(warnings, f"{kind}_{f}", n)
        columns.append(frame[f].scatter(idx, found["value"]))
    return frame.with_columns(columns)


def _quarantine_rows(
    frame: pl.DataFrame, reason: Reason | None, detail: str | Callable[[dict], tuple[Reason, str]]
) -> list[QuarantineRecord]:
    out = []
    for row in frame.select("source", "line_no", "offset", "raw", "truncated").iter_rows(named=True):
        r, d = detail(row) if callable(detail) else (reason, detail)
        assert r is not None
        out.append(QuarantineRecord.of(row["source"], row["line_no"], row["offset"], r, d, row["raw"]))
    return out


def _decode_part(
    part: pl.DataFrame, schema: RecordSchema, fast: bool = True, warnings: Warnings | None = None
) -> tuple[pl.DataFrame, list[QuarantineRecord]]:
    """Decode one format's lines; return the decoded rows and the quarantined ones. A field of JSON
    text that is not JSON of its declared shape (metadata that is a string, tags that are an object)
    is dropped with a warning: the call's times, tokens and cost are kept."""
    decoded, errors = decode_objects(part["raw"], schema.decode_dtype, fast)
    for i in decoded.is_null().arg_true().to_list():
        errors.setdefault(i, "not an object")
    if errors:
        decoded, errors = _without_odd_fields(part["raw"], decoded, errors, schema, warnings)
    if not polars_stops_at_depth():
        errors |= {i: "too deep" for i in too_deep(part["raw"]) if i not in errors}
    part = part.with_columns(rec=decoded)
    bad_idx = set(errors)
    quarantined: list[QuarantineRecord] = []
    if errors:
        bad = part.with_row_index("_i").filter(pl.col("_i").is_in(list(errors)))
        quarantined += _quarantine_rows(bad, None, lambda row: explain_failure(row["raw"], schema.decode_dtype, row["truncated"]))
    for key, dtype in schema.json_text.items():
        text = _path_text(part["raw"], (key,))
        text = text.set(text.str.strip_chars() == "", None)  # an empty text column: nothing, as a NULL one
        values, errs = safe_decode(text, dtype)
        if dropped := set(errs) - bad_idx:  # safe_decode gives them null
            _warn(warnings, f"dropped_{key}", len(dropped))
        part = part.with_columns(pl.col("rec").struct.with_fields(values.alias(key)))
    keep = part.with_row_index("_i").filter(~pl.col("_i").is_in(sorted(bad_idx))).drop("_i")
    return keep, quarantined


MAX_DEPTH = 1024
"""Levels of nesting a record is read to: orjson's limit, and polars' from 2.1 on. Older polars
reads past it (the deep part kept as JSON text), so there ``too_deep`` looks for such lines."""


@functools.cache
def polars_stops_at_depth() -> bool:
    """Whether both polars decoders refuse a line past ``MAX_DEPTH`` (2.1 on), so no line needs
    ``too_deep``; asked once, when a first chunk is decoded."""
    line = '{"a": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}"
    for decode in (
        lambda: pl.read_ndjson(line.encode(), schema={"b": pl.String()}),
        lambda: pl.Series([line]).str.json_decode(pl.Struct({"b": pl.String()})),
    ):
        try:
            decode()
        except (Exception, PanicException):
            continue
        return False
    return True


def too_deep(raw: pl.Series) -> list[int]:
    """Lines nested past ``MAX_DEPTH``, which orjson refuses, whatever the installed polars read.
    Only a line with more ``[`` and ``{`` than that can be one, and only a line twice as long can
    hold them closed; counting them is about 1% of a chunk's normalize, so polars 2.1 skips it."""
    idx = raw.str.len_bytes().gt(2 * MAX_DEPTH).arg_true()
    if not len(idx):
        return []
    long = raw.gather(idx)
    nested = long.str.count_matches(r"[\[{]").gt(MAX_DEPTH)
    deep = []
    for i, line in zip(idx.filter(nested).to_list(), long.filter(nested).to_list(), strict=True):
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError as e:
            if str(e).startswith("depth limit exceeded"):
                deep.append(i)
    return deep


def _odd_fields_dropped(text: str, schema: RecordSchema) -> tuple[str, list[str]] | None:
    """A line that failed to decode, with each top-level field of the wrong shape that the call can
    do without left out (metadata, error_information, request_tags, stream, request_duration_ms;
    one given as JSON text of its type, as SpendLogs exports write objects and CSV-made exports
    every value, is decoded instead): the new text and the fields left out, or None when the line
    is no object or an id, time, token count or cost is wrong."""
    try:
        value = loads_lenient(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    dropped: list[str] = []
    for f in schema.decode_dtype.fields:
        v = value.get(f.name)
        if _type_ok(v, f.dtype):
            continue
        if f.name in STRICT_FIELDS or f.name in schema.required:
            return None
        try:
            inner = loads_lenient(v) if isinstance(v, str) else None
        except (ValueError, RecursionError):
            inner = None
        if inner is not None and _type_ok(inner, f.dtype):
            value[f.name] = inner
        else:
            value[f.name] = None
            dropped.append(f.name)
    return json.dumps(value, ensure_ascii=False), dropped


def _without_odd_fields(
    raw: pl.Series, decoded: pl.Series, errors: dict[int, str], schema: RecordSchema, warnings: Warnings | None
) -> tuple[pl.Series, dict[int, str]]:
    """Decode again the failed lines whose only fault is a field the call can do without (see
    ``_odd_fields_dropped``), that field left out with a ``dropped_<field>`` warning: the call's
    times, tokens and cost are kept rather than the whole record quarantined."""
    fixed: dict[int, tuple[str, list[str]]] = {}
    for i in sorted(errors):
        if (found := _odd_fields_dropped(raw[i], schema)) is not None:
            fixed[i] = found
    if not fixed:
        return decoded, errors
    idx = pl.Series("i", list(fixed), dtype=pl.UInt32)
    redone, still = safe_decode(pl.Series(raw.name, [t for t, _ in fixed.values()], dtype=pl.String), schema.decode_dtype)
    errors = {i: m for i, m in errors.items() if i not in fixed}
    for n, (i, (_, dropped)) in enumerate(fixed.items()):
        if n in still or redone[n] is None:
            errors[i] = still.get(n, "not an object")
            continue
        for name in dropped:
            _warn(warnings, f"dropped_{name}")
    unchanged = ~pl.col("i").is_in(list(fixed))
    merged = pl.concat(
        [
            pl.DataFrame({"i": pl.int_range(0, raw.len(), eager=True, dtype=pl.UInt32), "v": decoded}).filter(unchanged),
            pl.DataFrame({"i": idx, "v": redone}),
        ]
    )
    return merged.sort("i")["v"].alias(decoded.name), errors


def _canonical(part: pl.DataFrame, schema: RecordSchema) -> pl.DataFrame:
    """Map one decoded format onto the canonical columns."""
    has = set(schema.direct) | set(schema.json_text)
    meta_has = (
        {f.name for f in schema.direct.get("metadata", schema.json_text.get("metadata", pl.Struct({}))).fields}
        if "metadata" in has
        else set()
    )

    def opt(name: str, dtype: pl.DataType = pl.String()) -> pl.Expr:
        return _field(name) if name in has else pl.lit(None, dtype=dtype)

    def meta(name: str) -> pl.Expr:
        return _text(_field("metadata", name)) if name in meta_has else pl.lit(None, dtype=pl.String)

    def err(name: str) -> pl.Expr:
        if "error_information" in has:
            return _text(_field("error_information", name))
        if "error_information" in meta_has:
            return _text(_field("metadata", "error_information", name))
        return pl.lit(None, dtype=pl.String)

    ids = [_usable_id(_field(f)) for f in schema.id_fields]
    id_present = pl.any_horizontal([_field(f).is_not_null() for f in schema.id_fields])
    key_from = pl.lit(None, dtype=pl.String)
    for f in reversed(schema.id_fields):
        key_from = pl.when(_usable_id(_field(f)).is_not_null()).then(pl.lit(f)).otherwise(key_from)
    end_user = _text(opt("end_user"))
    key_user = _text(opt("user")) if "user" in has else meta("user_api_key_user_id")
    cache_hit = opt("cache_hit", pl.Boolean())
    if schema.direct.get("cache_hit") == pl.String():
        cache_hit = cache_hit.str.strip_chars().str.to_lowercase() == "true"
    session = _text(opt("session_id"))
    if "trace_id" in has:
        session = pl.coalesce(session, _text(_field("trace_id")))
    key_hash = meta("user_api_key_hash") if "user_api_key_hash" in meta_has else _text(opt("api_key"))
    request_id = opt("request_id") if "request_id" in has else opt("id")
    cost = opt("response_cost", pl.Float64()) if "response_cost" in has else opt("spend", pl.Float64())
    numbers = _has_number_times(part, schema, [n for n in ("startTime", "endTime", "completionStartTime") if n in has])
    return part.select(
        "file",
        "source",
        "line_no",
        "offset",
        "raw",
        "truncated",
        format=pl.lit(schema.name),
        call_key=pl.coalesce(ids),
        call_key_from=pl.when(id_present).then(pl.coalesce(key_from, pl.lit("content_hash"))),
        litellm_call_id=_usable_id(opt("litellm_call_id")),
        request_id=request_id,
        litellm_trace_id=_text(opt("trace_id")),
        call_type=pl.coalesce(_text(opt("call_type")), pl.lit("completion")),
        status=pl.coalesce(_text(opt("status")).str.to_lowercase(), pl.lit("success")),
        start_us=_time_us(schema, "startTime", numbers),
        end_us=_time_us(schema, "endTime", numbers),
        first_token_us=_time_us(schema, "completionStartTime", numbers) if "completionStartTime" in has else pl.lit(None, dtype=pl.Int64),
        stream=pl.coalesce(opt("stream", pl.Boolean()), pl.lit(False)),
        model=_text(opt("model")),
        model_group=_text(opt("model_group")),
        model_id=_text(opt("model_id")),
        provider=_text(opt("custom_llm_provider")),
        api_base=_text(opt("api_base")),
        prompt_tokens=opt("prompt_tokens", pl.Int64()),
        completion_tokens=opt("completion_tokens", pl.Int64()),
        total_tokens=opt("total_tokens", pl.Int64()),
        cost=cost,
        saved_cache_cost=opt("saved_cache_cost", pl.Float64()),
        cache_hit=pl.coalesce(cache_hit, pl.lit(False)),
        session=session,
        user=pl.coalesce(end_user, key_user),
        end_user=end_user,
        key_user_id=key_user,
        key_alias=meta("user_api_key_alias"),
        key_hash=key_hash,
        team=pl.coalesce(meta("user_api_key_team_alias"), meta("user_api_key_team_id"), _text(opt("team_id"))),
        request_tags=opt("request_tags", pl.List(pl.String())),
        error_class=err("error_class"),
        error_code=err("error_code"),
        error_message=pl.coalesce(err("error_message"), _text(opt("error_str"))),
        _start_raw=_field("startTime").cast(pl.String),
        _first_raw=_field("completionStartTime").cast(pl.String) if "completionStartTime" in has else pl.lit(None, dtype=pl.String),
        _end_raw=_field("endTime").cast(pl.String),
    )


TRACEPARENT = r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$"
"""W3C Trace Context: version-traceid-parentid-flags, lower-case hex; a later version may append fields."""
_TRACEPARENT_VALUE = r'(?i)"traceparent"\s*:\s*"((?:[^"\\]|\\.)*)"'
"""The header's JSON string, escapes and all: HTTP drops a value's surrounding spaces and tabs, and a
tab is ``\\t`` in JSON (such a value was taken for no header, silently)."""


def _parent_context(frame: pl.DataFrame, schema: RecordSchema, warnings: Warnings | None) -> pl.DataFrame:
    """The client's trace context from its ``traceparent`` request header (any case of the name):
    ``parent_trace_id`` (32 hex) and ``parent_span_id`` (16 hex) when valid and sampled, else null.

    Only lines that mention the header are parsed for it; an invalid value (malformed, all-zero ids,
    version ff) is counted as a warning, a valid one with the sampled flag off is simply not used."""
    nulls = frame.with_columns(parent_trace_id=pl.lit(None, dtype=pl.String), parent_span_id=pl.lit(None, dtype=pl.String))
    if not schema.request_headers or not frame.height:
        return nulls
    hinted = frame["raw"].str.contains("(?i)traceparent")
    if not hinted.any():
        return nulls
    idx = hinted.arg_true()
    headers = _path_text(frame["raw"].gather(idx), schema.request_headers)
    value = headers.str.extract(_TRACEPARENT_VALUE, 1).str.replace_all(r"\t", "\t", literal=True).str.strip_chars(" \t")
    parts = pl.DataFrame({"v": value}).select(
        pl.col("v").str.extract(TRACEPARENT, 1).alias("version"),
        pl.col("v").str.extract(TRACEPARENT, 2).alias("trace"),
        pl.col("v").str.extract(TRACEPARENT, 3).alias("span"),
        pl.col("v").str.extract(TRACEPARENT, 4).alias("flags"),
        pl.col("v").str.extract(TRACEPARENT, 5).alias("rest"),
        pl.col("v").is_not_null().alias("present"),
    )
    valid = (
        pl.col("trace").is_not_null()
        & (pl.col("version") != "ff")
        & (pl.col("trace") != "0" * 32)
        & (pl.col("span") != "0" * 16)
        & ((pl.col("version") != "00") | pl.col("rest").is_null())
    )
    sampled = (pl.col("flags").str.to_integer(base=16, strict=False) % 2) == 1
    parts = parts.with_columns(valid=valid.fill_null(False), sampled=sampled.fill_null(False))
    if warnings is not None and (bad := parts.select((pl.col("present") & ~pl.col("valid")).sum()).item()):
        _warn(warnings, "invalid_traceparent", bad)
    use = pl.col("valid") & pl.col("sampled")
    found = parts.select(pl.when(use).then(pl.col("trace")).alias("t"), pl.when(use).then(pl.col("span")).alias("s"))
    trace = pl.Series("parent_trace_id", [None] * frame.height, dtype=pl.String).scatter(idx, found["t"])
    span = pl.Series("parent_span_id", [None] * frame.height, dtype=pl.String).scatter(idx, found["s"])
    return frame.with_columns(trace, span)


def _validate(frame: pl.DataFrame) -> tuple[pl.DataFrame, list[QuarantineRecord]]:
    """Quarantine records without usable times or ids; give id-less-but-present records a content hash."""
    checks: list[tuple[pl.Expr, Reason, str]] = [
        (pl.col("_start_raw").is_null(), Reason.MISSING_TIME, "startTime is missing"),
        (pl.col("_end_raw").is_null(), Reason.MISSING_TIME, "endTime is missing"),
        (pl.col("start_us").is_null(), Reason.BAD_TIME, f"startTime is not a valid time (1970 to {MAX_TIME_TEXT})"),
        (pl.col("end_us").is_null(), Reason.BAD_TIME, f"endTime is not a valid time (1970 to {MAX_TIME_TEXT})"),
        (pl.col("call_key_from").is_null(), Reason.MISSING_ID, "no call id: litellm_call_id, id and request_id are all missing"),
    ]
    quarantined: list[QuarantineRecord] = []
    for cond, reason, detail in checks:
        bad = frame.filter(cond)
        if bad.height:
            quarantined += _quarantine_rows(bad, reason, detail)
            frame = frame.filter(~cond)
    needs_hash = frame["call_key"].is_null()
    if needs_hash.any():
        hashed = frame.filter(needs_hash)["raw"].map_elements(
            lambda raw: "sha256:" + hashlib.sha256(raw.strip().encode()).hexdigest()[:32], return_dtype=pl.String
        )
        frame = pl.concat([frame.filter(~needs_hash), frame.filter(needs_hash).with_columns(call_key=hashed)])
    return frame.drop("_start_raw", "_end_raw", "truncated"), quarantined


def normalize_isolating(
    lines: pl.DataFrame, warnings: Warnings | None = None, fast: bool = True
) -> tuple[pl.DataFrame, list[QuarantineRecord]]:
    """``normalize`` that never raises: a batch it fails on is bisected down to the lines it fails on,
    which are quarantined as ``unbuildable`` with the error, and the rest is normalized (warnings
    count only from the attempts that succeeded)."""
    counted: Warnings = {}
    try:
        out = normalize(lines, counted, fast)
        for kind, n in counted.items():
            _warn(warnings, kind, n)
        return out
    except (Exception, PanicException) as e:
        if lines.height <= 1:
            return empty_canonical(), [
                QuarantineRecord.of(r["source"], r["line_no"], r["offset"], Reason.UNBUILDABLE, f"normalize: {error_text(e)}", r["raw"])
                for r in lines.iter_rows(named=True)
            ]
    mid = lines.height // 2
    left, left_bad = normalize_isolating(lines.slice(0, mid), warnings, fast)
    right, right_bad = normalize_isolating(lines.slice(mid), warnings, fast)
    return pl.concat([left, right]).sort("source", "offset"), left_bad + right_bad


def error_text(e: BaseException) -> str:
    """``ExcClass: first line of the message``, for a quarantine detail."""
    message = str(e).strip().split("\n", 1)[0][:300]
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def _first_token_within(canonical: pl.DataFrame, warnings: Warnings | None) -> pl.DataFrame:
    """Drop a ``completionStartTime`` that is no time, or falls outside the call's start and end (a
    clock stepped mid-call): kept, it was a first-token event outside its span and a negative
    ``time_to_first_token_ms``. Counted under ``bad_completionStartTime``."""
    first = pl.col("first_token_us")
    outside = first.is_not_null() & ((first < pl.col("start_us")) | (first > pl.col("end_us")))
    unusable = (first.is_null() & pl.col("_first_raw").is_not_null()) | outside
    if warnings is not None and (dropped := canonical.select(unusable.sum()).item()):
        _warn(warnings, "bad_completionStartTime", dropped)
    return canonical.with_columns(first_token_us=pl.when(outside).then(None).otherwise(first))


def normalize(lines: pl.DataFrame, warnings: Warnings | None = None, fast: bool = True) -> tuple[pl.DataFrame, list[QuarantineRecord]]:
    """Raw line frame (source, line_no, offset, raw, truncated) -> canonical frame + quarantine.

    Fields dropped or replaced on the way (NaN, lone surrogates, NULs, negative token counts) are
    counted in ``warnings``. ``fast=False`` decodes with ``safe_decode`` alone (the reference the
    fast path is tested and measured against)."""
    if lines.height and lines["raw"].str.starts_with("\ufeff").any():
        lines = lines.with_columns(pl.col("raw").str.strip_prefix("\ufeff"))
    lines = lines.filter(pl.col("raw").str.contains(r"\S"))
    if "file" not in lines.columns:
        lines = lines.with_columns(file=pl.col("source"))
    lines = _expand_arrays(_repair(lines, warnings))
    if warnings is not None and lines.height:
        odd = int(lines.select(pl.col("raw").str.contains(_ODD_PARAMETERS).sum()).item())
        if odd:
            _warn(warnings, "dropped_model_parameters", odd)
    lines = lines.with_columns(format=detect_format(lines))
    frames: list[pl.DataFrame] = []
    quarantined: list[QuarantineRecord] = []
    for schema in all_schemas():
        part = lines.filter(pl.col("format") == schema.name).drop("format")
        if not part.height:
            continue
        part, bad = _strict_types(part, schema, warnings)
        quarantined += bad
        decoded, bad = _decode_part(part, schema, fast, warnings)
        quarantined += bad
        canonical = _canonical(decoded, schema)
        if schema.json_text:
            canonical = _no_nul(canonical)
        canonical, bad = _validate(canonical)
        quarantined += bad
        canonical = _tags_from_text(_tokens_from_usage(canonical, warnings))
        canonical = _parent_context(canonical, schema, warnings)
        # An end before the start (a clock stepped back mid-call) is taken as a call of no duration:
        # the call happened, and a negative duration is no time any store or UI means.
        if warnings is not None and (backwards := canonical.select((pl.col("end_us") < pl.col("start_us")).sum()).item()):
            _warn(warnings, "end_before_start", backwards)
        canonical = _first_token_within(canonical.with_columns(end_us=pl.max_horizontal("start_us", "end_us")), warnings)
        frames.append(canonical.drop("_first_raw"))
    if not frames:
        return empty_canonical(), quarantined
    out = pl.concat(frames, how="vertical").sort("source", "offset")
    return out.select(pl.col(name).cast(dtype) for name, dtype in CANONICAL.items()), quarantined
