"""FHIR R4 DiagnosticReport (JSON) -> LabReport: pure validation, every refusal a 400 with a stable code.

Accepted: a DiagnosticReport whose `result` references Observations it contains (`#id`), or a
Bundle holding one DiagnosticReport and the Observations it references (by `fullUrl`, e.g.
`urn:uuid:...`, or `Observation/<id>`). Abnormality comes from each Observation's `interpretation`
codes (v3-ObservationInterpretation: H, L, A, HH, LL, AA, <, >, N, ...), mapped as OBX-8 flags are.

Values are shown as the sender wrote them: `valueQuantity` with its comparator ("<0.01"),
`valueString`, `valueCodeableConcept` (text, else display, else code), `valueInteger`,
`valueBoolean`, `valueRange` ("3.5-5.1"), `valueRatio` ("1:40"), `valueDateTime`, `valueTime`,
`valuePeriod`; `dataAbsentReason` is shown instead of a value. An Observation entered in error is
withdrawn (its value withheld, never counted); a DiagnosticReport entered in error withdraws the
whole result.

Order of checks: the resource type; then what JSON parsers take but FHIR JSON cannot (nesting,
NaN/Infinity, non-Unicode text: fhir_errors.check_json); then what we read, strictly (JSON types,
lengths, references), so those refusals keep their codes and paths; last, the whole body against
the fhir.resources R4B model (element names, cardinality, primitive formats) for everything else.
We read the raw JSON rather than the model because the model coerces JSON types ("6.9" for a
decimal, "true" for a boolean), which FHIR JSON does not allow.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from services.kit.errors import InvalidInput
from services.notifications.fhir_errors import check_json, check_model
from services.notifications.lab_domain import FHIR_STATUSES, LabReport, Observation, version_of

MAX_TEXT = 1000
MAX_RESULTS = 500
MAX_ENTRIES = 1000
MAX_NOTES = 50
ENTERED_IN_ERROR = "entered in error"
COMPARATORS = ("<", "<=", ">=", ">")


def _bad(code: str, message: str, path: str) -> InvalidInput:
    return InvalidInput(code, message, {"field": path})


def _text(value: Any, path: str, *, required: bool = False) -> str:
    if value is None:
        if required:
            raise _bad("missing_field", f"{path} is required", path)
        return ""
    if not isinstance(value, str):
        raise _bad("invalid_type", f"{path} must be a string", path)
    if len(value) > MAX_TEXT:
        raise _bad("too_long", f"{path} is longer than {MAX_TEXT} characters", path)
    return value.strip()


def _object(value: Any, path: str, *, required: bool = False) -> dict:
    if value is None:
        if required:
            raise _bad("missing_field", f"{path} is required", path)
        return {}
    if not isinstance(value, dict):
        raise _bad("invalid_type", f"{path} must be an object", path)
    return value


def _list(value: Any, path: str, limit: int) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("invalid_type", f"{path} must be an array", path)
    if len(value) > limit:
        raise _bad("too_many", f"{path} may hold at most {limit} items", path)
    return value


def _number(value: Any, path: str, *, whole: bool = False) -> str:
    """A JSON number as text: repr keeps every digit a float holds ("1234567.5", not "1.23457e+06")."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float) or (whole and not isinstance(value, int)):
        raise _bad("invalid_type", f"{path} must be a {'whole ' if whole else ''}number", path)
    return repr(value) if isinstance(value, float) else str(value)


def _concept(value: Any, path: str, *, required: bool = False) -> tuple[str, str]:
    """A CodeableConcept as (code, display text)."""
    concept = _object(value, path, required=required)
    codings = _list(concept.get("coding"), f"{path}.coding", 50)
    code = display = ""
    for i, item in enumerate(codings):
        coding = _object(item, f"{path}.coding[{i}]")
        code = code or _text(coding.get("code"), f"{path}.coding[{i}].code")
        display = display or _text(coding.get("display"), f"{path}.coding[{i}].display")
    text = _text(concept.get("text"), f"{path}.text") or display or code
    if required and not (code or text):
        raise _bad("missing_field", f"{path} needs a code or a text", path)
    return code, text


