"""The worker command line, shared by the local and the Kubernetes backends."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["worker_arguments"]


def worker_arguments(
    *, study_name: str, trial_numbers: Sequence[int | str], attempt: int | str, timeout: int | None
) -> list[str]:
    """Arguments after ``python -m hpo_core.worker`` for one slot (its trials, evaluated in order).

    They carry identifiers only, never credentials.
    """
    args = ["--study-name", str(study_name)]
    for number in trial_numbers:
        args += ["--trial-number", str(number)]
    args += ["--attempt", str(attempt)]
    if timeout:
        args += ["--timeout", str(timeout)]
    return args
