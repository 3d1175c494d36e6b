"""The Optuna storage: opened by URL (:mod:`.rdb`), trial claims per database (:mod:`.claims`), and
the one module that uses Optuna's private storage API (:mod:`.trials`)."""

from __future__ import annotations

from hpo_core.storage.claims import TrialClaim
from hpo_core.storage.rdb import engine_kwargs, flush, flushing, open_storage, upgrade_schema

__all__ = ["TrialClaim", "engine_kwargs", "flush", "flushing", "open_storage", "upgrade_schema"]