def _codes(value: Any, path: str) -> tuple[str, ...]:
    """Every coding code of a list of CodeableConcepts (interpretation)."""
    codes = []
    for i, item in enumerate(_list(value, path, 20)):
        concept = _object(item, f"{path}[{i}]")
        for j, coding in enumerate(_list(concept.get("coding"), f"{path}[{i}].coding", 20)):
            code = _text(_object(coding, f"{path}[{i}].coding[{j}]").get("code"), f"{path}[{i}].coding[{j}].code")
            if code:
                codes.append(code)
    return tuple(codes)


def _quantity(value: Any, path: str) -> tuple[str, str]:
    """A Quantity as (value with its comparator, e.g. "<0.01", units)."""
    quantity = _object(value, path)
    unit = _text(quantity.get("unit"), f"{path}.unit") or _text(quantity.get("code"), f"{path}.code")
    number = _number(quantity.get("value"), f"{path}.value")
    comparator = _text(quantity.get("comparator"), f"{path}.comparator")
    if comparator and comparator not in COMPARATORS:
        raise _bad("invalid_value", f"{path}.comparator must be one of {', '.join(COMPARATORS)}", f"{path}.comparator")
    return (comparator + number if number else ""), unit


def _range(value: Any, path: str) -> tuple[str, str]:
    """A Range as ("low-high", ">=low" or "<=high", units)."""
    bounds = _object(value, path)
    low, low_unit = _quantity(bounds.get("low"), f"{path}.low")
    high, high_unit = _quantity(bounds.get("high"), f"{path}.high")
    if low and high:
        shown = f"{low}-{high}"
    else:
        shown = f">={low}" if low else (f"<={high}" if high else "")
    return shown, low_unit or high_unit


def _ratio(value: Any, path: str) -> tuple[str, str]:
    """A Ratio as ("numerator:denominator", e.g. a titer "1:40", units "a/b" when they are given)."""
    ratio = _object(value, path)
    numerator, top = _quantity(ratio.get("numerator"), f"{path}.numerator")
    denominator, bottom = _quantity(ratio.get("denominator"), f"{path}.denominator")
    if not (numerator or denominator):
        return "", ""
    return f"{numerator}:{denominator}", (f"{top}/{bottom}" if top or bottom else "")


def _value(resource: dict, path: str) -> tuple[str, str]:
    """Observation.value[x] as the sender wrote it: (value text, units)."""
    if "valueQuantity" in resource:
        return _quantity(resource["valueQuantity"], f"{path}.valueQuantity")
    if "valueString" in resource:
        return _text(resource["valueString"], f"{path}.valueString"), ""
    if "valueCodeableConcept" in resource:
        return _concept(resource["valueCodeableConcept"], f"{path}.valueCodeableConcept")[1], ""
    if "valueInteger" in resource:
        return _number(resource["valueInteger"], f"{path}.valueInteger", whole=True), ""
    if "valueBoolean" in resource:
        flag = resource["valueBoolean"]
        if not isinstance(flag, bool):
            raise _bad("invalid_type", f"{path}.valueBoolean must be true or false", f"{path}.valueBoolean")
        return ("true" if flag else "false"), ""
    if "valueRange" in resource:
        return _range(resource["valueRange"], f"{path}.valueRange")
    if "valueRatio" in resource:
        return _ratio(resource["valueRatio"], f"{path}.valueRatio")
    for name in ("valueDateTime", "valueTime"):
        if name in resource:
            return _text(resource[name], f"{path}.{name}"), ""
    if "valuePeriod" in resource:
        period = _object(resource["valuePeriod"], f"{path}.valuePeriod")
        start = _text(period.get("start"), f"{path}.valuePeriod.start")
        end = _text(period.get("end"), f"{path}.valuePeriod.end")
        return (f"{start} to {end}" if start and end else start or end), ""
    if "valueSampledData" in resource:
        return "(sampled data: see the sending system)", ""  # a waveform is not text a board can show
    return "", ""


