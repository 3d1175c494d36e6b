"""The ``kubernetes`` worker backend: the pure pod builder, and whole studies through the real
KubernetesPodOperator against the Kubernetes API emulator (pods run as local processes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from hpo_airflow import build_study_dag
from hpo_airflow.backends.kubernetes import slot_pod_overrides, trial_pod_settings
from kubernetes.client import ApiClient
from optuna.trial import TrialState

from hpo_core.cli import latest_study_name
from hpo_core.deployment import Deployment
from hpo_core.keys import TrialAttr
from hpo_core.spec import validate_mapping
from hpo_core.study.suggest import batch_slots
from tests.fixtures_core import study_mapping, use_dags_folder, write_study
from tests.k8s_emulator import KubernetesEmulator

ROOT = Path(__file__).resolve().parent.parent
SECRET_VALUES = {
    "storage": "postgresql+psycopg2://optuna:s3cr3t-Pa55@db.internal:5432/optuna",
    "aws": "AKIA-very-secret-key-value",
}

WORKER = {
    "backend": "kubernetes",
    "image": "registry.example.com/ml/hpo-worker:1.2.3",
    "image_pull_policy": "Always",
    "namespace": "hpo-trials",
    "service_account": "hpo-trial",
    "resources": {"cpu": "2", "memory": "4Gi", "cpu_limit": "4", "memory_limit": "6Gi", "gpu": 1},
    "node_selector": {"pool": "gpu"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}
                ]
            }
        }
    },
    "startup_timeout": 240,
    "on_finish_action": "delete_succeeded_pod",
    "pool": "hpo_trials",
    "max_active_trials": 2,
}


class _TI:
    """The task instance methods the operator's templates call."""

    try_number = 2
    map_index = 1
    dag_id = "hpo_quadratic"
    task_id = "round_1.evaluate"
    run_id = "manual__2026-11-22"

    def xcom_pull(self, task_ids: str, **_: Any) -> dict[str, Any]:
        assert task_ids == "start"
        return {"study_name": "quadratic.manual__2026-11-22"}


def _operator(
    monkeypatch: pytest.MonkeyPatch, *, numbers: tuple[int, ...] = (17,), **worker_changes: Any
) -> Any:
    # Secrets present in the Airflow environment must never leak into the pod.
    monkeypatch.setenv("HPO_STORAGE_URL", SECRET_VALUES["storage"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUES["aws"])
    spec = validate_mapping(study_mapping(worker={**WORKER, **worker_changes}), source="<test>")
    trials = [
        {
            "trial_number": n,
            "params": {"x": 0.5, "optimizer": "adam"},
            "label": f"trial {n} · x=0.5",
            "round": 3,
            "study": "quadratic",
            "map_index": 0,
            "trial_timeout": spec.trial.execution_timeout,
        }
        for n in numbers
    ]
    (slot,) = batch_slots(trials)
    op = KubernetesPodOperator(
        task_id="evaluate", **trial_pod_settings(spec, env={}), **slot_pod_overrides(slot)
    )
    context: dict[str, Any] = {"ti": _TI(), "run_id": _TI.run_id, "task": op, "dag": None}
    op.render_template_fields(context)
    return op, spec, context


def test_pod_builder_sets_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    op, spec, context = _operator(monkeypatch)
    pod = op.build_pod_request_obj(context, dry_run=True)
    container = pod.spec.containers[0]
    assert container.image == "registry.example.com/ml/hpo-worker:1.2.3"
    assert container.image_pull_policy == "Always"
    assert container.command == ["python", "-m", "hpo_core.worker"]
    assert container.args == [
        "--study-name", "quadratic.manual__2026-11-22", "--trial-number", "17", "--attempt", "2",
    ]  # fmt: skip
    (env_from,) = container.env_from
    assert env_from.secret_ref.name == "hpo-trial-credentials"
    assert {e.name for e in container.env} == {"HOME", "PYTHONUNBUFFERED", "MPLCONFIGDIR"}
    assert container.resources.requests == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}
    assert container.resources.limits == {"cpu": "4", "memory": "6Gi", "nvidia.com/gpu": "1"}
    assert pod.spec.node_selector == {"pool": "gpu"}
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu" and pod.spec.tolerations[0].operator == "Exists"
    terms = pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    assert terms.node_selector_terms[0].match_expressions[0].values == ["a", "b"]
    assert pod.spec.service_account_name == "hpo-trial"
    assert pod.spec.automount_service_account_token is False
    assert pod.metadata.namespace == "hpo-trials"
    labels = pod.metadata.labels
    assert labels["hpo.dev/study"] == "quadratic"
    assert labels["hpo.dev/trial-number"] == "17"
    assert labels["hpo.dev/round"] == "3"
    assert labels["run_id"]  # the operator's own labels, used to find and reattach the pod
    annotations = pod.metadata.annotations
    assert annotations["hpo.dev/trial-label"] == "trial 17 · x=0.5"
    assert annotations["hpo.dev/dag-run"] == "manual__2026-11-22"
    assert json.loads(annotations["hpo.dev/params"]) == {"optimizer": "adam", "x": 0.5}
    psc = pod.spec.security_context
    assert psc.run_as_non_root is True and psc.run_as_user == 10001
    assert psc.seccomp_profile.type == "RuntimeDefault"
    csc = container.security_context
    assert csc.allow_privilege_escalation is False and csc.privileged is False
    assert csc.read_only_root_filesystem is True
    assert csc.capabilities.drop == ["ALL"]
    (scratch,) = pod.spec.volumes
    assert scratch.empty_dir is not None
    assert [(m.name, m.mount_path) for m in container.volume_mounts] == [("scratch", "/tmp")]
    assert pod.spec.active_deadline_seconds == spec.trial.execution_timeout + 120
    assert op.startup_timeout_seconds == 240
    assert op.on_finish_action.value == "delete_succeeded_pod"
    assert op.reattach_on_restart is True
    assert op.do_xcom_push is False


