"""Signature requests against the real database: items per signer, answers, outcomes, status, repair."""

from __future__ import annotations

import pytest

from services.inbox import domain
from services.inbox.board import ItemFilter
from services.inbox.signatures import Signatures, check_may_respond, request_status, status_patch
from services.kit.auth import current_identity
from services.kit.errors import Conflict, Forbidden, InvalidInput, NotFound
from services.kit.mongo import now_ms
from tests.integration.inbox_fixtures import staff
from tests.waits import together

AGENCY = "agy_1"
REQUESTER = staff(AGENCY, "stf_req", name="Dr. Ada Req")
KIM = staff(AGENCY, "stf_kim", name="Jordan Kim, RN")
LEE = staff(AGENCY, "stf_lee", name="Morgan Lee")
BYSTANDER = staff(AGENCY, "stf_by", name="Bystander")
OUTSIDER = staff("agy_2", "stf_out", name="Outsider")


@pytest.fixture
def signatures(inbox):
    components, table = inbox
    table.staff.update({s.staff_id: s.agency_id for s in (REQUESTER, KIM, LEE, BYSTANDER, OUTSIDER)})
    feature = Signatures(components)
    feature.ensure_indexes()
    feature.attach()
    return feature


def request(signatures, caller=REQUESTER, signer_ids=("stf_kim", "stf_lee"), **fields):
    body = {"document_kind": "patient", "title": "Treatment plan for J. Roe", "document_ref": "doc-77"}
    body |= fields
    body["signer_ids"] = list(signer_ids)
    token = current_identity.set(caller)
    try:
        return signatures.create(caller, body)
    finally:
        current_identity.reset(token)


def folder_items(components, who) -> list[dict]:
    return components.board.page(who, domain.FOLDER_SIGNATURES, ItemFilter(), None, 100)["items"]


def counts(components, who) -> tuple[int, int]:
    folder = next(f for f in components.board.tree(who)["folders"] if f["id"] == domain.FOLDER_SIGNATURES)
    return folder["unread"], folder["total"]


def test_each_signer_gets_an_unread_item_and_the_requester_a_read_copy(inbox, signatures):
    components, _ = inbox
    made = request(signatures, due_at=now_ms() + 86_400_000)
    assert made["status"] == "pending" and [s["state"] for s in made["signers"]] == ["pending", "pending"]
    for signer in (KIM, LEE):
        [item] = folder_items(components, signer)
        assert item["kind"] == domain.KIND_SIGNATURE_REQUEST and item["read"] is False
        assert item["title"] == "Treatment plan for J. Roe" and item["status"] == "pending"
        assert item["sender"] == {"id": "stf_req", "name": "Dr. Ada Req"} and item["overdue"] is False
        assert counts(components, signer) == (1, 1)
    [copy] = folder_items(components, REQUESTER)
    assert copy["read"] is True and copy["ref_id"] == made["id"]
    assert counts(components, REQUESTER) == (0, 1)
    stored = list(components.store.board_items.find({"request_id": made["id"]}))
    assert len(stored) == 3 and all(len(item["_outbox"]) == 1 for item in stored)
    raw = repr(signatures.requests.find_one({"_id": made["id"]})).encode()
    assert b"J. Roe" not in raw and b"doc-77" not in raw


