"""Scale: suggest latency as a study grows, DAG parse time with 100 study files, a 1,000-wide round.

1. ``suggest`` of a batch of 32 on PostgreSQL in a cold process (as an Airflow task pays it) at
   growing numbers of finished trials, up to 10,000, on the example study's search space (seven
   parameters, one conditional, multivariate TPE with constant liar). Finished trials are bulk
   inserted with the attributes real trials carry; one cProfile run per size splits the time.
2. Parse + serialize the DAG folder with 0, 1 and 100 study files (cold process, DagBag).
3. One round mapped W wide (W = 100 and 1,000) through ``dag.test()`` on a PostgreSQL metadata
   database, each mapped task a warm slot worker in its task's process (as in production).

Run with ``bench/run.sh scale [--quick]`` (project ``.venv``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    MAIN_PYTHON,
    REPO_ROOT,
    fmt,
    log,
    machine_info,
    output_dir,
    pyplot,
    savefig,
    table,
    write_json,
)
from hpo_core.deployment import Deployment
from hpo_core.keys import StudyAttr
from hpo_core.space import sample_params
from hpo_core.spec import validate_mapping
from tests.services import PostgresServer

TARGET_SUGGEST_S = 1.0
EXAMPLE_STUDY = REPO_ROOT / "dags" / "studies" / "breast_cancer_gbm.yaml"
RESULT_PREFIX = "BENCH_RESULT "

WIDE_DAG_FILE = '''"""Thin copy of dags/hpo_studies.py for the scale benchmark."""

from hpo_airflow import load_study_dags

load_study_dags(globals())
'''

WIDE_STUDY = """\
name: bench_wide{w}
description: Scale benchmark, one round mapped {w} wide
objective: bench.objectives:instant_objective
direction: minimize
search_space:
  x: {{type: float, low: 0.0, high: 1.0}}
  y: {{type: float, low: 0.0, high: 1.0}}
