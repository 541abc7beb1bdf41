"""Sinks: where built spans go, and the experiment they go into.

- An ``http(s)://`` tracking URI: OTLP/HTTP protobuf to the server's ``/v1/traces``, gzip, many
  traces per request, never a trace split across requests (the server stores a request
  all-or-nothing). The endpoint answers 200 even for an experiment id that does not exist, so the
  experiment is resolved and checked through the REST API first.
- Any other URI MLflow accepts (``sqlite:///``, ``postgresql://``, ...): MLflow's own tracking
  store ``log_spans``, fed ``Span.from_otel_proto`` of the same protobuf spans, exactly what the
  server does with an OTLP request. Both paths therefore store the same traces.

A batch counts as written only when MLflow acknowledged it. Transient failures (connection
errors, 5xx, 429, a locked database) are retried with exponential backoff up to a deadline.
"""

from __future__ import annotations

import functools
import gzip
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ingest.dedupe import FORMAT_PRIORITY, format_rank
from ingest.quarantine import first_line
from ingest.spans import BuiltTrace, SpanData, stored_span, with_stored_attempts
from ingest.stores import (
    OLDEST_SERVER,
    StoreSetupError,
    causes,
    locked_message,
    locked_sqlite,
    open_store,
    refused_by_database,
    setup_lock,
    shown_uri,
    sqlite_path,
    store_for,
)

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT_NAME = "LiteLLM Proxy"
EXPERIMENT_HEADER = "x-mlflow-experiment-id"
LOOKUP_CHUNK = 500
FETCH_CHUNK = 50
"""Trace ids per ``batchGet`` (a GET: the ids go in its query string)."""
NO_OTLP_ROUTE = (
    "no OTLP route at /v1/traces: a server run with --gunicorn-opts or --waitress-opts has none (use "
    "--uvicorn-opts), nor one before 3.4, or a proxy in front drops it"
)
"""What a 404 or 405 to the spans means, said first: a daemon's log line keeps 200 characters."""
T = TypeVar("T")


class SinkError(Exception):
    """MLflow could not be reached, refused us, or rejected data: one line for the user. ``kind``:
    "unreachable" and "server" are retried, "rejected" may be the data's fault (a batch is split to
    find the trace), "unauthorized" and "refused" are the destination's (a route it does not serve,
    an experiment or a store gone), "stopped": a request abandoned at a daemon's shutdown deadline
    (unacknowledged, not retried)."""

    def __init__(self, message: str, kind: str = "unreachable", status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        """Keeps ``kind`` across processes (a backfill worker's failure reaches the main process)."""
        return (SinkError, (str(self), self.kind, self.status))


@dataclass(frozen=True)
class Target:
    tracking_uri: str
    experiment_id: str
    experiment_name: str | None
    created_ms: int | None = None
    """The experiment's creation time: a store deleted and made anew at the same address gives its
    experiment the same id, and only this tells the two apart (see ``State.bind``)."""

    @property
    def is_server(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    @property
    def shown_uri(self) -> str:
        return shown_uri(self.tracking_uri)


class Sink(Protocol):
    deadline_s: float
    on_retry: Callable[[Exception], None] | None
    pause: Callable[[float], object]
    waiting: Callable[[float], object] | None
    """Told, every slice, how long a call to MLflow has been waited for so far: a daemon keeps
    watching its files while one hangs (a SQLite lock's 20 s, a server that took the request and went silent)."""
    settles: bool
    """A trace written again ends with the trace row one write of its spans leaves (state and
    previews too), so a call written as failed needs no delete before its success is written."""

    def write(self, traces: list[BuiltTrace]) -> int: ...

    def submit(self, traces: list[BuiltTrace]) -> Future[int]:
        """Start writing; the future resolves to the spans written once MLflow acknowledged them."""
        ...

    def delete(self, trace_ids: list[str], experiment_id: str | None = None) -> None: ...

    def trace_infos(self, trace_ids: list[str]) -> list[Any]:
        """MLflow's TraceInfo of those of ``trace_ids`` that exist, in any experiment (one request)."""
        ...

    def write_spans(self, spans: list[SpanData], experiment_id: str) -> int:
        """Spans into traces that already exist (MLflow files them under each trace's own experiment)."""
        ...

    def ping(self) -> None:
        """Raise SinkError unless MLflow answers now (one cheap request, no retries)."""
        ...

    def give_up_at(self, deadline: float) -> None:
        """No request to MLflow outlives ``deadline`` (``time.monotonic()``), and none starts after it:
        one still unanswered then fails as "stopped", unacknowledged (a daemon told to stop)."""
        ...

    def experiment_problem(self) -> str | None:
        """Why the experiment cannot be written to any more (deleted, or gone with its store made
        anew), asked when writes fail; None when it is there or MLflow cannot say now."""
        ...

    def close(self, at_once: bool = False) -> None:
        """``at_once`` (a second stop signal): requests in flight are abandoned, not awaited, by this
        close and any after it."""
        ...


def with_retries(
    fn: Callable[[], T],
    what: str,
    deadline_s: float,
    is_transient: Callable[[Exception], bool],
    on_retry: Callable[[Exception], None] | None = None,
    pause: Callable[[float], object] = time.sleep,
    stop: threading.Event | None = None,
) -> T:
    """Call ``fn`` until it succeeds, a non-transient error, or ``deadline_s`` of trying.

    ``on_retry`` hears of every transient failure at once, so a daemon can report an outage at its
    first failed write rather than when the deadline runs out; ``pause`` waits between tries (a
    daemon keeps watching its files meanwhile). ``stop`` set (a run's first Ctrl-C) ends the tries
    with KeyboardInterrupt: nothing is under way yet to finish first."""
    start, delay = time.monotonic(), 0.25
    if stop is not None:
        pause = functools.partial(_pause_unless_stopped, stop)
    while True:
        _check_stop(stop)
        try:
            return fn()
        except Exception as e:
            if not is_transient(e) or time.monotonic() - start + delay > deadline_s:
                raise
            if on_retry is not None:
                on_retry(e)
            log.info("%s failed (%s); retrying in %.1fs", what, first_line(e), delay)
            pause(delay)
            delay = min(delay * 2, 10.0)


_NOT_AN_ADDRESS = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema)
"""What requests raises for a URL no request can be sent to."""


class _Http:
    """A requests session that carries MLflow's usual credentials (token, basic auth, TLS settings)."""

    def __init__(self, base: str, timeout_s: float = 30.0) -> None:
        from ingest.mlflow_creds import host_creds

        try:
            creds = host_creds()
        except ValueError as e:  # MLFLOW_TRACKING_INSECURE_TLS=yes: the setting's fault, said as such
            raise SinkError(str(e), kind="rejected") from e
        self.base = base.rstrip("/")
        self.timeout = timeout_s
        self.cutoff: float | None = None
        """``time.monotonic()`` past which no request waits for its answer (a daemon's shutdown deadline)."""
        self.waiting: Callable[[float], object] | None = None
        self.session = requests.Session()
        if creds.token:
            self.session.headers["Authorization"] = f"Bearer {creds.token}"
        elif creds.username and creds.password:
            self.session.auth = (creds.username, creds.password)
        if creds.ignore_tls_verification:
            self.session.verify = False
        elif creds.server_cert_path:
            self.session.verify = creds.server_cert_path
        if creds.client_cert_path:
            self.session.cert = creds.client_cert_path

    def request(self, method: str, path: str, timeout_s: float | None = None, **kw: Any) -> requests.Response:
        """One request, not redirected: a redirected POST comes back a GET, and a login page in front of
        MLflow answers it 200, which would count spans as written that MLflow never saw. An address no
        request can go to (a space in the host name) is the URI's fault: refused, not retried."""
        try:
            resp = self._send(method, path, timeout=timeout_s or self.timeout, allow_redirects=False, **kw)
        except requests.ConnectionError as e:
            why = "connection refused" if "refused" in str(e).lower() else "connection failed"
            raise SinkError(f"cannot reach MLflow at {shown_uri(self.base)} ({why})") from e
        except requests.Timeout as e:
            raise SinkError(f"MLflow at {shown_uri(self.base)} did not answer within {timeout_s or self.timeout:.0f}s") from e
        except _NOT_AN_ADDRESS as e:
            raise SinkError(f"tracking URI {shown_uri(self.base)} is not a server's address ({first_line(e)})", kind="rejected") from e
        if resp.status_code in (401, 403):
            raise SinkError(
                f"MLflow at {shown_uri(self.base)} refused the request ({resp.status_code}): set MLFLOW_TRACKING_TOKEN "
                "or MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD",
                kind="unauthorized",
                status=resp.status_code,
            )
        if resp.is_redirect:
            to = urlsplit(resp.headers.get("location", ""))
            raise SinkError(
                f"{shown_uri(self.base)} redirected {method} {path} ({resp.status_code}) to {to.scheme + '://' if to.scheme else ''}"
                f"{to.hostname or ''}{to.path}: a login page or an http-to-https redirect in front of MLflow? Give the "
                "address MLflow answers at (nothing was written)",
                kind="unauthorized",
            )
        if resp.ok and path not in ("/health", "/version") and "text/html" in resp.headers.get("content-type", ""):
            raise SinkError(
                f"{shown_uri(self.base)} answered {method} {path} with a web page, not MLflow's API: a login or proxy page "
                "in front of MLflow? (nothing was written)",
                kind="unauthorized",
            )
        return resp

    def _send(self, method: str, path: str, **kw: Any) -> requests.Response:
        return self.within_cutoff(lambda: self.session.request(method, self.base + path, **kw), f"{method} {path}")

    def within_cutoff(self, call: Callable[[], T], what: str) -> T:
        """``call`` (a request to MLflow), run in a thread of its own so that waiting for it ends at
        ``cutoff`` even when that was set while it was under way (requests cannot cut short a read in
        progress): a daemon told to stop leaves a server that does not answer, and the request
        unanswered, unacknowledged. The thread is a daemon: it does not keep the process alive. A
        thread that cannot start (a pids limit such as systemd's ``TasksMax``) is an outage, waited out."""
        if self.cutoff is not None and time.monotonic() >= self.cutoff:
            raise self._abandoned(what)
        try:
            watched = Watched(call, "mlflow-request")
        except RuntimeError as e:
            raise SinkError(f"cannot reach MLflow at {shown_uri(self.base)}: {first_line(e)}") from e
        started = time.monotonic()
        while not watched.done.wait(0.25 if self.cutoff is None else max(0.0, min(0.25, self.cutoff - time.monotonic()))):
            if self.cutoff is not None and time.monotonic() >= self.cutoff:
                raise self._abandoned(what)
            if self.waiting is not None:
                self.waiting(time.monotonic() - started)
        return watched.result()

    def _abandoned(self, what: str) -> SinkError:
        return SinkError(f"{what} to MLflow at {shown_uri(self.base)} left unanswered: stopping", kind="stopped")


IMPORT_DEADLOCK_PAUSES_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


def import_deadlock(e: BaseException) -> bool:
    """``e`` (or an error under it) is Python's import deadlock check (``_DeadlockError``), raised in
    the thread that would close a cycle of module locks."""
    return any(type(node).__name__ == "_DeadlockError" and isinstance(node, RuntimeError) for node in causes(e))


class Watched(Generic[T]):
    """``call`` run in a daemon thread of its own, so that waiting for it can end (a stop, a silence)
    while it is under way: neither requests nor a database driver can cut short a read in progress.
    Raises RuntimeError when no thread can start (a pids limit such as systemd's ``TasksMax``).

    A call that dies of Python's import deadlock check is run again: a call abandoned while it
    imported a module (an import is slow on a busy machine) still imports it, and its retry, importing
    the same modules in another order, met it in a cycle that one of them must lose. Waiting for the
    other import to end is all it takes."""

    def __init__(self, call: Callable[[], T], name: str) -> None:
        self._answer: list[Any] = []
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(call,), name=name, daemon=True).start()

    def _run(self, call: Callable[[], T]) -> None:
        try:
            for pause in IMPORT_DEADLOCK_PAUSES_S:
                try:
                    self._answer.append(call())
                    return
                except Exception as e:
                    if not import_deadlock(e):
                        raise
                time.sleep(pause)
            self._answer.append(call())
        except BaseException as e:
            self._answer.append(e)
        finally:
            self.done.set()

    def result(self) -> T:
        """What the call returned, or its exception raised (once ``done``)."""
        if isinstance(answer := self._answer[0], BaseException):
            raise answer
        return answer


