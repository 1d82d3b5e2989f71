"""FHIR R4 DiagnosticReport -> lab result, pure: what is taken, and every refusal's stable code.

Besides the compact report of tests/e2e/lab_messages.py, resources are written the way EHR and lab
senders write them (an Epic-style Bundle: identifiers with v2-0203 types, categories, performers,
`result` references to entries by `urn:uuid`, comparator values, dataAbsentReason, notes, coded
and string results), built here and used by tests/e2e/test_lab_fhir_inputs.py too.
"""

from __future__ import annotations

import copy
import json
import uuid

import pytest

from services.kit.errors import InvalidInput
from services.notifications import fhir_appointment
from services.notifications.fhir import body_digest, parse_report
from services.notifications.lab_domain import ABNORMAL, INFO, URGENT, version_of
from tests.e2e.lab_messages import as_bundle, diagnostic_report

EHR_OID = "urn:oid:1.2.840.114350.1.13.0.1.7.2.798268"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"


def flag(code: str, display: str) -> list[dict]:
    return [{"coding": [{"system": INTERPRETATION, "code": code, "display": display}], "text": display}]


def lab_observation(loinc: str, name: str, text: str, *, status: str = "final", **elements) -> dict:
    """An Observation as an EHR's lab module sends it; `elements` are its value[x], interpretation,
    referenceRange, note, dataAbsentReason."""
    return {
        "resourceType": "Observation",
        "id": "e" + uuid.uuid4().hex[:20],
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                        "display": "Laboratory",
                    }
                ],
                "text": "Laboratory",
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": name}], "text": text},
        "effectiveDateTime": "2026-11-26T13:40:00Z",
        "issued": "2026-11-26T14:02:33Z",
        "performer": [{"reference": "Organization/eLabCore", "display": "Riverbend Core Laboratory"}],
        "specimen": {"reference": "Specimen/e2026SE330", "display": "Specimen 2026SE-330CH0023"},
        **elements,
    }


def troponin() -> dict:
    return lab_observation(
        "10839-9", "Troponin I.cardiac [Mass/volume] in Serum or Plasma", "Troponin I",
        valueQuantity={"value": 0.01, "comparator": "<", "unit": "ng/mL", "system": UCUM, "code": "ng/mL"},
        interpretation=flag("N", "Normal"),
        referenceRange=[{"high": {"value": 0.04, "unit": "ng/mL", "system": UCUM, "code": "ng/mL"},
                         "text": "<0.04 ng/mL"}],
        note=[{"authorString": "Riverbend Core Laboratory", "text": "Below the assay's limit of detection."}],
    )  # fmt: skip


def hemolyzed_potassium() -> dict:
    return lab_observation(
        "2823-3", "Potassium [Moles/volume] in Serum or Plasma", "Potassium",
        dataAbsentReason={"coding": [{"system": DATA_ABSENT, "code": "error", "display": "Error"}],
                          "text": "Specimen hemolyzed"},
        note=[{"text": "Specimen hemolyzed; please recollect."}],
    )  # fmt: skip


def urine_hcg() -> dict:
    return lab_observation(
        "2106-3", "Choriogonadotropin (pregnancy test) [Presence] in Urine", "HCG, urine",
        valueString="Negative", interpretation=flag("N", "Normal"), referenceRange=[{"text": "Negative"}],
    )  # fmt: skip


def strep_screen() -> dict:
    return lab_observation(
        "78012-2", "Streptococcus pyogenes Ag [Presence] in Throat by Rapid immunoassay", "Rapid strep A",
        valueCodeableConcept={"coding": [{"system": SNOMED, "code": "10828004", "display": "Positive"}]},
        interpretation=flag("A", "Abnormal"),
    )  # fmt: skip


def ana_titer() -> dict:
    return lab_observation(
        "5048-4", "Nuclear Ab [Titer] in Serum by Immunofluorescence", "ANA titer",
        valueRatio={"numerator": {"value": 1}, "denominator": {"value": 160}},
        interpretation=flag("H", "High"), referenceRange=[{"text": "<1:40"}],
    )  # fmt: skip


