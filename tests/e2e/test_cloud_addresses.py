"""Cloud addresses through the gateway: an admin links staff to a Direct address or fax number, and
cloud-comms resolves an address (platform-scope service token) to its agency and linked staff."""

from __future__ import annotations

import uuid

import grpc
import pytest

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from tests.helpers import auth

API = "/api/v1/directory/cloud-addresses"
WILSON, THOMPSON = "stf_riverbend_wilson", "stf_riverbend_thompson"


@pytest.fixture(scope="module")
def stub(directory_channel):
    return directory_pb2_grpc.DirectoryServiceStub(directory_channel)


@pytest.fixture(scope="module")
def platform_token(stub, service_secret):
    def _token(client_id: str) -> str:
        request = directory_pb2.IssueServiceTokenRequest(client_id=client_id, client_secret=service_secret(client_id))
        return stub.IssueServiceToken(request, timeout=5).access_token

    return _token


def resolve(stub, token: str, kind: str, address: str) -> directory_pb2.ResolveCloudAddressResponse:
    return stub.ResolveCloudAddress(
        directory_pb2.ResolveCloudAddressRequest(kind=kind, address=address), metadata=auth(token), timeout=5
    )


def test_the_demo_addresses_are_listed_to_admins_and_to_linked_staff(admin, wilson, kim, outsider):
    listed = admin.get(API)
    assert listed.status_code == 200, listed.text
    by_address = {a["address"]: a for a in listed.json()["cloud_addresses"]}
    assert {"intake@direct.riverbend.example", "+15555550100", "dr.reyes@direct.riverbend.example"} <= set(by_address)
    assert {WILSON, THOMPSON} <= set(by_address["intake@direct.riverbend.example"]["staff_ids"])
    mine = {a["address"] for a in wilson.get(API).json()["cloud_addresses"]}
    assert {"intake@direct.riverbend.example", "+15555550100"} <= mine
    assert "dr.reyes@direct.riverbend.example" not in mine
    assert "intake@direct.riverbend.example" not in {a["address"] for a in kim.get(API).json()["cloud_addresses"]}
    lakeside = {a["address"] for a in outsider.get(API).json()["cloud_addresses"]}
    assert "frontdesk@direct.lakeside.example" in lakeside and not any("riverbend" in a for a in lakeside)


def test_an_admin_adds_links_and_removes_an_address_that_cloud_comms_resolves(
    admin, kim, outsider, stub, platform_token
):
    address = f"team-{uuid.uuid4().hex[:8]}@Direct.Riverbend.example"
    created = admin.post(API, json={"kind": "direct", "address": address, "label": "Team", "staff_ids": [WILSON]})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["address"] == address.lower()
    try:
        assert kim.post(API, json={"kind": "fax", "address": "+15555550177"}).status_code == 403
        assert outsider.patch(f"{API}/{body['id']}", json={"label": "Mine"}).status_code == 404
        assert outsider.delete(f"{API}/{body['id']}").status_code == 404
        taken = outsider.post(API, json={"kind": "direct", "address": address.upper()})
        assert taken.status_code == 409 and taken.json()["code"] == "address_taken"
        injected = admin.post(API, json={"kind": "direct", "address": {"$gt": ""}})
        assert injected.status_code == 400 and injected.json()["code"] == "invalid_type"
        unknown = admin.patch(f"{API}/{body['id']}", json={"staff_ids": ["stf_lakeside_baker"]})
        assert unknown.status_code == 400 and unknown.json()["details"]["staff_ids"] == ["stf_lakeside_baker"]

        linked = admin.patch(f"{API}/{body['id']}", json={"staff_ids": [WILSON, "stf_riverbend_kim"]})
        assert linked.status_code == 200, linked.text
        assert [s["display_name"] for s in linked.json()["staff"]] == ["Chris Wilson", "Jordan Kim, RN"]

        cloud_comms = platform_token("cloud-comms")
        found = resolve(stub, cloud_comms, "direct", address)
        assert found.found and found.agency_id == "agy_riverbend" and found.address_id == body["id"]
        assert list(found.staff_ids) == [WILSON, "stf_riverbend_kim"] and found.label == "Team"
        with pytest.raises(grpc.RpcError) as caught:
            resolve(stub, platform_token("inbox"), "direct", address)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        assert admin.delete(f"{API}/{body['id']}").status_code == 204
    assert not resolve(stub, platform_token("cloud-comms"), "direct", address).found


def test_cloud_comms_resolves_the_demo_fax_number(stub, platform_token):
    found = resolve(stub, platform_token("cloud-comms"), "fax", "+15555550100")
    assert found.found and found.agency_id == "agy_riverbend" and found.label == "Main fax"
    assert {WILSON, THOMPSON} <= set(found.staff_ids)
    assert not resolve(stub, platform_token("cloud-comms"), "fax", "+15555550199").found
