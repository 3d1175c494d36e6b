"""DAG files: every study parses, a broken study only breaks itself, parsing opens no connection."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.definitions.deadline import DeadlineReference
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import ParamValidationError
from hpo_airflow import build_study_dag, load_study_dags, study_params
from hpo_airflow.alerts import (
    AlertDeliveryError,
    connection_url,
    deadline_message,
    log_deadline_missed,
    notify_webhook,
)
from hpo_airflow.loader import shard_of

from hpo_core.errors import StudySpecError
from hpo_core.spec import validate_mapping
from tests.fixtures_core import make_spec, study_mapping, write_study

ROOT = Path(__file__).resolve().parent.parent


def _dagbag(folder: Path) -> Any:
    return DagBag(dag_folder=str(folder))


def _dag_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "dags"
    folder.mkdir()
    shutil.copy(ROOT / "dags" / "hpo_studies.py", folder / "hpo_studies.py")
    return folder


def test_every_shipped_study_imports_without_errors() -> None:
    bag = _dagbag(ROOT / "dags")
    assert bag.import_errors == {}
    studies = sorted(p.stem for p in (ROOT / "dags" / "studies").glob("*.y*ml"))
    assert studies, "no study files shipped"
    for stem in studies:
        assert f"hpo_{stem}" in bag.dags


def test_broken_study_is_an_import_error_for_itself_only(tmp_path: Path) -> None:
    folder = _dag_folder(tmp_path)
    write_study(folder / "studies", study_mapping(name="good_one"))
    write_study(folder / "studies", study_mapping(name="good_two"))
    bad = study_mapping(name="broken")
    bad["budget"]["n_trails"] = 3
    write_study(folder / "studies", bad, filename="broken.yaml")
    bag = _dagbag(folder)
    assert {"hpo_good_one", "hpo_good_two"} <= set(bag.dags)
    assert "hpo_broken" not in bag.dags
    ((where, message),) = bag.import_errors.items()
    assert where.endswith("hpo_studies.py")
    assert message.startswith("StudySpecError: ")
    assert f"{folder / 'studies' / 'broken.yaml'}: budget.n_trails: unknown key 'n_trails'" in message


def test_two_broken_studies_are_both_reported(tmp_path: Path) -> None:
    folder = _dag_folder(tmp_path)
    write_study(folder / "studies", study_mapping(name="good"))
    write_study(folder / "studies", "name: [", filename="a.yaml")
    write_study(folder / "studies", study_mapping(name="b", direction="up"), filename="b.yaml")
    bag = _dagbag(folder)
    assert "hpo_good" in bag.dags
    (message,) = bag.import_errors.values()
    assert "a.yaml: not valid YAML" in message and "b.yaml: direction: 'up' is not allowed" in message


def test_duplicate_study_names_are_refused(tmp_path: Path) -> None:
    folder = _dag_folder(tmp_path)
    write_study(folder / "studies", study_mapping(name="same"), filename="one.yaml")
    write_study(folder / "studies", study_mapping(name="same"), filename="two.yaml")
    bag = _dagbag(folder)
    assert "hpo_same" in bag.dags
    (message,) = bag.import_errors.values()
    assert "two.yaml: name: 'same' is already used by" in message


SHARD_FILE = """from hpo_airflow import load_study_dags