def sodium(value: float = 118, code: str = "LL") -> dict:
    return lab_observation(
        "2951-2", "Sodium [Moles/volume] in Serum or Plasma", "Sodium",
        valueQuantity={"value": value, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"},
        interpretation=flag(code, "Critical low" if code == "LL" else "Normal"),
        referenceRange=[{"low": {"value": 136, "unit": "mmol/L"}, "high": {"value": 145, "unit": "mmol/L"}}],
    )  # fmt: skip


def epic_bundle(
    observations: list[dict],
    *,
    order: str | None = None,
    patient: str = "eq081-VQEgP8drUUqCWzHfw3",
    patient_name: str = "Lin, Derrick",
    status: str = "final",
    issued: str = "2026-11-26T14:02:33Z",
    test: tuple[str, str] = ("24323-8", "Comprehensive metabolic 2000 panel"),
    conclusion: str | None = None,
) -> dict:
    """A collection Bundle: the DiagnosticReport first, its Observations as entries it references by
    their `urn:uuid` full URLs (how Epic and most interface engines link the resources of one post)."""
    order = order or "1066" + uuid.uuid4().hex[:6].upper()
    urls = [f"urn:uuid:{uuid.uuid4()}" for _ in observations]
    report = {
        "resourceType": "DiagnosticReport",
        "id": "e" + uuid.uuid4().hex[:20],
        "meta": {"lastUpdated": issued},
        "identifier": [
            {
                "use": "official",
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL",
                                "display": "Filler Identifier"}],
                    "text": "Filler Identifier",
                },
                "system": EHR_OID,
                "value": order,
            }
        ],
        "basedOn": [{"reference": "ServiceRequest/eSR" + order, "display": test[1]}],
        "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB",
                                  "display": "Laboratory"}], "text": "Lab"}],
        "code": {"coding": [{"system": LOINC, "code": test[0], "display": test[1]}], "text": test[1]},
        "subject": {"reference": f"Patient/{patient}", "display": patient_name},
        "encounter": {"reference": "Encounter/eEnc7781", "display": "Office Visit"},
        "effectiveDateTime": "2026-11-26T13:40:00Z",
        "issued": issued,
        "performer": [{"reference": "Practitioner/ePr42", "type": "Practitioner", "display": "Elena Reyes, MD"}],
        "specimen": [{"reference": "Specimen/e2026SE330", "display": "Specimen 2026SE-330CH0023"}],
        "result": [
            {"reference": url, "display": o["code"]["text"]} for url, o in zip(urls, observations, strict=True)
        ],
    }  # fmt: skip
    if conclusion is not None:
        report["conclusion"] = conclusion
    entries = [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": report}]
    entries += [{"fullUrl": url, "resource": o} for url, o in zip(urls, observations, strict=True)]
    return {"resourceType": "Bundle", "type": "collection", "timestamp": issued, "entry": entries}


def report_of(bundle: dict) -> dict:
    return bundle["entry"][0]["resource"]


# --- what is taken ----------------------------------------------------------------------------------


def test_a_report_with_contained_observations():
    report = parse_report(diagnostic_report(order="ORD-F1", patient="MRN9"), "fhir:lab-interface")
    assert (report.order_number, report.patient_ref, report.status) == ("ORD-F1", "MRN9", "final")
    assert (report.test_code, report.test_name) == ("51990-0", "Basic metabolic panel")
    assert [(o.name, o.value, o.units, o.reference_range, o.flags) for o in report.observations] == [
        ("Potassium", "6.9", "mmol/L", "3.5-5.1", ("HH",)),
        ("Glucose", "162", "mg/dL", "70-99", ("H",)),
        ("Sodium", "140", "mmol/L", "136-145", ("N",)),
    ]
    assert report.severity == URGENT and report.counts == (1, 1)
    assert (report.comments, report.retracted, report.ordering_providers) == ((), "", ())


def test_a_bundle_with_referenced_observations_reads_the_same():
    body = diagnostic_report(order="ORD-F2")
    assert parse_report(as_bundle(body), "o").observations == parse_report(body, "o").observations


def test_an_ehr_bundle_shows_every_value_as_the_sender_wrote_it():
    bundle = epic_bundle(
        [troponin(), hemolyzed_potassium(), urine_hcg(), strep_screen(), ana_titer()],
        order="1066899", conclusion="Potassium not reported: hemolyzed specimen. Recollect ordered.",
    )  # fmt: skip
    report = parse_report(bundle, "fhir:lab-interface")
    assert (report.order_number, report.patient_ref, report.patient_name) == (
        "1066899", "eq081-VQEgP8drUUqCWzHfw3", "Lin, Derrick",
    )  # fmt: skip
    assert (report.test_code, report.test_name, report.status) == ("24323-8", "Comprehensive metabolic 2000 panel",
                                                                   "final")  # fmt: skip
    assert report.comments == ("Potassium not reported: hemolyzed specimen. Recollect ordered.",)
    shown = [(o.name, o.value, o.units, o.reference_range, o.absent_reason, o.flags) for o in report.observations]
    assert shown == [
        ("Troponin I", "<0.01", "ng/mL", "<0.04 ng/mL", "", ("N",)),
        ("Potassium", "", "", "", "Specimen hemolyzed", ()),
        ("HCG, urine", "Negative", "", "Negative", "", ("N",)),
        ("Rapid strep A", "Positive", "", "", "", ("A",)),
        ("ANA titer", "1:160", "", "<1:40", "", ("H",)),
    ]
    assert report.observations[0].comments == ("Below the assay's limit of detection.",)
    assert report.observations[1].comments == ("Specimen hemolyzed; please recollect.",)
    assert report.severity == ABNORMAL and report.counts == (2, 0)
    assert report.ordering_providers == ()  # FHIR requesters are not read


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ({"valueQuantity": {"value": 1234567.5, "unit": "/uL"}}, ("1234567.5", "/uL")),  # every digit kept
        ({"valueQuantity": {"value": 500, "comparator": ">=", "code": "mg/dL"}}, (">=500", "mg/dL")),
        ({"valueInteger": 3}, ("3", "")),
        ({"valueBoolean": False}, ("false", "")),
        ({"valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "260385009"}]}}, ("260385009", "")),
        ({"valueCodeableConcept": {"text": "Not detected"}}, ("Not detected", "")),
        ({"valueRange": {"low": {"value": 2, "unit": "g"}, "high": {"value": 4, "unit": "g"}}}, ("2-4", "g")),
        ({"valueRatio": {"numerator": {"value": 1, "unit": "mg"}, "denominator": {"value": 2, "unit": "mL"}}},
         ("1:2", "mg/mL")),
        ({"valueDateTime": "2026-11-26T09:00:00Z"}, ("2026-11-26T09:00:00Z", "")),
        ({}, ("", "")),
    ],
)  # fmt: skip
def test_each_kind_of_value_is_shown_faithfully(value, shown):
    body = epic_bundle([lab_observation("2345-7", "Glucose", "Glucose", **value)])
    observation = parse_report(body, "o").observations[0]
    assert (observation.value, observation.units) == shown


def test_an_observation_entered_in_error_is_withdrawn_and_not_counted():
    retracted = sodium()
    retracted["status"] = "entered-in-error"
    report = parse_report(epic_bundle([retracted, troponin()]), "o")
    withdrawn = report.observations[0]
    assert (withdrawn.retracted, withdrawn.value, withdrawn.severity) == ("entered in error", "", INFO)
    assert report.observations[1].value == "<0.01"
    assert report.severity == INFO and report.counts == (0, 0) and report.retracted_count == 1
    assert report.status == "final" and not report.retracted


def test_a_report_entered_in_error_withdraws_the_whole_result_and_outranks_the_final():
    final = parse_report(epic_bundle([sodium()], order="ORD-EIE", issued="2026-11-26T14:00:00Z"), "o")
    assert final.severity == URGENT
    withdrawn = parse_report(
        epic_bundle([sodium()], order="ORD-EIE", status="entered-in-error", issued="2026-11-26T13:00:00Z"), "o"
    )
    assert (withdrawn.status, withdrawn.retracted, withdrawn.severity) == ("retracted", "entered in error", INFO)
    assert [(o.value, o.retracted) for o in withdrawn.observations] == [("", "entered in error")]
    assert withdrawn.order_number == final.order_number
    assert withdrawn.version > final.version  # even with an earlier time


def test_statuses_and_versions():
    """A version never loses to one less far along, whatever the times; among equals, the later wins."""
    prelim = parse_report(diagnostic_report(status="preliminary", issued="2026-11-26T08:00:00Z"), "o")
    same_time = parse_report(diagnostic_report(status="preliminary", issued="2026-11-26T09:00:00+01:00"), "o")
    assert same_time.version == prelim.version  # 09:00+01:00 is 08:00Z
    later_prelim = parse_report(diagnostic_report(status="preliminary", issued="2026-11-26T10:00:00Z"), "o")
    early_final = parse_report(diagnostic_report(status="final", issued="2026-11-26T07:00:00Z"), "o")
    assert later_prelim.version > prelim.version
    assert early_final.version > later_prelim.version  # a final outranks a preliminary, whatever the times
    amended = parse_report(diagnostic_report(status="amended", issued="2026-11-26T06:00:00Z"), "o")
    corrected = parse_report(diagnostic_report(status="corrected", issued="2026-11-26T06:30:00Z"), "o")
    assert (amended.status, corrected.status) == ("amended", "corrected")
    assert corrected.version > amended.version > early_final.version
    assert version_of("final", None, 1_700_000_000_000) == version_of("final", 1_700_000_000_000, 1_800_000_000_000)


def test_the_same_resource_has_the_same_digest_whatever_its_key_order():
    body = diagnostic_report(order="ORD-D")
    reordered = dict(reversed(list(copy.deepcopy(body).items())))
    assert body_digest(body) == body_digest(reordered)
    assert body_digest(body) != body_digest({**body, "status": "amended"})


# --- refusals ---------------------------------------------------------------------------------------


def broken(edit) -> dict:
    body = diagnostic_report(order="ORD-X")
    edit(body)
    return body


def broken_bundle(edit) -> dict:
    body = epic_bundle([troponin(), sodium()], order="ORD-XB")
    edit(body)
    return body


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"resourceType": "Observation"}, "invalid_resource_type", "resourceType"),
        ({"resourceType": {"$gt": ""}}, "invalid_resource_type", "resourceType"),
        ({}, "invalid_resource_type", "resourceType"),
        (broken(lambda b: b.update(status="draft")), "invalid_status", "status"),
        (broken(lambda b: b.update(status={"$gt": ""})), "invalid_type", "status"),
        (broken(lambda b: b.pop("status")), "missing_field", "status"),
        (broken(lambda b: b.pop("code")), "missing_field", "code"),
        (broken(lambda b: b.update(code={"coding": []})), "missing_field", "code"),
        (broken(lambda b: b.pop("subject")), "missing_field", "subject"),
        (broken(lambda b: b.update(subject={"reference": {"$ne": None}})), "invalid_type", "subject.reference"),
        (broken(lambda b: [b.pop("identifier"), b.pop("id")]), "missing_field", "identifier"),
        (broken(lambda b: b.update(result=[{"reference": "#nope"}])), "unresolved_reference", "result[0]"),
        (broken(lambda b: b.update(result={"reference": "#k"})), "invalid_type", "result"),
        (broken(lambda b: b["contained"][0].update(resourceType="Patient")), "invalid_reference", "result[0]"),
        (broken(lambda b: b["contained"].append({"resourceType": "Patient", "id": "p"}) or
                b.update(result=[{"reference": "#p"}])), "invalid_reference", "result[0]"),
        (broken(lambda b: b["contained"][0]["valueQuantity"].update(value="6.9")), "invalid_type",
         "result[0].valueQuantity.value"),
        (broken(lambda b: b.update(issued="yesterday")), "invalid_time", "issued"),
        (broken(lambda b: b.update(code={"text": "x" * 1001})), "too_long", "code.text"),
        (broken(lambda b: b.update(result=[{"reference": "#k"}] * 501)), "too_many", "result"),
        ({"resourceType": "Bundle", "type": "collection", "entry": []}, "invalid_bundle", "entry"),
        # FHIR JSON is stricter than JSON parsers: no NaN or Infinity, no lone surrogates.
        (broken(lambda b: b["contained"][0]["valueQuantity"].update(value=float("nan"))), "invalid_type",
         "contained[0].valueQuantity.value"),
        (broken(lambda b: b["contained"][1]["referenceRange"][0]["high"].update(value=float("inf"))),
         "invalid_type", "contained[1].referenceRange[0].high.value"),
        (broken(lambda b: b.update(extension=[{"url": "http://x.example/e", "valueDecimal": float("-inf")}])),
         "invalid_type", "extension[0].valueDecimal"),
        (broken(lambda b: b["code"].update(text="Basic \ud800 panel")), "invalid_type", "code.text"),
        (broken(lambda b: b.update(extension=nested(60))), "too_deep", None),
        (broken(lambda b: b.update(extension=nested(5000))), "too_deep", None),
        # The rest, judged by the fhir.resources R4B model.
        (broken(lambda b: b["contained"][0].update(valueQuantiy={"value": 1})), "unknown_field",
         "contained[0].valueQuantiy"),
        (broken(lambda b: b.update(bogus=1)), "unknown_field", "bogus"),
        (broken(lambda b: b["contained"][0].update(valueString="high")), "invalid_resource", "contained[0]"),
        (broken(lambda b: b["contained"].append({"resourceType": "Nonsense", "id": "n"})), "invalid_resource_type",
         "contained[3].resourceType"),
        (broken(lambda b: b["contained"].append({"resourceType": "Quantity", "id": "q"})), "invalid_resource_type",
         "contained[3].resourceType"),
        (broken(lambda b: b.update(effectiveDateTime="2026-11-26T07:30")), "invalid_time", "effectiveDateTime"),
        (broken(lambda b: b.update(issued="2026-11-26T08:15:00")), "invalid_time", "issued"),  # no offset
        (broken(lambda b: b.update(id="has spaces")), "invalid_resource", "id"),
        (broken(lambda b: b["contained"][0]["valueQuantity"].update(comparator="~")), "invalid_value",
         "result[0].valueQuantity.comparator"),
        (broken(lambda b: b["contained"][0].update(dataAbsentReason={"text": "Error"})), "invalid_resource",
         "result[0].dataAbsentReason"),  # a value and a reason for its absence (obs-6)
        (broken(lambda b: b["contained"][0].update(note=[{"text": 5}])), "invalid_type", "result[0].note[0].text"),
        (broken(lambda b: b["contained"][0].update(valueInteger=2.5) or b["contained"][0].pop("valueQuantity")),
         "invalid_type", "result[0].valueInteger"),
        (broken(lambda b: b["contained"][0].update(valueBoolean="true") or b["contained"][0].pop("valueQuantity")),
         "invalid_type", "result[0].valueBoolean"),
        (broken_bundle(lambda b: b.pop("type")), "missing_field", "type"),
        (broken_bundle(lambda b: b["entry"].append({"resource": {"resourceType": "Foo"}})),
         "invalid_resource_type", "entry[3].resource.resourceType"),
        (broken_bundle(lambda b: b["entry"][1]["resource"]["valueQuantity"].update(value=float("nan"))),
         "invalid_type", "entry[1].resource.valueQuantity.value"),
        (broken_bundle(lambda b: b["entry"][2]["resource"].update(status={"$gt": ""})), "invalid_type",
         "result[1].status"),
        (broken_bundle(lambda b: b["entry"].append(copy.deepcopy(b["entry"][0]))), "invalid_bundle", "entry"),
    ],
)  # fmt: skip
def test_malformed_reports_are_refused_with_a_stable_code(body, code, field):
    with pytest.raises(InvalidInput) as caught:
        parse_report(body, "o")
    assert caught.value.code == code
    if field is not None:
        assert caught.value.details["field"] == field
    assert caught.value.http_status == 400


