"""Cold-process probes of the scale benchmark (each call is a fresh interpreter, as a task is).

* ``suggest``: time ``engine.suggest_batch`` for one round in a fresh process, optionally under
  cProfile, and split it into storage reads, sampler, storage writes and the rest.
* ``parse``: fill a DagBag from a DAG folder and serialize every DAG, as the DAG processor does.
* ``dagtest``: run one study DAG with ``dag.test()`` and read back its task instances.

Each prints one line ``BENCH_RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

_T0 = time.perf_counter()
RESULT_PREFIX = "BENCH_RESULT "

#: Profile buckets: (label, substrings of "file:function" whose cumulative time counts there).
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    (
        "storage reads",
        (
            "_cached_storage.py:get_all_trials",
            "_rdb/storage.py:get_all_trials",
            "_rdb/storage.py:get_trial(",
            "storage.py:get_study_user_attrs",
        ),
    ),
    (
        "sampler (TPE)",
        (
            "tpe/sampler.py:sample_relative",
            "tpe/sampler.py:sample_independent",
            "tpe/sampler.py:infer_relative_search_space",
            "tpe/sampler.py:before_trial",
        ),
    ),
    (
        "storage writes",
        (
            "storage.py:create_new_trial",
            "storage.py:set_trial_user_attr",
            "storage.py:set_trial_param",
            "storage.py:set_trial_system_attr",
        ),
    ),
]


def _emit(data: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(data, default=str), flush=True)


def _bucket_times(profile: Any) -> dict[str, float]:
    """Cumulative seconds per bucket, counting only outermost calls (no double counting)."""
    import pstats

    stats = pstats.Stats(profile)
    raw = stats.stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for label, needles in BUCKETS:
        keys = {k for k in raw if any(n in f"{k[0]}:{k[2]}(" or n in f"{k[0]}:{k[2]}" for n in needles)}
        total = 0.0
        for key in keys:
            _cc, _nc, _tt, ct, callers = raw[key]
            # Subtract the time of calls made from another matched function of the same bucket.
            nested = sum(v[3] for caller, v in callers.items() if caller in keys)
            total += max(0.0, ct - nested)
        out[label] = total
    return out


def probe_suggest(args: argparse.Namespace) -> None:
    """One round of ``suggest_batch`` in this fresh process."""
    t_import = time.perf_counter()
    from hpo_core import engine

    imported = time.perf_counter()
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    t0 = time.perf_counter()
    batch, reason = engine.suggest_batch(
        storage_url=os.environ["HPO_STORAGE_URL"],
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
    }
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
        result["profile_buckets_s"] = _bucket_times(args.profile)
    _emit(result)


def probe_parse(args: argparse.Namespace) -> None:
    """Fill a DagBag from ``--dags`` and serialize every DAG (what the DAG processor does)."""
    t_import = time.perf_counter()
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

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
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_dag_file", args.dag_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = getattr(module, args.dag_id)
    t0 = time.time()
    dag_run = dag.test(mark_success_pattern=args.mark_success or None)
    wall = time.time() - t0
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

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
    p = sub.add_parser("parse")
    p.add_argument("--dags", required=True)
    d = sub.add_parser("dagtest")
    d.add_argument("--dag-file", required=True)
    d.add_argument("--dag-id", required=True)
    d.add_argument("--mark-success", default="", help="regex of task ids marked success, not run")
    args = parser.parse_args(argv)
    {"suggest": probe_suggest, "parse": probe_parse, "dagtest": probe_dagtest}[args.probe](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
