"""The Kubernetes API emulator, proven with the real KubernetesPodOperator (non-deferrable).

The operator talks HTTP to the emulator through a kubeconfig, exactly as it would to a cluster; pods
run as local processes. The last test runs a DAG with ``dag.test()`` in a subprocess with its own
SQLite metadata database, so that the task runner, retries and the connection lookup are real too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.secret import Secret
from airflow.providers.cncf.kubernetes.utils.pod_manager import (
    PodLaunchFailedException,
    PodLaunchTimeoutException,
)
from airflow.providers.common.compat.sdk import AirflowException
from kubernetes import client as k8s_client
from kubernetes.client import models as k8s
from kubernetes.client.rest import ApiException

from tests.k8s_emulator import EmulatorError, KubernetesEmulator

Context = Callable[..., dict[str, Any]]
K8S_MANIFESTS = Path(__file__).resolve().parent.parent / "docker" / "k8s"


def _operator(emulator: KubernetesEmulator, task_id: str, code: str, **options: Any) -> KubernetesPodOperator:
    """A KubernetesPodOperator that runs ``python -c code`` on the emulator."""
    settings: dict[str, Any] = {
        "task_id": task_id,
        "name": task_id,
        "image": "hpo-worker:test",
        "cmds": ["python", "-c", code],
        "startup_timeout_seconds": 10,
        "startup_check_interval_seconds": 1,
        "log_events_on_failure": True,
        **emulator.kpo_kwargs(),
    }
    settings.update(options)
    return KubernetesPodOperator(**settings)


def _output(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def _api(emulator: KubernetesEmulator) -> k8s_client.CoreV1Api:
    configuration = k8s_client.Configuration()
    configuration.host = emulator.url
    configuration.api_key = {"authorization": f"Bearer {emulator.token}"}
    return k8s_client.CoreV1Api(k8s_client.ApiClient(configuration))


def _pod_manifest(name: str, code: str, **metadata: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, **metadata},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "base", "image": "hpo-worker:test", "command": ["python", "-c", code]}],
        },
    }


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return dict(pod["status"]["containerStatuses"][0]["state"]["terminated"])


# ------------------------------------------------------------------------- KubernetesPodOperator


def test_pod_succeeds_and_its_log_reaches_the_task_log(
    k8s_emulator: KubernetesEmulator, kpo_context: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    context = kpo_context(task_id="hello")
    _operator(k8s_emulator, "hello", "print('hello')").execute(context)

    assert "[base] hello" in _output(capsys)
    assert context["ti"].xcoms["pod_namespace"] == "hpo-trials"
    assert context["ti"].xcoms["pod_name"].startswith("hello-")
    assert len(k8s_emulator.api_calls("POST", "/pods")) == 1
    assert k8s_emulator.pods() == [], "on_finish_action=delete_pod (the default) deletes the pod"


def test_connection_of_type_kubernetes_reaches_the_emulator(
    k8s_emulator: KubernetesEmulator,
    k8s_connection: str,
    kpo_context: Context,
    capsys: pytest.CaptureFixture[str],
) -> None:
    operator = KubernetesPodOperator(
        task_id="via-connection",
        image="hpo-worker:test",
        cmds=["python", "-c", "print('through the connection')"],
        kubernetes_conn_id=k8s_connection,
        startup_check_interval_seconds=1,
    )
    operator.execute(kpo_context(task_id="via-connection"))

    assert "through the connection" in _output(capsys)
    assert k8s_emulator.api_calls("POST", "/namespaces/hpo-trials/pods"), (
        "namespace comes from the connection"
    )


def test_secret_values_reach_the_container_through_env_from_and_key_refs(
    k8s_emulator: KubernetesEmulator, kpo_context: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    k8s_emulator.create_secret(
        "hpo-trial-credentials",
        {"HPO_STORAGE_URL": "postgresql://optuna@db/hpo", "MLFLOW_TRACKING_URI": "http://mlflow:5000"},
    )
    code = (
        "import os\n"
        "for name in ('HPO_STORAGE_URL', 'TRACKING', 'AIRFLOW_SECRET_STYLE', 'LITERAL'):\n"
        "    print(name, '=', os.environ[name])\n"
    )
    operator = _operator(
        k8s_emulator,
        "secrets",
        code,
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="hpo-trial-credentials"))],
        env_vars=[
            k8s.V1EnvVar(
                name="TRACKING",
                value_from=k8s.V1EnvVarSource(
                    secret_key_ref=k8s.V1SecretKeySelector(
                        name="hpo-trial-credentials", key="MLFLOW_TRACKING_URI"
                    )
                ),
            ),
            k8s.V1EnvVar(name="LITERAL", value="tracking at $(TRACKING)"),
        ],
        secrets=[Secret("env", "AIRFLOW_SECRET_STYLE", "hpo-trial-credentials", "HPO_STORAGE_URL")],
    )
    operator.execute(kpo_context(task_id="secrets"))

    out = _output(capsys)
    assert "HPO_STORAGE_URL = postgresql://optuna@db/hpo" in out
    assert "TRACKING = http://mlflow:5000" in out
    assert "AIRFLOW_SECRET_STYLE = postgresql://optuna@db/hpo" in out
    assert "LITERAL = tracking at http://mlflow:5000" in out


def test_missing_secret_keeps_the_pod_pending_until_the_startup_timeout(
    k8s_emulator: KubernetesEmulator, kpo_context: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    operator = _operator(
        k8s_emulator,
        "no-secret",
        "print('must not run')",
        secrets=[Secret("env", None, "absent-credentials")],
        startup_timeout_seconds=2,
        on_finish_action="keep_pod",
    )
    started = time.monotonic()
    with pytest.raises(AirflowException, match="returned a failure") as raised:
        operator.execute(kpo_context(task_id="no-secret"))

    assert time.monotonic() - started >= 2
    assert isinstance(raised.value.__context__, PodLaunchTimeoutException), "cleanup raises from the timeout"
    assert "More than 2s" in str(raised.value.__context__)
    (pod,) = k8s_emulator.pods()
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting == {
        "reason": "CreateContainerConfigError",
        "message": 'secret "absent-credentials" not found',
    }
    assert 'Error: secret "absent-credentials" not found' in _output(capsys), "events are logged on failure"


def test_nonzero_exit_fails_the_task_and_names_the_failure(
    k8s_emulator: KubernetesEmulator, kpo_context: Context
) -> None:
    operator = _operator(
        k8s_emulator,
        "exit-3",
        "import sys; print('objective exploded: bad learning rate'); sys.exit(3)",
        termination_message_policy="FallbackToLogsOnError",
    )
    with pytest.raises(AirflowException, match="returned a failure") as raised:
        operator.execute(kpo_context(task_id="exit-3"))

    message = str(raised.value)
    assert "objective exploded: bad learning rate" in message, "FallbackToLogsOnError puts the log tail in it"
    assert "'exit_code': 3" in message
    assert "'reason': 'Error'" in message


def test_injected_oom_is_reported_as_exit_137_oomkilled(
    k8s_emulator: KubernetesEmulator, kpo_context: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    fault = k8s_emulator.inject_fault("oom", labels={"task_id": "trial-oom"}, after_log_lines=1)
    operator = _operator(
        k8s_emulator, "trial-oom", "import time; print('training', flush=True); time.sleep(30)"
    )
    with pytest.raises(AirflowException, match="returned a failure") as raised:
        operator.execute(kpo_context(task_id="trial-oom"))

    assert "'exit_code': 137" in str(raised.value)
    assert "'reason': 'OOMKilled'" in str(raised.value)
    out = _output(capsys)
    assert "[base] training" in out
    assert "reason='OOMKilled', exit_code=137" in out
    assert len(fault.hits) == 1 and fault.exhausted


def test_memory_limit_is_enforced_as_an_oom_kill(
    k8s_emulator: KubernetesEmulator, kpo_context: Context
) -> None:
    operator = _operator(
        k8s_emulator,
        "greedy",
        "import time; blob = b'x' * (256 << 20); time.sleep(30)",
        container_resources=k8s.V1ResourceRequirements(
            limits={"memory": "128Mi"}, requests={"memory": "64Mi"}
        ),
        on_finish_action="keep_pod",
    )
    with pytest.raises(AirflowException, match="'reason': 'OOMKilled'"):
        operator.execute(kpo_context(task_id="greedy"))

    (pod,) = k8s_emulator.pods()
    assert _terminated(pod)["exitCode"] == 137
    assert pod["status"]["qosClass"] == "Burstable"


def test_image_pull_rate_limit_fails_after_the_startup_timeout(
    k8s_emulator: KubernetesEmulator, kpo_context: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    k8s_emulator.inject_fault(
        "image_pull",
        labels={"task_id": "throttled"},
        message="429 Too Many Requests: you have reached your pull rate limit",
    )
    operator = _operator(k8s_emulator, "throttled", "print('never')", startup_timeout_seconds=2)
    started = time.monotonic()
    with pytest.raises(AirflowException, match="returned a failure") as raised:
        operator.execute(kpo_context(task_id="throttled"))

    assert time.monotonic() - started >= 2
    assert isinstance(raised.value.__context__, PodLaunchTimeoutException)
    assert "Pod took too long to start. More than 2s" in str(raised.value.__context__)
    assert "reason='ImagePullBackOff'" in _output(capsys) or "ErrImagePull" in _output(capsys)
    assert k8s_emulator.pods() == [], "the pending pod is deleted by on_finish_action=delete_pod"


def test_missing_image_fails_fast_with_the_pull_error(
    k8s_emulator: KubernetesEmulator, kpo_context: Context
) -> None:
    k8s_emulator.inject_fault("image_pull", nth=1)
    operator = _operator(
        k8s_emulator, "bad-image", "print('never')", image="registry.invalid/hpo-worker:nope"
    )
    started = time.monotonic()
    with pytest.raises(AirflowException, match="returned a failure") as raised:
        operator.execute(kpo_context(task_id="bad-image"))

    assert time.monotonic() - started < 8, "a permanent pull error must not wait for the startup timeout"
    assert isinstance(raised.value.__context__, PodLaunchFailedException)
    assert "Image cannot be pulled, unable to start: ErrImagePull" in str(raised.value.__context__)


def test_reattach_follows_the_running_pod_instead_of_creating_another(
    k8s_emulator: KubernetesEmulator, kpo_context: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    context = kpo_context(task_id="reattach", try_number=2)  # the worker of try 1 died; its pod lives on
    labels = {
        "dag_id": "k8s_emulator_test",
        "task_id": "reattach",
        "run_id": "manual__1",
        "kubernetes_pod_operator": "True",
        "try_number": "1",
    }
    code = (
        "import time; print('first attempt started', flush=True); time.sleep(1.5); print('attempt finished')"
    )
    k8s_emulator.create_pod(_pod_manifest("reattach-try-1", code, labels=labels))
    k8s_emulator.wait_for_pod("reattach-try-1", phase="Running")

    operator = _operator(
        k8s_emulator, "reattach", "print('second pod')", reattach_on_restart=True, on_finish_action="keep_pod"
    )
    operator.execute(context)

    assert k8s_emulator.api_calls("POST", "/pods") == [], "no second pod"
    assert context["ti"].xcoms["pod_name"] == "reattach-try-1"
    out = _output(capsys)
    assert "attempt finished" in out
    assert "second pod" not in out
    (pod,) = k8s_emulator.pods()
    assert pod["metadata"]["labels"]["already_checked"] == "True", "a later retry must not reattach again"


@pytest.mark.parametrize(
    ("action", "exit_code", "kept"),
    [
        ("delete_pod", 0, False),
        ("delete_pod", 1, False),
        ("keep_pod", 0, True),
        ("delete_succeeded_pod", 0, False),
        ("delete_succeeded_pod", 1, True),
    ],
)
def test_on_finish_action(
    k8s_emulator: KubernetesEmulator, kpo_context: Context, action: str, exit_code: int, kept: bool
) -> None:
    operator = _operator(k8s_emulator, "finish", f"raise SystemExit({exit_code})", on_finish_action=action)
    if exit_code:
        with pytest.raises(AirflowException, match="returned a failure"):
            operator.execute(kpo_context(task_id="finish"))
    else:
        operator.execute(kpo_context(task_id="finish"))

    pods = k8s_emulator.pods()
    assert len(pods) == (1 if kept else 0)
    if kept:
        assert pods[0]["metadata"]["labels"]["already_checked"] == "True"
        assert _terminated(pods[0])["exitCode"] == exit_code


def test_active_deadline_kills_the_pod(k8s_emulator: KubernetesEmulator, kpo_context: Context) -> None:
    operator = _operator(
        k8s_emulator,
        "slow",
        "import time; time.sleep(30)",
        active_deadline_seconds=1,
        on_finish_action="keep_pod",
    )
    with pytest.raises(AirflowException, match="'reason': 'DeadlineExceeded'"):
        operator.execute(kpo_context(task_id="slow"))

    (pod,) = k8s_emulator.pods()
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["reason"] == "DeadlineExceeded"
    assert _terminated(pod)["exitCode"] == 137


def test_restricted_namespace_refuses_a_bare_pod_and_admits_the_pod_template(
    k8s_emulator: KubernetesEmulator, kpo_context: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    """The namespace manifest enforces the restricted profile; the pod template example meets it."""
    namespace = yaml.safe_load((K8S_MANIFESTS / "namespace.yaml").read_text())
    k8s_emulator.label_namespace(namespace["metadata"]["labels"])

    with pytest.raises(ApiException) as refused:
        _operator(k8s_emulator, "bare", "print('bare')").execute(kpo_context(task_id="bare"))
    assert refused.value.status == 403
    message = json.loads(refused.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert 'allowPrivilegeEscalation != false (container "base"' in message

    k8s_emulator.create_secret("hpo-trial-credentials", {"HPO_STORAGE_URL": "sqlite:////tmp/optuna.db"})
    templated = _operator(
        k8s_emulator,
        "templated",
        "import os; print('home', os.environ['HOME'], 'storage', os.environ['HPO_STORAGE_URL'])",
        pod_template_file=str(K8S_MANIFESTS / "pod-template.example.yaml"),
    )
    templated.execute(kpo_context(task_id="templated"))
    assert "home /tmp storage sqlite:////tmp/optuna.db" in _output(capsys)


# ------------------------------------------------------------------------------ the API itself


def test_log_follow_streams_while_the_container_runs(k8s_emulator: KubernetesEmulator) -> None:
    code = "import time\nfor i in range(3):\n    print('step', i, flush=True)\n    time.sleep(0.4)"
    k8s_emulator.create_pod(_pod_manifest("follow", code))
    k8s_emulator.wait_for_pod("follow", phase="Running")
    response = _api(k8s_emulator).read_namespaced_pod_log(
        "follow", "hpo-trials", container="base", follow=True, timestamps=True, _preload_content=False
    )
    arrivals: list[tuple[str, str]] = []
    for chunk in response.stream(amt=None, decode_content=True):
        phase = k8s_emulator.pod("follow")["status"]["phase"]
        arrivals.append((chunk.decode().split(" ", 1)[1].strip(), phase))

    assert [line for line, _ in arrivals] == ["step 0", "step 1", "step 2"]
    assert arrivals[0][1] == "Running", "the first line arrives before the container exits"
    assert k8s_emulator.pod("follow")["status"]["phase"] == "Succeeded"
    tail = _api(k8s_emulator).read_namespaced_pod_log(
        "follow", "hpo-trials", tail_lines=1, _preload_content=False
    )
    assert tail.data == b"step 2\n"


def test_selectors_patches_and_errors_behave_like_the_api_server(k8s_emulator: KubernetesEmulator) -> None:
    api = _api(k8s_emulator)
    for name, labels in {
        "a": {"tier": "x", "try": "1"},
        "b": {"tier": "y"},
        "c": {"tier": "z", "checked": "True"},
    }.items():
        k8s_emulator.create_pod(_pod_manifest(name, "pass", labels=labels))

    def names(selector: str) -> list[str]:
        return sorted(
            p.metadata.name for p in api.list_namespaced_pod("hpo-trials", label_selector=selector).items
        )

    assert names("tier in (x,y)") == ["a", "b"]
    assert names("tier notin (x)") == ["b", "c"]
    assert names("checked!=True") == ["a", "b"], "!= matches pods without the label"
    assert names("try") == ["a"]
    assert names("!try,tier!=z") == ["b"]

    api.patch_namespaced_pod("a", "hpo-trials", {"metadata": {"labels": {"try": None, "new": "1"}}})
    assert api.read_namespaced_pod("a", "hpo-trials").metadata.labels == {"tier": "x", "new": "1"}
    api.patch_namespaced_pod(
        "a", "hpo-trials", [{"op": "add", "path": "/metadata/annotations", "value": {"note": "json-patch"}}]
    )
    assert api.read_namespaced_pod("a", "hpo-trials").metadata.annotations == {"note": "json-patch"}

    with pytest.raises(ApiException) as forbidden:
        api.patch_namespaced_pod("a", "hpo-trials", {"spec": {"restartPolicy": "Always"}})
    assert forbidden.value.status == 422
    with pytest.raises(ApiException) as invalid:
        api.create_namespaced_pod(
            "hpo-trials", _pod_manifest("bad", "pass", labels={"trial": "lr=0.1 depth=6"})
        )
    assert invalid.value.status == 422
    assert "a valid label must be 63 characters or less" in json.loads(invalid.value.body)["message"]
    with pytest.raises(ApiException) as missing_namespace:
        api.list_namespaced_pod("nowhere")
    assert missing_namespace.value.status == 404
    with pytest.raises(ApiException) as duplicate:
        api.create_namespaced_pod("hpo-trials", _pod_manifest("b", "pass"))
    assert duplicate.value.status == 409
    anonymous = k8s_client.Configuration()
    anonymous.host = k8s_emulator.url
    with pytest.raises(ApiException) as unauthorised:
        k8s_client.CoreV1Api(k8s_client.ApiClient(anonymous)).list_namespaced_pod("hpo-trials")
    assert unauthorised.value.status == 401


def test_secrets_config_maps_and_field_refs_over_the_api(k8s_emulator: KubernetesEmulator) -> None:
    api = _api(k8s_emulator)
    api.create_namespaced_secret(
        "hpo-trials", k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="creds"), string_data={"TOKEN": "s3cr3t"})
    )
    api.create_namespaced_config_map(
        "hpo-trials", k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="tuning"), data={"SEED": "7"})
    )
    assert api.read_namespaced_secret("creds", "hpo-trials").data == {"TOKEN": "czNjcjN0"}
    assert [s.metadata.name for s in api.list_namespaced_secret("hpo-trials").items] == ["creds"]

    pod = _pod_manifest(
        "env",
        "import os; print(os.environ['TOKEN'], os.environ['SEED'], os.environ['POD'], os.environ['NS'])",
    )
    pod["spec"]["containers"][0]["env"] = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}},
        {"name": "SEED", "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "SEED"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    k8s_emulator.create_pod(pod)
    assert k8s_emulator.wait_for_pod("env")["status"]["phase"] == "Succeeded"
    assert k8s_emulator.pod_logs("env") == "s3cr3t 7 env hpo-trials\n"


def test_events_and_scheduling_faults(k8s_emulator: KubernetesEmulator) -> None:
    gpu_pod = _pod_manifest("wants-gpu", "pass")
    gpu_pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    k8s_emulator.create_pod(gpu_pod)
    annotated = _pod_manifest("pull-fails", "pass", annotations={"emulator.test/fault": "image-pull"})
    k8s_emulator.create_pod(annotated)

    k8s_emulator.wait_for(
        lambda: any(e["reason"] == "BackOff" for e in k8s_emulator.events("pull-fails")),
        10,
        "image pull back-off",
    )
    events = _api(k8s_emulator).list_namespaced_event(
        "hpo-trials", field_selector="involvedObject.name=wants-gpu"
    )
    assert {(e.type, e.reason) for e in events.items} == {("Warning", "FailedScheduling")}
    assert "Insufficient nvidia.com/gpu" in events.items[0].message
    scheduled = k8s_emulator.pod("wants-gpu")["status"]["conditions"][0]
    assert (scheduled["type"], scheduled["status"], scheduled["reason"]) == (
        "PodScheduled",
        "False",
        "Unschedulable",
    )
    waiting = k8s_emulator.pod("pull-fails")["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ImagePullBackOff"
    with pytest.raises(ApiException) as not_started:
        _api(k8s_emulator).read_namespaced_pod_log("pull-fails", "hpo-trials")
    assert "is waiting to start: ImagePullBackOff" in json.loads(not_started.value.body)["message"]


def test_deleting_a_running_pod_kills_its_process_group(k8s_emulator: KubernetesEmulator) -> None:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    k8s_emulator.create_pod(_pod_manifest("group", code))
    k8s_emulator.wait_for_pod("group", phase="Running")
    k8s_emulator.wait_for(lambda: bool(k8s_emulator.pod_logs("group")), 10, "the child's pid in the log")
    child_pid = int(k8s_emulator.pod_logs("group").split()[0])
    (record,) = k8s_emulator.records()
    assert record.process is not None
    parent_pid = record.process.pid

    _api(k8s_emulator).delete_namespaced_pod("group", "hpo-trials", grace_period_seconds=1)
    k8s_emulator.wait_for_pod_deleted("group", timeout=10)

    for pid in (parent_pid, child_pid):
        with pytest.raises(ProcessLookupError):
            _signal_alive(pid)


def _signal_alive(pid: int) -> None:
    """Raise ProcessLookupError if ``pid`` is gone (a zombie child of ours counts as gone)."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists() or "\nState:\tZ" in status.read_text():
        raise ProcessLookupError(pid)
    os.kill(pid, 0)


