#!/usr/bin/env bash
# The browser tests drive Debian's chromium (headless, through the Playwright package from PyPI;
# never `playwright install`, which downloads a browser). Install it with apt-get when missing.
# Exit 0 when /usr/bin/chromium is there afterwards; otherwise say why and how, and exit 1.
set -uo pipefail
CHROMIUM="${HPO_CHROMIUM:-/usr/bin/chromium}"
[[ -x "$CHROMIUM" ]] && exit 0
if [[ "$CHROMIUM" == /usr/bin/chromium ]] && command -v apt-get >/dev/null 2>&1; then
  if [[ "$(id -u)" -eq 0 ]]; then SUDO=(); elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else SUDO=(none); fi
  if [[ "${SUDO[0]:-}" != none ]]; then
    echo "Installing Debian's chromium for the browser tests (apt-get, about a minute)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    if "${SUDO[@]}" apt-get update -qq >/dev/null && "${SUDO[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null; then
      [[ -x "$CHROMIUM" ]] && exit 0
    fi
  fi
fi
echo "error: no chromium at $CHROMIUM and it could not be installed here; the browser tests" \
     "(tests/test_hpo_view.py) will fail. Install it as root: apt-get install chromium chromium-driver" \
     "(or set HPO_CHROMIUM to a Chromium binary)." >&2
exit 1
