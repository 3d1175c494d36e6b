"""Cost of the control tasks (start, suggest, observe, finalize) on the embedded default.

```bash
.venv/bin/python -m bench.control_tasks --out ct.json      # both scenarios, warm and cold
.venv/bin/python -m bench.control_tasks --repeat 3 --importtime bench/out/importtime
.venv/bin/python -m bench.control_tasks --scenario unset --no-cold --profile bench/out/prof
```

Runs the example study (``dags/studies/breast_cancer_gbm.yaml``) on a fresh temporary ``HPO_HOME``
(SQLite Optuna storage, SQLite MLflow, local artifacts): ``start``, then per round ``suggest`` ->
evaluate -> ``observe``, then ``finalize``, each through its Airflow task body
(``hpo_airflow.tasks``, with a stand-in task context), and times every task body:

* **warm**: in a process forked from one that already imported what the warm local executor
  pre-imports (``hpo_airflow.executor.DEFAULT_PREIMPORTS``: Optuna, MLflow and its SQL stores,
  ``hpo_core.study/worker/tracking``, the task runner) and whose Airflow ORM is set up, as in the
  scheduler a LocalExecutor task process is forked from; per-process caches (storage, MLflow client)
  start empty, as in a real task.
* **cold**: in a fresh interpreter (``python -c``) that imports only what a task process has loaded
  before the body (the Task SDK's task runner and ``hpo_airflow.tasks``, from parsing the DAG file);
  "import" is that import, "body" the task function including the modules it imports itself, "wall"
  the whole process as seen from outside. ``--importtime DIR`` runs the cold processes with
  ``-X importtime`` (slower imports) and lists the modules each body imported.

The databases are created before the first ``start`` (timed as "install": the first use of an
``HPO_HOME`` creates the MLflow schema, several seconds); ``--fresh`` leaves that to ``start``. Airflow
Connections are not looked up (the embedded default has none; in a task each lookup is one request
to the API server). ``--repeat N`` runs everything N times and reports medians.

Scenarios: ``unset`` (``mlflow.registered_model`` removed: no registration) and ``set`` (the study as
written, run twice in the same ``HPO_HOME`` like two nightly runs: the second run warm-starts from the
champion and the first study's best, and its finalize re-scores champion and challenger).

Evaluation is emulated in a forked process, not timed: each trial gets the attributes a worker writes,
an MLflow child run, a tiny scikit-learn model when the study registers one, and a value; round 1
prunes one trial and round 2 loses one (left RUNNING with its MLflow run, its slot task "failed"), so
``observe`` has to reconcile. Round 1's ``suggest`` and ``observe`` and ``finalize`` also run a second
time (a retry or clear: idempotent, nothing logged twice).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import logging
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, fmt, machine_info, table, write_json

# A cold task process imports this module first (``_COLD_CODE``), then times its import of the task
# modules and its task body: so only the standard library and bench.common at the top, and the
# project's modules where they are used (those imports carry ``noqa: PLC0415``).

STUDY_FILE = REPO_ROOT / "dags" / "studies" / "breast_cancer_gbm.yaml"
DAG_ID = "hpo_breast_cancer_gbm"
#: What the local executor imports in the scheduler before it forks task processes (the warm
#: executor's own list, ``hpo_airflow.executor.DEFAULT_PREIMPORTS``, when it is there).
PRE_IMPORTS = ("optuna", "mlflow", "hpo_core.study.start", "hpo_core.worker", "hpo_core.tracking")
#: What a task process has loaded before the body runs: the task runner, the DAG file's modules.
TASK_MODULES = ("airflow.sdk.execution_time.task_runner", "hpo_airflow.tasks")
RESULT_PREFIX = "BENCH_RESULT "
BODY_MARKER = "BENCH_BODY_START"
_OPTIONS = {"verbose": False}
_ENV_DROP = ("HPO_STORAGE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "HPO_ARTIFACT_ROOT")


# --- one task body, in the process that times it ---------------------------------------------


class _TaskInstance:
    """Stand-in for the Task SDK's ``ti``: only what the control tasks use."""

    try_number = 1

    def __init__(self, states: Mapping[str, str]) -> None:
        self._states = dict(states)

    def get_task_states(
        self,
        dag_id: str,
        task_ids: Sequence[str] | None = None,
        run_ids: Sequence[str] | None = None,
        **_: Any,
    ) -> dict[str, dict[str, str]]:
        found = {
            key: state
            for key, state in self._states.items()
            if not task_ids or any(key == t or key.startswith(f"{t}_") for t in task_ids)
        }
        return {run_id: found for run_id in run_ids or []}


