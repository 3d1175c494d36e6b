"""Scale: what the control tasks cost as a study grows, and a big study folder's DAG files (issue 11).

Every figure is a cold process (a fresh interpreter, as an Airflow task or the DAG processor pays
it), run on PostgreSQL, several times (median):

1. ``suggest(32)`` at 100, 1,000 and 10,000 finished trials, split into loading the study, storage
   reads, the sampler (TPE and the rest of the in-memory asker), storage writes and the rest; one
   cProfile dump of the largest size. Targets: <= 1 s at 10,000 and <= 1.5x the 100-trial figure.
2. ``suggest(1,000)`` against ``suggest(100)``: one round 1,000 wide and one 100 wide on the same
   history (1,000 finished trials). Target: ratio <= 12.
3. ``observe`` of the 1,000-wide round once its 1,000 trials finished. Target: <= 5 s.
4. ``finalize`` and ``hpo summary`` (``study_summary``) of the 10,000-trial study. Target: <= 2 s each.
5. A worker's start on the 10,000-trial study (slot open, ``resolve_trial``, claim): seconds, and the
   rows ``resolve_trial`` reads (the same at every size: it reads its trial only).
6. 500 study files over N thin DAG files (``load_study_dags(globals(), shard=(i, N))``): per DAG
   file, parse (DagBag over that file) + serialize every DAG. Target: every file < 5 s.

Studies are started with ``start_study`` as the ``start`` task does; their finished trials are bulk
inserted with the attributes real trials carry (``hpo.round``, ``hpo.run_id``, ... so they count as
the run's own). MLflow: a tracking server (PostgreSQL backend store, S3 artifacts on moto) from
``tests/services.py``, or a SQLite store with ``--mlflow sqlite``.

Run with ``bench/run.sh scale [--quick] [--publish]`` (project ``.venv``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy
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
    working_tree_changes,
    write_json,
)
from hpo_core.deployment import Deployment
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.space import sample_params
from hpo_core.spec import StudySpec, validate_mapping
from tests.services import MLflowServer, MotoS3Server, PostgresServer, ServiceStartError

EXAMPLE_STUDY = REPO_ROOT / "dags" / "studies" / "breast_cancer_gbm.yaml"
RESULT_PREFIX = "BENCH_RESULT "
RUN_ID = "bench"
#: Issue 11's targets (seconds unless a ratio).
TARGET_SUGGEST_S = 1.0
TARGET_SUGGEST_RATIO = 1.5
TARGET_WIDE_RATIO = 12.0
TARGET_OBSERVE_S = 5.0
TARGET_FINALIZE_S = 2.0
TARGET_SUMMARY_S = 2.0
TARGET_PARSE_FILE_S = 5.0
#: How suggest's time is reported (the probe's buckets, in this order; ``other`` is the rest).
SPLIT = ("load study", "storage reads", "sampler: TPE", "sampler: rest", "storage writes", "other")
CONTROL_SPLIT = (
    "load study",
    "storage reads",
    "storage writes",
    "plots: history",
    "plots: parallel coordinates",
    "plots: fANOVA",
    "plots: rest",
    "mlflow",
    "other",
)
#: Most rows ``resolve_trial`` may read to count as reading its trial only (the trial, its values,
#: params and attributes: about 15), whatever the study's size.
TARGET_RESOLVE_ROWS = 50
THIN_DAG_FILE = "from hpo_airflow import load_study_dags\n\nload_study_dags(globals(), shard=({i}, {n}))\n"


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (full or ``--quick``)."""

    sizes: tuple[int, ...]
    repeats: int
    narrow: int
    wide: int
    wide_history: int
    study_files: int
    shards: tuple[int, ...]
    max_shards: int


FULL = Plan(
    sizes=(100, 1000, 10000),
    repeats=5,
    narrow=100,
    wide=1000,
    wide_history=1000,
    study_files=500,
    shards=(1, 8),
    max_shards=64,
)
QUICK = Plan(
    sizes=(100, 1000),
    repeats=2,
    narrow=20,
    wide=200,
    wide_history=200,
    study_files=40,
    shards=(1, 4),
    max_shards=8,
)


# --- probes ---------------------------------------------------------------------------------------


class Probes:
    """Runs ``bench.scale_probe`` in fresh interpreters with the deployment's environment."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path

    def run(self, args: list[str], timeout: float = 1800) -> dict[str, Any]:
        """One probe; its result (or ``error``), with the process's wall time and the load average."""
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "MLFLOW_", "HPO_"))},
            **self.env,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "plugins")]),
        }
        load = os.getloadavg()[0]
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
        with self.log_path.open("a") as f:
            f.write(f"$ {' '.join(args)}\n{proc.stdout[-20000:]}\n--- stderr ---\n{proc.stderr[-20000:]}\n")
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_PREFIX):
                result = dict(json.loads(line.removeprefix(RESULT_PREFIX)))
                return {**result, "process_s": total, "load_1m": load}
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        log(f"probe {args[0]} failed: exit {proc.returncode}: {tail[0]}")
        return {"error": f"exit {proc.returncode}: {tail[0]}", "process_s": total, "load_1m": load}


def median_of(results: Sequence[dict[str, Any]], key: str = "seconds") -> float | None:
    """Median of ``key`` over the probes that succeeded."""
    values = [r[key] for r in results if "error" not in r and r.get(key) is not None]
    return statistics.median(values) if values else None


