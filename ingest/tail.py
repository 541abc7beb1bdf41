"""Tail: a daemon that follows log files as the proxy writes them (``litellm-ingest tail``).

One watchdog observer for all watched directories (inotify instances are a limited resource;
``--polling`` switches to watchdog's polling observer for NFS and the like) only wakes the loop;
every second the loop also rescans, so a missed event costs at most that. Matching files to
checkpoints, reading, and saving what is unacknowledged are :mod:`ingest.follow`'s, as for
``batch``; this module adds what a daemon needs: an open descriptor per file kept through
renames and deletion (at most ``--max-open-files`` of them: a file read to its end is closed once
idle, and opened again when a scan sees it change), copytruncate seen on the descriptor (its first
line changes) and continued in the copy, batching by time (``--batch-wait``) and size, and outages.

While MLflow is down the daemon reports it at the first failed write (log line, ``/health`` 503,
``mlflow_up`` 0), stops reading, keeps what it had read in memory and its checkpoints where they
are, and probes MLflow with backoff; when MLflow answers it sends what it holds and reads on. A
long outage loses nothing and memory stays flat. Started while MLflow is down, it waits for it the
same way (:func:`wait_for_mlflow`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polars.exceptions import PanicException
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from ingest import STOP_SIGNALS
from ingest.allocator import tune_collector
from ingest.checkpoints import State, StateError, destination_key, now_iso, state_path
from ingest.follow import Followed, Follower, stat_key
from ingest.ledger import drop_nest_queue
from ingest.lognames import SCRATCH_SUFFIXES
from ingest.metrics import Metrics, serve
from ingest.nesting import NestQueue
from ingest.pipeline import Pipeline, RunOptions, open_target
from ingest.quarantine import QuarantineWriter, cannot_write, first_line
from ingest.sink import Sink, SinkError, Target, Watched
from ingest.sources import Chunk, age_order, descriptor_limit, is_own, path_kind, shown, walk

log = logging.getLogger("litellm-ingest.tail")


@dataclass
class TailOptions(RunOptions):
    pattern: str = "*.jsonl*"
    polling: bool = False
    from_end: bool = False
    rescan_s: float = 1.0
    batch_wait_s: float = 0.25
    max_buffer_bytes: int = 64 * 1024 * 1024
    max_line_bytes: int = 4 * 1024 * 1024
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    shutdown_timeout_s: float = 10.0
    close_after_s: float = 5.0
    max_backoff_s: float = 30.0
    max_open_files: int | None = None
    close_inactive_s: float = 300.0


RESCAN_COST = 20
"""The periodic rescan waits at least this many times what the last one took: over a folder of tens
of thousands of files (a stat each) the idle daemon stays near 5% of a core; a change still wakes it
at once through the observer."""


def open_files_budget(asked: int | None) -> int:
    """How many files the daemon keeps open at once: ``--max-open-files``, or a quarter of the
    process's descriptor limit up to 1,024, after raising that limit to its hard ceiling (as Go's
    runtime does; the soft default is often 1,024)."""
    return asked or max(8, min(1024, descriptor_limit() // 4))


class _Wake(FileSystemEventHandler):
    """Wakes the loop on a change. Not on a file opened or closed unwritten: the daemon's own reads
    are such events, and every pass that opened a file (one still without a whole first line, a
    gzipped rotation) woke the next one after ``--batch-wait``, several passes a second while idle."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("opened", "closed_no_write"):  # as strings: a watchdog without them never sends them
            self.event.set()


EXPERIMENT_CHECK_S = 60.0
"""How often a running daemon asks whether its experiment was deleted (one small request)."""


