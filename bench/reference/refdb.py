"""Database helpers shared by the reference scripts: the app's `users` table, as `ref_users`."""

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/verimail_bench_ref"

SCHEMA = """
CREATE TABLE IF NOT EXISTS ref_users (
    user_id      text PRIMARY KEY,
    email        text,
    last_mail_at timestamptz,
    verified     bool NOT NULL DEFAULT false
);
-- A real app's users table has its email indexed (unique); without it the confirm
-- view's UPDATE would scan the table and the reference would look worse than it is.
CREATE INDEX IF NOT EXISTS ref_users_email ON ref_users (email);
"""


def ensure_database(url):
    """Create the database named in `url` if missing (connecting to `postgres` to do so)."""
    params = parse_dsn(url)
    name = params.get("dbname")
    if not name:
        return
    admin = psycopg2.connect(make_dsn(url, dbname="postgres"))
    try:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                try:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                except psycopg2.errors.DuplicateDatabase:
                    pass  # another reference process created it meanwhile
    finally:
        admin.close()


def ensure_schema(conn):
    """Create `ref_users` if missing."""
    with conn.cursor() as cur:
        try:
            cur.execute(SCHEMA)
            conn.commit()
        except (psycopg2.errors.UniqueViolation, psycopg2.errors.DuplicateTable,
                psycopg2.errors.DuplicateObject):
            # Two processes racing on CREATE ... IF NOT EXISTS: the other one won.
            conn.rollback()


def connect(url):
    """Connect, creating the database and table first when missing."""
    ensure_database(url)
    conn = psycopg2.connect(url)
    ensure_schema(conn)
    return conn
