#!/usr/bin/env bash
# Where the bytes per GPU go: loads $GPUS GPUs with examples/loadgen.rs (as scripts/bench.sh
# does: 4 regions, 8 types, every GPU with a score and memory) into its own redis-server, then
# prints used_memory per GPU and, per key family, the bytes MEMORY USAGE gives for every key of
# the family (SAMPLES 0: exact), divided by the number of GPUs, plus the keyspace's own
# overhead (the main and expires dicts, from MEMORY STATS).
#
#   scripts/memory.sh                  # GPUS=1000000
#   GPUS=100000 scripts/memory.sh
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

GPUS="${GPUS:-1000000}"
cargo build --release --quiet
cargo build --release --example loadgen --quiet
MODULE="$PWD/target/release/libgpucache.so"
. scripts/lib.sh
PORT="$(free_port)"
DIR="$(mktemp -d)"
cleanup() {
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
  --daemonize yes --logfile "$DIR/redis.log" \
  --loadmodule "$MODULE" AVAILABILITY_TTL 86400 PRICING_TTL 86400
for _ in $(seq 1 100); do
  redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
  sleep 0.05
done
cli() { redis-cli -p "$PORT" "$@"; }
used() { cli INFO memory | tr -d '\r' | awk -F: '$1 == "used_memory" { print $2 }'; }

before=$(used)
target/release/examples/loadgen load --port "$PORT" --gpus "$GPUS" --regions 4 --types 8 --connections 2 >/dev/null
after=$(used)
echo "GPUs: $GPUS; used_memory per GPU: $(( (after - before) / GPUS )) B"

# Every key's MEMORY USAGE (loadgen's names hold no spaces or quotes), summed per family: the
# entity part of the key name.
cli --scan --pattern 'gpucache:*' >"$DIR/keys"
awk '{ print "MEMORY USAGE " $0 " SAMPLES 0" }' "$DIR/keys" | cli >"$DIR/sizes"
printf "%-22s %10s %14s %10s\n" family keys bytes B/GPU
paste -d' ' "$DIR/keys" "$DIR/sizes" | awk -v n="$GPUS" '
  {
    name = $1; size = $2
    sub(/^gpucache:\{[^}]*\}:/, "", name)
    if (name ~ /^(index|stats):/) family = name
    else { split(name, parts, ":"); family = parts[1] }
    bytes[family] += size; keys[family]++
  }
  END {
    for (f in bytes) printf "%-22s %10d %14d %10.1f\n", f, keys[f], bytes[f], bytes[f] / n
  }' | sort -k4 -rn
cli MEMORY STATS | tr -d '\r' | awk -v n="$GPUS" '
  prev ~ /^overhead\.hashtable\.(main|expires)$/ { printf "%-22s %10s %14d %10.1f\n", "keyspace " substr(prev, 20), "", $0, $0 / n }
  { prev = $0 }'
