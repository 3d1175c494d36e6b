"""``finalize``: pick the best trial, register its model with its lineage, apply the promotion rule."""

from __future__ import annotations

import json
import logging
from typing import Any

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from hpo_core.deployment import Deployment
from hpo_core.errors import StudyOutcomeError, TrialStateError
from hpo_core.keys import StudyAttr
from hpo_core.payloads import FinalizeResult
from hpo_core.storage import flushing
from hpo_core.storage import trials as stored
from hpo_core.study import accounting
from hpo_core.study.observe import fail_lost_runs, log_missing_runs, log_unlogged_rounds
from hpo_core.study.refit import model_to_register
from hpo_core.study.state import load_run, set_study_attrs
from hpo_core.tracking import plots, promotion, registry, runs
from hpo_core.tracking.lineage import lineage_tags

__all__ = ["close_unfinalized_run", "finalize_study"]

log = logging.getLogger(__name__)


def finalize_study(*, deployment: Deployment, study_name: str) -> FinalizeResult:
    """Pick the best trial, register its model (alias ``challenger``) and close the parent run.

    Idempotent: a second call finds the version registered by the first.

    Raises:
        StudyOutcomeError: no trial completed, or the failed fraction is above the spec's limit
            (the parent run is closed as FAILED with the reason first).
        TrackingError: MLflow (tracking server or registry) failed; nothing was promoted on the
            error, and a retry once it is back finishes the job.
    """
    with flushing(deployment.storage_url), runs.tracking_call(f"finalize study {study_name}"):
        return _finalize(deployment, study_name)


def _finalize(deployment: Deployment, study_name: str) -> FinalizeResult:
    loaded = load_run(deployment, study_name)
    study, spec, attrs, config = loaded.study, loaded.spec, loaded.attrs, loaded.config
    trials = stored.read_trials(study)
    closed = accounting.reconcile_trials(study, round_number=spec.budget.max_rounds, trials=trials)
    # Registration and promotion use MLflow's process-wide URIs (mlflow.register_model, models:/).
    mlflow_client = runs.client(deployment, set_uris=bool(spec.mlflow.registered_model))
    if closed:
        trials = stored.read_trials(study)
        lost = set(closed)
        fail_lost_runs(mlflow_client, [t for t in trials if t.number in lost])
    ours = accounting.ours(trials, attrs)
    counts = accounting.count(accounting.counted(ours))
    best = accounting.pick_best(study, spec, ours)
    parent = attrs.get(StudyAttr.PARENT_RUN)
    _log_what_mlflow_missed(mlflow_client, study, ours, attrs)
    problem = None
    if best is None:
        problem = f"no trial completed ({counts.failed} failed, {counts.pruned} pruned of {counts.counted})"
    elif counts.failed_fraction > spec.stopping.max_failed_fraction:
        problem = (
            f"{counts.failed} of {counts.finished} trials failed ({counts.failed_fraction:.0%}), "
            f"above stopping.max_failed_fraction={spec.stopping.max_failed_fraction:.0%}"
        )
    if problem is not None or best is None:
        set_study_attrs(study, attrs, {StudyAttr.OUTCOME: f"failed: {problem}"})
        if parent:
            runs.fail_parent_run(mlflow_client, parent, str(problem))
        raise StudyOutcomeError(f"study {study_name}: {problem}")
    index = accounting.score_index(spec)
    result = FinalizeResult(
        study_name=study_name,
        best_trial=best.number,
        best_values=dict(zip(spec.objective_metrics, best.values, strict=True)),
        best_metric=spec.score_metric,
        best_value=best.values[index],
        best_params=dict(best.params),
        complete=counts.complete,
        pruned=counts.pruned,
        failed=counts.failed,
        parent_run_id=parent,
        model_version=None,
    )
    if spec.mlflow.registered_model:
        # The best trial's model, or the one the study's refit hook fits for its params.
        model_uri, refit_tags = model_to_register(
            mlflow_client, study, spec, best, attrs=attrs, seed=config.seed or 0
        )
        version = registry.register_trial_model(
            mlflow_client,
            name=spec.mlflow.registered_model,
            model_uri=model_uri,
            tags={**lineage_tags(study_name, spec, best, attrs=attrs), **refit_tags},
        )
        result["model_version"] = version
        result["model_name"] = spec.mlflow.registered_model
        result["alias"] = registry.CHALLENGER
        decision = promotion.apply_rule(mlflow_client, spec, version=version, seed=config.seed or 0)
        result["promotion"] = decision.to_dict()
    # What the HPO view and `hpo status` show without asking MLflow.
    outcome: dict[str, Any] = {StudyAttr.OUTCOME: "succeeded"}
    if result["model_version"] is not None:
        outcome[StudyAttr.REGISTERED_MODEL] = {
            "name": str(spec.mlflow.registered_model),
            "version": str(result["model_version"]),
        }
    set_study_attrs(study, attrs, outcome)
    if parent:
        plots.log_final_plots(mlflow_client, parent, spec, attrs, trials)
        runs.close_parent_run(
            mlflow_client,
            parent,
            best_trial=best.number,
            best_values=result["best_values"],
            best_params=best.params,
        )
    log.info("study %s finalized: %s", study_name, json.dumps(result, default=str))
    return result


def _log_what_mlflow_missed(
    mlflow_client: MlflowClient, study: optuna.Study, trials: list[FrozenTrial], attrs: dict[str, Any]
) -> None:
    """Trial runs and round summaries MLflow missed during the run: logged now, or finalize fails
    (the study's runs are complete before its parent run closes)."""
    log_missing_runs(
        lambda: mlflow_client, study, trials, attrs, dict(attrs.get(StudyAttr.RUNS_LOGGED_LATE) or {})
    )
    parent = attrs.get(StudyAttr.PARENT_RUN)
    rounds = sorted(int(k) for k in attrs.get(StudyAttr.ROUNDS_UNLOGGED) or [])
    if parent and rounds:
        prefix = accounting.round_summary_prefix(attrs)
        summaries = {k: attrs.get(f"{prefix}{k}") for k in rounds}
        log_unlogged_rounds(mlflow_client, study, parent, rounds, summaries)


def close_unfinalized_run(*, deployment: Deployment, study_name: str, run_id: str, reason: str) -> bool:
    """Close the study's MLflow parent run as FAILED with ``reason``: its DAG run failed without
    ``finalize`` closing it (``dagrun_timeout``, a run marked failed), so it would stay RUNNING.

    A parent run that ``finalize`` already closed, or that belongs to another DAG run of a
    long-lived study, is left alone; so is a study its ``start`` task never created.

    Returns:
        Whether a parent run was closed here.

    Raises:
        TrackingError: MLflow failed.
    """
    try:
        loaded = load_run(deployment, study_name)
    except TrialStateError:
        log.info("study %s was never started: no MLflow run to close", study_name)
        return False
    attrs = loaded.attrs
    parent = attrs.get(StudyAttr.PARENT_RUN)
    if not parent or str(attrs.get(StudyAttr.RUN_ID)) != run_id:
        return False
    with runs.tracking_call(f"close the MLflow run of study {study_name}"):
        mlflow_client = runs.client(deployment, set_uris=False)
        if mlflow_client.get_run(parent).info.status != "RUNNING":
            return False
        runs.fail_parent_run(mlflow_client, parent, reason)
    log.warning("study %s: MLflow parent run %s closed as FAILED: %s", study_name, parent, reason)
    return True
