#!/usr/bin/env bash
# Run the benchmarks: bench/run.sh [all|orchestration|sample|scale|report DIR] [--quick] [--out DIR] [--publish]
#   all            orchestration, sample and scale, then a summary (default)
#   --quick        fewer trials, seeds and sizes (a smoke test of a few minutes)
#   --out DIR      output folder (default bench/out/<timestamp>)
#   --publish      write the figures of the benchmarks run into bench/README.md (between the results
#                  markers; other benchmarks keep their section) and bench/results/<name>.json
# Creates .venv (the pinned project stack, as scripts/ do) on first use, and .venv-bench (the contenders:
# bench/requirements.txt on top of constraints.txt) only for the benchmarks that need it (sample, all);
# .venv only ever gets the project's pins.
set -euo pipefail
source "$(dirname "$0")/../scripts/_bootstrap.sh"   # sets ROOT, cd "$ROOT", installs .venv once
WHAT="all"; QUICK=(); OUT=""; PUBLISH=()
while [ $# -gt 0 ]; do
  case "$1" in
    all|orchestration|sample|scale) WHAT="$1" ;;
    report) WHAT="report"; OUT="$2"; shift ;;
    --quick) QUICK=(--quick) ;;
    --out) OUT="$2"; shift ;;
    --publish) PUBLISH=(--publish "$ROOT/bench/README.md") ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see bench/run.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
BENCH_VENV="$ROOT/.venv-bench"
BENCH_STAMP="$BENCH_VENV/.bench-installed"
BENCH_WANT="$(cat bench/requirements.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
case "$WHAT" in sample|all) NEED_BENCH_VENV=1 ;; *) NEED_BENCH_VENV=0 ;; esac
if [ "$NEED_BENCH_VENV" = 1 ] && [ "$(cat "$BENCH_STAMP" 2>/dev/null)" != "$BENCH_WANT" ]; then
  echo "Installing the benchmark contenders into .venv-bench (a few minutes the first time)..." >&2
  [ -x "$BENCH_VENV/bin/python" ] || "$ROOT/.venv/bin/python" -m venv "$BENCH_VENV"
  "$BENCH_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt -c constraints.txt
  "$BENCH_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$BENCH_WANT" > "$BENCH_STAMP"
fi
OUT="${OUT:-$ROOT/bench/out/$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"   # absolute: the benchmarks put database files and URLs under it
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
run() { echo "== $1 -> $OUT/$1" >&2; "$2" -m "bench.$1" "${QUICK[@]}" --out "$OUT"; }
case "$WHAT" in
  orchestration) run orchestration "$ROOT/.venv/bin/python" ;;
  sample) run sample "$BENCH_VENV/bin/python" ;;
  scale) run scale "$ROOT/.venv/bin/python" ;;
  all)
    run orchestration "$ROOT/.venv/bin/python"
    run sample "$BENCH_VENV/bin/python"
    run scale "$ROOT/.venv/bin/python"
    ;;
esac
"$ROOT/.venv/bin/python" -m bench.report "$OUT" "${PUBLISH[@]}"
