"""Label and field selectors with the semantics of the Kubernetes API server."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FieldRequirement",
    "LabelRequirement",
    "SelectorError",
    "match_fields",
    "match_labels",
    "parse_field_selector",
    "parse_label_selector",
]

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_KEY_RE = re.compile(rf"^{_KEY}$")
_SET_RE = re.compile(rf"^(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQ_RE = re.compile(rf"^(?P<key>{_KEY})\s*(?P<op>==|!=|=)\s*(?P<value>[-A-Za-z0-9_.]*)$")


class SelectorError(ValueError):
    """A selector string that the API server would refuse with 400 Bad Request."""


@dataclass(frozen=True)
class LabelRequirement:
    """One term of a label selector, e.g. ``app=x``, ``tier in (a,b)``, ``!checked``."""

    key: str
    op: str  # one of "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Return whether ``labels`` satisfies this term (``!=`` and ``notin`` match a missing key)."""
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        return not present or value not in self.values


@dataclass(frozen=True)
class FieldRequirement:
    """One term of a field selector, e.g. ``involvedObject.name=pod-1`` or ``status.phase!=Failed``."""

    field: str
    op: str  # "=" or "!="
    value: str

    def matches(self, get_field: Callable[[str], str | None]) -> bool:
        """Return whether the object's field (as a string; missing is "") satisfies this term."""
        actual = get_field(self.field)
        actual = "" if actual is None else actual
        return (actual == self.value) if self.op == "=" else (actual != self.value)


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside ``(...)``."""
    terms: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"unbalanced parenthesis in selector {text!r}")
        if char == "," and depth == 0:
            terms.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise SelectorError(f"unbalanced parenthesis in selector {text!r}")
    terms.append("".join(current).strip())
    return [t for t in terms if t]


def parse_label_selector(text: str | None) -> list[LabelRequirement]:
    """Parse a label selector string; an empty or missing selector matches everything.

    Raises:
        SelectorError: the selector is malformed.
    """
    if not text:
        return []
    requirements: list[LabelRequirement] = []
    for term in _split_terms(text):
        if term.startswith("!"):
            key = term[1:].strip()
            if not _KEY_RE.match(key):
                raise SelectorError(f"invalid label key {key!r} in selector {text!r}")
            requirements.append(LabelRequirement(key, "!exists"))
            continue
        if match := _SET_RE.match(term):
            values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
            requirements.append(LabelRequirement(match["key"], match["op"], values))
            continue
        if match := _EQ_RE.match(term):
            op = "!=" if match["op"] == "!=" else "="
            requirements.append(LabelRequirement(match["key"], op, frozenset({match["value"]})))
            continue
        if _KEY_RE.match(term):
            requirements.append(LabelRequirement(term, "exists"))
            continue
        raise SelectorError(f"unable to parse requirement {term!r} in label selector {text!r}")
    return requirements


def parse_field_selector(text: str | None) -> list[FieldRequirement]:
    """Parse a field selector (``a=b``, ``a==b``, ``a!=b``, comma separated).

    Raises:
        SelectorError: the selector is malformed.
    """
    if not text:
        return []
    requirements: list[FieldRequirement] = []
    for term in _split_terms(text):
        for op in ("!=", "==", "="):
            field, sep, value = term.partition(op)
            if sep:
                requirements.append(
                    FieldRequirement(field.strip(), "!=" if op == "!=" else "=", value.strip())
                )
                break
        else:
            raise SelectorError(f"invalid field selector term {term!r}: expected field=value")
    return requirements


def match_labels(requirements: list[LabelRequirement], labels: Mapping[str, str] | None) -> bool:
    """Return whether all requirements hold for ``labels``."""
    labels = labels or {}
    return all(r.matches(labels) for r in requirements)


def _lookup(obj: Mapping[str, Any], dotted: str) -> str | None:
    node: Any = obj
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return None if node is None else str(node)


def match_fields(requirements: list[FieldRequirement], obj: Mapping[str, Any]) -> bool:
    """Return whether all field requirements hold for the JSON object ``obj``."""
    return all(r.matches(lambda path: _lookup(obj, path)) for r in requirements)
