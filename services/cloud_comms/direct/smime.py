"""S/MIME for Direct (RFC 5751 + the Direct Applicability Statement), in-process only (no openssl CLI).

Inbound: `open_message(raw, identities, anchors)`:
1. the message must be `application/pkcs7-mime; smime-type=enveloped-data` (else NotEncrypted);
2. decrypted with the agency identity whose certificate it was encrypted for (cryptography's
   pkcs7_decrypt_der: RSA key transport, AES-CBC content encryption);
3. the decrypted entity must be signed: `multipart/signed` (protocol application/pkcs7-signature,
   detached) or `application/pkcs7-mime; smime-type=signed-data` (opaque);
4. the CMS SignedData is checked here with asn1crypto + cryptography (cryptography has no CMS
   verification): the content's digest equals the signed messageDigest attribute, the signature
   over the signed attributes (or the content) verifies with the signer certificate's key
   (RSA PKCS#1 v1.5, RSA-PSS, ECDSA; SHA-256/384/512, SHA-1 accepted for digest only of legacy
   senders is refused: Direct requires SHA-256+);
5. the signer certificate chains to a configured trust anchor (each link's signature, each
   issuer a CA, every certificate of the path within its validity now), has digitalSignature
   when it has a key usage, and (Direct) names the message's From address: a SAN rfc822Name equal
   to it (case-insensitive) or a SAN dNSName equal to its domain (organizational certificate).
Any failure raises a `Refused` subclass with an SMTP reply code and a reason a sender may read.

Outbound messages and MDNs are signed and encrypted by `outgoing.py`; the certificates they are
encrypted for pass the same `check_trust` (usage "encrypt").
"""

from __future__ import annotations

import base64
import datetime as dt
import email
import email.policy
import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import getaddresses

from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

PKCS7_MIME = ("application/pkcs7-mime", "application/x-pkcs7-mime")
PKCS7_SIGNATURE = ("application/pkcs7-signature", "application/x-pkcs7-signature")
DIGESTS = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
MAX_CHAIN = 6


class Refused(Exception):
    """A message refused at DATA: `code` and `status` (enhanced status) for the SMTP reply."""

    code = 554
    status = "5.7.1"
    kind = "refused"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.reason}"


class Malformed(Refused):
    status = "5.6.0"
    kind = "malformed"


class NotEncrypted(Refused):
    status = "5.7.1"
    kind = "not_encrypted"


class NotForUs(Refused):
    status = "5.7.5"
    kind = "decrypt_failed"


class NotSigned(Refused):
    status = "5.7.1"
    kind = "not_signed"


class BadSignature(Refused):
    status = "5.7.7"
    kind = "bad_signature"


class UntrustedSigner(Refused):
    status = "5.7.5"
    kind = "untrusted_signer"


class SignerMismatch(Refused):
    status = "5.7.1"
    kind = "signer_mismatch"


@dataclass(frozen=True)
class Identity:
    """An agency Direct identity: certificate, private key, and what it covers."""

    cert: x509.Certificate
    key: object
    emails: frozenset[str]
    domains: frozenset[str]

    def covers(self, address: str) -> bool:
        address = address.lower()
        return address in self.emails or address.rpartition("@")[2] in self.domains

    @staticmethod
    def load(cert_pem: bytes, key_pem: bytes) -> Identity:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[attr-defined]
            raise ValueError("the Direct certificate and key do not match")
        emails, domains = cert_names(cert)
        return Identity(cert, key, emails, domains)


def cert_names(cert: x509.Certificate) -> tuple[frozenset[str], frozenset[str]]:
    """(SAN rfc822Names, SAN dNSNames) lowercased; the subject emailAddress counts as an address."""
    emails: set[str] = set()
    domains: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        emails |= {e.lower() for e in san.get_values_for_type(x509.RFC822Name)}
        domains |= {d.lower() for d in san.get_values_for_type(x509.DNSName)}
    except x509.ExtensionNotFound:
        pass
    for attr in cert.subject.get_attributes_for_oid(x509.oid.NameOID.EMAIL_ADDRESS):
        emails.add(str(attr.value).lower())
    return frozenset(emails), frozenset(domains)


