#!/usr/bin/env bash
# One-command demo on a laptop, no Kubernetes: makes sure a Redis is running (installs and
# starts one on 127.0.0.1:6379 if needed), builds the sidecar and the relay, starts the relay
# on http://127.0.0.1:8080, and runs a sample agent through `agentrun-sidecar run` so you can
# watch its output stream into the browser. Then shows how to read the same data with redis-cli.
#
#   scripts/demo.sh                 run the demo
#   RELAY_PORT=9000 scripts/demo.sh another port
#   DEMO_KEEP=0 scripts/demo.sh     stop the relay when the agent is done
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_PORT="${REDIS_PORT:-6379}"
RELAY_PORT="${RELAY_PORT:-8080}"
REDIS_URL="redis://127.0.0.1:${REDIS_PORT}"

bash scripts/deps/redis.sh >/dev/null
if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    echo "==> starting redis-server on 127.0.0.1:${REDIS_PORT}"
    dir="$(mktemp -d)"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --dir "$dir" \
        --save '' --appendonly yes --logfile "$dir/redis.log"
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

echo "==> building agentrun-sidecar, agentrun-relay and kubectl-agentrun"
cargo build -q -p agentrun-sidecar -p agentrun-relay -p kubectl-agentrun
bin="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/debug"

echo "==> starting agentrun-relay on http://127.0.0.1:${RELAY_PORT}"
"$bin/agentrun-relay" --redis-url "$REDIS_URL" --listen "127.0.0.1:${RELAY_PORT}" &
relay=$!
trap 'kill $relay 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:${RELAY_PORT}/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done

run="demo-$(date +%s)"
echo
echo "    Watch it live: http://127.0.0.1:${RELAY_PORT}/runs/${run}"
echo
echo "==> running a sample agent as run ${run}"
code=0
TOKEN_DELAY="${TOKEN_DELAY:-0.15}" "$bin/agentrun-sidecar" run --redis-url "$REDIS_URL" \
    --run-id "$run" --variation default -- scripts/sample-agent.sh || code=$?
echo
echo "==> the agent exited with code ${code}; what Redis holds for the run:"
echo "\$ redis-cli XRANGE 'run:{${run}}:output:default' - + COUNT 3"
redis-cli -p "$REDIS_PORT" XRANGE "run:{${run}}:output:default" - + COUNT 3
echo "\$ redis-cli HGETALL 'run:{${run}}:state'"
redis-cli -p "$REDIS_PORT" HGETALL "run:{${run}}:state"
echo
echo "Follow a run from a terminal: SUBSCRIBE 'run:{${run}}:output:default' in redis-cli,"
echo "or with the kubectl plugin: AGENTRUN_RELAY_URL=http://127.0.0.1:${RELAY_PORT} $bin/kubectl-agentrun logs ${run}"
if [ "${DEMO_KEEP:-1}" = 1 ] && [ -t 0 ]; then
    echo
    echo "The relay keeps serving http://127.0.0.1:${RELAY_PORT}/runs/${run} — press Ctrl-C to stop."
    wait "$relay"
fi
