"""One warm worker evaluating a slot's trials in sequence (see :mod:`hpo_core.worker`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_core.deployment import Deployment
from hpo_core.errors import HpoError
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.objective import TrialContext, call_objective, logged_model_of_run, normalize_result
from hpo_core.space import import_callable
from hpo_core.spec import StudySpec
from hpo_core.storage import TrialClaim
from hpo_core.storage import trials as stored
from hpo_core.study.state import LoadedStudy, load_run
from hpo_core.tracking import backlinks, runs
from hpo_core.worker._child import (
    CHILD_KILL_GRACE,
    Child,
    Evaluation,
    TrialTerminated,
    TrialTimeout,
    import_quietly,
    terminate_on_sigterm,
    time_limit,
)
from hpo_core.worker._outcome import TrialOutcome
from hpo_core.worker._resilient import brief, storage_call, tell
from hpo_core.worker._takeover import await_previous_attempt, claim, process_identity, resolve_trial

__all__ = ["heartbeat_interval", "run_slot", "run_trial", "traceback_tail"]

log = logging.getLogger("hpo_core.worker")

#: Heartbeat period without ``trial.stale_timeout``; with it, a third of that timeout.
HEARTBEAT_SECONDS = 15.0
#: Lines of a traceback repeated in the task log next to the failure reason.
TRACEBACK_TAIL_LINES = 30


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
    # MLflow down must not stall the trials (see _Slot._start_run).
    with _forward_sigterm(slot), runs.bounded_http_retries():
        return _run_each(slot, trial_numbers)


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
        except HpoError as e:  # e.g. no such trial: nothing was evaluated
            log.error("trial %d: %s", number, e)
            outcome = TrialOutcome(number, number, "ERROR", reason=str(e))
        except Exception as e:  # a storage or tracking outage: the slot's other trials still run
            log.exception("trial %d could not be evaluated", number)
            outcome = TrialOutcome(number, number, "ERROR", reason=f"worker error: {brief(e)}")
        outcomes.append(outcome)
        log.info("%s", outcome.summary())
    return outcomes


class _Slot:
    """One warm worker: the study, its spec, the MLflow client and the objective, loaded once."""

    def __init__(
        self,
        *,
        deployment: Deployment,
        loaded: LoadedStudy,
        attempt: int,
        timeout: float,
        relay: Callable[[str], None],
    ) -> None:
        self.deployment, self.study, self.spec = deployment, loaded.study, loaded.spec
        self.attempt, self.timeout, self.relay = attempt, timeout, relay
        self.interval = heartbeat_interval(loaded.spec)
        self.stopping = False
        #: Per trial number: what its MLflow run missed so far (MLflow failed).
        self.tracking_missing: dict[int, str] = {}
        self._child: Child | None = None
        self.modules_at_fork: frozenset[str] = frozenset()
        self.config = loaded.config
        self.parent_run = loaded.attrs.get(StudyAttr.PARENT_RUN)
        self.experiment_id = loaded.attrs.get(StudyAttr.EXPERIMENT)
        self.mlflow = runs.client(deployment)
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
        loaded = storage_call("load the study", lambda: load_run(deployment, study_name))
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
        """Resolve, claim and evaluate mapped trial ``requested`` (see the package docstring)."""
        claims: list[TrialClaim] = []
        try:
            return self._run(requested, claims)
        finally:
            for held in claims:
                held.release()

    def _resolve_and_claim(
        self, requested: int, claims: list[TrialClaim]
    ) -> tuple[FrozenTrial, bool, dict[str, Any] | None]:
        study, attempt = self.study, self.attempt
        frozen, finished = resolve_trial(study, requested, attempt=attempt)
        if not finished and frozen.user_attrs.get(TrialAttr.WORKER) is not None:
            # An earlier attempt started this trial and did not report: take it over once it is gone.
            frozen = await_previous_attempt(
                study,
                self.deployment.storage_url,
                frozen,
                interval=self.interval,
                limit=self.timeout or self.interval,
            )
            frozen, finished = resolve_trial(study, requested, attempt=attempt)
        if not finished:
            frozen, finished = claim(
                study, self.deployment.storage_url, frozen, requested, attempt=attempt, claims=claims
            )
        return frozen, finished, frozen.user_attrs.get(TrialAttr.WORKER) if not finished else None

    def _run(self, requested: int, claims: list[TrialClaim]) -> TrialOutcome:
        frozen, finished, abandoned = storage_call(
            f"trial {requested}: resolve and claim", lambda: self._resolve_and_claim(requested, claims)
        )
        retry_of = frozen.user_attrs.get(TrialAttr.RETRY_OF)
        if finished:
            log.info("trial %d is already %s: not evaluating it again", frozen.number, frozen.state.name)
            return TrialOutcome(
                frozen.number,
                requested,
                frozen.state.name,
                frozen.values,
                frozen.user_attrs.get(TrialAttr.FAIL_REASON),
                retry_of,
                True,
            )
        self._mark_running(frozen)
        params = dict(frozen.params)
        log.info(
            "trial %d (attempt %d) params: %s", frozen.number, self.attempt, json.dumps(params, default=str)
        )
        if abandoned is not None:
            self._close_abandoned(frozen, abandoned)
        run_id = self._start_run(frozen, params, retry_of=retry_of)
        result = self._evaluate(frozen, params, run_id=run_id)
        return self._record(frozen, requested, params, result, run_id=run_id, retry_of=retry_of)

    def _set_attrs(self, frozen: FrozenTrial, attrs: dict[str, Any]) -> None:
        """Write several attributes of the trial in one transaction (retried over a dropped connection)."""
        tid = stored.trial_id(frozen)
        storage_call(
            f"trial {frozen.number}: set {', '.join(attrs)}",
            lambda: stored.set_trial_attrs(self.study, {tid: attrs}),
        )

    def _mark_running(self, frozen: FrozenTrial) -> None:
        """Record who evaluates the trial (this slot's process and attempt), and a first heartbeat."""
        now = time.time()
        attrs: dict[str, Any] = {
            TrialAttr.WORKER: {**process_identity(), "attempt": self.attempt, "started_at": now},
            TrialAttr.HEARTBEAT: now,
        }
        self._set_attrs(frozen, attrs)

    def _close_abandoned(self, frozen: FrozenTrial, abandoned: dict[str, Any]) -> None:
        """Say that this attempt took the trial over, and close the lost attempt's MLflow run."""
        taken_over = (
            f"attempt {abandoned.get('attempt')} (pid {abandoned.get('pid')} on {abandoned.get('host')}) "
            f"ended without reporting a result; attempt {self.attempt} took the trial over"
        )
        log.warning("trial %d: %s", frozen.number, taken_over)
        previous_run = frozen.user_attrs.get(TrialAttr.MLFLOW_RUN)
        if previous_run:
            try:
                runs.fail_trial_run(self.mlflow, previous_run, reason=f"worker lost: {taken_over}")
            except runs.TRACKING_ERRORS as e:
                log.warning("trial %d: the lost attempt's MLflow run stays open: %s", frozen.number, brief(e))

    def _start_run(self, frozen: FrozenTrial, params: dict[str, Any], *, retry_of: Any) -> str | None:
        """Open the trial attempt's MLflow child run and record it on the trial.

        MLflow down is not the trial's failure (the Optuna storage is the source of truth): the trial
        is evaluated without a child run, ``hpo.tracking_missing`` says why, and ``observe`` or
        ``finalize`` logs the run once MLflow is back. Returns ``None`` then.
        """
        tags = runs.trial_run_tags(
            study_name=self.study.study_name,
            trial_number=frozen.number,
            round_number=frozen.user_attrs.get(TrialAttr.ROUND),
            attempt=self.attempt,
            parent_run=self.parent_run,
            retry_of=retry_of,
        ) | backlinks.trial_run_tags(frozen.user_attrs, attempt=self.attempt)
        try:
            run_id = runs.start_trial_run(
                self.mlflow,
                experiment_id=self.experiment_id,
                run_name=tags["mlflow.runName"],
                tags=tags,
                params=runs.flat_params(params),
            )
        except runs.TRACKING_ERRORS as e:
            missing = f"no child run: MLflow was unavailable when the trial started ({brief(e)})"
            log.warning("trial %d: %s; evaluating it all the same", frozen.number, missing)
            self.tracking_missing[frozen.number] = missing
            self._set_attrs(frozen, {TrialAttr.TRACKING_MISSING: missing})
            return None
        self._set_attrs(frozen, {TrialAttr.MLFLOW_RUN: run_id})
        return run_id

    def _evaluate(self, frozen: FrozenTrial, params: dict[str, Any], *, run_id: str | None) -> Evaluation:
        """Run the objective in a forked child (its crash, hang or kill ends only this trial)."""
        self.modules_at_fork = frozenset(sys.modules)
        child = Child.fork(lambda: _evaluate_in_child(self, frozen, params, run_id=run_id))
        self._child = child
        if self.stopping:  # SIGTERM arrived while the child was being forked
            child.ask_to_stop()
        # Started after the fork: the child must not inherit a thread that may hold a lock.
        heartbeat = _Heartbeat(self.study, stored.trial_id(frozen), interval=self.interval)
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
        result: Evaluation,
        *,
        run_id: str | None,
        retry_of: Any,
    ) -> TrialOutcome:
        """Tell the storage and close the MLflow run: the slot process does it, whatever the child did.

        The result reaches the storage whatever MLflow does: a run that cannot be closed is left
        for ``observe`` or ``finalize`` to close (``hpo.tracking_missing``).
        """
        attrs: dict[str, Any] = {}
        if result.model_uri:
            attrs[TrialAttr.MODEL_URI] = result.model_uri
        if result.lineage:
            attrs[TrialAttr.LINEAGE] = result.lineage
        state = TrialState[result.state]
        if state == TrialState.COMPLETE:
            attrs[TrialAttr.METRICS] = result.metrics
        reason = result.reason
        error_text = None
        if state == TrialState.FAIL:
            reason = reason or "unknown failure"
            log.error(
                "trial %d failed: %s\nparams: %s\n%s",
                frozen.number,
                reason,
                json.dumps(params, default=str),
                traceback_tail(result.error_text or ""),
            )
            attrs[TrialAttr.FAIL_REASON] = reason[:2000]
            error_text = (
                f"trial {frozen.number} failed (attempt {self.attempt})\n"
                f"params: {json.dumps(params, default=str)}\n{reason}\n\n" + (result.error_text or "")
            )
        missing = [m for m in (self.tracking_missing.pop(frozen.number, None), result.tracking_missing) if m]
        if run_id is not None:
            try:
                runs.finish_trial_run(
                    self.mlflow,
                    run_id,
                    state=state.name,
                    metrics=result.metrics if state == TrialState.COMPLETE else {},
                    reason=reason,
                    error_text=error_text,
                )
            except runs.TRACKING_ERRORS as e:
                missing.append(f"child run not closed: MLflow was unavailable at the end ({brief(e)})")
                log.warning("trial %d: %s; the result is stored all the same", frozen.number, missing[-1])
        if missing:
            attrs[TrialAttr.TRACKING_MISSING] = "; ".join(missing)[:2000]
        if attrs:
            self._set_attrs(frozen, attrs)
        tell(self.study, frozen, state=state, values=result.values if state == TrialState.COMPLETE else None)
        import_quietly(result.new_modules)
        return TrialOutcome(frozen.number, requested, state.name, result.values, reason, retry_of)


