"""The file-following core in-process: checkpoint format, the matching rule, and a model of everything.

The model (after Vector's file-source model test): Hypothesis drives appends of whole calls and of
a call's failed attempt alone (its retry comes later), partial lines and their completion,
rotations of every kind (rename, rename then gzip, copytruncate), deletion of rotated files
already read, sink outages, clean restarts and kills (the process gone at once: only what was
saved survives, also right after MLflow acknowledged a write), and the clock moving past ``--settle``. The oracle: once everything is quiet,
every call written is one trace with one span per attempt (plus the root of several) and its
final state, and no line was quarantined. CI runs a few hundred sequences in seconds; a soak:
LITELLM_INGEST_SOAK=20 pytest tests/test_follow.py
"""

from __future__ import annotations

import contextlib
import errno
import gc
import gzip
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import orjson
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from ingest import checkpoints, sources
from ingest.checkpoints import STATE_VERSION, Checkpoint, State, StateError
from ingest.fingerprint import fingerprints_of
from ingest.follow import Follower, _reader, stat_key
from ingest.pipeline import Pipeline
from ingest.quarantine import QuarantineWriter
from ingest.sources import MAGIC_BYTES, compression, file_chunks
from ingest.tail import Tailer
from tests.conftest import COMPRESSIONS, SUFFIX, compressor, decompressor
from tests.followkit import Crash, RecordingSink, line, record, tailer

SOAK = int(os.environ.get("LITELLM_INGEST_SOAK", "0"))

# --- the checkpoint format ---------------------------------------------------------------------------

PINNED = {
    "version": 3,
    "mode": "batch",
    "destination": {"tracking_uri": "sqlite:////srv/mlflow.db", "experiment_id": "1"},
    "checkpoints": [
        {
            "fingerprint": "sha256:0123456789abcdef0123456789abcdef",
            "path": "/var/log/litellm/proxy.jsonl.1.gz",
            "offset": 5120,
            "line": 11,
            "size": None,
            "updated_at": "2026-11-28T03:00:00+00:00",
            "done": True,
            "tail": "fedcba9876543210",
            "end_stat": "2049:1234567:5120:1795000000123456789",
        }
    ],
    "held": [{"file": "sha256:0123456789abcdef0123456789abcdef", "source": "/var/log/proxy.jsonl", "line": 7, "offset": 3001, "raw": "{}"}],
    "recent": [],
    "last_run": {"started": "2026-11-28T02:59:00+00:00", "result": "ok"},
    "extra": {},
    "experiment_created": 1795000000123,
}


def test_state_document_of_the_current_version_reads_and_writes_back_byte_for_byte(tmp_path: Path) -> None:
    """Pinned as written since orjson writes it (indent 2, UTF-8); the one-space indent of earlier
    releases reads the same and is rewritten in the current layout."""
    path = tmp_path / "batch-x.json"
    text = orjson.dumps(PINNED, option=orjson.OPT_INDENT_2).decode()
    assert text.startswith('{\n  "version": 3,\n  "mode": "batch",')
    path.write_text(json.dumps(PINNED, indent=1))
    assert State.load(path, "batch", PINNED["destination"]).document() == PINNED
    path.write_text(text)
    state = State.load(path, "batch", PINNED["destination"])
    assert STATE_VERSION == 3
    ck = state.checkpoints["sha256:0123456789abcdef0123456789abcdef"]
    assert (ck.offset, ck.line, ck.done, ck.tail, ck.legacy_held) == (5120, 11, True, "fedcba9876543210", [])
    assert state.held == PINNED["held"]
    assert state.experiment_created == 1795000000123
    state.save()
    assert path.read_text() == text


def test_a_version_2_state_is_read_as_it_was_and_written_back_as_version_3_which_a_version_2_reader_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 2 states gained ``2:`` digests, ``end_stat``, ``edge`` and the files database without
    a new number: a release before them read such a state and read its files again (whole, over a
    files database). Written as 3 now, that release's reader refuses it instead."""
    path = tmp_path / "batch-x.json"
    path.write_text(json.dumps(PINNED | {"version": 2}, indent=1))
    state = State.load(path, "batch", PINNED["destination"])
    assert state.document() == PINNED
    state.save()
    assert json.loads(path.read_text())["version"] == 3
    monkeypatch.setattr(checkpoints, "STATE_VERSION", 2)
    with pytest.raises(StateError, match="newer litellm-ingest"):
        State.load(path, "batch", PINNED["destination"])


def test_a_state_written_before_it_knew_its_experiment_keeps_its_checkpoints_and_learns_it(tmp_path: Path) -> None:
    path = tmp_path / "batch-x.json"
    path.write_text(json.dumps({k: v for k, v in PINNED.items() if k != "experiment_created"}, indent=1))
    state = State.load(path, "batch", PINNED["destination"])
    assert state.experiment_created is None
    assert not state.bind(1795000000123)
    assert len(state.checkpoints) == 1 and state.held and state.replaced is None
    state.save()
    assert json.loads(path.read_text())["experiment_created"] == 1795000000123


def test_a_state_for_an_experiment_created_anew_at_the_same_address_starts_over(tmp_path: Path) -> None:
    """``rm mlflow.db`` and run again: the new store's experiment has the old one's id, so the same
    state file, whose checkpoints would skip every line the new store never got."""
    path = tmp_path / "batch-x.json"
    path.write_text(json.dumps(PINNED | {"recent": PINNED["held"]}, indent=1))
    state = State.load(path, "batch", PINNED["destination"])
    assert not state.bind(None), "a destination that does not say when it was made leaves the state as it is"
    assert state.checkpoints and state.experiment_created == 1795000000123
    assert state.bind(1795000999000)
    assert (state.checkpoints, state.held, state.recent) == ({}, [], [])
    assert state.replaced and "2026-11-18T11:23:19Z" in state.replaced
    state.save()
    again = State.load(path, "batch", PINNED["destination"])
    assert again.experiment_created == 1795000999000 and not again.bind(1795000999000)


