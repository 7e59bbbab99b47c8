#!/usr/bin/env bash
# Installs the node modules of the web UI's browser tests (relay/ui/tests: playwright-core,
# which drives Debian's chromium and never downloads a browser) when they are missing or older
# than package-lock.json. Used by scripts/test-browser.sh and by the e2e browser scenario
# (e2e/tests/common/browser.rs), so scripts/deps.sh runs it before the cargo tests; after
# browser.sh, which installs node and npm. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../../relay/ui/tests"

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
fi
node -e 'console.log("playwright-core", require("playwright-core/package.json").version)'
