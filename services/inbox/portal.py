"""Patient Portal Messages: the portal (a partner system, key-auth at the gateway) writes and
reads on behalf of a patient.

Trust boundary: the portal holds no staff token. It calls /api/v1/partner/portal through the
gateway, whose key-auth plugin authenticates its API key and whose acl plugin checks the partners
group; Kong then replaces any client-sent X-Consumer-* / X-Credential-Identifier headers with the
authenticated consumer's and signs them per request in X-Gateway-Identity (docs/gateway-identity.md).
This service believes X-Consumer-Username only when that token verifies for this very request
(services.kit.gateway_identity); otherwise 401 and a forged_identity_refused security event.

Each request names the agency and the patient (the portal's own user id). The agency must name
this consumer as its portal (directory's `portal_consumer` setting), else 404 whether or not the
agency exists. Directory is then asked, with inbox's service identity for that agency, who the
patient is; every thread a request reaches must be that patient's (404 otherwise, audited).

A patient's message is one message document (kind portal_message, sender_kind "patient", content
and the patient's name sealed, recipients, held `message.delivered` events) fanned out to the
recipients' Patient Portal Messages folder by the mailbox's repeatable fan-out. Board listings show
`sender_name`, so it carries a label ("Client (portal)"), never the patient's name; the name is in
the message sealed and shown in the reading pane, whose opening is audited.

A thread (`portal_threads`) is one document per conversation: the patient key (agency|patient id),
the sealed subject, whom it is addressed to (a team or a staff member), the staff who replied and
`sort_key` (last activity, then id), so the portal lists a patient's threads newest first from the
index (patient_key, sort_key). A staff reply (Reply on a portal message) is a message of the same
thread addressed to the patient only: the replier gets a Sent item, nobody gets a board item; the
patient reads it through the portal. A patient's later message in the thread reaches its
addressees and every staff member who replied.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flask import Blueprint, current_app, request
from pymongo import DESCENDING
from pymongo.errors import DuplicateKeyError

from services.inbox import audit, domain
from services.inbox.board import iso
from services.inbox.components import Feature
from services.inbox.directory_client import AgencySettings, PortalPatient
from services.inbox.http_api import idempotency_key, only_query
from services.inbox.mailbox import SendResult
from services.kit import gateway_identity
from services.kit.auth import Identity
from services.kit.errors import InvalidInput, NotFound
from services.kit.mongo import IndexSpec, ensure_indexes
from services.kit.service_identity import acting_as
from services.kit.validation import ID_PATTERN, Id, Str, json_body, query_int, validate

log = logging.getLogger(__name__)

THREADS = "portal_threads"
INDEXES = [IndexSpec(THREADS, [("patient_key", 1), ("sort_key", -1)], name="portal_threads_by_patient")]
PARTNER_KIND = "partner"
THREAD_PAGE_MAX = 100
THREAD_MESSAGES_MAX = 500


def patient_key(agency_id: str, patient_id: str) -> str:
    """One patient's threads: agency and patient in one indexed key, so a listing never crosses agencies."""
    return f"{agency_id}|{patient_id}"


def sender_label(patient_term: str) -> str:
    """What board listings show as the sender of a patient's message: the agency's word, no name (PHI)."""
    return f"{patient_term or 'Patient'} (portal)"


@dataclass(frozen=True)
class PortalCaller:
    """A portal request: the consumer (the partner), the agency it serves and the patient it acts for."""

    consumer: str
    settings: AgencySettings
    patient: PortalPatient

    @property
    def agency_id(self) -> str:
        return self.settings.agency_id

    @property
    def identity(self) -> Identity:
        """The partner as an audit actor (kind "partner", id = its consumer name)."""
        return Identity(subject=self.consumer, agency_id=self.agency_id, kind=PARTNER_KIND, name=self.consumer)


def _agency_not_found() -> NotFound:
    return NotFound("agency_not_found", "no such agency")


def gateway_consumer() -> str:
    """The consumer the gateway authenticated, believed only when the gateway's X-Gateway-Identity
    token proves it for this very request (services.kit.gateway_identity); anything else is not a
    partner request (401, and a forged identity is recorded as a security event)."""
    components = current_app.extensions["inbox"]
    return gateway_identity.verified_partner(
        components.settings.gateway_identity_keys, db=components.store.db, service="inbox"
    ).username


