"""In-memory API objects of the emulated cluster: pods, secrets, config maps, events, namespaces.

All state lives behind one condition variable; the HTTP handler, the kubelet threads and the Python
API of :class:`~tests.k8s_emulator.KubernetesEmulator` call the methods here.
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import json
import secrets as _random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._model import ApiError, pod_security_violations, rfc3339, rfc3339_nano, utcnow, validate_pod
from ._patch import PatchError, apply_json_patch, apply_merge_patch, apply_strategic_merge_patch
from ._selectors import (
    FieldRequirement,
    LabelRequirement,
    SelectorError,
    match_fields,
    match_labels,
    parse_field_selector,
    parse_label_selector,
)

if TYPE_CHECKING:
    import subprocess

__all__ = ["FAULT_ANNOTATION", "FAULT_KINDS", "Cluster", "Fault", "PodRecord"]

FAULT_ANNOTATION = "emulator.test/fault"
FAULT_KINDS = ("oom", "crash", "image_pull", "unschedulable")

_KINDS: dict[str, str] = {  # resource (URL plural) -> kind
    "pods": "Pod",
    "secrets": "Secret",
    "configmaps": "ConfigMap",
    "events": "Event",
    "namespaces": "Namespace",
}
_FIELDS: dict[str, set[str]] = {  # the field selectors the real API server accepts
    "pods": {
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    },
    "events": {
        "metadata.name",
        "metadata.namespace",
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "type",
    },
    "secrets": {"metadata.name", "metadata.namespace", "type"},
    "configmaps": {"metadata.name", "metadata.namespace"},
    "namespaces": {"metadata.name", "status.phase"},
}
_POD_MUTABLE_SPEC = ("activeDeadlineSeconds", "tolerations")
_MAX_CHANGES = 20_000


@dataclass
class Fault:
    """A failure the emulator injects into matching pods (see ``KubernetesEmulator.inject_fault``).

    ``kind`` is ``oom`` (SIGKILL, exit 137, ``OOMKilled``), ``crash`` (SIGKILL, reported as
    ``exit_code`` with reason ``Error``), ``image_pull`` (``ErrImagePull`` then ``ImagePullBackOff``,
    never starts) or ``unschedulable`` (``PodScheduled=False``, never starts). ``oom`` and ``crash``
    strike once the container has run ``after_seconds`` and written ``after_log_lines`` log lines.
    ``hits`` names the pods it was applied to; ``times=None`` applies it to every match.
    """

    kind: str
    nth: int | None = None
    labels: dict[str, str] | None = None
    name_prefix: str | None = None
    times: int | None = 1
    after_seconds: float = 0.0
    exit_code: int = 1
    message: str | None = None
    after_log_lines: int = 0
    hits: list[str] = field(default_factory=list)

    @property
    def exhausted(self) -> bool:
        """Whether the fault was used up."""
        return self.times is not None and len(self.hits) >= self.times

    def matches(self, seq: int, pod: Mapping[str, Any]) -> bool:
        """Return whether the ``seq``-th created pod (1-based) is targeted by this fault."""
        meta = pod.get("metadata") or {}
        if self.exhausted or (self.nth is not None and self.nth != seq):
            return False
        if self.name_prefix is not None and not str(meta.get("name", "")).startswith(self.name_prefix):
            return False
        labels = meta.get("labels") or {}
        return all(labels.get(k) == v for k, v in (self.labels or {}).items())


@dataclass(eq=False)
class PodRecord:
    """A pod object plus what the kubelet knows about it (process, logs, deletion request)."""

    obj: dict[str, Any]
    seq: int
    fault: Fault | None
    scratch: Path
    logs: dict[str, list[tuple[datetime, bytes]]] = field(default_factory=dict)
    logs_closed: set[str] = field(default_factory=set)
    process: subprocess.Popen[bytes] | None = None
    delete_grace: float | None = None
    gone: bool = False
    started_monotonic: float | None = None
    thread: threading.Thread | None = None

    @property
    def namespace(self) -> str:
        """The pod's namespace."""
        return str(self.obj["metadata"]["namespace"])

    @property
    def name(self) -> str:
        """The pod's name."""
        return str(self.obj["metadata"]["name"])


