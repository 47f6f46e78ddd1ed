#!/usr/bin/env bash
# A headless browser for tests/cli/test_ui.py (loads the MLflow UI that `kdbench ui` starts).
# Debian's `chromium` package; the test skips with a message when no browser binary exists.
# Usage: chromium.sh [start|stop]; it starts no process, so `stop` has nothing to do.
set -euo pipefail
[ "${1:-start}" = stop ] && exit 0
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
chromium --version
