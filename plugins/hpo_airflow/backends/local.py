"""The ``local`` worker backend: each slot of a round's batch runs in its own Airflow task process.

The task process is the warm worker (:func:`hpo_core.worker.run_slot`): the stack is imported
already (the warm executor pre-imports it), and each trial's objective runs in a child forked from
it, so one trial's crash, hang or kill ends only that trial.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowException

from hpo_airflow.links import slot_task
from hpo_airflow.settings import prepare_task_process, resolve_deployment
from hpo_core.payloads import SlotPayload, SlotResult, StudyHandle
from hpo_core.spec import StudySpec

__all__ = [
    "SLOT_LABEL_TEMPLATE",
    "SLOT_STATUS_KEY",
    "check",
    "evaluate_slot",
    "map_slots",
    "slot_status",
    "worker_image",
]

log = logging.getLogger(__name__)

#: Context key the slot task sets for its name in the grid once it ran.
SLOT_STATUS_KEY = "hpo_slot_status"
#: Names a mapped slot task after its trials. Rendered from the task's own argument, so the name
#: is there before the task runs and stays when it is killed or times out; a slot of several
#: trials adds how they went once it ends (`` · 3 done · best 0.993``).
SLOT_LABEL_TEMPLATE = "{{ task.op_kwargs['slot']['label'] }}{{ " + SLOT_STATUS_KEY + " | default('') }}"


def check(spec: StudySpec, *, source: str | Path) -> None:
    """Nothing beyond the spec: local slots run in Airflow's own task processes."""


def map_slots(spec: StudySpec, *, common: dict[str, Any], start: Any, batch: Any) -> Any:
    """One mapped Python task per slot of ``suggest``'s ``batch``, evaluating it in the task process
    (with the slot's "MLflow run" extra link: :class:`~hpo_airflow.links.SlotTaskOperator`)."""
    timeout = spec.trial.execution_timeout
    # The slot's "best" is by the metric that ranks trials, in its direction.
    index = spec.objective_metrics.index(spec.score_metric)
    maximize = spec.all_directions[index] == "maximize"

    def evaluate(slot: SlotPayload, study: StudyHandle) -> list[SlotResult]:
        return evaluate_slot(slot, study, timeout, maximize=maximize, score_index=index)

    evaluate.__doc__ = "Evaluate one slot of the round's trials in a warm local worker."
    return (
        slot_task(**common, map_index_template=SLOT_LABEL_TEMPLATE)(evaluate)
        .partial(study=start)
        .expand(slot=batch)
    )


def evaluate_slot(
    slot: SlotPayload, study: StudyHandle, timeout: int, *, maximize: bool = False, score_index: int = 0
) -> list[SlotResult]:
    """Evaluate one slot's trials in this task process, a warm worker (see :func:`hpo_core.worker.run_slot`).

    The task fails when any of its trials failed, its log listing every trial's outcome; a retry
    evaluates only the unfinished ones.
    """
    from hpo_core import worker

    prepare_task_process()
    context = get_current_context()
    ti = context["ti"]
    numbers = [int(n) for n in slot["trial_numbers"]]
    log.info("evaluating %s (attempt %s): trials %s", slot["label"], ti.try_number, numbers)
    outcomes = worker.run_slot(
        deployment=resolve_deployment(),
        study_name=study["study_name"],
        trial_numbers=numbers,
        attempt=ti.try_number,
        timeout=timeout,
        relay=_relay,
    )
    failed = [o for o in outcomes if not o.ok]
    log.info("slot outcome (%d trials):", len(outcomes))
    for outcome in outcomes:
        (log.warning if not outcome.ok else log.info)("  %s", outcome.summary())
    # Rendered again after the task ends: the grid shows how the slot went (a pruned trial's task is
    # green like a completed one, so its name says it).
    status = slot_status(outcomes, maximize=maximize, score_index=score_index)
    context[SLOT_STATUS_KEY] = status  # type: ignore[literal-required]
    if len(numbers) == 1 and failed:
        raise AirflowException(f"{slot['label']} failed: {failed[0].reason}")
    if failed:
        what = "; ".join(f"trial {o.trial_number}: {o.reason}" for o in failed)
        raise AirflowException(f"{slot['label']}: {len(failed)} of {len(outcomes)} trials failed: {what}")
    return [SlotResult(trial_number=o.trial_number, state=o.state, values=o.values) for o in outcomes]


def slot_status(outcomes: list[Any], *, maximize: bool, score_index: int = 0) -> str:
    """What is appended to a slot task's name once it ran.

    A slot of several trials: `` · 2 done · 1 pruned · 1 failed · best 0.993`` (done: completed).
    One trial: `` · pruned``, since Airflow shows a pruned trial's task green like a completed one
    (a completed trial keeps its name; a failed one's task is red).
    """
    complete = [o for o in outcomes if o.state == "COMPLETE"]
    pruned = sum(o.state == "PRUNED" for o in outcomes)
    failed = len(outcomes) - len(complete) - pruned
    if len(outcomes) == 1:
        return " · pruned" if pruned else ""
    parts = [f"{len(complete)} done"]
    if pruned:
        parts.append(f"{pruned} pruned")
    if failed:
        parts.append(f"{failed} failed")
    values = [o.values[score_index] for o in complete if o.values]
    if values:
        parts.append(f"best {(max if maximize else min)(values):.4g}")
    return " · " + " · ".join(parts)


def _relay(line: str) -> None:
    log.info("%s", line)


def worker_image(spec: StudySpec) -> str | None:
    """Local trials run in the Airflow worker's own environment: no image to record."""
    return None
