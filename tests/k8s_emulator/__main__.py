"""Run the emulator standalone: ``python -m tests.k8s_emulator --port 8001``, then use ``kubectl``."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading

from .emulator import KubernetesEmulator


def main() -> None:
    """Serve until interrupted, printing the kubeconfig path."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--namespace", default="hpo-trials")
    parser.add_argument("--workdir", default=None)
    options = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with KubernetesEmulator(
        namespace=options.namespace, port=options.port, workdir=options.workdir
    ) as emulator:
        print(f"k8s emulator at {emulator.url}; kubeconfig: {emulator.kubeconfig_path}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()
