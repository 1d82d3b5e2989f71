"""HL7 v2.5.1 ORU^R01 messages written the way real senders write them, segment by segment.

Written from the 2.5.1 standard (chapter 7, ORU^R01 / ORU_R01: PATIENT_RESULT { PID [PD1] [NTE]
[PV1] ORDER_OBSERVATION { [ORC] OBR [NTE] { OBX [NTE] } [SPM] } }) and from the habits of
reference labs (LabCorp/Quest: CLIA-numbered facilities, local codes with LOINC alternates),
Epic Beaker (SFT, UNICODE UTF-8, ORC before OBR, SPM), Cerner, and feeds relayed by Mirth
(newline separators, trailing field separators, many empty fields). Not derived from
tests/e2e/lab_messages.py: each test composes the segments it needs.

Every builder returns one segment (str) without a separator; `message()` joins them.
"""

from __future__ import annotations

import uuid

CR, LF, CRLF = "\r", "\n", "\r\n"

# Hierarchic designators (HD: namespace id ^ universal id ^ universal id type) as senders fill
# MSH-3..6 when they follow the 2.5.1 implementation guides (LRI) rather than bare names.
LAB_APPLICATION = "LAB^2.16.840.1.113883.3.1^ISO"
REFERENCE_LAB = "QUESTDX^05D0642827^CLIA"
CLINIC_APPLICATION = "CLINICBOARD^2.16.840.1.113883.3.7^ISO"
# The clinic as registered in development: MSH-6.1 RIVERBEND -> agy_riverbend (America/Chicago).
RIVERBEND = "RIVERBEND"
RIVERBEND_HD = "RIVERBEND^2.16.840.1.113883.3.7.1^ISO"

# A performing organization (OBX-23 XON, OBX-24 XAD, OBX-25 XCN), as reference labs send them.
PERFORMER = "Quest Diagnostics Wood Dale^^^^^CLIA&2.16.840.1.113883.4.7&ISO^XX^^^14D0416938"
PERFORMER_ADDRESS = "1355 Mittel Blvd^^Wood Dale^IL^60191-1024^USA^B"
MEDICAL_DIRECTOR = "^KAPLAN^RICHARD^^^MD"
# An ordering provider (XCN: NPI with its assigning authority), as Epic and Cerner write ORC-12/OBR-16.
ORDERING_PROVIDER = "1003017555^REYES^ELENA^M^^DR^^^NPI&2.16.840.1.113883.4.6&ISO^L^^^NPI"


def unique(prefix: str) -> str:
    """An id no other test uses (control ids, order numbers, record numbers)."""
    return f"{prefix}{uuid.uuid4().hex[:12].upper()}"


def message(*segments: str, separator: str = CR, trailing: bool = True) -> str:
    """Segments joined by `separator`; most senders end the last segment with it too."""
    text = separator.join(segments)
    return text + separator if trailing else text


# --- segments -----------------------------------------------------------------------------------


def msh(  # noqa: PLR0913 - MSH has that many fields
    control_id: str,
    *,
    sending_application: str = LAB_APPLICATION,
    sending_facility: str = REFERENCE_LAB,
    receiving_application: str = CLINIC_APPLICATION,
    receiving_facility: str = RIVERBEND_HD,
    sent_at: str = "20261126081500-0600",
    message_type: str = "ORU^R01^ORU_R01",
    processing_id: str = "P",
    version: str = "2.5.1",
    accept_ack: str = "",
    application_ack: str = "",
    country: str = "USA",
    charset: str = "",
    profile: str = "",
) -> str:
    """MSH-1..21 (MSH-13/14 sequence and continuation, MSH-19/20 language and alternate handling
    empty); trailing empty fields left off, as the standard allows."""
    fields = [
        "MSH",
        "^~\\&",
        sending_application,
        sending_facility,
        receiving_application,
        receiving_facility,
        sent_at,
        "",
        message_type,
        control_id,
        processing_id,
        version,
        "",
        "",
        accept_ack,
        application_ack,
        country,
        charset,
        "",
        "",
        profile,
    ]
    return "|".join(fields).rstrip("|")


