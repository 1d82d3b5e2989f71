"""Staff and Patient Auto-Reply rules: windows and time zones, off means off, the Never rules (RFC
3834), activations and the once-per-sender-per-day slot."""

from __future__ import annotations

import datetime as dt

import pytest

from services.auto_reply import domain
from services.kit.errors import InvalidInput

CHICAGO = "America/Chicago"


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


NOW = ms("2026-11-26T12:00:00+00:00")


def on(kind: str = "staff", **fields) -> domain.Setting:
    base = {
        "agency_id": "agy_a",
        "staff_id": "stf_away",
        "kind": kind,
        "enabled": True,
        "message": "Out until Monday",
        "time_zone": CHICAGO,
        "activation_id": "act_1",
        "activated_at": NOW - 3_600_000,
        "updated_at": NOW - 3_600_000,
    }
    return domain.Setting(**{**base, **fields})


def delivered(**fields) -> domain.Delivered:
    base = {
        "agency_id": "agy_a",
        "message_id": "msg_1",
        "recipient_id": "stf_away",
        "sender_id": "stf_colleague",
        "sender_kind": "staff",
        "board_kind": "messages",
    }
    return domain.Delivered(**{**base, **fields})


def change(body: dict, zone: str = CHICAGO) -> domain.Change:
    return domain.parse_change({"enabled": True, "message": "Away", **body}, zone)


# --- windows -------------------------------------------------------------------------------------
def test_a_window_starts_at_its_start_and_ends_before_its_end():
    setting = on(starts_at=NOW, ends_at=NOW + 1000)
    assert not setting.active(NOW - 1)
    assert setting.active(NOW) and setting.active(NOW + 999)
    assert not setting.active(NOW + 1000)


def test_without_a_start_it_is_active_from_when_it_was_turned_on_and_without_an_end_until_turned_off():
    setting = on(activated_at=NOW)
    assert not setting.active(NOW - 1)
    assert setting.active(NOW) and setting.active(NOW + 10 * 365 * 86_400_000)


def test_messages_sent_before_it_was_turned_on_are_not_answered_even_inside_the_window():
    setting = on(starts_at=NOW - 86_400_000, activated_at=NOW)
    assert not setting.active(NOW - 1) and setting.active(NOW)
    assert domain.decide(delivered(), setting, NOW - 1).reason == domain.SKIP_NOT_AWAY


def test_off_means_off_whatever_the_window():
    assert not on(enabled=False).active(NOW)
    assert not on(enabled=False, starts_at=NOW - 1000, ends_at=NOW + 1000).active(NOW)
    assert not domain.decide(delivered(), on(enabled=False), NOW).answer


def test_a_naive_local_time_is_read_in_the_settings_time_zone():
    parsed = change({"starts_at": "2026-12-01T08:00:00", "ends_at": "2026-12-01T17:00:00"})
    assert parsed.starts_at == ms("2026-12-01T14:00:00+00:00")  # Chicago is UTC-6 in December
    assert parsed.ends_at == ms("2026-12-01T23:00:00+00:00")
    tokyo = change({"starts_at": "2026-12-01T08:00:00", "time_zone": "Asia/Tokyo"})
    assert tokyo.starts_at == ms("2026-11-30T23:00:00+00:00") and tokyo.time_zone == "Asia/Tokyo"


def test_a_time_with_an_offset_keeps_its_offset():
    parsed = change({"starts_at": "2026-12-01T08:00:00+02:00", "time_zone": "Asia/Tokyo"})
    assert parsed.starts_at == ms("2026-12-01T06:00:00+00:00")


def test_a_naive_time_in_the_repeated_autumn_hour_is_the_earlier_reading():
    # 1 November 2026: Chicago goes from CDT (UTC-5) back to CST (UTC-6) at 02:00; 01:30 happens twice.
    assert change({"starts_at": "2026-11-01T01:30:00"}).starts_at == ms("2026-11-01T06:30:00+00:00")


