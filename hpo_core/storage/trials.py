"""Trial-level storage operations: the one module that uses Optuna's private API.

Optuna's public API addresses trials by number through a ``Study`` and hides the storage and the
trial ids (``study._storage``, ``FrozenTrial._trial_id``). Our lifecycle needs a little more, and
every such use is here:

* a replacement trial created from a template (same params, ``hpo.retry_of``) for the retry rules of
  DESIGN.md, and the writes of a trial's attributes while it is RUNNING in another process;
* several attributes of several trials written in one transaction (suggest marks a whole batch);
* the trial id, which the per-trial claim (:mod:`hpo_core.storage.claims`) locks on.

**Why not Optuna's heartbeat and ``fail_stale_trials``.** Optuna's heartbeat (``RDBStorage(
heartbeat_interval=, grace_period=)``, ``record_heartbeat``, ``optuna.storages.fail_stale_trials``)
fails a trial whose process stopped beating, which is our ``trial.stale_timeout`` sweep. It does not
fit the per-attempt claim of DESIGN.md: (1) its grace period belongs to the storage object (one per
process and URL), while ours is a setting of each study file; (2) a retry must decide whether *the
attempt recorded on the trial* is still alive before taking the trial over, reading who holds it
(``hpo.worker``: host, pid, attempt) and its last beat in the same read of the trial, and Optuna
keeps its beats in a separate table that ``FrozenTrial`` does not carry (only its private
``_get_stale_trial_ids`` reads it); (3) ``fail_stale_trials`` closes a trial without a reason, and
DESIGN.md requires the reason in Optuna, the task log, MLflow and the round summary. So the worker
records its beat as the trial attribute ``hpo.heartbeat`` (:func:`record_heartbeat`), and the stale
sweep (:func:`hpo_core.study.accounting.reconcile_trials`) closes trials with the reason.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.distributions import json_to_distribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

from hpo_core.keys import TrialAttr

__all__ = [
    "create_trial",
    "fail_trial",
    "get_trial",
    "live_trial",
    "read_trials",
    "record_heartbeat",
    "set_trial_attr",
    "set_trial_attrs",
    "trial_by_number",
    "trial_id",
]


def _storage(study: optuna.Study) -> BaseStorage:
    return study._storage


def _rdb(study: optuna.Study) -> RDBStorage | None:
    """The study's RDB storage under Optuna's caching wrapper, if it is one."""
    storage = _storage(study)
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def read_trials(
    study: optuna.Study,
    *,
    user_attrs: Collection[str] | None = None,
    system_attrs: bool = False,
    intermediate_values: bool = False,
    states: Collection[TrialState] | None = None,
) -> list[FrozenTrial]:
    """The study's trials in number order, read with a few plain queries: only what is asked for.

    Optuna's ``get_all_trials`` loads every trial with all its attributes through the ORM: about
    10 s for 10,000 trials on PostgreSQL. This reads the trials, their values and params, and only
    the user attributes named in ``user_attrs`` (``None``: all), the system attributes and the
    intermediate values when asked: a few hundred milliseconds for the same study. Trials come
    back as ``FrozenTrial`` with the other attribute maps empty. On a storage that is not an RDB
    storage, the full trials are returned.
    """
    backend = _rdb(study)
    if backend is None:
        return study.get_trials(deepcopy=False, states=None if states is None else tuple(states))
    trials_table = models.TrialModel.__table__
    query = sqlalchemy.select(
        trials_table.c.trial_id,
        trials_table.c.number,
        trials_table.c.state,
        trials_table.c.datetime_start,
        trials_table.c.datetime_complete,
    ).where(trials_table.c.study_id == study._study_id)
    if states is not None:
        query = query.where(trials_table.c.state.in_(list(states)))
    ours = sqlalchemy.select(trials_table.c.trial_id).where(trials_table.c.study_id == study._study_id)
    with backend.engine.connect() as connection:
        rows = connection.execute(query.order_by(trials_table.c.number)).all()
        values = _children(connection, models.TrialValueModel, ours, ("objective", "value", "value_type"))
        params = _children(
            connection, models.TrialParamModel, ours, ("param_name", "param_value", "distribution_json")
        )
        users = _children(
            connection, models.TrialUserAttributeModel, ours, ("key", "value_json"), keys=user_attrs
        )
        systems = (
            _children(connection, models.TrialSystemAttributeModel, ours, ("key", "value_json"))
            if system_attrs
            else {}
        )
        steps = (
            _children(
                connection,
                models.TrialIntermediateValueModel,
                ours,
                ("step", "intermediate_value", "intermediate_value_type"),
            )
            if intermediate_values
            else {}
        )
    distribution = _memo(json_to_distribution)
    decoded = _memo(json.loads)  # attribute values repeat (run ids, rounds): decode each text once
    finite = models.TrialValueModel.TrialValueType.FINITE
    out = []
    for tid, number, state, started, completed in rows:
        trial_values = values.get(tid)
        dists = {name: distribution(text) for name, _, text in params.get(tid, ())}
        out.append(
            FrozenTrial(
                number=number,
                state=state,
                value=None,
                values=[
                    value if kind == finite else models.TrialValueModel.stored_repr_to_value(value, kind)
                    for _, value, kind in sorted(trial_values)
                ]
                if trial_values
                else None,
                datetime_start=started,
                datetime_complete=completed,
                params={name: dists[name].to_external_repr(value) for name, value, _ in params.get(tid, ())},
                distributions=dists,
                user_attrs={key: copy.deepcopy(decoded(text)) for key, text in users.get(tid, ())},
                system_attrs={key: copy.deepcopy(decoded(text)) for key, text in systems.get(tid, ())},
                intermediate_values={
                    step: models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(value, kind)
                    for step, value, kind in steps.get(tid, ())
                },
                trial_id=tid,
            )
        )
    return out


def _children(
    connection: sqlalchemy.Connection,
    model: Any,
    trial_ids: sqlalchemy.Select[Any],
    columns: tuple[str, ...],
    *,
    keys: Collection[str] | None = None,
) -> dict[int, list[tuple[Any, ...]]]:
    """``columns`` of a per-trial table for the study's trials, by trial id, in insertion order
    (``keys``: only the attributes with these keys)."""
    table = model.__table__
    query = sqlalchemy.select(table.c.trial_id, *(table.c[name] for name in columns)).where(
        table.c.trial_id.in_(trial_ids)
    )
    if keys is not None:
        query = query.where(table.c.key.in_(list(keys)))
    grouped: dict[int, list[tuple[Any, ...]]] = {}
    for tid, *rest in connection.execute(query.order_by(table.primary_key.columns.values()[0])).all():
        grouped.setdefault(tid, []).append(tuple(rest))
    return grouped


_T = TypeVar("_T")


def _memo(function: Callable[[str], _T]) -> Callable[[str], _T]:
    """``function`` of a text, computed once per distinct text (for one read)."""
    cache: dict[str, _T] = {}

    def cached(text: str) -> _T:
        found = cache.get(text, _MISSING)
        if found is _MISSING:
            found = cache[text] = function(text)
        return found

    return cached


_MISSING: Any = object()


def trial_id(trial: FrozenTrial | optuna.trial.Trial) -> int:
    """The storage's id of a trial (what claims lock on and attribute writes address)."""
    return int(trial._trial_id)


