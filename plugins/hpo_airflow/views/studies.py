"""The study list: every study run the user may read (``/hpo/``), or one DAG's (``/hpo/dags/<dag>``).

Rows come from the read model (:func:`hpo_core.study.progress.list_studies`), filtered to the DAGs
Airflow's auth manager lets the user read, with each run's Airflow state and registered model.
"""

from __future__ import annotations

from typing import Annotated, Any

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.core_api.security import get_user
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import HTMLResponse, JSONResponse

from hpo_airflow.views import server
from hpo_airflow.views.base import AUTHENTICATED, LIVE_STATES, READ_DAG, add_model_links, page

__all__ = ["router"]

router = APIRouter()


@router.get("/", dependencies=AUTHENTICATED, response_class=HTMLResponse)
def studies_page(request: Request) -> HTMLResponse:
    """Every study run the user may read."""
    return page(request, "HPO studies", "studies.js")


@router.get("/dags/{dag_id}", dependencies=READ_DAG, response_class=HTMLResponse)
def dag_page(request: Request, dag_id: str) -> HTMLResponse:
    """The study runs of one DAG (its "HPO" tab)."""
    return page(request, f"HPO · {dag_id}", "studies.js", dag_id=dag_id)


@router.get("/api/studies")
def api_studies(user: Annotated[Any, Depends(get_user)], dag_id: str | None = None) -> JSONResponse:
    """The rows of the list: the study runs of the DAGs the user may read (``dag_id``: of that DAG)."""
    from hpo_core.study.progress import list_studies

    allowed = get_auth_manager().get_authorized_dag_ids(user=user, method="GET")
    if dag_id is not None:
        if dag_id not in allowed:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden")
        allowed = {dag_id}
    rows = [r.to_dict() for r in list_studies(server.deployment(), dag_ids=allowed)]
    states = server.dag_run_states((r["dag_id"], r["run_id"]) for r in rows)
    for row in rows:
        row["airflow_state"] = states.get((row["dag_id"], row["run_id"]))
        row["live"] = row["airflow_state"] in LIVE_STATES
        add_model_links(row)
    study_dag = server.is_study_dag(dag_id) if dag_id else None
    return JSONResponse({"studies": rows, "is_study_dag": study_dag})
