"""The ``hpo`` command: every command of the pipeline in one place.

``hpo summary`` (what a study run produced), ``hpo status`` (a study run's progress and trial
table, read as the HPO view in the Airflow UI reads it), ``hpo validate`` (check study files),
``hpo schema`` (the study file's JSON Schema, for editors), ``hpo storage upgrade`` (migrate the
Optuna storage after an Optuna upgrade), ``hpo promote`` / ``hpo rollback`` (move the registered
model's ``champion`` alias by hand, recording who and why).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import optuna

from hpo_core import checks
from hpo_core.deployment import Deployment, redact_url
from hpo_core.errors import HpoError, StudySpecError
from hpo_core.keys import StudyAttr
from hpo_core.spec import SCHEMA_PATH, StudySpec, load_spec, study_schema_text
from hpo_core.storage import trials as stored
from hpo_core.storage import upgrade_schema
from hpo_core.study.accounting import count_trials, ours, pick_best
from hpo_core.study.progress import StudyProgress, find_study, load_progress
from hpo_core.study.state import load_run
from hpo_core.tracking import promotion, registry, runs

__all__ = ["format_status", "latest_study_name", "main", "study_summary"]


def latest_study_name(deployment: Deployment, dag_id: str) -> str:
    """Name of the most recently started study of ``dag_id`` (:func:`hpo_core.study.progress.find_study`).

    Raises:
        TrialStateError: no study of that DAG is in the storage.
    """
    return find_study(deployment, dag_id)[0]


def study_summary(deployment: Deployment, study_name: str, *, check_model: bool = False) -> dict[str, Any]:
    """Best value and params, trial counts, MLflow parent run and registered version of a study."""
    loaded = load_run(deployment, study_name)
    study, spec = loaded.study, loaded.spec
    trials = stored.read_trials(study)  # one lean read for the counts and the best trial
    counts = count_trials(study, trials)
    best = pick_best(study, spec, ours(trials, loaded.attrs))
    index = spec.objective_metrics.index(spec.score_metric)
    out: dict[str, Any] = {
        "study": study_name,
        "trials": {
            "counted": counts.counted,
            "complete": counts.complete,
            "pruned": counts.pruned,
            "failed": counts.failed,
            "running": counts.running,
        },
        "best_trial": None if best is None else best.number,
        # The metric that ranks trials (pareto_choice.metric with several objectives), and every value.
        "best_metric": spec.score_metric,
        "best_value": None if best is None else best.values[index],
        "best_values": None if best is None else dict(zip(spec.objective_metrics, best.values, strict=True)),
        "best_params": None if best is None else best.params,
        "mlflow_parent_run_id": loaded.attrs.get(StudyAttr.PARENT_RUN),
        "mlflow_tracking_uri": deployment.tracking_uri if "@" not in deployment.tracking_uri else "(hidden)",
        "stop_reason": loaded.attrs.get(StudyAttr.STOP),
    }
    name = spec.mlflow.registered_model
    if name and best is not None:
        client = runs.client(deployment)
        version = registry.find_version(client, name=name, study=study_name, trial_number=str(best.number))
        if version is not None:
            aliases = sorted(client.get_model_version(name, version.version).aliases)
            out["registered_model"] = {"name": name, "version": str(version.version), "aliases": aliases}
            if check_model:
                out["registered_model"]["loads_and_predicts"] = _predict_check(spec, name)
    return out


#: What ``--check-model`` says when it has no real rows to predict on.
NOT_CHECKED = "not checked: the model has no input example (log it with input_example=... to check it)"


def _predict_check(spec: StudySpec, name: str) -> bool | str:
    """Load ``models:/<name>@challenger`` and predict on the rows of its input example.

    Returns ``True`` when it predicted one value per row, ``False`` when not, and
    :data:`NOT_CHECKED` when the model has no input example: no rows, no claim.
    """
    model = mlflow.pyfunc.load_model(f"models:/{name}@{registry.CHALLENGER}")
    try:
        input_example = model.input_example
    except Exception:  # not every flavour stores one
        input_example = None
    if input_example is None:
        return NOT_CHECKED
    prediction = model.predict(input_example)
    return len(prediction) == len(input_example)


def _cmd_summary(args: argparse.Namespace) -> int:
    deployment = Deployment.from_env()
    name = args.study or latest_study_name(deployment, args.dag_id)
    summary = study_summary(deployment, name, check_model=args.check_model)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"study            {summary['study']}")
    t = summary["trials"]
    print(
        f"trials           {t['counted']} ({t['complete']} complete, {t['pruned']} pruned, "
        f"{t['failed']} failed)"
    )
    best = f"{summary['best_metric']}={summary['best_value']}"
    print(f"best value       {best}  (trial {summary['best_trial']})")
    if summary["best_values"] and len(summary["best_values"]) > 1:
        print(f"best values      {json.dumps(summary['best_values'])}")
    print(f"best params      {json.dumps(summary['best_params'], sort_keys=True)}")
    print(f"MLflow parent run {summary['mlflow_parent_run_id']}")
    reg = summary.get("registered_model")
    if reg:
        print(f"registered model {reg['name']} version {reg['version']} aliases {', '.join(reg['aliases'])}")
        if "loads_and_predicts" in reg:
            print(f"models:/{reg['name']}@challenger loads and predicts: {reg['loads_and_predicts']}")
    return 0


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def _status_head(run: StudyProgress) -> list[str]:
    row, c = run.row, run.row.counts
    params = json.dumps(run.best_params, sort_keys=True)
    best = f" (trial {row.best_trial}) {params}" if run.best_params else ""
    lines = [
        f"study      {row.study_name}",
        f"DAG run    {row.dag_id} / {row.run_id}",
        f"progress   {c.finished}/{row.n_trials or c.counted} trials finished: {c.complete} complete, "
        f"{c.pruned} pruned, {c.failed} failed, {c.running} running; round {run.rounds_run} of at most "
        f"{run.max_rounds}",
        f"best       {row.metric} ({row.direction}) = {_num(row.best_value)}{best}",
    ]
    if row.stop_reason:
        lines.append(f"stopped    {row.stop_reason}")
    if row.outcome:
        lines.append(f"outcome    {row.outcome}")
    if row.registered_model:
        lines.append(f"registered {row.registered_model['name']} version {row.registered_model['version']}")
    return lines


def format_status(run: StudyProgress, *, width: int = 120) -> str:
    """``hpo status``'s output: the progress lines, then the trial table (lines cut at ``width``)."""
    header = ["trial", "round", "slot", "state", "value", "duration", "attempt", "retry_of"]
    header.append("params / reason")
    table = [header]
    for t in run.trials:
        detail = json.dumps(t.params, sort_keys=True, default=str)
        if t.fail_reason:
            detail = f"{t.fail_reason}  {detail}"
        if not t.counted:
            detail = f"(replaced by a retry) {detail}"
        shown = [t.number, t.round, t.slot, t.state, t.value, _duration(t.duration_s), t.attempt, t.retry_of]
        table.append([_num(cell) for cell in shown] + [detail])
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = [*_status_head(run), ""]
    for cells in table:
        text = "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=False)) + f"  {cells[-1]}"
        lines.append(text if len(text) <= width else text[: width - 1] + "…")
    if len(table) == 1:
        lines.append("(no trial suggested yet)")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    deployment = Deployment.from_env()
    name, run_id = find_study(deployment, args.dag_id, args.run_id)
    run = load_progress(deployment, name, run_id=run_id)
    if args.json:
        print(json.dumps(run.to_dict(), indent=2, default=str))
    else:
        print(format_status(run, width=max(80, shutil.get_terminal_size((160, 24)).columns)))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    text = study_schema_text()
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def _airflow_loader() -> tuple[Any, str | None]:
    """The Airflow side's study-file loader, or ``None`` and why it is not available here."""
    try:
        return importlib.import_module(checks.AIRFLOW_LOADER), None
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


