"""Search across a board against the real database: postings written when items land (sends,
deliveries), repeats writing nothing twice, terms ANDed, the filters applied to items as they are
now, nobody else's items, the cap and the cursor, and the route's refusals."""

from __future__ import annotations

import base64
import json
import os
import uuid

import pytest

from clinic.inbox.v1 import inbox_pb2
from services.inbox import config, domain, search
from services.inbox.announcements import Announcements
from services.inbox.board import ItemFilter
from services.inbox.delivery import Delivery
from services.inbox.http_api import build_app
from services.inbox.search import Query, Search
from services.inbox.service import build
from services.kit.auth import Identity, current_identity
from services.kit.crypto import DecryptionError, KeyRing, PhiCipher
from services.kit.errors import InvalidInput, NotFound
from services.kit.mongo import now_ms
from tests.integration.inbox_fixtures import AMQP, AgencyTable, staff

AGENCY, OTHER = "agy_1", "agy_2"
DAY = 86_400_000


@pytest.fixture
def place(inbox):
    """(components, search feature) with staff a, b, c in AGENCY and x elsewhere; delivery attached."""
    components, table = inbox
    table.staff.update({"stf_a": AGENCY, "stf_b": AGENCY, "stf_c": AGENCY, "stf_x": OTHER})
    delivery = Delivery(components)
    finder = Search(components)
    components.features = [delivery, finder]
    for feature in components.features:
        feature.ensure_indexes()
        feature.attach()
    return components, finder


def send(components, sender: Identity, *to, subject="Hello", body="Body", priority="normal"):
    token = current_identity.set(sender)
    try:
        draft = domain.Draft(domain.Addressing(staff_ids=tuple(to)), subject, body, priority)
        return components.mailbox.send(sender, draft)
    finally:
        current_identity.reset(token)


def find(finder: Search, who: Identity, q: str = "", cursor=None, limit=20, **filters) -> dict:
    finder.index.run_pending()
    return finder.search(who, Query(words=tuple(search.words(q)), **filters), cursor, limit)


def titles(answer: dict) -> list[str]:
    return [item["title"] for item in answer["items"]]


def notice(components, owner: str, title: str, at_ms: int, *, unread=True, urgent=False, agency=AGENCY) -> dict:
    """A delivered item put straight on a board (its time chosen), as a producer's would land."""
    ref = f"ntc_{uuid.uuid4().hex}"
    item = domain.new_item(
        agency_id=agency,
        owner_id=owner,
        folder=domain.FOLDER_LAB,
        kind=domain.KIND_NOTICE,
        ref_id=ref,
        at_ms=at_ms,
        unread=unread,
        urgent=urgent,
        title=components.cipher.seal(agency, ref, "title", title),
    )
    components.store.insert_board_items([item])
    return item


def test_a_sent_message_is_found_by_a_word_of_its_body_as_the_board_lists_it(place):
    components, finder = place
    a, b = staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b")
    sent = send(components, a, "stf_b", subject="Pump check", body="Please verify the insulin dose tomorrow.")
    send(components, a, "stf_b", subject="Lunch", body="Pizza at noon")
    assert finder.index.pending() >= 1  # indexed off the request path
    answer = find(finder, b, "INSULIN")
    listed = components.board.page(b, "messages", ItemFilter(), None, 20)["items"]
    assert answer["items"] == [item for item in listed if item["message_id"] == sent.message_id]
    assert answer["next_cursor"] is None and answer["capped"] is False
    # The sender finds their Sent copy; words match whole, accents and case aside.
    assert [i["folder"] for i in find(finder, a, "insulin")["items"]] == ["sent"]
    assert find(finder, b, "insul")["items"] == []
    assert finder.index.pending() == 0


def test_no_plain_word_is_stored_in_postings_or_jobs(place):
    components, finder = place
    a = staff(AGENCY, "stf_a")
    send(components, a, "stf_b", subject="Zyprexa review", body="Mrs Lopez asked about olanzapine")
    raw = json.dumps(list(components.store.db[search.JOBS].find({}, {"_id": 0})), default=str).lower()
    finder.index.run_pending()
    raw += json.dumps(list(components.store.db[search.POSTINGS].find({})), default=str).lower()
    for word in ("zyprexa", "lopez", "olanzapine", "review"):
        assert word not in raw


