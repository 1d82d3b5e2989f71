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

from services.fax_simulator.pdf import text_pdf

RIVERBEND_INTAKE = "intake@direct.riverbend.example"
RIVERBEND_REYES = "dr.reyes@direct.riverbend.example"
PARTNER = "sender@direct.partner.example"
CCDA = b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3"><title>Referral note</title></ClinicalDocument>'
PDF = text_pdf(["Consult note", "Please see the attached referral."])  # one page: Send Fax takes it


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


FINAL_DELIVERY_OPTION = "X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true"


def with_headers(
    body: bytes,
    *,
    to: str,
    sender: str = PARTNER,
    subject: str = "Referral",
    message_id: str = "",
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    message_id = message_id or f"<{uuid.uuid4().hex}@direct.partner.example>"
    head = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n"
        "Date: Mon, 2 Mar 2026 10:00:00 +0000\r\n"
    )
    head += "".join(f"{name}: {value}\r\n" for name, value in extra)
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
    options: str = "",
) -> bytes:
    """`options`: a Disposition-Notification-Options value (with Disposition-Notification-To), as a
    sender asking for final delivery adds (FINAL_DELIVERY_OPTION)."""
    signed = sign(inner if inner is not None else inner_mime(), certs, signer, opaque=opaque)
    enveloped = encrypt(signed, certs / "agency-riverbend.cert.pem")
    extra = (("Disposition-Notification-To", sender), ("Disposition-Notification-Options", options)) if options else ()
    return with_headers(enveloped, to=to, sender=sender, subject=subject, message_id=message_id, extra=extra)


def send(port: int, message: bytes, *, to: list[str] | None = None, sender: str = PARTNER) -> tuple[int, bytes]:
    """(code, text) of the DATA reply (or of the first refusal); `sender` "" is the null sender
    (`MAIL FROM:<>`) of a bounce."""
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
    """The partner HISP's inbound SMTP (a real aiosmtpd server) collecting MDNs; it refuses the
    recipients in `refuse` with `550 5.1.1`."""

    def __init__(self, port: int, refuse: tuple[str, ...] = ()):
        self.messages: list[bytes] = []
        self.refuse = refuse
        self._lock = threading.Lock()
        self.controller = Controller(self, hostname="127.0.0.1", port=port)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address.lower() in self.refuse:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        with self._lock:
            self.messages.append(envelope.original_content)
        return "250 OK"

    def __enter__(self) -> Sink:
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()


def partner_decrypts(raw: bytes, certs: Path) -> bytes:
    """What we relayed (a message or an MDN), decrypted with the partner HISP's key by the openssl CLI."""
    recip, key = str(certs / "partner-hisp.cert.pem"), str(certs / "partner-hisp.key.pem")
    return openssl("cms", "-decrypt", "-recip", recip, "-inkey", key, data=raw)


def open_mdn(raw: bytes, certs: Path) -> dict:
    """Decrypt (partner key) and verify (dev anchors) an MDN with openssl; its disposition fields."""
    decrypted = partner_decrypts(raw, certs)
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


def openssl_identity(certs: Path, stem: str, address: str, *, ec: bool = False, key_usage: str = "") -> None:
    """`<stem>.cert.pem` / `.key.pem` issued by the development CA with the openssl CLI: SAN email
    `address`, an EC (P-256) or RSA key, keyUsage `key_usage` (default: digitalSignature, plus
    keyEncipherment for RSA)."""
    key, csr, ext = certs / f"{stem}.key.pem", certs / f"{stem}.csr.pem", certs / f"{stem}.ext"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] if ec else ["-newkey", "rsa:2048"]
    openssl("req", "-new", *new_key, "-nodes", "-keyout", str(key), "-subj", f"/CN={stem}", "-out", str(csr))
    usage = key_usage or ("digitalSignature" if ec else "digitalSignature,keyEncipherment")
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        f"keyUsage=critical,{usage}\n"
        "extendedKeyUsage=emailProtection\n"
        f"subjectAltName=email:{address}\n"
    )
    openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(certs / "ca.cert.pem"), "-CAkey", str(certs / "ca.key.pem")),
        *("-set_serial", str(uuid.uuid4().int >> 64), "-days", "30", "-sha256", "-extfile", str(ext)),
        *("-out", str(certs / f"{stem}.cert.pem")),
    )
