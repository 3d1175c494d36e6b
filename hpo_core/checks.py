"""Checks a study must pass before any trial runs, beyond its file's schema (:mod:`hpo_core.spec`).

Three levels, each a superset of the one before:

- :func:`check_study` runs wherever a study is loaded without running user code: the DAG factory
  (parse time), ``start`` and ``hpo validate``. It checks the run settings the trigger form's
  defaults give and, reading the objective's source without importing it, that a study which
  registers a model gets one.
- The Airflow side adds what only Airflow can tell (a cron expression, the worker backend, the pod
  a slot would run in, the trigger form): ``hpo_airflow.factory.check_study``, which the DAG factory
  runs before it builds a DAG. ``hpo validate`` loads :data:`AIRFLOW_LOADER` by name when Airflow is
  installed and runs its ``load_study_file``: exactly what the DAG processor does with one file.
- :func:`check_imports` (``hpo validate --check-imports``) imports the objective, the space
  function and the evaluate and refit hooks, and checks their signatures.

Every failure is a :class:`~hpo_core.errors.StudySpecError` naming the file, the field, the value
and the fix.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpo_core.errors import StudySpecError
from hpo_core.samplers import SAMPLERS
from hpo_core.spec import StudySpec
from hpo_core.study.config import RunConfig

__all__ = [
    "AIRFLOW_LOADER",
    "AIRFLOW_ONLY",
    "EVALUATE_HOOK",
    "MODEL_LOGGING_CALLS",
    "ObjectiveSource",
    "check_imports",
    "check_study",
    "objective_source",
]

#: Module whose ``load_study_file(path)`` loads, checks and builds one study file as the DAG
#: processor does; ``hpo validate`` loads it by name (hpo_core never imports Airflow).
AIRFLOW_LOADER = "hpo_airflow.loader"
#: What only the Airflow side checks (said when Airflow is not installed).
AIRFLOW_ONLY = "the schedule as Airflow parses it, the worker backend and its pod, the trigger form"
#: The optional hook in the objective's module that re-scores models for promotion.
EVALUATE_HOOK = "evaluate"
#: Calls that log a model to the active MLflow run (``ctx.log_model``, ``mlflow.<flavor>.log_model``,
#: ``mlflow.<flavor>.autolog``, ``mlflow.autolog``).
MODEL_LOGGING_CALLS = frozenset({"log_model", "autolog"})


@dataclass(frozen=True)
class ObjectiveSource:
    """What a function's source says without importing it: where it is, how it is called."""

    path: Path
    #: Names of its positional parameters without a default (``None``: not a plain ``def``).
    required: tuple[str, ...] | None
    #: Whether it calls one of :data:`MODEL_LOGGING_CALLS`, itself or through functions of its module.
    logs_model: bool

    @property
    def optuna_style(self) -> bool:
        """``objective(trial)``: one required positional parameter, so no ``ctx`` to log a model with."""
        return self.required is not None and len(self.required) == 1


def check_study(spec: StudySpec, *, source: str | Path) -> None:
    """The checks that need neither Airflow nor the user's code to run (see the module docstring).

    Raises:
        StudySpecError: the trigger form's defaults do not make a run, or the study registers a
            model that nothing logs.
    """
    _check_run_defaults(spec, source)
    _check_sampler_packages(spec, source)
    found = objective_source(spec.objective)
    if found is not None:
        _check_model_logged(spec, source, optuna_style=found.optuna_style, logs_model=found.logs_model)


def _check_sampler_packages(spec: StudySpec, source: str | Path) -> None:
    """A sampler that needs a package this environment lacks would fail mid-run: refuse it now."""
    missing = SAMPLERS[spec.sampler.type].missing()
    if missing:
        raise StudySpecError(
            f"{source}: sampler.type: {spec.sampler.type!r} needs the Python package(s) {missing}, which "
            "this environment lacks (suggest runs in the Airflow workers); install them there, or use "
            "another sampler, e.g. 'tpe'"
        )


def check_imports(spec: StudySpec, *, source: str | Path) -> list[str]:
    """Import the study's code and check how it can be called; return what was checked.

    The objective takes ``(params, ctx)`` or Optuna's ``(trial)``; ``space_function`` takes
    ``(trial)``; the refit hook ``(params, ctx)``; the objective module's ``evaluate`` hook, if it
    has one, ``(model, ctx)``.

    Raises:
        StudySpecError: a module does not import, a function is missing or takes other arguments,
            or the study registers a model that nothing logs.
    """
    checked = []
    objective = _import(spec.objective, "objective", source)
    _check_signature(objective, "objective", spec.objective, source, ("params", "ctx"), ("trial",))
    checked.append(f"objective {spec.objective}")
    if spec.space_function is not None:
        space = _import(spec.space_function, "space_function", source)
        _check_signature(space, "space_function", spec.space_function, source, ("trial",))
        checked.append(f"space_function {spec.space_function}")
    if spec.refit is not None:
        refit = _import(spec.refit, "refit", source)
        _check_signature(refit, "refit", spec.refit, source, ("params", "ctx"))
        checked.append(f"refit {spec.refit}")
    module = importlib.import_module(spec.objective.partition(":")[0])
    hook = getattr(module, EVALUATE_HOOK, None)
    if callable(hook):
        where = f"{spec.objective.partition(':')[0]}:{EVALUATE_HOOK}"
        _check_signature(hook, "objective", where, source, ("model", "ctx"))
        checked.append(f"evaluate hook {where}")
    _check_model_logged(
        spec,
        source,
        optuna_style=_optuna_style(objective),
        logs_model=_module_logs_model(module, spec.objective.partition(":")[2]),
    )
    return checked


