"""Tracking is not the source of truth: MLflow failing (a registry error, the server stopped) never
promotes, never registers twice, never loses a trial's result; once MLflow is back the work finishes.

A dedicated MLflow server (PostgreSQL backend, S3 artifacts) serves this module, so stopping it leaves
the session's server alone. Registry errors at one endpoint come from a proxy in front of it
(:mod:`tests.fault_proxy`); outages are the real server stopped and started again on the same port.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from hpo_core.deployment import Deployment
from hpo_core.errors import TrackingError
from hpo_core.keys import StudyAttr, Tag, TrialAttr
from hpo_core.spec import StudySpec
from hpo_core.study.finalize import finalize_study
from hpo_core.study.observe import observe_round
from hpo_core.study.start import start_study
from hpo_core.study.suggest import suggest_batch
from hpo_core.tracking import promotion, registry
from hpo_core.tracking.lineage import lineage_tags
from hpo_core.worker import run_slot
from tests.fault_proxy import FaultProxy
from tests.fixtures_core import make_spec, worker_env
from tests.services import MLflowServer, MotoS3Server, PostgresServer, ServiceStartError

pytestmark = pytest.mark.slow


@dataclass
class Outage:
    """The module's own MLflow server, a fault proxy in front of it, and the Optuna storage."""

    server: MLflowServer
    proxy: FaultProxy
    storage_url: str
    s3_env: dict[str, str]

    def deployment(self, *, via_proxy: bool = False) -> Deployment:
        uri = self.proxy.url if via_proxy else self.server.tracking_uri
        return Deployment(storage_url=self.storage_url, tracking_uri=uri)

    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.server.tracking_uri)

    def stopped(self) -> None:
        self.server.stop()
        assert self.server.down()

    def back(self) -> None:
        try:
            self.server.start()
        except ServiceStartError as e:
            pytest.fail(f"the MLflow server did not come back: {e}", pytrace=False)


@pytest.fixture(scope="module")
def outage(
    postgres_server: PostgresServer,
    s3_server: MotoS3Server,
    services_workdir: Path,
    optuna_storage_url: str,
) -> Iterator[Outage]:
    server = MLflowServer(
        backend_store_uri=postgres_server.create_database("hpo_mlflow_outage"),
        s3=s3_server,
        workdir=services_workdir / "mlflow-outage",
        artifact_prefix="mlflow-outage",
    )
    try:
        server.start()
    except ServiceStartError as e:
        server.stop()
        pytest.fail(f"the module's MLflow server could not be started: {e}", pytrace=False)
    proxy = FaultProxy(server.tracking_uri).start()
    try:
        yield Outage(server, proxy, optuna_storage_url, s3_server.env())
    finally:
        proxy.stop()
        server.stop()


@pytest.fixture
def process_env(outage: Outage, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Deployment], None]]:
    """Point this process at a deployment (MLflow's URIs, S3) with no HTTP retries: a refused or
    failed call fails at once instead of after MLflow's minutes of back-off."""
    for key, value in outage.s3_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")

    def use(deployment: Deployment) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", deployment.tracking_uri)
        mlflow.set_tracking_uri(deployment.tracking_uri)
        mlflow.set_registry_uri(deployment.tracking_uri)

    yield use
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _spec(name: str, **changes: Any) -> StudySpec:
    return make_spec(
        name=name,
        budget={"n_trials": 1, "batch_size": 1, "max_rounds": 1},
        mlflow={"experiment": name, "registered_model": name},
        promotion={"rule": "if_better"},
        **changes,
    )


def _evaluated_study(outage: Outage, spec: StudySpec, deployment: Deployment) -> str:
    """Start a study, suggest its one round and evaluate it with the slot worker; the study's name."""
    run_id = f"manual__{secrets.token_hex(4)}"
    handle = start_study(spec, deployment=deployment, dag_id=spec.dag_id, run_id=run_id)
    name = handle["study_name"]
    batch, _ = suggest_batch(
        deployment=deployment, study_name=name, round_number=1, dag_id=spec.dag_id, run_id=run_id
    )
    outcomes = run_slot(
        deployment=deployment, study_name=name, trial_numbers=[t["trial_number"] for t in batch]
    )
    assert [o.state for o in outcomes] == ["COMPLETE"] * len(batch), outcomes
    return name