def test_answers_notify_the_requester_and_move_the_status(inbox, signatures):
    components, _ = inbox
    made = request(signatures)
    signed = signatures.sign(KIM, made["id"], "I attest I reviewed this plan.")
    assert signed["status"] == "partially_signed"
    assert signed["signers"][0]["attestation"] == "I attest I reviewed this plan."
    assert "reason" not in signed["signers"][1] and signed["signers"][1]["state"] == "pending"

    [kims] = folder_items(components, KIM)
    assert kims["read"] is True and kims["status"] == "partially_signed"
    assert counts(components, KIM) == (0, 1)
    outcome = next(i for i in folder_items(components, REQUESTER) if i["kind"] == domain.KIND_SIGNATURE_OUTCOME)
    assert outcome["title"] == "Jordan Kim, RN signed: Treatment plan for J. Roe" and outcome["read"] is False
    assert outcome["status"] == "signed"
    assert counts(components, REQUESTER) == (1, 2)
    [lees] = folder_items(components, LEE)
    assert lees["status"] == "partially_signed" and lees["read"] is False

    declined = signatures.decline(LEE, made["id"], "Wrong medication dose listed.")
    assert declined["status"] == "declined"
    titles = sorted(i["title"] for i in folder_items(components, REQUESTER))
    assert "Morgan Lee declined: Treatment plan for J. Roe" in titles
    assert counts(components, REQUESTER) == (2, 3)
    for who in (REQUESTER, KIM, LEE):
        request_item = next(i for i in folder_items(components, who) if i["kind"] == domain.KIND_SIGNATURE_REQUEST)
        assert request_item["status"] == "declined" and "resolved_at" in request_item

    # The requester sees every note; a signer only their own.
    full = signatures.read(REQUESTER, made["id"])
    assert full["signers"][1]["reason"] == "Wrong medication dose listed." and full["document_ref"] == "doc-77"
    kim_view = signatures.read(KIM, made["id"])
    assert "attestation" in kim_view["signers"][0] and "reason" not in kim_view["signers"][1]


def test_all_signed_is_complete(inbox, signatures):
    made = request(signatures)
    signatures.sign(KIM, made["id"], "ok")
    assert signatures.sign(LEE, made["id"], "ok too")["status"] == "complete"
    assert [r["status"] for r in signatures.page(REQUESTER, None, 10)["requests"]] == ["complete"]


def test_answering_twice_or_after_a_decline_conflicts(inbox, signatures):
    made = request(signatures)
    signatures.sign(KIM, made["id"], "ok")
    with pytest.raises(Conflict) as twice:
        signatures.decline(KIM, made["id"], "changed my mind")
    assert twice.value.code == "already_responded"
    signatures.decline(LEE, made["id"], "no")
    other = request(signatures)
    signatures.decline(KIM, other["id"], "no")
    with pytest.raises(Conflict) as closed:
        signatures.sign(LEE, other["id"], "late")
    assert closed.value.code == "request_closed"


def test_only_named_signers_may_answer_and_only_participants_read(inbox, signatures):
    components, _ = inbox
    made = request(signatures)
    for stranger in (BYSTANDER, OUTSIDER, REQUESTER):
        with pytest.raises(NotFound) as refused:
            signatures.sign(stranger, made["id"], "sure")
        assert refused.value.code == "signature_request_not_found"
    for stranger in (BYSTANDER, OUTSIDER):
        with pytest.raises(NotFound):
            signatures.read(stranger, made["id"])
    assert components.store.access_denials.count_documents({"resource_id": made["id"]}) == 5
    assert signatures.read(LEE, made["id"])["status"] == "pending"
    assert request_status(signatures.requests.find_one({"_id": made["id"]})["signers"]) == "pending"


def test_unknown_or_foreign_signers_are_refused_and_nothing_written(inbox, signatures):
    for signer_ids in (("stf_kim", "stf_nobody"), ("stf_out",)):
        with pytest.raises(InvalidInput) as refused:
            request(signatures, signer_ids=signer_ids)
        assert refused.value.code == "unknown_recipients"
    with pytest.raises(InvalidInput) as empty:
        request(signatures, signer_ids=())
    assert empty.value.code == "no_recipients"
    with pytest.raises(InvalidInput) as past:
        request(signatures, due_at=now_ms() - 1)
    assert past.value.code == "invalid_time"
    assert signatures.requests.find_one({}) is None
    assert inbox[0].store.board_items.find_one({}) is None


