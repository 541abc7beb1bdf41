"""Input record schemas, read from the JSON Schema files in ``schemas/``.

The schemas are data: the polars dtypes used to decode each format, the keys that identify
a format, and the required fields all come from the files, so a field LiteLLM adds tomorrow
only needs a line there (and an unknown field needs nothing: it is ignored).

Derivation rules (JSON Schema -> polars):
- ``string``/``number``/``integer``/``boolean`` (with or without ``null``) -> String/Float64/
  Int64/Boolean; a union that includes ``string`` decodes as String (polars turns numbers and
  booleans into their text), ``integer`` + ``number`` as Float64.
- ``object`` with ``properties`` -> Struct of those properties; an ``array`` of scalar items ->
  List. Objects and arrays without a declared shape, and unions of structured and scalar types,
  are not decoded columnar: the span builder reads them whole from the raw line.
- ``x-json-text: true``: the value may be JSON text holding the declared shape (SpendLogs
  exports store ``metadata`` and ``request_tags`` that way); it is extracted and decoded.

``x-ingest`` says what JSON Schema cannot: ``format``; ``detect_keys``, the top-level keys a line
of the format has (none for the default format); ``excluded_keys``, top-level keys a line of it
never has (the default format's own), which decide when its times' JSON type does not (numbers,
which both formats may have); ``time_encoding``, how text times are read (``iso8601``) or number
ones (``epoch_seconds``), and ``number_time_encoding``, how number times are read by a format whose
times may also be text (``epoch_by_magnitude``: epoch seconds, milliseconds, microseconds or
nanoseconds, as the value's size says); ``required``; ``id_fields``; ``request_headers``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl

_SCALARS: dict[str, pl.DataType] = {
    "string": pl.String(),
    "number": pl.Float64(),
    "integer": pl.Int64(),
    "boolean": pl.Boolean(),
}


def _types(node: dict[str, Any]) -> set[str]:
    t = node.get("type", [])
    return ({t} if isinstance(t, str) else set(t)) - {"null"}


def dtype_for(node: dict[str, Any]) -> pl.DataType | None:
    """The polars dtype a schema node decodes to, or None when it is read whole at span build."""
    types = _types(node)
    shaped_as_text = bool(node.get("x-json-text"))
    if "properties" in node and (types <= {"object"} or shaped_as_text):
        return pl.Struct({k: d for k, v in node["properties"].items() if (d := dtype_for(v)) is not None})
    if "items" in node and (types <= {"array"} or shaped_as_text):
        inner = dtype_for(node["items"])
        return pl.List(inner) if inner is not None else None
    if not types or types & {"object", "array"}:
        return None
    if "string" in types:
        return pl.String()
    if types == {"integer", "number"}:
        return pl.Float64()
    return _SCALARS[next(iter(types))] if len(types) == 1 else None


@dataclass(frozen=True)
class RecordSchema:
    """One input format: how to recognise it and which fields to decode columnar."""

    name: str
    path: Path
    detect_keys: tuple[str, ...]
    time_encoding: str
    required: tuple[str, ...]
    id_fields: tuple[str, ...]
    direct: dict[str, pl.DataType] = field(default_factory=dict)
    json_text: dict[str, pl.DataType] = field(default_factory=dict)
    scalar_types: dict[str, str] = field(default_factory=dict)
    """Top-level fields declared as exactly one scalar JSON type (or null): name -> that type."""
    request_headers: tuple[str, ...] = ()
    """Path to the object of the client's request headers (its W3C ``traceparent``); () if not logged."""
    excluded_keys: tuple[str, ...] = ()
    """Top-level keys a line of this format never has: another format's, told apart by them when the
    JSON type of the times does not tell (see ``detect_format``)."""
    time_types: frozenset[str] = frozenset()
    """The JSON types ``startTime`` may have (besides null)."""
    number_time_encoding: str | None = None
    """How a number time is read where ``time_encoding`` is for text (``epoch_by_magnitude``), else None."""

    @functools.cached_property
    def decode_dtype(self) -> pl.Struct:
        """The struct the raw line is decoded into in one pass (made once: a bad line's explanation
        reads it, and building it cost ~80 µs a line)."""
        return pl.Struct(self.direct)


def _schema_dir() -> Path:
    """The wheel's own copy first: installed, the folder beside the package is site-packages'
    ``schemas``, another distribution's if one ships a package of that name, and every record read
    was quarantined as unbuildable. A source checkout has the repository's."""
    packaged = Path(str(resources.files("ingest") / "schemas"))
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "schemas"


def load_schema(path: Path) -> RecordSchema:
    doc = json.loads(path.read_text())
    meta = doc.get("x-ingest", {})
    direct: dict[str, pl.DataType] = {}
    json_text: dict[str, pl.DataType] = {}
    scalar_types: dict[str, str] = {}
    for key, node in doc.get("properties", {}).items():
        types = _types(node)
        if len(types) == 1 and (only := next(iter(types))) in _SCALARS:
            scalar_types[key] = only
        dtype = dtype_for(node)
        if dtype is None:
            continue
        if node.get("x-json-text"):
            json_text[key] = dtype
        else:
            direct[key] = dtype
    return RecordSchema(
        name=meta["format"],
        path=path,
        detect_keys=tuple(meta.get("detect_keys", [])),
        time_encoding=meta.get("time_encoding", "epoch_seconds"),
        required=tuple(meta.get("required", doc.get("required", []))),
        id_fields=tuple(meta.get("id_fields", [])),
        direct=direct,
        json_text=json_text,
        scalar_types=scalar_types,
        request_headers=tuple(meta.get("request_headers", [])),
        excluded_keys=tuple(meta.get("excluded_keys", [])),
        time_types=frozenset(_types(doc.get("properties", {}).get("startTime", {}))),
        number_time_encoding=meta.get("number_time_encoding"),
    )


@cache
def all_schemas() -> tuple[RecordSchema, ...]:
    """Every schema, the most specific (most detect keys) first; the last one is the default."""
    found = [load_schema(p) for p in sorted(_schema_dir().glob("*.schema.json"))]
    if not found:
        raise RuntimeError(f"no input schemas found in {_schema_dir()}")
    return tuple(sorted(found, key=lambda s: -len(s.detect_keys)))
