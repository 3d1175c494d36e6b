"""API errors, timestamps, quantities and object validation shared by the emulator modules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "ApiError",
    "parse_quantity",
    "pod_security_violations",
    "rfc3339",
    "rfc3339_nano",
    "utcnow",
    "validate_pod",
]

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_RE = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_DNS1123_LABEL_RE = re.compile(rf"^{_DNS1123_LABEL}$")
_QUALIFIED_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ENV_NAME_RE = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY_RE = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
_MAX_ANNOTATIONS_BYTES = 256 * 1024


class ApiError(Exception):
    """An error the API server reports as a ``Status`` object with an HTTP code."""

    def __init__(self, code: int, reason: str, message: str, *, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        """Return the ``v1.Status`` body for this error."""
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body

    @classmethod
    def not_found(cls, resource: str, name: str) -> ApiError:
        """``pods "x" not found`` (404)."""
        return cls(
            404, "NotFound", f'{resource} "{name}" not found', details={"name": name, "kind": resource}
        )

    @classmethod
    def bad_request(cls, message: str) -> ApiError:
        """A 400 Bad Request."""
        return cls(400, "BadRequest", message)

    @classmethod
    def invalid(cls, kind: str, name: str, causes: list[tuple[str, str]]) -> ApiError:
        """A 422 ``Kind "name" is invalid: field: message`` error."""
        text = ", ".join(f"{field}: {message}" for field, message in causes)
        details = {
            "name": name,
            "kind": kind,
            "causes": [{"field": f, "message": m, "reason": "FieldValueInvalid"} for f, m in causes],
        }
        return cls(422, "Invalid", f'{kind} "{name}" is invalid: {text}', details=details)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """Seconds-precision RFC 3339, as the API server writes ``metav1.Time``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_nano(moment: datetime) -> str:
    """Sub-second RFC 3339, as the kubelet writes log timestamps."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def parse_quantity(value: str | float) -> Decimal:
    """Parse a Kubernetes resource quantity such as ``500m``, ``2Gi`` or ``1e9``.

    Raises:
        ValueError: the text is not a quantity.
    """
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY_RE.match(str(value).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"quantities must match the regular expression of a Kubernetes quantity: {value!r}")
    try:
        return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]
    except InvalidOperation as e:
        raise ValueError(f"invalid quantity {value!r}") from e


def _check_qualified_key(key: str, field: str, causes: list[tuple[str, str]]) -> None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN_RE.match(prefix)):
        causes.append((field, f"Invalid value: {key!r}: prefix part must be a DNS-1123 subdomain"))
    if not name or len(name) > 63 or not _QUALIFIED_NAME_RE.match(name):
        causes.append(
            (field, f"Invalid value: {key!r}: name part must be a valid qualified name (<= 63 chars)")
        )


def _validate_metadata(meta: Mapping[str, Any], causes: list[tuple[str, str]]) -> None:
    name = meta.get("name") or ""
    if len(name) > 253 or not _DNS1123_SUBDOMAIN_RE.match(name):
        causes.append(
            ("metadata.name", f"Invalid value: {name!r}: a lowercase RFC 1123 subdomain is required")
        )
    for key, value in (meta.get("labels") or {}).items():
        _check_qualified_key(key, "metadata.labels", causes)
        if not isinstance(value, str):
            causes.append(("metadata.labels", f"Invalid value: {value!r}: label values must be strings"))
        elif value and (len(value) > 63 or not _QUALIFIED_NAME_RE.match(value)):
            causes.append(
                ("metadata.labels", f"Invalid value: {value!r}: a valid label must be 63 characters or less")
            )
    annotations = meta.get("annotations") or {}
    for key, value in annotations.items():
        _check_qualified_key(key, "metadata.annotations", causes)
        if not isinstance(value, str):
            causes.append(
                ("metadata.annotations", f"Invalid value: {value!r}: annotation values are strings")
            )
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > _MAX_ANNOTATIONS_BYTES:
        causes.append(("metadata.annotations", "Too long: must have at most 262144 bytes"))


def _validate_container(container: Mapping[str, Any], field: str, causes: list[tuple[str, str]]) -> None:
    name = container.get("name") or ""
    if len(name) > 63 or not _DNS1123_LABEL_RE.match(name):
        causes.append((f"{field}.name", f"Invalid value: {name!r}: a lowercase RFC 1123 label is required"))
    if not container.get("image"):
        causes.append((f"{field}.image", "Required value"))
    for index, env in enumerate(container.get("env") or []):
        env_field = f"{field}.env[{index}]"
        env_name = env.get("name") or ""
        if not _ENV_NAME_RE.match(env_name):
            causes.append(
                (f"{env_field}.name", f"Invalid value: {env_name!r}: a valid environment variable name")
            )
        source = env.get("valueFrom")
        if source is not None:
            if env.get("value"):
                causes.append(
                    (f"{env_field}.valueFrom", "Invalid value: may not be specified when `value` is")
                )
            if len([k for k, v in source.items() if v]) != 1:
                causes.append((f"{env_field}.valueFrom", "Invalid value: must specify exactly one source"))
    for kind in ("limits", "requests"):
        for resource, quantity in ((container.get("resources") or {}).get(kind) or {}).items():
            try:
                parse_quantity(quantity)
            except ValueError as e:
                causes.append((f"{field}.resources.{kind}[{resource}]", f"Invalid value: {e}"))


def validate_pod(pod: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Return the validation failures of a pod the way the API server words them (empty if valid)."""
    causes: list[tuple[str, str]] = []
    _validate_metadata(pod.get("metadata") or {}, causes)
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        causes.append(("spec.containers", "Required value"))
    seen: set[str] = set()
    for group in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(group) or []):
            _validate_container(container, f"spec.{group}[{index}]", causes)
            if container.get("name") in seen:
                causes.append((f"spec.{group}[{index}].name", f"Duplicate value: {container.get('name')!r}"))
            seen.add(container.get("name"))
    policy = spec.get("restartPolicy", "Always")
    if policy not in ("Always", "OnFailure", "Never"):
        causes.append(("spec.restartPolicy", f"Unsupported value: {policy!r}"))
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and (not isinstance(deadline, int) or deadline <= 0):
        causes.append(
            ("spec.activeDeadlineSeconds", f"Invalid value: {deadline!r}: must be a positive integer")
        )
    return causes


_BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def pod_security_violations(pod: Mapping[str, Any], level: str) -> list[str]:
    """Check a pod against a Pod Security Standard (``baseline`` or ``restricted``), worded like the
    admission controller; ``privileged`` (or anything else) allows everything."""
    if level not in ("baseline", "restricted"):
        return []
    spec = pod.get("spec") or {}
    pod_context = spec.get("securityContext") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    found = _pod_level_violations(spec, level)
    for container in containers:
        found.extend(_baseline_container_violations(container))
        if level == "restricted":
            found.extend(_restricted_container_violations(container, pod_context))
    return found


def _pod_level_violations(spec: Mapping[str, Any], level: str) -> list[str]:
    """Host namespaces and volume types of the pod spec."""
    found: list[str] = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            found.append(f"host namespaces ({flag}=true)")
    for volume in spec.get("volumes") or []:
        kinds = [k for k in volume if k != "name"]
        if "hostPath" in kinds:
            found.append(f'hostPath volumes (volume "{volume.get("name")}")')
        elif level == "restricted" and any(k not in _RESTRICTED_VOLUMES for k in kinds):
            found.append(f'restricted volume types (volume "{volume.get("name")}" uses {kinds[0]})')
    return found


def _baseline_container_violations(container: Mapping[str, Any]) -> list[str]:
    """What the baseline level refuses in one container: privileged, added capabilities, host ports."""
    name = container.get("name")
    context = container.get("securityContext") or {}
    added = set((context.get("capabilities") or {}).get("add") or [])
    found: list[str] = []
    if context.get("privileged"):
        found.append(f'privileged (container "{name}" must not set securityContext.privileged=true)')
    if added - _BASELINE_CAPABILITIES:
        found.append(f'non-default capabilities (container "{name}" must not include {sorted(added)})')
    if any(port.get("hostPort") for port in container.get("ports") or []):
        found.append(f'hostPort (container "{name}" uses hostPort)')
    return found


def _restricted_container_violations(
    container: Mapping[str, Any], pod_context: Mapping[str, Any]
) -> list[str]:
    """What the restricted level refuses in one container on top of baseline (pod defaults apply)."""
    name = container.get("name")
    context = container.get("securityContext") or {}
    capabilities = context.get("capabilities") or {}
    added = set(capabilities.get("add") or [])
    found: list[str] = []
    if context.get("allowPrivilegeEscalation") is not False:
        found.append(
            f'allowPrivilegeEscalation != false (container "{name}" must set '
            "securityContext.allowPrivilegeEscalation=false)"
        )
    if "ALL" not in (capabilities.get("drop") or []) or added - {"NET_BIND_SERVICE"}:
        found.append(
            f'unrestricted capabilities (container "{name}" must set '
            'securityContext.capabilities.drop=["ALL"])'
        )
    if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
        found.append(
            f'runAsNonRoot != true (pod or container "{name}" must set securityContext.runAsNonRoot=true)'
        )
    if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
        found.append(f'runAsUser=0 (container "{name}" must not set runAsUser=0)')
    profile = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
    if profile not in ("RuntimeDefault", "Localhost"):
        found.append(
            f'seccompProfile (pod or container "{name}" must set securityContext.seccompProfile.type '
            'to "RuntimeDefault" or "Localhost")'
        )
    return found