def median_split(results: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """Per bucket, the median over the repeats (a bucket a probe did not use counts as 0)."""
    ok = [r for r in results if "error" not in r and r.get("split_s")]
    return {k: statistics.median(r["split_s"].get(k, 0.0) for r in ok) for k in keys} if ok else {}


def summarize(results: Sequence[dict[str, Any]], split: Sequence[str] = ()) -> dict[str, Any]:
    """Median, spread and split of a figure's repeats, plus its import time and SQL counts."""
    ok = [r for r in results if "error" not in r]
    seconds = [r["seconds"] for r in ok]
    out: dict[str, Any] = {
        "seconds": median_of(ok),
        "min_s": min(seconds, default=None),
        "max_s": max(seconds, default=None),
        "repeats": len(ok),
        "errors": [r["error"] for r in results if "error" in r],
        "import_s": median_of(ok, "import_s"),
        "process_s": median_of(ok, "process_s"),
        "statements": median_of(ok, "statements"),
        "rows_read": median_of(ok, "rows_read"),
        "db_s": median_of(ok, "db_s"),
    }
    if split:
        out["split_s"] = median_split(ok, split)
    return out


# --- studies --------------------------------------------------------------------------------------


def scale_spec(name: str, *, batch_size: int, n_trials: int) -> StudySpec:
    """The example study's search problem with the benchmark's budget, without a registered model.

    Only the search problem comes from the example (seven parameters, one conditional,
    multivariate TPE with constant liar, ``history_limit`` at its default); no stopping rule, and
    no ``mlflow.registered_model``, so ``finalize`` registers nothing.
    """
    example = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw = {
        k: example[k] for k in ("objective", "direction", "metric", "search_space", "sampler") if k in example
    }
    raw["name"] = name
    raw["budget"] = {
        "n_trials": n_trials,
        "batch_size": batch_size,
        "max_rounds": 200,
        "max_batch_size": 1024,
    }
    raw["mlflow"] = {"experiment": "bench_scale"}
    return validate_mapping(raw, source="bench.scale")


def synthetic_value(params: dict[str, Any]) -> float:
    """A smooth stand-in for ROC AUC so that TPE sees structure."""
    lr = math.log10(params["learning_rate"])
    return (
        0.99
        - 0.01 * (lr + 1.2) ** 2
        - 0.001 * abs(params["max_depth"] - 5)
        - 0.0005 * (params["max_iter"] == 50)
    )


class BenchStudy:
    """A study started as the ``start`` task starts it, grown and trimmed in bulk by the benchmark."""

    def __init__(
        self,
        spec: StudySpec,
        deployment: Deployment,
        *,
        study_name: str,
        overrides: dict[str, Any] | None = None,
        n_trials: int | None = None,
    ) -> None:
        import optuna

        from hpo_core.storage import open_storage
        from hpo_core.study.start import start_study

        handle = start_study(
            spec,
            deployment=deployment,
            dag_id=spec.dag_id,
            run_id=RUN_ID,
            overrides=overrides,
            study_name=study_name,
        )
        self.spec, self.name = spec, handle["study_name"]
        self.storage = open_storage(deployment.storage_url)
        self.study = optuna.load_study(study_name=self.name, storage=self.storage)
        self.study_id = self.storage.get_study_id_from_name(self.name)
        self.run_config = dict(self.study.user_attrs[StudyAttr.RUN_CONFIG])
        if n_trials is not None:
            # The budget check's only input is the stored run config: a study past max_rounds x
            # batch_size (6,400 trials in rounds of 32) needs a larger n_trials than a spec allows.
            self.run_config["n_trials"] = n_trials
            self.study.set_user_attr(StudyAttr.RUN_CONFIG, self.run_config)

    def count(self) -> int:
        """Trials in the study."""
        from optuna.storages._rdb import models

        trials = models.TrialModel.__table__
        with self.storage.engine.connect() as conn:
            query = sqlalchemy.select(sqlalchemy.func.count()).where(trials.c.study_id == self.study_id)
            return int(conn.execute(query).scalar_one())

    def insert_finished(self, count: int, *, per_round: int, seed: int) -> float:
        """Insert ``count`` COMPLETE trials as the pipeline leaves them; the seconds it took.

        Params drawn at random from the search space (conditional included), a synthetic value,
        and the trial's attributes: round, batch index, slot, DAG and run ids, worker, heartbeat,
        MLflow run, metrics, and TPE's relative-params system attribute.
        """
        import optuna
        from optuna.distributions import distribution_to_json
        from optuna.storages._rdb import models
        from optuna.trial import TrialState

        t0 = time.perf_counter()
        rng = random.Random(seed)
        draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        start = self.count()
        now = dt.datetime.now()
        trials, children = [], []
        for i in range(count):
            trial = draw.ask()
            params = sample_params(self.spec, trial)
            number = start + i
            value = synthetic_value(params) + rng.gauss(0, 0.002)
            trials.append(
                {
                    "number": number,
                    "study_id": self.study_id,
                    "state": TrialState.COMPLETE,
                    "datetime_start": now,
                    "datetime_complete": now,
                }
            )
            attrs = {
                TrialAttr.ROUND: number // per_round + 1,
                TrialAttr.BATCH_INDEX: number % per_round,
                TrialAttr.MAP_INDEX: number % per_round,
                TrialAttr.DAG_ID: self.spec.dag_id,
                TrialAttr.RUN_ID: RUN_ID,
                TrialAttr.WORKER: {"host": "bench", "pid": 1, "attempt": 1, "started_at": time.time()},
                TrialAttr.HEARTBEAT: time.time(),
                TrialAttr.MLFLOW_RUN: f"{number:032x}",
                TrialAttr.METRICS: {self.spec.score_metric: value},
            }
            children.append((params, trial.distributions, value, attrs))
        tables = {
            "trials": models.TrialModel.__table__,
            "params": models.TrialParamModel.__table__,
            "values": models.TrialValueModel.__table__,
            "user": models.TrialUserAttributeModel.__table__,
            "system": models.TrialSystemAttributeModel.__table__,
        }
        finite = models.TrialValueModel.TrialValueType.FINITE
        with self.storage.engine.begin() as conn:
            ids = (
                conn.execute(
                    sqlalchemy.insert(tables["trials"]).returning(
                        tables["trials"].c.trial_id, sort_by_parameter_order=True
                    ),
                    trials,
                )
                .scalars()
                .all()
            )
            params_rows, value_rows, user_rows, system_rows = [], [], [], []
            for tid, (params, dists, value, attrs) in zip(ids, children, strict=True):
                params_rows += [
                    {
                        "trial_id": tid,
                        "param_name": k,
                        "param_value": dists[k].to_internal_repr(v),
                        "distribution_json": distribution_to_json(dists[k]),
                    }
                    for k, v in params.items()
                ]
                value_rows.append({"trial_id": tid, "objective": 0, "value": value, "value_type": finite})
                user_rows += [
                    {"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()
                ]
                system_rows.append(
                    {
                        "trial_id": tid,
                        "key": f"tpe:relative_params:{self.study_id}",
                        "value_json": json.dumps(json.dumps(params)),
                    }
                )
            conn.execute(sqlalchemy.insert(tables["params"]), params_rows)
            conn.execute(sqlalchemy.insert(tables["values"]), value_rows)
            conn.execute(sqlalchemy.insert(tables["user"]), user_rows)
            conn.execute(sqlalchemy.insert(tables["system"]), system_rows)
        if self.count() != start + count:
            raise RuntimeError(
                f"bulk insert: expected {start + count} trials, the storage has {self.count()}"
            )
        return time.perf_counter() - t0

    def drop_from(self, number: int) -> int:
        """Delete the trials numbered ``number`` and up (a probe's batch); how many were deleted."""
        from optuna.storages._rdb import models

        trials = models.TrialModel.__table__
        ids = sqlalchemy.select(trials.c.trial_id).where(
            trials.c.study_id == self.study_id, trials.c.number >= number
        )
        with self.storage.engine.begin() as conn:
            for model in (
                models.TrialParamModel,
                models.TrialValueModel,
                models.TrialUserAttributeModel,
                models.TrialSystemAttributeModel,
                models.TrialIntermediateValueModel,
                models.TrialHeartbeatModel,
            ):
                table = model.__table__
                conn.execute(sqlalchemy.delete(table).where(table.c.trial_id.in_(ids)))
            deleted = conn.execute(
                sqlalchemy.delete(trials).where(trials.c.study_id == self.study_id, trials.c.number >= number)
            ).rowcount
        return int(deleted)

    def finish(self, numbers: Sequence[int]) -> None:
        """Close the RUNNING trials ``numbers`` as COMPLETE with a value, as their workers would.

        In one transaction: state, value, and the attributes a worker writes (worker, heartbeat,
        MLflow run id, metrics).
        """
        from optuna.storages._rdb import models
        from optuna.trial import TrialState

        from hpo_core.storage import trials as stored

        found = stored.read_trials(self.study, numbers=list(numbers), user_attrs=())
        trials = models.TrialModel.__table__
        user = models.TrialUserAttributeModel.__table__
        keys = (TrialAttr.WORKER, TrialAttr.HEARTBEAT, TrialAttr.MLFLOW_RUN, TrialAttr.METRICS)
        values, attrs = [], []
        for t in found:
            tid, value = stored.trial_id(t), synthetic_value(t.params)
            values.append(
                {
                    "trial_id": tid,
                    "objective": 0,
                    "value": value,
                    "value_type": models.TrialValueModel.TrialValueType.FINITE,
                }
            )
            worker = {"host": "bench", "pid": 1, "attempt": 1, "started_at": time.time()}
            for key, item in zip(
                keys,
                (worker, time.time(), f"{t.number:032x}", {self.spec.score_metric: value}),
                strict=True,
            ):
                attrs.append({"trial_id": tid, "key": key, "value_json": json.dumps(item)})
        ids = [v["trial_id"] for v in values]
        with self.storage.engine.begin() as conn:
            conn.execute(
                sqlalchemy.update(trials)
                .where(trials.c.trial_id.in_(ids))
                .values(state=TrialState.COMPLETE, datetime_complete=dt.datetime.now())
            )
            conn.execute(sqlalchemy.delete(user).where(user.c.trial_id.in_(ids), user.c.key.in_(keys)))
            conn.execute(sqlalchemy.insert(models.TrialValueModel.__table__), values)
            conn.execute(sqlalchemy.insert(user), attrs)

    def forget_round(self, round_number: int) -> None:
        """Remove what ``observe`` stored for the round (its summary, stop reason, unlogged rounds),
        so the next ``observe`` of the round does the whole work again instead of finding it done."""
        from optuna.storages._rdb import models

        table = models.StudyUserAttributeModel.__table__
        keys = [f"{StudyAttr.ROUND_SUMMARY_PREFIX}{round_number}", StudyAttr.STOP, StudyAttr.ROUNDS_UNLOGGED]
        with self.storage.engine.begin() as conn:
            conn.execute(
                sqlalchemy.delete(table).where(table.c.study_id == self.study_id, table.c.key.in_(keys))
            )


# --- the parts ------------------------------------------------------------------------------------


def repeat(
    times: int, run: Callable[[], dict[str, Any]], after: Callable[[], object] | None = None
) -> list[dict[str, Any]]:
    """``run`` ``times`` times, ``after`` each (the clean-up that makes the next repeat the same)."""
    out = []
    for _ in range(times):
        out.append(run())
        if after is not None:
            after()
    return out


def suggest_probe(probes: Probes, study: BenchStudy, round_number: int, **extra: str) -> dict[str, Any]:
    """One cold ``suggest`` of the study's next round; an error if it did not ask the whole batch."""
    args = ["suggest", "--study", study.name, "--round", str(round_number), "--dag-id", study.spec.dag_id]
    for key, value in extra.items():
        args += [f"--{key}", value]
    res = probes.run(args)
    want = int(study.run_config["batch_size"])
    if "error" not in res and res.get("batch") != want:
        res["error"] = f"asked {res.get('batch')} trials, not {want} (skip reason: {res.get('skip_reason')})"
    return res


def growth(probes: Probes, deployment: Deployment, plan: Plan, out: Path) -> dict[str, Any]:
    """Suggest, summary and the worker's start at each size; the profile and finalize at the largest."""
    spec = scale_spec("bench_scale", batch_size=32, n_trials=6400)
    study = BenchStudy(spec, deployment, study_name="bench_scale.growth", n_trials=10**7)
    rows: list[dict[str, Any]] = []
    out_part: dict[str, Any] = {"study": study.name, "rows": rows}
    for size in plan.sizes:
        inserted = study.insert_finished(size - study.count(), per_round=32, seed=size)
        log(f"growth: {size} finished trials (insert {inserted:.1f} s)")
        next_round = size // 32 + 2
        suggests = repeat(
            plan.repeats,
            functools.partial(suggest_probe, probes, study, next_round),
            functools.partial(study.drop_from, size),
        )
        kept = suggest_probe(probes, study, next_round)  # a batch left RUNNING for the worker
        first = min(kept.get("trial_numbers") or [size])
        workers = repeat(
            plan.repeats,
            functools.partial(probes.run, ["worker", "--study", study.name, "--trial", str(first)]),
        )
        study.drop_from(size)
        summaries = repeat(plan.repeats, functools.partial(probes.run, ["summary", "--study", study.name]))
        row: dict[str, Any] = {
            "finished_trials": size,
            "suggest": summarize(suggests, SPLIT),
            "suggest_runs": suggests,
            "worker": summarize(workers),
            "worker_resolve_s": median_of(workers, "resolve_s"),
            "worker_open_s": median_of(workers, "open_s"),
            "worker_claim_s": median_of(workers, "claim_s"),
            "worker_resolve_rows_read": median_of(workers, "resolve_rows_read"),
            "worker_resolve_statements": median_of(workers, "resolve_statements"),
            "worker_runs": workers,
            "summary": summarize(summaries, CONTROL_SPLIT),
            # The inserted trials count as the run's own: hpo summary counts them all.
            "summary_counted": next((r["trials"]["counted"] for r in summaries if "error" not in r), None),
            "summary_runs": summaries,
        }
        if size == plan.sizes[-1]:
            profile = out / f"suggest_profile_{size}.prof"
            profiled = suggest_probe(probes, study, next_round, profile=str(profile))
            study.drop_from(size)
            row["profiled_suggest_s"] = profiled.get("seconds")
            out_part["profile_top"] = top_functions(profile)
            finals = repeat(plan.repeats, functools.partial(probes.run, ["finalize", "--study", study.name]))
            row["finalize"] = summarize(finals, CONTROL_SPLIT)
            row["finalize_first_s"] = finals[0].get("seconds")
            row["finalize_runs"] = finals
        log(
            f"growth {size}: suggest {fmt(row['suggest']['seconds'])} s, summary "
            f"{fmt(row['summary']['seconds'])} s, worker start {fmt(row['worker']['seconds'])} s "
            f"(resolve reads {fmt(row['worker_resolve_rows_read'])} rows)"
            + (f", finalize {fmt(row['finalize']['seconds'])} s" if "finalize" in row else "")
        )
        rows.append(row)
    return out_part


def wide(probes: Probes, deployment: Deployment, plan: Plan) -> dict[str, Any]:
    """suggest of one round ``narrow`` and ``wide`` wide on the same history; observe of the wide one."""
    spec = scale_spec("bench_wide", batch_size=plan.narrow, n_trials=200 * plan.narrow)
    history = plan.wide_history
    round_number = history // plan.narrow + 1
    out: dict[str, Any] = {"history": history, "round": round_number}
    wide_study = None
    for width in (plan.narrow, plan.wide):
        study = BenchStudy(
            spec, deployment, study_name=f"bench_wide.w{width}", overrides={"batch_size": width}
        )
        study.insert_finished(history, per_round=plan.narrow, seed=7)  # the same trials in both studies
        runs = repeat(
            plan.repeats,
            functools.partial(suggest_probe, probes, study, round_number),
            functools.partial(study.drop_from, history),
        )
        out[str(width)] = {"suggest": summarize(runs, SPLIT), "suggest_runs": runs}
        log(
            f"wide: suggest({width}) on {history} finished trials: "
            f"{fmt(out[str(width)]['suggest']['seconds'])} s"
        )
        wide_study = study
    assert wide_study is not None
    kept = suggest_probe(probes, wide_study, round_number)
    numbers = kept.get("trial_numbers") or []
    wide_study.finish(numbers)
    observes = repeat(
        plan.repeats,
        functools.partial(probes.run, ["observe", "--study", wide_study.name, "--round", str(round_number)]),
        functools.partial(wide_study.forget_round, round_number),
    )
    out["observe"] = summarize(observes, CONTROL_SPLIT)
    out["observe_runs"] = observes
    out["observe_round_trials"] = median_of(observes, "round_trials")
    log(f"wide: observe of {len(numbers)} finished trials: {fmt(out['observe']['seconds'])} s")
    return out


def parse(probes: Probes, work: Path, plan: Plan) -> dict[str, Any]:
    """Parse + serialize each DAG file of ``plan.study_files`` studies split over N thin DAG files."""
    root = work / "parse"
    shutil.rmtree(root, ignore_errors=True)
    studies = root / "studies"
    studies.mkdir(parents=True)
    text = EXAMPLE_STUDY.read_text()
    for i in range(plan.study_files):
        (studies / f"study_{i:03d}.yaml").write_text(
            text.replace("name: breast_cancer_gbm", f"name: study_{i:03d}", 1)
        )
    out: dict[str, Any] = {"study_files": plan.study_files, "shards": {}}
    promotion = root / "promotion"
    promotion.mkdir()
    shutil.copy(REPO_ROOT / "dags" / "hpo_promotion.py", promotion / "hpo_promotion.py")
    out["promotion_dag"] = probes.run(["parse", "--dag-file", str(promotion / "hpo_promotion.py")])
    counts = list(plan.shards)
    while counts:
        n = counts.pop(0)
        folder = root / f"n{n}"
        folder.mkdir()
        (folder / "studies").symlink_to(studies, target_is_directory=True)
        files = []
        for i in range(n):
            dag_file = folder / f"hpo_studies_{i}.py"
            dag_file.write_text(THIN_DAG_FILE.format(i=i, n=n))
            res = probes.run(["parse", "--dag-file", str(dag_file)])
            res["file"] = dag_file.name
            files.append(res)
        ok = [f for f in files if "error" not in f]
        worst = max((f["seconds"] for f in ok), default=None)
        out["shards"][str(n)] = {
            "files": files,
            "max_file_s": worst,
            "mean_file_s": statistics.fmean(f["seconds"] for f in ok) if ok else None,
            "max_parse_s": max((f["parse_s"] for f in ok), default=None),
            "max_serialize_s": max((f["serialize_s"] for f in ok), default=None),
            "max_studies": max((f["dags"] for f in ok), default=None),
            "dags": sum(f["dags"] for f in ok),
            "import_errors": sum(len(f.get("import_errors") or {}) for f in ok),
            "errors": [f["error"] for f in files if "error" in f],
            "import_airflow_s": median_of(ok, "import_s"),
        }
        log(f"parse: {plan.study_files} studies over {n} DAG file(s): max {fmt(worst)} s per file")
        met = worst is not None and worst < TARGET_PARSE_FILE_S and len(ok) == n
        if not counts and n > 1 and not met and n * 2 <= plan.max_shards:
            counts.append(n * 2)  # look for the smallest count that meets the target
    out["dagbag_import_timeout_s"] = next(
        (
            f["dagbag_import_timeout_s"]
            for s in out["shards"].values()
            for f in s["files"]
            if "error" not in f
        ),
        None,
    )
    meeting = [
        int(n)
        for n, s in out["shards"].items()
        if s["max_file_s"] is not None and s["max_file_s"] < TARGET_PARSE_FILE_S
    ]
    out["smallest_shards_meeting_target"] = min(meeting, default=None)
    return out


# --- tracking -------------------------------------------------------------------------------------


def tracking(
    stack: contextlib.ExitStack, pg: PostgresServer, work: Path, mode: str
) -> tuple[dict[str, str], str]:
    """The MLflow environment the probes get and what it is: a tracking server, else SQLite."""
    import mlflow

    if mode == "server":
        try:
            (work / "moto").mkdir(parents=True, exist_ok=True)
            s3 = stack.enter_context(MotoS3Server(workdir=work / "moto"))
            server = stack.enter_context(
                MLflowServer(
                    backend_store_uri=pg.create_database("bench_scale_mlflow"), s3=s3, workdir=work / "mlflow"
                )
            )
            what = (
                f"MLflow {mlflow.__version__} tracking server (tests/services.py: PostgreSQL backend store, "
                f"artifacts on a moto S3 server, not proxied; started in {server.startup_seconds:.0f} s)"
            )
            return server.env(), what
        except ServiceStartError as e:
            log(f"MLflow server did not start, using a SQLite store: {str(e)[:300]}")
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "HPO_ARTIFACT_ROOT": (work / "mlartifacts").as_uri(),
    }
    return env, f"MLflow {mlflow.__version__} SQLite tracking store under the output folder, local artifacts"


# --- driver ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the scale benchmark and write ``scale.json`` (headline), ``scale_raw.json``, tables, plots."""
    parser = argparse.ArgumentParser(description="Scale benchmark (issue 11)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of a few minutes")
    parser.add_argument("--out")
    parser.add_argument("--parts", default="growth,wide,parse", help="comma-separated subset")
    parser.add_argument("--repeats", type=int, help="cold runs per figure (median)")
    parser.add_argument("--mlflow", choices=("server", "sqlite"), default="server")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.repeats:
        plan = Plan(**{**asdict(plan), "repeats": args.repeats})
    parts = args.parts.split(",")
    out = output_dir(args.out, "scale").resolve()  # absolute: URLs, symlinks and probes use its paths
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.time()
    results: dict[str, Any] = {
        "machine_start": machine_info(),
        "plan": asdict(plan),
        "quick": args.quick,
        "working_tree_changes": working_tree_changes(["hpo_core", "plugins", "dags"]),
    }
    load_samples: list[float] = []
    with PostgresServer() as pg, contextlib.ExitStack() as stack:
        storage_url = pg.create_database("bench_scale_optuna")
        results["postgres"] = (
            "private server" if pg.private else f"the machine's server at {pg.host}:{pg.port}"
        )
        mlflow_env, results["mlflow"] = (
            tracking(stack, pg, work, args.mlflow) if {"growth", "wide"} & set(parts) else ({}, None)
        )
        env = {
            "HPO_STORAGE_URL": storage_url,
            "HPO_HOME": str(work / "hpo_home"),
            "AIRFLOW_HOME": str(work / "airflow_home"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            **mlflow_env,
        }
        os.environ.update({k: v for k, v in env.items() if not k.startswith("AIRFLOW")})
        deployment = Deployment.from_env(env)
        probes = Probes(env, work / "probes.log")
        for part in ("growth", "wide", "parse"):
            if part not in parts:
                continue
            load_samples.append(os.getloadavg()[0])
            t0 = time.time()
            if part == "growth":
                results["growth"] = growth(probes, deployment, plan, out)
            elif part == "wide":
                results["wide"] = wide(probes, deployment, plan)
            else:
                results["parse"] = parse(probes, work, plan)
            results.setdefault("part_minutes", {})[part] = (time.time() - t0) / 60
    load_samples.append(os.getloadavg()[0])
    results["machine_end"] = machine_info()
    results["load_1m_at_parts"] = load_samples
    results["wall_minutes"] = (time.time() - started) / 60
    report(results, out)
    return 0


# --- report ---------------------------------------------------------------------------------------


def target(value: float | None, limit: float, text: str) -> dict[str, Any]:
    """A target's entry: its value, the target and whether it is met (``None``: not measured)."""
    return {"value": value, "target": text, "met": None if value is None else value <= limit}


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The published figures (``bench/results/scale.json``): medians of cold runs, targets, machine."""
    m = results["machine_start"]
    out: dict[str, Any] = {
        "date": m.get("date"),
        "git_commit": m.get("git_commit"),
        "working_tree_changes": results.get("working_tree_changes"),
        "quick": results.get("quick"),
        "repeats": results["plan"]["repeats"],
        "postgres": results.get("postgres"),
        "mlflow": results.get("mlflow"),
        "wall_minutes": results.get("wall_minutes"),
        "load_1m_at_parts": results.get("load_1m_at_parts"),
        "machine_start": m,
        "machine_end": results.get("machine_end"),
    }
    targets: dict[str, Any] = {}
    if "growth" in results:
        rows = results["growth"]["rows"]
        small, big = rows[0], rows[-1]
        s, b = small["finished_trials"], big["finished_trials"]
        out["suggest_s"] = {str(r["finished_trials"]): r["suggest"]["seconds"] for r in rows}
        out["suggest_import_s"] = {str(r["finished_trials"]): r["suggest"]["import_s"] for r in rows}
        out["suggest_process_s"] = {str(r["finished_trials"]): r["suggest"]["process_s"] for r in rows}
        out["suggest_split_s"] = {str(r["finished_trials"]): r["suggest"].get("split_s") for r in rows}
        out["suggest_rows_read"] = {str(r["finished_trials"]): r["suggest"]["rows_read"] for r in rows}
        ratio = _ratio(big["suggest"]["seconds"], small["suggest"]["seconds"])
        out[f"ratio_{b}_{s}"] = ratio
        targets[f"suggest_s_{b}"] = target(
            big["suggest"]["seconds"], TARGET_SUGGEST_S, f"<= {TARGET_SUGGEST_S:g}"
        )
        targets[f"ratio_{b}_{s}"] = target(ratio, TARGET_SUGGEST_RATIO, f"<= {TARGET_SUGGEST_RATIO:g}")
        out["summary_s"] = {str(r["finished_trials"]): r["summary"]["seconds"] for r in rows}
        out[f"summary_{b}_s"] = big["summary"]["seconds"]
        targets[f"summary_{b}_s"] = target(
            big["summary"]["seconds"], TARGET_SUMMARY_S, f"<= {TARGET_SUMMARY_S:g}"
        )
        if "finalize" in big:
            out[f"finalize_{b}_s"] = big["finalize"]["seconds"]
            out[f"finalize_{b}_first_s"] = big.get("finalize_first_s")
            targets[f"finalize_{b}_s"] = target(
                big["finalize"]["seconds"], TARGET_FINALIZE_S, f"<= {TARGET_FINALIZE_S:g}"
            )
        out["worker_start_s"] = {str(r["finished_trials"]): r["worker"]["seconds"] for r in rows}
        out["worker_resolve_s"] = {str(r["finished_trials"]): r["worker_resolve_s"] for r in rows}
        out["worker_resolve_rows_read"] = {
            str(r["finished_trials"]): r["worker_resolve_rows_read"] for r in rows
        }
        out[f"worker_start_{b}_s"] = big["worker"]["seconds"]
        rows_small, rows_big = small["worker_resolve_rows_read"], big["worker_resolve_rows_read"]
        targets[f"worker_resolve_rows_{b}"] = target(
            rows_big,
            TARGET_RESOLVE_ROWS,
            f"<= {TARGET_RESOLVE_ROWS} (its trial only; {fmt(rows_small)} at {s})",
        )
    if "wide" in results:
        w = results["wide"]
        widths = sorted(int(k) for k in w if k.isdigit())
        narrow, widest = widths[0], widths[-1]
        out["wide_suggest_s"] = {str(k): w[str(k)]["suggest"]["seconds"] for k in widths}
        out["wide_split_s"] = {str(k): w[str(k)]["suggest"].get("split_s") for k in widths}
        out["wide_history"] = w["history"]
        ratio = _ratio(w[str(widest)]["suggest"]["seconds"], w[str(narrow)]["suggest"]["seconds"])
        out[f"wide_ratio_{widest}_{narrow}"] = ratio
        targets[f"wide_ratio_{widest}_{narrow}"] = target(
            ratio, TARGET_WIDE_RATIO, f"<= {TARGET_WIDE_RATIO:g}"
        )
        out[f"observe_{widest}_wide_s"] = w["observe"]["seconds"]
        out["observe_split_s"] = w["observe"].get("split_s")
        targets[f"observe_{widest}_wide_s"] = target(
            w["observe"]["seconds"], TARGET_OBSERVE_S, f"<= {TARGET_OBSERVE_S:g}"
        )
    if "parse" in results:
        p = results["parse"]
        out["parse"] = {
            "study_files": p["study_files"],
            "dagbag_import_timeout_s": p.get("dagbag_import_timeout_s"),
            "smallest_shards_meeting_target": p.get("smallest_shards_meeting_target"),
            "promotion_dag_s": p["promotion_dag"].get("seconds"),
            "per_shard_count": {
                n: {k: v for k, v in s.items() if k != "files"}
                | {"file_s": [f.get("seconds") for f in s["files"]]}
                for n, s in p["shards"].items()
            },
        }
        for n, s in p["shards"].items():
            targets[f"parse_max_file_s_N{n}"] = target(
                s["max_file_s"], TARGET_PARSE_FILE_S, f"< {TARGET_PARSE_FILE_S:g}"
            )
    out["targets"] = targets
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def top_functions(path: Path, n: int = 30) -> str:
    """The top of a cProfile dump by cumulative time, as text."""
    if not path.exists():
        return ""
    buf = io.StringIO()
    pstats.Stats(str(path), stream=buf).sort_stats("cumulative").print_stats(n)
    return buf.getvalue()


def report(results: dict[str, Any], out: Path) -> str:
    """Print and write the tables (``scale.md``), the JSON files and the plots."""
    head = headline(results)
    lines: list[str] = [_intro(results)]
    if "growth" in results:
        lines += _growth_tables(results["growth"])
    if "wide" in results:
        lines += _wide_tables(results["wide"])
    if "parse" in results:
        lines += _parse_table(results["parse"])
    lines += ["", "Targets (issue 11):", "", _targets_table(head["targets"])]
    body = "\n".join(lines)
    print(body)
    (out / "scale.md").write_text(body + "\n")
    if "growth" in results:
        (out / "suggest_profile.txt").write_text(results["growth"].get("profile_top", ""))
    write_json(out / "scale_raw.json", results)
    write_json(out / "scale.json", head)
    plot(results, out)
    return body


def _intro(results: dict[str, Any]) -> str:
    plan = results["plan"]
    return (
        "Scale: control tasks in cold processes (fresh interpreter each) on PostgreSQL "
        f"({results.get('postgres')}), "
        f"median of {plan['repeats']} runs per figure; MLflow: {results.get('mlflow')}. "
        f"Load average (1 min) at the start of each part and at the end: "
        f"{', '.join(f'{x:.1f}' for x in results.get('load_1m_at_parts', []))} on "
        f"{results['machine_start'].get('nproc')} cores; "
        f"the run took {results.get('wall_minutes', 0):.0f} min. "
        "Seconds are the pipeline call alone; `import` is the import of its module before it (both in the "
        "same cold process), `process` the whole process from the parent's view."
    )


def _growth_tables(g: dict[str, Any]) -> list[str]:
    rows = g["rows"]
    base = rows[0]["suggest"]["seconds"]
    lines = [
        "",
        "`suggest` of a round of 32 (`suggest_batch`), by finished trials in the study; its split (median "
        "seconds per part; exclusive timers on `load_run`, `storage.trials.read_trials`/`with_params`, "
        "`study.ask.ask_batch` and TPESampler's methods, `storage.trials.write_batch`) and its SQL on the "
        "Optuna storage:",
        "",
        table(
            [
                "finished trials",
                "suggest s",
                "min-max",
                "vs first",
                "import s",
                "process s",
                *SPLIT,
                "statements",
                "rows read",
            ],
            [
                [
                    r["finished_trials"],
                    r["suggest"]["seconds"],
                    f"{fmt(r['suggest']['min_s'])}-{fmt(r['suggest']['max_s'])}",
                    _ratio(r["suggest"]["seconds"], base),
                    r["suggest"]["import_s"],
                    r["suggest"]["process_s"],
                    *((r["suggest"].get("split_s") or {}).get(k) for k in SPLIT),
                    r["suggest"]["statements"],
                    r["suggest"]["rows_read"],
                ]
                for r in rows
            ],
        ),
        "",
        "`hpo summary` (`study_summary`), `finalize` (no registered model in the spec: nothing to "
        "register or promote; it logs the final plots and closes the parent run) and a worker's start "
        "(slot open: study, MLflow client and objective import; `resolve_trial`; the trial's claim), "
        "by finished trials:",
        "",
        table(
            [
                "finished trials",
                "summary s",
                "summary rows read",
                "finalize s",
                "finalize import s",
                "worker start s",
                "of which open s",
                "resolve s",
                "claim s",
                "resolve rows read",
                "resolve statements",
            ],
            [
                [
                    r["finished_trials"],
                    r["summary"]["seconds"],
                    r["summary"]["rows_read"],
                    (r.get("finalize") or {}).get("seconds"),
                    (r.get("finalize") or {}).get("import_s"),
                    r["worker"]["seconds"],
                    r["worker_open_s"],
                    r["worker_resolve_s"],
                    r["worker_claim_s"],
                    r["worker_resolve_rows_read"],
                    r["worker_resolve_statements"],
                ]
                for r in rows
            ],
        ),
    ]
    big = rows[-1]
    for name in ("summary", "finalize"):
        split = (big.get(name) or {}).get("split_s")
        if split:
            lines += [
                "",
                f"`{name}` at {big['finished_trials']} trials, split (median s): "
                + ", ".join(f"{k} {fmt(v)}" for k, v in split.items() if v),
            ]
    return lines


def _wide_tables(w: dict[str, Any]) -> list[str]:
    widths = sorted(int(k) for k in w if k.isdigit())
    base = w[str(widths[0])]["suggest"]["seconds"]
    lines = [
        "",
        f"One round W wide on the same history ({w['history']} finished trials, round {w['round']}): "
        "`suggest(W)`:",
        "",
        table(
            ["W", "suggest s", "min-max", "vs narrowest", "import s", *SPLIT, "statements", "rows read"],
            [
                [
                    k,
                    w[str(k)]["suggest"]["seconds"],
                    f"{fmt(w[str(k)]['suggest']['min_s'])}-{fmt(w[str(k)]['suggest']['max_s'])}",
                    _ratio(w[str(k)]["suggest"]["seconds"], base),
                    w[str(k)]["suggest"]["import_s"],
                    *((w[str(k)]["suggest"].get("split_s") or {}).get(s) for s in SPLIT),
                    w[str(k)]["suggest"]["statements"],
                    w[str(k)]["suggest"]["rows_read"],
                ]
                for k in widths
            ],
        ),
        "",
        f"`observe` of the {widths[-1]}-wide round once its {fmt(w.get('observe_round_trials'))} trials "
        "finished (round summary on the parent run and the history plot as an MLflow artifact; the study's "
        f"summary reset between repeats so each does the whole work):",
        "",
        table(
            ["observe s", "min-max", "import s", *CONTROL_SPLIT, "statements", "rows read"],
            [
                [
                    w["observe"]["seconds"],
                    f"{fmt(w['observe']['min_s'])}-{fmt(w['observe']['max_s'])}",
                    w["observe"]["import_s"],
                    *((w["observe"].get("split_s") or {}).get(s) for s in CONTROL_SPLIT),
                    w["observe"]["statements"],
                    w["observe"]["rows_read"],
                ]
            ],
        ),
    ]
    return lines


def _parse_table(p: dict[str, Any]) -> list[str]:
    shards = p["shards"]
    return [
        "",
        f"{p['study_files']} study files (copies of the example) over N thin DAG files "
        "(`load_study_dags(globals(), shard=(i, N))`); per DAG file, a cold process fills a DagBag from "
        "that file and serializes every DAG (seconds without importing Airflow). Airflow's "
        f"`dagbag_import_timeout`: {fmt(p.get('dagbag_import_timeout_s'))} s. The promotion DAG "
        f"(`dags/hpo_promotion.py`, its own file): {fmt(p['promotion_dag'].get('seconds'))} s.",
        "",
        table(
            [
                "N files",
                "studies per file (max)",
                "max file s",
                "mean file s",
                "max parse s",
                "max serialize s",
                "import airflow s",
                "DAGs",
                "import errors",
            ],
            [
                [
                    int(n),
                    s["max_studies"],
                    s["max_file_s"],
                    s["mean_file_s"],
                    s["max_parse_s"],
                    s["max_serialize_s"],
                    s["import_airflow_s"],
                    s["dags"],
                    s["import_errors"] + len(s["errors"]),
                ]
                for n, s in shards.items()
            ],
        ),
    ]


def _targets_table(targets: dict[str, Any]) -> str:
    return table(
        ["figure", "value", "target", "met"],
        [
            [k, t["value"], t["target"], {True: "yes", False: "**no**", None: "-"}[t["met"]]]
            for k, t in targets.items()
        ],
    )


def plot(results: dict[str, Any], out: Path) -> None:
    """Suggest's split by study size, and the per-file parse time by number of DAG files."""
    plt = pyplot()
    if "growth" in results:
        rows = [r for r in results["growth"]["rows"] if r["suggest"].get("split_s")]
        if rows:
            fig, ax = plt.subplots(figsize=(6.5, 3.8))
            xs = [str(r["finished_trials"]) for r in rows]
            bottom = [0.0] * len(rows)
            for key in SPLIT:
                heights = [r["suggest"]["split_s"].get(key, 0.0) for r in rows]
                ax.bar(xs, heights, bottom=bottom, label=key)
                bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
            ax.axhline(TARGET_SUGGEST_S, color="C3", ls="--", label="target")
            ax.set_xlabel("finished trials in the study")
            ax.set_ylabel("suggest(32) seconds (median)")
            ax.set_title("cold-process suggest on PostgreSQL, by part")
            ax.legend(fontsize=7, loc="upper left")
            savefig(fig, out / "scale_suggest.png")
    timed = [f for s in results.get("parse", {}).get("shards", {}).values() for f in s["files"]]
    if any(f.get("seconds") for f in timed):  # no plot when every probe failed (their errors are reported)
        shards = results["parse"]["shards"]
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for n, s in shards.items():
            ys = [f.get("seconds") for f in s["files"] if "error" not in f]
            ax.scatter([int(n)] * len(ys), ys, s=12, label=f"N={n}")
        ax.axhline(TARGET_PARSE_FILE_S, color="C3", ls="--", label="target")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("DAG files (N)")
        ax.set_ylabel("parse + serialize s per file")
        ax.set_title(f"{results['parse']['study_files']} study files")
        ax.legend(fontsize=7)
        savefig(fig, out / "scale_parse.png")


if __name__ == "__main__":
    sys.exit(main())
