"""Sources: finding log files, and reading them as chunks of lines with exact line numbers and offsets."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import polars as pl
import pytest

from ingest.lognames import is_log_file
from ingest.quarantine import QuarantineRecord
from ingest.sources import Chunk, SourceError, discover, read_chunks, split_lines
from tests.conftest import COMPRESSIONS, SUFFIX, compressor, write_jsonl

# --- helpers -------------------------------------------------------------------------------------


def varied_lines(n: int) -> list[bytes]:
    """Short JSON lines of different lengths (some with multi-byte UTF-8), so chunk cuts fall everywhere."""
    return [json.dumps({"i": i, "pad": "x" * (i * 7 % 53), "txt": "é€😀"[: i % 4]}, ensure_ascii=False).encode() for i in range(n)]


def expected_positions(lines: list[bytes], sep: bytes = b"\n", start_offset: int = 0, start_line: int = 1) -> list[tuple[int, int]]:
    """(line_no, offset) of each line, computed by summing lengths."""
    out, off = [], start_offset
    for i, line in enumerate(lines):
        out.append((start_line + i, off))
        off += len(line) + len(sep)
    return out


def read_all(path: Path, **kw) -> tuple[pl.DataFrame, list[QuarantineRecord], list[Chunk]]:
    chunks = list(read_chunks(path, **kw))
    frames = [c.lines for c in chunks]
    frame = pl.concat(frames) if frames else pl.DataFrame()
    quarantined = [q for c in chunks for q in c.quarantined]
    return frame, quarantined, chunks


def rows(frame: pl.DataFrame) -> list[dict]:
    return frame.to_dicts()


def assert_raw_at_offsets(frame: pl.DataFrame, data: bytes) -> None:
    """Each row's raw text is exactly the bytes at its offset, and the line starts at a line start."""
    for r in rows(frame):
        raw = r["raw"].encode()
        assert data[r["offset"] : r["offset"] + len(raw)] == raw, r
        assert r["offset"] == 0 or data[r["offset"] - 1 : r["offset"]] == b"\n", r


# --- is_log_file / discover ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a.jsonl",
        "a.ndjson",
        "a.log",
        "a.json",
        "a.jsonl.1",
        "a.jsonl.2.gz",
        "a.log-20260101",
        "a.jsonl.gz",
        "a.log.3",
        "a.ndjson.10.gz",
        "a.json.1.xz",
        "a.json.bz2",
        "a.json.2.zst",
    ],
)
def test_is_log_file_yes(name: str) -> None:
    assert is_log_file(name)


@pytest.mark.parametrize(
    "name", ["notes.txt", "a.csv", "make_samples.py", "README.md", "jsonl", "a.jsonlx", "a.tar.gz", "proxy.jsonl.lock", "a.jsonl.1.tmp"]
)
def test_is_log_file_no(name: str) -> None:
    assert not is_log_file(name)


def test_discover_single_file(tmp_path: Path) -> None:
    f = tmp_path / "proxy.jsonl"
    f.write_text("{}\n")
    assert discover([str(f)]) == [f]


def test_discover_explicit_file_taken_whatever_its_name(tmp_path: Path) -> None:
    f = tmp_path / "export.txt"
    f.write_text("{}\n")
    assert discover([str(f)]) == [f]


def make_tree(root: Path) -> tuple[list[Path], list[Path]]:
    logs = [
        root / "a.jsonl",
        root / "b.ndjson",
        root / "c.log",
        root / "d.json",
        root / "sub" / "x.jsonl.1",
        root / "sub" / "x.jsonl.2.gz",
        root / "sub" / "deeper" / "x.log-20260101",
    ]
    others = [root / "notes.txt", root / "sub" / "make.py", root / "sub" / "deeper" / "README.md"]
    for p in logs + others:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"{}\n")
    return logs, others


