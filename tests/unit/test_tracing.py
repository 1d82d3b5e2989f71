"""services.kit.tracing: off by default and invisible then; on, every hop continues the caller's trace
and the correlation id is the trace id."""

from __future__ import annotations

import logging

import pika
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from clinic.events.v1.envelope_pb2 import Envelope
from services.kit import tracing
from services.kit.bus.messages import consume_span, event_context, message_properties, publish_span
from services.kit.http import create_app
from services.kit.logs import correlation_id_var

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.configure("test", {}, exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def app_seeing_correlation():
    app = create_app("test", verifier=None)

    @app.get("/seen")
    def seen():
        return {"correlation_id": correlation_id_var.get(), "trace_id": tracing.current_trace_id()}

    return app


def envelope(correlation_id: str = "") -> Envelope:
    return Envelope(
        event_id="e" * 32, event_type="message.delivered.v1", producer="inbox", correlation_id=correlation_id
    )


def test_settings_off_by_default_on_with_an_endpoint_and_checked():
    assert not tracing.read_settings({}).on
    on = tracing.read_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    assert on.on and on.endpoint == "http://collector:4318/v1/traces" and on.ratio == 1.0
    full = tracing.read_settings(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/x", "CLINIC_TRACE_SAMPLE_RATIO": "0.25"}
    )
    assert full.endpoint == "http://c/x" and full.ratio == 0.25
    assert not tracing.read_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "CLINIC_TRACING": "off"}).on
    assert tracing.read_settings({"CLINIC_TRACING": "on"}).on
    bad = tracing.read_settings(
        {"CLINIC_TRACE_SAMPLE_RATIO": "2", "CLINIC_TRACING": "maybe", "OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://x"}
    )
    assert len(bad.problems) == 3 and not bad.on and bad.ratio == 1.0


def test_off_nothing_changes_correlation_ids_are_as_before():
    assert not tracing.enabled()
    client = app_seeing_correlation().test_client()
    given = client.get("/seen", headers={"X-Correlation-ID": "abc-123", "traceparent": TRACEPARENT})
    assert given.json == {"correlation_id": "abc-123", "trace_id": None}
    assert given.headers["X-Correlation-ID"] == "abc-123"
    assert tracing.start("x", "SERVER") is None
    assert publish_span(envelope(TRACE_ID)) == (None, {})
    assert "traceparent" not in message_properties(envelope(TRACE_ID)).headers


def test_http_continues_the_callers_trace_and_the_correlation_id_is_the_trace_id(spans):
    client = app_seeing_correlation().test_client()
    answer = client.get("/seen", headers={"X-Correlation-ID": "abc-123", "traceparent": TRACEPARENT})
    assert answer.json == {"correlation_id": TRACE_ID, "trace_id": TRACE_ID}
    assert answer.headers["X-Correlation-ID"] == TRACE_ID
    (span,) = spans.get_finished_spans()
    assert span.name == "GET /seen" and span.kind == SpanKind.SERVER
    assert span.parent.span_id == int(PARENT_ID, 16)
    assert span.attributes["http.response.status_code"] == 200
    # No traceparent: a new trace, and still correlation id == trace id.
    fresh = client.get("/seen").json
    assert fresh["correlation_id"] == fresh["trace_id"] and len(fresh["trace_id"]) == 32
    assert correlation_id_var.get() is None  # restored after the request


def test_publish_span_parent_is_the_current_span_and_consume_continues_it(spans):
    request = tracing.start("request", "SERVER", carrier={"traceparent": TRACEPARENT})
    traced, headers = publish_span(envelope(TRACE_ID))
    traced.finish()
    request.finish()
    properties = message_properties(envelope(TRACE_ID), {"x-signer": "inbox"}, None, headers)
    assert properties.headers["traceparent"].split("-")[1] == TRACE_ID
    assert properties.headers["x-signer"] == "inbox"
    consumed = consume_span(envelope(TRACE_ID), properties, "auto-reply.message-delivered")
    with event_context(envelope(TRACE_ID), consumed.trace_id):
        assert correlation_id_var.get() == TRACE_ID == tracing.current_trace_id()
    consumed.finish()
    by_name = {span.name: span for span in spans.get_finished_spans()}
    publish, consume = by_name["publish message.delivered.v1"], by_name["consume message.delivered.v1"]
    assert publish.kind == SpanKind.PRODUCER and publish.parent.span_id == by_name["request"].context.span_id
    assert consume.kind == SpanKind.CONSUMER and consume.parent.span_id == publish.context.span_id
    assert consume.attributes["messaging.destination.name"] == "auto-reply.message-delivered"


def test_the_relay_continues_the_trace_its_envelope_names(spans):
    """No current span (the outbox relay): the envelope's correlation id, a trace id, is continued."""
    traced, headers = publish_span(envelope(TRACE_ID))
    traced.finish()
    assert headers["traceparent"].split("-")[1] == TRACE_ID and headers["traceparent"].endswith("-01")
    # A correlation id that is no trace id (tracing turned on later): a trace of its own.
    other, other_headers = publish_span(envelope("abc-123"))
    other.finish()
    assert other_headers["traceparent"].split("-")[1] != TRACE_ID
    # A consumer given no traceparent continues the correlation id's trace.
    consumed = consume_span(envelope(TRACE_ID), pika.BasicProperties(headers={}), "q")
    assert consumed.trace_id == TRACE_ID
    consumed.finish()


def test_ratio_sampling_follows_the_parent_and_is_consistent_by_trace_id():
    exporter = InMemorySpanExporter()
    tracing.configure("test", {"CLINIC_TRACE_SAMPLE_RATIO": "0"}, exporter=exporter)
    try:
        root = tracing.start("root", "SERVER")
        assert len(root.trace_id) == 32  # not sampled, still an id to correlate logs with
        root.finish()
        child = tracing.start("child", "SERVER", carrier={"traceparent": TRACEPARENT})  # sampled parent
        child.finish()
        assert [span.name for span in exporter.get_finished_spans()] == ["child"]
    finally:
        tracing.shutdown()


def test_configure_from_the_environment_logs_no_problem_when_off(caplog):
    with caplog.at_level(logging.WARNING):
        assert tracing.configure("test", {}) is False
    assert not caplog.records


def test_a_kept_traceparent_parents_the_publish_span(spans):
    """What an outbox entry would keep (tracing.current_traceparent) parents the relay's publish span."""
    request = tracing.start("request", "SERVER", carrier={"traceparent": TRACEPARENT})
    kept = tracing.current_traceparent()
    request.finish()
    assert kept.split("-")[1] == TRACE_ID and tracing.current_traceparent() is None
    traced, headers = publish_span(envelope("not-a-trace-id"), kept)
    traced.finish()
    by_name = {span.name: span for span in spans.get_finished_spans()}
    assert by_name["publish message.delivered.v1"].parent.span_id == by_name["request"].context.span_id
    assert headers["traceparent"].split("-")[1] == TRACE_ID
