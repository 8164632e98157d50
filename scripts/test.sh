#!/usr/bin/env bash
# Runs every test of verimail against the real RabbitMQ and PostgreSQL of this
# machine: the Python and Node examples, the gateway's pages in a browser, then
# the whole Cargo workspace (unit, integration, end-to-end and doc tests).
# `.ci/run` calls exactly this.
#
# Test binaries that share the machine's broker and database without stopping
# them run in parallel groups; the two tests that stop the machine's RabbitMQ
# or PostgreSQL, and the three-node cluster test, run afterwards, alone.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
# The node-loss test starts a three-node RabbitMQ cluster beside the machine's
# broker; take it down however the tests end.
trap 'scripts/rabbitmq-cluster.sh down >/dev/null 2>&1 || true' EXIT

# The delivery tests start aws-ses-v2-local (an SES v2 emulator, npm) from
# tests/node, pinned by its package-lock.json.
(cd tests/node && npm ci --silent --no-audit --no-fund >/dev/null)

# The end-to-end itsdangerous test checks links against Python's itsdangerous.
python3 -c "import itsdangerous" 2>/dev/null || pip install --quiet itsdangerous

if [ -x examples/run-examples.sh ]; then
  examples/run-examples.sh
fi

# Build the binaries the end-to-end tests start and every test binary once,
# before the groups start (they share the target dir). One build with every
# target keeps one feature set, so the binaries are not compiled twice.
cargo build --workspace --all-targets

# The gateway's pages and a mail with its code in headless Chromium, and the
# buttons pressed (it runs the binaries just built).
scripts/browser-test.sh

# The tests that stop the machine's broker or database (tests/tests/faults/restarts.rs),
# by their full path in the test binary: `--exact` matches nothing less.
machine_tests=(restarts::a_broker_restart_while_requests_and_clicks_flow_loses_nothing
  restarts::a_database_restart_while_requests_and_clicks_flow_loses_nothing_and_nothing_crash_loops)
# The shared send budget test (tests/tests/delivery/rate_limit.rs).
rate_test=rate_limit::three_workers_share_one_rate_limit_and_a_fourth_does_not_raise_it
skip_machine=()
for t in "${machine_tests[@]}"; do skip_machine+=(--skip "$t"); done

logs=$(mktemp -d)
# Every group selects `--workspace` and names its test targets, as the build
# above did: `-p verimail-tests` alone unifies fewer features (serde_core,
# sha2, tokio-rustls…) and compiled 63 crates a second time, minutes and
# gigabytes. Test target names are unique across the workspace for this.
declare -A groups=(
  [crates]="cargo test --workspace --exclude verimail-tests"
  [e2e]="cargo test --workspace --test e2e --test hostile --test codes"
  [faults]="cargo test --workspace --test faults -- ${skip_machine[*]}"
  [delivery]="cargo test --workspace --test delivery -- --skip $rate_test"
)
# A new test binary in tests/tests/ (a file, or a directory with its main.rs)
# must join a group: fail rather than skip it.
for f in tests/tests/*.rs tests/tests/*/main.rs; do
  [ -e "$f" ] || continue
  case "$f" in
    */main.rs) t=$(basename "$(dirname "$f")") ;;
    *) t=$(basename "$f" .rs) ;;
  esac
  # The groups pick targets by name across the workspace: a second package's
  # test of the same name would run in two groups.
  for other in */tests/"$t".rs */tests/"$t"/main.rs; do
    [ -e "$other" ] && [ "${other%%/*}" != tests ] && {
      echo "scripts/test.sh: $other has the name of test binary $t in tests/tests"
      exit 1
    }
  done
  [ "$t" = cluster ] || grep -q -- "--test $t\b" <<<"${groups[*]}" || {
    echo "scripts/test.sh: $f (test binary $t) is in no group"
    exit 1
  }
done
declare -A pids=()
for name in "${!groups[@]}"; do
  echo "== tests: $name (${groups[$name]})"
  bash -c "${groups[$name]}" >"$logs/$name.log" 2>&1 &
  pids[$name]=$!
done
failed=()
for name in "${!pids[@]}"; do
  if wait "${pids[$name]}"; then
    echo "== tests: $name passed"
  else
    failed+=("$name")
  fi
  # Every group's summary, and the whole log of a failed one.
  grep -E "^test result|^     Running|FAILED|panicked" "$logs/$name.log" || true
done
for name in "${failed[@]}"; do
  echo "== tests: $name FAILED; its log:"
  cat "$logs/$name.log"
done
[ ${#failed[@]} -eq 0 ] || exit 1

# The shared send budget is measured at the sink (50/s over any 2 s): alone,
# so the other groups' load does not delay the workers' sends into bursts.
echo "== tests: MAIL_RATE_LIMIT across workers (alone)"
cargo test --workspace --test delivery -- --exact "$rate_test"
echo "== tests: the machine's broker and database restarted (alone)"
VERIMAIL_FAULT_TESTS=1 cargo test --workspace --test faults -- --exact "${machine_tests[@]}"
echo "== tests: a three-node RabbitMQ cluster loses a node (alone)"
cargo test --workspace --test cluster