def test_discover_directory_recursive_log_names_only(tmp_path: Path) -> None:
    logs, others = make_tree(tmp_path / "logs")
    found = discover([str(tmp_path / "logs")])
    assert set(found) == set(logs)
    assert len(found) == len(logs)
    assert not set(found) & set(others)
    assert found == sorted(found, key=lambda f: (f.stat().st_mtime_ns, str(f))), "oldest first"


def test_discover_enters_a_symlinked_folder_once_and_loops_on_none(tmp_path: Path) -> None:
    """A folder linked into the log folder (a volume mounted elsewhere) was passed over without a
    word; entered now, each folder once however many links lead to it, a link to a parent looping
    on nothing."""
    logs, mounted = tmp_path / "logs", tmp_path / "mnt" / "pod-b"
    mounted.mkdir(parents=True)
    write_jsonl(mounted / "proxy.jsonl", [{"x": 1}])
    write_jsonl(logs / "proxy.jsonl", [{"x": 2}])
    (logs / "pod-b").symlink_to(mounted)
    (logs / "again").symlink_to(mounted)
    (logs / "loop").symlink_to(logs)
    found = discover([str(logs)])
    assert sorted(f.name for f in found) == ["proxy.jsonl", "proxy.jsonl"]
    assert {f.resolve() for f in found} == {(mounted / "proxy.jsonl").resolve(), (logs / "proxy.jsonl").resolve()}


def test_discover_reads_rotated_files_oldest_first_whatever_their_names(tmp_path: Path) -> None:
    """``x.jsonl`` is the newest and ``x.jsonl.10.gz`` sorts before ``x.jsonl.2.gz``: age decides."""
    names = ["x.jsonl.10.gz", "x.jsonl.2.gz", "x.jsonl.1", "x.jsonl"]
    for age, name in enumerate(names):
        f = tmp_path / "logs" / name
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"{}\n")
        os.utime(f, (1_700_000_000 + age, 1_700_000_000 + age))
    assert [f.name for f in discover([str(tmp_path / "logs")])] == names
    assert [f.name for f in discover([str(tmp_path / "logs" / n) for n in reversed(names)])] == names