def deliver_as_notifications(components, request: inbox_pb2.DeliverItemRequest) -> None:
    """The delivery feature's call as the notifications service makes it."""
    token = current_identity.set(Identity(subject="svc:notifications", agency_id=AGENCY, kind="service"))
    try:
        components.features[0].deliver(AGENCY, "notifications", request, None)
    finally:
        current_identity.reset(token)


def test_a_delivered_lab_result_is_found_by_its_title_and_summary(place):
    components, finder = place
    request = inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB,
        recipients=inbox_pb2.Recipients(staff_ids=["stf_a"]),
        title="Lab result: Hemoglobin A1c (final)",
        summary="Patient MRN00417: 1 abnormal",
        status="final",
        source="lab",
        source_ref="order-417",
    )
    deliver_as_notifications(components, request)
    a = staff(AGENCY, "stf_a")
    assert titles(find(finder, a, "hemoglobin")) == ["Lab result: Hemoglobin A1c (final)"]
    assert titles(find(finder, a, "mrn00417 abnormal")) == ["Lab result: Hemoglobin A1c (final)"]
    assert find(finder, a, "hemoglobin", kind=domain.KIND_MESSAGE)["items"] == []


def test_a_delivered_item_s_patient_is_a_patient_term_sealed_on_every_copy(place):
    components, finder = place
    request = inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB,
        recipients=inbox_pb2.Recipients(staff_ids=["stf_a", "stf_b"]),
        title="Lab result: Potassium (final)",
        summary="Patient MRN00418: 1 critical",
        patient_name="OKAFOR, ADAEZE",
        source="lab",
        source_ref="order-418",
    )
    deliver_as_notifications(components, request)
    raw = json.dumps(list(components.store.db["board_items"].find({})), default=str).lower()
    raw += json.dumps(list(components.store.db["notices"].find({})), default=str).lower()
    assert "okafor" not in raw and "adaeze" not in raw  # sealed at rest
    for owner in ("stf_a", "stf_b"):
        who = staff(AGENCY, owner)
        assert titles(find(finder, who, patient="Adaeze Okafor")) == ["Lab result: Potassium (final)"]
    a = staff(AGENCY, "stf_a")
    assert find(finder, a, "okafor")["items"] == []  # a name is not a word of the text
    assert find(finder, staff(AGENCY, "stf_c"), patient="okafor")["items"] == []  # not on their board


def post(feature: Announcements, title: str, body: str, agency=AGENCY, **options) -> dict:
    author = staff(agency, "stf_admin", "staff", "admin", name="Alex Admin")
    token = current_identity.set(author)
    try:
        return feature.post(author, title, body, **options)
    finally:
        current_identity.reset(token)


def test_active_announcements_are_found_on_the_first_page_only(place):
    components, finder = place
    board = Announcements(components)
    components.features.append(board)
    board.ensure_indexes()
    board.attach()
    a = staff(AGENCY, "stf_a")
    flu = post(board, "Flu clinic Saturday", "Vaccines in room 4 from nine")
    post(board, "Parking", "The north lot is closed", agency=OTHER)
    send(components, staff(AGENCY, "stf_b"), "stf_a", subject="Vaccines", body="Ask about the flu clinic")
    found = find(finder, a, "flu vaccines")
    assert [i["id"] for i in found["announcements"]] == [flu["id"]]
    assert found["announcements"][0]["folder"] == domain.FOLDER_ANNOUNCEMENTS and not found["announcements"][0]["read"]
    assert titles(found) == ["Vaccines"]  # board items as ever, announcements beside them
    assert find(finder, a, "flu", kind="announcement") == {**find(finder, a, "flu", kind="announcement"), "items": []}
    assert find(finder, a, "flu", kind=domain.KIND_MESSAGE)["announcements"] == []
    assert find(finder, a, "flu", cursor=search.encode_cursor("9999999999999."))["announcements"] == []
    assert find(finder, a, "flu", urgent=True)["announcements"] == []
    assert find(finder, a, "flu", sender_id="stf_admin")["announcements"][0]["id"] == flu["id"]
    assert find(finder, a, "flu", until_ms=1)["announcements"] == []
    assert find(finder, a, "north")["announcements"] == []  # another agency's
    assert find(finder, staff(OTHER, "stf_x"), "parking")["announcements"][0]["title"] == "Parking"
    raw = json.dumps(list(components.store.db[search.POSTINGS].find({})), default=str).lower()
    assert "vaccines" not in raw and "parking" not in raw
    # Read: still found, not with unread; edited: found by its new words; expired: not found.
    token = current_identity.set(a)
    try:
        board.read(a, flu["id"])
    finally:
        current_identity.reset(token)
    assert find(finder, a, "flu")["announcements"] and not find(finder, a, "flu", unread=True)["announcements"]
    admin = staff(AGENCY, "stf_admin", "staff", "admin")
    board.edit(admin, flu["id"], {"body": "Vaccines in the atrium"})
    assert find(finder, a, "atrium")["announcements"][0]["id"] == flu["id"]
    board.expire(admin, flu["id"])
    assert find(finder, a, "atrium")["announcements"] == []


