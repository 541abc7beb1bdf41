"""The bucket test servers start, clients find them from the environment alone, and the writers write what LiteLLM writes."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.buckets import (
    BucketServer,
    call_start,
    gcs_response_id,
    put_gcs_batch,
    put_gcs_objects,
    put_s3_v2_batch_file,
    put_s3_v2_objects,
    s3_v2_key,
    safe_dumps,
    server_env,
)
from tests.conftest import ROOT, read_capture, reidentify

RECORDS = reidentify(read_capture(), 0.0, "buckets")
BATCH_NAME = re.compile(r"batch_\d\d-\d\d-\d\d_[0-9a-f]{32}")


def run_client(server: BucketServer, script: str) -> dict:
    """Run `script` in a fresh interpreter with only the server's environment; it prints one JSON document."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=server.environ(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_servers_start(s3_server: BucketServer, gcs_server: BucketServer) -> None:
    for server in (s3_server, gcs_server):
        assert server.proc.poll() is None
        assert server.startup_s < 15
        bucket = server.new_bucket()
        assert len(bucket) >= 3 and bucket == bucket.lower()
        assert server.fs().ls(bucket) == []


def test_s3_env_only(s3_server: BucketServer) -> None:
    fs = s3_server.fs()
    bucket = s3_server.new_bucket()
    per_call = put_s3_v2_objects(fs, bucket, RECORDS, s3_path="litellm/")
    batch = put_s3_v2_batch_file(fs, bucket, RECORDS, s3_path="litellm")
    archive = put_s3_v2_objects(fs, bucket, RECORDS[:2], s3_path="archive", gzip=True)
    keys = per_call + batch + archive
    out = run_client(
        s3_server,
        f"""
        import json, s3fs
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        b = {bucket!r}
        found = fs.find(b + "/litellm", detail=True)
        listed = fs.ls(b + "/litellm", detail=True)
        keys = [b + "/" + k for k in {keys!r}]
        got = fs.cat(keys + [b + "/litellm/missing.json"], on_error="return")
        fresh = s3fs.S3FileSystem(skip_instance_cache=True).info(keys[0])
        try:
            missing = fs.find(b + "/no/such/prefix", detail=True)
        except Exception as e:
            missing = repr(e)
        print(json.dumps({{
            "found": {{k: {{"ETag": v["ETag"], "size": v["size"], "type": v["type"], "LastModified": str(v["LastModified"])}}
                      for k, v in found.items()}},
            "listed": [(d["name"], d["type"], d["size"]) for d in listed],
            "bodies": {{k: v.decode("latin-1") if isinstance(v, bytes) else repr(v) for k, v in got.items()}},
            "fresh_info": {{k: str(v) for k, v in fresh.items()}},
            "missing": missing,
        }}))
        """,
    )
    # find: every object under the prefix, with ETag (quoted MD5 for a single-part put) and size
    assert sorted(out["found"]) == sorted(f"{bucket}/{k}" for k in per_call + batch)
    for key in per_call:
        info = out["found"][f"{bucket}/{key}"]
        assert re.fullmatch(r'"[0-9a-f]{32}"', info["ETag"]) and info["type"] == "file" and info["size"] > 0
    # ls: the date "directories", size 0, no ETag
    days = sorted({k.rsplit("/", 1)[0] for k in per_call})
    assert out["listed"] == [[f"{bucket}/{d}", "directory", 0] for d in days]
    # cat many at once: bodies exactly as uploaded, no trailing newline; a missing key comes back as an error
    for key, record in zip(per_call, RECORDS, strict=True):
        body = out["bodies"][f"{bucket}/{key}"].encode("latin-1")
        assert body == safe_dumps(record).encode() and not body.endswith(b"\n")
    for key in batch:
        body = out["bodies"][f"{bucket}/{key}"].encode("latin-1")
        assert not body.endswith(b"\n") and len(body.split(b"\n")) == len(RECORDS)
    gz = out["bodies"][f"{bucket}/{archive[0]}"].encode("latin-1")
    assert gzip.decompress(gz) == safe_dumps(RECORDS[0]).encode()
    assert "FileNotFoundError" in out["bodies"][f"{bucket}/litellm/missing.json"]
    # head_object on a fresh filesystem: Content-Type as LiteLLM sends it
    assert out["fresh_info"]["ContentType"] == "application/json"
    assert out["missing"] == {}


