# Sourced by the scripts in this folder: create .venv and install the pinned stack once.
# Re-installs only when requirements.txt, constraints.txt or pyproject.toml change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: Python 3.11 or newer is needed (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
STAMP="$VENV/.hpo-installed"
WANT="$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "Installing the pinned stack into .venv (under a minute the first time)..." >&2
  # uv installs the same pinned wheels as pip, ten times faster; pip is the fallback.
  UV_VERSION="$(sed -n 's/^uv==//p' constraints.txt)"
  if "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" 2>/dev/null \
     && "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" -r requirements.txt -c constraints.txt \
     && "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --no-deps -e .; then
    :
  else
    echo "uv was not usable: installing with pip (about two minutes)..." >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
  fi
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
