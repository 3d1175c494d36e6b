"""Promotion through the MLflow model registry: the spec's rule after a study, and by hand.

After ``finalize`` registers a study's best model as the ``challenger``, :func:`apply_rule` decides
whether it becomes the ``champion`` (rule ``never``, ``always`` or ``if_better``) and writes the
decision, its reason and the comparison it rests on onto the version (tags and description).
People use :func:`promote` and :func:`rollback` (``hpo promote`` / ``hpo rollback``, or the
``hpo_promote_model`` DAG); both record who and why. Whenever the champion changes, the version it
replaces keeps the alias ``previous_champion``, which is what a rollback returns to.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import mlflow.models
import mlflow.pyfunc
import mlflow.sklearn
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hpo_core.deployment import Deployment
from hpo_core.errors import ObjectiveError, PromotionError, TrackingError
from hpo_core.keys import Tag
from hpo_core.space import import_callable
from hpo_core.spec import StudySpec
from hpo_core.tracking.registry import CHALLENGER, CHAMPION, PREVIOUS_CHAMPION, quote
from hpo_core.tracking.runs import client, not_found

__all__ = [
    "COMPARISON_NONE",
    "COMPARISON_NOT_COMPARABLE",
    "COMPARISON_RESCORED",
    "COMPARISON_RESCORING_FAILED",
    "COMPARISON_STORED",
    "EvaluationContext",
    "PromotionDecision",
    "apply_rule",
    "decide",
    "promote",
    "rollback",
]

log = logging.getLogger(__name__)

#: Both models were scored by the objective's ``evaluate(model, ctx)`` hook, in the same task.
COMPARISON_RESCORED = "re-scored on this run's data"
#: The stored study values were compared: both versions were trained on the same data.
COMPARISON_STORED = "stored values, same data fingerprint"
#: The stored values were not comparable (different or unknown data): nothing was compared.
COMPARISON_NOT_COMPARABLE = "not comparable"
#: The evaluate hook failed on one of the models.
COMPARISON_RESCORING_FAILED = "re-scoring failed"
#: No comparison was needed (rule ``never`` / ``always``, no champion yet, already champion).
COMPARISON_NONE = "none"

# Tags of the automatic decision (on the challenger) and of a person's action (on the version acted upon).
TAG_DECISION = Tag.DECISION
TAG_DECISION_PREFIX = Tag.DECISION_PREFIX
TAG_MANUAL_PREFIX = Tag.MANUAL_PREFIX

_EVALUATE_HOOK = "evaluate"


@dataclass(frozen=True)
class PromotionDecision:
    """What happened to one model version and why."""

    model_name: str
    version: str
    promoted: bool
    rule: str
    comparison: str
    reason: str
    actor: str
    champion_version: str | None = None
    challenger_score: float | None = None
    champion_score: float | None = None
    previous_champion: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for XCom, logs and the command line."""
        return asdict(self)


class EvaluationContext:
    """What the objective's ``evaluate(model, ctx)`` hook gets when finalize re-scores models.

    The hook loads this run's data (as the objective does) and scores ``model`` on it. It may
    call :meth:`set_lineage` to say which data that was; the fingerprint is recorded with the
    decision.
    """

    def __init__(self, *, spec: StudySpec, model_name: str, version: str, role: str, seed: int) -> None:
        self.spec = spec
        self.model_name = model_name
        self.version = version
        self.role = role
        self.seed = seed
        self.lineage: dict[str, str] = {}

    def set_lineage(self, *, data_fingerprint: str | None = None, code_version: str | None = None) -> None:
        """Record what the model was scored on."""
        if data_fingerprint is not None:
            self.lineage["data_fingerprint"] = str(data_fingerprint)
        if code_version is not None:
            self.lineage["code_version"] = str(code_version)

    def report(self, value: float, step: int) -> None:
        """Accepted for objectives that share code with the trial path; nothing to prune here."""

    def should_prune(self) -> bool:
        """Never: re-scoring runs to the end."""
        return False

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        """Accepted and logged locally; re-scoring has no trial run to log to."""
        log.info("evaluate %s v%s: %s=%s", self.model_name, self.version, key, value)


# --- the rule, after a study ---------------------------------------------------------------


