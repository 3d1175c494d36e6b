"""MLflow runs of a study: its parent run (round summaries, outcome) and one child run per trial attempt."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import botocore.exceptions
import mlflow
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from hpo_core.deployment import Deployment
from hpo_core.errors import TrackingError
from hpo_core.keys import Tag

__all__ = [
    "ERROR_ARTIFACT",
    "TRACKING_ERRORS",
    "bounded_http_retries",
    "client",
    "close_parent_run",
    "ensure_experiment",
    "fail_parent_run",
    "fail_trial_run",
    "find_or_create_parent_run",
    "finish_trial_run",
    "flat_params",
    "log_params_once",
    "log_round",
    "not_found",
    "start_trial_run",
    "tracking_call",
    "trial_run_tags",
]

log = logging.getLogger(__name__)

#: Artifact of a failed trial's child run: params, reason and traceback.
ERROR_ARTIFACT = "error.txt"


_clients: dict[tuple[str, str | None], MlflowClient] = {}

#: What a call to MLflow raises when the tracking server, the registry or the artifact store fails
#: (MLflow wraps HTTP errors in ``MlflowException``; artifact uploads raise boto's or OS errors).
TRACKING_ERRORS: tuple[type[BaseException], ...] = (
    MlflowException,
    requests.RequestException,
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    OSError,
)
_DOES_NOT_EXIST = ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)

#: MLflow's HTTP retries where a tracking outage must not stall the work (trial workers, observe):
#: about 10 s before a call gives up, instead of MLflow's default of about 4 minutes.
BOUNDED_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def not_found(error: BaseException) -> bool:
    """Whether MLflow answered "does not exist" (``RESOURCE_DOES_NOT_EXIST`` / HTTP 404).

    The only answer that may mean "none": an outage or any other error is not an absence.
    """
    if not isinstance(error, MlflowException):
        return False
    return error.error_code == _DOES_NOT_EXIST or error.get_http_status_code() == 404


@contextlib.contextmanager
def tracking_call(what: str) -> Iterator[None]:
    """Turn MLflow's errors inside the block into :class:`TrackingError` naming ``what`` failed."""
    try:
        yield
    except TRACKING_ERRORS as e:
        detail = e.message if isinstance(e, MlflowException) else f"{type(e).__name__}: {e}"
        message = f"{what}: MLflow is unavailable or failed ({detail}); retry once it is back"
        raise TrackingError(message) from e


@contextlib.contextmanager
def bounded_http_retries(environ: MutableMapping[str, str] | None = None) -> Iterator[None]:
    """Inside the block, MLflow's HTTP calls get a bounded retry budget, unless one is configured.

    Trial workers and ``observe`` go on without MLflow when it is down (the Optuna storage is the
    source of truth) and catch up later; MLflow's own default would stall each call for minutes.
    A forked trial process inherits the setting; the process's environment is restored after.
    """
    env = os.environ if environ is None else environ
    added = [key for key in BOUNDED_HTTP_RETRIES if key not in env]
    for key in added:
        env[key] = BOUNDED_HTTP_RETRIES[key]
    try:
        yield
    finally:
        for key in added:
            env.pop(key, None)


def client(deployment: Deployment, *, set_uris: bool = True) -> MlflowClient:
    """The process's ``MlflowClient`` for the deployment's tracking server and registry.

    One client per location and process (MLflow keeps its stores per process too). ``set_uris``:
    also make the locations MLflow's process-wide URIs, which its fluent API uses (an objective's
    ``mlflow.log_metric`` or ``log_model``, ``mlflow.register_model``, ``models:/`` URIs); the first
    time they change MLflow also resets its tracing, so a task that only calls the client skips it.
    """
    # No registry of its own: the tracking server's (MLflow's default), named explicitly, or the
    # registry URI the process had set before (for another deployment) would stay in force.
    registry = deployment.registry_uri or deployment.tracking_uri
    if set_uris:
        mlflow.set_tracking_uri(deployment.tracking_uri)
        mlflow.set_registry_uri(registry)
    key = (deployment.tracking_uri, registry)
    found = _clients.get(key)
    if found is None:
        found = _clients[key] = MlflowClient(tracking_uri=deployment.tracking_uri, registry_uri=registry)
    return found


