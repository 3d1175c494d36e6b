"""The study engine: start, suggest, observe and finalize a study stored in Optuna.

Each function is one Airflow task's worth of work, but none imports Airflow: the glue in
``plugins/hpo_airflow`` passes plain values in and turns the results into task outcomes.
The Optuna storage is the single source of truth; return values are small summaries.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_core import warmstart
from hpo_core.deployment import Deployment
from hpo_core.errors import StudyOutcomeError, StudySpecError, TrialStateError
from hpo_core.samplers import SAMPLER_OPTION_KEYS, build_pruner, build_sampler
from hpo_core.space import sample_params, space_size
from hpo_core.spec import StudySpec, spec_from_json
from hpo_core.storage import flush, open_storage

__all__ = [
    "LoadedStudy",
    "RoundNotRun",
    "RunConfig",
    "StudyCounts",
    "batch_slots",
    "count_trials",
    "finalize_study",
    "load_run",
    "load_study",
    "observe_round",
    "reconcile_trials",
    "slot_label",
    "slot_sizes",
    "start_study",
    "study_name_for",
    "suggest_batch",
    "trial_label",
    "trials_of_round",
]

log = logging.getLogger(__name__)

# Study attributes (user attrs of the Optuna study).
ATTR_SPEC = "hpo.spec"
ATTR_RUN_CONFIG = "hpo.run_config"
ATTR_PARENT_RUN = "hpo.mlflow_parent_run_id"
ATTR_EXPERIMENT = "hpo.mlflow_experiment_id"
ATTR_STARTED = "hpo.started_at"
ATTR_STOP = "hpo.stop_reason"
ATTR_DAG_ID = "hpo.dag_id"
ATTR_RUN_ID = "hpo.run_id"
ATTR_ROUND_PREFIX = "hpo.round_summary."
#: Set on a long-lived study (warm_start.mode ``continue``): budget and rounds count per DAG run.
ATTR_CONTINUOUS = "hpo.continuous"
# Trial attributes.
T_ROUND = "hpo.round"
T_BATCH_INDEX = "hpo.batch_index"
#: Map index of the evaluate task (slot) that holds the trial.
T_MAP_INDEX = "hpo.map_index"
T_RETRY_OF = "hpo.retry_of"
T_RETRY_ROOT = "hpo.retry_root"
T_DISCARDED = "hpo.discarded"
T_MODEL_URI = "hpo.model_uri"
T_MLFLOW_RUN = "hpo.mlflow_run_id"
T_METRICS = "hpo.metrics"
T_LINEAGE = "hpo.lineage"
FAIL_REASON = "fail_reason"

_MAX_DUPLICATE_DRAWS = 20

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _flushed(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """After a control task's work, fold a SQLite storage's write-ahead log into its file."""

    @wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(*args, **kwargs)
        finally:
            deployment = kwargs.get("deployment")
            url = kwargs.get("storage_url") or getattr(deployment, "storage_url", None)
            if isinstance(url, str):
                flush(url)

    return wrapper


@dataclass(frozen=True)
class RunConfig:
    """The settings one DAG run uses: the spec's budget with the trigger's overrides applied."""

    n_trials: int
    batch_size: int
    seed: int | None
    sampler_options: dict[str, Any] = field(default_factory=dict)
    #: Trials per mapped evaluate task (slot); configs stored before slots existed read as 1.
    trials_per_task: int = 1

    @classmethod
    def resolve(cls, spec: StudySpec, overrides: Mapping[str, Any] | None) -> RunConfig:
        """Apply trigger overrides (``n_trials``, ``batch_size``, ``seed``, ``sampler_options``,
        ``trials_per_task``).

        Raises:
            StudySpecError: an override is out of the spec's bounds or the rounds cannot hold it.
        """
        o = dict(overrides or {})
        n_trials = int(o.get("n_trials") or spec.budget.n_trials)
        batch_size = int(o.get("batch_size") or spec.budget.batch_size)
        seed = o.get("seed", spec.sampler.seed)
        options = dict(o.get("sampler_options") or {})
        unknown = sorted(set(options) - set(SAMPLER_OPTION_KEYS))
        if unknown:
            raise StudySpecError(
                f"{spec.dag_id}: params.sampler_options: unknown option(s) {unknown}; "
                f"allowed: {list(SAMPLER_OPTION_KEYS)}"
            )
        limit = spec.budget.batch_size_limit
        if not 1 <= batch_size <= limit:
            raise StudySpecError(
                f"{spec.dag_id}: params.batch_size: {batch_size} is outside 1..{limit} "
                "(budget.max_batch_size)"
            )
        rounds = spec.budget.max_rounds
        if not 1 <= n_trials <= rounds * batch_size:
            raise StudySpecError(
                f"{spec.dag_id}: params.n_trials: {n_trials} needs {math.ceil(n_trials / batch_size)} rounds "
                f"at batch_size={batch_size}, but the DAG has max_rounds={rounds}; "
                f"use n_trials <= {rounds * batch_size} or a larger batch_size"
            )
        per_task = int(o.get("trials_per_task") or spec.worker.trials_per_task)
        per_task_limit = spec.trials_per_task_limit
        if not 1 <= per_task <= per_task_limit:
            raise StudySpecError(
                f"{spec.dag_id}: params.trials_per_task: {per_task} is outside 1..{per_task_limit} "
                "(a task never holds more trials than the largest batch, budget.max_batch_size)"
            )
        return cls(
            n_trials=n_trials,
            batch_size=batch_size,
            seed=seed,
            sampler_options=options,
            trials_per_task=per_task,
        )


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
    raise ValueError(f"batch index {batch_index} is outside a batch of {batch_size}")


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


def load_study(storage_url: str, study_name: str, *, round_number: int = 0) -> tuple[optuna.Study, StudySpec]:
    """Load a started study and its stored spec, with the sampler for ``round_number``."""
    loaded = load_run(storage_url, study_name, round_number=round_number)
    return loaded.study, loaded.spec


@dataclass(frozen=True)
class LoadedStudy:
    """A started study with what one read of its attributes says: its spec and the run's settings."""

    study: optuna.Study
    spec: StudySpec
    attrs: dict[str, Any]
    config: RunConfig