def _fault_from_annotations(annotations: Mapping[str, str]) -> Fault | None:
    kind = annotations.get(FAULT_ANNOTATION)
    if not kind:
        return None
    kind = kind.strip().lower().replace("-", "_")
    if kind not in FAULT_KINDS:
        raise ApiError.bad_request(
            f"annotation {FAULT_ANNOTATION}={annotations[FAULT_ANNOTATION]!r}: expected one of {FAULT_KINDS}"
        )
    try:
        return Fault(
            kind=kind,
            times=None,
            after_seconds=float(annotations.get(f"{FAULT_ANNOTATION}-after-seconds", "0")),
            exit_code=int(annotations.get(f"{FAULT_ANNOTATION}-exit-code", "1")),
            message=annotations.get(f"{FAULT_ANNOTATION}-message"),
            after_log_lines=int(annotations.get(f"{FAULT_ANNOTATION}-after-log-lines", "0")),
        )
    except ValueError as e:
        raise ApiError.bad_request(f"fault annotations: {e}") from e


class Cluster:
    """The emulated API objects and their change history (for watches and resource versions)."""

    def __init__(self, *, namespaces: list[str], scratch_root: Path) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.scratch_root = scratch_root
        self.closing = False
        self.on_pod_created: Callable[[PodRecord], None] = lambda record: None
        self._initial_namespaces = list(dict.fromkeys(["default", "kube-system", *namespaces]))
        self._rv = 0
        self._created = 0
        self._pods: dict[tuple[str, str], PodRecord] = {}
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self._changes: list[tuple[int, str, str, dict[str, Any]]] = []
        self._faults: list[Fault] = []
        self._images: list[tuple[str, list[str], list[str]]] = []
        #: Every pod body a client sent to create a pod, as sent (the secret canary test reads them).
        self.pod_requests: list[dict[str, Any]] = []
        self.reset()

    # ----------------------------------------------------------------------------------------- state
    def reset(self) -> list[PodRecord]:
        """Forget every object and fault; return the pod records so the caller can stop them."""
        with self.cond:
            records = list(self._pods.values())
            for record in records:
                record.gone = True
            self._pods.clear()
            self._objects = {kind: {} for kind in ("secrets", "configmaps", "events", "namespaces")}
            self._changes.clear()
            self._faults.clear()
            self.pod_requests.clear()
            self._created = 0
            for namespace in self._initial_namespaces:
                self._store_namespace(namespace)
            self.cond.notify_all()
            return records

    def _bump(self, resource: str, change: str, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
        self._changes.append((self._rv, resource, change, copy.deepcopy(obj)))
        if len(self._changes) > _MAX_CHANGES:
            del self._changes[: _MAX_CHANGES // 2]
        self.cond.notify_all()

    def _new_meta(self, namespace: str | None, meta: Mapping[str, Any] | None) -> dict[str, Any]:
        result = copy.deepcopy(dict(meta or {}))
        if not result.get("name") and result.get("generateName"):
            alphabet = "bcdfghjklmnpqrstvwxz2456789"
            result["name"] = result["generateName"] + "".join(_random.choice(alphabet) for _ in range(5))
        if namespace is not None:
            result["namespace"] = namespace
        result["uid"] = str(uuid.uuid4())
        result["creationTimestamp"] = rfc3339(utcnow())
        result.pop("resourceVersion", None)
        result.pop("deletionTimestamp", None)
        return result

    def _store_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        obj = {
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": self._new_meta(
                None, {"name": name, "labels": {**(labels or {}), "kubernetes.io/metadata.name": name}}
            ),
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        self._objects["namespaces"][("", name)] = obj
        self._bump("namespaces", "ADDED", obj)
        return obj

    def _require_namespace(self, namespace: str) -> None:
        if ("", namespace) not in self._objects["namespaces"]:
            raise ApiError.not_found("namespaces", namespace)

    # ------------------------------------------------------------------------------------ namespaces
    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Create a namespace (409 if it exists)."""
        with self.cond:
            if ("", name) in self._objects["namespaces"]:
                raise ApiError(409, "AlreadyExists", f'namespaces "{name}" already exists')
            return copy.deepcopy(self._store_namespace(name, labels))

    def label_namespace(self, name: str, labels: Mapping[str, str | None]) -> dict[str, Any]:
        """Set (or, with None, remove) namespace labels, e.g. ``pod-security.kubernetes.io/enforce``."""
        with self.cond:
            obj = self._objects["namespaces"].get(("", name))
            if obj is None:
                raise ApiError.not_found("namespaces", name)
            current = obj["metadata"].setdefault("labels", {})
            for key, value in labels.items():
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
            self._bump("namespaces", "MODIFIED", obj)
            return copy.deepcopy(obj)

    def _admit(self, namespace: str, pod: Mapping[str, Any]) -> None:
        """Pod Security Admission: refuse pods that break the namespace's enforced standard."""
        labels = self._objects["namespaces"][("", namespace)]["metadata"].get("labels") or {}
        level = labels.get("pod-security.kubernetes.io/enforce", "privileged")
        violations = pod_security_violations(pod, level)
        if violations:
            name = pod["metadata"]["name"]
            version = labels.get("pod-security.kubernetes.io/enforce-version", "latest")
            raise ApiError(
                403,
                "Forbidden",
                f'pods "{name}" is forbidden: violates PodSecurity "{level}:{version}": '
                + ", ".join(violations),
                details={"name": name, "kind": "pods"},
            )

    # ------------------------------------------------------------------------------------ faults, images
    def add_fault(self, fault: Fault) -> Fault:
        """Register a fault for pods created from now on."""
        if fault.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {fault.kind!r}: expected one of {FAULT_KINDS}")
        with self.cond:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Drop every registered fault."""
        with self.cond:
            self._faults.clear()

    def register_image(self, pattern: str, entrypoint: list[str], cmd: list[str]) -> None:
        """Give images matching the glob ``pattern`` an ENTRYPOINT and CMD (latest registration wins)."""
        with self.cond:
            self._images.insert(0, (pattern, list(entrypoint), list(cmd)))

    def image_config(self, image: str) -> tuple[list[str], list[str]] | None:
        """Return the registered ``(entrypoint, cmd)`` of an image, or None."""
        with self.cond:
            for pattern, entrypoint, cmd in self._images:
                if fnmatch.fnmatchcase(image, pattern):
                    return list(entrypoint), list(cmd)
        return None

    # ------------------------------------------------------------------------------------------- pods
    def create_pod(self, namespace: str, body: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        """Validate and store a pod, then hand it to the kubelet (``on_pod_created``)."""
        if not isinstance(body, Mapping):
            raise ApiError.bad_request("the body of the request must be a Pod object")
        if body.get("kind") not in (None, "Pod"):
            raise ApiError.bad_request(f"expected kind Pod, got {body.get('kind')!r}")
        with self.cond:
            self.pod_requests.append(copy.deepcopy(dict(body)))
        meta = body.get("metadata") or {}
        if meta.get("namespace") not in (None, "", namespace):
            raise ApiError.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        with self.cond:
            self._require_namespace(namespace)
            pod: dict[str, Any] = {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": self._new_meta(namespace, meta),
                "spec": copy.deepcopy(dict(body.get("spec") or {})),
            }
            name = pod["metadata"].get("name") or ""
            if not name:
                raise ApiError.invalid("Pod", "", [("metadata.name", "Required value: name or generateName")])
            causes = validate_pod(pod)
            if causes:
                raise ApiError.invalid("Pod", name, causes)
            self._admit(namespace, pod)
            if (namespace, name) in self._pods:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'pods "{name}" already exists',
                    details={"name": name, "kind": "pods"},
                )
            fault = _fault_from_annotations(pod["metadata"].get("annotations") or {})
            spec = pod["spec"]
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("dnsPolicy", "ClusterFirst")
            spec.setdefault("schedulerName", "default-scheduler")
            spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
            spec.setdefault("enableServiceLinks", True)
            for container in [*(spec.get("initContainers") or []), *spec["containers"]]:
                container.setdefault("terminationMessagePath", "/dev/termination-log")
                container.setdefault("terminationMessagePolicy", "File")
                container.setdefault("imagePullPolicy", "IfNotPresent")
                container.setdefault("resources", {})
            pod["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}
            if dry_run:
                return pod
            self._created += 1
            if fault is None:
                fault = next((f for f in self._faults if f.matches(self._created, pod)), None)
            if fault is not None:
                fault.hits.append(name)
            scratch = self.scratch_root / namespace / f"{name}-{pod['metadata']['uid'][:8]}"
            record = PodRecord(obj=pod, seq=self._created, fault=fault, scratch=scratch)
            for container in [*(spec.get("initContainers") or []), *spec["containers"]]:
                record.logs[container["name"]] = []
            self._pods[(namespace, name)] = record
            self._bump("pods", "ADDED", pod)
            result = copy.deepcopy(pod)
        self.on_pod_created(record)
        return result

    def pod_record(self, namespace: str, name: str) -> PodRecord:
        """Return the live record of a pod (404 if absent)."""
        with self.cond:
            record = self._pods.get((namespace, name))
            if record is None:
                raise ApiError.not_found("pods", name)
            return record

    def pod_records(self) -> list[PodRecord]:
        """All live pod records in creation order."""
        with self.cond:
            return sorted(self._pods.values(), key=lambda r: r.seq)

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """Return a copy of a pod."""
        with self.cond:
            return copy.deepcopy(self.pod_record(namespace, name).obj)

    def mutate_pod(self, record: PodRecord, change: Callable[[dict[str, Any]], None]) -> bool:
        """Apply ``change`` to the pod object under the lock; False if the pod is gone."""
        with self.cond:
            if record.gone:
                return False
            change(record.obj)
            self._bump("pods", "MODIFIED", record.obj)
            return True

    def remove_pod(self, record: PodRecord) -> None:
        """Drop a pod from the store (the end of a deletion)."""
        with self.cond:
            if self._pods.get((record.namespace, record.name)) is record:
                del self._pods[(record.namespace, record.name)]
                self._bump("pods", "DELETED", record.obj)
            record.gone = True
            self.cond.notify_all()

    def patch_pod(
        self, namespace: str, name: str, patch: Any, content_type: str, *, status: bool = False
    ) -> dict[str, Any]:
        """Patch labels, annotations and the mutable spec fields (or the status subresource)."""
        with self.cond:
            record = self.pod_record(namespace, name)
            old = record.obj
            new = _apply_patch(old, patch, content_type)
            if status:
                new = {**copy.deepcopy(old), "status": new.get("status", old.get("status"))}
            else:
                new["status"] = copy.deepcopy(old.get("status"))
                causes = validate_pod(new)
                for key in ("name", "namespace", "uid", "creationTimestamp"):
                    if (new.get("metadata") or {}).get(key) != old["metadata"].get(key):
                        causes.append((f"metadata.{key}", "Invalid value: field is immutable"))
                frozen_new = {k: v for k, v in (new.get("spec") or {}).items() if k not in _POD_MUTABLE_SPEC}
                frozen_old = {k: v for k, v in old["spec"].items() if k not in _POD_MUTABLE_SPEC}
                if _strip_images(frozen_new) != _strip_images(frozen_old):
                    causes.append(
                        (
                            "spec",
                            "Forbidden: pod updates may not change fields other than"
                            " `spec.containers[*].image`,"
                            " `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`,"
                            " `spec.tolerations` (only additions to existing tolerations)",
                        )
                    )
                if causes:
                    raise ApiError.invalid("Pod", name, causes)
            record.obj = new
            self._bump("pods", "MODIFIED", new)
            return copy.deepcopy(new)

    def delete_pod(self, namespace: str, name: str, grace_seconds: float | None) -> dict[str, Any]:
        """Start a graceful deletion: a running container gets SIGTERM, then SIGKILL after the grace."""
        with self.cond:
            record = self.pod_record(namespace, name)
            meta = record.obj["metadata"]
            if grace_seconds is None:
                grace_seconds = float(record.obj["spec"].get("terminationGracePeriodSeconds", 30))
            if "deletionTimestamp" not in meta:
                meta["deletionTimestamp"] = rfc3339(utcnow() + timedelta(seconds=grace_seconds))
                meta["deletionGracePeriodSeconds"] = int(grace_seconds)
                self._bump("pods", "MODIFIED", record.obj)
            result = copy.deepcopy(record.obj)
            running = record.process is not None and record.process.poll() is None
            if running:
                record.delete_grace = grace_seconds
                self.record_event(
                    record, "Normal", "Killing", f"Stopping container {_main_container(record)}"
                )
                self.cond.notify_all()
            else:
                self.remove_pod(record)
            return result

    def list_pods(
        self, namespace: str | None, label_selector: str | None, field_selector: str | None
    ) -> dict[str, Any]:
        """Return a ``PodList`` filtered by namespace and selectors."""
        labels, fields = _selectors("pods", label_selector, field_selector)
        with self.cond:
            if namespace is not None:
                self._require_namespace(namespace)
            items = [
                copy.deepcopy(r.obj)
                for r in sorted(self._pods.values(), key=lambda r: r.seq)
                if (namespace is None or r.namespace == namespace)
                and match_labels(labels, r.obj["metadata"].get("labels"))
                and match_fields(fields, r.obj)
            ]
            return {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }

    # ------------------------------------------------------------------------------------------- logs
    def log_stream(
        self,
        namespace: str,
        name: str,
        *,
        container: str | None,
        follow: bool,
        timestamps: bool,
        since_seconds: int | None = None,
        since_time: datetime | None = None,
        tail_lines: int | None = None,
        limit_bytes: int | None = None,
        previous: bool = False,
    ) -> Iterator[bytes]:
        """Validate a log request now and return the iterator that produces (and follows) the log."""
        with self.cond:
            record = self.pod_record(namespace, name)
            spec = record.obj["spec"]
            names = [c["name"] for c in spec["containers"]]
            all_names = names + [c["name"] for c in spec.get("initContainers") or []]
            if container is None:
                if len(names) != 1:
                    raise ApiError.bad_request(
                        f"a container name must be specified for pod {name}, "
                        f"choose one of: [{' '.join(names)}]"
                    )
                container = names[0]
            if container not in all_names:
                raise ApiError.bad_request(f"container {container} is not valid for pod {name}")
            if previous:
                raise ApiError.bad_request(
                    f'previous terminated container "{container}" in pod "{name}" not found'
                )
            state = _container_state(record.obj, container)
            if "waiting" in state:
                reason = state["waiting"].get("reason", "ContainerCreating")
                raise ApiError.bad_request(
                    f'container "{container}" in pod "{name}" is waiting to start: {reason}'
                )
            lines = record.logs[container]
            start = 0
            if since_seconds is not None or since_time is not None:
                cutoff = since_time or (utcnow() - timedelta(seconds=since_seconds or 0))
                start = next((i for i, (ts, _) in enumerate(lines) if ts >= cutoff), len(lines))
            if tail_lines is not None:
                start = max(start, len(lines) - max(tail_lines, 0))
        return self._iter_log(
            record, container, start, follow=follow, timestamps=timestamps, limit=limit_bytes
        )

    def _iter_log(
        self,
        record: PodRecord,
        container: str,
        index: int,
        *,
        follow: bool,
        timestamps: bool,
        limit: int | None,
    ) -> Iterator[bytes]:
        sent = 0
        while True:
            with self.cond:
                lines = record.logs[container]
                while follow and index >= len(lines) and not self._log_done(record, container):
                    self.cond.wait(timeout=1.0)
                batch = lines[index:]
                index = len(lines)
                done = not follow or self._log_done(record, container)
            for moment, line in batch:
                chunk = (rfc3339_nano(moment).encode() + b" " + line) if timestamps else line
                if limit is not None and sent + len(chunk) > limit:
                    yield chunk[: max(limit - sent, 0)]
                    return
                sent += len(chunk)
                yield chunk
            if done:
                with self.cond:
                    if index >= len(record.logs[container]):
                        return

    def _log_done(self, record: PodRecord, container: str) -> bool:
        return container in record.logs_closed or record.gone or self.closing

    # ---------------------------------------------------------------------------------------- events
    def record_event(
        self,
        record: PodRecord,
        event_type: str,
        reason: str,
        message: str,
        *,
        container: str | None = None,
        component: str = "kubelet",
    ) -> None:
        """Record (or count again) an event about a pod, as ``kubectl describe pod`` shows them."""
        with self.cond:
            meta = record.obj["metadata"]
            now = rfc3339(utcnow())
            for (namespace, _), event in self._objects["events"].items():
                involved = event["involvedObject"]
                if (
                    namespace == record.namespace
                    and involved.get("uid") == meta["uid"]
                    and event["reason"] == reason
                    and event["message"] == message
                ):
                    event["count"] += 1
                    event["lastTimestamp"] = now
                    self._bump("events", "MODIFIED", event)
                    return
            involved = {
                "kind": "Pod",
                "namespace": record.namespace,
                "name": record.name,
                "uid": meta["uid"],
                "apiVersion": "v1",
                "resourceVersion": meta.get("resourceVersion", ""),
            }
            if container is not None:
                involved["fieldPath"] = f"spec.containers{{{container}}}"
            event = {
                "kind": "Event",
                "apiVersion": "v1",
                "metadata": self._new_meta(
                    record.namespace, {"name": f"{record.name}.{uuid.uuid4().hex[:16]}"}
                ),
                "involvedObject": involved,
                "reason": reason,
                "message": message,
                "type": event_type,
                "count": 1,
                "firstTimestamp": now,
                "lastTimestamp": now,
                "source": {"component": component, "host": "emulator-node"},
                "reportingComponent": component,
                "reportingInstance": "emulator-node",
            }
            self._objects["events"][(record.namespace, event["metadata"]["name"])] = event
            self._bump("events", "ADDED", event)

    # ---------------------------------------------------------------------------- secrets, configmaps
    def create_object(self, resource: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create a Secret, ConfigMap or Event (``stringData`` of a Secret is encoded into ``data``)."""
        if not isinstance(body, Mapping):
            raise ApiError.bad_request(f"the body of the request must be a {_KINDS[resource]} object")
        with self.cond:
            self._require_namespace(namespace)
            obj = copy.deepcopy(dict(body))
            obj["kind"], obj["apiVersion"] = _KINDS[resource], "v1"
            obj["metadata"] = self._new_meta(namespace, obj.get("metadata"))
            name = obj["metadata"].get("name")
            if not name:
                raise ApiError.invalid(_KINDS[resource], "", [("metadata.name", "Required value")])
            if (namespace, name) in self._objects[resource]:
                raise ApiError(409, "AlreadyExists", f'{resource} "{name}" already exists')
            if resource == "secrets":
                _normalise_secret(obj)
            self._objects[resource][(namespace, name)] = obj
            self._bump(resource, "ADDED", obj)
            return copy.deepcopy(obj)

    def get_object(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        """Return a copy of a stored object (404 if absent)."""
        with self.cond:
            key = ("", name) if resource == "namespaces" else (namespace, name)
            obj = self._objects[resource].get(key)
            if obj is None:
                raise ApiError.not_found(resource, name)
            return copy.deepcopy(obj)

    def replace_object(
        self, resource: str, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """PUT: replace a stored object's content, keeping its identity."""
        with self.cond:
            old = self._objects[resource].get((namespace, name))
            if old is None:
                raise ApiError.not_found(resource, name)
            obj = copy.deepcopy(dict(body))
            obj["kind"], obj["apiVersion"] = _KINDS[resource], "v1"
            obj["metadata"] = {
                **(obj.get("metadata") or {}),
                **{k: old["metadata"][k] for k in ("name", "namespace", "uid", "creationTimestamp")},
            }
            if resource == "secrets":
                _normalise_secret(obj)
            self._objects[resource][(namespace, name)] = obj
            self._bump(resource, "MODIFIED", obj)
            return copy.deepcopy(obj)

    def patch_object(
        self, resource: str, namespace: str, name: str, patch: Any, content_type: str
    ) -> dict[str, Any]:
        """Patch a stored object."""
        with self.cond:
            old = self._objects[resource].get((namespace, name))
            if old is None:
                raise ApiError.not_found(resource, name)
            return self.replace_object(resource, namespace, name, _apply_patch(old, patch, content_type))

    def delete_object(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        """Delete a stored object and return its last state."""
        with self.cond:
            obj = self._objects[resource].pop((namespace, name), None)
            if obj is None:
                raise ApiError.not_found(resource, name)
            self._bump(resource, "DELETED", obj)
            return copy.deepcopy(obj)

    def list_objects(
        self, resource: str, namespace: str | None, label_selector: str | None, field_selector: str | None
    ) -> dict[str, Any]:
        """Return a ``<Kind>List`` of stored objects filtered by namespace and selectors."""
        labels, fields = _selectors(resource, label_selector, field_selector)
        with self.cond:
            if namespace is not None and resource != "namespaces":
                self._require_namespace(namespace)
            items = [
                copy.deepcopy(obj)
                for (obj_ns, _), obj in self._objects[resource].items()
                if (namespace is None or resource == "namespaces" or obj_ns == namespace)
                and match_labels(labels, obj["metadata"].get("labels"))
                and match_fields(fields, obj)
            ]
            kind = "EventList" if resource == "events" else f"{_KINDS[resource]}List"
            return {
                "kind": kind,
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """Decoded data of a Secret, or None if it does not exist."""
        with self.cond:
            obj = self._objects["secrets"].get((namespace, name))
            if obj is None:
                return None
            return {
                k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (obj.get("data") or {}).items()
            }

    def config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """Data of a ConfigMap, or None if it does not exist."""
        with self.cond:
            obj = self._objects["configmaps"].get((namespace, name))
            return None if obj is None else dict(obj.get("data") or {})

    # ------------------------------------------------------------------------------------------ watch
    def watch(
        self,
        resource: str,
        namespace: str | None,
        *,
        label_selector: str | None,
        field_selector: str | None,
        resource_version: str | None,
        timeout_seconds: float,
    ) -> Iterator[bytes]:
        """Validate a watch request and return the iterator of JSON-lines watch events."""
        labels, fields = _selectors(resource, label_selector, field_selector)
        with self.cond:
            if resource == "pods":
                current = [r.obj for r in self._pods.values()]
            else:
                current = list(self._objects[resource].values())
            if resource_version in (None, "", "0"):
                initial = [copy.deepcopy(o) for o in current]
                start_rv = self._rv
            else:
                initial, start_rv = [], int(resource_version or 0)

        def selected(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata") or {}
            in_namespace = namespace is None or resource == "namespaces" or meta.get("namespace") == namespace
            return in_namespace and match_labels(labels, meta.get("labels")) and match_fields(fields, obj)

        def events() -> Iterator[bytes]:
            for obj in initial:
                if selected(obj):
                    yield json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n"
            seen = start_rv
            deadline = time.monotonic() + timeout_seconds
            while not self.closing and time.monotonic() < deadline:
                with self.cond:
                    pending = [c for c in self._changes if c[0] > seen and c[1] == resource]
                    if not pending:
                        self.cond.wait(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
                        continue
                    seen = pending[-1][0]
                for _, _, change, obj in pending:
                    if selected(obj):
                        yield json.dumps({"type": change, "object": obj}).encode() + b"\n"

        return events()

    def resource_version(self) -> int:
        """The cluster-wide resource version counter."""
        with self.cond:
            return self._rv


def _apply_patch(old: dict[str, Any], patch: Any, content_type: str) -> dict[str, Any]:
    media = content_type.split(";", maxsplit=1)[0].strip().lower()
    try:
        if media == "application/json-patch+json":
            return apply_json_patch(old, patch)
        if media == "application/merge-patch+json":
            return apply_merge_patch(old, patch)
        if media in ("application/strategic-merge-patch+json", "application/json"):
            return apply_strategic_merge_patch(old, patch)
    except PatchError as e:
        raise ApiError(422, "Invalid", str(e)) from e
    raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {media}")


def _selectors(
    resource: str, label_selector: str | None, field_selector: str | None
) -> tuple[list[LabelRequirement], list[FieldRequirement]]:
    try:
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector)
    except SelectorError as e:
        raise ApiError.bad_request(str(e)) from e
    for requirement in fields:
        if requirement.field not in _FIELDS[resource]:
            raise ApiError.bad_request(
                f"field label not supported: {requirement.field} "
                f"(for {resource}: {', '.join(sorted(_FIELDS[resource]))})"
            )
    return labels, fields


def _normalise_secret(obj: dict[str, Any]) -> None:
    data = dict(obj.get("data") or {})
    for key, value in (obj.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except ValueError as e:
            raise ApiError.invalid(
                "Secret", obj["metadata"]["name"], [(f"data[{key}]", "Invalid value: not base64")]
            ) from e
    obj["data"] = data
    obj.setdefault("type", "Opaque")


def _strip_images(spec: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(spec)
    for group in ("containers", "initContainers"):
        for container in result.get(group) or []:
            container.pop("image", None)
    return result


def _qos_class(spec: Mapping[str, Any]) -> str:
    containers = spec.get("containers") or []
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    guaranteed = all(
        (r.get("limits") or {}).get(k) is not None
        and (r.get("requests") or {}).get(k, (r.get("limits") or {}).get(k)) == (r.get("limits") or {}).get(k)
        for r in resources
        for k in ("cpu", "memory")
    )
    return "Guaranteed" if guaranteed else "Burstable"


def _main_container(record: PodRecord) -> str:
    return str(record.obj["spec"]["containers"][0]["name"])


def _container_state(pod: Mapping[str, Any], container: str) -> dict[str, Any]:
    status = pod.get("status") or {}
    for group in ("containerStatuses", "initContainerStatuses"):
        for entry in status.get(group) or []:
            if entry.get("name") == container:
                return dict(entry.get("state") or {})
    return {"waiting": {"reason": "ContainerCreating"}}
