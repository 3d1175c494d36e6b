"""Real services on loopback for tests: PostgreSQL, an S3 endpoint (moto), MLflow and Airflow.

Plain Python, no pytest: every service is a class with ``start()`` / ``stop()`` that is also a context
manager. A service that cannot start raises :class:`ServiceStartError` whose message carries the tail
of the service's log. Subprocesses run in their own process group and are killed as a whole.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import quote, urlsplit

import boto3
import psutil
import psycopg2
import redis
import requests
from cryptography.fernet import Fernet

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_BIN_DIR = Path(os.environ.get("HPO_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
LOOPBACK = "127.0.0.1"

__all__ = [
    "AirflowApiError",
    "AirflowClient",
    "AirflowDeployment",
    "MLflowServer",
    "ManagedProcess",
    "MotoS3Server",
    "ParsedDag",
    "PostgresServer",
    "RedisServer",
    "ServiceStartError",
    "free_port",
    "patched_environ",
]


class ServiceStartError(RuntimeError):
    """A service did not come up; the message includes the tail of its log."""


class AirflowApiError(RuntimeError):
    """The Airflow REST API answered with an error status; ``response`` holds the raw answer."""

    def __init__(self, message: str, response: requests.Response) -> None:
        super().__init__(message)
        self.response = response

    @property
    def status_code(self) -> int:
        return self.response.status_code


# --------------------------------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    """Return a TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """Find an entry point next to the running interpreter (the project venv), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ServiceStartError(f"executable {name!r} not found next to {sys.executable} nor on PATH")
    return found


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _clean_environ(drop_prefixes: Sequence[str] = ("AIRFLOW__", "AIRFLOW_HOME", "MLFLOW_")) -> dict[str, str]:
    """Copy of ``os.environ`` without settings that would leak the caller's config into a service."""
    return {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop_prefixes))}


@contextlib.contextmanager
def patched_environ(env: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, restoring the old values after."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.25,
    alive: Callable[[], bool] | None = None,
    log: Callable[[], str] | None = None,
) -> float:
    """Poll ``check`` until it returns true; return the seconds waited.

    Raises:
        ServiceStartError: on timeout, or at once when ``alive`` says the process died.
    """
    start = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - start
        if alive is not None and not alive():
            tail = log() if log else ""
            raise ServiceStartError(f"{what}: process exited before it was ready\n--- log tail ---\n{tail}")
        if time.monotonic() - start > timeout:
            tail = log() if log else ""
            raise ServiceStartError(f"{what}: not ready after {timeout:.0f}s\n--- log tail ---\n{tail}")
        time.sleep(interval)


class ManagedProcess:
    """A subprocess in its own process group with its output appended to a log file.

    Processes still running when the interpreter exits are killed (``atexit``), so an aborted test
    session leaves nothing behind.
    """

    _running: ClassVar[set[ManagedProcess]] = set()

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        ManagedProcess._running.add(self)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _family(self) -> list[psutil.Process]:
        """The process and all its descendants (some may have left the process group)."""
        if self.popen is None:
            return []
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self, sig: signal.Signals = signal.SIGKILL, *, group: bool = True) -> None:
        """Send ``sig`` to the process, or to its whole group and descendants when ``group``."""
        if self.popen is None:
            return
        targets = self._family() if group else []
        if group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            for proc in targets:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
        if sig == signal.SIGKILL:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after ``timeout`` seconds."""
        if self.popen is None:
            return
        family = self._family()
        if self.alive():
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.kill(signal.SIGKILL)
        _gone, left = psutil.wait_procs(family, timeout=5)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        ManagedProcess._running.discard(self)

    @classmethod
    def kill_all(cls) -> None:
        """Kill every process started here that is still running."""
        for process in list(cls._running):
            process.kill(signal.SIGKILL)
            cls._running.discard(process)

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)


class _Service:
    """Context-manager protocol shared by the services."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# PostgreSQL

_DB_PREFIX = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


def database_name(url: str) -> str:
    """The database name of a SQLAlchemy / libpq URL."""
    return urlsplit(url).path.lstrip("/")


