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

Exit codes: 0 every trial finished (now or before), 1 a trial failed, 2 usage or setup error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_core import engine
from hpo_core.deployment import Deployment
from hpo_core.errors import HpoError, ObjectiveError, TrialStateError
from hpo_core.objective import TrialContext, call_objective, normalize_result
from hpo_core.space import import_callable
from hpo_core.spec import StudySpec
from hpo_core.storage import TrialClaim

__all__ = ["TrialOutcome", "main", "run_trial"]

log = logging.getLogger("hpo_core.worker")
RESULT_PREFIX = "HPO_RESULT "
EXIT_OK, EXIT_TRIAL_FAILED, EXIT_SETUP = 0, 1, 2
#: Trial attributes written by the worker: who runs the trial, and its last sign of life.
T_WORKER = "hpo.worker"
T_HEARTBEAT = "hpo.heartbeat"
#: Heartbeat period without ``trial.stale_timeout``; with it, a third of that timeout.
HEARTBEAT_SECONDS = 15.0
#: Lines of a traceback repeated in the task log next to the failure reason.
TRACEBACK_TAIL_LINES = 30
_STORAGE_ATTEMPTS = 6
_T = TypeVar("_T")


class TrialTimeout(BaseException):
    """The objective ran past the trial's execution timeout."""


class TrialTerminated(BaseException):
    """The worker was asked to stop (SIGTERM from Airflow or Kubernetes)."""


@dataclass(frozen=True)
class TrialOutcome:
    """What happened to the trial; printed as the worker's last line for the task log."""

    trial_number: int
    requested: int
    state: str
    values: list[float] | None = None
    reason: str | None = None
    retry_of: int | None = None
    already_finished: bool = False

    def to_json(self) -> str:
        """One line of JSON."""
        return json.dumps(self.__dict__, default=str)

    @property
    def ok(self) -> bool:
        """Whether the trial has a usable final state (COMPLETE or PRUNED, now or before)."""
        return self.state in (TrialState.COMPLETE.name, TrialState.PRUNED.name)

    def summary(self) -> str:
        """One line for the task log: ``trial 9 (retry of 4): COMPLETE 0.9931``."""
        head = f"trial {self.trial_number}"
        if self.trial_number != self.requested:
            head += f" (for trial {self.requested})"
        if self.retry_of is not None:
            head += f" (retry of {self.retry_of})"
        text = f"{head}: {self.state}"
        if self.values:
            text += " " + ", ".join(f"{v:.6g}" for v in self.values)
        if self.already_finished:
            text += " (already finished: not evaluated again)"
        if self.reason and not self.ok:
            text += f": {self.reason}"
        return text


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
        if _attempt_of(current) >= attempt:
            # Failed under this attempt (a twin launch) or a later one: that is this attempt's result.
            return current, True
        successors = sorted(
            (t for t in by_number.values() if t.user_attrs.get(engine.T_RETRY_OF) == current.number),
            key=lambda t: t.number,
        )
        if not successors:
            return _create_replacement(study, current, requested=requested, attempt=attempt), False
        current = successors[0]


def _attempt_of(trial: FrozenTrial) -> int:
    """The attempt number of the worker that last claimed ``trial`` (0: none did)."""
    worker = trial.user_attrs.get(T_WORKER)
    return int(worker.get("attempt") or 0) if isinstance(worker, dict) else 0


#: Attributes of a failed trial that describe its own evaluation, not the trial: not copied.
_NOT_INHERITED = (engine.T_MODEL_URI, engine.T_MLFLOW_RUN, engine.T_METRICS, T_WORKER, T_HEARTBEAT)


def _create_replacement(
    study: optuna.Study, failed: FrozenTrial, *, requested: int, attempt: int
) -> FrozenTrial:
    attrs = {k: v for k, v in failed.user_attrs.items() if k.startswith("hpo.") and k not in _NOT_INHERITED}
    attrs.update(
        {engine.T_RETRY_OF: failed.number, engine.T_RETRY_ROOT: requested, "hpo.created_by_attempt": attempt}
    )
    template = optuna.trial.FrozenTrial(
        number=-1,
        trial_id=-1,
        state=TrialState.RUNNING,
        value=None,
        values=None,
        datetime_start=dt.datetime.now(),
        datetime_complete=None,
        params=dict(failed.params),
        distributions=dict(failed.distributions),
        user_attrs=attrs,
        system_attrs={},
        intermediate_values={},
    )
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    created = study._storage.get_trial(trial_id)
    # Two attempts racing for the same replacement: the later one discards itself.
    rivals = [
        t.number
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get(engine.T_RETRY_OF) == failed.number and t.number != created.number
    ]
    if rivals and min(rivals) < created.number:
        study._storage.set_trial_user_attr(trial_id, engine.T_DISCARDED, "duplicate replacement")
        study.tell(created.number, state=TrialState.FAIL)
        return study._storage.get_trial(
            study._storage.get_trial_id_from_study_id_trial_number(study._study_id, min(rivals))
        )
    log.info("trial %d had failed: evaluating its params again as trial %d", failed.number, created.number)
    return created