sampler: {{type: tpe, seed: 1}}
budget: {{n_trials: {w}, batch_size: {w}, max_rounds: 1, max_batch_size: {w}}}
trial: {{retries: 0, execution_timeout: 600}}
mlflow: {{experiment: bench_scale}}
"""


def probe(args: list[str], env: dict[str, str], log_path: Path, timeout: float = 3600) -> dict[str, Any]:
    """Run ``bench.scale_probe`` in a fresh interpreter and return its result (or the error)."""
    full_env = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "plugins")]),
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(MAIN_PYTHON), "-m", "bench.scale_probe", *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    total = time.perf_counter() - t0
    with log_path.open("a") as f:
        f.write(f"$ {' '.join(args)}\n{proc.stdout[-20000:]}\n--- stderr ---\n{proc.stderr[-20000:]}\n")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = dict(json.loads(line.removeprefix(RESULT_PREFIX)))
            result["process_s"] = total
            return result
    return {
        "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}",
        "process_s": total,
    }


# --- 1. suggest latency --------------------------------------------------------------------------


def _scale_spec() -> Any:
    """The example study with a budget that lets rounds of 32 go on past 10,000 trials."""
    example = yaml.safe_load(EXAMPLE_STUDY.read_text())
    # Only the search problem comes from the example; budget, stopping and MLflow are the benchmark's.
    raw = {
        k: example[k] for k in ("objective", "direction", "metric", "search_space", "sampler") if k in example
    }
    raw["name"] = "bench_scale"
    raw["budget"] = {"n_trials": 6400, "batch_size": 32, "max_rounds": 200, "max_batch_size": 32}
    raw["mlflow"] = {"experiment": "bench_scale"}
    return validate_mapping(raw, source="bench.scale")


def _synthetic_value(params: dict[str, Any]) -> float:
    """A smooth stand-in for ROC AUC so that TPE sees structure."""
    lr = math.log10(params["learning_rate"])
    return (
        0.99
        - 0.01 * (lr + 1.2) ** 2
        - 0.001 * abs(params["max_depth"] - 5)
        - 0.0005 * (params["max_iter"] == 50)
    )


def bulk_insert(
    storage: Any, study_id: int, spec: Any, *, start_number: int, count: int, rng: random.Random
) -> None:
    """Insert ``count`` COMPLETE trials with realistic params and user attributes in one transaction."""
    import optuna
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    sampler_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=rng.randrange(1 << 30)))
    now = dt.datetime.now()
    objs = []
    for i in range(count):
        trial = sampler_study.ask()
        params = sample_params(spec, trial)
        dists = trial.distributions
        number = start_number + i
        value = _synthetic_value(params) + rng.gauss(0, 0.002)
        round_number = number // 32 + 1
        attrs = {
            "hpo.round": round_number,
            "hpo.batch_index": number % 32,
            "hpo.map_index": number % 32,
            "hpo.dag_id": "hpo_bench_scale",
            "hpo.run_id": "bench",
            "hpo.worker": {"host": "bench", "pid": 1, "attempt": 1, "started_at": time.time()},
            "hpo.heartbeat": time.time(),
            "hpo.mlflow_run_id": f"{number:032x}",
            "hpo.metrics": {"roc_auc": value},
        }
        objs.append(
            models.TrialModel(
                number=number,
                study_id=study_id,
                state=TrialState.COMPLETE,
                datetime_start=now,
                datetime_complete=now,
                params=[
                    models.TrialParamModel(
                        param_name=k,
                        param_value=dists[k].to_internal_repr(v),
                        distribution_json=distribution_to_json(dists[k]),
                    )
                    for k, v in params.items()
                ],
                values=[
                    models.TrialValueModel(
                        objective=0, value=value, value_type=models.TrialValueModel.TrialValueType.FINITE
                    )
                ],
                user_attributes=[
                    models.TrialUserAttributeModel(key=k, value_json=json.dumps(v)) for k, v in attrs.items()
                ],
            )
        )
    session = storage.scoped_session()
    try:
        session.add_all(objs)
        session.commit()
    finally:
        storage.scoped_session.remove()


def suggest_latency(pg: Any, work: Path, sizes: list[int], logp: Path) -> dict[str, Any]:
    """Grow a study to each size and time one cold-process suggest of 32 there."""
    import optuna

    from hpo_core.storage import open_storage
    from hpo_core.study.start import start_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = pg.create_database("bench_scale_optuna")
    deployment = Deployment(
        storage_url=url, tracking_uri=f"sqlite:///{work / 'mlflow.db'}", artifact_root=(work / "art").as_uri()
    )
    spec = _scale_spec()
    started = start_study(spec, deployment=deployment, dag_id="hpo_bench_scale", run_id="bench")
    name = started["study_name"]
    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    # The stored run config is the budget check's only input: a long-lived study past 6,400 trials.
    study.set_user_attr(StudyAttr.RUN_CONFIG, {**started["run_config"], "n_trials": 10**7})
    study_id = storage.get_study_id_from_name(name)
    rng = random.Random(1)
    env = {"HPO_STORAGE_URL": url}
    rows = []
    have = 0
    round_number = 10**6  # rounds of the probes, clear of the inserted trials' round numbers
    for size in sizes:
        t0 = time.perf_counter()
        have = _grow(storage, study_id, spec, have=have, size=size, rng=rng)
        log(f"suggest: {size} finished trials (insert {time.perf_counter() - t0:.1f}s)")
        results = {}
        modes = ("plain", "snapshot", "profiled") if size == sizes[-1] else ("plain", "snapshot")
        for mode in modes:
            round_number += 1
            args = [
                "suggest-snapshot" if mode == "snapshot" else "suggest",
                "--study",
                name,
                "--round",
                str(round_number),
            ]
            if mode == "profiled":
                args += ["--profile", str(work / f"suggest_{size}.prof")]
            res = probe(args, env, logp)
            results[mode] = res
            # Close the probe's trials as finished so that the next size has only finished trials.
            for number in res.get("trial_numbers", []):
                frozen = study._storage.get_trial(
                    study._storage.get_trial_id_from_study_id_trial_number(study_id, number)
                )
                study.tell(number, _synthetic_value(frozen.params))
                have += 1
        rows.append(_suggest_row(size, results))
    pstats_top = _top_functions(work / f"suggest_{sizes[-1]}.prof")
    return {"rows": rows, "profile_top": pstats_top, "study": name}


def _grow(storage: Any, study_id: int, spec: Any, *, have: int, size: int, rng: random.Random) -> int:
    """Bulk insert finished trials, 1,000 at a time, until the study has ``size``; return the new count."""
    while have < size:
        chunk = min(1000, size - have)
        n_existing = len(storage.get_all_trials(study_id, deepcopy=False))
        bulk_insert(storage, study_id, spec, start_number=n_existing, count=chunk, rng=rng)
        have += chunk
        stored = len(storage.get_all_trials(study_id, deepcopy=False))
        if stored != n_existing + chunk:
            raise RuntimeError(f"bulk insert: expected {n_existing + chunk} trials, storage has {stored}")
    return have


def _suggest_row(size: int, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row of the suggest table from the probes (plain, snapshot, maybe profiled) at one size."""
    plain, prof = results["plain"], results.get("profiled", {})
    snap = results["snapshot"]
    row: dict[str, Any] = {
        "finished_trials": size,
        **{f"plain_{k}": v for k, v in plain.items() if k != "trial_numbers"},
    }
    row["split_s"] = plain.get("split_s")
    row["storage_calls"] = plain.get("calls")
    row["profiled_suggest_s"] = prof.get("suggest_s")
    row["snapshot_suggest_s"] = snap.get("suggest_s")
    row["snapshot_split_s"] = snap.get("split_s")
    if "error" in plain:
        row["error"] = plain["error"]
    return row


