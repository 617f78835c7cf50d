#!/usr/bin/env bash
# How long `GPUCACHE.STATS` with no argument (the sum over every region of the server) holds the
# server with many regions, and what a client sending PING meanwhile sees.
#
# Starts its own redis-server with the module on a free loopback port, registers $REGIONS
# regions of $GPUS GPUs each over $TYPES types (one booking per region, so every region has a
# 24-hour window), then:
#   1. idle: $CALLS calls of STATS in a row, nothing else writing;
#   2. busy: the same while a client changes GPU statuses in random regions without pause;
# and prints, for each, every call's time as Redis measured it (SLOWLOG, microseconds: first,
# median, max) and the worst PING latency (ms) of a `redis-cli --latency` client running
# alongside, plus the freshness fields of the last reply where the module has them.
#
#   scripts/stall-stats.sh                               # 1000 regions of 6 GPUs, 3 types
#   REGIONS=5000 scripts/stall-stats.sh
#   MODULE=/tmp/libgpucache-main.so scripts/stall-stats.sh  # another build (e.g. main's, for before)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
. scripts/lib.sh

REGIONS="${REGIONS:-1000}"
GPUS="${GPUS:-6}"
TYPES="${TYPES:-3}"
CALLS="${CALLS:-50}"

if [ -n "${MODULE:-}" ]; then
  MODULE="$(realpath "$MODULE")"
else
  cargo build --release --quiet
  MODULE="$PWD/target/release/libgpucache.so"
fi
echo "module: $MODULE"
echo "machine: $(nproc) cores; $(redis-server --version | cut -d' ' -f1-3)"

DIR="$(mktemp -d)"
PORT="$(free_port)"
SERVER_PID=""
BACKGROUND=()
cleanup() {
  for pid in "${BACKGROUND[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$DIR" --daemonize yes --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" \
  --slowlog-log-slower-than 0 --slowlog-max-len 100000 \
  --loadmodule "$MODULE" AVAILABILITY_TTL 86400 PRICING_TTL 86400
for _ in $(seq 1 100); do
  [ -s "$DIR/redis.pid" ] && redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
  sleep 0.05
done
SERVER_PID="$(cat "$DIR/redis.pid" 2>/dev/null || true)"
cli() { redis-cli -p "$PORT" "$@"; }
cli MODULE LIST | grep -q gpucache || {
  echo "redis-server did not start with gpucache; log:" >&2
  cat "$DIR/redis.log" >&2
  exit 1
}

# Commands as RESP, for `redis-cli --pipe`.
resp() {
  awk '{ printf "*%d\r\n", NF; for (i = 1; i <= NF; i++) printf "$%d\r\n%s\r\n", length($i), $i }'
}

echo "== load: $REGIONS regions x $GPUS GPUs, $TYPES types"
awk -v regions="$REGIONS" -v gpus="$GPUS" -v types="$TYPES" 'BEGIN {
  for (r = 0; r < regions; r++) {
    for (g = 0; g < gpus; g++)
      printf "GPUCACHE.REGISTER r%d g%d PROVIDER p%d TYPE T%d PRICE %d.25\n", r, g, g % 2, g % types, 1 + g % 4
    printf "GPUCACHE.BOOK r%d g0 b0 alice 3600\n", r
  }
}' | resp | cli --pipe | tail -1

stats_times() {
  # Durations (us) of the STATS calls without an argument in the slow log, oldest first. Raw,
  # each entry is: id, timestamp, duration, the arguments one a line, client address, name.
  cli --raw SLOWLOG GET 100000 | awk '
    { lines[NR] = $0 }
    END {
      for (i = 2; i <= NR; i++)
        if (lines[i] == "GPUCACHE.STATS" && lines[i + 1] ~ /^127\.0\.0\.1:/)
          print lines[i - 1]
    }' | tac
}

summary() {
  local label="$1"
  sort -n >"$DIR/times"
  local count median max
  count=$(wc -l <"$DIR/times")
  median=$(awk -v n="$count" 'NR == int((n + 1) / 2) { print }' "$DIR/times")
  max=$(tail -1 "$DIR/times")
  echo "$label: $count calls, median ${median} us, max ${max} us"
}

