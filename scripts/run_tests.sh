#!/usr/bin/env bash
# The whole test suite: lint, types, and pytest (which starts the real services it needs).
# Extra arguments go to pytest, e.g. scripts/run_tests.sh -k spec
set -euo pipefail
source "$(dirname "$0")/_bootstrap.sh"
echo "== ruff"; ruff check .
echo "== mypy"; mypy
# Debian's chromium for the browser tests; without it they fail with the same message, never skip.
"$(dirname "$0")/ensure_chromium.sh" || true
# Every shipped study passes what the DAG factory and start check, with its code imported (a
# throwaway AIRFLOW_HOME: Airflow writes its default config where it is imported).
echo "== hpo validate"; AIRFLOW_HOME="$(mktemp -d)" hpo validate --check-imports dags/studies/*.yaml
# Two processes (pytest-xdist): the modules on the shared Airflow are one unit of work, sent first,
# while the other process runs the other modules (tests/fixtures_services.py); HPO_TEST_PROCESSES=1:
# one process.
PROCESSES="${HPO_TEST_PROCESSES:-2}"
if [ "$PROCESSES" -gt 1 ]; then
  PARALLEL=(-n "$PROCESSES" --no-loadscope-reorder)  # units: tests/fixtures_services.py
else
  PARALLEL=(-n 0)
fi
echo "== pytest"; exec python -m pytest "${PARALLEL[@]}" "$@"
