"""Links from MLflow back to Airflow: the DAG run and the trial's task instance, as run tags.

The Airflow UI's address comes from the environment (:func:`hpo_core.deployment.airflow_url`:
``HPO_AIRFLOW_URL``, else Airflow's own ``AIRFLOW__API__BASE_URL``; the local Airflow and the compose
stack set the latter, a trial pod gets the former from the kubernetes backend), with any credential
stripped. Without it the tags still name the DAG, run, task, map index and try. Plain strings: no
Airflow import (trial workers run without Airflow).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from hpo_core.deployment import airflow_url
from hpo_core.keys import Tag, TrialAttr
from hpo_core.study.config import slot_task_id

__all__ = ["dag_run_url", "parent_run_tags", "task_instance_url", "trial_run_tags"]


def dag_run_url(base: str, dag_id: str, run_id: str) -> str:
    """The DAG run's page (grid) in the Airflow UI served at ``base``."""
    return f"{base}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def task_instance_url(base: str, dag_id: str, run_id: str, task_id: str, map_index: int | None) -> str:
    """A task instance's page in the Airflow UI (a mapped one by its map index)."""
    url = f"{dag_run_url(base, dag_id, run_id)}/tasks/{quote(task_id, safe='')}"
    return url if map_index is None or map_index < 0 else f"{url}/mapped/{int(map_index)}"


def parent_run_tags(
    dag_id: str, run_id: str, *, description: str = "", env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Tags of the study's parent run: its note (the study's description, then a link to the DAG
    run, which MLflow renders as Markdown) and the DAG run's URL."""
    base = airflow_url(env)
    if base is None:
        return {Tag.NOTE: description}
    url = dag_run_url(base, dag_id, run_id)
    note = f"{description}\n\nAirflow DAG run: [{dag_id} / {run_id}]({url})".lstrip()
    return {Tag.DAG_RUN_URL: url, Tag.NOTE: note}


def trial_run_tags(
    trial_attrs: Mapping[str, Any], *, attempt: int, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Tags of a trial attempt's child run naming (and, with the UI's address, linking) its task instance.

    ``trial_attrs``: the trial's user attributes, where ``suggest`` recorded its DAG, run, round and
    map index; ``attempt``: the Airflow try number of the slot task. Nothing when the trial was not
    suggested by a DAG run.
    """
    dag_id, run_id = trial_attrs.get(TrialAttr.DAG_ID), trial_attrs.get(TrialAttr.RUN_ID)
    round_number, map_index = trial_attrs.get(TrialAttr.ROUND), trial_attrs.get(TrialAttr.MAP_INDEX)
    if not dag_id or not run_id or round_number is None:
        return {}
    task_id = slot_task_id(int(round_number))
    tags = {
        Tag.DAG_ID: str(dag_id),
        Tag.RUN_ID: str(run_id),
        Tag.TASK_ID: task_id,
        Tag.TRY_NUMBER: str(attempt),
    }
    if map_index is not None:
        tags[Tag.MAP_INDEX] = str(map_index)
    base = airflow_url(env)
    if base is not None:
        task_url = task_instance_url(base, str(dag_id), str(run_id), task_id, map_index)
        tags[Tag.TASK_INSTANCE_URL] = task_url
        tags[Tag.DAG_RUN_URL] = dag_run_url(base, str(dag_id), str(run_id))
        shown = task_id if map_index is None else f"{task_id} [{map_index}]"
        tags[Tag.NOTE] = f"Airflow task instance: [{shown}, try {attempt}]({task_url}) of run {run_id}"
    return tags