def test_a_repeated_insert_writes_nothing_twice(place):
    components, finder = place
    a = staff(AGENCY, "stf_a")
    sent = send(components, a, "stf_b", "stf_c", subject="Intake", body="New client intake form")
    finder.index.run_pending()
    postings = components.store.db[search.POSTINGS]
    before = sorted(postings.find({}), key=lambda d: d["_id"])
    items = [components.store.item(domain.board_item_id(sent.message_id, s, "messages")) for s in ("stf_b", "stf_c")]
    components.store.insert_board_items(items)  # a repeated fan-out (a repair, a retried send)
    components.store.insert_board_items(items)
    assert finder.index.pending() == 1  # one job, however often the same items are inserted
    finder.index.run_pending()
    assert sorted(postings.find({}), key=lambda d: d["_id"]) == before
    assert len(find(finder, staff(AGENCY, "stf_b"), "intake")["items"]) == 1


def test_words_are_anded_and_sender_narrows(place):
    components, finder = place
    a, b, c = staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b"), staff(AGENCY, "stf_c")
    send(components, a, "stf_b", subject="Insulin pump", body="settings")
    send(components, a, "stf_b", subject="Insulin pen", body="refill")
    send(components, c, "stf_b", subject="Pump room", body="booked")
    assert titles(find(finder, b, "insulin pump")) == ["Insulin pump"]
    assert titles(find(finder, b, "insulin")) == ["Insulin pen", "Insulin pump"]
    assert titles(find(finder, b, "pump", sender_id="stf_c")) == ["Pump room"]
    assert titles(find(finder, b, sender_id="stf_a")) == ["Insulin pen", "Insulin pump"]
    assert find(finder, b, "insulin", sender_id="stf_c")["items"] == []


def board_postings(components, owner: str) -> dict[str, set[str]]:
    """Posting document id -> the item ids it holds, of one board."""
    prefix = f"{AGENCY}|{owner}|"
    docs = components.store.db[search.POSTINGS].find({"pk": {"$gte": prefix, "$lt": prefix + "\uffff"}})
    return {d["_id"]: {k[2:] for k in d if k.startswith(search.ENTRY)} for d in docs}


def test_postings_of_items_gone_are_removed_by_the_searches_that_meet_them_and_by_prune(place):
    components, finder = place
    a, b = staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b")
    sent = [
        send(components, a, "stf_b", subject=f"Clozapine {n}", body=f"Level {n} due") for n in ("one", "two", "three")
    ]
    items = [domain.board_item_id(m.message_id, "stf_b", "messages") for m in sent]
    finder.index.run_pending()
    components.store.delete_item(items[0], "stf_b")  # deleted for good
    components.store.board_items.update_one({"_id": items[1]}, {"$set": {"content_deleted_at": now_ms()}})
    assert titles(find(finder, b, "clozapine")) == ["Clozapine three"]
    # The search that met them removed them from the term it read (the driver), nowhere else yet.
    (key,) = finder.index.tokens(AGENCY, ["clozapine"])
    held = board_postings(components, "stf_b")
    assert set().union(*(ids for doc, ids in held.items() if f"|{key}|" in doc)) == {items[2]}
    assert {items[0], items[1]} <= set().union(*held.values())  # "level", "due", "one"... still
    report = finder.index.prune(AGENCY, lambda line: None, now=now_ms() + 8 * DAY)
    assert report["boards"] >= 2 and report["postings_removed"] > 0 and report["documents_deleted"] > 0
    held = board_postings(components, "stf_b")
    assert set().union(*held.values()) == {items[2]}
    assert all(held.values())  # no document left empty in a bucket that old
    assert titles(find(finder, b, "level three")) == ["Clozapine three"]
    assert find(finder, b, "level one")["items"] == []
    # A recent bucket keeps its emptied documents (a new item may be posted to them at any moment).
    c = staff(AGENCY, "stf_c")
    gone = send(components, a, "stf_c", subject="Lithium", body="Level")
    finder.index.run_pending()
    components.store.delete_item(domain.board_item_id(gone.message_id, "stf_c", "messages"), "stf_c")
    report = finder.index.prune(AGENCY, lambda line: None)
    assert report["documents_deleted"] == 0 and report["postings_removed"] > 0
    assert not any(board_postings(components, "stf_c").values())
    assert find(finder, c, "lithium")["items"] == []


