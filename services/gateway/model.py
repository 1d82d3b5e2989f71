"""The validated configuration the gateway serves: Kong's entities after defaults and references."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Service:
    id: str
    name: str | None
    protocol: str
    host: str
    port: int
    path: str | None
    retries: int
    connect_timeout: int  # milliseconds, as in Kong
    write_timeout: int
    read_timeout: int
    enabled: bool

    @property
    def host_header(self) -> str:
        """The Host Kong sends upstream when preserve_host is off: the port only when not 80 (plain http)."""
        return self.host if self.port == 80 else f"{self.host}:{self.port}"


@dataclass(eq=False)
class Route:
    id: str
    name: str | None
    service: Service
    protocols: list[str]
    methods: list[str]
    paths: list[str]
    strip_path: bool
    preserve_host: bool
    order: int  # declaration order, the last tie-breaker between equally specific routes


@dataclass(eq=False)
class Consumer:
    id: str
    username: str | None
    custom_id: str | None
    groups: list[str] = field(default_factory=list)


@dataclass(eq=False)
class JwtSecret:
    id: str
    key: str
    algorithm: str
    secret: str | None
    consumer: Consumer
    verifier: Any = None  # the parsed public key, or the HMAC secret's bytes; set once by the loader


@dataclass(eq=False)
class KeyAuthCredential:
    id: str
    key: str
    consumer: Consumer


Credential = JwtSecret | KeyAuthCredential


@dataclass(eq=False)
class PluginInstance:
    """One `plugins:` entry: where it applies and its validated config (defaults filled in)."""

    id: str
    name: str
    config: dict
    protocols: list[str]
    enabled: bool
    route: Route | None = None
    service: Service | None = None
    path: str = ""  # where it was declared, for messages


@dataclass
class GatewayModel:
    services: list[Service]
    routes: list[Route]
    consumers: list[Consumer]
    plugins: list[PluginInstance]
    jwt_secrets: dict[str, JwtSecret]
    keyauth_credentials: dict[str, KeyAuthCredential]

    def consumer_by_id_or_username(self, ref: str) -> Consumer | None:
        return find_consumer(self.consumers, ref)


def find_consumer(consumers: list[Consumer], ref: str) -> Consumer | None:
    """How Kong resolves a plugin's `anonymous`: a consumer's id or username."""
    for consumer in consumers:
        if ref in (consumer.id, consumer.username):
            return consumer
    return None
