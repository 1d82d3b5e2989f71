"""Dashboards through the gateway: agency admins (staff token) and an internal dashboard system (API
key, ACL group `dashboards`) read aggregates that move as messages are sent, read and answered;
nobody else reads them, and no consumer reads an agency it is not bound to."""

from __future__ import annotations

import csv
import io
import uuid

import pytest
import requests
from hl7.client import MLLPClient

from tests.e2e.lab_messages import POTASSIUM_CRITICAL, POTASSIUM_TEST, oru
from tests.helpers import msa
from tests.waits import wait_until

RIVERBEND = "agy_riverbend"
LAKESIDE = "agy_lakeside"
PARTNER = "/api/v1/partner/dashboards/agencies"
LAB_PARTNER = "/api/v1/partner/dashboards/lab/agencies"


def dashboard(client, view: str, **params) -> dict:
    reply = client.get(f"/api/v1/dashboards/{view}", params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()


def row_of(body: dict, staff_id: str) -> dict:
    return next(row for row in body["staff"] if row["staff_id"] == staff_id)


def partner_get(stack, path: str, key: str | None, **kwargs) -> requests.Response:
    headers = {"apikey": key} if key is not None else {}
    return requests.get(f"{stack.gateway_url}{PARTNER}{path}", headers=headers, timeout=30, **kwargs)


def send(sender, recipient) -> str:
    reply = sender.send(to_staff_ids=[recipient.staff_id], subject=f"Dashboards {uuid.uuid4().hex[:8]}")
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def test_aggregates_move_with_sends_reads_and_replies(admin, reyes, kim, advance_clock):
    before_staff = row_of(dashboard(admin, "staff"), kim.staff_id)
    before = dashboard(admin, "summary")

    first = send(reyes, kim)
    second = send(reyes, kim)
    sent = row_of(dashboard(admin, "staff"), kim.staff_id)
    assert sent["waiting"] == before_staff["waiting"] + 2
    assert sent["unread"]["messages"] == before_staff["unread"]["messages"] + 2
    assert sent["oldest_unread_at"] is not None
    summary = dashboard(admin, "summary")
    assert summary["folders"]["messages"]["waiting"] == before["folders"]["messages"]["waiting"] + 2
    assert summary["waiting"] == before["waiting"] + 2

    # Unread age follows the deadline clock: two hours later the unread ones are two hours old or more.
    advance_clock(120)
    aged = row_of(dashboard(admin, "staff"), kim.staff_id)
    assert aged["unread_age_p50_s"] >= 2 * 3600 - 1800

    assert kim.get(f"/api/v1/messages/{first}").status_code == 200
    read = row_of(dashboard(admin, "staff"), kim.staff_id)
    assert read["waiting"] == sent["waiting"] - 1
    assert read["first_read_p50_s"] is not None
    after_read = dashboard(admin, "summary")
    assert after_read["time_to_first_read"]["count"] == before["time_to_first_read"]["count"] + 1
    # A second read of the same message is not a first read.
    assert kim.get(f"/api/v1/messages/{first}").status_code == 200
    assert dashboard(admin, "summary")["time_to_first_read"]["count"] == after_read["time_to_first_read"]["count"]

    replied = kim.post(f"/api/v1/messages/{first}/reply", json={"body": "On it."})
    assert replied.status_code == 201, replied.text
    # Only the first reply to a message counts.
    again = kim.post(f"/api/v1/messages/{first}/reply", json={"body": "Done."})
    assert again.status_code == 201, again.text
    after_reply = dashboard(admin, "summary")
    assert after_reply["time_to_reply"]["count"] == before["time_to_reply"]["count"] + 1
    assert after_reply["time_to_reply"]["p50_s"] is not None
    assert row_of(dashboard(admin, "staff"), kim.staff_id)["reply_p50_s"] is not None

    trends = dashboard(admin, "trends", days="30")
    assert len(trends["days_series"]) == 30
    assert trends["days_series"][-1]["first_read_count"] >= 1

    teams = dashboard(admin, "teams")["teams"]
    assert all(team["members"] >= 1 for team in teams)
    assert kim.get(f"/api/v1/messages/{second}").status_code == 200  # leave kim's board as it was

    # Aggregates only: nothing of a message's content is in any view.
    for view in ("summary", "staff", "teams", "trends"):
        assert "Dashboards " not in admin.get(f"/api/v1/dashboards/{view}").text
    assert isinstance(summary["critical_results_unacknowledged"], int)
    assert "critical_results_unacknowledged" not in summary["not_available"]


def test_the_staff_backlog_as_csv(admin, kim):
    for kwargs in ({"params": {"format": "csv"}}, {"headers": {"Accept": "text/csv"}}):
        reply = admin.get("/api/v1/dashboards/staff", **kwargs)
        assert reply.status_code == 200, reply.text
        assert reply.headers["Content-Type"].startswith("text/csv")
        assert "attachment" in reply.headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(reply.text)))
        assert any(row["staff_id"] == kim.staff_id for row in rows)
        assert {"waiting", "unread_messages", "oldest_unread_at", "reply_p90_s"} <= set(rows[0])


