"""Send Fax units: the request's checks (numbers, exactly one document, base64, sizes), the sent-fax
status callback's fields, the board item's summary and the sending settings."""

from __future__ import annotations

import base64
import json

import pytest

from services.cloud_comms.fax import compose, phaxio
from services.cloud_comms.fax import settings as fax_settings
from services.cloud_comms.fax.outbound import ATTENTION, ITEM_STATUS, PROVIDER_STATUS, RANK, idempotent_id, summary
from services.fax_simulator.pdf import sample_pdf
from services.kit.errors import InvalidInput, PayloadTooLarge, Unprocessable
from services.kit.settings import Env

PDF = sample_pdf(1)


@pytest.mark.parametrize(
    ("given", "number"),
    [
        ("+15555550177", "+15555550177"),
        ("5555550177", "+15555550177"),
        ("(555) 555-0177", "+15555550177"),
        ("1 555 555 0177", "+15555550177"),
        ("555.555.0177", "+15555550177"),
        ("+44 20 7946 0958", "+442079460958"),
    ],
)
def test_numbers_are_read_as_e164(given, number):
    assert compose.normalize_number(given, "to") == number


@pytest.mark.parametrize(
    "given", ["", "555-0177", "+0123456789", "1-055-555-0177", "+1 155 555 0177", "555555017712345678", "fax", "+1-8OO"]
)
def test_what_is_not_a_fax_number_is_refused(given):
    with pytest.raises(InvalidInput) as refused:
        compose.normalize_number(given, "to")
    assert refused.value.code == "invalid_number" and refused.value.details == {"field": "to"}


def test_file_names_are_made_safe():
    assert compose.safe_filename("Referral Maria L.pdf", "x.pdf") == "Referral_Maria_L.pdf"
    assert compose.safe_filename("../../etc/passwd", "x.pdf") == "etc_passwd.pdf"
    assert compose.safe_filename("", "document.pdf") == "document.pdf"
    assert len(compose.safe_filename("a" * 500, "x.pdf")) == 104


def body(**fields) -> dict:
    return {"to": "+15555550177", "pdf_base64": base64.b64encode(PDF).decode(), **fields}


def test_an_upload_is_parsed():
    wanted = compose.parse(body(from_number="(555) 555-0100", filename="lab results.pdf"), 4096)
    assert (wanted.to_number, wanted.from_number, wanted.pdf) == ("+15555550177", "+15555550100", PDF)
    assert (wanted.document, wanted.filename) == (None, "lab_results.pdf")


def test_a_document_is_parsed():
    wanted = compose.parse({"to": "5555550177", "document": {"kind": "direct", "id": "dm_1", "index": 2}}, 4096)
    assert wanted.document == {"kind": "direct", "id": "dm_1", "index": 2} and wanted.pdf is None
    assert wanted.from_number is None


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"pdf_base64": None}, "one_document_required"),
        ({"document": {"kind": "fax", "id": "fax_1"}}, "one_document_required"),
        ({"pdf_base64": "%%%"}, "invalid_base64"),
        ({"pdf_base64": {"$gt": ""}}, "invalid_type"),
        ({"to": ["+15555550177"]}, "invalid_type"),
        ({"extra": 1}, "unknown_field"),
    ],
)
def test_bad_bodies_are_refused(fields, code):
    with pytest.raises(InvalidInput) as refused:
        compose.parse(body(**fields), 4096)
    assert refused.value.code == code


# --- destinations --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "to",
    [
        "+15555550100",  # the demo's fictional range (555-0100 to 555-0199)
        "+15555550199",
        "(555) 555-0177",
        "+12125550143",
        "+13127005555",  # 555 as the line, not the exchange
        "+18005550100",  # toll-free
        "+12129001234",  # 900 as an exchange: an ordinary number
    ],
)
def test_ordinary_destinations_are_allowed(to):
    compose.check_destination(compose.normalize_number(to, "to"), ("1",))


@pytest.mark.parametrize(
    ("to", "why"),
    [
        ("+19005550100", "premium-rate"),
        ("(900) 555-0177", "premium-rate"),
        ("+19765550100", "premium-rate"),
        ("+19115550100", "N11"),
        ("+14115550100", "N11"),
        ("+12124115555", "N11"),  # N11 as the exchange
        ("+15555551212", "555 service"),  # directory assistance
        ("+15555550200", "555 service"),
        ("+442079460958", "country"),  # the UK, not allowed by default
        ("+5215555550100", "country"),
    ],
)
def test_premium_special_and_foreign_destinations_are_refused(to, why):
    with pytest.raises(InvalidInput) as refused:
        compose.parse(body(to=to), 4096)
    assert refused.value.code == "destination_not_allowed" and refused.value.details == {"field": "to"}
    assert why in refused.value.message


