"""Pure rules of the delivery API: who may deliver what, where it lands, what a request must hold,
and how an item follows its notice."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from clinic.inbox.v1 import inbox_pb2
from services.inbox import delivery_request, delivery_rules, domain
from services.inbox.store import REMOVE
from services.kit.errors import Forbidden, InvalidInput


def request(**overrides) -> inbox_pb2.DeliverItemRequest:
    fields = {
        "kind": inbox_pb2.DELIVERED_KIND_LAB,
        "recipients": inbox_pb2.Recipients(staff_ids=["stf_a"]),
        "title": "Lab result available",
        "source": "lab",
        "source_ref": "order-1",
    }
    fields.update(overrides)
    return inbox_pb2.DeliverItemRequest(**fields)


def refused(code: str, **overrides) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        delivery_request.parse_request(request(**overrides))
    assert caught.value.code == code
    return caught.value


# --- who may deliver what ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("producer", "folder"),
    [
        ("notifications", domain.FOLDER_SCHEDULE),
        ("notifications", domain.FOLDER_LAB),
        ("notifications", domain.FOLDER_COMPLIANCE),
        ("erx-bridge", domain.FOLDER_ERX),
        ("cloud-comms", domain.FOLDER_CLOUD),
    ],
)
def test_each_producer_delivers_its_own_kinds(producer, folder):
    assert delivery_request.policy_for(producer, folder).display_name


@pytest.mark.parametrize(
    ("producer", "folder"),
    [
        ("notifications", domain.FOLDER_ERX),
        ("notifications", domain.FOLDER_CLOUD),
        ("erx-bridge", domain.FOLDER_LAB),
        ("cloud-comms", domain.FOLDER_SCHEDULE),
        ("auto-reply", domain.FOLDER_LAB),
        ("inbox", domain.FOLDER_LAB),
        ("web", domain.FOLDER_COMPLIANCE),
        ("", domain.FOLDER_LAB),
    ],
)
def test_anything_else_is_forbidden(producer, folder):
    with pytest.raises(Forbidden) as caught:
        delivery_request.policy_for(producer, folder)
    assert caught.value.code == "kind_not_allowed"


def test_every_delivered_kind_has_its_folder():
    assert {delivery_request.folder_for(kind) for kind in delivery_request.KIND_FOLDERS} == set(
        domain.DELIVERED_FOLDERS
    )
    assert delivery_request.folder_for(inbox_pb2.DELIVERED_KIND_LAB) == domain.FOLDER_LAB
    assert delivery_request.folder_for(inbox_pb2.DELIVERED_KIND_ERX) == domain.FOLDER_ERX
    for kind in (inbox_pb2.DELIVERED_KIND_UNSPECIFIED, 99):
        with pytest.raises(InvalidInput) as caught:
            delivery_request.folder_for(kind)
        assert caught.value.code == "invalid_kind"


# --- requests ------------------------------------------------------------------------------------


def test_a_full_request_is_read_field_by_field():
    due = Timestamp()
    due.FromMilliseconds(1_767_225_600_000)
    parsed = delivery_request.parse_request(
        request(
            recipients=inbox_pb2.Recipients(staff_ids=["stf_a", "stf_a"], team_ids=["team_x"], whole_agency=True),
            title="  CBC ready  ",
            summary="Ordered by Dr. Reyes",
            severity=inbox_pb2.SEVERITY_URGENT,
            status="final",
            due_at=due,
            links=[inbox_pb2.ActionLink(label="Open order", url="https://ehr.example/orders/1")],
            source_version=3,
            delivery_id="dlv-1",
            mark_unread=True,
            actor_staff_id="stf_b",
            patient_name=" DOE, JANE ",
        )
    )
    assert parsed.folder == domain.FOLDER_LAB
    assert parsed.patient_name == "DOE, JANE"
    assert "DOE" not in repr(parsed)  # PHI never in a repr
    assert parsed.addressing == domain.Addressing(staff_ids=("stf_a",), team_ids=("team_x",), whole_agency=True)
    assert (parsed.title, parsed.summary, parsed.severity, parsed.status) == (
        "CBC ready",
        "Ordered by Dr. Reyes",
        "urgent",
        "final",
    )
    assert parsed.due_at == 1_767_225_600_000
    assert parsed.links == (("Open order", "https://ehr.example/orders/1"),)
    assert (parsed.source, parsed.source_ref, parsed.source_version) == ("lab", "order-1", 3)
    assert (parsed.delivery_id, parsed.mark_unread, parsed.actor_staff_id) == ("dlv-1", True, "stf_b")
    assert not parsed.resolved and not parsed.withdrawn


def test_defaults_of_a_minimal_request():
    parsed = delivery_request.parse_request(request())
    assert parsed.severity == "info"
    assert parsed.summary is None and parsed.status is None and parsed.due_at is None
    assert parsed.links == () and parsed.delivery_id is None and parsed.actor_staff_id is None
    assert parsed.patient_name is None


@pytest.mark.parametrize(
    ("code", "overrides"),
    [
        ("missing_field", {"title": ""}),
        ("invalid_value", {"title": "   "}),
        ("too_long", {"title": "t" * 201}),
        ("too_long", {"summary": "s" * 1001}),
        ("too_long", {"patient_name": "n" * 201}),
        ("invalid_value", {"patient_name": "DOE\x00JANE"}),
        ("invalid_value", {"severity": 7}),
        ("invalid_value", {"status": "not a token"}),
        ("too_long", {"status": "s" * 41}),
        ("no_recipients", {"recipients": inbox_pb2.Recipients()}),
        ("invalid_value", {"recipients": inbox_pb2.Recipients(staff_ids=["stf a"])}),
        ("invalid_value", {"recipients": inbox_pb2.Recipients(team_ids=["{$gt: ''}"])}),
        ("missing_field", {"source": ""}),
        ("missing_field", {"source_ref": ""}),
        ("too_long", {"source_ref": "r" * 129}),
        ("invalid_value", {"source_ref": "order\n1"}),
        ("invalid_value", {"source": "lab results"}),
        ("invalid_value", {"delivery_id": "d\x00"}),
        ("invalid_value", {"actor_staff_id": "stf/../x"}),
        ("invalid_value", {"source_version": -1}),
        ("invalid_kind", {"kind": inbox_pb2.DELIVERED_KIND_UNSPECIFIED}),
        ("invalid_link", {"links": [inbox_pb2.ActionLink(label="Open", url="javascript:alert(1)")]}),
        ("invalid_link", {"links": [inbox_pb2.ActionLink(label="Open", url="ftp://files.example/x")]}),
        ("missing_field", {"links": [inbox_pb2.ActionLink(label="", url="https://ehr.example")]}),
        ("too_long", {"links": [inbox_pb2.ActionLink(label="l" * 81, url="https://ehr.example")]}),
        ("too_many", {"links": [inbox_pb2.ActionLink(label="l", url="https://ehr.example")] * 11}),
    ],
)
def test_bad_requests_are_refused_with_a_stable_code(code, overrides):
    refused(code, **overrides)


def test_bad_due_time_is_refused():
    before_epoch = Timestamp(seconds=-5)
    refused("invalid_value", due_at=before_epoch)


def test_a_withdrawal_needs_only_its_source():
    parsed = delivery_request.parse_request(request(title="", recipients=inbox_pb2.Recipients(), withdrawn=True))
    assert parsed.withdrawn and parsed.title is None and parsed.addressing.is_empty()


# --- recipients ------------------------------------------------------------------------------------


def test_the_actor_is_never_a_recipient():
    assert delivery_rules.final_recipients(["stf_a", "stf_b", "stf_a"], "stf_b") == ["stf_a"]
    assert delivery_rules.final_recipients(["stf_a"], None) == ["stf_a"]
    with pytest.raises(InvalidInput) as caught:
        delivery_rules.final_recipients(["stf_b"], "stf_b")
    assert caught.value.code == "no_recipients"


def test_which_recipients_are_added_and_removed():
    assert delivery_rules.recipient_changes([], ["a", "b"]) == (["a", "b"], [])
    assert delivery_rules.recipient_changes(["a", "b"], ["b", "c"]) == (["c"], ["a"])
    assert delivery_rules.recipient_changes(["a", "b"], ["a", "b"]) == ([], [])
    assert delivery_rules.recipient_changes(["a", "b"], []) == ([], ["a", "b"])


# --- repeats and versions --------------------------------------------------------------------------------


def test_one_notice_per_agency_source_and_reference():
    nid = delivery_rules.notice_id("agy_1", "lab", "order-1")
    assert nid == delivery_rules.notice_id("agy_1", "lab", "order-1")
    assert nid.startswith("ntc_") and len(nid) == 36
    others = {
        delivery_rules.notice_id("agy_2", "lab", "order-1"),
        delivery_rules.notice_id("agy_1", "fhir", "order-1"),
        delivery_rules.notice_id("agy_1", "lab", "order-2"),
    }
    assert nid not in others and len(others) == 3


def test_repeats_and_stale_versions_are_recognised():
    notice = {"deliveries": ["d1", "d2"], "source_version": 5}
    assert delivery_rules.is_repeat(notice, "d1") and not delivery_rules.is_repeat(notice, "d3")
    assert not delivery_rules.is_repeat(notice, None) and not delivery_rules.is_repeat(None, "d1")
    assert delivery_rules.is_stale(notice, 4)
    assert not delivery_rules.is_stale(notice, 5) and not delivery_rules.is_stale(notice, 6)
    assert not delivery_rules.is_stale(notice, 0)  # 0: always apply
    assert not delivery_rules.is_stale(None, 1)


def test_recent_delivery_ids_are_bounded():
    notice = {"deliveries": [f"d{i}" for i in range(delivery_rules.RECENT_DELIVERIES)]}
    kept = delivery_rules.recent_deliveries(notice, "new")
    assert len(kept) == delivery_rules.RECENT_DELIVERIES and kept[-1] == "new" and "d0" not in kept
    assert delivery_rules.recent_deliveries(None, None) == []


# --- an item follows its notice -----------------------------------------------------------------------


def notice(**fields) -> dict:
    base = {
        "_id": "ntc_1",
        "agency_id": "agy_1",
        "folder": domain.FOLDER_LAB,
        "title": b"sealed-title",
        "severity": "info",
        "sender_name": "Notifications",
        "rev": 1,
        "unread_since": 1000,
        "delivered_at": 1000,
    }
    return {**base, **fields}


def item_for(doc: dict, read_at: int | None = None) -> dict:
    state = {k: v for k, v in delivery_rules.item_state(doc).items() if v is not None and k != "urgent"}
    item = domain.new_item(
        agency_id="agy_1",
        owner_id="stf_a",
        folder=doc["folder"],
        kind=domain.KIND_NOTICE,
        ref_id=doc["_id"],
        at_ms=1000,
        unread=read_at is None,
        urgent=doc["severity"] == "urgent",
        **state,
    )
    if read_at is not None:
        item["read_at"] = read_at
    return item


def test_an_item_in_line_needs_no_change():
    doc = notice()
    assert delivery_rules.item_patch(item_for(doc), doc) is None


def test_new_content_and_severity_reach_the_item():
    item = item_for(notice())
    updated = notice(rev=2, title=b"new", severity="urgent", status="final", due_at=5000)
    patch = delivery_rules.item_patch(item, updated)
    assert patch["title"] == b"new" and patch["status"] == "final" and patch["due_at"] == 5000
    assert patch["severity"] == "urgent" and patch["urgent"] == 1 and patch["notice_rev"] == 2
    assert patch["urgent_board"] == item["board"]
    assert "read_at" not in patch  # still unread


def test_fields_the_notice_dropped_are_removed():
    item = item_for(notice(status="open", summary=b"s"))
    patch = delivery_rules.item_patch(item, notice(rev=2))
    assert patch["status"] is REMOVE and patch["summary"] is REMOVE


def test_resolved_reads_the_item_and_keeps_it_listed():
    item = item_for(notice())
    patch = delivery_rules.item_patch(item, notice(rev=2, resolved_at=3000))
    assert patch["read_at"] == 3000 and patch["resolved_at"] == 3000
    assert patch["unread_board"] is None and "board" not in patch


def test_mark_unread_brings_back_items_read_before_it():
    read_item = item_for(notice(), read_at=2000)
    patch = delivery_rules.item_patch(read_item, notice(rev=2, unread_since=2500))
    assert patch["read_at"] is None and patch["unread_board"] == read_item["board"]
    read_after = item_for(notice(), read_at=3000)
    assert delivery_rules.item_patch(read_after, notice(rev=2, unread_since=2500)) == {"notice_rev": 2}


def test_an_item_marked_unread_again_moves_to_the_top_of_its_list():
    """A corrected result is a new arrival: it sorts as of the correction, not its first delivery."""
    for read_at in (None, 2000):
        item = item_for(notice(), read_at=read_at)
        patch = delivery_rules.item_patch(item, notice(rev=2, unread_since=2500, delivered_at=2500))
        assert patch["sent_at"] == 2500 and patch["sort_key"] == domain.sort_key(2500, item["_id"])
        assert patch["sort_key"] > item["sort_key"]


def test_an_update_that_does_not_mark_unread_keeps_the_item_in_place():
    item = item_for(notice())
    patch = delivery_rules.item_patch(item, notice(rev=2, status="final", delivered_at=2500))
    assert "sort_key" not in patch and "sent_at" not in patch


def test_an_older_revision_never_overwrites_a_newer_one():
    item = item_for(notice(rev=3))
    assert delivery_rules.item_patch(item, notice(rev=2, title=b"old")) is None


def test_an_archived_item_stays_archived():
    item = item_for(notice())
    item.update(domain.item_keys("agy_1", "stf_a", domain.FOLDER_ARCHIVE, unread=True, urgent=False))
    patch = delivery_rules.item_patch(item, notice(rev=2, severity="urgent"))
    assert patch["urgent_board"] == domain.owner_folder("agy_1", "stf_a", domain.FOLDER_ARCHIVE)
    assert "board" not in patch and "folder" not in patch


@pytest.mark.parametrize(
    "when",
    [Timestamp(seconds=10**15), Timestamp(seconds=60, nanos=-1), Timestamp(seconds=60, nanos=2_000_000_000)],
)
def test_a_due_time_protobuf_cannot_represent_is_refused(when):
    """Not an internal error: the caller sent it, so it is INVALID_ARGUMENT (and a parked event)."""
    refused("invalid_value", due_at=when)
