"""An in-memory copy of one study that keeps the real trial ids and numbers (for the batch asker).

Part of the storage package because it implements Optuna's storage interface (``BaseStorage``) over
trials read from the real storage (:func:`hpo_core.storage.trials.read_trials`), and so works with
the same private pieces (trial ids, ``FrozenStudy``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Container, Mapping, Sequence
from datetime import datetime
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

__all__ = ["SNAPSHOT_STUDY_NAME", "SnapshotStorage"]

#: The name of the one study a snapshot holds.
SNAPSHOT_STUDY_NAME = "hpo-snapshot"
_NO = object()


def _json(value: Any) -> Any:
    """The value as a JSON storage gives it back (Optuna's RDB storage keeps attributes as JSON)."""
    return json.loads(json.dumps(value))


class SnapshotStorage(BaseStorage):
    """One study held in memory, loaded from trials read elsewhere, keeping their ids and numbers.

    Optuna's ``InMemoryStorage`` renumbers trials densely from 0; samplers read trial numbers
    (grid ids, CMA-ES seeds, TPE's recency order, QMC's first trial), so a copy of a bounded
    history must keep the real numbers, and new trials must get the numbers the real study will
    give them. Attributes are normalised through JSON, as the RDB storage does. Trials given are
    never modified: every change replaces the stored trial with an updated copy.
    """

    _STUDY_ID = 0

    def __init__(
        self,
        *,
        directions: list[StudyDirection],
        trials: Sequence[FrozenTrial],
        study_system_attrs: Mapping[str, Any],
        next_number: int,
        next_trial_id: int,
    ) -> None:
        self._directions = list(directions)
        self._trials: dict[int, FrozenTrial] = {t._trial_id: t for t in trials}
        self._order: list[int] = [t._trial_id for t in sorted(trials, key=lambda t: t.number)]
        self._study_system_attrs: dict[str, Any] = dict(study_system_attrs)
        self._initial_study_system_attrs = dict(study_system_attrs)
        self._study_user_attrs: dict[str, Any] = {}
        self._next_number = next_number
        self._next_trial_id = next_trial_id

    def changed_study_system_attrs(self) -> dict[str, Any]:
        """Study system attributes set since the snapshot was taken, with a new value."""
        before = self._initial_study_system_attrs
        return {k: v for k, v in self._study_system_attrs.items() if before.get(k, _NO) != v}

    # studies
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        raise NotImplementedError("the snapshot holds exactly one study")

    def delete_study(self, study_id: int) -> None:
        raise NotImplementedError("the snapshot holds exactly one study")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._study_user_attrs[key] = _json(value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._study_system_attrs[key] = _json(value)

    def get_study_id_from_name(self, study_name: str) -> int:
        if study_name != SNAPSHOT_STUDY_NAME:
            raise KeyError(study_name)
        return self._STUDY_ID

    def get_study_name_from_id(self, study_id: int) -> str:
        return SNAPSHOT_STUDY_NAME

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return list(self._directions)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return dict(self._study_user_attrs)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return dict(self._study_system_attrs)

    def get_all_studies(self) -> list[FrozenStudy]:
        return [
            FrozenStudy(
                study_name=SNAPSHOT_STUDY_NAME,
                direction=None,
                directions=self._directions,
                user_attrs=dict(self._study_user_attrs),
                system_attrs=dict(self._study_system_attrs),
                study_id=self._STUDY_ID,
            )
        ]

    # trials
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id, number = self._next_trial_id, self._next_number
        self._next_trial_id += 1
        self._next_number += 1
        if template_trial is None:
            trial = FrozenTrial(
                number=number,
                state=TrialState.RUNNING,
                value=None,
                datetime_start=datetime.now(),
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
                trial_id=trial_id,
            )
        else:
            trial = copy.deepcopy(template_trial)
            trial.number, trial._trial_id = number, trial_id
        self._trials[trial_id] = trial
        self._order.append(trial_id)
        return trial_id

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        trial = self._updatable(trial_id)
        trial.params = {**trial.params, param_name: distribution.to_external_repr(param_value_internal)}
        trial.distributions = {**trial.distributions, param_name: distribution}

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        for trial_id, trial in self._trials.items():
            if trial.number == trial_number:
                return trial_id
        raise KeyError(f"no trial number {trial_number} in the snapshot")

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._get(trial_id).number

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        current = self._get(trial_id)
        self.check_trial_is_updatable(trial_id, current.state)
        if state == TrialState.RUNNING and current.state != TrialState.WAITING:
            return False
        trial = self._replace(trial_id)
        trial.state = state
        if values is not None:
            trial.values = list(values)
        if state == TrialState.RUNNING:
            trial.datetime_start = datetime.now()
        if state.is_finished():
            trial.datetime_complete = datetime.now()
        return True

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        trial = self._updatable(trial_id)
        trial.intermediate_values = {**trial.intermediate_values, step: intermediate_value}

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        trial = self._updatable(trial_id)
        trial.user_attrs = {**trial.user_attrs, key: _json(value)}

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        trial = self._updatable(trial_id)
        trial.system_attrs = {**trial.system_attrs, key: _json(value)}

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._get(trial_id)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        trials = [self._trials[i] for i in self._order]
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def _get(self, trial_id: int) -> FrozenTrial:
        try:
            return self._trials[trial_id]
        except KeyError:
            raise KeyError(f"no trial with id {trial_id} in the snapshot") from None

    def _replace(self, trial_id: int) -> FrozenTrial:
        """Swap the stored trial for a shallow copy to change (trials handed out stay as they were)."""
        trial = copy.copy(self._get(trial_id))
        self._trials[trial_id] = trial
        return trial

    def _updatable(self, trial_id: int) -> FrozenTrial:
        self.check_trial_is_updatable(trial_id, self._get(trial_id).state)
        return self._replace(trial_id)