def decide(mlflow_client: MlflowClient, spec: StudySpec, *, version: str, seed: int = 0) -> PromotionDecision:
    """Decide, by the spec's promotion rule, whether ``version`` should become the champion.

    Changes nothing in the registry. ``if_better`` re-scores both models with the objective's
    ``evaluate`` hook when it has one; otherwise it compares the stored values only when both
    versions carry the same data fingerprint.
    """
    name = _model_name(spec)
    rule = spec.promotion.rule
    champion = _alias_version(mlflow_client, name, CHAMPION)

    def decision(promoted: bool, comparison: str, reason: str, **scores: Any) -> PromotionDecision:
        return PromotionDecision(
            model_name=name,
            version=version,
            promoted=promoted,
            rule=rule,
            comparison=comparison,
            reason=reason,
            actor="finalize",
            champion_version=None if champion is None else str(champion.version),
            **scores,
        )

    if champion is not None and str(champion.version) == version:
        return decision(False, COMPARISON_NONE, f"version {version} already is the {CHAMPION}")
    if rule == "never":
        return decision(
            False, COMPARISON_NONE, f"rule 'never': a person decides (hpo promote {name} {version})"
        )
    if rule == "always":
        return decision(True, COMPARISON_NONE, "rule 'always': every new challenger becomes champion")
    if champion is None:
        return decision(True, COMPARISON_NONE, f"rule 'if_better': no {CHAMPION} yet")
    hook = _evaluate_hook(spec)
    if hook is not None:
        return _compare_rescored(
            spec,
            hook=hook,
            version=version,
            champion_version=str(champion.version),
            seed=seed,
            decision=decision,
        )
    return _compare_stored(mlflow_client, spec, version=version, champion=champion, decision=decision)


def apply_rule(
    mlflow_client: MlflowClient, spec: StudySpec, *, version: str, seed: int = 0
) -> PromotionDecision:
    """Decide for the new ``version`` (see :func:`decide`), move the aliases, record the decision.

    Idempotent: a version that already carries a decision keeps it (finalize may run twice).
    """
    name = _model_name(spec)
    recorded = _recorded_decision(mlflow_client, name, version)
    if recorded is not None:
        log.info("%s version %s already decided: %s", name, version, recorded.reason)
        return recorded
    result = decide(mlflow_client, spec, version=version, seed=seed)
    previous = None
    if result.promoted:
        previous = _make_champion(mlflow_client, name, version, actor="finalize", reason=result.reason)
        result = PromotionDecision(**{**result.to_dict(), "previous_champion": previous})
    _record_decision(mlflow_client, result)
    log.info(
        "%s version %s %s (%s; comparison: %s)",
        name,
        version,
        f"promoted to {CHAMPION}" if result.promoted else "not promoted",
        result.reason,
        result.comparison,
    )
    return result


def _compare_rescored(
    spec: StudySpec,
    *,
    hook: Callable[..., Any],
    version: str,
    champion_version: str,
    seed: int,
    decision: Callable[..., PromotionDecision],
) -> PromotionDecision:
    name = _model_name(spec)
    scores: dict[str, float] = {}
    fingerprints: dict[str, str] = {}
    for role, number in (("challenger", version), ("champion", champion_version)):
        ctx = EvaluationContext(spec=spec, model_name=name, version=number, role=role, seed=seed)
        try:
            model = _load_model(f"models:/{name}/{number}")
            scores[role] = _score(hook(model, ctx), spec)
        except Exception as e:  # recorded on the version: a person can read why and decide
            log.exception("re-scoring %s version %s failed", name, number)
            return decision(
                False,
                COMPARISON_RESCORING_FAILED,
                f"the evaluate hook failed on the {role} (version {number}): {type(e).__name__}: {e}; "
                "not promoted, a person decides",
            )
        if "data_fingerprint" in ctx.lineage:
            fingerprints[role] = ctx.lineage["data_fingerprint"]
    data = f" (data {fingerprints['challenger']})" if fingerprints.get("challenger") else ""
    return _verdict(
        spec,
        challenger=scores["challenger"],
        champion=scores["champion"],
        champion_version=champion_version,
        comparison=f"{COMPARISON_RESCORED}{data}",
        decision=decision,
    )


