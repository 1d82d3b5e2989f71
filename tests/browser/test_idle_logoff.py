"""The page's part in automatic logoff (docs/sessions.md): it reports its user's own input to the
server, at most once every 30 s (the last input of a quiet spell when the spell ends), and nothing
else (timers, scripts); when the server has ended the session for inactivity, the page says so."""

from __future__ import annotations

from playwright.sync_api import expect

ACTIVITY = "**/app/activity"
KIM = "stf_riverbend_kim"


def newest_session(web_stack, mongo_client) -> dict:
    directory = mongo_client[f"{web_stack.config.extra_env['MONGO_DB_PREFIX']}directory"]
    return next(directory.sessions.find({"staff_id": KIM, "revoked_at": 0}).sort("created_at", -1).limit(1))


def test_the_page_reports_its_users_activity_and_nothing_else(people, web_stack, mongo_client):
    person = people()
    page = person.page
    reported: list[str] = []
    page.on("request", lambda request: reported.append(request.method) if "/app/activity" in request.url else None)
    page.clock.install()
    with page.expect_response(ACTIVITY):  # opening the board is the user's doing
        person.sign_in("nurse.kim", fake_clock=True)
    session = newest_session(web_stack, mongo_client)
    signed_in_activity = session["last_activity_at"]

    page.keyboard.press("Shift")  # within 30 s of the last report: held back ...
    page.wait_for_timeout(300)
    assert len(reported) == 1
    with page.expect_response(ACTIVITY) as answered:  # ... and sent when the 30 s are up
        page.clock.fast_forward("00:31")
    assert answered.value.status == 204
    expect(page.locator("#app")).to_be_visible()
    moved = newest_session(web_stack, mongo_client)
    assert moved["_id"] == session["_id"] and moved["last_activity_at"] > signed_in_activity

    # Time passing, a script's events and scrolling are not the user.
    page.clock.fast_forward("05:00")
    page.evaluate("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'a'}))")
    page.evaluate("window.scrollTo(0, 100)")
    page.wait_for_timeout(500)
    assert len(reported) == 2


def test_the_page_says_when_the_server_ended_the_session_for_inactivity(people, web_stack, mongo_client):
    person = people()
    page = person.page
    page.clock.install()
    # Answered, not only sent: an activity report still in flight would extend the idle time again
    # after the change below.
    with page.expect_response(ACTIVITY):
        person.sign_in("nurse.kim", fake_clock=True)
    session = newest_session(web_stack, mongo_client)
    directory = mongo_client[f"{web_stack.config.extra_env['MONGO_DB_PREFIX']}directory"]
    # The agency's idle time has passed at the server (say the computer slept with the page open).
    directory.sessions.update_one({"_id": session["_id"]}, {"$set": {"idle_expires_at": 1}})
    page.clock.fast_forward("00:31")
    with page.expect_response(ACTIVITY) as refused:
        page.keyboard.press("Shift")
    assert refused.value.status == 401
    expect(page.locator("#signin")).to_be_visible()
    note = "You were signed out because of inactivity. Please sign in again."
    expect(page.locator("#signin-note")).to_have_text(note)
    assert directory.sessions.find_one({"_id": session["_id"]})["revoked_reason"] == "idle_timeout"
