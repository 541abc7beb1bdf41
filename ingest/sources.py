"""Sources: find log files and read them as bounded chunks of complete lines.

Every line keeps its file, 1-based line number and byte offset (of the uncompressed stream),
so a bad record can be quarantined precisely and a checkpoint can name the byte after the last
line that was fully handled. Memory is bounded by the chunk size plus one line (capped).
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import io
import logging
import lzma
import os
import re
import resource
import stat
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import polars as pl
import zstandard

from ingest.lognames import is_log_file, rotation_rank
from ingest.quarantine import QuarantineRecord, Reason, first_line

DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
log = logging.getLogger("litellm-ingest.sources")
GZIP_MAGIC = b"\x1f\x8b"
COMPRESSION = {GZIP_MAGIC: "gzip", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", **{b"BZh%d" % n: "bzip2" for n in range(1, 10)}}
"""What rotation compresses a log with (gzip, or logrotate's ``compresscmd xz``, ``bzip2``,
``zstd``), by its first bytes: each is read by content, as gzip is."""
MAGIC_BYTES = max(map(len, COMPRESSION))
"""How much of a file's start tells its compression."""
TAIL_BYTES = 256
HEAD_BYTES = 512
LINE_WINDOW = 1 << 20
"""A last line longer than this has no head in its checkpoint's digest (only its last bytes)."""


def compression(head: bytes) -> str | None:
    """The compression ``head`` (a file's or object's first bytes) starts with; None for plain text."""
    return next((kind for magic, kind in COMPRESSION.items() if head.startswith(magic)), None)


def compression_of(path: Path) -> str | None:
    """The compression of the file at ``path``; None for plain text, or a file that cannot be read."""
    try:
        with open(path, "rb") as f:
            return compression(f.read(MAGIC_BYTES))
    except OSError:
        return None


class _OnFile:
    """A decompressing reader that names the compressed file it reads ``fileobj``, as
    :class:`gzip.GzipFile` does: progress is counted in that file's bytes."""

    def __init__(self, fileobj: BinaryIO) -> None:
        super().__init__(fileobj)  # type: ignore[call-arg]
        self.fileobj = fileobj


class XzFile(_OnFile, lzma.LZMAFile):
    """An xz file, its streams one after another."""


class Bz2File(_OnFile, bz2.BZ2File):
    """A bzip2 file, its streams one after another."""


ZSTD_FEED = 256
"""Compressed bytes handed to zstd at a time. A block of 4 bytes can stand for 128 KiB, so a slice
this size comes out as 8 MiB at most, where 8 KiB read at once came out as 256 MiB; gzip's, xz's and
bzip2's readers bound their output by asking for a size, which zstandard's decompressobj cannot."""


class _ZstdFrames(io.RawIOBase):
    """zstd frames one after another (zstd's CLI and logrotate can write several), a read of the
    file at a time. A stream cut inside a frame raises EOFError, as gzip's does: zstandard's own
    reader takes it as ended (a copy still being written would be taken as read to its end)."""

    def __init__(self, fileobj: BinaryIO) -> None:
        super().__init__()
        self.fileobj = fileobj
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None
        self._input = memoryview(b"")
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._out:
            if not self._input:
                self._input = memoryview(self.fileobj.read(io.DEFAULT_BUFFER_SIZE))
                if not self._input:
                    if self._frame is not None:
                        raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                    return 0
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            data, self._input = self._input[:ZSTD_FEED], self._input[ZSTD_FEED:]
            self._out = memoryview(self._frame.decompress(data))
            if self._frame.eof:
                self._input, self._frame = memoryview(self._frame.unused_data + self._input), None
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


class ZstdFile(io.BufferedReader):
    """A zstd file, every frame of it."""

    def __init__(self, fileobj: BinaryIO) -> None:
        super().__init__(_ZstdFrames(fileobj))
        self.fileobj = fileobj


