"""gRPC methods apply their HTTP twins' role rules, over real servers and ports: directory's (built
through its `build()`, demo data seeded) and inbox's (built through its `build()`). Each refusal is
PERMISSION_DENIED with a stable `error-code`, leaves an `access_refused` security event, and a
portal patient read (allowed or refused) leaves a `phi.accessed.v1` record in the outbox."""

from __future__ import annotations

import base64
import os

import grpc
import pytest

from clinic.audit.v1 import security_pb2
from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.directory import tokens
from services.inbox import config as inbox_config
from services.inbox.delivery import Delivery
from services.inbox.directory_client import DirectoryClient
from services.inbox.service import build as build_inbox
from services.kit.auth import Identity, StaticKeySource, TokenVerifier
from services.kit.errors import Forbidden
from services.kit.events import decode_envelope, unpack
from services.kit.grpc_server import GrpcServer
from services.kit.security_events import COLLECTION as SECURITY_OUTBOX
from services.kit.service_identity import acting_as
from tests.helpers import auth, staged_accesses
from tests.integration.inbox_fixtures import AgencyTable

RIVERBEND = "agy_riverbend"
JANE = "pat_riverbend_demo"
JANE_PORTAL_USER = "portal_riverbend_0001"
PORTAL = "clinic.directory.v1.DirectoryService/GetPortalPatient"


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), dict(caught.value.trailing_metadata() or ()).get("error-code", "")


def refusals(db) -> list[security_pb2.SecurityEvent]:
    """The `access_refused` security events staged in `db` (sign-ins leave events of their own)."""
    found = []
    for doc in db[SECURITY_OUTBOX].find():
        for entry in doc["_outbox"].values():
            event = unpack(decode_envelope(entry["env"]), security_pb2.SecurityEvent)
            if event.kind == "access_refused":
                found.append(event)
    return found


def patient_reads(db) -> list[tuple[str, str, str, str, str, str]]:
    """(actor, actor kind, resource type, resource id, outcome, patient id) of every phi.accessed staged."""
    return [
        (a.actor_id, a.actor_kind, a.resource_type, a.resource_id, a.outcome, a.patient_id)
        for _, a in staged_accesses(db)
    ]


# --- directory ----------------------------------------------------------------------------------------


