"""Triage against real parts: the real directory (its gRPC server, its demo agencies, teams and cloud
addresses; cloud-comms and inbox take service tokens from it), cloud-comms' features on the real
database, documents stored the way their features store them (a Direct message through
DirectMessaging's own store, a fax through the signed provider callback), the outbox relay publishing
to RabbitMQ and a real inbox delivery consumer putting routed items on boards.

Only the HTTP token check is a table (staff identities by bearer value), as in the other cloud-comms
integration tests."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from io import BytesIO

import pytest

from services.cloud_comms import config
from services.cloud_comms.direct.feature import DIRECT_MESSAGES, DirectMessaging
from services.cloud_comms.directory_client import DirectoryClient
from services.cloud_comms.fax.feature import FAXES, Faxes
from services.cloud_comms.http_api import create_app
from services.cloud_comms.service import build
from services.cloud_comms.triage.feature import Triage
from services.cloud_comms.triage.roster import NAME_KEYS, PATIENTS
from services.fax_simulator.app import sign
from services.fax_simulator.pdf import text_pdf
from services.inbox import config as inbox_config
from services.inbox.board import ItemFilter
from services.inbox.delivery import Delivery
from services.inbox.service import build as build_inbox
from services.kit.auth import Identity
from services.kit.bus import BatchPublisher
from services.kit.errors import Unavailable
from services.kit.mongo import now_ms
from services.kit.outbox import OutboxRelay
from services.kit.service_identity import ServiceTokens
from tests.cloud_triage_documents import (
    FACE_SHEET_JUNIOR,
    FOREIGN_MRN_ROOT,
    LAB_PAGE_CARTER,
    LAB_PAGE_LOPEZ,
    REFERRAL_LINES,
    RIVERBEND_MRN_ROOT,
    ccda,
    xdm_zip,
)
from tests.helpers import staged_accesses
from tests.waits import background, together, wait_until

RIVERBEND = "agy_riverbend"
INTAKE_ADDRESS, INTAKE_FAX = "intake@direct.riverbend.example", "+15555550100"
INTAKE = ("stf_riverbend_wilson", "stf_riverbend_thompson")  # linked to both (demo data)
MEDICAL = (
    "stf_riverbend_reyes",
    "stf_riverbend_chen",
    "stf_riverbend_brooks",
    "stf_riverbend_kim",
    "stf_riverbend_white",
)
FAX_TOKEN, PUBLIC = "triage-test-token", "https://clinic.example/api/v1/fax/callbacks"
SIGNER = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def person(staff_id: str, *roles: str, agency: str = RIVERBEND, name: str = "") -> Identity:
    return Identity(subject=staff_id, agency_id=agency, roles=frozenset(roles or ("staff",)), name=name or staff_id)


class TokenTable:
    """Bearer value -> staff identity (the one stand-in: cloud-comms' token check)."""

    identities = {
        "wilson": person("stf_riverbend_wilson", name="Chris Wilson"),
        "thompson": person("stf_riverbend_thompson", name="Dana Thompson"),
        "reyes": person("stf_riverbend_reyes", name="Dr. Elena Reyes"),
        "patel": person("stf_riverbend_patel", name="Priya Patel"),
        "admin": person("stf_riverbend_admin", "staff", "admin", name="Alex Morgan"),
        "outsider": person("stf_lakeside_baker", agency="agy_lakeside", name="Jesse Baker"),
        "lakeside_admin": person("stf_lakeside_admin", "staff", "admin", agency="agy_lakeside"),
    }

    def verify(self, token):
        return self.identities[token]


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {name}"}


@dataclass
class Rig:
    triage: Triage
    direct: DirectMessaging
    faxes: Faxes
    http: object
    db: object
    inbox: object
    relay: OutboxRelay

    def store_direct(self, subject: str, attachments, text: str = "Please see attached.", message_id: str = "") -> str:
        """A received Direct message stored by DirectMessaging itself, due for triage."""
        recipient = self.direct.components.directory.resolve_address("direct", INTAKE_ADDRESS)
        message_id = message_id or f"<{os.urandom(6).hex()}@direct.partner.example>"
        self.direct._store(  # the feature's own storage of a verified inbound message
            recipient,
            message_id,
            sender="sender@direct.partner.example",
            to=[INTAKE_ADDRESS],
            subject=subject,
            date="",
            text=text,
            attachments=attachments,
            signer_pem=SIGNER,
            final_delivery=False,
        )
        doc = self.db[DIRECT_MESSAGES].find_one({"message_id": message_id})
        return mark_due(self.db[DIRECT_MESSAGES], doc)

    def store_fax(self, pdf: bytes, fax_id: int | None = None, is_test: bool = False) -> str:
        """A received fax through the provider's signed callback (cloud-comms' HTTP route), due for triage."""
        fax = {
            "id": fax_id or int.from_bytes(os.urandom(3), "big"),
            "direction": "received",
            "num_pages": 1,
            "status": "success",
            "created_at": "2026-03-04T20:14:20Z",
            "completed_at": "2026-03-04T20:15:00Z",
            "from_number": "+15555550123",
            "to_number": INTAKE_FAX,
            "caller_name": "",
            "is_test": is_test,
        }
        flag = "true" if is_test else "false"
        params = {"fax": json.dumps(fax), "direction": "received", "is_test": flag, "success": "true"}
        headers = {"X-Phaxio-Signature": sign(FAX_TOKEN, f"{PUBLIC}/received", params, {"filename": pdf})}
        answer = self.http.post(
            "/api/v1/fax/callbacks/received",
            data={**params, "filename": (BytesIO(pdf), "fax.pdf", "application/pdf")},
            headers=headers,
            content_type="multipart/form-data",
        )
        assert answer.status_code == 200, answer.get_json()
        return mark_due(self.db[FAXES], self.db[FAXES].find_one({"_id": answer.get_json()["id"]}))

    def view(self, document_id: str, who: str = "wilson"):
        return self.http.get(f"/api/v1/cloud/triage/{document_id}", headers=bearer(who))

    def confirm(self, document_id: str, who: str = "wilson", **body):
        return self.http.post(f"/api/v1/cloud/triage/{document_id}/confirm", json=body, headers=bearer(who))

    def settings(self, who: str = "admin", **body):
        return self.http.put("/api/v1/cloud/triage/settings", json=body, headers=bearer(who))

    def cloud_items(self, staff_id: str) -> list[dict]:
        return self.inbox.board.page(person(staff_id), "cloud", ItemFilter(), None, 50)["items"]

    def patient_id(self, q: str) -> str:
        (found,) = self.http.get("/api/v1/cloud/patients", query_string={"q": q}, headers=bearer("wilson")).get_json()[
            "patients"
        ]
        return found["id"]


def mark_due(collection, doc: dict) -> str:
    """Inbound documents are due for triage from their feature's insert."""
    assert doc["triage_due_at"] <= now_ms()
    return doc["_id"]


@pytest.fixture
def rig(dut, mongo_client, db_name, tmp_path, event_bus):
    server = dut.directory.grpc_server("127.0.0.1", 0)
    server.start()
    target = f"127.0.0.1:{server.port}"

    def secret(name: str) -> str:
        return (tmp_path / "secrets" / f"service-{name}.secret").read_text().strip()

    common = {
        "CLINIC_RUN_DIR": str(tmp_path),
        "MONGO_URI": "mongodb://unused:1",
        "PHI_MASTER_KEYS": "m:" + base64.b64encode(os.urandom(32)).decode(),
        "AMQP_URL": event_bus.amqp_url,
        "DIRECTORY_GRPC_TARGET": target,
    }
    settings = config.load(
        {
            **common,
            "CLOUD_COMMS_PUBLIC_URL": "https://clinic.example",
            "CLOUD_FAX_CALLBACK_TOKEN": FAX_TOKEN,
            "CLOUD_FAX_PUBLIC_CALLBACK_URL": PUBLIC,
            "CLOUD_TRIAGE_INDEX_KEY": "integration-test-index-key-0123456789abcdef",
        }
    )
    cloud_tokens = ServiceTokens(target, "cloud-comms", secret("cloud-comms"))
    directory = DirectoryClient(target, cloud_tokens, cache_s=0)
    cloud_db, inbox_db = mongo_client[f"{db_name}_cloud"], mongo_client[f"{db_name}_inbox"]
    comms = build(
        settings, cloud_db, directory=directory, service_tokens=cloud_tokens, features=(DirectMessaging, Faxes, Triage)
    )
    direct, faxes, triage = comms.features
    inbox_tokens = ServiceTokens(target, "inbox", secret("inbox"))
    inbox = build_inbox(inbox_config.load(common), inbox_db, service_tokens=inbox_tokens, features=(Delivery,))
    consumer = inbox.components.features[0].consumer(
        event_bus.amqp_url, event_bus.topology, retry_delay_ms=50, max_retries=1
    )
    event_bus.queues += [consumer.queue, consumer.retry_queue, consumer.parking_queue]
    publisher = BatchPublisher(event_bus.amqp_url, event_bus.topology)
    relay = OutboxRelay(cloud_db, comms.outbox_collections, publisher, lease_ttl_s=None)
    relay.ensure_indexes()
    try:
        with consumer.running():
            http = create_app(comms.components, TokenTable()).test_client()
            yield Rig(triage, direct, faxes, http, cloud_db, inbox.components, relay)
    finally:
        publisher.close()
        inbox.close()
        directory.close()
        cloud_tokens.close()
        inbox_tokens.close()
        server.stop(0)
        mongo_client.drop_database(f"{db_name}_cloud")
        mongo_client.drop_database(f"{db_name}_inbox")


def audited(db) -> list[tuple[str, str, str, str, str]]:
    """(actor, resource type, resource id, action, outcome) of every phi.accessed.v1 staged."""
    return [(a.actor_id, a.resource_type, a.resource_id, a.action, a.outcome) for _, a in staged_accesses(db)]


# --- suggestions ------------------------------------------------------------------------------------
def test_a_direct_message_with_a_ccda_gets_a_sealed_suggestion(rig):
    doc_id = rig.store_direct("Referral", [("referral.xml", "application/xml", ccda())])
    assert rig.view(doc_id).get_json()["state"] == "pending"
    assert rig.triage.triage_pass() == 1
    assert "triage_due_at" not in rig.db[DIRECT_MESSAGES].find_one({"_id": doc_id})
    assert rig.triage.triage_pass() == 0  # done once

    answer = rig.view(doc_id)
    assert answer.status_code == 200, answer.get_json()
    view = answer.get_json()
    assert (view["document_id"], view["kind"], view["state"]) == (doc_id, "direct", "suggested")
    suggestion = view["suggestion"]
    assert suggestion["patient"] == {
        "id": rig.patient_id("RB100234"),
        "name": "Maria Lopez",
        "birth_date": "1984-03-12",
        "mrn": "RB100234",
    }
    assert suggestion["confidence"] == 0.99 and sorted(suggestion["matched_on"]) == ["birth_date", "mrn", "name"]
    assert (suggestion["document_type"], suggestion["document_type_confidence"]) == ("referral", 0.97)
    assert [c["name"] for c in view["candidates"]][:1] == ["Maria Lopez"]
    assert "Ana Lopez" in [c["name"] for c in view["candidates"]]  # same family name, lower
    assert view["confirmed"] is None and view["routed_to"] is None
    assert [h["action"] for h in view["history"]] == ["suggested"]

    stored = rig.db["triage"].find_one({"_id": doc_id})
    raw = repr(stored).encode() + repr(list(rig.db[PATIENTS].find())).encode()
    for phi in (b"Maria", b"Lopez", b"RB100234", b"1984-03-12", b"Referral"):
        assert phi not in raw, phi
    assert ("stf_riverbend_wilson", "triage", doc_id, "read", "allowed") in audited(rig.db)


def test_an_xdm_package_and_the_message_body_are_read_too(rig):
    zipped = rig.store_direct(
        "Records", [("package.zip", "application/zip", xdm_zip(ccda(code="11502-2", title="Lab")))]
    )
    body_only = rig.store_direct("Question", [], text="Patient: James Carter\nDOB: 11/02/1975\nMRN: RB100871")
    assert rig.triage.triage_pass() == 2
    assert rig.view(zipped).get_json()["suggestion"]["document_type"] == "lab_report"
    carter = rig.view(body_only).get_json()["suggestion"]
    assert carter["patient"]["name"] == "James Carter" and carter["confidence"] == 0.99


def test_a_fax_pdf_text_layer_gives_a_suggestion(rig):
    doc_id = rig.store_fax(text_pdf(REFERRAL_LINES))
    assert rig.triage.triage_pass() == 1
    view = rig.view(doc_id, "thompson").get_json()
    assert (view["kind"], view["state"]) == ("fax", "suggested")
    assert view["suggestion"]["patient"]["mrn"] == "RB100234"
    assert (view["suggestion"]["confidence"], view["suggestion"]["document_type"]) == (0.99, "referral")
    assert view["suggestion"]["document_type_confidence"] == 0.95


@pytest.mark.parametrize("content", ["scan", "broken", "nobody"])
def test_a_document_that_names_nobody_is_no_match(rig, content):
    pdf = {
        "scan": text_pdf([]),  # no text layer
        "broken": b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n",
        "nobody": text_pdf(["LAB REPORT", "Patient: Minh Nguyen", "DOB: 01/01/2001"]),
    }[content]
    if content == "broken":  # the fax callback refuses it (not_a_pdf); a Direct attachment may be anything
        doc_id, collection = rig.store_direct("Labs", [("labs.pdf", "application/pdf", pdf)]), DIRECT_MESSAGES
    else:
        doc_id, collection = rig.store_fax(pdf), FAXES
    assert rig.triage.triage_pass() == 1
    view = rig.view(doc_id).get_json()
    assert view["state"] == "no_match" and view["suggestion"]["patient"] is None
    assert view["candidates"] == [] and view["history"][0]["action"] == "no_match"
    assert "triage_due_at" not in rig.db[collection].find_one({"_id": doc_id})


def test_a_document_that_cannot_be_opened_is_no_match_at_once(rig):
    doc_id = rig.store_direct("Tampered", [("r.xml", "application/xml", ccda())])
    rig.db[DIRECT_MESSAGES].update_one({"_id": doc_id}, {"$set": {"content": b"\x01\x05other"}})
    assert rig.triage.triage_pass() == 1
    assert rig.view(doc_id).get_json()["state"] == "no_match"
    assert rig.db["triage"].find_one({"_id": doc_id})["attempts"] == 1


def test_failing_tries_are_bounded(rig, monkeypatch):
    doc_id = rig.store_direct("Referral", [("r.xml", "application/xml", ccda())])

    def broken(*_args):
        raise RuntimeError("the roster is away")

    monkeypatch.setattr(rig.triage.roster, "candidates", broken)
    for attempt in range(rig.triage.settings.max_attempts):
        assert rig.triage.triage_pass() == 0
        leased = rig.db[DIRECT_MESSAGES].find_one({"_id": doc_id})["triage_due_at"]
        assert leased > 10**12  # leased, not cleared
        rig.db[DIRECT_MESSAGES].update_one({"_id": doc_id}, {"$set": {"triage_due_at": attempt}})  # lease over
    assert rig.triage.triage_pass() == 1
    view = rig.view(doc_id).get_json()
    assert view["state"] == "no_match"
    assert "triage_due_at" not in rig.db[DIRECT_MESSAGES].find_one({"_id": doc_id})


def test_a_suggestion_is_kept_when_routing_keeps_failing(rig, monkeypatch):
    assert rig.settings(routes={"referral": "team_riverbend_medical"}).status_code == 200
    doc_id = rig.store_direct("Referral", [("r.xml", "application/xml", ccda())])

    def away(*_args):
        raise Unavailable("dependency_unavailable", "directory is unavailable, try again")

    monkeypatch.setattr(rig.triage.components.directory, "team", away)
    for attempt in range(rig.triage.settings.max_attempts):
        assert rig.triage.triage_pass() == 0
        rig.db[DIRECT_MESSAGES].update_one({"_id": doc_id}, {"$set": {"triage_due_at": attempt}})  # lease over
    assert rig.triage.triage_pass() == 1
    view = rig.view(doc_id).get_json()
    assert view["state"] == "suggested" and view["suggestion"]["patient"]["name"] == "Maria Lopez"
    assert view["confirmed"] is None and view["routed_to"] is None


def test_two_workers_triage_each_document_once(rig):
    ids = [rig.store_direct(f"Referral {n}", [("r.xml", "application/xml", ccda())]) for n in range(6)]
    counts = together(rig.triage.triage_pass, rig.triage.triage_pass)
    assert sum(counts) == 6
    for doc_id in ids:
        assert [h["action"] for h in rig.view(doc_id).get_json()["history"]] == ["suggested"]


def test_the_worker_loop_triages_what_arrives(rig):
    with background(rig.triage.run):
        doc_id = rig.store_fax(text_pdf(REFERRAL_LINES))
        wait_until(lambda: rig.view(doc_id).get_json()["state"] == "suggested", timeout=15)


# --- confirm and correct ----------------------------------------------------------------------------
def test_confirm_and_correct_record_who_and_when(rig):
    doc_id = rig.store_fax(text_pdf(REFERRAL_LINES))
    rig.triage.triage_pass()
    maria, ana = rig.patient_id("RB100234"), rig.patient_id("RB101552")

    confirmed = rig.confirm(doc_id, patient_id=maria, document_type="referral")
    assert confirmed.status_code == 200, confirmed.get_json()
    view = confirmed.get_json()
    assert view["state"] == "confirmed"
    assert view["confirmed"]["patient"]["id"] == maria and view["confirmed"]["document_type"] == "referral"
    assert view["confirmed"]["by"] == {"id": "stf_riverbend_wilson", "name": "Chris Wilson"}
    assert view["confirmed"]["automatic"] is False and view["confirmed"]["at"].endswith("Z")

    corrected = rig.confirm(doc_id, "thompson", patient_id=ana, document_type="records_request").get_json()
    assert corrected["confirmed"]["patient"]["name"] == "Ana Lopez"
    assert corrected["confirmed"]["by"]["id"] == "stf_riverbend_thompson"
    assert [(h["action"], (h["by"] or {}).get("id")) for h in corrected["history"]] == [
        ("suggested", None),
        ("confirmed", "stf_riverbend_wilson"),
        ("corrected", "stf_riverbend_thompson"),
    ]
    assert corrected["suggestion"]["patient"]["id"] == maria  # the suggestion stays as it was
    assert corrected["routed_to"] is None  # no route configured
    actions = [(a[0], a[3]) for a in audited(rig.db) if a[2] == doc_id]
    assert ("stf_riverbend_wilson", "update") in actions and ("stf_riverbend_thompson", "update") in actions


def test_staff_may_file_a_document_before_the_worker_and_the_worker_keeps_it(rig):
    doc_id = rig.store_fax(text_pdf(REFERRAL_LINES))
    carter = rig.patient_id("RB100871")
    assert rig.confirm(doc_id, patient_id=carter, document_type="other").status_code == 200
    rig.triage.triage_pass()
    view = rig.view(doc_id).get_json()
    assert view["state"] == "confirmed" and view["confirmed"]["patient"]["id"] == carter
    assert view["suggestion"]["patient"]["name"] == "Maria Lopez"


def test_a_document_about_no_patient_can_be_filed_as_such(rig):
    doc_id = rig.store_fax(text_pdf(["Fax cover", "Thank you"]))
    view = rig.confirm(doc_id, patient_id=None, document_type="other").get_json()
    assert view["confirmed"]["patient"] is None and view["state"] == "confirmed"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"patient_id": {"$gt": ""}, "document_type": "referral"}, "invalid_type"),
        ({"patient_id": "pt_x", "document_type": {"$ne": ""}}, "invalid_type"),
        ({"patient_id": "pt_x", "document_type": "invoice"}, "invalid_value"),
        ({"document_type": "referral", "by": "stf_riverbend_admin"}, "unknown_field"),
        ({"patient_id": "pt_nobody", "document_type": "referral"}, "unknown_patient"),
        ({"patient_id": "pt_x"}, "missing_field"),
    ],
)
def test_bad_confirmations_are_400_and_change_nothing(rig, body, code):
    doc_id = rig.store_fax(text_pdf(REFERRAL_LINES))
    answer = rig.confirm(doc_id, **body)
    assert answer.status_code == 400 and answer.get_json()["code"] == code
    assert rig.db["triage"].find_one({"_id": doc_id}) is None


