#!/usr/bin/env python3
"""Publish N verimail.verification.requested CloudEvents for N distinct users, fast.

Persistent, mandatory, routing key = the event type, with publisher confirms waited for in
batches (publish a batch, wait until the broker confirmed all of it, next batch). Loads both
the reference (ref_worker.py) and verimail's worker (exchange = VERIMAIL_NAMESPACE).
Exits 1 if the broker nacked or returned any message (e.g. no queue bound yet).
"""

import argparse
import datetime
import json
import os
import sys
import time
import uuid

import pika

REQUESTED = "verimail.verification.requested"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    p.add_argument("--exchange", default="verimail-bench-ref")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--batch", type=int, default=500, help="messages per confirm batch")
    p.add_argument("--prefix", default=None, help="user id prefix (default: a fresh random one, so no user is in cooldown)")
    p.add_argument("--locale", default=None)
    p.add_argument("--no-declare", action="store_true", help="do not declare the exchange")
    return p.parse_args()


def event(user_id, email, name, locale):
    data = {"user_id": user_id, "email": email, "name": name}
    if locale:
        data["locale"] = locale
    now = datetime.datetime.now(datetime.timezone.utc)
    ev = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/bench",
        "type": REQUESTED,
        "time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "datacontenttype": "application/json",
        "data": data,
    }
    return ev["id"], json.dumps(ev, separators=(",", ":")).encode()


class Publisher:
    def __init__(self, args):
        self.args = args
        self.prefix = args.prefix or f"u-{uuid.uuid4().hex[:8]}-"
        self.next_index = 0
        self.published = 0  # delivery tags are 1..published
        self.confirmed = 0  # highest tag all of whose predecessors are settled
        self.settled = set()
        self.nacked = 0
        self.returned = 0
        self.error = None
        self.started = None
        self.channel = None
        self.conn = pika.SelectConnection(
            pika.URLParameters(args.amqp_url),
            on_open_callback=self.on_open,
            on_open_error_callback=self.on_open_error,
            on_close_callback=self.on_closed,
        )

    def on_open(self, conn):
        conn.channel(on_open_callback=self.on_channel)

    def on_open_error(self, _conn, err):
        self.error = f"cannot connect: {err}"
        self.conn.ioloop.stop()

    def on_closed(self, _conn, reason):
        if self.confirmed < self.args.count and self.error is None:
            self.error = f"connection closed: {reason}"
        self.conn.ioloop.stop()

    def on_channel(self, channel):
        self.channel = channel
        channel.add_on_return_callback(self.on_return)
        channel.add_on_close_callback(lambda _ch, reason: self.fail(f"channel closed: {reason}"))
        if self.args.no_declare:
            self.start_confirms()
        else:
            channel.exchange_declare(
                self.args.exchange, exchange_type="topic", durable=True,
                callback=lambda _frame: self.start_confirms(),
            )

    def fail(self, message):
        if self.error is None and self.confirmed < self.args.count:
            self.error = message
        if self.conn.is_open:
            self.conn.close()

    def start_confirms(self):
        self.channel.confirm_delivery(self.on_confirm, callback=lambda _frame: self.publish_batch())

    def publish_batch(self):
        if self.started is None:
            self.started = time.monotonic()
        props_base = dict(content_type="application/cloudevents+json", delivery_mode=2, type=REQUESTED)
        end = min(self.next_index + self.args.batch, self.args.count)
        for i in range(self.next_index, end):
            uid = f"{self.prefix}{i}"
            ev_id, body = event(uid, f"{uid}@example.com", f"User {i}", self.args.locale)
            self.channel.basic_publish(
                self.args.exchange, REQUESTED, body,
                properties=pika.BasicProperties(message_id=ev_id, **props_base),
                mandatory=True,
            )
            self.published += 1
        self.next_index = end

    def on_return(self, _channel, _method, _props, _body):
        self.returned += 1

    def on_confirm(self, frame):
        method = frame.method
        tag = method.delivery_tag
        if isinstance(method, pika.spec.Basic.Nack):
            self.nacked += (tag - self.confirmed) if method.multiple else 1
        if method.multiple:
            self.settled.update(range(self.confirmed + 1, tag + 1))
        else:
            self.settled.add(tag)
        while self.confirmed + 1 in self.settled:
            self.confirmed += 1
            self.settled.discard(self.confirmed)
        if self.confirmed == self.published:
            if self.published >= self.args.count:
                self.conn.close()
            else:
                self.publish_batch()

    def run(self):
        self.conn.ioloop.start()
        elapsed = time.monotonic() - self.started if self.started else 0.0
        rate = self.confirmed / elapsed if elapsed > 0 else 0.0
        print(
            f"publish: confirmed={self.confirmed} nacked={self.nacked} returned={self.returned} "
            f"seconds={elapsed:.3f} per_second={rate:.0f} prefix={self.prefix}",
            file=sys.stderr,
        )
        if self.error:
            print(f"publish: {self.error}", file=sys.stderr)
        return 0 if self.error is None and self.nacked == 0 and self.returned == 0 and self.confirmed == self.args.count else 1


def main():
    args = parse_args()
    if args.count < 1 or args.batch < 1:
        print("publish: --count and --batch must be positive", file=sys.stderr)
        return 2
    return Publisher(args).run()


if __name__ == "__main__":
    sys.exit(main())
