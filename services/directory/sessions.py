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
under a keyed hash): a mistyped password often lands in that field. How many
sign-ins an address may try, and when a username stops answering it, is
sign_in_limits.py.

Automatic logoff is the server's (HIPAA 164.312(a)(2)(iii)): a session also ends
after its agency's `idle_signout_minutes` without activity. Only the page's
reports of its user's activity (`activity`) and the sign-in itself move a
session's idle deadline (`idle_expires_at`); refreshing a token, reading the API
or holding the live event stream do not. Refresh refuses a session past its
deadline, and `sweep_idle`, run every SESSION_IDLE_SWEEP_S by every replica,
revokes the sessions past it the way every other revocation goes (so every
service refuses their access tokens), each recorded as `session_idle_expired`.
Sign-in, sign-out and revocations are recorded as security events
(services.kit.security_events) naming the client address.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pymongo.errors import PyMongoError

from services.directory import domain, events, tokens
from services.directory.config import LoginPolicy
from services.directory.domain import StaffMember
from services.directory.passwords import PasswordHasher
from services.directory.sign_in_limits import Attempt, SignInLimits, TooManyAttempts
from services.directory.store import DirectoryStore
from services.kit.auth import AuthError, Identity
from services.kit.errors import Unauthenticated
from services.kit.mongo import now_ms
from services.kit.security_events import SecurityLog

__all__ = ["Grant", "SessionRevocations", "Sessions", "TooManyAttempts"]

log = logging.getLogger(__name__)

IDLE_REASON = "idle_timeout"
EXPIRED_REASON = "expired"
SWEEP_BATCH = 500
SWEEP_MAX_BATCHES = 20


def invalid_credentials() -> Unauthenticated:
    return Unauthenticated("invalid_credentials", "the username or password is incorrect")


def invalid_refresh_token() -> Unauthenticated:
    return Unauthenticated("invalid_refresh_token", "the refresh token is not valid; sign in again")


