"""The SMTP listener (aiosmtpd): the agency's HISP edge for inbound Direct.

- RCPT TO: only addresses directory knows as a Direct address (ResolveCloudAddress) AND covered by
  one of this HISP's agency certificates; anything else is `550 5.1.1` (nothing stored). Directory
  unreachable: `451 4.4.3` (the sender retries).
- SIZE: announced (CLOUD_DIRECT_MAX_MESSAGE_BYTES); a larger message is `552` (aiosmtpd refuses
  both the MAIL SIZE= declaration and the DATA that grows past it).
- DATA: handed to `receive(envelope_from, recipients, raw, peer)` in a worker thread (blocking
  database, directory and crypto work stays off the event loop); its reply is the SMTP reply.
- STARTTLS (services/cloud_comms/direct/smtp_tls.py): offered when the listener has a certificate;
  with `require_starttls`, MAIL (any command but EHLO/NOOP/QUIT/STARTTLS) before it is
  `530 5.7.0` (RFC 3207), so nothing is received in plaintext.
The listener keeps serving after every refusal; an unexpected error is `451 4.3.0`, logged.
aiosmtpd's own `mail.log` logger (every command line at INFO: peers and addresses) is raised to
WARNING: the listener logs its outcomes itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from services.cloud_comms.direct.smtp_tls import MUST_STARTTLS, SmtpTls

log = logging.getLogger(__name__)


def quiet_smtp_log() -> None:
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, logging.getLogger().level))


class DirectHandler:
    def __init__(self, resolve: Callable[[str], Any], receive: Callable[..., str]):
        self._resolve = resolve
        self._receive = receive

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        loop = asyncio.get_running_loop()
        try:
            resolved = await loop.run_in_executor(None, self._resolve, address)
        except Exception:
            log.warning("direct recipient lookup failed", exc_info=True)
            return "451 4.4.3 directory unavailable, try again later"
        if resolved is None:
            return "550 5.1.1 recipient address unknown"
        if not hasattr(envelope, "cloud_recipients"):
            envelope.cloud_recipients = []
        envelope.cloud_recipients.append(resolved)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 recipient ok"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        loop = asyncio.get_running_loop()
        peer = session.peer[0] if isinstance(session.peer, tuple) and session.peer else ""
        raw = envelope.original_content or b""
        try:
            return await loop.run_in_executor(
                None,
                self._receive,
                envelope.mail_from or "",
                list(getattr(envelope, "cloud_recipients", [])),
                raw,
                peer,
            )
        except Exception:
            log.exception("direct message handling failed")
            return "451 4.3.0 temporary failure, try again later"


class DirectSMTP(SMTP):
    """aiosmtpd's session, its STARTTLS refusal carrying the enhanced status code (RFC 3207: 5.7.0)."""

    async def push(self, status):
        if status == "530 Must issue a STARTTLS command first":
            status = MUST_STARTTLS
        await super().push(status)


class SmtpListener:
    """The listener as the process runs it: `run(stop_event)` binds, serves until stopped;
    `ready(timeout)` says it is bound."""

    def __init__(
        self,
        handler: DirectHandler,
        host: str,
        port: int,
        *,
        max_message_bytes: int,
        hostname: str,
        tls: SmtpTls | None = None,
    ):
        self._handler = handler
        self._tls = tls or SmtpTls()
        self._tls_context = None
        self._host = host
        self._port = port
        self._max = max_message_bytes
        self._hostname = hostname
        self._ready = threading.Event()
        self.controller: Controller | None = None

    def _factory(self) -> SMTP:
        return DirectSMTP(
            self._handler,
            tls_context=self._tls_context,
            require_starttls=self._tls.require_starttls,
            data_size_limit=self._max,
            hostname=self._hostname,
            ident="cloud-comms Direct HISP",
            enable_SMTPUTF8=False,
        )

    def start(self) -> None:
        quiet_smtp_log()
        listener_tls = self._tls.listener
        self._tls_context = listener_tls.context() if listener_tls is not None else None
        controller = Controller(self._handler, hostname=self._host, port=self._port, ready_timeout=10.0)
        controller.factory = self._factory  # type: ignore[method-assign]
        controller.start()
        self.controller = controller
        self._ready.set()
        offered = "starttls offered" if self._tls_context is not None else "plaintext only"
        log.info(f"direct smtp listening ({offered})", extra={"port": self._port})

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
        self._ready.clear()

    def run(self, stop_event: threading.Event) -> None:
        self.start()
        try:
            stop_event.wait()
        finally:
            self.stop()

    def ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)
