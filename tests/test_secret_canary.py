"""No secret where it must never be, on the KubernetesPodOperator path.

The session's production stack (Optuna storage on PostgreSQL, the MLflow server, S3) has the secret
canary (``SECRET_CANARY``) as every credential. A study runs through the real KubernetesPodOperator
against the Kubernetes API emulator (``dag.test()``), its pods getting the credentials only from the
trial Secret. Then every surface is scanned: the task logs, XCom, rendered template fields, the DAG
run conf, the MLflow params and tags (runs and the registered version), the Optuna attributes, and
every pod body the operator sent. The Celery run of tests/test_production_celery.py is scanned the
same way on the real scheduler.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.models.renderedtifields import RenderedTaskInstanceFields
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from sqlalchemy import select

from hpo_core.cli import latest_study_name
from hpo_core.deployment import Deployment
from tests.fixtures_core import ROOT, study_mapping, use_dags_folder, write_study
from tests.fixtures_services import SECRET_CANARY
from tests.k8s_emulator import KubernetesEmulator

pytestmark = pytest.mark.slow

STUDY = "canary_k8s"


def _hits(value: Any) -> int:
    return json.dumps(value, default=str).count(SECRET_CANARY)


def test_no_secret_canary_anywhere_on_the_kubernetes_pod_operator_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    airflow_db: Path,
    hpo_env: dict[str, str],
    k8s_emulator: KubernetesEmulator,
    k8s_connection: str,
) -> None:
    for key, value in hpo_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HPO_WORKER_BACKEND")  # the study's worker.backend: kubernetes
    deployment = Deployment.from_env(hpo_env)
    assert SECRET_CANARY in deployment.storage_url and SECRET_CANARY in hpo_env["AWS_SECRET_ACCESS_KEY"]
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(ROOT / "dags" / "hpo_studies.py", folder)
    write_study(
        folder / "studies",
        study_mapping(
            name=STUDY,
            budget={"n_trials": 2, "batch_size": 2, "max_rounds": 1},
            mlflow={"experiment": STUDY, "registered_model": STUDY},
            worker={
                "backend": "kubernetes",
                "image": "hpo-worker:test",
                "startup_timeout": 30,
                "trials_per_task": 2,  # one pod for both trials
            },
        ),
    )
    use_dags_folder(monkeypatch, folder)
    monkeypatch.setenv("HPO_K8S_CONN_ID", k8s_connection)
    monkeypatch.setenv("HPO_K8S_NAMESPACE", k8s_emulator.namespace)
    # The credentials reach the pods only through the trial Secret (envFrom).
    credentials = {k: v for k, v in hpo_env.items() if k != "HPO_WORKER_BACKEND"}
    k8s_emulator.create_secret("hpo-trial-credentials", credentials)
    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}
    dag_run = bag.dags[f"hpo_{STUDY}"].test(run_conf={"n_trials": 2, "batch_size": 2, "seed": 11})
    assert dag_run.state == "success"
    out, err = capfd.readouterr()
    assert "round_1.evaluate" in out + err  # the task logs are what was printed

    found: dict[str, int] = {"task logs": (out + err).count(SECRET_CANARY)}
    pods = k8s_emulator.cluster.pod_requests
    assert len(pods) == 1
    found["pod bodies sent by the operator"] = _hits(pods)
    found["dag run conf"] = _hits(dag_run.conf)
    with create_session() as session:
        xcoms = session.scalars(
            select(XComModel).where(XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id)
        ).all()
        rendered = session.scalars(
            select(RenderedTaskInstanceFields).where(
                RenderedTaskInstanceFields.dag_id == dag_run.dag_id,
                RenderedTaskInstanceFields.run_id == dag_run.run_id,
            )
        ).all()
        assert xcoms and rendered
        found["xcom"] = _hits([x.value for x in xcoms])
        found["rendered template fields"] = _hits([r.rendered_fields for r in rendered])
    tracking = mlflow.MlflowClient(tracking_uri=deployment.tracking_uri)
    experiment = tracking.get_experiment_by_name(STUDY)
    assert experiment is not None
    study_name = latest_study_name(deployment, f"hpo_{STUDY}")
    runs = tracking.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`hpo.study` = '{study_name}'", max_results=100
    )
    assert len(runs) == 3  # the parent run and two trials
    found["mlflow params and tags"] = _hits([[r.data.params, r.data.tags] for r in runs])
    versions = tracking.search_model_versions(f"name = '{STUDY}'")
    found["registered version tags"] = _hits([[v.tags, v.description] for v in versions])
    study = optuna.load_study(study_name=study_name, storage=deployment.storage_url)
    found["optuna attributes"] = _hits(
        [study.user_attrs]
        + [[t.params, t.user_attrs, getattr(t, "system_attrs", {})] for t in study.get_trials()]
    )
    assert {where: n for where, n in found.items() if n} == {}
