"""Staff and Patient Auto-Reply end to end: staff set them through the gateway, colleagues and
patients write, and the answers (or the silence) are seen on the boards and in the portal.

"No answer" is asserted only once the auto-reply service has provably processed the delivery event
(its processed-event record), or once a later marker message has been answered."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
import uuid
import zoneinfo

import grpc
import pika
import pytest
import requests

from clinic.inbox.v1 import inbox_pb2
from services.auto_reply.clients import InboxClient
from services.auto_reply.replier import AutoReplier
from services.auto_reply.store import AutoReplyStore
from services.kit.bus import Publisher, Topology
from services.kit.bus.signing import development_keyring
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.service_identity import ServiceTokens
from services.kit.settings import REPO_ROOT, parse_master_keys
from services.kit.transport import use_grpc_tls
from services.launcher import free_port, wait_http
from tests.e2e.conftest import error_code
from tests.helpers import auth
from tests.waits import Worker, finish_all, wait_until

AWAY_TEXT = "I am out of the office until Monday; for urgent matters call the front desk."
QUEUE = "auto-reply.message-delivered"
JANE = "portal_riverbend_0001"
INTAKE = "team_riverbend_intake"  # intake.wilson and intake.thompson are members
WAIT = 20.0
WINDOW_S = 10.0  # a window that must still be open after a save and a send on a busy machine


# --- helpers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auto_db(stack, mongo_client):
    return mongo_client[f"{stack.db_prefix}auto-reply"]


def midday_zone() -> str:
    """A fixed-offset zone where it is about noon now: the away person's day (the once-per-day period)
    cannot end in the middle of a test, as the agency's own midnight could."""
    offset = 12 - dt.datetime.now(dt.UTC).hour  # -11 .. +12 hours
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"  # Etc signs are inverted


@pytest.fixture
def away(login):
    """Turn a staff member's auto-reply on (through the gateway); every one is turned off afterwards.
    Its day is the test's midday zone unless the test names a time zone (None: the agency's)."""
    touched: list[tuple] = []
    zone = midday_zone()  # one for the whole test: a change of zone would start a new activation

    def _away(username: str, kind: str = "staff", **body):
        client = login(username)
        body = {"enabled": True, "message": AWAY_TEXT, "starts_at": None, "ends_at": None, "time_zone": zone, **body}
        reply = client.put(f"/api/v1/auto-replies/me/{kind}", json=body)
        assert reply.status_code == 200, reply.text
        touched.append((client, kind))
        return client

    yield _away
    for client, kind in touched:
        assert client.put(f"/api/v1/auto-replies/me/{kind}", json={"enabled": False}).status_code == 200


def send(sender, to, subject: str | None = None, **body) -> str:
    reply = sender.send(to_staff_ids=[to.staff_id], subject=subject or f"Coverage {uuid.uuid4().hex[:8]}", **body)
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def processed(auto_db, message_id: str, recipient_id: str) -> None:
    """Wait until auto-reply has handled the delivery of `message_id` to `recipient_id`."""
    key = f"auto-reply:{message_id}-{recipient_id}-delivered"
    wait_until(lambda: auto_db.processed_events.find_one({"_id": key}), timeout=WAIT)


_since = {"at": ""}


@pytest.fixture(autouse=True)
def this_test_only():
    """answers() counts what arrived during the running test only."""
    _since["at"] = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def answers(replier, reader) -> list[dict]:
    """The answers (Re: ...) `reader` received from `replier` during this test; nobody answers by hand here."""
    items = reader.board(limit=100)["items"]
    return [
        i
        for i in items
        if i["sender"]["id"] == replier.staff_id and i["sent_at"] >= _since["at"] and i["subject"].startswith("Re: ")
    ]


def answered(replier, reader, count: int = 1) -> list[dict]:
    return wait_until(lambda: (found := answers(replier, reader)) and len(found) >= count and found, timeout=WAIT)


