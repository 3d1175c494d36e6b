"""The real services that tests start: PostgreSQL, moto S3, MLflow and Airflow each work end to end."""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import psycopg2
import pytest
import sqlalchemy
from mlflow import MlflowClient
from sklearn.linear_model import LogisticRegression

from tests.services import (
    AirflowApiError,
    AirflowDeployment,
    MLflowServer,
    MotoS3Server,
    PostgresServer,
    database_name,
)

pytestmark = pytest.mark.slow

# ----------------------------------------------------------------------------------------------------
# PostgreSQL


def test_create_database_gives_a_fresh_usable_database(
    postgres_server: PostgresServer, create_database: Callable[[str], str]
) -> None:
    url = create_database("hpo_svc")

    assert re.fullmatch(
        rf"postgresql\+psycopg2://postgres@127\.0\.0\.1:{postgres_server.port}/hpo_svc_[0-9a-f]{{6}}", url
    )
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE trial (number int)"))
        conn.execute(sqlalchemy.text("INSERT INTO trial VALUES (1), (2)"))
        assert conn.execute(sqlalchemy.text("SELECT count(*) FROM trial")).scalar_one() == 2
    engine.dispose()
    assert create_database("hpo_svc") != url


def test_terminate_backends_cuts_open_connections(
    postgres_server: PostgresServer, create_database: Callable[[str], str]
) -> None:
    url = create_database("hpo_chaos")
    conn = psycopg2.connect(postgres_server.dsn(database_name(url)))

    assert postgres_server.terminate_backends(database_name(url)) == 1

    with pytest.raises(psycopg2.OperationalError, match="terminat"):
        conn.cursor().execute("SELECT 1")
    conn.close()


def test_private_postgres_server_starts_restarts_and_cleans_up() -> None:
    server = PostgresServer(prefer_existing=False)
    with server:
        assert server.private
        assert server.port != 5432
        url = server.create_database("hpo_private")
        engine = sqlalchemy.create_engine(url, pool_pre_ping=True)
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE t (x int)"))

        server.restart(mode="immediate")

        with engine.begin() as conn:
            assert conn.execute(sqlalchemy.text("SELECT count(*) FROM t")).scalar_one() == 0
        engine.dispose()
        data_dir = server.data_dir
        assert data_dir is not None and data_dir.exists()
    assert not data_dir.exists()


def test_restart_is_refused_on_the_shared_server(postgres_server: PostgresServer) -> None:
    if postgres_server.private:  # no server at 127.0.0.1:5432 here: the session's own may restart
        postgres_server.restart(mode="fast")
        with postgres_server.admin_connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
        return
    with pytest.raises(RuntimeError, match="only allowed on a private server"):
        postgres_server.restart()


# ----------------------------------------------------------------------------------------------------
# S3 and MLflow


def test_moto_s3_bucket_round_trip(s3_server: MotoS3Server) -> None:
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_server.bucket, Key="probe/hello.txt", Body=b"hello")

    body = s3.get_object(Bucket=s3_server.bucket, Key="probe/hello.txt")["Body"].read()

    assert body == b"hello"
    assert "probe/hello.txt" in s3_server.list_keys("probe/")
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")


def test_mlflow_logs_registers_and_serves_a_model_from_s3(
    mlflow_server: MLflowServer, s3_server: MotoS3Server, mlflow_env: dict[str, str]
) -> None:
    X = np.array([[0.0, 0.1], [0.2, 0.0], [1.0, 0.9], [0.9, 1.1]])
    y = np.array([0, 0, 1, 1])
    model = LogisticRegression().fit(X, y)
    mlflow.set_experiment("services-smoke")
    with mlflow.start_run() as run:
        mlflow.log_params({"C": 1.0, "solver": "lbfgs"})
        mlflow.log_metric("accuracy", 1.0, step=0)
        info = mlflow.sklearn.log_model(model, name="model", input_example=X[:1])
    version = mlflow.register_model(info.model_uri, "svc_smoke_model")
    client = MlflowClient()
    client.set_registered_model_alias("svc_smoke_model", "challenger", version.version)

    loaded = mlflow.pyfunc.load_model("models:/svc_smoke_model@challenger")

    assert list(loaded.predict(X)) == [0, 0, 1, 1]
    stored = client.get_run(run.info.run_id)
    assert stored.data.params == {"C": "1.0", "solver": "lbfgs"}
    assert stored.data.metrics == {"accuracy": 1.0}
    assert stored.info.artifact_uri.startswith(f"s3://{s3_server.bucket}/mlflow/")
    model_location = mlflow.get_logged_model(info.model_id).artifact_location
    assert model_location.startswith(f"s3://{s3_server.bucket}/mlflow/")
    model_prefix = model_location.removeprefix(f"s3://{s3_server.bucket}/")
    files = {key.rsplit("/", 1)[-1] for key in s3_server.list_keys(model_prefix)}
    assert "MLmodel" in files and files & {"model.skops", "model.pkl"}, files
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == s3_server.endpoint_url


# ----------------------------------------------------------------------------------------------------
# Airflow

MAPPED_DAG = """
from airflow.sdk import dag, task, get_current_context


@dag(dag_id="svc_mapped", schedule=None, catchup=False, tags=["services-test"])
def svc_mapped():
    @task
    def items() -> list[int]:
        return list(range(get_current_context()["dag_run"].conf["n"]))

    @task(map_index_template="item {{ task.op_kwargs['x'] }}")
    def square(x: int) -> int:
        print(f"squaring {x}")
        return x * x

    @task
    def total(values: list[int]) -> int:
        return sum(values)

    total(square.expand(x=items()))


svc_mapped()
"""