class Portal(Feature):
    """The portal's routes, the staff reply to a portal message and its reading pane. Its events ride
    on message and access-record documents, which the relay already scans."""

    def __init__(self, components):
        super().__init__(components)
        self.threads = components.store.db[THREADS]

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES)

    def attach(self) -> None:
        self.components.mailbox.reply_handlers[domain.KIND_PORTAL_MESSAGE] = self.staff_reply
        self.components.board.details[domain.KIND_PORTAL_MESSAGE] = self.detail

    # --- who is calling -------------------------------------------------------------------------
    @contextmanager
    def acting_for(self, consumer: str, agency_id: str, portal_user_id: str) -> Iterator[PortalCaller]:
        """Run the block for this consumer's patient, with inbox's service identity for the agency."""
        if not ID_PATTERN.fullmatch(agency_id):
            raise _agency_not_found()
        try:
            identity = self.components.service_tokens.identity(agency_id)
        except NotFound as exc:
            raise _agency_not_found() from exc
        with acting_as(identity):
            settings = self.components.directory.agency_settings(agency_id)
            if not settings.portal_consumer or settings.portal_consumer != consumer:
                raise _agency_not_found()
            if not ID_PATTERN.fullmatch(portal_user_id):
                raise NotFound("patient_not_found", "no such patient")
            patient = self.components.directory.portal_patient(portal_user_id=portal_user_id)
            yield PortalCaller(consumer, settings, patient)

    # --- the patient writes ---------------------------------------------------------------------
    def send(self, who: PortalCaller, fields: dict, key: str | None) -> tuple[dict, bool]:
        """A patient's message: a new thread to a team or staff member, or the next one in their thread."""
        if not fields["body"].strip():
            raise InvalidInput("invalid_value", "body must not be empty", {"field": "body"})
        thread = self._own_thread(who, fields["thread_id"]) if "thread_id" in fields else None
        addressing, subject = self._addressing(who, fields, thread)
        message_id = domain.new_message_id()
        key_digest = draft_digest = None
        if key:
            key_digest = domain.digest("portal", who.agency_id, who.patient.patient_id, key)
            draft_digest = domain.text_digest(
                list(addressing.staff_ids),
                list(addressing.team_ids),
                subject,
                fields["body"],
                fields.get("thread_id", ""),
            )
            claimed = self.components.store.idempotency_record(key_digest)
            if claimed is not None:
                replay = self._replay(claimed, draft_digest)
                if replay is not None:
                    return replay, False
                message_id = claimed["message_id"]
        recipients = self._recipients(who, addressing, thread)
        if key_digest is not None:
            claimed = self.components.store.claim_idempotency_key(key_digest, message_id, draft_digest)
            replay = self._replay(claimed, draft_digest)
            if replay is not None:
                return replay, False
            message_id = claimed["message_id"]
        doc = self._patient_message(
            who, message_id, domain.Draft(addressing, subject, fields["body"]), recipients, thread
        )
        if thread is None:
            self._start_thread(who, doc, subject, addressing)
        store = self.components.store
        if not store.insert_message(doc):  # a concurrent retry wrote it first
            existing = store.message(message_id)
            self.components.mailbox.complete_fanout(existing)
            return self._sent_view(existing), False
        self.components.mailbox.complete_fanout(doc)
        self._touch_thread(doc["thread_id"], doc["sent_at"])
        log.info(
            "portal message sent",
            extra={"message_id": message_id, "agency_id": who.agency_id, "recipients": len(recipients)},
        )
        return self._sent_view(doc), True

    def _addressing(self, who: PortalCaller, fields: dict, thread: dict | None) -> tuple[domain.Addressing, str]:
        """Whom the message is for and its subject: as asked for a new thread; a thread keeps its own."""
        team_id, staff_id = fields.get("to_team_id"), fields.get("to_staff_id")
        if thread is not None:
            if team_id or staff_id:
                raise InvalidInput("invalid_value", "a message in a thread goes to the thread's care team")
            subject = fields.get("subject") or domain.prefixed_subject("Re:", self._thread_subject(thread))
            return self._thread_addressing(thread), subject
        if bool(team_id) == bool(staff_id):
            raise InvalidInput("invalid_value", "give exactly one of to_team_id and to_staff_id")
        if "subject" not in fields:
            raise InvalidInput("missing_field", "subject is required", {"field": "subject"})
        addressing = domain.Addressing(team_ids=(team_id,)) if team_id else domain.Addressing(staff_ids=(staff_id,))
        return addressing, fields["subject"]

    @staticmethod
    def _thread_addressing(thread: dict) -> domain.Addressing:
        """A thread's addressees: the team or staff member it was opened to, and whoever replied."""
        staff = [thread["to_staff_id"]] if thread.get("to_staff_id") else []
        staff += [s for s in sorted(thread.get("repliers") or {}) if s not in staff]
        team = (thread["to_team_id"],) if thread.get("to_team_id") else ()
        return domain.Addressing(staff_ids=tuple(staff), team_ids=team)

    def _recipients(self, who: PortalCaller, addressing: domain.Addressing, thread: dict | None) -> list[str]:
        resolution = self.components.directory.resolve(addressing)
        if thread is None:  # a new thread names someone who must exist; a thread keeps whoever still does
            resolution.require_known("the care team or staff member does not exist in this agency")
        return domain.final_recipients(resolution.staff_ids, addressing, who.patient.patient_id)

    def _replay(self, claimed: dict, draft_digest: str) -> dict | None:
        """The answer to a retried send (Mailbox.replay), its thread moved up; None when the earlier
        send was interrupted before writing its message."""
        existing = self.components.mailbox.replay(claimed, draft_digest)
        if existing is None:
            return None
        self._touch_thread(existing["thread_id"], existing["sent_at"])
        return self._sent_view(existing)

    @staticmethod
    def _sent_view(doc: dict) -> dict:
        return {"id": doc["_id"], "thread_id": doc["thread_id"], "sent_at": iso(doc["sent_at"])}

    def _patient_message(
        self, who: PortalCaller, message_id: str, draft: domain.Draft, recipients: list[str], thread: dict | None
    ) -> dict:
        """The message document (Mailbox.compose) from a patient, for Patient Portal Messages."""
        patient = who.patient
        return self.components.mailbox.compose(
            who.identity,
            draft,
            recipients,
            message_id,
            thread_id=thread["_id"] if thread else None,
            extra={
                "kind": domain.KIND_PORTAL_MESSAGE,
                "sender_kind": "patient",
                "sender_id": patient.patient_id,
                "sender_name": sender_label(who.settings.patient_singular),
                "patient_id": patient.patient_id,
                "patient_name": self.components.cipher.seal(
                    who.agency_id, message_id, "patient_name", patient.display_name
                ),
                "portal_consumer": who.consumer,
                "recipient_folder": domain.FOLDER_PORTAL,
            },
        )

    # --- threads --------------------------------------------------------------------------------
    def _start_thread(self, who: PortalCaller, first: dict, subject: str, addressing: domain.Addressing) -> None:
        """The thread document, written before its first message (repeatable: a retry finds it there)."""
        thread_id = first["_id"]
        doc = {
            "_id": thread_id,
            "agency_id": who.agency_id,
            "patient_id": who.patient.patient_id,
            "patient_key": patient_key(who.agency_id, who.patient.patient_id),
            "subject": self.components.cipher.seal(who.agency_id, thread_id, "subject", subject),
            "to_team_id": addressing.team_ids[0] if addressing.team_ids else "",
            "to_staff_id": addressing.staff_ids[0] if addressing.staff_ids else "",
            "repliers": {},
            "created_at": first["sent_at"],
            "last_at": first["sent_at"],
            "sort_key": domain.sort_key(first["sent_at"], thread_id),
        }
        try:
            self.threads.insert_one(doc)
        except DuplicateKeyError:
            pass

    def _touch_thread(self, thread_id: str, at_ms: int, replier_id: str | None = None) -> None:
        """Move the thread to the top of its patient's list (never back) and note who replied."""
        key = domain.sort_key(at_ms, thread_id)
        self.threads.update_one(
            {"_id": {"$eq": thread_id}, "sort_key": {"$lt": key}}, {"$set": {"last_at": at_ms, "sort_key": key}}
        )
        if replier_id:
            self.threads.update_one({"_id": {"$eq": thread_id}}, {"$set": {f"repliers.{replier_id}": at_ms}})

    def _thread(self, thread_id: str) -> dict | None:
        return self.threads.find_one({"_id": {"$eq": thread_id}})

    def _thread_subject(self, thread: dict) -> str:
        return self.components.cipher.open(thread["agency_id"], thread["_id"], "subject", thread["subject"])

    def _own_thread(self, who: PortalCaller, thread_id: str, action: str = "write_thread") -> dict:
        """The thread if it is this patient's; anything else is 404, recorded as a refused access."""
        thread = self._thread(thread_id) if ID_PATTERN.fullmatch(thread_id) else None
        if thread is None or thread["patient_key"] != patient_key(who.agency_id, who.patient.patient_id):
            raise audit.refuse(
                self.components.store,
                who.identity,
                thread_id,
                action,
                resource_type="thread",
                code="thread_not_found",
                message="no such thread",
            )
        return thread

    def list_threads(self, who: PortalCaller, cursor: str | None, limit: int) -> dict:
        """The patient's threads, most recent activity first; recorded as one listing of the patient's
        threads (their subjects are PHI)."""
        query: dict = {"patient_key": {"$eq": patient_key(who.agency_id, who.patient.patient_id)}}
        if cursor:
            query["sort_key"] = {"$lt": domain.decode_cursor(cursor)}
        docs = list(self.threads.find(query).sort("sort_key", DESCENDING).limit(limit + 1))
        next_cursor = domain.encode_cursor(docs[limit - 1]["sort_key"]) if len(docs) > limit else None
        shown = [self._thread_view(doc) for doc in docs[:limit]]
        patient_id = who.patient.patient_id
        audit.record_list(
            self.components.store, who.identity, "thread_list", patient_id, len(shown), patient_id=patient_id
        )
        return {"threads": shown, "next_cursor": next_cursor}

    def _thread_view(self, thread: dict) -> dict:
        return {
            "id": thread["_id"],
            "subject": self._thread_subject(thread),
            "to": {"team_id": thread.get("to_team_id") or None, "staff_id": thread.get("to_staff_id") or None},
            "created_at": iso(thread["created_at"]),
            "last_at": iso(thread["last_at"]),
        }

    def read_thread(self, who: PortalCaller, thread_id: str) -> dict:
        """A thread with every message, the patient's and the staff's, oldest first; audited."""
        thread = self._own_thread(who, thread_id, "read_thread")
        docs = self.components.store.thread_messages(thread["_id"], THREAD_MESSAGES_MAX)
        mine = [d for d in docs if d["agency_id"] == who.agency_id and d.get("patient_id") == who.patient.patient_id]
        messages = [self._portal_message_view(who, doc) for doc in mine]
        event = audit.accessed_event(
            who.identity,
            thread["_id"],
            resource_type="thread",
            action="read_thread",
            patient_id=who.patient.patient_id,
        )
        audit.record_access(self.components.store, event, thread["_id"], "read_thread", who.identity)
        return {**self._thread_view(thread), "messages": messages}

    def _portal_message_view(self, who: PortalCaller, doc: dict) -> dict:
        content = self.components.mailbox.open_content(who.identity, doc)
        if doc.get("sender_kind") == "patient":
            sender = {"kind": "patient", "name": who.patient.display_name}
        else:
            sender = {"kind": "staff", "id": doc["sender_id"], "name": doc.get("sender_name", "")}
        return {
            "id": doc["_id"],
            "sender": sender,
            "subject": content["subject"],
            "body": content["body"],
            "sent_at": iso(doc["sent_at"]),
            "in_reply_to": doc.get("in_reply_to"),
        }

    # --- staff answer -----------------------------------------------------------------------------
    def staff_reply(  # noqa: PLR0917 - the signature Mailbox.reply_handlers calls
        self,
        caller: Identity,
        original: dict,
        body: str,
        links: tuple[str, ...],
        priority: str,
        idempotency_key: str | None,
        *,
        auto_reply: bool = False,
    ) -> SendResult:
        """Reply to a portal message: to the patient only, in the same thread. The replier gets a Sent
        item; nobody gets a board item (the patient reads it through the portal). `auto_reply` marks a
        Patient Auto-Reply."""
        thread = self._thread(original["thread_id"])
        if thread is None or thread["agency_id"] != caller.agency_id:
            raise audit.refuse(self.components.store, caller, original["_id"], "reply")
        store = self.components.store
        message_id = domain.new_message_id()
        key_digest = draft_digest = None
        if idempotency_key:
            key_digest = domain.digest(caller.agency_id, caller.staff_id, idempotency_key)
            draft_digest = domain.text_digest(
                "portal-reply", original["_id"], body, priority, list(links), int(auto_reply)
            )
            claimed = store.claim_idempotency_key(key_digest, message_id, draft_digest)
            existing = self.components.mailbox.replay(claimed, draft_digest)
            if existing is not None:
                return SendResult(existing["_id"], [], created=False, thread_id=existing["thread_id"])
            message_id = claimed["message_id"]
        subject = domain.prefixed_subject("Re:", self._thread_subject(thread))
        draft = domain.Draft(domain.Addressing(), subject, body, priority, links)
        doc = self._staff_message(caller, thread, original, message_id, draft, auto_reply=auto_reply)
        created = store.insert_message(doc)
        self.components.mailbox.complete_fanout(doc if created else store.message(message_id))
        self._touch_thread(thread["_id"], doc["sent_at"], caller.staff_id)
        log.info(
            "portal reply sent",
            extra={"message_id": message_id, "agency_id": caller.agency_id, "staff_id": caller.staff_id},
        )
        return SendResult(message_id, [], created=created, thread_id=thread["_id"])

    def _staff_message(
        self, caller: Identity, thread: dict, original: dict, message_id: str, draft: domain.Draft, *, auto_reply: bool
    ) -> dict:
        """A staff member's message to the patient (Mailbox.compose). No staff member receives it
        (no recipients), so the fan-out makes only the sender's Sent item, and no delivery event is
        held: `message.delivered.v1` names a staff recipient."""
        return self.components.mailbox.compose(
            caller,
            draft,
            [],
            message_id,
            thread_id=thread["_id"],
            in_reply_to=original["_id"],
            auto_reply=auto_reply,
            extra={
                **self.components.mailbox.patient_fields(caller.agency_id, original, message_id),
                "kind": domain.KIND_PORTAL_MESSAGE,
                "patient_id": thread["patient_id"],
                "to_patient_id": thread["patient_id"],
                "recipient_folder": domain.FOLDER_PORTAL,
            },
        )

    # --- staff read ---------------------------------------------------------------------------------
    def detail(self, caller: Identity, item: dict) -> dict:
        """The reading pane of a portal message: the message with the patient it is about (audited by
        the mailbox)."""
        return self.components.mailbox.detail_of(caller, item, self.components.store.message(item["ref_id"]))

    # --- HTTP ---------------------------------------------------------------------------------------
    def blueprint(self):
        settings = self.components.settings
        spec = {
            "to_team_id": Id(required=False),
            "to_staff_id": Id(required=False),
            "subject": Str(max_len=settings.max_subject_chars, required=False),
            "body": Str(max_len=settings.max_body_chars, strip=False),
            "thread_id": Id(required=False),
        }
        portal = Blueprint("portal", __name__, url_prefix="/api/v1/partner/portal")
        patient_path = "/agencies/<agency_id>/patients/<portal_user_id>"

        @portal.post(f"{patient_path}/messages")
        def send(agency_id: str, portal_user_id: str):
            consumer = gateway_consumer()
            fields = validate(json_body(), spec)
            key = idempotency_key()
            with self.acting_for(consumer, agency_id, portal_user_id) as who:
                body, created = self.send(who, fields, key)
            return body, 201 if created else 200

        @portal.get(f"{patient_path}/threads")
        def threads(agency_id: str, portal_user_id: str):
            consumer = gateway_consumer()
            only_query("cursor", "limit")
            limit = query_int("limit", 20, 1, THREAD_PAGE_MAX)
            with self.acting_for(consumer, agency_id, portal_user_id) as who:
                return self.list_threads(who, request.args.get("cursor") or None, limit)

        @portal.get(f"{patient_path}/threads/<thread_id>")
        def thread(agency_id: str, portal_user_id: str, thread_id: str):
            consumer = gateway_consumer()
            with self.acting_for(consumer, agency_id, portal_user_id) as who:
                return self.read_thread(who, thread_id)

        return portal
