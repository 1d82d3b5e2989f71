"""The pure HL7 v2 pieces of the lab interface, fed the messages real senders write
(tests/e2e/real_sender_messages.py): reading and checking a frame (`hl7v2.read_message`), turning
an ORU^R01 into lab reports (`lab_hl7.reports_from_oru`), MLLP framing (`mllp.FrameDecoder`) and
the acknowledgement a message gets (`mllp.MessageTypes.acknowledge`, with a handler that stores
nothing)."""

from __future__ import annotations

import re
import zoneinfo

import hl7
import pytest

from services.notifications import hl7v2
from services.notifications.lab_domain import URGENT, board_summary
from services.notifications.lab_hl7 import reports_from_oru
from services.notifications.mllp import FrameDecoder, MessageTypes
from tests.e2e.real_sender_messages import (
    CBC_TEST,
    CLINIC_APPLICATION,
    CRLF,
    LAB_APPLICATION,
    LF,
    LIPID_TEST,
    POTASSIUM_TEST,
    REFERENCE_LAB,
    RIVERBEND,
    RIVERBEND_HD,
    cholesterol,
    hemoglobin,
    message,
    mr,
    msh,
    nte,
    obr,
    obx,
    orc,
    oru,
    pid,
    platelets,
    potassium,
    sodium,
    spm,
    unique,
)
from tests.helpers import msa

# The development registration of MSH-6 RIVERBEND: agy_riverbend, whose clock is Chicago's.
CHICAGO = zoneinfo.ZoneInfo("America/Chicago")
NO_MR = f"{unique('A')}^^^LAB^AN~{unique('B')}^^^CERNER^PI"


def read(raw: str | bytes) -> hl7v2.InboundMessage:
    return hl7v2.read_message(raw.encode("ascii") if isinstance(raw, str) else raw)


def lab_reports(raw: str | bytes):
    """The reports of a message addressed to RIVERBEND (patient id type MR, Chicago time)."""
    return reports_from_oru(read(raw), zone=CHICAGO)


def refusal(action) -> hl7v2.Hl7Rejection:
    with pytest.raises(hl7v2.Hl7Rejection) as caught:
        action()
    return caught.value


def result(mrn: str, *observations: str, **kwargs) -> str:
    kwargs.setdefault("control_id", unique("U"))
    return oru(patient_ids=kwargs.pop("patient_ids", mr(mrn)), observations=list(observations), **kwargs)


# --- read_message: the header, separators, character sets, processing id ------------------------------


def test_full_hd_facilities_are_read_by_their_namespace_id():
    control_id = unique("HD")
    header = read(result(unique("M"), potassium(), control_id=control_id)).header
    assert (header.sending_facility, header.receiving_facility) == ("QUESTDX", RIVERBEND)
    assert (header.sending_application, header.receiving_application) == ("LAB", "CLINICBOARD")
    assert (header.message_type, header.trigger, header.control_id) == ("ORU", "R01", control_id)
    assert header.version == "2.5.1"


def mirth_relayed(mrn: str, separator: str) -> str:
    order = unique("F")
    return message(
        msh(unique("MIRTH"), sending_application="MIRTH", sending_facility="CERNERLAB", receiving_facility=RIVERBEND)
        + "|||||",
        pid(f"{mr(mrn)}~", name="SMITH^ROBERT^^JR^^^L") + "||||||||",
        f"ORC|RE|P{order}|{order}|||||||||||||||||||",
        obr(f"P{order}", order, LIPID_TEST) + "|||||",
        cholesterol(1, "242", "H") + "||||",
        "OBX|2|NM|2085-9^HDL Cholesterol^LN||38|mg/dL|>39|L|||F|||||||||||||||",
        separator=separator,
    )


