"""A test-only emulator of the Kubernetes core/v1 API whose pods run as local processes.

KubernetesPodOperator talks to it through a kubeconfig like to a real cluster; see
``tests/fixtures_k8s.py`` for the pytest fixtures and ``docker/README.md`` for how it is used.
"""

from __future__ import annotations

from ._cluster import FAULT_ANNOTATION, FAULT_KINDS, Fault
from ._http import ApiCall
from .emulator import EmulatorError, KubernetesEmulator

__all__ = ["FAULT_ANNOTATION", "FAULT_KINDS", "ApiCall", "EmulatorError", "Fault", "KubernetesEmulator"]
