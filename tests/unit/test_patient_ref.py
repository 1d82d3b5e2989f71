"""services.kit.patient_ref: the pseudonym an audit record names a patient by, instead of an MRN or a
vendor's patient id. Stable, keyed, scoped by agency and identifier space, never the identifier."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from services.kit.patient_ref import (
    PatientRefKeys,
    erx_system,
    is_patient_ref,
    mrn_system,
    normalise_identifier,
    patient_ref,
    read_keys,
    search_refs,
)
from services.kit.settings import Env, SettingsError

KEY = "k" * 40
OTHER_KEY = "o" * 40
REF = re.compile(r"^pref_[0-9a-f]{32}$")


def test_a_reference_is_a_stable_keyed_pseudonym_that_holds_no_part_of_the_identifier():
    ref = patient_ref("agy_riverbend", "mrn:RIVERBEND", "MRN48213", key=KEY)
    assert REF.fullmatch(ref) and is_patient_ref(ref)
    assert patient_ref("agy_riverbend", "mrn:RIVERBEND", "MRN48213", key=KEY) == ref
    assert "48213" not in ref and "mrn" not in ref.removeprefix("pref_")
    # Not an unkeyed digest an attacker could recompute by trying every MRN.
    for text in ("MRN48213", "agy_riverbend\x1fmrn:riverbend\x1fmrn48213"):
        assert hashlib.sha256(text.encode()).hexdigest()[:32] not in ref


def test_the_key_the_agency_and_the_identifier_space_each_change_the_reference():
    base = patient_ref("agy_riverbend", "mrn:riverbend", "MRN48213", key=KEY)
    assert patient_ref("agy_riverbend", "mrn:riverbend", "MRN48213", key=OTHER_KEY) != base
    assert patient_ref("agy_lakeside", "mrn:riverbend", "MRN48213", key=KEY) != base
    assert patient_ref("agy_riverbend", "erx:dosespot", "MRN48213", key=KEY) != base
    assert patient_ref("agy_riverbend", "mrn:riverbend", "MRN48214", key=KEY) != base


def test_fields_cannot_be_shifted_into_each_other():
    """Length-prefixed fields: moving text across a field boundary makes another reference."""
    assert patient_ref("agy_a", "mrn:x", "1", key=KEY) != patient_ref("agy_a", "mrn", "x1", key=KEY)
    assert patient_ref("agy_a", "mrn:x", "1", key=KEY) != patient_ref("agy_", "amrn:x", "1", key=KEY)


def test_it_is_hmac_sha256_over_the_documented_message():
    """The exact construction, so the audit service (or an auditor's tool) computes the same value."""
    message = b"clinic.patient_ref.v1"
    for part in ("agy_riverbend", "mrn:riverbend", "mrn48213"):
        message += len(part.encode()).to_bytes(4, "big") + part.encode()
    expected = "pref_" + hmac.new(KEY.encode(), message, hashlib.sha256).hexdigest()[:32]
    assert patient_ref("agy_riverbend", "mrn:RIVERBEND", "MRN48213", key=KEY) == expected


@pytest.mark.parametrize(
    ("typed", "sent"),
    [
        ("mrn48213", "MRN48213"),
        ("  MRN48213 ", "MRN48213"),
        ("ＭＲＮ４８２１３", "MRN48213"),  # full-width, as some keyboards type it
        ("A  B", "a b"),
    ],
)
def test_the_identifier_is_normalised_as_an_officer_may_type_it(typed, sent):
    assert normalise_identifier(typed) == normalise_identifier(sent)
    assert patient_ref("agy_a", "mrn:x", typed, key=KEY) == patient_ref("agy_a", "mrn:x", sent, key=KEY)


def test_leading_zeros_and_punctuation_are_part_of_the_identifier():
    assert patient_ref("agy_a", "mrn:x", "00123", key=KEY) != patient_ref("agy_a", "mrn:x", "123", key=KEY)
    assert patient_ref("agy_a", "mrn:x", "12-3", key=KEY) != patient_ref("agy_a", "mrn:x", "123", key=KEY)


def test_systems_are_named_the_same_way_by_every_service():
    assert mrn_system("RIVERBEND") == "mrn:riverbend" == mrn_system(" riverbend ", "mr")
    assert mrn_system("") == "mrn"
    assert mrn_system("2.16.840.1.113883.19.5") == "mrn:2.16.840.1.113883.19.5"
    assert mrn_system("LAB", "PI") == "pi:lab"
    assert erx_system("DoseSpot") == "erx:dosespot"
    assert patient_ref("agy_a", "MRN : Riverbend", "1", key=KEY) == patient_ref("agy_a", "mrn:riverbend", "1", key=KEY)


def test_no_identifier_is_no_reference_and_a_missing_key_is_an_error():
    assert patient_ref("agy_a", "mrn:x", "", key=KEY) == ""
    assert patient_ref("agy_a", "mrn:x", None, key=KEY) == ""
    assert patient_ref("agy_a", "mrn:x", "   ", key=KEY) == ""
    for agency, system, key in (("agy_a", "mrn:x", ""), ("", "mrn:x", KEY), ("agy_a", "", KEY)):
        with pytest.raises(ValueError):
            patient_ref(agency, system, "MRN1", key=key)


def test_is_patient_ref_accepts_only_references():
    assert not is_patient_ref("MRN48213")
    assert not is_patient_ref("pat_riverbend_demo")
    assert not is_patient_ref("pref_" + "A" * 32)
    assert not is_patient_ref("")


def test_a_search_tries_the_current_key_then_the_replaced_ones():
    keys = PatientRefKeys(KEY, (OTHER_KEY,))
    old = patient_ref("agy_a", "mrn:x", "MRN1", key=OTHER_KEY)
    new = patient_ref("agy_a", "mrn:x", "MRN1", key=KEY)
    assert search_refs("agy_a", "mrn:x", "MRN1", keys) == [new, old]
    assert search_refs("agy_a", "mrn:x", "", keys) == []


def test_development_generates_one_key_into_the_run_folder_for_the_whole_stack(tmp_path):
    first = read_keys(Env("notifications", {"CLINIC_RUN_DIR": str(tmp_path)}))
    second = read_keys(Env("erx-bridge", {"CLINIC_RUN_DIR": str(tmp_path)}))
    assert first.current and first.current == second.current and len(first.current) >= 32
    assert (tmp_path / "secrets" / "patient-ref-key").read_text().strip() == first.current
    assert first.current not in repr(first)


def test_production_requires_the_key_and_refuses_a_short_one(tmp_path):
    env = Env("notifications", {"CLINIC_MODE": "production", "CLINIC_RUN_DIR": str(tmp_path)})
    read_keys(env)
    with pytest.raises(SettingsError) as refused:
        env.done()
    assert "PATIENT_REF_KEY (or PATIENT_REF_KEY_FILE) is required in production" in refused.value.problems
    assert not (tmp_path / "secrets").exists()

    short = Env("notifications", {"CLINIC_MODE": "production", "PATIENT_REF_KEY": "short"})
    read_keys(short)
    assert short.problems == ["PATIENT_REF_KEY must be at least 32 characters"]


def test_the_key_comes_from_a_file_and_previous_keys_from_a_list(tmp_path):
    path = tmp_path / "patient_ref_key"
    path.write_text(KEY + "\n")
    env = Env(
        "audit",
        {"CLINIC_MODE": "production", "PATIENT_REF_KEY_FILE": str(path), "PATIENT_REF_PREVIOUS_KEYS": f"{OTHER_KEY}, "},
    )
    keys = read_keys(env)
    env.done()
    assert keys.current == KEY and keys.previous == (OTHER_KEY,) and keys.all == (KEY, OTHER_KEY)
    assert KEY not in repr(keys)


# --- what notifications and erx-bridge pass ------------------------------------------------------
def test_notifications_names_lab_patients_in_the_agencys_mrn_space():
    from services.notifications.audit import patient_system
    from services.notifications.registrations import Facility, Registrations

    def system(facilities: dict[str, Facility], agency: str = "agy_riverbend") -> str:
        return patient_system(Registrations(facilities, {}), agency)

    riverbend = Facility("agy_riverbend")
    # The development registration (no authority): the receiving facility, for HL7 and FHIR alike.
    assert system({"RIVERBEND": riverbend, "LAKESIDE": Facility("agy_lakeside")}) == "mrn:riverbend"
    assert system({"RIVERBEND": riverbend, "LAKESIDE": Facility("agy_lakeside")}, "agy_lakeside") == "mrn:lakeside"
    # A registration that names the MRNs' assigning authority (the only one its HL7 MRNs come from).
    assert system({"RIVERBEND": Facility("agy_riverbend", "MR", "RB_EHR")}) == "mrn:rb_ehr"
    assert system({"A_CLINIC": riverbend, "B_CLINIC": Facility("agy_riverbend", "MR", "RB_EHR")}) == "mrn:rb_ehr"
    assert system({"B_CLINIC": riverbend, "A_CLINIC": riverbend}) == "mrn:a_clinic"
    # Another identifier type, and an agency with no HL7 registration (FHIR only).
    assert system({"RIVERBEND": Facility("agy_riverbend", "PI", "LAB")}) == "pi:lab"
    assert system({}, "agy_fhir_only") == "mrn:agy_fhir_only"


def _recorded_patients(store_docs: list[dict]) -> list[tuple[str, str]]:
    from clinic.audit.v1 import audit_pb2
    from services.kit.events import decode_envelope, unpack

    found = []
    for doc in store_docs:
        for entry in doc["_outbox"].values():
            payload = unpack(decode_envelope(entry["env"]), audit_pb2.PhiAccessed)
            found.append((payload.resource_id, payload.patient_id))
    return sorted(found)


def test_erx_bridge_records_the_reference_of_the_vendors_patient_and_never_the_id():
    from services.erx_bridge import audit as erx_audit
    from services.kit.auth import Identity

    class Store:
        def __init__(self):
            self.docs: list[dict] = []

        def record_access(self, doc: dict) -> None:
            self.docs.append(doc)

    caller = Identity(subject="stf_riverbend_reyes", agency_id="agy_riverbend")
    refs = erx_audit.patient_refs(KEY, "agy_riverbend", "DoseSpot", {"erx_1": "50017", "erx_2": ""})
    assert refs == {"erx_1": patient_ref("agy_riverbend", "erx:dosespot", "50017", key=KEY), "erx_2": ""}
    store = Store()
    erx_audit.record(store, caller, ["erx_1", "erx_2"], action="report", patients=refs)
    assert _recorded_patients(store.docs) == [("erx_1", refs["erx_1"]), ("erx_2", "")]
    # A vendor id handed to record() by mistake never reaches the trail.
    leaky = Store()
    erx_audit.record(leaky, caller, ["erx_1"], action="report", patients={"erx_1": "50017"})
    assert _recorded_patients(leaky.docs) == [("erx_1", "")]
