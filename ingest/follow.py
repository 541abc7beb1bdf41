"""Follow: the one file-following core under ``batch``, ``backfill`` and ``tail``.

One rule matches a file to its checkpoint (:meth:`Follower.identify`, after OTel's ``newReader``
and Vector's ``FileWatcher``): the fingerprint of its first line, told apart from a diverging
copy by the bytes just before the checkpoint, started again when a plain file is now shorter
than its checkpoint and has stopped changing (until then it may be a copy still being written:
copytruncate copies the live file before it truncates it). A :class:`Followed` file is read from its checkpoint through a descriptor
that survives renames and deletion; the pipeline is fed, and only once it returned (MLflow
acknowledged every call that was final) does the checkpoint move (:meth:`Follower.advance`).

What the pipeline has not had acknowledged (calls held for a retry or fallback, calls in flight
when a write failed, calls written as failed whose late retry would rewrite them) is saved in
the state by content, with the file, line and offset it came from, never by position alone: a
rotation that renames, compresses, truncates or deletes its file, or a kill at any moment,
cannot lose it, and a restart feeds it first (:meth:`Follower.restore`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import polars as pl

from ingest.checkpoints import Checkpoint, State, encode_state, holds, now_iso
from ingest.fingerprint import FIRST_LINE_CAP, fingerprint_of, fingerprints_of, head_before, raw_fingerprint, tail_digest
from ingest.sources import (
    CORRUPT,
    DAMAGED,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_LINE_BYTES,
    LINE_WINDOW,
    MAGIC_BYTES,
    TAIL_BYTES,
    Chunk,
    compression,
    damaged_rest,
    decompressed,
    read_chunks,
    read_lines_at,
    read_through,
)

if TYPE_CHECKING:
    from ingest.pipeline import Pipeline

log = logging.getLogger("litellm-ingest.follow")
LEFT_OUT = "left_out"
"""The state's list of calls a run left out of its window whose late attempt may still come: the next
run over the same window leaves that attempt out too (alone, it starts inside the window)."""

RECENT_CAP_ROWS = 2_000
RECENT_CAP_BYTES = 8 * 1024 * 1024
LINE_COLUMNS = {"source": pl.String, "line_no": pl.Int64, "offset": pl.Int64, "raw": pl.String}


@dataclass
class Followed:
    """One file being read: its checkpoint key, checkpoint, where it is now, and an open descriptor."""

    key: str
    fp: str
    ck: Checkpoint
    path: Path
    fd: int
    compressed: str | None
    """The compression it is in (gzip, xz, bzip2, zstd); None for a plain file."""
    gone_since: float | None = None
    stale: bool = False
    ends_at: tuple[str, int] | None = None
    """A compressed file seen to end cleanly (when it was told apart, or read to its end): its stat key
    then, and that end's offset (:meth:`Follower.is_done`). It goes with the file: a daemon through
    months of rotations keeps nothing of an archive it no longer follows."""

    def reader(self) -> BinaryIO:
        return _reader(self.fd, self.compressed)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def mtime(self) -> float:
        return os.fstat(self.fd).st_mtime

    def first_line(self) -> str | None:
        """The fingerprint its descriptor shows now (changes when the file was truncated and rewritten in place)."""
        if self.compressed:
            return self.fp
        with self.reader() as f:
            return fingerprint_of(f)

    def holds_its_lines(self) -> bool:
        """Its descriptor still shows the lines it was known by: not truncated (copytruncate) or rewritten in place."""
        return not self.stale and self.first_line() == self.fp

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def stat_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _reader(fd: int, compressed: str | None) -> BinaryIO:
    """A reader of the file ``fd`` is open on (renamed or deleted since, still the same), from its
    start and with an offset of its own: a ``dup`` shares the offset, so reading through one while
    another reader is mid-file (the chunk reader, a chunk ahead) would move that one."""
    try:
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    except OSError:
        own = os.dup(fd)
    f = os.fdopen(own, "rb")
    f.seek(0)
    return decompressed(f, compressed)


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _tail_at(fd: int, compressed: str | None, offset: int, with_head: bool = True) -> str | None:
    """The digest of the bytes just before ``offset`` as the file holds them now
    (:func:`~ingest.fingerprint.tail_digest`; ``with_head`` False: an older state's kind); None if
    it is shorter.

    Raises EOFError for a compressed stream that ends early: a compressed copy still being written."""
    return _tail_and_end(fd, compressed, offset, with_head)[0]


def _tail_and_end(fd: int, compressed: str | None, offset: int, with_head: bool = True) -> tuple[str | None, bool]:
    """:func:`_tail_at`, and whether a compressed stream ends cleanly right at ``offset``: decompressed
    through to there, it is known whole without a second pass (False for a plain file)."""
    want = min(LINE_WINDOW + 1, offset) if with_head else min(TAIL_BYTES, offset)
    ended = False
    try:
        if compressed:
            with _reader(fd, compressed) as f:
                before, reached = read_through(f, offset, want)
                ended = reached and _at_clean_end(f)
            if not reached:
                return None, False
        else:
            first = min(want, 1 << 16)
            before = os.pread(fd, first, offset - first)
            if len(before) < first:
                return None
            if first < want and before.rfind(b"\n", 0, first - 1) < 0:
                before = os.pread(fd, want, offset - want)
    except CORRUPT:
        return None, False
    if not with_head:
        return tail_digest(before), ended
    return tail_digest(before[-TAIL_BYTES:], head_before(before, at_start=len(before) == offset)), ended


def _at_clean_end(f: BinaryIO) -> bool:
    """Nothing follows in the decompressed stream, and its end checks out (a damaged or unfinished
    end is for the reading pass to find and say)."""
    try:
        return f.read(1) == b""
    except DAMAGED:
        return False


def _gzip_size_mod32(fd: int, compressed: str | None) -> int:
    """The uncompressed size mod 2**32 a gzip's trailer holds (of its last member); -1 for another compression."""
    if compressed != "gzip":
        return -1
    size = os.fstat(fd).st_size
    return int.from_bytes(os.pread(fd, 4, size - 4), "little") if size >= 4 else -1


def _last_newline(fd: int) -> int:
    """Offset just after the last newline (``--from-end`` skips whole lines only)."""
    pos = os.fstat(fd).st_size
    while pos > 0:
        start = max(0, pos - 65536)
        block = os.pread(fd, pos - start, start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        pos = start
    return 0


def lines_frame(rows: list[dict]) -> pl.DataFrame:
    """Saved lines (held or recent) as the line frame the pipeline is fed."""
    frame = pl.DataFrame(
        {
            "source": [r["source"] for r in rows],
            "line_no": [r["line"] for r in rows],
            "offset": [r["offset"] for r in rows],
            "raw": [r["raw"] for r in rows],
        },
        schema=LINE_COLUMNS,
    )
    return frame.with_columns(truncated=pl.lit(False), file=pl.Series([r["file"] for r in rows], dtype=pl.String))


class Follower:
    """Files, their checkpoints and the unacknowledged lines of one state, fed to one pipeline."""

    def __init__(
        self,
        state: State,
        pipeline: Pipeline,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        partial_timeout_s: float = 300.0,
        from_end: bool = False,
        dry_run: bool = False,
    ) -> None:
        self.state = state
        self.pipeline = pipeline
        self.chunk_bytes = chunk_bytes
        self.max_line_bytes = max_line_bytes
        self.partial_timeout_s = partial_timeout_s
        self.from_end = from_end and not state.checkpoints and not state.last_run
        """Start files at their end: only on a state's very first start, and only for the files its
        first scan finds (the daemon turns it off after it); a file made later is read whole."""
        self.from_end_files: set[tuple[int, int]] | None = None
        """With ``from_end``: the (device, inode) of the files the first scan found, when a daemon's
        first scan takes several passes (more files than descriptors): only those start at their end."""
        self.own_clock = False
        """Take a file as finished only once this process saw it unchanged for ``partial_timeout_s``
        too (a daemon): a file server's clock running behind ours makes a file look quiet at once."""
        self._unchanged: dict[tuple[int, int], tuple[tuple[int, int], float]] = {}
        self._clean_end: tuple[str, int] | None = None
        """The last compressed file :meth:`_continues` decompressed to a clean end, as ``Followed.ends_at``."""
        self._damaged: dict[str, tuple[str, bool]] = {}
        """The stat keys of the files that could not be read to their end, as they were then, and
        whether the rest was given up on (quarantined as unreadable)."""
        self.dry_run = dry_run
        self.out_of_descriptors: OSError | None = None
        """The last open that failed for want of a descriptor: a file skipped for it is not one waiting
        for its first line (a cron run stops on it; the daemon opens it on a later pass)."""
        self.files: dict[str, Followed] = {}
        self.parked: set[str] = set()
        """The stat keys (``Checkpoint.end_stat``) of the files the daemon closed, read to their end."""
        self._reset: set[str] = set()
        self._saved: bytes | None = None
        self._recent: tuple[pl.DataFrame, list[dict]] | None = None
        if pipeline is not None:
            pipeline.before_write = self.save

    # --- matching ---------------------------------------------------------------------------------

    def identify(self, path: Path, fd: int | None = None) -> Followed | None:
        """Open ``path`` (or take ``fd``, the file once named so) and find its checkpoint, without
        moving any; None while it has no complete first line (one without a newline is complete when
        it is a whole JSON object, or when the file has not changed for ``partial_timeout_s``: then it
        is read, and quarantined if bad), and while it is shorter than the checkpoint of its first
        line and still changing (a copy being made: read from 0 now, its lines would be read twice)."""
        self._clean_end = None
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self.out_of_descriptors = e
                return None
        packed, finished = None, False
        try:
            packed = compression(os.pread(fd, MAGIC_BYTES, 0))
            finished = self.quiet(os.fstat(fd))
            with _reader(fd, packed) as f:
                fp, *older = fingerprints_of(f, unterminated_ok=finished, damaged_ok=bool(packed) and finished) or (None,)
        except DAMAGED:
            fp, older = None, []
            if packed and finished:  # an archive that gives no first line, however long it is left
                with contextlib.suppress(OSError):
                    fp = raw_fingerprint(os.pread(fd, FIRST_LINE_CAP, 0))
        if fp is None or (not packed and compression(os.pread(fd, MAGIC_BYTES, 0))):
            # the second look: a compressed copy being made (``gzip`` of a rotated file) was empty at
            # the first and holds its magic now; read as text, its bytes were quarantined line by line
            os.close(fd)
            return None
        key, ck = fp, self.state.checkpoints.get(fp)
        try:
            ck = self._adopt(fp, older, ck, fd, packed)
            continues = ck is None or self._continues(ck, fd, packed)
        except EOFError:
            os.close(fd)
            return None
        if not continues:
            shorter = not packed and ck is not None and os.fstat(fd).st_size < ck.offset
            key = f"{fp}@{hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:12]}"
            ck = self.state.checkpoints.get(key)
            stale = False
            with contextlib.suppress(EOFError):
                stale = ck is not None and not self._continues(ck, fd, packed)
            if (ck is None or stale) and shorter and not finished:
                os.close(fd)
                return None
            if stale:
                self._restart(ck)
        if ck is None:
            ck = Checkpoint(key, str(path.resolve()))
            if self.from_end and not packed and (self.from_end_files is None or _inode(fd) in self.from_end_files):
                ck.offset, ck.line = _last_newline(fd), 1
        f = Followed(key, fp, ck, path, fd, packed)
        if packed and self._clean_end == (stat_key(os.fstat(fd)), ck.offset):
            f.ends_at = self._clean_end
        return f

    def _adopt(self, fp: str, older: list[str], ck: Checkpoint | None, fd: int, compressed: str | None) -> Checkpoint | None:
        """The checkpoint an earlier version kept for this file under the fingerprint it gave it,
        taken under ``fp`` when it is further on than ``ck`` and the file holds what it was taken
        on; else ``ck``. Read from 0 as a new file, its bad first line was quarantined again."""
        for key in older:
            prev = self.state.checkpoints.get(key)
            if prev is not None and prev.offset > (ck.offset if ck is not None else 0) and self._continues(prev, fd, compressed):
                return Checkpoint.from_dict({**prev.as_dict(), "fingerprint": fp})
        return ck

    def _continues(self, ck: Checkpoint, fd: int, compressed: str | None) -> bool:
        """This file holds the bytes the checkpoint was taken on (not a copy that diverged, nor rewritten
        shorter). A compressed one (no gzip trailer to tell) is decompressed to the checkpoint to tell it;
        if it ends cleanly there, that is kept for :meth:`identify` (``Followed.ends_at``): a rotation's
        xz, bzip2 or zstd copy of a file read to its end was decompressed a second time to learn it held
        no more."""
        if not ck.offset:
            return True
        if not compressed and os.fstat(fd).st_size < ck.offset:
            return False
        if _gzip_size_mod32(fd, compressed) == ck.offset % 2**32:
            return True
        if ck.tail is None:
            return True
        tail, ended = _tail_and_end(fd, compressed, ck.offset, with_head=ck.tail.startswith("2:"))
        if tail != ck.tail:
            return False
        if ended:
            self._clean_end = (stat_key(os.fstat(fd)), ck.offset)
        return True

    def _restart(self, ck: Checkpoint) -> None:
        self._reset.add(ck.fingerprint)
        ck.offset, ck.line, ck.tail, ck.done, ck.legacy_held, ck.end_stat = 0, 1, None, False, [], None

    def stamp(self, f: Followed) -> None:
        """At the end of a read: whether ``f`` is done (a compressed file read whole), and its stat key if it is
        read to its end (its checkpoint at its size, or done), for :meth:`unchanged` and :meth:`park`. A file
        truncated and written again to its checkpoint's size is not: stamped, the next start passed it over."""
        st = os.fstat(f.fd)
        f.ck.done = self.is_done(f)
        whole = (f.ck.done or self.given_up(f, st)) if f.compressed else f.ck.offset == st.st_size and f.first_line() in (f.fp, None)
        f.ck.end_stat = stat_key(st) if whole else None

    def unchanged(self, paths: list[Path]) -> dict[Path, Checkpoint]:
        """The files read to their end before and untouched since, with their checkpoints: the same
        device, inode, size and mtime (Filebeat's "offset equals size", by stat). A cron run over a
        folder of a per-call logger's files, hundreds of thousands of them, opens only the new ones."""
        if not self.state.checkpoints:
            return {}
        keys: dict[Path, str] = {}
        for path in paths:
            with contextlib.suppress(OSError):
                keys[path] = stat_key(os.stat(path))
        stamps = self.state.checkpoints.with_end_stats(set(keys.values()))
        found = {path: stamps[key] for path, key in keys.items() if key in stamps}
        for path, ck in found.items():
            self.found(ck, path)
        return found

    def found(self, ck: Checkpoint, path: Path, renamed: bool = False) -> None:
        """``ck``'s file is at ``path``: it is not gone, and its path follows it where the old one no
        longer holds it (``renamed``: known to be the same file; a compressed copy, the original
        deleted), so a look for files gone (:meth:`forget_gone`) finds it there."""
        if ck.gone_at is not None:
            ck.gone_at = None
        if ck.path != os.path.abspath(path) and (renamed or not holds(ck.path, ck.end_stat)):
            ck.path = str(path.resolve())

    def follow(self, f: Followed) -> Followed:
        """Take ``f`` on: its checkpoint joins the state, and held lines named by a version-1 state are fed."""
        f.ck.path = str(f.path.resolve())
        if f.ck.gone_at is not None:
            f.ck.gone_at = None
        self.state.checkpoints[f.key] = f.ck
        self.files[f.key] = f
        if f.ck.legacy_held:
            with f.reader() as fh:
                chunk = read_lines_at(f.path, f.ck.legacy_held, fileobj=fh)
            chunk.lines = chunk.lines.with_columns(file=pl.lit(f.key))
            f.ck.legacy_held = []
            self.pipeline.feed(chunk)
        return f

    def forget(self, key: str) -> None:
        """Stop following a file gone for good."""
        f = self.files.pop(key, None)
        if f is not None:
            f.close()

    def forget_gone(self, after_s: float) -> int:
        """Forget the checkpoints of files gone for ``after_s`` (:meth:`State.forget_gone`), not of
        one still open here (a daemon reads a deleted file to its end); the number forgotten."""
        return 0 if self.dry_run else self.state.forget_gone(after_s, busy=self.files.keys(), listed=self.parked)

    def park(self, f: Followed) -> bool:
        """Close the descriptor of a file read to its end (Filebeat's ``close_inactive``): a daemon over
        a directory of thousands of files must not hold one descriptor each (the default limit is
        1,024). Its stat key (device, inode, size, mtime) is kept; a scan that sees any of them
        change opens it again, and its checkpoint carries on. False if it grew meanwhile."""
        self.stamp(f)
        if f.ck.end_stat is None:
            return False
        self.files.pop(f.key, None)
        self.parked.add(f.ck.end_stat)
        f.close()
        return True

    def park_stamped(self) -> None:
        """At a start, the files read to their end by an earlier run count as closed: a daemon over
        a folder of a hundred thousand files opens only those that changed since."""
        self.parked = {s for s, key in self.state.checkpoints.end_stats().items() if key not in self._reset}

    def still_parked(self, st: os.stat_result) -> bool:
        """The file under ``st`` is a parked one, unchanged since it was read to its end."""
        return stat_key(st) in self.parked

    def is_done(self, f: Followed) -> bool:
        """A compressed file read to its end before: its gzip trailer's size is the checkpoint's offset,
        or (several gzip members, whose last trailer counts only the last; xz, bzip2 and zstd, which
        have no such trailer) it was decompressed to a clean end at the checkpoint's offset,
        unchanged since."""
        if not f.compressed or f.ck.offset <= 0:
            return False
        if _gzip_size_mod32(f.fd, f.compressed) == f.ck.offset % 2**32:
            return True
        now = stat_key(os.fstat(f.fd))
        end = (now, f.ck.offset)
        return f.ends_at == end or (f.ck.done and f.ck.end_stat == now)

    def read_to_end(self, f: Followed) -> bool:
        """Nothing of ``f`` is left to read: its checkpoint is at its end, or its descriptor no longer holds its lines."""
        return f.stale or ((self.is_done(f) or self.given_up(f, os.fstat(f.fd))) if f.compressed else f.ck.offset >= f.size())

    # --- reading ---------------------------------------------------------------------------------

    def restore(self) -> None:
        """Feed the lines the last run left unacknowledged, before anything new is read; and take back
        the calls it left out of ``--since``/``--until`` whose late attempts may still come."""
        left_out = self.state.extra.get(LEFT_OUT, [])
        if isinstance(left_out, list):
            self.pipeline.left_out.update(k for k in left_out if isinstance(k, str))
        if self.state.recent:
            self.pipeline.restore_recent(lines_frame(self.state.recent))
        if self.state.held:
            self.pipeline.feed(Chunk("", lines_frame(self.state.held)))

    def chunks(self, f: Followed, final: bool | None = None):  # type: ignore[no-untyped-def]
        """Chunks after ``f``'s checkpoint. An unterminated last line is taken as final when the file is
        compressed or has not changed for ``partial_timeout_s``. A plain file at its checkpoint's size
        has nothing to read: one ``fstat``, not the reads that check it still holds its lines (a
        daemon keeps up to a thousand files open and passes over them every second); a compressed one
        read whole has nothing either (it was decompressed again every pass until closed as idle)."""
        if f.stale or (f.size() == f.ck.offset if not f.compressed else self.is_done(f)) or not self._still_holds(f):
            return
        st = os.fstat(f.fd)
        damaged = self._damaged.get(f.key)
        if damaged is not None and damaged[0] == stat_key(st) and (damaged[1] or not self.quiet(st)):
            return
        if final is None:
            final = bool(f.compressed) or (self.quiet(st) and not self._seen_changing(f.ck, st))
        offset, line = f.ck.offset, max(f.ck.line, 1)
        try:
            with f.reader() as fh:
                for chunk in read_chunks(f.path, offset, line, self.chunk_bytes, self.max_line_bytes, final=final, fileobj=fh):
                    chunk.lines = chunk.lines.with_columns(file=pl.lit(f.key))
                    offset, line = chunk.end_offset, chunk.end_line
                    yield chunk
        except DAMAGED as e:
            # A compressed copy still being written waits for the file to change (decompressed again and
            # said again every pass before). One that stays so (a truncated or damaged archive) has
            # given every record before the damage; the rest is quarantined, once.
            given_up = bool(f.compressed) and self.quiet(st)
            self._damaged[f.key] = (stat_key(st), given_up)
            if not given_up:
                log.warning("%s cannot be read past byte %d (%s); reading it again once it changes", f.path, offset, e)
                return
            yield damaged_rest(f.path, f.key, line, offset, e)
        else:
            self._damaged.pop(f.key, None)
            if f.compressed:
                f.ends_at = (stat_key(st), offset)

    def given_up(self, f: Followed, st: os.stat_result) -> bool:
        """``f``, as ``st`` describes it, is a damaged archive whose unreadable rest was quarantined."""
        return self._damaged.get(f.key) == (stat_key(st), True)

    def quiet(self, st: os.stat_result) -> bool:
        """The file has not changed for ``partial_timeout_s``: by its mtime, and with ``own_clock`` by
        this process's own watch as well."""
        if time.time() - st.st_mtime <= self.partial_timeout_s:
            return False
        if not self.own_clock:
            return True
        key, seen, now = (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns), time.monotonic()
        was = self._unchanged.get(key)
        if was is None or was[0] != seen:
            if len(self._unchanged) >= 65536:
                self._unchanged.clear()
            self._unchanged[key] = (seen, now)
            return False
        return now - was[1] > self.partial_timeout_s

    def _seen_changing(self, ck: Checkpoint, st: os.stat_result) -> bool:
        """The file changed since its checkpoint last moved (its size then, by this machine's clock),
        less than ``partial_timeout_s`` ago: its last line may still be being written, whatever its
        modification time says (a file server whose clock runs behind ours makes it look old)."""
        if ck.size is None or ck.updated_at is None or st.st_size == ck.size:
            return False
        try:
            seen = datetime.fromisoformat(ck.updated_at).timestamp()
        except ValueError:
            return False
        return time.time() - seen <= self.partial_timeout_s

    def _still_holds(self, f: Followed) -> bool:
        """The descriptor still holds the lines the checkpoint counts. A copytruncate that regrew the
        file past the checkpoint before anyone looked (no scan runs at shutdown) would otherwise be
        read from the middle of a line: it is marked stale, and the next scan identifies it anew."""
        if f.compressed or not f.ck.offset:
            return True
        try:
            holds = f.first_line() in (f.fp, None) and self._continues(f.ck, f.fd, False)
        except (OSError, EOFError):
            holds = False
        if not holds:
            log.info("%s was truncated or rewritten in place", f.path)
            f.stale = True
        return holds

    def advance(self, f: Followed, chunk: Chunk) -> None:
        """Move ``f``'s checkpoint past ``chunk``: call only after the pipeline was fed it and returned."""
        ck = f.ck
        ck.offset, ck.line, ck.end_stat = chunk.end_offset, chunk.end_line, None
        if chunk.head is not None and len(chunk.tail) >= min(TAIL_BYTES, ck.offset):
            ck.tail = tail_digest(chunk.tail, chunk.head) if ck.offset > 0 else None
        else:
            try:
                ck.tail = _tail_at(f.fd, f.compressed, ck.offset)
            except EOFError:
                ck.tail = None
        ck.updated_at = now_iso()
        if not f.compressed:
            ck.size = f.size()

    # --- saving ------------------------------------------------------------------------------------

    def _unacknowledged(self, frame: pl.DataFrame) -> pl.DataFrame:
        """The rows no file read would give back: before their file's checkpoint, or of a file started again."""
        if not frame.height:
            return frame
        checkpoints = self.state.checkpoints
        files = [f for f in frame["file"].unique().to_list() if f in checkpoints]
        offsets = pl.DataFrame({"file": files, "_ck": [checkpoints[f].offset for f in files]}, schema={"file": pl.String, "_ck": pl.Int64})
        joined = frame.join(offsets, on="file", how="left")
        keep = pl.col("_ck").is_null() | (pl.col("offset") < pl.col("_ck")) | pl.col("file").is_in(sorted(self._reset))
        return joined.filter(keep).drop("_ck")

    def rewind(self) -> None:
        """After a failed write: what was in flight waits again (what its files will give back is dropped)."""
        inflight = self.pipeline.inflight
        self.pipeline.inflight = inflight.clear()
        self.pipeline.pending = pl.concat([self.pipeline.pending, self._unacknowledged(inflight)])

    def save(self) -> bool:
        """Write the state if anything in it changed; True when written."""
        if self.dry_run:
            return False
        pipe = self.pipeline
        unacked = pl.concat([pipe.pending, pipe.inflight]) if pipe.inflight.height else pipe.pending
        self.state.held = _rows(self._unacknowledged(unacked))
        if self._recent is None or self._recent[0] is not pipe.recent:
            self._recent = (pipe.recent, _rows(_capped(pipe.recent)))
        self.state.recent = list(self._recent[1])
        if pipe.left_out:
            self.state.extra[LEFT_OUT] = sorted(pipe.left_out)
        else:
            self.state.extra.pop(LEFT_OUT, None)
        data = encode_state(self.state.document())
        if data == self._saved:
            return False
        self.state.save(data)
        self._saved = data
        return True

    def close(self) -> None:
        for key in list(self.files):
            self.forget(key)


def _capped(recent: pl.DataFrame) -> pl.DataFrame:
    """The newest calls written as failed, within a bound (older late retries are merged, not rewritten)."""
    if recent.height <= RECENT_CAP_ROWS and (not recent.height or int(recent["raw"].str.len_bytes().sum()) <= RECENT_CAP_BYTES):
        return recent
    calls = (
        recent.group_by("call_key")
        .agg(pl.col("end_us").max(), rows=pl.len(), size=pl.col("raw").str.len_bytes().sum())
        .sort("end_us", descending=True)
        .filter((pl.col("rows").cum_sum() <= RECENT_CAP_ROWS) & (pl.col("size").cum_sum() <= RECENT_CAP_BYTES))
    )
    return recent.filter(pl.col("call_key").is_in(calls["call_key"].implode()))


def _rows(frame: pl.DataFrame) -> list[dict]:
    if not frame.height:
        return []
    return frame.select("file", "source", pl.col("line_no").alias("line"), "offset", "raw").unique(maintain_order=True).to_dicts()