def run_slot(
    *,
    deployment: Deployment,
    study_name: str,
    trial_numbers: Sequence[int],
    attempt: int = 1,
    timeout: float | None = None,
    relay: Callable[[str], None] | None = None,
) -> list[TrialOutcome]:
    """Evaluate the mapped trials ``trial_numbers`` of one slot, in sequence, in this warm process.

    The study, the storage and the MLflow client are opened once for the slot and the objective is
    imported once; each trial's objective then runs in a child forked from this process, so a crash,
    a hang or a SIGKILL ends only that trial, which this process closes with its reason. Every
    trial's result is told to the storage as soon as it finishes. A trial that fails does not stop
    the others; a trial already finished (a retry of the slot) is reported, not evaluated again.

    Args:
        relay: called with each line the objective prints or logs (the task log); default: this
            process's stderr.

    Raises:
        HpoError: the study cannot be loaded (a setup error: no trial was touched).
    """
    slot = _Slot.open(deployment, study_name, attempt=attempt, timeout=timeout, relay=relay)
    with _forward_sigterm(slot):
        return _run_each(slot, trial_numbers)


@contextlib.contextmanager
def _forward_sigterm(slot: _Slot) -> Iterator[None]:
    """On SIGTERM (Airflow stopping the task, Kubernetes the pod), the running trial's process is
    asked to stop, so it records why; the slot starts no further trial. Airflow's own handler, if
    any, still runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum: int, frame: Any) -> None:
        slot.stop()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_each(slot: _Slot, trial_numbers: Sequence[int]) -> list[TrialOutcome]:
    outcomes: list[TrialOutcome] = []
    for number in trial_numbers:
        if slot.stopping:
            log.warning("trial %d not started: the worker was asked to stop", number)
            outcomes.append(
                TrialOutcome(number, number, "NOT_STARTED", reason="the worker was asked to stop")
            )
            continue
        try:
            outcome = slot.run(number)
        except (HpoError, ObjectiveError) as e:  # e.g. no such trial: nothing was evaluated
            log.error("trial %d: %s", number, e)
            outcome = TrialOutcome(number, number, "ERROR", reason=str(e))
        except Exception as e:  # a storage or tracking outage: the slot's other trials still run
            log.exception("trial %d could not be evaluated", number)
            outcome = TrialOutcome(number, number, "ERROR", reason=f"worker error: {_brief(e)}")
        outcomes.append(outcome)
        log.info("%s", outcome.summary())
    return outcomes


def run_trial(
    *,
    deployment: Deployment,
    study_name: str,
    trial_number: int,
    attempt: int = 1,
    timeout: float | None = None,
) -> TrialOutcome:
    """Evaluate mapped trial ``trial_number`` of ``study_name``: a slot of one trial."""
    return run_slot(
        deployment=deployment,
        study_name=study_name,
        trial_numbers=[trial_number],
        attempt=attempt,
        timeout=timeout,
    )[0]


def _claim(
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
        claim = TrialClaim(storage_url, frozen._trial_id)
        claim.acquire(on_wait=functools.partial(_log_claimed, study, frozen))
        try:
            current = study._storage.get_trial(frozen._trial_id)
        except BaseException:
            claim.release()  # a dropped connection: the caller may try again
            raise
        if not current.state.is_finished():
            claims.append(claim)
            return current, False
        claim.release()
        frozen, finished = resolve_trial(study, requested, attempt=attempt)
        if finished:
            return frozen, True


def _log_claimed(study: optuna.Study, frozen: FrozenTrial) -> None:
    holder = study._storage.get_trial(frozen._trial_id).user_attrs.get(T_WORKER)
    log.warning(
        "trial %d is being evaluated by another worker (%s); waiting for it to finish", frozen.number, holder
    )


@dataclass
class _Evaluation:
    """What the forked child reports about one objective call."""

    state: str = TrialState.FAIL.name
    values: list[float] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    error_text: str | None = None
    model_uri: str | None = None
    lineage: dict[str, str] = field(default_factory=dict)
    #: Modules the trial imported that this slot process has not: imported here before the next
    #: trial's fork, so only the slot's first trial pays for the objective's lazy imports.
    new_modules: list[str] = field(default_factory=list)


class _Slot:
    """One warm worker: the study, its spec, the MLflow client and the objective, loaded once."""

    def __init__(
        self,
        *,
        deployment: Deployment,
        loaded: engine.LoadedStudy,
        attempt: int,
        timeout: float,
        relay: Callable[[str], None],
    ) -> None:
        self.deployment, self.study, self.spec = deployment, loaded.study, loaded.spec
        self.attempt, self.timeout, self.relay = attempt, timeout, relay
        self.interval = heartbeat_interval(loaded.spec)
        self.stopping = False
        self._child: _Child | None = None
        self.modules_at_fork: frozenset[str] = frozenset()
        self.config = loaded.config
        self.parent_run = loaded.attrs.get(engine.ATTR_PARENT_RUN)
        self.experiment_id = loaded.attrs.get(engine.ATTR_EXPERIMENT)
        from hpo_core import tracking

        self.mlflow = tracking.client(deployment)
        try:  # warm: imported once here, every trial's child inherits it
            self.objective: Callable[..., Any] | None = import_callable(loaded.spec.objective)
        except Exception:  # reported per trial, with its traceback, by the child that imports again
            self.objective = None

    @classmethod
    def open(
        cls,
        deployment: Deployment,
        study_name: str,
        *,
        attempt: int,
        timeout: float | None,
        relay: Callable[[str], None] | None,
    ) -> _Slot:
        loaded = _storage_call("load the study", lambda: engine.load_run(deployment.storage_url, study_name))
        return cls(
            deployment=deployment,
            loaded=loaded,
            attempt=attempt,
            timeout=float(timeout if timeout is not None else loaded.spec.trial.execution_timeout),
            relay=relay or _relay_to_stderr,
        )

    def stop(self) -> None:
        """Stop after the running trial, which is asked to stop now (safe in a signal handler)."""
        self.stopping = True
        child = self._child
        if child is not None:
            child.ask_to_stop()

    def run(self, requested: int) -> TrialOutcome:
        """Resolve, claim and evaluate mapped trial ``requested`` (see the module docstring)."""
        claims: list[TrialClaim] = []
        try:
            return self._run(requested, claims)
        finally:
            for claim in claims:
                claim.release()

    def _resolve_and_claim(
        self, requested: int, claims: list[TrialClaim]
    ) -> tuple[FrozenTrial, bool, dict[str, Any] | None]:
        study, attempt = self.study, self.attempt
        frozen, finished = resolve_trial(study, requested, attempt=attempt)
        if not finished and frozen.user_attrs.get(T_WORKER) is not None:
            # An earlier attempt started this trial and did not report: take it over once it is gone.
            frozen = _await_previous_attempt(
                study, frozen, interval=self.interval, limit=self.timeout or self.interval
            )
            frozen, finished = resolve_trial(study, requested, attempt=attempt)
        if not finished:
            frozen, finished = _claim(
                study, self.deployment.storage_url, frozen, requested, attempt=attempt, claims=claims
            )
        return frozen, finished, frozen.user_attrs.get(T_WORKER) if not finished else None

    def _run(self, requested: int, claims: list[TrialClaim]) -> TrialOutcome:
        study, attempt = self.study, self.attempt
        frozen, finished, abandoned = _storage_call(
            f"trial {requested}: resolve and claim", lambda: self._resolve_and_claim(requested, claims)
        )
        retry_of = frozen.user_attrs.get(engine.T_RETRY_OF)
        if finished:
            log.info("trial %d is already %s: not evaluating it again", frozen.number, frozen.state.name)
            return TrialOutcome(
                frozen.number,
                requested,
                frozen.state.name,
                frozen.values,
                frozen.user_attrs.get(engine.FAIL_REASON),
                retry_of,
                True,
            )
        storage, trial_id = study._storage, frozen._trial_id

        def set_attr(key: str, value: Any) -> None:
            _storage_call(
                f"trial {frozen.number}: set {key}", lambda: storage.set_trial_user_attr(trial_id, key, value)
            )

        now = time.time()
        worker = {"host": socket.gethostname(), "pid": os.getpid(), "attempt": attempt, "started_at": now}
        set_attr(T_WORKER, worker)
        set_attr(T_HEARTBEAT, now)
        params = dict(frozen.params)
        log.info("trial %d (attempt %d) params: %s", frozen.number, attempt, json.dumps(params, default=str))
        from hpo_core import tracking

        if abandoned is not None:
            taken_over = (
                f"attempt {abandoned.get('attempt')} (pid {abandoned.get('pid')} on {abandoned.get('host')}) "
                f"ended without reporting a result; attempt {attempt} took the trial over"
            )
            log.warning("trial %d: %s", frozen.number, taken_over)
            previous_run = frozen.user_attrs.get(engine.T_MLFLOW_RUN)
            if previous_run:
                tracking.fail_trial_run(self.mlflow, previous_run, reason=f"worker lost: {taken_over}")
        round_number = int(frozen.user_attrs.get(engine.T_ROUND) or 0)
        run_tags = {
            "hpo.study": study.study_name,
            "hpo.trial_number": str(frozen.number),
            "hpo.round": str(frozen.user_attrs.get(engine.T_ROUND)),
            "hpo.attempt": str(attempt),
            "hpo.role": "trial",
            "mlflow.runName": f"trial {frozen.number} · attempt {attempt}",
        }
        if self.parent_run:
            run_tags["mlflow.parentRunId"] = self.parent_run
        if retry_of is not None:
            run_tags["hpo.retry_of"] = str(retry_of)
        run_id = _start_trial_run(
            self.mlflow,
            experiment_id=self.experiment_id,
            run_name=run_tags["mlflow.runName"],
            tags=run_tags,
            params=tracking.flat_params(params),
        )
        set_attr(engine.T_MLFLOW_RUN, run_id)
        result = self._evaluate(frozen, params, run_id=run_id, round_number=round_number)
        return self._record(frozen, requested, params, result, run_id=run_id, retry_of=retry_of)

    def _evaluate(
        self, frozen: FrozenTrial, params: dict[str, Any], *, run_id: str, round_number: int
    ) -> _Evaluation:
        """Run the objective in a forked child (its crash, hang or kill ends only this trial)."""
        seed = (self.config.seed or 0) * 100_003 + frozen.number
        self.modules_at_fork = frozenset(sys.modules)
        child = _Child.fork(
            lambda: _evaluate_in_child(
                self, frozen, params, run_id=run_id, seed=seed, round_number=round_number
            )
        )
        self._child = child
        if self.stopping:  # SIGTERM arrived while the child was being forked
            child.ask_to_stop()
        # Started after the fork: the child must not inherit a thread that may hold a lock.
        heartbeat = _Heartbeat(self.study._storage, frozen._trial_id, interval=self.interval)
        heartbeat.start()
        hard_limit = self.timeout + CHILD_KILL_GRACE if self.timeout else None
        try:
            return child.wait(relay=self.relay, hard_limit=hard_limit, timeout=self.timeout)
        except BaseException:
            # Airflow stops the task (timeout, kill, state changed from outside): stop the trial so
            # it records why, then let the caller handle it.
            self.stopping = True
            result = child.terminate(relay=self.relay)
            if result is not None:
                self._record(frozen, frozen.number, params, result, run_id=run_id, retry_of=None)
            raise
        finally:
            self._child = None
            heartbeat.stop()

    def _record(
        self,
        frozen: FrozenTrial,
        requested: int,
        params: dict[str, Any],
        result: _Evaluation,
        *,
        run_id: str,
        retry_of: Any,
    ) -> TrialOutcome:
        """Tell the storage and close the MLflow run: the slot process does it, whatever the child did."""
        storage, trial_id = self.study._storage, frozen._trial_id
        attrs: dict[str, Any] = {}
        if result.model_uri:
            attrs[engine.T_MODEL_URI] = result.model_uri
        if result.lineage:
            attrs[engine.T_LINEAGE] = result.lineage
        state = TrialState[result.state]
        if state == TrialState.COMPLETE:
            attrs[engine.T_METRICS] = result.metrics
        reason = result.reason
        if state == TrialState.FAIL:
            reason = reason or "unknown failure"
            log.error(
                "trial %d failed: %s\nparams: %s\n%s",
                frozen.number,
                reason,
                json.dumps(params, default=str),
                traceback_tail(result.error_text or ""),
            )
            attrs[engine.FAIL_REASON] = reason[:2000]
        for key, value in attrs.items():
            _storage_call(
                f"trial {frozen.number}: set {key}",
                functools.partial(storage.set_trial_user_attr, trial_id, key, value),
            )
        _finish_trial_run(
            self.mlflow,
            run_id,
            state=state.name,
            metrics=result.metrics if state == TrialState.COMPLETE else {},
            reason=reason,
            error_text=(
                f"trial {frozen.number} failed (attempt {self.attempt})\n"
                f"params: {json.dumps(params, default=str)}\n{reason}\n\n" + (result.error_text or "")
                if state == TrialState.FAIL
                else None
            ),
        )
        _tell(self.study, frozen, state=state, values=result.values if state == TrialState.COMPLETE else None)
        _import_quietly(result.new_modules)
        return TrialOutcome(frozen.number, requested, state.name, result.values, reason, retry_of)


def _evaluate_in_child(
    slot: _Slot,
    frozen: FrozenTrial,
    params: dict[str, Any],
    *,
    run_id: str,
    seed: int,
    round_number: int,
) -> _Evaluation:
    """The objective call, in the forked child; everything it logs goes to the slot's relay."""
    import mlflow

    spec, result = slot.spec, _Evaluation()
    # The objective may use MLflow's fluent API (mlflow.log_metric, autolog, log_model): its run is
    # the trial's, in the study's experiment whatever the environment or an earlier caller set.
    for variable in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        os.environ.pop(variable, None)
    if slot.experiment_id is not None:
        mlflow.set_experiment(experiment_id=str(slot.experiment_id))
    mlflow.start_run(run_id=run_id, nested=True)
    trial = optuna.trial.Trial(slot.study, frozen._trial_id)
    ctx = TrialContext(
        trial=trial,
        spec=spec,
        params=params,
        seed=seed,
        round_number=round_number,
        mlflow_run_id=run_id,
        attempt=slot.attempt,
        mlflow_client=slot.mlflow,
    )
    try:
        with _time_limit(slot.timeout), _terminate_on_sigterm():
            objective = slot.objective or import_callable(spec.objective)
            returned = call_objective(objective, ctx, trial)
        values, extra = normalize_result(spec, returned)
        result.state, result.values = TrialState.COMPLETE.name, values
        result.metrics = dict(zip(spec.objective_metrics, values, strict=True)) | extra
    except optuna.TrialPruned as e:
        result.state, result.reason = TrialState.PRUNED.name, f"pruned: {e}" if str(e) else "pruned"
    except TrialTimeout:
        # The traceback shows where the objective was when it was stopped.
        result.reason = f"timeout: the objective ran longer than {slot.timeout:.0f}s"
        result.error_text = traceback.format_exc()
    except TrialTerminated:
        result.reason = "terminated: the worker received SIGTERM (task killed or timed out)"
        result.error_text = traceback.format_exc()
    except SystemExit as e:
        result.reason = f"SystemExit: the objective called exit({e.code!r})"
        result.error_text = traceback.format_exc()
    except Exception as e:
        result.reason = f"{type(e).__name__}: {e}"
        result.error_text = traceback.format_exc()
    result.model_uri, result.lineage = ctx.model_uri, dict(ctx.lineage)
    result.new_modules = [name for name in sys.modules if name not in slot.modules_at_fork]
    return result


