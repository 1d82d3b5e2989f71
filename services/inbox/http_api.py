"""Inbox HTTP edge: JSON <-> mailbox and board. Every staff route requires a verified staff access token.

Routes (all behind the gateway's jwt plugin):
- /api/v1/messages            compose, list Messages/Sent, read, reply, reply-all, forward, mark unread
- /api/v1/threads/<id>        a thread in order
- /api/v1/board               the folder tree with counts, labels and section state; items of any folder
- /api/v1/labels              the caller's labels
- /readyz                     readiness (the service port only, never routed by the gateway)
Feature modules (announcements, reminders, signature requests, the patient portal) register their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, Flask, current_app, g, request

from services.inbox import domain
from services.inbox.board import Board, ItemFilter
from services.inbox.components import Components
from services.inbox.config import InboxSettings
from services.inbox.mailbox import Mailbox
from services.inbox.schemas import addressing_from, draft_from, reply_spec, require_body, send_spec
from services.kit import clock
from services.kit.errors import InvalidInput
from services.kit.http import create_app, readiness
from services.kit.http import require_staff as staff_only
from services.kit.validation import (
    ID_PATTERN,
    Bool,
    Id,
    Spec,
    Str,
    idempotency_key_header,
    json_body,
    path_id,
    query_bool,
    query_int,
    validate,
)

SECTION_SPEC = {"expanded": Bool(required=True)}
LABEL_SPEC = {"label_id": Id(required=False), "name": Str(max_len=200, required=False)}
MOVE_SPEC = {"from_label_id": Id(), "to_label_id": Id()}
NAME_SPEC = {"name": Str(max_len=200)}

messages = Blueprint("messages", __name__, url_prefix="/api/v1/messages")
threads = Blueprint("threads", __name__, url_prefix="/api/v1/threads")
board_routes = Blueprint("board", __name__, url_prefix="/api/v1/board")
labels = Blueprint("labels", __name__, url_prefix="/api/v1/labels")
health = Blueprint("health", __name__)


@dataclass(frozen=True)
class MessageSpecs:
    """The message routes' request fields, sized by the service's settings."""

    send: dict[str, Spec]
    reply: dict[str, Spec]
    forward: dict[str, Spec]

    @classmethod
    def of(cls, settings: InboxSettings) -> MessageSpecs:
        send = send_spec(settings.max_subject_chars, settings.max_body_chars)
        # A forward's addressing is a new message's; its body is an optional note above the quote.
        forward = {name: field for name, field in send.items() if name != "subject"}
        forward["body"] = Str(max_len=settings.max_body_chars, strip=False, required=False, min_len=0)
        return cls(send=send, reply=reply_spec(settings.max_body_chars), forward=forward)


def build_app(components: Components, verifier) -> Flask:
    """The inbox's Flask app: the kit's edge, its own blueprints, then each feature's."""
    app = create_app("inbox", verifier, max_body_bytes=components.settings.max_request_bytes)
    app.extensions["inbox"] = components
    app.extensions["inbox.specs"] = MessageSpecs.of(components.settings)
    for blueprint in (messages, threads, board_routes, labels, health, clock.control_blueprint()):
        app.register_blueprint(blueprint)
    for feature in components.features:
        for blueprint in feature.blueprints():
            app.register_blueprint(blueprint)
    return app


def _components() -> Components:
    return current_app.extensions["inbox"]


def _mailbox() -> Mailbox:
    return _components().mailbox


def _board() -> Board:
    return _components().board


def _specs() -> MessageSpecs:
    return current_app.extensions["inbox.specs"]


def idempotency_key() -> str | None:
    """The request's Idempotency-Key, by the kit's one rule for every service (1-128 printable ASCII
    characters, else 400 `invalid_idempotency_key`)."""
    return idempotency_key_header()


def only_query(*allowed: str) -> None:
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise InvalidInput("invalid_query", f"unknown query parameter: {unknown[0]}")


def sent(result) -> tuple[dict, int]:
    body = {"id": result.message_id, "recipient_ids": result.recipient_ids}
    if result.thread_id:
        body["thread_id"] = result.thread_id
    return body, 201 if result.created else 200


# --- messages and threads -----------------------------------------------------------------------


@messages.post("")
@staff_only
def send():
    _board().require_compose(g.identity, domain.COMPOSE_MESSAGE)
    draft = draft_from(validate(json_body(), _specs().send))
    return sent(_mailbox().send(g.identity, draft, idempotency_key()))


@messages.get("")
@staff_only
def page():
    only_query("folder", "unread", "cursor", "limit")
    folder = request.args.get("folder", domain.FOLDER_MESSAGES)
    if folder not in (domain.FOLDER_MESSAGES, domain.FOLDER_SENT):
        raise InvalidInput("invalid_query", "folder must be one of: messages, sent")
    return _mailbox().page(
        g.identity,
        folder,
        unread_only=query_bool("unread"),
        cursor=request.args.get("cursor") or None,
        limit=query_int("limit", 20, 1, 100),
    )


@messages.get("/<message_id>")
@staff_only
def read(message_id: str):
    return _mailbox().read(g.identity, path_id(message_id, "message"))


@messages.post("/<message_id>/unread")
@staff_only
def mark_unread(message_id: str):
    return _mailbox().mark_unread(g.identity, path_id(message_id, "message"))