def test_a_naive_time_in_the_skipped_spring_hour_is_moved_forward():
    # 8 March 2026: Chicago goes from CST to CDT at 02:00; 02:30 does not exist and is read as 03:30 CDT.
    assert change({"starts_at": "2026-03-08T02:30:00"}).starts_at == ms("2026-03-08T08:30:00+00:00")
    assert change({"starts_at": "2026-03-08T03:30:00"}).starts_at == ms("2026-03-08T08:30:00+00:00")


def test_a_window_across_a_dst_change_keeps_its_wall_clock_ends():
    parsed = change({"starts_at": "2026-10-31T17:00:00", "ends_at": "2026-11-02T08:00:00"})
    assert parsed.starts_at == ms("2026-10-31T17:00:00-05:00") and parsed.ends_at == ms("2026-11-02T08:00:00-06:00")


def test_the_agency_time_zone_is_the_default():
    assert change({}, zone="America/New_York").time_zone == "America/New_York"


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"enabled": "yes"}, "invalid_type", "enabled"),
        ({"enabled": None}, "missing_field", "enabled"),
        ({"message": ""}, "invalid_value", "message"),
        ({"message": "   "}, "invalid_value", "message"),
        ({"message": "x" * 2001}, "too_long", "message"),
        ({"message": {"$gt": ""}}, "invalid_type", "message"),
        ({"message": "Away\x00"}, "invalid_value", "message"),
        ({"starts_at": "tomorrow"}, "invalid_time", "starts_at"),
        ({"starts_at": 12}, "invalid_type", "starts_at"),
        ({"starts_at": {"$gt": ""}}, "invalid_type", "starts_at"),
        ({"ends_at": "1999-01-01T00:00:00Z"}, "invalid_time", "ends_at"),
        ({"ends_at": "2100-01-01T00:00:00"}, "invalid_time", "ends_at"),
        ({"ends_at": "2026-12-01T08:00:00+25:00"}, "invalid_time", "ends_at"),
        ({"time_zone": "Mars/Olympus"}, "unknown_time_zone", "time_zone"),
        ({"time_zone": "../../etc/passwd"}, "unknown_time_zone", "time_zone"),
        ({"time_zone": "America"}, "unknown_time_zone", "time_zone"),
        ({"time_zone": 5}, "invalid_type", "time_zone"),
        ({"time_zone": "x" * 65}, "too_long", "time_zone"),
        ({"starts_at": "2026-12-02T08:00:00", "ends_at": "2026-12-01T08:00:00"}, "invalid_window", "ends_at"),
        ({"starts_at": "2026-12-01T08:00:00", "ends_at": "2026-12-01T08:00:00"}, "invalid_window", "ends_at"),
        # A naive end and an end with an offset naming the same instant (Chicago is UTC-6 in December).
        ({"starts_at": "2026-12-01T08:00:00", "ends_at": "2026-12-01T14:00:00Z"}, "invalid_window", "ends_at"),
        ({"colour": "red"}, "unknown_field", "colour"),
    ],
)
def test_bad_changes_are_refused_with_the_kits_codes_naming_the_field(body, code, field):
    with pytest.raises(InvalidInput) as refused:
        change(body)
    assert refused.value.code == code and refused.value.details["field"] == field


def test_the_agency_time_zone_is_asked_for_only_for_a_well_formed_body_without_a_zone():
    def directory_away() -> str:
        raise AssertionError("directory was asked")

    with pytest.raises(InvalidInput) as refused:
        domain.parse_change({"enabled": "yes", "message": "Away"}, directory_away)
    assert refused.value.code == "invalid_type"
    named = domain.parse_change({"enabled": True, "message": "Away", "time_zone": "Asia/Tokyo"}, directory_away)
    assert named.time_zone == "Asia/Tokyo"
    asked = domain.parse_change(
        {"enabled": True, "message": "Away", "starts_at": "2026-12-01T08:00:00"}, lambda: CHICAGO
    )
    assert asked.time_zone == CHICAGO and asked.starts_at == ms("2026-12-01T14:00:00+00:00")


