"""MLflow model registry: register a trial's model once, with its lineage, and set aliases."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["CHALLENGER", "CHAMPION", "PREVIOUS_CHAMPION", "find_version", "register_trial_model"]

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"


def find_version(mlflow_client: Any, *, name: str, study: str, trial_number: str) -> Any | None:
    """The version of ``name`` already registered for this study's trial, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = mlflow_client.search_model_versions(f"name = '{_quote(name)}'")
    except MlflowException:
        return None
    for v in versions:
        if v.tags.get("hpo.study") == study and v.tags.get("hpo.trial_number") == trial_number:
            return v
    return None


def register_trial_model(mlflow_client: Any, *, name: str, model_uri: str, tags: Mapping[str, str]) -> str:
    """Register ``model_uri`` as a new version of ``name`` (once) and alias it ``challenger``.

    Returns:
        The version number as a string.
    """
    existing = find_version(
        mlflow_client, name=name, study=tags["hpo.study"], trial_number=tags["hpo.trial_number"]
    )
    if existing is None:
        import mlflow

        version = mlflow.register_model(model_uri, name, await_registration_for=0, tags=dict(tags))
        mlflow_client.update_model_version(
            name,
            str(version.version),
            description=f"best trial {tags['hpo.trial_number']} of study {tags['hpo.study']}",
        )
        _wait_ready(mlflow_client, name, str(version.version))
        number = str(version.version)
        log.info("registered %s version %s from %s", name, number, model_uri)
    else:
        number = str(existing.version)
        log.info("%s version %s already registered for this trial", name, number)
    mlflow_client.set_registered_model_alias(name, CHALLENGER, number)
    return number


def _wait_ready(mlflow_client: Any, name: str, version: str, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = mlflow_client.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION":
            raise RuntimeError(f"registration of {name} version {version} failed")
        time.sleep(0.5)
    raise TimeoutError(f"{name} version {version} not ready after {timeout:.0f}s")


def _quote(value: str) -> str:
    return value.replace("'", "\\'")
