"""Inbox HTTP edge: JSON <-> mailbox and board. Every staff route requires a verified staff access token.

Routes (all behind the gateway's jwt plugin):
- /api/v1/messages            compose, list Messages/Sent, read, reply, reply-all, forward, mark unread
- /api/v1/threads/<id>        a thread in order
- /api/v1/board               the folder tree with counts, labels and section state; items of any folder
- /api/v1/labels              the caller's labels
Feature modules (announcements, reminders, signature requests, the patient portal) register their own.
"""

from __future__ import annotations

from flask import Blueprint, Flask, g, request

from services.inbox import domain
from services.inbox.board import ItemFilter
from services.inbox.components import Components
from services.inbox.schemas import IDEMPOTENCY_KEY, addressing_from, draft_from, reply_spec, require_body, send_spec
from services.kit.errors import InvalidInput
from services.kit.http import create_app
from services.kit.http import require_staff as staff_only
from services.kit.validation import ID_PATTERN, Bool, Id, Str, json_body, path_id, query_bool, query_int, validate


def idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    return IDEMPOTENCY_KEY.clean("Idempotency-Key", key) if key is not None else None


def only_query(*allowed: str) -> None:
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise InvalidInput("invalid_query", f"unknown query parameter: {unknown[0]}")


def sent(result) -> tuple[dict, int]:
    body = {"id": result.message_id, "recipient_ids": result.recipient_ids}
    if result.thread_id:
        body["thread_id"] = result.thread_id
    return body, 201 if result.created else 200


