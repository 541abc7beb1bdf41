"""A cron run that finds nothing new, answered from its state alone, without loading MLflow.

Most runs of a cron job every few minutes find every file where the last run left it. Loading
MLflow to learn that cost 2.1 s and 283 MB a run (``import mlflow`` alone takes 1.3 s). The
experiment is looked up without it: in a SQLite store with the standard library, in PostgreSQL with
SQLAlchemy, on an MLflow server with the requests the full run makes, each waited for as the full
run waits. A run whose every file ends where its checkpoint says, with no line held, no call
waiting to nest and no experiment made anew, then only records that it ran (and forgets files
gone, as any run does). Anything else, or any doubt, is left to the full run, which then does
exactly what it did before.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from ingest.checkpoints import CorruptState, State, StateError, destination_key, has_state, now_iso, read_state, state_path
from ingest.ledger import Ledger, drop_nest_queue
from ingest.nesting import NestQueue
from ingest.sink import MissingExperiment, Target, postgresql_target
from ingest.sources import MAGIC_BYTES, compression, is_document
from ingest.stores import sqlite_path

if TYPE_CHECKING:
    from ingest.follow import Follower
    from ingest.pipeline import Inputs, RunOptions, Summary

WORKSPACE_ENV = ("MLFLOW_ENABLE_WORKSPACES", "MLFLOW_WORKSPACE", "MLFLOW_WORKSPACE_STORE_URI")
"""MLflow looks an experiment up by name within a workspace when these are set: left to MLflow."""


def sqlite_target(uri: str, name: str | None, exp_id: str | None) -> Target | None:
    """The experiment a run would write to in the SQLite store at ``uri``, read from its
    ``experiments`` table; None when there is no such file, table or active experiment (a first run
    makes them), or when workspaces may scope the name."""
    from ingest.sink import DEFAULT_EXPERIMENT_NAME

    db = sqlite_path(uri)
    if db is None or not db.is_file() or any(os.environ.get(v) for v in WORKSPACE_ENV):
        return None
    where, arg = ("experiment_id = ?", exp_id) if exp_id is not None else ("name = ?", name or DEFAULT_EXPERIMENT_NAME)
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as con:
            rows = con.execute(
                f"SELECT experiment_id, name, lifecycle_stage, creation_time FROM experiments WHERE {where}", (arg,)
            ).fetchall()
    except (sqlite3.Error, ValueError):
        return None
    if len(rows) != 1:
        return None
    (eid, ename, stage, created) = rows[0]
    if stage != "active" or (name and ename != name) or not isinstance(created, int):
        return None
    return Target(uri, str(eid), ename, created)


def server_target(opts: RunOptions) -> Target | None:
    """The experiment a run would write to on an MLflow server, found as the full run finds it (the
    same requests, retries and ``--mlflow-timeout``, without MLflow's client), creating nothing: None
    when there is no experiment of that name yet (the full run makes it). Any other failure is the
    full run's own, raised here rather than met again after the same wait."""
    from ingest.pipeline import resolve_run_target

    try:
        return resolve_run_target(opts, create=False, stoppable=True)
    except MissingExperiment:
        return None


def idle_run(opts: RunOptions, inputs: Inputs, started: float) -> Summary | None:
    """The summary of a cron run with nothing to do, its state saved; None for a run that has work,
    or whose destination cannot be told without MLflow. A server that cannot be reached or refuses
    us raises here what the full run would (:func:`server_target`)."""
    from ingest.pipeline import experiment_from
    from ingest.stores import tracking_uri_from

    if opts.dry_run or opts.shard is not None or opts.only_calls is not None or opts.state_dir is None:
        return None
    if inputs.buckets or inputs.databases or inputs.unreadable:
        return None
    if not has_state(opts.state_dir, "batch"):
        return None  # a first run here: no lookup the full run would only make again
    uri = tracking_uri_from(opts.tracking_uri)
    name, exp_id = experiment_from(opts.experiment_name, opts.experiment_id)
    if uri.startswith(("http://", "https://")):
        target = server_target(opts)
    elif uri.startswith("postgresql") and not any(os.environ.get(v) for v in WORKSPACE_ENV):
        target = postgresql_target(uri, name, exp_id, opts.mlflow_timeout_s)
    else:
        target = sqlite_target(uri, name, exp_id)
    if target is None:
        return None
    key = destination_key(target.tracking_uri, target.experiment_id)
    path = state_path(opts.state_dir, "batch", key)
    if not path.is_file():
        return None
    with State(path, "batch", key).locked():
        try:
            if read_state(path.with_suffix(path.suffix + ".tmp")) is not None or (doc := read_state(path)) is None:
                return None  # a save a crash cut short, or a state set aside as corrupt: the full run says so
        except (CorruptState, StateError):
            return None
        state = State.from_document(path, "batch", key, doc)
        try:
            return _nothing_new(state, target, opts, inputs, started)
        finally:
            state.close()


def _nothing_new(state: State, target: Target, opts: RunOptions, inputs: Inputs, started: float) -> Summary | None:
    from ingest.follow import Follower
    from ingest.pipeline import Summary, _close, size_of

    if state.held or state.settled_lost or state.experiment_created not in (None, target.created_ms):
        return None
    Ledger.beside(state.path).close()  # opened as every run opens it: a corrupt one is set aside and said
    if opts.nest:
        queue = NestQueue.beside(state.path)
        waiting = queue.size
        queue.close()
        if waiting:
            return None
    else:
        drop_nest_queue(state.path)
    follower = Follower(state, None, partial_timeout_s=opts.partial_timeout_s)  # type: ignore[arg-type]
    unchanged = follower.unchanged(inputs.files)
    waiting = [p for p in inputs.files if p not in unchanged]
    at: list[int] = []
    for p in waiting:
        n = 0 if _empty(p) else _waiting_at(follower, p)
        if n is None:
            return None
        at.append(n)
    run_started = now_iso()
    state.bind(target.created_ms)
    summary = Summary(files_unchanged=len(unchanged), files_skipped=len(waiting), files_resumed=sum(1 for n in at if n))
    summary.bytes_skipped = sum(map(size_of, unchanged))
    summary.files_forgotten = follower.forget_gone(opts.forget_gone_s)
    _close(summary, inputs.files, target, opts, started)
    summary.state_file = str(state.path)
    state.last_run = {"started": run_started, "finished": now_iso(), "result": summary.result, "summary": summary.as_dict()}
    state.save()
    return summary


def _waiting_at(follower: Follower, path: Path) -> int | None:
    """The offset ``path`` waits at (0: no checkpoint) when the full run would read nothing of it now
    and count it as waiting, else None: after the lines its checkpoint counts, its first or last line
    has no newline yet and is no whole record, and the file has not been quiet for
    ``--partial-timeout`` (then the full run reads that line, and quarantines it if bad). Such a
    file (the quick start's ``bad_input.jsonl``) sent every cron run to the full path until then."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        # lines to read (the common case), or an archive: told without decompressing it
        passed = os.pread(fd, 1, os.fstat(fd).st_size - 1) == b"\n" or bool(compression(os.pread(fd, MAGIC_BYTES, 0)))
    except OSError:
        passed = True
    if passed:
        os.close(fd)
        return None
    f = follower.identify(path, fd=fd)
    if f is None:
        return 0 if follower.out_of_descriptors is None else None
    try:
        if f.compressed or f.ck is not follower.state.checkpoints.get(f.key) or f.ck.legacy_held:
            return None  # new, taken from an earlier version's key, or with lines an old state held
        st = os.fstat(f.fd)
        rest = st.st_size - f.ck.offset
        if not 0 < rest <= follower.max_line_bytes or follower.quiet(st):
            return None
        data = os.pread(f.fd, rest, f.ck.offset)
        if b"\n" in data or is_document(data):
            return None  # a whole record is read at once
        follower.found(f.ck, path, renamed=True)  # where the full run's follow() puts it: not gone, and at this path
        return f.ck.offset
    finally:
        f.close()


def _empty(path: Path) -> bool:
    """A file with no byte yet, which a run counts as waiting for its first line."""
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return False
