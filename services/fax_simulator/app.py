"""The simulator's HTTP face: the parts of Phaxio's API v2 cloud-comms uses, signed callbacks to
cloud-comms (received faxes, sent-fax status updates), and a control API for tests and demos.

    POST /v2/faxes          send a fax (multipart: `to` or `to[]`, `file` or `file[]`, optional
                            `callback_url`, `caller_id`, `tag[<name>]`; HTTP basic auth with the API
                            key and secret)
    GET  /v2/faxes          the faxes, filtered by `direction` and `tag[<name>]` (basic auth)
    GET  /v2/faxes/<id>     one fax (basic auth)
    GET  /healthz

The API is served under /v2 (Phaxio's root is https://api.phaxio.com/v2) and also at the root, so
CLOUD_FAX_API_URL may be the simulator's address with or without /v2.

Callbacks are multipart POSTs signed as Phaxio signs them (X-Phaxio-Signature; see `sign`). The
control API (/simulator/..., no authentication: development only, loopback only) is in README.md.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import itertools
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import requests
from flask import Blueprint, Flask, current_app, jsonify, request

from services.fax_simulator.pdf import SAMPLE_TEXT, sample_pdf

__all__ = ["Simulator", "create_app", "sign"]

log = logging.getLogger(__name__)

FAULTS = (
    "bad_signature",
    "duplicate_callback",
    "no_signature",
    "not_a_pdf",
    "send_failure",
    "api_unavailable",
    "api_refuses",
    "lost_answer",
    "api_unauthorized",
    "test_mode",
)
SEND_STEPS = ("queued", "inprogress")
DEFAULT_FAILURE = "Busy signal"
DEFAULT_REFUSAL = "Phone number is not a valid fax number"
TAG = re.compile(r"^tag\[([A-Za-z0-9_]{1,64})\]$")


def sign(token: str, url: str, params: dict[str, str], files: dict[str, bytes]) -> str:
    """X-Phaxio-Signature as Phaxio documents it: URL + sorted (name + value) of the POST parameters +
    sorted (part name + hex SHA-1 of the contents) of the file parts, HMAC-SHA1 with the callback
    token, hex. Written independently of cloud-comms' check on purpose."""
    parts = [url]
    parts += [name + value for name, value in sorted(params.items())]
    parts += [name + hashlib.sha1(data).hexdigest() for name, data in sorted(files.items())]  # noqa: S324
    return hmac.new(token.encode("utf-8"), "".join(parts).encode("utf-8"), hashlib.sha1).hexdigest()


def _flag(value: bool) -> str:
    return "true" if value else "false"


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Fault:
    kind: str
    times: int = 1
    reason: str = ""  # send_failure: the error message; api_refuses: the 422's message

    def as_json(self) -> dict:
        return {"fault": self.kind, "times": self.times, **({"reason": self.reason} if self.reason else {})}


@dataclass
class SentFax:
    fax_id: int
    to: list[str]
    pages: int
    file_bytes: int
    callback_url: str
    created_at: str
    caller_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    failure: str = ""  # the error message when it is to fail
    is_test: bool = False  # sent as with Phaxio's test API keys: reported, never transmitted
    status: str = "queued"
    callbacks: list[dict] = field(default_factory=list)  # {"status", "answers"}

    def fax_object(self) -> dict:
        done = self.status in ("success", "failure")
        failed = self.status == "failure"
        now = rfc3339(dt.datetime.now(dt.UTC)) if done else None
        error = {
            "error_type": "lineError" if failed else None,
            "error_message": self.failure if failed else None,
            "error_id": 38 if failed else None,
        }
        return {
            "id": self.fax_id,
            "direction": "sent",
            "num_pages": self.pages,
            "cost": 7 * self.pages,
            "status": self.status,
            "is_test": self.is_test,
            "created_at": self.created_at,
            "caller_id": self.caller_id,
            "from_number": None,
            "recipients": [
                {"phone_number": number, "status": self.status, "retry_count": 0, "completed_at": now, **error}
                for number in self.to
            ],
            "tags": dict(self.tags),
            **error,
            "completed_at": now,
        }