def _reply(message_id: str, reply_all: bool):
    _board().require_compose(g.identity, domain.COMPOSE_MESSAGE)
    message_id = path_id(message_id, "message")
    fields = validate(json_body(), _specs().reply)
    require_body(fields)
    result = _mailbox().reply(
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
    _board().require_compose(g.identity, domain.COMPOSE_MESSAGE)
    message_id = path_id(message_id, "message")
    fields = validate(json_body(), _specs().forward)
    result = _mailbox().forward(
        g.identity,
        message_id,
        addressing=addressing_from(fields),
        note=fields.get("body", ""),
        links=tuple(fields.get("links", ())),
        priority=fields.get("priority", "normal"),
        idempotency_key=idempotency_key(),
        max_body=_components().settings.max_body_chars,
    )
    return sent(result)


@threads.get("/<thread_id>")
@staff_only
def thread(thread_id: str):
    return _mailbox().thread(g.identity, path_id(thread_id, "thread"))


# --- the board and labels ------------------------------------------------------------------------


@board_routes.get("")
@staff_only
def tree():
    only_query()
    return _board().tree(g.identity)


@board_routes.put("/sections/<section>")
@staff_only
def set_section(section: str):
    expanded = validate(json_body(), SECTION_SPEC)["expanded"]
    return _board().set_section(g.identity, path_id(section, "section"), expanded)


@board_routes.get("/items")
@staff_only
def items():
    only_query("folder", "unread", "urgent", "label", "kind", "order", "cursor", "limit")
    label = request.args.get("label") or None
    if label is not None and not ID_PATTERN.fullmatch(label):
        raise InvalidInput("invalid_query", "label is not a label id")
    kind = request.args.get("kind") or None
    if kind is not None and kind not in domain.ITEM_KINDS:
        raise InvalidInput("invalid_query", f"kind must be one of: {', '.join(domain.ITEM_KINDS)}")
    filters = ItemFilter(unread=query_bool("unread"), urgent=query_bool("urgent"), label_id=label, kind=kind)
    filters.order = request.args.get("order") or "newest"
    return _board().page(
        g.identity,
        request.args.get("folder", domain.FOLDER_MESSAGES),
        filters,
        request.args.get("cursor") or None,
        query_int("limit", 20, 1, 100),
    )


@board_routes.get("/items/<item_id>")
@staff_only
def open_item(item_id: str):
    return _board().open_item(g.identity, path_id(item_id, "item"))


@board_routes.post("/items/<item_id>/read")
@staff_only
def item_read(item_id: str):
    return _board().set_read(g.identity, path_id(item_id, "item"), read=True)


@board_routes.post("/items/<item_id>/unread")
@staff_only
def item_unread(item_id: str):
    return _board().set_read(g.identity, path_id(item_id, "item"), read=False)


@board_routes.post("/items/<item_id>/archive")
@staff_only
def item_archive(item_id: str):
    return _board().archive(g.identity, path_id(item_id, "item"))


@board_routes.post("/items/<item_id>/restore")
@staff_only
def item_restore(item_id: str):
    return _board().restore(g.identity, path_id(item_id, "item"))


@board_routes.delete("/items/<item_id>")
@staff_only
def item_delete(item_id: str):
    _board().delete(g.identity, path_id(item_id, "item"))
    return "", 204


@board_routes.post("/items/<item_id>/labels")
@staff_only
def item_label(item_id: str):
    fields = validate(json_body(), LABEL_SPEC)
    return _board().add_label(g.identity, path_id(item_id, "item"), fields.get("label_id"), fields.get("name"))


@board_routes.delete("/items/<item_id>/labels/<label_id>")
@staff_only
def item_unlabel(item_id: str, label_id: str):
    return _board().remove_label(g.identity, path_id(item_id, "item"), path_id(label_id, "label"))


@board_routes.post("/items/<item_id>/labels/move")
@staff_only
def item_move_label(item_id: str):
    fields = validate(json_body(), MOVE_SPEC)
    return _board().move_label(g.identity, path_id(item_id, "item"), fields["from_label_id"], fields["to_label_id"])


@labels.get("")
@staff_only
def list_labels():
    return {"labels": _board().labels(g.identity)}


@labels.post("")
@staff_only
def create_label():
    return _board().create_label(g.identity, validate(json_body(), NAME_SPEC)["name"]), 201


@labels.patch("/<label_id>")
@staff_only
def rename_label(label_id: str):
    return _board().rename_label(g.identity, path_id(label_id, "label"), validate(json_body(), NAME_SPEC)["name"])


@labels.delete("/<label_id>")
@staff_only
def delete_label(label_id: str):
    _board().delete_label(g.identity, path_id(label_id, "label"))
    return "", 204


@labels.get("/<label_id>/items")
@staff_only
def label_items(label_id: str):
    only_query("unread", "cursor", "limit")
    return _board().label_page(
        g.identity,
        path_id(label_id, "label"),
        request.args.get("cursor") or None,
        query_int("limit", 20, 1, 100),
        unread=query_bool("unread"),
    )


# --- health -----------------------------------------------------------------------------------------


@health.get("/readyz")
def readyz():
    """Ready when the database answers."""
    return readiness({"database": lambda: _components().store.db.command("ping")})
