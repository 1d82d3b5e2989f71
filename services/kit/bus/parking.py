"""Parked messages: list them, and send them back to their consumer once the cause is fixed.

A consumer parks what it cannot handle in `<queue>.parking` (services.kit.bus.consumer) with the
reason in its headers. `python -m services.kit.bus parked QUEUE` lists them (event id, type, reason,
when, retries: never the body); `python -m services.kit.bus replay-parked QUEUE` moves them back to
`<queue>` through the consumer's own exchange `<queue>.republish` (the route the broker's own
dead-lettering takes, so a service's broker user may do it), each confirmed by the broker before it
is removed from parking. The body and the signature headers are kept unchanged, so a good event
is still proven; the parking headers and the retry count are dropped, so it gets every retry again.
Consumers deduplicate on event id: replaying an event that was handled after all does nothing.

`--event-id` (repeatable) replays only those; `--limit N` at most N. A message that is refused
again (its producer not proven) is parked again by the consumer: fix the keys first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pika
import pika.exceptions

from services.kit.bus.messages import (
    HEADER_ERROR_REASON,
    HEADER_ERROR_TYPE,
    HEADER_PARKED_AT,
    HEADER_PARKED_BY,
    HEADER_RETRY_COUNT,
    republished_properties,
)
from services.kit.bus.topology import ConsumerQueues, Topology, connection_parameters

__all__ = ["Parked", "ReplayReport", "list_parked", "replay_parked"]

logger = logging.getLogger(__name__)

_PARKING_HEADERS = (HEADER_ERROR_REASON, HEADER_ERROR_TYPE, HEADER_PARKED_AT, HEADER_PARKED_BY, HEADER_RETRY_COUNT)


@dataclass(frozen=True)
class Parked:
    event_id: str
    event_type: str
    reason: str
    error_type: str
    parked_at_ms: int
    retries: int


@dataclass
class ReplayReport:
    queue: str
    replayed: list[str] = field(default_factory=list)
    left: int = 0  # still parked (not selected, or over the limit)


def _queues(queue: str, topology: Topology) -> ConsumerQueues:
    return ConsumerQueues(topology, topology.name(queue), (), 0)


def _text(headers: dict, name: str) -> str:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value) if value is not None else ""


def _int(headers: dict, name: str) -> int:
    try:
        return int(headers.get(name) or 0)
    except (TypeError, ValueError):
        return 0


def _parked(properties: pika.BasicProperties) -> Parked:
    headers = properties.headers or {}
    return Parked(
        event_id=properties.message_id or "",
        event_type=properties.type or "",
        reason=_text(headers, HEADER_ERROR_REASON)[:200],
        error_type=_text(headers, HEADER_ERROR_TYPE)[:200],
        parked_at_ms=_int(headers, HEADER_PARKED_AT),
        retries=_int(headers, HEADER_RETRY_COUNT),
    )


def _walk(channel, parking: str, visit) -> int:
    """Take every message of `parking` once (unacked), call visit(method, properties, body) -> True
    when it was moved (then acked), else it is put back afterwards. Returns how many were put back."""
    kept = []
    try:
        while True:
            method, properties, body = channel.basic_get(parking, auto_ack=False)
            if method is None:
                break
            if visit(method, properties, body):
                channel.basic_ack(method.delivery_tag)
            else:
                kept.append(method.delivery_tag)
    finally:
        for tag in kept:
            if channel.is_open:
                channel.basic_nack(tag, requeue=True)
    return len(kept)


def list_parked(amqp_url: str, queue: str, topology: Topology | None = None) -> list[Parked]:
    """What `<queue>.parking` holds, oldest first; the messages stay parked."""
    queues = _queues(queue, topology or Topology())
    connection = pika.BlockingConnection(connection_parameters(amqp_url, "clinic-parked-list"))
    found: list[Parked] = []
    try:
        channel = connection.channel()

        def visit(_method, properties, _body) -> bool:
            found.append(_parked(properties))
            return False

        _walk(channel, queues.parking_queue, visit)
    finally:
        if connection.is_open:
            connection.close()
    return found


def replay_parked(
    amqp_url: str,
    queue: str,
    *,
    event_ids: set[str] | None = None,
    limit: int | None = None,
    topology: Topology | None = None,
) -> ReplayReport:
    """Move parked messages of `queue` back to it (see the module docstring)."""
    queues = _queues(queue, topology or Topology())
    report = ReplayReport(queues.queue)
    connection = pika.BlockingConnection(connection_parameters(amqp_url, "clinic-parked-replay"))
    try:
        channel = connection.channel()
        channel.confirm_delivery()

        def visit(_method, properties, body: bytes) -> bool:
            if limit is not None and len(report.replayed) >= limit:
                return False
            if event_ids is not None and properties.message_id not in event_ids:
                return False
            headers = {k: v for k, v in (properties.headers or {}).items() if k not in _PARKING_HEADERS}
            try:
                channel.basic_publish(
                    queues.republish_exchange,
                    queues.queue,
                    body,
                    republished_properties(properties, headers),
                    mandatory=True,
                )
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
                logger.error(
                    "parked message not replayed: the broker did not take it",
                    extra={"queue": queues.queue, "event_id": properties.message_id},
                )
                return False
            report.replayed.append(properties.message_id or "")
            return True

        report.left = _walk(channel, queues.parking_queue, visit)
    finally:
        if connection.is_open:
            connection.close()
    logger.info("parked messages replayed", extra={"queue": queues.queue, "count": len(report.replayed)})
    return report
