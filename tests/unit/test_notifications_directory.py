"""Who gets lab results: directory's answer filtered and cached per agency (a stand-in stub, no network)."""

from __future__ import annotations

import threading

from clinic.directory.v1 import directory_pb2
from services.notifications.directory_client import DirectoryClient
from tests.waits import wait_until


class Stub:
    """directory's ResolveRecipients and GetStaff, counting calls."""

    def __init__(self, staff: list[directory_pb2.Staff]):
        self.staff = {s.staff_id: s for s in staff}
        self.calls = 0

    def ResolveRecipients(self, request):  # noqa: N802 - gRPC method name
        self.calls += 1
        assert request.whole_agency
        return directory_pb2.ResolveRecipientsResponse(staff_ids=list(self.staff))

    def GetStaff(self, request):  # noqa: N802
        return directory_pb2.GetStaffResponse(staff=[self.staff[i] for i in request.staff_ids])

    def GetAgencySettings(self, request):  # noqa: N802
        self.calls += 1
        return directory_pb2.GetAgencySettingsResponse(time_zone=self.zone)

    zone = "America/Chicago"


def member(staff_id: str, *, lab: bool, active: bool = True, agency: str = "agy_a") -> directory_pb2.Staff:
    return directory_pb2.Staff(staff_id=staff_id, agency_id=agency, lab_result_notification=lab, active=active)


def client_with(stub: Stub, now: list[float]) -> DirectoryClient:
    client = DirectoryClient("127.0.0.1:1", cache_s=30.0, clock=lambda: now[0])
    client._stub = stub
    return client


def test_lab_results_go_to_active_flagged_staff_of_the_agency_only():
    stub = Stub(
        [
            member("stf_a_flagged", lab=True),
            member("stf_a_plain", lab=False),
            member("stf_a_gone", lab=True, active=False),
            member("stf_b_flagged", lab=True, agency="agy_b"),
            member("stf_a_second", lab=True),
        ]
    )
    assert client_with(stub, [0.0]).lab_recipients("agy_a") == ["stf_a_flagged", "stf_a_second"]


def test_the_staff_list_is_cached_per_agency_for_the_configured_time():
    now = [100.0]
    stub = Stub([member("stf_a_flagged", lab=True)])
    client = client_with(stub, now)
    client.lab_recipients("agy_a")
    now[0] += 14.0
    stub.staff["stf_a_new"] = member("stf_a_new", lab=True)
    assert client.lab_recipients("agy_a") == ["stf_a_flagged"]  # still the cached answer
    assert stub.calls == 1
    now[0] += 15.0  # past half its time: answered from the cache, reloaded in the background
    assert client.lab_recipients("agy_a") == ["stf_a_flagged"]
    wait_until(lambda: client.lab_recipients("agy_a") == ["stf_a_flagged", "stf_a_new"], timeout=5)
    assert stub.calls == 2
    now[0] += 31.0  # nobody asked while it aged: its next caller loads it
    del stub.staff["stf_a_new"]
    assert client.lab_recipients("agy_a") == ["stf_a_flagged"]
    assert stub.calls == 3
    client.close()


def test_agency_settings_are_cached_and_reloaded_in_the_background_past_half_their_time():
    now = [100.0]
    stub = Stub([])
    client = client_with(stub, now)
    assert client.agency_settings("agy_a").time_zone == "America/Chicago"
    stub.zone = "America/Denver"
    now[0] += 16.0  # past half its time: the cached answer at once, the new one soon after
    assert client.agency_settings("agy_a").time_zone == "America/Chicago"
    wait_until(lambda: client.agency_settings("agy_a").time_zone == "America/Denver", timeout=5)
    assert stub.calls == 2
    client.close()


def test_an_agency_used_lately_is_kept_warm_so_a_result_after_a_quiet_spell_does_not_wait():
    now = [100.0]
    stub = Stub([member("stf_a_flagged", lab=True)])
    client = client_with(stub, now)
    assert client.recently_used(600) == []
    client.lab_recipients("agy_a")
    client.agency_settings("agy_a")
    assert stub.calls == 2 and client.recently_used(600) == ["agy_a"]
    now[0] += 10.0
    assert client.keep_warm("agy_a") == 0  # not yet half their cache time old
    now[0] += 6.0
    stub.staff["stf_a_new"] = member("stf_a_new", lab=True)
    assert client.keep_warm("agy_a") == 2  # staff list and settings reloaded
    assert stub.calls == 4
    # Nobody asks for 40 s (past the cache time): a warmer running every few seconds kept it loaded.
    for _ in range(8):
        now[0] += 5.0
        client.keep_warm("agy_a")
    assert client.lab_recipients("agy_a") == ["stf_a_flagged", "stf_a_new"]
    calls = stub.calls
    assert client.lab_recipients("agy_a") and stub.calls == calls  # answered from the cache
    now[0] += 601.0
    assert client.recently_used(600) == []  # no longer used: no longer warmed
    client.close()


def test_the_lab_feature_warms_recently_used_agencies_as_their_service_identity():
    from types import SimpleNamespace

    from services.kit.auth import Identity, current_identity
    from services.notifications.lab import LAB_RESULTS, LabResults

    class Directory:
        cache_s = 30.0

        def __init__(self):
            self.warmed: list[tuple[str, str]] = []
            self.used = ["agy_a", "agy_b"]

        def mark_used(self, agency_id):
            self.used.append(agency_id)

        def recently_used(self, within_s):
            return list(dict.fromkeys(self.used))

        def keep_warm(self, agency_id):
            self.warmed.append((agency_id, current_identity.get().agency_id))
            return 2

    class Tokens:
        def identity(self, agency_id):
            return Identity(subject="svc:notifications", agency_id=agency_id, kind="service", token="t")

    directory = Directory()
    components = SimpleNamespace(
        store=SimpleNamespace(db={LAB_RESULTS: None}),
        cipher=None,
        directory=directory,
        service_tokens=Tokens(),
        registrations=SimpleNamespace(facilities={"RIVERBEND": SimpleNamespace(agency_id="agy_c")}),
    )
    feature = LabResults(components)
    assert feature.keep_directory_warm() == 4
    assert directory.warmed == [("agy_a", "agy_a"), ("agy_b", "agy_b")]
    # The worker warms the registered facilities' agencies at once, before any result arrives.
    [(name, run)] = feature.background()
    assert name == "lab-directory-warm"
    stop = threading.Event()
    stop.set()
    directory.warmed.clear()
    run(stop)
    assert directory.warmed == [("agy_a", "agy_a"), ("agy_b", "agy_b"), ("agy_c", "agy_c")]
    components.service_tokens = None  # a build without service identities (tests): nothing to run
    assert feature.background() == []