@pytest.mark.parametrize("separator", [LF, CRLF], ids=["lf", "crlf"])
def test_a_mirth_relayed_result_with_newlines_and_trailing_separators_reads_every_segment(separator):
    mrn = unique("M")
    inbound = read(mirth_relayed(mrn, separator))
    assert [str(s[0]) for s in inbound.message] == ["MSH", "PID", "ORC", "OBR", "OBX", "OBX"]
    (report,) = reports_from_oru(inbound, zone=CHICAGO)
    assert report.patient_ref == mrn
    assert [(o.value, list(o.flags)) for o in report.observations] == [("242", ["H"]), ("38", ["L"])]


NAME = "MUÑOZ^JOSÉ^^^^^L"


@pytest.mark.parametrize(
    ("charset", "codec"),
    [
        ("UNICODE UTF-8", "utf-8"),
        ("UTF-8", "utf-8"),
        ("8859/1", "latin-1"),
        ("ISO-8859-1", "latin-1"),
        ("ISO IR100", "latin-1"),
        ("", "utf-8"),
        ("", "latin-1"),
    ],
    ids=["unicode-utf8", "utf8", "8859-1", "iso-8859-1", "iso-ir100", "absent-utf8-bytes", "absent-latin1-bytes"],
)
def test_the_patient_name_is_read_in_the_declared_character_set(charset, codec):
    raw = result(unique("M"), sodium(1), name=NAME, charset=charset).encode(codec)
    inbound = read(raw)
    assert "MUÑOZ" in str(inbound.message.segment("PID")[5])
    (report,) = reports_from_oru(inbound, zone=CHICAGO)
    assert "MUÑOZ" in report.patient_name and "JOSÉ" in report.patient_name


def test_an_ascii_message_declared_ascii_is_read():
    (report,) = lab_reports(result(unique("M"), sodium(1), name="MUNOZ^JOSE^^^^^L", charset="ASCII"))
    assert "MUNOZ" in report.patient_name


def test_bytes_that_are_not_utf8_where_utf8_is_declared_are_ae_102_at_the_field():
    control_id = unique("BAD")
    value = obx(1, "FE^Iron^L^2498-4^Iron SerPl-mCnc^LN", "Reported in \u00b5g/dL", value_type="ST")
    raw = result(unique("M"), value, control_id=control_id, charset="UNICODE UTF-8").encode("latin-1")
    rejection = refusal(lambda: read(raw))
    assert (rejection.ack_code, rejection.error_code) == ("AE", "102")
    assert rejection.location in ("OBX^1^5", "OBX"), rejection.location
    assert rejection.header is not None and rejection.header.control_id == control_id


def test_a_latin1_patient_name_where_utf8_is_declared_is_ae_102_at_pid_5():
    control_id = unique("BAD")
    raw = result(unique("M"), sodium(1), control_id=control_id, name=NAME, charset="UNICODE UTF-8").encode("latin-1")
    rejection = refusal(lambda: read(raw))
    assert (rejection.ack_code, rejection.error_code) == ("AE", "102")
    assert rejection.location in ("PID^1^5", "PID"), rejection.location
    assert rejection.header is not None and rejection.header.control_id == control_id


def test_ascii_declared_but_utf8_sent_is_read_as_utf8():
    """MSH-18 ASCII reads as an absent MSH-18 does ("ASCII with Latin-1 tolerated"): senders that
    declare ASCII and send accented names lose nothing (services/notifications/README.md)."""
    raw = result(unique("M"), sodium(1), control_id=unique("ASC"), name=NAME, charset="ASCII").encode("utf-8")
    (report,) = reports_from_oru(read(raw))
    assert "MUÑOZ" in report.patient_name and "JOSÉ" in report.patient_name


def test_an_unknown_character_set_is_ar_naming_the_message():
    control_id = unique("UNK")
    rejection = refusal(lambda: read(result(unique("M"), sodium(1), control_id=control_id, charset="KLINGON-7")))
    assert rejection.ack_code == "AR"
    assert rejection.header is not None and rejection.header.control_id == control_id