@pytest.fixture
def directory(dut):
    server = dut.directory.grpc_server("127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield directory_pb2_grpc.DirectoryServiceStub(channel)
    channel.close()
    server.stop(0)


@pytest.fixture
def service_token(dut):
    """A service client's token for Riverbend, signed by directory's own key (as IssueServiceToken does)."""
    keys = dut.directory.settings.signing_keys

    def issue(client_id: str, agency_id: str = RIVERBEND) -> str:
        return tokens.issue_service_token(keys, client_id=client_id, agency_id=agency_id, ttl_s=300).token

    return issue


def portal_patient(stub, token: str, **request):
    return stub.GetPortalPatient(directory_pb2.GetPortalPatientRequest(**request), metadata=auth(token), timeout=5)


@pytest.mark.parametrize("username", ["nurse.kim", "dr.reyes", "compliance.ortiz"])
def test_a_non_admin_cannot_read_a_portal_patients_name_and_the_attempt_is_audited(dut, directory, username):
    """The attack: a non-admin staff token reads a portal patient over gRPC (GET /patients/<id> is admin-only)."""
    token = dut.token(username)
    staff_id = dut.store.credentials(username).member.id
    for request in ({"patient_id": JANE}, {"portal_user_id": JANE_PORTAL_USER}):
        code = refused(lambda request=request: portal_patient(directory, token, **request))
        assert code == (grpc.StatusCode.PERMISSION_DENIED, "admin_only")
    db = dut.store.db
    assert patient_reads(db) == [
        (staff_id, "staff", "portal_patient", JANE, "denied", JANE),
        (staff_id, "staff", "portal_user", JANE_PORTAL_USER, "denied", ""),
    ]
    recorded = refusals(db)
    assert [(e.actor_id, e.agency_id, e.reason, e.target_type, e.target_id, e.service) for e in recorded] == [
        (staff_id, RIVERBEND, "admin_only", "grpc_method", PORTAL, "directory")
    ] * 2
    assert all(e.outcome == "refused" and e.source for e in recorded)


def test_an_admin_and_inbox_read_portal_patients_and_each_read_is_audited(dut, directory, service_token):
    admin = dut.token("admin")
    assert portal_patient(directory, admin, patient_id=JANE).display_name == "Jane Demo-Client"
    inbox = service_token("inbox")
    assert portal_patient(directory, inbox, portal_user_id=JANE_PORTAL_USER).patient_id == JANE
    assert refused(lambda: portal_patient(directory, admin, patient_id="pat_nobody")) == (
        grpc.StatusCode.NOT_FOUND,
        "patient_not_found",
    )
    assert patient_reads(dut.store.db) == [
        ("stf_riverbend_admin", "staff", "portal_patient", JANE, "allowed", JANE),
        ("svc:inbox", "service", "portal_patient", JANE, "allowed", JANE),
        ("stf_riverbend_admin", "staff", "portal_patient", "pat_nobody", "denied", "pat_nobody"),
    ]
    # One outbox document per read, each carrying its one event.
    assert [len(doc["_outbox"]) for doc in dut.store.db["access_records"].find()] == [1, 1, 1]
    assert refusals(dut.store.db) == []  # nothing was refused for want of a role


@pytest.mark.parametrize("client_id", ["notifications", "erx-bridge", "cloud-comms", "auto-reply"])
def test_services_that_do_not_serve_the_portal_cannot_read_its_patients(dut, directory, service_token, client_id):
    token = service_token(client_id)
    code = refused(lambda: portal_patient(directory, token, portal_user_id=JANE_PORTAL_USER))
    assert code == (grpc.StatusCode.PERMISSION_DENIED, "admin_only")
    assert patient_reads(dut.store.db) == [
        (f"svc:{client_id}", "service", "portal_user", JANE_PORTAL_USER, "denied", "")
    ]


def test_a_colleagues_vendor_clinician_id_is_for_admins_services_and_themself(dut, directory, service_token):
    prescribers = ["stf_riverbend_reyes", "stf_riverbend_chen"]

    def clinician_ids(token: str) -> dict[str, str]:
        reply = directory.GetStaff(directory_pb2.GetStaffRequest(staff_ids=prescribers), metadata=auth(token))
        listed = directory.ListStaff(directory_pb2.ListStaffRequest(eprescribing_only=True), metadata=auth(token))
        by_list = {m.staff_id: m.erx_clinician_id for m in listed.staff if m.staff_id in prescribers}
        by_get = {m.staff_id: m.erx_clinician_id for m in reply.staff}
        assert by_list == by_get
        return by_get

    everyone = {"stf_riverbend_reyes": "2001", "stf_riverbend_chen": "2002"}
    assert clinician_ids(dut.token("admin")) == everyone
    assert clinician_ids(service_token("erx-bridge")) == everyone
    assert clinician_ids(dut.token("dr.reyes")) == {"stf_riverbend_reyes": "2001", "stf_riverbend_chen": ""}
    assert clinician_ids(dut.token("nurse.kim")) == {"stf_riverbend_reyes": "", "stf_riverbend_chen": ""}


def test_the_portal_consumer_is_named_to_admins_and_services_only(dut, directory, service_token):
    def consumer(token: str) -> str:
        request = directory_pb2.GetAgencySettingsRequest()
        return directory.GetAgencySettings(request, metadata=auth(token), timeout=5).portal_consumer

    assert consumer(dut.token("admin")) == consumer(service_token("inbox")) == "patient-portal"
    assert consumer(dut.token("nurse.kim")) == ""


def test_inbox_asks_about_the_portal_with_its_own_identity_whatever_staff_asked_before(dut, service_token):
    """Inbox's directory client caches agency settings; a staff member's answer (no portal consumer)
    is never the one its portal check reads, and its service identity reads the portal's patient."""
    server = dut.directory.grpc_server("127.0.0.1", 0)
    server.start()
    client = DirectoryClient(f"127.0.0.1:{server.port}")
    try:
        kim = Identity(subject="stf_riverbend_kim", agency_id=RIVERBEND, token=dut.token("nurse.kim"))
        inbox = Identity(subject="svc:inbox", agency_id=RIVERBEND, kind="service", token=service_token("inbox"))
        with acting_as(kim):
            assert client.agency_settings(RIVERBEND).portal_consumer == ""
            with pytest.raises(Forbidden):
                client.portal_patient(portal_user_id=JANE_PORTAL_USER)
        with acting_as(inbox):
            assert client.agency_settings(RIVERBEND).portal_consumer == "patient-portal"
            assert client.portal_patient(portal_user_id=JANE_PORTAL_USER).patient_id == JANE
        with acting_as(kim):
            assert client.agency_settings(RIVERBEND).portal_consumer == ""  # still not shown to staff
    finally:
        client.close()
        server.stop(0)


def test_platform_and_cloud_only_methods_refuse_others_and_record_it(dut, directory, service_token):
    staff = dut.token("nurse.kim")
    assert refused(
        lambda: directory.ListRevokedSessions(directory_pb2.ListRevokedSessionsRequest(), metadata=auth(staff))
    ) == (grpc.StatusCode.PERMISSION_DENIED, "platform_scope_required")
    platform_inbox = service_token("inbox", agency_id="")
    assert refused(
        lambda: directory.ResolveCloudAddress(
            directory_pb2.ResolveCloudAddressRequest(kind="fax", address="+15555550100"), metadata=auth(platform_inbox)
        )
    ) == (grpc.StatusCode.PERMISSION_DENIED, "cloud_comms_only")
    assert refused(
        lambda: directory.GetStaff(
            directory_pb2.GetStaffRequest(staff_ids=["stf_riverbend_kim"]), metadata=auth(platform_inbox)
        )
    ) == (grpc.StatusCode.PERMISSION_DENIED, "agency_scope_required")
    assert [(e.actor_id, e.reason, e.target_id.rsplit("/", 1)[1]) for e in refusals(dut.store.db)] == [
        ("stf_riverbend_kim", "platform_scope_required", "ListRevokedSessions"),
        ("svc:inbox", "cloud_comms_only", "ResolveCloudAddress"),
        ("svc:inbox", "agency_scope_required", "GetStaff"),
    ]


# --- inbox ---------------------------------------------------------------------------------------------


@pytest.fixture
def inbox_grpc(mongo_client, db_name):
    """Inbox's gRPC server (Delivery attached), its database, and a minter of tokens it accepts."""
    keys = tokens.KeySet.from_pem(tokens.generate_private_key_pem())
    master = base64.b64encode(os.urandom(32)).decode()
    settings = inbox_config.load(
        {"MONGO_URI": "mongodb://unused:1", "PHI_MASTER_KEYS": f"m:{master}", "AMQP_URL": "amqp://unused/"}
    )
    table = AgencyTable(staff={"stf_a": RIVERBEND, "stf_b": RIVERBEND})
    inbox = build_inbox(settings, mongo_client[db_name], directory=table, features=(Delivery,))
    server = GrpcServer([inbox.grpc_binding()], TokenVerifier(StaticKeySource(keys.verification_keys)))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")

    def staff_token(staff_id: str, *roles: str) -> str:
        return tokens.issue_access_token(
            keys,
            staff_id=staff_id,
            agency_id=RIVERBEND,
            roles=list(roles or ("staff",)),
            name=staff_id,
            session_id="s1",
            ttl_s=300,
        ).token

    def service_token(client_id: str) -> str:
        return tokens.issue_service_token(keys, client_id=client_id, agency_id=RIVERBEND, ttl_s=300).token

    yield inbox_pb2_grpc.InboxServiceStub(channel), mongo_client[db_name], staff_token, service_token
    channel.close()
    server.stop(0)


def test_a_service_never_sends_a_message_as_itself(inbox_grpc):
    """The HTTP twin (POST /api/v1/messages) serves staff only; a service sends only as a named staff
    member, and only auto-reply may."""
    stub, db, staff_token, service_token = inbox_grpc
    request = inbox_pb2.SendMessageRequest(to_staff_ids=["stf_b"], subject="Call me", body="About the patient")
    for client_id in ("cloud-comms", "auto-reply"):
        code = refused(lambda client_id=client_id: stub.SendMessage(request, metadata=auth(service_token(client_id))))
        assert code == (grpc.StatusCode.PERMISSION_DENIED, "staff_only")
    assert db.messages.count_documents({}) == 0
    sent = stub.SendMessage(request, metadata=auth(staff_token("stf_a")), timeout=5)
    assert list(sent.recipient_staff_ids) == ["stf_b"]
    assert [(e.actor_id, e.actor_kind, e.reason, e.target_id, e.service) for e in refusals(db)] == [
        ("svc:cloud-comms", "service", "staff_only", "clinic.inbox.v1.InboxService/SendMessage", "inbox"),
        ("svc:auto-reply", "service", "staff_only", "clinic.inbox.v1.InboxService/SendMessage", "inbox"),
    ]


def test_staff_cannot_deliver_board_items_and_the_attempt_is_recorded(inbox_grpc):
    stub, db, staff_token, _ = inbox_grpc
    request = inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB,
        recipients=inbox_pb2.Recipients(staff_ids=["stf_b"]),
        title="Critical potassium, call patient",
        source="lab",
        source_ref="order-1",
    )
    code = refused(lambda: stub.DeliverItem(request, metadata=auth(staff_token("stf_a", "admin")), timeout=5))
    assert code == (grpc.StatusCode.PERMISSION_DENIED, "service_only")
    assert db.notices.count_documents({}) == 0 and db.board_items.count_documents({}) == 0
    [event] = refusals(db)
    assert (event.actor_id, event.kind, event.reason, event.target_id) == (
        "stf_a",
        "access_refused",
        "service_only",
        "clinic.inbox.v1.InboxService/DeliverItem",
    )
