"""Pytest plugin: session-scoped fixtures that start real services (see ``tests/services.py``).

A service that cannot start fails the test with the tail of its log (never a skip). Startup times are
printed in the terminal summary.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import mlflow
import pytest
from sqlalchemy.engine import make_url
from xdist.scheduler import LoadScopeScheduling

from tests.services import (
    REPO_ROOT,
    AirflowDeployment,
    MLflowServer,
    MotoS3Server,
    PostgresServer,
    RedisServer,
    ServiceStartError,
)
from tests.ui_auth import AUTH_ENV

STARTUP_SECONDS: dict[str, float] = {}

#: One unique string that is every credential of the session's production stack: the PostgreSQL
#: password of the Optuna storage, the S3 keys, the MLflow password. tests/test_secret_canary.py and
#: tests/test_production_celery.py look for it wherever a secret must never be (logs, XCom, pods...).
SECRET_CANARY = f"hpo-canary-{secrets.token_hex(8)}"
#: The Celery queue of the session's Airflow (its Celery workers consume only this one).
CELERY_QUEUE = f"hpo_test_{secrets.token_hex(4)}"
#: Environment variable that hands the queue to DAG files parsed by that Airflow.
CELERY_QUEUE_ENV = "HPO_TEST_CELERY_QUEUE"

_S = TypeVar("_S", PostgresServer, MotoS3Server, MLflowServer, AirflowDeployment, RedisServer)


@contextlib.contextmanager
def _running(service: _S, what: str) -> Iterator[_S]:
    """Start ``service``, turning a failed start into ``pytest.fail``; always stop it afterwards."""
    try:
        try:
            service.start()
        except (ServiceStartError, OSError, TimeoutError) as e:
            pytest.fail(f"{what} could not be started: {e}", pytrace=False)
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def services_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp dir holding the services' logs and state for this session."""
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def postgres_server() -> Generator[PostgresServer, None, None]:
    """PostgreSQL on loopback (the machine's at 127.0.0.1:5432 if it answers, else a private one).

    With the suite on several processes, the second and later ones start a private server: the
    machine's has 100 connections, which one process's Airflow and MLflow server use much of.
    """
    first = os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0"
    with _running(PostgresServer(prefer_existing=None if first else False), "PostgreSQL") as server:
        kind = "private" if server.private else "shared"
        STARTUP_SECONDS[f"postgres ({kind})"] = server.startup_seconds
        yield server


@pytest.fixture(scope="session")
def create_database(postgres_server: PostgresServer) -> Callable[[str], str]:
    """``create_database(prefix) -> SQLAlchemy URL`` of a fresh database, dropped at session end."""
    return postgres_server.create_database


@pytest.fixture(scope="session")
def s3_server(services_workdir: Path) -> Generator[MotoS3Server, None, None]:
    """moto S3 server with the bucket ``s3_server.bucket``; ``s3_server.env()`` for clients."""
    moto = MotoS3Server(
        workdir=services_workdir / "moto",
        access_key_id=f"{SECRET_CANARY}-key-id",
        secret_access_key=f"{SECRET_CANARY}-secret",
    )
    with _running(moto, "moto S3 server") as server:
        STARTUP_SECONDS["moto s3"] = server.startup_seconds
        yield server


@pytest.fixture(scope="session")
def mlflow_server(
    postgres_server: PostgresServer, s3_server: MotoS3Server, services_workdir: Path
) -> Generator[MLflowServer, None, None]:
    """MLflow tracking server: PostgreSQL backend, ``s3://<bucket>/mlflow`` artifacts (not proxied)."""
    backend = postgres_server.create_database("hpo_mlflow")
    server = MLflowServer(backend_store_uri=backend, s3=s3_server, workdir=services_workdir / "mlflow")
    with _running(server, "MLflow server") as running:
        STARTUP_SECONDS["mlflow"] = running.startup_seconds
        yield running