def _evaluate_in_child(
    slot: _Slot, frozen: FrozenTrial, params: dict[str, Any], *, run_id: str | None
) -> Evaluation:
    """The objective call, in the forked child; everything it logs goes to the slot's relay."""
    spec, result = slot.spec, Evaluation()
    # The objective may use MLflow's fluent API (mlflow.log_metric, autolog, log_model): its run is
    # the trial's, in the study's experiment whatever the environment or an earlier caller set.
    for variable in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        os.environ.pop(variable, None)
    if run_id is not None:
        try:
            if slot.experiment_id is not None:
                mlflow.set_experiment(experiment_id=str(slot.experiment_id))
            mlflow.start_run(run_id=run_id, nested=True)
        except runs.TRACKING_ERRORS as e:  # MLflow went down: the objective runs without its run
            result.tracking_missing = f"the objective ran without its MLflow run ({brief(e)})"
            log.warning("trial %d: %s", frozen.number, result.tracking_missing)
            run_id = None
    trial = stored.live_trial(slot.study, frozen)
    ctx = TrialContext(
        trial=trial,
        spec=spec,
        params=params,
        seed=(slot.config.seed or 0) * 100_003 + frozen.number,
        round_number=int(frozen.user_attrs.get(TrialAttr.ROUND) or 0),
        mlflow_run_id=run_id,
        attempt=slot.attempt,
        mlflow_client=slot.mlflow,
    )
    try:
        with time_limit(slot.timeout), terminate_on_sigterm():
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
    # An Optuna objective(trial) has no ctx: it logs its model with MLflow's own API, in this run.
    result.model_uri = ctx.model_uri or (logged_model_of_run(run_id) if run_id else None)
    result.lineage = dict(ctx.lineage)
    if ctx.tracking_missing:
        result.tracking_missing = "; ".join(m for m in (result.tracking_missing, ctx.tracking_missing) if m)
    result.new_modules = [name for name in sys.modules if name not in slot.modules_at_fork]
    return result


class _Heartbeat:
    """Marks the trial alive every few seconds, so stale trials can be told from slow ones."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: float = HEARTBEAT_SECONDS) -> None:
        self._study, self._trial_id, self._interval = study, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpo-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                stored.record_heartbeat(self._study, self._trial_id)
            except Exception as e:  # a dropped connection must not kill the trial
                log.warning("heartbeat failed: %s", type(e).__name__)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


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


def _relay_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