def _spec(registered: bool) -> Any:
    import yaml  # noqa: PLC0415 - cold task processes import this module

    from hpo_core.spec import validate_mapping  # noqa: PLC0415 - cold task processes import this module

    raw = yaml.safe_load(STUDY_FILE.read_text())
    if not registered:
        raw["mlflow"].pop("registered_model", None)
        raw["warm_start"]["from_champion"] = False
        raw.pop("promotion", None)
    return validate_mapping(raw, source=str(STUDY_FILE))


def _run_step(step: Mapping[str, Any], *, profile: str | None = None) -> dict[str, Any]:
    """Call one control task's body with a stand-in context; return its time and result."""
    call = _task_body(step)
    profiler = cProfile.Profile() if profile else None
    sys.stderr.write(BODY_MARKER + "\n")
    sys.stderr.flush()
    outcome: dict[str, Any] = {"result": None, "skipped": None, "error": None}
    modules_before = set(sys.modules)
    start = time.perf_counter()
    try:
        if profiler is not None:
            profiler.enable()
        try:
            outcome["result"] = call()
        finally:
            if profiler is not None:
                profiler.disable()
    except Exception as e:
        if type(e).__name__ == "AirflowSkipException":
            outcome["skipped"] = str(e)
        else:
            outcome["error"] = f"{type(e).__name__}: {e}"
            outcome["traceback"] = traceback.format_exc()
    outcome["seconds"] = time.perf_counter() - start
    outcome.update(_modules_imported_since(modules_before))
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    return outcome


def _task_body(step: Mapping[str, Any]) -> Callable[[], Any]:
    """The step's task function (``hpo_airflow.tasks``) bound to its arguments, with a stand-in context."""
    from hpo_airflow import settings as _settings  # noqa: PLC0415 - cold task processes import this module
    from hpo_airflow import tasks as _tasks  # noqa: PLC0415 - cold task processes import this module

    context = {
        "dag_run": types.SimpleNamespace(dag_id=DAG_ID, run_id=step["run_id"]),
        "params": {},
        "ti": _TaskInstance(step.get("states") or {}),
        "logical_date": None,
    }
    _tasks.get_current_context = lambda: context  # type: ignore[assignment]
    # No Airflow Connections (the embedded default): in a task each lookup is one request to the API
    # server through the supervisor; outside a task it would import the supervisor instead.
    _settings._connection_uri = lambda conn_id: None  # type: ignore[assignment]
    task = step["task"]
    if task == "start":
        spec = _spec(step["registered"])
        return lambda: _tasks.start(spec)
    if task == "suggest":
        return lambda: _tasks.suggest(step["study"], step["round"])
    if task == "observe":
        return lambda: _tasks.observe(step["study"], step["round"])
    if task == "finalize":
        return lambda: _tasks.finalize(step["study"])
    raise ValueError(task)


def _modules_imported_since(modules_before: set[str]) -> dict[str, Any]:
    """How many modules were imported since ``modules_before``, and the 12 packages most of them are in."""
    imported = sorted(set(sys.modules) - modules_before)
    roots: dict[str, int] = {}
    for name in imported:
        root = ".".join(name.split(".")[:3])
        roots[root] = roots.get(root, 0) + 1
    return {
        "modules_imported": len(imported),
        "module_roots": sorted(roots.items(), key=lambda kv: -kv[1])[:12],
    }


def _pre_imports() -> tuple[str, ...]:
    try:
        from hpo_airflow.executor import DEFAULT_PREIMPORTS  # noqa: PLC0415 - optional; cold task processes import this module
    except ImportError:
        return PRE_IMPORTS
    return tuple(DEFAULT_PREIMPORTS)


