"""Pure rules of Staff Auto-Reply and Patient Auto-Reply: settings, windows, whether a delivered
message gets an automatic answer, and the once-per-period slot.

RFC 3834 ("Recommendations for Automatic Responses to Electronic Mail") is the model:
- §2 a responder answers a sender at most once per period: here once per activation and per day
  of the away person's time zone (the slot below);
- §2 never answer an automatic message (Auto-Submitted other than "no"): `auto_reply` messages;
- §2 never answer bulk or list mail: announcements and whole-agency messages;
- §2 never answer a message from oneself (a loop), nor system notifications (no human sender);
- §3 and §5 the answer is marked automatic (inbox's `auto_reply`, its Auto-Submitted), goes to
  the sender only and is threaded to the message it answers (In-Reply-To).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, replace

from services.kit.auth import SERVICE_SUBJECT_PREFIX
from services.kit.errors import InvalidInput
from services.kit.validation import EARLIEST_YEAR, LATEST_YEAR, Bool, Str, validate

KIND_STAFF = "staff"  # Staff Auto-Reply: answers colleagues' messages
KIND_PATIENT = "patient"  # Patient Auto-Reply: answers patient-portal messages
KINDS = (KIND_STAFF, KIND_PATIENT)

# Folders a conversation lands in (inbox board kinds); every other folder is a notification.
BOARD_MESSAGES = "messages"
BOARD_PORTAL = "portal"
# The board kind of the message a sender of each kind writes.
BOARD_OF_KIND = {KIND_STAFF: BOARD_MESSAGES, KIND_PATIENT: BOARD_PORTAL}

MESSAGE_MAX_CHARS = 2000
TIME_ZONE_MAX_CHARS = 64

# Why a delivered message is not answered (logged as a short code; never the message itself).
SKIP_AUTOMATIC = "automatic_message"
SKIP_NOT_A_CONVERSATION = "not_a_conversation"
SKIP_WHOLE_AGENCY = "whole_agency"
SKIP_OWN_MESSAGE = "own_message"
SKIP_UNKNOWN_SENDER = "unknown_sender_kind"
SKIP_MACHINE_SENDER = "machine_sender"
SKIP_NOT_AWAY = "not_away"


@dataclass(frozen=True)
class Setting:
    """One staff member's auto-reply of one kind. Times are epoch milliseconds.

    `starts_at` None means from `activated_at` (when it was turned on); a start before the activation
    counts from the activation (messages sent before it was turned on are never answered); `ends_at`
    None means until turned off. Each time it is turned on, or its window changes while on, it is a new activation
    (`activation_id`), so every sender can get one answer again."""

    agency_id: str
    staff_id: str
    kind: str
    enabled: bool = False
    message: str = ""
    starts_at: int | None = None
    ends_at: int | None = None
    time_zone: str = "UTC"
    activation_id: str = ""
    activated_at: int = 0
    updated_at: int = 0

    @property
    def effective_start(self) -> int:
        return max(self.starts_at or 0, self.activated_at)

    def active(self, now_ms: int) -> bool:
        """On, and now inside its window (start inclusive, end exclusive)."""
        if not self.enabled:
            return False
        if now_ms < self.effective_start:
            return False
        return self.ends_at is None or now_ms < self.ends_at


def never_set(agency_id: str, staff_id: str, kind: str, time_zone: str) -> Setting:
    """What a kind that was never saved looks like: off, no message."""
    return Setting(agency_id=agency_id, staff_id=staff_id, kind=kind, time_zone=time_zone)


# --- changing a setting --------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """A validated PUT body, times already resolved to epoch ms."""

    enabled: bool
    message: str | None  # None: keep the saved text
    starts_at: int | None
    ends_at: int | None
    time_zone: str


def known_time_zone(name: str) -> str:
    """An IANA time zone name, or 400 unknown_time_zone."""
    if not name or name.startswith(("/", ".")):
        raise InvalidInput("unknown_time_zone", "time_zone must be an IANA time zone name", {"field": "time_zone"})
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput(
            "unknown_time_zone", "time_zone must be an IANA time zone name", {"field": "time_zone"}
        ) from exc
    return name


def local_instant_ms(field: str, text: str, time_zone: str) -> int:
    """An ISO-8601 time as epoch ms: with its own offset, or a naive local time read in `time_zone`
    (the earlier of two readings in a repeated hour; a skipped hour is moved forward). Refused
    like the kit's instants: 400 `invalid_time`, within the kit's years."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(
            "invalid_time", f"{field} must be an ISO-8601 time, with an offset or local", {"field": field}
        ) from exc
    if moment.tzinfo is None or moment.utcoffset() is None:
        moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(time_zone))
    if not EARLIEST_YEAR <= moment.year <= LATEST_YEAR:
        raise InvalidInput("invalid_time", f"{field} is out of range", {"field": field})
    return int(moment.timestamp() * 1000)


# The PUT body, checked by the kit (`missing_field`, `invalid_type`, `too_long`, `unknown_field`).
CHANGE_SPECS = {
    "enabled": Bool(required=True),
    "message": Str(max_len=MESSAGE_MAX_CHARS, min_len=0, required=False),
    "starts_at": Str(max_len=64, required=False),
    "ends_at": Str(max_len=64, required=False),
    "time_zone": Str(max_len=TIME_ZONE_MAX_CHARS, required=False),
}


