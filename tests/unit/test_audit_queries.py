"""What an auditor may ask (services/audit/query.py), what events become (services/audit/ingest.py)
and how records leave the service (services/audit/export.py): pure logic, no database."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from clinic.audit.v1 import audit_pb2, security_pb2
from clinic.inbox.v1 import inbox_pb2
from services.audit import chain as chains
from services.audit import export, producers, query
from services.audit.ingest import entry_from
from services.audit.store import Filters
from services.kit.bus.signing import KNOWN_PRODUCERS
from services.kit.errors import InvalidInput
from services.kit.events import PermanentError, new_envelope
from services.kit.security_events import KINDS

AGENCY = "agy_riverbend"


def ms(*parts: int) -> int:
    return int(dt.datetime(*parts, tzinfo=dt.UTC).timestamp() * 1000)


def parse(**args):
    return query.parse({k: v if isinstance(v, list) else [v] for k, v in args.items()}, default_limit=50, max_limit=200)


def refused(**args) -> str:
    with pytest.raises(InvalidInput) as caught:
        parse(**args)
    assert caught.value.code == "invalid_query"
    return caught.value.details["field"]


# --- the question --------------------------------------------------------------------------------


def test_filters_times_and_paging_are_read():
    asked = parse(
        patient_id="pat_7",
        actor="stf_riverbend_kim",
        action="read",
        resource_type="message",
        category="phi_access",
        outcome="allowed",
        **{"from": "2026-03-01", "to": "2026-04-01T00:00:00+02:00"},
        limit="20",
        cursor="1772323200000.000000000017",
        format="csv",
    )
    assert asked.filters == Filters(
        patient_id="pat_7",
        actor_id="stf_riverbend_kim",
        action="read",
        resource_type="message",
        category="phi_access",
        outcome="allowed",
        since=ms(2026, 3, 1),
        until=ms(2026, 3, 31, 22),
    )
    assert (asked.limit, asked.cursor, asked.format) == (20, "1772323200000.000000000017", "csv")


def test_defaults_are_the_whole_agency_newest_first_as_json():
    asked = parse()
    assert (asked.filters, asked.limit, asked.cursor, asked.format) == (Filters(), 50, None, "json")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"agency_id": "agy_lakeside"}, "agency_id"),  # the agency is the caller's, never a parameter
        ({"chain": "_system"}, "chain"),
        ({"patient_id[$ne]": "x"}, "patient_id[$ne]"),
        ({"patient_id": '{"$ne": null}'}, "patient_id"),
        ({"actor": "$where"}, "actor"),
        ({"actor": ""}, "actor"),
        ({"patient_id": ["pat_1", "pat_2"]}, "patient_id"),
        ({"category": "everything"}, "category"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-03-01T10:00:00"}, "from"),  # no offset: ambiguous
        ({"from": "2026-02-30"}, "from"),
        ({"from": "2026-03-02", "to": "2026-03-01"}, "from"),
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"cursor": "1' OR 1=1"}, "cursor"),
        ({"format": "xml"}, "format"),
    ],
)
def test_anything_but_known_single_well_formed_parameters_is_refused(args, field):
    assert refused(**args) == field


def test_recorded_time_is_asked_apart_from_occurred_time():
    asked = parse(**{"recorded_from": "2026-12-01", "recorded_to": "2026-12-02T00:00:00Z", "from": "2026-11-01"})
    assert asked.filters == Filters(
        since=ms(2026, 11, 1), recorded_since=ms(2026, 12, 1), recorded_until=ms(2026, 12, 2)
    )
    assert asked.filters.sort_key == "rec_key" and parse(to="2026-12-01").filters.sort_key == "at_key"
    assert refused(recorded_from="2026-12-02", recorded_to="2026-12-01") == "recorded_from"
    assert refused(recorded_to="today") == "recorded_to"
    assert refused(recorded_from=["2026-12-01", "2026-12-02"]) == "recorded_from"


def test_a_recorded_time_question_pages_by_the_recorded_key_and_filters_the_occurred_one():
    filters = Filters(since=1_000_000_000_000, recorded_since=1_100_000_000_000, recorded_until=1_200_000_000_000)
    assert filters.query(AGENCY, before="1150000000000.000000000009") == {
        "chain": {"$eq": AGENCY},
        "at_key": {"$gte": "1000000000000"},
        "rec_key": {"$gte": "1100000000000", "$lt": "1150000000000.000000000009"},
    }


def test_the_mongo_filter_is_always_the_callers_chain_with_explicit_eq():
    filters = Filters(patient_id="pat_7", since=1_000_000_000_000, until=2_000_000_000_000)
    built = filters.query(AGENCY, before="1500000000000.000000000003")
    assert built == {
        "chain": {"$eq": AGENCY},
        "patient_id": {"$eq": "pat_7"},
        "at_key": {"$gte": "1000000000000", "$lt": "1500000000000.000000000003"},
    }
    assert Filters(until=1_400_000_000_000).query(AGENCY, before="1500000000000.000000000003")["at_key"] == {
        "$lt": "1400000000000"
    }


# --- events into entries --------------------------------------------------------------------------


def stamp(ms: int) -> Timestamp:
    value = Timestamp()
    value.FromMilliseconds(ms)
    return value


def test_a_phi_read_becomes_an_entry_of_ids_and_actions():
    payload = audit_pb2.PhiAccessed(
        agency_id=AGENCY,
        actor_id="stf_kim",
        actor_kind="staff",
        resource_type="lab_result",
        resource_id="lr_1",
        action="read",
        outcome="allowed",
        service="notifications",
        patient_id="pat_7",
        accessed_at=stamp(1_772_323_200_123),
    )
    envelope = new_envelope(
        "phi.accessed.v1", payload, agency_id=AGENCY, producer="notifications", correlation_id="corr-1"
    )
    got = entry_from(envelope, received_at=1_772_323_200_123 + 299_000)  # within the allowed clock skew
    assert got == chains.Entry(
        event_id=envelope.event_id,
        event_type="phi.accessed.v1",
        category="phi_access",
        agency_id=AGENCY,
        occurred_at=1_772_323_200_123,
        producer="notifications",
        service="notifications",
        actor_id="stf_kim",
        actor_kind="staff",
        action="read",
        outcome="allowed",
        resource_type="lab_result",
        resource_id="lr_1",
        patient_id="pat_7",
        correlation_id="corr-1",
    )


def test_a_security_event_becomes_an_entry_and_one_of_no_agency_goes_to_the_system_chain():
    payload = security_pb2.SecurityEvent(
        kind="forged_identity_refused",
        actor_kind="anonymous",
        outcome="refused",
        reason="bad_signature",
        target_type="partner",
        source="203.0.113.9",
        service="inbox",
    )
    envelope = new_envelope("security_event.recorded.v1", payload, agency_id="", producer="inbox")
    got = entry_from(envelope)
    assert (got.category, got.action, got.reason, got.source, got.resource_type) == (
        "security",
        "forged_identity_refused",
        "bad_signature",
        "203.0.113.9",
        "partner",
    )
    assert got.chain == chains.SYSTEM_CHAIN
    assert chains.plausible_ms(got.occurred_at)  # no time in the payload: the envelope's


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [
        # the envelope says one agency, the payload another
        (
            new_envelope(
                "phi.accessed.v1",
                audit_pb2.PhiAccessed(agency_id="agy_lakeside", service="inbox"),
                agency_id=AGENCY,
                producer="inbox",
            ),
            "agency_mismatch",
        ),
        # an agency id that could pass for the system chain
        (
            new_envelope(
                "phi.accessed.v1",
                audit_pb2.PhiAccessed(agency_id="_system", service="inbox"),
                agency_id="_system",
                producer="inbox",
            ),
            "agency_id_invalid",
        ),
        # not the payload its type names
        (
            new_envelope(
                "phi.accessed.v1", inbox_pb2.MessageDelivered(agency_id=AGENCY), agency_id=AGENCY, producer="inbox"
            ),
            "payload_malformed",
        ),
        # not an event of the audit stream
        (
            new_envelope(
                "message.delivered.v1", inbox_pb2.MessageDelivered(agency_id=AGENCY), agency_id=AGENCY, producer="inbox"
            ),
            "not_audit_stream_event",
        ),
    ],
)
def test_events_that_cannot_be_recorded_as_they_stand_are_parked(envelope, reason):
    with pytest.raises(PermanentError) as caught:
        entry_from(envelope)
    assert caught.value.reason == reason


# --- who may say what --------------------------------------------------------------------------------


def phi(service: str, producer: str):
    payload = audit_pb2.PhiAccessed(agency_id=AGENCY, actor_id="stf_kim", action="read", service=service)
    return new_envelope("phi.accessed.v1", payload, agency_id=AGENCY, producer=producer)


def security(kind: str, producer: str, service: str | None = None):
    payload = security_pb2.SecurityEvent(
        agency_id=AGENCY, kind=kind, outcome="succeeded", service=producer if service is None else service
    )
    return new_envelope("security_event.recorded.v1", payload, agency_id=AGENCY, producer=producer)


def parked_reason(envelope) -> str:
    with pytest.raises(PermanentError) as caught:
        entry_from(envelope)
    return caught.value.reason


def test_an_event_naming_another_service_than_its_authenticated_producer_is_parked():
    # inbox's key signed it (the bus checked that), but the payload claims the directory read it.
    assert parked_reason(phi("directory", "inbox")) == "service_not_producer"
    assert parked_reason(security("access_refused", "inbox", service="directory")) == "service_not_producer"
    assert entry_from(phi("inbox", "inbox")).service == "inbox"


@pytest.mark.parametrize(
    ("kind", "producer"),
    [
        ("sign_in_succeeded", "inbox"),  # a sign-in that only the directory could have seen
        ("sign_in_failed", "erx-bridge"),
        ("account_locked", "notifications"),
        ("session_revoked", "cloud-comms"),
        ("forged_identity_refused", "erx-bridge"),
        ("forged_identity_refused", "auto-reply"),
    ],
)
def test_a_security_kind_its_producer_may_not_report_is_parked(kind, producer):
    assert parked_reason(security(kind, producer)) == "security_kind_not_allowed"


@pytest.mark.parametrize(
    ("kind", "producer"),
    [
        ("sign_in_succeeded", "directory"),
        ("sign_in_failed", "web"),
        ("forged_identity_refused", "notifications"),
        ("forged_identity_refused", "audit"),
        ("event_refused", "erx-bridge"),
        ("access_refused", "auto-reply"),
        ("settings_changed", "inbox"),
        ("key_rotated", "cloud-comms"),
    ],
)
def test_a_security_kind_its_producer_may_report_is_recorded(kind, producer):
    assert entry_from(security(kind, producer)).action == kind


def test_an_unknown_security_kind_is_parked():
    assert parked_reason(security("admin_granted", "directory")) == "security_kind_unknown"


def test_the_table_names_every_kind_services_record_and_only_known_producers():
    assert set(producers.SECURITY_KINDS) == KINDS
    assert all(allowed <= set(KNOWN_PRODUCERS) and allowed for allowed in producers.SECURITY_KINDS.values())


# --- time ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset_ms", "skew"),
    [
        (0, 0),
        (-300_000, 0),  # exactly the tolerance: not recorded
        (300_000, 0),
        (-300_001, -300_001),  # an hour-old clock, or a delivery delay
        (3_600_000, 3_600_000),  # a clock an hour ahead
    ],
)
def test_an_event_time_far_from_its_receipt_is_recorded_with_its_clock_skew(offset_ms, skew):
    received = 1_796_601_600_000
    payload = audit_pb2.PhiAccessed(agency_id=AGENCY, service="inbox", accessed_at=stamp(received + offset_ms))
    envelope = new_envelope("phi.accessed.v1", payload, agency_id=AGENCY, producer="inbox")
    got = entry_from(envelope, received_at=received, max_skew_ms=300_000)
    assert (got.occurred_at, got.clock_skew_ms) == (received + offset_ms, skew)
    record = chains.new_record(got, 1, chains.GENESIS, received)
    assert json.loads(record["content"])["clock_skew_ms"] == skew  # part of what the hash covers


# --- export -----------------------------------------------------------------------------------------


def test_csv_has_the_api_columns_and_defuses_spreadsheet_formulas():
    record = chains.new_record(
        chains.Entry(
            event_id="e1",
            event_type="phi.accessed.v1",
            category="phi_access",
            agency_id=AGENCY,
            occurred_at=1_772_323_200_000,
            resource_id='=HYPERLINK("http://x")',
            actor_id="-2+3",
            patient_id="pat,7",
        ),
        1,
        chains.GENESIS,
        1_772_323_200_500,
    )
    item = export.item(record)
    assert item["occurred_at"] == "2026-03-01T00:00:00.000Z" and item["id"] == f"{AGENCY}:000000000001"
    rows = list(csv.reader(io.StringIO(export.csv_text([item]))))
    assert rows[0] == list(export.COLUMNS)
    row = dict(zip(rows[0], rows[1], strict=True))
    assert row["resource_id"] == '\'=HYPERLINK("http://x")' and row["actor_id"] == "'-2+3"
    assert row["patient_id"] == "pat,7" and row["hash"] == record["hash"]
