"""Take-over of a RUNNING trial does not rest on where its previous attempt ran.

A host name is shared by containers and pods, and PIDs are per namespace: a record whose host name
equals ours but whose process ran under another kernel or PID namespace must not be judged by
looking its PID up here. The trial's claim (a PostgreSQL advisory lock, dropped with its holder's
session on any host) and the heartbeat decide instead.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from pathlib import Path

import optuna

from hpo_core.keys import TrialAttr
from hpo_core.storage import TrialClaim, open_storage
from hpo_core.storage import trials as stored
from hpo_core.worker._takeover import _previous_attempt_alive, process_identity

INTERVAL = 15.0


def _running_trial(
    storage_url: str, worker: dict[str, object], heartbeat_age: float
) -> optuna.trial.FrozenTrial:
    study = optuna.create_study(
        storage=open_storage(storage_url), study_name=f"takeover.{secrets.token_hex(4)}"
    )
    trial = study.ask()
    stored.set_trial_attrs(
        study,
        {
            stored.trial_id(trial): {
                TrialAttr.WORKER: worker,
                TrialAttr.HEARTBEAT: time.time() - heartbeat_age,
            }
        },
    )
    return stored.get_trial(study, stored.trial_id(trial))


def test_an_attempt_elsewhere_under_the_same_host_name_is_judged_by_claim_and_heartbeat(
    optuna_storage_url: str,
) -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    elsewhere = {  # same host name, another kernel and PID namespace: its PID means nothing here
        "host": socket.gethostname(),
        "pid": process.pid,
        "boot_id": "another-kernel",
        "pid_ns": "pid:[1]",
        "started": "1",
        "attempt": 1,
    }
    fresh = _running_trial(optuna_storage_url, elsewhere, heartbeat_age=1.0)
    assert _previous_attempt_alive(optuna_storage_url, fresh, INTERVAL) is True
    stale = _running_trial(optuna_storage_url, elsewhere, heartbeat_age=4 * INTERVAL)
    assert _previous_attempt_alive(optuna_storage_url, stale, INTERVAL) is False
    # Whatever its heartbeat says, an attempt that still holds the claim (its trial process that
    # outlived a killed worker holds the inherited connection) is alive.
    with TrialClaim(optuna_storage_url, stored.trial_id(stale)):
        assert _previous_attempt_alive(optuna_storage_url, stale, INTERVAL) is True


def test_an_attempt_in_this_pid_namespace_is_gone_with_its_process_even_with_a_fresh_heartbeat(
    optuna_storage_url: str,
) -> None:
    process = subprocess.Popen(["sleep", "30"])
    try:
        here = {**process_identity(), "pid": process.pid, "attempt": 1}
        stat = Path(f"/proc/{process.pid}/stat").read_text()
        here["started"] = stat.rsplit(")", 1)[-1].split()[19]
        trial = _running_trial(optuna_storage_url, here, heartbeat_age=1.0)
        assert _previous_attempt_alive(optuna_storage_url, trial, INTERVAL) is True
        # Another process with that PID later (a different start time) is not the recorded one.
        reused = _running_trial(optuna_storage_url, {**here, "started": "1"}, heartbeat_age=1.0)
        assert _previous_attempt_alive(optuna_storage_url, reused, INTERVAL) is False
    finally:
        process.kill()
        process.wait()
    assert _previous_attempt_alive(optuna_storage_url, trial, INTERVAL) is False
