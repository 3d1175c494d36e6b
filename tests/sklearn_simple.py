"""optuna-examples' ``sklearn_simple`` objective, unchanged in spirit: an Optuna ``objective(trial)``
that picks a classifier for the iris data and returns its cross-validated accuracy. It has no
``ctx`` and logs no model; the study's ``refit`` hook fits the best params to register.

(Written from the example's description; ``n_jobs`` is left at 1 so two trials do not start a
process pool each on a two-core machine.)
"""

from __future__ import annotations

from typing import Any

import mlflow.sklearn
import optuna
import sklearn.datasets
import sklearn.ensemble
import sklearn.metrics
import sklearn.model_selection
import sklearn.svm


def objective(trial: optuna.Trial) -> float:
    iris = sklearn.datasets.load_iris()
    x, y = iris.data, iris.target
    classifier_name = trial.suggest_categorical("classifier", ["SVC", "RandomForest"])
    if classifier_name == "SVC":
        svc_c = trial.suggest_float("svc_c", 1e-10, 1e10, log=True)
        classifier_obj: Any = sklearn.svm.SVC(C=svc_c, gamma="auto")
    else:
        rf_max_depth = trial.suggest_int("rf_max_depth", 2, 32, log=True)
        classifier_obj = sklearn.ensemble.RandomForestClassifier(max_depth=rf_max_depth, n_estimators=10)
    score = sklearn.model_selection.cross_val_score(classifier_obj, x, y, cv=3)
    accuracy = score.mean()
    return float(accuracy)


def refit(params: dict[str, Any], ctx: Any) -> Any:
    """The study's refit hook: the best params' classifier, fitted on all the iris rows."""
    iris = sklearn.datasets.load_iris()
    if params["classifier"] == "SVC":
        model: Any = sklearn.svm.SVC(C=params["svc_c"], gamma="auto")
    else:
        model = sklearn.ensemble.RandomForestClassifier(
            max_depth=params["rf_max_depth"], n_estimators=10, random_state=ctx.seed % 2**31
        )
    return model.fit(iris.data, iris.target)


def evaluate(model: Any, ctx: Any) -> float:
    """Re-scores champion and challenger for the promotion gate (accuracy on the iris rows)."""
    iris = sklearn.datasets.load_iris()
    return float(sklearn.metrics.accuracy_score(iris.target, model.predict(iris.data)))


def logs_its_model(trial: optuna.Trial) -> float:
    """The same objective logging its fitted model as any MLflow script would (no ctx needed)."""
    iris = sklearn.datasets.load_iris()
    depth = trial.suggest_int("rf_max_depth", 2, 32, log=True)
    model = sklearn.ensemble.RandomForestClassifier(max_depth=depth, n_estimators=10)
    model.fit(iris.data, iris.target)
    # MLflow stores scikit-learn models with skops, which loads the tree type only when trusted.
    mlflow.sklearn.log_model(model, name="model", skops_trusted_types=["sklearn.tree._tree.Tree"])
    return float(model.score(iris.data, iris.target))
