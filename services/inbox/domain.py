"""Pure rules of the mailbox: who receives a message, what a board item looks like, cursors."""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from dataclasses import dataclass, field

from services.kit.errors import InvalidInput

FOLDER_MESSAGES = "messages"
FOLDER_SENT = "sent"
LISTABLE_FOLDERS = (FOLDER_MESSAGES, FOLDER_SENT)
PRIORITIES = ("normal", "urgent")


@dataclass(frozen=True)
class Addressing:
    """What the sender typed: colleagues, teams and/or the whole agency."""

    staff_ids: tuple[str, ...] = ()
    team_ids: tuple[str, ...] = ()
    whole_agency: bool = False

    def is_empty(self) -> bool:
        return not (self.staff_ids or self.team_ids or self.whole_agency)


@dataclass(frozen=True)
class Draft:
    addressing: Addressing
    subject: str
    body: str
    priority: str = "normal"
    links: tuple[str, ...] = field(default_factory=tuple)


def digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def draft_digest(draft: Draft) -> str:
    """Fingerprint of what was asked for, so a reused idempotency key with another message is caught."""
    a = draft.addressing
    fields = [*sorted(a.staff_ids), "|", *sorted(a.team_ids), str(a.whole_agency), draft.subject, draft.body]
    return digest(*fields, draft.priority, *draft.links)


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def final_recipients(resolved: list[str], addressing: Addressing, sender_id: str) -> list[str]:
    """Resolved staff, each once, without the sender unless they addressed themselves by name."""
    seen: dict[str, None] = {}
    for staff_id in resolved:
        if staff_id == sender_id and sender_id not in addressing.staff_ids:
            continue
        seen.setdefault(staff_id, None)
    if not seen:
        raise InvalidInput("no_recipients", "the message has no recipients other than the sender")
    return list(seen)


def owner_folder(agency_id: str, staff_id: str, folder: str) -> str:
    """The single indexed key of a board: agency, owner and folder together."""
    return f"{agency_id}|{staff_id}|{folder}"


def board_item_id(message_id: str, staff_id: str, folder: str) -> str:
    return f"{message_id}.{staff_id}.{folder}"


def board_item(message: dict, owner: str, folder: str) -> dict:
    """The board item that puts a message on one owner's folder; the encrypted subject rides along
    so a page needs no second query."""
    board = owner_folder(message["agency_id"], owner, folder)
    unread = folder == FOLDER_MESSAGES
    return {
        "_id": board_item_id(message["_id"], owner, folder),
        "agency_id": message["agency_id"],
        "owner_id": owner,
        "folder": folder,
        "board": board,
        "unread_board": board if unread else None,
        "read_at": None if unread else message["sent_at"],
        "message_id": message["_id"],
        "thread_id": message["thread_id"],
        "sender_id": message["sender_id"],
        "sender_name": message.get("sender_name", ""),
        "recipient_count": len(message["recipient_ids"]),
        "priority": message["priority"],
        "subject": message["subject"],
        "sent_at": message["sent_at"],
        "sort_key": sort_key(message["sent_at"], message["_id"]),
    }


def sort_key(sent_at_ms: int, message_id: str) -> str:
    """Newest-first order that is total and stable under concurrent arrivals."""
    return f"{sent_at_ms:013d}.{message_id}"


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = base64.urlsafe_b64decode(padded.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput("invalid_cursor", "the cursor is not valid") from exc
    head, _, message_id = key.partition(".")
    if len(head) != 13 or not (head.isascii() and head.isdigit()) or not message_id.startswith("msg_"):
        raise InvalidInput("invalid_cursor", "the cursor is not valid")
    return key
