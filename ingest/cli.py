"""``litellm-ingest``: a thin click layer over :mod:`ingest.pipeline`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from ingest import STOP_SIGNALS, StopNow
from ingest.checkpoints import LockedError, StateError
from ingest.quarantine import first_line
from ingest.stores import quiet_dependency_logs


class Exit:
    """Exit codes (documented in the README)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    QUARANTINED = 3
    MLFLOW = 4
    LOCKED = 5
    DIFFERENCES = 6
    STATE = 7
    SOURCE = 8
    INTERRUPTED = 130


class _Finite(click.FloatRange):
    """A ``FloatRange`` without nan or inf: nan passed every bound (no comparison with it holds) and
    was a traceback, as inf was (``--settle``), or a retry with no end (``--mlflow-timeout nan``)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


class _PathOrUnset(click.Path):
    """An empty value (``--state-dir "$DIR"``, the variable unset) is no value: the default, as for
    an empty environment variable. It was the current folder."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return None if value == "" else super().convert(value, param, ctx)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _workers(ctx: click.Context, param: click.Parameter, n: int) -> int:
    """Up to four per core (a server's requests wait on the network): each is a process of its own
    with MLflow loaded, and ``--workers 999999`` started that many."""
    if n > (most := max(8, 4 * _cores())):
        raise click.BadParameter(f"{n} is more than this machine runs usefully (at most {most}: four per core)")
    return n


def default_state_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(os.environ.get("LITELLM_INGEST_STATE_DIR") or user_data_dir("litellm-ingest"))


def _fail(message: str, code: int) -> None:
    click.echo(f"litellm-ingest: error: {message}", err=True)
    sys.exit(code)


