"""Orchestration efficiency: N fixed-time trials at parallelism P through each system.

Contenders, run one after the other in the same invocation so that their ratios are comparable:

* ``ours B=b k=k``: the pipeline on a real Airflow (api-server, scheduler, dag-processor, the warm
  local executor when the plugin has it, else the LocalExecutor; PostgreSQL metadata and Optuna
  storage, MLflow on SQLite), one DAG run per shape: rounds of ``b`` trials, ``k`` trials per mapped
  evaluate task (a *slot*: one warm worker evaluating its trials in sequence), at most P trials
  running at once. The best shape with k > 1 is ``ours_slots``, the best with k = 1
  ``ours_one_per_task``.
* ``optuna``: plain ``study.optimize(n_jobs=P)`` on the same Optuna storage (the reference).
* ``ray``: Ray Tune with its Optuna searcher on a local Ray with P CPUs.
* ``spark``: Hyperopt TPE with ``SparkTrials(parallelism=P)`` on a local Spark.

Efficiency = ideal / actual with ideal = ceil(N / P) x trial time.

A second case runs the example study (``dags/studies/breast_cancer_gbm.yaml``, its real objective,
its trials, batch and ``trials_per_task``) through the same Airflow (trigger to run end) and through
plain Optuna ``n_jobs=P`` on the same PostgreSQL storage with the same objective, space, sampler and
pruner; Optuna runs once before Airflow starts and once after it stopped, and the mean of the two is
the reference. ``example_ratio`` = pipeline wall / Optuna wall.

Our overheads come from the run's own records: the task instances (REST API: queued, start, end),
the Optuna trials (``datetime_complete`` at tell), the worker's ``hpo.worker.started_at`` attribute
(set when a slot starts a trial) and the objective's timing records (fork time of the trial's
process from ``/proc``, sleep start and end):

* per trial inside a warm worker: a slot's time from its first trial's start to its last trial's
  tell, less the objectives' time, divided by its trials (claim, MLflow child run, fork, tell);
* per round: suggest + observe + the scheduler's hops between them and the evaluate tasks;
* per run: trigger to the start task, start, the hop to and the run of finalize, closing the run.

Writes ``orchestration.json`` (headline figures, targets, per-shape details, load),
``orchestration_raw.json`` (everything measured), ``orchestration.md`` and plots.
Run with ``bench/run.sh orchestration [--quick]`` (needs ``.venv`` and ``.venv-bench``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    BENCH_PYTHON,
    MAIN_PYTHON,
    REPO_ROOT,
    fmt,
    log,
    machine_info,
    output_dir,
    pyplot,
    run_python,
    savefig,
    slot_utilisation,
    table,
    write_json,
)
from bench.objectives import ENV_SECONDS, ENV_TIMING_DIR, read_timings
from hpo_core.spec import load_spec
from tests.services import AirflowDeployment, PostgresServer

TARGET_EFFICIENCY = 0.85
TARGETS = {
    "efficiency_ours_slots": (">=", TARGET_EFFICIENCY),
    "example_ratio": ("<=", 2.5),
    "overhead_per_trial_s": ("<=", 0.2),
    "overhead_per_round_s": ("<=", 4.0),
    "overhead_per_run_s": ("<=", 10.0),
}
EXAMPLE_STUDY = REPO_ROOT / "dags" / "studies" / "breast_cancer_gbm.yaml"
EXAMPLE_TRIALS_PER_TASK = 2
#: The warm local executor, used when the plugin ships it (it pre-imports the stack in the scheduler).
WARM_EXECUTOR_FILE = REPO_ROOT / "plugins" / "hpo_airflow" / "executor.py"
WARM_EXECUTOR = "hpo_airflow.executor.WarmLocalExecutor"
#: The local Airflow launcher; its ``airflow_env`` is the one definition of the local instance.
LOCAL_AIRFLOW = REPO_ROOT / "scripts" / "local_airflow.py"
LOCAL_KEYS = ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__MP_START_METHOD", "HPO_PREIMPORT")
LOCAL_PREFIXES = ("AIRFLOW__SCHEDULER__",)
DEFAULT_SHAPES = "32:16,8:4,32:1,8:1"
WARMUP_STUDY = "bench_warmup"
QUICK_SHAPES = "8:4,4:2,8:1"

STUDY_TEMPLATE = """\
# Orchestration benchmark study: {n} trials of {t:g}s, rounds of {b}, {k} per task, at most {p} at a time.
name: {name}
description: Orchestration benchmark, {n} sleeping trials in rounds of {b}, {k} per task
objective: bench.objectives:sleep_objective
direction: minimize
search_space:
  x: {{type: float, low: 0.0, high: 1.0}}
  y: {{type: float, low: 0.0, high: 1.0}}
sampler: {{type: tpe, seed: 1}}
budget: {{n_trials: {n}, batch_size: {b}, max_rounds: {rounds}}}
trial: {{retries: 0, execution_timeout: 300}}
mlflow: {{experiment: bench_orchestration}}
worker: {{backend: local, trials_per_task: {k}{max_active}}}
"""

DAG_FILE = '''"""Thin copy of dags/hpo_studies.py pointing at the benchmark's study folder."""

from hpo_airflow import load_study_dags