def test_a_patient_is_matched_by_name_or_id_never_by_words_of_a_text(place):
    components, finder = place
    a, b = staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b")
    about = send(components, a, "stf_b", subject="Refill", body="Needs a refill")
    mention = send(components, a, "stf_b", subject="Smith", body="Dr Smith called")
    # The message is about a patient (as a portal message, or a reply to one, is).
    sealed = components.cipher.seal(AGENCY, about.message_id, "patient_name", "Ana Smith")
    components.store.messages.update_one(
        {"_id": about.message_id}, {"$set": {"patient_id": "pat_ana", "patient_name": sealed}}
    )
    assert titles(find(finder, b, patient="smith")) == ["Refill"]
    assert titles(find(finder, b, patient="Ana  SMITH")) == ["Refill"]
    assert titles(find(finder, b, patient="pat_ana")) == ["Refill"]
    assert titles(find(finder, b, "refill", patient="Smith")) == ["Refill"]
    assert titles(find(finder, b, "smith")) == ["Smith"]
    assert mention.message_id != about.message_id
    assert find(finder, b, patient="Jones")["items"] == []


def test_live_filters_kind_urgent_unread_label_and_dates(place):
    components, finder = place
    b = staff(AGENCY, "stf_b")
    now = now_ms()
    old = notice(components, "stf_b", "Flu shot clinic", now - 10 * DAY, unread=False)
    notice(components, "stf_b", "Flu outbreak", now - 2 * DAY, urgent=True)
    send(components, staff(AGENCY, "stf_a"), "stf_b", subject="Flu season", body="staffing")
    assert titles(find(finder, b, "flu")) == ["Flu season", "Flu outbreak", "Flu shot clinic"]
    assert titles(find(finder, b, "flu", kind=domain.KIND_NOTICE)) == ["Flu outbreak", "Flu shot clinic"]
    assert titles(find(finder, b, "flu", urgent=True)) == ["Flu outbreak"]
    assert titles(find(finder, b, "flu", unread=True)) == ["Flu season", "Flu outbreak"]
    assert titles(find(finder, b, "flu", since_ms=now - 3 * DAY, until_ms=now - DAY)) == ["Flu outbreak"]
    assert titles(find(finder, b, "flu", until_ms=now - 5 * DAY)) == ["Flu shot clinic"]
    label = components.board.create_label(b, "Seasonal")
    components.board.add_label(b, old["_id"], label["id"], None)
    assert titles(find(finder, b, "flu", label_id=label["id"])) == ["Flu shot clinic"]
    # The state is the item's as it is now: marked unread, the unread filter takes it.
    components.board.set_read(b, old["_id"], read=False)
    assert "Flu shot clinic" in titles(find(finder, b, "flu", unread=True))
    with pytest.raises(NotFound):  # someone else's label
        find(finder, staff(AGENCY, "stf_a"), "flu", label_id=label["id"])


def test_deleted_recalled_and_retention_stubbed_items_are_not_returned(place):
    components, finder = place
    a, b = staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b")
    deleted = send(components, a, "stf_b", subject="Gone one", body="vaccine")
    recalled = send(components, a, "stf_b", subject="Gone two", body="vaccine")
    stubbed = send(components, a, "stf_b", subject="Gone three", body="vaccine")
    kept = send(components, a, "stf_b", subject="Kept", body="vaccine")
    finder.index.run_pending()  # indexed first: the postings stay behind
    components.board.delete(b, domain.board_item_id(deleted.message_id, "stf_b", "messages"))
    store = components.store
    assert store.recall_item(store.item(domain.board_item_id(recalled.message_id, "stf_b", "messages"))) == "recalled"
    store.board_items.update_one(
        {"_id": domain.board_item_id(stubbed.message_id, "stf_b", "messages")}, {"$set": {"content_deleted_at": 1}}
    )
    assert titles(find(finder, b, "vaccine")) == ["Kept"]
    assert kept.message_id


