"""The in-app confirm view verimail's gateway replaces: Flask under gunicorn.

    SECRET=... DATABASE_URL=... gunicorn -w 2 -b 127.0.0.1:8081 ref_confirm:app

GET /confirm/<token>: itsdangerous loads (salt "email-confirm", max_age 3600), then
UPDATE ref_users SET verified = true WHERE email = ...; 200 page, 400 on a bad signature,
410 when expired, 404 when no user has that address.
"""

import os

import psycopg2
from flask import Flask, render_template_string
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

import refdb

DATABASE_URL = os.environ.get("DATABASE_URL", refdb.DEFAULT_DATABASE_URL)
SECRET = os.environ.get("SECRET")
if not SECRET:
    raise SystemExit("ref_confirm: SECRET is required")

app = Flask(__name__)
serializer = URLSafeTimedSerializer(SECRET)

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{{ title }}</title></head>
<body><h1>{{ title }}</h1><p>{{ text }}</p></body></html>"""

# One connection per gunicorn worker process (sync workers handle one request at a time),
# opened lazily after the fork so the workers never share a socket.
_conn = None


def db():
    global _conn
    if _conn is None or _conn.closed:
        _conn = refdb.connect(DATABASE_URL)
    return _conn


def page(title, text, status):
    return render_template_string(PAGE, title=title, text=text), status


@app.get("/confirm/<token>")
def confirm(token):
    try:
        email = serializer.loads(token, salt="email-confirm", max_age=3600)
    except SignatureExpired:
        return page("Link expired", "Ask for a new confirmation mail.", 410)
    except BadSignature:
        return page("Invalid link", "This confirmation link is not valid.", 400)
    conn = db()
    try:
        with conn.cursor() as cur:
            cur.execute("UPDATE ref_users SET verified = true WHERE email = %s", (email,))
            found = cur.rowcount > 0
        conn.commit()
    except psycopg2.Error:
        conn.rollback()
        raise
    if not found:
        return page("Unknown address", "No account has this address.", 404)
    return page("Address confirmed", "Thank you, your address is confirmed.", 200)
