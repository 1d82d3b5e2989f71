"""Staff sign-in, refresh-token rotation and sign-out.

A session starts at sign-in and lasts at most REFRESH_TOKEN_TTL_S (a shift); it
is never extended. Each refresh token works once: refreshing returns a new one
and retires the old. Presenting a retired token again means two parties hold
it, so the whole session is revoked (theft detection) and both must sign in;
clients therefore refresh from one place (e.g. one refresher shared by tabs).
Deactivation, password resets and the loss of a role revoke every session of
that staff member.

Sign-in checks the password (argon2, ~100 ms) before it creates the session, so
a reset or deactivation can land in between, after its sweep of the member's
sessions ran. Sign-in therefore reads the member again once its session exists
and revokes it if the password changed since it was checked or the member is
no longer active: any change either sees the new session in its sweep or is
seen by that second read. Each session records the password version it was
opened with, and refresh refuses (and revokes) a session whose staff member's
password changed since, should a sweep ever have been missed.

A revocation ends the session's access tokens too, at once and everywhere: the
directory checks each token's session against this store (`SessionRevocations`),
and the `session.revoked.v1` event staged with the revocation tells every other
service (services.kit.revocations), which refuse the tokens with
`session_revoked` until they would have expired anyway.
Usernames are never logged, nor stored with failed sign-ins (those are counted
under a keyed hash): a mistyped password often lands in that field.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pymongo.errors import PyMongoError

from services.directory import domain, tokens
from services.directory.config import LoginPolicy
from services.directory.domain import StaffMember
from services.directory.passwords import PasswordHasher
from services.directory.store import DirectoryStore
from services.kit.auth import AuthError
from services.kit.errors import DomainError, Unauthenticated
from services.kit.mongo import now_ms

log = logging.getLogger(__name__)


class TooManyAttempts(DomainError):
    http_status = 429

    def __init__(self, retry_after_s: int):
        super().__init__("too_many_attempts", "too many failed sign-in attempts; try again later")
        self.retry_after_s = retry_after_s


def invalid_credentials() -> Unauthenticated:
    return Unauthenticated("invalid_credentials", "the username or password is incorrect")


def invalid_refresh_token() -> Unauthenticated:
    return Unauthenticated("invalid_refresh_token", "the refresh token is not valid; sign in again")


class SessionRevocations:
    """The directory's revocation check for its TokenVerifier: the sessions store is the source of truth."""

    def __init__(self, store: DirectoryStore):
        self.store = store

    def is_revoked(self, session_id: str) -> bool:
        try:
            return self.store.is_session_revoked(session_id)
        except PyMongoError as exc:
            raise AuthError("auth_unavailable", "the session cannot be checked now") from exc


@dataclass(frozen=True)
class Grant:
    access: tokens.AccessToken
    refresh_token: str
    staff: StaffMember