@pytest.mark.parametrize("processing_id", ["T", "D"])
def test_training_and_debugging_messages_are_ar_202(processing_id):
    control_id = unique("PROC")
    raw = result(unique("M"), potassium(), control_id=control_id, processing_id=processing_id)
    rejection = refusal(lambda: read(raw))
    assert (rejection.ack_code, rejection.error_code) == ("AR", "202")
    assert rejection.header is not None and rejection.header.control_id == control_id


# --- reports_from_oru: patients ------------------------------------------------------------------------


def batch(mrns: list[str], orders: list[str]) -> str:
    names = ["ALPHA^ANN^^^^^L", "BRAVO^BEN^^^^^L", "CHARLIE^CARA^^^^^L"]
    observations = [potassium(1, "6.9", "HH"), sodium(1, "139", "N"), cholesterol(1, "242", "H")]
    segments = [msh(unique("BATCH"))]
    for n, (mrn, order) in enumerate(zip(mrns, orders, strict=True)):
        segments += [
            pid(f"{unique('ACC')}^^^LAB^AN~{mr(mrn)}", name=names[n], set_id=str(n + 1)),
            orc(f"P{order}", order),
            obr(f"P{order}", order, POTASSIUM_TEST, set_id=str(n + 1)),
            observations[n],
        ]
    return message(*segments)


def test_second_patient_result_is_filed_under_second_patient():
    mrns, orders = [unique("A"), unique("B"), unique("C")], [unique("FA"), unique("FB"), unique("FC")]
    reports = lab_reports(batch(mrns, orders))
    assert [(r.patient_ref, r.order_number) for r in reports] == list(zip(mrns, orders, strict=True))
    second = reports[1]
    assert [o.value for o in second.observations] == ["139"]
    assert "BRAVO" in second.patient_name and "ALPHA" not in second.patient_name
    assert second.severity != URGENT  # the first patient's critical potassium is not theirs


@pytest.mark.parametrize(
    "identifiers",
    [
        "{acc}^^^LAB^AN~{mrn}^^^RIVERBEND^MR",
        "{pi}^^^CERNER^PI~{acc}^^^LAB&2.16.840.1.113883.3.1&ISO^AN~{mrn}^^^RIVERBEND&2.16.840.1.113883.3.7.1&ISO^MR",
    ],
    ids=["account-then-mr", "mr-last-with-full-hd-authority"],
)
def test_the_medical_record_number_is_picked_by_type_from_repeated_identifiers(identifiers):
    mrn = unique("MRN")
    ids = identifiers.format(acc=unique("ACC"), pi=unique("PI"), mrn=mrn)
    (report,) = lab_reports(result(mrn, potassium(), patient_ids=ids))
    assert report.patient_ref == mrn


@pytest.mark.parametrize("identifier", ["{id}", "{id}^^^RIVERBEND"], ids=["bare", "with-authority-no-type"])
def test_a_lone_identifier_without_type_is_the_patient_reference(identifier):
    mrn = unique("LONE")
    (report,) = lab_reports(result(mrn, sodium(1), patient_ids=identifier.format(id=mrn)))
    assert report.patient_ref == mrn


@pytest.mark.parametrize(
    "identifiers",
    ["{a}^^^LAB^AN~{b}^^^CERNER^PI", "{a}^^^LAB~{b}^^^LAB^AN", "{a}~{b}"],
    ids=["account-and-internal", "untyped-beside-account", "two-untyped"],
)
def test_several_identifiers_without_a_medical_record_number_are_ae_at_pid_1_3(identifiers):
    ids = identifiers.format(a=unique("A"), b=unique("B"))
    rejection = refusal(lambda: lab_reports(result(unique("M"), potassium(), patient_ids=ids)))
    assert rejection.ack_code == "AE"
    assert rejection.location == "PID^1^3"


# --- reports_from_oru: notes and withdrawn values --------------------------------------------------------


