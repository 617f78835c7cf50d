#!/usr/bin/env bash
# Edge-cache benchmark: how fast a gpucache write reaches another process's L1, next to the
# floor of a plain HSET reaching a bare keyspace-notification subscriber, plus L1 hit speed.
#
# Builds the module and gpucache-edge in release mode, starts its own redis-server with the
# module on a free loopback port (no persistence), runs `gpucache-edge bench` (its follower is
# a second process holding an L1 of every benchmark GPU) and stops the server.
#
#   scripts/edge-bench.sh                      # 10,000 writes per series at 2,000/s
#   EVENTS=20000 RATE=5000 GPUS=5000 scripts/edge-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${EVENTS:-10000}"
RATE="${RATE:-2000}"
GPUS="${GPUS:-2000}"
HITS="${HITS:-2000000}"

scripts/deps.sh
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(redis-server --version | cut -d' ' -f3)"
cargo build --release --quiet -p gpucache -p gpucache-edge
. scripts/lib.sh
port="$(free_port)"
dir="$(mktemp -d)"
redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save "" --appendonly no \
  --loadmodule "$PWD/target/release/libgpucache.so" >"$dir/redis.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do redis-cli -p "$port" PING >/dev/null 2>&1 && break; sleep 0.05; done
target/release/gpucache-edge bench --url "redis://127.0.0.1:$port/" \
  --events "$EVENTS" --rate "$RATE" --gpus "$GPUS" --hits "$HITS"
