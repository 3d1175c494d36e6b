"""Task and trial logs carry the pipeline's lines, not the stack's deprecation notices.

Airflow shows its own deprecation warnings, and ``FutureWarning`` subclasses such as its
``DeprecatedImportWarning`` are shown by default: skops scanning every loaded module while MLflow
loads a scikit-learn model (finalize re-scoring champion and challenger) trips over more than a
thousand of Airflow's deprecated attributes, one log line each. They concern the stack's own
developers, never the person reading a study's task log.
"""

from __future__ import annotations

import warnings

__all__ = ["STACK_MODULES", "silence_stack_warnings"]

#: Modules whose ``FutureWarning``s are the stack's business, not a study's.
STACK_MODULES = r"(airflow|mlflow|skops|optuna|sklearn|sqlalchemy|alembic|pydantic|kubernetes)(\.|$)"


def silence_stack_warnings() -> None:
    """Drop deprecation notices from this process's output (a task or trial process: its log).

    Every ``DeprecationWarning`` / ``PendingDeprecationWarning``, and ``FutureWarning``s raised from
    the stack's modules or saying that something "is deprecated". Other warnings still show.
    """
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=STACK_MODULES)
    warnings.filterwarnings("ignore", message=r"(?s).*\bis deprecated\b", category=FutureWarning)
