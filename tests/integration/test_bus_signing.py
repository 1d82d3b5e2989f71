"""Forged events against the real broker: whoever can publish to the exchange cannot speak for a
producer. Each test performs the attack with a raw pika publish and checks that the consumer parks
the message with its reason, never runs the handler, and reports it as a security event."""

from __future__ import annotations

import subprocess
import sys
import threading
from types import SimpleNamespace

import pika
import pytest

from clinic.audit.v1 import security_pb2
from clinic.directory.v1 import directory_pb2
from clinic.inbox.v1 import inbox_pb2
from services.kit.bootstrap import ServiceWiring
from services.kit.bus import (
    HEADER_ERROR_REASON,
    HEADER_ERROR_TYPE,
    HEADER_RETRY_COUNT,
    HEADER_SIGNATURE,
    HEADER_SIGNER,
    Publisher,
)
from services.kit.bus.signing import development_keyring, record_refusal
from services.kit.events import decode_envelope, new_envelope, unpack
from services.kit.security_events import COLLECTION as SECURITY_OUTBOX
from services.kit.security_events import SecurityLog
from services.kit.settings import REPO_ROOT
from tests.waits import wait_until

REQUESTED = "board_item.delivery_requested.v1"
REVOKED = "session.revoked.v1"
SECURITY = "security_event.recorded.v1"


def potassium(producer: str = "notifications", agency: str = "agy_1"):
    request = inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB, title="Critical potassium, call patient", source="lab", source_ref="k-1",
        recipients=inbox_pb2.Recipients(whole_agency=True),
    )  # fmt: skip
    return new_envelope(REQUESTED, request, agency_id=agency, producer=producer)


class Handled:
    """A handler recording what it ran for; it can fail the first `fail_first` attempts."""

    def __init__(self, fail_first: int = 0):
        self.calls: list[str] = []
        self.fail_first = fail_first
        self._lock = threading.Lock()

    def __call__(self, envelope) -> None:
        with self._lock:
            self.calls.append(envelope.event_id)
            if len(self.calls) <= self.fail_first:
                raise RuntimeError("not yet")


@pytest.fixture
def keys(tmp_path):
    """A key pair per known producer, of this test alone: `.signer.signers[name]` signs as `name`."""
    return development_keyring(tmp_path / "run")


@pytest.fixture
def security_log(mongo_client, db_name):
    return SecurityLog(mongo_client[db_name], service="inbox")


@pytest.fixture
def guarded(event_bus, keys, security_log):
    """A consumer of delivery requests checking with `keys`, reporting refusals to `security_log`."""
    handled = Handled()
    consumer = event_bus.consumer(
        "deliveries", [REQUESTED], handled, producers=keys.producers,
        on_refused=lambda refusal: record_refusal(security_log, refusal), max_retries=2,
    )  # fmt: skip
    with consumer.running():
        yield consumer, handled


def publish_raw(event_bus, routing_key: str, body: bytes, headers: dict | None = None, *, exchange=None) -> None:
    """What anyone holding broker credentials can do: any routing key, any body, any headers."""
    connection = pika.BlockingConnection(pika.URLParameters(event_bus.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        target = event_bus.topology.exchange_name if exchange is None else exchange
        properties = pika.BasicProperties(delivery_mode=2, headers=headers)
        channel.basic_publish(target, routing_key, body, properties, mandatory=True)
    finally:
        connection.close()


def signed(keys, name: str, envelope, routing_key: str | None = None) -> dict:
    return keys.signer.signers[name].headers(routing_key or envelope.event_type, envelope.SerializeToString(), name)


def parked_reason(event_bus, consumer) -> tuple[str, dict]:
    properties, body = event_bus.get(consumer.parking_queue)
    return decode_envelope(body).event_id, properties.headers


def security_events(security_log) -> list[security_pb2.SecurityEvent]:
    found = []
    for doc in security_log.collection.find({"kind": {"$eq": "event_refused"}}):
        for entry in doc["_outbox"].values():
            found.append(unpack(decode_envelope(entry["env"]), security_pb2.SecurityEvent))
    return found


def test_an_unsigned_delivery_request_is_parked_unhandled_and_reported(event_bus, guarded, security_log):
    consumer, handled = guarded
    forged = potassium()
    publish_raw(event_bus, REQUESTED, forged.SerializeToString())  # no signature at all

    event_id, headers = parked_reason(event_bus, consumer)
    assert event_id == forged.event_id
    assert headers[HEADER_ERROR_REASON] == "unsigned"
    assert headers[HEADER_ERROR_TYPE] == "services.kit.bus.signing.EventRefused"
    assert headers[HEADER_RETRY_COUNT] == 0  # never retried
    assert handled.calls == []
    [event] = wait_until(lambda: security_events(security_log))
    assert (event.kind, event.outcome, event.reason) == ("event_refused", "refused", "unsigned")
    assert (event.agency_id, event.actor_id, event.actor_kind) == ("agy_1", "notifications", "service")
    assert (event.target_type, event.target_id) == (f"event:{REQUESTED}", forged.event_id)
    assert event.source == f"queue:{consumer.queue}" and event.service == "inbox"
    assert "potassium" not in repr(event)  # nothing the message says reaches the record
    assert event_bus.message_count(consumer.retry_queue) == 0


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        # web signs honestly as itself, but the envelope names notifications
        (lambda keys, env: signed(keys, "web", env), "bad_signature"),
        # web's signature, notifications' name in the header
        (lambda keys, env: {**signed(keys, "web", env), HEADER_SIGNER: "notifications"}, "bad_signature"),
        # a signer nobody knows
        (lambda keys, env: {**signed(keys, "web", env), HEADER_SIGNER: "lab-vendor"}, "unknown_producer"),
        # a signature that is not one
        (lambda keys, env: {HEADER_SIGNER: "notifications", HEADER_SIGNATURE: "AAAA"}, "bad_signature"),
    ],
)
def test_anothers_key_never_speaks_for_notifications(event_bus, guarded, keys, security_log, forge, reason):
    consumer, handled = guarded
    forged = potassium("notifications")
    publish_raw(event_bus, REQUESTED, forged.SerializeToString(), forge(keys, forged))
    event_id, headers = parked_reason(event_bus, consumer)
    assert (event_id, headers[HEADER_ERROR_REASON]) == (forged.event_id, reason)
    assert handled.calls == []
    assert [e.reason for e in wait_until(lambda: security_events(security_log))] == [reason]


