"""``finalize``: pick the best trial, register its model with its lineage, apply the promotion rule."""

from __future__ import annotations

import json
import logging
from typing import Any

from hpo_core.deployment import Deployment
from hpo_core.errors import StudyOutcomeError
from hpo_core.keys import StudyAttr
from hpo_core.payloads import FinalizeResult
from hpo_core.storage import flushing
from hpo_core.study import accounting
from hpo_core.study.observe import fail_lost_runs
from hpo_core.study.refit import model_to_register
from hpo_core.study.state import load_run, set_study_attrs
from hpo_core.tracking import plots, promotion, registry, runs
from hpo_core.tracking.lineage import lineage_tags

__all__ = ["finalize_study"]

log = logging.getLogger(__name__)


def finalize_study(*, deployment: Deployment, study_name: str) -> FinalizeResult:
    """Pick the best trial, register its model (alias ``challenger``) and close the parent run.

    Idempotent: a second call finds the version registered by the first.

    Raises:
        StudyOutcomeError: no trial completed, or the failed fraction is above the spec's limit
            (the parent run is closed as FAILED with the reason first).
    """
    with flushing(deployment.storage_url):
        return _finalize(deployment, study_name)


def _finalize(deployment: Deployment, study_name: str) -> FinalizeResult:
    loaded = load_run(deployment, study_name)
    study, spec, attrs, config = loaded.study, loaded.spec, loaded.attrs, loaded.config
    trials = study.get_trials(deepcopy=False)
    closed = accounting.reconcile_trials(study, round_number=spec.budget.max_rounds, trials=trials)
    # Registration and promotion use MLflow's process-wide URIs (mlflow.register_model, models:/).
    mlflow_client = runs.client(deployment, set_uris=bool(spec.mlflow.registered_model))
    if closed:
        trials = study.get_trials(deepcopy=False)
        lost = set(closed)
        fail_lost_runs(mlflow_client, [t for t in trials if t.number in lost])
    ours = accounting.ours(trials, attrs)
    counts = accounting.count(accounting.counted(ours))
    best = accounting.pick_best(study, spec, ours)
    parent = attrs.get(StudyAttr.PARENT_RUN)
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
