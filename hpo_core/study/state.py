"""A started study as the tasks see it: the Optuna study, its stored spec and the run's settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from hpo_core.deployment import Deployment
from hpo_core.errors import TrialStateError
from hpo_core.keys import StudyAttr
from hpo_core.samplers import build_sampler
from hpo_core.samplers.pruners import build_pruner
from hpo_core.spec import StudySpec, spec_from_json
from hpo_core.storage import open_storage
from hpo_core.study.config import RunConfig

__all__ = ["LoadedStudy", "load_run", "set_study_attrs"]


@dataclass(frozen=True)
class LoadedStudy:
    """A started study with what one read of its attributes says: its spec and the run's settings."""

    study: optuna.Study
    spec: StudySpec
    attrs: dict[str, Any]
    config: RunConfig


def load_run(deployment: Deployment, study_name: str, *, round_number: int = 0) -> LoadedStudy:
    """Load a started study, its spec, attributes and run settings with one read of its attributes.

    The sampler's seed is mixed with ``round_number`` (see :func:`hpo_core.samplers.build_sampler`).

    Raises:
        TrialStateError: the study does not exist (its ``start`` task has not run).
    """
    storage = open_storage(deployment.storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError as e:
        raise TrialStateError(f"study {study_name!r} does not exist; did the 'start' task run?") from e
    attrs = storage.get_study_user_attrs(study_id)
    spec = spec_from_json(attrs[StudyAttr.SPEC])
    config = RunConfig.from_attrs(attrs)
    sampler = build_sampler(spec, seed=config.seed, options=config.sampler_options, round_number=round_number)
    study = optuna.load_study(
        study_name=study_name, storage=storage, sampler=sampler, pruner=build_pruner(spec)
    )
    return LoadedStudy(study=study, spec=spec, attrs=attrs, config=config)


def set_study_attrs(study: optuna.Study, attrs: Mapping[str, Any], updates: Mapping[str, Any]) -> None:
    """Write the study attributes whose value changed (``attrs``: as read before)."""
    for key, value in updates.items():
        if key not in attrs or attrs[key] != value:
            study.set_user_attr(key, value)
