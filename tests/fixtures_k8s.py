"""Pytest fixtures that start the Kubernetes API emulator (a plugin listed in the root conftest).

``k8s_emulator`` gives a clean emulator per test (one server per session, reset around each test).
Point KubernetesPodOperator at it with ``**k8s_emulator.kpo_kwargs()`` (kubeconfig file, no Airflow
connection) or with the connection id from ``k8s_connection`` (an ``AIRFLOW_CONN_*`` variable).
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.k8s_emulator import EmulatorError, KubernetesEmulator

__all__ = [
    "K8S_CONNECTION_ID",
    "K8S_TEST_NAMESPACE",
    "WORKER_IMAGE_ENTRYPOINTS",
    "FakeTaskInstance",
    "k8s_connection",
    "k8s_emulator",
    "k8s_emulator_session",
    "kpo_context",
]

K8S_TEST_NAMESPACE = "hpo-trials"
K8S_CONNECTION_ID = "kubernetes_emulator"
#: ENTRYPOINT of docker/worker/Dockerfile, for pods of a worker image that pass only ``arguments``.
WORKER_IMAGE_ENTRYPOINTS = {"*hpo-worker*": ["python", "-m", "hpo_core.worker"]}
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FakeTaskInstance:
    """The part of a task instance that KubernetesPodOperator.execute reads and writes."""

    dag_id: str
    task_id: str
    run_id: str
    try_number: int = 1
    map_index: int = -1
    xcoms: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        """Record an XCom (the operator pushes ``pod_name`` and ``pod_namespace``)."""
        self.xcoms[key] = value


@dataclass
class _FakeDag:
    dag_id: str


@pytest.fixture(scope="session")
def k8s_emulator_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubernetesEmulator]:
    """One emulator for the whole session; prefer ``k8s_emulator``, which resets it around each test.

    Containers run with the repository root as working directory and on ``PYTHONPATH``; an image
    whose name contains ``hpo-worker`` runs ``python -m hpo_core.worker`` when the pod gives no command.
    """
    pythonpath = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    emulator = KubernetesEmulator(
        namespace=K8S_TEST_NAMESPACE,
        workdir=tmp_path_factory.mktemp("k8s-emulator"),
        cwd=_REPO_ROOT,
        extra_env={"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"},
        images=WORKER_IMAGE_ENTRYPOINTS,
    )
    try:
        emulator.start()
        with urllib.request.urlopen(f"{emulator.url}/healthz", timeout=5) as response:
            if response.read() != b"ok":
                raise EmulatorError("k8s emulator: /healthz did not answer ok")
    except (EmulatorError, OSError) as e:
        emulator.close()
        pytest.fail(f"the Kubernetes API emulator could not start: {e}", pytrace=False)
    try:
        yield emulator
    finally:
        emulator.close()


@pytest.fixture
def k8s_emulator(k8s_emulator_session: KubernetesEmulator) -> Iterator[KubernetesEmulator]:
    """A running emulator with no pods, secrets, events, faults or image registrations."""
    k8s_emulator_session.reset()
    try:
        yield k8s_emulator_session
    finally:
        k8s_emulator_session.reset()


@pytest.fixture
def k8s_connection(k8s_emulator: KubernetesEmulator, monkeypatch: pytest.MonkeyPatch) -> str:
    """The id of an Airflow connection (set through ``AIRFLOW_CONN_KUBERNETES_EMULATOR``) to the emulator."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{K8S_CONNECTION_ID.upper()}", k8s_emulator.airflow_connection_json())
    return K8S_CONNECTION_ID


@pytest.fixture
def kpo_context() -> Callable[..., dict[str, Any]]:
    """Build the minimal context ``KubernetesPodOperator.execute`` needs, outside the task runner.

    Call it as ``kpo_context(task_id="evaluate", dag_id="hpo_x", run_id="r1", try_number=1, map_index=-1)``;
    ``context["ti"].xcoms`` holds what the operator pushed.
    """

    def build(
        *,
        task_id: str,
        dag_id: str = "k8s_emulator_test",
        run_id: str = "manual__1",
        try_number: int = 1,
        map_index: int = -1,
    ) -> dict[str, Any]:
        ti = FakeTaskInstance(
            dag_id=dag_id, task_id=task_id, run_id=run_id, try_number=try_number, map_index=map_index
        )
        return {"ti": ti, "run_id": run_id, "dag": _FakeDag(dag_id)}

    return build
