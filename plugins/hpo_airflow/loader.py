"""Find study files and turn each into a DAG; one broken file never hides the others."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from airflow.sdk import DAG

from hpo_airflow.factory import START_DATE, build_study_dag
from hpo_airflow.promotion_dag import PROMOTION_DAG_ID, build_promotion_dag
from hpo_core.errors import StudySpecError
from hpo_core.spec import load_spec

__all__ = ["BrokenStudyWarning", "load_study_dags"]

log = logging.getLogger(__name__)

STRICT_ENV = "HPO_STRICT_STUDIES"


class BrokenStudyWarning(UserWarning):
    """A study file could not be loaded (shown as a DAG import warning too)."""


class _BrokenStudyDAG(DAG):
    """Stands in for the DAG of a broken study file.

    Airflow validates every DAG it collects from a file; this one fails validation with the
    study's error, so the DAG processor records an import error naming the study file while the
    other studies of the same DAG file load normally.
    """

    def validate(self) -> None:
        raise StudySpecError(self.description or "broken study file")


def load_study_dags(
    globals_dict: MutableMapping[str, Any],
    *,
    studies_dir: str | Path | None = None,
    strict: bool | None = None,
) -> dict[str, DAG]:
    """Build one DAG per ``*.yaml``/``*.yml`` file in ``studies_dir`` into ``globals_dict``.

    Args:
        globals_dict: the calling DAG file's ``globals()``; Airflow collects DAGs from it.
        studies_dir: folder of study files; defaults to ``studies/`` beside the calling file.
        strict: raise on the first broken file instead of reporting it (tests);
            defaults to the ``HPO_STRICT_STUDIES`` environment variable.

    Returns:
        The DAGs that were built, by dag_id (broken files excluded).
    """
    if studies_dir is None:
        studies_dir = Path(str(globals_dict.get("__file__", "."))).parent / "studies"
    folder = Path(studies_dir)
    strict = os.environ.get(STRICT_ENV, "") not in ("", "0", "false") if strict is None else strict
    built: dict[str, DAG] = {}
    errors: dict[str, str] = {}
    owners: dict[str, Path] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            spec = load_spec(path)
            if spec.dag_id in owners:
                raise StudySpecError(
                    f"{path}: name: {spec.name!r} is already used by {owners[spec.dag_id]}; "
                    "study names must be unique"
                )
            owners[spec.dag_id] = path
            built[spec.dag_id] = build_study_dag(spec, source=path)
        except StudySpecError as e:
            if strict:
                raise
            errors[f"hpo_{path.stem}"] = str(e)
            log.error("study file %s is broken: %s", path, e)
            warnings.warn(str(e), BrokenStudyWarning, stacklevel=2)
    if not folder.is_dir():
        message = f"{folder}: study folder does not exist"
        if strict:
            raise StudySpecError(message)
        errors["hpo__studies"] = message
    for dag_id, dag in built.items():
        globals_dict[dag_id] = dag
    globals_dict[PROMOTION_DAG_ID] = build_promotion_dag()
    if errors:
        # Each placeholder carries every message: Airflow keeps one import error per DAG file.
        combined = "\n".join(errors.values())
        for dag_id in errors:
            if dag_id not in built:
                globals_dict[dag_id] = _BrokenStudyDAG(
                    dag_id=dag_id, description=combined, schedule=None, start_date=START_DATE
                )
    return built
