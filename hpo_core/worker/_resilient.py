"""Storage calls of the worker that ride out a dropped or restarting database (a few retries)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from hpo_core.errors import TrialStateError
from hpo_core.storage import trials as stored

__all__ = ["brief", "storage_call", "tell"]

log = logging.getLogger("hpo_core.worker")

_STORAGE_ATTEMPTS = 6
_T = TypeVar("_T")
_CONNECTION_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
)


def storage_call(what: str, call: Callable[[], _T]) -> _T:
    """Run ``call``; retry it with back-off (about 15 s in all) while the database connection fails.

    Only connection errors are retried; anything else is raised at once.
    """
    delay = 0.5
    for attempt in range(1, _STORAGE_ATTEMPTS + 1):
        try:
            return call()
        except Exception as e:
            if attempt == _STORAGE_ATTEMPTS or not _is_connection_error(e):
                raise
            log.warning(
                "%s: storage connection failed (%s); retry %d in %.1fs", what, brief(e), attempt, delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


def tell(study: optuna.Study, frozen: FrozenTrial, *, state: TrialState, values: list[float] | None) -> None:
    """Tell the result, retrying over a dropped connection; keep a verdict somebody else gave.

    Raises:
        TrialStateError: somebody (``observe``, a stale-trial sweep) closed the trial meanwhile.
    """
    told = False

    def once() -> None:
        nonlocal told
        try:
            told = True
            study.tell(frozen.number, values=values, state=state)
        except (RuntimeError, ValueError) as e:
            current = stored.get_trial(study, stored.trial_id(frozen))
            if told and current.state == state and current.values == values:
                return  # an earlier try went through before its connection dropped
            raise TrialStateError(f"trial {frozen.number} was closed by someone else: {e}") from e

    storage_call(f"trial {frozen.number}: tell {state.name}", once)


def _is_connection_error(error: BaseException) -> bool:
    """A dropped, refused or timed-out database connection (Optuna wraps it in StorageInternalError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, _CONNECTION_ERRORS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def brief(error: BaseException) -> str:
    """``Type: first line`` of the root cause, for one log line."""
    root: BaseException = error
    while root.__cause__ is not None:
        root = root.__cause__
    first = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return f"{type(root).__name__}: {first}"[:200]
