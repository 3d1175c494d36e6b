"""Every valid study survives its stored form unchanged and builds a DAG (property test, hypothesis).

The strategy draws study files over the whole schema: float / int / categorical parameters,
conditions with ``equals`` and ``in``, a space function instead of a space, every sampler this
environment can run (gp needs torch: its refusal is tests/test_validate.py), one or
several objectives, and every optional section (schedule, warm start, promotion, pruner, alerts,
Kubernetes worker, refit hook).
"""

from __future__ import annotations

from typing import Any

import yaml
from hpo_airflow import build_study_dag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpo_core.samplers import SAMPLERS
from hpo_core.spec import StudySpec, parse_spec, spec_from_json, validate_mapping
from tests.fixtures_core import study_mapping

NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20)
FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
CHOICE = st.one_of(
    st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=6),
    st.integers(-5, 5),
    FINITE,
    st.booleans(),
    st.none(),
)
#: The samplers whose packages this environment has (the others are refused up front, by design).
RUNNABLE = {name: info for name, info in SAMPLERS.items() if not info.missing()}
PRUNERS = ["none", "median", "percentile", "successive_halving", "hyperband"]
SCHEDULES = st.sampled_from([None, "@daily", "@hourly", "@once", "0 3 * * *", "*/15 2-5 * * 1-5"])


@st.composite
def float_params(draw: st.DrawFn, *, finite: bool) -> dict[str, Any]:
    low = draw(st.floats(0.001, 100.0))
    high = low + draw(st.floats(0.0, 100.0))
    param: dict[str, Any] = {"type": "float", "low": low, "high": high}
    if finite or draw(st.booleans()):
        param["step"] = draw(st.floats(0.001, 10.0))
    elif draw(st.booleans()):
        param["log"] = True
    return param


@st.composite
def int_params(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.integers(1, 50))
    param: dict[str, Any] = {"type": "int", "low": low, "high": low + draw(st.integers(0, 50))}
    if draw(st.booleans()):
        param["log"] = True
    elif draw(st.booleans()):
        param["step"] = draw(st.integers(1, 5))
    return param


@st.composite
def search_spaces(draw: st.DrawFn, *, finite: bool) -> dict[str, Any]:
    """1-5 parameters; a later one may depend on an earlier categorical one (``equals`` or ``in``)."""
    names = draw(st.lists(NAMES, min_size=1, max_size=5, unique=True))
    space: dict[str, Any] = {}
    for name in names:
        kind = draw(st.sampled_from(["float", "int", "categorical"]))
        if kind == "float":
            param = draw(float_params(finite=finite))
        elif kind == "int":
            param = draw(int_params())
        else:
            choices = draw(st.lists(CHOICE, min_size=1, max_size=4, unique_by=repr))
            param = {"type": "categorical", "choices": choices}
        parents = [n for n, p in space.items() if p["type"] == "categorical"]
        if parents and draw(st.booleans()):
            parent = draw(st.sampled_from(parents))
            options = space[parent]["choices"]
            if draw(st.booleans()):
                param["condition"] = {"param": parent, "equals": draw(st.sampled_from(options))}
            else:
                values = draw(st.lists(st.sampled_from(options), min_size=1, max_size=3))
                param["condition"] = {"param": parent, "in": values}
        space[name] = param
    return space