READERS = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), "xz": XzFile, "bzip2": Bz2File, "zstd": ZstdFile}
DECOMPRESSED = (gzip.GzipFile, XzFile, Bz2File, ZstdFile)
"""The readers of compressed files: none can seek (they are read through to an offset)."""
CORRUPT = (OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
"""What reading a damaged compressed stream raises (a bad CRC, corrupt data, bytes after its end;
gzip's BadGzipFile and bzip2's errors are OSErrors)."""
DAMAGED = (EOFError, *CORRUPT)
"""... and one that ends early (EOFError: a copy still being written, or cut short)."""


def decompressed(f: BinaryIO, kind: str | None) -> BinaryIO:
    """``f`` (at its start) read through the decompressor of ``kind``; ``f`` itself for None."""
    return f if kind is None else READERS[kind](f)  # type: ignore[return-value]


def line_head(line: bytes) -> bytes:
    """The part of a whole last line (its newline included) a checkpoint's digest covers
    (:func:`ingest.fingerprint.tail_digest`): none past ``LINE_WINDOW``, so the digest can be taken
    again from a bounded read before the offset."""
    return line[:HEAD_BYTES] if len(line) <= LINE_WINDOW else b""


class SourceError(Exception):
    """A path the user named cannot be read (missing, unreadable): a usage error, not bad data."""


class SourceUnavailable(SourceError):
    """A bucket or database that cannot be reached or read now (network, credentials, access):
    nothing of it is marked read, so the next run tries again."""


_DATABASE_URL = re.compile(r"^postgres(?:ql)?(?:\+[A-Za-z0-9_.-]+)?://", re.IGNORECASE)


def is_database_url(spec: str) -> bool:
    """``postgresql://``, ``postgres://`` or a SQLAlchemy ``postgresql+driver://`` URL (what LiteLLM's
    DATABASE_URL holds): here, not in :mod:`ingest.spendlogs_db`, so a run of files never imports psycopg."""
    return bool(_DATABASE_URL.match(spec.strip()))


def shown(path: Path | str) -> str:
    """A path as valid UTF-8 text, for the ``source`` of records and quarantine lines: a name in
    another encoding (bytes Linux allows) shows those bytes as U+FFFD, since polars, JSON and
    MLflow take no lone surrogates. Files are still opened by their real name."""
    return os.fsencode(path).decode("utf-8", "replace")


def is_own(path: Path | str, own: tuple[Path, ...], folders: dict[str, str] | None = None) -> bool:
    """``path`` is one of this tool's own files: in its state dir or its quarantine file (``own``,
    resolved). A state dir kept under the log folder had the quarantine file read as logs and
    quarantined again, more each run. ``folders``: the folders resolved so far in this scan, so a
    daemon's scan each second resolves a folder once, not each file's every component."""
    if not own:
        return False
    head, name = os.path.split(path)
    if folders is None or os.path.islink(path):
        real = os.path.realpath(path)
    else:
        if (folder := folders.get(head)) is None:
            folder = folders[head] = os.path.realpath(head)
        real = os.path.join(folder, name)
    return any(real == o or real.startswith(o.rstrip(os.sep) + os.sep) for o in map(str, own))


def own_paths(*paths: Path | None) -> tuple[Path, ...]:
    """The state dir and quarantine file, resolved, for :func:`is_own`."""
    return tuple(Path(os.path.realpath(p)) for p in paths if p is not None)


def discover(paths: list[str], unreadable: list[Path] | None = None, own: tuple[Path, ...] = ()) -> list[Path]:
    """Expand files, directories (recursively, log-like names only) and globs, oldest first
    (:func:`oldest_first`). A file this process may not read, or a folder it may not list, is an
    error, or, given ``unreadable``, put there: one file logrotate made root's must not keep a cron
    run from the others. This tool's own files (``own``) are passed over unless named one by one."""
    found: dict[Path, None] = {}
    folders: list[str] = []
    resolved: dict[str, str] = {}

    def read_folder(p: Path) -> None:
        for root, name in sorted(walk(p, folders)):
            if is_log_file(name) and (k := path_kind(f := Path(root, name))) in ("file", "denied") and not is_own(f, own, resolved):
                if k == "file":
                    found[f] = None
                elif root not in folders:
                    folders.append(root)

    for spec in paths:
        p = Path(spec)
        kind = path_kind(p)
        if kind == "denied":
            folders.append(str(p.parent))
        elif kind == "file":
            found[p] = None
        elif kind == "dir":
            read_folder(p)
        elif glob.has_magic(spec):
            matches = [(m, path_kind(m)) for m in sorted(Path(m) for m in glob.glob(spec, recursive=True))]
            folders += sorted({str(m.parent) for m, k in matches if k == "denied"})
            files = [m for m, k in matches if k == "file" and not is_own(m, own, resolved)]
            dirs = [m for m, k in matches if k == "dir"]  # read as a folder given by name is (they were skipped)
            if not files and not dirs and not folders:
                raise SourceError(f"no files match {spec!r}")
            for f in files:
                found[f] = None
            for d in dirs:
                read_folder(d)
        elif kind is not None:
            raise SourceError(f"not a regular file or directory (a {kind}): {spec}")
        else:
            raise SourceError(f"no such file or directory: {spec}")
    for f in [*map(Path, dict.fromkeys(folders)), *(f for f in found if not os.access(f, os.R_OK))]:
        if unreadable is None:
            raise SourceError(f"permission denied: {f}")
        unreadable.append(f)
        found.pop(f, None)
    return oldest_first(_once(found))


def descriptor_limit() -> int:
    """The process's descriptor limit, raised first to its hard ceiling (as Go's runtime does; the
    soft default is often 1,024, a container's or a cron job's lower)."""
    soft = 1024
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        ceiling = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < ceiling:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def path_kind(path: Path) -> str | None:
    """ "file", "dir", "pipe", "socket", "device", "denied" (in a folder this process may list but not
    enter: ``chmod -R 644``), or None where nothing is."""
    try:
        mode = path.stat().st_mode
    except PermissionError:
        return "denied"
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "pipe" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"


def _once(files: Iterable[Path]) -> list[Path]:
    """Each file once, under the first name it was given: a file named twice (relative and absolute,
    through a symlink, in a folder given with it) was read twice and its calls counted as written twice."""
    seen: set[tuple[int, int]] = set()
    out: list[Path] = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            out.append(f)
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(f)
    return out


def walk(folder: Path | str, unlisted: list[str]) -> Iterator[tuple[str, str]]:
    """(folder, name) of every file under ``folder``, symlinked folders entered (a volume mounted
    elsewhere and linked in), each folder once by its device and inode (a link to a parent or to a
    sibling loops or doubles nothing), and into ``unlisted`` the folders this process may not list,
    which ``rglob`` and ``os.walk`` pass over in silence: the logs in a folder made another user's
    ``0700`` would be missed by every run without a word."""

    def unlistable(e: OSError) -> None:
        if not isinstance(e, FileNotFoundError) and e.filename is not None:
            unlisted.append(str(e.filename))

    seen: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(folder, onerror=unlistable, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        for name in names:
            yield root, name


def oldest_first(paths: Iterable[Path]) -> list[Path]:
    """Files by last modification, oldest first (then by name). Names do not sort by age
    (``x.jsonl`` is newer than ``x.jsonl.1``, ``x.jsonl.10.gz`` sorts before ``x.jsonl.2.gz``), and a
    call whose failed attempt ends one file and whose retry starts the next must have the failed
    attempt read first: read after the retry's trace was written, it would be a call of its own,
    whose one span (the same id) replaces the retry's. Rotation (rename, gzip, ``aws s3 sync``)
    keeps the time of the last write."""

    def age(path: Path) -> tuple[int, tuple[int, int], str]:
        try:
            return age_order(os.stat(path).st_mtime_ns, str(path))
        except OSError:
            return age_order(0, str(path))

    return sorted(paths, key=age)


def age_order(mtime_ns: int, path: str) -> tuple[int, tuple[int, int], str]:
    """The sort key of :func:`oldest_first` (and of the daemon's scan, which has the stat already):
    modification time, then rotation order, then the path."""
    return mtime_ns, rotation_rank(os.path.basename(path)), path


def open_log(path: Path) -> BinaryIO:
    """Open plain or compressed files by content, not by name: rotated copies are often renamed."""
    f = open(path, "rb")  # noqa: SIM115
    magic = f.read(MAGIC_BYTES)
    f.seek(0)
    return decompressed(f, compression(magic))


@dataclass
class Chunk:
    """Complete lines of one file, as a frame: source, line_no, offset, raw."""

    path: str
    lines: pl.DataFrame
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    end_offset: int = 0
    end_line: int = 0
    disk_offset: int = 0
    tail: bytes = b""
    head: bytes | None = None
    """:func:`line_head` of the chunk's last line; None when this read cannot tell where it starts."""


def _frame(path: str, lines: list[str] | pl.Series, sizes: pl.Series, start_offset: int, start_line: int) -> pl.DataFrame:
    offsets = (sizes + 1).cum_sum().shift(1, fill_value=0) + start_offset
    raw = lines if isinstance(lines, pl.Series) else pl.Series(lines, dtype=pl.String)
    return pl.DataFrame(
        {
            "source": pl.repeat(path, len(lines), eager=True, dtype=pl.String),
            "line_no": pl.int_range(start_line, start_line + len(lines), eager=True, dtype=pl.Int64),
            "offset": offsets.cast(pl.Int64),
            "raw": raw.str.strip_suffix("\r").str.strip_chars_start(HOLE),
            "truncated": pl.repeat(False, len(lines), eager=True, dtype=pl.Boolean),
        }
    )


UTF16_HINT = ": UTF-16 text? LiteLLM writes UTF-8; convert the file (iconv -f UTF-16 -t UTF-8)"


def utf16_hint(line: bytes | str) -> str:
    """What a line of a UTF-16 file (a Windows export) looks like split at its newline bytes: a
    byte-order mark, or a NUL after every character."""
    raw = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
    raw = raw.lstrip(b"\x00")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(raw) >= 4 and raw[1:8:2] == b"\x00" * len(raw[1:8:2])):
        return UTF16_HINT
    return ""


HOLE = "\x00"
"""What a file holds where it has a hole: a writer without ``O_APPEND`` after a copytruncate (it
writes on at its old offset), or the zeroed tail a crash leaves before the writer appends again.
Stripped from the start of a line, so the record written after the hole is read, not quarantined."""

FEW_LINES = 64
"""Up to this many lines (a per-call object, a small file) the line frame is built from Python
lists: a dozen polars operations on a one-row frame cost ~3 ms, most of reading such a file."""
_LINE_SCHEMA = {"source": pl.String, "line_no": pl.Int64, "offset": pl.Int64, "raw": pl.String, "truncated": pl.Boolean}


def _few(path: str, lines: list[str], sizes: list[int], start_offset: int, start_line: int) -> pl.DataFrame:
    """What :func:`_frame` makes, for a few lines."""
    offsets, at = [], start_offset
    for n in sizes:
        offsets.append(at)
        at += n + 1
    raw = [(line[:-1] if line.endswith("\r") else line).lstrip(HOLE) for line in lines]
    n = len(lines)
    return pl.DataFrame(
        {"source": [path] * n, "line_no": list(range(start_line, start_line + n)), "offset": offsets, "raw": raw, "truncated": [False] * n},
        schema=_LINE_SCHEMA,
    )


def split_lines(
    path: str, data: bytes, start_offset: int, start_line: int, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> tuple[pl.DataFrame, list[QuarantineRecord]]:
    """Split bytes that end with a newline into a line frame.

    Invalid UTF-8 and over-long lines are quarantined and left in the frame as blank lines, so
    line numbers and offsets of the lines after them stay exact.
    """
    bad: list[QuarantineRecord] = []
    try:
        parts = data.decode("utf-8").split("\n")[:-1]
        if len(parts) <= FEW_LINES:
            sizes = [len(b) for b in data.split(b"\n")[:-1]]
            if max(sizes, default=0) <= max_line_bytes:
                return _few(path, parts, sizes, start_offset, start_line), bad
        lines = pl.Series(parts, dtype=pl.String)
        frame = _frame(path, lines, lines.str.len_bytes(), start_offset, start_line)
    except UnicodeDecodeError:
        raw_lines = data.split(b"\n")[:-1]
        sizes = pl.Series([len(b) for b in raw_lines], dtype=pl.UInt32)
        offsets = ((sizes + 1).cum_sum().shift(1, fill_value=0) + start_offset).to_list()
        decoded: list[str] = []
        for i, b in enumerate(raw_lines):
            try:
                decoded.append(b.decode("utf-8"))
            except UnicodeDecodeError as e:
                decoded.append("")
                detail = f"invalid UTF-8 at byte {e.start}{utf16_hint(b)}"
                bad.append(QuarantineRecord.of(path, start_line + i, offsets[i], Reason.INVALID_UTF8, detail, b))
        frame = _frame(path, decoded, sizes, start_offset, start_line)
    too_long = frame["raw"].str.len_bytes() > max_line_bytes
    if too_long.any():
        for row in frame.filter(too_long).iter_rows(named=True):
            detail = f"line longer than {max_line_bytes} bytes"
            bad.append(QuarantineRecord.of(path, row["line_no"], row["offset"], Reason.LINE_TOO_LONG, detail, row["raw"]))
        frame = frame.with_columns(raw=pl.when(too_long).then(pl.lit("")).otherwise(pl.col("raw")))
    return frame, bad


def is_document(data: bytes) -> bool:
    """``data`` is one whole JSON object or array (of records, as the generic API logger sends them),
    newline or not (a half-written line never is)."""
    stripped = data.strip()
    if not (stripped.startswith(b"{") and stripped.endswith(b"}")) and not (stripped.startswith(b"[") and stripped.endswith(b"]")):
        return False
    try:
        return isinstance(orjson.loads(stripped), (dict, list))
    except orjson.JSONDecodeError:
        return False


def read_chunks(
    path: Path | str,
    start_offset: int = 0,
    start_line: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    final: bool = True,
    fileobj: BinaryIO | None = None,
) -> Iterator[Chunk]:
    """Yield chunks of complete lines from ``start_offset`` (uncompressed bytes).

    With ``final`` the file is taken as complete: an unterminated last line is handed on as a
    line of its own (flagged ``truncated``, so a parse failure says so). Without it the tail is
    left for the next read, as a live file's partial line must be, unless it is a whole JSON
    object already (bucket loggers write no final newline). A line over
    ``max_line_bytes`` is quarantined without ever being held whole in memory. ``fileobj`` reads
    an already open file (the tail daemon keeps rotated files open) instead of opening ``path``.
    """
    name = shown(path)
    with open_log(Path(path)) if fileobj is None else fileobj as f:
        raw_file = f.fileobj if isinstance(f, DECOMPRESSED) else f
        tail = skip_to(f, start_offset, chunk_bytes)
        offset, line_no = start_offset, start_line
        carry = b""
        at_line_start = start_offset == 0
        overlong: tuple[bytes, int] | None = None
        while block := _read_block(f, chunk_bytes):
            if overlong is not None:
                nl = block.find(b"\n")
                if nl < 0:
                    overlong = (overlong[0], overlong[1] + len(block))
                    continue
                rec = QuarantineRecord.of(
                    name, line_no, offset, Reason.LINE_TOO_LONG, f"line longer than {max_line_bytes} bytes", overlong[0]
                )
                offset += overlong[1] + nl + 1
                line_no += 1
                tail, at_line_start = b"", True
                yield _at_disk(
                    Chunk(name, _frame(name, [], pl.Series([], dtype=pl.UInt32), offset, line_no), [rec], offset, line_no), raw_file, tail
                )
                block, overlong = block[nl + 1 :], None
            data = carry + block
            cut = data.rfind(b"\n")
            if cut >= 0:
                complete, carry = data[: cut + 1], data[cut + 1 :]
                frame, bad = split_lines(name, complete, offset, line_no, max_line_bytes)
                offset += len(complete)
                line_no += frame.height
                tail = (tail + complete[-TAIL_BYTES:])[-TAIL_BYTES:]
                last = complete.rfind(b"\n", 0, len(complete) - 1)
                head = line_head(complete[last + 1 :]) if last >= 0 or at_line_start else None
                at_line_start = True
                yield _at_disk(Chunk(name, _drop_blank(frame), bad, offset, line_no), raw_file, tail, head)
            else:
                carry = data
            if len(carry) > max_line_bytes:
                overlong, carry = (carry, len(carry)), b""
        if overlong is not None and final:
            rec = QuarantineRecord.of(
                name,
                line_no,
                offset,
                Reason.LINE_TOO_LONG,
                f"line longer than {max_line_bytes} bytes (no newline at end of file)",
                overlong[0],
            )
            yield _at_disk(
                Chunk(name, _frame(name, [], pl.Series([], dtype=pl.UInt32), offset, line_no), [rec], offset + overlong[1], line_no + 1),
                raw_file,
                b"",
            )
        elif carry and ((whole := is_document(carry)) or final):
            frame, bad = split_lines(name, carry + b"\n", offset, line_no, max_line_bytes)
            if not whole:
                frame = frame.with_columns(truncated=pl.lit(True))
            head = line_head(carry) if at_line_start else None
            yield _at_disk(
                Chunk(name, _drop_blank(frame), bad, offset + len(carry), line_no + 1), raw_file, (tail + carry)[-TAIL_BYTES:], head
            )


def _read_block(f: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes. From a compressed file, in the decompressor's own steps: a stream that
    ends early (a copy still being written) or is damaged gives every byte decompressed before the
    damage, and the next call raises (``DAMAGED``): the block read so far is not lost with it."""
    if not isinstance(f, DECOMPRESSED):
        return f.read(size)
    parts: list[bytes] = []
    got = 0
    while got < size:
        try:
            part = f.read1(size - got)
        except DAMAGED:
            if parts:
                break
            raise
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _at_disk(chunk: Chunk, raw_file: BinaryIO, tail: bytes, head: bytes | None = None) -> Chunk:
    """Where reading stands on disk (compressed bytes for a compressed file, for progress) and the bytes just before it."""
    chunk.disk_offset = raw_file.tell()  # type: ignore[union-attr]
    chunk.tail, chunk.head = tail, head
    return chunk


def read_lines_at(path: Path, positions: list[tuple[int, int]], fileobj: BinaryIO | None = None) -> Chunk:
    """The lines starting at the given (offset, line number) positions: calls held back by a previous run."""
    name = shown(path)
    rows: list[tuple[int, int, str]] = []
    with open_log(path) if fileobj is None else fileobj as f:
        pos = 0
        for offset, line_no in sorted(positions):
            if isinstance(f, DECOMPRESSED):
                if offset < pos:
                    continue
                skip_to(f, offset - pos, DEFAULT_CHUNK_BYTES)
            else:
                f.seek(offset)
            data = f.readline()
            pos = offset + len(data)
            if data.endswith(b"\n"):
                rows.append((line_no, offset, data.decode("utf-8", "replace").rstrip("\r\n")))
    frame = pl.DataFrame(
        {
            "source": pl.repeat(name, len(rows), eager=True, dtype=pl.String),
            "line_no": pl.Series([r[0] for r in rows], dtype=pl.Int64),
            "offset": pl.Series([r[1] for r in rows], dtype=pl.Int64),
            "raw": pl.Series([r[2] for r in rows], dtype=pl.String),
            "truncated": pl.repeat(False, len(rows), eager=True, dtype=pl.Boolean),
        }
    )
    return Chunk(name, frame)


def _drop_blank(frame: pl.DataFrame) -> pl.DataFrame:
    """Blank lines are not records (quarantined lines were blanked by ``split_lines``)."""
    if frame.height <= FEW_LINES and all(line.strip() for line in frame["raw"].to_list()):
        return frame
    return frame.filter(pl.col("raw").str.strip_chars() != "")


def skip_to(f: BinaryIO, start_offset: int, chunk_bytes: int) -> bytes:
    """Position at an uncompressed offset (seek in plain files, read through compressed ones); returns the
    bytes just before it, so every chunk's ``tail`` covers the bytes a checkpoint's digest is taken on."""
    if not start_offset:
        return b""
    if not isinstance(f, DECOMPRESSED):
        before = max(0, start_offset - TAIL_BYTES)
        f.seek(before)
        return f.read(start_offset - before)
    return read_through(f, start_offset, TAIL_BYTES, chunk_bytes)[0]


def read_through(f: BinaryIO, offset: int, keep: int, step: int = 1 << 20) -> tuple[bytes, bool]:
    """Read a stream from where it is to ``offset`` (a compressed one cannot seek); returns the last ``keep``
    bytes before it, and whether the stream reached it."""
    remaining, last = offset, b""
    while remaining > 0 and (got := f.read(min(remaining, step))):
        remaining -= len(got)
        last = (last + got)[-keep:]
    return last, not remaining


def empty_lines(name: str, file: str) -> pl.DataFrame:
    """A line frame of no lines, for a chunk that carries only quarantine records."""
    return _frame(name, [], pl.Series([], dtype=pl.UInt32), 0, 1).with_columns(file=pl.lit(file))


def damaged_rest(path: Path | str, file: str, line: int, offset: int, e: BaseException) -> Chunk:
    """The rest of a compressed file past its last good line (``line``, at ``offset`` of its
    content) as one ``unreadable`` quarantine record, said in a warning."""
    why = first_line(e)
    log.warning("%s cannot be read past line %d (%s); the rest is quarantined as unreadable", path, line, why)
    detail = f"compressed file cannot be read past line {line} (byte {offset} of its content): {why}"
    return unreadable_chunk(shown(path), file, line, offset, detail)


def file_chunks(path: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """:func:`read_chunks` of a file read whole, with no checkpoint (``batch --no-state``,
    ``reconcile``): a damaged compressed file gives its lines up to the damage, then
    :func:`damaged_rest`, as a followed one does (it stopped the run as "unexpected EOFError")."""
    line, offset = 1, 0
    try:
        for chunk in read_chunks(path, chunk_bytes=chunk_bytes):
            line, offset = chunk.end_line, chunk.end_offset
            yield chunk
    except DAMAGED as e:
        if compression_of(path) is None:
            raise
        yield damaged_rest(path, shown(path), line, offset, e)


def unreadable_chunk(name: str, file: str, line: int, offset: int, detail: str, raw: bytes = b"") -> Chunk:
    """The rest of a damaged archive or object past its last good line, as one ``unreadable``
    quarantine record, ending where the good lines end."""
    bad = QuarantineRecord.of(name, line, offset, Reason.UNREADABLE, detail, raw)
    return Chunk(name, empty_lines(name, file), [bad], offset, line)
