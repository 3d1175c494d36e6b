"""The in-memory batch asker (hpo_core.study.ask) against Optuna's own ``study.ask()`` on SQLite.

Parity: for every sampler the project offers, the batch asked from a copy of the study's trials is
the one a reference loop of ``study.ask()`` on the real (SQLite) storage asks for the same seed, round
and history, including trial numbers, enqueued trials, discarded duplicates and the sampler state
written to trial and study system attributes. Then the bounded history on a large study.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from hpo_core.errors import StudySpecError
from hpo_core.keys import TrialAttr
from hpo_core.samplers import build_sampler
from hpo_core.samplers.mean_liar import MeanLiarTPESampler, _lying
from hpo_core.space import sample_params, space_size
from hpo_core.spec import StudySpec
from hpo_core.study.ask import (
    MAX_DUPLICATE_DRAWS,
    AskedBatch,
    SamplerRun,
    ask_batch,
    grid_taken,
    select_history,
)
from tests.fixtures_core import make_spec

optuna.logging.set_verbosity(optuna.logging.ERROR)

FLOATS = {
    "x": {"type": "float", "low": -5.0, "high": 5.0},
    "y": {"type": "float", "low": 1e-3, "high": 10.0, "log": True},
    "n": {"type": "int", "low": 1, "high": 9},
}
GRID = {
    "x": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.5},
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
}
TWO_OBJECTIVES: dict[str, Any] = {
    "direction": None,
    "metric": None,
    "directions": ["minimize", "maximize"],
    "metrics": ["loss", "score"],
    "pareto_choice": {"metric": "loss"},
}


def _spec(sampler: dict[str, Any], space: dict[str, Any] | None = None, **changes: Any) -> StudySpec:
    budget = {"n_trials": 200, "batch_size": 8, "max_rounds": 40, "max_batch_size": 16}
    extra: dict[str, Any] = {"sampler": sampler, "budget": budget, **changes}
    if space is not None:
        extra["search_space"] = space
    return make_spec(**extra)


def _values(spec: StudySpec, params: dict[str, Any]) -> list[float]:
    """A deterministic objective of any of the test spaces (one or two values)."""
    loss = 0.0
    for _, value in sorted(params.items()):
        loss += (len(str(value)) % 3) if isinstance(value, str) else (float(value) - 0.3) ** 2
    return [loss, -abs(loss - 2.0)] if spec.is_multi_objective else [loss]


def _study(tmp_path: Path, spec: StudySpec, name: str = "s") -> optuna.Study:
    return optuna.create_study(
        storage=f"sqlite:///{tmp_path}/ask.db", study_name=name, directions=spec.all_directions
    )


def _reference_batch(study: optuna.Study, spec: StudySpec, run: SamplerRun, size: int) -> list[FrozenTrial]:
    """The engine's batch rule written against Optuna's own ``study.ask()`` on the real storage."""
    study.sampler = build_sampler(
        spec, seed=run.seed, options=dict(run.options), round_number=run.round_number
    )
    seen: set[str] = set()
    space = space_size(spec)
    drawn: list[int] = []
    for _ in range(size):
        kept = False
        for attempt in range(MAX_DUPLICATE_DRAWS):
            if grid_taken(study, spec):  # every grid point finished or running: the batch ends
                break
            trial = study.ask()
            params = sample_params(spec, trial)
            drawn.append(trial.number)
            key = json.dumps(params, sort_keys=True, default=str)
            if key not in seen or len(seen) >= space or attempt == MAX_DUPLICATE_DRAWS - 1:
                seen.add(key)
                kept = True
                break
            trial.set_user_attr(TrialAttr.DISCARDED, "duplicate of another trial in the same batch")
            study.tell(trial, state=TrialState.FAIL)
        if not kept:
            break
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [by_number[n] for n in drawn]


def _same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-12) if isinstance(a[k], float) else a[k] == b[k] for k in a
    )


def _assert_parity(asked: AskedBatch, reference: list[FrozenTrial], before: dict[int, FrozenTrial]) -> None:
    assert [t.number for t in asked.trials] == [t.number for t in reference]
    for mine, ref in zip(asked.trials, reference, strict=True):
        assert _same_params(mine.params, ref.params), (mine.number, mine.params, ref.params)
        assert mine.distributions == ref.distributions
        assert mine.state == ref.state
        old = before.get(ref.number)
        assert (mine.waiting_trial_id is not None) == (old is not None)
        expected_system = {
            k: v for k, v in ref.system_attrs.items() if old is None or old.system_attrs.get(k) != v
        }
        assert mine.system_attrs == expected_system
        expected_user = {k: v for k, v in ref.user_attrs.items() if old is None or old.user_attrs.get(k) != v}
        assert mine.user_attrs == expected_user


def _run_rounds(
    tmp_path: Path,
    spec: StudySpec,
    *,
    rounds: int,
    size: int,
    seed: int = 5,
    prepare: Callable[[optuna.Study], None] | None = None,
) -> list[AskedBatch]:
    """Rounds of: ask with the asker from a snapshot, ask with the reference loop, compare, tell."""
    study = _study(tmp_path, spec)
    if prepare is not None:
        prepare(study)
    batches = []
    for round_number in range(1, rounds + 1):
        run = SamplerRun(seed=seed, round_number=round_number)
        snapshot = study.get_trials(deepcopy=True)
        study_attrs = study._storage.get_study_system_attrs(study._study_id)
        asked = ask_batch(
            spec, run=run, trials=snapshot, size=size, study_system_attrs=study_attrs, history_limit=None
        )
        before = {t.number: t for t in snapshot}
        reference = _reference_batch(study, spec, run, size)
        _assert_parity(asked, reference, before)
        after_attrs = study._storage.get_study_system_attrs(study._study_id)
        assert asked.study_system_attrs == {
            k: v for k, v in after_attrs.items() if study_attrs.get(k, object()) != v
        }
        study.sampler = optuna.samplers.RandomSampler()  # tell as a worker does: the sampler plays no part
        for t in reference:
            if t.state == TrialState.RUNNING:
                study.tell(t.number, _values(spec, t.params))
        batches.append(asked)
    return batches


SAMPLER_CASES: list[tuple[str, dict[str, Any], dict[str, Any] | None, dict[str, Any]]] = [
    ("tpe", {"type": "tpe", "n_startup_trials": 4}, None, {}),
    ("tpe worst lie", {"type": "tpe", "n_startup_trials": 4, "lie": "worst"}, None, {}),
    ("tpe no liar", {"type": "tpe", "n_startup_trials": 4, "constant_liar": False}, FLOATS, {}),
    ("tpe multivariate", {"type": "tpe", "n_startup_trials": 4, "multivariate": True}, FLOATS, {}),
    ("tpe two objectives", {"type": "tpe", "n_startup_trials": 4}, FLOATS, TWO_OBJECTIVES),
    ("random", {"type": "random"}, None, {}),
    ("cmaes", {"type": "cmaes", "population_size": 4}, FLOATS, {}),
    # GP past its startup trials needs torch, which the pinned stack does not have: its startup phase.
    ("gp startup", {"type": "gp", "n_startup_trials": 20}, FLOATS, {}),
    ("qmc", {"type": "qmc"}, FLOATS, {}),
    ("nsga2", {"type": "nsga2", "population_size": 4}, FLOATS, TWO_OBJECTIVES),
]


@pytest.mark.parametrize(
    ("label", "sampler", "space", "changes"), SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES]
)
def test_batch_is_what_study_ask_asks(
    tmp_path: Path, label: str, sampler: dict[str, Any], space: dict[str, Any] | None, changes: dict[str, Any]
) -> None:
    spec = _spec({**sampler, "seed": 11}, space, **changes)
    batches = _run_rounds(tmp_path, spec, rounds=4, size=4)
    assert all(len(b.batch) == 4 for b in batches)
    written = {k for b in batches for t in b.trials for k in t.system_attrs} | {
        k for b in batches for k in b.study_system_attrs
    }
    # The sampler's own state travels with the batch (what the write-back must store).
    expected = {
        "tpe multivariate": "tpe:relative_params:0",
        "cmaes": "cma:generation",
        "nsga2": "NSGAIISampler:generation",
    }.get(label)
    if expected is not None:
        assert expected in written, written
    if label == "qmc":
        assert any(k.startswith("qmc") for k in written), written
    if label == "nsga2":
        assert any(":parent:" in k for k in written), written


def test_grid_walks_the_grid_and_stops_when_exhausted(tmp_path: Path) -> None:
    spec = _spec({"type": "grid", "seed": 1}, GRID)
    first, second = _run_rounds(tmp_path, spec, rounds=2, size=4)
    assert len(first.batch) == 4 and not first.exhausted
    assert len(second.batch) == 2 and second.exhausted  # six grid points in all
    points = {(t.params["x"], t.params["optimizer"]) for b in (first, second) for t in b.batch}
    assert points == {(x, o) for x in (0.0, 0.5, 1.0) for o in ("adam", "sgd")}
    assert all("grid_id" in t.system_attrs for b in (first, second) for t in b.batch)


def test_enqueued_trials_are_popped_first_with_their_numbers(tmp_path: Path) -> None:
    spec = _spec({"type": "tpe", "seed": 3, "n_startup_trials": 2})

    def prepare(study: optuna.Study) -> None:
        running = study.ask()  # trial 0: of another round, still running
        sample_params(spec, running)
        for x in (1.0, -1.0):  # trials 1 and 2: enqueued by the warm start
            study.enqueue_trial(
                {"x": x, "y": 0.5, "optimizer": "adam"}, user_attrs={"hpo.warm_start": f"x={x}"}
            )

    first, *_ = _run_rounds(tmp_path, spec, rounds=2, size=3, prepare=prepare)
    popped = [t for t in first.batch if t.waiting_trial_id is not None]
    assert [t.number for t in popped] == [1, 2]
    assert [t.params["x"] for t in popped] == [1.0, -1.0]
    assert first.batch[2].number == 3 and first.batch[2].waiting_trial_id is None
    # A popped trial's write-back holds only what changed: its enqueue attributes are stored already.
    assert all("fixed_params" not in t.system_attrs and not t.user_attrs for t in popped)


def test_duplicate_draws_are_discarded_and_keep_their_numbers(tmp_path: Path) -> None:
    space = {
        "x": {"type": "int", "low": 0, "high": 1},
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    }
    spec = _spec({"type": "random", "seed": 3}, space)
    (batch,) = _run_rounds(tmp_path, spec, rounds=1, size=4, seed=3)
    kept = batch.batch
    assert len({(t.params["x"], t.params["optimizer"]) for t in kept}) == 4  # every point, none twice
    discarded = [t for t in batch.trials if t.discarded]
    assert discarded, "a four-point space asked four times by random search draws duplicates"
    assert all(t.state == TrialState.FAIL and list(t.user_attrs) == [TrialAttr.DISCARDED] for t in discarded)
    assert [t.number for t in batch.trials] == list(range(len(batch.trials)))


def test_snapshot_is_not_modified(tmp_path: Path) -> None:
    spec = _spec({"type": "tpe", "seed": 3, "n_startup_trials": 2})
    study = _study(tmp_path, spec)
    study.enqueue_trial({"x": 1.0, "y": 0.5, "optimizer": "adam"})
    for _ in range(3):
        t = study.ask()
        study.tell(t, _values(spec, sample_params(spec, t)))
    snapshot = study.get_trials(deepcopy=True)
    frozen = [(t.state, dict(t.params), dict(t.system_attrs), dict(t.user_attrs)) for t in snapshot]
    ask_batch(spec, run=SamplerRun(seed=1, round_number=1), trials=snapshot, size=4)
    assert [(t.state, dict(t.params), dict(t.system_attrs), dict(t.user_attrs)) for t in snapshot] == frozen


# --- bounded history --------------------------------------------------------------------------


def _finished(n: int, *, spec: StudySpec, seed: int = 0) -> list[FrozenTrial]:
    """``n`` complete trials with values drawn at random, numbered 0..n-1 (ids = numbers)."""
    study = optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=seed), directions=spec.all_directions
    )
    for _ in range(n):
        t = study.ask()
        study.tell(t, _values(spec, sample_params(spec, t)))
    return study.get_trials(deepcopy=False)


def test_bounded_history_keeps_best_recent_and_unfinished() -> None:
    spec = _spec({"type": "tpe", "seed": 1, "history_limit": 100}, FLOATS)
    trials = _finished(400, spec=spec)
    running = FrozenTrial(
        number=400, trial_id=400, state=TrialState.RUNNING, value=None, datetime_start=None,
        datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
        intermediate_values={},
    )  # fmt: skip
    seen = select_history(
        [*trials, running], limit=100, sampler_type="tpe", directions=["minimize"], study_system_attrs={}
    )
    numbers = [t.number for t in seen]
    assert numbers == sorted(numbers)
    finished_seen = [t for t in seen if t.state.is_finished()]
    assert len(finished_seen) == 100
    best = sorted(trials, key=lambda t: t.values[0])[:10]
    assert {t.number for t in best} <= set(numbers)  # the best K/10 ...
    assert set(range(310, 400)) <= set(numbers)  # ... the most recent of the rest ...
    assert 400 in numbers  # ... and every unfinished trial
    # TPE's good group (the best 10 % up to 25) is the same as the whole history's.
    assert sorted(t.values[0] for t in finished_seen)[:10] == sorted(t.values[0] for t in trials)[:10]


def test_bounded_ask_sees_at_most_k_and_is_exact_below_k(tmp_path: Path) -> None:
    spec = _spec({"type": "tpe", "seed": 4, "history_limit": 60, "multivariate": True}, FLOATS)
    trials = _finished(300, spec=spec)
    run = SamplerRun(seed=4, round_number=2)
    bounded = ask_batch(spec, run=run, trials=trials, size=8)
    assert bounded.history_given == 300 and bounded.history_seen == 60
    assert len(bounded.batch) == 8
    assert [t.number for t in bounded.batch] == list(range(300, 308))  # numbers continue the study's
    # Below K the spec's bound changes nothing: the same batch as with no bound at all.
    small = trials[:50]
    assert ask_batch(spec, run=run, trials=small, size=4).history_seen == 50
    a = ask_batch(spec, run=run, trials=small, size=4)
    b = ask_batch(spec, run=run, trials=small, size=4, history_limit=None)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]


def test_unbounded_samplers_and_sampler_state_anchors() -> None:
    spec = _spec({"type": "random", "seed": 1, "history_limit": 50}, FLOATS)
    trials = _finished(120, spec=spec)
    assert len(select_history(trials, limit=50, sampler_type="random", directions=["minimize"])) == 120
    # CMA-ES keeps the last trial holding its optimizer; NSGA-II the parents it cached.
    old = trials[3]
    old.system_attrs = {**old.system_attrs, "cma:optimizer:0": "80"}
    seen = select_history(trials, limit=50, sampler_type="cmaes", directions=["minimize"])
    assert 3 in {t.number for t in seen}
    parents = {"NSGAIISampler:parent:1": [5, 6], "NSGAIISampler:parent:2": [7, 8]}
    seen = select_history(
        trials, limit=50, sampler_type="nsga2", directions=["minimize"], study_system_attrs=parents
    )
    assert {7, 8} <= {t.number for t in seen}


def test_history_limit_is_validated_with_a_located_message() -> None:
    assert make_spec().sampler.history_limit == 500
    assert make_spec(sampler={"type": "tpe", "history_limit": None}).sampler.history_limit is None
    with pytest.raises(StudySpecError, match=r"sampler\.history_limit: 20 must be at least 50"):
        make_spec(sampler={"type": "tpe", "history_limit": 20})
    with pytest.raises(StudySpecError, match=r"sampler\.history_limit: 80 must be at least 120"):
        make_spec(sampler={"type": "tpe", "history_limit": 80, "n_startup_trials": 60})


def test_a_batch_written_back_from_templates_is_the_asked_batch(tmp_path: Path) -> None:
    """The write-back contract: templates in one go give the reference loop's study, trial for trial."""
    spec = _spec({"type": "tpe", "seed": 2, "n_startup_trials": 3, "multivariate": True}, FLOATS)
    mine, ref = _study(tmp_path, spec, "mine"), _study(tmp_path, spec, "ref")
    for round_number in (1, 2, 3):
        run = SamplerRun(seed=2, round_number=round_number)
        asked = ask_batch(spec, run=run, trials=mine.get_trials(deepcopy=False), size=4)
        for t in asked.trials:
            template = t.as_template({"hpo.round": round_number})
            trial_id = mine._storage.create_new_trial(mine._study_id, template_trial=template)
            assert mine._storage.get_trial_number_from_id(trial_id) == t.number
        reference = _reference_batch(ref, spec, run, 4)
        for study, trials in ((mine, mine.get_trials()[-len(reference) :]), (ref, reference)):
            study.sampler = optuna.samplers.RandomSampler()
            for t in trials:
                study.tell(t.number, _values(spec, t.params))
    a, b = mine.get_trials(), ref.get_trials()
    assert [(t.number, t.params, t.system_attrs, t.state) for t in a] == [
        (t.number, t.params, t.system_attrs, t.state) for t in b
    ]
    assert all(t.user_attrs["hpo.round"] in (1, 2, 3) for t in a)