def heeding_signals(call: Callable[[], T], thread: str, stop: threading.Event | None = None) -> T:
    """``call`` in a thread of its own, waited for as long as it takes but in slices. SQLite waits for
    another process's lock inside its C code, where Python runs no signal handler until it returns:
    a Ctrl-C went unheard for the whole wait (up to the run's deadline), and two of them were one.
    ``stop`` set meanwhile ends the wait with KeyboardInterrupt (see :func:`with_retries`)."""
    watched = Watched(call, thread)
    while not watched.done.wait(0.25):
        _check_stop(stop)
    return watched.result()


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise KeyboardInterrupt


def _pause_unless_stopped(stop: threading.Event, seconds: float) -> None:
    if stop.wait(seconds):
        raise KeyboardInterrupt


def _transient_http(e: Exception) -> bool:
    return isinstance(e, SinkError) and e.kind in ("unreachable", "server")


def _check(resp: requests.Response, what: str) -> requests.Response:
    _answered(resp, what)
    if resp.status_code >= 400:
        raise SinkError(f"{what}: MLflow answered {resp.status_code}: {_said(resp, 300)}", kind="rejected", status=resp.status_code)
    return resp


def _answered(resp: requests.Response, what: str) -> requests.Response:
    """``resp``, unless the server failed it (5xx, 429): that is raised to be retried."""
    if resp.status_code >= 500 or resp.status_code == 429:
        raise SinkError(f"{what}: MLflow answered {resp.status_code}: {_said(resp, 200)}", kind="server", status=resp.status_code)
    return resp


def _said(resp: requests.Response, limit: int) -> str:
    """The body of an error answer in one line (a proxy's HTML page is many)."""
    return " ".join(resp.text.split())[:limit]


def _otlp_answer(resp: requests.Response) -> requests.Response:
    """An acknowledgement is what an OTLP endpoint answers (an ``ExportTraceServiceResponse``, as
    protobuf or JSON): anything else answering 2xx in its place (a catch-all ``OK`` of a gateway)
    would count spans as written that MLflow never saw."""
    kind = resp.headers.get("content-type", "")
    if "protobuf" not in kind and "json" not in kind:
        raise SinkError(
            f"{shown_uri(resp.url)} answered the spans {resp.status_code} with {kind or 'no content type'}, not as an OTLP "
            "endpoint does: is something in front of MLflow? (nothing was written)",
            kind="unauthorized",
        )
    return resp


