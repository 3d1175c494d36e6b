"""Sample efficiency of batch rounds: best value at equal trial budgets, batch sizes 1, 4, 8, 16.

Methods (same budget, same seeds, same problem instances):

* ``seq TPE``: Optuna TPE, one trial at a time (the reference); ``random``: random search (floor).
* ``ours``: the pipeline's batch suggestion: per round a fresh sampler from
  :func:`hpo_core.samplers.build_sampler` (TPE, constant liar, seed mixed with the round number),
  B trials asked through :func:`hpo_core.engine._ask_distinct` and
  :func:`hpo_core.space.sample_params`, then evaluated and told. ``--verify`` checks that this loop
  returns exactly the params of :func:`hpo_core.engine.suggest_batch` on a SQLite storage.
* ``no liar``: the same with ``constant_liar: false`` (independent asks).
* ``hyperopt``: Hyperopt TPE with ``max_queue_len=B`` (B suggestions from the same history, as
  SparkTrials with parallelism B does).

Problems: BBOB functions from ``coco-experiment`` (instance = seed + 1, regret = f - f_opt) and two
scikit-learn objectives on built-in datasets (regret = value - best value seen in this run).
Runs in ``.venv-bench``: ``bench/run.sh sample [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import multiprocessing
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import fmt, log, machine_info, output_dir, pyplot, quantiles, savefig, table, write_json
from hpo_core.keys import StudyAttr
from hpo_core.samplers import build_sampler
from hpo_core.space import sample_params, space_size
from hpo_core.spec import validate_mapping
from hpo_core.study.config import RunConfig

TARGET_RATIO = 1.10
TARGET_BATCH = 8
N_STARTUP = 10

# --- problems ------------------------------------------------------------------------------------


def _bbob_fopt(fid: int, dim: int, instance: int) -> float:
    """f_opt of a BBOB instance, read from the COCO logger's header (cocoex does not expose it)."""
    import cocoex

    with tempfile.TemporaryDirectory() as tmp:
        suite = cocoex.Suite(
            "bbob", "", f"function_indices:{fid} dimensions:{dim} instance_indices:{instance}"
        )
        observer = cocoex.Observer("bbob", f"result_folder: probe outer_folder: {tmp}")
        problem = next(iter(suite))
        problem.observe_with(observer)
        problem([0.0] * dim)
        problem.free()
        del observer
        for path in Path(tmp).rglob("*.tdat"):
            found = re.search(r"Fopt \(([-+0-9.eE]+)\)", path.read_text())
            if found:
                return float(found.group(1))
    raise RuntimeError(f"no f_opt for bbob f{fid} d{dim} i{instance}")


@functools.lru_cache(maxsize=64)
def _bbob(fid: int, dim: int, instance: int) -> tuple[Any, float]:
    import cocoex

    suite = cocoex.Suite("bbob", "", f"function_indices:{fid} dimensions:{dim} instance_indices:{instance}")
    problem = next(iter(suite))
    return problem, _bbob_fopt(fid, dim, instance)


def bbob_space(dim: int) -> dict[str, Any]:
    """x0..x{dim-1} in [-5, 5] (the BBOB domain)."""
    return {f"x{i}": {"type": "float", "low": -5.0, "high": 5.0} for i in range(dim)}


