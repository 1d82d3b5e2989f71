"""Triage rules: patient match scoring (confidences, conflicts, ambiguity, matched_on), the blind
index, document type classification, and the triage settings block."""

from __future__ import annotations

import pytest

from services.cloud_comms import config
from services.cloud_comms.triage import classify, extract, match
from services.cloud_comms.triage.roster import BlindIndex, valid_birth_date
from services.kit.settings import SettingsError


def patient(pid, mrn, family, given, birth, suffix=""):
    return match.Candidate(
        pid,
        match.normalize_mrn(mrn),
        birth,
        frozenset(match.family_forms(family)),
        frozenset(match.name_tokens(given)),
        suffix,
    )


ROSTER = [
    patient("maria", "RB100234", "Lopez", "Maria", "1984-03-12"),
    patient("james", "RB100871", "Carter", "James", "1975-11-02"),
    patient("ana", "RB101552", "Lopez", "Ana", "1990-07-19"),
    patient("jane", "RB100001", "Demo-Client", "Jane Alice", "1988-05-05"),
]


def probe(mrn="", family="", given="", birth="", *, mrns=(), weak=(), suffix=""):
    return match.Probe(
        mrns=frozenset(match.normalize_mrn(m) for m in ([mrn] if mrn else []) + list(mrns)),
        birth_date=birth,
        family=frozenset(match.family_forms(family)),
        given=(match.name_tokens(given) or [""])[0],
        suffix=suffix,
        weak_mrns=frozenset(match.normalize_mrn(m) for m in weak),
    )


def best(p: match.Probe) -> match.Match:
    return match.rank(p, ROSTER)[0]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (probe("RB100234", "Lopez", "Maria", "1984-03-12"), ("maria", 0.99, ("name", "birth_date", "mrn"))),
        (probe("rb-100 234", "LOPEZ", "MARÍA", "1984-03-12"), ("maria", 0.99, ("name", "birth_date", "mrn"))),
        (probe("RB100234", "Lopez", "", "1984-03-12"), ("maria", 0.96, ("name", "birth_date", "mrn"))),
        (probe("RB100234", "", "", "1984-03-12"), ("maria", 0.93, ("birth_date", "mrn"))),
        (probe("", "Lopez", "Maria", "1984-03-12"), ("maria", 0.9, ("name", "birth_date"))),
        (probe("XH-1", "Lopez", "Maria", "1984-03-12"), ("maria", 0.9, ("name", "birth_date"))),  # sender's own MRN
        (probe("", "Demo Client", "Jane", "1988-05-05"), ("jane", 0.9, ("name", "birth_date"))),
        (probe("", "Client", "Alice", "1988-05-05"), ("jane", 0.9, ("name", "birth_date"))),
        (probe("RB100871"), ("james", 0.75, ("mrn",))),
        (probe("", "Carter", "James"), ("james", 0.45, ("name",))),
    ],
)
def test_confidence_by_what_matches(document, expected):
    found = best(document)
    assert (found.patient_id, found.confidence, found.matched_on) == expected


def test_conflicts_lower_the_confidence():
    assert best(probe("RB100234", "Lopez", "Maria", "1990-01-01")).confidence == pytest.approx(0.465)
    # Maria's MRN on a document naming Ana with Ana's birth date: Ana, but the MRN is Maria's.
    ranked = match.rank(probe("RB100234", "Lopez", "Ana", "1990-07-19"), ROSTER)
    assert ranked[0].patient_id == "ana" and ranked[0].confidence == pytest.approx(0.45)
    assert {m.patient_id for m in ranked} == {"ana", "maria"}
    assert best(probe("", "Lopez", "Mary", "1984-03-12")).confidence == pytest.approx(0.7 * 0.8)


