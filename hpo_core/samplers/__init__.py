"""Samplers by name: the registry the spec validates ``sampler.type`` against, and the builder.

Each entry names the module that builds the sampler and what the sampler can do; the spec checks a
study against those capabilities (several objectives, a finite grid) when it is loaded, before any
Optuna import. Adding a sampler is one module with a ``build`` function (see :mod:`.builtin`) and
one entry in :data:`SAMPLERS`.

This module stays light (no Optuna import): study files are validated where Optuna is not loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from hpo_core.spec import StudySpec

__all__ = ["SAMPLERS", "SamplerInfo", "build_sampler"]


@dataclass(frozen=True)
class SamplerInfo:
    """Where a sampler is built and what it can do."""

    #: Module with ``build(spec, cfg, *, seed, round_seed) -> optuna.samplers.BaseSampler``.
    module: str
    #: Whether it optimises one objective, several, or both.
    single_objective: bool = True
    multi_objective: bool = True
    #: Whether it needs a declared space with a finite grid (every float parameter has a ``step``).
    finite_space: bool = False
    #: Which trials' system attributes it reads (the state it keeps there): ``running`` (TPE and GP:
    #: a running trial's relative params) or ``all`` (grid ids, CMA-ES and NSGA-II generations).
    trial_state: str = "running"
    #: Python packages it needs beyond the stack (checked before a study runs: :mod:`hpo_core.checks`).
    requires: tuple[str, ...] = ()

    def missing(self) -> list[str]:
        """The packages of :attr:`requires` this environment cannot import."""
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


#: Every sampler a study file may name, in the order error messages list them.
SAMPLERS: dict[str, SamplerInfo] = {
    "tpe": SamplerInfo("hpo_core.samplers.builtin"),
    "random": SamplerInfo("hpo_core.samplers.builtin"),
    "grid": SamplerInfo("hpo_core.samplers.builtin", finite_space=True, trial_state="all"),
    "cmaes": SamplerInfo("hpo_core.samplers.builtin", multi_objective=False, trial_state="all"),
    # Optuna's GPSampler fits its Gaussian process with PyTorch once its startup trials are done.
    "gp": SamplerInfo("hpo_core.samplers.builtin", requires=("torch",)),
    "qmc": SamplerInfo("hpo_core.samplers.builtin", trial_state="all"),
    "nsga2": SamplerInfo("hpo_core.samplers.builtin", single_objective=False, trial_state="all"),
}


def build_sampler(
    spec: StudySpec,
    *,
    seed: int | None,
    options: dict[str, Any] | None = None,
    round_number: int = 0,
) -> optuna.samplers.BaseSampler:
    """Return the study's sampler, with the trigger's ``options`` applied to the spec's.

    Every task builds a fresh sampler, so the seed is mixed with the round number: the same
    seed in each round would replay the same random draws (samplers that keep their position in
    the study, like QMC and grid, get the plain seed).
    """
    cfg = spec.sampler.model_copy(update=dict(options or {}))
    # Kept within numpy's seed range (a spec's seed may be up to 2**32 - 1).
    round_seed = None if seed is None else (seed * 1_000 + round_number) % 2**32
    module = importlib.import_module(SAMPLERS[cfg.type].module)
    sampler: optuna.samplers.BaseSampler = module.build(spec, cfg, seed=seed, round_seed=round_seed)
    return sampler
