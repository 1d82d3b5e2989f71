"""Automatic logoff enforced by the directory (HIPAA 164.312(a)(2)(iii)) over its real HTTP app and
database: a session idle past its agency's limit cannot be refreshed, only reported activity keeps
it (refreshing does not), and the sweep ends idle sessions the way every revocation ends, announced
to every service and recorded."""

from __future__ import annotations

import jwt
import pytest

from clinic.audit.v1 import security_pb2
from clinic.directory.v1 import directory_pb2
from services.kit.auth import AuthError
from services.kit.events import decode_envelope, unpack
from services.kit.mongo import now_ms
from services.kit.outbox import OUTBOX
from services.kit.security_events import COLLECTION
from tests.helpers import bearer

MINUTE = 60_000
IDLE = 15 * MINUTE  # the demo agencies' idle_signout_minutes


class Clock:
    """The directory's clock, moved on by a test; it starts at the real time so tokens still verify."""

    def __init__(self):
        self.now = now_ms()

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture
def clock(dut) -> Clock:
    clock = Clock()
    dut.directory.sessions.clock = clock
    return clock


def signed_in(dut, username: str = "nurse.kim") -> dict:
    reply = dut.client.post("/api/v1/auth/token", json={"username": username, "password": "demo-Password-2026"})
    assert reply.status_code == 200, reply.get_json()
    grant = reply.get_json()
    grant["sid"] = jwt.decode(grant["access_token"], options={"verify_signature": False})["sid"]
    return grant


def refresh(dut, grant: dict):
    reply = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]})
    if reply.status_code == 200:
        grant["refresh_token"] = reply.get_json()["refresh_token"]
    return reply


def report_activity(dut, grant: dict):
    return dut.client.post("/api/v1/auth/activity", headers=bearer(grant["access_token"]))


def idle_events(dut) -> list[security_pb2.SecurityEvent]:
    found = []
    for doc in dut.store.db[COLLECTION].find({"kind": {"$eq": "session_idle_expired"}}):
        for entry in (doc.get(OUTBOX) or {}).values():
            found.append(unpack(decode_envelope(bytes(entry["env"])), security_pb2.SecurityEvent))
    return found


def assert_ended_for_idleness(dut, grant: dict) -> None:
    session = dut.store.sessions.find_one({"_id": grant["sid"]})
    assert session["revoked_at"] and session["revoked_reason"] == "idle_timeout"
    assert "idle_expires_at" not in session  # out of the sweep's range
    [staged] = session[OUTBOX].values()  # session.revoked.v1, as for any revocation
    revoked = unpack(decode_envelope(bytes(staged["env"])), directory_pb2.SessionRevoked)
    assert (revoked.session_id, revoked.reason) == (grant["sid"], "idle_timeout")
    with pytest.raises(AuthError) as caught:
        dut.directory.verifier.verify(grant["access_token"])
    assert caught.value.code == "session_revoked"
    [event] = [e for e in idle_events(dut) if e.target_id == grant["sid"]]
    assert (event.actor_id, event.agency_id, event.reason) == ("stf_riverbend_kim", "agy_riverbend", "idle_timeout")


def test_refresh_is_refused_once_the_agency_idle_time_has_passed(dut, clock):
    grant = signed_in(dut)
    clock.advance(IDLE - 1)
    assert refresh(dut, grant).status_code == 200
    clock.advance(2)  # refreshing did not count as activity
    reply = refresh(dut, grant)
    assert reply.status_code == 401 and reply.get_json()["code"] == "session_idle_expired"
    assert_ended_for_idleness(dut, grant)


def test_only_reported_activity_moves_the_idle_deadline(dut, clock):
    grant = signed_in(dut)
    clock.advance(10 * MINUTE)
    assert refresh(dut, grant).status_code == 200
    assert dut.client.get("/api/v1/directory/me", headers=bearer(grant["access_token"])).status_code == 200
    clock.advance(4 * MINUTE)
    assert report_activity(dut, grant).status_code == 204  # idle deadline: 14 + 15 minutes after sign-in
    clock.advance(14 * MINUTE)
    assert refresh(dut, grant).status_code == 200
    clock.advance(MINUTE + 1)
    assert refresh(dut, grant).status_code == 401


