"""MLLP over TLS on real sockets: the lab listener with NOTIFICATIONS_MLLP_TLS_* speaks TLS only
(the same framing inside the stream), refuses plaintext senders, requires a client certificate
from its client CA when one is set, and drops a client that never completes its handshake while
others are served. Certificates are generated into the test's folder."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from services.kit.transport import GrpcTls, development_grpc_tls
from services.notifications.lab import LAB_RESULTS, LabResults
from services.notifications.mllp import END_BLOCK, MllpServer, MllpTls, frame
from tests.e2e.lab_messages import oru
from tests.helpers import msa
from tests.integration.notifications_fixtures import DirectoryTable, make_components
from tests.waits import Worker


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> GrpcTls:
    """A CA and one certificate (serverAuth + clientAuth, SAN 127.0.0.1) signed by it."""
    return development_grpc_tls(tmp_path_factory.mktemp("mllp-pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> GrpcTls:
    """Another CA and its certificate: not trusted by the listener."""
    return development_grpc_tls(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture
def db(mongo_client, db_name):
    return mongo_client[db_name]


@contextmanager
def lab_listener(db, tls: MllpTls | None, **options) -> Iterator[MllpServer]:
    """The lab feature over the real database behind an MLLP listener, as the service runs it."""
    components = make_components(db, DirectoryTable())
    components.directory.lab_recipients = lambda agency_id: []  # no staff flagged for results
    feature = LabResults(components)
    feature.ensure_indexes()
    feature.attach()
    limits = {"max_message_bytes": 64 * 1024, "max_connections": 8, "idle_timeout_s": 30.0, **options}
    server = MllpServer("127.0.0.1", 0, components.message_types.acknowledge, tls=tls, **limits)
    stop = threading.Event()
    worker = Worker(server.run, stop, name="mllp-tls-listener").start()
    try:
        yield server
    finally:
        stop.set()
        worker.finish(15)  # the listener ended, without an error


def client_context(pki: GrpcTls, cert: GrpcTls | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        context.load_cert_chain(cert.cert_file, cert.key_file)
    return context


def read_ack(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Bytes up to the end block; b"" when the peer closed first."""
    sock.settimeout(timeout)
    received = b""
    while bytes([END_BLOCK]) not in received:
        chunk = sock.recv(4096)
        if not chunk:
            return b""
        received += chunk
    return received


def send_over_tls(port: int, context: ssl.SSLContext, control_id: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(frame(oru(control_id=control_id).encode()))
            return read_ack(tls)


def everything_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """What the peer sends before it closes (a timeout fails the test: the connection stayed open)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def stored(db) -> list[dict]:
    return list(db[LAB_RESULTS].find({}, {"_id": 1, "status": 1}))


def refused(port: int, context: ssl.SSLContext, control_id: str) -> bool:
    """True when the listener sends no ACK: the handshake or the first read fails, or it closes."""
    try:
        return send_over_tls(port, context, control_id) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def test_an_oru_over_tls_is_acknowledged_and_stored(db, pki):
    with lab_listener(db, MllpTls(pki.cert_file, pki.key_file)) as server:
        answer = send_over_tls(server.port, client_context(pki), "TLS-1")
    assert msa(answer)[:2] == ("AA", "TLS-1")
    assert [doc["status"] for doc in stored(db)] == ["final"]


def test_a_plaintext_sender_gets_no_ack_and_the_listener_keeps_serving(db, pki):
    with lab_listener(db, MllpTls(pki.cert_file, pki.key_file)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as plain:
            plain.sendall(frame(oru(control_id="PLAIN").encode()))
            assert b"MSA" not in everything_until_closed(plain)  # at most a TLS alert, never an HL7 answer
        assert stored(db) == []
        answer = send_over_tls(server.port, client_context(pki), "AFTER-PLAIN")
    assert msa(answer)[:2] == ("AA", "AFTER-PLAIN")
    assert len(stored(db)) == 1


def test_with_a_client_ca_a_sender_needs_a_certificate_from_it(db, pki, other_pki):
    tls = MllpTls(pki.cert_file, pki.key_file, client_ca_file=pki.ca_file)
    with lab_listener(db, tls) as server:
        assert refused(server.port, client_context(pki), "NO-CERT")
        assert refused(server.port, client_context(pki, cert=other_pki), "OTHER-CA")
        assert stored(db) == []
        answer = send_over_tls(server.port, client_context(pki, cert=pki), "MUTUAL")
    assert msa(answer)[:2] == ("AA", "MUTUAL")
    assert len(stored(db)) == 1


def test_a_client_that_never_handshakes_is_dropped_while_another_is_served(db, pki):
    with lab_listener(db, MllpTls(pki.cert_file, pki.key_file), handshake_timeout_s=1.0) as server:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        trickle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            trickle.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing more
            answer = send_over_tls(server.port, client_context(pki), "WHILE-WAITING")
            assert msa(answer)[:2] == ("AA", "WHILE-WAITING")
            started = time.monotonic()
            for sock in (silent, trickle):
                assert everything_until_closed(sock) == b""
            assert time.monotonic() - started < 5  # the handshake deadline, not the 30 s idle timeout
        finally:
            silent.close()
            trickle.close()


def test_the_certificate_files_are_read_at_start(tmp_path, pki):
    missing = MllpTls(tmp_path / "absent.pem", pki.key_file)
    with pytest.raises(OSError):
        MllpServer(
            "127.0.0.1", 0, lambda _raw: None, max_message_bytes=1024, max_connections=1, idle_timeout_s=1, tls=missing
        )
