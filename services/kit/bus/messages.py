"""What a message on the bus carries: its properties and headers, and the event's ids in logs.

Body = serialized Envelope, persistent, content type `application/x-protobuf`, message_id =
event id, type = event type, correlation_id, timestamp (s), app_id = producer and headers
`x-producer`, `x-agency-id`, and the signature `x-signer`, `x-signature` (services.kit.bus.signing;
kept unchanged by retries and parking, so a good event stays valid). user_id = the broker user of
the publishing connection: the broker refuses a message whose user_id is not the user it
authenticated, so it names who really sent it (the service's own broker user, docs/bus-security.md).
Retries add `x-retry-count`; parking adds `x-error-type`, `x-error-reason`, `x-parked-at` (epoch
ms) and `x-parked-by` (queue). A republished message is sent by the consumer's user, so its
user_id is left out and the first one kept as `x-published-by`. No payload content is ever put in
headers or logs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pika

from clinic.events.v1.envelope_pb2 import Envelope
from services.kit import tracing
from services.kit.logs import accept_correlation_id, correlation_id_var, event_id_var
from services.kit.mongo import now_ms

__all__ = [
    "CONTENT_TYPE",
    "HEADER_AGENCY",
    "HEADER_ERROR_REASON",
    "HEADER_ERROR_TYPE",
    "HEADER_PARKED_AT",
    "HEADER_PARKED_BY",
    "HEADER_PRODUCER",
    "HEADER_PUBLISHED_BY",
    "HEADER_RETRY_COUNT",
    "event_context",
    "message_properties",
    "published_by",
]

CONTENT_TYPE = "application/x-protobuf"
HEADER_PRODUCER = "x-producer"
HEADER_AGENCY = "x-agency-id"
HEADER_RETRY_COUNT = "x-retry-count"
HEADER_ERROR_TYPE = "x-error-type"
HEADER_ERROR_REASON = "x-error-reason"
HEADER_PARKED_AT = "x-parked-at"
HEADER_PARKED_BY = "x-parked-by"
HEADER_PUBLISHED_BY = "x-published-by"
_BROKER_USER_RE = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")
# Broker-owned dead-letter bookkeeping; carrying it into a republish makes the broker see a
# dead-letter cycle and drop the message, so it is stripped.
_BROKER_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                   "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")


def message_properties(
    envelope: Envelope, signature: dict[str, str] | None = None, user_id: str | None = None,
    trace: dict[str, str] | None = None,
) -> pika.BasicProperties:
    """The properties of `envelope`'s message; `signature` adds the signing headers (services.kit.bus.signing);
    `user_id` must be the connection's broker user (`broker_user`), or the broker refuses the message;
    `trace` adds the W3C `traceparent` (`publish_span`)."""
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=envelope.event_id,
        type=envelope.event_type,
        correlation_id=envelope.correlation_id or None,
        timestamp=envelope.occurred_at.seconds or int(time.time()),
        app_id=envelope.producer or None,
        user_id=user_id or None,
        headers={
            HEADER_PRODUCER: envelope.producer, HEADER_AGENCY: envelope.agency_id, **(signature or {}), **(trace or {}),
        },
    )


def publish_span(
    envelope: Envelope, traceparent: str | None = None
) -> tuple[tracing.Activation | None, dict[str, str]]:
    """A PRODUCER span for publishing `envelope` and the `traceparent` header that continues it;
    (None, {}) while tracing is off. Its parent is `traceparent` when given (what the request that
    staged the event kept, `tracing.current_traceparent`), else the current span (a request
    publishing), else the trace the envelope's correlation id names (services.kit.tracing)."""
    if not tracing.enabled():
        return None, {}
    parent = None
    if traceparent:
        parent = tracing.context_of(traceparent)
    elif not tracing.has_current_span():
        parent = tracing.correlation_context(envelope.correlation_id, envelope.event_id)
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "publish",
        "messaging.destination.name": envelope.event_type,
        "messaging.message.id": envelope.event_id,
    }
    traced = tracing.start(f"publish {envelope.event_type}", "PRODUCER", parent=parent, activate=False,
                           attributes=attributes)
    headers: dict[str, str] = {}
    tracing.inject(headers, traced)
    return traced, headers


