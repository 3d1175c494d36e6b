"""Translate a :class:`~hpo_core.spec.StudySpec` into an Airflow DAG: the one place that does.

Shape (fixed at parse time, from the spec)::

    start ─► round_1 ─► round_2 ─► … ─► round_R ─► finalize
              └─ suggest ─► evaluate[0..S-1] (mapped: one slot of k trials each) ─► observe
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param, TaskGroup, task
from airflow.sdk import TriggerRule as TR

from hpo_airflow import _tasks, alerts, kubernetes
from hpo_core.errors import StudySpecError
from hpo_core.spec import StudySpec

__all__ = ["build_study_dag", "study_params"]

#: Scheduled studies start counting from here; catch-up is off, so no backfill storm.
START_DATE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
#: Retries of the control tasks (start, suggest, observe, finalize) and the delay between them.
CONTROL_TASK_RETRIES = 1
CONTROL_TASK_RETRY_DELAY = 5
#: Names a mapped slot task after its trials. Rendered from the task's own argument, so the name
#: is there before the task runs and stays when it is killed or times out; a slot of several
#: trials adds how they went once it ends (`` · 3 done · best 0.993``).
SLOT_LABEL_TEMPLATE = (
    "{{ task.op_kwargs['slot']['label'] }}{{ " + _tasks.SLOT_STATUS_KEY + " | default('') }}"
)


def study_params(spec: StudySpec) -> dict[str, Param]:
    """The trigger form: runtime overrides with JSON-schema bounds from the spec."""
    limit = spec.budget.batch_size_limit
    max_trials = spec.budget.max_rounds * limit
    per_task_limit = spec.trials_per_task_limit
    return {
        "n_trials": Param(
            spec.budget.n_trials,
            type="integer",
            minimum=1,
            maximum=max_trials,
            title="Trials",
            description=f"Trials in this run (at most max_rounds x max_batch_size = {max_trials}).",
        ),
        "batch_size": Param(
            spec.budget.batch_size,
            type="integer",
            minimum=1,
            maximum=limit,
            title="Batch size",
            description=f"Trials evaluated in parallel per round (1..{limit}).",
        ),
        "trials_per_task": Param(
            spec.worker.trials_per_task,
            type="integer",
            minimum=1,
            maximum=per_task_limit,
            title="Trials per task",
            description=(
                "Trials one mapped evaluate task (one warm worker, one pod) runs in sequence; a round "
                f"of B trials runs as ceil(B / this) tasks in parallel (1..{per_task_limit})."
            ),
        ),
        "seed": Param(
            spec.sampler.seed,
            type=["null", "integer"],
            minimum=0,
            title="Seed",
            description="Sampler seed; empty for a random one.",
        ),
        "sampler_options": Param(
            {},
            type="object",
            title="Sampler options",
            description="Overrides of the spec's sampler options.",
            properties={
                "multivariate": {"type": "boolean"},
                "constant_liar": {"type": "boolean"},
                "n_startup_trials": {"type": "integer", "minimum": 0, "maximum": 10_000},
                "population_size": {"type": "integer", "minimum": 2, "maximum": 10_000},
            },
            additionalProperties=False,
        ),
    }


def _doc(spec: StudySpec, source: Path | None) -> str:
    space = ", ".join(sorted(spec.search_space)) if spec.search_space else f"`{spec.space_function}`"
    return (
        f"### Study `{spec.name}`\n\n{spec.description}\n\n"
        f"* objective: `{spec.objective}` ({', '.join(spec.all_directions)} "
        f"{', '.join(spec.objective_metrics)})\n"
        f"* search space: {space}\n* sampler: {spec.sampler.type}\n"
        f"* budget: {spec.budget.n_trials} trials, batches of {spec.budget.batch_size}, "
        f"{spec.budget.max_rounds} rounds\n"
        f"* MLflow experiment `{spec.mlflow.experiment}`, model `{spec.mlflow.registered_model}`\n"
        + (f"* defined in `{source}`\n" if source else "")
    )


def build_study_dag(spec: StudySpec, *, source: Path | None = None) -> DAG:
    """Build the study's DAG. Pure: no database or network access."""
    _check_schedule(spec, source)
    # start / suggest / observe / finalize are idempotent: one retry rides out a lost worker or a
    # dropped database connection. Trial tasks take their retries from the spec.
    default_args: dict[str, Any] = {
        "owner": spec.owner,
        "retries": CONTROL_TASK_RETRIES,
        "retry_delay": dt.timedelta(seconds=CONTROL_TASK_RETRY_DELAY),
    }
    timeout = dt.timedelta(seconds=spec.budget.timeout) if spec.budget.timeout else None
    with DAG(
        dag_id=spec.dag_id,
        description=(spec.description or f"HPO study {spec.name}")[:200],
        schedule=spec.schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        dagrun_timeout=timeout,
        deadline=alerts.deadline_alert(spec),
        tags=["hpo", *spec.tags],
        params=study_params(spec),
        default_args=default_args,
        doc_md=_doc(spec, source),
    ) as dag:
        # XComArgs stand in for the values the tasks receive at run time.
        start: Any = task(task_id="start")(_tasks.start)(spec)
        previous: Any = start
        for k in range(1, spec.budget.max_rounds + 1):
            with TaskGroup(group_id=f"round_{k}", tooltip=f"round {k}: suggest, evaluate, observe") as group:
                batch = task(task_id="suggest")(_tasks.suggest)(start, k)
                evaluated = _evaluate(spec, start, batch)
                observed = task(task_id="observe", trigger_rule=TR.ALL_DONE)(_tasks.observe)(start, k)
                evaluated >> observed
            previous >> group
            previous = group
        finalize = task(task_id="finalize", trigger_rule=TR.ALL_DONE)(_tasks.finalize)(start)
        previous >> finalize
    return dag


