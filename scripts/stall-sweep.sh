#!/usr/bin/env bash
# How long the module holds Redis's main thread while it visits a whole region: the sweep after
# a restart (every GPU's time passed while the server was down), then GPUCACHE.CHECK and
# GPUCACHE.REPAIR of a region of $GPUS GPUs (surveyed in a forked child: only their caller
# waits). A client pings the server throughout (one PING at a time, timed in the client) and
# the script prints the longest PING and how many took over 5 ms, with Redis's own SLOWLOG and
# LATENCY LATEST entries.
#
#   scripts/stall-sweep.sh                               # GPUS=100000, this work tree's module
#   MODULE=/path/to/libgpucache.so scripts/stall-sweep.sh   # another build (e.g. of main)
#   GPUS=20000 scripts/stall-sweep.sh
#
# The last REPAIR runs after an index and a set were deleted by hand: it has every GPU of
# them to put back.
#
# Steps: start redis-server with the module (release build) and AVAILABILITY_TTL=$TTL, register
# $GPUS GPUs in region `eu` (pipelined, 10 providers, 4 types), SAVE, stop the server, wait
# until every record's time has passed, start it again from the RDB with the PING client
# attached, and wait until the module's healing queue is empty (INFO gpucache). Then register
# the GPUs again (with a day's TTL) and time CHECK and REPAIR of the region with the PING
# client running. A PING's time includes the client's own scheduling: on a busy 2-core machine
# single PINGs of a few ms happen without any stall; the maximum is what to read.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

GPUS="${GPUS:-100000}"
TTL="${TTL:-30}"

if [ -n "${MODULE:-}" ]; then
  MODULE="$(realpath "$MODULE")"
else
  cargo build --release --quiet
  MODULE="$PWD/target/release/libgpucache.so"
fi
echo "module: $MODULE"
echo "redis: $(redis-server --version)"

