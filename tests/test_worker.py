"""The trial worker command on a real storage and MLflow: outcomes, failures, retry semantics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from hpo_core.deployment import Deployment
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.study.accounting import count_trials
from hpo_core.study.observe import observe_round
from hpo_core.study.suggest import suggest_batch
from hpo_core.worker import run_slot
from tests.fixtures_core import run_worker

X_ONLY = {"x": {"type": "float", "low": -5.0, "high": 5.0}}
NO_MODEL = {"experiment": "quadratic"}


def _one_trial(deployment: Deployment, start: Callable[..., str], **changes: Any) -> tuple[str, int]:
    name = start(**changes)
    batch, _ = suggest_batch(deployment=deployment, study_name=name, round_number=1)
    return name, batch[0]["trial_number"]


def _trial(deployment: Deployment, name: str, number: int) -> optuna.trial.FrozenTrial:
    study = optuna.load_study(study_name=name, storage=deployment.storage_url)
    return next(t for t in study.get_trials() if t.number == number)


def _child_runs(deployment: Deployment, name: str) -> list[Any]:
    client = mlflow.MlflowClient(tracking_uri=deployment.tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(
        exps, filter_string=f"tags.`hpo.study` = '{name}' and tags.`hpo.role` = 'trial'"
    )


def test_worker_completes_a_trial_and_logs_a_child_run(
    local_deployment: Deployment, start_toy_study: Callable[..., str]
) -> None:
    name, n = _one_trial(local_deployment, start_toy_study)
    code, result, output = run_worker(local_deployment, name, n)
    assert code == 0, output
    assert result is not None and result["state"] == "COMPLETE"
    trial = _trial(local_deployment, name, n)
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(result["values"][0])
    assert trial.user_attrs[TrialAttr.MODEL_URI].startswith("models:/")
    assert sorted(trial.intermediate_values) == [0, 1, 2]
    (run,) = _child_runs(local_deployment, name)
    study = optuna.load_study(study_name=name, storage=local_deployment.storage_url)
    assert run.data.tags["mlflow.parentRunId"] == study.user_attrs[StudyAttr.PARENT_RUN]
    assert run.data.tags["hpo.trial_number"] == str(n)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["loss"] == pytest.approx(trial.value)
    assert set(run.data.params) == set(trial.params)


def test_worker_refuses_to_rerun_a_finished_trial(
    local_deployment: Deployment, start_toy_study: Callable[..., str]
) -> None:
    name, n = _one_trial(local_deployment, start_toy_study)
    assert run_worker(local_deployment, name, n)[0] == 0
    before = _trial(local_deployment, name, n)
    code, result, output = run_worker(local_deployment, name, n, attempt=2)
    assert code == 0, output
    assert result is not None and result["already_finished"] is True
    assert "already COMPLETE: not evaluating it again" in output
    after = _trial(local_deployment, name, n)
    assert after.value == before.value and after.datetime_complete == before.datetime_complete
    assert len(_child_runs(local_deployment, name)) == 1  # no second evaluation was logged


@pytest.mark.parametrize(
    ("objective", "reason"),
    [
        ("tests.objectives:raises", "RuntimeError: boom at x="),
        ("tests.objectives:returns_nan", "ObjectiveError: objective value 'loss' is NaN"),
        (
            "tests.objectives:returns_string",
            "ObjectiveError: objective returned str '0.93'; expected a number or a dict with key(s) ['loss']",
        ),
        (
            "tests.objectives:optuna_undeclared",
            "SearchSpaceError: objective asked for parameter 'depth', which the study's search_space does "
            "not declare (declared: ['x']); add it to the study file",
        ),
    ],
    ids=["raises", "nan", "string", "undeclared_param"],
)
def test_bad_objective_fails_the_trial_with_its_reason(
    local_deployment: Deployment, start_toy_study: Callable[..., str], objective: str, reason: str
) -> None:
    # No registered model: an Optuna objective(trial) that logs none would be refused at start.
    name, n = _one_trial(
        local_deployment, start_toy_study, objective=objective, search_space=X_ONLY, mlflow=NO_MODEL
    )
    code, result, output = run_worker(local_deployment, name, n)
    assert code == 1, output
    assert result is not None and result["state"] == "FAIL"
    trial = _trial(local_deployment, name, n)
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"].startswith(reason)
    (run,) = _child_runs(local_deployment, name)
    assert run.info.status == "FAILED"
    assert run.data.tags["hpo.error"].startswith(reason)
    # The round goes on: the other trials of the batch are untouched and still evaluable.
    study = optuna.load_study(study_name=name, storage=local_deployment.storage_url)
    others = [t for t in study.trials if t.number != n and TrialAttr.ROUND in t.user_attrs]
    assert others and all(t.state == TrialState.RUNNING for t in others)


def test_optuna_style_objective_gets_the_suggested_params(
    local_deployment: Deployment, start_toy_study: Callable[..., str]
) -> None:
    name, n = _one_trial(
        local_deployment,
        start_toy_study,
        objective="tests.objectives:optuna_style",
        search_space=X_ONLY,
        mlflow=NO_MODEL,
    )
    code, _, output = run_worker(local_deployment, name, n)
    assert code == 0, output
    trial = _trial(local_deployment, name, n)
    assert trial.value == pytest.approx((trial.params["x"] - 2.0) ** 2)
    assert trial.intermediate_values == {0: pytest.approx(trial.params["x"])}


def test_retry_of_a_failed_trial_creates_a_replacement_with_the_same_params(
    storage_deployment: Deployment, start_on_storage: Callable[..., str], tmp_path: Path
) -> None:
    name, n = _one_trial(
        storage_deployment,
        start_on_storage,
        objective="tests.objectives:fails_first_attempt",
        search_space=X_ONLY,
    )
    markers = {"HPO_TEST_MARKERS": str(tmp_path / "markers")}
    assert run_worker(storage_deployment, name, n, extra_env=markers)[0] == 1
    code, result, output = run_worker(storage_deployment, name, n, attempt=2, extra_env=markers)
    assert code == 0, output
    assert result is not None and result["retry_of"] == n and result["trial_number"] != n
    study = optuna.load_study(study_name=name, storage=storage_deployment.storage_url)
    first = next(t for t in study.trials if t.number == n)
    second = next(t for t in study.trials if t.number == result["trial_number"])
    assert first.state == TrialState.FAIL and second.state == TrialState.COMPLETE
    assert second.params == first.params
    assert second.user_attrs[TrialAttr.RETRY_OF] == n
    assert second.user_attrs[TrialAttr.ROUND] == first.user_attrs[TrialAttr.ROUND]
    counts = count_trials(study)
    assert counts.failed == 0  # the replaced trial does not count, its replacement does
    assert counts.counted == 3  # the batch of 3, not 4
    # A third attempt finds the finished replacement and does nothing.
    code, result, _ = run_worker(storage_deployment, name, n, attempt=3, extra_env=markers)
    assert code == 0 and result is not None and result["already_finished"]
    assert len(optuna.load_study(study_name=name, storage=storage_deployment.storage_url).trials) == 4


def test_retry_takes_over_a_trial_left_running(
    storage_deployment: Deployment, start_on_storage: Callable[..., str]
) -> None:
    name, n = _one_trial(storage_deployment, start_on_storage)
    study = optuna.load_study(study_name=name, storage=storage_deployment.storage_url)
    trial_id = next(t._trial_id for t in study.trials if t.number == n)
    study._storage.set_trial_user_attr(
        trial_id, "hpo.worker", {"pid": 999999, "attempt": 1}
    )  # a dead attempt
    code, result, output = run_worker(storage_deployment, name, n, attempt=2)
    assert code == 0, output
    assert result is not None and result["trial_number"] == n and result["retry_of"] is None
    assert _trial(storage_deployment, name, n).state == TrialState.COMPLETE
    assert len(optuna.load_study(study_name=name, storage=storage_deployment.storage_url).trials) == 3


def test_hung_objective_hits_the_trial_timeout(
    local_deployment: Deployment, start_toy_study: Callable[..., str]
) -> None:
    name, n = _one_trial(
        local_deployment, start_toy_study, objective="tests.objectives:hangs", search_space=X_ONLY
    )
    code, _, output = run_worker(local_deployment, name, n, timeout=2)
    assert code == 1, output
    trial = _trial(local_deployment, name, n)
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "timeout: the objective ran longer than 2s"


def test_worker_without_a_started_study_is_a_clear_setup_error(local_deployment: Deployment) -> None:
    code, result, output = run_worker(local_deployment, "nope.manual__x", 0)
    assert code == 2 and result is None
    assert "study 'nope.manual__x' does not exist; did the 'start' task run?" in output


def test_in_process_slot_logs_to_the_study_experiment_whatever_the_caller_set(
    local_deployment: Deployment, start_toy_study: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm worker inside a process that already chose another MLflow experiment (an Airflow task
    process, a notebook) still logs each trial, and its model, to the study's own experiment."""
    name = start_toy_study()
    batch, _ = suggest_batch(deployment=local_deployment, study_name=name, round_number=1)
    mlflow.set_tracking_uri(local_deployment.tracking_uri)
    mlflow.set_experiment("somebody_elses_experiment")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "somebody_elses_experiment")
    lines: list[str] = []
    outcomes = run_slot(
        deployment=local_deployment,
        study_name=name,
        trial_numbers=[e["trial_number"] for e in batch],
        relay=lines.append,
    )
    assert [o.state for o in outcomes] == ["COMPLETE"] * len(batch), "\n".join(lines)
    study = optuna.load_study(study_name=name, storage=local_deployment.storage_url)
    experiment = study.user_attrs[StudyAttr.EXPERIMENT]
    runs = _child_runs(local_deployment, name)
    assert len(runs) == len(batch) and {r.info.experiment_id for r in runs} == {experiment}
    model_uri = next(t for t in study.get_trials() if t.number == batch[0]["trial_number"]).user_attrs[
        TrialAttr.MODEL_URI
    ]
    assert (
        mlflow.MlflowClient().get_logged_model(model_uri.removeprefix("models:/")).experiment_id == experiment
    )


