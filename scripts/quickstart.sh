#!/usr/bin/env bash
# The quickstart: builds verimail, starts the worker and the gateway against
# the local RabbitMQ and PostgreSQL, walks one request through (publish → mail
# in ./outbox → link clicked → verimail.email.verified), then keeps running
# until Ctrl-C. Settings come from the environment or ./.env (see README).
# The first build compiles every dependency: several minutes (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build -p verimail-cli -p verimail-worker -p verimail-gateway
# `cargo run` finds the binary wherever Cargo puts it (CARGO_TARGET_DIR
# included); the demo starts the worker and the gateway from the same folder.
exec cargo run --quiet -p verimail-cli --bin verimail -- demo
