"""Send Fax from the board, over real sockets: cloud-comms (its features, built by its own build())
served over HTTP on a port, the fax simulator served the same way as the provider, the real
database; the `fax-sender` worker runs as the process runs it. The simulator's status callbacks
reach cloud-comms over HTTP; the callbacks a test posts itself are signed here, step by step from
Phaxio's documentation, not with the service's (or the simulator's) code. The board part runs the
outbox relay into RabbitMQ and inbox's delivery consumer.

Directory is the one stand-in (numbers and their linked staff, as directory resolves them)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.cloud_comms import config, devcerts
from services.cloud_comms.directory_client import CloudAddress
from services.cloud_comms.fax.feature import FAX_CHUNKS, FAXES, OUTBOUND_FAXES, Faxes
from services.cloud_comms.http_api import create_app
from services.cloud_comms.service import build
from services.fax_simulator.app import Simulator
from services.fax_simulator.app import create_app as simulator_app
from services.fax_simulator.pdf import sample_pdf
from services.inbox import domain
from services.inbox.board import ItemFilter
from services.inbox.delivery import Delivery
from services.kit.auth import Identity
from services.kit.bus import BatchPublisher
from services.kit.embedded_mongo import free_port
from services.kit.events import unpack
from services.kit.outbox import OutboxRelay
from services.kit.runtime import ServiceProcess
from services.kit.service_identity import IssuedToken, ServiceTokens
from tests.cloud_direct_helpers import CCDA, RIVERBEND_INTAKE, direct_message, send
from tests.helpers import staged_accesses
from tests.integration.conftest import own_inbox
from tests.integration.inbox_fixtures import AgencyTable
from tests.integration.inbox_fixtures import staff as inbox_staff
from tests.waits import Worker, wait_until

RIVERBEND, LAKESIDE = "agy_riverbend", "agy_lakeside"
MAIN, BILLING, LAKE = "+15555550100", "+15555550111", "+15555550288"
TO = "+15555550177"
TOKEN, KEY, SECRET = "test-callback-token", "test-api-key", "test-api-secret"
MAX_PDF = 64 * 1024
NO_PAGE_PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"  # parses, but has no page


def documented_signature(token: str, url: str, params: dict[str, str], files: dict[str, bytes]) -> str:
    """Phaxio's callback signature, its documented steps one by one."""
    text = url  # the callback URL exactly as configured
    for name in sorted(params):  # POST parameters sorted by name, name + value, no delimiter
        text += name + params[name]
    for name in sorted(files):  # file parts sorted by name: name + hex SHA-1 of the contents
        text += name + hashlib.sha1(files[name]).hexdigest()
    return hmac.new(token.encode(), text.encode(), hashlib.sha1).hexdigest()  # HMAC-SHA1, hex


class Directory:
    """resolve_address as directory answers it, and the numbers linked to a staff member."""

    def __init__(self):
        self.addresses = [
            CloudAddress("fax", MAIN, RIVERBEND, "cad_main", ("stf_patel", "stf_davis"), "Main fax"),
            CloudAddress("fax", BILLING, RIVERBEND, "cad_billing", ("stf_davis",), "Billing fax"),
            CloudAddress("fax", LAKE, LAKESIDE, "cad_lake", ("stf_baker",), "Front desk"),
            CloudAddress("direct", RIVERBEND_INTAKE, RIVERBEND, "cad_intake", ("stf_patel",), "Intake"),
        ]

    def resolve_address(self, kind, address):
        return next((a for a in self.addresses if (a.kind, a.address) == (kind, address.lower())), None)

    def linked_addresses(self, kind, agency_id, staff_id):
        return [a for a in self.addresses if a.kind == kind and a.agency_id == agency_id and staff_id in a.staff_ids]


class ServiceIdentities:
    def identity(self, agency_id: str = "") -> Identity:
        return Identity(subject="svc:cloud-comms", agency_id=agency_id, roles=frozenset({"service"}), kind="service")


def person(staff_id: str, agency: str = RIVERBEND) -> Identity:
    return Identity(subject=staff_id, agency_id=agency, roles=frozenset({"staff"}), name=staff_id.title())


class Tokens:
    """The verifier: bearer token = the staff id (each test's staff, as directory's tokens name them)."""

    people = {s: person(s) for s in ("stf_patel", "stf_davis", "stf_hall")} | {
        "stf_baker": person("stf_baker", LAKESIDE)
    }

    def verify(self, token):
        return self.people[token]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("direct-certs")
    devcerts.ensure(directory)
    return directory