def ensure_experiment(mlflow_client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """Return the id of experiment ``name``, creating it (race-safe) if needed."""
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
    mlflow_client: MlflowClient,
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
    filter_string = f"tags.`{Tag.STUDY}` = '{escaped}' and tags.`{Tag.ROLE}` = 'study'"
    if run_id is not None:
        escaped_run = run_id.replace("'", "\\'")
        filter_string += f" and tags.`{Tag.RUN_ID}` = '{escaped_run}'"
    existing = mlflow_client.search_runs([experiment_id], filter_string=filter_string, max_results=1)
    if existing:
        run = existing[0]
        if run.info.status != "RUNNING":
            mlflow_client.update_run(run.info.run_id, status="RUNNING")
        return str(run.info.run_id)
    run = mlflow_client.create_run(
        experiment_id,
        run_name=run_name,
        tags={**tags, Tag.STUDY: study_name, Tag.ROLE: "study"},
    )
    return str(run.info.run_id)


def flat_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow param strings (MLflow params are strings of bounded length)."""
    out = {}
    for key, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[str(key)] = text[:6000]
    return out


def fail_trial_run(mlflow_client: MlflowClient, run_id: str, *, reason: str, details: str = "") -> bool:
    """Close a trial's child run that its worker left RUNNING as FAILED, with the reason.

    Used when the worker could not do it itself (killed, pod gone): the run gets the ``hpo.error``
    tag and an ``error.txt`` artifact like a failure the worker recorded. A run that is already
    closed is left alone.

    Returns:
        Whether the run was closed here.
    """
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.status not in ("RUNNING", "SCHEDULED"):
        return False
    mlflow_client.set_tag(run_id, Tag.ERROR, reason[:5000])
    mlflow_client.log_text(run_id, f"{reason}\n\n{details}".rstrip() + "\n", ERROR_ARTIFACT)
    mlflow_client.set_terminated(run_id, status="FAILED")
    return True


def log_params_once(mlflow_client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log the run's params in one call; params are immutable, so a re-run keeps the first values."""
    texts = {key: "null" if value is None else str(value) for key, value in params.items()}
    try:
        mlflow_client.log_batch(run_id, params=[Param(key, text) for key, text in texts.items()])
        return
    except MlflowException:  # one of them was logged before with another value
        pass
    for key, text in texts.items():
        try:
            mlflow_client.log_param(run_id, key, text)
        except MlflowException:
            log.info("param %s already logged on the parent run", key)


def log_round(mlflow_client: MlflowClient, parent: str, summary: Mapping[str, Any]) -> None:
    """Round metrics (step = round) and ``rounds/round_NNN.json`` on the study's parent run."""
    step = int(summary["round"])
    metrics = {
        "best_value": summary["best_value"],
        "round_best": summary["round_best"],
        "n_complete": summary["complete"],
        "n_pruned": summary["pruned"],
        "n_failed": summary["failed"],
        "round_complete": summary["round_complete"],
        "round_pruned": summary["round_pruned"],
        "round_failed": summary["round_failed"],
    }
    ts = int(time.time() * 1000)
    mlflow_client.log_batch(
        parent,
        metrics=[Metric(key, float(v), ts, step) for key, v in metrics.items() if v is not None],
    )
    mlflow_client.log_dict(parent, dict(summary), f"rounds/round_{step:03d}.json")


def close_parent_run(
    mlflow_client: MlflowClient,
    parent: str,
    *,
    best_trial: int,
    best_values: Mapping[str, float],
    best_params: Mapping[str, Any],
) -> None:
    """Close a study's parent run as FINISHED with its best trial (metrics ``best.<metric>``, tags)."""
    ts = int(time.time() * 1000)
    mlflow_client.log_batch(
        parent,
        metrics=[Metric(f"best.{k}", float(v), ts, 0) for k, v in best_values.items()],
        tags=[
            RunTag(Tag.BEST_TRIAL, str(best_trial)),
            RunTag(Tag.BEST_PARAMS, json.dumps(dict(best_params), sort_keys=True)),
            RunTag(Tag.OUTCOME, "succeeded"),
        ],
    )
    mlflow_client.set_terminated(parent, status="FINISHED")


def fail_parent_run(mlflow_client: MlflowClient, parent: str, problem: str) -> None:
    """Close a study's parent run as FAILED with the reason (``hpo.outcome``)."""
    mlflow_client.set_tag(parent, Tag.OUTCOME, f"failed: {problem}")
    mlflow_client.set_terminated(parent, status="FAILED")


def trial_run_tags(
    *,
    study_name: str,
    trial_number: int,
    round_number: Any,
    attempt: int,
    parent_run: str | None,
    retry_of: Any = None,
) -> dict[str, str]:
    """Tags of a trial attempt's child run (its name is ``trial N · attempt A``)."""
    run_name = f"trial {trial_number} · attempt {attempt}"
    tags = {
        Tag.STUDY: study_name,
        Tag.TRIAL_NUMBER: str(trial_number),
        Tag.ROUND: str(round_number),
        Tag.ATTEMPT: str(attempt),
        Tag.ROLE: "trial",
        "mlflow.runName": run_name,
    }
    if parent_run:
        tags["mlflow.parentRunId"] = parent_run
    if retry_of is not None:
        tags[Tag.RETRY_OF] = str(retry_of)
    return tags


def start_trial_run(
    mlflow_client: MlflowClient,
    *,
    experiment_id: str | None,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, str],
) -> str:
    """Create a trial's MLflow child run and log its params: two calls, no fluent run."""
    run = mlflow_client.create_run(experiment_id or "0", run_name=run_name, tags=tags)
    run_id = str(run.info.run_id)
    if params:
        mlflow_client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    return run_id


#: MLflow run status of a trial's child run, by the trial's final Optuna state.
_RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}


def finish_trial_run(
    mlflow_client: MlflowClient,
    run_id: str,
    *,
    state: str,
    metrics: Mapping[str, float],
    reason: str | None,
    error_text: str | None,
) -> None:
    """Close a trial's run: metrics (COMPLETE), tags and ``error.txt`` (FAIL), in few calls."""
    now = int(time.time() * 1000)
    tags: list[RunTag] = []
    if state == "FAIL":
        tags.append(RunTag(Tag.ERROR, (reason or "unknown failure")[:5000]))
    elif state == "PRUNED":
        tags.append(RunTag(Tag.PRUNED, reason or "pruned"))
    if metrics or tags:
        mlflow_client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()], tags=tags
        )
    if error_text is not None:
        mlflow_client.log_text(run_id, error_text, ERROR_ARTIFACT)
    mlflow_client.set_terminated(run_id, status=_RUN_STATUS.get(state, "FAILED"))