def test_files_of_one_modification_time_are_read_in_rotation_order(tmp_path: Path) -> None:
    """Timestamps tick every few milliseconds: a rotation and the first write after it often share
    one. By name the live ``x.jsonl`` came first, and a fallback at its top was read before the
    failed primary that ends ``x.jsonl.1``."""
    from ingest.tail import Tailer

    names = ["x.jsonl.10.gz", "x.jsonl.3.zst", "x.jsonl.2.xz", "x.jsonl.1", "x.jsonl-20261201", "x.jsonl"]
    for name in reversed(names):
        f = tmp_path / "logs" / name
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"{}\n")
        os.utime(f, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert [f.name for f in discover([str(tmp_path / "logs")])] == names
    tail = Tailer.__new__(Tailer)  # its scan alone
    opts = type("O", (), {"pattern": "*.jsonl*", "own": lambda self: ()})()
    tail.dirs, tail.opts, tail._unlisted, tail._absent, tail.kept = [tmp_path / "logs"], opts, set(), set(), None
    assert [Path(p).name for p, _ in tail._candidates()] == names


@pytest.mark.parametrize(
    ("name", "stream", "live"),
    [
        ("x.jsonl.2.gz", "x.jsonl", False),
        ("x.jsonl-20261201", "x.jsonl", False),
        ("requests.log-20261207.gz", "requests.log", False),
        ("litellm-api.log-collector.internal.jsonl", "litellm-api.log-collector.internal.jsonl", True),
        ("litellm-web.log-1.jsonl", "litellm-web.log-1.jsonl", True),
        ("litellm-web.log-1.jsonl.3.gz", "litellm-web.log-1.jsonl", False),
        ("litellm-db.json-api.jsonl-20261201", "litellm-db.json-api.jsonl", False),
    ],
)
def test_a_host_name_in_a_files_name_is_no_rotation_suffix(name: str, stream: str, live: bool) -> None:
    """The logger's ``{host}`` puts a host name in the file's name; one holding ``.log-`` or ``.json-``
    (``api.log-collector``) made the live file a dated generation of another log (``litellm-api.log``)."""
    from ingest.lognames import rotation_rank, stream_of

    assert stream_of(name) == stream
    assert (rotation_rank(name) == (1, 0)) is live


def test_discover_is_deterministic_and_deduplicated(tmp_path: Path) -> None:
    logs, _ = make_tree(tmp_path / "logs")
    first = discover([str(tmp_path / "logs")])
    again = discover([str(tmp_path / "logs"), str(logs[0]), str(tmp_path / "logs" / "*.jsonl")])
    assert again == first


def test_discover_glob(tmp_path: Path) -> None:
    logs, _ = make_tree(tmp_path / "logs")
    found = discover([str(tmp_path / "logs" / "*.jsonl")])
    assert found == [tmp_path / "logs" / "a.jsonl"]
    rec = discover([str(tmp_path / "logs" / "**" / "x.*")])
    assert set(rec) == {p for p in logs if p.name.startswith("x.")}


def test_discover_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no-such"):
        discover([str(tmp_path / "no-such.jsonl")])


def test_discover_glob_without_match_raises(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(SourceError):
        discover([str(tmp_path / "*.ndjson")])


def test_discover_missing_among_good_raises(tmp_path: Path) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text("{}\n")
    with pytest.raises(SourceError):
        discover([str(good), str(tmp_path / "gone.jsonl")])


# --- read_chunks: positions ----------------------------------------------------------------------


def test_line_numbers_and_offsets_single_chunk(tmp_path: Path) -> None:
    lines = varied_lines(30)
    data = b"".join(line + b"\n" for line in lines)
    f = tmp_path / "a.jsonl"
    f.write_bytes(data)
    frame, q, chunks = read_all(f)
    assert q == []
    assert len(chunks) == 1
    assert frame.columns == ["source", "line_no", "offset", "raw", "truncated"]
    assert list(zip(frame["line_no"], frame["offset"], strict=True)) == expected_positions(lines)
    assert frame["raw"].to_list() == [line.decode() for line in lines]
    assert set(frame["source"]) == {str(f)}
    assert not frame["truncated"].any()
    assert_raw_at_offsets(frame, data)
    assert chunks[-1].end_offset == len(data)
    assert chunks[-1].end_line == len(lines) + 1


@pytest.mark.parametrize("chunk_bytes", [1, 7, 100, 333])
def test_line_numbers_and_offsets_across_chunks(tmp_path: Path, chunk_bytes: int) -> None:
    lines = varied_lines(60)
    data = b"".join(line + b"\n" for line in lines)
    f = tmp_path / "a.jsonl"
    f.write_bytes(data)
    frame, q, chunks = read_all(f, chunk_bytes=chunk_bytes)
    assert q == []
    assert len(chunks) > 1
    assert list(zip(frame["line_no"], frame["offset"], strict=True)) == expected_positions(lines)
    assert frame["raw"].to_list() == [line.decode() for line in lines]
    assert_raw_at_offsets(frame, data)
    # Each chunk's end is where the next chunk's first line starts.
    for a, b in itertools.pairwise(chunks):
        if b.lines.height:
            assert b.lines["offset"][0] == a.end_offset
            assert b.lines["line_no"][0] == a.end_line
    assert chunks[-1].end_offset == len(data)
    assert chunks[-1].end_line == len(lines) + 1


def test_real_records_across_chunks(tmp_path: Path, capture: list[dict]) -> None:
    lines = [json.dumps(r).encode() for r in capture]
    data = b"".join(line + b"\n" for line in lines)
    f = tmp_path / "proxy.jsonl"
    f.write_bytes(data)
    frame, q, chunks = read_all(f, chunk_bytes=100)
    assert q == []
    assert len(chunks) > 1
    assert list(zip(frame["line_no"], frame["offset"], strict=True)) == expected_positions(lines)
    assert [json.loads(r) for r in frame["raw"]] == capture
    assert_raw_at_offsets(frame, data)


def test_crlf_lines_lose_the_cr(tmp_path: Path) -> None:
    lines = varied_lines(25)
    data = b"".join(line + b"\r\n" for line in lines)
    f = tmp_path / "win.jsonl"
    f.write_bytes(data)
    frame, q, _ = read_all(f, chunk_bytes=100)
    assert q == []
    assert frame["raw"].to_list() == [line.decode() for line in lines]
    assert not any(r.endswith("\r") for r in frame["raw"])
    assert list(zip(frame["line_no"], frame["offset"], strict=True)) == expected_positions(lines, sep=b"\r\n")
    assert_raw_at_offsets(frame, data)


@pytest.mark.parametrize("n", [3, 200])  # a few lines and many: the two ways a line frame is built
def test_a_hole_before_a_line_is_not_part_of_it(tmp_path: Path, n: int) -> None:
    """NUL bytes where a file has a hole (a writer without O_APPEND after a copytruncate, a crash's
    zeroed tail): stripped from the line they precede; a line of nothing else is blank."""
    lines = varied_lines(n)
    holed = [b"\0" * 4096 + line if i % 2 else line for i, line in enumerate(lines)]
    data = b"".join(line + b"\n" for line in holed) + b"\0" * 100 + b"\n"
    f = tmp_path / "holed.jsonl"
    f.write_bytes(data)
    frame, q, _ = read_all(f)
    assert q == []
    assert frame["raw"].to_list() == [line.decode() for line in lines]
    assert frame["offset"].to_list() == [o for _, o in expected_positions(holed)]


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_compression_detected_by_content_not_name(tmp_path: Path, kind: str) -> None:
    lines = varied_lines(40)
    data = b"".join(line + b"\n" for line in lines)
    f = tmp_path / "proxy.jsonl.1"  # a rotated copy, compressed, without its suffix
    f.write_bytes(compressor(kind)(data))
    frame, q, chunks = read_all(f, chunk_bytes=100)
    assert q == []
    assert frame["raw"].to_list() == [line.decode() for line in lines]
    assert list(zip(frame["line_no"], frame["offset"], strict=True)) == expected_positions(lines)
    assert_raw_at_offsets(frame, data)  # offsets are in the uncompressed stream
    assert chunks[-1].end_offset == len(data)
    assert chunks[-1].disk_offset == f.stat().st_size, "progress counts compressed bytes"


def test_a_text_log_starting_like_bzip2s_magic_is_read_as_text(tmp_path: Path) -> None:
    """bzip2 is told by ``BZh`` and its block size digit, not by ``BZh`` alone: a text line starting
    so is quarantined as a line, not the whole file as a damaged archive."""
    lines = [b"BZh: proxy started", *varied_lines(3)]
    f = tmp_path / "proxy.log"
    f.write_bytes(b"".join(line + b"\n" for line in lines))
    frame, q, _ = read_all(f)
    assert q == []
    assert frame["raw"].to_list() == [line.decode() for line in lines]


def test_a_zstd_bomb_between_good_lines_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """A zstd block of 4 bytes stands for 128 KiB, and zstandard's decompressobj has no output
    bound: 8 KiB fed at once came out as up to 256 MiB. Fed in slices, 128 MiB of zeros is read a
    few MiB at a time, as one over-long line, the lines around it read."""
    import tracemalloc

    import zstandard

    before, after = varied_lines(3), varied_lines(2)
    c = zstandard.ZstdCompressor(level=1)
    f = tmp_path / "proxy.jsonl.1.zst"
    f.write_bytes(c.compress(b"".join(x + b"\n" for x in before)) + c.compress(b"\0" * (128 << 20) + b"\n")
                  + c.compress(b"".join(x + b"\n" for x in after)))  # fmt: skip
    assert f.stat().st_size < 64 << 10
    tracemalloc.start()
    try:
        frame, q, _ = read_all(f, chunk_bytes=1 << 20, max_line_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frame["raw"].to_list() == [x.decode() for x in before + after]
    assert [x.reason for x in q] == ["line_too_long"]
    assert peak < 64 << 20, f"peak {peak >> 20} MiB"


def test_plain_file_named_gz_read_as_plain(tmp_path: Path) -> None:
    lines = varied_lines(5)
    f = tmp_path / "odd.jsonl.gz"
    f.write_bytes(b"".join(line + b"\n" for line in lines))
    frame, q, _ = read_all(f)
    assert q == []
    assert frame["raw"].to_list() == [line.decode() for line in lines]


@pytest.mark.parametrize("kind", [None, *COMPRESSIONS])
@pytest.mark.parametrize("resume_at", [1, 17, 39])
def test_start_offset_resumes_mid_file(tmp_path: Path, kind: str | None, resume_at: int) -> None:
    lines = varied_lines(40)
    data = b"".join(line + b"\n" for line in lines)
    f = tmp_path / ("a.jsonl" + (SUFFIX[kind] if kind else ""))
    f.write_bytes(compressor(kind)(data) if kind else data)
    positions = expected_positions(lines)
    line_no, offset = positions[resume_at]
    frame, q, chunks = read_all(f, start_offset=offset, start_line=line_no, chunk_bytes=64)
    assert q == []
    assert frame["raw"].to_list() == [line.decode() for line in lines[resume_at:]]
    assert list(zip(frame["line_no"], frame["offset"], strict=True)) == positions[resume_at:]
    assert_raw_at_offsets(frame, data)
    assert chunks[-1].end_offset == len(data)
    assert chunks[-1].end_line == len(lines) + 1


def test_start_offset_at_end_reads_nothing(tmp_path: Path) -> None:
    lines = varied_lines(5)
    data = b"".join(line + b"\n" for line in lines)
    f = tmp_path / "a.jsonl"
    f.write_bytes(data)
    chunks = list(read_chunks(f, start_offset=len(data), start_line=len(lines) + 1))
    assert sum(c.lines.height for c in chunks) == 0
    assert all(c.quarantined == [] for c in chunks)


def test_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"")
    chunks = list(read_chunks(f))
    assert sum(c.lines.height for c in chunks) == 0


# --- read_chunks: an unterminated last line -------------------------------------------------------


def test_unterminated_last_line_final(tmp_path: Path) -> None:
    lines = varied_lines(12)
    data = b"".join(line + b"\n" for line in lines[:-1]) + lines[-1][:10]
    f = tmp_path / "a.jsonl"
    f.write_bytes(data)
    frame, q, chunks = read_all(f, chunk_bytes=100, final=True)
    assert q == []
    assert frame.height == len(lines)
    last = rows(frame)[-1]
    assert last["raw"] == lines[-1][:10].decode()
    assert last["truncated"] is True
    assert (last["line_no"], last["offset"]) == expected_positions(lines)[-1]
    assert not frame["truncated"][:-1].any()
    assert_raw_at_offsets(frame, data)
    assert chunks[-1].end_offset == len(data)
    assert chunks[-1].end_line == len(lines) + 1


def test_unterminated_last_line_held_back_when_not_final(tmp_path: Path) -> None:
    lines = varied_lines(12)
    data = b"".join(line + b"\n" for line in lines[:-1]) + lines[-1][:10]
    f = tmp_path / "a.jsonl"
    f.write_bytes(data)
    frame, q, chunks = read_all(f, chunk_bytes=100, final=False)
    assert q == []
    assert frame["raw"].to_list() == [line.decode() for line in lines[:-1]]
    assert not frame["truncated"].any()
    # The checkpoint names the start of the partial line, so the next read picks it up whole.
    line_no, offset = expected_positions(lines)[-1]
    assert chunks[-1].end_offset == offset
    assert chunks[-1].end_line == line_no
    # ... and once the writer finishes the line, reading from there yields it complete.
    f.write_bytes(data[:offset] + lines[-1] + b"\n")
    tail, q2, _ = read_all(f, start_offset=offset, start_line=line_no, final=False)
    assert q2 == []
    assert rows(tail) == [{"source": str(f), "line_no": line_no, "offset": offset, "raw": lines[-1].decode(), "truncated": False}]


# --- read_chunks: an over-long line ----------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [16, 64, 1000, 1 << 20])
def test_overlong_line_quarantined_neighbours_survive(tmp_path: Path, chunk_bytes: int) -> None:
    max_line = 80
    lines = [b'{"a": 1}', b'{"b": "' + b"y" * 300 + b'"}', b'{"c": 3}', b'{"d": "' + b"z" * 40 + b'"}']
    data = b"".join(line + b"\n" for line in lines)
    f = tmp_path / "a.jsonl"
    f.write_bytes(data)
    frame, q, chunks = read_all(f, chunk_bytes=chunk_bytes, max_line_bytes=max_line)
    positions = expected_positions(lines)
    assert len(q) == 1
    assert (q[0].source, q[0].line, q[0].offset, q[0].reason) == (str(f), positions[1][0], positions[1][1], "line_too_long")
    assert lines[1].decode().startswith(q[0].raw[:8])
    assert frame["raw"].to_list() == [lines[0].decode(), lines[2].decode(), lines[3].decode()]
    assert list(zip(frame["line_no"], frame["offset"], strict=True)) == [positions[0], positions[2], positions[3]]
    assert_raw_at_offsets(frame, data)
    assert chunks[-1].end_offset == len(data)
    assert chunks[-1].end_line == len(lines) + 1


@pytest.mark.parametrize("chunk_bytes", [16, 1 << 20])
def test_overlong_unterminated_last_line_quarantined(tmp_path: Path, chunk_bytes: int) -> None:
    lines = [b'{"a": 1}', b'{"b": "' + b"y" * 300]
    data = lines[0] + b"\n" + lines[1]
    f = tmp_path / "a.jsonl"
    f.write_bytes(data)
    frame, q, chunks = read_all(f, chunk_bytes=chunk_bytes, max_line_bytes=80)
    assert frame["raw"].to_list() == [lines[0].decode()]
    assert [(x.line, x.offset, x.reason) for x in q] == [(2, len(lines[0]) + 1, "line_too_long")]
    assert chunks[-1].end_offset == len(data)


# --- read_chunks / split_lines: invalid UTF-8 ------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [5, 100, 1 << 20])
def test_invalid_utf8_quarantined_good_lines_survive(tmp_path: Path, chunk_bytes: int) -> None:
    lines = [b'{"a": "caf\xc3\xa9"}', b'{"id": "latin1-\xe9t\xe9"}', b'{"b": 2}', b'{"c": "\xff\xfe"}', b'{"d": 4}']
    data = b"".join(line + b"\n" for line in lines)
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(data)
    frame, q, chunks = read_all(f, chunk_bytes=chunk_bytes)
    positions = expected_positions(lines)
    assert [(x.source, x.line, x.offset, x.reason) for x in q] == [
        (str(f), positions[1][0], positions[1][1], "invalid_utf8"),
        (str(f), positions[3][0], positions[3][1], "invalid_utf8"),
    ]
    good = frame.filter(pl.col("raw") != "")
    assert good["raw"].to_list() == [lines[i].decode() for i in (0, 2, 4)]
    assert list(zip(good["line_no"], good["offset"], strict=True)) == [positions[i] for i in (0, 2, 4)]
    assert_raw_at_offsets(good, data)
    assert chunks[-1].end_offset == len(data)
    assert chunks[-1].end_line == len(lines) + 1


def test_split_lines_positions_and_invalid_utf8() -> None:
    lines = [b'{"a": 1}', b"\xc3(", b'{"b": "\xe2\x82\xac"}', b'{"c": 3}\r']
    data = b"".join(line + b"\n" for line in lines)
    frame, bad = split_lines("some/file.jsonl", data, 1000, 50)
    positions = expected_positions(lines, start_offset=1000, start_line=50)
    assert [(x.source, x.line, x.offset, x.reason) for x in bad] == [("some/file.jsonl", 51, positions[1][1], "invalid_utf8")]
    assert bad[0].raw.startswith("\\xc3")
    good = frame.filter(pl.col("line_no") != 51)
    assert good["raw"].to_list() == ['{"a": 1}', '{"b": "€"}', '{"c": 3}']
    assert list(zip(good["line_no"], good["offset"], strict=True)) == [positions[i] for i in (0, 2, 3)]


def test_split_lines_clean() -> None:
    lines = varied_lines(10)
    data = b"".join(line + b"\n" for line in lines)
    frame, bad = split_lines("f", data, 7, 3)
    assert bad == []
    assert list(zip(frame["line_no"], frame["offset"], strict=True)) == expected_positions(lines, start_offset=7, start_line=3)
    assert frame["raw"].to_list() == [line.decode() for line in lines]
    assert frame.schema == pl.Schema(
        {"source": pl.String, "line_no": pl.Int64, "offset": pl.Int64, "raw": pl.String, "truncated": pl.Boolean}
    )


def test_a_utf16_file_is_quarantined_with_a_reason_that_names_utf16() -> None:
    """A Windows export (PowerShell writes UTF-16): split at its newline bytes, the first line fails
    UTF-8 and the rest are JSON with a NUL after every character; both say what the file is."""
    from ingest.normalize import explain_failure, utf16_hint
    from ingest.schemas import all_schemas

    records = ['{"id": "a", "call_type": "acompletion"}', '{"id": "b", "call_type": "acompletion"}']
    data = "\n".join(records).encode("utf-16") + "\n".encode("utf-16-le")
    frame, bad = split_lines("x.jsonl", data, 0, 1)
    assert [(r.line, r.reason) for r in bad] == [(1, "invalid_utf8")]
    assert "UTF-16" in bad[0].detail and "iconv" in bad[0].detail
    second = frame.filter(pl.col("line_no") == 2)["raw"][0]
    reason, detail = explain_failure(second, all_schemas()[-1].decode_dtype, False)
    assert reason.value == "malformed_json" and "UTF-16" in detail, detail

    assert utf16_hint(b"\xc3\x28 plain latin-1 damage") == ""
    assert utf16_hint('{"content": "a NUL\u0000 in a prompt"}') == ""
    _, plain = split_lines("y.jsonl", b'{"a": "caf\xe9"}\n', 0, 1)
    assert plain[0].detail == "invalid UTF-8 at byte 10"


@pytest.mark.parametrize(
    "data",
    [b"", b"\n", b'{"a":1}\n', b'{"a":1}\r\n\n  \n{"b":"caf\xc3\xa9"}\n', "x\u00e9y\r\r\n".encode() * 5, b"{}\n" * 64, b"{}\n" * 65],
)
def test_a_few_lines_make_the_same_frame_as_many(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small inputs (a per-call object) build their line frame from Python lists: exactly the frame
    the polars path builds, offsets, line numbers, CR stripping and blank lines included."""
    import ingest.sources as sources

    fast, fast_bad = split_lines("f.jsonl", data, 100, 7)
    monkeypatch.setattr(sources, "FEW_LINES", -1)
    slow, slow_bad = split_lines("f.jsonl", data, 100, 7)
    assert fast.schema == slow.schema and fast.equals(slow) and fast_bad == slow_bad == []
