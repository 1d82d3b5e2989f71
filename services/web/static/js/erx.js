// The ePrescribing tools (erx-bridge, through the gateway): eRx Sync, the ePrescribing Portal, the
// Pending Rx Report, and "Open in ePrescribing" on eRx board items. The single sign-on addresses
// are bearer credentials: they go only to the new tab's location, never into the page or a log.
import { ApiError, api, getText } from "./api.js";
import { $, h } from "./dom.js";

const POLL_MS = 1000;            // between sync status checks
const POLL_GIVE_UP_MS = 180000;  // a sync still running after this is left to finish on its own
const POLL_FAILURES = 3;         // consecutive failed checks before the page says so
const CALL_TIMEOUT_MS = 15000;
const REPORT_TIMEOUT_MS = 30000;
const REPORT_MAX_ROWS = 2000;    // shown in the dialog; the download has them all
// An eRx item's "Open in ePrescribing" link (services/erx_bridge/README.md, "Page integration"):
// <gateway>/api/v1/erx/sso/patient/<item id> (inbox takes only http(s) links), or erx-sso:patient:<item id>.
const SSO_SCHEME = /^erx-sso:patient:([^/?#]+)$/;
const SSO_PATH = /^\/api\/v1\/erx\/sso\/patient\/([^/]+)$/;

let hooks = null;      // { erxFolderOpen(), refreshBoard() } from app.js
let generation = 0;    // changes on sign-out: answers and polls of the earlier person stop there
let syncing = false;
let opening = false;
let pollTimer = null;
let report = null;     // { text, name } of the report shown
let reportSeq = 0;     // each opening of the report dialog: only its own answer fills it

// --- messages --------------------------------------------------------------------------------
function say(text, { error = false } = {}) {
  const status = $("#erx-status");
  status.classList.toggle("error", error);
  status.textContent = text;
}

// What went wrong, in words a prescriber can act on (never the answer's body beyond its message).
function trouble(what, error) {
  if (error instanceof ApiError) {
    if (error.status === 0 && error.code === "timeout") return `${what}: ePrescribing did not answer in time. Try again in a minute.`;
    if (error.status === 0) return `${what}: no connection to the server. Check the network and try again.`;
    if (error.status === 404 || error.status === 502 || error.status === 503 || error.status === 504) {
      const detail = error.data && error.data.code ? ` (${error.message})` : "";
      return `${what}: ePrescribing is not available right now${detail}. Try again in a few minutes.`;
    }
    if (error.status >= 500) return `${what}: something went wrong on the server (${error.message}). Try again.`;
  }
  return `${what}: ${error.message}`;
}

function notEnabled(error) { return error instanceof ApiError && error.status === 403 && error.code === "erx_not_enabled"; }

// ePrescribing is not (or no longer) on for this user: the tools go away.
function withdraw() {
  $("#erx-tools").hidden = true;
  if ($("#erx-report-dialog").open) $("#erx-report-dialog").close();
  say("ePrescribing is not enabled for your account. Ask your administrator if you need it.", { error: true });
}

// --- eRx Sync --------------------------------------------------------------------------------
function setSyncing(on) {
  syncing = on;
  const button = $('#erx-tools [data-erx="sync"]');
  // aria-disabled, not disabled: the button keeps the keyboard focus while the sync runs.
  if (on) button.setAttribute("aria-disabled", "true");
  else button.removeAttribute("aria-disabled");
}

function progressText(s) {
  const total = s && s.prescribers_total;
  return total ? `eRx Sync: ${s.prescribers_done || 0} of ${total} prescribers…` : "eRx Sync: syncing…";
}

function outcomeText(s) {
  const messages = (s.errors || []).map((e) => e.message || e.code).filter(Boolean);
  if (s.status === "failed") return { text: `eRx Sync failed: ${messages.join("; ") || "no reason given"}.`, error: true };
  const synced = `Synced: ${s.added || 0} new, ${s.updated || 0} updated, ${s.resolved || 0} resolved`;
  return messages.length ? { text: `${synced}. Not synced: ${messages.join("; ")}.`, error: true } : { text: synced, error: false };
}

async function startSync() {
  if (syncing) return;
  const mine = generation;
  setSyncing(true);
  say("eRx Sync: starting…");
  let started;
  try {
    started = await api("POST", "/api/v1/erx/sync", undefined, { timeoutMs: CALL_TIMEOUT_MS });
  } catch (error) {
    if (mine !== generation) return;
    // A sync already running for this prescriber: follow that one.
    if (error instanceof ApiError && error.status === 409 && error.data && error.data.sync_id) {
      started = error.data;
    } else {
      setSyncing(false);
      if (notEnabled(error)) withdraw();
      else if (!(error instanceof ApiError && error.status === 401)) say(trouble("eRx Sync", error), { error: true });
      return;
    }
  }
  if (mine !== generation) return;
  follow(started, mine, Date.now(), 0);
}

function follow(s, mine, since, failures) {
  if (mine !== generation) return;
  if (s && (s.status === "done" || s.status === "failed")) { finish(s); return; }
  if (!s || !s.sync_id) { setSyncing(false); say("eRx Sync: the server gave no sync to follow. Try again.", { error: true }); return; }
  if (Date.now() - since > POLL_GIVE_UP_MS) {
    setSyncing(false);
    say("eRx Sync is taking longer than usual; the eRx folder updates by itself when it finishes.");
    return;
  }
  say(progressText(s));
  pollTimer = setTimeout(async () => {
    pollTimer = null;
    let next;
    try {
      next = await api("GET", `/api/v1/erx/sync/${encodeURIComponent(s.sync_id)}`, undefined, { timeoutMs: CALL_TIMEOUT_MS });
    } catch (error) {
      if (mine !== generation) return;
      if (notEnabled(error)) { setSyncing(false); withdraw(); return; }
      if (error instanceof ApiError && error.status === 401) { setSyncing(false); return; }
      const transient = error instanceof ApiError && (error.status === 0 || error.status >= 500);
      if (transient && failures + 1 < POLL_FAILURES) { follow(s, mine, since, failures + 1); return; }
      setSyncing(false);
      say(trouble("eRx Sync", error), { error: true });
      return;
    }
    follow({ ...next, sync_id: next.sync_id || s.sync_id }, mine, since, 0);
  }, POLL_MS);
}

function finish(s) {
  setSyncing(false);
  const { text, error } = outcomeText(s);
  say(text, { error });
  // The live stream says so too (the eRx folder changed); refreshing now shows it at once.
  hooks.refreshBoard();
}

// --- single sign-on into the vendor's portal -----------------------------------------------------
// The tab opens within the click (so pop-up blockers allow it), cut off from this page, and is sent
// to the address once the server gives it; closed again if there is none.
async function openSso(body, what) {
  if (opening) return;
  const mine = generation;
  const tab = window.open("about:blank", "_blank");
  if (!tab) {
    say(`${what}: the browser blocked the new tab. Allow pop-ups for this site, then try again.`, { error: true });
    return;
  }
  try {
    tab.opener = null;
    tab.document.title = "Opening ePrescribing…";
    tab.document.body.textContent = "Opening ePrescribing…";
  } catch { /* a tab the browser already took elsewhere: nothing to write */ }
  opening = true;
  say(`${what}: opening…`);
  let answer;
  try {
    answer = await api("POST", "/api/v1/erx/sso", body, { timeoutMs: CALL_TIMEOUT_MS });
  } catch (error) {
    opening = false;
    tab.close();
    if (mine !== generation) return;
    if (notEnabled(error) && body.context !== "patient") withdraw();
    else if (notEnabled(error)) say(`${what}: ePrescribing is not enabled for your account.`, { error: true });
    else if (!(error instanceof ApiError && error.status === 401)) say(trouble(what, error), { error: true });
    return;
  }
  opening = false;
  if (mine !== generation) { tab.close(); return; }
  let url = null;
  try { url = new URL(answer && answer.url); } catch { url = null; }
  if (!url || url.protocol !== "https:" && url.protocol !== "http:") {
    tab.close();
    say(`${what}: the server gave no address to open. Try again.`, { error: true });
    return;
  }
  if (tab.closed) { say(`${what}: the new tab was closed before ePrescribing opened in it.`); return; }
  tab.location.replace(url.href);
  say(`${what}: opened in a new tab.`);
}

function openPortal() {
  openSso({ context: hooks.erxFolderOpen() ? "notifications" : "home" }, "ePrescribing Portal");
}

// The eRx item id an "Open in ePrescribing" link names, or null for any other link. The address
// is matched by its path whatever its host (the gateway's public name may differ from this page's).
function erxItemId(link) {
  const url = String((link && (typeof link === "string" ? link : link.url)) || "");
  let match = SSO_SCHEME.exec(url);
  if (!match) {
    let parsed;
    try { parsed = new URL(url); } catch { return null; }
    if ((parsed.protocol !== "https:" && parsed.protocol !== "http:") || parsed.search || parsed.hash) return null;
    match = SSO_PATH.exec(parsed.pathname);
  }
  if (!match) return null;
  try { return decodeURIComponent(match[1]) || null; } catch { return null; }
}

export function isErxLink(link) { return erxItemId(link) !== null; }

// The "Open in ePrescribing" button for such a link (null for any other): it asks erx-bridge for a
// single sign-on address into the patient's page at the vendor instead of following the link.
export function erxLinkButton(link) {
  const itemId = erxItemId(link);
  if (itemId === null) return null;
  return h("button", {
    type: "button", class: "primary erx-open",
    onclick: () => openSso({ context: "patient", item_id: itemId }, "Open in ePrescribing"),
  }, "Open in ePrescribing");
}

// --- Pending Rx Report -------------------------------------------------------------------------
// RFC 4180: fields separated by commas, quoted with "…" (a quote inside doubled), quoted fields may
// hold commas and line breaks; lines end with CRLF or LF.
export function parseCsv(text) {
  const rows = [];
  let row = [];
  let field = "";
  let quoted = false;
  let i = text.charCodeAt(0) === 0xfeff ? 1 : 0;
  for (; i < text.length; i += 1) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i += 1; }
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(field); field = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i += 1;
      row.push(field); field = "";
      rows.push(row); row = [];
    } else field += c;
  }
  if (field !== "" || row.length) { row.push(field); rows.push(row); }
  return rows.filter((r) => !(r.length === 1 && r[0] === ""));
}

