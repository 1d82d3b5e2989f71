"""The kit's Prometheus metrics (services.kit.metrics, docs/metrics.md), each where it is counted: an HTTP
app's requests by route template, the gRPC edge's calls by method and code, the bus's published,
consumed, retried and parked messages and queue depths on the real broker, the outbox relay's backlog on
the real database, and PHI decryptions. Values are read from the process's registry, before and after."""

from __future__ import annotations

import os
import threading
import uuid

import grpc
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from clinic.inbox.v1.inbox_pb2 import MessageDelivered
from services.kit import metrics
from services.kit.auth import RevokedSessions, StaticKeySource, TokenVerifier
from services.kit.bus import PermanentError, Publisher
from services.kit.crypto import DecryptionError, KeyRing, PhiCipher
from services.kit.errors import NotFound
from services.kit.events import new_envelope
from services.kit.grpc_server import GrpcServer, ServiceBinding
from services.kit.http import create_app
from services.kit.mongo import now_ms
from services.kit.outbox import OutboxRelay, outbox_fields
from services.kit.processed_events import ProcessedEvents
from tests.waits import wait_until

DELIVERED = "message.delivered.v1"
ID_LIKE = ("msg_", "stf_", "pat_", "pref_", "agy_")


def value(name: str, **labels: str) -> float:
    """A sample's current value (0 when the series does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


# --- HTTP -------------------------------------------------------------------------------------------


@pytest.fixture
def app():
    service = unique("svc-")
    app = create_app(service, None)

    @app.get("/api/v1/things/<thing_id>")
    def thing(thing_id):
        if thing_id == "msg_missing":
            raise NotFound("not_found", "no such thing")
        return {"id": thing_id}

    return app


def test_a_request_is_counted_by_route_template_method_and_status_with_its_latency(app):
    service = app.name
    client = app.test_client()
    route = "/api/v1/things/<thing_id>"
    assert client.get("/api/v1/things/msg_123abc").status_code == 200
    assert client.get("/api/v1/things/msg_456def").status_code == 200
    assert client.get("/api/v1/things/msg_missing").status_code == 404
    assert client.get("/api/v1/nothing/stf_777").status_code == 404
    assert client.post("/api/v1/things/msg_1").status_code == 405

    labels = {"service": service, "method": "GET", "route": route}
    assert value("clinic_http_requests_total", **labels, status="200") == 2
    assert value("clinic_http_requests_total", **labels, status="404") == 1
    unmatched = {"service": service, "route": metrics.UNMATCHED}
    assert value("clinic_http_requests_total", **unmatched, method="GET", status="404") == 1
    assert value("clinic_http_requests_total", **unmatched, method="POST", status="405") == 1
    assert value("clinic_http_request_duration_seconds_count", **labels) == 3
    assert value("clinic_http_request_duration_seconds_sum", **labels) > 0
    assert value("clinic_http_request_duration_seconds_bucket", **labels, le="+Inf") == 3

    reply = client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == CONTENT_TYPE_LATEST  # the text format (version 1.0.0 is 0.0.4 renamed)
    text = reply.get_data(as_text=True)
    mine = [line for line in text.splitlines() if f'service="{service}"' in line]
    assert mine and not [line for line in mine if any(marker in line for marker in ("msg_1", "msg_4", "stf_7"))]
    assert value("clinic_http_requests_total", service=service, method="GET", route="/metrics", status="200") == 1


def test_an_unknown_method_is_counted_as_other(app):
    reply = app.test_client().open("/api/v1/things/x", method="BREW")
    assert reply.status_code == 405
    labels = {"service": app.name, "method": "other", "route": metrics.UNMATCHED, "status": "405"}
    assert value("clinic_http_requests_total", **labels) == 1


def test_an_app_assembled_with_the_metrics_blueprint_keeps_one_metrics_route(app):
    app.register_blueprint(metrics.metrics_blueprint(unique("extra_")))
    assert [rule.rule for rule in app.url_map.iter_rules()].count("/metrics") == 1
    assert app.test_client().get("/metrics").status_code == 200


# --- gRPC -------------------------------------------------------------------------------------------

DIRECTORY = "clinic.directory.v1.DirectoryService"
ISSUE = f"/{DIRECTORY}/IssueServiceToken"


class Servicer(directory_pb2_grpc.DirectoryServiceServicer):
    def IssueServiceToken(self, request, context):
        if request.client_id == "missing":
            raise NotFound("no_such_client", "no such client")
        if request.client_id == "crash":
            raise RuntimeError("a bug")
        return directory_pb2.IssueServiceTokenResponse(access_token="t", expires_in=1)


def test_grpc_calls_are_counted_by_method_and_status_code_with_their_latency():
    service = unique("grpc-")
    server = GrpcServer(
        [ServiceBinding(directory_pb2_grpc.add_DirectoryServiceServicer_to_server, Servicer(), DIRECTORY)],
        TokenVerifier(StaticKeySource(dict), revoked=RevokedSessions()),
        open_methods=[ISSUE],
        service=service,
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = directory_pb2_grpc.DirectoryServiceStub(channel)
            stub.IssueServiceToken(directory_pb2.IssueServiceTokenRequest(client_id="c"), timeout=5)
            stub.IssueServiceToken(directory_pb2.IssueServiceTokenRequest(client_id="c"), timeout=5)
            for client_id, code in (("missing", grpc.StatusCode.NOT_FOUND), ("crash", grpc.StatusCode.INTERNAL)):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.IssueServiceToken(directory_pb2.IssueServiceTokenRequest(client_id=client_id), timeout=5)
                assert caught.value.code() == code
            with pytest.raises(grpc.RpcError) as caught:  # needs a token
                stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)

    issue = {"service": service, "method": ISSUE}
    assert value("clinic_grpc_server_calls_total", **issue, code="OK") == 2
    assert value("clinic_grpc_server_calls_total", **issue, code="NOT_FOUND") == 1
    assert value("clinic_grpc_server_calls_total", **issue, code="INTERNAL") == 1
    settings = {"service": service, "method": f"/{DIRECTORY}/GetAgencySettings"}
    assert value("clinic_grpc_server_calls_total", **settings, code="UNAUTHENTICATED") == 1
    assert value("clinic_grpc_server_call_duration_seconds_count", **issue) == 4
    assert value("clinic_grpc_server_call_duration_seconds_count", **settings) == 1


# --- the bus ----------------------------------------------------------------------------------------


def delivered() -> object:
    payload = MessageDelivered(message_id=unique("msg_"), agency_id="agy_1", recipient_staff_id="stf_9")
    return new_envelope(DELIVERED, payload, agency_id="agy_1", producer="inbox", correlation_id="corr-1")


def test_published_consumed_retried_and_parked_messages_are_counted_with_queue_depths(event_bus, mongo_client, db_name):
    service = metrics.service_name()
    fail_for: dict[str, BaseException] = {}
    handled: list[str] = []

    def handler(envelope):
        failure = fail_for.get(envelope.event_id)
        if failure is not None:
            raise failure
        handled.append(envelope.event_id)

    processed = ProcessedEvents(mongo_client[db_name], "metrics-test")
    consumer = event_bus.consumer("metrics", [DELIVERED], handler, processed=processed, max_retries=1,
                                  depth_sample_s=0.2)  # fmt: skip
    queue = consumer.metric_queue
    assert queue == consumer.queue  # a shared queue keeps its name
    good, permanent, flaky = delivered(), delivered(), delivered()
    fail_for[permanent.event_id] = PermanentError("cannot_apply")
    fail_for[flaky.event_id] = RuntimeError("always fails")
    published_before = value("clinic_bus_events_published_total", service=service, routing_key=DELIVERED)

    def consumed(outcome: str) -> float:
        return value("clinic_bus_messages_consumed_total", service=service, queue=queue, outcome=outcome)

    def parked(reason: str) -> float:
        return value("clinic_bus_messages_parked_total", service=service, queue=queue, reason=reason)

    publisher = Publisher(event_bus.amqp_url, event_bus.topology)
    with consumer.running():
        publisher.publish([good, permanent, flaky, good])  # the repeat is a duplicate
        event_bus.publish_raw(DELIVERED, b"\xff not an envelope")
        event_bus.publish_raw(DELIVERED, delivered().SerializeToString())  # a real envelope, unsigned
        wait_until(lambda: consumed("parked") >= 4, 30, message="four messages parked")
        wait_until(
            lambda: value("clinic_bus_queue_messages", service=service, queue=queue, kind="parking") == 4,
            30,
            message="the parking queue's depth sampled",
        )
        assert value("clinic_bus_queue_messages", service=service, queue=queue, kind="main") == 0
        assert value("clinic_bus_queue_consumers", service=service, queue=queue) == 1
    publisher.close()

    assert handled == [good.event_id]
    assert value("clinic_bus_events_published_total", service=service, routing_key=DELIVERED) == published_before + 4
    assert consumed("handled") == 1 and consumed("duplicate") == 1
    assert consumed("retried") == 1  # the flaky one, once (max_retries=1), then parked
    assert parked("permanent_error") == 1 and parked("retries_exhausted") == 1
    assert parked("malformed") == 1 and parked("unsigned") == 1
    assert event_bus.message_count(consumer.parking_queue) == 4


def test_a_per_instance_queue_is_labelled_without_its_instance(event_bus):
    consumer = event_bus.consumer("web.board-events.host-1a2b3c4d", [DELIVERED], lambda e: None,
                                  queue_expires_ms=60_000)  # fmt: skip
    assert consumer.queue.endswith("web.board-events.host-1a2b3c4d")
    assert consumer.metric_queue == consumer.queue.removesuffix(".host-1a2b3c4d")


def test_label_values_from_an_open_set_are_bounded():
    label = metrics.BoundedLabel(2)
    assert [label("a.v1"), label("b.v1"), label("c.v1"), label("a.v1")] == ["a.v1", "b.v1", "other", "a.v1"]
    assert label("Has Spaces") == "other" and label("") == "unknown"


# --- the outbox relay -------------------------------------------------------------------------------


class Confirming:
    """A publisher that confirms everything (the relay's BatchPublishing)."""

    def publish_batch(self, envelopes):
        return {envelope.event_id for envelope in envelopes}

    def idle(self, seconds: float) -> None:
        threading.Event().wait(seconds)


def test_the_relay_samples_each_collections_backlog_and_oldest_age(mongo_client, db_name, monkeypatch):
    service = metrics.service_name()
    db = mongo_client[db_name]
    pending, empty = unique("pending_"), unique("empty_")
    relay = OutboxRelay(db, [pending, empty], Confirming(), lease_ttl_s=None)
    relay.ensure_indexes()
    now = now_ms()
    for age_ms in (90_000, 30_000, 5_000):
        db[pending].insert_one({"_id": unique("doc_"), **outbox_fields([delivered()], now=now - age_ms)})
    db[pending].insert_one({"_id": unique("held_"), **outbox_fields([delivered()], ready=False)})  # not due
    db[empty].insert_one({"_id": unique("done_"), "state": "no events"})

    assert relay.sample_backlog(now) == {pending: (3, 90.0), empty: (0, 0.0)}
    assert value("clinic_outbox_pending_documents", service=service, collection=pending) == 3
    assert value("clinic_outbox_oldest_pending_age_seconds", service=service, collection=pending) == 90.0
    assert value("clinic_outbox_pending_documents", service=service, collection=empty) == 0

    monkeypatch.setattr(metrics, "OUTBOX_COUNT_CAP", 2)  # counted up to the cap, never further
    assert relay.sample_backlog(now)[pending] == (2, 90.0)
    monkeypatch.undo()

    stop = threading.Event()
    running = OutboxRelay(db, [pending, empty], Confirming(), lease_ttl_s=None, backlog_sample_s=0.1)
    thread = threading.Thread(target=running.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: value("clinic_outbox_pending_documents", service=service, collection=pending) == 0,
                   30, message="the running relay sampled an empty backlog")  # fmt: skip
        assert value("clinic_outbox_oldest_pending_age_seconds", service=service, collection=pending) == 0
    finally:
        stop.set()
        thread.join(10)


# --- PHI decryptions --------------------------------------------------------------------------------


def test_phi_decryptions_are_counted_by_field_kind_never_by_record(mongo_client, db_name):
    service = metrics.service_name()
    cipher = PhiCipher(KeyRing(mongo_client[db_name], {"m1": os.urandom(32)}, "m1"))
    note = cipher.seal("agy_a", "sig_1", "note:stf_123", "signed with a note")
    piece = cipher.seal("agy_a", "out_1", "attachment.3.0", "a piece")

    def decryptions(field: str, outcome: str) -> float:
        return value("clinic_phi_decryptions_total", service=service, field=field, outcome=outcome)

    before = {key: decryptions(*key) for key in (("note", "ok"), ("attachment", "ok"), ("note", "failed"))}
    assert cipher.open("agy_a", "sig_1", "note:stf_123", note) == "signed with a note"
    assert cipher.open("agy_a", "out_1", "attachment.3.0", piece) == "a piece"
    with pytest.raises(DecryptionError):
        cipher.open("agy_a", "sig_2", "note:stf_123", note)  # another record: does not open
    assert decryptions("note", "ok") == before[("note", "ok")] + 1
    assert decryptions("attachment", "ok") == before[("attachment", "ok")] + 1
    assert decryptions("note", "failed") == before[("note", "failed")] + 1
    exposition = REGISTRY.collect()
    fields = {
        sample.labels["field"]
        for family in exposition
        if family.name == "clinic_phi_decryptions"
        for sample in family.samples
    }
    assert not [field for field in fields if any(marker in field for marker in ID_LIKE)], fields


def test_the_exposition_parses_and_names_every_kit_family(app):
    text = app.test_client().get("/metrics").get_data(as_text=True)
    families = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "clinic_http_requests",
        "clinic_http_request_duration_seconds",
        "clinic_grpc_server_calls",
        "clinic_bus_events_published",
        "clinic_bus_messages_consumed",
        "clinic_bus_messages_parked",
        "clinic_bus_queue_messages",
        "clinic_outbox_pending_documents",
        "clinic_outbox_oldest_pending_age_seconds",
        "clinic_phi_decryptions",
        "clinic_live_streams_open",
    } <= families