def test_only_agency_admins_read_them(kim, reyes, outsider, admin):
    for client in (kim, reyes):
        refused = client.get("/api/v1/dashboards/summary")
        assert refused.status_code == 403
        assert refused.json()["code"] == "admin_required"
    # No token: the gateway's 401.
    assert requests.get(f"{admin.base_url}/api/v1/dashboards/summary", timeout=30).status_code == 401
    # Another agency's admin sees their own agency only.
    theirs = dashboard(outsider, "staff")
    assert theirs["agency_id"] == LAKESIDE
    assert kim.staff_id not in {row["staff_id"] for row in theirs["staff"]}
    ours = {row["staff_id"] for row in dashboard(admin, "staff")["staff"]}
    assert ours.isdisjoint({row["staff_id"] for row in theirs["staff"]})


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/summary?days=14", 400, "invalid_query"),
        ("/summary?days=seven", 400, "invalid_query"),
        ("/staff?format=xml", 400, "invalid_query"),
        ("/summary?format=csv", 400, "invalid_query"),
        ("/summary?agency_id=agy_lakeside", 400, "invalid_query"),
        ("/everything", 404, "not_found"),
    ],
)
def test_bad_query_parameters_are_refused(admin, path, status, code):
    reply = admin.get(f"/api/v1/dashboards{path}")
    assert reply.status_code == status, reply.text
    assert reply.json()["code"] == code


def test_the_dashboard_consumer_reads_its_agency_with_its_key(stack, admin, kim, outsider):
    key = stack.dashboards_api_key
    reply = partner_get(stack, f"/{RIVERBEND}/staff", key)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["agency_id"] == RIVERBEND
    staff = {row["staff_id"] for row in body["staff"]}
    assert kim.staff_id in staff
    assert staff == {row["staff_id"] for row in dashboard(admin, "staff")["staff"]}
    assert staff.isdisjoint({row["staff_id"] for row in dashboard(outsider, "staff")["staff"]})
    csv_reply = partner_get(stack, f"/{RIVERBEND}/staff", key, params={"format": "csv"})
    assert csv_reply.status_code == 200 and csv_reply.headers["Content-Type"].startswith("text/csv")

    # Without a key, or with a wrong one: the gateway's 401.
    assert partner_get(stack, f"/{RIVERBEND}/summary", None).status_code == 401
    assert partner_get(stack, f"/{RIVERBEND}/summary", "not-a-key").status_code == 401
    # Another partner's key: not in the dashboards group.
    assert partner_get(stack, f"/{RIVERBEND}/summary", stack.patient_portal_api_key).status_code == 403
    # An agency it is not bound to, or none at all: not found, nothing of it shown.
    for agency in (LAKESIDE, "agy_nowhere"):
        refused = partner_get(stack, f"/{agency}/summary", key)
        assert refused.status_code == 404, refused.text
        assert refused.json()["code"] == "agency_not_found"
    assert partner_get(stack, f"/{RIVERBEND}/summary", key, params={"days": "3"}).status_code == 400


