#!/usr/bin/env bash
# Smoke test through redis-cli: starts its own redis-server with the module on a free loopback
# port, runs a booking flow and asserts each reply. MODULE overrides the module path.
set -uo pipefail
cd "$(dirname "$0")/.."
MODULE="${MODULE:-$PWD/target/debug/libgpucache.so}"
[ -f "$MODULE" ] || { echo "module not built: $MODULE (run cargo build)" >&2; exit 1; }

. scripts/lib.sh
DIR="$(mktemp -d)"
PORT=""
trap '[ -n "$PORT" ] && redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1; rm -rf "$DIR"' EXIT
# A port found free may be taken by another process before the server binds it (tests running
# alongside): try a few, and give a busy machine time to start the server.
for _ in 1 2 3 4 5; do
  PORT="$(free_port)" || exit 1
  redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
    --daemonize yes --logfile "$DIR/redis.log" --notify-keyspace-events Kd \
    --loadmodule "$MODULE" JITTER 0 AVAILABILITY_TTL 120
  up=0
  for _ in $(seq 1 200); do
    redis-cli -p "$PORT" ping 2>/dev/null | grep -q PONG && { up=1; break; }
    sleep 0.05
  done
  [ "$up" = 1 ] && break
  echo "smoke: redis-server did not come up on port $PORT; its log:" >&2
  tail -5 "$DIR/redis.log" >&2
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1
  PORT=""
done
[ -n "$PORT" ] || { echo "smoke: could not start redis-server" >&2; exit 1; }

passed=0
failed=0
cli() { redis-cli -p "$PORT" "$@" 2>&1; }
# expect "<what>" "<expected substring>" command...
expect() {
  local what="$1" wanted="$2"
  shift 2
  local out
  out="$(cli "$@")"
  if grep -qF -- "$wanted" <<<"$out"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    printf 'FAIL %s\n  command: %s\n  wanted:  %s\n  got:     %s\n' "$what" "$*" "$wanted" "$(tr '\n' ' ' <<<"$out")"
  fi
}
# expect_line "<what>" "<field>" "<value>" command...: the reply map has field followed by value.
expect_field() {
  local what="$1" field="$2" value="$3"
  shift 3
  local out
  out="$(cli "$@" | grep -A1 -x -- "$field" | tail -n1)"
  if [ "$out" = "$value" ]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    printf 'FAIL %s: %s is "%s", wanted "%s" (%s)\n' "$what" "$field" "$out" "$value" "$*"
  fi
}

expect "module loaded" "gpucache" MODULE LIST
expect_field "register" result created GPUCACHE.REGISTER eu g1 PROVIDER p1 TYPE A100 PRICE 2.5 MEMORY 80
expect_field "register 2" result created GPUCACHE.REGISTER eu g2 PROVIDER p1 TYPE A100 PRICE 1.5
expect_field "register 3" result created GPUCACHE.REGISTER eu g3 PROVIDER p2 TYPE H100 PRICE 4 SCORE 9
expect_field "get price" price 2.5 GPUCACHE.GET eu g1
expect_field "load argument applied" gpucache.jitter 0 CONFIG GET gpucache.jitter
expect_field "cheapest first" gpu_id g2 GPUCACHE.AVAILABLE eu LIMIT 1
expect_field "book" result created GPUCACHE.BOOK eu g2 b1 alice 3600
expect "double booking refused" "GPUBUSY" GPUCACHE.BOOK eu g2 b2 bob 3600
expect_field "booked gpu is busy" status busy GPUCACHE.GET eu g2
expect_field "booking is idempotent" result existing GPUCACHE.BOOK eu g2 b1 alice 3600
expect_field "stats busy" gpus_busy 1 GPUCACHE.STATS eu
expect_field "type price" listed_gpus 1 GPUCACHE.PRICE eu A100 3
expect_field "type price shown" price 3 GPUCACHE.GET eu g1
expect_field "provider offline" gpus_unlisted 1 GPUCACHE.PROVIDER eu p2 offline
expect "nothing under 2.9" "" GPUCACHE.AVAILABLE eu MAXPRICE 2.9
expect_field "cancel" gpu_status available GPUCACHE.CANCEL eu b1
expect "unknown booking" "NOBOOKING" GPUCACHE.CANCEL eu b1
expect "bad price" "ERR invalid price" GPUCACHE.PRICE eu A100 nan
expect "manual busy refused" "BADSTATE" GPUCACHE.STATUS eu g1 busy
expect "invalidate" "3" GPUCACHE.INVALIDATE eu gpu:g1 price:A100 stats
expect "events appended" "booking_created" XRANGE "gpucache:{eu}:events" - +
expect "order book" "asks" GPUCACHE.ORDERBOOK eu A100
expect_field "register scored" result created GPUCACHE.REGISTER eu g5 PROVIDER p1 TYPE H100 PRICE 5 SCORE 9
expect_field "search by score" gpu_id g5 GPUCACHE.AVAILABLE eu SORT SCORE LIMIT 1
expect_field "24h bookings" bookings_24h 1 GPUCACHE.STATS eu
expect_field "all regions" region "*" GPUCACHE.STATS
expect "'*' is not a region" "send GPUCACHE.STATS with no argument" GPUCACHE.STATS '*'
expect "demand tiers configurable" "OK" CONFIG SET gpucache.demand-tiers "100:2"
expect_field "book half the A100s" result created GPUCACHE.BOOK eu g2 b9 carol 60
expect_field "demand multiplier applies" demand_multiplier 2 GPUCACHE.GET eu g1
expect "server alive" "PONG" PING

echo "smoke: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