def _start_trial_run(
    mlflow_client: Any,
    *,
    experiment_id: str | None,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, str],
) -> str:
    """Create the trial's MLflow child run and log its params: two calls, no fluent run."""
    from mlflow.entities import Param

    run = mlflow_client.create_run(experiment_id or "0", run_name=run_name, tags=tags)
    run_id = str(run.info.run_id)
    if params:
        mlflow_client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    return run_id


def _finish_trial_run(
    mlflow_client: Any,
    run_id: str,
    *,
    state: str,
    metrics: dict[str, float],
    reason: str | None,
    error_text: str | None,
) -> None:
    """Close the trial's run: metrics (COMPLETE), tags and ``error.txt`` (FAIL), in few calls."""
    from mlflow.entities import Metric, RunTag

    from hpo_core import tracking

    now = int(time.time() * 1000)
    tags: list[RunTag] = []
    if state == TrialState.FAIL.name:
        tags.append(RunTag("hpo.error", (reason or "unknown failure")[:5000]))
    elif state == TrialState.PRUNED.name:
        tags.append(RunTag("hpo.pruned", reason or "pruned"))
    if metrics or tags:
        mlflow_client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()], tags=tags
        )
    if error_text is not None:
        mlflow_client.log_text(run_id, error_text, tracking.ERROR_ARTIFACT)
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
    mlflow_client.set_terminated(run_id, status=status)