def _cmd_validate(args: argparse.Namespace) -> int:
    """``hpo validate``: every check the DAG factory and ``start`` run (see :mod:`hpo_core.checks`)."""
    loader, missing = _airflow_loader()
    if loader is None:
        print(
            f"note: Airflow is not importable here ({missing}); not checked: {checks.AIRFLOW_ONLY}. "
            "Run hpo validate where Airflow is installed to check them too.",
            file=sys.stderr,
        )
    failed = 0
    owners: dict[str, Path] = {}
    for name in args.files:
        path = Path(name)
        try:
            if loader is not None:
                spec, _ = loader.load_study_file(path, taken=owners)
            else:
                spec = load_spec(path)
                checks.check_study(spec, source=path)
            owners.setdefault(spec.dag_id, path)
            imported = checks.check_imports(spec, source=path) if args.check_imports else []
        except StudySpecError as e:
            failed += 1
            print(f"invalid {e}", file=sys.stderr)
            continue
        extra = f" (imported: {'; '.join(imported)})" if imported else ""
        print(f"ok      {path} -> DAG {spec.dag_id}{extra}")
    return 1 if failed else 0


def _cmd_storage_upgrade(args: argparse.Namespace) -> int:
    """``hpo storage upgrade``: the schema-upgrade step after an Optuna upgrade (idempotent)."""
    url = Deployment.from_env().storage_url
    before, after = upgrade_schema(url)
    if before is None:
        outcome = f"tables created at schema {after}"
    elif before == after:
        outcome = f"schema {after} is current"
    else:
        outcome = f"schema upgraded {before} -> {after}"
    print(f"Optuna storage {redact_url(url)}: {outcome} (Optuna {optuna.__version__})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hpo`` argument parser."""
    parser = argparse.ArgumentParser(prog="hpo", description="HPO pipeline command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="what the latest (or a named) study run produced")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--dag-id", help="latest study of this DAG")
    group.add_argument("--study", help="an Optuna study name")
    p.add_argument("--check-model", action="store_true", help="load models:/<name>@challenger and predict")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_summary)
    _status_parser(sub)
    v = sub.add_parser(
        "validate", help="check study files as the DAG factory and start do (exit 1 if one is invalid)"
    )
    v.add_argument("files", nargs="+")
    v.add_argument(
        "--check-imports",
        action="store_true",
        help="also import the objective, space function, evaluate and refit hooks and check their signatures",
    )
    v.set_defaults(func=_cmd_validate)
    schema = sub.add_parser("schema", help="print the study file's JSON Schema (for editors)")
    schema.add_argument("--output", "-o", help=f"write it to this file (the repository keeps {SCHEMA_PATH})")
    schema.set_defaults(func=_cmd_schema)
    storage = sub.add_parser("storage", help="maintain the Optuna storage ($HPO_STORAGE_URL)")
    storage_sub = storage.add_subparsers(dest="storage_command", required=True)
    upgrade = storage_sub.add_parser(
        "upgrade", help="migrate the storage's tables to the installed Optuna's schema (after an upgrade)"
    )
    upgrade.set_defaults(func=_cmd_storage_upgrade)
    p = sub.add_parser("promote", help="make a model version the champion (the old one stays for rollback)")
    p.add_argument("model", help="registered model name")
    p.add_argument("version", help="version number to promote")
    _actor_reason(p)
    p.set_defaults(func=_cmd_promote)
    r = sub.add_parser("rollback", help="give champion back to the previous_champion version")
    r.add_argument("model", help="registered model name")
    _actor_reason(r)
    r.set_defaults(func=_cmd_rollback)
    return parser


