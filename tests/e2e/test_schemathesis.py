"""Every published OpenAPI document (services/*/openapi.yaml), run by schemathesis against the whole
stack through the gateway: at least MIN_REQUESTS generated requests over every gateway-routed
operation, none answered 5xx, every answer conforming to the document (a documented status, its
content type, its headers and body schema).

Bounded and repeatable: each operation gets a fixed number of positive examples (data the document
allows) and of negative ones (data it forbids), generated with a derandomized Hypothesis, without
shrinking (a failure is reported as found, with the request to reproduce it).

Who calls. The run has an agency of its own, created for it in directory's database (only seeding
writes agencies), with an admin and a staff member; every staff operation is called as one or the
other, chosen per example. Partner operations carry the API key of the consumer their gateway route
allows; a partner path's `agency_id` is the run's agency half the time (the other half generated).
So the shared demo agencies are never changed: a generated PATCH of the agency, a deactivated
member, a deleted team or address, a changed password all land in the run's own agency, and the run's
two principals are never offered as targets (only members it made for the purpose are).

Where from. All generated requests come from a loopback address of their own (tests/helpers.py
`loopback_address`), so generated sign-ins (which fail and are counted per client address) spend that
address's budget only: the demo users and the rest of the suite, signing in from 127.0.0.1, are
never locked out or rate limited. The principals sign in once, beforehand, from another address.

Left out of generation, with the reason:
- `GET /app/events`: an event stream that stays open until the token expires; it is checked once
  below (status, content type, first event) instead.

Steered, with the reason:
- The run's agency never subscribes to ePrescribing (a generated PATCH of the agency asking for it
  asks for no subscription instead): erx-bridge has vendor credentials only for the demo practice,
  and answers an agency that subscribes without them `503 erx_not_configured`, an operator's
  configuration gap rather than anything a request did.
- So that ePrescribing's own answers are reached, erx-bridge's reads and single sign-on (no vendor
  call, nothing changed; audited) are called as a demo prescriber (`dr.reyes`), signed in from the
  harness's address. Starting a sync stays with the run's agency: it would call the vendor
  simulator, whose calls other tests count.
"""

from __future__ import annotations

import collections
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.directory.domain import Agency, StaffMember
from services.directory.passwords import PasswordHasher
from services.directory.store import DirectoryStore
from services.kit.auth import ROLE_ADMIN, ROLE_COMPLIANCE_OFFICER, ROLE_STAFF
from tests.helpers import DEMO_PASSWORD, client_from, loopback_address

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted((ROOT / "services").glob("*/openapi.yaml"))
METHODS = ("get", "put", "post", "delete", "patch")
MIN_REQUESTS = 1000
# Examples per operation: this many requests shared by every operation (at least MIN_EXAMPLES
# each), 60 % positive and 40 % negative. Operations with little to vary run out of distinct
# examples sooner, so the budget is set above MIN_REQUESTS.
REQUEST_BUDGET = 1150
MIN_EXAMPLES = 8
# The whole run's budget on this machine (the target is about three minutes).
TIME_LIMIT_S = 420
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXCLUDED = {("get", "/app/events"): "an open-ended event stream (checked once by its own test below)"}
# Operations called as a demo prescriber rather than the run's principals (module docstring).
AS_PRESCRIBER = {
    ("get", "/api/v1/erx/sync/{sync_id}"),
    ("post", "/api/v1/erx/sso"),
    ("post", "/api/v1/erx/sso/patient/{item_id}"),
    ("get", "/api/v1/erx/sso/patient/{item_id}"),
    ("get", "/api/v1/erx/reports/pending-rx"),
}
PRESCRIBER = "dr.reyes"
# The partner consumer each gateway route allows (gateway/kong.yml acl groups), by path prefix.
PARTNER_KEYS = (
    ("/api/v1/partner/portal/", "patient_portal_api_key"),
    ("/api/v1/partner/lab/", "lab_interface_api_key"),
    ("/api/v1/partner/schedule/", "practice_management_api_key"),
    ("/api/v1/partner/compliance/", "compliance_tracker_api_key"),
    ("/api/v1/partner/", "patient_portal_api_key"),
)
PASSWORD = "Fuzz-run-password-2026"
# A principal's session is kept active (its agency's idle limit may be lowered to a minute by a
# generated PATCH of the agency) by reporting activity at least this often.
ACTIVITY_EVERY_S = 20.0


