"""Trial accounting: which trials belong to the run, what counts toward the budget, which is best,
and closing trials that their worker left RUNNING."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.spec import StudySpec
from hpo_core.storage import trials as stored

__all__ = [
    "StudyCounts",
    "best_value",
    "count",
    "count_trials",
    "counted",
    "deadline",
    "ours",
    "pareto_front",
    "pick_best",
    "reconcile_trials",
    "round_summary_prefix",
    "score_index",
    "trials_of_round",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyCounts:
    """Trials that count toward the budget, by state (replacements count, the trials they replace do not)."""

    counted: int
    complete: int
    pruned: int
    failed: int
    running: int

    @property
    def finished(self) -> int:
        """Trials in a final state."""
        return self.complete + self.pruned + self.failed

    @property
    def failed_fraction(self) -> float:
        """Share of finished trials that failed."""
        return self.failed / self.finished if self.finished else 0.0


def _scope(attrs: Mapping[str, Any]) -> str | None:
    """The DAG run whose trials count, for a long-lived study; ``None``: every trial counts."""
    return str(attrs.get(StudyAttr.RUN_ID)) if attrs.get(StudyAttr.CONTINUOUS) else None


def ours(trials: list[FrozenTrial], attrs: Mapping[str, Any]) -> list[FrozenTrial]:
    """The suggested trials of the study's current DAG run (``attrs``: the study's attributes)."""
    run_scope = _scope(attrs)
    return [
        t
        for t in trials
        if TrialAttr.ROUND in t.user_attrs
        and not t.user_attrs.get(TrialAttr.DISCARDED)
        and (run_scope is None or t.user_attrs.get(TrialAttr.RUN_ID) == run_scope)
    ]


def round_summary_prefix(attrs: Mapping[str, Any]) -> str:
    """Attribute prefix of the round summaries (per DAG run in a long-lived study)."""
    run_scope = _scope(attrs)
    return (
        StudyAttr.ROUND_SUMMARY_PREFIX
        if run_scope is None
        else f"{StudyAttr.ROUND_SUMMARY_PREFIX}{run_scope}."
    )


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count: a failed trial that was replaced (``hpo.retry_of``) does not."""
    superseded = {t.user_attrs[TrialAttr.RETRY_OF] for t in trials if TrialAttr.RETRY_OF in t.user_attrs}
    return [t for t in trials if t.number not in superseded]


def count(trials: list[FrozenTrial]) -> StudyCounts:
    """Count already-``counted`` trials by state."""
    by_state = {s: sum(1 for t in trials if t.state == s) for s in TrialState}
    return StudyCounts(
        counted=len(trials),
        complete=by_state[TrialState.COMPLETE],
        pruned=by_state[TrialState.PRUNED],
        failed=by_state[TrialState.FAIL],
        running=by_state[TrialState.RUNNING] + by_state[TrialState.WAITING],
    )


