"""eFax: faxes received at an agency's fax number, onto the boards of the staff linked to it, and the
audited staff view of each fax and its PDF.

Inbound (`POST /api/v1/fax/callbacks/received`, routed by the gateway without authentication: the
signature is the authentication): the provider's callback is checked (X-Phaxio-Signature, phaxio.py)
before anything else is read; the receiving number is resolved through directory (agency, linked
staff); the PDF is checked (PDF header and end marker, size limit) and stored sealed with the
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
"""

from __future__ import annotations

import base64
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
from services.cloud_comms.fax import phaxio
from services.cloud_comms.fax.settings import FaxSettings
from services.kit.auth import Identity
from services.kit.crypto import DecryptionError
from services.kit.errors import InvalidInput, NotFound, Unauthenticated, Unavailable
from services.kit.http import require_staff
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import outbox_fields
from services.kit.service_identity import acting_as
from services.kit.validation import path_id

log = logging.getLogger(__name__)

FAXES = "faxes"
FAX_CHUNKS = "fax_chunks"
CHANNEL = "fax"
RESOURCE_TYPE = "fax"
# PDF bytes per sealed chunk: base64 (x4/3) plus the envelope stay far below MongoDB's 16 MiB.
CHUNK_BYTES = 3 * 1024 * 1024
# Room for the multipart framing and the form fields around the PDF.
FORM_SLACK_BYTES = 256 * 1024
INDEXES = [
    IndexSpec(FAXES, [("agency_id", 1), ("received_at", -1)], name="faxes_by_agency"),
    IndexSpec(FAX_CHUNKS, [("fax_id", 1), ("n", 1)], name="fax_chunks_by_fax"),
]


def fax_doc_id(agency_id: str, provider: str, provider_fax_id: str) -> str:
    """One received fax of one agency, however often the provider calls back about it."""
    return "fax_" + hashlib.sha256(f"{agency_id}\x1f{provider}\x1f{provider_fax_id}".encode()).hexdigest()[:32]


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def board_title(from_number: str) -> str:
    return f"Fax from {from_number or 'an unknown number'}"


def board_summary(pages: int, received_ms: int, zone: dt.tzinfo) -> str:
    when = dt.datetime.fromtimestamp(received_ms / 1000, zone)
    count = "1 page" if pages == 1 else f"{pages} pages"
    return f"{count} · received {when.strftime('%Y-%m-%d %H:%M')} {when.tzname() or ''}".rstrip()


class Faxes(Feature):
    outbox_collections = (FAXES,)

    def __init__(self, components):
        super().__init__(components)
        db = components.store.db
        self.faxes = db[FAXES]
        self.chunks = db[FAX_CHUNKS]
        self.cipher = components.cipher

    @property
    def settings(self) -> FaxSettings:
        return self.components.settings.fax

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES)

    # --- inbound ----------------------------------------------------------------------------------
    def receive(self, params: list[tuple[str, str]], files: list[tuple[str, bytes]], given_signature: str | None):
        """One received-fax callback: (body, status). Raises kit errors for the refusals."""
        settings = self.settings
        if not phaxio.signature_valid(
            settings.callback_token, settings.received_callback_url, params, files, given_signature
        ):
            self.components.store.record_security_event(
                CHANNEL, "invalid_signature", "missing or wrong X-Phaxio-Signature", peer=request.remote_addr or ""
            )
            log.warning("fax callback refused: invalid signature")
            raise Unauthenticated("invalid_signature", "the callback signature does not match")
        form: dict[str, str] = {}
        for name, value in params:
            form.setdefault(name, value)
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
        pieces = [pdf[start : start + CHUNK_BYTES] for start in range(0, len(pdf), CHUNK_BYTES)]
        for n, piece in enumerate(pieces):
            chunk_id = f"{fid}_{n}"
            sealed = self.cipher.seal(agency_id, chunk_id, "pdf", base64.b64encode(piece).decode("ascii"))
            self.chunks.replace_one(
                {"_id": chunk_id}, {"_id": chunk_id, "fax_id": fid, "agency_id": agency_id, "n": n, "data": sealed},
                upsert=True,
            )
        recipients = list(dict.fromkeys(address.staff_ids))
        received = fax.received_at_ms or now_ms()
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
            "stored_at": now_ms(),
            "pdf_bytes": len(pdf),
            "pdf_chunks": len(pieces),
            "is_test": fax.is_test,
            "recipient_ids": recipients,
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
        try:
            caller_fields = json.loads(self.cipher.open(caller.agency_id, fid, "caller", doc["caller"]))
        except DecryptionError as exc:
            raise Unavailable("unreadable", "the fax cannot be opened") from exc
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
        doc = self._delivered(caller, fid)
        pieces = list(self.chunks.find({"fax_id": {"$eq": fid}}).sort("n", 1))
        if len(pieces) != doc["pdf_chunks"]:
            raise Unavailable("unreadable", "the fax cannot be opened")
        try:
            content = b"".join(
                base64.b64decode(self.cipher.open(caller.agency_id, piece["_id"], "pdf", piece["data"]))
                for piece in pieces
            )
        except DecryptionError as exc:
            raise Unavailable("unreadable", "the fax cannot be opened") from exc
        audit.record(self.components.store, caller, fid, resource_type=RESOURCE_TYPE, action="download")
        return content

    # --- HTTP ---------------------------------------------------------------------------------------
    def blueprints(self) -> list:
        callbacks = Blueprint("fax_callbacks", __name__, url_prefix="/api/v1/fax/callbacks")

        @callbacks.post("/received")
        def received():
            # The PDF may be far larger than the service's JSON bodies (Flask 3.1: per request).
            request.max_content_length = self.settings.max_pdf_bytes + FORM_SLACK_BYTES
            params = [(name, value) for name, value in request.form.items(multi=True)]
            files = [(name, storage.read()) for name, storage in request.files.items(multi=True)]
            return self.receive(params, files, request.headers.get(phaxio.SIGNATURE_HEADER))

        staff = Blueprint("fax_staff", __name__, url_prefix="/api/v1/cloud/faxes")

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
