"""Transport in deploy/: production refuses plaintext links, so compose and Kubernetes say
explicitly that their own network is trusted (CLINIC_TRUSTED_NETWORK=1), and the services would
refuse to start without that line."""

from __future__ import annotations

import pytest

from tests.docker import deploy_files as d

SERVICES = d.deployed_services()
PLAINTEXT_LINKS = ("MongoDB", "RabbitMQ", "gRPC")


def test_compose_and_kubernetes_declare_the_trusted_network_explicitly():
    compose = d.load_compose()
    assert compose["x-clinic-environment"]["CLINIC_TRUSTED_NETWORK"] == "1"
    configmap = next(doc for doc in d.yaml_documents(d.K8S / "configmap.yaml") if doc.get("kind") == "ConfigMap")
    assert configmap["data"]["CLINIC_TRUSTED_NETWORK"] == "1"
    assert "CLINIC_TRUSTED_NETWORK" in (d.REPO / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("service", [s for s in SERVICES if s not in ("web", "audit")])
def test_without_the_override_production_refuses_the_deployed_plaintext_links(service, tmp_path):
    compose = d.load_compose()
    env = {
        key: str(value)
        for key, value in d.environment_of(compose["services"][service]).items()
        if "${" not in str(value)
    }
    env.pop("CLINIC_TRUSTED_NETWORK")
    env.update(
        MONGO_URI="mongodb://user:pw@mongo:27017/?replicaSet=rs0",
        AMQP_URL="amqp://clinic:pw@rabbitmq:5672/clinic",
        CLINIC_RUN_DIR=str(tmp_path),
    )
    problems = d.production_problems(service, env)
    for link in PLAINTEXT_LINKS:
        assert any(p.startswith(link) and "plaintext" in p for p in problems), (link, problems)
