"""An unchanged Optuna objective registers a model: the refit hook, or MLflow logging in the objective.

The trials run in the real warm slot worker; the second study's ``finalize`` runs as the Airflow task
body in a process set up like a task process (Airflow's logging and warning filters), where its
promotion gate re-scores champion and challenger: its output carries our lines, not the stack's
deprecation warnings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import mlflow
import optuna
import pytest

from hpo_core import cli
from hpo_core.deployment import Deployment
from hpo_core.errors import StudySpecError
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.study.finalize import finalize_study
from hpo_core.study.observe import observe_round
from hpo_core.study.start import start_study
from hpo_core.study.suggest import suggest_batch
from hpo_core.worker import run_slot
from tests.fixtures_core import make_spec, worker_env

SPACE = {
    "classifier": {"type": "categorical", "choices": ["SVC", "RandomForest"]},
    "svc_c": {
        "type": "float", "low": 1e-10, "high": 1e10, "log": True,
        "condition": {"param": "classifier", "equals": "SVC"},
    },
    "rf_max_depth": {
        "type": "int", "low": 2, "high": 32, "log": True,
        "condition": {"param": "classifier", "equals": "RandomForest"},
    },
}  # fmt: skip
STUDY: dict[str, Any] = {
    "name": "sklearn_simple",
    "objective": "tests.sklearn_simple:objective",
    "direction": "maximize",
    "metric": "accuracy",
    "search_space": SPACE,
    "sampler": {"type": "random", "seed": 3},
    "budget": {"n_trials": 2, "batch_size": 2, "max_rounds": 1},
    "mlflow": {"experiment": "sklearn_simple", "registered_model": "sklearn_simple"},
    "promotion": {"rule": "if_better"},
}

#: The finalize task body in a process like Airflow's task process (its logging, its warning filters).
FINALIZE_TASK = """
import json, sys
from types import SimpleNamespace
import airflow.sdk  # noqa: F401
from airflow.sdk.execution_time.context import set_current_context
from hpo_airflow import tasks

class TaskInstance:
    def get_task_states(self, **_):
        return {}

context = {"dag_run": SimpleNamespace(dag_id="hpo_sklearn_simple", run_id=sys.argv[2]), "ti": TaskInstance()}
with set_current_context(context):
    result = tasks.finalize({"study_name": sys.argv[1]})
print("FINALIZED " + json.dumps(result, default=str))
"""


def _run_trials(deployment: Deployment, run_id: str, **changes: Any) -> str:
    spec = make_spec(**{**STUDY, **changes})
    name = str(start_study(spec, deployment=deployment, dag_id=spec.dag_id, run_id=run_id)["study_name"])
    batch, _ = suggest_batch(deployment=deployment, study_name=name, round_number=1)
    lines: list[str] = []
    outcomes = run_slot(
        deployment=deployment,
        study_name=name,
        trial_numbers=[e["trial_number"] for e in batch],
        relay=lines.append,
    )
    assert [o.state for o in outcomes] == ["COMPLETE"] * len(batch), "\n".join(lines)
    observe_round(deployment=deployment, study_name=name, round_number=1)
    return name


def test_unchanged_optuna_objective_without_a_model_is_refused_before_any_trial(
    local_deployment: Deployment,
) -> None:
    spec = make_spec(**STUDY)
    with pytest.raises(StudySpecError, match=r"mlflow\.registered_model: 'sklearn_simple' needs a model"):
        start_study(spec, deployment=local_deployment, dag_id=spec.dag_id, run_id="manual__refused")
    assert optuna.get_all_study_summaries(local_deployment.storage_url) == []


def test_refit_hook_registers_the_best_params_model_and_finalize_logs_no_stack_warnings(
    local_deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    refit = {"refit": "tests.sklearn_simple:refit"}
    first = _run_trials(local_deployment, "manual__first", **refit)
    result = finalize_study(deployment=local_deployment, study_name=first)
    assert result["model_version"] == "1" and result["promotion"]["promoted"]  # no champion yet
    client = mlflow.MlflowClient(tracking_uri=local_deployment.tracking_uri)
    version = client.get_model_version("sklearn_simple", "1")
    refit_run = client.get_run(version.tags["hpo.mlflow_run_id"])
    assert refit_run.data.tags["hpo.role"] == "refit" and refit_run.info.status == "FINISHED"
    assert refit_run.data.tags["hpo.refit"] == "tests.sklearn_simple:refit"
    assert version.tags["hpo.trial_number"] == str(result["best_trial"])
    assert refit_run.data.params["classifier"] == result["best_params"]["classifier"]
    # finalize again: the same version, no second refit.
    again = finalize_study(deployment=local_deployment, study_name=first)
    assert again["model_version"] == "1"
    assert len(client.search_runs([refit_run.info.experiment_id], "tags.`hpo.role` = 'refit'")) == 1

    second = _run_trials(local_deployment, "manual__second", sampler={"type": "random", "seed": 4}, **refit)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FINALIZE_TASK), second, "manual__second"],
        env=worker_env(local_deployment),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("FINALIZED ")]
    finalized = json.loads(line.removeprefix("FINALIZED "))
    assert finalized["model_version"] == "2"
    assert finalized["promotion"]["comparison"].startswith("re-scored on this run's data")
    noise = [x for x in output.splitlines() if "DeprecationWarning" in x or "DeprecatedImportWarning" in x]
    assert noise == [], f"{len(noise)} deprecation lines, e.g. {noise[:3]}"

    # The refit model has no input example: --check-model says so instead of claiming it predicts.
    assert cli.main(["summary", "--study", second, "--check-model"]) == 0
    assert "loads and predicts: not checked: the model has no input example" in capsys.readouterr().out


def test_optuna_objective_that_logs_its_model_with_mlflow_registers_it(local_deployment: Deployment) -> None:
    space = {"rf_max_depth": SPACE["rf_max_depth"] | {"condition": None}}
    objective = "tests.sklearn_simple:logs_its_model"
    name = _run_trials(local_deployment, "manual__logged", objective=objective, search_space=space)
    study = optuna.load_study(study_name=name, storage=local_deployment.storage_url)
    assert all(t.user_attrs[TrialAttr.MODEL_URI].startswith("models:/m-") for t in study.trials)
    result = finalize_study(deployment=local_deployment, study_name=name)
    best = next(t for t in study.trials if t.number == result["best_trial"])
    client = mlflow.MlflowClient(tracking_uri=local_deployment.tracking_uri)
    version = client.get_model_version("sklearn_simple", str(result["model_version"]))
    assert version.source == best.user_attrs[TrialAttr.MODEL_URI]
    assert StudyAttr.REFIT not in study.user_attrs
