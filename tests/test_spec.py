"""Study files: valid ones load into a frozen spec; each invalid one gives one exact message."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hpo_core.errors import HpoError, StudySpecError
from hpo_core.spec import load_spec, parse_spec, spec_from_json, validate_mapping
from tests.fixtures_core import QUADRATIC_STUDY, study_mapping, write_study

ROOT = Path(__file__).resolve().parent.parent


def _with(path: str, value: Any) -> dict[str, Any]:
    """The toy study with ``path`` (dot separated) set to ``value`` (``...`` deletes it)."""
    data = copy.deepcopy(QUADRATIC_STUDY)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


INVALID: list[tuple[str, dict[str, Any] | str, str]] = [
    (
        "typo_in_key",
        _with("budget.n_trails", 5),
        "budget.n_trails: unknown key 'n_trails'; allowed keys: n_trials, batch_size, max_rounds, "
        "max_batch_size, timeout (did you mean 'n_trials'?)",
    ),
    (
        "typo_in_param_key",
        _with("search_space.x", {"type": "float", "low": 0.1, "high": 1.0, "lgo": True}),
        "search_space.x.lgo: unknown key 'lgo'; allowed keys: condition, type, low, high, log, step "
        "(did you mean 'log'?)",
    ),
    (
        "low_above_high",
        _with("search_space.x", {"type": "float", "low": 1.0, "high": 0.1}),
        "search_space.x.low: 1.0 must not be above high (0.1); swap them",
    ),
    (
        "log_with_zero_low",
        _with("search_space.x", {"type": "float", "low": 0.0, "high": 1.0, "log": True}),
        "search_space.x.low: 0.0 must be > 0 when 'log' is true; raise low or set log: false",
    ),
    (
        "int_log_and_step",
        _with("search_space.depth", {"type": "int", "low": 1, "high": 64, "log": True, "step": 2}),
        "search_space.depth.step: 2 cannot be combined with 'log: true'; remove one of them",
    ),
    (
        "unknown_param_type",
        _with("search_space.x", {"type": "floaty", "low": 0.0, "high": 1.0}),
        "search_space.x.type: is 'floaty'; allowed: 'float', 'int', 'categorical'",
    ),
    (
        "empty_choices",
        _with("search_space.optimizer", {"type": "categorical", "choices": []}),
        "search_space.optimizer.choices: [] is not allowed; needs at least one choice",
    ),
    (
        "condition_on_undeclared",
        _with("search_space.momentum.condition", {"param": "optimiser", "equals": "sgd"}),
        "search_space.momentum.condition.param: 'optimiser' is not a declared parameter; "
        "declared: momentum, optimizer, x, y",
    ),
    (
        "condition_value_not_a_choice",
        _with("search_space.momentum.condition", {"param": "optimizer", "equals": "rmsprop"}),
        "search_space.momentum.condition: 'rmsprop' is not a choice of 'optimizer'; choices: ['adam', 'sgd']",
    ),
    (
        "bad_direction",
        _with("direction", "minimise"),
        "direction: 'minimise' is not allowed; allowed: 'minimize' or 'maximize'",
    ),
    (
        "objective_not_import_path",
        _with("objective", "train.py"),
        "objective: 'train.py' is not an import path; write it as 'package.module:function'",
    ),
    (
        "unknown_sampler",
        _with("sampler", {"type": "anneal"}),
        "sampler.type: 'anneal' is not allowed; "
        "allowed: 'tpe', 'random', 'grid', 'cmaes', 'gp', 'qmc' or 'nsga2'",
    ),
    (
        "budget_does_not_fit_rounds",
        _with("budget", {"n_trials": 50, "batch_size": 4, "max_rounds": 3}),
        "budget.n_trials: 50 does not fit in max_rounds (3) x batch_size (4) = 12; raise max_rounds or "
        "batch_size, or lower n_trials",
    ),
    (
        "batch_size_zero",
        _with("budget.batch_size", 0),
        "budget.batch_size: 0 is not allowed; must be greater than or equal to 1",
    ),
    (
        "failed_fraction_above_one",
        _with("stopping", {"max_failed_fraction": 1.5}),
        "stopping.max_failed_fraction: 1.5 is not allowed; must be less than or equal to 1",
    ),
    ("missing_mlflow", _with("mlflow", ...), "mlflow: required field is missing"),
    (
        "both_space_kinds",
        _with("space_function", "tests.objectives:space"),
        "space_function: 'tests.objectives:space' cannot be combined with 'search_space'; keep one",
    ),
    (
        "direction_and_directions",
        _with("directions", ["minimize", "maximize"]),
        "directions: ['minimize', 'maximize'] cannot be combined with 'direction'; keep one",
    ),
    (
        "grid_needs_steps",
        _with("sampler", {"type": "grid"}),
        "search_space.x.step: the grid sampler needs a finite grid: give float parameters a 'step'",
    ),
    (
        "nsga2_single_objective",
        _with("sampler", {"type": "nsga2"}),
        "sampler.type: 'nsga2' is for several objectives ('directions'); use tpe",
    ),
    (
        "bad_study_name",
        _with("name", "9lives"),
        "name: '9lives' must start with a letter and use only letters, digits and underscores (at most 64)",
    ),
    (
        "not_yaml",
        "name: [unclosed",
        "not valid YAML (line 1, column 16): expected ',' or ']', but got '<stream end>'",
    ),
    ("yaml_list", "- a\n- b\n", "a study file must be a mapping of fields (name, objective, ...), got list"),
    ("empty_file", "", "the file is empty; a study needs name, objective, budget, ..."),
    (
        "webhook_without_target",
        _with("alerts", {"deadline_seconds": 600, "callback": "webhook"}),
        "alerts.callback: 'webhook' needs exactly one of 'webhook_url_env' (an environment variable "
        "holding the URL) or 'webhook_conn_id' (an Airflow connection); never the URL itself",
    ),
    (
        "webhook_url_in_the_file",
        _with("alerts", {"deadline_seconds": 600, "callback": "webhook", "webhook_url_env": "https://h/x"}),
        "alerts.webhook_url_env: 'https://h/x' must name an environment variable that holds the URL "
        "(e.g. HPO_ALERT_WEBHOOK_URL), not the URL itself",
    ),
]


@pytest.mark.parametrize(("case", "content", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_study_file_has_one_exact_message(
    tmp_path: Path, case: str, content: dict[str, Any] | str, message: str
) -> None:
    path = write_study(tmp_path, content, filename=f"{case}.yaml")
    with pytest.raises(StudySpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: {message}"
    # It is a ValueError for callers that expect one, and an HpoError for ours.
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, HpoError)


def test_several_problems_are_reported_in_one_message(tmp_path: Path) -> None:
    data = study_mapping()
    data["budget"]["n_trails"] = 5
    data["direction"] = "up"
    path = write_study(tmp_path, data)
    with pytest.raises(StudySpecError) as info:
        load_spec(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(StudySpecError, match=r"nope\.yaml: cannot read study file"):
        load_spec(missing)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    text = "name: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(StudySpecError, match="not valid YAML"):
        parse_spec(text, source="evil.yaml")


def test_example_study_is_valid_and_frozen() -> None:
    spec = load_spec(ROOT / "dags" / "studies" / "breast_cancer_gbm.yaml")
    assert spec.dag_id == "hpo_breast_cancer_gbm"
    assert spec.objective_metrics == ["roc_auc"]
    assert spec.search_space is not None
    assert spec.search_space["l2_regularization"].condition is not None
    ordered = [name for name, _ in spec.ordered_params()]
    assert ordered.index("regularize") < ordered.index("l2_regularization")
    with pytest.raises(ValidationError):
        spec.name = "other"  # type: ignore[misc]


def test_spec_round_trips_through_json() -> None:
    spec = validate_mapping(study_mapping(), source="<test>")
    assert spec_from_json(spec.to_json()) == spec


def test_multi_objective_spec() -> None:
    data = study_mapping(direction=None, metric=None)
    data.update(
        directions=["minimize", "maximize"],
        metrics=["loss", "speed"],
        sampler={"type": "nsga2", "seed": 1},
        pareto_choice={"metric": "loss"},
    )
    spec = validate_mapping(data, source="<test>")
    assert spec.is_multi_objective
    assert spec.all_directions == ["minimize", "maximize"]
