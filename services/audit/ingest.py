"""The audit stream: `phi.accessed.v1` and `security_event.recorded.v1` from every service, taken
from the audit service's own durable queue and recorded in the hash chains.

The queue (`audit.records`, with `.retry` and `.parking`) is bound to those two routing keys and
consumed by nothing else; it is declared by the consumer (and by the launcher before any service
starts, `declare_queues`), so no event of the stream is left in `clinic.events.unrouted`. The kit
Consumer gives manual acks, bounded retries, parking and processed-event idempotency; the
records' unique event_id index makes a redelivery that slipped past it harmless.

An event that cannot be recorded as it stands is parked, never dropped: the parking queue keeps
it, with a stable reason, and the refusal itself becomes an `event_refused` security event of the
audit service (so it is in the trail). The reasons: `payload_malformed` (not the payload its type
names), `agency_mismatch` (envelope and payload name different agencies), `agency_id_invalid`,
`not_audit_stream_event`, and the producer checks of services.audit.producers
(`service_not_producer`, `security_kind_not_allowed`, `security_kind_unknown`).

Time: `occurred_at` is the producer's clock. An event whose `occurred_at` is further than
AUDIT_MAX_CLOCK_SKEW_S from the audit service's receipt time, either way, is recorded with
`clock_skew_ms` = occurred_at - receipt time (0 otherwise), inside the hashed content. A value in
the future is always a wrong clock; one in the past may also be a delivery delay (an outage, a
queue backlog). `recorded_at` is the audit service's own clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import pika
from google.protobuf.timestamp_pb2 import Timestamp

from clinic.audit.v1 import audit_pb2, security_pb2
from services.audit import producers
from services.audit.chain import CATEGORY_PHI, CATEGORY_SECURITY, Entry, chain_of, plausible_ms, text
from services.audit.checkpoints import Checkpointer
from services.audit.config import SERVICE, AuditSettings
from services.audit.store import AuditStore
from services.kit.bus import Consumer, Topology, connection_parameters
from services.kit.bus import signing as bus_signing
from services.kit.bus.topology import ConsumerQueues
from services.kit.events import Envelope, MalformedEvent, PermanentError, occurred_at_ms, unpack
from services.kit.mongo import now_ms
from services.kit.patient_ref import is_patient_ref, normalise_system
from services.kit.processed_events import ProcessedEvents
from services.kit.security_events import SecurityLog

log = logging.getLogger(__name__)
M = TypeVar("M")

PHI_ACCESSED = "phi.accessed.v1"
SECURITY_EVENT = "security_event.recorded.v1"
ROUTING_KEYS = (PHI_ACCESSED, SECURITY_EVENT)
DEFAULT_MAX_CLOCK_SKEW_MS = 300_000
SKEW_LOG_EVERY_MS = 60_000  # one warning a minute per producer whose clock is off
MAX_REF_SYSTEM = 200


def _when(stamp: Timestamp, envelope: Envelope) -> int:
    """When it happened: the payload's time, else the envelope's, else now (implausible ones skipped)."""
    for ms in (stamp.ToMilliseconds() if stamp.seconds or stamp.nanos else 0, occurred_at_ms(envelope)):
        if plausible_ms(ms):
            return ms
    return now_ms()


def _agency(envelope: Envelope, payload_agency: str) -> str:
    if envelope.agency_id != payload_agency:
        raise PermanentError("agency_mismatch")
    try:
        chain_of(payload_agency)
    except ValueError:
        raise PermanentError("agency_id_invalid") from None
    return payload_agency


def _payload(envelope: Envelope, message_cls: type[M]) -> M:
    try:
        return unpack(envelope, message_cls)
    except MalformedEvent:
        raise MalformedEvent("payload_malformed") from None  # a stable reason, not the event's text


def _from_producer(envelope: Envelope, service: str, kind: str | None = None) -> None:
    """The payload speaks for the producer the bus authenticated, and of what that producer may report."""
    reason = producers.service_refusal(envelope.producer, service)
    if reason is None and kind is not None:
        reason = producers.security_kind_refusal(envelope.producer, kind)
    if reason is not None:
        raise PermanentError(reason)


def clock_skew(occurred_at: int, received_at: int, max_skew_ms: int) -> int:
    """occurred_at - received_at when they are more than `max_skew_ms` apart, either way; else 0."""
    skew = occurred_at - received_at
    return skew if abs(skew) > max_skew_ms else 0


def ref_system(value: str) -> str:
    """An identifier space as producers name it ("mrn:riverbend", "erx:dosespot"), normalised; ""
    for none or for anything that cannot be one (control characters, over 200 characters)."""
    system = normalise_system(value or "")
    return system if 0 < len(system) <= MAX_REF_SYSTEM and system.isprintable() else ""


def entry_from(
    envelope: Envelope, *, received_at: int | None = None, max_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS
) -> Entry:
    """What the event says, as one audit entry; PermanentError (parked) when it cannot be recorded.
    `received_at`: when the audit service took it (default now), to measure the producer's clock."""
    entry = _entry(envelope)
    skew = clock_skew(entry.occurred_at, now_ms() if received_at is None else received_at, max_skew_ms)
    return replace(entry, clock_skew_ms=skew) if skew else entry


