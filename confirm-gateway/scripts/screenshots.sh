#!/usr/bin/env bash
# Screenshots of the gateway's pages in headless Chromium, and a scripted click
# of the reset-password button (Playwright, when installed under $PW_DIR).
#
# Needs: PostgreSQL and RabbitMQ as in the README, `apt-get install -y chromium
# fonts-noto-cjk`, and for the click flow `npm install playwright-core` in $PW_DIR.
# Usage: confirm-gateway/scripts/screenshots.sh [OUT_DIR]   (from the repository root)
set -euo pipefail

OUT=${1:-docs/screenshots}
PW_DIR=${PW_DIR:-/tmp/pw}
PORT=${PORT:-18080}
APP_PORT=${APP_PORT:-18081}
OPS_PORT=${OPS_PORT:-18082}
RUN=$(date +%s)
DB=verimail_screens_$RUN
mkdir -p "$OUT"

export VERIMAIL_SECRET_KEY=screenshot-secret
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export VERIMAIL_NAMESPACE=screens-$RUN
export GATEWAY_ADDR=127.0.0.1:$PORT
# /healthz is served there, not beside /confirm.
export METRICS_ADDR=127.0.0.1:$OPS_PORT
export PUBLIC_BASE_URL=http://127.0.0.1:$PORT
export RETURN_URL_ALLOWLIST=http://127.0.0.1:$APP_PORT
# The "verified" shots open verify_email links with GET (headless Chromium
# cannot press the button); the reset_password flow below presses it.
export CONFIRM_ON_GET=true
export RUST_LOG=${RUST_LOG:-warn}

cargo build -q -p verimail-gateway --bin verimail-gateway --example mint
BIN=target/debug/verimail-gateway
MINT=target/debug/examples/mint

WORK=$(mktemp -d)
cleanup() {
  [ -n "${GW_PID:-}" ] && kill "$GW_PID" 2>/dev/null || true
  [ -n "${APP_PID:-}" ] && kill "$APP_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  psql -q -U postgres -h 127.0.0.1 -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" postgres >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" & GW_PID=$!
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$OPS_PORT/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

# The page behind return_url: a stand-in for the app's reset-password form.
mkdir -p "$WORK/site"
cat > "$WORK/site/reset.html" <<'HTML'
<!doctype html><meta charset="utf-8"><title>Example app: choose a new password</title>
<body style="font:16px system-ui;margin:3rem"><h1>Example app</h1>
<p>Choose a new password (the app checks <code>verimail_proof</code> from the query).</p></body>
HTML
(cd "$WORK/site" && exec python3 -m http.server "$APP_PORT" --bind 127.0.0.1 >/dev/null 2>&1) & APP_PID=$!

psql -q -U postgres -h 127.0.0.1 "$DB" -c \
  "INSERT INTO requests (id, user_id, email, purpose, locale, return_url, state, sent_at)
   VALUES ('shot-reset-0', 'user-shot-reset-0', 'shot-reset-0@example.com', 'reset_password', 'en',
           'http://127.0.0.1:$APP_PORT/reset.html', 'done', now())"

shot() { # name url [extra chromium flags]
  local name=$1 url=$2; shift 2
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$(mktemp -d)" --hide-scrollbars --window-size=720,640 \
    "$@" --screenshot="$OUT/$name.png" "$url" >/dev/null 2>&1
  test -s "$OUT/$name.png" && echo "wrote $OUT/$name.png"
}

shot verified-en "$($MINT --links --prefix "shot-v-en-$RUN-" --locale en)"
shot verified-zh-CN "$($MINT --links --prefix "shot-v-zh-$RUN-" --locale zh-CN)"
shot confirm-button-en "$($MINT --links --prefix "shot-reset-" --purpose reset_password --locale en)"
shot confirm-button-zh-CN "$($MINT --links --prefix "shot-r-zh-$RUN-" --purpose reset_password --locale zh-CN)"
shot expired-en "$($MINT --links --prefix "shot-x-en-$RUN-" --ttl -60 --locale en)"
shot expired-zh-CN "$($MINT --links --prefix "shot-x-zh-$RUN-" --ttl -60 --locale zh-CN)"
shot invalid-en "http://127.0.0.1:$PORT/confirm/not-a-token"

# The click: GET shows the button, clicking it POSTs, the browser lands on the
# app with verimail=verified&verimail_proof=…; opening the link again says "used".
if [ -d "$PW_DIR/node_modules/playwright-core" ]; then
  LINK=$($MINT --links --prefix "shot-reset-" --purpose reset_password --locale en)
  NODE_PATH="$PW_DIR/node_modules" LINK="$LINK" OUT="$OUT" APP="http://127.0.0.1:$APP_PORT" node - <<'JS'
const { chromium } = require('playwright-core');
(async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 720, height: 640 } });
  const first = await page.goto(process.env.LINK);
  if (first.status() !== 200) throw new Error(`GET answered ${first.status()}`);
  await page.getByRole('button').click();
  await page.waitForURL(url => url.href.startsWith(process.env.APP));
  const landed = new URL(page.url());
  if (landed.searchParams.get('verimail') !== 'verified' || !landed.searchParams.get('verimail_proof'))
    throw new Error(`landed on ${landed.pathname} without the proof`);
  await page.screenshot({ path: `${process.env.OUT}/after-click-app.png` });
  const again = await page.goto(process.env.LINK);
  if (again.status() !== 410) throw new Error(`second use answered ${again.status()}`);
  await page.screenshot({ path: `${process.env.OUT}/used-en.png` });
  console.log(`click flow ok: landed on ${landed.origin}${landed.pathname}?verimail=verified&verimail_proof=…; second use 410`);
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
JS
else
  echo "playwright-core not found in $PW_DIR: skipped the click flow"
fi
