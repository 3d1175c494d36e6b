"""16 trial workers telling one PostgreSQL study at once: nothing lost, nothing evaluated twice.

The workers are the real command (``python -m hpo_core.worker``), the storage is PostgreSQL and the
tracking is the MLflow server. The objective writes one file per evaluation, so evaluations are
counted independently of what the storage and MLflow say.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from hpo_core.deployment import Deployment
from hpo_core.keys import TrialAttr
from hpo_core.payloads import StudyHandle
from hpo_core.study.accounting import count_trials
from hpo_core.study.start import start_study
from hpo_core.study.suggest import suggest_batch
from tests.fixtures_core import make_spec, run_worker
from tests.services import MLflowServer

pytestmark = pytest.mark.slow

PARALLEL = 16
N_TRIALS = 12
#: Trials (by batch position) whose first evaluation fails; their retries are launched twice too.
FAILING = (3, 9)
#: Trials (by batch position) launched twice at the same moment (one of them fails).
DUPLICATED = (0, 1, 2, 3)
EVAL_SECONDS = 2.0


@dataclass(frozen=True)
class Launch:
    """One worker process: what it was asked, how it exited, what it printed."""

    requested: int
    attempt: int
    code: int
    result: dict[str, Any] | None
    output: str


def _launch_all(
    deployment: Deployment, study_name: str, jobs: Iterable[tuple[int, int]], env: dict[str, str]
) -> list[Launch]:
    """Run one worker per ``(trial_number, attempt)``, at most ``PARALLEL`` at once."""

    def run(job: tuple[int, int]) -> Launch:
        number, attempt = job
        code, result, output = run_worker(deployment, study_name, number, attempt=attempt, extra_env=env)
        return Launch(number, attempt, code, result, output)

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        return list(pool.map(run, jobs))


def _evaluations(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def _max_overlap(evaluations: list[dict[str, Any]]) -> int:
    """The largest number of objective calls that were running at the same instant."""
    events = sorted([(e["start"], 1) for e in evaluations] + [(e["end"], -1) for e in evaluations])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def _config(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _assert_each_duplicated_pair_evaluated_once(
    first: list[Launch], duplicated: list[int], failing: list[int]
) -> None:
    """Each duplicated pair: exactly one copy evaluated, the other reported that copy's result."""
    for n in duplicated:
        pair = [launch.result for launch in first if launch.requested == n and launch.result]
        assert sorted(result["already_finished"] for result in pair) == [False, True]
        assert {result["state"] for result in pair} == {"FAIL" if n in failing else "COMPLETE"}
        assert len({json.dumps(result["values"]) for result in pair}) == 1


def _assert_one_replacement_per_failed_trial(
    trials: list[FrozenTrial], by_number: dict[int, FrozenTrial], failing: list[int]
) -> None:
    """Each failed trial has exactly one counted replacement, which completed with the same params."""
    replacements = [
        t for t in trials if TrialAttr.RETRY_OF in t.user_attrs and not t.user_attrs.get(TrialAttr.DISCARDED)
    ]
    assert sorted(t.user_attrs[TrialAttr.RETRY_OF] for t in replacements) == sorted(failing)
    for replacement in replacements:
        original = by_number[replacement.user_attrs[TrialAttr.RETRY_OF]]
        assert original.state == TrialState.FAIL
        reason = original.user_attrs[TrialAttr.FAIL_REASON]
        assert reason == f"RuntimeError: trial {original.number} fails on purpose"
        assert replacement.state == TrialState.COMPLETE and replacement.params == original.params


