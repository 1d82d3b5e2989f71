"""Search across the board end to end, through the gateway: a message found by a word of its body
and a lab result (HL7 v2 over MLLP) by its patient reference and by the patient's name (PID-5),
rows as the board lists them, nothing of another staff member's or agency's, and bad or hostile
parameters refused with stable codes."""

from __future__ import annotations

import uuid

import hl7
import pytest
import requests
from hl7.client import MLLPClient

from tests.e2e.lab_messages import oru
from tests.helpers import msa
from tests.waits import wait_until

REYES = "stf_riverbend_reyes"


def word() -> str:
    """A word no other test writes (letters only, so it is one searchable word)."""
    return "zq" + "".join(chr(ord("a") + int(c, 16) % 26) for c in uuid.uuid4().hex[:10])


def search(client, **params) -> dict:
    reply = client.get("/api/v1/board/search", params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()


def found(client, **params) -> list[dict] | None:
    """The results, or None while there are none (the indexer runs just after the send)."""
    return search(client, **params)["items"] or None


def test_a_message_is_found_by_a_word_of_its_body_as_its_row_is_listed(kim, reyes, chen):
    secret = word()
    sent = kim.send(to_staff_ids=[REYES], subject="Pharmacy callback", body=f"The {secret} dose needs a recheck.")
    assert sent.status_code == 201, sent.text
    results = wait_until(lambda: found(reyes, q=secret.upper()), timeout=15)
    listed = [i for i in reyes.items(folder="messages", limit=100)["items"] if i.get("message_id") == sent.json()["id"]]
    assert results == listed
    assert wait_until(lambda: found(kim, q=secret), timeout=15)[0]["folder"] == "sent"  # the sender's copy
    # Narrowed by sender, kind, unread; nobody else's board.
    assert found(reyes, q=secret, sender_id=kim.staff_id) == listed
    assert found(reyes, q=secret, sender_id=chen.staff_id) is None
    assert found(reyes, q=secret, kind="notice") is None
    assert found(chen, q=secret) is None
    opened = reyes.get(f"/api/v1/board/items/{results[0]['id']}")
    assert opened.status_code == 200 and secret in opened.json()["body"]
    assert found(reyes, q=secret, unread=True) is None  # opened: read now


def test_another_agencys_staff_and_ids_find_nothing(kim, reyes, outsider):
    secret = word()
    assert kim.send(to_staff_ids=[REYES], subject="Local", body=f"{secret} only here").status_code == 201
    wait_until(lambda: found(reyes, q=secret), timeout=15)
    assert found(outsider, q=secret) is None
    assert found(outsider, q=secret, sender_id=kim.staff_id) is None
    assert found(outsider, sender_id=kim.staff_id) is None
    label = reyes.post("/api/v1/labels", json={"name": f"Search {secret}"}).json()
    refused = outsider.get("/api/v1/board/search", params={"q": secret, "label_id": label["id"]})
    assert refused.status_code == 404 and refused.json()["code"] == "label_not_found"


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("q=insulin&bogus=1", "invalid_query"),
        ("q=insulin&q=pump", "invalid_query"),
        ("q[$gt]=", "invalid_query"),
        ("q[$ne]=x&sender_id=stf_riverbend_kim", "invalid_query"),
        ('sender_id={"$gt":""}', "invalid_query"),
        ("label_id[$exists]=true&q=insulin", "invalid_query"),
        ("q=" + "x" * 201, "too_long"),
        ("q=insulin&kind=announcements", "invalid_query"),
        ("q=insulin&urgent=perhaps", "invalid_query"),
        ("q=insulin&limit=0", "invalid_query"),
        ("q=insulin&limit=51", "invalid_query"),
        ("q=insulin&from=last+week", "invalid_time"),
        ("q=insulin&to=2026-13-40", "invalid_time"),
        ("q=insulin&cursor=not-a-cursor", "invalid_cursor"),
        ("q=the+of+a", "missing_search_terms"),
        ("unread=true", "missing_search_terms"),
        ("q=" + "+".join(f"w{n}" for n in range(9)), "too_many_terms"),
    ],
)
def test_bad_parameters_are_refused_with_stable_codes(reyes, query, code):
    reply = reyes.get(f"/api/v1/board/search?{query}")
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == code


def test_a_search_needs_a_staff_token(stack):
    assert requests.get(f"{stack.gateway_url}/api/v1/board/search?q=insulin", timeout=10).status_code == 401


def test_a_lab_result_is_found_by_its_patient_reference(stack, reyes, admin):
    mrn = "MRN" + uuid.uuid4().hex[:8].upper()
    with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as client:
        raw = client.send_message(oru(patient=mrn))
    assert msa(hl7.parse(raw[1:-2].decode("ascii")))[0] == "AA"
    results = wait_until(lambda: found(reyes, q=mrn.lower()), timeout=20)
    assert [(i["kind"], i["folder"]) for i in results] == [("notice", "lab")]
    assert results[0]["summary"].startswith(f"Patient {mrn}:")
    assert found(reyes, q=f"{mrn} cbc", kind="notice", urgent=True)  # title words ANDed; the CBC is critical
    assert found(admin, q=mrn.lower()) is None  # not flagged for lab results: not on their board


def test_a_lab_result_is_found_by_the_patient_s_name_and_shows_it_only_in_the_pane(stack, reyes):
    family, given = word(), word()
    with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as client:
        raw = client.send_message(oru(patient="MRN" + uuid.uuid4().hex[:8].upper(), patient_name=f"{family}^{given}"))
    assert msa(hl7.parse(raw[1:-2].decode("ascii")))[0] == "AA"
    results = wait_until(lambda: found(reyes, patient=f"{given} {family}"), timeout=20)
    assert [(i["kind"], i["folder"]) for i in results] == [("notice", "lab")]
    row = results[0]
    assert family not in str(row).lower()  # never in a list row
    assert found(reyes, q=family) is None  # a name is a patient term, not a word of a text
    assert found(reyes, patient=family, kind="notice")
    detail = reyes.get(f"/api/v1/board/items/{row['id']}")
    assert detail.status_code == 200, detail.text
    assert detail.json()["patient"] == {"name": f"{family}, {given}"}


def test_an_announcement_is_found_by_its_words_on_the_first_page(admin, reyes, outsider):
    secret = word()
    posted = admin.post("/api/v1/announcements", json={"title": f"Drill {secret}", "body": "Fire drill at noon."})
    assert posted.status_code == 201, posted.text
    answer = search(reyes, q=f"{secret} drill")
    assert [a["id"] for a in answer["announcements"]] == [posted.json()["id"]]
    assert answer["announcements"][0]["posted_by"]["name"]
    assert search(reyes, q=secret, kind="announcement")["items"] == []
    assert search(reyes, q=secret, kind="message")["announcements"] == []
    assert search(outsider, q=secret)["announcements"] == []  # another agency's staff
    assert admin.post(f"/api/v1/announcements/{posted.json()['id']}/expire").status_code == 200
    assert search(reyes, q=secret)["announcements"] == []
