"""The MLLP listener: framing (0x0B message 0x1C 0x0D), one thread per connection, an HL7 ACK for
every message, dispatch by (message type, trigger event) to the handler a feature registered.

How to add a message type: in your feature's `attach()`,

    self.components.message_types.register("SIU", "S12", self.handle_siu)

The handler gets an `hl7v2.InboundMessage`, returns when the message is durably stored (the ACK is
AA), or raises `hl7v2.Hl7Rejection` (AE/AR with its reason). Outages (the database, directory)
become AR 207 "try again"; any other exception is logged (never the message) and answered the same.

With `tls` (an `MllpTls`) the listener speaks TLS 1.2 or later, the same framing inside the TLS
stream (MLLP over TLS, as interface engines do it), optionally requiring a client certificate from
one CA. The handshake runs on the connection's own thread under a deadline, so a client that never
finishes it holds its slot no longer than `handshake_timeout_s`.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pymongo.errors import PyMongoError

from services.kit.errors import DomainError, Unavailable
from services.notifications import hl7v2, interface_metrics

log = logging.getLogger(__name__)

START_BLOCK = 0x0B
END_BLOCK = 0x1C
CARRIAGE_RETURN = 0x0D
READ_SIZE = 64 * 1024
HANDSHAKE_TIMEOUT_S = 10.0

Handler = Callable[[hl7v2.InboundMessage], None]


class FrameTooLarge(Exception):
    """A frame grew past the size limit before its end block arrived; `head` is its beginning (the
    MSH, so the refusal can still echo MSH-10)."""

    def __init__(self, head: bytes = b""):
        super().__init__("frame too large")
        self.head = head


class FrameDecoder:
    """Bytes in, complete frames out. Bytes outside a frame (the CR after an end block, line noise)
    are dropped; a frame may arrive over many reads and several frames in one read. A start block
    inside an unfinished frame begins a new frame: the unfinished one (a sender that gave up
    mid-message and started over) is dropped and counted in `abandoned`."""

    def __init__(self, max_message_bytes: int):
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._in_frame = False
        # Bytes dropped since the last frame began (the CR after an end block, noise).
        self.dropped = 0
        self.abandoned = 0

    def feed(self, data: bytes) -> list[bytes]:
        frames: list[bytes] = []
        view = memoryview(data)
        position = 0
        while position < len(view):
            if not self._in_frame:
                start = data.find(START_BLOCK, position)
                if start == -1:
                    self.dropped += len(view) - position
                    break
                self.dropped = 0  # junk is counted between frames only: a long-lived connection never adds up
                self._in_frame = True
                position = start + 1
                continue
            end = data.find(END_BLOCK, position)
            restart = data.find(START_BLOCK, position, len(view) if end == -1 else end)
            if restart != -1:
                self._buffer.clear()
                self.abandoned += 1
                position = restart + 1
                continue
            chunk_end = len(view) if end == -1 else end
            if len(self._buffer) + chunk_end - position > self.max_message_bytes:
                head = (bytes(self._buffer[:8192]) + bytes(view[position : position + 8192]))[:8192]
                self._buffer.clear()
                self._in_frame = False
                raise FrameTooLarge(head)
            self._buffer += view[position:chunk_end]
            if end == -1:
                break
            frames.append(bytes(self._buffer))
            self._buffer.clear()
            self._in_frame = False
            position = end + 1
        return frames

    @property
    def pending(self) -> int:
        """Bytes of a frame begun but not finished."""
        return len(self._buffer) if self._in_frame else 0


def frame(payload: bytes) -> bytes:
    return bytes([START_BLOCK]) + payload + bytes([END_BLOCK, CARRIAGE_RETURN])


class MessageTypes:
    """(message type, trigger event) -> handler: the one place a feature registers what it takes.
    `processing_id` is this interface's MSH-11 (P in production): other messages are refused AR."""

    def __init__(self, processing_id: str = "P") -> None:
        self.handlers: dict[tuple[str, str], Handler] = {}
        self.processing_id = processing_id

    def register(self, message_type: str, trigger: str, handler: Handler) -> None:
        key = (message_type, trigger)
        if key in self.handlers:
            raise ValueError(f"{message_type}^{trigger} already has a handler")
        self.handlers[key] = handler

    def acknowledge(self, raw: bytes) -> bytes | None:
        """Handle one frame; the acknowledgement to send back, or None when the sender asked for
        none in this case (enhanced mode, MSH-15 NE/ER/SU). Never raises."""
        started = time.perf_counter()
        try:
            message = hl7v2.read_message(raw, processing_id=self.processing_id)
            self._handle(message)
            header, code, ack = message.header, hl7v2.ACCEPT, hl7v2.build_ack(message.header)
        except hl7v2.Hl7Rejection as rejection:
            header, code, ack = rejection.header, rejection.ack_code, hl7v2.rejection_ack(rejection)
            log.info("message refused", extra={"code": f"{rejection.ack_code} {rejection.error_code}"})
        return self._answer(header, code, ack, time.perf_counter() - started)

    def _handle(self, message: hl7v2.InboundMessage) -> None:
        handler = self.handlers.get((message.header.message_type, message.header.trigger))
        if handler is None:
            known = {t for t, _ in self.handlers}
            code = hl7v2.UNSUPPORTED_EVENT_CODE if message.header.message_type in known else (
                hl7v2.UNSUPPORTED_MESSAGE_TYPE
            )
            raise hl7v2.reject(code, "message type or trigger event not accepted here", "MSH^1^9").with_header(
                message.header
            )
        try:
            handler(message)
        except hl7v2.Hl7Rejection as rejection:
            raise rejection.with_header(message.header) from None
        except (PyMongoError, Unavailable) as exc:
            log.warning("message not stored, outage", extra={"error_type": type(exc).__name__})
            raise hl7v2.reject(
                hl7v2.APPLICATION_INTERNAL_ERROR, "temporarily unable to store the message; send it again"
            ).with_header(message.header) from None
        except DomainError as exc:
            raise hl7v2.error(hl7v2.APPLICATION_INTERNAL_ERROR, exc.message).with_header(message.header) from None
        except Exception:
            log.exception("message handler failed", extra={"route": message.header.message_type})
            raise hl7v2.reject(
                hl7v2.APPLICATION_INTERNAL_ERROR, "internal error; the message was not stored"
            ).with_header(message.header) from None

    @staticmethod
    def _answer(header: hl7v2.Header | None, code: str, ack: bytes, seconds: float) -> bytes | None:
        """Trace the message for the interface team (ids and codes, never content) and apply MSH-15."""
        sent = header is None or header.wants_ack(code)
        shown = hl7v2.COMMIT_CODES[code] if header is not None and header.enhanced_mode else code
        message_type = f"{header.message_type}^{header.trigger}" if header is not None else ""
        log.info(
            "hl7 message acknowledged" if sent else "hl7 message handled, no acknowledgement requested",
            extra={
                "sending_facility": header.sending_facility if header else "",
                "receiving_facility": header.receiving_facility if header else "",
                "control_id": header.control_id if header else "",
                "message_type": message_type,
                "ack_code": shown,
                "duration_ms": round(seconds * 1000, 2),
            },
        )
        interface_metrics.count_message(header.sending_facility if header else "", message_type, shown, seconds)
        return ack if sent else None


