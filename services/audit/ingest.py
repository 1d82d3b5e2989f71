"""The audit stream: `phi.accessed.v1` and `security_event.recorded.v1` from every service, taken
from the audit service's own durable queue and recorded in the hash chains.

The queue (`audit.records`, with `.retry` and `.parking`) is bound to those two routing keys and
consumed by nothing else; it is declared by the consumer (and by the launcher before any service
starts, `declare_queues`), so no event of the stream is left in `clinic.events.unrouted`. The kit
Consumer gives manual acks, bounded retries, parking and processed-event idempotency; the
records' unique event_id index makes a redelivery that slipped past it harmless.

An event that cannot be recorded as it stands (not the payload its type names, or an envelope
and payload naming different agencies) is parked, never dropped: the parking queue keeps it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pika
from google.protobuf.timestamp_pb2 import Timestamp

from clinic.audit.v1 import audit_pb2, security_pb2
from services.audit.chain import CATEGORY_PHI, CATEGORY_SECURITY, Entry, chain_of, plausible_ms, text
from services.audit.checkpoints import Checkpointer
from services.audit.config import SERVICE, AuditSettings
from services.audit.store import AuditStore
from services.kit.bus import Consumer, Topology, connection_parameters
from services.kit.bus.topology import ConsumerQueues
from services.kit.events import Envelope, PermanentError, occurred_at_ms, unpack
from services.kit.mongo import now_ms
from services.kit.processed_events import ProcessedEvents

log = logging.getLogger(__name__)

PHI_ACCESSED = "phi.accessed.v1"
SECURITY_EVENT = "security_event.recorded.v1"
ROUTING_KEYS = (PHI_ACCESSED, SECURITY_EVENT)


def _when(stamp: Timestamp, envelope: Envelope) -> int:
    """When it happened: the payload's time, else the envelope's, else now (implausible ones skipped)."""
    for ms in (stamp.ToMilliseconds() if stamp.seconds or stamp.nanos else 0, occurred_at_ms(envelope)):
        if plausible_ms(ms):
            return ms
    return now_ms()


def _agency(envelope: Envelope, payload_agency: str) -> str:
    if envelope.agency_id != payload_agency:
        raise PermanentError("envelope and payload name different agencies")
    try:
        chain_of(payload_agency)
    except ValueError:
        raise PermanentError("agency id is not an agency id") from None
    return payload_agency


def entry_from(envelope: Envelope) -> Entry:
    """What the event says, as one audit entry; PermanentError (parked) when it cannot be recorded."""
    common = {
        "event_id": envelope.event_id,
        "event_type": envelope.event_type,
        "producer": text(envelope.producer),
        "correlation_id": text(envelope.correlation_id),
    }
    if envelope.event_type == PHI_ACCESSED:
        phi = unpack(envelope, audit_pb2.PhiAccessed)
        return Entry(
            **common,
            category=CATEGORY_PHI,
            agency_id=_agency(envelope, phi.agency_id),
            occurred_at=_when(phi.accessed_at, envelope),
            service=text(phi.service),
            actor_id=text(phi.actor_id),
            actor_kind=text(phi.actor_kind),
            action=text(phi.action),
            outcome=text(phi.outcome),
            resource_type=text(phi.resource_type),
            resource_id=text(phi.resource_id),
            patient_id=text(phi.patient_id),
        )
    if envelope.event_type == SECURITY_EVENT:
        event = unpack(envelope, security_pb2.SecurityEvent)
        return Entry(
            **common,
            category=CATEGORY_SECURITY,
            agency_id=_agency(envelope, event.agency_id),
            occurred_at=_when(event.occurred_at, envelope),
            service=text(event.service),
            actor_id=text(event.actor_id),
            actor_kind=text(event.actor_kind),
            action=text(event.kind),
            outcome=text(event.outcome),
            resource_type=text(event.target_type),
            resource_id=text(event.target_id),
            reason=text(event.reason),
            source=text(event.source),
        )
    raise PermanentError("not an event of the audit stream")


class Recorder:
    """The consumer's handlers: one event, or the events of one delivery batch."""

    def __init__(self, store: AuditStore, checkpointer: Checkpointer):
        self.store = store
        self.checkpointer = checkpointer

    def handle(self, envelope: Envelope) -> None:
        record = self.store.append(entry_from(envelope))
        self.checkpointer.after_append([record])

    def handle_batch(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Record every event of the batch in one pass (each chain's head read once); the ones that
        cannot be recorded are left to `handle`, which parks them."""
        left, entries = [], []
        for envelope in envelopes:
            try:
                entries.append(entry_from(envelope))
            except PermanentError:
                left.append(envelope)
        records = self.store.append_all(entries)
        self.checkpointer.after_append(records)
        return left


def consumer_queues(settings: AuditSettings) -> ConsumerQueues:
    """The audit queue with its retry and parking queues, as the consumer declares them."""
    topology = Topology(exchange=settings.events_exchange)
    return ConsumerQueues(topology, topology.name(settings.queue), ROUTING_KEYS, settings.retry_delay_ms)


def build_consumer(settings: AuditSettings, recorder: Recorder, processed: ProcessedEvents) -> Consumer:
    """The durable, competing consumer every replica shares."""
    return Consumer(
        settings.amqp_url,
        settings.queue,
        list(ROUTING_KEYS),
        recorder.handle,
        topology=Topology(exchange=settings.events_exchange),
        processed=processed,
        prefetch=settings.prefetch,
        max_retries=settings.max_retries,
        retry_delay_ms=settings.retry_delay_ms,
        connection_name=f"{SERVICE}-consumer",
        batch_handler=recorder.handle_batch,
    )


def declare_queues(settings: AuditSettings, connect: Callable = pika.BlockingConnection) -> None:
    """Declare the audit queue and its bindings now (idempotent), so events published before the
    audit service first runs are kept for it."""
    connection = connect(connection_parameters(settings.amqp_url, f"{SERVICE}-declare"))
    try:
        consumer_queues(settings).declare(connection.channel())
    finally:
        connection.close()