def _status_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="a study run's progress and trial table (as the HPO view shows it)")
    p.add_argument("dag_id", help="the study's DAG id, e.g. hpo_breast_cancer_gbm")
    p.add_argument("--run-id", help="the DAG run (default: the latest run of the DAG)")
    p.add_argument("--json", action="store_true", help="print the read model as JSON (as the HPO view's API)")
    p.set_defaults(func=_cmd_status)


def _actor_reason(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", required=True, help="why (recorded on the model version)")
    parser.add_argument("--actor", default=os.environ.get("USER") or "unknown", help="who (default: $USER)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _cmd_promote(args: argparse.Namespace) -> int:
    result = promotion.promote(
        args.model, args.version, actor=args.actor, reason=args.reason, deployment=Deployment.from_env()
    )
    _print_decision(result, args.json)
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    result = promotion.rollback(
        args.model, actor=args.actor, reason=args.reason, deployment=Deployment.from_env()
    )
    _print_decision(result, args.json)
    return 0


def _print_decision(result: promotion.PromotionDecision, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    if not result.promoted:
        print(result.reason)
    elif result.rule == "rollback":
        was = result.champion_version
        print(f"{result.model_name}: {registry.CHAMPION} is version {result.version} again (was {was})")
    else:
        previous = result.previous_champion
        kept = f"; version {previous} is {registry.PREVIOUS_CHAMPION}" if previous else ""
        print(f"{result.model_name}: {registry.CHAMPION} is version {result.version}{kept}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hpo`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except HpoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
