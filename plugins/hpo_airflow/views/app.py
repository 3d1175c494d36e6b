"""The HPO view's FastAPI app, which the plugin mounts on the Airflow API server at ``/hpo``.

It holds what every view shares: the refusal pages, the assets (``static/``: the view's scripts and
style sheet; ``vendor/plotly.min.js`` from the installed plotly package: no CDN, no internet), and
the routers of every view in :data:`hpo_airflow.views.VIEWS`. Built on the first request (see
:class:`hpo_airflow.plugin.HpoViewApp`).
"""

from __future__ import annotations

import html
import importlib
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from hpo_airflow.views import VIEWS

__all__ = ["create_app"]

STATIC = Path(__file__).parent / "static"
#: What a refused page says (the JSON API answers with Airflow's ``{"detail": ...}``).
_REFUSALS = {401: "Sign in to Airflow to see studies.", 403: "You may not read this study's DAG."}


def create_app() -> FastAPI:
    """The view's app: every registered view's routes (no route touches a database until called)."""
    app = FastAPI(title="HPO view", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(StarletteHTTPException, _refused)  # type: ignore[arg-type]
    app.add_api_route("/vendor/plotly.min.js", _plotly_js, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for view in VIEWS:
        app.include_router(importlib.import_module(f"{__package__}.{view.module}").router)
    return app


async def _refused(request: Request, exc: StarletteHTTPException) -> Response:
    """Pages answer a refusal with a short page; the JSON API and links with JSON, as the core API does."""
    path = request.url.path
    if "/api/" in path or "/links/" in path:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    text = html.escape(_REFUSALS.get(exc.status_code, str(exc.detail)))
    page = f"<!doctype html><title>HPO</title><p>{text}</p>"
    return HTMLResponse(page, status_code=exc.status_code, headers=exc.headers)


def _plotly_js() -> FileResponse:
    """plotly.js as the installed plotly package ships it (the study page's plots)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})
