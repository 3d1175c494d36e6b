"""Hyperparameter optimisation core: study spec, engine, worker, tracking and registry.

Nothing here imports Airflow, so trial workers run without it.
"""

from __future__ import annotations

from hpo_core.errors import (
    HpoError,
    ObjectiveError,
    PromotionError,
    SearchSpaceError,
    StorageConfigError,
    StudyOutcomeError,
    StudySpecError,
    TrialStateError,
)
from hpo_core.spec import StudySpec, load_spec, parse_spec

__all__ = [
    "HpoError",
    "ObjectiveError",
    "PromotionError",
    "SearchSpaceError",
    "StorageConfigError",
    "StudyOutcomeError",
    "StudySpec",
    "StudySpecError",
    "TrialStateError",
    "load_spec",
    "parse_spec",
]
