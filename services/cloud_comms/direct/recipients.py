"""The certificates outbound Direct messages are encrypted for, configured per trusted address
(CLOUD_DIRECT_RECIPIENT_CERTS: a directory of PEM files; certificate discovery through DNS CERT or
LDAP is not done).

Each `*.pem` / `*.crt` file holds a partner's certificate, optionally followed by its
intermediates. It covers the addresses of its SAN rfc822Names (and subject emailAddress) and the
domains of its SAN dNSNames (an organizational certificate). A certificate is used only while it
chains to one of our trust anchors, is valid now and may be encrypted for (an RSA key: key
transport is RSA only; keyEncipherment when it has a key usage); otherwise it is skipped (logged
with the reason, never the certificate). `encryption_problem` applies the last two checks (and the
validity) alone, to an original signer's certificate an MDN may be encrypted for.

The directory is read again when its listing changes (names, sizes, modification times), so a
partner added there needs no restart. An address-bound certificate wins over a domain one.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from services.cloud_comms.direct import smime

log = logging.getLogger(__name__)

SUFFIXES = (".pem", ".crt")


@dataclass(frozen=True)
class Candidate:
    cert: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    emails: frozenset[str]
    domains: frozenset[str]


def candidate(pem: bytes) -> Candidate:
    """The certificate of a PEM bundle (the first one) with the rest as intermediates."""
    certs = x509.load_pem_x509_certificates(pem)
    emails, domains = smime.cert_names(certs[0])
    return Candidate(certs[0], tuple(certs[1:]), emails, domains)


def encryption_problem(cert: x509.Certificate) -> str:
    """Why `cert` cannot be encrypted for (not RSA, no keyEncipherment, not valid now), or ""."""
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return "certificate is expired or not yet valid"
    if not isinstance(cert.public_key(), rsa.RSAPublicKey):
        return "certificate key is not RSA (key transport needs RSA)"
    try:
        if not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment:
            return "certificate may not be encrypted for (key usage)"
    except x509.ExtensionNotFound:
        pass
    return ""


def usable(found: Candidate, anchors: list[x509.Certificate]) -> bool:
    try:
        smime.check_trust(found.cert, list(found.intermediates), anchors, usage="encrypt")
    except smime.UntrustedSigner as exc:
        log.warning("direct recipient certificate not used: %s", exc.reason, extra={"code": exc.kind})
        return False
    problem = encryption_problem(found.cert)
    if problem:
        log.warning("direct recipient certificate not used: %s", problem, extra={"code": "not_encryptable"})
        return False
    return True


def best_for(address: str, candidates: list[Candidate], anchors: list[x509.Certificate]) -> x509.Certificate | None:
    """The usable certificate naming `address`, else one naming its domain, else None."""
    address = address.lower()
    domain = address.rpartition("@")[2]
    for matches in (lambda c: address in c.emails, lambda c: domain in c.domains):
        for found in candidates:
            if matches(found) and usable(found, anchors):
                return found.cert
    return None


class RecipientCertificates:
    def __init__(self, directory: str, anchors: list[x509.Certificate]):
        self._directory = Path(directory) if directory else None
        self._anchors = anchors
        self._lock = threading.Lock()
        self._listing: tuple = ()
        self._candidates: list[Candidate] = []

    def _files(self) -> list[Path]:
        if self._directory is None or not self._directory.is_dir():
            return []
        return sorted(p for p in self._directory.iterdir() if p.suffix in SUFFIXES and p.is_file())

    def _current(self) -> list[Candidate]:
        files = self._files()
        listing = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        with self._lock:
            if listing != self._listing:
                self._candidates = self._load(files)
                self._listing = listing
            return self._candidates

    @staticmethod
    def _load(files: list[Path]) -> list[Candidate]:
        loaded = []
        for path in files:
            try:
                loaded.append(candidate(path.read_bytes()))
            except (OSError, ValueError) as exc:
                log.warning("direct recipient certificate unreadable", extra={"error_type": type(exc).__name__})
        return loaded

    def for_address(self, address: str, extra: Sequence[Candidate] = ()) -> x509.Certificate | None:
        """The certificate to encrypt for `address`: a configured one, else one of `extra` (the
        signer certificate of the message being answered), if usable now."""
        return best_for(address, self._current(), self._anchors) or best_for(address, list(extra), self._anchors)