def test_only_the_staff_a_document_reached_see_or_file_its_triage(rig):
    doc_id = rig.store_fax(text_pdf(REFERRAL_LINES))
    rig.triage.triage_pass()
    maria = rig.patient_id("RB100234")
    for who in ("patel", "admin", "outsider"):  # not linked; the admin is not linked either; another agency
        assert rig.view(doc_id, who).status_code == 404
        refused = rig.confirm(doc_id, who, patient_id=maria, document_type="referral")
        assert refused.status_code == 404 and refused.get_json()["code"] == "document_not_found"
    for unknown in ("dm_nope", "fax_nope", "pt_x", "x" * 80):
        assert rig.view(unknown).get_json()["code"] == "document_not_found"
    assert rig.http.get(f"/api/v1/cloud/triage/{doc_id}").status_code == 401
    assert ("stf_riverbend_patel", "triage", doc_id, "read", "denied") in audited(rig.db)
    assert rig.db["triage"].find_one({"_id": doc_id})["history"][-1]["action"] == "suggested"


# --- routing ----------------------------------------------------------------------------------------
def test_a_confident_document_of_a_routed_type_is_filed_and_routed_to_the_team(rig):
    assert rig.settings(routes={"referral": "team_riverbend_medical"}).status_code == 200
    doc_id = rig.store_direct("Referral for Maria", [("referral.xml", "application/xml", ccda())])
    rig.triage.triage_pass()
    view = rig.view(doc_id).get_json()
    assert view["state"] == "confirmed"
    assert view["confirmed"]["automatic"] is True and view["confirmed"]["by"] is None
    assert view["routed_to"] == {"team_id": "team_riverbend_medical", "team_name": "Medical"}
    assert [h["action"] for h in view["history"]] == ["suggested", "filed_automatically", "routed"]

    assert rig.relay.run_once() >= 2  # the original delivery and the routed one
    for member in MEDICAL:
        item = wait_until(lambda m=member: rig.cloud_items(m), message=f"{member}'s routed item")[0]
        assert item["title"] == "Referral: Direct: Referral for Maria"
        assert item["summary"] == "Referral · filed automatically"
    opened = rig.inbox.features[0].detail(person("stf_riverbend_chen"), rig.cloud_items("stf_riverbend_chen")[0])
    assert (opened["source"], opened["source_ref"]) == ("triage", doc_id)
    assert opened["links"] == [{"label": "Open message", "url": f"https://clinic.example/api/v1/cloud/direct/{doc_id}"}]
    # The team can now open the document and its triage; others still cannot.
    assert rig.view(doc_id, "reyes").status_code == 200
    assert rig.http.get(f"/api/v1/cloud/direct/{doc_id}", headers=bearer("reyes")).status_code == 200
    assert rig.view(doc_id, "patel").status_code == 404
    assert rig.cloud_items("stf_riverbend_patel") == []

    # Confirming the same type again routes nothing more.
    again = rig.confirm(doc_id, "reyes", patient_id=view["confirmed"]["patient"]["id"], document_type="referral")
    assert [h["action"] for h in again.get_json()["history"]][-1] == "confirmed"
    assert not rig.db["triage"].find_one({"_id": doc_id}).get("_outbox")  # no delivery staged


