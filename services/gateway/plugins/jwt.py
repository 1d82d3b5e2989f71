"""The jwt plugin (Kong 3.9 kong/plugins/jwt): verify a signed token, identify its consumer.

Token search order, status codes, messages, WWW-Authenticate values and the
upstream headers follow the handler and jwt_parser of Kong 3.9. Like Kong,
failures answer through `kong.response.exit`, so bodies are `{"message": ...}`
(or the claim errors, e.g. `{"exp": "token expired"}`) without a request id.

A token whose signature has been verified is remembered (VERIFIED, shared by
every jwt plugin instance, bounded): a repeated token is looked up before it is
decoded, and costs neither a decode nor a signature check; its claims (exp,
nbf, maximum_expiration) are still checked on every request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections import OrderedDict
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from services.gateway.context import RequestContext
from services.gateway.declarative.schema import Boolean, Number, Record, Set, String, conditional
from services.gateway.model import GatewayModel, JwtSecret, PluginInstance
from services.gateway.plugins.base import Plugin, PluginSpec
from services.gateway.responses import Exit, exit_json

_BEARER = re.compile(r"\s*[Bb]earer\s+(.+)")
_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_HMAC = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_EC_SIZES = {"ES256": 32, "ES384": 48, "ES512": 66}
SUPPORTED_ALGS = frozenset({*_HMAC, "RS256", "RS384", "RS512", *_EC_SIZES, "PS256", "PS384", "PS512", "EdDSA"})


class BadToken(ValueError):
    pass


class Verified:
    """A token whose signature checked out against `secret`, decoded."""

    __slots__ = ("token", "secret", "secret_is_base64", "header", "claims")

    def __init__(self, token: str, secret: JwtSecret, secret_is_base64: bool, header: dict, claims: dict):
        self.token = token
        self.secret = secret
        self.secret_is_base64 = secret_is_base64
        self.header = header
        self.claims = claims


class VerifiedTokens:
    """Token -> Verified, least recently used first out. Only valid signatures are stored."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._entries: OrderedDict[str, Verified] = OrderedDict()

    def get(self, token: str) -> Verified | None:
        entry = self._entries.get(token)
        if entry is not None:
            self._entries.move_to_end(token)
        return entry

    def put(self, entry: Verified) -> None:
        self._entries[entry.token] = entry
        self._entries.move_to_end(entry.token)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


VERIFIED = VerifiedTokens()


def _b64decode(segment: str) -> bytes:
    padded = segment + "=" * (-len(segment) % 4)
    try:
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise BadToken from None


def decode(token: str) -> tuple[dict, dict, bytes, bytes]:
    """jwt_parser.decode_token: header, claims, signing input and signature, or BadToken(reason)."""
    parts = token.split(".", 2)
    if len(parts) < 3:
        raise BadToken("invalid JSON")
    try:
        header = json.loads(_b64decode(parts[0]))
        claims = json.loads(_b64decode(parts[1]))
    except (BadToken, ValueError, UnicodeDecodeError):
        raise BadToken("invalid JSON") from None
    alg = header.get("alg") if isinstance(header, dict) else None
    if not isinstance(alg, str) or alg not in SUPPORTED_ALGS:
        raise BadToken("invalid alg")
    if not isinstance(claims, dict):
        raise BadToken("invalid claims")
    try:
        signature = _b64decode(parts[2])
    except BadToken:
        raise BadToken("invalid signature") from None
    return header, claims, f"{parts[0]}.{parts[1]}".encode(), signature


def verification_key(secret: JwtSecret, secret_is_base64: bool = False) -> Any:
    """The key a signature is checked with: the loader's (parsed PEM or secret bytes), or the
    base64-decoded HMAC secret when the plugin says the secrets are base64 (None if they are not)."""
    if secret_is_base64 and secret.algorithm.startswith("HS") and secret.secret is not None:
        try:
            return _b64decode(secret.secret)
        except BadToken:
            return None
    return secret.verifier


def verify_signature(alg: str, key: Any, signing_input: bytes, signature: bytes) -> bool:
    try:
        if alg in _HMAC:
            return hmac.compare_digest(hmac.new(key, signing_input, _HMAC[alg]).digest(), signature)
        digest = _HASHES.get(alg[2:])
        if alg.startswith("RS") and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, padding.PKCS1v15(), digest())
            return True
        if alg.startswith("PS") and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, padding.PSS(padding.MGF1(digest()), padding.PSS.AUTO), digest())
            return True
        if alg in _EC_SIZES and isinstance(key, ec.EllipticCurvePublicKey):
            size = _EC_SIZES[alg]
            if len(signature) != 2 * size:
                return False
            der = encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))
            key.verify(der, signing_input, ec.ECDSA(digest()))
            return True
        if alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, signing_input)
            return True
    except (InvalidSignature, ValueError, TypeError):
        return False
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def verify_registered_claims(claims: dict, claims_to_verify: list[str], now: int) -> dict[str, str]:
    errors: dict[str, str] = {}
    for name in claims_to_verify:
        value = claims.get(name)
        if not _is_number(value):
            errors[name] = "must be a number"
        elif name == "exp" and value <= now:
            errors[name] = "token expired"
        elif name == "nbf" and value > now:
            errors[name] = "token not valid yet"
    return errors


