"""The lab interface as a hospital interface engineer tests it from the outside: HL7 v2.5.1 ORU^R01
written the way reference labs, Epic Beaker, Cerner and Mirth-relayed feeds write them, sent over
MLLP with python-hl7's own client and with hand-framed bytes on raw sockets, acknowledgements
parsed with `hl7.parse`, results checked on the flagged staff's boards and in the full view.

Each test uses its own control ids, order numbers and record numbers, so tests never meet."""

from __future__ import annotations

import re
import socket

import hl7
import pytest
import requests
from hl7.client import MLLPClient
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.real_sender_messages import (
    CBC_TEST,
    CLINIC_APPLICATION,
    CR,
    CRLF,
    LAB_APPLICATION,
    LF,
    LIPID_TEST,
    PATHOLOGY_TEST,
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
    pv1,
    sft,
    sodium,
    spm,
    unique,
)
from tests.helpers import msa
from tests.waits import Worker, wait_until

START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\r"
WAIT_S = 20


# --- the wire -------------------------------------------------------------------------------------


def parse_ack(payload: bytes) -> hl7.Message:
    """One ACK (without its MLLP frame) as python-hl7 reads it."""
    return hl7.parse(payload.decode("utf-8", errors="replace"))


def unframe(data: bytes) -> bytes:
    assert data.startswith(START_BLOCK) and data.endswith(END_BLOCK), data[:80]
    return data[1:-2]


def exchange(client: MLLPClient, payload: str | bytes) -> hl7.Message:
    """Send with python-hl7's client; its send() returns one recv(), so read on to the end block."""
    data = client.send_message(payload)
    while not data.endswith(END_BLOCK):
        more = client.socket.recv(4096)
        assert more, f"the listener closed the connection mid-ACK: {data!r}"
        data += more
    return parse_ack(unframe(data))


class Wire:
    """A raw MLLP connection: frames written byte by byte as a test wants, ACK frames read whole."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.write(START_BLOCK + payload + END_BLOCK)

    def read_ack(self) -> hl7.Message:
        while END_BLOCK not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, f"the listener closed the connection without an ACK (had {self.buffer[:200]!r})"
            self.buffer += chunk
        end = self.buffer.index(END_BLOCK)
        data, self.buffer = self.buffer[:end], self.buffer[end + len(END_BLOCK) :]
        start = data.find(START_BLOCK)
        assert start != -1, f"an ACK frame without its start block: {data[:200]!r}"
        return parse_ack(data[start + 1 :])

    def exchange(self, payload: bytes) -> hl7.Message:
        self.send(payload)
        return self.read_ack()


@pytest.fixture
def client(stack):
    """python-hl7's own MLLP client, one connection per test."""
    with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as mllp:
        mllp.socket.settimeout(15)
        yield mllp


@pytest.fixture
def wire(stack):
    connection = Wire(stack.config.ports.notifications_mllp)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def notifications_db(stack, mongo_client):
    return mongo_client[f"{stack.db_prefix}notifications"]


def stored(db) -> int:
    """Lab results the service holds (a full count: tests only)."""
    return db.lab_results.count_documents({})


def err(ack: hl7.Message) -> tuple[str, str]:
    """(ERR-2 location, ERR-3 code) of the ACK's ERR segment."""
    segment = ack.segment("ERR")
    return str(segment[2]), str(segment[3]).split("^")[0]


# --- boards and the full view -----------------------------------------------------------------------


def lab_item(client, mrn: str, status: str | None = None) -> dict | None:
    """The caller's lab board item about `mrn` (every page), or None; with `status`, only in that status."""
    params: dict = {"folder": "lab", "limit": 100}
    for _ in range(20):
        page = client.items(**params)
        for item in page["items"]:
            if item.get("summary", "").startswith(f"Patient {mrn}:"):
                return item if status is None or item.get("status") == status else None
        if not page.get("next_cursor"):
            return None
        params["cursor"] = page["next_cursor"]
    return None


def lab_items(client, mrn: str) -> list[dict]:
    found, params = [], {"folder": "lab", "limit": 100}
    for _ in range(20):
        page = client.items(**params)
        found += [i for i in page["items"] if i.get("summary", "").startswith(f"Patient {mrn}:")]
        if not page.get("next_cursor"):
            return found
        params["cursor"] = page["next_cursor"]
    return found


def wait_item(client, mrn: str, status: str | None = None) -> dict:
    return wait_until(lambda: lab_item(client, mrn, status), timeout=WAIT_S)


def order_id(opener, mrn: str) -> str:
    """The order id of `mrn`'s result: the board item's source_ref (opened by `opener`, so another
    reader's unread state is left alone); its link points at the full view."""
    item = wait_item(opener, mrn)
    reply = opener.get(f"/api/v1/board/items/{item['id']}")
    assert reply.status_code == 200, reply.text
    detail = reply.json()
    assert any(link["url"].endswith(f"/api/v1/lab/results/{detail['source_ref']}") for link in detail["links"])
    return detail["source_ref"]


