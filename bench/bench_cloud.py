"""Inbound Direct messages and webhook faxes per second until they are on the boards, against the
raw delivery rate of the same board items measured in the same run.

- setup: the whole system as `make run` starts it (nx-27017, the local RabbitMQ in a private vhost,
  directory, inbox, cloud-comms, gateway...) with its development Direct certificates. Every message
  and fax goes to Riverbend's intake (Direct `intake@direct.riverbend.example`, fax +15555550100),
  linked to two staff (Chris Wilson, Dana Thompson): each one is two board items. "On the boards"
  is read through the gateway: both staff members' Cloud Communications totals in their folder tree
  (inbox's per-folder counters), polled every 0.1 s (so a figure is at most 0.1 s late).
- raw delivery: N `board_item.delivery_requested.v1` events (kind cloud, source direct, the same two
  staff), published straight to the exchange in confirmed batches as cloud-comms' outbox relay
  publishes them (kit BatchPublisher), until all are on both boards: what inbox takes at most.
- Direct: N messages built before the clock starts, each its own envelope: a text part and a 100 KiB
  binary PDF attachment, signed (detached, SHA-256) with the partner HISP's development certificate
  and encrypted (AES-256-CBC) for Riverbend's Direct certificate with `cryptography`'s PKCS#7
  builders; sent with smtplib to cloud-comms' SMTP listener over a few concurrent connections (one
  transaction after another on each). "accepted" stops at the last `250` (stored, delivery staged);
  "on the boards" when both totals have grown by N.
- faxes: N Phaxio v2 received-fax callbacks (multipart: the Fax object JSON, `direction`, `is_test`,
  `success`, a one-page PDF in `filename`, different text each), signed with Phaxio's algorithm and
  the development callback token (services/fax_simulator's `sign`), encoded before the clock starts
  and POSTed **through the gateway** (`/api/v1/fax/callbacks/received`, the URL cloud-comms signs)
  by a few concurrent clients; "accepted" at the last `200`, then until on the boards.

Sizes: BENCH_CLOUD_RAW (1000), BENCH_CLOUD_DIRECT (300), BENCH_CLOUD_FAXES (500), concurrency
BENCH_CLOUD_CONNECTIONS (4). MDNs are not sent (no CLOUD_SMTP_RELAY), so they cost nothing here.
Results also go to artifacts/bench/cloud.json.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import smtplib
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from urllib3 import encode_multipart_formdata

from bench._env import machine, running_stack, write_report
from services.cloud_comms import delivery
from services.cloud_comms.fax.settings import DEV_CALLBACK_TOKEN
from services.directory.demo import RIVERBEND_INTAKE_STAFF
from services.fax_simulator.app import sign as phaxio_sign
from services.fax_simulator.pdf import sample_pdf
from services.kit.bus import BatchPublisher, Topology
from tests.cloud_direct_helpers import PARTNER, RIVERBEND_INTAKE, with_headers
from tests.e2e.conftest import Client

RAW = int(os.environ.get("BENCH_CLOUD_RAW", "1000"))
DIRECT = int(os.environ.get("BENCH_CLOUD_DIRECT", "300"))
FAXES = int(os.environ.get("BENCH_CLOUD_FAXES", "500"))
CONNECTIONS = int(os.environ.get("BENCH_CLOUD_CONNECTIONS", "4"))
WARMUP = 10
ATTACHMENT_BYTES = 100 * 1024
RIVERBEND = "agy_riverbend"
RIVERBEND_FAX = "+15555550100"
INTAKE_STAFF = ("intake.wilson", "intake.thompson")
POLL_S = 0.1


class Boards:
    """The intake staff's Cloud Communications totals, as their board trees show them."""

    def __init__(self, gateway_url: str):
        self.staff = [Client(gateway_url, username) for username in INTAKE_STAFF]

    def totals(self) -> list[int]:
        return [client.counts("cloud")[1] for client in self.staff]

    def wait_for(self, added: int, before: list[int], timeout_s: float = 600.0) -> float:
        """Until every board's total has grown by `added`; the time it was seen. One board is
        polled at a time (the next only once the one before is complete), to leave the CPU to
        the delivery being waited for."""
        deadline = time.monotonic() + timeout_s
        for client, start in zip(self.staff, before, strict=True):
            while client.counts("cloud")[1] < start + added:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the boards did not get {added} more items in {timeout_s:.0f} s: {self.totals()}")
                time.sleep(POLL_S)
        return time.perf_counter()


def in_parallel(work: Sequence, send: Callable[[list], None], connections: int) -> float:
    """`work` split over `connections` threads, each running `send` on its share; the time the last
    one finished."""
    shares = [list(work[n::connections]) for n in range(connections)]
    with ThreadPoolExecutor(connections) as pool:
        for done in [pool.submit(send, share) for share in shares]:
            done.result()
    return time.perf_counter()


