"""Notifications settings: the only reader of the environment for this service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from services.kit import gateway_identity, patient_ref
from services.kit.settings import TRUSTED_NETWORK, CommonSettings, Env, common_settings
from services.notifications.mllp import MllpTls
from services.notifications.registrations import Facility

# Development registrations for the demo agencies (services/directory/demo.py); production names its own.
DEV_FACILITIES = "RIVERBEND=agy_riverbend,LAKESIDE=agy_lakeside"
DEV_PARTNERS = (
    "lab-interface=agy_riverbend+agy_lakeside,"
    "practice-management=agy_riverbend+agy_lakeside,"
    "compliance-tracker=agy_riverbend+agy_lakeside"
)


@dataclass(frozen=True)
class NotificationsSettings:
    common: CommonSettings
    http_port: int
    grpc_port: int
    mllp_host: str
    mllp_port: int
    mllp_max_message_bytes: int
    mllp_max_connections: int
    mllp_idle_timeout_s: float
    directory_grpc_target: str
    directory_jwks_url: str
    public_url: str
    max_request_bytes: int
    relay_batch_size: int
    recipients_cache_s: float
    # Receiving facility (MSH-6.1) -> its registration (agency, patient identifier, time zone).
    facilities: dict[str, Facility]
    # Gateway consumer (partner system) -> the agencies it may send for.
    partners: dict[str, frozenset[str]]
    # How often the compliance pass looks for items turning overdue or due for escalation.
    compliance_pass_interval_s: float = 15.0
    # This interface's MSH-11: messages with another processing id (training, debugging) are refused.
    processing_id: str = "P"
    # Keys that prove a partner identity came from the gateway (current first; services.kit.gateway_identity).
    gateway_identity_keys: tuple[str, ...] = field(default=(), repr=False)
    # The key a lab patient's identifier is pseudonymised with in audit records (services.kit.patient_ref).
    patient_ref_keys: patient_ref.PatientRefKeys = field(default=patient_ref.PatientRefKeys(), repr=False)
    # MLLP over TLS (None: plaintext MLLP, which production refuses unless the network is declared trusted).
    mllp_tls: MllpTls | None = None
    # Dashboard consumers (gateway API keys) -> the agencies whose lab feed each may read
    # (services/notifications/dashboards.py; same form as `partners`).
    dashboard_consumers: dict[str, frozenset[str]] = field(default_factory=dict)


def parse_facilities(raw: str, problems: list[str]) -> dict[str, Facility]:
    """'FACILITY=agy_id[;patient_id=TYPE[@AUTHORITY]][;tz=Area/City][,...]'."""
    facilities: dict[str, Facility] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        head, *options = (part.strip() for part in item.split(";"))
        facility, _, agency = head.partition("=")
        facility, agency = facility.strip(), agency.strip()
        if not facility or not agency.startswith("agy_") or "|" in facility or "^" in facility:
            problems.append(f"NOTIFICATIONS_FACILITIES entries must be 'FACILITY=agy_...', got {item!r}")
            continue
        try:
            facilities[facility] = Facility.from_options(agency, options)
        except ValueError as exc:
            problems.append(f"NOTIFICATIONS_FACILITIES entry {facility!r}: {exc}")
    return facilities


def parse_partners(raw: str, problems: list[str]) -> dict[str, frozenset[str]]:
    """'consumer=agy_a+agy_b[,consumer=agy_c...]'."""
    partners: dict[str, frozenset[str]] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        consumer, _, agencies = item.partition("=")
        ids = frozenset(a.strip() for a in agencies.split("+") if a.strip())
        if not consumer.strip() or not ids or not all(a.startswith("agy_") for a in ids):
            problems.append(f"NOTIFICATIONS_PARTNERS entries must be 'consumer=agy_a+agy_b', got {item!r}")
            continue
        partners[consumer.strip()] = ids
    return partners


MLLP_TLS_CERT = "NOTIFICATIONS_MLLP_TLS_CERT_FILE"
MLLP_TLS_KEY = "NOTIFICATIONS_MLLP_TLS_KEY_FILE"
MLLP_TLS_CLIENT_CA = "NOTIFICATIONS_MLLP_TLS_CLIENT_CA_FILE"
MLLP_PLAINTEXT = f"MLLP listener ({MLLP_TLS_CERT}, {MLLP_TLS_KEY} unset)"


def read_mllp_tls(env: Env, common: CommonSettings) -> tuple[MllpTls | None, CommonSettings]:
    """The listener's TLS from NOTIFICATIONS_MLLP_TLS_* (certificate and key both or neither, an
    optional client CA), and `common` with plaintext MLLP named among its plaintext links so the
    start-up warning under CLINIC_TRUSTED_NETWORK=1 names it too. Lab results arrive over this link,
    so production refuses it in plaintext like any other PHI link (services.kit.settings.transport_policy)."""
    cert, key, client_ca = (env.str(name, "") for name in (MLLP_TLS_CERT, MLLP_TLS_KEY, MLLP_TLS_CLIENT_CA))
    if not cert and not key:
        if client_ca:
            env.problems.append(f"{MLLP_TLS_CLIENT_CA} needs {MLLP_TLS_CERT} and {MLLP_TLS_KEY} (the listener's TLS)")
        transport = common.transport
        if env.production and not transport.trusted_network:
            env.problems.append(
                f"{MLLP_PLAINTEXT} would carry PHI in plaintext, which production refuses; configure TLS"
                f" (docs/transport-security.md), or set {TRUSTED_NETWORK}=1 if the network itself is protected"
            )
        return None, replace(common, transport=replace(transport, plaintext=(*transport.plaintext, MLLP_PLAINTEXT)))
    if not cert or not key:
        given, missing = (MLLP_TLS_CERT, MLLP_TLS_KEY) if cert else (MLLP_TLS_KEY, MLLP_TLS_CERT)
        env.problems.append(f"{missing} must be set with {given} (MLLP TLS takes both or neither)")
        return None, common
    unreadable = [f"{name} cannot be read: {value}" for name, value in (
        (MLLP_TLS_CERT, cert), (MLLP_TLS_KEY, key), (MLLP_TLS_CLIENT_CA, client_ca)
    ) if value and not os.access(value, os.R_OK)]
    if unreadable:
        env.problems.extend(unreadable)
        return None, common
    tls = MllpTls(Path(cert), Path(key), Path(client_ca) if client_ca else None)
    try:
        tls.server_context()
    except (OSError, ValueError):
        env.problems.append(
            f"{MLLP_TLS_CERT}, {MLLP_TLS_KEY} and {MLLP_TLS_CLIENT_CA} must hold a PEM certificate, its private"
            " key and (when set) PEM CA certificates"
        )
        return None, common
    return tls, common


def load(environ: Mapping[str, str] | None = None) -> NotificationsSettings:
    env = Env("notifications", environ)
    common = common_settings(env)
    mllp_tls, common = read_mllp_tls(env, common)
    facilities_raw = env.str("NOTIFICATIONS_FACILITIES", "" if env.production else DEV_FACILITIES)
    partners_raw = env.str("NOTIFICATIONS_PARTNERS", "" if env.production else DEV_PARTNERS)
    settings = NotificationsSettings(
        common=common,
        http_port=env.int("NOTIFICATIONS_HTTP_PORT", 8103, minimum=0, maximum=65535),
        grpc_port=env.int("NOTIFICATIONS_GRPC_PORT", 50053, minimum=0, maximum=65535),
        mllp_host=env.str("NOTIFICATIONS_MLLP_HOST", "127.0.0.1"),
        mllp_port=env.int("NOTIFICATIONS_MLLP_PORT", 2575, minimum=0, maximum=65535),
        mllp_max_message_bytes=env.int("MLLP_MAX_MESSAGE_BYTES", 1024 * 1024, minimum=1024, maximum=16 * 1024 * 1024),
        mllp_max_connections=env.int("MLLP_MAX_CONNECTIONS", 64, minimum=1, maximum=4096),
        mllp_idle_timeout_s=env.float("MLLP_IDLE_TIMEOUT_S", 300.0, minimum=1.0),
        directory_grpc_target=env.str("DIRECTORY_GRPC_TARGET", "127.0.0.1:50051"),
        directory_jwks_url=env.url("DIRECTORY_JWKS_URL", "http://127.0.0.1:8101/api/v1/auth/jwks", ("http", "https")),
        public_url=env.url("NOTIFICATIONS_PUBLIC_URL", "http://127.0.0.1:8000", ("http", "https")).rstrip("/"),
        max_request_bytes=env.int("NOTIFICATIONS_MAX_REQUEST_BYTES", 512 * 1024, minimum=1024, maximum=8 * 1024 * 1024),
        relay_batch_size=env.int("OUTBOX_BATCH_SIZE", 500, minimum=1, maximum=5000),
        recipients_cache_s=env.float("NOTIFICATIONS_RECIPIENTS_CACHE_S", 30.0, minimum=0.0),
        facilities=parse_facilities(facilities_raw, env.problems),
        partners=parse_partners(partners_raw, env.problems),
        compliance_pass_interval_s=env.float("NOTIFICATIONS_COMPLIANCE_PASS_S", 15.0, minimum=0.1),
        processing_id=env.choice("NOTIFICATIONS_PROCESSING_ID", ("P", "T", "D"), "P"),
        gateway_identity_keys=gateway_identity.read_keys(env),
        patient_ref_keys=patient_ref.read_keys(env),
        mllp_tls=mllp_tls,
        dashboard_consumers=parse_partners(
            env.str("NOTIFICATIONS_DASHBOARD_CONSUMERS", "" if env.production else "internal-dashboard=agy_riverbend"),
            env.problems,
        ),
    )
    env.done()
    return settings