class JwtPlugin(Plugin):
    has_access = True

    def __init__(self, instance: PluginInstance, model: GatewayModel):
        super().__init__(instance, model)
        conf = self.conf
        self.realm = conf.get("realm")
        self.www_base = f'Bearer realm="{self.realm}"' if self.realm else "Bearer"
        self.www_error = self.www_base + ' error="invalid_token"'
        self.secret_is_base64 = bool(conf["secret_is_base64"])
        self.anonymous = model.consumer_by_id_or_username(conf["anonymous"]) if conf.get("anonymous") else None

    def access(self, ctx: RequestContext) -> Exit | None:
        conf = self.conf
        if not conf["run_on_preflight"] and ctx.request.method == "OPTIONS":
            return None
        if self.anonymous is not None and ctx.credential is not None:
            return None  # already authenticated by another plugin: logical OR
        failure = self._authenticate(ctx)
        if failure is None:
            return None
        if self.anonymous is not None:
            ctx.authenticate(self.anonymous, None)
            ctx.set_consumer_headers(self.anonymous, None, anonymous=True)
            return None
        return failure

    def _unauthorized(self, message: str | None, www: str, errors: dict | None = None) -> Exit:
        return exit_json(401, errors or {"message": message}, [("WWW-Authenticate", www)])

    def _retrieve_tokens(self, ctx: RequestContext) -> list[Any]:
        conf, request = self.conf, ctx.request
        found: dict[Any, None] = {}
        if conf["uri_param_names"]:
            args = request.query_args()
            for name in conf["uri_param_names"]:
                for value in args.get(name, []):
                    if value != "":
                        found[value] = None
        for name in conf["cookie_names"]:
            cookie = request.cookie(name)
            if cookie:
                found[cookie] = None
        for name in conf["header_names"]:
            value = request.header(name.lower())
            if value is not None:
                m = _BEARER.search(value)
                if m and m.group(1):
                    found[m.group(1)] = None
        return list(found)

    def _authenticate(self, ctx: RequestContext) -> Exit | None:
        conf = self.conf
        tokens = self._retrieve_tokens(ctx)
        if not tokens:
            return self._unauthorized("Unauthorized", self.www_base)
        if len(tokens) > 1:
            return self._unauthorized("Multiple tokens provided", self.www_error)
        token = tokens[0]
        if not isinstance(token, str):
            return self._unauthorized("Unrecognizable token", self.www_error)
        claim_name = conf["key_claim_name"]
        known = self._already_verified(token, claim_name)
        if known is not None:
            secret, claims = known.secret, known.claims
        else:
            try:
                header, claims, signing_input, signature = decode(token)
            except BadToken as exc:
                return self._unauthorized(f"Bad token; {exc}", self.www_error)
            key = claims.get(claim_name, header.get(claim_name))
            if key is None:
                return self._unauthorized(f"No mandatory '{claim_name}' in claims", self.www_error)
            if key == "":
                return self._unauthorized(f"Invalid '{claim_name}' in claims", self.www_error)
            secret = self.model.jwt_secrets.get(key) if isinstance(key, str) else None
            if secret is None:
                return self._unauthorized(f"No credentials found for given '{claim_name}'", self.www_error)
            if header["alg"] != secret.algorithm:
                return self._unauthorized("Invalid algorithm", self.www_error)
            verifier = verification_key(secret, self.secret_is_base64)
            if verifier is None:
                return self._unauthorized("Invalid key/secret", self.www_error)
            if not verify_signature(header["alg"], verifier, signing_input, signature):
                return self._unauthorized("Invalid signature", self.www_error)
            VERIFIED.put(Verified(token, secret, self.secret_is_base64, header, claims))

        now = int(time.time())
        errors = verify_registered_claims(claims, conf["claims_to_verify"] or [], now)
        if errors:
            return self._unauthorized(None, self.www_error, errors)
        maximum = conf["maximum_expiration"]
        if maximum and maximum > 0:
            exp = claims.get("exp")
            if exp is None or exp - now > maximum:
                return self._unauthorized(None, self.www_error, {"exp": "exceeds maximum allowed expiration"})

        ctx.authenticate(secret.consumer, secret)
        ctx.set_consumer_headers(secret.consumer, secret.key, anonymous=False)
        return None

    def _already_verified(self, token: str, claim_name: str) -> Verified | None:
        """The remembered verification of `token`, if it holds for this plugin: the credential this
        plugin's claim name picks is the very one that verified it, with the same secret encoding."""
        entry = VERIFIED.get(token)
        if entry is None:
            return None
        key = entry.claims.get(claim_name, entry.header.get(claim_name))
        if not isinstance(key, str) or self.model.jwt_secrets.get(key) is not entry.secret:
            return None
        if entry.secret.algorithm.startswith("HS") and entry.secret_is_base64 != self.secret_is_base64:
            return None
        return entry


CONFIG = Record(
    fields={
        "uri_param_names": Set(elements=String(), default=["jwt"]),
        "cookie_names": Set(elements=String(), default=[]),
        "key_claim_name": String(default="iss"),
        "secret_is_base64": Boolean(required=True, default=False),
        "claims_to_verify": Set(elements=String(one_of=("exp", "nbf"))),
        "anonymous": String(),
        "run_on_preflight": Boolean(required=True, default=True),
        "maximum_expiration": Number(default=0, between=(0, 31536000)),
        "header_names": Set(elements=String(), default=["authorization"]),
        "realm": String(),
    }
)


def _contains_exp(value: Any) -> str | None:
    return None if value and "exp" in value else "must contain 'exp'"


SPEC = PluginSpec(
    name="jwt",
    priority=1450,
    config=CONFIG,
    handler=JwtPlugin,
    checks=(conditional("config.maximum_expiration", lambda v: bool(v) and v > 0, "config.claims_to_verify",
                        _contains_exp),),
)
