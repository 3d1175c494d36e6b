"""Trial claims: the exclusive right to evaluate one trial, per storage backend (chosen by URL scheme).

A worker evaluates a trial only while it holds the trial's claim (DESIGN.md), so twin launches never
evaluate one trial twice. The claim must outlive transactions and vanish with its holder, on any host:

* PostgreSQL: a session-level advisory lock ``pg_try_advisory_lock(CLAIM_LOCK_NAMESPACE, trial_id)``
  on a connection of its own; the server drops it the moment the holder's process or connection goes
  away (TCP keepalives bound how long a vanished node keeps it, see :func:`storage.engine_kwargs`).
* SQLite (one machine): a byte-range lock at offset ``trial_id`` of ``<database>.claims``, dropped by
  the kernel when the process exits.
* Any other database: no exclusion (a warning says so).

A new backend adds one :class:`_Lock` subclass and one entry in :data:`_LOCKS`.
"""

from __future__ import annotations

import abc
import fcntl
import logging
import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar

import sqlalchemy
from sqlalchemy.engine import make_url

from hpo_core.storage.rdb import open_storage

__all__ = ["CLAIM_LOCK_NAMESPACE", "TrialClaim"]

log = logging.getLogger(__name__)

#: First key of the two-key PostgreSQL advisory locks that claim trials ("HPO1").
CLAIM_LOCK_NAMESPACE = 0x48504F31
#: Claims this process holds (a second claim object of the same process must not get one twice).
_claims_held: set[tuple[str, int]] = set()


class _Lock(abc.ABC):
    """How one storage backend holds a claim on a trial."""

    def __init__(self, url: str, trial_id: int) -> None:
        self.url, self.trial_id = url, trial_id

    @abc.abstractmethod
    def try_lock(self) -> bool:
        """Take the lock without waiting; whether it is ours now."""

    @abc.abstractmethod
    def unlock(self) -> None:
        """Give the lock up (it may already be gone with its connection)."""


class _AdvisoryLock(_Lock):
    """PostgreSQL: a session-level advisory lock on a connection of its own (autocommit)."""

    _TRY = sqlalchemy.text("SELECT pg_try_advisory_lock(:ns, :id)")
    _UNLOCK = sqlalchemy.text("SELECT pg_advisory_unlock(:ns, :id)")

    def __init__(self, url: str, trial_id: int) -> None:
        super().__init__(url, trial_id)
        self._connection: Any = None

    def try_lock(self) -> bool:
        # Autocommit: the lock outlives transactions, and the connection never sits idle in one.
        connection = open_storage(self.url).engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            got = connection.execute(self._TRY, {"ns": CLAIM_LOCK_NAMESPACE, "id": self.trial_id}).scalar()
        except BaseException:
            connection.close()
            raise
        if not got:
            connection.close()
            return False
        self._connection = connection
        return True

    def unlock(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.execute(self._UNLOCK, {"ns": CLAIM_LOCK_NAMESPACE, "id": self.trial_id})
        except sqlalchemy.exc.SQLAlchemyError as e:  # the lock went with the connection
            log.warning("claim of trial id %d went with its connection: %r", self.trial_id, e)
            connection.invalidate()
        finally:
            connection.close()


class _FileLock(_Lock):
    """SQLite: a byte-range lock at offset ``trial_id`` of ``<database>.claims``."""

    #: One descriptor per claims file and process, never closed: closing any descriptor of a file
    #: drops all of the process's POSIX locks on it.
    _files: ClassVar[dict[str, int]] = {}

    def __init__(self, url: str, trial_id: int) -> None:
        super().__init__(url, trial_id)
        self._fd: int | None = None

    def try_lock(self) -> bool:
        database = make_url(self.url).database
        if not database or database == ":memory:":
            return True  # one process owns an in-memory database
        path = f"{database}.claims"
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.trial_id)
        except OSError:
            return False
        self._fd = fd
        return True

    def unlock(self) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self.trial_id)
            self._fd = None


class _NoLock(_Lock):
    """A database without a claim mechanism here: twin workers are not excluded."""

    def try_lock(self) -> bool:
        log.warning("no trial claims on %s: twin workers are not excluded", self.url.split(":")[0])
        return True

    def unlock(self) -> None:
        """Nothing was held."""


#: URL scheme (before ``+driver``) -> how claims are held there.
_LOCKS: dict[str, type[_Lock]] = {"postgresql": _AdvisoryLock, "sqlite": _FileLock}


def _lock_for(url: str, trial_id: int) -> _Lock:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    return _LOCKS.get(scheme, _NoLock)(url, trial_id)


class TrialClaim:
    """An exclusive claim on one trial, released by its holder or by the holder's death."""

    def __init__(self, url: str, trial_id: int) -> None:
        self.url = url
        self.trial_id = trial_id
        self._lock = _lock_for(url, trial_id)
        self.held = False

    def try_acquire(self) -> bool:
        """Take the claim if nobody holds it; return whether this object holds it now."""
        if self.held:
            return True
        key = (self.url, self.trial_id)
        if key in _claims_held:  # another claim object of this process holds it
            return False
        if self._lock.try_lock():
            self.held = True
            _claims_held.add(key)
        return self.held

    def acquire(self, *, poll: float = 0.5, on_wait: Callable[[], None] | None = None) -> None:
        """Wait until the claim is ours; ``on_wait`` is called once if somebody else holds it."""
        while not self.try_acquire():
            if on_wait is not None:
                on_wait()
                on_wait = None
            time.sleep(poll)

    def release(self) -> None:
        """Give the claim up (idempotent; a connection that dropped meanwhile took it with it)."""
        if not self.held:
            return
        self.held = False
        _claims_held.discard((self.url, self.trial_id))
        self._lock.unlock()

    def __enter__(self) -> TrialClaim:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
