#!/usr/bin/env bash
# How long GPUCACHE.PROVIDER holds the server for a provider with many GPUs.
#
# Starts its own redis-server with the release module, registers $GPUS GPUs of one provider in
# one region (pipelined), then, while a client sends PING after PING and times each reply, turns
# the provider offline and back online. Prints each PROVIDER's own time (SLOWLOG), how long the
# move of its GPUs took after it (INFO gpucache provider_moves_pending back to 0), LATENCY
# LATEST (events over 1 ms) and the slowest PING: the longest the main thread was held, timer
# slices included.
#
#   scripts/stall-provider.sh                 # GPUS=100000
#   GPUS=10000 scripts/stall-provider.sh
#   MODULE=/path/to/libgpucache.so scripts/stall-provider.sh   # another build
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
echo "module: $MODULE; redis: $(redis-server --version | cut -d' ' -f3)"

echo "== registering $GPUS GPUs of provider big in region eu"
python3 - "$GPUS" >"$DIR/register.resp" <<'EOF'
import sys
def resp(*args):
    out = [f"*{len(args)}\r\n"]
    for a in args:
        out.append(f"${len(a.encode())}\r\n{a}\r\n")
    return "".join(out)
n = int(sys.argv[1])
sys.stdout.write("".join(
    resp("GPUCACHE.REGISTER", "eu", f"g{i}", "PROVIDER", "big", "TYPE", f"T{i % 8}",
         "PRICE", f"{1 + i % 50}.25")
    for i in range(n)))
EOF
cli --pipe <"$DIR/register.resp" | tail -1

# PING after PING; on SIGTERM prints the slowest reply in ms.
python3 - "$PORT" >"$DIR/probe.out" <<'EOF' &
import signal, socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
worst = [0.0, 0]
def done(*_):
    print(f"{worst[0] * 1000:.2f} {worst[1]}")
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
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

for status in offline online; do
  cli SLOWLOG RESET >/dev/null
  cli LATENCY RESET >/dev/null
  start=$(date +%s%N)
  cli GPUCACHE.PROVIDER eu big "$status" | paste -sd' ' -
  worst_cmd=$(cli --raw SLOWLOG GET 10000 | tr -d '\r' | python3 -c '
import sys
lines = sys.stdin.read().split("\n")
# --raw prints id, time, duration, then the arguments, one per line; find PROVIDER
for i, l in enumerate(lines):
    if l == "GPUCACHE.PROVIDER" and i >= 1:
        print(lines[i - 1]); break
')
  while [ "$(cli INFO gpucache | tr -d '\r' | awk -F: '$1 == "gpucache_provider_moves_pending" { print $2 }')" != "0" ]; do
    sleep 0.01
  done
  end=$(date +%s%N)
  timer_ms=$(cli LATENCY LATEST | tr -d '\r' | paste -sd' ' -)
  echo "PROVIDER $status: command ${worst_cmd:-?} us; GPUs moved $(( (end - start) / 1000000 )) ms after it; LATENCY LATEST: ${timer_ms:-none over 1 ms}"
done
kill "$PROBE_PID"
wait "$PROBE_PID" 2>/dev/null || true
PROBE_PID=""
read -r worst pings <"$DIR/probe.out"
echo "slowest PING during both: ${worst} ms of $pings; longest ticker run (booking clock + moves): $(cli INFO gpucache | tr -d '\r' | awk -F: '$1 == "gpucache_ticker_longest_us" { print $2 }') us"
