#!/usr/bin/env bash
# First sanity figures for the in-app reference: worker mails/s draining a pre-filled queue,
# confirms/s under wrk, and RSS. Starts (and stops) its own SMTP sink and gunicorn; needs
# RabbitMQ and PostgreSQL up (scripts/services.sh), smtp-sink (apt-get install postfix) and wrk.
#   bench/reference/run_sanity.sh [REQUESTS=2000]
set -euo pipefail
cd "$(dirname "$0")"

N=${1:-2000}
VENV=${VENV:-.venv}
PORT=${PORT:-8081}
SMTP_PORT=${SMTP_PORT:-2525}
export SECRET=${SECRET:-bench-reference-secret}
export DATABASE_URL=${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/verimail_bench_ref}
RUN=$(date +%s)-$$
EXCHANGE=verimail-bench-ref
QUEUE=verimail-bench-ref.sanity-$RUN
TOKENS=$(mktemp /tmp/ref-tokens.XXXXXX)

if [[ ! -x $VENV/bin/python ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r requirements.txt
fi
PY=$VENV/bin/python

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; return 1; }
max_rss() { # max RSS (KiB) of the given pids, summed, sampled every 0.2 s until the first exits
  local max=0 cur
  while kill -0 "$1" 2>/dev/null; do
    cur=$(ps -o rss= -p "$(IFS=,; echo "$*")" 2>/dev/null | awk '{s+=$1} END {print s+0}')
    (( cur > max )) && max=$cur
    sleep 0.2
  done
  echo "$max"
}

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  "$PY" ref_worker.py --delete-queue --queue "$QUEUE" 2>/dev/null || true
  rm -f "$TOKENS"
}
trap cleanup EXIT

if ! port_open "$SMTP_PORT"; then
  smtp-sink -c -u nobody "127.0.0.1:$SMTP_PORT" 1000 >/dev/null 2>&1 &
  PIDS+=($!)
  wait_port "$SMTP_PORT"
fi

echo "== worker: $N requests published first, then drained"
"$PY" ref_worker.py --declare-only --exchange "$EXCHANGE" --queue "$QUEUE"
"$PY" publish.py --exchange "$EXCHANGE" --count "$N"
"$PY" ref_worker.py --exchange "$EXCHANGE" --queue "$QUEUE" --count "$N" --smtp "127.0.0.1:$SMTP_PORT" &
WPID=$!
echo "worker ps max rss KiB: $(max_rss $WPID)"
wait $WPID

echo "== confirm: gunicorn -w 2, wrk -t2 -c32 -d10s over 2000 tokens"
"$PY" mint_tokens.py --count 2000 > "$TOKENS"
"$VENV/bin/gunicorn" -w 2 -b "127.0.0.1:$PORT" --log-level warning ref_confirm:app &
GPID=$!
PIDS+=($GPID)
wait_port "$PORT"
curl -fsS -o /dev/null "http://127.0.0.1:$PORT/confirm/$(head -n1 "$TOKENS")"
echo "bad token answers $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/confirm/nope.nope.nope")"
wrk -t2 -c32 -d10s -s confirm.lua "http://127.0.0.1:$PORT" -- "$TOKENS"
echo "gunicorn rss KiB (master + workers): $(ps -o rss= --pid $GPID --ppid $GPID | awk '{s+=$1} END {print s}')"