def test_gcs_env_only(gcs_server: BucketServer) -> None:
    fs = gcs_server.fs()
    bucket = gcs_server.new_bucket()
    day = datetime(2026, 11, 27, 23, 59, tzinfo=UTC)
    names = put_gcs_objects(fs, bucket, RECORDS, folder="logs/dev/", now=day)
    batch = put_gcs_batch(fs, bucket, RECORDS, folder="logs/dev", now=day)
    out = run_client(
        gcs_server,
        f"""
        import json, gcsfs
        fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
        b = {bucket!r}
        found = fs.find(b + "/logs/dev", detail=True)
        listed = fs.ls(b + "/logs/dev", detail=True)
        keys = sorted(found)
        got = fs.cat(keys + [b + "/logs/dev/missing"], on_error="return")
        try:
            missing = fs.find(b + "/no/such/prefix", detail=True)
        except Exception as e:
            missing = repr(e)
        print(json.dumps({{
            "cls": type(fs).__name__,
            "method": fs.credentials.method,
            "found": {{k: {{f: str(v.get(f)) for f in ("generation", "etag", "md5Hash", "size", "type", "mtime", "contentType")}}
                      for k, v in found.items()}},
            "listed": [(d["name"], d["type"]) for d in listed],
            "bodies": {{k: v.decode("utf-8") if isinstance(v, bytes) else repr(v) for k, v in got.items()}},
            "missing": missing,
        }}))
        """,
    )
    assert out["cls"] == "GCSFileSystem" and out["method"] == "anon"
    expected = {f"{bucket}/{n}" for n in [*names, batch]}
    assert set(out["found"]) == expected
    for info in out["found"].values():
        assert info["generation"].isdigit() and info["etag"] == info["md5Hash"] and info["type"] == "file"
        assert info["contentType"] == "application/json"
    assert out["listed"] == [[f"{bucket}/logs/dev/2026-11-27", "directory"]]
    # the per-call body is json.dumps(payload, default=str); the last write of a name wins
    last = {n: r for n, r in zip(names, RECORDS, strict=True)}
    for name, record in last.items():
        assert out["bodies"][f"{bucket}/{name}"] == json.dumps(record, default=str)
    # the embeddings' "<day>/" object: find lists it as a file whose name ends in "/", cat fetches it (the last one)
    embedding = "logs/dev/2026-11-27/"
    assert embedding in names and out["found"][f"{bucket}/{embedding}"]["type"] == "file"
    assert json.loads(out["bodies"][f"{bucket}/{embedding}"])["call_type"] == "aembedding"
    body = out["bodies"][f"{bucket}/{batch}"]
    assert body == "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in RECORDS)
    assert "FileNotFoundError" in out["bodies"][f"{bucket}/logs/dev/missing"]
    assert out["missing"] == {}


def test_gcs_names() -> None:
    by_id = {r["id"]: r for r in RECORDS}
    cache_hit = next(r for r in RECORDS if r.get("cache_hit") is True)
    assert gcs_response_id(cache_hit) in by_id  # the original call's id: its object gets overwritten
    embedding = next(r for r in RECORDS if r["call_type"] == "aembedding" and r["status"] == "success")
    assert gcs_response_id(embedding) == ""


def test_s3_keys_by_hand() -> None:
    record = {"id": "chatcmpl-a/b:c", "startTime": datetime(2026, 3, 4, 5, 6, 7, 890123).timestamp()}
    assert s3_v2_key(record) == "2026-03-04/time-05-06-07-890123_chatcmpl-a_b_c.json"
    assert s3_v2_key(record, s3_path="logs/", prefix="team/", granularity="hour") == (
        "logs/team/2026-03-04/05/time-05-06-07-890123_chatcmpl-a_b_c.json"
    )
    long = {**record, "id": "x" * 300}
    key = s3_v2_key(long)
    assert key.startswith("2026-03-04/time-05-06-07-890123_xxx") and len(key.rsplit("/", 1)[1]) <= 255


def proxy_python() -> Path | None:
    if env := os.environ.get("LITELLM_PROXY_PYTHON"):
        return Path(env)
    venv = ROOT / ".proxy-venv"
    # ready once its stamp is written: another test worker may be building it right now
    return venv / "bin" / "python" if (venv / ".requirements-sha256").exists() else None


ORACLE = """
import json, sys, types
from collections.abc import Iterator
from datetime import datetime, timezone
from litellm.integrations.s3_v2 import S3Logger
from litellm.integrations.gcs_bucket.gcs_bucket import GCSBucketLogger
from litellm.types.integrations.s3_v2 import s3BatchLoggingElement

args = json.load(sys.stdin)
s3 = types.SimpleNamespace(
    s3_strip_base64_files=False, s3_use_team_prefix=False, s3_use_key_prefix=False, s3_path=args["s3_path"],
    s3_log_prompts_only=None, s3_server_side_encryption=None, s3_sse_kms_key_id=None,
)
s3.resolve_partition_granularity = lambda: args["granularity"]
s3._sse_headers = types.MethodType(S3Logger._sse_headers, s3)
s3._build_batch_file_element = types.MethodType(S3Logger._build_batch_file_element, s3)
elements, puts = [], []
for r in args["records"]:
    e = S3Logger.create_s3_batch_logging_element(s3, datetime.fromtimestamp(r["startTime"]), r)
    p = S3Logger._prepare_put(s3, e)
    elements.append(e)
    puts.append({"key": e.s3_object_key, "body": p.json_string, "headers": dict(p.headers)})
batch = [{"key": e.s3_object_key, "body": e.body, "type": e.content_type} for e in S3Logger._batch_file_elements(s3, tuple(elements))]
gcs = types.SimpleNamespace()
items = [{"payload": r, "kwargs": {}, "response_obj": None} for r in args["records"]]
print(json.dumps({
    "puts": puts,
    "batch": batch,
    "gcs_batch_body": GCSBucketLogger._combine_payloads_to_ndjson(gcs, items),
    "gcs_batch_name": GCSBucketLogger._generate_batch_object_name(gcs, "2026-11-27", "1-abcdef01"),
    "gcs_folder": GCSBucketLogger._handle_folders_in_bucket_name(gcs, "bkt/logs/dev/", "2026-11-27/x"),
}))
"""


