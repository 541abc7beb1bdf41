"""Allocator settings for a batch or backfill, applied before polars is imported; and the
cyclic garbage collector's settings (:func:`tune_collector`), for every long run.

Such a run allocates and frees buffers of a chunk's size (tens of MiB: the lines, their decoded
frame, each worker's part) again and again. With polars' own jemalloc settings (freed pages given
back to the system after half a second) and glibc's (its heap trimmed as soon as the top is free),
every new buffer was faulted in afresh: about 870,000 page faults in a 20,000-record backfill,
most of its 5 s of system time. Keeping freed memory for a few seconds nearly halves them and
takes about 7% off the run (``bench/bench.py --only-sqlite`` prints the figures), for about 10%
more peak resident memory. The daemon keeps the defaults: it is long-lived and its batches small.

Settings the user gave in the environment are kept as they are.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import MutableMapping

JEMALLOC_CONF = "dirty_decay_ms:5000,muzzy_decay_ms:5000"
"""Appended by polars after its own defaults (``dirty_decay_ms:500,muzzy_decay_ms:1000``), so it wins."""
GLIBC: dict[str, tuple[int, int]] = {
    "MALLOC_TRIM_THRESHOLD_": (-1, 512 << 20),
    "MALLOC_TOP_PAD_": (-2, 64 << 20),
    "MALLOC_MMAP_THRESHOLD_": (-3, 32 << 20),
}
"""glibc's tunable -> (its ``mallopt`` parameter, value). Set in the environment for the worker
processes (glibc reads it at start) and with ``mallopt`` for this one."""
COMMANDS = frozenset({"batch", "backfill"})


def command_of(argv: list[str]) -> str | None:
    """The subcommand in the script's arguments (the group's only options are flags)."""
    return next((a for a in argv if not a.startswith("-")), None)


def tune(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Apply the settings this process can still take; returns the ones applied."""
    applied = []
    if "_RJEM_MALLOC_CONF" not in environ and "polars" not in sys.modules:
        environ["_RJEM_MALLOC_CONF"] = JEMALLOC_CONF
        applied.append("_RJEM_MALLOC_CONF")
    mallopt = _mallopt()
    for name, (param, value) in GLIBC.items():
        if name in environ:
            continue
        environ[name] = str(value)
        if mallopt is not None and mallopt(param, value) == 1:
            applied.append(name)
    return applied


def _mallopt() -> ctypes._CFuncPtr | None:
    """glibc's ``mallopt``, or None elsewhere (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


_tuned = False
YOUNG_THRESHOLD = 20_000
"""Allocations between collections of the youngest generation (Python's default: 700). Building a
trace allocates a few thousand short-lived dicts that reference counting frees anyway; collecting
every 700 walked them again and again (~20% of building and deriving a trace, measured in process)."""


def tune_collector() -> None:
    """Fit the cyclic garbage collector to a long run, once per process.

    Once MLflow, SQLAlchemy and polars are imported, a process holds several hundred thousand
    objects that live as long as it does, and every full collection walks all of them: ~300 ms
    each, 2.5 s of a 20,000-record backfill's main process (measured with ``gc.callbacks``).
    Frozen, they are never walked again; what a run allocates is collected as ever, its young
    generation every :data:`YOUNG_THRESHOLD` allocations. The price: a reference cycle made before
    this call and dropped later is never freed (start-up's, once)."""
    global _tuned
    if not _tuned:
        _tuned = True
        gc.freeze()
        gc.set_threshold(YOUNG_THRESHOLD, 10, 10)
