#!/usr/bin/env bash
# Benchmark: the same marketplace on one plain (non-cluster) redis-server, on a Redis Cluster of
# one master and on a Redis Cluster of $MASTERS masters, all on this machine's loopback, with
# the figures README's "Scale: regions, shards and edges" is built on.
#
# Builds the module and examples/loadgen.rs in release mode, starts the servers (gpucache
# loaded everywhere, no persistence, no replicas, free ports, each cluster's slots split evenly
# over its masters; all stopped on exit), registers $GPUS GPUs over $REGIONS regions and 8 types
# into each (`loadgen load`; in a cluster each region's commands go to the master owning its
# slot, `--cluster yes`), then:
#   1. memory: used_memory before and after the load (bytes per GPU, with and without the event
#      streams; the cluster's own per-key bookkeeping shows as the difference to the plain
#      server), and the streams' exact size per entry (MEMORY USAGE ... SAMPLES 0 / XLEN);
#   2. throughput: for each op of $OPS, $RUNS rounds of the three set-ups one after the other
#      (the order rotates each round), $REQUESTS requests pipelined $PIPELINE deep over
#      $CONNECTIONS connections (spread evenly over a cluster's masters, each sending commands
#      of its master's regions only); ops/s, the ratios, and the servers' CPU per command
#      (INFO cpu used_cpu_user + used_cpu_sys of every node, over the commands counted by INFO
#      commandstats);
#   3. notification fan-out, on the plain server: keyspace messages per command, and its CPU per
#      command with 0, 10 and 50 connections subscribed to `__keyspace@0__:gpucache:*` (what
#      each edge's notification link subscribes to; `loadgen subscribe`);
#   4. bookings: $BOOKINGS GPUs booked for a day on the plain server; bytes per booking.
#
#   scripts/bench-cluster.sh                 # defaults below
#   GPUS=48000 REQUESTS=30000 RUNS=3 scripts/bench-cluster.sh
#
# Environment: GPUS (160000: 10,000 per region), REGIONS (16), MASTERS (3), REQUESTS (60000
# per measurement), PIPELINE (16), CONNECTIONS (6), RUNS (3), OPS ("book_cancel price"),
# NOTIFY (notify-keyspace-events of every server, default "Kd" as redis.conf.example),
# SUBSCRIBERS ("0 10 50"), BOOKINGS (GPUS / 4).
#
# Every process runs on the same cores: on a 2-core machine several masters cannot add up to
# several times one master's throughput (they share the cores with each other and with the
# client; each run prints the cores the servers and loadgen used), so read the cluster figures
# as "what cluster mode costs, and whether shards add up on the cores there are", and CPU per
# command as the per-shard cost that does not depend on the core count.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

GPUS="${GPUS:-160000}"
REGIONS="${REGIONS:-16}"
MASTERS="${MASTERS:-3}"
REQUESTS="${REQUESTS:-60000}"
PIPELINE="${PIPELINE:-16}"
CONNECTIONS="${CONNECTIONS:-6}"
RUNS="${RUNS:-3}"
OPS="${OPS:-book_cancel price}"
NOTIFY="${NOTIFY-Kd}"
SUBSCRIBERS="${SUBSCRIBERS:-0 10 50}"
BOOKINGS="${BOOKINGS:-$((GPUS / 4))}"
TYPES=8

echo "== machine"
echo "nproc: $(nproc)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "redis: $(redis-server --version)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

echo "== build"
cargo build --release --quiet
cargo build --release --example loadgen --quiet
MODULE="$PWD/target/release/libgpucache.so"
LOADGEN="$PWD/target/release/examples/loadgen"
echo "module: $MODULE (work tree $(git describe --always --dirty 2>/dev/null || echo '?'))"

