"""The ``kubernetes`` worker backend: each slot of a round's batch is a KubernetesPodOperator pod.

:func:`trial_pod_settings` is the one pure function that builds a slot pod's settings from the
spec (and the deployment's defaults); :func:`slot_pod_overrides` adds what differs per slot (the
trials it evaluates in sequence, its deadline).
Both run at parse time: no cluster, database or network is touched. Credentials reach the pod only
through a Kubernetes Secret (``envFrom``); the arguments carry identifiers only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpo_core.deployment import ENV_AIRFLOW_URL, airflow_url
from hpo_core.errors import StudySpecError
from hpo_core.launch import worker_arguments
from hpo_core.spec import StudySpec

__all__ = [
    "DEFAULT_IMAGE",
    "DEFAULT_NAMESPACE",
    "SLOT_LABEL_ANNOTATION",
    "WORKER_COMMAND",
    "check",
    "map_slots",
    "slot_pod_overrides",
    "trial_pod_settings",
    "worker_image",
]

#: Environment overrides of the deployment (read at parse time; they hold no secret).
ENV_IMAGE = "HPO_WORKER_IMAGE"
ENV_NAMESPACE = "HPO_K8S_NAMESPACE"
ENV_CONN_ID = "HPO_K8S_CONN_ID"
ENV_CONFIG_FILE = "HPO_K8S_CONFIG_FILE"
ENV_IN_CLUSTER = "HPO_K8S_IN_CLUSTER"

DEFAULT_IMAGE = "hpo-worker:latest"
DEFAULT_NAMESPACE = "hpo-trials"
WORKER_COMMAND = ["python", "-m", "hpo_core.worker"]
#: Annotation naming the pod's trials (the mapped task's name in the grid).
SLOT_LABEL_ANNOTATION = "hpo.dev/trial-label"
#: Seconds the pod may run beyond the worker's own trial timeouts (start-up, MLflow upload).
POD_DEADLINE_GRACE = 120
#: The worker image's non-root user (docker/worker/Dockerfile).
WORKER_UID = 10001


def worker_image(spec: StudySpec, env: Mapping[str, str] | None = None) -> str:
    """The image the study's trial pods run (recorded with the study for the model's lineage)."""
    env = os.environ if env is None else env
    return spec.worker.image or env.get(ENV_IMAGE) or DEFAULT_IMAGE


def check(spec: StudySpec, *, source: str | Path) -> None:
    """Refuse pod settings that the pod builder would silently drop or fail on, naming the field.

    The operator turns ``tolerations`` and ``affinity`` into Kubernetes models and drops what it
    does not know (a misspelt key), and only warns about a missing pod template; here both are
    errors. Then one slot's pod is built (a dry run: no cluster), as the operator builds it.

    Raises:
        StudySpecError: an unknown key or wrong type, a missing template, or the builder's error.
    """
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    worker = spec.worker
    for i, toleration in enumerate(worker.tolerations):
        _check_model(toleration, "V1Toleration", f"{source}: worker.tolerations.{i}")
    if worker.affinity:
        _check_model(worker.affinity, "V1Affinity", f"{source}: worker.affinity")
    template = worker.pod_template_file
    if template and not Path(template).is_file():
        raise StudySpecError(
            f"{source}: worker.pod_template_file: {template!r} does not exist; give the path of a pod "
            "YAML file that Airflow's workers can read, or remove the key"
        )
    sample = {
        "trial_numbers": [0],
        "trials": [{"trial_number": 0, "params": {}}],
        "label": "trial 0",
        "round": 1,
        "study": spec.name,
        "trial_timeout": spec.trial.execution_timeout,
    }
    try:
        operator = KubernetesPodOperator(
            task_id="evaluate", **trial_pod_settings(spec), **slot_pod_overrides(sample)
        )
        operator.build_pod_request_obj(None, dry_run=True)
    except Exception as e:  # whatever the builder raises is this study's error
        raise StudySpecError(
            f"{source}: worker: the Kubernetes pod builder refused these settings: {type(e).__name__}: {e}"
        ) from e


def _check_model(value: Any, model: str, where: str) -> None:
    """``value`` must be the JSON form of the Kubernetes model ``model`` (camelCase keys, right types)."""
    from kubernetes.client import models as k8s

    cls = getattr(k8s, model)
    if not isinstance(value, Mapping):
        raise StudySpecError(f"{where}: {value!r} must be a mapping (a Kubernetes {model[2:]})")
    attrs = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in attrs:
            raise StudySpecError(
                f"{where}.{key}: unknown key {key!r}; allowed keys: {', '.join(sorted(attrs))}"
            )
        kind = cls.openapi_types[attrs[key]]
        inner = kind[5:-1] if kind.startswith("list[") else kind
        items = item if kind.startswith("list[") else [item]
        if kind.startswith("list[") and not isinstance(item, list):
            raise StudySpecError(f"{where}.{key}: {item!r} must be a list")
        for j, element in enumerate(items):
            path = f"{where}.{key}.{j}" if kind.startswith("list[") else f"{where}.{key}"
            if inner.startswith("V1"):
                _check_model(element, inner, path)
            elif inner == "str" and not isinstance(element, str):
                raise StudySpecError(f"{path}: {element!r} must be a string")
            elif inner == "int" and (isinstance(element, bool) or not isinstance(element, int)):
                raise StudySpecError(f"{path}: {element!r} must be an integer")


def map_slots(spec: StudySpec, *, common: dict[str, Any], start: Any, batch: Any) -> Any:
    """One mapped KubernetesPodOperator task (one pod) per slot of ``suggest``'s ``batch``, with the
    slot's "MLflow run" extra link (:class:`~hpo_airflow.backends.kubernetes_operator.SlotPodOperator`)."""
    from hpo_airflow.backends.kubernetes_operator import SlotPodOperator

    label = f"{{{{ task.annotations['{SLOT_LABEL_ANNOTATION}'] }}}}"
    return SlotPodOperator.partial(
        **common, map_index_template=label, **trial_pod_settings(spec)
    ).expand_kwargs(batch.map(slot_pod_overrides))


