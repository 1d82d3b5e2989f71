"""Partner identity on the services' own HTTP edges, against the real database: whoever reaches a
service without the gateway cannot claim a partner's identity (X-Consumer-Username) unsigned, with
a token signed by another key, an expired one, or one made for another request; each attempt is
refused (401), writes nothing and is recorded as a `forged_identity_refused` security event.

Also `GatewaySigningClient`: a Flask test client standing in for the gateway in other tests."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from dataclasses import dataclass

import pytest
from flask import Flask
from flask.testing import FlaskClient

from clinic.audit.v1 import security_pb2
from services.inbox.directory_client import PortalPatient
from services.inbox.http_api import build_app as inbox_app
from services.inbox.portal import Portal
from services.kit import gateway_identity as gi
from services.kit.auth import Identity
from services.kit.events import decode_envelope, unpack
from services.kit.security_events import COLLECTION as SECURITY_OUTBOX
from services.notifications.http_api import create_app as notifications_app
from services.notifications.service import build as build_notifications
from tests.integration.inbox_fixtures import make_inbox
from tests.integration.notifications_fixtures import DirectoryStandIn, DirectoryTable, Member, ServiceIdentities

WRONG_KEY = "not-the-gateway-key-0123456789abcdefghij"
RIVERBEND = "agy_riverbend"


class GatewaySigningClient(FlaskClient):
    """Stands in for the gateway: a request that claims a consumer (X-Consumer-Username) and has no
    X-Gateway-Identity gets one, signed with `gateway_key` over exactly what is sent."""

    gateway_key = ""

    def _request_from_builder_args(self, args, kwargs):
        request = super()._request_from_builder_args(args, kwargs)
        environ = request.environ
        if self.gateway_key and "HTTP_X_CONSUMER_USERNAME" in environ and "HTTP_X_GATEWAY_IDENTITY" not in environ:
            body = environ["wsgi.input"].read()
            environ["wsgi.input"] = io.BytesIO(body)
            headers = gi.signed_headers(lambda name: environ.get("HTTP_" + name.upper().replace("-", "_")))
            environ["HTTP_X_GATEWAY_IDENTITY"] = gi.sign(
                self.gateway_key, environ["REQUEST_METHOD"], gi.request_target(environ), body, headers
            )
        return request


def signing_client(app: Flask, key: str) -> GatewaySigningClient:
    """`app`'s test client, signing partner requests with `key` as the gateway does."""
    app.test_client_class = GatewaySigningClient
    client = app.test_client()
    client.gateway_key = key
    return client


# --- the services under attack -----------------------------------------------------------------


@dataclass
class Target:
    """One partner route of one service, and a request to it that its partner may make."""

    service: str
    method: str
    path: str
    consumer: str
    body: bytes = b""


PORTAL_BASE = f"/api/v1/partner/portal/agencies/{RIVERBEND}/patients/portal_jane"
COMPLIANCE_ITEM = json.dumps({
    "kind": "treatment_plan_review", "title": "Plan review for record 42", "assignee_ids": ["stf_patel"],
    "due_at": "2030-03-17T12:00:00Z", "link": "https://compliance.example/items/42",
}).encode()
PORTAL_MESSAGE = json.dumps({"to_team_id": "team_intake", "subject": "Refill", "body": "Can I get it early?"}).encode()
TARGETS = {
    "inbox-portal-write": Target("inbox", "POST", f"{PORTAL_BASE}/messages", "patient-portal", PORTAL_MESSAGE),
    "inbox-portal-read": Target("inbox", "GET", f"{PORTAL_BASE}/threads?limit=5", "patient-portal"),
    "notifications-lab": Target("notifications", "POST", f"/api/v1/partner/lab/{RIVERBEND}/DiagnosticReport",
                                "lab-interface", b'{"resourceType": "DiagnosticReport"}'),
    "notifications-compliance": Target("notifications", "PUT",
                                       f"/api/v1/partner/compliance/{RIVERBEND}/items/ext-42", "compliance-tracker",
                                       COMPLIANCE_ITEM),
    "notifications-compliance-resolve": Target(
        "notifications", "POST", f"/api/v1/partner/compliance/{RIVERBEND}/items/ext-42/resolve",
        "compliance-tracker"),
    "notifications-schedule": Target("notifications", "PUT",
                                     f"/api/v1/partner/schedule/{RIVERBEND}/Appointment/appt-1",
                                     "practice-management", b'{"resourceType": "Appointment"}'),
    "directory-whoami": Target("directory", "GET", "/api/v1/partner/whoami", "patient-portal"),
}


@dataclass
class Service:
    client: FlaskClient
    db: object
    key: str


class PortalTokens:
    def identity(self, agency_id: str = "") -> Identity:
        return Identity(subject="svc:inbox", agency_id=agency_id, roles=frozenset({"service"}), kind="service")


