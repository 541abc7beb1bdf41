"""Worker processes started before this process loads MLflow: a backfill's workers import for a
second or two (MLflow, its SQL store), and so does this process. Started first thing, from a module
that imports nothing heavy, the two start-ups overlap on two cores instead of running one after the
other. Everything the workers need is imported in them (:func:`_ready`), not here."""

from __future__ import annotations

import contextlib
import glob
import logging
import multiprocessing
import os
import signal
import stat
import threading
import time
from collections.abc import Iterable
from concurrent.futures import InvalidStateError, ProcessPoolExecutor
from itertools import chain
from pathlib import Path

from ingest import STOP_SIGNALS
from ingest.lognames import is_log_file
from ingest.stores import quiet_dependency_logs, tracking_uri_from

log = logging.getLogger(__name__)

PRESTART_BYTES = 4 << 20
"""Input files this large start the workers before the store is even opened: their start-up (imports,
a second or two) overlaps this process's instead of holding up the first step."""


def prestart(n: int, tracking_uri: str | None) -> list[ProcessPoolExecutor]:
    """The executors of a pool of ``n`` workers (``n - 1`` into SQLite, where this process writes),
    started now."""
    sqlite = tracking_uri_from(tracking_uri).startswith("sqlite:")
    warm: list[ProcessPoolExecutor] = []
    try:
        for _ in range(n - 1 if sqlite else n):
            warm.append(executor())
            warm[-1].submit(_ready)
    except BaseException:
        shutdown(warm)
        raise
    return warm


def for_backfill(paths: list[str], workers: int, dry_run: bool, tracking_uri: str | None) -> list[ProcessPoolExecutor]:
    """The workers a backfill of ``paths`` will use, started now if its local files alone are big
    enough to use them (buckets and databases start theirs at the first big step). Only a head
    start: whatever goes wrong here, the run goes on and reports it itself."""
    if workers <= 1 or dry_run:
        return []
    try:
        if _local_bytes(paths, PRESTART_BYTES) < PRESTART_BYTES:
            return []
        return prestart(workers, tracking_uri)
    except OSError:
        return []
    except Exception as e:
        log.warning("could not start the workers early (they start with the first big step): %s", e)
        return []


def for_files(files: list[Path], workers: int, dry_run: bool, tracking_uri: str | None) -> list[ProcessPoolExecutor]:
    if workers <= 1 or dry_run or sum(_size(f) for f in files) < PRESTART_BYTES:
        return []
    return prestart(workers, tracking_uri)


def _local_bytes(paths: list[str], enough: int) -> int:
    """The size of the log files ``paths`` name (as the run will find them), counted only until
    ``enough``: an archive of many files is listed whole once, by the run, not here as well. 0 when
    a path names nothing: the run stops at once, and workers would only delay that."""
    specs = [s for s in paths if "://" not in s]
    found: list[Iterable[Path]] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found.append(f for f in p.rglob("*") if is_log_file(f.name))
        elif glob.has_magic(spec):
            matches = map(Path, glob.iglob(spec, recursive=True))
            if (first := next(matches, None)) is None:
                return 0
            found.append(chain([first], matches))
        elif p.exists():
            found.append([p])
        else:
            return 0
    total = 0
    for f in chain.from_iterable(found):
        total += _size(f)
        if total >= enough:
            break
    return total


def _size(path: Path) -> int:
    """A regular file's size (0 for anything else, or a path that cannot be stat'ed)."""
    try:
        st = path.stat()
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def executor() -> ProcessPoolExecutor:
    if threading.excepthook is not _quiet_manager_crash:
        global _previous_hook
        _previous_hook = threading.excepthook
        threading.excepthook = _quiet_manager_crash
    _tracker_ignoring_hangups()
    return ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init,
        initargs=(os.getpid(), logging.getLogger("litellm-ingest").getEffectiveLevel() <= logging.INFO),
    )


def _tracker_ignoring_hangups() -> None:
    """Start multiprocessing's resource tracker (the executor's queues register with it) with SIGHUP
    ignored, as it ignores SIGINT and SIGTERM itself: a hangup of the process group killed it, the
    next queue started another, and that one printed a traceback for every semaphore it never knew."""
    if threading.current_thread() is not threading.main_thread():
        return
    from multiprocessing import resource_tracker

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGHUP, previous)


def shutdown(executors: list[ProcessPoolExecutor], at_once: bool = False) -> None:
    """Stop executors; one whose worker died is not waited for (its manager thread may be stuck
    reading the half-sent result of the killed worker, or dead): its other workers are killed.
    ``at_once`` (a run interrupted): every worker is killed, not waited for; one writing to a server
    or a database that stopped answering held a second Ctrl-C up to ``--mlflow-timeout``."""
    for ex in executors:
        if at_once or dead(ex):
            for proc in processes(ex):
                with contextlib.suppress(Exception):
                    proc.kill()
            with contextlib.suppress(Exception):
                ex._call_queue.cancel_join_thread()  # type: ignore[attr-defined]
            ex.shutdown(wait=False, cancel_futures=True)
            _abandoned.append(ex)
        else:
            ex.shutdown(wait=True, cancel_futures=True)


_previous_hook = threading.excepthook
_abandoned: list[ProcessPoolExecutor] = []


def abandoned() -> bool:
    """An executor was left behind after a worker died: its threads may never end (one can be
    blocked on the dead worker's pipe), so the process must exit without joining them."""
    return bool(_abandoned)


def _quiet_manager_crash(args: threading.ExceptHookArgs) -> None:
    """CPython < 3.12: a worker that dies while a queued task was cancelled crashes the executor's
    manager thread (InvalidStateError) with a traceback on stderr. :func:`dead` notices the death
    itself, so that traceback says nothing the run's own one-line error does not."""
    if isinstance(args.exc_value, InvalidStateError) and type(args.thread).__name__ == "_ExecutorManagerThread":
        return
    _previous_hook(args)


def dead(ex: ProcessPoolExecutor) -> bool:
    """A worker of ``ex`` has ended (killed, out of memory) or the executor knows it is broken.
    Checked by the process, not left to the executor: Python's own detection hangs when a worker
    dies while sending a result, and crashes when a queued task was cancelled (CPython < 3.12)."""
    if getattr(ex, "_broken", False):
        return True
    return any(proc.exitcode is not None for proc in processes(ex))


def processes(ex: ProcessPoolExecutor) -> list[multiprocessing.process.BaseProcess]:
    """The executor's worker processes (none before its first task or after its shutdown)."""
    return list((getattr(ex, "_processes", None) or {}).values())


def _init(parent: int, verbose: bool = False) -> None:
    """A worker ignores the stop signals (the main process finishes the step in hand, saves and stops
    it; ``timeout``, a closed terminal and systemd signal the whole process group, and a worker that
    died of SIGTERM or SIGHUP failed the run as a crash, exit 1), dies with its parent, and leaves
    reporting a database outage to the main process, which gets its error; with ``-v`` it logs its
    retries as the main process does (a spawned process has no logging set up of its own)."""
    quiet_dependency_logs(verbose=False)
    if verbose:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s[worker {os.getpid()}]: %(message)s")
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True, name="parent-watch").start()


def _ready() -> None:
    """A prestarted worker's first task: what every task needs, imported while this process opens the store."""
    import ingest.pipeline  # noqa: F401
    from ingest.allocator import tune_collector
    from ingest.sql_bulk import _mlflow_parts

    _mlflow_parts()
    tune_collector()
