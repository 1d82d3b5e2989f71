"""The kit's PHI access records and its staff-only route guard."""

from __future__ import annotations

import pytest
from flask import g

from clinic.audit.v1 import audit_pb2
from services.kit.audit import access_record, phi_accessed
from services.kit.auth import KIND_SERVICE, KIND_STAFF, AuthError, Identity
from services.kit.events import unpack
from services.kit.http import create_app, require_staff
from services.kit.logs import correlation_id_var
from services.kit.outbox import OUTBOX, OUTBOX_AT

LEE = Identity(subject="stf_lee", agency_id="agy_a", kind=KIND_STAFF)
SERVICE = Identity(subject="svc:notifications", agency_id="agy_a", kind=KIND_SERVICE)


def test_a_phi_access_names_who_read_what_where_and_its_chain():
    token = correlation_id_var.set("req-123")
    try:
        event = phi_accessed(LEE, service="auto-reply", resource_type="auto_reply", resource_id="agy_a|stf_lee|staff")
    finally:
        correlation_id_var.reset(token)
    payload = unpack(event, audit_pb2.PhiAccessed)
    assert (event.event_type, event.agency_id, event.producer, event.correlation_id) == (
        "phi.accessed.v1",
        "agy_a",
        "auto-reply",
        "req-123",
    )
    assert (payload.actor_id, payload.actor_kind, payload.agency_id, payload.service) == (
        "stf_lee",
        "staff",
        "agy_a",
        "auto-reply",
    )
    assert (payload.resource_type, payload.resource_id, payload.action, payload.outcome) == (
        "auto_reply",
        "agy_a|stf_lee|staff",
        "read",
        "allowed",
    )
    assert payload.accessed_at.seconds > 0
    denied = unpack(
        phi_accessed(LEE, service="inbox", resource_type="message", resource_id="m", outcome="denied"),
        audit_pb2.PhiAccessed,
    )
    assert denied.outcome == "denied"


def test_an_access_record_stages_all_its_events_for_the_relay_in_one_document():
    events = [phi_accessed(LEE, service="s", resource_type="t", resource_id=r) for r in ("r1", "r2")]
    doc = access_record(LEE, events, action="read")
    assert doc["_id"] == events[0].event_id and (doc["agency_id"], doc["actor_id"], doc["action"]) == (
        "agy_a",
        "stf_lee",
        "read",
    )
    assert set(doc[OUTBOX]) == {e.event_id for e in events} and doc[OUTBOX_AT] > 0
    with pytest.raises(ValueError):
        access_record(LEE, [])


class Verifier:
    def verify(self, token: str) -> Identity:
        known = {"lee": LEE, "svc": SERVICE}
        if token not in known:
            raise AuthError("invalid_token", "the token is not valid")
        return known[token]


@pytest.fixture
def client():
    app = create_app("test", Verifier())

    @app.get("/mine")
    @require_staff
    def mine():
        return {"staff_id": g.identity.staff_id}

    return app.test_client()


def test_staff_routes_serve_staff_tokens_and_refuse_service_tokens_and_no_token(client):
    assert client.get("/mine", headers={"Authorization": "Bearer lee"}).get_json() == {"staff_id": "stf_lee"}
    refused = client.get("/mine", headers={"Authorization": "Bearer svc"})
    assert (refused.status_code, refused.get_json()["code"]) == (403, "staff_only")
    assert client.get("/mine").status_code == 401
    forged = client.get("/mine", headers={"Authorization": "Bearer forged"})
    assert (forged.status_code, forged.get_json()["code"]) == (401, "invalid_token")