def test_a_slot_pod_evaluates_its_trials_in_order_within_a_deadline_for_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One pod per slot: every trial number in the arguments, the deadline scaled by the slot size."""
    op, spec, context = _operator(monkeypatch, numbers=(8, 9, 10))
    pod = op.build_pod_request_obj(context, dry_run=True)
    assert pod.spec.containers[0].args == [
        "--study-name", "quadratic.manual__2026-11-22",
        "--trial-number", "8", "--trial-number", "9", "--trial-number", "10", "--attempt", "2",
    ]  # fmt: skip
    assert pod.spec.active_deadline_seconds == 3 * spec.trial.execution_timeout + 120
    assert pod.metadata.labels["hpo.dev/trial-number"] == "8.9.10"
    annotations = pod.metadata.annotations
    assert annotations["hpo.dev/trial-label"] == "trials 8–10"
    assert json.loads(annotations["hpo.dev/trials"]) == [8, 9, 10]
    assert set(json.loads(annotations["hpo.dev/params"])) == {"8", "9", "10"}


def test_no_secret_in_the_pod_or_the_templated_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    op, _, context = _operator(monkeypatch)
    rendered = json.dumps(
        ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context, dry_run=True))
    )
    templated = json.dumps({f: repr(getattr(op, f)) for f in op.template_fields})
    for secret in SECRET_VALUES.values():
        assert secret not in rendered
        assert secret not in templated
    assert "s3cr3t" not in rendered + templated


def test_trial_pods_get_the_airflow_address_for_their_back_links_without_credentials() -> None:
    """A trial's MLflow run links back to its task instance: the pod gets the UI's address, never a
    password that the deployment's URL may carry."""
    spec = validate_mapping(study_mapping(worker=WORKER), source="<test>")
    env = {"AIRFLOW__API__BASE_URL": "https://admin:pw@airflow.example.com/"}
    values = {e.name: e.value for e in trial_pod_settings(spec, env=env)["env_vars"]}
    assert values["HPO_AIRFLOW_URL"] == "https://airflow.example.com"
    assert "HPO_AIRFLOW_URL" not in {e.name for e in trial_pod_settings(spec, env={})["env_vars"]}


def test_pod_template_file_from_the_spec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    template = tmp_path / "template.yaml"
    template.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: base\n  labels: {team: ml}\n"
        "spec:\n  priorityClassName: hpo-low\n  containers:\n  - name: base\n    image: placeholder\n"
    )
    op, _, context = _operator(monkeypatch, pod_template_file=str(template))
    pod = op.build_pod_request_obj(context, dry_run=True)
    assert pod.spec.priority_class_name == "hpo-low"
    assert pod.metadata.labels["team"] == "ml"
    assert pod.spec.containers[0].image == "registry.example.com/ml/hpo-worker:1.2.3"


def test_pool_and_concurrency_limits_reach_the_mapped_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPO_WORKER_BACKEND", raising=False)
    spec = validate_mapping(study_mapping(worker=WORKER), source="<test>")
    evaluate = build_study_dag(spec).get_task("round_1.evaluate")
    assert evaluate.operator_name == "KubernetesPodOperator"
    assert evaluate.partial_kwargs["pool"] == "hpo_trials"
    assert evaluate.partial_kwargs["max_active_tis_per_dagrun"] == 2
    assert evaluate.partial_kwargs["map_index_template"] == "{{ task.annotations['hpo.dev/trial-label'] }}"