def _compare_stored(
    mlflow_client: MlflowClient,
    spec: StudySpec,
    *,
    version: str,
    champion: ModelVersion,
    decision: Callable[..., PromotionDecision],
) -> PromotionDecision:
    name = _model_name(spec)
    challenger = mlflow_client.get_model_version(name, version)
    ours, theirs = challenger.tags or {}, champion.tags or {}
    fp_ours, fp_theirs = ours.get("hpo.data_fingerprint"), theirs.get("hpo.data_fingerprint")
    metric_ours, metric_theirs = ours.get("hpo.metric"), theirs.get("hpo.metric")
    problem = None
    if not fp_ours or not fp_theirs:
        problem = "a data fingerprint is missing (the objective does not call ctx.set_lineage)"
    elif fp_ours != fp_theirs:
        problem = f"they were trained on different data (fingerprint {fp_ours} vs {fp_theirs})"
    elif metric_ours != metric_theirs:
        problem = f"they were scored on different metrics ({metric_ours} vs {metric_theirs})"
    challenger_score, champion_score = _float(ours.get("hpo.value")), _float(theirs.get("hpo.value"))
    if problem is None and (challenger_score is None or champion_score is None):
        problem = "a stored value ('hpo.value' tag) is missing"
    if problem is not None:
        return decision(
            False,
            COMPARISON_NOT_COMPARABLE,
            f"stored values of version {version} and {CHAMPION} version {champion.version} are not "
            f"comparable: {problem}, and the objective has no evaluate(model, ctx) hook to re-score "
            "them; not promoted, a person decides",
        )
    assert challenger_score is not None and champion_score is not None
    return _verdict(
        spec,
        challenger=challenger_score,
        champion=champion_score,
        champion_version=str(champion.version),
        comparison=f"{COMPARISON_STORED} ({fp_ours})",
        decision=decision,
    )


def _verdict(
    spec: StudySpec,
    *,
    challenger: float,
    champion: float,
    champion_version: str,
    comparison: str,
    decision: Callable[..., PromotionDecision],
) -> PromotionDecision:
    direction = spec.promotion_direction
    gain = challenger - champion if direction == "maximize" else champion - challenger
    needed = spec.promotion.min_improvement
    metric = spec.score_metric
    promoted = gain > 0 and gain >= needed
    verdict = "better" if promoted else "not better enough" if gain > 0 else "not better"
    reason = (
        f"rule 'if_better' ({direction} {metric}, min_improvement {needed:g}): challenger "
        f"{challenger:.6g} vs {CHAMPION} version {champion_version} {champion:.6g}, "
        f"improvement {gain:+.6g}: {verdict}"
    )
    return decision(promoted, comparison, reason, challenger_score=challenger, champion_score=champion)


# --- by hand -------------------------------------------------------------------------------


def promote(
    name: str, version: str | int, *, actor: str, reason: str, deployment: Deployment
) -> PromotionDecision:
    """Make ``version`` of ``name`` the champion; the replaced champion becomes ``previous_champion``.

    Raises:
        PromotionError: the model or version does not exist or is not ready, or ``reason`` is
            empty; nothing is changed then.
    """
    _require(actor, reason)
    mlflow_client = client(deployment)
    number = _existing_version(mlflow_client, name, str(version))
    champion = _alias_version(mlflow_client, name, CHAMPION)
    if champion is not None and str(champion.version) == number:
        result = PromotionDecision(
            model_name=name,
            version=number,
            promoted=False,
            rule="manual",
            comparison=COMPARISON_NONE,
            reason=f"version {number} already is the {CHAMPION}; nothing changed",
            actor=actor,
            champion_version=number,
        )
        log.info("%s", result.reason)
        return result
    previous = _make_champion(mlflow_client, name, number, actor=actor, reason=reason)
    result = PromotionDecision(
        model_name=name,
        version=number,
        promoted=True,
        rule="manual",
        comparison=COMPARISON_NONE,
        reason=reason,
        actor=actor,
        champion_version=previous,
        previous_champion=previous,
    )
    _record_manual(mlflow_client, name, number, action=f"promoted to {CHAMPION}", actor=actor, reason=reason)
    log.info("%s version %s promoted to %s by %s: %s", name, number, CHAMPION, actor, reason)
    return result


