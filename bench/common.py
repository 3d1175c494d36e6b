"""Shared helpers: output folders, machine facts, tables, JSON, plots and interval arithmetic.

Every benchmark reports ratios or comparisons measured in the same run, because absolute times on
a shared machine drift; the helpers here only format and store what the benchmarks measure.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "bench"
MAIN_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
BENCH_PYTHON = REPO_ROOT / ".venv-bench" / "bin" / "python"


def machine_info() -> dict[str, Any]:
    """What the figures ran on: cores, memory, CPU model, load, date, Python and git commit."""
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        info["memory_gib"] = round(mem_kb / 1024**2, 1)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        info["free_g"] = subprocess.run(["free", "-g"], capture_output=True, text=True, check=False).stdout
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        pass
    return info


def working_tree_changes(paths: Sequence[str]) -> list[str]:
    """``git status --short`` lines under ``paths``: what the run measured beyond its commit."""
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--short", "--", *paths],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return []
    return [line for line in result.stdout.splitlines() if line.strip()]


def output_dir(base: str | Path | None, name: str) -> Path:
    """``<base>/<name>`` (``base`` defaults to ``bench/out/<timestamp>``), created."""
    root = Path(base) if base else BENCH_DIR / "out" / time.strftime("%Y%m%d-%H%M%S")
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (non-JSON values as strings)."""
    path.write_text(json.dumps(data, indent=2, default=str, allow_nan=True) + "\n")


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` significant digits, None as a hyphen."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 10**digits or abs(value) < 10 ** -(digits - 1)):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (also readable printed to a terminal)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range (25th/75th percentiles) of ``values``."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return {"median": math.nan, "q25": math.nan, "q75": math.nan, "n": 0}
    if len(xs) == 1:
        return {"median": xs[0], "q25": xs[0], "q75": xs[0], "n": 1}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q25": q[0], "q75": q[2], "n": len(xs)}


def slot_utilisation(intervals: Sequence[tuple[float, float]], parallelism: int) -> dict[str, float]:
    """How busy ``parallelism`` slots were with the objective between the first start and last end.

    Returns the busy fraction and the mean idle gap between consecutive objectives on a slot
    (intervals assigned greedily to the slot that freed first).
    """
    if not intervals:
        return {"busy_fraction": math.nan, "mean_gap_s": math.nan}
    ordered = sorted(intervals)
    first, last = ordered[0][0], max(e for _, e in ordered)
    slots: list[float] = [first] * parallelism
    gaps: list[float] = []
    for start, end in ordered:
        i = min(range(parallelism), key=lambda k: slots[k])
        if slots[i] > first:
            gaps.append(max(0.0, start - slots[i]))
        slots[i] = max(slots[i], end)
    busy = sum(e - s for s, e in ordered)
    span = max(last - first, 1e-9)
    return {
        "busy_fraction": busy / (parallelism * span),
        "mean_gap_s": statistics.fmean(gaps) if gaps else 0.0,
    }


def run_python(
    python: Path,
    module: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600,
    log: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args`` from the repo root; its output goes to ``log`` if given."""
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [str(python), "-m", module, *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if log is not None:
        log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    return result


def savefig(fig: Any, path: Path) -> None:
    """Save and close a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log(msg: str) -> None:
    """Progress line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
