"""Execute-time bodies of the study DAG's control tasks: thin wrappers around :mod:`hpo_core.study`.

The study lifecycle (and with it Optuna, MLflow and the storage) is imported inside the functions,
so parsing a DAG file stays cheap and opens no connection (ruff's TID253 list in pyproject.toml
names the modules that must never be imported when a DAG file is parsed). Slot tasks are the
worker backends' (:mod:`hpo_airflow.backends`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from hpo_airflow.settings import prepare_task_process, resolve_deployment
from hpo_core.errors import HpoError, StudyOutcomeError, StudySpecError, TrackingError
from hpo_core.payloads import FinalizeResult, RoundSummary, SlotPayload, StudyHandle
from hpo_core.spec import StudySpec
from hpo_core.study.config import slot_task_id, study_name_for

__all__ = ["finalize", "observe", "start", "suggest"]

log = logging.getLogger(__name__)


def start(spec: StudySpec, worker_image: str | None = None) -> StudyHandle:
    """Create or load the run's study (re-runs reuse it) and open the MLflow parent run.

    A run with a logical date (every scheduled run) gets a study named from that date; a manual
    run without one is named from its run id. ``worker_image``: the image the worker backend runs
    the trials in (recorded for the registered model's lineage).
    """
    prepare_task_process()
    from hpo_core.study.start import start_study

    context = get_current_context()
    dag_run = context["dag_run"]
    params = dict(context.get("params") or {})
    try:
        return start_study(
            spec,
            deployment=resolve_deployment(),
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
            overrides=params,
            study_name=study_name_for(spec, dag_run.run_id, logical_date=context.get("logical_date")),
            worker_image=worker_image,
        )
    except StudySpecError as e:
        raise AirflowFailException(str(e)) from e


def suggest(study: StudyHandle, round_number: int) -> list[SlotPayload]:
    """Ask the batch of round ``round_number``; skip the round when it is not needed.

    Returns the batch split into slots (:func:`hpo_core.study.suggest.batch_slots`), one per mapped
    evaluate task.
    """
    prepare_task_process()
    from hpo_core.study.suggest import batch_slots, suggest_batch

    context = get_current_context()
    dag_run = context["dag_run"]
    batch, reason = suggest_batch(
        deployment=resolve_deployment(),
        study_name=study["study_name"],
        round_number=round_number,
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
    )
    if not batch:
        raise AirflowSkipException(reason or "nothing to suggest")
    slots = batch_slots(batch)
    for slot in slots:
        log.info("slot %d: %s", slot["slot"], ", ".join(t["label"] for t in slot["trials"]))
    return slots


def observe(study: StudyHandle | None, round_number: int) -> RoundSummary:
    """Reconcile the round's trials, log its summary, decide whether the next round runs."""
    prepare_task_process()
    from hpo_core.study.observe import RoundNotRun, observe_round

    if not study:
        raise AirflowSkipException("the study was not started")
    context = get_current_context()
    dag_run = context["dag_run"]
    states = _evaluate_states(context, round_number)
    try:
        summary = observe_round(
            deployment=resolve_deployment(),
            study_name=study["study_name"],
            round_number=round_number,
            task_states=states,
            require_trials=True,
        )
    except RoundNotRun as e:
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
    task_id = slot_task_id(round_number)
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


def finalize(study: StudyHandle | None) -> FinalizeResult:
    """Pick the best trial, register its model, and decide the run's outcome."""
    prepare_task_process()
    from hpo_core.study.finalize import finalize_study

    if not study:
        raise AirflowFailException("the study was not started: see the 'start' task's log")
    context = get_current_context()
    broken = _failed_control_tasks(context)
    try:
        result = finalize_study(deployment=resolve_deployment(), study_name=study["study_name"])
    except StudyOutcomeError as e:
        raise AirflowFailException(str(e)) from e
    except TrackingError as e:  # MLflow is down: the task's retry (or a clear) finishes the job
        raise AirflowException(f"finalize failed: {e}") from e
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
        result["best_metric"],
        result["best_value"],
        json.dumps(result["best_params"]),
        result.get("model_name"),
        result.get("model_version"),
        result.get("alias"),
    )
    return result


def _failed_control_tasks(context: Any) -> list[str]:
    """Start / suggest / observe tasks that failed: the run must fail even if finalize works.

    Raises:
        AirflowException: the task states cannot be read; finalize fails (and is retried) rather
            than report a success it cannot vouch for.
    """
    dag_run = context["dag_run"]
    try:
        found = context["ti"].get_task_states(dag_id=dag_run.dag_id, run_ids=[dag_run.run_id])
    except Exception as e:
        raise AirflowException(
            f"cannot tell whether this run's start, suggest and observe tasks succeeded (task states "
            f"unavailable: {type(e).__name__}: {e}); finalize fails rather than report a success"
        ) from e
    return sorted(
        key
        for key, state in (found.get(dag_run.run_id) or {}).items()
        if state in ("failed", "upstream_failed") and ".evaluate" not in key and key != "finalize"
    )
