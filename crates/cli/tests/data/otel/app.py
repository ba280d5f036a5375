"""An HTTP app instrumented with the OpenTelemetry SDK, for the tracing interop test.

It joins the trace its request carries (W3C or B3, by the propagator named on the command
line), records one SERVER span, exports it over OTLP/HTTP to $OTLP, and answers with the trace
id it saw. Usage: app.py PORT w3c|b3
"""
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

port, fmt = int(sys.argv[1]), sys.argv[2]
if fmt == "b3":
    from opentelemetry.propagators.b3 import B3MultiFormat

    propagate.set_global_textmap(B3MultiFormat())
else:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagate.set_global_textmap(TraceContextTextMapPropagator())

provider = TracerProvider(resource=Resource.create({"service.name": "python-app"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=os.environ["OTLP"])))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("interop")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        carrier = {k.lower(): v for k, v in self.headers.items()}
        ctx = propagate.extract(carrier)
        with tracer.start_as_current_span("python-handler", context=ctx, kind=trace.SpanKind.SERVER) as span:
            seen = format(span.get_span_context().trace_id, "032x")
        body = json.dumps({"trace_id": seen, "headers": carrier}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


print("ready", flush=True)
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
