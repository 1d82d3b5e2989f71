"""The attack over the running system: a non-admin's token asks directory's gRPC for a portal
patient's name (the HTTP route refuses non-admins). It is PERMISSION_DENIED `admin_only` and leaves
a denied `phi.accessed.v1` record, published from directory's outbox; inbox, the portal's service, still reads
the patient for the portal."""

from __future__ import annotations

import grpc
import pytest
import requests

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from tests.e2e.conftest import error_code
from tests.helpers import auth
from tests.waits import wait_until

JANE = "pat_riverbend_demo"


def test_a_non_admin_token_cannot_read_a_portal_patient_over_grpc(directory_channel, events, kim, admin):
    stub = directory_pb2_grpc.DirectoryServiceStub(directory_channel)
    request = directory_pb2.GetPortalPatientRequest(patient_id=JANE)
    with events.listen("phi.accessed.v1") as heard:
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetPortalPatient(request, metadata=auth(kim.token), timeout=5)
        assert (refused.value.code(), error_code(refused.value)) == (grpc.StatusCode.PERMISSION_DENIED, "admin_only")
        assert "Jane" not in (refused.value.details() or "")
        # Like GET /api/v1/directory/patients/<id>, through the gateway.
        assert kim.get(f"/api/v1/directory/patients/{JANE}").status_code == 403

        def denied():
            found = [
                a
                for a in (e.payload for e in heard.drain())
                if a.actor_id == kim.staff_id and a.outcome == "denied" and a.resource_id == JANE
            ]
            return found if len(found) >= 2 else None

        records = wait_until(denied, timeout=15, message="both refusals published as phi.accessed.v1")
    assert len(records) == 2 and {a.patient_id for a in records} == {JANE}
    assert {a.service for a in records} == {"directory"}
    assert stub.GetPortalPatient(request, metadata=auth(admin.token), timeout=5).display_name


def test_the_portal_still_reaches_its_patients_through_inbox(stack):
    """Inbox asks directory about the portal's patient with its own service identity: still allowed."""
    base = f"{stack.gateway_url}/api/v1/partner/portal/agencies/agy_riverbend/patients/portal_riverbend_0001"
    listed = requests.get(f"{base}/threads", headers={"apikey": stack.patient_portal_api_key}, timeout=10)
    assert listed.status_code == 200, listed.text
