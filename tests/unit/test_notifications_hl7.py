"""HL7 v2 in the notifications service, pure: framing, checks, parsing, severity, ACKs, dispatch."""

from __future__ import annotations

import datetime as dt

import hl7
import pytest
from pymongo.errors import AutoReconnect

from services.kit.errors import Unavailable
from services.notifications import hl7v2
from services.notifications.lab_domain import ABNORMAL, INFO, URGENT, flag_severity, worst
from services.notifications.lab_hl7 import reports_from_oru
from services.notifications.mllp import FrameDecoder, FrameTooLarge, MessageTypes, frame
from tests.e2e.lab_messages import CBC, POTASSIUM_CRITICAL, POTASSIUM_TEST, oru
from tests.helpers import msa


def parse_ack(raw: bytes) -> hl7.Message:
    return hl7.parse(raw.decode("ascii"))


def err_code(raw: bytes) -> str:
    return str(parse_ack(raw).segment("ERR")(3)(1)(1))


# --- framing ------------------------------------------------------------------------------------


def test_a_frame_split_over_many_reads_is_put_back_together():
    decoder = FrameDecoder(1024)
    data = frame(b"MSH|one\rPID|1")
    frames = []
    for i in range(len(data)):
        frames += decoder.feed(data[i : i + 1])
    assert frames == [b"MSH|one\rPID|1"]


def test_several_frames_in_one_read_come_out_in_order_and_noise_between_is_dropped():
    decoder = FrameDecoder(1024)
    frames = decoder.feed(b"\r\n" + frame(b"A") + b"noise" + frame(b"B") + frame(b"CD")[:3])
    assert frames == [b"A", b"B"]
    assert decoder.pending == 2
    assert decoder.feed(b"\x1c\r") == [b"CD"]
    assert decoder.dropped == 1  # the CR after the last end block: counted since the last frame began
    decoder.feed(b"noise" * 10)
    assert decoder.dropped == 51
    assert decoder.feed(frame(b"E")) == [b"E"] and decoder.dropped == 1


def test_a_long_lived_connection_never_adds_up_to_the_junk_limit():
    decoder = FrameDecoder(64)
    for _ in range(200):
        assert decoder.feed(frame(b"MSH|x") + b"\n") == [b"MSH|x"]
    assert decoder.dropped == 2


def test_a_frame_over_the_limit_is_refused_before_it_is_buffered_whole():
    decoder = FrameDecoder(10)
    decoder.feed(b"\x0b12345")
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"678901")


# --- checks and parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize("separator", ["\r", "\n", "\r\n"])
def test_every_segment_separator_gives_the_same_segments(separator):
    message = hl7v2.read_message(oru(separator=separator, control_id="C1").encode())
    assert [str(s[0]) for s in message.message] == ["MSH", "PID", "ORC", "OBR", "OBX", "OBX", "OBX", "OBX", "OBX"]
    assert message.header.control_id == "C1"
    assert (message.header.message_type, message.header.trigger) == ("ORU", "R01")
    assert message.header.sending_facility == "QUEST_LAB" and message.header.receiving_facility == "RIVERBEND"


def test_python_hl7_alone_would_see_one_segment_with_newline_separators():
    """The library behaviour normalize_segments exists for: it splits on \\r only."""
    assert len(hl7.parse(oru(separator="\n"))) == 1


