"""Inbox HTTP edge: JSON <-> mailbox. Every route requires a verified access token."""

from __future__ import annotations

from flask import Blueprint, Flask, g, request

from services.inbox import domain
from services.inbox.mailbox import Mailbox
from services.inbox.schemas import IDEMPOTENCY_KEY, draft_from, send_spec
from services.kit.errors import InvalidInput
from services.kit.http import create_app, require_auth
from services.kit.validation import json_body, path_id, query_bool, query_int, validate


def build_app(mailbox: Mailbox, verifier, *, max_subject: int, max_body: int, max_request_bytes: int) -> Flask:
    app = create_app("inbox", verifier, max_body_bytes=max_request_bytes)
    messages = Blueprint("messages", __name__, url_prefix="/api/v1/messages")
    spec = send_spec(max_subject, max_body)

    @messages.post("")
    @require_auth
    def send():
        draft = draft_from(validate(json_body(), spec))
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            key = IDEMPOTENCY_KEY.clean("Idempotency-Key", key)
        result = mailbox.send(g.identity, draft, key)
        status = 201 if result.created else 200
        return {"id": result.message_id, "recipient_ids": result.recipient_ids}, status

    @messages.get("")
    @require_auth
    def page():
        folder = request.args.get("folder", domain.FOLDER_MESSAGES)
        if folder not in domain.LISTABLE_FOLDERS:
            raise InvalidInput("invalid_query", f"folder must be one of: {', '.join(domain.LISTABLE_FOLDERS)}")
        unknown = sorted(set(request.args) - {"folder", "unread", "cursor", "limit"})
        if unknown:
            raise InvalidInput("invalid_query", f"unknown query parameter: {unknown[0]}")
        return mailbox.page(
            g.identity,
            folder,
            unread_only=query_bool("unread"),
            cursor=request.args.get("cursor") or None,
            limit=query_int("limit", 20, 1, 100),
        )

    @messages.get("/<message_id>")
    @require_auth
    def read(message_id: str):
        return mailbox.read(g.identity, path_id(message_id, "message"))

    @messages.post("/<message_id>/unread")
    @require_auth
    def mark_unread(message_id: str):
        return mailbox.mark_unread(g.identity, path_id(message_id, "message"))

    app.register_blueprint(messages)
    return app