def test_another_owners_or_agencys_items_are_never_returned(place):
    components, finder = place
    a, b, c = staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b"), staff(AGENCY, "stf_c")
    send(components, a, "stf_c", subject="Private", body="clozapine titration")
    notice(components, "stf_x", "clozapine level", now_ms(), agency=OTHER)
    assert find(finder, b, "clozapine")["items"] == []
    assert len(find(finder, c, "clozapine")["items"]) == 1
    assert titles(find(finder, staff(OTHER, "stf_x"), "clozapine")) == ["clozapine level"]
    # The same word is another token in another agency.
    mine = finder.index.tokens(AGENCY, ["clozapine"])
    theirs = finder.index.tokens(OTHER, ["clozapine"])
    assert mine != theirs


def test_pages_follow_the_cursor_and_a_capped_scan_says_so(place, monkeypatch):
    components, finder = place
    b = staff(AGENCY, "stf_b")
    now = now_ms()
    # 45 items over ten days, newest unread only for the last 5.
    for n in range(45):
        notice(components, "stf_b", f"Audit {n}", now - n * 5 * 3_600_000, unread=n < 5)
    first = find(finder, b, "audit")
    assert titles(first) == [f"Audit {n}" for n in range(20)] and first["next_cursor"]
    second = find(finder, b, "audit", cursor=first["next_cursor"])
    third = find(finder, b, "audit", cursor=second["next_cursor"])
    assert titles(second) == [f"Audit {n}" for n in range(20, 40)]
    assert titles(third) == [f"Audit {n}" for n in range(40, 45)] and third["next_cursor"] is None
    # A sparse filter stops at the cap and hands back where it stopped.
    monkeypatch.setattr(search, "MAX_EXAMINED", 10)
    unread_first = find(finder, b, "audit", unread=True, limit=3)
    assert titles(unread_first) == ["Audit 0", "Audit 1", "Audit 2"] and not unread_first["capped"]
    rest = find(finder, b, "audit", unread=True, limit=3, cursor=unread_first["next_cursor"])
    assert titles(rest) == ["Audit 3", "Audit 4"] and rest["capped"] and rest["next_cursor"]
    seen = titles(rest)
    cursor = rest["next_cursor"]
    while cursor:
        page = find(finder, b, "audit", unread=True, limit=3, cursor=cursor)
        seen += titles(page)
        cursor = page["next_cursor"]
    assert seen == ["Audit 3", "Audit 4"]


def test_a_search_is_audited_as_a_listing_without_its_words(place):
    components, finder = place
    b = staff(AGENCY, "stf_b")
    send(components, staff(AGENCY, "stf_a"), "stf_b", subject="Olanzapine", body="dose")
    find(finder, b, "olanzapine")
    records = list(components.store.access_denials.find({"resource_type": "board_search"}))
    assert len(records) == 1 and records[0]["shown"] == 1
    assert "olanzapine" not in json.dumps(records, default=str).lower()


def test_a_search_needs_words_a_sender_or_a_patient(place):
    _, finder = place
    with pytest.raises(InvalidInput) as refused:
        finder.search(staff(AGENCY, "stf_b"), Query(unread=True), None, 20)
    assert refused.value.code == "missing_search_terms"
    with pytest.raises(InvalidInput) as refused:
        finder.search(staff(AGENCY, "stf_b"), Query(words=tuple(f"w{n}" for n in range(9))), None, 20)
    assert refused.value.code == "too_many_terms"