def rollback(name: str, *, actor: str, reason: str, deployment: Deployment) -> PromotionDecision:
    """Give ``champion`` back to the ``previous_champion`` version, and drop that alias.

    Raises:
        PromotionError: the model has no ``previous_champion`` (nothing to roll back to), or
            ``reason`` is empty; nothing is changed then.
    """
    _require(actor, reason)
    mlflow_client = client(deployment)
    _existing_model(mlflow_client, name)
    previous = _alias_version(mlflow_client, name, PREVIOUS_CHAMPION)
    if previous is None:
        raise PromotionError(
            f"model {name!r} has no {PREVIOUS_CHAMPION!r} alias: nothing to roll back to; "
            f"promote a version by number instead (hpo promote {name} <version>)"
        )
    restored = str(previous.version)
    current = _alias_version(mlflow_client, name, CHAMPION)
    replaced = None if current is None else str(current.version)
    mlflow_client.set_registered_model_alias(name, CHAMPION, restored)
    mlflow_client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    _record_manual(
        mlflow_client,
        name,
        restored,
        action=f"{CHAMPION} again by rollback from version {replaced}",
        actor=actor,
        reason=reason,
    )
    if replaced is not None and replaced != restored:
        _record_manual(
            mlflow_client,
            name,
            replaced,
            action=f"rolled back: {CHAMPION} returned to version {restored}",
            actor=actor,
            reason=reason,
        )
    log.info("%s rolled back from version %s to %s by %s: %s", name, replaced, restored, actor, reason)
    return PromotionDecision(
        model_name=name,
        version=restored,
        promoted=True,
        rule="rollback",
        comparison=COMPARISON_NONE,
        reason=reason,
        actor=actor,
        champion_version=replaced,
    )


# --- registry details ----------------------------------------------------------------------


def _model_name(spec: StudySpec) -> str:
    if not spec.mlflow.registered_model:
        raise PromotionError(f"{spec.dag_id}: mlflow.registered_model is not set: nothing to promote")
    return spec.mlflow.registered_model


