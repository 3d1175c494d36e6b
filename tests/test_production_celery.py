"""The production stack with a distributed executor, and no secret anywhere it must not be.

A study runs on the session's Airflow through its CeleryExecutor (Redis broker) on two Celery workers,
with the Optuna storage on PostgreSQL and the MLflow server on PostgreSQL + S3. One worker is
SIGKILLed (with its task and trial processes, as when its machine dies) while it evaluates a trial:
the study still completes with exact counts and no trial evaluated twice. Every credential of the
stack is the session's secret canary (``SECRET_CANARY``); the same run is then scanned for it: task
logs, XCom, rendered template fields, the DAG run conf, MLflow params and tags, Optuna attributes.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import psutil
import pytest
from optuna.trial import TrialState

from hpo_core.deployment import Deployment
from hpo_core.keys import TrialAttr
from hpo_core.storage import open_storage
from hpo_core.study.accounting import count_trials
from tests.fixtures_core import study_mapping, write_study
from tests.fixtures_services import CELERY_QUEUE, CELERY_QUEUE_ENV, SECRET_CANARY
from tests.services import AirflowClient, AirflowDeployment

pytestmark = pytest.mark.slow

STUDY = "celery_quadratic"
DAG_ID = f"hpo_{STUDY}"
WORKERS = ("w1", "w2")
EVAL_SECONDS = 5
#: A DAG file of this module: the study files in ``celery_studies/``, every task on the CeleryExecutor.
CELERY_DAG_FILE = f'''"""Study DAGs whose tasks run on the CeleryExecutor (tests/test_production_celery)."""
import os
from pathlib import Path

from hpo_airflow import load_study_dags

_QUEUE = os.environ["{CELERY_QUEUE_ENV}"]
for _dag in load_study_dags({{}}, studies_dir=Path(__file__).parent / "celery_studies").values():
    for _task in _dag.tasks:
        if hasattr(_task, "partial_kwargs"):  # mapped: the trial slots
            _task.partial_kwargs.update(executor="CeleryExecutor", queue=_QUEUE)
        else:
            _task.executor, _task.queue = "CeleryExecutor", _QUEUE
    globals()[_dag.dag_id] = _dag
'''


@dataclass
class CeleryRun:
    """The study's run: which trial was being evaluated by which worker when that worker was killed."""

    airflow: AirflowDeployment
    deployment: Deployment
    run_id: str
    state: str
    study: optuna.Study
    killed_trial: int
    killed_worker: str
    evaluations: Path

    @property
    def client(self) -> AirflowClient:
        return self.airflow.client