# Worst PING latency (ms) of a `redis-cli --latency` client while "$DIR/measuring" exists: one
# line "min max avg samples" per second (redis-cli prints once per interval when not on a tty).
watch_latency() {
  : >"$DIR/latency"
  while [ -e "$DIR/measuring" ]; do
    redis-cli -p "$PORT" --latency -i 1 >>"$DIR/latency" 2>/dev/null || break
    echo >>"$DIR/latency"
  done
}

# Runs $CALLS calls of STATS (as the user "$2" with password "x" when given) and reports them.
measure() {
  local label="$1" user="${2:-}"
  local as=()
  [ -n "$user" ] && as=(--user "$user" --pass x --no-auth-warning)
  cli SLOWLOG RESET >/dev/null
  cli CONFIG RESETSTAT >/dev/null
  touch "$DIR/measuring"
  watch_latency &
  local watcher=$!
  BACKGROUND+=("$watcher")
  sleep 0.3
  for _ in $(seq 1 "$CALLS"); do cli "${as[@]}" GPUCACHE.STATS >"$DIR/last_reply"; done
  rm -f "$DIR/measuring"
  wait "$watcher" 2>/dev/null || true
  stats_times >"$DIR/raw_times"
  echo "$label: first call $(head -1 "$DIR/raw_times") us"
  summary "$label" <"$DIR/raw_times"
  [ -z "${VERBOSE:-}" ] || echo "$label: every call (us): $(tr '\n' ' ' <"$DIR/raw_times")"
  cli INFO commandstats | tr -d '\r' | awk -F'[:=,]' -v label="$label" \
    '$1 == "cmdstat_gpucache.stats" { printf "%s: %d calls, mean %s us (INFO commandstats)\n", label, $3, $7 }'
  awk 'NF == 4 { if ($2 > max) max = $2; samples += $4 } END { printf "%s: worst concurrent PING %d ms (%d pings)\n", label, max, samples }' \
    label="$label" "$DIR/latency"
  awk 'prev == "regions" || prev == "stale_regions" || prev == "stale_ms" || prev == "gpus_total" { print "  " prev " = " $0 } { prev = $0 }' "$DIR/last_reply"
}

# The sum is served from memory once every region was read: how long that takes after a load.
if cli GPUCACHE.STATS | grep -qx stale_regions; then
  echo "== warm-up: STATS until no region is stale"
  started=$(date +%s%N)
  calls=0
  while [ "$(cli GPUCACHE.STATS | awk 'prev == "stale_regions" { print; exit } { prev = $0 }')" != 0 ]; do
    calls=$((calls + 1))
    [ $(( ($(date +%s%N) - started) / 1000000 )) -lt 120000 ] || { echo "still stale after 120 s"; break; }
  done
  echo "warm-up: $(( ($(date +%s%N) - started) / 1000000 )) ms, $calls calls"
fi

echo "== idle"
measure idle

# A user whose key patterns do not cover every key: the sum is made region by region from
# memory, each region checked against the user.
cli ACL SETUSER reader on '>x' '~gpucache:*' '+@all' >/dev/null
echo "== idle, a user restricted to ~gpucache:*"
measure restricted reader

echo "== busy (a client changes GPU statuses in random regions meanwhile)"
(
  while true; do
    awk -v regions="$REGIONS" -v gpus="$GPUS" -v seed="$RANDOM" 'BEGIN {
      srand(seed)
      for (i = 0; i < 2000; i++) {
        printf "GPUCACHE.STATUS r%d g%d %s\n", int(rand() * regions), 1 + int(rand() * (gpus - 1)), (rand() < 0.5 ? "maintenance" : "available")
      }
    }' | resp | cli --pipe >/dev/null 2>&1 || true
  done
) &
BACKGROUND+=("$!")
sleep 0.5
# Only calls slower than 200 us in the slow log: the writer's own commands would fill it.
cli CONFIG SET slowlog-log-slower-than 200 >/dev/null
measure busy
