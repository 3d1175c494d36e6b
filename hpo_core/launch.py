"""The worker command line, shared by the local and the Kubernetes backends."""

from __future__ import annotations

__all__ = ["worker_arguments"]


def worker_arguments(
    *, study_name: str, trial_number: int | str, attempt: int | str, timeout: int | None
) -> list[str]:
    """Arguments after ``python -m hpo_core.worker``; they carry identifiers only, never credentials."""
    args = ["--study-name", str(study_name), "--trial-number", str(trial_number), "--attempt", str(attempt)]
    if timeout:
        args += ["--timeout", str(timeout)]
    return args
