"""The delivery API against the real database and broker: items land on boards, update in place,
resolve, withdraw, and repeats or stale versions have no second effect."""

from __future__ import annotations

import uuid

import pika
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from clinic.audit.v1 import audit_pb2
from clinic.inbox.v1 import inbox_pb2
from services.inbox import delivery as delivery_module
from services.inbox import domain
from services.inbox.board import ItemFilter
from services.inbox.delivery import Delivery
from services.inbox.directory_client import EprescriberCache, RecipientCache
from services.kit.auth import Identity, current_identity
from services.kit.bus import BatchPublisher, Publisher
from services.kit.errors import Forbidden, InvalidInput
from services.kit.events import PermanentError, decode_envelope, new_envelope, unpack
from services.kit.mongo import now_ms
from services.kit.outbox import OutboxRelay
from services.kit.service_identity import IssuedToken, ServiceTokens
from tests.integration.inbox_fixtures import staff
from tests.waits import background, wait_until

AGENCY, OTHER = "agy_1", "agy_2"


@pytest.fixture
def place(inbox):
    """(components, delivery, table) with staff a..d in AGENCY, team_ab, and one colleague elsewhere."""
    components, table = inbox
    table.staff.update({"stf_a": AGENCY, "stf_b": AGENCY, "stf_c": AGENCY, "stf_d": AGENCY, "stf_x": OTHER})
    table.teams["team_ab"] = ["stf_a", "stf_b"]
    components.service_tokens = ServiceTokens(
        "unused:1", "inbox", "secret", issuer=lambda client, secret, agency: IssuedToken(f"token-{agency}", 900)
    )
    feature = Delivery(components)
    feature.ensure_indexes()
    feature.attach()
    return components, feature, table


def request(source_ref: str = "order-1", **overrides) -> inbox_pb2.DeliverItemRequest:
    fields = {
        "kind": inbox_pb2.DELIVERED_KIND_LAB,
        "recipients": inbox_pb2.Recipients(staff_ids=["stf_a", "stf_b"]),
        "title": "Lab result available",
        "summary": "CBC, final",
        "status": "final",
        "source": "lab",
        "source_ref": source_ref,
    }
    fields.update(overrides)
    return inbox_pb2.DeliverItemRequest(**fields)


def deliver(feature: Delivery, req, producer: str = "notifications", key: str | None = None, agency: str = AGENCY):
    """Deliver as a service of `agency` would (recipients resolve under that identity)."""
    token = current_identity.set(Identity(subject=f"svc:{producer}", agency_id=agency, kind="service"))
    try:
        return feature.deliver(agency, producer, req, key)
    finally:
        current_identity.reset(token)


def lab_items(components, staff_id: str, agency: str = AGENCY, folder: str = domain.FOLDER_LAB) -> list[dict]:
    return components.board.page(staff(agency, staff_id), folder, ItemFilter(), None, 50)["items"]


def counts(components, staff_id: str, folder: str = domain.FOLDER_LAB) -> tuple[int, int]:
    tree = components.board.tree(staff(AGENCY, staff_id))
    entry = next(f for f in tree["folders"] if f["id"] == folder)
    return entry["unread"], entry["total"]


