"""``litellm-ingest`` (and ``python -m ingest``): what must come before polars is imported, then the CLI."""

from __future__ import annotations

import sys


def run() -> None:
    from ingest.allocator import COMMANDS, command_of, tune

    if command_of(sys.argv[1:]) in COMMANDS:
        tune()
    from ingest.cli import run as cli

    cli()


if __name__ == "__main__":
    run()
