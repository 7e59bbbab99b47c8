#!/usr/bin/env bash
# Browser tests of the web UI (relay/ui/tests): Debian's chromium, headless, driven by
# playwright-core from the npm registry (it never downloads a browser), against a real
# redis-server, the real agentrun-relay, agents run by agentrun-sidecar and agentrun-archiver.
#
# Needs what scripts/deps/browser.sh installs (chromium, node >= 20, npm, redis-server).
# Screenshots of the pages the tests saw land in relay/ui/tests/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -p agentrun-relay -p agentrun-sidecar -p agentrun-archiver

scripts/deps/ui-node-modules.sh
cd relay/ui/tests
# One file at a time: each starts its own Redis, relay and browser, and the machine is small.
# Every wait in the tests has its own deadline; the outer timeout is only a last resort so that a
# wedged browser can never hold CI until its own limit.
exec timeout --kill-after=30 1800 node --test --test-concurrency=1 --test-timeout=300000 --test-force-exit "$@" ./*.test.mjs
