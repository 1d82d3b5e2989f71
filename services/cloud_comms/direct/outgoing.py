"""What leaves this HISP (outbound Direct messages and MDNs alike), one path for both:

- `sign_and_encrypt(entity, identity, recipient_certs)`: the MIME entity signed with the agency's
  Direct identity (detached `multipart/signed`, SHA-256, protocol `application/pkcs7-signature`
  as RFC 5751 names it), then encrypted (`application/pkcs7-mime; smime-type=enveloped-data`,
  AES-256-CBC, RSA key transport) for every recipient certificate;
- `message(headers, body)`: the outer RFC 5322 headers (values on one line each) and that body,
  CRLF line ends;
- `send(...)`: one SMTP transaction through the relay; the recipients it refused, by address.
  STARTTLS first whenever the relay offers it, the relay's certificate verified; with
  `tls.required` (production) nothing is sent to a relay that does not offer it
  (services/cloud_comms/direct/smtp_tls.py).
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence
from email.header import Header

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from services.cloud_comms.direct.smime import Identity
from services.cloud_comms.direct.smtp_tls import RelayTls, starttls

LEGACY_SIGNATURE_TYPE = b"application/x-pkcs7-signature"
SIGNATURE_TYPE = b"application/pkcs7-signature"


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _standard_signature_type(signed: bytes) -> bytes:
    """cryptography labels the signature `application/x-pkcs7-signature`; RFC 5751 (and Direct)
    name it `application/pkcs7-signature`. Only the multipart/signed header and the signature
    part's header change: both are outside the signed content (the first part)."""
    head, sep, rest = signed.partition(b"\r\n\r\n")
    head = head.replace(LEGACY_SIGNATURE_TYPE, SIGNATURE_TYPE)
    legacy, standard = b"Content-Type: " + LEGACY_SIGNATURE_TYPE, b"Content-Type: " + SIGNATURE_TYPE
    at = rest.rfind(legacy)
    if at >= 0:
        rest = rest[:at] + standard + rest[at + len(legacy) :]
    return head + sep + rest


def sign_and_encrypt(entity: bytes, identity: Identity, recipient_certs: Sequence[x509.Certificate]) -> bytes:
    """The S/MIME enveloped-data entity (with its Content-Type headers) of `entity` (CRLF MIME)."""
    if not recipient_certs:
        raise ValueError("no recipient certificate to encrypt for")
    signed = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(crlf(entity))
        .add_signer(identity.cert, identity.key, hashes.SHA256())  # type: ignore[arg-type]
        .sign(Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature])
    )
    builder = pkcs7.PKCS7EnvelopeBuilder().set_data(_standard_signature_type(crlf(signed)))
    seen: set[bytes] = set()
    for cert in recipient_certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            builder = builder.add_recipient(cert)
    builder = builder.set_content_encryption_algorithm(pkcs7.algorithms.AES256)  # type: ignore[attr-defined]
    return crlf(builder.encrypt(Encoding.SMIME, []))


def header_value(name: str, value: str, limit: int = 900) -> str:
    """A header value whose line breaks cannot start another header (whitespace collapsed), at
    most `limit` characters, RFC 2047-encoded when it is not ASCII."""
    value = " ".join(value.split())[:limit]
    return value if value.isascii() else Header(value, "utf-8", header_name=name).encode(linesep="\r\n")


def message(headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    head = "".join(f"{name}: {header_value(name, value)}\r\n" for name, value in headers)
    return head.encode("ascii") + crlf(body)


def send(
    host: str,
    port: int,
    *,
    envelope_from: str,
    to: Sequence[str],
    message: bytes,
    local_hostname: str | None = None,
    timeout_s: float = 30.0,
    tls: RelayTls | None = None,
) -> dict[str, tuple[int, bytes]]:
    """Hand `message` to the relay. Returns the recipients it refused ({} = all accepted); raises
    smtplib.SMTPException / OSError (ssl.SSLError among them: the relay's certificate did not
    verify) when the transaction failed as a whole."""
    with smtplib.SMTP(host, port, local_hostname=local_hostname, timeout=timeout_s) as client:
        starttls(client, tls or RelayTls())
        return client.sendmail(envelope_from, list(to), message)
