"""Build the Optuna sampler and pruner of a study from its spec and the run's overrides."""

from __future__ import annotations

from typing import Any

import optuna

from hpo_core.space import grid_search_space
from hpo_core.spec import SamplerSpec, StudySpec

__all__ = ["SAMPLER_OPTION_KEYS", "build_pruner", "build_sampler"]

#: Sampler options a trigger may override (the Params form); the rest is fixed by the spec.
SAMPLER_OPTION_KEYS = ("multivariate", "constant_liar", "n_startup_trials", "population_size")


def build_sampler(
    spec: StudySpec,
    *,
    seed: int | None,
    options: dict[str, Any] | None = None,
    round_number: int = 0,
) -> optuna.samplers.BaseSampler:
    """Return the study's sampler.

    Every task builds a fresh sampler, so the seed is mixed with the round number: the same
    seed in each round would replay the same random draws.
    """
    cfg: SamplerSpec = spec.sampler.model_copy(update=dict(options or {}))
    round_seed = None if seed is None else seed * 1_000 + round_number
    startup = cfg.n_startup_trials
    kind = cfg.type
    if kind == "tpe":
        return optuna.samplers.TPESampler(
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
    raise AssertionError(f"unhandled sampler {kind!r}")  # the spec's Literal forbids this


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Return the study's pruner (``NopPruner`` when pruning is off)."""
    p = spec.pruner
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.type == "percentile":
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()
