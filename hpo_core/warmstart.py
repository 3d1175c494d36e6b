"""Warm start: seed a new run's study with the champion's params and the previous study's best.

A configuration is enqueued only if it is still a valid point of the current search space; each
one that is not is skipped with a logged note saying why, so a changed search space never
silently drops (or breaks on) what earlier runs learned.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from hpo_core.errors import SearchSpaceError, StudySpecError
from hpo_core.keys import StudyAttr, Tag, TrialAttr
from hpo_core.payloads import WarmStartRecord
from hpo_core.space import check_params
from hpo_core.spec import StudySpec, spec_from_json
from hpo_core.tracking.registry import CHAMPION

__all__ = [
    "Candidate",
    "WarmStartResult",
    "champion_candidate",
    "enqueue_warm_start",
    "previous_study_name",
    "top_candidates",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A configuration proposed for the warm start, with where it came from."""

    source: str
    params: dict[str, Any]


@dataclass
class WarmStartResult:
    """What one warm start enqueued and what it skipped (with the reason)."""

    enqueued: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    previous_study: str | None = None

    def to_dict(self) -> WarmStartRecord:
        """Plain data, for the study attribute and XCom."""
        return WarmStartRecord(**asdict(self))  # type: ignore[typeddict-item]


def previous_study_name(storage: BaseStorage, *, dag_id: str, exclude: str) -> str | None:
    """The most recently started study of ``dag_id`` other than ``exclude``.

    Reads the studies' attributes only (not every study's trials, which a summary would load).
    """
    runs = [
        (float(s.user_attrs.get(StudyAttr.STARTED) or 0), s.study_name)
        for s in storage.get_all_studies()
        if s.user_attrs.get(StudyAttr.DAG_ID) == dag_id and s.study_name != exclude
    ]
    return max(runs)[1] if runs else None


def top_candidates(storage: BaseStorage, study_name: str, *, spec: StudySpec, k: int) -> list[Candidate]:
    """The ``k`` best distinct configurations of a finished study, best first.

    Trials are ranked by the previous study's own score metric and direction (as stored with
    it); the current ``spec`` is the fallback when the stored one cannot be read.
    """
    if k <= 0:
        return []
    study = optuna.load_study(study_name=study_name, storage=storage)
    ranking_spec = spec
    stored = study.user_attrs.get(StudyAttr.SPEC)
    if stored:
        try:
            ranking_spec = spec_from_json(stored)
        except StudySpecError as e:
            log.info("stored spec of %s is unreadable (%s); ranking with the current one", study_name, e)
    metrics = ranking_spec.objective_metrics
    index = metrics.index(ranking_spec.score_metric) if ranking_spec.score_metric in metrics else 0
    sign = -1.0 if ranking_spec.all_directions[index] == "maximize" else 1.0
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.values and len(t.values) > index and not t.user_attrs.get(TrialAttr.DISCARDED)
    ]
    complete.sort(key=lambda t: (sign * t.values[index], t.number))
    out: list[Candidate] = []
    seen: set[str] = set()
    for t in complete:
        key = _key(t.params)
        if key in seen:
            continue
        seen.add(key)
        rank = len(out) + 1
        out.append(
            Candidate(
                source=f"top {rank} of study {study_name} (trial {t.number}, "
                f"{metrics[index]}={t.values[index]:.6g})",
                params=dict(t.params),
            )
        )
        if len(out) >= k:
            break
    return out


def champion_candidate(mlflow_client: MlflowClient, model_name: str) -> tuple[Candidate | None, str | None]:
    """The params of the version aliased ``champion``.

    Returns:
        ``(candidate, note)``: the candidate, or ``None`` with a note saying why there is none.
    """
    try:
        version = mlflow_client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None, f"model {model_name!r} has no {CHAMPION} yet"
    raw = (version.tags or {}).get(Tag.PARAMS)
    source = f"{CHAMPION} {model_name} version {version.version}"
    if not raw:
        return None, f"{source} has no 'hpo.params' tag (not registered by a study)"
    try:
        params = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"{source}: 'hpo.params' tag is not JSON: {e}"
    if not isinstance(params, dict):
        return None, f"{source}: 'hpo.params' tag is not a mapping of params"
    return Candidate(source=source, params=params), None


def enqueue_warm_start(
    study: optuna.Study,
    spec: StudySpec,
    *,
    storage: BaseStorage,
    dag_id: str,
    mlflow_client: MlflowClient | None,
) -> WarmStartResult:
    """Enqueue the spec's warm-start configurations on ``study``, champion first.

    Each candidate is checked against the current search space; an invalid one is skipped and
    the reason logged. Candidates with the same params are enqueued once.
    """
    options = spec.warm_start
    result = WarmStartResult()
    candidates: list[Candidate] = []
    if options.from_champion and spec.mlflow.registered_model and mlflow_client is not None:
        champion, note = champion_candidate(mlflow_client, spec.mlflow.registered_model)
        if champion is not None:
            candidates.append(champion)
        elif note:
            log.info("warm start: %s", note)
    if options.top_k > 0:
        previous = previous_study_name(storage, dag_id=dag_id, exclude=study.study_name)
        result.previous_study = previous
        if previous is None:
            log.info("warm start: no previous study of %s to take the top %d from", dag_id, options.top_k)
        else:
            candidates.extend(top_candidates(storage, previous, spec=spec, k=options.top_k))
    seen: set[str] = set()
    for candidate in candidates:
        key = _key(candidate.params)
        if key in seen:
            log.info("warm start: %s has the same params as an earlier candidate", candidate.source)
            continue
        seen.add(key)
        try:
            check_params(spec, candidate.params)
        except SearchSpaceError as e:
            note = f"skipped {candidate.source}: no longer valid in the search space: {e}"
            log.warning("warm start: %s (params %s)", note, _key(candidate.params))
            result.skipped.append({"source": candidate.source, "params": candidate.params, "reason": str(e)})
            continue
        study.enqueue_trial(
            dict(candidate.params), user_attrs={TrialAttr.WARM_START: candidate.source}, skip_if_exists=True
        )
        log.info("warm start: enqueued %s: %s", candidate.source, _key(candidate.params))
        result.enqueued.append({"source": candidate.source, "params": candidate.params})
    return result


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), sort_keys=True, default=str)
