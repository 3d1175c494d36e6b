"""``suggest``: ask the sampler for a round's batch, params materialised at once, split into slots."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState

from hpo_core.deployment import Deployment
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.payloads import SlotPayload, TrialEntry
from hpo_core.space import sample_params, space_size
from hpo_core.spec import StudySpec
from hpo_core.storage import flushing
from hpo_core.storage import trials as stored
from hpo_core.study import accounting
from hpo_core.study.config import slot_of
from hpo_core.study.state import load_run

__all__ = ["batch_slots", "slot_label", "suggest_batch", "trial_label"]

log = logging.getLogger(__name__)

#: Draws of one batch position before a duplicate of the batch is kept (the space is exhausted).
_MAX_DUPLICATE_DRAWS = 20


def suggest_batch(
    *,
    deployment: Deployment,
    study_name: str,
    round_number: int,
    dag_id: str | None = None,
    run_id: str | None = None,
) -> tuple[list[TrialEntry], str | None]:
    """Ask the sampler for this round's batch, params materialised at once.

    Idempotent: if the round already has trials (the task was retried or cleared), the same
    batch is returned instead of asking again.

    Returns:
        ``(batch, skip_reason)``: the batch and, when it is empty, why the round is not needed.
    """
    with flushing(deployment.storage_url):
        return _suggest(deployment, study_name, round_number, dag_id=dag_id, run_id=run_id)


def _suggest(
    deployment: Deployment, study_name: str, round_number: int, *, dag_id: str | None, run_id: str | None
) -> tuple[list[TrialEntry], str | None]:
    loaded = load_run(deployment, study_name, round_number=round_number)
    study, spec, attrs, config = loaded.study, loaded.spec, loaded.attrs, loaded.config
    trials = study.get_trials(deepcopy=False)
    if spec.trial.stale_timeout and accounting.reconcile_trials(
        # Trials whose worker went silent (a run stopped by its timeout, a lost pod) stop counting
        # as running; their own round's observe would not come back for them.
        study,
        round_number=None,
        stale_after=spec.trial.stale_timeout,
        trials=trials,
    ):
        trials = study.get_trials(deepcopy=False)
    if run_id is None:
        run_id = attrs.get(StudyAttr.RUN_ID)
    ours = accounting.ours(trials, attrs)
    existing = sorted(
        (
            t
            for t in ours
            if t.user_attrs.get(TrialAttr.ROUND) == round_number and TrialAttr.RETRY_OF not in t.user_attrs
        ),
        key=lambda t: t.user_attrs.get(TrialAttr.BATCH_INDEX, 0),
    )
    if existing:
        log.info("round %d already suggested: trials %s", round_number, [t.number for t in existing])
        return [
            _entry(t.number, t.params, round_number, spec, int(t.user_attrs.get(TrialAttr.MAP_INDEX, i)))
            for i, t in enumerate(existing)
        ], None
    stop = attrs.get(StudyAttr.STOP)
    if stop:
        return [], f"study stopped before round {round_number}: {stop}"
    counts = accounting.count(accounting.counted(ours))
    remaining = config.n_trials - counts.counted
    if remaining <= 0:
        return [], f"budget spent: {counts.counted} of {config.n_trials} trials"
    deadline = accounting.deadline(attrs, spec)
    if deadline:
        return [], deadline
    size = min(config.batch_size, remaining)
    exhaustible = space_size(spec)
    asked: list[tuple[optuna.trial.Trial, dict[str, Any]]] = []
    seen: set[str] = set()
    for _ in range(size):
        trial, params = _ask_distinct(study, spec, seen, exhaustible)
        if trial is None:
            break
        seen.add(_key(params))
        asked.append((trial, params))
    batch: list[TrialEntry] = []
    marks: dict[int, dict[str, Any]] = {}
    for index, (trial, params) in enumerate(asked):
        # The slot is known once the batch is: a batch cut short by an exhausted space splits anew.
        slot = slot_of(index, len(asked), config.trials_per_task)
        marks[stored.trial_id(trial)] = {
            TrialAttr.ROUND: round_number,
            TrialAttr.BATCH_INDEX: index,
            TrialAttr.DAG_ID: dag_id,
            TrialAttr.RUN_ID: run_id,
            TrialAttr.MAP_INDEX: slot,
        }
        batch.append(_entry(trial.number, params, round_number, spec, slot))
    stored.set_trial_attrs(study, marks)
    log.info("round %d: suggested %d trials %s", round_number, len(batch), [b["trial_number"] for b in batch])
    if not batch:
        return [], "search space exhausted"
    return batch, None


def trial_label(number: int, params: Mapping[str, Any]) -> str:
    """Display name of a mapped trial task: ``trial 17 · lr=0.003 depth=6``."""
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    text = f"trial {number} · {shown}" if shown else f"trial {number}"
    return text if len(text) <= 200 else text[:197] + "..."


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _entry(
    number: int, params: Mapping[str, Any], round_number: int, spec: StudySpec, map_index: int
) -> TrialEntry:
    """A batch entry; it carries the trial timeout, so a pod's deadline is built from its slot alone."""
    return TrialEntry(
        trial_number=number,
        params=dict(params),
        label=trial_label(number, params),
        round=round_number,
        study=spec.name,
        map_index=map_index,
        trial_timeout=spec.trial.execution_timeout,
    )


def batch_slots(batch: list[TrialEntry]) -> list[SlotPayload]:
    """Group a batch by slot: one entry per mapped evaluate task, in map-index order."""
    by_slot: dict[int, list[TrialEntry]] = {}
    for entry in batch:
        by_slot.setdefault(int(entry.get("map_index", len(by_slot))), []).append(entry)
    return [
        SlotPayload(
            slot=slot,
            trial_numbers=[t["trial_number"] for t in trials],
            trials=trials,
            label=slot_label(trials),
            round=trials[0]["round"],
            study=trials[0]["study"],
            trial_timeout=trials[0]["trial_timeout"],
        )
        for slot, trials in sorted(by_slot.items())
    ]


def slot_label(trials: list[TrialEntry]) -> str:
    """Display name of a slot task: its trial's label, or its trial numbers (``trials 8-11``)."""
    if len(trials) == 1:
        return str(trials[0]["label"])
    numbers = [int(t["trial_number"]) for t in trials]
    if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
        return f"trials {numbers[0]}–{numbers[-1]}"
    return "trials " + ", ".join(str(n) for n in numbers)


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _ask_distinct(
    study: optuna.Study, spec: StudySpec, seen: set[str], space: float
) -> tuple[optuna.trial.Trial | None, dict[str, Any]]:
    """Ask one trial whose params differ from the batch so far.

    A duplicate draw is closed as a discarded FAIL (it never counts toward the budget); after
    many duplicates the space is taken as exhausted for this batch and the duplicate is kept.
    """
    for attempt in range(_MAX_DUPLICATE_DRAWS):
        if _grid_exhausted(study):
            return None, {}
        trial = study.ask()
        params = sample_params(spec, trial)
        if _key(params) not in seen or len(seen) >= space or attempt == _MAX_DUPLICATE_DRAWS - 1:
            return trial, params
        trial.set_user_attr(TrialAttr.DISCARDED, "duplicate of another trial in the same batch")
        study.tell(trial, state=TrialState.FAIL)
    raise AssertionError("unreachable")


def _grid_exhausted(study: optuna.Study) -> bool:
    sampler = study.sampler
    return isinstance(sampler, optuna.samplers.GridSampler) and bool(sampler.is_exhausted(study))
