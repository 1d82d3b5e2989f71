"""Cloud addresses (Direct addresses and fax numbers linked to staff): the admin HTTP API, the demo
data, the query shapes on the real database, and ResolveCloudAddress over gRPC for cloud-comms."""

from __future__ import annotations

import grpc
import pytest

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.directory import demo
from services.directory.domain import CloudAddress
from services.kit.settings import secret_digest
from tests.helpers import auth

API = "/api/v1/directory/cloud-addresses"
INTAKE = "cad_riverbend_intake"
WILSON, THOMPSON, KIM = "stf_riverbend_wilson", "stf_riverbend_thompson", "stf_riverbend_kim"


@pytest.fixture
def directory_overrides():
    """The `dut` knows cloud-comms and inbox as service clients."""
    return {"SERVICE_CLIENTS": f"cloud-comms:{secret_digest('cc-secret')},inbox:{secret_digest('inbox-secret')}"}


@pytest.fixture
def stub(dut):
    server = dut.directory.grpc_server("127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield directory_pb2_grpc.DirectoryServiceStub(channel)
    channel.close()
    server.stop(0)


@pytest.fixture
def admin(dut):
    return dut.as_user("admin")


def service_token(stub, client_id: str, secret: str, agency_id: str = "") -> str:
    request = directory_pb2.IssueServiceTokenRequest(client_id=client_id, client_secret=secret, agency_id=agency_id)
    return stub.IssueServiceToken(request, timeout=5).access_token


def resolve(stub, token: str, kind: str, address: str) -> directory_pb2.ResolveCloudAddressResponse:
    request = directory_pb2.ResolveCloudAddressRequest(kind=kind, address=address)
    return stub.ResolveCloudAddress(request, metadata=auth(token), timeout=5)


# --- gRPC: ResolveCloudAddress ------------------------------------------------------------------


def test_cloud_comms_resolves_a_shared_direct_address_case_insensitively(stub):
    token = service_token(stub, "cloud-comms", "cc-secret")
    found = resolve(stub, token, "direct", "  Intake@Direct.RIVERBEND.example ")
    assert found.found and found.agency_id == "agy_riverbend" and found.address_id == INTAKE
    assert list(found.staff_ids) == [WILSON, THOMPSON] and found.label == "Intake"
    fax = resolve(stub, token, "fax", "+1 (555) 555-0100")
    assert fax.found and fax.address_id == "cad_riverbend_fax" and list(fax.staff_ids) == [WILSON, THOMPSON]
    lakeside = resolve(stub, token, "direct", "frontdesk@direct.lakeside.example")
    assert lakeside.agency_id == "agy_lakeside" and list(lakeside.staff_ids) == ["stf_lakeside_baker"]


def test_unknown_or_malformed_addresses_are_not_found(stub):
    token = service_token(stub, "cloud-comms", "cc-secret")
    for kind, address in [
        ("direct", "nobody@direct.riverbend.example"),
        ("direct", "not an address"),
        ("fax", "+15555550199"),
        ("fax", "5555550100"),
        ("fax", "intake@direct.riverbend.example"),
    ]:
        answer = resolve(stub, token, kind, address)
        assert answer == directory_pb2.ResolveCloudAddressResponse(found=False), (kind, address)
    with pytest.raises(grpc.RpcError) as caught:
        resolve(stub, token, "email", "intake@direct.riverbend.example")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deactivated_staff_are_left_out_of_the_resolution(dut, stub, admin):
    dut.client.patch(f"{API}/{INTAKE}", json={"staff_ids": [WILSON, THOMPSON]}, headers=admin)
    assert (
        dut.client.patch(f"/api/v1/directory/staff/{THOMPSON}", json={"active": False}, headers=admin).status_code
        == 200
    )
    found = resolve(stub, service_token(stub, "cloud-comms", "cc-secret"), "direct", "intake@direct.riverbend.example")
    assert list(found.staff_ids) == [WILSON]


def test_only_cloud_comms_with_a_platform_token_may_resolve(dut, stub):
    refused = [
        service_token(stub, "inbox", "inbox-secret"),  # another service, platform scope
        service_token(stub, "cloud-comms", "cc-secret", "agy_riverbend"),  # cloud-comms, agency scope
        dut.token("admin"),  # staff
    ]
    for token in refused:
        with pytest.raises(grpc.RpcError) as caught:
            resolve(stub, token, "direct", "intake@direct.riverbend.example")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as caught:
        stub.ResolveCloudAddress(directory_pb2.ResolveCloudAddressRequest(kind="fax", address="+15555550100"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- gRPC: ListLinkedCloudAddresses (the addresses a staff member sends from) --------------------


def linked(stub, token: str, kind: str, agency_id: str, staff_id: str) -> list[tuple[str, str, list[str]]]:
    request = directory_pb2.ListLinkedCloudAddressesRequest(kind=kind, agency_id=agency_id, staff_id=staff_id)
    reply = stub.ListLinkedCloudAddresses(request, metadata=auth(token), timeout=5)
    return [(a.address, a.address_id, list(a.staff_ids)) for a in reply.addresses]


def test_a_staff_members_linked_addresses_of_one_kind(stub):
    token = service_token(stub, "cloud-comms", "cc-secret")
    assert linked(stub, token, "fax", "agy_riverbend", WILSON) == [
        ("+15555550100", "cad_riverbend_fax", [WILSON, THOMPSON])
    ]
    assert [a for a, _, _ in linked(stub, token, "direct", "agy_riverbend", WILSON)] == [
        "intake@direct.riverbend.example"
    ]
    # Linked to nothing, unknown, or asked under another agency: nothing.
    assert linked(stub, token, "fax", "agy_riverbend", KIM) == []
    assert linked(stub, token, "fax", "agy_riverbend", "stf_nobody") == []
    assert linked(stub, token, "fax", "agy_lakeside", WILSON) == []
    with pytest.raises(grpc.RpcError) as caught:
        linked(stub, token, "email", "agy_riverbend", WILSON)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_deactivated_staff_member_sends_from_nothing_and_drops_out_of_the_others(dut, stub, admin):
    assert (
        dut.client.patch(f"/api/v1/directory/staff/{THOMPSON}", json={"active": False}, headers=admin).status_code
        == 200
    )
    token = service_token(stub, "cloud-comms", "cc-secret")
    assert linked(stub, token, "fax", "agy_riverbend", THOMPSON) == []
    assert linked(stub, token, "fax", "agy_riverbend", WILSON) == [("+15555550100", "cad_riverbend_fax", [WILSON])]


def test_only_cloud_comms_with_a_platform_token_may_list_linked_addresses(dut, stub):
    for token in (service_token(stub, "inbox", "inbox-secret"), dut.token("admin")):
        with pytest.raises(grpc.RpcError) as caught:
            linked(stub, token, "fax", "agy_riverbend", WILSON)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- HTTP: the admin API ------------------------------------------------------------------------


def test_admins_list_every_address_of_their_agency_with_linked_names(dut, admin):
    response = dut.client.get(API, headers=admin)
    assert response.status_code == 200
    listed = {a["address"]: a for a in response.get_json()["cloud_addresses"]}
    assert set(listed) == {"intake@direct.riverbend.example", "dr.reyes@direct.riverbend.example", "+15555550100"}
    intake = listed["intake@direct.riverbend.example"]
    assert intake["id"] == INTAKE and intake["kind"] == "direct" and intake["label"] == "Intake"
    assert intake["staff"] == [
        {"id": WILSON, "display_name": "Chris Wilson", "active": True},
        {"id": THOMPSON, "display_name": "Dana Thompson", "active": True},
    ]


def test_staff_see_only_the_addresses_linked_to_them(dut):
    mine = dut.client.get(API, headers=dut.as_user("dr.reyes")).get_json()["cloud_addresses"]
    assert [a["address"] for a in mine] == ["dr.reyes@direct.riverbend.example"]
    assert dut.client.get(API, headers=dut.as_user("nurse.kim")).get_json() == {"cloud_addresses": []}
    assert (
        dut.client.post(
            API, json={"kind": "fax", "address": "+15555550111"}, headers=dut.as_user("nurse.kim")
        ).status_code
        == 403
    )
    assert dut.client.delete(f"{API}/{INTAKE}", headers=dut.as_user("intake.wilson")).status_code == 403


def test_create_update_and_delete(dut, admin):
    created = dut.client.post(
        API,
        json={
            "kind": "direct",
            "address": "Billing@Direct.Riverbend.example",
            "label": "Billing",
            "staff_ids": [KIM, KIM],
        },
        headers=admin,
    )
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    assert body["address"] == "billing@direct.riverbend.example" and body["staff_ids"] == [KIM]
    assert created.headers["Location"] == f"{API}/{body['id']}"
    changed = dut.client.patch(
        f"{API}/{body['id']}", json={"label": "Billing office", "staff_ids": [WILSON, KIM]}, headers=admin
    )
    assert changed.status_code == 200
    assert changed.get_json()["label"] == "Billing office"
    assert [s["display_name"] for s in changed.get_json()["staff"]] == ["Chris Wilson", "Jordan Kim, RN"]
    fax = dut.client.post(API, json={"kind": "fax", "address": "+44 20 7946 0000"}, headers=admin)
    assert fax.status_code == 201 and fax.get_json()["address"] == "+442079460000" and fax.get_json()["staff"] == []
    assert dut.client.delete(f"{API}/{body['id']}", headers=admin).status_code == 204
    assert dut.client.delete(f"{API}/{body['id']}", headers=admin).status_code == 404
    assert dut.client.patch(f"{API}/{body['id']}", json={"label": "x"}, headers=admin).status_code == 404


@pytest.mark.parametrize(
    ("kind", "address"),
    [
        ("direct", "no-domain"),
        ("direct", "two@@direct.riverbend.example"),
        ("direct", "a@localhost"),
        ("direct", "a b@direct.riverbend.example"),
        ("direct", ".dot@direct.riverbend.example"),
        ("direct", "a@-bad.example"),
        ("direct", "x" * 65 + "@direct.riverbend.example"),
        ("fax", "5555550100"),
        ("fax", "+05555550100"),
        ("fax", "+1555"),
        ("fax", "+1555555010012345"),
        ("fax", "+1555555O100"),
    ],
)
def test_invalid_addresses_are_refused(dut, admin, kind, address):
    response = dut.client.post(API, json={"kind": kind, "address": address}, headers=admin)
    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_address"


def test_request_validation(dut, admin):
    def post(body):
        return dut.client.post(API, json=body, headers=admin)

    assert post({"kind": "email", "address": "a@b.example"}).get_json()["code"] == "invalid_kind"
    assert post({"kind": "fax"}).get_json()["code"] == "missing_field"
    assert post({"kind": "fax", "address": "+15555550111", "extra": 1}).get_json()["code"] == "unknown_field"
    assert (
        post({"kind": "fax", "address": "+15555550111", "staff_ids": "stf_riverbend_kim"}).get_json()["code"]
        == "invalid_type"
    )
    # Operator objects never reach the database.
    for body in (
        {"kind": "fax", "address": {"$gt": ""}},
        {"kind": {"$gt": ""}, "address": "+15555550111"},
        {"kind": "fax", "address": "+15555550111", "staff_ids": [{"$gt": ""}]},
        {"kind": "fax", "address": "+15555550111", "label": {"$gt": ""}},
    ):
        response = post(body)
        assert response.status_code == 400 and response.get_json()["code"] == "invalid_type", body
    patched = dut.client.patch(f"{API}/{INTAKE}", json={"staff_ids": {"$gt": ""}}, headers=admin)
    assert patched.status_code == 400 and patched.get_json()["code"] == "invalid_type"
    assert dut.client.get(API, headers=admin).get_json()["cloud_addresses"][1]["staff_ids"] == [WILSON, THOMPSON]


def test_staff_must_be_active_members_of_the_agency(dut, admin):
    response = dut.client.post(
        API,
        json={
            "kind": "fax",
            "address": "+15555550111",
            "staff_ids": [KIM, "stf_lakeside_baker", "stf_riverbend_young", "stf_nobody"],
        },
        headers=admin,
    )
    assert response.status_code == 400
    assert response.get_json()["code"] == "unknown_staff"
    assert response.get_json()["details"]["staff_ids"] == ["stf_lakeside_baker", "stf_riverbend_young", "stf_nobody"]
    patched = dut.client.patch(f"{API}/{INTAKE}", json={"staff_ids": ["stf_lakeside_baker"]}, headers=admin)
    assert patched.status_code == 400 and patched.get_json()["details"]["staff_ids"] == ["stf_lakeside_baker"]
    assert dut.store.get_cloud_address("agy_riverbend", INTAKE).staff_ids == (WILSON, THOMPSON)


def test_an_address_belongs_to_one_agency(dut, admin):
    lakeside = dut.as_user("lakeside.admin")
    for headers in (admin, lakeside):
        taken = dut.client.post(
            API, json={"kind": "direct", "address": "INTAKE@direct.riverbend.example"}, headers=headers
        )
        assert taken.status_code == 409 and taken.get_json()["code"] == "address_taken"
    taken = dut.client.post(API, json={"kind": "fax", "address": "+1 555 555 0100"}, headers=lakeside)
    assert taken.status_code == 409
    # The same text as another kind is another address.
    assert (
        dut.client.post(
            API, json={"kind": "direct", "address": "fax@direct.lakeside.example"}, headers=lakeside
        ).status_code
        == 201
    )


def test_another_agencys_addresses_are_not_found(dut):
    lakeside = dut.as_user("lakeside.admin")
    assert dut.client.patch(f"{API}/{INTAKE}", json={"label": "Mine"}, headers=lakeside).status_code == 404
    assert dut.client.delete(f"{API}/{INTAKE}", headers=lakeside).status_code == 404
    assert dut.client.delete(f"{API}/not%20an%20id", headers=lakeside).status_code == 404
    listed = dut.client.get(API, headers=lakeside).get_json()["cloud_addresses"]
    assert [a["address"] for a in listed] == ["frontdesk@direct.lakeside.example"]
    assert dut.store.get_cloud_address("agy_riverbend", INTAKE).label == "Intake"


def test_the_api_needs_a_token(dut):
    assert dut.client.get(API).status_code == 401


# --- demo data and storage ----------------------------------------------------------------------


def test_seeding_adds_the_demo_addresses_to_an_older_database_once(dut, admin):
    dut.store.cloud_addresses.delete_many({})
    dut.store.create_cloud_address(CloudAddress("cad_own", "agy_riverbend", "fax", "+15555550100", "Our fax", ()))
    result = demo.seed(dut.store, dut.directory.hasher)
    assert result.created == 3  # the fax number is registered already (under another id): left alone
    assert dut.store.find_cloud_address("fax", "+15555550100").id == "cad_own"
    dut.client.patch(f"{API}/{INTAKE}", json={"label": "Front office"}, headers=admin)
    assert demo.seed(dut.store, dut.directory.hasher).created == 0
    assert dut.store.get_cloud_address("agy_riverbend", INTAKE).label == "Front office"


def test_cloud_address_query_shapes(dut):
    store = dut.store
    indexes = store.cloud_addresses.index_information()
    assert any(spec.get("unique") and [k for k, _ in spec["key"]] == ["kind", "address"] for spec in indexes.values())
    assert store.find_cloud_address("direct", "intake@direct.riverbend.example").id == INTAKE
    assert store.find_cloud_address("fax", "intake@direct.riverbend.example") is None
    assert [a.kind for a in store.list_cloud_addresses("agy_riverbend")] == ["direct", "direct", "fax"]
    assert store.get_cloud_address("agy_lakeside", INTAKE) is None
    assert store.delete_cloud_address("agy_lakeside", INTAKE) is False
