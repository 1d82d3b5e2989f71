"""Triage extraction: C-CDA header variants seen from real senders, XDM packages, PDF text layers read
with pypdf, labelled text in the formats US clinics write, and hostile inputs that must give nothing."""

from __future__ import annotations

import datetime as dt
import io
import zipfile

import pytest

from services.cloud_comms.triage import extract, match
from services.cloud_comms.triage.extract import PatientFields
from services.fax_simulator.pdf import text_pdf
from tests.cloud_triage_documents import (
    FACE_SHEET_JUNIOR,
    LAB_PAGE_CARTER,
    LAB_PAGE_LOPEZ,
    REFERRAL_LINES,
    RIVERBEND_MRN_ROOT,
    SSN_ROOT,
    ccda,
    xdm_zip,
)

MARIA = PatientFields(mrns=("RB100234",), family="Lopez", given=("Maria",), birth_date="1984-03-12")
MARIA_CCDA = PatientFields(
    family="Lopez", given=("Maria",), birth_date="1984-03-12", ids=((RIVERBEND_MRN_ROOT, "RB100234"),)
)


def test_a_ccda_header_gives_patient_code_and_title():
    found = extract.ccda(ccda())
    assert found.patient == MARIA_CCDA
    assert (found.code, found.title, found.source) == ("57133-1", "Referral Note", "ccda")


def test_several_ids_keep_every_mrn_but_never_an_ssn_or_a_null_flavor():
    ids = [(SSN_ROOT, "123-45-6789"), (RIVERBEND_MRN_ROOT, "RB100234"), ("2.16.840.1.113883.19.5", "H-77812")]
    found = extract.ccda(ccda(ids=ids, extra_ids='<id nullFlavor="NI"/><id root="1.2.3.4"/>'))
    assert found.patient.ids == ((RIVERBEND_MRN_ROOT, "RB100234"), ("2.16.840.1.113883.19.5", "H-77812"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("19840312", "1984-03-12"),
        ("198403121030", "1984-03-12"),
        ("19840312103000", "1984-03-12"),
        ("19840312103000-0500", "1984-03-12"),
        ("19840312103000.123+0100", "1984-03-12"),
        ("198403", ""),  # month precision: not a birth date to match on
        ("1984", ""),
        ("19841332", ""),  # no such day
        ("", ""),
    ],
)
def test_birth_time_precisions_and_offsets(value, expected):
    assert extract.ccda(ccda(birth=value)).patient.birth_date == expected


def test_a_null_flavored_birth_time_is_no_date():
    assert extract.ccda(ccda(birth=None)).patient.birth_date == ""


def test_a_name_with_prefix_suffix_and_middle_name():
    name = (
        "<prefix>Mrs.</prefix><given>Maria</given><given>Elena</given>"
        '<given qualifier="CL">Mary</given><family>Lopez</family><suffix>Jr.</suffix>'
    )
    found = extract.ccda(ccda(name=name))
    assert (found.patient.family, found.patient.given) == ("Lopez", ("Maria", "Elena"))
    assert found.patient.suffix == "JR"  # kept: the son is not the father


def test_the_legal_name_wins_over_others_and_the_birth_family_over_a_spouse_one():
    document = ccda().replace(
        b'<name use="L">',
        b'<name use="P"><given>Mia</given><family>Smith</family></name><name use="L">',
    )
    assert extract.ccda(document).patient.given == ("Maria",)
    document = ccda(name='<given>Maria</given><family qualifier="SP">Smith</family><family>Lopez</family>')
    assert extract.ccda(document).patient.family == "Lopez"


def test_an_unstructured_name_is_read_as_written():
    assert extract.ccda(ccda(name="Lopez, Maria")).patient.family == "Lopez"
    assert extract.ccda(ccda(name="Maria Lopez")).patient.given == ("Maria",)


def test_a_ccda_without_namespace_prefix_and_another_code_system():
    document = (
        ccda()
        .replace(b'xmlns="urn:hl7-org:v3"', b"")
        .replace(b'codeSystem="2.16.840.1.113883.6.1"', b'codeSystem="1.2.3"')
    )
    found = extract.ccda(document)
    assert found.patient == MARIA_CCDA
    assert found.code == ""  # not LOINC: not classified by code