def get_trial(study: optuna.Study, trial_id: int) -> FrozenTrial:
    """Read one trial afresh (never from the study's cache)."""
    return _storage(study).get_trial(trial_id)


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    """Read the trial numbered ``number`` afresh."""
    storage = _storage(study)
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def live_trial(study: optuna.Study, frozen: FrozenTrial) -> optuna.trial.Trial:
    """A ``Trial`` handle on a RUNNING trial, for the objective's reports and the pruner."""
    return optuna.trial.Trial(study, trial_id(frozen))


def set_trial_attr(study: optuna.Study, trial_id: int, key: str, value: Any) -> None:
    """Set one user attribute of a trial (RUNNING in this or another process)."""
    _storage(study).set_trial_user_attr(trial_id, key, value)


def set_trial_attrs(study: optuna.Study, attrs_by_trial_id: Mapping[int, Mapping[str, Any]]) -> None:
    """Set user attributes of several running trials, in one transaction on Optuna's RDB storage.

    Optuna's API writes one attribute per transaction. Its RDB storage has the statement for one
    attribute without the commit; where that is not there (another storage), each attribute is
    written on its own.
    """
    storage = _storage(study)
    backend = getattr(storage, "_backend", storage)
    write = getattr(backend, "_set_trial_attr_without_commit", None)
    if isinstance(backend, RDBStorage) and write is not None:
        # Running trials are never cached by the study's storage wrapper: it sees the writes.
        with _create_scoped_session(backend.scoped_session) as session:
            for tid, attrs in attrs_by_trial_id.items():
                for key, value in attrs.items():
                    write(session, models.TrialUserAttributeModel, tid, key, value)
        return
    for tid, attrs in attrs_by_trial_id.items():
        for key, value in attrs.items():
            storage.set_trial_user_attr(tid, key, value)


def record_heartbeat(study: optuna.Study, trial_id: int) -> None:
    """Mark the trial alive now (``hpo.heartbeat``; see the module docstring for why not Optuna's)."""
    set_trial_attr(study, trial_id, TrialAttr.HEARTBEAT, time.time())


def create_trial(
    study: optuna.Study,
    *,
    params: Mapping[str, Any],
    distributions: Mapping[str, Any],
    attrs: Mapping[str, Any],
) -> FrozenTrial:
    """Create a RUNNING trial with given params and user attributes (a replacement of a failed trial)."""
    template = FrozenTrial(
        number=-1,
        trial_id=-1,
        state=TrialState.RUNNING,
        value=None,
        values=None,
        datetime_start=dt.datetime.now(),
        datetime_complete=None,
        params=dict(params),
        distributions=dict(distributions),
        user_attrs=dict(attrs),
        system_attrs={},
        intermediate_values={},
    )
    storage = _storage(study)
    return storage.get_trial(storage.create_new_trial(study._study_id, template_trial=template))


def fail_trial(
    study: optuna.Study, frozen: FrozenTrial, reason: str, *, key: str = TrialAttr.FAIL_REASON
) -> None:
    """Close a RUNNING trial as FAIL, recording why under ``key`` first.

    Raises:
        RuntimeError, ValueError: Optuna's, when the trial finished meanwhile (callers decide).
    """
    set_trial_attr(study, trial_id(frozen), key, reason)
    study.tell(frozen.number, state=TrialState.FAIL)
