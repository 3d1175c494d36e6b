"""Ask a whole batch against an in-memory copy of a study: no storage, no Airflow, no side effects.

``suggest`` reads the study once, calls :func:`ask_batch` with what it read, and writes the returned
trials back in one transaction. The batch is asked exactly as Optuna's own ``study.ask()`` loop on the
real storage would ask it (same sampler, seed, trial numbers and history, so the same params), with
the engine's batch rules:

* WAITING (enqueued) trials are popped first, in trial-number order, as ``study.ask()`` does;
* a draw whose params repeat an earlier trial of the batch is discarded (closed as FAIL with
  ``hpo.discarded``, so it never counts); after ``MAX_DUPLICATE_DRAWS`` duplicates in a row, or
  once the batch holds every point of a finite space, the duplicate is kept;
* a grid sampler stops the batch when every grid point is finished or running (:func:`grid_taken`);
* the trials asked earlier in the batch stay RUNNING while the later ones are asked, so TPE's
  constant liar (and the other samplers' handling of running trials) spreads the batch.

Samplers keep state in the storage; everything they write is returned for the write-back: per
trial its system attributes (TPE and GP: ``*:relative_params:*`` of a multivariate or liar ask;
CMA-ES: ``cma:generation``, ``cma:optimizer:*`` and ``x_for_tell``; grid: ``grid_id`` and
``search_space``; NSGA-II: ``NSGAIISampler:generation``), and the study system attributes that changed
(QMC: ``qmc (...)`` sample counter; NSGA-II: ``NSGAIISampler:parent:<generation>``, trial ids of a
generation's parents). Random search writes nothing.

Bounded cost: a model-based sampler (tpe, gp, cmaes, nsga2) sees at most ``history_limit`` (K)
finished trials: the best ``K // 10`` complete trials and the most recent of the other complete or
pruned ones, plus every unfinished trial and the trials the sampler's state points at (see
:func:`select_history`). Under the bound it sees every trial, so the batch is exactly Optuna's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo_core.keys import TrialAttr
from hpo_core.samplers import build_sampler
from hpo_core.space import grid_search_space, sample_params, space_size
from hpo_core.spec import StudySpec
from hpo_core.storage import trials as stored
from hpo_core.storage.snapshot import SNAPSHOT_STUDY_NAME, SnapshotStorage

__all__ = [
    "MAX_DUPLICATE_DRAWS",
    "UNBOUNDED_SAMPLERS",
    "AskedBatch",
    "AskedTrial",
    "SamplerRun",
    "ask_batch",
    "grid_taken",
    "select_history",
]

#: Draws per batch slot before a duplicate is kept (the space counts as exhausted).
MAX_DUPLICATE_DRAWS = 20
#: Samplers that fit no model on the history: they always see every trial (grid must see every
#: visited point, QMC its first trial; random reads nothing).
UNBOUNDED_SAMPLERS = frozenset({"random", "grid", "qmc"})

_DISCARD_REASON = "duplicate of another trial in the same batch"
_CMA_OPTIMIZER_PREFIX = "cma:optimizer"
_GA_PARENT_MARK = ":parent:"


@dataclass(frozen=True)
class SamplerRun:
    """The run's sampler settings: the seed, the trigger's sampler options and the round number."""

    seed: int | None
    round_number: int
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AskedTrial:
    """One trial the batch asked, with everything its write-back needs.

    ``number`` is the trial's number in the study: an enqueued trial keeps its own, a new trial gets
    the next free one (as the storage will number it when the batch is written in order).
    ``waiting_trial_id`` is the storage id of the WAITING trial it was popped from (``None``: a new
    trial). ``system_attrs`` and ``user_attrs`` are the attributes to write: all of a new trial's,
    only the added or changed ones of a popped trial. ``state`` is RUNNING, or FAIL for a discarded
    duplicate draw (``discarded``), which is written too: it used up a trial number.
    """

    number: int
    waiting_trial_id: int | None
    params: dict[str, Any]
    distributions: dict[str, BaseDistribution]
    system_attrs: dict[str, Any]
    user_attrs: dict[str, Any]
    state: TrialState
    datetime_start: datetime | None
    datetime_complete: datetime | None = None

    @property
    def discarded(self) -> bool:
        """Whether this draw was a duplicate, closed as FAIL and not part of the batch."""
        return self.state == TrialState.FAIL

    def as_template(self, user_attrs: Mapping[str, Any] | None = None) -> FrozenTrial:
        """The trial as a template to write (:func:`hpo_core.storage.trials.write_batch`), with
        ``user_attrs`` added (e.g. the round's ``hpo.*`` attributes). A popped WAITING trial exists
        already: the template says what it becomes (only its added or changed attributes)."""
        return FrozenTrial(
            number=self.number,
            state=self.state,
            value=None,
            datetime_start=self.datetime_start,
            datetime_complete=self.datetime_complete,
            params=dict(self.params),
            distributions=dict(self.distributions),
            user_attrs={**self.user_attrs, **(user_attrs or {})},
            system_attrs=dict(self.system_attrs),
            intermediate_values={},
            trial_id=-1,
        )


@dataclass(frozen=True)
class AskedBatch:
    """What :func:`ask_batch` asked: trials in ask order (discarded draws included), the study
    system attributes the sampler set or changed, and what the sampler saw."""

    trials: list[AskedTrial]
    study_system_attrs: dict[str, Any]
    #: The grid sampler ran out of unvisited points before the batch was full.
    exhausted: bool
    #: Trials the sampler saw, of the history given.
    history_seen: int
    history_given: int

    @property
    def batch(self) -> list[AskedTrial]:
        """The batch proper: the trials asked and kept, in ask order."""
        return [t for t in self.trials if not t.discarded]


def ask_batch(
    spec: StudySpec,
    *,
    run: SamplerRun,
    trials: Sequence[FrozenTrial],
    size: int,
    directions: Sequence[str] | None = None,
    study_system_attrs: Mapping[str, Any] | None = None,
    history_limit: int | str | None = "spec",
    next_number: int | None = None,
) -> AskedBatch:
    """Ask ``size`` trials of one round against an in-memory study holding ``trials``.

    Args:
        spec: the study's spec (search space, sampler type and options).
        run: seed, round number and sampler options of the run (the sampler is built as
            :func:`hpo_core.samplers.build_sampler` builds it for that round).
        trials: the study's trials as read: finished ones, WAITING (enqueued) ones, which are popped
            first, and RUNNING ones of other rounds (seen by the constant liar). Not modified.
        size: how many trials the batch should hold.
        directions: the study's directions (default: the spec's).
        study_system_attrs: the study's system attributes as read (QMC and NSGA-II keep state there).
        history_limit: K, the most finished trials a model-based sampler sees (``None``: all;
            default: the spec's ``sampler.history_limit``).
        next_number: the number the study's next new trial gets (default: one past the largest
            number in ``trials``; give it when ``trials`` is not the whole study).

    Returns:
        The asked trials and the sampler state to write back, see :class:`AskedBatch`.
    """
    limit = spec.sampler.history_limit if history_limit == "spec" else history_limit
    assert limit is None or isinstance(limit, int)
    dirs = list(directions) if directions is not None else spec.all_directions
    seen_history = select_history(
        trials,
        limit=limit,
        sampler_type=spec.sampler.type,
        directions=dirs,
        study_system_attrs=study_system_attrs or {},
    )
    if next_number is None:
        next_number = max((t.number for t in trials), default=-1) + 1
    storage = SnapshotStorage(
        directions=[StudyDirection[d.upper()] for d in dirs],
        trials=seen_history,
        study_system_attrs=study_system_attrs or {},
        next_number=next_number,
        next_trial_id=max((stored.trial_id(t) for t in trials), default=-1) + 1,
    )
    sampler = build_sampler(spec, seed=run.seed, options=dict(run.options), round_number=run.round_number)
    study = optuna.Study(study_name=SNAPSHOT_STUDY_NAME, storage=storage, sampler=sampler)
    space = space_size(spec)
    seen: set[str] = set()
    asked_ids: list[int] = []
    exhausted = False
    for _ in range(size):
        trial_id, params, drawn = _ask_distinct(study, spec, seen, space)
        asked_ids.extend(drawn)
        if trial_id is None:
            exhausted = True
            break
        seen.add(_key(params))
    originals = {stored.trial_id(t): t for t in seen_history}
    return AskedBatch(
        trials=[_asked(storage.get_trial(i), originals.get(i)) for i in asked_ids],
        study_system_attrs=storage.changed_study_system_attrs(),
        exhausted=exhausted,
        history_seen=len(seen_history),
        history_given=len(trials),
    )


def _ask_distinct(
    study: optuna.Study, spec: StudySpec, seen: set[str], space: float
) -> tuple[int | None, dict[str, Any], list[int]]:
    """Ask one trial whose params differ from the batch's so far (the engine's rule).

    Returns the kept trial's id (``None``: the grid is exhausted), its params, and the ids of every
    trial drawn for it (discarded duplicates first, closed as FAIL).
    """
    drawn: list[int] = []
    for attempt in range(MAX_DUPLICATE_DRAWS):
        if grid_taken(study, spec):
            return None, {}, drawn
        trial = study.ask()
        params = sample_params(spec, trial)
        drawn.append(stored.trial_id(trial))
        if _key(params) not in seen or len(seen) >= space or attempt == MAX_DUPLICATE_DRAWS - 1:
            return stored.trial_id(trial), params, drawn
        trial.set_user_attr(TrialAttr.DISCARDED, _DISCARD_REASON)
        study.tell(trial, state=TrialState.FAIL)
    raise AssertionError("unreachable")


def grid_taken(study: optuna.Study, spec: StudySpec) -> bool:
    """Whether a grid sampler has no point left that is neither finished nor running.

    Optuna's ``GridSampler.is_exhausted`` only looks at finished points; once the rest are all
    running (earlier in this batch or in another round) its next ask repeats one of them, and
    closing that duplicate makes the sampler call ``study.stop()``, which raises outside
    ``optimize``. So the batch ends here instead.
    """
    if not isinstance(study.sampler, optuna.samplers.GridSampler):
        return False
    points = math.prod(len(values) for values in grid_search_space(spec).values())
    taken = {
        t.system_attrs["grid_id"]
        for t in study.get_trials(deepcopy=False)
        if "grid_id" in t.system_attrs and (t.state.is_finished() or t.state == TrialState.RUNNING)
    }
    return len(taken) >= points


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _asked(trial: FrozenTrial, original: FrozenTrial | None) -> AskedTrial:
    """The write-back of one asked trial: what it holds now less what the storage already has."""
    system_attrs = dict(trial.system_attrs)
    user_attrs = dict(trial.user_attrs)
    if original is not None:
        system_attrs = {k: v for k, v in system_attrs.items() if original.system_attrs.get(k, _NO) != v}
        user_attrs = {k: v for k, v in user_attrs.items() if original.user_attrs.get(k, _NO) != v}
    return AskedTrial(
        number=trial.number,
        waiting_trial_id=None if original is None else stored.trial_id(original),
        params=dict(trial.params),
        distributions=dict(trial.distributions),
        system_attrs=system_attrs,
        user_attrs=user_attrs,
        state=trial.state,
        datetime_start=trial.datetime_start,
        datetime_complete=trial.datetime_complete,
    )


_NO = object()


# --- history bound ---------------------------------------------------------------------------------


def select_history(
    trials: Sequence[FrozenTrial],
    *,
    limit: int | None,
    sampler_type: str,
    directions: Sequence[str],
    study_system_attrs: Mapping[str, Any] | None = None,
) -> list[FrozenTrial]:
    """The trials a sampler sees, in number order: all of them, or a bounded set on a large study.

    Bounded (``limit`` = K given, the sampler fits a model, and more than K trials finished): every
    unfinished (RUNNING, WAITING) trial; the best ``K // 10`` complete trials (one objective: by
    value; several: by Pareto rank, then crowding-free in number order); the most recent complete or
    pruned trials up to K in all; and the trials the sampler's stored state needs: the last trial
    carrying CMA-ES's optimizer, the parents NSGA-II cached for its latest generation. Failed trials
    are left out (no model-based sampler reads them). TPE's "good" group (at most 25 trials) is always
    within the best, so its split stays that of the whole history.
    """
    finished = [t for t in trials if t.state.is_finished()]
    if limit is None or sampler_type in UNBOUNDED_SAMPLERS or len(finished) <= limit:
        return sorted(trials, key=lambda t: t.number)
    keep: dict[int, FrozenTrial] = {t.number: t for t in trials if not t.state.is_finished()}
    complete = [t for t in finished if t.state == TrialState.COMPLETE and t.values is not None]
    n_best = limit // 10
    for t in _best(complete, directions)[:n_best]:
        keep[t.number] = t
    room = limit - n_best
    for t in sorted(
        (t for t in finished if t.state in (TrialState.COMPLETE, TrialState.PRUNED)),
        key=lambda t: t.number,
        reverse=True,
    ):
        if room <= 0:
            break
        if t.number not in keep:
            keep[t.number] = t
            room -= 1
    for t in _state_anchors(finished, study_system_attrs or {}):
        keep[t.number] = t
    return sorted(keep.values(), key=lambda t: t.number)


def _best(complete: list[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    """Complete trials best first: by value, or with several objectives by Pareto front."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    if len(signs) == 1:
        return sorted(complete, key=lambda t: (signs[0] * t.values[0], t.number))
    points = [[s * v for s, v in zip(signs, t.values, strict=True)] for t in complete]
    ranks = _pareto_ranks(points)
    order = sorted(range(len(complete)), key=lambda i: (ranks[i], complete[i].number))
    return [complete[i] for i in order]