def test_below_the_threshold_nothing_is_filed_until_staff_confirm(rig):
    assert rig.settings(routes={"referral": "team_riverbend_medical"}).status_code == 200
    # Name and birth date but no MRN: 0.9, below the agency's 0.95.
    doc_id = rig.store_fax(text_pdf(["REFERRAL FOR CONSULTATION", "Patient: Maria Lopez", "DOB: 03/12/1984"]))
    rig.triage.triage_pass()
    view = rig.view(doc_id).get_json()
    assert view["state"] == "suggested" and view["suggestion"]["confidence"] == 0.9
    assert view["confirmed"] is None and view["routed_to"] is None

    filed = rig.confirm(doc_id, patient_id=view["suggestion"]["patient"]["id"], document_type="referral").get_json()
    assert filed["routed_to"]["team_id"] == "team_riverbend_medical"
    assert [h["action"] for h in filed["history"]] == ["suggested", "confirmed", "routed"]
    rig.relay.run_once()
    wait_until(lambda: rig.cloud_items("stf_riverbend_chen"), message="the routed item")


def test_a_correction_to_another_type_moves_the_item_to_that_team(rig):
    assert (
        rig.settings(routes={"referral": "team_riverbend_medical", "lab_report": "team_riverbend_intake"}).status_code
        == 200
    )
    doc_id = rig.store_direct("Referral for Maria", [("referral.xml", "application/xml", ccda())])
    rig.triage.triage_pass()
    rig.relay.run_once()
    wait_until(lambda: rig.cloud_items("stf_riverbend_reyes"), message="the medical team's item")

    maria = rig.patient_id("RB100234")
    moved = rig.confirm(doc_id, "reyes", patient_id=maria, document_type="lab_report").get_json()
    assert moved["routed_to"]["team_id"] == "team_riverbend_intake"
    assert [h["action"] for h in moved["history"]][-2:] == ["corrected", "routed"]
    rig.relay.run_once()
    item = wait_until(
        lambda: [i for i in rig.cloud_items("stf_riverbend_garcia") if i["title"].startswith("Lab report: ")],
        message="the intake team's item",
    )[0]
    assert item["title"] == "Lab report: Direct: Referral for Maria"
    wait_until(lambda: rig.cloud_items("stf_riverbend_reyes") == [], message="the medical team's item withdrawn")
    # Back to referral: routed again, once.
    back = rig.confirm(doc_id, "wilson", patient_id=maria, document_type="referral")
    assert back.get_json()["routed_to"]["team_id"] == "team_riverbend_medical"
    assert rig.db["triage"].find_one({"_id": doc_id})["routed"]["version"] == 3
    rig.relay.run_once()
    wait_until(lambda: rig.cloud_items("stf_riverbend_reyes"), message="the medical team's item again")


