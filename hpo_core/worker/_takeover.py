"""Which trial an attempt evaluates, and when it may: the retry rules of DESIGN.md, per trial.

A trial still RUNNING is taken over once the attempt that started it is gone; a trial closed as FAIL
is replaced by a new trial with the same params and ``hpo.retry_of``; a COMPLETE or PRUNED trial is
never evaluated again. Only the holder of a trial's claim evaluates it, so twin launches never run
one trial twice. Whether the previous attempt is gone does not rest on where it ran (a Celery worker
or a pod on another machine, or a container that shares this host name): while it holds the trial's
claim it is alive (the database drops a claim with its holder's session, on any host; a trial
process that outlived its killed worker still holds it through the inherited connection); with the
claim free it is gone once its process is gone (checked only when it ran in this very kernel and PID
namespace, :func:`process_identity`) or, anywhere else, once its heartbeat is three periods old.
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

__all__ = ["attempt_of", "await_previous_attempt", "claim", "process_identity", "resolve_trial"]

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

    Follows the chain of replacements; creates a new replacement when the last one failed. Reads
    the requested trial and its replacements only, not the study (a large study stays cheap).

    Returns:
        ``(trial, finished)``: ``finished`` is True when the trial already has a final result.
    """
    found = stored.read_trials(study, numbers=[requested])
    if not found:
        raise TrialStateError(f"study {study.study_name!r} has no trial {requested}")
    current = found[0]
    while True:
        if current.state in (TrialState.COMPLETE, TrialState.PRUNED):
            return current, True
        if current.state in (TrialState.RUNNING, TrialState.WAITING):
            return current, False
        if attempt_of(current) >= attempt:
            # Failed under this attempt (a twin launch) or a later one: that is this attempt's result.
            return current, True
        successors = _replacements_of(study, current.number)
        if not successors:
            return _create_replacement(study, current, requested=requested, attempt=attempt), False
        current = successors[0]


def _replacements_of(study: optuna.Study, number: int) -> list[FrozenTrial]:
    """The trials created to replace trial ``number`` (``hpo.retry_of``), oldest first."""
    return stored.read_trials(study, having=(TrialAttr.RETRY_OF, number))


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
    rivals = [t.number for t in _replacements_of(study, failed.number) if t.number != created.number]
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
    study: optuna.Study, storage_url: str, frozen: FrozenTrial, *, interval: float, limit: float
) -> FrozenTrial:
    """Wait while the attempt that started ``frozen`` may still be running it (at most ``limit`` s)."""
    deadline = time.monotonic() + limit
    announced = False
    while _previous_attempt_alive(storage_url, frozen, interval) and time.monotonic() < deadline:
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


def process_identity() -> dict[str, Any]:
    """This process, as recorded on the trial it evaluates (``hpo.worker``).

    A host name is no identity (containers and pods may share one, PIDs are per namespace): the
    kernel's boot id and the PID namespace say whether another process can check this one at all,
    and the start time tells it from a later process that reuses the PID.
    """
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
        "started": _start_ticks(pid),
    }


def _previous_attempt_alive(storage_url: str, trial: FrozenTrial, interval: float) -> bool:
    """Whether the worker recorded on ``trial`` may still be evaluating it (see the module docstring)."""
    if _claim_held(storage_url, trial):
        return True
    worker = trial.user_attrs.get(TrialAttr.WORKER) or {}
    if _same_pid_namespace(worker):
        return _process_alive(worker.get("pid"), worker.get("started"))
    beat = float(trial.user_attrs.get(TrialAttr.HEARTBEAT) or 0)
    return time.time() - beat <= 3 * interval


def _claim_held(storage_url: str, trial: FrozenTrial) -> bool:
    """Whether some process holds the trial's claim now (False where the database has no claims)."""
    probe = TrialClaim(storage_url, stored.trial_id(trial))
    if probe.try_acquire():
        probe.release()
        return False
    return True


def _same_pid_namespace(worker: dict[str, Any]) -> bool:
    """Whether the recorded process ran under this kernel boot and in this PID namespace."""
    boot, namespace = worker.get("boot_id"), worker.get("pid_ns")
    return (
        bool(boot and namespace)
        and boot == _read("/proc/sys/kernel/random/boot_id")
        and (namespace == _pid_namespace())
    )


def _process_alive(pid: Any, started: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat.rsplit(")", 1)[-1].split()
    if fields[0] == "Z":  # a killed child its parent has not reaped yet is a zombie: gone too
        return False
    # Another process that got the same PID later is not the recorded one.
    return started is None or str(started) == fields[19]


@functools.cache
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None
