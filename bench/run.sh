#!/usr/bin/env bash
# verimail's benchmark, every figure and ratio in one run:
#   1. broker-only ceiling          (verimail-bench ceiling)
#   2. worker throughput, 1/2/4 processes, RSS   (verimail-bench worker)
#   3. publish→SMTP-acceptance latency at fixed rates   (verimail-bench latency)
#   4. gateway confirms/s under wrk, RSS          (verimail-bench gateway)
#   5. the in-app reference: Python worker and Flask confirm under gunicorn -w 2
#   6. the final table with ratios and the issues' targets   (verimail-bench report)
#
#   bench/run.sh                 # everything (about 6-8 minutes after the build)
#   BENCH_N=5000 bench/run.sh    # fewer requests per throughput run
#
# Environment: BENCH_N (20000: requests per worker/ceiling run), BENCH_CONCURRENCY (256: the
# workers' WORKER_CONCURRENCY and the ceiling's prefetch; the former default 64 is run too),
# BENCH_REF_N (2000: the reference worker is ~100x slower, so it drains fewer), BENCH_CODES (150000: codes
# written for the codes run), BENCH_TOKENS (150000: gateway tokens,
# each used once while they last), BENCH_RATES (200,500,1000), BENCH_RATE_SECONDS (10),
# BENCH_PROCESSES (1,2,4), BENCH_SKIP_BUILD=1, BENCH_ONLY (space-separated subset of:
# ceiling worker suppressions http chunking latency gateway codes reference). Needs RabbitMQ and PostgreSQL running
# (scripts/services.sh); installs postfix (for smtp-sink), wrk and the reference's venv if missing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REF=$ROOT/bench/reference
BIN=$ROOT/target/release
N=${BENCH_N:-20000}
REF_N=${BENCH_REF_N:-2000}
RATES=${BENCH_RATES:-200,500,1000}
RATE_SECONDS=${BENCH_RATE_SECONDS:-10}
PROCESSES=${BENCH_PROCESSES:-1,2,4}
# WORKER_CONCURRENCY of the worker runs and the ceiling's prefetch (one setting for both).
export BENCH_CONCURRENCY=${BENCH_CONCURRENCY:-256}
CONCURRENCY=$BENCH_CONCURRENCY
ONLY=${BENCH_ONLY:-ceiling worker suppressions http chunking latency gateway codes reference}
SMTP_PORT=${BENCH_SMTP_PORT:-2525}
REF_PORT=${BENCH_REF_PORT:-8081}
RUN=$(date +%Y%m%d-%H%M%S)-$$
WORK=$(mktemp -d "/tmp/verimail-bench-$RUN.XXXX")
export BENCH_RESULTS=$WORK/results.txt
export BENCH_N=$N
export RUST_LIB_BACKTRACE=0  # errors print one line, not a backtrace
: >"$BENCH_RESULTS"

wants() { [[ " $ONLY " == *" $1 "* ]]; }
FAILED=()
# A failed step (the broker restarted under it, a binary misbehaved) is reported and the run goes
# on: the table then says "not measured" for its figures.
step() {
  local name=$1
  shift
  if ! "$@"; then
    echo "!! step '$name' failed (see above); continuing" >&2
    FAILED+=("$name")
  fi
}
say() { printf '\n== %s\n' "$*"; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done
  echo "port $1 did not open" >&2
  return 1
}

PIDS=()
REF_QUEUE=
REF_EXCHANGE=
REF_DB=
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n $REF_QUEUE && -x $BIN/verimail-bench ]]; then
    "$BIN/verimail-bench" delete-amqp --queue "$REF_QUEUE" --exchange "$REF_EXCHANGE" || true
  fi
  if [[ -n $REF_DB ]]; then
    psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS \"$REF_DB\" WITH (FORCE)" \
      >/dev/null 2>&1 || true
  fi
  rm -f "$WORK"/tokens-*.txt
}
trap cleanup EXIT

