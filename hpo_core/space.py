"""Search space: sample a declared space on an Optuna trial, and check params against it."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hpo_core.errors import ObjectiveError, SearchSpaceError
from hpo_core.spec import CategoricalParam, FloatParam, IntParam, StudySpec

if TYPE_CHECKING:
    import optuna

__all__ = [
    "check_params",
    "grid_search_space",
    "import_callable",
    "sample_params",
]

SpaceParam = FloatParam | IntParam | CategoricalParam


def import_callable(path: str) -> Callable[..., Any]:
    """Import ``module:function``; the only way user code is loaded from a study file."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ObjectiveError(f"cannot import module {module_name!r} named in {path!r}: {e}") from e
    func = getattr(module, attr, None)
    if not callable(func):
        raise ObjectiveError(f"{path!r}: module {module_name!r} has no callable {attr!r}")
    return func


def sample_params(spec: StudySpec, trial: optuna.trial.Trial) -> dict[str, Any]:
    """Suggest every active parameter of the spec on ``trial`` (parents before children)."""
    if spec.space_function is not None:
        space_fn = import_callable(spec.space_function)
        space_fn(trial)
        return dict(trial.params)
    chosen: dict[str, Any] = {}
    for name, p in spec.ordered_params():
        if p.condition is not None and not p.condition.is_active(chosen):
            continue
        chosen[name] = _suggest(trial, name, p)
    return chosen


def _suggest(trial: optuna.trial.Trial, name: str, p: SpaceParam) -> Any:
    if isinstance(p, FloatParam):
        return trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
    if isinstance(p, IntParam):
        return trial.suggest_int(name, p.low, p.high, log=p.log, step=p.step)
    return trial.suggest_categorical(name, p.choices)


def check_params(spec: StudySpec, params: Mapping[str, Any]) -> None:
    """Raise :class:`SearchSpaceError` unless ``params`` is a valid point of the declared space.

    Used for warm starts: a configuration from an older study may no longer fit.
    """
    if spec.search_space is None:
        return
    space = spec.search_space
    unknown = sorted(set(params) - set(space))
    if unknown:
        raise SearchSpaceError(f"parameters {unknown} are not declared in the search space")
    active: dict[str, Any] = {}
    for name, p in spec.ordered_params():
        is_active = p.condition is None or p.condition.is_active(active)
        if not is_active:
            if name in params:
                raise SearchSpaceError(f"parameter {name!r} is set but its condition is not met")
            continue
        if name not in params:
            raise SearchSpaceError(f"parameter {name!r} is missing")
        _check_value(name, p, params[name])
        active[name] = params[name]


def _check_value(name: str, p: SpaceParam, value: Any) -> None:
    if isinstance(p, CategoricalParam):
        if value not in p.choices:
            raise SearchSpaceError(f"{name}={value!r} is not one of {p.choices!r}")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SearchSpaceError(f"{name}={value!r} is not a number")
    if isinstance(p, IntParam) and int(value) != value:
        raise SearchSpaceError(f"{name}={value!r} is not an integer")
    if not (p.low <= value <= p.high):
        raise SearchSpaceError(f"{name}={value!r} is outside [{p.low}, {p.high}]")
    if p.step is not None and not p.log:
        k = (value - p.low) / p.step
        if not math.isclose(k, round(k), abs_tol=1e-8):
            raise SearchSpaceError(f"{name}={value!r} is not on the grid low={p.low} step={p.step}")


def grid_search_space(spec: StudySpec) -> dict[str, list[Any]]:
    """Every declared parameter's grid, for Optuna's GridSampler."""
    assert spec.search_space is not None  # the spec validator guarantees it for grid
    grid: dict[str, list[Any]] = {}
    for name, p in spec.search_space.items():
        if isinstance(p, CategoricalParam):
            grid[name] = list(p.choices)
        elif isinstance(p, IntParam):
            grid[name] = list(range(p.low, p.high + 1, p.step))
        else:
            assert p.step is not None
            n = math.floor((p.high - p.low) / p.step + 1e-9) + 1
            grid[name] = [round(p.low + i * p.step, 12) for i in range(n)]
    return grid


def space_size(spec: StudySpec) -> float:
    """Number of distinct configurations of a declared space (``inf`` when continuous)."""
    if spec.search_space is None:
        return math.inf
    total = 1.0
    for p in spec.search_space.values():
        if isinstance(p, CategoricalParam):
            total *= len(p.choices) + (1 if p.condition is not None else 0)
        elif isinstance(p, IntParam) and not p.log:
            total *= (p.high - p.low) // p.step + 1 + (1 if p.condition is not None else 0)
        elif isinstance(p, FloatParam) and p.step is not None:
            total *= math.floor((p.high - p.low) / p.step + 1e-9) + 1 + (1 if p.condition else 0)
        else:
            return math.inf
    return total
