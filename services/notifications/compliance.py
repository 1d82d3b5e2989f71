"""Compliance Alerts: the rules, free of storage and transport.

A compliance item (treatment plan review due, consent expiring, note unsigned, ...) is created,
changed and resolved by the compliance system (a partner, through the gateway) or by compliance
officers. It reaches its assignees' Compliance Alerts folder as one board item (source_ref = the
item id) carrying its due time, so the board marks it overdue (red) the moment that passes.

A background pass then looks at every item whose next check is due (`next_check`):
- once past its due time, the assignees' item turns urgent with status `overdue` and is unread
  again (reported once per due time);
- once it has been overdue longer than the agency's `compliance_escalation_minutes`, it is
  escalated ONCE: the assignees' supervisors (directory `supervisor_id`) are told, and the
  agency's compliance officers when an assignee has no active supervisor (its admins when the
  agency has no officer). The escalation is a second board item (source_ref `<item>.escalation`);
  the assignees, who have the item already, are not among its recipients.
"Once" is kept by the item document itself: the claim (`escalated_due` = the due time escalated
for) and the events announcing it are one guarded write (`version`), so a second pass, replica or
a restart finds it done. A new due time (an extension) withdraws the escalation and starts over.

Resolving withdraws both board items: the item leaves every board it reached.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field, replace

from clinic.inbox.v1 import inbox_pb2
from services.notifications.schedule import when

SOURCE = "compliance"
ESCALATION_SUFFIX = ".escalation"
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
KIND_LABELS = {
    "treatment_plan_review": "Treatment plan review due",
    "consent_expiring": "Consent expiring",
    "note_unsigned": "Note unsigned",
    "assessment_due": "Assessment due",
    "training_due": "Training due",
}
MAX_ASSIGNEES = 20
MINUTE_MS = 60_000
OPEN, OVERDUE, ESCALATED, RESOLVED = "open", "overdue", "escalated", "resolved"


@dataclass(frozen=True)
class ComplianceItem:
    """One compliance item. `title` and `link` are PHI (sealed at rest, never logged)."""

    id: str
    agency_id: str
    # "partner:<gateway consumer>" or "staff"
    origin: str
    external_ref: str
    kind: str
    title: str = field(repr=False)
    link: str = field(repr=False)
    assignee_ids: tuple[str, ...]
    due_at: int
    version: int = 1
    created_by: str = ""
    resolved_at: int = 0
    # When the assignees were told it is overdue (0: not yet, for the current due time).
    overdue_at: int = 0
    # The due time it was escalated for (0: not escalated), and to whom.
    escalated_due: int = 0
    escalation_ids: tuple[str, ...] = ()
    created_at: int = 0

    @property
    def status(self) -> str:
        if self.resolved_at:
            return RESOLVED
        if self.escalated_due:
            return ESCALATED
        return OVERDUE if self.overdue_at else OPEN


@dataclass(frozen=True)
class Assignee:
    """What the directory says about an assignee, for escalation."""

    staff_id: str
    display_name: str
    supervisor_id: str = ""


@dataclass(frozen=True)
class Check:
    """What a pass does to an item at `now`."""

    report_overdue: bool
    escalate: bool
    next_check_at: int | None


def new_id() -> str:
    return "cmp_" + secrets.token_urlsafe(18)


def keyed_id(agency_id: str, staff_id: str, idempotency_key: str) -> str:
    """The id a staff member's create with this Idempotency-Key makes: a retry finds it again."""
    return "cmp_" + hashlib.sha256(f"{agency_id}|staff:{staff_id}|{idempotency_key}".encode()).hexdigest()[:32]


def partner_item_id(agency_id: str, consumer: str, external_ref: str) -> str:
    """The compliance system's own id names the item: a repeated PUT finds it again."""
    return "cmp_" + hashlib.sha256(f"{agency_id}|{consumer}|{external_ref}".encode()).hexdigest()[:32]


def kind_label(kind: str) -> str:
    return KIND_LABELS.get(kind) or kind.replace("_", " ").capitalize()


def next_check(item: ComplianceItem, escalation_minutes: int) -> int | None:
    """When the background pass must look at the item again (None: never, unless it changes)."""
    if item.resolved_at or item.escalated_due:
        return None
    if not item.overdue_at:
        return item.due_at
    return item.due_at + escalation_minutes * MINUTE_MS


def check(item: ComplianceItem, now: int, escalation_minutes: int) -> Check:
    """Report overdue once the due time has passed; escalate once it is overdue past the delay
    (both at once when a pass first sees an item already that late)."""
    if item.resolved_at or item.escalated_due or now < item.due_at:
        return Check(False, False, next_check(item, escalation_minutes))
    report = not item.overdue_at
    escalate = now >= item.due_at + escalation_minutes * MINUTE_MS
    after = replace(item, overdue_at=item.overdue_at or now, escalated_due=item.due_at if escalate else 0)
    return Check(report, escalate, next_check(after, escalation_minutes))