def full_result(client, oid: str) -> dict:
    reply = client.get(f"/api/v1/lab/results/{oid}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def barrier(client: MLLPClient, reader) -> None:
    """A result for a fresh patient, waited for on `reader`'s board: deliveries asked for before it
    have had their turn (used before asserting that something did NOT change)."""
    mrn = unique("BAR")
    ack = exchange(client, oru(control_id=unique("BARRIER"), patient_ids=mr(mrn), observations=[sodium(1)]))
    assert msa(ack)[0] == "AA"
    wait_item(reader, mrn)


# --- 1. several patients in one ORU^R01 -----------------------------------------------------------------


def three_patient_batch(control_id: str, mrns: list[str], orders: list[str]) -> str:
    """A reference lab's batch: three PATIENT_RESULT groups (PID, ORC, OBR, OBX...) in one message."""
    names = ["ALPHA^ANN^^^^^L", "BRAVO^BEN^^^^^L", "CHARLIE^CARA^^^^^L"]
    observations = [[potassium(1, "6.9", "HH")], [sodium(1, "139", "N")], [cholesterol(1, "242", "H")]]
    tests = [POTASSIUM_TEST, POTASSIUM_TEST, LIPID_TEST]
    segments = [msh(control_id)]
    for n, (mrn, order) in enumerate(zip(mrns, orders, strict=True)):
        segments += [
            pid(f"{unique('ACC')}^^^LAB^AN~{mr(mrn)}", name=names[n], set_id=str(n + 1)),
            orc(f"P{order}", order),
            obr(f"P{order}", order, tests[n], set_id=str(n + 1)),
            *observations[n],
        ]
    return message(*segments)


def test_each_patient_of_a_batched_result_gets_their_own_board_item(client, reyes):
    mrns, orders = [unique("MRA"), unique("MRB"), unique("MRC")], [unique("FA"), unique("FB"), unique("FC")]
    control_id = unique("BATCH")
    assert msa(exchange(client, three_patient_batch(control_id, mrns, orders)))[:2] == ("AA", control_id)
    first, second, third = (wait_item(reyes, m) for m in mrns)
    assert first["summary"] == f"Patient {mrns[0]}: 1 critical"
    assert second["summary"] == f"Patient {mrns[1]}: no abnormal flags"
    assert third["summary"] == f"Patient {mrns[2]}: 1 abnormal"
    assert len({first["id"], second["id"], third["id"]}) == 3


def test_second_patient_result_is_filed_under_second_patient(client, reyes, kim):
    mrns, orders = [unique("MRA"), unique("MRB"), unique("MRC")], [unique("FA"), unique("FB"), unique("FC")]
    control_id = unique("BATCH")
    assert msa(exchange(client, three_patient_batch(control_id, mrns, orders)))[0] == "AA"
    views = [full_result(reyes, order_id(kim, m)) for m in mrns]
    assert [v["patient_ref"] for v in views] == mrns
    second = views[1]
    assert second["order_number"] == orders[1]
    assert [o["value"] for o in second["observations"]] == ["139"]
    assert "BRAVO" in second["patient_name"] and "ALPHA" not in second["patient_name"]


# --- 2. the patient identifier, by type ----------------------------------------------------------------


@pytest.mark.parametrize(
    "identifiers",
    [
        "{acc}^^^LAB^AN~{mrn}^^^RIVERBEND^MR",
        "{pi}^^^CERNER^PI~{acc}^^^LAB&2.16.840.1.113883.3.1&ISO^AN~{mrn}^^^RIVERBEND&2.16.840.1.113883.3.7.1&ISO^MR",
    ],
    ids=["account-then-mr", "mr-last-with-full-hd-authority"],
)
def test_the_medical_record_number_is_picked_by_type_from_repeated_identifiers(client, reyes, kim, identifiers):
    mrn = unique("MRN")
    ids = identifiers.format(acc=unique("ACC"), pi=unique("PI"), mrn=mrn)
    ack = exchange(client, oru(control_id=unique("PID3"), patient_ids=ids, observations=[potassium()]))
    assert msa(ack)[0] == "AA"
    assert wait_item(reyes, mrn)["summary"].startswith(f"Patient {mrn}:")
    assert full_result(reyes, order_id(kim, mrn))["patient_ref"] == mrn


@pytest.mark.parametrize("identifier", ["{id}", "{id}^^^RIVERBEND"], ids=["bare", "with-authority-no-type"])
def test_a_lone_identifier_without_type_is_the_patient_reference(client, reyes, kim, identifier):
    mrn = unique("LONE")
    ids = identifier.format(id=mrn)
    ack = exchange(client, oru(control_id=unique("LONE"), patient_ids=ids, observations=[sodium(1)]))
    assert msa(ack)[0] == "AA"
    wait_item(reyes, mrn)
    assert full_result(reyes, order_id(kim, mrn))["patient_ref"] == mrn


@pytest.mark.parametrize(
    "identifiers",
    ["{a}^^^LAB^AN~{b}^^^CERNER^PI", "{a}^^^LAB~{b}^^^LAB^AN", "{a}~{b}"],
    ids=["account-and-internal", "untyped-beside-account", "two-untyped"],
)
def test_several_identifiers_without_a_medical_record_number_are_refused_at_pid_3(
    client, notifications_db, identifiers
):
    control_id = unique("NOMR")
    ids = identifiers.format(a=unique("A"), b=unique("B"))
    before = stored(notifications_db)
    ack = exchange(client, oru(control_id=control_id, patient_ids=ids, observations=[potassium()]))
    assert msa(ack)[:2] == ("AE", control_id)
    assert err(ack)[0] == "PID^1^3"
    assert stored(notifications_db) == before


# --- 3. versions ----------------------------------------------------------------------------------------


def test_final_replaces_preliminary_even_when_its_report_time_is_earlier(client, reyes, kim):
    mrn, order = unique("VER"), unique("F")
    prelim = oru(
        control_id=unique("PRE"), patient_ids=mr(mrn), order=order, status="P",
        observations=[potassium(1, "5.9", "H", status="P")],
        reported_at="20261126100000-0600", sent_at="20261126100500-0600",
    )  # fmt: skip
    final = oru(
        control_id=unique("FIN"), patient_ids=mr(mrn), order=order, status="F",
        observations=[potassium(1, "6.9", "HH")],
        reported_at="20261126090000-0600", sent_at="20261126090500-0600",
    )  # fmt: skip
    assert msa(exchange(client, prelim))[0] == "AA"
    wait_item(reyes, mrn, "preliminary")
    assert msa(exchange(client, final))[0] == "AA"
    item = wait_item(reyes, mrn, "final")
    assert item["severity"] == "urgent"
    view = full_result(reyes, order_id(kim, mrn))
    assert view["status"] == "final" and view["observations"][0]["value"] == "6.9"


def test_final_with_another_utc_offset_replaces_preliminary(client, reyes, kim):
    """The final's wall clock reads later (+0100) but is an earlier instant than the preliminary's."""
    mrn, order = unique("VER"), unique("F")
    prelim = oru(
        control_id=unique("PRE"), patient_ids=mr(mrn), order=order, status="P",
        observations=[potassium(1, "5.9", "H", status="P")],
        reported_at="20261126100000-0600", sent_at="20261126100100-0600",
    )  # fmt: skip
    final = oru(
        control_id=unique("FIN"), patient_ids=mr(mrn), order=order, status="F",
        observations=[potassium(1, "6.9", "HH")],
        reported_at="20261126160000+0100", sent_at="20261126160100+0100",
    )  # fmt: skip
    assert msa(exchange(client, prelim))[0] == "AA"
    wait_item(reyes, mrn, "preliminary")
    assert msa(exchange(client, final))[0] == "AA"
    wait_item(reyes, mrn, "final")
    view = full_result(reyes, order_id(kim, mrn))
    assert view["status"] == "final" and view["observations"][0]["value"] == "6.9"


def test_preliminary_arriving_after_final_does_not_replace_it(client, reyes, kim):
    mrn, order = unique("VER"), unique("F")
    final = oru(
        control_id=unique("FIN"), patient_ids=mr(mrn), order=order, status="F",
        observations=[potassium(1, "6.9", "HH")], reported_at="20261126100000-0600",
    )  # fmt: skip
    late_prelim = oru(
        control_id=unique("PRE"), patient_ids=mr(mrn), order=order, status="P",
        observations=[potassium(1, "5.9", "H", status="P")], reported_at="20261126110000-0600",
    )  # fmt: skip
    assert msa(exchange(client, final))[0] == "AA"
    wait_item(reyes, mrn, "final")
    assert msa(exchange(client, late_prelim))[0] == "AA"
    view = full_result(reyes, order_id(kim, mrn))
    assert view["status"] == "final" and view["observations"][0]["value"] == "6.9"
    barrier(client, reyes)
    item = lab_item(reyes, mrn)
    assert item["status"] == "final" and item["severity"] == "urgent"


def test_a_time_without_offset_is_local_time_of_the_agency(client, reyes, kim):
    """08:00-0500 is 13:00Z; 07:30 without offset is 13:30Z in Chicago (CST, -0600): the later one.
    Read as UTC (07:30Z) or New York (12:30Z) it would be the older one."""
    mrn, order = unique("TZ"), unique("F")
    with_offset = oru(
        control_id=unique("TZA"), patient_ids=mr(mrn), order=order, status="P",
        observations=[potassium(1, "5.0", "N", status="P")],
        reported_at="20261126080000-0500", sent_at="20261126080100-0500",
    )  # fmt: skip
    local = oru(
        control_id=unique("TZB"), patient_ids=mr(mrn), order=order, status="P",
        observations=[potassium(1, "5.6", "H", status="P")],
        reported_at="20261126073000", sent_at="20261126073100",
    )  # fmt: skip
    assert msa(exchange(client, with_offset))[0] == "AA"
    wait_item(reyes, mrn, "preliminary")
    assert msa(exchange(client, local))[0] == "AA"
    view = full_result(reyes, order_id(kim, mrn))
    assert view["observations"][0]["value"] == "5.6"
    wait_until(lambda: (lab_item(reyes, mrn) or {}).get("summary") == f"Patient {mrn}: 1 abnormal", timeout=WAIT_S)


def test_a_correction_puts_the_item_back_at_the_top_unread(client, reyes, kim):
    mrn, order = unique("COR"), unique("F")
    final = oru(
        control_id=unique("FIN"), patient_ids=mr(mrn), order=order,
        observations=[potassium(1, "6.9", "HH")], reported_at="20261126090000-0600",
    )  # fmt: skip
    assert msa(exchange(client, final))[0] == "AA"
    item = wait_item(reyes, mrn)
    assert reyes.get(f"/api/v1/board/items/{item['id']}").status_code == 200  # read it
    other = unique("NEWER")
    assert (
        msa(exchange(client, oru(control_id=unique("N"), patient_ids=mr(other), observations=[sodium(1)])))[0] == "AA"
    )
    wait_item(reyes, other)
    assert reyes.items(folder="lab", limit=1)["items"][0]["summary"].startswith(f"Patient {other}:")

    corrected = oru(
        control_id=unique("COR"), patient_ids=mr(mrn), order=order, status="C",
        observations=[potassium(1, "4.9", "N", status="C")], reported_at="20261126100000-0600",
    )  # fmt: skip
    assert msa(exchange(client, corrected))[0] == "AA"
    again = wait_item(reyes, mrn, "corrected")
    assert again["id"] == item["id"] and again["read"] is False
    top = reyes.items(folder="lab", limit=1)["items"][0]
    assert top["id"] == item["id"]
    assert full_result(reyes, order_id(kim, mrn))["observations"][0]["value"] == "4.9"


# --- 4. acknowledged means processed --------------------------------------------------------------------


def test_a_reused_control_id_with_other_content_is_processed(client, reyes, kim, notifications_db):
    control_id = unique("REUSE")
    first, second = unique("RUA"), unique("RUB")
    before = stored(notifications_db)
    ack = exchange(client, oru(control_id=control_id, patient_ids=mr(first), observations=[potassium()]))
    assert msa(ack)[:2] == ("AA", control_id)
    ack = exchange(client, oru(control_id=control_id, patient_ids=mr(second), observations=[sodium(1, "151", "H")]))
    assert msa(ack)[:2] == ("AA", control_id)
    assert wait_item(reyes, second)["summary"] == f"Patient {second}: 1 abnormal"
    assert full_result(reyes, order_id(kim, second))["observations"][0]["value"] == "151"
    assert stored(notifications_db) == before + 2


def test_the_identical_message_repeated_is_stored_once(client, reyes, notifications_db):
    mrn, control_id = unique("DUP"), unique("DUP")
    payload = oru(control_id=control_id, patient_ids=mr(mrn), observations=[potassium()]).encode("ascii")
    before = stored(notifications_db)
    assert msa(exchange(client, payload))[:2] == ("AA", control_id)
    assert msa(exchange(client, payload))[:2] == ("AA", control_id)
    assert stored(notifications_db) == before + 1
    wait_item(reyes, mrn)
    barrier(client, reyes)
    assert len(lab_items(reyes, mrn)) == 1


# --- 5. withdrawn values --------------------------------------------------------------------------------


def test_a_withdrawn_value_has_a_reason_no_value_and_is_not_critical(client, reyes, kim):
    mrn, order = unique("WD"), unique("F")
    final = oru(
        control_id=unique("FIN"), patient_ids=mr(mrn), order=order,
        observations=[potassium(1, "6.9", "HH"), sodium(2, "139", "N")], reported_at="20261126090000-0600",
    )  # fmt: skip
    assert msa(exchange(client, final))[0] == "AA"
    assert wait_item(reyes, mrn)["severity"] == "urgent"
    # The lab withdraws the potassium (hemolyzed specimen): OBX-11 W, the wrong value still in OBX-5.
    correction = oru(
        control_id=unique("COR"), patient_ids=mr(mrn), order=order, status="C",
        observations=[potassium(1, "6.9", "HH", status="W"), sodium(2, "139", "N", status="C")],
        reported_at="20261126100000-0600",
    )  # fmt: skip
    assert msa(exchange(client, correction))[0] == "AA"
    item = wait_item(reyes, mrn, "corrected")
    assert item["severity"] != "urgent" and "critical" not in item["summary"]
    view = full_result(reyes, order_id(kim, mrn))
    withdrawn, kept = view["observations"]
    assert withdrawn["retracted"] and withdrawn["value"] == ""
    assert withdrawn["severity"] != "urgent"
    assert kept["value"] == "139" and not kept.get("retracted")
    assert view["severity"] != "urgent"


@pytest.mark.parametrize("obx_status", ["W", "D"])
def test_a_result_whose_every_value_is_withdrawn_is_retracted(client, reyes, kim, obx_status):
    mrn, order = unique("RET"), unique("F")
    final = oru(
        control_id=unique("FIN"), patient_ids=mr(mrn), order=order, test=CBC_TEST,
        observations=[hemoglobin(1, "13.1", "N"), platelets(2, "18", "LL")], reported_at="20261126090000-0600",
    )  # fmt: skip
    assert msa(exchange(client, final))[0] == "AA"
    assert wait_item(reyes, mrn)["severity"] == "urgent"
    withdrawal = oru(
        control_id=unique("RET"), patient_ids=mr(mrn), order=order, test=CBC_TEST, status="C",
        observations=[hemoglobin(1, "13.1", "N", status=obx_status), platelets(2, "18", "LL", status=obx_status)],
        reported_at="20261126100000-0600",
    )  # fmt: skip
    assert msa(exchange(client, withdrawal))[0] == "AA"
    item = wait_item(reyes, mrn, "retracted")
    assert item["severity"] != "urgent"
    assert "withdrawn" in item["summary"].lower()
    view = full_result(reyes, order_id(kim, mrn))
    assert view["status"] == "retracted"
    assert all(o["retracted"] and o["value"] == "" for o in view["observations"])


# --- 6. processing id ------------------------------------------------------------------------------------


@pytest.mark.parametrize("processing_id", ["T", "D"])
def test_training_and_debugging_messages_are_refused_ar_202(client, notifications_db, processing_id):
    control_id = unique("PROC")
    before = stored(notifications_db)
    raw = oru(control_id=control_id, patient_ids=mr(unique("PRC")), observations=[potassium()],
              processing_id=processing_id)  # fmt: skip
    ack = exchange(client, raw)
    assert msa(ack)[:2] == ("AR", control_id)
    assert err(ack)[1] == "202"
    assert stored(notifications_db) == before


# --- 7. notes ---------------------------------------------------------------------------------------------


def test_notes_after_obr_are_report_comments_and_after_obx_observation_comments(client, reyes, kim):
    mrn, order = unique("NTE"), unique("F")
    raw = message(
        msh(unique("NTE")),
        pid(f"{unique('ACC')}^^^LAB^AN~{mr(mrn)}"),
        orc(f"P{order}", order),
        obr(f"P{order}", order, POTASSIUM_TEST),
        nte(1, "Specimen received slightly hemolyzed."),
        nte(2, "Fasting \\T\\ non-fasting reference ranges apply."),
        potassium(1, "6.9", "HH"),
        nte(1, "Repeated and verified.\\.br\\Called to and read back by RN KIM 11/26/2026 08:12."),
        sodium(2, "139", "N"),
        spm(f"S{order}"),
    )
    assert msa(exchange(client, raw))[0] == "AA"
    wait_item(reyes, mrn)
    view = full_result(reyes, order_id(kim, mrn))
    assert view["comments"] == [
        "Specimen received slightly hemolyzed.",
        "Fasting & non-fasting reference ranges apply.",
    ]
    potassium_notes, sodium_notes = (o["comments"] for o in view["observations"])
    assert len(potassium_notes) == 1
    assert "Repeated and verified." in potassium_notes[0] and "Called to and read back by RN KIM" in potassium_notes[0]
    assert "\\.br\\" not in potassium_notes[0]
    assert sodium_notes == []


# --- 8. character sets -------------------------------------------------------------------------------------


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
        ("ASCII", "utf-8"),  # declared ASCII reads as absent does: accented names are not lost
    ],
    ids=[
        "unicode-utf8",
        "utf8",
        "8859-1",
        "iso-8859-1",
        "iso-ir100",
        "absent-utf8-bytes",
        "absent-latin1-bytes",
        "ascii-declared-utf8-bytes",
    ],
)
def test_the_patient_name_is_read_in_the_declared_character_set(client, reyes, kim, charset, codec):
    mrn, control_id = unique("CS"), unique("CS")
    raw = oru(control_id=control_id, patient_ids=mr(mrn), observations=[sodium(1)], name="MUÑOZ^JOSÉ^^^^^L",
              charset=charset).encode(codec)  # fmt: skip
    assert msa(exchange(client, raw))[:2] == ("AA", control_id)
    wait_item(reyes, mrn)
    name = full_result(reyes, order_id(kim, mrn))["patient_name"]
    assert "MUÑOZ" in name and "JOSÉ" in name


