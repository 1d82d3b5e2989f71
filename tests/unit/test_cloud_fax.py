"""eFax units: Phaxio's callback signature against vectors built here from Phaxio's documented
algorithm (https://www.phaxio.com/docs/security/callbacks), the received-fax fields, the PDF checks,
the settings, and the simulator's hand-written PDF and signer."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re

import pypdf
import pytest

from services.cloud_comms.fax import phaxio
from services.cloud_comms.fax import settings as fax_settings
from services.fax_simulator import app as simulator_app
from services.fax_simulator.pdf import SAMPLE_LINES, sample_pdf
from services.kit.errors import InvalidInput, PayloadTooLarge
from services.kit.settings import Env

TOKEN = "33333"
URL = "https://clinic.example/api/v1/fax/callbacks/received/"
PDF = b"%PDF-1.4\nsample\n%%EOF\n"
FAX = {
    "id": 12345678,
    "direction": "received",
    "num_pages": 2,
    "from_number": "+15555550123",
    "to_number": "+15555550199",
}


def documented(token: str, url: str, params: dict[str, str], files: dict[str, bytes]) -> str:
    """Steps 1-6 of Phaxio's page, spelled out one by one."""
    text = url  # 1. the URL as submitted, trailing slash included
    for name in sorted(params):  # 2. POST parameters sorted by name
        text = text + name + params[name]  # 3. name and value, no delimiter
    for name in sorted(files):  # 4. file parts sorted by name
        text = text + name + hashlib.sha1(files[name]).hexdigest()  # 5. part name + SHA-1 of contents
    return hmac.new(token.encode(), text.encode(), "sha1").hexdigest()  # 6. HMAC-SHA1 with the token


def test_the_signature_is_phaxios_documented_one():
    params = {"fax": json.dumps(FAX), "direction": "received", "is_test": "true", "success": "true"}
    files = {"filename": PDF}
    expected = documented(TOKEN, URL, params, files)
    assert phaxio.signature(TOKEN, URL, list(params.items()), list(files.items())) == expected
    # parameter order as received does not matter; the simulator signs the same way
    assert phaxio.signature(TOKEN, URL, list(reversed(params.items())), list(files.items())) == expected
    assert simulator_app.sign(TOKEN, URL, params, files) == expected


def test_a_fixed_vector():
    # By hand: HMAC-SHA1("33333", "https://x/cbdirectionreceivedfilename" + sha1("%PDF-")).
    content_sha1 = hashlib.sha1(b"%PDF-").hexdigest()
    message = "https://x/cbdirectionreceivedfilename" + content_sha1
    expected = hmac.new(b"33333", message.encode(), hashlib.sha1).hexdigest()
    assert phaxio.signature("33333", "https://x/cb", [("direction", "received")], [("filename", b"%PDF-")]) == expected


def test_no_files_and_no_params_sign_the_url_alone():
    expected = hmac.new(TOKEN.encode(), URL.encode(), hashlib.sha1).hexdigest()
    assert phaxio.signature(TOKEN, URL, [], []) == expected


@pytest.mark.parametrize(
    "change",
    ["token", "url", "trailing_slash", "param_value", "extra_param", "file_content", "file_name"],
)
def test_any_change_breaks_the_signature(change):
    base_params = [("fax", json.dumps(FAX)), ("direction", "received")]
    base_files = [("filename", PDF)]
    given = documented(TOKEN, URL, dict(base_params), dict(base_files))
    assert phaxio.signature_valid(TOKEN, URL, base_params, base_files, given)
    token, url, params, files = TOKEN, URL, base_params, base_files
    if change == "token":
        token = "33334"
    elif change == "url":
        url = URL.replace("clinic", "clinlc")
    elif change == "trailing_slash":
        url = URL.rstrip("/")
    elif change == "param_value":
        params = [("fax", json.dumps({**FAX, "to_number": "+15555550100"})), ("direction", "received")]
    elif change == "extra_param":
        params = [*params, ("is_test", "true")]
    elif change == "file_content":
        files = [("filename", PDF + b" ")]
    elif change == "file_name":
        files = [("file", PDF)]
    assert not phaxio.signature_valid(token, url, params, files, given)


