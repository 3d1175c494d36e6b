"""Lineage of a registered model version: which study, trial, DAG run, data, code and image made it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from optuna.trial import FrozenTrial

from hpo_core.keys import StudyAttr, Tag, TrialAttr
from hpo_core.spec import StudySpec

__all__ = ["lineage_tags"]


def lineage_tags(
    study_name: str, spec: StudySpec, best: FrozenTrial, *, attrs: Mapping[str, Any]
) -> dict[str, str]:
    """Tags that prove where a registered version came from (``attrs``: the study's attributes).

    Beyond the study and trial: the objective's own lineage (``ctx.set_lineage``: data fingerprint,
    code version) and the image the trial ran in, as the worker recorded them on the trial.
    """
    index = spec.objective_metrics.index(spec.score_metric)
    tags = {
        Tag.STUDY: study_name,
        Tag.TRIAL_NUMBER: str(best.number),
        Tag.METRIC: spec.score_metric,
        Tag.VALUE: repr(best.values[index]),
        Tag.VALUES: json.dumps(dict(zip(spec.objective_metrics, best.values, strict=True))),
        Tag.PARAMS: json.dumps(best.params, sort_keys=True),
        Tag.DAG_ID: str(attrs.get(StudyAttr.DAG_ID)),
        Tag.RUN_ID: str(best.user_attrs.get(TrialAttr.RUN_ID) or attrs.get(StudyAttr.RUN_ID)),
        Tag.MLFLOW_RUN_ID: str(best.user_attrs.get(TrialAttr.MLFLOW_RUN)),
    }
    for key, value in (best.user_attrs.get(TrialAttr.LINEAGE) or {}).items():
        tags[f"{Tag.LINEAGE_PREFIX}{key}"] = str(value)
    if attrs.get(StudyAttr.WORKER_IMAGE):
        tags[Tag.WORKER_IMAGE] = str(attrs[StudyAttr.WORKER_IMAGE])
    if best.user_attrs.get(TrialAttr.WARM_START):
        tags[Tag.WARM_START] = str(best.user_attrs[TrialAttr.WARM_START])
    return tags