def load_anchors(pem: bytes) -> list[x509.Certificate]:
    anchors = x509.load_pem_x509_certificates(pem)
    if not anchors:
        raise ValueError("no trust anchor in the bundle")
    return anchors


@dataclass
class Opened:
    """A decrypted, verified message: its inner MIME entity and who signed it."""

    inner: EmailMessage
    inner_bytes: bytes
    signer: x509.Certificate
    identity: Identity


def parse(raw: bytes) -> EmailMessage:
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
    except Exception as exc:  # the parser is lenient; anything it raises is malformed input
        raise Malformed("the message cannot be parsed as MIME") from exc
    if msg.defects and any(type(d).__name__ in ("MissingHeaderBodySeparatorDefect",) for d in msg.defects):
        raise Malformed("the message headers are malformed")
    return msg  # type: ignore[return-value]


def from_address(msg: EmailMessage) -> str:
    try:
        values = msg.get_all("From") or []
        pairs = getaddresses([str(v) for v in values])
    except Exception as exc:
        raise Malformed("the From header is malformed") from exc
    addresses = [a for _, a in pairs if "@" in a]
    if len(addresses) != 1:
        raise Malformed("the message needs exactly one From address")
    return addresses[0].lower()


def _base64_body(part: EmailMessage) -> bytes:
    payload = part.get_payload(decode=False)
    if not isinstance(payload, str):
        raise Malformed("the S/MIME part has no body")
    cte = (part.get("Content-Transfer-Encoding") or "base64").strip().lower()
    if cte == "base64":
        try:
            return base64.b64decode(re.sub(rb"\s+", b"", payload.encode("ascii", "strict")), validate=True)
        except (ValueError, UnicodeEncodeError) as exc:
            raise Malformed("the S/MIME body is not valid base64") from exc
    if cte == "binary":
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            return data
    raise Malformed(f"unsupported transfer encoding {cte!r} for S/MIME")


def decrypt(msg: EmailMessage, identities: list[Identity], recipients: list[str]) -> tuple[bytes, Identity]:
    """The decrypted content of an enveloped-data message, with the identity that opened it."""
    ctype = msg.get_content_type()
    smime_type = (msg.get_param("smime-type", "", header="content-type") or "").lower()
    if ctype not in PKCS7_MIME or smime_type not in ("enveloped-data", ""):
        raise NotEncrypted("message is not encrypted: S/MIME enveloped-data (application/pkcs7-mime) required")
    der = _base64_body(msg)
    try:
        info = asn1_cms.ContentInfo.load(der)
        content_type = info["content_type"].native
    except Exception as exc:
        raise Malformed("the S/MIME body is not a CMS structure") from exc
    if content_type != "enveloped_data":
        raise NotEncrypted(f"message is not encrypted: CMS {content_type} where enveloped-data is required")
    candidates = [i for i in identities if any(i.covers(r) for r in recipients)] or []
    for identity in candidates:
        try:
            return pkcs7.pkcs7_decrypt_der(der, identity.cert, identity.key, []), identity  # type: ignore[arg-type]
        except ValueError:
            continue
        except Exception as exc:  # unsupported algorithms are reported, not crashed on
            raise NotForUs(f"cannot decrypt: {type(exc).__name__}") from exc
    raise NotForUs("cannot decrypt: not encrypted for the recipient's Direct certificate (or unsupported algorithm)")


def _split_signed(content: bytes, boundary: str) -> tuple[bytes, bytes]:
    """(first part's exact bytes, signature part's bytes) of a multipart/signed body."""
    delimiter = b"--" + boundary.encode("ascii", "strict")
    start = content.find(delimiter + b"\r\n")
    eol = b"\r\n"
    if start < 0:
        start = content.find(delimiter + b"\n")
        eol = b"\n"
    if start < 0:
        raise Malformed("multipart/signed without its boundary")
    body_start = start + len(delimiter) + len(eol)
    end = content.find(eol + delimiter, body_start)
    if end < 0:
        raise Malformed("multipart/signed without its second part")
    return content[body_start:end], content[end + len(eol) :]


