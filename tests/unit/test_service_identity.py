"""Service identities: the token cache, acting_as, client credentials and their configuration."""

from __future__ import annotations

import base64
import functools
import threading
import time

import pytest

from services.directory import config, tokens
from services.directory.service_clients import ServiceClients
from services.kit.auth import current_identity
from services.kit.errors import NotFound, Unauthenticated
from services.kit.service_identity import IssuedToken, ServiceTokens, acting_as
from services.kit.settings import (
    SERVICE_CLIENT_NAMES,
    SettingsError,
    secret_digest,
    service_client_credentials,
)
from tests.helpers import Clock

PHI_KEYS = "k1:" + base64.b64encode(b"p" * 32).decode()


class FakeIssuer:
    """Stands in for directory's IssueServiceToken: counts calls, hands out numbered tokens."""

    def __init__(self, expires_in: int = 900, delay_s: float = 0.0):
        self.expires_in = expires_in
        self.delay_s = delay_s
        self.calls: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, client_id: str, secret: str, agency_id: str) -> IssuedToken:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.calls.append((client_id, secret, agency_id))
            return IssuedToken(f"token-{len(self.calls)}-{agency_id or 'platform'}", self.expires_in)


def service_tokens(issuer, clock=None) -> ServiceTokens:
    return ServiceTokens("unused:0", "inbox", "s3cret", issuer=issuer, clock=clock or time.monotonic)


# --- ServiceTokens -------------------------------------------------------------------------------


def test_a_token_is_cached_per_agency_until_a_minute_before_it_expires():
    issuer, clock = FakeIssuer(expires_in=900), Clock()
    tokens_ = service_tokens(issuer, clock)
    first = tokens_.identity("agy_a")
    assert first.kind == "service" and first.agency_id == "agy_a" and first.subject == "svc:inbox"
    assert first.roles == frozenset({"service"}) and first.token == "token-1-agy_a"
    clock.now += 839
    assert tokens_.identity("agy_a") is first
    assert tokens_.token("") == "token-2-platform"  # another scope, its own token
    clock.now += 1  # 840 s: 60 s before expiry
    assert tokens_.identity("agy_a").token == "token-3-agy_a"
    assert issuer.calls == [("inbox", "s3cret", "agy_a"), ("inbox", "s3cret", ""), ("inbox", "s3cret", "agy_a")]


def test_a_very_short_lived_token_is_not_cached():
    issuer, clock = FakeIssuer(expires_in=30), Clock()
    tokens_ = service_tokens(issuer, clock)
    tokens_.identity()
    tokens_.identity()
    assert len(issuer.calls) == 2


