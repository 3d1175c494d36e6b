"""A real local Airflow on the embedded state under ``.hpo/``: run a study on it, or keep the UIs up.

``scripts/run_example.sh`` and ``scripts/ui.sh`` are thin wrappers around this module::

    python scripts/local_airflow.py run [DAG_ID] [CONF_JSON] [--keep-ui]   # start, trigger, watch, stop
    python scripts/local_airflow.py ui                                    # Airflow + MLflow UIs until Ctrl-C

The instance: Airflow's api-server, scheduler and dag-processor (plus the triggerer when a study
file has ``alerts``: deadline callbacks run there) with a SQLite metadata database in
``$AIRFLOW_HOME`` (default ``.hpo/airflow``), the :class:`hpo_airflow.executor.WarmLocalExecutor`
(a LocalExecutor whose task processes start with the HPO stack imported), ``HPO_PARALLELISM``
tasks at once (default: the CPUs this process may use) and SimpleAuthManager with every user an
admin (no login; the API listens on 127.0.0.1 only).
Every setting of the instance is made in :func:`airflow_env`, for the test fixtures and
benchmarks that want the same instance.

Environment: ``HPO_HOME`` (default ``.hpo``), ``AIRFLOW_HOME`` (default ``$HPO_HOME/airflow``),
``HPO_PARALLELISM``, ``HPO_AIRFLOW_PORT`` (default 8080, a free port when taken),
``HPO_MLFLOW_PORT`` (default 5000), ``HPO_PREIMPORT`` (extra modules the warm executor imports;
default: the objective modules of the study files), ``HPO_WARM_EXECUTOR=0`` (plain
LocalExecutor), ``HPO_STORAGE_URL`` / ``MLFLOW_TRACKING_URI`` as everywhere else.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import quote

import psutil
import requests
import yaml

from hpo_core.deployment import ENV_MLFLOW_UI_URL, Deployment
from hpo_core.errors import StudySpecError
from hpo_core.spec import load_spec
from hpo_core.study.config import study_name_for

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
DEFAULT_DAG_ID = "hpo_breast_cancer_gbm"

ENV_PARALLELISM = "HPO_PARALLELISM"
ENV_AIRFLOW_PORT = "HPO_AIRFLOW_PORT"
ENV_MLFLOW_PORT = "HPO_MLFLOW_PORT"
ENV_WARM_EXECUTOR = "HPO_WARM_EXECUTOR"
ENV_PREIMPORT = "HPO_PREIMPORT"  # read by hpo_airflow.executor in the scheduler

WARM_EXECUTOR = "hpo_airflow.executor.WarmLocalExecutor"
PLAIN_EXECUTOR = "LocalExecutor"
#: The triggerer is started too when a study file has ``alerts`` (see :func:`needs_triggerer`).
COMPONENTS: tuple[str, ...] = ("api-server", "scheduler", "dag-processor")
TERMINAL_RUN_STATES = frozenset({"success", "failed"})
#: Trial attribute a worker sets when it takes the trial (hpo_core.worker.T_WORKER).
WORKER_ATTR = "hpo.worker"
ACTIVE_TI_STATES = frozenset({"queued", "scheduled", "running", "up_for_retry", "restarting", "deferred"})
#: Keys in local_secrets.json, shared by the components of the local instance.
_SECRET_KEYS = ("fernet_key", "jwt_secret", "api_secret_key")


class LocalAirflowError(RuntimeError):
    """The local Airflow could not start or the run could not be watched; the message says why."""


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP arrived."""


# ------------------------------------------------------------------------------------------------
# Settings: the one place that defines the local instance