def test_backend_is_overridable_per_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = validate_mapping(study_mapping(), source="<test>")  # worker.backend: local
    monkeypatch.setenv("HPO_WORKER_BACKEND", "kubernetes")
    assert build_study_dag(spec).get_task("round_1.evaluate").operator_name == "KubernetesPodOperator"
    monkeypatch.setenv("HPO_WORKER_BACKEND", "local")
    assert build_study_dag(spec).get_task("round_1.evaluate").operator_name != "KubernetesPodOperator"


# --- end to end through the emulator ---------------------------------------------------------


def _k8s_dag(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    k8s_emulator: KubernetesEmulator,
    k8s_connection: str,
    deployment: Deployment,
    worker_changes: dict[str, Any] | None = None,
    **changes: Any,
) -> Any:
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(ROOT / "dags" / "hpo_studies.py", folder)
    worker = {
        "backend": "kubernetes",
        "image": "hpo-worker:test",
        "startup_timeout": 8,
        **(worker_changes or {}),
    }
    write_study(folder / "studies", study_mapping(worker=worker, **changes))
    # dag.test() re-parses the configured DAG folder to serialize the DAG: point it here.
    use_dags_folder(monkeypatch, folder)
    monkeypatch.setenv("HPO_K8S_CONN_ID", k8s_connection)
    monkeypatch.setenv("HPO_K8S_NAMESPACE", k8s_emulator.namespace)
    k8s_emulator.create_secret("hpo-trial-credentials", deployment.worker_env())
    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}
    return bag.dags["hpo_quadratic"]


def _trials(deployment: Deployment) -> list[optuna.trial.FrozenTrial]:
    name = latest_study_name(deployment, "hpo_quadratic")
    study = optuna.load_study(study_name=name, storage=deployment.storage_url)
    return [t for t in study.get_trials() if TrialAttr.ROUND in t.user_attrs]


@pytest.mark.slow
def test_study_runs_through_real_pod_operator_tasks(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    airflow_db: Path,
    local_deployment: Deployment,
    k8s_emulator: KubernetesEmulator,
    k8s_connection: str,
) -> None:
    dag = _k8s_dag(tmp_path, monkeypatch, k8s_emulator, k8s_connection, local_deployment)
    dag_run = dag.test(run_conf={"n_trials": 4, "batch_size": 2})
    assert dag_run.state == "success"
    trials = _trials(local_deployment)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    created = k8s_emulator.api_calls("POST", "/pods")
    assert len(created) == 4  # one pod per trial, none run twice
    client = mlflow.MlflowClient(tracking_uri=local_deployment.tracking_uri)
    version = client.get_model_version_by_alias("quadratic", "challenger")
    best = min(trials, key=lambda t: t.value)
    assert version.tags["hpo.trial_number"] == str(best.number)
    model = mlflow.pyfunc.load_model("models:/quadratic@challenger")
    assert model.predict([[0.0]])[0] == pytest.approx(best.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "expected_reason"),
    [("oom", "OOMKilled"), ("image_pull", "ImagePullBackOff"), ("crash", "Error")],
)
def test_pod_faults_fail_the_trial_task_then_the_retry_succeeds(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    airflow_db: Path,
    local_deployment: Deployment,
    k8s_emulator: KubernetesEmulator,
    k8s_connection: str,
    capfd: pytest.CaptureFixture[str],
    fault: str,
    expected_reason: str,
) -> None:
    dag = _k8s_dag(
        tmp_path,
        monkeypatch,
        k8s_emulator,
        k8s_connection,
        local_deployment,
        budget={"n_trials": 1, "batch_size": 1, "max_rounds": 1},
        trial={"retries": 1, "retry_delay": 0, "execution_timeout": 120},
    )
    injected = k8s_emulator.inject_fault(fault, nth=1, times=1, after_log_lines=1, exit_code=3)
    dag_run = dag.test()
    assert dag_run.state == "success"
    assert len(injected.hits) == 1
    # Killed mid-trial (oom, crash): the retry takes the RUNNING trial over; a pod that never
    # started never touched it. Either way one trial, evaluated to the end once.
    (trial,) = _trials(local_deployment)
    assert trial.state == TrialState.COMPLETE
    assert TrialAttr.RETRY_OF not in trial.user_attrs
    out, err = capfd.readouterr()
    assert expected_reason in out + err
    tis = {
        (ti.map_index, ti.try_number): ti.state
        for ti in dag_run.get_task_instances()
        if "evaluate" in ti.task_id
    }
    assert max(try_number for _, try_number in tis) == 2  # the failed attempt was retried per the spec


