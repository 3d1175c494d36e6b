"""Nightly retuning through Airflow: three scheduled runs of one study on a data feed that changes.

Day 1 trains the first champion. On day 2 the feed's decision boundary has turned: the run is
warm-started from the champion and day 1's best, and its challenger beats the champion when both
are re-scored on day 2's data, so it is promoted. On day 3 the feed delivers only a few rows: the
challenger is worse than the champion on day 3's data and is not promoted. Every run goes through
``dag.test()`` with its logical date, real SQLite Optuna and MLflow, and real worker processes.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import timezone
from airflow.serialization.encoders import coerce_to_core_timetable
from airflow.timetables.base import TimeRestriction
from hpo_airflow import build_study_dag
from hpo_airflow.factory import START_DATE

from hpo_core.deployment import Deployment
from hpo_core.examples.drifting import day_data
from hpo_core.keys import StudyAttr, TrialAttr
from hpo_core.tracking import promotion
from tests.fixtures_core import make_spec, study_mapping, write_study

ROOT = Path(__file__).resolve().parent.parent
MODEL = "drifting_nightly"
NIGHTLY_STUDY: dict[str, Any] = {
    "name": "drifting_nightly",
    "description": "nightly retuning on a drifting feed",
    "objective": "hpo_core.examples.drifting:objective",
    "direction": "maximize",
    "metric": "roc_auc",
    "search_space": {
        "C": {"type": "float", "low": 0.001, "high": 100.0, "log": True},
        "fit_intercept": {"type": "categorical", "choices": [True, False]},
    },
    "sampler": {"type": "tpe", "seed": 3, "n_startup_trials": 2},
    "budget": {"n_trials": 3, "batch_size": 3, "max_rounds": 1},
    "trial": {"retries": 0, "execution_timeout": 120},
    "mlflow": {"experiment": "drifting_nightly", "registered_model": MODEL},
    "schedule": "0 3 * * *",
    "warm_start": {"mode": "new_study", "top_k": 2, "from_champion": True},
    "promotion": {"rule": "if_better", "min_improvement": 0.001},
}
NIGHTS = [dt.datetime(2025, 3, day, 3, tzinfo=dt.UTC) for day in (1, 2, 3)]
#: Trials per night, kept small (each is a worker process): night 2 has one beyond its warm start,
#: night 3 retrains only the champion's params (on too few rows).
TRIALS = {1: 2, 2: 3, 3: 1}


@pytest.fixture
def nightly_dag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, airflow_db: Path) -> Any:
    """The study's DAG, from a DAG folder of its own that ``dag.test()`` syncs as the dags bundle."""
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(ROOT / "dags" / "hpo_studies.py", folder / "hpo_studies.py")
    write_study(folder / "studies", NIGHTLY_STUDY)
    bundle = {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle"}
    bundles = [{**bundle, "kwargs": {"path": str(folder)}}]
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(bundles))
    bag = DagBag(dag_folder=str(folder))
    assert bag.import_errors == {}
    return bag.dags["hpo_drifting_nightly"]


def _versions(client: Any) -> dict[str, Any]:
    return {str(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}


def _aliases(client: Any) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(MODEL).aliases.items()}


def _assert_night_two_is_warm_started(deployment: Deployment, names: list[str]) -> None:
    """Night 2 is warm-started: its first trials are the enqueued champion and day 1's next best."""
    first, second = (optuna.load_study(study_name=n, storage=deployment.storage_url) for n in names[:2])
    warm = second.user_attrs[StudyAttr.WARM_START]
    assert warm["previous_study"] == names[0]
    assert warm["skipped"] == []
    enqueued = warm["enqueued"]
    assert enqueued[0]["source"] == f"champion {MODEL} version 1"
    assert enqueued[1]["source"].startswith(f"top 2 of study {names[0]}")
    ranked = sorted((t for t in first.trials if t.value is not None), key=lambda t: -float(t.value or 0))
    assert [e["params"] for e in enqueued] == [ranked[0].params, ranked[1].params]
    trials = sorted(second.trials, key=lambda t: t.number)
    assert [t.params for t in trials[: len(enqueued)]] == [e["params"] for e in enqueued]
    assert [t.user_attrs.get(TrialAttr.WARM_START) for t in trials] == [
        *(e["source"] for e in enqueued),
        *([None] * (len(trials) - len(enqueued))),
    ]
    assert first.user_attrs[StudyAttr.WARM_START]["enqueued"] == []  # nothing before night 1