def _alias_version(mlflow_client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at; ``None`` only when the model or the alias does not exist.

    Read from the registered model's aliases (a missing alias is a 400 error, indistinguishable
    from a bad request, in ``get_model_version_by_alias``).

    Raises:
        TrackingError: the registry failed: never read as "no such alias" (under ``if_better`` that
            would promote "because there is no champion yet").
    """
    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException as e:
        if not_found(e):
            return None
        raise TrackingError(_registry_failed(f"read the {alias!r} alias of model {name!r}", e)) from e
    number = (model.aliases or {}).get(alias)
    if number is None:
        return None
    try:
        return mlflow_client.get_model_version(name, str(number))
    except MlflowException as e:
        if not_found(e):
            return None
        raise TrackingError(_registry_failed(f"read version {number} ({alias}) of model {name!r}", e)) from e


def _registry_failed(what: str, error: MlflowException) -> str:
    return f"cannot {what}: the registry answered {error.message!r}; nothing changed, retry once it is back"


def _existing_model(mlflow_client: MlflowClient, name: str) -> Any:
    try:
        return mlflow_client.get_registered_model(name)
    except MlflowException as e:
        if not_found(e):
            raise PromotionError(f"registered model {name!r} does not exist; check the name") from e
        raise TrackingError(_registry_failed(f"read model {name!r}", e)) from e


def _existing_version(mlflow_client: MlflowClient, name: str, version: str) -> str:
    _existing_model(mlflow_client, name)
    if not version.isdigit():
        raise PromotionError(f"model {name!r}: version must be a number, got {version!r}")
    try:
        found = mlflow_client.get_model_version(name, version)
    except MlflowException as e:
        if not not_found(e):
            raise TrackingError(_registry_failed(f"read version {version} of model {name!r}", e)) from e
        versions = sorted(
            (int(v.version) for v in mlflow_client.search_model_versions(f"name = '{quote(name)}'")),
        )
        raise PromotionError(
            f"model {name!r} has no version {version} (versions: {versions or 'none'}); nothing changed"
        ) from e
    if found.status != "READY":
        raise PromotionError(
            f"model {name!r} version {version} is {found.status}, not READY; nothing changed"
        )
    return str(found.version)


def _make_champion(
    mlflow_client: MlflowClient, name: str, version: str, *, actor: str, reason: str
) -> str | None:
    """Point ``champion`` at ``version``; the replaced one gets ``previous_champion``. Returns it."""
    current = _alias_version(mlflow_client, name, CHAMPION)
    replaced = None if current is None else str(current.version)
    if replaced is not None and replaced != version:
        mlflow_client.set_registered_model_alias(name, PREVIOUS_CHAMPION, replaced)
        _append_description(
            mlflow_client, name, replaced, f"replaced as {CHAMPION} by version {version} ({actor}: {reason})"
        )
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    return replaced


def _record_decision(mlflow_client: MlflowClient, result: PromotionDecision) -> None:
    tags = {
        f"{TAG_DECISION_PREFIX}rule": result.rule,
        f"{TAG_DECISION_PREFIX}comparison": result.comparison,
        f"{TAG_DECISION_PREFIX}reason": result.reason,
        f"{TAG_DECISION_PREFIX}at": _now(),
        f"{TAG_DECISION_PREFIX}champion_version": result.champion_version or "",
        f"{TAG_DECISION_PREFIX}challenger_score": _text(result.challenger_score),
        f"{TAG_DECISION_PREFIX}champion_score": _text(result.champion_score),
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(result.model_name, result.version, key, value)
    # Written last: its presence means the decision is complete (see apply_rule).
    mlflow_client.set_model_version_tag(
        result.model_name, result.version, TAG_DECISION, "promoted" if result.promoted else "not promoted"
    )
    outcome = f"promoted to {CHAMPION}" if result.promoted else f"stays {CHALLENGER}, not promoted"
    _append_description(
        mlflow_client,
        result.model_name,
        result.version,
        f"decision: {outcome}. {result.reason}. Comparison: {result.comparison}.",
    )


def _recorded_decision(mlflow_client: MlflowClient, name: str, version: str) -> PromotionDecision | None:
    tags = mlflow_client.get_model_version(name, version).tags or {}
    if TAG_DECISION not in tags:
        return None
    p = TAG_DECISION_PREFIX
    return PromotionDecision(
        model_name=name,
        version=version,
        promoted=tags[TAG_DECISION] == "promoted",
        rule=tags.get(f"{p}rule", ""),
        comparison=tags.get(f"{p}comparison", ""),
        reason=tags.get(f"{p}reason", ""),
        actor="finalize",
        champion_version=tags.get(f"{p}champion_version") or None,
        challenger_score=_float(tags.get(f"{p}challenger_score")),
        champion_score=_float(tags.get(f"{p}champion_score")),
    )


def _record_manual(
    mlflow_client: MlflowClient, name: str, version: str, *, action: str, actor: str, reason: str
) -> None:
    at = _now()
    for key, value in {"action": action, "actor": actor, "reason": reason, "at": at}.items():
        mlflow_client.set_model_version_tag(name, version, f"{TAG_MANUAL_PREFIX}{key}", value)
    _append_description(mlflow_client, name, version, f"{action} by {actor}: {reason}")


def _append_description(mlflow_client: MlflowClient, name: str, version: str, line: str) -> None:
    current = mlflow_client.get_model_version(name, version).description or ""
    entry = f"[{_now()}] {line}"
    text = f"{current}\n\n{entry}" if current else entry
    mlflow_client.update_model_version(name, version, description=text[-20000:])


def _evaluate_hook(spec: StudySpec) -> Callable[..., Any] | None:
    """The objective module's ``evaluate(model, ctx)``, if it defines one."""
    module, _, _ = spec.objective.partition(":")
    try:
        return import_callable(f"{module}:{_EVALUATE_HOOK}")
    except ObjectiveError:
        return None


def _load_model(uri: str) -> Any:
    """The model in its own flavour when it is scikit-learn (so ``predict_proba`` works), else pyfunc."""
    flavors = mlflow.models.get_model_info(uri).flavors
    if "sklearn" in flavors:
        return mlflow.sklearn.load_model(uri)
    return mlflow.pyfunc.load_model(uri)


def _score(value: Any, spec: StudySpec) -> float:
    if isinstance(value, Mapping):
        if spec.score_metric not in value:
            raise ObjectiveError(
                f"evaluate returned keys {sorted(map(str, value))}, without the metric {spec.score_metric!r}"
            )
        value = value[spec.score_metric]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise ObjectiveError(f"evaluate returned {value!r}; expected a finite number")
    return float(value)


def _require(actor: str, reason: str) -> None:
    if not actor.strip():
        raise PromotionError("say who promotes: actor is empty")
    if not reason.strip():
        raise PromotionError("say why: reason is empty")


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _text(value: float | None) -> str:
    return "" if value is None else repr(value)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
