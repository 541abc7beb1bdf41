"""Bucket listing, grouping, object decoding and the ledger, in process (an fsspec memory filesystem
stands in for the bucket; the real S3 and GCS servers are in test_buckets_e2e.py)."""

from __future__ import annotations

import gzip
import json
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import fsspec
import polars as pl
import pytest

from ingest.buckets import Bucket, _groups, days_window, is_bucket_url, object_chunks, small_objects_chunks
from ingest.ledger import Ledger, items_frame
from ingest.normalize import normalize_isolating
from ingest.sources import SourceError
from tests.buckets import BucketServer, _upload_gcs, s3_v2_key, server_env
from tests.conftest import COMPRESSIONS, compressor, read_capture, reidentify


def memory_bucket(files: dict[str, bytes]) -> Bucket:
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    for key, body in files.items():
        fs.pipe(f"/bk/{key}", body)
    b = Bucket.parse("s3://bk/logs/")
    b.fs = fs
    b.bucket = "/bk"
    return b


def listed(b: Bucket, lo: date | None = None, hi: date | None = None) -> list[str]:
    pages = (page for path, entries in b.partitions(lo, hi) for page in ([entries] if entries is not None else b.listing(path)))
    return sorted(k.split("/bk/logs/")[1] for page in pages for k in b.objects(page)["key"].to_list())


LAYOUT = {
    "logs/2026-11-01/a.json": b"{}",
    "logs/2026-11-02/b.json": b"{}",
    "logs/2026-11-05/00/c.json": b"{}",
    "logs/2026-11-05/13/d.json": b"{}",
    "logs/team-a/2026-11-03/e.json": b"{}",
    "logs/batch_2026-11-04_abc.jsonl": b"{}",
    "logs/batch_line_items/2026-11-03/job/part-00000.jsonl": b"{}",
    "other/2026-11-03/f.json": b"{}",
}


def test_urls_are_told_from_paths() -> None:
    assert is_bucket_url("s3://bucket/prefix/") and is_bucket_url("gs://b") and is_bucket_url("gcs://b/x")
    assert not is_bucket_url("/var/log/x.jsonl") and not is_bucket_url("logs/s3://x")
    b = Bucket.parse("gcs://my-bucket/litellm/logs/")
    assert (b.scheme, b.bucket, b.prefix, b.source) == ("gs", "my-bucket", "litellm/logs", "gs://my-bucket")
    with pytest.raises(SourceError):
        Bucket.parse("s3:/nope")


def test_every_object_under_the_prefix_is_listed_but_batch_line_items() -> None:
    b = memory_bucket(LAYOUT)
    assert listed(b) == [
        "2026-11-01/a.json",
        "2026-11-02/b.json",
        "2026-11-05/00/c.json",
        "2026-11-05/13/d.json",
        "batch_2026-11-04_abc.jsonl",
        "team-a/2026-11-03/e.json",
    ]


def test_a_window_lists_only_its_date_partitions_at_any_depth() -> None:
    b = memory_bucket(LAYOUT)
    listed_paths: list[str] = []
    real_find = b.fs.find

    def spy(path: str, **kw):  # type: ignore[no-untyped-def]
        listed_paths.append(path)
        return real_find(path, **kw)

    b.fs.find = spy
    assert listed(b, date(2026, 11, 2), date(2026, 11, 3)) == [
        "2026-11-02/b.json",
        "batch_2026-11-04_abc.jsonl",
        "team-a/2026-11-03/e.json",
    ]
    assert sorted(p.rsplit("/", 1)[1] for p in listed_paths) == ["2026-11-02", "2026-11-03"]
    assert listed(b, date(2026, 11, 5), None) == ["2026-11-05/00/c.json", "2026-11-05/13/d.json", "batch_2026-11-04_abc.jsonl"]


