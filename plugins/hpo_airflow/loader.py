"""Find study files and turn each into a DAG; one broken file never hides the others."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import yaml
from airflow.sdk import DAG

from hpo_airflow.factory import START_DATE, build_study_dag
from hpo_airflow.promotion_dag import PROMOTION_DAG_ID, build_promotion_dag
from hpo_core.errors import StudySpecError
from hpo_core.spec import NAME_PATTERN, StudySpec, load_spec

__all__ = ["BrokenStudyWarning", "load_study_dags", "load_study_file"]

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


def load_study_file(path: Path, *, taken: Mapping[str, Path] | None = None) -> tuple[StudySpec, DAG]:
    """Load one study file and build its DAG: what the loader does per file, and ``hpo validate`` too.

    ``taken``: DAG ids already used by other files (a study name must be unique).

    Raises:
        StudySpecError: anything that goes wrong, named after the file: a located message for what
            the spec and the factory's checks refuse, the error's type and text for anything else.
    """
    try:
        spec = load_spec(path)
        if taken and spec.dag_id in taken:
            raise StudySpecError(
                f"{path}: name: {spec.name!r} is already used by {taken[spec.dag_id]}; "
                "study names must be unique"
            )
        return spec, build_study_dag(spec, source=path)
    except StudySpecError:
        raise
    except Exception as e:  # one file's unforeseen error must not take down the other studies
        raise StudySpecError(f"{path}: cannot build the study's DAG: {type(e).__name__}: {e}") from e


def _intended_dag_id(path: Path) -> str:
    """The DAG id a broken file would have had (``hpo_<name>``), else ``hpo_<file stem>``.

    The placeholder carrying the file's error takes this id, so the UI shows the error where the
    study's DAG was (or will be).
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raw = None
    name = raw.get("name") if isinstance(raw, dict) else None
    if isinstance(name, str) and re.fullmatch(NAME_PATTERN, name):
        return f"hpo_{name}"
    return f"hpo_{path.stem}"


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
    errors: dict[Path, str] = {}
    owners: dict[str, Path] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            spec, dag = load_study_file(path, taken=owners)
            owners[spec.dag_id] = path
            built[spec.dag_id] = dag
        except StudySpecError as e:
            if strict:
                raise
            errors[path] = str(e)
            log.error("study file %s is broken: %s", path, e)
            warnings.warn(str(e), BrokenStudyWarning, stacklevel=2)
    if not folder.is_dir():
        message = f"{folder}: study folder does not exist"
        if strict:
            raise StudySpecError(message)
        errors[folder] = message
    for dag_id, dag in built.items():
        globals_dict[dag_id] = dag
    globals_dict[PROMOTION_DAG_ID] = build_promotion_dag()
    if errors:
        # Each placeholder carries every message: Airflow keeps one import error per DAG file.
        combined = "\n".join(errors.values())
        for dag_id in _placeholder_ids(errors, taken=set(built)):
            globals_dict[dag_id] = _BrokenStudyDAG(
                dag_id=dag_id, description=combined, schedule=None, start_date=START_DATE
            )
    return built


def _placeholder_ids(errors: Mapping[Path, str], *, taken: set[str]) -> list[str]:
    """One placeholder DAG id per broken file: its intended id, unless a built study holds it."""
    ids: list[str] = []
    for path in errors:
        candidates = [_intended_dag_id(path), f"hpo_{path.stem}"] if path.is_file() else ["hpo__studies"]
        dag_id = next((c for c in candidates if c not in taken), f"{candidates[-1]}_broken")
        taken.add(dag_id)
        ids.append(dag_id)
    return ids
