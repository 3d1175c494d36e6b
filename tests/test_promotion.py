"""Promotion through a real MLflow registry: the spec's rule, manual promote and rollback (CLI and DAG).

Model versions are real scikit-learn models registered with the project's own registry code; after
every step ``models:/<name>@champion`` is loaded and asked to predict.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import ParamValidationError
from hpo_airflow.promotion_dag import promotion_params
from sklearn.linear_model import LinearRegression, LogisticRegression

from hpo_core.cli import main as hpo
from hpo_core.deployment import Deployment
from hpo_core.errors import PromotionError
from hpo_core.examples.drifting import day_data
from hpo_core.spec import StudySpec, validate_mapping
from hpo_core.tracking import promotion, registry, runs

ROOT = Path(__file__).resolve().parent.parent
MODEL = "promo_demo"


def promo_spec(objective: str = "hpo_core.examples.quadratic:objective", **promotion_rule: Any) -> StudySpec:
    """A study registering ``promo_demo``; the objective's module may have an evaluate hook."""
    return validate_mapping(
        {
            "name": "promo_demo",
            "objective": objective,
            "direction": "maximize",
            "metric": "roc_auc",
            "search_space": {"C": {"type": "float", "low": 0.001, "high": 100.0, "log": True}},
            "budget": {"n_trials": 2, "batch_size": 2, "max_rounds": 1},
            "mlflow": {"experiment": "promo_demo", "registered_model": MODEL},
            "promotion": promotion_rule or {"rule": "never"},
        },
        source="<test>",
    )


@pytest.fixture
def client(local_deployment: Deployment) -> Any:
    """The MLflow client of this test's registry (also the process-wide URIs, for ``models:/``)."""
    return runs.client(local_deployment)


@pytest.fixture
def register(client: Any, local_deployment: Deployment) -> Callable[..., str]:
    """``register(day=1, value=0.9, fingerprint="data-a", model=None) -> version``: a real model version."""
    experiment_id = runs.ensure_experiment(client, "promo_demo", local_deployment.artifact_root)
    counter = iter(range(1000))

    def _register(
        *, day: int = 1, value: float = 0.9, fingerprint: str | None = "data-a", model: Any = None
    ) -> str:
        x, y = day_data(day)
        fitted = (model or LogisticRegression(max_iter=500)).fit(x, y)
        with mlflow.start_run(experiment_id=experiment_id):
            info = mlflow.sklearn.log_model(fitted, name="model", pip_requirements=["scikit-learn"])
        tags = {
            "hpo.study": "promo_demo.test",
            "hpo.trial_number": str(next(counter)),
            "hpo.metric": "roc_auc",
            "hpo.value": repr(value),
        }
        if fingerprint is not None:
            tags["hpo.data_fingerprint"] = fingerprint
        return registry.register_trial_model(client, name=MODEL, model_uri=str(info.model_uri), tags=tags)

    return _register


def aliases(client: Any) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(MODEL).aliases.items()}


def registry_state(client: Any) -> dict[str, Any]:
    """Everything a refused request must leave alone: aliases, every version's tags and description."""
    versions = client.search_model_versions(f"name = '{MODEL}'")
    return {
        "aliases": aliases(client),
        "versions": {str(v.version): (dict(v.tags), v.description) for v in versions},
    }


def champion_predicts() -> str:
    """Load ``models:/promo_demo@champion``, predict a few rows, return the champion's version."""
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    x, _ = day_data(1, held_out=True)
    assert len(model.predict(x[:4])) == 4
    return str(mlflow.MlflowClient().get_model_version_by_alias(MODEL, "champion").version)


# --- the rule, as finalize applies it --------------------------------------------------------


def test_rule_never_leaves_the_decision_to_a_person(client: Any, register: Callable[..., str]) -> None:
    v1 = register()
    result = promotion.apply_rule(client, promo_spec(rule="never"), version=v1)
    assert result.promoted is False
    assert "a person decides" in result.reason
    assert aliases(client) == {"challenger": v1}
    tags = client.get_model_version(MODEL, v1).tags
    assert tags[promotion.TAG_DECISION] == "not promoted"
    assert tags["hpo.decision.rule"] == "never"
    assert tags["hpo.decision.comparison"] == promotion.COMPARISON_NONE


def test_rule_always_promotes_and_keeps_the_old_champion_for_rollback(
    client: Any, register: Callable[..., str]
) -> None:
    spec = promo_spec(rule="always")
    v1 = register()
    assert promotion.apply_rule(client, spec, version=v1).promoted
    assert champion_predicts() == v1
    v2 = register(value=0.1)  # "always" does not look at values
    result = promotion.apply_rule(client, spec, version=v2)
    assert result.promoted and result.previous_champion == v1
    assert aliases(client) == {"champion": v2, "previous_champion": v1, "challenger": v2}
    assert champion_predicts() == v2
    # finalize may run twice: the recorded decision stands, nothing moves.
    before = registry_state(client)
    again = promotion.apply_rule(client, spec, version=v2)
    assert again.promoted and again.reason == result.reason
    assert registry_state(client) == before


