"""Closed-loop critical results and unread urgent messages.

Critical results. A lab item delivered with severity "urgent" (HH, LL, AA and the other critical
flags: services/notifications/lab_domain.py) is a *critical result*. Its recipients acknowledge it
explicitly (opening it does not):

    POST /api/v1/board/items/<item_id>/acknowledge      who and when, on the result

The result's notice carries the loop's state, written in the same write as the delivery
(Delivery.compose_hooks): `critical_at` (arrival), `unacked_since` (indexed; cleared by the
acknowledgement), `escalation_stage` and `escalation_due_at` (indexed; the next deadline). The
deadline pass (`critical_pass`, run by the background loop and by every move of the test clock,
services/kit/clock.py) takes the results whose deadline passed by `clock.now_ms()`:

1. `critical_result_escalation_minutes` (agency option, 30) after arrival: a copy goes ONCE to each
   recipient's supervisor (directory `supervisor_id`, when active); for recipients without one, to
   the agency's escalation team (`escalation_team_id`), or its admins when the agency names none;
2. `critical_result_second_escalation_minutes` (60) after arrival: a copy goes to the agency's admins.

A copy is a notice of its own (source `inbox.escalation`, source_ref `<result notice id>.<level>`,
in Lab Report Notifications, urgent): deterministic ids and delivery keys, so a pass run twice, or
by two processes at once, delivers it once; the stage moves on in one write guarded by the deadline
it was taken at. The copy names the original (`escalation_of`), carries the original's title and no
other PHI (its summary says what happened, in words without PHI), sealed like any notice, and is
acknowledgeable: acknowledging the original or any copy records the acknowledgement on the original
(one write guarded by "not acknowledged yet") and stops the chain everywhere. Each notice's reading
pane shows the trail (`critical_result`: delivered to, escalated to whom and when, acknowledged by
whom and when, the next deadline). A result resolved or withdrawn by its producer is no longer
escalated.

Unread urgent messages. An urgent staff message no recipient has read (its receipts, `read_by`)
`urgent_message_escalation_minutes` (60; 0 off) after it was sent gives its sender an item in
Compliance Alerts ("not read"), with a one-click re-route:

    POST /api/v1/board/items/<item_id>/reroute   {"to": "supervisors"} | {"staff_ids": [...]}, "note"?

which forwards the message (the mailbox's forward path, urgent, audited as a forward) to the unread
recipients' supervisors or to the staff named. Urgent messages are taken into a watch list
(`urgent_watch`, one document per message, its deadline indexed) by a scan of the messages index
(priority, sent_at) from a stored watermark; the agency's option at that moment sets the deadline.

Audit: an acknowledgement is a `phi.accessed.v1` event (resource type "notice", action
"acknowledge", the staff member); an escalation one with action "escalate" by the inbox's service
identity, naming the result's notice; a re-route is the mailbox's "forward". Logs carry ids and
counts only.

Metric: `clinic_critical_results_unacknowledged{stage}` (stage: waiting, supervisor, admins), the
critical results not acknowledged (sampled by the background loop, up to GAUGE_CAP).
"""

from __future__ import annotations

import logging
import threading
import time

from flask import Blueprint, g, request
from prometheus_client import Counter, Gauge
from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from services.inbox import audit, domain
from services.inbox.board import iso
from services.inbox.components import Feature
from services.inbox.delivery import NOTICES, Delivery
from services.inbox.delivery_request import MAX_SUMMARY, MAX_TITLE, DeliveryRequest, ProducerPolicy
from services.inbox.store import MESSAGES, READ_BY
from services.inbox.team_queue import CLAIMED as QUEUE_CLAIMED
from services.inbox.team_queue import DONE as QUEUE_DONE
from services.inbox.team_queue import QUEUES as TEAM_QUEUES
from services.kit import clock
from services.kit.auth import KIND_SERVICE, SERVICE_SUBJECT_PREFIX, Identity
from services.kit.errors import Conflict, DomainError, InvalidInput
from services.kit.http import require_staff as staff_only
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.runtime import every
from services.kit.service_identity import acting_as
from services.kit.validation import Choice, Id, ListOf, Str, json_body, path_id, validate

