"""The HPO plugin: the HPO view inside the Airflow UI and the study DAG's extra links.

Airflow loads this file (as the module ``plugin``; ``.airflowignore`` keeps it from loading the
package's other files as modules of their own) in every component and task process, so it stays
light: the view's FastAPI app is built on its first request, on the API server only.

- ``fastapi_apps``: the view, mounted on the API server at ``/hpo`` (:mod:`hpo_airflow.views.app`);
- ``external_views``: every tab of the views registered in :data:`hpo_airflow.views.VIEWS` ("HPO"
  in the navigation, on each DAG, on each DAG run);
- ``operator_extra_links``: "MLflow run" on slot tasks, "Study" and "Registered model" on
  ``finalize``, computed by the API server while the task runs (:mod:`hpo_airflow.links`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from hpo_airflow import links, views

__all__ = ["HpoPlugin", "HpoViewApp"]

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class HpoViewApp:
    """The view's ASGI app, built on its first request (only the API server ever serves one)."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if self._app is None:
            from hpo_airflow.views.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


class HpoPlugin(AirflowPlugin):
    """The HPO view and the study DAG's extra links."""

    name = "hpo"
    fastapi_apps = [{"name": "hpo", "app": HpoViewApp(), "url_prefix": views.APP_PREFIX}]
    external_views = views.external_views(views.ui_base_path())
    operator_extra_links = [links.MlflowRunLink(), links.StudyLink(), links.RegisteredModelLink()]