@pytest.mark.slow
def test_pod_that_always_fails_leaves_a_failed_trial_and_a_red_task(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    airflow_db: Path,
    local_deployment: Deployment,
    k8s_emulator: KubernetesEmulator,
    k8s_connection: str,
) -> None:
    dag = _k8s_dag(
        tmp_path,
        monkeypatch,
        k8s_emulator,
        k8s_connection,
        local_deployment,
        budget={"n_trials": 2, "batch_size": 2, "max_rounds": 1},
        trial={"retries": 1, "retry_delay": 0, "execution_timeout": 120},
        stopping={"max_failed_fraction": 0.5},
    )
    k8s_emulator.inject_fault("oom", labels={"hpo.dev/trial-number": "0"}, times=None, after_seconds=2.0)
    dag_run = dag.test()
    assert dag_run.state == "success"  # one of two trials failed: within max_failed_fraction
    trials = {t.number: t for t in _trials(local_deployment)}
    assert trials[0].state == TrialState.FAIL
    assert "worker ended without reporting a result" in trials[0].user_attrs["fail_reason"]
    assert trials[1].state == TrialState.COMPLETE
    failed = [
        ti for ti in dag_run.get_task_instances() if ti.task_id == "round_1.evaluate" and ti.state == "failed"
    ]
    assert [ti.map_index for ti in failed] == [0]
    assert failed[0].rendered_map_index and failed[0].rendered_map_index.startswith("trial 0 · ")


@pytest.mark.slow
def test_a_slot_pod_closes_its_bad_trials_and_its_retry_pod_reevaluates_only_those(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    airflow_db: Path,
    local_deployment: Deployment,
    k8s_emulator: KubernetesEmulator,
    k8s_connection: str,
) -> None:
    """One pod holds a good, a raising, a hanging and a SIGKILLed trial: the pod fails because of
    the bad ones, each closed with its reason; the task's retry (a second pod) evaluates only them."""
    modes = ["ok", "flaky", "hang_once", "kill_once"]
    dag = _k8s_dag(
        tmp_path,
        monkeypatch,
        k8s_emulator,
        k8s_connection,
        local_deployment,
        worker_changes={"trials_per_task": 4},
        objective="tests.chaos_objectives:by_mode",
        search_space={"mode": {"type": "categorical", "choices": modes}},
        sampler={"type": "grid"},
        budget={"n_trials": 4, "batch_size": 4, "max_rounds": 1},
        trial={"retries": 1, "retry_delay": 0, "execution_timeout": 3},
        stopping={"max_failed_fraction": 0.8},
        mlflow={"experiment": "k8s_slots"},
    )
    dag_run = dag.test()
    assert dag_run.state == "success"
    created = k8s_emulator.api_calls("POST", "/pods")
    assert len(created) == 2  # one pod for the slot, one for its retry
    by_mode: dict[str, Any] = {}
    for trial in sorted(_trials(local_deployment), key=lambda t: t.number):
        key = trial.params["mode"] + ("+" if TrialAttr.RETRY_OF in trial.user_attrs else "")
        assert key not in by_mode
        by_mode[key] = trial
    assert sorted(by_mode) == sorted([*modes, "flaky+", "hang_once+", "kill_once+"])
    assert by_mode["ok"].state == TrialState.COMPLETE
    assert by_mode["flaky"].user_attrs["fail_reason"].startswith("RuntimeError: transient failure")
    assert by_mode["hang_once"].user_attrs["fail_reason"] == "timeout: the objective ran longer than 3s"
    assert (
        by_mode["kill_once"]
        .user_attrs["fail_reason"]
        .startswith("killed: the trial's process was killed by SIGKILL")
    )
    for mode in ("flaky", "hang_once", "kill_once"):
        replacement = by_mode[f"{mode}+"]
        assert replacement.state == TrialState.COMPLETE
        assert replacement.params == by_mode[mode].params
        assert replacement.user_attrs[TrialAttr.RETRY_OF] == by_mode[mode].number
    tis = [ti for ti in dag_run.get_task_instances() if ti.task_id == "round_1.evaluate"]
    assert [(ti.map_index, ti.state, ti.try_number) for ti in tis] == [(0, "success", 2)]
    numbers = sorted(by_mode[m].number for m in modes)
    assert tis[0].rendered_map_index == f"trials {numbers[0]}–{numbers[-1]}"
