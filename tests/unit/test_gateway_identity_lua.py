"""The Kong plugin (gateway/kong-plugins/clinic-identity-signer) run in LuaJIT, as OpenResty runs
it: its token against the documented test vector, its schema against the local gateway's, and its
access phase with stand-ins for Kong's PDK (the hash, HMAC and base64url come from Python, so what
is checked is the plugin's own logic: what it signs, what it sends, what it drops)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from services.gateway.plugins import identity_signer
from services.kit import gateway_identity as gi
from tests.unit.test_gateway_identity import documented_vector

lupa = pytest.importorskip("lupa", reason="lupa (LuaJIT for Python) runs the Kong plugin's Lua")

PLUGIN = Path(__file__).resolve().parents[2] / "gateway" / "kong-plugins" / "clinic-identity-signer"
KEY = "s" * 40

# Stand-ins for the OpenResty and Kong modules the plugin requires, and for Kong's PDK.
PRELUDE = r"""
local py = ...
local function module(source, name)
  local chunk = assert(loadstring(source, "=" .. name))
  return chunk
end
package.preload["kong.plugins.clinic-identity-signer.token"] = module(py.sources.token, "token.lua")
package.preload["kong.tools.sha256"] = function() return { sha256_hex = py.sha256_hex } end
package.preload["resty.openssl.mac"] = function()
  return { new = function(key, kind, cipher, digest)
    assert(kind == "HMAC" and cipher == nil and digest == "sha256")
    return { final = function(_, data) return py.hmac_sha256(key, data) end }
  end }
end
package.preload["resty.openssl.rand"] = function() return { bytes = py.random_bytes } end
package.preload["resty.string"] = function() return { to_hex = py.to_hex } end
package.preload["ngx.base64"] = function() return { encode_base64url = py.base64url } end
package.preload["kong.db.schema.typedefs"] = function()
  local header_name = setmetatable({ type = "string", header_name = true }, {
    __call = function(self, overrides)
      local field = { type = "string", header_name = true }
      for k, v in pairs(overrides) do field[k] = v end
      return field
    end,
  })
  return { no_consumer = { no_consumer = true }, protocols_http = { protocols = "http" }, header_name = header_name }
end

-- One request: what the client sent, who authenticated, what the plugin does to the upstream request.
function new_request(spec)
  local request_headers = {}
  for name, value in pairs(spec.headers or {}) do request_headers[string.lower(name)] = value end
  local upstream = { set = {}, cleared = {} }
  local exit = {}
  ngx = {
    var = { upstream_uri = spec.upstream_uri, request_uri = spec.request_uri, is_args = spec.is_args or "",
            args = spec.args },
    ctx = {},
    time = function() return spec.now end,
  }
  kong = {
    client = { get_consumer = function() return spec.consumer end },
    request = {
      get_header = function(name) return request_headers[string.lower(name)] end,
      get_raw_body = function(max) assert(max == 0); return spec.body or "" end,
      get_method = function() return spec.method end,
    },
    service = { request = {
      set_header = function(name, value)
        request_headers[string.lower(name)] = value
        upstream.set[name] = value
        upstream.cleared[name] = nil
      end,
      clear_header = function(name)
        request_headers[string.lower(name)] = nil
        upstream.set[name] = nil
        upstream.cleared[name] = true
      end,
    } },
    response = { error = function(status) exit.status = status; return status end },
    log = { err = function(...) exit.logged = table.concat({ ... }) end },
  }
  return upstream, exit
end

function load_plugin(name)
  return assert(loadstring(py.sources[name], "=" .. name .. ".lua"))()
