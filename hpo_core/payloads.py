"""What travels between the study DAG's tasks (XCom) and out of the lifecycle functions: typed dicts.

XCom holds only small references (DESIGN.md): study names, trial numbers, params, run ids; the
Optuna storage holds the results. Each payload is a plain JSON-serialisable dict at run time.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

__all__ = [
    "FinalizeResult",
    "RoundSummary",
    "SlotPayload",
    "SlotResult",
    "StudyHandle",
    "TrialEntry",
    "WarmStartRecord",
]


class WarmStartRecord(TypedDict):
    """What the warm start enqueued and skipped (``skipped`` entries carry the reason)."""

    enqueued: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    previous_study: str | None


class StudyHandle(TypedDict):
    """``start`` -> every later task: which study the DAG run works on."""

    study_name: str
    parent_run_id: str
    experiment_id: str
    warm_start: WarmStartRecord


class TrialEntry(TypedDict):
    """One trial of a round's batch, as ``suggest`` asked it."""

    trial_number: int
    params: dict[str, Any]
    #: Display name of a one-trial task: ``trial 17 · lr=0.003 depth=6``.
    label: str
    round: int
    study: str
    #: The slot (map index of the evaluate task) that holds the trial.
    map_index: int
    #: Seconds the worker gives the trial (``trial.execution_timeout``).
    trial_timeout: int


class SlotPayload(TypedDict):
    """``suggest`` -> one mapped evaluate task: the trials one slot evaluates, in order."""

    slot: int
    trial_numbers: list[int]
    trials: list[TrialEntry]
    #: The task's name in the grid before it runs: the trial's label, or ``trials 8-11``-style numbers.
    label: str
    round: int
    study: str
    trial_timeout: int


class SlotResult(TypedDict):
    """A local evaluate task's return value: each trial's final state."""

    trial_number: int
    state: str
    values: list[float] | None


class RoundSummary(TypedDict):
    """``observe``'s decision about a round, also stored on the study and logged to the parent run."""

    round: int
    trials: list[int]
    round_complete: int
    round_pruned: int
    round_failed: int
    round_best: float | None
    best_value: float | None
    complete: int
    pruned: int
    failed: int
    counted: int
    n_trials: int
    reconciled: list[int]
    failures: dict[int, str]
    stop_reason: str | None
    #: Trials of the round whose MLflow run is missing for now (MLflow was unavailable); the Optuna
    #: storage has their results, and a later observe or finalize logs the runs.
    tracking_missing: list[int]


class FinalizeResult(TypedDict):
    """``finalize``'s outcome: the best trial and, when the study registers one, its model version."""

    study_name: str
    best_trial: int
    best_values: dict[str, float]
    #: The metric that ranks trials (``pareto_choice.metric`` with several objectives) and its value.
    best_metric: str
    best_value: float
    best_params: dict[str, Any]
    complete: int
    pruned: int
    failed: int
    parent_run_id: str | None
    model_version: str | None
    model_name: NotRequired[str]
    alias: NotRequired[str]
    promotion: NotRequired[dict[str, Any]]
