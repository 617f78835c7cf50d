#!/usr/bin/env bash
# Benchmark: gpucache module commands side by side with the same logic as Lua scripts
# (scripts/lua/*.lua, EVALSHA) and with the floors of any write (plain HSET of one field) and
# read (plain HGETALL of a GPU hash), in one run against one redis-server.
#
# Builds the module and examples/loadgen.rs in release mode, starts its own redis-server with
# target/release/libgpucache.so on a free loopback port (no persistence), registers $GPUS GPUs
# over 4 regions and 8 types, checks that the scripts are honest equivalents (`loadgen verify`),
# then measures every operation through the module and through Lua, one request at a time and
# pipelined, and prints a table. The server is stopped on exit.
#
#   scripts/bench.sh                         # defaults: GPUS=10000 REQUESTS=30000
#   GPUS=1000000 REQUESTS=100000 scripts/bench.sh
#
# Environment:
#   GPUS         GPUs to register (default 10000)
#   REQUESTS     requests per measurement (default 30000; AVAILABLE runs a fifth of it and the
#                pipelined runs twice as many)
#   CONNECTIONS  client connections, one thread each (default 2)
#   PIPELINE     depth of the pipelined runs (default 16)
#   NOTIFY       notify-keyspace-events of the server (default "": off, as Redis ships; "Kd"
#                makes the module also publish its gpucache.* notifications; scripts cannot)
#   MODULE       benchmark this libgpucache.so instead of building target/release's (e.g. a
#                build of another commit; `verify` stops the run where the scripts no longer
#                match it)
#
# The server runs with AVAILABILITY_TTL and PRICING_TTL of a day (nothing expires during the
# run) and LC_ALL=C (the scripts compare ids in byte order, as Rust does). `verify` works in
# database 15 with the module's jitter off for its duration. The reads are measured on the
# loaded own-price ladders; PRICE runs last, after one PRICE per region and type, so that the
# one-time move of a type's GPUs to its type-price index is in neither side's figures.
#
# Columns: ops/s is the client-side throughput (a BOOK+CANCEL or maintenance+available pair
# counts as two operations); mod/Lua > 1 means the module is faster; mod/floor is the module's
# throughput as a share of plain HSET (writes) or HGETALL (reads) at the same pipeline depth.
# p50/p99 are per request at pipeline 1 and per pipelined batch otherwise. srv us/op is Redis's
# own time per command (INFO commandstats usec_per_call: the module command, EVALSHA, HSET or
# HGETALL), which does not depend on the client or the network.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

GPUS="${GPUS:-10000}"
REQUESTS="${REQUESTS:-30000}"
CONNECTIONS="${CONNECTIONS:-2}"
PIPELINE="${PIPELINE:-16}"
NOTIFY="${NOTIFY:-}"
REGIONS=4
TYPES=8

echo "== machine"
echo "nproc: $(nproc)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "redis: $(redis-server --version)"
echo "rustc: $(rustc --version)"

echo "== build"
if [ -n "${MODULE:-}" ]; then
  MODULE="$(realpath "$MODULE")"
else
  cargo build --release --quiet
  MODULE="$PWD/target/release/libgpucache.so"
fi
cargo build --release --example loadgen --quiet
echo "module: $MODULE (work tree $(git describe --always --dirty 2>/dev/null || echo '?'))"
LOADGEN="$PWD/target/release/examples/loadgen"

. scripts/lib.sh
PORT="$(free_port)"

DIR="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Long TTLs: no GPU record or type price may expire during the run. LC_ALL=C: byte order for
# the scripts' string comparisons, as Rust compares ids.
LC_ALL=C redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$DIR" --daemonize yes --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" \
  --notify-keyspace-events "$NOTIFY" \
  --loadmodule "$MODULE" AVAILABILITY_TTL 86400 PRICING_TTL 86400
for _ in $(seq 1 100); do
  [ -s "$DIR/redis.pid" ] && redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
  sleep 0.05
done
SERVER_PID="$(cat "$DIR/redis.pid" 2>/dev/null || true)"
redis-cli -p "$PORT" MODULE LIST | grep -q gpucache || {
  echo "redis-server did not start with gpucache; log:" >&2
  cat "$DIR/redis.log" >&2
  exit 1
}
cli() { redis-cli -p "$PORT" "$@"; }
echo "server: 127.0.0.1:$PORT pid $SERVER_PID, notify-keyspace-events '$NOTIFY', loadgen connections $CONNECTIONS"

used_memory() { cli INFO memory | tr -d '\r' | awk -F: '$1 == "used_memory" { print $2 }'; }

echo "== load"
mem_before=$(used_memory)
"$LOADGEN" load --port "$PORT" --gpus "$GPUS" --regions "$REGIONS" --types "$TYPES" --connections "$CONNECTIONS"
mem_after=$(used_memory)
streams=0
for r in $(seq 0 $((REGIONS - 1))); do
  s=$(cli MEMORY USAGE "gpucache:{r$r}:events" | tr -d '\r')
  streams=$((streams + ${s:-0}))
done
echo "used_memory before: $mem_before bytes, after: $mem_after bytes"
awk -v b="$mem_before" -v a="$mem_after" -v s="$streams" -v n="$GPUS" 'BEGIN {
  printf "bytes per GPU: %.0f (%.0f without the %d event streams, %d bytes)\n", (a - b) / n, (a - b - s) / n, 4, s }'

