#!/usr/bin/env bash
# Confirms per second with wrk on fresh tokens (each request spends a new one),
# with the relay publishing every verified event to a bound queue.
# Needs PostgreSQL, RabbitMQ and `apt-get install -y wrk`. From the repository root:
#   confirm-gateway/scripts/bench.sh [SECONDS] [CONNECTIONS] [THREADS]
set -euo pipefail
SECS=${1:-10}; CONNS=${2:-64}; THREADS=${3:-2}
PORT=${PORT:-18090}
OPS_PORT=${OPS_PORT:-18091}
RUN=$(date +%s)
export VERIMAIL_SECRET_KEY=bench-secret
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/verimail_bench_$RUN
export VERIMAIL_NAMESPACE=bench-$RUN
export GATEWAY_ADDR=127.0.0.1:$PORT
# /readyz and /metrics are served there, not beside /confirm.
export METRICS_ADDR=127.0.0.1:$OPS_PORT
export CONFIRM_RATE_LIMIT_PER_MINUTE=1000000000
# confirm.lua sends GET: measure confirmations, not button pages.
export CONFIRM_ON_GET=true
export RUST_LOG=${RUST_LOG:-warn,lapin=error}

cargo build -q --release -p verimail-gateway --bin verimail-gateway --example mint --example bench_queue
TOKENS=$(mktemp)
cleanup() {
  [ -n "${GW_PID:-}" ] && kill "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null || true
  target/release/examples/bench_queue delete >/dev/null 2>&1 || true
  psql -q -U postgres -h 127.0.0.1 -c "DROP DATABASE IF EXISTS verimail_bench_$RUN WITH (FORCE)" postgres >/dev/null 2>&1 || true
  rm -f "$TOKENS"
}
trap cleanup EXIT

target/release/examples/bench_queue bind
# Enough fresh tokens for ~20k confirms/s.
target/release/examples/mint --count $((SECS * 20000)) --prefix "b$RUN-" > "$TOKENS"
target/release/verimail-gateway & GW_PID=$!
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$OPS_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
echo "rss before: $(ps -o rss= -p $GW_PID) KiB"
wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency -s confirm-gateway/scripts/confirm.lua \
  "http://127.0.0.1:$PORT" -- "$TOKENS" "$THREADS"
echo "rss after: $(ps -o rss= -p $GW_PID) KiB"
sleep 2
curl -s "http://127.0.0.1:$OPS_PORT/metrics" | grep -E '^verimail_gateway_(confirm_requests_total|outbox_backlog|events_published_total)' | grep -v ' 0$'
echo "events in the bench queue: $(target/release/examples/bench_queue count)"
