#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing, then runs the Rust tests
# (real Redis servers, real binaries), the chart checks, and the browser tests.
#
#   scripts/test.sh            everything
#   scripts/test.sh --rust     only the cargo tests
set -euo pipefail
cd "$(dirname "$0")/.."

# Everything the tests use, the browser tests' node modules included: the e2e scenarios open a
# run's page in chromium with them during the cargo tests.
scripts/deps.sh

echo "==> cargo tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi
[ "${1:-}" = "--rust" ] && exit 0

if [ -x scripts/check-chart.sh ]; then
    echo "==> chart and manifests"
    scripts/check-chart.sh
fi

if [ -x scripts/test-browser.sh ]; then
    echo "==> browser tests"
    scripts/test-browser.sh
fi