def _notes(value: Any, path: str) -> tuple[str, ...]:
    """Annotation texts (Observation.note), in order, empty ones left out."""
    notes = []
    for i, item in enumerate(_list(value, path, MAX_NOTES)):
        text = _text(_object(item, f"{path}[{i}]").get("text"), f"{path}[{i}].text")
        if text:
            notes.append(text)
    return tuple(notes)


def _observation(resource: dict, path: str) -> Observation:
    if resource.get("resourceType") != "Observation":
        raise _bad("invalid_reference", f"{path} must reference an Observation", path)
    code, name = _concept(resource.get("code"), f"{path}.code", required=True)
    status = _text(resource.get("status"), f"{path}.status")
    value, units = _value(resource, path)
    absent_reason = ""
    if "dataAbsentReason" in resource:
        absent_reason = _concept(resource["dataAbsentReason"], f"{path}.dataAbsentReason")[1]
        if value:  # invariant obs-6: a reason for a missing value only where the value is missing
            raise _bad(
                "invalid_resource", f"{path}.dataAbsentReason is only for an Observation without a value",
                f"{path}.dataAbsentReason",
            )  # fmt: skip
    ranges = _list(resource.get("referenceRange"), f"{path}.referenceRange", 10)
    reference_range = ""
    if ranges:
        first = _object(ranges[0], f"{path}.referenceRange[0]")
        low = _quantity(first.get("low"), f"{path}.referenceRange[0].low")[0]
        high = _quantity(first.get("high"), f"{path}.referenceRange[0].high")[0]
        reference_range = _text(first.get("text"), f"{path}.referenceRange[0].text") or (
            f"{low}-{high}" if low and high else (f">={low}" if low else (f"<={high}" if high else ""))
        )
    retracted = ENTERED_IN_ERROR if status == "entered-in-error" else ""
    return Observation(
        code=code,
        name=name,
        value="" if retracted else value,
        units=units,
        reference_range=reference_range,
        flags=_codes(resource.get("interpretation"), f"{path}.interpretation"),
        status=status,
        comments=_notes(resource.get("note"), f"{path}.note"),
        retracted=retracted,
        absent_reason=absent_reason,
    )


def _resource_type(resource: dict, path: str) -> str:
    """The resourceType of a contained resource or Bundle entry: a resource FHIR R4 defines."""
    kind = _text(resource.get("resourceType"), f"{path}.resourceType", required=True)
    try:
        known = get_fhir_model_class(kind).has_resource_base()
    except ValueError:
        known = False
    if not known or kind in ("Resource", "DomainResource"):
        raise _bad("invalid_resource_type", f"{path}.resourceType is not a FHIR R4 resource", f"{path}.resourceType")
    return kind


def _split_bundle(body: dict) -> tuple[dict, dict[str, dict]]:
    """(the DiagnosticReport, the resources by every name a reference may use)."""
    if body.get("resourceType") == "DiagnosticReport":
        resources = {}
        for i, item in enumerate(_list(body.get("contained"), "contained", MAX_RESULTS)):
            resource = _object(item, f"contained[{i}]")
            _resource_type(resource, f"contained[{i}]")
            local_id = _text(resource.get("id"), f"contained[{i}].id")
            if local_id:
                resources[f"#{local_id}"] = resource
        return body, resources
    report = None
    resources = {}
    for i, item in enumerate(_list(body.get("entry"), "entry", MAX_ENTRIES)):
        entry = _object(item, f"entry[{i}]")
        resource = _object(entry.get("resource"), f"entry[{i}].resource", required=True)
        kind = _resource_type(resource, f"entry[{i}].resource")
        if kind == "DiagnosticReport":
            if report is not None:
                raise _bad("invalid_bundle", "a Bundle must hold exactly one DiagnosticReport", "entry")
            report = resource
            continue
        full_url = _text(entry.get("fullUrl"), f"entry[{i}].fullUrl")
        resource_id = _text(resource.get("id"), f"entry[{i}].resource.id")
        for name in (full_url, f"{kind}/{resource_id}" if resource_id else ""):
            if name:
                resources[name] = resource
    if report is None:
        raise _bad("invalid_bundle", "a Bundle must hold exactly one DiagnosticReport", "entry")
    return report, resources