def test_watch_streams_pod_changes(k8s_emulator: KubernetesEmulator) -> None:
    rv = k8s_emulator.cluster.resource_version()
    seen: list[tuple[str, str]] = []

    def watch() -> None:
        response = _api(k8s_emulator).list_namespaced_pod(
            "hpo-trials", watch=True, resource_version=str(rv), timeout_seconds=5, _preload_content=False
        )
        for line in response.stream(amt=None):
            for item in filter(None, line.split(b"\n")):
                event = json.loads(item)
                seen.append((event["type"], event["object"]["status"].get("phase", "")))
                if event["type"] == "DELETED":
                    return

    watcher = threading.Thread(target=watch)
    watcher.start()
    k8s_emulator.create_pod(_pod_manifest("watched", "pass"))
    k8s_emulator.wait_for_pod("watched")
    k8s_emulator.delete_pod("watched")
    watcher.join(timeout=10)

    assert seen[0] == ("ADDED", "Pending")
    assert ("MODIFIED", "Succeeded") in seen
    assert seen[-1][0] == "DELETED"


def test_unknown_entrypoint_is_a_start_error_and_registered_images_work(
    k8s_emulator: KubernetesEmulator,
) -> None:
    no_command = {
        "metadata": {"name": "no-entrypoint"},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "base", "image": "unknown:1"}]},
    }
    k8s_emulator.create_pod(no_command)
    failed = k8s_emulator.wait_for_pod("no-entrypoint")
    assert _terminated(failed)["reason"] == "StartError"
    assert "register_image" in _terminated(failed)["message"]

    k8s_emulator.register_image("hpo-worker:*", ["python", "-c", "import sys; print('args', sys.argv[1:])"])
    with_args = {
        "metadata": {"name": "entrypoint"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "base", "image": "hpo-worker:1", "args": ["--trial", "7"]}],
        },
    }
    k8s_emulator.create_pod(with_args)
    assert k8s_emulator.wait_for_pod("entrypoint")["status"]["phase"] == "Succeeded"
    assert k8s_emulator.pod_logs("entrypoint") == "args ['--trial', '7']\n"


