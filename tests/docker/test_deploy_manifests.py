"""deploy/ checked statically, without a Docker engine or a cluster.

Every YAML file parses; the image is built and run the way the house style asks; every
Deployment is probed, limited, non-root and read-only; Kong's upstreams (gateway/kong.yml as decK
renders it) are hosts that exist in compose and in the Kubernetes Services; and each service's own
config.load() and its bus keys accept in production what compose and the Kubernetes ConfigMap and
Secret template give it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.docker import deploy_files as d

SERVICES = d.deployed_services()
PEM_STAND_IN = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----\n"


def test_every_service_is_deployed_by_compose_and_kubernetes():
    assert {"directory", "inbox"} <= set(SERVICES)
    compose_services = d.load_compose()["services"]
    deployments = d.k8s_objects("Deployment")
    for name in SERVICES:
        assert name in compose_services, f"services/{name} has no service in {d.COMPOSE_FILE}"
        assert name in deployments, f"services/{name} has no Deployment in {d.K8S}"


@pytest.mark.parametrize("path", sorted([*d.DEPLOY.rglob("*.yml"), *d.DEPLOY.rglob("*.yaml")]), ids=str)
def test_every_yaml_file_parses(path):
    documents = list(d.yaml_documents(path))
    assert documents, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in documents)


# --- the image ----------------------------------------------------------------------------------
def dockerfile_stages() -> list[list[str]]:
    stages: list[list[str]] = []
    text = re.sub(r"\\\n", " ", d.DOCKERFILE.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_image_is_multi_stage_python_311_slim():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", d.DOCKERFILE.read_text(), re.M)
    assert all(stage[0].startswith("FROM ${PYTHON_IMAGE}") for stage in stages)


def test_build_stage_installs_the_lock_and_generates_the_protos():
    build = " ".join(dockerfile_stages()[0])
    assert "install -r requirements.lock" in build
    assert "grpc_tools.protoc" in build and "find protos -name '*.proto'" in build
    # The same protoc invocation as `make protos`.
    makefile = (d.REPO / "Makefile").read_text()
    assert "--python_out=. --pyi_out=. --grpc_python_out=." in makefile
    assert "--python_out=. --pyi_out=. --grpc_python_out=." in build


def test_final_stage_is_non_root_and_carries_no_dev_tools():
    final = dockerfile_stages()[-1]
    text = "\n".join(final)
    assert "USER 10001:10001" in final
    assert "useradd" in text and "--uid 10001" in text
    assert 'ENTRYPOINT ["python", "-m"]' in final
    assert re.search(r'^CMD \["services\.\w+"\]$', text, re.M)
    # Only the runtime virtualenv (pyproject's dependencies) is copied; no pip install happens here.
    assert "pip install" not in text and "requirements.lock" not in text
    assert "COPY --from=build /opt/venv /opt/venv" in final
    for dev_tool in ("pytest", "ruff", "hypothesis", "grpcio-tools", "mypy"):
        assert dev_tool not in text


def test_runtime_dependencies_leave_the_dev_extras_out():
    import tomllib

    project = tomllib.loads((d.REPO / "pyproject.toml").read_text())["project"]
    runtime = {re.split(r"[=<>!~ ]", dep)[0].lower() for dep in project["dependencies"]}
    dev = {re.split(r"[=<>!~ ]", dep)[0].lower() for dep in project["optional-dependencies"]["dev"]}
    assert "grpcio-health-checking" in runtime  # the compose healthchecks import it
    assert not runtime & dev


def test_build_context_ignores_everything_but_the_sources():
    lines = (d.DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {"requirements.lock", "pyproject.toml", "protos", "services"}
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", d.DOCKERFILE.read_text(), re.M))
    assert {c.rstrip("/") for c in copied} <= allowed


# --- Docker Compose -----------------------------------------------------------------------------
def compose_service_env(compose: dict, name: str, variables: dict[str, str]) -> dict[str, str]:
    return d.interpolate(d.environment_of(compose["services"][name]), variables)


def test_make_secrets_generates_every_secret_and_variable_compose_needs(compose, generated_secrets):
    workdir, variables = generated_secrets
    for name, secret in compose["secrets"].items():
        path = workdir / secret["file"]
        assert path.is_file() and path.stat().st_size > 0, name
        # Bind-mounted secrets keep the host mode; the containers run as other users.
        assert path.stat().st_mode & stat.S_IROTH, f"{name} must be readable by the container user"
    assert stat.S_IMODE((workdir / "secrets").stat().st_mode) == 0o700
    assert stat.S_IMODE((workdir / ".env").stat().st_mode) == 0o600
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", d.COMPOSE_FILE.read_text()))
    assert required and required <= set(variables), required - set(variables)
    d.interpolate(compose, variables)  # raises if anything required is missing


def test_compose_git_ignores_the_generated_secrets():
    ignored = (d.COMPOSE_DIR / ".gitignore").read_text().split()
    assert "/secrets/" in ignored and "/.env" in ignored
    assert "/kong/kong.rendered.yml" in (d.K8S / ".gitignore").read_text().split()


def test_compose_runs_every_service_in_production_mode_and_hardened(compose):
    services = compose["services"]
    for name in SERVICES:
        service = services[name]
        env = d.environment_of(service)
        assert service["command"] == [f"services.{d.package(name)}"]
        assert (d.REPO / "services" / d.package(name) / "__main__.py").exists()
        assert env["CLINIC_MODE"] == "production"
        assert env["HTTP_HOST"] == "0.0.0.0"
        assert name in d.HTTP_ONLY or env["GRPC_HOST"] == "0.0.0.0"
        assert service["read_only"] is True and "/tmp" in service["tmpfs"]
        assert service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        assert (d.COMPOSE_DIR / service["build"]["context"]).resolve() == d.REPO
        assert (d.REPO / service["build"]["dockerfile"]).resolve() == d.DOCKERFILE


def test_compose_healthchecks_and_dependency_conditions(compose):
    services = compose["services"]
    running = d.long_running(services)
    for name, service in running.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
    adopted = set()
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for dependency, rule in depends.items():
            expected = "service_healthy" if dependency in running else "service_completed_successfully"
            assert rule["condition"] == expected, f"{name} -> {dependency}"
            if name in running:
                adopted.add(dependency)
    # `up --wait` treats an exited one-shot as failed unless a running service waits for it.
    assert set(services) - set(running) <= adopted


def test_compose_healthchecks_ask_the_services_grpc_health_over_their_mtls(compose):
    for name in SERVICES:
        service = compose["services"][name]
        if name in d.HTTP_ONLY:
            port = d.environment_of(service)[f"{d.env_prefix(name)}_HTTP_PORT"]
            assert f"127.0.0.1:{port}/healthz" in " ".join(service["healthcheck"]["test"])
            continue
        port = d.environment_of(service)[f"{d.env_prefix(name)}_GRPC_PORT"]
        # services.kit.transport's health check: the service's own GRPC_TLS_* (mutual TLS), at 127.0.0.1.
        assert service["healthcheck"]["test"] == [
            "CMD", "python", "-m", "services.kit.transport", "health", f"127.0.0.1:{port}"
        ]  # fmt: skip


@pytest.mark.parametrize("service", SERVICES)
def test_compose_gives_each_service_what_production_requires(compose, generated_secrets, service, tmp_path):
    workdir, variables = generated_secrets
    env = compose_service_env(compose, service, variables)
    groups = d.required_in_production(service)
    assert groups, f"{service}: expected load() to refuse an empty production environment"
    for group in groups:
        assert group & set(env), f"{service} gets none of {sorted(group)} in compose"
    # *_FILE settings point at compose secrets this service mounts (the files make-secrets.sh wrote), a mounted
    # folder (partners' Direct certificates) gets an empty one; then load() must accept it all.
    env = d.compose_environment_on_host(compose, service, workdir, variables, tmp_path)
    assert d.production_problems(service, env) == []


def test_compose_mongodb_is_a_replica_set_with_one_user_per_service(compose, generated_secrets):
    _, variables = generated_secrets
    services = compose["services"]
    command = " ".join(services["mongo"]["entrypoint"]).split()
    replica_set = command[command.index("--replSet") + 1]
    assert "--keyFile" in command and "docker-entrypoint.sh" in command
    init_env = d.environment_of(services["mongo-init"])
    assert init_env["MONGO_REPLICA_SET"] == replica_set
    script = (d.COMPOSE_DIR / "mongo" / "init-replica-set.js").read_text()
    for name in SERVICES:
        if name in d.HTTP_ONLY:
            assert "MONGO_URI" not in compose_service_env(compose, name, variables)
            continue
        uri = compose_service_env(compose, name, variables)["MONGO_URI"]
        assert f"replicaSet={replica_set}" in uri and "w=majority" in uri
        assert uri.startswith(f"mongodb://{name}:")
        assert f'["{name}", "MONGO_{d.env_prefix(name)}_PASSWORD"]' in script
        assert f"MONGO_{d.env_prefix(name)}_PASSWORD" in init_env


def test_kong_config_renders_kong_yml_with_every_deck_variable(compose):
    services = compose["services"]
    render = services["kong-config"]
    assert render["image"].startswith("kong/deck:")
    assert render["command"][:3] == ["file", "render", "--populate-env-vars"]
    assert d.deck_variables() <= set(d.environment_of(render))
    output = render["command"][render["command"].index("--output-file") + 1]
    kong_env = d.environment_of(services["kong"])
    assert kong_env["KONG_DATABASE"] == "off"
    assert kong_env["KONG_DECLARATIVE_CONFIG"] == output
    shared = {v.split(":")[0] for v in render["volumes"]} & {v.split(":")[0] for v in services["kong"]["volumes"]}
    assert any(output.startswith(v.split(":")[1]) for v in services["kong"]["volumes"] if v.split(":")[0] in shared)
    assert services["kong"]["image"].startswith("kong:3.9")
    assert any(str(port).endswith(":8000") for port in services["kong"]["ports"])


def test_kong_routes_reach_services_that_exist_in_compose(compose, generated_secrets):
    _, variables = generated_secrets
    deck_env = compose_service_env(compose, "kong-config", variables)
    config = d.render_kong(deck_env)
    upstreams = d.kong_upstreams(config)
    assert {u.host for u in upstreams} >= {"directory", "inbox"}
    for upstream in upstreams:
        assert upstream.host in compose["services"], upstream
        assert upstream.host in SERVICES, upstream
        key = "WEB_EVENTS_PORT" if upstream.kong_service == "web-events" else f"{d.env_prefix(upstream.host)}_HTTP_PORT"
        http_port = d.environment_of(compose["services"][upstream.host])[key]
        assert upstream.port == int(http_port), upstream
    # The multi-line public key survives .env -> compose -> decK's indent.
    keys = [s["rsa_public_key"] for c in config["consumers"] for s in c.get("jwt_secrets") or []]
    public_key = (generated_secrets[0] / "secrets" / "jwt_public_key.pem").read_text()
    assert keys and all(k.strip() == public_key.strip() for k in keys)


def test_docker_compose_itself_accepts_the_file(generated_secrets):
    """`docker compose config` needs the compose plugin, not an engine: skipped only where the plugin is missing."""
    workdir, _ = generated_secrets
    problem = d.compose_plugin_problem()
    if problem:
        pytest.skip(f"`docker compose config` cannot run: {problem}")
    result = subprocess.run(
        ["docker", "compose", "-f", str(workdir / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=workdir,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- Kubernetes ---------------------------------------------------------------------------------
DEPLOYMENTS = d.k8s_objects("Deployment")
K8S_SERVICES = d.k8s_objects("Service")


def test_kustomization_lists_existing_files_and_not_the_secret_template():
    kustomization = d.load_kustomization()
    for name in kustomization["resources"]:
        assert (d.K8S / name).is_file(), name
    assert "secrets.template.yaml" not in kustomization["resources"]
    assert kustomization["namespace"] == "clinic"
    namespaces = d.k8s_objects("Namespace")
    assert namespaces["clinic"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_kubernetes_object_names_its_api_kind_and_name():
    for path in [*(d.K8S / name for name in d.load_kustomization()["resources"]), d.K8S / "secrets.template.yaml"]:
        for doc in d.yaml_documents(path):
            where = f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            api = doc.get("apiVersion")
            assert api == "v1" or (isinstance(api, str) and "/" in api), where  # core, or group/version
            assert isinstance(doc.get("kind"), str) and doc["kind"][:1].isupper(), where
            assert isinstance(doc.get("metadata"), dict) and doc["metadata"].get("name"), where
            # kustomize sets the namespace; a manifest naming another one would be moved silently.
            assert doc["metadata"].get("namespace") in (None, "clinic"), where


def render_kong_for_k8s(workdir: Path) -> Path:
    """deploy/k8s/kong/kong.rendered.yml as render-kong-config.sh writes it (decK's env templating, done
    by the gateway's own renderer: no deck, no docker), with stand-ins for the secret values."""
    from services.gateway.declarative.template import render

    variables = {**d.parse_env_file(d.DECK_ENV), "DECK_DIRECTORY_JWT_PUBLIC_KEY": PEM_STAND_IN}
    variables["DECK_PATIENT_PORTAL_API_KEY"] = "k"
    variables["DECK_LAB_INTERFACE_API_KEY"] = "l"
    variables["DECK_PRACTICE_MANAGEMENT_API_KEY"] = "p"
    variables["DECK_COMPLIANCE_TRACKER_API_KEY"] = "c"
    variables["DECK_DASHBOARDS_API_KEY"] = "d"
    rendered = workdir / "kong" / "kong.rendered.yml"
    rendered.write_text(render(d.KONG_FILE.read_text(), variables))
    plugin = workdir / "kong" / "plugins" / "clinic-identity-signer"  # what render-kong-config.sh copies
    plugin.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(d.REPO / "gateway" / "kong-plugins" / "clinic-identity-signer", plugin)
    return rendered


def test_kustomization_renders_and_validates_without_kubectl(tmp_path):
    """What `kubectl kustomize` needs and relies on, checked without kubectl: every file it reads exists
    once Kong's config is rendered, the rendered config is valid declarative config, the generated
    Secret is the one the Kong Deployment mounts, and every image gets a pinned tag."""
    workdir = tmp_path / "k8s"
    shutil.copytree(d.K8S, workdir, ignore=shutil.ignore_patterns("kong.rendered.yml"))
    rendered = render_kong_for_k8s(workdir)
    kustomization = yaml.safe_load((workdir / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        assert (workdir / name).is_file(), name
    generated = {g["name"]: g for g in kustomization["secretGenerator"]}
    for generator in generated.values():
        for entry in generator["files"]:
            assert (workdir / entry.split("=", 1)[-1]).is_file(), entry
    config = yaml.safe_load(rendered.read_text())
    assert isinstance(config, dict) and str(config["_format_version"]).startswith("3")
    assert {u.host.split(".")[0] for u in d.kong_upstreams(config)} >= {"directory", "inbox"}  # the gateway's loader
    assert "${{" not in rendered.read_text() and "DECK_" not in rendered.read_text()  # every variable filled in
    kong = DEPLOYMENTS["kong"]["spec"]["template"]["spec"]
    secret_volumes = {v["secret"]["secretName"] for v in kong["volumes"] if "secret" in v}
    assert "kong-declarative-config" in secret_volumes and "kong-declarative-config" in generated
    pinned = {image["name"]: image for image in kustomization["images"]}
    for name, deployment in DEPLOYMENTS.items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            image = container["image"]
            assert ":" in image or pinned.get(image, {}).get("newTag"), f"{name}: {image} gets no tag"


def test_secret_template_holds_no_real_secret():
    for name, values in d.secret_template().items():
        for key, value in values.items():
            assert "REPLACE" in str(value), f"{name}.{key} looks like a real value"


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_every_deployment_is_probed_limited_non_root_and_read_only(name):
    pod = DEPLOYMENTS[name]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] >= 15
    for container in pod["containers"]:
        assert container.get("readinessProbe") and container.get("livenessProbe"), container["name"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{container['name']} {kind}"
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["runAsNonRoot"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        writable = {m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")}
        assert "/tmp" in writable, f"{container['name']} needs a writable /tmp on a read-only root"
    assert "replicas" not in DEPLOYMENTS[name]["spec"], "the HorizontalPodAutoscaler owns the replica count"


@pytest.mark.parametrize("service", SERVICES)
def test_python_services_probe_grpc_health_over_mtls_on_their_grpc_port(service):
    config = d.k8s_objects("ConfigMap")["clinic-config"]["data"]
    container = DEPLOYMENTS[service]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [f"services.{d.package(service)}"]
    assert container["image"] == "clinic-message-board"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(config[f"{d.env_prefix(service)}_HTTP_PORT"])
    if service in d.HTTP_ONLY:
        assert "grpc" not in ports
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] == "http", probe
    else:
        grpc_port = int(config[f"{d.env_prefix(service)}_GRPC_PORT"])
        assert ports["grpc"] == grpc_port
        # The kubelet's native gRPC probe speaks plaintext, which the mTLS-only server refuses: the container
        # asks itself with its own certificate instead.
        health = ["python", "-m", "services.kit.transport", "health", f"127.0.0.1:{grpc_port}"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == health, probe
            assert container[probe]["timeoutSeconds"] >= 5, f"{probe}: a Python process needs time to start"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    grace = DEPLOYMENTS[service]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop[0] == "sleep" and grace >= int(pre_stop[1]) + 10


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_each_deployment_has_a_service_autoscaler_and_disruption_budget(name):
    deployment = DEPLOYMENTS[name]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = K8S_SERVICES[name]
    assert service["spec"]["selector"].items() <= labels.items()
    container_ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    hpa = d.k8s_objects("HorizontalPodAutoscaler")[name]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = d.k8s_objects("PodDisruptionBudget")[name]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_gives_each_service_what_production_requires(service, tmp_path):
    pod = DEPLOYMENTS[service]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = d.k8s_environment(container)
    groups = d.required_in_production(service)
    assert groups
    for group in groups:
        assert group & set(env), f"{service} gets none of {sorted(group)} from the ConfigMap and Secrets"
    assert env["CLINIC_MODE"] == "production"
    assert env["GRPC_HOST"] == env["HTTP_HOST"] == "0.0.0.0"
    # Stand-ins with the right shape replace the template's placeholders (and the certificates cert-manager
    # issues), then load() must accept it all.
    env = d.k8s_environment_on_host(service, tmp_path, d.k8s_file_stand_ins(service, tmp_path))
    assert d.production_problems(service, env) == []


def test_k8s_jwks_and_grpc_targets_name_real_services():
    config = d.k8s_objects("ConfigMap")["clinic-config"]["data"]
    host, port = config["DIRECTORY_GRPC_TARGET"].rsplit(":", 1)
    assert host in K8S_SERVICES and int(port) in {p["port"] for p in K8S_SERVICES[host]["spec"]["ports"]}
    jwks = re.match(r"http://([a-z0-9-]+):(\d+)/", config["DIRECTORY_JWKS_URL"])
    assert jwks and jwks.group(1) in K8S_SERVICES
    assert int(jwks.group(2)) in {p["port"] for p in K8S_SERVICES[jwks.group(1)]["spec"]["ports"]}


def test_kong_routes_reach_services_that_exist_in_kubernetes():
    variables = d.parse_env_file(d.DECK_ENV)
    missing = d.deck_variables() - set(variables)
    # The secret values are exported by whoever renders (render-kong-config.sh insists on them).
    assert missing == {
        "DECK_DIRECTORY_JWT_PUBLIC_KEY",
        "DECK_PATIENT_PORTAL_API_KEY",
        "DECK_LAB_INTERFACE_API_KEY",
        "DECK_PRACTICE_MANAGEMENT_API_KEY",
        "DECK_COMPLIANCE_TRACKER_API_KEY",
        "DECK_DASHBOARDS_API_KEY",
    }
    secret_stand_ins = {
        "DECK_DIRECTORY_JWT_PUBLIC_KEY": PEM_STAND_IN,
        "DECK_PATIENT_PORTAL_API_KEY": "k",
        "DECK_LAB_INTERFACE_API_KEY": "l",
        "DECK_PRACTICE_MANAGEMENT_API_KEY": "p",
        "DECK_COMPLIANCE_TRACKER_API_KEY": "c",
        "DECK_DASHBOARDS_API_KEY": "d",
    }
    config = d.render_kong({**variables, **secret_stand_ins})
    namespace = d.load_kustomization()["namespace"]
    upstreams = d.kong_upstreams(config)
    assert {u.host.split(".")[0] for u in upstreams} >= {"directory", "inbox"}
    for upstream in upstreams:
        name, _, domain = upstream.host.partition(".")
        assert domain in ("", f"{namespace}.svc", f"{namespace}.svc.cluster.local"), upstream
        assert name in K8S_SERVICES and name in SERVICES, upstream
        assert upstream.port in {p["port"] for p in K8S_SERVICES[name]["spec"]["ports"]}, upstream
        config_map = d.k8s_objects("ConfigMap")["clinic-config"]["data"]
        key = "WEB_EVENTS_PORT" if upstream.kong_service == "web-events" else f"{d.env_prefix(name)}_HTTP_PORT"
        assert upstream.port == int(config_map[key]), upstream


def test_kong_runs_db_less_from_the_generated_secret():
    kustomization = d.load_kustomization()
    generated = {g["name"]: g for g in kustomization["secretGenerator"]}
    files = dict(f.split("=", 1) for f in generated["kong-declarative-config"]["files"])
    assert files == {"kong.yml": "kong/kong.rendered.yml"}
    pod = DEPLOYMENTS["kong"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KONG_DATABASE"] == "off"
    secret, key = d.mounted_secret_file(pod, container, env["KONG_DECLARATIVE_CONFIG"])
    assert (secret, key) == ("kong-declarative-config", "kong.yml")
    assert container["image"].startswith("kong:3.9")
    prefix = env["KONG_PREFIX"]
    assert any(m["mountPath"] == prefix and not m.get("readOnly") for m in container["volumeMounts"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "status"
    assert "8100" in env["KONG_STATUS_LISTEN"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (the kubectl-free checks ran)")
def test_kustomize_builds_with_a_rendered_kong_config(tmp_path):
    workdir = tmp_path / "k8s"
    shutil.copytree(d.K8S, workdir, ignore=shutil.ignore_patterns("kong.rendered.yml"))
    render_kong_for_k8s(workdir)
    command = ["kubectl", "kustomize", str(workdir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert all(o["metadata"].get("namespace") == "clinic" for o in objects if o["kind"] != "Namespace")
    generated = next(o for o in objects if o["kind"] == "Secret")
    assert generated["metadata"]["name"].startswith("kong-declarative-config-")
    kong = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "kong")
    volumes = {v["name"]: v for v in kong["spec"]["template"]["spec"]["volumes"]}
    assert volumes["declarative-config"]["secret"]["secretName"] == generated["metadata"]["name"]
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    images = {c["image"] for o in deployments for c in o["spec"]["template"]["spec"]["containers"]}
    assert all(":" in image for image in images), images


def test_scripts_are_executable():
    for script in (d.MAKE_SECRETS, d.K8S / "render-kong-config.sh"):
        assert os.access(script, os.X_OK), script
        assert Path(script).read_text().startswith("#!/usr/bin/env bash\n")
