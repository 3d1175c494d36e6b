"""``hpo validate`` refuses what the DAG factory and ``start`` refuse, with the same located message;
one broken study file never takes the others down."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.dag_processing.dagbag import DagBag
from hpo_airflow import backends, load_study_dags
from hpo_airflow.loader import load_study_file

from hpo_core import cli
from hpo_core.errors import StudySpecError
from hpo_core.samplers import SAMPLERS
from tests.fixtures_core import ROOT, study_mapping, write_study

POD = {"backend": "kubernetes", "image": "hpo-worker:1"}

#: Files the schema accepts and the DAG factory (or ``start``) refuses: case -> (changes, message).
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "cron_minute_61": (
        {"schedule": "61 * * * *"},
        "schedule: '61 * * * *' is not a cron expression or preset ([61 * * * *] is not acceptable, "
        "out of range); use e.g. '0 3 * * *', '@daily' or null",
    ),
    "unknown_backend": (
        {"worker": {"backend": "slurm"}},
        "worker.backend: 'slurm' is not a worker backend; allowed: 'local', 'kubernetes'",
    ),
    "misspelt_toleration_key": (
        {"worker": {**POD, "tolerations": [{"keyy": "gpu", "operator": "Exists"}]}},
        "worker.tolerations.0.keyy: unknown key 'keyy'; allowed keys: effect, key, operator, "
        "tolerationSeconds, value",
    ),
    "missing_pod_template": (
        {"worker": {**POD, "pod_template_file": "/nonexistent/pod.yaml"}},
        "worker.pod_template_file: '/nonexistent/pod.yaml' does not exist; give the path of a pod YAML "
        "file that Airflow's workers can read, or remove the key",
    ),
    "optuna_objective_registers_nothing": (
        {
            "objective": "hpo_core.examples.quadratic:optuna_style",
            "search_space": {
                "x": {"type": "float", "low": -5.0, "high": 5.0},
                "y": {"type": "float", "low": -5.0, "high": 5.0},
            },
        },
        "mlflow.registered_model: 'quadratic' needs a model, but the objective "
        "'hpo_core.examples.quadratic:optuna_style' is an Optuna objective(trial) whose module logs none; "
        "add 'refit: module:function' (a function (params, ctx) -> model that fits the best params), "
        "or log the model in the objective with mlflow.<flavor>.log_model(model, name='model'), "
        "or remove registered_model",
    ),
}


def _validate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["validate", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_validate_refuses_what_the_factory_refuses_with_its_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    changes, message = REFUSED[case]
    path = write_study(tmp_path, study_mapping(**changes), filename=f"{case}.yaml")
    with pytest.raises(StudySpecError) as refused:
        load_study_file(path)  # what the DAG processor does with the file
    assert str(refused.value) == f"{path}: {message}"
    code, out, err = _validate(capsys, str(path))
    assert (code, out) == (1, "")
    assert err == f"invalid {path}: {message}\n"


def test_validate_without_airflow_says_what_it_could_not_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "hpo_airflow.loader", None)  # as if Airflow were not installed
    good = write_study(tmp_path, study_mapping(schedule="61 * * * *"), filename="good.yaml")
    changes, message = REFUSED["optuna_objective_registers_nothing"]
    bad = write_study(tmp_path, study_mapping(name="bad", **changes), filename="bad.yaml")
    code, out, err = _validate(capsys, str(good), str(bad))
    assert code == 1
    assert out == f"ok      {good} -> DAG hpo_quadratic\n"  # the cron needs Airflow to be refused
    assert err.splitlines()[0].startswith("note: Airflow is not importable here (ModuleNotFoundError")
    assert "not checked: the schedule as Airflow parses it, the worker backend and its pod" in err
    assert f"invalid {bad}: {message}" in err


def test_validate_accepts_the_shipped_studies_and_their_code(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in (ROOT / "dags" / "studies").glob("*.yaml"))
    code, out, err = _validate(capsys, "--check-imports", *files)
    assert (code, err) == (0, "")
    assert "(imported: objective hpo_core.examples.breast_cancer:objective; evaluate hook" in out


USER_CODE = """
def objective(params, ctx, extra):
    return 0.0

def good(params, ctx):
    ctx.log_model(object())
    return 0.0

def evaluate(model):
    return 1.0

def refit(params):
    return None
