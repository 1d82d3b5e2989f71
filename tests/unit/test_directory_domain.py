"""The directory's pure rules: names, roles, passwords, recipients, the last admin, failed sign-ins."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from services.directory import domain
from services.directory.domain import LoginAttempts, StaffMember, Team
from services.kit.errors import InvalidInput
from services.kit.validation import ID_PATTERN


def member(staff_id: str, *, active: bool = True, roles=("staff",)) -> StaffMember:
    return StaffMember(staff_id, "agy_a", staff_id, staff_id.title(), roles=roles, active=active)


STAFF = {
    m.id: m
    for m in (
        member("stf_ann"),
        member("stf_bob"),
        member("stf_cat"),
        member("stf_dan", active=False),
        member("stf_eve"),
    )
}
TEAMS = {
    "team_intake": Team("team_intake", "agy_a", "Intake", ("stf_bob", "stf_dan", "stf_cat")),
    "team_medical": Team("team_medical", "agy_a", "Medical", ("stf_eve", "stf_bob")),
}


def test_new_ids_have_their_prefix_and_fit_the_id_pattern():
    ids = {domain.new_id("stf") for _ in range(200)}
    assert len(ids) == 200
    assert all(i.startswith("stf_") and ID_PATTERN.fullmatch(i) for i in ids)


def test_usernames_are_compared_lowercased_and_trimmed():
    assert domain.username_key("  Dr.Reyes ") == "dr.reyes"
    assert domain.check_new_username("Nurse.Kim") == "nurse.kim"


@pytest.mark.parametrize("username", ["ab", ".admin", "admin.", "has space", "tab\tname", "x" * 65, "ünicode"])
def test_unacceptable_usernames_are_refused(username):
    with pytest.raises(InvalidInput) as caught:
        domain.check_new_username(username)
    assert caught.value.code == "invalid_username"


def test_every_staff_member_holds_the_staff_role_in_canonical_order():
    assert domain.normalize_roles([]) == ("staff",)
    assert domain.normalize_roles(["prescriber", "admin"]) == ("staff", "admin", "prescriber")
    assert domain.normalize_roles(["staff", "staff"]) == ("staff",)


def test_unknown_roles_are_refused():
    with pytest.raises(InvalidInput) as caught:
        domain.normalize_roles(["staff", "root"])
    assert caught.value.code == "unknown_role"


@pytest.mark.parametrize("password", ["short-pass", "x" * 257, "Nurse.Kim", "  nurse.kim  "])
def test_weak_passwords_are_refused(password):
    with pytest.raises(InvalidInput) as caught:
        domain.check_password(password, "nurse.kim")
    assert caught.value.code == "weak_password"


def test_a_twelve_character_password_is_enough():
    assert domain.check_password("twelve-chars", "nurse.kim") == "twelve-chars"


def test_emails_are_optional_but_must_look_like_addresses():
    assert domain.check_email("") == ""
    assert domain.check_email(" kim@riverbend.example ") == "kim@riverbend.example"
    with pytest.raises(InvalidInput):
        domain.check_email("kim@localhost")


def test_time_zones_are_iana_names():
    assert domain.check_time_zone("America/Chicago") == "America/Chicago"
    with pytest.raises(InvalidInput) as caught:
        domain.check_time_zone("Central Time")
    assert caught.value.code == "invalid_time_zone"


def test_team_names_clash_regardless_of_case_and_spacing():
    assert domain.team_name_key("  Outpatient   Therapy ") == domain.team_name_key("outpatient therapy")


def test_recipients_combine_people_and_teams_distinct_and_sorted():
    resolution = domain.resolve_recipients(STAFF, TEAMS, ["stf_eve", "stf_ann", "stf_eve"], ["team_intake"], False)
    assert resolution.staff_ids == ["stf_ann", "stf_bob", "stf_cat", "stf_eve"]
    assert resolution.missing_staff_ids == [] and resolution.missing_team_ids == []


def test_deactivated_staff_are_never_recipients_nor_missing():
    resolution = domain.resolve_recipients(STAFF, TEAMS, ["stf_dan"], ["team_intake"], False)
    assert "stf_dan" not in resolution.staff_ids
    assert resolution.missing_staff_ids == []


def test_whole_agency_reaches_every_active_member():
    resolution = domain.resolve_recipients(STAFF, TEAMS, ["stf_ann"], ["team_medical"], True)
    assert resolution.staff_ids == ["stf_ann", "stf_bob", "stf_cat", "stf_eve"]


def test_unknown_people_and_teams_are_reported_in_request_order():
    resolution = domain.resolve_recipients(
        STAFF, TEAMS, ["stf_zed", "stf_ann", "stf_other_agency", "stf_zed"], ["team_gone", "team_medical"], False
    )
    assert resolution.missing_staff_ids == ["stf_zed", "stf_other_agency"]
    assert resolution.missing_team_ids == ["team_gone"]
    assert resolution.staff_ids == ["stf_ann", "stf_bob", "stf_eve"]


def test_a_team_member_unknown_to_the_agency_is_skipped():
    teams = {"team_x": Team("team_x", "agy_a", "X", ("stf_ann", "stf_left_agency"))}
    assert domain.resolve_recipients(STAFF, teams, [], ["team_x"], False).staff_ids == ["stf_ann"]


def test_no_more_than_a_thousand_ids_per_call():
    assert domain.distinct_ids(["a"] * 5000) == ["a"]
    with pytest.raises(InvalidInput) as caught:
        domain.distinct_ids([str(i) for i in range(1001)])
    assert caught.value.code == "too_many_ids"


def test_team_ids_by_member():
    assert domain.team_ids_by_member(TEAMS.values()) == {
        "stf_bob": ["team_intake", "team_medical"],
        "stf_dan": ["team_intake"],
        "stf_cat": ["team_intake"],
        "stf_eve": ["team_medical"],
    }


def test_only_active_admins_count_as_the_agencys_admins():
    assert member("stf_boss", roles=("staff", "admin")).counts_as_admin
    assert not member("stf_boss", roles=("staff", "admin"), active=False).counts_as_admin
    assert not member("stf_ann").counts_as_admin


def test_which_changes_end_a_members_sessions():
    admin = member("stf_boss", roles=("staff", "admin", "prescriber"))
    assert domain.session_end_reason(admin, replace(admin, display_name="Boss"), False) is None
    assert domain.session_end_reason(admin, admin, True) == "password_reset"
    assert domain.session_end_reason(admin, replace(admin, active=False), False) == "staff_deactivated"
    assert domain.session_end_reason(admin, replace(admin, active=False), True) == "password_reset"
    assert domain.session_end_reason(admin, replace(admin, roles=("staff", "prescriber")), False) == "roles_changed"
    assert domain.session_end_reason(admin, replace(admin, roles=("staff", "admin")), False) == "roles_changed"
    # A role added takes effect at the next refresh; nothing to end.
    plain = member("stf_ann")
    assert domain.session_end_reason(plain, replace(plain, roles=("staff", "admin")), False) is None
    # Reactivation ends nothing either.
    assert domain.session_end_reason(replace(plain, active=False), plain, False) is None


def test_login_attempt_keys_are_keyed_hashes_of_the_normalized_username():
    key = domain.login_attempt_key(b"k" * 32, "  Dr.Reyes ")
    assert key == domain.login_attempt_key(b"k" * 32, "dr.reyes")
    assert len(key) == 64 and "reyes" not in key
    assert key != hashlib.sha256(b"dr.reyes").hexdigest()  # not guessable without the key
    assert key != domain.login_attempt_key(b"j" * 32, "dr.reyes")


def test_patient_cursors_are_sort_keys():
    key = domain.patient_sort_key(1_700_000_000_000, "pat_x-1")
    assert key == "001700000000000.pat_x-1"
    assert domain.is_patient_cursor(key)
    for bad in (
        "",
        "1700000000000.pat_x",
        "001700000000000",
        "001700000000000.",
        "00170000000000a.pat",
        "001700000000000.pat x",
        '{"$gt":1}',
        "０01700000000000.pat",
        "001700000000000." + "p" * 65,
    ):
        assert not domain.is_patient_cursor(bad), bad


def test_failed_sign_ins_lock_until_the_lockout_ends():
    now = 10_000_000
    assert not domain.is_locked_out(None, now)
    locked = LoginAttempts(locked_until=now + 900_000)
    assert domain.is_locked_out(locked, now)
    assert not domain.is_locked_out(locked, now + 900_000)
    assert domain.retry_after_s(locked, now) == 900
    assert domain.retry_after_s(locked, now + 899_999) == 1


def test_the_limit_locks_on_the_last_allowed_failure():
    assert not domain.lock_reached(9, 10)
    assert domain.lock_reached(10, 10)


def test_a_supervisor_is_an_active_colleague_other_than_the_member():
    assert domain.check_supervisor("stf_ann", STAFF["stf_bob"], "stf_bob") == "stf_bob"
    assert domain.check_supervisor("stf_ann", None, "") == ""


@pytest.mark.parametrize(
    ("wanted", "found"),
    [("stf_ann", STAFF["stf_ann"]), ("stf_dan", STAFF["stf_dan"]), ("stf_nobody", None)],
)
def test_self_inactive_or_unknown_supervisors_are_refused(wanted, found):
    with pytest.raises(InvalidInput) as caught:
        domain.check_supervisor("stf_ann", found, wanted)
    assert caught.value.code == "invalid_supervisor"


# --- NPIs ---------------------------------------------------------------------------------------

# 1234567893 is CMS's worked example; 1245319599 a check-digit-valid number often used in testing;
# the rest are the demo prescribers'.
VALID_NPIS = ["1234567893", "1245319599", "1498263056", "1654321094", "1987654328"]


@pytest.mark.parametrize("npi", VALID_NPIS)
def test_an_npi_is_ten_digits_ending_in_the_luhn_digit_of_80840_and_the_first_nine(npi):
    assert domain.is_valid_npi(npi)
    assert domain.npi_check_digit(npi[:9]) == int(npi[9])
    assert domain.check_npi(f" {npi} ") == npi


def test_every_other_last_digit_and_every_single_digit_typo_fails_the_check():
    npi = "1234567893"
    for position in range(10):
        for digit in "0123456789":
            if digit != npi[position]:
                assert not domain.is_valid_npi(npi[:position] + digit + npi[position + 1 :])


def test_an_empty_npi_means_none():
    assert domain.check_npi("") == "" and domain.check_npi("   ") == ""


@pytest.mark.parametrize(
    "raw",
    ["1234567890", "123456789", "12345678933", "808401234567893", "12345 67893", "123456789X", "１２３４５６７８９３"],
)
def test_anything_else_is_refused_as_invalid_npi(raw):
    with pytest.raises(InvalidInput) as caught:
        domain.check_npi(raw)
    assert caught.value.code == "invalid_npi" and caught.value.details == {"field": "npi"}
    assert "10-digit National Provider Identifier" in caught.value.message


# --- ePrescribing -----------------------------------------------------------------------------------

SUBSCRIBING = domain.Agency("agy_a", "A", erx_subscription=True, erx_vendor="dosespot", erx_clinic_id="1001")
PRESCRIBER = StaffMember("stf_rx", "agy_a", "dr.rx", "Dr. Rx", roles=("staff", "prescriber"), eprescribing_enabled=True)


def test_eprescribing_needs_the_flag_an_active_member_and_a_subscribing_agency():
    assert domain.has_eprescribing(PRESCRIBER, SUBSCRIBING)
    assert not domain.has_eprescribing(replace(PRESCRIBER, eprescribing_enabled=False), SUBSCRIBING)
    assert not domain.has_eprescribing(replace(PRESCRIBER, active=False), SUBSCRIBING)
    assert not domain.has_eprescribing(PRESCRIBER, replace(SUBSCRIBING, erx_subscription=False))
    assert not domain.has_eprescribing(PRESCRIBER, None)  # agency unknown
    assert not domain.has_eprescribing(PRESCRIBER, replace(SUBSCRIBING, id="agy_b"))  # another agency's subscription
    # The clinician id is the vendor's business (erx-bridge), not a condition here.
    assert domain.has_eprescribing(replace(PRESCRIBER, erx_clinician_id=""), SUBSCRIBING)


def test_an_agency_has_no_eprescribing_unless_configured():
    agency = domain.Agency("agy_new", "New")
    assert (agency.erx_subscription, agency.erx_vendor, agency.erx_clinic_id) == (False, "", "")
    assert StaffMember("stf_new", "agy_new", "new", "New").erx_clinician_id == ""


@pytest.mark.parametrize("value", ["2001", "ds_2001-b", "A" * 64, " 2001 "])
def test_vendor_ids_are_letters_digits_underscores_and_dashes(value):
    assert domain.check_erx_clinician_id(value) == value.strip()
    assert domain.check_erx_clinic_id(value) == value.strip()


@pytest.mark.parametrize("value", ["A" * 65, "20 01", "20.01", "../1", "ñ", "1\x00"])
def test_malformed_vendor_ids_are_refused(value):
    with pytest.raises(InvalidInput) as clinician:
        domain.check_erx_clinician_id(value)
    assert clinician.value.code == "invalid_erx_clinician_id"
    assert clinician.value.details == {"field": "erx_clinician_id"}
    with pytest.raises(InvalidInput) as clinic:
        domain.check_erx_clinic_id(value)
    assert clinic.value.code == "invalid_erx_clinic_id"
    assert clinic.value.details == {"field": "options.erx_clinic_id"}


def test_empty_vendor_ids_and_vendor_mean_none():
    assert domain.check_erx_clinician_id("") == "" and domain.check_erx_clinician_id("  ") == ""
    assert domain.check_erx_clinic_id("") == ""
    assert domain.check_erx_vendor("") == ""


def test_only_dosespot_is_a_known_vendor():
    assert domain.check_erx_vendor("dosespot") == "dosespot"
    assert domain.check_erx_vendor(" dosespot ") == "dosespot"
    for vendor in ("DoseSpot", "surescripts", "dose spot"):
        with pytest.raises(InvalidInput) as refused:
            domain.check_erx_vendor(vendor)
        assert refused.value.code == "invalid_erx_vendor" and refused.value.details["allowed"] == ["dosespot"]
