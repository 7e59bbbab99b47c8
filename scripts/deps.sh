#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine: runs each scripts/deps/*.sh
# (each is idempotent and installs only what is missing).
set -euo pipefail
cd "$(dirname "$0")"
for script in deps/*.sh; do
    echo "==> $script"
    bash "$script"
done
