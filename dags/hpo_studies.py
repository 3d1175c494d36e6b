"""One DAG per study file in ``dags/studies/`` (the factory lives in ``plugins/hpo_airflow``)."""

from hpo_airflow import load_study_dags

load_study_dags(globals())