@st.composite
def objectives(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """The objective section (one or several) and the sampler that fits it."""
    if draw(st.booleans()):
        sampler = draw(st.sampled_from([n for n, s in RUNNABLE.items() if s.single_objective]))
        section: dict[str, Any] = {"direction": draw(st.sampled_from(["minimize", "maximize"]))}
        if draw(st.booleans()):
            section["metric"] = draw(NAMES)
        return section, sampler
    metrics = draw(st.lists(NAMES, min_size=2, max_size=3, unique=True))
    choice: dict[str, Any] = {"metric": draw(st.sampled_from(metrics))}
    if draw(st.booleans()):
        choice["weights"] = {m: draw(FINITE) for m in metrics if draw(st.booleans())}
    section = {
        "directions": [draw(st.sampled_from(["minimize", "maximize"])) for _ in metrics],
        "metrics": metrics,
        "pareto_choice": choice,
    }
    return section, draw(st.sampled_from([n for n, s in RUNNABLE.items() if s.multi_objective]))


@st.composite
def workers(draw: st.DrawFn) -> dict[str, Any]:
    worker: dict[str, Any] = {"trials_per_task": draw(st.integers(1, 4))}
    if draw(st.booleans()):
        worker["pool"], worker["max_active_trials"] = "hpo_trials", draw(st.integers(1, 8))
    if draw(st.booleans()):
        worker.update(
            backend="kubernetes",
            image="registry.example.com/hpo-worker:1",
            namespace=draw(st.sampled_from(["hpo-trials", "ml"])),
            service_account="hpo-trial",
            resources={"cpu": draw(st.sampled_from(["500m", "2"])), "memory": "1Gi", "gpu": 0},
            node_selector={"pool": "cpu"},
            tolerations=[{"key": "dedicated", "operator": "Equal", "value": "hpo", "effect": "NoSchedule"}],
            affinity={"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        )
    return worker


@st.composite
def study_files(draw: st.DrawFn) -> dict[str, Any]:
    """A valid study file as the YAML loader gives it."""
    section, sampler = draw(objectives())
    finite = SAMPLERS[sampler].finite_space
    data = study_mapping(
        name=draw(NAMES.map(str.capitalize)),
        description=draw(TEXT),
        owner=draw(st.sampled_from(["airflow", "ml-platform"])),
        tags=draw(st.lists(TEXT.filter(bool), max_size=2)),
        trial={
            "retries": draw(st.integers(0, 3)),
            "retry_delay": draw(st.integers(0, 30)),
            "execution_timeout": draw(st.integers(1, 7200)),
            "stale_timeout": draw(st.none() | st.integers(1, 600)),
        },
        worker=draw(workers()),
        schedule=draw(SCHEDULES),
    )
    del data["direction"], data["metric"]
    data.update(section)
    if finite or draw(st.booleans()):
        data["search_space"] = draw(search_spaces(finite=finite))
    else:
        data.pop("search_space")
        data["space_function"] = "tests.objectives:space"
    data["sampler"] = {
        "type": sampler,
        "seed": draw(st.none() | st.integers(0, 2**32 - 1)),
        "multivariate": draw(st.booleans()),
        "constant_liar": draw(st.booleans()),
        "n_startup_trials": draw(st.none() | st.integers(0, 20)),
        "population_size": draw(st.none() | st.integers(2, 50)),
        "qmc_type": draw(st.sampled_from(["sobol", "halton"])),
    }
    if "direction" in section and draw(st.booleans()):
        data["pruner"] = {
            "type": draw(st.sampled_from(PRUNERS)),
            "n_startup_trials": draw(st.integers(0, 10)),
            "n_warmup_steps": draw(st.integers(0, 10)),
            "percentile": draw(st.floats(1.0, 99.0)),
        }
    rounds, batch = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    data["budget"] = {
        "n_trials": draw(st.integers(1, rounds * batch)),
        "batch_size": batch,
        "max_rounds": rounds,
        "max_batch_size": draw(st.none() | st.integers(batch, 8)),
        "timeout": draw(st.none() | st.integers(60, 86400)),
    }
    data["stopping"] = {
        "target": draw(st.none() | FINITE),
        "patience": draw(st.none() | st.integers(1, 5)),
        "max_failed_fraction": draw(st.floats(0.0, 1.0)),
        "min_improvement": draw(st.floats(0.0, 1.0)),
    }
    registered = draw(st.booleans())
    data["mlflow"] = {"experiment": draw(NAMES), **({"registered_model": draw(NAMES)} if registered else {})}
    data["warm_start"] = {
        "mode": draw(st.sampled_from(["new_study", "continue"])),
        "top_k": draw(st.integers(0, 5)),
        "from_champion": registered and draw(st.booleans()),
    }
    data["promotion"] = {
        "rule": draw(st.sampled_from(["never", "always", "if_better"])) if registered else "never",
        "min_improvement": draw(st.floats(0.0, 1.0)),
        "direction": draw(st.sampled_from([None, "minimize", "maximize"])),
    }
    if registered and draw(st.booleans()):
        data["refit"] = "tests.objectives:refit"
    alert = draw(st.sampled_from([None, "log", "env", "conn"]))
    if alert is not None:
        data["alerts"] = {"deadline_seconds": draw(st.integers(1, 86400)), "callback": "log"}
        if alert == "env":
            data["alerts"].update(callback="webhook", webhook_url_env="HPO_ALERT_WEBHOOK_URL")
        elif alert == "conn":
            data["alerts"].update(callback="webhook", webhook_conn_id="hpo_alerts")
    return data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(study_files())
def test_every_valid_study_survives_its_stored_form_and_builds_a_dag(data: dict[str, Any]) -> None:
    spec = validate_mapping(data, source="<generated>")
    # The study file as YAML, and the stored form the tasks and workers read back.
    assert parse_spec(yaml.safe_dump(data, allow_unicode=True), source="<yaml>") == spec
    stored = spec.to_json()
    again = spec_from_json(stored)
    assert again == spec
    assert again.to_json() == stored
    dag = build_study_dag(again)
    assert dag.dag_id == spec.dag_id
    assert len(dag.task_dict) == 2 + 3 * spec.budget.max_rounds


def test_a_condition_with_in_survives_the_stored_form() -> None:
    """The study a new user wrote: ``gamma`` exists for two kernels. ``start`` reads it back."""
    data = study_mapping(
        search_space={
            "kernel": {"type": "categorical", "choices": ["rbf", "poly", "linear"]},
            "gamma": {
                "type": "float",
                "low": 0.001,
                "high": 1.0,
                "log": True,
                "condition": {"param": "kernel", "in": ["rbf", "poly"]},
            },
        }
    )
    spec = validate_mapping(data, source="<test>")
    again = spec_from_json(spec.to_json())
    assert again == spec
    assert isinstance(again, StudySpec) and again.search_space is not None
    condition = again.search_space["gamma"].condition
    assert condition is not None and condition.values == ["rbf", "poly"]
