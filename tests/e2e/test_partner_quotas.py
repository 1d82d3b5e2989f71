"""Per-partner quotas through the whole stack: a partner's requests are counted against its own quota
(the stack's DECK_*_RATE_LIMIT_MINUTE), not the per-address limit staff share (DECK_RATE_LIMIT_MINUTE)."""

from __future__ import annotations

import requests

from services.launcher import Stack

JANE_THREADS = "/api/v1/partner/portal/agencies/agy_riverbend/patients/portal_riverbend_0001/threads"


def test_the_portal_has_its_own_quota_apart_from_the_staff_limit(stack: Stack, admin):
    env = stack.gateway_env()
    partner = requests.get(
        f"{stack.gateway_url}{JANE_THREADS}", headers={"apikey": stack.patient_portal_api_key}, timeout=30
    )
    assert partner.status_code == 200, partner.text
    assert partner.headers["RateLimit-Limit"] == env["DECK_PATIENT_PORTAL_RATE_LIMIT_MINUTE"]
    assert partner.headers["X-RateLimit-Limit-Minute"] == env["DECK_PATIENT_PORTAL_RATE_LIMIT_MINUTE"]

    staff = admin.get("/api/v1/directory/me")
    assert staff.status_code == 200, staff.text
    assert staff.headers["RateLimit-Limit"] == env["DECK_RATE_LIMIT_MINUTE"]
    assert env["DECK_PATIENT_PORTAL_RATE_LIMIT_MINUTE"] != env["DECK_RATE_LIMIT_MINUTE"]  # else this proves nothing