@dataclass
class Place:
    url: str  # cloud-comms
    simulator_url: str
    simulator: Simulator
    db: object
    comms: object
    smtp_port: int

    @property
    def faxes(self) -> Faxes:
        return self.comms.components.feature(Faxes)

    def post(self, who: str, body: dict, key: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {who}"} | ({"Idempotency-Key": key} if key is not None else {})
        return requests.post(f"{self.url}/api/v1/cloud/faxes/outbound", json=body, headers=headers, timeout=30)

    def get(self, who: str, path: str) -> requests.Response:
        return requests.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {who}"}, timeout=30)

    def view(self, fid: str, who: str = "stf_patel") -> dict:
        reply = self.get(who, f"/api/v1/cloud/faxes/outbound/{fid}")
        assert reply.status_code == 200, reply.text
        return reply.json()

    def status_of(self, fid: str) -> str:
        return self.db[OUTBOUND_FAXES].find_one({"_id": fid})["status"]

    def fault(self, **fault) -> None:
        reply = requests.post(f"{self.simulator_url}/simulator/faults", json=fault, timeout=10)
        assert reply.status_code == 201, reply.text

    def sent(self) -> list[dict]:
        return requests.get(f"{self.simulator_url}/simulator/state", timeout=10).json()["sent"]

    def callback(self, params: dict[str, str], signature: str | None = None) -> requests.Response:
        """A status callback posted as Phaxio posts it (multipart), signed over the status URL."""
        url = f"{self.url}/api/v1/fax/callbacks/status"
        headers = {"X-Phaxio-Signature": signature or documented_signature(TOKEN, url, params, {})}
        return requests.post(url, files={k: (None, v) for k, v in params.items()}, headers=headers, timeout=30)


class Served:
    """A WSGI app on a real HTTP port (werkzeug's threaded server: stops cleanly from another thread)."""

    def __init__(self, app, port: int = 0):
        self.server = make_server("127.0.0.1", port, app, threaded=True)
        self.port = self.server.server_port
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name=f"http-{self.port}", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


@pytest.fixture
def place_factory(mongo_client, db_name, certs):
    processes: list[ServiceProcess] = []
    servers: list[Served] = []
    simulators: list[Simulator] = []

    def make(
        *, step_s: float = 0.05, api_url: str | None = None, sender: bool = True, attempts: int = 3, api_key: str = KEY
    ) -> Place:
        comms_port, smtp_port = free_port(), free_port()
        public = f"http://127.0.0.1:{comms_port}/api/v1/fax/callbacks"
        simulator = Simulator(
            callback_token=TOKEN,
            api_key=KEY,
            api_secret=SECRET,
            received_url=f"{public}/received",
            status_url=f"{public}/status",
            step_s=step_s,
        )
        simulators.append(simulator)
        process = ServiceProcess("fax-outbound-test")  # runs the service's workers and listeners
        processes.append(process)
        servers.append(Served(simulator_app(simulator)))
        simulator_port = servers[-1].port
        master = base64.b64encode(os.urandom(32)).decode()
        settings = config.load(
            {
                "MONGO_URI": "mongodb://unused:1",
                "PHI_MASTER_KEYS": f"m:{master}",
                "AMQP_URL": "amqp://unused/",
                "CLINIC_RUN_DIR": str(certs.parent),
                "CLOUD_DIRECT_CERTS_DIR": str(certs),
                "CLOUD_SMTP_PORT": str(smtp_port),
                "CLOUD_COMMS_PUBLIC_URL": "https://clinic.example",
                "CLOUD_FAX_CALLBACK_TOKEN": TOKEN,
                "CLOUD_FAX_API_URL": api_url or f"http://127.0.0.1:{simulator_port}/v2",
                "CLOUD_FAX_API_KEY": api_key,
                "CLOUD_FAX_API_SECRET": SECRET,
                "CLOUD_FAX_PUBLIC_CALLBACK_URL": public,
                "CLOUD_FAX_MAX_PDF_BYTES": str(MAX_PDF),
                "CLOUD_FAX_SEND_PASS_S": "0.05",
                "CLOUD_FAX_SEND_RETRY_S": "0.05",
                "CLOUD_FAX_SEND_ATTEMPTS": str(attempts),
            }
        )
        db = mongo_client[db_name]
        comms = build(settings, db, directory=Directory(), service_tokens=ServiceIdentities())
        servers.append(Served(create_app(comms.components, Tokens()), comms_port))
        for name, run in comms.background():
            if name == "fax-sender" and sender:
                process.background(name, run)
        for name, run, ready in comms.listeners():
            process.background(name, run)
            assert ready(10)
        return Place(
            f"http://127.0.0.1:{comms_port}", f"http://127.0.0.1:{simulator_port}", simulator, db, comms, smtp_port
        )

    yield make
    for simulator in simulators:
        simulator.stop()
    for served in servers:
        served.stop()
    for process in processes:
        process.stop()


@pytest.fixture
def place(place_factory) -> Place:
    return place_factory()


def upload(pdf: bytes | None = None, **fields) -> dict:
    return {"to": TO, "pdf_base64": base64.b64encode(sample_pdf(2) if pdf is None else pdf).decode(), **fields}


def items(doc: dict) -> list[inbox_pb2.DeliverItemRequest]:
    """The board item updates staged on a document (outbox), by version."""
    found = []
    for entry in (doc.get("_outbox") or {}).values():
        envelope = Envelope()
        envelope.ParseFromString(entry["env"])
        assert envelope.event_type == "board_item.delivery_requested.v1" and envelope.producer == "cloud-comms"
        request = unpack(envelope, inbox_pb2.DeliverItemRequest)  # opens the sealed payload
        assert envelope.event_id == request.delivery_id
        found.append(request)
    return sorted(found, key=lambda r: r.source_version)


def accesses(db) -> list[tuple[str, str, str, str]]:
    return [(a.actor_id, a.resource_id, a.action, a.outcome) for _, a in staged_accesses(db)]


def history(view: dict) -> list[str]:
    return [entry["status"] for entry in view["history"]]


# --- sending ------------------------------------------------------------------------------------------


def test_an_uploaded_pdf_is_sent_and_follows_the_providers_statuses(place):
    pdf = sample_pdf(2)
    answer = place.post("stf_patel", upload(pdf, to="(555) 555-0177", filename="Referral Maria L.pdf"))
    assert answer.status_code == 202, answer.text
    queued = answer.json()
    fid = queued["id"]
    assert fid.startswith("fxo_") and queued["status"] == "queued" and queued["direction"] == "sent"
    assert (queued["to_number"], queued["from_number"]) == (TO, MAIN)  # the caller's one linked number
    assert queued["created_by"] == {"id": "stf_patel", "name": "Stf_Patel"}
    assert queued["filename"] == "Referral_Maria_L.pdf"

    wait_until(lambda: place.status_of(fid) == "success", 10, 0.05, "the fax sent")
    view = place.view(fid)
    assert history(view) == ["queued", "sending", "inprogress", "success"]
    assert view["pages"] == 2 and view["failure_reason"] is None

    (sent,) = place.sent()  # what the provider was given
    assert sent["recipients"][0]["phone_number"] == TO and sent["caller_id"] == MAIN
    assert sent["tags"] == {"outbound_id": fid}
    assert [c["status"] for c in sent["callbacks"]] == ["queued", "inprogress", "success"]
    assert all(c["answers"] == [200] for c in sent["callbacks"])

    doc = place.db[OUTBOUND_FAXES].find_one({"_id": fid})
    assert doc["provider_fax_id"] == str(sent["id"]) and "send_due_at" not in doc
    # nothing of the fax in clear: not where it went, not its name, not its pages
    raw = repr({k: v for k, v in doc.items() if k != "_outbox"}).encode()
    raw += b"".join(bytes(c["data"]) for c in place.db[FAX_CHUNKS].find({"fax_id": fid}))
    assert TO.encode() not in raw and b"Referral_Maria" not in raw and b"%PDF" not in raw and b"Maria Lopez" not in raw

    download = place.get("stf_patel", view["pdf_url"])
    assert download.status_code == 200 and download.content == pdf
    assert download.headers["Content-Type"] == "application/pdf"

    updates = items(doc)  # the relay has not run: every version's update is still staged
    assert [u.status for u in updates] == ["queued", "sending", "in-progress", "sent"]
    assert [u.source_version for u in updates] == sorted({u.source_version for u in updates})
    first = updates[0]
    assert (first.source, first.source_ref, first.kind) == ("fax-out", fid, inbox_pb2.DELIVERED_KIND_CLOUD)
    assert list(first.recipients.staff_ids) == ["stf_patel"] and first.title == f"Fax to {TO}"
    assert first.links[0].url == f"https://clinic.example/api/v1/cloud/faxes/outbound/{fid}"
    assert updates[-1].summary == "Sent · 2 pages" and not any(u.mark_unread for u in updates[1:])

    assert ("stf_patel", fid, "send", "allowed") in accesses(place.db)
    assert ("stf_patel", fid, "download", "allowed") in accesses(place.db)


def test_a_received_fax_is_faxed_on_by_staff_it_reached(place):
    delivered = requests.post(f"{place.simulator_url}/simulator/inbound", json={"to": MAIN, "pages": 1}, timeout=30)
    assert delivered.json()["answers"] == [200], delivered.text
    (received,) = place.db[FAXES].find()
    assert received["triage_due_at"] == received["stored_at"], "inbound faxes are due for triage when stored"
    document = {"kind": "fax", "id": received["_id"]}

    refused = place.post("stf_hall", {"to": TO, "from_number": MAIN, "document": document})
    assert refused.status_code == 403 and refused.json()["code"] == "not_linked", refused.text
    # Baker (another agency) names his own number: the fax was not delivered to him.
    refused = place.post("stf_baker", {"to": TO, "from_number": LAKE, "document": document})
    assert refused.status_code == 404 and refused.json()["code"] == "fax_not_found"
    assert place.db[OUTBOUND_FAXES].count_documents({}) == 0

    answer = place.post("stf_davis", {"to": TO, "from_number": BILLING, "document": document})
    assert answer.status_code == 202, answer.text
    fid = answer.json()["id"]
    wait_until(lambda: place.status_of(fid) == "success", 10, 0.05, "the fax sent")
    (sent,) = place.sent()
    assert sent["caller_id"] == BILLING
    download = place.get("stf_davis", f"/api/v1/cloud/faxes/outbound/{fid}/pdf")
    assert download.content == place.get("stf_davis", f"/api/v1/cloud/faxes/{received['_id']}/pdf").content
    assert ("stf_davis", received["_id"], "send", "allowed") in accesses(place.db)
    assert ("stf_baker", received["_id"], "read", "denied") in accesses(place.db)


def direct_inner(*attachments: tuple[str, str, bytes]) -> bytes:
    """A Direct message's inner MIME with these attachments (name, content type, bytes)."""
    boundary = "inner_" + os.urandom(8).hex()
    lines = [f'Content-Type: multipart/mixed; boundary="{boundary}"', "", f"--{boundary}"]
    lines += ["Content-Type: text/plain; charset=utf-8", "", "Please see the attached documents.", ""]
    for name, ctype, data in attachments:
        lines += [f"--{boundary}", f"Content-Type: {ctype}", f'Content-Disposition: attachment; filename="{name}"']
        lines += ["Content-Transfer-Encoding: base64", "", base64.encodebytes(data).decode().strip(), ""]
    lines.append(f"--{boundary}--")
    return ("\r\n".join(lines) + "\r\n").encode()


def test_a_direct_attachment_is_faxed(place, certs):
    note = sample_pdf(1, "Referral note\nPatient: Maria Lopez")
    inner = direct_inner(
        ("referral.xml", "application/xml", CCDA),
        ("note.pdf", "application/pdf", note),
        ("empty.pdf", "application/pdf", NO_PAGE_PDF),
    )
    code, _ = send(place.smtp_port, direct_message(certs, inner=inner))
    assert code == 250
    (message,) = place.db["direct_messages"].find()
    document = {"kind": "direct", "id": message["_id"], "index": 1}  # 0 is the C-CDA, 1 the PDF
    attachment = f"{message['_id']}/attachments"

    xml = place.post("stf_patel", {"to": TO, "document": {**document, "index": 0}})
    assert xml.status_code == 400 and xml.json()["code"] == "not_a_pdf"
    assert accesses(place.db) == [], "a refused request leaves no record of an allowed read"
    empty = place.post("stf_patel", {"to": TO, "document": {**document, "index": 2}})
    assert empty.status_code == 400 and empty.json()["code"] == "not_a_pdf"
    missing = place.post("stf_patel", {"to": TO, "document": {**document, "index": 7}})
    assert missing.status_code == 404 and missing.json()["code"] == "attachment_not_found"
    not_mine = place.post("stf_davis", {"to": TO, "from_number": MAIN, "document": document})
    assert not_mine.status_code == 404 and not_mine.json()["code"] == "direct_message_not_found"
    # the refused requests left no record of an allowed read (the stranger's refusal is recorded as denied)
    assert [a for a in accesses(place.db) if a[3] == "allowed"] == []
    assert ("stf_davis", message["_id"], "read", "denied") in accesses(place.db)

    answer = place.post("stf_patel", {"to": TO, "document": document})
    assert answer.status_code == 202, answer.text
    assert answer.json()["filename"] == "note.pdf"
    fid = answer.json()["id"]
    wait_until(lambda: place.status_of(fid) == "success", 10, 0.05, "the fax sent")
    assert place.get("stf_patel", f"/api/v1/cloud/faxes/outbound/{fid}/pdf").content == note
    allowed = [a for a in accesses(place.db) if a[3] == "allowed"]
    assert ("stf_patel", f"{attachment}/1", "send", "allowed") in allowed
    assert ("stf_patel", fid, "send", "allowed") in allowed
    assert not any(a[1] in (f"{attachment}/0", f"{attachment}/2") for a in allowed)
    assert not any(a[2] == "download" and a[1].startswith(attachment) for a in accesses(place.db))


def test_the_number_to_send_from_must_be_the_callers(place):
    cases = [
        ("stf_hall", {}, 403, "not_linked"),  # linked to no number
        ("stf_patel", {"from_number": BILLING}, 403, "not_linked"),  # the agency's, not his
        ("stf_patel", {"from_number": LAKE}, 403, "not_linked"),  # another agency's
        ("stf_patel", {"from_number": "+15555550999"}, 403, "not_linked"),  # nobody's
        ("stf_davis", {}, 422, "from_number_required"),  # linked to two
    ]
    for who, fields, status, code in cases:
        answer = place.post(who, upload(**fields))
        assert (answer.status_code, answer.json()["code"]) == (status, code), (who, fields, answer.text)
    assert place.db[OUTBOUND_FAXES].count_documents({}) == 0 and place.db[FAX_CHUNKS].count_documents({}) == 0
    assert place.post("stf_davis", upload(from_number="555.555.0111")).status_code == 202


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (upload(to="12345"), 400, "invalid_number"),
        (upload(to="+1 (555) 01"), 400, "invalid_number"),
        (upload(to="1-055-555-0177"), 400, "invalid_number"),
        (upload(to={"$ne": ""}), 400, "invalid_type"),
        (upload(from_number="fax me"), 400, "invalid_number"),
        (upload(b"GIF89a, not a PDF"), 400, "not_a_pdf"),
        (upload(b"%PDF-1.4 cut off before its end"), 400, "not_a_pdf"),
        (upload(b"%PDF-1.4\n<html><body>Not a fax</body></html>\n%%EOF"), 400, "not_a_pdf"),
        (upload(NO_PAGE_PDF), 400, "not_a_pdf"),
        (upload(to="+1 900 555 0177"), 400, "destination_not_allowed"),
        (upload(to="+19765550177"), 400, "destination_not_allowed"),
        (upload(to="+14115550177"), 400, "destination_not_allowed"),
        (upload(to="+15555551212"), 400, "destination_not_allowed"),
        (upload(to="+442079460958"), 400, "destination_not_allowed"),
        ({"to": TO, "pdf_base64": "not base64!"}, 400, "invalid_base64"),
        ({"to": TO}, 400, "one_document_required"),
        (upload(document={"kind": "fax", "id": "fax_x"}), 400, "one_document_required"),
        ({"to": TO, "document": {"kind": "email", "id": "x"}}, 400, "invalid_value"),
        ({"to": TO, "document": {"kind": "direct", "id": "dm_x"}}, 400, "missing_field"),
        ({"to": TO, "document": {"kind": "fax", "id": {"$gt": ""}}}, 400, "invalid_type"),
        (upload(cover="hello"), 400, "unknown_field"),
        (upload(b"%PDF-1.4\n" + b"0" * MAX_PDF + b"\n%%EOF\n"), 413, "fax_too_large"),
    ],
)
def test_bad_requests_are_refused_and_nothing_is_stored_or_sent(place, body, status, code):
    answer = place.post("stf_patel", body)
    assert (answer.status_code, answer.json()["code"]) == (status, code), answer.text
    assert answer.json()["message"]
    assert place.db[OUTBOUND_FAXES].count_documents({}) == 0 and place.db[FAX_CHUNKS].count_documents({}) == 0
    assert place.sent() == [] and accesses(place.db) == []


