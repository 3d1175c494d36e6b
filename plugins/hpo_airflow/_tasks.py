"""Execute-time bodies of the study DAG's tasks: thin wrappers around :mod:`hpo_core.engine`.

Everything heavy (Optuna, MLflow, the storage) is imported inside the functions, so parsing a
DAG file stays cheap and opens no connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from hpo_airflow._settings import resolve_deployment
from hpo_core.errors import HpoError, StudyOutcomeError, StudySpecError
from hpo_core.spec import StudySpec

log = logging.getLogger(__name__)

#: Seconds Airflow waits beyond the worker's own trial timeouts before it kills the task.
TIMEOUT_GRACE = 60


def start(spec: StudySpec) -> dict[str, Any]:
    """Create or load the run's study (re-runs reuse it) and open the MLflow parent run.

    A run with a logical date (every scheduled run) gets a study named from that date; a manual
    run without one is named from its run id.
    """
    _skip_airflow_model_import()
    from hpo_core import engine

    context = get_current_context()
    dag_run = context["dag_run"]
    params = dict(context.get("params") or {})
    try:
        return engine.start_study(
            spec,
            deployment=resolve_deployment(),
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
            overrides=params,
            study_name=engine.study_name_for(spec, dag_run.run_id, logical_date=context.get("logical_date")),
        )
    except StudySpecError as e:
        raise AirflowFailException(str(e)) from e


def suggest(study: Mapping[str, Any], round_number: int) -> list[dict[str, Any]]:
    """Ask the batch of round ``round_number``; skip the round when it is not needed.

    Returns the batch split into slots (:func:`hpo_core.engine.batch_slots`), one per mapped
    evaluate task.
    """
    _skip_airflow_model_import()
    from hpo_core import engine

    context = get_current_context()
    dag_run = context["dag_run"]
    batch, reason = engine.suggest_batch(
        storage_url=resolve_deployment().storage_url,
        study_name=study["study_name"],
        round_number=round_number,
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
    )
    if not batch:
        raise AirflowSkipException(reason or "nothing to suggest")
    slots = engine.batch_slots(batch)
    for slot in slots:
        log.info("slot %d: %s", slot["slot"], ", ".join(t["label"] for t in slot["trials"]))
    return slots


def evaluate_local(
    slot: Mapping[str, Any], study: Mapping[str, Any], timeout: int, *, maximize: bool = False
) -> list[dict[str, Any]]:
    """Evaluate one slot's trials in this task process, a warm worker (see :func:`hpo_core.worker.run_slot`).

    The stack is already imported here; each trial's objective runs in a child forked from this
    process, so one trial's crash, hang or kill ends only that trial. The task fails when any of its
    trials failed, its log listing every trial's outcome; a retry evaluates only the unfinished ones.
    """
    _skip_airflow_model_import()
    from hpo_core import worker

    context = get_current_context()
    ti = context["ti"]
    deployment = resolve_deployment()
    numbers = [int(n) for n in slot["trial_numbers"]]
    log.info("evaluating %s (attempt %s): trials %s", slot["label"], ti.try_number, numbers)
    outcomes = worker.run_slot(
        deployment=deployment,
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
    if len(numbers) > 1:
        # Rendered again after the task ends: the grid shows how the slot went.
        context[SLOT_STATUS_KEY] = _slot_status(outcomes, maximize=maximize)  # type: ignore[literal-required]
    if len(numbers) == 1 and failed:
        raise AirflowException(f"{slot['label']} failed: {failed[0].reason}")
    if failed:
        what = "; ".join(f"trial {o.trial_number}: {o.reason}" for o in failed)
        raise AirflowException(f"{slot['label']}: {len(failed)} of {len(outcomes)} trials failed: {what}")
    return [{"trial_number": o.trial_number, "state": o.state, "values": o.values} for o in outcomes]


#: Context key the slot task sets for its name in the grid (see ``factory.SLOT_LABEL_TEMPLATE``).
SLOT_STATUS_KEY = "hpo_slot_status"


def _slot_status(outcomes: list[Any], *, maximize: bool) -> str:
    """`` · 3 done · 1 failed · best 0.993``: appended to a slot task's name once it ran."""
    done = sum(o.ok for o in outcomes)
    parts = [f"{done} done"]
    if len(outcomes) - done:
        parts.append(f"{len(outcomes) - done} failed")
    values = [o.values[0] for o in outcomes if o.state == "COMPLETE" and o.values]
    if values:
        parts.append(f"best {(max if maximize else min)(values):.4g}")
    return " · " + " · ".join(parts)


def _relay(line: str) -> None:
    log.info("%s", line)


