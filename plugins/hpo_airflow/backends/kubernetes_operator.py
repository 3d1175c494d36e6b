"""The kubernetes backend's slot task: KubernetesPodOperator with the slot's "MLflow run" extra link.

A module of its own, imported where a kubernetes study's DAG is built (and by the API server when it
deserializes one): only those processes load the cncf-kubernetes provider. The plugin names this
class without importing it (:data:`hpo_airflow.links.SLOT_POD_OPERATOR`).
"""

from __future__ import annotations

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator  # noqa: TID253 (subclassed)

from hpo_airflow.links import MlflowRunLink

__all__ = ["SlotPodOperator"]


class SlotPodOperator(KubernetesPodOperator):
    """One slot pod per mapped task, as KubernetesPodOperator, plus the slot's "MLflow run" link."""

    operator_extra_links = (*KubernetesPodOperator.operator_extra_links, MlflowRunLink())
    #: What the UI shows as the task's operator: what runs is a KubernetesPodOperator.
    custom_operator_name = "KubernetesPodOperator"
