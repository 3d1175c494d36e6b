"""The HPO view inside the Airflow UI: its pages, where the UI shows them, and where they are mounted.

A view is one module of this package with a FastAPI ``router`` (its page, the JSON its page reads,
or redirects), plus one entry in :data:`VIEWS` naming that module and the tabs the Airflow UI shows
it in (the plugin's ``external_views``). :mod:`.app` builds the FastAPI app from :data:`VIEWS` on
the API server's first request; a view's client script, if it has one, sits in ``static/`` next to
the shared ``hpo.js``.

This module is what Airflow loads in every component and task process (through the plugin), so it
imports nothing Airflow has not loaded already: the views themselves (FastAPI, the read model,
Optuna) load on the API server only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from airflow.configuration import conf

__all__ = ["APP_PREFIX", "STUDY_VIEW_ROUTE", "VIEWS", "Tab", "View", "external_views", "ui_base_path"]

#: Where the view's FastAPI app is mounted on the API server.
APP_PREFIX = "/hpo"
#: ``url_route`` of the study run's tab on a DAG run page (``/dags/<dag>/runs/<run>/plugin/<route>``).
STUDY_VIEW_ROUTE = "hpo-run"
#: The view's icon in the UI's navigation and tabs (``static/icon.svg``).
_ICON = "/static/icon.svg"


@dataclass(frozen=True)
class Tab:
    """Where the Airflow UI shows a view: one external view of the Airflow 3 plugin interface.

    ``destination``: ``nav`` (the navigation), ``dag``, ``dag_run``, ``task`` or ``task_instance`` (a
    tab on those pages); ``path``: the page under :data:`APP_PREFIX`, with the UI's placeholders
    (``{DAG_ID}``, ``{RUN_ID}``, ...).
    """

    name: str
    destination: str
    url_route: str
    path: str
    nav_top_level: bool = False


@dataclass(frozen=True)
class View:
    """A view: the module of this package holding its ``router``, and its tabs in the UI."""

    module: str
    tabs: tuple[Tab, ...] = ()


#: Every view of the plugin. A new view: its module here, and one entry.
VIEWS: tuple[View, ...] = (
    # Every study run the user may read (navigation), and one DAG's runs (a tab of the DAG).
    View(
        "studies",
        tabs=(
            Tab("HPO", "nav", "hpo", "/", nav_top_level=True),
            Tab("HPO", "dag", "hpo-dag", "/dags/{DAG_ID}"),
        ),
    ),
    # One study run: progress, plots and the trial table (a tab of the DAG run).
    View("study", tabs=(Tab("HPO", "dag_run", STUDY_VIEW_ROUTE, "/dags/{DAG_ID}/runs/{RUN_ID}"),)),
    # Where the study DAG's extra links lead (hpo_airflow.links): MLflow runs and model versions.
    View("redirects"),
)


def ui_base_path() -> str:
    """The path the Airflow UI and API are served under (from ``[api] base_url``; usually empty)."""
    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def external_views(base: str) -> list[dict[str, Any]]:
    """The plugin's ``external_views``: every tab of every view (``base``: :func:`ui_base_path`)."""
    root = f"{base}{APP_PREFIX}"
    return [
        {
            "name": tab.name,
            "href": f"{root}{tab.path}",
            "destination": tab.destination,
            "url_route": tab.url_route,
            "icon": f"{root}{_ICON}",
            **({"nav_top_level": True} if tab.nav_top_level else {}),
        }
        for view in VIEWS
        for tab in view.tabs
    ]
