#!/usr/bin/env bash
# Sets up and runs gpucache: installs dependencies, builds the module in release mode, starts
# redis-server with it loaded (redis.conf.example) and loads a demo marketplace.
#   PORT=6380 scripts/run.sh        # another port
#   scripts/run.sh stop             # stop the server it started
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-6379}"
RUN_DIR="target/run"
PIDFILE="$RUN_DIR/redis-$PORT.pid"

if [ "${1:-}" = "stop" ]; then
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
  echo "stopped redis-server on port $PORT"
  exit 0
fi

scripts/deps.sh
cargo build --release --quiet --workspace   # the module and the gpucache-edge CLI
mkdir -p "$RUN_DIR"
# A demo starts from an empty marketplace: drop what an earlier run persisted.
rm -rf "$RUN_DIR/appendonlydir" "$RUN_DIR/dump.rdb"

if redis-cli -p "$PORT" ping >/dev/null 2>&1; then
  echo "something already answers on port $PORT; stop it or use PORT=..." >&2
  exit 1
fi
# redis-server changes into --dir before loading modules: point loadmodule at an absolute path.
sed "s#loadmodule ./target/#loadmodule $PWD/target/#" redis.conf.example >"$RUN_DIR/redis.conf"
redis-server "$RUN_DIR/redis.conf" \
  --port "$PORT" --daemonize yes --pidfile "$PWD/$PIDFILE" \
  --logfile "$PWD/$RUN_DIR/redis-$PORT.log" --dir "$PWD/$RUN_DIR"
for _ in $(seq 1 100); do
  redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
  sleep 0.05
done
redis-cli -p "$PORT" MODULE LIST | grep -q gpucache || {
  echo "gpucache did not load; see $RUN_DIR/redis-$PORT.log" >&2
  exit 1
}

PORT="$PORT" scripts/demo.sh
cat <<MSG

gpucache is running on 127.0.0.1:$PORT (log: $RUN_DIR/redis-$PORT.log).
  redis-cli -p $PORT GPUCACHE.AVAILABLE eu-west LIMIT 5
  redis-cli -p $PORT PSUBSCRIBE '__keyspace@0__:gpucache:*'     # watch invalidations
  target/release/gpucache-edge watch --url redis://127.0.0.1:$PORT/ --region eu-west   # notifications + stream events
  scripts/run.sh stop
MSG