def test_a_team_deleted_since_it_was_chosen_routes_nothing_and_says_so(rig):
    assert rig.settings(routes={"referral": "team_riverbend_medical"}).status_code == 200
    rig.db["triage_settings"].update_one({"_id": RIVERBEND}, {"$set": {"routes": {"referral": "team_gone"}}})
    doc_id = rig.store_direct("Referral", [("referral.xml", "application/xml", ccda())])
    rig.triage.triage_pass()
    view = rig.view(doc_id).get_json()
    assert view["state"] == "confirmed" and view["routed_to"] is None
    assert view["history"][-1]["action"] == "not_routed" and view["history"][-1]["team_id"] == "team_gone"
    assert not rig.db["triage"].find_one({"_id": doc_id}).get("_outbox")


# --- settings ---------------------------------------------------------------------------------------
def test_triage_settings_are_for_admins(rig):
    default = rig.http.get("/api/v1/cloud/triage/settings", headers=bearer("admin"))
    assert default.get_json() == {"routes": {}, "auto_file_confidence": 0.95, "mrn_assigning_authorities": []}
    changed = rig.settings(
        routes={"lab_report": "team_riverbend_medical"},
        auto_file_confidence=0.98,
        mrn_assigning_authorities=[RIVERBEND_MRN_ROOT],
    )
    assert changed.get_json() == {
        "routes": {"lab_report": "team_riverbend_medical"},
        "auto_file_confidence": 0.98,
        "mrn_assigning_authorities": [RIVERBEND_MRN_ROOT],
    }
    assert rig.http.get("/api/v1/cloud/triage/settings", headers=bearer("admin")).get_json() == changed.get_json()
    assert rig.http.get("/api/v1/cloud/triage/settings", headers=bearer("lakeside_admin")).get_json()["routes"] == {}
    for who in ("wilson", "reyes"):
        assert rig.http.get("/api/v1/cloud/triage/settings", headers=bearer(who)).status_code == 403
        refused = rig.settings(who, routes={})
        assert refused.status_code == 403 and refused.get_json()["code"] == "admin_only"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"routes": {"referral": "team_lakeside_clinical"}}, "unknown_team"),  # another agency's team
        ({"routes": {"referral": "team_nope"}}, "unknown_team"),
        ({"routes": {"invoice": "team_riverbend_medical"}}, "invalid_value"),
        ({"routes": {"referral": {"$gt": ""}}}, "invalid_type"),
        ({"routes": ["referral"]}, "invalid_type"),
        ({"auto_file_confidence": 0.5}, "out_of_range"),
        ({"auto_file_confidence": True}, "invalid_type"),
        ({"auto_file_confidence": "0.99"}, "invalid_type"),
        ({"threshold": 0.99}, "unknown_field"),
        ({"mrn_assigning_authorities": ["riverbend"]}, "invalid_value"),
        ({"mrn_assigning_authorities": ["2.16.840.1.113883.19.05"]}, "invalid_value"),  # no leading zeros
        ({"mrn_assigning_authorities": ["urn:oid:2.16.840.1"]}, "invalid_value"),
        ({"mrn_assigning_authorities": RIVERBEND_MRN_ROOT}, "invalid_type"),
        ({"mrn_assigning_authorities": [{"$gt": ""}]}, "invalid_type"),
    ],
)
def test_bad_settings_are_400_and_keep_the_old_ones(rig, body, code):
    answer = rig.settings(**body)
    assert answer.status_code == 400 and answer.get_json()["code"] == code, answer.get_json()
    assert rig.db["triage_settings"].find_one({"_id": RIVERBEND}) is None


