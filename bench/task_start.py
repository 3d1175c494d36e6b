"""Task start cost on the local Airflow of ``scripts/local_airflow.py``: WarmLocalExecutor vs LocalExecutor.

For each executor a fresh local instance (its own temp ``HPO_HOME``, SQLite metadata, parallelism 2,
the settings of :func:`scripts.local_airflow.airflow_env`) runs two DAGs of N chained tasks, one
after the other:

* ``bench_trivial``: every task returns at once (Airflow's own per-task cost);
* ``bench_stack``: every task imports what the study's tasks use (Optuna, MLflow and its SQL stores,
  ``hpo_core.engine`` / ``worker`` / ``tracking``) and returns.

From the task instances (REST API): duration = end - start date, gap = next task's start - this
task's end (scheduler hop, executor hand-over, process start, DAG file parse), and queued -> start.
Medians over the chain (the first task is left out: it also pays the first request to the API).

    .venv/bin/python -m bench.task_start [--tasks 8] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import local_airflow as la  # noqa: E402

DAG_FILE = '''"""Benchmark DAGs: chains of trivial tasks (airflow DAG)."""
import datetime as dt

from airflow.sdk import DAG, chain, task

N = {n}


def _stack() -> None:
    import mlflow  # noqa: F401
    import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import optuna  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401

    import hpo_core.engine  # noqa: F401
    import hpo_core.tracking  # noqa: F401
    import hpo_core.worker  # noqa: F401


for name, body in (("bench_trivial", None), ("bench_stack", _stack)):
    with DAG(name, schedule=None, start_date=dt.datetime(2025, 1, 1), catchup=False) as dag:
        tasks = []
        for i in range(N):

            @task(task_id=f"t{{i}}")
            def step(body=body) -> None:
                if body is not None:
                    body()

            tasks.append(step())
        chain(*tasks)
    globals()[name] = dag
'''


def _ts(value: Any) -> float:
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def measure(work: Path, *, warm: bool, n_tasks: int) -> dict[str, Any]:
    """Start a local instance with or without the warm executor, run both DAGs, return the figures."""
    name = "warm" if warm else "plain"
    home = work / name
    dags = work / "dags"
    settings = la.LocalSettings(
        hpo_home=home,
        airflow_home=home / "airflow",
        port=la._free_port(),
        parallelism=2,
        warm_executor=warm,
        preimport="",
        dags_folder=dags,
    )
    airflow = la.LocalAirflow(settings)
    out: dict[str, Any] = {"executor": settings.executor}
    try:
        since = time.time()
        airflow.start(wait_scheduler=True)
        out["startup_s"] = time.monotonic() - airflow.timings.started
        for dag_id in ("bench_trivial", "bench_stack"):
            airflow.wait_for_dag(dag_id, since=since)
            run_id = airflow.trigger(dag_id, {})
            deadline = time.monotonic() + 600
            while airflow.run_state(dag_id, run_id) not in la.TERMINAL_RUN_STATES:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{dag_id} did not finish")
                time.sleep(1.0)
            tis = sorted(airflow.api.task_instances(dag_id, run_id), key=lambda t: int(t["task_id"][1:]))
            durations = [_ts(t["end_date"]) - _ts(t["start_date"]) for t in tis]
            gaps = [_ts(b["start_date"]) - _ts(a["end_date"]) for a, b in itertools.pairwise(tis)]
            queued = [_ts(t["start_date"]) - _ts(t["queued_when"]) for t in tis if t.get("queued_when")]
            starts = [_ts(t["start_date"]) for t in tis]
            run = airflow.api.json("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            out[dag_id] = {
                "states": sorted({t["state"] for t in tis}),
                "duration_median_s": statistics.median(durations[1:]),
                "gap_median_s": statistics.median(gaps[1:]),
                "queued_to_start_median_s": statistics.median(queued[1:]),
                "per_task_s": statistics.median([b - a for a, b in itertools.pairwise(starts[1:])]),
                "run_s": _ts(run["end_date"]) - _ts(run["start_date"]),
                "durations_s": [round(d, 3) for d in durations],
                "gaps_s": [round(g, 3) for g in gaps],
            }
    finally:
        airflow.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8, help="tasks per chain (default 8)")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hpo-task-start-") as tmp:
        work = args.keep or Path(tmp)
        (work / "dags").mkdir(parents=True, exist_ok=True)
        (work / "dags" / "bench_chains.py").write_text(DAG_FILE.format(n=args.tasks))
        results = [measure(work, warm=warm, n_tasks=args.tasks) for warm in (False, True)]
    print(json.dumps(results, indent=1))
    print(f"\n{'executor':<42} {'DAG':<14} {'task s':>7} {'gap s':>7} {'q->start':>8} {'start-to-start':>14}")
    for result in results:
        for dag_id in ("bench_trivial", "bench_stack"):
            r = result[dag_id]
            print(
                f"{result['executor']:<42} {dag_id:<14} {r['duration_median_s']:7.2f} "
                f"{r['gap_median_s']:7.2f} {r['queued_to_start_median_s']:8.2f} {r['per_task_s']:14.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