def _top_functions(path: Path, n: int = 25) -> str:
    """The top of a cProfile dump by cumulative time, as text."""
    if not path.exists():
        return ""
    buf = io.StringIO()
    pstats.Stats(str(path), stream=buf).sort_stats("cumulative").print_stats(n)
    return buf.getvalue()


# --- 2. DAG parse time ---------------------------------------------------------------------------


def parse_time(
    work: Path, counts: list[int], logp: Path, airflow_env: dict[str, str]
) -> list[dict[str, Any]]:
    """Parse + serialize a DAG folder holding 0, 1, ..., 100 copies of the example study."""
    rows = []
    text = EXAMPLE_STUDY.read_text()
    for count in counts:
        folder = work / f"parse_{count}"
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "studies").mkdir(parents=True)
        shutil.copy(REPO_ROOT / "dags" / "hpo_studies.py", folder / "hpo_studies.py")
        for i in range(count):
            (folder / "studies" / f"study_{i:03d}.yaml").write_text(
                text.replace("name: breast_cancer_gbm", f"name: study_{i:03d}", 1)
            )
        res = probe(["parse", "--dags", str(folder)], airflow_env, logp)
        res["study_files"] = count
        rows.append(res)
        log(
            f"parse: {count} study files -> {fmt(res.get('parse_s'))} s parse, "
            f"{fmt(res.get('serialize_s'))} s serialize"
        )
    return rows


# --- 3. wide round through dag.test() ------------------------------------------------------------


def wide_round(
    pg: Any, work: Path, widths: list[int], logp: Path, airflow_env: dict[str, str], *, mark_from: int
) -> list[dict[str, Any]]:
    """One round mapped W wide through ``dag.test()`` for each W."""
    dags = work / "wide_dags"
    shutil.rmtree(dags, ignore_errors=True)
    (dags / "studies").mkdir(parents=True)
    (dags / "hpo_bench_wide.py").write_text(WIDE_DAG_FILE)
    for w in widths:
        (dags / "studies" / f"bench_wide{w}.yaml").write_text(WIDE_STUDY.format(w=w))
    env = {
        **airflow_env,
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "HPO_STORAGE_URL": pg.create_database("bench_wide_optuna"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'wide_mlflow.db'}",
        "HPO_ARTIFACT_ROOT": (work / "wide_art").as_uri(),
    }
    import mlflow

    mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_experiments()
    rows = []
    for w in widths:
        log(f"dag.test(): one round {w} wide")
        marked = w >= mark_from
        res = probe(
            [
                "dagtest",
                "--dag-file",
                str(dags / "hpo_bench_wide.py"),
                "--dag-id",
                f"hpo_bench_wide{w}",
                "--mark-success",
                r"round_1\.evaluate" if marked else "",
            ],
            env,
            logp,
            timeout=5400,
        )
        if "error" in res:
            rows.append({"width": w, **res})
            continue
        tis = res.pop("task_instances")
        workers = [] if marked else _worker_times(env["HPO_STORAGE_URL"], f"bench_wide{w}.")

        def dur(task_id: str, tis: list[dict[str, Any]] = tis) -> float | None:
            found = [t for t in tis if t["task_id"] == task_id and t["start"] and t["end"]]
            return sum(t["end"] - t["start"] for t in found) if found else None

        evs = sorted(
            (t for t in tis if t["task_id"] == "round_1.evaluate" and t["start"]), key=lambda t: t["start"]
        )
        ev_durs = [t["end"] - t["start"] for t in evs]
        worker_durs = [r["worker_end"] - r["worker_start"] for r in workers]
        span = (evs[-1]["end"] - evs[0]["start"]) if evs else None
        rows.append(
            {
                "width": w,
                "workers": "marked success, not run" if marked else "slot worker in the task",
                "state": res["state"],
                "wall_s": res["wall_s"],
                "evaluated": len(evs),
                "succeeded": sum(t["state"].endswith("success") for t in evs),
                "suggest_s": dur("round_1.suggest"),
                "observe_s": dur("round_1.observe"),
                "start_s": dur("start"),
                "finalize_s": dur("finalize"),
                "evaluate_span_s": span,
                "per_task_s": span / len(evs) if evs and span else None,
                "per_task_ti_s": statistics.fmean(ev_durs) if ev_durs else None,
                "per_task_worker_s": statistics.fmean(worker_durs) if worker_durs else None,
                "worker_first_tenth_s": _tenth(workers, first=True),
                "worker_last_tenth_s": _tenth(workers, first=False),
            }
        )
        log(f"dag.test() {w} wide: {fmt(res['wall_s'])} s, state {res['state']}")
    return rows


