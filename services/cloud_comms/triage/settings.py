"""Triage settings, read from the service's kit `Env` by services/cloud_comms/config.py.

CLOUD_TRIAGE_AUTO_FILE_CONFIDENCE   the auto-file threshold of an agency that set none (0.95);
                                    0.9 .. 1.0: nothing below a high confidence is ever filed
                                    without a person
CLOUD_TRIAGE_PASS_S                 seconds between passes of the triage worker (2)
CLOUD_TRIAGE_MAX_ATTEMPTS           tries of one document before it is left as no_match (5)
CLOUD_TRIAGE_LEASE_S                how long a claimed document is left to its worker before
                                    another replica takes it over (120)
CLOUD_TRIAGE_INDEX_KEY (_FILE)      the secret the roster's blind indexes are keyed with (HMAC,
                                    one derived key per agency). Required in production;
                                    changing it needs a re-import of the roster
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.kit.settings import Env

# Development value only: production refuses to start without CLOUD_TRIAGE_INDEX_KEY.
DEV_INDEX_KEY = "dev-triage-index-key-not-secret"  # noqa: S105 - development only
MIN_AUTO_FILE_CONFIDENCE = 0.9
MIN_INDEX_KEY_CHARS = 32


@dataclass(frozen=True)
class TriageSettings:
    auto_file_confidence: float = 0.95
    pass_s: float = 2.0
    max_attempts: int = 5
    lease_s: float = 120.0
    index_key: str = field(default=DEV_INDEX_KEY, repr=False)


def _index_key(env: Env) -> str:
    value = env.given_secret("CLOUD_TRIAGE_INDEX_KEY")
    if value is None:
        if env.production:
            env.problems.append("CLOUD_TRIAGE_INDEX_KEY (or CLOUD_TRIAGE_INDEX_KEY_FILE) is required in production")
            return ""
        return DEV_INDEX_KEY
    if env.production and len(value) < MIN_INDEX_KEY_CHARS:
        env.problems.append(f"CLOUD_TRIAGE_INDEX_KEY must be at least {MIN_INDEX_KEY_CHARS} characters in production")
    return value


def load(env: Env) -> TriageSettings:
    """The triage block; problems go to `env.problems` (the service's config reports them all)."""
    threshold = env.float("CLOUD_TRIAGE_AUTO_FILE_CONFIDENCE", 0.95, minimum=MIN_AUTO_FILE_CONFIDENCE)
    if threshold > 1.0:
        env.problems.append(f"CLOUD_TRIAGE_AUTO_FILE_CONFIDENCE must be at most 1.0, got {threshold}")
    return TriageSettings(
        auto_file_confidence=threshold,
        pass_s=env.float("CLOUD_TRIAGE_PASS_S", 2.0, minimum=0.01),
        max_attempts=env.int("CLOUD_TRIAGE_MAX_ATTEMPTS", 5, minimum=1, maximum=100),
        lease_s=env.float("CLOUD_TRIAGE_LEASE_S", 120.0, minimum=1.0),
        index_key=_index_key(env),
    )
