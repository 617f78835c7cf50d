#!/usr/bin/env bash
# Instruction counts per command: runs redis-server with the release module under
# `valgrind --tool=callgrind`, loads a marketplace with examples/loadgen.rs, then for each
# operation zeroes the counters, runs it (pipelined) and dumps a profile. Prints
# `<op> calls=<n> Ir=<instructions> Ir/call=<instructions per command>` per operation.
#
# Instruction counts hardly move with the load of other processes, unlike the wall-clock
# figures of scripts/bench.sh, so this is the tool for before/after comparisons of a change.
# The dumps (`<op>.cg`) stay in OUT for `callgrind_annotate --inclusive=yes OUT/<op>.cg`.
#
#   scripts/profile.sh                         # GPUS=2000 N=1000 OUT=target/profile
#   GPUS=10000 N=1000 MODULE=/path/to/libgpucache.so OUT=/tmp/before scripts/profile.sh
#
# Environment: GPUS (default 2000), N requests per op (default 1000; AVAILABLE runs a fifth),
# MODULE (default: build and use target/release/libgpucache.so), OUT (output directory).
# Needs valgrind (apt-get install valgrind). Counts include Redis's own work per command
# (parsing, replying); HSET and HGETALL are measured as floors.
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS="${GPUS:-2000}"
N="${N:-1000}"
OUT="${OUT:-$PWD/target/profile}"
if [ -z "${MODULE:-}" ]; then
  cargo build --release --quiet
  MODULE="$PWD/target/release/libgpucache.so"
fi
cargo build --release --example loadgen --quiet
LOADGEN="$PWD/target/release/examples/loadgen"
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT"
OUT="$(realpath "$OUT")"
cp "$MODULE" "$OUT/libgpucache.so"
. scripts/lib.sh
PORT="$(free_port)"

valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" --compress-strings=no \
  --compress-pos=no redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$OUT" --loadmodule "$OUT/libgpucache.so" AVAILABILITY_TTL 86400 PRICING_TTL 86400 \
  >"$OUT/server.log" 2>&1 &
VPID=$!
cli() { redis-cli -p "$PORT" "$@"; }
trap 'cli shutdown nosave >/dev/null 2>&1 || true; wait $VPID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do cli ping >/dev/null 2>&1 && break; sleep 0.2; done

"$LOADGEN" load --port "$PORT" --gpus "$GPUS" --regions 4 --types 8 --connections 1 >/dev/null
calls() {
  cli INFO commandstats | tr -d '\r' | awk -F'[:,=]' -v names="$*" '
    BEGIN { n = split(names, w, " "); for (i = 1; i <= n; i++) want["cmdstat_" w[i]] = 1 }
    ($1 in want) { c += $3 } END { print c + 0 }'
}
for spec in "get:gpucache.get" "status:gpucache.status" \
  "book_cancel:gpucache.book gpucache.cancel" "available:gpucache.available" \
  "orderbook:gpucache.orderbook" "hgetall:hgetall" "hset:hset"; do
  op=${spec%%:*}
  cmds=${spec#*:}
  n=$N
  [ "$op" = available ] && n=$((N / 5))
  cli CONFIG RESETSTAT >/dev/null
  callgrind_control -z "$VPID" >/dev/null 2>&1
  "$LOADGEN" run --port "$PORT" --op "$op" --requests "$n" --pipeline 16 --connections 1 \
    --gpus "$GPUS" --regions 4 --types 8 >/dev/null
  callgrind_control -d "$op" "$VPID" >/dev/null 2>&1
  c=$(calls $cmds)
  dump=$(ls -t "$OUT"/callgrind.out.* | head -1)
  mv "$dump" "$OUT/$op.cg"
  ir=$(awk '/^summary:/ { print $2; exit }' "$OUT/$op.cg")
  echo "$op calls=$c Ir=$ir Ir/call=$((ir / c))"
done