"""


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"objective": "nowhere_to_be_found:objective"},
            "objective: 'nowhere_to_be_found:objective' does not import (ModuleNotFoundError: No module "
            "named 'nowhere_to_be_found'); install its package where the study runs, or fix the import path",
        ),
        (
            {"objective": "user_code:objektive"},
            "objective: 'user_code:objektive': module 'user_code' has no function 'objektive'; "
            "fix the name after the colon",
        ),
        (
            {"objective": "user_code:objective"},
            "objective: 'user_code:objective' takes (params, ctx, extra); "
            "it must take (params, ctx) or (trial)",
        ),
        (
            {"objective": "user_code:good"},
            "objective: 'user_code:evaluate' takes (model); it must take (model, ctx)",
        ),
        (
            {"objective": "hpo_core.examples.quadratic:objective", "refit": "user_code:refit"},
            "refit: 'user_code:refit' takes (params); it must take (params, ctx)",
        ),
    ],
    ids=["no_module", "no_function", "objective_signature", "evaluate_signature", "refit_signature"],
)
def test_check_imports_imports_the_code_and_checks_signatures(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    changes: dict[str, Any],
    message: str,
) -> None:
    (tmp_path / "user_code.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_code", raising=False)
    path = write_study(tmp_path / "studies", study_mapping(**changes))
    code, _, err = _validate(capsys, str(path))
    assert (code, err) == (0, "")  # nothing imported: the source-level checks pass
    code, _, err = _validate(capsys, "--check-imports", str(path))
    assert (code, err) == (1, f"invalid {path}: {message}\n")


def _broken_backend(*_: Any, **__: Any) -> Any:
    raise ValueError("pod spec: bad quantity")


def test_any_error_of_one_study_file_breaks_only_that_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a worker backend (a ValueError while building a DAG) takes down its study only, and
    the placeholder of a broken file carries the DAG id the study would have had."""
    broken = SimpleNamespace(check=lambda spec, source: None, map_slots=_broken_backend, worker_image=str)
    monkeypatch.setitem(backends.BACKENDS, "buggy", broken)
    folder = tmp_path / "dags"
    write_study(folder / "studies", study_mapping(name="good_one"))
    write_study(folder / "studies", study_mapping(name="good_two"))
    bad = write_study(folder / "studies", study_mapping(name="uses_buggy", worker={"backend": "buggy"}))
    invalid = study_mapping(name="typo_study", direction="up")
    typo = write_study(folder / "studies", invalid, filename="file_stem_differs.yaml")
    (folder / "hpo_studies.py").write_text((ROOT / "dags" / "hpo_studies.py").read_text())

    bag = DagBag(dag_folder=str(folder))
    assert {"hpo_good_one", "hpo_good_two"} <= set(bag.dags)
    (message,) = bag.import_errors.values()
    assert f"{bad}: cannot build the study's DAG: ValueError: pod spec: bad quantity" in message
    assert f"{typo}: direction: 'up' is not allowed" in message

    found: dict[str, Any] = {}
    load_study_dags(found, studies_dir=folder / "studies", strict=False)
    placeholders = sorted(k for k, v in found.items() if type(v).__name__ == "_BrokenStudyDAG")
    assert placeholders == ["hpo_typo_study", "hpo_uses_buggy"]


def test_a_sampler_needing_a_missing_package_is_refused_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gp fits with PyTorch once past its startup trials: without it, the study is refused up front."""
    gp = SAMPLERS["gp"]
    monkeypatch.setitem(SAMPLERS, "gp", dataclasses.replace(gp, requires=("hpo_no_such_package",)))
    path = write_study(tmp_path, study_mapping(sampler={"type": "gp", "seed": 1}), filename="gp.yaml")
    message = (
        "sampler.type: 'gp' needs the Python package(s) ['hpo_no_such_package'], which this environment "
        "lacks (suggest runs in the Airflow workers); install them there, or use another sampler, e.g. 'tpe'"
    )
    with pytest.raises(StudySpecError) as refused:
        load_study_file(path)
    assert str(refused.value) == f"{path}: {message}"
    code, _, err = _validate(capsys, str(path))
    assert code == 1 and err == f"invalid {path}: {message}\n"


def test_start_refuses_a_sampler_needing_a_missing_package(
    start_toy_study: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``start`` checks it too (a DAG parsed elsewhere, a trigger): no trial runs with a gp that fails."""
    monkeypatch.setitem(
        SAMPLERS, "gp", dataclasses.replace(SAMPLERS["gp"], requires=("hpo_no_such_package",))
    )
    with pytest.raises(StudySpecError, match=r"sampler.type: 'gp' needs the Python package\(s\)"):
        start_toy_study(sampler={"type": "gp", "seed": 11})
