"""Fault injection on a real Airflow (scheduler, LocalExecutor, triggerer, REST API) with the
Optuna storage on PostgreSQL and the MLflow server on PostgreSQL + S3.

One Airflow serves the whole file (restarts cost ~20 s each). Each test ends by checking the
study: exactly the expected trials, their states, the budget count, and that nothing that had
finished was lost or evaluated twice.
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from hpo_core.deployment import Deployment
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.storage import open_storage
from hpo_core.study.accounting import count_trials
from hpo_core.study.finalize import finalize_study
from hpo_core.study.suggest import trial_label
from tests.fixtures_core import ROOT, study_mapping, write_study
from tests.services import LOOPBACK, AirflowClient, AirflowDeployment

pytestmark = pytest.mark.slow

X = {"type": "float", "low": -5.0, "high": 5.0}
EVALUATE = "round_1.evaluate"
WEBHOOK_CONN_ID = "hpo_chaos_webhook"
SLOT_MODES = ["ok", "flaky", "hang_once", "kill_once"]

#: name -> study file changes. One round each, so that a run has few tasks.
STUDIES: dict[str, dict[str, Any]] = {
    # Every trial fails its first attempt; no automatic retry: a person retries one by hand.
    "chaos_clear": {
        "objective": "tests.chaos_objectives:fails_on_first_attempt",
        "search_space": {"x": X},
        "budget": {"n_trials": 2, "batch_size": 2, "max_rounds": 1},
        "trial": {"retries": 0, "retry_delay": 0, "execution_timeout": 120},
        "stopping": {"max_failed_fraction": 0.5},
        "mlflow": {"experiment": "chaos_clear", "registered_model": "chaos_clear"},
    },
    # Slow first attempts, so the scheduler can be killed while both trials run.
    "chaos_sched": {
        "objective": "tests.chaos_objectives:slow_first_attempt",
        "search_space": {"x": X, "seconds": {"type": "categorical", "choices": [90]}},
        "budget": {"n_trials": 2, "batch_size": 2, "max_rounds": 1},
        "trial": {"retries": 1, "retry_delay": 1, "execution_timeout": 300},
        "mlflow": {"experiment": "chaos_sched"},
    },
    # One slot (one task, one warm worker) of four trials: a good one and three that fail once.
    "chaos_slot": {
        "objective": "tests.chaos_objectives:by_mode",
        "search_space": {"mode": {"type": "categorical", "choices": SLOT_MODES}},
        "sampler": {"type": "grid"},
        "budget": {"n_trials": 4, "batch_size": 4, "max_rounds": 1},
        "trial": {"retries": 0, "retry_delay": 0, "execution_timeout": 3},
        "stopping": {"max_failed_fraction": 0.8},
        "worker": {"trials_per_task": 4},
        "mlflow": {"experiment": "chaos_slot"},
    },
    # Late after 5 s (the alert), stopped after 60 s (dagrun_timeout) while its trial still runs.
    "chaos_deadline": {
        "objective": "tests.chaos_objectives:slow_first_attempt",
        "search_space": {"x": X, "seconds": {"type": "categorical", "choices": [600]}},
        "budget": {"n_trials": 1, "batch_size": 1, "max_rounds": 1, "timeout": 60},
        "trial": {"retries": 0, "retry_delay": 0, "execution_timeout": 900},
        "mlflow": {"experiment": "chaos_deadline"},
        "alerts": {"deadline_seconds": 5, "callback": "webhook", "webhook_conn_id": WEBHOOK_CONN_ID},
    },
}


@dataclass
class Webhook:
    """An HTTP endpoint on loopback that records what is POSTed to it."""

    token: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    received: list[dict[str, Any]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{LOOPBACK}:{self.server.server_address[1]}/alert/{self.token}"

    def start(self) -> Webhook:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.received.append({"path": self.path, "body": json.loads(body or b"null")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@dataclass
class Chaos:
    """The studies' DAGs on the shared Airflow, and the run started first (see ``chaos``)."""

    airflow: AirflowDeployment
    deployment: Deployment
    webhook: Webhook
    deadline_run: str

    @property
    def client(self) -> AirflowClient:
        return self.airflow.client


