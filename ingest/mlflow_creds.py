"""A client's credentials for an MLflow server, read as MLflow reads them
(``mlflow.utils.credentials.get_default_host_creds``): its environment variables first, then the
``[mlflow]`` section of ``~/.mlflow/credentials`` for the user name and password.

Copied rather than imported, as :mod:`ingest.mlflow_names` is: importing any part of MLflow runs its
whole ``__init__`` (1.3 s), and a cron run into a server that finds nothing new asks that server one
question (:mod:`ingest.idle`). ``tests/test_mlflow_names.py`` checks the copy against the MLflow
installed, variable by variable.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class HostCreds:
    username: str | None = None
    password: str | None = None
    token: str | None = None
    ignore_tls_verification: bool = False
    client_cert_path: str | None = None
    server_cert_path: str | None = None


def host_creds() -> HostCreds:
    """What MLflow's own client would send: an invalid boolean raises as MLflow's does."""
    username, password = _from_file()
    return HostCreds(
        username=os.environ.get("MLFLOW_TRACKING_USERNAME") or username,
        password=os.environ.get("MLFLOW_TRACKING_PASSWORD") or password,
        token=os.environ.get("MLFLOW_TRACKING_TOKEN"),
        ignore_tls_verification=_boolean("MLFLOW_TRACKING_INSECURE_TLS"),
        client_cert_path=os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"),
        server_cert_path=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"),
    )


def _from_file() -> tuple[str | None, str | None]:
    path = os.path.expanduser("~/.mlflow/credentials")
    if not os.path.exists(path):
        return None, None
    config = configparser.ConfigParser()
    config.read(path)
    if "mlflow" not in config:
        return None, None
    section = config["mlflow"]
    return section.get("mlflow_tracking_username"), section.get("mlflow_tracking_password")


def _boolean(name: str) -> bool:
    if name not in os.environ:
        return False
    value = os.environ[name]
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"{name} value must be one of ['true', 'false', '1', '0'] (case-insensitive), but got {value}")
    return value.lower() in ("true", "1")