def default_parallelism(env: Mapping[str, str] | None = None) -> int:
    """``HPO_PARALLELISM``, else the number of CPUs this process may run on (what ``nproc`` says)."""
    env = os.environ if env is None else env
    raw = env.get(ENV_PARALLELISM, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise LocalAirflowError(f"{ENV_PARALLELISM}={raw!r}: expected a whole number >= 1")
        return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class LocalSettings:
    """Where the local instance keeps its state and how it runs."""

    hpo_home: Path
    airflow_home: Path
    port: int = 8080
    parallelism: int = 2
    warm_executor: bool = True
    #: Extra modules for the warm executor; ``None``: the objective modules of the study files.
    preimport: str | None = None
    dags_folder: Path = ROOT / "dags"
    plugins_folder: Path = ROOT / "plugins"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LocalSettings:
        """Settings from ``HPO_HOME``, ``AIRFLOW_HOME``, ``HPO_PARALLELISM``, ``HPO_AIRFLOW_PORT`` etc."""
        env = os.environ if env is None else env
        hpo_home = Path(env.get("HPO_HOME") or ROOT / ".hpo").expanduser().resolve()
        airflow_home = Path(env.get("AIRFLOW_HOME") or hpo_home / "airflow").expanduser().resolve()
        return cls(
            hpo_home=hpo_home,
            airflow_home=airflow_home,
            port=int(env.get(ENV_AIRFLOW_PORT) or 8080),
            parallelism=default_parallelism(env),
            warm_executor=env.get(ENV_WARM_EXECUTOR, "1").strip().lower() not in {"0", "false", "no"},
            preimport=env.get(ENV_PREIMPORT),
        )

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def database(self) -> Path:
        return self.airflow_home / "airflow.db"

    @property
    def logs_dir(self) -> Path:
        """Task logs (``dag_id=…/run_id=…``) and the components' own logs (``<component>.log``)."""
        return self.airflow_home / "logs"

    @property
    def executor(self) -> str:
        return WARM_EXECUTOR if self.warm_executor else PLAIN_EXECUTOR


def airflow_env(
    settings: LocalSettings,
    *,
    base: Mapping[str, str] | None = None,
    secrets: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The complete environment of every component of the local instance (and so of every task).

    ``base`` (default ``os.environ``) is kept, including the caller's own ``AIRFLOW__*`` options,
    except for the options set here, which always win.
    """
    base = os.environ if base is None else base
    secrets = secrets or local_secrets(settings.airflow_home)
    no_proxy = ",".join(
        dict.fromkeys([*filter(None, base.get("NO_PROXY", "").split(",")), LOOPBACK, "localhost"])
    )
    config = {
        "HPO_HOME": str(settings.hpo_home),
        "AIRFLOW_HOME": str(settings.airflow_home),
        "AIRFLOW_CONFIG": str(settings.airflow_home / "airflow.cfg"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{settings.database}",
        "AIRFLOW__CORE__EXECUTOR": settings.executor,
        # The warm executor relies on fork (the default on Linux before Python 3.14).
        "AIRFLOW__CORE__MP_START_METHOD": "fork",
        "AIRFLOW__CORE__PARALLELISM": str(settings.parallelism),
        "AIRFLOW__CORE__DAGS_FOLDER": str(settings.dags_folder),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(settings.plugins_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__FERNET_KEY": secrets["fernet_key"],
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{settings.api_url}/execution/",
        "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "5",
        # Local instance only: no login, every user is admin; the API listens on loopback only.
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__HOST": LOOPBACK,
        "AIRFLOW__API__PORT": str(settings.port),
        "AIRFLOW__API__BASE_URL": settings.api_url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": secrets["api_secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets["jwt_secret"],
        # Short hops between a study's tasks: the scheduler loops every 0.25 s when idle.
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "15",
        "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "30",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        # The task supervisor (in a LocalExecutor worker) notices its task process's exit only at
        # its next wake-up, at most this often: 5 s by default, which keeps the worker from the
        # next task (and delays the end of a skipped task) by up to 5 s. Also its heartbeat period.
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        # One parsing process; a study file change shows within a minute, new files within 30 s.
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "60",
        "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "0",
        "AIRFLOW__DAG_PROCESSOR__HEALTH_CHECK_THRESHOLD": "60",
        "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        "PYTHONUNBUFFERED": "1",
    }
    # The MLflow UI that ui.sh / --keep-ui start: where the HPO view and the extra links point.
    mlflow_ui = f"http://{LOOPBACK}:{base.get(ENV_MLFLOW_PORT) or 5000}"
    config[ENV_MLFLOW_UI_URL] = base.get(ENV_MLFLOW_UI_URL) or mlflow_ui
    preimport = settings.preimport if settings.preimport is not None else objective_modules(settings)
    if preimport:
        config[ENV_PREIMPORT] = preimport
    kept = {k: v for k, v in base.items() if k not in {"AIRFLOW_HOME", "AIRFLOW_CONFIG"}}
    return {**kept, **config}


def local_secrets(airflow_home: Path) -> dict[str, str]:
    """Keys shared by the components (Fernet, JWT, API secret), made once and kept in
    ``$AIRFLOW_HOME/local_secrets.json`` (mode 600), so connections stay readable across runs."""
    path = airflow_home / "local_secrets.json"
    with contextlib.suppress(FileNotFoundError, ValueError):
        stored = json.loads(path.read_text())
        complete = all(isinstance(stored.get(k), str) and stored[k] for k in _SECRET_KEYS)
        if complete and len(stored["jwt_secret"]) >= 64:  # HS512 wants a key of 64 bytes or more
            return {k: stored[k] for k in _SECRET_KEYS}
    airflow_home.mkdir(parents=True, exist_ok=True)
    secrets = {
        "fernet_key": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "jwt_secret": base64.b64encode(os.urandom(64)).decode(),
        "api_secret_key": os.urandom(16).hex(),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(secrets, f)
    return secrets


_MODULE = re.compile(r"^[A-Za-z_][\w.]*$")


def _study_files(settings: LocalSettings) -> list[dict[str, Any]]:
    """The study files' raw contents (unvalidated; a broken file is skipped here)."""
    found: list[dict[str, Any]] = []
    for path in sorted((settings.dags_folder / "studies").glob("*.y*ml")):
        with contextlib.suppress(OSError, yaml.YAMLError):
            data = yaml.safe_load(path.read_text())
            if isinstance(data, dict):
                found.append(data)
    return found


def needs_triggerer(settings: LocalSettings) -> bool:
    """Whether a study has ``alerts``: Airflow's deadline alerts run their callbacks in the triggerer."""
    return any(data.get("alerts") for data in _study_files(settings))


def objective_modules(settings: LocalSettings) -> str:
    """The ``objective`` / ``space_function`` modules of the study files, comma separated."""
    modules: list[str] = []
    for data in _study_files(settings):
        for key in ("objective", "space_function"):
            value = data.get(key)
            if isinstance(value, str) and ":" in value:
                module = value.split(":", 1)[0].strip()
                if _MODULE.match(module):
                    modules.append(module)
    return ",".join(dict.fromkeys(modules))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now (one in TIME_WAIT after a stop counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


# ------------------------------------------------------------------------------------------------
# Processes


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class Component:
    """One long-running process in its own session (process group), output to a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.terminated = False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n".encode())
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
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def family(self) -> list[psutil.Process]:
        """The process and all its descendants (task processes have process groups of their own)."""
        if self.popen is None:
            return []
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def terminate_all(components: Sequence[Component]) -> None:
    """SIGTERM each component's main process, once: each stops its own children in order (the
    scheduler ends its LocalExecutor, whose workers ignore SIGTERM and wait for a poison pill;
    a second SIGTERM would cut that short)."""
    for component in components:
        if component.popen is not None and not component.terminated:
            component.terminated = True
            with contextlib.suppress(ProcessLookupError):
                component.popen.send_signal(signal.SIGTERM)


#: Stopped after the others: running tasks need the API to learn that they must stop.
STOPPED_LAST = ("api-server",)


def stop_all(components: Sequence[Component], *, grace: float = 10.0, timeout: float = 5.0) -> None:
    """Stop the components and every process they started (task processes and trial processes
    have process groups or sessions of their own, so they are found as descendants).

    SIGTERM to each main process, the api-server once the others are gone (or ``grace`` seconds
    passed); 2 s later SIGTERM to every process still there; after ``timeout`` more SIGKILL to
    whatever is left, process groups included.
    """
    running = [c for c in components if c.popen is not None]
    if not running:
        return
    seen: dict[int, tuple[str, psutil.Process]] = {}

    def alive(names: Sequence[str]) -> list[psutil.Process]:
        """Processes of these components still running (including ones that lost their parent)."""
        for component in running:
            for proc in component.family():
                seen.setdefault(proc.pid, (component.name, proc))
        return [proc for name, proc in seen.values() if name in names and _alive(proc)]

    everything = [c.name for c in running]
    first = [c for c in running if c.name not in STOPPED_LAST]
    deadline = time.monotonic() + grace
    alive(everything)
    terminate_all(first)
    while alive([c.name for c in first]) and time.monotonic() < deadline:
        time.sleep(0.2)
    terminate_all(running)
    # uvicorn takes seconds to act on the first SIGTERM even when idle; the second one (below)
    # makes it exit at once. Nothing needs the API any more by now.
    deadline = min(deadline, time.monotonic() + 2.0)
    while alive(everything) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in alive(everything):
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    deadline = time.monotonic() + timeout
    while alive(everything) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in alive(everything):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    for component in running:
        assert component.popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(component.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            component.popen.wait(timeout=5)
    psutil.wait_procs([proc for _, proc in seen.values()], timeout=5)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Interrupted` while the block runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore further Ctrl-C / SIGTERM while cleaning up (cleanup is bounded by its own timeouts)."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------------
# REST API


class Api:
    """The few REST API v2 calls used here (no token: every user is admin on the local instance)."""

    def __init__(self, base_url: str, *, timeout: float = 15.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # loopback: never through a proxy

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return self.session.request(method, f"{self.base_url}{path}", **kwargs)

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        if response.status_code >= 400:
            raise LocalAirflowError(f"{method} {path} -> {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    def health(self) -> dict[str, Any]:
        return dict(self.json("GET", "/api/v2/monitor/health", timeout=3))

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        response = self.call("GET", f"/api/v2/dags/{dag_id}")
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise LocalAirflowError(f"GET dag {dag_id} -> {response.status_code}: {response.text[:2000]}")
        return dict(response.json())

    def dags(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/api/v2/dags", params={"limit": 100})["dags"])

    def import_errors(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/api/v2/importErrors", params={"limit": 100})["import_errors"])

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while True:
            page = self.json(
                "GET",
                f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                params={"limit": 100, "offset": len(found)},
            )
            found.extend(page["task_instances"])
            if not page["task_instances"] or len(found) >= page["total_entries"]:
                return found

    def task_log(self, ti: Mapping[str, Any]) -> list[str]:
        """The lines of the task instance's last attempt's log."""
        path = (
            f"/api/v2/dags/{ti['dag_id']}/dagRuns/{ti['dag_run_id']}/taskInstances/{ti['task_id']}"
            f"/logs/{max(1, int(ti.get('try_number') or 1))}"
        )
        payload = self.json(
            "GET",
            path,
            params={"map_index": ti.get("map_index", -1), "full_content": True},
            headers={"Accept": "application/json"},
        )
        return [_log_line(item) for item in payload.get("content", [])]


def _log_line(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    stamp = str(item.get("timestamp") or "")[11:19]
    level = str(item.get("level") or "").upper()
    text = f"{stamp} {level:7} {item.get('event', '')}".strip()
    for detail in item.get("error_detail") or []:
        if isinstance(detail, dict):
            frames = detail.get("frames") or []
            for frame in frames[-6:]:
                text += f"\n    {frame.get('filename')}:{frame.get('lineno')} in {frame.get('name')}"
            text += f"\n  {detail.get('exc_type')}: {detail.get('exc_value')}"
    return text


def _readable(log_lines: Sequence[str]) -> list[str]:
    """Log lines without Airflow's group markers, source details and its own traceback frames."""
    out: list[str] = []
    skipping = False
    for line in "\n".join(log_lines).splitlines():
        if "::group::Log message source details" in line:
            skipping = True
            continue
        if skipping:
            skipping = "::endgroup::" not in line
            continue
        if "::group::" in line or "::endgroup::" in line or "/site-packages/airflow/" in line:
            continue
        out.append(line)
    return out


def _parse_time(value: Any) -> float | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------------------------------------
# The instance


@dataclass
class Timings:
    """Wall-clock seconds of the phases of one invocation, for the closing line."""

    started: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> float:
        self.marks[name] = time.monotonic() - self.started
        return self.marks[name]


class LocalAirflow:
    """Start (or attach to) the local Airflow of ``settings``; stop what was started.

    Only one instance runs on one ``AIRFLOW_HOME``: the owner holds ``local_airflow.lock`` there and
    describes itself in ``local_airflow.json``. A second ``run`` attaches to an instance started by
    ``ui`` (or ``run --keep-ui``) instead of starting another.
    """

    def __init__(self, settings: LocalSettings, *, out: IO[str] | None = None) -> None:
        self.settings = settings
        self.out = out or sys.stdout
        self.components: dict[str, Component] = {}
        self.attached = False
        self.env: dict[str, str] = {}
        self.api = Api(settings.api_url)
        self.timings = Timings()
        self.mode = "run"
        self._lock_fd: int | None = None

    # -- ownership ---------------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.settings.airflow_home / "local_airflow.lock"

    @property
    def state_path(self) -> Path:
        return self.settings.airflow_home / "local_airflow.json"

    def _take_lock(self) -> bool:
        self.settings.airflow_home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def write_state(self) -> None:
        """Record who runs the instance (``run`` or ``ui``), where, and its processes, for a later
        ``run`` to attach to, or to clean up after an owner that was killed (``kill -9``)."""
        state = {
            "pid": os.getpid(),
            "mode": self.mode,
            "url": self.settings.api_url,
            "port": self.settings.port,
            "components": {name: c.pid for name, c in self.components.items()},
        }
        self.state_path.write_text(json.dumps(state))

    def _reap_leftovers(self) -> None:
        """Stop the components of an earlier owner that died without stopping them."""
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return
        found: list[psutil.Process] = []
        for pid in dict(state.get("components") or {}).values():
            with contextlib.suppress(psutil.Error, TypeError, ValueError):
                proc = psutil.Process(int(pid))
                if Path(proc.cwd()) == self.settings.hpo_home:  # one of ours, not a reused pid
                    found.extend([proc, *proc.children(recursive=True)])
        if not found:
            return
        self.say(f"Stopping {len(found)} processes left running by an earlier local Airflow ...")
        for proc in found:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _gone, alive = psutil.wait_procs(found, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)

    def _attach(self, timeout: float = 120.0) -> None:
        """Use the instance of the ``ui`` owner of the lock (waiting while it starts)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = json.loads(self.state_path.read_text())
            except (OSError, ValueError):
                state = {}
            owner = state.get("pid", "?")
            if state and state.get("mode") != "ui":
                raise LocalAirflowError(
                    f"another scripts/run_example.sh (pid {owner}) is running on "
                    f"{self.settings.airflow_home}; wait for it to end, or use another HPO_HOME"
                )
            if state.get("port"):
                self.settings = replace(self.settings, port=int(state["port"]))
                self.api = Api(self.settings.api_url)
                with contextlib.suppress(requests.RequestException, LocalAirflowError, KeyError):
                    if self.api.health()["metadatabase"]["status"] == "healthy":
                        break
            if time.monotonic() > deadline:
                raise LocalAirflowError(
                    f"the local Airflow of pid {owner} ({self.state_path}) did not answer "
                    f"within {timeout:.0f}s"
                )
            time.sleep(0.5)
        self.attached = True
        self.say(f"Using the local Airflow already running at {self.settings.api_url} (pid {owner}).")

    # -- start -------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def start(self, *, mode: str = "run", wait_scheduler: bool = False) -> None:
        """Start api-server, scheduler and dag-processor at once; return when the API answers."""
        if not self._take_lock():
            self._attach()
            return
        self._reap_leftovers()
        settings = self.settings
        if not _port_free(settings.port):
            port = _free_port()
            self.say(f"Port {settings.port} is taken; the local Airflow uses port {port}.")
            settings = self.settings = replace(settings, port=port)
            self.api = Api(settings.api_url)
        self.say(
            f"Starting the local Airflow in {settings.airflow_home} "
            f"({settings.parallelism} tasks at once, {settings.executor.rsplit('.', 1)[-1]}) ..."
        )
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        config = settings.airflow_home / "airflow.cfg"
        if not config.exists():
            # Settings come from the environment (scripts/local_airflow.py); an existing file keeps
            # components from racing to write a generated one.
            config.write_text("# Settings of the local instance come from scripts/local_airflow.py.\n")
        self.env = airflow_env(settings)
        self.mode = mode
        self.write_state()
        if self._needs_migration():
            self.say(f"Preparing the Airflow metadata database {settings.database} ...")
            self._migrate()
            self.timings.mark("db migrate")
        airflow = _venv_bin("airflow")
        argv = {
            "api-server": [airflow, "api-server", "--host", LOOPBACK, "--port", str(settings.port)],
            "scheduler": [airflow, "scheduler", "--skip-serve-logs"],
            "dag-processor": [airflow, "dag-processor"],
            "triggerer": [airflow, "triggerer", "--skip-serve-logs"],
        }
        for name in (*COMPONENTS, *(["triggerer"] if needs_triggerer(settings) else [])):
            component = Component(
                name,
                argv[name],
                env=self.env,
                log_path=settings.logs_dir / f"{name}.log",
                cwd=settings.hpo_home,
            )
            component.start()
            self.components[name] = component
        self.write_state()
        self.wait(lambda: self.api.health()["metadatabase"]["status"] == "healthy", "the api-server", 180)
        self.timings.mark("api-server")
        # The execution API (what task processes call) builds its versioned app on first use, which
        # takes seconds: do it now, while the DAG is being parsed, not in the first task's time.
        threading.Thread(target=self._warm_up_execution_api, daemon=True).start()
        if wait_scheduler:
            self.wait_scheduler()

    def _warm_up_execution_api(self) -> None:
        with contextlib.suppress(requests.RequestException):
            # Not a bearer token: the execution API's token refresh then leaves the request alone.
            Api(self.settings.api_url, timeout=60).call(
                "GET", "/execution/health", headers={"Authorization": "Basic d2FybS11cA=="}
            )

    def wait_scheduler(self) -> None:
        if not self.attached:
            self.wait(lambda: self.api.health()["scheduler"]["status"] == "healthy", "the scheduler", 180)
            self.timings.mark("scheduler")

    def _needs_migration(self) -> bool:
        """True unless the database exists and was migrated by this Airflow version (a stamp file)."""
        database = self.settings.database
        if not database.exists():
            return True
        revision = _alembic_revision(database)
        stamp = self.settings.airflow_home / ".migrated"
        with contextlib.suppress(OSError):
            return revision is None or stamp.read_text().strip() != f"{_airflow_version()} {revision}"
        return True

    def _migrate(self) -> None:
        log_path = self.settings.logs_dir / "db-migrate.log"
        with log_path.open("wb") as log:
            result = subprocess.run(
                [_venv_bin("airflow"), "db", "migrate"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
                start_new_session=True,
            )
        if result.returncode != 0:
            raise LocalAirflowError(f"airflow db migrate failed; {log_path}:\n{_tail(log_path, 30)}")
        revision = _alembic_revision(self.settings.database)
        (self.settings.airflow_home / ".migrated").write_text(f"{_airflow_version()} {revision}\n")

    def check_alive(self) -> None:
        """Raise with the log tail of a component that exited."""
        for component in self.components.values():
            if not component.alive():
                code = component.popen.returncode if component.popen else None
                raise LocalAirflowError(
                    f"Airflow {component.name} exited (code {code}); {component.log_path}:\n"
                    f"{component.log_tail()}"
                )

    def wait(self, check: Callable[[], bool], what: str, timeout: float, interval: float = 0.25) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(requests.RequestException, LocalAirflowError, KeyError, TypeError):
                if check():
                    return
            self.check_alive()
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {c.log_path}\n{c.log_tail(20)}" for c in self.components.values())
                raise LocalAirflowError(f"{what} was not ready after {timeout:.0f}s\n{logs}")
            time.sleep(interval)

    def stop(self) -> None:
        """Stop every process this instance started (nothing when it was attached)."""
        if self.components:
            stop_all(list(self.components.values()))
            self.components.clear()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                self.state_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- DAGs and runs -----------------------------------------------------------------------------

    def wait_for_dag(self, dag_id: str, *, since: float, timeout: float = 180.0) -> dict[str, Any]:
        """Wait until ``dag_id`` was parsed at or after ``since`` (epoch seconds), so a changed study
        file counts; fail early, with the import errors, when the DAG file was parsed without it."""
        deadline = time.monotonic() + timeout
        missing = 0
        while True:
            self.check_alive()
            with contextlib.suppress(requests.RequestException):
                dag = self.api.dag(dag_id)
                parsed = _parse_time(dag.get("last_parsed_time")) if dag else None
                if dag is not None and parsed is not None and parsed >= since - 1:
                    return dag
                fresh = [
                    d for d in self.api.dags() if (_parse_time(d.get("last_parsed_time")) or 0) >= since - 1
                ]
                # Other DAGs were parsed since, this one not: twice in a row means it is not there.
                missing = missing + 1 if fresh else 0
                if missing >= 2:
                    errors = self.api.import_errors()
                    problem = "\n".join(str(e.get("stack_trace") or e) for e in errors)[-4000:]
                    names = ", ".join(sorted(d["dag_id"] for d in fresh))
                    raise LocalAirflowError(
                        f"no DAG {dag_id!r} after parsing {self.settings.dags_folder} (DAGs: {names})"
                        + (f"\nimport errors:\n{problem}" if problem else "")
                    )
            if time.monotonic() > deadline:
                raise LocalAirflowError(
                    f"DAG {dag_id!r} was not parsed within {timeout:.0f}s; see "
                    f"{self.settings.logs_dir}/dag-processor.log and {self.settings.logs_dir}/dag_processor/"
                )
            time.sleep(0.5)

    def note_unfinished_runs(self) -> None:
        """Say which runs an earlier instance left unfinished: the scheduler resumes them now."""
        with contextlib.suppress(requests.RequestException, LocalAirflowError, KeyError):
            runs = self.api.json(
                "GET", "/api/v2/dags/~/dagRuns", params={"state": ["running", "queued"], "limit": 20}
            )["dag_runs"]
            for run in runs:
                self.say(
                    f"Note: {run['dag_id']} run {run['dag_run_id']} was left {run['state']} by an earlier "
                    "local Airflow; it resumes now (mark it failed in the UI to stop it)."
                )

    def request_parse(self, dag: Mapping[str, Any]) -> None:
        """Ask the dag-processor to parse the DAG's file now (for an attached instance)."""
        token = dag.get("file_token")
        if not token:
            details = self.api.json("GET", f"/api/v2/dags/{dag['dag_id']}/details")
            token = details.get("file_token")
        if token:
            self.api.call("PUT", f"/api/v2/parseDagFile/{token}")

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None) -> str:
        """Unpause ``dag_id`` and trigger a run (no logical date, like a manual run); return its id."""
        self.api.json("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        response = self.api.call(
            "POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": dict(conf or {})}
        )
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise LocalAirflowError(f"Airflow refused to trigger {dag_id} ({response.status_code}): {detail}")
        return str(response.json()["dag_run_id"])

    def run_state(self, dag_id: str, run_id: str) -> str:
        return str(self.api.json("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"])

    def fail_run(self, dag_id: str, run_id: str) -> None:
        """Mark the run failed (its running tasks are stopped), so it does not resume next time."""
        self.api.json(
            "PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", json={"state": "failed"}, timeout=10
        )

    def start_mlflow_ui(self, port: int) -> str:
        """Start ``mlflow ui`` on the embedded MLflow store; return its URL."""
        settings = self.settings
        if not _port_free(port):
            port = _free_port()
        env = {**self.env} if self.env else airflow_env(settings)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers
        argv = [
            _venv_bin("mlflow"), "ui",
            "--backend-store-uri", f"sqlite:///{settings.hpo_home / 'mlflow.db'}",
            "--artifacts-destination", str(settings.hpo_home / "mlartifacts"),
            "--host", LOOPBACK, "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        component = Component(
            "mlflow-ui", argv, env=env, log_path=settings.logs_dir / "mlflow-ui.log", cwd=settings.hpo_home
        )
        component.start()
        self.components["mlflow-ui"] = component
        self.write_state()
        url = f"http://{LOOPBACK}:{port}"
        session = requests.Session()
        session.trust_env = False
        self.wait(lambda: session.get(f"{url}/health", timeout=2).status_code == 200, "the MLflow UI", 120)
        return url


