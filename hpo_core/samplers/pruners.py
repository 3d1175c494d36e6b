"""The study's pruner, built from the spec's ``pruner`` section."""

from __future__ import annotations

import optuna

from hpo_core.spec import StudySpec

__all__ = ["build_pruner"]


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