def test_if_better_without_an_evaluate_hook_compares_stored_values_only_on_the_same_data(
    client: Any, register: Callable[..., str]
) -> None:
    spec = promo_spec(rule="if_better", min_improvement=0.01)  # quadratic.py has no evaluate()
    v1 = register(value=0.90, fingerprint="data-a")
    assert promotion.apply_rule(client, spec, version=v1).reason == "rule 'if_better': no champion yet"

    v2 = register(value=0.905, fingerprint="data-a")
    small = promotion.apply_rule(client, spec, version=v2)
    assert not small.promoted and small.reason.endswith("not better enough")
    assert small.comparison == f"{promotion.COMPARISON_STORED} (data-a)"

    v3 = register(value=0.95, fingerprint="data-a")
    better = promotion.apply_rule(client, spec, version=v3)
    assert better.promoted
    assert (better.challenger_score, better.champion_score) == (0.95, 0.90)
    assert better.comparison == f"{promotion.COMPARISON_STORED} (data-a)"

    v4 = register(value=0.99, fingerprint="data-b")
    other_data = promotion.apply_rule(client, spec, version=v4)
    assert not other_data.promoted
    assert other_data.comparison == promotion.COMPARISON_NOT_COMPARABLE
    assert "different data (fingerprint data-b vs data-a)" in other_data.reason

    v5 = register(value=0.99, fingerprint=None)
    unknown = promotion.apply_rule(client, spec, version=v5)
    assert not unknown.promoted and "a data fingerprint is missing" in unknown.reason

    assert aliases(client) == {"champion": v3, "previous_champion": v1, "challenger": v5}
    for version, decision in ((v2, small), (v3, better), (v4, other_data), (v5, unknown)):
        record = client.get_model_version(MODEL, version)
        assert record.tags["hpo.decision.comparison"] == decision.comparison
        assert record.tags["hpo.decision.reason"] == decision.reason
        assert decision.reason in record.description


def test_if_better_in_the_minimizing_direction(client: Any, register: Callable[..., str]) -> None:
    spec = promo_spec(rule="if_better", direction="minimize")
    v1 = register(value=0.30)
    promotion.apply_rule(client, spec, version=v1)
    v2 = register(value=0.20)
    result = promotion.apply_rule(client, spec, version=v2)
    assert result.promoted and "improvement +0.1" in result.reason
    v3 = register(value=0.25)
    assert not promotion.apply_rule(client, spec, version=v3).promoted
    assert champion_predicts() == v2


