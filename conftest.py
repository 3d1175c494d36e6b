"""Root pytest configuration.

Airflow reads its configuration when first imported, so the test session's Airflow home is
set here, before any test module is collected. The fixture plugins start real services.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="hpo-test-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(_ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(_ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ.setdefault("HPO_HOME", str(_AIRFLOW_HOME / "hpo"))
for _var in ("HPO_STORAGE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
    os.environ.pop(_var, None)

pytest_plugins: list[str] = [
    "tests.fixtures_core",
    "tests.fixtures_services",
    "tests.fixtures_k8s",
]
