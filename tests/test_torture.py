"""Torture tests of the tail daemon: held calls (a failed attempt waiting for its retry) across rotations, kills and outages.

A call whose last attempt failed is held for its retry or fallback (``--settle``) and named in the
checkpoint by the file and byte offsets of its lines, to be re-read first by the next run. These
tests drive the real ``litellm-ingest tail`` process, black box, through the CLI:

- two small deterministic reproductions: failed attempts written, a rename+gzip rotation within
  ``--settle``, more held calls in the new file, then a clean SIGTERM restart (or an MLflow
  outage) before the retries arrive; every call must end up in MLflow exactly once with all its
  spans, and no good line may be quarantined;
- the torture: a writer thread appending calls (whole, and split in time so that the failed
  attempt lands before a rotation and its retry after it), a rotator doing every kind of rotation
  every 1-3 s, and >= 12 SIGKILL (plus some SIGTERM) restarts at random moments, into a SQLite
  store and into a real ``mlflow server``. At the end: traces == calls, each once, spans ==
  attempts, nothing quarantined.

The writer and the rotator share the writer's lock, so a copytruncate here is quiescent and tears
no line. A real copytruncate is not: lines appended between the copy and the truncate are lost
and a line being written at the truncate is torn (quarantined as ``malformed_json``) for any
reader. That window is copytruncate's own, documented, not the daemon's; it is kept out of these
tests so that whatever they count is the daemon's.

Replay a run: the seed is printed and in every assertion message; ``LITELLM_INGEST_TORTURE_SEED=N``
runs with that seed (timing still varies: the daemon is a real process). Soak:
``LITELLM_INGEST_SOAK=N`` scales the calls, the rotations and the kills by N.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import threading
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import all_traces, start_mlflow_server
from tests.tailkit import Daemon, Writer, fresh_calls, spans_of, wait_for

SOAK = int(os.environ.get("LITELLM_INGEST_SOAK", "0"))
SEED = int(os.environ.get("LITELLM_INGEST_TORTURE_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
TIME_FIELDS = ("startTime", "endTime", "completionStartTime")


# --- the writer's side ------------------------------------------------------------------------------


def stamped(records: list[dict], at: float | None = None) -> list[dict]:
    """Copies moved in time as one block so the last of them ends at `at` (now): the proxy logs an
    attempt when it ends, and the daemon holds a failure only while it is recent."""
    at = time.time() if at is None else at
    shift = at - max(r["endTime"] for r in records)
    out = []
    for r in records:
        r = dict(r)
        for k in TIME_FIELDS:
            if r.get(k) is not None:
                r[k] = round(r[k] + shift, 6)
        out.append(r)
    return out


class LineWriter(Writer):
    """The kit's writer, appending any records (a call, or some of its attempts) stamped at the moment of writing."""

    def __init__(self, log: Path) -> None:
        super().__init__(log)
        self.lines: list[str] = []

    def append(self, records: list[dict]) -> None:
        """Whole lines in one write under the lock rotation takes too: no line is ever torn."""
        lines = [json.dumps(r) for r in stamped(records)]
        with self.lock, self.log.open("a") as f:
            f.write("".join(line + "\n" for line in lines))
        self.lines += lines

    def append_each(self, parts: list[list[dict]]) -> None:
        """Calls (or parts of calls) one by one, each stamped as it is written."""
        for part in parts:
            self.append(part)


def held_calls(capture: list[dict], n: int, rng: random.Random) -> list[list[dict]]:
    """n calls, rich in the ones that get held: every retry/fallback call and every failed-only call
    of each fresh copy of the capture, and as many plain successes as there are of those."""
    out: list[list[dict]] = []
    while len(out) < n:
        calls = fresh_calls(capture)
        heldish = [c for c in calls if len(c) > 1 or c[-1]["status"] != "success"]
        plain = [c for c in calls if c not in heldish]
        out += heldish + rng.sample(plain, min(len(plain), len(heldish)))
    out = out[:n]
    rng.shuffle(out)
    return out


# --- reading the store ----------------------------------------------------------------------------------


def sqlite_path(uri: str) -> Path:
    assert uri.startswith("sqlite:///"), uri
    return Path(uri[len("sqlite:///") :])


