"""Deadline alerts of a study DAG: Airflow's ``DeadlineAlert`` with a log or a webhook callback.

Airflow 3 replaced SLAs with deadline alerts: the scheduler notices a run that is still going at
its deadline and the triggerer runs the alert's async callback. The study file opts in with an
``alerts:`` section (see :class:`hpo_core.spec.AlertsSpec`). The webhook's URL is looked up when
the alert fires, from an environment variable or an Airflow connection, so it is never part of
the DAG, the callback's stored arguments or any log line.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from typing import Any

import httpx
from airflow.sdk import BaseHook
from airflow.sdk.definitions.callback import AsyncCallback
from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference
from airflow.sdk.log import mask_secret

from hpo_core.errors import HpoError
from hpo_core.spec import StudySpec

__all__ = [
    "AlertDeliveryError",
    "deadline_alert",
    "deadline_message",
    "log_deadline_missed",
    "notify_webhook",
]

log = logging.getLogger(__name__)

#: Seconds the webhook may take to answer.
WEBHOOK_TIMEOUT = 10.0


class AlertDeliveryError(HpoError, RuntimeError):
    """The alert could not be delivered; the message names the target, never its URL."""


def deadline_alert(spec: StudySpec) -> DeadlineAlert | None:
    """The study's deadline alert, or ``None`` when its file has no ``alerts:`` section.

    The deadline counts from the moment the run was queued. Only identifiers go into the
    callback's arguments (they are stored with the DAG and logged if the callback fails).
    """
    alerts = spec.alerts
    if alerts is None:
        return None
    kwargs: dict[str, Any] = {"study": spec.name, "deadline_seconds": alerts.deadline_seconds}
    if alerts.callback == "webhook":
        if alerts.webhook_url_env:
            kwargs["url_env"] = alerts.webhook_url_env
        if alerts.webhook_conn_id:
            kwargs["conn_id"] = alerts.webhook_conn_id
        callback = AsyncCallback(notify_webhook, kwargs=kwargs)
    else:
        callback = AsyncCallback(log_deadline_missed, kwargs=kwargs)
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=dt.timedelta(seconds=alerts.deadline_seconds),
        callback=callback,
        name=f"{spec.dag_id} deadline",
    )


def deadline_message(
    *, study: str, deadline_seconds: int, context: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The alert as JSON: which study, DAG and run, and how late (``text`` for chat webhooks)."""
    dag_run = dict((context or {}).get("dag_run") or {})
    deadline = dict((context or {}).get("deadline") or {})
    dag_id = dag_run.get("dag_id") or f"hpo_{study}"
    run_id = dag_run.get("dag_run_id") or dag_run.get("run_id")
    text = (
        f"HPO study {study}: DAG run {dag_id} / {run_id} is still {dag_run.get('state', 'running')} "
        f"{deadline_seconds}s after it was queued"
    )
    return {
        "event": "hpo.deadline_missed",
        "study": study,
        "dag_id": dag_id,
        "run_id": run_id,
        "state": dag_run.get("state"),
        "queued_at": _text(dag_run.get("queued_at")),
        "deadline_time": _text(deadline.get("deadline_time")),
        "deadline_seconds": deadline_seconds,
        "text": text,
    }


async def log_deadline_missed(
    *, study: str, deadline_seconds: int, context: Mapping[str, Any] | None = None
) -> str:
    """Deadline callback ``log``: a warning in the triggerer's log."""
    message = deadline_message(study=study, deadline_seconds=deadline_seconds, context=context)
    log.warning("%s", message["text"])
    return str(message["text"])


async def notify_webhook(
    *,
    study: str,
    deadline_seconds: int,
    url_env: str | None = None,
    conn_id: str | None = None,
    context: Mapping[str, Any] | None = None,
) -> str:
    """Deadline callback ``webhook``: POST :func:`deadline_message` as JSON.

    Raises:
        AlertDeliveryError: no URL configured, the webhook unreachable or answering with an error.
    """
    target = f"environment variable {url_env}" if url_env else f"connection {conn_id!r}"
    url = await _webhook_url(url_env=url_env, conn_id=conn_id)
    message = deadline_message(study=study, deadline_seconds=deadline_seconds, context=context)
    try:
        async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT) as client:
            response = await client.post(url, json=message)
    except httpx.HTTPError as e:
        # httpx errors may quote the URL: only the error type leaves this function.
        raise AlertDeliveryError(f"deadline webhook ({target}) unreachable: {type(e).__name__}") from None
    if response.status_code >= 400:
        raise AlertDeliveryError(f"deadline webhook ({target}) answered HTTP {response.status_code}")
    log.warning("%s; webhook (%s) answered HTTP %s", message["text"], target, response.status_code)
    return f"webhook ({target}) answered HTTP {response.status_code}"


async def _webhook_url(*, url_env: str | None, conn_id: str | None) -> str:
    if url_env:
        url = os.environ.get(url_env, "")
        if not url:
            raise AlertDeliveryError(f"deadline webhook: environment variable {url_env} is not set")
        return _masked(url)
    if not conn_id:
        raise AlertDeliveryError("deadline webhook: neither url_env nor conn_id given")
    try:
        conn = await BaseHook.aget_connection(conn_id)
    except Exception as e:  # not found, or the API unreachable: say which, hide the rest
        raise AlertDeliveryError(f"deadline webhook: connection {conn_id!r}: {type(e).__name__}") from None
    return _masked(connection_url(conn.host, port=conn.port, schema=conn.schema, extra=conn.extra_dejson))


def connection_url(
    host: str | None, *, port: int | None, schema: str | None, extra: Mapping[str, Any]
) -> str:
    """URL of an HTTP connection: ``host`` as a full URL, or ``schema://host:port``; plus the
    ``endpoint`` of its extra. Follows the HTTP provider's conventions (``schema`` is the scheme).
    """
    if not host:
        raise AlertDeliveryError("deadline webhook: the connection has no host")
    base = host if "://" in host else f"{schema or 'http'}://{host}" + (f":{port}" if port else "")
    path = str(extra.get("endpoint") or "")
    if path:
        base = base.rstrip("/") + "/" + path.lstrip("/")
    return base


def _masked(url: str) -> str:
    """Give the URL to Airflow's secrets masker, so that no log shows it."""
    mask_secret(url)
    return url


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)
