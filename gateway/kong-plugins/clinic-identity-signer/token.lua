-- The X-Gateway-Identity token (docs/gateway-identity.md), computed exactly as
-- services/kit/gateway_identity.py computes it. No Kong or nginx API here: the hash, the HMAC and
-- base64url come in `crypto`, so this module can be checked against the documented test vector
-- outside Kong (tests/unit/test_gateway_identity_lua.py).
local concat = table.concat
local format = string.format
local ipairs = ipairs
local upper = string.upper


local _M = {}


_M.VERSION_TAG = "v1"

-- The upstream headers the token covers, in canonical order.
_M.SIGNED_HEADERS = {
  "X-Consumer-ID",
  "X-Consumer-Custom-ID",
  "X-Consumer-Username",
  "X-Credential-Identifier",
  "X-Anonymous-Consumer",
}


-- The signed text: fields joined by "\n", a header's value as sent ("" when absent).
function _M.canonical(method, target, body_sha256_hex, values, ts, nonce)
  local fields = { _M.VERSION_TAG, format("%d", ts), nonce, upper(method), target, body_sha256_hex }
  for _, name in ipairs(_M.SIGNED_HEADERS) do
    fields[#fields + 1] = values[name] or ""
  end
  return concat(fields, "\n")
end


-- crypto.sha256_hex(data) -> lower-case hex; crypto.hmac_sha256(key, data) -> 32 raw bytes;
-- crypto.base64url(raw) -> unpadded base64url.
function _M.token(crypto, key, method, target, body, values, ts, nonce)
  local text = _M.canonical(method, target, crypto.sha256_hex(body or ""), values, ts, nonce)
  return _M.VERSION_TAG .. "." .. format("%d", ts) .. "." .. nonce .. "." ..
         crypto.base64url(crypto.hmac_sha256(key, text))
end


return _M
