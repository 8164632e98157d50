"""React to confirmed addresses: python subscribe_verified.py [--max N]

Declares its own durable queue, bound to verimail.email.verified; prints one line per event.
"""
import json
import os
import sys

import pika

url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
ns = os.environ.get("VERIMAIL_NAMESPACE", "verimail")
queue = f"{ns}.sub.python-example"  # name it after your service
limit = int(sys.argv[sys.argv.index("--max") + 1]) if "--max" in sys.argv else None

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.exchange_declare(ns, exchange_type="topic", durable=True)
channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
channel.queue_bind(queue, ns, routing_key="verimail.email.verified")
channel.basic_qos(prefetch_count=16)
seen = set()  # events arrive at least once: deduplicate on the id (persist it in real code)
handled = 0


def on_message(ch, method, properties, body):
    global handled
    event = json.loads(body)
    if event["id"] not in seen:
        seen.add(event["id"])
        d = event["data"]
        print(f"verified user_id={d['user_id']} email={d['email']} purpose={d['purpose']} "
              f"request_id={d['request_id']} event={event['id']}", flush=True)
    ch.basic_ack(method.delivery_tag)  # only once handled
    handled += 1
    if limit is not None and handled >= limit:
        ch.stop_consuming()


channel.basic_consume(queue, on_message)
print(f"waiting for verimail.email.verified on {queue}", file=sys.stderr, flush=True)
try:
    channel.start_consuming()
except KeyboardInterrupt:
    pass
connection.close()