ORACLE_RECORDS = [*RECORDS[:3], RECORDS[20], {**RECORDS[0], "id": "chatcmpl-ünï/cödé:1", "messages": [{"content": "héllo\x00"}]}]


@pytest.fixture(scope="module", autouse=True)
def litellm_oracle() -> Iterator[subprocess.Popen | None]:
    """LiteLLM's own code run on ORACLE_RECORDS, started with the module (importing litellm takes ~6 s)."""
    python = proxy_python()
    if python is None:
        yield None
        return
    proc = subprocess.Popen(
        [str(python), "-c", ORACLE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    assert proc.stdin
    proc.stdin.write(json.dumps({"records": ORACLE_RECORDS, "s3_path": "litellm/", "granularity": "hour"}))
    proc.stdin.close()
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.skipif(proxy_python() is None, reason="no LiteLLM venv (set LITELLM_PROXY_PYTHON)")
def test_s3_writers_match_litellm(s3_server: BucketServer, litellm_oracle: subprocess.Popen) -> None:
    """LiteLLM's own key, body and header code, run on the same records, gives what the writers put."""
    records = ORACLE_RECORDS
    assert litellm_oracle.stdout and litellm_oracle.stderr
    stdout, stderr = litellm_oracle.stdout.read(), litellm_oracle.stderr.read()
    assert litellm_oracle.wait(timeout=60) == 0, stderr[-4000:]
    want = json.loads(stdout.strip().splitlines()[-1])

    fs = s3_server.fs()
    bucket = s3_server.new_bucket()
    keys = put_s3_v2_objects(fs, bucket, records, s3_path="litellm/", granularity="hour")
    assert keys == [p["key"] for p in want["puts"]]
    fresh = s3_server.fs()
    for key, put, record in zip(keys, want["puts"], records, strict=True):
        assert fresh.cat_file(f"{bucket}/{key}") == put["body"].encode()
        info = fresh.info(f"{bucket}/{key}")
        assert info["ContentType"] == put["headers"]["Content-Type"]
        assert call_start(record).strftime("%H-%M-%S-%f") in key

    now = datetime.now(UTC)
    batch = put_s3_v2_batch_file(fs, bucket, records, s3_path="litellm/", granularity="hour", now=now)
    assert len(batch) == len(want["batch"])
    for key, element in zip(batch, want["batch"], strict=True):
        assert BATCH_NAME.sub("batch_*", key) == BATCH_NAME.sub("batch_*", element["key"]), (key, element["key"])
        assert f"batch_{now:%H-%M-%S}_" in key
        assert fresh.cat_file(f"{bucket}/{key}") == element["body"].encode()
        assert fresh.info(f"{bucket}/{key}")["ContentType"] == element["type"]

    gcs_body = "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in records)
    assert want["gcs_batch_body"] == gcs_body
    assert want["gcs_batch_name"] == "2026-11-27/batch-1-abcdef01.ndjson"
    assert want["gcs_folder"] == ["bkt", "logs/dev/2026-11-27/x"]


def test_server_env_in_process(s3_server: BucketServer) -> None:
    import s3fs

    bucket = s3_server.new_bucket()
    put_s3_v2_objects(s3_server.fs(), bucket, RECORDS[:1])
    with server_env(s3_server):
        assert os.environ["AWS_ENDPOINT_URL"] == s3_server.url
        assert len(s3fs.S3FileSystem(skip_instance_cache=True).find(bucket)) == 1
    assert os.environ.get("AWS_ENDPOINT_URL") != s3_server.url


def test_s3_env_fixture(s3_env: BucketServer) -> None:
    import s3fs

    assert s3fs.S3FileSystem(skip_instance_cache=True).ls(s3_env.new_bucket()) == []


def test_gcs_env_fixture(gcs_env: BucketServer) -> None:
    from gcsfs.core import GCSFileSystem

    bucket = gcs_env.new_bucket()
    put_gcs_batch(gcs_env.fs(), bucket, RECORDS[:2])
    assert len(GCSFileSystem(skip_instance_cache=True).find(bucket)) == 1