def test_an_ascii_message_declared_ascii_is_accepted(client, reyes, kim):
    mrn, control_id = unique("ASC"), unique("ASC")
    raw = oru(control_id=control_id, patient_ids=mr(mrn), observations=[sodium(1)], name="MUNOZ^JOSE^^^^^L",
              charset="ASCII").encode("ascii")  # fmt: skip
    assert msa(exchange(client, raw))[:2] == ("AA", control_id)
    wait_item(reyes, mrn)
    assert "MUNOZ" in full_result(reyes, order_id(kim, mrn))["patient_name"]


@pytest.mark.parametrize(
    ("charset", "codec", "segment", "where"),
    [
        ("UNICODE UTF-8", "latin-1", "OBX", "value"),  # a Latin-1 µ (0xB5) where UTF-8 was declared
        ("UNICODE UTF-8", "latin-1", "PID", "name"),  # a Latin-1 Ñ (0xD1) in PID-5 where UTF-8 was declared
    ],
    ids=["utf8-declared-latin1-bytes-in-obx", "utf8-declared-latin1-bytes-in-pid"],
)
def test_bytes_that_are_not_in_the_declared_charset_are_ae_102_naming_the_field(
    client, notifications_db, charset, codec, segment, where
):
    control_id = unique("BADCS")
    note = "Reported in \u00b5g/dL" if where == "value" else "Reported in ug/dL"
    name = "MUÑOZ^JOSÉ^^^^^L" if where == "name" else "MUNOZ^JOSE^^^^^L"
    raw = oru(
        control_id=control_id, patient_ids=mr(unique("BC")), name=name, charset=charset,
        observations=[obx(1, "FE^Iron^L^2498-4^Iron SerPl-mCnc^LN", note, value_type="ST")],
    ).encode(codec)  # fmt: skip
    before = stored(notifications_db)
    ack = exchange(client, raw)
    assert msa(ack)[:2] == ("AE", control_id)
    location, code = err(ack)
    assert code == "102"
    assert location.startswith(segment), location
    if charset == "UNICODE UTF-8":
        assert location in (f"{segment}^1^5", segment), location
    assert stored(notifications_db) == before


