"""Batch suggestion on a real Optuna storage: size, distinct configs, conditional params, budget."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
from collections.abc import Callable
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from hpo_core.deployment import Deployment
from hpo_core.errors import StudySpecError
from hpo_core.keys import TrialAttr
from hpo_core.samplers import build_sampler
from hpo_core.space import check_params, sample_params
from hpo_core.storage import open_storage
from hpo_core.study import suggest as suggest_module
from hpo_core.study.accounting import count_trials
from hpo_core.study.ask import SamplerRun, ask_batch
from hpo_core.study.config import RunConfig
from hpo_core.study.start import start_study
from hpo_core.study.suggest import suggest_batch
from tests.fixtures_core import make_spec


def _suggest(deployment: Deployment, name: str, round_number: int) -> tuple[list[dict], str | None]:
    return suggest_batch(deployment=deployment, study_name=name, round_number=round_number)


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


# gp is not here: past its startup trials it needs PyTorch, which the stack does not ship, so a gp
# study is refused before it starts unless torch is installed (tests/test_validate.py).
@pytest.mark.parametrize("sampler", ["random", "cmaes", "qmc"])
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


def _pg_deployment(local_deployment: Deployment, create_database: Callable[[str], str]) -> Deployment:
    return dataclasses.replace(local_deployment, storage_url=create_database("hpo_suggest"))


def _tell_batch(deployment: Deployment, name: str, batch: list[dict]) -> None:
    study = optuna.load_study(study_name=name, storage=open_storage(deployment.storage_url))
    for b in batch:  # a deterministic objective of the params
        x = float(b["params"]["x"])
        study.tell(b["trial_number"], (x - 0.3) ** 2 + (0.1 if b["params"]["optimizer"] == "sgd" else 0.0))


def test_suggest_asks_what_optunas_own_ask_loop_asks_below_the_history_bound(
    local_deployment: Deployment, create_database: Callable[[str], str]
) -> None:
    """The one-read-one-write suggest asks the batch a loop over ``study.ask()`` asks (same seed, history)."""
    deployment = _pg_deployment(local_deployment, create_database)
    spec = make_spec(
        sampler={"type": "tpe", "seed": 11, "n_startup_trials": 3, "multivariate": True},
        budget={"n_trials": 20, "batch_size": 5, "max_rounds": 4, "max_batch_size": 5},
    )
    name = start_study(spec, deployment=deployment, dag_id=spec.dag_id, run_id="parity")["study_name"]
    for k in (1, 2, 3):
        batch, _ = suggest_batch(deployment=deployment, study_name=name, round_number=k)
        _tell_batch(deployment, name, batch)
    storage = open_storage(deployment.storage_url)
    optuna.copy_study(
        from_study_name=name, from_storage=storage, to_storage=storage, to_study_name="reference"
    )
    config = RunConfig.from_attrs(storage.get_study_user_attrs(storage.get_study_id_from_name(name)))
    batch, _ = suggest_batch(deployment=deployment, study_name=name, round_number=4)

    reference = optuna.load_study(study_name="reference", storage=storage)
    reference.sampler = build_sampler(spec, seed=config.seed, options=config.sampler_options, round_number=4)
    seen: set[str] = set()
    asked = []
    while len(asked) < len(batch):
        trial = reference.ask()
        params = sample_params(spec, trial)
        key = json.dumps(params, sort_keys=True)
        if key in seen:  # a duplicate of the batch is discarded, as suggest does
            reference.tell(trial, state=TrialState.FAIL)
            continue
        seen.add(key)
        asked.append((trial.number, params))
    assert len(batch) == 5
    assert [(b["trial_number"], b["params"]) for b in batch] == asked


def test_two_suggest_attempts_of_one_round_at_once_write_one_batch(
    local_deployment: Deployment,
    create_database: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both attempts read and ask before either writes: the second finds the first's batch."""
    deployment = _pg_deployment(local_deployment, create_database)
    spec = make_spec(budget={"n_trials": 8, "batch_size": 4, "max_rounds": 2, "max_batch_size": 4})
    name = start_study(spec, deployment=deployment, dag_id=spec.dag_id, run_id="race")["study_name"]
    both_asked = threading.Barrier(2, timeout=60)
    real_ask = suggest_module.ask_batch

    def ask_then_wait(*args: Any, **kwargs: Any) -> Any:
        asked = real_ask(*args, **kwargs)
        both_asked.wait()  # neither writes before both have read the study and asked a batch
        return asked

    monkeypatch.setattr(suggest_module, "ask_batch", ask_then_wait)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(
                lambda _: suggest_batch(deployment=deployment, study_name=name, round_number=1), range(2)
            )
        )
    (first, _), (second, _) = results
    assert [b["trial_number"] for b in first] == [b["trial_number"] for b in second]
    assert [b["params"] for b in first] == [b["params"] for b in second]
    study = optuna.load_study(study_name=name, storage=open_storage(deployment.storage_url))
    in_round = [t for t in study.get_trials() if t.user_attrs.get(TrialAttr.ROUND) == 1]
    assert sorted(t.number for t in in_round) == sorted(b["trial_number"] for b in first)
    assert len(study.get_trials()) == 4  # nothing of the losing attempt was written


def test_suggest_on_a_study_beyond_the_history_bound_asks_what_the_asker_asks_of_the_whole_study(
    local_deployment: Deployment, create_database: Callable[[str], str]
) -> None:
    """Past K finished trials suggest reads params only of the history it shows TPE: same batch."""
    deployment = _pg_deployment(local_deployment, create_database)
    spec = make_spec(
        sampler={"type": "tpe", "seed": 5, "n_startup_trials": 3, "history_limit": 50},
        budget={"n_trials": 200, "batch_size": 8, "max_rounds": 30, "max_batch_size": 8},
    )
    name = start_study(spec, deployment=deployment, dag_id=spec.dag_id, run_id="bounded")["study_name"]
    for k in range(1, 10):  # 72 finished trials: past the bound of 50
        batch, _ = suggest_batch(deployment=deployment, study_name=name, round_number=k)
        _tell_batch(deployment, name, batch)
    storage = open_storage(deployment.storage_url)
    everything = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    config = RunConfig.from_attrs(storage.get_study_user_attrs(storage.get_study_id_from_name(name)))
    expected = ask_batch(
        spec,
        run=SamplerRun(seed=config.seed, round_number=10, options=config.sampler_options),
        trials=everything,
        size=8,
    )
    assert expected.history_seen < len(everything)  # the bound applied
    batch, _ = suggest_batch(deployment=deployment, study_name=name, round_number=10)
    assert [(b["trial_number"], b["params"]) for b in batch] == [(t.number, t.params) for t in expected.batch]