. scripts/lib.sh
PORT="$(free_port)"
DIR="$(mktemp -d)"
PINGER_PID=""
stop_server() {
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
  for _ in $(seq 1 100); do
    redis-cli -p "$PORT" ping >/dev/null 2>&1 || return 0
    sleep 0.1
  done
}
cleanup() {
  [ -n "$PINGER_PID" ] && kill "$PINGER_PID" 2>/dev/null || true
  stop_server
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_server() {
  redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
    --daemonize yes --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" \
    --slowlog-log-slower-than 5000 --latency-monitor-threshold 5 \
    --loadmodule "$MODULE" AVAILABILITY_TTL "$1" JITTER 0
}
cli() { redis-cli -p "$PORT" "$@"; }
wait_up() {
  for _ in $(seq 1 600); do
    [ "$(cli ping 2>/dev/null)" = "PONG" ] && return 0
    sleep 0.05
  done
  echo "server did not start; log:" >&2
  cat "$DIR/redis.log" >&2
  exit 1
}
info_field() { cli INFO gpucache | tr -d '\r' | awk -F: -v f="$1" '$1 == f { print $2 }'; }

# Registers $GPUS GPUs in region eu through one pipe (RESP built by awk).
register_all() {
  awk -v n="$GPUS" 'function arg(s) { printf "$%d\r\n%s\r\n", length(s), s }
    BEGIN { for (i = 0; i < n; i++) {
      printf "*9\r\n"; arg("GPUCACHE.REGISTER"); arg("eu"); arg("g" i);
      arg("PROVIDER"); arg("p" (i % 10)); arg("TYPE"); arg("T" (i % 4)); arg("PRICE"); arg("1.5") } }' |
    cli --pipe | tail -1
}

# A PING at a time until $DIR/stop-pinging exists; prints the longest and the count over 5 ms
# of each phase named in $DIR/phase (the phase is read before every PING).
start_pinger() {
  python3 - "$PORT" "$DIR" <<'EOF' &
import os, socket, sys, time
port, folder = int(sys.argv[1]), sys.argv[2]
stats = {}
sock = None
phase = "start"
while not os.path.exists(os.path.join(folder, "stop-pinging")):
    try:
        with open(os.path.join(folder, "phase")) as f:
            phase = f.read().strip() or phase
    except OSError:
        phase = "start"
    try:
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        start = time.perf_counter()
        sock.sendall(b"PING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(64)
            if not chunk:
                raise OSError("closed")
            reply += chunk
        took = (time.perf_counter() - start) * 1000
        if reply.startswith(b"-LOADING"):
            phase = "loading"
        worst, over, count = stats.get(phase, (0.0, 0, 0))
        stats[phase] = (max(worst, took), over + (took > 5), count + 1)
    except OSError:
        sock = None
        time.sleep(0.01)
for phase, (worst, over, count) in stats.items():
    print(f"  ping during {phase:8}: max {worst:7.2f} ms, {over} of {count} over 5 ms")
EOF
  PINGER_PID=$!
}
phase() { echo "$1" >"$DIR/phase"; }

echo "== register $GPUS GPUs (AVAILABILITY_TTL $TTL s)"
start_server "$TTL"
wait_up
register_all
registered=$(date +%s)
cli SAVE >/dev/null
stop_server
left=$((registered + TTL + 1 - $(date +%s)))
[ "$left" -gt 0 ] && { echo "  waiting ${left}s for every record's time to pass"; sleep "$left"; }

echo "== restart from the RDB: the post-load sweep"
# A PING answered -LOADING counts as loading; the first answered PONG may have waited out the
# end of loading as well as the module's first timer calls (the log has the load's duration).
phase sweep
start_pinger
start_server 86400
wait_up
begin=$(date +%s%N)
for _ in $(seq 1 1200); do
  [ "$(info_field gpucache_heal_queue)" = "0" ] && [ "$(info_field gpucache_healed)" -ge "$GPUS" ] && break
  sleep 0.05
done
end=$(date +%s%N)
echo "  sweep done within $(((end - begin) / 1000000)) ms of the server answering:" \
  "healed $(info_field gpucache_healed), sweep_slices $(info_field gpucache_sweep_slices)," \
  "region_repairs $(info_field gpucache_region_repairs)"
grep -E "healed [0-9]+ records|DB loaded from disk" "$DIR/redis.log" | sed 's/^/  log: /' || true

echo "== register $GPUS GPUs again, then CHECK and REPAIR"
phase register
register_all
phase check
t0=$(date +%s%N)
cli GPUCACHE.CHECK eu | head -2 | tr '\n' ' '
t1=$(date +%s%N)
echo " (CHECK took $(((t1 - t0) / 1000000)) ms)"
phase repair
cli GPUCACHE.REPAIR eu | head -2 | tr '\n' ' '
t2=$(date +%s%N)
echo " (REPAIR took $(((t2 - t1) / 1000000)) ms)"
# Damage by hand that gives the repair fixes to write: a score index and a provider's GPU set.
cli DEL "gpucache:{eu}:avail-score:T0" "gpucache:{eu}:provider-gpus:p0" >/dev/null
phase repair-damaged
t3=$(date +%s%N)
cli GPUCACHE.REPAIR eu | grep -A1 '^fixed' | tr '\n' ' '
t4=$(date +%s%N)
echo " (REPAIR of an index and a set deleted by hand took $(((t4 - t3) / 1000000)) ms)"
fork_us=$(cli INFO stats | tr -d '\r' | awk -F: '$1 == "latest_fork_usec" { print $2 }')
echo "  surveys forked: $(info_field gpucache_surveys_forked), latest fork: $fork_us us"
phase idle
sleep 0.5
touch "$DIR/stop-pinging"
wait "$PINGER_PID" || true
PINGER_PID=""

echo "== SLOWLOG (entries over 5 ms: microseconds, command)"
cli --json SLOWLOG GET 20 | python3 -c '
import json, sys
for entry in json.load(sys.stdin):
    command = " ".join(entry[3][:3])
    print(f"  {entry[2]:>9} us  {command}")'
echo "== LATENCY LATEST (event: latest ms, max ms)"
cli --json LATENCY LATEST | python3 -c '
import json, sys
for event, _, latest, worst in json.load(sys.stdin):
    print(f"  {event}: latest {latest} ms, max {worst} ms")'
