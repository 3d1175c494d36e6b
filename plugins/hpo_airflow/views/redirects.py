"""Where the study DAG's extra links lead (:mod:`hpo_airflow.links`): ``/hpo/links/mlflow-run`` to a
slot's MLflow run, ``/hpo/links/registered-model`` to the version ``finalize`` registered.

Resolved when followed, from the storage, behind Airflow's auth: a retried slot leads to its latest
attempt's run, and no task ever wrote an MLflow address to XCom.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import RedirectResponse

from hpo_airflow.views import server
from hpo_airflow.views.base import READ_RUN, study_or_404

__all__ = ["router"]

router = APIRouter()


@router.get("/links/mlflow-run", dependencies=READ_RUN)
def mlflow_run_link(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> RedirectResponse:
    """The "MLflow run" extra link: the slot's trial run (several trials: the filtered run list)."""
    from hpo_core.study.progress import load_progress

    name, run = study_or_404(dag_id, run_id)
    found = load_progress(server.deployment(), name, run_id=run)
    slot = [t for t in found.trials if t.task_id == task_id and (map_index < 0 or t.slot == map_index)]
    # The slot's trials as they stand now: a failed trial a retry replaced gives way to its replacement.
    runs = [t.mlflow_run_id for t in slot if t.counted and t.mlflow_run_id]
    ui = server.mlflow_ui_url()
    if not runs or ui is None or not found.experiment_id:
        why = "no MLflow run yet: its trials have not started" if not runs else "no MLflow UI address"
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{task_id}[{map_index}]: {why}")
    if len(runs) == 1:
        return RedirectResponse(server.mlflow_run_url(ui, found.experiment_id, runs[0]))
    return RedirectResponse(server.mlflow_runs_url(ui, found.experiment_id, runs))


@router.get("/links/registered-model", dependencies=READ_RUN)
def registered_model_link(dag_id: str, run_id: str) -> RedirectResponse:
    """The "Registered model" extra link of ``finalize``."""
    from hpo_core.study.progress import load_progress

    name, run = study_or_404(dag_id, run_id)
    model = load_progress(server.deployment(), name, run_id=run).row.registered_model
    ui = server.mlflow_ui_url()
    if not model or ui is None:
        why = "finalize registered no model for this run" if not model else "no MLflow UI address"
        raise HTTPException(status.HTTP_404_NOT_FOUND, why)
    return RedirectResponse(server.mlflow_model_url(ui, model["name"], model["version"]))