def _like_the_scheduler() -> None:
    """Leave Airflow's ORM configured, as in a scheduler: its models are imported and mapped.

    Airflow arms a one-time hook that imports all of its models when the first SQLAlchemy mapper of
    the process is configured (about a second). A LocalExecutor task process is forked from the
    scheduler, which did that long before; a fresh interpreter (cold) pays it at its first ORM query,
    whichever library makes it.
    """
    from airflow.models.base import Base  # noqa: PLC0415 - cold task processes import this module

    Base.registry.configure()


def _cold_main(step_json: str, t0: float) -> None:
    """Entry of a cold task process: import the task module, then time the body."""
    step = json.loads(step_json)
    logging.basicConfig(level=logging.WARNING)
    before = time.perf_counter()
    for name in TASK_MODULES:
        importlib.import_module(name)
    imported = time.perf_counter()
    outcome = _run_step(step, profile=step.get("profile"))
    outcome["import_seconds"] = imported - before
    outcome["startup_seconds"] = before - t0
    print(RESULT_PREFIX + json.dumps(outcome, default=str), flush=True)


_COLD_CODE = (
    "import time; t0 = time.perf_counter()\n"
    "import sys\n"
    "from bench.control_tasks import _cold_main\n"
    "_cold_main(sys.argv[1], t0)\n"
)


# --- emulated evaluation (not timed) ---------------------------------------------------------


def _value(params: Mapping[str, Any]) -> float:
    """A deterministic, plausible ROC AUC for a configuration (below the study's target)."""
    lr = float(params.get("learning_rate", 0.1))
    depth = int(params.get("max_depth", 4))
    return 0.95 + 0.03 * math.exp(-abs(math.log(lr / 0.08))) + 0.001 * (depth - 2)


def _evaluate(
    slots: Sequence[Mapping[str, Any]],
    study_name: str,
    *,
    with_model: bool,
    lose: int | None,
    prune: int | None,
) -> dict[str, str]:
    """Do what slot workers do to the storage and MLflow, quickly; return the slots' task states."""
    import optuna
    from optuna.trial import TrialState

    from hpo_core.deployment import Deployment  # noqa: PLC0415 - cold task processes import this module
    from hpo_core.keys import StudyAttr, TrialAttr  # noqa: PLC0415 - cold task processes import this module
    from hpo_core.storage import open_storage
    from hpo_core.tracking import runs as tracking

    deployment = Deployment.from_env()
    storage = open_storage(deployment.storage_url)
    study = optuna.load_study(study_name=study_name, storage=storage)
    attrs = study.user_attrs
    client = tracking.client(deployment)
    model, fingerprint = _small_model() if with_model else (None, None)
    states: dict[str, str] = {}
    round_number = slots[0]["round"]
    for slot in slots:
        key = f"round_{round_number}.evaluate_{slot['slot']}"
        states[key] = "success"
        for entry in slot["trials"]:
            number = int(entry["trial_number"])
            trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
            now = time.time()
            storage.set_trial_user_attr(
                trial_id,
                "hpo.worker",
                {"host": socket.gethostname(), "pid": os.getpid(), "attempt": 1, "started_at": now},
            )
            storage.set_trial_user_attr(trial_id, "hpo.heartbeat", now)
            run = client.create_run(
                attrs[StudyAttr.EXPERIMENT],
                run_name=f"trial {number} · attempt 1",
                tags={
                    "hpo.study": study_name,
                    "hpo.trial_number": str(number),
                    "hpo.round": str(round_number),
                    "hpo.attempt": "1",
                    "hpo.role": "trial",
                    "mlflow.parentRunId": attrs[StudyAttr.PARENT_RUN],
                },
            )
            run_id = run.info.run_id
            from mlflow.entities import Metric, Param

            client.log_batch(
                run_id, params=[Param(k, v) for k, v in tracking.flat_params(entry["params"]).items()]
            )
            storage.set_trial_user_attr(trial_id, TrialAttr.MLFLOW_RUN, run_id)
            if number == lose:
                states[key] = "failed"
                continue
            value = _value(entry["params"])
            storage.set_trial_intermediate_value(trial_id, 0, value - 0.01)
            if number == prune:
                client.set_terminated(run_id, status="KILLED")
                study.tell(number, state=TrialState.PRUNED)
                continue
            if model is not None:
                import mlflow
                import mlflow.sklearn

                with mlflow.start_run(run_id=run_id):
                    info = mlflow.sklearn.log_model(model, name="model")
                storage.set_trial_user_attr(trial_id, TrialAttr.MODEL_URI, str(info.model_uri))
                storage.set_trial_user_attr(
                    trial_id, TrialAttr.LINEAGE, {"data_fingerprint": fingerprint, "code_version": "bench/1"}
                )
            storage.set_trial_user_attr(trial_id, TrialAttr.METRICS, {"roc_auc": value})
            client.log_batch(run_id, metrics=[Metric("roc_auc", value, int(now * 1000), 0)])
            client.set_terminated(run_id, status="FINISHED")
            study.tell(number, values=[value])
    return states