# --- tools -----------------------------------------------------------------------------------
if ! command -v smtp-sink >/dev/null && [[ ! -x /usr/sbin/smtp-sink ]] || ! command -v wrk >/dev/null; then
  say "installing postfix (for smtp-sink) and wrk"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix wrk >/dev/null
  # A machine with systemd would now run an MTA on port 25: the sink is all we want.
  if pgrep -x master >/dev/null; then postfix stop || true; fi
fi
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
if [[ ! -x $REF/.venv/bin/python ]]; then
  say "creating the reference's virtualenv"
  python3 -m venv "$REF/.venv"
  "$REF/.venv/bin/pip" install -q -r "$REF/requirements.txt"
fi
PY=$REF/.venv/bin/python

# --- build -----------------------------------------------------------------------------------
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  say "building release binaries (several minutes on 2 cores the first time)"
  if ! (cd "$ROOT" && cargo build --release -p verimail-worker -p verimail-gateway -p verimail-cli \
    -p verimail-bench --bins); then
    # The bench does not run the CLI: a CLI that does not build must not stop it.
    echo "WARNING: the full release build failed; building worker, gateway and bench only" >&2
    (cd "$ROOT" && cargo build --release -p verimail-worker -p verimail-gateway -p verimail-bench --bins)
  fi
fi
BENCH=$BIN/verimail-bench
for b in verimail-bench verimail-worker verimail-gateway; do
  [[ -x $BIN/$b ]] || { echo "missing $BIN/$b: build failed?" >&2; exit 1; }
done

# --- machine ---------------------------------------------------------------------------------
"$BENCH" record date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
"$BENCH" record nproc "$(nproc)"
"$BENCH" record cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
"$BENCH" record load_before "$(cut -d' ' -f1-3 /proc/loadavg)"
say "$(date -u) — nproc $(nproc) — $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) — load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "results: $BENCH_RESULTS"

# --- the SMTP sink ---------------------------------------------------------------------------
if ! port_open "$SMTP_PORT"; then
  "$SMTP_SINK" -c -u nobody "127.0.0.1:$SMTP_PORT" 1000 >/dev/null 2>&1 &
  PIDS+=($!)
  wait_port "$SMTP_PORT"
fi
export BENCH_MAIL_URL=smtp+plain://127.0.0.1:$SMTP_PORT

# --- 1-4: verimail ---------------------------------------------------------------------------
if wants ceiling; then
  say "1. broker-only ceiling: $N messages, quorum queue, prefetch $CONCURRENCY, one confirmed publish per message"
  step ceiling "$BENCH" ceiling --n "$N"
fi
if wants worker; then
  say "2. verimail-worker throughput: $N requests preloaded, $PROCESSES process(es), WORKER_CONCURRENCY $CONCURRENCY"
  step worker "$BENCH" worker --n "$N" --processes "$PROCESSES"
  say "2b. the same, 1 process at the former default WORKER_CONCURRENCY (64; the default is 256)"
  step worker_default "$BENCH" worker --n "$N" --processes 1 --concurrency 64 --label worker_default
fi
if wants suppressions; then
  say "2c. the same, 1 process, with 0 and 100,000 suppression entries loaded, three runs each, interleaved"
  step worker_supp "$BENCH" worker --n "$N" --processes 1 --suppressions 0,100000,100000,0,0,100000 --label worker_supp
fi
if wants http; then
  say "2d. HTTP API delivery: 1 process through the generic https target into a stand-in answering at once"
  step http "$BENCH" http --n "$N"
fi
if wants chunking; then
  # smtp-sink has no CHUNKING; Postfix's smtpd (3.4+), Exchange and Gmail offer it, and the
  # worker then sends each mail in one round trip (BDAT). The bench's own sink offers it.
  CHUNK_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$BENCH" smtp-sink --listen "127.0.0.1:$CHUNK_PORT" >/dev/null 2>&1 &
  PIDS+=($!)
  wait_port "$CHUNK_PORT"
  say "2e. the same, 1 process, into a sink that offers CHUNKING (verimail-bench smtp-sink): one round trip per mail"
  step worker_chunking "$BENCH" worker --n "$N" --processes 1 --label worker_chunking \
    --mail-url "smtp+plain://127.0.0.1:$CHUNK_PORT"
