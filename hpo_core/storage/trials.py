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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

from hpo_core.keys import TrialAttr

__all__ = [
    "create_trial",
    "fail_trial",
    "fail_trials",
    "get_trial",
    "live_trial",
    "read_trials",
    "record_heartbeat",
    "set_trial_attr",
    "set_trial_attrs",
    "study_system_attrs",
    "trial_by_number",
    "trial_id",
    "with_params",
    "write_batch",
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
    system_attrs: bool | Collection[TrialState] = False,
    intermediate_values: bool = False,
    states: Collection[TrialState] | None = None,
    params_of: Collection[int] | None = None,
    numbers: Collection[int] | None = None,
    having: tuple[str, Any] | None = None,
) -> list[FrozenTrial]:
    """The study's trials in number order, read with a few plain queries: only what is asked for.

    Optuna's ``get_all_trials`` loads every trial with all its attributes through the ORM: about
    10 s for 10,000 trials on PostgreSQL. This reads the trials, their values and params, and only
    the user attributes named in ``user_attrs`` (``None``: all), the system attributes and the
    intermediate values when asked: a few hundred milliseconds for the same study. Trials come
    back as ``FrozenTrial`` with the other attribute maps empty. ``system_attrs`` may name the
    states whose trials' system attributes are read (a sampler may need them of running trials
    only). ``params_of``: read the params of these trial ids only (the others come back without
    params: a sampler with a bounded history needs few). ``numbers``, ``having`` (a user attribute's
    key and value): read only those trials (a worker reads its trial and its replacements, not the
    study). On a storage that is not an RDB storage, the full trials are returned.
    """
    backend = _rdb(study)
    if backend is None:
        found = study.get_trials(deepcopy=False, states=None if states is None else tuple(states))
        return [
            t
            for t in found
            if (numbers is None or t.number in numbers)
            and (having is None or t.user_attrs.get(having[0], _MISSING) == having[1])
        ]
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
    if numbers is not None:
        query = query.where(trials_table.c.number.in_(list(numbers)))
    if having is not None:
        table = models.TrialUserAttributeModel.__table__
        key, value = having
        query = query.where(
            trials_table.c.trial_id.in_(
                sqlalchemy.select(table.c.trial_id).where(
                    table.c.key == key, table.c.value_json == json.dumps(value)
                )
            )
        )
    ours = query.with_only_columns(trials_table.c.trial_id).order_by(None)
    with backend.engine.connect() as connection:
        rows = connection.execute(query.order_by(trials_table.c.number)).all()
        values = _children(connection, models.TrialValueModel, ours, ("objective", "value", "value_type"))
        params = _children(
            connection,
            models.TrialParamModel,
            ours,
            ("param_name", "param_value", "distribution_json"),
            trial_ids=params_of,
        )
        users = _children(
            connection, models.TrialUserAttributeModel, ours, ("key", "value_json"), keys=user_attrs
        )
        systems = {}
        if system_attrs:
            of = ours
            if not isinstance(system_attrs, bool):
                of = of.where(trials_table.c.state.in_(list(system_attrs)))
            systems = _children(connection, models.TrialSystemAttributeModel, of, ("key", "value_json"))
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
                user_attrs={key: _fresh(decoded(text)) for key, text in users.get(tid, ())},
                system_attrs={key: _fresh(decoded(text)) for key, text in systems.get(tid, ())},
                intermediate_values={
                    step: models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(value, kind)
                    for step, value, kind in steps.get(tid, ())
                },
                trial_id=tid,
            )
        )
    return out


