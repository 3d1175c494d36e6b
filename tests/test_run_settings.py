"""What the trigger form accepts makes a run; finalize never reports success it cannot vouch for;
the example's promotion gate scores held-out rows."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import mlflow
import numpy as np
import optuna
import pytest
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import AirflowException
from airflow.sdk.execution_time.context import set_current_context
from hpo_airflow import study_params, tasks

from hpo_core.deployment import Deployment
from hpo_core.examples import breast_cancer
from hpo_core.keys import StudyAttr
from hpo_core.objective import TrialContext
from hpo_core.spec import load_spec
from hpo_core.study.config import RunConfig
from hpo_core.study.suggest import suggest_batch
from hpo_core.tracking.promotion import EvaluationContext
from tests.fixtures_core import ROOT, make_spec


def test_every_n_trials_the_form_accepts_makes_a_run() -> None:
    spec = load_spec(ROOT / "dags" / "studies" / "breast_cancer_gbm.yaml")  # 4 rounds, batch 4, max 8
    form = ParamsDict(study_params(spec))
    assert form["n_trials"] == spec.budget.n_trials
    highest = form.get_param("n_trials").schema["maximum"]
    assert highest == 32
    for n_trials in range(1, highest + 1):
        conf = ParamsDict(study_params(spec))
        conf.update({"n_trials": n_trials})  # the form's default batch size, 4
        config = RunConfig.resolve(spec, conf.validate())
        assert config.n_trials <= spec.budget.max_rounds * config.batch_size
        assert config.batch_size <= spec.budget.batch_size_limit
    config = RunConfig.resolve(spec, {"n_trials": 32, "batch_size": 4})
    assert (config.batch_size, config.adjusted) == (
        8,
        "batch_size raised from 4 to 8: 32 trials must fit in max_rounds=4",
    )


def test_a_run_asking_for_more_trials_than_its_batch_fits_runs_with_a_larger_batch(
    local_deployment: Deployment, start_toy_study: Callable[..., str]
) -> None:
    name = start_toy_study(overrides={"n_trials": 12, "batch_size": 3})  # 3 rounds, max batch 4
    study = optuna.load_study(study_name=name, storage=local_deployment.storage_url)
    stored = study.user_attrs[StudyAttr.RUN_CONFIG]
    assert (stored["batch_size"], stored["adjusted"]) == (
        4,
        "batch_size raised from 3 to 4: 12 trials must fit in max_rounds=3",
    )
    batch, _ = suggest_batch(deployment=local_deployment, study_name=name, round_number=1)
    assert len(batch) == 4
    parent = study.user_attrs[StudyAttr.PARENT_RUN]
    params = mlflow.MlflowClient(tracking_uri=local_deployment.tracking_uri).get_run(parent).data.params
    assert (params["batch_size"], params["n_trials"]) == ("4", "12")


class _UnreachableTaskStates:
    """Airflow's task instance when the API server does not answer."""

    def get_task_states(self, **_: Any) -> dict[str, Any]:
        raise ConnectionError("API server unreachable")


def test_finalize_fails_when_it_cannot_read_the_run_task_states(
    local_deployment: Deployment, start_toy_study: Callable[..., str]
) -> None:
    name = start_toy_study()
    context: Any = {
        "dag_run": SimpleNamespace(dag_id="hpo_quadratic", run_id="manual__test"),
        "ti": _UnreachableTaskStates(),
    }
    with set_current_context(context), pytest.raises(AirflowException) as failed:
        tasks.finalize({"study_name": name})  # type: ignore[typeddict-item]
    assert str(failed.value) == (
        "cannot tell whether this run's start, suggest and observe tasks succeeded (task states "
        "unavailable: ConnectionError: API server unreachable); finalize fails rather than report a success"
    )


class _KeepsTheModel(TrialContext):
    """The trial context with the logged model kept in memory (no MLflow run: this test is about
    which rows the example trains and scores on)."""

    def log_model(self, model: Any, **_: Any) -> str:
        self.model = model
        return "kept"


def _fit_like_the_objective(params: dict[str, Any]) -> Any:
    """Run the example objective as a trial would and return the model it logs for registration."""
    trial = optuna.create_study(direction="maximize").ask()
    ctx = _KeepsTheModel(
        trial=trial, spec=make_spec(), params=params, seed=1, round_number=1, mlflow_run_id=None
    )
    breast_cancer.objective(params, ctx)
    return ctx.model


def test_example_gate_scores_models_on_rows_they_never_saw() -> None:
    train, held_out = breast_cancer.split_indices()
    assert len(np.intersect1d(train, held_out)) == 0 and len(held_out) > 100
    base = {"max_leaf_nodes": 8, "min_samples_leaf": 20, "regularize": False, "max_iter": 50}
    weak = _fit_like_the_objective({**base, "learning_rate": 0.01, "max_depth": 2})
    strong = _fit_like_the_objective({**base, "learning_rate": 0.3, "max_depth": 6})
    scores = []
    for model in (weak, strong):
        ctx = EvaluationContext(spec=make_spec(), model_name="m", version="1", role="challenger", seed=0)
        scores.append(breast_cancer.evaluate(model, ctx))
    # Real held-out scores: below a perfect 1.0 (a model scored on its own training rows gets 1.0
    # with these settings) and different for the two models.
    assert all(0.5 < s < 1.0 for s in scores), scores
    assert scores[0] != scores[1]
    x_train, y_train = breast_cancer.training_data()
    assert strong.score(x_train, y_train) == 1.0  # on rows it trained on: perfect, compares nothing
