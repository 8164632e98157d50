#!/usr/bin/env python3
"""The in-app pattern verimail replaces, as a pika consumer.

For each `verimail.verification.requested` CloudEvent (the same bodies verimail's worker
takes): upsert the user, per-user cooldown read-then-write on the user row, an itsdangerous
token, a Jinja2 render of an HTML + text mail, one SMTP connection per mail, then ack.
Prints nothing per message; a summary line on stderr at exit.
"""

import argparse
import json
import os
import resource
import signal
import smtplib
import sys
import time
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid, parseaddr

import pika
from itsdangerous import URLSafeTimedSerializer
from jinja2 import DictLoader, Environment, select_autoescape

import refdb

REQUESTED = "verimail.verification.requested"

TEMPLATES = {
    "confirm.txt": (
        "Hello {{ name or email }},\n\n"
        "Please confirm your email address by opening this link:\n\n"
        "{{ link }}\n\n"
        "The link works for one hour. If you did not ask for this, ignore this mail.\n"
    ),
    "confirm.html": (
        "<!doctype html><html><body>"
        "<p>Hello {{ name or email }},</p>"
        "<p>Please confirm your email address:</p>"
        '<p><a href="{{ link }}">Confirm my address</a></p>'
        "<p>The link works for one hour. If you did not ask for this, ignore this mail.</p>"
        "</body></html>"
    ),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    p.add_argument("--exchange", default="verimail-bench-ref", help="topic exchange to bind to")
    p.add_argument("--queue", default="verimail-bench-ref.worker", help="classic durable queue to declare and consume")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", refdb.DEFAULT_DATABASE_URL))
    p.add_argument("--smtp", default="127.0.0.1:2525", help="host:port, plain SMTP, no TLS")
    p.add_argument("--secret", default=os.environ.get("SECRET"), help="itsdangerous secret (or env SECRET)")
    p.add_argument("--base-url", default="http://127.0.0.1:8081", help="links are BASE/confirm/TOKEN")
    p.add_argument("--mail-from", default="app <no-reply@localhost>")
    p.add_argument("--cooldown", type=int, default=60, help="seconds between two mails to one user")
    p.add_argument("--prefetch", type=int, default=64)
    p.add_argument("--count", type=int, default=0, help="stop after this many messages (0: run until SIGINT/SIGTERM)")
    p.add_argument("--declare-only", action="store_true", help="declare exchange, queue and binding, then exit (to fill the queue before timing)")
    p.add_argument("--delete-queue", action="store_true", help="delete the queue (and its messages), then exit")
    args = p.parse_args()
    if not args.secret and not (args.declare_only or args.delete_queue):
        p.error("--secret (or env SECRET) is required")
    host, _, port = args.smtp.rpartition(":")
    if not host or not port.isdigit():
        p.error("--smtp must be host:port")
    args.smtp_host, args.smtp_port = host, int(port)
    args.mail_from_addr = parseaddr(args.mail_from)[1]
    return args


class Worker:
    def __init__(self, args):
        self.args = args
        self.db = refdb.connect(args.database_url)
        self.serializer = URLSafeTimedSerializer(args.secret)
        self.env = Environment(loader=DictLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
        self.templates = {name: self.env.get_template(name) for name in TEMPLATES}
        self.sent = self.throttled = self.rejected = 0
        self.first_at = None
        self.stopping = False  # set by SIGINT/SIGTERM
        self.last_at = None

    @property
    def processed(self):
        return self.sent + self.throttled + self.rejected

    def cooldown_passed(self, user_id, email):
        """The app's snippet: read last_mail_at, decide, then write it (not atomic, as in apps).

        Leaves the transaction open when the mail is due: it is committed after the send, as
        the app's `db.session.commit()` after `mail.send()`, so a failed send is not recorded.
        """
        with self.db.cursor() as cur:
            cur.execute(
                "INSERT INTO ref_users (user_id, email) VALUES (%s, %s) "
                "ON CONFLICT (user_id) DO UPDATE SET email = EXCLUDED.email",
                (user_id, email),
            )
            cur.execute(
                "SELECT last_mail_at > now() - make_interval(secs => %s) FROM ref_users WHERE user_id = %s",
                (self.args.cooldown, user_id),
            )
            row = cur.fetchone()
            if row is not None and row[0]:
                self.db.commit()
                return False
            cur.execute("UPDATE ref_users SET last_mail_at = now() WHERE user_id = %s", (user_id,))
        return True

    def send(self, email, name):
        token = self.serializer.dumps(email, salt="email-confirm")
        link = f"{self.args.base_url}/confirm/{token}"
        ctx = {"name": name, "email": email, "link": link}
        # Built with email.mime, as Flask-Mail does (the newer EmailMessage API costs about
        # twice the CPU per mail and would make the reference look slower than apps are).
        msg = MIMEMultipart("alternative")
        msg["Subject"] = "Confirm your email address"
        msg["From"] = self.args.mail_from
        msg["To"] = email
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid()
        msg.attach(MIMEText(self.templates["confirm.txt"].render(ctx), "plain", "utf-8"))
        msg.attach(MIMEText(self.templates["confirm.html"].render(ctx), "html", "utf-8"))
        # One connection per mail, as Flask-Mail's send() outside a `connect()` block does.
        with smtplib.SMTP(self.args.smtp_host, self.args.smtp_port, timeout=30) as smtp:
            smtp.sendmail(self.args.mail_from_addr, [email], msg.as_string())

    def on_message(self, channel, method, _properties, body):
        if self.stopping:
            # Deliveries pika had already buffered when the signal came: hand them back.
            channel.basic_nack(method.delivery_tag, requeue=True)
            channel.stop_consuming()
            return
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        try:
            data = json.loads(body)["data"]
            user_id, email = data["user_id"], data["email"]
            if isinstance(user_id, int) and not isinstance(user_id, bool):
                user_id = str(user_id)
            if not isinstance(user_id, str) or not isinstance(email, str):
                raise ValueError("user_id/email")
            name = data.get("name")
        except (ValueError, KeyError, TypeError):
            self.rejected += 1
            channel.basic_nack(method.delivery_tag, requeue=False)
            self._maybe_stop(channel)
            return
        if self.cooldown_passed(user_id, email):
            try:
                self.send(email, name)
            except BaseException:
                # Crash loudly, as the app's consumer would; the message stays unacked and
                # goes back to the queue, and the cooldown was not recorded.
                self.db.rollback()
                raise
            self.db.commit()
            self.sent += 1
        else:
            self.throttled += 1
        channel.basic_ack(method.delivery_tag)
        self.last_at = time.monotonic()
        self._maybe_stop(channel)

    def _maybe_stop(self, channel):
        if self.stopping or (self.args.count and self.processed >= self.args.count):
            channel.stop_consuming()

    def summary(self):
        elapsed = (self.last_at - self.first_at) if self.first_at and self.last_at else 0.0
        rate = self.processed / elapsed if elapsed > 0 else 0.0
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (
            f"ref_worker: processed={self.processed} sent={self.sent} throttled={self.throttled} "
            f"rejected={self.rejected} seconds={elapsed:.3f} per_second={rate:.1f} max_rss_kib={rss_kib}"
        )


def main():
    args = parse_args()
    conn = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = conn.channel()
    if args.delete_queue:
        channel.queue_delete(args.queue)
        conn.close()
        return
    channel.exchange_declare(args.exchange, exchange_type="topic", durable=True)
    channel.queue_declare(args.queue, durable=True)
    channel.queue_bind(args.queue, args.exchange, routing_key=REQUESTED)
    if args.declare_only:
        conn.close()
        return
    worker = Worker(args)
    channel.basic_qos(prefetch_count=args.prefetch)
    channel.basic_consume(args.queue, worker.on_message)

    def stop(_signum, _frame):
        # The flag stops a busy consumer after the message in hand (pika keeps dispatching
        # buffered deliveries before it runs callbacks); the callback stops an idle one.
        # Unacked messages go back to the queue when the connection closes.
        worker.stopping = True
        conn.add_callback_threadsafe(channel.stop_consuming)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"ref_worker: consuming {args.queue} (bound to {args.exchange})", file=sys.stderr, flush=True)
    try:
        channel.start_consuming()
    finally:
        print(worker.summary(), file=sys.stderr, flush=True)
        try:
            conn.close()
        except pika.exceptions.AMQPError:
            pass
        worker.db.close()


if __name__ == "__main__":
    main()
