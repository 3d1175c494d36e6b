"""Which trial an attempt evaluates, and when it may: the retry rules of DESIGN.md, per trial.

A trial still RUNNING is taken over once the attempt that started it is gone; a trial closed as FAIL
is replaced by a new trial with the same params and ``hpo.retry_of``; a COMPLETE or PRUNED trial is
never evaluated again. Only the holder of a trial's claim evaluates it, so twin launches never run
one trial twice. Whether the previous attempt is gone is decided from the trial's own record (its
heartbeat) on any host; on the same host its process is checked too.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_core.errors import TrialStateError
from hpo_core.keys import TrialAttr
from hpo_core.storage import TrialClaim
from hpo_core.storage import trials as stored

__all__ = ["attempt_of", "await_previous_attempt", "claim", "resolve_trial"]

log = logging.getLogger("hpo_core.worker")

#: Attributes of a failed trial that describe its own evaluation, not the trial: not copied.
_NOT_INHERITED = (
    TrialAttr.MODEL_URI,
    TrialAttr.MLFLOW_RUN,
    TrialAttr.METRICS,
    TrialAttr.WORKER,
    TrialAttr.HEARTBEAT,
)


def resolve_trial(study: optuna.Study, requested: int, *, attempt: int) -> tuple[FrozenTrial, bool]:
    """Find the trial this attempt must evaluate for mapped trial ``requested``.

    Follows the chain of replacements; creates a new replacement when the last one failed.

    Returns:
        ``(trial, finished)``: ``finished`` is True when the trial already has a final result.
    """
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    if requested not in by_number:
        raise TrialStateError(f"study {study.study_name!r} has no trial {requested}")
    current = by_number[requested]
    while True:
        if current.state in (TrialState.COMPLETE, TrialState.PRUNED):
            return current, True
        if current.state in (TrialState.RUNNING, TrialState.WAITING):
            return current, False
        if attempt_of(current) >= attempt:
            # Failed under this attempt (a twin launch) or a later one: that is this attempt's result.
            return current, True
        successors = sorted(
            (t for t in by_number.values() if t.user_attrs.get(TrialAttr.RETRY_OF) == current.number),
            key=lambda t: t.number,
        )
        if not successors:
            return _create_replacement(study, current, requested=requested, attempt=attempt), False
        current = successors[0]


def attempt_of(trial: FrozenTrial) -> int:
    """The attempt number of the worker that last claimed ``trial`` (0: none did)."""
    worker = trial.user_attrs.get(TrialAttr.WORKER)
    return int(worker.get("attempt") or 0) if isinstance(worker, dict) else 0


def _create_replacement(
    study: optuna.Study, failed: FrozenTrial, *, requested: int, attempt: int
) -> FrozenTrial:
    attrs = {k: v for k, v in failed.user_attrs.items() if k.startswith("hpo.") and k not in _NOT_INHERITED}
    attrs.update(
        {
            TrialAttr.RETRY_OF: failed.number,
            TrialAttr.RETRY_ROOT: requested,
            TrialAttr.CREATED_BY_ATTEMPT: attempt,
        }
    )
    created = stored.create_trial(
        study, params=failed.params, distributions=failed.distributions, attrs=attrs
    )
    # Two attempts racing for the same replacement: the later one discards itself.
    rivals = [
        t.number
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get(TrialAttr.RETRY_OF) == failed.number and t.number != created.number
    ]
    if rivals and min(rivals) < created.number:
        stored.fail_trial(study, created, "duplicate replacement", key=TrialAttr.DISCARDED)
        return stored.trial_by_number(study, min(rivals))
    log.info("trial %d had failed: evaluating its params again as trial %d", failed.number, created.number)
    return created


def claim(
    study: optuna.Study,
    storage_url: str,
    frozen: FrozenTrial,
    requested: int,
    *,
    attempt: int,
    claims: list[TrialClaim],
) -> tuple[FrozenTrial, bool]:
    """Claim ``frozen`` before evaluating it; while another live worker holds it, wait.

    Returns:
        ``(trial, finished)`` as :func:`resolve_trial` does, for the trial now claimed (its claim is
        appended to ``claims``) or for the result the other worker produced meanwhile.
    """
    while True:
        trial_claim = TrialClaim(storage_url, stored.trial_id(frozen))
        trial_claim.acquire(on_wait=functools.partial(_log_claimed, study, frozen))
        try:
            current = stored.get_trial(study, stored.trial_id(frozen))
        except BaseException:
            trial_claim.release()  # a dropped connection: the caller may try again
            raise
        if not current.state.is_finished():
            claims.append(trial_claim)
            return current, False
        trial_claim.release()
        frozen, finished = resolve_trial(study, requested, attempt=attempt)
        if finished:
            return frozen, True


def _log_claimed(study: optuna.Study, frozen: FrozenTrial) -> None:
    holder = stored.get_trial(study, stored.trial_id(frozen)).user_attrs.get(TrialAttr.WORKER)
    log.warning(
        "trial %d is being evaluated by another worker (%s); waiting for it to finish", frozen.number, holder
    )


def await_previous_attempt(
    study: optuna.Study, frozen: FrozenTrial, *, interval: float, limit: float
) -> FrozenTrial:
    """Wait while the attempt that started ``frozen`` may still be running it (at most ``limit`` s)."""
    deadline = time.monotonic() + limit
    announced = False
    while _previous_attempt_alive(frozen, interval) and time.monotonic() < deadline:
        if not announced:
            log.warning(
                "trial %d: the attempt that started it may still be running (%s); waiting for it",
                frozen.number,
                frozen.user_attrs.get(TrialAttr.WORKER),
            )
            announced = True
        time.sleep(min(interval, 2.0))
        frozen = stored.get_trial(study, stored.trial_id(frozen))
        if frozen.state.is_finished():
            break
    return frozen


def _previous_attempt_alive(trial: FrozenTrial, interval: float) -> bool:
    """Whether the worker recorded on ``trial`` may still be evaluating it.

    It is gone when its heartbeat is older than three periods, or, on this host, when its
    process no longer exists.
    """
    worker = trial.user_attrs.get(TrialAttr.WORKER) or {}
    beat = float(trial.user_attrs.get(TrialAttr.HEARTBEAT) or 0)
    if time.time() - beat > 3 * interval:
        return False
    if worker.get("host") == socket.gethostname():
        return _process_alive(worker.get("pid"))
    return True


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: gone too
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
