#!/usr/bin/env python3
"""Print N fresh itsdangerous tokens, one a line, for N distinct emails (inserting those users).

The output is the token file confirm.lua reads for wrk. The tokens are what ref_worker puts in
its links (URLSafeTimedSerializer(SECRET).dumps(email, salt="email-confirm")), valid 1 hour.
"""

import argparse
import os
import sys
import uuid

from itsdangerous import URLSafeTimedSerializer
from psycopg2.extras import execute_values

import refdb


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", refdb.DEFAULT_DATABASE_URL))
    p.add_argument("--secret", default=os.environ.get("SECRET"), help="itsdangerous secret (or env SECRET)")
    p.add_argument("--prefix", default=None, help="user id prefix (default: a fresh random one)")
    p.add_argument("--no-insert", action="store_true", help="only print tokens (e.g. for verimail's gateway)")
    args = p.parse_args()
    if not args.secret:
        p.error("--secret (or env SECRET) is required")
    prefix = args.prefix or f"m-{uuid.uuid4().hex[:8]}-"
    users = [(f"{prefix}{i}", f"{prefix}{i}@example.com") for i in range(args.count)]
    if not args.no_insert:
        conn = refdb.connect(args.database_url)
        with conn.cursor() as cur:
            execute_values(
                cur,
                "INSERT INTO ref_users (user_id, email) VALUES %s "
                "ON CONFLICT (user_id) DO UPDATE SET email = EXCLUDED.email, verified = false",
                users,
                page_size=1000,
            )
        conn.commit()
        conn.close()
    serializer = URLSafeTimedSerializer(args.secret)
    out = sys.stdout
    for _, email in users:
        out.write(serializer.dumps(email, salt="email-confirm"))
        out.write("\n")


if __name__ == "__main__":
    main()
