"""Sample efficiency of batch rounds: regret at equal trial budgets, batch sizes 1, 4, 8, 16.

Methods (same budget, same seeds, same problem instances: paired per seed):

* ``seq_tpe``: Optuna TPE, one trial at a time with one sampler (the reference); ``random``: the floor.
* ``ours``: the pipeline's batch suggestion through :func:`hpo_core.study.ask.ask_batch` (the code
  ``suggest`` uses): per round a fresh sampler from :func:`hpo_core.samplers.build_sampler` (TPE,
  constant liar with the spec's default lie, ``mean``; seed mixed with the round number), the B
  trials asked against an in-memory copy of the history, evaluated and told.
  :func:`verify_engine_parity` checks first that this asks exactly what
  :func:`hpo_core.study.suggest.suggest_batch` asks on a SQLite storage (read, ask, write back).
* ``ours_worst``: the same with ``lie: worst`` (Optuna's own constant liar, the pipeline's lie before).
* ``no_liar`` (``constant_liar: false``) and ``hyperopt`` (Hyperopt TPE with ``max_queue_len=B``):
  optional contenders (``--contenders``).
* Long runs (>= 2,000 trials): ``seq_tpe`` (unbounded), ``seq_tpe_k`` (sequential through the asker,
  the sampler's history bounded to ``sampler.history_limit`` K) and ``ours`` at B = 8 with the same K.

Problems: BBOB functions from ``coco-experiment`` (instance :func:`bbob_instance`, regret = f - f_opt) and two
scikit-learn objectives on built-in datasets (regret = value - best value seen in this run).
Runs in ``.venv-bench``: ``bench/run.sh sample [--quick]``.
"""

from __future__ import annotations

import argparse
import functools
import json
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
from hpo_core.deployment import Deployment
from hpo_core.keys import StudyAttr
from hpo_core.samplers import build_sampler
from hpo_core.space import sample_params
from hpo_core.spec import DEFAULT_HISTORY_LIMIT, validate_mapping
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


def bbob_instance(seed: int) -> int:
    """The BBOB instance of a seed: ``seed + 1`` for seeds 0-14, then instance 1.

    COCO's bbob suite has instances 1-15; asked for a larger one it ignores the filter and serves
    its first instance, which is what the published 30-seed run used for seeds 15-29 (every method
    still gets the same instance for a given seed, so the comparison stays paired).
    """
    return seed + 1 if seed < 15 else 1


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
    prob, fopt = _bbob(fid, dim, bbob_instance(seed))

    def evaluate(params: dict[str, Any]) -> float:
        return float(prob([params[f"x{i}"] for i in range(dim)]))

    return evaluate, bbob_space(dim), fopt


# --- methods -------------------------------------------------------------------------------------


def make_spec(
    space: dict[str, Any],
    *,
    seed: int,
    liar: bool = True,
    lie: str | None = None,
    history_limit: int | str | None = "default",
) -> Any:
    """A StudySpec for ``space`` with the pipeline's defaults (TPE, constant liar unless told).

    The asker reads no budget (it is told the batch size), so the spec's budget is a placeholder.
    """

    sampler: dict[str, Any] = {
        "type": "tpe",
        "seed": seed,
        "constant_liar": liar,
        "n_startup_trials": N_STARTUP,
    }
    if lie is not None:
        sampler["lie"] = lie
    if history_limit != "default":
        sampler["history_limit"] = history_limit
    return validate_mapping(
        {
            "name": "bench_sample",
            "objective": "bench.sample:unused",
            "direction": "minimize",
            "search_space": space,
            "sampler": sampler,
            "budget": {"n_trials": 1, "batch_size": 1, "max_rounds": 1},
            "mlflow": {"experiment": "bench"},
        },
        source="bench.sample",
    )


