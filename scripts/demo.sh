#!/usr/bin/env bash
# Loads a small marketplace into a running gpucache and walks one booking flow.
# PORT selects the server (default 6379).
set -euo pipefail
cli() { redis-cli -p "${PORT:-6379}" "$@"; }
step() { printf '\n== %s\n' "$*"; }

step "register GPUs in two regions"
cli GPUCACHE.REGISTER eu-west a100-1 PROVIDER lambda TYPE A100 PRICE 2.49 MEMORY 80 CORES 6912 SCORE 9.1 >/dev/null
cli GPUCACHE.REGISTER eu-west a100-2 PROVIDER lambda TYPE A100 PRICE 2.29 MEMORY 40 CORES 6912 SCORE 8.7 >/dev/null
cli GPUCACHE.REGISTER eu-west a100-3 PROVIDER runpod TYPE A100 PRICE 1.99 MEMORY 40 CORES 6912 SCORE 8.5 >/dev/null
cli GPUCACHE.REGISTER eu-west h100-1 PROVIDER runpod TYPE H100 PRICE 3.99 MEMORY 80 CORES 16896 SCORE 9.8 >/dev/null
cli GPUCACHE.REGISTER eu-west l4-1 PROVIDER vast TYPE L4 PRICE 0.59 MEMORY 24 CORES 7424 SCORE 5.2 >/dev/null
cli GPUCACHE.REGISTER us-east h100-9 PROVIDER lambda TYPE H100 PRICE 3.49 MEMORY 80 CORES 16896 SCORE 9.8 >/dev/null
echo "6 GPUs registered"

step "cheapest available GPUs in eu-west"
cli GPUCACHE.AVAILABLE eu-west LIMIT 3

step "top performing GPUs with at least 40 GB"
cli GPUCACHE.AVAILABLE eu-west SORT SCORE MINMEMORY 40 LIMIT 3

step "the A100 order book"
cli GPUCACHE.ORDERBOOK eu-west A100

step "alice books the cheapest A100 for two hours"
cli GPUCACHE.BOOK eu-west a100-3 demo-booking-1 alice 7200

step "a second booking of the same GPU is refused"
cli GPUCACHE.BOOK eu-west a100-3 demo-booking-2 bob 3600 || true

step "the GPU record now"
cli GPUCACHE.GET eu-west a100-3

step "A100 price drops to 1.89 for the whole region"
cli GPUCACHE.PRICE eu-west A100 1.89

step "provider runpod goes into maintenance"
cli GPUCACHE.PROVIDER eu-west runpod maintenance

step "A100s available under 2.00"
cli GPUCACHE.AVAILABLE eu-west TYPE A100 MAXPRICE 2

step "alice cancels; runpod comes back"
cli GPUCACHE.CANCEL eu-west demo-booking-1
cli GPUCACHE.PROVIDER eu-west runpod online >/dev/null

step "bob books two A100s: a third of them is left, so demand pricing lifts the last one (x1.2)"
cli GPUCACHE.BOOK eu-west a100-1 demo-booking-3 bob 3600 >/dev/null
cli GPUCACHE.BOOK eu-west a100-2 demo-booking-4 bob 3600 >/dev/null
cli GPUCACHE.GET eu-west a100-3 | paste - - | grep -E '^(price|base_price|demand_multiplier)\b'

step "market statistics for eu-west (last 24 hours included)"
cli GPUCACHE.STATS eu-west

step "statistics over every region on this server"
cli GPUCACHE.STATS | paste - - | head -20

step "the last three invalidation events"
cli XREVRANGE 'gpucache:{eu-west}:events' + - COUNT 3
