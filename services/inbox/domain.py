"""Pure rules of the mailbox: who receives a message, what a board item looks like, cursors."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass, field

from services.kit.auth import ROLE_ADMIN, ROLE_COMPLIANCE_OFFICER, ROLE_PRESCRIBER, ROLE_STAFF
from services.kit.errors import InvalidInput
from services.kit.validation import ID_PATTERN

# --- folders (board kinds) ------------------------------------------------------------------
FOLDER_MESSAGES = "messages"
FOLDER_SENT = "sent"
FOLDER_SCHEDULE = "schedule"
FOLDER_ERX = "erx"
FOLDER_REMINDERS = "reminders"
FOLDER_SIGNATURES = "signatures"
FOLDER_ANNOUNCEMENTS = "announcements"
FOLDER_PORTAL = "portal"
FOLDER_COMPLIANCE = "compliance"
FOLDER_LAB = "lab"
FOLDER_CLOUD = "cloud"
FOLDER_ARCHIVE = "archive"

# The folder tree in display order, with names; "{patient}" is the agency's term (Patient, Client, ...).
FOLDER_NAMES: dict[str, str] = {
    FOLDER_MESSAGES: "Messages",
    FOLDER_SENT: "Sent",
    FOLDER_SCHEDULE: "Schedule Notifications",
    FOLDER_ERX: "eRx Notifications",
    FOLDER_REMINDERS: "Reminders",
    FOLDER_SIGNATURES: "Signature Requests",
    FOLDER_ANNOUNCEMENTS: "Agency Announcement",
    FOLDER_PORTAL: "{patient} Portal Messages",
    FOLDER_COMPLIANCE: "Compliance Alerts",
    FOLDER_LAB: "Lab Report Notifications",
    FOLDER_CLOUD: "Cloud Communications",
    FOLDER_ARCHIVE: "Archive",
}
FOLDERS = tuple(FOLDER_NAMES)
# Folders whose items are board items of the owner (announcements are stored once per agency).
ITEM_FOLDERS = tuple(f for f in FOLDERS if f != FOLDER_ANNOUNCEMENTS)
# Kinds other services deliver through the delivery API, and the folder each lands in.
DELIVERED_FOLDERS = (FOLDER_SCHEDULE, FOLDER_ERX, FOLDER_COMPLIANCE, FOLDER_LAB, FOLDER_CLOUD)

PRIORITIES = ("normal", "urgent")

# What a board item is (its `kind`), independent of the folder it currently sits in.
KIND_MESSAGE = "message"  # a staff message (received or sent)
KIND_PORTAL_MESSAGE = "portal_message"  # a message in a patient-portal thread
KIND_NOTICE = "notice"  # delivered by another service
KIND_REMINDER = "reminder"
KIND_SIGNATURE_REQUEST = "signature_request"
KIND_SIGNATURE_OUTCOME = "signature_outcome"
ITEM_KINDS = (
    KIND_MESSAGE,
    KIND_PORTAL_MESSAGE,
    KIND_NOTICE,
    KIND_REMINDER,
    KIND_SIGNATURE_REQUEST,
    KIND_SIGNATURE_OUTCOME,
)

# Compose permissions: what each directory role may create. A user may compose the union over their roles.
COMPOSE_MESSAGE = "message"
COMPOSE_REMINDER = "reminder"
COMPOSE_SIGNATURE_REQUEST = "signature_request"
COMPOSE_ANNOUNCEMENT = "announcement"
COMPOSE_KINDS = (COMPOSE_MESSAGE, COMPOSE_REMINDER, COMPOSE_SIGNATURE_REQUEST, COMPOSE_ANNOUNCEMENT)
_STAFF_COMPOSE = frozenset({COMPOSE_MESSAGE, COMPOSE_REMINDER, COMPOSE_SIGNATURE_REQUEST})
ROLE_COMPOSE: dict[str, frozenset[str]] = {
    ROLE_STAFF: _STAFF_COMPOSE,
    ROLE_PRESCRIBER: _STAFF_COMPOSE,
    ROLE_COMPLIANCE_OFFICER: _STAFF_COMPOSE,
    ROLE_ADMIN: frozenset(COMPOSE_KINDS),
}


def composable(roles) -> list[str]:
    """The kinds a holder of `roles` may compose, in a stable order."""
    allowed: set[str] = set()
    for role in roles:
        allowed |= ROLE_COMPOSE.get(role, frozenset())
    return [kind for kind in COMPOSE_KINDS if kind in allowed]


def may_compose(roles, kind: str) -> bool:
    return kind in composable(roles)


def folder_name(folder: str, patient_singular: str = "Patient") -> str:
    return FOLDER_NAMES[folder].replace("{patient}", patient_singular or "Patient")


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


def text_digest(*values) -> str:
    """Digest of free text (subjects, bodies) as a JSON list: a "|" typed in one field cannot pass for
    the boundary between two fields."""
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def draft_digest(draft: Draft) -> str:
    """Fingerprint of what was asked for, so a reused idempotency key with another message is caught."""
    a = draft.addressing
    addressing = [sorted(a.staff_ids), sorted(a.team_ids), a.whole_agency]
    return text_digest(addressing, draft.subject, draft.body, draft.priority, list(draft.links))


def create_digest(kind: str, *fields) -> str:
    """Fingerprint of a create other than a message (a reminder, a signature request, an
    announcement): its kind and what was asked for, so a key reused for another request, or for
    another kind of thing, is caught (services/inbox/idempotency.py)."""
    return text_digest("create", kind, *fields)


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


def owner_key(agency_id: str, staff_id: str) -> str:
    """Key of one person's board as a whole (its counters, labels and preferences)."""
    return f"{agency_id}|{staff_id}"