@functools.lru_cache(maxsize=2)
def _dataset(name: str) -> tuple[Any, Any]:
    from sklearn import datasets

    loader = {"breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}[name]
    data = loader()
    return data.data, data.target


def svc_objective(params: dict[str, Any]) -> float:
    """1 - ROC AUC of an RBF SVC on breast cancer (3-fold CV, standardised features)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    x, y = _dataset("breast_cancer")
    model = make_pipeline(StandardScaler(), SVC(C=params["C"], gamma=params["gamma"]))
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    return 1.0 - float(cross_val_score(model, x, y, cv=cv, scoring="roc_auc").mean())


def tree_objective(params: dict[str, Any]) -> float:
    """Error of a decision tree on digits (3-fold CV); ints and categoricals in the space."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    x, y = _dataset("digits")
    model = DecisionTreeClassifier(
        max_depth=int(params["max_depth"]),
        min_samples_split=int(params["min_samples_split"]),
        min_samples_leaf=int(params["min_samples_leaf"]),
        criterion=params["criterion"],
        max_features=params["max_features"],
        ccp_alpha=params["ccp_alpha"],
        random_state=0,
    )
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    return 1.0 - float(cross_val_score(model, x, y, cv=cv, scoring="accuracy").mean())


SKLEARN: dict[str, tuple[Callable[[dict[str, Any]], float], dict[str, Any]]] = {
    "svc_breast_cancer": (
        svc_objective,
        {
            "C": {"type": "float", "low": 1e-2, "high": 1e3, "log": True},
            "gamma": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
        },
    ),
    "tree_digits": (
        tree_objective,
        {
            "max_depth": {"type": "int", "low": 2, "high": 32, "log": True},
            "min_samples_split": {"type": "int", "low": 2, "high": 64, "log": True},
            "min_samples_leaf": {"type": "int", "low": 1, "high": 32, "log": True},
            "criterion": {"type": "categorical", "choices": ["gini", "entropy"]},
            "max_features": {"type": "categorical", "choices": ["sqrt", "log2", None]},
            "ccp_alpha": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
        },
    ),
}


def problem(name: str, seed: int) -> tuple[Callable[[dict[str, Any]], float], dict[str, Any], float | None]:
    """``(evaluate(params) -> value, search space, f_opt or None)`` of a problem name."""
    if name in SKLEARN:
        fn, space = SKLEARN[name]
        return fn, space, None
    fid, dim = (int(v) for v in re.fullmatch(r"bbob_f(\d+)_d(\d+)", name).groups())  # type: ignore[union-attr]
    prob, fopt = _bbob(fid, dim, seed + 1)

    def evaluate(params: dict[str, Any]) -> float:
        return float(prob([params[f"x{i}"] for i in range(dim)]))

    return evaluate, bbob_space(dim), fopt


# --- methods -------------------------------------------------------------------------------------


def make_spec(space: dict[str, Any], *, seed: int, budget: int, batch: int, liar: bool = True) -> Any:
    """A StudySpec for ``space`` with the pipeline's defaults (TPE, constant liar unless told)."""
    return validate_mapping(
        {
            "name": "bench_sample",
            "objective": "bench.sample:unused",
            "direction": "minimize",
            "search_space": space,
            "sampler": {"type": "tpe", "seed": seed, "constant_liar": liar, "n_startup_trials": N_STARTUP},
            "budget": {"n_trials": budget, "batch_size": batch, "max_rounds": math.ceil(budget / batch)},
            "mlflow": {"experiment": "bench"},
        },
        source="bench.sample",
    )


def run_ours(
    evaluate: Callable[[dict[str, Any]], float], spec: Any, *, seed: int, budget: int, batch: int
) -> list[float]:
    """The pipeline's rounds: fresh sampler per round, B distinct asks, evaluate, tell."""
    import optuna

    from hpo_core.study.suggest import _ask_distinct, _key

    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name="s", direction="minimize")
    values: list[float] = []
    exhaustible = space_size(spec)
    round_number = 0
    while len(values) < budget:
        round_number += 1
        sampler = build_sampler(spec, seed=seed, round_number=round_number)
        study = optuna.load_study(study_name="s", storage=storage, sampler=sampler)
        asked = []
        seen: set[str] = set()
        for _ in range(min(batch, budget - len(values))):
            trial, params = _ask_distinct(study, spec, seen, exhaustible)
            if trial is None:
                break
            seen.add(_key(params))
            asked.append((trial, params))
        for trial, params in asked:
            value = evaluate(params)
            study.tell(trial, value)
            values.append(value)
    return values


def run_seq_tpe(
    evaluate: Callable[[dict[str, Any]], float], spec: Any, *, seed: int, budget: int
) -> list[float]:
    """Plain Optuna TPE, sequential, one sampler for the whole study."""
    import optuna

    study = optuna.create_study(sampler=build_sampler(spec, seed=seed), direction="minimize")
    values = []
    for _ in range(budget):
        trial = study.ask()
        value = evaluate(sample_params(spec, trial))
        study.tell(trial, value)
        values.append(value)
    return values


