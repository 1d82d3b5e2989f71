"""deploy/'s dashboard, alerts, autoscalers and ingress name real things: metrics the services export
(docs/metrics.md), Deployments and Services of deploy/k8s, queues the consumers use, ports the
network policies open."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from services.inbox.delivery import QUEUE as INBOX_QUEUE

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DASHBOARD = REPO / "deploy" / "grafana" / "clinic-overview.json"
ALERTS = K8S / "alerts.yaml"
SCALED = K8S / "keda" / "scaled-objects.yaml"
INGRESS = K8S / "ingress.yaml"
# Exported by another change (critical lab results); the alert and the panel wait for it.
PENDING_METRICS = {"clinic_critical_results_unacknowledged"}
# prometheus_client's own process collector, on every /metrics.
CLIENT_METRICS = {"process_cpu_seconds_total"}
_METRIC = re.compile(r"\b((?:clinic|hl7|inbox|process)_[a-z0-9_]+)\b")
_SUFFIXES = ("_bucket", "_count", "_sum")


def documented_metrics() -> set[str]:
    """The metric names docs/metrics.md's table lists (a histogram's _bucket/_count/_sum included)."""
    text = (REPO / "docs" / "metrics.md").read_text()
    names = set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, flags=re.MULTILINE))
    return names | {name + suffix for name in names for suffix in _SUFFIXES}


def exported_metrics() -> set[str]:
    """What the services' registries really hold (the kit's metrics and the services' own)."""
    import prometheus_client

    import services.inbox.counter_check
    import services.kit.metrics
    import services.notifications.interface_metrics  # noqa: F401 - registers hl7_messages_total

    names = set()
    for metric in prometheus_client.REGISTRY.collect():
        names |= {sample.name for sample in metric.samples} | {metric.name}
        if metric.type == "counter":
            names.add(metric.name + "_total")
        if metric.type == "histogram":
            names |= {metric.name + suffix for suffix in _SUFFIXES}
    return names


def metric_names(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in _METRIC.findall(expr)}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_objects(kind: str) -> dict[str, dict]:
    found = {}
    for path in K8S.glob("*.yaml"):
        for doc in documents(path):
            if doc.get("kind") == kind:
                found[doc["metadata"]["name"]] = doc
    return found


def consumer_queues() -> set[str]:
    """The shared durable queues the services consume (their defaults in code)."""
    queues = {INBOX_QUEUE}
    for config, variable in (("auto_reply", "AUTO_REPLY_QUEUE"), ("audit", "AUDIT_QUEUE")):
        text = (REPO / "services" / config / "config.py").read_text()
        queues |= set(re.findall(rf'env\.str\("{variable}", "([a-z.-]+)"\)', text))
    return queues


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    return exprs


def test_the_dashboard_uses_only_metrics_the_services_export():
    exprs = dashboard_expressions()
    used = metric_names(exprs)
    known = (documented_metrics() & exported_metrics()) | PENDING_METRICS | CLIENT_METRICS
    assert used - known == set()
    # Rate, errors, latency and saturation per service; queues; outbox; live streams; lab ACKs.
    for needed in (
        "clinic_http_requests_total",
        "clinic_http_request_duration_seconds_bucket",
        "clinic_grpc_server_calls_total",
        "process_cpu_seconds_total",
        "clinic_bus_queue_messages",
        "clinic_bus_queue_consumers",
        "clinic_bus_messages_parked_total",
        "clinic_outbox_pending_documents",
        "clinic_outbox_oldest_pending_age_seconds",
        "clinic_live_streams_open",
        "hl7_messages_total",
    ):
        assert needed in used, needed
    assert any('status=~"5.."' in expr for expr in exprs)
    assert any('ack_code=~"AE|AR"' in expr for expr in exprs)


