"""The production stack: a study triggered through the Airflow REST API on the real scheduler, with the
Optuna storage on PostgreSQL, the MLflow server (PostgreSQL backend, S3 artifacts on moto) and the
model registry; refused triggers; the storage URL from an Airflow Connection."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
import psycopg2
import pytest
from hpo_airflow.settings import OPTUNA_CONN_ID, resolve_deployment

from hpo_core.deployment import Deployment
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.storage import open_storage
from hpo_core.study.accounting import count_trials, pick_best
from hpo_core.study.state import load_run
from tests.fixtures_core import ROOT, study_mapping, write_study
from tests.services import AirflowClient, AirflowDeployment, MotoS3Server, PostgresServer, database_name

pytestmark = pytest.mark.slow

STUDY = "prod_quadratic"
DAG_ID = f"hpo_{STUDY}"
#: What the trigger form sends: every param of the DAG, as the user left or changed it.
CONF = {"n_trials": 4, "batch_size": 2, "seed": 5, "sampler_options": {"n_startup_trials": 2}}


@pytest.fixture(scope="module")
def study_dag(airflow: AirflowDeployment, airflow_dags_folder: Path) -> AirflowClient:
    """The toy study (3 rounds of at most 4) and the one-line DAG file in the shared Airflow's folder."""
    data = study_mapping(
        name=STUDY,
        budget={"n_trials": 4, "batch_size": 2, "max_rounds": 3, "max_batch_size": 4},
        trial={"retries": 1, "retry_delay": 1, "execution_timeout": 180},
        mlflow={"experiment": STUDY, "registered_model": STUDY},
    )
    write_study(airflow_dags_folder / "studies", data)
    shutil.copy(ROOT / "dags" / "hpo_studies.py", airflow_dags_folder / "hpo_studies.py")
    client = airflow.client
    parsed = client.wait_for_dag(DAG_ID, timeout=180, fileloc="hpo_studies.py")
    assert parsed.dag is not None, parsed.import_errors
    client.unpause(DAG_ID)
    return client


