"""Optuna's own samplers, built from the spec's ``sampler`` section."""

from __future__ import annotations

import optuna

from hpo_core.errors import StudySpecError
from hpo_core.samplers.mean_liar import MeanLiarTPESampler
from hpo_core.space import grid_search_space
from hpo_core.spec import SamplerSpec, StudySpec

__all__ = ["build"]


def build(
    spec: StudySpec, cfg: SamplerSpec, *, seed: int | None, round_seed: int | None
) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named by ``cfg.type`` (``round_seed``: the seed mixed with the round)."""
    startup = cfg.n_startup_trials
    kind = cfg.type
    if kind == "tpe":
        tpe = MeanLiarTPESampler if cfg.constant_liar and cfg.lie == "mean" else optuna.samplers.TPESampler
        return tpe(
            seed=round_seed,
            multivariate=cfg.multivariate,
            constant_liar=cfg.constant_liar,
            n_startup_trials=10 if startup is None else startup,
        )
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=round_seed)
    if kind == "grid":
        return optuna.samplers.GridSampler(grid_search_space(spec), seed=seed)
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=round_seed,
            n_startup_trials=1 if startup is None else startup,
            popsize=cfg.population_size,
            warn_independent_sampling=False,
        )
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=round_seed, n_startup_trials=10 if startup is None else startup)
    if kind == "qmc":
        # QMC keeps its position in the study, so the sequence continues across rounds.
        return optuna.samplers.QMCSampler(qmc_type=cfg.qmc_type, scramble=True, seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=round_seed, population_size=cfg.population_size or 50)
    raise StudySpecError(
        f"{spec.dag_id}: sampler.type: {kind!r} is registered to {__name__}, which has no such sampler"
    )