def _wait(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(0.5)


def _study(deployment: Deployment, run_id: str) -> optuna.Study | None:
    names = [
        s.study_name
        for s in optuna.get_all_study_summaries(
            open_storage(deployment.storage_url), include_best_trial=False
        )
        if s.study_name.endswith(f".{run_id}") and s.study_name.startswith(f"{STUDY}.")
    ]
    return optuna.load_study(study_name=names[0], storage=deployment.storage_url) if names else None


def _evaluating(deployment: Deployment, run_id: str) -> tuple[optuna.Study, int, int] | None:
    """A trial whose objective is running now, with its slot process: (study, trial number, pid)."""
    study = _study(deployment, run_id)
    if study is None:
        return None
    for t in study.get_trials():
        worker = t.user_attrs.get(TrialAttr.WORKER) or {}
        if t.state == TrialState.RUNNING and worker and TrialAttr.MLFLOW_RUN in t.user_attrs:
            return study, t.number, int(worker["pid"])
    return None


def _worker_running(airflow: AirflowDeployment, pid: int) -> str:
    """The Celery worker whose process tree holds ``pid``."""
    for name in WORKERS:
        root = psutil.Process(airflow.processes[f"celery-{name}"].pid)
        if pid in {p.pid for p in [root, *root.children(recursive=True)]}:
            return name
    pytest.fail(f"no Celery worker runs process {pid}")


@pytest.fixture(scope="module")
def celery_run(
    airflow: AirflowDeployment,
    airflow_dags_folder: Path,
    hpo_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CeleryRun]:
    evaluations = tmp_path_factory.mktemp("celery-evaluations")
    data = study_mapping(
        name=STUDY,
        objective="tests.objectives:recorded",
        search_space={"x": {"type": "float", "low": -5.0, "high": 5.0}},
        budget={"n_trials": 4, "batch_size": 2, "max_rounds": 2},
        trial={"retries": 1, "retry_delay": 1, "execution_timeout": 180},
        mlflow={"experiment": STUDY},
    )
    write_study(airflow_dags_folder / "celery_studies", data)
    (airflow_dags_folder / "hpo_celery_studies.py").write_text(CELERY_DAG_FILE)
    env = {"HPO_TEST_EVALUATIONS": str(evaluations), "HPO_TEST_EVAL_SECONDS": str(EVAL_SECONDS)}
    for name in WORKERS:
        airflow.start_celery_worker(name, queues=CELERY_QUEUE, concurrency=2, env=env, wait=False)
    try:
        for name in WORKERS:
            airflow.wait_celery_worker(name)
        client = airflow.client
        parsed = client.wait_for_dag(DAG_ID, timeout=180, fileloc="hpo_celery_studies.py")
        assert parsed.dag is not None, parsed.import_errors
        client.unpause(DAG_ID)
        deployment = Deployment.from_env(hpo_env)
        run_id = client.trigger(DAG_ID, {"n_trials": 4, "batch_size": 2, "seed": 3})
        study, number, pid = _wait(
            lambda: _evaluating(deployment, run_id), timeout=300, what="a trial is being evaluated"
        )
        victim = _worker_running(airflow, pid)
        # Its machine dies: the worker, its task processes and the trial's process, all at once.
        airflow.processes[f"celery-{victim}"].kill(signal.SIGKILL, group=True)
        state = client.wait_for_run(DAG_ID, run_id, timeout=600)
        yield CeleryRun(airflow, deployment, run_id, state, study, number, victim, evaluations)
    finally:
        # Leave nothing queued for workers that are gone: the next tests share this Airflow.
        airflow.client.pause(DAG_ID)
        for found in airflow.client._json("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")["dag_runs"]:
            if found["state"] not in ("success", "failed"):
                airflow.client._json(
                    "PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{found['dag_run_id']}", json={"state": "failed"}
                )
        for name in WORKERS:
            process = airflow.processes.pop(f"celery-{name}", None)
            if process is not None:
                process.stop()


def test_a_study_on_two_celery_workers_survives_one_sigkilled_mid_trial(celery_run: CeleryRun) -> None:
    run, client = celery_run, celery_run.client
    tis = client.task_instances(DAG_ID, run.run_id)
    states = {(ti["task_id"], ti["map_index"]): (ti["state"], ti["try_number"]) for ti in tis}
    assert run.state == "success", states
    trials = {t.number: t for t in run.study.get_trials() if TrialAttr.ROUND in t.user_attrs}
    counts = count_trials(run.study)
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (4, 4, 0, 0)
    assert len(trials) == 4  # the killed trial was taken over, not replaced
    killed = trials[run.killed_trial]
    assert killed.user_attrs[TrialAttr.WORKER]["attempt"] == 2
    slot = (f"round_{killed.user_attrs[TrialAttr.ROUND]}.evaluate", killed.user_attrs[TrialAttr.MAP_INDEX])
    assert states[slot] == ("success", 2)
    # Nothing evaluated twice: one finished evaluation per trial, none overlapping another of the same.
    records = [json.loads(p.read_text()) for p in run.evaluations.glob("*.json")]
    assert sorted(r["number"] for r in records) == sorted(trials)
    for record in records:
        assert record["params"] == trials[record["number"]].params
    # MLflow: the killed attempt's run closed as lost, the take-over's run finished.
    tracking = mlflow.MlflowClient(tracking_uri=run.deployment.tracking_uri)
    experiment = tracking.get_experiment_by_name(STUDY)
    assert experiment is not None
    attempts = tracking.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`hpo.study` = '{run.study.study_name}' and "
        f"tags.`hpo.trial_number` = '{run.killed_trial}'",
        order_by=["attributes.start_time ASC"],
    )
    assert [(r.data.tags["hpo.attempt"], r.info.status) for r in attempts] == [
        ("1", "FAILED"),
        ("2", "FINISHED"),
    ]
    assert attempts[0].data.tags["hpo.error"].startswith("worker lost: attempt 1 (pid ")
    print(f"\nkilled Celery worker {run.killed_worker} while it evaluated trial {run.killed_trial}")


def _hits(text: str) -> int:
    return text.count(SECRET_CANARY)


def test_no_secret_canary_in_logs_xcom_rendered_fields_conf_mlflow_or_optuna(celery_run: CeleryRun) -> None:
    run, client = celery_run, celery_run.client
    assert SECRET_CANARY in run.deployment.storage_url  # the stack really ran with it
    found: dict[str, int] = {}
    for ti in client.task_instances(DAG_ID, run.run_id):
        task_id, index = ti["task_id"], ti["map_index"]
        where = f"{task_id}[{index}]"
        found[f"rendered fields {where}"] = _hits(json.dumps(ti.get("rendered_fields"), default=str))
        for try_number in range(1, int(ti["try_number"] or 0) + 1):
            log = client.task_log(DAG_ID, run.run_id, task_id, map_index=index, try_number=try_number)
            found[f"log {where} try {try_number}"] = _hits(log)
        entries = client._json(
            "GET",
            f"/api/v2/dags/{DAG_ID}/dagRuns/{run.run_id}/taskInstances/{task_id}/xcomEntries",
            params={"map_index": index, "deserialize": True, "stringify": False},
        )
        found[f"xcom {where}"] = _hits(json.dumps(entries, default=str))
    found["dag run conf"] = _hits(json.dumps(client.dag_run(DAG_ID, run.run_id), default=str))
    tracking = mlflow.MlflowClient(tracking_uri=run.deployment.tracking_uri)
    experiment = tracking.get_experiment_by_name(STUDY)
    assert experiment is not None
    for mlflow_run in tracking.search_runs([experiment.experiment_id], max_results=1000):
        data = mlflow_run.data
        found[f"mlflow run {mlflow_run.info.run_id}"] = _hits(json.dumps([data.params, data.tags]))
    found["optuna study"] = _hits(json.dumps(run.study.user_attrs, default=str))
    for trial in run.study.get_trials():
        found[f"optuna trial {trial.number}"] = _hits(
            json.dumps([trial.params, trial.user_attrs, getattr(trial, "system_attrs", {})], default=str)
        )
    assert len(found) > 20
    assert {where: n for where, n in found.items() if n} == {}
