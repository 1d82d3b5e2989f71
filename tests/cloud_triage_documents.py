"""Inbound documents as partners send them, built by hand for the triage tests: C-CDA headers
(HL7 CDA R2 / C-CDA 2.1 layout), IHE XDM zips around them, and PDFs with a real text layer
(services.fax_simulator.pdf `text_pdf`: a hand-written PDF 1.4, one Helvetica line per text line, as a fax
server's text PDF)."""

from __future__ import annotations

import io
import zipfile
from xml.sax.saxutils import escape

LOINC = "2.16.840.1.113883.6.1"
RIVERBEND_MRN_ROOT = "2.16.840.1.113883.19.5.99999.2"
SSN_ROOT = "2.16.840.1.113883.4.1"


def ccda(
    *,
    ids: list[tuple[str, str]] | None = None,
    name: str | None = None,
    given: tuple[str, ...] = ("Maria",),
    family: str = "Lopez",
    birth: str | None = "19840312",
    code: str = "57133-1",
    title: str = "Referral Note",
    extra_ids: str = "",
) -> bytes:
    """A C-CDA document whose header names one patient. `ids` are (root, extension) pairs; `name`
    replaces the structured name with raw XML of the <name> element's content."""
    ids = [(RIVERBEND_MRN_ROOT, "RB100234")] if ids is None else ids
    id_xml = "".join(f'<id root="{r}" extension="{escape(e)}"/>' for r, e in ids) + extra_ids
    if name is None:
        name = "".join(f"<given>{escape(g)}</given>" for g in given) + f"<family>{escape(family)}</family>"
    birth_xml = f'<birthTime value="{birth}"/>' if birth is not None else '<birthTime nullFlavor="UNK"/>'
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:sdtc="urn:hl7-org:sdtc" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <realmCode code="US"/>
  <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
  <templateId root="2.16.840.1.113883.10.20.22.1.1" extension="2015-08-01"/>
  <id root="2.16.840.1.113883.19.5.99999.1" extension="doc-20260302-1"/>
  <code code="{code}" codeSystem="{LOINC}" codeSystemName="LOINC" displayName="{escape(title)}"/>
  <title>{escape(title)}</title>
  <effectiveTime value="20260302101500-0500"/>
  <confidentialityCode code="N" codeSystem="2.16.840.1.113883.5.25"/>
  <languageCode code="en-US"/>
  <recordTarget>
    <patientRole>
      {id_xml}
      <addr use="HP"><streetAddressLine>1 Main St</streetAddressLine><city>Riverbend</city></addr>
      <patient>
        <name use="L">{name}</name>
        <administrativeGenderCode code="F" codeSystem="2.16.840.1.113883.5.1"/>
        {birth_xml}
      </patient>
    </patientRole>
  </recordTarget>
  <author><time value="20260302"/>
    <assignedAuthor><id root="2.16.840.1.113883.4.6" extension="1234567893"/></assignedAuthor></author>
  <component><structuredBody><component><section><title>Reason for referral</title>
    <text>Evaluation and treatment.</text></section></component></structuredBody></component>
</ClinicalDocument>
""".encode()


def xdm_zip(document: bytes, name: str = "DOC0001.XML") -> bytes:
    """An IHE XDM package (the Direct standard's zip) holding `document`."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("INDEX.HTM", "<html><body>XDM package</body></html>")
        archive.writestr("README.TXT", "Sent by Partner HISP")
        archive.writestr("IHE_XDM/SUBSET01/METADATA.XML", '<?xml version="1.0"?><SubmitObjectsRequest/>')
        archive.writestr(f"IHE_XDM/SUBSET01/{name}", document)
    return out.getvalue()


REFERRAL_LINES = [
    "REFERRAL FOR CONSULTATION",
    "Patient: Maria Lopez",
    "DOB: 03/12/1984",
    "MRN: RB100234",
    "Reason for referral: evaluation of anxiety and sleep",
]

FOREIGN_MRN_ROOT = "2.16.840.1.113883.3.7777.1"  # a partner hospital's own MRNs

# A reference lab's multi-patient results fax: one page per patient, as lab interfaces batch them
# when a clinic's orders come back together (header repeated on every page).
LAB_PAGE_LOPEZ = [
    "QUEST REFERENCE LABORATORY          LABORATORY REPORT",
    "Patient Name: LOPEZ, MARIA E  DOB: 3/12/84  MRN: RB100234",
    "Collected: 03/02/2026 08:14   Received: 03/02/2026 11:20",
    "Test            Result     Reference Range",
    "TSH             2.1        0.4-4.0 mIU/L",
]
LAB_PAGE_CARTER = [
    "QUEST REFERENCE LABORATORY          LABORATORY REPORT",
    "Patient Name: CARTER, JAMES  DOB: 11/2/75  MRN: RB100871",
    "Collected: 03/02/2026 09:02   Received: 03/02/2026 11:20",
    "Test            Result     Reference Range",
    "HbA1c           6.1        4.0-5.6 %",
]
# A hospital registration face sheet: the son (Jr.) is the patient, his father the guarantor.
FACE_SHEET_JUNIOR = [
    "REFERRAL FOR CONSULTATION",
    "Patient Name: CARTER, JAMES JR.",
    "Guarantor: CARTER, JAMES    Guarantor DOB: 11/02/1975",
    "Insurance: Riverbend Health Plan   Subscriber DOB: 11/02/1975",
    "Reason for referral: evaluation of anxiety",
]
