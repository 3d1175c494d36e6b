"""Every ``hpo.*`` key the pipeline writes, with what it means: the one place they are spelled.

Three families: user attributes of an Optuna study (:class:`StudyAttr`) and of its trials
(:class:`TrialAttr`), and tags of MLflow runs and registered model versions (:class:`Tag`). The Optuna
storage is the source of truth (DESIGN.md); the MLflow tags repeat what a person needs next to a run or
a model version.
"""

from __future__ import annotations

from typing import Final

__all__ = ["StudyAttr", "Tag", "TrialAttr"]


class StudyAttr:
    """User attributes of an Optuna study (one study per DAG run, or one long-lived one)."""

    #: The study file, as validated JSON (:meth:`hpo_core.spec.StudySpec.to_json`).
    SPEC: Final = "hpo.spec"
    #: The run's settings: the spec's budget with the trigger's overrides (:class:`RunConfig`).
    RUN_CONFIG: Final = "hpo.run_config"
    #: The DAG and the DAG run that own the study (the latest run, for a long-lived study).
    DAG_ID: Final = "hpo.dag_id"
    RUN_ID: Final = "hpo.run_id"
    #: Unix time the DAG run started the study; the study timeout counts from it.
    STARTED: Final = "hpo.started_at"
    #: Why no further round runs (budget spent, target reached, ...); cleared when a run restarts.
    STOP: Final = "hpo.stop_reason"
    #: The MLflow parent run and experiment of the study.
    PARENT_RUN: Final = "hpo.mlflow_parent_run_id"
    EXPERIMENT: Final = "hpo.mlflow_experiment_id"
    #: Prefix of each round's summary: ``hpo.round_summary.<round>`` (``.<run_id>.<round>`` when long-lived).
    ROUND_SUMMARY_PREFIX: Final = "hpo.round_summary."
    #: Set on a long-lived study (warm_start.mode ``continue``): budget and rounds count per DAG run.
    CONTINUOUS: Final = "hpo.continuous"
    #: What the warm start enqueued and skipped; its presence marks the warm start as done.
    WARM_START: Final = "hpo.warm_start"
    #: The image the study's trials run in, when the worker backend runs them in one (Kubernetes).
    WORKER_IMAGE: Final = "hpo.worker_image"
    #: What finalize decided: ``succeeded`` or ``failed: <why>`` (the HPO view and ``hpo status`` show it).
    OUTCOME: Final = "hpo.outcome"
    #: The model version finalize registered for the run: ``{"name", "version"}``.
    REGISTERED_MODEL: Final = "hpo.registered_model"
    #: The model the ``refit`` hook fitted for the best trial: ``{"trial", "model_uri", "run_id",
    #: "lineage"}``; a second finalize registers it instead of fitting again.
    REFIT: Final = "hpo.refit"
    #: Trials whose MLflow child run was logged (or closed) after they finished, because MLflow was
    #: unavailable during their evaluation: ``{trial number: run id}``.
    RUNS_LOGGED_LATE: Final = "hpo.runs_logged_late"
    #: Rounds whose summary could not be logged to the parent run yet (MLflow was unavailable).
    ROUNDS_UNLOGGED: Final = "hpo.rounds_unlogged"


