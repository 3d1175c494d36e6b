#!/usr/bin/env bash
# Create one database and one owning user each for Airflow, Optuna and MLflow.
#
# Run once by the postgres image (/docker-entrypoint-initdb.d) when its data volume is empty; names
# and passwords come from the environment, never from this file. psql variables (:"name", :'text')
# quote every value, so a password cannot break out of the SQL.
set -euo pipefail

create_database() {
    local database=$1 user=$2 password=$3
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER}" --dbname postgres \
        -v database="${database}" -v user="${user}" -v password="${password}" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'user', :'password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'database', :'user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') \gexec
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
SQL
    echo "init-databases: database ${database} owned by ${user}"
}

create_database "${AIRFLOW_DB_NAME:?AIRFLOW_DB_NAME must be set}" \
    "${AIRFLOW_DB_USER:?AIRFLOW_DB_USER must be set}" "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD must be set}"
create_database "${OPTUNA_DB_NAME:?OPTUNA_DB_NAME must be set}" \
    "${OPTUNA_DB_USER:?OPTUNA_DB_USER must be set}" "${OPTUNA_DB_PASSWORD:?OPTUNA_DB_PASSWORD must be set}"
create_database "${MLFLOW_DB_NAME:?MLFLOW_DB_NAME must be set}" \
    "${MLFLOW_DB_USER:?MLFLOW_DB_USER must be set}" "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD must be set}"