def resolve_target(
    tracking_uri: str,
    experiment_name: str | None,
    experiment_id: str | None,
    deadline_s: float = 10.0,
    *,
    create: bool = True,
    stop: threading.Event | None = None,
) -> Target:
    """Find the experiment, proving on the way that MLflow is there and lets us in.

    ``create``: a missing experiment (by name) is created, as writers want. A reader (reconcile)
    passes False: it must never change the destination, so a missing experiment, or a SQLite
    store file that does not exist, is an error naming what is missing. ``stop`` (a run's): once
    set, waiting for MLflow ends with KeyboardInterrupt.
    """
    check_uri(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return _resolve_rest(tracking_uri, experiment_name, experiment_id, deadline_s, create, stop)
    return _resolve_store(tracking_uri, experiment_name, experiment_id, create, deadline_s, stop)


def check_uri(tracking_uri: str) -> None:
    """Raise SinkError for a URI that can name no destination, by its form alone (nothing is opened)."""
    if tracking_uri.startswith(("http://", "https://")):
        _refuse_malformed_server(tracking_uri)
    else:
        _refuse_non_database(tracking_uri)


DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mssql")


def _refuse_non_database(uri: str) -> None:
    """Only a database store holds spans written from outside: MLflow's file store (``./mlruns``,
    the default before MLflow 3) has no span storage, and a hosted URI (``databricks``) is no store
    this process opens. Said in one line, before anything is read."""
    scheme = urlsplit(uri).scheme.partition("+")[0].lower()
    if scheme == "sqlite" and sqlite_path(uri) is None:
        raise SinkError(
            f"{shown_uri(uri)} names no database file: an in-memory SQLite store keeps nothing past this run (sqlite:///mlflow.db)",
            kind="rejected",
        )
    if scheme in DATABASE_SCHEMES:
        return
    if scheme in ("", "file") and uri not in ("databricks", "databricks-uc", "uc"):
        raise SinkError(
            f"{shown_uri(uri)} is MLflow's file store, which cannot hold traces: use a database "
            "(sqlite:///mlflow.db; MLflow's `mlflow migrate-filestore` moves what the folder holds) "
            "or an mlflow server (http://...)",
            kind="rejected",
        )
    raise SinkError(f"tracking URI {shown_uri(uri)} is not supported: use an mlflow server (http://...) or a database URI", kind="rejected")


def _refuse_malformed_server(uri: str) -> None:
    """An ``http(s)://`` URI no request can be sent to (no host, a port that is no port, a host name
    with an empty label) is refused as any other URI that names no store: one line, before anything
    is read (it was exit 1, a bug)."""
    try:
        parts = urlsplit(uri)
        port = parts.port
        (parts.hostname or "").encode("idna")
    except UnicodeError:
        why = "a label of the host name is empty or too long"
    except ValueError as e:
        why = first_line(e)
    else:
        why = "no host" if not parts.hostname else "port 0" if port == 0 else ""
    if why:
        raise SinkError(f"tracking URI {shown_uri(uri)} is not a server's address ({why}): use http://<host>[:<port>]", kind="rejected")


class MissingExperiment(SinkError):
    """No experiment of that name: a reader's error, where a writer creates it."""


def _missing_experiment(name: str, uri: str) -> SinkError:
    return MissingExperiment(
        f"experiment {name!r} does not exist on {shown_uri(uri)} (nothing was ingested there under this name; "
        "check --experiment-name / MLFLOW_EXPERIMENT_NAME)",
        kind="rejected",
    )


def _resolve_rest(uri: str, name: str | None, exp_id: str | None, deadline_s: float, create: bool, stop: threading.Event | None) -> Target:
    http = _Http(uri)
    retried = functools.partial(with_retries, stop=stop)

    def call(method: str, path: str, what: str, **kw: Any) -> requests.Response:
        return retried(lambda: _check(http.request(method, path, **kw), what), what, deadline_s, _transient_http)

    asked = lambda: _answered(http.request("GET", "/version"), "server version")  # noqa: E731
    version = retried(asked, "server version", deadline_s, _transient_http)
    if problem := too_old(version.text if version.ok else "", uri):
        raise SinkError(problem, kind="rejected")
    if exp_id is not None:
        resp = retried(
            lambda: _answered(http.request("GET", "/api/2.0/mlflow/experiments/get", params={"experiment_id": exp_id}), "get experiment"),
            "get experiment",
            deadline_s,
            _transient_http,
        )
        _refuse_a_foreign_404(resp, uri, "get experiment")
        if _no_such_experiment(resp):
            raise SinkError(f"experiment id {exp_id} does not exist on {shown_uri(uri)}", kind="rejected")
        exp = _check(resp, "get experiment").json()["experiment"]
        _refuse_deleted(exp, uri)
        return Target(uri, exp["experiment_id"], exp.get("name"), _created_ms(exp.get("creation_time")))
    name = name or DEFAULT_EXPERIMENT_NAME
    resp = retried(
        lambda: _answered(
            http.request("GET", "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name}), "find experiment"
        ),
        "find experiment",
        deadline_s,
        _transient_http,
    )
    _refuse_a_foreign_404(resp, uri, "find experiment")
    if resp.status_code == 404 or "RESOURCE_DOES_NOT_EXIST" in resp.text:
        if not create:
            raise _missing_experiment(name, uri)

        def create_once() -> requests.Response:
            resp = http.request("POST", "/api/2.0/mlflow/experiments/create", json={"name": name})
            return resp if "RESOURCE_ALREADY_EXISTS" in resp.text else _check(resp, "create experiment")

        created = retried(create_once, "create experiment", deadline_s, _transient_http)
        if "RESOURCE_ALREADY_EXISTS" not in created.text:
            exp_id = created.json()["experiment_id"]
            resp = call("GET", "/api/2.0/mlflow/experiments/get", "get experiment", params={"experiment_id": exp_id})
        else:  # another ingester created it a moment ago: use theirs
            resp = call("GET", "/api/2.0/mlflow/experiments/get-by-name", "find experiment", params={"experiment_name": name})
    exp = _check(resp, "find experiment").json()["experiment"]
    _refuse_deleted(exp, uri)
    return Target(uri, exp["experiment_id"], name, _created_ms(exp.get("creation_time")))


def too_old(version: str, uri: str) -> str | None:
    """The one line for a server older than ``OLDEST_SERVER`` by its ``/version`` answer (None: not
    older, or no version told: a gateway in front, a build that does not say)."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version.strip()).release
    except InvalidVersion:
        return None
    if release[:2] >= OLDEST_SERVER:
        return None
    oldest = ".".join(map(str, OLDEST_SERVER))
    return (f"MLflow {version.strip()} at {shown_uri(uri)} is older than {oldest}, the oldest server that keeps these traces "
            "whole (older ones drop their tags, quote their session and user, or refuse them): upgrade the server; "
            "nothing was written")  # fmt: skip


def _no_such_experiment(resp: requests.Response) -> bool:
    """A server's answer to GetExperiment for an id it does not hold (MLflow's own 404, not a web
    server's or an ingress's for a path it does not serve: that one is no answer of MLflow's)."""
    return (resp.status_code == 404 and not _foreign_404(resp)) or (resp.status_code == 400 and "RESOURCE_DOES_NOT_EXIST" in resp.text)


def _foreign_404(resp: requests.Response) -> bool:
    """A 404 without MLflow's JSON error: the address serves no MLflow API there."""
    if resp.status_code != 404:
        return False
    try:
        body = resp.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and "error_code" in body)


def _refuse_a_foreign_404(resp: requests.Response, uri: str, what: str) -> None:
    """A wrong path (``http://host/mlflow`` for a server at the root, or the root of one served under
    a prefix) or another web server was said as "experiment does not exist": it names the address."""
    if _foreign_404(resp):
        raise SinkError(
            f"{shown_uri(uri)} answered {what} 404 without MLflow's error ({_said(resp, 120) or 'no body'}): no MLflow API "
            "at that address; check --tracking-uri / MLFLOW_TRACKING_URI (a server behind a path prefix is given with it)",
            kind="rejected",
        )


EXPERIMENT_REMEDY = "restore it or pick another experiment"


def _experiment_problem(resp: requests.Response, target: Target) -> str | None:
    """What a server's answer to GetExperiment says of the target's experiment, if it is gone."""
    if _no_such_experiment(resp):
        return f"experiment id {target.experiment_id} no longer exists on {target.shown_uri}: {EXPERIMENT_REMEDY}"
    if not resp.ok:
        return None
    try:
        exp = resp.json()["experiment"]
    except (ValueError, KeyError, TypeError):
        return None
    if exp.get("lifecycle_stage") == "deleted":
        return f"experiment {exp.get('name')!r} (id {target.experiment_id}) on {target.shown_uri} was deleted: {EXPERIMENT_REMEDY}"
    return None


def _refuse_deleted(exp: dict[str, Any], uri: str) -> None:
    if exp.get("lifecycle_stage") == "deleted":
        raise SinkError(
            f"experiment {exp.get('name')!r} (id {exp['experiment_id']}) on {shown_uri(uri)} is deleted: restore it or pick another name",
            kind="rejected",
        )


def _resolve_store(uri: str, name: str | None, exp_id: str | None, create: bool, deadline_s: float, stop: threading.Event | None) -> Target:
    if not create and (db := sqlite_path(uri)) is not None and not db.is_file():
        raise SinkError(f"no MLflow store at {shown_uri(uri)} (the file does not exist)", kind="rejected")

    # MLflow's store modules are imported here, not in the watched thread: an import is no silent
    # database (on a busy machine it outlasted the silence bound, and the lookup was abandoned).
    import mlflow.store.tracking.sqlalchemy_store
    import mlflow.tracking._tracking_service.utils  # noqa: F401

    started = time.monotonic()

    def find() -> Any:
        with setup_lock(uri):
            busy_s = max(1.0, deadline_s - (time.monotonic() - started))  # a SQLite store locked by another process
            store = open_store(uri, create=create, busy_s=busy_s)
            if exp_id is not None:
                return store.get_experiment(exp_id)
            exp = store.get_experiment_by_name(name or DEFAULT_EXPERIMENT_NAME)
            if exp is None and create:
                exp = store.get_experiment(_create_experiment(store, name or DEFAULT_EXPERIMENT_NAME))
            return exp

    exp = _store_read(uri, exp_id, find, deadline_s, stop)
    if exp is None:
        raise _missing_experiment(name or DEFAULT_EXPERIMENT_NAME, uri)
    if exp.lifecycle_stage == "deleted":
        raise SinkError(f"experiment {exp.name!r} (id {exp.experiment_id}) in {shown_uri(uri)} is deleted", kind="rejected")
    return Target(uri, exp.experiment_id, exp.name, _created_ms(exp.creation_time))


def _store_read(uri: str, exp_id: str | None, read: Callable[[], T], deadline_s: float, stop: threading.Event | None = None) -> T:
    """``read`` of the store at ``uri``, retried within ``deadline_s``. A database server may stop
    answering without closing anything (a frozen host, a network partition): the read is then
    abandoned as a write is (a SQLite file cannot go silent so, and its first schema may take a
    while to build). Failures in one line (:func:`_store_failure`)."""

    def answered() -> T:
        if sqlite_path(uri) is not None:
            return heeding_signals(read, "mlflow-db", stop)
        return answered_in_time(read, "open the MLflow store", shown_uri(uri), deadline_s, waiting=lambda _: _check_stop(stop))

    try:
        return with_retries(answered, "open the MLflow store", deadline_s, _transient_db, stop=stop)
    except StoreSetupError as e:
        raise SinkError(str(e), kind=e.kind) from e
    except Exception as e:
        raise _store_failure(uri, exp_id, e) from e


def postgresql_target(uri: str, name: str | None, exp_id: str | None, deadline_s: float) -> Target | None:
    """The experiment a run would write to in the PostgreSQL store at ``uri``, read with SQLAlchemy
    alone, for a cron run with nothing new (:mod:`ingest.idle`). None where the full run has more
    to do or to say: no schema or no such experiment yet (it makes them), a deleted one, a name two
    workspaces share, a URI SQLAlchemy cannot open. A store that does not answer is waited for as
    :func:`_resolve_store` waits, and fails as it fails: the run ends after one wait, not two."""
    import sqlalchemy
    from sqlalchemy.exc import DataError, NotSupportedError, ProgrammingError
    from sqlalchemy.pool import NullPool

    if exp_id is not None and not exp_id.isdigit():
        return None
    where, value = ("experiment_id = :v", int(exp_id)) if exp_id is not None else ("name = :v", name or DEFAULT_EXPERIMENT_NAME)
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool)
    except Exception:
        return None

    def read() -> list[Any] | None:
        with engine.connect() as conn:
            try:
                if conn.execute(sqlalchemy.text("SELECT to_regclass('experiments')")).scalar() is None:
                    return None
                query = f"SELECT experiment_id, name, lifecycle_stage, creation_time FROM experiments WHERE {where}"
                return list(conn.execute(sqlalchemy.text(query), {"v": value}).fetchall())
            except (ProgrammingError, DataError, NotSupportedError):
                return None  # answered, but not as MLflow's schema would (a privilege, a look-alike database): the full run's to say

    try:
        rows = _store_read(uri, exp_id, read, deadline_s)
    finally:
        engine.dispose()
    if rows is None or len(rows) != 1:
        return None
    eid, ename, stage, created = rows[0]
    if stage != "active" or (name and ename != name):
        return None
    return Target(uri, str(eid), ename, _created_ms(created))


