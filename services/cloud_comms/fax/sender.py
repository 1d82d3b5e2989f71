"""The `fax-sender` worker: hands queued faxes to the provider, one replica per fax, never twice.

Every `CLOUD_FAX_SEND_PASS_S` it takes the faxes whose `send_due_at` has come (index) and claims
each with one conditional write (`send_due_at` and `version` as read; a new `send_claim` token,
`send_due_at` moved a lease ahead, `send_attempts` + 1): of several replicas only one claims a fax.
Then, as the holder of that token:

- a fax tried before (a retry, or a sender that died mid-upload and whose lease lapsed) is first
  looked up at the provider by the tag it is sent with (`tag[outbound_id]`): found, its id is
  adopted and nothing is sent again;
- otherwise `POST <api>/faxes` (phaxio_api.py). Accepted: status `sending` with the provider's id
  (its callbacks then move it on). Refused (4xx): `failure` with the provider's message. Not
  reachable, timed out, 5xx or 429: back to `queued`, due again after CLOUD_FAX_SEND_RETRY_S
  doubled per try (capped at 15 minutes), until CLOUD_FAX_SEND_ATTEMPTS tries: then `failure`.
  Our credentials refused (401/403): a configuration fault, not the fax's: retried the same way
  (the same tries and waits), one error logged per pass however many faxes it stopped, then
  `failure` "the fax provider refused our credentials".

The lease (CLOUD_FAX_SEND_LEASE_S, 5 min) is longer than an upload may take (connect 5 s + the
answer CLOUD_FAX_SEND_TIMEOUT_S), so a claimed fax is only taken over when its sender is gone. A
status callback that arrives first (it names our tag) records the provider's id and ends the
sending the same way, and every write of the sender is conditional on its token and the version.

The one window for a duplicate: the provider accepted the fax, the sender died before writing the
id, no callback came, and the provider's list did not show the fax yet when the next try looked it
up by its tag.
"""

from __future__ import annotations

import logging
import secrets
import threading

from services.cloud_comms.fax.outbound import Change, OutboundFaxes
from services.cloud_comms.fax.phaxio_api import CredentialsRefused, PhaxioApi, Refused, Transient
from services.cloud_comms.fax.settings import FaxSettings
from services.kit.errors import Unavailable
from services.kit.mongo import now_ms

log = logging.getLogger(__name__)

BATCH = 20
MAX_RETRY_MS = 15 * 60 * 1000
CREDENTIALS_REFUSED = "the fax provider refused our credentials"


class FaxSender:
    def __init__(self, outbound: OutboundFaxes, settings: FaxSettings, api: PhaxioApi, callback_url: str):
        self.outbound = outbound
        self.settings = settings
        self.api = api
        self.callback_url = callback_url

    def run(self, stop_event: threading.Event) -> None:
        while not stop_event.is_set():
            try:
                self.send_pass()
            except Exception:
                log.exception("fax send pass failed")
            stop_event.wait(self.settings.send_pass_s)

    def send_pass(self) -> int:
        """Claim and try every fax due now; how many were tried."""
        now = now_ms()
        due = self.outbound.faxes.find(
            {"send_due_at": {"$lte": now}}, projection={"_id": 1, "send_due_at": 1, "version": 1}
        )
        tried = refused = 0
        for doc in list(due.sort("send_due_at", 1).limit(BATCH)):
            token = self._claim(doc, now)
            if token is not None:
                refused += self._attempt(doc["_id"], token) == CREDENTIALS_REFUSED
                tried += 1
        if refused:
            log.error(
                "the fax provider refused our credentials: check CLOUD_FAX_API_KEY and CLOUD_FAX_API_SECRET",
                extra={"code": "credentials_refused", "count": refused},
            )
        return tried

    def _claim(self, doc: dict, now: int) -> str | None:
        token = secrets.token_hex(8)
        claimed = self.outbound.faxes.update_one(
            {
                "_id": {"$eq": doc["_id"]},
                "version": {"$eq": doc["version"]},
                "send_due_at": {"$eq": doc["send_due_at"]},
            },
            {
                "$set": {
                    "send_claim": token,
                    "send_due_at": now + int(self.settings.send_lease_s * 1000),
                    "version": doc["version"] + 1,
                },
                "$inc": {"send_attempts": 1},
            },
        )
        return token if claimed.modified_count == 1 else None

    def _attempt(self, fid: str, token: str) -> str:
        """One try of a claimed fax; CREDENTIALS_REFUSED when the provider refused our credentials."""
        doc = self.outbound.find(fid)
        if doc is None or doc.get("send_claim") != token:
            return ""
        try:
            provider_id = self.api.find_sent(fid) if doc["send_attempts"] > 1 else None
            if provider_id is None:
                recipient = self.outbound.recipient(doc)
                provider_id = self.api.send(
                    to=recipient["to_number"],
                    caller_id=doc["from_number"],
                    pdf=self.outbound.stored_pdf(doc),
                    filename=recipient["filename"],
                    callback_url=self.callback_url,
                    tag=fid,
                )
        except CredentialsRefused as exc:
            reason = f"{CREDENTIALS_REFUSED} (HTTP {exc.status})"
            self._retry_or_fail(fid, token, doc["send_attempts"], reason, final=CREDENTIALS_REFUSED)
            return CREDENTIALS_REFUSED
        except Refused as exc:
            self._finish(fid, token, failure=f"the fax provider refused it: {exc.message}")
        except Unavailable:
            self._finish(fid, token, failure="the stored PDF cannot be opened")
        except Transient as exc:
            self._retry_or_fail(fid, token, doc["send_attempts"], str(exc))
        else:
            self._finish(fid, token, provider_id=provider_id)
        return ""

    def _finish(self, fid: str, token: str, *, provider_id: str = "", failure: str = "") -> None:
        """The provider has it (its id), or it failed for good (the reason)."""

        def decide(doc: dict) -> Change | None:
            if doc.get("send_claim") != token:
                return None
            if doc.get("provider_fax_id") or provider_id:  # accepted (a callback may have said so first)
                fields = {"send_claim": "", "provider_fax_id": doc.get("provider_fax_id") or provider_id}
                status = "sending" if doc["status"] == "queued" else None
                return Change(status, "", fields, ("send_due_at",))
            return Change("failure", failure, {"send_claim": "", "failure_reason": failure}, ("send_due_at",))

        doc, _ = self.outbound.transition(fid, decide)
        if doc is not None:
            log.info("fax handed to the provider" if provider_id else "fax not sent", extra={"item_id": fid})

    def _retry_or_fail(self, fid: str, token: str, attempts: int, reason: str, *, final: str = "") -> None:
        """Due again after the backoff, or (the tries used up) failed with `final` (default: the
        provider could not be reached)."""
        limit = self.settings.send_attempts
        if attempts >= limit:
            self._finish(
                fid, token, failure=final or f"the fax provider could not be reached ({attempts} tries): {reason}"
            )
            return
        delay_ms = min(int(self.settings.send_retry_s * 1000) * 2 ** (attempts - 1), MAX_RETRY_MS)

        def decide(doc: dict) -> Change | None:
            if doc.get("send_claim") != token:
                return None  # taken over
            if doc.get("provider_fax_id"):  # a status callback showed the provider has it after all
                return Change(None, "", {"send_claim": ""}, ("send_due_at",))
            detail = f"try {attempts} of {limit} failed: {reason}; next try in {delay_ms // 1000} s"
            return Change(None, detail, {"send_claim": "", "send_due_at": now_ms() + delay_ms})

        self.outbound.transition(fid, decide)
        log.warning("fax send failed, will retry", extra={"item_id": fid, "count": attempts})
