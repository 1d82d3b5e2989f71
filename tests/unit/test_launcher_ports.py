"""`make run` beside another copy: PORT_BASE and the port variables (services.launcher)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from services.kit.settings import REPO_ROOT
from services.launcher import (
    DEFAULT_AMQP_URL,
    LaunchError,
    Ports,
    Stack,
    StackConfig,
    _default_config,
    port_variable,
)


def test_without_settings_the_ports_and_places_are_the_usual_ones():
    config = _default_config({})
    assert config.ports == Ports()
    assert config.run_dir == (REPO_ROOT / ".run").resolve()
    assert config.amqp_url == DEFAULT_AMQP_URL


def test_one_port_base_moves_every_port_the_run_folder_and_the_vhost():
    config = _default_config({"PORT_BASE": "9000"})
    ports = [getattr(config.ports, f.name) for f in fields(Ports)]
    assert config.ports.gateway == 9000
    assert sorted(ports) == list(range(9000, 9000 + len(ports)))  # one block, nothing shared
    assert not set(ports) & set(vars(Ports()).values())  # nothing the first copy uses
    assert config.run_dir == (REPO_ROOT / ".run-9000").resolve()
    assert config.amqp_url == DEFAULT_AMQP_URL + "clinic-9000"


def test_each_port_variable_wins_and_explicit_places_are_kept():
    env = {
        "PORT_BASE": "9000",
        "INBOX_HTTP_PORT": "9700",
        "CLOUD_SMTP_PORT": "2625",
        "CLINIC_RUN_DIR": "/tmp/copy",
        "AMQP_URL": "amqp://u:p@127.0.0.1:5672/mine",
    }
    config = _default_config(env)
    assert config.ports.inbox_http == 9700 and config.ports.cloud_comms_smtp == 2625
    assert config.ports.gateway == 9000
    assert config.run_dir == Path("/tmp/copy").resolve() and config.amqp_url.endswith("/mine")
    assert _default_config({"GATEWAY_PORT": "8800"}).ports.gateway == 8800  # without PORT_BASE too


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PORT_BASE": "nine"}, "PORT_BASE must be a port number"),
        ({"PORT_BASE": "65530"}, "PORT_BASE must be a port number from 1024 to 65511"),
        ({"INBOX_HTTP_PORT": "80"}, "INBOX_HTTP_PORT must be a port number"),
        ({"INBOX_HTTP_PORT": "8000"}, "INBOX_HTTP_PORT and GATEWAY_PORT are both 8000"),
    ],
)
def test_bad_port_settings_are_refused_by_name(env, named):
    with pytest.raises(LaunchError, match=named):
        _default_config(env)


def test_the_port_variables_are_the_ones_the_processes_are_given(tmp_path, monkeypatch):
    """A port variable means the same to the launcher as to the service that listens there."""
    monkeypatch.setattr("services.launcher.jwks_public_pem", lambda _url: "PEM")  # directory is not running
    stack = Stack(StackConfig(run_dir=tmp_path, ports=Ports.from_environment({"PORT_BASE": "12000"})))
    given = {**stack.service_env(), **stack.gateway_env()}
    for f in fields(Ports):
        if f.name == "mongo":  # the embedded database's: part of MONGO_URI
            assert stack.mongo_uri.endswith(f":{stack.config.ports.mongo}/")
            continue
        assert given[port_variable(f.name)] == str(getattr(stack.config.ports, f.name)), f.name


def test_every_service_is_told_which_copy_it_belongs_to(tmp_path, monkeypatch):
    monkeypatch.delenv("CLINIC_DEPLOYMENT", raising=False)
    first = Stack(StackConfig(run_dir=tmp_path / "one")).service_env()["CLINIC_DEPLOYMENT"]
    second = Stack(StackConfig(run_dir=tmp_path / "two")).service_env()["CLINIC_DEPLOYMENT"]
    assert first.startswith("local-") and second.startswith("local-") and first != second
    assert Stack(StackConfig(run_dir=tmp_path / "one")).service_env()["CLINIC_DEPLOYMENT"] == first  # stable
    monkeypatch.setenv("CLINIC_DEPLOYMENT", "clinic-staging")
    assert Stack(StackConfig(run_dir=tmp_path / "one")).service_env()["CLINIC_DEPLOYMENT"] == "clinic-staging"
