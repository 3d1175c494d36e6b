"""Orchestration contenders other than our Airflow pipeline, one per process.

``python -m bench.contenders {optuna,ray,spark} --out result.json ...`` runs N sleeping trials at
parallelism P and writes ``{available, reason, startup_s, wall_s, timings}``. ``optuna`` runs in the
project's ``.venv`` (the reference: ``study.optimize(n_jobs=P)`` on the pipeline's storage); ``ray``
and ``spark`` run in ``.venv-bench``. ``optuna_example`` runs the example study's real objective with
plain Optuna (``.venv``), the reference of the example case. A contender that cannot be imported or
started is reported as unavailable with the reason instead of failing the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from hpo_core.samplers import build_sampler
from hpo_core.space import import_callable, sample_params
from hpo_core.spec import load_spec


def _sleep_record(config: dict[str, Any], contender: str) -> float:
    """Self-contained copy of :func:`bench.objectives.timed_sleep` (pickled by value to Ray/Spark,
    with the standard-library modules it uses pickled by reference)."""
    seconds = float(os.environ.get("HPO_BENCH_TRIAL_SECONDS", "5"))
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    folder = os.environ.get("HPO_BENCH_TIMING_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        record = {"contender": contender, "pid": os.getpid(), "start": start, "end": end}
        with open(os.path.join(folder, f"{uuid.uuid4().hex}.json"), "w") as f:
            f.write(json.dumps(record))
    return float(sum((float(v) - 0.3) ** 2 for v in config.values()))


def run_optuna(args: argparse.Namespace) -> dict[str, Any]:
    """Plain Optuna: ``study.optimize(n_jobs=P)`` with the study's own sampler, on the same storage."""
    import optuna

    from hpo_core.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(args.spec)
    t0 = time.time()
    study = optuna.create_study(
        storage=open_storage(args.storage),
        study_name=f"bench_plain_optuna_{int(t0)}",
        sampler=build_sampler(spec, seed=spec.sampler.seed),
        direction="minimize",
    )
    startup = time.time() - t0

    def objective(trial: optuna.Trial) -> float:
        params = {"x": trial.suggest_float("x", 0, 1), "y": trial.suggest_float("y", 0, 1)}
        return _sleep_record(params, "optuna")

    t1 = time.time()
    study.optimize(objective, n_trials=args.trials, n_jobs=args.parallelism)
    return {"startup_s": startup, "wall_s": time.time() - t1, "started_at": t1}


