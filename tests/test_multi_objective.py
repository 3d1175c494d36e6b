"""A study with several objectives whose chosen metric is not the first, end to end on the engine:
start, suggest, the real warm slot worker, observe and finalize; then ``hpo summary``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hpo_airflow.backends.local import slot_status
from optuna.trial import TrialState

from hpo_core import cli
from hpo_core.deployment import Deployment
from hpo_core.study.finalize import finalize_study
from hpo_core.study.observe import observe_round
from hpo_core.study.state import load_run
from hpo_core.study.suggest import suggest_batch
from hpo_core.worker import TrialOutcome, run_slot

X = {"type": "float", "low": -5.0, "high": 5.0}


def test_the_chosen_metric_ranks_rounds_summary_and_finalize(
    local_deployment: Deployment, start_toy_study: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    # loss is minimised and listed first; score (= x) is maximised and chosen.
    name = start_toy_study(
        objective="tests.objectives:two_metrics",
        direction=None,
        metric=None,
        directions=["minimize", "maximize"],
        metrics=["loss", "score"],
        pareto_choice={"metric": "score"},
        search_space={"x": X},
        sampler={"type": "nsga2", "seed": 5},
        budget={"n_trials": 4, "batch_size": 2, "max_rounds": 2},
        stopping={"patience": 1, "max_failed_fraction": 0.5},
        mlflow={"experiment": "two_metrics"},
    )
    summaries = []
    for round_number in (1, 2):
        batch, reason = suggest_batch(deployment=local_deployment, study_name=name, round_number=round_number)
        assert reason is None
        lines: list[str] = []
        outcomes = run_slot(
            deployment=local_deployment,
            study_name=name,
            trial_numbers=[entry["trial_number"] for entry in batch],
            relay=lines.append,
        )
        assert [o.state for o in outcomes] == ["COMPLETE", "COMPLETE"], "\n".join(lines)
        observed = observe_round(deployment=local_deployment, study_name=name, round_number=round_number)
        summaries.append(observed)

    study = load_run(local_deployment, name).study
    trials = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    scores = {t.number: t.values[1] for t in trials}
    round_1 = [t.values[1] for t in trials if t.user_attrs["hpo.round"] == 1]
    # Best and round best by score, maximised (not by the first objective's direction).
    assert summaries[0]["round_best"] == summaries[0]["best_value"] == max(round_1)
    assert summaries[1]["best_value"] == max(scores.values())

    result = finalize_study(deployment=local_deployment, study_name=name)
    assert result["best_metric"] == "score"
    assert result["best_value"] == max(scores.values()) == result["best_values"]["score"]
    assert scores[result["best_trial"]] == result["best_value"]

    assert cli.main(["summary", "--study", name]) == 0
    out = capsys.readouterr().out
    assert f"best value       score={result['best_value']}  (trial {result['best_trial']})" in out
    summary = cli.study_summary(local_deployment, name)
    assert (summary["best_metric"], summary["best_value"]) == ("score", result["best_value"])


def test_slot_names_show_pruned_trials_and_the_chosen_metric() -> None:
    """The grid's name of a slot task once it ran (Airflow shows a pruned trial's task as success)."""
    pruned = TrialOutcome(7, 7, "PRUNED", reason="pruned: mean AUC 0.61 after fold 1")
    complete = TrialOutcome(8, 8, "COMPLETE", values=[0.5, 2.0])
    failed = TrialOutcome(9, 9, "FAIL", reason="RuntimeError: boom")
    assert slot_status([pruned], maximize=True) == " · pruned"
    assert slot_status([failed], maximize=True) == ""  # its task is red already
    assert slot_status([complete], maximize=True) == ""
    other = TrialOutcome(10, 10, "COMPLETE", values=[0.1, 3.0])
    assert slot_status([complete, pruned, failed, other], maximize=True, score_index=1) == (
        " · 2 done · 1 pruned · 1 failed · best 3"
    )
    assert slot_status([complete, other], maximize=False, score_index=0) == " · 2 done · best 0.1"