fi
if wants latency; then
  say "3. latency, one worker: offered $RATES requests/s for $RATE_SECONDS s each (publish→data.sent_at)"
  step latency "$BENCH" latency --rates "$RATES" --seconds "$RATE_SECONDS"
fi
if wants gateway; then
  say "4. verimail-gateway: wrk -t2 -c32 -d10s over fresh v1 tokens (each used once while they last)"
  step gateway "$BENCH" gateway --lua "$REF/confirm.lua" --tokens "${BENCH_TOKENS:-150000}"
fi
if wants codes; then
  say "4b. verimail-gateway codes: wrk -t2 -c32 -d10s, POST /v1/codes/verify with right, fresh codes"
  step codes "$BENCH" codes --lua "$ROOT/bench/codes.lua" --n "${BENCH_CODES:-150000}"
fi

# --- 5: the reference ------------------------------------------------------------------------
if wants reference; then
  export SECRET=bench-reference-secret-$RUN
  REF_DB=verimail_bench_ref_${RUN//-/_}
  export DATABASE_URL=postgresql://postgres@127.0.0.1:5432/$REF_DB
  REF_EXCHANGE=bench-ref-$RUN
  REF_QUEUE=$REF_EXCHANGE.worker
  say "5a. reference worker (Python, in-app pattern): $REF_N requests preloaded, then drained"
  ref_worker() {
    (cd "$REF" && "$PY" ref_worker.py --declare-only --exchange "$REF_EXCHANGE" --queue "$REF_QUEUE") &&
      (cd "$REF" && "$PY" publish.py --exchange "$REF_EXCHANGE" --count "$REF_N") &&
      (cd "$REF" && timeout $((REF_N / 10 + 120)) "$PY" ref_worker.py --exchange "$REF_EXCHANGE" --queue "$REF_QUEUE" --count "$REF_N" \
        --smtp "127.0.0.1:$SMTP_PORT") 2>"$WORK/ref_worker.log" || { cat "$WORK/ref_worker.log" >&2; return 1; }
    local summary
    summary=$(grep '^ref_worker: processed=' "$WORK/ref_worker.log" | tail -n1)
    echo "  $summary"
    "$BENCH" record ref_worker_n "$REF_N"
    "$BENCH" record ref_worker_mps "$(sed -n 's/.*per_second=\([0-9.]*\).*/\1/p' <<<"$summary")"
    "$BENCH" record ref_worker_rss_kib "$(sed -n 's/.*max_rss_kib=\([0-9]*\).*/\1/p' <<<"$summary")"
  }
  step ref_worker ref_worker

  say "5b. reference confirm: Flask under gunicorn -w 2, wrk -t2 -c32 -d10s"
  TOKENS=$WORK/tokens-ref.txt
  (cd "$REF" && "$PY" mint_tokens.py --count "$N") >"$TOKENS"
  (cd "$REF" && exec "$REF/.venv/bin/gunicorn" -w 2 -b "127.0.0.1:$REF_PORT" --log-level warning \
    ref_confirm:app) &
  GPID=$!
  PIDS+=($GPID)
  wait_port "$REF_PORT"
  step ref_confirm "$BENCH" http-load --label ref_confirm --url "http://127.0.0.1:$REF_PORT" --tokens "$TOKENS" \
    --lua "$REF/confirm.lua" --rss-tree "$GPID"
  kill "$GPID" 2>/dev/null || true
fi

# --- 6: the table ----------------------------------------------------------------------------
"$BENCH" record load_after "$(cut -d' ' -f1-3 /proc/loadavg)"
"$BENCH" report
if ((${#FAILED[@]})); then
  echo
  echo "steps that failed: ${FAILED[*]}"
  exit 1
fi
