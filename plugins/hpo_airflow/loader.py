"""Find study files and turn each into a DAG; one broken file never hides the others.

A big study folder is split over several thin DAG files (``load_study_dags(globals(), shard=(i,
n))``): each builds the studies whose file name hashes to its shard, so Airflow's DAG processor
parses them in parallel and no file nears ``dagbag_import_timeout``. Study names stay unique
across shards (every shard reads every file's ``name``, a cheap YAML read, and a later file
reusing a name is an error of that file only). The ``hpo_promote_model`` DAG has its own file
(``dags/hpo_promotion.py``): no DAG is defined by two files.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
import zlib
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import yaml
from airflow.sdk import DAG

from hpo_airflow.factory import START_DATE, build_study_dag
from hpo_core.errors import StudySpecError
from hpo_core.spec import NAME_PATTERN, StudySpec, load_spec

__all__ = ["BrokenStudyWarning", "load_study_dags", "load_study_file", "shard_of", "study_files"]

log = logging.getLogger(__name__)

STRICT_ENV = "HPO_STRICT_STUDIES"
#: libyaml's loader when PyYAML has it: reading every file's name per shard stays cheap.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


def study_files(folder: Path) -> list[Path]:
    """The study files of a folder (``*.yaml`` and ``*.yml``), in the order they are loaded."""
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def shard_of(path: Path, count: int) -> int:
    """The shard (``0 .. count-1``) whose DAG file builds the study file ``path``.

    A hash of the file's name: stable across processes and machines, and a new study file never
    moves the others to another DAG file.
    """
    return zlib.crc32(path.name.encode("utf-8")) % count


def _declared_dag_id(path: Path) -> str | None:
    """The DAG id the file's ``name`` asks for (``hpo_<name>``), if it has a valid one."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raw = None
    name = raw.get("name") if isinstance(raw, dict) else None
    if isinstance(name, str) and re.fullmatch(NAME_PATTERN, name):
        return f"hpo_{name}"
    return None


def _intended_dag_id(path: Path) -> str:
    """The DAG id a broken file would have had (``hpo_<name>``), else ``hpo_<file stem>``.

    The placeholder carrying the file's error takes this id, so the UI shows the error where the
    study's DAG was (or will be).
    """
    return _declared_dag_id(path) or f"hpo_{path.stem}"


def load_study_dags(
    globals_dict: MutableMapping[str, Any],
    *,
    studies_dir: str | Path | None = None,
    strict: bool | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, DAG]:
    """Build one DAG per ``*.yaml``/``*.yml`` file in ``studies_dir`` into ``globals_dict``.

    Args:
        globals_dict: the calling DAG file's ``globals()``; Airflow collects DAGs from it.
        studies_dir: folder of study files; defaults to ``studies/`` beside the calling file.
        strict: raise on the first broken file instead of reporting it (tests);
            defaults to the ``HPO_STRICT_STUDIES`` environment variable.
        shard: ``(index, count)``: build only the study files :func:`shard_of` puts in shard
            ``index`` of ``count`` (one thin DAG file per shard); ``None``: all of them.

    Returns:
        The DAGs that were built, by dag_id (broken files excluded).
    """
    if studies_dir is None:
        studies_dir = Path(str(globals_dict.get("__file__", "."))).parent / "studies"
    folder = Path(studies_dir)
    strict = os.environ.get(STRICT_ENV, "") not in ("", "0", "false") if strict is None else strict
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard={shard!r}: expected (index, count) with 0 <= index < count")
    built: dict[str, DAG] = {}
    errors: dict[Path, str] = {}
    owners: dict[str, Path] = {}
    for path in study_files(folder):
        if shard is not None and shard_of(path, shard[1]) != shard[0]:
            # Another DAG file builds it (or reports it broken); its name still counts.
            declared = _declared_dag_id(path)
            if declared is not None:
                owners.setdefault(declared, path)
            continue
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
    if not folder.is_dir() and (shard is None or shard[0] == 0):
        message = f"{folder}: study folder does not exist"
        if strict:
            raise StudySpecError(message)
        errors[folder] = message
    for dag_id, dag in built.items():
        globals_dict[dag_id] = dag
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
