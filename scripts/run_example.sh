#!/usr/bin/env bash
# Run a study end to end on a real local Airflow (api-server, scheduler, dag-processor, LocalExecutor)
# on the embedded default: SQLite for Airflow, Optuna and MLflow, local artifacts and trial workers,
# everything under .hpo/. Shows the run's progress, prints its result, stops what it started.
# Usage: scripts/run_example.sh [study dag_id] [trigger conf as JSON] [--keep-ui]
# The logic lives in scripts/local_airflow.py (python scripts/local_airflow.py run --help).
set -euo pipefail
source "$(dirname "$0")/_bootstrap.sh"
exec "$VENV/bin/python" "$ROOT/scripts/local_airflow.py" run "$@"
