# Source this (". scripts/env.sh") to point airflow, mlflow and hpo at the local embedded state.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HPO_HOME="${HPO_HOME:-$ROOT/.hpo}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$HPO_HOME/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export PATH="$ROOT/.venv/bin:$PATH"