def sft() -> str:
    """The sending software (Epic sends one after MSH)."""
    return (
        "SFT|Epic Systems Corporation^L^^^^ANSI&1.2.840&ISO^XX^^^1.2.840.114350|Epic 2023 (May)|Beaker|10.3.1||20230515"
    )


def mr(identifier: str, authority: str = "RIVERBEND") -> str:
    """A medical record number (CX-5 MR) assigned by the clinic."""
    return f"{identifier}^^^{authority}^MR"


def pid(
    identifiers: str,
    *,
    name: str = "DOE^JANE^Q^^^^L",
    set_id: str = "1",
    birth_date: str = "19800214",
    sex: str = "F",
) -> str:
    """PID-1 set id, PID-3 identifier list (repetitions with ~), PID-5 name (XPN, type L), PID-7
    birth date, PID-8 sex, PID-10 race, PID-11 address, PID-13 phone (XTN)."""
    return "|".join(
        [
            "PID",
            set_id,
            "",
            identifiers,
            "",
            name,
            "",
            birth_date,
            sex,
            "",
            "2106-3^White^CDCREC",
            "1200 RIVER RD^^SPRINGFIELD^IL^62701^USA^H",
            "",
            "^PRN^PH^^1^217^5550123",
        ]
    )


def pv1() -> str:
    """An outpatient visit (PV1-2 O), attending provider in PV1-7."""
    return f"PV1|1|O|RBCLINIC^^^RIVERBEND^^^^^Riverbend Clinic||||{ORDERING_PROVIDER}"


def orc(placer: str, filler: str, *, transaction_at: str = "20261126080000-0600") -> str:
    """ORC-1 RE (observations to follow), ORC-2/3 placer/filler numbers (EI), ORC-5 CM (complete),
    ORC-9 transaction time, ORC-12 ordering provider."""
    return "|".join(
        ["ORC", "RE", f"{placer}^EPIC", f"{filler}^LAB^2.16.840.1.113883.3.1^ISO", "", "CM", "", "", "",
         transaction_at, "", "", ORDERING_PROVIDER]
    )  # fmt: skip


def obr(  # noqa: PLR0913 - the OBR fields a result carries
    placer: str,
    filler: str,
    test: str,
    *,
    status: str = "F",
    reported_at: str = "20261126081000-0600",
    collected_at: str = "20261126070000-0600",
    set_id: str = "1",
    section: str = "CH",
) -> str:
    """OBR-2/3 placer/filler order numbers (EI), OBR-4 test, OBR-7 collected, OBR-16 ordering
    provider, OBR-22 result report / status change time, OBR-24 section, OBR-25 result status."""
    placer_number = f"{placer}^EPIC" if placer else ""
    fields = ["OBR", set_id, placer_number, f"{filler}^LAB^2.16.840.1.113883.3.1^ISO", test, "", "", collected_at]
    fields += [""] * 8  # OBR-8..15
    fields += [ORDERING_PROVIDER, "", "", "", "", ""]  # OBR-16..21
    fields += [reported_at, "", section, status]  # OBR-22..25
    return "|".join(fields)


def obx(  # noqa: PLR0913 - OBX has that many fields
    set_id: int | str,
    code: str,
    value: str,
    *,
    value_type: str = "NM",
    units: str = "",
    reference_range: str = "",
    flags: str = "",
    status: str = "F",
    observed_at: str = "20261126070000-0600",
    analysed_at: str = "20261126080500-0600",
) -> str:
    """OBX-2 value type, OBX-3 observation id, OBX-5 value, OBX-6 units, OBX-7 range, OBX-8 flags,
    OBX-11 result status, OBX-14 observation time, OBX-19 analysis time, OBX-23..25 performer."""
    fields = ["OBX", str(set_id), value_type, code, "", value, units, reference_range, flags, "", "", status]
    fields += ["", "", observed_at, "", "", "", "", analysed_at, "", "", ""]  # OBX-12..22
    fields += [PERFORMER, PERFORMER_ADDRESS, MEDICAL_DIRECTOR]  # OBX-23..25
    return "|".join(fields)