def test_countries_follow_the_setting():
    compose.check_destination("+442079460958", ("1", "44"))
    with pytest.raises(InvalidInput):
        compose.check_destination("+15555550177", ("44",))
    with pytest.raises(InvalidInput):  # the NANP rules hold whatever the countries
        compose.check_destination("+19005550100", ("1", "44"))
    env = Env("cloud-comms", {"CLOUD_FAX_ALLOWED_COUNTRY_CODES": " 1, +44 ,49"})
    assert fax_settings.load(env).allowed_country_codes == ("1", "44", "49")
    env.done()
    assert fax_settings.load(Env("cloud-comms", {})).allowed_country_codes == ("1",)
    for bad in ("uk", "0", "1,44x", "1234", ","):
        env = Env("cloud-comms", {"CLOUD_FAX_ALLOWED_COUNTRY_CODES": bad})
        fax_settings.load(env)
        assert any("CLOUD_FAX_ALLOWED_COUNTRY_CODES" in p for p in env.problems), bad


# --- Idempotency-Key ---------------------------------------------------------------------------------------


def test_the_key_names_one_fax_per_agency_and_sender():
    first = idempotent_id("agy_1", "stf_a", "k1")
    assert first == idempotent_id("agy_1", "stf_a", "k1") and phaxio.OUTBOUND_ID.fullmatch(first)
    others = {idempotent_id("agy_1", "stf_b", "k1"), idempotent_id("agy_2", "stf_a", "k1")}
    assert first not in others and len(others) == 2 and idempotent_id("agy_1", "stf_a", "k2") != first


@pytest.mark.parametrize(
    ("document", "code"),
    [
        ({"kind": "direct", "id": "dm_1"}, "missing_field"),
        ({"kind": "fax", "id": "fax_1", "index": 0}, "unknown_field"),
        ({"kind": "fax", "id": "fax 1"}, "invalid_value"),
        ({"kind": "letter", "id": "x"}, "invalid_value"),
        ({"kind": "direct", "id": "dm_1", "index": -1}, "out_of_range"),
    ],
)
def test_bad_documents_are_refused(document, code):
    with pytest.raises(InvalidInput) as refused:
        compose.parse({"to": "+15555550177", "document": document}, 1024)
    assert refused.value.code == code


def test_a_filename_goes_with_an_upload_only():
    with pytest.raises(InvalidInput) as refused:
        compose.parse({"to": "+15555550177", "document": {"kind": "fax", "id": "f"}, "filename": "a.pdf"}, 1024)
    assert refused.value.details == {"field": "filename"}


def test_an_upload_over_the_limit_is_413_before_it_is_decoded():
    with pytest.raises(PayloadTooLarge) as too_large:
        compose.parse(body(pdf_base64="A" * 2000), 1024)
    assert too_large.value.http_status == 413 and too_large.value.code == "fax_too_large"
    # at the limit it decodes; the PDF check comes after
    assert len(compose.parse(body(pdf_base64=base64.b64encode(b"x" * 1024).decode()), 1024).pdf) == 1024


def test_the_from_number_must_be_the_callers():
    def number(address, *staff):
        return type("A", (), {"agency_id": "agy_1", "staff_ids": staff, "address": address})()

    class Directory:
        def __init__(self, *linked):
            self.linked = linked

        def resolve_address(self, kind, address):
            return number(address, "stf_a")

        def linked_addresses(self, kind, agency_id, staff_id):
            return list(self.linked)

    caller = type("Caller", (), {"agency_id": "agy_1", "staff_id": "stf_b"})()
    with pytest.raises(Exception) as refused:
        compose.sending_number(Directory(), caller, "+15555550100")
    assert refused.value.code == "not_linked" and refused.value.http_status == 403
    # not named: the caller's one number; several must be named; none is not linked
    assert compose.sending_number(Directory(number("+15555550101", "stf_b")), caller, None).address == "+15555550101"
    with pytest.raises(Unprocessable) as required:
        compose.sending_number(
            Directory(number("+15555550101", "stf_b"), number("+15555550102", "stf_b")), caller, None
        )
    assert required.value.http_status == 422 and required.value.code == "from_number_required"
    with pytest.raises(Exception) as none:
        compose.sending_number(Directory(), caller, None)
    assert none.value.code == "not_linked" and none.value.http_status == 403


# --- the sent-fax status callback ------------------------------------------------------------------


def status_form(**fax) -> dict[str, str]:
    base = {
        "id": 70000001,
        "direction": "sent",
        "num_pages": 2,
        "status": "inprogress",
        "tags": {"outbound_id": "fxo_" + "a" * 24},
    }
    return {"fax": json.dumps({**base, **fax}), "direction": "sent", "is_test": "true", "success": "false"}


def test_a_status_callback_is_read():
    sent = phaxio.parse_sent(status_form())
    assert (sent.fax_id, sent.status, sent.pages, sent.failure_reason) == ("70000001", "inprogress", 2, "")
    assert sent.outbound_id == "fxo_" + "a" * 24


@pytest.mark.parametrize(
    ("fax", "reason"),
    [
        ({"recipients": [{"error_message": "No answer"}], "error_message": "Line error"}, "No answer"),
        ({"recipients": [{"error_message": None}], "error_message": "Busy signal"}, "Busy signal"),
        ({"recipients": "x", "error_type": "lineError"}, "lineError"),
        ({"error_message": "bad\x00\nline" + "x" * 300}, "bad  line" + "x" * 191),
        ({}, "the provider reported a failure without a reason"),
    ],
)
def test_the_failure_reason_is_the_providers(fax, reason):
    assert phaxio.parse_sent(status_form(status="failure", **fax)).failure_reason == reason


