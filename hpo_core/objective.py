"""The objective interface: ``objective(params, ctx)`` or an unchanged Optuna ``objective(trial)``."""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import mlflow
import optuna
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hpo_core.errors import ObjectiveError, SearchSpaceError
from hpo_core.spec import StudySpec
from hpo_core.tracking.runs import TRACKING_ERRORS

__all__ = [
    "PresetTrial",
    "RefitContext",
    "TrialContext",
    "call_objective",
    "log_model",
    "logged_model_of_run",
    "normalize_result",
]


def log_model(model: Any, *, name: str = "model", flavor: str | None = None, **kwargs: Any) -> str:
    """Log ``model`` to the active MLflow run with its flavour; return its model URI (``models:/m-…``).

    ``flavor`` defaults to ``sklearn`` for scikit-learn estimators and ``pyfunc`` otherwise.
    """
    if flavor is None:
        flavor = "sklearn" if type(model).__module__.startswith("sklearn") else "pyfunc"
    module = getattr(mlflow, flavor, None)
    if module is None or not hasattr(module, "log_model"):
        raise ObjectiveError(f"unknown MLflow flavor {flavor!r}")
    if flavor == "pyfunc" and "python_model" not in kwargs:
        kwargs["python_model"] = model
        info = module.log_model(name=name, **kwargs)
    else:
        info = module.log_model(model, name=name, **kwargs)
    return str(info.model_uri)


def logged_model_of_run(run_id: str) -> str | None:
    """The model this process last logged to run ``run_id`` with MLflow's own API, if any.

    How an Optuna ``objective(trial)``, which has no ``ctx``, gives finalize its model: it calls
    ``mlflow.<flavor>.log_model(model, name="model")`` while its trial's run is active.
    """
    try:
        logged = mlflow.last_logged_model()
    except MlflowException:  # the last model this process logged went to another tracking server
        return None
    if logged is None or logged.source_run_id != run_id:
        return None
    return f"models:/{logged.model_id}"


log = logging.getLogger(__name__)


