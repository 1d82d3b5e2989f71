"""ORU^R01 rules that keep results with the right patient and the right version: pure, no I/O."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from services.notifications import hl7v2
from services.notifications.lab_domain import INFO, URGENT, board_summary, board_title
from services.notifications.lab_hl7 import reports_from_oru
from services.notifications.mllp import FrameDecoder, MessageTypes, frame

CHICAGO = zoneinfo.ZoneInfo("America/Chicago")
MSH = (
    "MSH|^~\\&|LIS|REGIONAL_LAB^2.16.840.1.113883.3.99^ISO|BOARD|RIVERBEND|202612011015||ORU^R01^ORU_R01|{cid}|P|2.5.1"
)


def obr(test: str = "K^K", *, reported: str = "", status: str = "", ordering: str = "") -> str:
    """An OBR with OBR-3 O1, OBR-4 `test`, OBR-16 `ordering`, OBR-22 `reported`, OBR-25 `status`."""
    fields = ["OBR", "1", "", "O1", test] + [""] * 21
    fields[16], fields[22], fields[25] = ordering, reported, status
    return "|".join(fields).rstrip("|")


def read(*segments: str, cid: str = "CID-1", **options):
    message = hl7v2.read_message("\r".join([MSH.format(cid=cid), *segments]).encode())
    return reports_from_oru(message, **options)


def test_each_order_is_filed_under_the_pid_before_it():
    reports = read(
        "PID|1||111^^^RIVERBEND^MR||ALPHA^ANN",
        "OBR|1||ORD-A|2823-3^Potassium^LN|||||||||||||||||||F",
        "OBX|1|NM|2823-3^Potassium^LN||4.1|mmol/L|3.5-5.1|N|||F",
        "PID|2||222^^^RIVERBEND^MR||BETA^BOB",
        "ORC|RE||ORD-B",
        "OBR|1||ORD-B|2823-3^Potassium^LN|||||||||||||||||||F",
        "OBX|1|NM|2823-3^Potassium^LN||6.9|mmol/L|3.5-5.1|HH|||F",
    )
    assert [(r.patient_ref, r.order_number, r.severity) for r in reports] == [
        ("111", "ORD-A", INFO),
        ("222", "ORD-B", URGENT),
    ]
    assert reports[1].patient_name == "BETA, BOB"


@pytest.mark.parametrize(
    ("pid3", "options", "expected"),
    [
        ("ACC9^^^LAB^AN~MRN7^^^RIVERBEND^MR", {}, "MRN7"),
        ("MRN7^^^RIVERBEND^MR~ACC9^^^LAB^AN", {}, "MRN7"),
        ("X1^^^OTHER^MR~MRN7^^^RIVERBEND&2.1.2&ISO^MR", {"patient_id_authority": "RIVERBEND"}, "MRN7"),
        ("X1^^^OTHER^MR~MRN7^^^RB&2.16.9&ISO^MR", {"patient_id_authority": "2.16.9"}, "MRN7"),
        ("PI5^^^RIVERBEND^PI~MRN7^^^RIVERBEND^MR", {"patient_id_type": "PI"}, "PI5"),
        ("MRN7", {}, "MRN7"),
    ],
)
def test_the_patient_identifier_is_chosen_by_type_and_authority(pid3, options, expected):
    (report,) = read(f"PID|1||{pid3}", "OBR|1||O1|T^Test", "OBX|1|ST|T^Test||ok||||||F", **options)
    assert report.patient_ref == expected


@pytest.mark.parametrize("pid3", ["ACC9^^^LAB^AN~SSN^^^SSA^SS", "A^^^LAB^AN~B", "ACC9^^^LAB^AN"])
def test_no_identifier_of_the_registered_type_is_an_error_naming_pid3(pid3):
    with pytest.raises(hl7v2.Hl7Rejection) as caught:
        read(f"PID|1||{pid3}", "OBR|1||O1|T^Test", "OBX|1|ST|T^Test||ok||||||F")
    assert (caught.value.ack_code, caught.value.error_code, caught.value.location) == ("AE", "101", "PID^1^3")


def test_notes_after_the_obr_and_after_an_obx_are_kept_where_they_belong():
    (report,) = read(
        "PID|1||M1^^^R^MR",
        "OBR|1||O1|2823-3^Potassium^LN",
        "NTE|1|L|Specimen hemolyzed\\.br\\recollect advised",
        "OBX|1|NM|2823-3^Potassium^LN||6.9|mmol/L|3.5-5.1|HH|||F",
        "NTE|1|L|Critical value called to clinic, read back by RN",
        "NTE|2|L|",
    )
    assert report.comments == ("Specimen hemolyzed\nrecollect advised",)
    assert report.observations[0].comments == ("Critical value called to clinic, read back by RN",)


def test_a_withdrawn_value_is_not_shown_nor_counted_and_all_withdrawn_withdraws_the_result():
    (partly,) = read(
        "PID|1||M1^^^R^MR",
        obr("P^Panel", status="C"),
        "OBX|1|NM|2823-3^Potassium^LN||6.9|mmol/L|3.5-5.1|HH|||W",
        "OBX|2|NM|2951-2^Sodium^LN||140|mmol/L|136-145|N|||C",
    )
    assert partly.observations[0].value == "" and partly.observations[0].retracted == "posted in error"
    assert partly.severity == INFO and partly.status == "corrected" and not partly.retracted
    assert board_summary(partly).endswith("no abnormal flags; 1 withdrawn")
    (withdrawn,) = read(
        "PID|1||M1^^^R^MR",
        obr("P^Panel", status="C"),
        "OBX|1|NM|2823-3^Potassium^LN||6.9|mmol/L|3.5-5.1|HH|||W",
        "OBX|2|NM|2951-2^Sodium^LN||140|mmol/L|136-145|N|||D",
    )
    assert withdrawn.status == "retracted" and withdrawn.severity == INFO
    assert board_title(withdrawn) == "Lab result: Panel (retracted)"
    assert "withdrawn" in board_summary(withdrawn) and "6.9" not in board_summary(withdrawn)


def test_a_final_outranks_a_preliminary_whatever_the_times_and_offsets():
    obx = "OBX|1|NM|2823-3^Potassium^LN||6.9|mmol/L|3.5-5.1|HH|||{}"
    (preliminary,) = read("PID|1||M1^^^R^MR", obr(reported="202612011200+0000", status="P"), obx.format("P"))
    (final,) = read("PID|1||M1^^^R^MR", obr(reported="202612010500-0500", status="F"), obx.format("F"))
    (corrected,) = read("PID|1||M1^^^R^MR", obr(reported="202612010400", status="C"), obx.format("C"))
    assert preliminary.version < final.version < corrected.version


def test_times_without_an_offset_are_the_senders_local_time():
    request = obr(reported="202612011015", status="F")
    (here,) = read("PID|1||M1^^^R^MR", request, "OBX|1|ST|K^K||x||||||F", zone=CHICAGO)
    (utc,) = read("PID|1||M1^^^R^MR", request, "OBX|1|ST|K^K||x||||||F")
    assert here.version - utc.version == 6 * 3600 * 1000  # 10:15 in Chicago is 16:15 UTC


def test_structured_and_coded_values_read_as_written():
    (report,) = read(
        "PID|1||M1^^^R^MR",
        "OBR|1||O1|T^Tests",
        "OBX|1|SN|1^Troponin||<^0.01|ng/mL|0.00-0.04|N|||F",
        "OBX|2|SN|2^Titer||^1^:^128||||||F",
        "OBX|3|CWE|3^HIV screen||260385009^Negative^SCT||Negative|N|||F",
        "OBX|4|ST|4^Note||A \\T\\ B||||||F",
    )
    assert [o.value for o in report.observations] == ["<0.01", "1:128", "Negative", "A & B"]


def test_ordering_providers_are_read_by_npi_or_directory_id():
    (report,) = read(
        "PID|1||M1^^^R^MR",
        "ORC|RE||O1|||||||||1234567893^REYES^MARIA^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO^L^^^NPI",
        obr(ordering="stf_riverbend_kim^KIM~9999^LOCAL^ONLY"),
        "OBX|1|ST|K^K||x||||||F",
    )
    assert report.ordering_providers == ("staff:stf_riverbend_kim", "npi:1234567893")


# --- framing and acknowledgement modes ---------------------------------------------------------------


def test_a_start_block_inside_an_unfinished_frame_begins_a_new_one():
    decoder = FrameDecoder(4096)
    good = MSH.format(cid="GOOD").encode()
    assert decoder.feed(b"\x0bMSH|^~\\&|HALF A MESS" + frame(good)) == [good]
    assert decoder.abandoned == 1


def test_an_oversize_frame_keeps_its_head_so_the_refusal_echoes_the_control_id():
    from services.notifications.mllp import FrameTooLarge

    decoder = FrameDecoder(1024)
    with pytest.raises(FrameTooLarge) as caught:
        decoder.feed(b"\x0b" + MSH.format(cid="BIG-1").encode() + b"\rOBX|" + b"x" * 2000)
    assert hl7v2.sniff_header(caught.value.head).control_id == "BIG-1"


def accepting() -> MessageTypes:
    types = MessageTypes()
    types.register("ORU", "R01", lambda message: None)
    return types


def ack_fields(raw: bytes) -> list[list[str]]:
    return [segment.split("|") for segment in raw.decode("ascii").strip("\r").split("\r")]


@pytest.mark.parametrize(
    ("msh15", "good", "bad"),
    [("", "AA", "AE"), ("AL", "CA", "CE"), ("NE", None, None), ("ER", None, "CE"), ("SU", "CA", None)],
)
def test_msh15_chooses_original_or_enhanced_mode_and_when_to_answer(msh15, good, bad):
    base = MSH.format(cid="E1") + f"|||{msh15}|AL"
    answers = []
    for body in ("PID|1||M1^^^R^MR\rOBR|1||O1|K^K", "\x01"):
        answer = accepting().acknowledge(f"{base}\r{body}".encode())
        answers.append(ack_fields(answer)[1][1] if answer else None)
    assert answers == [good, bad]


def test_the_ack_is_addressed_back_with_every_hd_component_and_a_zoned_time():
    header = MSH.format(cid="HD-1").replace("|BOARD|RIVERBEND|", "|BOARD^1.2.3^ISO|RIVERBEND^9.8^ISO|")
    raw = accepting().acknowledge((header + "\rPID|1").encode())
    msh, msa = ack_fields(raw)[:2]
    assert msh[2:6] == ["BOARD^1.2.3^ISO", "RIVERBEND^9.8^ISO", "LIS", "REGIONAL_LAB^2.16.840.1.113883.3.99^ISO"]
    assert dt.datetime.strptime(msh[6], "%Y%m%d%H%M%S%z").utcoffset() is not None
    assert msa[:3] == ["MSA", "AA", "HD-1"]


@pytest.mark.parametrize("processing", ["T", "D"])
def test_training_and_debugging_messages_never_reach_a_production_interface(processing):
    raw = accepting().acknowledge(MSH.format(cid="TR-1").replace("|P|2.5.1", f"|{processing}|2.5.1").encode())
    fields = ack_fields(raw)
    assert fields[1][:3] == ["MSA", "AR", "TR-1"]
    assert fields[2][3].startswith("202^")