PARAM_DAG = """
from airflow.sdk import Param, dag, task


@dag(dag_id="svc_params", schedule=None, catchup=False,
     params={"n_trials": Param(3, type="integer", minimum=1, maximum=5)})
def svc_params():
    @task
    def noop() -> None:
        return None

    noop()


svc_params()
"""

SLOW_DAG = """
import time
from datetime import timedelta

from airflow.sdk import dag, task


@dag(dag_id="svc_slow", schedule=None, catchup=False,
     default_args={"retries": 2, "retry_delay": timedelta(seconds=1)})
def svc_slow():
    @task
    def sleep_a_while() -> str:
        time.sleep(8)
        return "slept"

    @task
    def after(value: str) -> str:
        return value

    after(sleep_a_while())


svc_slow()
"""

BROKEN_DAG = """
from airflow.sdk import dag

raise RuntimeError("svc_broken cannot be imported")
"""


def _write_dag(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def test_airflow_runs_a_mapped_dag_and_reruns_one_cleared_instance(
    airflow: AirflowDeployment, airflow_dags_folder: Path
) -> None:
    client = airflow.client
    _write_dag(airflow_dags_folder, "svc_mapped.py", MAPPED_DAG)

    parsed = client.wait_for_dag("svc_mapped", timeout=120, fileloc="svc_mapped.py")
    assert parsed.import_errors == [] and parsed.dag is not None
    assert parsed.dag["is_paused"] is True
    assert client.request("GET", "/api/v2/pools/hpo_trials").json()["slots"] == 4
    client.unpause("svc_mapped")
    run_id = client.trigger("svc_mapped", {"n": 3})

    assert client.wait_for_run("svc_mapped", run_id, timeout=180) == "success"
    instances = client.task_instances("svc_mapped", run_id)
    squares = sorted((ti for ti in instances if ti["task_id"] == "square"), key=lambda ti: ti["map_index"])
    assert [(ti["map_index"], ti["state"], ti["try_number"]) for ti in squares] == [
        (0, "success", 1),
        (1, "success", 1),
        (2, "success", 1),
    ]
    assert [ti["rendered_map_index"] for ti in squares] == ["item 0", "item 1", "item 2"]
    assert client.dag_run("svc_mapped", run_id)["conf"] == {"n": 3}
    assert "squaring 1" in client.task_log("svc_mapped", run_id, "square", map_index=1)

    cleared = client.clear_task_instances("svc_mapped", run_id, [("square", 1)])

    assert [(ti["task_id"], ti["map_index"]) for ti in cleared] == [("square", 1)]
    assert client.wait_for_run("svc_mapped", run_id, timeout=180) == "success"
    tries = {
        ti["map_index"]: ti["try_number"]
        for ti in client.task_instances("svc_mapped", run_id)
        if ti["task_id"] == "square"
    }
    assert tries == {0: 1, 1: 2, 2: 1}
    assert "squaring 1" in client.task_log("svc_mapped", run_id, "square", map_index=1, try_number=2)


def test_airflow_refuses_a_trigger_whose_param_breaks_its_schema(
    airflow: AirflowDeployment, airflow_dags_folder: Path
) -> None:
    client = airflow.client
    _write_dag(airflow_dags_folder, "svc_params.py", PARAM_DAG)
    assert client.wait_for_dag("svc_params", timeout=120, fileloc="svc_params.py").import_errors == []

    response = client.trigger_response("svc_params", {"n_trials": 99})

    assert 400 <= response.status_code < 500, response.text
    assert "n_trials" in response.text
    with pytest.raises(AirflowApiError, match="n_trials") as refused:
        client.trigger("svc_params", {"n_trials": 99})
    assert refused.value.status_code == response.status_code
    assert client.trigger("svc_params", {"n_trials": 5})


def test_wait_for_dag_reports_the_import_error_of_a_broken_file(
    airflow: AirflowDeployment, airflow_dags_folder: Path
) -> None:
    path = _write_dag(airflow_dags_folder, "svc_broken.py", BROKEN_DAG)
    try:
        parsed = airflow.client.wait_for_dag("svc_broken", timeout=120, fileloc="svc_broken.py")
    finally:
        path.unlink()

    assert parsed.dag is None
    assert len(parsed.import_errors) == 1
    assert "svc_broken cannot be imported" in parsed.import_errors[0]["stack_trace"]


def test_a_run_survives_a_scheduler_kill_and_restart(
    airflow: AirflowDeployment, airflow_dags_folder: Path
) -> None:
    client = airflow.client
    _write_dag(airflow_dags_folder, "svc_slow.py", SLOW_DAG)
    assert client.wait_for_dag("svc_slow", timeout=120, fileloc="svc_slow.py").import_errors == []
    client.unpause("svc_slow")
    run_id = client.trigger("svc_slow")
    client.wait_for_task_state("svc_slow", run_id, "sleep_a_while", {"running"}, timeout=120)
    old_pid = airflow.processes["scheduler"].pid

    airflow.kill_scheduler()
    assert not airflow.processes["scheduler"].alive()
    time.sleep(3)
    airflow.restart_scheduler()

    assert airflow.processes["scheduler"].pid != old_pid
    assert client.wait_for_run("svc_slow", run_id, timeout=240) == "success"
    sleeper = client.task_instance("svc_slow", run_id, "sleep_a_while")
    assert sleeper["state"] == "success"
    assert sleeper["try_number"] >= 2, "the killed attempt should have been reset and run again"
