"""Publish one verimail request: python publish.py USER_ID EMAIL [LOCALE]

Prints the event id (the request_id of every follow-up event) once RabbitMQ confirmed it.
"""
import datetime
import json
import os
import sys
import uuid

import pika

url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
ns = os.environ.get("VERIMAIL_NAMESPACE", "verimail")


def main(user_id, email, locale=None):
    event = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),  # the idempotency key: reuse it when retrying the same request
        "source": "/examples/python",
        "type": "verimail.verification.requested",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": {"user_id": user_id, "email": email, **({"locale": locale} if locale else {})},
    }
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish now raises if the broker nacks or returns it
        channel.exchange_declare(ns, exchange_type="topic", durable=True)
        channel.basic_publish(
            exchange=ns,
            routing_key=event["type"],
            body=json.dumps(event),
            properties=pika.BasicProperties(
                content_type="application/cloudevents+json",
                message_id=event["id"],
                type=event["type"],
                delivery_mode=pika.DeliveryMode.Persistent,
            ),
            mandatory=True,  # a message no queue takes is an error (pika.exceptions.UnroutableError)
        )
        print(event["id"])
    finally:
        connection.close()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python publish.py USER_ID EMAIL [LOCALE]")
    try:
        main(*sys.argv[1:4])
    except pika.exceptions.UnroutableError:
        sys.exit(f"error: no queue is bound to verimail.verification.requested on {ns}: is the worker running?")
    except pika.exceptions.AMQPError as e:
        sys.exit(f"error: {e!r}")
