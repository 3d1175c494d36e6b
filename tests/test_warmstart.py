"""Warm start on a real Optuna storage and MLflow registry: champion and top-k first, invalid ones skipped.

One first study (three fixed configurations, evaluated by the real worker code in-process, its best
registered and promoted) is built once for the module; every test works on its own copy of that
state, so the "previous study" each test sees is always the first one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from hpo_core.deployment import Deployment
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.spec import StudySpec, validate_mapping
from hpo_core.study.config import study_name_for
from hpo_core.study.finalize import finalize_study
from hpo_core.study.observe import observe_round
from hpo_core.study.start import start_study
from hpo_core.study.suggest import suggest_batch
from hpo_core.tracking import registry
from hpo_core.worker import run_trial

SPACE: dict[str, Any] = {
    "C": {"type": "float", "low": 0.001, "high": 100.0, "log": True},
    "fit_intercept": {"type": "categorical", "choices": [True, False]},
}
#: What the first study evaluates (enqueued by hand, so the test knows the previous study's configs).
FIRST_CONFIGS = [
    {"C": 0.5, "fit_intercept": True},
    {"C": 5.0, "fit_intercept": False},
    {"C": 50.0, "fit_intercept": True},
]
DAY_1 = dt.datetime(2025, 1, 1, 3, tzinfo=dt.UTC)
DAY_2 = dt.datetime(2025, 1, 2, 3, tzinfo=dt.UTC)


def drifting_spec(**changes: Any) -> StudySpec:
    """The drifting-feed study, warm-started from the champion and the previous top 3."""
    data: dict[str, Any] = {
        "name": "drifting",
        "objective": "hpo_core.examples.drifting:objective",
        "direction": "maximize",
        "metric": "roc_auc",
        "search_space": SPACE,
        "sampler": {"type": "tpe", "seed": 5, "n_startup_trials": 2},
        "budget": {"n_trials": 3, "batch_size": 3, "max_rounds": 2},
        "trial": {"retries": 0, "execution_timeout": 120},
        "mlflow": {"experiment": "drifting", "registered_model": "drifting"},
        "warm_start": {"mode": "new_study", "top_k": 3, "from_champion": True},
        "promotion": {"rule": "always"},
    }
    data.update(changes)
    return validate_mapping(data, source="<test>")


def _start(
    deployment: Deployment, spec: StudySpec, run_id: str, logical_date: dt.datetime | None
) -> dict[str, Any]:
    return start_study(
        spec,
        deployment=deployment,
        dag_id=spec.dag_id,
        run_id=run_id,
        study_name=study_name_for(spec, run_id, logical_date=logical_date),
    )


def _run_round(deployment: Deployment, study_name: str, round_number: int) -> list[dict[str, Any]]:
    """Suggest a round, evaluate its trials with the real worker code (in-process), observe it."""
    batch, reason = suggest_batch(deployment=deployment, study_name=study_name, round_number=round_number)
    assert batch, reason
    for entry in batch:
        outcome = run_trial(deployment=deployment, study_name=study_name, trial_number=entry["trial_number"])
        assert outcome.state == "COMPLETE", outcome.reason
    observe_round(deployment=deployment, study_name=study_name, round_number=round_number)
    return batch


def _deployment_at(home: Path, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    monkeypatch.setenv("HPO_HOME", str(home))
    monkeypatch.setenv("HPO_EXAMPLE_DAY", "1")
    for var in ("HPO_STORAGE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "HPO_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    deployment = Deployment.from_env()
    deployment.ensure_local_dirs()
    return deployment


@pytest.fixture(scope="module")
def first_study(
    tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path
) -> Iterator[tuple[Path, str]]:
    """A finished first study whose best model is the champion: ``(hpo home, study name)``."""
    home = tmp_path_factory.mktemp("warmstart-first") / "hpo"
    home.mkdir()
    shutil.copyfile(mlflow_db_template, home / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        deployment = _deployment_at(home, mp)
        spec = drifting_spec()
        started = _start(deployment, spec, "scheduled__2025-01-01", DAY_1)
        name = started["study_name"]
        assert started["warm_start"]["enqueued"] == []  # nothing before the first study
        study = optuna.load_study(study_name=name, storage=deployment.storage_url)
        for params in FIRST_CONFIGS:
            study.enqueue_trial(params)
        _run_round(deployment, name, 1)
        result = finalize_study(deployment=deployment, study_name=name)
        assert result["promotion"]["promoted"] is True
    yield home, name


@pytest.fixture
def deployment(first_study: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    """This test's own copy of the state after the first study (storage and registry)."""
    source, _ = first_study
    home = tmp_path / "hpo"
    home.mkdir()
    for db in ("optuna.db", "mlflow.db"):
        shutil.copyfile(source / db, home / db)
    return _deployment_at(home, monkeypatch)


def _waiting(deployment: Deployment, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=deployment.storage_url)
    return study.get_trials(states=(TrialState.WAITING,))


def test_champion_and_previous_top_k_are_the_first_trials_of_the_next_study(
    deployment: Deployment, first_study: tuple[Path, str]
) -> None:
    _, first_name = first_study
    started = _start(deployment, drifting_spec(), "scheduled__2025-01-02", DAY_2)
    name = started["study_name"]
    assert name == "drifting.2025-01-02T030000Z"
    warm = started["warm_start"]
    assert warm["previous_study"] == first_name
    assert warm["skipped"] == []
    champion = registry_version(deployment, registry.CHAMPION)
    sources = [e["source"] for e in warm["enqueued"]]
    assert sources[0] == f"champion drifting version {champion.version}"
    assert all(s.startswith("top ") and first_name in s for s in sources[1:])
    # The champion is also the first study's best: enqueued once, so three distinct configurations.
    enqueued = [e["params"] for e in warm["enqueued"]]
    assert sorted(enqueued, key=str) == sorted(FIRST_CONFIGS, key=str)
    assert enqueued[0] == json.loads(champion.tags["hpo.params"])

    batch = _run_round(deployment, name, 1)
    assert [b["params"] for b in batch] == enqueued
    study = optuna.load_study(study_name=name, storage=deployment.storage_url)
    by_number = {t.number: t for t in study.trials}
    assert [by_number[b["trial_number"]].user_attrs[TrialAttr.WARM_START] for b in batch] == sources


