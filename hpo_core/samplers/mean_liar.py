"""TPE whose constant liar says the mean: running trials shown as complete with the mean value."""

from __future__ import annotations

import copy
from collections.abc import Container
from typing import Any, cast

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

__all__ = ["MeanLiarTPESampler"]


class MeanLiarTPESampler(optuna.samplers.TPESampler):
    """TPE whose constant liar shows running trials as complete with the mean value so far.

    Optuna's constant liar puts running trials in TPE's "bad" group (the worst value): a batch then
    spreads away from its own points and from the incumbent, which costs most in small spaces
    (bench/README.md, sample efficiency: 2-D problems). With the mean, the batch's earlier trials
    count as seen (also toward the startup trials) without repelling the later ones as hard. The lie
    lives in the sampler, so Optuna's own ``study.ask()`` with this sampler asks the same batch as the
    in-memory asker (:mod:`hpo_core.study.ask`). A running trial without params yet is left running.

    One ask reads the study's trials several times (search space, relative and independent
    sampling): the lied view is built once per ask and reused while the trials stay the same
    (same study, asking trial and number of trials), not rebuilt over the whole history each time.
    """

    _view: tuple[tuple[int, int, int], list[FrozenTrial]] | None = None

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return super().infer_relative_search_space(_lying(self, study, trial.number), trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return super().sample_relative(_lying(self, study, trial.number), trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return super().sample_independent(
            _lying(self, study, trial.number), trial, param_name, param_distribution
        )


def _lying(sampler: MeanLiarTPESampler, study: optuna.Study, current: int) -> optuna.Study:
    """``study`` behind the mean liar's view (duck-typed: samplers only read trials through it)."""
    return cast(optuna.Study, _MeanLie(sampler, study, current))


class _MeanLie:
    """A study as the mean liar shows it to TPE: other running trials complete with the mean values."""

    def __init__(self, sampler: MeanLiarTPESampler, study: optuna.Study, current: int) -> None:
        self._sampler = sampler
        self._study = study
        self._current = current

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=False, states=None, use_cache=use_cache)
        key = (id(self._study), self._current, len(trials))
        view = self._sampler._view
        if view is not None and view[0] == key:
            shown = view[1]
        else:
            done = [t.values for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
            shown = trials
            if done:
                lie = [sum(column) / len(done) for column in zip(*done, strict=True)]
                shown = [self._lied(t, lie) for t in trials]
            self._sampler._view = (key, shown)
        if states is not None:
            shown = [t for t in shown if t.state in states]
        return copy.deepcopy(shown) if deepcopy else shown

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    def _lied(self, trial: FrozenTrial, lie: list[float]) -> FrozenTrial:
        if trial.state != TrialState.RUNNING or trial.number == self._current or not trial.params:
            return trial
        shown = copy.copy(trial)
        shown.state = TrialState.COMPLETE
        shown.values = lie
        shown.datetime_complete = trial.datetime_start
        return shown