def count_trials(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> StudyCounts:
    """Count the trials that make up the study's budget (``trials``: as just read, else read here)."""
    if trials is None:
        trials = stored.read_trials(study, user_attrs=_COUNTING)
    return count(counted(ours(trials, study.user_attrs)))


def trials_of_round(study: optuna.Study, round_number: int) -> list[FrozenTrial]:
    """The trials suggested for round ``round_number`` of the study's current DAG run."""
    return [
        t
        for t in ours(stored.read_trials(study), study.user_attrs)
        if t.user_attrs.get(TrialAttr.ROUND) == round_number
    ]


def score_index(spec: StudySpec) -> int:
    """Index of the objective value that ranks trials (``pareto_choice.metric`` with several)."""
    return spec.objective_metrics.index(spec.score_metric)


def best_value(trials: list[FrozenTrial], index: int, direction: str) -> float | None:
    """The best ``index``-th value of the completed ``trials`` in ``direction``."""
    values = [t.values[index] for t in trials if t.state == TrialState.COMPLETE and t.values]
    if not values:
        return None
    return max(values) if direction == "maximize" else min(values)


def pick_best(
    study: optuna.Study, spec: StudySpec, trials: list[FrozenTrial] | None = None
) -> FrozenTrial | None:
    """The best completed trial of the run; with several objectives, the Pareto trial the spec's rule picks.

    ``trials``: the run's trials as just read (:func:`ours`); read here when not given.
    """
    if trials is None:
        trials = ours(stored.read_trials(study), study.user_attrs)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    if not spec.is_multi_objective:
        sign = 1.0 if spec.direction == "minimize" else -1.0
        return min(complete, key=lambda t: sign * float(t.values[0]))
    front = pareto_front(complete, spec.all_directions)
    choice = spec.pareto_choice
    assert choice is not None  # validated for multi-objective specs
    metrics = spec.objective_metrics
    if choice.weights:
        weights = choice.weights
        signs = [1.0 if d == "maximize" else -1.0 for d in spec.all_directions]

        def score(t: FrozenTrial) -> float:
            return sum(weights.get(m, 0.0) * s * v for m, s, v in zip(metrics, signs, t.values, strict=True))

        return max(front, key=score)
    idx = metrics.index(choice.metric)
    sign = 1.0 if spec.all_directions[idx] == "maximize" else -1.0
    return max(front, key=lambda t: sign * t.values[idx])


def pareto_front(trials: list[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    """The complete ``trials`` no other of them dominates (every value as good, one better)."""
    if not trials:
        return []
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    points = np.array([t.values for t in trials], dtype=float) * signs  # all minimised
    dominated = np.zeros(len(points), dtype=bool)
    for start in range(0, len(points), _PARETO_CHUNK):
        block = points[start : start + _PARETO_CHUNK]
        no_worse = (points[None, :, :] <= block[:, None, :]).all(axis=2)
        better = (points[None, :, :] < block[:, None, :]).any(axis=2)
        dominated[start : start + _PARETO_CHUNK] = (no_worse & better).any(axis=1)
    return [t for t, d in zip(trials, dominated, strict=True) if not d]


#: Rows of the dominance matrix computed at once (memory: chunk x trials x objectives booleans).
_PARETO_CHUNK = 256
#: User attributes that counting the budget reads.
_COUNTING = (TrialAttr.ROUND, TrialAttr.RUN_ID, TrialAttr.RETRY_OF, TrialAttr.DISCARDED)


def deadline(attrs: Mapping[str, Any], spec: StudySpec) -> str | None:
    """Why no new round should start because the study timeout is near, if it is."""
    if spec.budget.timeout is None:
        return None
    started = float(attrs.get(StudyAttr.STARTED, time.time()))
    elapsed = time.time() - started
    # A new round is worth starting only if one trial's time still fits.
    left = spec.budget.timeout - elapsed
    if left < min(spec.trial.execution_timeout, spec.budget.timeout) * 0.5 or left <= 0:
        return f"study timeout near: {elapsed:.0f}s of {spec.budget.timeout}s used"
    return None


def reconcile_trials(
    study: optuna.Study,
    *,
    round_number: int | None,
    task_states: Mapping[int, str] | None = None,
    stale_after: float | None = None,
    trials: list[FrozenTrial] | None = None,
) -> list[int]:
    """Close trials left RUNNING by a worker that is gone, as FAIL with the reason.

    ``round_number`` given: every RUNNING trial of that round and earlier (their tasks have
    ended, so nothing will report them). ``stale_after`` given: also RUNNING trials of any
    round whose last sign of life is older than that many seconds. ``trials``: the study's trials
    as just read (else they are read here).
    """
    now = time.time()
    if trials is None:
        trials = stored.read_trials(study)
    reasons: dict[int, str] = {}
    numbers: dict[int, int] = {}
    for t in trials:
        if t.state not in (TrialState.RUNNING, TrialState.WAITING):
            continue
        trial_round = t.user_attrs.get(TrialAttr.ROUND)
        if trial_round is None:
            continue
        reason = None
        if round_number is not None and trial_round <= round_number:
            map_index = t.user_attrs.get(TrialAttr.MAP_INDEX)
            state = (task_states or {}).get(map_index) if map_index is not None else None
            reason = (
                f"worker ended without reporting a result (Airflow task state: {state})"
                if state
                else "worker ended without reporting a result (task failed, timed out or was killed)"
            )
        elif stale_after is not None:
            last = float(t.user_attrs.get(TrialAttr.HEARTBEAT, 0) or 0) or (
                t.datetime_start.timestamp() if t.datetime_start else now
            )
            if now - last > stale_after:
                reason = f"stale: no sign of life from its worker for {now - last:.0f}s"
        if reason is not None:
            reasons[stored.trial_id(t)] = reason
            numbers[stored.trial_id(t)] = t.number
    closed_ids = stored.fail_trials(study, reasons)
    for tid in set(reasons) - set(closed_ids):  # finished meanwhile by a late worker
        log.info("trial %d changed state while reconciling: kept its result", numbers[tid])
    for tid in closed_ids:
        log.warning("trial %d closed as FAIL: %s", numbers[tid], reasons[tid])
    return sorted(numbers[tid] for tid in closed_ids)