def load_run(storage_url: str, study_name: str, *, round_number: int = 0) -> LoadedStudy:
    """Load a started study, its spec, attributes and run settings with one read of its attributes."""
    storage = open_storage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError as e:
        raise TrialStateError(f"study {study_name!r} does not exist; did the 'start' task run?") from e
    attrs = storage.get_study_user_attrs(study_id)
    spec = spec_from_json(attrs[ATTR_SPEC])
    config = RunConfig(**attrs[ATTR_RUN_CONFIG])
    sampler = build_sampler(spec, seed=config.seed, options=config.sampler_options, round_number=round_number)
    study = optuna.load_study(
        study_name=study_name, storage=storage, sampler=sampler, pruner=build_pruner(spec)
    )
    return LoadedStudy(study=study, spec=spec, attrs=attrs, config=config)


def run_config(study: optuna.Study) -> RunConfig:
    """The run's effective settings, as stored by :func:`start_study`."""
    return RunConfig(**study.user_attrs[ATTR_RUN_CONFIG])


# --- start -----------------------------------------------------------------------------------


@_flushed
def start_study(
    spec: StudySpec,
    *,
    deployment: Deployment,
    dag_id: str,
    run_id: str,
    overrides: Mapping[str, Any] | None = None,
    study_name: str | None = None,
) -> dict[str, Any]:
    """Create or load the run's Optuna study and open its MLflow parent run.

    Returns:
        ``{"study_name", "parent_run_id", "experiment_id", "run_config"}`` (small, for XCom).
    """
    config = RunConfig.resolve(spec, overrides)
    name = study_name or study_name_for(spec, run_id)
    deployment.ensure_local_dirs()
    storage = open_storage(deployment.storage_url)
    directions = spec.all_directions
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=directions,  # type: ignore[arg-type]
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != directions:
        raise StudySpecError(
            f"{spec.dag_id}: study {name!r} exists with directions "
            f"{[d.name.lower() for d in study.directions]}, the spec says {directions}"
        )
    attrs = study.user_attrs
    continuous = spec.warm_start.mode == "continue"
    updates: dict[str, Any] = {
        ATTR_SPEC: spec.to_json(),
        ATTR_RUN_CONFIG: asdict(config),
        ATTR_DAG_ID: dag_id,
        ATTR_RUN_ID: run_id,
    }
    if continuous:
        updates[ATTR_CONTINUOUS] = True
    if ATTR_STARTED not in attrs or (continuous and attrs.get(ATTR_RUN_ID) != run_id):
        # A long-lived study times each DAG run on its own.
        updates[ATTR_STARTED] = time.time()
    if attrs.get(ATTR_STOP):
        # A cleared and re-run DAG run starts deciding afresh.
        updates[ATTR_STOP] = None
    _set_study_attrs(study, attrs, updates)

    from hpo_core import tracking

    mlflow_client = tracking.client(deployment, set_uris=False)
    experiment_id = tracking.ensure_experiment(
        mlflow_client, spec.mlflow.experiment, deployment.artifact_root
    )
    parent = tracking.find_or_create_parent_run(
        mlflow_client,
        experiment_id=experiment_id,
        study_name=name,
        run_name=f"{spec.name} · {run_id}",
        tags={"hpo.dag_id": dag_id, "hpo.run_id": run_id, "mlflow.note.content": spec.description},
        run_id=run_id if continuous else None,
    )
    _log_params_once(
        mlflow_client,
        parent,
        {
            "n_trials": config.n_trials,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "sampler": spec.sampler.type,
            "max_rounds": spec.budget.max_rounds,
            **{f"sampler.{k}": v for k, v in sorted(config.sampler_options.items())},
        },
    )
    _set_study_attrs(study, attrs, {ATTR_PARENT_RUN: parent, ATTR_EXPERIMENT: experiment_id})
    warm_start = attrs.get(warmstart.ATTR_WARM_START)
    if warm_start is None:
        # Only when the study is new: a re-run of the same DAG run must not enqueue again.
        warm_start = warmstart.enqueue_warm_start(
            study, spec, dag_id=dag_id, mlflow_client=mlflow_client
        ).to_dict()
        study.set_user_attr(warmstart.ATTR_WARM_START, warm_start)
        if warm_start["enqueued"] or warm_start["skipped"]:
            mlflow_client.log_dict(parent, warm_start, "warm_start.json")
    log.info("study %s ready: %s", name, asdict(config))
    return {
        "study_name": name,
        "parent_run_id": parent,
        "experiment_id": experiment_id,
        "run_config": asdict(config),
        "warm_start": warm_start,
    }


