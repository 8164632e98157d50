"""React to confirmed addresses: python3 subscribe_verified.py [--queue NAME] [--max N]

Prints one line per verimail.email.verified event. Without --queue it listens on a
temporary queue (exclusive, deleted when it stops): events published while it is not
running are not kept. With --queue NAME it declares the durable quorum queue
{ns}.sub.NAME, as a real service does, which keeps collecting events after it stops;
delete it when done: rabbitmqctl delete_queue verimail.sub.NAME
"""
import json
import os
import sys

import pika

url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
ns = os.environ.get("VERIMAIL_NAMESPACE", "verimail")
name = sys.argv[sys.argv.index("--queue") + 1] if "--queue" in sys.argv else None
limit = int(sys.argv[sys.argv.index("--max") + 1]) if "--max" in sys.argv else None

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.exchange_declare(ns, exchange_type="topic", durable=True)
if name:
    queue = f"{ns}.sub.{name}"  # name it after your service
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
else:
    queue = channel.queue_declare("", exclusive=True).method.queue
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