def _assert_one_mlflow_run_per_evaluation(
    tracking_uri: str, started: StudyHandle, name: str, evaluated: list[FrozenTrial], failing: list[int]
) -> None:
    """MLflow: one child run per evaluation, under the study's parent run, FAILED for the failures."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    children = client.search_runs(
        [started["experiment_id"]],
        filter_string=f"tags.`hpo.study` = '{name}' and tags.`hpo.role` = 'trial'",
        max_results=1000,
    )
    assert Counter(run.data.tags["hpo.trial_number"] for run in children) == {
        str(t.number): 1 for t in evaluated
    }
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {started["parent_run_id"]}
    statuses = {int(run.data.tags["hpo.trial_number"]): run.info.status for run in children}
    assert {n for n, status in statuses.items() if status == "FAILED"} == set(failing)


def test_sixteen_workers_on_one_postgres_study_lose_and_duplicate_nothing(
    create_database: Callable[[str], str],
    mlflow_server: MLflowServer,
    mlflow_env: dict[str, str],
    tmp_path: Path,
) -> None:
    deployment = Deployment(
        storage_url=create_database("hpo_parallel"), tracking_uri=mlflow_server.tracking_uri
    )
    spec = make_spec(
        name="parallel_workers",
        objective="tests.objectives:recorded",
        search_space={
            "x": {"type": "float", "low": -5.0, "high": 5.0},
            "y": {"type": "float", "low": -5.0, "high": 5.0},
        },
        sampler={"type": "tpe", "seed": 11, "n_startup_trials": 8},
        budget={"n_trials": N_TRIALS, "batch_size": N_TRIALS, "max_rounds": 1, "max_batch_size": N_TRIALS},
        mlflow={"experiment": "parallel_workers"},
    )
    started = start_study(spec, deployment=deployment, dag_id=spec.dag_id, run_id="manual__parallel")
    name = started["study_name"]
    batch, _ = suggest_batch(deployment=deployment, study_name=name, round_number=1)
    numbers = [entry["trial_number"] for entry in batch]
    assert len(numbers) == N_TRIALS == len(set(numbers))
    duplicated = [numbers[i] for i in DUPLICATED]
    failing = [numbers[i] for i in FAILING]
    evaluations_dir = tmp_path / "evaluations"
    env = {
        "HPO_TEST_EVALUATIONS": str(evaluations_dir),
        "HPO_TEST_EVAL_SECONDS": str(EVAL_SECONDS),
        "HPO_TEST_FAIL_TRIALS": ",".join(map(str, failing)),
    }

    # Wave 1: 16 workers at once, every trial once and the duplicated ones twice.
    wave_1 = [(n, 1) for n in duplicated for _ in range(2)] + [(n, 1) for n in numbers if n not in duplicated]
    assert len(wave_1) == PARALLEL
    t0 = time.monotonic()
    first = _launch_all(deployment, name, wave_1, env)
    t1 = time.monotonic()
    # Wave 2: the retry of each failed trial twice at once, and a finished trial again.
    wave_2 = [(n, 2) for n in failing for _ in range(2)] + [(numbers[-1], 2)]
    second = _launch_all(deployment, name, wave_2, env)
    elapsed = f"{t1 - t0:.0f}s + {time.monotonic() - t1:.0f}s"

    for launch in first + second:
        expected = 1 if launch.attempt == 1 and launch.requested in failing else 0
        what = f"trial {launch.requested} attempt {launch.attempt}:\n{launch.output[-3000:]}"
        assert launch.code == expected, what
        assert launch.result is not None, what

    _assert_each_duplicated_pair_evaluated_once(first, duplicated, failing)
    waited = [launch for launch in first if "waiting for it" in launch.output]
    assert waited, "no duplicated launch met its twin while it was evaluating; the race was not exercised"

    # Storage: every trial in one final state; each failed trial has exactly one counted replacement.
    study = optuna.load_study(study_name=name, storage=deployment.storage_url)
    trials = study.get_trials()
    assert [t.number for t in trials if not t.state.is_finished()] == []
    by_number = {t.number: t for t in trials}
    _assert_one_replacement_per_failed_trial(trials, by_number, failing)
    counts = count_trials(study)
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (N_TRIALS, N_TRIALS, 0, 0)
    retries = [launch.result for launch in second if launch.requested in failing and launch.result]
    assert sorted(result["already_finished"] for result in retries) == [False, False, True, True]
    again = [launch.result for launch in second if launch.requested not in failing and launch.result]
    assert again and all(result["already_finished"] for result in again)

    # Evaluations: one per trial that ran, no configuration twice except the retries of the failures.
    evaluations = _evaluations(evaluations_dir)
    evaluated = [t for t in trials if not t.user_attrs.get(TrialAttr.DISCARDED)]
    assert Counter(e["number"] for e in evaluations) == dict.fromkeys((t.number for t in evaluated), 1)
    configs = Counter(_config(e["params"]) for e in evaluations)
    repeated = sorted(config for config, times in configs.items() if times > 1)
    assert repeated == sorted(_config(by_number[n].params) for n in failing)
    assert max(configs.values()) == 2 and len(evaluations) == N_TRIALS + len(failing)
    assert _max_overlap(evaluations) >= 4, "the workers did not run concurrently"

    _assert_one_mlflow_run_per_evaluation(mlflow_server.tracking_uri, started, name, evaluated, failing)
    print(
        f"\n{len(first)} + {len(second)} worker launches in {elapsed}; "
        f"peak concurrent objective calls {_max_overlap(evaluations)}; {len(waited)} duplicate(s) waited"
    )
