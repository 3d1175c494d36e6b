"""A trial's objective in a child forked from the slot process: its crash, hang or kill ends only it.

The child relays what it prints and logs line by line to the slot (the task log) and sends its
result back once; the slot closes the trial whatever the child did (:mod:`hpo_core.worker._slot`).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import select
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from optuna.trial import TrialState
from sqlalchemy import event, exc
from sqlalchemy.pool import Pool

from hpo_core.stack_warnings import silence_stack_warnings

__all__ = [
    "CHILD_KILL_GRACE",
    "LOG_FORMAT",
    "Child",
    "Evaluation",
    "TrialTerminated",
    "TrialTimeout",
    "import_quietly",
    "install_fork_guard",
    "terminate_on_sigterm",
    "time_limit",
]

log = logging.getLogger("hpo_core.worker")


class TrialTimeout(BaseException):
    """The objective ran past the trial's execution timeout."""


class TrialTerminated(BaseException):
    """The worker was asked to stop (SIGTERM from Airflow or Kubernetes)."""


@dataclass
class Evaluation:
    """What the forked child reports about one objective call."""

    state: str = TrialState.FAIL.name
    values: list[float] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    error_text: str | None = None
    model_uri: str | None = None
    lineage: dict[str, str] = field(default_factory=dict)
    #: What the trial's MLflow run missed because MLflow failed during the objective (metrics, tags).
    tracking_missing: str | None = None
    #: Modules the trial imported that this slot process has not: imported here before the next
    #: trial's fork, so only the slot's first trial pays for the objective's lazy imports.
    new_modules: list[str] = field(default_factory=list)


#: Seconds a trial's child may run past the trial timeout (its own SIGALRM) before it is killed.
CHILD_KILL_GRACE = 30.0
#: Seconds a child gets to record why it stops after SIGTERM, before SIGKILL.
CHILD_TERM_GRACE = 10.0
_CHILD_CRASH = 70
_PR_SET_PDEATHSIG = 1