def test_a_body_far_over_the_limit_is_refused_and_staff_routes_need_a_token(place):
    huge = {"to": TO, "pdf_base64": "A" * (2 * 1024 * 1024)}
    assert place.post("stf_patel", huge).status_code == 413
    assert requests.post(f"{place.url}/api/v1/cloud/faxes/outbound", json=upload(), timeout=10).status_code == 401
    assert place.db[OUTBOUND_FAXES].count_documents({}) == 0


def test_the_fax_is_shown_to_its_sender_and_the_staff_of_its_number_only(place):
    fid = place.post("stf_patel", upload()).json()["id"]
    assert place.view(fid, "stf_davis")["created_by"]["id"] == "stf_patel"  # linked to the number it went from
    for who in ("stf_hall", "stf_baker"):
        for path in (f"/api/v1/cloud/faxes/outbound/{fid}", f"/api/v1/cloud/faxes/outbound/{fid}/pdf"):
            refused = place.get(who, path)
            assert refused.status_code == 404 and refused.json()["code"] == "outbound_fax_not_found"
    assert ("stf_davis", fid, "read", "allowed") in accesses(place.db)
    assert sum(1 for a in accesses(place.db) if a[3] == "denied") == 4


# --- status callbacks ------------------------------------------------------------------------------


def sent_fax_params(fax_id: int, status: str, fid: str, *, is_test: bool = False, **fields) -> dict[str, str]:
    recipient_status = fields.pop("recipient_status", status)
    fax = {
        "id": fax_id,
        "direction": "sent",
        "num_pages": 3,
        "status": status,
        "is_test": is_test,
        "tags": {"outbound_id": fid},
        "recipients": [{"phone_number": TO, "status": recipient_status, "error_message": fields.pop("reason", None)}],
        **fields,
    }
    success = str(status == "success").lower()
    return {"fax": json.dumps(fax), "direction": "sent", "is_test": str(is_test).lower(), "success": success}


