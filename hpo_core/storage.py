"""Open the Optuna RDB storage with engine options suited to many short-lived workers."""

from __future__ import annotations

import threading
from typing import Any

import optuna

from hpo_core.deployment import redact_url
from hpo_core.errors import StorageConfigError

__all__ = ["engine_kwargs", "open_storage"]

_cache: dict[str, optuna.storages.RDBStorage] = {}
_lock = threading.Lock()


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for ``url``.

    PostgreSQL: pre-ping (a restarted server or a dropped connection is noticed before use),
    a small pool (each worker is one short process), connection and statement timeouts.
    SQLite: a long busy timeout, since several local workers may write at once.
    """
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
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
                "options": "-c statement_timeout=60000",
            },
        }
    return {"pool_pre_ping": True}


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Return the (per-process cached) Optuna storage at ``url``."""
    if not url:
        raise StorageConfigError(
            "no Optuna storage configured: set HPO_STORAGE_URL or the Airflow connection 'hpo_optuna'"
        )
    with _lock:
        storage = _cache.get(url)
        if storage is None:
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url))
            except Exception as e:  # SQLAlchemy raises many types; convert at the boundary
                raise StorageConfigError(
                    f"cannot open Optuna storage {redact_url(url)}: {type(e).__name__}: {e}"
                ) from e
            _cache[url] = storage
        return storage