def _worker_times(storage_url: str, study_prefix: str) -> list[dict[str, Any]]:
    """When each trial's worker took it (``hpo.worker.started_at``) and when it finished, per trial."""
    import optuna

    from hpo_core.worker import T_WORKER

    names = [n for n in optuna.get_all_study_names(storage=storage_url) if n.startswith(study_prefix)]
    records = []
    for name in names:
        for t in optuna.load_study(study_name=name, storage=storage_url).get_trials(deepcopy=False):
            started = (t.user_attrs.get(T_WORKER) or {}).get("started_at")
            if started and t.datetime_complete:
                records.append(
                    {
                        "trial": t.number,
                        "worker_start": started,
                        "worker_end": t.datetime_complete.timestamp(),
                    }
                )
    return records


def _tenth(workers: list[dict[str, Any]], *, first: bool) -> float | None:
    """Mean in-process worker time of the first or last tenth of the trials (growth with the study)."""
    if not workers:
        return None
    ordered = sorted(workers, key=lambda r: r["worker_start"])
    k = max(1, len(ordered) // 10)
    part = ordered[:k] if first else ordered[-k:]
    return statistics.fmean(r["worker_end"] - r["worker_start"] for r in part)


# --- driver and report ---------------------------------------------------------------------------


def airflow_metadata_env(pg: Any, work: Path) -> dict[str, str]:
    """A migrated PostgreSQL Airflow metadata database and the environment that points at it."""
    home = work / "airflow_home"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.create_database("bench_scale_airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": "",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(work),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    }
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_HOME"))}
    migrate = subprocess.run(
        [str(MAIN_PYTHON.parent / "airflow"), "db", "migrate"],
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if migrate.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed: {migrate.stderr[-2000:]}")
    return env


def main(argv: list[str] | None = None) -> int:
    """Run the scale benchmark and write ``scale.json``, tables and plots."""
    parser = argparse.ArgumentParser(description="Scale benchmark")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--parts", default="suggest,parse,wide")
    args = parser.parse_args(argv)
    sizes = [100, 1000] if args.quick else [100, 1000, 5000, 10000]
    counts = [0, 1, 10] if args.quick else [0, 1, 100]
    widths = [10, 50] if args.quick else [100, 1000]
    parts = args.parts.split(",")
    out = output_dir(args.out, "scale")
    work = out / "work"
    if len(parts) == 3:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    logp = work / "probes.log"
    previous = out / "scale_raw.json"
    # Running some parts again keeps the others' results of the same output folder.
    kept = json.loads(previous.read_text()) if previous.exists() and len(parts) < 3 else {}
    results: dict[str, Any] = {
        **{k: v for k, v in kept.items() if k in ("suggest", "parse", "wide", "parse_marginal_s_per_study")},
        "machine_start": machine_info(),
        "config": {"sizes": sizes, "counts": counts, "widths": widths},
    }
    with PostgresServer() as pg:
        if "suggest" in parts:
            results["suggest"] = suggest_latency(pg, work, sizes, logp)
        if "parse" in parts or "wide" in parts:
            airflow_env = airflow_metadata_env(pg, work)
            if "parse" in parts:
                results["parse"] = parse_time(work, counts, logp, airflow_env)
            if "wide" in parts:
                results["wide"] = wide_round(pg, work, widths, logp, airflow_env, mark_from=widths[-1])
    results["machine_end"] = machine_info()
    report(results, out)
    return 0


def report(results: dict[str, Any], out: Path) -> str:
    """Print and write the tables, the JSON and the plots."""
    lines: list[str] = []
    if "suggest" in results:
        rows = results["suggest"]["rows"]
        base = rows[0].get("plain_suggest_s") or math.nan
        lines += [
            f"suggest_batch of 32 on PostgreSQL, cold process "
            f"(target < {TARGET_SUGGEST_S:g} s at 10,000 trials); "
            "time split by timers on Optuna's storage and sampler methods (exclusive):",
            "",
            table(
                [
                    "finished trials",
                    "suggest s",
                    "vs smallest",
                    "import s",
                    "process s",
                    "storage reads",
                    "sampler (TPE)",
                    "storage writes",
                    "other",
                ],
                [
                    [
                        r["finished_trials"],
                        r.get("plain_suggest_s"),
                        (r.get("plain_suggest_s") or math.nan) / base,
                        r.get("plain_import_s"),
                        r.get("plain_process_s"),
                        *(
                            (r.get("split_s") or {}).get(k)
                            for k in ("storage reads", "sampler (TPE)", "storage writes", "other")
                        ),
                    ]
                    for r in rows
                ],
            ),
            "",
            "For comparison, a prototype of the fix (bench/scale_probe.py suggest-snapshot, not the "
            "pipeline's code): one read, TPE on an in-memory copy, the batch written back with one "
            "insert per trial:",
            "",
            table(
                [
                    "finished trials",
                    "snapshot s",
                    "vs suggest_batch",
                    "storage reads",
                    "copy to memory",
                    "sampler (TPE)",
                    "storage writes",
                ],
                [
                    [
                        r["finished_trials"],
                        r.get("snapshot_suggest_s"),
                        (r.get("snapshot_suggest_s") or math.nan) / (r.get("plain_suggest_s") or math.nan),
                        *(
                            (r.get("snapshot_split_s") or {}).get(k)
                            for k in ("storage reads", "copy to memory", "sampler (TPE)", "storage writes")
                        ),
                    ]
                    for r in rows
                ],
            ),
        ]
    if "parse" in results:
        rows = results["parse"]
        by = {r["study_files"]: r for r in rows}
        lines += [
            "",
            "DAG folder parse + serialize (cold process, DagBag; Airflow's dagbag_import_timeout is 30 s):",
            "",
        ]
        lines.append(
            table(
                ["study files", "DAGs", "tasks", "parse s", "serialize s", "import airflow s", "errors"],
                [
                    [
                        r["study_files"],
                        r.get("dags"),
                        r.get("tasks"),
                        r.get("parse_s"),
                        r.get("serialize_s"),
                        r.get("import_s"),
                        len(r.get("import_errors") or {}) if "error" not in r else r["error"],
                    ]
                    for r in rows
                ],
            )
        )
        counts = sorted(by)
        if len(counts) >= 2 and all("parse_s" in by[c] for c in counts):
            hi, lo = counts[-1], counts[-2]
            marginal = (
                by[hi]["parse_s"] + by[hi]["serialize_s"] - by[lo]["parse_s"] - by[lo]["serialize_s"]
            ) / (hi - lo)
            results["parse_marginal_s_per_study"] = marginal
            lines.append(
                f"\nMarginal cost per study file: {fmt(marginal)} s; "
                f"{hi} files use {fmt((by[hi]['parse_s'] + by[hi]['serialize_s']) / 30.0)} "
                "of the 30 s timeout."
            )
    if "wide" in results:
        rows = results["wide"]
        lines += [
            "",
            "One round mapped W wide through dag.test() "
            "(slot workers in the task processes; PostgreSQL metadata and storage):",
            "",
        ]
        lines.append(
            table(
                [
                    "width",
                    "workers",
                    "state",
                    "wall s",
                    "suggest s",
                    "evaluate span s",
                    "per task s",
                    "worker share",
                    "worker first 10% s",
                    "worker last 10% s",
                    "observe s",
                    "finalize s",
                ],
                [
                    [
                        r["width"],
                        r.get("workers"),
                        r.get("state", r.get("error")),
                        r.get("wall_s"),
                        r.get("suggest_s"),
                        r.get("evaluate_span_s"),
                        r.get("per_task_s"),
                        (r["per_task_worker_s"] / r["per_task_s"])
                        if r.get("per_task_worker_s") and r.get("per_task_s")
                        else None,
                        r.get("worker_first_tenth_s"),
                        r.get("worker_last_tenth_s"),
                        r.get("observe_s"),
                        r.get("finalize_s"),
                    ]
                    for r in rows
                ],
            )
        )
    body = "\n".join(lines)
    print(body)
    (out / "scale.md").write_text(body + "\n")
    if "suggest" in results:
        (out / "suggest_profile.txt").write_text(results["suggest"].get("profile_top", ""))
    write_json(out / "scale_raw.json", results)
    write_json(out / "scale.json", headline(results))
    plot(results, out)
    return body


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The published figures (``bench/results/scale.json``).

    ``suggest_s``: ``suggest_batch(32)`` in a cold process by finished trials; ``wide_suggest_s``:
    the ``suggest`` task of one round W wide; ``wide_ratio_<W>_<w>``: the widest over the narrowest.
    """
    out: dict[str, Any] = {
        "machine_start": results.get("machine_start"),
        "machine_end": results.get("machine_end"),
    }
    if "suggest" in results:
        rows = results["suggest"]["rows"]
        out["suggest_s"] = {str(r["finished_trials"]): r.get("plain_suggest_s") for r in rows}
        by = out["suggest_s"]
        sizes = sorted(int(k) for k in by if by[k] is not None)
        if sizes:
            big, small = by[str(sizes[-1])], by[str(sizes[0])]
            out["targets"] = {
                f"suggest_s_{sizes[-1]}": {
                    "value": big,
                    "target": f"<= {TARGET_SUGGEST_S:g}",
                    "met": big <= TARGET_SUGGEST_S,
                },
                f"ratio_{sizes[-1]}_{sizes[0]}": {
                    "value": big / small,
                    "target": "<= 1.5",
                    "met": big / small <= 1.5,
                },
            }
    if "wide" in results:
        wide = {str(r["width"]): r.get("suggest_s") for r in results["wide"]}
        out["wide_suggest_s"] = wide
        widths = sorted(int(k) for k in wide if wide[k])
        if len(widths) >= 2:
            ratio = wide[str(widths[-1])] / wide[str(widths[0])]
            out[f"wide_ratio_{widths[-1]}_{widths[0]}"] = ratio
            out.setdefault("targets", {})[f"wide_ratio_{widths[-1]}_{widths[0]}"] = {
                "value": ratio,
                "target": "<= 12",
                "met": ratio <= 12,
            }
    if "parse" in results:
        out["parse_s"] = {
            str(r["study_files"]): (r["parse_s"] + r["serialize_s"]) if "parse_s" in r else None
            for r in results["parse"]
        }
        out["parse_marginal_s_per_study"] = results.get("parse_marginal_s_per_study")
    return out


def plot(results: dict[str, Any], out: Path) -> None:
    """Suggest latency (stacked by part) against the number of finished trials."""
    if "suggest" not in results:
        return
    plt = pyplot()
    rows = [r for r in results["suggest"]["rows"] if r.get("split_s")]
    if not rows:
        return
    xs = [r["finished_trials"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    keys = ["storage reads", "sampler (TPE)", "storage writes", "other"]
    ax.stackplot(xs, *[[r["split_s"].get(k, 0.0) for r in rows] for k in keys], labels=keys, alpha=0.8)
    ax.axhline(TARGET_SUGGEST_S, color="C3", ls="--", label="target")
    ax.set_xlabel("finished trials in the study")
    ax.set_ylabel("suggest_batch(32) seconds")
    ax.set_title("cold-process suggest on PostgreSQL, by part")
    ax.legend(fontsize=8, loc="upper left")
    savefig(fig, out / "scale_suggest.png")


if __name__ == "__main__":
    sys.exit(main())
