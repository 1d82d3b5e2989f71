"""The directory's gRPC service on a real server and port, called the way other services call it."""

from __future__ import annotations

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.directory import tokens
from tests.helpers import auth
from tests.integration.test_directory_auth import Recorder

GET_STAFF = "/clinic.directory.v1.DirectoryService/GetStaff"


@pytest.fixture
def channel(dut):
    server = dut.directory.grpc_server("127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield channel
    channel.close()
    server.stop(0)


@pytest.fixture
def stub(channel):
    return directory_pb2_grpc.DirectoryServiceStub(channel)


@pytest.fixture
def riverbend(dut):
    return auth(dut.token("dr.reyes"))


def test_resolve_recipients_combines_people_teams_and_the_whole_agency(stub, riverbend):
    response = stub.ResolveRecipients(
        directory_pb2.ResolveRecipientsRequest(
            staff_ids=["stf_riverbend_kim", "stf_riverbend_patel", "stf_riverbend_kim"],
            team_ids=["team_riverbend_medical"],
        ),
        metadata=riverbend,
        timeout=5,
    )
    assert list(response.staff_ids) == sorted(
        {
            "stf_riverbend_kim",
            "stf_riverbend_patel",
            "stf_riverbend_reyes",
            "stf_riverbend_chen",
            "stf_riverbend_brooks",
            "stf_riverbend_white",
        }
    )
    assert not response.missing_staff_ids and not response.missing_team_ids
    assert dict(response.team_names) == {"team_riverbend_medical": "Medical"}


def test_resolve_recipients_leaves_out_deactivated_staff(stub, riverbend):
    response = stub.ResolveRecipients(
        directory_pb2.ResolveRecipientsRequest(
            staff_ids=["stf_riverbend_young"], team_ids=["team_riverbend_outpatient"]
        ),
        metadata=riverbend,
        timeout=5,
    )
    assert "stf_riverbend_young" not in response.staff_ids
    assert len(response.staff_ids) == 6
    assert not response.missing_staff_ids


def test_whole_agency_reaches_every_active_member_once(stub, riverbend):
    response = stub.ResolveRecipients(
        directory_pb2.ResolveRecipientsRequest(whole_agency=True, team_ids=["team_riverbend_intake"]),
        metadata=riverbend,
        timeout=5,
    )
    assert len(response.staff_ids) == 19
    assert len(set(response.staff_ids)) == 19
    assert list(response.staff_ids) == sorted(response.staff_ids)
    assert all(staff_id.startswith("stf_riverbend_") for staff_id in response.staff_ids)
    assert "stf_riverbend_young" not in response.staff_ids


def test_another_agencys_ids_come_back_missing(stub, riverbend):
    response = stub.ResolveRecipients(
        directory_pb2.ResolveRecipientsRequest(
            staff_ids=["stf_lakeside_ramirez", "stf_riverbend_kim", "stf_does_not_exist", "not an id!"],
            team_ids=["team_lakeside_clinical", "team_riverbend_medical"],
        ),
        metadata=riverbend,
        timeout=5,
    )
    assert list(response.missing_staff_ids) == ["stf_lakeside_ramirez", "stf_does_not_exist", "not an id!"]
    assert list(response.missing_team_ids) == ["team_lakeside_clinical"]
    assert dict(response.team_names) == {"team_riverbend_medical": "Medical"}  # not the other agency's name
    assert not any(staff_id.startswith("stf_lakeside_") for staff_id in response.staff_ids)
    assert "stf_riverbend_kim" in response.staff_ids


def test_get_staff_describes_known_staff_and_lists_the_rest_missing(stub, riverbend):
    response = stub.GetStaff(
        directory_pb2.GetStaffRequest(
            staff_ids=["stf_riverbend_reyes", "stf_lakeside_admin", "stf_riverbend_young", "stf_unknown"]
        ),
        metadata=riverbend,
        timeout=5,
    )
    by_id = {member.staff_id: member for member in response.staff}
    assert list(by_id) == ["stf_riverbend_reyes", "stf_riverbend_young"]
    reyes = by_id["stf_riverbend_reyes"]
    assert reyes.agency_id == "agy_riverbend"
    assert reyes.display_name == "Dr. Elena Reyes"
    assert list(reyes.roles) == [directory_pb2.ROLE_STAFF, directory_pb2.ROLE_PRESCRIBER]
    assert reyes.eprescribing_enabled and reyes.lab_result_notification and reyes.active
    assert list(reyes.team_ids) == ["team_riverbend_medical"]
    assert by_id["stf_riverbend_young"].active is False
    assert list(response.missing_staff_ids) == ["stf_lakeside_admin", "stf_unknown"]


def test_get_staff_handles_many_ids_at_once(stub, riverbend):
    ids = [f"stf_riverbend_{key}" for key in ("admin", "kim", "chen", "patel", "lee")] + [
        f"stf_x{i}" for i in range(40)
    ]
    response = stub.GetStaff(directory_pb2.GetStaffRequest(staff_ids=ids), metadata=riverbend, timeout=5)
    assert [member.staff_id for member in response.staff] == ids[:5]
    assert list(response.missing_staff_ids) == ids[5:]


def test_a_batch_of_staff_ids_is_one_database_query_per_batch(dut, stub, riverbend, monkeypatch):
    """A delivery's recipients are checked with one `_id $in` query, not one lookup per id; a long
    list goes in batches, and another agency's staff in the same batch still comes back missing."""
    recorder = Recorder(dut.store.staff)
    dut.store.staff = recorder
    asked = ["stf_riverbend_kim", "stf_riverbend_reyes", "stf_lakeside_ramirez", "stf_riverbend_chen", "stf_nobody"]
    response = stub.ResolveRecipients(
        directory_pb2.ResolveRecipientsRequest(staff_ids=asked), metadata=riverbend, timeout=5
    )
    assert list(response.staff_ids) == ["stf_riverbend_chen", "stf_riverbend_kim", "stf_riverbend_reyes"]
    assert list(response.missing_staff_ids) == ["stf_lakeside_ramirez", "stf_nobody"]
    assert recorder.calls == ["find"]
    recorder.calls.clear()
    monkeypatch.setattr(dut.store, "IN_BATCH", 2)
    response = stub.GetStaff(directory_pb2.GetStaffRequest(staff_ids=asked), metadata=riverbend, timeout=5)
    assert [member.staff_id for member in response.staff] == [asked[0], asked[1], asked[3]]
    assert list(response.missing_staff_ids) == ["stf_lakeside_ramirez", "stf_nobody"]
    assert recorder.calls.count("find") == 3  # 5 ids in batches of 2 (teams are read from their own collection)


def test_get_agency_settings_answers_for_the_callers_agency(dut, stub, riverbend):
    response = stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest(), metadata=riverbend, timeout=5)
    assert response.agency_id == "agy_riverbend"
    assert response.name == "Riverbend Behavioral Health"
    assert response.notify_linked_staff_on_schedule_change is True
    assert response.terminology.patient_singular == "Client"
    assert response.terminology.patient_plural == "Clients"
    assert response.time_zone == "America/Chicago"
    assert response.compliance_escalation_minutes == 240
    assert response.idle_signout_minutes == 15
    lakeside = stub.GetAgencySettings(
        directory_pb2.GetAgencySettingsRequest(), metadata=auth(dut.token("dr.ramirez")), timeout=5
    )
    assert lakeside.agency_id == "agy_lakeside"
    assert lakeside.notify_linked_staff_on_schedule_change is False
    assert lakeside.terminology.patient_singular == "Patient"
    assert lakeside.compliance_escalation_minutes == 24 * 60


