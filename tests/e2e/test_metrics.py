"""Prometheus metrics on the running system (docs/metrics.md): every service answers GET /metrics on its own
HTTP port with the text format and the kit's metric families; the gateway never shows them; a journey
(a send, a read, the relay publishing, consumers handling it) moves the counters it should; and no label
value names an id, an email address or the PHI the journey carried."""

from __future__ import annotations

import re
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.waits import wait_until

# service name (its `service` label) -> the Ports field of its HTTP port
HTTP_PORTS = {
    "directory": "directory_http",
    "inbox": "inbox_http",
    "notifications": "notifications_http",
    "auto-reply": "auto_reply_http",
    "erx-bridge": "erx_bridge_http",
    "cloud-comms": "cloud_comms_http",
    "audit": "audit_http",
    "web": "web_http",
}
WITH_DATABASE = set(HTTP_PORTS) - {"web"}  # each runs an outbox relay (security events at least)
CONSUMING = set(HTTP_PORTS) - {"directory"}  # each listens to session revocations on a queue of its own
ID_LIKE = re.compile(r"(?:msg|stf|pat|pref|agy|thr|ses|lr|rt|tok)_[0-9A-Za-z]")
EMAIL = re.compile(r"[^@\s\"]+@[^@\s\"]+\.[A-Za-z]{2,}")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_url(stack, service: str) -> str:
    return f"http://127.0.0.1:{getattr(stack.config.ports, HTTP_PORTS[service])}/metrics"


def scrape_text(stack, service: str) -> str:
    reply = requests.get(metrics_url(stack, service), timeout=10)
    assert reply.status_code == 200, f"{service}: {reply.status_code} {reply.text[:200]}"
    assert reply.headers["Content-Type"].startswith("text/plain; version="), reply.headers["Content-Type"]
    return reply.text


def scrape(stack, service: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(scrape_text(stack, service)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **match: str) -> float:
    """The sum of `name`'s samples whose labels include `match` (a value ending in * is a prefix)."""

    def matches(labels: dict[str, str]) -> bool:
        for key, wanted in match.items():
            got = labels.get(key, "")
            if not (got.startswith(wanted[:-1]) if wanted.endswith("*") else got == wanted):
                return False
        return True

    return sum(value for (sample, labels), value in samples.items() if sample == name and matches(dict(labels)))


@pytest.mark.parametrize("service", sorted(HTTP_PORTS))
def test_every_service_answers_metrics_on_its_own_port(stack, service):
    requests.get(metrics_url(stack, service).replace("/metrics", "/healthz"), timeout=10)  # a request counted
    samples = scrape(stack, service)
    assert total(samples, "clinic_http_requests_total", service=service, route="/healthz", status="200") >= 1
    assert total(samples, "clinic_http_request_duration_seconds_count", service=service, route="/healthz") >= 1
    assert total(samples, "process_resident_memory_bytes") > 0
    if service in WITH_DATABASE:
        outbox = {"service": service, "collection": "security_outbox"}
        assert ("clinic_outbox_pending_documents", tuple(sorted(outbox.items()))) in samples, "no backlog sample"
        assert ("clinic_outbox_oldest_pending_age_seconds", tuple(sorted(outbox.items()))) in samples
    if service in CONSUMING:
        depth = {"service": service, "queue": f"{service}.session-revocations", "kind": "main"}
        wait_until(
            lambda: ("clinic_bus_queue_messages", tuple(sorted(depth.items()))) in scrape(stack, service),
            30,
            message=f"{service}: its revocations queue's depth sampled",
        )
    families = {family.name for family in text_string_to_metric_families(scrape_text(stack, service))}
    assert {
        "clinic_http_requests",
        "clinic_grpc_server_calls",
        "clinic_bus_events_published",
        "clinic_bus_messages_consumed",
        "clinic_bus_messages_parked",
        "clinic_outbox_pending_documents",
        "clinic_phi_decryptions",
    } <= families
    if service == "notifications":
        assert "hl7_messages" in families  # its own, on the same route
    if service == "inbox":
        assert "inbox_counter_check_boards" in families
    if service == "web":
        assert ("clinic_live_streams_open", (("service", "web"),)) in scrape(stack, service)


@pytest.mark.parametrize(
    "path", ["/metrics", "/metrics/", "//metrics", "/%6Detrics", "/Metrics", "/metrics?x=1", "/healthz", "/readyz"]
)
def test_metrics_are_never_reachable_through_the_gateway(stack, path):
    reply = requests.get(f"{stack.gateway_url}{path}", timeout=10, allow_redirects=False)
    assert reply.status_code == 404, f"{path}: {reply.status_code}"
    assert "# HELP" not in reply.text and "clinic_http_requests" not in reply.text


def test_a_journey_moves_the_counters_and_no_label_names_an_id_or_phi(stack, admin, reyes):
    before = {service: scrape(stack, service) for service in ("inbox", "directory", "web", "audit")}
    marker = f"METRICS-PHI-{uuid.uuid4().hex}"
    sent = admin.send(to_staff_ids=[reyes.staff_id], subject=marker, body=f"{marker} (patient pat_x@example.org)")
    assert sent.status_code == 201, sent.text
    message_id = sent.json()["id"]
    opened = reyes.get(f"/api/v1/messages/{message_id}")
    assert opened.status_code == 200 and opened.json()["body"].startswith(marker)

    def moved(process: str, name: str, **match: str) -> float:
        return total(scrape(stack, process), name, **match) - total(before[process], name, **match)

    inbox_route = {"service": "inbox", "route": "/api/v1/messages"}
    assert moved("inbox", "clinic_http_requests_total", **inbox_route, method="POST", status="201") >= 1
    read = {"service": "inbox", "route": "/api/v1/messages/<message_id>", "method": "GET", "status": "200"}
    assert moved("inbox", "clinic_http_requests_total", **read) >= 1
    assert moved("inbox", "clinic_phi_decryptions_total", field="body", outcome="ok") >= 1
    assert moved("directory", "clinic_grpc_server_calls_total", code="OK") >= 1  # recipients resolved over gRPC
    wait_until(
        lambda: moved("inbox", "clinic_bus_events_published_total", routing_key="message.delivered.v1") >= 1,
        30,
        message="the relay published the delivery",
    )
    wait_until(
        lambda: moved("web", "clinic_bus_messages_consumed_total", queue="web.board-events", outcome="handled") >= 1,
        30,
        message="web's live updates consumed it",
    )
    wait_until(
        lambda: moved("audit", "clinic_bus_messages_consumed_total", service="audit", outcome="handled") >= 1,
        30,
        message="the audit trail consumed the read's record",
    )

    for service in HTTP_PORTS:
        text = scrape_text(stack, service)
        assert marker not in text, f"{service}: the message's text is in a label"
        values = {value for (_, labels), _ in scrape(stack, service).items() for _, value in labels}
        named = sorted(value for value in values if ID_LIKE.search(value) or EMAIL.search(value))
        assert named == [], f"{service}: label values that name an id or an address: {named}"
