"""A study's lifecycle, one module per Airflow task: :mod:`.start`, :mod:`.suggest`, :mod:`.observe`,
:mod:`.finalize`; with the run's settings (:mod:`.config`), the loaded study (:mod:`.state`) and trial
accounting (:mod:`.accounting`).

Each lifecycle function is one task's worth of work, but none imports Airflow: the glue in
``plugins/hpo_airflow`` passes plain values in and turns the results into task outcomes. The Optuna
storage is the single source of truth; return values are small payloads (:mod:`hpo_core.payloads`).

Import what you need from its module (``from hpo_core.study.suggest import suggest_batch``): this
package re-exports nothing, so that the DAG factory can read :mod:`.config` without loading Optuna,
and ``suggest`` never loads MLflow, which it does not use.
"""
