"""Direct messages built with the `openssl cms` CLI (independently of the service's code), sent with
smtplib, and an aiosmtpd sink standing in for the partner HISP that receives MDNs."""

from __future__ import annotations

import email
import email.policy
import smtplib
import subprocess
import threading
import uuid
from pathlib import Path

from aiosmtpd.controller import Controller

RIVERBEND_INTAKE = "intake@direct.riverbend.example"
RIVERBEND_REYES = "dr.reyes@direct.riverbend.example"
PARTNER = "sender@direct.partner.example"
CCDA = b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3"><title>Referral note</title></ClinicalDocument>'
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


def openssl(*args: str, data: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *args], input=data, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} {args[1]}: {done.stderr.decode(errors='replace')}")
    return done.stdout


def inner_mime(text: str = "Please see the attached referral.", attachments: bool = True) -> bytes:
    boundary = "inner_" + uuid.uuid4().hex
    lines = [f'Content-Type: multipart/mixed; boundary="{boundary}"', "", f"--{boundary}"]
    lines += ["Content-Type: text/plain; charset=utf-8", "", text, ""]
    if attachments:
        import base64

        for name, ctype, data in (("referral.xml", "application/xml", CCDA), ("note.pdf", "application/pdf", PDF)):
            lines += [f"--{boundary}", f"Content-Type: {ctype}", f'Content-Disposition: attachment; filename="{name}"']
            lines += ["Content-Transfer-Encoding: base64", "", base64.encodebytes(data).decode().strip(), ""]
    lines.append(f"--{boundary}--")
    return ("\r\n".join(lines) + "\r\n").encode()


def sign(content: bytes, certs: Path, signer: str = "partner-hisp", *, opaque: bool = False) -> bytes:
    args = ["cms", "-sign", "-signer", str(certs / f"{signer}.cert.pem"), "-inkey", str(certs / f"{signer}.key.pem")]
    args += ["-md", "sha256"] + (["-nodetach"] if opaque else [])
    return openssl(*args, data=content)


def encrypt(content: bytes, recipient_cert: Path) -> bytes:
    return openssl("cms", "-encrypt", "-aes256", str(recipient_cert), data=content)


def with_headers(
    body: bytes, *, to: str, sender: str = PARTNER, subject: str = "Referral", message_id: str = ""
) -> bytes:
    message_id = message_id or f"<{uuid.uuid4().hex}@direct.partner.example>"
    head = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n"
        "Date: Mon, 2 Mar 2026 10:00:00 +0000\r\n"
    )
    return head.encode() + body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def direct_message(
    certs: Path,
    *,
    to: str = RIVERBEND_INTAKE,
    message_id: str = "",
    signer: str = "partner-hisp",
    sender: str = PARTNER,
    opaque: bool = False,
    subject: str = "Referral",
    inner: bytes | None = None,
) -> bytes:
    signed = sign(inner if inner is not None else inner_mime(), certs, signer, opaque=opaque)
    enveloped = encrypt(signed, certs / "agency-riverbend.cert.pem")
    return with_headers(enveloped, to=to, sender=sender, subject=subject, message_id=message_id)


def send(port: int, message: bytes, *, to: list[str] | None = None, sender: str = PARTNER) -> tuple[int, bytes]:
    """(code, text) of the DATA reply (or of the first refusal)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        try:
            client.sendmail(sender, to or [RIVERBEND_INTAKE], message)
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            return code, text
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code, exc.smtp_error
        except smtplib.SMTPSenderRefused as exc:
            return exc.smtp_code, exc.smtp_error
        return 250, b"ok"


class Sink:
    """The partner HISP's inbound SMTP (a real aiosmtpd server) collecting MDNs."""

    def __init__(self, port: int):
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self.controller = Controller(self, hostname="127.0.0.1", port=port)

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        with self._lock:
            self.messages.append(envelope.original_content)
        return "250 OK"

    def __enter__(self) -> Sink:
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()


def open_mdn(raw: bytes, certs: Path) -> dict:
    """Decrypt (partner key) and verify (dev anchors) an MDN with openssl; its disposition fields."""
    decrypted = openssl(
        "cms",
        "-decrypt",
        "-recip",
        str(certs / "partner-hisp.cert.pem"),
        "-inkey",
        str(certs / "partner-hisp.key.pem"),
        data=raw,
    )
    verified = openssl("cms", "-verify", "-CAfile", str(certs / "anchors.pem"), "-purpose", "any", data=decrypted)
    report = email.message_from_bytes(verified, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    fields: dict = {}
    for part in report.walk():
        if part.get_content_type() == "message/disposition-notification":
            payload = part.get_payload()
            text = payload if isinstance(payload, str) else "".join(p.as_string() for p in payload)
            for line in text.splitlines():
                name, _, value = line.partition(":")
                if value:
                    fields[name.strip().lower()] = value.strip()
    outer = email.message_from_bytes(raw, policy=email.policy.default)
    fields["_to"] = str(outer["To"])
    fields["_from"] = str(outer["From"])
    return fields