@pytest.mark.parametrize("given", [None, "", "  ", "not-hex", "0" * 40])
def test_missing_or_malformed_signatures_are_refused(given):
    assert not phaxio.signature_valid(TOKEN, URL, [("direction", "received")], [], given)


def test_the_header_compares_case_insensitively_and_trimmed():
    good = documented(TOKEN, URL, {"direction": "received"}, {})
    assert phaxio.signature_valid(TOKEN, URL, [("direction", "received")], [], f" {good.upper()} ")


def test_an_empty_token_never_validates():
    assert not phaxio.signature_valid("", URL, [], [], hmac.new(b"", URL.encode(), hashlib.sha1).hexdigest())


# --- the received fax's fields --------------------------------------------------------------------


def form(**fax_changes) -> dict[str, str]:
    return {"fax": json.dumps({**FAX, **fax_changes}), "direction": "received", "is_test": "false"}


def test_a_received_fax_is_read():
    fax = phaxio.parse_received(form(completed_at="2026-03-04T20:15:00Z", caller_name="Lakeside Clinic"))
    assert fax.fax_id == "12345678"
    assert (fax.to_number, fax.from_number, fax.pages) == ("+15555550199", "+15555550123", 2)
    assert fax.received_at_ms == 1772655300000
    assert fax.caller_name == "Lakeside Clinic"
    assert fax.is_test is False


def test_a_withheld_caller_number_is_empty():
    assert phaxio.parse_received(form(from_number=None)).from_number == ""
    assert phaxio.parse_received(form(from_number="anonymous")).from_number == ""


@pytest.mark.parametrize(
    "changes",
    [
        {"to_number": {"$ne": ""}},
        {"to_number": ["+15555550199"]},
        {"to_number": "5555550199"},
        {"id": {"$gt": 0}},
        {"id": True},
        {"id": "12; drop"},
        {"id": -4},
        {"from_number": {"$regex": ".*"}},
        {"num_pages": "2"},
        {"num_pages": 10**9},
        {"caller_name": {"$where": "1"}},
        {"completed_at": "yesterday"},
        {"direction": "sent"},
    ],
)
def test_values_that_are_not_phaxios_are_refused(changes):
    with pytest.raises(InvalidInput):
        phaxio.parse_received(form(**changes))


@pytest.mark.parametrize("raw", [None, "", "[]", "{not json", '"text"', "[" * 100_000])
def test_the_fax_field_must_be_a_json_object(raw):
    fields = {"direction": "received"} if raw is None else {"fax": raw, "direction": "received"}
    with pytest.raises(InvalidInput):
        phaxio.parse_received(fields)


def written_pdf(pages: int, password: str | None = None, owner: str | None = None) -> bytes:
    writer = pypdf.PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(612, 792)
    if password is not None:
        writer.encrypt(password, owner)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_pdf_checks():
    assert phaxio.check_pdf(sample_pdf(1), 64 * 1024) == 1
    assert phaxio.check_pdf(sample_pdf(3), 64 * 1024, "document") == 3  # the pages, counted by pypdf
    assert phaxio.check_pdf(written_pdf(2), 64 * 1024) == 2
    with pytest.raises(PayloadTooLarge) as too_large:
        phaxio.check_pdf(sample_pdf(1) + b"x" * 64 * 1024, 64 * 1024)
    assert too_large.value.http_status == 413
    for not_pdf in (b"GIF89a", b"", b"%PDF-1.4 but cut off", b"<html>%PDF-\n%%EOF"):
        with pytest.raises(InvalidInput) as refused:
            phaxio.check_pdf(not_pdf, 1024)
        assert refused.value.code == "not_a_pdf"


