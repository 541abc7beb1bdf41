"""Buckets: the objects LiteLLM's ``s3_v2`` and ``gcs_bucket`` loggers write, read where they are.

Read through fsspec (s3fs, gcsfs): one interface for both, each with its provider's standard
credential chain (botocore: ``AWS_*`` variables, profiles, SSO, instance and task roles, and
``AWS_ENDPOINT_URL`` for MinIO, R2 and other S3-compatible stores; google-auth:
``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's default login, the metadata server, and
``STORAGE_EMULATOR_HOST``), and concurrent fetches from one call (``cat`` of many keys).

Listing walks the prefix one level at a time and takes each date partition (a directory whose
name ends in ``YYYY-MM-DD``, as both loggers write them, hourly ones beneath) as a unit: it is
listed a page at a time, and only a page's new objects are fetched, in groups bounded in count
and bytes, while the next group downloads. Memory is bounded by a page plus two groups. Partitions
outside the days asked for are never listed: ``--since/--until`` (with a day of slack either
side: the loggers date a partition by the proxy's clock), or for a cron run, partitions more
than a day older than the newest one a previous run finished.

On S3 and GCS a directory is an exact key prefix ending in "/", listed with the provider's own
delimiter listing, and an object is its exact key: an empty segment (``logs/team-b//2026-12-06/``,
a team alias ending in "/"; ``/logs/...``, an ``s3_path`` of "/logs") is a directory like any other,
and a key ending in "/" (gcs_bucket's embedding objects, ``YYYY-MM-DD/``) an object like any other.
"""

from __future__ import annotations

import asyncio
import glob
import io
import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import polars as pl
from fsspec.asyn import sync

from ingest.ledger import Ledger, Unit, items_frame
from ingest.quarantine import first_line
from ingest.sources import (
    DAMAGED,
    HOLE,
    Chunk,
    SourceError,
    SourceUnavailable,
    compression,
    decompressed,
    is_document,
    read_chunks,
    unreadable_chunk,
)

log = logging.getLogger("litellm-ingest.buckets")

URL = re.compile(r"^(s3|s3a|gs|gcs)://([^/]+)/?(.*)$")
DATE_DIR = re.compile(r"^(?:[A-Za-z_][\w.-]*=)?(\d{4})-(\d{2})-(\d{2})$")
"""A date partition's folder: a date, as both loggers name it (``2026-01-15``), or a Hive-style
``dt=2026-01-15``. A name that only ends in a date is another folder: LiteLLM's S3 logger puts its
team and key aliases in the key (``launch-2026-01-15/<day>/…``), and one taken for a partition of
its day was never listed again once cron runs had moved past that day."""
SKIPPED_DIRS = {"batch_line_items", "audit_logs"}
"""LiteLLM writes batch jobs' output lines and audit logs beside the call logs: not call records."""
GROUP_OBJECTS = 256
GROUP_BYTES = 32 * 1024 * 1024
LIST_PAGE = 5000
SMALL_OBJECT = 1024 * 1024
MAX_DEPTH = 4


def is_bucket_url(spec: str) -> bool:
    return bool(URL.match(spec))


def mark_horizon() -> date:
    """The latest folder day that may move a cron run's start: a replica whose clock is years ahead
    writes a folder of that day, and a run that started from it listed nothing of today's again."""
    return (datetime.now(UTC) + timedelta(days=1)).date()


def _day(name: str) -> date | None:
    m = DATE_DIR.search(name)
    if not m:
        return None
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


WINDOW_SLACK = timedelta(days=1)
"""How far outside ``--since/--until`` a source is read: a call's attempts straddle a bound (the
pipeline selects whole calls by their first attempt's start), and a folder is dated by a clock
that may not be the call's."""


def days_window(since_us: int | None, until_us: int | None) -> tuple[date | None, date | None]:
    """The partition days that may hold calls in [since, until), with ``WINDOW_SLACK`` either side."""

    def at(us: int | None, side: int) -> date | None:
        """None (no bound) for none, or where the slack runs past the calendar (``--until 9999-12-31``)."""
        if us is None:
            return None
        try:
            return datetime.fromtimestamp(us / 1e6, tz=UTC).date() + side * WINDOW_SLACK
        except (OverflowError, OSError, ValueError):
            return None

    return at(since_us, -1), at(None if until_us is None else until_us - 1, 1)


def filesystem(scheme: str) -> Any:
    """A fresh filesystem (no cached instance or listing: objects appear between runs), configured by
    the environment alone, so each provider's whole credential chain applies. For GCS the plain JSON-API
    class: gcsfs's default one probes every bucket's layout over gRPC first (a minute per bucket
    against an emulator, and nothing the listing needs)."""
    if scheme == "s3":
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)


