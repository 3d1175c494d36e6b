"""The ``hpo_promote_model`` DAG: promote a registered model version, or roll back, from the UI."""

from hpo_airflow.promotion_dag import build_promotion_dag

hpo_promote_model = build_promotion_dag()