def iso_in(seconds: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


def setting(client, kind: str = "staff") -> dict:
    reply = client.get("/api/v1/auto-replies/me")
    assert reply.status_code == 200, reply.text
    return reply.json()[kind]


# --- settings through the gateway -------------------------------------------------------------------
def test_my_auto_replies_start_off_and_are_saved_as_sent(login, away):
    lee = login("billing.lee")
    mine = lee.get("/api/v1/auto-replies/me")
    assert mine.status_code == 200
    assert mine.json()["patient"] == {
        "kind": "patient",
        "enabled": False,
        "message": "",
        "starts_at": None,
        "ends_at": None,
        "time_zone": "America/Chicago",
        "active": False,
        "updated_at": None,
    }
    away("billing.lee", "patient", ends_at="2099-01-01T09:00:00", time_zone="Europe/Berlin")
    saved = setting(lee, "patient")
    assert saved["enabled"] and saved["active"] and saved["message"] == AWAY_TEXT
    assert saved["ends_at"] == "2099-01-01T08:00:00.000Z" and saved["time_zone"] == "Europe/Berlin"
    assert saved["starts_at"] is None and saved["updated_at"]
    assert setting(lee, "staff")["enabled"] is False


def test_reading_my_auto_reply_text_is_audited_and_turning_off_keeps_it(login, away, events):
    lee = away("billing.lee")
    with events.listen("phi.accessed.v1") as heard:
        assert setting(lee)["message"] == AWAY_TEXT
        resource = f"{lee.agency_id}|{lee.staff_id}|staff"
        event = heard.wait_for(lambda e: e.payload.service == "auto-reply" and e.payload.resource_id == resource)
    assert (event.payload.resource_type, event.payload.action, event.payload.outcome) == (
        "auto_reply",
        "read",
        "allowed",
    )
    assert event.payload.actor_id == lee.staff_id and event.payload.agency_id == lee.agency_id
    # Turning it off without a message shows the saved text: that read is recorded too.
    with events.listen("phi.accessed.v1") as heard:
        off = lee.put("/api/v1/auto-replies/me/staff", json={"enabled": False})
        assert off.status_code == 200 and off.json()["message"] == AWAY_TEXT and off.json()["active"] is False
        heard.wait_for(
            lambda e: (
                e.envelope.correlation_id == off.headers["X-Correlation-ID"]
                and e.payload.resource_id == resource
                and e.payload.actor_id == lee.staff_id
            )
        )


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"enabled": True, "message": ""}, 400, "invalid_value"),
        ({"enabled": "on", "message": "x"}, 400, "invalid_type"),
        ({"message": "x"}, 400, "missing_field"),
        ({"enabled": True, "message": "x", "starts_at": "next week"}, 400, "invalid_time"),
        ({"enabled": True, "message": "x", "time_zone": "Nowhere/Land"}, 400, "unknown_time_zone"),
        (
            {"enabled": True, "message": "x", "starts_at": "2030-01-02T00:00:00Z", "ends_at": "2030-01-01T00:00:00Z"},
            400,
            "invalid_window",
        ),
        ({"enabled": True, "message": {"$gt": ""}}, 400, "invalid_type"),
        ({"enabled": True, "message": "x", "time_zone": {"$gt": ""}}, 400, "invalid_type"),
        ({"enabled": True, "message": "x", "extra": 1}, 400, "unknown_field"),
    ],
)
def test_bad_settings_are_refused_and_nothing_changes(login, body, status, code):
    lee = login("billing.lee")
    before = setting(lee)
    reply = lee.put("/api/v1/auto-replies/me/staff", json=body)
    assert (reply.status_code, reply.json()["code"]) == (status, code)
    assert setting(lee) == before


def test_malformed_json_unknown_kinds_and_missing_tokens_are_refused(login, stack):
    lee = login("billing.lee")
    bad = lee.put("/api/v1/auto-replies/me/staff", data="{", headers={"Content-Type": "application/json"})
    assert (bad.status_code, bad.json()["code"]) == (400, "malformed_json")
    listed = lee.put("/api/v1/auto-replies/me/staff", json=[{"enabled": False}])
    assert (listed.status_code, listed.json()["code"]) == (400, "invalid_body")
    assert lee.put("/api/v1/auto-replies/me/robot", json={"enabled": False}).status_code == 404
    assert requests.get(f"{stack.gateway_url}/api/v1/auto-replies/me", timeout=10).status_code == 401


def test_the_service_checks_tokens_itself_and_refuses_service_tokens_and_oversize_bodies(stack, login, service_token):
    direct = f"http://127.0.0.1:{stack.config.ports.auto_reply_http}/api/v1/auto-replies/me"
    assert requests.get(direct, timeout=10).status_code == 401
    forged = requests.get(direct, headers={"Authorization": "Bearer not.a.token"}, timeout=10)
    assert (forged.status_code, forged.json()["code"]) == (401, "invalid_token")
    as_service = requests.get(
        f"{stack.gateway_url}/api/v1/auto-replies/me",
        headers={"Authorization": f"Bearer {service_token('auto-reply')}"},
        timeout=10,
    )
    assert (as_service.status_code, as_service.json()["code"]) == (403, "staff_only")
    lee = login("billing.lee")
    huge = lee.put("/api/v1/auto-replies/me/staff", json={"enabled": True, "message": "x" * 100_000})
    assert (huge.status_code, huge.json()["code"]) == (413, "payload_too_large")


