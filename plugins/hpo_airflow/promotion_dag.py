"""The ``hpo_promote_model`` DAG: a person promotes a model version, or rolls back, from the UI.

The trigger form asks for the registered model, a version number (or ``rollback``) and a
reason; the task records who triggered it (the run's triggering user) and why on the model
version, exactly as ``hpo promote`` / ``hpo rollback`` do.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from hpo_airflow.factory import START_DATE
from hpo_airflow.settings import resolve_deployment
from hpo_core.errors import PromotionError

__all__ = ["PROMOTION_DAG_ID", "ROLLBACK", "build_promotion_dag", "promote_or_rollback"]

log = logging.getLogger(__name__)

PROMOTION_DAG_ID = "hpo_promote_model"
ROLLBACK = "rollback"
_DEFAULT_ACTOR = "airflow"

_DOC = """\
### Promote a model version, or roll back

Trigger with a **model name**, a **version** number (it becomes `champion`; the current champion
keeps the alias `previous_champion`) or `rollback` (champion goes back to `previous_champion`),
and a **reason**. Who triggered the run and why are written on the model version.
"""


def promotion_params() -> dict[str, Param]:
    """The trigger form (no defaults: a person fills every field)."""
    return {
        "model_name": Param(
            type="string",
            minLength=1,
            maxLength=200,
            title="Registered model",
            description="Name of the MLflow registered model (mlflow.registered_model of the study).",
        ),
        "version": Param(
            type="string",
            pattern=r"^([1-9][0-9]*|rollback)$",
            title="Version",
            description="Version number to make champion, or 'rollback' to return to previous_champion.",
        ),
        "reason": Param(
            type="string",
            minLength=3,
            maxLength=2000,
            title="Reason",
            description="Why; recorded on the model version with your user name.",
        ),
    }


def promote_or_rollback(model_name: str, version: str, reason: str, actor: str) -> dict[str, Any]:
    """Carry out the request against the registry; a refused request fails the task, changing nothing."""
    from hpo_core.tracking import promotion

    deployment = resolve_deployment()
    try:
        if version.strip().lower() == ROLLBACK:
            result = promotion.rollback(model_name, actor=actor, reason=reason, deployment=deployment)
        else:
            result = promotion.promote(model_name, version, actor=actor, reason=reason, deployment=deployment)
    except PromotionError as e:
        raise AirflowFailException(str(e)) from e
    log.info("%s", json.dumps(result.to_dict()))
    return result.to_dict()


def build_promotion_dag() -> DAG:
    """Build the manual promotion DAG. Pure: no database or network access."""
    with DAG(
        dag_id=PROMOTION_DAG_ID,
        description="Promote a registered model version to champion, or roll back",
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=["hpo", "promotion"],
        params=promotion_params(),
        default_args={"owner": "airflow", "retries": 0},
        doc_md=_DOC,
    ) as dag:

        @task(task_id="promote")
        def promote() -> dict[str, Any]:
            """Promote or roll back as the trigger form asks, recording who and why."""
            context = get_current_context()
            params = context["params"]
            dag_run = context["dag_run"]
            actor = getattr(dag_run, "triggering_user_name", None) or _DEFAULT_ACTOR
            return promote_or_rollback(
                str(params["model_name"]), str(params["version"]), str(params["reason"]), actor
            )

        promote()
    return dag