def _store_failure(uri: str, exp_id: str | None, e: Exception) -> SinkError:
    """Why a database store could not be opened, and whether waiting helps: a server that refuses the
    credentials or the database, or MLflow refusing the experiment's name (longer than it takes),
    is "rejected" (exit 4; a daemon stops); what is down, restarting or locked for now is
    "unreachable" (retried; a daemon waits)."""
    from mlflow.exceptions import MlflowException

    said = f"cannot open the MLflow store {shown_uri(uri)}: {first_line(e)}"
    if refused_by_database(e):
        return SinkError(said, kind="rejected")
    if isinstance(e, MlflowException) and ("does not exist" in str(e) or "RESOURCE_DOES_NOT_EXIST" in str(e.error_code)):
        return SinkError(f"experiment id {exp_id} does not exist in {shown_uri(uri)}", kind="rejected")
    if locked_sqlite(e):
        return SinkError(locked_message(shown_uri(uri), e))
    if isinstance(e, MlflowException) and e.error_code == "INVALID_PARAMETER_VALUE" and not _transient_db(e):
        return SinkError(said, kind="rejected")
    return SinkError(said)


def _identity(path: Path) -> tuple[int, int] | None:
    """The file at ``path`` (device, inode); None when there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _created_ms(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _create_experiment(store: Any, name: str) -> str:
    """Create ``name``, or take the one a process outside our lock (``mlflow server``, a notebook) just made."""
    from mlflow.exceptions import MlflowException

    try:
        return store.create_experiment(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := store.get_experiment_by_name(name)) is None:
            raise
        return exp.experiment_id


def join_held(traces: list[BuiltTrace], held: list[Any]) -> int:
    """Join to each trace the attempts the store already holds of its call (``held``: MLflow ``Trace``
    objects), so a call's attempts read in different runs end as one trace with every attempt, not
    the last one read. Returns how many traces were rebuilt."""
    by_id = {t.trace_id: t for t in traces}
    joined = 0
    for trace in held:
        if (t := by_id.get(trace.info.trace_id)) is not None:
            tid = bytes.fromhex(t.trace_id.removeprefix("tr-"))
            joined += with_stored_attempts(t, [stored_span(s, tid) for s in trace.data.spans])
    if joined:
        log.info("%d call(s) joined to the attempts MLflow already held of them", joined)
    return joined


def _root_state(trace: BuiltTrace) -> str | None:
    """The trace state MLflow gives a trace from its root span's status."""
    if (root := next((d for d in trace.whole().data if d.parent_id is None), None)) is None:
        return None
    return "OK" if root.error is None else "ERROR"


SETTLED_INFO = ("timestamp_ms", "execution_time_ms", "status", "session_id", "request_preview", "response_preview")


def _unsettled(info: Any, want: dict[str, Any]) -> bool:
    """Whether ``info`` (a held TraceInfo) differs from the trace row ``want`` in times, state,
    previews, session or token and cost totals (the columns MLflow takes from its metadata); a value
    ``want`` lacks does not count (MLflow cannot unset it)."""
    from mlflow.store.tracking.utils import trace_analytics as ta

    have = {
        "timestamp_ms": info.request_time,
        "execution_time_ms": info.execution_duration,
        "status": info.state.value,
        "request_preview": info.request_preview,
        "response_preview": info.response_preview,
        **ta.analytics_columns_from_metadata(info.trace_metadata),
    }
    return any(v is not None and have.get(c) != v for c, v in want.items() if c in SETTLED_INFO or c in _totals())


def _settle_info(info: Any, want: dict[str, Any]) -> None:
    """Set ``info`` to the trace row ``want`` (what it lacks is left as held)."""
    from mlflow.entities import TraceState
    from mlflow.store.tracking.utils import trace_analytics as ta

    info.request_time = want.get("timestamp_ms", info.request_time)
    info.execution_duration = want.get("execution_time_ms", info.execution_duration)
    info.state = TraceState(want["status"]) if want.get("status") else info.state
    info.request_preview, info.response_preview = want.get("request_preview"), want.get("response_preview")
    columns = {c: want.get(c) for c in (*_totals(), "session_id")}
    info.trace_metadata.update(ta.compatibility_metadata_from_columns(SimpleNamespace(**columns)))


def _totals() -> tuple[str, ...]:
    """The trace row's token and cost columns."""
    from mlflow.store.tracking.utils import trace_analytics as ta

    return (*ta.TOKEN_COLUMN_BY_KEY.values(), *ta.COST_COLUMN_BY_KEY.values())


RICHEST_FORMAT = min(FORMAT_PRIORITY, key=FORMAT_PRIORITY.__getitem__)
RICHEST_IN_SPAN = f'\\"{RICHEST_FORMAT}\\"'
"""How a stored span's content holds the richest format's name, as its ``litellm.log_format``."""


def _covered(trace: BuiltTrace, held: list[tuple[str, int, int, str, bool]]) -> bool:
    """Whether ``trace`` already has every attempt of the stored spans ``held`` (span id, start ns,
    end ns, status, read from the richest format), each as rich: attempt spans' ids hash their
    identity; a stored call of one attempt is that span alone under the root's id, matched by its
    times and status. One of this trace's attempts from a poorer format than a stored one is not."""
    data = trace.whole().data
    attempts = data[1:] or data
    if any(h[4] for h in held) and any(format_rank(d.attributes.get("litellm.log_format")) > 0 for d in attempts):
        return False
    if len(held) > 1:
        return {h[0] for h in held} <= {d.span_id.hex() for d in data}
    _, start_ns, end_ns, status, _ = held[0]
    return any(d.start_us * 1000 == start_ns and d.end_us * 1000 == end_ns and (d.error is None) == (status == "OK") for d in attempts)


def otlp_request(traces: list[BuiltTrace]) -> ExportTraceServiceRequest:
    return otlp_request_of([s for t in traces for s in t.spans])