class PostgresServer(_Service):
    """PostgreSQL on loopback: the machine's server when it answers, else a private one in a temp dir.

    Every database made by :meth:`create_database` is dropped by :meth:`stop`. Set
    ``HPO_TEST_PG_PRIVATE=1`` to always start a private server, ``HPO_TEST_PG_PORT`` to probe another port.
    """

    def __init__(
        self,
        *,
        host: str = LOOPBACK,
        port: int | None = None,
        user: str = "postgres",
        prefer_existing: bool | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or int(os.environ.get("HPO_TEST_PG_PORT", "5432"))
        self.user = user
        if prefer_existing is None:
            prefer_existing = os.environ.get("HPO_TEST_PG_PRIVATE", "") not in {"1", "true", "yes"}
        self.prefer_existing = prefer_existing
        self.private = False
        self._workdir = workdir
        self._owns_workdir = False
        self.data_dir: Path | None = None
        self.log_path: Path | None = None
        self._os_user: str | None = None
        self._databases: list[str] = []
        self.startup_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> Self:
        started = time.monotonic()
        if self.prefer_existing and self._answers():
            self.private = False
        else:
            self._start_private()
        self.startup_seconds = time.monotonic() - started
        return self

    def _answers(self) -> bool:
        try:
            conn = psycopg2.connect(self.dsn("postgres"), connect_timeout=3)
        except psycopg2.Error:
            return False
        conn.close()
        return True

    def _run_as_owner(self, argv: Sequence[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary as the data directory's owner (PostgreSQL refuses to run as root)."""
        if os.geteuid() == 0:
            argv = ["runuser", "-u", str(self._os_user), "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def _start_private(self) -> None:
        if not (PG_BIN_DIR / "initdb").exists():
            raise ServiceStartError(
                f"no PostgreSQL server answers at {self.host}:{self.port} "
                f"and {PG_BIN_DIR}/initdb does not exist"
            )
        self.private = True
        self.port = free_port()
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="hpo-pg-"))
            self._owns_workdir = True
        self.data_dir = self._workdir / "data"
        self.log_path = self._workdir / "postgres.log"
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as e:
                raise ServiceStartError(
                    "running as root and there is no 'postgres' OS user to own "
                    "a private PostgreSQL data directory"
                ) from e
            self._os_user = owner.pw_name
            os.chown(self._workdir, owner.pw_uid, owner.pw_gid)
            self._workdir.chmod(0o700)
        result = self._run_as_owner(
            [
                str(PG_BIN_DIR / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]
        )
        if result.returncode != 0:
            raise ServiceStartError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        self._pg_ctl("start")
        atexit.register(self.stop)

    def _pg_ctl(self, action: str, *, mode: str = "fast") -> None:
        assert self.data_dir is not None and self.log_path is not None
        options = f"-p {self.port} -k {self._workdir} -h {self.host} -c fsync=off -c max_connections=200"
        argv = [str(PG_BIN_DIR / "pg_ctl"), action, "-D", str(self.data_dir), "-w", "-t", "60"]
        if action in {"start", "restart"}:
            argv += ["-l", str(self.log_path), "-o", options]
        if action in {"stop", "restart"}:
            argv += ["-m", mode]
        result = self._run_as_owner(argv)
        if result.returncode != 0:
            raise ServiceStartError(
                f"pg_ctl {action} failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                f"--- log tail ---\n{self.log_tail()}"
            )

    def restart(self, *, mode: str = "fast") -> None:
        """Restart the private server (``mode``: smart, fast or immediate); refused for the shared one."""
        if not self.private:
            raise RuntimeError("restart() is only allowed on a private server; set HPO_TEST_PG_PRIVATE=1")
        self._pg_ctl("restart", mode=mode)

    def stop(self) -> None:
        for name in reversed(self._databases):
            with contextlib.suppress(psycopg2.Error):
                self.drop_database(name)
        self._databases.clear()
        if self.private and self.data_dir is not None and (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(ServiceStartError, subprocess.TimeoutExpired):
                self._pg_ctl("stop", mode="immediate")
        if self._owns_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._owns_workdir = False

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines) if self.log_path else "(shared server: no log here)"

    # -- databases ---------------------------------------------------------------------------------

    def dsn(self, dbname: str) -> str:
        """A libpq URL (for psycopg2) of ``dbname``."""
        return f"postgresql://{quote(self.user)}@{self.host}:{self.port}/{dbname}"

    def url(self, dbname: str, *, driver: str = "psycopg2") -> str:
        """A SQLAlchemy URL of ``dbname``."""
        return f"postgresql+{driver}://{quote(self.user)}@{self.host}:{self.port}/{dbname}"

    @contextlib.contextmanager
    def admin_connection(self) -> Iterator[Any]:
        """An autocommit connection to the ``postgres`` maintenance database."""
        conn = psycopg2.connect(self.dsn("postgres"), connect_timeout=10)
        conn.autocommit = True
        try:
            yield conn
        finally:
            conn.close()

    def create_database(self, prefix: str) -> str:
        """Create a fresh database ``<prefix>_<random>`` and return its SQLAlchemy URL."""
        if not _DB_PREFIX.match(prefix):
            raise ValueError(f"database prefix {prefix!r} must match {_DB_PREFIX.pattern}")
        name = f"{prefix}_{secrets.token_hex(3)}"
        with self.admin_connection() as conn, conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        self._databases.append(name)
        return self.url(name)

    def terminate_backends(self, dbname: str) -> int:
        """Terminate every other connection to ``dbname``; return how many were terminated."""
        with self.admin_connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def drop_database(self, dbname: str) -> None:
        """Drop ``dbname`` after terminating its connections."""
        self.terminate_backends(dbname)
        with self.admin_connection() as conn, conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        if dbname in self._databases:
            self._databases.remove(dbname)


# --------------------------------------------------------------------------------------------------
# Redis (the Celery broker)


class RedisServer(_Service):
    """Redis on loopback: the machine's at 127.0.0.1:6379 when it answers PING, else a private
    ``redis-server`` on a free port (no persistence) in ``workdir``."""

    def __init__(self, *, workdir: Path, host: str = LOOPBACK, port: int | None = None) -> None:
        self.workdir = workdir
        self.host = host
        self.port = port or int(os.environ.get("HPO_TEST_REDIS_PORT", "6379"))
        self.private = False
        self.process: ManagedProcess | None = None
        self.startup_seconds = 0.0

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(host=self.host, port=self.port, socket_timeout=2).ping())
        except redis.RedisError:
            return False

    def start(self) -> Self:
        started = time.monotonic()
        if not self._answers():
            executable = shutil.which("redis-server")
            if executable is None:
                raise ServiceStartError(
                    f"no Redis answers at {self.host}:{self.port} and redis-server is not installed "
                    "(apt-get install redis-server)"
                )
            self.private = True
            self.port = free_port()
            self.workdir.mkdir(parents=True, exist_ok=True)
            argv = [executable, "--bind", self.host, "--port", str(self.port), "--save", "",
                    "--appendonly", "no", "--dir", str(self.workdir)]  # fmt: skip
            self.process = ManagedProcess(
                "redis", argv, env=_clean_environ(), log_path=self.workdir / "redis.log"
            )
            self.process.start()
            wait_until(
                self._answers,
                timeout=30,
                what=f"private redis-server on port {self.port}",
                alive=self.process.alive,
                log=self.process.log_tail,
            )
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


# --------------------------------------------------------------------------------------------------
# S3 (moto server)


class MotoS3Server(_Service):
    """moto in server mode as a subprocess on loopback, with one bucket created at start."""

    def __init__(
        self,
        *,
        workdir: Path,
        bucket: str = "hpo-artifacts",
        access_key_id: str = "hpo-test-key",
        secret_access_key: str = "hpo-test-secret",
        region: str = "us-east-1",
    ) -> None:
        self.workdir = workdir
        self.bucket = bucket
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.region = region
        self.port = 0
        self.process: ManagedProcess | None = None
        self.startup_seconds = 0.0

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment a boto3 or MLflow client needs to reach the bucket."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self) -> Any:
        """A boto3 S3 client for the endpoint."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )

    def list_keys(self, prefix: str = "") -> list[str]:
        """All object keys in the bucket under ``prefix``."""
        paginator = self.client().get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    def start(self) -> Self:
        started = time.monotonic()
        self.port = free_port()
        env = {**_clean_environ(), **self.env()}
        self.process = ManagedProcess(
            "moto",
            [_bin("moto_server"), "-H", LOOPBACK, "-p", str(self.port)],
            env=env,
            log_path=self.workdir / "moto.log",
        )
        self.process.start()
        wait_until(
            lambda: requests.get(f"{self.endpoint_url}/moto-api/", timeout=2).status_code < 500,
            timeout=60,
            what=f"moto S3 server on port {self.port}",
            alive=self.process.alive,
            log=self.process.log_tail,
        )
        self.client().create_bucket(Bucket=self.bucket)
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines) if self.process else ""


# --------------------------------------------------------------------------------------------------
# MLflow


class MLflowServer(_Service):
    """``mlflow server`` with a PostgreSQL backend store and artifacts in the moto bucket.

    Artifacts are not proxied (``--no-serve-artifacts``): the server hands out ``s3://`` artifact URIs
    and clients (Airflow tasks, trial workers) read and write S3 directly with ``MLFLOW_S3_ENDPOINT_URL``
    and the AWS credentials from :meth:`env`, as the production deployment does.
    """

    def __init__(
        self,
        *,
        backend_store_uri: str,
        s3: MotoS3Server,
        workdir: Path,
        artifact_prefix: str = "mlflow",
    ) -> None:
        self.backend_store_uri = backend_store_uri
        self.s3 = s3
        self.workdir = workdir
        self.artifact_root = f"s3://{s3.bucket}/{artifact_prefix}"
        self.port = 0
        self.process: ManagedProcess | None = None
        self.startup_seconds = 0.0

    @property
    def tracking_uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment an MLflow client needs: tracking URI, S3 endpoint and credentials."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, **self.s3.env()}

    def start(self) -> Self:
        """Start the server; after :meth:`stop`, on the same port (clients keep their tracking URI)."""
        started = time.monotonic()
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The server's job runner (huey consumers polling in ~7 processes) serves MLflow features the
        # pipeline does not use; off, it leaves the 2 cores to the tests.
        env = {**_clean_environ(), **self.s3.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        argv = [
            _bin("mlflow"), "server",
            "--backend-store-uri", self.backend_store_uri,
            "--default-artifact-root", self.artifact_root,
            "--no-serve-artifacts",
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        self.process = ManagedProcess(
            "mlflow", argv, env=env, log_path=self.workdir / "mlflow.log", cwd=self.workdir
        )
        self.process.start()
        wait_until(
            lambda: requests.get(f"{self.tracking_uri}/health", timeout=2).status_code == 200,
            timeout=120,
            what=f"MLflow server on port {self.port}",
            alive=self.process.alive,
            log=self.process.log_tail,
        )
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def down(self) -> bool:
        """Whether nothing answers on the server's port (after :meth:`stop`: connections are refused)."""
        try:
            requests.get(f"{self.tracking_uri}/health", timeout=2)
        except requests.ConnectionError:
            return True
        return False

    def restart(self) -> Self:
        """Stop the server if it runs, and start it again on the same port with the same stores."""
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines) if self.process else ""


# --------------------------------------------------------------------------------------------------
# Airflow


@dataclass(frozen=True)
class ParsedDag:
    """What :meth:`AirflowClient.wait_for_dag` found: the DAG (``None`` if it failed) and import errors."""

    dag: dict[str, Any] | None
    import_errors: list[dict[str, Any]] = field(default_factory=list)


TERMINAL_RUN_STATES = frozenset({"success", "failed"})
_LOG_CONTEXT_KEYS = frozenset(
    {
        "event",
        "timestamp",
        "level",
        "logger",
        "filename",
        "lineno",
        "ti_id",
        "dag_id",
        "run_id",
        "task_id",
        "map_index",
        "try_number",
    }
)


class AirflowClient:
    """A small client for the Airflow 3 REST API v2, authenticated with a JWT from ``/auth/token``."""

    def __init__(self, base_url: str, *, username: str, password: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.password = password
        self.timeout = timeout
        self.session = requests.Session()
        self._token: str | None = None

    # -- transport ---------------------------------------------------------------------------------

    def token(self, *, refresh: bool = False) -> str:
        """A JWT for the configured user (``POST /auth/token``)."""
        if self._token is None or refresh:
            response = self.session.post(
                f"{self.base_url}/auth/token",
                json={"username": self.username, "password": self.password},
                timeout=self.timeout,
            )
            if response.status_code >= 400:
                message = f"POST /auth/token -> {response.status_code}: {response.text}"
                raise AirflowApiError(message, response)
            self._token = str(response.json()["access_token"])
        return self._token

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Call ``path`` (relative to the base URL) and return the raw response; re-auth once on 401."""
        kwargs.setdefault("timeout", self.timeout)
        extra_headers = kwargs.pop("headers", {})
        for attempt in range(2):
            headers = {**extra_headers, "Authorization": f"Bearer {self.token(refresh=attempt > 0)}"}
            response = self.session.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)
            if response.status_code != 401:
                break
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise AirflowApiError(f"{method} {path} -> {response.status_code}: {response.text}", response)
        return response.json() if response.content else None

    # -- health and pools --------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /api/v2/monitor/health``: status of metadatabase, scheduler, triggerer, dag processor."""
        response = self.session.get(f"{self.base_url}/api/v2/monitor/health", timeout=self.timeout)
        response.raise_for_status()
        return dict(response.json())

    def ensure_pool(self, name: str, slots: int, *, description: str = "") -> dict[str, Any]:
        """Create pool ``name`` with ``slots`` slots, or update its slots if it exists."""
        response = self.request("GET", f"/api/v2/pools/{name}")
        if response.status_code == 404:
            return dict(
                self._json(
                    "POST", "/api/v2/pools", json={"name": name, "slots": slots, "description": description}
                )
            )
        return dict(self._json("PATCH", f"/api/v2/pools/{name}", json={"slots": slots}))

    # -- DAGs --------------------------------------------------------------------------------------

    def get_dag(self, dag_id: str) -> dict[str, Any] | None:
        """The DAG as the API sees it, or ``None`` if it is not (yet) parsed."""
        response = self.request("GET", f"/api/v2/dags/{dag_id}")
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise AirflowApiError(f"GET dag {dag_id} -> {response.status_code}: {response.text}", response)
        return dict(response.json())

    def import_errors(self) -> list[dict[str, Any]]:
        """All current DAG import errors (``GET /api/v2/importErrors``)."""
        return list(self._json("GET", "/api/v2/importErrors", params={"limit": 100})["import_errors"])

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0, *, fileloc: str | None = None) -> ParsedDag:
        """Wait until ``dag_id`` is parsed and serialized.

        Returns early, with ``dag=None``, when an import error appears for a file whose name ends with
        ``fileloc`` (e.g. ``"my_dag.py"``). Without ``fileloc`` only the DAG itself ends the wait.

        Raises:
            TimeoutError: neither happened in time; the message lists all import errors.
        """
        deadline = time.monotonic() + timeout
        while True:
            dag = self.get_dag(dag_id)
            errors = self.import_errors()
            if fileloc is not None:
                errors = [e for e in errors if str(e.get("filename", "")).endswith(fileloc)]
            if dag is not None and self._dag_is_serialized(dag_id):
                return ParsedDag(dag=dag, import_errors=errors if fileloc else [])
            if fileloc is not None and errors:
                return ParsedDag(dag=None, import_errors=errors)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"DAG {dag_id!r} not parsed after {timeout:.0f}s; import errors: "
                    f"{json.dumps(self.import_errors(), indent=1)[:4000]}"
                )
            time.sleep(1.0)

    def _dag_is_serialized(self, dag_id: str) -> bool:
        return self.request("GET", f"/api/v2/dags/{dag_id}/details").status_code == 200

    def unpause(self, dag_id: str) -> dict[str, Any]:
        """Unpause the DAG so the scheduler runs it."""
        return dict(self._json("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False}))

    def pause(self, dag_id: str) -> dict[str, Any]:
        return dict(self._json("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": True}))

    # -- DAG runs ----------------------------------------------------------------------------------

    def trigger_response(
        self,
        dag_id: str,
        conf: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        logical_date: str | None = None,
        note: str | None = None,
    ) -> requests.Response:
        """``POST /api/v2/dags/{dag_id}/dagRuns`` and return the raw response (for 4xx assertions)."""
        body: dict[str, Any] = {"logical_date": logical_date, "conf": dict(conf or {})}
        if run_id is not None:
            body["dag_run_id"] = run_id
        if note is not None:
            body["note"] = note
        return self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)

    def trigger(
        self,
        dag_id: str,
        conf: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        logical_date: str | None = None,
    ) -> str:
        """Trigger a run and return its ``dag_run_id``.

        Raises:
            AirflowApiError: the API refused the trigger (e.g. a Param failed validation); the error
                carries the raw response.
        """
        response = self.trigger_response(dag_id, conf, run_id=run_id, logical_date=logical_date)
        if response.status_code >= 400:
            raise AirflowApiError(f"trigger {dag_id} -> {response.status_code}: {response.text}", response)
        return str(response.json()["dag_run_id"])

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"))

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300.0, *, poll: float = 2.0) -> str:
        """Wait until the run is ``success`` or ``failed`` and return that state.

        Raises:
            TimeoutError: still not finished; the message lists the task instance states.
        """
        deadline = time.monotonic() + timeout
        while True:
            state = str(self.dag_run(dag_id, run_id)["state"])
            if state in TERMINAL_RUN_STATES:
                return state
            if time.monotonic() > deadline:
                tis = self.task_instances(dag_id, run_id)
                states = [(t["task_id"], t["map_index"], t["state"]) for t in tis]
                raise TimeoutError(f"run {dag_id}/{run_id} still {state} after {timeout:.0f}s: {states}")
            time.sleep(poll)

    # -- task instances ----------------------------------------------------------------------------

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """All task instances of the run, mapped ones included (one entry per map index)."""
        found: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = self._json(
                "GET",
                f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                params={"limit": 100, "offset": offset, "order_by": "map_index"},
            )
            found.extend(page["task_instances"])
            offset += len(page["task_instances"])
            if not page["task_instances"] or offset >= page["total_entries"]:
                return found

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        if map_index >= 0:
            path += f"/{map_index}"
        return dict(self._json("GET", path))

    def wait_for_task_state(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        states: Iterable[str],
        *,
        map_index: int = -1,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Wait until the task instance is in one of ``states`` and return it."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(AirflowApiError):
                ti = self.task_instance(dag_id, run_id, task_id, map_index)
                if ti.get("state") in wanted:
                    return ti
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{dag_id}/{run_id}/{task_id}[{map_index}] not in {sorted(wanted)} after {timeout:.0f}s"
                )
            time.sleep(0.5)

    def task_log(
        self, dag_id: str, run_id: str, task_id: str, *, map_index: int = -1, try_number: int = 1
    ) -> str:
        """The task attempt's log as text, one line per log event."""
        payload = self._json(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"map_index": map_index, "full_content": True},
            headers={"Accept": "application/json"},
        )
        lines = []
        for item in payload.get("content", []):
            if isinstance(item, dict):
                extra = {k: v for k, v in item.items() if k not in _LOG_CONTEXT_KEYS}
                level = str(item.get("level", "")).upper()
                line = f"{level} {item.get('logger', '')}: {item.get('event', '')}".strip()
                lines.append(f"{line} {json.dumps(extra, default=str)}" if extra else line)
            else:
                lines.append(str(item))
        return "\n".join(lines)

    def clear_task_instances(
        self,
        dag_id: str,
        run_id: str,
        task_ids: Sequence[str | tuple[str, int] | list[Any]],
        *,
        only_failed: bool = False,
        include_downstream: bool = False,
        reset_dag_runs: bool = True,
        dry_run: bool = False,
    ) -> list[dict[str, Any]]:
        """Clear task instances by ``task_id`` or ``[task_id, map_index]`` so they run again.

        Returns:
            The task instances that were (or, with ``dry_run``, would be) cleared.
        """
        body = {
            "dag_run_id": run_id,
            "task_ids": [list(t) if isinstance(t, tuple | list) else t for t in task_ids],
            "only_failed": only_failed,
            "include_downstream": include_downstream,
            "reset_dag_runs": reset_dag_runs,
            "dry_run": dry_run,
        }
        result = self._json("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances", json=body)
        return list(result["task_instances"])


