"""Trial worker: ``python -m hpo_core.worker --study-name S --trial-number N``.

Runs one trial: loads its params from the Optuna storage, runs the objective, logs a child
MLflow run linked to the study's parent run, and tells the storage COMPLETE, PRUNED or FAIL.
Locations and credentials come from the environment (see :mod:`hpo_core.deployment`), never
from the arguments. The same command runs as a local subprocess or as a Kubernetes pod.

Retry semantics (DESIGN.md): a trial still RUNNING is taken over; a trial closed as FAIL is
replaced by a new trial with the same params and ``hpo.retry_of``; a COMPLETE or PRUNED trial is
never evaluated again.

Exit codes: 0 the trial is finished (now or before), 1 the trial failed, 2 usage or setup error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo_core import engine
from hpo_core.deployment import Deployment
from hpo_core.errors import HpoError, ObjectiveError, TrialStateError
from hpo_core.objective import TrialContext, call_objective, normalize_result
from hpo_core.space import import_callable
from hpo_core.spec import StudySpec

__all__ = ["TrialOutcome", "main", "run_trial"]

log = logging.getLogger("hpo_core.worker")
RESULT_PREFIX = "HPO_RESULT "
EXIT_OK, EXIT_TRIAL_FAILED, EXIT_SETUP = 0, 1, 2


class TrialTimeout(BaseException):  # noqa: N818 - BaseException so objectives cannot swallow it
    """The objective ran past the trial's execution timeout."""


class TrialTerminated(BaseException):  # noqa: N818
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
        successors = sorted(
            (t for t in by_number.values() if t.user_attrs.get(engine.T_RETRY_OF) == current.number),
            key=lambda t: t.number,
        )
        if not successors:
            return _create_replacement(study, current, requested=requested, attempt=attempt), False
        current = successors[0]


def _create_replacement(study: optuna.Study, failed: FrozenTrial, *, requested: int, attempt: int) -> FrozenTrial:
    attrs = {
        k: v
        for k, v in failed.user_attrs.items()
        if k.startswith("hpo.") and k not in (engine.T_MODEL_URI, engine.T_MLFLOW_RUN, engine.T_METRICS)
    }
    attrs.update({engine.T_RETRY_OF: failed.number, engine.T_RETRY_ROOT: requested, "hpo.created_by_attempt": attempt})
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
    """Evaluate mapped trial ``trial_number`` of ``study_name`` (see the module docstring)."""
    study, spec = engine.load_study(deployment.storage_url, study_name)
    frozen, finished = resolve_trial(study, trial_number, attempt=attempt)
    retry_of = frozen.user_attrs.get(engine.T_RETRY_OF)
    if finished:
        log.info(
            "trial %d is already %s: not evaluating it again", frozen.number, frozen.state.name
        )
        return TrialOutcome(
            frozen.number, trial_number, frozen.state.name, frozen.values, None, retry_of, True
        )
    trial = optuna.trial.Trial(study, frozen._trial_id)
    storage = study._storage
    storage.set_trial_user_attr(
        frozen._trial_id,
        "hpo.worker",
        {"host": socket.gethostname(), "pid": os.getpid(), "attempt": attempt, "started_at": time.time()},
    )
    storage.set_trial_user_attr(frozen._trial_id, "hpo.heartbeat", time.time())
    params = dict(frozen.params)
    log.info("trial %d (attempt %d) params: %s", frozen.number, attempt, json.dumps(params, default=str))

    from hpo_core import tracking

    tracking.client(deployment)
    import mlflow

    config = engine.run_config(study)
    seed = (config.seed or 0) * 100_003 + frozen.number
    parent = study.user_attrs.get(engine.ATTR_PARENT_RUN)
    experiment_id = study.user_attrs.get(engine.ATTR_EXPERIMENT)
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
    heartbeat = _Heartbeat(storage, frozen._trial_id)
    state, values, reason = TrialState.FAIL, None, None
    error_text = None
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"trial {frozen.number} · attempt {attempt}", tags=run_tags
    ) as child:
        storage.set_trial_user_attr(frozen._trial_id, engine.T_MLFLOW_RUN, child.info.run_id)
        mlflow.log_params(tracking.flat_params(params))
        ctx = TrialContext(
            trial=trial,
            spec=spec,
            params=params,
            seed=seed,
            round_number=int(frozen.user_attrs.get(engine.T_ROUND) or 0),
            mlflow_run_id=child.info.run_id,
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
            storage.set_trial_user_attr(frozen._trial_id, engine.T_METRICS, metrics)
        except optuna.TrialPruned as e:
            state, reason = TrialState.PRUNED, f"pruned: {e}" if str(e) else "pruned"
        except TrialTimeout:
            reason = f"timeout: the objective ran longer than {timeout:.0f}s"
        except TrialTerminated:
            reason = "terminated: the worker received SIGTERM (task killed or timed out)"
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            error_text = traceback.format_exc()
            log.error("trial %d failed:\n%s", frozen.number, error_text)
        finally:
            heartbeat.stop()
        if ctx.model_uri:
            storage.set_trial_user_attr(frozen._trial_id, engine.T_MODEL_URI, ctx.model_uri)
        if ctx.lineage:
            storage.set_trial_user_attr(frozen._trial_id, engine.T_LINEAGE, ctx.lineage)
        if state == TrialState.FAIL:
            reason = reason or "unknown failure"
            storage.set_trial_user_attr(frozen._trial_id, engine.FAIL_REASON, reason[:2000])
            mlflow.set_tag("hpo.error", reason[:5000])
            mlflow.log_text(
                f"trial {frozen.number} failed\nparams: {json.dumps(params, default=str)}\n{reason}\n\n"
                + (error_text or ""),
                "error.txt",
            )
            mlflow.end_run(status="FAILED")
        elif state == TrialState.PRUNED:
            mlflow.set_tag("hpo.pruned", reason or "pruned")
            mlflow.end_run(status="KILLED")
    try:
        study.tell(frozen.number, values=values, state=state)
    except (RuntimeError, ValueError) as e:
        # Somebody (observe, a stale-trial sweep) closed it meanwhile: keep their verdict.
        raise TrialStateError(f"trial {frozen.number} was closed by someone else: {e}") from e
    return TrialOutcome(frozen.number, trial_number, state.name, values, reason, retry_of)


class _Heartbeat:
    """Marks the trial alive every few seconds, so stale trials can be told from slow ones."""

    def __init__(self, storage: Any, trial_id: int, interval: float = 15.0) -> None:
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpo-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.set_trial_user_attr(self._trial_id, "hpo.heartbeat", time.time())
            except Exception as e:  # a dropped connection must not kill the trial
                log.warning("heartbeat failed: %s", type(e).__name__)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


class _time_limit:  # noqa: N801 - used as a context manager
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


class _terminate_on_sigterm:  # noqa: N801
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
    parser.add_argument("--timeout", type=float, default=None, help="seconds before the trial FAILs (timeout)")
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
