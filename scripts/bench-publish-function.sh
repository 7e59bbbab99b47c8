#!/usr/bin/env bash
# Redis CPU per call of the publish function (`agentrun_v1_publish`), one entry per call, as a
# sidecar publishing an agent's lines one by one calls it.
#
#   scripts/bench-publish-function.sh [REV ...]
#
# Measures the library of the working tree, then the one of each git REV given (to compare a
# change with what it replaces), ROUNDS times each, interleaved. Every measurement starts its
# own redis-server (persisted as the chart runs it: AOF, fsync every second) on a free loopback
# port, loads the library, has `redis-benchmark` (4 connections, 16 calls in flight each) make
# CALLS calls, each one entry of a new producer (so that none is a re-send), and prints the
# CPU Redis used per call (user + system, from /proc). Figures: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."

CALLS=${CALLS:-400000}
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d)
pid=""
cleanup() {
  if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

libs=("working tree")
cp protocol/src/agentrun.lua "$work/lib-0.lua"
i=1
for rev in "$@"; do
  git show "$rev:protocol/src/agentrun.lua" >"$work/lib-$i.lua"
  libs+=("$rev")
  i=$((i + 1))
done

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

measure() {
  local lib=$1 port dir
  port=$(free_port)
  dir=$(mktemp -d -p "$work")
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly yes \
    --appendfsync everysec --dir "$dir" --logfile "$dir/log" </dev/null >/dev/null 2>&1 &
  pid=$!
  local deadline=$((SECONDS + 10))
  until redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; do
    ((SECONDS < deadline)) || { echo "redis-server on $port did not start" >&2; exit 1; }
    sleep 0.05
  done
  redis-cli -p "$port" -x FUNCTION LOAD REPLACE <"$lib" >/dev/null
  redis-cli -p "$port" HSET 'run:{bench}:state' epoch 0123456789abcdef >/dev/null
  local before after
  before=$(cpu_ticks "$pid")
  redis-benchmark -p "$port" -n "$CALLS" -r 1000000000 -P 16 -c 4 -q \
    FCALL agentrun_v1_publish 3 'run:{bench}:output:a' 'run:{bench}:producers' \
    'run:{bench}:state' 'p-__rand_int__' 100000 PUBLISH fedcba9876543210 0 '' \
    1 1700000000000 output 'T@1700000000000000@ the next few tokens' '' >/dev/null
  after=$(cpu_ticks "$pid")
  # One field per producer (and one for the stream's top): each call appended an entry.
  local n
  n=$(redis-cli -p "$port" HLEN 'run:{bench}:producers')
  if ((n < CALLS * 99 / 100)); then
    echo "only $n of $CALLS calls appended an entry" >&2
    exit 1
  fi
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=""
  # Clock ticks are 10 ms: µs per call = ticks * 10,000 / calls.
  python3 -c "print(f'{($after - $before) * 10000 / $CALLS:.1f} µs')"
}

echo "Redis CPU µs per call of agentrun_v1_publish (one entry per call; $CALLS calls, $ROUNDS rounds)"
for ((r = 1; r <= ROUNDS; r++)); do
  for ((k = 0; k < ${#libs[@]}; k++)); do
    echo -n "round $r, ${libs[$k]}: "
    measure "$work/lib-$k.lua"
  done
done