def test_if_better_with_an_evaluate_hook_rescores_both_models_on_this_runs_data(
    client: Any, register: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = promo_spec("hpo_core.examples.drifting:objective", rule="if_better")
    old = register(day=1, value=0.99)
    promotion.apply_rule(client, spec, version=old)
    # Day 2's feed has turned: the new model's stored value is lower, but on day 2's data it wins.
    monkeypatch.setenv("HPO_EXAMPLE_DAY", "2")
    new = register(day=2, value=0.5, fingerprint="data-b")
    result = promotion.apply_rule(client, spec, version=new)
    assert result.promoted
    assert result.comparison.startswith(promotion.COMPARISON_RESCORED)
    assert result.challenger_score is not None and result.champion_score is not None
    assert result.challenger_score > result.champion_score + 0.2
    assert champion_predicts() == new


def test_a_champion_the_hook_cannot_score_is_not_replaced_silently(
    client: Any, register: Callable[..., str]
) -> None:
    spec = promo_spec("hpo_core.examples.drifting:objective", rule="if_better")
    regressor = register(model=LinearRegression())  # no predict_proba: evaluate() fails on it
    promotion.apply_rule(client, promo_spec(rule="always"), version=regressor)
    challenger = register()
    result = promotion.apply_rule(client, spec, version=challenger)
    assert not result.promoted
    assert result.comparison == promotion.COMPARISON_RESCORING_FAILED
    assert f"failed on the champion (version {regressor})" in result.reason
    assert aliases(client)["champion"] == regressor


# --- by hand: the command line -----------------------------------------------------------------


def test_cli_promote_then_rollback_records_who_and_why(
    client: Any,
    register: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    v1, v2 = register(), register()
    assert hpo(["promote", MODEL, v1, "--reason", "first release", "--actor", "alice"]) == 0
    assert aliases(client) == {"champion": v1, "challenger": v2}
    assert champion_predicts() == v1

    monkeypatch.setenv("USER", "bob")
    assert hpo(["promote", MODEL, v2, "--reason", "better on March data"]) == 0
    assert f"champion is version {v2}; version {v1} is previous_champion" in capsys.readouterr().out
    assert aliases(client) == {"champion": v2, "previous_champion": v1, "challenger": v2}
    assert champion_predicts() == v2
    tags = client.get_model_version(MODEL, v2).tags
    assert (tags["hpo.manual.actor"], tags["hpo.manual.reason"]) == ("bob", "better on March data")
    assert tags["hpo.manual.action"] == "promoted to champion"
    description = client.get_model_version(MODEL, v2).description
    assert "promoted to champion by bob: better on March data" in description

    assert hpo(["rollback", MODEL, "--reason", "v2 misroutes orders", "--actor", "carol"]) == 0
    assert aliases(client) == {"champion": v1, "challenger": v2}
    assert champion_predicts() == v1
    restored = client.get_model_version(MODEL, v1)
    assert restored.tags["hpo.manual.actor"] == "carol"
    assert restored.tags["hpo.manual.action"] == f"champion again by rollback from version {v2}"
    rolled_back = client.get_model_version(MODEL, v2)
    assert rolled_back.tags["hpo.manual.action"] == f"rolled back: champion returned to version {v1}"
    assert "rolled back" in rolled_back.description and "v2 misroutes orders" in rolled_back.description


REFUSED = [
    (["promote", MODEL, "99", "--reason", "typo"], f"'{MODEL}' has no version 99 (versions: [1, 2])"),
    (["promote", "nope", "1", "--reason", "typo"], "registered model 'nope' does not exist"),
    (["promote", MODEL, "latest", "--reason", "typo"], "version must be a number, got 'latest'"),
    (["promote", MODEL, "2", "--reason", "  "], "say why: reason is empty"),
    (["rollback", MODEL, "--reason", "nothing to go back to"], "has no 'previous_champion' alias"),
]


def test_cli_refused_request_is_a_clear_error_that_changes_nothing(
    client: Any, register: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    v1, _ = register(), register()
    assert hpo(["promote", MODEL, v1, "--reason", "first release"]) == 0
    capsys.readouterr()
    before = registry_state(client)
    for argv, message in REFUSED:
        assert hpo(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert registry_state(client) == before, argv
    assert champion_predicts() == v1


def test_cli_requires_a_reason() -> None:
    with pytest.raises(SystemExit) as exit_info:
        hpo(["promote", MODEL, "1"])
    assert exit_info.value.code == 2


def test_promote_missing_version_raises_promotion_error(
    local_deployment: Deployment, register: Callable[..., str]
) -> None:
    register()
    with pytest.raises(PromotionError, match=r"has no version 7 \(versions: \[1\]\); nothing changed"):
        promotion.promote(MODEL, "7", actor="alice", reason="typo", deployment=local_deployment)


# --- by hand: the promotion DAG ----------------------------------------------------------------


def test_promotion_form_refuses_a_bad_request_at_trigger_time() -> None:
    def form(values: dict[str, str]) -> dict[str, Any]:
        params = ParamsDict(promotion_params())
        params.update(values)
        return params.validate()

    good = {"model_name": MODEL, "version": "3", "reason": "better"}
    assert form(good) == good
    assert form({**good, "version": "rollback"})["version"] == "rollback"
    for bad in ({**good, "version": "latest"}, {**good, "version": "0"}, {**good, "reason": ""}):
        with pytest.raises(ParamValidationError):
            form(bad)
    with pytest.raises(ParamValidationError):
        form({"model_name": MODEL, "version": "3"})  # no reason given


@pytest.mark.slow
def test_promotion_dag_promotes_and_rolls_back_recording_the_triggering_user(
    airflow_db: Path, client: Any, register: Callable[..., str]
) -> None:
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["hpo_promote_model"]
    v1, v2 = register(), register()

    def trigger(version: str, reason: str) -> str:
        conf = {"model_name": MODEL, "version": version, "reason": reason}
        run = dag.test(logical_date=None, run_conf=conf)
        return str(run.state)

    assert trigger(v1, "first release") == "success"
    assert aliases(client) == {"champion": v1, "challenger": v2}
    assert champion_predicts() == v1
    assert trigger(v2, "better on March data") == "success"
    assert aliases(client) == {"champion": v2, "previous_champion": v1, "challenger": v2}
    assert champion_predicts() == v2
    tags = client.get_model_version(MODEL, v2).tags
    # dag.test() triggers as user "dag_test"; a UI trigger records the logged-in user.
    assert (tags["hpo.manual.actor"], tags["hpo.manual.reason"]) == ("dag_test", "better on March data")

    assert trigger("rollback", "v2 misroutes orders") == "success"
    assert aliases(client) == {"champion": v1, "challenger": v2}
    assert champion_predicts() == v1
    assert client.get_model_version(MODEL, v1).tags["hpo.manual.reason"] == "v2 misroutes orders"

    before = registry_state(client)
    assert trigger("99", "typo") == "failed"
    assert registry_state(client) == before
    assert champion_predicts() == v1
