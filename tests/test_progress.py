"""The study read model, ``hpo status``, ``hpo schema``, the plots on the MLflow parent run and the
back-links of MLflow runs to Airflow, on the embedded default (SQLite storage and MLflow)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jsonschema
import mlflow
import pytest
import yaml

from hpo_core import cli
from hpo_core.deployment import Deployment
from hpo_core.keys import StudyAttr, Tag
from hpo_core.payloads import FinalizeResult
from hpo_core.spec import SCHEMA_PATH
from hpo_core.study.finalize import finalize_study
from hpo_core.study.observe import observe_round
from hpo_core.study.progress import StudyProgress, find_study, list_studies, load_progress
from hpo_core.study.state import load_run
from hpo_core.study.suggest import suggest_batch
from hpo_core.tracking import plots
from hpo_core.worker import run_slot
from tests.fixtures_core import ROOT

AIRFLOW = "http://airflow.example:8080/base"
XY = {"x": {"type": "float", "low": -5.0, "high": 5.0}, "y": {"type": "float", "low": -5.0, "high": 5.0}}
DAG, RUN = "hpo_quadratic", "manual__test"


def _run_round(deployment: Deployment, name: str, round_number: int, *, attempt: int = 1) -> list[int]:
    batch, _ = suggest_batch(
        deployment=deployment, study_name=name, round_number=round_number, dag_id=DAG, run_id=RUN
    )
    numbers = [b["trial_number"] for b in batch]
    run_slot(deployment=deployment, study_name=name, trial_numbers=numbers, attempt=attempt)
    return numbers


def test_read_model_status_plots_and_backlinks_of_a_finished_study(
    local_deployment: Deployment,
    start_toy_study: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HPO_AIRFLOW_URL", "http://user:secret@airflow.example:8080/base/")
    # `hpo status` fits its table to the terminal: a wide one here, whatever runs the tests.
    monkeypatch.setenv("COLUMNS", "200")
    # Round 1 fails on its first attempt; a retry (attempt 2) replaces the failed trials.
    name = start_toy_study(
        objective="tests.chaos_objectives:fails_on_first_attempt",
        search_space=XY,
        budget={"n_trials": 6, "batch_size": 3, "max_rounds": 3, "max_batch_size": 4},
        stopping={"max_failed_fraction": 0.9},
    )
    first = _run_round(local_deployment, name, 1)
    run_slot(deployment=local_deployment, study_name=name, trial_numbers=first, attempt=2)
    observe_round(deployment=local_deployment, study_name=name, round_number=1)
    second = _run_round(local_deployment, name, 2, attempt=2)
    observe_round(deployment=local_deployment, study_name=name, round_number=2)
    client = mlflow.MlflowClient(tracking_uri=local_deployment.tracking_uri)
    parent = load_run(local_deployment, name).attrs[StudyAttr.PARENT_RUN]
    # After a round: the history plot only.
    assert [a.path for a in client.list_artifacts(parent, plots.ARTIFACT_DIR)] == [
        "plots/optimization_history.png"
    ]
    result = finalize_study(deployment=local_deployment, study_name=name)

    assert find_study(local_deployment, DAG) == (name, RUN)
    run = load_progress(local_deployment, name)
    _check_read_model(local_deployment, run, result, first=first, second=second)
    _check_figures(local_deployment, name)
    _check_mlflow_side(client, parent, run)
    _check_status(run, result, capsys)


def _check_read_model(
    deployment: Deployment, run: StudyProgress, result: FinalizeResult, *, first: list[int], second: list[int]
) -> None:
    rows = {t.number: t for t in run.trials}
    replaced = [rows[n] for n in first]
    replacements = [t for t in run.trials if t.retry_of is not None]
    assert all(t.state == "FAIL" and not t.counted and t.attempt == 1 for t in replaced)
    assert all("transient failure" in (t.fail_reason or "") for t in replaced)
    assert sorted(t.retry_of for t in replacements if t.retry_of is not None) == sorted(first)
    assert all(t.state == "COMPLETE" and t.counted and t.attempt == 2 for t in replacements)
    assert {rows[n].round for n in second} == {2}
    assert all(t.task_id == f"round_{t.round}.evaluate" and t.slot is not None for t in run.trials)
    assert all(t.mlflow_run_id and t.duration_s is not None for t in run.trials)
    c = run.row.counts
    assert (c.counted, c.complete, c.failed, c.running) == (6, 6, 0, 0)
    assert run.row.best_trial == result["best_trial"]
    assert run.row.best_value == pytest.approx(result["best_value"])
    assert run.row.outcome == "succeeded"
    assert run.row.registered_model == {"name": "quadratic", "version": str(result["model_version"])}
    (listed,) = list_studies(deployment, dag_ids={DAG})
    assert listed == run.row
    assert list_studies(deployment, dag_ids={"hpo_other"}) == []
    text = json.dumps(run.to_dict())
    assert deployment.storage_url not in text and "secret" not in text


def _check_figures(deployment: Deployment, name: str) -> None:
    """Plotly figures for the view: history, parallel coordinates and importances (6 >= 4 complete),
    one point per counted trial (the replaced ones are not plotted)."""
    loaded = load_run(deployment, name)
    figures = plots.figures(loaded.spec, loaded.attrs, loaded.study.get_trials(deepcopy=False))
    assert {"history", "parallel", "importance"} <= set(figures) and figures["notes"] == {}
    history_x = sorted(x for trace in figures["history"]["data"] for x in trace.get("x", []))
    assert len(set(history_x)) == 6


def _check_mlflow_side(client: mlflow.MlflowClient, parent: str, run: StudyProgress) -> None:
    """The final plots, and tags linking back to Airflow (without the URL's credentials)."""
    artifacts = {a.path for a in client.list_artifacts(parent, plots.ARTIFACT_DIR)}
    names = ("optimization_history", "parallel_coordinates", "param_importances")
    assert artifacts == {f"plots/{n}.png" for n in names}
    tags = client.get_run(parent).data.tags
    assert tags[Tag.DAG_RUN_URL] == f"{AIRFLOW}/dags/{DAG}/runs/{RUN}"
    assert f"[{DAG} / {RUN}](" in tags[Tag.NOTE]
    replacement = next(t for t in run.trials if t.retry_of is not None)
    assert replacement.mlflow_run_id is not None
    child = client.get_run(replacement.mlflow_run_id).data.tags
    assert child[Tag.TASK_INSTANCE_URL] == (
        f"{AIRFLOW}/dags/{DAG}/runs/{RUN}/tasks/round_1.evaluate/mapped/{replacement.slot}"
    )
    assert (child[Tag.TASK_ID], child[Tag.MAP_INDEX], child[Tag.TRY_NUMBER]) == (
        "round_1.evaluate",
        str(replacement.slot),
        "2",
    )
    assert "secret" not in json.dumps(tags) + json.dumps(child)


def _check_status(run: StudyProgress, result: FinalizeResult, capsys: pytest.CaptureFixture[str]) -> None:
    """``hpo status``: progress and the trial table; ``--json`` is the read model."""
    assert cli.main(["status", DAG]) == 0
    out = capsys.readouterr().out
    assert "6/6 trials finished: 6 complete, 0 pruned, 0 failed, 0 running" in out
    assert f"(trial {result['best_trial']})" in out
    for t in run.trials:
        assert any(line.split()[:1] == [str(t.number)] for line in out.splitlines())
    assert "(replaced by a retry) RuntimeError: transient failure of trial" in out
    assert cli.main(["status", DAG, "--run-id", RUN, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(run.to_dict()))
    assert cli.main(["status", DAG, "--run-id", "nope"]) == 2
    assert f"no study of run 'nope' of DAG '{DAG}'" in capsys.readouterr().err


def test_hpo_schema_matches_the_committed_file_and_validates_study_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["schema"]) == 0
    printed = capsys.readouterr().out
    committed = (ROOT / SCHEMA_PATH).read_text()
    assert printed == committed, "stale schema: run `hpo schema -o schema/study.schema.json`"
    exported = json.loads(printed)
    jsonschema.Draft202012Validator.check_schema(exported)
    validator = jsonschema.Draft202012Validator(exported)
    example_file = ROOT / "dags" / "studies" / "breast_cancer_gbm.yaml"
    example = yaml.safe_load(example_file.read_text())
    assert list(validator.iter_errors(example)) == []
    assert "study.schema.json" in example_file.read_text()
    bad = {
        **example,
        "budget": {**example["budget"], "n_trails": 3, "max_rounds": 0},
        "sampler": {"type": "annealing"},
    }
    messages = sorted(e.message for e in validator.iter_errors(bad))
    assert any("'n_trails' was unexpected" in m for m in messages), messages
    assert any("0 is less than the minimum of 1" in m for m in messages), messages
    assert any("'annealing' is not one of ['tpe'," in m for m in messages), messages
    assert cli.main(["schema", "-o", str(tmp_path / "s.json")]) == 0
    assert (tmp_path / "s.json").read_text() == committed