@pytest.fixture
def accepted(place_factory):
    """A fax the provider accepted and reports nothing about (its steps are a minute apart): the
    test plays the provider's status callbacks itself."""
    place = place_factory(step_s=60)
    fid = place.post("stf_patel", upload()).json()["id"]
    wait_until(lambda: place.status_of(fid) == "sending", 10, 0.05, "accepted by the provider")
    return place, fid, int(place.db[OUTBOUND_FAXES].find_one({"_id": fid})["provider_fax_id"])


def test_callbacks_in_order_out_of_order_and_repeated(accepted):
    place, fid, fax_id = accepted
    answers = [place.callback(sent_fax_params(fax_id, status, fid)) for status in ("inprogress", "success")]
    assert [a.json()["applied"] for a in answers] == [True, True]
    late = place.callback(sent_fax_params(fax_id, "inprogress", fid))  # after success: ignored
    repeat = place.callback(sent_fax_params(fax_id, "success", fid))  # Phaxio's retry of a callback
    queued = place.callback(sent_fax_params(fax_id, "queued", fid))
    for answer in (late, repeat, queued):
        assert answer.status_code == 200 and answer.json() == {"id": fid, "status": "success", "applied": False}
    view = place.view(fid)
    assert history(view) == ["queued", "sending", "inprogress", "success"] and view["pages"] == 3
    updates = items(place.db[OUTBOUND_FAXES].find_one({"_id": fid}))
    assert [u.status for u in updates] == ["queued", "sending", "in-progress", "sent"]