@dataclass
class Bucket:
    """One ``s3://`` or ``gs://`` URL named on the command line."""

    url: str
    scheme: str
    bucket: str
    prefix: str
    fs: Any = None

    @classmethod
    def parse(cls, url: str) -> Bucket:
        m = URL.match(url)
        if not m:
            raise SourceError(f"not a bucket URL: {url}")
        scheme = {"s3a": "s3", "gcs": "gs"}.get(m[1], m[1])
        return cls(url, scheme, m[2], m[3].rstrip("/"))  # s3://b//logs: the keys of an s3_path "/logs" start with "/"

    @property
    def root(self) -> str:
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    @property
    def source(self) -> str:
        """The ledger's name for this bucket (one per bucket: objects are keyed by full path)."""
        return f"{self.scheme}://{self.bucket}"

    @property
    def day_mark(self) -> str:
        """The ledger's name for the newest partition day this URL's listing read whole: one per
        prefix, as each is listed apart (a mark per bucket started a second prefix's listing from
        the first's newest day, and its older partitions were never listed)."""
        return f"newest_day /{self.prefix}"

    def partition_day(self, key: str) -> date | None:
        """The day of the date partition a listed key lies in, below this URL's root, found as
        :meth:`_walk` finds partitions (None: a loose object, listed by every run)."""
        if not key.startswith(f"{self.root}/"):
            return None
        for part in key[len(self.root) + 1 :].split("/")[:-1][: MAX_DEPTH + 1]:
            if (day := _day(part)) is not None:
                return day
        return None

    def forget_before(self, ledger: Ledger, start: date) -> int:
        """Once a day, a cron run starting from ``start``: forget the objects of date partitions before
        the day ahead of it, which no cron run of this URL lists again. The ledger kept every object
        ever read (about 650 MB a year for a proxy making a call a second)."""
        before = (start - timedelta(days=1)).isoformat()
        mark = f"forgotten_before /{self.prefix}"
        if (done := ledger.meta(self.source, mark)) is not None and done >= before:
            return 0
        n = ledger.forget_where(self.source, f"{self.root}/", lambda key: str(self.partition_day(key) or "9999") < before)
        ledger.mark(self.source, items_frame([], [], []), {mark: before})
        if n:
            log.info("%s: forgot %d object(s) of partitions before %s, which no cron run lists again", self.url, n, before)
        return n

    def open(self) -> Bucket:
        if self.fs is None:
            self.fs = filesystem(self.scheme)
        return self

    def check(self) -> None:
        """Fail fast, in one line, on what no retry fixes: no credentials, no bucket, no access."""
        self.open()
        try:
            self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            try:
                self.fs.ls(self.bucket, detail=False)
            except FileNotFoundError:
                raise SourceUnavailable(f"no such bucket: {self.url}") from None
            except Exception as e:
                raise SourceUnavailable(f"cannot list {self.url}: {first_line(e)}") from None
        except PermissionError as e:
            raise SourceUnavailable(f"access denied to {self.url}: {first_line(e)}") from None
        except Exception as e:
            raise SourceUnavailable(f"cannot list {self.url}: {first_line(e)}") from None

    def url_of(self, path: str) -> str:
        return f"{self.scheme}://{path}"

    # --- listing ---------------------------------------------------------------------------------

    def partitions(self, lo: date | None = None, hi: date | None = None) -> Iterator[tuple[str, list[dict[str, Any]] | None]]:
        """(path, entries): a level's loose objects as listed, or a date partition to list page by page
        (None). A path is a directory's: the bucket, "/" and its exact key prefix, which ends in "/"."""
        self.open()
        try:
            single = [self.fs.info(self.root)] if self.prefix and self.fs.isfile(self.root) else None
        except FileNotFoundError:
            return
        except Exception as e:
            raise SourceUnavailable(f"cannot list {self.url}: {first_line(e)}") from e
        if single:
            yield self.root, single
            return
        yield from self._walk(f"{self.root}/", lo, hi, 0)

    def _walk(self, path: str, lo: date | None, hi: date | None, depth: int) -> Iterator[tuple[str, list[dict[str, Any]] | None]]:
        try:
            files, dirs = self._level(path)
        except FileNotFoundError:
            return
        except Exception as e:
            raise SourceUnavailable(f"cannot list {self.url_of(path)}: {first_line(e)}") from e
        if files:
            yield path, files
        for d in sorted(dirs):
            name = _name(d)
            if name in SKIPPED_DIRS or d == path:
                continue
            day = _day(name)
            if day is not None:
                if (lo is None or day >= lo) and (hi is None or day <= hi):
                    yield d, None
            elif depth < MAX_DEPTH:
                yield from self._walk(d, lo, hi, depth + 1)
            else:
                yield d, None

    def _level(self, path: str) -> tuple[list[dict[str, Any]], list[str]]:
        """A directory's objects and subdirectories (their paths, ending in "/"), one level. S3 and GCS
        through their delimiter listings, whose prefixes are exact: fsspec's ``ls`` strips a trailing
        "/", and a prefix ``a//`` (an empty segment) was listed as ``a/`` again, its objects never."""
        bucket, _, prefix = path.partition("/")
        if self.scheme == "s3" and hasattr(self.fs, "_iterdir"):
            entries = sync(self.fs.loop, _take, self.fs._iterdir(bucket, delimiter="/", prefix=prefix), None, True)
            # a directory's entry is named by its common prefix less the "/" (s3fs's ``_iterdir``)
            return [e for e in entries if e.get("type") == "file"], [f"{e['name']}/" for e in entries if e.get("type") == "directory"]
        if self.scheme == "gs" and hasattr(self.fs, "_call_list_objects"):
            files: list[dict[str, Any]] = []
            dirs: list[str] = []
            token = None
            while True:
                got = sync(self.fs.loop, self.fs._call_list_objects, bucket, prefix=prefix, delimiter="/", maxResults=1000, pageToken=token)
                files += [self.fs._process_object(bucket, item) for item in got.get("items", [])]
                dirs += [f"{bucket}/{p}" for p in got.get("prefixes", [])]
                if not (token := got.get("nextPageToken")):
                    return files, dirs
        # another fsspec filesystem: names as it gives them (it has no empty segment)
        entries = self.fs.ls(path.rstrip("/"), detail=True)
        files = [e for e in entries if e.get("type") != "directory"]
        return files, [f"{e['name'].rstrip('/')}/" for e in entries if e.get("type") == "directory"]

    def listing(self, path: str) -> Iterator[list[dict[str, Any]]]:
        """A partition's objects, a page at a time: a busy proxy's day is a million objects, whose
        listing must not be held whole. S3 and GCS are paged through their list APIs (s3fs's and
        gcsfs's own page calls); another fsspec filesystem is listed whole."""
        self.open()
        bucket, _, key = path.partition("/")
        prefix = key if not key or key.endswith("/") else f"{key}/"
        try:
            if self.scheme == "s3" and hasattr(self.fs, "_iterdir"):
                pages = self.fs._iterdir(bucket, delimiter="", prefix=prefix)
                while page := sync(self.fs.loop, _take, pages, LIST_PAGE):
                    yield page
            elif self.scheme == "gs" and hasattr(self.fs, "_call_list_objects"):
                token = None
                while True:
                    got = sync(self.fs.loop, self.fs._call_list_objects, bucket, prefix=prefix, maxResults=1000, pageToken=token)
                    yield [self.fs._process_object(bucket, item) for item in got.get("items", [])]
                    if not (token := got.get("nextPageToken")):
                        return
            else:
                yield list(self.fs.find(path.rstrip("/"), detail=True).values())
        except FileNotFoundError:
            return
        except SourceUnavailable:
            raise
        except Exception as e:
            raise SourceUnavailable(f"cannot list {self.url_of(path)}: {first_line(e)}") from e

    def objects(self, entries: list[dict[str, Any]]) -> pl.DataFrame:
        """Listed objects as a frame: key (full path), version (ETag or generation), at, size; oldest
        first, so a call's attempts (one object each) are read in about the order they ended. An empty
        object whose key ends in "/" is a folder marker (the S3 console's "Create folder"), not a log."""
        entries = [
            e
            for e in entries
            if e.get("type", "file") == "file"
            and not SKIPPED_DIRS & set(e["name"].split("/"))
            and not (e["name"].endswith("/") and not int(e.get("size") or 0))
        ]
        frame = items_frame([e["name"] for e in entries], [_version(e) for e in entries], [_modified(e) for e in entries])
        frame = frame.with_columns(size=pl.Series([int(e.get("size") or 0) for e in entries], dtype=pl.Int64))
        return frame.sort("at", "key")

    # --- reading ---------------------------------------------------------------------------------

    def fetch(self, keys: list[str]) -> dict[str, bytes | BaseException]:
        """Many objects at once (fsspec fetches them concurrently); a failure is returned, not raised."""
        if not keys:
            return {}
        # s3fs's ``cat`` strips a trailing "/" from a key: such an object (``YYYY-MM-DD/``, gcs_bucket's
        # embedding objects, synced to S3) was not found, and taken for deleted. It is got by its key.
        exact = [k for k in keys if k.endswith("/")] if self.scheme == "s3" and hasattr(self.fs, "_call_s3") else []
        plain = [k for k in keys if not glob.has_magic(k) and k not in exact]
        try:
            got: dict[str, Any] = self.fs.cat(plain, on_error="return") if plain else {}
        except Exception as e:
            got = dict.fromkeys(plain, e)
        if exact:
            try:
                got.update(zip(exact, sync(self.fs.loop, _gather, [self._get_object(k) for k in exact]), strict=True))
            except Exception as e:
                got.update(dict.fromkeys(exact, e))
        for k in keys:  # ``cat`` expands ``*?[``: a key with them (a team alias "ml [eu]") matched nothing, read as gone
            if glob.has_magic(k) and k not in exact:
                try:
                    got[k] = self.fs.cat_file(k)
                except Exception as e:
                    got[k] = e
        return {k: got.get(k, FileNotFoundError(k)) for k in keys}

    async def _get_object(self, key: str) -> bytes:
        """An S3 object by its exact key (s3fs's paths lose a trailing "/")."""
        bucket, _, name = key.partition("/")
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=name)
        try:
            return bytes(await resp["Body"].read())
        finally:
            resp["Body"].close()

    def units(
        self,
        ledger: Ledger,
        lo: date | None = None,
        hi: date | None = None,
        chunk_bytes: int = 8 * 1024 * 1024,
        group_objects: int = GROUP_OBJECTS,
        group_bytes: int = GROUP_BYTES,
        on_listed: Callable[[int, int, int], None] | None = None,
    ) -> Iterator[Unit]:
        """New objects, a bounded group at a time, the next group downloading while one is fed.

        Each unit's ``items`` are the objects it read (a vanished one too: there is nothing left to
        read); one that could not be fetched is left out (counted in ``failed``) and read next run.
        A last unit, with no items, carries the newest partition day, only once every partition
        was read without a failure: a cron run that stopped early must not skip what it never read."""
        newest: date | None = None
        failed = seen = 0
        latest = mark_horizon()
        with ThreadPoolExecutor(1, thread_name_prefix="fetch") as pool:
            for path, entries in self.partitions(lo, hi):
                day = _day(_name(path)) if entries is None else None
                day = day if day is None or day <= latest else None
                newest = max(newest, day) if newest and day else (newest or day)
                for page in [entries] if entries is not None else self.listing(path):
                    listed = self.objects(page)
                    seen += listed.height
                    new = ledger.new(self.source, listed.drop("size"))
                    new = listed.join(new.select("key"), on="key", how="semi", maintain_order="left")
                    if on_listed is not None:
                        on_listed(listed.height, new.height, int(new["size"].sum()))
                    if not new.height:
                        continue
                    groups = list(_groups(new, group_objects, group_bytes))
                    ahead: Future[dict[str, bytes | BaseException]] | None = pool.submit(self.fetch, groups[0]["key"].to_list())
                    for i, group in enumerate(groups):
                        assert ahead is not None
                        got = ahead.result()
                        ahead = pool.submit(self.fetch, groups[i + 1]["key"].to_list()) if i + 1 < len(groups) else None
                        unit = self._unit(group, got, chunk_bytes)
                        failed += unit.failed
                        yield unit
        if not seen and lo is None and hi is None:
            log.warning("%s holds no object: check the bucket and prefix (nothing was read)", self.url)
        if newest is not None and not failed:
            yield Unit(self.source, [], items_frame([], [], []), meta={self.day_mark: newest.isoformat()})

    def _unit(self, group: pl.DataFrame, got: dict[str, bytes | BaseException], chunk_bytes: int) -> Unit:
        chunks: list[Chunk] = []
        small: list[tuple[str, bytes]] = []
        read: list[str] = []
        size = failed = 0
        for key in group["key"].to_list():
            body = got[key]
            if isinstance(body, FileNotFoundError):
                log.info("%s was deleted before it could be read", self.url_of(key))
                read.append(key)
                continue
            if isinstance(body, BaseException):
                log.warning("cannot read %s (%s); it is read again next run", self.url_of(key), first_line(body))
                failed += 1
                continue
            read.append(key)
            size += len(body)
            if len(body) < SMALL_OBJECT and compression(body) is None:
                small.append((self.url_of(key), body))
            else:
                chunks.extend(object_chunks(self.url_of(key), body, chunk_bytes))
        if small:
            chunks.extend(small_objects_chunks(small))
        items = group.filter(pl.col("key").is_in(read)).drop("size")
        return Unit(self.source, chunks, items, bytes=size, failed=failed)


