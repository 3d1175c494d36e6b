"""``observe``: reconcile a round's trials, log its summary, decide whether the next round runs."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from typing import Any

from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from hpo_core.deployment import Deployment
from hpo_core.errors import TrialStateError
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.payloads import RoundSummary
from hpo_core.spec import StudySpec
from hpo_core.storage import flushing
from hpo_core.study import accounting
from hpo_core.study.config import RunConfig
from hpo_core.study.state import load_run
from hpo_core.tracking import plots, runs

__all__ = ["RoundNotRun", "fail_lost_runs", "observe_round"]

log = logging.getLogger(__name__)


class RoundNotRun(TrialStateError):
    """The round has no trials (its ``suggest`` skipped it), so there is nothing to observe."""


def observe_round(
    *,
    deployment: Deployment,
    study_name: str,
    round_number: int,
    task_states: Mapping[int, str] | None = None,
    require_trials: bool = False,
) -> RoundSummary:
    """Reconcile the round, log its summary to the parent run, and decide whether to go on.

    Reads the study once. ``task_states``: the Airflow state of each slot task, by map index (the
    reason a trial left RUNNING is closed with). ``require_trials``: raise :class:`RoundNotRun`, and
    change nothing, when the round has no trials.
    """
    with flushing(deployment.storage_url):
        return _observe(deployment, study_name, round_number, task_states, require_trials=require_trials)


def _observe(
    deployment: Deployment,
    study_name: str,
    round_number: int,
    task_states: Mapping[int, str] | None,
    *,
    require_trials: bool,
) -> RoundSummary:
    loaded = load_run(deployment, study_name, round_number=round_number)
    study, spec, attrs, config = loaded.study, loaded.spec, loaded.attrs, loaded.config
    trials = study.get_trials(deepcopy=False)
    in_round = [
        t for t in accounting.ours(trials, attrs) if t.user_attrs.get(TrialAttr.ROUND) == round_number
    ]
    if require_trials and not in_round:
        raise RoundNotRun(f"round {round_number} did not run")
    closed = accounting.reconcile_trials(
        study,
        round_number=round_number,
        task_states=task_states,
        stale_after=spec.trial.stale_timeout,
        trials=trials,
    )
    if closed:
        trials = study.get_trials(deepcopy=False)
    ours = accounting.ours(trials, attrs)
    # Made on first use: an observe that changes nothing and logs nothing never makes one.
    mlflow_client = functools.cache(lambda: runs.client(deployment, set_uris=False))
    # Runs of trials closed without their worker (here, or by a stale sweep) are still RUNNING.
    lost = [
        t
        for t in ours
        if t.user_attrs.get(TrialAttr.ROUND) == round_number
        and t.state == TrialState.FAIL
        and t.user_attrs.get(TrialAttr.MLFLOW_RUN)
    ]
    if lost:
        fail_lost_runs(mlflow_client(), lost)
    counted = accounting.counted(ours)
    summary = _summary(spec, config, attrs, counted, round_number=round_number, closed=closed)
    prefix = accounting.round_summary_prefix(attrs)
    already = attrs.get(f"{prefix}{round_number}")
    if already is not None and _same_summary(already, summary):
        # observe ran again (cleared or retried) and nothing changed: log and store nothing twice.
        summary["reconciled"] = already.get("reconciled", [])
        log.info("round %d summary unchanged since the last observe", round_number)
    else:
        study.set_user_attr(f"{prefix}{round_number}", summary)
        parent = attrs.get(StudyAttr.PARENT_RUN)
        if parent:
            runs.log_round(mlflow_client(), parent, summary)
            plots.log_history_plot(mlflow_client(), parent, spec, attrs, trials)
    if summary["stop_reason"] and attrs.get(StudyAttr.STOP) != summary["stop_reason"]:
        study.set_user_attr(StudyAttr.STOP, summary["stop_reason"])
    log.info("round %d summary: %s", round_number, json.dumps(summary, default=str))
    return summary


def _summary(
    spec: StudySpec,
    config: RunConfig,
    attrs: Mapping[str, Any],
    counted: list[FrozenTrial],
    *,
    round_number: int,
    closed: list[int],
) -> RoundSummary:
    round_trials = [t for t in counted if t.user_attrs.get(TrialAttr.ROUND) == round_number]
    counts = accounting.count(counted)
    # Ranked by the chosen metric (pareto_choice.metric with several objectives), in its direction.
    index = accounting.score_index(spec)
    direction = spec.all_directions[index]
    best = accounting.best_value(counted, index, direction)
    prefix = accounting.round_summary_prefix(attrs)
    previous = [attrs[f"{prefix}{k}"] for k in range(1, round_number) if f"{prefix}{k}" in attrs]
    stop = _stop_reason(spec, config, counts, best, previous, round_number) or accounting.deadline(
        attrs, spec
    )
    return RoundSummary(
        round=round_number,
        trials=[t.number for t in round_trials],
        round_complete=sum(t.state == TrialState.COMPLETE for t in round_trials),
        round_pruned=sum(t.state == TrialState.PRUNED for t in round_trials),
        round_failed=sum(t.state == TrialState.FAIL for t in round_trials),
        round_best=accounting.best_value(round_trials, index, direction),
        best_value=best,
        complete=counts.complete,
        pruned=counts.pruned,
        failed=counts.failed,
        counted=counts.counted,
        n_trials=config.n_trials,
        reconciled=closed,
        failures={
            t.number: t.user_attrs.get(TrialAttr.FAIL_REASON, "unknown")
            for t in round_trials
            if t.state == TrialState.FAIL
        },
        stop_reason=stop,
    )


def fail_lost_runs(mlflow_client: MlflowClient, failed: list[FrozenTrial]) -> None:
    """Close the MLflow child runs that failed trials' lost workers left RUNNING, with the reason."""
    for t in failed:
        run_id = t.user_attrs.get(TrialAttr.MLFLOW_RUN)
        if not run_id:
            continue
        reason = str(t.user_attrs.get(TrialAttr.FAIL_REASON, "worker lost"))
        runs.fail_trial_run(mlflow_client, run_id, reason=reason, details=f"trial {t.number}: {reason}")


