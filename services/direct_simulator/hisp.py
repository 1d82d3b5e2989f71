"""The partner HISP (development only): an aiosmtpd server cloud-comms uses as its relay
(CLOUD_SMTP_RELAY), holding the development partner identity (partner-hisp.*.pem: the addresses
and domain `direct.partner.example`).

- RCPT TO: an address the partner certificate covers, else `550 5.1.1` (it routes nowhere else).
- DATA: opened with cloud-comms' own S/MIME checks (decrypted with the partner key, the signature
  verified against the anchors, the signer bound to From); a refusal is answered as a HISP would
  (`554 ...`). A report (an MDN cloud-comms sends for a message a tester sent "from the partner")
  is recorded and never answered. A message is accepted (250) and then answered, per recipient,
  with MDNs signed by the partner and encrypted for our signer's certificate, sent to cloud-comms'
  Direct listener (DIRECT_SIMULATOR_HISP). As an IG-conformant receiving HISP it sends `dispatched`
  (carrying the `X-DIRECT-FINAL-DESTINATION-DELIVERY` field, mdn.py) only when the message asked
  for final delivery (`Disposition-Notification-Options`; cloud-comms' messages always do):

  | recipient local part | MDNs, each `step_s` after the previous |
  |---|---|
  | `fail...` | `failed` |
  | `silent...` | none (the sender's timeout fails it) |
  | `nodispatch...` | `processed` only (timeout: no dispatched notification) |
  | anything else | `processed`, then `dispatched` (`processed` only when not asked) |

`state()` lists what happened (addresses, Message-IDs, dispositions; never content).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from cryptography import x509

from services.cloud_comms.direct import compose, mdn, outgoing, reports, smime

log = logging.getLogger(__name__)

REPORTING_HOST = "direct.partner.example"
MAX_EVENTS = 500


@dataclass(frozen=True)
class Original:
    """The message an MDN answers."""

    sender: str
    message_id: str
    subject: str
    signer: x509.Certificate


def plan(address: str, final_delivery: bool = True) -> tuple[str, ...]:
    local = address.partition("@")[0].lower()
    if local.startswith("fail"):
        return ("failed",)
    if local.startswith("silent"):
        return ()
    if local.startswith("nodispatch") or not final_delivery:
        return ("processed",)
    return ("processed", "dispatched")


class PartnerHisp:
    def __init__(
        self,
        identity: smime.Identity,
        anchors: list[x509.Certificate],
        hisp: tuple[str, int],
        step_s: float = 1.0,
    ):
        self.identity = identity
        self.anchors = anchors
        self.hisp = hisp
        self.step_s = step_s
        self._lock = threading.Lock()
        self._events: list[dict] = []
        self._timers: list[threading.Timer] = []

    # --- SMTP (aiosmtpd handler) --------------------------------------------------------------------
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if not self.identity.covers(address):
            return "550 5.1.1 no route to that address from this partner HISP"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 ok"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        loop = asyncio.get_running_loop()
        raw = envelope.original_content or b""
        return await loop.run_in_executor(None, self.receive, list(envelope.rcpt_tos), raw)

    # --- what arrives -------------------------------------------------------------------------------
    def receive(self, recipients: list[str], raw: bytes) -> str:
        try:
            outer = smime.parse(raw)
            message_id = str(outer.get("Message-ID") or "").strip()
            opened = smime.open_message(outer, [self.identity], self.anchors, recipients)
        except smime.Refused as refused:
            self._record("refused", code=refused.kind, reply=refused.reply)
            return refused.reply
        sender = smime.from_address(outer)
        report = reports.parse(opened.inner)
        if report is not None:
            outcomes = [o.state for o in report.outcomes]
            self._record("report", sender=sender, original=report.original_message_id, states=outcomes)
            return "250 2.0.0 notification received"
        options = [str(v) for m in (outer, opened.inner) for v in m.get_all("Disposition-Notification-Options") or []]
        final_delivery = compose.asks_final_delivery(*options)
        self._record(
            "message", sender=sender, recipients=recipients, message_id=message_id, final_delivery=final_delivery
        )
        subject = str(opened.inner.get("Subject") or outer.get("Subject") or "")
        original = Original(sender, message_id, subject, opened.signer)
        for recipient in recipients:
            for step, disposition in enumerate(plan(recipient, final_delivery), start=1):
                self._later(step * self.step_s, recipient, disposition, original)
        return "250 2.0.0 message accepted"

    def _later(self, delay: float, *args) -> None:
        timer = threading.Timer(delay, self._answer, args)
        timer.daemon = True
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()

    def _answer(self, recipient: str, disposition: str, original: Original) -> None:
        _, message = mdn.build(
            disposition=disposition,
            sender=recipient,
            original_from=original.sender,
            original_message_id=original.message_id,
            original_subject=original.subject,
            identity=self.identity,
            recipient_cert=original.signer,
            reporting_host=REPORTING_HOST,
            failure="the recipient's mailbox is not accepting messages" if disposition == "failed" else "",
        )
        try:
            refused = outgoing.send(*self.hisp, envelope_from=recipient, to=[original.sender], message=message)
            outcome = "refused" if refused else "sent"
        except Exception as exc:  # noqa: BLE001 - the simulator reports, it does not retry
            outcome = f"not sent ({type(exc).__name__}: {getattr(exc, 'smtp_code', '')})"
        self._record(
            "mdn",
            recipient=recipient,
            to=original.sender,
            original=original.message_id,
            state=disposition,
            outcome=outcome,
        )

    # --- state ----------------------------------------------------------------------------------------
    def _record(self, kind: str, **fields) -> None:
        log.info("partner hisp %s", kind, extra={"code": kind})
        with self._lock:
            self._events.append({"at": time.time(), "kind": kind, **fields})
            del self._events[:-MAX_EVENTS]

    def state(self) -> list[dict]:
        with self._lock:
            return list(self._events)

    def reset(self) -> None:
        with self._lock:
            self._events.clear()

    def stop(self) -> None:
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
