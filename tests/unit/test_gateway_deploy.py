"""Kong as deployed (compose and Kubernetes): its access log never records a URI, and it is told which
proxies to trust. Read the way compose and Kubernetes read the manifests, no engine needed."""

from __future__ import annotations

import re

import pytest

from tests.docker import deploy_files as d

# nginx variables that cannot carry a path, a query string, a header value or a client address.
ALLOWED_LOG_VARIABLES = {"time_iso8601", "time_local", "msec", "kong_request_id", "request_method", "status",
                         "request_time", "upstream_response_time", "upstream_connect_time", "upstream_header_time",
                         "upstream_status", "body_bytes_sent", "bytes_sent", "request_length", "server_protocol"}
_LOG_FORMAT = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?: escape=(?:json|default|none))? '(?P<format>[^']*)'$")


def compose_kong_env() -> dict[str, str]:
    env = d.environment_of(d.load_compose()["services"]["kong"])
    return d.interpolate(env, {})  # only the defaults: what compose passes when .env sets nothing


def k8s_kong_env() -> dict[str, str]:
    container = d.k8s_objects("Deployment")["kong"]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


DEPLOYMENTS = pytest.mark.parametrize("kong_env", [compose_kong_env, k8s_kong_env], ids=["compose", "kubernetes"])


@DEPLOYMENTS
def test_the_proxy_access_log_uses_a_format_without_the_request_line(kong_env):
    env = kong_env()
    target, name = env["KONG_PROXY_ACCESS_LOG"].split()
    assert target == "/dev/stdout"
    match = _LOG_FORMAT.match(env["KONG_NGINX_HTTP_LOG_FORMAT"])
    assert match, env["KONG_NGINX_HTTP_LOG_FORMAT"]
    assert match["name"] == name  # the format the access log names is the one injected into nginx's http block
    used = set(re.findall(r"\$(\w+)", match["format"]))
    assert used and used <= ALLOWED_LOG_VARIABLES, used - ALLOWED_LOG_VARIABLES
    assert "kong_request_id" in used and "status" in used


def test_compose_and_kubernetes_log_the_same_fields():
    assert compose_kong_env()["KONG_NGINX_HTTP_LOG_FORMAT"] == k8s_kong_env()["KONG_NGINX_HTTP_LOG_FORMAT"]


@DEPLOYMENTS
def test_kong_is_told_which_proxies_to_trust(kong_env):
    env = kong_env()
    assert env["KONG_REAL_IP_HEADER"] == "X-Forwarded-For"
    trusted = env["KONG_TRUSTED_IPS"]
    assert trusted == "192.0.2.0/24"  # the documented placeholder, which trusts no real peer
    assert "0.0.0.0/0" not in trusted and "::/0" not in trusted


def test_compose_lets_dot_env_set_the_trusted_proxies():
    env = d.interpolate(d.environment_of(d.load_compose()["services"]["kong"]),
                        {"KONG_TRUSTED_IPS": "172.18.0.1", "KONG_REAL_IP_HEADER": "proxy_protocol"})
    assert (env["KONG_TRUSTED_IPS"], env["KONG_REAL_IP_HEADER"]) == ("172.18.0.1", "proxy_protocol")


def test_the_partner_api_key_is_read_from_the_header_only():
    config = d.render_kong({name: "x" for name in d.deck_variables()})
    plugins = [p for s in config["services"] for r in s.get("routes") or [] for p in r.get("plugins") or []]
    key_auth = [p["config"] for p in plugins if p["name"] == "key-auth"]
    assert key_auth and all(c["key_in_query"] is False for c in key_auth)