def test_the_route_refuses_bad_parameters_with_stable_codes(place):
    components, finder = place
    send(components, staff(AGENCY, "stf_a"), "stf_b", subject="Route", body="lithium level")
    finder.index.run_pending()
    app = build_app(components, None)
    b = staff(AGENCY, "stf_b")
    cases = {
        "q=lithium&bogus=1": "invalid_query",
        "q=lithium&q=level": "invalid_query",
        "q[$gt]=": "invalid_query",
        "q=" + "x" * 201: "too_long",
        'q=lithium&sender_id={"$gt": ""}': "invalid_query",
        "q=lithium&kind=nope": "invalid_query",
        "q=lithium&unread=maybe": "invalid_query",
        "q=lithium&limit=500": "invalid_query",
        "q=lithium&from=yesterday": "invalid_time",
        "q=lithium&from=2026-02-02&to=2026-01-01": "invalid_query",
        "q=lithium&cursor=%%%": "invalid_cursor",
        "q=the": "missing_search_terms",
        "unread=true": "missing_search_terms",
    }
    token = current_identity.set(b)
    try:
        for query, code in cases.items():
            with app.test_request_context(f"/api/v1/board/search?{query}"):
                with pytest.raises(InvalidInput) as refused:
                    search.query_from_request()
                    finder.search(b, *search.query_from_request())
                assert refused.value.code == code, query
    finally:
        current_identity.reset(token)
    with app.test_request_context("/api/v1/board/search?q=Lithium&unread=true&from=2020-01-01"):
        query, cursor, limit = search.query_from_request()
    assert query.words == ("lithium",) and query.unread and cursor is None and limit == 20
    assert titles(finder.search(b, query, cursor, limit)) == ["Route"]


def test_the_search_key_is_one_per_agency_and_outlives_key_rotations(mongo_client, db_name):
    db = mongo_client[db_name]
    m1, m2 = os.urandom(32), os.urandom(32)
    ring = KeyRing(db, {"m1": m1}, "m1")
    key = ring.search_key(AGENCY)
    assert KeyRing(db, {"m1": m1}, "m1").search_key(AGENCY) == key  # another process: the stored one
    assert ring.search_key(OTHER) != key
    ring.rotate(AGENCY)  # a new data key: tokens stay valid
    assert KeyRing(db, {"m1": m1}, "m1").search_key(AGENCY) == key
    assert KeyRing(db, {"m1": m1, "m2": m2}, "m2").rewrap_all() >= 2  # data and search keys
    assert KeyRing(db, {"m2": m2}, "m2").search_key(AGENCY) == key
    stored = db["phi_search_keys"].find_one({"_id": f"{AGENCY}:search"})
    assert stored["master_key_id"] == "m2" and key not in bytes(stored["wrapped"])
    # Never usable as a data key: a ciphertext naming it does not open.
    with pytest.raises(DecryptionError):
        PhiCipher(ring).open(
            AGENCY, "r", "f", bytes([1, len(f"{AGENCY}:search")]) + f"{AGENCY}:search".encode() + bytes(40)
        )


def test_reindex_indexes_items_from_before_search(mongo_client, db_name, mongo_uri, monkeypatch, capsys):
    """Items written while search was not there are found after `python -m services.inbox.search reindex`."""
    master = base64.b64encode(os.urandom(32)).decode()
    env = {"MONGO_URI": mongo_uri, "MONGO_DB_PREFIX": f"{db_name}_", "PHI_MASTER_KEYS": f"m:{master}", "AMQP_URL": AMQP}
    db = mongo_client[f"{db_name}_inbox"]
    try:
        table = AgencyTable(staff={"stf_a": AGENCY, "stf_b": AGENCY, "stf_x": OTHER})
        before = build(config.load(env), db, directory=table, features=()).components  # no search yet
        send(before, staff(AGENCY, "stf_a"), "stf_b", subject="Old one", body="haloperidol taper")
        notice(before, "stf_x", "haloperidol level", now_ms(), agency=OTHER)
        Announcements(before).ensure_indexes()
        posted = post(Announcements(before), "Haloperidol shortage", "Use the liquid form")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert search.main(["reindex", "--agency", AGENCY]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out) == {"boards": 2, "items": 2, "announcements": 1}
        assert f"{AGENCY}|stf_b: 1 items indexed" in err and "haloperidol" not in out + err
        after = build(config.load(env), db, directory=table, features=(Search, Announcements)).components
        finder = after.features[0]
        found = find(finder, staff(AGENCY, "stf_b"), "haloperidol")
        assert titles(found) == ["Old one"]
        assert [a["id"] for a in found["announcements"]] == [posted["id"]]
        assert find(finder, staff(OTHER, "stf_x"), "haloperidol")["items"] == []  # its agency not reindexed
        assert search.main(["prune", "--agency", AGENCY]) == 0
        out, _ = capsys.readouterr()
        assert json.loads(out) == {"boards": 2, "postings_removed": 0, "documents_deleted": 0}
        assert search.main(["reindex"]) == 0  # every agency; again harmlessly
        assert titles(find(finder, staff(OTHER, "stf_x"), "haloperidol")) == ["haloperidol level"]
    finally:
        mongo_client.drop_database(f"{db_name}_inbox")