class Child:
    """A forked child evaluating one trial; its output is relayed line by line, its result read once."""

    def __init__(self, pid: int, log_fd: int, result_fd: int) -> None:
        self.pid, self.log_fd, self.result_fd = pid, log_fd, result_fd
        self._pending = b""
        self._result = bytearray()
        self._status: int | None = None

    @classmethod
    def fork(cls, body: Callable[[], Evaluation]) -> Child:
        log_r, log_w = os.pipe()
        result_r, result_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = _CHILD_CRASH
            try:
                os.close(log_r)
                os.close(result_r)
                _become_trial_process(log_w, parent)
                evaluation = body()
                code = 0
            except BaseException as e:  # outside the objective: setting the trial up failed
                details = traceback.format_exc()
                evaluation = Evaluation(
                    reason=f"worker error before the objective ran: {type(e).__name__}: {e}",
                    error_text=details,
                )
                with contextlib.suppress(BaseException):
                    sys.stderr.write(details)
            try:
                _write_all(result_w, json.dumps(asdict(evaluation), default=str).encode())
            except BaseException:
                code = _CHILD_CRASH
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(log_w)
        os.close(result_w)
        return cls(pid, log_r, result_r)

    def _pump(self, relay: Callable[[str], None], wait: float) -> bool:
        """Read what is there (up to ``wait`` seconds); return whether both pipes reached EOF."""
        fds = [fd for fd in (self.log_fd, self.result_fd) if fd >= 0]
        if not fds:
            return True
        ready, _, _ = select.select(fds, [], [], wait)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if fd == self.log_fd:
                if not chunk:
                    os.close(self.log_fd)
                    self.log_fd = -1
                    if self._pending:
                        relay(self._pending.decode(errors="replace"))
                        self._pending = b""
                    continue
                self._pending += chunk
                *lines, self._pending = self._pending.split(b"\n")
                for line in lines:
                    relay(line.decode(errors="replace"))
            elif not chunk:
                os.close(self.result_fd)
                self.result_fd = -1
            else:
                self._result += chunk
        return self.log_fd < 0 and self.result_fd < 0

    def _reap(self) -> bool:
        if self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                return False
            self._status = status
        return True

    def wait(
        self, *, relay: Callable[[str], None], hard_limit: float | None, timeout: float | None
    ) -> Evaluation:
        """Relay the child's output until it exits; kill it past ``hard_limit`` seconds."""
        deadline = time.monotonic() + hard_limit if hard_limit else None
        killed = False
        while True:
            done = self._pump(relay, 0.5)
            if done and self._status is None:
                time.sleep(0.002)  # both pipes closed: the child is exiting, do not spin
            if self._reap():
                # A process the objective started may still hold the pipes: take what is there.
                end = time.monotonic() + 2.0
                while not done and time.monotonic() < end:
                    done = self._pump(relay, 0.1)
                break
            if deadline is not None and not killed and time.monotonic() > deadline:
                log.error("trial process %d did not stop at its timeout: killing it", self.pid)
                self._signal(signal.SIGKILL)
                killed = True
        self._close()
        if killed and not self._result:
            return Evaluation(
                reason=f"timeout: the objective ran longer than {timeout or 0:.0f}s and did not stop; killed"
            )
        return self._evaluation()

    def terminate(self, *, relay: Callable[[str], None]) -> Evaluation | None:
        """Ask the child to stop (it records why), then kill it; its evaluation if it gave one."""
        if self._status is None:
            self._signal(signal.SIGTERM)
            end = time.monotonic() + CHILD_TERM_GRACE
            while not self._reap() and time.monotonic() < end:
                self._pump(relay, 0.2)
            if not self._reap():
                self._signal(signal.SIGKILL)
                os.waitpid(self.pid, 0)
                self._status = -1
        with contextlib.suppress(OSError):
            self._pump(relay, 0.1)
        self._close()
        return self._evaluation() if self._result else None

    def ask_to_stop(self) -> None:
        """SIGTERM to the child: it stops the objective and reports ``terminated``."""
        if self._status is None:
            self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)  # the child leads its own session: its helpers go too

    def _close(self) -> None:
        for name in ("log_fd", "result_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def _evaluation(self) -> Evaluation:
        if self._result:
            try:
                return Evaluation(**json.loads(bytes(self._result)))
            except (ValueError, TypeError) as e:
                return Evaluation(reason=f"the trial's process sent an unreadable result ({e})")
        return Evaluation(reason=_exit_reason(self._status))


def _exit_reason(status: int | None) -> str:
    """Why a trial's process ended without a result, from its wait status."""
    if status is not None and status >= 0 and os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        hint = " (out of memory, or killed from outside)" if signum == signal.SIGKILL else ""
        return f"killed: the trial's process was killed by {name} before it reported a result{hint}"
    code = os.WEXITSTATUS(status) if status is not None and status >= 0 else None
    if code == _CHILD_CRASH:
        return "crashed: the trial's process failed outside the objective; see the traceback above"
    return f"exited: the trial's process exited with code {code} without reporting a result"


def _become_trial_process(log_fd: int, parent: int) -> None:
    """Set up a freshly forked child: own session, dies with its parent, output to the relay pipe."""
    os.setsid()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(_CHILD_CRASH)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr, force=True)
    # The trial's log carries the objective's lines, not the stack's deprecation notices.
    silence_stack_warnings()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.close(fd)


_FORK_OWNER = os.getpid()
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def install_fork_guard() -> None:
    """Never share a pooled database connection across fork (SQLAlchemy's documented recipe).

    A connection checked out in a process other than the one that opened it is dropped from that
    process's pool without being closed (the other process still uses it), and a new one opened.
    """
    if not event.contains(Pool, "checkout", _checkout_in_own_process):
        event.listen(Pool, "connect", _remember_owner)
        event.listen(Pool, "checkout", _checkout_in_own_process)


def _remember_owner(dbapi_connection: Any, record: Any) -> None:
    record.info["hpo_pid"] = os.getpid()


def _checkout_in_own_process(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    owner = record.info.setdefault("hpo_pid", _FORK_OWNER)
    if owner != os.getpid():
        record.dbapi_connection = proxy.dbapi_connection = None
        raise exc.DisconnectionError(f"connection opened by process {owner}, not {os.getpid()}")


class time_limit:
    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        if self.seconds:
            signal.signal(signal.SIGALRM, self._raise)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise TrialTimeout()


class terminate_on_sigterm:
    def __enter__(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._raise)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise TrialTerminated()


def import_quietly(names: Sequence[str]) -> None:
    """Import modules a trial's process imported (in its order), so the next trial starts warm.

    A module that fails here is skipped: the next trial imports it itself, as before.
    """
    for name in names:
        if name in sys.modules or name.startswith("__"):
            continue
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(name)
