"""Replay LiteLLM Proxy request logs into MLflow traces."""

import signal
import sys

RECURSION_LIMIT = 4000
"""A record is parsed up to orjson's 1,024 levels of nesting; encoding it again (``json``, in C)
counts each level against Python's recursion limit on top of the caller's own frames, which at
the default 1,000 refused a prompt nested ~950 deep as unwritable."""

sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What stops every command, flushed and saved as far as it got. SIGHUP too: the terminal of a
foreground daemon closed (an ssh session ended); it had died at once, its state unsaved."""


class StopNow(KeyboardInterrupt):
    """A second stop signal: stop at once. Nothing in flight is awaited (a server gone silent held
    each write up to ``--mlflow-timeout``); what was not acknowledged is read again by the next run."""