load_study_dags(globals(), shard=({index}, {count}))
"""


def test_sharded_dag_files_split_the_studies_and_keep_errors_and_names_per_file(tmp_path: Path) -> None:
    """Three thin DAG files build every study exactly once; a broken file and a reused name are
    errors of the one DAG file that builds them, and the others load normally."""
    folder = tmp_path / "dags"
    studies = folder / "studies"
    names = [f"s{i:02d}" for i in range(12)]
    for name in names:
        write_study(studies, study_mapping(name=name))
    bad = study_mapping(name="broken")
    bad["budget"]["n_trails"] = 3
    write_study(studies, bad, filename="broken.yaml")
    write_study(studies, study_mapping(name="s03"), filename="zz_again.yaml")  # s03 is taken
    for index in range(3):
        (folder / f"hpo_studies_{index}.py").write_text(SHARD_FILE.format(index=index, count=3))
    by_file: dict[str, set[str]] = {}
    errors: dict[str, str] = {}
    for index in range(3):
        path = folder / f"hpo_studies_{index}.py"
        bag = DagBag(dag_folder=str(path))
        by_file[path.name] = set(bag.dags)
        errors.update(bag.import_errors)
        expected = {f"hpo_{p.stem}" for p in studies.glob("s*.yaml") if shard_of(p, 3) == index}
        assert expected <= set(bag.dags), path.name
    built = [dag_id for ids in by_file.values() for dag_id in ids if dag_id != "hpo_broken"]
    assert sorted(built) == sorted(f"hpo_{n}" for n in names)  # each study once, in one file
    assert 1 <= len(errors) <= 2  # one import error per DAG file; both bad files may share one
    text = "\n".join(errors.values())
    assert f"{studies / 'broken.yaml'}: budget.n_trails: unknown key 'n_trails'" in text
    assert f"{studies / 'zz_again.yaml'}: name: 's03' is already used by {studies / 's03.yaml'}" in text
    with pytest.raises(ValueError, match="shard"):
        load_study_dags({}, studies_dir=studies, shard=(3, 3))


def test_no_dag_is_defined_by_two_shipped_dag_files() -> None:
    """Each shipped DAG file defines its own DAGs (the promotion DAG has its own file)."""
    seen: dict[str, str] = {}
    for path in sorted((ROOT / "dags").glob("*.py")):
        bag = DagBag(dag_folder=str(path))
        assert bag.import_errors == {}
        for dag_id in bag.dags:
            assert dag_id not in seen, f"{dag_id} is defined by {seen.get(dag_id)} and {path.name}"
            seen[dag_id] = path.name
    assert seen["hpo_promote_model"] == "hpo_promotion.py"
    assert seen["hpo_breast_cancer_gbm"] == "hpo_studies.py"


def test_strict_mode_raises(tmp_path: Path) -> None:
    write_study(tmp_path, "name: [", filename="bad.yaml")
    with pytest.raises(StudySpecError, match=r"bad\.yaml: not valid YAML"):
        load_study_dags({}, studies_dir=tmp_path, strict=True)


def test_parsing_opens_no_database_or_network_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _dag_folder(tmp_path)
    write_study(folder / "studies", study_mapping(name="offline"))
    shutil.copy(ROOT / "dags" / "studies" / "breast_cancer_gbm.yaml", folder / "studies")

    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args)[:100])
        raise AssertionError("connection attempted while parsing")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(sqlite3, "connect", refuse)
    monkeypatch.setattr(psycopg2, "connect", refuse)
    bag = DagBag(dag_folder=str(folder))
    assert attempts == []
    assert bag.import_errors == {}
    assert {"hpo_offline", "hpo_breast_cancer_gbm"} <= set(bag.dags)


def test_dag_shape_and_settings_come_from_the_spec(tmp_path: Path) -> None:
    data = study_mapping(schedule="@daily")
    data["budget"]["timeout"] = 900
    data["trial"] = {"retries": 3, "retry_delay": 7, "execution_timeout": 45}
    spec = validate_mapping(data, source="<test>")
    dag = build_study_dag(spec)
    assert dag.dag_id == "hpo_quadratic"
    rounds = spec.budget.max_rounds
    assert [t.task_id for t in dag.tasks] == [
        "start",
        *[f"round_{k}.{step}" for k in range(1, rounds + 1) for step in ("suggest", "evaluate", "observe")],
        "finalize",
    ]
    evaluate = dag.get_task("round_1.evaluate")
    assert evaluate.retries == 3
    assert evaluate.retry_delay.total_seconds() == 7
    # The worker times each trial out itself; Airflow's backstop covers the most trials a slot may
    # hold (a trigger may raise trials_per_task up to the largest batch), plus a grace.
    assert evaluate.execution_timeout.total_seconds() == spec.trials_per_task_limit * 45 + 60
    # Named from the task's own argument: rendered before the trial runs, so it stays when it is killed.
    assert evaluate.map_index_template.startswith("{{ task.op_kwargs['slot']['label'] }}")
    assert dag.get_task("round_1.observe").retries == 1  # control tasks are idempotent: one retry
    assert dag.deadline is None  # no alerts section, no deadline alert
    assert dag.get_task("round_1.observe").trigger_rule == "all_done"
    assert dag.get_task("finalize").trigger_rule == "all_done"
    assert dag.dagrun_timeout.total_seconds() == 900
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert dag.timetable.expression == "0 0 * * *"
    assert dag.get_task("round_2.suggest").upstream_task_ids == {"round_1.observe", "start"}


def test_alerts_section_attaches_a_deadline_alert_with_identifiers_only() -> None:
    alerts = {"deadline_seconds": 600, "callback": "webhook", "webhook_conn_id": "hpo_alerts"}
    (alert,) = build_study_dag(make_spec(alerts=alerts)).deadline
    assert alert.reference == DeadlineReference.DAGRUN_QUEUED_AT
    assert alert.interval.total_seconds() == 600
    assert alert.callback.path == "hpo_airflow.alerts.notify_webhook"
    assert alert.callback.kwargs == {"study": "quadratic", "deadline_seconds": 600, "conn_id": "hpo_alerts"}
    (logged,) = build_study_dag(make_spec(alerts={"deadline_seconds": 5})).deadline
    assert logged.callback.path == "hpo_airflow.alerts.log_deadline_missed"

    assert connection_url("https://hooks.example/T/B/x", port=None, schema=None, extra={}) == (
        "https://hooks.example/T/B/x"
    )
    assert connection_url("alerts.local", port=8080, schema="http", extra={"endpoint": "/hpo"}) == (
        "http://alerts.local:8080/hpo"
    )
    context = {"dag_run": {"dag_id": "hpo_quadratic", "dag_run_id": "manual__1", "state": "running"}}
    message = deadline_message(study="quadratic", deadline_seconds=600, context=context)
    assert (message["dag_id"], message["run_id"], message["event"]) == (
        "hpo_quadratic",
        "manual__1",
        "hpo.deadline_missed",
    )
    assert message["text"] == (
        "HPO study quadratic: DAG run hpo_quadratic / manual__1 is still running 600s after it was queued"
    )


def test_deadline_callbacks_log_or_post_without_showing_the_url(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    context = {"dag_run": {"dag_id": "hpo_quadratic", "dag_run_id": "manual__1", "state": "running"}}
    caplog.set_level("WARNING", logger="hpo_airflow.alerts")
    text = asyncio.run(log_deadline_missed(study="quadratic", deadline_seconds=5, context=context))
    assert text in caplog.text and "manual__1" in text

    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204 if self.path == "/hook/s3cret" else 500)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.setenv("HPO_TEST_HOOK", f"{base}/hook/s3cret")
        answer = asyncio.run(
            notify_webhook(study="quadratic", deadline_seconds=5, url_env="HPO_TEST_HOOK", context=context)
        )
        assert answer == "webhook (environment variable HPO_TEST_HOOK) answered HTTP 204"
        assert received[0]["run_id"] == "manual__1" and received[0]["event"] == "hpo.deadline_missed"
        monkeypatch.setenv("HPO_TEST_HOOK", f"{base}/wrong/s3cret")
        with pytest.raises(AlertDeliveryError, match=r"answered HTTP 500$") as refused:
            asyncio.run(notify_webhook(study="quadratic", deadline_seconds=5, url_env="HPO_TEST_HOOK"))
        assert "s3cret" not in str(refused.value)
    finally:
        server.shutdown()
    closed_port = socket.socket()
    closed_port.bind(("127.0.0.1", 0))
    monkeypatch.setenv("HPO_TEST_HOOK", f"http://127.0.0.1:{closed_port.getsockname()[1]}/hook/s3cret")
    with pytest.raises(AlertDeliveryError, match="unreachable: ConnectError") as unreachable:
        asyncio.run(notify_webhook(study="quadratic", deadline_seconds=5, url_env="HPO_TEST_HOOK"))
    closed_port.close()
    assert "s3cret" not in str(unreachable.value) and unreachable.value.__suppress_context__
    monkeypatch.delenv("HPO_TEST_HOOK")
    with pytest.raises(AlertDeliveryError, match="environment variable HPO_TEST_HOOK is not set"):
        asyncio.run(notify_webhook(study="quadratic", deadline_seconds=5, url_env="HPO_TEST_HOOK"))


def test_trigger_params_are_bounded_by_the_spec() -> None:
    spec = make_spec()  # max_rounds 3, max_batch_size 4
    params = ParamsDict(study_params(spec))
    assert params.validate()["n_trials"] == 6
    ok = ParamsDict(study_params(spec))
    ok.update({"n_trials": 12, "batch_size": 4, "seed": None, "sampler_options": {"multivariate": True}})
    ok.validate()
    for bad in ({"n_trials": 13}, {"batch_size": 5}, {"seed": -1}, {"sampler_options": {"nope": 1}}):
        p = ParamsDict(study_params(spec))
        with pytest.raises(ParamValidationError, match=f"Invalid input for param {next(iter(bad))}"):
            p.update(bad)  # a trigger with this conf is refused before any task runs
            p.validate()