def test_worker_image_runs_the_worker_module_like_its_entrypoint(k8s_emulator: KubernetesEmulator) -> None:
    """The fixture maps ``*hpo-worker*`` images to docker/worker/Dockerfile's ENTRYPOINT."""
    pod = {
        "metadata": {"name": "worker-help"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "base", "image": "registry.example.com/hpo-worker:0.1.0", "args": ["--help"]}
            ],
        },
    }
    k8s_emulator.create_pod(pod)
    assert k8s_emulator.wait_for_pod("worker-help")["status"]["phase"] == "Succeeded"
    assert "usage: python -m hpo_core.worker" in k8s_emulator.pod_logs("worker-help")


def test_close_kills_every_pod_process(tmp_path: Path) -> None:
    emulator = KubernetesEmulator(workdir=tmp_path).start()
    try:
        emulator.create_pod(_pod_manifest("sleeper", "import time; time.sleep(60)"))
        emulator.wait_for_pod("sleeper", phase="Running")
        (record,) = emulator.records()
        assert record.process is not None
        pid = record.process.pid
    finally:
        emulator.close()
    with pytest.raises(ProcessLookupError):
        _signal_alive(pid)
    with pytest.raises(EmulatorError, match="not running"):
        _ = emulator.url


# ------------------------------------------------------------------------- dag.test(), retries