def test_an_unknown_character_set_is_rejected_ar(client, notifications_db):
    control_id = unique("UNKCS")
    raw = oru(control_id=control_id, patient_ids=mr(unique("UC")), observations=[sodium(1)], charset="KLINGON-7")
    before = stored(notifications_db)
    ack = exchange(client, raw.encode("ascii"))
    assert msa(ack)[:2] == ("AR", control_id)
    assert stored(notifications_db) == before


# --- 9. framing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("writes", ["one-write", "two-writes"])
def test_a_start_block_inside_an_unfinished_frame_begins_a_new_frame(wire, reyes, writes):
    cut_mrn, mrn = unique("CUT"), unique("GOOD")
    cut = oru(control_id=unique("CUT"), patient_ids=mr(cut_mrn), observations=[potassium()]).encode("ascii")
    control_id = unique("GOOD")
    good = oru(control_id=control_id, patient_ids=mr(mrn), observations=[sodium(1)]).encode("ascii")
    truncated = START_BLOCK + cut[: len(cut) // 2]
    if writes == "one-write":
        wire.write(truncated + START_BLOCK + good + END_BLOCK)
    else:
        wire.write(truncated)
        wire.write(START_BLOCK + good + END_BLOCK)
    acks = [wire.read_ack()]
    if msa(acks[0])[1] != control_id:  # an answer about the abandoned frame may come first
        acks.append(wire.read_ack())
    assert msa(acks[-1])[:2] == ("AA", control_id), [str(a) for a in acks]
    wait_item(reyes, mrn)
    # The connection is in step: the next message gets the next ACK.
    next_id = unique("NEXT")
    after = oru(control_id=next_id, patient_ids=mr(unique("NX")), observations=[sodium(1)]).encode("ascii")
    assert msa(wire.exchange(after))[:2] == ("AA", next_id)


# --- 10. accept acknowledgement conditions (MSH-15) ----------------------------------------------------


def enhanced(accept_ack: str, *, mrn: str | None = None, valid: bool = True, **header) -> tuple[str, bytes]:
    """(control id, bytes) of a result asking for `accept_ack` (application acks: NE). Not `valid`:
    PID-3 holds no MR identifier among several (a content error)."""
    control_id = unique(f"E{accept_ack}")
    ids = mr(mrn or unique("EN")) if valid else f"{unique('A')}^^^LAB^AN~{unique('B')}^^^CERNER^PI"
    raw = oru(control_id=control_id, patient_ids=ids, observations=[sodium(1)],
              accept_ack=accept_ack, application_ack="NE", **header)  # fmt: skip
    return control_id, raw.encode("ascii")


def original(mrn: str | None = None) -> tuple[str, bytes]:
    control_id = unique("ORIG")
    raw = oru(control_id=control_id, patient_ids=mr(mrn or unique("OR")), observations=[sodium(1)])
    return control_id, raw.encode("ascii")


def test_accept_always_gets_a_commit_accept_and_the_result_is_stored(wire, reyes):
    mrn = unique("AL")
    control_id, raw = enhanced("AL", mrn=mrn)
    assert msa(wire.exchange(raw))[:2] == ("CA", control_id)
    wait_item(reyes, mrn)


def test_accept_always_reports_a_content_error_as_commit_error(wire, notifications_db):
    control_id, raw = enhanced("AL", valid=False)
    before = stored(notifications_db)
    assert msa(wire.exchange(raw))[:2] == ("CE", control_id)
    assert stored(notifications_db) == before


def test_accept_always_reports_a_rejection_as_commit_reject(wire, notifications_db):
    control_id, raw = enhanced("AL", processing_id="D")
    before = stored(notifications_db)
    ack = wire.exchange(raw)
    assert msa(ack)[:2] == ("CR", control_id)
    assert err(ack)[1] == "202"
    assert stored(notifications_db) == before


@pytest.mark.parametrize("valid", [True, False], ids=["success", "error"])
def test_accept_never_sends_no_ack_and_keeps_the_connection_open(wire, reyes, valid):
    mrn = unique("NE")
    _silent_id, silent = enhanced("NE", mrn=mrn, valid=valid)
    control_id, follow_up = original()
    wire.send(silent)
    wire.send(follow_up)
    assert msa(wire.read_ack())[:2] == ("AA", control_id)  # the first ACK on the wire is the second message's
    if valid:
        wait_item(reyes, mrn)


def test_error_only_is_silent_on_success(wire, reyes):
    mrn = unique("ER")
    _silent_id, silent = enhanced("ER", mrn=mrn)
    control_id, follow_up = original()
    wire.send(silent)
    wire.send(follow_up)
    assert msa(wire.read_ack())[:2] == ("AA", control_id)
    wait_item(reyes, mrn)


def test_error_only_reports_an_error(wire):
    control_id, raw = enhanced("ER", valid=False)
    assert msa(wire.exchange(raw))[:2] == ("CE", control_id)


def test_successful_only_acknowledges_success(wire, reyes):
    mrn = unique("SU")
    control_id, raw = enhanced("SU", mrn=mrn)
    assert msa(wire.exchange(raw))[:2] == ("CA", control_id)
    wait_item(reyes, mrn)


def test_successful_only_is_silent_on_error(wire):
    _silent_id, silent = enhanced("SU", valid=False)
    control_id, follow_up = original()
    wire.send(silent)
    wire.send(follow_up)
    assert msa(wire.read_ack())[:2] == ("AA", control_id)


# --- 11. the acknowledgement's own header ----------------------------------------------------------------

OFFSET_TIME = re.compile(r"^\d{12}(\d{2}(\.\d{1,4})?)?[+-]\d{4}$")


@pytest.mark.parametrize("outcome", ["AA", "AE", "AR"])
def test_the_ack_swaps_sender_and_receiver_with_every_hd_component(client, outcome):
    control_id = unique("HD")
    ids = mr(unique("HD")) if outcome != "AE" else f"{unique('A')}^^^LAB^AN~{unique('B')}^^^CERNER^PI"
    raw = oru(
        control_id=control_id, patient_ids=ids, observations=[sodium(1)],
        processing_id="T" if outcome == "AR" else "P",
        sending_application=LAB_APPLICATION, sending_facility=REFERENCE_LAB,
        receiving_application=CLINIC_APPLICATION, receiving_facility=RIVERBEND_HD,
    )  # fmt: skip
    ack = exchange(client, raw)
    assert msa(ack)[:2] == (outcome, control_id)
    header = ack.segment("MSH")
    assert [str(header[n]) for n in (3, 4, 5, 6)] == [CLINIC_APPLICATION, RIVERBEND_HD, LAB_APPLICATION, REFERENCE_LAB]
    assert OFFSET_TIME.fullmatch(str(header[7])), str(header[7])


def test_an_oversize_message_is_refused_ar_echoing_its_control_id(wire, notifications_db):
    control_id = unique("BIG")
    narrative = "Microscopic: sections show benign fibroadipose tissue without atypia. " * 40
    lines = [obx(n, "22634-0^Pathology report^LN", narrative, value_type="TX") for n in range(1, 400)]
    raw = oru(control_id=control_id, patient_ids=mr(unique("BIG")), test=PATHOLOGY_TEST, observations=lines)
    payload = raw.encode("ascii")
    assert len(payload) > 1024 * 1024
    before = stored(notifications_db)

    def push():  # the listener may stop reading (and close) before every byte is written
        try:
            wire.send(payload)
        except OSError:
            pass

    writer = Worker(push, name="writer").start()
    ack = wire.read_ack()
    writer.finish(15)  # the writer ended (all written, or cut off), without an error
    assert msa(ack)[:2] == ("AR", control_id)
    assert stored(notifications_db) == before


# --- 13. metrics ----------------------------------------------------------------------------------------


def hl7_counts(stack, facility: str) -> dict[tuple[str, str], float]:
    """(message type, ack code) -> hl7_messages_total of one sending facility; ("handled", type) ->
    hl7_message_handling_seconds_count of every facility."""
    reply = requests.get(f"http://127.0.0.1:{stack.config.ports.notifications_http}/metrics", timeout=10)
    assert reply.status_code == 200, reply.text[:300]
    counts = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if (
                sample.name == "hl7_messages_total"
                and sample.labels.get("sending_facility", "").split("^")[0] == facility
            ):
                counts[(sample.labels["message_type"], sample.labels["ack_code"])] = sample.value
            if sample.name == "hl7_message_handling_seconds_count":
                counts[("handled", sample.labels["message_type"])] = sample.value
    return counts


def test_messages_are_counted_by_facility_type_and_ack_code(stack, client):
    facility = "METRICSLAB"
    sender = f"{facility}^2.16.840.1.113883.3.99^ISO"
    before = hl7_counts(stack, facility)
    accepted = oru(control_id=unique("MET"), patient_ids=mr(unique("MET")), observations=[sodium(1)],
                   sending_facility=sender)  # fmt: skip
    refused = oru(control_id=unique("MET"), patient_ids=mr(unique("MET")), observations=[sodium(1)],
                  sending_facility=sender, processing_id="T")  # fmt: skip
    assert msa(exchange(client, accepted))[0] == "AA"
    assert msa(exchange(client, refused))[0] == "AR"
    after = hl7_counts(stack, facility)
    grown = {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}
    handled = {key: grown.pop(key) for key in list(grown) if key[0] == "handled"}
    assert set(grown.values()) == {1.0}, grown
    assert {code for _type, code in grown} == {"AA", "AR"}, grown
    assert all("ORU" in message_type for message_type, _code in grown), grown
    # Both timed until their ACK (other tests may send ORUs meanwhile: at least these two).
    assert handled.get(("handled", "ORU^R01"), 0.0) >= 2, handled


# --- the way real senders write results -------------------------------------------------------------------


def test_an_epic_beaker_result_with_software_visit_notes_and_specimen_is_accepted(client, reyes, kim):
    mrn, order, control_id = unique("EPIC"), unique("F"), unique("EPIC")
    raw = message(
        msh(
            control_id,
            sending_application="BEAKER^1.2.840.114350.1.13.0.1.7.2.696570^ISO",
            sending_facility="RBLAB^1.2.840.114350.1.13.0.1.7.2.686980^ISO",
            charset="UNICODE UTF-8",
            profile="LRI_Common_Component^^2.16.840.1.113883.9.16^ISO",
        ),  # fmt: skip
        sft(),
        pid(f"E{unique('')}^^^EPI^PI~{mr(mrn)}", name="O'NEIL^MÁIRE^^^^^L"),
        pv1(),
        orc(f"P{order}", order),
        obr(f"P{order}", order, CBC_TEST, section="HM"),
        nte(1, "Specimen collected at Riverbend draw station."),
        hemoglobin(1, "13.1", "N"),
        platelets(2, "18", "LL"),
        nte(1, "Critical result called to DR REYES at 0812 by MT 4471."),
        spm(f"S{order}"),
    ).encode("utf-8")
    assert msa(exchange(client, raw))[:2] == ("AA", control_id)
    item = wait_item(reyes, mrn)
    assert item["title"] == "Lab result: Complete Blood Count (final)"
    assert item["summary"] == f"Patient {mrn}: 1 critical" and item["severity"] == "urgent"
    view = full_result(reyes, order_id(kim, mrn))
    assert [o["value"] for o in view["observations"]] == ["13.1", "18"]
    assert "MÁIRE" in view["patient_name"]


@pytest.mark.parametrize("separator", [LF, CRLF], ids=["lf", "crlf"])
def test_a_mirth_relayed_result_with_newlines_and_trailing_separators_is_accepted(client, reyes, kim, separator):
    mrn, order, control_id = unique("MIRTH"), unique("F"), unique("MIRTH")
    raw = message(
        msh(control_id, sending_application="MIRTH", sending_facility="CERNERLAB", receiving_facility=RIVERBEND)
        + "|||||",
        pid(f"{mr(mrn)}~", name="SMITH^ROBERT^^JR^^^L") + "||||||||",
        f"ORC|RE|P{order}|{order}|||||||||||||||||||",
        obr(f"P{order}", order, LIPID_TEST) + "|||||",
        cholesterol(1, "242", "H") + "||||",
        "OBX|2|NM|2085-9^HDL Cholesterol^LN||38|mg/dL|>39|L|||F|||||||||||||||",
        separator=separator,
    )
    assert msa(exchange(client, raw))[:2] == ("AA", control_id)
    item = wait_item(reyes, mrn)
    assert item["summary"] == f"Patient {mrn}: 2 abnormal"
    view = full_result(reyes, order_id(kim, mrn))
    assert [(o["value"], o["flags"]) for o in view["observations"]] == [("242", ["H"]), ("38", ["L"])]


def test_a_result_sent_without_the_last_separator_and_with_bare_facility_names_is_accepted(client, reyes):
    mrn, control_id = unique("BARE"), unique("BARE")
    raw = message(
        msh(
            control_id,
            sending_application="LIS",
            sending_facility="QUEST",
            receiving_application="EMR",
            receiving_facility=RIVERBEND,
            sent_at="202611260815",
            country="",
        ),  # fmt: skip
        pid(mr(mrn)),
        obr("", unique("F"), POTASSIUM_TEST, reported_at="202611260810"),
        potassium(1, "3.1", "L"),
        separator=CR,
        trailing=False,
    )
    assert msa(exchange(client, raw))[:2] == ("AA", control_id)
    assert wait_item(reyes, mrn)["summary"] == f"Patient {mrn}: 1 abnormal"
