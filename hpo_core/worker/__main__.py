"""``python -m hpo_core.worker``: evaluate one slot's trials (the command a trial pod runs).

Exit codes:

- 0: every trial of the slot finished (COMPLETE or PRUNED, now or before);
- 1: a trial failed (its objective raised, returned NaN, timed out, was killed): the trial is
  closed as FAIL with its reason and the slot's other trials ran;
- 2: usage or setup error (bad arguments, the study or its storage cannot be loaded): no trial ran;
- 3: the worker itself crashed (an unexpected error in the worker, not in a trial): the traceback
  is in the log; trials it had started stay RUNNING until a retry takes them over or ``observe``
  closes them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import optuna

from hpo_core.deployment import Deployment
from hpo_core.errors import HpoError
from hpo_core.worker._child import LOG_FORMAT
from hpo_core.worker._slot import run_slot

__all__ = ["EXIT_CRASH", "EXIT_OK", "EXIT_SETUP", "EXIT_TRIAL_FAILED", "RESULT_PREFIX", "main"]

log = logging.getLogger("hpo_core.worker")

#: Prefix of the line each trial's outcome is printed on (JSON), for the task log and callers.
RESULT_PREFIX = "HPO_RESULT "
EXIT_OK, EXIT_TRIAL_FAILED, EXIT_SETUP, EXIT_CRASH = 0, 1, 2, 3


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hpo_core.worker", description="Evaluate one slot's trials, in order."
    )
    parser.add_argument("--study-name", required=True, help="Optuna study name")
    parser.add_argument(
        "--trial-number",
        required=True,
        type=int,
        action="append",
        dest="trial_numbers",
        help="trial number chosen by suggest; repeat it for a slot of several trials (run in order)",
    )
    parser.add_argument("--attempt", type=int, default=1, help="Airflow try number of this attempt")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds before a trial FAILs (timeout), per trial"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = _parse_args(argv)
    try:
        outcomes = run_slot(
            deployment=Deployment.from_env(),
            study_name=args.study_name,
            trial_numbers=args.trial_numbers,
            attempt=args.attempt,
            timeout=args.timeout,
        )
    except HpoError as e:
        log.error("cannot run trials %s: %s", args.trial_numbers, e)
        return EXIT_SETUP
    except Exception:  # a bug or a broken environment: not "the trial failed"
        log.exception("the worker crashed while running trials %s", args.trial_numbers)
        return EXIT_CRASH
    for outcome in outcomes:
        print(RESULT_PREFIX + outcome.to_json(), flush=True)
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        log.error("trial %d %s: %s", outcome.trial_number, outcome.state, outcome.reason)
    if any(o.state == "ERROR" for o in failed):
        return EXIT_SETUP
    return EXIT_TRIAL_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