def trial_pod_settings(spec: StudySpec, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """KubernetesPodOperator arguments shared by every trial pod of the study.

    Args:
        spec: the study.
        env: deployment defaults (``HPO_WORKER_IMAGE``, ``HPO_K8S_*``); defaults to ``os.environ``.
    """
    from kubernetes.client import models as k8s

    env = os.environ if env is None else env
    worker = spec.worker
    res = worker.resources
    requests: dict[str, str] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, str] = {"memory": res.memory_limit or res.memory}
    if res.cpu_limit:
        limits["cpu"] = res.cpu_limit
    if res.gpu:
        requests["nvidia.com/gpu"] = str(res.gpu)
        limits["nvidia.com/gpu"] = str(res.gpu)
    settings: dict[str, Any] = {
        "name": f"hpo-{spec.name}".replace("_", "-").lower()[:50],
        "namespace": worker.namespace or env.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE,
        "image": worker_image(spec, env),
        "image_pull_policy": worker.image_pull_policy,
        "cmds": list(WORKER_COMMAND),
        "env_vars": [
            k8s.V1EnvVar(name="HOME", value="/tmp"),
            k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
            k8s.V1EnvVar(name="MPLCONFIGDIR", value="/tmp/matplotlib"),
        ],
        "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=worker.secret_name))],
        "container_resources": k8s.V1ResourceRequirements(requests=requests, limits=limits),
        "node_selector": dict(worker.node_selector),
        "tolerations": [dict(t) for t in worker.tolerations],
        "affinity": dict(worker.affinity),
        "service_account_name": worker.service_account or "hpo-trial",
        "automount_service_account_token": False,
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=WORKER_UID,
            run_as_group=WORKER_UID,
            fs_group=WORKER_UID,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        "container_security_context": k8s.V1SecurityContext(
            run_as_non_root=True,
            allow_privilege_escalation=False,
            privileged=False,
            read_only_root_filesystem=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
        "volumes": [
            k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="2Gi")),
        ],
        "volume_mounts": [k8s.V1VolumeMount(name="scratch", mount_path="/tmp")],
        "startup_timeout_seconds": worker.startup_timeout,
        "on_finish_action": worker.on_finish_action,
        "reattach_on_restart": True,
        "get_logs": True,
        "log_events_on_failure": True,
        "do_xcom_push": False,
        "pod_template_file": worker.pod_template_file,
    }
    airflow = airflow_url(env)
    if airflow:  # the trial's MLflow run links back to its task instance (no credential in the URL)
        settings["env_vars"].append(k8s.V1EnvVar(name=ENV_AIRFLOW_URL, value=airflow))
    if env.get(ENV_CONFIG_FILE):
        settings["config_file"] = env[ENV_CONFIG_FILE]
        settings["in_cluster"] = False
    elif env.get(ENV_IN_CLUSTER, "").lower() in ("1", "true", "yes"):
        settings["in_cluster"] = True
    if env.get(ENV_CONN_ID):
        settings["kubernetes_conn_id"] = env[ENV_CONN_ID]
    return settings


def slot_pod_overrides(slot: Mapping[str, Any]) -> dict[str, Any]:
    """What differs per slot pod: the worker arguments, its deadline, labels/annotations naming it.

    Pure: it reads only the slot entry. One pod evaluates the slot's trials in sequence, each under
    the trial timeout of the stored spec, so ``activeDeadlineSeconds`` is that timeout times the
    trials, plus a grace.
    The DAG run and the attempt are templates rendered at run time. KubernetesPodOperator adds the
    dag_id / task_id / run_id / map_index labels it uses to find and reattach pods.
    """

    def label_value(value: object) -> str:
        text = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(value)).strip("-_.")
        return text[:63].rstrip("-_.") or "none"

    trials = list(slot.get("trials") or [])
    numbers = [int(n) for n in slot["trial_numbers"]]
    timeout = int(slot.get("trial_timeout") or 3600)
    overrides: dict[str, Any] = {
        "arguments": worker_arguments(
            study_name="{{ ti.xcom_pull(task_ids='start')['study_name'] }}",
            trial_numbers=numbers,
            attempt="{{ ti.try_number }}",
            timeout=None,  # the worker takes the trial timeout from the stored spec
        ),
        "labels": {
            "app.kubernetes.io/name": "hpo-trial",
            "app.kubernetes.io/managed-by": "airflow",
            "hpo.dev/study": label_value(slot.get("study", "")),
            "hpo.dev/trial-number": label_value(".".join(str(n) for n in numbers)),
            "hpo.dev/round": label_value(slot.get("round", "")),
        },
        "annotations": {
            "hpo.dev/trial-label": str(slot["label"]),
            "hpo.dev/study": str(slot.get("study", "")),
            "hpo.dev/dag-run": "{{ run_id }}",
            "hpo.dev/trials": json.dumps(numbers),
            "hpo.dev/params": json.dumps(
                {str(t["trial_number"]): t.get("params") or {} for t in trials}
                if len(numbers) > 1
                else dict((trials[0].get("params") if trials else None) or {}),
                sort_keys=True,
                default=str,
            )[:4000],
        },
    }
    overrides["active_deadline_seconds"] = len(numbers) * timeout + POD_DEADLINE_GRACE
    return overrides
