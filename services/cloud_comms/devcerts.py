"""Development Direct certificates: `python -m services.cloud_comms.devcerts <dir>`.

Writes into <dir> (only what is missing; an existing set is kept):

    ca.cert.pem / ca.key.pem                    a development CA ("Clinic Dev Direct CA")
    anchors.pem                                 the trust anchors the listener accepts signers from
                                                (the development CA)
    agency-riverbend.cert.pem / .key.pem        Riverbend's Direct certificate (SAN email = its Direct
                                                addresses, SAN DNS = its Direct domain) and key
    partner-hisp.cert.pem / .key.pem            a "partner HISP" sender (sender@direct.partner.example)
                                                for testers: sign with it, encrypt to Riverbend's cert
    recipients/partner-hisp.cert.pem            the partner's certificate as a recipient certificate
                                                (CLOUD_DIRECT_RECIPIENT_CERTS): outbound messages to
                                                sender@direct.partner.example are encrypted for it

Development only: the keys are unprotected PEM files (0600). Production reads its own
certificates (CLOUD_DIRECT_CERTS_DIR or CLOUD_DIRECT_ANCHORS_FILE + CLOUD_DIRECT_IDENTITIES).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class DevIdentity:
    file_stem: str
    common_name: str
    emails: tuple[str, ...]
    domain: str


# The demo agencies' Direct addresses (services/directory/demo.py) and the testers' partner HISP.
AGENCIES = (
    DevIdentity(
        "agency-riverbend",
        "Riverbend Direct",
        ("intake@direct.riverbend.example", "dr.reyes@direct.riverbend.example"),
        "direct.riverbend.example",
    ),
    DevIdentity(
        "agency-lakeside", "Lakeside Direct", ("frontdesk@direct.lakeside.example",), "direct.lakeside.example"
    ),
)
PARTNER = DevIdentity(
    "partner-hisp", "Partner HISP (development)", ("sender@direct.partner.example",), "direct.partner.example"
)
VALID_DAYS = 730


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(
    common_name: str = "Clinic Dev Direct CA", *, days: int = VALID_DAYS, not_before: dt.datetime | None = None
):
    """(certificate, key) of a self-signed CA."""
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca_cert: x509.Certificate,
    ca_key,
    identity: DevIdentity,
    *,
    days: int = VALID_DAYS,
    not_before: dt.datetime | None = None,
):
    """(certificate, key) of a Direct end entity signed by the CA: SAN rfc822Name for each address
    and dNSName for the domain; digitalSignature + keyEncipherment; emailProtection."""
    key = _key()
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    sans: list[x509.GeneralName] = [x509.RFC822Name(e) for e in identity.emails]
    if identity.domain:
        sans.append(x509.DNSName(identity.domain))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write_identity(directory: Path, stem: str, cert: x509.Certificate, key) -> None:
    _write(directory / f"{stem}.key.pem", _pem_key(key), private=True)
    _write(directory / f"{stem}.cert.pem", cert.public_bytes(serialization.Encoding.PEM))


def complete(directory: Path) -> bool:
    names = ["ca.cert.pem", "ca.key.pem", "anchors.pem"]
    for ident in (*AGENCIES, PARTNER):
        names += [f"{ident.file_stem}.cert.pem", f"{ident.file_stem}.key.pem"]
    return all((directory / n).is_file() for n in names)


RECIPIENTS_DIR = "recipients"


def _ensure_recipients(directory: Path) -> None:
    """The partner's certificate among the recipient certificates (added to an older set too)."""
    target = directory / RECIPIENTS_DIR / f"{PARTNER.file_stem}.cert.pem"
    if not target.is_file():
        target.parent.mkdir(exist_ok=True)
        _write(target, (directory / f"{PARTNER.file_stem}.cert.pem").read_bytes())


def ensure(directory: Path) -> bool:
    """Generate the development set into `directory` unless complete; True when it generated."""
    if complete(directory):
        _ensure_recipients(directory)
        return False
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca()
    for ident in (*AGENCIES, PARTNER):
        cert, key = issue(ca_cert, ca_key, ident)
        write_identity(directory, ident.file_stem, cert, key)
    _write(directory / "ca.key.pem", _pem_key(ca_key), private=True)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(directory / "ca.cert.pem", ca_pem)
    _write(directory / "anchors.pem", ca_pem)  # last: its presence marks a complete set
    _ensure_recipients(directory)
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m services.cloud_comms.devcerts <dir>", file=sys.stderr)
        return 2
    directory = Path(args[0])
    made = ensure(directory)
    print(f"{'generated' if made else 'kept'} development Direct certificates in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
