"""One study run (``/hpo/dags/<dag>/runs/<run>``, the "HPO" tab of a DAG run): progress by state,
best trial, plots and the trial table, with links to each trial's task instance and MLflow run.

Its JSON is the read model (:func:`hpo_core.study.progress.load_progress`) plus the run's Airflow
state and public links; its plots are Plotly figures drawn from the storage
(:func:`hpo_core.tracking.plots.figures`), drawn again only when the run's trials changed.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse

from hpo_airflow.views import server, ui_base_path
from hpo_airflow.views.base import LIVE_STATES, READ_RUN, add_model_links, page, study_or_404

__all__ = ["router"]

router = APIRouter()

_figures: dict[tuple[Any, ...], dict[str, Any]] = {}
_figures_lock = threading.Lock()


@router.get("/dags/{dag_id}/runs/{run_id}", dependencies=READ_RUN, response_class=HTMLResponse)
def study_page(request: Request, dag_id: str, run_id: str) -> HTMLResponse:
    """The study run's page (filled by ``static/study.js``; it refreshes while the run is live)."""
    title = f"HPO · {dag_id} · {run_id}"
    return page(request, title, "study.js", vendor=("vendor/plotly.min.js",), dag_id=dag_id, run_id=run_id)


@router.get("/api/dags/{dag_id}/runs/{run_id}", dependencies=READ_RUN)
def api_study(dag_id: str, run_id: str) -> JSONResponse:
    """The study run: the read model, its Airflow state, and links (public addresses only)."""
    from hpo_core.study.progress import load_progress

    name, run = study_or_404(dag_id, run_id)
    data = load_progress(server.deployment(), name, run_id=run).to_dict()
    state = server.dag_run_states([(dag_id, run_id)]).get((dag_id, run_id))
    data["airflow_state"] = state
    data["live"] = state in LIVE_STATES
    add_model_links(data)
    _add_links(data)
    return JSONResponse(data, headers={"Cache-Control": "no-store"})


@router.get("/api/dags/{dag_id}/runs/{run_id}/plots", dependencies=READ_RUN)
def api_plots(dag_id: str, run_id: str) -> JSONResponse:
    """The run's Plotly figures (``history``, ``parallel``, ``importance``; ``notes`` say why one is not)."""
    name, run = study_or_404(dag_id, run_id)
    return JSONResponse(_drawn(name, run), headers={"Cache-Control": "no-store"})


def _add_links(data: dict[str, Any]) -> None:
    """Each trial's task instance in the Airflow grid and MLflow run; the parent run."""
    from hpo_core.tracking.backlinks import task_instance_url

    ui, experiment = server.mlflow_ui_url(), data.get("experiment_id")
    data["mlflow_ui"] = ui
    parent = data.get("parent_run_id")
    data["parent_run_url"] = (
        server.mlflow_run_url(ui, experiment, parent) if ui and experiment and parent else None
    )
    base = ui_base_path()
    for trial in data["trials"]:
        task = trial["task_id"]
        trial["task_url"] = (
            task_instance_url(base, data["dag_id"], data["run_id"], task, trial["slot"]) if task else None
        )
        run = trial.get("mlflow_run_id")
        trial["mlflow_url"] = (
            server.mlflow_run_url(ui, experiment, run) if ui and experiment and run else None
        )


def _drawn(name: str, run_id: str) -> dict[str, Any]:
    """The run's figures, drawn again only when its trials changed (count, finished, last completion)."""
    from hpo_core.study.progress import read_run
    from hpo_core.tracking.plots import figures

    run = read_run(server.deployment(), name, run_id=run_id)
    trials = run.trials
    key = (
        name,
        run_id,
        len(trials),
        sum(t.state.is_finished() for t in trials),
        max((t.datetime_complete.timestamp() for t in trials if t.datetime_complete), default=0.0),
    )
    with _figures_lock:
        hit = _figures.get(key)
    if hit is not None:
        return hit
    drawn = figures(run.spec, run.attrs, trials)
    with _figures_lock:
        if len(_figures) > 64:
            _figures.clear()
        _figures[key] = drawn
    return drawn
