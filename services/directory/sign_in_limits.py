"""How many sign-ins a client address may try, and when a username stops answering it.

Three limits, all kept in the directory's database so every replica and every way of signing
in (the page's `/app/session` through the web service, `/api/v1/auth/token` through the gateway
or on the service's own port) spends the same budget:

- every client address may try `source_attempts_per_minute` sign-ins a minute, whatever their
  outcome (a brute-force rate limit no path can bypass);
- `max_failures` failed sign-ins to one username **from one address** within the window lock
  that username **for that address** for `lockout_s`. Someone else's failures never lock the real
  user out: their address has its own count, so nobody can lock an account at will;
- `source_max_failures` failures from one address, whatever the usernames, within a window
  refuse that address's sign-ins until the window ends (guessing across many accounts).

An address is counted with its neighbours where one holder has many: an IPv6 address by its /64
network (services.kit.http.address_group), the block one subscriber or host is given, so an
attacker cannot buy a fresh budget by moving to the next address of its own block; an IPv4
address by itself.

A locked or throttled attempt is refused before the password is checked, with the same answer
whether or not the password was right (429 `too_many_attempts` with `Retry-After`). Counters are
keyed by keyed hashes (LOGIN_ATTEMPT_KEY) of the normalised username and the address, so the
database never holds what was typed as a username; the security events (audit trail) hold the
address, never a username that matched no account nor any password.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from services.directory import domain
from services.directory.config import LoginPolicy
from services.directory.domain import LoginAttempts, StaffMember
from services.directory.store import DirectoryStore
from services.kit.errors import TooManyRequests
from services.kit.http import address_group
from services.kit.security_events import SecurityLog

MINUTE_MS = 60_000


class TooManyAttempts(TooManyRequests):
    """429 `too_many_attempts`: one answer for every limit, so a refusal tells nothing about the account."""

    def __init__(self, retry_after_s: int):
        super().__init__("too_many_attempts", "too many sign-in attempts; try again later", retry_after_s)


@dataclass(frozen=True)
class Attempt:
    """One sign-in attempt's counters: (username, address group) and address group, as keyed hashes;
    `source` is the address itself, for the security events."""

    account_key: str
    source_key: str
    source: str
    earlier_failures: LoginAttempts | None


def _ceil_s(ms: int) -> int:
    return max(1, -(-ms // 1000))


class SignInLimits:
    def __init__(self, store: DirectoryStore, policy: LoginPolicy, key_secret: bytes, security: SecurityLog):
        self.store = store
        self.policy = policy
        self._secret = key_secret
        self.security = security

    def _hash(self, *parts: str) -> str:
        return hmac.new(self._secret, "\x1f".join(parts).encode("utf-8"), hashlib.sha256).hexdigest()

    def admit(self, username: str, source: str, now: int) -> Attempt:
        """Spend the address's budget for this attempt; TooManyAttempts when a limit refuses it."""
        group = address_group(source)
        source_key = self._hash("source", group)
        minute_end = (now // MINUTE_MS + 1) * MINUTE_MS
        tried = self.store.count_in_window(f"rate:{source_key}:{minute_end}", minute_end)
        if tried > self.policy.source_attempts_per_minute:
            if tried == self.policy.source_attempts_per_minute + 1:  # once a minute, not once a request
                self._throttled(source, "source_rate_limit")
            raise TooManyAttempts(_ceil_s(minute_end - now))
        window_end = self._failure_window_end(now)
        if self.store.window_count(f"fail:{source_key}:{window_end}") >= self.policy.source_max_failures:
            self._throttled(source, "source_failure_limit")
            raise TooManyAttempts(_ceil_s(window_end - now))
        account_key = self._hash("account", domain.username_key(username), group)
        attempts = self.store.get_login_attempts(account_key, now)
        if domain.is_locked_out(attempts, now):
            self._throttled(source, "account_locked_for_source")
            raise TooManyAttempts(domain.retry_after_s(attempts, now))
        return Attempt(account_key, source_key, source, attempts)

    def failed(self, attempt: Attempt, now: int, member: StaffMember | None) -> int:
        """Count a failure against the username from this address and against the address; locks
        at the limits (recorded as security events). Returns the username's count from the address."""
        failures = self.store.count_login_failure(attempt.account_key, now, self.policy.window_s)
        if domain.lock_reached(failures, self.policy.max_failures):
            self.store.lock_username(attempt.account_key, now + self.policy.lockout_s * 1000)
            if failures == self.policy.max_failures:
                self.security.record(
                    "account_locked",
                    agency_id=member.agency_id if member else "",
                    target_type="staff",
                    target_id=member.id if member else "",
                    actor_kind="anonymous",
                    outcome="succeeded",
                    reason="too_many_failures",
                    source=attempt.source,
                )
        window_end = self._failure_window_end(now)
        from_source = self.store.count_in_window(f"fail:{attempt.source_key}:{window_end}", window_end)
        if from_source == self.policy.source_max_failures:
            self._throttled(attempt.source, "source_failure_limit")
        return failures

    def succeeded(self, attempt: Attempt) -> None:
        """A right password from this address clears its failures on the username."""
        if attempt.earlier_failures is not None:
            self.store.clear_login_failures(attempt.account_key)

    def _failure_window_end(self, now: int) -> int:
        window_ms = self.policy.window_s * 1000
        return (now // window_ms + 1) * window_ms

    def _throttled(self, source: str, reason: str) -> None:
        self.security.record(
            "sign_in_throttled", actor_kind="anonymous", outcome="refused", reason=reason, source=source
        )
