"""Airflow glue of the HPO pipeline: the study DAG factory and its loader."""

from __future__ import annotations

from hpo_airflow.factory import build_study_dag, study_params
from hpo_airflow.loader import load_study_dags

__all__ = ["build_study_dag", "load_study_dags", "study_params"]