def parse_time(value: str | None) -> int | None:
    """ISO date or datetime -> epoch microseconds; naive means UTC. Exact: through a float
    timestamp, a bound with microseconds came out a microsecond early for some times."""
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(re.sub(r"[zZ]$", "+00:00", value.strip()))
    except ValueError:
        raise click.BadParameter(f"not an ISO date or time: {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _paths(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """An empty PATH (a shell variable that was not set) was read as the current folder."""
    if any(v == "" for v in values):
        raise click.BadParameter("an empty path names nothing (was a variable left unset?)")
    return values


def _pattern(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Matched against file names only: an empty one, or one with a folder in it (``**/*.jsonl``),
    matched no file ever, and the daemon followed nothing without a word."""
    if not value or "/" in value:
        raise click.BadParameter(
            f"{value!r} can match no file name: give a name glob such as '*.jsonl*' (it is matched in every subdirectory)"
        )
    return value


def _time(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Parsed as click reads the option, so a bad value's error names it (``--since`` or ``--until``)."""
    return parse_time(value)


def _experiment_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """MLflow's experiment ids are numbers in its stores: another value (or ``$MLFLOW_EXPERIMENT_ID``,
    when it is the one a run takes: no ``--experiment-name`` either) was said as a store that could
    not be opened (exit 4), after the run had started. Without the flag this runs after every option
    given on the command line, so the name is known by then."""
    env = None if ctx.params.get("experiment_name") else (os.environ.get("MLFLOW_EXPERIMENT_ID") or "").strip() or None
    given = value if value is not None else env
    if given is not None and not re.fullmatch(r"\s*[0-9]+\s*", given):
        where = "" if value is not None else " (from MLFLOW_EXPERIMENT_ID)"
        raise click.BadParameter(f"{given!r}{where} is no experiment id: MLflow's are numbers (or give --experiment-name)")
    return value


def _shard(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from ingest.shard import Shard

    if value is None:
        return None
    try:
        return Shard.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _options(*opts: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def deco(f: Any) -> Any:
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def _scrub_patterns(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    """Compiled here, so a bad one is a usage error naming it, not a traceback mid-run."""
    out = []
    for value in values:
        try:
            pattern = re.compile(value)
        except re.error as e:
            raise click.BadParameter(f"{value!r} is not a valid regular expression: {e}") from None
        if pattern.search("") is not None:
            raise click.BadParameter(f"{value!r} matches the empty string")
        out.append(pattern)
    return tuple(out)


scrub_options = _options(
    click.option(
        "--scrub-pattern",
        "scrub_patterns",
        multiple=True,
        metavar="REGEX",
        callback=_scrub_patterns,
        help="Also scrub what this regex matches (its first group, if it has one) from every exported string; repeatable. "
        "Credentials are scrubbed by default.",
    ),
    click.option(
        "--no-scrub-content",
        is_flag=True,
        help="Leave prompts and completions verbatim (scrubbed by default); parameters, tags, errors and ids are always scrubbed.",
    ),
)

BATCH_HELP = "Traces per write to MLflow. Default: 200 per request to a server, 2000 per transaction into a database."

target_options = _options(
    click.option("--tracking-uri", help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."),
    click.option(
        "--experiment-name",
        help='Experiment to write to (created if missing, except by reconcile). Default: $MLFLOW_EXPERIMENT_NAME, else "LiteLLM Proxy".',
    ),
    click.option(
        "--experiment-id", callback=_experiment_id, help="Existing experiment id (instead of a name). Default: $MLFLOW_EXPERIMENT_ID."
    ),
    click.option(
        "--mlflow-timeout",
        type=_Finite(min=0),
        default=60.0,
        show_default=True,
        help="Seconds to keep retrying an unreachable or failing MLflow before giving up.",
    ),
    click.option(
        "--sql-writer",
        type=click.Choice(["bulk", "mlflow"]),
        default="bulk",
        show_default=True,
        help="For a database tracking URI: bulk (set-based inserts, the rows log_spans would write) or mlflow (MLflow's own log_spans).",
    ),
)

run_options = _options(
    click.option("--dry-run", is_flag=True, help="Parse, dedupe and build spans; write nothing (state untouched)."),
    click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object (for cron logs)."),
    click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
    click.option(
        "--state-dir",
        type=_PathOrUnset(path_type=Path),
        help="Where checkpoints, locks and the quarantine file live. Default: $LITELLM_INGEST_STATE_DIR, else the per-user data dir.",
    ),
    click.option(
        "--quarantine-file", type=_PathOrUnset(path_type=Path), help="Where bad records go (JSONL). Default: <state dir>/quarantine.jsonl."
    ),
    click.option(
        "--redact",
        type=click.Choice(["messages", "responses", "all"]),
        help="Keep prompts and/or completions out of MLflow (tokens, cost and timing stay).",
    ),
    scrub_options,
    click.option("--batch-size", type=click.IntRange(min=1), help=BATCH_HELP),
    click.option(
        "--settle",
        type=_Finite(min=0),
        default=120.0,
        show_default=True,
        help="Seconds a call whose last attempt failed is held for its retry or fallback.",
    ),
)

nest_options = _options(
    click.option(
        "--no-nest",
        is_flag=True,
        help="Do not put calls into the client application's own MLflow trace (from its traceparent); standalone traces only.",
    ),
    click.option(
        "--nest-grace",
        type=_Finite(min=0),
        default=60.0,
        show_default=True,
        help="Seconds after a call ended to wait for its app trace to reach MLflow before leaving the call standalone only.",
    ),
)

forget_option = click.option(
    "--forget-gone-after",
    type=_Finite(min=0),
    default=86400.0,
    show_default=True,
    help="Seconds a file is gone from where it was last read before its checkpoint is forgotten (a state stays as small "
    "as the folders it reads); one that comes back later is read again, which doubles nothing. 0: never forget.",
)

callback_option = click.option(
    "--replace-callback-traces",
    is_flag=True,
    help="Delete the trace LiteLLM's own mlflow callback wrote of each call written here (same experiment, same call id): "
    "one trace per call, ours. Without it, a run that finds them says each such call is shown twice.",
)

window_options = _options(
    click.option("--since", callback=_time, help="Only calls that started at or after this ISO date/time (UTC unless an offset is given)."),
    click.option(
        "--until",
        callback=_time,
        help="Only calls that started before this ISO date/time (half-open: a call at exactly --until is left out).",
    ),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="litellm-mlflow-ingest")
@click.option("-v", "--verbose", is_flag=True, help="Log retries and details to stderr.")
def main(verbose: bool) -> None:
    """Replay LiteLLM Proxy request logs (StandardLoggingPayload JSONL, SpendLogs exports) into MLflow traces."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("litellm-ingest").setLevel(logging.INFO if verbose else logging.WARNING)
    quiet_dependency_logs(verbose)
    try:
        os.getcwd()
    except FileNotFoundError:  # MLflow's import fails in it, and was taken for the store's failure
        _fail("the current folder was deleted: run from one that exists (the default store, ./mlflow.db, is made in it)", Exit.USAGE)


def _run_options(paths: tuple[str, ...], kw: dict[str, Any]) -> Any:
    from ingest.pipeline import RunOptions
    from ingest.scrub import Scrubber
    from ingest.spans import Redaction

    since, until = kw.get("since"), kw.get("until")
    if since is not None and until is not None and since >= until:
        # an empty window: a backfill wrote nothing, a reconcile said the logs and MLflow agree
        raise click.UsageError("--since must be before --until (the window is half-open: [since, until) holds no time)")
    state_dir = kw.get("state_dir") or default_state_dir()
    return RunOptions(
        paths=list(paths),
        tracking_uri=kw.get("tracking_uri"),
        experiment_name=kw.get("experiment_name"),
        experiment_id=kw.get("experiment_id"),
        dry_run=kw.get("dry_run", False),
        quarantine_file=kw.get("quarantine_file") or (None if kw.get("dry_run") else state_dir / "quarantine.jsonl"),
        redact=Redaction.parse(kw.get("redact")),
        scrub=Scrubber(kw.get("scrub_patterns") or (), content=not kw.get("no_scrub_content", False)),
        batch_traces=kw.get("batch_size"),
        mlflow_timeout_s=kw["mlflow_timeout"],
        sql_writer=kw.get("sql_writer", "bulk"),
        state_dir=state_dir,
        partial_timeout_s=kw.get("partial_timeout", 300.0),
        since_us=since,
        until_us=until,
        settle_s=kw.get("settle", 120.0),
        nest=not kw.get("no_nest", False),
        nest_grace_s=kw.get("nest_grace", 60.0),
        workers=kw.get("workers") or 1,
        shard=kw.get("shard"),
        reread_s=kw.get("reread_window", 3600.0),
        forget_gone_s=kw.get("forget_gone_after", 86400.0),
        replace_callback_traces=kw.get("replace_callback_traces", False),
    )


def _guarded(fn: Callable[[], Any]) -> Any:
    """Known failures become one line on stderr and their exit code; never a traceback. What they
    are is imported once a command runs: ``--help`` and a usage error need neither MLflow nor polars."""
    from polars.exceptions import PanicException

    from ingest.metrics import MetricsError
    from ingest.quarantine import QuarantineUnwritable
    from ingest.sink import SinkError
    from ingest.sources import SourceError, SourceUnavailable
    from ingest.stores import StoreSetupError

    try:
        return fn()
    except SourceUnavailable as e:
        _fail(str(e), Exit.SOURCE)
    except (SourceError, MetricsError) as e:
        _fail(str(e), Exit.USAGE)
    except (SinkError, StoreSetupError) as e:
        _fail(str(e), Exit.MLFLOW)
    except LockedError as e:
        _fail(str(e), Exit.LOCKED)
    except (StateError, QuarantineUnwritable) as e:
        _fail(str(e), Exit.STATE)
    except sqlite3.Error as e:
        _fail(f"a state database (ledger or nesting queue) failed: {e}", Exit.STATE)
    except OSError as e:
        if _verbose():
            traceback.print_exc()
        _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e), Exit.FAILURE)
    except (Exception, PanicException) as e:
        from mlflow.exceptions import MlflowException

        from ingest.workers import WorkerDied

        if isinstance(e, MlflowException):
            _fail(f"MLflow: {first_line(e.message or e, 300)}", Exit.MLFLOW)
        if isinstance(e, WorkerDied):
            _fail(str(e), Exit.FAILURE)
        if _verbose():
            traceback.print_exc()
        text = first_line(e, 300)
        _fail(f"unexpected {type(e).__name__}: {text} (a bug: please report it with the traceback -v prints)", Exit.FAILURE)


def _verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("verbose"))


def _still_there(path: Path, fingerprint: str) -> bool:
    """The file at a checkpoint's path is still the one it was taken on (a rotation puts a new one
    there, whose size said nothing of the lag: 0 while the rotated file had lines unread)."""
    from ingest.fingerprint import fingerprints_of
    from ingest.sources import DAMAGED, open_log

    try:
        with open_log(path) as f:
            return fingerprint.split("@", 1)[0] in fingerprints_of(f, unterminated_ok=True)
    except DAMAGED:
        return True


def _lag(ck: dict[str, Any], size: int | None, packed: str | None) -> int | None:
    """Bytes of a checkpoint's file still to read; None when unknown: the file is gone, or compressed
    and not done (its offset counts the content, its size the bytes on disk)."""
    if size is None:
        return None
    if ck.get("done"):
        return 0
    return None if packed else max(size - ck["offset"], 0)


def _finish(summary: Any, as_json: bool, quiet: bool) -> None:
    """The summary, and the exit code of what the run did: a summary that cannot be printed (stdout
    closed, or a cron log's disk full) changes neither, and is no traceback."""
    with contextlib.suppress(OSError, ValueError):
        if as_json:
            click.echo(json.dumps(summary.as_dict()))
        elif not quiet:
            _print_summary(summary)
        if sys.stdout is not None:
            sys.stdout.flush()
    if summary.objects_failed or summary.files_unreadable:
        sys.exit(Exit.SOURCE)
    sys.exit(Exit.QUARANTINED if summary.quarantined else Exit.OK)


@main.command()
@click.argument("paths", nargs=-1, required=True, callback=_paths)
@target_options
@run_options
@nest_options
@callback_option
@forget_option
@click.option("--no-state", is_flag=True, help="Read everything given, keep no checkpoints (a one-off replay).")
@click.option(
    "--partial-timeout",
    type=_Finite(min=0),
    default=300.0,
    show_default=True,
    help="An unterminated last line is waited for (the proxy may be mid-write) until its file is this many seconds old, then quarantined.",
)
@click.option(
    "--reread-window",
    type=_Finite(min=0, max=30 * 86400),
    default=3600.0,
    show_default=True,
    help="The proxy's database: seconds before the newest row start read that the next run reads again, for rows "
    "LiteLLM inserted late (its database away); rows read already are skipped.",
)
def batch(paths: tuple[str, ...], no_state: bool, as_json: bool, quiet: bool, **kw: Any) -> None:
    """Ingest what is new in log files, directories (recursive) or globs: run it from cron.

    Each run continues where the last one stopped (per file, through renames, rotation and
    compression); a second run started while one is working exits at once with code 5.
    """
    from ingest.pipeline import run_batch, run_incremental

    opts = _run_options(paths, kw)
    _stop_gracefully(opts.stop, quiet or as_json)
    try:
        summary = _guarded(lambda: run_batch(opts) if no_state else run_incremental(opts, "batch"))
    except KeyboardInterrupt:
        _fail("interrupted; checkpoints are saved, the next run continues", Exit.INTERRUPTED)
    _finish(summary, as_json, quiet)


@main.command()
@click.argument("paths", nargs=-1, required=True, callback=_paths)
@target_options
@run_options
@nest_options
@callback_option
@forget_option
@window_options
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=_cores,
    callback=_workers,
    show_default="the machine's cores",
    help="Processes that build (and, on PostgreSQL or a server, write) traces; calls are sharded by call id. "
    "Into SQLite this process is the one writer and N-1 workers build. The output is the same for any number.",
)
@click.option(
    "--shard",
    callback=_shard,
    metavar="I/N",
    help="Read only shard I of N of the files (by a hash of each file's fingerprint): N machines, one each, "
    "split one archive into one MLflow; calls straddling files of two shards are written once, whole. "
    "Buckets and databases are read by every shard, each writing the calls whose id hashes to it.",
)
def backfill(paths: tuple[str, ...], as_json: bool, quiet: bool, **kw: Any) -> None:
    """Ingest historical logs (many files, compressed or not, GBs): resumable, with progress.

    Keeps its own resume point, separate from the cron state (a backfill reads archives cron never
    sees, and must not move the live checkpoints); interrupt it (Ctrl-C, kill) and run the same
    command again to continue. --since/--until select calls by start time so a backfill can stop
    exactly where live ingestion began.
    """
    from ingest.warm import for_backfill, shutdown

    warm = for_backfill(list(paths), kw.get("workers") or 1, kw.get("dry_run", False), kw.get("tracking_uri"))
    try:
        from ingest.pipeline import run_incremental

        kw["partial_timeout"] = 0.0
        opts = _run_options(paths, kw)
        opts.warm = warm
        _stop_gracefully(opts.stop, quiet or as_json)
        reporter = _Progress(opts, quiet or as_json)
        try:
            summary = _guarded(lambda: run_incremental(opts, "backfill", progress=reporter.update))
        except KeyboardInterrupt:
            reporter.close()
            _fail("interrupted; progress is saved: run the same command again to continue", Exit.INTERRUPTED)
    finally:
        shutdown(warm)
    reporter.close()
    if (summary.files_resumed or summary.files_unchanged) and not (quiet or as_json):
        read = f"{summary.files_unchanged} file(s) read before, " if summary.files_unchanged else ""
        click.echo(f"resumed from the saved positions: {read}{summary.files_resumed} continued", err=True)
    _finish(summary, as_json, quiet)


def _stop_gracefully(stop: threading.Event, quiet: bool) -> None:
    """First SIGINT/SIGTERM/SIGHUP: finish the chunk in hand, save, stop. A second one stops at once."""

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise StopNow
        stop.set()
        if not quiet:
            click.echo("litellm-ingest: stopping after the current chunk (again to stop now)", err=True)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


class _Progress:
    """A rich progress bar on a terminal; a plain line every 10 s otherwise."""

    def __init__(self, opts: Any, silent: bool) -> None:
        self.silent = silent
        self.total = 0
        self.bar: Any = None
        self.last_line = 0.0
        self.started = time.monotonic()
        if silent:
            return
        from ingest.pipeline import Inputs
        from ingest.sources import SourceError

        try:
            self.total = sum(p.stat().st_size for p in Inputs.of(opts.paths, opts.own()).files)
        except (SourceError, OSError):
            return
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]backfill"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[records]} records, {task.fields[rate]}/s, {task.fields[quarantined]} quarantined"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task("backfill", total=self.total, records=0, rate=0, quarantined=0)
            self.bar.start()

    def to_read(self, summary: Any) -> int:
        """Bytes this run reads: not those of files read before or of other shards (``bytes_skipped``)."""
        return max(self.total + summary.bytes_listed - summary.bytes_skipped, 0)

    def update(self, path: str, chunk: Any, summary: Any) -> None:
        if self.silent:
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = int(summary.records_read / elapsed)
        quarantined = sum(summary.quarantined_by_reason.values()) if summary.quarantined_by_reason else 0
        total = self.to_read(summary)
        if self.bar is not None:
            self.bar.update(
                self.task, total=total, completed=summary.bytes_read, records=summary.records_read, rate=rate, quarantined=quarantined
            )
        elif time.monotonic() - self.last_line >= 10:
            self.last_line = time.monotonic()
            pct = f"{100 * summary.bytes_read / total:.1f}%" if total else "?"
            objects = f", {summary.objects_read} of {summary.objects} objects" if summary.objects else ""
            click.echo(
                f"backfill: {pct} of {total} bytes{objects}, {summary.records_read} records ({rate}/s), "
                f"{summary.traces_written} traces written, {path}",
                err=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@main.command()
@click.argument(
    "directories",
    nargs=-1,
    required=True,
    type=click.Path(file_okay=False),
    callback=lambda ctx, param, values: tuple(Path(v) for v in _paths(ctx, param, values)),
)
@target_options
@click.option(
    "--pattern",
    default="*.jsonl*",
    show_default=True,
    callback=_pattern,
    help="File names to follow (glob, matched in every subdirectory).",
)
@click.option("--polling", is_flag=True, help="Poll the directories instead of inotify (NFS and other filesystems inotify does not see).")
@click.option("--from-end", is_flag=True, help="On the very first start (no state yet), skip what the files already hold.")
@click.option(
    "--state-dir", type=_PathOrUnset(path_type=Path), help="Checkpoints, lock, quarantine (shared with `batch` for the same destination)."
)
@click.option("--quarantine-file", type=_PathOrUnset(path_type=Path), help="Where bad records go. Default: <state dir>/quarantine.jsonl.")
@click.option("--redact", type=click.Choice(["messages", "responses", "all"]), help="Keep prompts and/or completions out of MLflow.")
@scrub_options
@nest_options
@callback_option
@forget_option
@click.option("--batch-size", type=click.IntRange(min=1), help=BATCH_HELP)
@click.option(
    "--batch-wait",
    type=_Finite(min=0),
    default=0.25,
    show_default=True,
    help="Seconds to gather lines after a change before sending.",
)
@click.option(
    "--partial-timeout",
    type=_Finite(min=0),
    default=60.0,
    show_default=True,
    help="Seconds an unterminated last line may wait for its newline.",
)
@click.option(
    "--max-line-bytes",
    type=click.IntRange(min=1),
    default=4 * 1024 * 1024,
    show_default=True,
    help="Longer lines are quarantined, never held in memory.",
)
@click.option(
    "--max-open-files",
    type=click.IntRange(min=1),
    help="Files kept open at once; files read to their end are closed (the longest idle first) and opened again when they change. "
    "Default: a quarter of the descriptor limit, up to 1,024.",
)
@click.option(
    "--close-inactive",
    type=_Finite(min=0),
    default=300.0,
    show_default=True,
    help="Seconds a file read to its end stays open without changing.",
)
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="Serve Prometheus /metrics and /health on this port (127.0.0.1).")
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    callback=lambda ctx, param, value: value or "127.0.0.1",  # "" (a variable unset) bound every address
    help="Address for the metrics endpoint (0.0.0.0 for every one).",
)
@click.option(
    "--shutdown-timeout",
    type=_Finite(min=0),
    default=10.0,
    show_default=True,
    help="On SIGTERM/SIGINT, seconds to flush before exiting.",
)
@click.option(
    "--settle",
    type=_Finite(min=0),
    default=120.0,
    show_default=True,
    help="Seconds a call whose last attempt failed is held for its retry or fallback.",
)
def tail(directories: tuple[Path, ...], **kw: Any) -> None:
    """Follow log files as the proxy writes them (a daemon): through rotation, restarts and MLflow outages.

    Logs one line per noteworthy event to stderr. Stop it with SIGTERM or Ctrl-C: it flushes,
    saves its checkpoints and exits 0. A directory that does not exist yet is followed once it does.
    """
    from ingest.tail import TailOptions, run_tail

    logging.getLogger("litellm-ingest").setLevel(logging.INFO)
    base = _run_options(tuple(str(d) for d in directories), kw)
    opts = TailOptions(
        **{f: getattr(base, f) for f in base.__dataclass_fields__},
    )
    opts.pattern = kw["pattern"]
    opts.polling = kw["polling"]
    opts.from_end = kw["from_end"]
    opts.batch_wait_s = kw["batch_wait"]
    opts.max_line_bytes = kw["max_line_bytes"]
    opts.metrics_port = kw.get("metrics_port")
    opts.metrics_host = kw["metrics_host"]
    opts.shutdown_timeout_s = kw["shutdown_timeout"]
    opts.max_open_files = kw.get("max_open_files")
    opts.close_inactive_s = kw["close_inactive"]
    _guarded(lambda: run_tail(opts, list(directories)))


@main.command()
@click.option("--state-dir", type=_PathOrUnset(path_type=Path), help="State dir to read (default as for batch).")
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
def status(state_dir: Path | None, as_json: bool) -> None:
    """Show what each mode has ingested: per file, fingerprint, offset/size (lag), last run and result.

    A state file that cannot be used (corrupt, newer version, unreadable) is shown as such and the
    exit code is 7; copies of corrupt states that runs kept aside are listed.
    """
    _guarded(lambda: _status(state_dir, as_json))


def _status(state_dir: Path | None, as_json: bool) -> None:
    from ingest.checkpoints import all_states, corrupt_copies
    from ingest.sources import compression_of

    state_dir = state_dir or default_state_dir()
    if state_dir.exists() and not state_dir.is_dir():  # said "no state in" it, exit 0; batch refuses it (7)
        _fail(f"the state dir {state_dir} is not a folder (--state-dir / LITELLM_INGEST_STATE_DIR)", Exit.STATE)
    states = all_states(state_dir)
    kept = [str(p) for p in corrupt_copies(state_dir)]
    code = Exit.STATE if any("problem" in st for st in states) else Exit.OK
    rows = []
    for st in states:
        held: dict[str, int] = {}
        for h in st.get("held", []):
            held[h.get("file")] = held.get(h.get("file"), 0) + 1
        for ck in st.get("checkpoints", []):
            try:
                size: int | None = Path(ck["path"]).stat().st_size
            except OSError:  # gone, or in a folder this user may not enter
                size = None
            replaced = size is not None and not ck.get("done") and not _still_there(Path(ck["path"]), ck["fingerprint"])
            size = None if replaced else size
            packed = compression_of(Path(ck["path"])) if size is not None else None
            lag = _lag(ck, size, packed)
            rows.append(
                {
                    "mode": st["mode"],
                    "destination": st.get("destination", {}),
                    "path": ck["path"],
                    "fingerprint": ck["fingerprint"],
                    "offset": ck["offset"],
                    "size": size,
                    "compressed": packed,
                    "lag_bytes": lag,
                    "held_lines": held.get(ck["fingerprint"], 0) + len(ck.get("held", [])),
                    "updated_at": ck.get("updated_at"),
                    "exists": size is not None,
                    "replaced": replaced,
                    "gone_since": ck.get("gone_at"),
                }
            )
    from ingest.ledger import Ledger, nest_pending

    remote = [
        {"mode": st["mode"], "destination": st.get("destination", {}), **item}
        for st in states
        for item in Ledger.describe(Path(st["file"]))
    ]
    runs = [
        {
            "mode": st["mode"],
            "destination": st.get("destination", {}),
            "state_file": st["file"],
            **({"problem": st["problem"]} if "problem" in st else {}),
            **{k: v for k, v in st.get("last_run", {}).items() if k != "summary"},
            "files_lost": st.get("files_lost", 0),
            "nesting": {
                **{k: st.get("last_run", {}).get("summary", {}).get(k, 0) for k in ("nested_calls", "app_traces_missing")},
                "nest_pending": nest_pending(Path(st["file"])) or 0,
            },
        }
        for st in states
    ]
    if as_json:
        click.echo(json.dumps({"state_dir": str(state_dir), "runs": runs, "files": rows, "remote": remote, "corrupt_copies": kept}))
        sys.exit(code)
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 1000)
    if not states and not kept:
        console.print(f"no state in {state_dir}")
        return
    for r in runs:
        if "problem" in r:
            console.print(f"[bold]{r['mode']}[/bold] {escape(r['state_file'])}: [bold red]unusable[/bold red]: {escape(r['problem'])}")
            continue
        dest = r["destination"]
        console.print(
            f"[bold]{r['mode']}[/bold]{escape(_window(dest))} -> {dest.get('tracking_uri')} (experiment {dest.get('experiment_id')}): "
            f"last run {r.get('started') or '-'} .. {r.get('finished') or '(running or killed)'} " + escape(f"[{r.get('result')}]")
        )
        if r["files_lost"]:
            console.print(
                f"  [bold yellow]its files database lost {r['files_lost']} file checkpoint(s)[/bold yellow]: "
                "the next run reads those files again (their traces are written again, not doubled)"
            )
        n = r["nesting"]
        if any(n.values()):
            console.print(
                f"  last run nested {n['nested_calls']} call(s) into their app's trace, {n['app_traces_missing']} stayed standalone "
                f"(app trace not found); {n['nest_pending']} waiting for their app trace now"
            )
    t = Table("mode", "path", "fingerprint", "offset / size", "lag", "held", "updated")
    for r in rows:
        t.add_row(
            r["mode"] + _window(r["destination"]),
            r["path"]
            + (" (another file now: rotated)" if r["replaced"] else "" if r["exists"] else " (gone)")
            + (f" (gone since {r['gone_since']}: forgotten after --forget-gone-after)" if r["gone_since"] else ""),
            r["fingerprint"][7:19],
            f"{r['offset']} / {r['size'] if r['size'] is not None else '-'}" + (f" {r['compressed']}" if r["compressed"] else ""),
            str(r["lag_bytes"]) if r["lag_bytes"] is not None else "-",
            str(r["held_lines"]),
            r["updated_at"] or "-",
        )
    if rows:
        console.print(t)
    for r in remote:
        marks = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("mode", "destination", "source", "items") and v)
        console.print(
            f"[bold]{r['mode']}[/bold] {escape(str(r['source']))}: {r.get('items', 0)} read" + (f" ({escape(marks)})" if marks else "")
        )
    for k in kept:
        console.print(f"corrupt state kept aside: {escape(k)}")
    sys.exit(code)


def _window(dest: dict[str, Any]) -> str:
    """A backfill's ``--since``/``--until``, which keep a state of their own: two backfills of one
    folder over other windows showed as two identical lines."""
    bounds = [f"{flag} {_iso_us(dest[k])}" for k, flag in (("since", "--since"), ("until", "--until")) if isinstance(dest.get(k), int)]
    return f" [{' '.join(bounds)}]" if bounds else ""


def _iso_us(us: int) -> str:
    from ingest.checkpoints import _iso_ms

    try:
        return _iso_ms(us // 1000)
    except (OverflowError, OSError, ValueError):
        return str(us)


@main.command()
@click.argument("paths", nargs=-1, required=True, callback=_paths)
@target_options
@window_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--limit", type=click.IntRange(min=0), default=50, show_default=True, help="How many missing/extra call ids to list (all with --json)."
)
@click.option(
    "--repair",
    is_flag=True,
    help="Then write the missing calls (only those; built as batch builds them, so give the same --redact and scrub options).",
)
@click.option("--redact", type=click.Choice(["messages", "responses", "all"]), help="With --repair: as the batch runs redact.")
@scrub_options
@click.option(
    "--settle",
    type=_Finite(min=0),
    default=120.0,
    show_default=True,
    help="With --repair: calls that ended less than this many seconds ago are left (a daemon may hold them for a retry).",
)
@click.option(
    "--state-dir",
    type=_PathOrUnset(path_type=Path),
    help="The runs' state dir, passed over when under a folder given. Default as for batch.",
)
@click.option(
    "--quarantine-file", type=_PathOrUnset(path_type=Path), help="Passed over as the runs' own. Default: <state dir>/quarantine.jsonl."
)
def reconcile(paths: tuple[str, ...], as_json: bool, limit: int, repair: bool, **kw: Any) -> None:
    """Compare the calls in the logs with the traces in MLflow: what is missing, what is extra (by call id).

    Exit 0 when they agree (after --repair: when every missing call was written), 6 otherwise;
    8 when some files, folders or objects could not be read (named on stderr) and no call read is
    missing: a trace that matches no call read may then be a call of what was not read.
    """
    from ingest.pipeline import now_us
    from ingest.reconcile import reconcile as run
    from ingest.reconcile import repair as write_missing

    opts = _run_options(paths, kw)
    report = _guarded(lambda: run(opts))
    if repair and report.missing:
        _guarded(lambda: write_missing(opts, report, now_us()))
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        click.echo(
            f"calls in logs: {report.calls_in_logs}  traces in MLflow: {report.traces_in_mlflow}  matched: {report.matched}  "
            f"missing: {len(report.missing)}  extra: {len(report.extra)}"
        )
        if report.window == (None, None):
            click.echo("the logs hold no call: no time window, so no trace is extra (--since/--until give one)")
        if report.callback_traces:
            click.echo(
                f"also in the window: {report.callback_traces} trace(s) of LiteLLM's own mlflow callback (not compared; "
                "each call it traced is shown twice, its trace and ours)"
            )
        if report.unreadable:
            click.echo("not compared (could not be read; named on stderr):")
            for what in report.unreadable[:limit]:
                click.echo(f"  {what}")
            if len(report.unreadable) > limit:
                click.echo(f"  ... and {len(report.unreadable) - limit} more")
        extra = "in MLflow, not in the logs"
        if report.unreadable:
            extra += " read (may be calls of what was not read)"
        lists = [("missing from MLflow", report.missing), (extra, report.extra)]
        if report.repaired is not None:
            click.echo(f"repaired: {report.repaired} of the {len(report.missing)} missing written")
            whole = report.repaired + len(report.too_recent) >= len(report.missing)
            title = "were missing (now written, but for those left below)" if whole else f"were missing ({report.repaired} of them written)"
            lists = [(title, report.missing), *lists[1:]]
            lists.append(("left: they ended less than --settle ago (a daemon may hold them)", report.too_recent))
        for title, ids in lists:
            if ids:
                click.echo(f"{title}:")
                for cid in ids[:limit]:
                    click.echo(f"  {cid}")
                if len(ids) > limit:
                    click.echo(f"  ... and {len(ids) - limit} more")
    repaired = report.repaired is not None and report.repaired == len(report.missing) and not report.differences
    if not (report.ok or repaired):
        sys.exit(Exit.DIFFERENCES)
    sys.exit(Exit.SOURCE if report.unreadable else Exit.OK)


def _print_summary(s: Any) -> None:
    """Two columns of plain lines: a value (a path) is never cut to a terminal's or cron's 80
    columns, and no line is padded to the longest."""
    unchanged = f" ({s.files_unchanged} unchanged since they were read)" if s.files_unchanged else ""
    if s.files_forgotten:
        unchanged += f" ({s.files_forgotten} checkpoint(s) of files gone forgotten)"
    kept = s.quarantine_file or "not written (dry run)"
    rows: list[tuple[str, Any]] = [
        *([("files", f"{s.files}" + unchanged)] if s.files or not (s.objects or s.db_rows) else []),
        ("records read", s.records_read),
        ("quarantined", f"{s.quarantined}" + (f"  {s.quarantined_by_reason} -> {kept}" if s.quarantined else "")),
        ("duplicates dropped", s.duplicates_dropped),
        ("calls", s.calls),
        ("traces written" if not s.dry_run else "traces (dry run)", s.traces_written if not s.dry_run else s.calls),
        *([("spans written", s.spans_written)] if not s.dry_run else []),
        ("time range", f"{s.first_start} .. {s.last_end}" if s.first_start else "-"),
        ("seconds", s.seconds),
        ("records/s", s.records_per_second),
        *([("workers", f"{s.workers} worker processes built (and wrote) the calls")] if s.workers else []),
        ("MLflow", f"{s.tracking_uri}  experiment {s.experiment_name!r} (id {s.experiment_id})"),
    ]
    if s.callback_traces or s.callback_traces_replaced:
        from ingest.callback_traces import SAMPLE as CALLBACK_SAMPLE

        many = f"{s.callback_traces}+" if s.callback_traces >= CALLBACK_SAMPLE else str(s.callback_traces)
        said = (
            f"{s.callback_traces_replaced} of LiteLLM's own mlflow callback deleted (their calls' traces are ours)"
            if s.callback_traces_replaced
            else f"{many} of LiteLLM's own mlflow callback among these calls: each is shown twice (--replace-callback-traces)"
        )
        rows.insert(rows.index(("spans written", s.spans_written)) + 1, ("callback traces", said))
    if s.calls_joined:
        joined = f"{s.calls_joined} call(s) joined to attempts MLflow held of them (counted in calls when first written)"
        rows.insert(5, ("joined in MLflow", joined))
    if s.calls_held:
        rows.insert(5, ("held for a retry", f"{s.calls_held} call(s) whose last attempt failed in the last minutes"))
    if s.calls_outside_range:
        rows.insert(5, ("outside --since/--until", s.calls_outside_range))
    if s.objects:
        failed = f", {s.objects_failed} could not be read (read again next run)" if s.objects_failed else ""
        rows.insert(1, ("objects", f"{s.objects_read} read of {s.objects} listed (the rest were read before){failed}"))
    if s.db_rows:
        rows.insert(1, ("database rows", s.db_rows))
    if s.files_unreadable:
        rows.insert(1, ("files unreadable", f"{s.files_unreadable} (permission denied: read once they can be; named on stderr)"))
    if s.files_other_shards:
        rows.insert(1, ("files of other shards", f"{s.files_other_shards} (read by the other --shard runs)"))
    if s.calls_other_shards:
        at = rows.index(("calls", s.calls)) + 1
        rows.insert(at, ("calls of other shards", f"{s.calls_other_shards} (the other --shard runs write them)"))
    if s.files_skipped:
        why = "a last line without its newline: read once it ends, quarantined once the file is unchanged for --partial-timeout"
        rows.insert(1, ("files waiting", f"{s.files_skipped} ({why})"))
    if s.state_replaced:
        rows.insert(0, ("state", f"started over: {s.state_replaced}; every file was read again"))
    if s.state_corrupt_copy:
        rows.insert(0, ("state", f"was corrupt: started from an empty state, the bad file kept as {s.state_corrupt_copy}"))
    if s.nested_calls or s.app_traces_missing or s.nest_pending or s.nest_failed:
        parts = [f"{s.nested_calls} into their app's own trace"]
        if s.nest_pending:
            parts.append(f"{s.nest_pending} waiting for it (--nest-grace)")
        if s.app_traces_missing:
            parts.append(f"{s.app_traces_missing} standalone only (app trace not in this MLflow)")
        if s.nest_failed:
            parts.append(f"{s.nest_failed} refused by MLflow")
        rows.insert(rows.index(("spans written", s.spans_written)) + 1, ("nested calls", ", ".join(parts)))
    if s.warnings:
        rows.insert(3, ("warnings", f"{s.warnings}  {s.warnings_by_kind} (fields dropped or replaced, records kept)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(click.style(k.ljust(width), bold=True) + f"  {v}")


def run() -> None:
    """The ``litellm-ingest`` script: :func:`main`, then the exit it asks for, without the
    interpreter's teardown of a heap that is about to go anyway (~1 s after a big run). Only once
    no other thread is left (or those left belong to the pool of a worker that died, which would
    never be joined, or wait on requests a second Ctrl-C abandoned) and every ``atexit`` handler ran
    (stores, logs, workers closed as on any exit); otherwise the usual exit."""
    try:
        main()
        code: Any = 0
    except SystemExit as e:
        code = e.code
        from ingest.warm import abandoned

        if (threading.active_count() > 1 and not abandoned() and code != Exit.INTERRUPTED) or not (code is None or isinstance(code, int)):
            raise
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # closed when the process started (``>&-``)
                stream.flush()
        except (OSError, ValueError):
            code = code or 1
    os._exit(code or 0)


if __name__ == "__main__":
    run()
