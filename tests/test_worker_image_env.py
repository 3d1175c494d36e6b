"""The worker image's Python environment is complete: a clean virtualenv built from exactly
``docker/worker/requirements.txt`` (no Airflow) runs a real trial of the example study against
PostgreSQL, the MLflow server and S3, with only ``hpo_core`` copied in, as in the image."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo_core.deployment import Deployment
from hpo_core.keys import TrialAttr
from hpo_core.spec import load_spec
from hpo_core.study.start import start_study
from hpo_core.study.suggest import suggest_batch
from tests.services import MLflowServer, MotoS3Server

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "docker" / "worker" / "requirements.txt"
CONSTRAINTS = ROOT / "constraints.txt"


@pytest.fixture(scope="session")
def worker_venv() -> Path:
    """A virtualenv with exactly the worker image's requirements (cached by their hash)."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes() + CONSTRAINTS.read_bytes()).hexdigest()[:16]
    venv = ROOT / ".venv-worker"
    python = venv / "bin" / "python"
    stamp = venv / ".requirements-sha"
    with (ROOT / ".venv-worker.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (several test processes, or suites)
        _build_once(venv, python, stamp, digest)
    return python


def _build_once(venv: Path, python: Path, stamp: Path, digest: str) -> None:
    """Create the worker venv unless the stamp says it is there with these requirements."""
    if not (python.exists() and stamp.exists() and stamp.read_text() == digest):
        shutil.rmtree(venv, ignore_errors=True)
        # uv (installed beside this interpreter by scripts/_bootstrap.sh) installs the same pinned
        # wheels as the image's pip, in seconds; pip when it is not there.
        uv = Path(sys.executable).parent / "uv"
        install = (
            [str(uv), "pip", "install", "--quiet", "--python", str(python)]
            if uv.exists()
            else [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        )
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [*install, "-r", str(REQUIREMENTS), "-c", str(CONSTRAINTS)],
        ]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
            if proc.returncode != 0:
                pytest.fail(f"building the worker venv failed: {' '.join(step)}\n{proc.stdout}{proc.stderr}")
        stamp.write_text(digest)


def test_worker_requirements_hold_no_airflow(worker_venv: Path) -> None:
    proc = subprocess.run(
        [str(worker_venv), "-c", "import importlib.util as u; print(u.find_spec('airflow') is None)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "True"
    requirements = [line.split("==")[0].strip().lower() for line in REQUIREMENTS.read_text().splitlines()
                    if line.strip() and not line.startswith("#")]  # fmt: skip
    assert not [r for r in requirements if r.startswith("apache-airflow")]


@pytest.mark.slow
def test_worker_venv_runs_a_trial_of_the_example(
    worker_venv: Path,
    tmp_path: Path,
    create_database: Callable[[str], str],
    mlflow_server: MLflowServer,
    s3_server: MotoS3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in mlflow_server.env().items():
        monkeypatch.setenv(key, value)
    deployment = Deployment(
        storage_url=create_database("hpo_worker_env"), tracking_uri=mlflow_server.tracking_uri
    )
    spec = load_spec(ROOT / "dags" / "studies" / "breast_cancer_gbm.yaml")
    spec = spec.model_copy(update={"budget": spec.budget.model_copy(update={"n_trials": 1, "batch_size": 1})})
    started = start_study(spec, deployment=deployment, dag_id=spec.dag_id, run_id="manual__image_env")
    batch, _ = suggest_batch(deployment=deployment, study_name=started["study_name"], round_number=1)

    app = tmp_path / "app"  # what the image holds: /app/hpo_core and nothing else of the repo
    shutil.copytree(ROOT / "hpo_core", app / "hpo_core", ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        "PATH": f"{worker_venv.parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(app),
        **deployment.worker_env(),
        **mlflow_server.env(),
    }
    proc = subprocess.run(
        [str(worker_venv), "-m", "hpo_core.worker", "--study-name", started["study_name"],
         "--trial-number", str(batch[0]["trial_number"]), "--attempt", "1"],
        cwd=app, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(
        next(x for x in proc.stdout.splitlines() if x.startswith("HPO_RESULT ")).split(" ", 1)[1]
    )
    assert result["state"] in ("COMPLETE", "PRUNED")
    study = optuna.load_study(study_name=started["study_name"], storage=deployment.storage_url)
    (trial,) = [t for t in study.trials if t.number == batch[0]["trial_number"]]
    assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
    if trial.state == TrialState.COMPLETE:
        assert trial.user_attrs[TrialAttr.MODEL_URI].startswith("models:/")
        assert any(key.endswith("MLmodel") for key in s3_server.list_keys("mlflow/"))
