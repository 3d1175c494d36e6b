"""Static checks of docker/: checkov and hadolint are clean, and the manifests say what we intend.

``scripts/static_checks.sh`` installs the pinned tools into ``.venv-tools`` on its first run (about a
minute and a half), then takes seconds. The manifest tests read the YAML with ``yaml.safe_load_all``
and hold the properties that matter: RBAC exactly as KubernetesPodOperator needs it (checked against
the installed provider's source), nothing cluster-wide, placeholder-only credentials, a non-root
worker image without Airflow.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import airflow.providers.cncf.kubernetes as kubernetes_provider
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
NAMESPACE = "hpo-trials"
PLACEHOLDER = re.compile(r"\{CHANGE_ME[A-Z0-9_]*\}")

# What each CoreV1Api call of KubernetesPodOperator needs, as (resource, verb).
KPO_CALLS: dict[str, tuple[str, str] | None] = {
    "create_namespaced_pod": ("pods", "create"),
    "read_namespaced_pod": ("pods", "get"),
    "list_namespaced_pod": ("pods", "list"),
    "patch_namespaced_pod": ("pods", "patch"),
    "delete_namespaced_pod": ("pods", "delete"),
    "read_namespaced_pod_log": ("pods/log", "get"),
    "list_namespaced_event": ("events", "list"),
    # Only for do_xcom_push=True (the XCom sidecar) and Istio; trial pods use neither.
    "connect_get_namespaced_pod_exec": None,
}
EXPECTED_RULES = {
    ("", "pods"): {"create", "get", "list", "watch", "patch", "delete"},
    ("", "pods/log"): {"get"},
    ("", "events"): {"get", "list", "watch"},
}


def _documents(name: str) -> list[dict[str, Any]]:
    with (K8S / name).open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def _all_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) for doc in _documents(path.name)]


def _one(name: str, kind: str) -> dict[str, Any]:
    matching = [doc for doc in _documents(name) if doc["kind"] == kind]
    assert len(matching) == 1, f"{name}: expected one {kind}, found {len(matching)}"
    return matching[0]


def _requirements(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.relative_to(ROOT)}: {line!r} is not pinned with =="
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


# --------------------------------------------------------------------------------- the tools


@pytest.mark.slow
def test_checkov_and_hadolint_report_no_failed_checks() -> None:
    if shutil.which("bash") is None or shutil.which("flock") is None:
        pytest.fail("scripts/static_checks.sh needs bash and flock (util-linux)")
    try:
        run = subprocess.run(
            ["bash", str(ROOT / "scripts" / "static_checks.sh")],
            check=False,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"scripts/static_checks.sh did not finish in 300 s (tool install?):\n{e.stdout}\n{e.stderr}"
        )
    output = f"{run.stdout}\n{run.stderr}"
    if run.returncode != 0:
        pytest.fail(f"scripts/static_checks.sh failed (exit {run.returncode}):\n{output}", pytrace=False)
    assert "Failed checks: 0" in output, output
    assert re.search(r"hadolint: \d+ Dockerfiles clean", output), output


# ----------------------------------------------------------------------------------- manifests


def test_every_manifest_parses_and_lives_in_the_trial_namespace() -> None:
    documents = _all_documents()
    assert {name for name, _ in documents} >= {
        "namespace.yaml",
        "serviceaccount.yaml",
        "rbac.yaml",
        "secret.example.yaml",
        "resourcequota.yaml",
        "limitrange.yaml",
        "networkpolicy.yaml",
        "pod-template.example.yaml",
    }
    for name, doc in documents:
        assert doc.get("apiVersion") and doc.get("kind"), f"{name}: apiVersion and kind are required"
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE, name
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{name}: {doc['kind']} outside {NAMESPACE}"


def test_nothing_cluster_wide_but_the_namespace_itself() -> None:
    cluster_scoped = {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "PersistentVolume",
        "StorageClass",
        "CustomResourceDefinition",
        "PriorityClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "Node",
    }
    found = [
        (name, doc["kind"], doc["metadata"]["name"])
        for name, doc in _all_documents()
        if doc["kind"] in cluster_scoped
    ]
    assert found == [("namespace.yaml", "Namespace", NAMESPACE)]


def test_namespace_enforces_the_restricted_pod_security_profile() -> None:
    labels = _one("namespace.yaml", "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_rbac_grants_exactly_what_the_pod_operator_needs() -> None:
    role = _one("rbac.yaml", "Role")
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert not rule.get("resourceNames"), "no per-name rules: pod names are generated"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    assert rules == EXPECTED_RULES

    binding = _one("rbac.yaml", "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "airflow-pod-launcher", "namespace": NAMESPACE}
    ]


def test_rbac_covers_every_api_call_in_the_installed_operator_source() -> None:
    package = Path(kubernetes_provider.__file__).parent
    sources = [
        package / "operators" / "pod.py",
        package / "utils" / "pod_manager.py",
        package / "triggers" / "pod.py",
    ]
    called = set()
    for source in sources:
        called |= set(
            re.findall(
                r"\.((?:read|list|create|delete|patch|replace|connect_get)_namespaced_\w+)\(",
                source.read_text(),
            )
        )
        called |= set(re.findall(r"(connect_get_namespaced_pod_exec)", source.read_text()))
    unknown = called - set(KPO_CALLS)
    assert not unknown, (
        f"the operator now calls {sorted(unknown)}: map them in KPO_CALLS and docker/k8s/rbac.yaml"
    )
    for call in sorted(called):
        needed = KPO_CALLS[call]
        if needed is not None:
            resource, verb = needed
            assert verb in EXPECTED_RULES[("", resource)], f"{call} needs {verb} on {resource}"


def test_service_accounts_mount_no_token() -> None:
    accounts = {doc["metadata"]["name"]: doc for doc in _documents("serviceaccount.yaml")}
    assert set(accounts) == {"hpo-trial", "airflow-pod-launcher"}
    assert all(account["automountServiceAccountToken"] is False for account in accounts.values())


def test_secret_example_holds_placeholders_only() -> None:
    secret = _one("secret.example.yaml", "Secret")
    assert secret["metadata"]["name"] == "hpo-trial-credentials"
    assert "data" not in secret, "base64 data could hide a real value; use stringData placeholders"
    values = secret["stringData"]
    assert set(values) == {
        "HPO_STORAGE_URL",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert PLACEHOLDER.fullmatch(values[key]), f"{key} must be a {{CHANGE_ME_...}} placeholder"
    assert PLACEHOLDER.search(values["MLFLOW_S3_ENDPOINT_URL"])
    credentials = re.match(r"^[\w+]+://(?P<user>[^:@]+):(?P<password>[^@]+)@", values["HPO_STORAGE_URL"])
    assert credentials is not None
    assert PLACEHOLDER.fullmatch(credentials["user"]) and PLACEHOLDER.fullmatch(credentials["password"])
    assert "@" not in values["MLFLOW_TRACKING_URI"], "no credentials in the tracking URI"


def test_quota_covers_gpus_and_limit_range_sets_defaults() -> None:
    hard = _one("resourcequota.yaml", "ResourceQuota")["spec"]["hard"]
    assert {
        "pods",
        "requests.cpu",
        "requests.memory",
        "limits.cpu",
        "limits.memory",
        "requests.nvidia.com/gpu",
    } <= set(hard)
    (limits,) = _one("limitrange.yaml", "LimitRange")["spec"]["limits"]
    assert limits["type"] == "Container"
    assert {"cpu", "memory"} <= set(limits["default"]) and {"cpu", "memory"} <= set(limits["defaultRequest"])


def test_network_policy_denies_by_default_and_allows_only_dns_postgres_mlflow_s3() -> None:
    policies = {doc["metadata"]["name"]: doc["spec"] for doc in _documents("networkpolicy.yaml")}
    deny = policies.pop("hpo-trials-default-deny")
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    (allow,) = policies.values()
    assert allow["policyTypes"] == ["Egress"] and "ingress" not in allow
    ports = sorted({(p["protocol"], p["port"]) for rule in allow["egress"] for p in rule["ports"]})
    assert ports == [("TCP", 53), ("TCP", 443), ("TCP", 5000), ("TCP", 5432), ("UDP", 53)]
    for rule in allow["egress"]:
        for peer in rule["to"]:
            assert peer.get("ipBlock", {}).get("cidr") != "0.0.0.0/0"


def test_pod_template_meets_the_restricted_profile() -> None:
    pod = _one("pod-template.example.yaml", "Pod")
    spec = pod["spec"]
    assert spec["serviceAccountName"] == "hpo-trial" and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (base,) = spec["containers"]
    assert base["name"] == "base", "KubernetesPodOperator merges into the container named base"
    context = base["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
    assert context["readOnlyRootFilesystem"] is True
    assert {"mountPath": "/tmp", "name": "scratch"} in base["volumeMounts"]
    assert {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}} in spec["volumes"]
    assert base["envFrom"] == [{"secretRef": {"name": "hpo-trial-credentials"}}]


# ---------------------------------------------------------------------------------- Dockerfiles


def test_worker_image_is_non_root_without_airflow() -> None:
    instructions = _instructions(DOCKER / "worker" / "Dockerfile")
    (base,) = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    user = [rest for keyword, rest in instructions if keyword == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"USER {user}: a fixed non-root UID"
    assert ("ENTRYPOINT", '["python", "-m", "hpo_core.worker"]') in instructions
    assert ("WORKDIR", "/app") in instructions
    assert ("HEALTHCHECK", "NONE") in instructions
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env

    requirements = _requirements(DOCKER / "worker" / "requirements.txt")
    assert not [name for name in requirements if "airflow" in name]
    assert {
        "optuna",
        "mlflow-skinny",
        "scikit-learn",
        "psycopg2-binary",
        "boto3",
        "pydantic",
        "pyyaml",
    } <= set(requirements)


def test_airflow_image_builds_on_airflow_332_and_stays_on_the_airflow_user() -> None:
    instructions = _instructions(DOCKER / "airflow" / "Dockerfile")
    assert [rest for keyword, rest in instructions if keyword == "FROM"] == [
        "apache/airflow:3.3.2-python3.11"
    ]
    assert [rest for keyword, rest in instructions if keyword == "USER"][-1] == "50000:0", (
        "the image's airflow user"
    )
    copies = [rest for keyword, rest in instructions if keyword == "COPY"]
    for source in ("hpo_core", "plugins", "dags"):
        assert any(c.startswith(f"{source} ") for c in copies), f"{source}/ is not copied"
    run = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert '"apache-airflow==3.3.2"' in run and "-c /tmp/hpo-build/constraints.txt" in run


@pytest.mark.parametrize("image", ["worker", "airflow"])
def test_image_requirements_match_the_constraints(image: str) -> None:
    constraints = _requirements(ROOT / "constraints.txt")
    for name, version in _requirements(DOCKER / image / "requirements.txt").items():
        assert constraints.get(name) == version, (
            f"docker/{image}/requirements.txt: {name}=={version} vs constraints.txt"
        )
