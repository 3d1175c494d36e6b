"""Slots: one mapped task (one warm worker process) evaluates several trials of a round in sequence.

A slot holding a good, a raising, a hanging and a SIGKILLed trial closes exactly the bad ones, each
with its reason in Optuna, MLflow and the log, and completes the good one once; a retry of the slot
evaluates only the trials that did not finish, with the same params. Real processes, real
databases: the worker is ``python -m hpo_core.worker`` with several ``--trial-number``s on
PostgreSQL, and a whole run goes through ``dag.test()``.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.models import TaskInstance
from airflow.utils.session import create_session
from optuna.trial import FrozenTrial, TrialState

from hpo_core.cli import latest_study_name
from hpo_core.deployment import Deployment
from hpo_core.keys import TrialAttr
from hpo_core.study.accounting import count_trials
from hpo_core.study.start import start_study
from hpo_core.study.suggest import batch_slots, suggest_batch
from tests.fixtures_core import ROOT, make_spec, run_slot_worker, study_mapping, use_dags_folder, write_study

pytestmark = pytest.mark.slow

#: The four trials of the slot, one per behaviour (grid sampler: each mode exactly once).
MODES = ["ok", "flaky", "hang_once", "kill_once"]
TIMEOUT = 3


def _slot_study(**changes: Any) -> dict[str, Any]:
    return study_mapping(
        objective="tests.chaos_objectives:by_mode",
        search_space={"mode": {"type": "categorical", "choices": MODES}},
        sampler={"type": "grid"},
        budget={"n_trials": 4, "batch_size": 4, "max_rounds": 1},
        trial={"retries": 1, "retry_delay": 0, "execution_timeout": TIMEOUT},
        stopping={"max_failed_fraction": 0.8},
        mlflow={"experiment": "slots"},
        **changes,
    )


def _trials_by_mode(deployment: Deployment, study_name: str) -> dict[str, FrozenTrial]:
    """The study's trials by mode; a replacement under ``<mode>+``."""
    study = optuna.load_study(study_name=study_name, storage=deployment.storage_url)
    found: dict[str, FrozenTrial] = {}
    for trial in sorted(study.get_trials(), key=lambda t: t.number):
        if TrialAttr.ROUND not in trial.user_attrs:
            continue
        key = trial.params["mode"] + ("+" if TrialAttr.RETRY_OF in trial.user_attrs else "")
        assert key not in found, f"two trials for {key}"
        found[key] = trial
    return found


def _child_runs(deployment: Deployment, study_name: str) -> dict[int, list[Any]]:
    client = mlflow.MlflowClient(tracking_uri=deployment.tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`hpo.study` = '{study_name}' and tags.`hpo.role` = 'trial'",
        order_by=["attributes.start_time ASC"],
    )
    by_trial: dict[int, list[Any]] = {}
    for run in runs:
        by_trial.setdefault(int(run.data.tags["hpo.trial_number"]), []).append(run)
    return by_trial


def _expected_reasons(trials: dict[str, FrozenTrial]) -> dict[str, str]:
    return {
        "flaky": f"RuntimeError: transient failure of trial {trials['flaky'].number} on its first attempt",
        "hang_once": f"timeout: the objective ran longer than {TIMEOUT}s",
        "kill_once": "killed: the trial's process was killed by SIGKILL before it reported a result "
        "(out of memory, or killed from outside)",
    }


