"""What every HPO view shares: Airflow's access checks, the page shell, the run's study and model.

Every page, JSON call and redirect is checked through Airflow's auth manager the way the core REST
API checks it (``get_user``, ``requires_access_dag``): an anonymous request is refused (401), a
user who may not read the DAG gets 403. Imported on the API server only (by :mod:`.app`).
"""

from __future__ import annotations

import html
import threading
from typing import Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import get_user, requires_access_dag
from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import HTMLResponse

from hpo_airflow.views import server, ui_base_path
from hpo_core.errors import TrialStateError

__all__ = [
    "AUTHENTICATED",
    "LIVE_STATES",
    "READ_DAG",
    "READ_RUN",
    "add_model_links",
    "page",
    "study_or_404",
]

#: Any signed-in user (the list filters what it shows by the DAGs the user may read).
AUTHENTICATED = [Depends(get_user)]
#: Read access to the DAG in the path.
READ_DAG = [Depends(requires_access_dag("GET"))]
#: Read access to the DAG's runs and task instances (a study run shows both).
READ_RUN = [
    Depends(requires_access_dag("GET", DagAccessEntity.RUN)),
    Depends(requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE)),
]
#: Airflow DAG run states in which the study can still change (its page keeps refreshing).
LIVE_STATES = frozenset({"queued", "running"})

_study_names: dict[tuple[str, str], tuple[str, str]] = {}
_names_lock = threading.Lock()


def page(
    request: Request, title: str, script: str, *, vendor: tuple[str, ...] = (), **data: str
) -> HTMLResponse:
    """A view's page: an empty shell that ``static/hpo.js`` and the view's own ``script`` fill from its
    JSON API. ``vendor``: scripts it needs first (``vendor/plotly.min.js``); ``data``: ``data-*``
    attributes of the page's ``<main>`` (e.g. the DAG and run it shows)."""
    root = request.scope.get("root_path", "").rstrip("/")
    attrs = " ".join(f'data-{k.replace("_", "-")}="{html.escape(v, quote=True)}"' for k, v in data.items())
    sources = (*vendor, "static/hpo.js", f"static/{script}")
    scripts = "\n".join(f'<script src="{root}/{src}" defer></script>' for src in sources)
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="icon" href="{root}/static/icon.svg">
<link rel="stylesheet" href="{root}/static/hpo.css">
{scripts}
</head><body>
<main id="hpo" data-root="{html.escape(root, quote=True)}"
 data-airflow="{html.escape(ui_base_path(), quote=True)}" {attrs}>
<p class="muted">Loading…</p>
</main>
</body></html>
"""
    return HTMLResponse(body, headers={"Cache-Control": "no-store"})


def study_or_404(dag_id: str, run_id: str) -> tuple[str, str]:
    """The DAG run's study: ``(study_name, run_id)``; found once per DAG run (a run's study keeps its
    name). 404 when the run has no study (yet)."""
    from hpo_core.study.progress import find_study

    with _names_lock:
        found = _study_names.get((dag_id, run_id))
    if found is not None:
        return found
    try:
        found = find_study(server.deployment(), dag_id, run_id)
    except TrialStateError as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from e
    with _names_lock:
        if len(_study_names) > 1024:
            _study_names.clear()
        _study_names[(dag_id, run_id)] = found
    return found


def add_model_links(row: dict[str, Any]) -> None:
    """Give a study row's registered model its aliases now and its page in the MLflow UI."""
    model = row.get("registered_model")
    if model:
        model["aliases"] = server.model_aliases(model["name"], model["version"])
        ui = server.mlflow_ui_url()
        model["url"] = server.mlflow_model_url(ui, model["name"], model["version"]) if ui else None