def test_get_staff_names_each_members_supervisor(stub, riverbend):
    response = stub.GetStaff(
        directory_pb2.GetStaffRequest(staff_ids=["stf_riverbend_kim", "stf_riverbend_davis"]),
        metadata=riverbend,
        timeout=5,
    )
    assert [(m.staff_id, m.supervisor_id) for m in response.staff] == [
        ("stf_riverbend_kim", "stf_riverbend_reyes"),
        ("stf_riverbend_davis", ""),
    ]


def test_list_staff_filters_active_staff_by_role_and_lab_flag(dut, stub, riverbend):
    officers = stub.ListStaff(
        directory_pb2.ListStaffRequest(role=directory_pb2.ROLE_COMPLIANCE_OFFICER), metadata=riverbend, timeout=5
    )
    assert [m.staff_id for m in officers.staff] == ["stf_riverbend_ortiz"]
    lab = stub.ListStaff(
        directory_pb2.ListStaffRequest(lab_result_notification_only=True), metadata=riverbend, timeout=5
    )
    assert [m.staff_id for m in lab.staff] == sorted(
        f"stf_riverbend_{k}" for k in ("reyes", "kim", "chen", "brooks", "white")
    )
    everyone = stub.ListStaff(directory_pb2.ListStaffRequest(), metadata=riverbend, timeout=5)
    ids = [m.staff_id for m in everyone.staff]
    assert len(ids) == 19 and ids == sorted(ids)
    assert "stf_riverbend_young" not in ids and not any(i.startswith("stf_lakeside") for i in ids)
    lakeside = stub.ListStaff(
        directory_pb2.ListStaffRequest(role=directory_pb2.ROLE_COMPLIANCE_OFFICER),
        metadata=auth(dut.token("dr.ramirez")),
        timeout=5,
    )
    assert list(lakeside.staff) == []
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListStaff(directory_pb2.ListStaffRequest(role=42), metadata=riverbend, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_call_without_a_token_is_unauthenticated(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_call_with_a_forged_token_is_unauthenticated(dut, stub):
    """A well-formed token with genuine claims and our key id, signed by a key that is not ours."""
    genuine = dut.token("dr.reyes")
    claims = jwt.decode(genuine, options={"verify_signature": False})
    stranger = tokens.KeySet.from_pem(tokens.generate_private_key_pem()).active
    forged = jwt.encode(
        {**claims, "roles": ["staff", "admin"]},
        stranger.private_key,
        algorithm="RS256",
        headers={"kid": jwt.get_unverified_header(genuine)["kid"]},
    )
    for token in (forged, "not.a.token"):
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetStaff(
                directory_pb2.GetStaffRequest(staff_ids=["stf_riverbend_kim"]),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=5,
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(caught.value.trailing_metadata())["error-code"] == "invalid_token"
    # The genuine token of the same session is accepted: only the signature differs.
    answer = stub.GetStaff(
        directory_pb2.GetStaffRequest(staff_ids=["stf_riverbend_kim"]),
        metadata=[("authorization", f"Bearer {genuine}")],
        timeout=5,
    )
    assert [member.staff_id for member in answer.staff] == ["stf_riverbend_kim"]


def test_a_malformed_protobuf_request_is_invalid_argument(channel, riverbend):
    raw_call = channel.unary_unary(GET_STAFF)
    with pytest.raises(grpc.RpcError) as caught:
        raw_call(b"\x0a\xff\xff\xff\xff\x0f", metadata=riverbend, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_more_than_a_thousand_ids_is_invalid_argument(stub, riverbend):
    ids = [f"stf_{i}" for i in range(1001)]
    for request, method in (
        (directory_pb2.GetStaffRequest(staff_ids=ids), stub.GetStaff),
        (directory_pb2.ResolveRecipientsRequest(staff_ids=ids[:600], team_ids=ids[600:]), stub.ResolveRecipients),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            method(request, metadata=riverbend, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(caught.value.trailing_metadata())["error-code"] == "too_many_ids"


def test_health_is_served_without_a_token(channel):
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(service="clinic.directory.v1.DirectoryService"), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