load_study_dags(globals())
'''


def shape_name(b: int, k: int) -> str:
    """``ours B=32 k=16``."""
    return f"ours B={b} k={k}"


def write_study(folder: Path, *, n: int, t: float, b: int, k: int, p: int, name: str | None = None) -> Path:
    """Write the study YAML of rounds of ``b`` with ``k`` trials per task and return its path.

    ``worker.max_active_trials`` (the pipeline runs ``max_active_trials // k`` slot tasks at once) is
    only set when a round has more slots than P; ``core.parallelism = P`` bounds the rest.
    """
    name = name or f"bench_b{b}_k{k}"
    slots = math.ceil(b / k)
    max_active = f", max_active_trials: {p * k}" if slots > p else ""
    path = folder / f"{name}.yaml"
    path.write_text(
        STUDY_TEMPLATE.format(
            name=name, n=n, t=t, b=b, k=k, p=p, rounds=math.ceil(n / b), max_active=max_active
        )
    )
    return path


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()  # naive Optuna datetimes are local time
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _sum(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) if xs else None


# --- our pipeline on Airflow ---------------------------------------------------------------------


def _slot_trials(trials: list[Any]) -> dict[tuple[int, int], list[Any]]:
    """The study's trials by (round, map index of their slot task), in the order the slot ran them."""
    by_slot: dict[tuple[int, int], list[Any]] = defaultdict(list)
    for t in trials:
        attrs = t.user_attrs
        if "hpo.round" not in attrs or attrs.get("hpo.discarded"):
            continue
        by_slot[(int(attrs["hpo.round"]), int(attrs.get("hpo.map_index", 0)))].append(t)
    for slot in by_slot.values():
        slot.sort(
            key=lambda t: (float((t.user_attrs.get("hpo.worker") or {}).get("started_at") or 0), t.number)
        )
    return by_slot


def analyse_slot(
    ti: dict[str, Any], slot: list[Any], timing_by_trial: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """One mapped evaluate task (a slot): task start, each trial's parts, task exit."""
    ti_start, ti_end = _epoch(ti["start_date"]), _epoch(ti["end_date"])
    rows: list[dict[str, Any]] = []
    for t in slot:
        worker = t.user_attrs.get("hpo.worker") or {}
        rec = timing_by_trial.get(t.number)
        started = float(worker["started_at"]) if worker.get("started_at") else None
        complete = _epoch(t.datetime_complete)
        row: dict[str, Any] = {
            "trial": t.number,
            "state": t.state.name,
            "started_at": started,
            "complete": complete,
        }
        if rec is not None and started is not None:
            row.update(
                setup_s=rec["start"] - started,  # MLflow child run, attributes, fork, child set-up
                fork_s=(rec["process_start"] - started) if rec.get("process_start") else None,
                objective_s=rec["end"] - rec["start"],
                tell_s=(complete - rec["end"]) if complete else None,  # child exit, MLflow close, tell
                objective_start=rec["start"],
                objective_end=rec["end"],
            )
        elif started is not None and complete is not None:
            row["trial_s"] = complete - started
        rows.append(row)
    for prev, nxt in itertools.pairwise(rows):
        if prev.get("complete") and nxt.get("started_at"):
            prev["to_next_trial_s"] = nxt["started_at"] - prev["complete"]  # resolve + claim the next
    first_start = rows[0]["started_at"] if rows else None
    last_complete = rows[-1]["complete"] if rows else None
    out: dict[str, Any] = {
        "map_index": ti["map_index"],
        "state": ti["state"],
        "trials": len(rows),
        "queued_to_start_s": ti_start - (_epoch(ti.get("queued_when")) or ti_start),
        "task_to_first_trial_s": (first_start - ti_start) if first_start else None,
        "task_exit_s": (ti_end - last_complete) if last_complete else None,
        "task_total_s": ti_end - ti_start,
        "trial_rows": rows,
    }
    objectives = [r.get("objective_s") for r in rows]
    if rows and first_start and last_complete and all(o is not None for o in objectives):
        # The warm worker's own time per trial: everything between its first trial's start and its
        # last trial's tell that is not the objective.
        out["in_worker_overhead_s"] = (last_complete - first_start) - sum(objectives)
        out["per_trial_overhead_s"] = out["in_worker_overhead_s"] / len(rows)
    return out


def analyse_run(
    tis: list[dict[str, Any]],
    trials: list[Any],
    timings: list[dict[str, Any]],
    *,
    trigger_time: float,
    run_end: float,
    trial_seconds: float | None,
    parallelism: int,
    n_trials: int,
) -> dict[str, Any]:
    """Split one DAG run's wall time into per-run, per-round, per-slot and per-trial parts."""
    by_key = {(ti["task_id"], ti.get("map_index", -1)): ti for ti in tis}
    start_ti = by_key[("start", -1)]
    final_ti = by_key.get(("finalize", -1))
    timing_by_trial = {rec["trial"]: rec for rec in timings if rec.get("trial") is not None}
    by_slot = _slot_trials(trials)
    rounds: list[dict[str, Any]] = []
    slots: list[dict[str, Any]] = []
    prev_end = _epoch(start_ti["end_date"])
    first_start = _epoch(start_ti["start_date"])
    k = 1
    while (f"round_{k}.suggest", -1) in by_key:
        row, round_slots, prev_end = _analyse_round(
            k,
            by_key,
            by_slot,
            timing_by_trial,
            prev_end=prev_end,
            trial_seconds=trial_seconds,
            parallelism=parallelism,
        )
        rounds.append(row)
        slots.extend(round_slots)
        k += 1
    run_rounds = [r for r in rounds if not r["skipped"]]
    wall = run_end - trigger_time
    ideal_total = math.ceil(n_trials / parallelism) * trial_seconds if trial_seconds else None
    final_end = _epoch(final_ti["end_date"]) if final_ti and final_ti.get("end_date") else run_end
    per_run = {
        "trigger_to_start_task_s": first_start - trigger_time,
        "start_task_s": _epoch(start_ti["end_date"]) - first_start,
        "skipped_rounds_s": sum(r["span_s"] for r in rounds if r["skipped"]),
        "finalize_s": (final_end - prev_end) if final_ti else None,  # the hop to it included
        "run_close_s": run_end - final_end,
    }
    per_run["total_s"] = sum(v for v in per_run.values() if v is not None)
    parts_round = [
        "scheduling_s",
        "suggest_s",
        "observe_s",
        "control_s",
        "evaluate_s",
        "evaluate_overhead_s",
        "overhead_s",
    ]
    parts_slot = ["queued_to_start_s", "task_to_first_trial_s", "task_exit_s", "task_total_s"]
    trial_rows = [r for s in slots for r in s["trial_rows"]]
    parts_trial = ["setup_s", "fork_s", "objective_s", "tell_s", "to_next_trial_s", "trial_s"]
    overhead_slots = [s for s in slots if "in_worker_overhead_s" in s]
    in_worker = _sum([s["in_worker_overhead_s"] for s in overhead_slots])
    trials_timed = sum(s["trials"] for s in overhead_slots)
    result = {
        "wall_s": wall,
        "ideal_s": ideal_total,
        "efficiency": ideal_total / wall if ideal_total else None,
        "rounds_run": len(run_rounds),
        "rounds_skipped": len(rounds) - len(run_rounds),
        "slot_tasks": len(slots),
        "trials_evaluated": len(trial_rows),
        "per_run": per_run,
        "per_round_mean": {p: _mean([r[p] for r in run_rounds]) for p in parts_round},
        "per_slot_task_mean": {p: _mean([s[p] for s in slots]) for p in parts_slot},
        "per_trial_mean": {p: _mean([r.get(p) for r in trial_rows]) for p in parts_trial},
        "per_trial_in_worker_s": (in_worker / trials_timed)
        if in_worker is not None and trials_timed
        else None,
        "in_worker_overhead_total_s": in_worker,
        "in_worker_trials": trials_timed,
        "rounds": rounds,
        "slots": slots,
    }
    accounted = per_run["total_s"] + sum(r["span_s"] for r in run_rounds)
    result["unaccounted_s"] = wall - accounted  # should be ~0: the parts tile the wall time
    return result


def _analyse_round(
    k: int,
    by_key: dict[tuple[str, int], dict[str, Any]],
    by_slot: dict[tuple[int, int], list[Any]],
    timing_by_trial: dict[int, dict[str, Any]],
    *,
    prev_end: float,
    trial_seconds: float | None,
    parallelism: int,
) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Round ``k`` of a run (after the previous part ended at ``prev_end``): its row, its slots and
    when it ended. A round whose suggest did not succeed or that mapped no slot is a skipped row."""
    sug = by_key[(f"round_{k}.suggest", -1)]
    obs = by_key[(f"round_{k}.observe", -1)]
    evs = sorted(
        (ti for (tid, mi), ti in by_key.items() if tid == f"round_{k}.evaluate" and mi >= 0),
        key=lambda ti: ti["map_index"],
    )
    obs_end = _epoch(obs["end_date"]) or _epoch(sug["end_date"])
    if sug["state"] != "success" or not evs:
        return (
            {"round": k, "skipped": True, "span_s": (obs_end or prev_end) - prev_end},
            [],
            obs_end or prev_end,
        )
    ev_start = min(_epoch(ti["start_date"]) for ti in evs)
    ev_end = max(_epoch(ti["end_date"]) for ti in evs)
    round_slots = [analyse_slot(ti, by_slot.get((k, ti["map_index"]), []), timing_by_trial) for ti in evs]
    for s in round_slots:
        s["round"] = k
    n_round = sum(s["trials"] for s in round_slots)
    ideal = math.ceil(n_round / parallelism) * trial_seconds if trial_seconds else None
    hops = (
        (_epoch(sug["start_date"]) - prev_end)
        + (ev_start - _epoch(sug["end_date"]))
        + (_epoch(obs["start_date"]) - ev_end)
    )
    row: dict[str, Any] = {
        "round": k,
        "skipped": False,
        "trials": n_round,
        "slots": len(evs),
        "ideal_s": ideal,
        "span_s": obs_end - prev_end,
        "scheduling_s": hops,
        "suggest_s": _epoch(sug["end_date"]) - _epoch(sug["start_date"]),
        "evaluate_s": ev_end - ev_start,
        "evaluate_overhead_s": (ev_end - ev_start) - ideal if ideal is not None else None,
        "observe_s": obs_end - _epoch(obs["start_date"]),
    }
    row["control_s"] = row["scheduling_s"] + row["suggest_s"] + row["observe_s"]
    row["overhead_s"] = row["span_s"] - ideal if ideal is not None else None
    return row, round_slots, obs_end


def run_ours(
    airflow: Any,
    storage_url: str,
    dag_id: str,
    *,
    conf: dict[str, Any] | None,
    n: int,
    t: float | None,
    p: int,
    timing_dir: Path | None,
) -> dict[str, Any]:
    """Trigger one DAG run, wait for it, and analyse it."""
    import optuna

    from hpo_core.storage import open_storage

    client = airflow.client
    client.wait_for_dag(dag_id, timeout=300)
    client.unpause(dag_id)
    load_before = os.getloadavg()
    cpu_before = airflow_cpu(airflow)
    trigger_time = time.time()
    run_id = client.trigger(dag_id, conf or {})
    state = client.wait_for_run(dag_id, run_id, timeout=max(900, 30 * n * (t or 5)), poll=0.5)
    cpu_after = airflow_cpu(airflow)
    run = client.dag_run(dag_id, run_id)
    tis = client.task_instances(dag_id, run_id)
    study_name = f"{dag_id.removeprefix('hpo_')}.{run_id}"
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    trials = study.get_trials()
    name = dag_id.removeprefix("hpo_")
    timings = [r for r in read_timings(timing_dir) if r["contender"] == f"ours:{name}"] if timing_dir else []
    result = analyse_run(
        tis,
        trials,
        timings,
        trigger_time=trigger_time,
        run_end=_epoch(run["end_date"]),
        trial_seconds=t,
        parallelism=p,
        n_trials=n,
    )
    result.update(
        state=state,
        run_id=run_id,
        dag_id=dag_id,
        conf=conf or {},
        study_name=study_name,
        load_avg_before=[round(x, 2) for x in load_before],
        load_avg_after=[round(x, 2) for x in os.getloadavg()],
        task_instances=tis,
        trial_states=dict(
            sorted(
                {
                    s: sum(1 for tr in trials if tr.state.name == s and "hpo.round" in tr.user_attrs)
                    for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
                }.items()
            )
        ),
    )
    complete = [tr for tr in trials if tr.state.name == "COMPLETE"]
    if complete and not t:
        best = (max if study.direction.name == "MAXIMIZE" else min)(tr.value for tr in complete)
        result["best_value"] = best
    if timings:
        result.update(slot_utilisation([(r["start"], r["end"]) for r in timings], p))
    cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before}
    result["airflow_cpu_s"] = cpu
    result["airflow_cpu_share"] = sum(cpu.values()) / (result["wall_s"] * (os.cpu_count() or 1))
    result["supervisor_linger"] = supervisor_lingers(airflow.logs_dir / "scheduler.log", tis)
    result["evaluate_log_warnings"] = evaluate_log_warnings(airflow.home / "logs", dag_id, run_id)
    return result


def airflow_cpu(airflow: Any) -> dict[str, float]:
    """CPU seconds used so far by Airflow's own processes (not the tasks').

    api-server and dag-processor with their children; the scheduler's main process; the executor's
    worker processes (the scheduler's children, which run the task supervisors), without the task
    processes they fork. Processes that already ended are not counted.
    """

    def used(proc: Any) -> float:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    out: dict[str, float] = {}
    for name, managed in airflow.processes.items():
        if not managed.pid:
            continue
        try:
            main = psutil.Process(managed.pid)
            if name == "scheduler":
                out["executor workers"] = sum(used(c) for c in main.children(recursive=False))
                out[name] = used(main)
            else:
                out[name] = used(main) + sum(used(c) for c in main.children(recursive=True))
        except psutil.Error:
            continue
    return out


def supervisor_lingers(scheduler_log: Path, tis: list[dict[str, Any]]) -> dict[str, Any]:
    """How long each task's supervisor went on after the task ended (its executor slot stays taken).

    From the scheduler log's ``Workload finished`` lines (LocalExecutor: the supervisor runs in the
    scheduler's worker processes) against the task instance's end date.
    """
    finished: dict[str, float] = {}
    try:
        with scheduler_log.open(errors="replace") as f:
            for line in f:
                if "Workload finished" in line:
                    found = re.search(r"workload_id=(\S+)", line)
                    stamp = _epoch(line.split()[0]) if line[:1].isdigit() else None
                    if found and stamp:
                        finished[found.group(1)] = stamp
    except (OSError, ValueError):
        return {}
    lingers = [
        finished[ti["id"]] - _epoch(ti["end_date"])
        for ti in tis
        if ti.get("id") in finished and ti.get("end_date")
    ]
    if not lingers:
        return {}
    return {
        "tasks": len(lingers),
        "mean_s": statistics.fmean(lingers),
        "max_s": max(lingers),
        "over_1s": sum(1 for x in lingers if x > 1.0),
        "total_s": sum(lingers),
    }


def evaluate_log_warnings(log_root: Path, dag_id: str, run_id: str) -> dict[str, Any]:
    """Warnings the evaluate tasks' logs carry (e.g. a library touching Airflow's deprecated modules).

    Counts ``DeprecatedImportWarning`` lines and groups them into bursts (lines less than 2 s apart),
    whose duration is time the trial spent emitting and relaying them.
    """
    folder = log_root / f"dag_id={dag_id}" / f"run_id={run_id}"
    count, bursts, sources = 0, [], set()
    for path in sorted(folder.glob("task_id=*.evaluate/map_index=*/attempt=*.log")):
        stamps = []
        with path.open(errors="replace") as f:
            for line in f:
                if "DeprecatedImportWarning" not in line:
                    continue
                count += 1
                try:
                    record = json.loads(line)
                    stamps.append(_epoch(record["timestamp"]))
                    sources.add(f"{record.get('filename')}:{record.get('lineno')}")
                except (ValueError, KeyError, TypeError):
                    continue
        start = prev = None
        for stamp in sorted(x for x in stamps if x is not None):
            if start is None or stamp - prev > 2.0:
                if start is not None:
                    bursts.append(prev - start)
                start = stamp
            prev = stamp
        if start is not None:
            bursts.append(prev - start)
    return {
        "deprecation_warnings": count,
        "bursts": len(bursts),
        "burst_s_total": sum(bursts),
        "burst_s_mean": statistics.fmean(bursts) if bursts else None,
        "sources": sorted(sources),
    }


def airflow_env_overrides(dags: Path, work: Path, p: int) -> tuple[dict[str, str], str]:
    """The executor and scheduler settings of the local Airflow instance, for the benchmark's Airflow.

    Taken from ``scripts/local_airflow.py``'s ``airflow_env`` when it exists (the executor, its
    start method and pre-imports, every ``AIRFLOW__SCHEDULER__`` option); the rest (PostgreSQL
    metadata, ports, authentication) stays as ``tests/services.py`` sets it. Without that module:
    the warm executor when the plugin ships it, else the LocalExecutor, with the test settings.

    Returns:
        ``(environment, where it came from)``.
    """
    fallback = {"AIRFLOW__CORE__EXECUTOR": WARM_EXECUTOR if WARM_EXECUTOR_FILE.exists() else "LocalExecutor"}
    if not LOCAL_AIRFLOW.exists():
        return fallback, "executor only (scripts/local_airflow.py not found)"
    try:
        spec = importlib.util.spec_from_file_location("_bench_local_airflow", LOCAL_AIRFLOW)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        settings = module.LocalSettings(
            hpo_home=work / "hpo",
            airflow_home=work / "airflow",
            parallelism=p,
            dags_folder=dags,
            warm_executor=WARM_EXECUTOR_FILE.exists(),
        )
        secrets = {"fernet_key": "unused", "jwt_secret": "unused", "api_secret_key": "unused"}
        full = module.airflow_env(settings, base={}, secrets=secrets)
    except Exception as e:  # another engineer's module in flux: never a reason not to run
        return fallback, f"executor only (scripts/local_airflow.py unusable: {type(e).__name__}: {e})"
    taken = {k: v for k, v in full.items() if k in LOCAL_KEYS or k.startswith(LOCAL_PREFIXES)}
    return taken, "scripts/local_airflow.py airflow_env (executor, pre-imports, scheduler options)"


def start_airflow(work: Path, dags: Path, env: dict[str, str], pg: Any, p: int) -> Any:
    """Start api-server, scheduler and dag-processor with tests/services.py."""
    deployment = AirflowDeployment(
        database_url=pg.create_database("bench_airflow"),
        dags_folder=dags,
        home=work / "airflow",
        plugins_folder=REPO_ROOT / "plugins",
        env=env,
        components=("api-server", "scheduler", "dag-processor"),
        parallelism=p,
    )
    try:
        deployment.start()
    except BaseException:
        log(deployment.logs_tail())
        deployment.stop()
        raise
    return deployment


def prepare_mlflow(tracking_uri: str) -> None:
    """Create the MLflow SQLite schema up front so that no task pays the one-time migration."""
    import mlflow

    mlflow.MlflowClient(tracking_uri=tracking_uri).search_experiments()


def example_conf(quick: bool) -> tuple[dict[str, Any], int]:
    """Trigger conf for the example study and the number of trials it runs."""
    spec = load_spec(EXAMPLE_STUDY)
    conf: dict[str, Any] = {}
    if spec.worker.trials_per_task == 1:  # the example is meant to run 2 per task
        conf["trials_per_task"] = EXAMPLE_TRIALS_PER_TASK
    n = spec.budget.n_trials
    if quick:
        n = min(n, spec.budget.batch_size)
        conf["n_trials"] = n
    return conf, n


# --- the other contenders ------------------------------------------------------------------------


def run_contender(
    name: str,
    python: Path,
    work: Path,
    *,
    n: int,
    p: int,
    spec: Path,
    storage_url: str,
    env: dict[str, str],
    extra: list[str] | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    """Run ``bench.contenders NAME`` in ``python`` and return its result."""
    tag = tag or name
    res_path = work / f"{tag}.json"
    argv = [
        name,
        "--out",
        str(res_path),
        "--workdir",
        str(work / tag),
        "--trials",
        str(n),
        "--parallelism",
        str(p),
        "--spec",
        str(spec),
        "--storage",
        storage_url,
        *(extra or []),
    ]
    if not python.exists():
        return {"available": False, "reason": f"{python} missing (run bench/run.sh to create it)"}
    load_before = os.getloadavg()
    proc = run_python(python, "bench.contenders", argv, env=env, timeout=1800, log=work / f"{tag}.log")
    if not res_path.exists():
        return {"available": False, "reason": f"exit code {proc.returncode}: {proc.stderr[-300:]}"}
    res = json.loads(res_path.read_text())
    res["load_avg_before"] = [round(x, 2) for x in load_before]
    res["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    return res


# --- driver --------------------------------------------------------------------------------------


def parse_shapes(text: str, n: int) -> list[tuple[int, int]]:
    """``"32:16,8:4"`` -> ``[(32, 16), (8, 4)]`` (batch sizes above N dropped)."""
    shapes = []
    for item in text.split(","):
        b, _, k = item.partition(":")
        shape = (int(b), int(k or 1))
        if shape[0] <= n and shape not in shapes:
            shapes.append(shape)
    return shapes


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of :func:`main`."""
    parser = argparse.ArgumentParser(description="Orchestration efficiency benchmark")
    parser.add_argument("--quick", action="store_true", help=f"8 trials of 2 s, shapes {QUICK_SHAPES}")
    parser.add_argument("--out", help="output root (default bench/out/<timestamp>)")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"B:k pairs, comma-separated (default {DEFAULT_SHAPES}, quick {QUICK_SHAPES})",
    )
    parser.add_argument("--contenders", default="ours,example,optuna,ray,spark")
    parser.add_argument(
        "--airflow-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the Airflow components (an experiment: recorded in the config)",
    )
    return parser.parse_args(argv)


@dataclass
class _Runner:
    """Runs the contenders of one invocation, one after the other, into one results dict."""

    n: int
    t: float
    p: int
    shapes: list[tuple[int, int]]
    contenders: list[str]
    work: Path
    timing_dir: Path
    env_common: dict[str, str]
    airflow_env_extra: list[str]
    results: dict[str, Any]
    example: dict[str, Any] = field(default_factory=dict)

    def sample_load(self, what: str) -> None:
        """Record the load average as ``what`` starts (the machine is shared)."""
        self.results["load_samples"].append(
            {"at": what, "time": time.time(), "load_avg": list(os.getloadavg())}
        )

    def optuna_example(self, tag: str, storage_url: str, n_example: int) -> dict[str, Any]:
        """Plain Optuna ``n_jobs=P`` on the example study (the reference of the example case)."""
        p, work = self.p, self.work
        self.sample_load(tag)
        log(f"{tag}: plain Optuna n_jobs={p}, the example's {n_example} trials")
        tracking = f"sqlite:///{work / f'{tag}_mlflow.db'}"
        prepare_mlflow(tracking)
        res = run_contender(
            "optuna_example",
            MAIN_PYTHON,
            work,
            n=n_example,
            p=p,
            spec=EXAMPLE_STUDY,
            storage_url=storage_url,
            env={**self.env_common, "HPO_BENCH_TIMING_DIR": str(work / "timings_example")},
            extra=["--tracking-uri", tracking],
            tag=tag,
        )
        log(f"{tag}: {fmt(res.get('wall_s'))} s ({res.get('reason') or 'ok'})")
        return res

    def write_dags(self) -> Path:
        """The DAG folder of the Airflow contenders: the warm-up study, one study per shape, the example."""
        n, t, p = self.n, self.t, self.p
        dags = self.work / "dags"
        (dags / "studies").mkdir(parents=True)
        (dags / "hpo_bench.py").write_text(DAG_FILE)
        write_study(dags / "studies", n=p, t=t, b=p, k=1, p=p, name=WARMUP_STUDY)
        if "ours" in self.contenders:
            for b, k in self.shapes:
                write_study(dags / "studies", n=n, t=t, b=b, k=k, p=p)
        if "example" in self.contenders:
            shutil.copy(EXAMPLE_STUDY, dags / "studies" / EXAMPLE_STUDY.name)
        return dags

    def airflow_env(self, dags: Path, storage_url: str) -> dict[str, str]:
        """The Airflow components' environment (the local instance's executor settings), recorded in
        the config."""
        work = self.work
        tracking = f"sqlite:///{work / 'mlflow.db'}"
        prepare_mlflow(tracking)
        airflow_env, source = airflow_env_overrides(dags, work, self.p)
        extra_env = dict(item.split("=", 1) for item in self.airflow_env_extra)
        airflow_env.update(extra_env)
        config = self.results["config"]
        config.update(airflow_settings=airflow_env, airflow_settings_from=source, airflow_env_extra=extra_env)
        config["executor"] = airflow_env["AIRFLOW__CORE__EXECUTOR"]
        return {
            **self.env_common,
            **airflow_env,
            "HPO_STORAGE_URL": storage_url,
            "MLFLOW_TRACKING_URI": tracking,
            "HPO_ARTIFACT_ROOT": (work / "mlartifacts").as_uri(),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "plugins")]),
        }

    def run_on_airflow(self, pg: Any, storage_url: str, conf: dict[str, Any], n_example: int) -> None:
        """Start one Airflow; run the warm-up, every shape and the example study on it; stop it."""
        dags = self.write_dags()
        env = self.airflow_env(dags, storage_url)
        self.sample_load("airflow start")
        executor = env["AIRFLOW__CORE__EXECUTOR"]
        log(f"starting Airflow (api-server, scheduler, dag-processor; {executor})")
        airflow = start_airflow(self.work, dags, env, pg, self.p)
        self.results["airflow_startup_s"] = airflow.startup_seconds
        try:
            self.warm_up(airflow, storage_url)
            if "ours" in self.contenders:
                self.run_shapes(airflow, storage_url)
            if "example" in self.contenders:
                self.run_example_pipeline(airflow, storage_url, conf, n_example)
        finally:
            airflow.stop()

    def warm_up(self, airflow: Any, storage_url: str) -> None:
        """The first run after Airflow starts pays one-time costs (connections, the MLflow
        experiment, first imports in the executor's workers): a small run takes them."""
        p, t = self.p, self.t
        self.sample_load("warm-up")
        log(f"warm-up run: {p} trials of {t:g}s")
        try:
            warm = run_ours(
                airflow,
                storage_url,
                f"hpo_{WARMUP_STUDY}",
                conf=None,
                n=p,
                t=t,
                p=p,
                timing_dir=self.timing_dir,
            )
            self.results["warmup"] = {k: warm[k] for k in ("wall_s", "state", "per_run")}
        except Exception as e:
            self.results["warmup"] = {"available": False, "reason": f"{type(e).__name__}: {e}"}

    def run_shapes(self, airflow: Any, storage_url: str) -> None:
        """One DAG run per shape (B trials per round, k per task) of N trials of T seconds."""
        n, t, p = self.n, self.t, self.p
        for b, k in self.shapes:
            name = shape_name(b, k)
            self.sample_load(name)
            log(f"{name}: {n} trials of {t:g}s")
            try:
                res = run_ours(
                    airflow,
                    storage_url,
                    f"hpo_bench_b{b}_k{k}",
                    conf=None,
                    n=n,
                    t=t,
                    p=p,
                    timing_dir=self.timing_dir,
                )
                res.update(batch_size=b, trials_per_task=k)
            except Exception as e:
                log(airflow.logs_tail(["scheduler"]))
                res = {"available": False, "reason": f"{type(e).__name__}: {e}"}
            self.results["contenders"][name] = res
            log(f"{name}: {fmt(res.get('wall_s'))} s, efficiency {fmt(res.get('efficiency'))}")

    def run_example_pipeline(
        self, airflow: Any, storage_url: str, conf: dict[str, Any], n_example: int
    ) -> None:
        """The example study through the pipeline (its real objective, trials and shape)."""
        self.sample_load("example pipeline")
        log(f"example: hpo_breast_cancer_gbm, {n_example} trials, conf {conf}")
        try:
            self.example["pipeline"] = run_ours(
                airflow,
                storage_url,
                "hpo_breast_cancer_gbm",
                conf=conf,
                n=n_example,
                t=None,
                p=self.p,
                timing_dir=None,
            )
        except Exception as e:
            log(airflow.logs_tail(["scheduler"]))
            self.example["pipeline"] = {"available": False, "reason": f"{type(e).__name__}: {e}"}
        log(f"example pipeline: {fmt(self.example['pipeline'].get('wall_s'))} s")

    def run_others(self, storage_url: str, ideal: float) -> None:
        """Plain Optuna, Ray Tune and Hyperopt on Spark on the same sleeping trials."""
        n, t, p, work = self.n, self.t, self.p, self.work
        spec_path = write_study(work, n=n, t=t, b=p, k=1, p=p)
        for name, python in (("optuna", MAIN_PYTHON), ("ray", BENCH_PYTHON), ("spark", BENCH_PYTHON)):
            if name not in self.contenders:
                continue
            self.sample_load(name)
            log(f"{name}: {n} trials of {t:g}s at parallelism {p}")
            res = run_contender(
                name, python, work, n=n, p=p, spec=spec_path, storage_url=storage_url, env=self.env_common
            )
            if res.get("available"):
                recs = [r for r in read_timings(self.timing_dir) if r["contender"] == name]
                res.update(slot_utilisation([(r["start"], r["end"]) for r in recs], p))
                res["objective_runs"] = len(recs)
                res["efficiency"] = ideal / res["wall_s"]
            self.results["contenders"][name] = res
            log(f"{name}: {fmt(res.get('wall_s'))} s ({res.get('reason') or 'ok'})")


def main(argv: list[str] | None = None) -> int:
    """Run the orchestration benchmark and write ``orchestration.json``, tables and plots."""
    args = _parse_args(argv)
    started = time.time()
    n = args.trials or (8 if args.quick else 32)
    t = args.seconds or (2.0 if args.quick else 5.0)
    p = args.parallelism
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES), n)
    contenders = args.contenders.split(",")
    out = output_dir(args.out, "orchestration")
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    timing_dir = work / "timings"
    ideal = math.ceil(n / p) * t
    results: dict[str, Any] = {
        "machine_start": machine_info(),
        "config": {
            "trials": n,
            "trial_seconds": t,
            "parallelism": p,
            "shapes": [{"batch_size": b, "trials_per_task": k, "name": shape_name(b, k)} for b, k in shapes],
            "ideal_s": ideal,
            "quick": args.quick,
        },
        "contenders": {},
        "load_samples": [],
    }
    env_common = {ENV_SECONDS: str(t), ENV_TIMING_DIR: str(timing_dir)}
    os.environ.update(env_common)
    runner = _Runner(
        n=n,
        t=t,
        p=p,
        shapes=shapes,
        contenders=contenders,
        work=work,
        timing_dir=timing_dir,
        env_common=env_common,
        airflow_env_extra=args.airflow_env,
        results=results,
    )
    with PostgresServer() as pg:
        storage_url = pg.create_database("bench_optuna")
        conf, n_example = example_conf(args.quick)
        if "example" in contenders:
            runner.example["optuna_before"] = runner.optuna_example(
                "optuna_example_before", storage_url, n_example
            )
        if "ours" in contenders or "example" in contenders:
            runner.run_on_airflow(pg, storage_url, conf, n_example)
        if "example" in contenders:
            runner.example["optuna_after"] = runner.optuna_example(
                "optuna_example_after", storage_url, n_example
            )
        runner.run_others(storage_url, ideal)
    runner.sample_load("end")
    if runner.example:
        runner.example.update(conf=conf, trials=n_example, study=str(EXAMPLE_STUDY.relative_to(REPO_ROOT)))
        results["example"] = runner.example
    results["machine_end"] = machine_info()
    results["duration_s"] = time.time() - started
    results["summary"] = summarise(results)
    report(results, out)
    return 0


# --- summary -------------------------------------------------------------------------------------


def _ok(res: dict[str, Any] | None) -> bool:
    return (
        bool(res)
        and res.get("available", True)
        and res.get("wall_s") is not None
        and res.get("state", "success") == "success"
    )


def _best(cs: dict[str, Any], slots: bool) -> str | None:
    names = [
        k
        for k, v in cs.items()
        if k.startswith("ours") and _ok(v) and (v.get("trials_per_task", 1) > 1) == slots
    ]
    return max(names, key=lambda k: cs[k]["efficiency"]) if names else None


def _met(value: float | None, op: str, target: float) -> bool | None:
    if value is None:
        return None
    return value >= target if op == ">=" else value <= target


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: efficiency per contender, example ratio, overheads, targets, load."""
    cs = results["contenders"]
    best_slots, best_one = _best(cs, True), _best(cs, False)
    efficiency: dict[str, float | None] = {
        "ours_slots": cs[best_slots]["efficiency"] if best_slots else None,
        "ours_one_per_task": cs[best_one]["efficiency"] if best_one else None,
    }
    for name in ("optuna", "ray", "spark"):
        efficiency[name] = cs[name]["efficiency"] if _ok(cs.get(name)) else None
    ex = results.get("example") or {}
    refs = [r["wall_s"] for r in (ex.get("optuna_before"), ex.get("optuna_after")) if _ok(r)]
    pipeline = ex.get("pipeline")
    example_ratio = pipeline["wall_s"] / statistics.fmean(refs) if _ok(pipeline) and refs else None
    slot_runs = [
        v for k, v in cs.items() if k.startswith("ours") and _ok(v) and v.get("trials_per_task", 1) > 1
    ]
    in_worker = sum(v["in_worker_overhead_total_s"] or 0 for v in slot_runs)
    in_worker_trials = sum(v["in_worker_trials"] for v in slot_runs)
    rounds = [r for v in slot_runs for r in v["rounds"] if not r["skipped"]]
    overhead = {
        "per_trial": in_worker / in_worker_trials if in_worker_trials else None,
        "per_round": _mean([r["control_s"] for r in rounds]),
        "per_run": _mean([v["per_run"]["total_s"] for v in slot_runs]),
    }
    values = {
        "efficiency_ours_slots": efficiency["ours_slots"],
        "example_ratio": example_ratio,
        "overhead_per_trial_s": overhead["per_trial"],
        "overhead_per_round_s": overhead["per_round"],
        "overhead_per_run_s": overhead["per_run"],
    }
    targets = {
        key: {"value": values[key], "target": f"{op} {goal:g}", "met": _met(values[key], op, goal)}
        for key, (op, goal) in TARGETS.items()
    }
    shapes = {}
    for k, v in cs.items():
        if not k.startswith("ours"):
            continue
        if not _ok(v):
            shapes[k] = {"available": False, "reason": v.get("reason") or f"run {v.get('state')}"}
            continue
        shapes[k] = {
            "batch_size": v["batch_size"],
            "trials_per_task": v["trials_per_task"],
            "rounds": v["rounds_run"],
            "slot_tasks": v["slot_tasks"],
            "wall_s": v["wall_s"],
            "efficiency": v["efficiency"],
            "busy_fraction": v.get("busy_fraction"),
            "per_run_s": v["per_run"],
            "per_round_mean_s": v["per_round_mean"],
            "per_slot_task_mean_s": v["per_slot_task_mean"],
            "per_trial_mean_s": v["per_trial_mean"],
            "per_trial_in_worker_s": v["per_trial_in_worker_s"],
            "unaccounted_s": v["unaccounted_s"],
            "trial_states": v["trial_states"],
            "supervisor_linger_s": v.get("supervisor_linger"),
            "airflow_cpu_s": v.get("airflow_cpu_s"),
            "airflow_cpu_share": v.get("airflow_cpu_share"),
        }
    example_summary: dict[str, Any] = {}
    if ex:
        example_summary = {
            "study": ex.get("study"),
            "trials": ex.get("trials"),
            "conf": ex.get("conf"),
            "pipeline_wall_s": pipeline["wall_s"] if _ok(pipeline) else None,
            "pipeline_state": (pipeline or {}).get("state") or (pipeline or {}).get("reason"),
            "optuna_wall_s": statistics.fmean(refs) if refs else None,
            "optuna_wall_before_s": (ex.get("optuna_before") or {}).get("wall_s"),
            "optuna_wall_after_s": (ex.get("optuna_after") or {}).get("wall_s"),
            "optuna_trial_s_mean": _mean(
                [(r or {}).get("trial_s_mean") for r in (ex.get("optuna_before"), ex.get("optuna_after"))]
            ),
            "pipeline_best_value": (pipeline or {}).get("best_value"),
            "optuna_best_value": [
                (r or {}).get("best_value") for r in (ex.get("optuna_before"), ex.get("optuna_after"))
            ],
        }
        if _ok(pipeline):
            example_summary.update(
                pipeline_rounds=pipeline["rounds_run"],
                pipeline_slot_tasks=pipeline["slot_tasks"],
                pipeline_per_run_s=pipeline["per_run"],
                pipeline_per_round_mean_s=pipeline["per_round_mean"],
                pipeline_per_slot_task_mean_s=pipeline["per_slot_task_mean"],
                pipeline_trial_s_mean=pipeline["per_trial_mean"].get("trial_s"),
                pipeline_to_next_trial_s_mean=pipeline["per_trial_mean"].get("to_next_trial_s"),
                pipeline_trial_states=pipeline["trial_states"],
                pipeline_supervisor_linger_s=pipeline.get("supervisor_linger"),
                pipeline_airflow_cpu_s=pipeline.get("airflow_cpu_s"),
                pipeline_airflow_cpu_share=pipeline.get("airflow_cpu_share"),
                pipeline_evaluate_log_warnings=pipeline.get("evaluate_log_warnings"),
            )
    start, end = results["machine_start"], results["machine_end"]
    return {
        "efficiency": efficiency,
        "example_ratio": example_ratio,
        "overhead_s": overhead,
        "best_shapes": {"ours_slots": best_slots, "ours_one_per_task": best_one},
        "targets": targets,
        "shapes": shapes,
        "example": example_summary,
        "contenders": {
            name: (
                {
                    "wall_s": cs[name]["wall_s"],
                    "efficiency": cs[name]["efficiency"],
                    "startup_s": cs[name].get("startup_s"),
                    "busy_fraction": cs[name].get("busy_fraction"),
                }
                if _ok(cs.get(name))
                else {"available": False, "reason": (cs.get(name) or {}).get("reason", "not run")}
            )
            for name in ("optuna", "ray", "spark")
        },
        "load": {
            "nproc": start.get("nproc"),
            "loadavg_before": start.get("load_avg"),
            "loadavg_after": end.get("load_avg"),
            "samples": [
                {"at": s["at"], "load_avg": [round(x, 2) for x in s["load_avg"]]}
                for s in results["load_samples"]
            ],
        },
        "config": results["config"],
        "warmup": results.get("warmup"),
        "duration_s": results.get("duration_s"),
    }


# --- report --------------------------------------------------------------------------------------


def contender_row(name: str, res: dict[str, Any], ideal: float, reference_wall: float | None) -> list[Any]:
    """One line of the summary table."""
    if not res.get("available", True):
        return [name, f"unavailable: {res.get('reason')}", None, None, None, None]
    if res.get("state", "success") != "success":
        return [name, f"run {res.get('state')}", None, None, None, None]
    wall = res["wall_s"]
    return [
        name,
        wall,
        ideal / wall,
        (wall / reference_wall) if reference_wall else None,
        res.get("startup_s"),
        res.get("busy_fraction"),
    ]


def report(results: dict[str, Any], out: Path) -> str:
    """Print and write the tables, the JSON files and the plots."""
    cfg = results["config"]
    ideal = cfg["ideal_s"]
    cs = results["contenders"]
    s = results["summary"]
    ref = cs.get("optuna", {})
    ref_wall = ref.get("wall_s") if _ok(ref) else None
    rows = [contender_row(name, res, ideal, ref_wall) for name, res in cs.items()]
    load = s["load"]
    text = [
        f"Orchestration: {cfg['trials']} trials of {cfg['trial_seconds']:g} s at parallelism "
        f"{cfg['parallelism']}; ideal = ceil(N/P) x T = {ideal:g} s; Airflow executor "
        f"`{cfg.get('executor', '-')}`. Load average before {load['loadavg_before']}, after "
        f"{load['loadavg_after']} on {load['nproc']} cores; the run took "
        f"{(results.get('duration_s') or 0) / 60:.0f} min.",
        "",
        table(["contender", "wall s", "efficiency", "wall / optuna", "startup s", "slots busy"], rows),
        "",
        f"Best slot shape (`ours_slots`): {s['best_shapes']['ours_slots']}; best one-per-task shape "
        f"(`ours_one_per_task`): {s['best_shapes']['ours_one_per_task']}.",
        "",
        table(
            ["figure", "value", "target", "met"],
            [
                [key, v["value"], v["target"], {True: "yes", False: "**no**", None: "-"}[v["met"]]]
                for key, v in s["targets"].items()
            ],
        ),
    ]
    ex = s.get("example") or {}
    if ex:
        optuna_best = ", ".join(fmt(v) for v in ex["optuna_best_value"])
        text += [
            "",
            f"Example study (`{ex['study']}`, {ex['trials']} trials, trigger conf {ex['conf'] or '{}'}): "
            f"pipeline {fmt(ex['pipeline_wall_s'])} s (trigger to run end, "
            f"{ex.get('pipeline_rounds', '-')} rounds, {ex.get('pipeline_slot_tasks', '-')} slot tasks, "
            f"{ex.get('pipeline_state')}) against plain Optuna n_jobs={cfg['parallelism']} "
            f"{fmt(ex['optuna_wall_s'])} s (before Airflow {fmt(ex['optuna_wall_before_s'])} s, after "
            f"{fmt(ex['optuna_wall_after_s'])} s): ratio **{fmt(s['example_ratio'])}**. Mean trial: pipeline "
            f"{fmt(ex.get('pipeline_trial_s_mean'))} s (slot start of the trial to its tell), Optuna "
            f"{fmt(ex.get('optuna_trial_s_mean'))} s. Best value: pipeline "
            f"{fmt(ex.get('pipeline_best_value'))}, Optuna {optuna_best}.",
        ]
    ours = {k: v for k, v in cs.items() if k.startswith("ours") and _ok(v)}
    if ex.get("pipeline_per_run_s"):
        ours_and_example = {**ours, "example": results["example"]["pipeline"]}
    else:
        ours_and_example = dict(ours)
    if ours_and_example:
        text += [
            "",
            "Our overhead per round (mean seconds over the rounds that ran; "
            "control = scheduling + suggest + observe):",
            "",
        ]
        keys = ["scheduling_s", "suggest_s", "observe_s", "control_s", "evaluate_s", "evaluate_overhead_s"]
        text.append(
            table(
                [
                    "config",
                    "rounds",
                    "slot tasks",
                    "scheduling",
                    "suggest",
                    "observe",
                    "control",
                    "evaluate",
                    "evaluate - ideal",
                ],
                [
                    [k, v["rounds_run"], v["slot_tasks"], *(v["per_round_mean"][p] for p in keys)]
                    for k, v in ours_and_example.items()
                ],
            )
        )
        text += ["", "Our overhead per DAG run (seconds; finalize includes the scheduler's hop to it):", ""]
        keys = [
            "trigger_to_start_task_s",
            "start_task_s",
            "skipped_rounds_s",
            "finalize_s",
            "run_close_s",
            "total_s",
        ]
        text.append(
            table(
                [
                    "config",
                    "trigger→start task",
                    "start task",
                    "skipped rounds",
                    "finalize",
                    "run close",
                    "total",
                ],
                [[k, *(v["per_run"][p] for p in keys)] for k, v in ours_and_example.items()],
            )
        )
        text += ["", "Per slot task (mean seconds) and per trial inside the warm worker:", ""]
        text.append(
            table(
                [
                    "config",
                    "queued→start",
                    "task→1st trial",
                    "setup",
                    "of which →fork",
                    "objective",
                    "tell",
                    "→next trial",
                    "task exit",
                    "in-worker / trial",
                ],
                [
                    [
                        k,
                        v["per_slot_task_mean"]["queued_to_start_s"],
                        v["per_slot_task_mean"]["task_to_first_trial_s"],
                        v["per_trial_mean"]["setup_s"],
                        v["per_trial_mean"]["fork_s"],
                        v["per_trial_mean"]["objective_s"] or v["per_trial_mean"]["trial_s"],
                        v["per_trial_mean"]["tell_s"],
                        v["per_trial_mean"]["to_next_trial_s"],
                        v["per_slot_task_mean"]["task_exit_s"],
                        v["per_trial_in_worker_s"],
                    ]
                    for k, v in ours_and_example.items()
                ],
            )
        )
        text += [
            "",
            "setup: the slot's start of a trial (after its claim) to the objective's first line "
            "(MLflow child run, attributes, fork); tell: objective end to the Optuna tell (child exit, "
            "MLflow close); →next trial: tell to the slot starting the next trial (resolve and claim); "
            "in-worker / trial: a slot's first trial start to its last tell, less the objectives, per "
            "trial. The example's objective column is the whole trial (slot start of the trial to its tell).",
        ]
    if ours_and_example:
        text += [
            "",
            "Airflow itself: the task supervisor still running after its task ended (scheduler log "
            "`Workload finished` minus the task's end; the executor slot stays taken meanwhile), and the "
            "CPU seconds Airflow's own processes used during the run (api-server, scheduler, executor "
            "workers = supervisors, dag-processor) with their share of all cores over the run:",
            "",
            table(
                [
                    "config",
                    "tasks",
                    "linger mean s",
                    "linger max s",
                    "tasks over 1 s",
                    "api-server",
                    "scheduler",
                    "supervisors",
                    "dag-processor",
                    "CPU share",
                ],
                [
                    [
                        k,
                        (v.get("supervisor_linger") or {}).get("tasks"),
                        (v.get("supervisor_linger") or {}).get("mean_s"),
                        (v.get("supervisor_linger") or {}).get("max_s"),
                        (v.get("supervisor_linger") or {}).get("over_1s"),
                        *(
                            (v.get("airflow_cpu_s") or {}).get(c)
                            for c in ("api-server", "scheduler", "executor workers", "dag-processor")
                        ),
                        v.get("airflow_cpu_share"),
                    ]
                    for k, v in ours_and_example.items()
                ],
            ),
        ]
    warned = (ex.get("pipeline_evaluate_log_warnings") or {}) if ex else {}
    if warned.get("deprecation_warnings"):
        text += [
            "",
            f"The example's evaluate task logs carry {warned['deprecation_warnings']} "
            f"`DeprecatedImportWarning` lines in {warned['bursts']} bursts of "
            f"{fmt(warned['burst_s_mean'])} s on average ({fmt(warned['burst_s_total'])} s in all), "
            f"from {', '.join(warned['sources'])}.",
        ]
    body = "\n".join(text)
    print(body)
    (out / "orchestration.md").write_text(body + "\n")
    headline = {"machine_start": results["machine_start"], "machine_end": results["machine_end"], **s}
    write_json(out / "orchestration.json", headline)
    write_json(out / "orchestration_raw.json", results)
    plot(results, out)
    return body


def plot(results: dict[str, Any], out: Path) -> None:
    """Efficiency per contender, and the per-round overhead split of our configurations."""
    plt = pyplot()
    cs = {k: v for k, v in results["contenders"].items() if _ok(v) and v.get("efficiency")}
    if not cs:
        return
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    names = list(cs)
    colors = ["C0" if k.startswith("ours") else "C7" for k in names]
    ax.bar(names, [cs[k]["efficiency"] for k in names], color=colors)
    ax.axhline(TARGET_EFFICIENCY, color="C3", ls="--", label=f"target {TARGET_EFFICIENCY:.0%}")
    ax.set_ylabel("efficiency = ideal / wall")
    ax.set_ylim(0, 1.05)
    ax.set_title(
        f"{results['config']['trials']} trials x {results['config']['trial_seconds']:g} s, "
        f"parallelism {results['config']['parallelism']}"
    )
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=20)
    savefig(fig, out / "orchestration_efficiency.png")
    ours = {k: v for k, v in cs.items() if k.startswith("ours")}
    if not ours:
        return
    parts = [
        ("scheduling_s", "scheduling"),
        ("suggest_s", "suggest"),
        ("observe_s", "observe"),
    ]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    bottom = [0.0] * len(ours)
    for key, label in parts:
        vals = [max(0.0, v["per_round_mean"][key] or 0.0) for v in ours.values()]
        ax.bar(list(ours), vals, bottom=bottom, label=label)
        bottom = [b + x for b, x in zip(bottom, vals, strict=True)]
    ax.axhline(TARGETS["overhead_per_round_s"][1], color="C3", ls="--", label="target per round")
    ax.set_ylabel("seconds per round")
    ax.set_title("our control overhead per round, by part")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=15)
    savefig(fig, out / "orchestration_round_overhead.png")
    best = results["summary"]["best_shapes"]["ours_slots"] or next(iter(ours))
    timeline(best, ours[best], results, out)


def timeline(name: str, res: dict[str, Any], results: dict[str, Any], out: Path) -> None:
    """Gantt chart of one configuration's task instances, with its trials' objectives inside."""
    plt = pyplot()
    tis = [ti for ti in res["task_instances"] if ti.get("start_date") and ti.get("end_date")]
    if not tis:
        return
    p = results["config"]["parallelism"]
    t0 = min(_epoch(ti["start_date"]) for ti in tis)
    fig, ax = plt.subplots(figsize=(9, 3.2))
    colors = {"suggest": "C1", "evaluate": "C0", "observe": "C2", "start": "C7", "finalize": "C7"}
    for ti in sorted(tis, key=lambda x: _epoch(x["start_date"])):
        kind = ti["task_id"].split(".")[-1]
        lane = 0 if kind != "evaluate" else 1 + (ti["map_index"] % p)
        s, e = _epoch(ti["start_date"]) - t0, _epoch(ti["end_date"]) - t0
        ax.barh(lane, e - s, left=s, color=colors.get(kind, "C5"), edgecolor="white", alpha=0.6)
    for slot in res["slots"]:
        lane = 1 + (slot["map_index"] % p)
        for row in slot["trial_rows"]:
            if row.get("objective_start"):
                ax.barh(
                    lane,
                    row["objective_end"] - row["objective_start"],
                    left=row["objective_start"] - t0,
                    height=0.4,
                    color="C9",
                )
    ax.set_yticks(range(p + 1), ["control", *(f"slot {i + 1}" for i in range(p))])
    ax.set_xlabel("seconds since the start task began")
    ax.set_title(f"{name}: tasks (orange suggest, blue evaluate, green observe), objectives (cyan)")
    savefig(fig, out / "orchestration_timeline.png")


if __name__ == "__main__":
    sys.exit(main())