def run_random(
    evaluate: Callable[[dict[str, Any]], float], spec: Any, *, seed: int, budget: int
) -> list[float]:
    """Random search (the floor)."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="minimize")
    values = []
    for _ in range(budget):
        trial = study.ask()
        value = evaluate(sample_params(spec, trial))
        study.tell(trial, value)
        values.append(value)
    return values


def hyperopt_space(space: dict[str, Any]) -> dict[str, Any]:
    """The same search space in Hyperopt's terms."""
    from hyperopt import hp

    out: dict[str, Any] = {}
    for name, p in space.items():
        if p["type"] == "categorical":
            out[name] = hp.choice(name, p["choices"])
        elif p["type"] == "int":
            out[name] = (
                hp.qloguniform(
                    name,
                    math.log(p["low"] - 0.5 + 1e-9) if p["low"] > 0.5 else math.log(0.5),
                    math.log(p["high"] + 0.5),
                    1,
                )
                if p.get("log")
                else hp.uniformint(name, p["low"], p["high"])
            )
        elif p.get("log"):
            out[name] = hp.loguniform(name, math.log(p["low"]), math.log(p["high"]))
        else:
            out[name] = hp.uniform(name, p["low"], p["high"])
    return out


def run_hyperopt(
    evaluate: Callable[[dict[str, Any]], float], space: dict[str, Any], *, seed: int, budget: int, batch: int
) -> list[float]:
    """Hyperopt TPE with ``max_queue_len=batch`` (n_startup_jobs matched to Optuna's)."""
    from hyperopt import STATUS_OK, Trials, fmin, tpe

    ints = {n for n, p in space.items() if p["type"] == "int"}
    values: list[float] = []

    def objective(params: dict[str, Any]) -> dict[str, Any]:
        fixed = {
            k: (min(max(round(v), space[k]["low"]), space[k]["high"]) if k in ints else v)
            for k, v in params.items()
        }
        value = evaluate(fixed)
        values.append(value)
        return {"loss": value, "status": STATUS_OK}

    fmin(
        objective,
        hyperopt_space(space),
        algo=functools.partial(tpe.suggest, n_startup_jobs=N_STARTUP),
        max_evals=budget,
        trials=Trials(),
        rstate=np.random.default_rng(seed),
        max_queue_len=batch,
        show_progressbar=False,
    )
    return values


def run_one(task: tuple[str, str, int, int, int]) -> dict[str, Any]:
    """One (problem, method, batch, seed, budget) run; returns the best-so-far curve."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("hyperopt").setLevel(logging.ERROR)
    name, method, batch, seed, budget = task
    evaluate, space, fopt = problem(name, seed)
    started = time.process_time()
    if method == "hyperopt":
        values = run_hyperopt(evaluate, space, seed=seed, budget=budget, batch=batch)
    elif method == "seq_tpe":
        values = run_seq_tpe(
            evaluate, make_spec(space, seed=seed, budget=budget, batch=1), seed=seed, budget=budget
        )
    elif method == "random":
        values = run_random(
            evaluate, make_spec(space, seed=seed, budget=budget, batch=1), seed=seed, budget=budget
        )
    else:
        spec = make_spec(space, seed=seed, budget=budget, batch=batch, liar=(method == "ours"))
        values = run_ours(evaluate, spec, seed=seed, budget=budget, batch=batch)
    best, curve = math.inf, []
    for v in values[:budget]:
        best = min(best, v)
        curve.append(best)
    return {
        "problem": name,
        "method": method,
        "batch": batch,
        "seed": seed,
        "fopt": fopt,
        "best": best,
        "curve": curve,
        "cpu_s": time.process_time() - started,
    }


def verify_engine_parity(seed: int = 3, batch: int = 4, budget: int = 12) -> dict[str, Any]:
    """Check that :func:`run_ours` asks exactly what ``suggest_batch`` asks (SQLite storage)."""
    import optuna

    from hpo_core.storage import open_storage
    from hpo_core.study.suggest import suggest_batch

    evaluate, space, _ = problem("bbob_f8_d2", seed)
    spec = make_spec(space, seed=seed, budget=budget, batch=batch)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/parity.db"
        study = optuna.create_study(storage=open_storage(url), study_name="parity", direction="minimize")
        config = RunConfig(n_trials=budget, batch_size=batch, seed=seed)
        study.set_user_attr(StudyAttr.SPEC, spec.to_json())
        study.set_user_attr(StudyAttr.RUN_CONFIG, dataclasses.asdict(config))
        engine_params = []
        for k in range(1, math.ceil(budget / batch) + 1):
            entries, _ = suggest_batch(storage_url=url, study_name="parity", round_number=k)
            for e in entries:
                study.tell(e["trial_number"], evaluate(e["params"]))
                engine_params.append(e["params"])
    direct: list[dict[str, Any]] = []

    def recording(params: dict[str, Any]) -> float:
        direct.append(params)
        return evaluate(params)

    run_ours(recording, spec, seed=seed, budget=budget, batch=batch)
    same = len(direct) == len(engine_params) and all(
        all(math.isclose(a[k], b[k], rel_tol=1e-12) for k in a)
        for a, b in zip(direct, engine_params, strict=True)
    )
    return {"identical_params": same, "trials": len(direct)}


# --- driver and report ---------------------------------------------------------------------------


def plan(quick: bool) -> dict[str, Any]:
    """Problems, seeds, batch sizes and budget of a quick or a full run."""
    if quick:
        return {
            "problems": ["bbob_f8_d2", "bbob_f15_d5", "svc_breast_cancer"],
            "seeds": 3,
            "batches": [1, 4, 8, 16],
            "budget": 32,
        }
    bbob = [f"bbob_f{f}_d{d}" for f in (1, 8, 15, 21) for d in (2, 5, 10)]
    return {"problems": [*bbob, *SKLEARN], "seeds": 10, "batches": [1, 4, 8, 16], "budget": 64}


def regrets(runs: list[dict[str, Any]]) -> None:
    """Add ``regret`` (and the curve of it) to every run, per problem's optimum or best seen."""
    best_seen: dict[str, float] = defaultdict(lambda: math.inf)
    for r in runs:
        best_seen[r["problem"]] = min(best_seen[r["problem"]], r["best"])
    for r in runs:
        ref = r["fopt"] if r["fopt"] is not None else best_seen[r["problem"]]
        r["regret"] = max(0.0, r["best"] - ref)
        r["regret_curve"] = [max(0.0, c - ref) for c in r["curve"]]


