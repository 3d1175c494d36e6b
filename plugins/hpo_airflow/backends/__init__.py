"""Worker backends: how a round's slots become mapped Airflow tasks, by the name a study file gives.

A backend is a module with three functions (:class:`WorkerBackend`): ``check`` refuses settings it
cannot run (the DAG factory and ``hpo validate`` call it), ``map_slots`` turns ``suggest``'s
slots into mapped tasks that each run ``python -m hpo_core.worker`` semantics for one slot, and
``worker_image`` names the image the trials run in (for the model's lineage), if any. Adding a backend
is one module and one entry in :data:`BACKENDS`. ``$HPO_WORKER_BACKEND`` overrides the study's
``worker.backend`` for a whole deployment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from hpo_airflow.backends import kubernetes, local
from hpo_core.errors import StudySpecError
from hpo_core.spec import StudySpec

__all__ = ["BACKENDS", "ENV_BACKEND", "WorkerBackend", "backend_for"]

#: Deployment-wide override of the study files' ``worker.backend`` (read at parse time).
ENV_BACKEND = "HPO_WORKER_BACKEND"


class WorkerBackend(Protocol):
    """What a worker backend module provides."""

    def map_slots(self, spec: StudySpec, *, common: dict[str, Any], start: Any, batch: Any) -> Any:
        """The round's mapped evaluate task, one instance per slot of ``batch`` (an XComArg)."""
        ...

    def check(self, spec: StudySpec, *, source: str | Path) -> None:
        """Refuse settings this backend cannot run (raises ``StudySpecError`` naming ``source``)."""
        ...

    def worker_image(self, spec: StudySpec) -> str | None:
        """The image the study's trials run in, or ``None`` when they run in Airflow's environment."""
        ...


#: Every worker backend a study file may name.
BACKENDS: dict[str, WorkerBackend] = {"local": local, "kubernetes": kubernetes}


def backend_for(
    spec: StudySpec, *, source: str | Path | None = None, env: Mapping[str, str] | None = None
) -> WorkerBackend:
    """The study's worker backend: ``$HPO_WORKER_BACKEND`` overrides the spec's ``worker.backend``.

    Raises:
        StudySpecError: the name is not a registered backend (the message names where it came from).
    """
    env = os.environ if env is None else env
    override = env.get(ENV_BACKEND)
    name = override or spec.worker.backend
    if name not in BACKENDS:
        where = f"environment: {ENV_BACKEND}" if override else f"{source or spec.dag_id}: worker.backend"
        raise StudySpecError(
            f"{where}: {name!r} is not a worker backend; allowed: {', '.join(map(repr, BACKENDS))}"
        )
    return BACKENDS[name]