def test_admins_see_who_is_away_and_others_may_not(admin, login, away, outsider):
    hall = away("therapist.hall", ends_at="2099-01-01T00:00:00Z")
    away("therapist.hall", "patient")
    away("compliance.ortiz", starts_at="2099-01-01T00:00:00Z")  # scheduled, not away yet
    reply = admin.get("/api/v1/auto-replies/away")
    assert reply.status_code == 200, reply.text
    items = {item["staff_id"]: item for item in reply.json()["items"]}
    assert items[hall.staff_id] == {"staff_id": hall.staff_id, "kinds": ["staff", "patient"], "until": None}
    assert "stf_riverbend_ortiz" not in items
    refused = hall.get("/api/v1/auto-replies/away")
    assert (refused.status_code, refused.json()["code"]) == (403, "admin_only")
    # Another agency's admin sees only their own agency.
    assert hall.staff_id not in {i["staff_id"] for i in outsider.get("/api/v1/auto-replies/away").json()["items"]}


# --- windows and off ---------------------------------------------------------------------------------
def test_the_window_start_and_end_are_kept(login, away, auto_db):
    martin, oconnor = login("peer.martin"), login("casemgr.oconnor")
    # Before the start (an hour ahead): scheduled, not away yet.
    nguyen = away("therapist.nguyen", starts_at=iso_in(3600))
    early = send(martin, nguyen)
    processed(auto_db, early, nguyen.staff_id)
    assert answers(nguyen, martin) == []

    # Inside the window (it began a minute ago): answered. The end leaves a busy machine ample time to
    # save and send before it.
    away("therapist.nguyen", starts_at=iso_in(-60), ends_at=iso_in(WINDOW_S))
    assert setting(nguyen)["active"] is True
    send(martin, nguyen)
    [answer] = answered(nguyen, martin)
    assert answer["subject"].startswith("Re: Coverage")

    # After the end: still on, but no longer answered.
    wait_until(lambda: not setting(nguyen)["active"], timeout=WINDOW_S + WAIT)
    assert setting(nguyen)["enabled"] is True
    late = send(oconnor, nguyen)
    processed(auto_db, late, nguyen.staff_id)
    assert answers(nguyen, oconnor) == []


def test_a_local_start_time_is_read_in_the_chosen_time_zone(login, away, auto_db):
    white, brooks = login("nurse.white"), login("np.brooks")
    # A wall-clock time one minute ago in Tokyo: already started there, but 15 hours ahead in Chicago.
    tokyo_now = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Tokyo")) - dt.timedelta(minutes=1)
    naive = tokyo_now.replace(tzinfo=None, microsecond=0).isoformat()

    johnson = away("therapist.johnson", starts_at=naive, time_zone=None)  # the agency's zone: America/Chicago
    assert setting(johnson)["active"] is False and setting(johnson)["time_zone"] == "America/Chicago"
    unanswered = send(white, johnson)
    processed(auto_db, unanswered, johnson.staff_id)
    assert answers(johnson, white) == []

    away("therapist.johnson", starts_at=naive, time_zone="Asia/Tokyo")
    assert setting(johnson)["active"] is True
    send(brooks, johnson)
    answered(johnson, brooks)


def test_off_means_off(login, away, auto_db):
    white = login("nurse.white")
    hall = away("therapist.hall")
    assert hall.put("/api/v1/auto-replies/me/staff", json={"enabled": False}).json()["active"] is False
    message_id = send(white, hall)
    processed(auto_db, message_id, hall.staff_id)
    assert answers(hall, white) == []


# --- once per sender ---------------------------------------------------------------------------------
def test_ten_messages_from_one_sender_get_one_answer_and_two_senders_one_each(login, away, auto_db):
    martin, oconnor = login("peer.martin"), login("casemgr.oconnor")
    johnson = away("therapist.johnson")
    sent = [send(martin, johnson) for _ in range(10)]
    other = send(oconnor, johnson)
    for message_id in [*sent, other]:
        processed(auto_db, message_id, johnson.staff_id)
    [answer] = answers(johnson, martin)
    assert answer["thread_id"] in sent
    assert len(answers(johnson, oconnor)) == 1
    opened = martin.get(f"/api/v1/messages/{answer['id']}").json()
    assert opened["auto_reply"] is True and opened["body"] == AWAY_TEXT and opened["in_reply_to"] in sent