def test_an_activity_report_after_the_deadline_ends_the_session(dut, clock):
    grant = signed_in(dut)
    clock.advance(IDLE + 1)
    reply = report_activity(dut, grant)
    assert reply.status_code == 401 and reply.get_json()["code"] == "session_idle_expired"
    assert_ended_for_idleness(dut, grant)
    assert refresh(dut, grant).status_code == 401


def test_the_agencys_own_idle_time_applies(dut, clock):
    dut.store.agencies.update_one({"_id": "agy_riverbend"}, {"$set": {"idle_signout_minutes": 2}})
    grant = signed_in(dut)
    clock.advance(2 * MINUTE + 1)
    assert refresh(dut, grant).status_code == 401
    # Lowered after sign-in: refresh judges by the limit as it is now.
    later = signed_in(dut)
    dut.store.agencies.update_one({"_id": "agy_riverbend"}, {"$set": {"idle_signout_minutes": 1}})
    clock.advance(MINUTE + 1)
    assert refresh(dut, later).status_code == 401


def test_the_sweep_ends_idle_sessions_once_and_leaves_active_ones(dut, clock):
    idle, active = signed_in(dut), signed_in(dut)
    clock.advance(10 * MINUTE)
    assert report_activity(dut, active).status_code == 204
    sessions = dut.directory.sessions
    assert sessions.sweep_idle(clock.now + 5 * MINUTE - 1) == 0
    assert sessions.sweep_idle(clock.now + 5 * MINUTE + 1) == 1
    assert sessions.sweep_idle(clock.now + 5 * MINUTE + 2) == 0  # another pass (or replica): nothing twice
    assert_ended_for_idleness(dut, idle)
    # A page waking up later is told why it was signed out.
    assert refresh(dut, idle).get_json()["code"] == "session_idle_expired"
    assert dut.directory.verifier.verify(active["access_token"]).session_id == active["sid"]
    assert refresh(dut, active).status_code == 200


def test_the_sweep_only_tidies_sessions_ended_another_way(dut, clock):
    grant = signed_in(dut)
    assert dut.client.post("/api/v1/auth/logout", json={"refresh_token": grant["refresh_token"]}).status_code == 204
    dut.store.sessions.update_one({"_id": grant["sid"]}, {"$set": {"idle_expires_at": clock.now}})  # a leftover
    assert dut.directory.sessions.sweep_idle(clock.now + IDLE + 1) == 0
    session = dut.store.sessions.find_one({"_id": grant["sid"]})
    assert session["revoked_reason"] == "logout" and "idle_expires_at" not in session
    assert not idle_events(dut)


def test_a_session_past_its_lifetime_is_closed_without_an_idle_event(dut, clock):
    grant = signed_in(dut)
    dut.store.sessions.update_one({"_id": grant["sid"]}, {"$set": {"expires_at": clock.now + MINUTE}})
    assert dut.directory.sessions.sweep_idle(clock.now + IDLE + 1) == 0
    session = dut.store.sessions.find_one({"_id": grant["sid"]})
    assert session["revoked_reason"] == "expired" and OUTBOX in session  # its last token may still live
    assert not idle_events(dut)


def test_a_session_stored_before_idle_deadlines_starts_its_clock_at_refresh(dut, clock):
    grant = signed_in(dut)
    dut.store.sessions.update_one({"_id": grant["sid"]}, {"$unset": {"idle_expires_at": "", "last_activity_at": ""}})
    clock.advance(IDLE + 1)
    assert refresh(dut, grant).status_code == 200
    clock.advance(IDLE + 1)
    assert refresh(dut, grant).status_code == 401


def test_the_sweep_also_drops_spent_sign_in_counters(dut, clock):
    clock.now = now_ms() // (15 * MINUTE) * (15 * MINUTE) + 1_000  # the start of a failure window
    dut.client.post("/api/v1/auth/token", json={"username": "ghost", "password": "wrong-password!"})
    limits = dut.store.db["sign_in_limits"]
    assert limits.count_documents({}) == 2  # this minute's attempts, this window's failures
    dut.directory.sessions.sweep_idle(clock.now + 2 * MINUTE)
    assert limits.count_documents({}) == 1
    dut.directory.sessions.sweep_idle(clock.now + 16 * MINUTE)
    assert limits.count_documents({}) == 0
