"""Outbound Direct's pure logic: per-recipient tracking, reading MDNs and DSNs, the request body's
rules, the reply subject and the headers of what leaves the HISP."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest

from services.cloud_comms.direct import compose, outgoing, reports, tracking
from services.cloud_comms.direct import mdn as mdns
from services.cloud_comms.direct.outbound_request import PayloadTooLarge, parse
from services.kit.errors import InvalidInput

A, B = "a@direct.partner.example", "b@direct.partner.example"


def states(recipients: list[dict]) -> list[str]:
    return [r["state"] for r in recipients]


def test_recipients_only_move_forward_and_failed_is_final():
    recipients = tracking.new_recipients([A, B], 1)
    recipients, trail = tracking.apply(recipients, [(A, "sent", "s"), (B, "sent", "s")], 2)
    assert states(recipients) == ["sent", "sent"] and len(trail) == 2
    recipients, trail = tracking.apply(recipients, [(A, "dispatched", "d")], 3)
    assert states(recipients) == ["dispatched", "sent"] and trail[0]["at"] == 3
    recipients, trail = tracking.apply(recipients, [(A, "processed", "late"), (B, "queued", "x")], 4)
    assert states(recipients) == ["dispatched", "sent"] and trail == []
    recipients, _ = tracking.apply(recipients, [(B, "failed", "f")], 5)
    recipients, trail = tracking.apply(recipients, [(B, "dispatched", "d"), ("c@x.example", "sent", "")], 6)
    assert states(recipients) == ["dispatched", "failed"] and trail == []


@pytest.mark.parametrize(
    ("given", "status"),
    [
        (["queued", "queued"], "queued"),
        (["sent", "dispatched"], "sent"),
        (["processed", "dispatched"], "processed"),
        (["dispatched", "dispatched"], "dispatched"),
        (["dispatched", "failed"], "failed"),
    ],
)
def test_the_status_aggregates_the_recipients(given, status):
    recipients = [
        {"address": f"{n}@x.example", "state": s, "updated_at": 0, "detail": "why"} for n, s in enumerate(given)
    ]
    assert tracking.aggregate(recipients)[0] == status
    assert tracking.unfinished(recipients) == any(s not in ("dispatched", "failed") for s in given)


def test_the_timeout_fails_whoever_has_not_confirmed():
    recipients = [
        {"address": A, "state": "sent", "updated_at": 0, "detail": ""},
        {"address": B, "state": "processed", "updated_at": 0, "detail": ""},
        {"address": "c@x.example", "state": "dispatched", "updated_at": 0, "detail": ""},
    ]
    assert tracking.overdue(recipients, 3600) == [
        (A, "failed", "no processed notification within 1 h"),
        (B, "failed", "no dispatched notification within 1 h"),
    ]
    assert [tracking.duration(s) for s in (3600, 7200, 5400, 90, 1)] == ["1 h", "2 h", "90 min", "90 s", "1 s"]


def report(content_type: str, body: str) -> email.message.EmailMessage:
    head = f'Content-Type: {content_type}; boundary="b"\r\n\r\n'
    raw = f"{head}--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n{body}--b--\r\n"
    return email.message_from_bytes(raw.encode(), policy=email.policy.default)


FINAL = "X-DIRECT-FINAL-DESTINATION-DELIVERY:\r\n"


def mdn(disposition: str, extra: str = "", *, original: str = "Original-Message-ID: <m1@riverbend>\r\n"):
    return report(
        "multipart/report; report-type=disposition-notification",
        "--b\r\nContent-Type: message/disposition-notification\r\n\r\n"
        f"Final-Recipient: rfc822; {A}\r\n{original}Disposition: {disposition}\r\n{extra}\r\n",
    )


AUTO = "automatic-action/MDN-sent-automatically"


@pytest.mark.parametrize(
    ("disposition", "extra", "state"),
    [
        (f"{AUTO}; processed", "", "processed"),
        (f"{AUTO};dispatched", FINAL, "dispatched"),
        (f"{AUTO}; dispatched", "", "processed"),  # final delivery not confirmed
        (f"{AUTO}; dispatched", "X-Other: 1\r\n", "processed"),
        ("manual-action/MDN-sent-manually; displayed", "", "processed"),
        (f"{AUTO}; failed/error", "", "failed"),
        (f"{AUTO}; processed/error", "", "failed"),
        (f"{AUTO}; processed/warning,error", "", "failed"),
        (f"{AUTO}; processed/ warning , ERROR", "", "failed"),
        (f"{AUTO}; processed/warning", "", "processed"),
        (f"{AUTO}; deleted", "", "failed"),
        (f"{AUTO}; denied", "", "failed"),
        (f"{AUTO} (sent by the HISP); processed (all good)", "", "processed"),
        (f"{AUTO}; dispatched; x-hisp-extension=1", FINAL, "dispatched"),
        (f"{AUTO}; processed; x-note=failed", "", "processed"),
        (f"{AUTO};\r\n dispatched", "x-direct-final-destination-delivery: \r\n", "dispatched"),
    ],
)
def test_mdn_dispositions(disposition, extra, state):
    found = reports.parse(mdn(disposition, extra))
    assert found is not None and found.kind == "mdn" and found.original_message_id == "<m1@riverbend>"
    ((outcome,),) = [found.outcomes]
    assert (outcome.recipient, outcome.state) == ("", state)


def test_a_dispatched_without_the_final_delivery_field_says_so():
    (outcome,) = reports.parse(mdn(f"{AUTO}; dispatched")).outcomes
    assert outcome.detail == "dispatched notification received without final-delivery confirmation"
    (outcome,) = reports.parse(mdn(f"{AUTO}; dispatched", FINAL)).outcomes
    assert outcome.detail == "dispatched notification received (final delivery)"


@pytest.mark.parametrize(
    ("original", "fallback", "found"),
    [
        ("Original-Message-ID: m1@riverbend\r\n", "", "<m1@riverbend>"),
        ("Original-Message-ID:  <m1@riverbend> (ours)\r\n", "", "<m1@riverbend>"),
        ("", "<m2@riverbend>", "<m2@riverbend>"),
        ("", "m2@riverbend", "<m2@riverbend>"),
        ("Original-Message-ID: <m1@riverbend>\r\n", "<m2@riverbend>", "<m1@riverbend>"),
        ("", "", ""),
    ],
)
def test_the_original_message_id_is_read_leniently_and_in_reply_to_is_the_fallback(original, fallback, found):
    assert reports.parse(mdn(f"{AUTO}; processed", original=original), fallback).original_message_id == found


def encoded_mdn(body: bytes, encoding: str) -> email.message.EmailMessage:
    raw = (
        b'Content-Type: multipart/report; report-type=disposition-notification; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: message/disposition-notification\r\n"
        + (f"Content-Transfer-Encoding: {encoding}\r\n".encode() if encoding else b"")
        + b"\r\n"
        + body
        + b"\r\n--b--\r\n"
    )
    return email.message_from_bytes(raw, policy=email.policy.default)


FIELDS = (
    f"Reporting-UA: mx.partner.example; HISP\r\nFinal-Recipient: rfc822; {A}\r\n"
    f"Original-Message-ID: <m1@riverbend>\r\nDisposition: {AUTO}; dispatched\r\n{FINAL}"
).encode()


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (base64.encodebytes(FIELDS), "base64"),
        (base64.encodebytes(FIELDS), "BASE64"),
        (b"\r\n" + FIELDS, ""),
        (b"\r\n\r\n" + FIELDS, "7bit"),
        (FIELDS.replace(b"mx.partner", b"mx=2Epartner"), "quoted-printable"),
    ],
)
def test_an_encoded_or_blank_led_disposition_part_parses(body, encoding):
    found = reports.parse(encoded_mdn(body, encoding))
    assert found.original_message_id == "<m1@riverbend>"
    assert [o.state for o in found.outcomes] == ["dispatched"]


def test_an_unknown_disposition_is_a_report_with_no_news_and_a_message_is_not_a_report():
    assert reports.parse(mdn(f"{AUTO}; wondering")).outcomes == ()
    plain = email.message_from_bytes(b"Content-Type: text/plain\r\n\r\nhello\r\n", policy=email.policy.default)
    assert reports.parse(plain) is None
    assert reports.parse(report("multipart/report; report-type=disposition-notification", "")).original_message_id == ""
    assert reports.parse(encoded_mdn(b"!!not base64!!", "base64")).outcomes == ()


def test_a_dsn_fails_its_failed_recipients_only():
    dsn = report(
        "multipart/report; report-type=delivery-status",
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n"
        "X-Original-Message-ID: <m2@riverbend>\r\n\r\n"
        f"Final-Recipient: rfc822; {A.upper()}\r\nAction: failed\r\nStatus: 5.1.1 (no such user)\r\n\r\n"
        f"Final-Recipient: rfc822; {B}\r\nAction: delivered\r\nStatus: 2.0.0\r\n\r\n",
    )
    found = reports.parse(dsn)
    assert found.kind == "dsn" and found.original_message_id == "<m2@riverbend>"
    assert found.outcomes == (reports.Outcome(A, "failed", "delivery status notification: failed (5.1.1)", "5.1.1"),)


def test_a_dsn_prefers_the_original_recipient_postfix_rewrote():
    dsn = report(
        "multipart/report; report-type=delivery-status",
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.partner.example\r\n"
        "X-Postfix-Queue-ID: 4Bx1\r\nX-Original-Message-ID: <m2@riverbend>\r\n\r\n"
        "Final-Recipient: rfc822; b.internal@mailstore.partner.local\r\n"
        f"Original-Recipient: rfc822;<{B.upper()}>\r\nAction: FAILED\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 unknown\r\n\r\n"
        f"Final-Recipient: RFC822; <{A}> (the recipient)\r\nAction: failed\r\nStatus: 5.2.2\r\n\r\n",
    )
    found = reports.parse(dsn)
    assert [(o.recipient, o.status) for o in found.outcomes] == [(B, "5.1.1"), (A, "5.2.2")]


def test_a_dsn_names_our_message_by_the_returned_headers_too():
    dsn = report(
        "multipart/report; report-type=delivery-status",
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\n"
        f"Final-Recipient: rfc822; {A}\r\nAction: failed\r\nStatus: 5.0.0\r\n\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <m3@riverbend>\r\nFrom: x@y.example\r\n\r\n",
    )
    assert reports.parse(dsn).original_message_id == "<m3@riverbend>"


def body(**fields) -> dict:
    return {"from": "intake@direct.riverbend.example", "to": [A], "subject": "Hello", "text": "Hi", **fields}


def test_a_request_is_cleaned():
    attachment = {"filename": "a/b.pdf", "content_type": "Application/PDF", "content_base64": "JVBE\nRg=="}
    req = parse(body(to=[A.upper(), A, B], attachments=[attachment]), 1024)
    assert req.to == (A, B) and req.sender == "intake@direct.riverbend.example"
    assert [(a.filename, a.content_type, a.data) for a in req.attachments] == [("a_b.pdf", "application/pdf", b"%PDF")]
    reply = parse({"in_reply_to": "dm_1", "text": ""}, 1024)
    assert (reply.sender, reply.to, reply.subject, reply.in_reply_to) == ("", (), "", "dm_1")


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"subject": None}, "missing_field"),
        ({"to": []}, "invalid_value"),
        ({"to": ["a@b"]}, "invalid_address"),
        ({"to": ["a,b@c.example"]}, "invalid_address"),
        ({"to": ["<a@c.example>"]}, "invalid_address"),
        ({"from": "intake@direct.riverbend.example\r\nBcc: x@y.example"}, "invalid_address"),
        ({"subject": "a\nb"}, "invalid_value"),
        ({"text": "é" * 60_000}, "too_long"),
        ({"to": {"$gt": ""}}, "invalid_type"),
        ({"attachments": [{"filename": "a\rb", "content_type": "text/plain", "content_base64": ""}]}, "invalid_value"),
        ({"attachments": [{"filename": "a", "content_type": "pdf", "content_base64": ""}]}, "invalid_value"),
        ({"forward_attachments": [{"message": "dm_1"}]}, "missing_field"),
    ],
)
def test_a_bad_request_is_refused(fields, code):
    given = {k: v for k, v in body(**fields).items() if v is not None}
    with pytest.raises(InvalidInput) as refused:
        parse(given, 1024)
    assert refused.value.code == code


def test_attachments_over_the_limit_are_too_large():
    attachment = {
        "filename": "a",
        "content_type": "application/pdf",
        "content_base64": base64.b64encode(b"x" * 1025).decode(),
    }
    with pytest.raises(PayloadTooLarge) as refused:
        parse(body(attachments=[attachment]), 1024)
    assert refused.value.code == "attachments_too_large" and refused.value.http_status == 413


def test_reply_subjects():
    assert compose.reply_subject("Lab results") == "Re: Lab results"
    assert compose.reply_subject("RE: Lab results") == "RE: Lab results"
    assert compose.reply_subject("") == "Re: (no subject)"
    assert len(compose.reply_subject("x" * 300)) == 200


def test_headers_cannot_be_injected_and_are_encoded_when_not_ascii():
    headers = compose.headers(
        sender="a@x.example",
        to=[A, B],
        subject="Café\r\nBcc: evil@x.example",
        message_id="<1@x>",
        date_ms=0,
        in_reply_to="<0@y>",
    )
    raw = outgoing.message(headers, b"Content-Type: text/plain\n\nbody\n")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Bcc"] is None and parsed["Subject"] == "Café Bcc: evil@x.example"
    assert parsed["To"] == f"{A}, {B}" and parsed["References"] == "<0@y>"
    assert parsed["Disposition-Notification-Options"] == compose.FINAL_DELIVERY_OPTION
    assert parsed["Disposition-Notification-To"] == "a@x.example"
    assert raw.isascii() and b"\r\n\r\nbody\r\n" in raw


def test_the_signature_type_is_renamed_outside_the_signed_content_only():
    signed = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/signed; protocol="application/x-pkcs7-signature"; '
        b'boundary="s"\r\n\r\n--s\r\nContent-Type: text/plain\r\n\r\n'
        b"mentions Content-Type: application/x-pkcs7-signature\r\n"
        b"--s\r\nContent-Type: application/x-pkcs7-signature; name=smime.p7s\r\n\r\nAAAA\r\n--s--\r\n"
    )
    renamed = outgoing._standard_signature_type(signed)  # noqa: SLF001 - the rule under test
    assert b'protocol="application/pkcs7-signature"' in renamed
    assert b"mentions Content-Type: application/x-pkcs7-signature\r\n" in renamed
    assert b"--s\r\nContent-Type: application/pkcs7-signature; name=smime.p7s" in renamed


@pytest.mark.parametrize(
    ("values", "asked"),
    [
        (("X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true",), True),
        (("x-direct-final-destination-delivery=Required,TRUE",), True),
        (("  X-DIRECT-FINAL-DESTINATION-DELIVERY = optional , true ",), True),
        (
            ("signed-receipt-protocol=optional,pkcs7-signature; X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true",),
            True,
        ),
        (("", "X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true"), True),
        (("X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,false",), False),
        (("X-DIRECT-FINAL-DESTINATION-DELIVERY",), False),
        (("X-DIRECT-FINAL-DESTINATION-DELIVERY=sometimes,true",), False),
        (("X-OTHER=optional,true",), False),
        ((), False),
    ],
)
def test_the_final_delivery_request_is_read_from_the_options_header(values, asked):
    assert compose.asks_final_delivery(*values) is asked


@pytest.mark.parametrize(("disposition", "has_field"), [("processed", False), ("dispatched", True), ("failed", False)])
def test_only_our_dispatched_mdns_carry_the_final_delivery_field(disposition, has_field):
    entity = mdns.report(
        disposition=disposition, recipient=A, original_message_id="<m1@x>", reporting_host="hisp.example"
    )
    assert (b"\r\nX-DIRECT-FINAL-DESTINATION-DELIVERY:\r\n" in entity) is has_field
    parsed = reports.parse(email.message_from_bytes(entity, policy=email.policy.default))
    assert [o.state for o in parsed.outcomes] == [disposition]
