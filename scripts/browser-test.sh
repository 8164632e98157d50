#!/usr/bin/env bash
# The gateway's pages in a real browser: headless Chromium renders each page and
# a worker-rendered mail with its code; Playwright presses the verify-email
# button (opening the link confirms nothing, the press verifies) and the
# reset-password button: that press must land on the app with
# verimail=verified&verimail_proof=…, and a second use must answer 410.
# Installs Debian's chromium (+ CJK fonts for the zh-CN pages) and
# playwright-core (under /tmp, not in the repository) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null; then
  echo "browser-test: installing chromium" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk >/dev/null
fi
export PW_DIR=${PW_DIR:-/tmp/verimail-pw}
if [ ! -d "$PW_DIR/node_modules/playwright-core" ]; then
  echo "browser-test: installing playwright-core in $PW_DIR" >&2
  mkdir -p "$PW_DIR"
  (cd "$PW_DIR" && npm install --silent --no-audit --no-fund playwright-core@1 >/dev/null)
fi

out=$(mktemp -d)
log=$(confirm-gateway/scripts/screenshots.sh "$out" 2>&1) || { echo "$log"; exit 1; }
echo "$log"
shots=$(find "$out" -name '*.png' -size +1k | wc -l)
rm -rf "$out"
for flow in "verify flow ok" "click flow ok"; do
  if ! grep -q "$flow" <<<"$log"; then
    echo "browser-test: a button flow did not pass (no \"$flow\")"
    echo "browser: 0 passed, 1 failed"
    exit 1
  fi
done
if ! grep -q "code-mail-en.png" <<<"$log"; then
  echo "browser-test: the mail with its code was not rendered"
  exit 1
fi
echo "browser-test: $shots pages rendered, both button flows ok"
