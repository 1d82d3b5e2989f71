"""Directory's side of the patient portal: GetPortalPatient (admins and inbox, like the HTTP route;
tests/integration/test_grpc_roles.py has the refusals) and the agency's portal_consumer setting."""

from __future__ import annotations

import grpc
import pytest

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from tests.helpers import auth


@pytest.fixture
def stub(dut):
    server = dut.directory.grpc_server("127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield directory_pb2_grpc.DirectoryServiceStub(channel)
    channel.close()
    server.stop(0)


def portal_patient(stub, metadata, **request):
    return stub.GetPortalPatient(directory_pb2.GetPortalPatientRequest(**request), metadata=metadata, timeout=5)


def refusal(stub, metadata, **request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        portal_patient(stub, metadata, **request)
    trailers = dict(refused.value.trailing_metadata() or ())
    return refused.value.code(), trailers.get("error-code", "")


def test_a_portal_patient_is_found_by_portal_user_or_directory_id(dut, stub):
    riverbend = auth(dut.token("admin"))
    by_portal_user = portal_patient(stub, riverbend, portal_user_id="portal_riverbend_0001")
    assert by_portal_user.patient_id == "pat_riverbend_demo"
    assert by_portal_user.agency_id == "agy_riverbend"
    assert by_portal_user.portal_user_id == "portal_riverbend_0001"
    assert by_portal_user.display_name == "Jane Demo-Client"
    by_id = portal_patient(stub, riverbend, patient_id="pat_riverbend_demo")
    assert by_id.portal_user_id == "portal_riverbend_0001"


def test_another_agencys_or_an_unknown_patient_is_not_found(dut, stub):
    lakeside = auth(dut.token("lakeside.admin"))
    assert portal_patient(stub, lakeside, portal_user_id="portal_lakeside_0001").patient_id == "pat_lakeside_demo"
    for request in (
        {"portal_user_id": "portal_riverbend_0001"},
        {"patient_id": "pat_riverbend_demo"},
        {"portal_user_id": "portal_nobody"},
        {"portal_user_id": "not an id!"},
    ):
        assert refusal(stub, lakeside, **request) == (grpc.StatusCode.NOT_FOUND, "patient_not_found")


def test_exactly_one_of_the_two_ids_is_asked_for(dut, stub):
    riverbend = auth(dut.token("admin"))
    both = refusal(stub, riverbend, patient_id="pat_riverbend_demo", portal_user_id="portal_riverbend_0001")
    assert both[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refusal(stub, riverbend)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_get_portal_patient_needs_a_token(stub):
    assert refusal(stub, [], portal_user_id="portal_riverbend_0001")[0] == grpc.StatusCode.UNAUTHENTICATED


def test_agency_settings_name_the_portal_consumer_the_admin_chose(dut, stub):
    riverbend = auth(dut.token("admin"))
    settings = stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest(), metadata=riverbend, timeout=5)
    assert settings.portal_consumer == "patient-portal"
    # Like GET /api/v1/directory/agency, other staff are not told which partner serves the portal.
    staff_settings = stub.GetAgencySettings(
        directory_pb2.GetAgencySettingsRequest(), metadata=auth(dut.token("dr.reyes")), timeout=5
    )
    assert staff_settings.portal_consumer == "" and staff_settings.time_zone == settings.time_zone
    admin = dut.as_user("admin")
    assert dut.client.get("/api/v1/directory/agency", headers=admin).get_json()["options"]["portal_consumer"] == (
        "patient-portal"
    )
    staff_view = dut.client.get("/api/v1/directory/agency", headers=dut.as_user("dr.reyes")).get_json()
    assert "portal_consumer" not in staff_view["options"]

    changed = dut.client.patch(
        "/api/v1/directory/agency", json={"options": {"portal_consumer": "other-portal"}}, headers=admin
    )
    assert changed.status_code == 200
    assert changed.get_json()["options"] == {
        "notify_linked_staff_on_schedule_change": True,
        "compliance_escalation_minutes": 240,
        "idle_signout_minutes": 15,
        "notify_ordering_provider_of_results": False,
        "erx_subscription": True,
        "erx_vendor": "dosespot",
        "portal_consumer": "other-portal",
        "erx_clinic_id": "1001",
    }
    settings = stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest(), metadata=riverbend, timeout=5)
    assert settings.portal_consumer == "other-portal"
    lakeside = stub.GetAgencySettings(
        directory_pb2.GetAgencySettingsRequest(), metadata=auth(dut.token("lakeside.admin")), timeout=5
    )
    assert lakeside.portal_consumer == "patient-portal"

    cleared = dut.client.patch("/api/v1/directory/agency", json={"options": {"portal_consumer": ""}}, headers=admin)
    assert cleared.get_json()["options"]["portal_consumer"] == ""
    settings = stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest(), metadata=riverbend, timeout=5)
    assert settings.portal_consumer == ""


@pytest.mark.parametrize(
    ("options", "status", "code"),
    [
        ({"portal_consumer": {"$ne": ""}}, 400, "invalid_type"),
        ({"portal_consumer": "has spaces in it"}, 400, "invalid_portal_consumer"),
        ({"portal_consumer": "x" * 65}, 400, "too_long"),
    ],
)
def test_the_portal_consumer_is_validated(dut, options, status, code):
    response = dut.client.patch("/api/v1/directory/agency", json={"options": options}, headers=dut.as_user("admin"))
    assert response.status_code == status
    assert response.get_json()["code"] == code
    assert dut.store.get_agency("agy_riverbend").portal_consumer == "patient-portal"


def test_only_admins_change_the_portal_consumer(dut):
    response = dut.client.patch(
        "/api/v1/directory/agency",
        json={"options": {"portal_consumer": "mine"}},
        headers=dut.as_user("dr.reyes"),
    )
    assert response.status_code == 403
    assert dut.store.get_agency("agy_riverbend").portal_consumer == "patient-portal"
