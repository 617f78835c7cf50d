#!/usr/bin/env bash
# The eviction scenario of the durability issue, as a user would try it, with figures:
# redis-server with `--maxmemory $MAXMEMORY --maxmemory-policy $POLICY` (the policy
# redis.conf.example recommends), $GPUS REGISTERs and $BOOKINGS day-long BOOKs, then:
#   - how many acknowledged bookings are gone, and how many of their GPUs a second user can book;
#   - the 24-hour booking count;
#   - what 100 KB over the limit costs: keys evicted, GPUs left, event-stream growth.
#   MODULE=/path/libgpucache.so POLICY=volatile-ttl GPUS=120000 BOOKINGS=40000 scripts/eviction.sh
# MODULE defaults to this checkout's release build (built first); MODULE_ARGS are its load
# arguments (e.g. "STREAM_MAXLEN 100000", for a stream not yet full); MAXMEMORY=0 sets no
# limit until the 100 KB step.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
GPUS="${GPUS:-120000}"
BOOKINGS="${BOOKINGS:-40000}"
MAXMEMORY="${MAXMEMORY:-50mb}"
POLICY="${POLICY:-volatile-lru}"
if [ -z "${MODULE:-}" ]; then
  cargo build --release --quiet
  MODULE="$PWD/target/release/libgpucache.so"
fi
PORT="$(free_port)"
DIR="$(mktemp -d)"
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
  --daemonize yes --logfile "$DIR/redis.log" --maxmemory "$MAXMEMORY" \
  --maxmemory-policy "$POLICY" --loadmodule "$MODULE" ${MODULE_ARGS:-} >/dev/null
trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1; rm -rf "$DIR"' EXIT
for _ in $(seq 1 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
cli() { redis-cli -p "$PORT" "$@"; }
info() { cli INFO "$1" | tr -d '\r' | awk -F: -v k="$2" '$1 == k { print $2 }'; }
stat() { cli GPUCACHE.STATS eu | awk -v k="$1" 'found { print; exit } $0 == k { found = 1 }'; }

register() { # from to
  for i in $(seq "$1" "$2"); do
    echo "GPUCACHE.REGISTER eu g$i PROVIDER p$((i % 7)) TYPE T$((i % 8)) PRICE 1.$((i % 100)) MEMORY 80"
  done | cli --csv >>"$DIR/register.out"
}
first=$((BOOKINGS + BOOKINGS / 10))
echo "== $first REGISTERs, $BOOKINGS BOOKs of 86400 s, then $((GPUS - first)) more REGISTERs (maxmemory $MAXMEMORY, $POLICY)"
register 0 $((first - 1))
# --csv: one line per reply, so line i answers booking i.
for i in $(seq 0 $((BOOKINGS - 1))); do
  echo "GPUCACHE.BOOK eu g$i b$i u$i 86400"
done | cli --csv >"$DIR/book.out"
grep -n '"created"' "$DIR/book.out" | cut -d: -f1 | awk '{ print $1 - 1 }' >"$DIR/acked"
acked=$(wc -l <"$DIR/acked")
echo "bookings acknowledged: $acked (refused: $((BOOKINGS - acked)))"
register "$first" $((GPUS - 1))
echo "registrations refused: $(grep -c 'OOM' "$DIR/register.out" || true) of $GPUS"
sleep 1
echo "evicted keys so far: $(info stats evicted_keys)"

while read -r i; do echo "EXISTS gpucache:{eu}:booking:b$i"; done <"$DIR/acked" | cli >"$DIR/exists.out"
lost=$(grep -c '^0$' "$DIR/exists.out" || true)
while read -r i; do echo "GPUCACHE.BOOK eu g$i second$i mallory 60"; done <"$DIR/acked" | cli --csv >"$DIR/second.out"
rebooked=$(grep -c '"created"' "$DIR/second.out" || true)
echo "acknowledged bookings gone: $lost; GPUs a second user booked while paid for: $rebooked"
echo "bookings_24h: $(stat bookings_24h), bookings_active: $(stat bookings_active), bookings_ended: $(stat bookings_ended)"

echo "== 100 KB over the limit"
gpus_before=$(stat gpus_total)
stream_before=$(cli XLEN 'gpucache:{eu}:events')
evicted_before=$(info stats evicted_keys)
used=$(info memory used_memory)
cli CONFIG SET maxmemory $((used - 102400)) >/dev/null
for i in $(seq 1 50); do cli GPUCACHE.GET eu g0 >/dev/null; sleep 0.02; done
sleep 1
echo "keys evicted: $(( $(info stats evicted_keys) - evicted_before )); GPUs: $gpus_before -> $(stat gpus_total); stream entries: $stream_before -> $(cli XLEN 'gpucache:{eu}:events')"
cli CONFIG SET maxmemory 0 >/dev/null
echo "CHECK ok: $(cli GPUCACHE.CHECK eu | awk 'found { print; exit } $0 == "ok" { found = 1 }')"
