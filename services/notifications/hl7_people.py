"""People named in HL7 v2 fields: the patient (PID-3, chosen by identifier type) and staff (XCN:
AIP-3, OBR-16, ORC-12, EVN-5, SCH-20; CWE: AIG-3), which repetition is a National Provider
Identifier. Pure, on python-hl7's parse tree.

A repetition is an NPI when XCN-13 (identifier type) is NPI, or XCN-9 (assigning authority) is NPI
by namespace or by its OID 2.16.840.1.113883.4.6, or, for a CWE (`coded`), CWE-3 names NPI."""

from __future__ import annotations

from services.kit.npi import NPI_OID
from services.notifications import hl7v2
from services.notifications.hl7v2 import component, field

NPI = "NPI"


def repetitions(segment, index: int) -> int:
    """How many repetitions field `index` has (at least 1, as HL7 reads an empty field)."""
    if index >= len(segment) or isinstance(segment[index], str):
        return 1
    return max(1, len(segment[index]))


def subcomponents(segment, index: int, comp: int, rep: int = 1) -> list[str]:
    """The subcomponents of one component ([] when absent); python-hl7 leaves unsplit parts as str."""
    if index >= len(segment):
        return []
    value = segment[index]
    for position in (rep, comp):
        if isinstance(value, str):
            return [value] if position == 1 else []
        if position > len(value):
            return []
        value = value[position - 1]
    return [value] if isinstance(value, str) else [str(sub) for sub in value]


def says_npi(segment, index: int, rep: int, *, coded: bool = False) -> bool:
    """Whether repetition `rep` of field `index` names its person by NPI (see the module doc)."""
    if component(segment, index, 13, rep).upper() == NPI:
        return True
    authority = subcomponents(segment, index, 9, rep)
    if authority and (authority[0].upper() == NPI or NPI_OID in authority[1:2]):
        return True
    return coded and component(segment, index, 3, rep).upper() in (NPI, NPI_OID)


def _field_repetitions(segment, index: int) -> int:
    """Repetitions of a field, 0 when it is empty."""
    return repetitions(segment, index) if index < len(segment) and field(segment, index) else 0


def patient_identifier(pid, where: str, id_type: str = "MR", authority: str = "") -> str:
    """The PID-3 identifier of the registered type (and authority); AE when there is none."""
    untyped = []
    count = _field_repetitions(pid, 3)
    for rep in range(1, count + 1):
        value = component(pid, 3, 1, rep).strip()
        kind = component(pid, 3, 5, rep).strip().upper()
        if not value:
            continue
        if not kind:
            untyped.append(value)
            continue
        namespace, universal = _authority(pid, rep)
        if kind == id_type.upper() and (not authority or authority in (namespace, universal)):
            return value
    if count == 1 and len(untyped) == 1:
        return untyped[0]
    wanted = id_type + (f" assigned by {authority}" if authority else "")
    if not count:
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "PID-3 patient identifier is required", f"{where}^3")
    raise hl7v2.error(
        hl7v2.REQUIRED_FIELD_MISSING, f"PID-3 has no patient identifier of type {wanted}", f"{where}^3"
    )


def _authority(pid, rep: int) -> tuple[str, str]:
    """CX-4 (HD) of PID-3 repetition `rep`: (namespace id, universal id), either may be ""."""
    try:
        value = pid[3][rep - 1][3]
    except (IndexError, TypeError):
        return "", ""
    if isinstance(value, str):
        return value, ""
    parts = [str(p) for p in value] if len(value) > 1 else str(value).split("&")
    return (parts[0] if parts else ""), (parts[1] if len(parts) > 1 else "")


def _authority(pid, rep: int) -> tuple[str, str]:
    """CX-4 (HD) of PID-3 repetition `rep`: (namespace id, universal id), either may be ""."""
    parts = subcomponents(pid, 3, 4, rep)
    return (parts[0] if parts else ""), (parts[1] if len(parts) > 1 else "")