def test_turning_off_needs_no_message_and_the_text_may_be_2000_characters():
    assert domain.parse_change({"enabled": False}, CHICAGO).message is None
    assert len(change({"message": "x" * 2000}).message) == 2000


def test_without_a_message_the_saved_text_is_kept_and_turning_on_needs_one():
    off = domain.apply_change(on(), domain.parse_change({"enabled": False}, CHICAGO), NOW)
    assert off.message == "Out until Monday" and not off.enabled
    back = domain.apply_change(off, domain.parse_change({"enabled": True}, CHICAGO), NOW + 1)
    assert back.enabled and back.message == "Out until Monday"
    never = domain.never_set("agy_a", "stf_away", "staff", CHICAGO)
    with pytest.raises(InvalidInput) as refused:
        domain.apply_change(never, domain.parse_change({"enabled": True}, CHICAGO), NOW)
    assert (refused.value.code, refused.value.details["field"]) == ("invalid_value", "message")


@pytest.mark.parametrize(
    "window",
    [
        {"ends_at": "2026-11-26T11:00:00Z"},
        {"starts_at": "2026-11-20T08:00:00", "ends_at": "2026-11-25T17:00:00"},  # a whole window in the past
        {"starts_at": "2026-11-20T08:00:00", "ends_at": "2026-11-26T12:00:00Z"},  # ends right now
    ],
)
def test_an_end_already_passed_cannot_be_turned_on_with_or_without_a_start(window):
    with pytest.raises(InvalidInput) as refused:
        domain.apply_change(on(), change(window), NOW)
    assert (refused.value.code, refused.value.details["field"]) == ("invalid_window", "ends_at")


def test_a_window_already_over_may_be_saved_off():
    off = domain.apply_change(
        on(), domain.parse_change({"enabled": False, "ends_at": "2026-11-25T17:00:00"}, CHICAGO), NOW
    )
    assert not off.enabled and off.ends_at == ms("2026-11-25T17:00:00-06:00")


# --- activations ---------------------------------------------------------------------------------
def test_turning_on_and_changing_the_window_start_new_activations_and_a_new_text_does_not():
    never = domain.never_set("agy_a", "stf_away", "staff", CHICAGO)
    first = domain.apply_change(never, change({}), NOW)
    assert first.activation_id and first.activated_at == NOW
    reworded = domain.apply_change(first, change({"message": "Back on Tuesday"}), NOW + 1)
    assert reworded.activation_id == first.activation_id and reworded.message == "Back on Tuesday"
    moved = domain.apply_change(reworded, change({"ends_at": "2026-12-24T17:00:00"}), NOW + 2)
    assert moved.activation_id != first.activation_id
    off = domain.apply_change(moved, domain.parse_change({"enabled": False}, CHICAGO), NOW + 3)
    assert not off.enabled and not off.active(NOW + 3)
    again = domain.apply_change(off, change({"ends_at": "2026-12-24T17:00:00"}), NOW + 4)
    assert again.activation_id not in (moved.activation_id, first.activation_id)


# --- the Never rules -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"auto_reply": True}, domain.SKIP_AUTOMATIC),
        ({"board_kind": "announcements"}, domain.SKIP_NOT_A_CONVERSATION),
        ({"board_kind": "lab"}, domain.SKIP_NOT_A_CONVERSATION),
        ({"board_kind": "schedule"}, domain.SKIP_NOT_A_CONVERSATION),
        ({"board_kind": "compliance"}, domain.SKIP_NOT_A_CONVERSATION),
        ({"board_kind": "erx"}, domain.SKIP_NOT_A_CONVERSATION),
        ({"board_kind": "cloud"}, domain.SKIP_NOT_A_CONVERSATION),
        ({"board_kind": ""}, domain.SKIP_NOT_A_CONVERSATION),
        ({"to_whole_agency": True}, domain.SKIP_WHOLE_AGENCY),
        ({"sender_id": "stf_away"}, domain.SKIP_OWN_MESSAGE),
        ({"sender_id": ""}, domain.SKIP_OWN_MESSAGE),
        ({"sender_kind": "service"}, domain.SKIP_UNKNOWN_SENDER),
        ({"sender_id": "svc:cloud-comms"}, domain.SKIP_MACHINE_SENDER),  # a service sending as itself
        ({"sender_kind": "patient"}, domain.SKIP_UNKNOWN_SENDER),  # a patient's message outside the portal folder
    ],
)
def test_never_answered(fields, reason):
    decision = domain.decide(delivered(**fields), on(), NOW)
    assert (decision.answer, decision.reason) == (False, reason)


