"""`backfill --shard I/N`: N runs (one per machine, each its own state dir) split one archive into
one MLflow; every file is read by exactly one of them and every call is written once, whole, also
when its attempts straddle files of two shards. Expected values come from the input records."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from ingest.checkpoints import all_states
from tests.conftest import all_traces, copies, past_shift, reidentify, write_log
from tests.test_backfill import calls_of, expected_spans, run

SHARDS = 3


def straddling_archive(logs: Path, capture: list[dict]) -> tuple[list[Path], list[dict], list[str]]:
    """7 files (one copy of the capture each, the first two gzip); a call across every boundary,
    its failed first attempt last in one file, its successful retry first in the next."""
    pair = next(recs for recs in calls_of(capture).values() if len(recs) == 2 and recs[0]["status"] != recs[1]["status"])
    fail0, ok0 = sorted(pair, key=lambda r: r["startTime"])
    per_file = copies(capture, 7, "shard")
    straddles = []
    for i in range(len(per_file) - 1):
        last_end = max(r["endTime"] for r in per_file[i])
        fail, ok = reidentify([fail0, ok0], last_end + 1 - fail0["startTime"], f"straddle-{i}")
        per_file[i].append(fail)
        per_file[i + 1].insert(0, ok)
        straddles.append(ok["litellm_call_id"])
    names = [f"proxy-{i}.jsonl" + (".gz" if i < 2 else "") for i in range(len(per_file))]
    files = [write_log(logs / n, recs) for n, recs in zip(names, per_file, strict=True)]
    return files, [r for recs in per_file for r in recs], straddles


def spans_by_call(uri: str) -> dict[str, int]:
    traces = all_traces(uri, "shard")
    ids = [t.info.tags["litellm.call_id"] for t in traces]
    assert len(ids) == len(set(ids)), "a call has two traces"
    return {t.info.tags["litellm.call_id"]: len(t.data.spans) for t in traces}


def test_shard_over_three_runs_covers_every_file_once_and_every_call_once(tmp_path: Path, capture: list[dict]) -> None:
    files, records, straddles = straddling_archive(tmp_path / "logs", capture)
    want = expected_spans(records)
    assert all(want[c] == 3 for c in straddles)
    sharded = f"sqlite:///{tmp_path / 'sharded.db'}"
    read_by: dict[str, list[int]] = defaultdict(list)
    totals = defaultdict(int)
    for i in range(1, SHARDS + 1):
        state = tmp_path / f"machine-{i}"
        p = run("backfill", str(tmp_path / "logs"), "--shard", f"{i}/{SHARDS}", "--tracking-uri", sharded, "--experiment-name", "shard",
                "--state-dir", str(state), "--json", cwd=tmp_path)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        s = json.loads(p.stdout)
        assert s["files"] + s["files_other_shards"] == len(files)
        for k in ("files", "records_read", "traces_written", "calls_other_shards"):
            totals[k] += s[k]
        for st in all_states(state):
            assert st["mode"] == "backfill"
            for ck in st["checkpoints"]:
                read_by[Path(ck["path"]).name].append(i)
    assert read_by == {f.name: read_by[f.name] for f in files} and all(len(v) == 1 for v in read_by.values()), read_by
    assert len({v[0] for v in read_by.values()}) > 1, "all files fell into one shard"
    owner = {f.name: read_by[f.name][0] for f in files}
    crossing = [c for i, c in enumerate(straddles) if owner[files[i].name] != owner[files[i + 1].name]]
    assert crossing, "no straddling call crosses two shards"
    assert totals == {"files": len(files), "records_read": len(records), "traces_written": len(want), "calls_other_shards": len(crossing)}

    got = spans_by_call(sharded)
    assert got == want, {c: (got.get(c), n) for c, n in want.items() if got.get(c) != n}

    # run again (a resumed backfill), a new file in the archive: each machine opens none of the
    # files it read (a gzip would be decompressed whole), and the new file is read by one of them
    new = write_log(tmp_path / "logs" / "proxy-7.jsonl", copies(capture, 1, "shard-again")[0])
    again = defaultdict(int)
    for i in range(1, SHARDS + 1):
        p = run("backfill", str(tmp_path / "logs"), "--shard", f"{i}/{SHARDS}", "--tracking-uri", sharded, "--experiment-name", "shard",
                "--state-dir", str(tmp_path / f"machine-{i}"), "--json", cwd=tmp_path)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        s = json.loads(p.stdout)
        assert s["files_unchanged"] == sum(o == i for o in owner.values()), s
        for k in ("files", "records_read", "files_unchanged", "calls_other_shards"):
            again[k] += s[k]
    assert again == {"files": len(files) + 1, "records_read": sum(1 for line in new.open() if line.strip()), "files_unchanged": len(files),
                     "calls_other_shards": 0}  # fmt: skip


@pytest.mark.parametrize("value", ["0/3", "4/3", "1/3x", "1/0", "abc"])
def test_bad_shard_is_a_usage_error(tmp_path: Path, value: str) -> None:
    from click.testing import CliRunner

    from ingest.cli import main

    result = CliRunner().invoke(main, ["backfill", str(write_log(tmp_path / "a.jsonl", [])), "--dry-run", "--shard", value])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--shard'" in result.output and isinstance(result.exception, SystemExit)


def test_shards_over_an_archive_that_grew_write_the_retry_that_starts_a_new_file(tmp_path: Path, capture: list[dict]) -> None:
    """Each file ends with a retried call's failure (written as failed: later calls follow it) whose
    retry starts the next file. The last file of one shard then gets a neighbour of another shard,
    starting with its retry. The first shard found its file unchanged and read nothing; the second
    read the retry, but the call is the first's (its earliest record): no shard wrote the retry, and
    the trace stayed failed. Now a shard whose file gets a new neighbour reads its end again."""
    import os
    import time

    from ingest.shard import Shard, file_fingerprint

    staged, logs, t0 = tmp_path / "staged", tmp_path / "logs", time.time() - 10_000
    for attempt in range(50):
        cs = copies(capture, 7, f"grow-{attempt}")
        parts = [cs[0] + cs[1][:27]] + [cs[j][27:] + cs[j + 1][:27] for j in range(1, 5)] + [cs[5][27:] + cs[6]]
        files = [write_log(staged / f"proxy-{j:03d}.jsonl", recs) for j, recs in enumerate(parts)]
        if Shard(1, 2).owns(file_fingerprint(files[4])) != Shard(1, 2).owns(file_fingerprint(files[5])):
            break
    logs.mkdir()
    uri = f"sqlite:///{tmp_path / 'sharded.db'}"

    def add(j: int) -> None:
        f = logs / files[j].name
        files[j].rename(f)
        os.utime(f, (t0 + j, t0 + j))

    def both_shards() -> None:
        for i in (1, 2):
            p = run("backfill", str(logs), "--shard", f"{i}/2", "--tracking-uri", uri, "--experiment-name", "shard",
                    "--state-dir", str(tmp_path / f"machine-{i}"), "--json", cwd=tmp_path)  # fmt: skip
            assert p.returncode == 0, p.stderr[-3000:]

    for j in range(5):
        add(j)
    both_shards()
    add(5)
    both_shards()
    assert spans_by_call(uri) == expected_spans([r for recs in parts for r in recs])


def test_a_shards_edges_are_settled_with_its_checkpoints_and_its_document_does_not_grow_with_the_archive(
    tmp_path: Path, capture: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which other shard's file follows each of a shard's files was a map in the state's document,
    rewritten at every save and growing with the archive (a state past ``SETTLE_ABOVE`` files keeps
    only its last moves there). It is in each file's checkpoint now, settled with it; a document of
    the older kind is read once and its map dropped. In process, with the threshold lowered."""
    import os
    import sqlite3
    import time

    from click.testing import CliRunner

    from ingest import checkpoints
    from ingest.cli import main
    from ingest.shard import Shard, file_fingerprint

    monkeypatch.setattr(checkpoints, "SETTLE_ABOVE", 3)
    logs, uri, t0 = tmp_path / "logs", f"sqlite:///{tmp_path / 'store.db'}", time.time() - 100_000
    one = [r for r in capture if sum(x["litellm_call_id"] == r["litellm_call_id"] for x in capture) == 1][:2]
    files: list[Path] = []
    records: list[dict] = []

    def grow(n: int) -> None:
        """Fixed content (fixed fingerprints, so a fixed split, checked below), a year and more ago."""
        for k in range(len(files), len(files) + n):
            recs = reidentify(one, -400 * 86400 + k * 600, f"edges-{k}")
            files.append(write_log(logs / f"proxy-{len(files):03d}.jsonl", recs))
            os.utime(files[-1], (t0 + len(files), t0 + len(files)))
            records.extend(recs)

    def shard_run(i: int) -> dict:
        args = ["backfill", str(logs), "--shard", f"{i}/2", "--tracking-uri", uri, "--experiment-name", "shard",
                "--state-dir", str(tmp_path / f"machine-{i}"), "--workers", "1"]  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, (result.output, result.exception)
        (doc,) = (tmp_path / f"machine-{i}").glob("backfill-*.json")
        return json.loads(doc.read_text())

    def settled_edges(i: int) -> dict[str, str]:
        (db,) = (tmp_path / f"machine-{i}").glob(f"backfill-*{checkpoints.FILES_DB_SUFFIX}")
        with sqlite3.connect(db) as con:
            docs = [json.loads(d) for (d,) in con.execute("SELECT doc FROM files")]
        return {d["path"]: d["edge"] for d in docs if "edge" in d}

    def expected_edges(i: int) -> dict[str, str]:
        fps = [file_fingerprint(f) for f in files]
        shard = Shard(i, 2)
        return {str(f.resolve()): fps[j + 1] for j, f in enumerate(files[:-1]) if shard.owns(fps[j]) and not shard.owns(fps[j + 1])}

    sizes = {}
    for n in (12, 36):
        grow(n - len(files))
        owned = [sum(Shard(i, 2).owns(file_fingerprint(f)) for f in files) for i in (1, 2)]
        assert min(owned) > 3, f"the fixed split gives each shard more files than the lowered threshold: {owned}"
        for i in (1, 2):
            shard_run(i)
            doc = shard_run(i)
            assert "shard_edges" not in doc["extra"] and len(doc["checkpoints"]) <= 3
            assert settled_edges(i) == expected_edges(i) != {}
            sizes[n, i] = len(json.dumps(doc))
    assert all(sizes[36, i] <= sizes[12, i] + 200 for i in (1, 2)), sizes
    assert spans_by_call(uri) == expected_spans(records)

    (doc_path,) = (tmp_path / "machine-1").glob("backfill-*.json")
    doc = json.loads(doc_path.read_text())
    doc["extra"]["shard_edges"] = {str(f.resolve()): "sha256:old" for f in files}
    doc_path.write_text(json.dumps(doc))
    assert "shard_edges" not in shard_run(1)["extra"]
    assert spans_by_call(uri) == expected_spans(records)