def run_ours(
    evaluate: Callable[[dict[str, Any]], float], spec: Any, *, seed: int, budget: int, batch: int
) -> list[float]:
    """The pipeline's rounds through the asker: B trials asked per round, evaluated, told."""
    from optuna.trial import FrozenTrial, TrialState

    from hpo_core.study.ask import SamplerRun, ask_batch

    trials: list[FrozenTrial] = []
    study_attrs: dict[str, Any] = {}
    values: list[float] = []
    round_number = 0
    while len(values) < budget:
        round_number += 1
        asked = ask_batch(
            spec,
            run=SamplerRun(seed=seed, round_number=round_number),
            trials=trials,
            size=min(batch, budget - len(values)),
            study_system_attrs=study_attrs,
        )
        study_attrs.update(asked.study_system_attrs)
        if not asked.batch:
            break
        for t in asked.trials:
            value = None if t.discarded else evaluate(t.params)
            if value is not None:
                values.append(value)
            trials.append(
                FrozenTrial(
                    number=t.number,
                    trial_id=t.number,
                    state=TrialState.FAIL if value is None else TrialState.COMPLETE,
                    value=value,
                    datetime_start=t.datetime_start,
                    datetime_complete=t.datetime_start,
                    params=t.params,
                    distributions=t.distributions,
                    user_attrs=t.user_attrs,
                    system_attrs=t.system_attrs,
                    intermediate_values={},
                )
            )
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
        values = run_seq_tpe(evaluate, make_spec(space, seed=seed), seed=seed, budget=budget)
    elif method == "random":
        values = run_random(evaluate, make_spec(space, seed=seed), seed=seed, budget=budget)
    else:
        spec = make_spec(
            space, seed=seed, liar=method != "no_liar", lie="worst" if method == "ours_worst" else None
        )
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
        "budget": budget,
        "fopt": fopt,
        "best": best,
        "curve": curve[:: max(1, budget // 64)],
        "curve_step": max(1, budget // 64),
        "regret_at_startup_input": curve[N_STARTUP - 1] if len(curve) >= N_STARTUP else best,
        "cpu_s": time.process_time() - started,
    }


def verify_engine_parity(seed: int = 3, batch: int = 8, budget: int = 24) -> dict[str, Any]:
    """Check that :func:`run_ours` (the asker) asks exactly what the pipeline's ``suggest_batch`` asks.

    Three rounds of 8 on a SQLite storage (past the 10 startup trials, so TPE and its liar act),
    for the default lie and for ``worst``.
    """
    import optuna

    from hpo_core.storage import open_storage
    from hpo_core.study.suggest import suggest_batch

    evaluate, space, _ = problem("bbob_f8_d2", seed)
    out: dict[str, Any] = {}
    for lie in ("mean", "worst"):
        spec = make_spec(space, seed=seed, lie=lie)
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/parity.db"
            study = optuna.create_study(storage=open_storage(url), study_name="parity", direction="minimize")
            config = RunConfig(n_trials=budget, batch_size=batch, seed=seed)
            study.set_user_attr(StudyAttr.SPEC, spec.to_json())
            study.set_user_attr(StudyAttr.RUN_CONFIG, config.to_attr())
            deployment = Deployment.from_env({"HPO_STORAGE_URL": url, "HPO_HOME": tmp})
            engine_params = []
            for k in range(1, math.ceil(budget / batch) + 1):
                entries, _ = suggest_batch(deployment=deployment, study_name="parity", round_number=k)
                for e in entries:
                    study.tell(e["trial_number"], evaluate(e["params"]))
                    engine_params.append(e["params"])
        direct: list[dict[str, Any]] = []

        def recording(params: dict[str, Any]) -> float:
            direct.append(params)  # noqa: B023 - consumed before the next iteration
            return evaluate(params)

        run_ours(recording, spec, seed=seed, budget=budget, batch=batch)
        same = len(direct) == len(engine_params) and all(
            all(math.isclose(a[k], b[k], rel_tol=1e-12) for k in a)
            for a, b in zip(direct, engine_params, strict=True)
        )
        out[lie] = {"identical_params": same, "trials": len(direct)}
    return out


# --- driver and report ---------------------------------------------------------------------------

SHORT_METHODS = ("ours", "ours_worst")
CONTENDERS = ("no_liar", "hyperopt")


def plan(quick: bool) -> dict[str, Any]:
    """Problems, seeds, batch sizes and budgets of a quick or a full run."""
    if quick:
        return {
            "problems": ["bbob_f8_d2", "bbob_f15_d5", "svc_breast_cancer"],
            "seeds": 5,
            "batches": [1, 4, 8, 16],
            "budget": 32,
            "long_problems": ["bbob_f8_d2"],
            "long_unbounded": ["bbob_f8_d2"],
            "long_budget": 200,
            "long_history_limit": 50,
            "methods": list(SHORT_METHODS),
        }
    # The 2-D and 5-D BBOB problems: where batches lost before (2-D) and where they did not (5-D).
    # The 10-D ones and the scikit-learn objectives (--problems) cost most of the time on 2 shared
    # cores and showed no batch loss in the 10-seed run of 2026-11-22.
    bbob = [f"bbob_f{f}_d{d}" for d in (2, 5) for f in (1, 8, 15, 21)]
    return {
        "problems": bbob,
        "seeds": 30,
        "batches": [1, 4, 8, 16],
        "budget": 64,
        "long_problems": ["bbob_f8_d2", "bbob_f21_d2"],
        # Optuna's TPE on the whole history costs ~70 s of CPU per 2,000-trial run (quadratic), and a
        # K-bounded one ~40 s at the default K = 500 (TPE's per-ask work is linear in what it sees):
        # on 2 shared cores the published run bounds both sides to K = 100 and leaves the unbounded
        # reference to --long-unbounded.
        "long_unbounded": [],
        "long_budget": 2000,
        "long_history_limit": 100,
        "methods": list(SHORT_METHODS),
    }


def tasks_of(cfg: dict[str, Any]) -> list[tuple[str, str, int, int, int]]:
    """Every run of the plan; long runs first (they are the slowest, so the pool ends evenly)."""
    tasks: list[tuple[str, str, int, int, int]] = []
    long_budget = cfg["long_budget"]
    for p in cfg["long_problems"]:
        for s in range(cfg["seeds"]):
            if p in cfg["long_unbounded"]:
                tasks.append((f"{p}@long", "seq_tpe", 1, s, long_budget))
            tasks += [(f"{p}@long", m, 1, s, long_budget) for m in ("seq_tpe_k", "random")]
            tasks.append((f"{p}@long", "ours", TARGET_BATCH, s, long_budget))
    for p in cfg["problems"]:
        for s in range(cfg["seeds"]):
            tasks += [(p, "seq_tpe", 1, s, cfg["budget"]), (p, "random", 1, s, cfg["budget"])]
            for b in cfg["batches"]:
                tasks += [(p, m, b, s, cfg["budget"]) for m in cfg["methods"]]
    return tasks


def regrets(runs: list[dict[str, Any]]) -> None:
    """Add ``regret`` (and the curve of it) to every run, per problem's optimum or best seen."""
    best_seen: dict[str, float] = defaultdict(lambda: math.inf)
    for r in runs:
        best_seen[r["problem"]] = min(best_seen[r["problem"]], r["best"])
    for r in runs:
        ref = r["fopt"] if r["fopt"] is not None else best_seen[r["problem"]]
        r["regret"] = max(0.0, r["best"] - ref)
        r["regret_curve"] = [max(0.0, c - ref) for c in r["curve"]]
        r["regret_after_startup"] = max(0.0, r.pop("regret_at_startup_input") - ref)


def _floors(runs: list[dict[str, Any]], problems: list[str]) -> dict[str, float]:
    """Regret below 1 % of random search's after the startup trials counts as solved.

    Without a floor a reference that found the exact best seen (regret 0) divides by zero.
    """
    floors = {}
    for p in problems:
        # A long run goes far below random's first trials: its floor is 1 % of random search's
        # regret at the (long) budget instead, else every method counts as solved.
        key = "regret" if p.endswith("@long") else "regret_after_startup"
        initial = statistics.median(r[key] for r in runs if r["problem"] == p and r["method"] == "random")
        floors[p] = max(0.01 * initial, 1e-12)
    return floors


def paired_ratio(
    by_seed: dict[tuple[str, str, int], dict[int, float]],
    problems: list[str],
    key: tuple[str, int],
    floors: dict[str, float],
    *,
    reference: tuple[str, int] = ("seq_tpe", 1),
    replicates: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Ratio of median regrets (method at B / reference) per problem and their geometric mean,
    each with a 95 % percentile bootstrap interval, paired per seed.

    A replicate draws the seeds with replacement once and uses that draw for both sides of every
    problem's ratio, so a hard seed (problem instance) is hard for both.
    """

    def ratio(p: str, draw: list[int]) -> float:
        mine = statistics.median(by_seed[(p, key[0], key[1])][s] for s in draw)
        ref = statistics.median(by_seed[(p, reference[0], reference[1])][s] for s in draw)
        return max(mine, floors[p]) / max(ref, floors[p])

    seeds = sorted(by_seed[(problems[0], reference[0], reference[1])])
    point = {p: ratio(p, seeds) for p in problems}
    rng = random.Random(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(replicates):
        draw = [rng.choice(seeds) for _ in seeds]
        logs = []
        for p in problems:
            r = ratio(p, draw)
            samples[p].append(r)
            logs.append(math.log(r))
        samples["geo_mean"].append(math.exp(statistics.fmean(logs)))

    def interval(values: list[float]) -> list[float]:
        values = sorted(values)
        return [values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]]

    geo = math.exp(statistics.fmean(math.log(x) for x in point.values()))
    return {
        "geo_mean": {"median": geo, "ci": interval(samples["geo_mean"])},
        "per_problem": {p: {"median": point[p], "ci": interval(samples[p])} for p in problems},
        "within_target": sum(x <= TARGET_RATIO for x in point.values()) / len(point),
    }


def summarise(runs: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    """Median/IQR regret per problem, method and batch; paired ratios to sequential TPE."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    by_seed: dict[tuple[str, str, int], dict[int, float]] = defaultdict(dict)
    for r in runs:
        groups[(r["problem"], r["method"], r["batch"])].append(r["regret"])
        by_seed[(r["problem"], r["method"], r["batch"])][r["seed"]] = r["regret"]
    stats = {f"{p}|{m}|{b}": quantiles(v) for (p, m, b), v in groups.items()}
    short, long = cfg["problems"], [f"{p}@long" for p in cfg["long_problems"]]
    floors = _floors(runs, short + long)
    ratios = {
        f"{m}|{b}": paired_ratio(by_seed, short, (m, b), floors)
        for m in (*cfg["methods"], *cfg.get("contenders", []))
        for b in cfg["batches"]
    }
    long_ratios = {}
    if long:
        # Every long problem: ours at B=8 against sequential TPE, both with the history bound K.
        long_ratios = {
            f"ours|{TARGET_BATCH} / seq_tpe_k": paired_ratio(
                by_seed, long, ("ours", TARGET_BATCH), floors, reference=("seq_tpe_k", 1)
            )
        }
        unbounded = [f"{p}@long" for p in cfg["long_unbounded"]]
        if unbounded:  # what the bound costs: against Optuna's TPE on the whole history
            long_ratios["seq_tpe_k / seq_tpe"] = paired_ratio(by_seed, unbounded, ("seq_tpe_k", 1), floors)
            long_ratios[f"ours|{TARGET_BATCH} / seq_tpe"] = paired_ratio(
                by_seed, unbounded, ("ours", TARGET_BATCH), floors
            )
    cpu = defaultdict(float)
    for r in runs:
        cpu[f"{r['method']}|{r['batch']}|{'long' if '@long' in r['problem'] else 'short'}"] += r["cpu_s"]
    return {
        "stats": stats,
        "ratios": ratios,
        "long_ratios": long_ratios,
        "regret_floor": floors,
        "cpu_s": dict(cpu),
    }


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The published figures (``bench/results/sample.json``): each batch's ratio to sequential TPE."""
    cfg, summary = results["config"], results["summary"]

    def figure(r: dict[str, Any]) -> dict[str, Any]:
        return {"median": r["median"], "ci_low": r["ci"][0], "ci_high": r["ci"][1]}

    ratio_vs_seq = {str(b): figure(summary["ratios"][f"ours|{b}"]["geo_mean"]) for b in cfg["batches"]}
    target = ratio_vs_seq.get(str(TARGET_BATCH))
    methods = [*cfg["methods"], *cfg.get("contenders", [])]
    return {
        "ratio_vs_seq": ratio_vs_seq,
        "ratio_vs_seq_by_method": {
            m: {str(b): figure(summary["ratios"][f"{m}|{b}"]["geo_mean"]) for b in cfg["batches"]}
            for m in methods
        },
        "per_problem": {
            m: {
                str(b): {p: figure(v) for p, v in summary["ratios"][f"{m}|{b}"]["per_problem"].items()}
                for b in cfg["batches"]
            }
            for m in methods
        },
        "long_budget": {
            key: {
                "geo_mean": figure(v["geo_mean"]),
                "per_problem": {p: figure(x) for p, x in v["per_problem"].items()},
            }
            for key, v in summary["long_ratios"].items()
        },
        "target": {
            "batch": TARGET_BATCH,
            "ci_high_at_most": TARGET_RATIO,
            "met": None if target is None else target["ci_high"] <= TARGET_RATIO,
        },
        "config": cfg,
        "engine_parity": results["engine_parity"],
        "wall_s": results["wall_s"],
        "load_avg": results["load_avg"],
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
    parser.add_argument("--problems", help="comma-separated problem names (64-trial runs)")
    parser.add_argument(
        "--long-problems", help="comma-separated problem names of the long runs ('' for none)"
    )
    parser.add_argument("--long-budget", type=int)
    parser.add_argument("--long-unbounded", help="long problems that also run Optuna's unbounded TPE")
    parser.add_argument("--history-limit", type=int, help="K of the long runs")
    parser.add_argument(
        "--contenders", action="store_true", help="also run no_liar and hyperopt (about twice the time)"
    )
    parser.add_argument("--from-raw", type=Path, help="summarise and report an earlier run's sample_raw.json")
    args = parser.parse_args(argv)
    if args.from_raw:
        results = json.loads(args.from_raw.read_text())
        results["summary"] = summarise(results["runs"], results["config"])
        report(results, output_dir(args.out, "sample"))
        return 0
    cfg = _config(args)
    report(_run(cfg, jobs=args.jobs), output_dir(args.out, "sample"))
    return 0


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's plan: the quick or full plan, with the command line's overrides."""
    cfg = plan(args.quick)
    if args.seeds:
        cfg["seeds"] = args.seeds
    if args.budget:
        cfg["budget"] = args.budget
    if args.problems:
        cfg["problems"] = args.problems.split(",")
    if args.long_problems is not None:
        cfg["long_problems"] = [p for p in args.long_problems.split(",") if p]
    if args.long_budget:
        cfg["long_budget"] = args.long_budget
    if args.long_unbounded is not None:
        cfg["long_unbounded"] = [p for p in args.long_unbounded.split(",") if p]
    if args.history_limit:
        cfg["long_history_limit"] = args.history_limit
    if args.contenders:
        cfg["contenders"] = list(CONTENDERS)
        cfg["methods"] = [*cfg["methods"], *CONTENDERS]

    cfg["history_limit"] = cfg.get("long_history_limit") or DEFAULT_HISTORY_LIMIT
    return cfg


def _run(cfg: dict[str, Any], *, jobs: int) -> dict[str, Any]:
    """Check parity, run every (problem, method, batch, seed) in ``jobs`` processes, summarise."""
    load = [{"at": "start", "load_avg": list(os.getloadavg())}]
    log("checking that the asker asks what suggest_batch asks (SQLite storage)")
    parity = verify_engine_parity()
    log(f"engine parity: {parity}")
    if not all(v["identical_params"] for v in parity.values()):
        raise SystemExit(f"the asker does not ask what suggest_batch asks: {parity}")
    tasks = tasks_of(cfg)
    log(f"{len(tasks)} runs on {jobs} processes")
    started = time.time()
    runs: list[dict[str, Any]] = []
    global _HISTORY_LIMIT  # noqa: PLW0603 - read by the forked workers
    _HISTORY_LIMIT = cfg["history_limit"]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for i, r in enumerate(pool.imap_unordered(run_task, tasks, chunksize=1), 1):
            runs.append(r)
            if i % max(1, len(tasks) // 20) == 0:
                load.append({"at": f"{i}/{len(tasks)} runs", "load_avg": list(os.getloadavg())})
                log(f"{i}/{len(tasks)} runs, load {os.getloadavg()[0]:.1f}")
    load.append({"at": "end", "load_avg": list(os.getloadavg())})
    regrets(runs)
    summary = summarise(runs, cfg)
    results = {
        "machine": machine_info(),
        "config": cfg,
        "engine_parity": parity,
        "wall_s": time.time() - started,
        "load_avg": load,
        "summary": summary,
        "runs": runs,
    }
    return results


_HISTORY_LIMIT: int = 500


def run_task(task: tuple[str, str, int, int, int]) -> dict[str, Any]:
    """A task of the plan: long runs (``problem@long``) bound the sampler's history to K."""
    name, method, batch, seed, budget = task
    if not name.endswith("@long"):
        return run_one(task)
    base = name.removesuffix("@long")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    evaluate, space, fopt = problem(base, seed)
    started = time.process_time()
    if method == "seq_tpe":
        values = run_seq_tpe(evaluate, make_spec(space, seed=seed), seed=seed, budget=budget)
    elif method == "random":
        values = run_random(evaluate, make_spec(space, seed=seed), seed=seed, budget=budget)
    else:  # seq_tpe_k (batch 1) and ours: through the asker with the history bound
        spec = make_spec(space, seed=seed, history_limit=_HISTORY_LIMIT)
        values = run_ours(evaluate, spec, seed=seed, budget=budget, batch=batch)
    best, curve = math.inf, []
    for v in values[:budget]:
        best = min(best, v)
        curve.append(best)
    step = max(1, budget // 64)
    return {
        "problem": name,
        "method": method,
        "batch": batch,
        "seed": seed,
        "budget": budget,
        "fopt": fopt,
        "best": best,
        "curve": curve[::step],
        "curve_step": step,
        "regret_at_startup_input": curve[N_STARTUP - 1],
        "cpu_s": time.process_time() - started,
    }


def report(results: dict[str, Any], out: Path) -> str:
    """Print and write the tables, the JSON and the plots."""
    cfg, summary = results["config"], results["summary"]
    stats = summary["stats"]
    methods = [*cfg["methods"]]

    def cell(p: str, m: str, b: int) -> str:
        s = stats.get(f"{p}|{m}|{b}")
        if s is None:
            return ""
        return f"{fmt(s['median'])} [{fmt(s['q25'])}-{fmt(s['q75'])}]"

    def with_ci(r: dict[str, Any]) -> str:
        return f"{fmt(r['median'])} [{fmt(r['ci'][0])}-{fmt(r['ci'][1])}]"

    agg_rows = []
    for b in cfg["batches"]:
        agg_rows.append(
            [
                b,
                *(with_ci(summary["ratios"][f"{m}|{b}"]["geo_mean"]) for m in methods),
                f"{summary['ratios'][f'ours|{b}']['within_target']:.0%}",
            ]
        )
    target = summary["ratios"][f"ours|{TARGET_BATCH}"]["geo_mean"]
    load = results["load_avg"]
    lines = [
        f"Sample efficiency: budget {cfg['budget']} trials, {cfg['seeds']} seeds (paired: same problem "
        f"instance and seed for every method), {len(cfg['problems'])} problems; regret at the budget "
        f"(lower is better). Engine parity check: {results['engine_parity']}. Wall "
        f"{results['wall_s'] / 60:.0f} min; load average {load[0]['load_avg'][0]:.1f} at the start, "
        f"max {max(x['load_avg'][0] for x in load):.1f}, {load[-1]['load_avg'][0]:.1f} at the end.",
        "",
        "Median regret relative to sequential TPE (ratio of medians per problem, geometric mean over "
        "problems, [95 % bootstrap interval, paired per seed]; 1.0 = as good; target for ours at "
        f"B={TARGET_BATCH}: upper bound <= {TARGET_RATIO}). ours: lie `mean` (the default); "
        "ours_worst: lie `worst` (Optuna's constant liar, the previous default):",
        "",
        table(["batch", *(f"{m} / seq" for m in methods), "problems ours within 10%"], agg_rows),
        "",
        f"Target B={TARGET_BATCH}: ours / seq TPE = {with_ci(target)}"
        f" -> {'met' if target['ci'][1] <= TARGET_RATIO else 'missed'}",
        "",
    ]
    if summary["long_ratios"]:
        long_names = [f"{p}@long" for p in cfg["long_problems"]]
        rows = []
        for key, v in summary["long_ratios"].items():
            per = v["per_problem"]
            rows.append(
                [key, with_ci(v["geo_mean"]), *(with_ci(per[p]) if p in per else "" for p in long_names)]
            )
        lines += [
            f"Long runs: {cfg['long_budget']} trials, {cfg['seeds']} seeds; seq_tpe_k (sequential) and ours "
            f"(B={TARGET_BATCH}) bound the sampler's history to K = {cfg['history_limit']} "
            "(sampler.history_limit: the best K/10 and the most recent); seq_tpe is Optuna's TPE on the "
            f"whole history (on {', '.join(cfg['long_unbounded']) or 'none'}). Ratio of median regrets "
            "[95 % paired bootstrap interval]:",
            "",
            table(["ratio", "geo mean", *long_names], rows),
            "",
        ]
        rows = []
        for p in long_names:
            for m, b in (("seq_tpe", 1), ("seq_tpe_k", 1), ("ours", TARGET_BATCH), ("random", 1)):
                cpu = [r["cpu_s"] for r in results["runs"] if r["problem"] == p and r["method"] == m]
                if cpu:
                    rows.append([p, m, b, cell(p, m, b), fmt(statistics.median(cpu))])
        lines += [
            "Long runs: median [25%-75%] regret and median CPU seconds per run:",
            "",
            table(["problem", "method", "B", "regret", "cpu s"], rows),
            "",
        ]
    lines += ["Per problem: median [25%-75%] regret at the budget, and ours / seq TPE [95 % interval]:", ""]
    rows = []
    for p in cfg["problems"]:
        for b in cfg["batches"]:
            rows.append(
                [
                    p,
                    b,
                    cell(p, "seq_tpe", 1) if b == 1 else "",
                    cell(p, "random", 1) if b == 1 else "",
                    *(cell(p, m, b) for m in methods),
                    with_ci(summary["ratios"][f"ours|{b}"]["per_problem"][p]),
                    with_ci(summary["ratios"][f"ours_worst|{b}"]["per_problem"][p])
                    if f"ours_worst|{b}" in summary["ratios"]
                    else "",
                ]
            )
    lines.append(
        table(
            ["problem", "B", "seq TPE", "random", *methods, "ours/seq", "ours_worst/seq"],
            rows,
        )
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
        "ours": "ours (constant liar, lie: mean)",
        "ours_worst": "ours with lie: worst (before)",
        "no_liar": "Optuna, independent asks",
        "hyperopt": "Hyperopt TPE",
    }
    for m, label in labels.items():
        if f"{m}|{cfg['batches'][0]}" not in summary["ratios"]:
            continue
        geo = [summary["ratios"][f"{m}|{b}"]["geo_mean"] for b in cfg["batches"]]
        ax.errorbar(
            cfg["batches"],
            [g["median"] for g in geo],
            yerr=[[g["median"] - g["ci"][0] for g in geo], [g["ci"][1] - g["median"] for g in geo]],
            marker="o",
            capsize=3,
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

    grid = np.array(
        [
            [summary["ratios"][f"ours|{b}"]["per_problem"][p]["median"] for b in cfg["batches"]]
            for p in cfg["problems"]
        ]
    )
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