@pytest.fixture(scope="module")
def chaos(airflow: AirflowDeployment, airflow_dags_folder: Path, hpo_env: dict[str, str]) -> Iterator[Chaos]:
    """The chaos studies in the shared Airflow, the webhook and its Airflow connection.

    The deadline study's run is triggered here, first: it spends a minute waiting for its
    timeout, which the next test's run overlaps.
    """
    for name, changes in STUDIES.items():
        write_study(airflow_dags_folder / "studies", study_mapping(name=name, **changes))
    shutil.copy(ROOT / "dags" / "hpo_studies.py", airflow_dags_folder / "hpo_studies.py")
    client = airflow.client
    for name in STUDIES:
        parsed = client.wait_for_dag(f"hpo_{name}", timeout=180, fileloc="hpo_studies.py")
        assert parsed.dag is not None, parsed.import_errors
        client.unpause(f"hpo_{name}")
    webhook = Webhook().start()
    client.request("DELETE", f"/api/v2/connections/{WEBHOOK_CONN_ID}")
    client._json(
        "POST",
        "/api/v2/connections",
        json={"connection_id": WEBHOOK_CONN_ID, "conn_type": "http", "host": webhook.url},
    )
    deadline_run = client.trigger("hpo_chaos_deadline")
    try:
        yield Chaos(airflow, Deployment.from_env(hpo_env), webhook, deadline_run)
    finally:
        webhook.stop()


def _study_of(deployment: Deployment, run_id: str) -> optuna.Study:
    """The Optuna study of a DAG run (named after the run: it has no logical date)."""
    names = [
        s.study_name
        for s in optuna.get_all_study_summaries(
            open_storage(deployment.storage_url), include_best_trial=False
        )
        if s.study_name.endswith(f".{run_id}")
    ]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=deployment.storage_url)


def _trials(study: optuna.Study) -> dict[int, FrozenTrial]:
    return {t.number: t for t in study.get_trials() if TrialAttr.ROUND in t.user_attrs}


def _tis(client: AirflowClient, dag_id: str, run_id: str) -> dict[tuple[str, int], dict[str, Any]]:
    return {(ti["task_id"], ti["map_index"]): ti for ti in client.task_instances(dag_id, run_id)}


def _child_runs(deployment: Deployment, experiment: str, study: str) -> dict[int, list[Any]]:
    """The study's trial runs in MLflow by trial number, oldest first."""
    client = mlflow.MlflowClient(tracking_uri=deployment.tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`hpo.study` = '{study}' and tags.`hpo.role` = 'trial'",
        order_by=["attributes.start_time ASC"],
    )
    by_trial: dict[int, list[Any]] = {}
    for run in runs:
        by_trial.setdefault(int(run.data.tags["hpo.trial_number"]), []).append(run)
    return by_trial


def _wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(1.0)


# ------------------------------------------------------------------------------ manual retry