def test_a_retry_across_a_rotation_is_joined_when_another_replicas_file_sits_between_the_two(tmp_path: Path, capture: list[dict]) -> None:
    """Two replicas rotating at about the same time interleave their generations by age (a.1, b.1,
    a, b). A call whose failure ends ``a.jsonl.1`` and whose retry starts ``a.jsonl`` had only its
    failure written, ERROR, when ``a.jsonl.1`` fell in one shard and the rest in the other: its shard
    read the head of its neighbour by age (``b.jsonl.1``), not of the next file of its own log."""
    import os

    from ingest.shard import Shard, file_fingerprint

    cut = next(k for k in range(1, len(capture)) if capture[k - 1]["litellm_call_id"] == capture[k]["litellm_call_id"]
               and (capture[k - 1]["status"], capture[k]["status"]) == ("failure", "success"))  # fmt: skip
    logs = tmp_path / "logs"
    for attempt in range(64):
        a, b = (reidentify(capture, past_shift(capture, 10), f"{r}-{attempt}") for r in "ab")
        files = [write_log(logs / "a.jsonl.1", a[:cut]), write_log(logs / "b.jsonl.1", b[:cut]),
                 write_log(logs / "a.jsonl", a[cut:]), write_log(logs / "b.jsonl", b[cut:])]  # fmt: skip
        owners = [Shard(1, 2).owns(file_fingerprint(f) or "") for f in files]
        if owners[0] != owners[1] == owners[2] == owners[3]:
            break
    for age, f in enumerate(files):
        os.utime(f, (1_700_000_000 + age, 1_700_000_000 + age))
    uri = f"sqlite:///{tmp_path / 'sharded.db'}"
    for i in (1, 2) if owners[0] else (2, 1):  # the failure's shard first: the other's late join would mend it
        p = run("backfill", str(logs), "--shard", f"{i}/2", "--tracking-uri", uri, "--experiment-name", "shard",
                "--state-dir", str(tmp_path / f"machine-{i}"), "--json", cwd=tmp_path)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
    got = spans_by_call(uri)
    assert got[a[cut]["litellm_call_id"]] == 3, "the failure and its retry, under one root"
    assert got == expected_spans(a + b)