class TrialContext:
    """What an objective gets besides its params: identity, seed, reporting, logging.

    Metrics and models go to the trial's MLflow child run; intermediate values go to the
    Optuna trial, so pruning works across the whole batch. Tracking is not the source of truth:
    when MLflow fails, metrics and tags are dropped for the rest of the trial with a warning
    (:attr:`tracking_missing` says what), and the objective goes on. ``log_model`` raises then:
    the model to register cannot be kept anywhere else.
    """

    def __init__(
        self,
        *,
        trial: optuna.trial.BaseTrial,
        spec: StudySpec,
        params: Mapping[str, Any],
        seed: int,
        round_number: int,
        mlflow_run_id: str | None,
        attempt: int = 1,
        mlflow_client: MlflowClient | None = None,
    ) -> None:
        self._trial = trial
        self._mlflow_client = mlflow_client
        self.spec = spec
        self.params = dict(params)
        self.seed = seed
        self.round = round_number
        self.mlflow_run_id = mlflow_run_id
        #: Airflow try number of this evaluation (2 or more: an automatic retry or a manual clear).
        self.attempt = attempt
        self.model_uri: str | None = None
        self.lineage: dict[str, str] = {}
        #: What the MLflow run missed because MLflow failed (``None``: nothing).
        self.tracking_missing: str | None = None

    @property
    def number(self) -> int:
        """Optuna trial number."""
        return int(self._trial.number)

    @property
    def trial_number(self) -> int:
        """Alias of :attr:`number`."""
        return self.number

    def report(self, value: float, step: int) -> None:
        """Report an intermediate value (used by the pruner, also logged to MLflow)."""
        self._trial.report(float(value), step)
        self.log_metric("intermediate_value", float(value), step=step)

    def should_prune(self) -> bool:
        """Whether the pruner says this trial should stop now (raise ``optuna.TrialPruned``)."""
        return bool(self._trial.should_prune())

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        """Log a metric to the trial's MLflow run."""
        self.log_metrics({key: value}, step=step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log several metrics at once (one call to the tracking server)."""
        if self.mlflow_run_id is None or self.tracking_missing or not metrics:
            return
        now = int(time.time() * 1000)
        try:
            self._client().log_batch(
                self.mlflow_run_id,
                metrics=[Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()],
            )
        except TRACKING_ERRORS as e:
            self._tracking_failed("metrics", e)

    def set_tag(self, key: str, value: str) -> None:
        """Tag the trial's MLflow run."""
        if self.mlflow_run_id is None or self.tracking_missing:
            return
        try:
            self._client().set_tag(self.mlflow_run_id, key, str(value))
        except TRACKING_ERRORS as e:
            self._tracking_failed("tags", e)

    def _tracking_failed(self, what: str, error: BaseException) -> None:
        self.tracking_missing = f"{what} from step on not logged: MLflow failed ({type(error).__name__})"
        log.warning("trial %d: %s; the objective goes on", self.number, self.tracking_missing)

    def _client(self) -> MlflowClient:
        if self._mlflow_client is None:
            self._mlflow_client = MlflowClient()
        return self._mlflow_client

    def set_lineage(self, *, data_fingerprint: str | None = None, code_version: str | None = None) -> None:
        """Record what the model was trained on; copied to the registered model version."""
        if data_fingerprint is not None:
            self.lineage["data_fingerprint"] = str(data_fingerprint)
        if code_version is not None:
            self.lineage["code_version"] = str(code_version)
        for key, value in self.lineage.items():
            self.set_tag(f"hpo.{key}", value)

    def log_model(self, model: Any, *, name: str = "model", flavor: str | None = None, **kwargs: Any) -> str:
        """Log the trial's model so that ``finalize`` can register it; returns its model URI.

        ``flavor`` defaults to ``sklearn`` for scikit-learn estimators and ``pyfunc`` otherwise.
        """
        self.model_uri = log_model(model, name=name, flavor=flavor, **kwargs)
        return self.model_uri


class RefitContext(TrialContext):
    """What the ``refit`` hook gets: the best trial's number, the run's seed, MLflow logging.

    The hook fits the model to register with the best params (typically on all the data) and
    returns it; finalize logs it, unless the hook logged it itself with :meth:`log_model` (e.g. to
    give an ``input_example``). Nothing is reported or pruned here.
    """

    def report(self, value: float, step: int) -> None:
        """Accepted for code shared with the objective; a refit has nothing to prune."""

    def should_prune(self) -> bool:
        """Never: a refit runs to the end."""
        return False


class PresetTrial:
    """Stands in for ``optuna.Trial`` in an unchanged Optuna objective.

    Its ``suggest_*`` calls return the params that ``suggest`` already chose for this trial;
    a parameter the study does not declare (or that is inactive) is a clear error.
    """

    def __init__(self, trial: optuna.trial.Trial, spec: StudySpec, params: Mapping[str, Any]) -> None:
        self._trial = trial
        self._spec = spec
        self._params = dict(params)

    @property
    def number(self) -> int:
        """Optuna trial number."""
        return int(self._trial.number)

    @property
    def params(self) -> dict[str, Any]:
        """The trial's params."""
        return dict(self._params)

    @property
    def user_attrs(self) -> dict[str, Any]:
        """The trial's user attributes."""
        return dict(self._trial.user_attrs)

    def _get(self, name: str) -> Any:
        if name in self._params:
            return self._params[name]
        declared = self._spec.search_space or {}
        if name in declared:
            raise SearchSpaceError(
                f"objective asked for parameter {name!r}, which the study declares but is inactive "
                "for this trial (its condition is not met); suggest it only under the same condition"
            )
        raise SearchSpaceError(
            f"objective asked for parameter {name!r}, which the study's search_space does not declare "
            f"(declared: {sorted(declared) or sorted(self._params)}); add it to the study file"
        )

    def suggest_float(self, name: str, *args: Any, **kwargs: Any) -> float:
        """Return the pre-chosen float."""
        return float(self._get(name))

    def suggest_int(self, name: str, *args: Any, **kwargs: Any) -> int:
        """Return the pre-chosen integer."""
        return int(self._get(name))

    def suggest_categorical(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Return the pre-chosen choice."""
        return self._get(name)

    def suggest_uniform(self, name: str, *args: Any, **kwargs: Any) -> float:
        """Deprecated Optuna alias, kept for old objectives."""
        return self.suggest_float(name)

    def suggest_loguniform(self, name: str, *args: Any, **kwargs: Any) -> float:
        """Deprecated Optuna alias, kept for old objectives."""
        return self.suggest_float(name)

    def report(self, value: float, step: int) -> None:
        """Report an intermediate value to the real trial."""
        self._trial.report(value, step)

    def should_prune(self) -> bool:
        """Ask the study's pruner."""
        return bool(self._trial.should_prune())

    def set_user_attr(self, key: str, value: Any) -> None:
        """Set a user attribute on the real trial."""
        self._trial.set_user_attr(key, value)


def call_objective(func: Callable[..., Any], ctx: TrialContext, trial: optuna.trial.Trial) -> Any:
    """Call ``func`` in the style it was written for: ``(params, ctx)`` or Optuna's ``(trial)``."""
    try:
        sig = inspect.signature(func)
        positional = [
            p
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        positional = []
    if len(positional) == 1:
        return func(PresetTrial(trial, ctx.spec, ctx.params))
    return func(ctx.params, ctx)


def normalize_result(spec: StudySpec, result: Any) -> tuple[list[float], dict[str, float]]:
    """Turn what the objective returned into objective values plus extra metrics.

    Raises:
        ObjectiveError: wrong type, a missing metric, or a value that is NaN or infinite.
    """
    names = spec.objective_metrics
    extra: dict[str, float] = {}
    if isinstance(result, Mapping):
        missing = [m for m in names if m not in result]
        if missing:
            raise ObjectiveError(
                f"objective returned a dict without {missing} (keys: {sorted(map(str, result))}); "
                f"it must contain the study metric(s) {names}"
            )
        values = [_finite(result[m], m) for m in names]
        for key, value in result.items():
            if key not in names and _is_number(value):
                extra[str(key)] = float(value)
        return values, extra
    if len(names) == 1 and _is_number(result):
        return [_finite(result, names[0])], extra
    if len(names) > 1 and isinstance(result, Sequence) and not isinstance(result, str | bytes):
        if len(result) != len(names):
            raise ObjectiveError(f"objective returned {len(result)} values, the study has {len(names)}")
        return [_finite(v, m) for v, m in zip(result, names, strict=True)], extra
    expected = "a number" if len(names) == 1 else f"{len(names)} numbers"
    raise ObjectiveError(
        f"objective returned {type(result).__name__} {_short(result)}; expected {expected} "
        f"or a dict with key(s) {names}"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: Any, name: str) -> float:
    if not _is_number(value):
        raise ObjectiveError(
            f"objective value {name!r} is {type(value).__name__} {_short(value)}, not a number"
        )
    number = float(value)
    if math.isnan(number):
        raise ObjectiveError(f"objective value {name!r} is NaN")
    if math.isinf(number):
        raise ObjectiveError(f"objective value {name!r} is infinite")
    return number


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