def _small_model() -> tuple[Any, str]:
    """A small scikit-learn model of the example's data and the data's fingerprint, as a trial logs them."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    from hpo_core.examples.breast_cancer import data_fingerprint  # noqa: PLC0415 - cold task processes import this module

    x, y = load_breast_cancer(return_X_y=True)
    model = LogisticRegression(max_iter=5000).fit(x, y)
    return model, data_fingerprint(x, y)


# --- a scenario ------------------------------------------------------------------------------


def _in_fork(func: Any) -> Any:
    """Run ``func()`` in a forked child (fresh per-process caches, inherited imports); return its value."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        if not _OPTIONS["verbose"]:  # task logs would drown the table
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        try:
            payload: dict[str, Any] = {"ok": True, "value": func()}
        except BaseException as e:  # reported to the parent
            payload = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        data = json.dumps(payload, default=str).encode()
        with os.fdopen(write_fd, "wb") as out:
            out.write(data)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    payload = json.loads(data or b'{"ok": false, "error": "child died"}')
    if not payload["ok"]:
        raise RuntimeError(f"forked step failed: {payload['error']}\n{payload.get('traceback', '')}")
    return payload["value"]


class _Runner:
    def __init__(self, mode: str, args: argparse.Namespace, env: Mapping[str, str], label: str) -> None:
        self.mode, self.args, self.env, self.label = mode, args, env, label
        self.records: list[dict[str, Any]] = []

    def task(self, name: str, step: dict[str, Any]) -> dict[str, Any]:
        profile = None
        if self.args.profile:
            folder = Path(self.args.profile)
            folder.mkdir(parents=True, exist_ok=True)
            profile = str(folder / f"{self.label}.{self.mode}.{name.replace(' ', '_')}.prof")
        if self.mode == "warm":
            outcome = _in_fork(lambda: _run_step(step, profile=profile))
        else:
            outcome = self._cold(name, {**step, "profile": profile})
        if outcome.get("error"):
            raise RuntimeError(
                f"{self.label} {self.mode} {name}: {outcome['error']}\n{outcome.get('traceback')}"
            )
        record = {"step": name, "task": step["task"], **{k: v for k, v in outcome.items() if k != "result"}}
        promotion = (outcome.get("result") or {}).get("promotion") if step["task"] == "finalize" else None
        if promotion:
            record["promotion"] = f"{promotion['comparison']}: {promotion['reason']}"
        self.records.append(record)
        print(
            f"  {self.mode:4} {self.label:10} {name:22} {outcome['seconds']:7.3f}s"
            + (
                f"  (import {outcome['import_seconds']:.2f}s, wall {outcome['wall_seconds']:.2f}s)"
                if self.mode == "cold"
                else ""
            )
            + (f"  skipped: {outcome['skipped']}" if outcome.get("skipped") else ""),
            file=sys.stderr,
            flush=True,
        )
        return outcome

    def _cold(self, name: str, step: Mapping[str, Any]) -> dict[str, Any]:
        command = [sys.executable]
        if self.args.importtime:
            command += ["-X", "importtime"]
        command += ["-c", _COLD_CODE, json.dumps(step, default=str)]
        began = time.perf_counter()
        proc = subprocess.run(
            command, cwd=REPO_ROOT, env=dict(self.env), capture_output=True, text=True, check=False
        )
        wall = time.perf_counter() - began
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if not lines:
            raise RuntimeError(f"{name}: cold process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        outcome = json.loads(lines[-1][len(RESULT_PREFIX) :])
        outcome["wall_seconds"] = wall
        if self.args.importtime:
            folder = Path(self.args.importtime)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{self.label}.{name.replace(' ', '_')}.txt"
            path.write_text(proc.stderr)
            outcome["body_imports"] = _body_imports(proc.stderr)
        return outcome


def _body_imports(stderr: str, top: int = 8) -> list[tuple[str, float]]:
    """Top-level modules the body imported (``-X importtime``), by cumulative seconds."""
    after = stderr.split(BODY_MARKER, 1)[-1] if BODY_MARKER in stderr else ""
    found = []
    for line in after.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line.split("|")
        name = parts[2]
        if name.startswith("  "):  # nested: counted in its parent
            continue
        try:
            found.append((name.strip(), int(parts[1].strip()) / 1e6))
        except ValueError:
            continue
    return sorted(found, key=lambda x: -x[1])[:top]


def _scenario(mode: str, registered: bool, args: argparse.Namespace) -> list[dict[str, Any]]:
    home = Path(tempfile.mkdtemp(prefix=f"hpo-bench-ct-{mode}-"))
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    env.update(
        {
            "HPO_HOME": str(home),
            "AIRFLOW_HOME": str(home / "airflow"),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "plugins")]),
        }
    )
    old_env = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    records: list[dict[str, Any]] = []
    try:
        if not args.fresh:
            began = time.perf_counter()
            _in_fork(_install)
            records.append(
                {
                    "scenario": f"{'set' if registered else 'unset'}#1",
                    "mode": mode,
                    "step": "install (not a task)",
                    "task": "install",
                    "seconds": time.perf_counter() - began,
                }
            )
        for run in range(1, (args.runs if registered else 1) + 1):
            label = f"{'set' if registered else 'unset'}#{run}"
            runner = _Runner(mode, args, env, label)
            run_id = f"manual__bench_{run}"
            base = {"run_id": run_id, "registered": registered}
            started = runner.task("start", {**base, "task": "start"})
            study = {"study_name": started["result"]["study_name"]}
            states: dict[str, str] = {}
            for r in range(1, args.rounds + 1):
                slots = runner.task(f"suggest {r}", {**base, "task": "suggest", "study": study, "round": r})
                if r == 1:
                    runner.task(
                        f"suggest {r} (retry)", {**base, "task": "suggest", "study": study, "round": r}
                    )
                if slots.get("skipped"):
                    break
                batch_slots = slots["result"]
                numbers = [int(n) for s in batch_slots for n in s["trial_numbers"]]
                states.update(
                    _in_fork(
                        lambda r=r, batch_slots=batch_slots, numbers=numbers, name=study["study_name"]: (
                            _evaluate(
                                batch_slots,
                                name,
                                with_model=registered,
                                lose=numbers[-1] if r == 2 else None,
                                prune=numbers[0] if r == 1 else None,
                            )
                        )
                    )
                )
                observed = runner.task(
                    f"observe {r}", {**base, "task": "observe", "study": study, "round": r, "states": states}
                )
                if r == 1:
                    runner.task(
                        f"observe {r} (retry)",
                        {**base, "task": "observe", "study": study, "round": r, "states": states},
                    )
                if observed.get("skipped") or observed["result"]["stop_reason"]:
                    break
            runner.task("finalize", {**base, "task": "finalize", "study": study, "states": states})
            runner.task("finalize (retry)", {**base, "task": "finalize", "study": study, "states": states})
            for record in runner.records:
                records.append({"scenario": label, "mode": mode, **record})
    finally:
        os.environ.clear()
        os.environ.update(old_env)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"  kept {home}", file=sys.stderr)
    return records