function today() {
  const d = new Date();
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
}

function reportNote(text, error = false) {
  const note = $("#erx-report-note");
  note.textContent = text;
  note.classList.toggle("error", error);
}

function clearReport() {
  report = null;
  $("#erx-report-table").replaceChildren();
  $("#erx-report-table").hidden = true;
  $("#erx-report-download").hidden = true;
}

// A long unbroken value (an id) may break anywhere; words break only between words.
function cell(value) {
  const text = value === undefined ? "" : value;
  return h("td", { class: /^\S{20,}$/.test(text) ? "token" : null, text });
}

async function openReport() {
  const mine = generation;
  const seq = ++reportSeq;
  const dialog = $("#erx-report-dialog");
  const stale = () => mine !== generation || seq !== reportSeq || !dialog.open;
  clearReport();
  reportNote("Loading…");
  dialog.showModal();
  $("#erx-report-close").focus();
  let answer;
  try {
    answer = await getText("/api/v1/erx/reports/pending-rx?format=csv", { timeoutMs: REPORT_TIMEOUT_MS, accept: "text/csv" });
  } catch (error) {
    if (stale()) return;
    if (notEnabled(error)) { withdraw(); return; }
    if (!(error instanceof ApiError && error.status === 401)) reportNote(trouble("The report could not be loaded", error), true);
    return;
  }
  if (stale()) return;
  const rows = parseCsv(answer.text);
  if (!rows.length) { reportNote("The report came back empty.", true); return; }
  const [header, ...body] = rows;
  report = { text: answer.text, name: `pending-rx-${today()}.csv` };
  const shown = body.slice(0, REPORT_MAX_ROWS);
  const table = h("table", { "aria-labelledby": "erx-report-title" },
    h("thead", {}, h("tr", {}, header.map((name) => h("th", { scope: "col", text: name })))),
    h("tbody", {}, shown.map((r) => h("tr", {}, header.map((_, n) => cell(r[n]))))));
  $("#erx-report-table").replaceChildren(table);
  $("#erx-report-table").hidden = false;
  $("#erx-report-download").hidden = false;
  const count = body.length === 1 ? "1 pending prescription" : `${body.length} pending prescriptions`;
  reportNote(!body.length ? "No pending prescriptions."
    : shown.length < body.length ? `${count}; the first ${shown.length} are shown here, Download CSV has them all.` : `${count}.`);
}