log = logging.getLogger(__name__)

PRODUCER = "inbox"
POLICY = ProducerPolicy(frozenset({domain.FOLDER_LAB, domain.FOLDER_COMPLIANCE}), "Message Board")
ESCALATION_SOURCE = "inbox.escalation"
URGENT_SOURCE = "inbox.urgent-unread"
OWN_SOURCES = (ESCALATION_SOURCE, URGENT_SOURCE)
CRITICAL_SEVERITY = "urgent"
LEVEL_SUPERVISOR, LEVEL_ADMINS = 1, 2
STAGE_NAMES = {0: "waiting", LEVEL_SUPERVISOR: "supervisor", LEVEL_ADMINS: "admins"}

WATCH = "urgent_watch"
STATE = "escalation_state"
INTAKE_ID = "urgent_intake"
INTAKE_OVERLAP_MS = 10_000  # each intake reads this much again: a send written late is still seen
INTAKE_BATCH = 1000
PASS_BATCH = 100
PASS_INTERVAL_S = 2.0
GAUGE_EVERY_S = 15.0
GAUGE_CAP = 100_000
MINUTE_MS = 60_000

UNACKNOWLEDGED = Gauge(
    "clinic_critical_results_unacknowledged",
    "Critical lab results not acknowledged, by escalation stage reached (waiting, supervisor, admins)",
    ["stage"],
)
ESCALATIONS = Counter(
    "clinic_critical_result_escalations_total", "Critical results escalated, by level (supervisor, admins)", ["level"]
)
URGENT_UNREAD = Counter("clinic_urgent_messages_unread_total", "Senders told their urgent message was not read")

ACK_SPEC: dict = {}
REROUTE_SPEC = {
    "to": Choice(("supervisors",)),
    "staff_ids": ListOf(Id(), max_items=50),
    "note": Str(max_len=2000, required=False, min_len=0, strip=False),
}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def is_critical(wanted: DeliveryRequest) -> bool:
    """A lab item delivered urgent (and neither resolved nor withdrawn) is a critical result."""
    return (
        wanted.folder == domain.FOLDER_LAB
        and wanted.severity == CRITICAL_SEVERITY
        and not wanted.resolved
        and not wanted.withdrawn
        and wanted.source not in OWN_SOURCES
    )


def critical_fields(
    wanted: DeliveryRequest, notice: dict | None, at: int, first_minutes: int, clock_at: int | None = None
) -> dict:
    """The loop's fields a delivery writes on a notice (None unsets): started when the result first
    becomes critical, stopped when it is resolved, withdrawn or no longer critical; an acknowledged
    result is left as it is. `at` is the arrival as stored (wall clock), `clock_at` the same moment
    by the deadline clock (services/kit/clock.py; the same but in tests), which deadlines count from."""
    clock_at = at if clock_at is None else clock_at
    previous = notice or {}
    if wanted.source in OWN_SOURCES or previous.get("acknowledged_at"):
        return {}
    if is_critical(wanted):
        if previous.get("critical_at"):
            return {}
        return {
            "critical_at": at,
            "unacked_since": at,
            "escalation_stage": 0,
            "escalation_from": clock_at,
            "escalation_due_at": clock_at + first_minutes * MINUTE_MS,
        }
    if previous.get("unacked_since") or previous.get("escalation_due_at"):
        return {"unacked_since": None, "escalation_due_at": None}
    return {}


def first_level_targets(
    recipients: list[str], supervisors: dict[str, str], team_id: str, admins: list[str]
) -> tuple[list[str], list[str]]:
    """(staff ids, team ids) of the first escalation: each recipient's supervisor; the escalation
    team for those without one, or the admins when the agency names no team."""
    staff = sorted({supervisors[r] for r in recipients if supervisors.get(r)})
    lacking = [r for r in recipients if not supervisors.get(r)]
    teams: list[str] = []
    if lacking:
        if team_id:
            teams = [team_id]
        else:
            staff = sorted({*staff, *admins})
    return staff, teams


