"""The shape of a message as both edges (HTTP and gRPC) accept it."""

from __future__ import annotations

from clinic.inbox.v1 import inbox_pb2
from services.inbox import domain
from services.kit.errors import InvalidInput
from services.kit.validation import Bool, Choice, Id, Link, ListOf, Spec, Str

PRIORITY_TO_PB = {"normal": inbox_pb2.PRIORITY_NORMAL, "urgent": inbox_pb2.PRIORITY_URGENT}
IDEMPOTENCY_KEY = Str(max_len=128)


def send_spec(max_subject: int, max_body: int) -> dict[str, Spec]:
    return {
        "to_staff_ids": ListOf(Id(), max_items=500),
        "to_team_ids": ListOf(Id(), max_items=100),
        "to_whole_agency": Bool(),
        "subject": Str(max_len=max_subject),
        "body": Str(max_len=max_body, strip=False),
        "priority": Choice(choices=domain.PRIORITIES),
        "links": ListOf(Link(), max_items=10),
    }


def require_body(fields: dict) -> None:
    """A body of only white space is refused (the field spec keeps white space as typed)."""
    if not fields["body"].strip():
        raise InvalidInput("invalid_value", "body must not be empty", {"field": "body"})


def addressing_from(fields: dict) -> domain.Addressing:
    return domain.Addressing(
        staff_ids=tuple(fields.get("to_staff_ids", ())),
        team_ids=tuple(fields.get("to_team_ids", ())),
        whole_agency=fields.get("to_whole_agency", False),
    )


def draft_from(fields: dict) -> domain.Draft:
    """A validated body (see send_spec) as a Draft."""
    require_body(fields)
    return domain.Draft(
        addressing=addressing_from(fields),
        subject=fields["subject"],
        body=fields["body"],
        priority=fields.get("priority", "normal"),
        links=tuple(fields.get("links", ())),
    )


def reply_spec(max_body: int) -> dict[str, Spec]:
    """A reply or reply-all: the recipients and subject come from the message answered."""
    return {
        "body": Str(max_len=max_body, strip=False),
        "priority": Choice(choices=domain.PRIORITIES),
        "links": ListOf(Link(), max_items=10),
    }
