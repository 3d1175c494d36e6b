"""``start``: create or load the run's Optuna study, store its settings, open the MLflow parent run."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import optuna

from hpo_core import checks, warmstart
from hpo_core.deployment import Deployment
from hpo_core.errors import StudySpecError
from hpo_core.keys import StudyAttr, Tag
from hpo_core.payloads import StudyHandle
from hpo_core.spec import StudySpec
from hpo_core.storage import flushing, open_storage
from hpo_core.study.config import RunConfig, study_name_for
from hpo_core.study.state import set_study_attrs
from hpo_core.tracking import runs
from hpo_core.tracking.backlinks import parent_run_tags

__all__ = ["start_study"]

log = logging.getLogger(__name__)


def start_study(
    spec: StudySpec,
    *,
    deployment: Deployment,
    dag_id: str,
    run_id: str,
    overrides: Mapping[str, Any] | None = None,
    study_name: str | None = None,
    worker_image: str | None = None,
) -> StudyHandle:
    """Create or load the run's Optuna study and open its MLflow parent run.

    A re-run of the same DAG run reuses both. The run's settings (the spec's budget with the
    trigger's ``overrides``) are stored on the study, where every later task reads them;
    ``worker_image``: the image the worker backend runs the trials in, for the model's lineage.

    Raises:
        StudySpecError: an override is out of bounds, the study exists with other directions, or a
            check of :func:`hpo_core.checks.check_study` fails.
    """
    # What the DAG factory checked at parse time may have changed since (the objective's code).
    checks.check_study(spec, source=dag_id)
    config = RunConfig.resolve(spec, overrides)
    if config.adjusted:
        log.warning("run settings adjusted: %s", config.adjusted)
    name = study_name or study_name_for(spec, run_id)
    deployment.ensure_local_dirs()
    with flushing(deployment.storage_url):
        study, attrs = _create(
            spec,
            deployment=deployment,
            dag_id=dag_id,
            run_id=run_id,
            config=config,
            name=name,
            image=worker_image,
        )
        return _open_tracking(
            study, attrs, spec, deployment=deployment, dag_id=dag_id, run_id=run_id, config=config
        )


def _create(
    spec: StudySpec,
    *,
    deployment: Deployment,
    dag_id: str,
    run_id: str,
    config: RunConfig,
    name: str,
    image: str | None,
) -> tuple[optuna.Study, dict[str, Any]]:
    """Create or load the study and store the run's settings on it; ``(study, its attributes before)``."""
    directions = spec.all_directions
    storage = open_storage(deployment.storage_url)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=directions,  # type: ignore[arg-type]
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != directions:
        raise StudySpecError(
            f"{spec.dag_id}: study {name!r} exists with directions "
            f"{[d.name.lower() for d in study.directions]}, the spec says {directions}"
        )
    attrs = study.user_attrs
    continuous = spec.warm_start.mode == "continue"
    updates: dict[str, Any] = {
        StudyAttr.SPEC: spec.to_json(),
        StudyAttr.RUN_CONFIG: config.to_attr(),
        StudyAttr.DAG_ID: dag_id,
        StudyAttr.RUN_ID: run_id,
    }
    if continuous:
        updates[StudyAttr.CONTINUOUS] = True
    if image:
        updates[StudyAttr.WORKER_IMAGE] = image
    if StudyAttr.STARTED not in attrs or (continuous and attrs.get(StudyAttr.RUN_ID) != run_id):
        # A long-lived study times each DAG run on its own.
        updates[StudyAttr.STARTED] = time.time()
    if attrs.get(StudyAttr.STOP):
        # A cleared and re-run DAG run starts deciding afresh.
        updates[StudyAttr.STOP] = None
    set_study_attrs(study, attrs, updates)
    return study, attrs


def _open_tracking(
    study: optuna.Study,
    attrs: dict[str, Any],
    spec: StudySpec,
    *,
    deployment: Deployment,
    dag_id: str,
    run_id: str,
    config: RunConfig,
) -> StudyHandle:
    """Open the parent run (re-used by a re-run), log the run's params, run the warm start once."""
    name = study.study_name
    continuous = spec.warm_start.mode == "continue"
    mlflow_client = runs.client(deployment, set_uris=False)
    experiment_id = runs.ensure_experiment(mlflow_client, spec.mlflow.experiment, deployment.artifact_root)
    parent = runs.find_or_create_parent_run(
        mlflow_client,
        experiment_id=experiment_id,
        study_name=name,
        run_name=f"{spec.name} · {run_id}",
        tags={
            Tag.DAG_ID: dag_id,
            Tag.RUN_ID: run_id,
            **parent_run_tags(dag_id, run_id, description=spec.description),
        },
        run_id=run_id if continuous else None,
    )
    runs.log_params_once(
        mlflow_client,
        parent,
        {
            "n_trials": config.n_trials,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "sampler": spec.sampler.type,
            "max_rounds": spec.budget.max_rounds,
            **({"adjusted": config.adjusted} if config.adjusted else {}),
            **{f"sampler.{k}": v for k, v in sorted(config.sampler_options.items())},
        },
    )
    set_study_attrs(study, attrs, {StudyAttr.PARENT_RUN: parent, StudyAttr.EXPERIMENT: experiment_id})
    warm_start = attrs.get(StudyAttr.WARM_START)
    if warm_start is None:
        # Only when the study is new: a re-run of the same DAG run must not enqueue again.
        warm_start = warmstart.enqueue_warm_start(
            study,
            spec,
            storage=open_storage(deployment.storage_url),
            dag_id=dag_id,
            mlflow_client=mlflow_client,
        ).to_dict()
        study.set_user_attr(StudyAttr.WARM_START, warm_start)
        if warm_start["enqueued"] or warm_start["skipped"]:
            mlflow_client.log_dict(parent, dict(warm_start), "warm_start.json")
    log.info("study %s ready: %s", name, config.to_attr())
    return StudyHandle(
        study_name=name, parent_run_id=parent, experiment_id=experiment_id, warm_start=warm_start
    )
