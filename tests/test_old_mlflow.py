"""MLflow stores and servers of other versions than the MLflow litellm-ingest installs.

A store an older MLflow made is built here with this MLflow's own migrations, stopped at that
release's revision: the tables and ``alembic_version`` that release leaves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy

from tests.conftest import SAMPLE_LOGS, Postgres

EXE = str(Path(sys.executable).parent / "litellm-ingest")
MLFLOW_3_4 = "71994744cf8e"
MLFLOW_3_17 = "dc11669786a5"
MLFLOW_3_18 = "f4a9b2c7d1e6"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([EXE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _schema_of(uri: str, revision: str) -> None:
    """The schema an MLflow whose last migration is ``revision`` creates (its first tables, then its migrations)."""
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    engine = sqlalchemy.create_engine(uri)
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(uri)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    engine.dispose()


def _revision(uri: str) -> str:
    engine = sqlalchemy.create_engine(uri)
    with engine.connect() as conn:
        revision = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar_one()
    engine.dispose()
    return revision


def test_an_older_mlflows_postgresql_store_is_left_as_it_is_in_one_line(postgres: Postgres, tmp_path: Path) -> None:
    """MLflow upgrades an older schema in place when it opens it: one run into MLflow 3.4's database
    left it at 3.17's revision, which MLflow 3.4 cannot open (its server no longer starts)."""
    uri = postgres.new_database()
    _schema_of(uri, MLFLOW_3_4)
    for command in (["batch", "--state-dir", str(tmp_path / "st")], ["reconcile"]):
        proc = _run(*command, str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--tracking-uri", uri, cwd=tmp_path)
        assert proc.returncode == 4, (command, proc.stdout, proc.stderr)
        (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
        assert line.startswith("litellm-ingest: error: ") and "MLflow 3.4's schema" in line and MLFLOW_3_4 in line, line
        assert "`mlflow db upgrade postgresql://" in line, line
        assert _revision(uri) == MLFLOW_3_4


@pytest.mark.parametrize(("release", "head"), [("3.4", MLFLOW_3_4), ("3.17", MLFLOW_3_17)])
@pytest.mark.parametrize("holds_data", [False, True])
def test_an_older_mlflows_sqlite_store_is_left_as_it_is_in_one_line(tmp_path: Path, holds_data: bool, release: str, head: str) -> None:
    """MLflow 3.4's SQLite store (``mlflow ui`` run once in that folder by an older MLflow): empty,
    it was taken for a half-created one, moved aside and made anew, and that MLflow's server went on
    with the file moved aside; holding data, it was refused with advice that locks that MLflow out.
    3.17's too, once a newer MLflow is installed (its head is in ``RELEASE_HEADS``)."""
    from ingest.stores import _latest_revision

    if head == _latest_revision():
        pytest.skip(f"MLflow {release} is the MLflow installed")
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    _schema_of(uri, head)
    if holds_data:
        with sqlalchemy.create_engine(uri).begin() as conn:
            conn.execute(sqlalchemy.text("INSERT INTO experiments (experiment_id, name, lifecycle_stage) VALUES (7, 'mine', 'active')"))
    proc = _run("batch", "--state-dir", str(tmp_path / "st"), str(SAMPLE_LOGS / "proxy_calls.jsonl"), cwd=tmp_path)
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert f"MLflow {release}'s schema" in line and head in line, line
    assert _revision(uri) == head and not list(tmp_path.glob("mlflow.db.incomplete-*"))
    upgrade = re.search(r"`mlflow (db upgrade sqlite:///mlflow\.db)`", line)
    assert upgrade, f"no command that upgrades the store whole in: {line}"
    mlflow = Path(sys.executable).parent / "mlflow"
    subprocess.run([str(mlflow), *upgrade.group(1).split()], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    again = _run("batch", "--state-dir", str(tmp_path / "st"), str(SAMPLE_LOGS / "proxy_calls.jsonl"), "--json", cwd=tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["traces_written"] > 0, again.stderr


def _newer() -> tuple[str, str]:
    """A revision and a table of an MLflow newer than this one: 3.18's while this MLflow is older,
    else ones no release has (yet)."""
    from ingest.stores import _older_revision

    return (MLFLOW_3_18, "skill_tags") if not _older_revision(MLFLOW_3_18) else ("0a1b2c3d4e5f", "a_newer_mlflows_table")


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_newer_mlflows_store_is_left_as_it_is_in_one_line(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """MLflow 3.18 made its stores with a revision (``f4a9b2c7d1e6``) and tables 3.17 does not know; its
    SQLite store was called "not an MLflow store" holding "tables MLflow does not make". The store
    here is this MLflow's schema moved on the way 3.18's is: a table of its own and its revision."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}" if store == "sqlite" else request.getfixturevalue("postgres").new_database()
    revision, table = _newer()
    _schema_of(uri, "heads")
    with sqlalchemy.create_engine(uri).begin() as conn:
        conn.execute(sqlalchemy.text(f"CREATE TABLE {table} (skill_id VARCHAR(36) PRIMARY KEY)"))
        conn.execute(sqlalchemy.text(f"UPDATE alembic_version SET version_num = '{revision}'"))
    logs, state = str(SAMPLE_LOGS / "proxy_calls.jsonl"), str(tmp_path / "st")
    for command in (["batch", logs, "--state-dir", state], ["reconcile", logs], ["tail", str(SAMPLE_LOGS), "--state-dir", state]):
        proc = _run(*command, "--tracking-uri", uri, cwd=tmp_path)
        assert proc.returncode == 4, (command, proc.stdout, proc.stderr)
        (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
        assert line.startswith("litellm-ingest: error: ") and f"schema revision {revision}, which this" in line, line
        assert "does not know (a newer MLflow made it?)" in line, line
    assert _revision(uri) == revision and not list(tmp_path.glob("mlflow.db.incomplete-*"))


@pytest.mark.parametrize(
    ("version", "refused"),
    [("3.1.4", True), ("3.8.1", True), ("3.13.0", True), ("3.14.0", False), ("3.17.2", False), ("3.18.0.dev0", False), ("", False)],
)
def test_a_server_older_than_3_14_is_refused_by_its_version(version: str, refused: bool) -> None:
    """Measured on real servers: 3.13 quotes session and user ids and drops tags, 3.7 to 3.12 drop
    every tag (call id, trace name: reconcile finds none), 3.4 to 3.6 refuse gzip'd OTLP, 3.1 has no
    /v1/traces. A version that cannot be read (a gateway, a build that does not say) is not refused."""
    from ingest.sink import too_old

    said = too_old(version, "http://mlflow:5000")
    assert (said is not None) == refused
    if refused:
        assert said is not None and said.startswith(f"MLflow {version} at http://mlflow:5000 is older than 3.14")
