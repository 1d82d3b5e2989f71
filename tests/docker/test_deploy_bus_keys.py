"""Bus signing keys in deploy/ (docs/bus-security.md): in compose and in Kubernetes every service gets
its own private key and nobody else's, and every service gets the public key of every producer.

A service holding another's key could sign as that producer; a consumer missing a producer's public
key would park everything that producer publishes. Production refuses to start without both settings
(that part is checked for every service by test_deploy_manifests.py through `production_problems`).
"""

from __future__ import annotations

import pytest

from services.kit.bus.signing import KNOWN_PRODUCERS, parse_private_key, parse_producer_keys, raw_public_b64
from tests.docker import deploy_files as d

SERVICES = d.deployed_services()
PUBLIC_KEYS = "bus_producer_keys"


def test_every_deployed_service_is_a_known_producer():
    assert set(SERVICES) == set(KNOWN_PRODUCERS)


# --- Docker Compose -----------------------------------------------------------------------------
def compose_secret_names(service: dict) -> list[str]:
    return [s if isinstance(s, str) else s["source"] for s in service.get("secrets") or []]


def own_compose_key(service: str) -> str:
    return f"bus_signing_{d.package(service)}"


def test_compose_mounts_each_service_its_own_bus_key_and_every_public_key(compose):
    for name, service in compose["services"].items():
        mounted = compose_secret_names(service)
        private = [s for s in mounted if s.startswith("bus_signing_")]
        env = d.environment_of(service)
        if name not in SERVICES:  # Kong, the database, the broker: no bus key at all
            assert not private and not any(k.startswith("BUS_") for k in env), name
            continue
        assert private == [own_compose_key(name)], f"{name} mounts {private}"
        assert env["BUS_SIGNING_KEY_FILE"] == f"/run/secrets/{own_compose_key(name)}", name
        assert env["BUS_PRODUCER_KEYS_FILE"] == f"/run/secrets/{PUBLIC_KEYS}", name
        assert PUBLIC_KEYS in mounted, name
    declared = {k: v["file"] for k, v in compose["secrets"].items() if k.startswith("bus_signing_")}
    assert declared == {own_compose_key(s): f"./secrets/bus_signing_{s}.pem" for s in SERVICES}
    assert compose["secrets"][PUBLIC_KEYS]["file"] == f"./secrets/{PUBLIC_KEYS}"


def published_keys(folder) -> dict[str, list[str]]:
    problems: list[str] = []
    keys = parse_producer_keys((folder / "secrets" / PUBLIC_KEYS).read_text(), problems)
    assert not problems
    return {name: [raw_public_b64(k) for k in listed] for name, listed in keys.items()}


def own_public_key(folder, service: str) -> str:
    pem = (folder / "secrets" / f"bus_signing_{service}.pem").read_text()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, as load_signing reads it
    return raw_public_b64(parse_private_key(pem).public_key())


def test_make_secrets_makes_one_bus_key_per_service_and_lists_each_public_key(generated_secrets):
    workdir, _ = generated_secrets
    listed = published_keys(workdir)
    assert listed == {service: [own_public_key(workdir, service)] for service in KNOWN_PRODUCERS}
    assert len({keys[0] for keys in listed.values()}) == len(KNOWN_PRODUCERS), "two services share a key"


def bus_problems(service: str, signing_key: str | None, producer_keys: str | None) -> list[str]:
    environ = {"CLINIC_MODE": "production"}
    if signing_key:
        environ["BUS_SIGNING_KEY_FILE"] = signing_key
    if producer_keys:
        environ["BUS_PRODUCER_KEYS_FILE"] = producer_keys
    return [p for p in d.production_problems(service, environ) if "BUS_" in p]


