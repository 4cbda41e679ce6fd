#!/usr/bin/env python3
"""A minimal OTLP/HTTP receiver for benchmarks: accepts POST /v1/traces, answers 200, and counts
what it got. With OTEL_EXPORTER_OTLP_PROTOCOL=http/json it counts spans (and spans and links by
span name); with protobuf, bytes. GET /count prints the totals as JSON. Standard library only.

    python3 scripts/otlp_sink.py --port 4318 &
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OTEL_EXPORTER_OTLP_PROTOCOL=http/json conveyor bench
    curl -s http://127.0.0.1:4318/count
"""
import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
totals = {"requests": 0, "bytes": 0, "spans": 0, "names": {}, "links": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"{}"):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        found = []
        if self.headers.get("Content-Type", "").startswith("application/json"):
            try:
                doc = json.loads(body)
                found = [s for rs in doc.get("resourceSpans", []) for ss in rs.get("scopeSpans", []) for s in ss.get("spans", [])]
            except ValueError:
                return self.reply(400)
        with lock:
            totals["requests"] += 1
            totals["bytes"] += len(body)
            totals["spans"] += len(found)
            for s in found:
                name = s.get("name", "")
                totals["names"][name] = totals["names"].get(name, 0) + 1
                totals["links"] += len(s.get("links", []))
        self.reply(200)

    def do_GET(self):
        with lock:
            self.reply(200, json.dumps(totals).encode() + b"\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
