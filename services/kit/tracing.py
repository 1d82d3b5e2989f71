"""OpenTelemetry traces: off by default, near-zero cost while off, W3C `traceparent` on every hop.

Turned on per process by `configure(service)` (called by services.kit.logs.configure_logging, so
every service and the local gateway read it at start-up):

- `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL, `.../v1/traces`) or `OTEL_EXPORTER_OTLP_ENDPOINT`
  (the collector's base URL; `/v1/traces` is added): where spans go, over OTLP/HTTP protobuf. Setting
  either turns tracing on.
- `CLINIC_TRACING`: `on` / `off` overrides that (`on` without an endpoint exports to the SDK's default,
  http://localhost:4318/v1/traces).
- `CLINIC_TRACE_SAMPLE_RATIO` (or the SDK's `OTEL_TRACES_SAMPLER_ARG`): the share of new traces kept,
  0..1 (default 1). Parent-based: a hop that receives a `traceparent` follows the caller's decision;
  a trace the gateway starts is kept by its trace id's ratio, so every service with the same ratio
  agrees on a trace even where no parent reached it.

Spans: the gateway (SERVER, then the `traceparent` it sends upstream), incoming HTTP (services.kit.http,
SERVER, named `METHOD /route/template`), gRPC server and client (services.kit.grpc_server /
grpc_client, `traceparent` in the call's metadata), bus publish (PRODUCER, `traceparent` in the AMQP
headers) and consume (CONSUMER: the handler's work, its gRPC calls and the events it stages continue
the publisher's trace).

While tracing is on, the correlation id in logs (services.kit.logs) is the trace id (32 hex
digits): a request's, a call's and an event's handling log the id a trace backend shows. While
off, nothing here runs beyond one boolean test per hop and correlation ids are what they always
were. Attributes are ids, routes, methods, status codes and queue names only: never a body, a
query string or anything a patient wrote.

The outbox relay publishes long after the request that staged an event; the envelope keeps the
request's correlation id, which is then its trace id, so `publish_context` continues that trace
(under a parent id derived from the event id) when no `traceparent` is at hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_TRACE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


class _State:
    __slots__ = ("enabled", "provider", "ratio", "service", "tracer")

    def __init__(self) -> None:
        self.enabled = False
        self.provider: Any = None
        self.tracer: Any = None
        self.service = ""
        self.ratio = 1.0


_state = _State()


def enabled() -> bool:
    return _state.enabled


class TracingSettings:
    __slots__ = ("endpoint", "on", "problems", "ratio")

    def __init__(self, on: bool, endpoint: str | None, ratio: float, problems: list[str]):
        self.on, self.endpoint, self.ratio, self.problems = on, endpoint, ratio, problems


def read_settings(environ: Mapping[str, str] | None = None) -> TracingSettings:
    """The tracing settings in `environ` (default: the process's); problems are listed, not raised."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    endpoint = (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or "").strip() or None
    base = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
    if endpoint is None and base:
        endpoint = base.rstrip("/") + "/v1/traces"
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        problems.append("OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT must be an http:// or https:// URL")
        endpoint = None
    switch = (env.get("CLINIC_TRACING") or "").strip().lower()
    if switch and switch not in _ON + _OFF:
        problems.append(f"CLINIC_TRACING must be on or off, got {switch!r}")
        switch = ""
    on = switch in _ON if switch else endpoint is not None
    raw_ratio = (env.get("CLINIC_TRACE_SAMPLE_RATIO") or env.get("OTEL_TRACES_SAMPLER_ARG") or "").strip()
    ratio = 1.0
    if raw_ratio:
        try:
            ratio = float(raw_ratio)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            problems.append(f"CLINIC_TRACE_SAMPLE_RATIO must be a number from 0 to 1, got {raw_ratio!r}")
            ratio = 1.0
    return TracingSettings(on, endpoint, ratio, problems)


def configure(
    service: str, environ: Mapping[str, str] | None = None, *, exporter: Any = None, batched: bool = False
) -> bool:
    """Turn tracing on for this process when the settings say so; returns whether it is on.
    `exporter` (a SpanExporter) replaces the OTLP one (tests, the bench) and turns tracing on; it is
    given each span as it ends unless `batched`."""
    settings = read_settings(environ)
    for problem in settings.problems:
        log.warning("tracing setting ignored: %s", problem)
    if not settings.on and exporter is None:
        return _state.enabled
    if _state.enabled:
        return True
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "service.namespace": "clinic"}),
        sampler=ParentBased(TraceIdRatioBased(settings.ratio)),
    )
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint)))
    else:
        provider.add_span_processor(BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter))
    _state.provider = provider
    _state.tracer = provider.get_tracer("clinic.kit")
    _state.service = service
    _state.ratio = settings.ratio
    _state.enabled = True
    log.debug("tracing on", extra={"address": settings.endpoint or "", "count": int(settings.ratio * 100)})
    return True