def objective_source(path: str) -> ObjectiveSource | None:
    """Find ``module:function``'s source on ``sys.path`` and read it, without importing anything.

    Parse time may not run user code (nor a package's ``__init__``), so the file is located by
    hand. ``None`` when it cannot be found or read (installed elsewhere, compiled, not a ``.py``).
    """
    module_name, _, attr = path.partition(":")
    file = _module_file(module_name)
    if file is None:
        return None
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    except (OSError, SyntaxError, ValueError):
        return None
    required = None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == attr:
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            required = tuple(a.arg for a in positional[: len(positional) - len(args.defaults)])
            if args.vararg is not None:
                required = None  # ``*args``: called either way
    return ObjectiveSource(path=file, required=required, logs_model=_logs_model(tree, attr))


def _module_file(module_name: str) -> Path | None:
    parts = module_name.split(".")
    for entry in sys.path:
        base = Path(entry or ".").joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _logs_model(tree: ast.Module, function: str) -> bool:
    """Whether ``function`` of the module ``tree`` calls one of :data:`MODEL_LOGGING_CALLS`, itself
    or through the module's other functions it calls (a function not found: cannot tell, so yes)."""
    defined = {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    if function not in defined:
        return True
    top_level = [node for node in tree.body if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    for node in (n for stmt in top_level for n in ast.walk(stmt)):  # e.g. mlflow.autolog() on import
        if isinstance(node, ast.Call) and _called_name(node) in MODEL_LOGGING_CALLS:
            return True
    pending, seen = [function], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(defined[name]):
            if not isinstance(node, ast.Call):
                continue
            called = _called_name(node)
            if called in MODEL_LOGGING_CALLS:
                return True
            if called in defined:
                pending.append(called)
    return False


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _module_logs_model(module: Any, function: str) -> bool:
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        return True  # cannot tell: do not refuse
    return _logs_model(tree, function)


def _optuna_style(func: Callable[..., Any]) -> bool:
    """Whether ``func`` is called as Optuna's ``objective(trial)`` (see ``call_objective``)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(required) == 1


def _check_run_defaults(spec: StudySpec, source: str | Path) -> None:
    """A run triggered with the form's defaults must start (``start`` resolves them the same way)."""
    try:
        RunConfig.resolve(spec, None)
    except StudySpecError as e:
        raise StudySpecError(f"{source}: the trigger form's defaults do not make a run: {e}") from e


def _check_model_logged(spec: StudySpec, source: str | Path, *, optuna_style: bool, logs_model: bool) -> None:
    """A study that registers a model needs one: a refit hook, ``ctx.log_model`` or MLflow logging.

    Only an Optuna ``objective(trial)`` is judged: it has no ``ctx``, so without a refit hook its
    module must log the model with MLflow itself (``mlflow.<flavor>.log_model`` or autolog).
    """
    name = spec.mlflow.registered_model
    if name is None or spec.refit is not None or not optuna_style or logs_model:
        return
    raise StudySpecError(
        f"{source}: mlflow.registered_model: {name!r} needs a model, but the objective "
        f"{spec.objective!r} is an Optuna objective(trial) whose module logs none; add "
        "'refit: module:function' (a function (params, ctx) -> model that fits the best params), "
        "or log the model in the objective with mlflow.<flavor>.log_model(model, name='model'), "
        "or remove registered_model"
    )


def _import(path: str, field: str, source: str | Path) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time error of the user's module is this file's problem
        raise StudySpecError(
            f"{source}: {field}: {path!r} does not import ({type(e).__name__}: {e}); install its "
            "package where the study runs, or fix the import path"
        ) from e
    func = getattr(module, attr, None)
    if not callable(func):
        raise StudySpecError(
            f"{source}: {field}: {path!r}: module {module_name!r} has no function {attr!r}; "
            "fix the name after the colon"
        )
    return func


def _check_signature(
    func: Callable[..., Any], field: str, path: str, source: str | Path, *forms: tuple[str, ...]
) -> None:
    """``func`` must accept one of ``forms`` (positional argument names, as the pipeline calls it)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return  # a builtin or C function: cannot tell
    for form in forms:
        try:
            signature.bind(*form)
        except TypeError:
            continue
        return
    wanted = " or ".join(f"({', '.join(form)})" for form in forms)
    raise StudySpecError(f"{source}: {field}: {path!r} takes {signature}; it must take {wanted}")