def test_a_gzip_copy_being_made_is_not_taken_for_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gzip`` of a rotated file, seen at the instant it was created: empty at the look for its
    magic, its compressed bytes there by the read of its first line (a torture run quarantined 33
    lines of gzip as invalid UTF-8). Its first look is no file yet; read once it is whole, it is the
    records it holds."""
    import ingest.follow as follow_module

    rotated = tmp_path / "proxy.jsonl.3.gz"
    rotated.touch()
    records = [record(f"c-{i}", "success", 100.0 + i, 101.0 + i) for i in range(40)]
    packed = gzip.compress("".join(line(r) for r in records).encode())
    looks = {"n": 0}
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        head = real_pread(fd, n, offset)
        looks["n"] += 1
        if looks["n"] == 1:
            rotated.write_bytes(packed)  # gzip's writer, between the magic and the first line
        return head

    follower = Follower(State(tmp_path / "s.json", "batch", {}), None)  # type: ignore[arg-type]
    monkeypatch.setattr(follow_module.os, "pread", pread)
    assert follower.identify(rotated) is None
    monkeypatch.undo()
    f = follower.identify(rotated)
    assert f is not None and f.compressed == "gzip"
    f.close()


def test_a_file_whose_first_read_fails_is_no_file_to_follow_yet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error at the first read of a file (a bad disk, a mount gone; a folder opened as one) is a
    file not identified yet, as before: it raised ``UnboundLocalError`` out of the run (exit 1) and
    out of the daemon's loop once archives damaged before their first line were told from waiting."""
    follower = Follower(State(tmp_path / "s.json", "batch", {}), None)  # type: ignore[arg-type]
    assert follower.identify(tmp_path) is None
    log = tmp_path / "proxy.jsonl"
    log.write_text(line(record("c-1", "success", 100.0, 101.0)))
    real = os.pread

    def failing(fd: int, n: int, offset: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pread", failing)
    assert follower.identify(log) is None
    monkeypatch.setattr(os, "pread", real)
    assert follower.identify(log) is not None


def test_a_version_1_state_is_upgraded_and_its_held_positions_are_replayed_from_the_file(tmp_path: Path) -> None:
    log = tmp_path / "proxy.jsonl"
    failed = record("c-1", "failure", 100.0, 101.0)
    ok = record("c-2", "success", 100.0, 102.0)
    log.write_text(line(failed) + line(ok))
    first = len(line(failed))
    fp = Follower(State(tmp_path / "s.json", "batch", {}), None).identify(log)  # type: ignore[arg-type]
    assert fp is not None
    v1 = {
        "version": 1,
        "mode": "batch",
        "destination": {},
        "checkpoints": [{"fingerprint": fp.key, "path": str(log), "offset": first + len(line(ok)), "line": 3, "held": [[0, 1]]}],
        "last_run": {},
        "extra": {},
    }
    fp.close()
    (tmp_path / "s.json").write_text(json.dumps(v1))
    state = State.load(tmp_path / "s.json", "batch", {})
    assert state.checkpoints[fp.key].legacy_held == [(0, 1)]
    pipe = Pipeline(RecordingSink(), "1", QuarantineWriter(None), settle_s=1e9)  # type: ignore[arg-type]
    follower = Follower(state, pipe)
    follower.follow(follower.identify(log))  # type: ignore[arg-type]
    assert pipe.pending["call_key"].to_list() == ["c-1"]
    follower.save()
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["version"] == STATE_VERSION and [h["raw"] for h in saved["held"]] == [line(failed).rstrip("\n")]
    assert "held" not in saved["checkpoints"][0]


# --- the matching rule --------------------------------------------------------------------------------

LINES = [line(record(f"m-{i}", "success", 100.0 + i, 101.0 + i)) for i in range(6)]


def _gzip(src: Path, dst: Path) -> None:
    with src.open("rb") as a, gzip.open(dst, "wb") as b:
        shutil.copyfileobj(a, b)


def _rename(log: Path) -> Path:
    return log.rename(log.with_name("proxy.jsonl.1"))


def _compress(src: Path, dst: Path, kind: str) -> None:
    """``src`` compressed by rotation with ``kind`` (logrotate's ``compresscmd``), keeping its mtime."""
    dst.write_bytes(compressor(kind)(src.read_bytes()))
    st = src.stat()
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _gzip_rotated(log: Path, kind: str = "gzip") -> Path:
    rotated = log.with_name("proxy.jsonl.1" + SUFFIX[kind])
    _gzip(log, rotated) if kind == "gzip" else _compress(log, rotated, kind)
    log.unlink()
    return rotated


def _copy_then_more(log: Path) -> Path:
    copy = log.with_name("copy.jsonl")
    shutil.copyfile(log, copy)
    with copy.open("a") as f:
        f.write(LINES[4])
    return copy


def _diverging_copy(log: Path) -> Path:
    copy = log.with_name("copy.jsonl")
    copy.write_text(LINES[0] + LINES[5] + LINES[4])
    return copy


def _rewritten_shorter(log: Path) -> Path:
    log.write_text(LINES[0])
    return log


def _rewritten_same_length(log: Path) -> Path:
    log.write_text(LINES[0] + LINES[5] + LINES[3])
    return log


MATCHING = [
    # (what happened after the first three lines were read, its checkpoint: the same one, or its own from the start)
    ("renamed", _rename, "same", 3),
    *((f"renamed then {kind}", lambda log, kind=kind: _gzip_rotated(_rename(log), kind), "same", 3) for kind in COMPRESSIONS),
    ("copied and grown", _copy_then_more, "same", 3),
    ("a copy that diverged after the first line", _diverging_copy, "own", 0),
    ("truncated and rewritten shorter", _rewritten_shorter, "own", 0),
    ("rewritten in place, same length, other lines", _rewritten_same_length, "own", 0),
]


@pytest.mark.parametrize(("case", "change", "match", "resume_line"), MATCHING, ids=[m[0] for m in MATCHING])
def test_the_matching_rule(tmp_path: Path, case: str, change, match: str, resume_line: int) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "proxy.jsonl"
    log.write_text("".join(LINES[:3]))
    state = State(tmp_path / "s.json", "batch", {})
    pipe = Pipeline(RecordingSink(), "1", QuarantineWriter(None), settle_s=1e9)  # type: ignore[arg-type]
    follower = Follower(state, pipe)
    f = follower.follow(follower.identify(log))  # type: ignore[arg-type]
    for chunk in follower.chunks(f):
        pipe.feed(chunk)
        follower.advance(f, chunk)
    follower.forget(f.key)
    first_key = f.key
    moved = change(log)
    if moved.suffix not in SUFFIX.values() and moved.stat().st_size < f.ck.offset:
        assert follower.identify(moved) is None, "a shorter file still changing may be a copy being made"
        os.utime(moved, (time.time() - 301, time.time() - 301))
    g = follower.identify(moved)
    assert g is not None
    follower.follow(g)
    if match == "same":
        assert g.key == first_key and g.ck.line == 4
    else:
        assert g.key.startswith(first_key + "@") and g.ck.offset == 0
    lines = [json.loads(c.lines["raw"][i])["id"] for c in follower.chunks(g) for i in range(c.lines.height)]
    expected = moved.read_bytes() if not g.compressed else decompressor(g.compressed)(moved.read_bytes())
    assert lines == [json.loads(x)["id"] for x in expected.decode().splitlines()[resume_line if match == "same" else 0 :]]
    g.close()


ALIKE = [line(record(f"a-{i}", "success", 100.0 + i, 101.0 + i) | {"model_map_information": {"boilerplate": "x" * 2000}}) for i in range(6)]
"""Records that end in the same kilobytes, as LiteLLM's do (its model map): only their starts differ."""


@pytest.mark.parametrize(
    ("case", "later"),
    [("a copy that diverged after the first line", "copy.jsonl"), ("rewritten in place, same length, other lines", "proxy.jsonl")],
)
def test_records_that_end_alike_do_not_make_two_files_one(tmp_path: Path, case: str, later: str) -> None:
    """The checkpoint's digest covered the last 256 bytes only, all boilerplate in LiteLLM's records:
    a file with the same first line and lines of the same lengths (a copy that went its own way, two
    replicas' logs starting with one record) was read from the other's offset, its lines before it
    lost for good, by ``batch`` and ``tail`` alike."""
    log = tmp_path / "proxy.jsonl"
    log.write_text("".join(ALIKE[:3]))
    pipe = Pipeline(RecordingSink(), "1", QuarantineWriter(None), settle_s=1e9)  # type: ignore[arg-type]
    follower = Follower(State(tmp_path / "s.json", "batch", {}), pipe)
    f = follower.follow(follower.identify(log))  # type: ignore[arg-type]
    for chunk in follower.chunks(f):
        follower.advance(f, chunk)
    follower.forget(f.key)
    assert len(ALIKE[5]) == len(ALIKE[1])
    other = tmp_path / later
    other.write_text(ALIKE[0] + ALIKE[5] + ALIKE[4] + ALIKE[3])
    g = follower.identify(other)
    assert g is not None and g.key.startswith(f.key + "@") and g.ck.offset == 0
    g.close()


def test_a_checkpoint_of_an_older_state_is_checked_as_it_was_taken(tmp_path: Path) -> None:
    """Digests written before the line's start counted (no ``2:``) still match the file they were
    taken on: an upgrade reads nothing again."""
    from ingest.fingerprint import tail_digest

    log = tmp_path / "proxy.jsonl"
    log.write_text("".join(ALIKE[:3]))
    follower = Follower(State(tmp_path / "s.json", "batch", {}), None)  # type: ignore[arg-type]
    f = follower.identify(log)
    assert f is not None
    data = log.read_bytes()
    follower.state.checkpoints[f.key] = Checkpoint(f.key, str(log), offset=len(data), line=4, tail=tail_digest(data))
    f.close()
    with log.open("a") as out:
        out.write(ALIKE[3])
    g = follower.identify(log)
    assert g is not None and g.key == f.key and g.ck.offset == len(data)
    g.close()


@pytest.mark.parametrize(
    ("content", "known"),
    [(b"", False), (b'{"id": "x"', False), (b'{"id": "x"}\n', True), (b"x" * (70 * 1024), True)],
    ids=["empty", "no complete first line", "one line", "first line over 64 KiB without a newline"],
)
def test_a_file_is_known_once_it_has_a_complete_first_line(tmp_path: Path, content: bytes, known: bool) -> None:
    log = tmp_path / "proxy.jsonl"
    log.write_bytes(content)
    f = Follower(State(tmp_path / "s.json", "batch", {}), None).identify(log)  # type: ignore[arg-type]
    assert (f is not None) == known
    if f is not None:
        f.close()


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_a_compressed_copy_of_a_file_read_to_its_end_is_not_read_again(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gzip's trailer tells it is read to its end without reading it; xz, bzip2 and zstd have no
    such trailer: they are decompressed to the checkpoint once, to tell the copy is the file read
    (it was then decompressed a second time to learn it held no more), and give no line."""
    log = tmp_path / "proxy.jsonl"
    log.write_text("".join(line(record(hashlib.sha256(b"%d" % i).hexdigest(), "success", 100.0 + i, 101.0 + i)) for i in range(3000)))
    state = State(tmp_path / "s.json", "batch", {})
    follower = Follower(state, Pipeline(RecordingSink(), "1", QuarantineWriter(None)))  # type: ignore[arg-type]
    f = follower.follow(follower.identify(log))  # type: ignore[arg-type]
    for chunk in follower.chunks(f):
        follower.advance(f, chunk)
    follower.forget(f.key)
    read_from_disk = 0
    real_reader = sources.READERS[kind]

    class Counted:
        """The compressed file as its decompressor reads it, its bytes counted."""

        def __init__(self, raw: BinaryIO) -> None:
            self.raw = raw

        def read(self, n: int = -1) -> bytes:
            nonlocal read_from_disk
            got = self.raw.read(n)
            read_from_disk += len(got)
            return got

        def __getattr__(self, name: str) -> Any:
            return getattr(self.raw, name)

    monkeypatch.setitem(sources.READERS, kind, lambda raw: real_reader(Counted(raw)))
    g = follower.identify(_gzip_rotated(log, kind))
    assert g is not None and g.key == f.key and g.compressed == kind
    follower.follow(g)
    assert follower.is_done(g)
    assert [c for c in follower.chunks(g) if c.lines.height or c.quarantined] == []
    assert follower.is_done(g)
    archive = g.path.stat().st_size
    assert read_from_disk < (0.1 if kind == "gzip" else 1.5) * archive, (read_from_disk, archive)
    follower.stamp(g)
    assert follower.read_to_end(g) and g.ck.end_stat is not None
    g.close()


# --- the model ---------------------------------------------------------------------------------------

SETTLE_S = 10.0


class FollowModel(RuleBasedStateMachine):
    """Everything that can happen to a daemon and its files, against a recording sink."""

    TAILER: ClassVar[dict[str, Any]] = {}

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    @initialize()
    def setup(self) -> None:
        self.dir = self.root / f"run-{time.monotonic_ns()}"
        self.logdir = self.dir / "logs"
        self.logdir.mkdir(parents=True)
        self.log = self.logdir / "proxy.jsonl"
        self.log.touch()
        self.state_dir = self.dir / "state"
        self.sink = RecordingSink()
        self.clock = 1_800_000_000.0
        self.calls: dict[str, list[dict]] = {}
        self.open_calls: list[str] = []
        self.partial: str | None = None
        self.rotated: dict[Path, bool] = {}
        self.n = 0
        self.rotations = 0
        self.tailer = self._start()

    def _start(self):  # type: ignore[no-untyped-def]
        t = tailer(self.logdir, self.state_dir, self.sink, SETTLE_S, **self.TAILER)
        t.pipeline.clock = lambda: int(self.clock * 1_000_000)
        return t

    def _append(self, text: str) -> None:
        with self.log.open("a") as f:
            f.write(text)

    def _new_call(self) -> str:
        self.n += 1
        return f"call-{self.n}"

    @precondition(lambda self: self.partial is None)
    @rule(kind=st.sampled_from(["ok", "failed", "retried", "fallback"]), count=st.integers(1, 3))
    def append_calls(self, kind: str, count: int) -> None:
        for _ in range(count):
            cid = self._new_call()
            t = self.clock
            if kind == "ok":
                recs = [record(cid, "success", t - 1, t)]
            elif kind == "failed":
                recs = [record(cid, "failure", t - 1, t)]
            elif kind == "retried":
                recs = [record(cid, "failure", t - 2, t - 1.5), record(cid, "success", t - 1, t, 1)]
            else:
                recs = [record(cid, "failure", t - 2, t - 1), record(cid, "success", t - 2, t, 1)]
            self.calls[cid] = recs
            self._append("".join(line(r) for r in recs))

    @precondition(lambda self: self.partial is None)
    @rule()
    def append_a_failure_whose_retry_comes_later(self) -> None:
        cid = self._new_call()
        rec = record(cid, "failure", self.clock - 1, self.clock)
        self.calls[cid] = [rec]
        self.open_calls.append(cid)
        self._append(line(rec))

    @precondition(lambda self: self.open_calls and self.partial is None)
    @rule(which=st.integers(0, 100))
    def append_the_retry(self, which: int) -> None:
        cid = self.open_calls.pop(which % len(self.open_calls))
        rec = record(cid, "success", self.clock - 0.5, self.clock + 0.5, 1)
        self.calls[cid].append(rec)
        self._append(line(rec))

    @precondition(lambda self: self.partial is None)
    @rule(cut=st.integers(1, 60))
    def append_half_a_line(self, cut: int) -> None:
        cid = self._new_call()
        rec = record(cid, "success", self.clock - 1, self.clock)
        self.calls[cid] = [rec]
        text = line(rec)
        self.partial = text[cut:]
        self._append(text[:cut])

    @precondition(lambda self: self.partial is not None)
    @rule()
    def complete_the_line(self) -> None:
        self._append(self.partial)  # type: ignore[arg-type]
        self.partial = None

    @precondition(lambda self: self.partial is None)
    @rule(how=st.sampled_from(["rename", "rename+gzip", "copytruncate"]))
    def rotate(self, how: str) -> None:
        self.rotations += 1
        rotated = self.log.with_name(f"proxy.jsonl.{self.rotations}")
        if how == "copytruncate":
            shutil.copyfile(self.log, rotated)
            with self.log.open("r+") as f:
                f.truncate(0)
        else:
            self.log.rename(rotated)
            self.log.touch()
        if how == "rename+gzip":
            _gzip(rotated, rotated.with_name(rotated.name + ".gz"))
            rotated.unlink()
            rotated = rotated.with_name(rotated.name + ".gz")
        self.rotated[rotated] = False

    @precondition(lambda self: any(self.rotated.values()))
    @rule(which=st.integers(0, 100))
    def delete_a_rotated_file_already_read(self, which: int) -> None:
        done = sorted(p for p, read in self.rotated.items() if read)
        victim = done[which % len(done)]
        victim.unlink()
        del self.rotated[victim]

    @rule()
    def step(self) -> None:
        try:
            self.tailer.step()
        except Crash:
            self.kill()
            return
        if self.sink.up and not self.tailer._more:
            self.rotated = dict.fromkeys(self.rotated, True)  # no file waits for room: each one was read

    @rule()
    def die_right_after_the_next_acknowledged_write(self) -> None:
        self.sink.crash_after_write = True

    @rule()
    def settle_passes(self) -> None:
        self.clock += SETTLE_S + 1

    @rule()
    def sink_goes_down(self) -> None:
        self.sink.up = False

    @rule()
    def sink_comes_back(self) -> None:
        self.sink.up = True

    @rule()
    def restart(self) -> None:
        with contextlib.suppress(Crash):
            self.tailer.shutdown()
        self.tailer.close()
        self.tailer = self._start()

    @rule()
    def kill(self) -> None:
        self.tailer.close()
        self.tailer = self._start()

    def teardown(self) -> None:
        if not hasattr(self, "tailer"):
            return
        self.sink.up = True
        self.sink.crash_after_write = False
        if self.partial is not None:
            self.complete_the_line()
        while self.open_calls:
            self.append_the_retry(0)
        for _ in range(3):
            self.step()
            self.clock += SETTLE_S + 1
        self.step()
        for _ in range(50):
            if not self.tailer._more:
                break
            self.step()
        self.tailer.close()
        got = self.sink.calls()
        missing = sorted(set(self.calls) - set(got), key=lambda c: int(c.split("-")[1]))
        extra = sorted(set(got) - set(self.calls))
        assert not missing and not extra, f"missing {missing}, extra {extra}"
        for cid, recs in self.calls.items():
            want_spans = 1 if len(recs) == 1 else len(recs) + 1
            assert len(got[cid]["spans"]) == want_spans, (cid, recs, got[cid])
            final = max(recs, key=lambda r: (r["endTime"], r["startTime"]))
            assert got[cid]["state"] == ("OK" if final["status"] == "success" else "ERROR"), (cid, got[cid])
        quarantine = self.state_dir / "quarantine.jsonl"
        assert not quarantine.exists() or not quarantine.read_text(), quarantine.read_text()
        again = self._start()
        again.step()
        again.close()
        assert again.pipeline.summary.records_read == 0, "a start once every call is written reads nothing again"
        shutil.rmtree(self.dir, ignore_errors=True)


def _first_fingerprint(path: Path) -> str | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with _reader(fd, compression(os.pread(fd, MAGIC_BYTES, 0))) as f:
            return next(iter(fingerprints_of(f, unterminated_ok=True)), None)
    finally:
        os.close(fd)


def _forget_only_what_is_gone(forget: Any, wrong: list[str]) -> Any:
    """``Checkpoints.forget``, noting in ``wrong`` a checkpoint forgotten while a file in its folder
    still holds it (its first line's fingerprint is its key): a rotated file taken for gone would be
    read again, which the recording sink (traces by id) cannot see. Noted, as the daemon's pass
    takes any exception for one to retry."""

    def checked(self: checkpoints.Checkpoints, key: str) -> None:
        folder = Path(self[key].path).parent
        if holders := [p.name for p in folder.iterdir() if p.is_file() and _first_fingerprint(p) == key]:
            wrong.append(f"the checkpoint {key} was forgotten while {holders} holds its file")
        forget(self, key)

    return checked


@pytest.mark.parametrize(
    ("tailer_kw", "settle_above"),
    [
        ({}, checkpoints.SETTLE_ABOVE),
        ({"max_open_files": 1, "close_inactive_s": 0.0}, checkpoints.SETTLE_ABOVE),
        ({"close_inactive_s": 0.0}, 1),
        ({"close_inactive_s": 0.0, "forget_gone_s": 1e-6}, 1),
    ],
    ids=["files-kept-open", "idle-files-closed-at-once", "checkpoints-settled-past-one-file", "files-gone-forgotten-at-once"],
)
def test_every_call_arrives_once_whole_through_rotations_kills_and_outages(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, tailer_kw: dict[str, Any], settle_above: int
) -> None:
    """Also with one file open at a time and every file read to its end closed at once: a rotation,
    a copytruncate, a kill or an outage then meets files the daemon holds no descriptor of. And with
    the checkpoints settled into the files database past one file: those of closed files are let go
    and read again from it. And with the checkpoints of files gone forgotten at the next pass: a
    rotated file (renamed, compressed, copied) must never be taken for gone, or it is read again."""
    monkeypatch.setattr(checkpoints, "SETTLE_ABOVE", settle_above)
    wrong: list[str] = []
    if tailer_kw.get("forget_gone_s"):
        monkeypatch.setattr(checkpoints.Checkpoints, "forget", _forget_only_what_is_gone(checkpoints.Checkpoints.forget, wrong))
    root = tmp_path_factory.mktemp("follow-model")
    init = lambda self: FollowModel.__init__(self, root)  # noqa: E731
    machine = type("Model", (FollowModel,), {"__init__": init, "TAILER": tailer_kw})
    machine.TestCase.settings = settings(
        max_examples=(200 if not tailer_kw else 50 if "forget_gone_s" in tailer_kw else 100) * max(SOAK, 1),
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    machine.TestCase().runTest()
    assert not wrong, wrong[:3]


def daemon_at(tmp_path: Path, now: float) -> tuple[Path, Path, Path, RecordingSink, Tailer]:
    """A daemon on an empty log folder, its clock stopped at ``now``."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    t.pipeline.clock = lambda: int(now * 1_000_000)
    return logdir, state_dir, logdir / "proxy.jsonl", sink, t


def test_lines_held_for_a_retry_survive_a_rotation_that_reuses_the_name_and_a_restart(tmp_path: Path) -> None:
    """The issue's reproduction: failed calls held, rename+gzip within --settle, clean restart, retries after."""
    now = 1_800_000_000.0
    logdir, state_dir, log, sink, t = daemon_at(tmp_path, now)
    failed = [record(f"f-{i}", "failure", now - 1, now) for i in range(4)]
    log.write_text("".join(line(r) for r in failed) + "".join(line(record(f"ok-{i}", "success", now - 1, now)) for i in range(8)))
    t.step()
    assert len(sink.traces) == 8 and len(t.state.held) == 4
    log.rename(logdir / "proxy.jsonl.1")
    _gzip(logdir / "proxy.jsonl.1", logdir / "proxy.jsonl.1.gz")
    (logdir / "proxy.jsonl.1").unlink()
    log.write_text("".join(line(record(f"new-{i}", "success", now - 1, now)) for i in range(8)))
    t.step()
    t.shutdown()
    t.close()
    (logdir / "proxy.jsonl.1.gz").unlink()
    retries = [record(f"f-{i}", "success", now + 1, now + 2, 1) for i in range(4)]
    with log.open("a") as f:
        f.write("".join(line(r) for r in retries))
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    t.pipeline.clock = lambda: int((now + 3) * 1_000_000)
    t.step()
    t.close()
    calls = sink.calls()
    assert sorted(calls) == sorted([f"f-{i}" for i in range(4)] + [f"ok-{i}" for i in range(8)] + [f"new-{i}" for i in range(8)])
    assert all(len(calls[f"f-{i}"]["spans"]) == 3 and calls[f"f-{i}"]["state"] == "OK" for i in range(4))
    assert not (state_dir / "quarantine.jsonl").exists()


def test_a_copytruncate_regrown_past_the_checkpoint_before_a_shutdown_is_never_read_mid_line(tmp_path: Path) -> None:
    """Found by the model: the file is copied and truncated, then regrows past the old checkpoint
    before any scan; the shutdown's last read must not start at the old offset in the new lines."""
    now = 1_800_000_000.0
    logdir, state_dir, log, sink, t = daemon_at(tmp_path, now)
    log.write_text("".join(line(record(f"f-{i}", "failure", now - 1, now)) for i in range(2)))
    t.step()
    shutil.copyfile(log, logdir / "proxy.jsonl.1")
    with log.open("r+") as f:
        f.truncate(0)
    log.write_text("".join(line(record(f"new-{i}", "success", now - 1, now)) for i in range(4)))
    assert log.stat().st_size > t.follower.state.checkpoints[next(iter(t.follower.files))].offset
    t.shutdown()
    t.close()
    with log.open("a") as f:
        f.write("".join(line(record(f"f-{i}", "success", now + 1, now + 2, 1)) for i in range(2)))
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    t.pipeline.clock = lambda: int((now + SETTLE_S + 5) * 1_000_000)
    t.step()
    t.step()
    t.close()
    calls = sink.calls()
    assert sorted(calls) == ["f-0", "f-1", "new-0", "new-1", "new-2", "new-3"]
    assert all(len(calls[f"f-{i}"]["spans"]) == 3 and calls[f"f-{i}"]["state"] == "OK" for i in range(2))
    assert not (state_dir / "quarantine.jsonl").exists()


def test_an_outage_keeps_memory_flat_and_reads_nothing_again_until_mlflow_answers(tmp_path: Path) -> None:
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    log.write_text("".join(line(record(f"c-{i}", "success", 100.0 + i, 101.0 + i)) for i in range(50)))
    sink.up = False
    t.step()
    assert t.metrics.mlflow_up is False and t.metrics.down_since is not None
    read = t.pipeline.summary.records_read
    pending = t.pipeline.pending.height
    for _ in range(5):
        t.step()
    assert t.pipeline.summary.records_read == read, "the backlog was parsed again while MLflow was down"
    assert t.pipeline.pending.height == pending
    sink.up = True
    t.step()
    t.close()
    assert len(sink.traces) == 50 and t.metrics.mlflow_up
    assert pl.DataFrame({"c": list(sink.calls())})["c"].n_unique() == 50


@pytest.mark.parametrize("error", ["disk full", "polars panic"])
def test_a_pass_that_fails_for_another_reason_than_mlflow_is_retried_and_loses_and_doubles_nothing(tmp_path: Path, error: str) -> None:
    """A write that raises something unforeseen (a full disk under the nesting queue, a bug) mid-pass:
    the daemon neither stops nor skips what was in flight. It stopped the daemon. polars reports an
    internal failure (out of descriptors, a bug) as PanicException, a BaseException: it went past
    the daemon's ``except Exception``."""
    from polars.exceptions import PanicException

    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    (logdir / "proxy.jsonl").write_text("".join(line(record(f"c-{i}", "success", 100.0 + i, 101.0 + i)) for i in range(30)))
    write = sink.write

    def broken(traces: list) -> int:
        sink.write = write  # type: ignore[method-assign]
        raise OSError(28, "No space left on device") if error == "disk full" else PanicException("Too many open files")

    sink.write = broken  # type: ignore[method-assign]
    t.step()
    assert t.metrics.errors == 1 and not sink.traces
    t.step()
    t.close()
    assert sorted(sink.calls()) == sorted(f"c-{i}" for i in range(30)) and t.metrics.errors == 1
    assert sink.writes == 1, "written once, after the failed pass"


def test_checkpoint_dataclass_round_trips(tmp_path: Path) -> None:
    ck = Checkpoint("sha256:ab", "/x", 10, 2, 10, None, False, "t")
    assert Checkpoint.from_dict(ck.as_dict()) == ck


def _noisy_lines(n: int) -> str:
    """Lines that compress badly, so a cut gzip still holds whole lines at its start."""
    return "".join(line(record(f"g-{i}", "success", 100.0 + i, 101.0 + i) | {"noise": os.urandom(600).hex()}) for i in range(n))


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_a_compressed_copy_still_being_written_is_left_for_later_then_continues(tmp_path: Path, kind: str) -> None:
    log = tmp_path / "proxy.jsonl"
    log.write_text(_noisy_lines(8))
    follower = Follower(State(tmp_path / "s.json", "batch", {}), Pipeline(RecordingSink(), "1", QuarantineWriter(None)))  # type: ignore[arg-type]
    f = follower.follow(follower.identify(log))  # type: ignore[arg-type]
    for chunk in follower.chunks(f):
        follower.advance(f, chunk)
    follower.forget(f.key)
    whole = compressor(kind)(log.read_bytes())
    gz = tmp_path / ("proxy.jsonl.1" + SUFFIX[kind])
    gz.write_bytes(whole[: len(whole) * 3 // 4])
    assert follower.identify(gz) is None, "a half-written compressed copy was taken for another file"
    gz.write_bytes(whole)
    g = follower.follow(follower.identify(gz))  # type: ignore[arg-type]
    assert g.key == f.key
    assert [c for c in follower.chunks(g) if c.lines.height or c.quarantined] == [] and follower.is_done(g)
    g.close()


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_a_damaged_compressed_file_is_read_as_far_as_it_goes_and_never_raises(tmp_path: Path, kind: str, damage: str) -> None:
    """Cut short, or a byte changed: every line decompressed before the damage is found (at the
    latest by a checksum), the rest quarantined as unreadable once the file is quiet; never an
    exception out of the reader. A changed byte is found only some way past it (xz and gzip check a
    block or member whole at its end): the lines decompressed from it meanwhile are garbage, each
    quarantined where it fails (invalid UTF-8 here; malformed JSON at normalize) or blank."""
    n = 240
    gz = tmp_path / ("old.jsonl" + SUFFIX[kind])
    whole = bytearray(compressor(kind)(_noisy_lines(n).encode()))
    if damage == "corrupt":
        whole[len(whole) * 3 // 4] ^= 0x55
    gz.write_bytes(whole[: len(whole) * 3 // 4] if damage == "truncated" else whole)
    os.utime(gz, (time.time() - 600, time.time() - 600))
    follower = Follower(State(tmp_path / "s.json", "batch", {}), Pipeline(RecordingSink(), "1", QuarantineWriter(None)))  # type: ignore[arg-type]
    f = follower.follow(follower.identify(gz))  # type: ignore[arg-type]
    chunks = list(follower.chunks(f))
    got = [i for c in chunks for i in c.lines["line_no"].to_list()]
    quarantined = [(q.line, q.reason) for c in chunks for q in c.quarantined]
    assert quarantined and quarantined[-1][1] == "unreadable", quarantined
    first_bad = quarantined[0][0]
    assert first_bad > 1 and got[: first_bad - 1] == list(range(1, first_bad)), "every line before the damage is read"
    numbers = got + [line for line, _ in quarantined]
    assert len(numbers) == len(set(numbers)) and max(numbers) == quarantined[-1][0], "none twice, the unreadable rest last"
    assert damage == "corrupt" or (len(quarantined) == 1 and len(got) < n), "a cut file's lines are whole up to the cut"
    f.close()


_ARCHIVES: dict[str, bytes] = {}
"""One compressed log per kind, made once for the fuzz below (compressing is most of its time)."""


@pytest.mark.parametrize("kind", COMPRESSIONS)
@settings(max_examples=40 * max(SOAK, 1), deadline=None, derandomize=not SOAK, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_damage_to_a_compressed_file_raises_loses_a_line_before_it_or_reads_one_twice(kind: str, data: st.DataObject) -> None:
    """Any bytes changed or cut anywhere in a compressed log (its header, a block's middle, a checksum,
    the end): the reader never raises; it reads every line before the damage, none twice, and the
    rest is one ``unreadable`` line, last (followed, or read whole by a run without a state); a file
    damaged before its first line is no file yet to the follower, and one
    whose magic bytes are gone is read as text (its lines quarantined as ``invalid_utf8``)."""
    import tempfile

    n = 60
    whole = _ARCHIVES.setdefault(kind, compressor(kind)(_noisy_lines(n).encode()))
    damaged = bytearray(whole)
    for _ in range(data.draw(st.integers(1, 3), label="bytes changed")):
        at = data.draw(st.integers(0, len(damaged) - 1), label="at")
        damaged[at] ^= data.draw(st.integers(1, 255), label="xor")
    cut = data.draw(st.one_of(st.none(), st.integers(1, len(damaged))), label="cut at")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("old.jsonl" + SUFFIX[kind])
        path.write_bytes(bytes(damaged[:cut]))
        os.utime(path, (time.time() - 600, time.time() - 600))
        follower = Follower(State(Path(tmp) / "s.json", "batch", {}), Pipeline(RecordingSink(), "1", QuarantineWriter(None)))  # type: ignore[arg-type]
        whole_read = list(file_chunks(path))  # batch --no-state, reconcile
        found = follower.identify(path)
        if found is None:
            return
        f = follower.follow(found)
        chunks = list(follower.chunks(f))
        f.close()
    got = [i for c in chunks for i in c.lines["line_no"].to_list()]
    quarantined = [(q.line, q.reason) for c in chunks for q in c.quarantined]
    assert [i for c in whole_read for i in c.lines["line_no"].to_list()] == got, "a run without a state reads the same"
    assert [(q.line, q.reason) for c in whole_read for q in c.quarantined] == quarantined
    numbers = got + [line for line, _ in quarantined]
    assert len(numbers) == len(set(numbers)), "no line twice"
    first_bad = quarantined[0][0] if quarantined else n + 1
    assert got[: first_bad - 1] == list(range(1, min(first_bad, len(got) + 1))), "every line before the damage is read, in order"
    unreadable = [q for q in quarantined if q[1] == "unreadable"]
    assert unreadable[:-1] == [] and (not unreadable or (unreadable[-1] == quarantined[-1] and max(numbers) == unreadable[-1][0]))


def test_a_damaged_gzip_is_said_once_and_read_again_only_once_it_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A truncated archive was decompressed again, and warned about, on every pass (once a second)."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    calls = [record(f"gz-{i}", "success", 1_700_000_000 + i, 1_700_000_000.5 + i) | {"noise": os.urandom(600).hex()} for i in range(12)]
    whole = gzip.compress("".join(line(r) for r in calls).encode())
    gz = logdir / "old.jsonl.gz"
    gz.write_bytes(whole[: len(whole) // 2])
    sink = RecordingSink()
    t = tailer(logdir, tmp_path / "state", sink, settle_s=0.0)
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            t.step()
    assert caplog.text.count("cannot be read past byte") == 1, caplog.text
    assert 0 < len(sink.calls()) < len(calls)
    with gz.open("r+b") as f:
        f.write(whole)
    t.step()
    assert sorted(sink.calls()) == sorted(r["litellm_call_id"] for r in calls)
    t.close()


def test_one_file_under_two_names_is_no_rotation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A symlink or a hard link beside the log gave it two names, and every scan logged a rotation
    from one to the other and back."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    log.write_text(line(record("two-0", "success", 1_700_000_000, 1_700_000_001)))
    (logdir / "alias.jsonl").symlink_to(log)
    os.link(log, logdir / "hard.jsonl")
    sink = RecordingSink()
    t = tailer(logdir, tmp_path / "state", sink, settle_s=0.0)
    with caplog.at_level(logging.INFO):
        for i in range(1, 5):
            with log.open("a") as f:
                f.write(line(record(f"two-{i}", "success", 1_700_000_000 + i, 1_700_000_001 + i)))
            t.step()
    assert "rotated:" not in caplog.text
    assert sorted(sink.calls()) == [f"two-{i}" for i in range(5)]
    t.close()


def test_a_log_truncated_in_place_is_said_so_not_called_rotated_away(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A log emptied in place (``: > proxy.jsonl``) and written again was said to be truncated, then
    also "rotated away or deleted; reading it to its end": it is neither, and has no end left."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    log.write_text("".join(line(record(f"cut-{i}", "success", 1_700_000_000 + i, 1_700_000_001 + i)) for i in range(3)))
    sink = RecordingSink()
    t = tailer(logdir, tmp_path / "state", sink, settle_s=0.0)
    with caplog.at_level(logging.INFO):
        t.step()
        log.write_text(line(record("cut-3", "success", 1_700_000_003, 1_700_000_004)))
        t.step()
        t.step()
    assert caplog.text.count("was truncated or rewritten in place") == 1, caplog.text
    assert "rotated away or deleted" not in caplog.text, caplog.text
    assert sorted(sink.calls()) == [f"cut-{i}" for i in range(4)]
    t.close()


def test_a_second_daemon_on_one_state_is_refused_before_it_says_it_follows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A second daemon given the same state dir logged "following …" and then stopped (exit 5),
    which read as if two were running."""
    from ingest.checkpoints import LockedError

    logdir = tmp_path / "logs"
    logdir.mkdir()
    first = tailer(logdir, tmp_path / "state", RecordingSink(), settle_s=0.0)
    second = tailer(logdir, tmp_path / "state", RecordingSink(), settle_s=0.0)
    with first.state.locked(), caplog.at_level(logging.INFO), pytest.raises(LockedError, match="another run holds the lock"):
        second.run()
    assert "following" not in caplog.text, caplog.text
    first.close()


class SlowSink(RecordingSink):
    """A sink whose writes take ``slow_s`` and succeed, telling the daemon how long it has waited
    (``waiting``) as the real sinks do while a call is under way."""

    def __init__(self, slow_s: float) -> None:
        super().__init__()
        self.slow_s = slow_s
        self.waiting: Any = None
        self.deadline_s = 60.0

    def write(self, traces: list[Any]) -> int:
        started = time.monotonic()
        while (waited := time.monotonic() - started) < self.slow_s:
            time.sleep(0.25)
            if self.waiting is not None:
                self.waiting(waited + 0.25)
        return super().write(traces)


def test_a_slow_write_that_succeeds_copies_no_file_and_opens_no_finished_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The files are held while one call hangs (a SQLite lock, a silent server), and that scan ran
    for any write slower than a rescan: at a restart, before the finished files were parked, it
    opened every one of them (each then said "rotated away or deleted"); and a log deleted under a
    slow, healthy write was copied into the state dir as in an outage."""
    logdir, state = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    for i in range(4):
        (logdir / f"done-{i}.jsonl").write_text(line(record(f"done-{i}", "success", 1_700_000_000 + i, 1_700_000_001 + i)))
    first = tailer(logdir, state, RecordingSink(), settle_s=0.0)
    first.step()
    first.stop()
    first.shutdown()
    first.close()
    log = logdir / "proxy.jsonl"
    log.write_text(line(record("late-0", "success", 1_700_000_010, 1_700_000_011)))
    sink = SlowSink(slow_s=1.6)
    second = tailer(logdir, state, sink, settle_s=0.0)
    held = line(record("held-0", "success", 1_700_000_005, 1_700_000_006)).strip()
    second.state.held = [{"file": "f", "source": str(log), "line": 1, "offset": 0, "raw": held}]
    with caplog.at_level(logging.INFO):
        second.step()  # the restart's first pass: the held line is written (slowly) before any file is read
        assert "held-0" in sink.calls()
        opened = sorted(f.path.name for f in second.follower.files.values())
        assert not any(name.startswith("done-") for name in opened), opened
        with log.open("a") as f:
            f.write(line(record("late-1", "success", 1_700_000_012, 1_700_000_013)))
        sink.slow_s, unlink = 1.6, log.unlink
        real_write = sink.write

        def write_then_rotate(traces: list[Any]) -> int:
            if log.exists():  # a line logged, then logrotate's ``rotate 0``, while the healthy write is under way
                with log.open("a") as f:
                    f.write(line(record("late-2", "success", 1_700_000_014, 1_700_000_015)))
                unlink()
            return real_write(traces)

        sink.write = write_then_rotate  # type: ignore[method-assign]
        second.step()
        second.step()
    assert not [said for said in caplog.text.splitlines() if "rotated away" in said and "done-" in said], caplog.text
    assert second.metrics.mlflow_up and "kept a copy" not in caplog.text, "no outage: no copy"
    assert {"late-0", "late-1", "late-2"} <= set(sink.calls()), "the deleted file read to its end through its descriptor"
    second.close()


def test_a_file_gone_between_the_listing_and_the_open_is_not_called_unreadable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    gone = logdir / "proxy.jsonl.1"
    gone.write_text(line(record("gone-0", "success", 1_700_000_000, 1_700_000_001)))
    t = tailer(logdir, tmp_path / "state", RecordingSink(), settle_s=0.0)
    listed = t._candidates()
    gone.rename(logdir / "proxy.jsonl.2")
    monkeypatch.setattr(t, "_candidates", lambda: listed)
    with caplog.at_level(logging.WARNING):
        t.step()
    assert "permission denied" not in caplog.text
    t.close()


def test_a_daemon_restarted_on_a_store_made_anew_sends_every_line_again(tmp_path: Path) -> None:
    """The daemon's state is the batch state of its destination: a new store at the same address
    (same experiment id, a later creation time) must get the lines the old one had."""
    now = 1_800_000_000.0
    logdir, state_dir, log, sink, t = daemon_at(tmp_path, now)
    t.target = replace(t.target, created_ms=1_700_000_000_000)
    log.write_text("".join(line(record(f"ok-{i}", "success", now - 1, now)) for i in range(5)))
    t.step()
    t.shutdown()
    t.close()
    assert len(sink.traces) == 5

    for created, sent in ((1_700_000_000_000, 0), (1_700_000_500_000, 5)):
        fresh = RecordingSink()
        t = tailer(logdir, state_dir, fresh, SETTLE_S)
        t.target = replace(t.target, created_ms=created)
        t.pipeline.clock = lambda: int(now * 1_000_000)
        t.step()
        t.shutdown()
        t.close()
        assert len(fresh.traces) == sent, (created, fresh.calls())


def test_a_daemon_started_after_a_rotation_reads_the_rotated_file_first(tmp_path: Path) -> None:
    """Down while the proxy rotated between a call's failed attempt and its fallback: at start the
    daemon finds ``proxy.jsonl`` (newest, the fallback) and ``proxy.jsonl.1`` (the failed attempt).
    Read by name, the fallback's trace would be written first and its span replaced by the failed attempt's."""
    now = 1_800_000_000.0
    logdir, state_dir, log, sink, t = daemon_at(tmp_path, now)
    t.close()
    t = tailer(logdir, state_dir, sink, SETTLE_S, max_buffer_bytes=1)  # a backlog: one file per pass
    t.pipeline.clock = lambda: int(now * 1_000_000)
    rotated = logdir / "proxy.jsonl.1"
    rotated.write_text(line(record("c-0", "success", now - 30, now - 29)) + line(record("c-1", "failure", now - 20, now - 19, 0)))
    log.write_text(line(record("c-1", "success", now - 18, now - 17, 1)) + line(record("c-2", "success", now - 10, now - 9)))
    os.utime(rotated, (now - 19, now - 19))
    os.utime(log, (now - 9, now - 9))
    t.step()
    t.step()
    t.shutdown()
    t.close()
    calls = sink.calls()
    assert sorted(calls) == ["c-0", "c-1", "c-2"]
    assert len(calls["c-1"]["spans"]) == 3 and calls["c-1"]["state"] == "OK", calls["c-1"]


def test_an_earlier_attempt_read_after_its_call_was_written_joins_the_call(tmp_path: Path) -> None:
    """The fallback was read and written; its failed primary turns up a pass later (its file found
    one directory scan late, while the proxy rotated). The sink joins it to the spans it holds of
    the call: root and both attempts, the state of its outcome, nothing deleted (a kill between a
    delete and the write would have lost the fallback). A copy of an attempt already written
    changes nothing."""
    now = 1_800_000_000.0
    logdir, _, log, sink, t = daemon_at(tmp_path, now)
    log.write_text(line(record("c-1", "success", now - 18, now - 17, 1)) + line(record("c-2", "success", now - 10, now - 9)))
    t.step()
    assert {c: len(r["spans"]) for c, r in sink.calls().items()} == {"c-1": 1, "c-2": 1}
    (logdir / "proxy.jsonl.1").write_text(line(record("c-1", "failure", now - 20, now - 19, 0)))
    (logdir / "copy.jsonl").write_text(line(record("c-2", "success", now - 10, now - 9)))
    t.step()
    t.shutdown()
    t.close()
    calls = sink.calls()
    assert len(calls["c-1"]["spans"]) == 3 and calls["c-1"]["state"] == "OK", calls["c-1"]
    assert len(calls["c-2"]["spans"]) == 1
    assert t.pipeline.summary.traces_rewritten == 0, "nothing was deleted"
    assert t.pipeline.summary.calls_joined == t.metrics.calls_joined == 1


def test_a_daemon_over_more_files_than_it_keeps_open_reads_each_once_and_still_follows_the_closed_ones(tmp_path: Path) -> None:
    """A directory of one file per call (a synced bucket, a per-call logger): the daemon held a
    descriptor per file and died at the process's limit (1,024 by default). Now at most
    ``--max-open-files`` are open; a file read to its end is closed and opened again when it changes,
    renamed or not, and a restart reads nothing twice."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    for i in range(40):
        path = logdir / f"call-{i:02d}.jsonl"
        path.write_text(line(record(f"c-{i}", "success", 100.0 + i, 101.0 + i)))
        os.utime(path, (1_000 + i, 1_000 + i))
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S, max_open_files=8)
    opened = []
    for _ in range(20):
        t.step()
        opened.append(len(t.follower.files))
        if len(sink.traces) == 40 and not t._more:
            break
    assert max(opened) <= 8, opened
    assert sorted(sink.calls()) == sorted(f"c-{i}" for i in range(40)) and sink.writes <= 40 // 8 + 2
    assert len(t.follower.files) + len(t.follower.parked) == 40 and t.metrics.files == 40

    with (logdir / "call-03.jsonl").open("a") as f:
        f.write(line(record("c-late-3", "success", 200.0, 201.0)))
    renamed = (logdir / "call-05.jsonl").rename(logdir / "call-05.jsonl.1")
    t.step()
    with renamed.open("a") as f:
        f.write(line(record("c-late-5", "success", 202.0, 203.0)))
    (logdir / "call-07.jsonl").unlink()
    t.step()
    assert {"c-late-3", "c-late-5"} <= set(sink.calls()) and len(sink.traces) == 42
    assert len(t.follower.files) == 2 and len(t.follower.parked) == 37, "the deleted file is forgotten"
    t.shutdown()
    t.close()

    again = RecordingSink()
    t2 = tailer(logdir, state_dir, again, SETTLE_S, max_open_files=8)
    opened: list[str] = []
    real_identify = t2.follower.identify
    t2.follower.identify = lambda path: (opened.append(path.name), real_identify(path))[1]  # type: ignore[method-assign]
    for _ in range(10):
        t2.step()
    assert not again.traces, "a restart reads nothing twice"
    assert opened == [] and len(t2.follower.parked) == 39, "nor opens a file unchanged since it was read"
    with (logdir / "call-09.jsonl").open("a") as f:
        f.write(line(record("c-after-restart", "success", 300.0, 301.0)))
    t2.step()
    t2.close()
    assert opened == ["call-09.jsonl"] and sorted(again.calls()) == ["c-after-restart"]


def test_a_daemon_refused_inotify_follows_the_files_by_rescanning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify's per-user instance limit (128) is often reached on a busy Kubernetes node; the
    daemon died at start with "inotify instance limit reached". Now it says so and finds changes
    by its rescan alone."""
    import errno
    import threading

    import ingest.tail as tail_module

    class Refused(tail_module.Observer):  # type: ignore[misc, valid-type]
        def start(self) -> None:
            raise OSError(errno.EMFILE, "inotify instance limit reached")

    monkeypatch.setattr(tail_module, "Observer", Refused)
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S, rescan_s=0.1, nest=False)  # its queue is opened in this thread, not the runner's
    runner = threading.Thread(target=t.run)
    runner.start()
    try:
        (logdir / "proxy.jsonl").write_text("".join(line(record(f"c-{i}", "success", 100.0 + i, 101.0 + i)) for i in range(3)))
        deadline = time.monotonic() + 20
        while len(sink.traces) < 3 and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        t.stop()
        runner.join(timeout=20)
    assert not runner.is_alive()
    assert sorted(sink.calls()) == ["c-0", "c-1", "c-2"]


def test_a_fifo_or_a_device_under_a_log_name_is_passed_over_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO blocks until something writes to it: the daemon hung there, every file with it."""
    import threading

    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    os.mkfifo(logdir / "pipe.jsonl")
    os.symlink("/dev/zero", logdir / "zero.jsonl")
    (logdir / "proxy.jsonl").write_text(line(record("c-0", "success", 100.0, 101.0)))
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    stepping = threading.Thread(target=t.step, daemon=True)
    stepping.start()
    stepping.join(timeout=20)
    if stepping.is_alive():
        with open(logdir / "pipe.jsonl", "wb"):
            pass
        stepping.join(timeout=20)
        pytest.fail("the pass waited on the FIFO")
    t.close()
    assert sorted(sink.calls()) == ["c-0"] and t.metrics.errors == 0


def test_a_daemon_follows_a_file_whose_name_is_not_utf8_and_serves_its_metrics(tmp_path: Path) -> None:
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    name = os.fsdecode(b"proxy-\xff.jsonl")
    (logdir / name).write_text(line(record("c-0", "success", 100.0, 101.0)) + "not json\n")
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    t.step()
    t.shutdown()
    t.close()
    assert sorted(sink.calls()) == ["c-0"] and t.metrics.errors == 0
    assert f'path="{logdir}/proxy-\ufffd.jsonl"' in t.metrics.exposition().encode().decode()
    (q,) = [json.loads(x) for x in (state_dir / "quarantine.jsonl").read_text().splitlines()]
    assert q["source"] == f"{logdir}/proxy-\ufffd.jsonl"


def test_a_quarantine_file_on_a_full_disk_does_not_hold_back_the_good_calls(tmp_path: Path, small_disk: Path) -> None:
    """The quarantine file sits in the state dir by default: with that disk full, one bad line made
    every pass fail, and no call reached MLflow until the disk was freed. Now the good calls are
    sent, the quarantine record waits in memory (``/health`` 503 "quarantine_unwritten") and is
    written, once and whole, when the disk has room again."""
    from tests.conftest import fill

    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    t.quarantine.path = small_disk / "quarantine.jsonl"
    filler = fill(small_disk)
    log = logdir / "proxy.jsonl"
    log.write_text(line(record("c-0", "success", 100.0, 101.0)) + "not json\n" + line(record("c-1", "success", 102.0, 103.0)))
    t.step()
    assert sorted(sink.calls()) == ["c-0", "c-1"] and t.metrics.errors == 0
    assert t.metrics.health() == (503, {**t.metrics.health()[1], "status": "quarantine_unwritten"})
    with log.open("a") as f:
        f.write("{broken\n" + line(record("c-2", "success", 104.0, 105.0)))
    t.step()
    assert sorted(sink.calls()) == ["c-0", "c-1", "c-2"] and t.metrics.quarantine_unwritten == 2
    filler.unlink()
    t.step()
    t.close()
    written = [json.loads(x) for x in (small_disk / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["reason"]) for q in written] == [(2, "malformed_json"), (4, "malformed_json")]
    assert t.metrics.quarantine_unwritten == 0 and t.metrics.health()[0] == 200


def test_a_daemon_over_per_call_files_keeps_in_memory_the_checkpoints_of_the_files_it_reads_not_of_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synced bucket of a per-call logger: a new file for every call. The daemon kept the checkpoint
    of every file it had seen for its whole life (about half a kilobyte each: 500 MB after a million
    calls). Settled ones are let go (read again from the files database if their file changes), and
    a restart reads nothing again."""
    monkeypatch.setattr(checkpoints, "SETTLE_ABOVE", 20)
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S, close_inactive_s=0.0)

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is Checkpoint and o.__dict__.get("_owner") is t.state.checkpoints)

    most = 0
    for n in range(30):
        for i in range(10):
            (logdir / f"call-{n:02d}-{i}.jsonl").write_text(line(record(f"c-{n}-{i}", "success", 100.0 + n, 101.0 + n)))
        t.step()
        most = max(most, live())
    assert len(t.state.checkpoints) == 300 and most <= 20, f"{most} checkpoints in memory for 10 files a pass"
    early = logdir / "call-00-0.jsonl"
    with early.open("a") as f:
        f.write(line(record("c-late", "success", 200.0, 201.0)))
    t.step()
    t.close()
    assert t.pipeline.summary.records_read == 301, "the grown file was read from its checkpoint, read again from the database"
    assert len(sink.traces) == 301 and set(sink.calls()) == {f"c-{n}-{i}" for n in range(30) for i in range(10)} | {"c-late"}
    again = tailer(logdir, state_dir, sink, SETTLE_S, close_inactive_s=0.0)
    again.step()
    again.close()
    assert len(sink.traces) == 301 and again.pipeline.summary.records_read == 0


def test_from_end_over_more_files_than_descriptors_reads_a_file_made_after_the_first_scan_whole(tmp_path: Path) -> None:
    """A first scan spread over several passes (more files than ``--max-open-files``) kept
    ``--from-end`` on for all of them, and applied it to a file made meanwhile (a new replica, a
    rotation's new file): its lines were skipped, for good."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    for i in range(12):
        (logdir / f"old-{i:02d}.jsonl").write_text(line(record(f"old-{i}", "success", 100.0 + i, 101.0 + i)))
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S, max_open_files=4, from_end=True)
    t.step()
    assert t._more, "the first scan takes several passes"
    (logdir / "new-replica.jsonl").write_text("".join(line(record(f"new-{i}", "success", 200.0 + i, 201.0 + i)) for i in range(3)))
    for _ in range(12):
        t.step()
    assert sorted(sink.calls()) == ["new-0", "new-1", "new-2"], "the old files start at their end, the new one is read whole"
    t.close()


def test_a_gzip_of_several_members_is_done_once_decompressed_to_its_end(tmp_path: Path) -> None:
    """A gzip's trailer holds the size of its last member only: an archive of several (a logger
    appending through ``gzip.open(path, "ab")``, ``cat a.gz b.gz``) was never taken as read to its end,
    so it was decompressed again every second and held a descriptor for good; enough of them filled
    ``--max-open-files`` and the live file behind them was never read."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    n = 0
    for i in range(3):
        archive = logdir / f"archive-{i}.jsonl.gz"
        for _ in range(2):
            with gzip.open(archive, "ab") as g:
                for _ in range(2):
                    g.write(line(record(f"gz-{n}", "success", 100.0 + n, 101.0 + n)).encode())
                    n += 1
        os.utime(archive, (1_000 + i, 1_000 + i))
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S, max_open_files=2, close_inactive_s=0.0)
    for _ in range(8):
        t.step()
    (logdir / "live.jsonl").write_text(line(record("live-0", "success", 300.0, 301.0)))
    for _ in range(8):
        t.step()
    assert sorted(sink.calls()) == sorted([f"gz-{k}" for k in range(n)] + ["live-0"])
    assert all(t.follower.read_to_end(f) for f in t.follower.files.values())
    assert len(t.follower.parked) >= 3, "the archives are closed, read to their end"
    t.shutdown()
    t.close()

    again = RecordingSink()
    t2 = tailer(logdir, state_dir, again, SETTLE_S, max_open_files=2)
    for _ in range(4):
        t2.step()
    assert not again.traces and not t2.follower.files, "a restart opens none of them"
    t2.close()


def test_files_that_start_with_a_blank_line_are_told_apart_by_their_first_record(tmp_path: Path) -> None:
    """Every generation of a log whose files start with a blank line had one fingerprint (the blank
    line's): after a rotation the new file was taken for the rotated one, still open, and not read."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    n = 0

    def write(k: int) -> None:
        nonlocal n
        with log.open("a") as f:
            if f.tell() == 0:
                f.write("\n")
            for _ in range(k):
                f.write(line(record(f"b-{n}", "success", 100.0 + n, 101.0 + n)))
                n += 1

    write(3)
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    t.step()
    for generation in range(1, 4):
        for k in range(generation, 0, -1):
            if (older := logdir / f"proxy.jsonl.{k}").exists():
                older.rename(logdir / f"proxy.jsonl.{k + 1}")
        log.rename(logdir / "proxy.jsonl.1")
        write(2)
        t.step()
        write(1)
        t.step()
    t.step()
    assert sorted(sink.calls()) == sorted(f"b-{k}" for k in range(n))
    t.close()


@pytest.mark.parametrize("kind", ["xz", "bzip2", "zstd"])
def test_a_rotated_file_compressed_otherwise_is_read_as_gzip_is(tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    """logrotate's ``compresscmd xz`` (or bzip2, zstd) made ``x.jsonl.1.xz``: it was named in a
    warning and never read (read as text, it had been a flood of invalid_utf8 quarantine lines).
    Now an archive is read, and a file rotated and compressed while the daemon was stopped is read
    on from its checkpoint inside the archive, nothing twice."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    archive = "".join(line(record(f"r-{i}", "success", 100.0 + i, 101.0 + i)) for i in range(20)).encode()
    (logdir / ("proxy.jsonl.2" + SUFFIX[kind])).write_bytes(compressor(kind)(archive))
    log = logdir / "proxy.jsonl"
    live = [line(record(f"live-{i}", "success", 200.0 + i, 201.0 + i)) for i in range(8)]
    log.write_text("".join(live[:5]))
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            t.step()
        t.shutdown()
        t.close()
        with log.open("a") as f:
            f.write("".join(live[5:]))
        _gzip_rotated(log, kind)
        log.write_text(line(record("new-0", "success", 300.0, 301.0)))
        t = tailer(logdir, state_dir, sink, SETTLE_S)
        for _ in range(3):
            t.step()
    assert t.pipeline.summary.records_read == 3 + 1, "the archive read on from its checkpoint, and the new file"
    assert sorted(sink.calls()) == sorted([f"r-{i}" for i in range(20)] + [f"live-{i}" for i in range(8)] + ["new-0"])
    assert t.quarantine.total == 0 and caplog.text == ""
    t.close()


def test_a_daemon_through_many_rotations_keeps_nothing_of_archives_deleted_long_ago(tmp_path: Path) -> None:
    """What the daemon knows of an archive it read whole (xz, bzip2 and zstd have no trailer that
    says so) goes when the archive does: through months of logrotate's ``rotate N`` it kept an
    entry per archive ever read."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    for n in range(12):
        log.write_text(line(record(f"c-{n}", "success", 100.0 + n, 101.0 + n)))
        t.step()
        archive = _gzip_rotated(log, "zstd").rename(logdir / f"proxy-{n:02d}.jsonl.zst")
        t.step()
        t.step()
        still_open = next((f for f in t.follower.files.values() if f.path == archive), None)
        parked = stat_key(archive.stat()) in t.follower.parked  # known whole at first sight: closed at once
        assert parked or (still_open is not None and t.follower.is_done(still_open)), "read whole"
        archive.unlink()
        t.step()
        t.step()
    assert sorted(sink.calls()) == sorted(f"c-{n}" for n in range(12))
    assert [f.path for f in t.follower.files.values()] in ([], [log]), "no archive deleted long ago is still followed"
    t.close()


def test_a_first_record_left_without_its_newline_keeps_the_file_known_when_the_next_writer_appends(tmp_path: Path) -> None:
    """A writer died between its record and the newline on a file's first line, and the next one
    appended its own: the first line became ``{A}{B}``, a new fingerprint, the file was taken as
    rewritten and read again from 0, and B was quarantined with A."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    log.write_text(json.dumps(record("u-0", "success", 100.0, 101.0)))
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    t.step()
    assert list(sink.calls()) == ["u-0"]
    with log.open("a") as f:
        f.write(line(record("u-1", "success", 102.0, 103.0)) + line(record("u-2", "success", 104.0, 105.0)))
    for _ in range(3):
        t.step()
    assert sorted(sink.calls()) == ["u-0", "u-1", "u-2"] and t.quarantine.total == 0
    t.close()


def test_a_state_that_knew_a_two_record_first_line_by_the_whole_line_keeps_its_place_in_the_file(tmp_path: Path) -> None:
    """Before a first line ``{A}{B}`` was known by its first record, a state knew the file by the
    whole line: read as a new file after the upgrade, it was read again from 0 and its bad first
    line quarantined a second time."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    joined = json.dumps(record("j-0", "success", 100.0, 101.0)) + line(record("j-1", "success", 102.0, 103.0))
    log.write_text(joined + line(record("j-2", "success", 104.0, 105.0)))
    t = tailer(logdir, state_dir, RecordingSink(), SETTLE_S)
    for _ in range(3):
        t.step()
    assert t.quarantine.total == 1
    t.close()
    (state,) = state_dir.glob("*.json")
    now = "sha256:" + hashlib.sha256(joined.encode().split(b"}{")[0] + b"}\n").hexdigest()[:32]
    before = "sha256:" + hashlib.sha256(joined.encode()).hexdigest()[:32]
    text = state.read_text()
    assert now in text
    state.write_text(text.replace(now, before))

    with log.open("a") as f:
        f.write(line(record("j-3", "success", 106.0, 107.0)))
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    for _ in range(3):
        t.step()
    assert list(sink.calls()) == ["j-3"] and t.quarantine.total == 0
    t.close()


def test_a_copy_still_being_made_by_copytruncate_is_left_for_later_then_continues(tmp_path: Path) -> None:
    """copytruncate copies the live log before it truncates it, and the copy grows from nothing: the
    daemon that saw it part-made (its first line known, shorter than its checkpoint) read it from 0,
    every line of it a second time."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    lines = [line(record(f"ct-{i}", "success", 1_700_000_000 + i, 1_700_000_000.5 + i)) for i in range(12)]
    log.write_text("".join(lines[:8]))
    sink = RecordingSink()
    t = tailer(logdir, tmp_path / "state", sink, settle_s=0.0)
    t.step()
    assert t.pipeline.summary.records_read == 8
    whole = log.read_bytes()
    copy = logdir / "proxy.jsonl.1"
    copy.write_bytes(whole[: len(whole) // 2])
    t.step()
    t.step()
    assert t.pipeline.summary.records_read == 8, "the part-made copy was read from its start"
    with log.open("a") as f:
        f.write("".join(lines[8:10]))
    copy.write_bytes(log.read_bytes())
    with log.open("r+") as f:
        f.truncate(0)
    log.write_text("".join(lines[10:]))
    for _ in range(3):
        t.step()
    assert sorted(sink.calls()) == sorted(f"ct-{i}" for i in range(12))
    assert t.pipeline.summary.records_read == 12, "a line was read twice"
    t.close()


def test_a_copytruncate_met_copy_first_reads_the_truncated_file_as_a_new_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The copy sorts first (older), and its copytruncate branch closed the original's descriptor; the
    scan then met the truncated original by its inode and read its first line through the closed
    descriptor: "a pass failed (OSError: [Errno 9] Bad file descriptor)" with a traceback, a pass lost
    (or, the number reused by another open, another file's first line read as its own)."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    lines = [line(record(f"cf-{i}", "success", 1_700_000_000 + i, 1_700_000_000.5 + i)) for i in range(7)]
    log.write_text("".join(lines[:2]))
    sink = RecordingSink()
    t = tailer(logdir, tmp_path / "state", sink, settle_s=0.0)
    t.step()
    copy = logdir / "proxy.jsonl.1"
    copy.write_bytes(log.read_bytes())
    os.utime(copy, (time.time() - 60, time.time() - 60))
    with log.open("r+") as f:
        f.truncate(0)
    log.write_text("".join(lines[2:]))  # longer than what was read: not told from the original by its size
    t.step()
    t.step()
    assert sorted(sink.calls()) == sorted(f"cf-{i}" for i in range(7)) and t.pipeline.summary.records_read == 7
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    t.close()


def test_a_shorter_file_with_a_known_first_line_is_its_own_once_it_stops_changing(tmp_path: Path) -> None:
    """The wait has an end: a file rewritten shorter (a re-delivery of part of a log) is read whole
    as its own once it has not changed for the partial timeout."""
    log = tmp_path / "proxy.jsonl"
    log.write_text("".join(LINES[:3]))
    pipe = Pipeline(RecordingSink(), "1", QuarantineWriter(None))  # type: ignore[arg-type]
    follower = Follower(State(tmp_path / "s.json", "batch", {}), pipe, partial_timeout_s=60.0)
    f = follower.follow(follower.identify(log))  # type: ignore[arg-type]
    for chunk in follower.chunks(f):
        follower.advance(f, chunk)
    follower.forget(f.key)
    part = tmp_path / "part.jsonl"
    part.write_text(LINES[0])
    assert follower.identify(part) is None
    os.utime(part, (time.time() - 61, time.time() - 61))
    g = follower.identify(part)
    assert g is not None and g.key.startswith(f.key + "@") and g.ck.offset == 0
    g.close()


def test_a_pipe_named_as_the_quarantine_file_holds_back_no_good_call(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A FIFO with no reader as ``--quarantine-file``: the first bad line blocked the daemon in
    ``open`` for good (no call ingested, SIGTERM unheard). The bad line's record is held back, as on
    a full disk, and the good calls go on; the daemon says at its start that the file cannot be
    written (a cron run stops there, exit 7)."""
    import threading

    logdir = tmp_path / "logs"
    logdir.mkdir()
    (logdir / "proxy.jsonl").write_text(
        '{"not json\n' + "".join(line(record(f"p-{i}", "success", 1e9 + i, 1e9 + i + 0.5)) for i in range(5))
    )
    state = tmp_path / "state"
    state.mkdir()
    os.mkfifo(state / "quarantine.jsonl")
    sink = RecordingSink()
    t = tailer(logdir, state, sink, settle_s=0.0)
    assert [r.message for r in caplog.records if "cannot write the quarantine file" in r.message] == [
        f"cannot write the quarantine file {state / 'quarantine.jsonl'}: a pipe or a socket is no quarantine file "
        "(--quarantine-file; default <state dir>/quarantine.jsonl); its records wait in memory until it can be"
    ]
    stepping = threading.Thread(target=t.step, daemon=True)
    stepping.start()
    stepping.join(30)
    assert not stepping.is_alive(), "the daemon waits for a reader of the pipe"
    assert sorted(sink.calls()) == [f"p-{i}" for i in range(5)]
    assert t.quarantine.failing is not None and len(t.quarantine.unwritten) == 1
    t.close()


def test_an_outage_is_timed_and_said_by_the_monotonic_clock_when_the_wall_clock_steps_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NTP step back of an hour mid-outage: timed by the wall clock, the minute's reminder was not
    said for an hour, and the daemon said MLflow was back after -3600s."""
    from ingest.sink import SinkError

    *_, t = daemon_at(tmp_path, 1_800_000_000.0)
    t.step()
    down = SinkError("connection refused", kind="unreachable")
    wall, mono = time.time, time.monotonic
    with caplog.at_level(logging.WARNING):
        t._outage(down)
        monkeypatch.setattr(time, "time", lambda: wall() - 3600)
        monkeypatch.setattr(time, "monotonic", lambda: mono() + 61)
        t._outage(down)
        t._up()
    t.close()
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("MLflow unavailable for 61s") for m in said), said
    assert any(m.startswith("MLflow is back after 61s") for m in said), said


def test_a_failed_call_waits_settle_by_the_monotonic_clock_when_the_wall_clock_steps_back(tmp_path: Path) -> None:
    """An NTP step back of 50 minutes while the proxy is quiet: timed by the wall clock, the failed
    call waited 50 minutes on top of --settle for a retry that never came."""
    now, mono = 1_800_000_000.0, [1000.0]
    *_, log, sink, t = daemon_at(tmp_path, now)
    t.pipeline.ticks = lambda: mono[0]
    log.write_text(line(record("f", "failure", now - 1, now)))
    t.step()
    t.pipeline.clock = lambda: int((now - 3000) * 1_000_000)
    mono[0] += SETTLE_S - 1
    t.step()
    assert not sink.traces
    mono[0] += 2
    t.step()
    t.close()
    assert sink.calls()["f"]["state"] == "ERROR" and len(sink.calls()["f"]["spans"]) == 1


def test_a_failed_call_ahead_of_a_clock_stepped_back_over_an_hour_is_still_held_for_its_retry(tmp_path: Path) -> None:
    """This machine's clock stepped back two hours: the proxy's calls end past the hour a call may be
    ahead, and were written at once (``end_in_future``), their retry joined only by a rewrite. They
    are held as any, --settle by the monotonic clock, and move no watermark."""
    now, mono = 1_800_000_000.0, [1000.0]
    *_, log, sink, t = daemon_at(tmp_path, now - 7200)
    t.pipeline.ticks = lambda: mono[0]
    log.write_text(line(record("f", "failure", now - 2, now - 1)) + line(record("g", "failure", now - 1, now)))
    t.step()
    assert not sink.traces
    mono[0] += 1
    with log.open("a") as f:
        f.write(line(record("f", "success", now, now + 1, 1)))
    t.step()
    assert sink.calls()["f"]["state"] == "OK" and len(sink.calls()["f"]["spans"]) == 3 and "g" not in sink.calls()
    mono[0] += SETTLE_S
    t.step()
    t.close()
    assert sink.calls()["g"]["state"] == "ERROR" and t.pipeline.summary.traces_rewritten == 0
    assert t.pipeline.warnings == {"end_in_future": 3}


@pytest.mark.parametrize("case", ["kept", "cannot_keep", "mlflow_up_at_stop"])
def test_a_stop_while_mlflow_is_down_keeps_a_copy_of_a_deleted_log(tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    """A rotation that keeps no copy deletes a log the daemon holds open while MLflow is down; a
    stop then took what was not sent of it along (only this process's descriptor held it), in
    silence ("what it did not acknowledge is saved for the next start"). The stop now copies it
    into the state dir, the next start reads the rest from there and deletes the copy; one that
    cannot be copied is said lost, by name. A stop once MLflow answers again sends it, keeps nothing."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    log.write_text(line(record("d-0", "success", 100.0, 101.0)))
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    t.step()
    sink.up = False
    with log.open("a") as f:
        f.write(line(record("d-1", "success", 102.0, 103.0)) + line(record("d-2", "success", 104.0, 105.0)))
    t.step()
    log.rename(logdir / "proxy.jsonl.1")
    (logdir / "proxy.jsonl.1").unlink()
    sink.up = case == "mlflow_up_at_stop"
    if case == "cannot_keep":
        (state_dir / "kept-logs").write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        t.shutdown()
    t.close()
    said = [r.getMessage() for r in caplog.records if "deleted by a rotation that kept no copy" in r.getMessage()]
    if case == "mlflow_up_at_stop":
        assert said == [] and sorted(sink.calls()) == ["d-0", "d-1", "d-2"]
        assert not (state_dir / "kept-logs").exists()
        return
    assert list(sink.calls()) == ["d-0"]
    assert len(said) == 1 and "1 log file(s)" in said[0] and "proxy.jsonl" in said[0], caplog.text
    if case == "cannot_keep":
        assert "is lost with this stop" in said[0]
        return
    assert "kept a copy" in said[0]
    (copy,) = (state_dir / "kept-logs").rglob("proxy.jsonl")
    assert copy.stat().st_mode & 0o777 == 0o600
    sink.up = True
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    for _ in range(3):
        t.step()
    assert sorted(sink.calls()) == ["d-0", "d-1", "d-2"], "the rest, once"
    assert not copy.exists(), "the copy goes once read"
    t.shutdown()
    t.close()
    t = tailer(logdir, state_dir, sink, SETTLE_S)
    t.step()
    t.close()
    assert sorted(sink.calls()) == ["d-0", "d-1", "d-2"] and t.pipeline.summary.records_read == 0


@pytest.mark.parametrize("case", ["mlflow_back", "stopped", "killed", "copy_not_deleted"])
def test_a_copytruncate_whose_copy_is_deleted_during_an_outage_loses_nothing(tmp_path: Path, case: str) -> None:
    """During an MLflow outage logrotate copies the log, truncates it and deletes the copy at once
    (``copytruncate`` with ``rotate 0``). The daemon, holding the original open, passed the copy
    over (a copy of a file it follows is read once the original is done), so the unsent lines
    lived only in the copy, and its deletion took them. The copy is now held open, unread, from the
    outage's scans: read once MLflow is back, or kept in the state dir for the next start."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    log, copy = logdir / "proxy.jsonl", logdir / "proxy.jsonl.1"
    log.write_text(line(record("c-0", "success", 100.0, 101.0)))
    sink = RecordingSink()
    written: list[str] = []
    write = sink.write

    def counted(traces: list) -> int:
        n = write(traces)
        written.extend(t.call_key for t in traces)
        return n

    sink.write = counted  # type: ignore[method-assign]
    t = tailer(logdir, state_dir, sink, SETTLE_S, rescan_s=0.05)
    t.step()
    sink.up = False
    with log.open("a") as f:
        f.write(line(record("c-1", "success", 102.0, 103.0)) + line(record("c-2", "success", 104.0, 105.0)))
    t.step()
    shutil.copyfile(log, copy)
    with log.open("r+") as f:
        f.truncate(0)
    t._hold_files_until(time.monotonic() + 0.2)
    if case != "copy_not_deleted":
        copy.unlink()
    log.write_text(line(record("c-3", "success", 106.0, 107.0)))
    t._hold_files_until(time.monotonic() + 0.2)
    kept = list((state_dir / "kept-logs").rglob("proxy.jsonl.1"))
    assert len(kept) == (0 if case == "copy_not_deleted" else 1), "a deleted copy is kept during the outage, as a deleted log is"
    if case == "stopped":
        t.shutdown()
    if case in ("stopped", "killed"):
        t.close()
        sink.up = True
        t = tailer(logdir, state_dir, sink, SETTLE_S)
    sink.up = True
    for _ in range(3):
        t.step()
    t.shutdown()
    t.close()
    assert sorted(written) == ["c-0", "c-1", "c-2", "c-3"], "every call once"
    assert not list((state_dir / "kept-logs").rglob("*.jsonl*")), "the kept copy goes once read"


@pytest.mark.parametrize("case", ["mlflow_up", "killed_during_an_outage", "kept_during_an_outage_then_read"])
def test_a_log_filled_and_deleted_between_two_scans_loses_nothing(tmp_path: Path, case: str) -> None:
    """The daemon saw the log empty (just made by ``create``), so it did not open it; the proxy then
    wrote calls and a rotation deleted the file (``rotate 0``) before the next scan: its lines were
    gone with it (found by the real-process soak). A file waiting for its first line is now held
    open: the next scan reads it through that descriptor, or, during an outage, it is kept in the
    state dir as any deleted log is, and the copy goes once the descriptor is read (it stayed until
    the next start)."""
    logdir, state_dir = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    log.touch()
    sink = RecordingSink()
    t = tailer(logdir, state_dir, sink, SETTLE_S, rescan_s=0.05)
    t.step()
    sink.up = case == "mlflow_up"
    log.write_text("".join(line(record(f"e-{i}", "success", 100.0 + i, 101.0 + i)) for i in range(3)))
    log.rename(logdir / "proxy.jsonl.1")
    (logdir / "proxy.jsonl.1").unlink()
    log.touch()
    if case == "kept_during_an_outage_then_read":
        t._hold_files_until(time.monotonic() + 0.2)
        assert len(list((state_dir / "kept-logs").rglob("proxy.jsonl"))) == 1, "kept during the outage"
        sink.up = True
    if case == "killed_during_an_outage":
        t.step()
        t._hold_files_until(time.monotonic() + 0.2)
        assert len(list((state_dir / "kept-logs").rglob("proxy.jsonl"))) == 1, "kept during the outage"
        t.close()
        sink.up = True
        t = tailer(logdir, state_dir, sink, SETTLE_S)
    for _ in range(3):
        t.step()
    t.shutdown()
    t.close()
    assert sorted(sink.calls()) == ["e-0", "e-1", "e-2"]
    assert not list((state_dir / "kept-logs").rglob("*.jsonl*")), "the kept copy goes once read"