def test_a_refusal_names_the_path_never_the_value():
    secret = "MRN-SECRET-4471"
    bodies = [
        broken(lambda b: b.update(id=f"{secret} x")),
        broken(lambda b: b.update(effectiveDateTime=secret)),
        broken(lambda b: b["contained"][0].update(valueString=secret)),
        broken(lambda b: b["contained"][0]["valueQuantity"].update(value=secret)),
        broken(lambda b: b.update(meta={"versionId": {"$gt": secret}})),
    ]
    for body in bodies:
        with pytest.raises(InvalidInput) as caught:
            parse_report(body, "o")
        assert secret not in json.dumps([caught.value.message, caught.value.details])


# --- the FHIR Appointment input: the same hardening ------------------------------------------------


def appointment(**changes) -> dict:
    body = {
        "resourceType": "Appointment",
        "id": "appt-9",
        "status": "booked",
        "start": "2026-12-02T10:00:00-06:00",
        "end": "2026-12-02T10:50:00-06:00",
        "participant": [{"actor": {"reference": "Practitioner/stf_riverbend_patel"}, "status": "accepted"}],
    }
    body.update(changes)
    return body


def test_an_appointment_written_as_senders_write_it_is_taken():
    body = appointment(
        meta={"versionId": "3", "lastUpdated": "2026-11-30T15:00:00Z"},
        identifier=[{"system": EHR_OID, "value": "44981"}],
        serviceType=[{"coding": [{"system": SNOMED, "code": "394913002", "display": "Psychotherapy"}]}],
        appointmentType={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0276",
                                     "code": "FOLLOWUP", "display": "A follow up visit"}]},
        minutesDuration=50,
        participant=[
            {"type": [{"coding": [{"code": "ATND"}]}], "actor": {"reference": "Practitioner/stf_riverbend_patel",
                                                               "display": "Priya Patel"},
             "required": "required", "status": "accepted"},
            {"actor": {"reference": "Location/room-2", "display": "Room 2"}, "status": "accepted"},
        ],
    )  # fmt: skip
    change = fhir_appointment.parse(body, "fhir:pm", "appt-9")
    assert (change.staff_ids, change.location, change.visit_type) == (
        ("stf_riverbend_patel",), "Room 2", "A follow up visit",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (appointment(minutesDuration=float("nan")), "invalid_type", "minutesDuration"),
        (appointment(extension=[{"url": "http://x.example/e", "valueDecimal": float("inf")}]), "invalid_type",
         "extension[0].valueDecimal"),
        (appointment(extension=nested(100)), "too_deep", None),
        (appointment(comment="Bring \udc80 forms"), "invalid_type", "comment"),
        (appointment(participant=[{"actor": {"reference": "Practitioner/stf_x"}, "status": "accepted",
                                   "bogus": 1}]), "unknown_field", "participant[0].bogus"),
        (appointment(created="yesterday"), "invalid_time", "created"),
        (appointment(status={"$gt": ""}), "invalid_type", "status"),
    ],
)  # fmt: skip
def test_malformed_appointments_are_refused_with_a_stable_code(body, code, field):
    with pytest.raises(InvalidInput) as caught:
        fhir_appointment.parse(body, "fhir:pm")
    assert caught.value.code == code
    if field is not None:
        assert caught.value.details["field"] == field