@pytest.mark.parametrize(
    ("text", "ack_code", "error"),
    [
        ("PID|1||X\rOBR|1", "AR", "100"),  # no MSH
        ("MSH|^~", "AR", "100"),  # truncated
        ("MSH|^~\\&", "AR", "102"),  # encoding characters never closed by a field separator
        ("MSH|^^\\&|A|B|C|D|20260101||ORU^R01|X1|P|2.5.1", "AR", "102"),  # repeated encoding character
        ("MSH|^~|A|B|C|D|20260101||ORU^R01|X1|P|2.5.1", "AR", "102"),  # too few
        ("MSH|^~\\A|A|B|C|D|20260101||ORU^R01|X1|P|2.5.1", "AR", "102"),  # alphanumeric
        ("MSH|^~\\&|A|B|C|D|20260101||ORU^R01||P|2.5.1", "AR", "101"),  # no MSH-10
        ("MSH|^~\\&|A||C|D|20260101||ORU^R01|X1|P|2.5.1", "AR", "101"),  # no sending facility
        ("MSH|^~\\&|A|B|C|D|20260101||ORU^R01|X1|Q|2.5.1", "AR", "202"),  # processing id
        ("MSH|^~\\&|A|B|C|D|20260101||ORU^R01|X1|P|3.0", "AR", "203"),  # not v2
        ("MSH|^~\\&|A|B|C|D|20260101||ORU^R01|X1|P|2.5.1\rPID|1||J\x00", "AE", "102"),  # control character
    ],
)
def test_malformed_messages_are_refused_with_a_reason(text, ack_code, error):
    with pytest.raises(hl7v2.Hl7Rejection) as caught:
        hl7v2.read_message(text.encode("latin-1"))
    assert (caught.value.ack_code, caught.value.error_code) == (ack_code, error)


def test_bytes_that_are_not_the_declared_charset_are_refused_naming_the_field():
    text = oru(control_id="UTF-1", patient="MRN-Zoë").replace("|2.5.1", "|2.5.1||||||UNICODE UTF-8", 1)
    raw = text.encode("latin-1")  # declared UTF-8, sent Latin-1
    with pytest.raises(hl7v2.Hl7Rejection) as caught:
        hl7v2.read_message(raw)
    assert (caught.value.ack_code, caught.value.error_code, caught.value.location) == ("AE", "102", "PID^1^3")
    ack = hl7v2.rejection_ack(caught.value)
    assert msa(ack)[:2] == ("AE", "UTF-1")


@pytest.mark.parametrize(
    ("declared", "encoding"),
    [("", "utf-8"), ("", "latin-1"), ("UNICODE UTF-8", "utf-8"), ("8859/1", "latin-1"), ("ISO IR100", "latin-1")],
)
def test_a_name_with_accents_reads_the_same_in_every_declared_charset(declared, encoding):
    text = oru(control_id="UTF-2").replace("DOE^JANE^Q", "MUÑOZ^JOSÉ")
    if declared:
        text = text.replace("|2.5.1", f"|2.5.1||||||{declared}", 1)
    message = hl7v2.read_message(text.encode(encoding))
    assert str(message.message.segment("PID")(5)) == "MUÑOZ^JOSÉ"
    assert message.header.charset == declared


def test_an_unknown_charset_is_rejected_and_still_echoes_the_control_id():
    raw = oru(control_id="CS-1").replace("|2.5.1", "|2.5.1||||||EBCDIC", 1).encode()
    with pytest.raises(hl7v2.Hl7Rejection) as caught:
        hl7v2.read_message(raw)
    assert (caught.value.ack_code, caught.value.error_code, caught.value.location) == ("AR", "103", "MSH^1^18")
    assert msa(hl7v2.rejection_ack(caught.value))[:2] == ("AR", "CS-1")


# --- acknowledgements ------------------------------------------------------------------------------


def test_an_accept_echoes_the_control_id_and_swaps_the_parties():
    header = hl7v2.read_message(oru(control_id="CTRL-9").encode()).header
    raw = hl7v2.build_ack(header, now=dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.UTC), ack_control_id="A1")
    ack = parse_ack(raw)
    msh = ack.segment("MSH")
    assert raw.decode() == (
        "MSH|^~\\&|BOARD|RIVERBEND|LABSYS|QUEST_LAB|20261126080000+0000||ACK^R01^ACK|A1|P|2.5.1\rMSA|AA|CTRL-9\r"
    )
    assert str(msh(9)) == "ACK^R01^ACK"
    assert not [s for s in ack if str(s[0]) == "ERR"]


