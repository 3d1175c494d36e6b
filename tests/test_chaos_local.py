"""Fault injection on the worker and the storage, and whole ``dag.test()`` runs with bad objectives.

Each test ends by checking the study: exactly the expected trials, their states and reasons, the
budget count, and that nothing that had finished was lost. Real processes, real databases: workers
are ``python -m hpo_core.worker`` subprocesses, PostgreSQL is a real server.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import airflow.settings
import mlflow
import optuna
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.models import TaskInstance
from airflow.utils.session import create_session
from optuna.trial import FrozenTrial, TrialState

from hpo_core.cli import latest_study_name
from hpo_core.deployment import Deployment
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.study.accounting import count_trials
from hpo_core.study.finalize import finalize_study
from hpo_core.study.observe import observe_round
from hpo_core.study.start import start_study
from hpo_core.study.suggest import suggest_batch
from tests.fixtures_core import ROOT, make_spec, study_mapping, worker_env, write_study
from tests.services import PostgresServer, database_name

pytestmark = pytest.mark.slow

X = {"type": "float", "low": -5.0, "high": 5.0}
NO_MODEL = {"experiment": "chaos"}


def _slow_space(seconds: float) -> dict[str, Any]:
    return {"x": X, "seconds": {"type": "categorical", "choices": [seconds]}}


def _start(deployment: Deployment, run_id: str = "manual__chaos", **changes: Any) -> str:
    spec = make_spec(**changes)
    return str(start_study(spec, deployment=deployment, dag_id=spec.dag_id, run_id=run_id)["study_name"])


def _study(deployment: Deployment, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=deployment.storage_url)


def _trials(deployment: Deployment, name: str) -> dict[int, FrozenTrial]:
    return {t.number: t for t in _study(deployment, name).get_trials() if TrialAttr.ROUND in t.user_attrs}


class _Worker:
    """One ``python -m hpo_core.worker`` process with its output in a file."""

    def __init__(self, deployment: Deployment, study: str, number: int, attempt: int, folder: Path) -> None:
        self.number, self.attempt = number, attempt
        self.log_path = folder / f"worker-{number}-{attempt}.log"
        cmd = [sys.executable, "-m", "hpo_core.worker", "--study-name", study,
               "--trial-number", str(number), "--attempt", str(attempt)]  # fmt: skip
        with self.log_path.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, env=worker_env(deployment), stdout=out, stderr=subprocess.STDOUT
            )

    def wait(self, timeout: float = 180) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    @property
    def output(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[_Worker]]:
    """Workers a test starts; any still running at its end are killed."""
    started: list[_Worker] = []
    yield started
    for worker in started:
        if worker.proc.poll() is None:
            worker.kill()


def _wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(0.2)


def _in_objective(deployment: Deployment, name: str, number: int, attempt: int) -> Callable[[], bool]:
    """True once attempt ``attempt`` of trial ``number`` has opened its MLflow run (it is evaluating)."""

    def check() -> bool:
        attrs = _trials(deployment, name)[number].user_attrs
        return (attrs.get(TrialAttr.WORKER) or {}).get("attempt") == attempt and TrialAttr.MLFLOW_RUN in attrs

    return check


def _child_runs(deployment: Deployment, name: str) -> dict[int, list[Any]]:
    """The study's trial runs in MLflow, by trial number, oldest first."""
    client = mlflow.MlflowClient(tracking_uri=deployment.tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`hpo.study` = '{name}' and tags.`hpo.role` = 'trial'",
        order_by=["attributes.start_time ASC"],
    )
    by_trial: dict[int, list[Any]] = {}
    for run in runs:
        by_trial.setdefault(int(run.data.tags["hpo.trial_number"]), []).append(run)
    return by_trial


def _error_artifact(deployment: Deployment, run_id: str) -> str:
    client = mlflow.MlflowClient(tracking_uri=deployment.tracking_uri)
    path = client.download_artifacts(run_id, "error.txt")
    return Path(path).read_text()


# ------------------------------------------------------------------------------- killed workers


