"""Root pytest configuration: registers the fixture plugins that start real services."""

pytest_plugins: list[str] = [
    "tests.fixtures_services",
    "tests.fixtures_k8s",
]