def test_observe_closes_the_trials_a_round_left_running_and_counts_them(
    storage_deployment: Deployment, start_on_storage: Callable[..., str]
) -> None:
    """Reconciling on each storage: the round's tasks ended, two trials never reported."""
    name = start_on_storage()
    batch, _ = suggest_batch(deployment=storage_deployment, study_name=name, round_number=1)
    study = optuna.load_study(study_name=name, storage=storage_deployment.storage_url)
    study.tell(batch[0]["trial_number"], 1.5)
    summary = observe_round(
        deployment=storage_deployment,
        study_name=name,
        round_number=1,
        task_states={entry["map_index"]: "failed" for entry in batch},
    )
    lost = sorted(entry["trial_number"] for entry in batch[1:])
    assert sorted(summary["reconciled"]) == lost
    assert (summary["complete"], summary["failed"], summary["counted"]) == (1, 2, 3)
    for number in lost:
        trial = _trial(storage_deployment, name, number)
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs["fail_reason"] == (
            "worker ended without reporting a result (Airflow task state: failed)"
        )
    again = observe_round(deployment=storage_deployment, study_name=name, round_number=1)
    assert (again["complete"], again["failed"], again["counted"]) == (1, 2, 3)
    counts = count_trials(optuna.load_study(study_name=name, storage=storage_deployment.storage_url))
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (3, 1, 2, 0)


def test_a_crash_of_the_worker_has_its_own_exit_code(
    local_deployment: Deployment, start_toy_study: Callable[..., str]
) -> None:
    """Exit 1 means "a trial failed"; a worker that crashes on something unforeseen (here a stored
    spec that is not JSON) exits 3 with the traceback, and touches no trial."""
    name, n = _one_trial(local_deployment, start_toy_study)
    study = optuna.load_study(study_name=name, storage=local_deployment.storage_url)
    study.set_user_attr(StudyAttr.SPEC, "{not json")
    code, result, output = run_worker(local_deployment, name, n)
    assert (code, result) == (3, None), output
    assert f"the worker crashed while running trials [{n}]" in output
    assert "json.decoder.JSONDecodeError" in output
    assert _trial(local_deployment, name, n).state == TrialState.RUNNING
