"""Sends one trace (a SERVER span and its child) and one log record in that trace to ENDPOINT with
the OpenTelemetry SDK's own OTLP exporters, over TRANSPORT: grpc, grpc-gzip or http-gzip
(OTLP/HTTP protobuf, gzip). Prints the trace id; exits 1 if an export failed.

Usage: otlp_client.py ENDPOINT TRANSPORT
"""
import logging
import sys

from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

endpoint, transport = sys.argv[1], sys.argv[2]
if transport.startswith("grpc"):
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    compression = grpc.Compression.Gzip if transport == "grpc-gzip" else grpc.Compression.NoCompression
    span_exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, compression=compression)
    log_exporter = OTLPLogExporter(endpoint=endpoint, insecure=True, compression=compression)
elif transport == "http-gzip":
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    span_exporter = OTLPSpanExporter(endpoint=endpoint + "/v1/traces", compression=Compression.Gzip)
    log_exporter = OTLPLogExporter(endpoint=endpoint + "/v1/logs", compression=Compression.Gzip)
else:
    sys.exit(f"unknown transport {transport}")

failed = []


class Checked:
    """Passes exports on, remembering any that failed."""

    def __init__(self, inner):
        self.inner = inner

    def export(self, batch):
        result = self.inner.export(batch)
        if result.name != "SUCCESS":
            failed.append(f"{type(self.inner).__name__}: {result}")
        return result

    def __getattr__(self, name):
        return getattr(self.inner, name)


resource = Resource.create({"service.name": f"python-{transport}"})
tracer_provider = TracerProvider(resource=resource)
tracer_provider.add_span_processor(SimpleSpanProcessor(Checked(span_exporter)))
logger_provider = LoggerProvider(resource=resource)
logger_provider.add_log_record_processor(SimpleLogRecordProcessor(Checked(log_exporter)))
logger = logging.getLogger("otlp-client")
logger.addHandler(LoggingHandler(logger_provider=logger_provider))
logger.setLevel(logging.INFO)
logger.propagate = False

tracer = tracer_provider.get_tracer("otlp-client")
with tracer.start_as_current_span("checkout", kind=SpanKind.SERVER) as parent:
    parent.set_attribute("transport", transport)
    with tracer.start_as_current_span("charge-card"):
        logger.info("charged the card over %s", transport)
    trace_id = format(parent.get_span_context().trace_id, "032x")

tracer_provider.shutdown()
logger_provider.shutdown()
if failed:
    sys.exit("exports failed: " + "; ".join(failed))
print(trace_id, flush=True)