def trail(root: dict, shown: dict) -> dict:
    """A critical result's loop as its reading pane (original or copy) shows it."""
    acknowledged = None
    if root.get("acknowledged_at"):
        acknowledged = {
            "at": iso(root["acknowledged_at"]),
            "by": {"id": root.get("acknowledged_by", ""), "name": root.get("acknowledged_by_name", "")},
            "on_escalation": root.get("acknowledged_on", root["_id"]) != root["_id"],
        }
    escalations = root.get("escalations") or {}
    due = root.get("escalation_due_at")
    return {
        "critical_result": {
            "result_id": root["_id"],
            "escalation_level": int(shown.get("escalation_level") or 0),
            "acknowledgeable": True,
            "arrived_at": iso(root.get("critical_at")),
            "delivered_to": list(root.get("recipient_ids") or []),
            "escalations": [
                {
                    "level": int(level),
                    "stage": STAGE_NAMES.get(int(level), str(level)),
                    "at": iso(entry.get("at")),
                    "staff_ids": list(entry.get("staff_ids") or []),
                    "team_ids": list(entry.get("team_ids") or []),
                }
                for level, entry in sorted(escalations.items(), key=lambda pair: int(pair[0]))
            ],
            "acknowledged": acknowledged,
            "next_escalation_at": None if acknowledged or not due else iso(due - clock.offset_ms()),
        }
    }


