"""``WarmLocalExecutor``: a LocalExecutor whose task processes start with the HPO stack imported.

With the LocalExecutor (start method ``fork``) the scheduler forks its worker processes when the
executor starts, and every task process is forked from one of those workers (the task SDK's
supervisor uses a bare ``os.fork`` on Linux). Whatever the scheduler has imported before the
workers are forked is therefore already in memory in every task process, shared copy-on-write.

This executor imports the heavy modules a study's tasks need (Optuna, SQLAlchemy, MLflow's client
and SQL stores, :mod:`hpo_core.study`, :mod:`hpo_core.worker`, :mod:`hpo_core.tracking`, the
task runner) once, in the scheduler, right before the LocalExecutor forks its workers, plus the
modules named in ``HPO_PREIMPORT`` (comma separated, e.g. ``hpo_core.examples.breast_cancer`` for
an objective module and its scikit-learn imports). A module that cannot be imported is logged and
skipped: a warm start is an optimisation, never a reason for the scheduler not to start.

Use it with ``AIRFLOW__CORE__EXECUTOR=hpo_airflow.executor.WarmLocalExecutor`` (the local instance
of ``scripts/local_airflow.py`` does). Importing user modules in the scheduler runs their import
side effects there: name only modules that are safe to import in a long-lived process (no threads
or connections opened at import).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import time
from collections.abc import Iterable

from airflow.executors.local_executor import LocalExecutor

__all__ = ["DEFAULT_PREIMPORTS", "ENV_PREIMPORT", "WarmLocalExecutor", "preimport", "preimport_names"]

log = logging.getLogger(__name__)

#: Environment variable with extra modules to import before the workers are forked (comma separated).
ENV_PREIMPORT = "HPO_PREIMPORT"

#: Imported by every warm executor, in this order (heaviest shared dependencies first).
DEFAULT_PREIMPORTS: tuple[str, ...] = (
    "sqlalchemy",
    "optuna",
    "mlflow",
    "mlflow.entities",
    "mlflow.exceptions",
    "mlflow.tracking",
    # The embedded default keeps MLflow in SQLite: the client opens these stores in each task.
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    # Model flavours objectives log with (their first log_model otherwise imports them per task).
    "mlflow.pyfunc",
    "mlflow.sklearn",
    "skops.io",
    "hpo_core.study.start",
    "hpo_core.study.suggest",
    "hpo_core.study.observe",
    "hpo_core.study.finalize",
    "hpo_core.worker",
    "hpo_airflow.tasks",
    "hpo_airflow.backends.local",
    # What a forked task process runs before it parses its DAG file.
    "airflow.sdk.execution_time.supervisor",
    "airflow.sdk.execution_time.task_runner",
)


def preimport_names(env_value: str | None = None) -> list[str]:
    """The modules to import: :data:`DEFAULT_PREIMPORTS`, then ``HPO_PREIMPORT``'s, without repeats."""
    raw = os.environ.get(ENV_PREIMPORT, "") if env_value is None else env_value
    extra = [name.strip() for name in raw.split(",") if name.strip()]
    return list(dict.fromkeys([*DEFAULT_PREIMPORTS, *extra]))


def preimport(names: Iterable[str]) -> dict[str, float | None]:
    """Import ``names``; return seconds per module, ``None`` for a module that failed (logged)."""
    took: dict[str, float | None] = {}
    for name in names:
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as e:  # an optional module may fail in any way
            log.warning(
                "warm executor: could not pre-import %s (%s: %s); tasks import it themselves",
                name,
                type(e).__name__,
                e,
            )
            took[name] = None
            continue
        took[name] = time.perf_counter() - started
    return took


class WarmLocalExecutor(LocalExecutor):
    """LocalExecutor that pre-imports the HPO stack in the scheduler before forking its workers."""

    def start(self) -> None:
        """Import the stack (see :func:`preimport_names`), then start the LocalExecutor's workers."""
        if multiprocessing.get_start_method() != "fork":
            log.warning(
                "warm executor: multiprocessing start method is %r, not 'fork': task processes "
                "will not share the pre-imported modules (set AIRFLOW__CORE__MP_START_METHOD=fork)",
                multiprocessing.get_start_method(),
            )
        else:
            started = time.perf_counter()
            took = preimport(preimport_names())
            failed = sorted(name for name, seconds in took.items() if seconds is None)
            log.info(
                "warm executor: pre-imported %d modules in %.2fs before forking %d workers%s",
                len(took) - len(failed),
                time.perf_counter() - started,
                self.parallelism,
                f" (failed: {', '.join(failed)})" if failed else "",
            )
        super().start()
