"""Extra links of the study DAG's tasks, and the operator classes that carry them: "MLflow run" on slot
tasks, "Study" and "Registered model" on ``finalize``.

How Airflow 3 shows an extra link: an operator class lists its links (``operator_extra_links``);
when a task instance ends, the task runner calls each link's ``get_link`` in the task process and
stores the URL as an XCom, which the API server reads back. Links that a plugin registers for an
operator class (``AirflowPlugin.operator_extra_links``, matched by class name and module) are computed
by the API server instead, on each request, so they work while the task still runs. The HPO plugin
registers these same links for the study DAG's operator classes, so both paths give the same URL.

Every URL is a pure function of the task instance's key: the slot's MLflow run is looked up by the
HPO view's redirect (``/hpo/links/...``, :mod:`hpo_airflow.views.redirects`) when the link is
followed, behind Airflow's auth, so no task writes an MLflow address to XCom and a link never goes
stale after a retry.

The Python tasks that carry links need an operator class of their own (a link registered for the
class every ``@task`` uses would show on every task of every DAG). They are built the way Airflow's
guide to custom ``@task`` decorators says, from the public ``DecoratedOperator`` and
``PythonOperator``, as ``@task``'s own (private) operator class is. The kubernetes backend's pod
operator is :class:`hpo_airflow.backends.kubernetes_operator.SlotPodOperator`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import BaseOperatorLink
from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory

from hpo_airflow.views import APP_PREFIX, STUDY_VIEW_ROUTE, ui_base_path

__all__ = [
    "SLOT_POD_OPERATOR",
    "FinalizeTaskOperator",
    "MlflowRunLink",
    "RegisteredModelLink",
    "SlotTaskOperator",
    "StudyLink",
    "finalize_task",
    "slot_task",
]


def _run_args(ti_key: Any) -> dict[str, Any]:
    return {"dag_id": ti_key.dag_id, "run_id": ti_key.run_id}


class MlflowRunLink(BaseOperatorLink):
    """The MLflow run of the slot's trial (several trials: their runs in the study's experiment)."""

    name = "MLflow run"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        query = {**_run_args(ti_key), "task_id": ti_key.task_id, "map_index": ti_key.map_index}
        return f"{ui_base_path()}{APP_PREFIX}/links/mlflow-run?{urlencode(query)}"


class RegisteredModelLink(BaseOperatorLink):
    """The model version ``finalize`` registered for the study run, in the MLflow registry."""

    name = "Registered model"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return f"{ui_base_path()}{APP_PREFIX}/links/registered-model?{urlencode(_run_args(ti_key))}"


class StudyLink(BaseOperatorLink):
    """The study run's HPO view, as a tab of its DAG run in the Airflow UI."""

    name = "Study"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        dag, run = quote(ti_key.dag_id, safe=""), quote(ti_key.run_id, safe="")
        return f"{ui_base_path()}/dags/{dag}/runs/{run}/plugin/{STUDY_VIEW_ROUTE}"


class _PythonTaskOperator(DecoratedOperator, PythonOperator):
    """What ``@task`` runs (a Python callable, its arguments templated), as a class that links can
    be attached to; shown as ``@task`` in the UI."""

    template_fields: Sequence[str] = ("templates_dict", "op_args", "op_kwargs")
    template_fields_renderers = {"templates_dict": "json", "op_args": "py", "op_kwargs": "py"}
    custom_operator_name: str = "@task"

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Collection[Any] | None,
        op_kwargs: Mapping[str, Any] | None,
        **kwargs: Any,
    ) -> None:
        upstream = {"python_callable": python_callable, "op_args": op_args, "op_kwargs": op_kwargs}
        super().__init__(
            kwargs_to_upstream=upstream,
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )


class SlotTaskOperator(_PythonTaskOperator):
    """A local slot task (``round_<r>.evaluate``): a Python task with the "MLflow run" link."""

    operator_extra_links = (MlflowRunLink(),)


class FinalizeTaskOperator(_PythonTaskOperator):
    """The ``finalize`` task: a Python task with the "Study" and "Registered model" links."""

    operator_extra_links = (StudyLink(), RegisteredModelLink())


def slot_task(**kwargs: Any) -> Any:
    """``@task(**kwargs)`` for a local slot task (its operator carries the "MLflow run" link)."""
    return task_decorator_factory(decorated_operator_class=SlotTaskOperator, **kwargs)


def finalize_task(**kwargs: Any) -> Any:
    """``@task(**kwargs)`` for ``finalize`` (its operator carries the "Study" and model links)."""
    return task_decorator_factory(decorated_operator_class=FinalizeTaskOperator, **kwargs)


#: Stands for :class:`hpo_airflow.backends.kubernetes_operator.SlotPodOperator` where the plugin names
#: the operators its links belong to: Airflow matches them by class name and module only, and the real
#: class would import the cncf-kubernetes provider (seconds) into every process that loads plugins,
#: task processes included. A test checks that name and module match the real class.
SLOT_POD_OPERATOR: type = type(
    "SlotPodOperator",
    (),
    {
        "__module__": "hpo_airflow.backends.kubernetes_operator",
        "__doc__": "Name and module of the kubernetes backend's slot pod operator.",
    },
)

# The operators each link belongs to, for the plugin's registration (matched by class name and module).
MlflowRunLink.operators = [SlotTaskOperator, SLOT_POD_OPERATOR]
StudyLink.operators = [FinalizeTaskOperator]
RegisteredModelLink.operators = [FinalizeTaskOperator]