def test_one_failed_trial_retried_through_the_rest_api_then_finalize_cleared(
    chaos: Chaos, mlflow_env: dict[str, str]
) -> None:
    client, dag_id = chaos.client, "hpo_chaos_clear"
    run_id = client.trigger(dag_id)

    # Every trial failed on its first attempt: the run fails and says why.
    assert client.wait_for_run(dag_id, run_id, timeout=420) == "failed"
    study = _study_of(chaos.deployment, run_id)
    first = _trials(study)
    assert sorted(t.state for t in first.values()) == [TrialState.FAIL, TrialState.FAIL]
    tis = _tis(client, dag_id, run_id)
    assert (tis[(EVALUATE, 0)]["state"], tis[(EVALUATE, 1)]["state"]) == ("failed", "failed")
    assert (tis[("round_1.observe", -1)]["state"], tis[("finalize", -1)]["state"]) == ("success", "failed")
    by_index = {t.user_attrs["hpo.map_index"]: t for t in first.values()}
    retried = by_index[1]
    label = trial_label(retried.number, retried.params)
    assert tis[(EVALUATE, 1)]["rendered_map_index"] == label  # the red task names its trial
    reason = f"RuntimeError: transient failure of trial {retried.number} on its first attempt"
    assert retried.user_attrs["fail_reason"] == reason
    log = client.task_log(dag_id, run_id, EVALUATE, map_index=1, try_number=1)
    assert f"params: {json.dumps(retried.params)}" in log  # the params, the error, the traceback tail
    assert f"trial {retried.number} failed: {reason}" in log
    assert 'raise RuntimeError(f"transient failure of trial {ctx.number} on its first attempt")' in log
    # Last, the task's own error, as the grid shows it (structured: the JSON-escaped text).
    assert json.dumps(f"{label} failed: {reason}")[1:-1] in log
    assert f"trial {retried.number} failed: {reason}" in client.task_log(dag_id, run_id, "round_1.observe")
    finalize_log = client.task_log(dag_id, run_id, "finalize")
    assert f"study {study.study_name}: no trial completed (2 failed, 0 pruned of 2)" in finalize_log

    # A person retries trial 1 alone: POST clearTaskInstances with [task_id, map_index] ...
    cleared = client.clear_task_instances(dag_id, run_id, [(EVALUATE, 1)])
    assert [(ti["task_id"], ti["map_index"]) for ti in cleared] == [(EVALUATE, 1)]
    ti = client.wait_for_task_state(dag_id, run_id, EVALUATE, {"success", "failed"}, map_index=1, timeout=300)
    assert (ti["state"], ti["try_number"]) == ("success", 2)
    assert client.wait_for_run(dag_id, run_id, timeout=120) == "failed"  # finalize has not seen it yet
    # ... then clears finalize to refresh the study's result.
    client.clear_task_instances(dag_id, run_id, ["finalize"])
    assert client.wait_for_run(dag_id, run_id, timeout=300) == "success"

    # The retry evaluated the same params as a new trial, which replaces the failed one.
    trials = _trials(study)
    (replacement,) = [t for t in trials.values() if t.number not in first]
    assert replacement.user_attrs[TrialAttr.RETRY_OF] == retried.number
    assert (replacement.params, replacement.state) == (retried.params, TrialState.COMPLETE)
    assert sorted(trials) == sorted([*first, replacement.number])
    counts = count_trials(study)
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (2, 1, 1, 0)
    tis = _tis(client, dag_id, run_id)
    assert tis[(EVALUATE, 0)]["state"] == "failed"  # the other failure stays visible
    _assert_registered_once_with_lineage(chaos, study, retried, replacement)


def _assert_registered_once_with_lineage(
    chaos: Chaos, study: optuna.Study, retried: FrozenTrial, replacement: FrozenTrial
) -> None:
    """The registry holds the replacement's model, once, with its lineage; the failed trial's
    MLflow run stays FAILED and the replacement's run names the trial it retried."""
    tracking = mlflow.MlflowClient()
    versions = tracking.search_model_versions("name = 'chaos_clear'")
    (version,) = [v for v in versions if v.tags.get("hpo.study") == study.study_name]
    assert version.tags["hpo.trial_number"] == str(replacement.number)
    assert float(version.tags["hpo.value"]) == pytest.approx(replacement.value)
    assert tracking.get_model_version_by_alias("chaos_clear", "challenger").version == version.version
    again = finalize_study(deployment=chaos.deployment, study_name=study.study_name)
    assert again["model_version"] == version.version  # finalize once more: nothing new
    assert len(tracking.search_model_versions("name = 'chaos_clear'")) == len(versions)
    runs = _child_runs(chaos.deployment, "chaos_clear", study.study_name)
    assert [r.info.status for r in runs[retried.number]] == ["FAILED"]
    (retry_run,) = runs[replacement.number]
    assert retry_run.info.status == "FINISHED"
    assert (retry_run.data.tags["hpo.retry_of"], retry_run.data.tags["hpo.attempt"]) == (
        str(retried.number),
        "2",
    )