def summarise(runs: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    """Median/IQR regret per problem, method and batch; ratios to sequential TPE."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in runs:
        groups[(r["problem"], r["method"], r["batch"])].append(r["regret"])
    stats = {f"{p}|{m}|{b}": quantiles(v) for (p, m, b), v in groups.items()}
    ratios: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    floors = {}
    for p in cfg["problems"]:
        seq = stats[f"{p}|seq_tpe|1"]["median"]
        # Regret below 1% of random search's regret after the startup trials counts as solved:
        # without a floor a reference that found the exact best seen (regret 0) divides by zero.
        initial = statistics.median(
            r["regret_curve"][N_STARTUP - 1] for r in runs if r["problem"] == p and r["method"] == "random"
        )
        floor = floors[p] = max(0.01 * initial, 1e-12)
        for m in ("ours", "no_liar", "hyperopt"):
            for b in cfg["batches"]:
                med = stats[f"{p}|{m}|{b}"]["median"]
                ratios[f"{m}|{b}"][p] = max(med, floor) / max(seq, floor)
    geo = {k: math.exp(statistics.fmean(math.log(x) for x in v.values())) for k, v in ratios.items()}
    within = {k: sum(x <= TARGET_RATIO for x in v.values()) / len(v) for k, v in ratios.items()}
    return {
        "stats": stats,
        "ratios": ratios,
        "regret_floor": floors,
        "geo_mean_ratio": geo,
        "geo_mean_ci": bootstrap_ci(runs, cfg, floors),
        "share_within_target": within,
    }


def bootstrap_ci(
    runs: list[dict[str, Any]], cfg: dict[str, Any], floors: dict[str, float], *, replicates: int = 1000
) -> dict[str, list[float]]:
    """95 % percentile bootstrap interval of each geometric-mean ratio to sequential TPE.

    Paired per seed: a replicate draws the seeds with replacement once and uses the same draw for
    both methods of every problem, so a hard seed is hard for both sides of each ratio.
    """
    by_key: dict[tuple[str, str, int], dict[int, float]] = defaultdict(dict)
    for r in runs:
        by_key[(r["problem"], r["method"], r["batch"])][r["seed"]] = r["regret"]
    seeds = sorted({r["seed"] for r in runs})
    rng = random.Random(0)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(replicates):
        draw = [rng.choice(seeds) for _ in seeds]
        for m in ("ours", "no_liar", "hyperopt"):
            for b in cfg["batches"]:
                logs = []
                for p in cfg["problems"]:
                    seq = statistics.median(by_key[(p, "seq_tpe", 1)][s] for s in draw)
                    med = statistics.median(by_key[(p, m, b)][s] for s in draw)
                    logs.append(math.log(max(med, floors[p]) / max(seq, floors[p])))
                samples[f"{m}|{b}"].append(math.exp(statistics.fmean(logs)))
    out = {}
    for key, values in samples.items():
        values.sort()
        out[key] = [values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]]
    return out


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The published figures (``bench/results/sample.json``): each batch's ratio to sequential TPE."""
    cfg, summary = results["config"], results["summary"]
    ratio_vs_seq = {}
    for b in cfg["batches"]:
        low, high = summary["geo_mean_ci"][f"ours|{b}"]
        ratio_vs_seq[str(b)] = {
            "median": summary["geo_mean_ratio"][f"ours|{b}"],
            "ci_low": low,
            "ci_high": high,
        }
    target = ratio_vs_seq.get(str(TARGET_BATCH))
    return {
        "ratio_vs_seq": ratio_vs_seq,
        "ratio_vs_seq_by_method": {
            m: {
                str(b): {
                    "median": summary["geo_mean_ratio"][f"{m}|{b}"],
                    "ci": summary["geo_mean_ci"][f"{m}|{b}"],
                }
                for b in cfg["batches"]
            }
            for m in ("ours", "no_liar", "hyperopt")
        },
        "per_problem_ours": {str(b): summary["ratios"][f"ours|{b}"] for b in cfg["batches"]},
        "target": {
            "batch": TARGET_BATCH,
            "ci_high_at_most": TARGET_RATIO,
            "met": None if target is None else target["ci_high"] <= TARGET_RATIO,
        },
        "config": cfg,
        "engine_parity": results["engine_parity"],
        "wall_s": results["wall_s"],
        "machine": results["machine"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the sample-efficiency benchmark and write ``sample.json``, tables and plots."""
    parser = argparse.ArgumentParser(description="Sample efficiency of batch rounds")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--budget", type=int)
    parser.add_argument("--problems", help="comma-separated problem names")
    args = parser.parse_args(argv)
    cfg = plan(args.quick)
    if args.seeds:
        cfg["seeds"] = args.seeds
    if args.budget:
        cfg["budget"] = args.budget
    if args.problems:
        cfg["problems"] = args.problems.split(",")
    out = output_dir(args.out, "sample")
    log("checking that the direct loop asks what suggest_batch asks")
    parity = verify_engine_parity()
    log(f"engine parity: {parity}")
    tasks = []
    for p in cfg["problems"]:
        for s in range(cfg["seeds"]):
            tasks += [(p, "seq_tpe", 1, s, cfg["budget"]), (p, "random", 1, s, cfg["budget"])]
            for b in cfg["batches"]:
                tasks += [(p, m, b, s, cfg["budget"]) for m in ("ours", "no_liar", "hyperopt")]
    log(f"{len(tasks)} runs on {args.jobs} processes")
    started = time.time()
    runs: list[dict[str, Any]] = []
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for i, r in enumerate(pool.imap_unordered(run_one, tasks, chunksize=4), 1):
            runs.append(r)
            if i % max(1, len(tasks) // 10) == 0:
                log(f"{i}/{len(tasks)} runs")
    regrets(runs)
    summary = summarise(runs, cfg)
    results = {
        "machine": machine_info(),
        "config": cfg,
        "engine_parity": parity,
        "wall_s": time.time() - started,
        "summary": summary,
        "runs": runs,
    }
    report(results, out)
    return 0


def report(results: dict[str, Any], out: Path) -> str:
    """Print and write the tables, the JSON and the plots."""
    cfg, summary = results["config"], results["summary"]
    stats = summary["stats"]

    def cell(p: str, m: str, b: int) -> str:
        s = stats[f"{p}|{m}|{b}"]
        return f"{fmt(s['median'])} [{fmt(s['q25'])}-{fmt(s['q75'])}]"

    agg_rows = []
    for b in cfg["batches"]:
        agg_rows.append(
            [
                b,
                *(
                    f"{fmt(summary['geo_mean_ratio'][f'{m}|{b}'])} "
                    f"[{fmt(summary['geo_mean_ci'][f'{m}|{b}'][0])}-{fmt(summary['geo_mean_ci'][f'{m}|{b}'][1])}]"
                    for m in ("ours", "no_liar", "hyperopt")
                ),
                f"{summary['share_within_target'][f'ours|{b}']:.0%}",
            ]
        )
    target = summary["geo_mean_ratio"][f"ours|{TARGET_BATCH}"]
    target_ci = summary["geo_mean_ci"][f"ours|{TARGET_BATCH}"]
    lines = [
        f"Sample efficiency: budget {cfg['budget']} trials, {cfg['seeds']} seeds, "
        f"{len(cfg['problems'])} problems; regret at the budget (lower is better). "
        f"Engine parity check: {results['engine_parity']}",
        "",
        "Median regret relative to sequential TPE (geometric mean over problems of the ratio of medians,"
        " [95 % bootstrap interval, paired per seed]; 1.0 = as good; target for ours at "
        f"B={TARGET_BATCH}: upper bound <= {TARGET_RATIO}):",
        "",
        table(
            ["batch", "ours / seq", "no liar / seq", "hyperopt / seq", "problems ours within 10%"], agg_rows
        ),
        "",
        f"Target B={TARGET_BATCH}: ours / seq TPE = {fmt(target)} [{fmt(target_ci[0])}-{fmt(target_ci[1])}]"
        f" -> {'met' if target_ci[1] <= TARGET_RATIO else 'missed'}",
        "",
        "Per problem: median [25%-75%] regret at the budget:",
        "",
    ]
    rows = []
    for p in cfg["problems"]:
        for b in cfg["batches"]:
            rows.append(
                [
                    p,
                    b,
                    cell(p, "seq_tpe", 1) if b == 1 else "",
                    cell(p, "random", 1) if b == 1 else "",
                    cell(p, "ours", b),
                    cell(p, "no_liar", b),
                    cell(p, "hyperopt", b),
                    summary["ratios"][f"ours|{b}"][p],
                ]
            )
    lines.append(
        table(["problem", "B", "seq TPE", "random", "ours", "no liar", "hyperopt", "ours/seq"], rows)
    )
    body = "\n".join(lines)
    print(body)
    (out / "sample.md").write_text(body + "\n")
    # The headline figures are published; every run's curve stays in the raw file.
    write_json(out / "sample_raw.json", results)
    write_json(out / "sample.json", headline(results))
    plot(results, out)
    return body


def plot(results: dict[str, Any], out: Path) -> None:
    """Ratio to sequential TPE vs batch size; per-problem heat map of ours / seq."""
    plt = pyplot()
    cfg, summary = results["config"], results["summary"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    labels = {
        "ours": "ours (constant liar)",
        "no_liar": "Optuna, independent asks",
        "hyperopt": "Hyperopt TPE",
    }
    for m, label in labels.items():
        ax.plot(
            cfg["batches"],
            [summary["geo_mean_ratio"][f"{m}|{b}"] for b in cfg["batches"]],
            marker="o",
            label=label,
        )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(TARGET_RATIO, color="C3", ls="--", label="target (B=8)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cfg["batches"], [str(b) for b in cfg["batches"]])
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("median regret / sequential TPE")
    ax.set_title(f"equal budget {cfg['budget']}, geometric mean over {len(cfg['problems'])} problems")
    ax.legend(fontsize=8)
    savefig(fig, out / "sample_ratio_vs_batch.png")
    grid = np.array([[summary["ratios"][f"ours|{b}"][p] for b in cfg["batches"]] for p in cfg["problems"]])
    fig, ax = plt.subplots(figsize=(5.5, 0.35 * len(cfg["problems"]) + 1.5))
    im = ax.imshow(np.log2(grid), cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
    ax.set_xticks(range(len(cfg["batches"])), [str(b) for b in cfg["batches"]])
    ax.set_yticks(range(len(cfg["problems"])), cfg["problems"])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2g}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("batch size")
    ax.set_title("ours / seq TPE (median regret)")
    fig.colorbar(im, ax=ax, label="log2 ratio")
    savefig(fig, out / "sample_ratio_heatmap.png")


if __name__ == "__main__":
    sys.exit(main())