@dataclass(frozen=True)
class MllpTls:
    """The listener's certificate and key, and the CA its clients' certificates must come from
    (None: no client certificate asked for)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.2 minimum; with `client_ca_file`, a client certificate from that CA is required
        (mutual TLS). Raises OSError/ssl.SSLError when the files do not hold what they should."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            context.load_verify_locations(cafile=self.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class MllpServer:
    """A threaded MLLP listener: one thread per connection up to `max_connections` (a connection
    beyond that is closed at once), each closed after `idle_timeout_s` without a byte. On stop it
    accepts no more connections; each connection finishes the message it is handling, sends its
    ACK and closes. With `tls` each connection first completes a TLS handshake within
    `handshake_timeout_s` or is closed without an answer."""

    def __init__(  # noqa: PLR0913 - the listener's limits, each a setting
        self,
        host: str,
        port: int,
        acknowledge: Callable[[bytes], bytes | None],
        *,
        max_message_bytes: int,
        max_connections: int,
        idle_timeout_s: float,
        tls: MllpTls | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    ):
        self.acknowledge = acknowledge
        self._tls_context = tls.server_context() if tls is not None else None
        self.handshake_timeout_s = handshake_timeout_s
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._socket = socket.create_server((host, port), reuse_port=False, backlog=128)
        self._socket.settimeout(0.5)
        self.port = self._socket.getsockname()[1]
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def run(self, stop: threading.Event) -> None:
        """Accept connections until `stop` is set, then wait for open connections to finish."""
        secure = self._tls_context is not None
        log.info("MLLP listener listening over TLS" if secure else "MLLP listener listening", extra={"port": self.port})
        try:
            while not stop.is_set():
                try:
                    conn, _address = self._socket.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if stop.is_set():
                        break
                    raise
                if not self._slots.acquire(blocking=False):
                    log.warning("MLLP connection refused: too many open connections")
                    conn.close()
                    continue
                thread = threading.Thread(target=self._serve, args=(conn, stop), name="mllp-conn", daemon=True)
                with self._lock:
                    self._threads.add(thread)
                thread.start()
        finally:
            self._socket.close()
            with self._lock:
                threads = list(self._threads)
            for thread in threads:
                thread.join(timeout=10)

    def _handshake(self, conn: socket.socket, stop: threading.Event) -> ssl.SSLSocket | None:
        """`conn` wrapped in TLS once the handshake completes; None (the caller closes `conn`) when it
        fails, the deadline passes or the listener stops first. Non-blocking with one deadline: a
        client trickling bytes cannot stretch the handshake past `handshake_timeout_s`."""
        assert self._tls_context is not None
        conn.setblocking(False)
        tls = self._tls_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        deadline = time.monotonic() + self.handshake_timeout_s
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                waiting = ([tls], [])
            except ssl.SSLWantWriteError:
                waiting = ([], [tls])
            except (ssl.SSLError, OSError) as exc:
                log.info("MLLP TLS handshake failed, connection closed", extra={"error_type": type(exc).__name__})
                tls.close()
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.is_set():
                log.info("MLLP TLS handshake not completed in time, connection closed")
                tls.close()
                return None
            select.select(*waiting, [], min(remaining, 0.5))

    def _serve(self, conn: socket.socket, stop: threading.Event) -> None:
        decoder = FrameDecoder(self.max_message_bytes)
        try:
            if self._tls_context is not None:
                secured = self._handshake(conn, stop)
                if secured is None:
                    return
                conn = secured
            conn.settimeout(0.5)
            last_byte = time.monotonic()
            while not stop.is_set():
                try:
                    data = conn.recv(READ_SIZE)
                except TimeoutError:
                    if time.monotonic() - last_byte > self.idle_timeout_s:
                        log.info("MLLP connection idle, closed")
                        return
                    continue
                if not data:
                    return
                last_byte = time.monotonic()
                try:
                    frames = decoder.feed(data)
                except FrameTooLarge as too_large:
                    rejection = hl7v2.reject(
                        hl7v2.APPLICATION_INTERNAL_ERROR, f"message exceeds {self.max_message_bytes} bytes"
                    )
                    rejection.header = hl7v2.sniff_header(too_large.head)
                    conn.sendall(frame(hl7v2.rejection_ack(rejection)))
                    log.warning("MLLP message too large, connection closed")
                    return
                if decoder.dropped > self.max_message_bytes:
                    log.warning("MLLP connection sent bytes outside frames, closed")
                    return
                for payload in frames:
                    answer = self.acknowledge(payload)
                    if answer is not None:
                        conn.sendall(frame(answer))
        except OSError as exc:
            log.info("MLLP connection ended", extra={"error_type": type(exc).__name__})
        finally:
            conn.close()
            self._slots.release()
            with self._lock:
                self._threads.discard(threading.current_thread())
