"""``suggest``: ask the sampler for a round's batch, params materialised at once, split into slots."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_core.deployment import Deployment
from hpo_core.errors import TrialStateError
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.payloads import SlotPayload, TrialEntry
from hpo_core.samplers import SAMPLERS
from hpo_core.spec import StudySpec
from hpo_core.storage import flushing
from hpo_core.storage import trials as stored
from hpo_core.study import accounting
from hpo_core.study.ask import UNBOUNDED_SAMPLERS, SamplerRun, ask_batch, select_history
from hpo_core.study.config import slot_of
from hpo_core.study.state import LoadedStudy, load_run

__all__ = ["batch_slots", "slot_label", "suggest_batch", "trial_label"]

log = logging.getLogger(__name__)


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


#: User attributes suggest reads of every trial (what it counts and what a batch needs).
_READ = (
    TrialAttr.ROUND,
    TrialAttr.BATCH_INDEX,
    TrialAttr.MAP_INDEX,
    TrialAttr.RUN_ID,
    TrialAttr.RETRY_OF,
    TrialAttr.DISCARDED,
    TrialAttr.HEARTBEAT,
)
#: Attempts of the read-ask-write cycle when a racing attempt of the same task wrote first.
_WRITE_ATTEMPTS = 3


def _suggest(
    deployment: Deployment, study_name: str, round_number: int, *, dag_id: str | None, run_id: str | None
) -> tuple[list[TrialEntry], str | None]:
    """Read the study once, ask the batch in memory, write it in one transaction.

    Idempotent per round: a round that has trials returns them. Two attempts of the same round
    racing: the second's write finds the first's batch (the write locks the study) and returns it.
    """
    loaded = load_run(deployment, study_name, round_number=round_number)
    study, spec, attrs, config = loaded.study, loaded.spec, loaded.attrs, loaded.config
    run_id = run_id if run_id is not None else attrs.get(StudyAttr.RUN_ID)
    for _ in range(_WRITE_ATTEMPTS):
        trials = _read(study, spec)
        if spec.trial.stale_timeout and accounting.reconcile_trials(
            # Trials whose worker went silent (a run stopped by its timeout, a lost pod) stop counting
            # as running; their own round's observe would not come back for them.
            study,
            round_number=None,
            stale_after=spec.trial.stale_timeout,
            trials=trials,
        ):
            trials = _read(study, spec)
        ours = accounting.ours(trials, attrs)
        existing = _round_batch(ours, round_number)
        if existing and not _whole_study(spec):
            existing = stored.with_params(study, existing)
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
        batch = _ask_and_write(
            loaded,
            trials,
            size=min(config.batch_size, remaining),
            round_number=round_number,
            dag_id=dag_id,
            run_id=run_id,
        )
        if batch is not None:
            if not batch:
                return [], "search space exhausted"
            return batch, None
        log.info("round %d was written by another attempt meanwhile: reading it", round_number)
    raise TrialStateError(f"round {round_number} of {study_name}: could not write or read its batch")


def _read(study: optuna.Study, spec: StudySpec) -> list[FrozenTrial]:
    """Every trial of the study, with what suggest counts and what the sampler keeps on trials.

    A sampler whose state lives on finished trials (grid, CMA-ES, NSGA-II, QMC) gets every trial with
    its params and system attributes; TPE and GP get the trials without params here, and the params
    of the bounded history they see afterwards (:func:`_history`): on a large study that is a few
    hundred trials' params instead of every trial's.
    """
    if _whole_study(spec):
        return stored.read_trials(study, user_attrs=_READ, system_attrs=True)
    return stored.read_trials(
        study, user_attrs=_READ, system_attrs=(TrialState.RUNNING, TrialState.WAITING), params_of=()
    )


def _whole_study(spec: StudySpec) -> bool:
    """Whether the sampler reads every trial's params (else only its bounded history's)."""
    return SAMPLERS[spec.sampler.type].trial_state == "all" or spec.sampler.type in UNBOUNDED_SAMPLERS


def _history(study: optuna.Study, spec: StudySpec, trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials the sampler sees, with their params: the bounded history (``sampler.history_limit``)."""
    if _whole_study(spec):
        return trials
    seen = select_history(
        trials,
        limit=spec.sampler.history_limit,
        sampler_type=spec.sampler.type,
        directions=[d.name.lower() for d in study.directions],
    )
    return stored.with_params(study, seen)


def _round_batch(ours: list[FrozenTrial], round_number: int) -> list[FrozenTrial]:
    """The trials suggested for the round (replacements aside), in batch order."""
    return sorted(
        (
            t
            for t in ours
            if t.user_attrs.get(TrialAttr.ROUND) == round_number and TrialAttr.RETRY_OF not in t.user_attrs
        ),
        key=lambda t: t.user_attrs.get(TrialAttr.BATCH_INDEX, 0),
    )


def _ask_and_write(
    loaded: LoadedStudy,
    trials: list[FrozenTrial],
    *,
    size: int,
    round_number: int,
    dag_id: str | None,
    run_id: str | None,
) -> list[TrialEntry] | None:
    """Ask ``size`` trials against the read ``trials`` and write them; ``None``: another attempt wrote."""
    study, spec, config = loaded.study, loaded.spec, loaded.config
    asked = ask_batch(
        spec,
        run=SamplerRun(seed=config.seed, round_number=round_number, options=config.sampler_options),
        trials=_history(study, spec, trials),
        size=size,
        directions=[d.name.lower() for d in study.directions],
        study_system_attrs=stored.study_system_attrs(study),
        next_number=len(trials),
    )
    kept = asked.batch
    templates = []
    for t in asked.trials:
        marks: dict[str, Any] = {}
        if not t.discarded:
            index = kept.index(t)
            marks = {
                TrialAttr.ROUND: round_number,
                TrialAttr.BATCH_INDEX: index,
                TrialAttr.DAG_ID: dag_id,
                TrialAttr.RUN_ID: run_id,
                # The slot is known once the batch is: a batch cut short by an exhausted space splits anew.
                TrialAttr.MAP_INDEX: slot_of(index, len(kept), config.trials_per_task),
            }
        templates.append(t.as_template(marks))
    scope = {TrialAttr.RUN_ID: run_id} if loaded.attrs.get(StudyAttr.CONTINUOUS) else {}
    written = stored.write_batch(
        study,
        trials=templates,
        popped={t.number: t.waiting_trial_id for t in asked.trials if t.waiting_trial_id is not None},
        study_system_attrs=asked.study_system_attrs,
        unless={TrialAttr.ROUND: round_number, **scope},
    )
    if written is None:
        return None
    numbers = {t.number: number for t, (number, _) in zip(asked.trials, written, strict=True)}
    batch = [
        _entry(numbers[t.number], t.params, round_number, spec, slot_of(i, len(kept), config.trials_per_task))
        for i, t in enumerate(kept)
    ]
    log.info(
        "round %d: suggested %d trials %s (the sampler saw %d of %d trials)",
        round_number,
        len(batch),
        [b["trial_number"] for b in batch],
        asked.history_seen,
        len(trials),
    )
    return batch


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
