"""Files as LiteLLM's bucket loggers write them: one JSON object per call with no newline (`s3_v2`'s
default, `gcs_bucket`'s legacy mode), or a batch of records joined by newlines with none after
the last (`s3_batch_file_upload`, batched `gcs_bucket`). As `aws s3 sync` leaves them on disk, they
are records at once, whatever their age; a file that can never become one is quarantined, never
skipped in silence.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ingest.fingerprint import fingerprint_of
from ingest.sources import is_document
from tests.conftest import all_traces, copies
from tests.followkit import RecordingSink, tailer

EXE = str(Path(sys.executable).parent / "litellm-ingest")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def batch(logs: Path, uri: str, state: Path) -> tuple[int, dict[str, Any]]:
    p = subprocess.run(
        [EXE, "batch", str(logs), "--tracking-uri", uri, "--experiment-name", "objects", "--state-dir", str(state), "--json"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, json.loads(p.stdout)


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def per_call_objects(folder: Path, records: list[dict], hours_old: float) -> list[Path]:
    """``{s3_path}/{YYYY-MM-DD}/{id}.json``, body ``json.dumps(payload)``: no newline."""
    paths = []
    for r in records:
        day = time.strftime("%Y-%m-%d", time.gmtime(r["startTime"]))
        p = folder / day / f"{r['id']}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(r))
        age(p, hours_old * 3600)
        paths.append(p)
    return paths


def test_a_folder_of_per_call_objects_is_one_trace_per_call_new_or_old(capture: list[dict], tmp_path: Path) -> None:
    records = [r for b in copies(capture, 2, "objects") for r in b]
    calls = {r["litellm_call_id"] for r in records}
    bucket = tmp_path / "bucket"
    per_call_objects(bucket / "old", records[: len(records) // 2], hours_old=2)
    per_call_objects(bucket / "new", records[len(records) // 2 :], hours_old=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, s = batch(bucket, uri, tmp_path / "state")
    assert code == 0, s
    assert s["files"] == len(records) and s["files_skipped"] == 0 and s["records_read"] == len(records) and s["quarantined"] == 0
    traces = all_traces(uri, "objects", include_spans=False)
    assert sorted(t.info.tags["litellm.call_id"] for t in traces) == sorted(calls)
    code, again = batch(bucket, uri, tmp_path / "state")
    assert code == 0 and again["records_read"] == 0 and again["traces_written"] == 0


def test_a_batch_file_without_a_final_newline_is_read_whole_at_once(capture: list[dict], tmp_path: Path) -> None:
    records = copies(capture, 1, "batchfile")[0]
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "batch_2026-11-28T10:00:00_1a2b3c.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, s = batch(logs, uri, tmp_path / "state")
    assert code == 0 and s["records_read"] == len(records) and s["quarantined"] == 0
    assert len(all_traces(uri, "objects", include_spans=False)) == len({r["litellm_call_id"] for r in records})


def test_a_file_that_can_never_become_a_record_is_quarantined_once_it_stops_changing(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    cut = logs / "cut.json"
    cut.write_text('{"id": "chatcmpl-x", "call_type": "acompletion", "messa')
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, s = batch(logs, uri, tmp_path / "state")
    assert code == 0 and s["files_skipped"] == 1 and s["quarantined"] == 0, "a young one may still be being written"
    age(cut, 3600)
    code, s = batch(logs, uri, tmp_path / "state")
    assert code == 3 and s["files_skipped"] == 0 and s["quarantined_by_reason"] == {"truncated_line": 1}
    (q,) = [json.loads(x) for x in (tmp_path / "state" / "quarantine.jsonl").read_text().splitlines()]
    assert q["source"].endswith("cut.json") and q["line"] == 1 and "no newline" in q["detail"]
    code, s = batch(logs, uri, tmp_path / "state")
    assert code == 0 and s["quarantined"] == 0 and s["records_read"] == 0, "reported once, not on every run"


def test_a_whole_object_is_a_line_and_keeps_its_fingerprint_when_a_newline_follows() -> None:
    doc = json.dumps({"id": "a", "call_type": "acompletion"}).encode()
    assert is_document(doc) and is_document(doc + b" ") and not is_document(doc[:-1]) and not is_document(b'"text"')
    assert is_document(b"[" + doc + b"]") and not is_document(b"[" + doc), "the generic API logger's bodies are arrays"
    assert fingerprint_of(io.BytesIO(doc[:-1])) is None
    assert fingerprint_of(io.BytesIO(doc)) == fingerprint_of(io.BytesIO(doc + b"\n")) == fingerprint_of(io.BytesIO(doc + b"\n{}"))
    assert fingerprint_of(io.BytesIO(doc[:-1]), unterminated_ok=True) is not None


def test_the_daemon_reads_an_object_at_once_and_nothing_twice_when_its_newline_arrives(capture: list[dict], tmp_path: Path) -> None:
    records = copies(capture, 1, "tailobj")[0][:3]
    logdir, state = tmp_path / "logs", tmp_path / "state"
    logdir.mkdir()
    log = logdir / "proxy.jsonl"
    sink = RecordingSink()
    t = tailer(logdir, state, sink, 0.0)
    log.write_text(json.dumps(records[0]))
    t.step()
    assert len(sink.traces) == 1
    with log.open("a") as f:
        f.write("\n" + json.dumps(records[1]) + "\n" + json.dumps(records[2]))
    t.step()
    t.close()
    t = tailer(logdir, state, sink, 0.0)
    t.step()
    t.close()
    assert sorted(sink.calls()) == sorted(r["litellm_call_id"] for r in records)
    assert not (state / "quarantine.jsonl").exists()
