"""Objectives that misbehave on purpose, for worker and chaos tests (imported by the worker)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import optuna

from hpo_core.examples.quadratic import QuadraticModel, quadratic_value
from hpo_core.objective import TrialContext


def good(params: dict[str, Any], ctx: TrialContext) -> float:
    """A well-behaved quadratic that logs no model."""
    return quadratic_value(params)


def raises(params: dict[str, Any], ctx: TrialContext) -> float:
    """Always raises."""
    raise RuntimeError(f"boom at x={params['x']}")


def returns_nan(params: dict[str, Any], ctx: TrialContext) -> float:
    """Returns NaN."""
    return float("nan")


def returns_string(params: dict[str, Any], ctx: TrialContext) -> Any:
    """Returns a string instead of a number."""
    return "0.93"


def hangs(params: dict[str, Any], ctx: TrialContext) -> float:
    """Never returns on its own."""
    time.sleep(3600)
    return 0.0


def fails_first_attempt(params: dict[str, Any], ctx: TrialContext) -> float:
    """Fails the first time each trial runs (marker files under $HPO_TEST_MARKERS)."""
    marker = Path(os.environ["HPO_TEST_MARKERS"]) / f"{ctx.params['x']!r}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("failed once")
        raise RuntimeError("transient failure on the first attempt")
    return quadratic_value(params)


def optuna_style(trial: optuna.Trial) -> float:
    """An unchanged Optuna objective."""
    x = trial.suggest_float("x", -5, 5)
    trial.report(x, 0)
    return (x - 2.0) ** 2


def optuna_undeclared(trial: optuna.Trial) -> float:
    """An Optuna objective that asks for a parameter the study does not declare."""
    x = trial.suggest_float("x", -5, 5)
    depth = trial.suggest_int("depth", 1, 10)
    return x + depth


def recorded(params: dict[str, Any], ctx: TrialContext) -> float:
    """Writes one JSON file per evaluation under $HPO_TEST_EVALUATIONS, so a test can count them.

    Sleeps $HPO_TEST_EVAL_SECONDS (default 1) so that concurrent workers overlap, and fails the
    trial numbers listed in $HPO_TEST_FAIL_TRIALS (comma-separated); their replacements succeed.
    """
    started = time.time()
    time.sleep(float(os.environ.get("HPO_TEST_EVAL_SECONDS", "1")))
    record = {"number": ctx.number, "params": params, "start": started, "end": time.time()}
    folder = Path(os.environ["HPO_TEST_EVALUATIONS"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{ctx.number}.{uuid.uuid4().hex}.json").write_text(json.dumps(record))
    failing = {int(n) for n in os.environ.get("HPO_TEST_FAIL_TRIALS", "").split(",") if n}
    if ctx.number in failing:
        raise RuntimeError(f"trial {ctx.number} fails on purpose")
    return quadratic_value(params)


def space(trial: optuna.Trial) -> None:
    """A define-by-run space function: one float."""
    trial.suggest_float("x", -5, 5)


def refit(params: dict[str, Any], ctx: Any) -> QuadraticModel:
    """A refit hook: the model for the best params (a pyfunc model that predicts the loss)."""
    return QuadraticModel(dict(params))


def two_metrics(params: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
    """Two objectives: ``loss`` (the quadratic, minimised) and ``score`` (= x, maximised)."""
    return {"loss": quadratic_value(params), "score": float(params["x"])}


def waits_for_release(params: dict[str, Any], ctx: TrialContext) -> float:
    """Reports a step and logs a metric, then waits until the file $HPO_TEST_RELEASE exists (a test
    changes the world meanwhile, e.g. stops the MLflow server), then reports again and returns."""
    ctx.report(quadratic_value(params) + 1.0, 0)
    release = Path(os.environ["HPO_TEST_RELEASE"])
    deadline = time.monotonic() + 120
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    ctx.report(quadratic_value(params) + 0.5, 1)
    ctx.log_metric("after_release", 1.0)
    return quadratic_value(params)