_DAG_FILE = """
from datetime import datetime, timedelta

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG

with DAG("kpo_on_emulator", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:
    KubernetesPodOperator(
        task_id="evaluate",
        image="hpo-worker:test",
        cmds=["python", "-c", "import time; print('trial attempt', flush=True); time.sleep(1)"],
        kubernetes_conn_id="kubernetes_emulator",
        startup_timeout_seconds=20,
        startup_check_interval_seconds=1,
        on_finish_action="keep_pod",
        retries=1,
        retry_delay=timedelta(seconds=1),
    )

if __name__ == "__main__":
    print("DAG RUN STATE", dag.test().state)
"""


def test_dag_test_retries_a_trial_pod_that_was_oom_killed(
    k8s_emulator: KubernetesEmulator, tmp_path: Path
) -> None:
    """The first attempt is OOM-killed (one-shot fault); Airflow retries it and the second pod succeeds."""
    fault = k8s_emulator.inject_fault("oom", labels={"task_id": "evaluate"}, after_seconds=0.3, times=1)
    home = tmp_path / "airflow-home"
    (home / "dags").mkdir(parents=True)
    dag_file = home / "dags" / "kpo_on_emulator.py"
    dag_file.write_text(textwrap.dedent(_DAG_FILE))
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")
    }  # this run's own home only
    env = {
        **inherited,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW_CONN_KUBERNETES_EMULATOR": k8s_emulator.airflow_connection_json(),
    }
    airflow = str(Path(sys.executable).with_name("airflow"))
    migrate = subprocess.run(
        [airflow, "db", "migrate"], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    if migrate.returncode != 0:
        pytest.fail(f"airflow db migrate failed:\n{migrate.stdout[-3000:]}\n{migrate.stderr[-3000:]}")
    run = subprocess.run(
        [sys.executable, str(dag_file)], check=False, env=env, capture_output=True, text=True, timeout=180
    )
    output = run.stdout + run.stderr

    assert run.returncode == 0, output[-5000:]
    assert "DAG RUN STATE success" in output, output[-5000:]
    first, second = sorted(k8s_emulator.pods(), key=lambda p: p["metadata"]["labels"]["try_number"])
    assert first["metadata"]["labels"]["try_number"] == "1"
    assert _terminated(first) | {"startedAt": None, "finishedAt": None, "containerID": None} == {
        "exitCode": 137,
        "reason": "OOMKilled",
        "startedAt": None,
        "finishedAt": None,
        "containerID": None,
    }
    assert second["metadata"]["labels"]["try_number"] == "2"
    assert second["status"]["phase"] == "Succeeded"
    assert fault.hits == [first["metadata"]["name"]]
