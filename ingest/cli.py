"""``litellm-ingest``: a thin click layer over :mod:`ingest.pipeline`."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from ingest.sink import SinkError
from ingest.sources import SourceError
from ingest.spans import Redaction


class Exit:
    """Exit codes (documented in the README)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    QUARANTINED = 3
    MLFLOW = 4
    LOCKED = 5


def _default_state_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(os.environ.get("LITELLM_INGEST_STATE_DIR") or user_data_dir("litellm-ingest"))


def _fail(message: str, code: int) -> None:
    click.echo(f"litellm-ingest: error: {message}", err=True)
    sys.exit(code)


target_options = [
    click.option("--tracking-uri", envvar=None, help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."),
    click.option(
        "--experiment-name", help='Experiment to write to (created if missing). Default: $MLFLOW_EXPERIMENT_NAME, else "LiteLLM Proxy".'
    ),
    click.option("--experiment-id", help="Existing experiment id (instead of a name). Default: $MLFLOW_EXPERIMENT_ID."),
]


def _apply(options: list) -> callable:  # type: ignore[type-arg]
    def deco(f):  # type: ignore[no-untyped-def]
        for o in reversed(options):
            f = o(f)
        return f

    return deco


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="litellm-mlflow-ingest")
@click.option("-v", "--verbose", is_flag=True, help="Log retries and progress details to stderr.")
def main(verbose: bool) -> None:
    """Replay LiteLLM Proxy request logs (StandardLoggingPayload JSONL, SpendLogs exports) into MLflow traces."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


@main.command()
@click.argument("paths", nargs=-1, required=True)
@_apply(target_options)
@click.option("--dry-run", is_flag=True, help="Parse, dedupe and build spans; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object (for cron logs).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option(
    "--quarantine-file", type=click.Path(path_type=Path), help="Where bad records go (JSONL). Default: <state dir>/quarantine.jsonl."
)
@click.option(
    "--redact",
    type=click.Choice(["messages", "responses", "all"]),
    help="Keep prompts and/or completions out of MLflow (tokens, cost and timing stay).",
)
@click.option("--batch-size", default=200, show_default=True, help="Traces per write to MLflow.")
@click.option(
    "--mlflow-timeout",
    default=60.0,
    show_default=True,
    help="Seconds to keep retrying an unreachable or failing MLflow before giving up.",
)
def batch(
    paths: tuple[str, ...],
    tracking_uri: str | None,
    experiment_name: str | None,
    experiment_id: str | None,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
    quarantine_file: Path | None,
    redact: str | None,
    batch_size: int,
    mlflow_timeout: float,
) -> None:
    """Ingest log files, directories (recursive) or globs into MLflow."""
    from ingest.pipeline import BatchOptions, run_batch

    opts = BatchOptions(
        paths=list(paths),
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        experiment_id=experiment_id,
        dry_run=dry_run,
        quarantine_file=quarantine_file or _default_state_dir() / "quarantine.jsonl",
        redact=Redaction.parse(redact),
        batch_traces=batch_size,
        mlflow_timeout_s=mlflow_timeout,
    )
    try:
        summary = run_batch(opts)
    except SourceError as e:
        _fail(str(e), Exit.USAGE)
    except SinkError as e:
        _fail(str(e), Exit.MLFLOW)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
    elif not quiet:
        _print_summary(summary)
    sys.exit(Exit.QUARANTINED if summary.quarantined else Exit.OK)


def _print_summary(s) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    verb = "would write" if s.dry_run else "written"
    rows = [
        ("files", s.files),
        ("records read", s.records_read),
        ("quarantined", f"{s.quarantined}" + (f"  {s.quarantined_by_reason} -> {s.quarantine_file}" if s.quarantined else "")),
        ("duplicates dropped", s.duplicates_dropped),
        ("calls", s.calls),
        (f"traces {verb}", s.traces_written if not s.dry_run else s.calls),
        ("spans written", s.spans_written),
        ("time range", f"{s.first_start} .. {s.last_end}" if s.first_start else "-"),
        ("seconds", s.seconds),
        ("records/s", s.records_per_second),
        ("MLflow", f"{s.tracking_uri}  experiment {s.experiment_name!r} (id {s.experiment_id})"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    Console(stderr=False, highlight=False, soft_wrap=True).print(t)


if __name__ == "__main__":
    main()
