"""Study definition: a YAML file loaded safely into a frozen, validated :class:`StudySpec`.

The spec is plain data. It never imports Airflow, Optuna or MLflow, so the DAG processor can
parse every study file cheaply and the worker image can load it without Airflow installed.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonDict
from pydantic_core import PydanticCustomError

from hpo_core.errors import StudySpecError
from hpo_core.samplers import SAMPLERS

__all__ = [
    "NAME_PATTERN",
    "SCHEMA_PATH",
    "SEED_MAX",
    "AlertsSpec",
    "BudgetSpec",
    "CategoricalParam",
    "Condition",
    "FloatParam",
    "IntParam",
    "MlflowSpec",
    "ParamSpec",
    "PromotionSpec",
    "PrunerSpec",
    "SamplerSpec",
    "StoppingSpec",
    "StudySpec",
    "TrialSpec",
    "WarmStartSpec",
    "WorkerSpec",
    "load_spec",
    "parse_spec",
    "spec_from_json",
    "study_schema",
    "study_schema_text",
]

#: A study name (the DAG id is ``hpo_<name>``).
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
_NAME_RE = NAME_PATTERN
_IMPORT_PATH_RE = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
CategoricalValue = str | int | float | bool | None
#: The largest sampler seed (numpy's limit); the trigger form has the same bound.
SEED_MAX = 2**32 - 1
#: Airflow refuses a DAG tag longer than this.
TAG_MAX_LENGTH = 100


#: Error type of :func:`_at`: a message located below the object being validated.
_LOCATED = "hpo_located"


def _at(path: str, value: Any, message: str) -> PydanticCustomError:
    """An error at ``path`` below the validated object, naming ``value``; :func:`_format_errors` words it."""
    return PydanticCustomError(
        _LOCATED, "{message}", {"path": path, "value": _shorten(value), "message": message}
    )


class _Frozen(BaseModel):
    # No NaN or infinity anywhere: they mean nothing in a study file, and JSON (the stored spec) has
    # no spelling for them.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class Condition(_Frozen):
    """Makes a parameter exist only when another parameter has one of the given values."""

    param: str = Field(description="name of the parent parameter")
    equals: CategoricalValue = None
    in_: list[CategoricalValue] | None = Field(default=None, alias="in")

    @field_validator("equals", "in_", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        _refuse_non_finite(v)
        return v

    @model_validator(mode="after")
    def _one_of(self) -> Condition:
        if ("equals" in self.model_fields_set) == (self.in_ is not None):
            raise ValueError("give exactly one of 'equals' or 'in'")
        if self.in_ is not None and not self.in_:
            raise ValueError("'in' needs at least one value")
        return self

    @model_serializer(mode="wrap")
    def _only_the_given_key(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Serialise ``equals`` or ``in``, never both: the stored spec must validate again."""
        data: dict[str, Any] = handler(self)
        for key in ("equals",) if self.in_ is not None else ("in", "in_"):
            data.pop(key, None)
        return data

    @property
    def values(self) -> list[CategoricalValue]:
        """The parent values that activate the parameter."""
        return list(self.in_) if self.in_ is not None else [self.equals]

    def is_active(self, params: Mapping[str, Any]) -> bool:
        """Whether the parameter is active given the already chosen ``params``."""
        return self.param in params and params[self.param] in self.values


class _ParamBase(_Frozen):
    condition: Condition | None = None


class FloatParam(_ParamBase):
    """A float in ``[low, high]``, optionally log-scaled or on a grid of ``step``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step)
        return self


class IntParam(_ParamBase):
    """An integer in ``[low, high]``, optionally log-scaled or with a ``step``."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log, None if self.step == 1 else self.step)
        if self.log and self.step != 1:
            raise _at("step", self.step, "must be 1 when 'log' is true")
        return self


