"""MLflow, through ``MlflowClient`` only: the study's runs (:mod:`.runs`), the lineage of a registered
version (:mod:`.lineage`), the registry (:mod:`.registry`) and the promotion rules (:mod:`.promotion`).

Tracking is never the source of truth (DESIGN.md): the Optuna storage is.
"""

from __future__ import annotations

from hpo_core.tracking.runs import client

__all__ = ["client"]