def test_composing_needs_the_permission(inbox, signatures):
    with pytest.raises(Forbidden):
        request(signatures, caller=staff(AGENCY, "stf_req", "patient_liaison"))


def test_concurrent_answers_are_both_kept(inbox, signatures):
    components, _ = inbox
    made = request(signatures)
    # Both answers end, and neither raises.
    together(*(lambda s=s: signatures.sign(s, made["id"], f"signed by {s.staff_id}") for s in (KIM, LEE)))
    doc = signatures.requests.find_one({"_id": made["id"]})
    assert doc["version"] == 3 and request_status(doc["signers"]) == "complete"
    outcomes = [i for i in folder_items(components, REQUESTER) if i["kind"] == domain.KIND_SIGNATURE_OUTCOME]
    assert len(outcomes) == 2
    for who in (REQUESTER, KIM, LEE):
        request_item = next(i for i in folder_items(components, who) if i["kind"] == domain.KIND_SIGNATURE_REQUEST)
        assert request_item["status"] == "complete"


def test_an_interrupted_change_is_finished_by_the_repair_pass(inbox, signatures):
    components, _ = inbox
    signatures.sync = lambda doc: None  # the process stops right after the request write
    made = request(signatures)
    assert folder_items(components, KIM) == []
    del signatures.sync
    assert signatures.repair_pending(now_ms() - 60_000) == 0  # too recent: the writer may still be at it
    assert signatures.repair_pending(now_ms() + 1) == 1
    assert [i["ref_id"] for i in folder_items(components, KIM)] == [made["id"]]
    assert "sync_pending_at" not in signatures.requests.find_one({"_id": made["id"]})
    assert signatures.repair_pending(now_ms() + 1) == 0


def test_a_deleted_request_item_stays_deleted(inbox, signatures):
    components, _ = inbox
    made = request(signatures)
    [lees] = folder_items(components, LEE)
    components.board.delete(LEE, lees["id"])
    signatures.sign(KIM, made["id"], "ok")
    assert folder_items(components, LEE) == []
    assert counts(components, LEE) == (0, 0)


def test_an_outcome_the_requester_deleted_stays_deleted_when_another_signer_answers(inbox, signatures):
    components, _ = inbox
    made = request(signatures)
    signatures.sign(KIM, made["id"], "Reviewed.")
    [outcome] = [i for i in folder_items(components, REQUESTER) if i["kind"] == domain.KIND_SIGNATURE_OUTCOME]
    components.board.delete(REQUESTER, outcome["id"])
    signatures.decline(LEE, made["id"], "Wrong patient.")
    outcomes = [i for i in folder_items(components, REQUESTER) if i["kind"] == domain.KIND_SIGNATURE_OUTCOME]
    assert [o["title"] for o in outcomes] == ["Morgan Lee declined: Treatment plan for J. Roe"]


def test_a_declined_request_leaves_the_other_signers_unread_counts(inbox, signatures):
    components, _ = inbox
    made = request(signatures)
    assert counts(components, KIM) == (1, 1)
    signatures.decline(LEE, made["id"], "Not my patient.")
    [kims] = folder_items(components, KIM)
    assert kims["status"] == "declined" and kims["read"] is True
    assert counts(components, KIM) == (0, 1)
    with pytest.raises(Conflict):
        signatures.sign(KIM, made["id"], "Too late.")


def test_the_reading_pane_of_both_kinds_is_audited(inbox, signatures):
    components, _ = inbox
    made = request(signatures)
    signatures.sign(KIM, made["id"], "ok")
    [kims] = folder_items(components, KIM)
    opened = components.board.open_item(KIM, kims["id"])
    assert opened["signature_request"]["id"] == made["id"]
    outcome = next(i for i in folder_items(components, REQUESTER) if i["kind"] == domain.KIND_SIGNATURE_OUTCOME)
    opened = components.board.open_item(REQUESTER, outcome["id"])
    assert opened["signature_request"]["signers"][0]["attestation"] == "ok" and opened["read"] is True
    reads = list(components.store.access_denials.find({"resource_id": made["id"], "action": "read"}))
    assert {r["actor_id"] for r in reads} == {"stf_kim", "stf_req"}