@pytest.mark.parametrize(
    "fax",
    [
        {"status": "lost"},
        {"status": {"$ne": ""}},
        {"id": {"$gt": 0}},
        {"num_pages": "2"},
        {"direction": "received"},
    ],
)
def test_status_callbacks_that_are_not_phaxios_are_refused(fax):
    with pytest.raises(InvalidInput):
        phaxio.parse_sent(status_form(**fax))


def test_test_mode_is_read_from_the_fax_or_the_form():
    assert phaxio.parse_sent(status_form(status="success")).is_test is True  # the form's is_test=true
    live = {**status_form(status="success"), "is_test": "false"}
    assert phaxio.parse_sent(live).is_test is False
    assert phaxio.parse_sent({**status_form(status="success", is_test=True), "is_test": "false"}).is_test is True
    assert phaxio.parse_sent({k: v for k, v in live.items() if k != "is_test"}).is_test is False


@pytest.mark.parametrize(
    ("recipients", "status", "reason"),
    [
        ([{"phone_number": "+15555550177", "status": "success"}], "success", ""),
        ([{"status": "failure", "error_message": "No answer", "error_type": "lineError"}], "failure", "No answer"),
        ([{"status": "failure", "error_type": "lineError"}], "failure", "lineError"),
        ([{"status": "success"}, {"status": "failure", "error_message": "Busy signal"}], "failure", "Busy signal"),
        ([], "failure", "the provider reported a partial success without the recipient's status"),
        ("x", "failure", "the provider reported a partial success without the recipient's status"),
    ],
)
def test_a_partial_success_is_read_by_the_recipients_status(recipients, status, reason):
    sent = phaxio.parse_sent(status_form(status="partialsuccess", recipients=recipients))
    assert (sent.status, sent.failure_reason) == (status, reason)


def test_a_tag_that_is_not_ours_is_ignored():
    assert phaxio.parse_sent(status_form(tags={"outbound_id": {"$ne": ""}})).outbound_id == ""
    assert phaxio.parse_sent(status_form(tags={"outbound_id": "fax_1"})).outbound_id == ""
    assert phaxio.parse_sent(status_form(tags=None)).outbound_id == ""


def test_a_received_callback_on_the_status_route_is_refused():
    with pytest.raises(InvalidInput) as refused:
        phaxio.parse_sent({**status_form(), "direction": "received"})
    assert refused.value.code == "not_sent"


# --- states and the board item ---------------------------------------------------------------------------


def test_statuses_rank_and_map():
    assert RANK["queued"] < RANK["sending"] < RANK["inprogress"] < RANK["success"] == RANK["failure"] == RANK["test"]
    assert ITEM_STATUS["test"] == "test" and "test" in ATTENTION and "success" not in ATTENTION
    assert set(PROVIDER_STATUS) == set(phaxio.SENT_STATUSES)
    assert all(s.replace("-", "").isalnum() for s in ITEM_STATUS.values())  # inbox's status pattern


@pytest.mark.parametrize(
    ("doc", "text"),
    [
        ({"status": "queued"}, "Queued for sending"),
        ({"status": "sending"}, "Accepted by the fax provider"),
        ({"status": "inprogress"}, "Sending now"),
        ({"status": "success", "pages": 1}, "Sent · 1 page"),
        ({"status": "success", "pages": 3}, "Sent · 3 pages"),
        ({"status": "success", "pages": None}, "Sent"),
        ({"status": "failure", "failure_reason": "No answer"}, "Failed: No answer"),
        ({"status": "test", "pages": 2}, "Test mode: not transmitted"),
    ],
)
def test_the_items_summary(doc, text):
    assert summary(doc) == text


# --- settings --------------------------------------------------------------------------------------------


def test_sending_settings():
    env = Env("cloud-comms", {})
    loaded = fax_settings.load(env)
    env.done()
    assert (loaded.send_attempts, loaded.send_retry_s, loaded.send_pass_s) == (5, 10.0, 1.0)
    assert (loaded.send_timeout_s, loaded.send_lease_s) == (60.0, 300.0)
    assert loaded.send_lease_s > loaded.send_timeout_s + 5, "a lease outlives any upload"
    env = Env("cloud-comms", {"CLOUD_FAX_SEND_ATTEMPTS": "0", "CLOUD_FAX_SEND_PASS_S": "0"})
    fax_settings.load(env)
    assert any("CLOUD_FAX_SEND_ATTEMPTS" in p for p in env.problems)
    assert any("CLOUD_FAX_SEND_PASS_S" in p for p in env.problems)
    env = Env("cloud-comms", {"CLOUD_FAX_SEND_TIMEOUT_S": "120", "CLOUD_FAX_SEND_LEASE_S": "100"})
    fax_settings.load(env)
    assert any("CLOUD_FAX_SEND_LEASE_S must be longer" in p for p in env.problems)
