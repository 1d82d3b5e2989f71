"""Forged partner identities cannot flood the audit trail, against inbox's real app and database:
anyone who reaches a service's port can send unauthenticated requests by the thousand, each a
`forged_identity_refused`. A process records the first of each minute per (address, reason,
route) and counts the rest in its log; every request is still refused. No record goes into the
agency the attacker's path names."""

from __future__ import annotations

import logging

import pytest

from services.inbox.directory_client import PortalPatient
from services.inbox.http_api import build_app
from services.inbox.portal import Portal
from services.kit import gateway_identity as gi
from services.kit.http import record_refusals
from services.kit.security_events import SecurityLog
from tests.integration.inbox_fixtures import make_inbox
from tests.integration.test_security_events_http import recorded

RIVERBEND = "agy_riverbend"
THREADS = f"/api/v1/partner/portal/agencies/{RIVERBEND}/patients/portal_jane/threads"
MESSAGES = f"/api/v1/partner/portal/agencies/{RIVERBEND}/patients/portal_jane/messages"
ATTACKER = "203.0.113.66"


@pytest.fixture
def inbox(mongo_client, db_name):
    db = mongo_client[db_name]
    components = make_inbox(db)
    portal = Portal(components)
    components.features = [portal]
    portal.ensure_indexes()
    portal.attach()
    components.directory.patients["jane"] = PortalPatient("pat_jane", RIVERBEND, "portal_jane", "Jane Roe")
    app = record_refusals(build_app(components, None), SecurityLog(db, service="inbox"))
    return app.test_client(), db


def forge(client, path: str = THREADS, *, method: str = "GET", source: str = ATTACKER, **headers):
    return client.open(
        path,
        method=method,
        json={"subject": "Refill", "body": "early?"} if method == "POST" else None,
        headers={"X-Consumer-Username": "patient-portal", **headers},
        environ_base={"REMOTE_ADDR": source},
    )


def test_a_burst_of_100_forged_requests_from_one_address_leaves_one_record(inbox, caplog):
    client, db = inbox
    with caplog.at_level(logging.WARNING, logger="services.kit.security_events"):
        for _ in range(100):
            reply = forge(client)
            assert reply.status_code == 401 and reply.get_json()["code"] == "gateway_identity_required"
    [event] = recorded(db)
    assert (event.kind, event.reason, event.source, event.actor_id) == (
        "forged_identity_refused",
        "gateway_identity_required",
        ATTACKER,
        "patient-portal",
    )
    assert event.target_id == "/api/v1/partner/portal/agencies/<agency_id>/patients/<portal_user_id>/threads"
    assert event.agency_id == ""  # the path names agy_riverbend: the attacker's choice, not a fact
    # The 99 not recorded are counted in the log, a few lines for the whole burst.
    counted = [r.count for r in caplog.records if r.getMessage() == "security event not recorded again this window"]
    assert counted == [1, 10]  # after the first, the 1st and the 10th ... (100 would be the 101st request)


def test_another_reason_route_or_address_is_recorded_once_each(inbox):
    client, db = inbox
    for _ in range(20):
        forge(client)
        forge(client, **{gi.HEADER: "v1.not-a-token"})  # another reason
        forge(client, MESSAGES, method="POST")  # another route
        forge(client, source="203.0.113.67")  # another address
        forge(client, THREADS.replace(RIVERBEND, "agy_lakeside"))  # another agency in the path: the same route
    events = recorded(db)
    assert sorted((e.reason, e.target_id.rsplit("/", 1)[-1], e.source) for e in events) == [
        ("gateway_identity_malformed", "threads", ATTACKER),
        ("gateway_identity_required", "messages", ATTACKER),
        ("gateway_identity_required", "threads", ATTACKER),
        ("gateway_identity_required", "threads", "203.0.113.67"),
    ]
    assert {e.agency_id for e in events} == {""}


def test_addresses_of_one_ipv6_64_are_one_source(inbox):
    client, db = inbox
    for host in range(1, 51):
        assert forge(client, source=f"2001:db8:5:6::{host:x}").status_code == 401
    assert forge(client, source="2001:db8:5:7::1").status_code == 401  # the next /64
    assert sorted(e.source for e in recorded(db)) == ["2001:db8:5:6::1", "2001:db8:5:7::1"]


def test_a_new_process_records_again(inbox):
    client, db = inbox
    forge(client)
    forge(client)
    assert len(recorded(db)) == 1
    components = make_inbox(db)  # a restarted process: a new app with an empty window, the same database
    portal = Portal(components)
    components.features = [portal]
    portal.attach()
    restarted = record_refusals(build_app(components, None), SecurityLog(db, service="inbox")).test_client()
    forge(restarted)
    assert len(recorded(db)) == 2