def _entry(envelope: Envelope) -> Entry:
    common = {
        "event_id": envelope.event_id,
        "event_type": envelope.event_type,
        "producer": text(envelope.producer),
        "correlation_id": text(envelope.correlation_id),
    }
    if envelope.event_type == PHI_ACCESSED:
        phi = _payload(envelope, audit_pb2.PhiAccessed)
        _from_producer(envelope, phi.service)
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
        event = _payload(envelope, security_pb2.SecurityEvent)
        _from_producer(envelope, event.service, event.kind)
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
    raise PermanentError("not_audit_stream_event")


class Recorder:
    """The consumer's handlers: one event, or the events of one delivery batch."""

    def __init__(
        self,
        store: AuditStore,
        checkpointer: Checkpointer,
        *,
        max_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS,
        security_log: SecurityLog | None = None,
        queue: str = "",
    ):
        self.store = store
        self.checkpointer = checkpointer
        self.max_skew_ms = max_skew_ms
        self.security_log = security_log
        self.queue = queue
        self._skew_logged: dict[str, int] = {}
        self._ref_systems: set[tuple[str, str]] = set()

    def entry(self, envelope: Envelope) -> Entry:
        entry = entry_from(envelope, max_skew_ms=self.max_skew_ms)
        if entry.clock_skew_ms:
            self._log_skew(entry)
        self._note_ref_system(envelope, entry)
        return entry

    def _note_ref_system(self, envelope: Envelope, entry: Entry) -> None:
        """A keyed patient reference's identifier space, kept once per chain (a search by record
        number tries every space the chain has used)."""
        if entry.category != CATEGORY_PHI or not is_patient_ref(entry.patient_id):
            return
        system = ref_system(_payload(envelope, audit_pb2.PhiAccessed).patient_ref_system)
        if system and (entry.chain, system) not in self._ref_systems:
            self.store.note_ref_system(entry.chain, system)
            self._ref_systems.add((entry.chain, system))

    def _log_skew(self, entry: Entry) -> None:
        now = now_ms()
        if now - self._skew_logged.get(entry.producer, 0) >= SKEW_LOG_EVERY_MS:
            self._skew_logged[entry.producer] = now
            log.warning(
                "event time far from its receipt: recorded with its clock skew (the producer's clock, or a delay)",
                extra={"code": "clock_skew", "event_id": entry.event_id, "delay_s": -entry.clock_skew_ms // 1000},
            )

    def handle(self, envelope: Envelope) -> None:
        try:
            entry = self.entry(envelope)
        except PermanentError as exc:
            self._refused(envelope, exc)
            raise
        record = self.store.append(entry)
        self.checkpointer.after_append([record])

    def _refused(self, envelope: Envelope, exc: PermanentError) -> None:
        """The parked event, as an `event_refused` security event of the audit service: in the trail,
        naming the authenticated producer, the event and a stable reason (never the event's text)."""
        if self.security_log is None:
            return
        refusal = bus_signing.Refusal(
            reason=exc.reason,
            queue=self.queue,
            event_id=bus_signing.safe_id(envelope.event_id),
            event_type=bus_signing.safe_type(envelope.event_type),
            agency_id=envelope.agency_id if _is_agency(envelope.agency_id) else "",
            producer=bus_signing.safe_name(envelope.producer),
            signer="",
        )
        bus_signing.record_refusal(self.security_log, refusal)

    def handle_batch(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Record every event of the batch in one pass (each chain's head read once); the ones that
        cannot be recorded are left to `handle`, which parks them."""
        left, entries = [], []
        for envelope in envelopes:
            try:
                entries.append(self.entry(envelope))
            except PermanentError:
                left.append(envelope)
        records = self.store.append_all(entries)
        self.checkpointer.after_append(records)
        return left


def _is_agency(agency_id: str) -> bool:
    try:
        return bool(agency_id) and chain_of(agency_id) == agency_id
    except ValueError:
        return False


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
        consumer_queues(settings).open(connection)
    finally:
        connection.close()
