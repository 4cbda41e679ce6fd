#!/usr/bin/env python3
"""Programs traced by the OpenTelemetry Python SDK, for TracingTests: Conveyor's trace headers as
software nobody here wrote reads and writes them.

    otel_peer.py service --host H --port P --otlp URL --log FILE [--fail-first N]
        A WSGI service instrumented the way Flask and Django apps are (opentelemetry-instrumentation-
        wsgi's middleware: a server span continuing the request's W3C context, read through the
        WSGI environ, where a repeated header arrives joined by a comma). It exports its spans as
        OTLP/protobuf to URL and appends one JSON line per request to FILE: every header as
        received, in order, and the server span's trace id, span id and parent span id. The first
        N requests of each path answer 500, the others 200.

    otel_peer.py call --url URL --header NAME:VALUE… --body JSON --otlp URL
        A caller: starts a client span with baggage tenant=acme, sends one POST with the SDK's
        propagators (traceparent and baggage), exports the span as OTLP/protobuf, and prints
        {"status", "body", "trace_id", "span_id"} as JSON.

    otel_peer.py decode FILE
        Reads OTLP/protobuf ExportTraceServiceRequest bodies, one base64 line each, from FILE and
        prints each as one line of OTLP/JSON (protobuf's JSON mapping, enums as integers).
"""
import argparse
import base64
import json
import signal
import threading
import urllib.error
import urllib.request


def provider(service_name, otlp):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    p = TracerProvider(resource=Resource.create({"service.name": service_name}))
    p.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=otlp.rstrip("/") + "/v1/traces")))
    return p


def service(args):
    # A parent may spawn us with SIGTERM blocked (it inherits the spawning thread's mask, and
    # test runners block signals on their threads): unblock it so terminate() stops us.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from opentelemetry import trace
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    tp = provider("otel-peer-service", args.otlp)
    lock = threading.Lock()
    seen = {}

    def log(entry):
        with lock, open(args.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def app(environ, start_response):
        span = trace.get_current_span()
        ctx = span.get_span_context()
        path = environ.get("PATH_INFO", "")
        with lock:
            n = seen.get(path, 0)
            seen[path] = n + 1
        parent = getattr(span, "parent", None)
        log({"path": path, "headers": environ["conveyor.raw_headers"],
             "trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x"),
             "parent_span_id": format(parent.span_id, "016x") if parent else ""})
        status = "500 Internal Server Error" if n < args.fail_first else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        return [b"ok"]

    class Handler(WSGIRequestHandler):
        def log_message(self, *a):
            pass

        def get_environ(self):
            env = super().get_environ()
            env["conveyor.raw_headers"] = [[k.lower(), v] for k, v in self.headers.items()]
            return env

    server = make_server(args.host, args.port, OpenTelemetryMiddleware(app, tracer_provider=tp),
                         server_class=WSGIServer, handler_class=Handler)
    log({"ready": server.server_port})
    server.serve_forever()


def call(args):
    from opentelemetry import baggage, context, propagate, trace

    tp = provider("otel-peer-caller", args.otlp)
    tracer = tp.get_tracer("otel-peer")
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    with tracer.start_as_current_span("create task", kind=trace.SpanKind.CLIENT) as span:
        headers = {"Content-Type": "application/json"}
        for h in args.header:
            name, _, value = h.partition(":")
            headers[name.strip()] = value.strip()
        propagate.inject(headers)
        request = urllib.request.Request(args.url, data=args.body.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                status, body = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read().decode()
        ctx = span.get_span_context()
    context.detach(token)
    tp.shutdown()
    print(json.dumps({"status": status, "body": body, "trace_id": format(ctx.trace_id, "032x"),
                      "span_id": format(ctx.span_id, "016x")}))


def decode(args):
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    for line in open(args.file):
        if not line.strip():
            continue
        message = ExportTraceServiceRequest()
        message.ParseFromString(base64.b64decode(line))
        print(json.dumps(MessageToDict(message, use_integers_for_enums=True)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("service")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--otlp", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--fail-first", type=int, default=0)
    c = sub.add_parser("call")
    c.add_argument("--url", required=True)
    c.add_argument("--header", action="append", default=[])
    c.add_argument("--body", required=True)
    c.add_argument("--otlp", required=True)
    d = sub.add_parser("decode")
    d.add_argument("file")
    args = parser.parse_args()
    {"service": service, "call": call, "decode": decode}[args.command](args)


if __name__ == "__main__":
    main()
