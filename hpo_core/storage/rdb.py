"""Open the Optuna RDB storage by URL, with engine options per database suited to many short workers."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import optuna
import sqlalchemy

from hpo_core.deployment import redact_url
from hpo_core.errors import StorageConfigError

__all__ = ["engine_kwargs", "flush", "flushing", "open_storage", "upgrade_schema"]

log = logging.getLogger(__name__)

_cache: dict[str, optuna.storages.RDBStorage] = {}
_lock = threading.Lock()


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for ``url``.

    PostgreSQL: pre-ping (a restarted server or a dropped connection is noticed before use),
    a small pool (each worker is one short process), connection and statement timeouts, and TCP
    keepalives on both ends, so that the server drops the session (and the trial claim it holds)
    of a worker whose node or network vanished within about a minute instead of hours.
    SQLite: a long busy timeout, since several local workers may write at once, and the
    write-ahead log (see :class:`_SqliteConnection`).
    """
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60, "factory": _SqliteConnection}}
    if url.startswith("postgresql"):
        return {
            "pool_pre_ping": True,
            "pool_size": 2,
            "max_overflow": 2,
            "pool_recycle": 300,
            "pool_timeout": 30,
            "connect_args": {
                "connect_timeout": 10,
                "application_name": "hpo",
                "keepalives": 1,
                "keepalives_idle": 30,
                "keepalives_interval": 10,
                "keepalives_count": 3,
                "options": (
                    "-c statement_timeout=60000 -c tcp_keepalives_idle=30 "
                    "-c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"
                ),
            },
        }
    return {"pool_pre_ping": True}


class _SqliteConnection(sqlite3.Connection):
    """A SQLite connection to a database in write-ahead-log mode (``journal_mode=WAL``).

    In SQLite's default rollback-journal mode each commit creates, syncs and deletes a journal file:
    5 to 20 ms on a busy disk, and asking a batch of trials commits once per parameter. With the
    write-ahead log a commit appends to one file and syncs it once (still ``synchronous=FULL``:
    every commit is as durable as before), and readers no longer wait for writers. The mode is
    stored in the database file, so every later connection (any process) uses it; the
    ``<database>-wal`` file is folded back into the database by :func:`flush` after each control
    task and when the last connection closes, so the ``.db`` file on its own stays complete.
    A database that cannot switch (busy) stays as it is, which works the same, only slower.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as e:
            log.debug("SQLite storage stays in its journal mode: %s", e)


def flush(url: str) -> None:
    """SQLite: copy what the write-ahead log holds into the database file (a passive checkpoint).

    Cheap when the log is empty; never waits for other connections. A no-op for other databases.
    """
    storage = _cache.get(url) if url.startswith("sqlite") else None
    if storage is None:
        return
    try:
        with storage.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlalchemy.exc.SQLAlchemyError as e:  # the next checkpoint does it
        log.debug("checkpoint of %s skipped: %r", redact_url(url), e)


@contextlib.contextmanager
def flushing(url: str) -> Iterator[None]:
    """Around a control task's work: fold a SQLite storage's write-ahead log into its file afterwards."""
    try:
        yield
    finally:
        flush(url)


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Return the (per-process cached) Optuna storage at ``url``."""
    if not url:
        raise StorageConfigError(
            "no Optuna storage configured: set HPO_STORAGE_URL or the Airflow connection 'hpo_optuna'"
        )
    with _lock:
        storage = _cache.get(url)
        if storage is None:
            storage = _open_current(url)
            if storage is None:
                try:
                    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
                except Exception as e:  # SQLAlchemy raises many types; convert at the boundary
                    hint = "; run 'hpo storage upgrade' (see README)" if "storage upgrade" in str(e) else ""
                    raise StorageConfigError(
                        f"cannot open Optuna storage {redact_url(url)}: {type(e).__name__}: {e}{hint}"
                    ) from e
            _cache[url] = storage
        return storage


#: Head schema revision of the installed Optuna, read once per process (from its migration scripts).
_head_version: list[str] = []


def _open_current(url: str) -> optuna.storages.RDBStorage | None:
    """The storage at ``url`` if its tables exist at this Optuna's schema, opened cheaply; else ``None``.

    Optuna's own open checks every table (``create_all``) and the schema version on each call; a
    storage that is already at the head revision needs one query for that. Anything else (no tables
    yet, an older or newer schema) returns ``None``, and the full open creates the tables or refuses
    the schema with its usual message. A database that does not answer raises at once.
    """
    try:
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs(url), skip_compatibility_check=True, skip_table_creation=True
        )
    except Exception as e:  # Optuna wraps the database's error
        cause = e if isinstance(e, sqlalchemy.exc.SQLAlchemyError) else e.__cause__
        if isinstance(cause, sqlalchemy.exc.OperationalError) and "no such table" not in str(cause):
            # The database does not answer: the full open would only wait for it a second time.
            raise StorageConfigError(
                f"cannot open Optuna storage {redact_url(url)}: {type(cause).__name__}: {cause}"
            ) from cause
        return None  # no tables yet (or another surprise): the full open creates them, or says why
    try:
        if not _head_version:
            _head_version.append(storage.get_head_version())
        if storage.get_current_version() == _head_version[0]:
            return storage
    except Exception as e:  # the full open reports it
        log.debug("quick open of %s failed: %r", redact_url(url), e)
    storage.engine.dispose()
    return None


def upgrade_schema(url: str) -> tuple[str | None, str]:
    """Bring the storage's tables to the schema of the installed Optuna (its alembic migrations).

    Run it once after upgrading Optuna, before any worker of the new version starts (they refuse
    an outdated schema). Idempotent; on an empty database it creates the tables.

    Returns:
        ``(version before, version after)``; before is ``None`` when the tables were created.

    Raises:
        StorageConfigError: the database cannot be reached, or its schema is newer than this Optuna.
    """
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs(url))
        try:
            exists = sqlalchemy.inspect(engine).has_table("version_info")
        finally:
            engine.dispose()
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs(url), skip_compatibility_check=True, skip_table_creation=exists
        )
    except Exception as e:  # SQLAlchemy raises many types; convert at the boundary
        raise StorageConfigError(
            f"cannot open Optuna storage {redact_url(url)}: {type(e).__name__}: {e}"
        ) from e
    try:
        before = storage.get_current_version() if exists else None
        head = storage.get_head_version()
        if before is not None and before != head:
            if before not in storage.get_all_versions():
                raise StorageConfigError(
                    f"Optuna storage {redact_url(url)} has schema {before}, newer than this Optuna "
                    f"{optuna.__version__} knows (head {head}); upgrade Optuna instead"
                )
            log.info("upgrading Optuna storage %s from schema %s to %s", redact_url(url), before, head)
            storage.upgrade()
        return before, storage.get_current_version()
    finally:
        storage.engine.dispose()
