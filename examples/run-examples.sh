#!/usr/bin/env bash
# Runs the Python and Node examples against the real RabbitMQ, in a throwaway
# namespace (no worker or gateway needed): each publish.* must get its request
# to a queue bound to verimail.verification.requested, and each
# subscribe_verified.* must print a verimail.email.verified event published to
# the exchange. Exits non-zero on the first failure.
#
#   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f examples/run-examples.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export VERIMAIL_NAMESPACE="examples-$(date +%s)-$$"
wait_seconds=${EXAMPLES_TIMEOUT:-20}
ns=$VERIMAIL_NAMESPACE
work=$(mktemp -d)

echo "== dependencies"
if [ ! -x "$here/python/.venv/bin/python" ]; then
  python3 -m venv "$here/python/.venv"
fi
"$here/python/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/python/requirements.txt"
py="$here/python/.venv/bin/python"
(cd "$here/node" && npm ci --no-audit --no-fund --silent)

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  "$py" "$here/harness.py" cleanup "$ns.check-python" "$ns.check-node" \
    "$ns.sub.python-example" "$ns.sub.node-example" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Waits until FILE contains TEXT, or fails after $wait_seconds.
wait_for() {
  local file=$1 text=$2 waited=0
  until grep -q -- "$text" "$file" 2>/dev/null; do
    sleep 0.2
    waited=$((waited + 1))
    if [ "$waited" -ge $((wait_seconds * 5)) ]; then
      echo "FAIL: no \"$text\" in $file within ${wait_seconds}s; it holds:" >&2
      cat "$file" >&2 || true
      return 1
    fi
  done
}

run_lang() {
  local lang=$1; shift
  local publish=("$@")
  echo "== $lang: publish"
  "$py" "$here/harness.py" bind "$ns.check-$lang" verimail.verification.requested
  local id
  id=$(cd "$here/$lang" && timeout "$wait_seconds" "${publish[@]}" 42 alice@example.com en)
  [ -n "$id" ] || { echo "FAIL: $lang publish printed no id" >&2; return 1; }
  "$py" "$here/harness.py" expect "$ns.check-$lang" "$id"

  echo "== $lang: subscribe_verified"
  local out="$work/$lang.out" err="$work/$lang.err"
  (cd "$here/$lang" && exec timeout "$wait_seconds" "${subscribe[@]}" --max 1 >"$out" 2>"$err") &
  pids+=($!)
  local sub=$!
  wait_for "$err" "waiting for"
  local event="ev-$lang-$$"
  "$py" "$here/harness.py" emit-verified "$event"
  wait_for "$out" "event=$event"
  wait "$sub" || { echo "FAIL: $lang subscriber exited with $?" >&2; cat "$err" >&2; return 1; }
  echo "ok: $(cat "$out")"
}

subscribe=("$py" subscribe_verified.py)
run_lang python "$py" publish.py
subscribe=(node subscribe_verified.js)
run_lang node node publish.js

echo "examples: 4 passed, 0 failed"