def test_a_new_activation_answers_the_same_sender_again(login, away, auto_db):
    brooks = login("np.brooks")
    nguyen = away("therapist.nguyen")
    first = send(brooks, nguyen)
    answered(nguyen, brooks)
    away("therapist.nguyen", message="Back on Tuesday.")  # new text only: the same activation
    again = send(brooks, nguyen)
    processed(auto_db, again, nguyen.staff_id)
    assert len(answers(nguyen, brooks)) == 1 and first != again
    nguyen.put("/api/v1/auto-replies/me/staff", json={"enabled": False})
    away("therapist.nguyen", message="Back on Tuesday.")  # turned on again: a new activation
    send(brooks, nguyen)
    latest = answered(nguyen, brooks, count=2)
    assert nguyen.get(f"/api/v1/threads/{latest[0]['thread_id']}").json()["messages"][-1]["body"] == "Back on Tuesday."


def test_two_people_away_answer_each_other_once_then_silence(login, away, auto_db):
    hall = away("therapist.hall")
    martin = away("peer.martin")
    to_martin = send(hall, martin)
    to_hall = send(martin, hall)
    [from_martin] = answered(martin, hall)
    [from_hall] = answered(hall, martin)
    # The automatic answers reach people who are away too, and are never answered in turn.
    processed(auto_db, from_martin["id"], hall.staff_id)
    processed(auto_db, from_hall["id"], martin.staff_id)
    processed(auto_db, to_martin, martin.staff_id)
    processed(auto_db, to_hall, hall.staff_id)
    assert len(answers(martin, hall)) == 1 and len(answers(hall, martin)) == 1
    thread = hall.get(f"/api/v1/threads/{to_martin}").json()["messages"]
    assert [m["auto_reply"] for m in thread] == [False, True]


def test_a_team_message_is_answered_like_a_direct_one_and_never_by_its_away_sender(login, away, auto_db):
    martin = login("peer.martin")
    wilson = away("intake.wilson")
    thompson = away("intake.thompson")
    wilson_sent_before = wilson.counts("sent")[1]
    to_team = martin.send(to_team_ids=[INTAKE], subject=f"Intake {uuid.uuid4().hex[:8]}")
    assert to_team.status_code == 201, to_team.text
    # Each away member answers the sender once, in the thread.
    assert answered(wilson, martin)[0]["thread_id"] == to_team.json()["id"]
    answered(thompson, martin)
    # The away member writes to their own team: a colleague's auto-reply answers them; theirs never
    # answers their own message, nor the colleague's automatic answer.
    own = wilson.send(to_team_ids=[INTAKE], subject=f"Intake {uuid.uuid4().hex[:8]}")
    assert own.status_code == 201, own.text
    assert wilson.staff_id not in own.json()["recipient_ids"]
    [from_thompson] = answered(thompson, wilson)
    processed(auto_db, own.json()["id"], thompson.staff_id)
    processed(auto_db, from_thompson["id"], wilson.staff_id)
    assert len(answers(thompson, wilson)) == 1 and len(answers(wilson, martin)) == 1
    assert len(answers(thompson, martin)) == 1
    assert wilson.counts("sent")[1] == wilson_sent_before + 2  # the answer to martin and the team message


# --- exactly once: redelivery and two instances -----------------------------------------------------
@pytest.fixture
def second_process(stack):
    """A second `python -m services.auto_reply` on the same queue and database (its own ports)."""
    log_path = stack.run_dir / "logs" / f"auto-reply-second-{uuid.uuid4().hex[:6]}.log"
    http_port = free_port()
    env = {**stack.service_env(), "AUTO_REPLY_HTTP_PORT": str(http_port), "AUTO_REPLY_GRPC_PORT": str(free_port())}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.auto_reply"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_http(f"http://127.0.0.1:{http_port}/readyz", "second auto-reply", log_path, process)
        yield process, log_path
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture
def in_process_replier(stack, auto_db, service_secret):
    """The handler of a third copy, called directly from the test."""
    keys = parse_master_keys((stack.run_dir / "secrets" / "phi-master-keys").read_text().strip(), [])
    store = AutoReplyStore(auto_db, PhiCipher(KeyRing(auto_db, keys, next(iter(keys)))))
    with use_grpc_tls(stack.grpc_tls):  # its channels to the stack, as the stack's services open theirs
        tokens = ServiceTokens(
            f"127.0.0.1:{stack.config.ports.directory_grpc}", "auto-reply", service_secret("auto-reply")
        )
        inbox = InboxClient(f"127.0.0.1:{stack.config.ports.inbox_grpc}")
    yield AutoReplier(store, inbox, tokens)
    tokens.close()
    inbox.close()