def session_idle_expired() -> Unauthenticated:
    return Unauthenticated(
        "session_idle_expired", "the session ended after the agency's idle time without activity; sign in again"
    )


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
        security_log: SecurityLog | None = None,
        clock: Callable[[], int] = now_ms,
    ):
        self.store = store
        self.hasher = hasher
        self.keys = keys
        self.access_ttl_s = access_ttl_s
        self.session_ttl_s = session_ttl_s
        self.policy = policy
        self.security = security_log or SecurityLog(store.db, service=events.PRODUCER)
        self.limits = SignInLimits(store, policy, attempt_key_secret, self.security)
        self.clock = clock

    # --- sign-in ---------------------------------------------------------------------------------

    def login(self, username: str, password: str, source: str = "") -> Grant:
        """`source` is the client address (services.kit.http.client_address) whose budget is spent."""
        now = self.clock()
        attempt = self.limits.admit(username, source, now)  # TooManyAttempts before any password check
        found = self.store.credentials(domain.username_key(username))
        if found is None:
            self.hasher.burn_time(password)
            raise self._failed(attempt, now, None, "unknown_account")
        member = found.member
        if not self.hasher.verify(found.password_hash, password):
            raise self._failed(attempt, now, member, "bad_password")
        if not member.active:
            raise self._failed(attempt, now, member, "account_inactive")
        self.limits.succeeded(attempt)
        if self.hasher.needs_rehash(found.password_hash):
            self.store.rehash_password(member.id, found.password_hash, self.hasher.hash(password))
        session_id = domain.new_id(domain.SESSION_PREFIX)
        session_expires = now + self.session_ttl_s * 1000
        session = self.store.create_session(
            session_id,
            member,
            now,
            session_expires,
            found.password_changed_at,
            idle_expires_at=now + self._idle_limit_ms(member.agency_id),
        )
        # The check above took a while: read the member again now that the session exists (module docstring).
        current = self.store.staff_auth(member.agency_id, member.id)
        if current is None or not current.member.active or current.password_changed_at != found.password_changed_at:
            active = current is not None and current.member.active
            reason = "password_reset" if active else "staff_deactivated"
            self.store.revoke_session(session_id, reason)
            log.info(
                "sign-in overtaken by a password change or deactivation; session revoked",
                extra={"staff_id": member.id, "agency_id": member.agency_id, "code": "invalid_credentials"},
            )
            self._record_sign_in(member, "sign_in_failed", reason=reason, source=source)
            raise invalid_credentials()
        grant = self._grant(current.member, session, now)  # roles as stored now, not as first read
        self._record_sign_in(member, "sign_in_succeeded", source=source, session_id=session_id)
        log.info("staff signed in", extra={"staff_id": member.id, "agency_id": member.agency_id})
        return grant

    def _failed(self, attempt: Attempt, now: int, member: StaffMember | None, reason: str) -> Unauthenticated:
        """Count and record the failure (sign_in_limits locks at its limits); returns the error to raise."""
        failures = self.limits.failed(attempt, now, member)
        self._record_sign_in(member, "sign_in_failed", reason=reason, source=attempt.source)
        extra = {"code": "invalid_credentials", "count": failures}
        if member is not None:
            extra.update(staff_id=member.id, agency_id=member.agency_id)
        log.info("sign-in failed", extra=extra)
        return invalid_credentials()

    def _record_sign_in(
        self, member: StaffMember | None, kind: str, *, reason: str = "", source: str = "", session_id: str = ""
    ) -> None:
        """A sign-in's security event; an unknown username is recorded as an anonymous actor, never by
        what was typed (often a password typed into the wrong field)."""
        self.security.record(
            kind,
            agency_id=member.agency_id if member else "",
            actor_id=member.id if member else "",
            actor_kind="staff" if member else "anonymous",
            outcome="succeeded" if kind == "sign_in_succeeded" else "refused",
            reason=reason,
            target_type="session" if session_id else "",
            target_id=session_id,
            source=source,
        )

    # --- refresh, activity, sign-out --------------------------------------------------------------

    def refresh(self, refresh_token: str, source: str = "") -> Grant:
        token_hash = tokens.refresh_token_hash(refresh_token)
        now = self.clock()
        record, fresh = self.store.use_refresh_token(token_hash, now)
        if record is None:
            raise invalid_refresh_token()
        if not fresh:
            self._revoke(record["session_id"], record, "refresh_token_reuse", source)
            log.warning(
                "refresh token presented twice; session revoked",
                extra={"staff_id": record["staff_id"], "agency_id": record["agency_id"], "code": "refresh_token_reuse"},
            )
            raise invalid_refresh_token()
        session = self.store.get_session(record["session_id"])
        if session is not None and session["revoked_at"] and session["revoked_reason"] == IDLE_REASON:
            raise session_idle_expired()  # e.g. a page waking up after the sweep ended its session
        if session is None or session["revoked_at"] or session["expires_at"] <= now or record["expires_at"] <= now:
            raise invalid_refresh_token()
        self._check_idle(session, now)
        current = self.store.staff_auth(record["agency_id"], record["staff_id"])
        if current is None or not current.member.active:
            self._revoke(session["_id"], session, "staff_deactivated", source)
            raise invalid_refresh_token()
        # Sessions stored before they recorded a password version compare their start instead.
        opened_with = session.get("password_changed_at", session["created_at"])
        if opened_with < current.password_changed_at:
            self._revoke(session["_id"], session, "password_reset", source)
            raise invalid_refresh_token()
        return self._grant(current.member, session, now)

    def _check_idle(self, session: dict, now: int) -> None:
        """Refuse (and end) a session past its idle deadline, or idle for longer than its agency allows
        now (the limit may have been lowered since the deadline was set). Refreshing is not activity."""
        limit_ms = self._idle_limit_ms(session["agency_id"])
        deadline = session.get("idle_expires_at")
        if deadline is None:  # stored before sessions had an idle deadline: its clock starts now
            self.store.start_idle_clock(session["_id"], now, now + limit_ms)
            return
        last_activity = session.get("last_activity_at", session["created_at"])
        if deadline <= now or last_activity + limit_ms <= now:
            self._end_idle(session, now)
            raise session_idle_expired()

    def activity(self, caller: Identity) -> None:
        """The page reports that its user is active: the session's idle deadline moves to a full idle
        period from now. A session already past its deadline is ended instead (401)."""
        now = self.clock()
        if self.store.record_activity(caller.session_id, now, now + self._idle_limit_ms(caller.agency_id)):
            return
        session = self.store.get_session(caller.session_id)
        if session is not None and not session["revoked_at"] and session.get("idle_expires_at", now + 1) <= now:
            self._end_idle(session, now)
            raise session_idle_expired()
        raise Unauthenticated("session_revoked", "the session has ended; sign in again")

    def logout(self, refresh_token: str, source: str = "") -> None:
        """Ends the token's session; unknown or already-ended sessions are not an error."""
        record = self.store.find_refresh_token(tokens.refresh_token_hash(refresh_token))
        if record is not None and self.store.revoke_session(record["session_id"], "logout"):
            self.store.clear_idle_deadline(record["session_id"])
            self._record_session(record, record["session_id"], "signed_out", "logout", source)
            log.info("staff signed out", extra={"staff_id": record["staff_id"], "agency_id": record["agency_id"]})

    def _revoke(self, session_id: str, owner: dict, reason: str, source: str) -> None:
        """Revoke a session (announced to every service) and record it, once."""
        if self.store.revoke_session(session_id, reason):
            self.store.clear_idle_deadline(session_id)
            self._record_session(owner, session_id, "session_revoked", reason, source)

    def _record_session(self, owner: dict, session_id: str, kind: str, reason: str, source: str) -> None:
        self.security.record(
            kind,
            agency_id=owner.get("agency_id", ""),
            actor_id=owner.get("staff_id", ""),
            actor_kind="staff",
            outcome="succeeded",
            reason=reason,
            target_type="session",
            target_id=session_id,
            source=source,
        )

    # --- automatic logoff ---------------------------------------------------------------------------

    def _idle_limit_ms(self, agency_id: str) -> int:
        agency = self.store.get_agency(agency_id)
        minutes = agency.idle_signout_minutes if agency is not None else domain.DEFAULT_IDLE_SIGNOUT_MINUTES
        return minutes * 60_000

    def _end_idle(self, session: dict, now: int) -> None:
        """End a session found idle outside the sweep (refresh, an activity report come too late)."""
        if self.store.revoke_session(session["_id"], IDLE_REASON):
            self.store.clear_idle_deadline(session["_id"])
            self._record_session(session, session["_id"], "session_idle_expired", IDLE_REASON, "")

    def sweep_idle(self, now: int | None = None) -> int:
        """Revoke every session past its idle deadline (announced, so every service refuses its tokens)
        and record each; sessions past their lifetime are closed as `expired` without a security event.
        Also drops spent sign-in counters. Safe on every replica at once: each end is compare-and-set.
        Returns how many sessions it ended for idleness."""
        now = self.clock() if now is None else now
        ended = 0
        for _ in range(SWEEP_MAX_BATCHES):  # the rest, if ever, in the next pass
            due = self.store.idle_sessions(now, SWEEP_BATCH)
            for session in due:
                ended += self._sweep_one(session, now)
            if len(due) < SWEEP_BATCH:
                break
        self.store.delete_spent_windows(now)
        if ended:
            log.info("idle sessions ended", extra={"count": ended})
        return ended

    def _sweep_one(self, session: dict, now: int) -> int:
        if session.get("revoked_at"):  # ended another way: it only leaves the sweep's range
            self.store.clear_idle_deadline(session["_id"])
            return 0
        idle = session["expires_at"] > now
        # Its last access token may outlive the session by one token lifetime: announce until then.
        announce = events.access_expires_at(session["expires_at"]) > now
        reason = IDLE_REASON if idle else EXPIRED_REASON
        if not self.store.end_idle_session(session, reason, now, announce=announce):
            return 0  # activity moved its deadline, or it ended meanwhile
        if not idle:
            return 0
        self._record_session(session, session["_id"], "session_idle_expired", IDLE_REASON, "")
        return 1

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
