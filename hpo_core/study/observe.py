"""``observe``: reconcile a round's trials, log its summary, decide whether the next round runs."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from hpo_core.deployment import Deployment
from hpo_core.errors import TrialStateError
from hpo_core.keys import StudyAttr, Tag, TrialAttr
from hpo_core.payloads import RoundSummary
from hpo_core.spec import StudySpec
from hpo_core.storage import flushing
from hpo_core.storage import trials as stored
from hpo_core.study import accounting
from hpo_core.study.config import RunConfig
from hpo_core.study.state import load_run
from hpo_core.tracking import plots, runs

__all__ = ["RoundNotRun", "fail_lost_runs", "log_missing_runs", "log_unlogged_rounds", "observe_round"]

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
    # Tracking is not the source of truth: with MLflow down the round goes on, and what it missed
    # is logged by a later observe or by finalize.
    with flushing(deployment.storage_url), runs.bounded_http_retries():
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
    trials = stored.read_trials(study)
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
        trials = stored.read_trials(study)
    ours = accounting.ours(trials, attrs)
    # Made on first use: an observe that changes nothing and logs nothing never makes one.
    mlflow_client = functools.cache(lambda: runs.client(deployment, set_uris=False))
    logged = dict(attrs.get(StudyAttr.RUNS_LOGGED_LATE) or {})
    # Runs of trials closed without their worker (here, or by a stale sweep) are still RUNNING.
    lost = [
        t
        for t in ours
        if t.user_attrs.get(TrialAttr.ROUND) == round_number
        and t.state == TrialState.FAIL
        and t.user_attrs.get(TrialAttr.MLFLOW_RUN)
    ]
    try:
        if lost:
            fail_lost_runs(mlflow_client(), lost)
        log_missing_runs(mlflow_client, study, ours, attrs, logged)
    except runs.TRACKING_ERRORS as e:
        log.warning(
            "MLflow unavailable: trial runs not logged yet (%s); a later observe or finalize will", _brief(e)
        )
    counted = accounting.counted(ours)
    summary = _summary(spec, config, attrs, counted, round_number=round_number, closed=closed)
    summary["tracking_missing"] = [n for n in _missing_runs(ours, logged) if n in summary["trials"]]
    for number in summary["tracking_missing"]:
        log.warning("trial %d: its MLflow run is missing for now (MLflow was unavailable)", number)
    prefix = accounting.round_summary_prefix(attrs)
    already = attrs.get(f"{prefix}{round_number}")
    unlogged = sorted(int(k) for k in attrs.get(StudyAttr.ROUNDS_UNLOGGED) or [])
    if already is not None and _same_summary(already, summary):
        # observe ran again (cleared or retried) and nothing changed: log and store nothing twice.
        summary["reconciled"] = already.get("reconciled", [])
        log.info("round %d summary unchanged since the last observe", round_number)
    else:
        study.set_user_attr(f"{prefix}{round_number}", summary)
        unlogged = sorted({*unlogged, round_number})
    parent = attrs.get(StudyAttr.PARENT_RUN)
    if parent and unlogged:
        summaries = {**{k: attrs.get(f"{prefix}{k}") for k in unlogged}, round_number: summary}
        try:
            log_unlogged_rounds(mlflow_client(), study, parent, unlogged, summaries)
            if round_number in unlogged:
                plots.log_history_plot(mlflow_client(), parent, spec, attrs, trials)
        except runs.TRACKING_ERRORS as e:
            log.warning(
                "MLflow unavailable: round %d summary not logged to the parent run yet (%s)",
                round_number,
                _brief(e),
            )
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
        tracking_missing=[],
    )


def fail_lost_runs(mlflow_client: MlflowClient, failed: list[FrozenTrial]) -> None:
    """Close the MLflow child runs that failed trials' lost workers left RUNNING, with the reason."""
    for t in failed:
        run_id = t.user_attrs.get(TrialAttr.MLFLOW_RUN)
        if not run_id:
            continue
        reason = str(t.user_attrs.get(TrialAttr.FAIL_REASON, "worker lost"))
        runs.fail_trial_run(mlflow_client, run_id, reason=reason, details=f"trial {t.number}: {reason}")


