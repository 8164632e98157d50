#!/usr/bin/env bash
# Screenshots of the gateway's pages and of a mail with its code in headless
# Chromium, and scripted presses of the verify-email and reset-password buttons
# (Playwright, when installed under $PW_DIR).
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
# The default CONFIRM_ON_GET=false: opening a link shows the button, and the
# "verified" shots below are taken after Playwright pressed it.
export RUST_LOG=${RUST_LOG:-warn}

# Every target at once: scripts/test.sh has built exactly this already, so
# under it this is a no-op (a narrower build would compile the crates again
# with another feature set).
cargo build -q --workspace --all-targets
TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
BIN=$TARGET/debug/verimail-gateway
WORKER=$TARGET/debug/verimail-worker
CLI=$TARGET/debug/verimail
MINT=$TARGET/debug/examples/mint

WORK=$(mktemp -d)
cleanup() {
  [ -n "${GW_PID:-}" ] && kill "$GW_PID" 2>/dev/null || true
  [ -n "${APP_PID:-}" ] && kill "$APP_PID" 2>/dev/null || true
  [ -n "${WORKER_PID:-}" ] && kill "$WORKER_PID" 2>/dev/null || true
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

# A real mail: the worker renders it into a folder, and Chromium shows its HTML
# part, where the code stands large beside the button-link.
export MAIL_URL="file://$WORK/outbox"   # the worker writes there, `verimail outbox` reads there
METRICS_ADDR=127.0.0.1:${WORKER_OPS_PORT:-18083} "$WORKER" & WORKER_PID=$!
ID=$("$CLI" publish --user-id shot-code-user --email ada@example.com --name Ada)
MAIL=$("$CLI" outbox "$ID" --wait 30)
CODE_LINK=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["link"])' "$MAIL")
python3 - "$MAIL" "$WORK/mail.html" <<'PY'
import email, json, sys
from email import policy
mail = json.loads(sys.argv[1])
msg = email.message_from_binary_file(open(mail["file"], "rb"), policy=policy.default)
html = msg.get_body(preferencelist=("html",)).get_content()
if mail["code"] not in html:
    sys.exit(f"the HTML part does not show the code")
open(sys.argv[2], "w").write(html)
PY
shot code-mail-en "file://$WORK/mail.html"
shot confirm-verify-en "$CODE_LINK"
shot confirm-button-en "$($MINT --links --prefix "shot-reset-" --purpose reset_password --locale en)"
shot confirm-button-zh-CN "$($MINT --links --prefix "shot-r-zh-$RUN-" --purpose reset_password --locale zh-CN)"
shot expired-en "$($MINT --links --prefix "shot-x-en-$RUN-" --ttl -60 --locale en)"
shot expired-zh-CN "$($MINT --links --prefix "shot-x-zh-$RUN-" --ttl -60 --locale zh-CN)"
shot invalid-en "http://127.0.0.1:$PORT/confirm/not-a-token"

# The clicks. verify_email: opening the mail's link shows the button and
# confirms nothing; pressing it shows the verified page; opening it again says
# "already verified". reset_password: pressing the button lands on the app
# with verimail=verified&verimail_proof=…; opening the link again says "used".
if [ -d "$PW_DIR/node_modules/playwright-core" ]; then
  LINK=$($MINT --links --prefix "shot-reset-" --purpose reset_password --locale en)
  ZH_LINK=$($MINT --links --prefix "shot-v-zh-$RUN-" --locale zh-CN)
  NODE_PATH="$PW_DIR/node_modules" LINK="$LINK" VERIFY_LINK="$CODE_LINK" ZH_LINK="$ZH_LINK" \
    OUT="$OUT" APP="http://127.0.0.1:$APP_PORT" node - <<'JS'
const { chromium } = require('playwright-core');
(async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 720, height: 640 } });
  for (const [link, locale] of [[process.env.VERIFY_LINK, 'en'], [process.env.ZH_LINK, 'zh-CN']]) {
    const opened = await page.goto(link);
    const json = await fetch(link, { headers: { 'Accept': 'application/json' } }).then(r => r.json());
    if (opened.status() !== 200 || json.status !== 'confirm_required')
      throw new Error(`opening a verify_email link answered ${opened.status()} ${json.status}`);
    const [answer] = await Promise.all([
      page.waitForResponse(r => r.request().method() === 'POST'),
      page.getByRole('button').click(),
    ]);
    if (answer.status() !== 200) throw new Error(`pressing the button answered ${answer.status()}`);
    await page.waitForLoadState();
    await page.screenshot({ path: `${process.env.OUT}/verified-${locale}.png` });
    const after = await fetch(link, { headers: { 'Accept': 'application/json' } }).then(r => r.json());
    if (after.status !== 'already_verified') throw new Error(`after the press: ${after.status}`);
  }
  console.log('verify flow ok: opening confirmed nothing, the button verified, reopening says already_verified');
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