def test_a_final_status_first_skips_the_steps_before_it_and_failure_asks_for_attention(accepted):
    place, fid, fax_id = accepted
    failed = place.callback(sent_fax_params(fax_id, "failure", fid, reason="No answer", error_type="lineError"))
    assert failed.json() == {"id": fid, "status": "failure", "applied": True}
    assert place.callback(sent_fax_params(fax_id, "inprogress", fid)).json()["applied"] is False
    assert place.callback(sent_fax_params(fax_id, "success", fid)).json()["applied"] is False  # the first final stays
    view = place.view(fid)
    assert (view["status"], view["failure_reason"]) == ("failure", "No answer")
    assert history(view) == ["queued", "sending", "failure"] and view["history"][-1]["detail"] == "No answer"
    last = items(place.db[OUTBOUND_FAXES].find_one({"_id": fid}))[-1]
    assert (last.status, last.summary, last.mark_unread) == ("failed", "Failed: No answer", True)


def test_a_tampered_or_unsigned_callback_is_refused_and_changes_nothing(accepted):
    place, fid, fax_id = accepted
    before = place.db[OUTBOUND_FAXES].find_one({"_id": fid})
    genuine = sent_fax_params(fax_id, "inprogress", fid)
    signature = documented_signature(TOKEN, f"{place.url}/api/v1/fax/callbacks/status", genuine, {})
    tampered = sent_fax_params(fax_id, "failure", fid, reason="Busy")
    received_url = documented_signature(TOKEN, f"{place.url}/api/v1/fax/callbacks/received", genuine, {})
    wrong_token = documented_signature("guess", f"{place.url}/api/v1/fax/callbacks/status", genuine, {})
    for params, given in ((tampered, signature), (genuine, received_url), (genuine, wrong_token), (genuine, "not-hex")):
        answer = place.callback(params, given)
        assert answer.status_code == 401 and answer.json()["code"] == "invalid_signature"
    after = place.db[OUTBOUND_FAXES].find_one({"_id": fid})
    assert (after["version"], after["status"], after["history"]) == (before["version"], "sending", before["history"])
    events = list(place.db["security_events"].find({"channel": "fax", "code": "invalid_signature"}))
    assert sum(e["count"] for e in events) == 4 and 1 <= len(events) <= 2  # aggregated per peer and minute


