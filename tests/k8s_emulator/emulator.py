"""The public face of the emulator: start/stop, kubeconfig, and a Python API for tests."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from ._cluster import Cluster, Fault, PodRecord
from ._http import ApiCall, ApiServer
from ._kubelet import Kubelet, KubeletConfig, _kill_group
from ._model import ApiError

__all__ = ["EmulatorError", "KubernetesEmulator"]

_TERMINAL = ("Succeeded", "Failed")


class EmulatorError(RuntimeError):
    """The emulator could not start, or a wait on it timed out."""


class KubernetesEmulator:
    """A local Kubernetes API server whose pods run as subprocesses of this machine.

    Args:
        namespace: the namespace tests use (created with ``default`` and ``kube-system``).
        host: loopback address to bind.
        port: TCP port, 0 for a free one.
        token: bearer token the API requires (written into the kubeconfig); None accepts anything.
        python: interpreter that replaces a leading ``python``/``python3`` in container commands.
        cwd: working directory of every container process (default: the current directory).
        workdir: where the kubeconfig and per-pod scratch dirs go (default: a temporary dir).
        extra_env: variables added to every container before the pod's own env.
        node_capacity: allocatable resources of the single node (``nvidia.com/gpu`` is 0 by default).
        max_grace_seconds: cap on a deleted pod's termination grace period.
        enforce_memory_limits: OOM-kill containers whose RSS exceeds ``limits.memory``.
        images: ``{glob: entrypoint}`` for containers that give no command (like an image ENTRYPOINT).
    """

    def __init__(
        self,
        *,
        namespace: str = "hpo-trials",
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = "emulator-token",
        python: str = sys.executable,
        cwd: str | Path | None = None,
        workdir: str | Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        node_capacity: Mapping[str, str] | None = None,
        max_grace_seconds: float = 5.0,
        enforce_memory_limits: bool = True,
        images: Mapping[str, list[str]] | None = None,
    ) -> None:
        self.namespace = namespace
        self.host = host
        self.token = token
        self._requested_port = port
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="k8s-emulator-"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig_path = self.workdir / "kubeconfig.yaml"
        self._images = dict(images or {})
        self.cluster = Cluster(namespaces=[namespace], scratch_root=self.workdir / "pods")
        config = KubeletConfig(
            python=python,
            cwd=Path(cwd) if cwd is not None else Path.cwd(),
            api_host=host,
            extra_env=dict(extra_env or {}),
            max_grace_seconds=max_grace_seconds,
            enforce_memory_limits=enforce_memory_limits,
        )
        if node_capacity is not None:
            config.node_capacity = {**config.node_capacity, **node_capacity}
        self.kubelet = Kubelet(self.cluster, config)
        self.cluster.on_pod_created = self.kubelet.start
        self._server: ApiServer | None = None
        self._thread: threading.Thread | None = None
        self._register_images()

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> KubernetesEmulator:
        """Bind the port, serve in a background thread and write the kubeconfig.

        Raises:
            EmulatorError: the server could not bind or did not answer.
        """
        try:
            self._server = ApiServer((self.host, self._requested_port), self.cluster, self.token)
        except OSError as e:
            raise EmulatorError(
                f"k8s emulator: cannot listen on {self.host}:{self._requested_port}: {e}"
            ) from e
        self.kubelet.config.api_port = self.port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="k8s-emulator-api", daemon=True
        )
        self._thread.start()
        self.write_kubeconfig(self.kubeconfig_path)
        return self

    def close(self) -> None:
        """Kill every pod process, stop the server and remove the temporary workdir."""
        self.cluster.closing = True
        with self.cluster.cond:
            self.cluster.cond.notify_all()
        self.kubelet.stop_all(self.cluster.reset())
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KubernetesEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def reset(self) -> None:
        """Kill all pods and forget every object, fault, image registration and recorded call."""
        self.kubelet.stop_all(self.cluster.reset())
        self._register_images()
        if self._server is not None:
            self._server.clear_recorded()

    def _register_images(self) -> None:
        with self.cluster.cond:
            self.cluster._images.clear()
        for pattern, entrypoint in self._images.items():
            self.cluster.register_image(pattern, entrypoint, [])

    # ----------------------------------------------------------------------------------- connection
    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None:
            raise EmulatorError("k8s emulator is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The API server URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    def kubeconfig(self) -> dict[str, Any]:
        """A kubeconfig document for this server (context ``k8s-emulator``, default namespace set)."""
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "k8s-emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "k8s-emulator", "user": user}],
            "contexts": [
                {
                    "name": "k8s-emulator",
                    "context": {
                        "cluster": "k8s-emulator",
                        "user": "k8s-emulator",
                        "namespace": self.namespace,
                    },
                }
            ],
            "current-context": "k8s-emulator",
            "preferences": {},
        }

    def write_kubeconfig(self, path: str | Path) -> Path:
        """Write :meth:`kubeconfig` to ``path`` and return it."""
        target = Path(path)
        target.write_text(yaml.safe_dump(self.kubeconfig(), sort_keys=False))
        return target

    def kpo_kwargs(self) -> dict[str, Any]:
        """KubernetesPodOperator keyword arguments that point it at this emulator."""
        return {
            "kubernetes_conn_id": None,
            "config_file": str(self.kubeconfig_path),
            "in_cluster": False,
            "namespace": self.namespace,
        }

    def airflow_connection_json(self) -> str:
        """This emulator as a kubernetes-type Airflow connection in JSON (for ``AIRFLOW_CONN_<ID>``)."""
        return json.dumps(
            {
                "conn_type": "kubernetes",
                "extra": {"kube_config_path": str(self.kubeconfig_path), "namespace": self.namespace},
            }
        )

    # -------------------------------------------------------------------------------------- objects
    def _ns(self, namespace: str | None) -> str:
        return namespace or self.namespace

    def pods(
        self, namespace: str | None = None, labels: Mapping[str, str] | str | None = None
    ) -> list[dict[str, Any]]:
        """Pods (as API JSON) in ``namespace`` matching ``labels`` (a dict or a selector string)."""
        selector = (
            labels
            if isinstance(labels, str) or labels is None
            else ",".join(f"{k}={v}" for k, v in labels.items())
        )
        return list(self.cluster.list_pods(self._ns(namespace), selector, None)["items"])

    def pod(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        """One pod as API JSON.

        Raises:
            KeyError: no such pod.
        """
        try:
            return self.cluster.get_pod(self._ns(namespace), name)
        except ApiError as e:
            raise KeyError(f"pod {self._ns(namespace)}/{name} not found") from e

    def pod_logs(self, name: str, namespace: str | None = None, container: str | None = None) -> str:
        """The log of a pod's container so far (stdout and stderr interleaved)."""
        return b"".join(
            self.cluster.log_stream(
                self._ns(namespace), name, container=container, follow=False, timestamps=False
            )
        ).decode("utf-8", "replace")

    def events(self, pod_name: str | None = None, namespace: str | None = None) -> list[dict[str, Any]]:
        """Events in the namespace, optionally only those about ``pod_name``."""
        selector = f"involvedObject.name={pod_name}" if pod_name else None
        return list(self.cluster.list_objects("events", self._ns(namespace), None, selector)["items"])

    def create_pod(self, manifest: Mapping[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create a pod directly (as ``kubectl apply`` would); it starts like any other."""
        ns = self._ns(namespace or (manifest.get("metadata") or {}).get("namespace"))
        return self.cluster.create_pod(ns, manifest)

    def delete_pod(self, name: str, namespace: str | None = None, grace_seconds: float = 0.0) -> None:
        """Delete a pod (grace 0: SIGKILL at once)."""
        self.cluster.delete_pod(self._ns(namespace), name, grace_seconds)

    def create_secret(
        self, name: str, data: Mapping[str, str], namespace: str | None = None, *, secret_type: str = "Opaque"
    ) -> dict[str, Any]:
        """Store an Opaque Secret from plain strings (encoded to base64 as the API does)."""
        body = {"metadata": {"name": name}, "type": secret_type, "stringData": dict(data)}
        return self.cluster.create_object("secrets", self._ns(namespace), body)

    def create_config_map(
        self, name: str, data: Mapping[str, str], namespace: str | None = None
    ) -> dict[str, Any]:
        """Store a ConfigMap."""
        return self.cluster.create_object(
            "configmaps", self._ns(namespace), {"metadata": {"name": name}, "data": dict(data)}
        )

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Create another namespace."""
        return self.cluster.create_namespace(name, labels)

    def label_namespace(
        self, labels: Mapping[str, str | None], namespace: str | None = None
    ) -> dict[str, Any]:
        """Set namespace labels (None removes one). ``pod-security.kubernetes.io/enforce: restricted``
        makes the emulator refuse pods that break that Pod Security Standard, like a real cluster."""
        return self.cluster.label_namespace(self._ns(namespace), labels)

    # --------------------------------------------------------------------------------------- faults
    def inject_fault(
        self,
        kind: str,
        *,
        nth: int | None = None,
        labels: Mapping[str, str] | None = None,
        name_prefix: str | None = None,
        times: int | None = 1,
        after_seconds: float = 0.0,
        exit_code: int = 1,
        message: str | None = None,
        after_log_lines: int = 0,
    ) -> Fault:
        """Make future pods fail: ``oom``, ``crash``, ``image_pull`` or ``unschedulable``.

        A fault targets the ``nth`` pod created since the last reset (1-based), and/or pods whose
        labels include ``labels``, and/or whose name starts with ``name_prefix``; it is used for
        ``times`` pods (None: every match). ``oom``/``crash`` kill the running container once it
        has run ``after_seconds`` and written ``after_log_lines`` lines (deterministic under load);
        ``crash`` reports ``exit_code``; ``message`` overrides the pull error or scheduling message.
        Returns the :class:`Fault`; its ``hits`` lists the pods it hit.
        """
        fault = Fault(
            kind=kind.replace("-", "_"),
            nth=nth,
            labels=dict(labels) if labels else None,
            name_prefix=name_prefix,
            times=times,
            after_seconds=after_seconds,
            exit_code=exit_code,
            message=message,
            after_log_lines=after_log_lines,
        )
        return self.cluster.add_fault(fault)

    def clear_faults(self) -> None:
        """Forget all injected faults."""
        self.cluster.clear_faults()

    def register_image(self, pattern: str, entrypoint: list[str], cmd: list[str] | None = None) -> None:
        """Declare the ENTRYPOINT (and CMD) of images matching ``pattern`` for pods that give no command."""
        self.cluster.register_image(pattern, entrypoint, cmd or [])

    def kill_container(
        self, name: str, namespace: str | None = None, sig: signal.Signals = signal.SIGKILL
    ) -> None:
        """Send ``sig`` to a running container's process group (e.g. to emulate a node failure)."""
        record = self.cluster.pod_record(self._ns(namespace), name)
        if record.process is not None:
            _kill_group(record.process, sig)

    # ---------------------------------------------------------------------------------------- waits
    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
        """Poll ``predicate`` until it is true.

        Raises:
            EmulatorError: it stayed false for ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise EmulatorError(f"k8s emulator: timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)

    def wait_for_pod(
        self,
        name: str,
        *,
        phase: str | tuple[str, ...] = _TERMINAL,
        namespace: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Wait until the pod reaches ``phase`` (default: Succeeded or Failed) and return it."""
        wanted = (phase,) if isinstance(phase, str) else phase
        found: dict[str, Any] = {}

        def reached() -> bool:
            try:
                found.update(self.pod(name, namespace))
            except KeyError:
                return False
            return found.get("status", {}).get("phase") in wanted

        self.wait_for(reached, timeout, f"pod {name} to reach phase {'/'.join(wanted)}")
        return found

    def wait_for_pod_deleted(self, name: str, namespace: str | None = None, timeout: float = 30.0) -> None:
        """Wait until the pod is gone from the API."""
        ns = self._ns(namespace)
        self.wait_for(
            lambda: not any(r.name == name and r.namespace == ns for r in self.cluster.pod_records()),
            timeout,
            f"pod {name} to be deleted",
        )

    # ----------------------------------------------------------------------------------- inspection
    def api_calls(self, method: str | None = None, path_contains: str | None = None) -> list[ApiCall]:
        """Requests served so far, filtered by method and a path substring."""
        if self._server is None:
            return []
        return [
            call
            for call in self._server.recorded()
            if (method is None or call.method == method)
            and (path_contains is None or path_contains in call.path)
        ]

    def records(self) -> list[PodRecord]:
        """The live pod records (process handles, logs) for white-box assertions."""
        return self.cluster.pod_records()