def test_a_slot_cleared_through_the_rest_api_reevaluates_only_its_failed_trials(chaos: Chaos) -> None:
    """One mapped task holds four trials; three fail (raise, hang past the timeout, SIGKILL), each
    closed with its reason while the slot goes on; clearing the slot re-evaluates only those three."""
    client, dag_id = chaos.client, "hpo_chaos_slot"
    run_id = client.trigger(dag_id)
    assert client.wait_for_run(dag_id, run_id, timeout=300) == "success"  # 3 of 4 failed < 80 %
    study = _study_of(chaos.deployment, run_id)
    first = _trials(study)
    by_mode = {t.params["mode"]: t for t in first.values()}
    assert sorted(by_mode) == sorted(SLOT_MODES)
    assert {m: t.state for m, t in by_mode.items()} == {
        "ok": TrialState.COMPLETE,
        "flaky": TrialState.FAIL,
        "hang_once": TrialState.FAIL,
        "kill_once": TrialState.FAIL,
    }
    reasons = {
        "flaky": f"RuntimeError: transient failure of trial {by_mode['flaky'].number} on its first attempt",
        "hang_once": "timeout: the objective ran longer than 3s",
        "kill_once": "killed: the trial's process was killed by SIGKILL before it reported a result "
        "(out of memory, or killed from outside)",
    }
    assert {m: by_mode[m].user_attrs["fail_reason"] for m in reasons} == reasons
    tis = _tis(client, dag_id, run_id)
    assert [key for key in tis if key[0] == EVALUATE] == [(EVALUATE, 0)]  # one task for the slot
    numbers = sorted(first)
    assert tis[(EVALUATE, 0)]["state"] == "failed"
    assert tis[(EVALUATE, 0)]["rendered_map_index"] == (
        f"trials {numbers[0]}–{numbers[-1]} · 1 done · 3 failed · best 1"
    )
    log = client.task_log(dag_id, run_id, EVALUATE, map_index=0, try_number=1)
    for mode, reason in reasons.items():  # every trial's outcome and reason, in the slot's log
        assert f"trial {by_mode[mode].number} failed: {reason}" in log
        assert json.dumps(f"trial {by_mode[mode].number}: FAIL: {reason}")[1:-1] in log
    assert f"trial {by_mode['ok'].number}: COMPLETE 1" in log

    cleared = client.clear_task_instances(dag_id, run_id, [(EVALUATE, 0)])
    assert [(ti["task_id"], ti["map_index"]) for ti in cleared] == [(EVALUATE, 0)]
    ti = client.wait_for_task_state(dag_id, run_id, EVALUATE, {"success", "failed"}, map_index=0, timeout=300)
    assert (ti["state"], ti["try_number"]) == ("success", 2)
    assert ti["rendered_map_index"] == f"trials {numbers[0]}–{numbers[-1]} · 4 done · best 1"
    trials = _trials(study)
    replacements = {t.user_attrs[TrialAttr.RETRY_OF]: t for t in trials.values() if t.number not in first}
    assert sorted(replacements) == sorted(by_mode[m].number for m in reasons)  # only the failed ones
    for failed_number, replacement in replacements.items():
        assert replacement.params == first[failed_number].params
        assert replacement.state == TrialState.COMPLETE
    counts = count_trials(study)
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (4, 4, 0, 0)
    runs = _child_runs(chaos.deployment, "chaos_slot", study.study_name)
    assert [r.info.status for r in runs[by_mode["ok"].number]] == ["FINISHED"]  # evaluated once
    client.clear_task_instances(dag_id, run_id, ["finalize"])
    assert client.wait_for_run(dag_id, run_id, timeout=300) == "success"


# ------------------------------------------------------------------------- deadline, timeout


