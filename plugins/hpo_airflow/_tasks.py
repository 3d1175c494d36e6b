"""Execute-time bodies of the study DAG's tasks: thin wrappers around :mod:`hpo_core.engine`.

Everything heavy (Optuna, MLflow, the storage) is imported inside the functions, so parsing a
DAG file stays cheap and opens no connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from hpo_airflow._settings import resolve_deployment
from hpo_core.errors import HpoError, StudyOutcomeError, StudySpecError
from hpo_core.launch import worker_arguments
from hpo_core.spec import StudySpec

log = logging.getLogger(__name__)

#: Seconds Airflow waits beyond the worker's own trial timeout before it kills the task.
TIMEOUT_GRACE = 60
_TERM_GRACE = 10


def start(spec: StudySpec) -> dict[str, Any]:
    """Create or load the run's study (re-runs reuse it) and open the MLflow parent run.

    A run with a logical date (every scheduled run) gets a study named from that date; a manual
    run without one is named from its run id.
    """
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


def evaluate_local(trial: Mapping[str, Any], study: Mapping[str, Any], timeout: int) -> dict[str, Any]:
    """Run the worker command for one trial as a local subprocess and stream its log."""
    context = get_current_context()
    ti = context["ti"]
    deployment = resolve_deployment()
    cmd = [
        sys.executable,
        "-m",
        "hpo_core.worker",
        *worker_arguments(
            study_name=study["study_name"],
            trial_number=trial["trial_number"],
            attempt=ti.try_number,
            timeout=timeout,
        ),
    ]
    env = {**os.environ, **deployment.worker_env(), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    log.info("evaluating %s (attempt %s)", trial["label"], ti.try_number)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    outcome: dict[str, Any] = {}
    # Airflow stops a task whose run timed out or whose state was changed from outside with SIGTERM
    # (then SIGKILL): pass it on, so the worker, in a session of its own, records why it stopped.
    previous = signal.getsignal(signal.SIGTERM)

    def forward_sigterm(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        if callable(previous):
            previous(signum, frame)

    forwarding = previous is not None and threading.current_thread() is threading.main_thread()
    if forwarding:
        signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if line.startswith("HPO_RESULT "):
                outcome = json.loads(line.removeprefix("HPO_RESULT "))
            log.info("%s", line)
        code = proc.wait()
    except BaseException:
        # Task timeout or kill: stop the worker so it records why, then let Airflow handle it.
        _terminate(proc)
        raise
    finally:
        if forwarding:
            signal.signal(signal.SIGTERM, previous)
    if code != 0:
        reason = outcome.get("reason") or _exit_reason(code)
        raise AirflowException(f"{trial['label']} failed: {reason}")
    return {
        "trial_number": outcome.get("trial_number"),
        "state": outcome.get("state"),
        "values": outcome.get("values"),
    }


def _exit_reason(code: int) -> str:
    """Why a worker ended without a result, from its exit code."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the worker was killed by {name} before it reported a result"
    if code == 2:
        return "the worker could not start the trial (exit code 2); see its error above"
    return f"the worker exited with code {code} without reporting a result"


def _terminate(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=_TERM_GRACE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def observe(study: Mapping[str, Any] | None, round_number: int) -> dict[str, Any]:
    """Reconcile the round's trials, log its summary, decide whether the next round runs."""
    from hpo_core import engine

    if not study:
        raise AirflowSkipException("the study was not started")
    context = get_current_context()
    dag_run = context["dag_run"]
    states = _evaluate_states(context, round_number)
    deployment = resolve_deployment()
    storage_study, _ = engine.load_study(deployment.storage_url, study["study_name"])
    if not engine.trials_of_round(storage_study, round_number):
        raise AirflowSkipException(f"round {round_number} did not run")
    summary = engine.observe_round(
        deployment=deployment,
        study_name=study["study_name"],
        round_number=round_number,
        task_states=states,
    )
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