@pytest.fixture
def mlflow_env(mlflow_server: MLflowServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Point this process's MLflow and boto3 clients at the test servers for one test."""
    env = mlflow_server.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    mlflow.set_registry_uri(mlflow_server.tracking_uri)
    yield env
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(scope="session")
def optuna_storage_url(create_database: Callable[[str], str]) -> str:
    """SQLAlchemy URL of a fresh PostgreSQL database for the Optuna RDB storage."""
    return create_database("hpo_optuna")


@pytest.fixture(scope="session")
def hpo_env(optuna_storage_url: str, mlflow_server: MLflowServer) -> dict[str, str]:
    """The environment the HPO pipeline reads: Optuna storage, MLflow tracking, S3 endpoint and keys.

    Every credential holds :data:`SECRET_CANARY` (PostgreSQL trusts loopback and the test MLflow
    server has no auth, so they are sent and ignored, as real ones would be sent and checked).
    """
    storage = make_url(optuna_storage_url).set(password=SECRET_CANARY)
    return {
        "HPO_STORAGE_URL": storage.render_as_string(hide_password=False),
        "HPO_WORKER_BACKEND": "local",
        **mlflow_server.env(),
        "MLFLOW_TRACKING_USERNAME": "hpo",
        "MLFLOW_TRACKING_PASSWORD": SECRET_CANARY,
    }


@pytest.fixture(scope="session")
def redis_server(services_workdir: Path) -> Generator[RedisServer, None, None]:
    """Redis, the Celery broker: the machine's at 127.0.0.1:6379, else a private one."""
    with _running(RedisServer(workdir=services_workdir / "redis"), "Redis") as server:
        STARTUP_SECONDS[f"redis ({'private' if server.private else 'shared'})"] = server.startup_seconds
        yield server


class AirflowFactory(Protocol):
    def __call__(
        self,
        *,
        dags_folder: Path,
        plugins_folder: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> AirflowDeployment: ...


@pytest.fixture(scope="session")
def airflow_factory(
    create_database: Callable[[str], str], services_workdir: Path
) -> Generator[AirflowFactory, None, None]:
    """``airflow_factory(*, dags_folder, plugins_folder=None, env=None) -> AirflowDeployment``.

    Only one Airflow runs at a time (2 cores): asking for the configuration that is already running
    returns it; asking for another stops it and starts a fresh one on a fresh metadata database.
    """
    current: dict[str, Any] = {}

    def start(
        *, dags_folder: Path, plugins_folder: Path | None = None, env: Mapping[str, str] | None = None
    ) -> AirflowDeployment:
        key = (str(dags_folder), str(plugins_folder), tuple(sorted((env or {}).items())))
        if current.get("key") == key:
            return current["deployment"]  # type: ignore[no-any-return]
        if "deployment" in current:
            current.pop("deployment").stop()
            current.pop("key")
        count = current.get("count", 0) + 1
        current["count"] = count
        deployment = AirflowDeployment(
            database_url=create_database("hpo_airflow"),
            dags_folder=dags_folder,
            plugins_folder=plugins_folder,
            env=env,
            home=services_workdir / f"airflow-{count}",
        )
        try:
            deployment.start()
        except (ServiceStartError, OSError, TimeoutError) as e:
            deployment.stop()
            pytest.fail(f"Airflow could not be started: {e}\n{deployment.logs_tail()}", pytrace=False)
        for name, seconds in deployment.startup_seconds.items():
            STARTUP_SECONDS[f"airflow #{count} {name}"] = seconds
        current.update(key=key, deployment=deployment)
        return deployment

    try:
        yield start
    finally:
        if "deployment" in current:
            current["deployment"].stop()


@pytest.fixture(scope="session")
def airflow_dags_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dags folder of the shared ``airflow``: tests write DAG files here and wait for them."""
    return tmp_path_factory.mktemp("airflow_dags")


@pytest.fixture(scope="session")
def airflow(
    airflow_factory: AirflowFactory,
    airflow_dags_folder: Path,
    hpo_env: dict[str, str],
    redis_server: RedisServer,
) -> AirflowDeployment:
    """The session's shared Airflow: dags in ``airflow_dags_folder``, the repo's ``plugins/`` folder,
    ``hpo_env`` plus ``PYTHONPATH`` (repo root and ``plugins/``) in every component and task, and an
    auth manager that denies the user ``outsider`` the ``hpo_ui_*`` DAGs (``tests/ui_auth.py``).

    Two executors: the warm LocalExecutor (the default) and the CeleryExecutor (Redis broker, queue
    :data:`CELERY_QUEUE`) for tasks that ask for it; its workers are started by the tests that use
    them (``AirflowDeployment.start_celery_worker``).
    """
    pythonpath = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "plugins")])
    celery = {
        "AIRFLOW__CORE__EXECUTOR": "hpo_airflow.executor.WarmLocalExecutor,CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": redis_server.url(),
        # Task states in Redis too: the PostgreSQL server's connections are shared and scarce here.
        "AIRFLOW__CELERY__RESULT_BACKEND": redis_server.url(1),
        CELERY_QUEUE_ENV: CELERY_QUEUE,
    }
    return airflow_factory(
        dags_folder=airflow_dags_folder,
        plugins_folder=REPO_ROOT / "plugins",
        env={**hpo_env, **celery, "PYTHONPATH": pythonpath, **AUTH_ENV},
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Attach the Airflow component logs to the report of a failed test that used ``airflow``."""
    report = yield
    deployment = getattr(item, "funcargs", {}).get("airflow")
    if report.failed and call.when == "call" and isinstance(deployment, AirflowDeployment):
        report.sections.append(("airflow component logs", deployment.logs_tail(lines=30)))
    return report


#: The test modules on the shared Airflow (a test needs the ``airflow`` fixture, maybe through
#: another fixture). With several test processes they are one unit of work (:class:`_Units`); the
#: collection hook below checks this list against what the tests ask for.
AIRFLOW_MODULES = frozenset(
    {
        "tests/test_chaos_airflow.py",
        "tests/test_hpo_view.py",
        "tests/test_production.py",
        "tests/test_production_celery.py",
        "tests/test_services.py",
    }
)


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Order the modules on the shared Airflow last in one process, first on several.

    Once started, Airflow's scheduler, DAG processor and API server keep working in the
    background. In one process they run last, so they share the cores only with the tests that
    need them. On several (``scripts/run_tests.sh``: ``-n 2``), they are one unit sent first
    (:class:`_Units`): one process runs them while the other runs the rest.
    """
    on_airflow = {
        item.nodeid.split("::", 1)[0] for item in items if "airflow" in getattr(item, "fixturenames", ())
    }
    if on_airflow - AIRFLOW_MODULES:
        raise pytest.UsageError(
            f"tests/fixtures_services.py: AIRFLOW_MODULES lacks {sorted(on_airflow - AIRFLOW_MODULES)}, "
            "whose tests use the shared Airflow: add them (the test processes share one Airflow per unit)"
        )
    parallel = "PYTEST_XDIST_WORKER" in os.environ or bool(getattr(config.option, "numprocesses", None))
    items.sort(key=lambda item: (item.nodeid.split("::", 1)[0] in AIRFLOW_MODULES) != parallel)


class _Units(LoadScopeScheduling):
    """pytest-xdist scheduling by unit of work: a test module, or all of :data:`AIRFLOW_MODULES`.

    (``--dist loadgroup`` would do it with markers, but pytest-xdist 3.8 cannot rename the test ids
    of pytest 9, so its groups are silently ignored.)
    """

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return "airflow" if module in AIRFLOW_MODULES else module


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadScopeScheduling:
    """Send the test processes units of work (:class:`_Units`), in collection order."""
    return _Units(config, log)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Turn SIGTERM (e.g. a CI time limit) into a normal exit so started services get killed."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print how long each service took to start."""
    if STARTUP_SECONDS:
        terminalreporter.section("service startup (seconds)")
        for name, seconds in STARTUP_SECONDS.items():
            terminalreporter.write_line(f"{name:32s} {seconds:6.1f}")