def test_callbacks_that_are_not_about_our_faxes(accepted):
    place, fid, fax_id = accepted
    unknown = place.callback(sent_fax_params(99999999, "success", "fxo_" + "0" * 24))
    assert unknown.status_code == 200 and unknown.json() == {"id": None, "status": None, "applied": False}
    # our tag on another provider fax id: not this fax
    assert place.callback(sent_fax_params(fax_id + 1, "success", fid)).json()["applied"] is False
    received = place.callback({**sent_fax_params(fax_id, "success", fid), "direction": "received"})
    assert received.status_code == 400 and received.json()["code"] == "not_sent"
    bad = place.callback(sent_fax_params(fax_id, "lost", fid))
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_fax"
    assert place.status_of(fid) == "sending"


# --- the sender ---------------------------------------------------------------------------------------


def test_the_providers_failure_fails_the_fax(place):
    place.fault(fault="send_failure", reason="No answer")
    fid = place.post("stf_patel", upload()).json()["id"]
    wait_until(lambda: place.status_of(fid) == "failure", 10, 0.05, "the fax failed")
    view = place.view(fid)
    assert view["failure_reason"] == "No answer"
    assert history(view) == ["queued", "sending", "inprogress", "failure"]


def test_a_provider_refusal_fails_the_fax_with_its_message(place):
    place.fault(fault="api_refuses", reason="Phone number is not a valid fax number")
    fid = place.post("stf_patel", upload()).json()["id"]
    wait_until(lambda: place.status_of(fid) == "failure", 10, 0.05, "the fax failed")
    assert place.view(fid)["failure_reason"] == "the fax provider refused it: Phone number is not a valid fax number"
    assert place.sent() == []


def test_an_unavailable_provider_is_retried_then_the_fax_goes(place):
    place.fault(fault="api_unavailable", times=2)
    fid = place.post("stf_patel", upload()).json()["id"]
    wait_until(lambda: place.status_of(fid) == "success", 10, 0.05, "the fax sent")
    view = place.view(fid)
    retries = [h["detail"] for h in view["history"] if h["status"] == "queued"][1:]
    assert len(retries) == 2 and retries[0].startswith("try 1 of 3 failed: the provider answered HTTP 503")
    assert len(place.sent()) == 1


def test_a_provider_down_for_every_try_fails_the_fax(place_factory):
    place = place_factory(api_url=f"http://127.0.0.1:{free_port()}/v2")  # nothing listens there
    fid = place.post("stf_patel", upload()).json()["id"]
    wait_until(lambda: place.status_of(fid) == "failure", 10, 0.05, "the fax failed")
    view = place.view(fid)
    assert view["failure_reason"].startswith("the fax provider could not be reached (3 tries)")
    assert history(view) == ["queued", "queued", "queued", "failure"]
    last = items(place.db[OUTBOUND_FAXES].find_one({"_id": fid}))[-1]
    assert (last.status, last.mark_unread) == ("failed", True)


def test_an_accepted_fax_whose_answer_was_lost_is_not_sent_again(place_factory):
    place = place_factory(step_s=60)  # no callback will tell: only the provider's list can
    place.fault(fault="lost_answer")
    fid = place.post("stf_patel", upload()).json()["id"]
    wait_until(lambda: place.status_of(fid) == "sending", 10, 0.05, "found at the provider")
    (sent,) = place.sent()
    assert place.db[OUTBOUND_FAXES].find_one({"_id": fid})["provider_fax_id"] == str(sent["id"])


def test_replicas_claim_each_fax_once(place_factory):
    place = place_factory(sender=False)
    fids = [place.post("stf_patel", upload()).json()["id"] for _ in range(3)]
    senders = [place.faxes.sender, Faxes(place.comms.components).sender, Faxes(place.comms.components).sender]
    start = threading.Barrier(len(senders))

    def replica(sender) -> Callable[[], int]:
        def run() -> int:
            start.wait(5)
            return sender.send_pass()

        return run

    workers = [Worker(replica(s)).start() for s in senders]
    assert sum(w.finish(30) for w in workers) == 3
    assert sorted(f["tags"]["outbound_id"] for f in place.sent()) == sorted(fids)
    for fid in fids:
        assert place.db[OUTBOUND_FAXES].find_one({"_id": fid})["send_attempts"] == 1


# --- the board -------------------------------------------------------------------------------------------


@pytest.fixture
def board(mongo_client, event_bus):
    """inbox (a database of its own) consuming cloud-comms' delivery requests from the broker."""
    table = AgencyTable()
    with own_inbox(mongo_client, table) as components:
        yield from consuming_inbox(components, table, event_bus)