# --- refusals on the FHIR routes, as answered -------------------------------------------------------


@pytest.fixture
def fhir_app():
    """A kit app with one FHIR route answering errors as OperationOutcomes (as the partner routes do)."""
    from flask import Blueprint

    from services.kit.http import create_app
    from services.kit.validation import json_body
    from services.notifications.fhir_errors import answer_errors_in_fhir

    partner = Blueprint("partner", __name__, url_prefix="/fhir")
    answer_errors_in_fhir(partner)

    @partner.post("/DiagnosticReport")
    def report():
        body = json_body()
        if body.get("boom"):
            raise RuntimeError("a secret value 6.9 in an internal error")
        return {"status": parse_report(body, "o").status}, 201

    app = create_app("t", None, max_body_bytes=512 * 1024)
    app.register_blueprint(partner)
    return app.test_client()


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code", "issue"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "application/fhir+json", 400, "too_deep", "structure"),
        (b'{"resourceType": "DiagnosticReport", "status": NaN}', "application/json", 400, "invalid_type", "structure"),
        (json.dumps(broken(lambda b: b.pop("code"))).encode(), "application/fhir+json", 400, "missing_field",
         "required"),
        (b"x" * 600_000, "application/json", 413, "payload_too_large", "too-long"),
        (b"{}", "text/plain", 415, "unsupported_media_type", "not-supported"),
        (b'{"boom": true}', "application/json", 500, "internal_error", "exception"),
    ],
)  # fmt: skip
def test_every_refusal_is_an_operation_outcome_in_fhir_json(fhir_app, data, content_type, status, code, issue):
    reply = fhir_app.post("/fhir/DiagnosticReport", data=data, content_type=content_type)
    assert reply.status_code == status
    assert reply.mimetype == "application/fhir+json"
    body = reply.get_json(force=True)
    assert (body["code"], body["resourceType"], body["issue"][0]["code"]) == (code, "OperationOutcome", issue)
    assert body["issue"][0]["diagnostics"] == body["message"] and "6.9" not in reply.get_data(as_text=True)


def test_a_success_stays_plain_json(fhir_app):
    reply = fhir_app.post("/fhir/DiagnosticReport", json=diagnostic_report())
    assert (reply.status_code, reply.mimetype, reply.get_json()) == (201, "application/json", {"status": "final"})