def _canonical(data: bytes) -> bytes:
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def unwrap_signed(content: bytes) -> tuple[bytes, bytes | None, bytes]:
    """(signed content bytes, detached content or None, CMS SignedData DER) of a signed entity."""
    entity = parse(content)
    ctype = entity.get_content_type()
    if ctype == "multipart/signed":
        protocol = (entity.get_param("protocol", "", header="content-type") or "").lower()
        boundary = entity.get_boundary()
        if protocol not in PKCS7_SIGNATURE or not boundary:
            raise NotSigned("message is not signed: multipart/signed needs protocol application/pkcs7-signature")
        signed, _ = _split_signed(content, boundary)
        parts = entity.get_payload()
        if not isinstance(parts, list) or len(parts) != 2 or parts[1].get_content_type() not in PKCS7_SIGNATURE:
            raise NotSigned("message is not signed: multipart/signed without a pkcs7-signature part")
        return signed, signed, _base64_body(parts[1])
    if ctype in PKCS7_MIME:
        smime_type = (entity.get_param("smime-type", "", header="content-type") or "").lower()
        if smime_type not in ("signed-data", ""):
            raise NotSigned(f"message is not signed: inner smime-type {smime_type!r}")
        der = _base64_body(entity)
        return b"", None, der
    raise NotSigned("message is not signed: the encrypted content must be an S/MIME signed message")


def _verify_signature(cert: x509.Certificate, signature: bytes, data: bytes, digest: str, sig_algo: str) -> None:
    key = cert.public_key()
    hash_algo = DIGESTS[digest]()
    if isinstance(key, rsa.RSAPublicKey):
        if sig_algo == "rsassa_pss":
            key.verify(signature, data, padding.PSS(padding.MGF1(hash_algo), padding.PSS.AUTO), hash_algo)
        else:
            key.verify(signature, data, padding.PKCS1v15(), hash_algo)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, data, ec.ECDSA(hash_algo))
    else:
        raise BadSignature("signature algorithm not supported")


def verify_signed_data(der: bytes, detached: bytes | None) -> tuple[bytes, x509.Certificate, list[x509.Certificate]]:
    """(signed content, signer certificate, other certificates in the message) once every signer
    info verifies; BadSignature otherwise."""
    try:
        info = asn1_cms.ContentInfo.load(der)
        if info["content_type"].native != "signed_data":
            raise NotSigned("message is not signed: CMS signed-data required")
        signed = info["content"]
        signer_infos = list(signed["signer_infos"])
        certs = [
            x509.load_der_x509_certificate(c.chosen.dump())
            for c in (signed["certificates"] or [])
            if c.name == "certificate"
        ]
        encap = signed["encap_content_info"]["content"]
        content = detached if detached is not None else (encap.native if encap.native is not None else None)
    except Refused:
        raise
    except Exception as exc:
        raise BadSignature("the signature is not a valid CMS structure") from exc
    if content is None:
        raise BadSignature("the signed content is missing")
    if not signer_infos:
        raise NotSigned("message is not signed: no signer")
    signer_cert: x509.Certificate | None = None
    for si in signer_infos:
        sid = si["sid"]
        cert = _find_cert(certs, sid)
        if cert is None:
            raise BadSignature("the signer's certificate is not in the message")
        digest = si["digest_algorithm"]["algorithm"].native
        if digest not in DIGESTS:
            raise BadSignature(f"digest algorithm {digest} is not accepted (SHA-256 or stronger)")
        sig_algo = si["signature_algorithm"].signature_algo
        candidates = [content] if detached is None else [content, _canonical(content)]
        ok = False
        for data in candidates:
            h = hashes.Hash(DIGESTS[digest]())
            h.update(data)
            computed = h.finalize()
            attrs = si["signed_attrs"]
            try:
                if attrs.native is not None and len(attrs):
                    message_digest = next(
                        (a["values"][0].native for a in attrs if a["type"].native == "message_digest"), None
                    )
                    if message_digest != computed:
                        continue
                    to_verify = b"\x31" + attrs.dump()[1:]
                else:
                    to_verify = data
                _verify_signature(cert, si["signature"].native, to_verify, digest, sig_algo)
                ok = True
                break
            except InvalidSignature:
                continue
            except (ValueError, KeyError, TypeError) as exc:
                raise BadSignature("the signature cannot be checked") from exc
        if not ok:
            raise BadSignature(
                "signature verification failed: the message was altered or not signed by this certificate"
            )
        signer_cert = signer_cert or cert
    assert signer_cert is not None
    return content, signer_cert, certs


