"""TLS on the Direct SMTP edge (STARTTLS, RFC 3207): the Direct Applicability Statement expects
HISPs to use TLS between them, inbound (our listener) and outbound (the relay we hand messages to).

Settings (read by services.cloud_comms.config with the service's other settings):

    CLOUD_SMTP_TLS_CERT_FILE     the listener's certificate chain (PEM); both or neither with
    CLOUD_SMTP_TLS_KEY_FILE      its private key (PEM). With them EHLO offers STARTTLS (TLS 1.2+).
    CLOUD_SMTP_REQUIRE_STARTTLS  1: every command but EHLO/NOOP/QUIT/STARTTLS before STARTTLS (MAIL
                                 first of all) is `530 5.7.0`; default 1 in production, 0 in development.
    CLOUD_SMTP_RELAY_CA_FILE     the CA(s) the relay's certificate must chain to (default: the
                                 system's trust store); a private CA's PEM file.

Outbound, STARTTLS is used whenever the relay offers it, and the relay's certificate is verified
(chain and host name): a relay that cannot be verified gets nothing. Production refuses a listener
without TLS at start, and sends nothing over a relay that does not offer STARTTLS (the send is
retried later), unless CLINIC_TRUSTED_NETWORK=1 says the network itself is protected.
"""

from __future__ import annotations

import os
import smtplib
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from services.kit.settings import TRUSTED_NETWORK, Env

CERT_FILE = "CLOUD_SMTP_TLS_CERT_FILE"
KEY_FILE = "CLOUD_SMTP_TLS_KEY_FILE"
REQUIRE_STARTTLS = "CLOUD_SMTP_REQUIRE_STARTTLS"
RELAY_CA_FILE = "CLOUD_SMTP_RELAY_CA_FILE"
MUST_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"
PLAINTEXT_LISTENER = f"the Direct SMTP listener ({CERT_FILE}, {KEY_FILE} unset)"
PLAINTEXT_RELAY = "the Direct SMTP relay when it does not offer STARTTLS"


@dataclass(frozen=True)
class ListenerTls:
    """The listener's certificate chain and key."""

    cert_file: Path
    key_file: Path

    def context(self) -> ssl.SSLContext:
        """A server context, TLS 1.2 at least; raises OSError / ssl.SSLError when the files do not load."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass(frozen=True)
class RelayTls:
    """How the relay is reached: `ca_file` ("" = system trust store) verifies it; `required`
    refuses a relay that does not offer STARTTLS."""

    ca_file: str = ""
    required: bool = False

    def context(self) -> ssl.SSLContext:
        """A verifying client context (chain and host name), TLS 1.2 at least."""
        context = ssl.create_default_context(cafile=self.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


@dataclass(frozen=True)
class SmtpTls:
    """TLS on both sides of the Direct edge; the default is plaintext (development)."""

    listener: ListenerTls | None = None
    require_starttls: bool = False
    relay: RelayTls = field(default_factory=RelayTls)
    # The links that may run without TLS (CLINIC_TRUSTED_NETWORK=1 names them at start).
    plaintext: tuple[str, ...] = ()


class PlaintextRelayRefused(smtplib.SMTPException):
    """The relay does not offer STARTTLS and TLS is required (an SMTPException: the send is retried)."""


def starttls(client: smtplib.SMTP, tls: RelayTls) -> bool:
    """Upgrade an open relay connection when the relay offers STARTTLS (True); raise
    PlaintextRelayRefused when it does not and `tls.required`, ssl.SSLError when its certificate
    does not verify (nothing has been sent then)."""
    client.ehlo_or_helo_if_needed()
    if client.has_extn("starttls"):
        client.starttls(context=tls.context())
        client.ehlo()
        return True
    if tls.required:
        raise PlaintextRelayRefused("the relay does not offer STARTTLS")
    return False


def _flag(env: Env, name: str, default: bool) -> tuple[bool, bool]:
    """(value, given) of a 0/1 setting."""
    given = bool((env.environ.get(name) or "").strip())
    return env.choice(name, ("0", "1"), "1" if default else "0") == "1", given


def _listener(env: Env) -> ListenerTls | None:
    cert, key = env.str(CERT_FILE, ""), env.str(KEY_FILE, "")
    if not cert and not key:
        return None
    if not cert or not key:
        env.problems.append(f"{CERT_FILE} and {KEY_FILE} are set together (STARTTLS takes both or neither)")
        return None
    tls = ListenerTls(Path(cert), Path(key))
    for name, path in ((CERT_FILE, cert), (KEY_FILE, key)):
        if not os.access(path, os.R_OK):
            env.problems.append(f"{name} cannot be read: {path}")
            return None
    try:
        tls.context()
    except (OSError, ssl.SSLError):
        env.problems.append(f"{CERT_FILE} and {KEY_FILE} do not load as a PEM certificate chain and its key")
        return None
    return tls


def _relay_ca(env: Env) -> str:
    ca_file = env.str(RELAY_CA_FILE, "")
    if ca_file:
        try:
            RelayTls(ca_file).context()
        except (OSError, ssl.SSLError):
            env.problems.append(f"{RELAY_CA_FILE} does not load as PEM CA certificates: {ca_file}")
    return ca_file


def load(env: Env, *, trusted_network: bool, relay_configured: bool) -> SmtpTls:
    """The SMTP TLS settings; problems (partial or unloadable files, plaintext in production
    without CLINIC_TRUSTED_NETWORK=1) go to `env.problems`."""
    listener = _listener(env)
    require, require_given = _flag(env, REQUIRE_STARTTLS, env.production)
    if require and listener is None:
        if require_given:
            env.problems.append(f"{REQUIRE_STARTTLS}=1 needs {CERT_FILE} and {KEY_FILE}")
        require = False
    plaintext = []
    if listener is None and not any(env.environ.get(n, "").strip() for n in (CERT_FILE, KEY_FILE)):
        plaintext.append(PLAINTEXT_LISTENER)
    if relay_configured:
        plaintext.append(PLAINTEXT_RELAY)
    if env.production and not trusted_network and PLAINTEXT_LISTENER in plaintext:
        env.problems.append(
            f"{PLAINTEXT_LISTENER} would carry PHI in plaintext, which production refuses; configure TLS"
            f" (docs/transport-security.md), or set {TRUSTED_NETWORK}=1 if the network itself is protected"
        )
    relay = RelayTls(ca_file=_relay_ca(env), required=env.production and not trusted_network)
    return SmtpTls(listener=listener, require_starttls=require, relay=relay, plaintext=tuple(plaintext))
