"""Fixtures for the embedded default: local SQLite storage and MLflow, a migrated Airflow DB."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import airflow.settings
import mlflow
import pytest
import yaml

from hpo_core.deployment import Deployment
from hpo_core.spec import StudySpec, validate_mapping
from hpo_core.study.start import start_study
from tests.services import database_name

ROOT = Path(__file__).resolve().parent.parent

QUADRATIC_STUDY: dict[str, Any] = {
    "name": "quadratic",
    "description": "toy study for tests",
    "objective": "hpo_core.examples.quadratic:objective",
    "direction": "minimize",
    "metric": "loss",
    "search_space": {
        "x": {"type": "float", "low": -5.0, "high": 5.0},
        "y": {"type": "float", "low": -5.0, "high": 5.0},
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        "momentum": {
            "type": "float",
            "low": 0.0,
            "high": 0.99,
            "condition": {"param": "optimizer", "equals": "sgd"},
        },
    },
    "sampler": {"type": "tpe", "seed": 7, "n_startup_trials": 2},
    "budget": {"n_trials": 6, "batch_size": 3, "max_rounds": 3, "max_batch_size": 4},
    "stopping": {"max_failed_fraction": 0.5},
    "trial": {"retries": 1, "retry_delay": 0, "execution_timeout": 120},
    "mlflow": {"experiment": "quadratic", "registered_model": "quadratic"},
}


def study_mapping(**changes: Any) -> dict[str, Any]:
    """The toy study as a mapping, with top-level keys replaced (``None`` removes a key)."""
    data = copy.deepcopy(QUADRATIC_STUDY)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def make_spec(**changes: Any) -> StudySpec:
    """The toy study as a validated spec."""
    return validate_mapping(study_mapping(**changes), source="<test>")


def write_study(folder: Path, data: dict[str, Any] | str, filename: str | None = None) -> Path:
    """Write a study file (a mapping dumped as YAML, or raw text)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    name = filename or (f"{data['name']}.yaml" if isinstance(data, dict) else "study.yaml")
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow SQLite database; copying it saves the migrations per test."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def local_deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_db_template: Path) -> Deployment:
    """The embedded default (SQLite Optuna and MLflow, local artifacts) in a fresh folder."""
    home = tmp_path / "hpo"
    home.mkdir(parents=True)
    shutil.copyfile(mlflow_db_template, home / "mlflow.db")
    monkeypatch.setenv("HPO_HOME", str(home))
    for var in ("HPO_STORAGE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "HPO_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    deployment = Deployment.from_env()
    deployment.ensure_local_dirs()
    # MLflow's process-wide URIs as a process of this deployment has them (an earlier test in this
    # process may have set another server's): a client made without URIs reads this deployment.
    mlflow.set_tracking_uri(deployment.tracking_uri)
    mlflow.set_registry_uri(deployment.registry_uri or deployment.tracking_uri)
    return deployment


def _starter(deployment: Deployment) -> Callable[..., str]:
    def start(run_id: str = "manual__test", overrides: dict[str, Any] | None = None, **changes: Any) -> str:
        spec = make_spec(**changes)
        out = start_study(spec, deployment=deployment, dag_id=spec.dag_id, run_id=run_id, overrides=overrides)
        return str(out["study_name"])

    return start


@pytest.fixture
def start_toy_study(local_deployment: Deployment) -> Callable[..., str]:
    """Start a toy study (optionally with spec changes) and return its Optuna study name."""
    return _starter(local_deployment)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_deployment(request: pytest.FixtureRequest, local_deployment: Deployment) -> Iterator[Deployment]:
    """The storage contract: the embedded default, once with its SQLite Optuna storage and once with
    a fresh PostgreSQL database (MLflow stays local), like Optuna's tests over every storage.

    For the tests whose correctness depends on the storage: suggest's idempotency, retries,
    replacements and take-overs, reconciling, counts.
    """
    if request.param == "sqlite":
        yield local_deployment
        return
    postgres = request.getfixturevalue("postgres_server")
    url = postgres.create_database("hpo_contract")
    yield dataclasses.replace(local_deployment, storage_url=url)
    # The PostgreSQL server is shared: give its connections back now, not at the end of the session.
    postgres.terminate_backends(database_name(url))


@pytest.fixture
def start_on_storage(storage_deployment: Deployment) -> Callable[..., str]:
    """``start_toy_study`` on the ``storage_deployment`` of the test's parameter."""
    return _starter(storage_deployment)


def worker_env(deployment: Deployment, **extra: str) -> dict[str, str]:
    """Environment of a worker subprocess: the deployment plus the repo on PYTHONPATH."""
    env = {**os.environ, **deployment.worker_env(), **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_worker(
    deployment: Deployment,
    study_name: str,
    trial_number: int,
    *,
    attempt: int = 1,
    timeout: float | None = None,
    extra_env: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any] | None, str]:
    """Run ``python -m hpo_core.worker`` for one trial; return (exit code, HPO_RESULT, output)."""
    code, results, output = run_slot_worker(
        deployment, study_name, [trial_number], attempt=attempt, timeout=timeout, extra_env=extra_env
    )
    return code, (results[-1] if results else None), output


def run_slot_worker(
    deployment: Deployment,
    study_name: str,
    trial_numbers: list[int],
    *,
    attempt: int = 1,
    timeout: float | None = None,
    extra_env: dict[str, str] | None = None,
) -> tuple[int, list[dict[str, Any]], str]:
    """Run ``python -m hpo_core.worker`` for one slot; return (exit code, each trial's HPO_RESULT, output)."""
    cmd = [sys.executable, "-m", "hpo_core.worker", "--study-name", study_name, "--attempt", str(attempt)]
    for number in trial_numbers:
        cmd += ["--trial-number", str(number)]
    if timeout is not None:
        cmd += ["--timeout", str(timeout)]
    proc = subprocess.run(
        cmd,
        env=worker_env(deployment, **(extra_env or {})),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    results = [
        json.loads(line.removeprefix("HPO_RESULT "))
        for line in proc.stdout.splitlines()
        if line.startswith("HPO_RESULT ")
    ]
    return proc.returncode, results, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[Path]:
    """The session's Airflow home (set in the root conftest) with a migrated SQLite database."""
    home = Path(os.environ["AIRFLOW_HOME"])
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
    )
    if proc.returncode != 0:
        pytest.fail(f"'airflow db migrate' failed in {home}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    yield home


def use_dags_folder(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``folder`` Airflow's DAG folder for this test.

    ``dag.test()`` re-parses the configured DAG bundle to serialize the DAG it runs; the local
    bundle reads ``airflow.settings.DAGS_FOLDER``, which Airflow fixes at import time.
    """
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(folder))
    monkeypatch.setattr(airflow.settings, "DAGS_FOLDER", str(folder))