@dataclass
class Principal:
    """A staff member of the run's agency, signed in through the gateway."""

    name: str
    staff_id: str
    token: str
    last_activity: float = field(default_factory=time.monotonic)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def sign_in(http: requests.Session, gateway_url: str, username: str, password: str = PASSWORD) -> dict:
    reply = http.post(f"{gateway_url}/api/v1/auth/token", json={"username": username, "password": password}, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


@dataclass
class Run:
    """What the run knows: who calls, ids that exist in its agency, and what it saw."""

    gateway_url: str
    agency_id: str
    principals: list[Principal]
    prescriber: Principal
    partner_keys: dict[str, str]
    known_ids: dict[str, list[str]]
    harness: requests.Session  # the principals' own traffic (activity), not generated
    fuzz: requests.Session  # every generated request
    requests: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)
    per_operation: collections.Counter = field(default_factory=collections.Counter)
    answers: collections.Counter = field(default_factory=collections.Counter)

    def keep_active(self, principal: Principal) -> None:
        if time.monotonic() - principal.last_activity < ACTIVITY_EVERY_S:
            return
        self.harness.post(f"{self.gateway_url}/api/v1/auth/activity", headers=principal.headers(), timeout=30)
        principal.last_activity = time.monotonic()


@pytest.fixture(scope="module")
def run(stack, mongo_client) -> Run:
    """The run's agency (an admin and compliance officer, a staff member, and members, a team, an
    address and a patient made to be targets), signed in from an address of the harness's own."""
    agency_id = f"agy_fuzz{uuid.uuid4().hex[:8]}"
    store = DirectoryStore(mongo_client[f"{stack.db_prefix}directory"], cipher=None)
    store.create_agency(
        Agency(id=agency_id, name="Schemathesis Run", time_zone="America/Denver", portal_consumer="patient-portal")
    )
    admin_name = f"{agency_id}.admin"
    store.create_staff(
        StaffMember(
            id=f"stf_{agency_id}_admin",
            agency_id=agency_id,
            username=admin_name,
            display_name="Run Admin",
            roles=(ROLE_STAFF, ROLE_ADMIN, ROLE_COMPLIANCE_OFFICER),
        ),
        PasswordHasher("fast").hash(PASSWORD),
    )
    harness_address, fuzz_address = loopback_address(), loopback_address()
    while fuzz_address == harness_address:
        fuzz_address = loopback_address()
    harness = client_from(harness_address)
    gateway = stack.gateway_url
    granted = sign_in(harness, gateway, admin_name)
    admin = Principal("admin", granted["staff"]["id"], granted["access_token"])

    def as_admin(method: str, path: str, body: dict) -> dict:
        reply = harness.request(method, f"{gateway}{path}", json=body, headers=admin.headers(), timeout=30)
        assert reply.status_code in (200, 201), f"{method} {path}: {reply.status_code} {reply.text}"
        return reply.json()

    def new_member(key: str) -> str:
        body = {"username": f"{agency_id}.{key}", "display_name": f"Run {key}", "password": PASSWORD}
        return as_admin("POST", "/api/v1/directory/staff", body)["id"]

    staff_name = f"{agency_id}.staff"
    new_member("staff")
    granted = sign_in(harness, gateway, staff_name)
    staff = Principal("staff", granted["staff"]["id"], granted["access_token"])
    targets = [new_member(f"target{i}") for i in range(3)]
    team = as_admin("POST", "/api/v1/directory/teams", {"name": "Run team", "member_ids": targets[:2]})["id"]
    address = as_admin(
        "POST",
        "/api/v1/directory/cloud-addresses",
        {"kind": "direct", "address": f"run@{agency_id.replace('_', '-')}.direct.example", "staff_ids": targets},
    )["id"]
    patient = as_admin("POST", "/api/v1/directory/patients", {"portal_user_id": "run-portal-1", "display_name": "P"})
    # Something on the boards: a message to the staff member, a label, an announcement.
    note = {"to_staff_ids": [staff.staff_id], "subject": "Run", "body": "Hello"}
    message = as_admin("POST", "/api/v1/messages", note)
    label = as_admin("POST", "/api/v1/labels", {"name": "Run label"})
    announcement = as_admin("POST", "/api/v1/announcements", {"title": "Run notice", "body": "Read me"})
    items = harness.get(f"{gateway}/api/v1/board/items", headers=staff.headers(), timeout=30)
    assert items.status_code == 200, items.text
    granted = sign_in(harness, gateway, PRESCRIBER, DEMO_PASSWORD)
    return Run(
        gateway_url=gateway,
        agency_id=agency_id,
        principals=[admin, staff],
        prescriber=Principal("prescriber", granted["staff"]["id"], granted["access_token"]),
        partner_keys={prefix: getattr(stack, attribute) for prefix, attribute in PARTNER_KEYS},
        known_ids={
            "staff_id": targets,
            "team_id": [team],
            "address_id": [address],
            "patient_id": [patient["id"]],
            "portal_user_id": ["run-portal-1"],
            "kind": ["staff", "patient"],
            "message_id": [message["id"]],
            "thread_id": [message["thread_id"]],
            "label_id": [label["id"]],
            "announcement_id": [announcement["id"]],
            "item_id": [item["id"] for item in items.json().get("items", [])][:5],
        },
        harness=harness,
        fuzz=client_from(fuzz_address),
    )