def label_board(agency_id: str, staff_id: str, label_id: str) -> str:
    return f"{agency_id}|{staff_id}|label:{label_id}"


def board_item_id(ref_id: str, staff_id: str, origin_folder: str) -> str:
    """Deterministic (so fan-out and delivery are repeatable), URL-safe id of one item on one board."""
    return "itm_" + digest(ref_id, staff_id, origin_folder)[:32]


def item_keys(agency_id: str, owner_id: str, folder: str | None, unread: bool, urgent: bool) -> dict:
    """The indexed keys that place an item in its owner's listings; folder None hides the item
    (a reminder not yet due, a snoozed one)."""
    board = owner_folder(agency_id, owner_id, folder) if folder else None
    return {
        "folder": folder,
        "board": board,
        "unread_board": board if (board and unread) else None,
        "urgent_board": board if (board and urgent) else None,
    }


def new_item(
    *,
    agency_id: str,
    owner_id: str,
    folder: str,
    kind: str,
    ref_id: str,
    at_ms: int,
    unread: bool,
    urgent: bool = False,
    visible: bool = True,
    **fields,
) -> dict:
    """A board item: one thing on one person's board. `fields` carries the kind's own data
    (encrypted title, sender, severity, status, ...)."""
    item_id = board_item_id(ref_id, owner_id, folder)
    item = {
        "_id": item_id,
        "agency_id": agency_id,
        "owner_id": owner_id,
        "kind": kind,
        "ref_id": ref_id,
        "origin_folder": folder,
        "read_at": None if unread else at_ms,
        "urgent": int(urgent),
        "labels": {},
        "version": 1,
        "sent_at": at_ms,
        # By the item's own id: two items of one ref can share a board (both copies of a message to
        # oneself in the archive or under a label), and the cursor needs a total order.
        "sort_key": sort_key(at_ms, item_id),
        **item_keys(agency_id, owner_id, folder if visible else None, unread, urgent),
    }
    item.update(fields)
    return item


def board_item(message: dict, owner: str, folder: str) -> dict:
    """The board item that puts a staff message on one owner's folder; the encrypted subject rides
    along so a page needs no second query."""
    unread = folder != FOLDER_SENT
    return new_item(
        agency_id=message["agency_id"],
        owner_id=owner,
        folder=folder,
        kind=message.get("kind", KIND_MESSAGE),
        ref_id=message["_id"],
        at_ms=message["sent_at"],
        unread=unread,
        urgent=message["priority"] == "urgent",
        message_id=message["_id"],
        thread_id=message["thread_id"],
        sender_id=message["sender_id"],
        sender_name=message.get("sender_name", ""),
        recipient_count=len(message["recipient_ids"]),
        priority=message["priority"],
        subject=message["subject"],
        **list_marks(message, folder),
    )


def list_marks(message: dict, folder: str) -> dict:
    """What a list row shows of a message beyond its sender: an automatic answer is marked, a
    whole-agency message too, and the sender's Sent copy names its addressees (ids: the page
    names them from the directory) instead of the sender."""
    marks: dict = {}
    if message.get("auto_reply"):
        marks["auto_reply"] = 1
    if message.get("to_whole_agency"):
        marks["to_whole_agency"] = 1
    if folder == FOLDER_SENT:
        marks["to_staff_ids"] = list(message.get("to_staff_ids") or [])
        marks["to_team_ids"] = list(message.get("to_team_ids") or [])
    return marks


# --- counters ---------------------------------------------------------------------------------
# Each board has one counter document; an item contributes to it according to its state, and every
# change of an item applies (contribution after - contribution before) with $inc. Field names are
# flat ("u_messages", "l_<label id>"): nx-27017 stores dotted paths written by an upsert literally.