def _check_schedule(spec: StudySpec, source: Path | None) -> None:
    """A bad cron expression is this study's error, naming its file, not the whole DAG file's.

    Checked before the DAG exists: a DAG built in a ``with`` block is collected by Airflow even
    when the loader then refuses it.
    """
    if spec.schedule is None or spec.schedule in ("@once", "@continuous"):
        return
    from airflow.sdk import CronTriggerTimetable
    from airflow.sdk.exceptions import AirflowTimetableInvalid

    try:
        CronTriggerTimetable(spec.schedule, timezone="UTC").validate()
    except AirflowTimetableInvalid as e:
        raise StudySpecError(
            f"{source or spec.dag_id}: schedule: {spec.schedule!r} is not a cron expression or preset "
            f"({e}); use e.g. '0 3 * * *', '@daily' or null"
        ) from e


def _evaluate(spec: StudySpec, start: Any, batch: Any) -> Any:
    """The round's mapped slot tasks, one per slot of ``suggest``'s batch, on the study's backend.

    The Airflow ``execution_timeout`` is a backstop for the worker, which times out each trial
    itself: it covers the most trials a slot may hold (``trials_per_task``, overridable up to the
    largest batch) plus a grace period.
    """
    trial_timeout = spec.trial.execution_timeout
    per_task = spec.trials_per_task_limit
    common: dict[str, Any] = {
        "task_id": "evaluate",
        "retries": spec.trial.retries,
        "retry_delay": dt.timedelta(seconds=spec.trial.retry_delay),
        "execution_timeout": dt.timedelta(seconds=per_task * trial_timeout + _tasks.TIMEOUT_GRACE),
    }
    if spec.worker.pool:
        common["pool"] = spec.worker.pool
    if spec.worker.max_active_trials:
        # A slot runs one trial at a time: trials at once = slot tasks at once, whatever k is.
        common["max_active_tis_per_dagrun"] = spec.worker.max_active_trials

    if kubernetes.backend_for(spec) == "kubernetes":
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        label = f"{{{{ task.annotations['{kubernetes.SLOT_LABEL_ANNOTATION}'] }}}}"
        return KubernetesPodOperator.partial(
            **common, map_index_template=label, **kubernetes.trial_pod_settings(spec)
        ).expand_kwargs(batch.map(kubernetes.slot_pod_overrides))

    maximize = spec.all_directions[0] == "maximize"

    def evaluate(slot: dict[str, Any], study: dict[str, Any]) -> list[dict[str, Any]]:
        return _tasks.evaluate_local(slot, study, trial_timeout, maximize=maximize)

    evaluate.__doc__ = "Evaluate one slot of the round's trials in a warm local worker."
    return (
        task(**common, map_index_template=SLOT_LABEL_TEMPLATE)(evaluate)
        .partial(study=start)
        .expand(slot=batch)
    )
