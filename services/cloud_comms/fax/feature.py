"""eFax: faxes received at an agency's fax number, onto the boards of the staff linked to it, and the
audited staff view of each fax and its PDF.

Inbound (`POST /api/v1/fax/callbacks/received`, routed by the gateway without authentication: the
signature is the authentication): the provider's callback is checked (X-Phaxio-Signature, phaxio.py)
before anything else is read; the receiving number is resolved through directory (agency, linked
staff); the PDF is checked (size limit, then it must open with pypdf with a page) and stored sealed with the
agency's key in `fax_chunks` (pieces well under the 16 MiB document limit), then ONE insert of the
`faxes` document stores the fax's metadata together with its `board_item.delivery_requested.v1`
event (kit outbox). The document's `_id` is derived from (agency, provider, provider fax id): the
provider's retries of one callback store one fax and deliver one board item (DuplicateKey = 200).

Answers to the provider (Phaxio retries any non-2xx up to 16 times over about three days):
- 200 stored, or already stored (a retry).
- 401 `invalid_signature`: nothing read further, nothing stored; recorded as a security event.
- 400 (not a PDF, a fax object that is not Phaxio's) and 413 (too large): retrying cannot help, but
  Phaxio retries anyway; nothing is stored.
- 404 `unknown_number`: the number is not linked to an agency in directory. Deliberately non-2xx:
  the fax stays with the provider and its retries deliver it once an administrator links the number
  (typically a newly bought number not yet registered); nothing is stored meanwhile because no
  agency key can seal it.
- 503 when directory cannot answer: a retry delivers it.

Outbound (Send Fax from the board): `POST /api/v1/cloud/faxes/outbound` (compose.py) stores the fax
to send (outbound.py) and the `fax-sender` worker hands it to the provider (sender.py); the
provider's signed status callbacks (`POST /api/v1/fax/callbacks/status`, checked like the received
ones) move it on and update the sender's board item. A document faxed on is read without
recording, checked, and its access recorded (action "send") only once the fax is stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import zoneinfo

from flask import Blueprint, Response, g, request
from pymongo.errors import DuplicateKeyError

from services.cloud_comms import audit
from services.cloud_comms.components import Feature
from services.cloud_comms.delivery import SOURCE_FAX, delivery_requested
from services.cloud_comms.delivery import request as delivery_request
from services.cloud_comms.direct.feature import RESOURCE_TYPE as DIRECT_RESOURCE_TYPE
from services.cloud_comms.direct.feature import DirectMessaging
from services.cloud_comms.fax import compose, phaxio
from services.cloud_comms.fax.outbound import INDEXES as OUTBOUND_INDEXES
from services.cloud_comms.fax.outbound import OUTBOUND_FAXES, OutboundFaxes, iso
from services.cloud_comms.fax.outbound import RESOURCE_TYPE as OUTBOUND_RESOURCE_TYPE
from services.cloud_comms.fax.outbound import idempotent_id as outbound_id
from services.cloud_comms.fax.pdf_store import FAX_CHUNKS, SealedPdfs
from services.cloud_comms.fax.pdf_store import INDEXES as PDF_INDEXES
from services.cloud_comms.fax.phaxio_api import PhaxioApi
from services.cloud_comms.fax.sender import FaxSender
from services.cloud_comms.fax.settings import FaxSettings
from services.kit.auth import Identity
from services.kit.crypto import DecryptionError
from services.kit.errors import InvalidInput, NotFound, Unauthenticated, Unavailable
from services.kit.http import require_staff
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import outbox_fields
from services.kit.service_identity import acting_as
from services.kit.validation import idempotency_key_header, json_body, path_id, request_digest

__all__ = ["FAXES", "FAX_CHUNKS", "OUTBOUND_FAXES", "Faxes", "fax_doc_id"]

log = logging.getLogger(__name__)

FAXES = "faxes"
CHANNEL = "fax"
RESOURCE_TYPE = "fax"
# Room for the multipart framing and the form fields around the PDF (and for the JSON around a
# base64 PDF sent from the board).
FORM_SLACK_BYTES = 256 * 1024
INDEXES = [IndexSpec(FAXES, [("agency_id", 1), ("received_at", -1)], name="faxes_by_agency")]


def callback_parts() -> tuple[list[tuple[str, str]], list[tuple[str, bytes]]]:
    """The request's form fields and file parts, as the callback signature covers them. A part whose
    name cannot be read (Werkzeug names it None) is named "": the provider never sends one, so the
    signature check refuses the callback (401) rather than failing on it."""
    params = [(name or "", value) for name, value in request.form.items(multi=True)]
    files = [(name or "", storage.read()) for name, storage in request.files.items(multi=True)]
    return params, files


def fax_doc_id(agency_id: str, provider: str, provider_fax_id: str) -> str:
    """One received fax of one agency, however often the provider calls back about it."""
    return "fax_" + hashlib.sha256(f"{agency_id}\x1f{provider}\x1f{provider_fax_id}".encode()).hexdigest()[:32]


def board_title(from_number: str) -> str:
    return f"Fax from {from_number or 'an unknown number'}"


def board_summary(pages: int, received_ms: int, zone: dt.tzinfo) -> str:
    when = dt.datetime.fromtimestamp(received_ms / 1000, zone)
    count = "1 page" if pages == 1 else f"{pages} pages"
    return f"{count} · received {when.strftime('%Y-%m-%d %H:%M')} {when.tzname() or ''}".rstrip()


class Faxes(Feature):
    outbox_collections = (FAXES, OUTBOUND_FAXES)

    def __init__(self, components):
        super().__init__(components)
        db = components.store.db
        self.faxes = db[FAXES]
        self.cipher = components.cipher
        self.pdfs = SealedPdfs(db[FAX_CHUNKS], components.cipher)
        self.outbound = OutboundFaxes(components, self.pdfs)
        settings = self.settings
        api = PhaxioApi(settings.api_url, settings.api_key, settings.api_secret, settings.send_timeout_s)
        self.sender = FaxSender(self.outbound, settings, api, settings.status_callback_url)

    @property
    def settings(self) -> FaxSettings:
        return self.components.settings.fax

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, [*INDEXES, *PDF_INDEXES, *OUTBOUND_INDEXES])

    def background(self):
        return [("fax-sender", self.sender.run)]

    # --- callbacks --------------------------------------------------------------------------------
    def verified_form(
        self, url: str, params: list[tuple[str, str]], files: list[tuple[str, bytes]], given_signature: str | None
    ) -> dict[str, str]:
        """The callback's form fields once its signature over `url` holds (401 `invalid_signature`
        otherwise, recorded as a security event, nothing else read)."""
        if not phaxio.signature_valid(self.settings.callback_token, url, params, files, given_signature):
            # Aggregated per peer and minute, and logged there once a minute (a flood is one line).
            self.components.store.record_security_event(
                CHANNEL, "invalid_signature", "missing or wrong X-Phaxio-Signature", peer=request.remote_addr or ""
            )
            raise Unauthenticated("invalid_signature", "the callback signature does not match")
        form: dict[str, str] = {}
        for name, value in params:
            form.setdefault(name, value)
        return form

    def status_update(self, params: list[tuple[str, str]], files: list[tuple[str, bytes]], given_signature: str | None):
        """One sent-fax status callback: 200 `{id, status, applied}` (id null: not a fax sent from
        here, acknowledged so the provider stops retrying; applied false: a repeat or a late one)."""
        form = self.verified_form(self.settings.status_callback_url, params, files, given_signature)
        return self.outbound.apply_status(phaxio.parse_sent(form)), 200

    # --- inbound ----------------------------------------------------------------------------------
    def receive(self, params: list[tuple[str, str]], files: list[tuple[str, bytes]], given_signature: str | None):
        """One received-fax callback: (body, status). Raises kit errors for the refusals."""
        settings = self.settings
        form = self.verified_form(settings.received_callback_url, params, files, given_signature)
        fax = phaxio.parse_received(form)
        pdf = next((content for name, content in files if name in phaxio.PDF_PARTS), None)
        if pdf is None:
            raise InvalidInput("missing_field", "the fax PDF (file part 'filename') is required", {"field": "filename"})
        phaxio.check_pdf(pdf, settings.max_pdf_bytes)

        address = self.components.directory.resolve_address("fax", fax.to_number)
        if address is None or not getattr(address, "found", True):
            log.warning("fax to a number directory does not know", extra={"code": "unknown_number"})
            raise NotFound("unknown_number", "the receiving number is not linked to an agency")
        fid, created = self.store(address, fax, pdf)
        return {"id": fid, "created": created}, 200

    def _zone(self, agency_id: str) -> dt.tzinfo:
        """The agency's time zone (directory's agency settings) for the board summary; UTC when
        directory does not say."""
        settings_of = getattr(self.components.directory, "agency_settings", None)
        if settings_of is None:  # a stand-in directory without agency settings (tests)
            return dt.UTC
        try:
            with acting_as(self.components.service_tokens.identity(agency_id)):
                name = settings_of(agency_id).time_zone
            return zoneinfo.ZoneInfo(name or "UTC")
        except Unavailable:
            raise
        except Exception:  # noqa: BLE001 - an unknown zone or agency: the summary shows UTC
            return dt.UTC

    def store(self, address, fax: phaxio.ReceivedFax, pdf: bytes) -> tuple[str, bool]:
        """Store the fax sealed with its delivery request; (fax id, newly stored)."""
        agency_id = address.agency_id
        provider = self.settings.provider
        fid = fax_doc_id(agency_id, provider, fax.fax_id)
        if self.faxes.find_one({"_id": {"$eq": fid}}, projection={"_id": 1}) is not None:
            log.info("fax callback repeated", extra={"agency_id": agency_id, "item_id": fid})
            return fid, False
        pieces = self.pdfs.put(agency_id, fid, pdf)
        recipients = list(dict.fromkeys(address.staff_ids))
        stored = now_ms()
        received = fax.received_at_ms or stored
        caller = {"from_number": fax.from_number, "caller_name": fax.caller_name}
        doc = {
            "_id": fid,
            "agency_id": agency_id,
            "direction": "received",
            "provider": provider,
            "provider_fax_id": fax.fax_id,
            "address_id": address.address_id,
            "to_number": fax.to_number,  # the agency's own number
            "caller": self.cipher.seal(agency_id, fid, "caller", json.dumps(caller)),
            "pages": fax.pages,
            "received_at": received,
            "stored_at": stored,
            "pdf_bytes": len(pdf),
            "pdf_chunks": pieces,
            "is_test": fax.is_test,
            "recipient_ids": recipients,
            # Due for automatic triage (the triage worker claims it and removes the field).
            "triage_due_at": stored,
        }
        events = []
        if recipients:
            item = delivery_request(
                source=SOURCE_FAX,
                source_ref=fax.fax_id,
                delivery_id=fid,
                staff_ids=recipients,
                title=board_title(fax.from_number),
                summary=board_summary(fax.pages, received, self._zone(agency_id)),
                url=f"{self.components.settings.public_url}/api/v1/cloud/faxes/{fid}",
                link_label="View fax",
            )
            events = [delivery_requested(agency_id, item, fid)]
        else:
            log.warning("fax stored for a number with no linked staff", extra={"agency_id": agency_id, "item_id": fid})
        try:
            self.faxes.insert_one({**doc, **outbox_fields(events)})
        except DuplicateKeyError:
            log.info("fax callback repeated", extra={"agency_id": agency_id, "item_id": fid})
            return fid, False
        log.info("fax stored", extra={"agency_id": agency_id, "item_id": fid, "recipients": len(recipients)})
        return fid, True

    # --- the staff view -----------------------------------------------------------------------------
    def _delivered(self, caller: Identity, fid: str) -> dict:
        doc = self.faxes.find_one(
            {"_id": {"$eq": fid}, "agency_id": {"$eq": caller.agency_id}}, projection={"_outbox": 0}
        )
        if doc is None or caller.staff_id not in doc.get("recipient_ids", []):
            raise audit.refuse(self.components.store, caller, fid, resource_type=RESOURCE_TYPE, code="fax_not_found")
        return doc

    def view(self, caller: Identity, fid: str) -> dict:
        doc = self._delivered(caller, fid)
        caller_fields = self.stored_caller(doc)
        audit.record(self.components.store, caller, fid, resource_type=RESOURCE_TYPE)
        return {
            "id": fid,
            "direction": doc["direction"],
            "from_number": caller_fields.get("from_number", ""),
            "caller_name": caller_fields.get("caller_name", ""),
            "to_number": doc["to_number"],
            "pages": doc["pages"],
            "received_at": iso(doc["received_at"]),
            "pdf_bytes": doc["pdf_bytes"],
            "pdf_url": f"/api/v1/cloud/faxes/{fid}/pdf",
            "is_test": doc.get("is_test", False),
        }

    def pdf(self, caller: Identity, fid: str) -> bytes:
        """The received fax's PDF for staff it was delivered to; audited with action `download`."""
        doc = self._delivered(caller, fid)
        content = self.stored_pdf(doc)
        audit.record(self.components.store, caller, fid, resource_type=RESOURCE_TYPE, action="download")
        return content

    def stored_caller(self, doc: dict) -> dict:
        """A received fax's sealed caller ({from_number, caller_name}); Unavailable when unreadable.
        For the service's own processing too (not audited here)."""
        try:
            return json.loads(self.cipher.open(doc["agency_id"], doc["_id"], "caller", doc["caller"]))
        except DecryptionError as exc:
            raise Unavailable("unreadable", "the fax cannot be opened") from exc

    def stored_pdf(self, doc: dict) -> bytes:
        """A received fax's PDF from its `faxes` document, for the service's own processing (no
        staff read: not audited here)."""
        return self.pdfs.get(doc["agency_id"], doc["_id"], doc["pdf_chunks"])

    # --- sending --------------------------------------------------------------------------------------
    def send(self, caller: Identity, body: dict, key: str | None = None) -> tuple[dict, int]:
        """Send Fax from the board: (the sent fax's view, 202), or (the first fax's view, 200) for a
        repeat of an Idempotency-Key (`key`, checked by the kit's idempotency_key_header). The request
        checked, the number to send from resolved, the document read (with its own access check)
        and checked as a PDF; only then stored, queued for the sender and the accesses recorded (a
        refused request leaves no `allowed` record)."""
        settings = self.settings
        fid = None if key is None else outbound_id(caller.agency_id, caller.staff_id, key)
        digest = request_digest(body) if key is not None else ""
        if fid is not None and (first := self.outbound.sent_by(caller, fid, digest)) is not None:
            return self._repeat(caller, first), 200
        wanted = compose.parse(body, settings.max_pdf_bytes, settings.allowed_country_codes)
        address = compose.sending_number(self.components.directory, caller, wanted.from_number)
        if wanted.pdf is not None:
            phaxio.check_pdf(wanted.pdf, settings.max_pdf_bytes, "pdf_base64")
            pdf, filename, read = wanted.pdf, wanted.filename, None
        else:
            pdf, filename, read = self._document(caller, wanted.document)
        view, created = self.outbound.create(
            caller,
            address,
            to_number=wanted.to_number,
            pdf=pdf,
            filename=filename,
            document=wanted.document or {"kind": "upload"},
            fid=fid,
            digest=digest,
        )
        if not created:  # a concurrent repeat of the same Idempotency-Key stored it first
            return self._repeat(caller, view), 200
        if read is not None:
            audit.record(self.components.store, caller, read[1], resource_type=read[0], action="send")
        audit.record(self.components.store, caller, view["id"], resource_type=OUTBOUND_RESOURCE_TYPE, action="send")
        return view, 202

    def _repeat(self, caller: Identity, view: dict) -> dict:
        audit.record(self.components.store, caller, view["id"], resource_type=OUTBOUND_RESOURCE_TYPE)
        log.info("fax request repeated", extra={"agency_id": caller.agency_id, "item_id": view["id"]})
        return view

    def _document(self, caller: Identity, document: dict) -> tuple[bytes, str, tuple[str, str]]:
        """(bytes, file name, (resource type, id) read) of a document delivered to the caller, checked
        as a PDF; its feature's 404 otherwise (refusals audited there). The read itself is recorded
        by the caller once the fax is stored."""
        limit = self.settings.max_pdf_bytes
        if document["kind"] == "fax":
            doc = self._delivered(caller, document["id"])
            content = self.stored_pdf(doc)
            phaxio.check_pdf(content, limit, "document")
            return content, f"{document['id']}.pdf", (RESOURCE_TYPE, document["id"])
        direct = self.components.feature(DirectMessaging)
        if direct is None:
            raise NotFound("direct_message_not_found", "no such resource")
        doc = direct.readable(caller, document["id"])
        index = document["index"]
        if not 0 <= index < len(doc.get("attachments", [])):
            raise NotFound("attachment_not_found", "no such attachment")
        try:
            name, _, content = direct.stored_attachments(doc)[index]
        except DecryptionError as exc:
            raise Unavailable("unreadable", "the attachment cannot be opened") from exc
        phaxio.check_pdf(content, limit, "document")
        filename = compose.safe_filename(name or "", "attachment.pdf")
        return content, filename, (DIRECT_RESOURCE_TYPE, f"{document['id']}/attachments/{index}")

    # --- HTTP ---------------------------------------------------------------------------------------
    def blueprints(self) -> list:
        callbacks = Blueprint("fax_callbacks", __name__, url_prefix="/api/v1/fax/callbacks")

        @callbacks.post("/received")
        def received():
            # The PDF may be far larger than the service's JSON bodies (Flask 3.1: per request).
            request.max_content_length = self.settings.max_pdf_bytes + FORM_SLACK_BYTES
            params, files = callback_parts()
            return self.receive(params, files, request.headers.get(phaxio.SIGNATURE_HEADER))

        @callbacks.post("/status")
        def status():
            params, files = callback_parts()
            return self.status_update(params, files, request.headers.get(phaxio.SIGNATURE_HEADER))

        staff = Blueprint("fax_staff", __name__, url_prefix="/api/v1/cloud/faxes")

        @staff.post("/outbound")
        @require_staff
        def send():
            # A base64 PDF is far larger than the service's other JSON bodies (Flask 3.1: per request).
            request.max_content_length = 4 * ((self.settings.max_pdf_bytes + 2) // 3) + FORM_SLACK_BYTES
            key = idempotency_key_header()  # refused before the body
            return self.send(g.identity, json_body(), key)

        @staff.get("/outbound/<outbound_id>")
        @require_staff
        def outbound_view(outbound_id: str):
            return self.outbound.view(g.identity, path_id(outbound_id, "fax"))

        @staff.get("/outbound/<outbound_id>/pdf")
        @require_staff
        def outbound_pdf(outbound_id: str):
            fid = path_id(outbound_id, "fax")
            response = Response(self.outbound.pdf(g.identity, fid), mimetype="application/pdf")
            response.headers["Content-Disposition"] = f'inline; filename="{fid}.pdf"'
            return response

        @staff.get("/<fax_id>")
        @require_staff
        def view(fax_id: str):
            return self.view(g.identity, path_id(fax_id, "fax"))

        @staff.get("/<fax_id>/pdf")
        @require_staff
        def pdf(fax_id: str):
            fid = path_id(fax_id, "fax")
            response = Response(self.pdf(g.identity, fid), mimetype="application/pdf")
            response.headers["Content-Disposition"] = f'inline; filename="{fid}.pdf"'
            return response

        return [callbacks, staff]
