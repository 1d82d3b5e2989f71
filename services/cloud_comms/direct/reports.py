"""Reports about our outbound messages, read from an inbound entity (a verified, decrypted one, or
a plain bounce from a mail server: feature.py decides which it may be).

- MDN (RFC 3798; Direct IG for Delivery Notification): `multipart/report;
  report-type=disposition-notification` with a `message/disposition-notification` part.
  `Original-Message-ID` names our message (angle brackets added when missing; the MDN's
  `In-Reply-To` when the field is absent). `Disposition: <mode>; <type>[/<modifier>,...][;
  extension]`, (comments) removed, the type read right after the first `;`: any modifier `error` ->
  failed; failed, deleted, denied -> failed; processed -> processed; dispatched -> dispatched only
  with the `X-DIRECT-FINAL-DESTINATION-DELIVERY` extension field in the same part (the IG's mark of
  final delivery; every message of ours asks for it), else processed ("dispatched, final delivery
  not confirmed"); displayed -> processed likewise. Other types are ignored.
- DSN (RFC 3464): `multipart/report; report-type=delivery-status`: every per-recipient block with
  `Action: failed` fails its `Original-Recipient` (Postfix rewrites `Final-Recipient` to the
  internal address), else its `Final-Recipient` (`rfc822;`, brackets stripped, lowercased), with
  its `Status` code kept on the outcome. Our message is named by the per-message
  `X-Original-Message-ID` (Direct IG) or else the `Message-ID` of the returned headers
  (`text/rfc822-headers` or `message/rfc822`). Other actions (delivered, delayed...) are ignored:
  only an MDN says a Direct message was processed or dispatched.

The notification part may be base64 or quoted-printable encoded and may start with blank lines.
`parse` answers None for anything else (an ordinary message); a report it cannot read names no
message (and is dropped as unmatched). Details are generated here, never copied from the
report's free text.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import quopri
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message

from services.cloud_comms.direct.compose import FINAL_DELIVERY_FIELD

FAILED_TYPES = ("failed", "deleted", "denied")
STATUS_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
MESSAGE_ID = re.compile(r"<[^<>\s]{1,994}>")
BARE_MESSAGE_ID = re.compile(r"[^<>\s@]{1,500}@[^<>\s@]{1,490}")
COMMENT = re.compile(r"\([^()]*\)")


@dataclass(frozen=True)
class Outcome:
    """One recipient's news: `recipient` is "" for an MDN (its verified sender is the recipient);
    `status` is a DSN's status code (e.g. "5.1.1"), "" for an MDN."""

    recipient: str
    state: str
    detail: str
    status: str = ""


@dataclass(frozen=True)
class Report:
    kind: str  # "mdn" | "dsn"
    original_message_id: str
    outcomes: tuple[Outcome, ...]


def _serialised(block: Message) -> str:
    head = "".join(f"{name}: {value}\n" for name, value in block.items())
    body = block.get_payload()
    return head + "\n" + (body if isinstance(body, str) else "")


def _text(part: Message) -> str:
    """The part's text as sent, whatever the email parser made of it (it parses message/* bodies
    as messages), its transfer encoding undone."""
    payload = part.get_payload()
    text = "\n\n".join(_serialised(b) for b in payload) if isinstance(payload, list) else str(payload or "")
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    try:
        if encoding == "base64":
            text = base64.b64decode(re.sub(r"\s+", "", text), validate=True).decode("utf-8", "replace")
        elif encoding == "quoted-printable":
            text = quopri.decodestring(text.encode("utf-8", "replace")).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return ""
    return text.replace("\r\n", "\n")


def _blocks(part: Message) -> list[dict[str, str]]:
    """The field blocks of a message/disposition-notification or message/delivery-status part,
    names lowercased, values unfolded."""
    parser = email.parser.HeaderParser(policy=email.policy.compat32)
    return [
        {k.lower(): " ".join(str(v).split()) for k, v in parser.parsestr(chunk.strip("\n") + "\n").items()}
        for chunk in re.split(r"\n[ \t]*\n", _text(part))
        if chunk.strip()
    ]


def message_id(value: str) -> str:
    """`<id@host>` from a field naming one, with or without its angle brackets; else ""."""
    value = COMMENT.sub("", value or "").strip()
    found = MESSAGE_ID.search(value)
    if found:
        return found.group(0)
    bare = BARE_MESSAGE_ID.fullmatch(value)
    return f"<{bare.group(0)}>" if bare else ""