def consuming_inbox(components, table, event_bus):
    table.staff.update({"stf_patel": RIVERBEND, "stf_davis": RIVERBEND})
    components.service_tokens = ServiceTokens(
        "unused:1", "inbox", "secret", issuer=lambda client, secret, agency: IssuedToken(f"token-{agency}", 900)
    )
    delivery = Delivery(components)
    delivery.ensure_indexes()
    delivery.attach()
    consumer = delivery.consumer(event_bus.amqp_url, event_bus.topology, retry_delay_ms=50, max_retries=1)
    event_bus.queues += [consumer.queue, consumer.retry_queue, consumer.parking_queue]
    with consumer.running():
        yield components


@pytest.fixture
def relayed(event_bus):
    """Runs the outbox relay of a place's cloud-comms into the broker (as the process does)."""
    started: list[tuple[threading.Event, Worker, BatchPublisher]] = []

    def start(place: Place) -> None:
        publisher = BatchPublisher(event_bus.amqp_url, event_bus.topology)
        stop = threading.Event()
        relay = OutboxRelay(place.db, place.comms.outbox_collections, publisher, lease_ttl_s=None, poll_interval_s=0.05)
        started.append((stop, Worker(relay.run_forever, stop).start(), publisher))

    yield start
    for stop, worker, publisher in started:
        stop.set()
        worker.finish(15)
        publisher.close()


def test_the_senders_board_item_follows_the_fax(place_factory, board, relayed):
    place = place_factory(step_s=60)  # the test plays the provider's callbacks
    relayed(place)
    patel = inbox_staff(RIVERBEND, "stf_patel")

    def item(**expected) -> dict | None:
        page = board.board.page(patel, domain.FOLDER_CLOUD, ItemFilter(), None, 50)["items"]
        found = [i for i in page if i.get("title") == f"Fax to {TO}"]
        assert len(found) <= 1, "one item per fax, updated in place"
        return found[0] if found and all(found[0].get(k) == v for k, v in expected.items()) else None

    fid = place.post("stf_patel", upload()).json()["id"]
    shown = wait_until(lambda: item(status="sending", summary="Accepted by the fax provider"), 20)
    board.board.set_read(patel, shown["id"], True)  # the sender saw it go
    fax_id = int(place.db[OUTBOUND_FAXES].find_one({"_id": fid})["provider_fax_id"])

    assert place.callback(sent_fax_params(fax_id, "inprogress", fid)).json()["applied"]
    assert wait_until(lambda: item(status="in-progress"), 20)["read"], "progress does not ask for attention"
    assert place.callback(sent_fax_params(fax_id, "failure", fid, reason="Busy signal")).json()["applied"]
    failed = wait_until(lambda: item(status="failed"), 20)
    assert failed["summary"] == "Failed: Busy signal" and not failed["read"], "a failure is unread again"
    davis = board.board.page(inbox_staff(RIVERBEND, "stf_davis"), domain.FOLDER_CLOUD, ItemFilter(), None, 50)
    assert davis["items"] == []  # the sender's item only


# --- test mode, partial success ------------------------------------------------------------------------------


def test_a_fax_sent_with_test_keys_is_never_shown_as_sent(place):
    place.fault(fault="test_mode")  # the provider reports success, is_test true: nothing was transmitted
    fid = place.post("stf_patel", upload()).json()["id"]
    wait_until(lambda: place.status_of(fid) == "test", 10, 0.05, "the test-mode outcome")
    view = place.view(fid)
    assert view["status"] == "test" and history(view) == ["queued", "sending", "inprogress", "test"]
    assert view["history"][-1]["detail"] == "test mode: the provider's test API keys transmit nothing"
    (sent,) = place.sent()
    assert sent["is_test"] is True and [c["answers"] for c in sent["callbacks"]] == [[200], [200], [200]]
    last = items(place.db[OUTBOUND_FAXES].find_one({"_id": fid}))[-1]
    assert (last.status, last.summary, last.mark_unread) == ("test", "Test mode: not transmitted", True)
    assert not any(u.status == "sent" for u in items(place.db[OUTBOUND_FAXES].find_one({"_id": fid})))


def test_a_test_mode_success_callback_is_the_test_outcome(accepted):
    place, fid, fax_id = accepted
    answer = place.callback(sent_fax_params(fax_id, "success", fid, is_test=True))
    assert answer.json() == {"id": fid, "status": "test", "applied": True}
    # Phaxio's retry of it, or a live success after it, changes nothing: the first final stays
    assert place.callback(sent_fax_params(fax_id, "success", fid, is_test=True)).json()["applied"] is False
    assert place.callback(sent_fax_params(fax_id, "success", fid)).json()["applied"] is False
    assert place.view(fid)["status"] == "test"


def test_test_mode_is_read_from_the_form_too(accepted):
    place, fid, fax_id = accepted
    params = sent_fax_params(fax_id, "success", fid)
    params["is_test"] = "true"  # the fax object says nothing of test mode, the form does
    assert place.callback(params).json() == {"id": fid, "status": "test", "applied": True}


