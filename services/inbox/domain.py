"""Pure rules of the mailbox: who receives a message, what a board item looks like, cursors."""

from __future__ import annotations

import base64
import binascii
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
    if len(head) != 13 or not head.isdigit() or not message_id.startswith("msg_"):
        raise InvalidInput("invalid_cursor", "the cursor is not valid")
    return key