# --- the roster -------------------------------------------------------------------------------------
def test_the_demo_roster_is_seeded_once_and_searchable_without_decrypting_it(rig):
    assert rig.db[PATIENTS].count_documents({"agency_id": RIVERBEND}) == 4
    assert rig.triage.roster.seed_demo() == {"created": 0, "updated": 0, "unchanged": 5}

    def names(q: str, who: str = "wilson") -> list[str]:
        answer = rig.http.get("/api/v1/cloud/patients", query_string={"q": q}, headers=bearer(who))
        assert answer.status_code == 200, answer.get_json()
        return [p["name"] for p in answer.get_json()["patients"]]

    assert names("lop") == ["Ana Lopez", "Maria Lopez"]
    assert names("Maria Lop") == ["Maria Lopez"]
    assert names("LOPEZ, ANA") == ["Ana Lopez"]
    assert names("rb-100871") == ["James Carter"]
    assert names("demo") == ["Jane Demo-Client"]
    assert names("client jane") == ["Jane Demo-Client"]
    assert names("nguyen") == [] and names("RB999999") == []
    assert names("lee", "outsider") == ["Lee Demo-Patient"] and names("lopez", "outsider") == []
    searches = [a for a in audited(rig.db) if a[3] == "search"]
    assert ("stf_riverbend_wilson", "patient", "patients", "search", "allowed") in searches
    assert any(a[2].startswith("pt_") for a in searches)  # each patient shown is named