def test_a_partial_success_follows_our_recipients_status(place_factory):
    place = place_factory(step_s=60)
    failed_fid = place.post("stf_patel", upload()).json()["id"]
    sent_fid = place.post("stf_patel", upload()).json()["id"]
    for fid in (failed_fid, sent_fid):
        wait_until(lambda fid=fid: place.status_of(fid) == "sending", 10, 0.05, "accepted by the provider")
    failed_id, sent_id = (
        int(place.db[OUTBOUND_FAXES].find_one({"_id": f})["provider_fax_id"]) for f in (failed_fid, sent_fid)
    )

    partial = sent_fax_params(failed_id, "partialsuccess", failed_fid, recipient_status="failure", reason="No answer")
    answer = place.callback(partial)
    assert answer.status_code == 200 and answer.json() == {"id": failed_fid, "status": "failure", "applied": True}
    assert place.view(failed_fid)["failure_reason"] == "No answer"
    answer = place.callback(sent_fax_params(sent_id, "partialsuccess", sent_fid, recipient_status="success"))
    assert answer.json() == {"id": sent_fid, "status": "success", "applied": True}


# --- our credentials refused -------------------------------------------------------------------------------------


def test_refused_credentials_keep_the_fax_queued_then_it_goes(place):
    place.fault(fault="api_unauthorized", times=2)
    fid = place.post("stf_patel", upload()).json()["id"]
    wait_until(lambda: place.status_of(fid) == "success", 10, 0.05, "the fax sent once the provider took our keys")
    view = place.view(fid)
    retries = [h["detail"] for h in view["history"] if h["status"] == "queued"][1:]
    assert len(retries) == 2 and all("the fax provider refused our credentials (HTTP 401)" in r for r in retries)
    assert view["failure_reason"] is None and len(place.sent()) == 1


def test_credentials_refused_for_good_fail_every_fax_after_the_tries(place_factory, caplog):
    place = place_factory(api_key="not-our-key", sender=False)
    fids = [place.post("stf_patel", upload()).json()["id"] for _ in range(2)]
    caplog.set_level(logging.INFO, logger="services.cloud_comms.fax.sender")

    def refused_in_a_pass() -> int:
        place.faxes.sender.send_pass()
        return sum(place.status_of(f) == "failure" for f in fids)

    wait_until(lambda: refused_in_a_pass() == 2, 10, 0.05, "both faxes failed")
    for fid in fids:
        view = place.view(fid)
        assert view["failure_reason"] == "the fax provider refused our credentials"
        assert history(view) == ["queued", "queued", "queued", "failure"]  # the 3 tries of the normal budget
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and all(r.getMessage().startswith("the fax provider refused our credentials") for r in errors)
    # one error per pass, however many faxes it stopped: the first pass tried both
    assert errors[0].count == 2 and len(errors) < 6
    assert all(TO not in r.getMessage() and "not-our-key" not in r.getMessage() for r in caplog.records)
    assert place.sent() == []


# --- Idempotency-Key -----------------------------------------------------------------------------------------------


def test_a_repeated_idempotency_key_returns_the_first_fax(place):
    first = place.post("stf_patel", upload(), key="referral-0042")
    assert first.status_code == 202, first.text
    fid = first.json()["id"]
    wait_until(lambda: place.status_of(fid) == "success", 10, 0.05, "the fax sent")
    again = place.post("stf_patel", upload(), key="referral-0042")
    assert again.status_code == 200 and again.json()["id"] == fid and again.json()["to_number"] == TO
    assert again.json()["status"] == "success"
    changed = place.post("stf_patel", upload(to="+15555550188"), key="referral-0042")  # not a repeat
    assert changed.status_code == 409 and changed.json()["code"] == "idempotency_key_reused"
    other = place.post("stf_patel", upload(), key="referral-0043")
    davis = place.post("stf_davis", upload(from_number=MAIN), key="referral-0042")  # another sender's key
    assert (other.status_code, davis.status_code) == (202, 202)
    assert len({fid, other.json()["id"], davis.json()["id"]}) == 3
    wait_until(lambda: len(place.sent()) == 3, 10, 0.05, "three faxes sent")
    assert place.db[OUTBOUND_FAXES].count_documents({}) == 3
    assert ("stf_patel", fid, "read", "allowed") in accesses(place.db)  # the repeat showed it


def test_concurrent_repeats_of_a_key_store_and_send_one_fax(place_factory):
    place = place_factory(sender=False)
    start = threading.Barrier(6)

    def post() -> requests.Response:
        start.wait(5)
        return place.post("stf_patel", upload(), key="burst-1")

    answers = [w.finish(30) for w in [Worker(post).start() for _ in range(6)]]
    assert sorted(a.status_code for a in answers) == [200] * 5 + [202]
    (fid,) = {a.json()["id"] for a in answers}
    (doc,) = place.db[OUTBOUND_FAXES].find()
    assert doc["_id"] == fid
    wait_until(lambda: place.faxes.sender.send_pass() == 0 and place.status_of(fid) != "queued", 10, 0.05)
    assert place.db[FAX_CHUNKS].count_documents({}) == doc["pdf_chunks"], "the losers' pieces are removed"
    assert place.get("stf_patel", f"/api/v1/cloud/faxes/outbound/{fid}/pdf").content == sample_pdf(2)
    assert len(place.sent()) == 1


@pytest.mark.parametrize("key", ["", "x" * 129, "caf\u00e9"])
def test_a_bad_idempotency_key_is_refused(place, key):
    headers = {"Authorization": "Bearer stf_patel", "Idempotency-Key": key.encode("utf-8")}
    answer = requests.post(f"{place.url}/api/v1/cloud/faxes/outbound", json=upload(), headers=headers, timeout=30)
    assert answer.status_code == 400 and answer.json()["code"] == "invalid_idempotency_key"
    assert place.db[OUTBOUND_FAXES].count_documents({}) == 0 and place.sent() == []
