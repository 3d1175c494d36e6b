"""The study read model: what a person looking at a study run sees, read from the Optuna storage.

One home for "how is this study run doing": the HPO view in the Airflow UI (its pages and JSON API)
and ``hpo status`` both call :func:`find_study`, :func:`list_studies` and :func:`load_progress`.
Read only: nothing here writes to the storage or talks to MLflow. Trials are read lean
(:func:`hpo_core.storage.trials.read_trials`: only the attributes shown), and the run's trials,
counts and best trial are the ones the lifecycle uses (:mod:`hpo_core.study.accounting`). What it
returns carries identifiers, params, values and reasons, never a storage URL or a credential.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_core.deployment import Deployment
from hpo_core.errors import TrialStateError
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.spec import StudySpec, spec_from_json
from hpo_core.storage import open_storage
from hpo_core.storage.trials import read_trials
from hpo_core.study import accounting
from hpo_core.study.config import slot_task_id

__all__ = [
    "RunTrials",
    "StudyProgress",
    "StudyRow",
    "TrialRow",
    "find_study",
    "list_studies",
    "load_progress",
    "read_run",
]

#: The trial attributes the read model shows or counts with (the lean read asks for these only).
TRIAL_ATTRS = (
    TrialAttr.ROUND,
    TrialAttr.MAP_INDEX,
    TrialAttr.RUN_ID,
    TrialAttr.DISCARDED,
    TrialAttr.RETRY_OF,
    TrialAttr.WORKER,
    TrialAttr.FAIL_REASON,
    TrialAttr.MLFLOW_RUN,
)


@dataclass(frozen=True)
class TrialRow:
    """One trial of the run as the trial table shows it."""

    number: int
    round: int | None
    slot: int | None
    #: Optuna's state name; WAITING (suggested, not picked up yet) shows as RUNNING.
    state: str
    params: dict[str, Any]
    value: float | None
    values: list[float] | None
    duration_s: float | None
    attempt: int | None
    fail_reason: str | None
    retry_of: int | None
    #: False for a failed trial that a retry replaced: it no longer counts toward the budget.
    counted: bool
    mlflow_run_id: str | None
    #: The Airflow task that holds the trial: ``round_<r>.evaluate`` with map index ``slot``.
    task_id: str | None


@dataclass(frozen=True)
class StudyRow:
    """One study run in the list of studies."""

    study_name: str
    dag_id: str
    run_id: str
    started_at: float | None
    n_trials: int | None
    counts: accounting.StudyCounts
    best_value: float | None
    best_trial: int | None
    metric: str
    direction: str
    stop_reason: str | None
    outcome: str | None
    registered_model: dict[str, str] | None

    def to_dict(self) -> dict[str, Any]:
        """As the view's JSON API returns it (NaN and infinities as ``null``)."""
        return dict(_jsonable(asdict(self)))


