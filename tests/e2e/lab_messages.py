"""Realistic HL7 v2.5.1 ORU^R01 messages for the lab tests and the benchmark."""

from __future__ import annotations

import uuid

FACILITY = "RIVERBEND"  # registered to agy_riverbend in development (NOTIFICATIONS_FACILITIES)


def oru(
    *,
    control_id: str | None = None,
    order: str | None = None,
    status: str = "F",
    observations: list[str] | None = None,
    sent_at: str = "20261126081500",
    receiving_facility: str = FACILITY,
    sending_facility: str = "QUEST_LAB",
    patient: str = "MRN48213",
    patient_name: str = "DOE^JANE^Q",
    test: str = "58410-2^CBC panel - Blood by Automated count^LN",
    separator: str = "\r",
) -> str:
    control_id = control_id or "MSG" + uuid.uuid4().hex[:16]
    order = order or "ORD" + uuid.uuid4().hex[:10]
    observations = CBC if observations is None else observations
    segments = [
        f"MSH|^~\\&|LABSYS|{sending_facility}|BOARD|{receiving_facility}|{sent_at}||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        f"PID|1||{patient}^^^RIVERBEND^MR||{patient_name}||19800214|F",
        f"ORC|RE|PLC{order}|{order}",
        f"OBR|1|PLC{order}|{order}|{test}|||202611260730|||||||||1234^SMITH^ANNA||||||{sent_at}|||{status}",
        *observations,
    ]
    return separator.join(segments) + separator


# A CBC panel: mixed flags, one critical (platelets LL).
CBC = [
    "OBX|1|NM|6690-2^Leukocytes [#/volume] in Blood^LN||11.8|10*3/uL|4.5-11.0|H|||F",
    "OBX|2|NM|789-8^Erythrocytes [#/volume] in Blood^LN||4.62|10*6/uL|4.20-5.40|N|||F",
    "OBX|3|NM|718-7^Hemoglobin [Mass/volume] in Blood^LN||11.2|g/dL|12.0-16.0|L|||F",
    "OBX|4|NM|4544-3^Hematocrit [Volume Fraction] of Blood^LN||38.1|%|36.0-46.0||||F",
    "OBX|5|NM|777-3^Platelets [#/volume] in Blood^LN||18|10*3/uL|150-400|LL|||F",
]

# A single critical value: potassium 6.9 (HH).
POTASSIUM_CRITICAL = ["OBX|1|NM|2823-3^Potassium [Moles/volume] in Serum or Plasma^LN||6.9|mmol/L|3.5-5.1|HH|||F"]
POTASSIUM_TEST = "2823-3^Potassium^LN"


def diagnostic_report(
    *,
    order: str | None = None,
    status: str = "final",
    patient: str = "MRN48213",
    issued: str = "2026-11-26T08:15:00Z",
) -> dict:
    """A FHIR R4 DiagnosticReport (basic metabolic panel) with contained Observations: one critical
    (potassium HH), one high (glucose H), one normal (sodium N)."""
    order = order or "FHIR-" + uuid.uuid4().hex[:10]

    def observation(local_id, loinc, name, value, unit, low, high, flag):
        return {
            "resourceType": "Observation",
            "id": local_id,
            "status": status if status in ("preliminary", "final", "amended", "corrected") else "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc, "display": name}]},
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
            "referenceRange": [{"low": {"value": low, "unit": unit}, "high": {"value": high, "unit": unit}}],
            "interpretation": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                            "code": flag,
                        }
                    ]
                }
            ],
        }

    return {
        "resourceType": "DiagnosticReport",
        "id": order.lower(),
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": order}],
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": "51990-0", "display": "Basic metabolic panel"}]},
        "subject": {"reference": f"Patient/{patient}", "identifier": {"value": patient}},
        "effectiveDateTime": "2026-11-26T07:30:00Z",
        "issued": issued,
        "contained": [
            observation("k", "2823-3", "Potassium", 6.9, "mmol/L", 3.5, 5.1, "HH"),
            observation("glu", "2345-7", "Glucose", 162, "mg/dL", 70, 99, "H"),
            observation("na", "2951-2", "Sodium", 140, "mmol/L", 136, 145, "N"),
        ],
        "result": [{"reference": "#k"}, {"reference": "#glu"}, {"reference": "#na"}],
    }


def as_bundle(report: dict) -> dict:
    """The same report as a Bundle whose Observations are entries referenced by type/id."""
    report = {**report}
    observations = report.pop("contained")
    report["result"] = [{"reference": f"Observation/{o['id']}"} for o in observations]
    entries = [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": report}]
    entries += [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": o} for o in observations]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}
