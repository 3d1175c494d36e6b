"""Cold-process probes of the scale benchmark (each call is a fresh interpreter, as a task is).

* ``suggest``: time ``suggest_batch`` for one round in a fresh process, optionally under
  cProfile, and split it into storage reads, sampler, storage writes and the rest.
* ``parse``: fill a DagBag from a DAG folder and serialize every DAG, as the DAG processor does.
* ``dagtest``: run one study DAG with ``dag.test()`` and read back its task instances.

Each prints one line ``BENCH_RESULT {json}``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import importlib
import importlib.util
import json
import os
import sys
import time
from typing import Any

# Each probe imports the project and Airflow inside its function, where it times that import: the
# top holds the standard library only (hence the ``noqa: PLC0415`` on those imports).
_T0 = time.perf_counter()
RESULT_PREFIX = "BENCH_RESULT "

#: Where suggest's time goes: (bucket, class path, methods). Time is exclusive: a storage read made
#: inside the sampler counts as a storage read, not as sampler time.
BUCKETS: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "storage reads",
        "optuna.storages._rdb.storage:RDBStorage",
        (
            "get_all_trials",
            "_get_trials",
            "get_trial",
            "get_study_user_attrs",
            "get_study_system_attrs",
            "get_study_id_from_name",
            "get_study_directions",
            "get_trial_id_from_study_id_trial_number",
            "get_trial_user_attrs",
            "get_trial_system_attrs",
            "get_trial_param",
        ),
    ),
    (
        "storage writes",
        "optuna.storages._rdb.storage:RDBStorage",
        (
            "create_new_trial",
            "set_trial_param",
            "set_trial_user_attr",
            "set_trial_system_attr",
            "set_trial_state_values",
            "set_study_user_attr",
            "set_study_system_attr",
        ),
    ),
    (
        "sampler (TPE)",
        "optuna.samplers._tpe.sampler:TPESampler",
        (
            "infer_relative_search_space",
            "sample_relative",
            "sample_independent",
            "before_trial",
            "after_trial",
        ),
    ),
]


class _Timers:
    """Exclusive time per bucket, by wrapping the bucket's methods (outermost call of a bucket counts)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = dict.fromkeys([b for b, _, _ in BUCKETS], 0.0)
        self.calls: dict[str, int] = dict.fromkeys(self.totals, 0)
        self._stack: list[list[Any]] = []

    def install(self) -> None:
        for bucket, path, methods in BUCKETS:
            module_name, _, class_name = path.partition(":")
            cls = getattr(importlib.import_module(module_name), class_name)
            for name in methods:
                if hasattr(cls, name):
                    setattr(cls, name, self._wrap(bucket, getattr(cls, name)))

    def _wrap(self, bucket: str, func: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._stack and self._stack[-1][0] == bucket:
                return func(*args, **kwargs)
            frame = [bucket, time.perf_counter(), 0.0]
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


def _emit(data: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(data, default=str), flush=True)


def probe_suggest(args: argparse.Namespace) -> None:
    """One round of ``suggest_batch`` in this fresh process."""
    t_import = time.perf_counter()
    from hpo_core.deployment import Deployment  # noqa: PLC0415 - the probe times this import
    from hpo_core.study.suggest import suggest_batch

    imported = time.perf_counter()
    timers = _Timers()
    timers.install()
    profile = None
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
    t0 = time.perf_counter()
    batch, reason = suggest_batch(
        deployment=Deployment.from_env(),
        study_name=args.study,
        round_number=args.round,
        dag_id="hpo_bench_scale",
        run_id="bench",
    )
    elapsed = time.perf_counter() - t0
    result: dict[str, Any] = {
        "interpreter_start_to_import_s": t_import - _T0,
        "import_s": imported - t_import,
        "suggest_s": elapsed,
        "batch": len(batch),
        "skip_reason": reason,
        "trial_numbers": [b["trial_number"] for b in batch],
        "split_s": {**timers.totals, "other": elapsed - sum(timers.totals.values())},
        "calls": timers.calls,
    }
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    _emit(result)


def probe_suggest_snapshot(args: argparse.Namespace) -> None:
    """Prototype of a fix, for comparison: the same batch asked against an in-memory snapshot.

    One read of the study's trials, TPE asks on an in-memory copy (constant liar sees the batch),
    then the batch written back as RUNNING trials, one insert each. Nothing here is the pipeline's
    code path; it shows how much of ``suggest_batch`` is storage round trips and how much is TPE.
    """
    import optuna
    from optuna.trial import FrozenTrial, TrialState

    from hpo_core.keys import StudyAttr, TrialAttr  # noqa: PLC0415 - the probe times this import
    from hpo_core.samplers import build_sampler  # noqa: PLC0415 - the probe times this import
    from hpo_core.space import space_size  # noqa: PLC0415 - the probe times this import
    from hpo_core.spec import spec_from_json  # noqa: PLC0415 - the probe times this import
    from hpo_core.storage import open_storage
    from hpo_core.study.config import RunConfig  # noqa: PLC0415 - the probe times this import
    from hpo_core.study.suggest import _ask_distinct, _key

    imported = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    storage = open_storage(os.environ["HPO_STORAGE_URL"])
    study_id = storage.get_study_id_from_name(args.study)
    attrs = storage.get_study_user_attrs(study_id)
    spec = spec_from_json(attrs[StudyAttr.SPEC])
    config = RunConfig(**attrs[StudyAttr.RUN_CONFIG])
    trials = storage.get_all_trials(study_id, deepcopy=False)
    t_read = time.perf_counter()
    memory = optuna.storages.InMemoryStorage()
    directions = [
        optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
        for d in spec.all_directions
    ]
    mem_id = memory.create_new_study(directions, "m")
    for t in trials:
        memory.create_new_trial(mem_id, template_trial=t)
    t_copy = time.perf_counter()
    sampler = build_sampler(spec, seed=config.seed, options=config.sampler_options, round_number=args.round)
    study = optuna.load_study(study_name="m", storage=memory, sampler=sampler)
    seen: set[str] = set()
    batch = []
    for _ in range(32):
        trial, params = _ask_distinct(study, spec, seen, space_size(spec))
        if trial is None:
            break
        seen.add(_key(params))
        batch.append((params, dict(trial.distributions)))
    t_sample = time.perf_counter()
    numbers = []
    for index, (params, dists) in enumerate(batch):
        template = FrozenTrial(
            number=-1,
            trial_id=-1,
            state=TrialState.RUNNING,
            value=None,
            values=None,
            datetime_start=dt.datetime.now(),
            datetime_complete=None,
            params=params,
            distributions=dists,
            user_attrs={
                TrialAttr.ROUND: args.round,
                TrialAttr.BATCH_INDEX: index,
                "hpo.map_index": index,
                "hpo.dag_id": "hpo_bench_scale",
                "hpo.run_id": "bench",
            },
            system_attrs={},
            intermediate_values={},
        )
        numbers.append(storage.get_trial(storage.create_new_trial(study_id, template_trial=template)).number)
    t_write = time.perf_counter()
    _emit(
        {
            "import_s": imported - _T0,
            "suggest_s": t_write - t0,
            "split_s": {
                "storage reads": t_read - t0,
                "copy to memory": t_copy - t_read,
                "sampler (TPE)": t_sample - t_copy,
                "storage writes": t_write - t_sample,
            },
            "batch": len(batch),
            "trial_numbers": numbers,
        }
    )


def probe_parse(args: argparse.Namespace) -> None:
    """Fill a DagBag from ``--dags`` and serialize every DAG (what the DAG processor does)."""
    t_import = time.perf_counter()
    from airflow.dag_processing.dagbag import DagBag  # noqa: PLC0415 - the probe times this import
    from airflow.serialization.serialized_objects import DagSerialization  # noqa: PLC0415 - the probe times this import

    imported = time.perf_counter()
    t0 = time.perf_counter()
    bag = DagBag(dag_folder=args.dags, safe_mode=False)
    parsed = time.perf_counter()
    n_tasks = 0
    for dag in bag.dags.values():
        DagSerialization.to_dict(dag)
        n_tasks += len(dag.tasks)
    serialized = time.perf_counter()
    _emit(
        {
            "import_s": imported - t_import,
            "parse_s": parsed - t0,
            "serialize_s": serialized - parsed,
            "dags": len(bag.dags),
            "dag_ids_sample": sorted(bag.dags)[:3],
            "tasks": n_tasks,
            "import_errors": {str(k): str(v)[:300] for k, v in bag.import_errors.items()},
        }
    )


def probe_dagtest(args: argparse.Namespace) -> None:
    """Run ``dag.test()`` on one study DAG and report its task instances' timings."""
    spec = importlib.util.spec_from_file_location("bench_dag_file", args.dag_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = getattr(module, args.dag_id)
    t0 = time.time()
    dag_run = dag.test(mark_success_pattern=args.mark_success or None)
    wall = time.time() - t0
    from airflow.models.taskinstance import TaskInstance  # noqa: PLC0415 - Airflow only in the probes that use it
    from airflow.utils.session import create_session  # noqa: PLC0415 - Airflow only in the probes that use it

    with create_session() as session:
        tis = (
            session.query(TaskInstance)
            .filter(TaskInstance.dag_id == args.dag_id, TaskInstance.run_id == dag_run.run_id)
            .all()
        )
        rows = [
            {
                "task_id": ti.task_id,
                "map_index": ti.map_index,
                "state": str(ti.state),
                "start": ti.start_date.timestamp() if ti.start_date else None,
                "end": ti.end_date.timestamp() if ti.end_date else None,
            }
            for ti in tis
        ]
    _emit({"wall_s": wall, "state": str(dag_run.state), "started_at": t0, "task_instances": rows})


def main(argv: list[str] | None = None) -> int:
    """Dispatch to one probe."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    s = sub.add_parser("suggest")
    s.add_argument("--study", required=True)
    s.add_argument("--round", type=int, required=True)
    s.add_argument("--profile")
    f = sub.add_parser("suggest-snapshot")
    f.add_argument("--study", required=True)
    f.add_argument("--round", type=int, required=True)
    p = sub.add_parser("parse")
    p.add_argument("--dags", required=True)
    d = sub.add_parser("dagtest")
    d.add_argument("--dag-file", required=True)
    d.add_argument("--dag-id", required=True)
    d.add_argument("--mark-success", default="", help="regex of task ids marked success, not run")
    args = parser.parse_args(argv)
    probes = {
        "suggest": probe_suggest,
        "suggest-snapshot": probe_suggest_snapshot,
        "parse": probe_parse,
        "dagtest": probe_dagtest,
    }
    probes[args.probe](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