def _import_quietly(names: Sequence[str]) -> None:
    """Import modules a trial's process imported (in its order), so the next trial starts warm.

    A module that fails here is skipped: the next trial imports it itself, as before.
    """
    for name in names:
        if name in sys.modules or name.startswith("__"):
            continue
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(name)


def _relay_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


#: Seconds a trial's child may run past the trial timeout (its own SIGALRM) before it is killed.
CHILD_KILL_GRACE = 30.0
#: Seconds a child gets to record why it stops after SIGTERM, before SIGKILL.
CHILD_TERM_GRACE = 10.0
_CHILD_CRASH = 70
_PR_SET_PDEATHSIG = 1


class _Child:
    """A forked child evaluating one trial; its output is relayed line by line, its result read once."""

    def __init__(self, pid: int, log_fd: int, result_fd: int) -> None:
        self.pid, self.log_fd, self.result_fd = pid, log_fd, result_fd
        self._pending = b""
        self._result = bytearray()
        self._status: int | None = None

    @classmethod
    def fork(cls, body: Callable[[], _Evaluation]) -> _Child:
        log_r, log_w = os.pipe()
        result_r, result_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = _CHILD_CRASH
            try:
                os.close(log_r)
                os.close(result_r)
                _become_trial_process(log_w, parent)
                evaluation = body()
                code = 0
            except BaseException as e:  # outside the objective: setting the trial up failed
                details = traceback.format_exc()
                evaluation = _Evaluation(
                    reason=f"worker error before the objective ran: {type(e).__name__}: {e}",
                    error_text=details,
                )
                with contextlib.suppress(BaseException):
                    sys.stderr.write(details)
            try:
                _write_all(result_w, json.dumps(asdict(evaluation), default=str).encode())
            except BaseException:
                code = _CHILD_CRASH
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(log_w)
        os.close(result_w)
        return cls(pid, log_r, result_r)

    def _pump(self, relay: Callable[[str], None], wait: float) -> bool:
        """Read what is there (up to ``wait`` seconds); return whether both pipes reached EOF."""
        fds = [fd for fd in (self.log_fd, self.result_fd) if fd >= 0]
        if not fds:
            return True
        ready, _, _ = select.select(fds, [], [], wait)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if fd == self.log_fd:
                if not chunk:
                    os.close(self.log_fd)
                    self.log_fd = -1
                    if self._pending:
                        relay(self._pending.decode(errors="replace"))
                        self._pending = b""
                    continue
                self._pending += chunk
                *lines, self._pending = self._pending.split(b"\n")
                for line in lines:
                    relay(line.decode(errors="replace"))
            elif not chunk:
                os.close(self.result_fd)
                self.result_fd = -1
            else:
                self._result += chunk
        return self.log_fd < 0 and self.result_fd < 0

    def _reap(self) -> bool:
        if self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                return False
            self._status = status
        return True

    def wait(
        self, *, relay: Callable[[str], None], hard_limit: float | None, timeout: float | None
    ) -> _Evaluation:
        """Relay the child's output until it exits; kill it past ``hard_limit`` seconds."""
        deadline = time.monotonic() + hard_limit if hard_limit else None
        killed = False
        while True:
            done = self._pump(relay, 0.5)
            if done and self._status is None:
                time.sleep(0.002)  # both pipes closed: the child is exiting, do not spin
            if self._reap():
                # A process the objective started may still hold the pipes: take what is there.
                end = time.monotonic() + 2.0
                while not done and time.monotonic() < end:
                    done = self._pump(relay, 0.1)
                break
            if deadline is not None and not killed and time.monotonic() > deadline:
                log.error("trial process %d did not stop at its timeout: killing it", self.pid)
                self._signal(signal.SIGKILL)
                killed = True
        self._close()
        if killed and not self._result:
            return _Evaluation(
                reason=f"timeout: the objective ran longer than {timeout or 0:.0f}s and did not stop; killed"
            )
        return self._evaluation()

    def terminate(self, *, relay: Callable[[str], None]) -> _Evaluation | None:
        """Ask the child to stop (it records why), then kill it; its evaluation if it gave one."""
        if self._status is None:
            self._signal(signal.SIGTERM)
            end = time.monotonic() + CHILD_TERM_GRACE
            while not self._reap() and time.monotonic() < end:
                self._pump(relay, 0.2)
            if not self._reap():
                self._signal(signal.SIGKILL)
                os.waitpid(self.pid, 0)
                self._status = -1
        with contextlib.suppress(OSError):
            self._pump(relay, 0.1)
        self._close()
        return self._evaluation() if self._result else None

    def ask_to_stop(self) -> None:
        """SIGTERM to the child: it stops the objective and reports ``terminated``."""
        if self._status is None:
            self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)  # the child leads its own session: its helpers go too

    def _close(self) -> None:
        for name in ("log_fd", "result_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def _evaluation(self) -> _Evaluation:
        if self._result:
            try:
                return _Evaluation(**json.loads(bytes(self._result)))
            except (ValueError, TypeError) as e:
                return _Evaluation(reason=f"the trial's process sent an unreadable result ({e})")
        return _Evaluation(reason=_exit_reason(self._status))


def _exit_reason(status: int | None) -> str:
    """Why a trial's process ended without a result, from its wait status."""
    if status is not None and status >= 0 and os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        hint = " (out of memory, or killed from outside)" if signum == signal.SIGKILL else ""
        return f"killed: the trial's process was killed by {name} before it reported a result{hint}"
    code = os.WEXITSTATUS(status) if status is not None and status >= 0 else None
    if code == _CHILD_CRASH:
        return "crashed: the trial's process failed outside the objective; see the traceback above"
    return f"exited: the trial's process exited with code {code} without reporting a result"


def _become_trial_process(log_fd: int, parent: int) -> None:
    """Set up a freshly forked child: own session, dies with its parent, output to the relay pipe."""
    os.setsid()
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(_CHILD_CRASH)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT, stream=sys.stderr, force=True)
    # The trial's log carries the objective's lines, not the stack's deprecation notices (skops
    # scanning modules inside an Airflow task process trips over a thousand of Airflow's).
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(airflow|mlflow|skops)(\.|$)")
    warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=FutureWarning)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.close(fd)