def _pareto_ranks(points: list[list[float]]) -> list[int]:
    """Non-dominated sorting rank of each point (0: the Pareto front), all objectives minimised."""
    remaining = set(range(len(points)))
    ranks = [0] * len(points)
    rank = 0
    while remaining:
        front = {
            i
            for i in remaining
            if not any(
                j != i
                and all(a <= b for a, b in zip(points[j], points[i], strict=True))
                and points[j] != points[i]
                for j in remaining
            )
        }
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


def _state_anchors(
    finished: list[FrozenTrial], study_system_attrs: Mapping[str, Any]
) -> Iterable[FrozenTrial]:
    """Finished trials a sampler's stored state refers to, which a bounded history must keep."""
    by_number = sorted(finished, key=lambda t: t.number)
    for t in reversed(by_number):
        if t.state == TrialState.COMPLETE and any(
            k.startswith(_CMA_OPTIMIZER_PREFIX) for k in t.system_attrs
        ):
            yield t
            break
    caches = [
        (int(key.rsplit(":", 1)[1]), value)
        for key, value in study_system_attrs.items()
        if _GA_PARENT_MARK in key and key.rsplit(":", 1)[1].isdigit()
    ]
    if caches:
        parent_ids = set(max(caches, key=lambda c: c[0])[1])
        yield from (t for t in by_number if stored.trial_id(t) in parent_ids)