AIRFLOW_COMPONENTS: tuple[str, ...] = ("api-server", "scheduler", "dag-processor", "triggerer")
#: Pools created at start, as the compose stack's airflow-init does.
DEFAULT_POOLS: Mapping[str, int] = {"hpo_trials": 4}


class AirflowDeployment(_Service):
    """A real Airflow 3 (API server, scheduler, DAG processor, triggerer) with the LocalExecutor.

    The metadata database is PostgreSQL (migrated at start), ``AIRFLOW_HOME`` is ``home``, and ``env``
    is passed to every component (and so to every task). The API is reached through :attr:`client`,
    authenticated as an ADMIN user of the SimpleAuthManager whose password is written to a file here.
    """

    username = "admin"

    def __init__(
        self,
        *,
        database_url: str,
        dags_folder: Path,
        home: Path,
        plugins_folder: Path | None = None,
        env: Mapping[str, str] | None = None,
        components: Sequence[str] = AIRFLOW_COMPONENTS,
        parallelism: int = 4,
        pools: Mapping[str, int] | None = None,
    ) -> None:
        unknown = set(components) - set(AIRFLOW_COMPONENTS)
        if unknown or "api-server" not in components:
            raise ValueError(f"components must include 'api-server' and be among {AIRFLOW_COMPONENTS}")
        self.database_url = database_url
        self.dags_folder = dags_folder
        self.home = home
        self.plugins_folder = plugins_folder or home / "plugins"
        self.extra_env = dict(env or {})
        self.components = tuple(components)
        self.parallelism = parallelism
        self.pools = dict(DEFAULT_POOLS if pools is None else pools)
        self.port = 0
        self.password = secrets.token_urlsafe(16)
        self.processes: dict[str, ManagedProcess] = {}
        self.startup_seconds: dict[str, float] = {}
        self._env: dict[str, str] = {}
        self._client: AirflowClient | None = None

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def logs_dir(self) -> Path:
        return self.home / "service-logs"

    @property
    def client(self) -> AirflowClient:
        if self._client is None:
            self._client = AirflowClient(self.api_url, username=self.username, password=self.password)
        return self._client

    @property
    def env(self) -> dict[str, str]:
        """The full environment the components run with (configuration included)."""
        return dict(self._env)

    def _build_env(self) -> dict[str, str]:
        password_file = self.home / "simple_auth_manager_passwords.json"
        config = {
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url,
            # asyncpg is not installed; an empty async URL turns the async engine off.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": "",
            # The project's LocalExecutor that imports the stack before forking (as the main
            # command's local Airflow does): task processes start warm.
            "AIRFLOW__CORE__EXECUTOR": "hpo_airflow.executor.WarmLocalExecutor",
            "AIRFLOW__CORE__MP_START_METHOD": "fork",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "5",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.username}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
            "AIRFLOW__API__HOST": LOOPBACK,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API__EXPOSE_STACKTRACE": "True",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "2",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "15",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "300",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
            # A LocalExecutor worker waits one supervisor heartbeat after each task (default 5 s).
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
            # A task whose process died (scheduler or Celery worker killed) is failed, and retried,
            # after 15 s without a heartbeat (default 300 s); live tasks heartbeat every second.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "15",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
            "AIRFLOW__DAG_PROCESSOR__HEALTH_CHECK_THRESHOLD": "30",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
            # Used only when the executors include Celery: task states in the metadata database.
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.database_url}",
            "PYTHONUNBUFFERED": "1",
        }
        return {**_clean_environ(), **config, **self.extra_env}

    def _component_argv(self, name: str) -> list[str]:
        airflow = _bin("airflow")
        if name == "api-server":
            return [airflow, "api-server", "--host", LOOPBACK, "--port", str(self.port), "--workers", "1"]
        if name in {"scheduler", "triggerer"}:
            return [airflow, name, "--skip-serve-logs"]
        return [airflow, name]

    def start(self) -> Self:
        started = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        self.plugins_folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._env = self._build_env()
        password_file = self.home / "simple_auth_manager_passwords.json"
        password_file.write_text(json.dumps({self.username: self.password}))
        migrate = subprocess.run(
            [_bin("airflow"), "db", "migrate"],
            env=self._env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        (self.logs_dir).mkdir(parents=True, exist_ok=True)
        (self.logs_dir / "db-migrate.log").write_text(migrate.stdout + migrate.stderr)
        if migrate.returncode != 0:
            raise ServiceStartError(
                f"airflow db migrate failed ({migrate.returncode}):\n"
                + "\n".join((migrate.stdout + migrate.stderr).splitlines()[-60:])
            )
        self.startup_seconds["db-migrate"] = time.monotonic() - started
        for name in self.components:
            self.start_component(name, wait=False)
        api = self.processes["api-server"]
        wait_until(
            lambda: self.client.health()["metadatabase"]["status"] == "healthy",
            timeout=180,
            what=f"Airflow api-server on port {self.port}",
            alive=api.alive,
            log=api.log_tail,
        )
        self.startup_seconds["api-server"] = time.monotonic() - started
        for name in self.components:
            if name != "api-server":
                self.wait_component_healthy(name)
                self.startup_seconds[name] = time.monotonic() - started
        for pool, slots in self.pools.items():
            self.client.ensure_pool(pool, slots)
        self.startup_seconds["total"] = time.monotonic() - started
        return self

    _HEALTH_KEYS = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}

    def wait_component_healthy(self, name: str, timeout: float = 180.0) -> None:
        """Wait until ``/monitor/health`` reports the component healthy (a fresh heartbeat)."""
        process = self.processes[name]
        key = self._HEALTH_KEYS[name]
        wait_until(
            lambda: self.client.health()[key]["status"] == "healthy",
            timeout=timeout,
            what=f"Airflow {name}",
            alive=process.alive,
            log=lambda: self.logs_tail([name]),
        )

    def start_component(self, name: str, *, wait: bool = True) -> ManagedProcess:
        """Start (or start again) one component; with ``wait``, until the API reports it healthy."""
        process = ManagedProcess(
            name,
            self._component_argv(name),
            env=self._env,
            log_path=self.logs_dir / f"{name}.log",
            cwd=self.home,
        )
        process.start()
        self.processes[name] = process
        if wait and name != "api-server":
            self.wait_component_healthy(name)
        return process

    def start_celery_worker(
        self,
        name: str,
        *,
        queues: str,
        concurrency: int = 2,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> ManagedProcess:
        """Start ``airflow celery worker`` with Celery hostname ``<name>@<host>`` (component
        ``celery-<name>``) consuming ``queues``; with ``wait``, until it is ready. ``env`` is added
        to the deployment's environment (so to its task processes)."""
        argv = [
            _bin("airflow"), "celery", "worker", "--celery-hostname", f"{name}@%h", "--queues", queues,
            "--concurrency", str(concurrency), "--skip-serve-logs",
        ]  # fmt: skip
        component = f"celery-{name}"
        process = ManagedProcess(
            component,
            argv,
            env={**self._env, **(env or {})},
            log_path=self.logs_dir / f"{component}.log",
            cwd=self.home,
        )
        process.start()
        self.processes[component] = process
        if wait:
            self.wait_celery_worker(name)
        return process

    def wait_celery_worker(self, name: str, timeout: float = 180.0) -> None:
        """Wait until Celery worker ``name`` says it is ready."""
        process = self.processes[f"celery-{name}"]
        wait_until(
            lambda: f"{name}@" in process.log_tail(200) and " ready." in process.log_tail(200),
            timeout=timeout,
            what=f"Celery worker {name}",
            alive=process.alive,
            log=process.log_tail,
        )

    def kill_component(self, name: str, *, group: bool = True) -> None:
        """SIGKILL a component; with ``group`` also its children (e.g. LocalExecutor workers and tasks)."""
        self.processes[name].kill(signal.SIGKILL, group=group)

    def kill_scheduler(self, *, group: bool = True) -> None:
        """SIGKILL the scheduler (and, with ``group``, the tasks its LocalExecutor is running)."""
        self.kill_component("scheduler", group=group)

    def restart_scheduler(self, *, wait: bool = True) -> None:
        """Start a new scheduler process after :meth:`kill_scheduler`."""
        old = self.processes.get("scheduler")
        if old is not None and old.alive():
            old.stop()
        self.start_component("scheduler", wait=wait)

    def stop(self) -> None:
        """SIGTERM all components at once, then wait for (or SIGKILL) each."""
        order = ("scheduler", "triggerer", "dag-processor", "api-server")
        workers = [p for name, p in self.processes.items() if name.startswith("celery-")]
        running = workers + [self.processes[name] for name in order if name in self.processes]
        for process in running:
            if process.alive():
                process.kill(signal.SIGTERM)
        for process in running:
            process.stop(timeout=5)  # then SIGKILL: nothing of the session's Airflow is kept

    def logs_tail(self, names: Iterable[str] | None = None, lines: int = 40) -> str:
        """The tails of the component logs, for failure messages."""
        parts = []
        for name in names or self.processes:
            if name in self.processes:
                parts.append(
                    f"--- {name} ({self.processes[name].log_path}) ---\n"
                    f"{self.processes[name].log_tail(lines)}"
                )
        return "\n".join(parts)


atexit.register(ManagedProcess.kill_all)