end
"""


def _runtime():
    try:
        from lupa import luajit21 as flavour
    except ImportError:  # a lupa without LuaJIT 2.1: the plugin's Lua is plain 5.1 as well
        flavour = lupa
    runtime = flavour.LuaRuntime(encoding=None, unpack_returned_tuples=True)
    # encoding=None: Lua strings are bytes on this side, as they are bytes in Lua.
    helpers = runtime.table_from({
        b"sources": runtime.table_from({name.encode(): (PLUGIN / f"{name}.lua").read_bytes()
                                        for name in ("token", "handler", "schema")}),
        b"sha256_hex": lambda data: hashlib.sha256(data).hexdigest().encode(),
        b"hmac_sha256": lambda key, data: hmac.new(key, data, hashlib.sha256).digest(),
        b"random_bytes": lambda n: bytes(range(int(n))),
        b"to_hex": lambda data: data.hex().encode(),
        b"base64url": lambda data: base64.urlsafe_b64encode(data).rstrip(b"="),
    })
    runtime.execute(PRELUDE, helpers)
    return runtime


@pytest.fixture(scope="module")
def lua():
    return _runtime()


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def test_token_lua_matches_the_documented_test_vector(lua):
    vector = documented_vector()
    token_module = lua.eval('require("kong.plugins.clinic-identity-signer.token")')
    crypto = lua.eval("""{
        sha256_hex = require("kong.tools.sha256").sha256_hex,
        hmac_sha256 = function(k, d) return require("resty.openssl.mac").new(k, "HMAC", nil, "sha256"):final(d) end,
        base64url = require("ngx.base64").encode_base64url,
    }""")
    headers = lua.table_from({name.encode(): value.encode() for name, value in vector["headers"].items()})
    token = token_module.token(crypto, vector["key"].encode(), vector["method"].encode(), vector["target"].encode(),
                               vector["body"].encode(), headers, vector["timestamp"], vector["nonce"].encode())
    assert text(token) == vector["token"]


def test_the_kong_schema_has_the_fields_the_local_gateway_validates(lua):
    schema = lua.eval('load_plugin("schema")')
    assert text(schema.name) == identity_signer.NAME
    fields = {}
    for entry in schema.fields.values():
        for name, spec in entry.items():
            fields[text(name)] = spec
    assert fields["consumer"].no_consumer and text(fields["protocols"].protocols) == "http"
    config = {}
    for entry in fields["config"].fields.values():
        for name, spec in entry.items():
            config[text(name)] = spec
    local = identity_signer.CONFIG.fields
    assert set(config) == set(local)
    key = config["key"]
    assert key.required and key.referenceable and key.len_min == local["key"].len_min == gi.MIN_KEY_CHARS
    assert local["key"].required and local["key"].referenceable
    assert text(config["header_name"].default) == local["header_name"].default == gi.HEADER
    assert config["header_name"].header_name and config["header_name"].required
    assert text(config["skip_consumers"].type) == "set" and len(config["skip_consumers"].default) == 0
    assert local["skip_consumers"].is_set and local["skip_consumers"].default == []
    handler = lua.eval('load_plugin("handler")')
    assert handler.PRIORITY == identity_signer.PRIORITY


def access(lua, *, consumer=None, key=KEY, skip=(), method="POST", upstream_uri="/api/v1/partner/lab/agy_1/Report",
           request_uri=None, is_args="", args=None, body=b"", headers=None, now=1_767_225_600):
    spec = {
        "consumer": lua.table_from({k.encode(): v.encode() for k, v in consumer.items()}) if consumer else None,
        "method": method.encode(), "upstream_uri": upstream_uri.encode(),
        "request_uri": (request_uri or upstream_uri).encode(), "is_args": is_args.encode(),
        "args": args.encode() if args is not None else None, "body": body, "now": now,
        "headers": lua.table_from({k.encode(): v.encode() for k, v in (headers or {}).items()}),
    }
    upstream, exit_ = lua.globals().new_request(lua.table_from({k.encode(): v for k, v in spec.items()}))
    conf = lua.table_from({b"key": key.encode(), b"header_name": gi.HEADER.encode(),
                           b"skip_consumers": lua.table_from([s.encode() for s in skip])})
    handler = lua.eval('load_plugin("handler")')
    handler.access(handler, conf)
    sent = {text(k): text(v) for k, v in upstream.set.items()}
    cleared = {text(k) for k in upstream.cleared}
    return sent, cleared, exit_


LAB = {"id": "c0a8e7e2-0000-5000-8000-000000000001", "username": "lab-interface", "custom_id": "lab-interface"}


def test_the_access_phase_signs_what_kong_sends_and_python_verifies_it(lua):
    body = b'{"resourceType":"DiagnosticReport"}'
    sent, cleared, exit_ = access(
        lua, consumer=LAB, body=body, request_uri="/api/v1/partner/lab/agy_1/Report?a=1&b=2", is_args="?",
        args="a=1&b=2",
        headers={"X-Credential-Identifier": "cred-9", gi.HEADER: "v1.forged",
                 # a client's own claim: never what is signed or sent
                 "X-Consumer-Username": "patient-portal", "X-Anonymous-Consumer": ""},
    )
    assert not list(exit_.items())
    assert sent["X-Consumer-Username"] == "lab-interface" and sent["X-Consumer-ID"] == LAB["id"]
    assert sent["X-Credential-Identifier"] == "cred-9" and "X-Anonymous-Consumer" in cleared
    gi.verify([KEY], sent[gi.HEADER], method="POST", target="/api/v1/partner/lab/agy_1/Report?a=1&b=2", body=body,
              headers=gi.signed_headers(sent.get), now=1_767_225_600)
    with pytest.raises(gi.Refused):  # the token covers the query string
        gi.verify([KEY], sent[gi.HEADER], method="POST", target="/api/v1/partner/lab/agy_1/Report", body=body,
                  headers=gi.signed_headers(sent.get), now=1_767_225_600)


def test_an_empty_query_kept_by_kong_is_signed_as_kong_sends_it(lua):
    sent, _, _ = access(lua, consumer=LAB, method="GET", upstream_uri="/p", request_uri="/p?")
    gi.verify([KEY], sent[gi.HEADER], method="GET", target="/p?", body=b"", headers=gi.signed_headers(sent.get),
              now=1_767_225_600)


@pytest.mark.parametrize("consumer", [None, {"id": "staff-id", "username": "clinic-staff", "custom_id": "staff"}],
                         ids=["no-consumer", "skipped-consumer"])
def test_a_client_token_is_dropped_and_nothing_is_signed_without_a_partner(lua, consumer):
    sent, cleared, exit_ = access(lua, consumer=consumer, skip=("clinic-staff",), headers={gi.HEADER: "v1.forged"})
    assert sent == {} and cleared == {gi.HEADER} and not list(exit_.items())


def test_a_missing_or_short_key_fails_closed(lua):
    sent, _, exit_ = access(lua, consumer=LAB, key="short")
    assert exit_.status == 500 and gi.HEADER not in sent
