"""End to end on the embedded default: the example study through Airflow's ``dag.test()``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from airflow.dag_processing.dagbag import DagBag
from optuna.trial import TrialState
from sklearn.datasets import load_breast_cancer

from hpo_core.cli import latest_study_name
from hpo_core.deployment import Deployment
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.spec import spec_from_json
from hpo_core.study.accounting import count_trials, pick_best
from hpo_core.study.finalize import finalize_study

ROOT = Path(__file__).resolve().parent.parent


def _dag(dag_id: str, folder: Path = ROOT / "dags") -> Any:
    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def _study(deployment: Deployment, dag_id: str) -> optuna.Study:
    name = latest_study_name(deployment, dag_id)
    return optuna.load_study(study_name=name, storage=deployment.storage_url)


@pytest.mark.slow
def test_example_study_end_to_end(airflow_db: Path, local_deployment: Deployment) -> None:
    dag = _dag("hpo_breast_cancer_gbm")
    dag_run = dag.test(run_conf={"n_trials": 4, "batch_size": 2, "seed": 3})
    assert dag_run.state == "success"

    study = _study(local_deployment, "hpo_breast_cancer_gbm")
    trials = [t for t in study.trials if TrialAttr.ROUND in t.user_attrs]
    assert len(trials) == 4
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert {t.user_attrs[TrialAttr.ROUND] for t in trials} == {1, 2}
    assert all(t.user_attrs["hpo.run_id"] == dag_run.run_id for t in trials)
    counts = count_trials(study)
    assert counts.counted == 4 and counts.failed == 0

    client = mlflow.MlflowClient(tracking_uri=local_deployment.tracking_uri)
    experiment = client.get_experiment_by_name("breast_cancer_gbm")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("hpo.role") == "study"]
    children = [r for r in runs if r.data.tags.get("hpo.role") == "trial"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == study.user_attrs[StudyAttr.PARENT_RUN]
    assert parent.info.status == "FINISHED"
    assert len(children) == 4  # one child run per trial attempt
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert parent.data.metrics["best.roc_auc"] > 0.9
    history = client.get_metric_history(parent.info.run_id, "best_value")
    assert [m.step for m in history] == [1, 2]

    best = pick_best(study, spec_from_json(study.user_attrs[StudyAttr.SPEC]))
    assert best is not None
    version = client.get_model_version_by_alias("breast_cancer_gbm", "challenger")
    assert version.tags["hpo.study"] == study.study_name
    assert version.tags["hpo.trial_number"] == str(best.number)
    assert float(version.tags["hpo.value"]) == pytest.approx(best.value)
    assert version.tags["hpo.dag_id"] == "hpo_breast_cancer_gbm"
    assert version.tags["hpo.run_id"] == dag_run.run_id
    assert "hpo.data_fingerprint" in version.tags

    x, _ = load_breast_cancer(return_X_y=True)
    model = mlflow.pyfunc.load_model("models:/breast_cancer_gbm@challenger")
    assert len(model.predict(x[:5])) == 5

    # finalize is idempotent: running it again registers nothing new.
    again = finalize_study(deployment=local_deployment, study_name=study.study_name)
    assert again["model_version"] == str(version.version)
    assert len(client.search_model_versions("name = 'breast_cancer_gbm'")) == 1
