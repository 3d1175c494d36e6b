"""MLflow tracking: the study's parent run and one child run per trial attempt."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from hpo_core.deployment import Deployment

__all__ = [
    "client",
    "ensure_experiment",
    "fail_trial_run",
    "find_or_create_parent_run",
    "flat_params",
]

#: Artifact of a failed trial's child run: params, reason and traceback.
ERROR_ARTIFACT = "error.txt"


_clients: dict[tuple[str, str | None], Any] = {}


def client(deployment: Deployment, *, set_uris: bool = True) -> Any:
    """The process's ``MlflowClient`` for the deployment's tracking server and registry.

    One client per location and process (MLflow keeps its stores per process too). ``set_uris``:
    also make the locations MLflow's process-wide URIs, which its fluent API uses (an objective's
    ``mlflow.log_metric`` or ``log_model``, ``mlflow.register_model``, ``models:/`` URIs); the first
    time they change MLflow also resets its tracing, so a task that only calls the client skips it.
    """
    from mlflow.tracking import MlflowClient

    if set_uris:
        import mlflow

        mlflow.set_tracking_uri(deployment.tracking_uri)
        if deployment.registry_uri:
            mlflow.set_registry_uri(deployment.registry_uri)
    key = (deployment.tracking_uri, deployment.registry_uri)
    found = _clients.get(key)
    if found is None:
        found = _clients[key] = MlflowClient(
            tracking_uri=deployment.tracking_uri, registry_uri=deployment.registry_uri
        )
    return found


def ensure_experiment(mlflow_client: Any, name: str, artifact_root: str | None) -> str:
    """Return the id of experiment ``name``, creating it (race-safe) if needed."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(found.experiment_id)
        return str(found.experiment_id)
    location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
    try:
        return str(mlflow_client.create_experiment(name, artifact_location=location))
    except MlflowException:
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def find_or_create_parent_run(
    mlflow_client: Any,
    *,
    experiment_id: str,
    study_name: str,
    run_name: str,
    tags: Mapping[str, str],
    run_id: str | None = None,
) -> str:
    """The study's parent run: found by its ``hpo.study`` tag, so a re-run reuses it.

    ``run_id`` given (a long-lived study that several DAG runs add to): one parent run per
    DAG run, found by its ``hpo.run_id`` tag as well.
    """
    escaped = study_name.replace("'", "\\'")
    filter_string = f"tags.`hpo.study` = '{escaped}' and tags.`hpo.role` = 'study'"
    if run_id is not None:
        escaped_run = run_id.replace("'", "\\'")
        filter_string += f" and tags.`hpo.run_id` = '{escaped_run}'"
    existing = mlflow_client.search_runs([experiment_id], filter_string=filter_string, max_results=1)
    if existing:
        run = existing[0]
        if run.info.status != "RUNNING":
            mlflow_client.update_run(run.info.run_id, status="RUNNING")
        return str(run.info.run_id)
    run = mlflow_client.create_run(
        experiment_id,
        run_name=run_name,
        tags={**tags, "hpo.study": study_name, "hpo.role": "study"},
    )
    return str(run.info.run_id)


def flat_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow param strings (MLflow params are strings of bounded length)."""
    out = {}
    for key, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[str(key)] = text[:6000]
    return out


def fail_trial_run(mlflow_client: Any, run_id: str, *, reason: str, details: str = "") -> bool:
    """Close a trial's child run that its worker left RUNNING as FAILED, with the reason.

    Used when the worker could not do it itself (killed, pod gone): the run gets the ``hpo.error``
    tag and an ``error.txt`` artifact like a failure the worker recorded. A run that is already
    closed is left alone.

    Returns:
        Whether the run was closed here.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.status not in ("RUNNING", "SCHEDULED"):
        return False
    mlflow_client.set_tag(run_id, "hpo.error", reason[:5000])
    mlflow_client.log_text(run_id, f"{reason}\n\n{details}".rstrip() + "\n", ERROR_ARTIFACT)
    mlflow_client.set_terminated(run_id, status="FAILED")
    return True
