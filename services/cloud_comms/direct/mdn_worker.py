"""The `direct-mdn` worker: sends the MDNs of stored inbound messages (mdn.py says which and when).

Per message and disposition the state field `mdn_<disposition>` goes "due" -> "sending" (claimed by
a conditional update: one replica) -> "sent". A failed attempt (relay unreachable, 4xx) counts in
`mdn_<disposition>_attempts` and is due again 30 s later; after CLOUD_DIRECT_MDN_MAX_ATTEMPTS
attempts, or at once on a permanent refusal (a 5xx from the relay, no certificate the MDN can be
encrypted for, no identity for the address any more, an MDN that cannot be built), it ends
"abandoned" with `mdn_<disposition>_error` (the reason; never content), and so do this message's
other MDNs still waiting or due (they would meet the same end). Logged `mdn abandoned`.

`dispatched` waits ("waiting") until `processed` was sent; then it is due when the sender asked for
final delivery and its delivery request left the outbox, "none" when the sender did not ask, and
replaced by a due `failed` when the delivery request was not published within
CLOUD_DIRECT_DISPATCH_TIMEOUT_S.
"""

from __future__ import annotations

import json
import logging
import smtplib
import threading

from cryptography import x509

from services.cloud_comms.direct import mdn, outgoing
from services.kit.crypto import DecryptionError
from services.kit.mongo import now_ms

log = logging.getLogger(__name__)

SENDING_LEASE_MS = 5 * 60 * 1000
RETRY_MS = 30 * 1000
MDN_BATCH = 50
PENDING = ("waiting", "due")