def test_the_service_refuses_a_consumer_the_gateway_did_not_vouch_for(stack):
    forged = requests.get(
        f"http://127.0.0.1:{stack.config.ports.inbox_http}{PARTNER}/{RIVERBEND}/summary",
        headers={"X-Consumer-Username": "internal-dashboard"},
        timeout=30,
    )
    assert forged.status_code == 401
    assert forged.json()["code"] == "gateway_identity_required"


def lab_feed(client) -> dict:
    reply = client.get("/api/v1/dashboards/lab")
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_the_lab_feed_counts_messages_and_ack_codes(stack, admin, kim, outsider):
    before = lab_feed(admin)
    theirs = lab_feed(outsider)
    with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as client:
        accepted = msa(client.send_message(oru(patient="MRN-" + uuid.uuid4().hex[:8])))
        # No patient identifier: refused AE (still a lab result message on the feed).
        refused = msa(client.send_message(oru().replace("PID|1||MRN48213^^^RIVERBEND^MR", "PID|1||")))
    assert accepted[0] == "AA"
    refused_code = refused[0]
    assert refused_code == "AE"

    after = lab_feed(admin)
    assert after["agency_id"] == RIVERBEND
    assert after["mllp_messages"] == before["mllp_messages"] + 2
    assert after["lab_results"] == before["lab_results"] + 2
    assert after["ack_codes"]["AA"] == before["ack_codes"].get("AA", 0) + 1
    assert after["ack_codes"][refused_code] == before["ack_codes"].get(refused_code, 0) + 1
    assert len(after["days_series"]) == 7
    # Another agency's feed did not move.
    assert lab_feed(outsider)["mllp_messages"] == theirs["mllp_messages"]

    assert kim.get("/api/v1/dashboards/lab").status_code == 403
    assert admin.get("/api/v1/dashboards/lab", params={"days": "1"}).status_code == 400

    key = stack.dashboards_api_key
    url = f"{stack.gateway_url}{LAB_PARTNER}"
    partner = requests.get(f"{url}/{RIVERBEND}", headers={"apikey": key}, timeout=30)
    assert partner.status_code == 200, partner.text
    assert partner.json()["mllp_messages"] == after["mllp_messages"]
    assert requests.get(f"{url}/{RIVERBEND}", timeout=30).status_code == 401
    assert requests.get(f"{url}/{LAKESIDE}", headers={"apikey": key}, timeout=30).status_code == 404
    lab_key = {"apikey": stack.lab_interface_api_key}
    assert requests.get(f"{url}/{RIVERBEND}", headers=lab_key, timeout=30).status_code == 403


def test_critical_results_unacknowledged_follow_the_acknowledgement(stack, admin, kim):
    before = dashboard(admin, "summary")["critical_results_unacknowledged"]
    mrn = "MRN-" + uuid.uuid4().hex[:8]
    with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as client:
        ack = msa(client.send_message(oru(patient=mrn, observations=POTASSIUM_CRITICAL, test=POTASSIUM_TEST)))
    assert ack[0] == "AA"
    wait_until(lambda: dashboard(admin, "summary")["critical_results_unacknowledged"] == before + 1, timeout=20)

    def kims_item():
        items = kim.items(folder="lab", limit=100)["items"]
        return next((i for i in items if i.get("summary", "").startswith(f"Patient {mrn}:")), None)

    item = wait_until(kims_item, timeout=20)
    acknowledged = kim.post(f"/api/v1/board/items/{item['id']}/acknowledge", json={})
    assert acknowledged.status_code == 200, acknowledged.text
    assert dashboard(admin, "summary")["critical_results_unacknowledged"] == before