def test_my_requests_page_newest_first(inbox, signatures):
    first = request(signatures, title="First")
    second = request(signatures, title="Second")
    request(signatures, caller=KIM, signer_ids=("stf_lee",), title="Kim's own")
    page = signatures.page(REQUESTER, None, 1)
    assert [r["id"] for r in page["requests"]] == [second["id"]]
    rest = signatures.page(REQUESTER, page["next_cursor"], 5)
    assert [r["id"] for r in rest["requests"]] == [first["id"]] and rest["next_cursor"] is None


# --- pure rules -------------------------------------------------------------------------------------------


def test_status_rules():
    def signers(*outcomes):
        return {f"s{n}": {"responded_at": 1 if o else 0, "outcome": o} for n, o in enumerate(outcomes)}

    assert request_status(signers("", "")) == "pending"
    assert request_status(signers("signed", "")) == "partially_signed"
    assert request_status(signers("signed", "signed")) == "complete"
    assert request_status(signers("signed", "declined", "")) == "declined"
    assert request_status(signers("declined")) == "declined"
    with pytest.raises(Conflict):
        check_may_respond(signers("signed", ""), "s0")
    with pytest.raises(Conflict):
        check_may_respond(signers("declined", ""), "s1")
    check_may_respond(signers("signed", ""), "s1")


def test_an_older_version_never_overwrites_a_newer_status():
    item = {"kind": domain.KIND_SIGNATURE_REQUEST, "owner_id": "s1", "request_version": 3, "status": "complete"}
    older = {"version": 2, "signers": {"s1": {"responded_at": 0, "outcome": ""}}}
    assert status_patch(item, older, 10) is None
    newer = {"version": 4, "signers": {"s1": {"responded_at": 5, "outcome": "declined"}}}
    patch = status_patch(item, newer, 10)
    assert patch["status"] == "declined" and patch["resolved_at"] == 10 and patch["my_response"] == "declined"
    assert patch["read_at"] == 10 and patch["unread_board"] is None


def outcome_titles(components) -> list[str]:
    items = folder_items(components, REQUESTER)
    return sorted(i["title"] for i in items if i["kind"] == domain.KIND_SIGNATURE_OUTCOME)


def test_an_answer_interrupted_before_its_outcome_is_not_lost_when_another_signer_answers(inbox, signatures):
    components, _ = inbox
    made = request(signatures, signer_ids=("stf_kim", "stf_lee", "stf_by"))
    signatures.sync = lambda doc: None  # the process stops right after Kim's answer
    signatures.sign(KIM, made["id"], "ok")
    del signatures.sync
    signatures.sign(LEE, made["id"], "ok")
    signatures.repair_pending(now_ms() + 1)
    assert outcome_titles(components) == [
        "Jordan Kim, RN signed: Treatment plan for J. Roe",
        "Morgan Lee signed: Treatment plan for J. Roe",
    ]


def test_the_repair_pass_does_not_bring_back_an_outcome_the_requester_deleted(inbox, signatures):
    components, _ = inbox
    made = request(signatures, signer_ids=("stf_kim", "stf_lee", "stf_by"))
    signatures.sign(KIM, made["id"], "ok")
    [outcome] = [i for i in folder_items(components, REQUESTER) if i["kind"] == domain.KIND_SIGNATURE_OUTCOME]
    components.board.delete(REQUESTER, outcome["id"])
    signatures.sync = lambda doc: None  # the process stops right after Lee's answer
    signatures.sign(LEE, made["id"], "ok")
    del signatures.sync
    assert signatures.repair_pending(now_ms() + 1) == 1
    assert outcome_titles(components) == ["Morgan Lee signed: Treatment plan for J. Roe"]