@pytest.mark.parametrize(
    "content",
    [
        PDF,  # header and end marker only
        b"%PDF-1.4\n<html><body><script>alert(1)</script></body></html>\n%%EOF",  # HTML in a PDF's clothes
        b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n",  # parses, no page
        written_pdf(0),  # a real PDF of no pages
        sample_pdf(1)[: len(sample_pdf(1)) // 2] + b"\n%%EOF\n",  # cut in the middle, end marker added
        b"%PDF-1.4\n" + b"[" * 5000 + b"\ntrailer << /Root 1 0 R >>\n%%EOF",  # deep nesting: pypdf raises
    ],
)
def test_only_a_pdf_that_opens_with_pages_is_a_pdf(content):
    with pytest.raises(InvalidInput) as refused:
        phaxio.check_pdf(content, 1024 * 1024, "document")
    assert (refused.value.code, refused.value.details) == ("not_a_pdf", {"field": "document"})


@pytest.mark.parametrize("owner", [None, "owner-only"])
def test_an_encrypted_pdf_is_refused_with_its_own_code(owner):
    content = written_pdf(1, password="" if owner else "secret", owner=owner)
    with pytest.raises(InvalidInput) as refused:
        phaxio.check_pdf(content, 1024 * 1024)
    assert refused.value.code == "encrypted_pdf" and refused.value.http_status == 400


# --- settings ---------------------------------------------------------------------------------------


def test_development_defaults():
    env = Env("cloud-comms", {})
    loaded = fax_settings.load(env)
    env.done()
    assert loaded.provider == "phaxio"
    assert loaded.callback_token == fax_settings.DEV_CALLBACK_TOKEN
    assert loaded.api_url == "http://127.0.0.1:8191"
    assert loaded.received_callback_url == "http://127.0.0.1:8000/api/v1/fax/callbacks/received"
    assert loaded.max_pdf_bytes == 20 * 1024 * 1024
    assert "callback_token" not in repr(loaded) and fax_settings.DEV_CALLBACK_TOKEN not in repr(loaded)


def test_settings_from_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    env = Env(
        "cloud-comms",
        {
            "CLOUD_FAX_CALLBACK_TOKEN_FILE": str(token_file),
            "CLOUD_FAX_PUBLIC_CALLBACK_URL": "https://fax.clinic.example/api/v1/fax/callbacks/",
            "CLOUD_FAX_MAX_PDF_BYTES": "1048576",
            "CLOUD_FAX_API_URL": "https://api.phaxio.com/v2.1",
        },
    )
    loaded = fax_settings.load(env)
    env.done()
    assert loaded.callback_token == "from-a-file"
    assert loaded.status_callback_url == "https://fax.clinic.example/api/v1/fax/callbacks/status"
    assert loaded.max_pdf_bytes == 1048576


def test_production_needs_every_secret_and_an_https_callback_url():
    env = Env("cloud-comms", {"CLINIC_MODE": "production", "CLOUD_FAX_PUBLIC_CALLBACK_URL": "http://x.example/cb"})
    fax_settings.load(env)
    problems = "\n".join(env.problems)
    for name in ("CLOUD_FAX_CALLBACK_TOKEN", "CLOUD_FAX_API_KEY", "CLOUD_FAX_API_SECRET", "CLOUD_FAX_API_URL"):
        assert name in problems
    assert "https" in problems


def test_bad_values_are_reported():
    env = Env("cloud-comms", {"CLOUD_FAX_PROVIDER": "efax", "CLOUD_FAX_MAX_PDF_BYTES": "lots"})
    fax_settings.load(env)
    assert any("CLOUD_FAX_PROVIDER" in p for p in env.problems)
    assert any("CLOUD_FAX_MAX_PDF_BYTES" in p for p in env.problems)


# --- the simulator's PDF ------------------------------------------------------------------------------


@pytest.mark.parametrize("pages", [1, 3])
def test_the_sample_pdf_is_well_formed(pages):
    data = sample_pdf(pages)
    assert phaxio.check_pdf(data, 1024 * 1024) == pages
    # the referral's lines, each drawn as text (the PDF's text layer), on every page
    shown = re.findall(rb"\((.*?)\) Tj", data)
    for line in SAMPLE_LINES:
        assert shown.count(line.encode()) == pages
    assert data.count(b"/Type /Page ") == pages
    # every cross-reference entry points at its object, and startxref at the table
    start = int(re.search(rb"startxref\n(\d+)\n", data).group(1))
    assert data[start:].startswith(b"xref\n")
    offsets = [int(m) for m in re.findall(rb"(\d{10}) 00000 n ", data)]
    for number, offset in enumerate(offsets, start=1):
        assert data[offset:].startswith(b"%d 0 obj" % number)
    for length, body in re.findall(rb"/Length (\d+) >>\nstream\n(.*?)\nendstream", data, re.S):
        assert int(length) == len(body)
