"""Objectives for the chaos tests, steered by the trial's params and attempt only.

No environment variable is read, so each behaves the same in a bare worker, under ``dag.test()``
and in a real Airflow whose environment the test cannot change. A study fixes a behaviour with a
one-choice categorical parameter, e.g. ``seconds: {type: categorical, choices: [30]}``.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from hpo_core.examples.quadratic import QuadraticModel, quadratic_value
from hpo_core.objective import TrialContext

#: Objective value of each ``mode`` of :func:`by_mode` that completes.
MODE_VALUES = {"ok": 1.0, "flaky": 2.0, "hang_once": 3.0, "kill_once": 4.0}


def _finish(value: float, params: dict[str, Any], ctx: TrialContext) -> float:
    """Log a model when the study registers one, and return ``value``."""
    if ctx.spec.mlflow.registered_model:
        # Requirements given: MLflow would otherwise infer them in a subprocess (slow).
        ctx.log_model(QuadraticModel(dict(params)), flavor="pyfunc", pip_requirements=["mlflow"])
    return value


def slow_first_attempt(params: dict[str, Any], ctx: TrialContext) -> float:
    """Sleeps ``params['seconds']`` on attempt 1 (a retry sleeps ``params['retry_seconds']``, default
    0), then the quadratic."""
    time.sleep(float(params.get("seconds" if ctx.attempt == 1 else "retry_seconds", 0)))
    return _finish(quadratic_value(params), params, ctx)


def fails_on_first_attempt(params: dict[str, Any], ctx: TrialContext) -> float:
    """Raises on attempt 1 of every trial; a retry or a manual clear (attempt 2+) succeeds."""
    if ctx.attempt == 1:
        raise RuntimeError(f"transient failure of trial {ctx.number} on its first attempt")
    return _finish(quadratic_value(params), params, ctx)


def by_mode(params: dict[str, Any], ctx: TrialContext) -> Any:
    """Behaves as ``params['mode']`` says: ok, flaky (fails on attempt 1), raise, nan, string, hang,
    kill (SIGKILLs its own process), and ``hang_once`` / ``kill_once`` (only on attempt 1)."""
    mode = params["mode"]
    if mode == "kill" or (mode == "kill_once" and ctx.attempt == 1):
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang_once" and ctx.attempt == 1:
        time.sleep(3600)
    if mode == "raise":
        raise RuntimeError(f"objective broke on purpose in trial {ctx.number}")
    if mode == "nan":
        return float("nan")
    if mode == "string":
        return "0.93"
    if mode == "hang":
        time.sleep(3600)
    if mode == "flaky" and ctx.attempt == 1:
        raise RuntimeError(f"transient failure of trial {ctx.number} on its first attempt")
    return _finish(MODE_VALUES[mode], params, ctx)
