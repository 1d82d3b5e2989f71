"""FHIR R4 DiagnosticReport -> lab result, pure: what is taken, and every refusal's stable code."""

from __future__ import annotations

import copy

import pytest

from services.kit.errors import InvalidInput
from services.notifications.fhir import body_digest, parse_report
from services.notifications.lab_domain import URGENT
from tests.e2e.lab_messages import as_bundle, diagnostic_report


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


def test_a_bundle_with_referenced_observations_reads_the_same():
    body = diagnostic_report(order="ORD-F2")
    assert parse_report(as_bundle(body), "o").observations == parse_report(body, "o").observations


def test_statuses_and_versions():
    prelim = parse_report(diagnostic_report(status="preliminary", issued="2026-11-26T08:00:00Z"), "o")
    amended = parse_report(diagnostic_report(status="amended", issued="2026-11-26T09:00:00+01:00"), "o")
    assert (prelim.status, amended.status) == ("preliminary", "amended")
    assert amended.version - prelim.version == 0  # 09:00+01:00 is 08:00Z
    corrected = parse_report(diagnostic_report(status="corrected", issued="2026-11-26T08:30:00Z"), "o")
    assert corrected.version > prelim.version


def test_the_same_resource_has_the_same_digest_whatever_its_key_order():
    body = diagnostic_report(order="ORD-D")
    reordered = dict(reversed(list(copy.deepcopy(body).items())))
    assert body_digest(body) == body_digest(reordered)
    assert body_digest(body) != body_digest({**body, "status": "amended"})


def broken(edit) -> dict:
    body = diagnostic_report(order="ORD-X")
    edit(body)
    return body


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"resourceType": "Observation"}, "invalid_resource_type"),
        ({"resourceType": {"$gt": ""}}, "invalid_resource_type"),
        ({}, "invalid_resource_type"),
        (broken(lambda b: b.update(status="entered-in-error")), "invalid_status"),
        (broken(lambda b: b.update(status={"$gt": ""})), "invalid_type"),
        (broken(lambda b: b.pop("status")), "missing_field"),
        (broken(lambda b: b.pop("code")), "missing_field"),
        (broken(lambda b: b.update(code={"coding": []})), "missing_field"),
        (broken(lambda b: b.pop("subject")), "missing_field"),
        (broken(lambda b: b.update(subject={"reference": {"$ne": None}})), "invalid_type"),
        (broken(lambda b: [b.pop("identifier"), b.pop("id")]), "missing_field"),
        (broken(lambda b: b.update(result=[{"reference": "#nope"}])), "unresolved_reference"),
        (broken(lambda b: b.update(result={"reference": "#k"})), "invalid_type"),
        (broken(lambda b: b["contained"][0].update(resourceType="Patient")), "invalid_reference"),
        (broken(lambda b: b["contained"][0]["valueQuantity"].update(value="6.9")), "invalid_type"),
        (broken(lambda b: b.update(issued="yesterday")), "invalid_time"),
        (broken(lambda b: b.update(code={"text": "x" * 1001})), "too_long"),
        (broken(lambda b: b.update(result=[{"reference": "#k"}] * 501)), "too_many"),
        ({"resourceType": "Bundle", "entry": []}, "invalid_bundle"),
    ],
)
def test_malformed_reports_are_refused_with_a_stable_code(body, code):
    with pytest.raises(InvalidInput) as caught:
        parse_report(body, "o")
    assert caught.value.code == code
