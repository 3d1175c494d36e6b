"""Cold-process probes of the scale benchmark (each call is a fresh interpreter, as an Airflow task is).

* ``suggest``: ``hpo_core.study.suggest.suggest_batch`` for one round, optionally under cProfile.
* ``observe``: ``hpo_core.study.observe.observe_round`` for one round.
* ``finalize``: ``hpo_core.study.finalize.finalize_study``.
* ``summary``: ``hpo_core.cli.study_summary`` (what ``hpo summary`` prints).
* ``worker``: a slot worker's start up to the objective call: the slot opens (study, MLflow client,
  objective import), resolves its trial (``hpo_core.worker._takeover.resolve_trial``) and claims it.
* ``parse``: fill a DagBag from one DAG file and serialize every DAG, as the DAG processor does.

The pipeline calls read their locations with ``Deployment.from_env()``. Time is split into buckets
by wrapping the pipeline's storage, sampler and MLflow functions (exclusive time: a bucket's call made
inside another bucket counts for the inner one); SQL statements and rows read on the Optuna storage
are counted with SQLAlchemy cursor events. Each probe prints one line ``BENCH_RESULT {json}``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import sys
import time
from collections.abc import Callable
from typing import Any

# Each probe imports the project (and Airflow) inside its function, where it times that import: the
# top holds the standard library only (hence the ``noqa: PLC0415`` on those imports).
_T0 = time.perf_counter()
RESULT_PREFIX = "BENCH_RESULT "
ALL_PUBLIC = ("*",)

#: Where a control task's time goes: (bucket, ``module`` or ``module:Class``, functions). ``*``: every
#: public method of the class. Exclusive time: ``sampler: TPE`` inside ``ask_batch`` is not counted
#: in ``sampler: rest``; an MLflow call inside the plots counts as ``mlflow``; ``plots: rest`` is the
#: plots' study copy and the PNG rendering (``savefig``) around optuna's plot functions.
BUCKETS: list[tuple[str, str, tuple[str, ...]]] = [
    ("load study", "hpo_core.study.state", ("load_run",)),
    (
        "storage reads",
        "hpo_core.storage.trials",
        ("read_trials", "with_params", "study_system_attrs", "get_trial", "trial_by_number"),
    ),
    (
        "storage writes",
        "hpo_core.storage.trials",
        ("write_batch", "fail_trials", "set_trial_attrs", "set_trial_attr", "create_trial"),
    ),
    (
        "storage writes",
        "optuna.storages._rdb.storage:RDBStorage",
        ("set_study_user_attr", "set_study_system_attr", "set_trial_user_attr", "set_trial_state_values"),
    ),
    ("sampler: rest", "hpo_core.study.ask", ("ask_batch",)),
    (
        "sampler: TPE",
        "optuna.samplers._tpe.sampler:TPESampler",
        (
            "infer_relative_search_space",
            "sample_relative",
            "sample_independent",
            "before_trial",
            "after_trial",
        ),
    ),
    (
        "sampler: TPE",
        "hpo_core.samplers.mean_liar:MeanLiarTPESampler",
        ("infer_relative_search_space", "sample_relative", "sample_independent"),
    ),
    ("plots: rest", "hpo_core.tracking.plots", ("_log", "figures")),
    (
        "plots: history",
        "optuna.visualization.matplotlib._optimization_history",
        ("plot_optimization_history",),
    ),
    (
        "plots: parallel coordinates",
        "optuna.visualization.matplotlib._parallel_coordinate",
        ("plot_parallel_coordinate",),
    ),
    ("plots: fANOVA", "optuna.importance._fanova._evaluator:FanovaImportanceEvaluator", ("evaluate",)),
    ("mlflow", "mlflow.tracking.client:MlflowClient", ALL_PUBLIC),
]


class Timers:
    """Exclusive time per bucket, by wrapping the buckets' functions (outermost call per bucket)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {bucket: 0.0 for bucket, _, _ in BUCKETS}
        self.calls: dict[str, int] = dict.fromkeys(self.totals, 0)
        self._stack: list[list[Any]] = []

    def install(self) -> None:
        """Wrap every bucket's functions, wherever a loaded module imported them by name.

        Only modules the probe loaded already are wrapped (nothing is imported here).
        """
        for bucket, path, names in BUCKETS:
            module_name, _, class_name = path.partition(":")
            owner: Any = sys.modules.get(module_name)
            if owner is None:
                continue
            if class_name:
                owner = getattr(owner, class_name)
                methods = names
                if names == ALL_PUBLIC:
                    methods = tuple(n for n, v in vars(owner).items() if callable(v) and n[0] != "_")
                for name in methods:
                    if name in vars(owner):
                        setattr(owner, name, self._wrap(bucket, vars(owner)[name]))
                continue
            for name in names:
                original = getattr(owner, name, None)
                if original is None:
                    continue
                wrapped = self._wrap(bucket, original)
                for module in list(sys.modules.values()):
                    try:
                        found = [a for a, v in vars(module).items() if v is original]
                    except TypeError:  # a None placeholder in sys.modules
                        continue
                    for attr in found:
                        setattr(module, attr, wrapped)

    def _wrap(self, bucket: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._stack and self._stack[-1][0] == bucket:
                return func(*args, **kwargs)
            frame: list[Any] = [bucket, time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return func(*args, **kwargs)
            finally:
                self._stack.pop()
                elapsed = time.perf_counter() - frame[1]
                self.totals[bucket] += elapsed - frame[2]
                self.calls[bucket] += 1
                if self._stack:
                    self._stack[-1][2] += elapsed

        return wrapper

    def split(self, elapsed: float) -> dict[str, float]:
        """The buckets that took time, and ``other``: the rest of ``elapsed``."""
        used = {k: v for k, v in self.totals.items() if v > 0}
        return {**used, "other": elapsed - sum(used.values())}


class SqlCounter:
    """SQL statements, rows read and seconds in the database, on the Optuna storage's database only."""

    def __init__(self, storage_url: str) -> None:
        from sqlalchemy.engine import make_url  # noqa: PLC0415 - after the probe's timed import

        self.database = make_url(storage_url).database
        self.statements = 0
        self.rows_read = 0
        self.seconds = 0.0
        self._started: list[float] = []

    def install(self) -> None:
        from sqlalchemy import event  # noqa: PLC0415 - after the probe's timed import
        from sqlalchemy.engine import Engine  # noqa: PLC0415 - after the probe's timed import

        event.listen(Engine, "before_cursor_execute", self._before)
        event.listen(Engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, *_: Any) -> None:
        self._started.append(time.perf_counter())

    def _after(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        started = self._started.pop() if self._started else time.perf_counter()
        if conn.engine.url.database != self.database:
            return
        self.seconds += time.perf_counter() - started
        self.statements += 1
        if statement.lstrip()[:6].upper() == "SELECT" and cursor.rowcount and cursor.rowcount > 0:
            self.rows_read += int(cursor.rowcount)

    def snapshot(self) -> dict[str, Any]:
        """The counts so far."""
        return {"statements": self.statements, "rows_read": self.rows_read, "db_s": self.seconds}


def _emit(data: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(data, default=str), flush=True)


def _instrumented(call: Callable[[], Any], *, profile_path: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Run ``call`` with the timers and the SQL counter; its result and the measurements."""
    from hpo_core.deployment import Deployment  # noqa: PLC0415 - after the probe's timed import

    timers = Timers()
    timers.install()
    sql = SqlCounter(Deployment.from_env().storage_url)
    sql.install()
    profile = cProfile.Profile() if profile_path else None
    if profile is not None:
        profile.enable()
    t0 = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - t0
    if profile is not None and profile_path:
        profile.disable()
        profile.dump_stats(profile_path)
    return result, {
        "seconds": elapsed,
        "split_s": timers.split(elapsed),
        "calls": {k: v for k, v in timers.calls.items() if v},
        **sql.snapshot(),
    }


def _imported(t_import: float) -> dict[str, float]:
    return {"interpreter_to_probe_s": t_import - _T0, "import_s": time.perf_counter() - t_import}


def probe_suggest(args: argparse.Namespace) -> None:
    """One round of ``suggest_batch`` in this fresh process."""
    t_import = time.perf_counter()
    from hpo_core.deployment import Deployment  # noqa: PLC0415 - the probe times this import
    from hpo_core.study.suggest import suggest_batch

    imported = _imported(t_import)
    (batch, reason), measured = _instrumented(
        lambda: suggest_batch(
            deployment=Deployment.from_env(),
            study_name=args.study,
            round_number=args.round,
            dag_id=args.dag_id,
            run_id=args.run_id,
        ),
        profile_path=args.profile,
    )
    _emit(
        {
            **imported,
            **measured,
            "batch": len(batch),
            "skip_reason": reason,
            "trial_numbers": [b["trial_number"] for b in batch],
        }
    )


def probe_observe(args: argparse.Namespace) -> None:
    """``observe_round`` of one round in this fresh process."""
    t_import = time.perf_counter()
    from hpo_core.deployment import Deployment  # noqa: PLC0415 - the probe times this import
    from hpo_core.study.observe import observe_round

    imported = _imported(t_import)
    summary, measured = _instrumented(
        lambda: observe_round(
            deployment=Deployment.from_env(), study_name=args.study, round_number=args.round
        )
    )
    _emit(
        {
            **imported,
            **measured,
            "round_trials": len(summary["trials"]),
            "round_complete": summary["round_complete"],
            "counted": summary["counted"],
            "stop_reason": summary["stop_reason"],
        }
    )


def probe_finalize(args: argparse.Namespace) -> None:
    """``finalize_study`` in this fresh process."""
    t_import = time.perf_counter()
    from hpo_core.deployment import Deployment  # noqa: PLC0415 - the probe times this import
    from hpo_core.study.finalize import finalize_study

    imported = _imported(t_import)
    result, measured = _instrumented(
        lambda: finalize_study(deployment=Deployment.from_env(), study_name=args.study)
    )
    _emit(
        {
            **imported,
            **measured,
            "best_trial": result["best_trial"],
            "complete": result["complete"],
            "model_version": result["model_version"],
        }
    )


def probe_summary(args: argparse.Namespace) -> None:
    """``hpo summary``'s ``study_summary`` in this fresh process."""
    t_import = time.perf_counter()
    from hpo_core.cli import study_summary
    from hpo_core.deployment import Deployment  # noqa: PLC0415 - the probe times this import

    imported = _imported(t_import)
    result, measured = _instrumented(lambda: study_summary(Deployment.from_env(), args.study))
    _emit({**imported, **measured, "trials": result["trials"], "best_trial": result["best_trial"]})


def probe_worker(args: argparse.Namespace) -> None:
    """A slot worker's start on trial ``--trial``: open the slot, resolve the trial, claim it.

    The path of ``hpo_core.worker._slot._Slot`` up to marking the trial as its own (which this probe
    leaves out, so that every repeat finds the trial as suggest left it); the claim is released.
    """
    t_import = time.perf_counter()
    from hpo_core.deployment import Deployment  # noqa: PLC0415 - the probe times this import
    from hpo_core.storage import TrialClaim
    from hpo_core.worker import _slot, _takeover

    imported = _imported(t_import)
    deployment = Deployment.from_env()
    sql = SqlCounter(deployment.storage_url)
    sql.install()
    t0 = time.perf_counter()
    slot = _slot._Slot.open(deployment, args.study, attempt=1, timeout=None, relay=None)
    opened = time.perf_counter()
    before = sql.snapshot()
    frozen, finished = _takeover.resolve_trial(slot.study, args.trial, attempt=1)
    resolved = time.perf_counter()
    after = sql.snapshot()
    claims: list[TrialClaim] = []
    _takeover.claim(slot.study, deployment.storage_url, frozen, args.trial, attempt=1, claims=claims)
    claimed = time.perf_counter()
    for held in claims:
        held.release()
    _emit(
        {
            **imported,
            "seconds": claimed - t0,
            "open_s": opened - t0,
            "resolve_s": resolved - opened,
            "claim_s": claimed - resolved,
            "resolve_statements": after["statements"] - before["statements"],
            "resolve_rows_read": after["rows_read"] - before["rows_read"],
            "trial": frozen.number,
            "state": frozen.state.name,
            "finished": finished,
            **sql.snapshot(),
        }
    )


def probe_parse(args: argparse.Namespace) -> None:
    """Fill a DagBag from one DAG file and serialize every DAG (what the DAG processor does)."""
    t_import = time.perf_counter()
    from airflow.configuration import conf  # noqa: PLC0415 - the probe times this import
    from airflow.dag_processing.dagbag import DagBag  # noqa: PLC0415 - the probe times this import
    from airflow.serialization.serialized_objects import DagSerialization  # noqa: PLC0415 - timed import

    imported = _imported(t_import)
    t0 = time.perf_counter()
    bag = DagBag(dag_folder=args.dag_file, safe_mode=False)
    parsed = time.perf_counter()
    n_tasks = 0
    for dag in bag.dags.values():
        DagSerialization.to_dict(dag)
        n_tasks += len(dag.tasks)
    serialized = time.perf_counter()
    _emit(
        {
            **imported,
            "parse_s": parsed - t0,
            "serialize_s": serialized - parsed,
            "seconds": serialized - t0,
            "dags": len(bag.dags),
            "tasks": n_tasks,
            "import_errors": {str(k): str(v)[:300] for k, v in bag.import_errors.items()},
            "dagbag_import_timeout_s": conf.getfloat("core", "dagbag_import_timeout"),
        }
    )


def main(argv: list[str] | None = None) -> int:
    """Dispatch to one probe."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    s = sub.add_parser("suggest")
    s.add_argument("--study", required=True)
    s.add_argument("--round", type=int, required=True)
    s.add_argument("--dag-id", default="hpo_bench_scale")
    s.add_argument("--run-id", default="bench")
    s.add_argument("--profile")
    o = sub.add_parser("observe")
    o.add_argument("--study", required=True)
    o.add_argument("--round", type=int, required=True)
    for name in ("finalize", "summary"):
        sub.add_parser(name).add_argument("--study", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--study", required=True)
    w.add_argument("--trial", type=int, required=True)
    sub.add_parser("parse").add_argument("--dag-file", required=True)
    args = parser.parse_args(argv)
    probes: dict[str, Callable[[argparse.Namespace], None]] = {
        "suggest": probe_suggest,
        "observe": probe_observe,
        "finalize": probe_finalize,
        "summary": probe_summary,
        "worker": probe_worker,
        "parse": probe_parse,
    }
    probes[args.probe](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
