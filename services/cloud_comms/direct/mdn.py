"""Message Disposition Notifications (RFC 3798, Direct Implementation Guide for Delivery Notification).

Each stored message has one state per disposition in its document (`mdn_processed`,
`mdn_dispatched`, `mdn_failed`): "due" -> "sending" (claimed atomically by one process) -> "sent",
or back to "due" after a failed attempt (with a delay), or "abandoned" (terminal: the attempts
ran out, the relay refused it permanently, or no certificate can be encrypted for). A disposition
is generated once: never while another process holds it, never again once sent.

`processed` is due when the message is stored (always: the Applicability Statement requires it).
`dispatched` only when the sender asked for it (`Disposition-Notification-Options:
X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true`, compose.asks_final_delivery), once its delivery
request left the outbox (the relay had the broker confirm the `board_item.delivery_requested.v1`
event, i.e. it is handed to inbox for the boards); it then carries the
`X-DIRECT-FINAL-DESTINATION-DELIVERY` extension field. `failed` when the address has no linked
staff or the delivery request was not published within CLOUD_DIRECT_DISPATCH_TIMEOUT_S.

The MDN is signed with the agency's Direct identity (detached, SHA-256) and encrypted (AES-256-CBC)
for the original sender (`encryption_certificate`: a configured recipient certificate first, else
the original signer's if it may be encrypted for), through outgoing.py (the path outbound messages
take too), then sent through CLOUD_SMTP_RELAY. A report this HISP receives (an MDN or DSN about one
of our outbound messages, reports.py) never gets an MDN back (RFC 3798).
"""

from __future__ import annotations

import email.utils
import uuid

from cryptography import x509

from services.cloud_comms.direct import outgoing
from services.cloud_comms.direct.compose import FINAL_DELIVERY_FIELD
from services.cloud_comms.direct.recipients import RecipientCertificates, encryption_problem
from services.cloud_comms.direct.smime import Identity

REPORTING_UA = "cloud-comms; clinic message board HISP"
DISPOSITIONS = ("processed", "dispatched", "failed")
TEXT = {
    "processed": "Your message was received and processed by the recipient's HISP.",
    "dispatched": "Your message was delivered to the recipient's message board.",
    "failed": "Your message could not be delivered to the recipient.",
}


def report(
    *, disposition: str, recipient: str, original_message_id: str, reporting_host: str, failure: str = ""
) -> bytes:
    """The multipart/report MIME entity (CRLF line ends), before signing."""
    boundary = "mdn_" + uuid.uuid4().hex
    modifier = "/error" if disposition == "failed" else ""
    fields = [
        f"Reporting-UA: {reporting_host}; {REPORTING_UA}",
        f"Final-Recipient: rfc822; {recipient}",
        f"Original-Message-ID: {original_message_id}",
        f"Disposition: automatic-action/MDN-sent-automatically; {disposition}{modifier}",
    ]
    if disposition == "dispatched":
        fields.append(f"{FINAL_DELIVERY_FIELD}:")
    if disposition == "failed" and failure:
        fields.append(f"Failure: {failure}")
    lines = [
        f'Content-Type: multipart/report; report-type=disposition-notification; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        TEXT[disposition],
        "",
        f"--{boundary}",
        "Content-Type: message/disposition-notification",
        "",
        *fields,
        "",
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(lines).encode("ascii", "replace")


def encryption_certificate(
    recipient: str, signer: x509.Certificate, configured: RecipientCertificates
) -> x509.Certificate | None:
    """The certificate an MDN to `recipient` is encrypted for: the configured recipient
    certificate covering it, else the original signer's when it may be encrypted for (RSA,
    keyEncipherment or no key usage, valid now); None when neither can be used."""
    found = configured.for_address(recipient)
    if found is not None:
        return found
    return None if encryption_problem(signer) else signer


def build(
    *,
    disposition: str,
    sender: str,
    original_from: str,
    original_message_id: str,
    original_subject: str,
    identity: Identity,
    recipient_cert: x509.Certificate,
    reporting_host: str,
    failure: str = "",
) -> tuple[str, bytes]:
    """(Message-ID, full message bytes): the report signed by the agency and encrypted for the
    original sender's certificate, with outer headers."""
    entity = report(
        disposition=disposition,
        recipient=sender,
        original_message_id=original_message_id,
        reporting_host=reporting_host,
        failure=failure,
    )
    body = outgoing.sign_and_encrypt(entity, identity, [recipient_cert])
    message_id = email.utils.make_msgid(domain=sender.rpartition("@")[2] or None)
    subject = {"processed": "Processed", "dispatched": "Dispatched", "failed": "Failed"}[disposition]
    headers = [
        ("From", sender),
        ("To", original_from),
        ("Subject", f"{subject}: {original_subject}"),
        ("Message-ID", message_id),
        ("In-Reply-To", original_message_id),
        ("Date", email.utils.formatdate(usegmt=True)),
    ]
    return message_id, outgoing.message(headers, body)
