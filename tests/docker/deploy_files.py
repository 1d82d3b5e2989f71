"""Reading deploy/ the way Docker Compose, Kubernetes and decK read it, for tests that need no engine.

Compose interpolation, the .env file that make-secrets.sh writes and decK's rendering of
gateway/kong.yml are reproduced closely enough to check names, hosts, ports and values; the
real tools are exercised by the compose stack test where an engine answers.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from services.kit.bus.signing import KNOWN_PRODUCERS, load_signing, raw_public_b64
from services.kit.settings import Env, SettingsError

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
MAKE_SECRETS = COMPOSE_DIR / "make-secrets.sh"
# The broker's users, permissions and shared topology (services.kit.bus broker-definitions); make-secrets.sh
# fills in the users' password hashes for compose.
BROKER_DIR = DEPLOY / "rabbitmq"
BROKER_DEFINITIONS = BROKER_DIR / "definitions.json"
K8S = DEPLOY / "k8s"
DECK_ENV = K8S / "kong" / "deck.env"
KONG_FILE = REPO / "gateway" / "kong.yml"

# The local gateway runner reads the same kong.yml; deployments run real Kong instead of it.
NOT_DEPLOYED = {"gateway"}
# Services with no gRPC server and no database (the web page): probed over HTTP, given no MongoDB user.
HTTP_ONLY = {"web"}

_ENV_NAME = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
_DECK_ENV = re.compile(r'env\s+"(DECK_[A-Z0-9_]+)"')


def docker_engine_problem() -> str | None:
    """Why no Docker engine answers here (the only reason to skip a test that needs one), or None."""
    if shutil.which("docker") is None:
        return "no Docker engine can be asked: the docker CLI is not installed"
    command = ["docker", "info", "--format", "{{.ServerVersion}}"]
    try:
        info = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine answers (`docker info`: {exc})"
    if info.returncode != 0:
        reason = (info.stderr or info.stdout).strip().splitlines()
        return "no Docker engine answers (`docker info` failed" + (f": {reason[-1]}" if reason else "") + ")"
    return None


def compose_plugin_problem() -> str | None:
    """Why `docker compose` cannot run here (it needs the CLI and its compose plugin, not an engine), or None."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        command = ["docker", "compose", "version"]
        version = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker compose version` did not answer: {exc}"
    if version.returncode != 0:
        return "the docker compose plugin is not installed"
    return None


def deployed_services() -> list[str]:
    """Every service process with its own settings module (services/<package>/config.py with load()),
    by its deployed name: the package name with hyphens (Kubernetes names allow no underscore)."""
    names = []
    for config in sorted((REPO / "services").glob("*/config.py")):
        package = config.parent.name
        if package in NOT_DEPLOYED or not (config.parent / "__main__.py").exists():
            continue
        names.append(package.replace("_", "-"))
    return names


def package(service: str) -> str:
    """The Python package of a deployed service (`auto-reply` -> `auto_reply`)."""
    return service.replace("-", "_")


def env_prefix(service: str) -> str:
    """The prefix of a service's own variables (`auto-reply` -> `AUTO_REPLY`)."""
    return package(service).upper()


def production_problems(service: str, environ: Mapping[str, str]) -> list[str]:
    """What the service refuses at start in `environ` (production mode unless it says otherwise): its own
    config.load(), then its bus keys as services.kit.bootstrap.serve loads them (load_signing)."""
    environ = {"CLINIC_MODE": "production", **environ}
    module = importlib.import_module(f"services.{package(service)}.config")
    problems: list[str] = []
    try:
        module.load(environ)
    except SettingsError as exc:
        problems += exc.problems
    env = Env(service, environ)
    load_signing(env, service)
    return problems + env.problems


def required_in_production(service: str) -> list[frozenset[str]]:
    """The settings production cannot start without: one group per problem, any name of a group will do
    (e.g. {PHI_MASTER_KEYS, PHI_MASTER_KEYS_FILE})."""
    groups = []
    for problem in production_problems(service, {}):
        names = frozenset(_ENV_NAME.findall(problem))
        if names and names not in groups:
            groups.append(names)
    return groups


# --- Docker Compose ---------------------------------------------------------------------------
def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def run_make_secrets(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """make-secrets.sh of the compose folder `workdir` (a copy of deploy/compose), run for real."""
    command = ["bash", str(workdir / "make-secrets.sh"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def interpolate(value: object, variables: Mapping[str, str]) -> object:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$, applied to every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        current = variables.get(name)
        unset = current is None or (current == "" and operator and operator.startswith(":"))
        if operator and operator.endswith("?") and unset:
            raise KeyError(f"compose needs {name}: {argument}")
        if operator and operator.endswith("-") and unset:
            return argument
        return current or ""

    return _INTERPOLATION.sub(substitute, value)


def parse_dotenv(text: str) -> dict[str, str]:
    """The .env syntax make-secrets.sh writes: KEY=value, or KEY="value with \\n escapes"."""
    values = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        values[key.strip()] = value
    return values


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def compose_secret_names(service: dict) -> list[str]:
    """The compose secrets a service mounts (at /run/secrets/<name>)."""
    return [s if isinstance(s, str) else s["source"] for s in service.get("secrets") or []]


_SECRET_PATH = re.compile(r"/run/secrets/([A-Za-z0-9_.-]+)")


def compose_environment_on_host(
    compose: dict, service: str, workdir: Path, variables: Mapping[str, str], scratch: Path
) -> dict[str, str]:
    """The environment compose gives `service`, made loadable on this machine: every /run/secrets/<name> in
    it (the *_FILE settings, tlsCAFile= in MONGO_URI) becomes the file make-secrets.sh wrote in `workdir`
    (a copy of deploy/compose), a folder the service mounts becomes an empty one in `scratch`, and
    CLINIC_RUN_DIR is `scratch`. Naming a secret the service does not mount is an AssertionError."""
    spec = compose["services"][service]
    env = interpolate(environment_of(spec), variables)
    mounted = compose_secret_names(spec)
    for key, value in list(env.items()):
        assert not key.endswith("_FILE") or value.startswith("/run/secrets/"), f"{service}: {key}={value}"

        def on_host(match: re.Match, key: str = key) -> str:
            name = match.group(1)
            assert name in mounted, f"{service}: {key} names /run/secrets/{name}, a secret it does not mount"
            return str(workdir / compose["secrets"][name]["file"])

        env[key] = _SECRET_PATH.sub(on_host, value)
    folders = {volume.split(":")[1] for volume in spec.get("volumes", [])}
    for key, value in list(env.items()):
        if value in folders:
            (scratch / key).mkdir()
            env[key] = str(scratch / key)
    env["CLINIC_RUN_DIR"] = str(scratch)
    return env


def long_running(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items() if str(s.get("restart", "")) != "no"}


# --- Kubernetes -------------------------------------------------------------------------------
def yaml_documents(path: Path) -> Iterator[dict]:
    for document in yaml.safe_load_all(path.read_text()):
        if document is not None:
            yield document


def load_kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def k8s_resources() -> list[dict]:
    """Every object that `kubectl apply -k deploy/k8s` creates, apart from the generated ones."""
    return [doc for name in load_kustomization()["resources"] for doc in yaml_documents(K8S / name)]


def k8s_objects(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in k8s_resources() if doc["kind"] == kind}


def secret_template() -> dict[str, dict]:
    """The Secrets that operators create, by name: {key: placeholder value}."""
    secrets = {}
    for doc in yaml_documents(K8S / "secrets.template.yaml"):
        assert doc["kind"] == "Secret"
        secrets[doc["metadata"]["name"]] = {**(doc.get("stringData") or {}), **(doc.get("data") or {})}
    return secrets


def certificate_secrets() -> dict[str, dict[str, str]]:
    """The kubernetes.io/tls Secrets that cert-manager makes from certificates.yaml, by name: the keys it
    writes (a CA issuer's Secrets carry ca.crt too), with placeholder values."""
    return {
        certificate["spec"]["secretName"]: {"tls.crt": "", "tls.key": "", "ca.crt": ""}
        for certificate in k8s_objects("Certificate").values()
    }


def tls_stand_ins(folder: Path) -> dict[str, str]:
    """A CA and a certificate signed by it (serverAuth + clientAuth), by the keys of a kubernetes.io/tls
    Secret: what a Certificate's Secret holds, for tests that load them."""
    from services.kit.transport import development_grpc_tls

    tls = development_grpc_tls(folder)
    return {
        "tls.crt": tls.cert_file.read_text(),
        "tls.key": tls.key_file.read_text(),
        "ca.crt": tls.ca_file.read_text(),
    }


def parse_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def k8s_environment(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it from the manifests and the secret template."""
    config_maps = k8s_objects("ConfigMap")
    secrets = secret_template()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
        else:
            env.update(secrets[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"].get("secretKeyRef") or item["valueFrom"]["configMapKeyRef"]
            table = secrets if "secretKeyRef" in item["valueFrom"] else {k: v["data"] for k, v in config_maps.items()}
            env[item["name"]] = table[ref["name"]][ref["key"]]
    return env


def mounted_secret_file(pod: dict, container: dict, path: str) -> tuple[str, str]:
    """(secret name, key) of the file at `path` in the container, from its volume mounts."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        directory = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(directory):
            secret = volumes[mount["name"]]["secret"]
            file_name = path[len(directory) :]
            for item in secret.get("items", []):
                if item["path"] == file_name:
                    return secret["secretName"], item["key"]
            return secret["secretName"], file_name
    raise AssertionError(f"{path} is not on a mounted volume")


STAND_IN_PHI_KEY_ID = "phi-test"


def direct_stand_ins() -> dict[str, str]:
    """cloud-comms' Direct identity and anchors (the cloud-comms-direct Secret's keys), made with its
    development CA."""
    from cryptography.hazmat.primitives import serialization

    from services.cloud_comms import devcerts

    ca, ca_key = devcerts.make_ca()
    cert, key = devcerts.issue(ca, ca_key, devcerts.AGENCIES[0])
    pem = serialization.Encoding.PEM
    return {
        "direct_anchors.pem": ca.public_bytes(pem).decode(),
        "direct_cert.pem": cert.public_bytes(pem).decode(),
        "direct_key.pem": key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    }


def k8s_file_stand_ins(service: str, folder: Path) -> dict[str, str]:
    """Values with the right shape for every Secret key a Deployment mounts as a file, by key: the template's
    placeholders (PHI key ring with the id STAND_IN_PHI_KEY_ID) and the certificates cert-manager issues."""
    from services.audit.signing import generate_private_pem as generate_audit_signing_key
    from services.directory.tokens import generate_private_key_pem
    from services.kit.settings import random_key_b64

    return {
        "phi_master_keys": f"{STAND_IN_PHI_KEY_ID}:{random_key_b64()}",
        "jwt_signing_keys.pem": generate_private_key_pem(2048),
        "service_clients": "inbox:" + "0" * 64,
        **direct_stand_ins(),
        "audit_signing_key.pem": generate_audit_signing_key(),
        **bus_key_stand_ins(service),
        **tls_stand_ins(folder / "tls"),
    }


def k8s_environment_on_host(service: str, scratch: Path, stand_ins: Mapping[str, str]) -> dict[str, str]:
    """The environment of `service`'s container as the kubelet builds it, made loadable on this machine:
    every *_FILE setting names a file on a mounted Secret (an AssertionError otherwise), written into
    `scratch` from `stand_ins` (by the Secret's key, e.g. k8s_file_stand_ins); a mounted folder that is not
    a file setting (partners' Direct certificates) becomes an empty one; PHI_MASTER_KEY_ID, when set, is
    STAND_IN_PHI_KEY_ID; CLINIC_RUN_DIR is `scratch`."""
    pod = k8s_objects("Deployment")[service]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = k8s_environment(container)
    secrets = {**secret_template(), **certificate_secrets()}
    for name, value in list(env.items()):
        if name.endswith("_FILE"):
            secret, key = mounted_secret_file(pod, container, value)
            assert key in secrets[secret], f"{value}: secret {secret} has no key {key}"
            file = scratch / key
            file.write_text(stand_ins[key])
            env[name] = str(file)
    mounted = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
    for name, value in list(env.items()):
        if value in mounted and not name.endswith("_FILE"):
            env[name] = str(scratch / name)
            (scratch / name).mkdir()
    if "PHI_MASTER_KEY_ID" in env:
        env["PHI_MASTER_KEY_ID"] = STAND_IN_PHI_KEY_ID
    env["CLINIC_RUN_DIR"] = str(scratch)
    return env


def bus_key_stand_ins(service: str) -> dict[str, str]:
    """The bus keys a Kubernetes Secret would hold for `service` (its own private key as a PKCS#8 PEM,
    as `openssl genpkey -algorithm ED25519` writes it) and the public key of every known producer."""
    private = {name: Ed25519PrivateKey.generate() for name in KNOWN_PRODUCERS}
    pem = private[service].private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode("ascii")
    producers = "".join(f"{name}:{raw_public_b64(key.public_key())}\n" for name, key in private.items())
    return {"bus_signing_key.pem": pem, "bus_producer_keys": producers}


# --- Kong (decK) ------------------------------------------------------------------------------
def deck_variables() -> set[str]:
    """The DECK_* variables gateway/kong.yml renders (comment lines are not rendered by decK)."""
    text = "\n".join(line for line in KONG_FILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    return set(_DECK_ENV.findall(text))


def render_kong(environ: Mapping[str, str]) -> dict:
    """gateway/kong.yml after decK's env templating, parsed."""
    from services.gateway.declarative.template import render

    return yaml.safe_load(render(KONG_FILE.read_text(), environ))


@dataclass(frozen=True)
class Upstream:
    kong_service: str
    host: str
    port: int


def kong_upstreams(config: dict) -> list[Upstream]:
    """Each Kong service's host and port, as the gateway's loader reads them (`url` expanded, Kong's defaults)."""
    from services.gateway.declarative.loader import load_services

    return [Upstream(service.name or service.id, service.host, service.port) for service in load_services(config)]
