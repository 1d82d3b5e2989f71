"""A delivery request, checked: what producers may deliver, where it lands, what a
DeliverItemRequest must hold (services/inbox/delivery.py takes it from there)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from clinic.inbox.v1 import inbox_pb2
from services.inbox import domain
from services.kit.errors import Forbidden, InvalidInput
from services.kit.validation import Id, Link, ListOf, Str

MAX_TITLE = 200
MAX_SUMMARY = 1000
MAX_PATIENT_NAME = 200
MAX_LINKS = 10
MAX_LINK_LABEL = 80
MAX_REF = 128
# Source, source_ref and delivery ids: printable ASCII without spaces.
REF_PATTERN = re.compile(r"^[\x21-\x7e]+$")
STATUS_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ProducerPolicy:
    """What one registered service client may deliver, and the sender name its items show."""

    folders: frozenset[str]
    display_name: str


# Producer (service client name) -> what it may deliver. Anyone else is refused.
PRODUCERS: dict[str, ProducerPolicy] = {
    "notifications": ProducerPolicy(
        frozenset({domain.FOLDER_SCHEDULE, domain.FOLDER_LAB, domain.FOLDER_COMPLIANCE}), "Notifications"
    ),
    "erx-bridge": ProducerPolicy(frozenset({domain.FOLDER_ERX}), "eRx"),
    "cloud-comms": ProducerPolicy(frozenset({domain.FOLDER_CLOUD}), "Cloud Communications"),
}

KIND_FOLDERS: dict[int, str] = {
    inbox_pb2.DELIVERED_KIND_SCHEDULE: domain.FOLDER_SCHEDULE,
    inbox_pb2.DELIVERED_KIND_ERX: domain.FOLDER_ERX,
    inbox_pb2.DELIVERED_KIND_COMPLIANCE: domain.FOLDER_COMPLIANCE,
    inbox_pb2.DELIVERED_KIND_LAB: domain.FOLDER_LAB,
    inbox_pb2.DELIVERED_KIND_CLOUD: domain.FOLDER_CLOUD,
}
SEVERITY_NAMES: dict[int, str] = {
    inbox_pb2.SEVERITY_UNSPECIFIED: "info",
    inbox_pb2.SEVERITY_INFO: "info",
    inbox_pb2.SEVERITY_ABNORMAL: "abnormal",
    inbox_pb2.SEVERITY_URGENT: "urgent",
}

TITLE = Str(max_len=MAX_TITLE)
SUMMARY = Str(max_len=MAX_SUMMARY, min_len=0, required=False)
PATIENT_NAME = Str(max_len=MAX_PATIENT_NAME, min_len=0, required=False)
STATUS = Str(max_len=40, required=False, pattern=STATUS_PATTERN)
REF = Str(max_len=MAX_REF, pattern=REF_PATTERN)
LINK_LABEL = Str(max_len=MAX_LINK_LABEL)
STAFF_IDS = ListOf(Id(), max_items=500)
TEAM_IDS = ListOf(Id(), max_items=100)


@dataclass(frozen=True)
class DeliveryRequest:
    """A DeliverItemRequest, validated."""

    folder: str
    addressing: domain.Addressing
    title: str | None = field(repr=False)  # minimum necessary, yet never in a repr
    summary: str | None = field(repr=False)
    severity: str
    status: str | None
    due_at: int | None
    links: tuple[tuple[str, str], ...]
    source: str
    source_ref: str
    resolved: bool
    withdrawn: bool
    source_version: int
    delivery_id: str | None
    mark_unread: bool
    actor_staff_id: str | None
    patient_name: str | None = field(default=None, repr=False)  # PHI: sealed at rest, never in a repr


def folder_for(kind: int) -> str:
    """The folder a delivered kind lands in."""
    folder = KIND_FOLDERS.get(kind)
    if folder is None:
        raise InvalidInput("invalid_kind", "kind must be one of the delivered kinds", {"field": "kind"})
    return folder


def policy_for(producer: str, folder: str) -> ProducerPolicy:
    """The producer's policy, if it may deliver into `folder`; Forbidden otherwise."""
    policy = PRODUCERS.get(producer)
    if policy is None or folder not in policy.folders:
        raise Forbidden("kind_not_allowed", "this service may not deliver items of this kind")
    return policy


def parse_request(request: inbox_pb2.DeliverItemRequest) -> DeliveryRequest:
    """Validate every field before anything is read or written. A withdrawal needs only the
    source and source_ref; every other delivery needs a title and recipients."""
    folder = folder_for(request.kind)
    if request.severity not in SEVERITY_NAMES:
        raise InvalidInput("invalid_value", "severity is not a known value", {"field": "severity"})
    if request.source_version < 0:
        raise InvalidInput("invalid_value", "source_version must not be negative", {"field": "source_version"})
    withdrawn = bool(request.withdrawn)
    addressing = domain.Addressing(
        staff_ids=tuple(STAFF_IDS.clean("recipients.staff_ids", list(request.recipients.staff_ids))),
        team_ids=tuple(TEAM_IDS.clean("recipients.team_ids", list(request.recipients.team_ids))),
        whole_agency=bool(request.recipients.whole_agency),
    )
    if addressing.is_empty() and not withdrawn:
        raise InvalidInput("no_recipients", "address the item to staff, teams or the whole agency")
    if not request.title and withdrawn:
        title = None
    else:
        title = required(TITLE, "title", request.title)
    due_at = None
    if request.HasField("due_at"):
        try:
            due_at = request.due_at.ToMilliseconds()
        except ValueError as exc:  # outside what a Timestamp may hold (year 1..9999, valid nanos)
            raise InvalidInput("invalid_value", "due_at is not a valid time", {"field": "due_at"}) from exc
        if due_at <= 0:
            raise InvalidInput("invalid_value", "due_at must be a time after 1970", {"field": "due_at"})
    return DeliveryRequest(
        folder=folder,
        addressing=addressing,
        title=title,
        summary=SUMMARY.clean("summary", request.summary) or None,
        severity=SEVERITY_NAMES[request.severity],
        status=STATUS.clean("status", request.status) if request.status else None,
        due_at=due_at,
        links=parse_links(request.links),
        source=required(REF, "source", request.source),
        source_ref=required(REF, "source_ref", request.source_ref),
        resolved=bool(request.resolved),
        withdrawn=withdrawn,
        source_version=int(request.source_version),
        delivery_id=REF.clean("delivery_id", request.delivery_id) if request.delivery_id else None,
        mark_unread=bool(request.mark_unread),
        actor_staff_id=Id().clean("actor_staff_id", request.actor_staff_id) if request.actor_staff_id else None,
        patient_name=PATIENT_NAME.clean("patient_name", request.patient_name).strip() or None,
    )


def parse_links(links) -> tuple[tuple[str, str], ...]:
    if len(links) > MAX_LINKS:
        raise InvalidInput("too_many", f"links may hold at most {MAX_LINKS} items", {"field": "links"})
    return tuple(
        (required(LINK_LABEL, f"links[{i}].label", link.label), required(Link(), f"links[{i}].url", link.url))
        for i, link in enumerate(links)
    )


def required(spec: Str, path: str, value: str) -> str:
    """A protobuf string is empty when it was not set: that is a missing field."""
    if not value:
        raise InvalidInput("missing_field", f"{path} is required", {"field": path})
    return spec.clean(path, value)
