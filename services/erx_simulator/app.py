"""The simulator's HTTP face: DoseSpot's API as services/erx_bridge/vendors/dosespot.py speaks it,
its single sign-on page, and a control API for tests and demos.

DoseSpot's API is served under /webapi/v2 (DoseSpot's v2 root) and, for development settings that
name the bare /webapi root, under /webapi as well:

    POST connect/token                     password grant (form), OAuth 2.0 answer
    GET  api/notifications/counts          counts of the token's clinician
    GET  api/refills/pending[/detailed]    ?clinic=Current|All&pageNumber=N   refill requests
    GET  api/notifications/errors          ?clinic=...&pageNumber=N           transmission errors
    GET  api/prescriptions/pending         ?clinic=...&pageNumber=N           pending prescriptions
                                           (the bridge's assumption: DoseSpot documents only the count)
    GET  api/patients/{patientId}          one patient
    GET  api/patients/{patientId}/prescriptions/{prescriptionId}   one prescription
    GET  /LoginSingleSignOn.aspx           checks the single sign-on values; a small HTML page
    GET  /healthz

The control API (/simulator/..., not DoseSpot's, no authentication: development only, loopback
only) is described in README.md.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import html
import logging
from collections.abc import Callable

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from services.erx_simulator.data import (
    ERROR,
    KINDS,
    PENDING,
    REFILL,
    Fault,
    Store,
    dotnet_time,
    js_time,
)

__all__ = ["create_app"]

log = logging.getLogger(__name__)

OK_RESULT = {"ResultCode": "OK", "ResultDescription": ""}
LIST_ENDPOINT = {REFILL: "refills", ERROR: "errors", PENDING: "pending"}

api = Blueprint("dosespot_api", __name__)
control = Blueprint("simulator_control", __name__)


def _store() -> Store:
    return current_app.extensions["erx_simulator.store"]


def create_app(store: Store) -> Flask:
    app = Flask("erx_simulator")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["erx_simulator.store"] = store
    app.register_blueprint(api, url_prefix="/webapi/v2", name="dosespot_v2")
    app.register_blueprint(api, url_prefix="/webapi", name="dosespot_webapi")
    app.register_blueprint(control, url_prefix="/simulator")

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.get("/LoginSingleSignOn.aspx")
    def single_sign_on():
        return _single_sign_on()

    @app.errorhandler(404)
    def not_found(_error):
        return _result_error(404, "No HTTP resource was found that matches the request URI.")

    @app.errorhandler(405)
    def not_allowed(_error):
        return _result_error(405, "The requested resource does not support this HTTP method.")

    return app


# -- DoseSpot's answers ---------------------------------------------------------------------------


def _result_error(status: int, description: str) -> Response:
    response = jsonify(Result={"ResultCode": "ERROR", "ResultDescription": description})
    response.status_code = status
    return response


def _unauthorized(description: str = "Authorization has been denied for this request.") -> Response:
    response = jsonify(Message=description)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return response


def _retry_after(fault: Fault) -> str | None:
    if fault.retry_after is not None:
        return str(fault.retry_after)
    if fault.retry_after_date_in_s is not None:
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=fault.retry_after_date_in_s)
        return email.utils.format_datetime(when, usegmt=True)
    return None


WRONG_SHAPES: dict[str, object] = {
    "token": {"token": "not-the-field-you-want", "expires": "soon"},
    "counts": {"RefillRequestsCount": "three", "TransactionErrorsCount": None, "PendingPrescriptionsCount": -1},
    "refills": {"Items": {"RefillId": 1}, "PageResult": "1 of 1"},
    "errors": {"Items": [["PrescriptionId", 1]], "PageResult": {"CurrentPage": 1}},
    "pending": {"Items": [{"DisplayName": "no id"}], "PageResult": {"CurrentPage": 1, "HasNext": False}},
    "patient": {"Item": ["not", "an", "object"]},
    "prescription": {"Prescription": "none"},
}


def _faulty(fault: Fault, endpoint: str, token: str | None) -> Response | None:
    """The answer a fault gives instead of the real one; None to answer normally (after a delay)."""
    store = _store()
    log.info("fault injected", extra={"route": endpoint, "code": fault.kind})
    if fault.kind == "slow":
        store.sleep(fault.delay_s)
        return None
    if fault.kind == "timeout":
        store.sleep(fault.delay_s or 30.0)
        return _result_error(504, "Simulated gateway timeout")
    if fault.kind in ("status", "rate_limit"):
        status = 429 if fault.kind == "rate_limit" else fault.status
        if status == 429:
            response = jsonify(statusCode=429, message="Rate limit is exceeded.")
            response.status_code = 429
        else:
            response = _result_error(status, "Simulated server error")
        retry_after = _retry_after(fault)
        if retry_after is not None:
            response.headers["Retry-After"] = retry_after
        return response
    if fault.kind == "expired_token":
        if token:
            store.expire_token(token)
        return _unauthorized("The access token expired.")
    # malformed
    if fault.shape == "html":
        return Response("<html><body><h1>Bad gateway</h1></body></html>", status=200, mimetype="text/html")
    if fault.shape == "wrong_shape":
        return jsonify(WRONG_SHAPES.get(endpoint, ["unexpected"]))
    return Response('{"Items": [{"RefillId": 1,', status=200, mimetype="application/json")


def _subscription_key_ok() -> bool:
    given = request.headers.get("Subscription-Key") or request.headers.get("Ocp-Apim-Subscription-Key")
    return _store().subscription_key_ok(given)


def _authenticated(endpoint: str, handler: Callable[[str, str], Response]) -> Response:
    """Count the call, inject a waiting fault, check the bearer token, then `handler(clinic, clinician)`."""
    store = _store()
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else None
    owner = store.token_owner(token) if token else None
    store.count_call(endpoint, owner[1] if owner else None)
    if not _subscription_key_ok():
        return _subscription_key_refused()
    fault = store.take_fault(endpoint, owner[1] if owner else None)
    if fault is not None:
        answer = _faulty(fault, endpoint, token if owner else None)
        if answer is not None:
            return answer
        owner = store.token_owner(token) if token else None  # a slow answer may outlive the token
    if owner is None:
        return _unauthorized()
    return handler(*owner)


def _subscription_key_refused() -> Response:
    response = jsonify(
        statusCode=401, message="Access denied due to missing subscription key or invalid subscription key."
    )
    response.status_code = 401
    return response


@api.post("/connect/token")
def token():
    store = _store()
    form = {key: request.form.get(key, "") for key in request.form}
    username = form.get("username") or None
    store.count_call("token", username)
    if not _subscription_key_ok():
        return _subscription_key_refused()
    fault = store.take_fault("token", username)
    if fault is not None:
        answer = _faulty(fault, "token", None)
        if answer is not None:
            return answer
    status, body = store.issue_token(form)
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response


@api.get("/api/notifications/counts")
def counts():
    def answer(_clinic: str, clinician: str) -> Response:
        open_items = _store().counts(clinician)
        return jsonify(
            RefillRequestsCount=open_items[REFILL],
            TransactionErrorsCount=open_items[ERROR],
            PendingPrescriptionsCount=open_items[PENDING],
            PendingRxChangeCount=0,
            Result=OK_RESULT,
        )

    return _authenticated("counts", answer)


def _paged(kind: str, render: Callable) -> Response:
    def answer(_clinic: str, clinician: str) -> Response:
        clinic_filter = request.args.get("clinic", "Current")
        if clinic_filter not in ("Current", "All"):
            return _result_error(400, "clinic must be Current or All")
        raw_page = request.args.get("pageNumber", "1")
        if not raw_page.isdigit() or int(raw_page) < 1:
            return _result_error(400, "pageNumber must be a positive integer")
        chosen, paging = _store().page(clinician, kind, int(raw_page))
        return jsonify(Items=[render(*entry) for entry in chosen], PageResult=paging, Result=OK_RESULT)

    return _authenticated(LIST_ENDPOINT[kind], answer)


def _refill_json(item, patient, rx, *, detailed: bool) -> dict:
    body = {
        "RefillId": item.item_id,
        "NewPatient": item.new_patient,
        "Patient": patient.as_json(),
        "ClinicId": int(item.clinic_id),
        "ClinicianId": int(item.clinician_id) if item.clinician_id.isdigit() else item.clinician_id,
    }
    if detailed:
        body |= {"RequestedPrescription": rx.as_json(), "DispensedPrescription": None, "OriginalPrescription": None}
    else:
        body |= {"RequestedPrescriptionId": rx.prescription_id, "DispensedPrescriptionId": None}
    return body | {
        "PharmacyId": rx.pharmacy_id,
        "RequestedDate": dotnet_time(item.at),
        "RequestExpirationDate": dotnet_time(item.at + dt.timedelta(days=30)),
    }


@api.get("/api/refills/pending")
def refills():
    return _paged(REFILL, lambda item, patient, rx: _refill_json(item, patient, rx, detailed=False))


@api.get("/api/refills/pending/detailed")
def refills_detailed():
    return _paged(REFILL, lambda item, patient, rx: _refill_json(item, patient, rx, detailed=True))


@api.get("/api/notifications/errors")
def transmission_errors():
    def render(item, _patient, rx) -> dict:
        return {
            "PrescriptionId": rx.prescription_id,
            "DateWritten": js_time(rx.written),
            "ErrorDateTimeStamp": js_time(item.at),
            "ErrorDetails": item.detail,
            "PatientId": item.patient_id,
            "ClinicId": int(item.clinic_id),
        }

    return _paged(ERROR, render)


@api.get("/api/prescriptions/pending")
def pending_prescriptions():
    return _paged(PENDING, lambda item, _patient, rx: {**rx.as_json(), "PatientId": item.patient_id})


@api.get("/api/patients/<int:patient_id>")
def patient(patient_id: int):
    def answer(clinic: str, _clinician: str) -> Response:
        found = _store().patient_for(clinic, patient_id)
        if found is None:
            return _result_error(404, "Patient not found")
        return jsonify(Item=found.as_json(), Result=OK_RESULT)

    return _authenticated("patient", answer)


@api.get("/api/patients/<int:patient_id>/prescriptions/<int:prescription_id>")
def prescription(patient_id: int, prescription_id: int):
    def answer(clinic: str, _clinician: str) -> Response:
        found = _store().prescription_for(clinic, patient_id, prescription_id)
        if found is None:
            return _result_error(404, "Prescription not found")
        return jsonify(Prescription=found.as_json(), Result=OK_RESULT)

    return _authenticated("prescription", answer)


# -- single sign-on -------------------------------------------------------------------------------


def _single_sign_on() -> Response:
    store = _store()
    params = {key: request.args.get(key, "") for key in request.args}
    store.count_call("sso", params.get("SingleSignOnUserId") or None)
    accepted, clinician, reason = store.check_sso(params)
    if params.get("RefillsErrors") == "1":
        view = "the notifications summary (refill requests and transmission errors)"
    elif params.get("PatientId"):
        view = f"patient {params['PatientId']}"
    else:
        view = "the clinician's home page"
    if accepted:
        title, text, status = "Signed in", f"Clinician {clinician} is signed in; DoseSpot would open {view}.", 200
    else:
        title, text, status = "Single sign-on error", reason, 403
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>eRx simulator</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
        "<p><small>eRx vendor simulator: development only, fictional data.</small></p></body></html>"
    )
    response = Response(page, status=status, mimetype="text/html")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


# -- control API ----------------------------------------------------------------------------------


class _BadRequest(Exception):
    pass


@control.errorhandler(_BadRequest)
def _bad_request(error: _BadRequest):
    response = jsonify(error=str(error))
    response.status_code = 400
    return response


def _body() -> dict:
    if not request.get_data():
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


def _int(body: dict, key: str, default: int, minimum: int = 0, maximum: int = 1_000_000) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise _BadRequest(f"{key} must be an integer between {minimum} and {maximum}")
    return value


def _number(body: dict, key: str, default: float | None) -> float | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _BadRequest(f"{key} must be a non-negative number")
    return float(value)


def _opt_str(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise _BadRequest(f"{key} must be a string")
    return str(value)


@control.get("/state")
def state():
    return jsonify(_store().summary())


@control.post("/reset")
def reset():
    body = _body()
    demo = body.get("demo", True)
    if not isinstance(demo, bool):
        raise _BadRequest("demo must be true or false")
    _store().reset(demo=demo)
    return jsonify(_store().summary())


@control.post("/clinicians/<clinician_id>/items")
def add_items(clinician_id: str):
    body = _body()
    kind = body.get("kind")
    if kind not in KINDS:
        raise _BadRequest(f"kind must be one of {', '.join(KINDS)}")
    count = _int(body, "count", 1, minimum=1, maximum=10_000)
    new_patient = body.get("new_patient", False)
    if not isinstance(new_patient, bool):
        raise _BadRequest("new_patient must be true or false")
    store = _store()
    try:
        created = [
            store.add_item(
                clinician_id,
                kind,
                seed=_int(body, "seed", 0) + n,
                patient_name=_opt_str(body, "patient_name"),
                medication=_opt_str(body, "medication"),
                detail=_opt_str(body, "detail"),
                new_patient=new_patient,
            )
            for n in range(count)
        ]
    except ValueError as exc:
        raise _BadRequest(str(exc)) from None
    return jsonify(
        items=[
            {
                "kind": item.kind,
                "id": item.item_id,
                "vendor_item_id": item.vendor_item_id,
                "patient_id": item.patient_id,
            }
            for item in created
        ]
    ), 201


@control.delete("/items/<vendor_item_id>")
def resolve(vendor_item_id: str):
    if not _store().resolve(vendor_item_id):
        return jsonify(error="no such open item"), 404
    return jsonify(resolved=vendor_item_id)


@control.post("/bulk")
def bulk():
    body = _body()
    clinicians = _int(body, "clinicians", 200, minimum=1, maximum=10_000)
    items = _int(body, "items", 50, minimum=0, maximum=10_000)
    first = _int(body, "first_clinician_id", 3001, minimum=1, maximum=10**9)
    ids = _store().bulk_load(clinicians, items, first_clinician_id=first)
    return jsonify(clinician_ids=ids, items_each=items), 201


@control.get("/calls")
def calls():
    return jsonify(_store().call_counts())


@control.delete("/calls")
def clear_calls():
    _store().clear_calls()
    return jsonify(_store().call_counts())


@control.get("/faults")
def faults():
    return jsonify(faults=_store().summary()["faults"])


@control.post("/faults")
def add_fault():
    body = _body()
    known = {
        "fault",
        "times",
        "endpoint",
        "clinician",
        "delay_s",
        "status",
        "retry_after",
        "retry_after_date_in_s",
        "shape",
    }
    unknown = sorted(set(body) - known)
    if unknown:
        raise _BadRequest(f"unknown field {unknown[0]!r}")
    fault = Fault(
        kind=str(body.get("fault", "")),
        times=_int(body, "times", 1, minimum=1, maximum=1_000_000),
        endpoint=_opt_str(body, "endpoint"),
        clinician=_opt_str(body, "clinician"),
        delay_s=_number(body, "delay_s", 0.0) or 0.0,
        status=_int(body, "status", 500, minimum=400, maximum=599),
        retry_after=_opt_str(body, "retry_after"),
        retry_after_date_in_s=_number(body, "retry_after_date_in_s", None),
        shape=str(body.get("shape", "invalid_json")),
    )
    try:
        _store().add_fault(fault)
    except ValueError as exc:
        raise _BadRequest(str(exc)) from None
    return jsonify(fault=fault.as_json()), 201


@control.delete("/faults")
def clear_faults():
    _store().clear_faults()
    return jsonify(faults=[])