def test_mean_liar_shows_running_trials_complete_with_the_mean() -> None:

    spec = _spec({"type": "tpe", "seed": 1})
    assert isinstance(build_sampler(spec, seed=1), MeanLiarTPESampler)
    assert not isinstance(build_sampler(_spec({"type": "tpe", "lie": "worst"}), seed=1), MeanLiarTPESampler)
    study = optuna.create_study()
    for value in (1.0, 2.0, 6.0):
        t = study.ask()
        t.suggest_float("x", 0, 1)
        study.tell(t, value)
    pending = study.ask()
    pending.suggest_float("x", 0, 1)
    empty = study.ask()  # asked elsewhere, no params yet: left running
    current = study.ask()
    sampler = MeanLiarTPESampler()
    shown = _lying(sampler, study, current.number)._get_trials(deepcopy=False)
    # Built once per ask: the next read of the same ask reuses it; a new trial (next ask) rebuilds it.
    assert _lying(sampler, study, current.number)._get_trials(deepcopy=False) is shown
    later = study.ask()
    assert len(_lying(sampler, study, later.number)._get_trials(deepcopy=False)) == len(shown) + 1
    by_number = {t.number: t for t in shown}
    assert by_number[pending.number].state == TrialState.COMPLETE
    assert by_number[pending.number].values == [3.0]
    assert by_number[empty.number].state == TrialState.RUNNING
    assert by_number[current.number].state == TrialState.RUNNING
    assert study.trials[pending.number].state == TrialState.RUNNING  # the storage is untouched