def timestamp(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def envelope(req, producer: str = "notifications", agency: str = AGENCY, event_id: str | None = None):
    return new_envelope(delivery_module.REQUESTED_EVENT, req, agency_id=agency, producer=producer, event_id=event_id)


# --- through the broker ---------------------------------------------------------------------------


@pytest.fixture
def consuming(place, event_bus):
    components, feature, table = place
    consumer = feature.consumer(event_bus.amqp_url, event_bus.topology, retry_delay_ms=50, max_retries=1)
    event_bus.queues += [consumer.queue, consumer.retry_queue, consumer.parking_queue]
    publisher = Publisher(event_bus.amqp_url, event_bus.topology)
    with consumer.running():
        yield components, publisher, consumer
    publisher.close()


def test_a_requested_delivery_lands_once_on_each_board(consuming, event_bus):
    components, publisher, _consumer = consuming
    event = envelope(request())
    publisher.publish([event, event])  # the broker redelivers the same event
    publisher.publish([envelope(request("order-2"))])
    wait_until(lambda: len(lab_items(components, "stf_a")) == 2)
    wait_until(lambda: len(lab_items(components, "stf_b")) == 2)
    # The counters move right after the items are written (same handler): the last delivery's
    # count may land a moment after its items are listed. The duplicate was handled before it.
    wait_until(lambda: counts(components, "stf_a") != (1, 1) and counts(components, "stf_b") != (1, 1))

    first = next(
        i for i in lab_items(components, "stf_a") if i["ref_id"] == delivery_module.notice_id(AGENCY, "lab", "order-1")
    )
    assert first["kind"] == domain.KIND_NOTICE and first["folder"] == domain.FOLDER_LAB
    assert first["title"] == "Lab result available" and first["summary"] == "CBC, final"
    assert first["status"] == "final" and first["severity"] == "info" and first["read"] is False
    assert first["sender"] == {"id": "notifications", "name": "Notifications"}
    assert counts(components, "stf_a") == (2, 2)  # the repeated event counted once
    assert counts(components, "stf_c") == (0, 0)
    assert components.store.board_items.count_documents({"kind": domain.KIND_NOTICE}) == 4
    # The second copy was handled (order-2 came after it) and applied nothing: one revision.
    notice = components.store.db[delivery_module.NOTICES].find_one({"_id": first["ref_id"]})
    assert notice["rev"] == 1 and notice["deliveries"] == [event.event_id]


def test_bad_events_are_parked_and_the_consumer_keeps_serving(consuming, event_bus):
    components, publisher, consumer = consuming
    event_bus.publish_raw(delivery_module.REQUESTED_EVENT, b"\xff\x00 not an envelope")
    wrong_payload = new_envelope(
        delivery_module.REQUESTED_EVENT, inbox_pb2.SendMessageRequest(subject="x"), agency_id=AGENCY,
        producer="notifications",
    )
    publisher.publish(
        [
            wrong_payload,
            envelope(request("order-9"), producer="erx-bridge"),  # not allowed to deliver lab items
            envelope(request("order-8", recipients=inbox_pb2.Recipients(staff_ids=["stf_x"]))),  # other agency
            envelope(request("order-7", title="")),  # invalid
        ]
    )
    publisher.publish([envelope(request("order-ok"))])
    wait_until(lambda: lab_items(components, "stf_a"))
    wait_until(lambda: event_bus.message_count(consumer.parking_queue) == 5)
    assert [i["ref_id"] for i in lab_items(components, "stf_a")] == [
        delivery_module.notice_id(AGENCY, "lab", "order-ok")
    ]
    reasons = []
    for _ in range(5):
        properties, _body = event_bus.get(consumer.parking_queue)
        reasons.append(properties.headers["x-error-reason"])
    assert sorted(reasons) == [
        "body is not a protobuf envelope",
        "kind_not_allowed",
        "missing_field",
        "payload type is clinic.inbox.v1.SendMessageRequest, expected clinic.inbox.v1.DeliverItemRequest",
        "unknown_recipients",
    ]
    assert components.store.db[delivery_module.NOTICES].count_documents({}) == 1  # nothing half-written


def test_recipients_are_checked_with_directory_at_most_once_per_cache_period(place):
    """Directory's answer for the same staff is reused for INBOX_RECIPIENTS_CACHE_S; someone who left
    the agency still gets items within that bound and is refused once it has passed."""
    components, feature, table = place
    asked = []
    resolve = table.resolve
    table.resolve = lambda addressing: asked.append(addressing) or resolve(addressing)
    now = [100.0]
    feature.recipients = RecipientCache(feature._ask_directory, 10.0, clock=lambda: now[0])
    assert deliver(feature, request("order-1")).recipient_ids == ["stf_a", "stf_b"]
    del table.staff["stf_b"]  # left the agency in directory
    now[0] += 9.9
    assert deliver(feature, request("order-2")).recipient_ids == ["stf_a", "stf_b"]  # within the bound
    assert len(asked) == 1
    now[0] += 0.1
    with pytest.raises(InvalidInput) as refused:
        deliver(feature, request("order-3"))
    assert refused.value.code == "unknown_recipients" and refused.value.details["staff_ids"] == ["stf_b"]
    assert len(asked) == 2 and len(lab_items(components, "stf_a")) == 2


# --- updates in place -------------------------------------------------------------------------------


def test_the_same_source_ref_updates_the_item_in_place(place):
    components, feature, _ = place
    created = deliver(feature, request())
    assert created.created and created.applied and created.recipient_ids == ["stf_a", "stf_b"]
    item_id = lab_items(components, "stf_a")[0]["id"]
    components.board.open_item(staff(AGENCY, "stf_a"), item_id)  # stf_a reads it
    assert counts(components, "stf_a") == (0, 1)

    updated = deliver(
        feature, request(title="Lab result corrected", status="corrected", severity=inbox_pb2.SEVERITY_URGENT)
    )
    assert not updated.created and updated.applied and updated.notice_id == created.notice_id
    [item] = lab_items(components, "stf_a")
    assert item["id"] == item_id and item["title"] == "Lab result corrected" and item["status"] == "corrected"
    assert item["urgent"] is True and item["severity"] == "urgent" and item["read"] is True
    assert counts(components, "stf_a") == (0, 1) and counts(components, "stf_b") == (1, 1)
    urgent = components.board.page(staff(AGENCY, "stf_b"), domain.FOLDER_LAB, ItemFilter(urgent=True), None, 10)[
        "items"
    ]
    assert [i["id"] for i in urgent] == [lab_items(components, "stf_b")[0]["id"]]

    deliver(feature, request(title="Lab result corrected", mark_unread=True))
    assert lab_items(components, "stf_a")[0]["read"] is False
    assert counts(components, "stf_a") == (1, 1) and counts(components, "stf_b") == (1, 1)
    assert components.store.db[delivery_module.NOTICES].count_documents({}) == 1


def test_resolved_leaves_the_unread_counts_but_stays_listed(place):
    components, feature, _ = place
    deliver(feature, request(due_at=timestamp(now_ms() - 60_000)))
    assert lab_items(components, "stf_a")[0]["overdue"] is True
    deliver(feature, request(resolved=True, due_at=timestamp(now_ms() - 60_000)))
    [item] = lab_items(components, "stf_a")
    assert item["read"] is True and item["resolved_at"] and item["overdue"] is False
    assert counts(components, "stf_a") == (0, 1) and counts(components, "stf_b") == (0, 1)


def test_withdrawn_leaves_every_board(place):
    components, feature, _ = place
    deliver(feature, request())
    result = deliver(feature, request(withdrawn=True, title="", recipients=inbox_pb2.Recipients()))
    assert result.applied and result.recipient_ids == []
    for owner in ("stf_a", "stf_b"):
        assert lab_items(components, owner) == [] and counts(components, owner) == (0, 0)
    again = deliver(feature, request(withdrawn=True, title="", recipients=inbox_pb2.Recipients()))
    assert not again.applied
    redelivered = deliver(feature, request(recipients=inbox_pb2.Recipients(staff_ids=["stf_c"])))
    assert redelivered.applied and [i["title"] for i in lab_items(components, "stf_c")] == ["Lab result available"]
    assert lab_items(components, "stf_a") == []


def test_recipients_added_get_the_item_and_removed_lose_it(place):
    components, feature, _ = place
    deliver(feature, request())
    changed = deliver(feature, request(recipients=inbox_pb2.Recipients(staff_ids=["stf_b", "stf_c"])))
    assert changed.recipient_ids == ["stf_b", "stf_c"]
    assert lab_items(components, "stf_a") == [] and counts(components, "stf_a") == (0, 0)
    assert len(lab_items(components, "stf_b")) == 1 and counts(components, "stf_b") == (1, 1)
    assert len(lab_items(components, "stf_c")) == 1 and counts(components, "stf_c") == (1, 1)


def test_teams_whole_agency_and_the_actor(place):
    components, feature, _ = place
    team = deliver(feature, request("t", recipients=inbox_pb2.Recipients(team_ids=["team_ab"]), actor_staff_id="stf_a"))
    assert team.recipient_ids == ["stf_b"]
    everyone = deliver(feature, request("w", recipients=inbox_pb2.Recipients(whole_agency=True)))
    assert sorted(everyone.recipient_ids) == ["stf_a", "stf_b", "stf_c", "stf_d"]  # never another agency's
    with pytest.raises(InvalidInput) as caught:
        deliver(feature, request("u", recipients=inbox_pb2.Recipients(staff_ids=["stf_a", "stf_x"])))
    assert caught.value.code == "unknown_recipients" and caught.value.details["staff_ids"] == ["stf_x"]
    with pytest.raises(InvalidInput) as caught:
        deliver(feature, request("n", recipients=inbox_pb2.Recipients(team_ids=["team_nope"])))
    assert caught.value.code == "unknown_recipients"


def test_repeats_and_stale_versions_have_no_effect(place):
    components, feature, _ = place
    first = deliver(feature, request(source_version=5, delivery_id="d-1"), key="d-1")
    repeat = deliver(feature, request(title="changed", source_version=6), key="d-1")
    assert first.applied and not repeat.applied and not repeat.created
    stale = deliver(feature, request(title="older", source_version=4), key="d-2")
    assert not stale.applied and stale.recipient_ids == ["stf_a", "stf_b"]
    assert lab_items(components, "stf_a")[0]["title"] == "Lab result available"
    newer = deliver(feature, request(title="newer", source_version=6), key="d-3")
    assert newer.applied and lab_items(components, "stf_a")[0]["title"] == "newer"
    assert counts(components, "stf_a") == (1, 1)


def test_only_the_first_producer_and_kind_update_an_item(place):
    _components, feature, _ = place
    deliver(feature, request())
    with pytest.raises(Forbidden):
        deliver(feature, request(kind=inbox_pb2.DELIVERED_KIND_CLOUD), producer="cloud-comms")
    with pytest.raises(InvalidInput) as caught:
        deliver(feature, request(kind=inbox_pb2.DELIVERED_KIND_SCHEDULE))
    assert caught.value.code == "kind_changed"


# --- the reading pane -----------------------------------------------------------------------------------


def test_opening_a_delivered_item_shows_its_content_and_is_audited(place):
    components, feature, _ = place
    links = [inbox_pb2.ActionLink(label="Open order", url="https://ehr.example/orders/1")]
    result = deliver(feature, request(links=links))
    item_id = lab_items(components, "stf_b")[0]["id"]
    opened = components.board.open_item(staff(AGENCY, "stf_b"), item_id)
    assert opened["title"] == "Lab result available" and opened["summary"] == "CBC, final"
    assert opened["links"] == [{"label": "Open order", "url": "https://ehr.example/orders/1"}]
    assert (opened["source"], opened["source_ref"], opened["status"]) == ("lab", "order-1", "final")
    assert opened["read"] is True and counts(components, "stf_b") == (0, 1)
    records = list(components.store.access_denials.find({"resource_id": {"$eq": result.notice_id}}))
    assert len(records) == 1
    event = unpack(decode_envelope(next(iter(records[0]["_outbox"].values()))["env"]), audit_pb2.PhiAccessed)
    assert (event.resource_type, event.actor_id, event.outcome) == ("notice", "stf_b", "allowed")
    stored = components.store.db[delivery_module.NOTICES].find_one({"_id": result.notice_id})
    assert b"Lab result" not in bytes(stored["title"]) and b"CBC" not in bytes(stored["summary"])


# --- interrupted fan-out and the held events --------------------------------------------------------------


def test_an_interrupted_delivery_is_finished_and_its_events_published(place, event_bus, monkeypatch):
    components, feature, _ = place
    real_fan_out = feature._fan_out

    def crash(_notice):
        raise RuntimeError("process died")

    monkeypatch.setattr(feature, "_fan_out", crash)
    with pytest.raises(RuntimeError):
        deliver(feature, request())
    notices = components.store.db[delivery_module.NOTICES]
    nid = delivery_module.notice_id(AGENCY, "lab", "order-1")
    assert notices.find_one({"_id": nid}).get("_outbox_at") is None  # held until the items exist
    assert lab_items(components, "stf_a") == []
    notices.update_one({"_id": nid}, {"$set": {"fanout_pending_at": now_ms() - 60_000}})
    monkeypatch.setattr(feature, "_fan_out", real_fan_out)

    with background(feature.repair_fanouts, 0.05):  # stopped afterwards: it must end, without an error
        wait_until(lambda: "fanout_pending_at" not in notices.find_one({"_id": nid}))
    assert notices.find_one({"_id": nid})["_outbox_at"] > 0
    assert counts(components, "stf_a") == (1, 1) and counts(components, "stf_b") == (1, 1)

    connection = pika.BlockingConnection(pika.URLParameters(event_bus.amqp_url))
    channel = connection.channel()
    event_bus.topology.declare(channel)
    queue = channel.queue_declare(queue=f"{event_bus.topology.prefix}.observe.{uuid.uuid4().hex[:6]}").method.queue
    event_bus.queues.append(queue)
    channel.queue_bind(queue, event_bus.topology.exchange_name, routing_key=delivery_module.DELIVERED_EVENT)
    publisher = BatchPublisher(event_bus.amqp_url, event_bus.topology)
    try:
        relay = OutboxRelay(components.store.db, [delivery_module.NOTICES], publisher, lease_ttl_s=None)
        assert relay.run_once() == 2
        delivered = {}
        for _method, _props, body in channel.consume(queue, inactivity_timeout=5):
            if body is None:
                break
            event = unpack(decode_envelope(body), inbox_pb2.BoardItemDelivered)
            delivered[event.recipient_staff_id] = event
            if len(delivered) == 2:
                break
    finally:
        publisher.close()
        connection.close()
    assert set(delivered) == {"stf_a", "stf_b"}
    event = delivered["stf_a"]
    assert event.item_id == lab_items(components, "stf_a")[0]["id"] and event.agency_id == AGENCY
    assert event.board_kind == domain.FOLDER_LAB and event.created and event.severity == inbox_pb2.SEVERITY_INFO


@pytest.mark.parametrize(
    "newer",
    [
        {"title": "Lab result corrected"},
        {"withdrawn": True, "title": "", "recipients": inbox_pb2.Recipients()},
    ],
)
def test_a_recipient_removed_by_an_interrupted_update_loses_the_item_after_a_newer_one(place, monkeypatch, newer):
    """The process dies after writing an update that removes stf_a; the next update (with the same
    recipients, or a withdrawal) still takes stf_a's item away."""
    components, feature, _ = place
    deliver(feature, request())
    real_fan_out = feature._fan_out

    def crash(_notice):
        raise RuntimeError("process died")

    monkeypatch.setattr(feature, "_fan_out", crash)
    with pytest.raises(RuntimeError):
        deliver(feature, request(recipients=inbox_pb2.Recipients(staff_ids=["stf_b"])))
    monkeypatch.setattr(feature, "_fan_out", real_fan_out)
    overrides = {"recipients": inbox_pb2.Recipients(staff_ids=["stf_b"]), **newer}
    assert deliver(feature, request(**overrides)).applied
    assert lab_items(components, "stf_a") == [] and counts(components, "stf_a") == (0, 0)


# --- a batch of requested deliveries ----------------------------------------------------------------


def test_a_batch_writes_the_new_notices_together_and_hands_back_the_rest(place):
    components, feature, table = place
    existing = deliver(feature, request("order-0"))
    asked = []
    resolve = table.resolve
    table.resolve = lambda addressing: asked.append(addressing) or resolve(addressing)
    new = [envelope(request(f"order-{n}")) for n in (1, 2, 3)]
    update = envelope(request("order-0", status="corrected"))
    twice = [envelope(request("order-4")), envelope(request("order-4", status="corrected"))]
    refused = envelope(request("order-5", recipients=inbox_pb2.Recipients(staff_ids=["stf_x"])))
    withdrawal = envelope(request("order-0", withdrawn=True))
    batch = [new[0], update, *twice, new[1], refused, withdrawal, new[2]]

    left = feature.handle_batch(batch)

    assert [e.event_id for e in left] == [e.event_id for e in (update, *twice, refused, withdrawal)]
    # stf_a and stf_b were checked by order-0 a moment ago; stf_x (unknown) is never remembered.
    assert asked == [domain.Addressing(staff_ids=("stf_x",))]
    notices = components.store.db[delivery_module.NOTICES]
    for event in new:
        nid = delivery_module.notice_id(AGENCY, "lab", unpack(event, inbox_pb2.DeliverItemRequest).source_ref)
        notice = notices.find_one({"_id": nid})
        assert notice["rev"] == 1 and notice["deliveries"] == [event.event_id]
        assert "fanout_pending_at" not in notice and notice["_outbox_at"]  # its events released
        items = [domain.board_item_id(nid, owner, domain.FOLDER_LAB) for owner in ("stf_a", "stf_b")]
        assert sorted(notice["_outbox"]) == sorted("bid_" + domain.digest(item, "1")[:32] for item in items)
    assert notices.count_documents({}) == 4  # order-4 and order-5 are not written here
    for owner in ("stf_a", "stf_b"):
        assert len(lab_items(components, owner)) == 4 and counts(components, owner) == (4, 4)
    assert existing.applied and lab_items(components, "stf_a")[-1]["status"] == "final"  # the update waits
    # A repeat of a batch's event one by one has no effect.
    handled_again = deliver(feature, unpack(new[0], inbox_pb2.DeliverItemRequest), key=new[0].event_id)
    assert not handled_again.applied and counts(components, "stf_a") == (4, 4)


def test_a_batch_that_fails_half_way_is_finished_one_by_one(place, monkeypatch):
    components, feature, _ = place
    events = [envelope(request(f"order-{n}")) for n in (1, 2)]

    def crash(_notices):
        raise RuntimeError("process died")

    real = feature._fan_out_all
    monkeypatch.setattr(feature, "_fan_out_all", crash)
    with pytest.raises(RuntimeError):
        feature.handle_batch(events)
    monkeypatch.setattr(feature, "_fan_out_all", real)
    assert lab_items(components, "stf_a") == []
    for event in events:  # what the consumer does with a failed batch
        feature.handle_event(event)
    notices = components.store.db[delivery_module.NOTICES]
    assert all(n["rev"] == 1 and "fanout_pending_at" not in n and n["_outbox_at"] for n in notices.find({}))
    assert len(lab_items(components, "stf_a")) == 2 and counts(components, "stf_a") == (2, 2)


def test_a_notice_rewritten_while_its_batch_fans_out_ends_as_the_newer_revision(place, monkeypatch):
    """A gRPC update (stf_b removed) lands between the batch's notice insert and its fan-out: the
    batch's items must not bring stf_b's item back, and every held event is released."""
    components, feature, _ = place
    real = feature._fan_out_all

    def update_first(notices):
        monkeypatch.setattr(feature, "_fan_out_all", real)
        deliver(feature, request("order-1", recipients=inbox_pb2.Recipients(staff_ids=["stf_a"]), source_version=2))
        real(notices)

    monkeypatch.setattr(feature, "_fan_out_all", update_first)
    assert feature.handle_batch([envelope(request("order-1", source_version=1))]) == []
    notice = components.store.db[delivery_module.NOTICES].find_one({})
    assert notice["rev"] == 2 and notice["recipient_ids"] == ["stf_a"]
    assert "fanout_pending_at" not in notice and notice["_outbox_at"]
    assert lab_items(components, "stf_b") == [] and counts(components, "stf_b") == (0, 0)
    assert len(lab_items(components, "stf_a")) == 1 and counts(components, "stf_a") == (1, 1)


def test_a_notice_rewritten_while_one_delivery_fans_out_ends_as_the_newer_revision(place, monkeypatch):
    """The same race one delivery at a time: the newer revision finished its own fan-out first."""
    components, feature, _ = place
    real = feature._fan_out

    def update_first(notice):
        monkeypatch.setattr(feature, "_fan_out", real)
        deliver(feature, request("order-1", recipients=inbox_pb2.Recipients(staff_ids=["stf_a"]), source_version=2))
        real(notice)

    monkeypatch.setattr(feature, "_fan_out", update_first)
    assert deliver(feature, request("order-1", source_version=1)).applied
    notice = components.store.db[delivery_module.NOTICES].find_one({})
    assert notice["rev"] == 2 and "fanout_pending_at" not in notice
    assert lab_items(components, "stf_b") == [] and counts(components, "stf_b") == (0, 0)
    assert len(lab_items(components, "stf_a")) == 1 and counts(components, "stf_a") == (1, 1)


# --- eRx items: only for staff with ePrescribing ---------------------------------------------------------
# AGENCY subscribes: stf_a and stf_b are prescribers with ePrescribing, stf_c a nurse (not flagged), stf_e a
# flagged prescriber who was deactivated. OTHER does not subscribe: its prescriber stf_y is flagged in vain.


@pytest.fixture
def erx(place):
    components, feature, table = place
    table.staff.update({"stf_e": AGENCY, "stf_y": OTHER})
    table.teams["team_ac"] = ["stf_a", "stf_c"]
    table.teams["team_c"] = ["stf_c"]
    table.inactive.add("stf_e")
    table.eprescribing.update({"stf_a", "stf_b", "stf_e", "stf_y"})
    table.erx_agencies.add(AGENCY)
    return components, feature, table


def erx_request(source_ref: str = "rx-1", staff_ids=("stf_a",), **overrides) -> inbox_pb2.DeliverItemRequest:
    fields = {
        "kind": inbox_pb2.DELIVERED_KIND_ERX,
        "recipients": inbox_pb2.Recipients(staff_ids=list(staff_ids)),
        "title": "Refill request pending",
        "status": "pending",
        "source": "dosespot",
        "source_ref": source_ref,
    }
    fields.update(overrides)
    return inbox_pb2.DeliverItemRequest(**fields)


def deliver_erx(feature: Delivery, req, agency: str = AGENCY, key: str | None = None):
    return deliver(feature, req, producer="erx-bridge", agency=agency, key=key)


def erx_items(components, staff_id: str, agency: str = AGENCY) -> list[dict]:
    return lab_items(components, staff_id, agency, folder=domain.FOLDER_ERX)


def test_an_erx_item_reaches_prescribers_with_eprescribing(erx):
    components, feature, _ = erx
    result = deliver_erx(feature, erx_request(staff_ids=["stf_a", "stf_b"]))
    assert result.applied and result.created and result.recipient_ids == ["stf_a", "stf_b"]
    [item] = erx_items(components, "stf_a")
    assert item["title"] == "Refill request pending" and item["sender"] == {"id": "erx-bridge", "name": "eRx"}
    assert counts(components, "stf_b", domain.FOLDER_ERX) == (1, 1)


@pytest.mark.parametrize(
    ("staff_ids", "agency", "lacking"),
    [
        (["stf_c"], AGENCY, ["stf_c"]),  # a nurse: not flagged
        (["stf_a", "stf_c"], AGENCY, ["stf_c"]),  # one without it refuses the whole delivery
        (["stf_e"], AGENCY, ["stf_e"]),  # flagged, but deactivated
        (["stf_y"], OTHER, ["stf_y"]),  # flagged, but the agency does not subscribe
    ],
)
def test_an_erx_item_naming_staff_without_eprescribing_is_refused_and_nothing_written(erx, staff_ids, agency, lacking):
    components, feature, _ = erx
    with pytest.raises(Forbidden) as refused:
        deliver_erx(feature, erx_request(staff_ids=staff_ids), agency=agency)
    assert refused.value.code == "erx_not_enabled" and refused.value.details == {"staff_ids": lacking}
    assert components.store.db[delivery_module.NOTICES].count_documents({}) == 0
    assert components.store.board_items.count_documents({}) == 0
    assert erx_items(components, "stf_a") == [] and counts(components, "stf_a", domain.FOLDER_ERX) == (0, 0)


def test_an_erx_item_for_a_team_or_the_agency_reaches_only_its_members_with_eprescribing(erx):
    components, feature, _ = erx
    team = deliver_erx(
        feature, erx_request("rx-team", staff_ids=(), recipients=inbox_pb2.Recipients(team_ids=["team_ac"]))
    )
    assert team.recipient_ids == ["stf_a"] and erx_items(components, "stf_c") == []
    everyone = deliver_erx(
        feature, erx_request("rx-all", staff_ids=(), recipients=inbox_pb2.Recipients(whole_agency=True))
    )
    assert sorted(everyone.recipient_ids) == ["stf_a", "stf_b"]  # not the nurses, not the deactivated
    with pytest.raises(Forbidden) as refused:
        deliver_erx(feature, erx_request("rx-c", staff_ids=(), recipients=inbox_pb2.Recipients(team_ids=["team_c"])))
    assert refused.value.code == "erx_not_enabled"
    with pytest.raises(Forbidden) as nobody:
        deliver_erx(
            feature, erx_request("rx-y", staff_ids=(), recipients=inbox_pb2.Recipients(whole_agency=True)), agency=OTHER
        )
    assert nobody.value.code == "erx_not_enabled"
    assert erx_items(components, "stf_c") == [] and erx_items(components, "stf_y", OTHER) == []


def test_other_kinds_never_ask_about_eprescribing(erx):
    components, feature, table = erx
    asked = []
    table.eprescriber_ids = lambda: asked.append(1) or frozenset()
    assert deliver(feature, request("lab-c", recipients=inbox_pb2.Recipients(staff_ids=["stf_c"]))).applied
    assert deliver(
        feature, request("lab-y", recipients=inbox_pb2.Recipients(staff_ids=["stf_y"])), agency=OTHER
    ).applied
    cloud = request(
        "cloud-c", kind=inbox_pb2.DELIVERED_KIND_CLOUD, recipients=inbox_pb2.Recipients(staff_ids=["stf_c"])
    )
    assert deliver(feature, cloud, producer="cloud-comms").applied
    assert asked == [] and len(lab_items(components, "stf_c")) == 1


def test_an_update_naming_a_prescriber_who_lost_eprescribing_is_refused_but_a_withdrawal_is_not(erx):
    components, feature, table = erx
    feature.eprescribers = EprescriberCache(feature._ask_eprescribers, 0)  # directory's current word each time
    deliver_erx(feature, erx_request(staff_ids=["stf_a", "stf_b"]))
    table.eprescribing.discard("stf_b")
    with pytest.raises(Forbidden) as refused:
        deliver_erx(feature, erx_request(staff_ids=["stf_a", "stf_b"], status="approved"))
    assert refused.value.details == {"staff_ids": ["stf_b"]}
    assert [i["status"] for i in erx_items(components, "stf_b")] == ["pending"]  # nothing half-written
    narrowed = deliver_erx(feature, erx_request(staff_ids=["stf_a"], status="approved"))
    assert narrowed.recipient_ids == ["stf_a"] and erx_items(components, "stf_b") == []
    table.erx_agencies.clear()  # the agency stops subscribing
    withdrawn = deliver_erx(feature, erx_request(withdrawn=True, title="", recipients=inbox_pb2.Recipients()))
    assert withdrawn.applied and erx_items(components, "stf_a") == []


def test_who_has_eprescribing_is_asked_once_per_cache_period_and_a_refusal_always_asks(erx):
    """Directory's answer is reused for INBOX_RECIPIENTS_CACHE_S: a prescriber who lost ePrescribing still
    receives eRx items within that bound; one just given it is never refused on a remembered answer."""
    components, feature, table = erx
    asked = []
    answer = table.eprescriber_ids
    table.eprescriber_ids = lambda: asked.append(1) or answer()
    now = [100.0]
    feature.eprescribers = EprescriberCache(feature._ask_eprescribers, 10.0, clock=lambda: now[0])
    assert deliver_erx(feature, erx_request("rx-1")).applied
    table.eprescribing.discard("stf_a")
    now[0] += 9.9
    assert deliver_erx(feature, erx_request("rx-2")).applied  # within the bound
    assert len(asked) == 1
    now[0] += 0.1
    with pytest.raises(Forbidden):
        deliver_erx(feature, erx_request("rx-3"))
    assert len(asked) == 2
    table.eprescribing.add("stf_c")  # given ePrescribing: the remembered answer lacks stf_c, directory is asked
    assert deliver_erx(feature, erx_request("rx-4", staff_ids=["stf_c"])).recipient_ids == ["stf_c"]
    assert len(asked) == 3 and len(erx_items(components, "stf_a")) == 2


def test_erx_events_without_eprescribing_are_parked_and_the_rest_land(consuming, erx, event_bus):
    components, publisher, consumer = consuming
    refused = [
        envelope(erx_request("rx-nurse", staff_ids=["stf_c"]), producer="erx-bridge"),
        envelope(erx_request("rx-inactive", staff_ids=["stf_e"]), producer="erx-bridge"),
        envelope(erx_request("rx-other", staff_ids=["stf_y"]), producer="erx-bridge", agency=OTHER),
    ]
    publisher.publish(refused)
    publisher.publish([envelope(erx_request("rx-ok"), producer="erx-bridge")])
    wait_until(lambda: erx_items(components, "stf_a"))
    wait_until(lambda: event_bus.message_count(consumer.parking_queue) == 3)
    reasons = [event_bus.get(consumer.parking_queue)[0].headers["x-error-reason"] for _ in refused]
    assert reasons == ["erx_not_enabled"] * 3
    assert [i["ref_id"] for i in erx_items(components, "stf_a")] == [
        delivery_module.notice_id(AGENCY, "dosespot", "rx-ok")
    ]
    assert components.store.db[delivery_module.NOTICES].count_documents({}) == 1  # nothing half-written
    assert erx_items(components, "stf_c") == [] and erx_items(components, "stf_y", OTHER) == []


def test_a_batch_writes_erx_items_for_prescribers_and_leaves_the_refused_to_be_parked(erx):
    components, feature, _ = erx
    accepted = envelope(erx_request("rx-1", staff_ids=["stf_a", "stf_b"]), producer="erx-bridge")
    nurse = envelope(erx_request("rx-2", staff_ids=["stf_c"]), producer="erx-bridge")
    lab = envelope(request("order-1", recipients=inbox_pb2.Recipients(staff_ids=["stf_c"])))
    assert [e.event_id for e in feature.handle_batch([accepted, nurse, lab])] == [nurse.event_id]
    assert len(erx_items(components, "stf_a")) == 1 and len(lab_items(components, "stf_c")) == 1
    with pytest.raises(PermanentError) as parked:  # what the consumer does with what the batch left
        feature.handle_event(nurse)
    assert parked.value.reason == "erx_not_enabled"
    assert erx_items(components, "stf_c") == []
    assert components.store.db[delivery_module.NOTICES].count_documents({}) == 2
