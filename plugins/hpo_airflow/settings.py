"""What a task process sets up first: the deployment's locations (environment first, then Airflow
Connections), and no needless import of Airflow's ORM models."""

from __future__ import annotations

import logging
import os

from airflow.models import import_all_models
from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from airflow.sdk.log import mask_secret
from sqlalchemy import event
from sqlalchemy.orm import Mapper

from hpo_core.deployment import ENV_STORAGE_URL, ENV_TRACKING_URI, Deployment
from hpo_core.stack_warnings import silence_stack_warnings

__all__ = [
    "MLFLOW_CONN_ID",
    "OPTUNA_CONN_ID",
    "prepare_task_process",
    "resolve_deployment",
    "skip_airflow_model_import",
]

log = logging.getLogger(__name__)

#: Airflow Connection holding the Optuna storage database (e.g. a ``postgres`` connection).
OPTUNA_CONN_ID = "hpo_optuna"
#: Airflow Connection holding the MLflow tracking server (``http`` connection, host and port).
MLFLOW_CONN_ID = "hpo_mlflow"


def resolve_deployment() -> Deployment:
    """Locations for this task: ``HPO_STORAGE_URL`` / ``MLFLOW_TRACKING_URI``, else the
    ``hpo_optuna`` / ``hpo_mlflow`` Airflow Connections, else the embedded SQLite default.

    Called at execute time only: parsing a DAG never looks a connection up.
    """
    env = dict(os.environ)
    if not env.get(ENV_STORAGE_URL):
        url = _connection_uri(OPTUNA_CONN_ID)
        if url:
            env[ENV_STORAGE_URL] = _sqlalchemy_url(url)
    if not env.get(ENV_TRACKING_URI):
        url = _connection_uri(MLFLOW_CONN_ID)
        if url:
            env[ENV_TRACKING_URI] = url.replace("mlflow://", "http://", 1)
    deployment = Deployment.from_env(env)
    _mask(deployment)
    return deployment


def _connection_uri(conn_id: str) -> str | None:
    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    return str(conn.get_uri())


def _sqlalchemy_url(url: str) -> str:
    for old, new in (("postgres://", "postgresql+psycopg2://"), ("postgresql://", "postgresql+psycopg2://")):
        if url.startswith(old):
            return new + url[len(old) :]
    return url


def _mask(deployment: Deployment) -> None:
    """Register the URLs with Airflow's secrets masker so they never show in task logs."""
    for value in (deployment.storage_url, deployment.tracking_uri):
        if "@" in value:
            mask_secret(value)
    for key in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        if os.environ.get(key):
            mask_secret(os.environ[key])


def prepare_task_process() -> None:
    """What every task body of a study DAG does first: its log carries the pipeline's lines, not the
    stack's deprecation warnings, and Airflow's ORM models are not imported for nothing."""
    silence_stack_warnings()
    skip_airflow_model_import()


def skip_airflow_model_import() -> None:
    """Disarm Airflow's hook that imports all of its ORM models at the first SQLAlchemy mapper setup.

    Airflow installs it (``airflow.utils.orm_event_handlers``) for processes that use its metadata
    database. A task process does not (Airflow 3 tasks talk to the API server), but the Optuna
    storage and MLflow's SQL stores are SQLAlchemy ORMs too: the first query of a fresh task process
    would spend about a second importing some hundred Airflow models it never uses. Where Airflow's
    models are already set up (a scheduler-forked task process, ``dag.test()``), the hook has
    run and removing it changes nothing.
    """
    try:
        if event.contains(Mapper, "before_configured", import_all_models):
            event.remove(Mapper, "before_configured", import_all_models)
    except Exception as e:  # an optimisation only
        log.debug("Airflow's model import hook stays: %r", e)
