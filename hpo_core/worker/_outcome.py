"""What happened to one trial of a slot, as the worker reports it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from optuna.trial import TrialState

__all__ = ["TrialOutcome"]


@dataclass(frozen=True)
class TrialOutcome:
    """What happened to the trial; printed as the worker's last line for the task log."""

    trial_number: int
    requested: int
    state: str
    values: list[float] | None = None
    reason: str | None = None
    retry_of: int | None = None
    already_finished: bool = False

    def to_json(self) -> str:
        """One line of JSON."""
        return json.dumps(self.__dict__, default=str)

    @property
    def ok(self) -> bool:
        """Whether the trial has a usable final state (COMPLETE or PRUNED, now or before)."""
        return self.state in (TrialState.COMPLETE.name, TrialState.PRUNED.name)

    def summary(self) -> str:
        """One line for the task log: ``trial 9 (retry of 4): COMPLETE 0.9931``."""
        head = f"trial {self.trial_number}"
        if self.trial_number != self.requested:
            head += f" (for trial {self.requested})"
        if self.retry_of is not None:
            head += f" (retry of {self.retry_of})"
        text = f"{head}: {self.state}"
        if self.values:
            text += " " + ", ".join(f"{v:.6g}" for v in self.values)
        if self.already_finished:
            text += " (already finished: not evaluated again)"
        if self.reason and not self.ok:
            text += f": {self.reason}"
        return text