@pytest.fixture
def services(mongo_client, db_name, dut):
    """inbox (portal feature), notifications (every feature) and directory, each on its own database."""
    inbox_db = mongo_client[f"{db_name}_inbox"]
    inbox = make_inbox(inbox_db)
    inbox.service_tokens = PortalTokens()
    portal = Portal(inbox)
    inbox.features = [portal]
    portal.ensure_indexes()
    portal.attach()
    inbox.directory.teams["team_intake"] = ["stf_a"]
    inbox.directory.staff["stf_a"] = RIVERBEND
    inbox.directory.patients["jane"] = PortalPatient("pat_jane", RIVERBEND, "portal_jane", "Jane Roe")

    notifications_db = mongo_client[f"{db_name}_notifications"]
    from services.notifications import config as notifications_config

    settings = notifications_config.load(
        {"MONGO_URI": "mongodb://unused:1", "PHI_MASTER_KEYS": f"m:{base64.b64encode(os.urandom(32)).decode()}",
         "AMQP_URL": "amqp://unused/"}
    )
    table = DirectoryTable(staff={"stf_patel": Member(RIVERBEND, "Priya Patel")})
    notifications = build_notifications(settings, notifications_db, directory=DirectoryStandIn(table),
                                        service_tokens=ServiceIdentities()).components
    return {
        "inbox": Service(inbox_app(inbox, None).test_client(), inbox_db, inbox.settings.gateway_identity_keys[0]),
        "notifications": Service(notifications_app(notifications, None).test_client(), notifications_db,
                                 settings.gateway_identity_keys[0]),
        "directory": Service(dut.client, dut.store.db, dut.directory.settings.gateway_identity_keys[0]),
    }


def contents(db) -> dict[str, list]:
    """Every document of every collection but the security events: what an attack must not change."""
    return {name: sorted(map(repr, db[name].find({}))) for name in db.list_collection_names()
            if name != SECURITY_OUTBOX}


def security_events(db) -> list[security_pb2.SecurityEvent]:
    events = []
    for doc in db[SECURITY_OUTBOX].find({}):
        for entry in (doc.get("_outbox") or {}).values():
            events.append(unpack(decode_envelope(entry["env"]), security_pb2.SecurityEvent))
    return events


def send(service: Service, target: Target, headers: dict[str, str], *, method: str | None = None,
         path: str | None = None, body: bytes | None = None):
    return service.client.open(path or target.path, method=method or target.method,
                               data=target.body if body is None else body,
                               headers={"Content-Type": "application/json", **headers})


def signed(service: Service, target: Target, **changes) -> dict[str, str]:
    """The headers the gateway would send for `target`, optionally signed for something else."""
    args = {"key": service.key, "method": target.method, "path": target.path, "body": target.body,
            "username": target.consumer, **changes}
    return gi.partner_headers(args["key"], args["method"], args["path"], args["body"], username=args["username"],
                              ts=args.get("ts"))


def assert_refused(reply, code: str) -> None:
    assert reply.status_code == 401, reply.get_data(as_text=True)
    body = reply.get_json()
    assert body["code"] == code and body["message"]
    assert "threads" not in body and "consumer" not in body


def assert_recorded(service: Service, target: Target, reason: str, claimed: str) -> None:
    (event,) = security_events(service.db)
    assert event.kind == "forged_identity_refused" and event.service == target.service
    assert (event.actor_kind, event.actor_id, event.outcome, event.reason) == ("partner", claimed, "refused", reason)
    assert event.source == "127.0.0.1" and event.target_type == "http_route"
    # the route's template, never the path's ids
    assert event.target_id.startswith("/api/v1/partner/") and RIVERBEND not in event.target_id
    assert "portal_jane" not in event.target_id
    assert event.agency_id == ""  # the path's agency is the caller's choice: the record goes to the system's chain


@pytest.mark.parametrize("name", list(TARGETS))
def test_a_consumer_header_without_the_gateways_token_is_refused_recorded_and_writes_nothing(services, name):
    target = TARGETS[name]
    service = services[target.service]
    before = contents(service.db)
    reply = send(service, target, {"X-Consumer-Username": target.consumer, "X-Credential-Identifier": "forged"})
    assert_refused(reply, "gateway_identity_required")
    assert contents(service.db) == before
    assert_recorded(service, target, "gateway_identity_required", target.consumer)