def _dag_runs(client: AirflowClient) -> list[dict[str, Any]]:
    return list(client._json("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100})["dag_runs"])


def _studies_of_dag(storage_url: str) -> list[str]:
    return [
        s.study_name
        for s in optuna.get_all_study_summaries(open_storage(storage_url), include_best_trial=False)
        if s.user_attrs.get(StudyAttr.DAG_ID) == DAG_ID
    ]


def _mlflow_runs(client: Any) -> list[Any]:
    experiment = client.get_experiment_by_name(STUDY)
    return [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({**CONF, "n_trials": 999}, "999 is greater than the maximum of 12"),
        ({**CONF, "batch_size": 0}, "0 is less than the minimum of 1"),
    ],
    ids=["n_trials_above_bound", "batch_size_below_bound"],
)
def test_out_of_bounds_trigger_is_refused_and_creates_nothing(
    study_dag: AirflowClient, hpo_env: dict[str, str], conf: dict[str, Any], message: str
) -> None:
    tracking = mlflow.MlflowClient(tracking_uri=hpo_env["MLFLOW_TRACKING_URI"])
    runs_before = _dag_runs(study_dag)
    studies_before = _studies_of_dag(hpo_env["HPO_STORAGE_URL"])
    mlflow_before = _mlflow_runs(tracking)

    response = study_dag.trigger_response(DAG_ID, conf)

    assert 400 <= response.status_code < 500, response.text
    assert message in response.text, response.text
    assert _dag_runs(study_dag) == runs_before
    assert _studies_of_dag(hpo_env["HPO_STORAGE_URL"]) == studies_before
    assert [r.info.run_id for r in _mlflow_runs(tracking)] == [r.info.run_id for r in mlflow_before]


def test_rest_triggered_study_runs_on_postgres_mlflow_server_and_s3(
    study_dag: AirflowClient,
    hpo_env: dict[str, str],
    s3_server: MotoS3Server,
    mlflow_env: dict[str, str],
) -> None:
    client = study_dag
    run_id = client.trigger(DAG_ID, CONF)
    state = client.wait_for_run(DAG_ID, run_id, timeout=420)
    tis = client.task_instances(DAG_ID, run_id)
    states = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in tis}
    assert state == "success", states
    assert client.dag_run(DAG_ID, run_id)["conf"] == CONF

    # The grid: two rounds of two trials, the third round skipped because the budget is spent.
    evaluated = sorted(
        (ti for ti in tis if ti["task_id"].endswith(".evaluate") and ti["map_index"] >= 0),
        key=lambda ti: (ti["task_id"], ti["map_index"]),
    )
    assert [(ti["task_id"], ti["map_index"], ti["state"]) for ti in evaluated] == [
        ("round_1.evaluate", 0, "success"),
        ("round_1.evaluate", 1, "success"),
        ("round_2.evaluate", 0, "success"),
        ("round_2.evaluate", 1, "success"),
    ]
    assert all(ti["rendered_map_index"].startswith("trial ") for ti in evaluated)
    assert states[("round_3.suggest", -1)] == states[("round_3.evaluate", -1)] == "skipped"
    assert states[("finalize", -1)] == "success"

    # Optuna storage on PostgreSQL: the run's study holds the four trials.
    deployment = Deployment.from_env(hpo_env)
    assert deployment.storage_url.startswith("postgresql")
    (name,) = [n for n in _studies_of_dag(deployment.storage_url) if n.endswith(run_id)]
    loaded = load_run(deployment, name)
    study, spec = loaded.study, loaded.spec
    counts = count_trials(study)
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (4, 4, 0, 0)
    trials = [t for t in study.get_trials() if TrialAttr.ROUND in t.user_attrs]
    assert {t.user_attrs["hpo.run_id"] for t in trials} == {run_id}
    assert loaded.config.seed == CONF["seed"]
    best = pick_best(study, spec)
    assert best is not None

    # MLflow server: one parent run, one child run per trial attempt, artifacts on S3.
    tracking = mlflow.MlflowClient()
    runs = _mlflow_runs(tracking)
    ours = [r for r in runs if r.data.tags.get("hpo.study") == name]
    (parent,) = [r for r in ours if r.data.tags.get("hpo.role") == "study"]
    children = [r for r in ours if r.data.tags.get("hpo.role") == "trial"]
    assert parent.info.run_id == study.user_attrs[StudyAttr.PARENT_RUN]
    assert parent.info.status == "FINISHED" and parent.data.tags["hpo.outcome"] == "succeeded"
    assert parent.info.artifact_uri.startswith(f"s3://{s3_server.bucket}/")
    assert Counter((c.data.tags["hpo.trial_number"], c.data.tags["hpo.attempt"]) for c in children) == {
        (str(t.number), "1"): 1 for t in trials
    }
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.run_id for c in children} == {t.user_attrs[TrialAttr.MLFLOW_RUN] for t in trials}
    round_files = {a.path for a in tracking.list_artifacts(parent.info.run_id, "rounds")}
    assert round_files == {"rounds/round_001.json", "rounds/round_002.json"}

    # Registry: the challenger is the best trial's model, stored as objects in the bucket.
    version = tracking.get_model_version_by_alias(STUDY, "challenger")
    assert version.tags["hpo.study"] == name and version.tags["hpo.trial_number"] == str(best.number)
    # MLflow 3: the version's source is the trial's logged model; its files live on S3.
    assert version.source == best.user_attrs[TrialAttr.MODEL_URI]
    location = tracking.get_model_version_download_uri(STUDY, version.version)
    assert location.startswith(f"s3://{s3_server.bucket}/mlflow/"), location
    keys = s3_server.list_keys(location.removeprefix(f"s3://{s3_server.bucket}/"))
    assert {"MLmodel", "python_model.pkl"} <= {key.rsplit("/", 1)[-1] for key in keys}, keys
    model = mlflow.pyfunc.load_model(f"models:/{STUDY}@challenger")
    assert model.predict([[0.0], [1.0]]) == [pytest.approx(best.value)] * 2

    # Credentials stay out of the task logs.
    for task_id, map_index in (("start", -1), ("round_1.evaluate", 0)):
        text = client.task_log(DAG_ID, run_id, task_id, map_index=map_index)
        assert text and hpo_env["AWS_SECRET_ACCESS_KEY"] not in text
    print(f"\nstudy {name}: best trial {best.number} value {best.value:.4f}; {len(keys)} model objects in S3")


@pytest.mark.parametrize("form", ["uri", "json"])
def test_storage_url_from_the_hpo_optuna_connection(
    create_database: Callable[[str], str],
    postgres_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    form: str,
) -> None:
    """No HPO_STORAGE_URL: tasks find the storage in the Airflow Connection ``hpo_optuna`` at execute time."""
    url = create_database("hpo_conn")
    dbname = database_name(url)
    if form == "uri":
        connection = postgres_server.dsn(dbname)  # postgresql://user@host:port/db
    else:  # what the UI stores for a "postgres" connection
        connection = json.dumps(
            {
                "conn_type": "postgres",
                "host": postgres_server.host,
                "port": postgres_server.port,
                "login": postgres_server.user,
                "schema": dbname,
            }
        )
    monkeypatch.delenv("HPO_STORAGE_URL", raising=False)
    monkeypatch.setenv(f"AIRFLOW_CONN_{OPTUNA_CONN_ID.upper()}", connection)

    deployment = resolve_deployment()

    assert deployment.storage_url.startswith("postgresql+psycopg2://")
    assert database_name(deployment.storage_url) == dbname
    optuna.create_study(storage=open_storage(deployment.storage_url), study_name="from.connection")
    with psycopg2.connect(postgres_server.dsn(dbname)) as conn, conn.cursor() as cur:
        cur.execute("SELECT study_name FROM studies")
        assert cur.fetchall() == [("from.connection",)]
    # The environment variable, when set, wins over the connection.
    monkeypatch.setenv("HPO_STORAGE_URL", "sqlite:////tmp/elsewhere.db")
    assert resolve_deployment().storage_url == "sqlite:////tmp/elsewhere.db"
