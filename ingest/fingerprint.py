"""Fingerprints: how a log file is recognised across renames, rotation and compression.

A file is identified by a checksum of its first line (uncompressed), not by inode or name:
inodes are reused after rotation, names move (``x.jsonl`` -> ``x.jsonl.1`` -> ``x.jsonl.2.gz``),
and the first record of a LiteLLM log is unique (call ids, timestamps). So a renamed file keeps
its checkpoint, a gzip copy of a file already read continues where the plain file stopped, and a
truncated or replaced file (new first line) starts again from 0. A file without a complete first
line yet has no fingerprint and is left for later.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO

from ingest.sources import TAIL_BYTES, is_document

FIRST_LINE_CAP = 64 * 1024


def fingerprint_of(f: BinaryIO, unterminated_ok: bool = False) -> str | None:
    """The fingerprint of an open log (read from its start, in small steps: a gzip that ends early
    still has a fingerprint if its first line is whole).

    A first line without its newline counts as whole when it is a complete JSON document (LiteLLM's
    bucket loggers write one per object, or join a batch with no final newline) or when the caller
    knows the file is finished (``unterminated_ok``). It is fingerprinted as if the newline were
    there, so the fingerprint stays the same if one is appended later."""
    head = b""
    while len(head) < FIRST_LINE_CAP and b"\n" not in head:
        try:
            block = f.read1(min(8192, FIRST_LINE_CAP - len(head)))  # type: ignore[attr-defined]
        except EOFError:
            break
        if not block:
            break
        head += block
    nl = head.find(b"\n")
    if nl >= 0:
        head = head[: nl + 1]
    elif len(head) < FIRST_LINE_CAP:
        if not head.strip() or not (unterminated_ok or is_document(head)):
            return None
        head += b"\n"
    return "sha256:" + hashlib.sha256(head).hexdigest()[:32]


def tail_digest(data: bytes) -> str:
    return hashlib.sha256(data[-TAIL_BYTES:]).hexdigest()[:16]
