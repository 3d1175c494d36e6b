"""Tests only: an auth manager that denies one user some DAGs, for the HPO view's access tests.

Airflow's SimpleAuthManager gives every role read access to every DAG, so "a user without access
to a DAG" cannot exist with it. :class:`DagDenyingAuthManager` is SimpleAuthManager with one
addition: ``HPO_TEST_DENY`` (``user=glob,glob;user2=...``) names DAGs a user may not touch. The
HPO view's check is the real one (the auth manager's ``is_authorized_dag``), as with any manager.
This module holds the settings (no Airflow import: the test session reads it at start); the class
is in ``tests/ui_auth_manager.py``, imported by the API server.
"""

from __future__ import annotations

#: The user the shared test Airflow denies the DAGs of ``DENIED_DAGS``.
OUTSIDER = "outsider"
DENIED_DAGS = "hpo_ui_*"
#: Environment of the shared test Airflow (see ``tests/fixtures_services.py``).
AUTH_ENV = {
    "AIRFLOW__CORE__AUTH_MANAGER": "tests.ui_auth_manager.DagDenyingAuthManager",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"admin:admin,{OUTSIDER}:viewer",
    "HPO_TEST_DENY": f"{OUTSIDER}={DENIED_DAGS}",
}