def build_app(components: Components, verifier) -> Flask:
    settings = components.settings
    mailbox = components.mailbox
    board = components.board
    app = create_app("inbox", verifier, max_body_bytes=settings.max_request_bytes)
    spec = send_spec(settings.max_subject_chars, settings.max_body_chars)
    replies = reply_spec(settings.max_body_chars)
    # A forward's addressing is a new message's; its body is an optional note above the quote.
    forward_spec = {name: field for name, field in spec.items() if name != "subject"}
    forward_spec["body"] = Str(max_len=settings.max_body_chars, strip=False, required=False, min_len=0)

    messages = Blueprint("messages", __name__, url_prefix="/api/v1/messages")

    @messages.post("")
    @staff_only
    def send():
        board.require_compose(g.identity, domain.COMPOSE_MESSAGE)
        draft = draft_from(validate(json_body(), spec))
        return sent(mailbox.send(g.identity, draft, idempotency_key()))

    @messages.get("")
    @staff_only
    def page():
        only_query("folder", "unread", "cursor", "limit")
        folder = request.args.get("folder", domain.FOLDER_MESSAGES)
        if folder not in (domain.FOLDER_MESSAGES, domain.FOLDER_SENT):
            raise InvalidInput("invalid_query", "folder must be one of: messages, sent")
        return mailbox.page(
            g.identity,
            folder,
            unread_only=query_bool("unread"),
            cursor=request.args.get("cursor") or None,
            limit=query_int("limit", 20, 1, 100),
        )

    @messages.get("/<message_id>")
    @staff_only
    def read(message_id: str):
        return mailbox.read(g.identity, path_id(message_id, "message"))

    @messages.post("/<message_id>/unread")
    @staff_only
    def mark_unread(message_id: str):
        return mailbox.mark_unread(g.identity, path_id(message_id, "message"))

    def _reply(message_id: str, reply_all: bool):
        board.require_compose(g.identity, domain.COMPOSE_MESSAGE)
        message_id = path_id(message_id, "message")
        fields = validate(json_body(), replies)
        require_body(fields)
        result = mailbox.reply(
            g.identity,
            message_id,
            body=fields["body"],
            links=tuple(fields.get("links", ())),
            priority=fields.get("priority", "normal"),
            idempotency_key=idempotency_key(),
            reply_all=reply_all,
        )
        return sent(result)

    @messages.post("/<message_id>/reply")
    @staff_only
    def reply(message_id: str):
        return _reply(message_id, reply_all=False)

    @messages.post("/<message_id>/reply-all")
    @staff_only
    def reply_all(message_id: str):
        return _reply(message_id, reply_all=True)

    @messages.post("/<message_id>/forward")
    @staff_only
    def forward(message_id: str):
        board.require_compose(g.identity, domain.COMPOSE_MESSAGE)
        message_id = path_id(message_id, "message")
        fields = validate(json_body(), forward_spec)
        result = mailbox.forward(
            g.identity,
            message_id,
            addressing=addressing_from(fields),
            note=fields.get("body", ""),
            links=tuple(fields.get("links", ())),
            priority=fields.get("priority", "normal"),
            idempotency_key=idempotency_key(),
            max_body=settings.max_body_chars,
        )
        return sent(result)

    threads = Blueprint("threads", __name__, url_prefix="/api/v1/threads")

    @threads.get("/<thread_id>")
    @staff_only
    def thread(thread_id: str):
        return mailbox.thread(g.identity, path_id(thread_id, "thread"))

    board_bp = Blueprint("board", __name__, url_prefix="/api/v1/board")
    section_spec = {"expanded": Bool(required=True)}
    label_spec = {"label_id": Id(required=False), "name": Str(max_len=200, required=False)}
    move_spec = {"from_label_id": Id(), "to_label_id": Id()}

    @board_bp.get("")
    @staff_only
    def tree():
        only_query()
        return board.tree(g.identity)

    @board_bp.put("/sections/<section>")
    @staff_only
    def set_section(section: str):
        expanded = validate(json_body(), section_spec)["expanded"]
        return board.set_section(g.identity, path_id(section, "section"), expanded)

    @board_bp.get("/items")
    @staff_only
    def items():
        only_query("folder", "unread", "urgent", "label", "kind", "cursor", "limit")
        label = request.args.get("label") or None
        if label is not None and not ID_PATTERN.fullmatch(label):
            raise InvalidInput("invalid_query", "label is not a label id")
        kind = request.args.get("kind") or None
        if kind is not None and kind not in domain.ITEM_KINDS:
            raise InvalidInput("invalid_query", f"kind must be one of: {', '.join(domain.ITEM_KINDS)}")
        filters = ItemFilter(unread=query_bool("unread"), urgent=query_bool("urgent"), label_id=label, kind=kind)
        return board.page(
            g.identity,
            request.args.get("folder", domain.FOLDER_MESSAGES),
            filters,
            request.args.get("cursor") or None,
            query_int("limit", 20, 1, 100),
        )

    @board_bp.get("/items/<item_id>")
    @staff_only
    def open_item(item_id: str):
        return board.open_item(g.identity, path_id(item_id, "item"))

    @board_bp.post("/items/<item_id>/read")
    @staff_only
    def item_read(item_id: str):
        return board.set_read(g.identity, path_id(item_id, "item"), read=True)

    @board_bp.post("/items/<item_id>/unread")
    @staff_only
    def item_unread(item_id: str):
        return board.set_read(g.identity, path_id(item_id, "item"), read=False)

    @board_bp.post("/items/<item_id>/archive")
    @staff_only
    def item_archive(item_id: str):
        return board.archive(g.identity, path_id(item_id, "item"))

    @board_bp.post("/items/<item_id>/restore")
    @staff_only
    def item_restore(item_id: str):
        return board.restore(g.identity, path_id(item_id, "item"))

    @board_bp.delete("/items/<item_id>")
    @staff_only
    def item_delete(item_id: str):
        board.delete(g.identity, path_id(item_id, "item"))
        return "", 204

    @board_bp.post("/items/<item_id>/labels")
    @staff_only
    def item_label(item_id: str):
        fields = validate(json_body(), label_spec)
        return board.add_label(g.identity, path_id(item_id, "item"), fields.get("label_id"), fields.get("name"))

    @board_bp.delete("/items/<item_id>/labels/<label_id>")
    @staff_only
    def item_unlabel(item_id: str, label_id: str):
        return board.remove_label(g.identity, path_id(item_id, "item"), path_id(label_id, "label"))

    @board_bp.post("/items/<item_id>/labels/move")
    @staff_only
    def item_move_label(item_id: str):
        fields = validate(json_body(), move_spec)
        return board.move_label(g.identity, path_id(item_id, "item"), fields["from_label_id"], fields["to_label_id"])

    labels = Blueprint("labels", __name__, url_prefix="/api/v1/labels")
    name_spec = {"name": Str(max_len=200)}

    @labels.get("")
    @staff_only
    def list_labels():
        return {"labels": board.labels(g.identity)}

    @labels.post("")
    @staff_only
    def create_label():
        return board.create_label(g.identity, validate(json_body(), name_spec)["name"]), 201

    @labels.patch("/<label_id>")
    @staff_only
    def rename_label(label_id: str):
        return board.rename_label(g.identity, path_id(label_id, "label"), validate(json_body(), name_spec)["name"])

    @labels.delete("/<label_id>")
    @staff_only
    def delete_label(label_id: str):
        board.delete_label(g.identity, path_id(label_id, "label"))
        return "", 204

    @labels.get("/<label_id>/items")
    @staff_only
    def label_items(label_id: str):
        only_query("unread", "cursor", "limit")
        return board.label_page(
            g.identity,
            path_id(label_id, "label"),
            request.args.get("cursor") or None,
            query_int("limit", 20, 1, 100),
            unread=query_bool("unread"),
        )

    for blueprint in (messages, threads, board_bp, labels):
        app.register_blueprint(blueprint)
    for feature in components.features:
        blueprint = feature.blueprint()
        if blueprint is not None:
            app.register_blueprint(blueprint)
    return app