def _instant_ms(value: Any, path: str) -> int | None:
    text = _text(value, path)
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise _bad("invalid_time", f"{path} must be an ISO-8601 time", path) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def _report_comments(report: dict) -> tuple[str, ...]:
    """DiagnosticReport.conclusion, then the text of each conclusionCode."""
    comments = [_text(report.get("conclusion"), "conclusion")]
    for i, item in enumerate(_list(report.get("conclusionCode"), "conclusionCode", 20)):
        comments.append(_concept(item, f"conclusionCode[{i}]")[1])
    return tuple(c for c in comments if c)


def parse_report(body: dict, origin: str) -> LabReport:
    """A DiagnosticReport (or a Bundle holding one) as a LabReport; InvalidInput when malformed."""
    kind = body.get("resourceType")
    if kind not in ("DiagnosticReport", "Bundle"):
        raise _bad(
            "invalid_resource_type", "resourceType must be DiagnosticReport (or a Bundle holding one)", "resourceType"
        )
    check_json(body)
    report, resources = _split_bundle(body)
    raw_status = _text(report.get("status"), "status", required=True)
    status = FHIR_STATUSES.get(raw_status)
    if status is None:
        raise _bad("invalid_status", "status must be a DiagnosticReport status we take", "status")
    test_code, test_name = _concept(report.get("code"), "code", required=True)
    subject = _object(report.get("subject"), "subject", required=True)
    patient_ref = _text(
        _object(subject.get("identifier"), "subject.identifier").get("value"), "subject.identifier.value"
    )
    patient_ref = patient_ref or _text(subject.get("reference"), "subject.reference").removeprefix("Patient/")
    if not patient_ref:
        raise _bad("missing_field", "subject needs a reference or an identifier", "subject")
    order_number = ""
    for i, identifier in enumerate(_list(report.get("identifier"), "identifier", 20)):
        order_number = order_number or _text(
            _object(identifier, f"identifier[{i}]").get("value"), f"identifier[{i}].value"
        )
    for i, based_on in enumerate(_list(report.get("basedOn"), "basedOn", 20)):
        order_number = order_number or _text(
            _object(based_on, f"basedOn[{i}]").get("reference"), f"basedOn[{i}].reference"
        )
    order_number = order_number or _text(report.get("id"), "id")
    if not order_number:
        raise _bad("missing_field", "identifier, basedOn or id is required to tell the order", "identifier")
    observations = []
    for i, result in enumerate(_list(report.get("result"), "result", MAX_RESULTS)):
        reference = _text(_object(result, f"result[{i}]").get("reference"), f"result[{i}].reference", required=True)
        resource = resources.get(reference)
        if resource is None:
            raise _bad(
                "unresolved_reference", f"result[{i}] references an Observation not in the request", f"result[{i}]"
            )
        observations.append(_observation(resource, f"result[{i}]"))
    retracted = ENTERED_IN_ERROR if raw_status == "entered-in-error" else ""
    if retracted:  # the whole report withdrawn: none of its values stands
        observations = [_withdrawn(o) for o in observations]
    issued = _instant_ms(report.get("issued"), "issued")
    updated = _instant_ms(_object(report.get("meta"), "meta").get("lastUpdated"), "meta.lastUpdated")
    check_model(DiagnosticReport if kind == "DiagnosticReport" else Bundle, body)
    return LabReport(
        origin=origin,
        order_number=order_number,
        patient_ref=patient_ref,
        test_code=test_code,
        test_name=test_name,
        status=status,
        observed_at=_text(report.get("effectiveDateTime"), "effectiveDateTime"),
        observations=tuple(observations),
        version=version_of(status, issued, updated),
        comments=_report_comments(report),
        retracted=retracted,
        patient_name=_text(subject.get("display"), "subject.display"),
    )


def _withdrawn(observation: Observation) -> Observation:
    if observation.retracted:
        return observation
    return dataclasses.replace(observation, value="", retracted=ENTERED_IN_ERROR)


def body_digest(body: dict) -> str:
    """The same resource sent twice has the same digest (key order and spacing do not matter)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
