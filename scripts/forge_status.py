#!/usr/bin/env python3
"""Publishes status messages as an outsider would: with pika, RabbitMQ's Python client, not
Conveyor's own code. The adversarial suite (AdversarialTests, docs/security.md) uses it to
forge `conveyor.status.v1` messages for runs the forger does not hold.

  forge_status.py --url amqp://… --exchange PREFIX.status --statuses FILE [--batch]
                  [--routing-key KEY --type TYPE]

FILE is a JSON list of {"raw": "<the body, as text>", "seal": "<conveyor-status-mac>" or null},
each published byte for byte (persistent, type conveyor.status.v1, routing key "status", the seal
as a header when given), with publisher confirms. With --batch they travel 64 to a message, as
conveyor.status-batch.v1 (docs/architecture.md, "Message contract"), serialized by Python's json
module: {"version": 1, "statuses": [{"body": raw, "seal": seal}, …]}. Prints the number of
statuses published. --routing-key and --type (default "status" and conveyor.status.v1) publish
other messages the same way, for example a task message to PREFIX.tasks with the queue as key.
"""
import argparse
import json
import sys

import pika


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--exchange", required=True)
    ap.add_argument("--statuses", required=True)
    ap.add_argument("--batch", action="store_true")
    ap.add_argument("--routing-key", default="status")
    ap.add_argument("--type", default="conveyor.status.v1")
    a = ap.parse_args()
    with open(a.statuses) as f:
        bodies = json.load(f)
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    ch.confirm_delivery()
    sent = 0
    if a.batch:
        for i in range(0, len(bodies), 64):
            chunk = bodies[i:i + 64]
            statuses = [{"body": e["raw"], **({"seal": e["seal"]} if e.get("seal") else {})} for e in chunk]
            props = pika.BasicProperties(
                type="conveyor.status-batch.v1", content_type="application/json", delivery_mode=2,
                headers={"conveyor-statuses": len(chunk)})
            body = json.dumps({"version": 1, "statuses": statuses}).encode()
            ch.basic_publish(exchange=a.exchange, routing_key="status", body=body, properties=props)
            sent += len(chunk)
        conn.close()
        print(sent)
        return
    for entry in bodies:
        headers = {"conveyor-status-mac": entry["seal"]} if entry.get("seal") else None
        props = pika.BasicProperties(type=a.type, content_type="application/json", delivery_mode=2, headers=headers)
        ch.basic_publish(exchange=a.exchange, routing_key=a.routing_key, body=entry["raw"].encode(), properties=props)
        sent += 1
    conn.close()
    print(sent)


if __name__ == "__main__":
    sys.exit(main())