@pytest.mark.slow
def test_three_nightly_runs_warm_start_and_promote_only_a_better_challenger(
    nightly_dag: Any, local_deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = mlflow.MlflowClient(tracking_uri=local_deployment.tracking_uri)
    runs: list[Any] = []
    for day, logical_date in enumerate(NIGHTS, start=1):
        monkeypatch.setenv("HPO_EXAMPLE_DAY", str(day))
        conf = {"n_trials": TRIALS[day], "batch_size": TRIALS[day]}
        dag_run = nightly_dag.test(logical_date=logical_date, run_conf=conf)
        assert dag_run.state == "success", f"night {day}"
        runs.append(dag_run)
        # After every night the champion loads and predicts.
        mlflow.set_tracking_uri(local_deployment.tracking_uri)
        champion = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        x, _ = day_data(day, held_out=True)
        assert len(champion.predict(x[:5])) == 5

    # Each run is its own study, named from its logical date.
    names = [f"drifting_nightly.2025-03-0{day}T030000Z" for day in (1, 2, 3)]
    studies = {s.study_name: s for s in optuna.get_all_study_summaries(local_deployment.storage_url)}
    assert set(names) <= set(studies)
    assert [studies[n].user_attrs[StudyAttr.RUN_ID] for n in names] == [r.run_id for r in runs]

    _assert_night_two_is_warm_started(local_deployment, names)

    # Night 1: no champion yet. Night 2: better on night 2's data, promoted. Night 3: worse, not.
    versions = _versions(client)
    assert sorted(versions) == ["1", "2", "3"]
    v1, v2, v3 = (versions[n].tags for n in ("1", "2", "3"))
    assert v1[promotion.TAG_DECISION] == "promoted"
    assert v1["hpo.decision.comparison"] == promotion.COMPARISON_NONE
    assert v1["hpo.decision.reason"] == "rule 'if_better': no champion yet"

    assert v2[promotion.TAG_DECISION] == "promoted"
    assert v2["hpo.decision.comparison"].startswith(promotion.COMPARISON_RESCORED)
    assert v2["hpo.decision.champion_version"] == "1"
    assert float(v2["hpo.decision.challenger_score"]) > float(v2["hpo.decision.champion_score"]) + 0.001

    assert v3[promotion.TAG_DECISION] == "not promoted"
    assert v3["hpo.decision.comparison"].startswith(promotion.COMPARISON_RESCORED)
    assert v3["hpo.decision.champion_version"] == "2"
    assert float(v3["hpo.decision.challenger_score"]) < float(v3["hpo.decision.champion_score"])
    assert "not better" in v3["hpo.decision.reason"]
    # The nights trained on different data: their stored values alone would not be comparable.
    assert len({v1["hpo.data_fingerprint"], v2["hpo.data_fingerprint"], v3["hpo.data_fingerprint"]}) == 3

    for number, tags in (("1", v1), ("2", v2), ("3", v3)):
        description = versions[number].description
        assert "decision: " in description and tags["hpo.decision.comparison"] in description
        # Lineage of every version: study, trial, params, metric and value, DAG run, data, code.
        study_name = names[int(number) - 1]
        assert tags["hpo.study"] == study_name
        assert tags["hpo.dag_id"] == "hpo_drifting_nightly"
        assert tags["hpo.run_id"] == runs[int(number) - 1].run_id
        assert tags["hpo.metric"] == "roc_auc"
        study = optuna.load_study(study_name=study_name, storage=local_deployment.storage_url)
        best = study.trials[int(tags["hpo.trial_number"])]
        assert float(tags["hpo.value"]) == pytest.approx(best.value)
        assert json.loads(tags["hpo.params"]) == best.params
        assert len(tags["hpo.data_fingerprint"]) == 16
        assert tags["hpo.code_version"] == "drifting/1"

    assert _aliases(client) == {"champion": "2", "previous_champion": "1", "challenger": "3"}


@pytest.mark.parametrize("schedule", ["0 3 * * *", "@daily", "@hourly", "@weekly"])
def test_a_scheduled_study_runs_one_at_a_time_without_catching_up(schedule: str) -> None:
    dag = build_study_dag(make_spec(schedule=schedule))
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    timetable = coerce_to_core_timetable(dag.timetable)
    assert timetable.periodic
    # After downtime the next run is the latest due one, not a backfill from the start date.
    now = dt.datetime.now(dt.UTC)
    earliest = timezone.coerce_datetime(START_DATE)
    info = timetable.next_dagrun_info(
        last_automated_data_interval=None,
        restriction=TimeRestriction(earliest=earliest, latest=None, catchup=False),
    )
    assert info is not None
    assert now - dt.timedelta(days=7, minutes=5) <= info.run_after <= now + dt.timedelta(days=7)


def test_unscheduled_study_is_manual_only() -> None:
    dag = build_study_dag(make_spec(schedule=None))
    assert not coerce_to_core_timetable(dag.timetable).periodic


def test_bad_cron_is_an_error_of_its_study_file_only(tmp_path: Path) -> None:
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(ROOT / "dags" / "hpo_studies.py", folder / "hpo_studies.py")
    shutil.copy(ROOT / "dags" / "hpo_promotion.py", folder / "hpo_promotion.py")
    write_study(folder / "studies", study_mapping(name="fine", schedule="@daily"))
    write_study(folder / "studies", study_mapping(name="typo", schedule="0 25 * * *"))
    bag = DagBag(dag_folder=str(folder))
    assert {"hpo_fine", "hpo_promote_model"} <= set(bag.dags)
    assert "hpo_typo" not in bag.dags
    (message,) = bag.import_errors.values()
    assert f"{folder / 'studies' / 'typo.yaml'}: schedule: '0 25 * * *' is not a cron expression" in message
