"""The emulated kubelet: schedules pods on one node and runs their first container as a local process."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil

from ._cluster import Cluster, Fault, PodRecord
from ._model import parse_quantity, rfc3339, utcnow

__all__ = ["Kubelet", "KubeletConfig"]

log = logging.getLogger(__name__)

NODE_NAME = "emulator-node"
_PYTHON_RE = re.compile(r"^python(3(\.\d+)?)?$")
_ENV_REF_RE = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")
_ENV_NAME_RE = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_POLL_SECONDS = 0.05
_MEMORY_CHECK_SECONDS = 0.25
_RETRY_SECONDS = 0.5
_NO_VICTIMS = "1 No preemption victims found for incoming pod."
_TERMINATION_MESSAGE_LINES = 80
_TERMINATION_MESSAGE_BYTES = 2048


@dataclass
class KubeletConfig:
    """How pods become local processes.

    ``python`` replaces a leading ``python``/``python3``/``python3.X`` (also as an absolute path) in
    the command; ``cwd`` is the working directory of every container; ``passthrough_env`` names host
    variables copied into every container before the pod's own env; ``extra_env`` is added after them.
    """

    python: str
    cwd: Path
    api_host: str = "127.0.0.1"
    api_port: int = 0
    passthrough_env: tuple[str, ...] = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE")
    extra_env: dict[str, str] = field(default_factory=dict)
    node_capacity: dict[str, str] = field(
        default_factory=lambda: {
            "cpu": "64",
            "memory": "256Gi",
            "ephemeral-storage": "500Gi",
            "nvidia.com/gpu": "0",
            "pods": "110",
        }
    )
    max_grace_seconds: float = 5.0
    enforce_memory_limits: bool = True
    image_pull_backoff_after: float = 1.0


class _ConfigError(Exception):
    """The container's env refers to a missing Secret/ConfigMap or key (CreateContainerConfigError)."""


class _StartError(Exception):
    """The container process could not be started (exit 128, reason StartError)."""


@dataclass
class _Outcome:
    exit_code: int
    reason: str
    message: str | None = None
    pod_reason: str | None = None
    pod_message: str | None = None


def _outcome(kill_reason: str | None, fault: Fault | None, code: int) -> _Outcome:
    """How a supervised container ended: the reason it was killed for, else its own exit code."""
    natural = 128 - code if code < 0 else code
    if kill_reason == "oom":
        return _Outcome(137, "OOMKilled")
    if kill_reason == "crash":
        assert fault is not None
        return _Outcome(fault.exit_code, "Error", fault.message)
    if kill_reason == "deadline":
        return _Outcome(
            137,
            "DeadlineExceeded",
            pod_reason="DeadlineExceeded",
            pod_message="Pod was active on the node longer than the specified deadline",
        )
    return _Outcome(natural, "Completed" if natural == 0 else "Error")


def _pod_requests(spec: Mapping[str, Any]) -> dict[str, Decimal]:
    """Effective requests: the sum over containers, or the largest init container if bigger."""

    def of(container: Mapping[str, Any]) -> dict[str, Decimal]:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        return {name: parse_quantity(value) for name, value in merged.items()}

    total: dict[str, Decimal] = {}
    for container in spec.get("containers") or []:
        for name, value in of(container).items():
            total[name] = total.get(name, Decimal(0)) + value
    for container in spec.get("initContainers") or []:
        for name, value in of(container).items():
            total[name] = max(total.get(name, Decimal(0)), value)
    total["pods"] = Decimal(1)
    return total


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Expand ``$(VAR)`` references the way the kubelet does (``$$`` escapes, unknown stays)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _ENV_REF_RE.sub(replace, text)


def _rss(process: subprocess.Popen[bytes]) -> int:
    try:
        root = psutil.Process(process.pid)
        members = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def _kill_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