@pytest.mark.parametrize("q", ['{"$gt": ""}', "", "   ", "a" * 101, "x; drop", "<script>"])
def test_a_bad_search_is_400(rig, q):
    answer = rig.http.get("/api/v1/cloud/patients", query_string={"q": q}, headers=bearer("wilson"))
    assert answer.status_code == 400 and answer.get_json()["code"] == "invalid_query"


def test_admins_import_the_roster_by_mrn(rig):
    patients = [
        {"mrn": "RB200001", "family": "O'Connor", "given": "Siobhan", "birth_date": "1992-02-29"},
        {"mrn": "RB100234", "family": "Lopez-Garcia", "given": "Maria", "birth_date": "1984-03-12"},  # renamed
    ]
    answer = rig.http.post("/api/v1/cloud/patients", json={"patients": patients}, headers=bearer("admin"))
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json() == {"imported": 2, "created": 1, "updated": 1, "unchanged": 0}
    found = rig.http.get("/api/v1/cloud/patients", query_string={"q": "garcia"}, headers=bearer("wilson"))
    assert [p["name"] for p in found.get_json()["patients"]] == ["Maria Lopez-Garcia"]
    assert rig.patient_id("oconnor") == rig.patient_id("RB200001")
    # The renamed patient kept its id and lost the old name's keys that no longer apply.
    assert rig.patient_id("RB100234") == rig.patient_id("Maria Lopez")
    assert rig.db[PATIENTS].count_documents({"agency_id": RIVERBEND}) == 5
    raw = repr(list(rig.db[PATIENTS].find())).encode() + repr(list(rig.db[NAME_KEYS].find())).encode()
    assert b"Siobhan" not in raw and b"RB200001" not in raw and b"1992-02-29" not in raw


