#!/usr/bin/env bash
# Instruction counts per command: runs redis-server with the release module under
# `valgrind --tool=callgrind`, loads a marketplace with examples/loadgen.rs, then for each
# operation (module command, its Lua equivalent from scripts/lua/, and the HSET/HGETALL floors)
# zeroes the counters, runs it (pipelined) and dumps a profile. Prints
# `<op> calls=<n> Ir=<instructions> Ir/call=<instructions per command>` per operation, then a
# table of instructions per command with the ratios bench.sh shows as throughput: lua/mod > 1
# means the module does less work than the script; mod/floor is the floor's share of the
# module's work (the throughput ratio a server-bound run would approach).
#
# Instruction counts hardly move with the load of other processes, unlike the wall-clock
# figures of scripts/bench.sh, so this is the tool for before/after comparisons of a change.
# The dumps (`<op>.cg`) stay in OUT for `callgrind_annotate --inclusive=yes OUT/<op>.cg`.
#
#   scripts/profile.sh                         # GPUS=2000 N=1000 OUT=target/profile
#   GPUS=10000 N=1000 MODULE=/path/to/libgpucache.so OUT=/tmp/before scripts/profile.sh
#
# Environment: GPUS (default 2000), N requests per op (default 1000; AVAILABLE runs a fifth),
# MODULE (default: build and use target/release/libgpucache.so), OUT (output directory),
# OPS (the module operations to profile, default "get status book_cancel available orderbook
# price"), CLUSTER=1 (run the server as a one-node Redis Cluster that owns every slot, so the
# same commands pay what cluster mode adds: Redis's own routing of each command and each
# module call, the module's per-command check that the region's slot is wholly here, the
# cluster's per-key bookkeeping).
# Needs valgrind (apt-get install valgrind). Counts include Redis's own work per command
# (parsing, replying); HSET and HGETALL are measured as floors.
set -euo pipefail
# profile_op runs in $(...): without this its failures would not stop the script.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

GPUS="${GPUS:-2000}"
N="${N:-1000}"
OPS="${OPS:-get status book_cancel available orderbook price}"
CLUSTER="${CLUSTER:-0}"
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
CLUSTER_ARGS=()
if [ "$CLUSTER" = 1 ]; then
  BUS="$(free_port)"
  CLUSTER_ARGS=(--cluster-enabled yes --cluster-port "$BUS" --cluster-config-file nodes.conf)
fi

valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" --compress-strings=no \
  --compress-pos=no redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$OUT" "${CLUSTER_ARGS[@]}" \
  --loadmodule "$OUT/libgpucache.so" AVAILABILITY_TTL 86400 PRICING_TTL 86400 \
  >"$OUT/server.log" 2>&1 &
VPID=$!
cli() { redis-cli -p "$PORT" "$@"; }
trap 'cli shutdown nosave >/dev/null 2>&1 || true; wait $VPID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do cli ping >/dev/null 2>&1 && break; sleep 0.2; done
if [ "$CLUSTER" = 1 ]; then
  cli CLUSTER ADDSLOTSRANGE 0 16383 >/dev/null
  for _ in $(seq 1 300); do
    cli CLUSTER INFO | tr -d '\r' | grep -qx 'cluster_state:ok' && break
    sleep 0.2
  done
  cli CLUSTER INFO | tr -d '\r' | grep -qx 'cluster_state:ok' || {
    echo "the one-node cluster did not come up" >&2
    exit 1
  }
fi

"$LOADGEN" load --port "$PORT" --gpus "$GPUS" --regions 4 --types 8 --connections 1 >/dev/null
calls() {
  cli INFO commandstats | tr -d '\r' | awk -F'[:,=]' -v names="$*" '
    BEGIN { n = split(names, w, " "); for (i = 1; i <= n; i++) want["cmdstat_" w[i]] = 1 }
    ($1 in want) { c += $3 } END { print c + 0 }'
}
# Instructions per call of one operation, pipelined: zero the counters, run, dump, divide.
profile_op() {
  local op="$1" n="$2"
  shift 2
  cli CONFIG RESETSTAT >/dev/null
  callgrind_control -z "$VPID" >/dev/null 2>&1
  "$LOADGEN" run --port "$PORT" --op "$op" --requests "$n" --pipeline 16 --connections 1 \
    --gpus "$GPUS" --regions 4 --types 8 >/dev/null
  callgrind_control -d "$op" "$VPID" >/dev/null 2>&1
  local c dump ir
  c=$(calls "$@")
  dump=$(ls -t "$OUT"/callgrind.out.* | head -1)
  mv "$dump" "$OUT/$op.cg"
  ir=$(awk '/^summary:/ { print $2; exit }' "$OUT/$op.cg")
  if [ "${c:-0}" -eq 0 ] || [ -z "$ir" ]; then
    echo "profile of $op: no calls counted or no profile written" >&2
    exit 1
  fi
  echo "$op calls=$c Ir=$ir Ir/call=$((ir / c))" >&2
  echo $((ir / c))
}

# loadgen loads (compiles) the Lua scripts when it starts: once here, so that no measured
# operation pays for it.
"$LOADGEN" run --port "$PORT" --op lua_get --requests 16 --pipeline 1 --connections 1 \
  --gpus "$GPUS" --regions 4 --types 8 >/dev/null
declare -A IR
IR[hset]=$(profile_op hset "$N" hset)
IR[hgetall]=$(profile_op hgetall "$N" hgetall)
ROWS=()
for op in $OPS; do
  case $op in
    book_cancel) cmds="gpucache.book gpucache.cancel"; floor=hset ;;
    price | status) cmds="gpucache.$op"; floor=hset ;;
    *) cmds="gpucache.$op"; floor=hgetall ;;
  esac
  n=$N
  [ "$op" = available ] && n=$((N / 5))
  if [ "$op" = price ]; then
    # As in bench.sh: the one-time move of each type's GPUs to its type-price index is in
    # neither side's figures.
    for r in 0 1 2 3; do for t in 0 1 2 3 4 5 6 7; do
      cli GPUCACHE.PRICE "r$r" "t$t" 1 >/dev/null
    done; done
  fi
  mod=$(profile_op "$op" "$n" $cmds)
  lua=$(profile_op "lua_$op" "$n" evalsha)
  ROWS+=("$op $mod $lua $floor ${IR[$floor]}")
done

echo
MODE=""
[ "$CLUSTER" = 1 ] && MODE=", one-node cluster"
echo "instructions per command inside redis-server (GPUS=$GPUS, pipelined$MODE), module vs Lua vs floor"
printf '%-12s %10s %10s %8s %8s %10s %10s\n' op module lua lua/mod floor floor_ir mod/floor
for row in "${ROWS[@]}"; do
  read -r op mod lua floor fir <<<"$row"
  awk -v op="$op" -v m="$mod" -v l="$lua" -v f="$floor" -v fi="$fir" 'BEGIN {
    printf "%-12s %10d %10d %8.2f %8s %10d %10.3f\n", op, m, l, l / m, f, fi, fi / m }'
done