class Kubelet:
    """Runs each created pod in a thread: schedule, pull (or fault), resolve env, start, supervise."""

    def __init__(self, cluster: Cluster, config: KubeletConfig) -> None:
        self.cluster = cluster
        self.config = config
        self._threads: list[threading.Thread] = []

    def start(self, record: PodRecord) -> None:
        """Begin the lifecycle of a newly created pod."""
        thread = threading.Thread(
            target=self._run, args=(record,), name=f"kubelet-{record.name}", daemon=True
        )
        record.thread = thread
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def stop_all(self, records: list[PodRecord], timeout: float = 10.0) -> None:
        """Kill every container of ``records`` and wait for their threads."""
        for record in records:
            process = record.process
            if process is not None and process.poll() is None:
                _kill_group(process, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        for record in records:
            if record.thread is not None:
                record.thread.join(timeout=max(deadline - time.monotonic(), 0.1))

    # ------------------------------------------------------------------------------------- lifecycle
    def _run(self, record: PodRecord) -> None:
        try:
            self._lifecycle(record)
        except Exception as e:  # an emulator bug must show up in the pod, not vanish in a thread
            log.exception("k8s emulator: pod %s/%s crashed the kubelet", record.namespace, record.name)
            text = f"emulator internal error: {e!r}\n{traceback.format_exc()}"
            self.cluster.mutate_pod(
                record, lambda pod: pod["status"].update(phase="Failed", reason="EmulatorError", message=text)
            )
        finally:
            process = record.process
            if process is not None and process.poll() is None:
                _kill_group(process, signal.SIGKILL)

    def _lifecycle(self, record: PodRecord) -> None:
        if not self._schedule(record):
            return
        spec = record.obj["spec"]
        fault = record.fault
        if fault is not None and fault.kind == "image_pull":
            self._image_pull_backoff(record, spec["containers"][0]["image"])
            return
        for index, container in enumerate(spec.get("initContainers") or []):
            outcome = self._run_container(record, container, init_index=index)
            if outcome is None:
                return
            if outcome.exit_code != 0:
                self._finish(record, outcome, failed_init=container["name"])
                return
        outcome = self._run_container(record, spec["containers"][0], init_index=None)
        if outcome is not None:
            self._finish(record, outcome, failed_init=None)

    def _wait(self, record: PodRecord, seconds: float) -> bool:
        """Sleep up to ``seconds`` unless the pod goes away; return whether it still exists."""
        with self.cluster.cond:
            if not (record.gone or self.cluster.closing):
                self.cluster.cond.wait(timeout=seconds)
            return not (record.gone or self.cluster.closing)

    def _schedule(self, record: PodRecord) -> bool:
        fault = record.fault
        capacity = {k: parse_quantity(v) for k, v in self.config.node_capacity.items()}
        requests = _pod_requests(record.obj["spec"])
        while True:
            with self.cluster.cond:
                if record.gone or self.cluster.closing:
                    return False
                reason: str | None
                if fault is not None and fault.kind == "unschedulable":
                    reason = (
                        fault.message
                        or "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
                    )
                else:
                    reason = self._insufficient(record, requests, capacity)
                if reason is None:
                    self.cluster.mutate_pod(record, self._mark_scheduled)
                    record.started_monotonic = time.monotonic()
                    self.cluster.record_event(
                        record,
                        "Normal",
                        "Scheduled",
                        f"Successfully assigned {record.namespace}/{record.name} to {NODE_NAME}",
                        component="default-scheduler",
                    )
                    return True
                message = f"{reason} preemption: 0/1 nodes are available: {_NO_VICTIMS}"
                self.cluster.mutate_pod(record, functools.partial(self._mark_unschedulable, message=message))
                self.cluster.record_event(
                    record, "Warning", "FailedScheduling", message, component="default-scheduler"
                )
            if not self._wait(record, _RETRY_SECONDS):
                return False

    def _insufficient(
        self, record: PodRecord, requests: dict[str, Decimal], capacity: dict[str, Decimal]
    ) -> str | None:
        used: dict[str, Decimal] = {}
        for other in self.cluster.pod_records():
            phase = other.obj["status"].get("phase")
            if other is record or not other.obj["spec"].get("nodeName") or phase in ("Succeeded", "Failed"):
                continue
            for name, value in _pod_requests(other.obj["spec"]).items():
                used[name] = used.get(name, Decimal(0)) + value
        short = sorted(
            name
            for name, value in requests.items()
            if value > 0 and value + used.get(name, Decimal(0)) > capacity.get(name, Decimal(0))
        )
        if not short:
            return None
        return "0/1 nodes are available: " + ", ".join(f"1 Insufficient {name}" for name in short) + "."

    @staticmethod
    def _mark_unschedulable(pod: dict[str, Any], message: str) -> None:
        pod["status"]["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastProbeTime": None,
                "lastTransitionTime": rfc3339(utcnow()),
            }
        ]

    def _mark_scheduled(self, pod: dict[str, Any]) -> None:
        now = rfc3339(utcnow())
        spec, status = pod["spec"], pod["status"]
        spec["nodeName"] = NODE_NAME
        has_init = bool(spec.get("initContainers"))
        status.update(
            phase="Pending",
            hostIP="127.0.0.1",
            hostIPs=[{"ip": "127.0.0.1"}],
            startTime=now,
            conditions=[
                _condition("PodReadyToStartContainers", "True", now),
                _condition(
                    "Initialized",
                    "False" if has_init else "True",
                    now,
                    "ContainersNotInitialized" if has_init else None,
                ),
                _condition("Ready", "False", now, "ContainersNotReady"),
                _condition("ContainersReady", "False", now, "ContainersNotReady"),
                _condition("PodScheduled", "True", now),
            ],
            containerStatuses=[
                _container_status(
                    c, {"waiting": {"reason": "PodInitializing" if has_init else "ContainerCreating"}}
                )
                for c in spec["containers"]
            ],
        )
        if has_init:
            status["initContainerStatuses"] = [
                _container_status(c, {"waiting": {"reason": "PodInitializing"}})
                for c in spec["initContainers"]
            ]

    def _image_pull_backoff(self, record: PodRecord, image: str) -> None:
        assert record.fault is not None
        message = record.fault.message or (
            f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": '
            f'failed to resolve reference "{image}": not found'
        )
        name = record.obj["spec"]["containers"][0]["name"]
        self.cluster.record_event(record, "Normal", "Pulling", f'Pulling image "{image}"', container=name)
        self._set_waiting(record, name, "ErrImagePull", message)
        self.cluster.record_event(
            record, "Warning", "Failed", f'Failed to pull image "{image}": {message}', container=name
        )
        self.cluster.record_event(record, "Warning", "Failed", "Error: ErrImagePull", container=name)
        if not self._wait(record, self.config.image_pull_backoff_after):
            return
        self._set_waiting(
            record, name, "ImagePullBackOff", f'Back-off pulling image "{image}": ErrImagePull: {message}'
        )
        while True:
            self.cluster.record_event(
                record, "Normal", "BackOff", f'Back-off pulling image "{image}"', container=name
            )
            self.cluster.record_event(record, "Warning", "Failed", "Error: ImagePullBackOff", container=name)
            if not self._wait(record, 5.0):
                return

    def _set_waiting(self, record: PodRecord, container: str, reason: str, message: str) -> None:
        def change(pod: dict[str, Any]) -> None:
            for group in ("initContainerStatuses", "containerStatuses"):
                for entry in pod["status"].get(group) or []:
                    if entry["name"] == container:
                        entry["state"] = {"waiting": {"reason": reason, "message": message}}

        self.cluster.mutate_pod(record, change)

    # -------------------------------------------------------------------------------- one container
    def _resolve_env(self, record: PodRecord, container: Mapping[str, Any]) -> dict[str, str]:
        namespace = record.namespace
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix") or ""
            if ref := source.get("secretRef"):
                data = self.cluster.secret_data(namespace, ref["name"])
                what = "secret"
            elif ref := source.get("configMapRef"):
                data = self.cluster.config_map_data(namespace, ref["name"])
                what = "configmap"
            else:
                continue
            if data is None:
                if ref.get("optional"):
                    continue
                raise _ConfigError(f'{what} "{ref["name"]}" not found')
            env.update({prefix + k: v for k, v in data.items() if _ENV_NAME_RE.match(prefix + k)})
        for item in container.get("env") or []:
            source = item.get("valueFrom")
            if source:
                value = self._env_source(record, source)
                if value is None:
                    continue
                env[item["name"]] = value
            else:
                env[item["name"]] = _expand(str(item.get("value") or ""), env)
        return env

    def _env_source(self, record: PodRecord, source: Mapping[str, Any]) -> str | None:
        namespace = record.namespace
        if ref := source.get("secretKeyRef"):
            data = self.cluster.secret_data(namespace, ref["name"])
            kind, label = "Secret", "secret"
        elif ref := source.get("configMapKeyRef"):
            data = self.cluster.config_map_data(namespace, ref["name"])
            kind, label = "ConfigMap", "configmap"
        elif ref := source.get("fieldRef"):
            return self._field_ref(record, ref["fieldPath"])
        elif ref := source.get("resourceFieldRef"):
            return self._resource_field_ref(record, ref)
        else:
            raise _ConfigError(f"unsupported env source {sorted(source)}")
        if data is None:
            if ref.get("optional"):
                return None
            raise _ConfigError(f'{label} "{ref["name"]}" not found')
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise _ConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
        return data[ref["key"]]

    @staticmethod
    def _field_ref(record: PodRecord, path: str) -> str:
        pod = record.obj
        meta, spec, status = pod["metadata"], pod["spec"], pod["status"]
        if match := re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path):
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        simple = {
            "metadata.name": meta.get("name"),
            "metadata.namespace": meta.get("namespace"),
            "metadata.uid": meta.get("uid"),
            "spec.nodeName": spec.get("nodeName"),
            "spec.serviceAccountName": spec.get("serviceAccountName"),
            "status.hostIP": status.get("hostIP", "127.0.0.1"),
            "status.podIP": "127.0.0.1",
            "status.podIPs": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
        }
        if path not in simple:
            raise _ConfigError(f"unsupported fieldRef {path!r}")
        return str(simple[path] or "")

    def _resource_field_ref(self, record: PodRecord, ref: Mapping[str, Any]) -> str:
        containers = record.obj["spec"]["containers"]
        name = ref.get("containerName") or containers[0]["name"]
        container = next((c for c in containers if c["name"] == name), containers[0])
        kind, _, resource = str(ref["resource"]).partition(".")
        resources = container.get("resources") or {}
        value = (resources.get(kind) or {}).get(resource)
        if value is None:  # unset limits default to node allocatable; unset requests to 0
            value = self.config.node_capacity.get(resource, "0") if kind == "limits" else "0"
        divisor = parse_quantity(ref.get("divisor") or "1")
        result = -(-parse_quantity(value) // divisor)  # ceiling, as the kubelet rounds up
        return str(int(result))

    def _argv(self, container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
        command = list(container.get("command") or [])
        args = list(container.get("args") or [])
        if not command:
            image_config = self.cluster.image_config(container["image"])
            if image_config is None:
                raise _StartError(
                    f'container "{container["name"]}" has no command and the emulator knows no ENTRYPOINT '
                    f'for image "{container["image"]}": set cmds= on the operator '
                    "or call KubernetesEmulator.register_image()"
                )
            command, default_args = image_config
            args = args or default_args
        argv = [_expand(str(part), env) for part in command + args]
        if not argv:
            raise _StartError(f'container "{container["name"]}": empty command')
        if _PYTHON_RE.match(os.path.basename(argv[0])):
            argv[0] = self.config.python
        return argv

    def _base_env(self, record: PodRecord) -> dict[str, str]:
        home = record.scratch / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: os.environ[k] for k in self.config.passthrough_env if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        port = str(self.config.api_port)
        env.update(
            HOME=str(home),
            HOSTNAME=record.name,
            KUBERNETES_SERVICE_HOST=self.config.api_host,
            KUBERNETES_SERVICE_PORT=port,
            KUBERNETES_PORT=f"tcp://{self.config.api_host}:{port}",
        )
        env.update(self.config.extra_env)
        return env

    def _run_container(
        self, record: PodRecord, container: Mapping[str, Any], init_index: int | None
    ) -> _Outcome | None:
        """Run one container to the end; None if the pod disappeared before it finished starting."""
        name = container["name"]
        while True:
            try:
                env = {**self._base_env(record), **self._resolve_env(record, container)}
                break
            except _ConfigError as e:
                self._set_waiting(record, name, "CreateContainerConfigError", str(e))
                self.cluster.record_event(record, "Warning", "Failed", f"Error: {e}", container=name)
                if not self._wait(record, _RETRY_SECONDS):
                    return None
        self.cluster.record_event(
            record,
            "Normal",
            "Pulled",
            f'Container image "{container["image"]}" already present on machine',
            container=name,
        )
        try:
            argv = self._argv(container, env)
            self.cluster.record_event(
                record, "Normal", "Created", f"Created container {name}", container=name
            )
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=self.config.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except (_StartError, OSError) as e:
            message = (
                str(e) if isinstance(e, _StartError) else f"failed to start container process: exec: {e}"
            )
            self.cluster.record_event(record, "Warning", "Failed", f"Error: {message}", container=name)
            outcome = _Outcome(exit_code=128, reason="StartError", message=message)
            now = rfc3339(utcnow())
            self._terminate(record, name, init_index, outcome, now)
            return outcome
        started = rfc3339(utcnow())
        with self.cluster.cond:
            record.process = process
            alive = self.cluster.mutate_pod(
                record, lambda pod: self._mark_running(pod, name, started, init_index)
            )
        if not alive:
            _kill_group(process, signal.SIGKILL)
            process.wait()
            return None
        self.cluster.record_event(record, "Normal", "Started", f"Started container {name}", container=name)
        reader = threading.Thread(target=self._read_output, args=(record, name, process), daemon=True)
        reader.start()
        outcome = self._supervise(record, container, process)
        _kill_group(process, signal.SIGKILL)  # like a container's PID 1 exiting: the rest of the group dies
        reader.join(timeout=10)
        if (
            outcome.message is None
            and container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
            and outcome.exit_code
        ):
            with self.cluster.cond:
                tail = b"".join(line for _, line in record.logs[name][-_TERMINATION_MESSAGE_LINES:])
            outcome.message = tail[-_TERMINATION_MESSAGE_BYTES:].decode("utf-8", "replace") or None
        self._terminate(record, name, init_index, outcome, started)
        return outcome

    def _terminate(
        self, record: PodRecord, name: str, init_index: int | None, outcome: _Outcome, started: str
    ) -> None:
        finished = rfc3339(utcnow())
        group = "initContainerStatuses" if init_index is not None else "containerStatuses"

        def change(pod: dict[str, Any]) -> None:
            for entry in pod["status"].get(group) or []:
                if entry["name"] == name:
                    terminated = {
                        "exitCode": outcome.exit_code,
                        "reason": outcome.reason,
                        "startedAt": started,
                        "finishedAt": finished,
                    }
                    if entry.get("containerID"):
                        terminated["containerID"] = entry["containerID"]
                    if outcome.message:
                        terminated["message"] = outcome.message
                    entry.update(state={"terminated": terminated}, ready=False, started=False)

        with self.cluster.cond:
            self.cluster.mutate_pod(record, change)
            record.logs_closed.add(name)
            self.cluster.cond.notify_all()

    def _mark_running(self, pod: dict[str, Any], name: str, started: str, init_index: int | None) -> None:
        status = pod["status"]
        container_id = f"emulator://{uuid.uuid4().hex}"
        if init_index is not None:
            for entry in status.get("initContainerStatuses") or []:
                if entry["name"] == name:
                    entry.update(
                        state={"running": {"startedAt": started}}, started=True, containerID=container_id
                    )
            return
        now = rfc3339(utcnow())
        status.update(phase="Running", podIP="127.0.0.1", podIPs=[{"ip": "127.0.0.1"}])
        for entry in status.get("containerStatuses") or []:
            entry.update(
                state={"running": {"startedAt": started}}, ready=True, started=True, containerID=container_id
            )
        for condition in status.get("conditions") or []:
            if condition["type"] in ("Initialized", "Ready", "ContainersReady"):
                condition.update(status="True", lastTransitionTime=now)
                condition.pop("reason", None)

    def _read_output(self, record: PodRecord, container: str, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        with process.stdout:
            for raw in iter(process.stdout.readline, b""):
                line = raw if raw.endswith(b"\n") else raw + b"\n"
                with self.cluster.cond:
                    record.logs[container].append((utcnow(), line))
                    self.cluster.cond.notify_all()

    def _supervise(
        self, record: PodRecord, container: Mapping[str, Any], process: subprocess.Popen[bytes]
    ) -> _Outcome:
        fault = record.fault if record.fault is not None and record.fault.kind in ("oom", "crash") else None
        deadline = record.obj["spec"].get("activeDeadlineSeconds")
        limit_text = ((container.get("resources") or {}).get("limits") or {}).get("memory")
        memory_limit = (
            parse_quantity(limit_text) if limit_text and self.config.enforce_memory_limits else None
        )
        started = time.monotonic()
        next_memory_check = started
        kill_reason: str | None = None
        term_sent_at = 0.0
        grace = 0.0
        while True:
            try:
                process.wait(timeout=_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if kill_reason is None:
                deadline = record.obj["spec"].get("activeDeadlineSeconds")  # may be patched while running
                pod_started = record.started_monotonic or started
                if (
                    fault is not None
                    and now - started >= fault.after_seconds
                    and len(record.logs[container["name"]]) >= fault.after_log_lines
                ):
                    kill_reason = fault.kind
                elif deadline is not None and now - pod_started >= float(deadline):
                    kill_reason = "deadline"
                elif memory_limit is not None and now >= next_memory_check:
                    next_memory_check = now + _MEMORY_CHECK_SECONDS
                    if _rss(process) > memory_limit:
                        kill_reason = "oom"
                elif record.delete_grace is not None:
                    kill_reason = "deleted"
                    grace = min(record.delete_grace, self.config.max_grace_seconds)
                    term_sent_at = now
                    _kill_group(process, signal.SIGTERM if grace > 0 else signal.SIGKILL)
                if kill_reason is not None and kill_reason != "deleted":
                    _kill_group(process, signal.SIGKILL)
            elif kill_reason == "deleted" and now - term_sent_at >= grace:
                _kill_group(process, signal.SIGKILL)
        return _outcome(kill_reason, fault, process.returncode)

    # ---------------------------------------------------------------------------------------- finish
    def _finish(self, record: PodRecord, outcome: _Outcome, failed_init: str | None) -> None:
        now = rfc3339(utcnow())
        phase = "Succeeded" if outcome.exit_code == 0 else "Failed"

        def change(pod: dict[str, Any]) -> None:
            status = pod["status"]
            status["phase"] = phase
            if outcome.pod_reason:
                status.update(reason=outcome.pod_reason, message=outcome.pod_message)
            main = pod["spec"]["containers"][0]["name"]
            for entry in status.get("containerStatuses") or []:
                state = entry.get("state") or {}
                if entry["name"] == main or "terminated" in state:
                    continue
                if "running" in state:  # idle sidecars stop with the main container
                    started = state["running"].get("startedAt", now)
                    entry.update(
                        state={
                            "terminated": {
                                "exitCode": 0,
                                "reason": "Completed",
                                "startedAt": started,
                                "finishedAt": now,
                            }
                        },
                        ready=False,
                        started=False,
                    )
            reason = "PodCompleted" if phase == "Succeeded" else "PodFailed"
            for condition in status.get("conditions") or []:
                if condition["type"] in ("Ready", "ContainersReady"):
                    condition.update(status="False", reason=reason, lastTransitionTime=now)
                if condition["type"] == "Initialized" and failed_init is not None:
                    condition.update(status="False", reason="ContainersNotInitialized")

        with self.cluster.cond:
            self.cluster.mutate_pod(record, change)
            record.logs_closed.update(record.logs)
            self.cluster.cond.notify_all()
        if outcome.pod_reason == "DeadlineExceeded":
            self.cluster.record_event(
                record, "Normal", "DeadlineExceeded", outcome.pod_message or "", component="kubelet"
            )
        if record.delete_grace is not None:
            self.cluster.remove_pod(record)


def _condition(kind: str, status: str, now: str, reason: str | None = None) -> dict[str, Any]:
    condition: dict[str, Any] = {
        "type": kind,
        "status": status,
        "lastProbeTime": None,
        "lastTransitionTime": now,
    }
    if reason:
        condition["reason"] = reason
    return condition


def _container_status(container: Mapping[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "started": False,
        "state": state,
        "lastState": {},
    }
