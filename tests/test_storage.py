"""The Optuna storage on PostgreSQL: engine options, the schema-upgrade step, trial claims."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import psycopg2
import pytest
import sqlalchemy

from hpo_core import cli
from hpo_core.errors import StorageConfigError
from hpo_core.storage import TrialClaim, open_storage, upgrade_schema
from hpo_core.storage import trials as stored
from tests.services import PostgresServer, database_name

pytestmark = pytest.mark.slow


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


def test_postgres_engine_options_reach_the_server_and_survive_dropped_connections(
    create_database: Callable[[str], str], postgres_server: PostgresServer
) -> None:
    url = create_database("hpo_engine")
    storage = open_storage(url)
    with storage.engine.connect() as connection:
        settings = {
            name: connection.exec_driver_sql(f"SHOW {name}").scalar()
            for name in ("statement_timeout", "tcp_keepalives_idle", "application_name")
        }
    assert settings == {"statement_timeout": "1min", "tcp_keepalives_idle": "30", "application_name": "hpo"}
    assert storage.engine.pool.size() == 2
    optuna.create_study(storage=storage, study_name="engine.options")

    # The server drops every connection (a restart, a failover): pre-ping reconnects on next use.
    assert postgres_server.terminate_backends(database_name(url)) >= 1
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["engine.options"]


def test_storage_upgrade_creates_migrates_and_is_idempotent(
    create_database: Callable[[str], str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = create_database("hpo_upgrade")
    monkeypatch.setenv("HPO_STORAGE_URL", url)
    assert cli.main(["storage", "upgrade"]) == 0
    created = capsys.readouterr().out
    assert "tables created at schema" in created and database_name(url) in created
    head_version = created.split("schema ")[1].split()[0]

    # Make it look like a storage an older Optuna created: older alembic stamp, no trials(study_id) index.
    with psycopg2.connect(_libpq(url)) as conn, conn.cursor() as cur:
        cur.execute("DROP INDEX ix_trials_study_id")
        cur.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
    with pytest.raises(StorageConfigError, match=r"no longer compatible.*run 'hpo storage upgrade'"):
        open_storage(url)

    assert cli.main(["storage", "upgrade"]) == 0
    assert f"schema upgraded v3.0.0.d -> {head_version}" in capsys.readouterr().out
    engine = sqlalchemy.create_engine(url)
    indexed = sqlalchemy.inspect(engine).get_indexes("trials")
    engine.dispose()
    assert [i["column_names"] for i in indexed] == [["study_id"]]
    storage = open_storage(url)  # the compatibility check passes again
    assert storage.get_current_version() == storage.get_head_version() == head_version

    assert upgrade_schema(url) == (head_version, head_version)  # a second run changes nothing
    monkeypatch.setenv("HPO_STORAGE_URL", "postgresql+psycopg2://hpo:secret@127.0.0.1:1/nowhere")
    assert cli.main(["storage", "upgrade"]) == 2
    error = capsys.readouterr().err
    assert "cannot open Optuna storage postgresql+psycopg2://hpo:***@127.0.0.1:1/nowhere" in error
    assert "secret" not in error


HOLD_CLAIMS = """
import sys, time
from hpo_core.storage import TrialClaim
claims = [TrialClaim(url, 7) for url in sys.argv[1:]]
assert all(claim.try_acquire() for claim in claims)
print("held", flush=True)
time.sleep(600)
"""


def test_trial_claim_is_exclusive_and_dies_with_its_holder(
    create_database: Callable[[str], str], tmp_path: Path
) -> None:
    urls = [create_database("hpo_claims"), f"sqlite:///{tmp_path / 'optuna.db'}"]
    for url in urls:  # within one process
        first, second = TrialClaim(url, 3), TrialClaim(url, 3)
        assert first.try_acquire() and not second.try_acquire()
        assert TrialClaim(url, 4).try_acquire()  # another trial is free
        first.release()
        assert second.try_acquire()
        second.release()

    # Across processes: a worker that holds trial 7 is killed; the claim goes with it at once.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_CLAIMS, *urls], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held", holder.stderr
        assert [TrialClaim(url, 7).try_acquire() for url in urls] == [False, False]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    claims = [TrialClaim(url, 7) for url in urls]
    deadline = time.monotonic() + 10
    while not all(claim.try_acquire() for claim in claims) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(claim.held for claim in claims)
    for claim in claims:
        claim.release()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_lean_trial_read_matches_optunas_full_read(
    backend: str, create_database: Callable[[str], str], tmp_path: Path
) -> None:
    """``read_trials`` gives Optuna's own trials (values, params, attributes), or the asked subset."""
    url = create_database("hpo_lean") if backend == "postgresql" else f"sqlite:///{tmp_path / 'lean.db'}"
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name="lean", directions=["minimize", "maximize"])
    for i in range(6):
        trial = study.ask()
        trial.suggest_float("x", 0.1, 10.0, log=True)
        trial.suggest_categorical("kind", ["a", None, 3])
        trial.set_user_attr("hpo.round", i // 2)
        trial.set_user_attr("hpo.worker", {"host": "h", "pid": i})
        storage.set_trial_system_attr(trial._trial_id, "sampler:state", [i, "s"])
        if i == 1:  # intermediate values (Trial.report is for one objective: the storage directly)
            storage.set_trial_intermediate_value(trial._trial_id, 0, float("inf"))
            storage.set_trial_intermediate_value(trial._trial_id, 1, 0.5)
        if i < 4:
            study.tell(trial, [float(i), float("-inf") if i == 2 else i / 2])
        elif i == 4:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    full = stored.read_trials(study, system_attrs=True, intermediate_values=True)
    reference = study.get_trials(deepcopy=False)

    def facts(t: optuna.trial.FrozenTrial) -> tuple[object, ...]:
        return (
            t.number, t._trial_id, t.state, t.values, t.params, t.distributions, t.user_attrs,
            t.system_attrs, t.intermediate_values, t.datetime_start, t.datetime_complete,
        )  # fmt: skip

    assert [facts(t) for t in full] == [facts(t) for t in reference]
    lean = stored.read_trials(study, user_attrs=["hpo.round"], states=[optuna.trial.TrialState.COMPLETE])
    assert [t.number for t in lean] == [0, 1, 2, 3]
    assert [t.user_attrs for t in lean] == [{"hpo.round": r} for r in (0, 0, 1, 1)]
    assert all(t.system_attrs == {} and t.intermediate_values == {} for t in lean)
    assert [t.values for t in lean] == [t.values for t in reference[:4]]