echo "== verify (module and Lua give identical replies, events and keys)"
"$LOADGEN" verify --port "$PORT" --gpus "$GPUS" --regions "$REGIONS" --types "$TYPES"

# Server time per command of the last run: total usec / calls of the given commands.
server_us() {
  cli INFO commandstats | tr -d '\r' | awk -F'[:,=]' -v names="$*" '
    BEGIN { n = split(names, want, " "); for (i = 1; i <= n; i++) w["cmdstat_" want[i]] = 1 }
    ($1 in w) { calls += $3; usec += $5 }
    END { if (calls > 0) printf "%.1f", usec / calls; else printf "-" }'
}

# measure <op> <pipeline> <requests> <commands for server time...>: prints "<loadgen line> srv_us=<x>"
measure() {
  local op="$1" p="$2" n="$3"
  shift 3
  cli CONFIG RESETSTAT >/dev/null
  local line
  line=$("$LOADGEN" run --port "$PORT" --op "$op" --requests "$n" --pipeline "$p" \
    --connections "$CONNECTIONS" --gpus "$GPUS" --regions "$REGIONS" --types "$TYPES") || return 1
  echo "$line srv_us=$(server_us "$@")"
}

field() { tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'; }

echo "== measure"
declare -A FLOOR
for p in 1 "$PIPELINE"; do
  n=$REQUESTS
  [ "$p" -gt 1 ] && n=$((REQUESTS * 2))
  FLOOR[hset,$p]=$(measure hset "$p" "$n" hset)
  echo "${FLOOR[hset,$p]}"
  FLOOR[hgetall,$p]=$(measure hgetall "$p" "$n" hgetall)
  echo "${FLOOR[hgetall,$p]}"
done

declare -a ROWS
# PRICE last: it moves every listed GPU of a type to the type-price index, after which the order
# book has a single level; the reads run on the own-price ladders of the loaded marketplace.
for op in book_cancel status get available orderbook price; do
  case $op in
    book_cancel) cmds="gpucache.book gpucache.cancel"; floor=hset ;;
    price | status) cmds="gpucache.$op"; floor=hset ;;
    *) cmds="gpucache.$op"; floor=hgetall ;;
  esac
  if [ "$op" = price ]; then
    # The first PRICE of a type moves its listed own-priced GPUs (one ZUNIONSTORE, O(GPUs of
    # the type)); do that once for every region and type so neither side measures it.
    for r in $(seq 0 $((REGIONS - 1))); do
      for t in $(seq 0 $((TYPES - 1))); do
        cli GPUCACHE.PRICE "r$r" "t$t" 1 >/dev/null
      done
    done
  fi
  for p in 1 "$PIPELINE"; do
    n=$REQUESTS
    [ "$p" -gt 1 ] && n=$((REQUESTS * 2))
    [ "$op" = available ] && n=$((n / 5))
    m=$(measure "$op" "$p" "$n" $cmds)
    echo "$m"
    l=$(measure "lua_$op" "$p" "$n" evalsha)
    echo "$l"
    ROWS+=("$op|$p|$m|$l|$floor|${FLOOR[$floor,$p]}")
  done
done

echo "== consistency after the run"
for r in $(seq 0 $((REGIONS - 1))); do
  ok=$(cli GPUCACHE.CHECK "r$r" | tr -d '\r' | awk 'prev == "ok" { print; exit } { prev = $0 }')
  echo "GPUCACHE.CHECK r$r: ok=$ok"
  [ "$ok" = 1 ] || { echo "region r$r is inconsistent" >&2; exit 1; }
done

echo
echo "== results: $GPUS GPUs, $CONNECTIONS connections, REQUESTS=$REQUESTS"
printf '%-12s %3s %11s %11s %7s %8s %9s %15s %15s %9s %9s %9s\n' \
  op P "mod ops/s" "Lua ops/s" mod/Lua floor mod/floor "mod p50/p99us" "Lua p50/p99us" \
  "srv us mod" "srv Lua" "srv floor"
for row in "${ROWS[@]}"; do
  IFS='|' read -r op p m l floor f <<<"$row"
  mo=$(field "$m" ops_per_s)
  lo=$(field "$l" ops_per_s)
  fo=$(field "$f" ops_per_s)
  printf '%-12s %3s %11s %11s %7s %8s %9s %15s %15s %9s %9s %9s\n' "$op" "$p" "$mo" "$lo" \
    "$(awk -v a="$mo" -v b="$lo" 'BEGIN { printf "%.2f", a / b }')" \
    "$floor" \
    "$(awk -v a="$mo" -v b="$fo" 'BEGIN { printf "%.3f", a / b }')" \
    "$(field "$m" p50_us)/$(field "$m" p99_us)" \
    "$(field "$l" p50_us)/$(field "$l" p99_us)" \
    "$(field "$m" srv_us)" "$(field "$l" srv_us)" "$(field "$f" srv_us)"
done
for floor in hset hgetall; do
  for p in 1 "$PIPELINE"; do
    f=${FLOOR[$floor,$p]}
    printf '%-12s %3s %11s %11s %7s %8s %9s %15s %15s %9s %9s %9s\n' "($floor)" "$p" \
      "$(field "$f" ops_per_s)" - - - - "$(field "$f" p50_us)/$(field "$f" p99_us)" - \
      "$(field "$f" srv_us)" - -
  done
done
