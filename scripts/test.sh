#!/usr/bin/env bash
# Runs every test of verimail against the real RabbitMQ and PostgreSQL of this
# machine: the Python and Node examples, then the whole Cargo workspace (unit,
# integration, end-to-end and doc tests). `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh

if [ -x examples/run-examples.sh ]; then
  examples/run-examples.sh
fi

# The end-to-end tests start the real binaries: build them first, once.
cargo build --workspace --bins
cargo test --workspace