def shutdown() -> None:
    """Flush and stop (tests; a process's exit does it through the SDK's atexit hook)."""
    provider, _state.provider, _state.tracer, _state.enabled = _state.provider, None, None, False
    if provider is not None:
        provider.shutdown()


def force_flush(timeout_ms: int = 5_000) -> None:
    if _state.provider is not None:
        _state.provider.force_flush(timeout_ms)


# --- spans --------------------------------------------------------------------------------------


def _kind(name: str):
    from opentelemetry.trace import SpanKind

    return getattr(SpanKind, name)


def _parent_from(carrier: Mapping[str, Any] | None):
    """The context a `traceparent` in `carrier` names (None when it names none)."""
    if not carrier:
        return None
    value = carrier.get(TRACEPARENT)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    state = carrier.get(TRACESTATE)
    if isinstance(state, bytes):
        state = state.decode("latin-1")
    fields = {TRACEPARENT: value, **({TRACESTATE: state} if isinstance(state, str) else {})}
    return TraceContextTextMapPropagator().extract(fields)


def context_of(traceparent: str):
    """The context a `traceparent` value names (None when it is not one)."""
    if not _state.enabled:
        return None
    return _parent_from({TRACEPARENT: traceparent})


class Activation:
    """A started span made current: `finish(status)` ends it and restores the previous context."""

    __slots__ = ("span", "token")

    def __init__(self, span: Any, token: Any):
        self.span, self.token = span, token

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def finish(self, *, error: str | None = None, attributes: Mapping[str, Any] | None = None) -> None:
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        try:
            if attributes:
                self.span.set_attributes(dict(attributes))
            if error:
                self.span.set_status(Status(StatusCode.ERROR, error))
            self.span.end()
        finally:
            if self.token is not None:
                context.detach(self.token)
                self.token = None


def start(
    name: str,
    kind: str,
    *,
    carrier: Mapping[str, Any] | None = None,
    parent: Any = None,
    attributes: Mapping[str, Any] | None = None,
    activate: bool = True,
) -> Activation | None:
    """Start a span (None while tracing is off): its parent is the `traceparent` in `carrier`, else
    `parent` (a Context), else the current span. With `activate` it becomes the current span until
    `finish` (logs, outgoing calls and published events then carry its trace)."""
    if not _state.enabled:
        return None
    from opentelemetry import context, trace

    ctx = _parent_from(carrier) if carrier is not None else None
    if ctx is None:
        ctx = parent
    span = _state.tracer.start_span(name, context=ctx, kind=_kind(kind), attributes=dict(attributes or {}))
    token = context.attach(trace.set_span_in_context(span)) if activate else None
    return Activation(span, token)


def inject(carrier: MutableMapping[str, Any], activation: Activation | None = None) -> None:
    """Put the current span's (or `activation`'s) `traceparent` into `carrier` (nothing while off)."""
    if not _state.enabled:
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = trace.set_span_in_context(activation.span) if activation is not None else None
    TraceContextTextMapPropagator().inject(carrier, context=ctx)


def current_traceparent() -> str | None:
    """The current span's W3C `traceparent`, to keep with work done later (an outbox entry), or None."""
    if not _state.enabled:
        return None
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get(TRACEPARENT)


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits), or None (off, or no span)."""
    if not _state.enabled:
        return None
    from opentelemetry import trace

    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


def correlation_context(correlation_id: str | None, event_id: str):
    """A remote parent in the trace `correlation_id` names (a trace id: 32 lower-case hex digits,
    not all zero), under a parent id derived from `event_id`, sampled as the ratio sampler decides
    for that trace id; None when the correlation id is not a trace id. For work that continues a
    request long after it (the outbox relay's publishing) and has nothing but the envelope."""
    if not _state.enabled or not correlation_id or not _TRACE_ID_RE.match(correlation_id):
        return None
    trace_id = int(correlation_id, 16)
    if trace_id == 0:
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    span_id = int.from_bytes(hashlib.sha256(event_id.encode()).digest()[:8], "big") or 1
    sampled = trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < TraceIdRatioBased.get_bound_for_rate(_state.ratio)
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT)
    parent = trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def has_current_span() -> bool:
    if not _state.enabled:
        return False
    from opentelemetry import trace

    return trace.get_current_span().get_span_context().is_valid