_FORK_OWNER = os.getpid()
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _install_fork_guard() -> None:
    """Never share a pooled database connection across fork (SQLAlchemy's documented recipe).

    A connection checked out in a process other than the one that opened it is dropped from that
    process's pool without being closed (the other process still uses it), and a new one opened.
    """
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    if not event.contains(Pool, "checkout", _checkout_in_own_process):
        event.listen(Pool, "connect", _remember_owner)
        event.listen(Pool, "checkout", _checkout_in_own_process)


def _remember_owner(dbapi_connection: Any, record: Any) -> None:
    record.info["hpo_pid"] = os.getpid()


def _checkout_in_own_process(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    from sqlalchemy import exc

    owner = record.info.setdefault("hpo_pid", _FORK_OWNER)
    if owner != os.getpid():
        record.dbapi_connection = proxy.dbapi_connection = None
        raise exc.DisconnectionError(f"connection opened by process {owner}, not {os.getpid()}")


def heartbeat_interval(spec: StudySpec) -> float:
    """Seconds between heartbeats: often enough that ``trial.stale_timeout`` sees three of them."""
    stale = spec.trial.stale_timeout
    return min(HEARTBEAT_SECONDS, stale / 3) if stale else HEARTBEAT_SECONDS


def traceback_tail(text: str, lines: int = TRACEBACK_TAIL_LINES) -> str:
    """The last ``lines`` lines of a traceback (where the error was raised)."""
    kept = text.rstrip().splitlines()
    if len(kept) <= lines:
        return "\n".join(kept)
    skipped = f"... ({len(kept) - lines} lines above; error.txt in the MLflow run has all)"
    return "\n".join([skipped, *kept[-lines:]])


def _tell(study: optuna.Study, frozen: FrozenTrial, *, state: TrialState, values: list[float] | None) -> None:
    """Tell the result, retrying over a dropped connection; keep a verdict somebody else gave."""
    told = False

    def tell() -> None:
        nonlocal told
        try:
            told = True
            study.tell(frozen.number, values=values, state=state)
        except (RuntimeError, ValueError) as e:
            current = study._storage.get_trial(frozen._trial_id)
            if told and current.state == state and current.values == values:
                return  # an earlier try went through before its connection dropped
            # Somebody (observe, a stale-trial sweep) closed it meanwhile: keep their verdict.
            raise TrialStateError(f"trial {frozen.number} was closed by someone else: {e}") from e

    _storage_call(f"trial {frozen.number}: tell {state.name}", tell)


def _storage_call(what: str, call: Callable[[], _T]) -> _T:
    """Run ``call``; retry it with back-off (about 15 s in all) while the database connection fails."""
    delay = 0.5
    for attempt in range(1, _STORAGE_ATTEMPTS + 1):
        try:
            return call()
        except Exception as e:
            if attempt == _STORAGE_ATTEMPTS or not _is_connection_error(e):
                raise
            log.warning(
                "%s: storage connection failed (%s); retry %d in %.1fs", what, _brief(e), attempt, delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


def _is_connection_error(error: BaseException) -> bool:
    """A dropped, refused or timed-out database connection (Optuna wraps it in StorageInternalError)."""
    import sqlalchemy.exc

    connection_errors = (
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        sqlalchemy.exc.TimeoutError,
    )
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, connection_errors):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _brief(error: BaseException) -> str:
    root: BaseException = error
    while root.__cause__ is not None:
        root = root.__cause__
    first = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return f"{type(root).__name__}: {first}"[:200]


def _await_previous_attempt(
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
                frozen.user_attrs.get(T_WORKER),
            )
            announced = True
        time.sleep(min(interval, 2.0))
        frozen = study._storage.get_trial(frozen._trial_id)
        if frozen.state.is_finished():
            break
    return frozen


def _previous_attempt_alive(trial: FrozenTrial, interval: float) -> bool:
    """Whether the worker recorded on ``trial`` may still be evaluating it.

    It is gone when its heartbeat is older than three periods, or, on this host, when its
    process no longer exists.
    """
    worker = trial.user_attrs.get(T_WORKER) or {}
    beat = float(trial.user_attrs.get(T_HEARTBEAT) or 0)
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


class _Heartbeat:
    """Marks the trial alive every few seconds, so stale trials can be told from slow ones."""

    def __init__(self, storage: Any, trial_id: int, interval: float = 15.0) -> None:
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpo-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.set_trial_user_attr(self._trial_id, T_HEARTBEAT, time.time())
            except Exception as e:  # a dropped connection must not kill the trial
                log.warning("heartbeat failed: %s", type(e).__name__)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


class _time_limit:
    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        if self.seconds:
            signal.signal(signal.SIGALRM, self._raise)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise TrialTimeout()


class _terminate_on_sigterm:
    def __enter__(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._raise)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise TrialTerminated()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hpo_core.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--study-name", required=True, help="Optuna study name")
    parser.add_argument(
        "--trial-number",
        required=True,
        type=int,
        action="append",
        dest="trial_numbers",
        help="trial number chosen by suggest; repeat it for a slot of several trials (run in order)",
    )
    parser.add_argument("--attempt", type=int, default=1, help="Airflow try number of this attempt")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds before a trial FAILs (timeout), per trial"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT, stream=sys.stderr)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = _parse_args(argv)
    try:
        outcomes = run_slot(
            deployment=Deployment.from_env(),
            study_name=args.study_name,
            trial_numbers=args.trial_numbers,
            attempt=args.attempt,
            timeout=args.timeout,
        )
    except (HpoError, ObjectiveError) as e:
        log.error("cannot run trials %s: %s", args.trial_numbers, e)
        return EXIT_SETUP
    for outcome in outcomes:
        print(RESULT_PREFIX + outcome.to_json(), flush=True)
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        log.error("trial %d %s: %s", outcome.trial_number, outcome.state, outcome.reason)
    if any(o.state == "ERROR" for o in failed):
        return EXIT_SETUP
    return EXIT_TRIAL_FAILED if failed else EXIT_OK


_install_fork_guard()

if __name__ == "__main__":
    sys.exit(main())