def test_xml_that_is_not_a_ccda_or_declares_entities_is_nothing():
    assert extract.ccda(b"<?xml version='1.0'?><Invoice><id>1</id></Invoice>") is None
    assert extract.ccda(b"<ClinicalDocument><unclosed>") is None
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
        b"<ClinicalDocument>&lol2;</ClinicalDocument>"
    )
    assert extract.ccda(bomb) is None


def test_an_xdm_package_is_opened_for_its_ccda():
    found = extract.ccda_in_zip(xdm_zip(ccda()))
    assert found is not None and found.patient == MARIA_CCDA


def test_a_zip_without_a_ccda_or_a_broken_or_oversized_one_is_nothing():
    assert extract.ccda_in_zip(b"PK\x03\x04 not really a zip") is None
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("IHE_XDM/SUBSET01/DOC0001.XML", b"<ClinicalDocument>" + b" " * (11 * 1024 * 1024))
    assert extract.ccda_in_zip(out.getvalue()) is None  # past the per-entry bound: not read


def test_pypdf_reads_a_hand_written_text_pdf():
    text = extract.pdf_text(text_pdf(REFERRAL_LINES))
    assert [line for line in text.splitlines() if line] == REFERRAL_LINES


def test_a_broken_pdf_or_a_scan_without_text_gives_no_text():
    assert extract.pdf_text(b"%PDF-1.4\nnot a pdf at all\n%%EOF") == ""
    assert extract.pdf_text(text_pdf([])) == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\n".join(REFERRAL_LINES), MARIA),
        (
            "Patient Name: LOPEZ, MARIA E.   DOB: March 12, 1984   Medical Record #: RB100234",
            PatientFields(("RB100234",), "LOPEZ", ("MARIA", "E"), "1984-03-12"),
        ),
        (
            "Name: Mrs. Maria Lopez Jr.\nDate of Birth: 3/12/84\nMedical Record Number: RB100234",
            PatientFields(("RB100234",), "Lopez", ("Maria",), "1984-03-12", suffix="JR"),
        ),
        ("Patient: Maria Lopez DOB: 1984-03-12 MRN: RB100234", MARIA),
        ("Client Name: Maria Lopez\nD.O.B.: 12 Mar 1984\nChart #: RB100234", MARIA),
        ("Pt Name: Maria Lopez\nBirth Date: 03-12-1984", PatientFields((), "Lopez", ("Maria",), "1984-03-12")),
        ("Patient: Jane Demo-Client\nDOB 05.05.1988", PatientFields((), "Demo-Client", ("Jane",), "1988-05-05")),
    ],
)
def test_labelled_text_in_common_us_formats(text, expected):
    assert extract.text_fields(text) == expected


def test_text_without_labels_or_with_impossible_dates_names_nobody():
    assert not extract.text_fields("Thank you for seeing our mutual patient next week.")
    assert extract.text_fields("DOB: 02/30/1984").birth_date == ""
    future = (dt.date.today() + dt.timedelta(days=400)).strftime("%m/%d/%Y")
    assert extract.text_fields(f"DOB: {future}").birth_date == ""
    assert extract.text_fields("Chart notes attached").mrns == ()  # a label needs a number to be an MRN


def test_a_message_prefers_the_ccda_then_the_pdf_then_its_body():
    pdf = text_pdf(["LAB REPORT", "Patient: Ana Lopez", "DOB: 07/19/1990"])
    found = extract.document(
        "Patient: James Carter", [("labs.pdf", "application/pdf", pdf), ("r.xml", "text/xml", ccda())]
    )
    assert found.patient == MARIA_CCDA and found.source == "ccda"
    assert (found.code, found.title) == ("57133-1", "Referral Note")
    assert "LAB REPORT" in found.text and "James Carter" in found.text

    found = extract.document("Patient: James Carter", [("labs.pdf", "application/octet-stream", pdf)])
    assert (found.patient.family, found.patient.given, found.source) == ("Lopez", ("Ana",), "pdf")
    found = extract.document("Patient: James Carter\nDOB: 11/02/1975", [])
    assert (found.patient.family, found.source) == ("Carter", "text")
    found = extract.document("", [("x.bin", "application/octet-stream", b"\x00\x01")])
    assert not found.patient and found.source == "none"