def timed(boards: Boards, count: int, run: Callable[[], float]) -> dict:
    """Runs `run` (which returns when its last item was accepted) and waits for the boards."""
    before = boards.totals()
    started = time.perf_counter()
    accepted = run()
    done = boards.wait_for(count, before)
    return {
        "count": count,
        "accepted_per_s": count / (accepted - started),
        "on_boards_per_s": count / (done - started),
        "accept_phase_s": accepted - started,
        "drain_after_last_accept_s": done - accepted,
    }


# --- raw delivery ---------------------------------------------------------------------------------


def raw_events(count: int, gateway_url: str) -> list:
    tag = uuid.uuid4().hex[:8]
    events = []
    for n in range(count):
        delivery_id = f"dm_raw{tag}{n:06d}"
        request = delivery.request(
            source=delivery.SOURCE_DIRECT,
            source_ref=f"{tag}.{n}@direct.partner.example/cad_riverbend_intake",
            delivery_id=delivery_id,
            staff_ids=list(RIVERBEND_INTAKE_STAFF),
            title=f"Direct: Bench referral {n}",
            summary=f"From {PARTNER} · 1 attachment",
            url=f"{gateway_url}/api/v1/cloud/direct/{delivery_id}",
            link_label="Open message",
        )
        events.append(delivery.delivery_requested(RIVERBEND, request, delivery_id))
    return events


def raw_delivery(amqp_url: str, events: list) -> Callable[[], float]:
    def run() -> float:
        publisher = BatchPublisher(amqp_url, Topology(), connection_name="bench-cloud-raw")
        try:
            for start in range(0, len(events), 100):
                publisher.publish_batch(events[start : start + 100])
        finally:
            publisher.close()
        return time.perf_counter()

    return run


# --- Direct ---------------------------------------------------------------------------------------


def base64_lines(data: bytes) -> str:
    return base64.encodebytes(data).decode().replace("\n", "\r\n").rstrip()


def _inner(text: str, attachment: bytes) -> bytes:
    boundary = "bench_" + uuid.uuid4().hex
    encoded = base64_lines(attachment)
    lines = [
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "",
        text,
        f"--{boundary}",
        "Content-Type: application/pdf",
        'Content-Disposition: attachment; filename="records.pdf"',
        "Content-Transfer-Encoding: base64",
        "",
        encoded,
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(lines).encode()


def direct_messages(certs: Path, count: int, tag: str) -> list[bytes]:
    """`count` signed and encrypted Direct messages to Riverbend's intake, each with a 100 KiB PDF."""
    signer = x509.load_pem_x509_certificate((certs / "partner-hisp.cert.pem").read_bytes())
    key = serialization.load_pem_private_key((certs / "partner-hisp.key.pem").read_bytes(), None)
    recipient = x509.load_pem_x509_certificate((certs / "agency-riverbend.cert.pem").read_bytes())
    messages = []
    for n in range(count):
        attachment = b"%PDF-1.4\n%" + os.urandom(ATTACHMENT_BYTES - 17) + b"\n%%EOF\n"
        signed = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(_inner(f"Referral {tag}-{n}: records attached.", attachment))
            .add_signer(signer, key, hashes.SHA256())
            .sign(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature])
        )
        enveloped = (
            pkcs7.PKCS7EnvelopeBuilder()
            .set_data(signed)
            .add_recipient(recipient)
            .set_content_encryption_algorithm(pkcs7.algorithms.AES256)  # type: ignore[attr-defined]
            .encrypt(serialization.Encoding.SMIME, [])
        )
        message_id = f"<bench-{tag}-{n:06d}@direct.partner.example>"
        messages.append(with_headers(enveloped, to=RIVERBEND_INTAKE, subject=f"Referral {n}", message_id=message_id))
    return messages


def smtp_sender(port: int) -> Callable[[list[bytes]], None]:
    def send(messages: list[bytes]) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
            for message in messages:
                client.sendmail(PARTNER, [RIVERBEND_INTAKE], message)  # raises unless 250

    return send


# --- faxes ----------------------------------------------------------------------------------------


