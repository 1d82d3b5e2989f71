"""eFax against the real database: a signed Phaxio callback through cloud-comms' HTTP app (Flask test
client) is stored sealed with its delivery staged, one item however often it is retried; refused
callbacks store nothing; the staff view and PDF answer only the staff it was delivered to, audited.

Directory is the one stand-in (a small table of fax numbers, as notifications' integration tests do);
the callbacks are built and signed by the fax simulator's own code (services/fax_simulator)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from dataclasses import dataclass
from io import BytesIO

import pypdf
import pytest

from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.cloud_comms import config
from services.cloud_comms.components import Components
from services.cloud_comms.fax.feature import FAX_CHUNKS, FAXES, Faxes, fax_doc_id
from services.cloud_comms.http_api import create_app
from services.cloud_comms.store import CloudCommsStore
from services.fax_simulator.app import sign
from services.fax_simulator.pdf import SAMPLE_LINES, sample_pdf
from services.kit.auth import Identity, current_identity
from services.kit.bootstrap import phi_cipher
from services.kit.events import unpack
from tests.helpers import staged_accesses
from tests.waits import Worker

RIVERBEND, LAKESIDE = "agy_riverbend", "agy_lakeside"
INTAKE_NUMBER, LAKESIDE_NUMBER = "+15555550199", "+15555550288"
CALLER = "+15555550123"
TOKEN = "test-callback-token"
PUBLIC = "https://clinic.example/api/v1/fax/callbacks"
RECEIVED_URL = f"{PUBLIC}/received"
CALLBACK_PATH = "/api/v1/fax/callbacks/received"


def _encrypted_pdf() -> bytes:
    writer = pypdf.PdfWriter()
    writer.add_blank_page(612, 792)
    writer.encrypt("secret")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


ENCRYPTED_PDF = _encrypted_pdf()


@dataclass(frozen=True)
class Address:
    agency_id: str
    address_id: str
    staff_ids: tuple[str, ...]
    label: str = ""


class DirectoryStandIn:
    """resolve_address as cloud-comms' DirectoryClient answers it, and the agency's time zone."""

    def __init__(self):
        self.numbers = {
            INTAKE_NUMBER: Address(RIVERBEND, "cad_intake", ("stf_patel", "stf_davis"), "Intake fax"),
            LAKESIDE_NUMBER: Address(LAKESIDE, "cad_lake", ("stf_baker",), "Front desk"),
        }
        self.calls: list[tuple[str, str]] = []

    def resolve_address(self, kind, address):
        self.calls.append((kind, address))
        return self.numbers.get(address) if kind == "fax" else None

    def agency_settings(self, agency_id):
        identity = current_identity.get()
        assert identity is not None and identity.agency_id == agency_id
        return type("AgencySettings", (), {"time_zone": "America/Chicago"})()


class ServiceIdentities:
    def identity(self, agency_id: str = "") -> Identity:
        return Identity(subject="svc:cloud-comms", agency_id=agency_id, roles=frozenset({"service"}), kind="service")


def staff(staff_id: str, agency: str = RIVERBEND) -> Identity:
    return Identity(subject=staff_id, agency_id=agency, roles=frozenset({"staff"}))


class TokenTable:
    def __init__(self, **identities):
        self.identities = identities

    def verify(self, token):
        return self.identities[token]


@pytest.fixture
def directory():
    return DirectoryStandIn()


@pytest.fixture
def setup(mongo_client, db_name, directory):
    master = base64.b64encode(os.urandom(32)).decode()
    settings = config.load(
        {
            "MONGO_URI": "mongodb://unused:1",
            "PHI_MASTER_KEYS": f"m:{master}",
            "AMQP_URL": "amqp://unused/",
            "CLOUD_FAX_CALLBACK_TOKEN": TOKEN,
            "CLOUD_FAX_PUBLIC_CALLBACK_URL": PUBLIC,
            "CLOUD_FAX_MAX_PDF_BYTES": str(64 * 1024),
            "CLOUD_COMMS_PUBLIC_URL": "https://clinic.example",
            "CLOUD_COMMS_MAX_REQUEST_BYTES": str(16 * 1024),  # the service's JSON bodies: far below a fax
        }
    )
    db = mongo_client[db_name]
    store = CloudCommsStore(db)
    store.ensure_indexes()
    components = Components(
        settings=settings,
        store=store,
        cipher=phi_cipher(db, settings.common),
        directory=directory,
        service_tokens=ServiceIdentities(),
    )
    feature = Faxes(components)
    feature.ensure_indexes()
    components.features = [feature]
    tokens = TokenTable(
        patel=staff("stf_patel"), davis=staff("stf_davis"), hall=staff("stf_hall"), baker=staff("stf_baker", LAKESIDE)
    )
    return db, create_app(components, tokens).test_client()


def callback(
    fax_id=40000001, *, to=INTAKE_NUMBER, pdf=None, pages=2, token=TOKEN, url=RECEIVED_URL, fax=None, part="filename"
):
    """(form data, headers) of a received-fax callback as Phaxio sends it, signed with `token` over `url`."""
    fax_object = fax or {
        "id": fax_id,
        "direction": "received",
        "num_pages": pages,
        "status": "success",
        "is_test": False,
        "created_at": "2026-03-04T20:14:20Z",
        "completed_at": "2026-03-04T20:15:00Z",
        "from_number": CALLER,
        "to_number": to,
        "caller_name": "",
    }
    content = sample_pdf(pages) if pdf is None else pdf
    params = {"fax": json.dumps(fax_object), "direction": "received", "is_test": "false", "success": "true"}
    headers = {"X-Phaxio-Signature": sign(token, url, params, {part: content})}
    return {**params, part: (BytesIO(content), "fax.pdf", "application/pdf")}, headers


def post(client, data_headers):
    data, headers = data_headers
    return client.post(CALLBACK_PATH, data=data, headers=headers, content_type="multipart/form-data")


def stored(db) -> list[dict]:
    return list(db[FAXES].find())


def deliveries(doc) -> list[tuple[str, Envelope, inbox_pb2.DeliverItemRequest]]:
    found = []
    for event_id, entry in (doc.get("_outbox") or {}).items():
        envelope = Envelope()
        envelope.ParseFromString(entry["env"])
        request = unpack(envelope, inbox_pb2.DeliverItemRequest)  # opens the sealed payload
        found.append((event_id, envelope, request))
    return found


def test_a_signed_callback_is_stored_sealed_with_its_delivery_staged(setup):
    db, client = setup
    answer = post(client, callback())
    assert answer.status_code == 200, answer.get_json()
    fid = fax_doc_id(RIVERBEND, "phaxio", "40000001")
    assert answer.get_json() == {"id": fid, "created": True}

    (doc,) = stored(db)
    assert doc["_id"] == fid and doc["agency_id"] == RIVERBEND
    assert doc["recipient_ids"] == ["stf_patel", "stf_davis"]
    assert (doc["pages"], doc["provider_fax_id"], doc["to_number"]) == (2, "40000001", INTAKE_NUMBER)
    assert doc["received_at"] == 1772655300000
    # nothing of the fax is readable at rest (the caller is in the board title, as asked, nowhere else)
    raw = repr({k: v for k, v in doc.items() if k != "_outbox"}).encode()
    raw += b"".join(bytes(c["data"]) for c in db[FAX_CHUNKS].find())
    assert CALLER.encode() not in raw and b"Maria Lopez" not in raw and b"%PDF" not in raw
    assert db[FAX_CHUNKS].count_documents({"fax_id": fid}) == doc["pdf_chunks"] == 1

    ((event_id, envelope, item),) = deliveries(doc)
    assert doc.get("_outbox_at"), "the delivery is due for the relay"
    assert event_id == fid and envelope.event_type == "board_item.delivery_requested.v1"
    assert (envelope.producer, envelope.agency_id) == ("cloud-comms", RIVERBEND)
    assert item.kind == inbox_pb2.DELIVERED_KIND_CLOUD
    assert (item.source, item.source_ref, item.delivery_id) == ("fax", "40000001", fid)
    assert list(item.recipients.staff_ids) == ["stf_patel", "stf_davis"]
    assert item.title == f"Fax from {CALLER}"
    assert item.summary == "2 pages · received 2026-03-04 14:15 CST"
    assert item.links[0].url == f"https://clinic.example/api/v1/cloud/faxes/{fid}"


def test_the_v2_1_file_part_name_is_taken_too(setup):
    db, client = setup
    assert post(client, callback(part="file")).status_code == 200
    assert len(stored(db)) == 1


@pytest.mark.parametrize("wrong", ["token", "url", "missing", "tampered"])
def test_a_wrong_or_missing_signature_is_refused_and_nothing_stored(setup, directory, wrong):
    db, client = setup
    if wrong == "token":
        data, headers = callback(token="not-the-token")
    elif wrong == "url":
        data, headers = callback(url="https://clinic.example/api/v1/fax/callbacks/received/")
    elif wrong == "missing":
        data, _ = callback()
        headers = {}
    else:  # signed for one number, sent for another
        _, headers = callback()
        data, _ = callback(to=LAKESIDE_NUMBER)
    answer = post(client, (data, headers))
    assert answer.status_code == 401
    assert answer.get_json()["code"] == "invalid_signature"
    assert stored(db) == [] and db[FAX_CHUNKS].count_documents({}) == 0
    assert directory.calls == [], "nothing is looked up before the signature holds"
    (event,) = db["security_events"].find({"channel": "fax", "code": "invalid_signature"})
    assert (event["count"], event["peer"]) == (1, "127.0.0.1")
    assert event["first_at"] == event["last_at"] == event["at"]


def test_a_burst_of_unsigned_callbacks_is_one_counted_security_event(setup, caplog):
    db, client = setup
    data, _ = callback()
    fields = {k: v for k, v in data.items() if k != "filename"}
    app = client.application

    def burst() -> list[int]:
        local = app.test_client()
        return [
            local.post(CALLBACK_PATH, data=fields, content_type="multipart/form-data").status_code for _ in range(50)
        ]

    caplog.set_level(logging.WARNING, logger="services.cloud_comms.store")
    workers = [Worker(burst).start() for _ in range(8)]
    answers = [status for worker in workers for status in worker.finish(120)]
    assert answers == [401] * 400
    events = list(db["security_events"].find({"channel": "fax"}))
    # one document per peer and minute (two when the burst straddles a minute), counting every refusal
    assert 1 <= len(events) <= 2 and sum(e["count"] for e in events) == 400
    assert all(e["first_at"] <= e["last_at"] and e["code"] == "invalid_signature" for e in events)
    assert len({e["minute"] for e in events}) == len(events)
    logged = [r for r in caplog.records if "inbound refused" in r.getMessage()]
    assert len(logged) == len(events), "one log line per peer and minute"
    assert stored(db) == []


def test_a_retried_callback_is_one_item(setup):
    db, client = setup
    first = post(client, callback())
    again = post(client, callback())
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.get_json() == {"id": first.get_json()["id"], "created": False}
    assert len(stored(db)) == 1
    assert len(deliveries(stored(db)[0])) == 1
    assert db[FAX_CHUNKS].count_documents({}) == 1


def test_one_provider_id_at_two_agencies_is_two_faxes(setup):
    db, client = setup
    assert post(client, callback(7)).status_code == 200
    assert post(client, callback(7, to=LAKESIDE_NUMBER)).status_code == 200
    assert sorted(d["agency_id"] for d in stored(db)) == [LAKESIDE, RIVERBEND]


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"GIF89a not a pdf", "not_a_pdf"),
        (b"%PDF-1.4 cut off before its end", "not_a_pdf"),
        (b"", "not_a_pdf"),
        (b"%PDF-1.4\n<html><body>Pay here</body></html>\n%%EOF", "not_a_pdf"),
        (b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n", "not_a_pdf"),  # no page
        (ENCRYPTED_PDF, "encrypted_pdf"),
    ],
)
def test_a_file_that_is_not_a_pdf_is_refused(setup, content, code):
    db, client = setup
    answer = post(client, callback(pdf=content))
    assert answer.status_code == 400
    assert answer.get_json()["code"] == code
    assert stored(db) == [] and db[FAX_CHUNKS].count_documents({}) == 0


def test_a_callback_without_its_pdf_is_refused(setup):
    db, client = setup
    params = {"fax": json.dumps({"id": 5, "direction": "received", "num_pages": 1, "to_number": INTAKE_NUMBER})}
    answer = client.post(
        CALLBACK_PATH,
        data=params,
        headers={"X-Phaxio-Signature": sign(TOKEN, RECEIVED_URL, params, {})},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 400 and answer.get_json()["code"] == "missing_field"
    assert stored(db) == []


def test_an_oversize_pdf_is_refused(setup):
    db, client = setup
    big = sample_pdf(1)
    big = big[:-6] + b"%" + b"x" * (70 * 1024) + b"\n%%EOF\n"  # over the 64 KiB limit of this test
    answer = post(client, callback(pdf=big))
    assert answer.status_code == 413
    assert answer.get_json()["code"] == "fax_too_large"
    assert stored(db) == []


def test_a_body_far_over_the_limit_is_refused_before_it_is_read(setup):
    db, client = setup
    huge = b"%PDF-1.4\n" + b"0" * (2 * 1024 * 1024) + b"\n%%EOF\n"
    answer = post(client, callback(pdf=huge))
    assert answer.status_code == 413
    assert stored(db) == []


def test_a_pdf_larger_than_the_services_json_limit_is_taken(setup):
    db, client = setup
    pdf = sample_pdf(1, "\n".join(["A long line of text that makes the page larger."] * 800))
    assert 16 * 1024 < len(pdf) < 64 * 1024  # over the 16 KiB JSON limit, under the 64 KiB fax one
    answer = post(client, callback(pdf=pdf))
    assert answer.status_code == 200, answer.get_json()


def test_an_unknown_number_is_404_and_nothing_stored(setup):
    db, client = setup
    answer = post(client, callback(to="+15555550000"))
    assert answer.status_code == 404
    assert answer.get_json()["code"] == "unknown_number"
    assert stored(db) == [] and db[FAX_CHUNKS].count_documents({}) == 0


@pytest.mark.parametrize(
    "fax",
    [
        {"id": 9, "direction": "received", "num_pages": 1, "to_number": {"$ne": ""}, "from_number": CALLER},
        {"id": {"$gt": 0}, "direction": "received", "num_pages": 1, "to_number": INTAKE_NUMBER},
        {"id": 9, "direction": "received", "num_pages": {"$gt": 1}, "to_number": INTAKE_NUMBER},
        {"id": 9, "direction": "received", "num_pages": 1, "to_number": INTAKE_NUMBER, "from_number": {"$where": "1"}},
        {"$where": "sleep(1000)", "id": 9, "to_number": {"$regex": ".*"}},
    ],
)
def test_operator_objects_in_the_fax_json_are_refused_before_any_look_up(setup, directory, fax):
    db, client = setup
    answer = post(client, callback(fax=fax))  # correctly signed: the provider's account is not the only risk
    assert answer.status_code == 400
    assert answer.get_json()["code"] == "invalid_fax"
    assert directory.calls == [] and stored(db) == []


def test_the_fax_and_its_pdf_are_shown_to_the_staff_it_reached_only(setup):
    db, client = setup
    fid = post(client, callback()).get_json()["id"]

    view = client.get(f"/api/v1/cloud/faxes/{fid}", headers={"Authorization": "Bearer davis"})
    assert view.status_code == 200, view.get_json()
    body = view.get_json()
    assert (body["from_number"], body["to_number"], body["pages"]) == (CALLER, INTAKE_NUMBER, 2)
    assert body["received_at"] == "2026-03-04T20:15:00.000Z"
    pdf = client.get(body["pdf_url"], headers={"Authorization": "Bearer patel"})
    assert pdf.status_code == 200
    assert pdf.mimetype == "application/pdf"
    assert pdf.data == sample_pdf(2) and all(line.encode() in pdf.data for line in SAMPLE_LINES)
    assert pdf.headers["Cache-Control"] == "no-store"

    for who in ("hall", "baker"):  # same agency but not linked; another agency
        for path in (f"/api/v1/cloud/faxes/{fid}", f"/api/v1/cloud/faxes/{fid}/pdf"):
            refused = client.get(path, headers={"Authorization": f"Bearer {who}"})
            assert refused.status_code == 404 and refused.get_json()["code"] == "fax_not_found"
    assert client.get(f"/api/v1/cloud/faxes/{fid}").status_code == 401
    assert client.get("/api/v1/cloud/faxes/fax_nope", headers={"Authorization": "Bearer patel"}).status_code == 404

    outcomes = []
    for envelope, accessed in staged_accesses(db):
        assert envelope.event_type == "phi.accessed.v1" and accessed.service == "cloud-comms"
        outcomes.append((accessed.actor_id, accessed.resource_id, accessed.action, accessed.outcome))
    assert ("stf_davis", fid, "read", "allowed") in outcomes
    assert ("stf_patel", fid, "download", "allowed") in outcomes
    assert ("stf_hall", fid, "read", "denied") in outcomes
    assert sum(1 for o in outcomes if o[3] == "denied") == 5  # hall x2, baker x2, the unknown id
