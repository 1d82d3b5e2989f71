"""FHIR refusals, shared by the DiagnosticReport and Appointment inputs: the checks a FHIR body passes
before anything reads it (`check_json`, `check_model`), and the OperationOutcome every refusal on a
partner FHIR route is answered with (`answer_errors_in_fhir`).

Every refusal is InvalidInput with a stable code and `details.field` (the path of the first bad
element, e.g. `contained[0].valueQuantity.value`); messages name paths, never values.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from flask import Blueprint, current_app, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from services.kit.errors import DomainError, InvalidInput
from services.kit.http import HTTP_CODES, error_response

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
# Real resources nest under 25 levels; the model validates recursively, so depth is bounded well first.
MAX_DEPTH = 40
MAX_PATH = 200

# FHIR IssueType (http://hl7.org/fhir/issue-type) for our stable codes, then for HTTP statuses.
ISSUE_TYPES = {
    "malformed_json": "structure",
    "invalid_body": "structure",
    "invalid_type": "structure",
    "too_deep": "structure",
    "unknown_field": "structure",
    "missing_field": "required",
    "too_long": "too-long",
    "too_many": "too-long",
}
STATUS_ISSUE_TYPES = {
    401: "login",
    403: "forbidden",
    404: "not-found",
    409: "conflict",
    413: "too-long",
    415: "not-supported",
    429: "throttled",
    503: "transient",
}

# pydantic error types -> our stable codes (anything else is `invalid_resource`).
_TYPE_ERRORS = frozenset(
    {
        "string_type", "string_unicode", "list_type", "dict_type", "model_type", "model_attributes_type",
        "int_type", "int_parsing", "int_from_float", "bool_type", "bool_parsing", "float_type",
        "float_parsing", "decimal_type", "decimal_parsing", "is_instance_of",
    }
)  # fmt: skip
_CODES = {
    "missing": "missing_field",
    "model_field_validation.missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "string_too_long": "too_long",
    "too_long": "too_many",
}
_TIME_MESSAGES = ("Date value", "DateTime value", "DateTime must", "Instant value", "Instant must", "Time value")


def _bad(code: str, message: str, path: str) -> InvalidInput:
    return InvalidInput(code, message, {"field": path[:MAX_PATH]})


def _path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"), which JSON may carry and UTF-8 cannot
        return False
    return True


def check_json(body: Any, root: str = "") -> None:
    """Refuse what JSON parsers take but FHIR JSON (and our storage) cannot: more than MAX_DEPTH
    levels of nesting (`too_deep`), NaN or +/-Infinity (`invalid_type`), text that is not Unicode
    (`invalid_type`). Iterative, so no body can exhaust the stack here."""
    stack: list[tuple[Any, str, int]] = [(body, root, 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise _bad("too_deep", f"the resource nests more than {MAX_DEPTH} levels (at {path[:MAX_PATH]})", path)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not _unicode(key):
                    raise _bad("invalid_type", f"{path or 'the resource'} has a name that is not Unicode text", path)
                stack.append((item, _path(path, key), depth + 1))
        elif isinstance(value, float) and not math.isfinite(value):
            raise _bad("invalid_type", f"{path} must be a finite number (NaN and Infinity are not JSON numbers)", path)
        elif isinstance(value, str) and not _unicode(value):
            raise _bad("invalid_type", f"{path} must be Unicode text", path)


def check_model(model: type, resource: dict, root: str = "", *, required: bool = True) -> None:
    """Validate `resource` against a fhir.resources model (element names, cardinality, primitive
    formats, one value[x] at most); the first error as InvalidInput naming its path. With
    `required=False` missing required elements are let through (the caller checks what it needs)."""
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if not required:
            errors = [e for e in errors if _CODES.get(e["type"]) != "missing_field"]
        if errors:
            raise _from_pydantic(errors[0], root) from None
    except (KeyError, TypeError, ValueError, RecursionError):
        # The library looks contained resources up by resourceType and fails outside pydantic.
        raise _bad("invalid_resource", "the resource is not valid FHIR R4", root or "resourceType") from None


def _from_pydantic(error: dict, root: str) -> InvalidInput:
    path = root
    for part in error["loc"]:
        if part != "root":  # the library's name for "the element itself"
            path = _path(path, part)
    path = path or "resourceType"
    kind = error["type"]
    message = str(error.get("msg", ""))
    if kind in _TYPE_ERRORS or message.startswith("Value error, Decimal value"):
        return _bad("invalid_type", f"{path} has the wrong JSON type for its FHIR type", path)
    if kind == "value_error" and any(m in message for m in _TIME_MESSAGES):
        return _bad("invalid_time", f"{path} is not a FHIR date/time of the required form", path)
    if kind == "value_error" and "Any of one field value" in message:
        return _bad("invalid_resource", f"{path} may hold one value[x] element at most", path)
    code = _CODES.get(kind, "invalid_resource")
    reason = {
        "missing_field": "is required",
        "unknown_field": "is not an element FHIR R4 defines here",
        "too_long": "is too long",
        "too_many": "holds too many items",
    }.get(code, "is not valid FHIR R4")
    return _bad(code, f"{path} {reason}", path)


# --- answering ------------------------------------------------------------------------------------
def operation_outcome(exc: Exception):
    """A refusal on a FHIR route: the kit's error body (stable `code`, `message`, `details`) that is
    also a FHIR OperationOutcome, served as application/fhir+json so a FHIR client reads it too."""
    if isinstance(exc, DomainError):
        status, code, message, details = exc.http_status, exc.code, exc.message, exc.details
    elif isinstance(exc, HTTPException):
        status = exc.code or 500
        code = HTTP_CODES.get(status, "http_error")
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        message = f"request body exceeds {limit} bytes" if status == 413 and limit else exc.name
        details = {}
    else:
        log.exception("unhandled error", extra={"route": request.url_rule.rule if request.url_rule else "unmatched"})
        status, code, message, details = 500, "internal_error", "internal error; the request was not completed", {}
    response = error_response(status, code, message, details)
    body = response.get_json()
    issue = {
        "severity": "error" if status < 500 else "fatal",
        "code": ISSUE_TYPES.get(code) or STATUS_ISSUE_TYPES.get(status) or ("invalid" if status < 500 else "exception"),
        "diagnostics": message,
    }
    if details.get("field"):
        issue["expression"] = [str(details["field"])]
    body.update({"resourceType": "OperationOutcome", "issue": [issue]})
    response.set_data(json.dumps(body))
    response.mimetype = FHIR_JSON
    return response


def answer_errors_in_fhir(blueprint: Blueprint) -> None:
    """Every refusal of the blueprint's routes (ours, Flask's 413/415, an unexpected failure) as an
    OperationOutcome."""
    for kind in (DomainError, HTTPException, Exception):
        blueprint.register_error_handler(kind, operation_outcome)