@pytest.mark.parametrize(
    ("who", "body", "status", "code"),
    [
        (
            "wilson",
            {"patients": [{"mrn": "X1", "family": "A", "given": "B", "birth_date": "1990-01-01"}]},
            403,
            "admin_only",
        ),
        (
            "admin",
            {"patients": [{"mrn": {"$gt": ""}, "family": "A", "given": "B", "birth_date": "1990-01-01"}]},
            400,
            "invalid_type",
        ),
        (
            "admin",
            {"patients": [{"mrn": "X1", "family": "A", "given": "B", "birth_date": "01/01/1990"}]},
            400,
            "invalid_birth_date",
        ),
        (
            "admin",
            {"patients": [{"mrn": "X1", "family": "A", "given": "B", "birth_date": "2990-01-01"}]},
            400,
            "invalid_birth_date",
        ),
        ("admin", {"patients": [{"mrn": "X1", "family": "A", "birth_date": "1990-01-01"}]}, 400, "missing_field"),
        (
            "admin",
            {"patients": [{"mrn": "$where", "family": "A", "given": "B", "birth_date": "1990-01-01"}]},
            400,
            "invalid_value",
        ),
        ("admin", {"patients": []}, 400, "invalid_value"),
        ("admin", {"patients": {"$gt": ""}}, 400, "invalid_type"),
    ],
)
def test_bad_imports_are_refused_and_store_nothing(rig, who, body, status, code):
    before = rig.db[PATIENTS].count_documents({})
    answer = rig.http.post("/api/v1/cloud/patients", json=body, headers=bearer(who))
    assert answer.status_code == status and answer.get_json()["code"] == code
    assert rig.db[PATIENTS].count_documents({}) == before


# --- documents that must not be filed without a person ----------------------------------------------
def suggested_only(rig, doc_id: str) -> dict:
    """The document's suggestion, after asserting it was neither filed nor routed."""
    view = rig.view(doc_id).get_json()
    assert view["state"] == "suggested", view
    assert view["confirmed"] is None and view["routed_to"] is None
    assert [h["action"] for h in view["history"]] == ["suggested"]
    assert not rig.db["triage"].find_one({"_id": doc_id}).get("_outbox")
    return view["suggestion"]


def test_a_lab_fax_about_two_patients_is_never_filed_under_the_first(rig):
    assert rig.settings(routes={"lab_report": "team_riverbend_medical"}, auto_file_confidence=0.9).status_code == 200
    doc_id = rig.store_fax(text_pdf(LAB_PAGE_LOPEZ, LAB_PAGE_CARTER))
    rig.triage.triage_pass()
    suggestion = suggested_only(rig, doc_id)
    assert suggestion["patient"]["name"] == "Maria Lopez" and suggestion["confidence"] < 0.9
    assert suggestion["multiple_patients"] is True and "multiple_patients" in suggestion["reasons"]
    assert suggestion["document_type"] == "lab_report"
    assert "James Carter" in [c["name"] for c in rig.view(doc_id).get_json()["candidates"]]