def _same_summary(stored: Mapping[str, Any], summary: Mapping[str, Any]) -> bool:
    """Whether a stored round summary says the same as a new one (``reconciled`` aside)."""

    def norm(value: Mapping[str, Any]) -> str:
        data = json.loads(json.dumps(dict(value), default=str))
        data.pop("reconciled", None)
        return json.dumps(data, sort_keys=True)

    return norm(stored) == norm(summary)


def _stop_reason(
    spec: StudySpec,
    config: RunConfig,
    counts: accounting.StudyCounts,
    best: float | None,
    previous: list[dict[str, Any]],
    round_number: int,
) -> str | None:
    if counts.counted >= config.n_trials:
        return f"budget spent: {counts.counted} of {config.n_trials} trials"
    direction = spec.all_directions[accounting.score_index(spec)]
    target = spec.stopping.target
    if (target is not None and best is not None) and (
        (direction == "maximize" and best >= target) or (direction == "minimize" and best <= target)
    ):
        return f"target reached: best {best:.6g} vs target {target:.6g}"
    patience = spec.stopping.patience
    if patience is not None and round_number > patience:
        history = [p.get("best_value") for p in previous] + [best]
        before = history[-patience - 1]
        if before is not None and best is not None:
            gain = best - before if direction == "maximize" else before - best
            if gain <= spec.stopping.min_improvement:
                return f"no improvement for {patience} rounds (best {best:.6g})"
    if round_number >= spec.budget.max_rounds:
        return f"last round ({spec.budget.max_rounds}) done"
    return None