def test_a_name_shared_by_two_patients_is_ambiguous_and_never_confident():
    twins = [*ROSTER, patient("maria2", "RB109999", "Lopez", "Maria", "1984-03-12")]
    ranked = match.rank(probe("", "Lopez", "Maria", "1984-03-12"), twins)
    assert [m.patient_id for m in ranked[:2]] == ["maria", "maria2"]
    assert all(m.confidence <= 0.6 for m in ranked)
    # The MRN tells them apart.
    assert match.rank(probe("RB109999", "Lopez", "Maria", "1984-03-12"), twins)[0].patient_id == "maria2"


def test_nothing_in_common_ranks_nobody():
    assert match.rank(probe("", "Nguyen", "Minh", "2001-01-01"), ROSTER) == []
    assert match.rank(match.Probe(), ROSTER) == []


def test_at_most_three_candidates_best_first():
    ranked = match.rank(probe("", "Lopez", "", ""), [*ROSTER, patient("x", "1", "Lopez", "Xo", "2000-01-01")])
    assert len(ranked) == 3 and ranked == sorted(ranked, key=lambda m: -m.confidence)


def test_blind_index_keys_are_per_agency_and_secret():
    one, other = BlindIndex("secret-one-0123456789abcdef0123456789"), BlindIndex("secret-two-0123456789abcdef012345678")
    assert one.key("agy_a", "mrn", "RB1") == one.key("agy_a", "mrn", "RB1")
    assert one.key("agy_a", "mrn", "RB1") != one.key("agy_b", "mrn", "RB1")
    assert one.key("agy_a", "mrn", "RB1") != one.key("agy_a", "dob", "RB1")
    assert one.key("agy_a", "mrn", "RB1") != other.key("agy_a", "mrn", "RB1")
    assert "RB1" not in one.key("agy_a", "mrn", "RB1")


@pytest.mark.parametrize(
    ("value", "valid"), [("1984-03-12", True), ("1984-3-12", False), ("1899-12-31", False), ("x", False)]
)
def test_roster_birth_dates(value, valid):
    assert valid_birth_date(value) is valid


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"code": "11502-2"}, ("lab_report", 0.97)),
        ({"code": "57133-1", "text": "lab results"}, ("referral", 0.97)),
        ({"title": "Laboratory Report"}, ("lab_report", 0.95)),
        ({"text": "REFERRAL FOR CONSULTATION\nPatient: Maria Lopez"}, ("referral", 0.95)),
        ({"text": "REQUEST FOR MEDICAL RECORDS\nPlease send"}, ("records_request", 0.95)),
        (
            {"text": "PHARMACY REFILL REQUEST\nPatient: X\nDOB: 1/1/1980\nsertraline 50 mg"},
            ("prescription_request", 0.95),
        ),
        (
            {"text": "Dear colleague,\n\nhello\n\nthe specimen was collected and the reference range is normal"},
            ("lab_report", 0.8),
        ),
        ({"text": "Dear colleague,\n\nhello\n\nwe ask for a refill"}, ("prescription_request", 0.6)),
        ({"text": "Dear colleague,\n\nhello\n\nreferral and a refill, referral again"}, ("referral", 0.6)),
        ({"text": "Dear colleague, hello"}, ("other", 0.3)),
        ({"text": "Lab Report\nPatient: Ana Lopez"}, ("lab_report", 0.95)),
        ({"text": "please refill\nPatient: Ana Lopez"}, ("prescription_request", 0.6)),  # not a heading
        # A CCD (summarization of episode note) is about anything: never a referral by its code.
        ({"code": "34133-9", "title": "Continuity of Care Document"}, ("other", 0.3)),
        ({"code": "34133-9", "title": "Referral Summary"}, ("referral", 0.8)),
        (
            {"code": "34133-9", "title": "Summary of Care", "text": "referral; referred to cardiology"},
            ("referral", 0.8),
        ),
    ],
)
def test_document_types(kwargs, expected):
    found = classify.classify(**kwargs)
    assert (found.document_type, found.confidence) == expected


@pytest.fixture
def base_env(tmp_path) -> dict[str, str]:
    return {"PHI_MASTER_KEYS": "m:" + "a" * 43 + "=", "MONGO_URI": "mongodb://x:1", "CLINIC_RUN_DIR": str(tmp_path)}