class Simulator:
    """State and behaviour: sent faxes, the inbound faxes delivered, waiting faults, and the callback
    sender (`post` is injectable so tests can capture callbacks without a server)."""

    def __init__(
        self,
        *,
        callback_token: str,
        api_key: str,
        api_secret: str,
        received_url: str,
        status_url: str,
        step_s: float = 0.5,
        post: Callable[..., requests.Response] | None = None,
    ):
        self.callback_token = callback_token
        self.api_key = api_key
        self.api_secret = api_secret
        self.received_url = received_url
        self.status_url = status_url
        self.step_s = step_s
        self._post = post or requests.post
        self._lock = threading.Lock()
        self._ids = itertools.count(70_000_001)
        self.sent: dict[int, SentFax] = {}
        self.inbound: list[dict] = []
        self.faults: list[Fault] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- faults ------------------------------------------------------------------------------------
    def add_fault(self, fault: Fault) -> None:
        if fault.kind not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}")
        with self._lock:
            self.faults.append(fault)

    def take_fault(self, kinds: tuple[str, ...]) -> str | None:
        taken = self.take(kinds)
        return taken.kind if taken else None

    def take(self, kinds: tuple[str, ...]) -> Fault | None:
        """The first waiting fault of one of `kinds`, used once."""
        with self._lock:
            for fault in self.faults:
                if fault.kind in kinds:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def reset(self) -> None:
        with self._lock:
            self.sent.clear()
            self.inbound.clear()
            self.faults.clear()

    def state(self) -> dict:
        with self._lock:
            return {
                "sent": [{**fax.fax_object(), "callbacks": list(fax.callbacks)} for fax in self.sent.values()],
                "inbound": list(self.inbound),
                "faults": [fault.as_json() for fault in self.faults],
                "received_url": self.received_url,
                "status_url": self.status_url,
            }

    # -- callbacks ---------------------------------------------------------------------------------
    def _deliver(self, url: str, params: dict[str, str], files: dict[str, bytes]) -> list[int]:
        """POST one signed callback (twice under duplicate_callback); the HTTP statuses answered."""
        fault = self.take_fault(("bad_signature", "no_signature", "duplicate_callback"))
        headers = {}
        if fault != "no_signature":
            signed = sign(self.callback_token, url, params, files)
            if fault == "bad_signature":
                signed = sign(self.callback_token + "-wrong", url, params, files)
            headers["X-Phaxio-Signature"] = signed
        # Always multipart, as Phaxio posts callbacks: the fields as parts without a file name.
        multipart = {name: (None, value) for name, value in params.items()}
        multipart.update({name: (f"{name}.pdf", data, "application/pdf") for name, data in files.items()})
        answers = []
        for _ in range(2 if fault == "duplicate_callback" else 1):
            try:
                reply = self._post(url, files=multipart, headers=headers, timeout=30)
                answers.append(reply.status_code)
            except requests.RequestException as exc:
                log.warning("callback failed (%s)", type(exc).__name__)
                answers.append(0)
        return answers

    def inbound_fax(  # noqa: PLR0913 - the fax's fields
        self, from_number: str, to_number: str, pages: int, text: str = SAMPLE_TEXT, *, is_test: bool = False
    ) -> dict:
        """Deliver a received fax to the received-fax callback URL, as Phaxio does; what happened."""
        fax_id = next(self._ids)
        now = dt.datetime.now(dt.UTC)
        pdf = sample_pdf(pages, text)
        if self.take_fault(("not_a_pdf",)):
            pdf = b"GIF89a not a pdf at all"
        fax = {
            "id": fax_id,
            "direction": "received",
            "num_pages": pages,
            "cost": 7 * pages,
            "status": "success",
            "is_test": is_test,
            "created_at": rfc3339(now - dt.timedelta(seconds=40)),
            "caller_id": None,
            "from_number": from_number,
            "caller_name": "",
            "to_number": to_number,
            "tags": {},
            "error_type": None,
            "error_message": None,
            "error_id": None,
            "completed_at": rfc3339(now),
        }
        params = {"fax": json.dumps(fax), "direction": "received", "is_test": _flag(is_test), "success": "true"}
        answers = self._deliver(self.received_url, params, {"filename": pdf})
        record = {"fax_id": fax_id, "from": from_number, "to": to_number, "pages": pages, "answers": answers}
        with self._lock:
            self.inbound.append(record)
        log.info("inbound fax delivered", extra={"status": answers[-1] if answers else 0})
        return record

    # -- sending -----------------------------------------------------------------------------------
    def send(
        self,
        to: list[str],
        pages: int,
        file_bytes: int,
        callback_url: str,
        *,
        caller_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> SentFax:
        failing = self.take(("send_failure",))
        fax = SentFax(
            fax_id=next(self._ids),
            to=to,
            pages=pages,
            file_bytes=file_bytes,
            callback_url=callback_url or self.status_url,
            created_at=rfc3339(dt.datetime.now(dt.UTC)),
            caller_id=caller_id,
            tags=dict(tags or {}),
            failure=(failing.reason or DEFAULT_FAILURE) if failing else "",
            is_test=self.take_fault(("test_mode",)) is not None,
        )
        with self._lock:
            self.sent[fax.fax_id] = fax
        thread = threading.Thread(target=self._progress, args=(fax,), name=f"fax-{fax.fax_id}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return fax

    def find(self, direction: str | None, tags: dict[str, str]) -> list[dict]:
        """Sent faxes with every one of `tags` (only sent faxes are kept), as Phaxio lists them."""
        if direction not in (None, "sent"):
            return []
        with self._lock:
            return [
                fax.fax_object()
                for fax in self.sent.values()
                if all(fax.tags.get(name) == value for name, value in tags.items())
            ]

    def _progress(self, fax: SentFax) -> None:
        """queued -> inprogress -> success | failure, a signed status callback at each step."""
        for status in (*SEND_STEPS, "failure" if fax.failure else "success"):
            if self._stop.wait(self.step_s):
                return
            with self._lock:
                fax.status = status
                body = fax.fax_object()
            params = {
                "fax": json.dumps(body),
                "direction": "sent",
                "is_test": _flag(fax.is_test),
                "success": _flag(status == "success"),
            }
            answers = self._deliver(fax.callback_url, params, {})
            with self._lock:
                fax.callbacks.append({"status": status, "answers": answers})

    def stop(self) -> None:
        self._stop.set()


api = Blueprint("phaxio_api", __name__)
control = Blueprint("simulator_control", __name__)


def _sim() -> Simulator:
    return current_app.extensions["fax_simulator"]


def create_app(simulator: Simulator) -> Flask:
    app = Flask("fax_simulator")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024
    app.extensions["fax_simulator"] = simulator
    app.register_blueprint(api, url_prefix="/v2")
    app.register_blueprint(api, url_prefix="", name="phaxio_api_at_root")
    app.register_blueprint(control, url_prefix="/simulator")

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    return app


def _phaxio_error(status: int, message: str):
    return jsonify(success=False, message=message), status


def _authorized() -> bool:
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        key, _, secret = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
    except ValueError:
        return False
    sim = _sim()
    return hmac.compare_digest(key, sim.api_key) and hmac.compare_digest(secret, sim.api_secret)


def _tags(values) -> dict[str, str]:
    """`tag[<name>]` parameters as {name: value}."""
    return {match.group(1): value for key, value in values.items() if (match := TAG.fullmatch(key))}


@api.post("/faxes")
def send_fax():
    if not _authorized():
        return _phaxio_error(401, "Invalid API credentials")
    sim = _sim()
    if sim.take_fault(("api_unauthorized",)):
        return _phaxio_error(401, "Invalid API credentials (simulated)")
    if sim.take_fault(("api_unavailable",)):
        return _phaxio_error(503, "Service temporarily unavailable (simulated)")
    refusal = sim.take(("api_refuses",))
    if refusal:
        return _phaxio_error(422, refusal.reason or DEFAULT_REFUSAL)
    to = [n.strip() for n in request.form.getlist("to") + request.form.getlist("to[]") if n.strip()]
    files = request.files.getlist("file") + request.files.getlist("file[]")
    if not to:
        return _phaxio_error(422, "You must provide at least one recipient (to)")
    if not files and not request.form.get("content_url"):
        return _phaxio_error(422, "You must provide a file or content_url")
    contents = [f.read() for f in files]
    pages = sum(max(1, data.count(b"/Type /Page") - data.count(b"/Type /Pages")) for data in contents) or 1
    fax = sim.send(
        to,
        pages,
        sum(len(d) for d in contents),
        request.form.get("callback_url", ""),
        caller_id=request.form.get("caller_id") or None,
        tags=_tags(request.form),
    )
    if sim.take_fault(("lost_answer",)):  # accepted, but the answer never reaches the sender
        return _phaxio_error(502, "Bad gateway (simulated: the fax was queued)")
    return jsonify(success=True, message="Fax queued for sending", data={"id": fax.fax_id})


@api.get("/faxes")
def list_faxes():
    if not _authorized():
        return _phaxio_error(401, "Invalid API credentials")
    found = _sim().find(request.args.get("direction"), _tags(request.args))
    return jsonify(
        success=True,
        message="Retrieved faxes successfully",
        data=found,
        paging={"total": len(found), "per_page": max(len(found), 20), "page": 1},
    )


@api.get("/faxes/<int:fax_id>")
def get_fax(fax_id: int):
    if not _authorized():
        return _phaxio_error(401, "Invalid API credentials")
    fax = _sim().sent.get(fax_id)
    if fax is None:
        return _phaxio_error(404, "Fax not found")
    return jsonify(success=True, message="Retrieved fax successfully", data=fax.fax_object())


def _body() -> dict:
    if not request.get_data():
        return {}
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {"__invalid__": True}


@control.get("/state")
def state():
    return jsonify(_sim().state())


@control.post("/reset")
def reset():
    _sim().reset()
    return jsonify(_sim().state())


@control.post("/inbound")
def inbound():
    body = _body()
    unknown = sorted(set(body) - {"from", "to", "pages", "text", "is_test"})
    if unknown:
        return jsonify(error=f"unknown field {unknown[0]!r}"), 400
    from_number, to_number = body.get("from", "+15555550123"), body.get("to")
    pages, text = body.get("pages", 1), body.get("text", SAMPLE_TEXT)
    if not isinstance(to_number, str) or not isinstance(from_number, str) or not isinstance(text, str):
        return jsonify(error="from, to and text must be strings; to is required"), 400
    if isinstance(pages, bool) or not isinstance(pages, int) or not 1 <= pages <= 200:
        return jsonify(error="pages must be a whole number from 1 to 200"), 400
    is_test = body.get("is_test", False)
    if not isinstance(is_test, bool):
        return jsonify(error="is_test must be true or false"), 400
    return jsonify(_sim().inbound_fax(from_number, to_number, pages, text, is_test=is_test)), 201


@control.post("/faults")
def add_fault():
    body = _body()
    times, reason = body.get("times", 1), body.get("reason", "")
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        return jsonify(error="times must be a positive whole number"), 400
    if not isinstance(reason, str) or len(reason) > 200:
        return jsonify(error="reason must be a string of at most 200 characters"), 400
    try:
        _sim().add_fault(Fault(str(body.get("fault", "")), times, reason))
    except ValueError as exc:
        return jsonify(error=str(exc)), 400
    return jsonify(faults=_sim().state()["faults"]), 201


@control.delete("/faults")
def clear_faults():
    with _sim()._lock:
        _sim().faults.clear()
    return jsonify(faults=[])