def gateway_operations() -> list[tuple[Path, str, str]]:
    """(document, method, path) of every operation the gateway routes, in the documents' order."""
    found = []
    for document in DOCUMENTS:
        raw = yaml.safe_load(document.read_text(encoding="utf-8"))
        for path, item in raw["paths"].items():
            for method in METHODS:
                operation = item.get(method)
                if operation is None or operation.get("x-clinic-gateway", True) is False:
                    continue
                if (method, path) not in EXCLUDED:
                    found.append((document, method, path))
    return found


def credentials(run: Run, operation, principal: Principal) -> dict[str, str]:
    """The headers the operation's security asks for: a staff token, a partner's key, or nothing."""
    security = operation.definition.raw.get("security", operation.schema.raw_schema.get("security", []))
    schemes = {name for requirement in security for name in requirement}
    headers: dict[str, str] = {}
    if "bearer" in schemes:
        headers |= principal.headers()
    if "apiKey" in schemes:
        key = next(key for prefix, key in run.partner_keys.items() if operation.path.startswith(prefix))
        headers["apikey"] = key
    if operation.path.startswith("/app/"):
        headers["Origin"] = run.gateway_url  # the page's same-origin requests (services/web/sessions.py)
    return headers


def with_known_ids(run: Run, case, choices: list[int]) -> None:
    """Half the time, a path parameter names something that exists in the run's agency."""
    for index, name in enumerate(sorted(case.path_parameters or {})):
        pool = [run.agency_id] if name == "agency_id" else run.known_ids.get(name, [])
        pick = choices[index % len(choices)]
        if pool and pick % 2 == 0:
            case.path_parameters[name] = pool[(pick // 2) % len(pool)]


def steer(case) -> None:
    """The run's agency never subscribes to ePrescribing (module docstring)."""
    if case.method == "PATCH" and case.path == "/api/v1/directory/agency" and isinstance(case.body, dict):
        options = case.body.get("options")
        if isinstance(options, dict) and options.get("erx_subscription") is True:
            options["erx_subscription"] = False


def report(case, failure: Failure, headers: dict[str, str]) -> str:
    """The failure and the request that found it (its first example only: one per operation and kind)."""
    return f"{failure.title}: {failure.message}".strip() + f"\n{case.as_curl_command(headers=headers)}"


def exercise(run: Run, operation, mode: GenerationMode, max_examples: int) -> None:
    """Up to `max_examples` generated calls of one operation; failures are collected, not raised."""

    @hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @hypothesis.given(
        case=operation.as_strategy(generation_mode=mode),
        principal=st.sampled_from(run.principals),
        choices=st.lists(st.integers(0, 1000), min_size=4, max_size=4),
    )
    def call(case, principal, choices):
        with_known_ids(run, case, choices)
        steer(case)
        if (case.method.lower(), case.path) in AS_PRESCRIBER:
            principal = run.prescriber
        run.keep_active(principal)
        # A negative example sometimes keeps the credentials it was generated with (none, or junk):
        # the gateway's and the services' refusals are answers too.
        keep_generated = mode is GenerationMode.NEGATIVE and choices[3] % 4 == 0
        headers = {} if keep_generated else credentials(run, operation, principal)
        response = case.call(base_url=run.gateway_url, session=run.fuzz, headers=headers, timeout=60)
        run.requests += 1
        run.per_operation[operation.label] += 1
        run.statuses[response.status_code] += 1
        run.answers[(operation.label, response.status_code)] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                run.failures.setdefault((operation.label, failure.title), report(case, failure, headers))
        except Failure as failure:
            run.failures.setdefault((operation.label, failure.title), report(case, failure, headers))

    try:
        call()
    except hypothesis.errors.Unsatisfiable:
        # Nothing the document forbids can be sent (an operation without parameters or body): the
        # positive examples cover it.
        assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no example could be generated"


def summary(run: Run, labels: list[str], elapsed: float) -> str:
    """What was sent and answered: the totals, then each operation's statuses."""
    lines = [
        f"schemathesis: {len(labels)} operations in {len(DOCUMENTS)} documents, {run.requests} requests "
        f"in {elapsed:.0f} s; statuses {dict(sorted(run.statuses.items()))}"
    ]
    for label in labels:
        answered = sorted((status, n) for (name, status), n in run.answers.items() if name == label)
        lines.append(f"  {label}: " + ", ".join(f"{status}x{n}" for status, n in answered))
    return "\n" + "\n".join(lines)


def test_every_gateway_operation_answers_as_documented_and_never_5xx(stack, run):
    operations = gateway_operations()
    assert DOCUMENTS and operations, "no OpenAPI documents found"
    per_operation = max(MIN_EXAMPLES, -(-REQUEST_BUDGET // len(operations)))
    positive = -(-per_operation * 3 // 5)
    started = time.monotonic()
    labels = []
    for document in DOCUMENTS:
        schema = schemathesis.openapi.from_path(document)
        for path_document, method, path in operations:
            if path_document != document:
                continue
            operation = schema[path][method.upper()]
            labels.append(operation.label)
            exercise(run, operation, GenerationMode.POSITIVE, positive)
            exercise(run, operation, GenerationMode.NEGATIVE, per_operation - positive)
    elapsed = time.monotonic() - started
    print(summary(run, labels, elapsed))
    failures = [f"{label} [{title}]\n{text}" for (label, title), text in run.failures.items()]
    assert failures == [], "\n\n".join(failures)
    unexercised = [label for label in labels if run.per_operation[label] == 0]
    assert unexercised == [], f"operations never called: {unexercised}"
    assert run.requests >= MIN_REQUESTS, f"only {run.requests} requests were generated"
    assert elapsed < TIME_LIMIT_S


def test_the_event_stream_answers_as_documented(stack, run):
    """`GET /app/events` (left out of generation): an event stream for a staff token, refused without one."""
    schema = schemathesis.openapi.from_path(ROOT / "services" / "web" / "openapi.yaml")
    responses = schema["/app/events"]["GET"].definition.raw["responses"]
    url = f"{run.gateway_url}/app/events"
    with run.harness.get(url, headers=run.principals[1].headers(), stream=True, timeout=30) as reply:
        assert reply.status_code == 200
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        assert "text/event-stream" in responses["200"]["content"]
        assert next(reply.iter_lines(decode_unicode=True)) == "retry: 2000"
    refused = run.harness.get(url, timeout=30)
    assert refused.status_code == 401 and "401" in responses
    assert re.fullmatch(r"[a-z_]+", refused.json()["code"])
