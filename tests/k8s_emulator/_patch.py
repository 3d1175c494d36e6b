"""JSON merge patch (RFC 7386), a strategic-merge subset, and JSON patch (RFC 6902)."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PatchError", "apply_json_patch", "apply_merge_patch", "apply_strategic_merge_patch"]

# Lists that strategic merge patch merges by a key instead of replacing (the ones a pod uses).
_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
}


class PatchError(ValueError):
    """A patch document that cannot be applied (the API server answers 422 or 400)."""


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """Apply a JSON merge patch: objects merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def apply_strategic_merge_patch(target: Any, patch: Any, _field: str = "") -> Any:
    """Apply a strategic merge patch for the pod fields in ``_MERGE_KEYS``; other lists are replaced.

    ``$patch: delete`` inside a keyed list item removes that item; other directives are refused.
    """
    if isinstance(patch, list) and _field in _MERGE_KEYS and isinstance(target, list):
        return _merge_keyed_list(target, patch, _field)
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if "$patch" in patch:
        raise PatchError(f"strategic merge patch: unsupported directive $patch={patch['$patch']!r}")
    merged: dict[str, Any] = copy.deepcopy(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = apply_strategic_merge_patch(merged.get(name), value, name)
    return merged


def _merge_keyed_list(target: list[Any], patch: list[Any], field: str) -> list[Any]:
    """Merge the items of a list in ``_MERGE_KEYS`` by their merge key (``$patch: delete`` removes one)."""
    key = _MERGE_KEYS[field]
    result = copy.deepcopy(target)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise PatchError(f"strategic merge patch: items of {field} need the merge key {key!r}")
        index = next((i for i, old in enumerate(result) if old.get(key) == item[key]), None)
        directive = item.get("$patch")
        if directive == "delete":
            if index is not None:
                result.pop(index)
            continue
        if directive is not None:
            raise PatchError(f"strategic merge patch: unsupported directive $patch={directive!r}")
        if index is None:
            result.append(copy.deepcopy(item))
        else:
            result[index] = apply_strategic_merge_patch(result[index], item)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON patch: path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError) as e:
            raise PatchError(f"JSON patch: path {path!r} does not exist") from e
    return node


def apply_json_patch(target: Any, operations: Any) -> Any:
    """Apply a JSON patch (``add``, ``remove``, ``replace``, ``test``) and return the new document."""
    if not isinstance(operations, list):
        raise PatchError("JSON patch: the body must be a list of operations")
    doc = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise PatchError(f"JSON patch: malformed operation {operation!r}")
        op, path = operation["op"], operation["path"]
        parts = _pointer(path)
        if not parts:
            raise PatchError("JSON patch: replacing the whole object is not supported")
        parent = _parent(doc, parts, path)
        last = parts[-1]
        if op == "test":
            _test(parent, last, path, operation.get("value"))
        elif op in ("add", "replace"):
            _add_or_replace(parent, last, path, op, copy.deepcopy(operation.get("value")))
        elif op == "remove":
            _remove(parent, last, path)
        else:
            raise PatchError(f"JSON patch: unsupported op {op!r}")
    return doc


def _test(parent: Any, last: str, path: str, expected: Any) -> None:
    """The ``test`` operation: the value at ``path`` must equal ``expected``."""
    try:
        current = parent[int(last)] if isinstance(parent, list) else parent[last]
    except (KeyError, IndexError, ValueError) as e:
        raise PatchError(f"JSON patch: test path {path!r} does not exist") from e
    if current != expected:
        raise PatchError(f"JSON patch: test failed at {path!r}")


def _add_or_replace(parent: Any, last: str, path: str, op: str, value: Any) -> None:
    """The ``add`` and ``replace`` operations (``-`` appends to a list)."""
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, value)
        else:
            parent[index] = value
    elif isinstance(parent, dict):
        if op == "replace" and last not in parent:
            raise PatchError(f"JSON patch: replace path {path!r} does not exist")
        parent[last] = value
    else:
        raise PatchError(f"JSON patch: parent of {path!r} is not a container")


def _remove(parent: Any, last: str, path: str) -> None:
    """The ``remove`` operation."""
    try:
        if isinstance(parent, list):
            parent.pop(int(last))
        else:
            del parent[last]
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise PatchError(f"JSON patch: remove path {path!r} does not exist") from e