def test_a_colleagues_message_is_answered_by_the_staff_auto_reply_only():
    assert domain.decide(delivered(), on("staff"), NOW).answer
    assert domain.decide(delivered(), on("patient"), NOW).reason == domain.SKIP_NOT_AWAY


def test_a_portal_message_is_answered_by_the_patient_auto_reply_only():
    portal = delivered(sender_kind="patient", sender_id="pat_1", board_kind="portal")
    assert domain.decide(portal, on("patient"), NOW).answer
    assert domain.decide(portal, on("staff"), NOW).reason == domain.SKIP_NOT_AWAY


def test_nobody_away_means_no_answer():
    assert domain.decide(delivered(), None, NOW).reason == domain.SKIP_NOT_AWAY
    assert domain.decide(delivered(), on(starts_at=NOW + 1), NOW).reason == domain.SKIP_NOT_AWAY


# --- once per sender per activation and day -------------------------------------------------------
def test_the_same_sender_on_the_same_local_day_shares_one_slot():
    setting = on()
    morning = domain.decide(delivered(message_id="msg_1"), setting, ms("2026-11-26T08:00:00-06:00")).slot
    evening = domain.decide(delivered(message_id="msg_2"), setting, ms("2026-11-26T23:59:00-06:00")).slot
    assert morning == evening


def test_the_next_local_day_another_sender_or_a_new_activation_is_a_new_slot():
    setting = on()
    base = domain.slot_key(setting, "stf_colleague", ms("2026-11-26T23:59:00-06:00"))
    # Two minutes later, but the next day in Chicago (both are 27 November in UTC).
    assert domain.slot_key(setting, "stf_colleague", ms("2026-11-27T00:01:00-06:00")) != base
    assert domain.slot_key(setting, "stf_other", ms("2026-11-26T23:59:00-06:00")) != base
    assert domain.slot_key(on(activation_id="act_2"), "stf_colleague", ms("2026-11-26T23:59:00-06:00")) != base
    assert domain.slot_key(on(kind="patient"), "stf_colleague", ms("2026-11-26T23:59:00-06:00")) != base


def test_the_day_is_the_away_persons_local_day():
    moment = ms("2026-11-27T03:00:00+00:00")  # 21:00 on the 26th in Chicago, 12:00 on the 27th in Tokyo
    assert domain.period_of(on(), moment) == "2026-11-26"
    assert domain.period_of(on(time_zone="Asia/Tokyo"), moment) == "2026-11-27"


def test_the_25_hour_day_of_a_dst_change_is_one_period():
    setting = on()
    first = domain.slot_key(setting, "stf_colleague", ms("2026-11-01T00:30:00-05:00"))
    last = domain.slot_key(setting, "stf_colleague", ms("2026-11-01T23:30:00-06:00"))  # 24 h later
    assert first == last
    assert domain.slot_key(setting, "stf_colleague", ms("2026-11-02T00:00:00-06:00")) != last


def test_the_idempotency_key_is_derived_from_the_slot_alone():
    slot = domain.slot_key(on(), "stf_colleague", NOW)
    assert domain.idempotency_key(slot) == domain.idempotency_key(slot)
    assert domain.idempotency_key(slot) != domain.idempotency_key(slot + "x")
    assert len(domain.idempotency_key(slot)) <= 128
