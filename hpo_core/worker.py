"""Trial worker: ``python -m hpo_core.worker --study-name S --trial-number N``.

Runs one trial: loads its params from the Optuna storage, runs the objective, logs a child
MLflow run linked to the study's parent run, and tells the storage COMPLETE, PRUNED or FAIL.
Locations and credentials come from the environment (see :mod:`hpo_core.deployment`), never
from the arguments. The same command runs as a local subprocess or as a Kubernetes pod.

Retry semantics (DESIGN.md): a trial still RUNNING is taken over; a trial closed as FAIL is
replaced by a new trial with the same params and ``hpo.retry_of``; a COMPLETE or PRUNED trial is
never evaluated again. Before taking a trial over, the worker makes sure the attempt that started
it is gone (no live process on this host, no recent heartbeat), so one trial never runs twice at
once; the abandoned attempt's MLflow run is closed as FAILED.

Writes to the storage that a dropped or restarting database interrupts are retried a few times
(only connection errors; anything else is raised at once).

Exit codes: 0 the trial is finished (now or before), 1 the trial failed, 2 usage or setup error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


def run_trial(
    *,
    deployment: Deployment,
    study_name: str,
    trial_number: int,
    attempt: int = 1,
    timeout: float | None = None,
) -> TrialOutcome:
    """Evaluate mapped trial ``trial_number`` of ``study_name`` (see the module docstring).

    The trial is evaluated only under its :class:`~hpo_core.storage.TrialClaim`, so a second worker
    started for it at the same time waits and reports the first one's result instead of running it.
    """
    claims: list[TrialClaim] = []
    try:
        return _run_trial(
            claims,
            deployment=deployment,
            study_name=study_name,
            trial_number=trial_number,
            attempt=attempt,
            timeout=timeout,
        )
    finally:
        for claim in claims:
            claim.release()


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


def _run_trial(
    claims: list[TrialClaim],
    *,
    deployment: Deployment,
    study_name: str,
    trial_number: int,
    attempt: int,
    timeout: float | None,
) -> TrialOutcome:
    study, spec = _storage_call(
        "load the study", lambda: engine.load_study(deployment.storage_url, study_name)
    )
    if timeout is None:
        timeout = float(spec.trial.execution_timeout)
    interval = heartbeat_interval(spec)

    def resolve_and_claim() -> tuple[FrozenTrial, bool, dict[str, Any] | None]:
        frozen, finished = resolve_trial(study, trial_number, attempt=attempt)
        abandoned = frozen.user_attrs.get(T_WORKER) if not finished else None
        if abandoned is not None:
            # An earlier attempt started this trial and did not report: take it over once it is gone.
            frozen = _await_previous_attempt(study, frozen, interval=interval, limit=timeout or interval)
            frozen, finished = resolve_trial(study, trial_number, attempt=attempt)
        if not finished:
            frozen, finished = _claim(
                study, deployment.storage_url, frozen, trial_number, attempt=attempt, claims=claims
            )
        return frozen, finished, frozen.user_attrs.get(T_WORKER) if not finished else None

    frozen, finished, abandoned = _storage_call(f"trial {trial_number}: resolve and claim", resolve_and_claim)
    retry_of = frozen.user_attrs.get(engine.T_RETRY_OF)
    if finished:
        log.info("trial %d is already %s: not evaluating it again", frozen.number, frozen.state.name)
        return TrialOutcome(
            frozen.number,
            trial_number,
            frozen.state.name,
            frozen.values,
            frozen.user_attrs.get(engine.FAIL_REASON),
            retry_of,
            True,
        )
    trial = _storage_call("read the trial", lambda: optuna.trial.Trial(study, frozen._trial_id))
    study_attrs = _storage_call("read the study", lambda: study.user_attrs)
    storage = study._storage
    trial_id = frozen._trial_id

    def set_attr(key: str, value: Any) -> None:
        _storage_call(
            f"trial {frozen.number}: set {key}", lambda: storage.set_trial_user_attr(trial_id, key, value)
        )

    set_attr(
        T_WORKER,
        {"host": socket.gethostname(), "pid": os.getpid(), "attempt": attempt, "started_at": time.time()},
    )
    set_attr(T_HEARTBEAT, time.time())
    params = dict(frozen.params)
    log.info("trial %d (attempt %d) params: %s", frozen.number, attempt, json.dumps(params, default=str))

    from hpo_core import tracking

    mlflow_client = tracking.client(deployment)
    import mlflow

    if abandoned is not None:
        taken_over = (
            f"attempt {abandoned.get('attempt')} (pid {abandoned.get('pid')} on {abandoned.get('host')}) "
            f"ended without reporting a result; attempt {attempt} took the trial over"
        )
        log.warning("trial %d: %s", frozen.number, taken_over)
        previous_run = frozen.user_attrs.get(engine.T_MLFLOW_RUN)
        if previous_run:
            tracking.fail_trial_run(mlflow_client, previous_run, reason=f"worker lost: {taken_over}")

    config = engine.RunConfig(**study_attrs[engine.ATTR_RUN_CONFIG])
    seed = (config.seed or 0) * 100_003 + frozen.number
    parent = study_attrs.get(engine.ATTR_PARENT_RUN)
    experiment_id = study_attrs.get(engine.ATTR_EXPERIMENT)
    run_tags = {
        "hpo.study": study_name,
        "hpo.trial_number": str(frozen.number),
        "hpo.round": str(frozen.user_attrs.get(engine.T_ROUND)),
        "hpo.attempt": str(attempt),
        "hpo.role": "trial",
    }
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    if retry_of is not None:
        run_tags["hpo.retry_of"] = str(retry_of)
    heartbeat = _Heartbeat(storage, frozen._trial_id, interval=interval)
    state, values, reason = TrialState.FAIL, None, None
    error_text = None
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"trial {frozen.number} · attempt {attempt}", tags=run_tags
    ) as child:
        set_attr(engine.T_MLFLOW_RUN, child.info.run_id)
        mlflow.log_params(tracking.flat_params(params))
        ctx = TrialContext(
            trial=trial,
            spec=spec,
            params=params,
            seed=seed,
            round_number=int(frozen.user_attrs.get(engine.T_ROUND) or 0),
            mlflow_run_id=child.info.run_id,
            attempt=attempt,
        )
        heartbeat.start()
        try:
            with _time_limit(timeout), _terminate_on_sigterm():
                objective = import_callable(spec.objective)
                result = call_objective(objective, ctx, trial)
            values, extra = normalize_result(spec, result)
            state = TrialState.COMPLETE
            metrics = dict(zip(spec.objective_metrics, values, strict=True)) | extra
            mlflow.log_metrics(metrics)
            set_attr(engine.T_METRICS, metrics)
        except optuna.TrialPruned as e:
            state, reason = TrialState.PRUNED, f"pruned: {e}" if str(e) else "pruned"
        except TrialTimeout:
            # The traceback shows where the objective was when it was stopped.
            reason = f"timeout: the objective ran longer than {timeout:.0f}s"
            error_text = traceback.format_exc()
        except TrialTerminated:
            reason = "terminated: the worker received SIGTERM (task killed or timed out)"
            error_text = traceback.format_exc()
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            error_text = traceback.format_exc()
        finally:
            heartbeat.stop()
        if ctx.model_uri:
            set_attr(engine.T_MODEL_URI, ctx.model_uri)
        if ctx.lineage:
            set_attr(engine.T_LINEAGE, ctx.lineage)
        if state == TrialState.FAIL:
            reason = reason or "unknown failure"
            log.error(
                "trial %d failed: %s\nparams: %s\n%s",
                frozen.number,
                reason,
                json.dumps(params, default=str),
                traceback_tail(error_text or ""),
            )
            set_attr(engine.FAIL_REASON, reason[:2000])
            mlflow.set_tag("hpo.error", reason[:5000])
            mlflow.log_text(
                f"trial {frozen.number} failed (attempt {attempt})\n"
                f"params: {json.dumps(params, default=str)}\n{reason}\n\n" + (error_text or ""),
                tracking.ERROR_ARTIFACT,
            )
            mlflow.end_run(status="FAILED")
        elif state == TrialState.PRUNED:
            mlflow.set_tag("hpo.pruned", reason or "pruned")
            mlflow.end_run(status="KILLED")
    _tell(study, frozen, state=state, values=values)
    return TrialOutcome(frozen.number, trial_number, state.name, values, reason, retry_of)


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
    parser.add_argument("--trial-number", required=True, type=int, help="trial number chosen by suggest")
    parser.add_argument("--attempt", type=int, default=1, help="Airflow try number of this attempt")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds before the trial FAILs (timeout)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = _parse_args(argv)
    try:
        outcome = run_trial(
            deployment=Deployment.from_env(),
            study_name=args.study_name,
            trial_number=args.trial_number,
            attempt=args.attempt,
            timeout=args.timeout,
        )
    except (HpoError, ObjectiveError) as e:
        log.error("cannot run trial %d: %s", args.trial_number, e)
        return EXIT_SETUP
    print(RESULT_PREFIX + outcome.to_json(), flush=True)
    if outcome.state == TrialState.FAIL.name:
        log.error("trial %d FAILED: %s", outcome.trial_number, outcome.reason)
        return EXIT_TRIAL_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
