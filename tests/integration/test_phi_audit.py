"""Every listing that shows PHI leaves exactly one access record per request, with the right actor,
action and patient: the inbox's board, message, label, reminder, signature request, announcement and
portal thread lists (built through the inbox's `build()`, routes called through its Flask edge with
real tokens), and directory's portal patient list and detail (its own `build()` and app). The
records are read back from the outbox collections on the real embedded database."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import pytest

from clinic.audit.v1 import audit_pb2
from services.directory import tokens
from services.inbox import config, domain
from services.inbox.announcements import Announcements
from services.inbox.directory_client import AgencySettings, PortalPatient
from services.inbox.http_api import build_app
from services.inbox.portal import Portal, PortalCaller
from services.inbox.reminders import Reminders
from services.inbox.service import build
from services.inbox.signatures import Signatures
from services.inbox.store import ACCESS_DENIALS
from services.kit.auth import Identity, StaticKeySource, TokenVerifier
from services.kit.events import decode_envelope, unpack
from services.kit.mongo import now_ms
from services.kit.service_identity import acting_as
from tests.helpers import bearer, staged_accesses
from tests.integration.inbox_fixtures import AgencyTable

AGENCY = "agy_1"
JANE = PortalPatient("pat_jane", AGENCY, "portal_jane", "Jane Roe")
INBOX_SERVICE = Identity(subject="svc:inbox", agency_id=AGENCY, roles=frozenset({"service"}), kind="service")


@dataclass
class Rig:
    components: object
    client: object
    keys: tokens.KeySet
    portal: Portal

    def headers(self, staff_id: str, *roles: str) -> dict[str, str]:
        token = tokens.issue_access_token(
            self.keys,
            staff_id=staff_id,
            agency_id=AGENCY,
            roles=list(roles or ("staff",)),
            name=staff_id,
            session_id="s1",
            ttl_s=300,
        ).token
        return bearer(token)

    def records(self) -> dict[str, dict]:
        return {doc["_id"]: doc for doc in self.components.store.db[ACCESS_DENIALS].find()}


@pytest.fixture
def rig(mongo_client, db_name):
    master = base64.b64encode(os.urandom(32)).decode()
    settings = config.load(
        {"MONGO_URI": "mongodb://unused:1", "PHI_MASTER_KEYS": f"m:{master}", "AMQP_URL": "amqp://unused/"}
    )
    table = AgencyTable(staff={"stf_a": AGENCY, "stf_b": AGENCY, "stf_admin": AGENCY}, teams={"team_1": ["stf_b"]})
    table.patients["jane"] = JANE
    features = (Announcements, Reminders, Signatures, Portal)
    components = build(settings, mongo_client[db_name], directory=table, features=features).components
    keys = tokens.KeySet.from_pem(tokens.generate_private_key_pem())
    client = build_app(components, TokenVerifier(StaticKeySource(keys.verification_keys))).test_client()
    portal = next(f for f in components.features if isinstance(f, Portal))
    return Rig(components, client, keys, portal)


def one_new_record(rig: Rig, before: dict[str, dict]) -> tuple[dict, audit_pb2.PhiAccessed]:
    """The one access record written since `before`, with its one event."""
    new = [doc for doc_id, doc in rig.records().items() if doc_id not in before]
    assert len(new) == 1, [doc.get("action") for doc in new]
    [entry] = new[0]["_outbox"].values()
    envelope = decode_envelope(entry["env"])
    assert envelope.event_type == "phi.accessed.v1" and envelope.producer == "inbox"
    return new[0], unpack(envelope, audit_pb2.PhiAccessed)


def listed(rig: Rig, path: str, headers: dict, **params) -> tuple[dict, audit_pb2.PhiAccessed, dict]:
    before = rig.records()
    reply = rig.client.get(path, headers=headers, query_string=params)
    assert reply.status_code == 200, reply.get_json()
    record, event = one_new_record(rig, before)
    return record, event, reply.get_json()


def send(rig: Rig, sender: str, to: str, subject: str) -> dict:
    reply = rig.client.post(
        "/api/v1/messages", json={"to_staff_ids": [to], "subject": subject, "body": "b"}, headers=rig.headers(sender)
    )
    assert reply.status_code == 201, reply.get_json()
    return reply.get_json()


def test_each_board_page_is_one_listing_record_of_its_folder(rig):
    for n in range(3):
        send(rig, "stf_a", "stf_b", f"Mrs. Roe's potassium {n}")
    b = rig.headers("stf_b")
    record, event, page = listed(rig, "/api/v1/board/items", b, folder="messages", limit=2)
    assert [i["title"] for i in page["items"]] == ["Mrs. Roe's potassium 2", "Mrs. Roe's potassium 1"]
    assert (event.actor_id, event.actor_kind, event.agency_id) == ("stf_b", "staff", AGENCY)
    assert (event.resource_type, event.resource_id, event.action, event.outcome) == (
        "board_list",
        "messages",
        "list",
        "allowed",
    )
    assert (event.service, event.patient_id) == ("inbox", "")
    assert (record["actor_id"], record["action"], record["shown"]) == ("stf_b", "list", 2)
    assert "Roe" not in str(record)  # ids and counts only, never the subjects shown

    # The next page is another request: another record. The sender's Sent folder is listed as such.
    record, event, _ = listed(rig, "/api/v1/board/items", b, folder="messages", cursor=page["next_cursor"])
    assert (event.resource_id, record["shown"]) == ("messages", 1)
    _, event, _ = listed(rig, "/api/v1/board/items", rig.headers("stf_a"), folder="sent")
    assert (event.actor_id, event.resource_id) == ("stf_a", "sent")


def test_the_message_list_is_one_listing_record(rig):
    send(rig, "stf_a", "stf_b", "Chart for J. Roe")
    record, event, page = listed(rig, "/api/v1/messages", rig.headers("stf_b"))
    assert page["items"][0]["subject"] == "Chart for J. Roe"
    assert (event.actor_id, event.resource_type, event.resource_id, event.action) == (
        "stf_b",
        "message_list",
        "messages",
        "list",
    )
    assert record["shown"] == 1


def test_a_label_listing_and_the_label_names_are_recorded(rig):
    sent = send(rig, "stf_a", "stf_b", "Roe follow-up")
    b = rig.headers("stf_b")
    item_id = domain.board_item_id(sent["id"], "stf_b", domain.FOLDER_MESSAGES)
    before = rig.records()
    labelled = rig.client.post(f"/api/v1/board/items/{item_id}/labels", json={"name": "Jane Roe"}, headers=b)
    assert labelled.status_code == 200, labelled.get_json()
    label_id = labelled.get_json()["label"]["id"]
    assert rig.records() == before  # labelling is not a listing

    _, event, page = listed(rig, f"/api/v1/labels/{label_id}/items", b)
    assert [i["id"] for i in page["items"]] == [item_id]
    assert (event.actor_id, event.resource_type, event.resource_id, event.action) == (
        "stf_b",
        "label_items",
        label_id,
        "list",
    )
    # The same listing through the board's label filter.
    _, event, _ = listed(rig, "/api/v1/board/items", b, label=label_id)
    assert (event.resource_type, event.resource_id) == ("label_items", label_id)
    # Label names are PHI too: the tree and the label list name them.
    for path in ("/api/v1/labels", "/api/v1/board"):
        record, event, _ = listed(rig, path, b)
        assert (event.resource_type, event.resource_id, record["shown"]) == ("label_list", "labels", 1)
    # A tree without labels shows no PHI and records nothing.
    before = rig.records()
    assert rig.client.get("/api/v1/board", headers=rig.headers("stf_a")).status_code == 200
    assert rig.records() == before


def test_the_reminder_list_is_one_listing_record(rig):
    b = rig.headers("stf_b")
    for text in ("Call Jane Roe", "Refill for J. Roe"):
        made = rig.client.post("/api/v1/reminders", json={"text": text, "remind_at": "2030-01-01T09:00:00Z"}, headers=b)
        assert made.status_code == 201, made.get_json()
    record, event, page = listed(rig, "/api/v1/reminders", b)
    assert len(page["reminders"]) == 2
    assert (event.actor_id, event.resource_type, event.resource_id, event.action) == (
        "stf_b",
        "reminder_list",
        "reminders",
        "list",
    )
    assert record["shown"] == 2


def test_the_signature_request_list_is_one_listing_record(rig):
    b = rig.headers("stf_b")
    body = {
        "document_kind": "patient",
        "title": "Roe treatment plan",
        "document_ref": "chart/1",
        "signer_ids": ["stf_a"],
    }
    assert rig.client.post("/api/v1/signature-requests", json=body, headers=b).status_code == 201
    record, event, page = listed(rig, "/api/v1/signature-requests", b)
    assert page["requests"][0]["title"] == "Roe treatment plan"
    assert (event.actor_id, event.resource_type, event.resource_id, event.action) == (
        "stf_b",
        "signature_request_list",
        "signatures",
        "list",
    )
    assert record["shown"] == 1


def test_the_announcement_list_is_one_listing_record(rig):
    admin = rig.headers("stf_admin", "admin")
    posted = rig.client.post("/api/v1/announcements", json={"title": "Flu clinic", "body": "Friday"}, headers=admin)
    assert posted.status_code == 201, posted.get_json()
    for who, headers in (("stf_a", rig.headers("stf_a")), ("stf_admin", admin)):
        record, event, page = listed(rig, "/api/v1/announcements", headers)
        assert [i["title"] for i in page["items"]] == ["Flu clinic"]
        assert (event.actor_id, event.resource_type, event.resource_id, event.action) == (
            who,
            "announcement_list",
            "announcements",
            "list",
        )
        assert record["shown"] == 1


def test_the_portal_thread_list_is_one_listing_record_naming_the_patient(rig):
    who = PortalCaller(
        "patient-portal", AgencySettings(AGENCY, AGENCY, "Client", "Clients", "UTC", "patient-portal"), JANE
    )
    with acting_as(INBOX_SERVICE):
        for subject in ("My refill", "My visit"):
            rig.portal.send(who, {"to_team_id": "team_1", "subject": subject, "body": "Hello"}, None)
    before = rig.records()
    threads = rig.portal.list_threads(who, None, 20)["threads"]
    assert [t["subject"] for t in threads] == ["My visit", "My refill"]
    record, event = one_new_record(rig, before)
    assert (event.actor_id, event.actor_kind, event.agency_id) == ("patient-portal", "partner", AGENCY)
    assert (event.resource_type, event.resource_id, event.action, event.patient_id) == (
        "thread_list",
        "pat_jane",
        "list",
        "pat_jane",
    )
    assert record["shown"] == 2

    # Reading one thread names the patient too; so does a staff member opening the message.
    before = rig.records()
    rig.portal.read_thread(who, threads[0]["id"])
    _, event = one_new_record(rig, before)
    assert (event.resource_type, event.action, event.patient_id) == ("thread", "read_thread", "pat_jane")
    before = rig.records()
    item_id = domain.board_item_id(threads[0]["id"], "stf_b", domain.FOLDER_PORTAL)
    opened = rig.client.get(f"/api/v1/board/items/{item_id}", headers=rig.headers("stf_b"))
    assert opened.status_code == 200 and opened.get_json()["patient"]["name"] == "Jane Roe"
    _, event = one_new_record(rig, before)
    assert (event.actor_id, event.resource_type, event.action, event.patient_id) == (
        "stf_b",
        "message",
        "read",
        "pat_jane",
    )


def test_a_listing_is_recorded_even_when_it_is_empty_and_never_for_a_refused_query(rig):
    b = rig.headers("stf_b")
    _, event, page = listed(rig, "/api/v1/board/items", b, folder="lab")
    assert page["items"] == [] and (event.resource_id, event.outcome) == ("lab", "allowed")
    before = rig.records()
    assert rig.client.get("/api/v1/board/items", headers=b, query_string={"folder": "nope"}).status_code == 400
    assert rig.records() == before


# --- directory: the portal patient list and detail -----------------------------------------------------


def directory_reads(db, since: set[str] = frozenset()) -> list[tuple]:
    """(actor, resource type, resource id, action, outcome, patient id) of the events staged since."""
    found = []
    for record in db["access_records"].find():
        if record["_id"] in since:
            continue
        for entry in record["_outbox"].values():
            a = unpack(decode_envelope(entry["env"]), audit_pb2.PhiAccessed)
            found.append((a.actor_id, a.resource_type, a.resource_id, a.action, a.outcome, a.patient_id))
    return found


def test_the_patient_list_records_the_listing_and_each_patient_shown_in_one_document(dut):
    admin = dut.as_user("admin")
    created = [
        dut.client.post(
            "/api/v1/directory/patients",
            json={"portal_user_id": f"portal_t{n}", "display_name": f"Test Patient {n}"},
            headers=admin,
        ).get_json()["id"]
        for n in range(2)
    ]
    db = dut.store.db
    before = {doc["_id"] for doc in db["access_records"].find()}
    page = dut.client.get("/api/v1/directory/patients", query_string={"limit": 2}, headers=admin).get_json()
    assert [p["id"] for p in page["patients"]] == created[::-1]
    new = [doc for doc in db["access_records"].find() if doc["_id"] not in before]
    assert len(new) == 1 and new[0]["action"] == "list" and new[0]["count"] == 2
    assert directory_reads(db, before) == [
        ("stf_riverbend_admin", "patient_list", "patients", "list", "allowed", ""),
        *[("stf_riverbend_admin", "portal_patient", p, "list", "allowed", p) for p in created[::-1]],
    ]
    assert "Test Patient" not in str(new)


def test_the_patient_detail_is_recorded_and_so_are_refusals(dut):
    db = dut.store.db
    before = {doc["_id"] for doc in db["access_records"].find()}
    jane = "pat_riverbend_demo"
    shown = dut.client.get(f"/api/v1/directory/patients/{jane}", headers=dut.as_user("admin"))
    assert shown.status_code == 200 and shown.get_json()["display_name"] == "Jane Demo-Client"
    refused = dut.client.get(f"/api/v1/directory/patients/{jane}", headers=dut.as_user("nurse.kim"))
    assert refused.status_code == 403
    unknown = dut.client.get("/api/v1/directory/patients/pat_nobody", headers=dut.as_user("admin"))
    assert unknown.status_code == 404
    listing = dut.client.get("/api/v1/directory/patients", headers=dut.as_user("nurse.kim"))
    assert listing.status_code == 403
    assert directory_reads(db, before) == [
        ("stf_riverbend_admin", "portal_patient", jane, "read", "allowed", jane),
        ("stf_riverbend_kim", "portal_patient", jane, "read", "denied", jane),
        ("stf_riverbend_admin", "portal_patient", "pat_nobody", "read", "denied", "pat_nobody"),
        ("stf_riverbend_kim", "patient_list", "patients", "list", "denied", ""),
    ]
    assert len([doc for doc in db["access_records"].find() if doc["_id"] not in before]) == 4


def test_staged_accesses_of_the_directory_are_phi_accessed_envelopes(dut):
    assert dut.client.get("/api/v1/directory/patients", headers=dut.as_user("admin")).status_code == 200
    events = staged_accesses(dut.store.db)
    assert events and all(
        envelope.event_type == "phi.accessed.v1" and envelope.producer == "directory" and envelope.agency_id
        for envelope, _ in events
    )
    assert all(accessed.accessed_at.ToMilliseconds() <= now_ms() for _, accessed in events)