def fax_callbacks(callback_url: str, count: int, first_id: int) -> list[tuple[bytes, dict]]:
    """`count` signed received-fax callbacks as (body, headers), multipart-encoded in advance."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    callbacks = []
    for n in range(count):
        fax = {
            "id": first_id + n,
            "direction": "received",
            "num_pages": 1,
            "status": "success",
            "is_test": False,
            "created_at": (now - dt.timedelta(seconds=40)).isoformat().replace("+00:00", "Z"),
            "completed_at": now.isoformat().replace("+00:00", "Z"),
            "caller_id": None,
            "from_number": f"+1555{first_id % 1000:03d}{n:04d}",
            "caller_name": "",
            "to_number": RIVERBEND_FAX,
            "tags": {},
        }
        params = {"fax": json.dumps(fax), "direction": "received", "is_test": "false", "success": "true"}
        pdf = sample_pdf(1, f"Referral for BENCH PATIENT {first_id + n}")
        body, content_type = encode_multipart_formdata(
            [*params.items(), ("filename", ("filename.pdf", pdf, "application/pdf"))]
        )
        headers = {
            "Content-Type": content_type,
            "X-Phaxio-Signature": phaxio_sign(DEV_CALLBACK_TOKEN, callback_url, params, {"filename": pdf}),
        }
        callbacks.append((body, headers))
    return callbacks


def fax_poster(callback_url: str) -> Callable[[list[tuple[bytes, dict]]], None]:
    def post(callbacks: list[tuple[bytes, dict]]) -> None:
        with requests.Session() as session:
            for body, headers in callbacks:
                reply = session.post(callback_url, data=body, headers=headers, timeout=60)
                if reply.status_code != 200:
                    raise SystemExit(f"fax callback refused: {reply.status_code} {reply.text[:300]}")

    return post


# --- the run --------------------------------------------------------------------------------------


def run(stack) -> dict:
    gateway = stack.gateway_url
    callback_url = f"{gateway}/api/v1/fax/callbacks/received"
    send_direct = smtp_sender(stack.config.ports.cloud_comms_smtp)
    post_faxes = fax_poster(callback_url)
    boards = Boards(gateway)
    tag = uuid.uuid4().hex[:8]
    # Warm up (tokens, directory's address answers, keys, connections), then build the inputs.
    warm_messages = direct_messages(stack.cloud_direct_certs, WARMUP, "w" + tag)
    warm_callbacks = fax_callbacks(callback_url, WARMUP, 80_000_001)
    timed(boards, WARMUP, lambda: in_parallel(warm_messages, send_direct, 2))
    timed(boards, WARMUP, lambda: in_parallel(warm_callbacks, post_faxes, 2))
    events = raw_events(RAW, gateway)
    built = time.perf_counter()
    messages = direct_messages(stack.cloud_direct_certs, DIRECT, tag)
    build_s = time.perf_counter() - built
    callbacks = fax_callbacks(callback_url, FAXES, 90_000_001)
    return {
        "machine": machine(),
        "connections": CONNECTIONS,
        "recipients_per_item": len(INTAKE_STAFF),
        "direct_message_bytes": sum(len(m) for m in messages) // len(messages),
        "direct_build_s": build_s,
        "fax_callback_bytes": sum(len(body) for body, _ in callbacks) // len(callbacks),
        "raw": timed(boards, RAW, raw_delivery(stack.config.amqp_url, events)),
        "direct": timed(boards, DIRECT, lambda: in_parallel(messages, send_direct, CONNECTIONS)),
        "fax": timed(boards, FAXES, lambda: in_parallel(callbacks, post_faxes, CONNECTIONS)),
    }


def main() -> int:
    load_before = os.getloadavg()[0]
    with running_stack("cloud") as stack:
        report = run(stack)
    load = (load_before, os.getloadavg()[0])
    report["load_average_before_after"] = load
    raw = report["raw"]["on_boards_per_s"]
    report["ratio_direct_vs_raw"] = report["direct"]["on_boards_per_s"] / raw
    report["ratio_fax_vs_raw"] = report["fax"]["on_boards_per_s"] / raw
    print(f"{'path (each to 2 staff: 2 board items)':52} {'n':>5} {'accepted/s':>11} {'on boards/s':>12} {'vs raw':>7}")
    rows = [
        ("raw delivery (events straight to the exchange)", report["raw"]),
        ("Direct: SMTP, signed + encrypted, 100 KiB attached", report["direct"]),
        ("fax: signed Phaxio callbacks through the gateway", report["fax"]),
    ]
    for label, row in rows:
        print(
            f"{label:52} {row['count']:>5} {row['accepted_per_s']:>11,.0f} {row['on_boards_per_s']:>12,.1f}"
            f" {row['on_boards_per_s'] / raw:>7.1%}"
        )
    print(
        f"{CONNECTIONS} concurrent connections / clients; Direct messages of ~{report['direct_message_bytes']:,} bytes"
        f" (built in {report['direct_build_s']:.1f}s before timing), fax callbacks of"
        f" ~{report['fax_callback_bytes']:,} bytes; boards caught up"
        f" {report['direct']['drain_after_last_accept_s']:.1f}s (Direct) /"
        f" {report['fax']['drain_after_last_accept_s']:.1f}s (fax) after the last accept"
    )
    print(f"machine load (1-minute average) before / after: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} CPUs")
    path = write_report("cloud", report)
    print(f"written to {path.relative_to(path.parents[2])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