def test_a_producer_that_may_not_publish_the_event_type_is_refused(event_bus, guarded, keys, security_log):
    consumer, handled = guarded
    by_web = potassium("web")  # web's own key, web's own name: only board producers may ask for deliveries
    publish_raw(event_bus, REQUESTED, by_web.SerializeToString(), signed(keys, "web", by_web))
    _, headers = parked_reason(event_bus, consumer)
    assert headers[HEADER_ERROR_REASON] == "producer_not_allowed"
    assert handled.calls == []
    assert [e.actor_id for e in wait_until(lambda: security_events(security_log))] == ["web"]


def test_a_body_changed_after_signing_is_refused(event_bus, guarded, keys):
    consumer, handled = guarded
    genuine = potassium()
    headers = signed(keys, "notifications", genuine)
    tampered = potassium()
    tampered.event_id = genuine.event_id
    tampered.agency_id = "agy_other"  # the same signed request, aimed at another agency
    publish_raw(event_bus, REQUESTED, tampered.SerializeToString(), headers)
    _, parked = parked_reason(event_bus, consumer)
    assert parked[HEADER_ERROR_REASON] == "bad_signature"
    assert handled.calls == []


def test_a_signed_event_replayed_under_another_routing_key_or_straight_into_a_queue_is_refused(event_bus, keys):
    revocations = Handled()
    consumer = event_bus.consumer("revocations", [REVOKED], revocations, producers=keys.producers)
    with consumer.running():
        genuine = potassium()
        # a genuine delivery request, routed as a session revocation
        publish_raw(event_bus, REVOKED, genuine.SerializeToString(), signed(keys, "notifications", genuine))
        _, headers = parked_reason(event_bus, consumer)
        assert headers[HEADER_ERROR_REASON] == "bad_signature"
        # the same, published through the default exchange straight into the revocations queue
        publish_raw(event_bus, consumer.queue, genuine.SerializeToString(), signed(keys, "notifications", genuine),
                    exchange="")  # fmt: skip
        _, headers = parked_reason(event_bus, consumer)
        assert headers[HEADER_ERROR_REASON] == "unexpected_event_type"
    assert revocations.calls == []


def test_a_good_event_is_handled_and_stays_valid_through_the_retry_queue(event_bus, keys):
    handled = Handled(fail_first=1)
    consumer = event_bus.consumer("retried", [REQUESTED], handled, producers=keys.producers, max_retries=2)
    event = potassium()
    publisher = Publisher(event_bus.amqp_url, event_bus.topology, signer=keys.signer.signers["notifications"])
    with consumer.running():
        publisher.publish([event])
        wait_until(lambda: len(handled.calls) == 2)  # failed once, came back from .retry, handled
    publisher.close()
    assert handled.calls == [event.event_id, event.event_id]
    assert event_bus.message_count(consumer.parking_queue) == 0
    assert event_bus.message_count(consumer.retry_queue) == 0