class CategoricalParam(_ParamBase):
    """One of a list of choices (strings, numbers, booleans or null)."""

    type: Literal["categorical"]
    choices: list[CategoricalValue]

    @field_validator("choices", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        _refuse_non_finite(v)
        return v

    @field_validator("choices")
    @classmethod
    def _distinct(cls, v: list[CategoricalValue]) -> list[CategoricalValue]:
        if not v:
            raise ValueError("needs at least one choice")
        if len({json.dumps(c) for c in v}) != len(v):
            raise ValueError(f"choices must be distinct, got {v!r}")
        return v


def _refuse_non_finite(value: Any) -> None:
    """A categorical value (or a list of them) may not be NaN or infinite: no JSON, no equality."""
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{v!r} is not a usable value; use finite numbers, strings, booleans or null")


ParamSpec = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise _at("low", low, "low and high must be finite numbers")
    if low > high:
        raise _at("low", low, f"must not be above high ({high}); swap them")
    if log and low <= 0:
        raise _at("low", low, "must be > 0 when 'log' is true; raise low or set log: false")
    if step is not None:
        if step <= 0:
            raise _at("step", step, "must be positive")
        if log:
            raise _at("step", step, "cannot be combined with 'log: true'; remove one of them")


#: Default of ``sampler.history_limit``: below it a sampler sees the whole study.
DEFAULT_HISTORY_LIMIT = 500
MIN_HISTORY_LIMIT = 50
#: Marks a sampler option that a trigger may override (the ``sampler_options`` of the trigger form).
_TRIGGER: JsonDict = {"trigger": True}


class SamplerSpec(_Frozen):
    """Which sampler suggests the trials (a name of :data:`hpo_core.samplers.SAMPLERS`), with its options.

    An option whose field carries ``json_schema_extra=_TRIGGER`` may be overridden per run from the
    trigger form (:meth:`trigger_options`); the others are fixed by the study file.
    """

    # The registry's names, for editors completing study files (the validator below checks them).
    type: str = Field(default="tpe", json_schema_extra={"enum": list(SAMPLERS)})
    #: numpy's range for seeds (Optuna's samplers seed a ``RandomState`` with it).
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    multivariate: bool = Field(default=False, json_schema_extra=_TRIGGER)
    constant_liar: bool = Field(default=True, json_schema_extra=_TRIGGER)
    n_startup_trials: int | None = Field(default=None, ge=0, le=10_000, json_schema_extra=_TRIGGER)
    population_size: int | None = Field(default=None, ge=2, le=10_000, json_schema_extra=_TRIGGER)
    qmc_type: Literal["sobol", "halton"] = "sobol"
    #: What the constant liar says a running trial scored (TPE): ``mean`` of the complete trials, or
    #: ``worst`` (Optuna's own liar: running trials join the bad group).
    lie: Literal["mean", "worst"] = "mean"
    #: K: the most finished trials a model-based sampler (tpe, gp, cmaes, nsga2) fits on per ask; on a
    #: larger study it sees the best K/10 and the most recent of the rest (null: every trial).
    history_limit: int | None = DEFAULT_HISTORY_LIMIT

    @model_validator(mode="after")
    def _history(self) -> SamplerSpec:
        k = self.history_limit
        if k is None:
            return self
        floor = max(MIN_HISTORY_LIMIT, 2 * (self.population_size or 0), 2 * (self.n_startup_trials or 0))
        if isinstance(k, bool) or k < floor:
            raise _at(
                "history_limit",
                k,
                f"must be at least {floor} (the sampler needs its startup trials and two generations "
                "in view); raise it, or use null to let the sampler see every trial",
            )
        return self

    @classmethod
    def trigger_options(cls) -> dict[str, dict[str, Any]]:
        """The options a trigger may override, each with its JSON schema (for the trigger form)."""
        properties = cls.model_json_schema()["properties"]
        out: dict[str, dict[str, Any]] = {}
        for name, field in cls.model_fields.items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get("trigger"):
                schema = dict(properties[name])
                # ``int | None``: a trigger gives a number or leaves the option out.
                given = [s for s in schema.pop("anyOf", []) if s.get("type") != "null"]
                schema.update(given[0] if len(given) == 1 else {})
                for key in ("trigger", "title", "default"):
                    schema.pop(key, None)
                out[name] = schema
        return out

    @field_validator("type")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in SAMPLERS:
            names = [repr(name) for name in SAMPLERS]
            raise _at("", v, f"is not allowed; allowed: {', '.join(names[:-1])} or {names[-1]}")
        return v


class PrunerSpec(_Frozen):
    """Which pruner stops unpromising trials from their intermediate reports."""

    type: Literal["none", "median", "percentile", "successive_halving", "hyperband"] = "none"
    n_startup_trials: int = Field(default=5, ge=0)
    n_warmup_steps: int = Field(default=0, ge=0)
    percentile: float = Field(default=25.0, gt=0, lt=100)


class BudgetSpec(_Frozen):
    """How many trials, in rounds of how many, within how much time."""

    n_trials: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    max_rounds: int = Field(ge=1, le=200)
    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    timeout: int | None = Field(default=None, gt=0, description="study timeout in seconds")

    @property
    def batch_size_limit(self) -> int:
        """The largest batch a trigger may ask for (defaults to ``batch_size``)."""
        return self.max_batch_size or self.batch_size

    @model_validator(mode="after")
    def _fits(self) -> BudgetSpec:
        if self.batch_size > self.batch_size_limit:
            raise _at(
                "batch_size", self.batch_size, f"must not exceed max_batch_size ({self.max_batch_size})"
            )
        if self.n_trials > self.max_rounds * self.batch_size:
            raise _at(
                "n_trials",
                self.n_trials,
                f"does not fit in max_rounds ({self.max_rounds}) x batch_size ({self.batch_size}) = "
                f"{self.max_rounds * self.batch_size}; raise max_rounds or batch_size, or lower n_trials",
            )
        return self


class StoppingSpec(_Frozen):
    """When to stop before the budget is spent, and when a study counts as failed."""

    target: float | None = None
    patience: int | None = Field(default=None, ge=1, description="rounds without improvement")
    max_failed_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    min_improvement: float = Field(default=0.0, ge=0.0)


class TrialSpec(_Frozen):
    """Per-trial task settings: retries and timeouts (seconds)."""

    retries: int = Field(default=1, ge=0, le=20)
    retry_delay: int = Field(default=10, ge=0)
    execution_timeout: int = Field(default=3600, gt=0)
    stale_timeout: int | None = Field(default=None, gt=0)


class MlflowSpec(_Frozen):
    """Where the study's runs and its registered model go."""

    experiment: str = Field(min_length=1, max_length=200)
    registered_model: str | None = Field(default=None, min_length=1, max_length=200)


#: A Kubernetes quantity (``500m``, ``2``, ``4Gi``, ``1e3``).
_QUANTITY_RE = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"
#: A Kubernetes DNS-1123 label (namespaces) and subdomain (service accounts, secrets).
_DNS_LABEL_RE = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_DNS_SUBDOMAIN_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class ResourcesSpec(_Frozen):
    """Kubernetes resources of one trial pod."""

    cpu: str = Field(default="1", pattern=_QUANTITY_RE)
    memory: str = Field(default="2Gi", pattern=_QUANTITY_RE)
    cpu_limit: str | None = Field(default=None, pattern=_QUANTITY_RE)
    memory_limit: str | None = Field(default=None, pattern=_QUANTITY_RE)
    gpu: int = Field(default=0, ge=0, le=16)


class WorkerSpec(_Frozen):
    """How a trial is evaluated: a local subprocess or a Kubernetes pod."""

    #: A backend registered in ``plugins/hpo_airflow/backends`` (``local``, ``kubernetes``); the DAG
    #: factory checks the name, since the backends are Airflow's side.
    backend: str = Field(default="local", pattern=r"^[a-z][a-z0-9_]*$")
    image: str | None = Field(default=None, min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    namespace: str | None = Field(default=None, pattern=_DNS_LABEL_RE)
    service_account: str | None = Field(default=None, max_length=253, pattern=_DNS_SUBDOMAIN_RE)
    resources: ResourcesSpec = ResourcesSpec()
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    pod_template_file: str | None = None
    secret_name: str = Field(default="hpo-trial-credentials", max_length=253, pattern=_DNS_SUBDOMAIN_RE)
    startup_timeout: int = Field(default=300, gt=0)
    on_finish_action: Literal["delete_pod", "delete_succeeded_pod", "keep_pod"] = "delete_succeeded_pod"
    pool: str | None = None
    max_active_trials: int | None = Field(default=None, ge=1)
    #: Trials one mapped task (a *slot*: one warm worker process, one pod) evaluates in sequence.
    #: 1: one task per trial. A trigger may override it within 1..budget.max_batch_size.
    trials_per_task: int = Field(default=1, ge=1, le=1024)


class ParetoChoice(_Frozen):
    """Rule that picks one trial from the Pareto front of a multi-objective study."""

    metric: str
    weights: dict[str, float] | None = None


class WarmStartSpec(_Frozen):
    """How a new run's study starts from what earlier runs learned.

    ``new_study``: every DAG run is its own study, seeded with the champion's params and the
    previous study's ``top_k`` configurations. ``continue``: all runs add trials to one study.
    """

    mode: Literal["new_study", "continue"] = "new_study"
    top_k: int = Field(default=0, ge=0, le=100, description="best configurations of the previous study")
    from_champion: bool = Field(default=False, description="enqueue the current champion's params first")


class PromotionSpec(_Frozen):
    """When ``finalize`` moves the registered model's ``champion`` alias to the new challenger.

    ``never``: a person decides. ``always``: every challenger. ``if_better``: when it beats the
    champion by at least ``min_improvement`` in ``direction`` (default: the study's).
    """

    rule: Literal["never", "always", "if_better"] = "never"
    min_improvement: float = Field(default=0.0, ge=0.0)
    direction: Literal["minimize", "maximize"] | None = None


class AlertsSpec(_Frozen):
    """A deadline alert: a study run still going ``deadline_seconds`` after it was queued notifies.

    ``callback: log`` writes a warning to the Airflow triggerer's log; ``callback: webhook`` POSTs
    a JSON message to the URL in the environment variable ``webhook_url_env`` or in the Airflow
    connection ``webhook_conn_id``. The URL itself (it often carries a token) never goes here.
    Deadline alerts need a running scheduler and triggerer; ``airflow dags test`` does not run them.
    """

    deadline_seconds: int = Field(gt=0, description="seconds after the run was queued")
    callback: Literal["log", "webhook"] = "log"
    webhook_url_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    webhook_conn_id: str | None = Field(default=None, min_length=1, max_length=250)

    @model_validator(mode="after")
    def _target(self) -> AlertsSpec:
        given = [v for v in (self.webhook_url_env, self.webhook_conn_id) if v]
        if self.callback == "webhook" and len(given) != 1:
            raise _at(
                "callback",
                "webhook",
                "needs exactly one of 'webhook_url_env' (an environment variable holding the URL) "
                "or 'webhook_conn_id' (an Airflow connection); never the URL itself",
            )
        if self.callback == "log" and given:
            raise _at(
                "callback", "log", "ignores 'webhook_url_env' / 'webhook_conn_id'; use callback: webhook"
            )
        return self


class StudySpec(_Frozen):
    """A validated study definition."""

    name: str = Field(pattern=_NAME_RE)
    description: str = ""
    owner: str = "airflow"
    tags: list[Annotated[str, Field(min_length=1, max_length=TAG_MAX_LENGTH)]] = Field(default_factory=list)
    objective: str = Field(pattern=_IMPORT_PATH_RE)
    direction: Literal["minimize", "maximize"] | None = None
    directions: list[Literal["minimize", "maximize"]] | None = None
    metric: str | None = None
    metrics: list[str] | None = None
    search_space: dict[str, ParamSpec] | None = None
    space_function: str | None = Field(default=None, pattern=_IMPORT_PATH_RE)
    #: ``module:function`` ``(params, ctx) -> model``: finalize fits the model to register with the
    #: best params (the "tune, then refit the best on all the data" step).
    refit: str | None = Field(default=None, pattern=_IMPORT_PATH_RE)
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    budget: BudgetSpec
    stopping: StoppingSpec = StoppingSpec()
    trial: TrialSpec = TrialSpec()
    mlflow: MlflowSpec
    pareto_choice: ParetoChoice | None = None
    schedule: str | None = None
    warm_start: WarmStartSpec = WarmStartSpec()
    promotion: PromotionSpec = PromotionSpec()
    worker: WorkerSpec = WorkerSpec()
    alerts: AlertsSpec | None = None

    @field_validator("search_space")
    @classmethod
    def _param_names(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            if not v:
                raise ValueError("declares no parameter; add at least one or use space_function")
            for name in v:
                if not re.match(r"^[A-Za-z_][\w.\-]{0,127}$", name):
                    raise ValueError(f"parameter name {name!r} must be an identifier-like string")
        return v

    @model_validator(mode="after")
    def _one_space(self) -> StudySpec:
        if (self.search_space is None) == (self.space_function is None):
            if self.search_space is not None:
                raise _at(
                    "space_function", self.space_function, "cannot be combined with 'search_space'; keep one"
                )
            raise _at("search_space", None, "is missing; declare the parameters (or name a 'space_function')")
        return self

    @model_validator(mode="after")
    def _objectives(self) -> StudySpec:
        if (self.direction is None) == (self.directions is None):
            if self.direction is not None:
                raise _at("directions", self.directions, "cannot be combined with 'direction'; keep one")
            raise _at("direction", None, "is missing; use 'minimize' or 'maximize' (or 'directions')")
        sampler = SAMPLERS[self.sampler.type]
        if self.directions is None:
            if self.metrics is not None:
                raise _at("metrics", self.metrics, "goes with 'directions'; use 'metric' for one objective")
            if not sampler.single_objective:
                raise _at(
                    "sampler.type", self.sampler.type, "is for several objectives ('directions'); use tpe"
                )
            return self
        if len(self.directions) < 2:
            raise _at("directions", self.directions, "needs at least two entries; use 'direction' for one")
        if self.metrics is None or len(self.metrics) != len(self.directions):
            raise _at("metrics", self.metrics, "must name one metric per entry of 'directions'")
        if not sampler.multi_objective:
            able = [name for name, info in SAMPLERS.items() if info.multi_objective]
            raise _at(
                "sampler.type", self.sampler.type, f"cannot optimise several objectives; use one of {able}"
            )
        if self.pareto_choice is None or self.pareto_choice.metric not in self.metrics:
            raise _at(
                "pareto_choice.metric",
                self.pareto_choice.metric if self.pareto_choice else None,
                f"several objectives need it to name one of the metrics {self.metrics}",
            )
        if self.pruner.type != "none":
            raise _at("pruner.type", self.pruner.type, "pruning needs one objective; set pruner.type: none")
        return self

    @model_validator(mode="after")
    def _space_fits_sampler(self) -> StudySpec:
        finite = SAMPLERS[self.sampler.type].finite_space
        if self.search_space is None:
            if finite:
                raise _at(
                    "sampler.type",
                    self.sampler.type,
                    "needs a declared 'search_space', not a 'space_function'",
                )
            return self
        _check_conditions(self.search_space)
        for pname, p in self.search_space.items() if finite else ():
            if isinstance(p, FloatParam) and p.step is None:
                raise _at(
                    f"search_space.{pname}.step",
                    None,
                    f"the {self.sampler.type} sampler needs a finite grid: give float parameters a 'step'",
                )
        return self

    @model_validator(mode="after")
    def _schedule_and_model(self) -> StudySpec:
        if self.schedule is not None and not self.schedule.strip():
            raise _at("schedule", self.schedule, "must be a cron expression, a preset like '@daily', or null")
        if self.mlflow.registered_model is None:
            if self.refit is not None:
                raise _at(
                    "refit",
                    self.refit,
                    "fits the model to register: set mlflow.registered_model, or remove refit",
                )
            if self.promotion.rule != "never":
                raise _at(
                    "promotion.rule",
                    self.promotion.rule,
                    "needs a model to promote: set mlflow.registered_model, or use rule 'never'",
                )
            if self.warm_start.from_champion:
                raise _at(
                    "warm_start.from_champion",
                    True,
                    "needs mlflow.registered_model to find the champion; set it, or use false",
                )
        return self

    # --- derived views -------------------------------------------------------------------
    @property
    def dag_id(self) -> str:
        """Airflow DAG id of this study."""
        return f"hpo_{self.name}"

    @property
    def is_multi_objective(self) -> bool:
        """Whether the study optimises several objectives."""
        return self.directions is not None

    @property
    def trials_per_task_limit(self) -> int:
        """The most trials one mapped evaluate task may hold: the largest batch, or the spec's own k."""
        return max(self.budget.batch_size_limit, self.worker.trials_per_task)

    @property
    def all_directions(self) -> list[str]:
        """Directions as a list, one per objective."""
        return list(self.directions) if self.directions is not None else [str(self.direction)]

    @property
    def objective_metrics(self) -> list[str]:
        """Metric names, one per objective (defaults to ``value``)."""
        if self.metrics is not None:
            return list(self.metrics)
        return [self.metric or "value"]

    @property
    def score_metric(self) -> str:
        """The metric that ranks trials and models (``pareto_choice.metric`` with several objectives)."""
        if self.pareto_choice is not None:
            return self.pareto_choice.metric
        return self.objective_metrics[0]

    @property
    def promotion_direction(self) -> str:
        """Direction in which a challenger must beat the champion (default: the study's)."""
        if self.promotion.direction is not None:
            return self.promotion.direction
        return self.all_directions[self.objective_metrics.index(self.score_metric)]

    def ordered_params(self) -> list[tuple[str, FloatParam | IntParam | CategoricalParam]]:
        """Declared parameters, parents before the parameters whose condition names them."""
        assert self.search_space is not None  # guarded by callers; not user input
        return _topological(self.search_space)

    def to_json(self) -> str:
        """Serialise for storage (Optuna study attribute) and the worker."""
        return self.model_dump_json(by_alias=True, exclude_none=False)


def _topological(space: Mapping[str, Any]) -> list[tuple[str, Any]]:
    ordered: list[tuple[str, Any]] = []
    placed: set[str] = set()
    pending = dict(space)
    while pending:
        progressed = False
        for name, p in list(pending.items()):
            if p.condition is None or p.condition.param in placed:
                ordered.append((name, p))
                placed.add(name)
                del pending[name]
                progressed = True
        if not progressed:
            raise _at("search_space", sorted(pending), "conditions form a cycle among these parameters")
    return ordered


def _check_conditions(space: Mapping[str, Any]) -> None:
    for name, p in space.items():
        cond = p.condition
        if cond is None:
            continue
        if cond.param == name:
            raise _at(f"search_space.{name}.condition.param", name, "a parameter cannot depend on itself")
        parent = space.get(cond.param)
        if parent is None:
            raise _at(
                f"search_space.{name}.condition.param",
                cond.param,
                f"is not a declared parameter; declared: {', '.join(sorted(space))}",
            )
        if isinstance(parent, CategoricalParam):
            unknown = [v for v in cond.values if v not in parent.choices]
            if unknown:
                raise _at(
                    f"search_space.{name}.condition",
                    unknown[0] if len(unknown) == 1 else unknown,
                    f"is not a choice of {cond.param!r}; choices: {parent.choices!r}",
                )
    _topological(space)


# --- loading -------------------------------------------------------------------------------


def load_spec(path: str | Path) -> StudySpec:
    """Load and validate a study file.

    Raises:
        StudySpecError: the file is unreadable, not YAML, or invalid; the message names the file,
            the field path, the bad value and what is allowed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise StudySpecError(f"{path}: cannot read study file: {e.strerror or e}") from e
    return parse_spec(text, source=str(path))


def parse_spec(text: str, *, source: str = "<string>") -> StudySpec:
    """Validate a study definition given as YAML text."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise StudySpecError(f"{source}: not valid YAML{where}: {problem}") from e
    if raw is None:
        raise StudySpecError(f"{source}: the file is empty; a study needs name, objective, budget, ...")
    if not isinstance(raw, dict):
        raise StudySpecError(
            f"{source}: a study file must be a mapping of fields (name, objective, ...), "
            f"got {type(raw).__name__}"
        )
    return validate_mapping(raw, source=source)


def validate_mapping(raw: Mapping[str, Any], *, source: str) -> StudySpec:
    """Validate an already parsed mapping; used by :func:`parse_spec` and tests."""
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as e:
        raise StudySpecError(_format_errors(source, raw, e)) from e


def spec_from_json(text: str) -> StudySpec:
    """Rebuild a spec stored with :meth:`StudySpec.to_json` (e.g. in the Optuna study)."""
    return validate_mapping(json.loads(text), source="<stored spec>")


#: Where the repository keeps the study file's JSON Schema (``hpo schema -o``; study files and the
#: README point editors to it).
SCHEMA_PATH = Path("schema") / "study.schema.json"


def study_schema() -> dict[str, Any]:
    """The study file's JSON Schema (draft 2020-12), keys as written in YAML (aliases).

    Editors that read JSON Schema (VS Code's YAML extension, JetBrains IDEs) validate and complete
    study files with it. It states each field's type, bounds, allowed values and unknown keys; the
    checks across fields (e.g. ``directions`` needs ``metrics``) stay in :class:`StudySpec`, which
    ``hpo validate`` runs.
    """
    exported = StudySpec.model_json_schema(by_alias=True, mode="validation")
    exported.pop("title", None)
    exported.pop("description", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "HPO study file",
        "description": (
            "A study of the Airflow HPO pipeline (dags/studies/*.yaml): one file, one DAG "
            "hpo_<name>. Generated by `hpo schema` from hpo_core.spec.StudySpec; checks across "
            "fields run in `hpo validate`."
        ),
        **exported,
    }


def study_schema_text() -> str:
    """:func:`study_schema` as the committed file holds it: indented JSON with a final newline."""
    return json.dumps(study_schema(), indent=2) + "\n"


def _format_errors(source: str, raw: Mapping[str, Any], error: ValidationError) -> str:
    lines = []
    seen: set[str] = set()
    for err in error.errors():
        loc = _clean_loc(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1]) if loc else "?"
            allowed = _allowed_keys(raw, loc[:-1])
            hint = [a for a in allowed if sorted(a) == sorted(key)] or difflib.get_close_matches(
                key, allowed, n=1
            )
            msg = f"{path}: unknown key {key!r}; allowed keys: {', '.join(allowed)}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
        elif kind == "missing":
            msg = f"{path}: required field is missing"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            given = err.get("input")
            shown = _shorten(given.get("type")) if isinstance(given, Mapping) else _shorten(given)
            what = "is missing" if kind == "union_tag_not_found" else f"is {shown}"
            msg = f"{path}.type: {what}; allowed: 'float', 'int', 'categorical'"
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            msg = f"{path}: {_shorten(err.get('input'))} is not allowed; allowed: {expected}"
        elif kind == _LOCATED:
            ctx = err.get("ctx", {})
            path = ".".join(part for part in (".".join(map(str, loc)), ctx["path"]) if part) or "(top level)"
            shown, text = ctx["value"], ctx["message"]
            msg = f"{path}: {shown} {text}" if shown != "None" else f"{path}: {text}"
        else:
            detail = err["msg"].removeprefix("Value error, ")
            if kind == "string_pattern_mismatch":
                form = _PATTERN_HINTS.get(str(loc[-1]) if loc else "", "has the wrong form")
                msg = f"{path}: {_shorten(err.get('input'))} {form}"
            else:
                detail = detail.replace("Input should be", "must be")
                msg = f"{path}: {_shorten(err.get('input'))} is not allowed; {detail}"
        if msg not in seen:
            seen.add(msg)
            lines.append(f"{source}: {msg}")
    return "\n".join(lines)


_PATTERN_HINTS = {
    "name": "must start with a letter and use only letters, digits and underscores (at most 64)",
    "objective": "is not an import path; write it as 'package.module:function'",
    "space_function": "is not an import path; write it as 'package.module:function'",
    "refit": "is not an import path; write it as 'package.module:function'",
    "backend": "must be the name of a worker backend, e.g. 'local' or 'kubernetes'",
    "namespace": "must be a Kubernetes namespace name: lower-case letters, digits and '-' (at most 63)",
    "service_account": "must be a Kubernetes name: lower-case letters, digits, '-' and '.'",
    "secret_name": "must be a Kubernetes name: lower-case letters, digits, '-' and '.'",
    **{
        key: "must be a Kubernetes quantity, e.g. '500m', '2', '4Gi'"
        for key in ("cpu", "memory", "cpu_limit", "memory_limit")
    },
    "webhook_url_env": "must name an environment variable that holds the URL (e.g. HPO_ALERT_WEBHOOK_URL), "
    "not the URL itself",
}


def _clean_loc(loc: Sequence[Any]) -> tuple[Any, ...]:
    # Pydantic adds the union member tag ('float', 'int', ...) to the location; drop it.
    out: list[Any] = []
    for i, part in enumerate(loc):
        if i > 0 and part in ("float", "int", "categorical") and i >= 2 and loc[i - 2] == "search_space":
            continue
        out.append(part)
    return tuple(out)


def _allowed_keys(raw: Mapping[str, Any], parent: Sequence[Any]) -> list[str]:
    model: Any = StudySpec
    if len(parent) == 2 and parent[0] == "search_space":
        params = raw.get("search_space")
        ptype = params.get(parent[1], {}).get("type") if isinstance(params, Mapping) else None
        model = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam}.get(
            str(ptype), _ParamBase
        )
    elif len(parent) == 3 and parent[0] == "search_space" and parent[2] == "condition":
        model = Condition
    else:
        for part in parent:
            field = getattr(model, "model_fields", {}).get(part)
            model = _model_of(field.annotation) if field is not None else None
            if model is None:
                return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_of(annotation: Any) -> Any:
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _shorten(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
