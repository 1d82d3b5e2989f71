"""Signed bus messages, as pure logic: who signed, over what, and who may publish which event type."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clinic.inbox.v1 import inbox_pb2
from services.kit.bus import signing
from services.kit.bus.__main__ import main as bus_cli
from services.kit.bus.signing import (
    HEADER_SIGNATURE,
    HEADER_SIGNER,
    Keyring,
    ProducerKeys,
    Refusal,
    Signer,
    load_signing,
    topic_matches,
)
from services.kit.events import new_envelope
from services.kit.settings import Env, SettingsError

REQUESTED = "board_item.delivery_requested.v1"
NAMES = ("notifications", "web", "directory", "inbox")


@pytest.fixture(scope="module")
def signers() -> dict[str, Signer]:
    return {name: Signer(name, Ed25519PrivateKey.generate()) for name in NAMES}


@pytest.fixture(scope="module")
def producers(signers) -> ProducerKeys:
    return ProducerKeys({name: s.public_key for name, s in signers.items()})


def body_of(producer: str, event_type: str = REQUESTED) -> bytes:
    request = inbox_pb2.DeliverItemRequest(title="critical potassium, call patient")
    return new_envelope(event_type, request, agency_id="agy_1", producer=producer).SerializeToString()


def check(producers: ProducerKeys, headers, producer: str, body: bytes, event_type: str = REQUESTED, routing_key=None):
    return producers.refusal(routing_key or event_type, body, headers, producer=producer, event_type=event_type)


def test_a_producer_signing_what_it_may_publish_is_believed(signers, producers):
    body = body_of("notifications")
    headers = signers["notifications"].headers(REQUESTED, body, "notifications")
    assert headers[HEADER_SIGNER] == "notifications"
    assert check(producers, headers, "notifications", body) is None


def test_a_message_without_a_signature_is_unsigned(signers, producers):
    body = body_of("notifications")
    assert check(producers, {}, "notifications", body) == "unsigned"
    assert check(producers, None, "notifications", body) == "unsigned"
    signature_only = {HEADER_SIGNATURE: signers["notifications"].headers(REQUESTED, body, "")[HEADER_SIGNATURE]}
    assert check(producers, signature_only, "notifications", body) == "unsigned"


def test_anothers_key_never_speaks_for_the_producer_the_envelope_names(signers, producers):
    body = body_of("notifications")
    honest_web = signers["web"].headers(REQUESTED, body, "notifications")  # x-signer: web
    assert check(producers, honest_web, "notifications", body) == "bad_signature"
    claimed = {**honest_web, HEADER_SIGNER: "notifications"}  # web's signature, notifications' name
    assert check(producers, claimed, "notifications", body) == "bad_signature"
    stranger = {**honest_web, HEADER_SIGNER: "lab-vendor"}
    assert check(producers, stranger, "notifications", body) == "unknown_producer"


def test_a_body_or_route_changed_after_signing_is_refused(signers, producers):
    body = body_of("notifications")
    headers = signers["notifications"].headers(REQUESTED, body, "notifications")
    changed = body.replace(b"critical potassium", b"critical sodium!!!")
    assert changed != body
    assert check(producers, headers, "notifications", changed) == "bad_signature"
    assert check(producers, headers, "notifications", body, routing_key="session.revoked.v1") == "bad_signature"
    garbage = {**headers, HEADER_SIGNATURE: "not base64 at all!"}
    assert check(producers, garbage, "notifications", body) == "bad_signature"


def test_the_policy_says_who_may_publish_which_event_type(signers, producers):
    body = body_of("web")
    web = signers["web"].headers(REQUESTED, body, "web")
    assert check(producers, web, "web", body) == "producer_not_allowed"
    revoked = body_of("web", "session.revoked.v1")
    assert check(producers, signers["web"].headers("session.revoked.v1", revoked, "web"), "web", revoked,
                 "session.revoked.v1") == "producer_not_allowed"  # fmt: skip
    by_directory = body_of("directory", "session.revoked.v1")
    headers = signers["directory"].headers("session.revoked.v1", by_directory, "directory")
    assert check(producers, headers, "directory", by_directory, "session.revoked.v1") is None
    for anyone in NAMES:  # audit records come from every service
        audit = body_of(anyone, "phi.accessed.v1")
        headers = signers[anyone].headers("phi.accessed.v1", audit, anyone)
        assert check(producers, headers, anyone, audit, "phi.accessed.v1") is None
    unknown = body_of("inbox", "thing.happened.v1")
    headers = signers["inbox"].headers("thing.happened.v1", unknown, "inbox")
    assert check(producers, headers, "inbox", unknown, "thing.happened.v1") == "producer_not_allowed"


def test_the_policy_names_the_real_producers_of_board_deliveries():
    assert signing.POLICY[REQUESTED] == {"notifications", "erx-bridge", "cloud-comms"}
    assert signing.POLICY["session.revoked.v1"] == {"directory"}
    assert signing.POLICY["security_event.recorded.v1"] == set(signing.KNOWN_PRODUCERS)


def test_the_development_keyring_signs_as_the_named_producer_and_leaves_strangers_unsigned(signers, producers):
    keyring = Keyring(signers)
    body = body_of("notifications")
    assert check(producers, keyring.headers(REQUESTED, body, "notifications"), "notifications", body) is None
    assert keyring.headers(REQUESTED, body, "lab-vendor") == {}


def test_a_producer_replacing_its_key_is_believed_with_either_key_listed(signers, tmp_path):
    old, new = signers["notifications"], Signer("notifications", Ed25519PrivateKey.generate())
    both = ",".join(f"notifications:{signing.raw_public_b64(s.public_key)}" for s in (old, new))
    env = Env("notifications", {"CLINIC_MODE": "production", "CLINIC_RUN_DIR": str(tmp_path),
                                "BUS_SIGNING_KEY": raw_b64(Ed25519PrivateKey.generate()), "BUS_PRODUCER_KEYS": both})
    assert load_signing(env, "notifications") is None  # its own key must be one of those listed
    producers = ProducerKeys(signing.parse_producer_keys(both, problems := []))
    assert not problems
    body = body_of("notifications")
    for signer in (old, new):
        assert check(producers, signer.headers(REQUESTED, body, "notifications"), "notifications", body) is None
    stranger = Signer("notifications", Ed25519PrivateKey.generate()).headers(REQUESTED, body, "notifications")
    assert check(producers, stranger, "notifications", body) == "bad_signature"


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b.v1", "a.b.v1", True),
        ("a.b.v1", "a.c.v1", False),
        ("a.*.v1", "a.b.v1", True),
        ("a.*.v1", "a.b.c.v1", False),
        ("a.#", "a.b.c.v1", True),
        ("#", "x.y.v1", True),
        ("a.#.v1", "a.v1", True),
        ("a.b", "a.b.v1", False),
    ],
)
def test_topic_patterns_match_as_the_broker_routes(pattern, key, matches):
    assert topic_matches(pattern, key) is matches


# --- keys from the environment ---------------------------------------------------------------------


def test_development_generates_one_key_pair_per_producer_into_the_run_folder(tmp_path):
    env = Env("inbox", {"CLINIC_RUN_DIR": str(tmp_path)})
    inbox = load_signing(env, "inbox")
    env.done()
    assert set(inbox.producers.keys) == set(signing.KNOWN_PRODUCERS)
    assert sorted(p.name for p in (tmp_path / "secrets").glob("bus-signing-*.key")) == sorted(
        f"bus-signing-{name}.key" for name in signing.KNOWN_PRODUCERS
    )
    other = load_signing(Env("notifications", {"CLINIC_RUN_DIR": str(tmp_path)}), "notifications")
    body = body_of("inbox", "message.delivered.v1")
    headers = inbox.signer.headers("message.delivered.v1", body, "inbox")
    assert other.producers.refusal("message.delivered.v1", body, headers, producer="inbox",
                                   event_type="message.delivered.v1") is None  # fmt: skip
    keyring = signing.development_keyring(tmp_path)
    assert keyring.producers.refusal("message.delivered.v1", body, headers, producer="inbox",
                                     event_type="message.delivered.v1") is None  # fmt: skip


def test_production_requires_both_keys_and_lists_them(tmp_path):
    env = Env("inbox", {"CLINIC_MODE": "production", "CLINIC_RUN_DIR": str(tmp_path)})
    assert load_signing(env, "inbox") is None
    with pytest.raises(SettingsError) as refused:
        env.done()
    assert refused.value.problems == [
        "BUS_SIGNING_KEY (or BUS_SIGNING_KEY_FILE) is required in production",
        "BUS_PRODUCER_KEYS (or BUS_PRODUCER_KEYS_FILE) is required in production",
    ]
    assert not (tmp_path / "secrets").exists()  # nothing generated in production


def raw_b64(key: Ed25519PrivateKey) -> str:
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return base64.b64encode(raw).decode()


def test_production_keys_from_values_or_files_in_either_format(tmp_path):
    inbox, web = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    listed = f"inbox:{signing.raw_public_b64(inbox.public_key())}\nweb:{signing.raw_public_b64(web.public_key())}\n"
    (tmp_path / "producers").write_text(listed)
    pem = inbox.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()  # fmt: skip
    (tmp_path / "inbox.pem").write_text(pem)
    for given in (
        {"BUS_SIGNING_KEY": raw_b64(inbox), "BUS_PRODUCER_KEYS": listed.replace("\n", ",")},
        {"BUS_SIGNING_KEY_FILE": str(tmp_path / "inbox.pem"), "BUS_PRODUCER_KEYS_FILE": str(tmp_path / "producers")},
    ):
        env = Env("inbox", {"CLINIC_MODE": "production", "CLINIC_RUN_DIR": str(tmp_path), **given})
        loaded = load_signing(env, "inbox")
        env.done()
        assert loaded.signer.name == "inbox" and set(loaded.producers.keys) == {"inbox", "web"}
        body = body_of("inbox", "message.delivered.v1")
        headers = loaded.signer.headers("message.delivered.v1", body, "inbox")
        assert loaded.producers.refusal("message.delivered.v1", body, headers, producer="inbox",
                                        event_type="message.delivered.v1") is None  # fmt: skip


def test_bad_or_inconsistent_keys_are_refused_with_a_reason(tmp_path):
    inbox, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    own, others = signing.raw_public_b64(inbox.public_key()), signing.raw_public_b64(other.public_key())
    base = {"CLINIC_MODE": "production", "CLINIC_RUN_DIR": str(tmp_path)}
    cases = {
        "BUS_SIGNING_KEY must be base64 of a raw 32-byte Ed25519 key or an unencrypted Ed25519 PKCS#8 PEM": {
            "BUS_SIGNING_KEY": "c2hvcnQ=", "BUS_PRODUCER_KEYS": f"inbox:{own}",
        },
        "BUS_PRODUCER_KEYS entries must be '<producer>:<base64 of a 32-byte Ed25519 public key>'": {
            "BUS_SIGNING_KEY": raw_b64(inbox), "BUS_PRODUCER_KEYS": "inbox:nope",
        },
        "BUS_SIGNING_KEY does not match the key BUS_PRODUCER_KEYS lists for inbox": {
            "BUS_SIGNING_KEY": raw_b64(inbox), "BUS_PRODUCER_KEYS": f"inbox:{others}",
        },
        "BUS_PRODUCER_KEYS has no key for inbox: its own events would be refused": {
            "BUS_SIGNING_KEY": raw_b64(inbox), "BUS_PRODUCER_KEYS": f"web:{others}",
        },
    }
    for problem, given in cases.items():
        env = Env("inbox", {**base, **given})
        assert load_signing(env, "inbox") is None
        assert problem in env.problems, problem


def test_without_configuration_production_refuses_and_development_uses_the_run_folder(tmp_path, monkeypatch):
    signing.configure(None)
    monkeypatch.setenv("CLINIC_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("CLINIC_MODE", "production")
    with pytest.raises(RuntimeError):
        signing.current()
    monkeypatch.setenv("CLINIC_MODE", "development")
    assert isinstance(signing.current().signer, Keyring)
    assert (tmp_path / "secrets" / "bus-signing-inbox.key").exists()
    assert signing.refusal_hook() is None
    configured = signing.with_hook(signing.current(), lambda refusal: None)
    signing.configure(configured)
    try:
        assert signing.current() is configured and signing.refusal_hook() is configured.on_refused
    finally:
        signing.configure(None)


class Log:
    def __init__(self):
        self.records = []

    def record(self, kind, **fields):
        self.records.append((kind, fields))


def test_a_refusal_becomes_an_event_refused_security_event():
    log = Log()
    refusal = Refusal("unsigned", "inbox.board-item-deliveries", "ev1", REQUESTED, "agy_1", "notifications", "")
    signing.record_refusal(log, refusal)
    assert log.records == [
        (
            "event_refused",
            {
                "agency_id": "agy_1",
                "actor_id": "notifications",
                "actor_kind": "service",
                "outcome": "refused",
                "reason": "unsigned",
                "target_type": f"event:{REQUESTED}",
                "target_id": "ev1",
                "source": "queue:inbox.board-item-deliveries",
            },
        )
    ]


def test_claimed_values_reach_the_record_only_when_safely_shaped():
    assert signing.safe_name("notifications") == "notifications"
    assert signing.safe_name("Jane Doe, DOB 1970") == ""
    assert signing.safe_id("agy_1") == "agy_1" and signing.safe_id("agy 1; drop") == ""
    assert signing.safe_type(REQUESTED) == REQUESTED and signing.safe_type("potassium 6.8 mmol/L") == ""


def test_the_key_command_prints_matching_key_pairs(capsys):
    assert bus_cli(["new-keys", "inbox", "web"]) == 0
    lines = capsys.readouterr().out.splitlines()
    private = {line.split()[0]: line.split("=", 1)[1] for line in lines[:2]}
    listed = signing.parse_producer_keys(lines[2].removeprefix("BUS_PRODUCER_KEYS="), problems := [])
    assert not problems and set(listed) == {"inbox", "web"}
    for name, key in private.items():
        public = signing.parse_private_key(key).public_key()
        assert [signing.raw_public_b64(public)] == [signing.raw_public_b64(k) for k in listed[name]]
    assert bus_cli(["new-keys", "Not A Name"]) == 2
