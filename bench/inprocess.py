"""In-process trial evaluation for the scale benchmark's 1,000-wide ``dag.test()`` round.

``dag.test()`` runs the mapped tasks one after another; with the real subprocess worker 1,000 trials
would spend most of the time starting Python processes, a cost the orchestration benchmark already
measures per trial. The benchmark's DAG file therefore swaps ``evaluate_local`` for this function,
which runs the same :func:`hpo_core.worker.run_trial` in the task's own process and records how long
it took, so that the Airflow share of each mapped task can be separated from the worker's.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_FLAG = "HPO_BENCH_INPROCESS_WORKER"


def evaluate_in_process(trial: Mapping[str, Any], study: Mapping[str, Any], timeout: int) -> dict[str, Any]:
    """Drop-in for ``hpo_airflow._tasks.evaluate_local`` without the worker subprocess."""
    from airflow.sdk import get_current_context
    from hpo_airflow._settings import resolve_deployment

    from hpo_core.worker import run_trial

    context = get_current_context()
    context["hpo_trial_label"] = trial["label"]  # type: ignore[typeddict-unknown-key]
    start = time.time()
    outcome = run_trial(
        deployment=resolve_deployment(),
        study_name=study["study_name"],
        trial_number=trial["trial_number"],
        attempt=context["ti"].try_number,
        timeout=None,  # SIGALRM belongs to the task runner here
    )
    end = time.time()
    folder = os.environ.get("HPO_BENCH_TIMING_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        record = {"trial": outcome.trial_number, "worker_start": start, "worker_end": end}
        (Path(folder) / f"{uuid.uuid4().hex}.json").write_text(json.dumps(record))
    return {"trial_number": outcome.trial_number, "state": outcome.state, "values": outcome.values}