def consume_span(envelope: Envelope, properties: pika.BasicProperties, queue: str) -> tracing.Activation | None:
    """A CONSUMER span, made current, for handling `envelope`: continues the `traceparent` in its
    headers (else the trace its correlation id names); None while tracing is off."""
    if not tracing.enabled():
        return None
    headers = properties.headers or {}
    parent = None if tracing.TRACEPARENT in headers else tracing.correlation_context(
        envelope.correlation_id, envelope.event_id)
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.destination.name": queue,
        "messaging.message.id": envelope.event_id,
    }
    return tracing.start(f"consume {envelope.event_type}", "CONSUMER", carrier=headers, parent=parent,
                         attributes=attributes)


def broker_user(params: pika.ConnectionParameters) -> str | None:
    """The user a connection with `params` authenticates as, for `user_id`; None when the
    credentials name none (EXTERNAL: the broker takes it from the client certificate)."""
    return getattr(params.credentials, "username", None) or None


def published_by(properties: pika.BasicProperties) -> str:
    """The delivery's user_id (the broker checked it against the publishing connection's user),
    when it has a plain shape; else ''. The `x-published-by` header that republishing adds is, like
    every header, only for people reading the queues."""
    value = properties.user_id
    return value if isinstance(value, str) and _BROKER_USER_RE.match(value) else ""


# -- republishing to the retry and parking queues ---------------------------------------------------


def retries_of(properties: pika.BasicProperties) -> int:
    """The delivery's `x-retry-count` (0 when absent or not a number)."""
    try:
        return max(0, int((properties.headers or {}).get(HEADER_RETRY_COUNT)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def retry_headers(properties: pika.BasicProperties, retries: int) -> dict:
    headers = _clean_headers(properties)
    headers[HEADER_RETRY_COUNT] = retries
    return headers


def parking_headers(properties: pika.BasicProperties, exc: BaseException, reason: str, retries: int,
                    parked_by: str) -> dict:
    headers = _clean_headers(properties)
    headers.update({
        HEADER_RETRY_COUNT: retries,
        HEADER_ERROR_TYPE: type_name(exc),
        HEADER_ERROR_REASON: reason[:200],
        HEADER_PARKED_AT: now_ms(),
        HEADER_PARKED_BY: parked_by,
    })
    return headers


def republished_properties(properties: pika.BasicProperties, headers: dict) -> pika.BasicProperties:
    """The delivery's own properties, persistent, with `headers` in place of its headers."""
    return pika.BasicProperties(
        content_type=properties.content_type,
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=properties.message_id,
        type=properties.type,
        correlation_id=properties.correlation_id,
        timestamp=properties.timestamp,
        app_id=properties.app_id,
        headers=headers,
    )


def _clean_headers(properties: pika.BasicProperties) -> dict:
    """The delivery's headers without the broker's dead-letter bookkeeping, with its user_id kept as
    `x-published-by` (the republish is the consumer's, so it cannot carry the producer's user_id)."""
    headers = {k: v for k, v in (properties.headers or {}).items() if k not in _BROKER_HEADERS}
    if properties.user_id:  # checked by the broker: it replaces whatever the header claimed
        headers[HEADER_PUBLISHED_BY] = properties.user_id
    return headers


def type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


# -- the event's ids in logs -------------------------------------------------------------------------


def log_extra(envelope: Envelope | None, **more: object) -> dict:
    extra: dict[str, object] = dict(more)
    if envelope is not None:
        extra.update(
            event_id=envelope.event_id, event_type=envelope.event_type, correlation_id=envelope.correlation_id
        )
    return extra


@contextmanager
def event_context(envelope: Envelope, trace_id: str | None = None) -> Iterator[None]:
    """Logs and outgoing calls made while handling `envelope` carry its correlation and event ids
    (the correlation id is `trace_id` while the handling is traced, services.kit.tracing)."""
    tokens = (
        correlation_id_var.set(trace_id or accept_correlation_id(envelope.correlation_id) or envelope.event_id),
        event_id_var.set(envelope.event_id),
    )
    try:
        yield
    finally:
        event_id_var.reset(tokens[1])
        correlation_id_var.reset(tokens[0])
