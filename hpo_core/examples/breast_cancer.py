"""Gradient boosting on scikit-learn's breast cancer data, cross-validated (the example study)."""

from __future__ import annotations

import hashlib
from importlib.metadata import version
from typing import Any

import numpy as np
import optuna
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split

from hpo_core.objective import TrialContext

#: The one non-default type a fitted HistGradientBoostingClassifier contains (reviewed: ours).
TRUSTED_TYPES = ["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]


#: Share of the rows held out: no trial and no registered model ever trains on them; ``evaluate``
#: scores champion and challenger on them (the fair promotion gate).
HELD_OUT = 0.3


def _data() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True)
    return x, y


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the training rows and of the held-out rows (fixed, stratified)."""
    _, y = _data()
    rows = np.arange(len(y))
    train, held_out = train_test_split(rows, test_size=HELD_OUT, random_state=0, stratify=y)
    return np.sort(train), np.sort(held_out)


def training_data() -> tuple[np.ndarray, np.ndarray]:
    """The rows trials cross-validate on and the final model is fitted on."""
    x, y = _data()
    train, _ = split_indices()
    return x[train], y[train]


def held_out_data() -> tuple[np.ndarray, np.ndarray]:
    """The rows no model trains on: what ``evaluate`` scores."""
    x, y = _data()
    _, held_out = split_indices()
    return x[held_out], y[held_out]


def data_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """A short hash of the training data, recorded as lineage on the registered model."""
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()[:16]


def build_model(params: dict[str, Any], seed: int) -> HistGradientBoostingClassifier:
    """The classifier for a set of params (``l2_regularization`` only when regularised)."""
    return HistGradientBoostingClassifier(
        learning_rate=params["learning_rate"],
        max_depth=params["max_depth"],
        max_leaf_nodes=params["max_leaf_nodes"],
        min_samples_leaf=params["min_samples_leaf"],
        l2_regularization=params.get("l2_regularization", 0.0) if params["regularize"] else 0.0,
        max_iter=params.get("max_iter", 100),
        random_state=seed % (2**31),
    )


def objective(params: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
    """Mean ROC AUC over 3 stratified folds of the training rows; reports each fold so the pruner can
    act. The model it logs is fitted on all the training rows, never on the held-out ones."""
    x, y = training_data()
    ctx.set_lineage(data_fingerprint=data_fingerprint(x, y), code_version="breast_cancer/1")
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    scores = []
    for step, (train, test) in enumerate(folds.split(x, y)):
        model = build_model(params, ctx.seed)
        scores.append(_fold_score(model, x, y, train, test))
        ctx.report(float(np.mean(scores)), step)
        if ctx.should_prune():
            raise optuna.TrialPruned(f"mean AUC {np.mean(scores):.4f} after fold {step + 1}")
    final = build_model(params, ctx.seed).fit(x, y)
    # MLflow stores scikit-learn models with skops, which loads only types declared trusted. The
    # requirements are given: inferring them starts a subprocess that loads the model (seconds).
    ctx.log_model(
        final,
        input_example=x[:2],
        skops_trusted_types=TRUSTED_TYPES,
        pip_requirements=model_requirements(),
    )
    return {"roc_auc": float(np.mean(scores)), "roc_auc_std": float(np.std(scores))}


def model_requirements() -> list[str]:
    """What loading the logged model needs, pinned to the versions that trained it."""
    return [f"{name}=={version(name)}" for name in ("scikit-learn", "skops", "numpy", "scipy")]


def _fold_score(
    model: HistGradientBoostingClassifier, x: np.ndarray, y: np.ndarray, train: Any, test: Any
) -> float:
    model.fit(x[train], y[train])
    return float(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))


def evaluate(model: Any, ctx: Any) -> float:
    """ROC AUC of a fitted model on the held-out rows, which no trial or model trained on: finalize
    scores champion and challenger here, so the promotion gate compares them on unseen data."""
    x, y = held_out_data()
    x_train, y_train = training_data()
    ctx.set_lineage(data_fingerprint=data_fingerprint(x_train, y_train))
    return float(roc_auc_score(y, model.predict_proba(x)[:, 1]))


__all__ = [
    "HELD_OUT",
    "build_model",
    "data_fingerprint",
    "evaluate",
    "held_out_data",
    "model_requirements",
    "objective",
    "split_indices",
    "training_data",
]