. scripts/lib.sh
DIR="$(mktemp -d)"
ALL_PORTS=()
cleanup() {
  local port pidfile
  for port in "${ALL_PORTS[@]}"; do
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  done
  for pidfile in "$DIR"/*/redis.pid; do
    [ -s "$pidfile" ] || continue
    local pid
    pid="$(cat "$pidfile")"
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill "$pid" 2>/dev/null || true
  done
  [ -n "${SUB_PID:-}" ] && kill "$SUB_PID" 2>/dev/null
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cli() {
  local port="$1"
  shift
  redis-cli -p "$port" "$@"
}
# info <port> <section> <field>
info() { cli "$1" INFO "$2" | tr -d '\r' | awk -F: -v f="$3" '$1 == f { print $2 }'; }
cluster_info() { cli "$1" CLUSTER INFO | tr -d '\r' | awk -F: -v f="$2" '$1 == f { print $2 }'; }

# start_node <name> <yes|no: cluster>: starts a server, prints its port.
declare -A BUS
start_node() {
  local name="$1" cluster="$2" dir="$DIR/$1" port bus extra=()
  mkdir -p "$dir"
  port="$(free_port)"
  if [ "$cluster" = yes ]; then
    bus="$(free_port)"
    [ "$bus" != "$port" ] || bus="$(free_port)"
    extra=(--cluster-enabled yes --cluster-port "$bus" --cluster-config-file nodes.conf
      --cluster-node-timeout 5000)
    echo "$bus" >"$dir/bus"
  fi
  LC_ALL=C redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    --notify-keyspace-events "$NOTIFY" "${extra[@]}" \
    --loadmodule "$MODULE" AVAILABILITY_TTL 86400 PRICING_TTL 86400 >/dev/null
  for _ in $(seq 1 100); do
    cli "$port" ping >/dev/null 2>&1 && break
    sleep 0.05
  done
  cli "$port" MODULE LIST | grep -q gpucache || {
    echo "redis-server $name did not start with gpucache; log:" >&2
    cat "$dir/redis.log" >&2
    return 1
  }
  echo "$port"
}

# make_cluster <name> <masters>: a cluster of that many masters, slots split evenly; prints
# the masters' ports.
make_cluster() {
  local name="$1" n="$2" ports=() i port
  for i in $(seq 1 "$n"); do
    port="$(start_node "$name-$i" yes)"
    ports+=("$port")
    ALL_PORTS+=("$port")
  done
  for i in $(seq 1 $((n - 1))); do
    cli "${ports[0]}" CLUSTER MEET 127.0.0.1 "${ports[$i]}" "$(cat "$DIR/$name-$((i + 1))/bus")" >/dev/null
  done
  for _ in $(seq 1 300); do
    local known=1
    for port in "${ports[@]}"; do
      [ "$(cluster_info "$port" cluster_known_nodes)" = "$n" ] || known=0
    done
    [ "$known" = 1 ] && break
    sleep 0.1
  done
  for i in $(seq 0 $((n - 1))); do
    cli "${ports[$i]}" CLUSTER ADDSLOTSRANGE $((16384 * i / n)) $((16384 * (i + 1) / n - 1)) >/dev/null
  done
  for _ in $(seq 1 300); do
    local ready=1
    for port in "${ports[@]}"; do
      [ "$(cluster_info "$port" cluster_state)" = ok ] || ready=0
      [ "$(cluster_info "$port" cluster_slots_ok)" = 16384 ] || ready=0
      [ "$(cluster_info "$port" cluster_known_nodes)" = "$n" ] || ready=0
    done
    [ "$ready" = 1 ] && break
    sleep 0.1
  done
  [ "$ready" = 1 ] || { echo "cluster $name did not converge" >&2; return 1; }
  echo "${ports[*]}"
}

declare -A PORTS CLUSTER
PORTS[plain]="$(start_node plain no)"
ALL_PORTS+=("${PORTS[plain]}")
CLUSTER[plain]=no
PORTS[c1]="$(make_cluster c1 1)"
CLUSTER[c1]=yes
PORTS[cN]="$(make_cluster cN "$MASTERS")"
CLUSTER[cN]=yes
ALL_PORTS=(${PORTS[plain]} ${PORTS[c1]} ${PORTS[cN]})
SETUPS=(plain c1 cN)
first() { echo "${PORTS[$1]%% *}"; }
echo "servers: plain ${PORTS[plain]}; cluster of 1: ${PORTS[c1]}; cluster of $MASTERS: ${PORTS[cN]}"
echo "notify-keyspace-events '$NOTIFY'"

# sum_info <setup> <section> <field>: the field summed over the set-up's nodes.
sum_info() {
  local port total=0 v
  for port in ${PORTS[$1]}; do
    v="$(info "$port" "$2" "$3")"
    total="$(awk -v a="$total" -v b="${v:-0}" 'BEGIN { printf "%.6f", a + b }')"
  done
  echo "$total"
}
cpu() { awk -v a="$(sum_info "$1" cpu used_cpu_user)" -v b="$(sum_info "$1" cpu used_cpu_sys)" 'BEGIN { printf "%.6f", a + b }'; }
# calls <setup>: gpucache.* commands counted by INFO commandstats on the set-up's nodes.
calls() {
  local port total=0 c
  for port in ${PORTS[$1]}; do
    c="$(cli "$port" INFO commandstats | tr -d '\r' | awk -F'[:,=]' '$1 ~ /^cmdstat_gpucache\./ { c += $3 } END { print c + 0 }')"
    total=$((total + c))
  done
  echo "$total"
}
resetstat() {
  local port
  for port in ${PORTS[$1]}; do cli "$port" CONFIG RESETSTAT >/dev/null; done
}
# stream <setup> <region> <field>: MEMORY USAGE (exact) or XLEN of a region's event stream.
stream() {
  local key="gpucache:{r$2}:events"
  case $3 in
    bytes) redis-cli -c -p "$(first "$1")" MEMORY USAGE "$key" SAMPLES 0 | tr -d '\r' ;;
    len) redis-cli -c -p "$(first "$1")" XLEN "$key" | tr -d '\r' ;;
  esac
}
streams_total() {
  local r total=0 b
  for r in $(seq 0 $((REGIONS - 1))); do
    b="$(stream "$1" "$r" "$2")"
    total=$((total + ${b:-0}))
  done
  echo "$total"
}

echo
echo "== 1. load and memory ($GPUS GPUs, $REGIONS regions, $TYPES types)"
declare -A MEM_BEFORE MEM_AFTER
for s in "${SETUPS[@]}"; do
  MEM_BEFORE[$s]="$(sum_info "$s" memory used_memory)"
  echo "$s: $("$LOADGEN" load --port "$(first "$s")" --cluster "${CLUSTER[$s]}" --gpus "$GPUS" \
    --regions "$REGIONS" --types "$TYPES" --connections 2)"
  MEM_AFTER[$s]="$(sum_info "$s" memory used_memory)"
done
for s in "${SETUPS[@]}"; do
  sb="$(streams_total "$s" bytes)"
  sl="$(streams_total "$s" len)"
  awk -v s="$s" -v b="${MEM_BEFORE[$s]}" -v a="${MEM_AFTER[$s]}" -v sb="$sb" -v sl="$sl" -v n="$GPUS" 'BEGIN {
    printf "%-6s used_memory +%d bytes: %.0f bytes per GPU, %.0f without the streams (%d entries, %d bytes, %.1f bytes per entry)\n",
      s, a - b, (a - b) / n, (a - b - sb) / n, sl, sb, sb / sl }'
done
if [ "$MASTERS" -gt 1 ]; then
  echo "regions per master (cluster of $MASTERS):"
  for port in ${PORTS[cN]}; do
    echo "  $port: $(info "$port" gpucache gpucache_regions) regions, used_memory $(info "$port" memory used_memory)"
  done
fi

# CPU seconds (user + sys) of the children of the shell that wrote `times` to file $1.
child_cpu() { awk 'NR == 2 { gsub(/[ms]/, " "); print $1 * 60 + $2 + $3 * 60 + $4 }' "$1"; }
# measure <setup> <op>: prints "<ops/s> <server cpu us per command> <commands> <server cores>
# <client cores>" (cores: CPU seconds per second of the run, warm-up included).
measure() {
  local s="$1" op="$2" c0 c1 line n t0 t1 l0 l1
  resetstat "$s"
  c0="$(cpu "$s")"
  times >"$DIR/times0"
  t0="$(date +%s.%N)"
  line="$("$LOADGEN" run --port "$(first "$s")" --cluster "${CLUSTER[$s]}" --op "$op" \
    --requests "$REQUESTS" --pipeline "$PIPELINE" --connections "$CONNECTIONS" --gpus "$GPUS" \
    --regions "$REGIONS" --types "$TYPES")"
  t1="$(date +%s.%N)"
  times >"$DIR/times1"
  l0="$(child_cpu "$DIR/times0")"
  l1="$(child_cpu "$DIR/times1")"
  c1="$(cpu "$s")"
  n="$(calls "$s")"
  awk -v line="$line" -v c0="$c0" -v c1="$c1" -v n="$n" -v t0="$t0" -v t1="$t1" -v l0="$l0" -v l1="$l1" 'BEGIN {
    match(line, /ops_per_s=[0-9.]+/); ops = substr(line, RSTART + 10, RLENGTH - 10)
    printf "%s %.1f %d %.2f %.2f\n", ops, (c1 - c0) * 1e6 / n, n, (c1 - c0) / (t1 - t0), (l1 - l0) / (t1 - t0) }'
}

echo
echo "== 2. throughput: $CONNECTIONS connections, pipeline $PIPELINE, $REQUESTS requests per measurement"
for op in $OPS; do
  if [ "$op" = price ]; then
    # As in bench.sh: the first PRICE of a type moves its listed GPUs to the type-price index
    # once (O(GPUs of the type)); done beforehand on every set-up, so no run measures it.
    for s in "${SETUPS[@]}"; do
      for r in $(seq 0 $((REGIONS - 1))); do
        for t in $(seq 0 $((TYPES - 1))); do
          redis-cli -c -p "$(first "$s")" GPUCACHE.PRICE "r$r" "t$t" 1 >/dev/null
        done
      done
    done
  fi
  for run in $(seq 1 "$RUNS"); do
    for k in 0 1 2; do
      s="${SETUPS[$(((run - 1 + k) % 3))]}"
      read -r ops us n sc lc <<<"$(measure "$s" "$op")"
      echo "$op run $run $s: ops_per_s=$ops cpu_us_per_command=$us commands=$n cores: servers $sc, loadgen $lc"
      echo "$op $run $s $ops $us" >>"$DIR/results"
    done
  done
  sb="$(streams_total plain bytes)"
  sl="$(streams_total plain len)"
  awk -v op="$op" -v sb="$sb" -v sl="$sl" 'BEGIN {
    printf "  event streams after %s (plain server): %d entries in %d bytes, %.1f bytes per entry\n", op, sl, sb, sb / sl }'
  if [ "$MASTERS" -gt 1 ]; then
    echo "  last $op run on the cluster of $MASTERS, commands per master:$(for port in ${PORTS[cN]}; do
      printf ' %s' "$(cli "$port" INFO commandstats | tr -d '\r' | awk -F'[:,=]' '$1 ~ /^cmdstat_gpucache\./ { c += $3 } END { print c + 0 }')"
    done)"
  fi
done


echo
echo "== 3. notification fan-out (plain server, book_cancel, NOTIFY='$NOTIFY')"
P="${PORTS[plain]}"
for run in $(seq 1 "$RUNS"); do
for subs in $SUBSCRIBERS; do
  SUB_PID=""
  if [ "$subs" -gt 0 ]; then
    "$LOADGEN" subscribe --port "$P" --connections "$subs" >"$DIR/subscribe.out" &
    SUB_PID=$!
    for _ in $(seq 1 200); do
      [ "$(cli "$P" PUBSUB NUMSUB loadgen:stop | tail -1 | tr -d '\r')" = "$subs" ] && break
      sleep 0.05
    done
  fi
  read -r ops us n _ <<<"$(measure plain book_cancel)"
  line="subscribers=0 messages=0 bytes=0"
  if [ -n "$SUB_PID" ]; then
    cli "$P" PUBLISH loadgen:stop 1 >/dev/null
    wait "$SUB_PID"
    SUB_PID=""
    line="$(cat "$DIR/subscribe.out")"
  fi
  awk -v subs="$subs" -v ops="$ops" -v us="$us" -v n="$n" -v line="$line" 'BEGIN {
    split(line, f, /[ =]/); m = f[4]; b = f[6]
    printf "subscribers %3d: %s ops/s, %.1f us CPU per command; %.2f messages and %.0f bytes per command per subscriber\n",
      subs, ops, us, subs ? m / subs / n : 0, subs ? b / subs / n : 0 }'
  echo "fanout $subs $ops $us" >>"$DIR/results"
done
done

echo
echo "== 4. bookings ($BOOKINGS GPUs booked for a day, plain server)"
m0="$(info "$P" memory used_memory)"
s0="$(streams_total plain bytes)"
awk -v n="$BOOKINGS" -v r="$REGIONS" 'BEGIN {
  for (i = 0; i < n; i++) printf "GPUCACHE.BOOK r%d g%07d mem-%d u 86400\r\n", i % r, i, i }' |
  redis-cli -p "$P" --pipe | tail -1
m1="$(info "$P" memory used_memory)"
s1="$(streams_total plain bytes)"
active="$(cli "$P" GPUCACHE.STATS | tr -d '\r' | awk 'prev == "bookings_active" { print; exit } { prev = $0 }')"
awk -v m0="$m0" -v m1="$m1" -v s0="$s0" -v s1="$s1" -v n="$active" 'BEGIN {
  printf "%d bookings active: used_memory +%d bytes, streams %+d bytes: %.0f bytes per booking besides the streams\n",
    n, m1 - m0, s1 - s0, (m1 - m0 - (s1 - s0)) / n }'

echo
echo "== results ($RUNS runs each; median [min-max])"
awk -v masters="$MASTERS" '
  function sort(a, n,   i, j, t) { for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t } }
  function summary(list,   a, n) { n = split(list, a, " "); sort(a, n); return sprintf("%s [%s-%s]", a[int((n + 1) / 2)], a[1], a[n]) }
  $1 == "fanout" { fops[$2] = fops[$2] " " $3; fcpu[$2] = fcpu[$2] " " $4; subs[$2] = 1; next }
  { ops[$1, $3] = ops[$1, $3] " " $4; cpu[$1, $3] = cpu[$1, $3] " " $5; v[$1, $2, $3] = $4; o[$1] = 1; runs[$1, $2] = 1 }
  END {
    for (op in o) {
      printf "%s\n", op
      printf "  ops/s          plain %-24s cluster of 1 %-24s cluster of %d %s\n", summary(ops[op, "plain"]), summary(ops[op, "c1"]), masters, summary(ops[op, "cN"])
      printf "  CPU us/command plain %-24s cluster of 1 %-24s cluster of %d %s\n", summary(cpu[op, "plain"]), summary(cpu[op, "c1"]), masters, summary(cpu[op, "cN"])
      r1 = ""; r2 = ""
      for (k in runs) { split(k, p, SUBSEP); if (p[1] != op) continue
        r1 = r1 " " sprintf("%.2f", v[op, p[2], "cN"] / v[op, p[2], "c1"]); r2 = r2 " " sprintf("%.2f", v[op, p[2], "c1"] / v[op, p[2], "plain"]) }
      printf "  ratio per run: cluster of %d / cluster of 1 %s; cluster of 1 / plain %s\n", masters, summary(r1), summary(r2)
    }
    for (k in subs) printf "book_cancel with %3d subscribers: ops/s %-24s CPU us/command %s\n", k, summary(fops[k]), summary(fcpu[k])
  }' "$DIR/results"
