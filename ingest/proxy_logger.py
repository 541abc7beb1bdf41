"""A LiteLLM Proxy callback that writes the logs this tool reads: one ``StandardLoggingPayload`` per line.

LiteLLM has no local-file request logger of its own (its S3/GCS/generic-API loggers write the same
records to remote sinks). In the proxy config::

    litellm_settings:
      callbacks: ["ingest.proxy_logger.jsonl_logger"]

with this package installed in the proxy's environment (``pip install '/path/to/clone[proxy]'``: not on PyPI),
or, without installing it there, a one-line file next to the config (the proxy resolves
``module.instance`` relative to the config file's folder first)::

    # litellm_ingest_callback.py
    from ingest.proxy_logger import JsonlFileLogger
    logger = JsonlFileLogger()

    callbacks: ["litellm_ingest_callback.logger"]

Settings (constructor arguments, else environment):
- ``LITELLM_INGEST_LOG_PATH``: the file (default ``./litellm-requests.jsonl``); ``{host}`` in it is
  replaced by the host name (a Kubernetes pod's name), so replicas sharing one volume never write
  the same file (``flock`` does not hold over NFS): ``/logs/litellm-{host}.jsonl``;
- ``LITELLM_INGEST_LOG_MAX_BYTES``: rotate when the file would grow past this (default 100 MiB;
  ``100M``, ``64KiB``: units of 1024; 0 disables rotation); ``LITELLM_INGEST_LOG_BACKUPS``: rotated
  files kept (default 5);
- ``LITELLM_INGEST_LOG_GZIP``: ``1`` (or ``true``, ``yes``, ``on``) to gzip rotated files
  (``x.jsonl.1.gz``, in the background);
- ``LITELLM_INGEST_LOG_MODE``: the files' permissions, in octal (default ``640``: they hold every
  prompt and response, so not for every user of the host; a tail sidecar reads them through the
  group, as Kubernetes' ``fsGroup`` gives it). The umask still applies;
- ``LITELLM_INGEST_LOG_BUFFER``: how many bytes of lines may wait for a slow disk (default 64M);
  past it, lines are counted as not written, as with a full disk.

A setting that cannot be read is said in the proxy's log and its default used.

Each record is one ``write()`` of one whole line on an ``O_APPEND`` descriptor, under a process
lock and an ``flock`` shared by all proxy workers, so lines never interleave or tear. The proxy's
async hooks encode the line on its event loop and hand the write to one writer thread, so a wait
for the ``flock`` (another worker rotating), a slow or network disk, never holds the loop that
serves every request. Rotation
(``x.jsonl`` -> ``x.jsonl.1`` -> ... ``x.jsonl.N``) happens under the same ``flock``, the way the
tail daemon expects (rename, then a new file). Nothing here ever raises into the proxy: a failure
is counted (``errors``) and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gzip
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

try:
    import orjson
except ImportError:  # on the proxy's PYTHONPATH without this package's dependencies: the standard library's
    orjson = None  # type: ignore[assignment]

try:
    from litellm.integrations.custom_logger import CustomLogger
except ImportError:  # outside a proxy (tests, tools): the same writer, without LiteLLM's base class

    class CustomLogger:  # type: ignore[no-redef]
        def __init__(self, **kwargs: Any) -> None:
            pass


log = logging.getLogger("litellm-ingest.proxy-logger")
DEFAULT_MODE = 0o640
SAY_EVERY_S = 60.0
"""While writes fail, how often the proxy's log says how many lines were lost meanwhile."""
DEFAULT_BUFFER = 64 * 1024 * 1024


def _host() -> str:
    """The host name as a file-name part: a pod's name in Kubernetes, anything odd replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()).strip(".") or "host"


_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _env_int(name: str, default: int) -> int:
    """A count or size from the environment (``100M``, ``64KiB``: units of 1024); one that cannot be read
    is said once in the proxy's log, naming the default used instead, never an error in the proxy."""
    given = os.environ.get(name, "").strip()
    if not given:
        return default
    m = re.fullmatch(r"(\d+)\s*([kmg]?)(?:i?b)?", given, re.IGNORECASE)
    if m is None:
        log.warning("%s=%r is not a count or size (such as 100M): using %d", name, given, default)
        return default
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _env_mode(name: str, default: int) -> int:
    """File permissions in octal (``640``, ``0o600``); others are said and the default used."""
    given = os.environ.get(name, "").strip()
    if not given:
        return default
    m = re.fullmatch(r"0?o?([0-7]{3})", given, re.IGNORECASE)
    if m is None or int(m.group(1), 8) & 0o600 != 0o600:
        log.warning("%s=%r is not permissions in octal that let the proxy read and write (such as 640): using %o", name, given, default)
        return default
    return int(m.group(1), 8)