def test_concurrent_callers_share_one_request_per_agency():
    issuer = FakeIssuer(delay_s=0.05)
    tokens_ = service_tokens(issuer)
    seen: list[str] = []
    threads = [
        threading.Thread(target=lambda a=agency: seen.append(tokens_.token(a))) for agency in ["agy_a", "agy_b"] * 8
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(agency for _, _, agency in issuer.calls) == ["agy_a", "agy_b"]
    assert len(set(seen)) == 2


def test_forget_drops_a_cached_token():
    issuer = FakeIssuer()
    tokens_ = service_tokens(issuer)
    tokens_.identity("agy_a")
    tokens_.forget("agy_a")
    tokens_.identity("agy_a")
    tokens_.forget()
    tokens_.identity("agy_a")
    assert len(issuer.calls) == 3


def test_a_refusal_is_raised_and_nothing_is_cached():
    issuer = FakeIssuer()
    refusals = []

    def refuse_once(*args):
        if not refusals:
            refusals.append(args)
            raise Unauthenticated("unauthenticated", "refused")
        return issuer(*args)

    tokens_ = service_tokens(refuse_once)
    with pytest.raises(Unauthenticated):
        tokens_.identity("agy_a")
    assert tokens_.identity("agy_a").token == "token-1-agy_a"  # asked again, not a cached failure
    assert len(refusals) == 1 and len(issuer.calls) == 1


def test_acting_as_sets_the_identity_for_the_block_only():
    identity = service_tokens(FakeIssuer()).identity("agy_a")
    assert current_identity.get() is None
    with acting_as(identity) as inside:
        assert current_identity.get() is identity is inside
    assert current_identity.get() is None
    with pytest.raises(RuntimeError), acting_as(identity):
        raise RuntimeError("boom")
    assert current_identity.get() is None


# --- directory: SERVICE_CLIENTS ----------------------------------------------------------------------


@functools.cache
def pem() -> str:
    return tokens.generate_private_key_pem()


def directory_environ(tmp_path, **values: str) -> dict[str, str]:
    return {"CLINIC_RUN_DIR": str(tmp_path), "PHI_MASTER_KEYS": PHI_KEYS, "JWT_SIGNING_KEYS": pem(), **values}


def test_development_registers_every_known_client_with_its_dev_secret(tmp_path):
    settings = config.load(directory_environ(tmp_path))
    assert sorted(settings.service_clients) == sorted(SERVICE_CLIENT_NAMES)
    for name in SERVICE_CLIENT_NAMES:
        secret = (tmp_path / "secrets" / f"service-{name}.secret").read_text().strip()
        assert settings.service_clients[name] == (secret_digest(secret),)
        assert (tmp_path / "secrets" / f"service-{name}.secret").stat().st_mode & 0o077 == 0
    # The calling service reads the very same secret.
    assert (
        service_client_credentials("inbox", {"CLINIC_RUN_DIR": str(tmp_path)}).secret
        == (tmp_path / "secrets" / "service-inbox.secret").read_text().strip()
    )


def test_service_clients_are_required_in_production(tmp_path):
    production = directory_environ(
        tmp_path,
        CLINIC_MODE="production",
        MONGO_URI="mongodb://db.internal:27017/",
        GATEWAY_IDENTITY_KEY="k" * 40,
        CLINIC_TRUSTED_NETWORK="1",  # plaintext links accepted (test_transport_settings.py covers them)
    )
    with pytest.raises(SettingsError) as caught:
        config.load(production)
    assert any("SERVICE_CLIENTS" in problem for problem in caught.value.problems)
    digest = secret_digest("inbox-secret")
    settings = config.load({**production, "SERVICE_CLIENTS": f"inbox:{digest}, notifications:{'A' * 64}"})
    assert settings.service_clients == {"inbox": (digest,), "notifications": ("a" * 64,)}
    assert not (tmp_path / "secrets").exists()


def test_service_clients_can_come_from_a_file(tmp_path):
    listing = tmp_path / "clients"
    listing.write_text(f"web:{secret_digest('w')}\n")
    settings = config.load(directory_environ(tmp_path, SERVICE_CLIENTS_FILE=str(listing)))
    assert settings.service_clients == {"web": (secret_digest("w"),)}


def test_a_client_may_have_two_secrets_while_rotating(tmp_path):
    old, new = secret_digest("old"), secret_digest("new")
    settings = config.load(directory_environ(tmp_path, SERVICE_CLIENTS=f"inbox:{old},inbox:{new},inbox:{new}"))
    assert settings.service_clients == {"inbox": (old, new)}
    keys = tokens.KeySet.from_pem(pem())
    rotating = ServiceClients(settings.service_clients, Agencies(), keys, ttl_s=900)  # type: ignore[arg-type]
    assert rotating.authenticate("inbox", "old") and rotating.authenticate("inbox", "new")
    assert not rotating.authenticate("inbox", "neither")


@pytest.mark.parametrize(
    "value",
    [
        "inbox",
        "inbox:abc",
        f"Inbox:{'a' * 64}",
        f"inbox:{'g' * 64}",
        f"inbox:{'a' * 64},web",
        ",",
    ],
)
def test_malformed_service_clients_are_refused(tmp_path, value):
    with pytest.raises(SettingsError) as caught:
        config.load(directory_environ(tmp_path, SERVICE_CLIENTS=value))
    assert all("SERVICE_CLIENTS" in problem for problem in caught.value.problems)
    assert "a" * 64 not in str(caught.value)


def test_a_calling_service_needs_its_secret_in_production(tmp_path):
    production = {"CLINIC_MODE": "production", "CLINIC_RUN_DIR": str(tmp_path)}
    with pytest.raises(SettingsError) as caught:
        service_client_credentials("inbox", production)
    assert "SERVICE_CLIENT_SECRET" in str(caught.value)
    secret_file = tmp_path / "inbox.secret"
    secret_file.write_text("from-a-file\n")
    credentials = service_client_credentials("inbox", {**production, "SERVICE_CLIENT_SECRET_FILE": str(secret_file)})
    assert credentials.client_id == "inbox" and credentials.secret == "from-a-file"
    assert "from-a-file" not in repr(credentials)


# --- directory: issuing ------------------------------------------------------------------------------


class Agencies:
    def get_agency(self, agency_id: str):
        return object() if agency_id == "agy_riverbend" else None


def clients() -> ServiceClients:
    keys = tokens.KeySet.from_pem(pem())
    return ServiceClients({"inbox": (secret_digest("right"),)}, Agencies(), keys, ttl_s=900)  # type: ignore[arg-type]


def test_client_credentials_are_checked():
    service_clients = clients()
    assert service_clients.authenticate("inbox", "right")
    for client_id, secret in [("inbox", "wrong"), ("inbox", ""), ("web", "right"), ("", ""), ("inbox", "x" * 5000)]:
        assert not service_clients.authenticate(client_id, secret)
        with pytest.raises(Unauthenticated) as caught:
            service_clients.issue(client_id, secret, "agy_riverbend")
        assert caught.value.code == "invalid_client"


def test_issued_tokens_are_scoped_to_an_existing_agency_or_the_platform():
    service_clients = clients()
    assert service_clients.issue("inbox", "right", "agy_riverbend").expires_in == 900
    assert service_clients.issue("inbox", "right", "").token
    for agency in ("agy_nowhere", "../x"):
        with pytest.raises(NotFound):
            service_clients.issue("inbox", "right", agency)
