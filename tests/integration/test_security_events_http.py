"""Refusals at the services' HTTP edges are security events, against the real database and the
directory's real tokens: every 403 leaves one `access_refused` naming the caller, the route's
template (never the ids of the concrete path), the refusal's code and the client address; a
revoked session's token presented again leaves one with reason `session_revoked` (once a minute
per caller, route and address); other 401s and successful requests leave none."""

from __future__ import annotations

import jwt
import pytest

from clinic.audit.v1 import security_pb2
from services.inbox import announcements
from services.inbox.http_api import build_app as inbox_app
from services.kit.events import decode_envelope, unpack
from services.kit.http import record_refusals
from services.kit.outbox import OUTBOX
from services.kit.security_events import COLLECTION, SecurityLog
from tests.helpers import bearer
from tests.integration.inbox_fixtures import make_inbox

RIVERBEND = "agy_riverbend"
KIM = "stf_riverbend_kim"
GATEWAY = "127.0.0.1"  # a trusted proxy of directory (its default TRUSTED_PROXIES)
NURSE_DESK = "198.51.100.23"


def recorded(db, kind: str | None = None) -> list[security_pb2.SecurityEvent]:
    """The security events staged in `db`'s outbox, in the order recorded (of `kind` when given)."""
    events = []
    for doc in db[COLLECTION].find({}).sort("at", 1):
        for entry in (doc.get(OUTBOX) or {}).values():
            events.append(unpack(decode_envelope(bytes(entry["env"])), security_pb2.SecurityEvent))
    return [event for event in events if kind is None or event.kind == kind]


@pytest.fixture
def inbox(dut, mongo_client, db_name):
    """inbox's app as its process wires it (the service's security log), checking directory's tokens."""
    db = mongo_client[f"{db_name}_inbox"]
    components = make_inbox(db)
    feature = announcements.Announcements(components)
    feature.ensure_indexes()
    feature.attach()
    components.features = [feature]
    app = record_refusals(inbox_app(components, dut.directory.verifier), SecurityLog(db, service="inbox"))
    return app.test_client(), db


def test_a_403_on_a_directory_route_records_one_refusal_naming_the_route_template(dut):
    nurse = dut.as_user("nurse.kim")
    reply = dut.client.patch(
        f"/api/v1/directory/staff/{KIM}",
        json={"roles": ["staff", "admin"]},
        headers={**nurse, "X-Real-IP": NURSE_DESK},
        environ_base={"REMOTE_ADDR": GATEWAY},
    )
    assert reply.status_code == 403 and reply.get_json()["code"] == "forbidden"
    [event] = recorded(dut.store.db, "access_refused")
    assert (event.agency_id, event.actor_id, event.actor_kind, event.outcome) == (RIVERBEND, KIM, "staff", "refused")
    assert (event.target_type, event.target_id, event.reason) == (
        "http_route",
        "/api/v1/directory/staff/<staff_id>",
        "forbidden",
    )
    assert event.source == NURSE_DESK  # as the trusted gateway states it
    assert event.service == "directory"
    assert recorded(dut.store.db, "settings_changed") == []


def test_a_403_on_an_inbox_route_records_one_refusal_in_inboxs_database(dut, inbox):
    client, db = inbox
    nurse = dut.as_user("nurse.kim")
    reply = client.patch("/api/v1/announcements/ann_0123456789", json={"title": "Mine"}, headers=nurse)
    assert reply.status_code == 403 and reply.get_json()["code"] == "compose_not_allowed"
    [event] = recorded(db)
    assert (event.kind, event.service, event.agency_id, event.actor_id, event.actor_kind) == (
        "access_refused",
        "inbox",
        RIVERBEND,
        KIM,
        "staff",
    )
    assert (event.target_type, event.target_id, event.reason) == (
        "http_route",
        "/api/v1/announcements/<announcement_id>",
        "compose_not_allowed",
    )
    assert "ann_0123456789" not in str(event)
    assert event.source == "127.0.0.1"  # inbox trusts no hop: the peer


def test_every_403_is_recorded_once_each(dut):
    nurse = dut.as_user("nurse.kim")
    for _ in range(3):
        assert dut.client.patch("/api/v1/directory/agency", json={"name": "X"}, headers=nurse).status_code == 403
    assert dut.client.get("/api/v1/directory/patients", headers=nurse).status_code == 403
    routes = [event.target_id for event in recorded(dut.store.db, "access_refused")]
    assert routes == ["/api/v1/directory/agency"] * 3 + ["/api/v1/directory/patients"]


def test_a_revoked_sessions_token_used_again_is_recorded_once_a_minute(dut, inbox):
    client, inbox_db = inbox
    grant = dut.sign_in("nurse.kim").get_json()
    token = grant["access_token"]
    assert dut.client.get("/api/v1/directory/me", headers=bearer(token)).status_code == 200
    assert dut.client.post("/api/v1/auth/logout", json={"refresh_token": grant["refresh_token"]}).status_code == 204
    for _ in range(5):  # a page left open after sign-out keeps polling
        reply = dut.client.get("/api/v1/directory/me", headers=bearer(token))
        assert reply.status_code == 401 and reply.get_json()["code"] == "session_revoked"
    [event] = recorded(dut.store.db, "access_refused")
    assert (event.actor_id, event.actor_kind, event.agency_id) == (KIM, "staff", RIVERBEND)
    assert event.reason == "session_revoked"
    assert (event.target_type, event.target_id) == ("http_route", "/api/v1/directory/me")
    assert token not in str(event) and jwt.decode(token, options={"verify_signature": False})["sid"] not in str(event)
    # Another route is another record; so is another service's edge (its own trail).
    assert dut.client.get("/api/v1/directory/staff", headers=bearer(token)).status_code == 401
    assert [e.target_id for e in recorded(dut.store.db, "access_refused")] == [
        "/api/v1/directory/me",
        "/api/v1/directory/staff",
    ]
    assert client.get("/api/v1/announcements", headers=bearer(token)).status_code == 401
    [on_inbox] = recorded(inbox_db)
    assert (on_inbox.actor_id, on_inbox.reason, on_inbox.target_id) == (KIM, "session_revoked", "/api/v1/announcements")


def test_other_401s_and_allowed_requests_record_nothing(dut, inbox):
    client, inbox_db = inbox
    nurse = dut.as_user("nurse.kim")
    assert dut.client.get("/api/v1/directory/me").status_code == 401  # no token
    assert dut.client.get("/api/v1/directory/me", headers=bearer("not.a.token")).status_code == 401
    assert dut.client.get("/api/v1/directory/me", headers=nurse).status_code == 200
    assert client.get("/api/v1/announcements", headers=nurse).status_code == 200
    assert client.get("/api/v1/announcements").status_code == 401
    assert recorded(dut.store.db, "access_refused") == [] and recorded(inbox_db) == []


def test_an_app_given_no_security_log_records_nothing(dut, mongo_client, db_name):
    db = mongo_client[f"{db_name}_plain"]
    components = make_inbox(db)
    feature = announcements.Announcements(components)
    feature.attach()
    components.features = [feature]
    client = inbox_app(components, dut.directory.verifier).test_client()
    reply = client.patch("/api/v1/announcements/ann_1", json={"title": "x"}, headers=dut.as_user("nurse.kim"))
    assert reply.status_code == 403
    assert recorded(db) == []
