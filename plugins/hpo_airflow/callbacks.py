"""What runs when a study's DAG run fails without ``finalize``: its MLflow parent run is closed FAILED.

``dagrun_timeout`` (the spec's ``budget.timeout``) fails a run and skips its unfinished tasks, so
``finalize`` never closes the parent run, which would stay RUNNING forever. Airflow 3 calls a DAG's
``on_failure_callback`` for every failed run; the DAG processor runs it (it parses the DAG file again
in a child process), so the locations come from the environment or Airflow Connections there, as in
a task (:func:`hpo_airflow.settings.resolve_deployment`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from hpo_airflow.settings import resolve_deployment
from hpo_core.errors import HpoError
from hpo_core.spec import StudySpec
from hpo_core.study.config import study_name_for

__all__ = ["close_parent_run", "on_run_failed"]

log = logging.getLogger(__name__)


def on_run_failed(spec: StudySpec) -> Callable[[Mapping[str, Any]], None]:
    """The study DAG's ``on_failure_callback``."""

    def callback(context: Mapping[str, Any]) -> None:
        close_parent_run(spec, context)

    return callback


def close_parent_run(spec: StudySpec, context: Mapping[str, Any]) -> bool:
    """Close the failed DAG run's MLflow parent run as FAILED with the reason, unless finalize did.

    Returns:
        Whether it was closed here (an error is logged, never raised: Airflow only logs it too).
    """
    from hpo_core.study.finalize import close_unfinalized_run

    run_id = str(context.get("run_id") or "")
    if not run_id:
        log.error("failure callback without a run id: nothing to close")
        return False
    study_name = study_name_for(spec, run_id, logical_date=context.get("logical_date"))
    reason = failure_reason(spec, str(context.get("reason") or ""))
    try:
        return close_unfinalized_run(
            deployment=resolve_deployment(), study_name=study_name, run_id=run_id, reason=reason
        )
    except HpoError as e:
        log.error("study %s: its MLflow parent run could not be closed: %s", study_name, e)
        return False


def failure_reason(spec: StudySpec, airflow_reason: str) -> str:
    """Why the run failed, in words, for the parent run's ``hpo.outcome`` tag."""
    if airflow_reason == "timed_out":
        return (
            f"the DAG run timed out: budget.timeout ({spec.budget.timeout}s, the DAG's dagrun_timeout) "
            "passed before finalize ran; its unfinished tasks were stopped"
        )
    return f"the DAG run failed ({airflow_reason or 'no reason given'}) before finalize closed this run"
