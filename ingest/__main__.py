"""``litellm-ingest`` (and ``python -m ingest``): what must come before polars and MLflow load, then the CLI."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from ingest import STOP_SIGNALS

OFFLINE_DEFAULTS = {"MLFLOW_MODEL_CATALOG_URI": ""}
"""MLflow prices a span that carries tokens but no cost from its model catalog, and first tries to
download the provider's price list from GitHub (three retries: about 7 s per provider and process
without a network). A replay prices from the catalog MLflow ships instead: the same cost on every
run, nothing fetched from an air-gapped host. Set the variable to a URL to have MLflow fetch it."""

DATABASE_DEFAULTS = {"PGCONNECT_TIMEOUT": "10"}
"""libpq waits for ever for a PostgreSQL that accepts the connection and never answers (a frozen
host, a network partition): a run hung in opening its store, saying nothing, whatever
``--mlflow-timeout``. Ten seconds without an answer is a failed connection instead, retried as
one is; set the variable to change it (0 waits for ever)."""


def _interrupted(signum: int, frame: Any) -> None:
    """SIGINT or SIGTERM before a command took them over (it loads polars and MLflow first, for
    seconds): not click's "Aborted!" (exit 1, which says a bug), nor a traceback from an import.
    It exits here, as a SIGKILL would (which every run survives): an exception raised from here
    could land in an import lock's callback, which prints it and swallows it, and the run went on."""
    os.write(2, b"litellm-ingest: error: interrupted\n")
    _quiet_resource_tracker()
    os._exit(130)


def _quiet_resource_tracker() -> None:
    """Backfill workers started already (before MLflow loads) left their semaphores with
    multiprocessing's resource tracker, which names them "leaked" in a warning once this process is
    gone: it goes first. The workers end with this process (they watch it)."""
    if "multiprocessing.resource_tracker" not in sys.modules:
        return
    try:
        pid = sys.modules["multiprocessing.resource_tracker"]._resource_tracker._pid  # type: ignore[attr-defined]
        if pid:
            os.kill(pid, signal.SIGKILL)
    except Exception:
        pass


def run() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupted)
    from ingest.allocator import COMMANDS, command_of, tune

    for name, value in {**OFFLINE_DEFAULTS, **DATABASE_DEFAULTS}.items():
        os.environ.setdefault(name, value)
    if command_of(sys.argv[1:]) in COMMANDS:
        tune()
    from ingest.cli import run as cli

    cli()


if __name__ == "__main__":
    run()
