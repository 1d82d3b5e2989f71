"""`POST /api/v1/cloud/direct/outbound`: the request body, checked before anything is read or
written (kit validation: unknown fields, wrong types and operator objects are refused).

    {"from": str, "to": [str, ...] (1-10), "subject": str (<= 200), "text": str (<= 100 KB),
     "in_reply_to": "dm_..." , "attachments": [{"filename", "content_type", "content_base64"}],
     "forward_attachments": [{"message": "dm_...", "index": n}]}

For a reply (`in_reply_to`) `from`, `to` and `subject` may be left out (the caller fills them in
from the original); otherwise `to` and `subject` are required (400 `missing_field`) and a missing
`from` is the caller's one linked Direct address (422 `from_required` when several). Addresses are dot-atom
`local@domain` (400 `invalid_address`), lowercased, repeated ones dropped. Subjects and file names
hold no control characters (400 `invalid_value`: no header injection). Attachments: at most 20 of
each kind, base64 (400 `invalid_base64`), a media type `type/subtype` that is not multipart;
together (with the forwarded ones, counted by the caller) at most
CLOUD_DIRECT_MAX_OUTBOUND_ATTACHMENT_BYTES decoded (413 `attachments_too_large`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from services.kit.errors import InvalidInput, PayloadTooLarge
from services.kit.validation import Fields, Id, Int, ListOf, Str, validate

MAX_TO = 10
MAX_ATTACHMENTS = 20
MAX_SUBJECT = 200
MAX_TEXT_BYTES = 100 * 1024
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
ADDRESS = re.compile(rf"(?=.{{3,254}}$)(?=[^@]{{1,64}}@){ATOM}(?:\.{ATOM})*@{LABEL}(?:\.{LABEL})+")
CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


SPECS = {
    "from": Str(max_len=254, required=False),
    "to": ListOf(Str(max_len=254), max_items=MAX_TO),
    "subject": Str(max_len=MAX_SUBJECT, required=False),
    "text": Str(max_len=MAX_TEXT_BYTES, min_len=0, strip=False),
    "in_reply_to": Id(required=False),
    "attachments": ListOf(
        Fields(
            {
                "filename": Str(max_len=255),
                "content_type": Str(max_len=129),
                "content_base64": Str(max_len=64 * 1024 * 1024, min_len=0),
            },
            required=True,
        ),
        max_items=MAX_ATTACHMENTS,
        unique=False,
    ),
    "forward_attachments": ListOf(
        Fields({"message": Id(), "index": Int(required=True, maximum=999)}, required=True),
        max_items=MAX_ATTACHMENTS,
        unique=False,
    ),
}


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class ComposeRequest:
    sender: str  # "" = the reply's default
    to: tuple[str, ...]  # () = the reply's default
    subject: str = field(repr=False)  # "" = the reply's default
    text: str = field(repr=False)
    in_reply_to: str
    attachments: tuple[Attachment, ...]
    forwards: tuple[tuple[str, int], ...]


def address(path: str, value: str) -> str:
    if not ADDRESS.fullmatch(value):
        raise InvalidInput("invalid_address", f"{path} must be a Direct address (name@domain)", {"field": path})
    return value.lower()


def _no_control(path: str, value: str) -> str:
    if CONTROL.search(value):
        raise InvalidInput("invalid_value", f"{path} must not contain control characters", {"field": path})
    return value


def _attachment(path: str, item: dict) -> Attachment:
    content_type = item["content_type"].lower()
    if not CONTENT_TYPE.fullmatch(content_type) or content_type.startswith("multipart/"):
        raise InvalidInput(
            "invalid_value", f"{path}.content_type must be a media type", {"field": f"{path}.content_type"}
        )
    try:
        data = base64.b64decode(re.sub(r"\s+", "", item["content_base64"]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(
            "invalid_base64", f"{path}.content_base64 is not base64", {"field": f"{path}.content_base64"}
        ) from exc
    filename = _no_control(f"{path}.filename", item["filename"]).replace("/", "_").replace("\\", "_")
    return Attachment(filename, content_type, data)


def too_large(total: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge("attachments_too_large", f"attachments exceed {limit} bytes ({total} bytes)")


def parse(body: dict, max_attachment_bytes: int) -> ComposeRequest:
    cleaned = validate(body, SPECS)
    reply = cleaned.get("in_reply_to", "")
    if "to" in cleaned and not cleaned["to"]:
        raise InvalidInput("invalid_value", f"to must list 1 to {MAX_TO} addresses", {"field": "to"})
    for name in ("to", "subject"):
        if not reply and not cleaned.get(name):
            raise InvalidInput("missing_field", f"{name} is required (unless replying)", {"field": name})
    to = tuple(dict.fromkeys(address(f"to[{n}]", a) for n, a in enumerate(cleaned.get("to", []))))
    text = cleaned["text"]
    if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
        raise InvalidInput("too_long", f"text must be at most {MAX_TEXT_BYTES} bytes", {"field": "text"})
    attachments = tuple(_attachment(f"attachments[{n}]", a) for n, a in enumerate(cleaned.get("attachments", [])))
    total = sum(len(a.data) for a in attachments)
    if total > max_attachment_bytes:
        raise too_large(total, max_attachment_bytes)
    return ComposeRequest(
        sender=address("from", cleaned["from"]) if cleaned.get("from") else "",
        to=to,
        subject=_no_control("subject", cleaned.get("subject", "")),
        text=text,
        in_reply_to=reply,
        attachments=attachments,
        forwards=tuple((f["message"], f["index"]) for f in cleaned.get("forward_attachments", [])),
    )