def object_chunks(name: str, body: bytes, chunk_bytes: int = 8 * 1024 * 1024) -> list[Chunk]:
    """An object's records as chunks (compressed by its magic bytes); a damaged one is quarantined whole,
    after the records it gave before the damage."""
    fileobj = decompressed(io.BytesIO(body), compression(body))
    chunks: list[Chunk] = []
    try:
        for chunk in read_chunks(name, chunk_bytes=chunk_bytes, final=True, fileobj=fileobj):
            chunk.lines = chunk.lines.with_columns(file=pl.lit(name))
            chunks.append(chunk)
    except DAMAGED as e:
        line = chunks[-1].end_line if chunks else 1
        offset = chunks[-1].end_offset if chunks else 0
        chunks.append(unreadable_chunk(name, name, line, offset, f"object cannot be read past byte {offset}: {first_line(e)}", body[:4096]))
    return chunks


def _name(path: str) -> str:
    """A directory's name: the last segment of its path (ending in "/"), exactly; "" for an empty one."""
    return path.removesuffix("/").rpartition("/")[2]


async def _take(pages: Any, n: int | None, dirs: bool = False) -> list[dict[str, Any]]:
    """Up to ``n`` (None: all) file entries, and directories' too if ``dirs``, from an async listing
    (the generator is resumed by the next call)."""
    out: list[dict[str, Any]] = []
    async for entry in pages:
        if entry.get("type") == "file" or dirs:
            out.append(entry)
            if n is not None and len(out) >= n:
                break
    return out