def test_compose_bus_keys_load_and_a_service_with_anothers_key_or_none_is_refused(generated_secrets):
    workdir = generated_secrets[0] / "secrets"
    public = str(workdir / PUBLIC_KEYS)
    for service in SERVICES:
        assert bus_problems(service, str(workdir / f"bus_signing_{service}.pem"), public) == [], service
    # inbox's process given notifications' key would sign as notifications: it refuses to start.
    stolen = bus_problems("inbox", str(workdir / "bus_signing_notifications.pem"), public)
    assert stolen == ["BUS_SIGNING_KEY does not match the key BUS_PRODUCER_KEYS lists for inbox"]
    missing_key = bus_problems("inbox", None, public)
    assert missing_key == ["BUS_SIGNING_KEY (or BUS_SIGNING_KEY_FILE) is required in production"]
    assert bus_problems("inbox", str(workdir / "bus_signing_inbox.pem"), None) == [
        "BUS_PRODUCER_KEYS (or BUS_PRODUCER_KEYS_FILE) is required in production"
    ]


def test_make_secrets_keeps_retired_public_keys_and_force_starts_over(compose_copy):
    secrets = compose_copy / "secrets"
    before = published_keys(compose_copy)
    # Replacing notifications' key: its old public key stays accepted while old messages may be queued.
    retired = f"notifications:{before['notifications'][0]}\n"
    (secrets / "bus_producer_keys.retired").write_text("# replaced keys\n" + retired)
    (secrets / "bus_signing_notifications.pem").unlink()
    result = d.run_make_secrets(compose_copy)
    assert result.returncode == 0, result.stderr
    after = published_keys(compose_copy)
    new_key = own_public_key(compose_copy, "notifications")
    assert new_key != before["notifications"][0]
    assert after["notifications"] == [new_key, before["notifications"][0]]
    assert {k: v for k, v in after.items() if k != "notifications"} == {
        k: v for k, v in before.items() if k != "notifications"
    }
    own = str(secrets / "bus_signing_notifications.pem")
    assert bus_problems("notifications", own, str(secrets / PUBLIC_KEYS)) == []

    result = d.run_make_secrets(compose_copy, "--force")
    assert result.returncode == 0, result.stderr
    assert not (secrets / "bus_producer_keys.retired").exists()
    fresh = published_keys(compose_copy)
    assert set(fresh) == set(KNOWN_PRODUCERS) and all(len(keys) == 1 for keys in fresh.values())
    assert all(fresh[name] != after[name][:1] for name in KNOWN_PRODUCERS)


# --- Kubernetes ---------------------------------------------------------------------------------
DEPLOYMENTS = d.k8s_objects("Deployment")


def own_k8s_secret(service: str) -> str:
    return f"{service}-bus-signing-key"


def secrets_used(pod: dict) -> set[str]:
    """Every Secret a pod can read: volumes (projected ones too), envFrom and secretKeyRef."""
    names = set()
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in (volume.get("projected") or {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    for container in [*pod["containers"], *pod.get("initContainers", [])]:
        names |= {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
        for item in container.get("env", []):
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
    return names


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_k8s_mounts_each_service_its_own_bus_key_and_every_public_key(name):
    pod = DEPLOYMENTS[name]["spec"]["template"]["spec"]
    private = {s for s in secrets_used(pod) if s.endswith("-bus-signing-key")}
    if name not in SERVICES:  # Kong publishes nothing
        assert not private, f"{name} reads {private}"
        return
    assert private == {own_k8s_secret(name)}, f"{name} reads {private}"
    container = pod["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert d.mounted_secret_file(pod, container, env["BUS_SIGNING_KEY_FILE"]) == (
        own_k8s_secret(name),
        "bus_signing_key.pem",
    )
    assert d.mounted_secret_file(pod, container, env["BUS_PRODUCER_KEYS_FILE"]) == ("bus-producer-keys", PUBLIC_KEYS)


def test_k8s_secret_template_has_a_bus_key_per_service_and_lists_every_producer():
    template = d.secret_template()
    for service in SERVICES:
        assert set(template[own_k8s_secret(service)]) == {"bus_signing_key.pem"}, service
    lines = template["bus-producer-keys"][PUBLIC_KEYS].split()
    assert sorted(line.split(":", 1)[0] for line in lines) == sorted(KNOWN_PRODUCERS)
