"""MLflow model registry: register a trial's model once, with its lineage, and set aliases."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hpo_core.errors import RegistryError, TrackingError
from hpo_core.keys import Tag
from hpo_core.tracking.runs import not_found

__all__ = ["CHALLENGER", "CHAMPION", "PREVIOUS_CHAMPION", "find_version", "register_trial_model"]

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"


def find_version(
    mlflow_client: MlflowClient, *, name: str, study: str, trial_number: str
) -> ModelVersion | None:
    """The version of ``name`` already registered for this study's trial, if any.

    Raises:
        TrackingError: the registry failed to answer (anything but "does not exist"): registering
            now could register the trial's model twice.
    """
    try:
        versions = mlflow_client.search_model_versions(f"name = '{quote(name)}'")
    except MlflowException as e:
        if not_found(e):
            return None
        raise TrackingError(
            f"cannot tell whether trial {trial_number} of study {study} already has a version of model "
            f"{name!r}: the registry answered {e.message!r}; nothing registered, retry once it is back"
        ) from e
    for v in versions:
        if v.tags.get(Tag.STUDY) == study and v.tags.get(Tag.TRIAL_NUMBER) == trial_number:
            return v
    return None


def register_trial_model(
    mlflow_client: MlflowClient, *, name: str, model_uri: str, tags: Mapping[str, str]
) -> str:
    """Register ``model_uri`` as a new version of ``name`` (once) and alias it ``challenger``.

    Returns:
        The version number as a string.

    Raises:
        RegistryError: the registry refused the version or did not make it ready in time.
        TrackingError: the registry could not be asked whether the trial's model is registered.
    """
    existing = find_version(
        mlflow_client, name=name, study=tags[Tag.STUDY], trial_number=tags[Tag.TRIAL_NUMBER]
    )
    if existing is None:
        version = mlflow.register_model(model_uri, name, await_registration_for=0, tags=dict(tags))
        mlflow_client.update_model_version(
            name,
            str(version.version),
            description=f"best trial {tags[Tag.TRIAL_NUMBER]} of study {tags[Tag.STUDY]}",
        )
        _wait_ready(mlflow_client, name, str(version.version))
        number = str(version.version)
        log.info("registered %s version %s from %s", name, number, model_uri)
    else:
        number = str(existing.version)
        log.info("%s version %s already registered for this trial", name, number)
    mlflow_client.set_registered_model_alias(name, CHALLENGER, number)
    return number


def _wait_ready(mlflow_client: MlflowClient, name: str, version: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = mlflow_client.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION":
            raise RegistryError(f"registration of {name} version {version} failed")
        time.sleep(0.5)
    raise RegistryError(f"{name} version {version} not ready after {timeout:.0f}s")


def quote(value: str) -> str:
    """``value`` inside a single-quoted MLflow search filter."""
    return value.replace("'", "\\'")