def test_killed_workers_are_taken_over_swept_as_stale_or_closed_by_observe(
    local_deployment: Deployment, workers: list[_Worker], tmp_path: Path
) -> None:
    """Three workers are SIGKILLed mid-trial. The first trial's retry takes it over; the second is
    closed by the stale timeout while the third, still alive, is spared; the third is then killed
    too and the round's observe closes it with the Airflow task state."""
    name = _start(
        local_deployment,
        objective="tests.chaos_objectives:slow_first_attempt",
        # The retry takes 8 s: it is still evaluating when the stale sweep comes (a warm worker
        # would otherwise finish it before).
        search_space={**_slow_space(120), "retry_seconds": {"type": "categorical", "choices": [8]}},
        budget={"n_trials": 3, "batch_size": 3, "max_rounds": 2},
        trial={"retries": 1, "retry_delay": 0, "execution_timeout": 300, "stale_timeout": 3},
        mlflow=NO_MODEL,
    )
    batch, _ = suggest_batch(deployment=local_deployment, study_name=name, round_number=1)
    taken, stale, lost = (entry["trial_number"] for entry in batch)
    first = {n: _Worker(local_deployment, name, n, 1, tmp_path) for n in (taken, stale, lost)}
    workers.extend(first.values())
    for n in first:
        _wait_until(
            _in_objective(local_deployment, name, n, 1), timeout=120, what=f"trial {n} runs its objective"
        )

    first[taken].kill()
    first[stale].kill()
    retry = _Worker(local_deployment, name, taken, 2, tmp_path)
    workers.append(retry)
    _wait_until(
        _in_objective(local_deployment, name, taken, 2),
        timeout=120,
        what=f"attempt 2 takes trial {taken} over",
    )
    _wait_until(
        lambda: time.time() - _trials(local_deployment, name)[stale].user_attrs[TrialAttr.HEARTBEAT] > 3.5,
        timeout=30,
        what=f"trial {stale} has been silent for longer than its stale timeout",
    )
    # The next suggest sweeps stale trials first (here it then finds the budget spent).
    assert suggest_batch(deployment=local_deployment, study_name=name, round_number=2) == (
        [],
        "budget spent: 3 of 3 trials",
    )
    trials = _trials(local_deployment, name)
    assert trials[stale].state == TrialState.FAIL
    assert trials[stale].user_attrs["fail_reason"].startswith("stale: no sign of life from its worker for ")
    assert trials[lost].state == TrialState.RUNNING  # alive and beating: not stale
    assert trials[taken].state == TrialState.RUNNING  # its retry is evaluating it

    first[lost].kill()
    assert retry.wait() == 0, retry.output
    assert f"trial {taken}: attempt 1 (pid {first[taken].proc.pid} on " in retry.output
    summary = observe_round(
        deployment=local_deployment,
        study_name=name,
        round_number=1,
        task_states={2: "failed"},  # by map index: the third task of the round
    )

    assert summary["reconciled"] == [lost]
    assert summary["failures"] == {
        stale: trials[stale].user_attrs["fail_reason"],
        lost: "worker ended without reporting a result (Airflow task state: failed)",
    }
    trials = _trials(local_deployment, name)
    assert sorted(trials) == sorted((taken, stale, lost))  # no replacement, no extra trial
    assert [trials[n].state for n in (taken, stale, lost)] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.FAIL,
    ]
    assert trials[taken].params == {k: v for k, v in batch[0]["params"].items()}
    counts = count_trials(_study(local_deployment, name))
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (3, 1, 2, 0)
    # MLflow: the killed attempts' runs are closed as FAILED with the reason; the retry's run finished.
    runs = _child_runs(local_deployment, name)
    killed, finished = runs[taken]
    assert (killed.info.status, finished.info.status) == ("FAILED", "FINISHED")
    assert killed.data.tags["hpo.error"].startswith(
        f"worker lost: attempt 1 (pid {first[taken].proc.pid} on "
    )
    assert "attempt 2 took the trial over" in _error_artifact(local_deployment, killed.info.run_id)
    assert finished.data.metrics["loss"] == pytest.approx(trials[taken].value)
    for n in (stale, lost):
        (run,) = runs[n]
        assert run.info.status == "FAILED"
        assert run.data.tags["hpo.error"] == trials[n].user_attrs["fail_reason"]
    # observe once more (a cleared or retried task): the same summary, nothing logged twice.
    client = mlflow.MlflowClient(tracking_uri=local_deployment.tracking_uri)
    parent = _study(local_deployment, name).user_attrs[StudyAttr.PARENT_RUN]
    again = observe_round(deployment=local_deployment, study_name=name, round_number=1)
    assert again == summary
    assert [m.step for m in client.get_metric_history(parent, "n_failed")] == [1]
    counts = count_trials(_study(local_deployment, name))
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (3, 1, 2, 0)


