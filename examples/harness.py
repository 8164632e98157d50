"""Broker chores for run-examples.sh (not an example itself).

python harness.py bind QUEUE PATTERN     declare a durable queue bound to {ns} with PATTERN
python harness.py expect QUEUE ID        wait (20 s) for a request with message_id ID in QUEUE
python harness.py emit-verified ID       publish a verimail.email.verified event with id ID
python harness.py cleanup QUEUE...       delete the queues and the namespace's exchange
"""
import json
import os
import sys
import time

import pika

url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
ns = os.environ.get("VERIMAIL_NAMESPACE", "verimail")


def channel():
    return pika.BlockingConnection(pika.URLParameters(url)).channel()


def bind(queue, pattern):
    ch = channel()
    ch.exchange_declare(ns, exchange_type="topic", durable=True)
    ch.queue_declare(queue, durable=True)
    ch.queue_bind(queue, ns, routing_key=pattern)


def expect(queue, event_id):
    ch = channel()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.1)
            continue
        event = json.loads(body)
        checks = {
            "message_id": props.message_id == event_id,
            "content_type": props.content_type == "application/cloudevents+json",
            "delivery_mode": props.delivery_mode == 2,
            "type": event.get("type") == "verimail.verification.requested" == props.type,
            "id": event.get("id") == event_id,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            sys.exit(f"request {event_id} arrived but is wrong in: {', '.join(failed)}")
        print(f"ok: request {event_id} reached {queue}")
        return
    sys.exit(f"request {event_id} did not reach {queue} within 20 s")


def emit_verified(event_id):
    event = {
        "specversion": "1.0", "id": event_id, "source": "/examples/harness",
        "type": "verimail.email.verified", "time": "2026-11-24T10:05:00Z",
        "datacontenttype": "application/json",
        "data": {"request_id": "req-1", "user_id": "42", "email": "alice@example.com",
                 "purpose": "verify_email", "context": None, "verified_at": "2026-11-24T10:05:00Z", "method": "link"},
    }
    ch = channel()
    ch.confirm_delivery()
    ch.basic_publish(ns, event["type"], json.dumps(event), pika.BasicProperties(
        content_type="application/cloudevents+json", message_id=event_id, type=event["type"],
        delivery_mode=2), mandatory=True)


def cleanup(*queues):
    ch = channel()
    for queue in queues:
        ch.queue_delete(queue)
    ch.exchange_delete(ns)


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"bind": bind, "expect": expect, "emit-verified": emit_verified, "cleanup": cleanup}[command](*args)