def _versions(client: mlflow.MlflowClient, model: str) -> list[Any]:
    return list(client.search_model_versions(f"name = '{model}'"))


# ----------------------------------------------------------------------- registry errors


def test_a_registry_error_on_the_champion_alias_never_promotes(
    outage: Outage, process_env: Callable[[Deployment], None]
) -> None:
    """The registry fails when finalize asks for the champion: under if_better that is an error, not
    "no champion yet"; the challenger is not promoted, and a retry decides correctly."""
    spec = _spec(f"reg_alias_{secrets.token_hex(3)}")
    model = spec.mlflow.registered_model
    assert model is not None
    direct = outage.deployment()
    process_env(direct)
    first = finalize_study(deployment=direct, study_name=_evaluated_study(outage, spec, direct))
    assert first["promotion"]["promoted"] is True  # the first version becomes the champion
    champion = first["model_version"]
    second = _evaluated_study(outage, spec, direct)
    # The second study's model is registered (finalize's first step) before the registry fails.
    study = optuna.load_study(study_name=second, storage=outage.storage_url)
    (best,) = study.trials
    challenger = registry.register_trial_model(
        outage.client(),
        name=model,
        model_uri=best.user_attrs[TrialAttr.MODEL_URI],
        tags=lineage_tags(second, spec, best, attrs=study.user_attrs),
    )

    # The registry fails once when finalize's promotion step asks who the champion is.
    via_proxy = outage.deployment(via_proxy=True)
    process_env(via_proxy)
    client = mlflow.MlflowClient(tracking_uri=outage.proxy.url)
    fault = outage.proxy.fail(r"/registered-models/(get|alias)\?", times=1)
    try:
        with pytest.raises(TrackingError, match=r"'champion' alias .*registry answered"):
            promotion.apply_rule(client, spec, version=challenger)
    finally:
        outage.proxy.clear()
    assert fault.hits, "the champion was never asked for"
    assert client.get_model_version_by_alias(model, "champion").version == champion
    assert Tag.DECISION not in client.get_model_version(model, challenger).tags  # nothing decided

    again = finalize_study(deployment=via_proxy, study_name=second)  # the retry
    assert again["model_version"] == challenger  # registered once, found again
    # Versions without a data fingerprint cannot be compared: with the registry up, the honest
    # answer is "not promoted, a person decides".
    assert again["promotion"]["promoted"] is False
    assert again["promotion"]["champion_version"] == champion
    assert client.get_model_version_by_alias(model, "champion").version == champion
    assert sorted(v.version for v in _versions(client, model)) == sorted([champion, challenger])


def test_decide_raises_on_a_registry_error_instead_of_seeing_no_champion(
    outage: Outage, process_env: Callable[[Deployment], None]
) -> None:
    spec = _spec(f"reg_decide_{secrets.token_hex(3)}")
    process_env(outage.deployment(via_proxy=True))
    client = mlflow.MlflowClient(tracking_uri=outage.proxy.url)
    outage.proxy.fail(r"/registered-models/(get|alias)", times=1)
    try:
        with pytest.raises(TrackingError, match="champion"):
            promotion.decide(client, spec, version="1")
    finally:
        outage.proxy.clear()
    # "Does not exist" still means "none": a model never registered has no champion.
    decision = promotion.decide(client, spec, version="1")
    assert (decision.promoted, decision.reason) == (True, "rule 'if_better': no champion yet")


# ----------------------------------------------------------------------- the server stopped


