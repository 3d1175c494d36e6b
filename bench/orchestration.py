"""Orchestration efficiency: N fixed-time trials at parallelism P through each system.

Contenders, run one after the other in the same invocation so that their ratios are comparable:

* ``ours B=b``: the pipeline on a real Airflow (api-server, scheduler, dag-processor, LocalExecutor,
  PostgreSQL metadata and Optuna storage, MLflow on SQLite), one DAG run per batch size, at most P
  trials running at once.
* ``optuna``: plain ``study.optimize(n_jobs=P)`` on the same Optuna storage (the reference).
* ``ray``: Ray Tune with its Optuna searcher on a local Ray with P CPUs.
* ``spark``: Hyperopt TPE with ``SparkTrials(parallelism=P)`` on a local Spark.

Efficiency = ideal / actual with ideal = ceil(N / P) x trial time. For our pipeline the overhead is
split per round and per trial from the task instances (REST API), the Optuna trial timestamps, the
worker's own attributes and the objective's timing records.

Run with ``bench/run.sh orchestration [--quick]`` (needs ``.venv`` and ``.venv-bench``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

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

TARGET_EFFICIENCY = 0.85
TARGET_ROUND_OVERHEAD_S = 3.0

STUDY_TEMPLATE = """\
# Orchestration benchmark study: {n} trials of {t:g}s, batches of {b}, at most {p} at a time.
name: {name}
description: Orchestration benchmark, {n} sleeping trials in batches of {b}
objective: bench.objectives:sleep_objective
direction: minimize
search_space:
  x: {{type: float, low: 0.0, high: 1.0}}
  y: {{type: float, low: 0.0, high: 1.0}}
sampler: {{type: tpe, seed: 1}}
budget: {{n_trials: {n}, batch_size: {b}, max_rounds: {rounds}}}
trial: {{retries: 0, execution_timeout: 300}}
mlflow: {{experiment: bench_orchestration}}
worker: {{backend: local{max_active}}}
"""

DAG_FILE = '''"""Thin copy of dags/hpo_studies.py pointing at the benchmark's study folder."""

from hpo_airflow import load_study_dags