function downloadReport() {
  if (!report) return;
  const href = URL.createObjectURL(new Blob([report.text], { type: "text/csv;charset=utf-8" }));
  const link = h("a", { href, download: report.name });
  link.click();
  setTimeout(() => URL.revokeObjectURL(href), 1000);
}

// --- wiring ----------------------------------------------------------------------------------
export function wireErx(appHooks) {
  hooks = appHooks;
  $('#erx-tools [data-erx="sync"]').addEventListener("click", () => startSync());
  $('#erx-tools [data-erx="portal"]').addEventListener("click", () => openPortal());
  $('#erx-tools [data-erx="pending"]').addEventListener("click", () => openReport());
  $("#erx-report-download").addEventListener("click", downloadReport);
  $("#erx-report-close").addEventListener("click", () => $("#erx-report-dialog").close());
  // The report (patients' names) is not kept in the page once the dialog closes.
  $("#erx-report-dialog").addEventListener("close", () => { reportSeq += 1; clearReport(); });
}

// After signing in: the tools show for users with ePrescribing.
export function showErx(enabled) {
  const tools = $("#erx-tools");
  tools.hidden = !enabled;
  tools.querySelectorAll("button").forEach((button) => {
    button.disabled = false;
    button.removeAttribute("title");
    button.removeAttribute("aria-disabled");
  });
}

// On signing out: polls stop, answers still on their way are dropped, nothing stays in the page.
export function stopErx() {
  generation += 1;
  clearTimeout(pollTimer);
  pollTimer = null;
  syncing = false;
  opening = false;
  say("");
  clearReport();
  $("#erx-tools").hidden = true;
}
