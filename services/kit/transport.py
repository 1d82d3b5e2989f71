"""Transport security between the system's own parts: gRPC over mutual TLS.

Every service's gRPC server and every channel to one decide secure or plaintext here and
nowhere else. The certificates come from three settings, all or none:

    GRPC_TLS_CERT_FILE  this process's certificate (PEM; server and client: serverAuth + clientAuth)
    GRPC_TLS_KEY_FILE   its private key (PEM)
    GRPC_TLS_CA_FILE    the CA that signs every service's certificate (PEM)

With them a server serves TLS only and requires a client certificate from that CA, and a channel
presents this process's certificate and trusts only that CA. Without them both sides speak
plaintext, which production refuses unless CLINIC_TRUSTED_NETWORK=1 (services.kit.settings).
`make run` generates a development CA and one service certificate into the run folder
(services.launcher), so development runs over mTLS too.

A process talking to a stack it did not start from its own environment (a test driving the
launcher's stack) says which certificates to use with `use_grpc_tls(tls)` while it opens
channels, or passes `tls=` explicitly.
"""

from __future__ import annotations

import contextvars
import datetime
import ipaddress
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = [
    "FROM_ENVIRONMENT",
    "GRPC_TLS_VARIABLES",
    "GrpcTls",
    "add_port",
    "development_grpc_tls",
    "grpc_tls",
    "grpc_tls_from",
    "open_channel",
    "use_grpc_tls",
]

GRPC_TLS_VARIABLES = ("GRPC_TLS_CERT_FILE", "GRPC_TLS_KEY_FILE", "GRPC_TLS_CA_FILE")


@dataclass(frozen=True)
class GrpcTls:
    """The certificate, key and CA of one process's gRPC mTLS."""

    cert_file: Path
    key_file: Path
    ca_file: Path

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return self.cert_file.read_bytes(), self.key_file.read_bytes(), self.ca_file.read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS with a client certificate required and checked against the CA."""
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials(((key, cert),), root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Trust only the CA; present this process's certificate."""
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def environ(self) -> dict[str, str]:
        """The settings that give a process these certificates."""
        return dict(zip(GRPC_TLS_VARIABLES, (str(self.cert_file), str(self.key_file), str(self.ca_file)), strict=True))


class _FromEnvironment:
    def __repr__(self) -> str:
        return "FROM_ENVIRONMENT"


FROM_ENVIRONMENT = _FromEnvironment()
"""Default of every `tls=` argument: `grpc_tls()`, the process's own configuration."""

_override: contextvars.ContextVar[GrpcTls | None | _FromEnvironment] = contextvars.ContextVar(
    "grpc_tls_override", default=FROM_ENVIRONMENT
)


def grpc_tls_from(environ: Mapping[str, str], problems: list[str] | None = None) -> GrpcTls | None:
    """GrpcTls from GRPC_TLS_* in `environ`; None when none is set. A partial set or an unreadable
    file is a problem (appended to `problems`, or ValueError when no list is given)."""
    values = {name: (environ.get(name) or "").strip() for name in GRPC_TLS_VARIABLES}
    given = [name for name, value in values.items() if value]
    if not given:
        return None
    found: list[str] = []
    if len(given) != len(GRPC_TLS_VARIABLES):
        missing = [name for name in GRPC_TLS_VARIABLES if name not in given]
        found.append(f"{', '.join(missing)} must be set with {', '.join(given)} (gRPC TLS takes all three or none)")
    for name in given:
        if not os.access(values[name], os.R_OK):
            found.append(f"{name} cannot be read: {values[name]}")
    if found:
        if problems is None:
            raise ValueError("; ".join(found))
        problems.extend(found)
        return None
    return GrpcTls(*(Path(values[name]) for name in GRPC_TLS_VARIABLES))


def grpc_tls() -> GrpcTls | None:
    """The gRPC TLS in effect: `use_grpc_tls`'s, else the process environment's (None: plaintext)."""
    override = _override.get()
    if override is not FROM_ENVIRONMENT:
        return override  # type: ignore[return-value]
    return grpc_tls_from(os.environ)


@contextmanager
def use_grpc_tls(tls: GrpcTls | None) -> Iterator[None]:
    """Servers and channels made in this block (this thread or task) use `tls` (None: plaintext)."""
    token = _override.set(tls)
    try:
        yield
    finally:
        _override.reset(token)


def _resolve(tls: GrpcTls | None | _FromEnvironment) -> GrpcTls | None:
    return grpc_tls() if tls is FROM_ENVIRONMENT else tls  # type: ignore[return-value]


def open_channel(
    target: str,
    options: Sequence[tuple[str, object]] = (),
    *,
    tls: GrpcTls | None | _FromEnvironment = FROM_ENVIRONMENT,
) -> grpc.Channel:
    """A channel to `target`: mTLS when TLS is configured, plaintext otherwise."""
    resolved = _resolve(tls)
    if resolved is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, resolved.channel_credentials(), options=list(options))


def add_port(
    server: grpc.Server, address: str, *, tls: GrpcTls | None | _FromEnvironment = FROM_ENVIRONMENT
) -> tuple[int, bool]:
    """Bind `address` on `server`: (port, secure). mTLS only when TLS is configured, else plaintext."""
    resolved = _resolve(tls)
    if resolved is None:
        return server.add_insecure_port(address), False
    return server.add_secure_port(address, resolved.server_credentials()), True


DEV_HOSTS = ("localhost", "127.0.0.1")


def development_grpc_tls(folder: Path, hosts: Sequence[str] = DEV_HOSTS, *, days: int = 365) -> GrpcTls:
    """A development CA and one service certificate (SAN `hosts`) in `folder` (0700, keys 0600).
    Kept while the certificate is valid for another week; made again otherwise. The CA's key is not
    kept (nothing else is signed with it). Development and
    tests only: production gets its certificates from the operator (docs/transport-security.md)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    tls = GrpcTls(folder / "service.pem", folder / "service.key", folder / "ca.pem")
    if tls.key_file.exists() and tls.ca_file.exists() and _still_valid(tls.cert_file, days=7):
        return tls
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Clinic development service CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clinic-service")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(tls.ca_file, ca_cert.public_bytes(pem))
    _write_private(tls.key_file, key_pem)
    _write_private(tls.cert_file, cert.public_bytes(pem))  # last: its presence means the set is whole
    return tls


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _still_valid(cert_file: Path, *, days: int) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.kit.transport health HOST:PORT`: exit 0 when the server's gRPC health
    says SERVING, over the same mTLS or plaintext as the services (a container health check)."""
    import sys

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "health":
        print("usage: python -m services.kit.transport health HOST:PORT", file=sys.stderr)
        return 2
    with open_channel(args[1]) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError as exc:
            print(f"not healthy: {exc.code().name}", file=sys.stderr)
            return 1
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    raise SystemExit(main())