def test_a_folder_that_only_ends_in_a_date_is_walked_into_not_taken_for_a_partition() -> None:
    """LiteLLM's S3 logger puts team and key aliases in the key: a team named ``launch-2026-01-15``
    was a partition of that day, and once cron runs had moved past it its calls were never listed
    again. A folder named a date, or ``dt=`` one (Hive), is still a partition."""
    b = memory_bucket(
        {
            "logs/launch-2026-01-15/2026-11-03/g.json": b"{}",
            "logs/launch-2026-01-15/2026-10-01/old.json": b"{}",
            "logs/dt=2026-11-03/h.json": b"{}",
            "logs/dt=2026-10-01/i.json": b"{}",
            "logs/2026-11-03/j.json": b"{}",
        }
    )
    assert listed(b, date(2026, 11, 2), None) == ["2026-11-03/j.json", "dt=2026-11-03/h.json", "launch-2026-01-15/2026-11-03/g.json"]
    assert b.partition_day("/bk/logs/launch-2026-01-15/2026-10-01/old.json") == date(2026, 10, 1)


def test_days_window_has_a_day_of_slack_for_the_proxy_clock() -> None:
    since = int(datetime(2026, 11, 3, 0, 30, tzinfo=UTC).timestamp() * 1_000_000)
    lo, hi = days_window(since, since + 3600 * 1_000_000)
    assert lo == date(2026, 11, 2) and hi == date(2026, 11, 4)
    assert days_window(None, None) == (None, None)
    midnight = int(datetime(2026, 11, 4, tzinfo=UTC).timestamp() * 1_000_000)
    assert days_window(since, midnight) == (date(2026, 11, 2), date(2026, 11, 4))


def test_groups_are_bounded_in_count_and_bytes_and_never_empty() -> None:
    objects = pl.DataFrame({"key": [f"k{i}" for i in range(10)], "size": [10, 10, 10, 500, 10, 10, 10, 10, 10, 10]})
    groups = list(_groups(objects, max_objects=4, max_bytes=100))
    assert [g["key"].to_list() for g in groups] == [["k0", "k1", "k2"], ["k3"], ["k4", "k5", "k6", "k7"], ["k8", "k9"]]
    assert pl.concat(groups)["key"].to_list() == objects["key"].to_list()


def _records(lines: list) -> pl.DataFrame:
    frames = [c.lines for c in lines]
    records, bad = normalize_isolating(pl.concat(frames, how="diagonal"))
    assert not bad
    return records


def test_objects_as_the_loggers_write_them_are_records() -> None:
    capture = read_capture()
    one = json.dumps(capture[0]).encode()
    batch = "\n".join(json.dumps(r) for r in capture[:5]).encode()
    assert _records(object_chunks("s3://bk/a.json", one)).height == 1
    assert _records(object_chunks("s3://bk/a.json.gz", gzip.compress(one))).height == 1
    recs = _records(object_chunks("gs://bk/batch.jsonl", batch))
    assert recs.height == 5 and recs["source"].unique().to_list() == ["gs://bk/batch.jsonl"]
    assert object_chunks("s3://bk/empty.json", b"") == []