def test_an_xdm_attachment_is_recognised_by_its_content():
    found = extract.document("", [("attachment-1", "application/octet-stream", xdm_zip(ccda()))])
    assert found.patient == MARIA_CCDA and found.source == "ccda" and found.complete


# --- every patient, every page, every part (A1) ----------------------------------------------------------
def test_a_lab_fax_about_two_patients_names_both():
    found = extract.document("", [("fax.pdf", "application/pdf", text_pdf(LAB_PAGE_LOPEZ, LAB_PAGE_CARTER))])
    assert (found.patient.family, found.patient.birth_date) == ("LOPEZ", "1984-03-12")
    assert found.patient.mrns == ("RB100234",)  # only the first patient's number is hers
    assert [(p.family, p.birth_date, p.mrns) for p in found.patients] == [
        ("LOPEZ", "1984-03-12", ("RB100234",)),
        ("CARTER", "1975-11-02", ("RB100871",)),
    ]
    assert match.several_patients(found.patients) and found.complete


def test_a_header_repeated_on_every_page_is_one_patient():
    page = ["Patient Name: LOPEZ, MARIA E  DOB: 3/12/84", "MRN: RB100234", "Page 1 of 2"]
    found = extract.document("", [("fax.pdf", "application/pdf", text_pdf(page, ["Patient: Maria Lopez", "TSH 2.1"]))])
    assert len(found.patients) == 2 and not match.several_patients(found.patients)


def test_a_ccda_for_one_patient_and_a_pdf_or_second_ccda_for_another_are_both_read():
    carter_pdf = text_pdf(["LAB REPORT", "Patient: James Carter", "DOB: 11/02/1975"])
    found = extract.document("", [("r.xml", "text/xml", ccda()), ("labs.pdf", "application/pdf", carter_pdf)])
    assert found.patient == MARIA_CCDA and match.several_patients(found.patients)
    second = ccda(given=("James",), family="Carter", birth="19751102", ids=[(RIVERBEND_MRN_ROOT, "RB100871")])
    found = extract.document("", [("a.xml", "text/xml", ccda()), ("b.xml", "text/xml", second)])
    assert [p.family for p in found.patients] == ["Lopez", "Carter"] and match.several_patients(found.patients)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("IHE_XDM/SUBSET01/DOC0001.XML", ccda())
        archive.writestr("IHE_XDM/SUBSET01/DOC0002.XML", second)
        archive.writestr("IHE_XDM/SUBSET01/CDA.XSL", "<xsl/>")
    found = extract.document("", [("package.zip", "application/zip", out.getvalue())])
    assert len(found.patients) == 2 and match.several_patients(found.patients) and found.complete


def test_pages_past_the_cap_or_without_text_or_unreadable_parts_make_a_document_partly_read():
    pdf = text_pdf(*(["Patient: Maria Lopez", f"page {n}"] for n in range(3)))
    assert extract.pdf_pages(pdf, pages=2) == (["Patient: Maria Lopez\npage 0", "Patient: Maria Lopez\npage 1"], False)
    assert extract.pdf_pages(pdf, pages=3)[1] is True
    assert not extract.pdf_pages(text_pdf(["Patient: Maria Lopez"], []))[1]  # an image page among text pages
    tiff = ("scan.tif", "image/tiff", b"II*\x00" + b"\x00" * 64)
    assert not extract.document("Patient: Maria Lopez", [tiff]).complete
    assert extract.document("Patient: Maria Lopez", [("note.txt", "text/plain", b"DOB: 03/12/1984")]).complete


