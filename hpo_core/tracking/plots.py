"""The study's plots: Plotly figures for the HPO view, PNG artifacts on the MLflow parent run.

Both are drawn by ``optuna.visualization`` from the run's own trials (the counted trials of this
DAG run: no discarded duplicate, no failed trial a retry replaced, no other run of a long-lived
study; :mod:`hpo_core.study.accounting`), copied into an in-memory study. The view gets the figures
as Plotly JSON and draws them with the plotly.js the plugin serves itself; MLflow gets PNG files
(``plots/*.png``) drawn with matplotlib, so its UI shows them without any script. A plot that cannot
be drawn is left out with the reason: the plots illustrate the study, the storage holds its result,
and no round or finalize fails for a plot.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
import optuna.visualization as vis
from mlflow.tracking import MlflowClient
from optuna.importance import FanovaImportanceEvaluator
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as om

from hpo_core.spec import StudySpec
from hpo_core.study import accounting

__all__ = [
    "ARTIFACT_DIR",
    "IMPORTANCE_LIMIT",
    "MIN_TRIALS_FOR_IMPORTANCE",
    "PLOT_LIMIT",
    "figures",
    "log_final_plots",
    "log_history_plot",
    "plot_study",
]

log = logging.getLogger(__name__)

#: The most finished trials a plot draws: a larger run's plots show its best tenth of these and its
#: most recent others (fANOVA and the parallel coordinates on 10,000 trials cost tens of seconds).
PLOT_LIMIT = 2_000
#: Completed trials needed before parameter importances are drawn (fANOVA on fewer says little).
MIN_TRIALS_FOR_IMPORTANCE = 4
#: The most trials fANOVA fits the importances on (chosen as for :data:`PLOT_LIMIT`), and the
#: trials up to which it uses Optuna's 64 trees (16 past it): fANOVA's cost grows faster than the
#: trials (64 trees: 2 s on 300 trials, 16 s on 1,000 here), and finalize must stay quick.
IMPORTANCE_LIMIT = 500
_FULL_FOREST_UP_TO = 200
#: Artifact folder of the plots on the parent run.
ARTIFACT_DIR = "plots"
#: Importances with a fixed seed: the same trials always give the same figure (the view caches it).
_IMPORTANCE_SEED = 0
#: What a plot function of ``optuna.visualization`` (Plotly or matplotlib) may refuse to draw with.
_CANNOT_DRAW = (ValueError, RuntimeError, TypeError)


def plot_study(
    spec: StudySpec, attrs: Mapping[str, Any], trials: list[FrozenTrial], *, limit: int = PLOT_LIMIT
) -> optuna.Study:
    """An in-memory study holding the run's finished, counted trials, for ``optuna.visualization``.

    ``attrs``: the study's attributes; ``trials``: its trials as just read (params and values are
    enough: :func:`hpo_core.storage.trials.read_trials` with a few attributes will do). Past
    ``limit`` trials, it holds the best tenth of ``limit`` and the most recent others.
    """
    counted = accounting.counted(accounting.ours(trials, attrs))
    finished = sorted((t for t in counted if t.state.is_finished()), key=lambda t: t.number)
    if len(finished) > limit:
        index, direction = accounting.score_index(spec), spec.all_directions[accounting.score_index(spec)]
        sign = -1.0 if direction == "maximize" else 1.0
        complete = [t for t in finished if t.state == TrialState.COMPLETE and t.values]
        best = sorted(complete, key=lambda t: sign * t.values[index])[: limit // 10]
        kept = {t.number for t in best} | {t.number for t in finished[-(limit - len(best)) :]}
        finished = [t for t in finished if t.number in kept]
    copy = optuna.create_study(directions=[StudyDirection[d.upper()] for d in spec.all_directions])
    copy.add_trials(finished)
    return copy


def _target(spec: StudySpec) -> tuple[Callable[[FrozenTrial], float] | None, str]:
    """The plotted objective: the only one, else the metric that ranks trials (``pareto_choice``)."""
    index = accounting.score_index(spec)
    if not spec.is_multi_objective:
        return None, spec.objective_metrics[index]
    return (lambda t: t.values[index]), spec.objective_metrics[index]


def _importances(
    plot_importances: Callable[..., Any], spec: StudySpec, attrs: Mapping[str, Any], trials: list[FrozenTrial]
) -> Callable[..., Any]:
    """``plot_importances`` drawn from at most :data:`IMPORTANCE_LIMIT` trials, with a seeded fANOVA
    (the same trials always give the same figure: the view caches it)."""
    fitted = plot_study(spec, attrs, trials, limit=IMPORTANCE_LIMIT)
    trees = 64 if _complete(fitted) <= _FULL_FOREST_UP_TO else 16
    evaluator = FanovaImportanceEvaluator(seed=_IMPORTANCE_SEED, n_trees=trees)

    def draw(_plot_copy: optuna.Study, **kwargs: Any) -> Any:
        return plot_importances(fitted, evaluator=evaluator, **kwargs)

    return draw


def _complete(plot_copy: optuna.Study) -> int:
    return len(plot_copy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def figures(spec: StudySpec, attrs: Mapping[str, Any], trials: list[FrozenTrial]) -> dict[str, Any]:
    """Plotly figures of the run as JSON-ready dicts: ``history``, ``parallel``, ``importance``.

    A figure that cannot be drawn yet is absent, with the reason under ``notes``.
    """
    plot_copy = plot_study(spec, attrs, trials)
    target, name = _target(spec)
    complete = _complete(plot_copy)
    out: dict[str, Any] = {"notes": {}}
    if complete == 0:
        out["notes"]["history"] = "no trial has completed yet"
        return out
    drawings: list[tuple[str, Callable[..., Any]]] = [("history", vis.plot_optimization_history)]
    if plot_copy.trials[0].params:
        drawings.append(("parallel", vis.plot_parallel_coordinate))
    if complete < MIN_TRIALS_FOR_IMPORTANCE:
        out["notes"]["importance"] = (
            f"parameter importances need {MIN_TRIALS_FOR_IMPORTANCE} completed trials ({complete} so far)"
        )
    else:
        drawings.append(("importance", _importances(vis.plot_param_importances, spec, attrs, trials)))
    for key, draw in drawings:
        try:
            figure = draw(plot_copy, target=target, target_name=name)
        except _CANNOT_DRAW as e:  # e.g. no parameter common to every trial
            out["notes"][key] = f"not available: {e}"
            continue
        out[key] = json.loads(figure.to_json())  # plotly's encoder turns numpy arrays into lists
    return out


def log_history_plot(
    mlflow_client: MlflowClient,
    parent_run_id: str,
    spec: StudySpec,
    attrs: Mapping[str, Any],
    trials: list[FrozenTrial],
) -> bool:
    """Log ``plots/optimization_history.png`` (value and best so far per trial) on the parent run.

    Called after each round, so the parent run shows the curve while the study runs. Returns whether
    a plot was logged (none before the first completed trial).
    """
    return _log(mlflow_client, parent_run_id, spec, attrs, trials, final=False)


def log_final_plots(
    mlflow_client: MlflowClient,
    parent_run_id: str,
    spec: StudySpec,
    attrs: Mapping[str, Any],
    trials: list[FrozenTrial],
) -> bool:
    """Log the history, parallel coordinates and (with enough trials) importances on the parent run."""
    return _log(mlflow_client, parent_run_id, spec, attrs, trials, final=True)


def _log(
    mlflow_client: MlflowClient,
    parent_run_id: str,
    spec: StudySpec,
    attrs: Mapping[str, Any],
    trials: list[FrozenTrial],
    *,
    final: bool,
) -> bool:
    plot_copy = plot_study(spec, attrs, trials)
    complete = _complete(plot_copy)
    if complete == 0:
        return False
    target, name = _target(spec)
    drawings: list[tuple[str, Callable[..., Any]]] = [("optimization_history", om.plot_optimization_history)]
    if final and plot_copy.trials[0].params:
        drawings.append(("parallel_coordinates", om.plot_parallel_coordinate))
    if final and complete >= MIN_TRIALS_FOR_IMPORTANCE:
        drawings.append(("param_importances", _importances(om.plot_param_importances, spec, attrs, trials)))
    matplotlib.use("Agg", force=True)  # files only: never a window, whatever the process's default
    with tempfile.TemporaryDirectory(prefix="hpo-plots-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        folder = Path(tmp)
        for file_name, draw in drawings:
            try:
                _save(draw(plot_copy, target=target, target_name=name), folder / f"{file_name}.png")
            except _CANNOT_DRAW as e:
                log.warning("plot %s not drawn: %s", file_name, e)
        if not any(folder.iterdir()):
            return False
        mlflow_client.log_artifacts(parent_run_id, str(folder), ARTIFACT_DIR)
    return True


def _save(axes: Any, path: Path) -> None:
    figure = axes.figure if hasattr(axes, "figure") else np.asarray(axes).flat[0].figure
    figure.set_size_inches(9, 5)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