def test_the_alerts_cover_what_the_issue_asks_with_real_metrics_and_queues():
    (rule,) = documents(ALERTS)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    rules = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    for alert in (
        "ClinicOutboxBacklogGrowing",
        "ClinicMessagesParked",
        "ClinicConsumerDown",
        "ClinicMllpNegativeAcks",
        "ClinicCriticalResultsUnacknowledged",
    ):
        assert alert in rules, alert
        assert rules[alert]["annotations"]["runbook"].startswith("docs/runbook.md#")
    used = metric_names([r["expr"] for r in rules.values()])
    known = (documented_metrics() & exported_metrics()) | PENDING_METRICS
    assert used - known == set()
    named_queues = set(re.findall(r'queue="([a-z.-]+)"', rules["ClinicConsumerDown"]["expr"]))
    assert named_queues == consumer_queues()
    # Each runbook anchor exists.
    runbook = (REPO / "docs" / "runbook.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
    for r in rules.values():
        assert r["annotations"]["runbook"].split("#", 1)[1] in anchors, r["annotations"]["runbook"]


def test_the_compose_prometheus_evaluates_the_same_alerts_as_kubernetes():
    (rule,) = documents(ALERTS)
    compose_rules = yaml.safe_load((REPO / "deploy" / "compose" / "prometheus" / "alerts.yml").read_text())
    assert compose_rules == {"groups": rule["spec"]["groups"]}
    config = yaml.safe_load((REPO / "deploy" / "compose" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    compose = yaml.safe_load((REPO / "deploy" / "compose" / "docker-compose.yml").read_text())
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]


def test_keda_scales_the_queue_consumers_on_their_real_queues_and_replaces_their_hpas():
    deployments = k8s_objects("Deployment")
    hpas = k8s_objects("HorizontalPodAutoscaler")
    docs = documents(SCALED)
    scaled = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    auths = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TriggerAuthentication"}
    secrets = {d["metadata"]["name"]: d for d in documents(K8S / "secrets.template.yaml")}
    queues = set()
    for name, obj in scaled.items():
        target = obj["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments, name
        hpa = hpas[target["name"]]["spec"]  # the bounds of the HPA it replaces
        assert (obj["spec"]["minReplicaCount"], obj["spec"]["maxReplicaCount"]) == (
            hpa["minReplicas"],
            hpa["maxReplicas"],
        )
        (rabbit,) = [t for t in obj["spec"]["triggers"] if t["type"] == "rabbitmq"]
        assert rabbit["metadata"]["mode"] == "QueueLength" and int(rabbit["metadata"]["value"]) > 0
        queues.add(rabbit["metadata"]["queueName"])
        auth = auths[rabbit["authenticationRef"]["name"]]
        (ref,) = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "host" and ref["key"] in secrets[ref["name"]]["stringData"]
        assert secrets[ref["name"]]["stringData"]["AMQP_URL"].endswith("/" + rabbit["metadata"]["vhostName"])
    assert queues == consumer_queues()
    overlay = yaml.safe_load((K8S / "keda" / "kustomization.yaml").read_text())
    assert ".." in overlay["resources"] and "scaled-objects.yaml" in overlay["resources"]
    deleted = {yaml.safe_load(p["patch"])["metadata"]["name"] for p in overlay["patches"]}
    assert deleted == {obj["spec"]["scaleTargetRef"]["name"] for obj in scaled.values()}


def test_the_ingress_and_load_balancers_reach_real_ports_the_network_policies_open():
    services = k8s_objects("Service")
    deployments = k8s_objects("Deployment")
    policies = k8s_objects("NetworkPolicy")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "ingress.yaml" in kustomization["resources"]
    docs = documents(INGRESS)
    (ingress,) = [d for d in docs if d["kind"] == "Ingress"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    kong_ports = {p["name"]: p for p in services[backend["name"]]["spec"]["ports"]}
    assert backend["port"]["name"] in kong_ports

    def open_to_anyone(app: str) -> set[int]:
        for policy in policies.values():
            if policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == app:
                return {p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"]}
        return set()

    assert kong_ports[backend["port"]["name"]]["port"] in open_to_anyone("kong")
    balancers = [d for d in docs if d["kind"] == "Service"]
    assert {b["metadata"]["name"] for b in balancers} == {"notifications-mllp", "cloud-comms-smtp"}
    for balancer in balancers:
        assert balancer["spec"]["type"] == "LoadBalancer"
        app = balancer["spec"]["selector"]["app.kubernetes.io/name"]
        container_ports = {
            p["name"]: p["containerPort"]
            for c in deployments[app]["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for port in balancer["spec"]["ports"]:
            assert container_ports[port["targetPort"]] in open_to_anyone(app), (app, port)