def parse_change(body: dict, default_time_zone: str | Callable[[], str]) -> Change:
    """The PUT body checked field by field (400 with the kit's codes naming the field, and
    `invalid_time`, `unknown_time_zone`, `invalid_window`). A callable default time zone (the
    agency's, from directory) is asked for only once the body is known to be well formed and names
    no zone of its own, so bad input is refused even while directory is away."""
    fields = validate(body, CHANGE_SPECS)
    enabled = fields["enabled"]
    message = fields.get("message")
    if enabled and message is not None and not message:
        raise InvalidInput("invalid_value", "message is required to turn the auto-reply on", {"field": "message"})
    zone = fields.get("time_zone")
    if zone is not None:
        time_zone = known_time_zone(zone)
    else:
        time_zone = default_time_zone() if callable(default_time_zone) else default_time_zone
    starts_at = None if "starts_at" not in fields else local_instant_ms("starts_at", fields["starts_at"], time_zone)
    ends_at = None if "ends_at" not in fields else local_instant_ms("ends_at", fields["ends_at"], time_zone)
    if starts_at is not None and ends_at is not None and ends_at <= starts_at:
        raise InvalidInput("invalid_window", "ends_at must be after starts_at", {"field": "ends_at"})
    return Change(enabled, message, starts_at, ends_at, time_zone)


def apply_change(current: Setting, change: Change, now_ms: int) -> Setting:
    """The setting after a PUT. Turning it on, or changing its window while on, starts a new
    activation; changing only the text keeps the activation (senders already answered stay so).
    Without a message the saved text is kept; turning on needs one, given or saved."""
    message = current.message if change.message is None else change.message
    if change.enabled and not message:
        raise InvalidInput("invalid_value", "message is required to turn the auto-reply on", {"field": "message"})
    if change.enabled and change.ends_at is not None and change.ends_at <= now_ms:
        # With or without a start: a window already over would be saved "on" and never answer.
        raise InvalidInput("invalid_window", "ends_at must be in the future", {"field": "ends_at"})
    window_changed = (change.starts_at, change.ends_at, change.time_zone) != (
        current.starts_at,
        current.ends_at,
        current.time_zone,
    )
    new_activation = change.enabled and (not current.enabled or window_changed or not current.activation_id)
    return replace(
        current,
        enabled=change.enabled,
        message=message,
        starts_at=change.starts_at,
        ends_at=change.ends_at,
        time_zone=change.time_zone,
        activation_id=new_activation_id() if new_activation else current.activation_id,
        activated_at=now_ms if new_activation else current.activated_at,
        updated_at=now_ms,
    )


def new_activation_id() -> str:
    return f"act_{uuid.uuid4().hex}"


# --- answering a delivered message ---------------------------------------------------------------
@dataclass(frozen=True)
class Delivered:
    """The parts of inbox's MessageDelivered event the rules look at."""

    agency_id: str
    message_id: str
    recipient_id: str
    sender_id: str  # a staff id, or the patient id of a portal message
    sender_kind: str  # "staff" | "patient"
    board_kind: str
    to_whole_agency: bool = False
    auto_reply: bool = False


def kind_to_answer(event: Delivered) -> tuple[str | None, str]:
    """(the auto-reply kind that may answer this message, "") or (None, why not) — before looking
    at anyone's settings."""
    if event.auto_reply:
        return None, SKIP_AUTOMATIC
    if event.board_kind not in (BOARD_MESSAGES, BOARD_PORTAL):
        return None, SKIP_NOT_A_CONVERSATION  # announcements, schedule, lab, compliance, eRx, cloud
    if event.to_whole_agency:
        return None, SKIP_WHOLE_AGENCY
    if event.sender_kind not in KINDS or BOARD_OF_KIND[event.sender_kind] != event.board_kind:
        return None, SKIP_UNKNOWN_SENDER
    if event.sender_id.startswith(SERVICE_SUBJECT_PREFIX):
        # A service (eRx, cloud, notifications) that sent a message as itself: inbox marks it a
        # staff message from "svc:<name>", but no person is there to read an answer.
        return None, SKIP_MACHINE_SENDER
    if not event.sender_id or event.sender_id == event.recipient_id:
        return None, SKIP_OWN_MESSAGE
    return event.sender_kind, ""


@dataclass(frozen=True)
class Decision:
    answer: bool
    reason: str = ""
    slot: str = ""  # the once-per-period slot, when answering


def decide(event: Delivered, setting: Setting | None, now_ms: int) -> Decision:
    """Whether the recipient's auto-reply answers this delivered message now, and in which slot."""
    kind, reason = kind_to_answer(event)
    if kind is None:
        return Decision(False, reason)
    if setting is None or setting.kind != kind or not setting.active(now_ms):
        return Decision(False, SKIP_NOT_AWAY)
    return Decision(True, slot=slot_key(setting, event.sender_id, now_ms))


def period_of(setting: Setting, now_ms: int) -> str:
    """The day (in the away person's time zone) a moment falls in: a sender gets at most one answer
    per activation and per local calendar day."""
    zone = zoneinfo.ZoneInfo(setting.time_zone)
    return dt.datetime.fromtimestamp(now_ms / 1000, tz=zone).date().isoformat()


def slot_key(setting: Setting, sender_id: str, now_ms: int) -> str:
    """(agency, replier, kind, sender, activation, day): claimed once under a unique index."""
    return "|".join(
        (
            setting.agency_id,
            setting.staff_id,
            setting.kind,
            sender_id,
            setting.activation_id,
            period_of(setting, now_ms),
        )
    )


def idempotency_key(slot: str) -> str:
    """inbox's idempotency key for the answer of a slot: the same slot always sends with the same
    key, so a retry after a crash is answered with the earlier send."""
    return "auto-reply-" + hashlib.sha256(slot.encode("utf-8")).hexdigest()