def test_a_direct_ccda_for_one_patient_with_a_pdf_about_another_is_not_filed(rig):
    assert rig.settings(routes={"referral": "team_riverbend_medical"}).status_code == 200
    carter = text_pdf(["LAB REPORT", "Patient: James Carter", "DOB: 11/02/1975", "MRN: RB100871"])
    doc_id = rig.store_direct(
        "Referral", [("referral.xml", "application/xml", ccda()), ("labs.pdf", "application/pdf", carter)]
    )
    rig.triage.triage_pass()
    suggestion = suggested_only(rig, doc_id)
    assert suggestion["patient"]["name"] == "Maria Lopez" and suggestion["confidence"] < 0.9
    assert suggestion["reasons"] == ["multiple_patients"]


def test_a_fax_longer_than_the_pages_read_is_not_filed(rig):
    assert rig.settings(routes={"referral": "team_riverbend_medical"}).status_code == 200
    pages = [REFERRAL_LINES, *([f"Progress note page {n}"] for n in range(2, 32))]  # 31 pages; 30 are read
    doc_id = rig.store_fax(text_pdf(*pages))
    rig.triage.triage_pass()
    suggestion = suggested_only(rig, doc_id)
    assert suggestion["patient"]["name"] == "Maria Lopez" and suggestion["confidence"] < 0.9
    assert suggestion["reasons"] == ["partly_read"]


def test_a_juniors_referral_with_his_fathers_dob_as_guarantor_is_not_matched_to_the_father(rig):
    assert rig.settings(routes={"referral": "team_riverbend_medical"}, auto_file_confidence=0.9).status_code == 200
    doc_id = rig.store_fax(text_pdf(FACE_SHEET_JUNIOR))
    rig.triage.triage_pass()
    suggestion = suggested_only(rig, doc_id)
    assert suggestion["confidence"] < 0.9 and "birth_date" not in suggestion["matched_on"]
    assert "suffix_not_in_roster" in suggestion["reasons"]


def test_a_test_fax_is_suggested_but_never_filed_or_routed(rig):
    assert rig.settings(routes={"referral": "team_riverbend_medical"}).status_code == 200
    doc_id = rig.store_fax(text_pdf(REFERRAL_LINES), is_test=True)
    assert rig.db[FAXES].find_one({"_id": doc_id})["is_test"] is True
    rig.triage.triage_pass()
    suggestion = suggested_only(rig, doc_id)
    assert suggestion["confidence"] == 0.99 and suggestion["reasons"] == ["test_fax"]
    confirmed = rig.confirm(doc_id, patient_id=suggestion["patient"]["id"], document_type="referral").get_json()
    assert confirmed["state"] == "confirmed" and confirmed["routed_to"] is None
    assert [h["action"] for h in confirmed["history"]] == ["suggested", "confirmed", "not_routed"]
    assert not rig.db["triage"].find_one({"_id": doc_id}).get("_outbox")
    assert rig.cloud_items("stf_riverbend_chen") == []


def test_a_partner_hospitals_mrn_equal_to_another_patients_does_not_demote_the_right_one(rig):
    foreign = ccda(ids=[(FOREIGN_MRN_ROOT, "RB100871")])  # Maria's C-CDA; the partner's number = Carter's MRN
    unset = rig.store_direct("Referral", [("r.xml", "application/xml", foreign)])
    rig.triage.triage_pass()
    suggestion = rig.view(unset).get_json()["suggestion"]
    assert suggestion["patient"]["name"] == "Maria Lopez" and suggestion["confidence"] == 0.9
    assert suggestion["reasons"] == []

    assert rig.settings(routes={"referral": "team_riverbend_medical"}).status_code == 200
    named = rig.settings(mrn_assigning_authorities=[RIVERBEND_MRN_ROOT]).get_json()
    assert named["mrn_assigning_authorities"] == [RIVERBEND_MRN_ROOT]
    both = ccda(ids=[(RIVERBEND_MRN_ROOT, "RB100234"), (FOREIGN_MRN_ROOT, "RB100871")])
    filed = rig.store_direct("Referral", [("r.xml", "application/xml", both)])
    only_foreign = rig.store_direct(
        "Referral", [("r.xml", "application/xml", ccda(ids=[(FOREIGN_MRN_ROOT, "RB100234")]))]
    )
    rig.triage.triage_pass()
    view = rig.view(filed).get_json()
    assert view["state"] == "confirmed" and view["suggestion"]["confidence"] == 0.99
    assert view["confirmed"]["patient"]["name"] == "Maria Lopez"
    ignored = rig.view(only_foreign).get_json()["suggestion"]  # another authority's id is not an MRN here
    assert ignored["confidence"] == 0.9 and "mrn" not in ignored["matched_on"]


def test_a_ccd_is_never_routed_as_a_referral_by_its_code(rig):
    assert rig.settings(routes={"referral": "team_riverbend_medical"}).status_code == 200
    doc_id = rig.store_direct(
        "Summary of care", [("ccd.xml", "application/xml", ccda(code="34133-9", title="Summarization of Episode Note"))]
    )
    rig.triage.triage_pass()
    view = rig.view(doc_id).get_json()
    assert view["state"] == "suggested" and view["confirmed"] is None
    assert view["suggestion"]["document_type"] != "referral" or view["suggestion"]["document_type_confidence"] < 0.9