# ------------------------------------------------------------------------------- the database


def _evaluate_round(deployment: Deployment, name: str, folder: Path, workers: list[_Worker]) -> list[_Worker]:
    """Start one worker per trial of round 1, as the mapped tasks would."""
    batch, _ = suggest_batch(deployment=deployment, study_name=name, round_number=1)
    started = [_Worker(deployment, name, entry["trial_number"], 1, folder) for entry in batch]
    workers.extend(started)
    return started


def _finish_like_airflow(deployment: Deployment, name: str, worker: _Worker, folder: Path) -> _Worker:
    """Wait for ``worker``; relaunch it as the next attempt while it fails, as task retries would."""
    while worker.wait() != 0 and worker.attempt < 3:
        worker = _Worker(deployment, name, worker.number, worker.attempt + 1, folder)
    return worker


def _assert_round_complete(deployment: Deployment, name: str, numbers: list[int]) -> None:
    """Exactly these trials, all COMPLETE with their value in MLflow, none twice."""
    trials = _trials(deployment, name)
    assert sorted(trials) == sorted(numbers)
    assert all(t.state == TrialState.COMPLETE for t in trials.values())
    counts = count_trials(_study(deployment, name))
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (
        len(numbers),
        len(numbers),
        0,
        0,
    )
    runs = _child_runs(deployment, name)
    for number, trial in trials.items():
        finished = [r for r in runs[number] if r.info.status == "FINISHED"]
        assert len(finished) == 1 and finished[0].data.metrics["loss"] == pytest.approx(trial.value)


def test_round_survives_dropped_connections_and_a_database_restart(
    local_deployment: Deployment, workers: list[_Worker], tmp_path: Path
) -> None:
    """While a round runs on PostgreSQL storage, every connection to it is cut again and again;
    then the server goes down while the objectives finish, and comes back 10 s later."""
    with PostgresServer(prefer_existing=False) as server:  # a private server this test may stop
        url = server.create_database("hpo_chaos")
        deployment = dataclasses.replace(local_deployment, storage_url=url)
        name = _start(
            deployment,
            objective="tests.chaos_objectives:slow_first_attempt",
            search_space=_slow_space(8),
            budget={"n_trials": 2, "batch_size": 2, "max_rounds": 1},
            trial={"retries": 2, "retry_delay": 0, "execution_timeout": 120, "stale_timeout": 3},
            mlflow=NO_MODEL,
        )
        started = _evaluate_round(deployment, name, tmp_path, workers)
        dropped = 0
        evaluating = [_in_objective(deployment, name, w.number, 1) for w in started]
        deadline = time.monotonic() + 120
        while not all(check() for check in evaluating) and time.monotonic() < deadline:
            dropped += server.terminate_backends(database_name(url))
            time.sleep(0.3)
        server._pg_ctl("stop", mode="fast")  # down until after every objective has returned
        time.sleep(10)
        server._pg_ctl("start")
        finished = [_finish_like_airflow(deployment, name, w, tmp_path) for w in started]
        dropped += server.terminate_backends(database_name(url))  # the observing task's too

        summary = observe_round(deployment=deployment, study_name=name, round_number=1)

        assert dropped > 0
        outputs = "\n".join(w.output for w in finished)
        assert all(w.proc.returncode == 0 and w.attempt == 1 for w in finished), outputs
        assert "storage connection failed (OperationalError" in outputs  # writes waited for the server
        assert (summary["complete"], summary["failed"], summary["reconciled"]) == (2, 0, [])
        _assert_round_complete(deployment, name, [w.number for w in started])