def test_deadline_alert_calls_the_webhook_and_dagrun_timeout_fails_the_run(chaos: Chaos) -> None:
    client, dag_id, run_id = chaos.client, "hpo_chaos_deadline", chaos.deadline_run

    _wait_until(lambda: bool(chaos.webhook.received), timeout=120, what="the deadline webhook is called")
    (call,) = chaos.webhook.received
    assert call["path"] == f"/alert/{chaos.webhook.token}"
    message = call["body"]
    assert {k: message[k] for k in ("event", "study", "dag_id", "run_id", "deadline_seconds")} == {
        "event": "hpo.deadline_missed",
        "study": "chaos_deadline",
        "dag_id": dag_id,
        "run_id": run_id,
        "deadline_seconds": 5,
    }
    assert message["text"].startswith(f"HPO study chaos_deadline: DAG run {dag_id} / {run_id} is still ")

    # dagrun_timeout (budget.timeout) stops the run while its trial is still running.
    assert client.wait_for_run(dag_id, run_id, timeout=240) == "failed"
    scheduler_log = (chaos.airflow.logs_dir / "scheduler.log").read_text()
    assert f"Run {run_id} of {dag_id} has timed-out" in scheduler_log
    tis = _tis(client, dag_id, run_id)
    assert tis[(EVALUATE, 0)]["state"] in ("skipped", "failed")
    assert tis[("finalize", -1)]["state"] == "skipped"
    # The stopped trial is closed with the reason, not left running.
    study = _study_of(chaos.deployment, run_id)

    def closed() -> bool:
        return all(t.state != TrialState.RUNNING for t in _trials(study).values())

    _wait_until(closed, timeout=90, what="the stopped trial is closed")
    (trial,) = _trials(study).values()
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"].startswith("terminated: the worker received SIGTERM")
    # finalize never ran: the DAG's failure callback (in the DAG processor) closes the parent run.
    tracking = mlflow.MlflowClient(tracking_uri=chaos.deployment.tracking_uri)
    parent = study.user_attrs[StudyAttr.PARENT_RUN]
    _wait_until(
        lambda: tracking.get_run(parent).info.status != "RUNNING",
        timeout=120,
        what="the MLflow parent run of the timed-out run is closed",
    )
    closed_run = tracking.get_run(parent)
    assert closed_run.info.status == "FAILED"
    assert closed_run.data.tags["hpo.outcome"] == (
        "failed: the DAG run timed out: budget.timeout (60s, the DAG's dagrun_timeout) passed before "
        "finalize ran; its unfinished tasks were stopped"
    )
    # The webhook URL (its token is a secret) shows in no component log.
    logs = "".join(p.read_text() for p in chaos.airflow.logs_dir.glob("*.log"))
    assert chaos.webhook.token not in logs


# ------------------------------------------------------------------------------ scheduler kill


def test_study_completes_after_the_scheduler_is_killed_mid_round(chaos: Chaos) -> None:
    client, dag_id = chaos.client, "hpo_chaos_sched"
    run_id = client.trigger(dag_id)

    def evaluating() -> bool:
        try:
            trials = _trials(_study_of(chaos.deployment, run_id)).values()
        except AssertionError:
            return False  # not started yet
        return len(trials) == 2 and all(
            (t.user_attrs.get(TrialAttr.WORKER) or {}).get("attempt") == 1
            and TrialAttr.MLFLOW_RUN in t.user_attrs
            for t in trials
        )

    _wait_until(evaluating, timeout=300, what="both trials run their objective")
    study = _study_of(chaos.deployment, run_id)
    before = _trials(study)
    tis = _tis(client, dag_id, run_id)
    for trial in before.values():  # named from the start, while they run
        ti = tis[(EVALUATE, trial.user_attrs["hpo.map_index"])]
        assert (ti["state"], ti["rendered_map_index"]) == (
            "running",
            trial_label(trial.number, trial.params),
        )

    chaos.airflow.kill_scheduler()  # with its LocalExecutor, the trial tasks and their workers
    time.sleep(2)
    chaos.airflow.restart_scheduler()

    assert client.wait_for_run(dag_id, run_id, timeout=420) == "success"
    trials = _trials(study)
    assert sorted(trials) == sorted(before)  # taken over by the retries: no replacement, no extra
    assert all(t.state == TrialState.COMPLETE for t in trials.values())
    assert all(t.params == before[n].params for n, t in trials.items())
    counts = count_trials(study)
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (2, 2, 0, 0)
    tis = _tis(client, dag_id, run_id)
    assert [tis[(EVALUATE, i)]["state"] for i in (0, 1)] == ["success", "success"]
    assert all(tis[(EVALUATE, i)]["try_number"] >= 2 for i in (0, 1))
    # Each trial finished exactly once; the killed attempt's run is closed as lost.
    runs = _child_runs(chaos.deployment, "chaos_sched", study.study_name)
    for number, trial in trials.items():
        finished = [r for r in runs[number] if r.info.status == "FINISHED"]
        lost = [r for r in runs[number] if r.info.status == "FAILED"]
        assert len(finished) == 1 and finished[0].data.metrics["loss"] == pytest.approx(trial.value)
        assert [r.data.tags["hpo.attempt"] for r in lost] == ["1"]
        assert lost[0].data.tags["hpo.error"].startswith("worker lost: attempt 1 (pid ")
