"""erx-bridge settings: the only reader of the environment for this service.

The practices (each agency's account at its ePrescribing vendor) are secrets: they come from
ERX_PRACTICES_FILE (or ERX_PRACTICES, the same JSON inline) and are never logged, shown or stored.
In development, when neither is set, Riverbend is the practice of the local vendor simulator
(`python -m services.erx_simulator`) with its development clinic key; production has no practice
unless one is configured.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.erx_bridge.vendors.base import PracticeCredentials
from services.kit import patient_ref
from services.kit.settings import CommonSettings, Env, common_settings

SERVICE = "erx-bridge"
AGENCY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PRACTICE_FIELDS = ("vendor", "base_url", "clinic_id", "clinic_key", "admin_user_id", "sso_url")
REQUIRED_PRACTICE_FIELDS = ("vendor", "base_url", "clinic_id", "clinic_key")

# Development: the demo agency that subscribes to ePrescribing (services/directory/demo.py), at the
# simulator's DoseSpot-shaped API. Its clinic id is the one directory's demo data names.
DEV_AGENCY = "agy_riverbend"
DEV_CLINIC_ID = "1001"
DEV_CLINIC_KEY = "dev-clinic-key-not-secret"  # the simulator's own default; not a secret  # noqa: S105


@dataclass(frozen=True)
class ErxBridgeSettings:
    common: CommonSettings
    http_port: int
    grpc_port: int
    directory_grpc_target: str
    directory_jwks_url: str
    public_url: str
    max_request_bytes: int
    relay_batch_size: int
    # agency id -> its account at the vendor (secrets: repr hides the clinic key).
    practices: dict[str, PracticeCredentials] = field(repr=False)
    # The periodic sync of every configured agency (0 turns the scheduler off), jittered +-20%.
    sync_interval_s: float = 300.0
    # The first scheduled sync after a start, jittered the same way (never later than the interval).
    sync_first_delay_s: float = 15.0
    # Threads that sync prescribers (for every sync of the process together).
    sync_workers: int = 4
    # Syncs (manual and scheduled) a process runs or queues at once; more is 503 sync_busy.
    max_active_syncs: int = 64
    # Vendor calls per request within one sync (the first and the retries after VendorUnavailable).
    vendor_attempts: int = 3
    # A wait between attempts longer than this (a long Retry-After) ends the attempts for this sync.
    max_backoff_s: float = 30.0
    # Every N-th sync of a prescriber fetches every kind with open items, even with unchanged counts.
    full_check_every: int = 12
    # A prescriber's sync lease (renewed while the sync works), and how long a manual sync waits
    # for another one to release it before it skips that prescriber.
    lease_s: float = 120.0
    lease_wait_s: float = 10.0
    # How long a staff member's ePrescribing flag and agency settings are cached.
    staff_cache_s: float = 30.0
    # A running sync whose progress did not move for this long is reported failed (its process died).
    stale_sync_s: float = 600.0
    # Rows in one Pending Rx report.
    report_max_rows: int = 10_000
    # Timeouts of one HTTP request to the vendor (connect, read).
    vendor_connect_timeout_s: float = 3.05
    vendor_read_timeout_s: float = 10.0
    # DoseSpot's API subscription key (a secret), when the vendor's gateway asks for one.
    dosespot_subscription_key: str = field(default="", repr=False)
    # The key a vendor's patient id is pseudonymised with in audit records (services.kit.patient_ref).
    patient_ref_keys: patient_ref.PatientRefKeys = field(default=patient_ref.PatientRefKeys(), repr=False)


def _dev_practices(env: Env) -> dict:
    host = env.str("ERX_SIMULATOR_HOST", "127.0.0.1")
    port = env.int("ERX_SIMULATOR_PORT", 8190, minimum=1, maximum=65535)
    key = env.given_secret("ERX_SIMULATOR_CLINIC_KEY") or DEV_CLINIC_KEY
    root = f"http://{host}:{port}"
    return {
        DEV_AGENCY: {
            "vendor": "dosespot",
            "base_url": f"{root}/webapi/v2",
            "clinic_id": DEV_CLINIC_ID,
            "clinic_key": key,
            "sso_url": f"{root}/LoginSingleSignOn.aspx",
        }
    }


def parse_practices(raw: object, problems: list[str], *, production: bool) -> dict[str, PracticeCredentials]:
    """{agency_id: {vendor, base_url, clinic_id, clinic_key, admin_user_id?, sso_url?}}; problems name
    the agency and the field, never a value (they are secrets)."""
    if not isinstance(raw, dict):
        problems.append("ERX_PRACTICES must be a JSON object {agency_id: {vendor, base_url, ...}}")
        return {}
    practices: dict[str, PracticeCredentials] = {}
    schemes = ("https",) if production else ("http", "https")
    for agency_id, entry in raw.items():
        where = f"ERX_PRACTICES[{agency_id!r}]" if AGENCY_ID.fullmatch(str(agency_id)) else "ERX_PRACTICES"
        if not AGENCY_ID.fullmatch(str(agency_id)):
            problems.append(f"{where}: agency ids are 1-64 characters of [A-Za-z0-9_-]")
            continue
        if not isinstance(entry, dict):
            problems.append(f"{where} must be an object")
            continue
        unknown = sorted(set(entry) - set(PRACTICE_FIELDS))
        if unknown:
            problems.append(f"{where}: unknown field {unknown[0]!r}")
            continue
        values = {name: entry.get(name, "") for name in PRACTICE_FIELDS}
        if not all(isinstance(v, str) for v in values.values()):
            problems.append(f"{where}: every field is a string")
            continue
        missing = [name for name in REQUIRED_PRACTICE_FIELDS if not values[name].strip()]
        if missing:
            problems.append(f"{where}: {missing[0]} is required")
            continue
        bad_urls = [
            name
            for name in ("base_url", "sso_url")
            if values[name] and not re.match(rf"^({'|'.join(schemes)})://[^/\s]+", values[name])
        ]
        if bad_urls:
            problems.append(f"{where}: {bad_urls[0]} must be a {'/'.join(schemes)} URL")
            continue
        practices[agency_id] = PracticeCredentials(**{k: v.strip() for k, v in values.items()})
    return practices


def load(environ: Mapping[str, str] | None = None) -> ErxBridgeSettings:
    env = Env(SERVICE, environ)
    common = common_settings(env)
    raw_practices = env.given_secret("ERX_PRACTICES")
    if raw_practices is None:
        practices_json: object = {} if env.production else _dev_practices(env)
    else:
        try:
            practices_json = json.loads(raw_practices)
        except ValueError:
            env.problems.append("ERX_PRACTICES (or the file ERX_PRACTICES_FILE names) is not valid JSON")
            practices_json = {}
    interval = env.float("ERX_SYNC_INTERVAL_S", 300.0, minimum=0.0)
    if 0 < interval < 5:
        env.problems.append(f"ERX_SYNC_INTERVAL_S must be 0 (off) or at least 5, got {interval}")
    settings = ErxBridgeSettings(
        common=common,
        http_port=env.int("ERX_BRIDGE_HTTP_PORT", 8106, minimum=0, maximum=65535),
        grpc_port=env.int("ERX_BRIDGE_GRPC_PORT", 50056, minimum=0, maximum=65535),
        directory_grpc_target=env.str("DIRECTORY_GRPC_TARGET", "127.0.0.1:50051"),
        directory_jwks_url=env.url("DIRECTORY_JWKS_URL", "http://127.0.0.1:8101/api/v1/auth/jwks", ("http", "https")),
        public_url=env.url("ERX_BRIDGE_PUBLIC_URL", "http://127.0.0.1:8000", ("http", "https")).rstrip("/"),
        max_request_bytes=env.int("ERX_BRIDGE_MAX_REQUEST_BYTES", 64 * 1024, minimum=1024, maximum=1024 * 1024),
        relay_batch_size=env.int("OUTBOX_BATCH_SIZE", 500, minimum=1, maximum=5000),
        practices=parse_practices(practices_json, env.problems, production=env.production),
        sync_interval_s=interval,
        sync_first_delay_s=env.float("ERX_SYNC_FIRST_DELAY_S", 15.0, minimum=0.0),
        sync_workers=env.int("ERX_SYNC_WORKERS", 4, minimum=1, maximum=64),
        max_active_syncs=env.int("ERX_MAX_ACTIVE_SYNCS", 64, minimum=1, maximum=10_000),
        vendor_attempts=env.int("ERX_VENDOR_ATTEMPTS", 3, minimum=1, maximum=10),
        max_backoff_s=env.float("ERX_MAX_BACKOFF_S", 30.0, minimum=0.0),
        full_check_every=env.int("ERX_FULL_CHECK_EVERY", 12, minimum=2, maximum=10_000),
        lease_s=env.float("ERX_LEASE_S", 120.0, minimum=5.0),
        lease_wait_s=env.float("ERX_LEASE_WAIT_S", 10.0, minimum=0.0),
        staff_cache_s=env.float("ERX_STAFF_CACHE_S", 30.0, minimum=0.0),
        stale_sync_s=env.float("ERX_STALE_SYNC_S", 600.0, minimum=10.0),
        report_max_rows=env.int("ERX_REPORT_MAX_ROWS", 10_000, minimum=1, maximum=100_000),
        vendor_connect_timeout_s=env.float("ERX_VENDOR_CONNECT_TIMEOUT_S", 3.05, minimum=0.1),
        vendor_read_timeout_s=env.float("ERX_VENDOR_READ_TIMEOUT_S", 10.0, minimum=0.1),
        dosespot_subscription_key=env.given_secret("ERX_DOSESPOT_SUBSCRIPTION_KEY") or "",
        patient_ref_keys=patient_ref.read_keys(env),
    )
    env.done()
    return settings
