"""Exceptions of the HPO pipeline: one base class, specific subclasses that are also builtins."""

from __future__ import annotations

__all__ = [
    "HpoError",
    "ObjectiveError",
    "PromotionError",
    "RegistryError",
    "SearchSpaceError",
    "StorageConfigError",
    "StudyOutcomeError",
    "StudySpecError",
    "TrackingError",
    "TrialStateError",
]


class HpoError(Exception):
    """Base class of every error raised on purpose by this project."""


class StudySpecError(HpoError, ValueError):
    """A study definition (YAML) is invalid; the message names file, field, value and fix."""


class SearchSpaceError(HpoError, ValueError):
    """Params do not fit the declared search space (undeclared or inactive parameter, bad value)."""


class ObjectiveError(HpoError, RuntimeError):
    """The objective could not be imported or returned something unusable."""


class TrialStateError(HpoError, RuntimeError):
    """A trial is not in a state that allows the requested operation."""


class StorageConfigError(HpoError, ValueError):
    """The Optuna storage or MLflow location is missing or malformed."""


class StudyOutcomeError(HpoError, RuntimeError):
    """The study finished without a usable result (no completed trial, too many failures)."""


class PromotionError(HpoError, ValueError):
    """A registry promotion or rollback cannot be carried out as asked."""


class RegistryError(HpoError, RuntimeError):
    """The MLflow model registry did not register a version as asked (refused it, or timed out)."""


class TrackingError(HpoError, RuntimeError):
    """MLflow (tracking server or registry) could not be reached or failed; retry once it is back.

    Only MLflow's "does not exist" answer means "none"; every other error becomes this one, so an
    outage is never mistaken for "no champion yet" or "not registered yet".
    """
