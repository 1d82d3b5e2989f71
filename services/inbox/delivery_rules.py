"""Pure rules of the delivery API: which notice a delivery is, who holds its items (and who may
hold an eRx item), whether it has any effect, and how each recipient's board item follows its
notice (services/inbox/delivery.py writes what these decide)."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from clinic.inbox.v1 import inbox_pb2
from services.inbox import domain
from services.inbox.store import REMOVE
from services.kit.auth import KIND_SERVICE
from services.kit.errors import Forbidden, InvalidInput
from services.kit.events import Envelope, new_envelope
from services.kit.logs import correlation_id_var

PRODUCER = "inbox"
DELIVERED_EVENT = "board_item.delivered.v1"
RECENT_DELIVERIES = 50  # delivery ids a notice remembers, to answer a repeat applied=false
ERX_NOT_ENABLED = "erx_not_enabled"

SEVERITY_TO_PB: dict[str, int] = {
    "info": inbox_pb2.SEVERITY_INFO,
    "abnormal": inbox_pb2.SEVERITY_ABNORMAL,
    "urgent": inbox_pb2.SEVERITY_URGENT,
}


def notice_id(agency_id: str, source: str, source_ref: str) -> str:
    """One notice per (agency, source, source_ref), so a redelivery finds the item it updates."""
    return "ntc_" + domain.digest(agency_id, source, source_ref)[:32]


def final_recipients(resolved: list[str], actor_staff_id: str | None, holders: list[str] | None = None) -> list[str]:
    """Resolved staff, each once. The staff member whose own action caused the item is never given
    it, but keeps the item they already hold (`holders`), unread or not as before (item_patch)."""
    held = set(holders or ())
    recipients = [s for s in dict.fromkeys(resolved) if s != actor_staff_id or s in held]
    if not recipients:
        raise InvalidInput("no_recipients", "the item has no recipients")
    return recipients


def erx_recipients(named: Iterable[str], resolved: list[str], eprescribers: Collection[str]) -> list[str]:
    """Who an eRx item reaches: staff with ePrescribing only (`eprescribers`, directory's word: active,
    flagged, and their agency subscribes). A named staff member without it refuses the whole delivery
    (Forbidden `erx_not_enabled`, naming them), inactive ones included; members of a named team or of
    the whole agency without it are left out, and a delivery that then reaches nobody is refused the
    same way."""
    lacking = [staff_id for staff_id in dict.fromkeys(named) if staff_id not in eprescribers]
    if lacking:
        raise Forbidden(ERX_NOT_ENABLED, "eRx items go only to staff with ePrescribing", {"staff_ids": lacking})
    reached = [staff_id for staff_id in resolved if staff_id in eprescribers]
    if resolved and not reached:
        raise Forbidden(ERX_NOT_ENABLED, "none of the recipients has ePrescribing", {"staff_ids": []})
    return reached


def recipient_changes(before: list[str], after: list[str]) -> tuple[list[str], list[str]]:
    """(added, removed): who gets a new item, whose item goes."""
    old, new = set(before), set(after)
    return [s for s in after if s not in old], [s for s in before if s not in new]


def unfinished_removals(notice: dict | None, recipients: list[str], removed: list[str]) -> list[str]:
    """Removals of a revision whose fan-out has not finished (a crash): the revision written over it
    must still take those items away, since its own recipient change no longer names them."""
    if not notice or "fanout_pending_at" not in notice:
        return []
    return [s for s in notice.get("removed_ids") or [] if s not in recipients and s not in removed]


def is_repeat(notice: dict | None, delivery_key: str | None) -> bool:
    return bool(notice and delivery_key and delivery_key in (notice.get("deliveries") or []))


def is_stale(notice: dict | None, source_version: int) -> bool:
    """An update older than the stored one; version 0 always applies."""
    return bool(notice and source_version and source_version < int(notice.get("source_version") or 0))


def recent_deliveries(notice: dict | None, delivery_key: str | None) -> list[str]:
    known = list((notice or {}).get("deliveries") or [])
    if delivery_key:
        known.append(delivery_key)
    return known[-RECENT_DELIVERIES:]


def delivered_event(
    item: dict, created: bool, at_ms: int, *, severity: str = "info", event_id: str | None = None
) -> Envelope:
    """`board_item.delivered.v1` for a board item that landed on (or came back to) its owner's board
    at `at_ms`. The event id is one per item and time unless the caller names one (a notice names
    one per revision, so each revision announces each item once)."""
    delivered_at = Timestamp()
    delivered_at.FromMilliseconds(at_ms)
    payload = inbox_pb2.BoardItemDelivered(
        item_id=item["_id"],
        agency_id=item["agency_id"],
        recipient_staff_id=item["owner_id"],
        board_kind=item.get("folder") or item.get("origin_folder", ""),
        severity=SEVERITY_TO_PB[severity],
        created=created,
        delivered_at=delivered_at,
    )
    return new_envelope(
        DELIVERED_EVENT,
        payload,
        agency_id=item["agency_id"],
        producer=PRODUCER,
        correlation_id=correlation_id_var.get(),
        event_id=event_id or f"{item['_id']}-{at_ms}-delivered",
    )


def item_state(notice: dict) -> dict:
    """The fields every recipient's item carries from its notice (None: absent)."""
    return {
        "title": notice.get("title"),
        "summary": notice.get("summary"),
        "patient_name": notice.get("patient_name"),  # sealed; read only by search (services/inbox/search.py)
        "severity": notice["severity"],
        "status": notice.get("status"),
        "due_at": notice.get("due_at"),
        "resolved_at": notice.get("resolved_at"),
        "urgent": int(notice["severity"] == "urgent"),
        "sender_name": notice["sender_name"],
        "notice_rev": notice["rev"],
    }


