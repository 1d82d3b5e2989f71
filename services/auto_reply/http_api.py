"""auto-reply HTTP edge (behind the gateway's jwt plugin, route `auto-replies`):

- GET  /api/v1/auto-replies/me               my Staff and Patient Auto-Reply
- PUT  /api/v1/auto-replies/me/<staff|patient> turn one on or off, change its text and window
- GET  /api/v1/auto-replies/away             agency admins: who is away now, for coverage

Staff tokens only; everything is scoped to the token's agency and staff member.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from flask import Blueprint, Flask, current_app, g, request

from services.auto_reply import domain
from services.auto_reply.clients import DirectoryClient
from services.auto_reply.store import FOREVER, AutoReplyStore, setting_id
from services.kit.audit import access_record, phi_accessed
from services.kit.auth import Identity
from services.kit.errors import Forbidden, InvalidInput, NotFound
from services.kit.http import create_app, readiness, require_staff
from services.kit.mongo import now_ms
from services.kit.validation import json_body

log = logging.getLogger(__name__)

PRODUCER = "auto-reply"


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def setting_view(setting: domain.Setting, now: int) -> dict:
    return {
        "kind": setting.kind,
        "enabled": setting.enabled,
        "message": setting.message,
        "starts_at": iso(setting.starts_at),
        "ends_at": iso(setting.ends_at),
        "time_zone": setting.time_zone,
        "active": setting.active(now),
        "updated_at": iso(setting.updated_at or None),
    }


def record_reads(store: AutoReplyStore, caller: Identity, settings: list[domain.Setting]) -> None:
    """Every auto-reply text shown is recorded as `phi.accessed.v1`, in one write (outbox)."""
    shown = [s for s in settings if s.message]
    if not shown:
        return
    events = [
        phi_accessed(
            caller,
            service=PRODUCER,
            resource_type="auto_reply",
            resource_id=setting_id(s.agency_id, s.staff_id, s.kind),
        )
        for s in shown
    ]
    store.record_access(access_record(caller, events, action="read"))


api = Blueprint("auto_replies", __name__, url_prefix="/api/v1/auto-replies")
health = Blueprint("health", __name__)


def build_app(
    store: AutoReplyStore,
    directory: DirectoryClient,
    verifier,
    *,
    ready: Callable[[], list[str]] | None = None,
    max_body_bytes: int,
) -> Flask:
    """`ready()` names what keeps the service from being ready (none: ready); None: always ready."""
    app = create_app("auto-reply", verifier, max_body_bytes=max_body_bytes)
    app.extensions["auto-reply"] = {"store": store, "directory": directory, "ready": ready}
    app.register_blueprint(api)
    app.register_blueprint(health)
    return app


def _store() -> AutoReplyStore:
    return current_app.extensions["auto-reply"]["store"]


def _directory() -> DirectoryClient:
    return current_app.extensions["auto-reply"]["directory"]


def mine(caller: Identity) -> dict[str, domain.Setting]:
    saved = _store().settings_of(caller.agency_id, caller.staff_id)
    missing = [kind for kind in domain.KINDS if kind not in saved]
    if missing:
        zone = _directory().agency_time_zone(caller.agency_id)
        for kind in missing:
            saved[kind] = domain.never_set(caller.agency_id, caller.staff_id, kind, zone)
    return saved


@api.get("/me")
@require_staff
def get_mine():
    settings = mine(g.identity)
    record_reads(_store(), g.identity, list(settings.values()))
    now = now_ms()
    return {kind: setting_view(settings[kind], now) for kind in domain.KINDS}


@api.put("/me/<kind>")
@require_staff
def put_mine(kind: str):
    if kind not in domain.KINDS:
        raise NotFound("not_found", "no such auto-reply kind")
    caller = g.identity
    store = _store()
    body = json_body()
    change = domain.parse_change(body, lambda: _directory().agency_time_zone(caller.agency_id))
    current = store.setting(caller.agency_id, caller.staff_id, kind) or domain.never_set(
        caller.agency_id, caller.staff_id, kind, change.time_zone
    )
    now = now_ms()
    updated = domain.apply_change(current, change, now)
    store.save(updated)
    # The answer shows the text, which may be the saved one (a body without a message).
    record_reads(store, caller, [updated])
    log.info(
        "auto-reply saved",
        extra={
            "agency_id": caller.agency_id,
            "staff_id": caller.staff_id,
            "code": f"{kind}:{int(updated.enabled)}",
        },
    )
    return setting_view(updated, now)


@api.get("/away")
@require_staff
def away():
    caller = g.identity
    if not caller.is_admin:
        raise Forbidden("admin_only", "only agency admins see who is away")
    if request.args:
        raise InvalidInput("invalid_query", f"unknown query parameter: {sorted(request.args)[0]}")
    now = now_ms()
    by_staff: dict[str, dict] = {}
    for doc in _store().away(caller.agency_id, now):
        start = max(doc.get("starts_at") or 0, doc.get("activated_at") or 0)
        if start > now:
            continue  # scheduled, not yet away
        entry = by_staff.setdefault(doc["staff_id"], {"staff_id": doc["staff_id"], "kinds": [], "until": -1})
        entry["kinds"].append(doc["kind"])
        until = doc.get("away_until") or FOREVER
        entry["until"] = max(entry["until"], until)
    items = []
    for staff_id in sorted(by_staff):
        entry = by_staff[staff_id]
        entry["kinds"] = [k for k in domain.KINDS if k in entry["kinds"]]
        entry["until"] = None if entry["until"] >= FOREVER else iso(entry["until"])
        items.append(entry)
    return {"items": items}


@health.get("/readyz")
def readyz():
    """Ready while consuming and the database answers (what `ready()` reports)."""
    ready = current_app.extensions["auto-reply"]["ready"]
    problems = ready() if ready is not None else []
    return readiness({problem: (lambda: False) for problem in problems})