def test_notes_after_obr_are_report_comments_and_after_obx_observation_comments():
    mrn, order = unique("NTE"), unique("F")
    raw = message(
        msh(unique("NTE")),
        pid(mr(mrn)),
        orc(f"P{order}", order),
        obr(f"P{order}", order, POTASSIUM_TEST),
        nte(1, "Specimen received slightly hemolyzed."),
        nte(2, "Fasting \\T\\ non-fasting reference ranges apply."),
        potassium(1, "6.9", "HH"),
        nte(1, "Repeated and verified.\\.br\\Called to and read back by RN KIM 11/26/2026 08:12."),
        sodium(2, "139", "N"),
        spm(f"S{order}"),
    )
    (report,) = lab_reports(raw)
    assert list(report.comments) == [
        "Specimen received slightly hemolyzed.",
        "Fasting & non-fasting reference ranges apply.",
    ]
    potassium_notes, sodium_notes = (list(o.comments) for o in report.observations)
    assert len(potassium_notes) == 1
    assert "Repeated and verified." in potassium_notes[0] and "Called to and read back by RN KIM" in potassium_notes[0]
    assert "\\.br\\" not in potassium_notes[0]
    assert sodium_notes == []


def test_a_withdrawn_value_has_a_reason_no_value_and_is_not_critical():
    mrn = unique("WD")
    raw = result(mrn, potassium(1, "6.9", "HH", status="W"), sodium(2, "139", "N", status="C"), status="C")
    (report,) = lab_reports(raw)
    withdrawn, kept = report.observations
    assert withdrawn.retracted and withdrawn.value == ""
    assert withdrawn.severity != URGENT
    assert kept.value == "139" and not kept.retracted
    assert report.severity != URGENT and report.status != "retracted"
    assert "critical" not in board_summary(report)


@pytest.mark.parametrize("obx_status", ["W", "D"])
def test_a_result_whose_every_value_is_withdrawn_is_retracted(obx_status):
    mrn = unique("RET")
    raw = result(
        mrn,
        hemoglobin(1, "13.1", "N", status=obx_status),
        platelets(2, "18", "LL", status=obx_status),
        test=CBC_TEST,
        status="C",
    )
    (report,) = lab_reports(raw)
    assert report.status == "retracted" and report.retracted
    assert all(o.retracted and o.value == "" for o in report.observations)
    assert report.severity != URGENT
    summary = board_summary(report)
    assert summary.startswith(f"Patient {mrn}:") and "withdrawn" in summary.lower()


# --- reports_from_oru: versions ----------------------------------------------------------------------


def version(status: str, reported_at: str, sent_at: str, obx_status: str | None = None) -> int:
    raw = result(
        "MRN-V",
        potassium(1, "6.9", "HH", status=obx_status or status),
        order="F-VERSION",
        status=status,
        reported_at=reported_at,
        sent_at=sent_at,
    )
    (report,) = lab_reports(raw)
    return report.version


def test_final_outranks_preliminary_even_when_its_report_time_is_earlier():
    prelim = version("P", "20261126100000-0600", "20261126100500-0600")
    final = version("F", "20261126090000-0600", "20261126090500-0600")
    assert final > prelim


def test_final_with_another_utc_offset_outranks_preliminary():
    prelim = version("P", "20261126100000-0600", "20261126100100-0600")
    final = version("F", "20261126160000+0100", "20261126160100+0100")  # 15:00Z, before the preliminary's 16:00Z
    assert final > prelim


def test_correction_outranks_preliminary_whatever_the_times():
    prelim = version("P", "20261126100000-0600", "20261126100100-0600")
    corrected = version("C", "20261126080000-0600", "20261126080100-0600")
    assert corrected > prelim


def test_preliminary_arriving_after_final_has_a_lower_version():
    final = version("F", "20261126100000-0600", "20261126100100-0600")
    late_prelim = version("P", "20261126110000-0600", "20261126110100-0600")
    assert late_prelim < final


def test_a_time_without_offset_is_local_time_of_the_agency():
    with_offset = version("P", "20261126080000-0500", "20261126080100-0500")  # 13:00Z
    local = version("P", "20261126073000", "20261126073100")  # 13:30Z in Chicago (CST); 07:30Z if read as UTC
    assert local > with_offset


