"""The MIME of an outbound Direct message (before outgoing.sign_and_encrypt), and its outer headers.

Inner entity (the signed content): `multipart/mixed` of the text (`text/plain; charset=utf-8`,
quoted-printable) and each attachment (base64, `Content-Disposition: attachment` with its file
name), or the text part alone. Its `Subject` is repeated inside, where a receiving HISP reading
protected headers (ours does) finds it.

Outer headers: From, To, Subject, Date, Message-ID, for a reply In-Reply-To and References (the
original's Message-ID), `Disposition-Notification-To: <from>` (RFC 3798: where MDNs go) and
`Disposition-Notification-Options: X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true` (Direct IG
for Delivery Notification: timely and reliable delivery, so the receiving HISP sends `processed` and
then a `dispatched` carrying the `X-DIRECT-FINAL-DESTINATION-DELIVERY` field).
"""

from __future__ import annotations

import email.policy
import email.utils
from collections.abc import Sequence
from email.message import EmailMessage

FINAL_DELIVERY_FIELD = "X-DIRECT-FINAL-DESTINATION-DELIVERY"
FINAL_DELIVERY_OPTION = f"{FINAL_DELIVERY_FIELD}=optional,true"


def reply_subject(subject: str, limit: int = 200) -> str:
    subject = " ".join(subject.split())
    if subject.lower().startswith("re:"):
        return subject[:limit]
    return f"Re: {subject or '(no subject)'}"[:limit]


def entity(text: str, attachments: Sequence[tuple[str, str, bytes]], subject: str) -> bytes:
    """The inner MIME entity (CRLF) of `text` and [(filename, content type, bytes)]."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["Subject"] = " ".join(subject.split())
    msg.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
    for filename, content_type, data in attachments:
        maintype, _, subtype = content_type.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def headers(
    *,
    sender: str,
    to: Sequence[str],
    subject: str,
    message_id: str,
    date_ms: int,
    in_reply_to: str = "",
) -> list[tuple[str, str]]:
    fields = [
        ("From", sender),
        ("To", ", ".join(to)),
        ("Subject", subject),
        ("Date", email.utils.formatdate(date_ms / 1000, usegmt=True)),
        ("Message-ID", message_id),
    ]
    if in_reply_to:
        fields += [("In-Reply-To", in_reply_to), ("References", in_reply_to)]
    fields.append(("Disposition-Notification-To", sender))
    fields.append(("Disposition-Notification-Options", FINAL_DELIVERY_OPTION))
    return fields


def asks_final_delivery(*values: str) -> bool:
    """Whether `Disposition-Notification-Options` values ask for final delivery (RFC 3798 syntax
    `name=importance,value[,value]; ...`): the Direct option with the value true, names and
    values case-insensitive, importance required or optional."""
    for value in values:
        for option in (value or "").split(";"):
            name, _, rest = option.partition("=")
            importance, _, given = rest.partition(",")
            wanted = name.strip().lower() == FINAL_DELIVERY_FIELD.lower()
            if wanted and importance.strip().lower() in ("required", "optional"):
                if "true" in (v.strip().lower() for v in given.split(",")):
                    return True
    return False