def _env_flag(name: str) -> bool:
    given = os.environ.get(name, "").strip().lower()
    if given in ("", "0", "false", "no", "off"):
        return False
    if given not in ("1", "true", "yes", "on"):
        log.warning("%s=%r is neither 1 nor 0: taken as 0", name, os.environ[name])
        return False
    return True


def encode_line(payload: Any) -> bytes:
    """One JSON line, UTF-8 as the ingester reads it: a lone surrogate (half an emoji a client cut)
    stays a ``\\ud83d`` escape (written raw it was invalid UTF-8, and the call was quarantined), and a
    key that is no string is written as text (``json`` refused the record, and the call was not logged).

    orjson first: it runs on the proxy's event loop, ~11 µs for a 15 KB record against ~70 µs. NaN
    and infinities are written null either way (``json``'s ``NaN`` is no JSON to jq or a log
    shipper; the ingester reads it as null). What orjson refuses (a lone surrogate, an integer past
    64 bits) goes the standard library's way."""
    if orjson is not None:
        try:
            return orjson.dumps(payload, default=str, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)
        except TypeError:
            pass
    try:
        text = json.dumps(payload, default=str, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps(_plain(payload), default=str, ensure_ascii=False)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return "".join(f"\\u{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c for c in text).encode("utf-8") + b"\n"


def _plain(value: Any) -> Any:
    """Keys as text, NaN and infinities as null: what JSON can hold."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _after_fork(ref: weakref.ref[JsonlFileLogger]) -> None:
    """A forked process (a proxy worker) starts with no writer thread, nothing waiting and its locks
    free: its parent's writer may have held them at the fork, for good in the child."""
    if (logger := ref()) is not None:
        logger._lock, logger._waiting_lock = threading.Lock(), threading.Lock()
        logger._writer, logger._waiting = None, 0


class JsonlFileLogger(CustomLogger):
    """Appends ``kwargs["standard_logging_object"]`` of every success and failure event as a JSON line."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        max_bytes: int | None = None,
        backups: int | None = None,
        compress: bool | None = None,
        mode: int | None = None,
        buffer: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.path = Path(str(path or os.environ.get("LITELLM_INGEST_LOG_PATH") or "litellm-requests.jsonl").replace("{host}", _host()))
        self.max_bytes = max_bytes if max_bytes is not None else _env_int("LITELLM_INGEST_LOG_MAX_BYTES", 100 * 1024 * 1024)
        self.backups = max(1, backups if backups is not None else _env_int("LITELLM_INGEST_LOG_BACKUPS", 5))
        self.compress = compress if compress is not None else _env_flag("LITELLM_INGEST_LOG_GZIP")
        self.mode = mode if mode is not None else _env_mode("LITELLM_INGEST_LOG_MODE", DEFAULT_MODE)
        self.buffer = buffer if buffer is not None else _env_int("LITELLM_INGEST_LOG_BUFFER", DEFAULT_BUFFER)
        self.written = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._unsaid = 0
        self._said_at: float | None = None
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        os.register_at_fork(after_in_child=functools.partial(_after_fork, weakref.ref(self)))

    # LiteLLM's hooks: the proxy calls the async ones; library users may call the sync ones.
    async def async_log_success_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        await self.write_record_off_loop(kwargs)

    async def async_log_failure_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        await self.write_record_off_loop(kwargs)

    def log_success_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        self.write_record(kwargs)

    def log_failure_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        self.write_record(kwargs)

    def write_record(self, kwargs: dict[str, Any]) -> None:
        """Write one record here and now; never raise."""
        line = self._encode(kwargs)
        if line is not None:
            self._write_line(line)

    async def write_record_off_loop(self, kwargs: dict[str, Any]) -> None:
        """Write one record from the writer thread, returning once it is written; never raise.

        Lines are written in the order they were handed over. LiteLLM gives each callback a time
        limit and cancels it past that: the line is still written (the wait is shielded), and a
        disk that stays slow shows as LiteLLM's callback timeouts, not as a stalled proxy.
        """
        line = self._encode(kwargs)
        if line is None:
            return
        with self._waiting_lock:
            waiting = self._waiting
            if fits := waiting + len(line) <= self.buffer:
                self._waiting += len(line)
        if not fits:
            self._lost(OSError(f"{waiting:,} bytes of earlier lines still wait for the disk"))
            return
        try:
            done = self._executor().submit(self._write_line, line)
        except RuntimeError:  # the interpreter is shutting down: written here, as before
            self._done_waiting(len(line))
            self._write_line(line)
            return
        done.add_done_callback(lambda _: self._done_waiting(len(line)))
        await asyncio.shield(asyncio.wrap_future(done))

    def _done_waiting(self, size: int) -> None:
        with self._waiting_lock:
            self._waiting -= size

    def _executor(self) -> ThreadPoolExecutor:
        """The writer thread, made at the first write of each process (see :func:`_after_fork`)."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="litellm-ingest-log")
        return self._writer

    def _encode(self, kwargs: dict[str, Any]) -> bytes | None:
        try:
            payload = kwargs.get("standard_logging_object")
            return None if payload is None else encode_line(payload)
        except Exception:
            self.errors += 1
            log.exception("litellm-ingest: could not encode a request log line for %s", self.path)
            return None

    def _write_line(self, line: bytes) -> None:
        try:
            self._append(line)
            self.written += 1
        except OSError as e:
            self._lost(e)
            return
        except Exception:
            self.errors += 1
            log.exception("litellm-ingest: could not write a request log line to %s", self.path)
            return
        if self._said_at is not None:
            log.warning("litellm-ingest: writing request log lines to %s again (%d more not written)", self.path, self._unsaid)
            self._said_at, self._unsaid = None, 0

    def _lost(self, e: OSError) -> None:
        """A write the system refused (a full disk, a mount gone read-only or away): one line, not a
        traceback for every request, then one a minute at most counting the lines not written."""
        self.errors += 1
        self._unsaid += 1
        now = time.monotonic()
        if self._said_at is None or now - self._said_at >= SAY_EVERY_S:
            log.error("litellm-ingest: could not write %d request log line(s) to %s: %s", self._unsaid, self.path, e.strerror or e)
            self._said_at, self._unsaid = now, 0

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.max_bytes:
                    with contextlib.suppress(FileNotFoundError):
                        if os.path.getsize(self.path) + len(line) > self.max_bytes:
                            self._rotate()
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, self.mode)
                try:
                    start = os.fstat(fd).st_size
                    if start and os.pread(fd, 1, start - 1) != b"\n":
                        line = b"\n" + line  # a line a crashed writer left torn ends here, alone
                    try:
                        written = os.write(fd, line)
                        while written < len(line):  # a short write (signal): finish the line
                            written += os.write(fd, line[written:])
                    except OSError:
                        os.ftruncate(fd, start)  # a full disk: no torn line for the next one to join
                        raise
                finally:
                    os.close(fd)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _rotated(self, n: int, gz: bool = False) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}" + (".gz" if gz else ""))

    def _rotate(self) -> None:
        """x.jsonl.(N-1) -> x.jsonl.N, ..., x.jsonl -> x.jsonl.1: the new x.jsonl starts empty.

        Runs under the flock, so it costs a few renames; gzip, if asked for, happens afterwards in
        a background thread, never on the request path.
        """
        for gz in (False, True):
            with contextlib.suppress(FileNotFoundError):
                self._rotated(self.backups, gz).unlink()
        for n in range(self.backups - 1, 0, -1):
            for gz in (False, True):
                with contextlib.suppress(FileNotFoundError):
                    self._rotated(n, gz).rename(self._rotated(n + 1, gz))
        self.path.rename(self._rotated(1))
        if self.compress:
            fd = os.open(self._rotated(1), os.O_RDONLY)
            threading.Thread(target=self._compress, args=(fd,), daemon=True, name="litellm-ingest-gzip").start()

    def _compress(self, fd: int) -> None:
        """Gzip a rotated file (held open by ``fd``) next to wherever later rotations have moved it,
        keeping its modification time as ``gzip`` does: readers take it for the file's age. The file
        stays open until its copy is in place: closed, a file rotated out meanwhile frees its inode
        number for a newer file, whose lines the old copy then replaced."""
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.gz.tmp")
        try:
            with os.fdopen(fd, "rb") as src:
                st = os.fstat(src.fileno())
                with (
                    os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(st.st_mode)), "wb") as raw,
                    gzip.GzipFile(fileobj=raw, mode="wb") as dst,
                ):
                    shutil.copyfileobj(src, dst)
                os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
                with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    for n in range(1, self.backups + 1):
                        plain = self._rotated(n)
                        with contextlib.suppress(FileNotFoundError):
                            now = os.stat(plain)
                            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                                tmp.rename(self._rotated(n, gz=True))
                                plain.unlink()
                                return
        except Exception:
            self.errors += 1
            log.exception("litellm-ingest: could not gzip a rotated log")
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


jsonl_logger = JsonlFileLogger()