@pytest.mark.parametrize("kind", [k for k in COMPRESSIONS if k != "bzip2"])  # 20 records fit one bzip2 block: a cut one gives none
def test_a_damaged_compressed_object_is_quarantined_after_the_records_before_the_damage(kind: str) -> None:
    capture = read_capture()
    body = compressor(kind)("".join(json.dumps(r) + "\n" for r in capture[:20]).encode())
    chunks = object_chunks("s3://bk/cut.jsonl.x", body[: len(body) * 2 // 3], chunk_bytes=4096)
    bad = [q for c in chunks for q in c.quarantined]
    assert len(bad) == 1 and bad[0].reason == "unreadable" and bad[0].source == "s3://bk/cut.jsonl.x"
    got = pl.concat([c.lines for c in chunks], how="diagonal")
    assert 0 < got.height < 20


def test_the_ledger_skips_what_was_read_at_the_same_version(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    items = items_frame(["b/x/1", "b/x/2", "b/y/3"], ["e1", "e2", "e3"], ["t"] * 3)
    assert ledger.new("s3://b", items).height == 3
    ledger.mark("s3://b", items.head(2), {"newest_day": "2026-11-02"})
    ledger.mark("s3://b", items.head(0), {"newest_day": "2026-11-01"})
    assert ledger.new("s3://b", items)["key"].to_list() == ["b/y/3"]
    changed = items_frame(["b/x/1"], ["e1-new"], ["t"])
    assert ledger.new("s3://b", changed).height == 1
    assert ledger.new("gs://b", items).height == 3
    assert ledger.meta("s3://b", "newest_day") == "2026-11-02"
    ledger.close()
    again = Ledger(tmp_path / "l.sqlite")
    assert again.count("s3://b") == 2
    big = items_frame([f"b/x/{i}" for i in range(3000)], ["e"] * 3000, ["t"] * 3000)
    again.mark("s3://b", big.head(2500))
    assert again.new("s3://b", big).height == 500
    assert Ledger(None).new("s3://b", items).height == 3
    again.forget()
    assert again.new("s3://b", big).height == 3000 and again.meta("s3://b", "newest_day") is None, "a store made anew is owed every item"


def test_small_objects_read_in_one_frame_give_what_the_per_object_path_gives() -> None:
    capture = read_capture()
    objects = [(f"s3://bk/{i}.json", json.dumps(r).encode()) for i, r in enumerate(capture[:12])]
    objects.append(("s3://bk/batch.jsonl", "\n".join(json.dumps(r) for r in capture[12:20]).encode() + b"\r\n"))
    objects.append(("s3://bk/cut.json", json.dumps(capture[20]).encode()[:-40]))
    objects.append(("s3://bk/bad-utf8.json", b'{"id": "\xff"}'))
    objects.append(("s3://bk/blank.json", b"\n\n"))
    objects.append(("s3://bk/hole.jsonl", b"\x00" * 64 + json.dumps(capture[21]).encode() + b"\n" + b"\x00" * 8 + b"\n"))
    one = pl.concat([c.lines for c in small_objects_chunks(objects)], how="diagonal")
    each = pl.concat([c.lines for name, body in objects for c in object_chunks(name, body)], how="diagonal")
    cols = ["source", "line_no", "offset", "raw", "truncated", "file"]
    assert one.select(cols).sort("source", "line_no").equals(each.select(cols).sort("source", "line_no"))
    assert one.filter(pl.col("truncated"))["source"].to_list() == ["s3://bk/cut.json"]
    assert one.filter(pl.col("source") == "s3://bk/hole.jsonl")["raw"].to_list() == [json.dumps(capture[21])], "a copytruncate's hole"


def test_an_object_that_cannot_be_fetched_is_left_for_the_next_run(tmp_path: Path) -> None:
    capture = read_capture()
    b = memory_bucket({f"logs/2026-11-01/{i}.json": json.dumps(r).encode() for i, r in enumerate(capture[:6])})
    real = b.fetch

    def flaky(keys: list[str]) -> dict:  # type: ignore[type-arg]
        got = real(keys)
        got[keys[2]] = PermissionError("AccessDenied")
        got[keys[3]] = FileNotFoundError(keys[3])
        return got

    b.fetch = flaky  # type: ignore[method-assign]
    ledger = Ledger(tmp_path / "l.sqlite")
    units = list(b.units(ledger))
    assert sum(u.failed for u in units) == 1
    read = pl.concat([u.items for u in units])
    assert read.height == 5, "a vanished object is done (nothing left to read), a refused one is not"
    for u in units:
        ledger.mark(u.source, u.items)
    b.fetch = real  # type: ignore[method-assign]
    again = list(b.units(ledger))
    assert [k.rsplit("/", 1)[1] for u in again for k in u.items["key"].to_list()] == [read_key_missing(read, b)]


def read_key_missing(read: pl.DataFrame, b: Bucket) -> str:
    everything = [k for page in b.listing("/bk/logs/2026-11-01") for k in b.objects(page)["key"].to_list()]
    return next(k for k in everything if k not in read["key"].to_list()).rsplit("/", 1)[1]


def test_the_cron_horizon_moves_only_after_a_whole_run(tmp_path: Path) -> None:
    capture = read_capture()
    b = memory_bucket(
        {
            "logs/team-a/2026-11-05/a.json": json.dumps(capture[0]).encode(),
            "logs/team-b/2026-11-01/b.json": json.dumps(capture[1]).encode(),
        }
    )
    ledger = Ledger(tmp_path / "l.sqlite")
    units = b.units(ledger)
    first = next(units)
    ledger.mark(first.source, first.items, first.meta)
    units.close()
    assert ledger.meta(b.source, b.day_mark) is None, "a run stopped after team-a's partition would skip team-b's for good"
    for u in b.units(ledger):
        ledger.mark(u.source, u.items, u.meta)
    assert ledger.meta(b.source, b.day_mark) == "2026-11-05" and ledger.count(b.source) == 2


@pytest.mark.parametrize("kind", ["xz", "bzip2", "zstd"])
def test_an_object_compressed_otherwise_than_gzip_is_read_as_gzip_is(tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    """It was named in a warning and not read (read as text, it had been dozens of ``invalid_utf8``
    quarantine lines for one archived object)."""
    capture = read_capture()
    body = "".join(json.dumps(r) + "\n" for r in capture[:20]).encode()
    b = memory_bucket({"logs/2026-11-05/old.jsonl.x": compressor(kind)(body), "logs/2026-11-05/new.json": json.dumps(capture[20]).encode()})
    ledger = Ledger(tmp_path / "l.sqlite")
    caplog.set_level("WARNING")
    units = [u for u in b.units(ledger) if u.items.height]
    lines = pl.concat([c.lines for u in units for c in u.chunks], how="diagonal")
    assert sorted(lines["raw"].to_list()) == sorted(json.dumps(r) for r in capture[:21])
    assert not [q for u in units for c in u.chunks for q in c.quarantined], "nothing quarantined"
    assert sorted(k.rsplit("/", 1)[1] for u in units for k in u.items["key"].to_list()) == ["new.json", "old.jsonl.x"]
    assert caplog.text == ""
    for u in units:
        ledger.mark(u.source, u.items)
    assert not [u for u in b.units(ledger) if u.items.height], "marked read: not read again next run"


def test_a_prefix_that_holds_no_object_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A typo in the prefix read nothing and said nothing (exit 0 every cron run), where a missing
    bucket is exit 8; a prefix the proxy has not written to yet is empty too, so it is a warning."""
    b = memory_bucket({"logs/2026-11-05/a.json": b"{}"})
    b.prefix = "lgos"
    caplog.set_level("WARNING")
    assert list(b.units(Ledger(tmp_path / "l.sqlite"))) == []
    assert caplog.text.count("holds no object: check the bucket and prefix") == 1, caplog.text
    caplog.clear()
    b.prefix = "logs"
    assert [u for u in b.units(Ledger(tmp_path / "l.sqlite")) if u.items.height]
    assert "holds no object" not in caplog.text


def test_a_cron_run_forgets_the_objects_of_partitions_it_no_longer_lists_and_reads_nothing_again(tmp_path: Path) -> None:
    """The ledger kept every object a cron run ever read (hundreds of MB a year for a busy proxy's
    bucket), though a cron run lists only the partitions from a day before the newest it read. Once
    a day, the objects of partitions before the day ahead of that are forgotten; loose objects (listed
    by every run), other prefixes' and the recent partitions' stay, and a run after it reads nothing."""
    from ingest.pipeline import Inputs, RunOptions, Summary, remote_units

    capture = read_capture()
    days = ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04", "2026-11-05"]
    files = {f"logs/{d}/{h}/{i}.json": json.dumps(capture[i]).encode() for i, d in enumerate(days) for h in ("00", "13")}
    files |= {"logs/loose.json": json.dumps(capture[10]).encode(), "logs/team-a/2026-10-01/x.json": json.dumps(capture[11]).encode()}
    b = memory_bucket(files)
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.mark(b.source, items_frame(["/bk/other/2026-10-01/y.json"], ["v"], [""]))
    inputs, opts = Inputs([], [b]), RunOptions(paths=[])

    def cron() -> int:
        n = 0
        for u in remote_units(inputs, ledger, opts, Summary()):
            ledger.mark(u.source, u.items, u.meta)
            n += u.items.height
        return n

    assert cron() == len(files) and ledger.meta(b.source, b.day_mark) == "2026-11-05"
    assert ledger.count(b.source) == len(files) + 1
    assert cron() == 0, "the next run reads nothing again"
    kept = {k.split("/bk/")[1] for k in keys(tmp_path / "l.sqlite", b.source)}
    assert kept == {f"logs/{d}/{h}/{i}.json" for i, d in enumerate(days) for h in ("00", "13") if d >= "2026-11-03"} | {
        "logs/loose.json",
        "other/2026-10-01/y.json",
    }, "before 2026-11-03 (the day ahead of the run's start, 2026-11-04) forgotten, in any team's folder"
    assert ledger.meta(b.source, "forgotten_before /logs") == "2026-11-03"
    ledger.mark(b.source, items_frame(["/bk/logs/2026-11-01/late.json"], ["v"], [""]))
    assert cron() == 0 and "/bk/logs/2026-11-01/late.json" in keys(tmp_path / "l.sqlite", b.source), "once a day, not every run"


def keys(ledger: Path, source: str) -> list[str]:
    with sqlite3.connect(ledger) as c:
        return [k for (k,) in c.execute("SELECT key FROM items WHERE source = ?", (source,))]


# --- against real servers (moto's S3 server, fake-gcs-server): keys as exact strings -------------------------


def days_ago(n: float) -> list[dict]:
    capture = read_capture()
    return reidentify(capture, shift_s=round(time.time() - n * 86400 - min(r["startTime"] for r in capture)))


def writer(server: BucketServer, bucket: str) -> Callable[[str, bytes], None]:
    """Put an object under its exact key (fsspec's paths would drop a trailing "/" or a leading one)."""
    fs = server.fs()
    if server.kind == "s3":
        return lambda key, body: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body)
    return lambda key, body: _upload_gcs(fs, bucket, key, body.decode())


def cron_run(server: BucketServer, url: str, ledger: Ledger) -> tuple[list[str], list]:
    """One cron run of ``url`` as the pipeline makes it (from the day before the newest it finished,
    forgetting older partitions once a day), a fresh filesystem each: the keys it read, its chunks."""
    from ingest.pipeline import Inputs, RunOptions, Summary, remote_units

    keys, chunks = [], []
    with server_env(server):
        for u in remote_units(Inputs([], [Bucket.parse(url)]), ledger, RunOptions(paths=[]), Summary()):
            ledger.mark(u.source, u.items, u.meta)
            keys += u.items["key"].to_list()
            chunks += u.chunks
    return sorted(keys), chunks


def day_of(record: dict) -> str:
    return datetime.fromtimestamp(record["startTime"]).strftime("%Y-%m-%d")


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_keys_with_an_empty_segment_are_read_once_each_across_cron_runs(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """s3_v2 builds keys as ``s3_path.rstrip('/') + '/' + team alias + '/' + key alias + '/' + day``: a team
    alias ending in "/" makes ``logs/team-b//<day>/...``, an s3_path "/logs" makes ``/logs/<day>/...``.
    fsspec's ``ls`` named the directory ``logs/team-b//`` as ``logs/team-b/`` (its trailing "/" stripped),
    the one being listed, and it was skipped: those objects were never read, exit 0. They are read, once;
    their old partitions are forgotten by the ledger and not listed again, as any other's."""
    server: BucketServer = request.getfixturevalue(f"{kind}_server")
    bucket = server.new_bucket()
    put = writer(server, bucket)
    old, recent, later = days_ago(10)[:4], days_ago(1)[4:10], days_ago(0.1)[10:11]

    def key_of(i: int, r: dict) -> str:
        if kind == "gcs":
            return [f"proxy//{day_of(r)}/{r['id']}", f"/proxy/{day_of(r)}/{r['id']}", f"proxy/{day_of(r)}/{r['id']}"][i % 3]
        team = {"metadata": {**(r.get("metadata") or {}), "user_api_key_team_alias": "team-b/"}}
        return [s3_v2_key({**r, **team}, "logs", use_team_prefix=True), s3_v2_key(r, "/logs"), s3_v2_key(r, "logs")][i % 3]

    written = {key_of(i, r): r for i, r in enumerate(old + recent)}
    assert any("//" in k for k in written) and any(k.startswith("/") for k in written)
    for key, r in written.items():
        put(key, json.dumps(r).encode())
    ledger = Ledger(tmp_path / "l.sqlite")
    url = f"{'s3' if kind == 's3' else 'gs'}://{bucket}"
    read, chunks = cron_run(server, url, ledger)
    assert read == sorted(f"{bucket}/{k}" for k in written), "every object under the prefix, once"
    assert sorted(_records(chunks)["litellm_call_id"].to_list()) == sorted(r["litellm_call_id"] for r in written.values())

    new = key_of(0, later[0])
    put(new, json.dumps(later[0]).encode())
    read, _ = cron_run(server, url, ledger)
    assert read == [f"{bucket}/{new}"], "the next cron run reads the new object alone"
    kept = keys(tmp_path / "l.sqlite", f"{'s3' if kind == 's3' else 'gs'}://{bucket}")
    assert not [k for k in kept if day_of(old[0]) in k], "the old partitions, behind empty segments too, are forgotten"
    assert cron_run(server, url, ledger)[0] == [], "and not listed again"


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_url_whose_prefix_starts_with_a_slash_reads_the_keys_that_do(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """An s3_path of "/logs" writes keys ``/logs/<day>/…``; their URL is ``s3://bucket//logs``. Its
    leading "/" was dropped: the run listed ``logs/`` instead, and read another prefix's objects, or
    none ("holds no object"), never its own."""
    server: BucketServer = request.getfixturevalue(f"{kind}_server")
    bucket = server.new_bucket()
    put = writer(server, bucket)
    recs = days_ago(1)[:6]
    written = {f"{'/' if i % 2 else ''}logs/{day_of(r)}/{r['id']}": r for i, r in enumerate(recs)}
    for key, r in written.items():
        put(key, json.dumps(r).encode())
    scheme = "s3" if kind == "s3" else "gs"
    for url, lead in ((f"{scheme}://{bucket}//logs", "/"), (f"{scheme}://{bucket}/logs/", "")):
        read, chunks = cron_run(server, url, Ledger(tmp_path / f"{len(lead)}.sqlite"))
        mine = sorted(k for k in written if k.startswith(f"{lead}logs/"))
        assert read == [f"{bucket}/{k}" for k in mine], url
        assert sorted(_records(chunks)["litellm_call_id"].to_list()) == sorted(written[k]["litellm_call_id"] for k in mine)


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_an_object_whose_key_ends_in_a_slash_is_read_not_taken_for_gone(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """gcs_bucket names an embedding's object ``<folder>/<YYYY-MM-DD>/`` (the response has no id), and a
    copy of the bucket to S3 keeps the name: s3fs's ``cat`` stripped the "/" and found nothing, the
    object was taken for deleted before it could be read and marked read, its call lost. An empty one
    is a folder marker (the S3 console's "Create folder"), nothing to read."""
    server: BucketServer = request.getfixturevalue(f"{kind}_server")
    bucket = server.new_bucket()
    put = writer(server, bucket)
    (embedding,) = [r for r in days_ago(1) if r["call_type"] == "aembedding"][:1]
    day = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    put(f"proxy/{day}/", json.dumps(embedding).encode())
    put("proxy/", b"")
    url = f"{'s3' if kind == 's3' else 'gs'}://{bucket}/proxy/"
    ledger = Ledger(tmp_path / "l.sqlite")
    read, chunks = cron_run(server, url, ledger)
    assert chunks and _records(chunks)["litellm_call_id"].to_list() == [embedding["litellm_call_id"]], "its call is read, not lost"
    assert read == [f"{bucket}/proxy/{day}/"], "the folder marker is not an object to read"
    assert cron_run(server, url, ledger)[0] == [], "once"