class TrialAttr:
    """User attributes of an Optuna trial."""

    #: Round, position in the round's batch and slot (map index of the evaluate task) of the trial.
    ROUND: Final = "hpo.round"
    BATCH_INDEX: Final = "hpo.batch_index"
    MAP_INDEX: Final = "hpo.map_index"
    #: The DAG and DAG run that suggested the trial.
    DAG_ID: Final = "hpo.dag_id"
    RUN_ID: Final = "hpo.run_id"
    #: A replacement of a failed trial: the trial it replaces, the mapped trial it stands for, and the
    #: attempt that created it (DESIGN.md, retry semantics).
    RETRY_OF: Final = "hpo.retry_of"
    RETRY_ROOT: Final = "hpo.retry_root"
    CREATED_BY_ATTEMPT: Final = "hpo.created_by_attempt"
    #: A duplicate draw or a losing twin: never evaluated, never counted.
    DISCARDED: Final = "hpo.discarded"
    #: Who evaluates the trial (``{"host", "pid", "attempt", "started_at"}``) and its last sign of life.
    WORKER: Final = "hpo.worker"
    HEARTBEAT: Final = "hpo.heartbeat"
    #: The trial's MLflow child run, the model it logged, its extra metrics and lineage.
    MLFLOW_RUN: Final = "hpo.mlflow_run_id"
    MODEL_URI: Final = "hpo.model_uri"
    METRICS: Final = "hpo.metrics"
    LINEAGE: Final = "hpo.lineage"
    #: Where an enqueued warm-start trial's params came from.
    WARM_START: Final = "hpo.warm_start"
    #: Why a trial failed, in words (task log, MLflow and the round summary say the same).
    FAIL_REASON: Final = "fail_reason"
    #: What the trial's MLflow child run lacks because MLflow failed during the evaluation (the result
    #: is in Optuna all the same); ``observe`` or ``finalize`` logs the run once MLflow is back.
    TRACKING_MISSING: Final = "hpo.tracking_missing"


class Tag:
    """Tags of MLflow runs (parent and child) and of registered model versions."""

    #: On every run of a study: the Optuna study, the run's role (``study`` or ``trial``), its DAG run.
    STUDY: Final = "hpo.study"
    ROLE: Final = "hpo.role"
    DAG_ID: Final = "hpo.dag_id"
    RUN_ID: Final = "hpo.run_id"
    #: On a trial's child run.
    TRIAL_NUMBER: Final = "hpo.trial_number"
    ROUND: Final = "hpo.round"
    ATTEMPT: Final = "hpo.attempt"
    RETRY_OF: Final = "hpo.retry_of"
    ERROR: Final = "hpo.error"
    PRUNED: Final = "hpo.pruned"
    #: On a trial's child run: the Airflow task instance that ran the attempt (``round_<r>.evaluate``,
    #: its map index and try number), and its page in the Airflow UI when the UI's address is known.
    TASK_ID: Final = "hpo.task_id"
    MAP_INDEX: Final = "hpo.map_index"
    TRY_NUMBER: Final = "hpo.try_number"
    TASK_INSTANCE_URL: Final = "airflow.task_instance_url"
    #: On the parent run (and each child run): the Airflow DAG run's page, when the UI's address is known.
    DAG_RUN_URL: Final = "airflow.dag_run_url"
    #: MLflow's own: the run's description, shown as Markdown (the study's description, links to Airflow).
    NOTE: Final = "mlflow.note.content"
    #: On the run the ``refit`` hook fitted the registered model in (role ``refit``): its hook.
    REFIT: Final = "hpo.refit"
    #: On a child run logged after its trial finished: what MLflow missed during the evaluation.
    LOGGED_LATE: Final = "hpo.logged_late"
    #: On the parent run once finalize ran.
    OUTCOME: Final = "hpo.outcome"
    BEST_TRIAL: Final = "hpo.best_trial"
    BEST_PARAMS: Final = "hpo.best_params"
    #: On a registered model version: its lineage (plus ``hpo.<key>`` for each lineage entry).
    METRIC: Final = "hpo.metric"
    VALUE: Final = "hpo.value"
    VALUES: Final = "hpo.values"
    PARAMS: Final = "hpo.params"
    MLFLOW_RUN_ID: Final = "hpo.mlflow_run_id"
    WORKER_IMAGE: Final = "hpo.worker_image"
    WARM_START: Final = "hpo.warm_start"
    DATA_FINGERPRINT: Final = "hpo.data_fingerprint"
    LINEAGE_PREFIX: Final = "hpo."
    #: Finalize's promotion decision on the challenger version (``hpo.decision`` is written last).
    DECISION: Final = "hpo.decision"
    DECISION_PREFIX: Final = "hpo.decision."
    #: A person's promote / rollback, on the version acted upon.
    MANUAL_PREFIX: Final = "hpo.manual."
