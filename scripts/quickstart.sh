#!/usr/bin/env bash
# The quickstart: builds verimail, starts the worker and the gateway against
# the local RabbitMQ and PostgreSQL, walks one request through (publish → mail
# in ./outbox → link clicked → verimail.email.verified), then keeps running
# until Ctrl-C. Settings come from the environment or ./.env (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build --workspace --bins
exec target/debug/verimail demo
