"""Pure rules of the bridge: ids, what an item says on a board, what changed since the last sync,
and the Pending Rx report's rows. No I/O here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from services.erx_bridge.vendors.base import (
    KINDS,
    PENDING_PRESCRIPTION,
    REFILL_REQUEST,
    TRANSACTION_ERROR,
    Counts,
    VendorItem,
)

ITEM_PREFIX = "erx_"
ITEM_ID = re.compile(r"^erx_[0-9a-f]{32}$")

# What the board says about each kind (title prefix, status, severity, the date's verb).
TITLES = {
    REFILL_REQUEST: "Refill request",
    PENDING_PRESCRIPTION: "Awaiting your signature",
    TRANSACTION_ERROR: "Prescription not sent",
}
STATUSES = {REFILL_REQUEST: "refill_requested", PENDING_PRESCRIPTION: "awaiting_signature", TRANSACTION_ERROR: "error"}
SEVERITIES = {REFILL_REQUEST: "info", PENDING_PRESCRIPTION: "info", TRANSACTION_ERROR: "abnormal"}
DATE_VERBS = {REFILL_REQUEST: "requested", PENDING_PRESCRIPTION: "written", TRANSACTION_ERROR: "failed"}
RESOLVED_STATUS = "resolved"
# The Pending Rx report: prescriptions waiting for the prescriber, and those that failed to go out.
REPORT_KINDS = (PENDING_PRESCRIPTION, TRANSACTION_ERROR)
REPORT_TYPE_NAMES = {PENDING_PRESCRIPTION: "Pending prescription", TRANSACTION_ERROR: "Transaction error"}
MAX_TITLE = 200
MAX_SUMMARY = 1000


def digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def item_id(agency_id: str, vendor: str, vendor_item_id: str) -> str:
    """One vendor item for its whole life (its board item's source_ref): the same id whichever
    prescriber it is listed under, and never a vendor value in clear."""
    return ITEM_PREFIX + digest(agency_id, vendor, vendor_item_id)[:32]


def prescriber_key(agency_id: str, staff_id: str) -> str:
    return f"{agency_id}|{staff_id}"


def open_key(agency_id: str, staff_id: str, kind: str) -> str:
    """The indexed key of a prescriber's open items of one kind (absent once resolved)."""
    return f"{agency_id}|{staff_id}|{kind}"


def agency_open_key(agency_id: str, kind: str) -> str:
    """The indexed key of an agency's open items of one kind (absent once resolved)."""
    return f"{agency_id}|{kind}"


def delivery_id(iid: str, version: int) -> str:
    """The delivery (and event) id of one content version of an item: a republished event, or the
    same version delivered twice, has its effect once in inbox."""
    return f"{iid}-v{version}"


# --- content ------------------------------------------------------------------------------------
def content_of(item: VendorItem) -> dict:
    """The item as stored (sealed) and compared: every field, times as ISO-8601 UTC."""
    requested = item.requested_at
    if requested is not None and requested.tzinfo is None:
        requested = requested.replace(tzinfo=dt.UTC)
    return {
        "vendor_item_id": item.vendor_item_id,
        "kind": item.kind,
        "patient_id": item.patient_id,
        "patient_name": item.patient_name,
        "medication": item.medication,
        "pharmacy": item.pharmacy,
        "requested_at": requested.astimezone(dt.UTC).isoformat() if requested else "",
        "detail": item.detail,
    }


def canonical(content: Mapping) -> str:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_digest(key: bytes, content: Mapping) -> str:
    """A keyed digest of the content (HMAC-SHA256 with the agency's data key that sealed it), so a
    changed item is recognised without opening the stored one, and the digest reveals nothing
    to someone who can read the database but not the keys."""
    return hmac.new(key, b"erx-content|" + canonical(content).encode(), hashlib.sha256).hexdigest()


def requested_ms(content: Mapping) -> int:
    text = content.get("requested_at") or ""
    if not text:
        return 0
    try:
        return int(dt.datetime.fromisoformat(text).timestamp() * 1000)
    except ValueError:
        return 0


def _zone(name: str) -> dt.tzinfo:
    try:
        return zoneinfo.ZoneInfo(name or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def local_date(iso_time: str, time_zone: str) -> str:
    """The date of an ISO-8601 time in the agency's zone, YYYY-MM-DD ("" when there is none)."""
    if not iso_time:
        return ""
    try:
        moment = dt.datetime.fromisoformat(iso_time)
    except ValueError:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(_zone(time_zone)).date().isoformat()


def local_time(iso_time: str, time_zone: str) -> str:
    """An ISO-8601 time shown in the agency's zone, to the minute, with its offset."""
    if not iso_time:
        return ""
    try:
        moment = dt.datetime.fromisoformat(iso_time)
    except ValueError:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(_zone(time_zone)).isoformat(timespec="minutes")


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def board_title(content: Mapping) -> str:
    """ "Refill request: <medication>" and so on: the minimum a prescriber needs to triage."""
    medication = content.get("medication") or "medication not named"
    return _clip(f"{TITLES[content['kind']]}: {medication}", MAX_TITLE)


def board_summary(content: Mapping, patient_word: str, time_zone: str) -> str:
    """ "<Client|Patient> <name> · <pharmacy> · requested <date in the agency's zone>": the parts the
    vendor gave, no identifiers; a failed prescription also says why (what the prescriber must fix)."""
    parts = []
    name = content.get("patient_name") or ""
    if name:
        parts.append(f"{patient_word or 'Patient'} {name}")
    if content.get("pharmacy"):
        parts.append(content["pharmacy"])
    date = local_date(content.get("requested_at") or "", time_zone)
    if date:
        parts.append(f"{DATE_VERBS[content['kind']]} {date}")
    if content["kind"] == TRANSACTION_ERROR and content.get("detail"):
        parts.append(content["detail"])
    return _clip(" · ".join(parts), MAX_SUMMARY)


# --- what to fetch ------------------------------------------------------------------------------
def counts_map(counts: Counts) -> dict[str, int]:
    return {kind: int(counts.of(kind)) for kind in KINDS}


def kinds_to_fetch(
    counts: Mapping[str, int], last: Mapping[str, int] | None, *, full: bool, holds_open: Iterable[str] = ()
) -> list[str]:
    """The kinds whose items must be fetched: those whose count changed since the last sync (or,
    with no last counts, those with anything open at the vendor or here); on a full check, also
    every kind with open items at the vendor or here, since a count can stay the same while one
    item is resolved and another arrives."""
    held = set(holds_open)
    wanted = []
    for kind in KINDS:
        now = counts.get(kind, 0)
        if last is None or kind not in last:
            changed = now > 0 or kind in held
        else:
            changed = now != last[kind]
        if changed or (full and (now > 0 or kind in held or (last or {}).get(kind, 0) > 0)):
            wanted.append(kind)
    return wanted


@dataclass(frozen=True)
class Plan:
    """What one kind's fetched items mean against the open items stored for the prescriber."""

    new: list[tuple[str, dict]]  # (item id, content) not stored as this prescriber's open item
    changed: list[tuple[str, dict]]  # (item id, content) stored open with other content
    gone: list[str]  # item ids stored open that the vendor no longer lists
    unchanged: int


def plan_kind(
    agency_id: str,
    vendor: str,
    kind: str,
    *,
    fetched: Iterable[VendorItem],
    stored: Mapping[str, str],
    digest_of: Callable[[str, dict], str],
) -> Plan:
    """`stored`: item id -> its stored digest, for the prescriber's open items of `kind`;
    `digest_of(item_id, content)` the digest the content would have for that stored item. Items of
    another kind in `fetched` are ignored; a vendor item listed twice counts once (the first)."""
    new: list[tuple[str, dict]] = []
    changed: list[tuple[str, dict]] = []
    seen: set[str] = set()
    unchanged = 0
    for item in fetched:
        if item.kind != kind or not item.vendor_item_id:
            continue
        iid = item_id(agency_id, vendor, item.vendor_item_id)
        if iid in seen:
            continue
        seen.add(iid)
        content = content_of(item)
        if iid not in stored:
            new.append((iid, content))
        elif not hmac.compare_digest(stored[iid], digest_of(iid, content)):
            changed.append((iid, content))
        else:
            unchanged += 1
    gone = [iid for iid in stored if iid not in seen]
    return Plan(new, changed, gone, unchanged)


# --- the Pending Rx report ----------------------------------------------------------------------
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: str) -> str:
    """A cell a spreadsheet will show as text, never run as a formula."""
    return "'" + value if value.startswith(CSV_FORMULA_START) else value


def report_header(patient_word: str) -> list[str]:
    return ["Type", "Prescriber", patient_word or "Patient", "Medication", "Pharmacy", "Date", "Detail", "Item ID"]


def report_row(row: Mapping) -> list[str]:
    return [
        REPORT_TYPE_NAMES.get(row["kind"], row["kind"]),
        row.get("prescriber_name") or row.get("prescriber_id", ""),
        row.get("patient_name", ""),
        row.get("medication", ""),
        row.get("pharmacy", ""),
        row.get("date", ""),
        row.get("detail", ""),
        row["item_id"],
    ]
