#!/usr/bin/env bash
# Runs every test of verimail against the real RabbitMQ and PostgreSQL of this
# machine: the Python and Node examples, then the whole Cargo workspace (unit,
# integration, end-to-end and doc tests). `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
# The node-loss test starts a three-node RabbitMQ cluster beside the machine's
# broker; take it down however the tests end.
trap 'scripts/rabbitmq-cluster.sh down >/dev/null 2>&1 || true' EXIT

# The end-to-end itsdangerous test checks links against Python's itsdangerous.
python3 -c "import itsdangerous" 2>/dev/null || pip install --quiet itsdangerous

if [ -x examples/run-examples.sh ]; then
  examples/run-examples.sh
fi

# The gateway's pages in headless Chromium, and the reset-password button clicked.
scripts/browser-test.sh

# The end-to-end tests start the real binaries: build them first, once.
cargo build --workspace --bins
cargo test --workspace
