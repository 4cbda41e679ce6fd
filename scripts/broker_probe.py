#!/usr/bin/env python3
"""Tries broker operations under one login with pika, RabbitMQ's Python client (not Conveyor's
own code), and reports which the broker allowed. BrokerIdentityTests uses it to show what each
role's user (deploy/broker-permissions.tsv) can and cannot do.

  broker_probe.py --url amqp://… OP [OP …]

Each OP is `publish:EXCHANGE:ROUTING_KEY`, `consume:QUEUE`, `delete:QUEUE`, `declare:QUEUE`
(create), `passive:QUEUE` (look up), `bind:QUEUE:EXCHANGE`, `unbind:QUEUE:EXCHANGE:ROUTING_KEY`
or `delete-exchange:EXCHANGE` (the last two as an operator would: AMQPTests changes the topology
under Conveyor's connections with them), or `read:QUEUE`: takes every message waiting and
answers, as a JSON text, a list of {"type", "body"}, each body parsed by Python's json (a
`conveyor.status-batch.v1` body's statuses too: each item's `body` string becomes an object), so
a consumer written elsewhere reads what Conveyor sent. Every OP runs on a channel of its
own (a refusal closes the channel). Prints one JSON object: {OP: "ok", "<code> <reply text>" or
what `read` answers}.
"""
import argparse
import json

import pika
import pika.exceptions


def read(ch, queue):
    out = []
    while True:
        method, props, body = ch.basic_get(queue=queue, auto_ack=True)
        if method is None:
            return json.dumps(out)
        parsed = json.loads(body)
        if props.type == "conveyor.status-batch.v1":
            for item in parsed["statuses"]:
                item["body"] = json.loads(item["body"])
        out.append({"type": props.type, "body": parsed})


def run(ch, op):
    kind, _, rest = op.partition(":")
    if kind == "read":
        return read(ch, rest)
    if kind == "publish":
        exchange, _, key = rest.partition(":")
        ch.confirm_delivery()
        ch.basic_publish(exchange=exchange, routing_key=key, body=b"{}",
                         properties=pika.BasicProperties(delivery_mode=2, type="probe"))
    elif kind == "consume":
        ch.basic_consume(queue=rest, on_message_callback=lambda *a: None, auto_ack=False)
    elif kind == "delete":
        ch.queue_delete(queue=rest)
    elif kind == "declare":
        ch.queue_declare(queue=rest, durable=True)
    elif kind == "passive":
        ch.queue_declare(queue=rest, passive=True)
    elif kind == "unbind":
        queue, exchange, key = rest.split(":", 2)
        ch.queue_unbind(queue=queue, exchange=exchange, routing_key=key)
    elif kind == "delete-exchange":
        ch.exchange_delete(exchange=rest)
    elif kind == "bind":
        queue, _, exchange = rest.partition(":")
        ch.queue_bind(queue=queue, exchange=exchange, routing_key="probe")
    else:
        raise SystemExit(f"unknown operation {op!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("ops", nargs="+")
    a = ap.parse_args()
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    out = {}
    for op in a.ops:
        ch = conn.channel()
        try:
            out[op] = run(ch, op) or "ok"
            ch.close()
        except pika.exceptions.ChannelClosedByBroker as e:
            out[op] = f"{e.reply_code} {e.reply_text}"
        except pika.exceptions.UnroutableError:
            out[op] = "ok"   # the broker took the publish (permission granted) but no queue matched
    conn.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