class Escalation(Feature):
    """Acknowledgement and escalation of critical results; unread urgent messages."""

    def __init__(self, components):
        super().__init__(components)
        self.store = components.store
        self.notices = components.store.db[NOTICES]
        self.watch = components.store.db[WATCH]
        self.state = components.store.db[STATE]
        self._gauge_at = 0.0
        # The test clock's offset when the last urgent-message pass ran: a message not taken in yet
        # was sent under it (the offset moves only in clock.advance, which runs the passes at once).
        self._offset_seen = clock.offset_ms()

    @property
    def delivery(self) -> Delivery:
        for feature in self.components.features:
            if isinstance(feature, Delivery):
                return feature
        raise RuntimeError("escalation needs the delivery feature")

    def ensure_indexes(self) -> None:
        ensure_indexes(
            self.store.db,
            [
                IndexSpec(NOTICES, [("escalation_due_at", 1)], name="escalation_due"),
                IndexSpec(NOTICES, [("unacked_since", 1)], name="unacked_since"),
                IndexSpec(MESSAGES, [("priority", 1), ("sent_at", 1)], name="priority_sent"),
                IndexSpec(WATCH, [("due_at", 1)], name="urgent_due"),
            ],
        )

    def attach(self) -> None:
        delivery = self.delivery
        delivery.compose_hooks.append(self._on_compose)
        delivery.detail_extras.append(self._detail)
        clock.on_advance("critical-result-escalation", lambda now: self.critical_pass(now, gauge=True))
        clock.on_advance("urgent-message-escalation", self.urgent_pass)

    def background(self):
        return [("escalation", self.run)]

    def run(self, stop: threading.Event, interval_s: float = PASS_INTERVAL_S) -> None:
        every(stop, interval_s, self.run_passes, "escalation", errors=(PyMongoError, DomainError))

    def run_passes(self) -> dict:
        now = clock.now_ms()
        return {"critical": self.critical_pass(now), "urgent": self.urgent_pass(now)}

    # --- the loop's state on a delivered notice ----------------------------------------------------
    def _on_compose(self, agency_id: str, wanted: DeliveryRequest, notice: dict | None, fields: dict) -> dict:
        if not is_critical(wanted) and not (notice or {}).get("unacked_since"):
            return {}
        minutes = self.components.options.get(agency_id)["critical_result_escalation_minutes"]
        return critical_fields(wanted, notice, fields["delivered_at"], minutes, clock.now_ms())

    def _root(self, notice: dict) -> dict | None:
        root_id = notice.get("escalation_of")
        if not root_id:
            return notice
        root = self.delivery.find_notice(root_id)
        return root if root is not None and root["agency_id"] == notice["agency_id"] else None

    def _detail(self, caller: Identity, notice: dict) -> dict:
        if notice.get("urgent_message_id"):
            return self._urgent_detail(notice)
        if not notice.get("critical_at") and not notice.get("escalation_of"):
            return {}
        root = self._root(notice)
        return trail(root, notice) if root is not None else {}

    # --- acknowledging -----------------------------------------------------------------------------
    def _own_notice(self, caller: Identity, item_id: str, action: str) -> tuple[dict, dict]:
        item = self.components.board.own_item(caller, item_id, action)
        notice = self.delivery.find_notice(item["ref_id"]) if item.get("kind") == domain.KIND_NOTICE else None
        if notice is None and item.get("kind") == domain.KIND_NOTICE:
            raise audit.refuse(
                self.store,
                caller,
                item_id,
                action,
                resource_type="notice",
                code="item_not_found",
                message="no such item",
            )
        # The caller's own item: theirs, or a coverer's copy of a recipient's (services/inbox/coverage.py).
        viewers = {caller.staff_id, (item.get("covering_for") or {}).get("staff_id")}
        if notice is not None and (
            notice["agency_id"] != caller.agency_id or not viewers & set(notice.get("recipient_ids") or [])
        ):
            raise audit.refuse(
                self.store,
                caller,
                item_id,
                action,
                resource_type="notice",
                code="item_not_found",
                message="no such item",
            )
        return item, notice

    def acknowledge(self, caller: Identity, item_id: str) -> dict:
        _, notice = self._own_notice(caller, item_id, "acknowledge")
        root = self._root(notice) if notice is not None else None
        if root is None or not root.get("critical_at"):
            raise Conflict("not_acknowledgeable", "only a critical result is acknowledged")
        if not root.get("acknowledged_at"):
            at = now_ms()
            ack = {
                "acknowledged_at": at,
                "acknowledged_by": caller.staff_id,
                "acknowledged_by_name": caller.name,
                "acknowledged_on": notice["_id"],
            }
            written = self.notices.update_one(
                {"_id": {"$eq": root["_id"]}, "acknowledged_at": {"$eq": None}},
                {"$set": ack, "$unset": {"unacked_since": "", "escalation_due_at": ""}},
            )
            if written.matched_count:
                audit.record_access(
                    self.store,
                    audit.accessed_event(caller, root["_id"], resource_type="notice", action="acknowledge"),
                    root["_id"],
                    "acknowledge",
                    caller,
                )
                log.info(
                    "critical result acknowledged",
                    extra={
                        "agency_id": caller.agency_id,
                        "staff_id": caller.staff_id,
                        "notice_id": root["_id"],
                        "level": int(notice.get("escalation_level") or 0),
                    },
                )
            root = self.delivery.find_notice(root["_id"]) or root
        return trail(root, notice)

    # --- escalating critical results --------------------------------------------------------------
    def critical_pass(self, now: int, *, gauge: bool = False) -> int:
        """Escalate every critical result whose deadline passed by `now`; how many were escalated."""
        due = self.notices.find({"escalation_due_at": {"$lte": now}}, projection={"_outbox": 0})
        escalated = 0
        for doc in list(due.sort("escalation_due_at", ASCENDING).limit(PASS_BATCH)):
            try:
                escalated += self._escalate(doc)
            except DomainError as exc:  # directory unavailable: the next pass tries again
                log.warning("escalation postponed (%s)", exc.code, extra={"notice_id": doc["_id"]})
        self._refresh_gauge(force=gauge)
        return escalated

    def _service_identity(self, agency_id: str) -> Identity:
        tokens = self.components.service_tokens
        if tokens is not None:
            return tokens.identity(agency_id)
        return Identity(subject=SERVICE_SUBJECT_PREFIX + PRODUCER, agency_id=agency_id, kind=KIND_SERVICE)

    def _escalate(self, doc: dict) -> int:
        guard = {"_id": {"$eq": doc["_id"]}, "escalation_due_at": {"$eq": doc["escalation_due_at"]}}
        level = int(doc.get("escalation_stage") or 0) + 1
        if doc.get("acknowledged_at") or doc.get("resolved_at") or doc.get("withdrawn_at") or level > LEVEL_ADMINS:
            self.notices.update_one(guard, {"$unset": {"escalation_due_at": ""}})
            return 0
        agency_id = doc["agency_id"]
        options = self.components.options.get(agency_id)
        identity = self._service_identity(agency_id)
        with acting_as(identity):
            copy_id, staff_ids, team_ids = self._deliver_copy(doc, level, options)
        entry = {"at": now_ms(), "staff_ids": staff_ids, "team_ids": team_ids, "notice_id": copy_id}
        update: dict = {"$set": {"escalation_stage": level, f"escalations.{level}": entry}}
        if level == LEVEL_SUPERVISOR:
            start = doc.get("escalation_from", doc["critical_at"])
            update["$set"]["escalation_due_at"] = (
                start + options["critical_result_second_escalation_minutes"] * MINUTE_MS
            )
        else:
            update["$unset"] = {"escalation_due_at": ""}
        if not self.notices.update_one(guard, update).matched_count:
            # Acknowledged (or escalated by another pass) meanwhile: the copy, if delivered, stays in the trail.
            current = self.delivery.find_notice(doc["_id"]) or {}
            if copy_id and str(level) not in (current.get("escalations") or {}):
                self.notices.update_one({"_id": {"$eq": doc["_id"]}}, {"$set": {f"escalations.{level}": entry}})
            return 0
        audit.record_access(
            self.store,
            audit.accessed_event(identity, doc["_id"], resource_type="notice", action="escalate"),
            doc["_id"],
            "escalate",
            identity,
        )
        ESCALATIONS.labels(STAGE_NAMES[level]).inc()
        log.info(
            "critical result escalated",
            extra={"agency_id": agency_id, "notice_id": doc["_id"], "level": level, "recipients": len(staff_ids)},
        )
        return 1

    def _targets(self, doc: dict, level: int, options: dict) -> tuple[list[str], list[str]]:
        directory = self.components.directory
        if level == LEVEL_ADMINS:
            return directory.admin_ids(), []
        recipients = list(doc.get("recipient_ids") or [])
        supervisors = directory.supervisors(recipients)
        team_id = options["escalation_team_id"]
        admins = [] if team_id or all(supervisors.get(r) for r in recipients) else directory.admin_ids()
        return first_level_targets(recipients, supervisors, team_id, admins)

    def _deliver_copy(self, doc: dict, level: int, options: dict) -> tuple[str, list[str], list[str]]:
        """Deliver the copy of `level` (once, whoever asks); (its notice id, staff reached, teams)."""
        staff_ids, team_ids = self._targets(doc, level, options)
        agency_id, nid = doc["agency_id"], doc["_id"]
        title = self.components.cipher.open(agency_id, nid, "title", doc["title"])
        minutes = options[
            "critical_result_escalation_minutes"
            if level == LEVEL_SUPERVISOR
            else "critical_result_second_escalation_minutes"
        ]
        summary = (
            f"Escalated critical result: not acknowledged by its {len(doc.get('recipient_ids') or [])} recipient(s) "
            f"within {minutes} minutes of arrival. Acknowledge it to stop the escalation."
        )

        def wanted(staff: list[str], teams: list[str]) -> DeliveryRequest:
            return DeliveryRequest(
                folder=domain.FOLDER_LAB,
                addressing=domain.Addressing(staff_ids=tuple(staff), team_ids=tuple(teams)),
                title=_clip(f"Not acknowledged: {title}", MAX_TITLE),
                summary=_clip(summary, MAX_SUMMARY),
                severity=CRITICAL_SEVERITY,
                status="escalated",
                due_at=None,
                links=(),
                source=ESCALATION_SOURCE,
                source_ref=f"{nid}.{level}",
                resolved=False,
                withdrawn=False,
                source_version=0,
                delivery_id=None,
                mark_unread=False,
                actor_staff_id=None,
            )

        extra = {"escalation_of": nid, "escalation_level": level}
        key = f"esc.{nid}.{level}"
        try:
            outcome = self.delivery.deliver_checked(
                agency_id, PRODUCER, POLICY, wanted(staff_ids, team_ids), key, extra
            )
        except InvalidInput as exc:
            if exc.code == "unknown_recipients" and team_ids:  # the escalation team is gone: the admins instead
                staff_ids, team_ids = sorted({*staff_ids, *self.components.directory.admin_ids()}), []
                try:
                    outcome = self.delivery.deliver_checked(
                        agency_id, PRODUCER, POLICY, wanted(staff_ids, []), key, extra
                    )
                except InvalidInput:
                    return "", [], []
            else:  # nobody to escalate to: the stage still passes (the trail says nobody)
                log.warning("critical result has nobody to escalate to", extra={"notice_id": nid, "level": level})
                return "", [], []
        return outcome.notice_id, list(outcome.recipient_ids), team_ids

    def _refresh_gauge(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._gauge_at < GAUGE_EVERY_S and self._gauge_at:
            return
        self._gauge_at = time.monotonic()
        counts = dict.fromkeys(STAGE_NAMES.values(), 0)
        found = self.notices.find({"unacked_since": {"$gte": 0}}, projection={"escalation_stage": 1}).limit(GAUGE_CAP)
        for doc in found:
            counts[STAGE_NAMES.get(int(doc.get("escalation_stage") or 0), "waiting")] += 1
        for stage, count in counts.items():
            UNACKNOWLEDGED.labels(stage).set(count)

    # --- unread urgent messages ---------------------------------------------------------------------
    def urgent_pass(self, now: int) -> int:
        """Take newly sent urgent messages into the watch list, then tell the senders of those whose
        deadline passed by `now` unread; how many senders were told."""
        self._intake(self._offset_seen)
        self._offset_seen = clock.offset_ms()
        due = self.watch.find({"due_at": {"$lte": now}}).sort("due_at", ASCENDING).limit(PASS_BATCH)
        told = 0
        for watched in list(due):
            try:
                told += self._check_urgent(watched)
            except DomainError as exc:
                log.warning("urgent message check postponed (%s)", exc.code, extra={"message_id": watched["_id"]})
        return told

    def _intake(self, offset_ms: int) -> None:
        state = self.state.find_one({"_id": {"$eq": INTAKE_ID}})
        if state is None:
            try:
                # From now on: messages sent before the first intake are not watched.
                self.state.insert_one({"_id": INTAKE_ID, "through": now_ms()})
            except DuplicateKeyError:
                pass
            state = self.state.find_one({"_id": {"$eq": INTAKE_ID}}) or {"through": 0}
        through = int(state["through"])
        found = self.store.messages.find(
            {"priority": {"$eq": "urgent"}, "sent_at": {"$gte": through - INTAKE_OVERLAP_MS}},
            projection={"agency_id": 1, "sent_at": 1, "kind": 1, "sender_kind": 1, "sender_id": 1},
        )
        messages = list(found.sort("sent_at", ASCENDING).limit(INTAKE_BATCH))
        if not messages:
            return
        known = {doc["_id"] for doc in self.watch.find({"_id": {"$in": [m["_id"] for m in messages]}}, {"_id": 1})}
        minutes_of: dict[str, int] = {}
        for message in messages:
            if message["_id"] in known or message.get("kind", domain.KIND_MESSAGE) != domain.KIND_MESSAGE:
                continue
            if message.get("sender_kind", "staff") != "staff":
                continue
            agency_id = message["agency_id"]
            if agency_id not in minutes_of:
                minutes_of[agency_id] = self.components.options.get(agency_id)["urgent_message_escalation_minutes"]
            minutes = minutes_of[agency_id]
            watched = {"_id": message["_id"], "agency_id": agency_id, "sent_at": message["sent_at"]}
            if minutes:
                watched["due_at"] = message["sent_at"] + offset_ms + minutes * MINUTE_MS
                watched["minutes"] = minutes
            else:
                watched["outcome"] = "off"
            try:
                self.watch.insert_one(watched)
            except DuplicateKeyError:
                pass
        newest = max(m["sent_at"] for m in messages)
        self.state.update_one({"_id": {"$eq": INTAKE_ID}, "through": {"$lt": newest}}, {"$set": {"through": newest}})

    def _check_urgent(self, watched: dict) -> int:
        guard = {"_id": {"$eq": watched["_id"]}, "due_at": {"$eq": watched["due_at"]}}

        def finish(outcome: str, notice_id: str = "") -> None:
            fields = {"done_at": now_ms(), "outcome": outcome, "notice_id": notice_id}
            self.watch.update_one(guard, {"$set": fields, "$unset": {"due_at": ""}})

        message = self.store.message(watched["_id"])
        if message is None or message.get("recall") or message.get("recall_started_at"):
            finish("gone")
            return 0
        read_by = message.get(READ_BY) or {}
        recipients = list(message.get("recipient_ids") or [])
        if not recipients or any(r in read_by for r in recipients):
            finish("read")
            return 0
        queue = self.store.messages.database[TEAM_QUEUES].find_one({"_id": {"$eq": watched["_id"]}}, {"state": 1})
        if queue is not None and queue.get("state") in (QUEUE_CLAIMED, QUEUE_DONE):
            finish("claimed")  # a team member took it on: somebody is acting, nothing to tell
            return 0
        agency_id = message["agency_id"]
        minutes = int(watched.get("minutes") or 0)
        with acting_as(self._service_identity(agency_id)):
            try:
                outcome = self._tell_sender(message, minutes)
            except InvalidInput:  # the sender is no longer an active staff member
                finish("sender_gone")
                return 0
        finish("told", outcome)
        URGENT_UNREAD.inc()
        log.info(
            "urgent message unread: sender told",
            extra={"agency_id": agency_id, "message_id": message["_id"], "recipients": len(recipients)},
        )
        return 1

    def _tell_sender(self, message: dict, minutes: int) -> str:
        agency_id, mid = message["agency_id"], message["_id"]
        subject = self.components.cipher.open(agency_id, mid, "subject", message["subject"])
        count = len(message.get("recipient_ids") or [])
        wanted = DeliveryRequest(
            folder=domain.FOLDER_COMPLIANCE,
            addressing=domain.Addressing(staff_ids=(message["sender_id"],)),
            title=_clip(f"Urgent message not read: {subject}", MAX_TITLE),
            summary=_clip(
                f"None of the {count} recipient(s) has read your urgent message {minutes} minutes after it was "
                "sent. Re-route it to their supervisors or to someone else.",
                MAX_SUMMARY,
            ),
            severity=CRITICAL_SEVERITY,
            status="unread",
            due_at=None,
            links=(),
            source=URGENT_SOURCE,
            source_ref=mid,
            resolved=False,
            withdrawn=False,
            source_version=0,
            delivery_id=None,
            mark_unread=False,
            actor_staff_id=None,
        )
        extra = {"urgent_message_id": mid}
        return self.delivery.deliver_checked(agency_id, PRODUCER, POLICY, wanted, f"urgent.{mid}", extra).notice_id

    def _urgent_detail(self, notice: dict) -> dict:
        message = self.store.message(notice["urgent_message_id"]) or {}
        read_by = message.get(READ_BY) or {}
        recipients = list(message.get("recipient_ids") or [])
        rerouted = notice.get("rerouted") or {}
        return {
            "urgent_message": {
                "message_id": notice["urgent_message_id"],
                "sent_at": iso(message.get("sent_at")),
                "recipient_ids": recipients,
                "unread_recipient_ids": [r for r in recipients if r not in read_by],
                "rerouted": [
                    {"message_id": mid, "at": iso(entry.get("at")), "staff_ids": list(entry.get("staff_ids") or [])}
                    for mid, entry in sorted(rerouted.items(), key=lambda pair: pair[1].get("at") or 0)
                ],
            }
        }

    # --- re-routing an unread urgent message ---------------------------------------------------------
    def reroute(self, caller: Identity, item_id: str, body: dict) -> dict:
        if ("to" in body) == ("staff_ids" in body):
            raise InvalidInput("invalid_value", "give either to or staff_ids")
        _, notice = self._own_notice(caller, item_id, "reroute")
        if notice is None or not notice.get("urgent_message_id"):
            raise Conflict("not_reroutable", "only an unread urgent message's item can re-route it")
        message = self.store.message(notice["urgent_message_id"])
        if message is None or message["agency_id"] != caller.agency_id or message["sender_id"] != caller.staff_id:
            raise audit.refuse(self.store, caller, notice["urgent_message_id"], "reroute")
        if "staff_ids" in body:
            staff_ids = list(body["staff_ids"])
            if not staff_ids:
                raise InvalidInput("no_recipients", "name at least one staff member")
        else:
            read_by = message.get(READ_BY) or {}
            unread = [r for r in message.get("recipient_ids") or [] if r not in read_by]
            supervisors = self.components.directory.supervisors(unread)
            staff_ids = sorted({s for s in supervisors.values() if s and s != caller.staff_id})
            if not staff_ids:
                raise Conflict(
                    "no_supervisor", "none of the unread recipients has a supervisor; name the staff instead"
                )
        note = body.get("note") or "Re-routed: no one has read this urgent message yet."
        result = self.components.mailbox.forward(
            caller,
            message["_id"],
            addressing=domain.Addressing(staff_ids=tuple(staff_ids)),
            note=note,
            priority="urgent",
            idempotency_key="reroute:" + domain.digest(notice["_id"], *sorted(staff_ids), note)[:40],
            max_body=self.components.settings.max_body_chars,
        )
        if result.created:  # a repeat keeps the first re-route's entry (and its time)
            entry = {"at": now_ms(), "staff_ids": list(result.recipient_ids), "by": caller.staff_id}
            self.notices.update_one({"_id": {"$eq": notice["_id"]}}, {"$set": {f"rerouted.{result.message_id}": entry}})
        log.info(
            "urgent message re-routed",
            extra={
                "agency_id": caller.agency_id,
                "message_id": message["_id"],
                "recipients": len(result.recipient_ids),
            },
        )
        return {"message_id": result.message_id, "recipient_ids": list(result.recipient_ids), "created": result.created}

    # --- HTTP ---------------------------------------------------------------------------------------------
    def blueprint(self):
        items = Blueprint("escalation", __name__, url_prefix="/api/v1/board/items")

        @items.post("/<item_id>/acknowledge")
        @staff_only
        def acknowledge(item_id: str):
            if request.get_data():
                validate(json_body(), ACK_SPEC)
            return self.acknowledge(g.identity, path_id(item_id, "item"))

        @items.post("/<item_id>/reroute")
        @staff_only
        def reroute(item_id: str):
            body = validate(json_body(), REROUTE_SPEC)
            made = self.reroute(g.identity, path_id(item_id, "item"), body)
            return made, 201 if made["created"] else 200  # a repeated re-route answers the same message

        return items


__all__ = ["Escalation", "critical_fields", "first_level_targets", "is_critical", "trail"]