def test_a_shards_progress_counts_only_the_bytes_it_reads(tmp_path: Path, capture: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard 1 of 2 (and a resumed run with a new file) counted every file of the archive as to be
    read: the bar ended at a fraction of it, its ETA as many times too long. Each run's progress now
    ends at 100% of what it read."""
    import re

    from click.testing import CliRunner

    from ingest import cli
    from ingest.shard import Shard, file_fingerprint

    logs = tmp_path / "logs"
    owned: dict[bool, list[Path]] = {True: [], False: []}
    for i in range(64):  # the records' times follow today's date, and so do the files' shards
        f = write_log(tmp_path / "pool" / f"proxy-{i}.jsonl", copies(capture, 1, f"progress-{i}")[0])
        owned[Shard(1, 2).owns(file_fingerprint(f))].append(f)  # type: ignore[arg-type]
        if min(len(v) for v in owned.values()) >= 2:
            break
    logs.mkdir()
    for i, f in enumerate(owned[True][:2] + owned[False][:2]):
        f.rename(logs / f"proxy-{i}.jsonl")
    update = cli._Progress.update

    def every_time(self: cli._Progress, path: str, chunk: object, summary: object) -> None:
        self.last_line = 0.0  # a plain line at every update, not every 10 s
        update(self, path, chunk, summary)

    monkeypatch.setattr(cli._Progress, "update", every_time)
    uri = f"sqlite:///{tmp_path / 'store.db'}"

    def backfill() -> None:
        target = ["--tracking-uri", uri, "--experiment-name", "shard", "--state-dir", str(tmp_path / "st")]
        result = CliRunner().invoke(cli.main, ["backfill", str(logs), "--shard", "1/2", *target])
        assert result.exit_code == 0, result.output
        said = re.findall(r"^backfill: ([0-9.]+)% of ([0-9]+) bytes", result.output, re.M)
        assert said and said[-1][0] == "100.0", said

    backfill()
    new = next(
        f
        for n in range(50)
        if Shard(1, 2).owns(file_fingerprint(f := write_log(tmp_path / f"new-{n}.jsonl", copies(capture, 1, f"again-{n}")[0])))  # type: ignore[arg-type]
    )
    new.rename(logs / "proxy-9.jsonl")
    backfill()  # resumed: the files read before are not to read again