class Tailer:
    """The daemon's loop around one :class:`~ingest.follow.Follower`; :meth:`step` is one pass of it."""

    def __init__(
        self,
        opts: TailOptions,
        directories: list[Path],
        destination: tuple[Target, Sink] | None = None,
        metrics: Metrics | None = None,
        stopping: threading.Event | None = None,
        pins: Pins | None = None,
    ) -> None:
        self.opts = opts
        self.dirs = directories
        assert opts.state_dir is not None
        kept = kept_dir(opts.state_dir)
        self.kept = kept if kept.is_dir() else None
        """The copies an earlier stop kept of deleted logs (:func:`keep`): read as logs, though in the state dir."""
        self.target, self.sink = destination or open_target(opts)
        key = destination_key(self.target.tracking_uri, self.target.experiment_id)
        self.state = State.load(state_path(opts.state_dir, "batch", key), "batch", key)
        self.quarantine = QuarantineWriter(opts.quarantine_file, hold=True)
        if (said := cannot_write(opts.quarantine_file)) is not None:
            log.warning("%s; its records wait in memory until it can be", said)
        self.nest_queue = NestQueue.beside(self.state.path) if opts.nest else None
        if not opts.nest:
            drop_nest_queue(self.state.path)
        self.pipeline = Pipeline.for_run(self.sink, self.target, opts, self.quarantine, self.nest_queue)
        self.follower = Follower(
            self.state,
            self.pipeline,
            chunk_bytes=opts.chunk_bytes,
            max_line_bytes=opts.max_line_bytes,
            partial_timeout_s=opts.partial_timeout_s,
            from_end=opts.from_end,
        )
        self.follower.own_clock = True
        self.pipeline.hold_ahead = True
        self.pipeline.before_write = self._save
        self.sink.on_retry = self._write_failed
        self.sink.pause = self._pause
        self.sink.waiting = self._waiting
        self.wake = threading.Event()
        self.stopping = stopping or threading.Event()
        self.metrics = metrics or Metrics()
        self.max_open = open_files_budget(opts.max_open_files)
        self._more = False
        self._scan_s = 0.0
        self._unreadable: set[str] = set()
        self._unlisted: set[str] = set()
        self._absent: set[str] = set()
        self._restored = False
        self._failures = 0
        self._kept: dict[str, Path] = {}
        """The copies this process kept during an outage, by the key of the file they copy."""
        self._spares: dict[tuple[int, int], Followed] = {}
        """Byte copies of followed files found during an outage (a copytruncate's copy), by inode, held
        open unread: a rotation that deletes one before MLflow is back takes nothing (:meth:`_use_spares`)."""
        self.pins = pins
        self._last_down_log = self._last_error_log = self._last_state_log = -math.inf  # time.monotonic() may be under 60 s at boot
        self._experiment_checked = time.monotonic()
        self.refused: SinkError | None = None
        """Set when the experiment is gone or deleted: the daemon stops, and :meth:`run` raises it (exit 4)."""
        self._stop_by: float | None = None
        self._holding = threading.Lock()
        """One outage scan at a time: a write's retries pause, and hung calls wait, in the sending threads too."""
        self._held_at = -math.inf

    # --- lifecycle ------------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        self._stop_deadline()
        self.stopping.set()
        self.wake.set()

    def _stop_deadline(self) -> float:
        """``--shutdown-timeout`` from the signal to stop: no request to MLflow outlives it (one under
        way when the signal came is abandoned then, unacknowledged: its lines wait in the state)."""
        if self._stop_by is None:
            self._stop_by = time.monotonic() + self.opts.shutdown_timeout_s
            self.sink.give_up_at(self._stop_by)
        return self._stop_by

    def run(self) -> None:
        tune_collector()
        observer = self._watch()
        try:
            with self.state.locked():
                log.info("following %s (pattern %s) -> %s experiment %s", ", ".join(map(str, self.dirs)), self.opts.pattern,
                         self.target.shown_uri, self.target.experiment_id)  # fmt: skip
                self.state.last_run = {"started": now_iso(), "result": "running", "pid": os.getpid(), "mode": "tail"}
                self._save(self.state.save)
                while not self.stopping.is_set():
                    self.step()
                    if self._more:
                        self.wake.set()
                    self.wake.wait(max(self.opts.rescan_s, RESCAN_COST * self._scan_s))
                    if self.wake.is_set() and not self.stopping.is_set():
                        time.sleep(self.opts.batch_wait_s)
                    self.wake.clear()
                self.shutdown()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            self.close()
        if self.refused is not None:
            raise self.refused

    def _watch(self) -> BaseObserver | None:
        """The observer that wakes the loop on a change; None when the system refuses one (inotify's
        per-user instance or watch limit, often reached on a busy Kubernetes node): the rescan every
        ``rescan_s`` then finds every change on its own, a second later at most."""
        observer = PollingObserver(timeout=self.opts.rescan_s) if self.opts.polling else Observer()
        handler = _Wake(self.wake)
        try:
            for d in self.dirs:
                if d.is_dir():  # one made later is found by the rescan
                    observer.schedule(handler, str(d), recursive=True)
            observer.start()
        except OSError as e:
            log.warning("cannot watch %s for changes (%s); finding them by rescanning every %gs", ", ".join(map(str, self.dirs)), e,
                        self.opts.rescan_s)  # fmt: skip
            with contextlib.suppress(Exception):
                observer.stop()
            return None
        return observer

    def close(self) -> None:
        if self.pins is not None:
            self.pins.close()
        for spare in self._spares.values():
            spare.close()
        self._spares.clear()
        self.follower.close()
        self.sink.close()
        if self.nest_queue is not None:
            self.nest_queue.close()

    def shutdown(self) -> None:
        """Flush what is read (bounded by the shutdown timeout, counted from the signal), save, and stop."""
        deadline = self._stop_deadline()
        self.sink.deadline_s = max(1.0, self.opts.shutdown_timeout_s)
        try:
            if self.refused is not None:  # the destination is gone: what was read waits for the next start
                self.follower.rewind()
            else:
                self._restore()
                self._read_and_send(deadline)
                self._nest(force=True)
                self._look_for_callback_traces(force=True)
        except SinkError as e:
            self.follower.rewind()
            log.warning("MLflow unavailable at shutdown (%s); what it did not acknowledge is saved for the next start", e)
        for f in self.follower.files.values():
            if f.gone_since is None and not f.stale:
                with contextlib.suppress(OSError):
                    self.follower.stamp(f)
        assert self.opts.state_dir is not None
        keep_or_say(
            [(f.path, f.fd) for f in self._unread_deleted()] + (list(self.pins.deleted().values()) if self.pins is not None else []),
            self.opts.state_dir,
            "not read to their end",
        )
        self.state.last_run = {**self.state.last_run, "finished": now_iso(), "result": "stopped"}
        self._save()
        self.quarantine.retry()
        self.quarantine.abandon()
        log.info("stopped")

    def _drop_kept(self) -> None:
        """Delete the kept copies (:func:`keep`) read to their end (or whose file this process read to
        its end once MLflow was back), once the state that says so is saved."""
        done = {copy for key, copy in self._kept.items() if (f := self.follower.files.get(key)) is not None and self._read_whole(f)}
        if (kept := self.kept) is not None:
            done |= {
                f.path
                for f in self.follower.files.values()
                if f.path.is_relative_to(kept) and os.path.lexists(f.path) and self._read_whole(f)
            }
            for path, st in log_files([kept], self.opts.pattern, []):
                if self.follower.still_parked(st):  # closed, read to its end, by this process or an earlier one
                    done.add(Path(path))
        if not done:
            return
        self._save()
        if not self.metrics.state_saved:
            return
        self._kept = {key: copy for key, copy in self._kept.items() if copy not in done}
        for path in sorted(done):
            with contextlib.suppress(OSError):
                path.unlink()
                path.parent.rmdir()
            log.info("the lines of the kept copy %s are in MLflow; deleted it", path)

    def _read_whole(self, f: Followed) -> bool:
        with contextlib.suppress(OSError):
            return self.follower.read_to_end(f)
        return False

    def step(self) -> None:
        """One pass: (while MLflow is down, probe it first) scan the directories, read what is new,
        send it, and move and save the checkpoints once MLflow acknowledged it."""
        try:
            if self.metrics.down_since is not None:
                self.sink.ping()
            self._restore()
            self.quarantine.retry()
            self._scan()
            if not self._more:
                self.follower.from_end = False
            if forgotten := self.follower.forget_gone(self.opts.forget_gone_s):
                self.metrics.files_forgotten += forgotten
                log.info("forgot the checkpoints of %d file(s) gone for %gs", forgotten, self.opts.forget_gone_s)
            self._read_and_send(None)
            self._drop_kept()
            self._nest()
            self._close_idle()
            self._park_idle()
            self._up()
            if time.monotonic() - self._experiment_checked >= EXPERIMENT_CHECK_S:
                self._check_experiment()
            self._look_for_callback_traces()
        except SinkError as e:
            self._outage(e)
        except (Exception, PanicException) as e:
            self._failed(e)
        self.metrics.ready = True

    def _look_for_callback_traces(self, force: bool = False) -> None:
        self.pipeline.look_for_callback_traces(force)
        self.metrics.callback_traces = self.pipeline.summary.callback_traces
        self.metrics.callback_traces_replaced = self.pipeline.summary.callback_traces_replaced

    def _restore(self) -> None:
        if not self._restored:
            self._restored = True
            self.state.bind(self.target.created_ms)
            self.follower.park_stamped()  # first: restore() writes, and a scan while it waits must not open the finished files
            self.follower.restore()

    def _nest(self, force: bool = False) -> None:
        """Calls waiting for their app trace: nest those that arrived, give up on those past the grace."""
        nester = self.pipeline.nester
        if nester is None:
            return
        nester.poll(force)
        self.pipeline.count_nesting()
        m, s = self.metrics, self.pipeline.summary
        m.nested_calls, m.app_traces_missing, m.nest_pending = s.nested_calls, s.app_traces_missing, s.nest_pending

    # --- outages ----------------------------------------------------------------------------------

    def _write_failed(self, e: Exception) -> None:
        """A write to MLflow failed and will be retried: say so now, not when the retries run out."""
        if self.metrics.down_since is None:
            self.metrics.down_since, self.metrics.down_at = time.time(), time.monotonic()
            self._last_down_log = self.metrics.down_at
            log.warning("MLflow unavailable (%s); holding checkpoints and retrying", first_line(e))
        self.metrics.mlflow_up = False

    def _up(self) -> None:
        if self.metrics.down_since is not None:
            log.warning("MLflow is back after %.0fs; resumed", time.monotonic() - (self.metrics.down_at or time.monotonic()))
        self.metrics.down_since = self.metrics.down_at = None
        self.metrics.mlflow_up = True
        self._failures = 0

    def _check_experiment(self) -> bool:
        """Stop (exit 4, as at start) if the experiment was deleted, or is gone with its store made
        anew, or the SQLite file open is no longer the store: MLflow takes traces into a deleted
        experiment, and refuses them once it is purged or gone, which would otherwise be an outage
        held for ever. True when it is."""
        self._experiment_checked = time.monotonic()
        if (problem := self.sink.experiment_problem()) is None:
            return False
        log.error("%s: stopping; what was read and not written is kept for the next start", problem)
        self.refused = SinkError(problem, kind="rejected")
        self.stop()
        return True

    def _outage(self, e: SinkError) -> None:
        """Keep what was read in memory (nothing is read again while down), back off, probe again."""
        if e.kind == "stopped":  # told to stop while MLflow did not answer: shutdown() says so
            self.follower.rewind()
            self._save()
            return
        if e.kind in ("rejected", "refused") and self._check_experiment():
            self.follower.rewind()
            self._save()
            return
        self.metrics.send_errors += 1
        self.metrics.send_retries += 1
        self._write_failed(e)
        if (now := time.monotonic()) - self._last_down_log >= 60:
            self._last_down_log = now
            assert self.metrics.down_at is not None
            log.warning("MLflow unavailable for %.0fs (%s); nothing is read until it answers", now - self.metrics.down_at, e)
        self.follower.rewind()
        self.metrics.buffer_bytes = 0
        self._failures += 1
        self._save()
        self._hold_files_until(time.monotonic() + min(self.opts.max_backoff_s, 2.0 ** min(self._failures, 5)))

    def _pause(self, delay: float) -> None:
        """Between a write's retries: wait, holding the files made meanwhile (once stopping, a plain
        sleep, and no retry past the shutdown deadline)."""
        if not self.stopping.is_set():
            self._hold_files_until(time.monotonic() + delay)
        elif time.monotonic() + delay > self._stop_deadline():
            raise SinkError("MLflow did not answer before the shutdown deadline", kind="stopped")
        else:
            time.sleep(delay)

    def _hold_files_until(self, deadline: float) -> None:
        """Wait out an outage (a write's retries, the back-off after them) scanning every ``rescan_s``:
        a file made meanwhile is opened, not read, so a rotation that deletes it before MLflow is
        back cannot take its lines."""
        while not self.stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            self.stopping.wait(min(left, self.opts.rescan_s))
            self._hold_files(keep=True)

    def _waiting(self, waited: float) -> None:
        """A call to MLflow unanswered for ``waited`` s (a write waiting up to 20 s for a SQLite lock,
        a server that took the request and went silent, for the request's 120 s): past
        ``--mlflow-timeout`` that is an outage, said and shown on ``/health``; and the files are held
        as between a write's retries, every ``rescan_s``. Only the retries' pauses held them, and a
        copytruncate's copy deleted while one call hung took the lines written after the last read."""
        if waited >= self.sink.deadline_s and not self.stopping.is_set():
            self._write_failed(TimeoutError(f"MLflow at {self.target.shown_uri} has not answered for {waited:.0f}s"))
        if waited >= self.opts.rescan_s and time.monotonic() - self._held_at >= self.opts.rescan_s:
            self._hold_files(keep=self.metrics.down_since is not None)

    def _hold_files(self, keep: bool) -> None:
        """One outage scan (:meth:`_scan` ``hold``; and, in an outage (``keep``), :meth:`_keep_deleted`:
        a write that is only slow copies no file); never raises."""
        if not self._restored or self.stopping.is_set() or not self._holding.acquire(blocking=False):
            return
        try:
            self._scan(hold=True)
            if keep:
                self._keep_deleted()
        except Exception as e:
            log.debug("a scan during the outage failed: %s", e)
        finally:
            self._held_at = time.monotonic()
            self._holding.release()

    def _keep_deleted(self) -> None:
        """During an outage: a copy in the state dir (:func:`keep`), once, of each log a rotation
        deleted before it was read to its end. A stop copies them too, but a crash or a SIGKILL
        before MLflow is back would take their lines with this process's descriptors."""
        assert self.opts.state_dir is not None
        if self.pins is not None:
            self.pins.keep_deleted(self.opts.state_dir)
        for f in self._unread_deleted():
            if f.key in self._kept:
                continue
            if (copy := keep(f.path, f.fd, kept_dir(self.opts.state_dir))) is not None:
                self._kept[f.key] = copy
                log.info("%s was deleted before it was read to its end: kept a copy in %s", f.path, kept_dir(self.opts.state_dir))

    def _unread_deleted(self) -> list[Followed]:
        """The files, followed or held as spares, that live on only in this process's descriptors with
        lines not read: deleted, and (a spare) the file it copies no longer holds them."""
        files = [f for f in self.follower.files.values() if not f.stale]
        files += [f for f in self._spares.values() if not self._twin_holds(f)]
        return [f for f in files if _deleted(f.fd) and not self._read_whole(f)]

    def _twin_holds(self, spare: Followed) -> bool:
        """The followed file ``spare`` is a copy of still holds its lines (not truncated or rewritten)."""
        known = self.follower.files.get(spare.key)
        try:
            return known is not None and known.holds_its_lines()
        except OSError:
            return False

    def _use_spares(self) -> None:
        """At the first whole scan after an outage: a file truncated meanwhile (copytruncate) whose copy
        no scan found now (deleted at once, ``rotate 0``) carries on in the copy held unread since."""
        for spare in self._spares.values():
            known = self.follower.files.get(spare.key)
            if known is None or known is spare or self._twin_holds(spare):
                spare.close()
                continue
            log.info("copytruncate: %s continues in %s (held while MLflow was down) at byte %d", known.path, spare.path, spare.ck.offset)
            known.close()
            self.follower.follow(spare)
        self._spares.clear()

    def _failed(self, e: Exception) -> None:
        """Anything else a pass raised (a full disk under the nesting queue, a bug) does not stop the
        daemon: what was in flight waits again, as in an outage, and the pass is tried again after
        a back-off; its traceback is logged once a minute."""
        self.metrics.errors += 1
        if time.monotonic() - self._last_error_log >= 60:
            self._last_error_log = time.monotonic()
            log.error("a pass failed (%s: %s); retrying", type(e).__name__, first_line(e), exc_info=e)
        self.follower.rewind()
        self._failures += 1
        self.stopping.wait(min(self.opts.max_backoff_s, 2.0 ** min(self._failures, 5)))

    def _save(self, save: Callable[[], object] | None = None) -> None:
        """Save the state. One that cannot be written (disk full, read-only) does not stop the daemon:
        what it sent stays sent (after a restart it is sent again, which changes nothing), and every
        pass tries again; said once a minute, and ``/health`` answers 503 ``state_unsaved``."""
        try:
            (save or self.follower.save)()
        except StateError as e:
            self.metrics.state_errors += 1
            if self.metrics.state_saved or time.monotonic() - self._last_state_log >= 60:
                self._last_state_log = time.monotonic()
                log.warning("%s; ingesting on, and trying again every pass", e)
            self.metrics.state_saved = False
            return
        if not self.metrics.state_saved:
            log.warning("the state is saved again")
        self.metrics.state_saved = True

    # --- files ----------------------------------------------------------------------------------

    def _candidates(self) -> list[tuple[str, os.stat_result]]:
        """The files to follow (:func:`log_files`); a folder it may not list is named once (until it can be)."""
        for d in self.dirs:
            self._note_absent(d)
        unlisted: list[str] = []
        found = log_files(self.dirs, self.opts.pattern, unlisted, self.opts.own())
        if self.kept is not None and (copies := log_files([self.kept], self.opts.pattern, unlisted)):
            found = sorted([*found, *copies], key=lambda p: age_order(p[1].st_mtime_ns, p[0]))
        for folder in sorted(set(unlisted) - self._unlisted - self._absent):
            log.warning("cannot list %s: permission denied; its files are read once it can be", folder)
        self._unlisted = set(unlisted)
        return found

    def _note_absent(self, folder: Path) -> None:
        """A folder that does not exist (yet: a sidecar started before the proxy made it; or no
        more: a volume remounted) is followed once it does; said when that changes."""
        name = str(folder)
        kind = path_kind(folder)
        if kind == "denied":
            self._absent.discard(name)
        elif kind != "dir":
            if name not in self._absent:
                self._absent.add(name)
                if kind is None:
                    log.warning("%s does not exist; its files are followed once it does", folder)
                else:
                    log.warning("%s is no folder (a %s); the files of a folder there will be followed", folder, kind)
        elif name in self._absent:
            self._absent.discard(name)
            log.info("%s exists now", folder)

    def _scan(self, hold: bool = False) -> None:
        """Match the files on disk to the followed ones: by descriptor (inode) first, then by fingerprint.

        ``hold``: only open the files not followed yet (during an outage, maybe in the middle of a
        pass's write); what became of the followed ones is for the next whole scan."""
        follower = self.follower
        files = follower.files
        by_inode: dict[tuple[int, int], Followed] = {}
        for f in files.values():
            if not f.stale:
                with contextlib.suppress(OSError):
                    st = os.fstat(f.fd)
                    by_inode.setdefault((st.st_dev, st.st_ino), f)
        seen: set[str] = set()
        parked: set[str] = set()
        if not hold:
            self._more = False
        started = time.monotonic()
        candidates = self._candidates()
        self._scan_s = time.monotonic() - started
        if self.pins is not None and not hold:
            self._follow_pinned({(st.st_dev, st.st_ino) for _, st in candidates})
        if follower.from_end and follower.from_end_files is None:
            follower.from_end_files = {(st.st_dev, st.st_ino) for _, st in candidates}
        for name, st in candidates:
            if follower.still_parked(st):
                parked.add(stat_key(st))
                continue
            path = Path(name)
            current = by_inode.get((st.st_dev, st.st_ino))
            if hold and (current is not None or (st.st_dev, st.st_ino) in self._spares):
                continue
            if current is not None:
                unchanged = st.st_size == current.ck.offset  # a rewrite shows when it grows: chunks() checks then
                if current.compressed or unchanged or (st.st_size > current.ck.offset and current.first_line() in (current.fp, None)):
                    seen.add(current.key)
                    if current.path != path and not _same_file(current.path, st):
                        log.info("rotated: %s -> %s", current.path, path)
                        current.path = path
                        follower.found(current.ck, path, renamed=True)
                    continue
                log.info("%s was truncated or rewritten in place", path)
                current.stale = True
            if len(files) + len(self._spares) >= self.max_open:
                if not hold:
                    self._more = True
                continue
            f = self.follower.identify(path)
            if f is None:
                if name not in self._unreadable and os.path.lexists(path) and not os.access(path, os.R_OK):
                    self._unreadable.add(name)
                    log.warning("cannot read %s: permission denied; it is read once it can be", path)
                else:
                    self._pin(name, st)
                continue
            self._unreadable.discard(name)
            known = files.get(f.key)
            if hold and known is not None and not f.ck.legacy_held:
                self._spares[(st.st_dev, st.st_ino)] = f
                log.info("holding %s, a copy of %s, unread until MLflow is back", path, known.path)
                continue
            if hold and f.ck.legacy_held:
                f.close()
                continue
            if known is None and self.follower.is_done(f):
                parked.add(stat_key(st))  # a compressed copy of what was read: opened again only once it changes
                follower.stamp(f)  # and after a restart, not opened at all
                follower.found(f.ck, path)
                f.close()
                continue
            if known is None:
                self.follower.follow(f)
                log.info("following %s from byte %d", path, f.ck.offset)
            elif not known.holds_its_lines():
                log.info("copytruncate: %s continues in %s at byte %d", known.path, path, known.ck.offset)
                known.close()
                by_inode = {k: v for k, v in by_inode.items() if v is not known}  # the truncated file, met later, is a new one
                self.follower.follow(f)
            else:
                f.close()
                continue
            seen.add(f.key)
        if hold:
            return
        self._use_spares()
        self._unreadable.intersection_update(name for name, _ in candidates)
        follower.parked = parked
        now = time.monotonic()
        for key, f in files.items():
            if key in seen:
                f.gone_since = None
            elif f.gone_since is None:
                f.gone_since = now
                if not f.stale:  # a file truncated in place was said so, and has no end left to read
                    log.info("%s was rotated away or deleted; reading it to its end", f.path)

    def _follow_pinned(self, listed: set[tuple[int, int]]) -> None:
        """The files held unread (while MLflow was down at start, or waiting for a first line): those
        still in a folder are the scan's; those gone (a rotation deleted them) are read through the
        held descriptor, oldest first."""
        assert self.pins is not None
        gone = []
        for key, (path, fd) in list(self.pins.held.items()):
            if key in listed:
                self.pins.release(key)
            else:
                with contextlib.suppress(OSError):
                    gone.append((os.fstat(fd).st_mtime_ns, str(path), key))
        for *_, key in sorted(gone):
            path, fd = self.pins.held[key]
            f = self.follower.identify(path, fd=os.dup(fd))
            if f is None:
                if os.fstat(fd).st_size == 0:
                    self.pins.release(key)
                continue
            self.pins.release(key)
            if f.key in self.follower.files or self.follower.is_done(f):
                f.close()
                continue
            self.follower.follow(f).gone_since = time.monotonic()
            if (copy := self.pins.kept.get(key)) is not None:
                self._kept[f.key] = copy  # deleted once this descriptor is read to its end (:meth:`_drop_kept`)
            log.info("following %s (deleted before it was read) from byte %d", path, f.ck.offset)
        if not self.pins.held:
            self.pins = None

    def _pin(self, name: str, st: os.stat_result) -> None:
        """Hold open a file not followed yet for want of a whole first line (empty, or its first line
        being written): a rotation that deletes it before the next scan (the proxy fills it and
        logrotate's ``rotate 0`` runs within the second) took its lines; the next scan reads them
        through this descriptor (:meth:`_follow_pinned`)."""
        if self.pins is None:
            self.pins = Pins(max(1, self.max_open // 4))
        self.pins.hold(name, st)

    def _close_idle(self) -> None:
        for key, f in list(self.follower.files.items()):
            if f.gone_since is None or time.monotonic() - f.gone_since < self.opts.close_after_s:
                continue
            if self.follower.read_to_end(f):
                log.info("closed %s (rotated away, read to its end)", f.path)
                self.follower.forget(key)
                self.metrics.lag.pop(shown(f.path), None)

    def _park_idle(self) -> None:
        """Close the files read to their end that have not changed for ``close_inactive_s``, and,
        while more than three quarters of ``max_open`` are open (or files wait for room), the longest
        unchanged of the rest: the next scan opens one again when it changes (:meth:`Follower.park`)."""
        idle: list[tuple[float, Followed]] = []
        for f in self.follower.files.values():
            with contextlib.suppress(OSError):
                if f.gone_since is None and not f.stale and self.follower.read_to_end(f):
                    idle.append((f.mtime(), f))
        excess = len(self.follower.files) - (0 if self._more else self.max_open * 3 // 4)
        now = time.time()
        for mtime, f in sorted(idle, key=lambda x: x[0]):
            if excess <= 0 and now - mtime < self.opts.close_inactive_s:
                break
            if self.follower.park(f):
                excess -= 1
                self.metrics.lag.pop(shown(f.path), None)

    # --- reading and sending --------------------------------------------------------------------

    def _read_and_send(self, deadline: float | None) -> None:
        """Read what is new in every file (up to the buffer cap), send it, then move checkpoints."""
        batch: list[tuple[Followed, Chunk]] = []
        buffered = 0
        for f in list(self.follower.files.values()):
            start = f.ck.offset
            for chunk in self.follower.chunks(f):
                batch.append((f, chunk))
                buffered += chunk.end_offset - start
                start = chunk.end_offset
                if buffered >= self.opts.max_buffer_bytes:
                    break
            if buffered >= self.opts.max_buffer_bytes or (deadline is not None and time.monotonic() > deadline):
                break
        self.metrics.buffer_bytes = buffered
        s = self.pipeline.summary
        before = s.traces_written, s.spans_written
        if batch:
            self.pipeline.feed_many([c for _, c in batch])
        self.pipeline.flush(final=False)
        for f, chunk in batch:
            self.follower.advance(f, chunk)
        m = self.metrics
        m.traces_written += s.traces_written - before[0]
        m.spans_written += s.spans_written - before[1]
        if s.traces_written > before[0]:
            m.last_write = time.time()
        m.records_read, m.quarantined, m.buffer_bytes = s.records_read, self.quarantine.total, 0
        m.calls_joined, m.traces_rewritten = s.calls_joined, s.traces_rewritten
        m.quarantine_unwritten = len(self.quarantine.unwritten)
        if batch:
            self.state.last_run = {**self.state.last_run, "updated": now_iso(), "summary": s.as_dict()}
        self._save()
        m.held_lines, m.files = len(self.state.held), len(self.follower.files) + len(self.follower.parked)
        m.files_open = len(self.follower.files)
        for f in self.follower.files.values():
            if not f.compressed and not f.stale:
                m.lag[shown(f.path)] = max(f.size() - f.ck.offset, 0)


def log_files(dirs: list[Path], pattern: str, unlisted: list[str], own: tuple[Path, ...] = ()) -> list[tuple[str, os.stat_result]]:
    """The regular files to follow with their stat, oldest first: at a start after downtime, the
    rotated files are read before the current one, so a call's attempts arrive in their order (as
    :func:`~ingest.sources.oldest_first`). One stat per file per scan: a scan runs every second.
    A FIFO or a device under a log name is passed over (opening a FIFO waits for a writer); the
    folders it may not list go into ``unlisted``; the daemon's own files (``own``: its quarantine file) are passed over."""
    found: list[tuple[str, os.stat_result]] = []
    resolved: dict[str, str] = {}
    for d in dirs:
        for root, name in walk(d, unlisted):
            if fnmatch.fnmatch(name, pattern) and not name.endswith(SCRATCH_SUFFIXES):
                path = os.path.join(root, name)
                if is_own(path, own, resolved):
                    continue
                try:
                    st = os.stat(path)
                except PermissionError:  # a folder it may list but not enter (``chmod -R 644``)
                    if root not in unlisted:
                        unlisted.append(root)
                    continue
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append((path, st))
    found.sort(key=lambda p: age_order(p[1].st_mtime_ns, p[0]))
    return found


class Pins:
    """The log files a daemon started while MLflow is down holds open, unread, until it can load its
    state (which is named after the experiment MLflow gives): a rotation that deletes one meanwhile
    cannot take its lines. The first scan reads those gone from their folders through these
    descriptors (:meth:`Tailer._scan`)."""

    def __init__(self, limit: int, metrics: Metrics | None = None) -> None:
        self.limit = limit
        self.held: dict[tuple[int, int], tuple[Path, int]] = {}
        self.kept: dict[tuple[int, int], Path] = {}
        """The copies :meth:`keep_deleted` made, by the inode of the file they copy."""
        self.metrics = metrics

    def keep_deleted(self, state_dir: Path) -> None:
        """A copy (:func:`keep`), once, of each held file deleted since it was taken: a crash or a
        SIGKILL while MLflow is down would take it with this process."""
        for key, (path, fd) in self.deleted().items():
            if key not in self.kept and (copy := keep(path, fd, kept_dir(state_dir))) is not None:
                self.kept[key] = copy
                log.info("%s was deleted while MLflow did not answer: kept a copy in %s", path, kept_dir(state_dir))

    def take(self, dirs: list[Path], pattern: str, own: tuple[Path, ...] = ()) -> None:
        for name, st in log_files(dirs, pattern, [], own):
            self.hold(name, st)
        if self.metrics is not None:
            self.metrics.files_open = len(self.held)

    @contextlib.contextmanager
    def holding(
        self, dirs: list[Path], pattern: str, every_s: float, own: tuple[Path, ...] = (), state_dir: Path | None = None
    ) -> Iterator[None]:
        """Take the files every ``every_s`` in a thread of its own while the block runs (probing
        MLflow blocks for seconds at a time), and keep a copy of those deleted meanwhile in ``state_dir``."""
        done = threading.Event()

        def loop() -> None:
            while not done.is_set():
                try:
                    self.take(dirs, pattern, own)
                    if state_dir is not None:
                        self.keep_deleted(state_dir)
                except Exception as e:
                    log.debug("holding the log files failed: %s", e)
                done.wait(every_s)

        thread = threading.Thread(target=loop, name="pins", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def hold(self, name: str, st: os.stat_result) -> None:
        """Open the file ``st`` describes, once, while there is room."""
        key = (st.st_dev, st.st_ino)
        if key in self.held or len(self.held) >= self.limit:
            return
        with contextlib.suppress(OSError):
            fd = os.open(name, os.O_RDONLY)
            if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == key:
                self.held[key] = (Path(name), fd)
            else:
                os.close(fd)

    def release(self, key: tuple[int, int]) -> None:
        _, fd = self.held.pop(key)
        os.close(fd)

    def deleted(self) -> dict[tuple[int, int], tuple[Path, int]]:
        """The held files deleted since they were taken, with lines in them, and their descriptors: all
        that is left of them (an empty one has nothing to keep)."""
        out = {}
        for key, (path, fd) in list(self.held.items()):
            with contextlib.suppress(OSError):
                if _deleted(fd) and os.fstat(fd).st_size:
                    out[key] = (path, fd)
        return out

    def close(self) -> None:
        for key in list(self.held):
            self.release(key)


def _deleted(fd: int) -> bool:
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return False


KEPT_DIR = "kept-logs"


def kept_dir(state_dir: Path) -> Path:
    """Where a stopping daemon keeps copies of deleted log files it had not read to their end."""
    return state_dir / KEPT_DIR


def keep(path: Path, fd: int, into: Path) -> Path | None:
    """A copy, byte for byte, of the deleted file ``fd`` holds (once named ``path``), under ``into``
    by its own name (the daemon's pattern matches it) in a folder named after its inode: the next
    start follows it as the rotated file it was, from its checkpoint (same first line, same bytes).
    Written aside, synced, then renamed, with the file's modification time. None if it cannot be."""
    try:
        st = os.fstat(fd)
        folder = into / f"{st.st_dev}-{st.st_ino}-{st.st_mtime_ns}"
        dest = folder / path.name
        if dest.is_file() and dest.stat().st_size == st.st_size:
            return dest
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        scratch = folder / f"{path.name}.tmp"
        out = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(f"/proc/self/fd/{fd}", "rb") as src, os.fdopen(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.utime(scratch, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(scratch, dest)
        return dest
    except OSError as e:
        log.debug("could not keep a copy of %s: %s", path, e)
        return None


def keep_or_say(held: list[tuple[Path, int]], state_dir: Path, how: str) -> None:
    """A stop while MLflow did not answer: log files deleted by a rotation that keeps no copy live on
    only in this process's descriptors, and what of them was not sent would go with it. Each is
    copied into the state dir for the next start to read; one that cannot be is said lost, never
    in silence (its lines are not in the state, and no later run can find them)."""
    kept, lost = [], []
    for path, fd in held:
        (kept if keep(path, fd, kept_dir(state_dir)) is not None else lost).append(path)
    if kept:
        log.warning(
            "%d log file(s) deleted by a rotation that kept no copy, %s: kept a copy in %s, which the next start reads (%s)",
            len(kept), how, kept_dir(state_dir), ", ".join(map(str, kept)),
        )  # fmt: skip
    if lost:
        log.warning(
            "%d log file(s) deleted by a rotation that kept no copy, %s, could not be copied into %s: what of them was not "
            "sent is lost with this stop (%s). Keep rotated copies (logrotate's rotate 1 or more), or stop the daemon once "
            "MLflow has taken them",
            len(lost), how, kept_dir(state_dir), ", ".join(map(str, lost)),
        )  # fmt: skip


def _same_file(path: Path, st: os.stat_result) -> bool:
    """``path`` still names the file ``st`` describes: a symlink or hard link gives one file two
    names, which is no rotation (it was logged as one, back and forth, every scan)."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


PROBE_S = 5.0
"""How long one attempt to reach MLflow at start may retry before the daemon says it waits."""


def run_tail(opts: TailOptions, directories: list[Path]) -> None:
    """The daemon: ``/metrics`` and ``/health`` from the start, MLflow waited for, then the loop."""
    stopping = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stopping.set())
    metrics = Metrics(ready=False)
    server = serve(lambda: metrics, opts.metrics_host, opts.metrics_port) if opts.metrics_port is not None else None
    try:
        pins = Pins(open_files_budget(opts.max_open_files), metrics)
        try:
            with pins.holding(directories, opts.pattern, opts.rescan_s, opts.own(), opts.state_dir):
                destination = wait_for_mlflow(opts, metrics, stopping)
        except BaseException:
            pins.close()
            raise
        if destination is None:
            assert opts.state_dir is not None
            keep_or_say(list(pins.deleted().values()), opts.state_dir, "held unread while MLflow did not answer")
            pins.close()
            log.info("stopped while waiting for MLflow" if metrics.down_since is not None else "stopped before MLflow answered")
            return
        tailer = Tailer(opts, directories, destination, metrics, stopping, pins if pins.held else None)
        for sig in STOP_SIGNALS:
            signal.signal(sig, tailer.stop)
        tailer.run()
    finally:
        if server is not None:
            server.shutdown()


def wait_for_mlflow(opts: TailOptions, metrics: Metrics, stopping: threading.Event) -> tuple[Target, Sink] | None:
    """The destination, once MLflow answers. A daemon started while MLflow is down (a reboot that
    brought the proxy up first, an outage) waits for it, as it waits out an outage once running:
    said once, then every minute, with ``/health`` 503; nothing is read meanwhile, so nothing is
    lost (:class:`Pins`); a server answering 5xx or 429 and a store locked or restarting are waited
    for the same way. MLflow refusing us (credentials, a database's password, role or name, a
    deleted experiment, a name it does not take, a store it cannot use) is a configuration error,
    and stops it (exit 4). None: stopped while waiting."""
    failures, said = 0, -math.inf
    while not stopping.is_set():
        try:
            # in a thread of its own: a database that stops answering while it is found (a frozen host,
            # a network partition) held the daemon there, SIGTERM unheeded
            try:
                opening = Watched(lambda: open_target(opts, find_timeout_s=min(PROBE_S, opts.mlflow_timeout_s)), "mlflow-open")
            except RuntimeError as e:
                raise SinkError(f"cannot look for MLflow: {first_line(e)}") from e
            while not opening.done.wait(0.25):
                if stopping.is_set():
                    return None
            return opening.result()
        except SinkError as e:
            if e.kind not in ("unreachable", "server"):  # a 5xx, 429 or a locked store: waited for too
                raise
            now = time.monotonic()
            if metrics.down_since is None:
                metrics.down_since, metrics.down_at = time.time(), now
            metrics.mlflow_up = False
            if now - said >= 60:
                said = now
                waited = f" for {now - (metrics.down_at or now):.0f}s" if failures else ""
                why = first_line(e)
                log.warning("MLflow unavailable at start%s (%s); waiting for it, nothing is read until it answers", waited, why)
            failures += 1
            stopping.wait(min(opts.max_backoff_s, 2.0 ** min(failures, 5)))
    return None