def test_slot_closes_exactly_its_bad_trials_and_its_retry_reevaluates_only_those(
    local_deployment: Deployment, create_database: Callable[[str], str]
) -> None:
    deployment = dataclasses.replace(local_deployment, storage_url=create_database("hpo_slots"))
    spec = make_spec(**{k: v for k, v in _slot_study(worker={"trials_per_task": 4}).items() if k != "name"})
    name = str(
        start_study(spec, deployment=deployment, dag_id=spec.dag_id, run_id="manual__slot")["study_name"]
    )
    batch, _ = suggest_batch(deployment=deployment, study_name=name, round_number=1)
    (slot,) = batch_slots(batch)  # four trials per task: one slot holds the whole batch
    numbers = slot["trial_numbers"]
    assert slot["label"] == f"trials {numbers[0]}–{numbers[-1]}"

    code, results, output = run_slot_worker(deployment, name, numbers, attempt=1)
    assert code == 1, output  # the slot failed because some of its trials did
    trials = _trials_by_mode(deployment, name)
    assert sorted(trials) == sorted(MODES)
    reasons = _expected_reasons(trials)
    assert {m: t.state for m, t in trials.items()} == {
        "ok": TrialState.COMPLETE,
        "flaky": TrialState.FAIL,
        "hang_once": TrialState.FAIL,
        "kill_once": TrialState.FAIL,
    }
    assert trials["ok"].value == 1.0
    assert {m: t.user_attrs.get("fail_reason") for m, t in trials.items() if m != "ok"} == reasons
    # One result per trial, in slot order: the SIGKILL and the hang ended only their own trials.
    assert [r["trial_number"] for r in results] == numbers
    # The log: each failure with its params and reason, then every trial's outcome.
    for mode, reason in reasons.items():
        number = trials[mode].number
        assert f"trial {number} failed: {reason}" in output
        assert f'params: {{"mode": "{mode}"}}' in output
    assert "time.sleep(3600)" in output  # where the hung objective was stopped
    runs = _child_runs(deployment, name)
    for mode, trial in trials.items():
        (run,) = runs[trial.number]
        assert run.info.status == ("FINISHED" if mode == "ok" else "FAILED")
        assert run.data.tags.get("hpo.error") == reasons.get(mode)
        assert run.data.params == {"mode": mode}

    # The slot again, as its retry or a manual clear would run it: only the bad trials run again.
    code, results, output = run_slot_worker(deployment, name, numbers, attempt=2)
    assert code == 0, output
    again = _trials_by_mode(deployment, name)
    assert sorted(again) == sorted([*MODES, "flaky+", "hang_once+", "kill_once+"])
    assert again["ok"].number == trials["ok"].number and again["ok"].state == TrialState.COMPLETE
    for mode in ("flaky", "hang_once", "kill_once"):
        replacement = again[f"{mode}+"]
        assert replacement.user_attrs[TrialAttr.RETRY_OF] == trials[mode].number
        assert replacement.params == trials[mode].params
        assert replacement.state == TrialState.COMPLETE
    (ok_result,) = [r for r in results if r["trial_number"] == trials["ok"].number]
    assert ok_result["already_finished"] is True
    runs = _child_runs(deployment, name)
    assert len(runs[trials["ok"].number]) == 1  # the good trial ran once
    study = optuna.load_study(study_name=name, storage=deployment.storage_url)
    counts = count_trials(study)
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (4, 4, 0, 0)


def test_dag_run_of_slots_retries_only_the_failed_trials(
    airflow_db: Path, local_deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two slots of two trials each under ``dag.test()``; each slot fails its first attempt because
    one of its trials does, and its retry re-evaluates only that trial."""
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(ROOT / "dags" / "hpo_studies.py", folder)
    write_study(folder / "studies", _slot_study(worker={"trials_per_task": 2}))
    use_dags_folder(monkeypatch, folder)
    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}
    dag_run = bag.dags["hpo_quadratic"].test()
    assert dag_run.state == "success"

    name = latest_study_name(local_deployment, "hpo_quadratic")
    trials = _trials_by_mode(local_deployment, name)
    assert sorted(trials) == sorted([*MODES, "flaky+", "hang_once+", "kill_once+"])
    assert all(trials[f"{m}+"].state == TrialState.COMPLETE for m in ("flaky", "hang_once", "kill_once"))
    study = optuna.load_study(study_name=name, storage=local_deployment.storage_url)
    counts = count_trials(study)
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (4, 4, 0, 0)
    with create_session() as session:
        tis = (
            session.query(TaskInstance)
            .filter(TaskInstance.run_id == dag_run.run_id, TaskInstance.task_id == "round_1.evaluate")
            .all()
        )
        slots = {ti.map_index: (ti.state, ti.try_number, ti.rendered_map_index) for ti in tis}
    by_slot: dict[int, list[FrozenTrial]] = {}
    for mode in MODES:
        by_slot.setdefault(trials[mode].user_attrs["hpo.map_index"], []).append(trials[mode])
    assert sorted(by_slot) == sorted(slots) == [0, 1]
    for index, members in by_slot.items():
        state, try_number, label = slots[index]
        numbers = sorted(t.number for t in members)
        # Named after its trials before it ran; once it ran, how they went.
        assert label.startswith(f"trials {numbers[0]}–{numbers[1]} · 2 done"), label
        assert (state, try_number) == ("success", 2)
    assert len(_child_runs(local_deployment, name)[trials["ok"].number]) == 1
