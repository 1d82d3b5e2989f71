"""The auditors' HTTP API on the real embedded database with real token checks: who may ask, the
filters, paging, CSV and JSON export, agency scoping, refused operator injection, reads of the trail
recorded, the chain verified on request and the public keys."""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import uuid

import pytest

from clinic.audit.v1 import audit_pb2, security_pb2
from services.audit import config
from services.audit.chain import Entry
from services.audit.http_api import create_app
from services.audit.queries import Queries
from services.audit.service import build
from services.audit.signing import TrustedKeys, load_public_keys
from services.audit.verify import verify_chain
from services.directory import tokens
from services.kit.auth import StaticKeySource, TokenVerifier
from services.kit.events import decode_envelope, unpack

RIVERBEND = "agy_riverbend"
LAKESIDE = "agy_lakeside"
T0 = 1_772_323_200_000  # 2026-03-01T00:00:00Z
DAY = 86_400_000


@functools.cache
def keys() -> tokens.KeySet:
    return tokens.KeySet.from_pem(tokens.generate_private_key_pem())


def bearer(staff_id: str, agency: str, *roles: str) -> dict:
    token = tokens.issue_access_token(
        keys(),
        staff_id=staff_id,
        agency_id=agency,
        roles=["staff", *roles],
        name=staff_id,
        session_id=f"ses_{uuid.uuid4().hex[:8]}",
        ttl_s=12 * 3600,  # minted when the module is collected: it must outlive a long, busy session
    ).token
    return {"Authorization": f"Bearer {token}"}


ADMIN = bearer("stf_riverbend_admin", RIVERBEND, "admin")
OFFICER = bearer("stf_riverbend_ortiz", RIVERBEND, "compliance_officer")
NURSE = bearer("stf_riverbend_kim", RIVERBEND)
OUTSIDER = bearer("stf_lakeside_admin", LAKESIDE, "admin")


@pytest.fixture
def audit(mongo_client, mongo_uri, db_name, tmp_path):
    settings = config.load(
        {
            "MONGO_URI": mongo_uri,
            "MONGO_DB_PREFIX": f"{db_name}_",
            "CLINIC_RUN_DIR": str(tmp_path),
            "AUDIT_PAGE_MAX": "20",
            "AUDIT_CHECKPOINT_EVERY": "5",
        }
    )
    db = mongo_client[settings.mongo_db]
    audit = build(settings, db, features=(Queries,))
    store, checkpointer = audit.components.store, audit.components.checkpointer
    trail = [
        # (agency, actor, action, resource_type, resource_id, patient, day)
        (RIVERBEND, "stf_riverbend_kim", "read", "message", "msg_1", "pat_7", 0),
        (RIVERBEND, "stf_riverbend_kim", "read", "lab_result", "lr_1", "pat_7", 1),
        (RIVERBEND, "stf_riverbend_reyes", "read", "lab_result", "lr_2", "pat_8", 2),
        (RIVERBEND, "stf_riverbend_reyes", "read_thread", "message", "msg_2", "pat_7", 3),
        (RIVERBEND, "stf_riverbend_kim", "read", "message", "=1+1", "", 4),
        (LAKESIDE, "stf_lakeside_ramirez", "read", "lab_result", "lr_9", "pat_7", 2),
    ]
    for n, (agency, actor, action, resource_type, resource_id, patient, day) in enumerate(trail):
        record = store.append(
            Entry(
                event_id=f"evt_{n}",
                event_type="phi.accessed.v1",
                category="phi_access",
                agency_id=agency,
                occurred_at=T0 + day * DAY,
                actor_id=actor,
                actor_kind="staff",
                action=action,
                outcome="allowed",
                resource_type=resource_type,
                resource_id=resource_id,
                patient_id=patient,
                service="inbox",
            )
        )
        checkpointer.after_append([record])
    store.append(
        Entry(
            event_id="evt_sec",
            event_type="security_event.recorded.v1",
            category="security",
            agency_id=RIVERBEND,
            occurred_at=T0 + 5 * DAY,
            action="sign_in_failed",
            outcome="refused",
            reason="bad_password",
            resource_type="staff",
            resource_id="stf_riverbend_kim",
        )
    )
    app = create_app(audit.components, TokenVerifier(StaticKeySource(keys().verification_keys)))
    audit.client = app.test_client()
    audit.db = db
    yield audit
    mongo_client.drop_database(settings.mongo_db)


def get(audit, path: str, headers: dict, **params):
    return audit.client.get(f"/api/v1/audit{path}", headers=headers, query_string=params)


def ids(reply) -> list[str]:
    assert reply.status_code == 200, reply.get_json()
    return [item["resource_id"] for item in reply.get_json()["items"]]


def staged_reads(audit) -> list[audit_pb2.PhiAccessed]:
    found = []
    for doc in audit.db.access_records.find({}):
        for entry in doc["_outbox"].values():
            found.append(unpack(decode_envelope(bytes(entry["env"])), audit_pb2.PhiAccessed))
    return found


