"""What the HPO view needs from its host, the Airflow API server: locations, DAG run states, MLflow.

The locations are the ones the study's tasks use (:func:`hpo_airflow.settings.resolve_deployment`:
the environment, then the ``hpo_optuna`` / ``hpo_mlflow`` Connections, which the API server reads
from its metadata database). DAG run states come from Airflow's ORM, as the core API reads them.
Locations never leave this module in a response: pages and JSON carry identifiers and the MLflow
UI's public address only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar
from urllib.parse import quote

from airflow.models.dag import DagTag
from airflow.models.dagrun import DagRun
from airflow.utils.session import create_session
from sqlalchemy import select, tuple_

from hpo_airflow.settings import resolve_deployment
from hpo_core.deployment import Deployment
from hpo_core.deployment import mlflow_ui_url as deployment_ui_url

__all__ = [
    "dag_run_states",
    "deployment",
    "is_study_dag",
    "mlflow_model_url",
    "mlflow_run_url",
    "mlflow_runs_url",
    "mlflow_ui_url",
    "model_aliases",
]

log = logging.getLogger(__name__)

#: Seconds the locations and a model version's aliases are kept.
_TTL = 30.0
_lock = threading.Lock()
_kept: dict[str, tuple[float, object]] = {}
_T = TypeVar("_T")


def _remember(key: str, make: Callable[[], _T]) -> _T:
    now = time.monotonic()
    with _lock:
        hit = _kept.get(key)
    if hit is not None and now - hit[0] < _TTL:
        return hit[1]  # type: ignore[return-value]
    value = make()
    with _lock:
        _kept[key] = (now, value)
    return value


def deployment() -> Deployment:
    """The study storage and MLflow locations, as the study's tasks resolve them; kept 30 s."""
    return _remember("deployment", resolve_deployment)


def mlflow_ui_url() -> str | None:
    """The MLflow UI's base URL for links (:func:`hpo_core.deployment.mlflow_ui_url`); None when
    there is none."""
    return deployment_ui_url(deployment().tracking_uri)


def mlflow_run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI."""
    return f"{ui}/#/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}"


def mlflow_runs_url(ui: str, experiment_id: str, run_ids: Iterable[str]) -> str:
    """The experiment's run list in the MLflow UI, filtered to ``run_ids``."""
    ids = ", ".join(f"'{r}'" for r in run_ids)
    search = quote(f"attributes.run_id IN ({ids})", safe="")
    return f"{ui}/#/experiments/{quote(str(experiment_id))}?searchFilter={search}"


def mlflow_model_url(ui: str, name: str, version: str) -> str:
    """A registered model version's page in the MLflow UI."""
    return f"{ui}/#/models/{quote(name, safe='')}/versions/{quote(str(version))}"


def model_aliases(name: str, version: str) -> list[str] | None:
    """The aliases a registered version has now (``None`` when MLflow cannot be asked); kept 30 s."""

    def ask() -> list[str] | None:
        from mlflow.exceptions import MlflowException

        from hpo_core.tracking import runs

        try:
            return sorted(runs.client(deployment(), set_uris=False).get_model_version(name, version).aliases)
        except (MlflowException, OSError) as e:
            log.warning("aliases of %s version %s unavailable: %s", name, version, type(e).__name__)
            return None

    return _remember(f"aliases:{name}:{version}", ask)


def dag_run_states(keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Airflow's state (queued, running, success, failed) of each ``(dag_id, run_id)`` found."""
    wanted = list(set(keys))
    if not wanted:
        return {}
    with create_session() as session:
        rows = session.execute(
            select(DagRun.dag_id, DagRun.run_id, DagRun.state).where(
                tuple_(DagRun.dag_id, DagRun.run_id).in_(wanted)
            )
        ).all()
    return {(dag_id, run_id): str(state) for dag_id, run_id, state in rows}


def is_study_dag(dag_id: str) -> bool:
    """Whether ``dag_id`` is a study DAG (the factory tags every study DAG ``hpo``)."""
    with create_session() as session:
        found = session.scalar(select(DagTag.name).where(DagTag.dag_id == dag_id, DagTag.name == "hpo"))
    return found is not None
