"""One DAG run's settings: the spec's budget with the trigger's overrides, and how a batch is split.

The run's settings travel one way, through one channel: the trigger form's values (bounded by
:func:`run_bounds`) reach :meth:`RunConfig.resolve` in ``start``, which stores the result as the
study attribute ``hpo.run_config``; every later task reads it back with :meth:`RunConfig.from_attrs`.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hpo_core.errors import StudySpecError
from hpo_core.keys import StudyAttr
from hpo_core.spec import SamplerSpec, StudySpec

__all__ = ["RunConfig", "run_bounds", "slot_of", "slot_sizes", "slot_task_id", "study_name_for"]


def run_bounds(spec: StudySpec) -> dict[str, tuple[int, int]]:
    """The inclusive range of each integer setting a trigger may choose (the form's bounds).

    ``n_trials`` may go up to what the largest batch fits in ``max_rounds``: :meth:`RunConfig.resolve`
    raises the run's batch size as far as needed, so every value the form accepts makes a run.
    """
    batch_limit = spec.budget.batch_size_limit
    return {
        "n_trials": (1, spec.budget.max_rounds * batch_limit),
        "batch_size": (1, batch_limit),
        "trials_per_task": (1, spec.trials_per_task_limit),
    }


@dataclass(frozen=True)
class RunConfig:
    """The settings one DAG run uses: the spec's budget with the trigger's overrides applied."""

    n_trials: int
    batch_size: int
    seed: int | None
    sampler_options: dict[str, Any] = field(default_factory=dict)
    #: Trials per mapped evaluate task (slot); configs stored before slots existed read as 1.
    trials_per_task: int = 1
    #: What ``resolve`` changed from what the trigger asked, and why (``None``: nothing).
    adjusted: str | None = None

    @classmethod
    def resolve(cls, spec: StudySpec, overrides: Mapping[str, Any] | None) -> RunConfig:
        """Apply trigger overrides (``n_trials``, ``batch_size``, ``seed``, ``sampler_options``,
        ``trials_per_task``). A batch size too small for ``n_trials`` in ``max_rounds`` is raised to
        the smallest that fits, within ``budget.max_batch_size`` (recorded in :attr:`adjusted`).

        Raises:
            StudySpecError: an override is out of the spec's bounds or the rounds cannot hold it.
        """
        o = dict(overrides or {})
        bounds = run_bounds(spec)
        n_trials = int(o.get("n_trials") or spec.budget.n_trials)
        batch_size = int(o.get("batch_size") or spec.budget.batch_size)
        per_task = int(o.get("trials_per_task") or spec.worker.trials_per_task)
        options = dict(o.get("sampler_options") or {})
        allowed = list(SamplerSpec.trigger_options())
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise StudySpecError(
                f"{spec.dag_id}: params.sampler_options: unknown option(s) {unknown}; allowed: {allowed}"
            )
        low, high = bounds["batch_size"]
        if not low <= batch_size <= high:
            raise StudySpecError(
                f"{spec.dag_id}: params.batch_size: {batch_size} is outside {low}..{high} "
                "(budget.max_batch_size)"
            )
        rounds = spec.budget.max_rounds
        adjusted = None
        needed = math.ceil(n_trials / rounds)
        if batch_size < needed <= high:
            # The form offers n_trials up to max_rounds x max_batch_size: a run asking for more
            # trials than its batch size fits gets the batch size that fits, and says so.
            adjusted = (
                f"batch_size raised from {batch_size} to {needed}: {n_trials} trials must fit in "
                f"max_rounds={rounds}"
            )
            batch_size = needed
        if not 1 <= n_trials <= rounds * batch_size:
            raise StudySpecError(
                f"{spec.dag_id}: params.n_trials: {n_trials} needs {math.ceil(n_trials / batch_size)} rounds "
                f"at batch_size={batch_size}, but the DAG has max_rounds={rounds}; "
                f"use n_trials <= {rounds * batch_size} or a larger batch_size"
            )
        low, high = bounds["trials_per_task"]
        if not low <= per_task <= high:
            raise StudySpecError(
                f"{spec.dag_id}: params.trials_per_task: {per_task} is outside {low}..{high} "
                "(a task never holds more trials than the largest batch, budget.max_batch_size)"
            )
        return cls(
            n_trials=n_trials,
            batch_size=batch_size,
            seed=o.get("seed", spec.sampler.seed),
            sampler_options=options,
            trials_per_task=per_task,
            adjusted=adjusted,
        )

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> RunConfig:
        """The settings ``start`` stored on the study (``attrs``: the study's user attributes)."""
        return cls(**attrs[StudyAttr.RUN_CONFIG])

    def to_attr(self) -> dict[str, Any]:
        """The form stored as the study attribute ``hpo.run_config``."""
        return asdict(self)


def slot_sizes(batch_size: int, trials_per_task: int) -> list[int]:
    """How a batch is split over mapped tasks: ``ceil(batch / k)`` slots, sizes differing by one at most.

    ``slot_sizes(5, 2) == [2, 2, 1]``; ``slot_sizes(4, 1) == [1, 1, 1, 1]``.
    """
    if batch_size <= 0:
        return []
    n_slots = math.ceil(batch_size / max(1, trials_per_task))
    base, extra = divmod(batch_size, n_slots)
    return [base + (1 if i < extra else 0) for i in range(n_slots)]


def slot_of(batch_index: int, batch_size: int, trials_per_task: int) -> int:
    """The slot (map index of the evaluate task) that holds the batch's ``batch_index``-th trial."""
    end = 0
    for slot, size in enumerate(slot_sizes(batch_size, trials_per_task)):
        end += size
        if batch_index < end:
            return slot
    raise IndexError(f"batch index {batch_index} is outside a batch of {batch_size}")


def slot_task_id(round_number: int) -> str:
    """The id of round ``round_number``'s mapped slot task: ``evaluate`` in the ``round_<r>`` group."""
    return f"round_{round_number}.evaluate"


def study_name_for(spec: StudySpec, run_id: str, *, logical_date: dt.datetime | None = None) -> str:
    """Optuna study name of one DAG run; a re-run of the same DAG run reuses the study.

    A run with a logical date (a scheduled run) is named from it, e.g.
    ``churn.2025-01-02T030000Z``; a run without one from its run id. With warm_start mode
    ``continue`` every run uses the one long-lived study ``<name>.continuous``.
    """
    if spec.warm_start.mode == "continue":
        return f"{spec.name}.continuous"
    if logical_date is not None:
        stamp = logical_date.astimezone(dt.UTC) if logical_date.tzinfo else logical_date
        return f"{spec.name}.{stamp:%Y-%m-%dT%H%M%S}Z"
    return f"{spec.name}.{run_id}"