def otlp_request_of(spans: list[Any]) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    scope = req.resource_spans.add().scope_spans.add()
    scope.scope.name = "litellm-ingest"
    scope.spans.extend(spans)
    return req


class _Synchronous:
    def give_up_at(self, deadline: float) -> None:
        """A database call is not abandoned: its retries end at a stopping daemon's deadline (its ``pause``)."""

    def submit(self, traces: list[BuiltTrace]) -> Future[int]:
        done: Future[int] = Future()
        try:
            done.set_result(self.write(traces))  # type: ignore[attr-defined]
        except Exception as e:
            done.set_exception(e)
        return done


class OtlpSink:
    """POST gzip'd OTLP protobuf batches to an MLflow server, ``IN_FLIGHT`` requests at a time so
    that building the next batch overlaps the server's work on the last one."""

    IN_FLIGHT = 2

    def __init__(self, target: Target, deadline_s: float = 300.0) -> None:
        self.target = target
        self.http = _Http(target.tracking_uri, timeout_s=120.0)
        self.deadline_s = deadline_s
        self.patience = Patience(self)
        self.on_retry: Callable[[Exception], None] | None = None
        self.pause: Callable[[float], object] = time.sleep
        self._senders = ThreadPoolExecutor(max_workers=self.IN_FLIGHT, thread_name_prefix="otlp-send")
        self._abandoned = False
        self.joining = True
        self.settling = True
        self.one_by_one = False
        """Traces are looked up one at a time: MLflow's basic auth refuses a lookup naming a trace that
        does not exist (yet) to all but an admin."""

    @property
    def settles(self) -> bool:
        return self.joining and self.settling

    @property
    def waiting(self) -> Callable[[float], object] | None:
        return self.http.waiting

    @waiting.setter
    def waiting(self, hook: Callable[[float], object] | None) -> None:
        self.http.waiting = hook

    def submit(self, traces: list[BuiltTrace]) -> Future[int]:
        return self._senders.submit(self.write, traces)

    def write(self, traces: list[BuiltTrace]) -> int:
        if not traces:
            return 0
        infos, held = self._held(traces)
        join_held(traces, held)
        self._post(lambda: otlp_request(traces), self.target.experiment_id)
        self._settle(traces, infos)
        return sum(len(t.spans) for t in traces)

    def _settle(self, traces: list[BuiltTrace], held: list[Any]) -> None:
        """A trace the server held ends with the info one write of all its spans leaves. An OTLP
        re-send keeps a held trace's first state, and a trace once settled (its info marked final,
        ``mlflow.trace.infoFinalized``) no longer has its times or token totals moved by new spans;
        so a trace still off once the spans are acknowledged is sent its info through MLflow's
        ``StartTraceV3``, which a server applies to a trace it holds. Only traces the batch changed
        are read again, whole: attempts another ingester wrote meanwhile count in, so the info set is
        never one that leaves them out. A trace the server settled itself is left unmarked. Called
        after the spans are acknowledged, so a run killed in between leaves it to the next run that
        reads the call."""
        from mlflow.protos.service_pb2 import StartTraceV3
        from mlflow.protos.service_pb2 import Trace as ProtoTrace
        from mlflow.utils.proto_json_utils import message_to_json

        if not held or not self.settles:
            return
        by_id = {t.trace_id: t for t in traces}
        wanted = {i.trace_id: self._wanted(by_id[i.trace_id]) for i in held if i.trace_id in by_id}
        if not (changed := sorted(i.trace_id for i in held if i.trace_id in wanted and _unsettled(i, wanted[i.trace_id]))):
            return
        try:
            for stored in self._fetch(changed):
                info = stored.info
                whole = replace(by_id[info.trace_id])
                tid = bytes.fromhex(whole.trace_id.removeprefix("tr-"))
                if with_stored_attempts(whole, [stored_span(s, tid) for s in stored.data.spans]):
                    wanted[info.trace_id] = self._wanted(whole)
                if _unsettled(info, wanted[info.trace_id]):
                    _settle_info(info, wanted[info.trace_id])
                    body = message_to_json(StartTraceV3(trace=ProtoTrace(trace_info=info.to_proto())))
                    self._api("POST", "", "set a trace's state", data=body, headers={"Content-Type": "application/json"})
        except SinkError as e:
            if e.kind != "rejected":
                raise
            if problem := self.experiment_problem():
                raise SinkError(problem, kind="refused") from e
            self.settling = False
            log.warning("%s does not take a trace's final state (%s): calls written as failed are deleted before "
                        "their success is written", self.target.shown_uri, e)  # fmt: skip

    @functools.cached_property
    def _deriver(self) -> Any:
        """The bulk writer's ``RowDeriver`` (None if this MLflow lacks what it needs)."""
        from ingest.sql_bulk import RowDeriver, _mlflow_parts

        return RowDeriver(self.target.experiment_id, "") if _mlflow_parts() is not None else None

    def _wanted(self, trace: BuiltTrace) -> dict[str, Any]:
        """The trace row one write of ``trace``'s spans leaves (its state alone if it cannot be derived)."""
        if self._deriver is not None:
            try:
                return self._deriver.derive(trace.whole()).info
            except Exception as e:  # the spans were taken: their trace's state must still be right
                log.debug("deriving the trace row of %s failed: %s", trace.trace_id, first_line(e))
        return {"status": _root_state(trace)}

    def _held(self, traces: list[BuiltTrace]) -> tuple[list[Any], list[Any]]:
        """The trace infos of this batch's traces the server holds already, and those traces with
        their spans (none, usually: one ``batchGetInfos`` per batch tells). A server that does not
        serve these reads (an MLflow older than this one's API) is named once and written to as before."""
        if not self.joining:
            return [], []
        ids = [t.trace_id for t in traces]
        try:
            infos = looked_up(self, ids)
            return infos, self._fetch([i.trace_id for i in infos])
        except SinkError as e:
            if e.kind != "rejected":
                raise
            self.joining = False
            log.warning(
                "%s does not serve reading traces back (%s): an attempt read in a later run than the rest of its call "
                "will replace the call's root instead of joining it",
                self.target.shown_uri,
                e,
            )
            return [], []

    def _fetch(self, ids: list[str]) -> list[Any]:
        """Those of ``ids`` the server holds, whole (info and spans), ``FETCH_CHUNK`` a request."""
        from google.protobuf.json_format import ParseDict
        from mlflow.entities import Trace
        from mlflow.protos.service_pb2 import BatchGetTraces

        chunks = [ids[k : k + FETCH_CHUNK] for k in range(0, len(ids), FETCH_CHUNK)]
        found = [self._api("GET", "batchGet", "read traces", params={"trace_ids": chunk}) for chunk in chunks]
        answers = [ParseDict(answer, BatchGetTraces.Response(), ignore_unknown_fields=True) for answer in found]
        return [Trace.from_proto(t) for answer in answers for t in answer.traces]

    def _api(self, method: str, call: str, what: str, **kw: Any) -> dict[str, Any]:
        """One call of MLflow's trace REST API through this sink's session, retried as a write is
        (an outage is reported at its first failure, not after the MLflow client's own retries)."""
        path = f"/api/3.0/mlflow/traces/{call}".removesuffix("/")
        return self._retried(lambda timeout_s: _check(self.http.request(method, path, timeout_s=timeout_s, **kw), what), what).json()

    def _retried(self, send: Callable[[float | None], T], what: str) -> T:
        """``send(timeout_s)`` retried within ``--mlflow-timeout``. A run's request waits only what is
        left of it (``DB_SILENCE_S`` at least): a server that took the request and went silent held a
        cron run for the session's 120 s a try. A daemon waits the whole 120 s (its outage report and
        stop deadline do not depend on it)."""
        since = time.monotonic()

        def once() -> T:
            if self.on_retry is not None:
                return send(None)
            return send(min(self.http.timeout, max(DB_SILENCE_S, self.deadline_s - (time.monotonic() - since))))

        retried = lambda: with_retries(once, what, self.deadline_s, _transient_http, self.on_retry, self.pause)  # noqa: E731
        return self.patience.spent_on(retried, _transient_http)

    def write_spans(self, spans: list[SpanData], experiment_id: str) -> int:
        if spans:
            self._post(lambda: otlp_request_of([d.to_otlp() for d in spans]), experiment_id)
        return len(spans)

    def _post(self, request: Callable[[], ExportTraceServiceRequest], experiment_id: str) -> None:
        try:
            body = gzip.compress(request().SerializeToString(), compresslevel=5)
        except Exception as e:
            raise SinkError(f"encoding traces as OTLP failed: {first_line(e)}", kind="rejected") from e
        headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip", EXPERIMENT_HEADER: experiment_id}
        try:
            self._retried(
                lambda timeout_s: _otlp_answer(
                    _check(self.http.request("POST", "/v1/traces", timeout_s=timeout_s, data=body, headers=headers), "send traces")
                ),
                "send traces",
            )
        except SinkError as e:
            if e.status in (404, 405):  # no route for traces here (or no experiment): no trace's fault
                said = str(e) if "RESOURCE_DOES_NOT_EXIST" in str(e) else f"send traces: MLflow answered {e.status}, {NO_OTLP_ROUTE}"
                raise SinkError(said, kind="refused", status=e.status) from e
            raise

    def trace_infos(self, trace_ids: list[str]) -> list[Any]:
        """MLflow's ``BatchGetTraceInfos``, decoded as its REST store decodes it. A server whose auth
        refuses (403) a lookup that names a trace it does not hold is asked one trace at a time from
        then on, a refusal meaning "not there, or not this user's to read"."""
        if not self.one_by_one:
            try:
                return self._trace_infos(trace_ids)
            except SinkError as e:
                if e.status != 403 or not trace_ids:
                    raise
            self.one_by_one = True
            log.warning(
                "%s refuses this user a lookup of traces not written yet (MLflow's basic auth does, but to an admin): "
                "traces are looked up one at a time, a request each",
                self.target.shown_uri,
            )
        found = []
        for trace_id in trace_ids:
            try:
                found += self._trace_infos([trace_id])
            except SinkError as e:
                if e.status != 403:
                    raise
        return found

    def _trace_infos(self, trace_ids: list[str]) -> list[Any]:
        from google.protobuf.json_format import ParseDict
        from mlflow.entities import TraceInfo
        from mlflow.protos.service_pb2 import BatchGetTraceInfos

        answer = self._api("POST", "batchGetInfos", "look up traces", json={"trace_ids": trace_ids})
        return [TraceInfo.from_proto(i) for i in ParseDict(answer, BatchGetTraceInfos.Response(), ignore_unknown_fields=True).trace_infos]

    def _rest(self) -> Any:
        """MLflow's own REST store, with MLflow's usual credentials."""
        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.utils.credentials import get_default_host_creds

        uri = self.target.tracking_uri
        return RestStore(lambda: get_default_host_creds(uri))

    def read(self, call: Callable[[], T], what: str) -> T:
        """``call`` (reconcile's search, through MLflow's own client), watched as a database read is:
        a server that takes the request and never answers held a cron reconcile through the client's
        120 s timeout and its retries; now it is given up after ``--mlflow-timeout``."""
        shown = self.target.shown_uri
        return self._through_client(
            lambda: answered_in_time(call, what, shown, self.deadline_s), what, lambda e: _read_failure(what, shown, e)
        )

    def _through_client(self, call: Callable[[], T], what: str, failed: Callable[[Exception], SinkError]) -> T:
        """``call`` (a request through MLflow's own REST client), retried as this sink's own requests are;
        what is not a SinkError already becomes ``failed(e)``."""
        try:
            return with_retries(call, what, self.deadline_s, _transient_any, self.on_retry, self.pause)
        except SinkError:
            raise
        except Exception as e:
            raise failed(e) from e

    def ping(self) -> None:
        _check(self.http.request("GET", "/health", timeout_s=5.0), "health check")

    def give_up_at(self, deadline: float) -> None:
        self.http.cutoff = deadline

    @property
    def cutoff(self) -> float | None:
        """The deadline :meth:`give_up_at` set (its requests keep it), for reads outside this sink."""
        return self.http.cutoff

    def experiment_problem(self) -> str | None:
        try:
            resp = self.http.request("GET", "/api/2.0/mlflow/experiments/get", params={"experiment_id": self.target.experiment_id})
        except SinkError:
            return None
        return _experiment_problem(resp, self.target)

    def delete(self, trace_ids: list[str], experiment_id: str | None = None) -> None:
        """Through MLflow's own REST store (its DeleteTraces call)."""
        store = self._rest()
        exp_id = experiment_id or self.target.experiment_id
        self._through_client(
            lambda: self.http.within_cutoff(lambda: store.delete_traces(exp_id, trace_ids=trace_ids), "DeleteTraces"),
            "delete traces",
            lambda e: SinkError(f"deleting traces on {self.target.shown_uri} failed: {first_line(e)}", *_refusal(e)),
        )

    def close(self, at_once: bool = False) -> None:
        self._abandoned = self._abandoned or at_once
        self._senders.shutdown(wait=not self._abandoned, cancel_futures=self._abandoned)
        self.http.session.close()