class Sessions:
    def __init__(
        self,
        store: DirectoryStore,
        hasher: PasswordHasher,
        keys: tokens.KeySet,
        *,
        access_ttl_s: int,
        session_ttl_s: int,
        policy: LoginPolicy,
        attempt_key_secret: bytes,
        clock: Callable[[], int] = now_ms,
    ):
        self.store = store
        self.hasher = hasher
        self.keys = keys
        self.access_ttl_s = access_ttl_s
        self.session_ttl_s = session_ttl_s
        self.policy = policy
        self._attempt_key_secret = attempt_key_secret
        self.clock = clock

    def login(self, username: str, password: str) -> Grant:
        attempt_key = domain.login_attempt_key(self._attempt_key_secret, username)
        now = self.clock()
        attempts = self.store.get_login_attempts(attempt_key, now)
        if domain.is_locked_out(attempts, now):
            log.info("sign-in refused while locked", extra={"code": "too_many_attempts"})
            raise TooManyAttempts(domain.retry_after_s(attempts, now))
        found = self.store.credentials(domain.username_key(username))
        if found is None:
            self.hasher.burn_time(password)
            raise self._failed(attempt_key, now)
        member = found.member
        if not self.hasher.verify(found.password_hash, password) or not member.active:
            raise self._failed(attempt_key, now, member)
        if attempts is not None:
            self.store.clear_login_failures(attempt_key)
        if self.hasher.needs_rehash(found.password_hash):
            self.store.rehash_password(member.id, found.password_hash, self.hasher.hash(password))
        session_id = domain.new_id(domain.SESSION_PREFIX)
        session_expires = now + self.session_ttl_s * 1000
        session = self.store.create_session(session_id, member, now, session_expires, found.password_changed_at)
        # The check above took a while: read the member again now that the session exists (module docstring).
        current = self.store.staff_auth(member.agency_id, member.id)
        if current is None or not current.member.active or current.password_changed_at != found.password_changed_at:
            active = current is not None and current.member.active
            self.store.revoke_session(session_id, "password_reset" if active else "staff_deactivated")
            log.info(
                "sign-in overtaken by a password change or deactivation; session revoked",
                extra={"staff_id": member.id, "agency_id": member.agency_id, "code": "invalid_credentials"},
            )
            raise invalid_credentials()
        grant = self._grant(current.member, session, now)  # roles as stored now, not as first read
        log.info("staff signed in", extra={"staff_id": member.id, "agency_id": member.agency_id})
        return grant

    def _failed(self, attempt_key: str, now: int, member: StaffMember | None = None) -> Unauthenticated:
        """Count the failure (locking the username at the limit); returns the error to raise."""
        failures = self.store.count_login_failure(attempt_key, now, self.policy.window_s)
        if domain.lock_reached(failures, self.policy.max_failures):
            self.store.lock_username(attempt_key, now + self.policy.lockout_s * 1000)
        extra = {"code": "invalid_credentials", "count": failures}
        if member is not None:
            extra.update(staff_id=member.id, agency_id=member.agency_id)
        log.info("sign-in failed", extra=extra)
        return invalid_credentials()

    def refresh(self, refresh_token: str) -> Grant:
        token_hash = tokens.refresh_token_hash(refresh_token)
        now = self.clock()
        record, fresh = self.store.use_refresh_token(token_hash, now)
        if record is None:
            raise invalid_refresh_token()
        if not fresh:
            self.store.revoke_session(record["session_id"], "refresh_token_reuse")
            log.warning(
                "refresh token presented twice; session revoked",
                extra={"staff_id": record["staff_id"], "agency_id": record["agency_id"], "code": "refresh_token_reuse"},
            )
            raise invalid_refresh_token()
        session = self.store.get_session(record["session_id"])
        if session is None or session["revoked_at"] or session["expires_at"] <= now or record["expires_at"] <= now:
            raise invalid_refresh_token()
        current = self.store.staff_auth(record["agency_id"], record["staff_id"])
        if current is None or not current.member.active:
            self.store.revoke_session(session["_id"], "staff_deactivated")
            raise invalid_refresh_token()
        # Sessions stored before they recorded a password version compare their start instead.
        opened_with = session.get("password_changed_at", session["created_at"])
        if opened_with < current.password_changed_at:
            self.store.revoke_session(session["_id"], "password_reset")
            raise invalid_refresh_token()
        return self._grant(current.member, session, now)

    def logout(self, refresh_token: str) -> None:
        """Ends the token's session; unknown or already-ended sessions are not an error."""
        record = self.store.find_refresh_token(tokens.refresh_token_hash(refresh_token))
        if record is not None and self.store.revoke_session(record["session_id"], "logout"):
            log.info("staff signed out", extra={"staff_id": record["staff_id"], "agency_id": record["agency_id"]})

    def _grant(self, member: StaffMember, session: dict, now: int) -> Grant:
        refresh_token = tokens.new_refresh_token()
        self.store.add_refresh_token(tokens.refresh_token_hash(refresh_token), session, now)
        access = tokens.issue_access_token(
            self.keys,
            staff_id=member.id,
            agency_id=member.agency_id,
            roles=list(member.roles),
            name=member.display_name,
            session_id=session["_id"],
            ttl_s=self.access_ttl_s,
            now=now // 1000,
        )
        return Grant(access=access, refresh_token=refresh_token, staff=member)