def _venv_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise LocalAirflowError(f"{name!r} not found next to {sys.executable} nor on PATH")
    return found


def _airflow_version() -> str:
    return importlib.metadata.version("apache-airflow-core")


def _alembic_revision(database: Path) -> str | None:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


# ------------------------------------------------------------------------------------------------
# Progress of a study run


@dataclass
class Progress:
    """What the progress line shows."""

    run_state: str = "queued"
    tasks: str = ""
    round: int | None = None
    rounds: int | None = None
    n_trials: int | None = None
    counted: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    #: Of ``running``: trials suggested but not yet picked up by a worker.
    waiting: int = 0
    best: str | None = None

    def text(self) -> str:
        parts = []
        if self.round is not None:
            parts.append(f"round {self.round}/{self.rounds or '?'}")
        if self.n_trials is not None:
            done = self.complete + self.pruned + self.failed
            parts.append(
                f"trials {done}/{self.n_trials}: {self.complete} complete, {self.pruned} pruned, "
                f"{self.failed} failed, {self.running - self.waiting} running"
                + (f" ({self.waiting} waiting)" if self.waiting else "")
            )
        if self.best is not None:
            parts.append(f"best {self.best}")
        if self.tasks:
            parts.append(self.tasks)
        return " · ".join(parts)

    def bar(self, width: int = 16) -> str:
        if not self.n_trials:
            return "[" + "·" * width + "]"
        done = self.complete + self.pruned + self.failed
        filled = min(width, round(width * done / self.n_trials))
        return "[" + "#" * filled + "·" * (width - filled) + "]"


