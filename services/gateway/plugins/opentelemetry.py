"""The opentelemetry plugin (Kong 3.9 schema, the fields this project sets). Production Kong sends its
spans to `traces_endpoint` itself. The local gateway validates the configuration; its own spans are
the process's (services.kit.tracing: on when OTEL_EXPORTER_OTLP_ENDPOINT or CLINIC_TRACING is set),
whether this entry is enabled or not, with the same W3C `traceparent` sent upstream."""

from __future__ import annotations

from services.gateway.declarative import typedefs as t
from services.gateway.declarative.schema import Integer, Map, Number, Record, String
from services.gateway.plugins.base import Plugin, PluginSpec

HEADER_TYPES = ("preserve", "ignore", "b3", "b3-single", "w3c", "jaeger", "ot", "aws", "gcp", "datadog", "instana")


class OpenTelemetryPlugin(Plugin):
    def describe(self) -> str | None:
        return (
            "opentelemetry: configuration valid; the local gateway's spans follow OTEL_EXPORTER_OTLP_ENDPOINT "
            "(services.kit.tracing), not this entry"
        )


CONFIG = Record(
    fields={
        "traces_endpoint": String(),
        "logs_endpoint": String(),
        "headers": Map(keys=String(), values=String()),
        "resource_attributes": Map(keys=String(), values=String()),
        "batch_span_count": Integer(),
        "batch_flush_delay": Integer(),
        "connect_timeout": Integer(default=1000),
        "send_timeout": Integer(default=5000),
        "read_timeout": Integer(default=5000),
        "http_response_header_for_traceid": String(),
        "header_type": String(default="preserve", one_of=HEADER_TYPES),
        "sampling_rate": Number(between=(0.0, 1.0)),
    }
)

SPEC = PluginSpec(name="opentelemetry", priority=14, config=CONFIG, handler=OpenTelemetryPlugin, protocols=t.PROTOCOLS)