def _install() -> None:
    """Create the embedded default's databases, as its first use does (Optuna tables, MLflow schema)."""
    from hpo_core.deployment import Deployment  # noqa: PLC0415 - cold task processes import this module
    from hpo_core.storage import open_storage
    from hpo_core.tracking import runs as tracking

    deployment = Deployment.from_env()
    deployment.ensure_local_dirs()
    open_storage(deployment.storage_url)
    tracking.client(deployment).search_experiments(max_results=1)


# --- report ----------------------------------------------------------------------------------


def _median_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (scenario, mode, step): the median of its repeats' times."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["scenario"], r["mode"], r["step"]), []).append(r)
    out = []
    for group in groups.values():
        merged = dict(group[0])
        for key in ("seconds", "import_seconds", "wall_seconds"):
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                merged[key] = statistics.median(values)
        merged["repeats"] = len(group)
        out.append(merged)
    return out


def _report(records: list[dict[str, Any]]) -> str:
    records = _median_records(records)
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        by_key.setdefault((r["scenario"], r["step"]), {})[r["mode"]] = r
    rows = []
    for (scenario, step), modes in by_key.items():
        warm, cold = modes.get("warm", {}), modes.get("cold", {})
        note = (warm or cold).get("skipped")
        rows.append(
            [
                scenario,
                step,
                warm.get("seconds"),
                cold.get("seconds"),
                cold.get("import_seconds"),
                cold.get("wall_seconds"),
                ("skipped: " + note[:40]) if note else "",
            ]
        )
    out = [table(["scenario", "task", "warm s", "cold body s", "cold import s", "cold wall s", "note"], rows)]
    totals = []
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        for mode in ("warm", "cold"):
            mine = [
                r
                for r in records
                if r["scenario"] == scenario
                and r["mode"] == mode
                and "retry" not in r["step"]
                and r["task"] != "install"
            ]
            if not mine:
                continue
            per_task: dict[str, list[float]] = {}
            for r in mine:
                per_task.setdefault(r["task"], []).append(r["seconds"])
            totals.append(
                [
                    scenario,
                    mode,
                    sum(per_task.get("start", [])),
                    max(per_task.get("suggest", [0])),
                    max(per_task.get("observe", [0])),
                    sum(per_task.get("finalize", [])),
                    sum(r["seconds"] for r in mine),
                ]
            )
    out.append("")
    out.append(
        table(
            ["scenario", "mode", "start", "suggest (max)", "observe (max)", "finalize", "all control bodies"],
            totals,
        )
    )
    imports = [r for r in records if r.get("body_imports")]
    if imports:
        out.append("")
        out.append("Modules the cold bodies imported (top-level, cumulative seconds):")
        for r in imports:
            shown = ", ".join(f"{name} {fmt(sec)}" for name, sec in r["body_imports"][:5])
            out.append(f"  {r['scenario']:8} {r['step']:20} {shown}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.control_tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON results here")
    parser.add_argument(
        "--scenario", choices=["unset", "set", "both"], default="both", help="registered_model"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument("--runs", type=int, default=2, help="runs of the 'set' scenario (default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="run everything N times; report medians")
    parser.add_argument("--no-cold", action="store_true", help="warm only")
    parser.add_argument("--no-warm", action="store_true", help="cold only")
    parser.add_argument("--importtime", metavar="DIR", help="cold: -X importtime output per task, to DIR")
    parser.add_argument("--profile", metavar="DIR", help="cProfile each task body to DIR/<step>.prof")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="let the first start create the databases (default: created before, timed as 'install')",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary HPO_HOME folders")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the tasks' logs")
    args = parser.parse_args(argv)
    _OPTIONS["verbose"] = args.verbose

    own_airflow_home = None
    if not os.environ.get("AIRFLOW_HOME"):
        own_airflow_home = os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="hpo-bench-ct-airflow-")
    try:
        return _main(args)
    finally:
        if own_airflow_home:
            shutil.rmtree(own_airflow_home, ignore_errors=True)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    sys.path[:0] = [str(REPO_ROOT / "plugins")]
    began = time.perf_counter()
    for name in (*_pre_imports(), *TASK_MODULES):
        importlib.import_module(name)
    _like_the_scheduler()
    pre_import = time.perf_counter() - began
    scenarios = [False, True] if args.scenario == "both" else [args.scenario == "set"]
    modes = [m for m, off in (("warm", args.no_warm), ("cold", args.no_cold)) if not off]
    records: list[dict[str, Any]] = []
    for repeat in range(1, args.repeat + 1):
        for registered in scenarios:
            for mode in modes:
                print(
                    f"{mode} · registered_model {'set' if registered else 'unset'} · repeat {repeat}",
                    file=sys.stderr,
                    flush=True,
                )
                records += [{**r, "repeat": repeat} for r in _scenario(mode, registered, args)]
    report = _report(records)
    print(report)
    if args.out:
        write_json(
            Path(args.out),
            {
                "machine": machine_info(),
                "pre_import_seconds": pre_import,
                "records": records,
                "table": report,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
