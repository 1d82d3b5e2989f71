"""Delivery tracking of an outbound Direct message, per recipient (pure logic, no storage).

Each recipient moves forward only: queued -> sent -> processed -> dispatched, or to failed, which
is final (a failure notification overrides any earlier state; nothing changes a failed recipient).
A late or repeated notification that would not move a recipient forward changes nothing.

Every message asks for final delivery (`X-DIRECT-FINAL-DESTINATION-DELIVERY`), so `dispatched` (a
dispatched MDN carrying that field: reports.py reads one without it as `processed`) is the success
every recipient must reach: after the timeout, a recipient still `sent` failed ("no
processed notification"), one still `processed` failed too ("no dispatched notification").

The message's status aggregates its recipients: failed if any failed; else the least advanced
recipient's state (dispatched when all are, processed when all are at least processed...).
"""

from __future__ import annotations

from collections.abc import Iterable

RANK = {"queued": 0, "sent": 1, "processed": 2, "dispatched": 3}
FINAL = ("dispatched", "failed")
DETAILS = {
    "queued": "waiting to be handed to the relay",
    "sent": "sent; waiting for the recipient's HISP to confirm",
    "processed": "processed by the recipient's HISP; waiting for delivery",
    "dispatched": "delivered to every recipient",
}


def new_recipients(addresses: Iterable[str], at: int) -> list[dict]:
    return [{"address": a, "state": "queued", "updated_at": at, "detail": ""} for a in addresses]


def _moves(current: str, state: str) -> bool:
    if current == "failed":
        return False
    return state == "failed" or RANK[state] > RANK[current]


def apply(recipients: list[dict], changes: Iterable[tuple[str, str, str]], at: int) -> tuple[list[dict], list[dict]]:
    """(recipients after `changes` [(address, state, detail)], the trail entries of what moved)."""
    updated = [dict(r) for r in recipients]
    trail = []
    for address, state, detail in changes:
        for recipient in updated:
            if recipient["address"] == address and _moves(recipient["state"], state):
                recipient.update(state=state, updated_at=at, detail=detail)
                trail.append({"at": at, "recipient": address, "state": state, "detail": detail})
    return updated, trail


def aggregate(recipients: list[dict]) -> tuple[str, str]:
    """(status, status detail) of the message."""
    failed = [r for r in recipients if r["state"] == "failed"]
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        return "failed", f"{failed[0]['address']}: {failed[0]['detail']}{more}"
    status = min((r["state"] for r in recipients), key=RANK.__getitem__, default="queued")
    return status, DETAILS[status]


def unfinished(recipients: list[dict]) -> bool:
    return any(r["state"] not in FINAL for r in recipients)


def duration(seconds: float) -> str:
    """3600 -> "1 h", 90 -> "90 s", 5400 -> "90 min"."""
    whole = int(seconds)
    if whole and whole % 3600 == 0:
        return f"{whole // 3600} h"
    if whole >= 600 and whole % 60 == 0:
        return f"{whole // 60} min"
    return f"{whole} s"


def overdue(recipients: list[dict], timeout_s: float) -> list[tuple[str, str, str]]:
    """The changes the timeout makes: every recipient not yet dispatched (nor failed) fails."""
    label = duration(timeout_s)
    changes = []
    for recipient in recipients:
        if recipient["state"] in ("queued", "sent"):
            changes.append((recipient["address"], "failed", f"no processed notification within {label}"))
        elif recipient["state"] == "processed":
            changes.append((recipient["address"], "failed", f"no dispatched notification within {label}"))
    return changes
