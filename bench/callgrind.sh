#!/usr/bin/env bash
# The worker's instructions per mail, counted by valgrind's callgrind: a figure no other load
# on the machine changes (wall-clock CPU per mail moves 10-20 % run to run here).
#
#   bench/callgrind.sh                 # N1=1000 and N2=3000 requests, prints instructions/mail
#   CALLGRIND_KEEP=1 bench/callgrind.sh   # keep the profiles (callgrind_annotate them)
#   CALLGRIND_CHUNKING=1 bench/callgrind.sh   # into a sink offering CHUNKING (the BDAT path)
#
# The release worker runs under callgrind twice, draining N1 and N2 preloaded requests into
# postfix's smtp-sink (`verimail-bench worker --processes 1`); the difference of the two totals
# over N2 - N1 is the cost of one mail without start-up and shutdown. Needs the release
# binaries (bench/run.sh builds them, or `cargo build --release -p verimail-worker -p
# verimail-bench`), RabbitMQ, PostgreSQL, valgrind and smtp-sink.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
N1=${CALLGRIND_N1:-1000}
N2=${CALLGRIND_N2:-3000}
SMTP_PORT=${BENCH_SMTP_PORT:-2526}
WORK=$(mktemp -d /tmp/verimail-callgrind.XXXX)

for tool in valgrind callgrind_annotate; do
  command -v "$tool" >/dev/null || { echo "bench/callgrind.sh: $tool is missing (apt-get install valgrind)" >&2; exit 1; }
done
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
[[ -x $SMTP_SINK ]] || { echo "bench/callgrind.sh: smtp-sink is missing (apt-get install postfix)" >&2; exit 1; }
for b in verimail-bench verimail-worker; do
  [[ -x $BIN/$b ]] || { echo "bench/callgrind.sh: missing $BIN/$b (build the release binaries)" >&2; exit 1; }
done

# The bench starts the worker found beside its own binary: put a copy of the bench next to a
# wrapper that runs the real worker under callgrind.
cp "$BIN/verimail-bench" "$WORK/verimail-bench"
cat >"$WORK/verimail-worker" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$WORK/callgrind.out.\$\$ "$BIN/verimail-worker" "\$@"
EOF
chmod +x "$WORK/verimail-worker"

if [[ ${CALLGRIND_CHUNKING:-0} == 1 ]]; then
  # The bench's own sink, which offers CHUNKING: the worker's one-round-trip BDAT path.
  "$BIN/verimail-bench" smtp-sink --listen "127.0.0.1:$SMTP_PORT" >/dev/null 2>&1 &
else
  "$SMTP_SINK" -c -u nobody "127.0.0.1:$SMTP_PORT" 1000 >/dev/null 2>&1 &
fi
SINK=$!
trap 'kill $SINK 2>/dev/null || true; [[ ${CALLGRIND_KEEP:-0} == 1 ]] || rm -rf "$WORK"' EXIT
export BENCH_MAIL_URL=smtp+plain://127.0.0.1:$SMTP_PORT
export BENCH_RESULTS=$WORK/results.txt RUST_LIB_BACKTRACE=0

total() {
  local n=$1 before out
  before=$(ls "$WORK"/callgrind.out.* 2>/dev/null || true)
  # The worker under valgrind is ~50x slower: one process, a modest prefetch.
  BENCH_CONCURRENCY=${CALLGRIND_CONCURRENCY:-64} "$WORK/verimail-bench" worker --n "$n" --processes 1 ${CALLGRIND_ARGS:-} \
    >"$WORK/bench-$n.log" 2>&1 || { cat "$WORK/bench-$n.log" >&2; exit 1; }
  out=$(comm -13 <(echo "$before") <(ls "$WORK"/callgrind.out.*))
  # awk reads to the end: leaving early would kill callgrind_annotate with SIGPIPE (and
  # pipefail would end this script without a word).
  callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !seen { gsub(",", "", $1); print $1; seen = 1 }'
}

t1=$(total "$N1")
t2=$(total "$N2")
echo "worker instructions: N=$N1: $t1; N=$N2: $t2"
awk -v a="$t1" -v b="$t2" -v n1="$N1" -v n2="$N2" \
  'BEGIN { printf "worker instructions per mail: %.3f M\n", (b - a) / (n2 - n1) / 1e6 }'
[[ ${CALLGRIND_KEEP:-0} == 1 ]] && echo "profiles kept in $WORK"
exit 0
