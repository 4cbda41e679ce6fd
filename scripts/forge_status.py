#!/usr/bin/env python3
"""Publishes status messages as an outsider would: with pika, RabbitMQ's Python client, not
Conveyor's own code. The adversarial suite (AdversarialTests, docs/security.md) uses it to
forge `conveyor.status.v1` messages for runs the forger does not hold.

  forge_status.py --url amqp://… --exchange PREFIX.status --statuses FILE

FILE is a JSON list of {"raw": "<the body, as text>", "seal": "<conveyor-status-mac>" or null},
each published byte for byte (persistent, type conveyor.status.v1, routing key "status", the seal
as a header when given), with publisher confirms. Prints the number published.
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
    a = ap.parse_args()
    with open(a.statuses) as f:
        bodies = json.load(f)
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    ch.confirm_delivery()
    sent = 0
    for entry in bodies:
        headers = {"conveyor-status-mac": entry["seal"]} if entry.get("seal") else None
        props = pika.BasicProperties(type="conveyor.status.v1", content_type="application/json", delivery_mode=2, headers=headers)
        ch.basic_publish(exchange=a.exchange, routing_key="status", body=entry["raw"].encode(), properties=props)
        sent += 1
    conn.close()
    print(sent)


if __name__ == "__main__":
    sys.exit(main())