def changed(item: ComplianceItem, **changes) -> ComplianceItem:
    """The item after an edit: a new version; a new due time starts overdue and escalation over."""
    updated = replace(item, **changes, version=item.version + 1)
    if updated.due_at != item.due_at:
        updated = replace(updated, overdue_at=0, escalated_due=0)
    return updated


def same_content(before: ComplianceItem, after: ComplianceItem) -> bool:
    """Does an edit change nothing anyone sees?"""
    fields = ("kind", "title", "link", "assignee_ids", "due_at")
    return all(getattr(before, name) == getattr(after, name) for name in fields)


def escalation_recipients(
    assignees: list[Assignee], active_supervisors: set[str], officers: list[str], admins: list[str]
) -> list[str]:
    """Each assignee's active supervisor; the compliance officers for any assignee without one (the
    admins when the agency has no officer). Never the assignees themselves."""
    chosen: list[str] = []
    unsupervised = False
    for assignee in assignees:
        if assignee.supervisor_id and assignee.supervisor_id in active_supervisors:
            chosen.append(assignee.supervisor_id)
        else:
            unsupervised = True
    assigned = {a.staff_id for a in assignees}
    if unsupervised:
        fallback = [s for s in officers if s not in assigned] or [s for s in admins if s not in assigned]
        chosen.extend(fallback)
    return [s for s in dict.fromkeys(chosen) if s not in assigned]


# --- what the boards show --------------------------------------------------------------------


def _due(item: ComplianceItem) -> inbox_pb2.DeliverItemRequest:
    request = inbox_pb2.DeliverItemRequest()
    request.due_at.FromMilliseconds(item.due_at)
    return request


def assignee_delivery(item: ComplianceItem, time_zone: str, *, mark_unread: bool) -> inbox_pb2.DeliverItemRequest:
    """The assignees' board item: urgent and `overdue` once reported, else `open`."""
    overdue = bool(item.overdue_at)
    request = _due(item)
    request.MergeFrom(
        inbox_pb2.DeliverItemRequest(
            kind=inbox_pb2.DELIVERED_KIND_COMPLIANCE,
            recipients=inbox_pb2.Recipients(staff_ids=list(item.assignee_ids)),
            title=f"{kind_label(item.kind)}: {item.title}"[:200],
            summary=f"{'Overdue since' if overdue else 'Due'} {when(item.due_at, None, time_zone)}",
            severity=inbox_pb2.SEVERITY_URGENT if overdue else inbox_pb2.SEVERITY_INFO,
            status=OVERDUE if overdue else OPEN,
            links=[inbox_pb2.ActionLink(label="Open in the compliance system", url=item.link)] if item.link else [],
            source=SOURCE,
            source_ref=item.id,
            source_version=item.version,
            mark_unread=mark_unread,
        )
    )
    return request


def escalation_delivery(
    item: ComplianceItem, recipients: list[str], assignees: list[Assignee], time_zone: str
) -> inbox_pb2.DeliverItemRequest:
    names = ", ".join(a.display_name for a in assignees) or "nobody"
    request = _due(item)
    request.MergeFrom(
        inbox_pb2.DeliverItemRequest(
            kind=inbox_pb2.DELIVERED_KIND_COMPLIANCE,
            recipients=inbox_pb2.Recipients(staff_ids=recipients),
            title=f"Escalated: {kind_label(item.kind)}: {item.title}"[:200],
            summary=f"Overdue since {when(item.due_at, None, time_zone)}; assigned to {names}"[:1000],
            severity=inbox_pb2.SEVERITY_URGENT,
            status=ESCALATED,
            links=[inbox_pb2.ActionLink(label="Open in the compliance system", url=item.link)] if item.link else [],
            source=SOURCE,
            source_ref=item.id + ESCALATION_SUFFIX,
            source_version=item.version,
        )
    )
    return request


def withdrawal(source_ref: str, version: int) -> inbox_pb2.DeliverItemRequest:
    return inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_COMPLIANCE,
        source=SOURCE,
        source_ref=source_ref,
        withdrawn=True,
        source_version=version,
    )


def resolution_deliveries(item: ComplianceItem) -> list[inbox_pb2.DeliverItemRequest]:
    """Resolving clears the item from every board: the assignees' and the escalation's."""
    deliveries = [withdrawal(item.id, item.version)]
    if item.escalation_ids:
        deliveries.append(withdrawal(item.id + ESCALATION_SUFFIX, item.version))
    return deliveries