def _set_study_attrs(study: optuna.Study, attrs: Mapping[str, Any], updates: Mapping[str, Any]) -> None:
    """Write the study attributes whose value changed (``attrs``: as read before)."""
    for key, value in updates.items():
        if key not in attrs or attrs[key] != value:
            study.set_user_attr(key, value)


def _log_params_once(mlflow_client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Log the run's params in one call; params are immutable, so a re-run keeps the first values."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    texts = {key: "null" if value is None else str(value) for key, value in params.items()}
    try:
        mlflow_client.log_batch(run_id, params=[Param(key, text) for key, text in texts.items()])
        return
    except MlflowException:  # one of them was logged before with another value
        pass
    for key, text in texts.items():
        try:
            mlflow_client.log_param(run_id, key, text)
        except MlflowException:
            log.info("param %s already logged on the parent run", key)


# --- accounting ------------------------------------------------------------------------------


def _our_trials(study: optuna.Study) -> list[FrozenTrial]:
    return _ours(study.get_trials(deepcopy=False), study.user_attrs)


def _ours(trials: list[FrozenTrial], attrs: Mapping[str, Any]) -> list[FrozenTrial]:
    """The suggested trials of the study's current DAG run (``attrs``: the study's attributes)."""
    run_scope = _scope(attrs)
    return [
        t
        for t in trials
        if T_ROUND in t.user_attrs
        and not t.user_attrs.get(T_DISCARDED)
        and (run_scope is None or t.user_attrs.get("hpo.run_id") == run_scope)
    ]


def trials_of_round(study: optuna.Study, round_number: int) -> list[FrozenTrial]:
    """The trials suggested for round ``round_number`` of the study's current DAG run."""
    return [t for t in _our_trials(study) if t.user_attrs.get(T_ROUND) == round_number]


def _scope(attrs: Mapping[str, Any]) -> str | None:
    """The DAG run whose trials count, for a long-lived study; ``None``: every trial counts."""
    return str(attrs.get(ATTR_RUN_ID)) if attrs.get(ATTR_CONTINUOUS) else None


def _prefix(attrs: Mapping[str, Any]) -> str:
    """Attribute prefix of the round summaries (per DAG run in a long-lived study)."""
    run_scope = _scope(attrs)
    return ATTR_ROUND_PREFIX if run_scope is None else f"{ATTR_ROUND_PREFIX}{run_scope}."


def _counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    superseded = {t.user_attrs[T_RETRY_OF] for t in trials if T_RETRY_OF in t.user_attrs}
    return [t for t in trials if t.number not in superseded]


def count_trials(study: optuna.Study) -> StudyCounts:
    """Count the trials that make up the study's budget."""
    return _count(_counted(_our_trials(study)))


def _count(counted: list[FrozenTrial]) -> StudyCounts:
    by_state = {s: sum(1 for t in counted if t.state == s) for s in TrialState}
    return StudyCounts(
        counted=len(counted),
        complete=by_state[TrialState.COMPLETE],
        pruned=by_state[TrialState.PRUNED],
        failed=by_state[TrialState.FAIL],
        running=by_state[TrialState.RUNNING] + by_state[TrialState.WAITING],
    )


# --- suggest ---------------------------------------------------------------------------------


def trial_label(number: int, params: Mapping[str, Any]) -> str:
    """Display name of a mapped trial task: ``trial 17 · lr=0.003 depth=6``."""
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    text = f"trial {number} · {shown}" if shown else f"trial {number}"
    return text if len(text) <= 200 else text[:197] + "..."


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@_flushed
def suggest_batch(
    *,
    storage_url: str,
    study_name: str,
    round_number: int,
    dag_id: str | None = None,
    run_id: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Ask the sampler for this round's batch, params materialised at once.

    Idempotent: if the round already has trials (the task was retried or cleared), the same
    batch is returned instead of asking again.

    Returns:
        ``(batch, skip_reason)``: the batch ``[{"trial_number", "params", "label"}, ...]`` and,
        when it is empty, why the round is not needed.
    """
    loaded = load_run(storage_url, study_name, round_number=round_number)
    study, spec, attrs, config = loaded.study, loaded.spec, loaded.attrs, loaded.config
    trials = study.get_trials(deepcopy=False)
    if spec.trial.stale_timeout and reconcile_trials(
        # Trials whose worker went silent (a run stopped by its timeout, a lost pod) stop counting
        # as running; their own round's observe would not come back for them.
        study,
        round_number=None,
        stale_after=spec.trial.stale_timeout,
        trials=trials,
    ):
        trials = study.get_trials(deepcopy=False)
    if run_id is None:
        run_id = attrs.get(ATTR_RUN_ID)
    ours = _ours(trials, attrs)
    existing = sorted(
        (t for t in ours if t.user_attrs.get(T_ROUND) == round_number and T_RETRY_OF not in t.user_attrs),
        key=lambda t: t.user_attrs.get(T_BATCH_INDEX, 0),
    )
    if existing:
        log.info("round %d already suggested: trials %s", round_number, [t.number for t in existing])
        return _with_timeout(
            [
                _batch_entry(
                    t.number, t.params, round_number, spec.name, int(t.user_attrs.get(T_MAP_INDEX, i))
                )
                for i, t in enumerate(existing)
            ],
            spec,
        ), None
    stop = attrs.get(ATTR_STOP)
    if stop:
        return [], f"study stopped before round {round_number}: {stop}"
    counts = _count(_counted(ours))
    remaining = config.n_trials - counts.counted
    if remaining <= 0:
        return [], f"budget spent: {counts.counted} of {config.n_trials} trials"
    deadline = _deadline(attrs, spec)
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
    batch: list[dict[str, Any]] = []
    marks: dict[int, dict[str, Any]] = {}
    for index, (trial, params) in enumerate(asked):
        # The slot is known once the batch is: a batch cut short by an exhausted space splits anew.
        slot = slot_of(index, len(asked), config.trials_per_task)
        marks[trial._trial_id] = {
            T_ROUND: round_number,
            T_BATCH_INDEX: index,
            "hpo.dag_id": dag_id,
            "hpo.run_id": run_id,
            T_MAP_INDEX: slot,
        }
        batch.append(_batch_entry(trial.number, params, round_number, spec.name, slot))
    _set_trial_attrs(study, marks)
    log.info("round %d: suggested %d trials %s", round_number, len(batch), [b["trial_number"] for b in batch])
    if not batch:
        return [], "search space exhausted"
    return _with_timeout(batch, spec), None


def _batch_entry(
    number: int, params: Mapping[str, Any], round_number: int, study: str, map_index: int
) -> dict[str, Any]:
    return {
        "trial_number": number,
        "params": dict(params),
        "label": trial_label(number, params),
        "round": round_number,
        "study": study,
        "map_index": map_index,
    }


def _with_timeout(batch: list[dict[str, Any]], spec: StudySpec) -> list[dict[str, Any]]:
    """Each entry carries the trial timeout: a pod's deadline is built from its slot alone."""
    return [{**entry, "trial_timeout": spec.trial.execution_timeout} for entry in batch]


def batch_slots(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group a batch by slot: one entry per mapped evaluate task, in map-index order.

    Each slot is ``{"slot", "trial_numbers", "trials", "label", "round", "study", "trial_timeout"}``;
    ``label`` names the task in the grid before it runs (one trial: the trial's own label).
    """
    by_slot: dict[int, list[dict[str, Any]]] = {}
    for entry in batch:
        by_slot.setdefault(int(entry.get("map_index", len(by_slot))), []).append(entry)
    return [
        {
            "slot": slot,
            "trial_numbers": [t["trial_number"] for t in trials],
            "trials": trials,
            "label": slot_label(trials),
            "round": trials[0]["round"],
            "study": trials[0]["study"],
            "trial_timeout": trials[0].get("trial_timeout"),
        }
        for slot, trials in sorted(by_slot.items())
    ]


def slot_label(trials: list[dict[str, Any]]) -> str:
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
        trial.set_user_attr(T_DISCARDED, "duplicate of another trial in the same batch")
        study.tell(trial, state=TrialState.FAIL)
    raise AssertionError("unreachable")


def _grid_exhausted(study: optuna.Study) -> bool:
    sampler = study.sampler
    return isinstance(sampler, optuna.samplers.GridSampler) and bool(sampler.is_exhausted(study))


def _set_trial_attrs(study: optuna.Study, attrs_by_trial_id: Mapping[int, Mapping[str, Any]]) -> None:
    """Set user attributes of several running trials, in one transaction on Optuna's RDB storage.

    Optuna's API writes one attribute per transaction (a commit each: 5 per trial of a batch). Its RDB
    storage has the statement for one attribute without the commit; where that is not there (another
    storage, another Optuna), each attribute is written on its own as before.
    """
    backend = getattr(study._storage, "_backend", study._storage)
    write = getattr(backend, "_set_trial_attr_without_commit", None)
    if isinstance(backend, optuna.storages.RDBStorage) and write is not None:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        # Running trials are never cached by the study's storage wrapper: it sees the writes.
        with _create_scoped_session(backend.scoped_session) as session:
            for trial_id, attrs in attrs_by_trial_id.items():
                for key, value in attrs.items():
                    write(session, models.TrialUserAttributeModel, trial_id, key, value)
        return
    for trial_id, attrs in attrs_by_trial_id.items():
        for key, value in attrs.items():
            study._storage.set_trial_user_attr(trial_id, key, value)


def _deadline(attrs: Mapping[str, Any], spec: StudySpec) -> str | None:
    if spec.budget.timeout is None:
        return None
    started = float(attrs.get(ATTR_STARTED, time.time()))
    elapsed = time.time() - started
    # A new round is worth starting only if one trial's time still fits.
    left = spec.budget.timeout - elapsed
    if left < min(spec.trial.execution_timeout, spec.budget.timeout) * 0.5 or left <= 0:
        return f"study timeout near: {elapsed:.0f}s of {spec.budget.timeout}s used"
    return None


# --- observe ---------------------------------------------------------------------------------


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
    closed = []
    now = time.time()
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state not in (TrialState.RUNNING, TrialState.WAITING):
            continue
        trial_round = t.user_attrs.get(T_ROUND)
        if trial_round is None:
            continue
        reason = None
        if round_number is not None and trial_round <= round_number:
            map_index = t.user_attrs.get(T_MAP_INDEX)
            state = (task_states or {}).get(map_index) if map_index is not None else None
            reason = (
                f"worker ended without reporting a result (Airflow task state: {state})"
                if state
                else "worker ended without reporting a result (task failed, timed out or was killed)"
            )
        elif stale_after is not None:
            last = float(t.user_attrs.get("hpo.heartbeat", 0) or 0) or (
                t.datetime_start.timestamp() if t.datetime_start else now
            )
            if now - last > stale_after:
                reason = f"stale: no sign of life from its worker for {now - last:.0f}s"
        if reason is None:
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, FAIL_REASON, reason)
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError) as e:  # finished meanwhile by a late worker
            log.info("trial %d changed state while reconciling: %s", t.number, e)
            continue
        log.warning("trial %d closed as FAIL: %s", t.number, reason)
        closed.append(t.number)
    return closed


class RoundNotRun(TrialStateError):
    """The round has no trials (its ``suggest`` skipped it), so there is nothing to observe."""


@_flushed
def observe_round(
    *,
    deployment: Deployment,
    study_name: str,
    round_number: int,
    task_states: Mapping[int, str] | None = None,
    require_trials: bool = False,
) -> dict[str, Any]:
    """Reconcile the round, log its summary to the parent run, and decide whether to go on.

    Reads the study once. ``require_trials``: raise :class:`RoundNotRun`, and change nothing, when
    the round has no trials.
    """
    loaded = load_run(deployment.storage_url, study_name, round_number=round_number)
    study, spec, attrs, config = loaded.study, loaded.spec, loaded.attrs, loaded.config
    trials = study.get_trials(deepcopy=False)
    if require_trials and not any(t.user_attrs.get(T_ROUND) == round_number for t in _ours(trials, attrs)):
        raise RoundNotRun(f"round {round_number} did not run")
    closed = reconcile_trials(
        study,
        round_number=round_number,
        task_states=task_states,
        stale_after=spec.trial.stale_timeout,
        trials=trials,
    )
    if closed:
        trials = study.get_trials(deepcopy=False)
    ours = _ours(trials, attrs)
    tracker = _Tracker(deployment)
    # Runs of trials closed without their worker (here, or by a stale sweep) are still RUNNING.
    _fail_lost_runs(
        tracker,
        [t for t in ours if t.user_attrs.get(T_ROUND) == round_number and t.state == TrialState.FAIL],
    )
    counted = _counted(ours)
    round_trials = [t for t in counted if t.user_attrs.get(T_ROUND) == round_number]
    counts = _count(counted)
    direction = spec.all_directions[0]
    score_index = _score_index(spec)
    best = _best_value(counted, score_index, direction)
    round_best = _best_value(round_trials, score_index, direction)
    prefix = _prefix(attrs)
    previous = [attrs[f"{prefix}{k}"] for k in range(1, round_number) if f"{prefix}{k}" in attrs]
    summary: dict[str, Any] = {
        "round": round_number,
        "trials": [t.number for t in round_trials],
        "round_complete": sum(t.state == TrialState.COMPLETE for t in round_trials),
        "round_pruned": sum(t.state == TrialState.PRUNED for t in round_trials),
        "round_failed": sum(t.state == TrialState.FAIL for t in round_trials),
        "round_best": round_best,
        "best_value": best,
        "complete": counts.complete,
        "pruned": counts.pruned,
        "failed": counts.failed,
        "counted": counts.counted,
        "n_trials": config.n_trials,
        "reconciled": closed,
        "failures": {
            t.number: t.user_attrs.get(FAIL_REASON, "unknown")
            for t in round_trials
            if t.state == TrialState.FAIL
        },
    }
    summary["stop_reason"] = _stop_reason(spec, config, counts, best, previous, round_number)
    if summary["stop_reason"] is None:
        summary["stop_reason"] = _deadline(attrs, spec)
    already = attrs.get(f"{prefix}{round_number}")
    if already is not None and _same_summary(already, summary):
        # observe ran again (cleared or retried) and nothing changed: log and store nothing twice.
        summary["reconciled"] = already.get("reconciled", [])
        log.info("round %d summary unchanged since the last observe", round_number)
    else:
        study.set_user_attr(f"{prefix}{round_number}", summary)
        _log_round(tracker, attrs.get(ATTR_PARENT_RUN), summary)
    if summary["stop_reason"] and attrs.get(ATTR_STOP) != summary["stop_reason"]:
        study.set_user_attr(ATTR_STOP, summary["stop_reason"])
    log.info("round %d summary: %s", round_number, json.dumps(summary, default=str))
    return summary


class _Tracker:
    """The deployment's MLflow client, made on first use (a task that logs nothing never makes one)."""

    def __init__(self, deployment: Deployment, client: Any = None) -> None:
        self.deployment = deployment
        self._client: Any = client

    @property
    def client(self) -> Any:
        if self._client is None:
            from hpo_core import tracking

            self._client = tracking.client(self.deployment, set_uris=False)
        return self._client


def _same_summary(stored: Mapping[str, Any], summary: Mapping[str, Any]) -> bool:
    """Whether a stored round summary says the same as a new one (``reconciled`` aside)."""

    def norm(value: Mapping[str, Any]) -> str:
        data = json.loads(json.dumps(dict(value), default=str))
        data.pop("reconciled", None)
        return json.dumps(data, sort_keys=True)

    return norm(stored) == norm(summary)


def _fail_lost_runs(tracker: _Tracker, failed: list[FrozenTrial]) -> None:
    """Close the MLflow child runs that failed trials' lost workers left RUNNING, with the reason."""
    from hpo_core import tracking

    for t in failed:
        run_id = t.user_attrs.get(T_MLFLOW_RUN)
        if not run_id:
            continue
        reason = str(t.user_attrs.get(FAIL_REASON, "worker lost"))
        tracking.fail_trial_run(tracker.client, run_id, reason=reason, details=f"trial {t.number}: {reason}")


def _score_index(spec: StudySpec) -> int:
    if spec.pareto_choice is not None:
        return spec.objective_metrics.index(spec.pareto_choice.metric)
    return 0


def _best_value(trials: list[FrozenTrial], index: int, direction: str) -> float | None:
    values = [t.values[index] for t in trials if t.state == TrialState.COMPLETE and t.values]
    if not values:
        return None
    return max(values) if direction == "maximize" else min(values)


def _stop_reason(
    spec: StudySpec,
    config: RunConfig,
    counts: StudyCounts,
    best: float | None,
    previous: list[dict[str, Any]],
    round_number: int,
) -> str | None:
    if counts.counted >= config.n_trials:
        return f"budget spent: {counts.counted} of {config.n_trials} trials"
    direction = spec.all_directions[_score_index(spec)]
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


def _log_round(tracker: _Tracker, parent: str | None, summary: Mapping[str, Any]) -> None:
    """Round metrics (step = round) and ``rounds/round_NNN.json`` on the study's parent run."""
    if not parent:
        return
    from mlflow.entities import Metric

    step = int(summary["round"])
    metrics = {
        "best_value": summary["best_value"],
        "round_best": summary["round_best"],
        "n_complete": summary["complete"],
        "n_pruned": summary["pruned"],
        "n_failed": summary["failed"],
        "round_complete": summary["round_complete"],
        "round_pruned": summary["round_pruned"],
        "round_failed": summary["round_failed"],
    }
    ts = int(time.time() * 1000)
    client = tracker.client
    client.log_batch(
        parent,
        metrics=[Metric(key, float(v), ts, step) for key, v in metrics.items() if v is not None],
    )
    client.log_dict(parent, dict(summary), f"rounds/round_{step:03d}.json")


# --- finalize --------------------------------------------------------------------------------


def pick_best(study: optuna.Study, spec: StudySpec) -> FrozenTrial | None:
    """The best completed trial; with several objectives, the Pareto trial the spec's rule picks."""
    return _pick_best(study, spec, _our_trials(study))


def _pick_best(study: optuna.Study, spec: StudySpec, ours: list[FrozenTrial]) -> FrozenTrial | None:
    complete = [t for t in ours if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    if not spec.is_multi_objective:
        sign = 1.0 if spec.direction == "minimize" else -1.0
        return min(complete, key=lambda t: sign * float(t.values[0]))
    front_numbers = {t.number for t in study.best_trials}
    front = [t for t in complete if t.number in front_numbers] or complete
    choice = spec.pareto_choice
    assert choice is not None  # validated for multi-objective specs
    metrics = spec.objective_metrics
    if choice.weights:
        signs = [1.0 if d == "maximize" else -1.0 for d in spec.all_directions]

        def score(t: FrozenTrial) -> float:
            return sum(
                choice.weights.get(m, 0.0) * s * v  # type: ignore[union-attr]
                for m, s, v in zip(metrics, signs, t.values, strict=True)
            )

        return max(front, key=score)
    idx = metrics.index(choice.metric)
    sign = 1.0 if spec.all_directions[idx] == "maximize" else -1.0
    return max(front, key=lambda t: sign * t.values[idx])


@_flushed
def finalize_study(*, deployment: Deployment, study_name: str) -> dict[str, Any]:
    """Pick the best trial, register its model (alias ``challenger``) and close the parent run.

    Idempotent: a second call finds the version registered by the first.

    Raises:
        StudyOutcomeError: no trial completed, or the failed fraction is above the spec's limit
            (the parent run is closed as FAILED with the reason first).
    """
    loaded = load_run(deployment.storage_url, study_name)
    study, spec, attrs, config = loaded.study, loaded.spec, loaded.attrs, loaded.config
    trials = study.get_trials(deepcopy=False)
    closed = reconcile_trials(study, round_number=spec.budget.max_rounds, trials=trials)
    from hpo_core import registry, tracking

    # Registration and promotion use MLflow's process-wide URIs (mlflow.register_model, models:/).
    mlflow_client = tracking.client(deployment, set_uris=bool(spec.mlflow.registered_model))
    if closed:
        trials = study.get_trials(deepcopy=False)
        lost = set(closed)
        _fail_lost_runs(_Tracker(deployment, mlflow_client), [t for t in trials if t.number in lost])
    ours = _ours(trials, attrs)
    counts = _count(_counted(ours))
    best = _pick_best(study, spec, ours)
    parent = attrs.get(ATTR_PARENT_RUN)
    problem = None
    if best is None:
        problem = f"no trial completed ({counts.failed} failed, {counts.pruned} pruned of {counts.counted})"
    elif counts.failed_fraction > spec.stopping.max_failed_fraction:
        problem = (
            f"{counts.failed} of {counts.finished} trials failed ({counts.failed_fraction:.0%}), "
            f"above stopping.max_failed_fraction={spec.stopping.max_failed_fraction:.0%}"
        )
    if problem is not None:
        if parent:
            mlflow_client.set_tag(parent, "hpo.outcome", f"failed: {problem}")
            mlflow_client.set_terminated(parent, status="FAILED")
        raise StudyOutcomeError(f"study {study_name}: {problem}")
    assert best is not None
    result: dict[str, Any] = {
        "study_name": study_name,
        "best_trial": best.number,
        "best_values": dict(zip(spec.objective_metrics, best.values, strict=True)),
        "best_value": best.values[_score_index(spec)],
        "best_params": dict(best.params),
        "complete": counts.complete,
        "pruned": counts.pruned,
        "failed": counts.failed,
        "parent_run_id": parent,
        "model_version": None,
    }
    if spec.mlflow.registered_model:
        model_uri = best.user_attrs.get(T_MODEL_URI)
        if not model_uri:
            raise StudyOutcomeError(
                f"study {study_name}: best trial {best.number} logged no model; call ctx.log_model(...) "
                f"in the objective, or remove mlflow.registered_model from the study file"
            )
        version = registry.register_trial_model(
            mlflow_client,
            name=spec.mlflow.registered_model,
            model_uri=model_uri,
            tags=lineage_tags(study, spec, best, attrs=attrs),
        )
        result["model_version"] = version
        result["model_name"] = spec.mlflow.registered_model
        result["alias"] = registry.CHALLENGER
        from hpo_core import promotion

        decision = promotion.apply_rule(mlflow_client, spec, version=version, seed=config.seed or 0)
        result["promotion"] = decision.to_dict()
    if parent:
        from mlflow.entities import Metric, RunTag

        ts = int(time.time() * 1000)
        mlflow_client.log_batch(
            parent,
            metrics=[Metric(f"best.{k}", float(v), ts, 0) for k, v in result["best_values"].items()],
            tags=[
                RunTag("hpo.best_trial", str(best.number)),
                RunTag("hpo.best_params", json.dumps(best.params, sort_keys=True)),
                RunTag("hpo.outcome", "succeeded"),
            ],
        )
        mlflow_client.set_terminated(parent, status="FINISHED")
    log.info("study %s finalized: %s", study_name, json.dumps(result, default=str))
    return result


def _worker_image(spec: StudySpec, best: FrozenTrial) -> str | None:
    """The image the best trial ran in, when known: recorded by the trial, else the pod image."""
    if best.user_attrs.get("hpo.worker_image"):
        return str(best.user_attrs["hpo.worker_image"])
    if (os.environ.get("HPO_WORKER_BACKEND") or spec.worker.backend) != "kubernetes":
        return None
    return spec.worker.image or os.environ.get("HPO_WORKER_IMAGE") or None


def lineage_tags(
    study: optuna.Study, spec: StudySpec, best: FrozenTrial, *, attrs: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Tags that prove where a registered version came from (``attrs``: the study's, if just read)."""
    if attrs is None:
        attrs = study.user_attrs
    tags = {
        "hpo.study": study.study_name,
        "hpo.trial_number": str(best.number),
        "hpo.metric": spec.objective_metrics[_score_index(spec)],
        "hpo.value": repr(best.values[_score_index(spec)]),
        "hpo.values": json.dumps(dict(zip(spec.objective_metrics, best.values, strict=True))),
        "hpo.params": json.dumps(best.params, sort_keys=True),
        "hpo.dag_id": str(attrs.get(ATTR_DAG_ID)),
        "hpo.run_id": str(best.user_attrs.get("hpo.run_id") or attrs.get(ATTR_RUN_ID)),
        "hpo.mlflow_run_id": str(best.user_attrs.get(T_MLFLOW_RUN)),
    }
    for key, value in (best.user_attrs.get(T_LINEAGE) or {}).items():
        tags[f"hpo.{key}"] = str(value)
    image = _worker_image(spec, best)
    if image:
        tags["hpo.worker_image"] = image
    if best.user_attrs.get(warmstart.T_WARM_START):
        tags["hpo.warm_start"] = str(best.user_attrs[warmstart.T_WARM_START])
    return tags
