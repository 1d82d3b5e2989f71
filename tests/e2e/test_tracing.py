"""One send's trace, end to end: gateway → inbox HTTP → the bus → auto-reply's consumer → inbox over gRPC.

A private stack (its own vhost, database prefix and processes) with tracing on, exporting over
OTLP/HTTP protobuf to a receiver this test runs (a small http.server decoding each
ExportTraceServiceRequest). A staff member with the Staff Auto-Reply on is sent one message through
the gateway, under a `traceparent` the client chose; the auto-reply comes back, and every hop's span
carries the client's trace id. The correlation id the services log for that work is the same id.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import secrets
import threading
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.e2e.conftest import Client
from tests.e2e.fault_stack import go_away, listed, private_stack
from tests.waits import wait_until

WAIT_S = 60.0


class Receiver:
    """An OTLP/HTTP trace receiver on a free loopback port: every span it is sent, with its service."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Span]] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                export = ExportTraceServiceRequest()
                export.ParseFromString(body)
                found = []
                for resource_spans in export.resource_spans:
                    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        found += [(attributes.get("service.name", ""), span) for span in scope_spans.spans]
                with receiver.lock:
                    receiver.spans += found
                    receiver.requests += 1
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def of_trace(self, trace_id: str) -> list[tuple[str, Span]]:
        with self.lock:
            return [(service, span) for service, span in self.spans if span.trace_id.hex() == trace_id]


@contextlib.contextmanager
def receiving() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory, mongo_uri):
    with receiving() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_BSP_SCHEDULE_DELAY": "200",  # export within a fraction of a second
            "CLINIC_TRACE_SAMPLE_RATIO": "1",
        }
        with private_stack(tmp_path_factory.mktemp("tracing"), mongo_uri, **env) as stack:
            yield stack, receiver


def names(spans: list[tuple[str, Span]]) -> set[tuple[str, str, int]]:
    return {(service, span.name, span.kind) for service, span in spans}


def test_one_send_is_one_trace_across_gateway_inbox_bus_consumer_and_grpc(traced_stack):
    stack, receiver = traced_stack
    sender = Client(stack.gateway_url, "therapist.patel")
    recipient = Client(stack.gateway_url, "therapist.nguyen")
    go_away(recipient)
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    subject = f"Traced {uuid.uuid4().hex[:8]}"
    body = {"to_staff_ids": [recipient.staff_id], "subject": subject, "body": "Traced message"}
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01", "Idempotency-Key": uuid.uuid4().hex}
    sent = sender.post("/api/v1/messages", json=body, headers=headers, timeout=30)
    assert sent.status_code in (200, 201), sent.text
    wait_until(
        lambda: [m for m in listed(sender, "/api/v1/messages") if m["subject"] == f"Re: {subject}"],
        timeout=WAIT_S,
        message="the auto-reply",
    )

    def complete():
        spans = receiver.of_trace(trace_id)
        found = names(spans)
        wanted = [
            any(s == "gateway" and k == Span.SPAN_KIND_SERVER for s, _, k in found),
            ("inbox", "POST /api/v1/messages", Span.SPAN_KIND_SERVER) in found,
            any(s == "inbox" and k == Span.SPAN_KIND_PRODUCER and "message.delivered.v1" in n for s, n, k in found),
            ("auto-reply", "consume message.delivered.v1", Span.SPAN_KIND_CONSUMER) in found,
            any(s == "auto-reply" and k == Span.SPAN_KIND_CLIENT and "SendMessage" in n for s, n, k in found),
            any(s == "inbox" and k == Span.SPAN_KIND_SERVER and "SendMessage" in n for s, n, k in found),
        ]
        return all(wanted) and spans

    spans = wait_until(complete, timeout=WAIT_S, message="every hop's span in the trace")
    by_id = {span.span_id: (service, span) for service, span in spans}
    gateway = next(span for service, span in spans if service == "gateway" and span.kind == Span.SPAN_KIND_SERVER)
    assert gateway.parent_span_id.hex() == parent_id  # the client's traceparent was continued
    inbox_http = next(span for service, span in spans if span.name == "POST /api/v1/messages")
    assert inbox_http.parent_span_id == gateway.span_id  # the gateway's traceparent reached inbox
    client = next(
        span
        for service, span in spans
        if service == "auto-reply" and span.kind == Span.SPAN_KIND_CLIENT and "SendMessage" in span.name
    )
    # The consumer's work made the call (web consumes the same event, and the reply's own delivery is
    # consumed again, in the same trace).
    consumed = by_id[client.parent_span_id]
    assert consumed[0] == "auto-reply" and consumed[1].name == "consume message.delivered.v1"
    served = [
        span
        for service, span in spans
        if service == "inbox" and span.kind == Span.SPAN_KIND_SERVER and "SendMessage" in span.name
    ]
    assert any(span.parent_span_id == client.span_id for span in served)  # traceparent in gRPC metadata
    publish = by_id.get(consumed[1].parent_span_id)
    assert publish is not None and publish[1].kind == Span.SPAN_KIND_PRODUCER  # traceparent in AMQP headers
    assert publish[0] == "inbox"
    # Nothing a patient or staff member wrote is in any span.
    assert all(subject not in str(span) and "Traced message" not in str(span) for _, span in spans)

    # The correlation id in the services' logs is the trace id.
    def logged(service: str) -> list[dict]:
        lines = (stack.run_dir / "logs" / f"{service}.log").read_text(errors="replace").splitlines()
        entries = []
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("correlation_id") == trace_id:
                    entries.append(entry)
        return entries

    assert wait_until(lambda: logged("inbox"), timeout=10, message="inbox's log lines of the trace")
    assert wait_until(lambda: logged("auto-reply"), timeout=10, message="auto-reply's log lines of the trace")
