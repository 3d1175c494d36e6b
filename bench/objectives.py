"""Objectives of the orchestration benchmark: sleep a fixed time and record when they ran.

Each evaluation writes one small JSON file into ``$HPO_BENCH_TIMING_DIR`` with the process start
time, the objective's start and end (epoch seconds) and the process id, so every contender's slot
usage is derived from the same kind of record.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_SECONDS = "HPO_BENCH_TRIAL_SECONDS"
ENV_TIMING_DIR = "HPO_BENCH_TIMING_DIR"


def _process_start() -> float | None:
    """Epoch time at which this process started, to ~10 ms (psutil's rounds boot time to 1 s)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started_since_boot)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def quadratic(params: Mapping[str, Any]) -> float:
    """A cheap value so that the samplers have something to optimise."""
    return float(sum((float(v) - 0.3) ** 2 for v in params.values() if isinstance(v, int | float)))


def timed_sleep(params: Mapping[str, Any], *, trial: int | None = None, contender: str = "") -> float:
    """Sleep ``$HPO_BENCH_TRIAL_SECONDS`` and record the interval; return :func:`quadratic`."""
    seconds = float(os.environ.get(ENV_SECONDS, "5"))
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    folder = os.environ.get(ENV_TIMING_DIR)
    if folder:
        record = {
            "contender": contender,
            "trial": trial,
            "pid": os.getpid(),
            "process_start": _process_start(),
            "start": start,
            "end": end,
        }
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{uuid.uuid4().hex}.json").write_text(json.dumps(record))
    return quadratic(params)


def sleep_objective(params: dict[str, Any], ctx: Any) -> float:
    """The study's objective (``bench.objectives:sleep_objective``) for the Airflow pipeline."""
    return timed_sleep(params, trial=int(ctx.number), contender=f"ours:{ctx.spec.name}")


def instant_objective(params: dict[str, Any], ctx: Any) -> float:
    """An objective that returns at once (the scale benchmark's 1,000-wide round)."""
    return quadratic(params)


def read_timings(folder: Path) -> list[dict[str, Any]]:
    """All records written by :func:`timed_sleep` into ``folder``."""
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