def with_params(study: optuna.Study, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Copies of ``trials`` (read without params, :func:`read_trials`) with their params read now."""
    backend = _rdb(study)
    if backend is None:
        return list(trials)
    ids = [trial_id(t) for t in trials]
    with backend.engine.connect() as connection:
        params = _children(
            connection,
            models.TrialParamModel,
            sqlalchemy.select(models.TrialModel.__table__.c.trial_id),
            ("param_name", "param_value", "distribution_json"),
            trial_ids=ids,
        )
    distribution = _memo(json_to_distribution)
    out = []
    for t in trials:
        rows = params.get(trial_id(t), ())
        filled = copy.copy(t)
        filled.distributions = {name: distribution(text) for name, _, text in rows}
        filled.params = {name: filled.distributions[name].to_external_repr(value) for name, value, _ in rows}
        out.append(filled)
    return out


def _children(
    connection: sqlalchemy.Connection,
    model: Any,
    of: sqlalchemy.Select[Any],
    columns: tuple[str, ...],
    *,
    keys: Collection[str] | None = None,
    trial_ids: Collection[int] | None = None,
) -> dict[int, list[tuple[Any, ...]]]:
    """``columns`` of a per-trial table for the trials ``of`` selects (or the given ``trial_ids``),
    by trial id, in insertion order (``keys``: only the attributes with these keys)."""
    table = model.__table__
    query = sqlalchemy.select(table.c.trial_id, *(table.c[name] for name in columns)).where(
        table.c.trial_id.in_(of) if trial_ids is None else table.c.trial_id.in_(list(trial_ids))
    )
    if keys is not None:
        query = query.where(table.c.key.in_(list(keys)))
    grouped: dict[int, list[tuple[Any, ...]]] = {}
    for row in connection.execute(query.order_by(table.primary_key.columns.values()[0])).tuples():
        found = grouped.get(row[0])
        if found is None:
            grouped[row[0]] = [row[1:]]
        else:
            found.append(row[1:])
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


def _fresh(value: Any) -> Any:
    """A decoded value for one trial: shared when immutable, copied when a trial could change it."""
    return copy.deepcopy(value) if isinstance(value, dict | list) else value


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes (samplers such as QMC and NSGA-II keep state there)."""
    return _storage(study).get_study_system_attrs(study._study_id)


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


def fail_trials(study: optuna.Study, reasons: Mapping[int, str]) -> list[int]:
    """Close RUNNING or WAITING trials (by trial id) as FAIL, each with its reason, in one transaction.

    A trial that finished meanwhile (a late worker told it) keeps its result. Returns the ids of the
    trials closed here. ``observe`` closes a whole wide round's lost trials with this: one
    transaction instead of two per trial.
    """
    if not reasons:
        return []
    backend = _rdb(study)
    if backend is None:
        closed = []
        for tid, reason in reasons.items():
            try:
                fail_trial(study, get_trial(study, tid), reason)
            except (RuntimeError, ValueError):
                continue
            closed.append(tid)
        return closed
    t_trials = models.TrialModel.__table__
    attrs = models.TrialUserAttributeModel.__table__
    with backend.engine.begin() as connection:
        closed = list(
            connection.execute(
                sqlalchemy.update(t_trials)
                .where(
                    t_trials.c.trial_id.in_(list(reasons)),
                    t_trials.c.state.in_([TrialState.RUNNING, TrialState.WAITING]),
                )
                .values(state=TrialState.FAIL, datetime_complete=dt.datetime.now())
                .returning(t_trials.c.trial_id)
            ).scalars()
        )
        if closed:
            connection.execute(
                sqlalchemy.delete(attrs).where(
                    attrs.c.trial_id.in_(closed), attrs.c.key == TrialAttr.FAIL_REASON
                )
            )
            connection.execute(
                sqlalchemy.insert(attrs),
                [
                    {"trial_id": tid, "key": TrialAttr.FAIL_REASON, "value_json": json.dumps(reasons[tid])}
                    for tid in closed
                ],
            )
    return sorted(closed)


def write_batch(
    study: optuna.Study,
    *,
    trials: Sequence[FrozenTrial],
    popped: Mapping[int, int],
    study_system_attrs: Mapping[str, Any],
    unless: Mapping[str, Any],
) -> list[tuple[int, int]] | None:
    """Write a round's asked trials in one transaction, unless the round was written meanwhile.

    ``trials`` are templates of the trials in ask order (state RUNNING, or FAIL for a discarded
    draw; params, distributions, user and system attributes). A template whose number is a key of
    ``popped`` is the enqueued WAITING trial of that id, which becomes RUNNING with its params and
    the template's attributes (changed keys replaced); the others are inserted as new trials,
    numbered as Optuna numbers them. ``study_system_attrs`` are the sampler's study state changes.

    The transaction first locks the study (the lock Optuna takes to number a new trial: one
    writer at a time, also across processes and hosts), then writes nothing and returns ``None``
    when a trial already carries every user attribute of ``unless`` (the round's batch, written by
    a racing attempt of the same task) or an enqueued trial was popped by somebody else.

    Returns:
        ``(number, trial id)`` of each template, in order.
    """
    backend = _rdb(study)
    if backend is None:  # not an RDB storage: trial by trial (tests, in-memory studies)
        return _write_one_by_one(study, trials, popped, study_system_attrs, unless)
    sid = study._study_id
    t_trials = models.TrialModel.__table__
    with backend.engine.begin() as connection:
        studies = models.StudyModel.__table__
        # A write first: it takes the study's row lock (PostgreSQL) or the database's write lock
        # (SQLite) before anything is read, so the check below sees every committed batch.
        connection.execute(
            sqlalchemy.update(studies)
            .where(studies.c.study_id == sid)
            .values(study_name=studies.c.study_name)
        )
        if _any_trial_with(connection, sid, unless):
            return None
        base = connection.execute(
            sqlalchemy.select(sqlalchemy.func.count()).select_from(t_trials).where(t_trials.c.study_id == sid)
        ).scalar_one()
        written: list[tuple[int, int]] = []
        for template in trials:
            waiting_id = popped.get(template.number)
            if waiting_id is not None:
                if not _pop(connection, waiting_id, template):
                    connection.rollback()
                    return None
                written.append((template.number, waiting_id))
                continue
            tid = connection.execute(
                sqlalchemy.insert(t_trials).returning(t_trials.c.trial_id),
                {
                    "number": base,
                    "study_id": sid,
                    "state": template.state,
                    "datetime_start": template.datetime_start,
                    "datetime_complete": template.datetime_complete,
                },
            ).scalar_one()
            written.append((base, tid))
            base += 1
        new = [(tid, t) for (_, tid), t in zip(written, trials, strict=True) if popped.get(t.number) is None]
        _insert_children(connection, new)
        _replace_study_system_attrs(connection, sid, study_system_attrs)
    return written


def _any_trial_with(connection: sqlalchemy.Connection, study_id: int, attrs: Mapping[str, Any]) -> bool:
    """Whether a trial of the study carries every user attribute of ``attrs`` with that value."""
    t_trials = models.TrialModel.__table__
    query = sqlalchemy.select(t_trials.c.trial_id).where(t_trials.c.study_id == study_id)
    table = models.TrialUserAttributeModel.__table__
    for key, value in attrs.items():
        query = query.where(
            t_trials.c.trial_id.in_(
                sqlalchemy.select(table.c.trial_id).where(
                    table.c.key == key, table.c.value_json == json.dumps(value)
                )
            )
        )
    return connection.execute(query.limit(1)).first() is not None


def _pop(connection: sqlalchemy.Connection, trial_id: int, template: FrozenTrial) -> bool:
    """An enqueued trial becomes RUNNING with the template's params and attributes (if still WAITING)."""
    t_trials = models.TrialModel.__table__
    updated = connection.execute(
        sqlalchemy.update(t_trials)
        .where(t_trials.c.trial_id == trial_id, t_trials.c.state == TrialState.WAITING)
        .values(state=template.state, datetime_start=template.datetime_start)
    )
    if updated.rowcount != 1:
        return False
    for model, attrs in (
        (models.TrialUserAttributeModel, template.user_attrs),
        (models.TrialSystemAttributeModel, template.system_attrs),
    ):
        table = model.__table__
        if attrs:
            connection.execute(
                sqlalchemy.delete(table).where(table.c.trial_id == trial_id, table.c.key.in_(list(attrs)))
            )
    _insert_children(connection, [(trial_id, template)])
    return True


def _insert_children(connection: sqlalchemy.Connection, trials: Sequence[tuple[int, FrozenTrial]]) -> None:
    """Insert the params and user/system attributes of templates (by trial id), in bulk."""
    params = [
        {
            "trial_id": tid,
            "param_name": name,
            "param_value": t.distributions[name].to_internal_repr(value),
            "distribution_json": distribution_to_json(t.distributions[name]),
        }
        for tid, t in trials
        for name, value in t.params.items()
    ]
    if params:
        connection.execute(sqlalchemy.insert(models.TrialParamModel.__table__), params)
    for model, field in (
        (models.TrialUserAttributeModel, "user_attrs"),
        (models.TrialSystemAttributeModel, "system_attrs"),
    ):
        rows = [
            {"trial_id": tid, "key": key, "value_json": json.dumps(value)}
            for tid, t in trials
            for key, value in getattr(t, field).items()
        ]
        if rows:
            connection.execute(sqlalchemy.insert(model.__table__), rows)


def _replace_study_system_attrs(
    connection: sqlalchemy.Connection, study_id: int, attrs: Mapping[str, Any]
) -> None:
    if not attrs:
        return
    table = models.StudySystemAttributeModel.__table__
    connection.execute(
        sqlalchemy.delete(table).where(table.c.study_id == study_id, table.c.key.in_(list(attrs)))
    )
    connection.execute(
        sqlalchemy.insert(table),
        [{"study_id": study_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()],
    )


def _write_one_by_one(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    popped: Mapping[int, int],
    study_system_attrs: Mapping[str, Any],
    unless: Mapping[str, Any],
) -> list[tuple[int, int]] | None:
    storage = _storage(study)
    if any(
        all(t.user_attrs.get(k, _MISSING) == v for k, v in unless.items())
        for t in storage.get_all_trials(study._study_id, deepcopy=False)
    ):
        return None
    written = []
    for template in trials:
        waiting_id = popped.get(template.number)
        if waiting_id is None:
            tid = storage.create_new_trial(study._study_id, template_trial=template)
        else:
            tid = waiting_id
            if not storage.set_trial_state_values(tid, TrialState.RUNNING):
                return None
            for name, value in template.params.items():
                dist = template.distributions[name]
                storage.set_trial_param(tid, name, dist.to_internal_repr(value), dist)
            for key, value in template.user_attrs.items():
                storage.set_trial_user_attr(tid, key, value)
            for key, value in template.system_attrs.items():
                storage.set_trial_system_attr(tid, key, value)
            if template.state == TrialState.FAIL:
                storage.set_trial_state_values(tid, TrialState.FAIL)
        written.append((storage.get_trial_number_from_id(tid), tid))
    for key, value in study_system_attrs.items():
        storage.set_study_system_attr(study._study_id, key, value)
    return written