load_study_dags(globals())
'''


def write_study(folder: Path, *, n: int, t: float, b: int, p: int) -> Path:
    """Write the study YAML of batch size ``b`` and return its path."""
    name = f"bench_b{b}"
    max_active = f", max_active_trials: {p}" if b > p else ""
    path = folder / f"{name}.yaml"
    path.write_text(
        STUDY_TEMPLATE.format(name=name, n=n, t=t, b=b, p=p, rounds=math.ceil(n / b), max_active=max_active)
    )
    return path


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()  # naive Optuna datetimes are local time
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


# --- our pipeline on Airflow ---------------------------------------------------------------------


def analyse_run(
    tis: list[dict[str, Any]],
    trials: list[Any],
    timings: list[dict[str, Any]],
    *,
    trigger_time: float,
    run_end: float,
    trial_seconds: float,
    parallelism: int,
    n_trials: int,
) -> dict[str, Any]:
    """Split one DAG run's wall time into its parts (see the module docstring)."""
    by_key = {(ti["task_id"], ti.get("map_index", -1)): ti for ti in tis}
    start_ti = by_key[("start", -1)]
    final_ti = by_key.get(("finalize", -1))
    timing_by_trial = {rec["trial"]: rec for rec in timings}
    trial_by_key = {
        (t.user_attrs.get("hpo.round"), t.user_attrs.get("hpo.map_index")): t
        for t in trials
        if "hpo.round" in t.user_attrs and not t.user_attrs.get("hpo.discarded")
    }
    rounds: list[dict[str, Any]] = []
    per_trial: list[dict[str, Any]] = []
    prev_end = _epoch(start_ti["end_date"])
    first_start = _epoch(start_ti["start_date"])
    k = 1
    while (f"round_{k}.suggest", -1) in by_key:
        sug = by_key[(f"round_{k}.suggest", -1)]
        obs = by_key[(f"round_{k}.observe", -1)]
        evs = [ti for (tid, mi), ti in by_key.items() if tid == f"round_{k}.evaluate" and mi >= 0]
        obs_end = _epoch(obs["end_date"]) or _epoch(sug["end_date"])
        if sug["state"] != "success" or not evs:
            rounds.append({"round": k, "skipped": True, "span_s": (obs_end or prev_end) - prev_end})
            prev_end = obs_end or prev_end
            k += 1
            continue
        ev_start = min(_epoch(ti["start_date"]) for ti in evs)
        ev_end = max(_epoch(ti["end_date"]) for ti in evs)
        ideal = math.ceil(len(evs) / parallelism) * trial_seconds
        row = {
            "round": k,
            "skipped": False,
            "trials": len(evs),
            "ideal_s": ideal,
            "span_s": obs_end - prev_end,
            "scheduling_s": (_epoch(sug["start_date"]) - prev_end)
            + (ev_start - _epoch(sug["end_date"]))
            + (_epoch(obs["start_date"]) - ev_end),
            "suggest_s": _epoch(sug["end_date"]) - _epoch(sug["start_date"]),
            "evaluate_overhead_s": (ev_end - ev_start) - ideal,
            "observe_s": obs_end - _epoch(obs["start_date"]),
        }
        row["overhead_s"] = row["span_s"] - ideal
        rounds.append(row)
        for ti in evs:
            t = trial_by_key.get((k, ti["map_index"]))
            rec = timing_by_trial.get(t.number) if t is not None else None
            if t is None or rec is None:
                continue
            worker = t.user_attrs.get("hpo.worker") or {}
            ti_start, ti_end = _epoch(ti["start_date"]), _epoch(ti["end_date"])
            proc = rec.get("process_start") or ti_start
            loaded = float(worker.get("started_at") or proc)
            complete = _epoch(t.datetime_complete) or rec["end"]
            per_trial.append(
                {
                    "trial": t.number,
                    "round": k,
                    "queued_to_start_s": ti_start - _epoch(ti.get("queued_when") or ti["start_date"]),
                    "task_to_worker_process_s": proc - ti_start,
                    "worker_import_load_s": loaded - proc,
                    "worker_mlflow_setup_s": rec["start"] - loaded,
                    "objective_s": rec["end"] - rec["start"],
                    "tell_s": complete - rec["end"],
                    "task_exit_s": ti_end - complete,
                    "task_total_s": ti_end - ti_start,
                }
            )
        prev_end = obs_end
        k += 1
    run_rounds = [r for r in rounds if not r["skipped"]]
    wall = run_end - trigger_time
    ideal_total = math.ceil(n_trials / parallelism) * trial_seconds
    parts_round = ["scheduling_s", "suggest_s", "evaluate_overhead_s", "observe_s", "overhead_s"]
    parts_trial = [
        "queued_to_start_s",
        "task_to_worker_process_s",
        "worker_import_load_s",
        "worker_mlflow_setup_s",
        "objective_s",
        "tell_s",
        "task_exit_s",
        "task_total_s",
    ]
    final_end = _epoch(final_ti["end_date"]) if final_ti else run_end
    return {
        "wall_s": wall,
        "ideal_s": ideal_total,
        "efficiency": ideal_total / wall,
        "rounds_run": len(run_rounds),
        "rounds_skipped": len(rounds) - len(run_rounds),
        "trigger_to_start_task_s": first_start - trigger_time,
        "start_task_s": _epoch(start_ti["end_date"]) - first_start,
        "skipped_rounds_s": sum(r["span_s"] for r in rounds if r["skipped"]),
        "finalize_s": (final_end - prev_end) if final_ti else None,
        "run_close_s": run_end - final_end,
        "per_round_mean": {p: _mean([r[p] for r in run_rounds]) for p in parts_round},
        "per_trial_mean": {p: _mean([x[p] for x in per_trial]) for p in parts_trial},
        "rounds": rounds,
        "trials": per_trial,
    }


def run_ours(
    airflow: Any, storage_url: str, dag_id: str, *, n: int, t: float, p: int, timing_dir: Path
) -> dict[str, Any]:
    """Trigger one DAG run, wait for it, and analyse it."""
    import optuna

    from hpo_core.storage import open_storage

    client = airflow.client
    client.wait_for_dag(dag_id, timeout=300)
    client.unpause(dag_id)
    trigger_time = time.time()
    run_id = client.trigger(dag_id)
    state = client.wait_for_run(dag_id, run_id, timeout=max(900, 30 * n * t), poll=1.0)
    run = client.dag_run(dag_id, run_id)
    tis = client.task_instances(dag_id, run_id)
    study_name = f"{dag_id.removeprefix('hpo_')}.{run_id}"
    trials = optuna.load_study(study_name=study_name, storage=open_storage(storage_url)).get_trials()
    name = dag_id.removeprefix("hpo_")
    timings = [r for r in read_timings(timing_dir) if r["contender"] == f"ours:{name}"]
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
    result.update(state=state, run_id=run_id, dag_id=dag_id, task_instances=tis)
    result.update(slot_utilisation([(r["start"], r["end"]) for r in timings], p))
    return result


def start_airflow(work: Path, dags: Path, env: dict[str, str], pg: Any, p: int) -> Any:
    """Start api-server, scheduler and dag-processor with tests/services.py."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests.services import AirflowDeployment

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


# --- driver --------------------------------------------------------------------------------------


def contender_row(name: str, res: dict[str, Any], ideal: float, reference_wall: float | None) -> list[Any]:
    """One line of the summary table."""
    if not res.get("available", True):
        return [name, f"unavailable: {res.get('reason')}", None, None, None, None]
    wall = res["wall_s"]
    return [
        name,
        wall,
        ideal / wall,
        (wall / reference_wall) if reference_wall else None,
        res.get("startup_s"),
        res.get("busy_fraction"),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the orchestration benchmark and write ``orchestration.json``, tables and plots."""
    parser = argparse.ArgumentParser(description="Orchestration efficiency benchmark")
    parser.add_argument("--quick", action="store_true", help="8 trials of 2 s, batch sizes 2 and 8")
    parser.add_argument("--out", help="output root (default bench/out/<timestamp>)")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--batch-sizes", default=None, help="comma-separated, default 2,8,32 (quick 2,8)")
    parser.add_argument("--contenders", default="ours,optuna,ray,spark")
    args = parser.parse_args(argv)
    n = args.trials or (8 if args.quick else 32)
    t = args.seconds or (2.0 if args.quick else 5.0)
    p = args.parallelism
    batches = [int(b) for b in (args.batch_sizes or ("2,8" if args.quick else "2,8,32")).split(",")]
    batches = [b for b in batches if b <= n]
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
            "batch_sizes": batches,
            "ideal_s": ideal,
        },
        "contenders": {},
    }
    env_common = {ENV_SECONDS: str(t), ENV_TIMING_DIR: str(timing_dir)}
    os.environ.update(env_common)

    sys.path.insert(0, str(REPO_ROOT))
    from tests.services import PostgresServer

    with PostgresServer() as pg:
        storage_url = pg.create_database("bench_optuna")
        if "ours" in contenders:
            dags = work / "dags"
            (dags / "studies").mkdir(parents=True)
            (dags / "hpo_bench.py").write_text(DAG_FILE)
            for b in batches:
                write_study(dags / "studies", n=n, t=t, b=b, p=p)
            tracking = f"sqlite:///{work / 'mlflow.db'}"
            prepare_mlflow(tracking)
            env = {
                **env_common,
                "HPO_STORAGE_URL": storage_url,
                "MLFLOW_TRACKING_URI": tracking,
                "HPO_ARTIFACT_ROOT": (work / "mlartifacts").as_uri(),
                "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "plugins")]),
            }
            log("starting Airflow (api-server, scheduler, dag-processor; LocalExecutor)")
            airflow = start_airflow(work, dags, env, pg, p)
            results["airflow_startup_s"] = airflow.startup_seconds
            try:
                for b in batches:
                    log(f"ours: batch {b}, {n} trials of {t:g}s")
                    try:
                        res = run_ours(
                            airflow, storage_url, f"hpo_bench_b{b}", n=n, t=t, p=p, timing_dir=timing_dir
                        )
                    except Exception as e:
                        log(airflow.logs_tail(["scheduler"]))
                        res = {"available": False, "reason": f"{type(e).__name__}: {e}"}
                    results["contenders"][f"ours B={b}"] = res
                    log(f"ours B={b}: {fmt(res.get('wall_s'))} s, efficiency {fmt(res.get('efficiency'))}")
            finally:
                airflow.stop()
        spec_path = write_study(work, n=n, t=t, b=p, p=p)
        for name, python in (("optuna", MAIN_PYTHON), ("ray", BENCH_PYTHON), ("spark", BENCH_PYTHON)):
            if name not in contenders:
                continue
            log(f"{name}: {n} trials of {t:g}s at parallelism {p}")
            res_path = work / f"{name}.json"
            argv_c = [
                name,
                "--out",
                str(res_path),
                "--workdir",
                str(work / name),
                "--trials",
                str(n),
                "--parallelism",
                str(p),
                "--spec",
                str(spec_path),
                "--storage",
                storage_url,
            ]
            if not python.exists():
                res = {"available": False, "reason": f"{python} missing (run bench/run.sh to create it)"}
            else:
                proc = run_python(
                    python, "bench.contenders", argv_c, env=env_common, timeout=1800, log=work / f"{name}.log"
                )
                res = (
                    json.loads(res_path.read_text())
                    if res_path.exists()
                    else {"available": False, "reason": f"exit code {proc.returncode}: {proc.stderr[-300:]}"}
                )
            if res.get("available"):
                recs = [r for r in read_timings(timing_dir) if r["contender"] == name]
                res.update(slot_utilisation([(r["start"], r["end"]) for r in recs], p))
                res["objective_runs"] = len(recs)
                res["efficiency"] = ideal / res["wall_s"]
            results["contenders"][name] = res
            log(f"{name}: {fmt(res.get('wall_s'))} s ({res.get('reason') or 'ok'})")
    results["machine_end"] = machine_info()
    report(results, out)
    return 0


def report(results: dict[str, Any], out: Path) -> str:
    """Print and write the tables, the JSON and the plots."""
    cfg = results["config"]
    ideal = cfg["ideal_s"]
    cs = results["contenders"]
    ref = cs.get("optuna", {})
    ref_wall = ref.get("wall_s") if ref.get("available", True) else None
    rows = [contender_row(name, res, ideal, ref_wall) for name, res in cs.items()]
    text = [
        f"Orchestration: {cfg['trials']} trials of {cfg['trial_seconds']:g} s at parallelism "
        f"{cfg['parallelism']}; ideal = ceil(N/P) x T = {ideal:g} s "
        f"(targets: efficiency >= {TARGET_EFFICIENCY:.0%}, "
        f"per-round overhead < {TARGET_ROUND_OVERHEAD_S:g} s)",
        "",
        table(["contender", "wall s", "efficiency", "wall / optuna", "startup s", "slots busy"], rows),
    ]
    ours = {k: v for k, v in cs.items() if k.startswith("ours") and v.get("available", True)}
    if ours:
        text += ["", "Our overhead per round (mean seconds over the rounds that ran):", ""]
        text.append(
            table(
                [
                    "config",
                    "rounds",
                    "scheduling",
                    "suggest",
                    "evaluate ovh",
                    "observe",
                    "round overhead",
                    "skipped rounds",
                ],
                [
                    [
                        k,
                        v["rounds_run"],
                        *(
                            v["per_round_mean"][p]
                            for p in (
                                "scheduling_s",
                                "suggest_s",
                                "evaluate_overhead_s",
                                "observe_s",
                                "overhead_s",
                            )
                        ),
                        v["skipped_rounds_s"],
                    ]
                    for k, v in ours.items()
                ],
            )
        )
        text += ["", "Our fixed overhead per DAG run (seconds):", ""]
        text.append(
            table(
                [
                    "config",
                    "trigger→start task",
                    "start task",
                    "finalize (incl. scheduling)",
                    "run close",
                    "total",
                ],
                [
                    [
                        k,
                        v["trigger_to_start_task_s"],
                        v["start_task_s"],
                        v["finalize_s"],
                        v["run_close_s"],
                        v["trigger_to_start_task_s"]
                        + v["start_task_s"]
                        + (v["finalize_s"] or 0)
                        + v["run_close_s"],
                    ]
                    for k, v in ours.items()
                ],
            )
        )
        text += ["", "Our overhead per trial (mean seconds; the objective sleeps the trial time):", ""]
        keys = [
            "queued_to_start_s",
            "task_to_worker_process_s",
            "worker_import_load_s",
            "worker_mlflow_setup_s",
            "objective_s",
            "tell_s",
            "task_exit_s",
            "task_total_s",
        ]
        text.append(
            table(
                [
                    "config",
                    "queued→start",
                    "task→worker",
                    "worker: optuna import+load",
                    "worker: mlflow import+run",
                    "objective",
                    "tell",
                    "task exit",
                    "task total",
                ],
                [[k, *(v["per_trial_mean"][p] for p in keys)] for k, v in ours.items()],
            )
        )
    body = "\n".join(text)
    print(body)
    (out / "orchestration.md").write_text(body + "\n")
    write_json(out / "orchestration.json", results)
    plot(results, out)
    return body


def plot(results: dict[str, Any], out: Path) -> None:
    """Efficiency per contender, and the per-round overhead split of our configurations."""
    plt = pyplot()
    cs = {k: v for k, v in results["contenders"].items() if v.get("available", True) and "wall_s" in v}
    fig, ax = plt.subplots(figsize=(7, 3.6))
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
        ("evaluate_overhead_s", "evaluate (worker start, tell, exit)"),
        ("observe_s", "observe"),
    ]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bottom = [0.0] * len(ours)
    for key, label in parts:
        vals = [max(0.0, v["per_round_mean"][key] or 0.0) for v in ours.values()]
        ax.bar(list(ours), vals, bottom=bottom, label=label)
        bottom = [b + x for b, x in zip(bottom, vals, strict=True)]
    ax.axhline(TARGET_ROUND_OVERHEAD_S, color="C3", ls="--", label="target per round")
    ax.set_ylabel("seconds per round")
    ax.set_title("our overhead per round, by part")
    ax.legend(fontsize=8)
    savefig(fig, out / "orchestration_round_overhead.png")
    timeline(ours, results, out)


def timeline(ours: dict[str, Any], results: dict[str, Any], out: Path) -> None:
    """Gantt chart of the first configuration's task instances."""
    plt = pyplot()
    name, res = next(iter(ours.items()))
    tis = [ti for ti in res["task_instances"] if ti.get("start_date") and ti.get("end_date")]
    if not tis:
        return
    t0 = min(_epoch(ti["start_date"]) for ti in tis)
    lanes: dict[str, int] = defaultdict(int)
    fig, ax = plt.subplots(figsize=(9, 3.2))
    colors = {"suggest": "C1", "evaluate": "C0", "observe": "C2", "start": "C7", "finalize": "C7"}
    for ti in sorted(tis, key=lambda x: _epoch(x["start_date"])):
        kind = ti["task_id"].split(".")[-1]
        lane = 0 if kind != "evaluate" else 1 + (ti["map_index"] % results["config"]["parallelism"])
        s, e = _epoch(ti["start_date"]) - t0, _epoch(ti["end_date"]) - t0
        ax.barh(lane, e - s, left=s, color=colors.get(kind, "C5"), edgecolor="white")
        lanes[kind] += 1
    ax.set_yticks(
        range(results["config"]["parallelism"] + 1),
        ["control", *(f"slot {i + 1}" for i in range(results["config"]["parallelism"]))],
    )
    ax.set_xlabel("seconds since the start task began")
    ax.set_title(f"{name}: task instances (orange suggest, blue evaluate, green observe)")
    savefig(fig, out / "orchestration_timeline.png")


if __name__ == "__main__":
    sys.exit(main())
