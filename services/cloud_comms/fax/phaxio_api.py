"""Phaxio's API v2 for sending, as cloud-comms uses it: send one fax, and find a fax by the tag it
was sent with. HTTP basic auth with the API key and secret; `api_url` is the API root
(`https://api.phaxio.com/v2`; in development the fax simulator).

    POST <api>/faxes   multipart: to, file (the PDF), caller_id (our number), callback_url,
                       tag[outbound_id] = our outbound fax id   -> {"success", "message", "data": {"id"}}
    GET  <api>/faxes?direction=sent&tag[outbound_id]=<id>       -> {"success", "data": [Fax, ...]}

Every outcome is one of four: `accepted` (the provider's fax id), `Refused` (a 4xx: retrying the
same request cannot succeed; carries the provider's message), `CredentialsRefused` (401/403: our
API key or secret is wrong, a fault of our configuration, not of the fax: worth retrying once it
is fixed) or `Transient` (no answer, a timeout, a 5xx or 429: worth another try later). No PDF
byte, number or credential is logged here.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

from services.cloud_comms.fax.phaxio import FAX_ID, OUTBOUND_TAG
from services.cloud_comms.fax.settings import UPLOAD_CONNECT_S

CONNECT_TIMEOUT_S = UPLOAD_CONNECT_S
MAX_MESSAGE = 200
CREDENTIAL_STATUSES = (401, 403)


class Refused(Exception):
    """The provider refused the request (4xx); `message` is its own words."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class CredentialsRefused(Refused):
    """The provider refused our API credentials (401/403): a configuration fault, not the fax's."""


class Transient(Exception):
    """The provider could not be reached or could not answer now (connection, timeout, 5xx, 429)."""


@dataclass(frozen=True)
class PhaxioApi:
    api_url: str
    api_key: str
    api_secret: str
    timeout_s: float = 60.0

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            reply = requests.request(
                method,
                f"{self.api_url}{path}",
                auth=(self.api_key, self.api_secret),
                timeout=(CONNECT_TIMEOUT_S, self.timeout_s),
                **kwargs,
            )
        except requests.RequestException as exc:
            raise Transient(f"the provider could not be reached ({type(exc).__name__})") from exc
        body = _json(reply)
        if reply.status_code == 429 or reply.status_code >= 500:
            raise Transient(f"the provider answered HTTP {reply.status_code}")
        if reply.status_code >= 400 or body.get("success") is False:
            message = body.get("message") if isinstance(body.get("message"), str) else ""
            refused = CredentialsRefused if reply.status_code in CREDENTIAL_STATUSES else Refused
            raise refused(reply.status_code, (message or f"HTTP {reply.status_code}")[:MAX_MESSAGE])
        return body

    def send(self, *, to: str, caller_id: str, pdf: bytes, filename: str, callback_url: str, tag: str) -> str:
        """Send `pdf` to `to`; the provider's fax id."""
        body = self._call(
            "POST",
            "/faxes",
            data={"to": to, "caller_id": caller_id, "callback_url": callback_url, f"tag[{OUTBOUND_TAG}]": tag},
            files={"file": (filename, pdf, "application/pdf")},
        )
        return _fax_id((body.get("data") or {}).get("id") if isinstance(body.get("data"), dict) else None)

    def find_sent(self, tag: str) -> str | None:
        """The id of the fax sent with our tag `tag`, None when the provider has none."""
        body = self._call("GET", "/faxes", params={"direction": "sent", f"tag[{OUTBOUND_TAG}]": tag})
        faxes = body.get("data")
        if not isinstance(faxes, list):
            raise Transient("the provider's fax list is not a list")
        for fax in faxes:
            if isinstance(fax, dict) and isinstance(fax.get("tags"), dict) and fax["tags"].get(OUTBOUND_TAG) == tag:
                return _fax_id(fax.get("id"))
        return None


def _json(reply: requests.Response) -> dict:
    try:
        body = reply.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _fax_id(value: object) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not FAX_ID.fullmatch(text):
        raise Transient("the provider's answer has no fax id")
    return text