@dataclass(frozen=True)
class StudyProgress:
    """One study run: its settings, progress by state, best trial and every trial."""

    row: StudyRow
    batch_size: int | None
    trials_per_task: int | None
    max_rounds: int
    rounds_run: int
    directions: list[str]
    metrics: list[str]
    score_index: int
    best_params: dict[str, Any] | None
    parent_run_id: str | None
    experiment_id: str | None
    trials: list[TrialRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """As the view's JSON API and ``hpo status --json`` return it."""
        out = self.row.to_dict()
        rest = {k: v for k, v in asdict(self).items() if k != "row"}
        out.update(_jsonable(rest))
        return out


@dataclass(frozen=True)
class RunTrials:
    """One DAG run's view of its study: the study, its spec, its attributes scoped to the run, and
    its trials read lean (:data:`TRIAL_ATTRS`)."""

    study: optuna.Study
    spec: StudySpec
    attrs: dict[str, Any]
    trials: list[FrozenTrial]
    run_id: str


def _jsonable(value: Any) -> Any:
    """NaN and infinities become ``None``: the JSON API must stay valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def find_study(deployment: Deployment, dag_id: str, run_id: str | None = None) -> tuple[str, str]:
    """The Optuna study of a DAG run (the latest run when ``run_id`` is None): ``(study_name, run_id)``.

    Reads the studies' attributes only (never their trials).

    Raises:
        TrialStateError: no study of that DAG (run) is in the storage.
    """
    candidates = []
    for frozen in open_storage(deployment.storage_url).get_all_studies():
        attrs = frozen.user_attrs
        if attrs.get(StudyAttr.DAG_ID) != dag_id:
            continue
        if run_id is None or attrs.get(StudyAttr.RUN_ID) == run_id:
            candidates.append((float(attrs.get(StudyAttr.STARTED) or 0), frozen.study_name, attrs))
        elif attrs.get(StudyAttr.CONTINUOUS):
            # A long-lived study holds the trials of every DAG run; an older run is found in it.
            candidates.append((-1.0, frozen.study_name, attrs))
    if not candidates:
        which = f"run {run_id!r} of DAG {dag_id!r}" if run_id else f"DAG {dag_id!r}"
        raise TrialStateError(f"no study of {which} in the storage; has its 'start' task run?")
    _, name, attrs = max(candidates, key=lambda c: c[0])
    return name, run_id or str(attrs.get(StudyAttr.RUN_ID))


def read_run(deployment: Deployment, study_name: str, *, run_id: str | None = None) -> RunTrials:
    """Read a study for one of its DAG runs (default: its latest), trials lean.

    Raises:
        TrialStateError: the study does not exist.
    """
    storage = open_storage(deployment.storage_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError as e:
        raise TrialStateError(f"study {study_name!r} does not exist") from e
    return _read(study, run_id)


def _read(study: optuna.Study, run_id: str | None) -> RunTrials:
    attrs = dict(study.user_attrs)
    run = run_id or str(attrs.get(StudyAttr.RUN_ID))
    # Scoped to the run: in a long-lived study, accounting counts the trials of hpo.run_id's run.
    attrs[StudyAttr.RUN_ID] = run
    trials = read_trials(study, user_attrs=TRIAL_ATTRS)
    return RunTrials(study, spec_from_json(attrs[StudyAttr.SPEC]), attrs, trials, run)


def list_studies(
    deployment: Deployment, *, dag_ids: Collection[str] | None = None, limit: int = 100
) -> list[StudyRow]:
    """The study runs in the storage, newest first (``dag_ids``: only those DAGs' runs)."""
    storage = open_storage(deployment.storage_url)
    found = []
    for frozen in storage.get_all_studies():
        attrs = frozen.user_attrs
        dag_id = attrs.get(StudyAttr.DAG_ID)
        if not dag_id or StudyAttr.SPEC not in attrs or (dag_ids is not None and dag_id not in dag_ids):
            continue
        found.append((float(attrs.get(StudyAttr.STARTED) or 0), frozen.study_name))
    found.sort(reverse=True)
    rows = []
    for _, name in found[:limit]:
        run = _read(optuna.load_study(study_name=name, storage=storage), None)
        rows.append(_row(run, _run_trials(run)))
    return rows


def load_progress(deployment: Deployment, study_name: str, *, run_id: str | None = None) -> StudyProgress:
    """Everything the study page and ``hpo status`` show about one study run.

    ``run_id``: the DAG run, for a long-lived study (``warm_start.mode: continue``) that holds
    several; default the study's latest.
    """
    run = read_run(deployment, study_name, run_id=run_id)
    ours = _run_trials(run)
    row = _row(run, ours)
    counted = {t.number for t in accounting.counted(ours)}
    index = accounting.score_index(run.spec)
    now = dt.datetime.now()
    trials = [_trial_row(t, index, t.number in counted, now) for t in sorted(ours, key=lambda t: t.number)]
    best = next((t for t in ours if t.number == row.best_trial), None)
    config = run.attrs.get(StudyAttr.RUN_CONFIG) or {}
    return StudyProgress(
        row=row,
        batch_size=config.get("batch_size"),
        trials_per_task=config.get("trials_per_task", 1),
        max_rounds=run.spec.budget.max_rounds,
        rounds_run=max((t.round or 0 for t in trials), default=0),
        directions=list(run.spec.all_directions),
        metrics=list(run.spec.objective_metrics),
        score_index=index,
        best_params=dict(best.params) if best is not None else None,
        parent_run_id=run.attrs.get(StudyAttr.PARENT_RUN),
        experiment_id=run.attrs.get(StudyAttr.EXPERIMENT),
        trials=trials,
    )


def _run_trials(run: RunTrials) -> list[FrozenTrial]:
    """The run's suggested trials (a long-lived study: those of ``run.run_id`` only)."""
    return accounting.ours(run.trials, run.attrs)


def _row(run: RunTrials, ours: list[FrozenTrial]) -> StudyRow:
    spec, attrs = run.spec, run.attrs
    index = accounting.score_index(spec)
    # The trial finalize would pick (with several objectives: the Pareto trial the spec's rule picks).
    best = accounting.pick_best(run.study, spec, ours) if _has_complete(ours) else None
    config = attrs.get(StudyAttr.RUN_CONFIG) or {}
    registered = attrs.get(StudyAttr.REGISTERED_MODEL)
    return StudyRow(
        study_name=run.study.study_name,
        dag_id=str(attrs.get(StudyAttr.DAG_ID)),
        run_id=run.run_id,
        started_at=attrs.get(StudyAttr.STARTED),
        n_trials=config.get("n_trials"),
        counts=accounting.count(accounting.counted(ours)),
        best_value=None if best is None else float(best.values[index]),
        best_trial=None if best is None else int(best.number),
        metric=spec.objective_metrics[index],
        direction=spec.all_directions[index],
        stop_reason=attrs.get(StudyAttr.STOP),
        outcome=attrs.get(StudyAttr.OUTCOME),
        registered_model=dict(registered) if isinstance(registered, Mapping) else None,
    )


def _has_complete(trials: list[FrozenTrial]) -> bool:
    return any(t.state == TrialState.COMPLETE for t in trials)


def _state(trial: FrozenTrial) -> str:
    return "RUNNING" if trial.state == TrialState.WAITING else trial.state.name


def _trial_row(trial: FrozenTrial, score_index: int, counted: bool, now: dt.datetime) -> TrialRow:
    attrs = trial.user_attrs
    start, end = trial.datetime_start, trial.datetime_complete
    duration = None if start is None else ((end or now) - start).total_seconds()
    worker = attrs.get(TrialAttr.WORKER)
    attempt = (int(worker.get("attempt") or 0) or None) if isinstance(worker, Mapping) else None
    round_number = attrs.get(TrialAttr.ROUND)
    values = [float(v) for v in trial.values] if trial.values else None
    return TrialRow(
        number=int(trial.number),
        round=round_number,
        slot=attrs.get(TrialAttr.MAP_INDEX),
        state=_state(trial),
        params={k: _param(v) for k, v in trial.params.items()},
        value=values[score_index] if values else None,
        values=values,
        duration_s=None if duration is None else round(duration, 3),
        attempt=attempt,
        fail_reason=attrs.get(TrialAttr.FAIL_REASON) if trial.state == TrialState.FAIL else None,
        retry_of=attrs.get(TrialAttr.RETRY_OF),
        counted=counted,
        mlflow_run_id=attrs.get(TrialAttr.MLFLOW_RUN),
        task_id=slot_task_id(int(round_number)) if round_number is not None else None,
    )


def _param(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else json.dumps(value)
