"""A fax callback whose multipart body holds a part without a readable name (Werkzeug names it None)
is refused as unsigned, 401 `invalid_signature` with nothing stored, on both callback routes; it
used to fail the signature computation itself (500). Found by schemathesis against the published
OpenAPI document (services/cloud_comms/openapi.yaml)."""

from __future__ import annotations

import pytest

from services.cloud_comms.fax.feature import FAXES
from tests.integration.test_cloud_fax import (  # noqa: F401 - fixtures
    CALLBACK_PATH,
    callback,
    directory,
    setup,
)

BOUNDARY = "4c421dff41f82841a7dac2470e7dfa63"


def multipart(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A multipart/form-data body of (raw Content-Disposition header value, content) parts."""
    body = b""
    for disposition, content in parts:
        body += b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + content + b"\r\n"
    return body + b"--" + BOUNDARY.encode() + b"--\r\n"


# The name parameter ends in an escaped quote, so it never closes: no name can be read.
NAMELESS = b'form-data; name="\xf0\xb9\x9a\x9e\\"'


@pytest.fixture
def app(setup):  # noqa: F811 - the fixture imported above
    return setup


def post(client, path: str, parts: list[tuple[bytes, bytes]], headers: dict):
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    return client.post(path, data=multipart(parts), headers=headers, content_type=content_type)


@pytest.mark.parametrize("path", [CALLBACK_PATH, "/api/v1/fax/callbacks/status"])
def test_a_part_without_a_readable_name_is_refused_as_unsigned(app, path):
    db, client = app
    parts = [(NAMELESS, b"false"), (b'form-data; name="fax"', b"{}"), (b'form-data; name="direction"', b"sent")]
    reply = post(client, path, parts, {"X-Phaxio-Signature": "9" * 40})
    assert reply.status_code == 401, reply.get_data(as_text=True)
    assert reply.get_json()["code"] == "invalid_signature"
    assert db[FAXES].count_documents({}) == 0


def test_a_signed_callback_with_an_extra_nameless_part_is_not_taken(app):
    """The signature was made without the part, which counts under the name "": refused."""
    db, client = app
    data, headers = callback()
    fields = [
        (f'form-data; name="{name}"'.encode(), text.encode()) for name, text in data.items() if name != "filename"
    ]
    pdf = (b'form-data; name="filename"; filename="fax.pdf"', data["filename"][0].read())
    reply = post(client, CALLBACK_PATH, [*fields, pdf, (NAMELESS, b"extra")], headers)
    assert reply.status_code == 401, reply.get_data(as_text=True)
    assert reply.get_json()["code"] == "invalid_signature"
    assert db[FAXES].count_documents({}) == 0
    # The same callback without the nameless part is taken: the refusal was the part, not the framing.
    reply = post(client, CALLBACK_PATH, [*fields, pdf], headers)
    assert reply.status_code == 200, reply.get_data(as_text=True)
    assert db[FAXES].count_documents({}) == 1