def _brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def _missing_runs(trials: list[FrozenTrial], logged: Mapping[str, Any]) -> list[int]:
    """Finished trials whose MLflow run MLflow missed and nobody logged since."""
    return [
        t.number
        for t in trials
        if t.state.is_finished()
        and t.user_attrs.get(TrialAttr.TRACKING_MISSING)
        and str(t.number) not in logged
    ]


def log_missing_runs(
    mlflow_client: Callable[[], MlflowClient],
    study: optuna.Study,
    trials: list[FrozenTrial],
    attrs: Mapping[str, Any],
    logged: dict[str, Any],
) -> list[int]:
    """Log the child runs that MLflow missed while their trials ran (``hpo.tracking_missing``).

    A run that was never created is created from the trial's record in the storage (params,
    metrics, state, reason; tag ``hpo.logged_late``); a run left open is closed with the trial's
    state. Each one done is recorded in ``logged`` and in the study's ``hpo.runs_logged_late``
    at once, so an outage halfway keeps what was done.

    Returns:
        The trial numbers logged now.

    Raises:
        The MLflow client's errors (:data:`hpo_core.tracking.runs.TRACKING_ERRORS`).
    """
    done = []
    for number in _missing_runs(trials, logged):
        trial = next(t for t in trials if t.number == number)
        logged[str(number)] = _log_trial_run(mlflow_client(), study.study_name, attrs, trial)
        study.set_user_attr(StudyAttr.RUNS_LOGGED_LATE, logged)
        log.info("trial %d: MLflow run %s logged after the trial finished", number, logged[str(number)])
        done.append(number)
    return done


def _log_trial_run(
    mlflow_client: MlflowClient, study_name: str, attrs: Mapping[str, Any], trial: FrozenTrial
) -> str:
    missing = str(trial.user_attrs.get(TrialAttr.TRACKING_MISSING))
    run_id = trial.user_attrs.get(TrialAttr.MLFLOW_RUN)
    status = None
    if run_id:
        try:
            status = mlflow_client.get_run(run_id).info.status
        except MlflowException as e:
            if not runs.not_found(e):
                raise
            run_id = None
    if not run_id:
        worker = trial.user_attrs.get(TrialAttr.WORKER) or {}
        tags = runs.trial_run_tags(
            study_name=study_name,
            trial_number=trial.number,
            round_number=trial.user_attrs.get(TrialAttr.ROUND),
            attempt=int(worker.get("attempt") or 1),
            parent_run=attrs.get(StudyAttr.PARENT_RUN),
            retry_of=trial.user_attrs.get(TrialAttr.RETRY_OF),
        )
        tags[Tag.LOGGED_LATE] = missing[:5000]
        run_id = runs.start_trial_run(
            mlflow_client,
            experiment_id=attrs.get(StudyAttr.EXPERIMENT),
            run_name=tags["mlflow.runName"],
            tags=tags,
            params=runs.flat_params(trial.params),
        )
        status = "RUNNING"
    if status in ("RUNNING", "SCHEDULED"):
        reason = trial.user_attrs.get(TrialAttr.FAIL_REASON)
        complete = trial.state == TrialState.COMPLETE
        runs.finish_trial_run(
            mlflow_client,
            run_id,
            state=trial.state.name,
            metrics=dict(trial.user_attrs.get(TrialAttr.METRICS) or {}) if complete else {},
            reason=reason,
            error_text=f"trial {trial.number} failed: {reason}\n" if trial.state == TrialState.FAIL else None,
        )
        mlflow_client.set_tag(run_id, Tag.LOGGED_LATE, missing[:5000])
    return str(run_id)


def log_unlogged_rounds(
    mlflow_client: MlflowClient,
    study: optuna.Study,
    parent: str,
    rounds: list[int],
    summaries: Mapping[int, Any],
) -> None:
    """Log round summaries that MLflow missed to the parent run, in order; ``hpo.rounds_unlogged``
    keeps the ones still missing when MLflow fails halfway (the error is raised)."""
    for index, number in enumerate(rounds):
        try:
            if summaries.get(number) is not None:
                runs.log_round(mlflow_client, parent, summaries[number])
        except runs.TRACKING_ERRORS:
            study.set_user_attr(StudyAttr.ROUNDS_UNLOGGED, rounds[index:])
            raise
    if study.user_attrs.get(StudyAttr.ROUNDS_UNLOGGED):
        study.set_user_attr(StudyAttr.ROUNDS_UNLOGGED, [])


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