def _refusal(e: Exception) -> tuple[str, int | None]:
    """The kind and status of a SinkError for MLflow's client raising ``e``: a server's auth refusing
    this user (401, 403) is "unauthorized", as our own requests' refusals are."""
    status = e.get_http_status_code() if getattr(e, "error_code", None) in ("PERMISSION_DENIED", "UNAUTHENTICATED") else None
    return ("unauthorized", status) if status in (401, 403) else ("unreachable", None)


def _transient_any(e: Exception) -> bool:
    text = str(e).lower()
    return "connection" in text or "timed out" in text or " 50" in text or "429" in text


_DB_TRANSIENT_TEXT = (
    "database is locked", "deadlock", "could not connect", "connection refused", "connection failed", "server closed the connection",
    "terminating connection", "the database system is", "could not receive data", "connection timed out", "connection is closed",
    "ssl connection has been closed", "too many clients already", "remaining connection slots are reserved",
    "canceling statement due to statement timeout", "has not answered for",
)  # fmt: skip
"""A database that is busy, restarting or failing over (PostgreSQL's own messages for a crash, an
administrator's shutdown, crash recovery): worth retrying until ``--mlflow-timeout`` runs out."""


def _transient_db(e: BaseException) -> bool:
    """Anywhere in its causes: a connection SQLAlchemy found broken, or a message of a database that
    is not there for now; never a server that answered to refuse the credentials or the database
    (psycopg says "connection failed: … password authentication failed")."""
    if refused_by_database(e):
        return False
    for node in causes(e):
        if getattr(node, "connection_invalidated", False):
            return True
        text = str(node).lower()
        if any(t in text for t in _DB_TRANSIENT_TEXT):
            return True
    return False


def _read_failure(what: str, shown: str, e: Exception) -> SinkError:
    """A read that failed, in one line: a silence already says what went unanswered, and where."""
    said = first_line(e)
    return SinkError(said if isinstance(e, TimeoutError) else f"{what} in {shown} failed: {said}")


