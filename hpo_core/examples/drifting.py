"""A fast classifier on a synthetic data feed that changes from day to day (nightly retuning).

The day comes from ``$HPO_EXAMPLE_DAY`` (default 1), so the trial workers and the ``finalize``
task of one DAG run see the same data. The feed's decision boundary turns on day 2 (the old
champion gets worse) and on day 3 the feed delivers only a few training rows (a model trained
on them is worse than the champion). ``evaluate(model, ctx)`` scores any model on the day's
held-out rows, which is how ``finalize`` compares challenger and champion fairly.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from hpo_core.objective import TrialContext

__all__ = ["ENV_DAY", "FEED", "build_model", "day_data", "evaluate", "objective"]

ENV_DAY = "HPO_EXAMPLE_DAY"
#: Per day: (angle of the decision boundary in degrees, training rows delivered).
FEED: dict[int, tuple[float, int]] = {1: (0.0, 600), 2: (75.0, 600), 3: (75.0, 40)}
_FEATURES = 12
_HELD_OUT_ROWS = 500


def _day() -> int:
    day = int(os.environ.get(ENV_DAY, "1"))
    if day not in FEED:
        raise ValueError(f"{ENV_DAY}={day}: the example feed has days {sorted(FEED)}")
    return day


def day_data(day: int, *, held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The day's training rows (or its held-out rows): features and 0/1 labels."""
    angle, rows = FEED[day]
    rng = np.random.default_rng(1000 * day + (1 if held_out else 0))
    n = _HELD_OUT_ROWS if held_out else rows
    x = rng.normal(size=(n, _FEATURES))
    theta = math.radians(angle)
    weights = np.zeros(_FEATURES)
    weights[0], weights[1] = math.cos(theta), math.sin(theta)
    y = (x @ weights + 0.3 * rng.normal(size=n) > 0).astype(int)
    return x, y


def data_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """A short hash of a data set, recorded as lineage."""
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()[:16]


def build_model(params: dict[str, Any]) -> LogisticRegression:
    """The classifier for a set of params."""
    return LogisticRegression(C=float(params["C"]), fit_intercept=bool(params["fit_intercept"]), max_iter=500)


def objective(params: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
    """Mean ROC AUC over 3 stratified folds of the day's training rows; logs the refitted model."""
    x, y = day_data(_day())
    ctx.set_lineage(data_fingerprint=data_fingerprint(x, y), code_version="drifting/1")
    scores = []
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    for step, (train, test) in enumerate(folds.split(x, y)):
        model = build_model(params).fit(x[train], y[train])
        scores.append(float(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1])))
        ctx.report(float(np.mean(scores)), step)
    # Declared requirements: MLflow would otherwise infer them in a subprocess (seconds per trial).
    ctx.log_model(
        build_model(params).fit(x, y),
        input_example=x[:2],
        pip_requirements=[f"scikit-learn=={sklearn.__version__}", f"numpy=={np.__version__}"],
    )
    return {"roc_auc": float(np.mean(scores))}


def evaluate(model: Any, ctx: Any) -> float:
    """ROC AUC of a fitted model on the day's held-out rows."""
    x, y = day_data(_day(), held_out=True)
    ctx.set_lineage(data_fingerprint=data_fingerprint(x, y))
    return float(roc_auc_score(y, model.predict_proba(x)[:, 1]))
