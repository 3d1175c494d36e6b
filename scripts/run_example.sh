#!/usr/bin/env bash
# Run the example study end to end through Airflow on the embedded default
# (SQLite for Airflow, Optuna and MLflow, local artifacts, local trial workers).
# Usage: scripts/run_example.sh [study dag_id] [trigger conf as JSON]
set -euo pipefail
source "$(dirname "$0")/_bootstrap.sh"
source "$ROOT/scripts/env.sh"
DAG_ID="${1:-hpo_breast_cancer_gbm}"
CONF="${2:-}"
mkdir -p "$HPO_HOME" "$AIRFLOW_HOME"
LOG="$HPO_HOME/last_run.log"
echo "Preparing the Airflow metadata database in $AIRFLOW_HOME ..."
airflow db migrate > "$HPO_HOME/db_migrate.log" 2>&1 || { tail -30 "$HPO_HOME/db_migrate.log"; exit 1; }
echo "Running $DAG_ID with 'airflow dags test' (full log: $LOG) ..."
ARGS=(dags test "$DAG_ID")
[ -n "$CONF" ] && ARGS+=(--conf "$CONF")
if ! airflow "${ARGS[@]}" > "$LOG" 2>&1; then
  grep -E "ERROR|Error|failed" "$LOG" | tail -20
  echo "The study run failed; see $LOG" >&2
  exit 1
fi
if ! grep -q "DagRun Finished: dag_id=$DAG_ID.*state=success" "$LOG"; then
  grep -E "AirflowFailException|ERROR" "$LOG" | tail -10
  echo "The study run did not succeed; see $LOG" >&2
  exit 1
fi
hpo summary --dag-id "$DAG_ID" --check-model