def test_the_same_event_delivered_again_and_again_to_two_instances_answers_once(
    stack, login, away, auto_db, events, second_process, in_process_replier
):
    process, log_path = second_process
    oconnor, white = login("casemgr.oconnor"), login("nurse.white")
    ortiz = away("compliance.ortiz")
    publisher = Publisher(stack.config.amqp_url, Topology(), signer=development_keyring(stack.run_dir).signer)
    try:
        with events.listen("message.delivered.v1") as heard:
            message_id = send(oconnor, ortiz)
            event = heard.wait_for(
                lambda e: e.payload.message_id == message_id and e.payload.recipient_staff_id == ortiz.staff_id
            )
        # At once: six more copies of the event for the two service processes, and two direct handlers.
        barrier = threading.Barrier(3)

        def race():
            barrier.wait(WAIT)
            return in_process_replier.handle(event.envelope)

        racers = [Worker(race, name=f"racer-{n}").start() for n in range(2)]
        barrier.wait(WAIT)
        publisher.publish([event.envelope] * 6)
        outcomes = finish_all(racers, WAIT)  # both ended, neither raised
        answered(ortiz, oconnor)
        # The second process handles its share of the copies (round robin between the two consumers).
        # Waited for, not read once after stopping it: an empty queue only says every copy was
        # delivered, not that it was handled.
        wait_until(lambda: event.envelope.event_id in log_path.read_text(), timeout=WAIT)
        wait_until(lambda: _queue_empty(stack.config.amqp_url), timeout=WAIT)
        process.terminate()
        assert process.wait(30) == 0
        # With it stopped, a later marker answered by the first proves every copy was handled.
        marker = send(white, ortiz)
        processed(auto_db, marker, ortiz.staff_id)
        answered(ortiz, white)
    finally:
        publisher.close()
    assert set(outcomes) <= {"answered", "already_answered"} and len(outcomes) == 2
    assert len(answers(ortiz, oconnor)) == 1
    slots = list(
        auto_db.reply_slots.find({"replier_id": {"$eq": ortiz.staff_id}, "sender_id": {"$eq": oconnor.staff_id}})
    )
    assert len(slots) == 1 and slots[0]["sent_at"] > 0


