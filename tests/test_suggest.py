"""Batch suggestion on a real Optuna storage: size, distinct configs, conditional params, budget."""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest
from optuna.trial import TrialState

from hpo_core.deployment import Deployment
from hpo_core.errors import StudySpecError
from hpo_core.keys import TrialAttr
from hpo_core.space import check_params
from hpo_core.study.accounting import count_trials
from hpo_core.study.suggest import suggest_batch
from tests.fixtures_core import make_spec


def _suggest(deployment: Deployment, name: str, round_number: int) -> tuple[list[dict], str | None]:
    return suggest_batch(
        deployment=deployment, study_name=name, round_number=round_number
    )


def test_batch_has_requested_size_and_distinct_configs(
    local_deployment: Deployment, start_toy_study: Callable[..., str]
) -> None:
    name = start_toy_study(overrides={"n_trials": 8, "batch_size": 4})
    batch, reason = _suggest(local_deployment, name, 1)
    assert reason is None
    assert len(batch) == 4
    keys = {tuple(sorted(b["params"].items())) for b in batch}
    assert len(keys) == 4
    assert [b["trial_number"] for b in batch] == sorted(b["trial_number"] for b in batch)
    assert batch[0]["label"].startswith(f"trial {batch[0]['trial_number']} · x=")


def test_conditional_param_present_only_when_active(
    local_deployment: Deployment, start_toy_study: Callable[..., str]
) -> None:
    spec = make_spec()
    name = start_toy_study(overrides={"n_trials": 12, "batch_size": 4})
    seen_optimizers = set()
    for k in (1, 2, 3):
        batch, _ = _suggest(local_deployment, name, k)
        study = optuna.load_study(study_name=name, storage=local_deployment.storage_url)
        for b in batch:
            params = b["params"]
            seen_optimizers.add(params["optimizer"])
            assert ("momentum" in params) == (params["optimizer"] == "sgd")
            check_params(spec, params)  # every suggested point is valid in the declared space
            study.tell(b["trial_number"], 1.0)
    assert seen_optimizers == {"adam", "sgd"}


def test_resuggesting_a_round_returns_the_same_batch(
    storage_deployment: Deployment, start_on_storage: Callable[..., str]
) -> None:
    name = start_on_storage()
    first, _ = _suggest(storage_deployment, name, 1)
    again, _ = _suggest(storage_deployment, name, 1)
    assert again == first
    study = optuna.load_study(study_name=name, storage=storage_deployment.storage_url)
    assert len(study.trials) == len(first)


def test_budget_caps_the_last_batch_and_then_skips(
    storage_deployment: Deployment, start_on_storage: Callable[..., str]
) -> None:
    name = start_on_storage(overrides={"n_trials": 5, "batch_size": 3})
    study = optuna.load_study(study_name=name, storage=storage_deployment.storage_url)
    first, _ = _suggest(storage_deployment, name, 1)
    for b in first:
        study.tell(b["trial_number"], 0.5)
    second, _ = _suggest(storage_deployment, name, 2)
    assert len(first) == 3 and len(second) == 2
    for b in second:
        study.tell(b["trial_number"], 0.5)
    third, reason = _suggest(storage_deployment, name, 3)
    assert third == []
    assert reason == "budget spent: 5 of 5 trials"


def test_small_discrete_space_is_exhausted_without_duplicates(
    local_deployment: Deployment, start_toy_study: Callable[..., str]
) -> None:
    space = {
        "x": {"type": "int", "low": 0, "high": 1},
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    }
    name = start_toy_study(
        overrides={"n_trials": 4, "batch_size": 4},
        search_space=space,
        sampler={"type": "random", "seed": 3},
        budget={"n_trials": 4, "batch_size": 4, "max_rounds": 1},
    )
    batch, _ = _suggest(local_deployment, name, 1)
    configs = {(b["params"]["x"], b["params"]["optimizer"]) for b in batch}
    assert len(batch) == 4 and len(configs) == 4  # all four points, none twice
    study = optuna.load_study(study_name=name, storage=local_deployment.storage_url)
    discarded = [t for t in study.trials if t.user_attrs.get(TrialAttr.DISCARDED)]
    assert all(t.state == TrialState.FAIL for t in discarded)
    counts = count_trials(study)
    assert counts.counted == 4 and counts.failed == 0  # discarded draws never count


def test_grid_sampler_walks_the_grid(
    local_deployment: Deployment, start_toy_study: Callable[..., str]
) -> None:
    space = {
        "x": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.5},
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    }
    name = start_toy_study(
        search_space=space,
        sampler={"type": "grid", "seed": 1},
        budget={"n_trials": 6, "batch_size": 6, "max_rounds": 1},
    )
    batch, _ = _suggest(local_deployment, name, 1)
    assert {(b["params"]["x"], b["params"]["optimizer"]) for b in batch} == {
        (x, o) for x in (0.0, 0.5, 1.0) for o in ("adam", "sgd")
    }


@pytest.mark.parametrize("sampler", ["random", "cmaes", "gp", "qmc"])
def test_every_single_objective_sampler_suggests_a_batch(
    local_deployment: Deployment, start_toy_study: Callable[..., str], sampler: str
) -> None:
    space = {
        "x": {"type": "float", "low": -5.0, "high": 5.0},
        "y": {"type": "float", "low": -5.0, "high": 5.0},
    }
    name = start_toy_study(search_space=space, sampler={"type": sampler, "seed": 11})
    batch, _ = _suggest(local_deployment, name, 1)
    assert len(batch) == 3
    assert len({(b["params"]["x"], b["params"]["y"]) for b in batch}) == 3


def test_overrides_out_of_bounds_are_refused(start_toy_study: Callable[..., str]) -> None:
    with pytest.raises(StudySpecError, match=r"params\.batch_size: 9 is outside 1\.\.4"):
        start_toy_study(overrides={"batch_size": 9})
    with pytest.raises(StudySpecError, match=r"params\.n_trials: 13 needs 5 rounds at batch_size=3"):
        start_toy_study(overrides={"n_trials": 13})
    with pytest.raises(StudySpecError, match=r"unknown option\(s\) \['liar'\]"):
        start_toy_study(overrides={"sampler_options": {"liar": True}})
