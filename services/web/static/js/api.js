// The API client. The access token lives in this module's memory only; the refresh token is an
// HttpOnly cookie the page never sees (see services/web/README.md).
let accessToken = null;
let refreshTimer = null;
let refreshing = null;
const listeners = { signedOut: [] };

export class ApiError extends Error {
  // status 0: no answer (a timeout or a network failure). `data`: the answer's JSON body, if any.
  constructor(status, code, message, data = null) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.data = data;
  }
}

const SESSION_HEADERS = { "Content-Type": "application/json", "X-Clinic-CSRF": "1" };

async function sessionCall(path, body) {
  const response = await fetch(`/app/session${path}`, {
    method: "POST",
    headers: SESSION_HEADERS,
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data.code, data.message);
  return data;
}

function adopt(grant) {
  accessToken = grant.access_token;
  clearTimeout(refreshTimer);
  const lifetime = Math.max(30, (grant.expires_in || 900) - 60);
  refreshTimer = setTimeout(() => { refresh().catch(() => {}); }, lifetime * 1000);
  return grant;
}

export async function signIn(username, password) {
  return adopt(await sessionCall("", { username, password }));
}

// Every tab of the page shares the refresh cookie and each refresh replaces it. Two tabs refreshing
// at once would present the same token twice, which directory takes for a stolen token and ends
// the session; so tabs take turns (the second then sends the cookie the first just received).
const REFRESH_LOCK = "clinic-session-refresh";

// `probe`: the check on load, which finding no session answers 204 (no error in the console), and
// this then throws ApiError 401 "not_signed_in" like a refusal.
export function refresh({ probe = false } = {}) {
  if (!refreshing) {
    const call = () => sessionCall(probe ? "/refresh?probe=1" : "/refresh");
    const turn = navigator.locks ? navigator.locks.request(REFRESH_LOCK, call) : call();
    refreshing = turn.then((grant) => {
      if (!grant) throw new ApiError(401, "not_signed_in", "no session to resume");
      return adopt(grant);
    }).finally(() => { refreshing = null; });
  }
  return refreshing;
}

export async function signOut() {
  clearTimeout(refreshTimer);
  accessToken = null;
  try { await sessionCall("/logout"); } catch { /* the cookie is cleared on the next sign-in anyway */ }
}

export function onSignedOut(fn) { listeners.signedOut.push(fn); }

export function token() { return accessToken; }

// One request with the bearer token, refreshed and tried once more on a 401. `timeoutMs`: give up
// (ApiError status 0, code "timeout") when no answer has come by then. Answers the Response.
async function authorized(method, path, body, { timeoutMs = 0, accept, idempotencyKey } = {}) {
  for (let attempt = 0; attempt < 2; attempt += 1) {
    const headers = { Authorization: `Bearer ${accessToken}` };
    if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (accept) headers.Accept = accept;
    const controller = timeoutMs ? new AbortController() : null;
    const timer = controller ? setTimeout(() => controller.abort(), timeoutMs) : null;
    let response;
    try {
      response = await fetch(path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: "omit",
        signal: controller ? controller.signal : undefined,
      });
    } catch (error) {
      if (controller && controller.signal.aborted) throw new ApiError(0, "timeout", "no answer in time");
      throw new ApiError(0, "network", "no answer (network error)");
    } finally {
      clearTimeout(timer);
    }
    if (response.status === 401 && attempt === 0) {
      try { await refresh(); continue; } catch (error) {
        // The reason directory gave (e.g. "session_idle_expired"), for the sign-in page to say.
        listeners.signedOut.forEach((fn) => fn((error && error.code) || "expired"));
        throw new ApiError(401, "unauthenticated", "signed out");
      }
    }
    if (!response.ok) {
      const data = await response.json().catch(() => null);
      throw new ApiError(response.status, data && data.code, (data && (data.message || data.code)) || `HTTP ${response.status}`, data);
    }
    return response;
  }
  throw new ApiError(401, "unauthenticated", "signed out");
}

export async function api(method, path, body, options) {
  const response = await authorized(method, path, body, options);
  if (response.status === 204) return null;
  return response.json().catch(() => null);
}

// A text answer (a CSV report): its text and its content type.
export async function getText(path, options = {}) {
  const response = await authorized("GET", path, undefined, options);
  return { text: await response.text(), type: response.headers.get("Content-Type") || "" };
}

// A file (an attachment, a fax PDF) fetched with the bearer token: a plain link to the API would
// carry no token. Answers the Blob (its type from the answer's Content-Type).
export async function getBlob(path, options = {}) {
  const response = await authorized("GET", path, undefined, options);
  return response.blob();
}

export const get = (path) => api("GET", path);

// The user is active (idle.js decides when to say so): the server moves the session's idle
// deadline. A failure is not the user's concern; an ended session is noticed like any 401.
export async function reportActivity() {
  if (!accessToken) return;
  try { await api("POST", "/app/activity"); } catch { /* offline, or signed out: handled elsewhere */ }
}
// A fresh Idempotency-Key: 128 random bits in hex (crypto.getRandomValues works outside secure
// contexts too). A dialog keeps one for as long as it is open, so sending again after a lost
// answer (a timeout, a dropped connection) returns what was already made, never a second one.
export const newIdempotencyKey = () =>
  Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");

export const post = (path, body, options) => api("POST", path, body === undefined ? {} : body, options);
export const put = (path, body) => api("PUT", path, body);
export const del = (path) => api("DELETE", path);