ATTACKS = {
    # signed by someone who does not hold the gateway's key
    "wrong-key": (lambda s, t: signed(s, t, key=WRONG_KEY), {}, "gateway_identity_bad_signature"),
    # a token older than a minute (a captured one, replayed later)
    "expired": (lambda s, t: signed(s, t, ts=int(time.time()) - gi.MAX_SKEW_S - 5), {},
                "gateway_identity_expired"),
    # a captured token replayed with another body (another patient's message, another result)
    "replayed-other-body": (signed, {"body": b'{"forged": true}'},
                            "gateway_identity_bad_signature"),
    # a token made for another route
    "other-path": (lambda s, t: signed(s, t, path="/api/v1/partner/elsewhere"), {}, "gateway_identity_bad_signature"),
    # a token made for another method
    "other-method": (lambda s, t: signed(s, t, method="DELETE"), {}, "gateway_identity_bad_signature"),
    # a valid token whose consumer header is then swapped for another partner's
    "other-consumer": (lambda s, t: {**signed(s, t), "X-Consumer-Username": "another-partner"}, {},
                       "gateway_identity_bad_signature"),
    "malformed": (lambda s, t: {"X-Consumer-Username": t.consumer, gi.HEADER: "v1.trust-me"}, {},
                  "gateway_identity_malformed"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("name", ["inbox-portal-write", "inbox-portal-read", "notifications-lab",
                                  "notifications-compliance", "directory-whoami"])
def test_a_token_that_does_not_prove_this_request_is_refused_recorded_and_writes_nothing(services, name, attack):
    target = TARGETS[name]
    service = services[target.service]
    make_headers, changes, reason = ATTACKS[attack]
    headers = make_headers(service, target)
    if changes.get("body") is not None and target.method == "GET":
        # a read: the replay changes the query instead
        changes = {"path": target.path + ("&" if "?" in target.path else "?") + "x=1"}
    before = contents(service.db)
    reply = send(service, target, headers, **changes)
    assert_refused(reply, "gateway_identity_invalid")
    assert contents(service.db) == before
    claimed = headers["X-Consumer-Username"]
    assert_recorded(service, target, reason, claimed)


@pytest.mark.parametrize("name", list(TARGETS))
def test_the_same_request_signed_by_the_gateway_gets_past_the_identity_check(services, name):
    target = TARGETS[name]
    service = services[target.service]
    reply = send(service, target, signed(service, target))
    assert reply.status_code != 401, reply.get_data(as_text=True)
    assert security_events(service.db) == []


def test_partners_act_as_themselves_when_the_gateway_vouches_for_them(services):
    inbox = services["inbox"]
    sent = send(inbox, TARGETS["inbox-portal-write"], signed(inbox, TARGETS["inbox-portal-write"]))
    assert sent.status_code == 201, sent.get_json()
    read = TARGETS["inbox-portal-read"]
    threads = send(inbox, read, signed(inbox, read)).get_json()["threads"]
    assert [t["id"] for t in threads] == [sent.get_json()["thread_id"]]
    notifications = services["notifications"]
    item = send(notifications, TARGETS["notifications-compliance"],
                signed(notifications, TARGETS["notifications-compliance"]))
    assert item.status_code == 201, item.get_json()
    whoami = send(services["directory"], TARGETS["directory-whoami"],
                  signed(services["directory"], TARGETS["directory-whoami"]))
    assert whoami.get_json() == {"consumer": "patient-portal", "credential": None}


def test_no_claim_at_all_is_unauthenticated_and_not_an_incident(services):
    for name in ("inbox-portal-read", "notifications-lab", "directory-whoami"):
        target = TARGETS[name]
        service = services[target.service]
        reply = send(service, target, {"X-Anonymous-Consumer": "true"} if name == "notifications-lab" else {})
        assert reply.status_code == 401 and reply.get_json()["code"] == "unauthenticated"
        assert security_events(service.db) == []


def test_an_anonymous_consumer_vouched_for_by_the_gateway_is_still_not_a_partner(services):
    service, target = services["directory"], TARGETS["directory-whoami"]
    headers = gi.partner_headers(service.key, "GET", target.path, username="anonymous", anonymous=True)
    reply = send(service, target, headers)
    assert reply.status_code == 401 and reply.get_json()["code"] == "unauthenticated"


def test_a_rotation_accepts_the_previous_key_until_it_is_removed(mongo_uri, db_name, tmp_path):
    from tests.integration.directory_fixtures import start_directory

    old, new = "o" * 40, "n" * 40
    rotating = start_directory(mongo_uri, db_name, tmp_path, seed=False, GATEWAY_IDENTITY_KEY=new,
                               GATEWAY_IDENTITY_KEY_PREVIOUS=old)
    assert rotating.directory.settings.gateway_identity_keys == (new, old)
    for key in (old, new):
        headers = gi.partner_headers(key, "GET", "/api/v1/partner/whoami", username="patient-portal")
        assert rotating.client.get("/api/v1/partner/whoami", headers=headers).status_code == 200
    unknown = gi.partner_headers(WRONG_KEY, "GET", "/api/v1/partner/whoami", username="patient-portal")
    assert rotating.client.get("/api/v1/partner/whoami", headers=unknown).status_code == 401
    done = start_directory(mongo_uri, f"{db_name}_after", tmp_path, seed=False, GATEWAY_IDENTITY_KEY=new)
    headers = gi.partner_headers(old, "GET", "/api/v1/partner/whoami", username="patient-portal")
    assert done.client.get("/api/v1/partner/whoami", headers=headers).status_code == 401
