"""The model ``finalize`` registers: the best trial's own, or the one the ``refit`` hook fits.

Many objectives log no model (an unchanged Optuna ``objective(trial)`` has no ``ctx``); the common
step after tuning is to fit the best params once more, on all the data. A study's ``refit:
module:function`` hook, ``(params, ctx) -> model``, does that in ``finalize``: its model is logged
in a child run of the study (role ``refit``) and registered with the best trial's lineage.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from typing import Any

import mlflow
import optuna
import skops.io as sio
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from hpo_core.errors import ObjectiveError, StudyOutcomeError
from hpo_core.keys import StudyAttr, Tag, TrialAttr
from hpo_core.objective import RefitContext, log_model, logged_model_of_run
from hpo_core.space import import_callable
from hpo_core.spec import StudySpec
from hpo_core.tracking import runs

__all__ = ["model_to_register"]

log = logging.getLogger(__name__)


def model_to_register(
    mlflow_client: MlflowClient,
    study: optuna.Study,
    spec: StudySpec,
    best: FrozenTrial,
    *,
    attrs: Mapping[str, Any],
    seed: int,
) -> tuple[str, dict[str, str]]:
    """The model URI to register for ``best``, and tags that override its trial's lineage.

    With a ``refit`` hook the model is fitted here once per best trial (a second finalize finds it in
    the study attribute ``hpo.refit``); without one it is the model the best trial logged.

    Raises:
        StudyOutcomeError: no model: the best trial logged none and there is no refit hook.
        ObjectiveError: the refit hook failed or returned nothing (its run is closed FAILED).
    """
    if spec.refit is None:
        model_uri = best.user_attrs.get(TrialAttr.MODEL_URI)
        if not model_uri:
            raise StudyOutcomeError(
                f"study {study.study_name}: best trial {best.number} logged no model; call "
                "ctx.log_model(...) in the objective (an Optuna objective(trial): "
                "mlflow.<flavor>.log_model(model, name='model')), add a 'refit: module:function' hook, "
                "or remove mlflow.registered_model from the study file"
            )
        return str(model_uri), {}
    done = attrs.get(StudyAttr.REFIT)
    if isinstance(done, Mapping) and done.get("trial") == best.number and done.get("model_uri"):
        log.info("refit model of trial %d already logged: %s", best.number, done["model_uri"])
    else:
        done = _refit(mlflow_client, study, spec, best, attrs=attrs, seed=seed)
        study.set_user_attr(StudyAttr.REFIT, done)
    overrides = {Tag.MLFLOW_RUN_ID: str(done["run_id"]), Tag.REFIT: str(spec.refit)}
    for key, value in dict(done.get("lineage") or {}).items():
        overrides[f"{Tag.LINEAGE_PREFIX}{key}"] = str(value)
    return str(done["model_uri"]), overrides


def _refit(
    mlflow_client: MlflowClient,
    study: optuna.Study,
    spec: StudySpec,
    best: FrozenTrial,
    *,
    attrs: Mapping[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Call the refit hook for the best params in a child run of the study; log its model there."""
    assert spec.refit is not None  # checked by the caller
    parent = attrs.get(StudyAttr.PARENT_RUN)
    tags = {
        Tag.STUDY: study.study_name,
        Tag.ROLE: "refit",
        Tag.TRIAL_NUMBER: str(best.number),
        Tag.REFIT: spec.refit,
        **({"mlflow.parentRunId": str(parent)} if parent else {}),
    }
    run_id = runs.start_trial_run(
        mlflow_client,
        experiment_id=attrs.get(StudyAttr.EXPERIMENT),
        run_name=f"refit · trial {best.number}",
        tags=tags,
        params=runs.flat_params(best.params),
    )
    ctx = RefitContext(
        trial=best,
        spec=spec,
        params=best.params,
        seed=seed * 100_003 + best.number,
        round_number=int(best.user_attrs.get(TrialAttr.ROUND) or 0),
        mlflow_run_id=run_id,
        mlflow_client=mlflow_client,
    )
    log.info("refitting the best params of trial %d with %s", best.number, spec.refit)
    try:
        hook = import_callable(spec.refit)
        # The hook may use MLflow's fluent API too (autolog, log_model): its run is the refit run, in
        # the study's experiment whatever this process chose before (as the worker does for trials).
        if attrs.get(StudyAttr.EXPERIMENT) is not None:
            mlflow.set_experiment(experiment_id=str(attrs[StudyAttr.EXPERIMENT]))
        with mlflow.start_run(run_id=run_id, nested=True):
            model = hook(dict(best.params), ctx)
            model_uri = ctx.model_uri or logged_model_of_run(run_id)
            if model_uri is None:
                if model is None:
                    raise ObjectiveError(f"refit hook {spec.refit!r} returned None; return the fitted model")
                model_uri = log_model(model, **_own_model_kwargs(model))
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        runs.finish_trial_run(
            mlflow_client, run_id, state="FAIL", metrics={}, reason=reason, error_text=traceback.format_exc()
        )
        raise ObjectiveError(f"refit hook {spec.refit!r} failed for trial {best.number}: {reason}") from e
    runs.finish_trial_run(mlflow_client, run_id, state="COMPLETE", metrics={}, reason=None, error_text=None)
    return {"trial": best.number, "model_uri": model_uri, "run_id": run_id, "lineage": dict(ctx.lineage)}


def _own_model_kwargs(model: Any) -> dict[str, Any]:
    """For a scikit-learn model the hook just fitted in this process: trust the types it contains.

    MLflow stores scikit-learn models with skops, which loads only the types it is told to trust;
    a model this task built itself is as trusted as its code (a file from elsewhere never is).
    """
    if not type(model).__module__.startswith("sklearn"):
        return {}
    return {"skops_trusted_types": sio.get_untrusted_types(data=sio.dumps(model))}