def observe(study: Mapping[str, Any] | None, round_number: int) -> dict[str, Any]:
    """Reconcile the round's trials, log its summary, decide whether the next round runs."""
    _skip_airflow_model_import()
    from hpo_core import engine

    if not study:
        raise AirflowSkipException("the study was not started")
    context = get_current_context()
    dag_run = context["dag_run"]
    states = _evaluate_states(context, round_number)
    try:
        summary = engine.observe_round(
            deployment=resolve_deployment(),
            study_name=study["study_name"],
            round_number=round_number,
            task_states=states,
            require_trials=True,
        )
    except engine.RoundNotRun as e:
        raise AirflowSkipException(str(e)) from e
    for number, reason in summary["failures"].items():
        log.warning("trial %s failed: %s", number, reason)
    log.info(
        "round %d of %s: best so far %s, round best %s, %d complete / %d pruned / %d failed; %s",
        round_number,
        dag_run.run_id,
        summary["best_value"],
        summary["round_best"],
        summary["complete"],
        summary["pruned"],
        summary["failed"],
        f"stopping: {summary['stop_reason']}" if summary["stop_reason"] else "continuing",
    )
    return summary


def _evaluate_states(context: Any, round_number: int) -> dict[int, str]:
    """Final Airflow states of this round's mapped trial tasks, by map index."""
    task_id = f"round_{round_number}.evaluate"
    dag_run = context["dag_run"]
    try:
        found = context["ti"].get_task_states(
            dag_id=dag_run.dag_id, task_ids=[task_id], run_ids=[dag_run.run_id]
        )
    except Exception as e:  # only used to word the failure reason better
        log.info("task states unavailable: %s", e)
        return {}
    states: dict[int, str] = {}
    for key, state in (found.get(dag_run.run_id) or {}).items():
        prefix = f"{task_id}_"
        if key.startswith(prefix) and key[len(prefix) :].isdigit():
            states[int(key[len(prefix) :])] = str(state)
    return states


def finalize(study: Mapping[str, Any] | None) -> dict[str, Any]:
    """Pick the best trial, register its model, and decide the run's outcome."""
    _skip_airflow_model_import()
    from hpo_core import engine

    if not study:
        raise AirflowFailException("the study was not started: see the 'start' task's log")
    context = get_current_context()
    broken = _failed_control_tasks(context)
    try:
        result = engine.finalize_study(deployment=resolve_deployment(), study_name=study["study_name"])
    except StudyOutcomeError as e:
        raise AirflowFailException(str(e)) from e
    except HpoError as e:
        raise AirflowFailException(f"finalize failed: {e}") from e
    if broken:
        raise AirflowFailException(
            f"the study produced a result ({json.dumps(result, default=str)}) but these tasks failed: "
            f"{', '.join(broken)}; see their logs"
        )
    log.info(
        "best trial %s: %s=%s params=%s; model %s version %s (alias %s)",
        result["best_trial"],
        next(iter(result["best_values"])),
        result["best_value"],
        json.dumps(result["best_params"]),
        result.get("model_name"),
        result.get("model_version"),
        result.get("alias"),
    )
    return result


def _failed_control_tasks(context: Any) -> list[str]:
    """Start / suggest / observe tasks that failed: the run must fail even if finalize works."""
    dag_run = context["dag_run"]
    try:
        found = context["ti"].get_task_states(dag_id=dag_run.dag_id, run_ids=[dag_run.run_id])
    except Exception as e:
        log.info("task states unavailable: %s", e)
        return []
    return sorted(
        key
        for key, state in (found.get(dag_run.run_id) or {}).items()
        if state in ("failed", "upstream_failed") and ".evaluate" not in key and key != "finalize"
    )


def _skip_airflow_model_import() -> None:
    """Disarm Airflow's hook that imports all of its ORM models at the first SQLAlchemy mapper setup.

    Airflow installs it (``airflow.utils.orm_event_handlers``) for processes that use its metadata
    database. A task process does not (Airflow 3 tasks talk to the API server), but the Optuna
    storage and MLflow's SQL stores are SQLAlchemy ORMs too: the first query of a fresh task process
    would spend about a second importing some hundred Airflow models it never uses. Where Airflow's
    models are already set up (a scheduler-forked task process, ``dag.test()``), the hook has
    run and removing it changes nothing.
    """
    try:
        from airflow.models import import_all_models
        from sqlalchemy import event
        from sqlalchemy.orm import Mapper
    except ImportError:
        return
    try:
        if event.contains(Mapper, "before_configured", import_all_models):
            event.remove(Mapper, "before_configured", import_all_models)
    except Exception as e:  # an optimisation only
        log.debug("Airflow's model import hook stays: %r", e)
