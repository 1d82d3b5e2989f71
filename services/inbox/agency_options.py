"""The agency's message-handling options: one document per agency (`message_options`, read by
primary key), each option with a default, set by the agency's admins.

    GET   /api/v1/board/agency-options    every option, defaults filled in (any staff member)
    PATCH /api/v1/board/agency-options    change some (admins; others 403 `forbidden`)

Each option is declared once in `OPTIONS` (its validation and default); features read them with
`components.options.get(agency_id)`. A change is logged without values and recorded as a
`settings_changed` security event naming the options changed.

Options:
- `receipts` (default on): senders see when each recipient read a message.
- `recall_window_minutes` (10; 0 turns recall off).
- `critical_result_escalation_minutes` (30): a critical result nobody acknowledged is escalated to
  each recipient's supervisor, or the escalation team; `critical_result_second_escalation_minutes`
  (60, from arrival) then to the agency's admins. `escalation_team_id` ("" = none) names the team.
- `urgent_message_escalation_minutes` (60; 0 off): the sender of an urgent message no recipient has
  read is told.
- `overdue_report_minutes` (60): how long after a signature request's due time, or an
  announcement's acknowledge-by time, its author gets the list of who has not.
- `retention_archive_read_after_days` (0 = never) and `retention_delete_content_after_years`
  (0 = keep for ever): the retention job's policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, g

from services.inbox.components import Feature
from services.inbox.domain import Addressing
from services.kit.auth import Identity
from services.kit.errors import Forbidden, InvalidInput
from services.kit.http import require_staff as staff_only
from services.kit.mongo import now_ms
from services.kit.security_events import SecurityLog
from services.kit.validation import ID_PATTERN, Bool, Int, Spec, json_body, validate

log = logging.getLogger(__name__)

COLLECTION = "message_options"
PRODUCER = "inbox"


@dataclass
class IdOrBlank(Spec):
    """An id, or "" for none."""

    required: bool = False

    def clean(self, path: str, value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidInput("invalid_type", f"{path} must be a string", {"field": path})
        if value and not ID_PATTERN.fullmatch(value):
            raise InvalidInput("invalid_value", f"{path} has an invalid format", {"field": path})
        return value


@dataclass(frozen=True)
class Option:
    spec: Spec
    default: Any


# name -> (validation, default). Booleans are stored as 0/1 (nx-27017 serves numbers from indexes).
OPTIONS: dict[str, Option] = {
    "receipts": Option(Bool(), True),
    "recall_window_minutes": Option(Int(minimum=0, maximum=1440), 10),
    "critical_result_escalation_minutes": Option(Int(minimum=1, maximum=1440), 30),
    "critical_result_second_escalation_minutes": Option(Int(minimum=1, maximum=2880), 60),
    "escalation_team_id": Option(IdOrBlank(), ""),
    "urgent_message_escalation_minutes": Option(Int(minimum=0, maximum=1440), 60),
    "overdue_report_minutes": Option(Int(minimum=0, maximum=10080), 60),
    "retention_archive_read_after_days": Option(Int(minimum=0, maximum=36500), 0),
    "retention_delete_content_after_years": Option(Int(minimum=0, maximum=100), 0),
}
SPECS: dict[str, Spec] = {name: option.spec for name, option in OPTIONS.items()}


def _value(option: Option, stored: Any) -> Any:
    if stored is None:
        return option.default
    if isinstance(option.spec, Bool):
        return bool(stored)
    return stored


class AgencyOptions(Feature):
    """The options' store and routes; constructed first, as `components.options`."""

    def __init__(self, components):
        super().__init__(components)
        self.collection = components.store.db[COLLECTION]
        self.security = SecurityLog(components.store.db, service=PRODUCER)
        components.options = self

    def get(self, agency_id: str) -> dict:
        """Every option of the agency, defaults filled in."""
        doc = self.collection.find_one({"_id": {"$eq": agency_id}}) or {}
        return {name: _value(option, doc.get(name)) for name, option in OPTIONS.items()}

    def set(self, caller: Identity, body: dict) -> dict:
        """Change the options `body` names (admins only): each checked on its own, then together."""
        if not caller.is_admin:
            raise Forbidden("forbidden", "this action needs the admin role")
        for name, value in body.items():
            if value is None and name in SPECS:
                raise InvalidInput("invalid_type", f"{name} must not be null", {"field": name})
        changes = validate(body, SPECS)
        if not changes:
            raise InvalidInput("missing_field", "name at least one option to change")
        merged = {**self.get(caller.agency_id), **changes}
        first, second = "critical_result_escalation_minutes", "critical_result_second_escalation_minutes"
        if merged[second] <= merged[first]:
            raise InvalidInput(
                "invalid_value",
                f"{second} ({merged[second]}) must be later than {first} ({merged[first]})",
                {"field": second if second in changes else first},
            )
        team_id = changes.get("escalation_team_id")
        if team_id and self.components.directory.resolve(Addressing(team_ids=(team_id,))).missing_team_ids:
            raise InvalidInput(
                "unknown_team", "escalation_team_id is not a team of your agency", {"field": "escalation_team_id"}
            )
        fields: dict = {"updated_at": now_ms(), "updated_by": caller.staff_id}
        for name, value in changes.items():
            fields[name] = int(value) if isinstance(value, bool) else value
        self.collection.update_one({"_id": {"$eq": caller.agency_id}}, {"$set": fields}, upsert=True)
        self.security.record(
            "settings_changed",
            agency_id=caller.agency_id,
            actor_id=caller.staff_id,
            actor_kind="staff",
            outcome="succeeded",
            reason="changed " + ", ".join(sorted(changes)),
            target_type="agency_message_options",
            target_id=caller.agency_id,
        )
        log.info(
            "message options changed",
            extra={"agency_id": caller.agency_id, "staff_id": caller.staff_id, "fields": sorted(changes)},
        )
        return self.get(caller.agency_id)

    def blueprint(self):
        options = Blueprint("agency_options", __name__, url_prefix="/api/v1/board")

        @options.get("/agency-options")
        @staff_only
        def get_options():
            return self.get(g.identity.agency_id)

        @options.patch("/agency-options")
        @staff_only
        def patch_options():
            return self.set(g.identity, json_body())

        return options