def test_a_refusal_carries_its_reason_in_msa_3_and_an_err_segment_escaped():
    header = hl7v2.read_message(oru(control_id="CTRL-10").encode()).header
    raw = hl7v2.build_ack(header, "AE", "bad | value ^ here", error_code="101", location="PID^1^3")
    code, control_id, text = msa(raw)
    assert (code, control_id, text) == ("AE", "CTRL-10", "bad \\F\\ value \\S\\ here")
    err = parse_ack(raw).segment("ERR")
    assert str(err(2)) == "PID^1^3" and err_code(raw) == "101" and str(err(4)) == "E"


def test_a_frame_without_msh_is_answered_with_an_empty_msa_2():
    acks = MessageTypes().acknowledge(b"garbage that is no message")
    assert msa(acks)[:2] == ("AR", "") and err_code(acks) == "100"


# --- dispatch --------------------------------------------------------------------------------------


def test_dispatch_answers_aa_after_the_handler_returns_and_ar_for_unknown_types():
    seen = []
    types = MessageTypes()
    types.register("ORU", "R01", seen.append)
    assert msa(types.acknowledge(oru(control_id="D1").encode()))[:2] == ("AA", "D1")
    assert [m.header.control_id for m in seen] == ["D1"]
    siu = oru(control_id="D2").replace("ORU^R01^ORU_R01", "SIU^S12")
    answer = types.acknowledge(siu.encode())
    assert msa(answer)[:2] == ("AR", "D2") and err_code(answer) == "200"
    other_trigger = oru(control_id="D3").replace("ORU^R01^ORU_R01", "ORU^R30")
    assert err_code(types.acknowledge(other_trigger.encode())) == "201"
    with pytest.raises(ValueError):
        types.register("ORU", "R01", seen.append)


@pytest.mark.parametrize(
    ("failure", "ack_code"),
    [(AutoReconnect("down"), "AR"), (Unavailable("dependency_unavailable", "down"), "AR"), (KeyError("bug"), "AR")],
)
def test_an_outage_or_a_bug_in_a_handler_is_a_rejection_to_send_again(failure, ack_code):
    def handler(_message):
        raise failure

    types = MessageTypes()
    types.register("ORU", "R01", handler)
    answer = types.acknowledge(oru(control_id="F1").encode())
    assert msa(answer)[:2] == (ack_code, "F1") and err_code(answer) == "207"


def test_a_handlers_own_refusal_is_sent_as_it_is():
    def handler(_message):
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "PID-3 patient identifier is required", "PID^1^3")

    types = MessageTypes()
    types.register("ORU", "R01", handler)
    answer = types.acknowledge(oru(control_id="F2").encode())
    assert msa(answer) == ("AE", "F2", "PID-3 patient identifier is required") and err_code(answer) == "101"


# --- lab results ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "severity"),
    [
        ("HH", URGENT), ("LL", URGENT), ("AA", URGENT),
        ("H", ABNORMAL), ("L", ABNORMAL), ("A", ABNORMAL), ("<", ABNORMAL), (">", ABNORMAL), ("ZZ", ABNORMAL),
        ("N", INFO), ("", INFO), ("S", INFO), ("R", INFO), ("U", INFO), ("W", INFO), ("hh", URGENT),
    ],
)  # fmt: skip
def test_abnormal_flags_map_to_severity(flag, severity):
    assert flag_severity(flag) == severity


def test_a_results_severity_is_the_worst_of_its_lines():
    assert worst([INFO, ABNORMAL, INFO]) == ABNORMAL
    assert worst([ABNORMAL, URGENT]) == URGENT
    assert worst([]) == INFO