def test_admins_and_compliance_officers_read_their_agency_newest_first(audit):
    everything = ["stf_riverbend_kim", "=1+1", "msg_2", "lr_2", "lr_1", "msg_1"]
    assert ids(get(audit, "/records", ADMIN))[:6] == everything
    assert ids(get(audit, "/records", OFFICER))[:6] == everything


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"patient_id": "pat_7"}, ["msg_2", "lr_1", "msg_1"]),  # the other agency's pat_7 read is not shown
        ({"actor": "stf_riverbend_reyes"}, ["msg_2", "lr_2"]),
        ({"action": "read_thread"}, ["msg_2"]),
        ({"resource_type": "lab_result"}, ["lr_2", "lr_1"]),
        ({"action": "sign_in_failed"}, ["stf_riverbend_kim"]),
        ({"category": "security"}, ["stf_riverbend_kim"]),
        ({"from": "2026-03-02", "to": "2026-03-04"}, ["lr_2", "lr_1"]),  # [from, to)
        ({"patient_id": "pat_7", "resource_type": "lab_result", "to": "2026-03-03T00:00:00Z"}, ["lr_1"]),
        ({"patient_id": "pat_nobody"}, []),
    ],
)
def test_filters(audit, params, expected):
    assert ids(get(audit, "/records", OFFICER, **params)) == expected


def test_pages_follow_the_cursor_to_the_end_without_repeats(audit):
    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        reply = get(audit, "/records", ADMIN, **params)
        seen += ids(reply)
        cursor = reply.get_json()["next_cursor"]
        if cursor is None:
            break
    assert seen[:6] == ["stf_riverbend_kim", "=1+1", "msg_2", "lr_2", "lr_1", "msg_1"]
    assert len(seen) == len(set(seen))


def test_an_item_names_actor_resource_time_and_its_place_in_the_chain(audit):
    [item] = get(audit, "/records", ADMIN, resource_type="lab_result", actor="stf_riverbend_kim").get_json()["items"]
    assert {k: item[k] for k in ("actor_id", "action", "resource_type", "resource_id", "patient_id", "chain")} == {
        "actor_id": "stf_riverbend_kim",
        "action": "read",
        "resource_type": "lab_result",
        "resource_id": "lr_1",
        "patient_id": "pat_7",
        "chain": RIVERBEND,
    }
    assert item["occurred_at"] == "2026-03-02T00:00:00.000Z" and item["seq"] == 2
    assert item["id"] == f"{RIVERBEND}:000000000002" and len(item["hash"]) == 64


def test_other_agencies_see_only_their_own_records(audit):
    assert ids(get(audit, "/records", OUTSIDER)) == ["lr_9"]
    assert ids(get(audit, "/records", OUTSIDER, actor="stf_riverbend_kim")) == []
    assert ids(get(audit, "/records", OUTSIDER, patient_id="pat_8")) == []


def test_staff_members_without_an_auditor_role_are_refused_and_the_refusal_is_recorded(audit):
    reply = get(audit, "/records", NURSE, patient_id="pat_7")
    assert reply.status_code == 403 and reply.get_json()["code"] == "auditor_only"
    for path in ("/export", "/verify", "/checkpoints"):
        assert get(audit, path, NURSE).status_code == 403
    [refusal, *_] = list(audit.db.security_outbox.find({}))
    event = unpack(decode_envelope(bytes(next(iter(refusal["_outbox"].values()))["env"])), security_pb2.SecurityEvent)
    assert (event.kind, event.actor_id, event.reason, event.target_type, event.agency_id) == (
        "access_refused",
        "stf_riverbend_kim",
        "auditor_only",
        "audit_trail",
        RIVERBEND,
    )
    assert staged_reads(audit) == []  # nothing was read


def test_no_token_is_401(audit):
    assert audit.client.get("/api/v1/audit/records").status_code == 401


@pytest.mark.parametrize(
    "query_string",
    [
        "agency_id=agy_lakeside",
        "chain=agy_lakeside",
        "patient_id[$ne]=x",
        'patient_id={"$ne":null}',
        "actor[$regex]=.*",
        "actor=%24where",
        "patient_id=pat_7&patient_id=pat_8",
        "from=2026-03-05&to=2026-03-01",
        "limit=21",
        "cursor=zzz",
        "format=xml",
    ],
)
def test_injection_and_malformed_questions_are_refused_with_400(audit, query_string):
    reply = audit.client.get(f"/api/v1/audit/records?{query_string}", headers=ADMIN)
    assert reply.status_code == 400 and reply.get_json()["code"] == "invalid_query"
    assert staged_reads(audit) == []