class StudyWatcher:
    """Reads a run's trials from the Optuna storage (read only) once its ``start`` task succeeded."""

    def __init__(self, storage_url: str, study_name: str) -> None:
        from hpo_core.study.state import load_run

        loaded = load_run(Deployment.from_env({"HPO_STORAGE_URL": storage_url}), study_name)
        self.study, self.spec = loaded.study, loaded.spec
        config = loaded.config
        self.n_trials = config.n_trials
        self.rounds = math.ceil(config.n_trials / max(1, config.batch_size))

    def update(self, progress: Progress) -> None:
        from optuna.trial import TrialState

        from hpo_core.study.accounting import count_trials, pick_best, trials_of_round

        counts = count_trials(self.study)
        progress.n_trials = self.n_trials
        progress.rounds = self.rounds
        progress.counted = counts.counted
        progress.complete, progress.pruned = counts.complete, counts.pruned
        progress.failed, progress.running = counts.failed, counts.running
        waiting = 0
        for number in range(1, self.spec.budget.max_rounds + 1):
            trials = trials_of_round(self.study, number)
            if trials:
                progress.round = number
            # A worker that took a trial over marks it (hpo.worker); before that it only waits.
            waiting += sum(
                1 for t in trials if t.state == TrialState.RUNNING and WORKER_ATTR not in t.user_attrs
            )
        progress.waiting = min(waiting, counts.running)
        best = pick_best(self.study, self.spec)
        if best is not None and best.values:
            value = ", ".join(f"{v:.5g}" for v in best.values)
            progress.best = f"{value} (trial {best.number})"