def _find_cert(certs: list[x509.Certificate], sid) -> x509.Certificate | None:
    if sid.name == "issuer_and_serial_number":
        serial = sid.chosen["serial_number"].native
        issuer_der = sid.chosen["issuer"].dump()
        for cert in certs:
            if cert.serial_number == serial and cert.issuer.public_bytes() == issuer_der:
                return cert
        for cert in certs:  # DER encodings of equal names may differ; fall back to the serial
            if cert.serial_number == serial:
                return cert
    elif sid.name == "subject_key_identifier":
        ski = sid.chosen.native
        for cert in certs:
            try:
                if cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == ski:
                    return cert
            except x509.ExtensionNotFound:
                continue
    return None


def _within(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def check_trust(
    signer: x509.Certificate,
    intermediates: list[x509.Certificate],
    anchors: list[x509.Certificate],
    now: dt.datetime | None = None,
    *,
    usage: str = "sign",
) -> None:
    """The certificate chains to an anchor, every certificate on the path within its validity, and
    its key usage (when it has one) allows `usage`: "sign" (a signer) or "encrypt" (a recipient's
    certificate outbound messages are encrypted for: keyEncipherment)."""
    now = now or dt.datetime.now(dt.UTC)
    if not _within(signer, now):
        raise UntrustedSigner("signer certificate is expired or not yet valid")
    try:
        ku = signer.extensions.get_extension_for_class(x509.KeyUsage).value
        if usage == "sign" and not ku.digital_signature:
            raise UntrustedSigner("signer certificate may not sign (key usage)")
        if usage == "encrypt" and not ku.key_encipherment:
            raise UntrustedSigner("certificate may not be encrypted for (key usage)")
    except x509.ExtensionNotFound:
        pass
    anchor_ders = {a.public_bytes(serialization.Encoding.DER) for a in anchors}
    current = signer
    for _ in range(MAX_CHAIN):
        if current.public_bytes(serialization.Encoding.DER) in anchor_ders:
            return
        anchor = next((a for a in anchors if a.subject == current.issuer and _issued_by(current, a)), None)
        if anchor is not None:
            if not _within(anchor, now):
                raise UntrustedSigner("the trust anchor of the signer certificate is expired")
            return
        issuer = next(
            (c for c in intermediates if c.subject == current.issuer and c != current and _issued_by(current, c)), None
        )
        if issuer is None:
            raise UntrustedSigner("signer certificate does not chain to a trusted anchor")
        if not _is_ca(issuer):
            raise UntrustedSigner("signer certificate chain has a non-CA issuer")
        if not _within(issuer, now):
            raise UntrustedSigner("an intermediate certificate of the signer is expired")
        current = issuer
    raise UntrustedSigner("signer certificate chain is too long")


def check_signer_address(signer: x509.Certificate, sender: str) -> None:
    emails, domains = cert_names(signer)
    if sender.lower() in emails or sender.lower().rpartition("@")[2] in domains:
        return
    raise SignerMismatch("signer certificate does not match the From address")


def open_message(
    msg: EmailMessage, identities: list[Identity], anchors: list[x509.Certificate], recipients: list[str]
) -> Opened:
    sender = from_address(msg)
    content, identity = decrypt(msg, identities, recipients)
    signed_bytes, detached, der = unwrap_signed(content)
    inner_bytes, signer, certs = verify_signed_data(der, detached)
    check_trust(signer, certs, anchors)
    check_signer_address(signer, sender)
    inner = parse(inner_bytes if detached is None else signed_bytes)
    return Opened(inner=inner, inner_bytes=inner_bytes, signer=signer, identity=identity)