def registry_version(deployment: Deployment, alias: str) -> Any:
    client = mlflow.MlflowClient(tracking_uri=deployment.tracking_uri)
    return client.get_model_version_by_alias("drifting", alias)


@pytest.mark.parametrize(
    ("space_change", "valid", "reasons"),
    [
        pytest.param(
            {
                "C": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
                "fit_intercept": {"type": "categorical", "choices": [True]},
            },
            [{"C": 0.5, "fit_intercept": True}],
            {
                "C=5.0": "fit_intercept=False is not one of [True]",
                "C=50.0": "C=50.0 is outside [0.01, 10.0]",
            },
            id="narrowed",
        ),
        pytest.param(
            {"max_iter": {"type": "int", "low": 50, "high": 500}},
            [],
            {f"C={c['C']}": "parameter 'max_iter' is missing" for c in FIRST_CONFIGS},
            id="parameter-added",
        ),
    ],
)
def test_changed_search_space_skips_invalid_configurations_and_says_so(
    deployment: Deployment,
    caplog: pytest.LogCaptureFixture,
    space_change: dict[str, Any],
    valid: list[dict[str, Any]],
    reasons: dict[str, str],
) -> None:
    spec = drifting_spec(search_space={**SPACE, **space_change})
    with caplog.at_level(logging.WARNING, logger="hpo_core.warmstart"):
        started = _start(deployment, spec, "scheduled__2025-01-02", DAY_2)
    warm = started["warm_start"]
    assert [e["params"] for e in warm["enqueued"]] == valid
    skipped = {f"C={s['params']['C']}": s for s in warm["skipped"]}
    assert {key: s["reason"] for key, s in skipped.items()} == reasons
    notes = [r.getMessage() for r in caplog.records if r.name == "hpo_core.warmstart"]
    for s in skipped.values():
        (note,) = [n for n in notes if s["source"] in n]
        assert "no longer valid in the search space" in note and s["reason"] in note
    # The skipped ones are recorded on the study too, and nothing invalid waits in the queue.
    study = optuna.load_study(study_name=started["study_name"], storage=deployment.storage_url)
    assert study.user_attrs[StudyAttr.WARM_START] == warm
    assert [t.system_attrs["fixed_params"] for t in _waiting(deployment, started["study_name"])] == valid


def test_rerun_of_the_same_dag_run_does_not_enqueue_again(deployment: Deployment) -> None:
    first = _start(deployment, drifting_spec(), "scheduled__2025-01-02", DAY_2)
    again = _start(deployment, drifting_spec(), "scheduled__2025-01-02", DAY_2)
    assert again["study_name"] == first["study_name"]
    assert again["warm_start"] == first["warm_start"]
    assert len(_waiting(deployment, first["study_name"])) == len(first["warm_start"]["enqueued"]) == 3


def test_continue_mode_adds_each_run_to_one_long_lived_study(deployment: Deployment) -> None:
    spec = drifting_spec(
        warm_start={"mode": "continue"},
        budget={"n_trials": 2, "batch_size": 2, "max_rounds": 1},
        promotion={"rule": "never"},
    )
    names, results = [], []
    for run_id, day in (("scheduled__2025-01-02", DAY_2), ("scheduled__2025-01-03", DAY_2 + dt.timedelta(1))):
        started = _start(deployment, spec, run_id, day)
        names.append(started["study_name"])
        batch = _run_round(deployment, started["study_name"], 1)
        assert len(batch) == 2  # the budget counts this run's trials only
        results.append(finalize_study(deployment=deployment, study_name=started["study_name"]))
    assert names == ["drifting.continuous", "drifting.continuous"]
    study = optuna.load_study(study_name="drifting.continuous", storage=deployment.storage_url)
    runs = [t.user_attrs["hpo.run_id"] for t in study.trials]
    assert runs == ["scheduled__2025-01-02"] * 2 + ["scheduled__2025-01-03"] * 2
    assert study.user_attrs["hpo.round_summary.scheduled__2025-01-03.1"]["counted"] == 2
    # Each run's finalize picks among its own trials and registers its own best.
    assert results[0]["best_trial"] in (0, 1) and results[1]["best_trial"] in (2, 3)
    assert results[0]["parent_run_id"] != results[1]["parent_run_id"]
    assert results[1]["promotion"]["promoted"] is False


def test_study_names_come_from_the_logical_date_or_the_run_id() -> None:
    spec = drifting_spec()
    name_for = study_name_for
    assert name_for(spec, "scheduled__x", logical_date=DAY_2) == "drifting.2025-01-02T030000Z"
    tokyo = dt.timezone(dt.timedelta(hours=9))
    assert name_for(spec, "r", logical_date=DAY_2.astimezone(tokyo)) == "drifting.2025-01-02T030000Z"
    assert name_for(spec, "manual__2025-01-05", logical_date=None) == "drifting.manual__2025-01-05"
    continuous = drifting_spec(warm_start={"mode": "continue"})
    assert study_name_for(continuous, "any", logical_date=DAY_2) == "drifting.continuous"
