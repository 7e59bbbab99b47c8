#!/usr/bin/env bash
# Installs what the browser tests of the web UI need (scripts/test-browser.sh):
# Debian's chromium (headless) and Node.js with npm (for playwright-core, which drives the
# installed chromium and never downloads a browser of its own). Idempotent.
set -euo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# Fonts so that screenshots and layout are the same on every machine.
dpkg -s fonts-dejavu-core >/dev/null 2>&1 || need+=(fonts-dejavu-core)

if ((${#need[@]})); then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
    echo "browser tests need Node.js 20 or newer (found $(node --version))" >&2
    exit 1
fi
chromium --version