def item_patch(item: dict, notice: dict) -> dict | None:
    """What brings one recipient's item in line with its notice; None when it already is (or the
    item was brought in line with a newer revision). Resolved makes it read; `unread_since`
    (creation or mark_unread) makes an item read before it unread again, and moves an item that
    arrived before it to the top of its list (sent_at and sort_key become that time)."""
    if int(item.get("notice_rev") or 0) > notice["rev"]:
        return None
    patch: dict = {}
    for key, value in item_state(notice).items():
        if value is None:
            if item.get(key) is not None:
                patch[key] = REMOVE
        elif item.get(key) != value:
            patch[key] = value
    read_at = item.get("read_at")
    unread_since = int(notice.get("unread_since") or 0)
    if notice.get("resolved_at"):
        read_at = read_at or notice["resolved_at"]
    elif read_at and read_at < unread_since:
        # The maker of the change keeps their item as read: read as of this revision.
        read_at = unread_since if item.get("owner_id") == notice.get("actor_staff_id") else None
    if read_at != item.get("read_at"):
        patch["read_at"] = read_at
    # Marked unread again (a corrected result, an appointment moved): back at the top of the list.
    if not read_at and unread_since > int(item.get("sent_at") or 0):
        patch["sent_at"] = unread_since
        patch["sort_key"] = domain.sort_key(unread_since, item["_id"])
    if item.get("board"):
        keys = domain.item_keys(
            item["agency_id"],
            item["owner_id"],
            item["folder"],
            unread=not read_at,
            urgent=notice["severity"] == "urgent",
        )
        patch.update({k: v for k, v in keys.items() if item.get(k) != v})
    return patch or None


def notice_item(notice: dict, staff_id: str) -> dict:
    """A recipient's new board item for the notice as it is."""
    state = {k: v for k, v in item_state(notice).items() if v is not None and k != "urgent"}
    return domain.new_item(
        agency_id=notice["agency_id"],
        owner_id=staff_id,
        folder=notice["folder"],
        kind=domain.KIND_NOTICE,
        ref_id=notice["_id"],
        at_ms=notice["delivered_at"],
        unread=not notice.get("resolved_at"),
        urgent=notice["severity"] == "urgent",
        sender_id=notice["producer"],
        sender_kind=KIND_SERVICE,
        **state,
    )


def revision_events(notice: dict, added: set[str], at: int) -> list[Envelope]:
    """One `board_item.delivered.v1` per recipient's item of this revision of the notice (`created`
    for those `added` by it)."""
    events = []
    for staff_id in notice["recipient_ids"]:
        item_id = domain.board_item_id(notice["_id"], staff_id, notice["folder"])
        item = {"_id": item_id, "agency_id": notice["agency_id"], "owner_id": staff_id, "folder": notice["folder"]}
        event_id = "bid_" + domain.digest(item_id, str(notice["rev"]))[:32]
        events.append(delivered_event(item, staff_id in added, at, severity=notice["severity"], event_id=event_id))
    return events