def _queue_empty(amqp_url: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return connection.channel().queue_declare(QUEUE, passive=True).method.message_count == 0
    finally:
        connection.close()


# --- never -------------------------------------------------------------------------------------------
def test_no_answer_to_an_announcement_a_whole_agency_message_a_lab_notification_or_an_auto_reply(
    admin, login, away, auto_db, inbox_stub, service_token
):
    brooks = login("np.brooks")
    oconnor = away("casemgr.oconnor")
    sent_before = oconnor.counts("sent")[1]

    posted = admin.post(
        "/api/v1/announcements", json={"title": f"Notice {uuid.uuid4().hex[:6]}", "body": "Fire drill at noon."}
    )
    assert posted.status_code == 201, posted.text
    everyone = admin.send(to_whole_agency=True, subject="Staff meeting", body="All hands at 5.")
    assert everyone.status_code == 201, everyone.text
    lab = inbox_stub.DeliverItem(
        inbox_pb2.DeliverItemRequest(
            kind=inbox_pb2.DELIVERED_KIND_LAB,
            recipients=inbox_pb2.Recipients(staff_ids=[oconnor.staff_id]),
            title="Lab result available",
            summary="Panel, final",
            source="lab",
            source_ref=f"order-{uuid.uuid4().hex[:10]}",
        ),
        metadata=auth(service_token("notifications")),
        timeout=10,
    )
    assert lab.created
    # An automatic answer from a colleague (as auto-reply would send it) is never answered.
    original = send(oconnor, brooks)
    automatic = inbox_stub.SendMessage(
        inbox_pb2.SendMessageRequest(
            sender_staff_id=brooks.staff_id, in_reply_to_message_id=original, body="Away today.", auto_reply=True
        ),
        metadata=auth(service_token("auto-reply")),
        timeout=10,
    )
    # A service never sends a message as itself (the HTTP twin serves staff only), so there is no
    # machine-sent message to answer.
    with pytest.raises(grpc.RpcError) as machine:
        inbox_stub.SendMessage(
            inbox_pb2.SendMessageRequest(to_staff_ids=[oconnor.staff_id], subject="Fax received", body="2 pages."),
            metadata=auth(service_token("cloud-comms")),
            timeout=10,
        )
    assert (machine.value.code(), error_code(machine.value)) == (grpc.StatusCode.PERMISSION_DENIED, "staff_only")
    processed(auto_db, everyone.json()["id"], oconnor.staff_id)
    processed(auto_db, automatic.message_id, oconnor.staff_id)
    # The marker: an ordinary message is answered, after everything above was delivered.
    marker = send(brooks, oconnor)
    processed(auto_db, marker, oconnor.staff_id)
    assert len(answers(oconnor, brooks)) == 1
    assert len(answers(oconnor, admin)) == 0
    assert oconnor.counts("sent")[1] == sent_before + 2  # the message to brooks and the one answer


# --- the patient portal ------------------------------------------------------------------------------
def test_the_patient_auto_reply_answers_a_portal_message_in_the_patients_thread(stack, login, away, auto_db):
    white = login("nurse.white")
    hall = away("therapist.hall", "patient", message="Our office answers portal messages within one business day.")
    base = f"{stack.gateway_url}/api/v1/partner/portal/agencies/agy_riverbend/patients/{JANE}"
    headers = {"apikey": stack.patient_portal_api_key}
    sent = requests.post(
        f"{base}/messages",
        json={"to_staff_id": hall.staff_id, "subject": f"Visit {uuid.uuid4().hex[:6]}", "body": "Can I move it?"},
        headers=headers,
        timeout=10,
    )
    assert sent.status_code == 201, sent.text
    thread_url = f"{base}/threads/{sent.json()['thread_id']}"

    def thread_messages():
        return requests.get(thread_url, headers=headers, timeout=10).json()["messages"]

    messages = wait_until(lambda: (found := thread_messages()) and len(found) == 2 and found, timeout=WAIT)
    assert messages[1]["body"] == "Our office answers portal messages within one business day."
    assert (messages[1]["sender"]["kind"], messages[1]["sender"]["id"]) == ("staff", hall.staff_id)
    # A second portal message the same day gets no second answer.
    again = requests.post(
        f"{base}/messages", json={"thread_id": sent.json()["thread_id"], "body": "Thanks!"}, headers=headers, timeout=10
    )
    assert again.status_code == 201, again.text
    processed(auto_db, again.json()["id"], hall.staff_id)
    assert len(thread_messages()) == 3
    # The patient auto-reply does not answer colleagues; the staff one is off.
    colleague = send(white, hall)
    processed(auto_db, colleague, hall.staff_id)
    assert answers(hall, white) == []


def test_an_answer_sent_but_not_marked_before_a_crash_is_not_sent_again(stack, login, away, auto_db, events):
    brooks = login("np.brooks")
    hall = away("therapist.hall")
    with events.listen("message.delivered.v1") as heard:
        message_id = send(brooks, hall)
        event = heard.wait_for(
            lambda e: e.payload.message_id == message_id and e.payload.recipient_staff_id == hall.staff_id
        )
        [answer] = answered(hall, brooks)
    # As if the service died after inbox sent the answer, before it marked the slot and acked the event.
    [slot] = list(auto_db.reply_slots.find({"in_reply_to": {"$eq": message_id}}))
    auto_db.reply_slots.update_one({"_id": {"$eq": slot["_id"]}}, {"$set": {"sent_at": 0}})
    auto_db.processed_events.delete_one({"_id": {"$eq": f"auto-reply:{event.envelope.event_id}"}})
    publisher = Publisher(stack.config.amqp_url, Topology(), signer=development_keyring(stack.run_dir).signer)
    try:
        publisher.publish([event.envelope])
    finally:
        publisher.close()
    processed(auto_db, message_id, hall.staff_id)
    marked = auto_db.reply_slots.find_one({"_id": {"$eq": slot["_id"]}})
    assert marked["sent_at"] > 0 and marked["reply_message_id"] == answer["id"]
    assert [a["id"] for a in answers(hall, brooks)] == [answer["id"]]