def test_a_cbc_panel_is_one_order_with_every_line_and_mixed_flags():
    (report,) = reports_from_oru(hl7v2.read_message(oru(order="ORD77", patient="MRN1").encode()))
    assert report.order_number == "ORD77" and report.patient_ref == "MRN1"
    assert report.test_code == "58410-2" and report.test_name == "CBC panel - Blood by Automated count"
    assert report.status == "final"
    assert [(o.value, o.units, o.flags) for o in report.observations] == [
        ("11.8", "10*3/uL", ("H",)),
        ("4.62", "10*6/uL", ("N",)),
        ("11.2", "g/dL", ("L",)),
        ("38.1", "%", ()),
        ("18", "10*3/uL", ("LL",)),
    ]
    assert report.severity == URGENT and report.counts == (2, 1)
    assert len(CBC) == 5


def test_a_single_critical_value_and_the_result_statuses():
    message = oru(observations=POTASSIUM_CRITICAL, test=POTASSIUM_TEST, status="P")
    (report,) = reports_from_oru(hl7v2.read_message(message.encode()))
    assert report.status == "preliminary" and report.severity == URGENT and report.test_name == "Potassium"
    corrected = oru(observations=POTASSIUM_CRITICAL, test=POTASSIUM_TEST, status="C", sent_at="20261126091500")
    (later,) = reports_from_oru(hl7v2.read_message(corrected.encode()))
    assert later.status == "corrected" and later.version > report.version


def test_repeated_flags_count_the_worst():
    line = "OBX|1|NM|2823-3^Potassium^LN||6.9|mmol/L|3.5-5.1|H~HH|||F"
    (report,) = reports_from_oru(hl7v2.read_message(oru(observations=[line]).encode()))
    assert report.observations[0].flags == ("H", "HH") and report.severity == URGENT


@pytest.mark.parametrize(
    ("edit", "error", "location"),
    [
        (lambda m: m.replace("PID|1||MRN48213^^^RIVERBEND^MR", "PID|1||"), "101", "PID^1^3"),
        (lambda m: "\r".join(s for s in m.split("\r") if not s.startswith("PID")), "101", "PID"),
        (lambda m: "\r".join(s for s in m.split("\r") if not s.startswith(("OBR", "OBX"))), "101", "OBR"),
        (lambda m: m.replace("|||F\rOBX|1", "|||Q\rOBX|1", 1), "103", "OBR^1"),
    ],
)
def test_an_oru_missing_what_it_needs_is_an_error_naming_it(edit, error, location):
    message = hl7v2.read_message(edit(oru()).encode())
    with pytest.raises(hl7v2.Hl7Rejection) as caught:
        reports_from_oru(message)
    assert (caught.value.ack_code, caught.value.error_code, caught.value.location) == ("AE", error, location)


def test_broken_encoding_characters_are_rejected_naming_the_message_and_its_parties():
    raw = oru(control_id="ENC-7").replace("MSH|^~\\&|", "MSH|^^\\&|", 1).encode()
    answer = MessageTypes().acknowledge(raw)
    assert msa(answer)[:2] == ("AR", "ENC-7") and err_code(answer) == "102"
    msh = parse_ack(answer).segment("MSH")
    assert (str(msh(3)), str(msh(4)), str(msh(5)), str(msh(6))) == ("BOARD", "RIVERBEND", "LABSYS", "QUEST_LAB")


def test_each_order_of_a_message_is_its_own_result_and_escapes_are_undone():
    message = oru(order="ORD-A", observations=POTASSIUM_CRITICAL, test=POTASSIUM_TEST)
    second = [
        "OBR|2|PLC-B|ORD-B|5902-2^Prothrombin time^LN|||202611260730|||||||||||||||20261126081500|||P",
        "OBX|1|ST|5902-2^Prothrombin time^LN||see note \\T\\ call lab|s|11\\S\\13|H|||P",
    ]
    (potassium, prothrombin) = reports_from_oru(hl7v2.read_message((message + "\r".join(second)).encode()))
    assert (potassium.order_number, potassium.status, potassium.severity) == ("ORD-A", "final", URGENT)
    assert (prothrombin.order_number, prothrombin.status, prothrombin.severity) == ("ORD-B", "preliminary", ABNORMAL)
    (line,) = prothrombin.observations
    assert (line.value, line.reference_range) == ("see note & call lab", "11^13")
