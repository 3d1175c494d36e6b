"""Translate a :class:`~hpo_core.spec.StudySpec` into an Airflow DAG: the one place that does.

Shape (fixed at parse time, from the spec)::

    start ─► round_1 ─► round_2 ─► … ─► round_R ─► finalize
              └─ suggest ─► evaluate[0..S-1] (mapped: one slot of k trials each) ─► observe
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, CronTriggerTimetable, Param, TaskGroup, task
from airflow.sdk import TriggerRule as TR
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import AirflowTimetableInvalid, ParamValidationError

from hpo_airflow import alerts, callbacks, tasks
from hpo_airflow.backends import backend_for
from hpo_airflow.links import finalize_task
from hpo_core import checks
from hpo_core.errors import StudySpecError
from hpo_core.spec import SEED_MAX, SamplerSpec, StudySpec
from hpo_core.study.config import RunConfig, run_bounds

__all__ = ["build_study_dag", "check_study", "study_params"]

#: Scheduled studies start counting from here; catch-up is off, so no backfill storm.
START_DATE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
#: Retries of the control tasks (start, suggest, observe, finalize) and the delay between them.
CONTROL_TASK_RETRIES = 1
CONTROL_TASK_RETRY_DELAY = 5
#: Seconds Airflow waits beyond the worker's own trial timeouts before it kills a slot task.
TIMEOUT_GRACE = 60


def study_params(spec: StudySpec) -> dict[str, Param]:
    """The trigger form: runtime overrides with JSON-schema bounds (``run_bounds`` of the run config)."""
    bounds = run_bounds(spec)
    max_trials = bounds["n_trials"][1]
    limit = bounds["batch_size"][1]
    per_task_limit = bounds["trials_per_task"][1]
    return {
        "n_trials": Param(
            spec.budget.n_trials,
            type="integer",
            minimum=1,
            maximum=max_trials,
            title="Trials",
            description=(
                f"Trials in this run (at most max_rounds x max_batch_size = {max_trials}); the batch "
                "size is raised when the trials would not fit in max_rounds otherwise."
            ),
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
            maximum=SEED_MAX,
            title="Seed",
            description="Sampler seed; empty for a random one.",
        ),
        "sampler_options": Param(
            {},
            type="object",
            title="Sampler options",
            description="Overrides of the spec's sampler options.",
            properties=SamplerSpec.trigger_options(),
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
    """Build the study's DAG. Pure: no database or network access.

    Raises:
        StudySpecError: the study asks for something only Airflow's side can refuse (a schedule
            Airflow cannot parse, an unknown worker backend); the message names the file.
    """
    # Checked before the DAG exists: a DAG built in a ``with`` block is collected by Airflow even
    # when the loader then refuses it.
    check_study(spec, source=source)
    backend = backend_for(spec, source=source)
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
        # A run that fails without finalize (dagrun_timeout) must not leave its MLflow run RUNNING.
        on_failure_callback=callbacks.on_run_failed(spec),
        tags=["hpo", *spec.tags],
        params=study_params(spec),
        default_args=default_args,
        doc_md=_doc(spec, source),
    ) as dag:
        # XComArgs stand in for the values the tasks receive at run time.
        start: Any = task(task_id="start")(tasks.start)(spec, worker_image=backend.worker_image(spec))
        previous: Any = start
        for k in range(1, spec.budget.max_rounds + 1):
            with TaskGroup(group_id=f"round_{k}", tooltip=f"round {k}: suggest, evaluate, observe") as group:
                batch = task(task_id="suggest")(tasks.suggest)(start, k)
                evaluated = backend.map_slots(
                    spec, common=_slot_task_settings(spec), start=start, batch=batch
                )
                observed = task(task_id="observe", trigger_rule=TR.ALL_DONE)(tasks.observe)(start, k)
                evaluated >> observed
            previous >> group
            previous = group
        # finalize carries the "Study" and "Registered model" extra links.
        finalize = finalize_task(task_id="finalize", trigger_rule=TR.ALL_DONE)(tasks.finalize)(start)
        previous >> finalize
    return dag


def check_study(spec: StudySpec, *, source: str | Path | None = None) -> None:
    """Every check this factory runs before it builds a study's DAG; ``hpo validate`` runs the same.

    Beyond the spec's schema: :func:`hpo_core.checks.check_study` (the trigger defaults, a model to
    register), the schedule as Airflow parses it, the worker backend and its own checks (a pod for
    Kubernetes), and the trigger form: its defaults pass their JSON schema and make a run.

    Raises:
        StudySpecError: naming ``source`` (the file), the field, the value and the fix.
    """
    where = source or spec.dag_id
    checks.check_study(spec, source=where)
    _check_schedule(spec, source)
    backend_for(spec, source=source).check(spec, source=where)
    form = ParamsDict(study_params(spec))
    try:
        values = form.validate()
    except ParamValidationError as e:
        raise StudySpecError(
            f"{where}: the trigger form's defaults (from the study file) are invalid: {e}"
        ) from e
    try:
        RunConfig.resolve(spec, values)
    except StudySpecError as e:
        raise StudySpecError(f"{where}: the trigger form's defaults do not make a run: {e}") from e


def _check_schedule(spec: StudySpec, source: Path | str | None) -> None:
    """A bad cron expression is this study's error, naming its file, not the whole DAG file's."""
    if spec.schedule is None or spec.schedule in ("@once", "@continuous"):
        return
    try:
        CronTriggerTimetable(spec.schedule, timezone="UTC").validate()
    except AirflowTimetableInvalid as e:
        raise StudySpecError(
            f"{source or spec.dag_id}: schedule: {spec.schedule!r} is not a cron expression or preset "
            f"({e}); use e.g. '0 3 * * *', '@daily' or null"
        ) from e


def _slot_task_settings(spec: StudySpec) -> dict[str, Any]:
    """Settings every backend's mapped slot task gets: retries, the timeout backstop, pool and concurrency.

    The Airflow ``execution_timeout`` is a backstop for the worker, which times out each trial
    itself: it covers the most trials a slot may hold (``trials_per_task``, overridable up to the
    largest batch) plus a grace period.
    """
    per_task = run_bounds(spec)["trials_per_task"][1]
    common: dict[str, Any] = {
        "task_id": "evaluate",
        "retries": spec.trial.retries,
        "retry_delay": dt.timedelta(seconds=spec.trial.retry_delay),
        "execution_timeout": dt.timedelta(seconds=per_task * spec.trial.execution_timeout + TIMEOUT_GRACE),
    }
    if spec.worker.pool:
        common["pool"] = spec.worker.pool
    if spec.worker.max_active_trials:
        # A slot runs one trial at a time: trials at once = slot tasks at once, whatever k is.
        common["max_active_tis_per_dagrun"] = spec.worker.max_active_trials
    return common