# --- someone else's date of birth; suffixes (A2) ---------------------------------------------------------
def test_a_guarantor_insured_or_parent_dob_is_not_the_patients():
    found = extract.text_fields("\n".join(FACE_SHEET_JUNIOR))
    assert (found.family, found.given, found.suffix, found.birth_date) == ("CARTER", ("JAMES",), "JR", "")
    text = "Patient: Ana Lopez   Mother: Maria Lopez  DOB: 03/12/1984\nPatient DOB: 07/19/1990"
    assert extract.text_fields(text).birth_date == "1990-07-19"
    for label in ("Guarantor DOB", "Insured DOB", "Subscriber DOB", "Father's DOB", "Responsible Party DOB"):
        assert extract.text_fields(f"Patient: Ana Lopez\n{label}: 03/12/1984").birth_date == ""


def test_the_dob_on_the_name_line_wins_and_a_later_different_dob_is_someone_else():
    found = extract.document("Patient: Ana Lopez  DOB: 07/19/1990\nSpecimen drawn\nDOB: 03/12/1984", [])
    assert found.patient.birth_date == "1990-07-19" and match.several_patients(found.patients)


# --- names from fax text layers (C2) ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "family", "given", "unsure"),
    [
        ("Patient:  Maria  Lopez\nDOB: 03/12/1984", "Lopez", ("Maria",), False),
        ("Patient Name: Maria  Lopez     Sex: F", "Lopez", ("Maria",), False),
        ("Patient: CARTER JAMES\nDOB: 11/02/1975", "JAMES", ("CARTER",), True),
        ("Patient #: 5566\nPatient Name: Maria Lopez", "Lopez", ("Maria",), False),
        ("Patient: Maria Lopez (Pref: Mary)\nDOB: 03/12/1984", "Lopez", ("Maria",), False),
        ('Patient: Maria "Mary" Lopez', "Lopez", ("Maria",), False),
        (
            "FAX COVER SHEET\nTo: Riverbend Intake\nName: Dr. Elena Reyes\nFrom: Lakeview Hospital\n"
            "Pages: 3\nRE: referral\nPatient: Maria Lopez\nDOB: 03/12/1984",
            "Lopez",
            ("Maria",),
            False,
        ),
        ("Name: Maria Lopez\nDOB: 03/12/1984", "Lopez", ("Maria",), False),  # no patient label: last resort
    ],
)
def test_names_as_fax_text_layers_write_them(text, family, given, unsure):
    found = extract.text_fields(text)
    assert (found.family, found.given, found.order_unsure) == (family, given, unsure)


def test_an_order_unsure_name_is_one_person_either_way_round():
    written = extract.text_fields("Patient: CARTER JAMES\nDOB: 11/02/1975")
    assert extract.swapped(written).family == "CARTER" and extract.swapped(written).given == ("JAMES",)
    assert match.same_person(written, PatientFields(family="Carter", given=("James",), birth_date="1975-11-02"))


# --- dates (C3) ------------------------------------------------------------------------------------------
def _short(day: dt.date) -> str:
    return f"{day.month}/{day.day}/{day.year % 100:02d}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DOB: 12.03.1984", ""),  # 12 March (D.M.Y) or 3 December (M.D.Y): not guessed
        ("DOB: 25.03.1984", "1984-03-25"),
        ("DOB: 03.25.1984", "1984-03-25"),
        ("DOB: 05.05.1988", "1988-05-05"),
        ("DOB: 1/5/24", "2024-01-05"),
        ("DOB: 3/12/84", "1984-03-12"),
        ("DOB:03121984", "1984-03-12"),
        ("DOB: 19840312", "1984-03-12"),
        ("DOB/Age: 03/12/1984 (41 y)", "1984-03-12"),
        ("DOB: 13/13/1984", ""),
    ],
)
def test_birth_dates_as_written_in_and_outside_the_us(text, expected):
    assert extract.text_fields(f"Patient: Maria Lopez\n{text}").birth_date == expected


def test_a_birth_date_is_never_in_the_future():
    soon = dt.date.today() + dt.timedelta(days=2)
    assert extract.parse_date(soon.strftime("%m/%d/%Y")) == ""
    assert extract.parse_date(_short(soon)) == soon.replace(year=soon.year - 100).isoformat()
    past = dt.date.today() - dt.timedelta(days=40)
    assert extract.parse_date(_short(past)) == past.isoformat()