class Abandon(Exception):
    """An MDN that can never be sent: `reason` is recorded on the message."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _permanent(code: int) -> bool:
    return 500 <= code < 600


class MdnWorker:
    def __init__(self, feature):
        self.feature = feature
        self.direct = feature.direct
        self.messages = feature.messages

    def run(self, stop_event: threading.Event) -> None:
        if not self.direct.relay_host:
            log.warning("no CLOUD_SMTP_RELAY: MDNs stay due until one is configured")
            return
        while not stop_event.is_set():
            try:
                self.run_pass()
            except Exception:
                log.exception("mdn pass failed")
            stop_event.wait(self.direct.mdn_pass_s)

    def run_pass(self) -> int:
        """Promote, claim and send what is due; the number of MDNs sent."""
        now = now_ms()
        for doc in self.messages.find({"mdn_dispatched": {"$eq": "waiting"}}, projection={"_outbox": 0}).limit(500):
            if doc.get("mdn_processed") == "sent":
                self._promote(doc, now)
        sent = 0
        for disposition in mdn.DISPOSITIONS:
            field = f"mdn_{disposition}"
            for state in ("due", "sending"):
                for doc in self.messages.find({field: {"$eq": state}}, projection={"_outbox": 0}).limit(MDN_BATCH):
                    if disposition == "dispatched" and doc.get("mdn_processed") != "sent":
                        continue
                    at = doc.get(f"{field}_at", 0)
                    if state == "due" and at > now or state == "sending" and now - at < SENDING_LEASE_MS:
                        continue
                    claimed = self.messages.update_one(
                        {
                            "_id": {"$eq": doc["_id"]},
                            field: {"$eq": state},
                            f"{field}_at": {"$eq": doc.get(f"{field}_at")},
                        },
                        {"$set": {field: "sending", f"{field}_at": now}},
                    )
                    if claimed.modified_count == 1:
                        sent += self._send(doc, disposition, field)
        return sent

    def _promote(self, doc: dict, now: int) -> None:
        waiting = {"_id": {"$eq": doc["_id"]}, "mdn_dispatched": {"$eq": "waiting"}}
        if "_outbox_at" not in doc:
            state = "due" if doc.get("final_delivery_requested") else "none"
            self.messages.update_one(waiting, {"$set": {"mdn_dispatched": state}})
        elif now - doc["received_at"] > self.direct.dispatch_timeout_s * 1000:
            self.messages.update_one(
                waiting, {"$set": {"mdn_dispatched": "none", "mdn_failed": "due", "failure": "not delivered in time"}}
            )

    # --- one MDN ------------------------------------------------------------------------------------
    def _subject(self, doc: dict) -> str:
        try:
            opened = self.feature.cipher.open(doc["agency_id"], doc["_id"], "content", doc["content"])
            return json.loads(opened)["subject"]
        except (DecryptionError, KeyError, ValueError):
            return ""

    def _message(self, doc: dict, disposition: str) -> tuple[str, bytes]:
        identity = self.feature.identity_for(doc["address"])
        if identity is None:
            raise Abandon("no Direct identity covers the address any more")
        signer = x509.load_pem_x509_certificate(doc["signer_cert"].encode())
        cert = mdn.encryption_certificate(doc["sender"], signer, self.feature.outbound.recipient_certs)
        if cert is None:
            raise Abandon("no certificate of the original sender can be encrypted for")
        try:
            return mdn.build(
                disposition=disposition,
                sender=doc["address"],
                original_from=doc["sender"],
                original_message_id=doc["message_id"],
                original_subject=self._subject(doc),
                identity=identity,
                recipient_cert=cert,
                reporting_host=self.feature.hostname,
                failure=doc.get("failure", ""),
            )
        except (ValueError, TypeError) as exc:
            raise Abandon(f"the MDN cannot be built ({type(exc).__name__})") from exc

    def _hand_over(self, doc: dict, message: bytes) -> None:
        """One SMTP transaction; Abandon on a permanent refusal, OSError/SMTPException to retry."""
        try:
            refused = outgoing.send(
                self.direct.relay_host,
                self.direct.relay_port,
                envelope_from=doc["address"],
                to=[doc["sender"]],
                message=message,
                local_hostname=self.feature.hostname,
                tls=self.feature.components.settings.smtp_tls.relay,
            )
        except smtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients
        except smtplib.SMTPResponseException as exc:
            if _permanent(exc.smtp_code):
                raise Abandon(f"the relay refused it ({exc.smtp_code})") from exc
            raise
        if refused:
            code = next(iter(refused.values()))[0]
            if _permanent(code):
                raise Abandon(f"the relay refused it ({code})")
            raise smtplib.SMTPException(f"the relay deferred the recipient ({code})")

    def _send(self, doc: dict, disposition: str, field: str) -> int:
        try:
            message_id, message = self._message(doc, disposition)
            self._hand_over(doc, message)
        except Abandon as exc:
            self._abandon(doc, field, exc.reason)
            return 0
        except (smtplib.SMTPException, OSError) as exc:
            return self._failed_attempt(doc, disposition, field, exc)
        self.messages.update_one(
            {"_id": {"$eq": doc["_id"]}},
            {"$set": {field: "sent", f"{field}_at": now_ms(), f"{field}_message_id": message_id}},
        )
        log.info("mdn sent", extra={"code": disposition, "agency_id": doc["agency_id"]})
        return 1

    def _failed_attempt(self, doc: dict, disposition: str, field: str, exc: Exception) -> int:
        attempts = doc.get(f"{field}_attempts", 0) + 1
        if attempts >= self.direct.mdn_max_attempts:
            self._abandon(doc, field, f"not sent after {attempts} attempts ({type(exc).__name__})")
            return 0
        log.warning("mdn not sent", extra={"error_type": type(exc).__name__, "code": disposition})
        self.messages.update_one(
            {"_id": {"$eq": doc["_id"]}, field: {"$eq": "sending"}},
            {"$set": {field: "due", f"{field}_at": now_ms() + RETRY_MS, f"{field}_attempts": attempts}},
        )
        return 0

    def _abandon(self, doc: dict, field: str, reason: str) -> None:
        log.warning("mdn abandoned: %s", reason, extra={"code": field, "agency_id": doc["agency_id"]})
        self.messages.update_one(
            {"_id": {"$eq": doc["_id"]}, field: {"$eq": "sending"}},
            {"$set": {field: "abandoned", f"{field}_at": now_ms(), f"{field}_error": reason}},
        )
        for other in (f"mdn_{d}" for d in mdn.DISPOSITIONS):
            if other != field and doc.get(other) in PENDING:
                self.messages.update_one(
                    {"_id": {"$eq": doc["_id"]}, other: {"$eq": doc[other]}},
                    {"$set": {other: "abandoned", f"{other}_error": f"{field} was abandoned: {reason}"}},
                )