def _address(value: str) -> str:
    """`rfc822; <someone@example>` -> `someone@example` (lowercased)."""
    _, _, address = COMMENT.sub("", value or "").rpartition(";")
    return address.strip().strip("<>").strip().lower()


def _part(entity: Message, content_type: str) -> Message | None:
    return next((p for p in entity.walk() if p.get_content_type() == content_type), None)


def disposition(value: str) -> tuple[str, tuple[str, ...]]:
    """(type, modifiers) of a Disposition field: `mode; type/mod1,mod2; extension (comment)`."""
    _, _, after = COMMENT.sub("", value or "").lower().partition(";")
    kind, _, modifiers = after.partition(";")[0].strip().partition("/")
    return kind.strip(), tuple(m.strip() for m in modifiers.split(",") if m.strip())


def _mdn_outcome(fields: dict[str, str]) -> Outcome | None:
    kind, modifiers = disposition(fields.get("disposition", ""))
    if "error" in modifiers or kind in FAILED_TYPES:
        shown = re.sub(r"[^a-z/,-]", "", f"{kind}/{','.join(modifiers)}" if modifiers else kind)[:40]
        return Outcome("", "failed", f"failure notification received ({shown})")
    if kind == "processed":
        return Outcome("", "processed", "processed notification received")
    if kind in ("dispatched", "displayed"):
        if kind == "dispatched" and FINAL_DELIVERY_FIELD.lower() in fields:
            return Outcome("", "dispatched", "dispatched notification received (final delivery)")
        return Outcome("", "processed", f"{kind} notification received without final-delivery confirmation")
    return None


def _mdn(entity: Message, fallback_id: str) -> Report:
    part = _part(entity, "message/disposition-notification")
    if part is None:
        return Report("mdn", "", ())
    fields = {k: v for block in _blocks(part) for k, v in block.items()}
    original = message_id(fields.get("original-message-id", "")) or message_id(fallback_id)
    outcome = _mdn_outcome(fields)
    return Report("mdn", original, (outcome,) if outcome else ())


def _returned_message_id(entity: Message) -> str:
    for content_type in ("text/rfc822-headers", "message/rfc822-headers"):
        part = _part(entity, content_type)
        if part is not None:
            text = _text(part).lstrip("\n")
            headers = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(text)
            return message_id(str(headers.get("Message-ID", "")))
    part = _part(entity, "message/rfc822")
    if part is not None and isinstance(part.get_payload(), list) and part.get_payload():
        return message_id(str(part.get_payload()[0].get("Message-ID", "")))
    return ""


def _dsn(entity: Message) -> Report:
    part = _part(entity, "message/delivery-status")
    if part is None:
        return Report("dsn", "", ())
    blocks = _blocks(part)
    per_message = blocks[0] if blocks else {}
    original = message_id(per_message.get("x-original-message-id", "")) or _returned_message_id(entity)
    outcomes = []
    for block in blocks[1:]:
        if block.get("action", "").strip().lower() != "failed":
            continue
        recipient = _address(block.get("original-recipient", "")) or _address(block.get("final-recipient", ""))
        found = STATUS_CODE.search(block.get("status", ""))
        status = found.group(0) if found else ""
        detail = "delivery status notification: failed" + (f" ({status})" if status else "")
        if recipient:
            outcomes.append(Outcome(recipient, "failed", detail, status))
    return Report("dsn", original, tuple(outcomes))


def parse(entity: EmailMessage, fallback_id: str = "") -> Report | None:
    """The report `entity` carries (unwrapping a message/rfc822 wrapper), else None. An MDN
    without `Original-Message-ID` names the message of its `In-Reply-To` (the wrapped headers',
    else `fallback_id`: the outer header's)."""
    if entity.get_content_type() == "message/rfc822":
        payload = entity.get_payload()
        entity = payload[0] if isinstance(payload, list) and payload else entity
    if entity.get_content_type() != "multipart/report":
        return None
    report_type = str(entity.get_param("report-type", "", header="content-type") or "").lower()
    if report_type == "disposition-notification":
        return _mdn(entity, str(entity.get("In-Reply-To") or "") or fallback_id)
    if report_type == "delivery-status":
        return _dsn(entity)
    return None