class Patience:
    """A run gives MLflow one ``--mlflow-timeout``: once a call has retried it out, every later call
    of the run fails at once with that call's error. Writes queued behind it (the step's next batch,
    a backfill worker's next part) each waited out the whole timeout again, and a run ended that
    many times past it. A daemon (``on_retry`` set) never runs out: it waits for MLflow."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.spent: Exception | None = None

    def spent_on(self, call: Callable[[], T], transient: Callable[[Exception], bool]) -> T:
        """``call()``, a ``with_retries`` loop: the only transient error it lets out is one that ran out its deadline."""
        if self.spent is not None:
            raise self.spent
        try:
            return call()
        except Exception as e:
            if transient(e) and self.sink.on_retry is None:
                self.spent = e
            raise


DB_SILENCE_S = 10.0
"""A run (batch, backfill) abandons a database call unanswered for ``--mlflow-timeout``, this at least
(SQLite waits 5 s for a lock, MLflow sets 20 s on the connections its sessions use), and tries again as after a lost connection."""


def answered_in_time(
    call: Callable[[], T],
    what: str,
    shown: str,
    deadline_s: float,
    *,
    on_retry: Callable[[Exception], None] | None = None,
    cutoff: Callable[[], float | None] = lambda: None,
    give_up_s: float | None = None,
    thread: str = "mlflow-db",
    since: float | None = None,
    waiting: Callable[[float], object] | None = None,
) -> T:
    """``call`` (database work on the store ``shown``, or a request through MLflow's own client), run
    in a thread of its own and waited for in short slices. A database that does not answer at all (a
    frozen host, a network partition: no error, the socket just stays silent) held the daemon in a
    read for ever, ``/health`` "ok" and SIGTERM unheeded. Now: once it has not answered for ``deadline_s`` that is reported as an outage
    (``on_retry``), and waiting ends, unacknowledged, at ``cutoff()`` ("stopped"), or after
    ``give_up_s`` when given (a ping). Without ``on_retry`` (a run, not a daemon) it is abandoned
    after ``--mlflow-timeout`` (``DB_SILENCE_S`` at least) and retried within the same deadline, so a
    run ends with exit 4. ``since``: when the caller's retries began; a run's wait counts from there,
    so a try begun late is abandoned at the run's deadline, not one of MLflow's 20 s SQLite lock waits
    past it. ``waiting`` hears how long the call has been waited for, every slice (a daemon holds its
    files meanwhile). The thread (named ``thread``) is a daemon: it does not keep the process alive."""

    def past_cutoff() -> bool:
        return (at := cutoff()) is not None and time.monotonic() >= at

    def abandoned() -> SinkError:
        return SinkError(f"{what} in the MLflow store {shown} left unanswered: stopping", kind="stopped")

    if past_cutoff():
        raise abandoned()
    try:
        watched = Watched(call, thread)
    except RuntimeError as e:
        raise SinkError(f"cannot reach the MLflow store {shown}: {first_line(e)}") from e
    started, said = time.monotonic(), False
    tried_from = started if since is None else since
    while not watched.done.wait(0.25):
        waited = time.monotonic() - started
        if past_cutoff():
            raise abandoned()
        if give_up_s is not None and waited >= give_up_s:
            raise SinkError(f"{what}: the MLflow store {shown} did not answer within {give_up_s:.0f}s")
        if on_retry is None and (trying := time.monotonic() - tried_from) >= max(deadline_s, DB_SILENCE_S):
            # a run, not a daemon: nobody to tell; an unanswered call is a failure, retried as a lost connection is
            raise TimeoutError(f"{what}: the MLflow store {shown} has not answered for {trying:.0f}s")
        if not said and waited >= deadline_s and on_retry is not None:
            said = True
            on_retry(TimeoutError(f"{what}: the MLflow store {shown} has not answered for {waited:.0f}s"))
        if waiting is not None:
            waiting(waited)
    return watched.result()


CONFLICT_RETRIES = 6
_CONFLICT_SQLSTATES = frozenset({"23505", "40001", "40P01"})
"""unique_violation, serialization_failure, deadlock_detected."""
_CONFLICT_TEXT = ("unique constraint failed", "deadlock detected", "could not serialize access")


def is_conflict(e: BaseException) -> bool:
    """Did another writer's concurrent transaction make this one fail (anywhere in its causes)?"""
    for node in causes(e):
        for candidate in (node, getattr(node, "orig", None)):
            if getattr(candidate, "sqlstate", None) in _CONFLICT_SQLSTATES or getattr(candidate, "pgcode", None) in _CONFLICT_SQLSTATES:
                return True
        if any(t in str(node).lower() for t in _CONFLICT_TEXT):
            return True
    return False


def _data_error(e: Exception) -> bool:
    """The database (or the derivation before it) refused this data, as opposed to being unavailable:
    worth splitting the batch to find the trace it cannot take, never worth retrying."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError, StatementError

    if isinstance(e, (OperationalError, InterfaceError)):
        return False
    if isinstance(e, (DataError, IntegrityError)):
        return True
    if isinstance(e, StatementError) and isinstance(e.orig, (ValueError, TypeError, UnicodeError, OverflowError)):
        return True
    if isinstance(e, MlflowException):
        cause = e.__cause__
        return _data_error(cause) if isinstance(cause, Exception) else e.error_code == "INVALID_PARAMETER_VALUE"
    return isinstance(e, (ValueError, TypeError, KeyError, AttributeError, IndexError, UnicodeError, OverflowError, RecursionError))


def _experiment_gone(e: Exception) -> bool:
    """``log_spans`` into an experiment that is gone (purged): MLflow's answer, not an outage. The bulk
    writer meets it as a foreign-key refusal (a data error); both then ask what became of it."""
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and e.error_code == "RESOURCE_DOES_NOT_EXIST"


def refused_for_its_data(e: BaseException) -> bool:
    """``e`` (or an error under it) says this very trace cannot be stored (a number past the column's
    range, nesting past the encoder's, text the database cannot encode), whatever the store: a batch
    refused whole for such reasons is no sign of a store refusing everything."""
    from sqlalchemy.exc import DataError, StatementError

    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, (OverflowError, RecursionError, UnicodeError, DataError)):
            return True
        stack += [x.__cause__, x.__context__, x.orig if isinstance(x, StatementError) else None]
    return False


class StoreSink(_Synchronous):
    """Write into a database MLflow store: by default with the bulk writer (``sql_bulk``), which
    leaves the rows MLflow's own ``log_spans`` would; ``writer="mlflow"`` (or a store the bulk
    writer was not tested on) uses ``log_spans`` itself, the server's path minus HTTP."""

    def __init__(self, target: Target, deadline_s: float = 300.0, writer: str = "bulk", open_timeout_s: float | None = None) -> None:
        """``open_timeout_s``: how long opening may retry, when shorter than ``deadline_s`` (the daemon
        probing at start, which says it waits and tries again)."""
        from ingest.sql_bulk import BulkSpanWriter, unsupported_reason

        self.target = target
        self.deadline_s = deadline_s
        self.patience = Patience(self)
        self.on_retry: Callable[[Exception], None] | None = None
        self.pause: Callable[[float], object] = time.sleep
        self.waiting: Callable[[float], object] | None = None
        self.cutoff: float | None = None
        """``time.monotonic()`` past which no database call is waited for (a stopping daemon's deadline)."""

        def opened() -> tuple[Any, BulkSpanWriter | None, str | None]:
            """The store, and its bulk writer or why there is none: each reads the database (the
            store kept from finding the experiment reads it on a connection that may have gone silent).
            A database down or silent while its schema revision is read is an outage like any other,
            never a reason to fall back to ``log_spans``."""
            store = store_for(target.tracking_uri)
            reason = unsupported_reason(store) if writer == "bulk" else None
            bulk = BulkSpanWriter(store, target.experiment_id) if writer == "bulk" and reason is None else None
            return store, bulk, reason

        opening_s = deadline_s if open_timeout_s is None else min(open_timeout_s, deadline_s)
        try:  # a backfill's worker opens its own: a database restarting or full of clients then is waited out too
            self.store, self.bulk, reason = with_retries(
                lambda: answered_in_time(opened, "open the MLflow store", target.shown_uri, opening_s),
                "open the MLflow store",
                opening_s,
                _transient_db,
            )
        except StoreSetupError as e:
            raise SinkError(str(e), kind=e.kind) from e
        except SinkError:
            raise
        except Exception as e:
            raise _store_failure(target.tracking_uri, target.experiment_id, e) from e
        if reason is not None:
            log.warning("writing through MLflow's log_spans (slower): %s", reason)
        self.settles = self.bulk is not None
        self._file = (db := sqlite_path(target.tracking_uri)) and _identity(db.resolve())

    def _store_gone(self) -> str | None:
        """Why the SQLite file this process opened is no longer the store at its path (deleted, or
        replaced: a backup restored, ``rm mlflow.db`` to start over). SQLite then refuses every write
        to the open file (``readonly``), which was an outage held for ever; a new process opens
        what is there now."""
        if not self._file:
            return None
        db = sqlite_path(self.target.tracking_uri).resolve()  # type: ignore[union-attr]
        if _identity(db) == self._file:
            return None
        return f"the store {db} was deleted or replaced while this process had it open: start again to write into the one there now"

    def give_up_at(self, deadline: float) -> None:
        self.cutoff = deadline

    def _answered(self, call: Callable[[], T], what: str, give_up_s: float | None = None, since: float | None = None) -> T:
        """``call`` (database work), watched as ``answered_in_time`` watches it, with this sink's
        ``--mlflow-timeout``, outage report (``on_retry``) and stop deadline (``cutoff``)."""
        return answered_in_time(
            call,
            what,
            self.target.shown_uri,
            self.deadline_s,
            on_retry=self.on_retry,
            cutoff=lambda: self.cutoff,
            give_up_s=give_up_s,
            since=since,
            waiting=self.waiting,
        )

    def _retried(self, call: Callable[[], T], what: str, transient: Callable[[Exception], bool] = _transient_db, hooks: bool = True) -> T:
        """``call`` watched and retried within ``--mlflow-timeout``, every try's wait counted from the
        first: a run ends at its deadline however the tries fell (``hooks``: report and pause as the
        daemon does; a lookup has neither)."""
        since, locked = time.monotonic(), False

        def retried(e: Exception) -> bool:
            nonlocal locked
            locked = locked or locked_sqlite(e)
            return transient(e)

        def tried() -> T:
            watched = lambda: self._answered(call, what, since=since)  # noqa: E731
            try:
                if hooks:
                    return with_retries(watched, what, self.deadline_s, retried, self.on_retry, self.pause)
                return with_retries(watched, what, self.deadline_s, retried)
            except TimeoutError as e:
                if locked:  # the last try was abandoned waiting for the lock the first ones were refused
                    waited = TimeoutError(f"{what} waited {self.deadline_s:.0f}s for it (--mlflow-timeout)")
                    line = locked_message(self.target.shown_uri, waited, "what was not written waits for the next run")
                    raise SinkError(line, kind="unreachable") from e
                raise

        return self.patience.spent_on(tried, transient)

    def read(self, call: Callable[[], T], what: str) -> T:
        """``call`` (a read of the store outside this sink's own methods: reconcile's search), watched and
        retried as the sink's own lookups are; a failure is a SinkError (exit 4, a daemon's outage)."""
        try:
            return self._retried(call, what)
        except SinkError:
            raise
        except Exception as e:
            raise _read_failure(what, self.target.shown_uri, e) from e

    def write(self, traces: list[BuiltTrace]) -> int:
        from ingest.sql_bulk import mlflow_span

        if not any(t.span_count for t in traces):
            return 0

        def write_once() -> None:
            join_held(traces, self._held(traces))
            if self.bulk is not None:
                self.bulk.write(traces)
            else:
                self.store.log_spans(self.target.experiment_id, [mlflow_span(s) for t in traces for s in t.spans])

        def write_merging() -> None:
            """A conflict means another writer stored some of these traces first: writing the batch
            again finds them and merges, as ``log_spans`` merges spans into a trace it holds."""
            for attempt in range(CONFLICT_RETRIES + 1):
                try:
                    return write_once()
                except Exception as e:
                    if attempt == CONFLICT_RETRIES or not is_conflict(e):
                        raise
                    log.info("a concurrent writer stored some of this batch first (%s); writing it again", first_line(e))
                    time.sleep(random.uniform(0.02, 0.1) * 2**attempt)

        try:
            self._retried(write_merging, "log spans")
        except SinkError:
            raise
        except Exception as e:
            if gone := self._store_gone():
                raise SinkError(gone, kind="refused") from e
            kind = "rejected" if _data_error(e) or _experiment_gone(e) else "unreachable"
            raise SinkError(f"writing to {self.target.shown_uri} failed: {first_line(e)}", kind=kind) from e
        return sum(t.span_count for t in traces)

    def _held(self, traces: list[BuiltTrace]) -> list[Any]:
        """The traces of this batch the store holds with attempts the batch lacks, read whole through
        MLflow (``batch_get_traces``). One query on the spans table per batch tells which: none when
        the calls are new, and none on a re-run that reads the same attempts again."""
        from mlflow.store.tracking.dbmodels.models import SqlSpan
        from sqlalchemy import select

        by_id = {t.trace_id: t for t in traces}
        ids = list(by_id)
        held: dict[str, list[tuple[str, int, int, str, bool]]] = defaultdict(list)
        rich = SqlSpan.content.contains(RICHEST_IN_SPAN, autoescape=True)
        columns = (SqlSpan.trace_id, SqlSpan.span_id, SqlSpan.start_time_unix_nano, SqlSpan.end_time_unix_nano, SqlSpan.status, rich)
        with self.store.ManagedSessionMaker() as session:
            for k in range(0, len(ids), LOOKUP_CHUNK):
                for tid, *span in session.execute(select(*columns).where(SqlSpan.trace_id.in_(ids[k : k + LOOKUP_CHUNK]))):
                    held[tid].append(tuple(span))
        lacking = [tid for tid, spans in held.items() if not _covered(by_id[tid], spans)]
        return self.store.batch_get_traces(lacking) if lacking else []

    def write_spans(self, spans: list[SpanData], experiment_id: str) -> int:
        """MLflow's own ``log_spans``: its merge into a trace it holds is the contract."""
        from ingest.sql_bulk import mlflow_span

        if not spans:
            return 0
        try:
            self._retried(
                lambda: self.store.log_spans(experiment_id, [mlflow_span(d.to_otlp()) for d in spans]),
                "log spans",
                lambda e: _transient_db(e) or is_conflict(e),
            )
        except SinkError:
            raise
        except Exception as e:
            kind = "rejected" if _data_error(e) or _experiment_gone(e) else "unreachable"
            raise SinkError(f"writing to {self.target.shown_uri} failed: {first_line(e)}", kind=kind) from e
        return len(spans)

    def trace_infos(self, trace_ids: list[str]) -> list[Any]:
        try:
            return self._retried(lambda: self._trace_infos(trace_ids), "look up traces", hooks=False)
        except SinkError:
            raise
        except Exception as e:
            raise SinkError(f"looking up traces in {self.target.shown_uri} failed: {first_line(e)}") from e

    def _trace_infos(self, trace_ids: list[str]) -> list[Any]:
        """``batch_get_trace_infos``, with the tags, metadata and assessments each TraceInfo reads loaded
        in three queries, not three per trace (MLflow's own query takes 1.5 ms a trace that way)."""
        from mlflow.store.tracking.dbmodels.models import SqlTraceInfo
        from sqlalchemy.orm import selectinload

        store = self.store
        if not hasattr(store, "_query_trace_infos_in_batches") or not hasattr(store, "ManagedSessionMaker"):
            return store.batch_get_trace_infos(trace_ids)
        related = (SqlTraceInfo.tags, SqlTraceInfo.request_metadata, SqlTraceInfo.assessments)
        with store.ManagedSessionMaker() as session:
            rows = store._query_trace_infos_in_batches(session, trace_ids, None, query_options=tuple(selectinload(r) for r in related))
            return [row.to_mlflow_entity() for row in rows]

    def delete(self, trace_ids: list[str], experiment_id: str | None = None) -> None:
        try:
            self._retried(
                lambda: self.store.delete_traces(experiment_id or self.target.experiment_id, trace_ids=trace_ids), "delete traces"
            )
        except SinkError:
            raise
        except Exception as e:
            raise SinkError(f"deleting traces in {self.target.shown_uri} failed: {first_line(e)}") from e

    def ping(self) -> None:
        try:
            self._answered(lambda: self.store.get_experiment(self.target.experiment_id), "ping", give_up_s=self.deadline_s)
        except SinkError:
            raise
        except Exception as e:
            raise SinkError(f"cannot reach the MLflow store {self.target.shown_uri}: {first_line(e)}") from e

    def experiment_problem(self) -> str | None:
        from mlflow.exceptions import MlflowException

        t = self.target
        if gone := self._store_gone():
            return gone
        try:
            exp = self._answered(lambda: self.store.get_experiment(t.experiment_id), "get experiment", give_up_s=self.deadline_s)
        except MlflowException as e:
            gone = e.error_code == "RESOURCE_DOES_NOT_EXIST"
            return f"experiment id {t.experiment_id} no longer exists in {t.shown_uri}: {EXPERIMENT_REMEDY}" if gone else None
        except Exception:
            return None
        if exp.lifecycle_stage == "deleted":
            return f"experiment {exp.name!r} (id {exp.experiment_id}) in {t.shown_uri} was deleted: {EXPERIMENT_REMEDY}"
        return None

    def close(self, at_once: bool = False) -> None:
        pass


class NullSink(_Synchronous):
    """--dry-run: everything is built, nothing is written."""

    deadline_s = 0.0
    on_retry = None
    pause = staticmethod(time.sleep)
    waiting = None
    settles = False

    def ping(self) -> None:
        pass

    def experiment_problem(self) -> str | None:
        return None

    def write(self, traces: list[BuiltTrace]) -> int:
        return 0

    def delete(self, trace_ids: list[str], experiment_id: str | None = None) -> None:
        pass

    def trace_infos(self, trace_ids: list[str]) -> list[Any]:
        return []

    def write_spans(self, spans: list[SpanData], experiment_id: str) -> int:
        return 0

    def close(self, at_once: bool = False) -> None:
        pass


def looked_up(sink: Sink, trace_ids: list[str]) -> list[Any]:
    """The TraceInfos of those of ``trace_ids`` the destination holds, a request per ``LOOKUP_CHUNK``."""
    return [info for i in range(0, len(trace_ids), LOOKUP_CHUNK) for info in sink.trace_infos(trace_ids[i : i + LOOKUP_CHUNK])]


def make_sink(target: Target, deadline_s: float = 300.0, sql_writer: str = "bulk", open_timeout_s: float | None = None) -> Sink:
    return OtlpSink(target, deadline_s) if target.is_server else StoreSink(target, deadline_s, sql_writer, open_timeout_s)
