"""Tests only: :class:`DagDenyingAuthManager`, SimpleAuthManager denying some users some DAGs
(configured by ``HPO_TEST_DENY``; see ``tests/ui_auth.py``)."""

from __future__ import annotations

import fnmatch
import os
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


def _denied() -> dict[str, list[str]]:
    rules: dict[str, list[str]] = {}
    for part in filter(None, os.environ.get("HPO_TEST_DENY", "").split(";")):
        user, _, globs = part.partition("=")
        rules[user.strip()] = [g.strip() for g in globs.split(",") if g.strip()]
    return rules


class DagDenyingAuthManager(SimpleAuthManager):
    """SimpleAuthManager, except that users named in ``HPO_TEST_DENY`` may not access those DAGs."""

    def is_authorized_dag(
        self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None
    ) -> bool:
        dag_id = getattr(details, "id", None)
        if dag_id and any(fnmatch.fnmatch(dag_id, g) for g in _denied().get(user.username, [])):
            return False
        return bool(
            super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)
        )