def test_publishers_and_consumers_sign_and_check_by_default(event_bus):
    """Nothing configured (development): the run folder's keys on both sides."""
    revocations = Handled()
    consumer = event_bus.consumer("default-keys", [REVOKED], revocations)
    revoked = new_envelope(REVOKED, directory_pb2.SessionRevoked(session_id="s-1"), agency_id="", producer="directory")
    with consumer.running():
        Publisher(event_bus.amqp_url, event_bus.topology).publish([revoked])
        wait_until(lambda: revocations.calls)
    assert revocations.calls == [revoked.event_id]


def test_a_batch_handler_never_sees_a_refused_event(event_bus, keys):
    batches: list[list[str]] = []

    def batch_handler(envelopes):
        batches.append([e.event_id for e in envelopes])
        return []

    handled = Handled()
    consumer = event_bus.consumer("batched", [REQUESTED], handled, producers=keys.producers,
                                  batch_handler=batch_handler, prefetch=32)  # fmt: skip
    good = [potassium() for _ in range(3)]
    forged = [potassium() for _ in range(3)]
    connection = pika.BlockingConnection(pika.URLParameters(event_bus.amqp_url))
    channel = connection.channel()
    consumer.declare(channel)
    for event in [*forged, *good]:  # queued before the consumer starts: they arrive together
        headers = signed(keys, "notifications", event) if event in good else signed(keys, "web", event)
        channel.basic_publish(event_bus.topology.exchange_name, REQUESTED, event.SerializeToString(),
                              pika.BasicProperties(delivery_mode=2, headers=headers))  # fmt: skip
    connection.close()
    with consumer.running():
        wait_until(lambda: event_bus.message_count(consumer.parking_queue) == 3)
        wait_until(lambda: sorted(i for b in batches for i in b) == sorted(e.event_id for e in good))
    assert handled.calls == []
    assert not {e.event_id for e in forged} & {i for b in batches for i in b}


def test_a_consumer_without_a_database_still_parks(event_bus, keys):
    handled = Handled()
    consumer = event_bus.consumer("no-database", [REQUESTED], handled, producers=keys.producers)
    assert consumer._on_refused is None  # nothing configured: no hook
    with consumer.running():
        publish_raw(event_bus, REQUESTED, potassium().SerializeToString())
        _, headers = parked_reason(event_bus, consumer)
    assert headers[HEADER_ERROR_REASON] == "unsigned" and handled.calls == []


def wiring_settings(mongo_uri: str, db_name: str, amqp_url: str, exchange: str) -> SimpleNamespace:
    common = SimpleNamespace(
        mongo_uri=mongo_uri, mongo_db=db_name, amqp_url=amqp_url, events_exchange=exchange, log_level="INFO",
        http_host="127.0.0.1", grpc_host="127.0.0.1", phi_master_keys={"k1": b"k" * 32}, phi_master_key_id="k1",
    )  # fmt: skip
    return SimpleNamespace(common=common, directory_grpc_target="127.0.0.1:1")


def test_a_service_records_what_its_consumers_refuse_and_its_relay_signs_the_record(
    mongo_uri, db_name, event_bus
):
    """The hook `serve` installs: a security event in the service's outbox, which its own relay
    publishes signed, so the audit trail's consumer believes it."""
    exchange = event_bus.topology.exchange_name
    service = ServiceWiring("inbox", wiring_settings(mongo_uri, db_name, event_bus.amqp_url, exchange))
    audit = Handled()
    audit_consumer = event_bus.consumer("audit-sink", [SECURITY], audit)
    delivery = event_bus.consumer("wired-deliveries", [REQUESTED], Handled(), on_refused=service.record_refused_event)
    service.record_refused_event(  # before the database is opened: nothing to record into
        SimpleNamespace(reason="unsigned")  # type: ignore[arg-type]
    )
    service.database()
    relay = service.relay([], lease_ttl_s=None)
    with audit_consumer.running(), delivery.running():
        forged = potassium()
        publish_raw(event_bus, REQUESTED, forged.SerializeToString())
        wait_until(lambda: service.database()[SECURITY_OUTBOX].find_one({"kind": {"$eq": "event_refused"}}))
        assert relay.run_once() == 1
        wait_until(lambda: audit.calls)
    assert event_bus.message_count(audit_consumer.parking_queue) == 0  # signed by inbox, believed


def test_production_refuses_to_start_without_bus_keys_and_lists_them(tmp_path):
    environ = {"PATH": "/usr/bin:/bin", "CLINIC_MODE": "production", "CLINIC_RUN_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "services.inbox"], env=environ, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2
    assert "BUS_SIGNING_KEY (or BUS_SIGNING_KEY_FILE) is required in production" in result.stderr
    assert "BUS_PRODUCER_KEYS (or BUS_PRODUCER_KEYS_FILE) is required in production" in result.stderr
    assert not (tmp_path / "secrets").exists()