def test_triage_settings_defaults_in_development(base_env):
    settings = config.load(base_env).triage
    assert settings.auto_file_confidence == 0.95 and settings.max_attempts == 5 and settings.pass_s == 2.0
    assert settings.index_key  # the development key


def test_triage_settings_refuse_a_low_threshold_and_production_without_a_key(base_env):
    with pytest.raises(SettingsError) as refused:
        config.load({**base_env, "CLOUD_TRIAGE_AUTO_FILE_CONFIDENCE": "0.5"})
    assert any("CLOUD_TRIAGE_AUTO_FILE_CONFIDENCE" in p for p in refused.value.problems)
    with pytest.raises(SettingsError) as refused:
        config.load({**base_env, "CLINIC_MODE": "production"})
    assert any("CLOUD_TRIAGE_INDEX_KEY" in p for p in refused.value.problems)


def test_the_index_key_can_come_from_a_file(base_env, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k" * 40 + "\n")
    assert config.load({**base_env, "CLOUD_TRIAGE_INDEX_KEY_FILE": str(key_file)}).triage.index_key == "k" * 40


# --- several patients, foreign MRNs, suffixes, name order -------------------------------------------------
def test_a_document_carrying_two_roster_patients_mrns_is_capped_for_review():
    ranked = match.rank(probe("", "Lopez", "Maria", "1984-03-12", mrns=("RB100234", "RB100871")), ROSTER)
    assert ranked[0].patient_id == "maria"
    assert ranked[0].confidence == match.REVIEW_CAP < 0.9
    assert all(match.MULTIPLE_PATIENTS in m.flags for m in ranked)


def test_an_id_of_an_unknown_assigning_authority_matches_but_never_conflicts():
    # A partner hospital's own number equal to James Carter's MRN, on Maria's C-CDA.
    found = best(probe("", "Lopez", "Maria", "1984-03-12", weak=("RB100871",)))
    assert (found.patient_id, found.confidence, found.flags) == ("maria", 0.9, ())
    found = best(probe("", "Lopez", "Maria", "1984-03-12", weak=("RB100234", "RB100871")))
    assert (found.patient_id, found.confidence, found.flags) == ("maria", 0.99, ())


def test_a_suffix_the_roster_lacks_is_never_filed_and_a_different_one_conflicts():
    # "James Carter Jr." with his father's name and birth date on the roster (no suffix there).
    found = best(probe("", "Carter", "James", "1975-11-02", suffix="JR"))
    assert found.patient_id == "james" and found.confidence < 0.9
    assert found.flags == (match.SUFFIX_NOT_IN_ROSTER,)
    roster = [patient("sr", "RB1", "Carter", "James", "1975-11-02", suffix="SR")]
    assert match.rank(probe("", "Carter", "James", "1975-11-02", suffix="JR"), roster)[0].confidence == 0.45
    assert match.rank(probe("", "Carter", "James", "1975-11-02", suffix="SR"), roster)[0].confidence == 0.9
    assert match.rank(probe("", "Carter", "James", "1975-11-02"), roster)[0].confidence == 0.9


def test_an_order_unsure_name_is_tried_both_ways_at_a_lower_confidence():
    written = probe("", "James", "Carter", "1975-11-02")
    unsure = match.Probe(**{**written.__dict__, "swapped": probe("", "Carter", "James", "1975-11-02")})
    found = best(unsure)
    assert found.patient_id == "james" and found.confidence == pytest.approx(0.9 * match.ORDER_UNSURE)
    assert best(written).confidence < 0.5  # read one way only: the family name conflicts


@pytest.mark.parametrize(
    ("name", "expected"),
    [("Carter Jr.", ("Carter", "JR")), ("Carter III", ("Carter", "III")), ("Carter", ("Carter", ""))],
)
def test_roster_names_keep_their_suffix_apart(name, expected):
    assert extract.suffix_of(name) == expected