def test_a_summer_time_without_offset_is_read_in_daylight_time():
    with_offset = version("P", "20260715130000+0000", "20260715130100+0000")  # 13:00Z
    local = version("P", "20260715073000", "20260715073100")  # 12:30Z in Chicago (CDT); 13:30Z at a fixed -0600
    assert local < with_offset


# --- FrameDecoder -------------------------------------------------------------------------------------


def test_a_start_block_inside_an_unfinished_frame_begins_a_new_frame():
    cut = result(unique("CUT"), potassium()).encode("ascii")
    good = result(unique("GOOD"), sodium(1)).encode("ascii")
    decoder = FrameDecoder(1024 * 1024)
    assert decoder.feed(b"\x0b" + cut[: len(cut) // 2] + b"\x0b" + good + b"\x1c\r") == [good]


def test_a_start_block_in_a_later_read_abandons_the_unfinished_frame():
    cut = result(unique("CUT"), potassium()).encode("ascii")
    good = result(unique("GOOD"), sodium(1)).encode("ascii")
    decoder = FrameDecoder(1024 * 1024)
    assert decoder.feed(b"\x0b" + cut[: len(cut) // 2]) == []
    assert decoder.feed(b"\x0b" + good[:100]) == []
    assert decoder.feed(good[100:] + b"\x1c\r") == [good]


# --- the acknowledgement (dispatch with a handler that accepts everything) ------------------------------


def acknowledge(raw: str | bytes) -> hl7.Message | None:
    types = MessageTypes()
    types.register("ORU", "R01", lambda inbound: reports_from_oru(inbound, zone=CHICAGO))
    answer = types.acknowledge(raw.encode("ascii") if isinstance(raw, str) else raw)
    return hl7.parse(answer.decode("ascii")) if answer else None


@pytest.mark.parametrize("outcome", ["AA", "AE", "AR"])
def test_the_ack_swaps_sender_and_receiver_with_every_hd_component(outcome):
    control_id = unique("HD")
    raw = result(
        unique("M"),
        sodium(1),
        control_id=control_id,
        patient_ids=NO_MR if outcome == "AE" else mr(unique("M")),
        processing_id="T" if outcome == "AR" else "P",
    )
    ack = acknowledge(raw)
    assert msa(ack)[:2] == (outcome, control_id)
    header = ack.segment("MSH")
    assert [str(header[n]) for n in (3, 4, 5, 6)] == [CLINIC_APPLICATION, RIVERBEND_HD, LAB_APPLICATION, REFERENCE_LAB]
    assert re.fullmatch(r"\d{12}(\d{2}(\.\d{1,4})?)?[+-]\d{4}", str(header[7])), str(header[7])


@pytest.mark.parametrize(
    ("accept_ack", "valid", "expected"),
    [
        ("", True, "AA"),
        ("", False, "AE"),
        ("AL", True, "CA"),
        ("AL", False, "CE"),
        ("NE", True, None),
        ("NE", False, None),
        ("ER", True, None),
        ("ER", False, "CE"),
        ("SU", True, "CA"),
        ("SU", False, None),
    ],
)
def test_the_accept_acknowledgement_condition_decides_what_is_sent(accept_ack, valid, expected):
    control_id = unique("MODE")
    raw = result(
        unique("M"),
        sodium(1),
        control_id=control_id,
        patient_ids=mr(unique("M")) if valid else NO_MR,
        accept_ack=accept_ack,
        application_ack="NE" if accept_ack else "",
    )
    ack = acknowledge(raw)
    if expected is None:
        assert ack is None
    else:
        assert msa(ack)[:2] == (expected, control_id)


def test_a_rejection_in_accept_always_mode_is_a_commit_reject():
    control_id = unique("CR")
    raw = result(
        unique("M"), sodium(1), control_id=control_id, accept_ack="AL", application_ack="NE", processing_id="D"
    )
    ack = acknowledge(raw)
    assert msa(ack)[:2] == ("CR", control_id)
    assert str(ack.segment("ERR")[3]).split("^")[0] == "202"
