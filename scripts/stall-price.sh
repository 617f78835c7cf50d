#!/usr/bin/env bash
# How long GPUCACHE.PRICE, and the expiry of the type price it set, hold the server for a type
# with many GPUs.
#
# Starts its own redis-server with the release module, registers $GPUS GPUs of one type (A100,
# own prices 1.25 to 50.25) in one region (pipelined), then, while a client sends PING after
# PING and times each reply:
#   1. GPUCACHE.PRICE eu A100 3: its own time (SLOWLOG), then how long until its GPUs have all
#      reached avail-type (INFO gpucache_type_drains_pending back to 0; a build without it
#      moved them inside the command);
#   2. 10 GPUs registered again with their own price, then GPUCACHE.PRICE eu A100 4 (the
#      inline path, next to a large avail-type);
#   3. the type price expires (PEXPIRE 1): how long until every GPU is back at its own price
#      (avail-type and avail-draining empty).
# For each: LATENCY LATEST (events over 1 ms) and the slowest PING, the longest the main thread
# was held, timer slices included.
#
#   scripts/stall-price.sh                 # GPUS=100000
#   GPUS=10000 scripts/stall-price.sh
#   MODULE=/path/to/libgpucache.so scripts/stall-price.sh   # another build (e.g. main's)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

GPUS="${GPUS:-100000}"

if [ -n "${MODULE:-}" ]; then
  MODULE="$(realpath "$MODULE")"
else
  cargo build --release --quiet
  MODULE="$PWD/target/release/libgpucache.so"
fi
. scripts/lib.sh
PORT="$(free_port)"
DIR="$(mktemp -d)"
PROBE_PID=""
cleanup() {
  [ -n "$PROBE_PID" ] && kill "$PROBE_PID" 2>/dev/null || true
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT

redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
  --daemonize yes --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" \
  --slowlog-log-slower-than 100 --slowlog-max-len 10000 --latency-monitor-threshold 1 \
  --loadmodule "$MODULE" AVAILABILITY_TTL 86400 PRICING_TTL 86400
for _ in $(seq 1 100); do
  redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
  sleep 0.05
done
cli() { redis-cli -p "$PORT" "$@"; }
info() { cli INFO gpucache | tr -d '\r' | awk -F: -v f="$1" '$1 == f { print $2 }'; }
echo "module: $MODULE; redis: $(redis-server --version | cut -d' ' -f3)"

echo "== registering $GPUS A100s in region eu"
python3 - "$GPUS" >"$DIR/register.resp" <<'EOF'
import sys
def resp(*args):
    out = [f"*{len(args)}\r\n"]
    for a in args:
        out.append(f"${len(a.encode())}\r\n{a}\r\n")
    return "".join(out)
n = int(sys.argv[1])
sys.stdout.write("".join(
    resp("GPUCACHE.REGISTER", "eu", f"g{i}", "PROVIDER", f"p{i % 100}", "TYPE", "A100",
         "PRICE", f"{1 + i % 50}.25")
    for i in range(n)))
EOF
cli --pipe <"$DIR/register.resp" | tail -1

# PING after PING; on SIGUSR1 prints the slowest reply (ms) and the count since the last one.
python3 - "$PORT" "$DIR/probe.out" <<'EOF' &
import signal, socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
worst = [0.0, 0]
def report(*_):
    with open(sys.argv[2], "w") as f:
        f.write(f"{worst[0] * 1000:.2f} {worst[1]}\n")
    worst[0], worst[1] = 0.0, 0
signal.signal(signal.SIGUSR1, report)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    t = time.perf_counter()
    s.sendall(b"PING\r\n")
    buf = b""
    while not buf.endswith(b"\r\n"):
        buf += s.recv(64)
    worst[0] = max(worst[0], time.perf_counter() - t)
    worst[1] += 1
    time.sleep(0.0005)
EOF
PROBE_PID=$!
sleep 0.5

# phase <name> <command...>: runs the command, waits until `settled` says the work after it is
# done, and prints the command's SLOWLOG time, the time to settle, LATENCY LATEST and the
# slowest PING over the phase.
phase() {
  local name="$1"
  shift
  kill -USR1 "$PROBE_PID"
  sleep 0.2
  cli SLOWLOG RESET >/dev/null
  cli LATENCY RESET >/dev/null
  local start end
  start=$(date +%s%N)
  cli "$@" | paste -sd' ' -
  local command_us
  command_us=$(cli --raw SLOWLOG GET 10000 | tr -d '\r' | python3 -c '
import sys
lines = sys.stdin.read().split("\n")
# --raw prints id, time, duration, then the arguments, one per line
for i, l in enumerate(lines):
    if l.upper() == sys.argv[1].upper() and i >= 1:
        print(lines[i - 1]); break
' "$1")
  until settled; do sleep 0.01; done
  end=$(date +%s%N)
  sleep 0.1
  kill -USR1 "$PROBE_PID"
  sleep 0.2
  local latency worst pings
  latency=$(cli LATENCY LATEST | tr -d '\r' | paste -sd' ' -)
  read -r worst pings <"$DIR/probe.out"
  echo "$name: command ${command_us:-<100} us; settled $(( (end - start) / 1000000 )) ms after it;" \
    "slowest PING ${worst} ms of $pings; LATENCY LATEST: ${latency:-none over 1 ms}"
}

settled() {
  local pending
  pending=$(info gpucache_type_drains_pending)
  [ "${pending:-0}" = "0" ] && [ "$(cli EXISTS 'gpucache:{eu}:avail-draining:A100')" = "0" ]
}
phase "PRICE eu A100 3" GPUCACHE.PRICE eu A100 3
echo "   avail-type: $(cli ZCARD 'gpucache:{eu}:avail-type:A100'), avail-own: $(cli ZCARD 'gpucache:{eu}:avail-own:A100')"

for i in $(seq 0 9); do
  cli GPUCACHE.REGISTER eu "g$i" PROVIDER "p$i" TYPE A100 PRICE 2.5 >/dev/null
done
phase "PRICE eu A100 4 (10 GPUs re-priced since)" GPUCACHE.PRICE eu A100 4

# EXISTS first: it expires the key at once (active expiry may take minutes to sample it among
# 100,000 keys with a TTL).
settled() {
  [ "$(cli EXISTS 'gpucache:{eu}:price:A100')" = "0" ] &&
    [ "$(cli ZCARD 'gpucache:{eu}:avail-type:A100')" = "0" ] &&
    [ "$(cli EXISTS 'gpucache:{eu}:avail-draining:A100')" = "0" ]
}
phase "type price expiry" PEXPIRE 'gpucache:{eu}:price:A100' 1
echo "   avail-own: $(cli ZCARD 'gpucache:{eu}:avail-own:A100'); heal slices: $(info gpucache_type_price_heal_slices)"

kill "$PROBE_PID"
wait "$PROBE_PID" 2>/dev/null || true
PROBE_PID=""
echo "longest ticker run: $(info gpucache_ticker_longest_us) us"