# ------------------------------------------------------------------------- whole runs, dag.test()


def _study_dag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modes: list[str], **changes: Any) -> Any:
    """The toy study's DAG with objective ``by_mode``, one trial per mode (grid sampler)."""
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(ROOT / "dags" / "hpo_studies.py", folder)
    data = study_mapping(
        objective="tests.chaos_objectives:by_mode",
        search_space={"mode": {"type": "categorical", "choices": modes}},
        sampler={"type": "grid"},
        budget={"n_trials": len(modes), "batch_size": len(modes), "max_rounds": 1},
        mlflow=NO_MODEL,
        **changes,
    )
    write_study(folder / "studies", data)
    # dag.test() re-parses the configured DAG folder to serialize the DAG it runs: point it here.
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(folder))
    monkeypatch.setattr(airflow.settings, "DAGS_FOLDER", str(folder))
    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}
    return bag.dags["hpo_quadratic"]


def _task_instances(dag_run: Any) -> dict[tuple[str, int], Any]:
    with create_session() as session:
        found = session.query(TaskInstance).filter(TaskInstance.run_id == dag_run.run_id).all()
        session.expunge_all()
    return {(ti.task_id, ti.map_index): ti for ti in found}


def _run_study(deployment: Deployment, dag_run: Any) -> tuple[str, dict[str, FrozenTrial]]:
    """The run's study name and its trials by mode (a replacement under ``<mode>+``)."""
    name = latest_study_name(deployment, "hpo_quadratic")
    by_mode: dict[str, FrozenTrial] = {}
    for trial in sorted(_trials(deployment, name).values(), key=lambda t: t.number):
        key = trial.params["mode"] + ("+" if TrialAttr.RETRY_OF in trial.user_attrs else "")
        assert key not in by_mode, f"two trials for {key}"
        by_mode[key] = trial
    return name, by_mode