def nte(set_id: int | str, text: str, *, source: str = "L", kind: str = "RE^Remark^HL70364") -> str:
    """NTE-2 source (L: the ancillary / lab), NTE-3 the comment, NTE-4 its type."""
    return f"NTE|{set_id}|{source}|{text}|{kind}"


def spm(specimen: str, *, kind: str = "119297000^Blood specimen^SCT") -> str:
    """SPM-2 specimen id (EIP), SPM-4 type, SPM-17 collection time, SPM-18 received time."""
    fields = ["SPM", "1", f"{specimen}&LAB&2.16.840.1.113883.3.1&ISO", "", kind]
    fields += [""] * 12  # SPM-5..16
    fields += ["20261126070000-0600", "20261126073000-0600"]
    return "|".join(fields)


# --- tests and observations, as a reference lab codes them (local code, then LOINC alternate) ----

POTASSIUM_TEST = "80051^Electrolyte Panel^L^24326-1^Electrolytes 1998 panel - Serum or Plasma^LN"
CBC_TEST = "CBC^Complete Blood Count^L^58410-2^CBC panel - Blood by Automated count^LN"
LIPID_TEST = "LIPID^Lipid Panel^L^57698-3^Lipid panel with direct LDL - Serum or Plasma^LN"
PATHOLOGY_TEST = "88305^Surgical Pathology^L^22634-0^Pathology report^LN"


def potassium(set_id: int | str = 1, value: str = "6.9", flags: str = "HH", status: str = "F") -> str:
    return obx(
        set_id,
        "001453^Potassium, Serum^L^2823-3^Potassium SerPl-sCnc^LN",
        value,
        units="mmol/L^^UCUM",
        reference_range="3.5-5.2",
        flags=flags,
        status=status,
    )


def sodium(set_id: int | str = 2, value: str = "139", flags: str = "N", status: str = "F") -> str:
    return obx(
        set_id,
        "001198^Sodium, Serum^L^2951-2^Sodium SerPl-sCnc^LN",
        value,
        units="mmol/L^^UCUM",
        reference_range="134-144",
        flags=flags,
        status=status,
    )


def hemoglobin(set_id: int | str = 1, value: str = "13.1", flags: str = "N", status: str = "F") -> str:
    return obx(
        set_id,
        "HGB^Hemoglobin^L^718-7^Hemoglobin [Mass/volume] in Blood^LN",
        value,
        units="g/dL^^UCUM",
        reference_range="11.1-15.9",
        flags=flags,
        status=status,
    )


def platelets(set_id: int | str = 2, value: str = "18", flags: str = "LL", status: str = "F") -> str:
    return obx(
        set_id,
        "PLT^Platelets^L^777-3^Platelets [#/volume] in Blood by Automated count^LN",
        value,
        units="10*3/uL^^UCUM",
        reference_range="150-450",
        flags=flags,
        status=status,
    )


def cholesterol(set_id: int | str = 1, value: str = "242", flags: str = "H", status: str = "F") -> str:
    return obx(
        set_id,
        "001065^Cholesterol, Total^L^2093-3^Cholesterol SerPl-mCnc^LN",
        value,
        units="mg/dL^^UCUM",
        reference_range="100-199",
        flags=flags,
        status=status,
    )


def oru(  # noqa: PLR0913 - the parts a test varies
    *,
    control_id: str,
    patient_ids: str,
    observations: list[str],
    order: str | None = None,
    test: str = POTASSIUM_TEST,
    status: str = "F",
    reported_at: str = "20261126081000-0600",
    name: str = "DOE^JANE^Q^^^^L",
    separator: str = CR,
    **header,
) -> str:
    """A reference lab's single-patient, single-order result: MSH PID ORC OBR OBX... SPM."""
    order = order or unique("F")
    return message(
        msh(control_id, **header),
        pid(patient_ids, name=name),
        orc(f"P{order}", order),
        obr(f"P{order}", order, test, status=status, reported_at=reported_at),
        *observations,
        spm(f"S{order}"),
        separator=separator,
    )
