"""Trial worker: ``python -m hpo_core.worker --study-name S --trial-number N [--trial-number M ...]``.

Evaluates one *slot*: the trials named, in order, in one warm process (:func:`run_slot`; the local
backend calls it inside the Airflow task process, a Kubernetes pod runs this command). The study,
the storage, the ``MlflowClient`` and the objective's module are loaded once per slot; each
trial's objective then runs in a child forked from the slot process, which reports its result
back. For each trial the slot claims it, opens its MLflow child run, waits for the child, and tells
the storage COMPLETE, PRUNED or FAIL with the reason, so a crash, hang, NaN or SIGKILL of one
trial ends that trial only and the slot goes on. Locations and credentials come from the
environment (see :mod:`hpo_core.deployment`), never from the arguments.

Retry semantics (DESIGN.md), per trial: a trial still RUNNING is taken over; a trial closed as FAIL
is replaced by a new trial with the same params and ``hpo.retry_of``; a COMPLETE or PRUNED trial is
never evaluated again. Before taking a trial over, the worker makes sure the attempt that started
it is gone (no live process on this host, no recent heartbeat), so one trial never runs twice at
once; the abandoned attempt's MLflow run is closed as FAILED. Beyond DESIGN.md: a trial whose
forked child dies (SIGKILL, out of memory) is closed as FAIL at once by its slot (``killed: …``);
only the death of the whole slot process leaves trials RUNNING for a take-over or ``observe``.
``hpo.worker.pid`` is the slot process's.

Writes to the storage that a dropped or restarting database interrupts are retried a few times
(only connection errors; anything else is raised at once).

Modules: :mod:`._slot` (the warm worker and its trials), :mod:`._takeover` (which trial an attempt
evaluates, and when: the retry rules), :mod:`._child` (the forked trial process),
:mod:`._resilient` (storage calls over a dropped connection), :mod:`.__main__` (the command line).
"""

from __future__ import annotations

from hpo_core.worker._child import install_fork_guard
from hpo_core.worker._outcome import TrialOutcome
from hpo_core.worker._slot import heartbeat_interval, run_slot, run_trial, traceback_tail

__all__ = ["TrialOutcome", "heartbeat_interval", "run_slot", "run_trial", "traceback_tail"]

# Every process that runs slots forks trial children: never share a pooled connection across fork.
install_fork_guard()