def unread_field(folder: str) -> str:
    return f"u_{folder}"


def total_field(folder: str) -> str:
    return f"t_{folder}"


def label_unread_field(label_id: str) -> str:
    return f"l_{label_id}"


def label_total_field(label_id: str) -> str:
    return f"lt_{label_id}"


def contribution(item: dict | None) -> dict[str, int]:
    """What one item adds to its owner's counters: a visible item counts in its folder's total,
    unread ones in its folder's (and each of its labels') unread count."""
    if not item or not item.get("board"):
        return {}
    folder = item["folder"]
    unread = bool(item.get("unread_board"))
    counts = {total_field(folder): 1}
    if unread:
        counts[unread_field(folder)] = 1
    for label_id in item.get("labels") or {}:
        counts[label_total_field(label_id)] = 1
        if unread:
            counts[label_unread_field(label_id)] = 1
    return counts


def counter_delta(before: dict | None, after: dict | None) -> dict[str, int]:
    """The $inc that moves the counters from `before` to `after` (zeros dropped)."""
    old, new = contribution(before), contribution(after)
    delta = {key: new.get(key, 0) - old.get(key, 0) for key in old.keys() | new.keys()}
    return {key: value for key, value in sorted(delta.items()) if value}


def add_deltas(*deltas: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for delta in deltas:
        for key, value in delta.items():
            total[key] = total.get(key, 0) + value
    return {key: value for key, value in total.items() if value}


# --- replies ----------------------------------------------------------------------------------


def reply_addressing(original: dict, replier_id: str) -> Addressing:
    """Reply: to the sender only (to oneself when replying to one's own message)."""
    return Addressing(staff_ids=(original["sender_id"],))


def reply_all_addressing(original: dict, replier_id: str) -> Addressing:
    """Reply All: the sender and every original recipient as they were addressed (teams kept as
    teams, the whole agency kept as such), without the replier."""
    staff = [original["sender_id"], *original.get("to_staff_ids", [])]
    seen: dict[str, None] = {}
    for staff_id in staff:
        if staff_id != replier_id:
            seen.setdefault(staff_id, None)
    return Addressing(
        staff_ids=tuple(seen),
        team_ids=tuple(original.get("to_team_ids", [])),
        whole_agency=bool(original.get("to_whole_agency")),
    )


def prefixed_subject(prefix: str, subject: str) -> str:
    """Prefix "Re:" (or "Fwd:") once, however long the thread."""
    stripped = subject.strip()
    if stripped.lower().startswith(prefix.lower()):
        return stripped
    return f"{prefix} {stripped}".strip()


def quoted_time(at_ms: int) -> str:
    """A time inside stored text (a forward's "Sent:" line): ISO 8601 in UTC to the second, the
    same for every reader and zone; the page shows it in the agency's time zone and style."""
    return dt.datetime.fromtimestamp(at_ms // 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def quoted_forward(note: str, sender_name: str, sent_at_iso: str, subject: str, body: str) -> str:
    lines = [
        note.rstrip(),
        "",
        "---------- Forwarded message ----------",
        f"From: {sender_name}",
        f"Sent: {sent_at_iso}",
        f"Subject: {subject}",
        "",
        body,
    ]
    return "\n".join(lines).lstrip("\n")


# --- labels -----------------------------------------------------------------------------------
LABEL_MAX_CHARS = 40


def label_name(raw: str) -> tuple[str, str]:
    """(display name, normalised name): trimmed, inner white space collapsed, 1..40 characters,
    unique per owner without regard to case. The normalised name is only ever stored as a keyed
    hash (services/inbox/label_names.py)."""
    name = " ".join(raw.split())
    if not name:
        raise InvalidInput("invalid_label_name", "a label needs a name")
    if len(name) > LABEL_MAX_CHARS:
        raise InvalidInput("invalid_label_name", f"a label name is at most {LABEL_MAX_CHARS} characters")
    return name, label_key(name)


def label_key(name: str) -> str:
    """The form two names share when they are the same label's (case aside)."""
    return " ".join(name.split()).casefold()


def new_label_id() -> str:
    return f"lbl_{uuid.uuid4().hex[:24]}"


# --- ordering and cursors -----------------------------------------------------------------------


def sort_key(sent_at_ms: int, ref_id: str) -> str:
    """Newest-first order that is total and stable under concurrent arrivals."""
    return f"{sent_at_ms:013d}.{ref_id}"


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = base64.urlsafe_b64decode(padded.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput("invalid_cursor", "the cursor is not valid") from exc
    head, _, ref_id = key.partition(".")
    if len(head) != 13 or not (head.isascii() and head.isdigit()) or not ID_PATTERN.fullmatch(ref_id):
        raise InvalidInput("invalid_cursor", "the cursor is not valid")
    return key