async def _gather(coros: list[Any], at_once: int = 32) -> list[Any]:
    """The coroutines' results, or the exceptions they raised, at most ``at_once`` running."""
    gate = asyncio.Semaphore(at_once)

    async def one(coro: Any) -> Any:
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


def small_objects_chunks(objects: list[tuple[str, bytes]]) -> list[Chunk]:
    """Many small plain objects (a per-call object is a few KB) as one chunk, built in one go: the
    per-object path costs a frame each, which a bucket of a million objects would feel. An object
    that is not clean UTF-8 takes the per-object path, which quarantines precisely."""
    sources: list[str] = []
    line_nos: list[int] = []
    offsets: list[int] = []
    raws: list[str] = []
    truncated: list[bool] = []
    out: list[Chunk] = []
    for name, body in objects:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            out.extend(object_chunks(name, body))
            continue
        offset = 0
        lines = text.split("\n")
        last = len(lines) - 1
        for i, line in enumerate(lines):
            size = len(line.encode()) if not line.isascii() else len(line)
            raw = line.removesuffix("\r").lstrip(HOLE)  # NULs before a line: a copytruncate's hole, as in files
            if raw.strip():
                sources.append(name)
                line_nos.append(i + 1)
                offsets.append(offset)
                raws.append(raw)
                truncated.append(i == last and not is_document(raw.encode()))
            offset += size + 1
    frame = pl.DataFrame(
        {"source": sources, "line_no": line_nos, "offset": offsets, "raw": raws, "truncated": truncated},
        schema={"source": pl.String, "line_no": pl.Int64, "offset": pl.Int64, "raw": pl.String, "truncated": pl.Boolean},
    )
    out.append(Chunk("", frame.with_columns(file=pl.col("source"))))
    return out


def _groups(objects: pl.DataFrame, max_objects: int, max_bytes: int) -> Iterator[pl.DataFrame]:
    """Consecutive groups of at most ``max_objects`` objects and ``max_bytes`` bytes (at least one object)."""
    start, total = 0, 0
    sizes = objects["size"].to_list()
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_objects or total + size > max_bytes):
            yield objects.slice(start, i - start)
            start, total = i, 0
        total += size
    if start < len(sizes):
        yield objects.slice(start, len(sizes) - start)


def _version(e: dict[str, Any]) -> str:
    for k in ("generation", "ETag", "etag", "md5Hash"):
        if e.get(k):
            return str(e[k]).strip('"')
    return f"size:{e.get('size')}"


def _modified(e: dict[str, Any]) -> str:
    for k in ("LastModified", "updated", "mtime", "timeCreated"):
        v = e.get(k)
        if isinstance(v, datetime):
            return v.astimezone(UTC).isoformat()
        if v:
            return str(v)
    return ""
