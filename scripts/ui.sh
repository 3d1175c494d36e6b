#!/usr/bin/env bash
# The Airflow UI (local Airflow with the same settings as run_example.sh) and the MLflow UI on the
# state under .hpo/, until Ctrl-C. A run_example.sh started meanwhile runs on this Airflow.
# Ports: HPO_AIRFLOW_PORT (default 8080), HPO_MLFLOW_PORT (default 5000).
set -euo pipefail
source "$(dirname "$0")/_bootstrap.sh"
exec "$VENV/bin/python" "$ROOT/scripts/local_airflow.py" ui "$@"
