"""Where the study's state lives: Optuna storage and MLflow locations, from the environment.

Locations are passed around as a :class:`Deployment`; nothing reads them from module globals.
Credentials live in the URLs, so the URLs are never logged (use :func:`redact_url`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ENV_AIRFLOW_URL",
    "ENV_HOME",
    "ENV_MLFLOW_UI_URL",
    "ENV_STORAGE_URL",
    "Deployment",
    "airflow_url",
    "mlflow_ui_url",
    "public_base_url",
    "redact_url",
]

ENV_STORAGE_URL = "HPO_STORAGE_URL"
ENV_HOME = "HPO_HOME"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_REGISTRY_URI = "MLFLOW_REGISTRY_URI"
ENV_ARTIFACT_ROOT = "HPO_ARTIFACT_ROOT"
#: The Airflow UI's address, for links from MLflow runs back to Airflow (trial pods get it from the
#: kubernetes backend); without it, Airflow's own ``[api] base_url`` setting from the environment.
ENV_AIRFLOW_URL = "HPO_AIRFLOW_URL"
ENV_AIRFLOW_BASE_URL = "AIRFLOW__API__BASE_URL"
#: The MLflow UI as a browser reaches it, for links to runs and model versions (the HPO view's and the
#: extra links'); without it, the tracking URI when that is an http(s) address.
ENV_MLFLOW_UI_URL = "HPO_MLFLOW_UI_URL"


@dataclass(frozen=True)
class Deployment:
    """Locations of the trial storage and the MLflow tracking server / registry."""

    storage_url: str
    tracking_uri: str
    registry_uri: str | None = None
    artifact_root: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Deployment:
        """Read the locations from the environment; default to the embedded SQLite setup.

        The embedded default keeps everything under ``$HPO_HOME`` (default ``~/.hpo``):
        ``optuna.db``, ``mlflow.db`` and the ``mlartifacts`` folder.
        """
        env = os.environ if env is None else env
        home = default_home(env)
        storage = env.get(ENV_STORAGE_URL) or f"sqlite:///{home / 'optuna.db'}"
        tracking = env.get(ENV_TRACKING_URI) or f"sqlite:///{home / 'mlflow.db'}"
        artifact_root = env.get(ENV_ARTIFACT_ROOT)
        if artifact_root is None and tracking.startswith("sqlite:"):
            artifact_root = (home / "mlartifacts").as_uri()
        return cls(
            storage_url=storage,
            tracking_uri=tracking,
            registry_uri=env.get(ENV_REGISTRY_URI) or None,
            artifact_root=artifact_root,
        )

    def worker_env(self) -> dict[str, str]:
        """Environment that hands these locations to a worker process (never its arguments)."""
        out = {ENV_STORAGE_URL: self.storage_url, ENV_TRACKING_URI: self.tracking_uri}
        if self.registry_uri:
            out[ENV_REGISTRY_URI] = self.registry_uri
        if self.artifact_root:
            out[ENV_ARTIFACT_ROOT] = self.artifact_root
        return out

    def ensure_local_dirs(self) -> None:
        """Create the folders that SQLite files and local artifacts need."""
        for url in (self.storage_url, self.tracking_uri):
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if self.artifact_root and self.artifact_root.startswith("file://"):
            Path(self.artifact_root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)


def default_home(env: Mapping[str, str]) -> Path:
    """``$HPO_HOME``, else ``$AIRFLOW_HOME/hpo``, else ``~/.hpo``."""
    if env.get(ENV_HOME):
        return Path(env[ENV_HOME]).expanduser().resolve()
    if env.get("AIRFLOW_HOME"):
        return Path(env["AIRFLOW_HOME"]).expanduser().resolve() / "hpo"
    return Path.home() / ".hpo"


_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@]*)(:(?P<pw>[^@/]*))?@")


def redact_url(url: str) -> str:
    """Hide the password of a URL, for logs and messages."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@" if m["pw"] else m[0], url)


def public_base_url(raw: str | None) -> str | None:
    """``raw`` as a base URL fit for a link: http(s), no credentials, query or trailing slash; else None."""
    parts = urlsplit((raw or "").strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def airflow_url(env: Mapping[str, str] | None = None) -> str | None:
    """The Airflow UI's base URL (``HPO_AIRFLOW_URL``, else ``AIRFLOW__API__BASE_URL``), without
    credentials; None when neither is set."""
    env = os.environ if env is None else env
    return public_base_url(env.get(ENV_AIRFLOW_URL) or env.get(ENV_AIRFLOW_BASE_URL))


def mlflow_ui_url(tracking_uri: str, env: Mapping[str, str] | None = None) -> str | None:
    """The MLflow UI's base URL for links (``HPO_MLFLOW_UI_URL``, else ``tracking_uri`` when it is
    http(s)), without credentials; None when there is none (an embedded SQLite tracking store)."""
    env = os.environ if env is None else env
    return public_base_url(env.get(ENV_MLFLOW_UI_URL) or tracking_uri)
