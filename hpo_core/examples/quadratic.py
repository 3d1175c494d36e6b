"""Cheap analytic objectives for smoke tests and benchmarks (no data, milliseconds per trial)."""

from __future__ import annotations

import math
from typing import Any

import mlflow.pyfunc
import optuna

from hpo_core.objective import TrialContext


class QuadraticModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]
    """A trivial pyfunc model, so that even the toy study registers something that predicts."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def predict(self, context: Any, model_input: Any, params: Any = None) -> list[float]:
        """Return the objective value for every input row."""
        return [quadratic_value(self.params)] * len(model_input)


def quadratic_value(params: dict[str, Any]) -> float:
    """(x - 2)^2 + (y + 1)^2, plus a penalty per optimizer choice."""
    x, y = float(params["x"]), float(params.get("y", 0.0))
    penalty = {"adam": 0.0, "sgd": 0.5}.get(str(params.get("optimizer", "adam")), 1.0)
    return (x - 2.0) ** 2 + (y + 1.0) ** 2 + penalty + 0.1 * float(params.get("momentum", 0.0))


def objective(params: dict[str, Any], ctx: TrialContext) -> float:
    """Minimise :func:`quadratic_value`; reports three steps and logs a pyfunc model."""
    value = quadratic_value(params)
    for step in range(3):
        ctx.report(value * (1.0 + 0.5 / (step + 1)), step)
    ctx.log_model(QuadraticModel(dict(params)), flavor="pyfunc", input_example=[[0.0]])
    return value


def optuna_style(trial: optuna.Trial) -> float:
    """An unchanged Optuna objective: its suggest calls get the pre-chosen params."""
    x = trial.suggest_float("x", -5, 5)
    y = trial.suggest_float("y", -5, 5)
    return (x - 2.0) ** 2 + (y + 1.0) ** 2 + (0.0 if math.isfinite(x) else 1.0)