def test_run_fails_with_its_reason_when_too_many_trials_fail(
    airflow_db: Path,
    local_deployment: Deployment,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One good trial; one raises, one returns NaN, one a string, one hangs past its timeout."""
    dag = _study_dag(
        tmp_path,
        monkeypatch,
        ["ok", "raise", "nan", "string", "hang"],
        stopping={"max_failed_fraction": 0.5},
        trial={"retries": 0, "retry_delay": 0, "execution_timeout": 3},
    )
    dag_run = dag.test()
    # dag.test() prints every task's log; depending on how logging was configured earlier in the
    # session the lines reach stdout/stderr or the logging capture, so read all of them.
    captured = capsys.readouterr()
    task_logs = captured.out + captured.err + caplog.text

    assert dag_run.state == "failed"
    name, trials = _run_study(local_deployment, dag_run)
    assert sorted(trials) == ["hang", "nan", "ok", "raise", "string"]
    reasons = {mode: t.user_attrs.get("fail_reason") for mode, t in trials.items()}
    assert reasons == {
        "ok": None,
        "raise": f"RuntimeError: objective broke on purpose in trial {trials['raise'].number}",
        "nan": "ObjectiveError: objective value 'loss' is NaN",
        "string": "ObjectiveError: objective returned str '0.93'; expected a number or a dict with key(s) "
        "['loss']",
        "hang": "timeout: the objective ran longer than 3s",
    }
    assert trials["ok"].state == TrialState.COMPLETE and trials["ok"].value == 1.0
    counts = count_trials(_study(local_deployment, name))
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (5, 1, 4, 0)
    problem = "4 of 5 trials failed (80%), above stopping.max_failed_fraction=50%"
    # The run says why: finalize failed with the reason, and the parent run carries it.
    tis = _task_instances(dag_run)
    assert tis[("finalize", -1)].state == "failed"
    assert tis[("round_1.observe", -1)].state == "success"  # the round went on past the failures
    assert f"AirflowFailException: study {name}: {problem}" in task_logs
    client = mlflow.MlflowClient(tracking_uri=local_deployment.tracking_uri)
    parent_id = _study(local_deployment, name).user_attrs[StudyAttr.PARENT_RUN]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["hpo.outcome"] == f"failed: {problem}"
    # The red tasks are named after their trials, and the reasons show in the round summary.
    for mode, trial in trials.items():
        ti = tis[("round_1.evaluate", trial.user_attrs["hpo.map_index"])]
        assert ti.state == ("success" if mode == "ok" else "failed")
        assert ti.rendered_map_index == f"trial {trial.number} · mode={mode}"
    summary = _study(local_deployment, name).user_attrs[f"{StudyAttr.ROUND_SUMMARY_PREFIX}1"]
    assert summary["failures"] == {str(t.number): reasons[m] for m, t in trials.items() if m != "ok"}
    # The task log has the params, the error and the tail of the traceback.
    raised = trials["raise"].number
    assert f"trial {raised} failed: {reasons['raise']}" in task_logs
    assert 'params: {"mode": "raise"}' in task_logs or 'params: {"mode": "raise"}' in task_logs
    assert 'raise RuntimeError(f"objective broke on purpose in trial {ctx.number}")' in task_logs
    assert f"trial {raised} · mode=raise failed: {reasons['raise']}" in task_logs
    # MLflow child runs: FAILED, the reason as a tag, the traceback in error.txt (for the hung
    # objective: the line it hung in).
    runs = _child_runs(local_deployment, name)
    for mode, trial in trials.items():
        (run,) = runs[trial.number]
        assert run.info.status == ("FINISHED" if mode == "ok" else "FAILED")
        assert run.data.tags.get("hpo.error") == reasons[mode]
    assert "time.sleep(3600)" in _error_artifact(local_deployment, runs[trials["hang"].number][0].info.run_id)
    raised = _error_artifact(local_deployment, runs[trials["raise"].number][0].info.run_id)
    assert 'params: {"mode": "raise"}' in raised and "Traceback (most recent call last)" in raised


def test_first_attempt_failures_are_retried_and_the_run_succeeds(
    airflow_db: Path, local_deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial failing only its first attempt is replaced by its retry; one failing for good stays
    failed, its task red, and the run still succeeds under max_failed_fraction."""
    dag = _study_dag(
        tmp_path,
        monkeypatch,
        ["ok", "flaky", "raise"],
        stopping={"max_failed_fraction": 0.5},
        trial={"retries": 1, "retry_delay": 0, "execution_timeout": 60},
    )
    dag_run = dag.test()

    assert dag_run.state == "success"
    name, trials = _run_study(local_deployment, dag_run)
    assert sorted(trials) == ["flaky", "flaky+", "ok", "raise", "raise+"]
    assert [trials[m].state for m in ("ok", "flaky", "flaky+", "raise", "raise+")] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.FAIL,
    ]
    for mode in ("flaky", "raise"):  # the retry evaluated the same params as a new trial
        replacement = trials[f"{mode}+"]
        assert replacement.user_attrs[TrialAttr.RETRY_OF] == trials[mode].number
        assert replacement.params == trials[mode].params
    counts = count_trials(_study(local_deployment, name))
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (3, 2, 1, 0)
    tis = _task_instances(dag_run)
    states = {
        mode: (tis[("round_1.evaluate", trials[mode].user_attrs["hpo.map_index"])].state,
               tis[("round_1.evaluate", trials[mode].user_attrs["hpo.map_index"])].try_number)
        for mode in ("ok", "flaky", "raise")
    }  # fmt: skip
    assert states == {"ok": ("success", 1), "flaky": ("success", 2), "raise": ("failed", 2)}
    assert tis[("finalize", -1)].state == "success"
    result = finalize_study(deployment=local_deployment, study_name=name)  # again: same answer
    assert (result["best_trial"], result["complete"], result["failed"]) == (trials["ok"].number, 2, 1)