def _tasks_text(tis: Sequence[Mapping[str, Any]]) -> str:
    """The tasks running or waiting for a worker, e.g. ``round_2.evaluate x2 running``."""
    active: dict[tuple[str, str], int] = {}
    for ti in tis:
        state = str(ti.get("state") or "")
        if state in ACTIVE_TI_STATES:
            key = (str(ti["task_id"]), "running" if state == "running" else "waiting")
            active[key] = active.get(key, 0) + 1
    shown = [
        f"{task}{f' x{count}' if count > 1 else ''} {state}"
        for (task, state), count in sorted(active.items())
    ]
    return ", ".join(shown)


_SPINNER = "|/-\\"


class ProgressPrinter:
    """One updating line on a terminal; otherwise one plain line per change."""

    def __init__(self, out: IO[str], *, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.last = ""
        self.spin = 0

    def show(self, progress: Progress, elapsed: float) -> None:
        text = progress.text() or f"run {progress.run_state}"
        clock = f"{int(elapsed // 60)}:{int(elapsed % 60):02d}"
        if self.tty:
            self.spin += 1
            width = shutil.get_terminal_size((120, 20)).columns
            line = f"{_SPINNER[self.spin % len(_SPINNER)]} {clock} {progress.bar()} {text}"
            self.out.write("\r\x1b[K" + line[: width - 1])
            self.out.flush()
        elif text != self.last:
            self.out.write(f"[{clock}] {text}\n")
            self.out.flush()
        self.last = text

    def finish(self, progress: Progress, elapsed: float) -> None:
        clock = f"{int(elapsed // 60)}:{int(elapsed % 60):02d}"
        if self.tty:
            self.out.write("\r\x1b[K")
        text = progress.text()
        self.out.write(f"[{clock}] run {progress.run_state}{': ' + text if text else ''}\n")
        self.out.flush()


@dataclass
class RunResult:
    dag_id: str
    run_id: str
    state: str
    study_name: str | None
    task_instances: list[dict[str, Any]]


def watch_run(
    airflow: LocalAirflow,
    dag_id: str,
    run_id: str,
    *,
    storage_url: str,
    printer: ProgressPrinter,
    poll: float = 1.0,
) -> RunResult:
    """Show the run's progress until it ends; return its final state and task instances."""
    started = time.monotonic()
    progress = Progress()
    watcher: StudyWatcher | None = None
    study_name: str | None = None
    tis: list[dict[str, Any]] = []
    while True:
        airflow.check_alive()
        with contextlib.suppress(requests.RequestException, LocalAirflowError):
            progress.run_state = airflow.run_state(dag_id, run_id)
            tis = airflow.api.task_instances(dag_id, run_id)
            progress.tasks = _tasks_text(tis)
            if study_name is None and any(t["task_id"] == "start" and t["state"] == "success" for t in tis):
                study_name = _study_name(airflow, dag_id, run_id)
        if watcher is None and study_name is not None:
            with contextlib.suppress(Exception):  # not readable yet: try again on the next poll
                watcher = StudyWatcher(storage_url, study_name)
        if watcher is not None:
            with contextlib.suppress(Exception):  # a busy SQLite file: keep the last numbers
                watcher.update(progress)
        if progress.run_state in TERMINAL_RUN_STATES:
            progress.tasks = ""
            printer.finish(progress, time.monotonic() - started)
            return RunResult(dag_id, run_id, progress.run_state, study_name, tis)
        printer.show(progress, time.monotonic() - started)
        time.sleep(poll)


def _study_name(airflow: LocalAirflow, dag_id: str, run_id: str) -> str | None:
    """The Optuna study of the run: what its ``start`` task returned (XCom), else the name
    :func:`hpo_core.study.config.study_name_for` gives a run without a logical date."""
    response = airflow.api.call(
        "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/start/xcomEntries/return_value"
    )
    value: Any = response.json().get("value") if response.status_code < 400 else None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    if isinstance(value, dict) and value.get("study_name"):
        return str(value["study_name"])
    for path in sorted((airflow.settings.dags_folder / "studies").glob("*.y*ml")):
        with contextlib.suppress(StudySpecError):
            spec = load_spec(path)
            if spec.dag_id == dag_id:
                return study_name_for(spec, run_id)
    return None


def failure_report(airflow: LocalAirflow, result: RunResult, *, lines: int = 30) -> str:
    """Why the run failed: the failed tasks (control tasks before trial tasks) and the tail of
    each one's log."""
    failed = [t for t in result.task_instances if t.get("state") == "failed"]
    # Control tasks first (the first to fail is the cause, finalize says why the study failed),
    # then trial tasks, each in the order they started.
    failed.sort(key=lambda t: (".evaluate" in str(t["task_id"]), str(t.get("start_date") or "")))
    if not failed:
        return (
            f"The run {result.run_id} failed without a failed task (stopped, or past its dagrun_timeout); "
            f"see {airflow.settings.logs_dir / 'scheduler.log'}"
        )
    out = []
    for ti in failed[:3]:
        name = ti["task_id"] + (f"[{ti['map_index']}]" if int(ti.get("map_index", -1)) >= 0 else "")
        try:
            log_lines = airflow.api.task_log(ti)
        except (requests.RequestException, LocalAirflowError) as e:
            log_lines = [f"(log not readable: {e})"]
        out.append(f"--- {name} failed (attempt {ti.get('try_number')}); last {lines} log lines:")
        out.append("\n".join(_readable(log_lines)[-lines:]))
    if len(failed) > 3:
        out.append(f"... and {len(failed) - 3} more failed task(s)")
    out.append(f"Task logs: {airflow.settings.logs_dir}/dag_id={result.dag_id}/run_id={result.run_id}/")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Commands


def _urls(airflow: LocalAirflow, mlflow_url: str | None) -> str:
    lines = [
        f"Airflow UI  {airflow.settings.api_url}   (no login: every user is admin on this local instance)",
    ]
    if mlflow_url:
        lines.append(f"MLflow UI   {mlflow_url}")
    lines.append(f"Logs        {airflow.settings.logs_dir}/  (<component>.log, dag_id=…/run_id=… for tasks)")
    return "\n".join(lines)


def _wait_forever(airflow: LocalAirflow) -> None:
    while True:
        airflow.check_alive()
        time.sleep(1.0)


def _print_summary(study_name: str | None, dag_id: str) -> int:
    """``hpo summary … --check-model`` in this process (same output as the command)."""
    from hpo_core import cli

    args = ["summary", "--check-model"]
    args += ["--study", study_name] if study_name else ["--dag-id", dag_id]
    return cli.main(args)


def cmd_run(args: argparse.Namespace) -> int:
    """Start the local Airflow, run ``dag_id`` with ``conf``, show progress and the summary, stop."""
    conf = _trigger_conf(args.conf)
    if conf is None:
        return 2
    settings = LocalSettings.from_env()
    os.environ["HPO_HOME"] = str(settings.hpo_home)
    storage_url = Deployment.from_env().storage_url
    airflow = LocalAirflow(settings)
    timings = airflow.timings
    run_id: str | None = None
    code = 1
    with interrupts():
        try:
            _start_for(airflow, args.dag_id, keep_ui=args.keep_ui)
            run_id = airflow.trigger(args.dag_id, conf)
            timings.mark("triggered")
            _say_triggered(airflow, args.dag_id, run_id, conf, settings.logs_dir)
            result = watch_run(
                airflow, args.dag_id, run_id, storage_url=storage_url, printer=ProgressPrinter(sys.stdout)
            )
            timings.mark("run ended")
            if result.state != "success":
                print(failure_report(airflow, result), file=sys.stderr)
                print(f"The study run failed; logs are in {settings.logs_dir}", file=sys.stderr)
                code = 1
            else:
                code = _run_succeeded(airflow, result, args.dag_id, settings.logs_dir, keep_ui=args.keep_ui)
                timings.mark("summary")
            if args.keep_ui and not airflow.attached:
                _keep_ui_up(airflow)
        except Interrupted as e:
            with shielded():
                code = _interrupted(airflow, args.dag_id, run_id, e, code)
        except LocalAirflowError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            code = 1
        finally:
            with shielded():
                if airflow.components:
                    print("Stopping the local Airflow ...", file=sys.stderr, flush=True)
                airflow.stop()
                timings.mark("stopped")
    if "run ended" in timings.marks and not args.keep_ui:
        airflow.say(_timings_text(timings))
    return code


def _trigger_conf(text: str) -> dict[str, Any] | None:
    """The trigger conf given on the command line (``{}`` when none); ``None`` after saying why it is bad."""
    try:
        conf = json.loads(text) if text else {}
    except ValueError as e:
        print(f"error: the trigger conf is not JSON: {e}", file=sys.stderr)
        return None
    if not isinstance(conf, dict):
        print("error: the trigger conf must be a JSON object", file=sys.stderr)
        return None
    return conf


def _start_for(airflow: LocalAirflow, dag_id: str, *, keep_ui: bool) -> None:
    """Start the instance (or attach to the one running) and wait until it has parsed ``dag_id``."""
    since = time.time()
    airflow.start(mode="ui" if keep_ui else "run")
    if airflow.attached:
        since = time.time()
        with contextlib.suppress(Exception):
            dag = airflow.api.dag(dag_id)
            if dag:
                airflow.request_parse(dag)
    if not airflow.attached:
        airflow.note_unfinished_runs()
    airflow.wait_for_dag(dag_id, since=since)
    airflow.timings.mark("dag parsed")


def _say_triggered(
    airflow: LocalAirflow, dag_id: str, run_id: str, conf: Mapping[str, Any], logs_dir: Path
) -> None:
    """Say that the instance is ready and the run triggered, with its UI page and its logs folder."""
    airflow.say(
        f"Airflow ready in {airflow.timings.marks['dag parsed']:.1f}s; triggered {dag_id} run {run_id}"
        + (f" with conf {json.dumps(conf)}" if conf else "")
        + f"\n  UI: {airflow.settings.api_url}/dags/{dag_id}/runs/{quote(run_id, safe='')}"
        + f"  logs: {logs_dir}/"
    )


def _run_succeeded(
    airflow: LocalAirflow, result: RunResult, dag_id: str, logs_dir: Path, *, keep_ui: bool
) -> int:
    """Point at failed trial tasks, then print the study's summary; return the summary's exit code."""
    red = [t for t in result.task_instances if t.get("state") == "failed"]
    if red:
        airflow.say(f"{len(red)} trial task(s) failed; see the grid or {logs_dir}/")
    if not keep_ui and not airflow.attached:
        # Stop the components while the summary loads MLflow (both take seconds).
        terminate_all([c for c in airflow.components.values() if c.name not in STOPPED_LAST])
    return _print_summary(result.study_name, dag_id)


def _keep_ui_up(airflow: LocalAirflow) -> None:
    """``run --keep-ui``: after the run, start the MLflow UI and keep both up until Ctrl-C."""
    airflow.say(_timings_text(airflow.timings))
    mlflow_url = airflow.start_mlflow_ui(int(os.environ.get(ENV_MLFLOW_PORT) or 5000))
    airflow.say(_urls(airflow, mlflow_url) + "\nPress Ctrl-C to stop.")
    _wait_forever(airflow)


def _interrupted(
    airflow: LocalAirflow, dag_id: str, run_id: str | None, error: Interrupted, code: int
) -> int:
    """Ctrl-C (or a signal): mark the run failed if it has not ended; return the exit code."""
    print(f"\nInterrupted ({error}).", file=sys.stderr)
    if run_id is not None and "run ended" not in airflow.timings.marks:
        with contextlib.suppress(Exception):
            if airflow.run_state(dag_id, run_id) not in TERMINAL_RUN_STATES:
                airflow.fail_run(dag_id, run_id)
                print(f"Marked run {run_id} failed.", file=sys.stderr)
    return 130 if "run ended" not in airflow.timings.marks else code


def _timings_text(timings: Timings) -> str:
    marks = timings.marks
    steps = [f"{name} {marks[name]:.1f}s" for name in ("db migrate", "api-server") if name in marks]
    text = f"Timings: Airflow start-up {marks['dag parsed']:.1f}s"
    text += f" ({', '.join(steps)}, DAG parsed {marks['dag parsed']:.1f}s)" if steps else ""
    text += f", trigger to run end {marks['run ended'] - marks['triggered']:.1f}s"
    if "summary" in marks:
        text += f", summary {marks['summary'] - marks['run ended']:.1f}s"
    if "stopped" in marks:
        text += f", whole command {marks['stopped']:.1f}s"
    return text


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the local Airflow and the MLflow UI on the same state; stop both on Ctrl-C."""
    settings = LocalSettings.from_env()
    airflow = LocalAirflow(settings)
    with interrupts():
        try:
            airflow.start(mode="ui")
            if airflow.attached:
                airflow.say("It is already running; stop that one first to restart it.")
                return 0
            mlflow_url = airflow.start_mlflow_ui(int(os.environ.get(ENV_MLFLOW_PORT) or 5000))
            airflow.wait_scheduler()
            airflow.say(_urls(airflow, mlflow_url) + "\nPress Ctrl-C to stop.")
            _wait_forever(airflow)
        except Interrupted:
            return 0
        except LocalAirflowError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            with shielded():
                if airflow.components:
                    print("\nStopping the local Airflow and the MLflow UI ...", file=sys.stderr, flush=True)
                airflow.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a study DAG on the local Airflow and print its result")
    run.add_argument("dag_id", nargs="?", default=DEFAULT_DAG_ID)
    run.add_argument("conf", nargs="?", default="", help="trigger conf as a JSON object")
    run.add_argument(
        "--keep-ui", action="store_true", help="keep Airflow up and start the MLflow UI after the run"
    )
    run.set_defaults(func=cmd_run)
    ui = sub.add_parser("ui", help="the Airflow and MLflow UIs on the local state, until Ctrl-C")
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # never die on a terminal that cannot show a character
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LocalAirflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