def store_counts(db: Path, experiment: str) -> tuple[int, int]:
    """(traces, spans) committed in an experiment of a SQLite store, read-only, for polling."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as con:
            exp = con.execute("SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)).fetchone()
            if exp is None:
                return 0, 0
            traces = con.execute("SELECT COUNT(*) FROM trace_info WHERE experiment_id = ?", exp).fetchone()[0]
            spans = con.execute("SELECT COUNT(*) FROM spans WHERE experiment_id = ?", exp).fetchone()[0]
            return int(traces), int(spans)
    except sqlite3.Error:
        return -1, -1


def wait_quiet(db: Path, experiment: str, calls: list[list[dict]], timeout: float, idle_s: float = 20.0) -> tuple[int, int]:
    """Until the store holds every call with all its spans, or nothing changed for idle_s (longer than --settle: a loss)."""
    want = (len(calls), spans_of(calls))
    deadline = time.monotonic() + timeout
    last, since = (-2, -2), time.monotonic()
    while time.monotonic() < deadline:
        now = store_counts(db, experiment)
        if now == want:
            return now
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > idle_s:
            return now
        time.sleep(1.0)
    return last


@dataclass
class Verdict:
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    spans: int = 0
    want_spans: int = 0
    quarantined: Counter = field(default_factory=Counter)
    good_quarantined: int = 0
    lost_on_disk: int = 0

    def ok(self) -> bool:
        bad = self.lost or self.doubled or self.extra or self.incomplete or self.quarantined
        return not bad and self.spans == self.want_spans

    def __str__(self) -> str:
        return (
            f"seed={SEED}: {len(self.lost)} call(s) lost ({self.lost_on_disk} of them still whole in the log files), "
            f"{len(self.doubled)} doubled, {len(self.extra)} extra, {len(self.incomplete)} with a wrong span count, "
            f"spans {self.spans}/{self.want_spans}, "
            f"quarantined {dict(self.quarantined)} ({self.good_quarantined} good records among them); "
            f"lost e.g. {self.lost[:3]}, incomplete e.g. {self.incomplete[:3]}"
        )


def on_disk(logdir: Path) -> Counter:
    """Lines per call id in the log files left (plain and gzipped): a lost call still there was lost by the daemon."""
    out: Counter = Counter()
    for f in logdir.iterdir():
        data = f.read_bytes()
        data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        for line in data.splitlines():
            out[json.loads(line)["litellm_call_id"]] += 1
    return out


def verdict(uri: str, experiment: str, calls: list[list[dict]], quarantine: Path, written: list[str], logdir: Path) -> Verdict:
    """What MLflow holds against what was written; a quarantined line is good if it is (a piece of) a written line."""
    traces = all_traces(uri, experiment, missing_ok=True)
    got = Counter(t.info.tags.get("litellm.call_id") for t in traces)
    attempts = {c[0]["litellm_call_id"]: spans_of([c]) for c in calls}
    attempts_n = {c[0]["litellm_call_id"]: len(c) for c in calls}
    v = Verdict(spans=sum(len(t.data.spans) for t in traces), want_spans=spans_of(calls))
    v.lost = sorted(set(attempts) - set(got))
    lines = on_disk(logdir)
    v.lost_on_disk = sum(lines[k] >= attempts_n[k] for k in v.lost)
    v.doubled = sorted(k for k, n in got.items() if n > 1)
    v.extra = sorted(set(got) - set(attempts))
    v.incomplete = sorted(
        t.info.tags.get("litellm.call_id")
        for t in traces
        if attempts.get(t.info.tags.get("litellm.call_id"), len(t.data.spans)) != len(t.data.spans)
    )
    everything = "\n".join(written)
    if quarantine.exists():
        for line in quarantine.read_text().splitlines():
            q = json.loads(line)
            v.quarantined[q["reason"]] += 1
            piece = q["raw"].strip()[:2000]
            v.good_quarantined += bool(piece) and piece in everything
    return v


# --- the deterministic reproductions --------------------------------------------------------------------


def split_run(capture: list[dict]) -> tuple[list[list[dict]], list[list[dict]], list[list[dict]]]:
    """A copy of the capture: (calls, what to write now: every call but the retries' last attempts, those last attempts)."""
    calls = fresh_calls(capture)
    now = [c[:-1] if len(c) > 1 else c for c in calls]
    later = [c[-1:] for c in calls if len(c) > 1]
    return calls, now, later


def rename_create(log: Path, n: int) -> Path:
    """Rename and a new file; with gzip_away after it, the project logger's LITELLM_INGEST_LOG_GZIP=1 rotation."""
    rotated = log.with_name(f"{log.name}.{n}")
    log.rename(rotated)
    log.touch()
    return rotated


def gzip_away(rotated: Path) -> Path:
    gz = rotated.with_name(rotated.name + ".gz")
    with rotated.open("rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    rotated.unlink()
    return gz


SETTLE = 15.0  # long enough that no held call settles before its retry in the reproductions


@pytest.mark.parametrize("interruption", ["sigterm_restart", pytest.param("mlflow_outage", marks=pytest.mark.server)])
def test_held_calls_survive_rename_gzip_rotation_and_interruption(tmp_path: Path, capture: list[dict], interruption: str) -> None:
    """The issue's reproduction: failed attempts in proxy.jsonl, a rename+gzip rotation within --settle, more failed
    attempts in the new proxy.jsonl, then a clean restart (or MLflow stopped and started) before any retry arrives.
    Held lines of both files must not be mixed: every call once, all its spans, nothing good quarantined."""
    logdir, state = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    experiment = f"repro-{uuid.uuid4().hex[:8]}"
    server = None
    if interruption == "mlflow_outage":
        server = start_mlflow_server(tmp_path / "server")
        uri, db = server.url, sqlite_path(server.backend_uri)
    else:
        uri = f"sqlite:///{tmp_path / 'store.db'}"
        db = sqlite_path(uri)
    writer = LineWriter(log)
    first, first_now, first_later = split_run(capture)
    second, second_now, second_later = split_run(capture)
    calls = first + second
    whole_ok = [c for c in first if c[-1]["status"] == "success" and len(c) == 1]
    d = Daemon(logdir, uri, experiment, state, "--settle", str(SETTLE)).start()
    try:
        writer.append_each(first_now)
        wait_for(lambda: store_counts(db, experiment)[0] >= len(whole_ok), 60, "the first file's settled calls")
        with writer.lock:
            rotated = rename_create(log, 1)
        gzip_away(rotated)
        writer.append_each(second_now)
        time.sleep(2.0)  # read, and held in the checkpoint under both files
        if server is None:
            assert d.stop(signal.SIGTERM) == 0
            d = Daemon(logdir, uri, experiment, state, "--settle", str(SETTLE)).start()
        else:
            server.stop()
            writer.append_each(first_later)  # the daemon tries to send, fails, and goes back to its checkpoints
            first_later = []
            wait_for(lambda: "litellm_ingest_mlflow_up 0" in d.metrics(), 30, "the daemon to notice the outage")
            server = start_mlflow_server(server.workdir, port=server.port, backend_uri=server.backend_uri)
        writer.append_each(first_later + second_later)
        wait_quiet(db, experiment, calls, timeout=90)
        assert d.stop(signal.SIGTERM) == 0
        v = verdict(uri, experiment, calls, state / "quarantine.jsonl", writer.lines, logdir)
        print(f"\n{interruption}: {v}")
        assert v.ok(), f"{interruption}: {v}"
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)
        if server is not None:
            server.stop()


# --- the torture ----------------------------------------------------------------------------------------

TORTURE_SETTLE = 5.0
ROTATIONS = ("rename", "rename_gzip", "rename_gzip_delete", "copytruncate", "copytruncate_gzip_delete")
GZ_MIN_AGE_S = 8.0  # a doomed .gz goes two rotations later, once this old ...
CALM_S = TORTURE_SETTLE + 4.0  # ... and once the daemon has run this long without a kill since it was made
CALM_EVERY = 10  # every 10th restart, the killer lets the daemon run CALM_S


class Uptime:
    """When the daemon was up (healthy until stopped): the rotator deletes nothing the daemon had no time for."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[list[float]] = []

    def up(self) -> None:
        with self.lock:
            self.spans.append([time.monotonic(), float("inf")])

    def down(self) -> None:
        with self.lock:
            self.spans[-1][1] = time.monotonic()

    def calm_since(self, t: float) -> bool:
        """Whether the daemon started after t and then ran CALM_S without a kill: time for it to write every
        call of a file made at t (retries come within --settle / 2, failed-only calls settle in --settle)."""
        now = time.monotonic()
        with self.lock:
            return any(start >= t and min(end, now) - start >= CALM_S for start, end in self.spans)


@dataclass
class Torture:
    """One run: the writer, the rotator and the killer, and what they did."""

    logdir: Path
    uri: str
    experiment: str
    state: Path
    rng: random.Random
    calls: list[list[dict]]
    kills: int
    rotate_s: tuple[float, float]
    pace_s: float
    writer: LineWriter = field(init=False)
    uptime: Uptime = field(default_factory=Uptime)
    rotated: threading.Event = field(default_factory=threading.Event)
    stop_rotating: threading.Event = field(default_factory=threading.Event)
    did: Counter = field(default_factory=Counter)
    sigterm_codes: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.writer = LineWriter(self.logdir / "proxy.jsonl")
        self.writer.log.touch()
        # Separate streams so the schedule of each actor replays from the seed whatever the others do.
        self.write_rng, self.rotate_rng = random.Random(self.rng.random()), random.Random(self.rng.random())

    def daemon(self) -> Daemon:
        return Daemon(self.logdir, self.uri, self.experiment, self.state, "--settle", str(TORTURE_SETTLE))

    def write(self) -> None:
        """Calls at a steady pace; most retries split from their failed attempt by up to half of --settle,
        so the failure and its retry land on either side of rotations and kills."""
        rng, deferred, seq = self.write_rng, [], itertools.count()
        try:
            for call in self.calls:
                now = time.monotonic()
                for item in sorted(x for x in deferred if x[0] <= now):
                    self.writer.append(item[2])
                    deferred.remove(item)
                if len(call) > 1 and rng.random() < 0.9:
                    cut = rng.randrange(1, len(call))
                    self.writer.append(call[:cut])
                    deferred.append((now + rng.uniform(0.2, TORTURE_SETTLE / 2), next(seq), call[cut:]))
                    self.did["split calls"] += 1
                else:
                    self.writer.append(call)
                self.writer.written.append(call)
                time.sleep(self.pace_s)
            for due, _, records in sorted(deferred):
                time.sleep(max(0.0, due - time.monotonic()))
                self.writer.append(records)
        except Exception as e:  # pragma: no cover - reported by the test
            self.errors.append(f"writer: {e!r}")

    def rotate(self) -> None:
        """Every kind of rotation, at random, every rotate_s.

        A .gz doomed to deletion goes the way logrotate's `rotate N` deletes: not at once but two rotations
        later, once GZ_MIN_AGE_S old, and only after the daemon has run CALM_S without a kill since the file
        was made. A file deleted before any reader had a chance at it is lost to any reader, and a daemon
        killed every second or two has no chance at anything; what the issue asks is that a held call is
        written before the file it lives in *can* go away. After a calm spell a correct daemon has written
        every call of the file (their retries came within --settle / 2, failed-only calls settled), so a
        call lost with its deleted file is the daemon's loss, not the test's."""
        rng, log, n, doomed = self.rotate_rng, self.writer.log, 0, []
        try:
            while not self.stop_rotating.wait(rng.uniform(*self.rotate_s)):
                n += 1
                kind = rng.choice(ROTATIONS)
                rotated = log.with_name(f"{log.name}.{n}")
                with self.writer.lock:
                    if kind.startswith("rename"):
                        log.rename(rotated)
                        log.touch()
                    else:
                        shutil.copyfile(log, rotated)
                        with log.open("r+") as f:
                            f.truncate(0)
                if "gzip" in kind:
                    gz = gzip_away(rotated)
                    if kind.endswith("delete"):
                        doomed.append((n, gz, time.monotonic()))
                self.did[kind] += 1
                self.rotated.set()
                for item in list(doomed):
                    k, gz, made = item
                    if n - k >= 2 and time.monotonic() - made >= GZ_MIN_AGE_S and self.uptime.calm_since(made):
                        gz.unlink()
                        doomed.remove(item)
                        self.did["gz deleted"] += 1
        except Exception as e:  # pragma: no cover - reported by the test
            self.errors.append(f"rotator: {e!r}")

    def run(self) -> Daemon:
        """Write and rotate in threads; kill and restart the daemon until the writer is done and enough kills were made."""
        rng = self.rng
        d = self.daemon().start()
        self.uptime.up()
        threads = [threading.Thread(target=self.write, daemon=True), threading.Thread(target=self.rotate, daemon=True)]
        for t in threads:
            t.start()
        try:
            while threads[0].is_alive() or self.did["SIGKILL"] < self.kills:
                if (self.did["SIGKILL"] + self.did["SIGTERM"]) % CALM_EVERY == CALM_EVERY - 1:
                    time.sleep(CALM_S + 0.5)  # a calm spell: lets the rotator delete old .gz files
                elif rng.random() < 0.4:  # just after a rotation: held lines in a file just renamed or gzipped
                    self.rotated.clear()
                    self.rotated.wait(3)
                    time.sleep(rng.uniform(0.0, 0.8))
                else:
                    time.sleep(rng.uniform(0.1, 1.0))
                sig = signal.SIGTERM if rng.random() < 0.15 else signal.SIGKILL
                self.uptime.down()
                code = d.stop(sig)
                if sig == signal.SIGTERM:
                    self.sigterm_codes.append(code)
                self.did[sig.name] += 1
                d = self.daemon().start()
                self.uptime.up()
            threads[0].join()
        finally:
            self.stop_rotating.set()
            threads[1].join(timeout=30)
        return d


def knobs() -> dict:
    """CI: about 18 s of writing and >= 6 kills (a restart costs the daemon's start-up, 2-5 s on 2 cores, so
    the kills set the length: 35-55 s); LITELLM_INGEST_SOAK=N: N times 240 calls and 20 kills, and the time."""
    if not SOAK:
        return {"calls": 120, "kills": 6, "rotate_s": (1.0, 3.0), "pace_s": 0.15}
    return {"calls": 240 * SOAK, "kills": 20 * SOAK, "rotate_s": (1.0, 3.0), "pace_s": 0.15}


def torture(uri: str, db: Path, tmp_path: Path, capture: list[dict], label: str) -> None:
    seed = SEED ^ zlib.crc32(label.encode())
    rng = random.Random(seed)
    k = knobs()
    logdir = tmp_path / "logs"
    logdir.mkdir()
    calls = held_calls(capture, k["calls"], rng)
    t = Torture(logdir, uri, f"torture-{uuid.uuid4().hex[:8]}", tmp_path / "state", rng, calls, k["kills"], k["rotate_s"], k["pace_s"])
    started = time.monotonic()
    print(f"\n{label}: seed {SEED} (LITELLM_INGEST_TORTURE_SEED={SEED} replays it), {len(calls)} calls, {spans_of(calls)} spans")
    d = t.run()
    try:
        counts = wait_quiet(db, t.experiment, calls, timeout=120 + 60 * SOAK, idle_s=TORTURE_SETTLE + 10)
        code = d.stop(signal.SIGTERM)
    finally:
        if d.alive():
            d.stop(signal.SIGKILL)
    v = verdict(uri, t.experiment, calls, t.state / "quarantine.jsonl", t.writer.lines, logdir)
    print(f"{label}: {time.monotonic() - started:.0f}s, did {dict(t.did)}, store {counts}; {v}")
    assert not t.errors, f"seed={SEED}: {t.errors}"
    assert v.ok(), f"{label}: {v}; did {dict(t.did)}"
    assert code == 0 and set(t.sigterm_codes) <= {0}, f"seed={SEED}: SIGTERM exit codes {t.sigterm_codes} and {code}"
    assert t.did["SIGKILL"] >= k["kills"]


def test_torture_sqlite_store(tmp_path: Path, capture: list[dict]) -> None:
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    torture(uri, sqlite_path(uri), tmp_path, capture, "sqlite")


@pytest.mark.server
def test_torture_mlflow_server(tmp_path: Path, capture: list[dict], mlflow_server) -> None:
    torture(mlflow_server.url, sqlite_path(mlflow_server.backend_uri), tmp_path, capture, "server")
