"""Fingerprints: how a log file is recognised across renames, rotation and compression.

A file is identified by a checksum of its first line (uncompressed), not by inode or name:
inodes are reused after rotation, names move (``x.jsonl`` -> ``x.jsonl.1`` -> ``x.jsonl.2.gz``),
and the first record of a LiteLLM log is unique (call ids, timestamps). So a renamed file keeps
its checkpoint, a compressed copy (gzip, xz, bzip2, zstd) of a file already read continues where
the plain file stopped, and a truncated or replaced file (new first line) starts again from 0. A
file without a complete first line yet has no fingerprint and is left for later.
"""

from __future__ import annotations

import hashlib
import json
from typing import BinaryIO

from ingest.sources import CORRUPT, HEAD_BYTES, TAIL_BYTES, is_document, line_head

FIRST_LINE_CAP = 64 * 1024


def fingerprint_of(f: BinaryIO, unterminated_ok: bool = False) -> str | None:
    """The fingerprint of an open log (see :func:`fingerprints_of`)."""
    return next(iter(fingerprints_of(f, unterminated_ok)), None)


def fingerprints_of(f: BinaryIO, unterminated_ok: bool = False, damaged_ok: bool = False) -> tuple[str, ...]:
    """The fingerprint of an open log, read from its start in small steps (a compressed one that ends
    early still has one if its first line is whole), then the one an earlier version gave a first line
    of two records (:func:`_first_record`), by which a state it wrote knows the file; () without a
    complete first line.

    A first line without its newline counts as whole when it is a complete JSON document (LiteLLM's
    bucket loggers write one per object, or join a batch with no final newline) or when the caller
    knows the file is finished (``unterminated_ok``). It is fingerprinted as if the newline were
    there, so the fingerprint stays the same if one is appended later. ``damaged_ok``: a finished
    archive damaged or cut short inside its first line is known by what decompresses before the
    damage, and read (its rest is quarantined as unreadable); one that gives nothing raises.

    Blank lines before it are passed over (up to ``FIRST_LINE_CAP`` bytes of them): they are no
    record, and a logger that starts every file with one gave every generation of a rotated log one
    fingerprint, so the new file was taken for the rotated one and not read."""
    head = b""
    skipped = 0
    broken: Exception | None = None
    while True:
        while len(head) < FIRST_LINE_CAP and b"\n" not in head:
            try:
                block = f.read1(min(8192, FIRST_LINE_CAP - len(head)))  # type: ignore[attr-defined]
            except EOFError as e:
                broken = e if damaged_ok else None
                break
            except CORRUPT as e:
                if not damaged_ok:
                    raise
                broken = e
                break
            if not block:
                break
            head += block
        nl = head.find(b"\n")
        if nl < 0 or head[:nl].strip() or skipped + nl + 1 > FIRST_LINE_CAP:
            break
        skipped += nl + 1
        head = head[nl + 1 :]
    nl = head.find(b"\n")
    if nl >= 0:
        head = head[: nl + 1]
    elif len(head) < FIRST_LINE_CAP:
        if broken is not None and not head.strip():
            raise broken
        if not head.strip() or not (unterminated_ok or is_document(head)):
            return ()
        head += b"\n"
    return tuple(dict.fromkeys("sha256:" + hashlib.sha256(line).hexdigest()[:32] for line in (_first_record(head), head)))


def _first_record(line: bytes) -> bytes:
    """A first line that is one record joined to the next (``{A}{B}``: a writer that died between its
    record and the newline, and the next one appended its own) is known by the first record, as the
    file was while it held only that: read as rewritten, its next record was quarantined with it."""
    if b"}{" not in line or is_document(line):
        return line
    text = line.decode("utf-8", "surrogateescape")
    try:
        obj, end = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        return line
    if not isinstance(obj, dict) or not text[end:].lstrip().startswith("{"):
        return line
    return text[:end].encode("utf-8", "surrogateescape") + b"\n"


def tail_digest(data: bytes, head: bytes | None = None) -> str:
    """What a checkpoint checks a file still holds before its offset: the last ``TAIL_BYTES`` and
    (``head``, written ``2:…``) the start of the line they end. LiteLLM's records end in kilobytes of
    the same boilerplate and start with their ids: two files with one first line (a copy that went
    its own way, a header) passed as one on the last bytes alone, and the second was read from the
    first's offset, its lines before it lost. A digest without the ``2:`` is an older state's."""
    if head is None:
        return hashlib.sha256(data[-TAIL_BYTES:]).hexdigest()[:16]
    return "2:" + hashlib.sha256(head[:HEAD_BYTES] + b"\n" + data[-TAIL_BYTES:]).hexdigest()[:16]


def head_before(buf: bytes, at_start: bool) -> bytes:
    """:func:`line_head` of the line ``buf`` (the ``LINE_WINDOW + 1`` bytes before an offset, or all
    of them from the file's start: ``at_start``) ends with."""
    i = buf.rfind(b"\n", 0, len(buf) - 1)
    if i >= 0:
        return line_head(buf[i + 1 :])
    return line_head(buf) if at_start else b""


def raw_fingerprint(head: bytes) -> str:
    """A finished archive damaged before it gives a byte, known by its first compressed bytes: read,
    its whole content is quarantined as unreadable (it waited for a first line for ever)."""
    return "raw:" + hashlib.sha256(head).hexdigest()[:32]