def test_every_read_of_the_trail_is_itself_recorded(audit):
    get(audit, "/records", OFFICER, patient_id="pat_7")
    get(audit, "/export", ADMIN, format="csv")
    get(audit, "/verify", ADMIN)
    reads = sorted(staged_reads(audit), key=lambda e: e.action)
    assert [(e.action, e.actor_id, e.patient_id) for e in reads] == [
        ("export", "stf_riverbend_admin", ""),
        ("query", "stf_riverbend_ortiz", "pat_7"),
        ("verify", "stf_riverbend_admin", ""),
    ]
    assert {(e.service, e.resource_type, e.resource_id, e.agency_id) for e in reads} == {
        ("audit", "audit_trail", RIVERBEND, RIVERBEND)
    }


def test_csv_page_and_exports(audit):
    reply = get(audit, "/records", ADMIN, format="csv", limit="2")
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(reply.get_data(as_text=True))))
    assert [r["resource_id"] for r in rows] == ["stf_riverbend_kim", "'=1+1"]  # no formula for spreadsheets
    assert reply.headers["X-Next-Cursor"]
    exported = get(audit, "/export", ADMIN, format="csv", patient_id="pat_7")
    assert "attachment" in exported.headers["Content-Disposition"]
    assert [r["resource_id"] for r in csv.DictReader(io.StringIO(exported.get_data(as_text=True)))] == [
        "msg_2",
        "lr_1",
        "msg_1",
    ]
    as_json = get(audit, "/export", OFFICER, actor="stf_riverbend_reyes").get_json()
    assert as_json["agency_id"] == RIVERBEND and [i["resource_id"] for i in as_json["items"]] == ["msg_2", "lr_2"]


def test_verify_on_request_then_after_tampering(audit):
    report = get(audit, "/verify", ADMIN).get_json()
    assert report["intact"] and report["records"] == 6 and report["chain"] == RIVERBEND
    audit.db.audit_records.update_one({"_id": f"{RIVERBEND}:000000000003"}, {"$set": {"patient_id": "pat_1"}})
    report = get(audit, "/verify", OFFICER).get_json()
    assert not report["intact"]
    assert report["broken"]["record_id"] == f"{RIVERBEND}:000000000003"
    assert report["broken"]["problem"] == "fields_differ_from_content"
    # The other agency's chain is not theirs to verify, and it is intact.
    assert get(audit, "/verify", OUTSIDER).get_json()["intact"]


def test_keys_and_checkpoints_let_an_auditor_check_signatures_themselves(audit):
    published = get(audit, "/keys", NURSE).get_json()  # public keys: any staff member
    [key] = published["keys"]
    assert key["kid"] == published["active_key_id"] and key["crv"] == "Ed25519"
    trusted = TrustedKeys(load_public_keys(key["pem"]))
    checkpoints = get(audit, "/checkpoints", ADMIN).get_json()["items"]
    assert [cp["seq"] for cp in checkpoints] == [5]
    records = sorted(audit.db.audit_records.find({"chain": {"$eq": RIVERBEND}}), key=lambda r: r["seq"])
    stored = list(audit.db.audit_checkpoints.find({"chain": {"$eq": RIVERBEND}}))
    assert verify_chain(RIVERBEND, records, stored, trusted).intact
    assert get(audit, "/checkpoints", OUTSIDER).get_json()["items"] == []


def test_records_are_asked_for_by_when_they_were_recorded_as_well_as_when_they_happened(audit):
    # The trail's events happened in March (the producers' clocks); the service recorded them today.
    yesterday = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).date().isoformat()
    everything = ["stf_riverbend_kim", "=1+1", "msg_2", "lr_2", "lr_1", "msg_1"]
    assert ids(get(audit, "/records", ADMIN, recorded_from=yesterday)) == everything
    assert ids(get(audit, "/records", ADMIN, recorded_to="2026-03-10")) == []
    assert ids(get(audit, "/records", ADMIN, to="2026-03-10")) == everything
    both = {"recorded_from": yesterday, "from": "2026-03-02", "to": "2026-03-04"}
    assert ids(get(audit, "/records", ADMIN, **both)) == ["lr_2", "lr_1"]
    seen, cursor = [], None
    while True:
        reply = get(
            audit, "/records", OFFICER, recorded_from=yesterday, limit="4", **({"cursor": cursor} if cursor else {})
        )
        seen += ids(reply)
        cursor = reply.get_json()["next_cursor"]
        if cursor is None:
            break
    assert seen == everything
    bad = get(audit, "/records", ADMIN, recorded_from=yesterday, recorded_to=yesterday)
    assert bad.status_code == 400 and bad.get_json()["details"]["field"] == "recorded_from"


def test_items_carry_the_clock_skew_measured_at_receipt(audit):
    items = get(audit, "/records", ADMIN).get_json()["items"]
    assert {item["clock_skew_ms"] for item in items} == {0}
    rows = list(csv.DictReader(io.StringIO(get(audit, "/records", ADMIN, format="csv").get_data(as_text=True))))
    assert {row["clock_skew_ms"] for row in rows} == {"0"}