def _wait(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(0.2)


def test_trials_go_on_while_mlflow_is_down_and_their_runs_are_logged_when_it_is_back(
    outage: Outage, process_env: Callable[[Deployment], None], tmp_path: Path
) -> None:
    """One slot of two trials: MLflow stops while the first runs (its run cannot be closed) and is
    down when the second starts (no run at all). Both results reach Optuna, the round's observe
    goes on and marks both missing; once MLflow is back, observe logs them and the round summary."""
    name = f"down_trial_{secrets.token_hex(3)}"
    spec = make_spec(
        name=name,
        objective="tests.objectives:waits_for_release",
        budget={"n_trials": 2, "batch_size": 2, "max_rounds": 1},
        worker={"trials_per_task": 2},
        mlflow={"experiment": name},
    )
    deployment = outage.deployment()
    process_env(deployment)
    run_id = f"manual__{secrets.token_hex(4)}"
    study_name = start_study(spec, deployment=deployment, dag_id=spec.dag_id, run_id=run_id)["study_name"]
    batch, _ = suggest_batch(
        deployment=deployment, study_name=study_name, round_number=1, dag_id=spec.dag_id, run_id=run_id
    )
    numbers = [t["trial_number"] for t in batch]
    release = tmp_path / "release"
    command = [sys.executable, "-m", "hpo_core.worker", "--study-name", study_name]
    for number in numbers:
        command += ["--trial-number", str(number)]
    env = worker_env(deployment, **outage.s3_env, HPO_TEST_RELEASE=str(release))
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"  # the worker's bounded default, only shorter
    worker = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        study = optuna.load_study(study_name=study_name, storage=outage.storage_url)
        _wait(
            lambda: TrialAttr.MLFLOW_RUN in study.trials[numbers[0]].user_attrs,
            timeout=120,
            what="the first trial runs with its MLflow run",
        )
        outage.stopped()
        release.touch()
        output, _ = worker.communicate(timeout=240)
    finally:
        worker.kill()
    try:
        assert worker.returncode == 0, output
        trials = {t.number: t for t in study.get_trials()}
        assert [trials[n].state for n in numbers] == [TrialState.COMPLETE] * 2, output
        assert "child run not closed" in trials[numbers[0]].user_attrs[TrialAttr.TRACKING_MISSING]
        assert "no child run" in trials[numbers[1]].user_attrs[TrialAttr.TRACKING_MISSING]
        assert TrialAttr.MLFLOW_RUN not in trials[numbers[1]].user_attrs
        # The round goes on: observe decides and stores its summary, marking the runs missing.
        summary = observe_round(deployment=deployment, study_name=study_name, round_number=1)
        assert (summary["complete"], summary["tracking_missing"]) == (2, numbers)
        assert summary["stop_reason"] == "budget spent: 2 of 2 trials"
        stored = optuna.load_study(study_name=study_name, storage=outage.storage_url).user_attrs
        assert stored[f"{StudyAttr.ROUND_SUMMARY_PREFIX}1"]["tracking_missing"] == numbers
        assert stored[StudyAttr.ROUNDS_UNLOGGED] == [1]
    finally:
        outage.back()

    again = observe_round(deployment=deployment, study_name=study_name, round_number=1)  # a retry
    assert again["tracking_missing"] == []
    parent = _assert_logged_late(outage, study_name, trials, numbers)
    result = finalize_study(deployment=deployment, study_name=study_name)
    assert result["best_trial"] in numbers
    assert outage.client().get_run(parent).info.status == "FINISHED"


def _assert_logged_late(
    outage: Outage, study_name: str, trials: dict[int, optuna.trial.FrozenTrial], numbers: list[int]
) -> str:
    """Both trials' runs are in MLflow now, closed like the worker would have; returns the parent run."""
    attrs = optuna.load_study(study_name=study_name, storage=outage.storage_url).user_attrs
    logged = attrs[StudyAttr.RUNS_LOGGED_LATE]
    assert sorted(logged) == sorted(str(n) for n in numbers)
    assert logged[str(numbers[0])] == trials[numbers[0]].user_attrs[TrialAttr.MLFLOW_RUN]
    assert attrs[StudyAttr.ROUNDS_UNLOGGED] == []
    client = outage.client()
    for number in numbers:
        run = client.get_run(logged[str(number)])
        assert run.info.status == "FINISHED"
        assert run.data.metrics["loss"] == pytest.approx(trials[number].value)
        assert run.data.tags["hpo.trial_number"] == str(number)
        assert run.data.tags[Tag.LOGGED_LATE] == trials[number].user_attrs[TrialAttr.TRACKING_MISSING]
        assert run.data.params["x"] == str(trials[number].params["x"])
        assert run.data.tags["mlflow.parentRunId"] == attrs[StudyAttr.PARENT_RUN]
    parent = attrs[StudyAttr.PARENT_RUN]
    assert [a.path for a in client.list_artifacts(parent, "rounds")] == ["rounds/round_001.json"]
    return str(parent)


def test_finalize_fails_while_mlflow_is_down_and_succeeds_on_retry_never_promoting_or_registering_twice(
    outage: Outage, process_env: Callable[[Deployment], None]
) -> None:
    spec = _spec(f"down_final_{secrets.token_hex(3)}")
    model = spec.mlflow.registered_model
    assert model is not None
    deployment = outage.deployment()
    process_env(deployment)
    study_name = _evaluated_study(outage, spec, deployment)
    observe_round(deployment=deployment, study_name=study_name, round_number=1)
    parent = optuna.load_study(study_name=study_name, storage=outage.storage_url).user_attrs[
        StudyAttr.PARENT_RUN
    ]

    outage.stopped()
    try:
        with pytest.raises(
            TrackingError, match=r"registry answered .*Connection refused.*nothing registered"
        ):
            finalize_study(deployment=deployment, study_name=study_name)
    finally:
        outage.back()
    client = outage.client()
    assert _versions(client, model) == []  # nothing registered, nothing promoted
    assert client.get_run(parent).info.status == "RUNNING"

    result = finalize_study(deployment=deployment, study_name=study_name)  # the retry
    assert result["model_version"] == "1"
    assert result["promotion"]["promoted"] is True
    assert result["promotion"]["reason"] == "rule 'if_better': no champion yet"
    assert client.get_model_version_by_alias(model, "champion").version == "1"
    assert client.get_run(parent).info.status == "FINISHED"
    assert finalize_study(deployment=deployment, study_name=study_name)["model_version"] == "1"
    assert [v.version for v in _versions(client, model)] == ["1"]
    _assert_a_failed_registry_search_never_registers_twice(
        outage, process_env, spec, study_name, dict(result)
    )


def _assert_a_failed_registry_search_never_registers_twice(
    outage: Outage,
    process_env: Callable[[Deployment], None],
    spec: StudySpec,
    study_name: str,
    result: dict[str, Any],
) -> None:
    """The registry fails to answer whether the trial's model is registered: an error, not "not
    registered yet", so the model is not registered a second time."""
    model = spec.mlflow.registered_model
    assert model is not None
    process_env(outage.deployment(via_proxy=True))
    client = mlflow.MlflowClient(tracking_uri=outage.proxy.url)
    study = optuna.load_study(study_name=study_name, storage=outage.storage_url)
    best = study.trials[result["best_trial"]]
    tags = lineage_tags(study_name, spec, best, attrs=study.user_attrs)
    outage.proxy.fail(r"/model-versions/search", times=1)
    try:
        with pytest.raises(TrackingError, match=r"already has a version .*nothing registered"):
            registry.register_trial_model(
                client, name=model, model_uri=best.user_attrs[TrialAttr.MODEL_URI], tags=tags
            )
    finally:
        outage.proxy.clear()
    assert [v.version for v in _versions(outage.client(), model)] == [result["model_version"]]
    found = registry.find_version(client, name=model, study=study_name, trial_number=str(best.number))
    assert found is not None and found.version == result["model_version"]