def run_ray(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Tune with its Optuna searcher, P concurrent trials of one CPU each on a local Ray."""
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    t0 = time.time()
    ray.init(
        num_cpus=args.parallelism,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                k: os.environ[k]
                for k in ("HPO_BENCH_TRIAL_SECONDS", "HPO_BENCH_TIMING_DIR")
                if k in os.environ
            }
        },
    )
    startup = time.time() - t0

    def trainable(config: dict[str, Any]) -> None:
        tune.report({"value": _sleep_record(config, "ray")})

    searcher = ConcurrencyLimiter(
        OptunaSearch(metric="value", mode="min", seed=1), max_concurrent=args.parallelism
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"x": tune.uniform(0, 1), "y": tune.uniform(0, 1)},
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=args.trials, max_concurrent_trials=args.parallelism
        ),
        run_config=tune.RunConfig(storage_path=str(Path(args.workdir).resolve() / "ray_results"), verbose=0),
    )
    t1 = time.time()
    results = tuner.fit()
    wall = time.time() - t1
    errors = sum(1 for r in results if r.error is not None)
    ray.shutdown()
    return {"startup_s": startup, "wall_s": wall, "started_at": t1, "errors": errors}


def run_spark(args: argparse.Namespace) -> dict[str, Any]:
    """Hyperopt TPE with SparkTrials(parallelism=P) on a local Spark (``local[P]``)."""
    from hyperopt import SparkTrials, fmin, hp, tpe
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this venv's hyperopt
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    t0 = time.time()
    spark = (
        SparkSession.builder.master(f"local[{args.parallelism}]")
        .appName("hpo-bench")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.local.dir", str(Path(args.workdir).resolve() / "spark-local"))
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    trials = SparkTrials(parallelism=args.parallelism, spark_session=spark)
    startup = time.time() - t0

    def objective(config: dict[str, Any]) -> float:
        return _sleep_record(config, "spark")

    t1 = time.time()
    fmin(
        objective,
        {"x": hp.uniform("x", 0, 1), "y": hp.uniform("y", 0, 1)},
        algo=tpe.suggest,
        max_evals=args.trials,
        trials=trials,
        rstate=np.random.default_rng(1),
        show_progressbar=False,
    )
    wall = time.time() - t1
    spark.stop()
    return {"startup_s": startup, "wall_s": wall, "started_at": t1}


def run_optuna_example(args: argparse.Namespace) -> dict[str, Any]:
    """Plain Optuna on the example study: its objective over its space, ``study.optimize(n_jobs=P)``.

    The study's own sampler and pruner on the same storage; each trial's params come from
    ``hpo_core.space.sample_params`` and the objective is called as the pipeline's worker calls it
    (``call_objective`` with a ``TrialContext``), inside an MLflow run of its own as an Optuna user
    logging to MLflow would do, so that metrics, lineage and the model are logged as in the pipeline.
    """
    import mlflow
    import optuna
    from mlflow.entities import Metric, Param

    from hpo_core.objective import TrialContext, call_objective, normalize_result
    from hpo_core.samplers.pruners import build_pruner
    from hpo_core.storage import open_storage
    from hpo_core.tracking.runs import flat_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(args.spec)
    t0 = time.time()
    func = import_callable(spec.objective)  # the pipeline's slot imports it before its trials too
    mlflow.set_tracking_uri(args.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=args.tracking_uri)
    experiment_id = client.create_experiment(
        f"{spec.name}_plain_optuna_{int(t0)}",
        artifact_location=(Path(args.workdir).resolve() / "mlartifacts").as_uri(),
    )
    study = optuna.create_study(
        storage=open_storage(args.storage),
        study_name=f"bench_plain_optuna_{spec.name}_{int(t0)}",
        sampler=build_sampler(spec, seed=spec.sampler.seed),
        pruner=build_pruner(spec),
        directions=spec.all_directions,
    )
    startup = time.time() - t0
    seed = spec.sampler.seed or 0
    durations: list[float] = []

    def objective(trial: optuna.Trial) -> Any:
        start = time.time()
        params = sample_params(spec, trial)
        run = client.create_run(experiment_id, run_name=f"trial {trial.number}")
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in flat_params(params).items()])
        try:
            with mlflow.start_run(run_id=run_id):  # the fluent run is per thread
                ctx = TrialContext(
                    trial=trial,
                    spec=spec,
                    params=params,
                    seed=seed * 100_003 + trial.number,
                    round_number=0,
                    mlflow_run_id=run_id,
                    mlflow_client=client,
                )
                values, extra = normalize_result(spec, call_objective(func, ctx, trial))
                now = int(time.time() * 1000)
                metrics = dict(zip(spec.objective_metrics, values, strict=True)) | extra
                client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        finally:
            durations.append(time.time() - start)
        return values[0] if len(values) == 1 else values

    t1 = time.time()
    study.optimize(objective, n_trials=args.trials, n_jobs=args.parallelism)
    wall = time.time() - t1
    states = [t.state.name for t in study.trials]
    complete = [t.value for t in study.trials if t.state.name == "COMPLETE"]
    maximize = spec.all_directions[0] == "maximize"
    return {
        "startup_s": startup,
        "wall_s": wall,
        "started_at": t1,
        "trial_s_mean": sum(durations) / len(durations) if durations else None,
        "trial_states": {s: states.count(s) for s in sorted(set(states))},
        "best_value": (max if maximize else min)(complete) if complete else None,
    }


RUNNERS = {"optuna": run_optuna, "ray": run_ray, "spark": run_spark, "optuna_example": run_optuna_example}


def main(argv: list[str] | None = None) -> int:
    """Run one contender and write its result JSON (``available: false`` with the reason on error)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contender", choices=sorted(RUNNERS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--parallelism", type=int, required=True)
    parser.add_argument("--spec", help="study YAML (optuna: its sampler)")
    parser.add_argument("--storage", help="Optuna storage URL (optuna, optuna_example)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (optuna_example)")
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"contender": args.contender, "available": True, "reason": None}
    try:
        result.update(RUNNERS[args.contender](args))
    except Exception as e:
        first_line = str(e).splitlines()[0][:300] if str(e) else ""
        result.update(available=False, reason=f"{type(e).__name__}: {first_line}")
        traceback.print_exc()
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
