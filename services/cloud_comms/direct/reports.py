"""Reports about our outbound messages, read from a verified, decrypted inbound entity.

- MDN (RFC 3798; Direct IG for Delivery Notification): `multipart/report;
  report-type=disposition-notification` with a `message/disposition-notification` part:
  `Original-Message-ID` names our message; `Disposition: <mode>; <type>[/<modifier>]`:
  processed -> processed; dispatched (and displayed) -> dispatched; failed, deleted, denied, or any
  type with the modifier `error` -> failed. Other types are ignored.
- DSN (RFC 3464): `multipart/report; report-type=delivery-status`: every per-recipient block with
  `Action: failed` fails that `Final-Recipient` (or `Original-Recipient`). Our message is named by
  the per-message `X-Original-Message-ID` (Direct IG) or else the `Message-ID` of the returned
  headers (`text/rfc822-headers` or `message/rfc822`). Other actions (delivered, delayed...) are
  ignored: only an MDN says a Direct message was processed or dispatched.

`parse` answers None for anything else (an ordinary message); a report it cannot read names no
message (and is dropped as unmatched). Details are generated here, never copied from the
report's free text.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message

MDN_STATES = {
    "processed": "processed",
    "dispatched": "dispatched",
    "displayed": "dispatched",
    "failed": "failed",
    "deleted": "failed",
    "denied": "failed",
}
STATUS_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
MESSAGE_ID = re.compile(r"<[^<>\s]{1,994}>")


@dataclass(frozen=True)
class Outcome:
    """One recipient's news: `recipient` is "" for an MDN (its verified sender is the recipient)."""

    recipient: str
    state: str
    detail: str


@dataclass(frozen=True)
class Report:
    kind: str  # "mdn" | "dsn"
    original_message_id: str
    outcomes: tuple[Outcome, ...]


def _blocks(part: Message) -> list[dict[str, str]]:
    """The field blocks of a message/disposition-notification or message/delivery-status part,
    names lowercased."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [{k.lower(): str(v).strip() for k, v in block.items()} for block in payload]
    parser = email.parser.HeaderParser(policy=email.policy.compat32)
    text = str(payload or "").replace("\r\n", "\n")
    return [
        {k.lower(): str(v).strip() for k, v in parser.parsestr(chunk).items()}
        for chunk in re.split(r"\n\s*\n", text)
        if chunk.strip()
    ]


def _message_id(value: str) -> str:
    found = MESSAGE_ID.search(value or "")
    return found.group(0) if found else ""


def _address(value: str) -> str:
    """`rfc822; someone@example` -> `someone@example` (lowercased)."""
    _, _, address = (value or "").rpartition(";")
    return address.strip().strip("<>").lower()


def _part(entity: Message, content_type: str) -> Message | None:
    return next((p for p in entity.walk() if p.get_content_type() == content_type), None)


def _mdn(entity: Message) -> Report:
    part = _part(entity, "message/disposition-notification")
    if part is None:
        return Report("mdn", "", ())
    fields = {k: v for block in _blocks(part) for k, v in block.items()}
    _, _, disposition = fields.get("disposition", "").rpartition(";")
    kind, _, modifier = disposition.strip().lower().partition("/")
    state = "failed" if modifier.strip() == "error" else MDN_STATES.get(kind.strip())
    outcomes = ()
    if state is not None:
        detail = {
            "processed": "processed notification received",
            "dispatched": "dispatched notification received",
        }.get(state, f"failure notification received ({re.sub(r'[^a-z/-]', '', disposition.strip().lower())[:40]})")
        outcomes = (Outcome("", state, detail),)
    return Report("mdn", _message_id(fields.get("original-message-id", "")), outcomes)


def _returned_message_id(entity: Message) -> str:
    for content_type in ("text/rfc822-headers", "message/rfc822-headers"):
        part = _part(entity, content_type)
        if part is not None:
            headers = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(str(part.get_payload()))
            return _message_id(str(headers.get("Message-ID", "")))
    part = _part(entity, "message/rfc822")
    if part is not None and isinstance(part.get_payload(), list) and part.get_payload():
        return _message_id(str(part.get_payload()[0].get("Message-ID", "")))
    return ""


def _dsn(entity: Message) -> Report:
    part = _part(entity, "message/delivery-status")
    if part is None:
        return Report("dsn", "", ())
    blocks = _blocks(part)
    per_message = blocks[0] if blocks else {}
    original = _message_id(per_message.get("x-original-message-id", "")) or _returned_message_id(entity)
    outcomes = []
    for block in blocks[1:]:
        if block.get("action", "").lower() != "failed":
            continue
        recipient = _address(block.get("final-recipient", "") or block.get("original-recipient", ""))
        status = STATUS_CODE.search(block.get("status", ""))
        detail = "delivery status notification: failed" + (f" ({status.group(0)})" if status else "")
        if recipient:
            outcomes.append(Outcome(recipient, "failed", detail))
    return Report("dsn", original, tuple(outcomes))


def parse(entity: EmailMessage) -> Report | None:
    """The report `entity` carries (unwrapping a message/rfc822 wrapper), else None."""
    if entity.get_content_type() == "message/rfc822":
        payload = entity.get_payload()
        entity = payload[0] if isinstance(payload, list) and payload else entity
    if entity.get_content_type() != "multipart/report":
        return None
    report_type = str(entity.get_param("report-type", "", header="content-type") or "").lower()
    if report_type == "disposition-notification":
        return _mdn(entity)
    if report_type == "delivery-status":
        return _dsn(entity)
    return None
