// The Message Board page. Plain modules, no build step. Every text from the API is set with
// textContent (dom.h), links only for http/https (dom.safeLink).
import {
  ApiError, del, get, newIdempotencyKey, onSignedOut, post, put, refresh, reportActivity, signIn, signOut,
} from "./api.js";
import {
  $, announce, displayTimeZone, fullTime, h, humanizeTimes, isoToLocalInput, localInputToIso, safeLink, setTimeZone, when,
} from "./dom.js";
import { cloudPanel, showCloudFolderActions, stopCloud, wireCloud } from "./cloud.js";
import { showCloudAddresses, stopCloudAddresses, wireCloudAddresses } from "./cloud_addresses.js";
import { erxLinkButton, isErxLink, showErx, stopErx, wireErx } from "./erx.js";
import { watchIdle } from "./idle.js";
import { connectLive } from "./live.js";
import { hasReceipts, receiptsPanel } from "./receipts.js";
import { criticalResultPanel, hasCriticalResult, hasUrgentUnread, urgentUnreadPanel } from "./escalation.js";
import { coverageBadge, coveragePanel } from "./coverage.js";
import { retentionPanel } from "./retention.js";
import { hasQueue, queueBadge, queuePanel } from "./team_queue.js";
import { showTeamOverview, stopTeamOverview, wireTeamOverview } from "./team_overview.js";
import { clearSearch, searchNote, searchPath, searchSummary, showSearching, wireSearch } from "./search.js";

const PAGE_SIZE = 50;
const MAX_PAGE_SIZE = 100; // the most the board API answers in one page
const BULK_MAX = 500; // the most one bulk request names (and "Select all in folder" selects)
const NOTIFICATION_FOLDERS = ["schedule", "erx", "compliance", "lab", "cloud"];
const KIND_NAMES = { message: "Message", reminder: "Reminder", signature_request: "Signature request", announcement: "Announcement" };
// Who a delivered notification comes from, by its folder (the API names them all "Notifications").
const SOURCE_NAMES = {
  lab: "Lab", schedule: "Practice management system", compliance: "Compliance tracker", erx: "ePrescribing",
};
// A lab result's link to its full view (the notifications service's staff route).
const LAB_RESULT_PATH = /^\/api\/v1\/lab\/results\/([A-Za-z0-9_-]{1,100})$/;

const state = {
  me: null, agency: null, board: null, staff: [], teams: [],
  view: { type: "folder", id: "messages" }, items: [], cursor: null, selected: null, opened: null,
  unreadOnly: false, order: "newest", picked: new Set(), lastPick: null, stopLive: null, idle: null, directoryLoaded: null, firstPaint: false, loadSeq: 0, signedInSeq: 0,
};

const term = () => (state.agency && state.agency.terminology.patient_singular) || "Patient";

// --- start ---------------------------------------------------------------------------------
async function start() {
  wireStatic();
  onSignedOut((why) => showSignIn(signedOutNote(why)));
  try {
    await refresh({ probe: true });
  } catch (error) {
    showSignIn(error && error.code === IDLE_ENDED ? signedOutNote(IDLE_ENDED) : undefined);
    return;
  }
  await enter();
}

// Directory's answer when it ended the session for inactivity (the page was closed, asleep or
// elsewhere while the agency's idle time passed).
const IDLE_ENDED = "session_idle_expired";

function signedOutNote(why) {
  return why === IDLE_ENDED
    ? "You were signed out because of inactivity. Please sign in again."
    : "Your session ended. Please sign in again.";
}

function showSignIn(note) {
  teardown();
  $("#app").hidden = true;
  $("#signin").hidden = false;
  const noteEl = $("#signin-note");
  noteEl.hidden = !note;
  noteEl.textContent = note || "";
  $("#signin-password").value = "";
  $("#signin-username").focus();
}

function teardown() {
  if (state.stopLive) state.stopLive();
  state.stopLive = null;
  if (state.idle) state.idle.stop();
  state.idle = null;
  stopErx();
  stopCloudAddresses();
  stopTeamOverview();
  stopCloud();
  document.querySelectorAll("dialog[open]").forEach((d) => d.close());
  Object.assign(state, { board: null, items: [], cursor: null, selected: null, opened: null, staff: [], teams: [] });
  // Answers still on their way for the signed-out person are dropped when they arrive.
  state.signedInSeq += 1;
  state.loadSeq += 1;
  // Nothing of the signed-out person's board stays in the page, not even hidden: the list, the
  // open item, the folder tree, a draft.
  ["#items", "#folders", "#pane", "#me", "#recipient-chips", "#recipient-options", "#label-options", "#away-banner"]
    .forEach((selector) => $(selector).replaceChildren());
  $("#away-banner").hidden = true;
  awaySeq += 1;
  $("#pane").removeAttribute("aria-busy");
  ["#compose-form", "#auto-reply-form", "#label-form"].forEach((selector) => $(selector).reset());
  recipients = [];
  clearSearch();
  showSearching(false);
}

async function enter() {
  $("#signin").hidden = true;
  $("#app").hidden = false;
  state.view = { type: "folder", id: "messages" };
  const [me, agency, board] = await Promise.all([
    get("/api/v1/directory/me"), get("/api/v1/directory/agency"), get("/api/v1/board"),
  ]);
  Object.assign(state, { me, agency, board });
  state.picked.clear();
  showListTools();
  setTimeZone(agency.time_zone);
  renderPane(null);
  listNote("Loading…");
  const listed = loadList();
  renderChrome();
  renderFolders();
  await listed;
  // The board, not Sign out, has the keyboard first (unless something else took it meanwhile).
  const active = document.activeElement;
  if (!active || active === document.body || $("#signin").contains(active)) $("#main").focus();
  state.idle = watchIdle({
    minutes: agency.options.idle_signout_minutes || 15,
    warnSeconds: 60,
    onWarn: (seconds) => {
      $("#idle-text").textContent = `You will be signed out in ${seconds} seconds because of inactivity.`;
      if (!$("#idle-dialog").open) $("#idle-dialog").showModal();
    },
    onActiveElsewhere: () => { if ($("#idle-dialog").open) $("#idle-dialog").close(); },
    report: reportActivity,
    onIdle: async () => {
      await signOut();
      showSignIn(`You were signed out after ${agency.options.idle_signout_minutes || 15} minutes without activity.`);
    },
  });
  refreshAwayBanner();
  state.stopLive = connectLive({ onChange: liveChange, onState: (s) => { $("#live-state").textContent = s === "live" ? "Live" : "Reconnecting…"; } });
  // Colleagues and teams arrive after the board is shown; a name typed before then waits for them.
  const signedIn = state.signedInSeq;
  state.directoryLoaded = Promise.all([get("/api/v1/directory/staff"), get("/api/v1/directory/teams")])
    .then(([staff, teams]) => {
      if (signedIn !== state.signedInSeq) return;
      state.staff = staff.staff.filter((s) => s.active);
      state.teams = teams.teams;
      $("#recipient-options").replaceChildren(...recipientChoices().map((c) => h("option", { value: c.label })));
      if (state.items.some((i) => i.to)) renderList();  // Sent rows name their recipients now
    })
    .catch(() => {});
}

function renderChrome() {
  $("#agency-name").textContent = state.agency.name;
  $("#me").textContent = state.me.display_name;
  $("#patient-auto-reply").textContent = `${term()} Auto-Reply`;
  $("#doc-kind-patient").textContent = `${term()} document`;
  $("#compose").hidden = !(state.board.compose || []).length;
  showErx(!!state.me.eprescribing_enabled);
  showCloudAddresses(state.me);
  showTeamOverview(state.me);
  $("#retention").hidden = !isAdmin();
}

// --- folders -------------------------------------------------------------------------------
function folderButton(folder, extraClass = "") {
  const current = state.view.type === "folder" && state.view.id === folder.id;
  const unread = folder.unread || 0;
  return h("button", {
    type: "button",
    class: `folder ${extraClass} ${unread ? "has-unread" : ""}`,
    "aria-current": current ? "true" : "false",
    dataset: { folder: folder.id },
    onclick: () => openView({ type: "folder", id: folder.id }),
  }, h("span", { class: "name", text: folder.name, title: folder.name }), countBadge(unread));
}

function labelButton(label) {
  const current = state.view.type === "label" && state.view.id === label.id;
  const unread = label.unread || 0;
  return h("button", {
    type: "button", class: `folder sub ${unread ? "has-unread" : ""}`, "aria-current": current ? "true" : "false",
    dataset: { label: label.id },
    onclick: () => openView({ type: "label", id: label.id }),
  }, h("span", { class: "name", text: label.name, title: label.name }), countBadge(unread));
}

// The count shows the number; screen readers also hear "unread" after it.
function countBadge(unread) {
  return h("span", { class: "count" }, h("span", { class: "num", text: unread ? String(unread) : "" }),
    unread ? h("span", { class: "sr-only", text: " unread" }) : null);
}

function sectionToggle(id, name) {
  const expanded = state.board.sections[id] !== false;
  return h("button", {
    type: "button", class: "toggle", "aria-expanded": expanded ? "true" : "false",
    "aria-label": `${expanded ? "Collapse" : "Expand"} ${name}`, dataset: { section: id },
    onclick: async () => {
      state.board.sections[id] = !expanded;
      renderFolders();
      $(`[data-section="${id}"]`).focus();
      try { await put(`/api/v1/board/sections/${id}`, { expanded: !expanded }); } catch (e) { announce(`Could not remember that: ${e.message}`, { error: true }); }
    },
  }, expanded ? "▾" : "▸");
}

function renderFolders() {
  const nav = $("#folders");
  const byId = Object.fromEntries(state.board.folders.map((f) => [f.id, f]));
  const list = h("ul");
  const add = (...nodes) => list.append(h("li", {}, ...nodes));
  if (byId.messages) {
    add(h("div", { class: "group" }, sectionToggle("labels", "labels"), folderButton(byId.messages)));
    if (state.board.sections.labels !== false) {
      const labels = h("ul", { "aria-label": "Labels" }, state.board.labels.map((l) => h("li", {}, labelButton(l))));
      list.append(h("li", {}, labels));
    }
  }
  for (const id of ["sent", "portal", "reminders", "signatures", "announcements"]) if (byId[id]) add(folderButton(byId[id]));
  const notifications = NOTIFICATION_FOLDERS.filter((id) => byId[id] && (id !== "erx" || state.me.eprescribing_enabled || byId[id].total));
  if (notifications.length) {
    const unread = notifications.reduce((n, id) => n + (byId[id].unread || 0), 0);
    // The section's unread total shows beside its heading, so a collapsed section still stands out.
    add(h("div", { class: "group" }, sectionToggle("notifications", "notifications"),
      h("span", { class: `heading ${unread ? "has-unread" : ""}` },
        h("span", { id: "notifications-heading", text: "Notifications" }), countBadge(unread))));
    if (state.board.sections.notifications !== false) {
      list.append(h("li", {}, h("ul", { "aria-labelledby": "notifications-heading" },
        notifications.map((id) => h("li", {}, folderButton(byId[id], "sub"))))));
    }
  }
  if (byId.archive) add(folderButton(byId.archive));
  nav.replaceChildren(list);
}

function viewName() {
  if (state.view.type === "search") return "Search results";
  if (state.view.type === "label") {
    const label = state.board.labels.find((l) => l.id === state.view.id);
    return label ? `Label: ${label.name}` : "Label";
  }
  const folder = state.board.folders.find((f) => f.id === state.view.id);
  return folder ? folder.name : state.view.id;
}

async function openView(view) {
  state.view = view;
  state.selected = null;
  state.items = [];
  state.cursor = null;
  state.picked.clear();
  state.lastPick = null;
  $("#items").replaceChildren();
  $("#items").setAttribute("aria-busy", "true");
  $("#more").hidden = true;
  listNote("Loading…");
  renderFolders();
  renderPane(null);
  showFolders(false);
  showCloudFolderActions(view.type === "folder" && view.id === "cloud");
  showSearching(view.type === "search");
  showListTools();
  await loadList();
  $("#main").focus();
}

// --- the list ------------------------------------------------------------------------------
function listPath(cursor, limit = PAGE_SIZE) {
  if (state.view.type === "search") return searchPath(cursor, limit);
  const q = new URLSearchParams({ limit: String(limit) });
  if (cursor) q.set("cursor", cursor);
  if (state.unreadOnly) q.set("unread", "true");
  const ordered = state.order !== "newest";
  if (state.view.type === "label" && !ordered) return `/api/v1/labels/${encodeURIComponent(state.view.id)}/items?${q}`;
  if (state.view.id === "announcements") {
    q.delete("unread");
    return `/api/v1/announcements?${q}`;
  }
  if (ordered) q.set("order", state.order);
  if (state.view.type === "label") q.set("label", state.view.id);  // across folders, in the chosen order
  else q.set("folder", state.view.id);
  return `/api/v1/board/items?${q}`;
}

// `append`: the next page after those shown. `keep`: the first page again (a live change or
// Refresh) with the older pages already scrolled to kept below it, so the list does not jump back.
async function loadList(append = false, keep = false) {
  const seq = ++state.loadSeq;
  $("#list-title").textContent = viewName();
  let page;
  try {
    // Drawn again: as many rows as shown (up to the API's 100) come fresh in one request.
    const limit = keep ? Math.min(MAX_PAGE_SIZE, Math.max(PAGE_SIZE, state.items.length)) : PAGE_SIZE;
    page = await get(listPath(append ? state.cursor : null, limit));
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return;
    if (seq !== state.loadSeq) return;
    announce(`Could not load the list: ${error.message}`, { error: true });
    if (!state.items.length) listNote(`Could not load the list: ${error.message}`, true);
    return;
  }
  if (seq !== state.loadSeq) return;
  let items = page.items || [];
  if (state.view.id === "announcements" && state.unreadOnly) items = items.filter((i) => !i.read);
  // A search's first page: the matching announcements above the board's results.
  if (state.view.type === "search" && !append) items = (page.announcements || []).concat(items);
  let cursor = page.next_cursor || null;
  state.capped = Boolean(page.capped);
  if (append) {
    items = state.items.concat(items);
  } else if (keep && cursor && items.length) {
    const last = state.items.findIndex((i) => i.id === items[items.length - 1].id);
    if (last >= 0 && state.items.length > last + 1) {
      const shown = new Set(items.map((i) => i.id));
      items = items.concat(state.items.slice(last + 1).filter((i) => !shown.has(i.id)));
      cursor = state.cursor;
    }
  }
  state.items = items;
  state.cursor = cursor;
  renderList();
  if (state.view.type === "search" && !append && !keep) announce(searchSummary(items.length, Boolean(cursor)));
  if (!state.firstPaint) {
    state.firstPaint = true;
    requestAnimationFrame(() => performance.mark("board-first-page"));
  }
}

// Who a row names: the poster of an announcement, the recipients of my own sent message, the
// source of a delivered notification, else the sender.
function rowWho(item) {
  if (item.folder === "announcements") return item.posted_by && item.posted_by.name;
  const mine = item.sender && state.me && item.sender.id === state.me.id;
  if (item.folder === "sent" || (mine && state.view.type === "folder" && state.view.id === "sent")) {
    if (item.to) return `To: ${recipientsText(item.to)}`;
    const n = item.recipient_count;
    return n ? `To: ${n} ${n === 1 ? "recipient" : "recipients"}` : "To: (recipients)";
  }
  const source = SOURCE_NAMES[item.folder] || SOURCE_NAMES[item.archived_from];
  if (source) return source;
  return item.sender && item.sender.name;
}

// The one fact of a lab result a list row shows, without its values: "1 critical", "2 abnormal".
function rowFact(item) {
  const lab = item.folder === "lab" || item.archived_from === "lab";
  if (!lab || !item.summary) return null;
  const cut = item.summary.indexOf(": ");
  return cut >= 0 ? item.summary.slice(cut + 2) : null;
}

// The agency's word for a patient in text written by a delivering service ("Patient 123: ...").
function termed(text) { return String(text || "").replace(/^Patient\b/, term()); }

function itemRow(item) {
  const isAnnouncement = item.folder === "announcements";
  const who = rowWho(item);
  const badges = [];
  if (item.auto_reply) badges.push(h("span", { class: "badge auto", text: "Automatic reply" }));
  // Among search results an announcement says what it is (its own folder needs no such mark).
  if (isAnnouncement && state.view.type === "search") badges.push(h("span", { class: "badge agency", text: "Announcement" }));
  if (item.to && item.to.whole_agency) badges.push(h("span", { class: "badge agency", text: "Whole agency" }));
  const queued = queueBadge(item, state.me && state.me.id);
  if (queued) badges.push(queued);
  if (item.covering_for) badges.push(coverageBadge(item));
  if (item.urgent || item.priority === "urgent") badges.push(h("span", { class: "badge urgent", text: "Urgent" }));
  if (item.overdue) badges.push(h("span", { class: "badge overdue", text: "Overdue" }));
  if (item.severity === "abnormal") badges.push(h("span", { class: "badge abnormal", text: "Abnormal" }));
  if (item.severity === "urgent" && !item.urgent) badges.push(h("span", { class: "badge urgent", text: "Urgent" }));
  if (isAnnouncement && item.acknowledgement_required && !item.acknowledged) {
    badges.push(h("span", { class: "badge abnormal", text: "Please acknowledge" }));
  }
  for (const labelId of item.labels || []) {
    const label = state.board.labels.find((l) => l.id === labelId);
    if (label) badges.push(h("span", { class: "badge label", text: label.name }));
  }
  // A team item another member claimed (or one the team is done with) is out of my unread count:
  // the row is not bold either.
  const queue = item.queue;
  const handled = queue && (queue.state === "done"
    || (queue.state === "claimed" && !(queue.claimed_by && state.me && queue.claimed_by.id === state.me.id)));
  const unread = !item.read && !handled;
  const urgent = item.urgent || item.priority === "urgent" || item.severity === "urgent";
  const classes = [unread ? "unread" : "", item.overdue ? "overdue" : "", urgent ? "urgent" : ""].join(" ");
  const fact = rowFact(item);
  const stateWords = [unread ? "unread" : "", item.urgent ? "urgent" : "", item.overdue ? "overdue" : ""].filter(Boolean).join(", ");
  const pickable = canPick();
  return h("li", { class: `${classes}${pickable ? " pickable" : ""}`, dataset: { id: item.id } },
    pickable ? h("input", {
      type: "checkbox", class: "pick", checked: state.picked.has(item.id),
      "aria-label": `Select: ${item.title || "(no subject)"}`,
      onclick: (event) => pickRow(item.id, event),
    }) : null,
    h("button", {
      type: "button", class: "row", "aria-current": state.selected === item.id ? "true" : "false",
      onclick: () => openItem(item),
    },
    stateWords ? h("span", { class: "sr-only", text: `${stateWords}: ` }) : null,
    h("span", { class: "line1" }, h("span", { class: "who", text: who || "" }),
      h("span", { class: "when", text: when(item.sent_at || item.posted_at) })),
    h("span", { class: "title" }, ...badges, h("span", { class: "subject", text: item.title || "(no subject)" })),
    fact ? h("span", { class: "fact", text: fact }) : null));
}

function listNote(text, error = false) {
  const note = $("#list-empty");
  note.textContent = text;
  note.classList.toggle("error", error);
  note.hidden = false;
}

// An item that left this list (archived, restored) is dropped from the rows kept below the first page.
function forget(id) { state.items = state.items.filter((i) => i.id !== id); }

function renderList() {
  const ul = $("#items");
  // A row that has the keyboard focus keeps it when the list is drawn again (a live change).
  const focused = ul.contains(document.activeElement) ? document.activeElement.closest("li") : null;
  const focusedId = focused && focused.dataset.id;
  ul.replaceChildren(...state.items.map(itemRow));
  if (focusedId) {
    const again = [...ul.children].find((li) => li.dataset.id === focusedId);
    if (again) again.querySelector(".row").focus({ preventScroll: true });
  }
  $("#items").removeAttribute("aria-busy");
  if (state.items.length) $("#list-empty").hidden = true;
  else if (state.view.type === "search") listNote(searchNote(state.capped, Boolean(state.cursor)));
  else listNote(`${state.unreadOnly ? "No unread items" : "Nothing"} in ${viewName()}.`);
  $("#more").hidden = !state.cursor;
  renderBulkBar();
}

// --- sorting and bulk actions ----------------------------------------------------------------
// Item folders and labels can be sorted, selected and marked read in bulk (announcements cannot).
function canPick() {
  return Boolean(state.board) && state.view.type !== "search" && !(state.view.type === "folder" && state.view.id === "announcements");
}

function showListTools() {
  const pickable = canPick();
  $("#list-tools").hidden = !pickable;
  $("#bulk-bar").hidden = !pickable;
  $("#mark-all-read").hidden = state.view.type !== "folder";
  $("#sort-order").value = state.order;
}

// A click selects or clears one row; with Shift, every row between it and the row clicked last.
function pickRow(id, event) {
  const checked = event.target.checked;
  const ids = state.items.map((i) => i.id);
  const at = ids.indexOf(id);
  const from = state.lastPick === null ? -1 : ids.indexOf(state.lastPick);
  if (event.shiftKey && from >= 0 && at >= 0) {
    const [lo, hi] = from < at ? [from, at] : [at, from];
    for (const other of ids.slice(lo, hi + 1)) {
      if (checked) state.picked.add(other); else state.picked.delete(other);
    }
    $("#items").querySelectorAll("li").forEach((li) => {
      const box = li.querySelector(".pick");
      if (box) box.checked = state.picked.has(li.dataset.id);
    });
  } else if (checked) {
    state.picked.add(id);
  } else {
    state.picked.delete(id);
  }
  state.lastPick = id;
  renderBulkBar();
}

function renderBulkBar() {
  if (!canPick()) return;
  const shown = new Set(state.items.map((i) => i.id));
  for (const id of [...state.picked]) if (!shown.has(id)) state.picked.delete(id);
  const n = state.picked.size;
  $("#bulk-count").textContent = n ? `${n} selected` : "";
  $("#bulk-actions").hidden = n === 0;
  const all = $("#select-all");
  all.checked = n > 0 && n === state.items.length && !state.cursor;
  all.indeterminate = n > 0 && !all.checked;
  const labels = state.board.labels || [];
  const select = $("#bulk-label");
  const kept = select.value;
  select.replaceChildren(...labels.map((l) => h("option", { value: l.id, text: l.name })));
  if (labels.some((l) => l.id === kept)) select.value = kept;
  select.hidden = !labels.length;
  $("#bulk-label-apply").hidden = !labels.length;
}

// "Select all in folder": every item of the folder (the pages not loaded yet are loaded first, up
// to what one bulk request names); cleared again when everything was selected.
async function selectAll(checked) {
  if (!checked) {
    state.picked.clear();
    renderList();
    return;
  }
  while (state.cursor && state.items.length < BULK_MAX) {
    const before = state.items.length;
    await loadList(true);
    if (state.items.length === before) break;
  }
  for (const item of state.items.slice(0, BULK_MAX)) state.picked.add(item.id);
  renderList();
  if (state.items.length > BULK_MAX) announce(`The first ${BULK_MAX} items are selected.`);
}

const BULK_DONE = { mark_read: "marked read", mark_unread: "marked unread", archive: "archived", label: "labelled" };

async function runBulk(action) {
  const ids = [...state.picked];
  if (!ids.length) return;
  const body = { action, item_ids: ids.slice(0, BULK_MAX) };
  if (action === "label") body.label_id = $("#bulk-label").value;
  $("#items").setAttribute("aria-busy", "true");
  let answer;
  try {
    answer = await post("/api/v1/board/items/bulk", body);
  } catch (error) {
    $("#items").removeAttribute("aria-busy");
    announce(`Not done: ${error.message}`, { error: true });
    return;
  }
  const refused = answer.results.filter((r) => r.outcome !== "done");
  if (action === "archive") for (const r of answer.results) if (r.outcome === "done") forget(r.id);
  state.picked = new Set(refused.map((r) => r.id));
  const note = refused.length ? ` ${refused.length} could not be changed (${refusedWords(refused)}).` : "";
  announce(`${answer.done} ${answer.done === 1 ? "item" : "items"} ${BULK_DONE[action]}.${note}`, { error: refused.length > 0 });
  await refreshBoard();
  if (state.selected && state.picked.size === 0 && !state.items.some((i) => i.id === state.selected)) renderPane(null);
}

function refusedWords(refused) {
  const words = new Set(refused.map((r) => (r.outcome === "not_found" ? "no longer there" : r.message || "not allowed")));
  return [...words].join("; ");
}

async function markAllRead() {
  const folder = state.board.folders.find((f) => f.id === state.view.id);
  if (!folder) return;
  const unread = folder.unread || 0;
  if (!unread) {
    announce(`Nothing unread in ${folder.name}.`);
    return;
  }
  const many = unread === 1 ? "1 unread item" : `${unread} unread items`;
  if (!(await confirmDialog(`Mark all read in ${folder.name}?`, `${many} in ${folder.name} will be marked read.`, "Mark all read"))) {
    $("#mark-all-read").focus();
    return;
  }
  let marked = 0;
  try {
    for (let round = 0; round < 20; round += 1) {
      const answer = await post(`/api/v1/board/folders/${encodeURIComponent(folder.id)}/mark-all-read`);
      marked += answer.marked;
      if (!answer.more) break;
    }
  } catch (error) {
    announce(`Not done: ${error.message}`, { error: true });
  }
  announce(`${marked} ${marked === 1 ? "item" : "items"} marked read in ${folder.name}.`);
  await refreshBoard();
  $("#mark-all-read").focus();
}

async function refreshBoard() {
  const signedIn = state.signedInSeq;
  try {
    const board = await get("/api/v1/board");
    if (signedIn !== state.signedInSeq) return;
    state.board = board;
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) announce(`Could not refresh: ${error.message}`, { error: true });
    return;
  }
  renderFolders();
  await loadList(false, true);
}

let liveTimer = null;
function liveChange() {
  clearTimeout(liveTimer);
  liveTimer = setTimeout(() => { if (state.board) refreshBoard(); }, 120);
}

// --- reading pane --------------------------------------------------------------------------
async function openItem(item) {
  state.selected = item.id;
  // The pane is busy until this item's answer is drawn (renderPane clears it): what it shows until
  // then, actions included, is the earlier state.
  $("#pane").setAttribute("aria-busy", "true");
  $("#items").querySelectorAll(".row").forEach((row) => {
    row.setAttribute("aria-current", row.parentElement.dataset.id === item.id ? "true" : "false");
  });
  const isAnnouncement = item.folder === "announcements";  // its folder, or a search result
  const signedIn = state.signedInSeq;
  // Only the answer for the item chosen last is shown, and none after signing out.
  const stale = () => signedIn !== state.signedInSeq || state.selected !== item.id;
  let detail;
  try {
    detail = isAnnouncement
      ? await get(`/api/v1/announcements/${encodeURIComponent(item.id)}`)
      : await get(`/api/v1/board/items/${encodeURIComponent(item.id)}`);
  } catch (error) {
    if (!stale()) renderPane(h("p", { class: "error", role: "alert", text: `Could not open it: ${error.message}` }));
    return;
  }
  if (stale()) return;
  state.opened = { ...detail, kind: isAnnouncement ? "announcement" : detail.kind };
  renderPane(paneFor(state.opened));
  // On a narrow window the reading pane is below the list: bring it into view.
  if (window.matchMedia("(max-width: 900px)").matches) $("#pane").scrollIntoView({ block: "start" });
  if (!item.read) refreshBoard();
}

function renderPane(content) {
  const pane = $("#pane");
  pane.replaceChildren(content || h("p", { class: "empty", text: "Select an item to read it." }));
  pane.removeAttribute("aria-busy");
}

function meta(label, value) { return value ? h("p", { class: "meta" }, h("strong", { text: `${label}: ` }), value) : null; }

function staffName(id) { return (state.staff.find((s) => s.id === id) || { display_name: id }).display_name; }

function recipientsText(to) {
  if (!to) return "";
  if (to.whole_agency) return "Everyone in the agency";
  const names = (to.staff_ids || []).map((id) => (state.staff.find((s) => s.id === id) || { display_name: id }).display_name);
  const teams = (to.team_ids || []).map((id) => `Team ${(state.teams.find((t) => t.id === id) || { name: id }).name}`);
  return names.concat(teams).join(", ");
}

function paneFor(d) {
  const body = [];
  if (d.kind === "announcement") {
    body.push(h("h2", { text: d.title }), h("p", {}, h("span", { class: "badge agency", text: "Whole agency" })),
      meta("Posted by", d.posted_by && d.posted_by.name), meta("Posted", fullTime(d.posted_at)),
      h("div", { class: "body", text: humanizeTimes(d.body) }));
    const ownPost = d.posted_by && state.me && d.posted_by.id === state.me.id;
    if (d.acknowledgement_required && ownPost) {
      body.push(acknowledgementsPanel(d));
    } else if (d.acknowledgement_required) {
      body.push(d.acknowledged
        ? h("p", { class: "meta", text: `Acknowledged ${fullTime(d.acknowledged_at)}` })
        : h("div", { class: "pane-actions" }, h("button", { type: "button", class: "primary", onclick: () => act(() => post(`/api/v1/announcements/${d.id}/acknowledge`), "Acknowledged") }, "Acknowledge")));
    }
    return h("article", { "aria-label": d.title }, body);
  }
  if (d.kind === "message" || d.kind === "portal_message") {
    body.push(h("h2", { text: d.subject || d.title || "(no subject)" }));
    const marks = [];
    if (d.priority === "urgent" || d.urgent) marks.push(h("span", { class: "badge urgent", text: "Urgent" }));
    if (d.auto_reply) marks.push(h("span", { class: "badge auto", text: "Automatic reply" }));
    if (d.to && d.to.whole_agency) marks.push(h("span", { class: "badge agency", text: "Whole agency" }));
    if (d.covering_for) marks.push(coverageBadge(d));
    if (marks.length) body.push(h("p", {}, ...marks));
    body.push(meta("From", d.sender && d.sender.name), meta("To", recipientsText(d.to)), meta("Sent", fullTime(d.sent_at)));
    if (d.patient && (d.patient.name || d.patient.display_name)) body.push(meta(d.patient_term || term(), d.patient.name || d.patient.display_name));
    if (hasQueue(d)) body.push(queuePanel(d, { meId: state.me.id, act }));
    body.push(messageActions(d), h("div", { class: "body", text: humanizeTimes(d.body) }));
    if (d.thread_id) body.push(threadPanel(d));
    if (hasReceipts(d)) body.push(receiptsPanel(d, { nameOf: staffName, confirm: confirmDialog, changed: refreshBoard }));
    if ((d.links || []).length) body.push(h("ul", { class: "links", "aria-label": "Links" }, d.links.map((l) => h("li", {}, safeLink(l)))));
    return h("article", { "aria-label": d.subject || "Message" }, body);
  }
  if (d.kind === "reminder") {
    body.push(h("h2", { text: d.title || d.text }), meta("Remind at", fullTime(d.remind_at)), meta("State", d.state),
      h("div", { class: "body", text: humanizeTimes(d.text) }));
    if (d.link) body.push(h("p", {}, /^https?:/i.test(d.link) ? safeLink(d.link) : h("span", { text: d.link })));
    if (d.state !== "completed") {
      const minutes = h("select", { id: "snooze-minutes" },
        h("option", { value: "15", text: "15 minutes" }), h("option", { value: "60", text: "1 hour" }),
        h("option", { value: "1440", text: "1 day" }));
      body.push(h("div", { class: "pane-actions" },
        h("label", { for: "snooze-minutes", class: "inline", text: "Snooze for" }), minutes,
        h("button", { type: "button", onclick: () => act(() => post(`/api/v1/reminders/${d.id}/snooze`, { minutes: Number(minutes.value) }), "Snoozed", true) }, "Snooze"),
        h("button", { type: "button", class: "primary", onclick: () => act(() => post(`/api/v1/reminders/${d.id}/complete`), "Completed") }, "Complete")));
    }
    body.push(genericActions(d));
    return h("article", { "aria-label": "Reminder" }, body);
  }
  if (d.kind === "signature_request" || d.kind === "signature_outcome") {
    const r = d.signature_request || {};
    const docKind = r.document_kind === "patient" ? `${term()} document` : "Staff document";
    if (d.covering_for) body.push(h("p", {}, coverageBadge(d)));
    body.push(h("h2", { text: r.title || d.title }), meta("Requested by", r.requester && r.requester.name), meta("Document", `${docKind}: ${r.document_ref || ""}`),
      meta("Status", signatureStatusWords(r)), meta("Due", fullTime(r.due_at)));
    if (r.cancel_reason) body.push(meta("Reason for cancelling", r.cancel_reason));
    body.push(h("ul", { "aria-label": "Signers", class: "signers" }, (r.signers || []).map((s) => h("li", { dataset: { state: s.state } }, signerWords(s)))));
    const mine = (r.signers || []).find((s) => s.staff_id === state.me.id);
    const open = r.status === "pending" || r.status === "partially_signed";
    if (r.requester && r.requester.id === state.me.id && open) {
      body.push(h("div", { class: "pane-actions" },
        h("button", {
          type: "button",
          onclick: async () => {
            const pending = (r.signers || []).filter((s) => s.state === "pending").length;
            const ok = await confirmDialog("Cancel signature request",
              `${pending} ${pending === 1 ? "signer has" : "signers have"} not answered yet. Their request will close and they will not be reminded.`,
              "Cancel request");
            if (ok) act(() => post(`/api/v1/signature-requests/${r.id}/cancel`), "Request cancelled");
          },
        }, "Cancel request")));
    }
    if (d.kind === "signature_request" && mine && mine.state === "pending" && open) {
      const note = h("textarea", { id: "signature-note", rows: "2", maxlength: "1000" });
      const error = h("p", { class: "error", role: "alert", hidden: true });
      const need = (fn) => () => {
        if (!note.value.trim()) { error.hidden = false; error.textContent = "Write an attestation (to sign) or a reason (to decline)."; note.focus(); return; }
        fn(note.value.trim());
      };
      body.push(h("label", { for: "signature-note", text: "Attestation or reason" }), note, error,
        h("div", { class: "pane-actions" },
          h("button", { type: "button", class: "primary", onclick: need((text) => act(() => post(`/api/v1/signature-requests/${r.id}/sign`, { attestation: text }), "Signed")) }, "Sign"),
          h("button", { type: "button", onclick: need((text) => act(() => post(`/api/v1/signature-requests/${r.id}/decline`, { reason: text }), "Declined")) }, "Decline")));
    }
    body.push(genericActions(d));
    return h("article", { "aria-label": "Signature request" }, body);
  }
  // Delivered notifications: schedule, eRx, compliance, lab, cloud.
  const badges = [];
  if (d.severity === "urgent") badges.push(h("span", { class: "badge urgent", text: "Urgent" }));
  if (d.severity === "abnormal") badges.push(h("span", { class: "badge abnormal", text: "Abnormal" }));
  if (d.overdue) badges.push(h("span", { class: "badge overdue", text: "Overdue" }));
  if (d.covering_for) badges.push(coverageBadge(d));
  // Direct messages and faxes: cloud.js draws the message or fax itself (its times in the agency's
  // zone, its status kept up to date, its own actions).
  const cloud = cloudPanel(d);
  if (cloud) return h("article", { "aria-label": d.title || "Notification" }, h("h2", { text: d.title }), h("p", {}, ...badges), cloud, genericActions(d));
  body.push(h("h2", { text: d.title }), h("p", {}, ...badges), meta("From", SOURCE_NAMES[d.folder] || SOURCE_NAMES[d.archived_from] || (d.sender && d.sender.name)), meta("Received", fullTime(d.sent_at)),
    meta(term(), d.patient && d.patient.name),
    meta("Due", fullTime(d.due_at)), meta("Status", d.status), h("div", { class: "body", text: humanizeTimes(termed(d.summary)) }));
  if (hasCriticalResult(d)) body.push(criticalResultPanel(d, { nameOf: staffName, changed: refreshBoard }));
  if (hasUrgentUnread(d)) body.push(urgentUnreadPanel(d, { nameOf: staffName, changed: refreshBoard }));
  // eRx items: their erx-sso: link is the "Open in ePrescribing" button; a lab result's own link
  // opens the full result here; other links stay links.
  const links = d.links || [];
  const erxButtons = links.map(erxLinkButton).filter(Boolean);
  const labLinks = links.filter((l) => labResultId(l));
  const inline = erxButtons.concat(labLinks.map((l) => labResultButton(l)));
  if (inline.length) body.push(h("div", { class: "pane-actions" }, inline));
  if (labLinks.length) body.push(h("section", { id: "lab-result", class: "lab-result", "aria-label": "Full result", hidden: true }));
  const plain = links.filter((l) => !isErxLink(l) && !labResultId(l));
  if (plain.length) body.push(h("ul", { "aria-label": "Links" }, plain.map((l) => h("li", {}, safeLink(l)))));
  body.push(genericActions(d));
  return h("article", { "aria-label": d.title || "Notification" }, body);
}

// A signature request's status and each signer's state, in the words people use.
const SIGNATURE_STATUS = {
  pending: "Waiting for signatures",
  partially_signed: "Partly signed",
  complete: "Signed by everyone",
  declined: "Declined",
  cancelled: "Cancelled by the requester",
};

function signatureStatusWords(r) {
  const words = SIGNATURE_STATUS[r.status] || r.status || "";
  if (r.status === "cancelled" && r.cancelled_at) return `${words} ${fullTime(r.cancelled_at)}`;
  return r.signers_total ? `${words} (${r.signed} of ${r.signers_total} signed)` : words;
}

function signerWords(signer) {
  const s = { ...signer, name: signer.name || staffName(signer.staff_id) };
  if (s.state === "signed") return `${s.name}: signed ${fullTime(s.responded_at)}`;
  if (s.state === "declined") return `${s.name}: declined ${fullTime(s.responded_at)}${s.reason ? ` (“${s.reason}”)` : ""}`;
  return `${s.name}: not answered yet`;
}

async function act(call, done, closePane = false) {
  // Busy until the item is drawn again after the change (or closed), not only until the call returns.
  $("#pane").setAttribute("aria-busy", "true");
  try {
    await call();
    announce(done);
  } catch (error) {
    $("#pane").removeAttribute("aria-busy");
    // The item stays in view, with what went wrong above it.
    $("#pane .pane-error")?.remove();
    $("#pane").prepend(h("p", { class: "error pane-error", role: "alert", text: `Not done: ${error.message}` }));
    return;
  }
  await refreshBoard();
  const still = state.items.find((i) => i.id === state.selected);
  if (still && !closePane) await openItem(still);
  else renderPane(null);
}

// An open menu sits just below its button (whichever line the button wrapped to), moved left so it
// does not run past the window's right edge, and above the button when there is no room below.
function keepOnScreen(menu, toggle) {
  const margin = 8;
  menu.style.left = `${toggle.offsetLeft}px`;
  menu.style.top = `${toggle.offsetTop + toggle.offsetHeight + 4}px`;
  const box = menu.getBoundingClientRect();
  const overRight = box.right - (document.documentElement.clientWidth - margin);
  if (overRight > 0) menu.style.left = `${Math.max(0, toggle.offsetLeft - overRight)}px`;
  const room = window.innerHeight - toggle.getBoundingClientRect().bottom;
  if (box.height + margin > room && toggle.getBoundingClientRect().top > box.height + margin) {
    menu.style.top = `${toggle.offsetTop - box.height - 4}px`;
  }
}

function optionsMenu(d, entries) {
  const menu = h("div", { class: "menu", role: "menu", hidden: true, id: "more-options-menu" });
  const toggle = h("button", { type: "button", "aria-haspopup": "menu", "aria-expanded": "false", "aria-controls": "more-options-menu" }, "More options");
  const close = () => { menu.hidden = true; toggle.setAttribute("aria-expanded", "false"); };
  for (const [name, run] of entries) {
    menu.append(h("button", { type: "button", role: "menuitem", onclick: () => { close(); run(); } }, name));
  }
  const wrapper = h("div", { class: "pane-actions" }, toggle, menu);
  // A click or focus anywhere else closes the menu.
  wrapper.addEventListener("focusout", (event) => { if (!wrapper.contains(event.relatedTarget)) close(); });
  toggle.addEventListener("click", () => {
    const opening = menu.hidden;
    menu.hidden = !opening;
    toggle.setAttribute("aria-expanded", String(opening));
    if (opening) {
      keepOnScreen(menu, toggle);
      menu.querySelector("button").focus({ preventScroll: false });
    }
  });
  menu.addEventListener("keydown", (event) => {
    const buttons = [...menu.querySelectorAll("button")];
    const at = buttons.indexOf(document.activeElement);
    if (event.key === "Escape") { close(); toggle.focus(); }
    if (event.key === "ArrowDown") { event.preventDefault(); buttons[(at + 1) % buttons.length].focus(); }
    if (event.key === "ArrowUp") { event.preventDefault(); buttons[(at - 1 + buttons.length) % buttons.length].focus(); }
  });
  return wrapper;
}

function labelEntries(d) {
  const entries = [["Add Label", () => openLabelDialog("add", d)]];
  if ((d.labels || []).length && state.board.labels.length > 1) entries.push(["Move to Label", () => openLabelDialog("move", d)]);
  if ((d.labels || []).length) entries.push(["Remove Label", () => openLabelDialog("remove", d)]);
  return entries;
}

function readEntries(d) {
  const entries = [["Mark as Unread", () => act(() => post(`/api/v1/board/items/${d.id}/unread`), "Marked as unread", true)]];
  if (d.folder === "archive") entries.push(["Restore", () => act(() => post(`/api/v1/board/items/${d.id}/restore`).then(() => forget(d.id)), "Restored", true)]);
  else entries.push(["Archive", () => act(() => post(`/api/v1/board/items/${d.id}/archive`).then(() => forget(d.id)), "Archived", true)]);
  return entries;
}

// What answering the open message can do: [name, shortcut key, run] (none for my own copy's Reply).
function answerEntries(d) {
  const entries = [];
  const mine = d.sender && d.sender.id === state.me.id;  // my own copy in Sent: answer the others
  if (!mine) entries.push(["Reply", "r", () => openCompose({ mode: "reply", message: d })]);
  if (d.kind === "message") entries.push(["Reply All", "a", () => openCompose({ mode: "reply-all", message: d })]);
  entries.push(["Forward", "f", () => openCompose({ mode: "forward", message: d })]);
  return entries;
}

// Reply, Reply All and Forward in plain view; More options keeps the rest.
function messageActions(d) {
  const menu = optionsMenu(d, readEntries(d).concat(labelEntries(d)));
  const buttons = answerEntries(d).map(([name, key, run]) => h("button", {
    type: "button", class: name === "Reply" ? "primary" : "", "aria-keyshortcuts": key, dataset: { answer: key }, onclick: run,
  }, name));
  menu.prepend(...buttons);
  return menu;
}

// The conversation an open message belongs to: the earlier (and later) messages collapsed, each
// opened on demand; the open message itself is the one shown above.
function threadPanel(d) {
  const panel = h("section", { class: "thread", "aria-label": "Conversation" });
  const signedIn = state.signedInSeq;
  get(`/api/v1/threads/${encodeURIComponent(d.thread_id)}`).then((thread) => {
    if (signedIn !== state.signedInSeq || !panel.isConnected) return;
    const others = (thread.messages || []).filter((m) => m.id !== d.message_id && m.id !== d.ref_id);
    if (!others.length) { panel.remove(); return; }
    panel.append(h("h3", { text: `Conversation (${others.length + 1} messages)` }),
      ...others.map((m) => h("details", { class: "thread-message", dataset: { id: m.id } },
        h("summary", {},
          h("span", { class: "who", text: m.sender && m.sender.name }),
          m.auto_reply ? h("span", { class: "badge auto", text: "Automatic reply" }) : null,
          h("span", { class: "when", text: fullTime(m.sent_at) }),
          h("span", { class: "subject", text: m.subject || "(no subject)" })),
        h("p", { class: "thread-body", text: m.recalled_at ? "(recalled)" : humanizeTimes(m.body) }))));
  }).catch((error) => {
    if (signedIn !== state.signedInSeq || !panel.isConnected) return;
    if (error instanceof ApiError && error.status === 404) { panel.remove(); return; }
    panel.append(h("p", { class: "meta", text: `The conversation could not be loaded: ${error.message}` }));
  });
  return panel;
}

// The author of an announcement sees who acknowledged it and who has not yet.
function acknowledgementsPanel(d) {
  const panel = h("section", { class: "acks", "aria-label": "Acknowledgements" }, h("h3", { text: "Acknowledgements" }),
    h("p", { class: "meta", text: "Loading…" }));
  const signedIn = state.signedInSeq;
  Promise.all([get(`/api/v1/announcements/${encodeURIComponent(d.id)}/acknowledgements`), state.directoryLoaded])
    .then(([acks]) => {
      if (signedIn !== state.signedInSeq || !panel.isConnected) return;
      const done = acks.acknowledged || [];
      const pending = acks.pending || [];
      panel.replaceChildren(h("h3", { text: "Acknowledgements" }),
        h("p", { class: "meta", text: `${done.length} acknowledged, ${pending.length} not yet` }),
        h("h4", { text: "Acknowledged" }),
        done.length ? h("ul", { "aria-label": "Acknowledged" }, done.map((a) => h("li", { text: `${staffName(a.staff_id)}, ${fullTime(a.at)}` })))
          : h("p", { class: "meta", text: "No one yet." }),
        h("h4", { text: "Not yet" }),
        pending.length ? h("ul", { "aria-label": "Not yet acknowledged" }, pending.map((id) => h("li", { text: staffName(id) })))
          : h("p", { class: "meta", text: "Everyone has acknowledged." }));
    })
    .catch((error) => {
      if (signedIn !== state.signedInSeq || !panel.isConnected) return;
      panel.replaceChildren(h("h3", { text: "Acknowledgements" }),
        h("p", { class: "meta", text: `The acknowledgement list could not be loaded: ${error.message}` }));
    });
  return panel;
}

// --- lab results ---------------------------------------------------------------------------
function labResultId(link) {
  const url = typeof link === "string" ? link : String((link && link.url) || "");
  let parsed;
  try { parsed = new URL(url, location.origin); } catch { return null; }
  const match = LAB_RESULT_PATH.exec(parsed.pathname);
  return match ? match[1] : null;
}

function labResultButton(link) {
  const id = labResultId(link);
  const label = (typeof link === "object" && link && link.label) || "Full result";
  return h("button", { type: "button", "aria-controls": "lab-result", "aria-expanded": "false", onclick: (event) => showLabResult(id, event.currentTarget) }, label);
}

async function showLabResult(id, button) {
  const section = $("#lab-result");
  if (!section) return;
  if (!section.hidden && section.dataset.id === id) {
    section.hidden = true;
    button.setAttribute("aria-expanded", "false");
    return;
  }
  section.hidden = false;
  section.dataset.id = id;
  button.setAttribute("aria-expanded", "true");
  section.replaceChildren(h("p", { class: "meta", text: "Loading the full result…" }));
  const signedIn = state.signedInSeq;
  let result;
  try {
    result = await get(`/api/v1/lab/results/${encodeURIComponent(id)}`);
  } catch (error) {
    if (signedIn !== state.signedInSeq || !section.isConnected) return;
    section.replaceChildren(h("p", { class: "error", role: "alert", text: `The full result could not be loaded: ${error.message}` }));
    return;
  }
  if (signedIn !== state.signedInSeq || !section.isConnected) return;
  section.replaceChildren(...labResultView(result));
  section.querySelector("h3").focus();
}

const SEVERITY_WORDS = { urgent: "Critical", abnormal: "Abnormal", info: "" };

// When the sample was taken: an ISO time in the display zone, or the lab's own HL7 time
// (YYYYMMDD[HHMM[SS]], the lab's local wall time) in the same date style, without a zone.
function observedTime(value) {
  const text = String(value || "");
  if (/^\d{4}-\d{2}-\d{2}T/.test(text)) return fullTime(text);
  const m = /^(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?/.exec(text);
  if (!m) return text;
  const wall = new Date(Date.UTC(Number(m[1]), Number(m[2]) - 1, Number(m[3]), Number(m[4] || 0), Number(m[5] || 0)));
  if (Number.isNaN(wall.getTime())) return text;
  const options = { timeZone: "UTC", year: "numeric", month: "short", day: "numeric", ...(m[4] ? { hour: "numeric", minute: "2-digit" } : {}) };
  return new Intl.DateTimeFormat([], options).format(wall);
}

function labResultView(r) {
  const test = (r.test && (r.test.name || r.test.code)) || "Lab result";
  const out = [h("h3", { tabindex: "-1", text: `Full result: ${test}` })];
  if (r.retracted) out.push(h("p", { class: "retraction", role: "note", text: `Withdrawn: ${r.retracted}` }));
  out.push(meta(term(), r.patient_name || r.patient_ref), meta("Order", r.order_number), meta("Status", r.status),
    meta("Observed", observedTime(r.observed_at)),
    meta("Received", fullTime(r.received_at)));
  const rows = (r.observations || []).map((o) => h("tr", { class: o.retracted ? "retracted" : o.severity || "" },
    h("th", { scope: "row", text: o.name || o.code }),
    h("td", { text: o.value || o.absent_reason || "" }),
    h("td", { text: o.units || "" }),
    h("td", { text: o.reference_range || "" }),
    h("td", { text: [SEVERITY_WORDS[o.severity] || "", ...(o.flags || [])].filter(Boolean).join(", ") }),
    h("td", { text: [o.retracted ? `Withdrawn: ${o.retracted}` : "", ...(o.comments || [])].filter(Boolean).join(" ") })));
  out.push(h("table", {},
    h("caption", { class: "sr-only", text: `Observations of ${test}` }),
    h("thead", {}, h("tr", {}, ["Test", "Value", "Units", "Reference range", "Flags", "Comments"].map((c) => h("th", { scope: "col", text: c })))),
    h("tbody", {}, rows)));
  if ((r.comments || []).length) out.push(h("h4", { text: "Comments" }), h("ul", {}, r.comments.map((c) => h("li", { text: c }))));
  return out;
}

function genericActions(d) { return optionsMenu(d, readEntries(d).concat(labelEntries(d))); }

// --- labels --------------------------------------------------------------------------------
let labelContext = null;
function openLabelDialog(mode, d) {
  labelContext = { mode, item: d };
  const dialog = $("#label-dialog");
  $("#label-title").textContent = { add: "Add Label", move: "Move to Label", remove: "Remove Label" }[mode];
  $("#label-error").hidden = true;
  $("#label-name-field").hidden = mode !== "add";
  $("#label-from-field").hidden = mode === "add";
  $("#label-to-field").hidden = mode !== "move";
  const mine = state.board.labels.filter((l) => (d.labels || []).includes(l.id));
  const others = state.board.labels.filter((l) => !(d.labels || []).includes(l.id));
  $("#label-options").replaceChildren(...others.map((l) => h("option", { value: l.name })));
  $("#label-from").replaceChildren(...mine.map((l) => h("option", { value: l.id, text: l.name })));
  $("#label-to").replaceChildren(...others.map((l) => h("option", { value: l.id, text: l.name })));
  $("#label-name").value = "";
  $("#label-ok").textContent = { add: "Add", move: "Move", remove: "Remove" }[mode];
  dialog.showModal();
}

async function submitLabel(event) {
  event.preventDefault();
  const { mode, item } = labelContext;
  const error = $("#label-error");
  const leavesThisLabel = mode !== "add" && state.view.type === "label" && $("#label-from").value === state.view.id;
  // Busy until the item is drawn again with its new labels: its actions depend on them.
  $("#pane").setAttribute("aria-busy", "true");
  try {
    if (mode === "add") {
      const name = $("#label-name").value.trim();
      if (!name) throw new Error("Type a label name.");
      const existing = state.board.labels.find((l) => l.name.toLowerCase() === name.toLowerCase());
      await post(`/api/v1/board/items/${item.id}/labels`, existing ? { label_id: existing.id } : { name });
    } else if (mode === "move") {
      await post(`/api/v1/board/items/${item.id}/labels/move`, { from_label_id: $("#label-from").value, to_label_id: $("#label-to").value });
    } else {
      await del(`/api/v1/board/items/${item.id}/labels/${encodeURIComponent($("#label-from").value)}`);
    }
  } catch (e) {
    $("#pane").removeAttribute("aria-busy");
    error.hidden = false;
    error.textContent = e.message;
    return;
  }
  $("#label-dialog").close();
  if (leavesThisLabel) forget(item.id);
  announce("Labels updated");
  await refreshBoard();
  const still = state.items.find((i) => i.id === item.id);
  if (still) await openItem(still);
  else $("#pane").removeAttribute("aria-busy");
}

// --- compose -------------------------------------------------------------------------------
let composeContext = null;
let recipients = [];

function renderChips() {
  $("#recipient-chips").replaceChildren(...recipients.map((r, i) => h("span", { class: "chip" },
    h("span", { text: r.label }),
    h("button", { type: "button", "aria-label": `Remove ${r.label}`, onclick: () => { recipients.splice(i, 1); renderChips(); $("#recipient-input").focus(); } }, "×"))));
}

function recipientChoices() {
  return state.teams.map((t) => ({ type: "team", id: t.id, label: `Team: ${t.name}` }))
    .concat(state.staff.map((s) => ({ type: "staff", id: s.id, label: s.display_name })));
}

async function addRecipientFromInput() {
  const input = $("#recipient-input");
  const typed = input.value;
  const text = typed.trim().toLowerCase();
  if (!text) return false;
  // Typed before the colleagues and teams arrived (just after signing in): match once they are here.
  const signedIn = state.signedInSeq;
  await state.directoryLoaded;
  if (signedIn !== state.signedInSeq) return true;
  const choices = recipientChoices();
  const match = choices.find((c) => c.label.toLowerCase() === text)
    || choices.filter((c) => c.label.toLowerCase().includes(text)).sort((a, b) => a.label.length - b.label.length)[0];
  if (!match) { fieldError("recipient-input", `No colleague or team is called “${typed.trim()}”. Check the spelling, or pick a name from the list.`); return true; }
  if (!recipients.some((r) => r.type === match.type && r.id === match.id)) recipients.push(match);
  if (input.value === typed) input.value = "";  // not a next name typed while this one waited
  renderChips();
  clearComposeErrors();
  return true;
}

// A problem the whole dialog has (the server's answer), above the fields.
function showComposeError(text) {
  const error = $("#compose-error");
  error.hidden = false;
  error.textContent = text;
}

function clearComposeErrors() {
  $("#compose-error").hidden = true;
  document.querySelectorAll("#compose-form .field-error").forEach((e) => e.remove());
  document.querySelectorAll("#compose-form [aria-invalid]").forEach((field) => {
    field.removeAttribute("aria-invalid");
    field.removeAttribute("aria-describedby");
  });
}

// A problem with one field, in plain words right below it; the field gets the focus.
function fieldError(id, text) {
  clearComposeErrors();
  const field = $(`#${id}`);
  const note = h("p", { class: "field-error", id: `${id}-error`, text });
  field.after(note);
  field.setAttribute("aria-invalid", "true");
  field.setAttribute("aria-describedby", note.id);
  field.focus();
}

// The server's refusals that concern one field, by error code.
const FIELD_OF_CODE = {
  no_recipients: "recipient-input", unknown_recipients: "recipient-input", invalid_link: "compose-links",
  body_too_long: "compose-body", invalid_time: "compose-remind-at",
};

// Who a reply or forward goes to, and the original quoted below, in the dialog.
function composeContextView(context) {
  const box = $("#compose-context");
  const m = context.message;
  box.hidden = !m;
  if (!m) return;
  let to;
  if (context.mode === "reply") to = (m.sender && m.sender.name) || "the sender";
  else if (context.mode === "reply-all") {
    const others = { ...(m.to || {}), staff_ids: ((m.to && m.to.staff_ids) || []).filter((id) => id !== state.me.id) };
    const names = [m.sender && m.sender.id !== state.me.id ? m.sender.name : null, recipientsText(others)].filter(Boolean);
    to = names.join(", ") || "the other recipients";
  } else to = "the colleagues or teams you add below";
  $("#compose-to").replaceChildren(h("strong", { text: "To: " }), to);
  $("#compose-original").replaceChildren(
    h("span", { class: "quoted-head", text: `On ${fullTime(m.sent_at)}, ${(m.sender && m.sender.name) || "the sender"} wrote:` }),
    "\n", humanizeTimes(m.body || ""));
}

function setComposeKind(kind) {
  const mode = composeContext.mode;
  const key = mode === "new" ? kind : mode === "forward" ? "forward" : "reply";
  document.querySelectorAll("#compose-form .field[data-for]").forEach((field) => {
    field.hidden = !field.dataset.for.split(" ").includes(key);
  });
  $("#recipients-field").hidden = !(key === "message" || key === "forward" || key === "signature_request");
  $("#whole-agency").parentElement.hidden = key === "signature_request";
  $("#recipient-input").previousElementSibling.textContent = key === "signature_request" ? "Add a signer" : "Add a colleague or team";
  $("#compose-subject-label").textContent = key === "message" ? "Subject" : "Title";
  $("#compose-body-label").textContent = key === "reminder" ? "Remind me to" : key === "forward" ? "Note (optional)" : "Message";
  $("#compose-send").textContent = key === "reminder" ? "Save reminder" : key === "announcement" ? "Post" : key === "signature_request" ? "Request signatures" : "Send";
}

function openCompose(context = { mode: "new" }) {
  // One Idempotency-Key per opened dialog: Send pressed again after a lost answer sends once.
  composeContext = { ...context, key: newIdempotencyKey() };
  recipients = [];
  const form = $("#compose-form");
  form.reset();
  renderChips();
  clearComposeErrors();
  composeContextView(composeContext);
  const kinds = state.board.compose || [];
  const select = $("#compose-kind");
  select.replaceChildren(...kinds.map((k) => h("option", { value: k, text: KIND_NAMES[k] || k })));
  $("#kind-field").hidden = context.mode !== "new";
  $("#recipient-options").replaceChildren(...recipientChoices().map((c) => h("option", { value: c.label })));
  const m = context.message;
  const titles = { new: "Compose", reply: "Reply", "reply-all": "Reply All", forward: "Forward" };
  $("#compose-title").textContent = titles[context.mode];
  if (m && context.mode !== "forward") $("#compose-title").textContent = `${titles[context.mode]}: ${m.subject || ""}`;
  setComposeKind(select.value || "message");
  $("#compose-dialog").showModal();
  (context.mode === "new" ? select : context.mode === "forward" ? $("#recipient-input") : $("#compose-body")).focus();
}

function linksFrom(text) { return text.split(/\s+/).map((l) => l.trim()).filter(Boolean); }

function confirmDialog(title, text, okText) {
  const dialog = $("#confirm-dialog");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = okText;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
}

async function submitCompose(event) {
  event.preventDefault();
  const mode = composeContext.mode;
  const kind = mode === "new" ? $("#compose-kind").value : "message";
  const body = $("#compose-body").value;
  const subject = $("#compose-subject").value.trim();
  const wholeAgency = $("#whole-agency").checked;
  const staffIds = recipients.filter((r) => r.type === "staff").map((r) => r.id);
  const teamIds = recipients.filter((r) => r.type === "team").map((r) => r.id);
  const urgent = $("#compose-urgent").checked ? "urgent" : "normal";
  const links = linksFrom($("#compose-links").value);
  let call;
  const once = { idempotencyKey: composeContext.key };
  if (mode === "reply" || mode === "reply-all") {
    if (!body.trim()) return fieldError("compose-body", "Write your reply before sending.");
    const path = `/api/v1/messages/${composeContext.message.message_id}/${mode}`;
    call = () => post(path, { body, priority: urgent, links }, once);
  } else if (mode === "forward") {
    if (!staffIds.length && !teamIds.length && !wholeAgency) return fieldError("recipient-input", "Add at least one colleague or team to forward it to.");
    const path = `/api/v1/messages/${composeContext.message.message_id}/forward`;
    call = () => post(path, { to_staff_ids: staffIds, to_team_ids: teamIds, to_whole_agency: wholeAgency, ...(body.trim() ? { body } : {}) }, once);
  } else if (kind === "message") {
    if (!staffIds.length && !teamIds.length && !wholeAgency) return fieldError("recipient-input", "Add at least one colleague or team, or choose Whole agency.");
    if (!subject) return fieldError("compose-subject", "Write a subject, so the message can be found later.");
    call = () => post("/api/v1/messages", { to_staff_ids: staffIds, to_team_ids: teamIds, to_whole_agency: wholeAgency, subject, body, priority: urgent, links }, once);
  } else if (kind === "reminder") {
    const remindAt = localInputToIso($("#compose-remind-at").value);
    if (!body.trim()) return fieldError("compose-body", "Write what you want to be reminded of.");
    if (!remindAt) return fieldError("compose-remind-at", "Choose the date and time of the reminder.");
    const link = $("#compose-reminder-link").value.trim();
    call = () => post("/api/v1/reminders", { text: body, remind_at: remindAt, ...(link ? { link } : {}) }, once);
  } else if (kind === "signature_request") {
    if (!staffIds.length) return fieldError("recipient-input", "Add at least one person who is to sign.");
    if (!subject) return fieldError("compose-subject", "Give the request a title.");
    if (!$("#compose-doc-ref").value.trim()) return fieldError("compose-doc-ref", "Give the document reference.");
    const due = localInputToIso($("#compose-due").value);
    call = () => post("/api/v1/signature-requests", {
      document_kind: $("#compose-doc-kind").value, title: subject, document_ref: $("#compose-doc-ref").value.trim(),
      signer_ids: staffIds, ...(due ? { due_at: due } : {}),
    }, once);
  } else if (kind === "announcement") {
    if (!subject) return fieldError("compose-subject", "Give the announcement a title.");
    if (!body.trim()) return fieldError("compose-body", "Write the text of the announcement.");
    const expires = localInputToIso($("#compose-expires").value);
    const ackBy = localInputToIso($("#compose-ack-by").value);
    if (ackBy && !$("#compose-ack").checked) return fieldError("compose-ack-by", "An acknowledge-by time needs \"Acknowledgement required\".");
    call = () => post("/api/v1/announcements", {
      title: subject, body, acknowledgement_required: $("#compose-ack").checked,
      ...(expires ? { expires_at: expires } : {}), ...(ackBy ? { acknowledge_by: ackBy } : {}),
    }, once);
  }
  if (wholeAgency && (kind === "message" || mode === "forward")) {
    const count = state.staff.length;
    const ok = await confirmDialog("Send to the whole agency?", `This goes to everyone at ${state.agency.name}${count ? ` (${count} staff)` : ""}.`, "Send to everyone");
    if (!ok) return;
  }
  clearComposeErrors();
  try {
    await call();
  } catch (error) {
    const field = error instanceof ApiError && FIELD_OF_CODE[error.code];
    if (field && !$(`#${field}`).closest("[hidden]")) fieldError(field, error.message);
    else showComposeError(error.status === 0 ? `Not sent: ${error.message}. Try again.` : `Not sent: ${error.message}`);
    return;
  }
  $("#compose-dialog").close();
  announce(mode === "new" && kind === "reminder" ? "Reminder saved" : mode === "new" && kind === "announcement" ? "Posted" : "Sent");
  await refreshBoard();
}

// --- retention (admins) -------------------------------------------------------------------
function isAdmin() { return !!(state.me && (state.me.roles || []).includes("admin")); }

function openRetention() {
  const body = $("#retention-body");
  body.replaceChildren(retentionPanel({ staff: state.staff }));
  $("#retention-dialog").showModal();
  $("#retention-dialog-title").focus();
}

// --- auto-reply ----------------------------------------------------------------------------
let autoReplyKind = "staff";
async function openAutoReply(kind) {
  autoReplyKind = kind;
  const dialog = $("#auto-reply-dialog");
  $("#auto-reply-title").textContent = kind === "staff" ? "Staff Auto-Reply" : `${term()} Auto-Reply`;
  const note = $("#auto-reply-note");
  const fields = $("#auto-reply-fields");
  note.textContent = "Loading…";
  fields.hidden = true;
  $("#auto-reply-save").hidden = true;
  dialog.showModal();
  let settings;
  try {
    settings = await get("/api/v1/auto-replies/me");
  } catch (error) {
    note.textContent = error instanceof ApiError && [404, 502, 503, 504].includes(error.status)
      ? "Auto-reply is not available yet on this system."
      : `Auto-reply settings could not be loaded: ${error.message}`;
    return;
  }
  const s = settings[kind] || {};
  $("#auto-reply-enabled").checked = !!s.enabled;
  $("#auto-reply-message").value = s.message || "";
  $("#auto-reply-starts").value = isoToLocalInput(s.starts_at);
  $("#auto-reply-ends").value = isoToLocalInput(s.ends_at);
  note.textContent = s.active ? "On now: messages are answered automatically." : "Off now.";
  fields.hidden = false;
  $("#auto-reply-save").hidden = false;
  $("#auto-reply-dialog section.coverage")?.remove();
  if (kind === "staff") $("#auto-reply-form").after(coveragePanel({ staff: state.staff, me: state.me.id }));
  $("#auto-reply-enabled").focus();
}

async function saveAutoReply(event) {
  event.preventDefault();
  const note = $("#auto-reply-note");
  const payload = {
    enabled: $("#auto-reply-enabled").checked,
    message: $("#auto-reply-message").value,
    starts_at: localInputToIso($("#auto-reply-starts").value),
    ends_at: localInputToIso($("#auto-reply-ends").value),
    time_zone: displayTimeZone(), // the zone the times above were entered in (the agency's)
  };
  try {
    const saved = await put(`/api/v1/auto-replies/me/${autoReplyKind}`, payload);
    note.textContent = saved.active ? "Saved. On now: messages are answered automatically." : "Saved. Off now.";
    announce("Auto-reply saved");
  } catch (error) {
    note.textContent = error instanceof ApiError && [404, 502, 503, 504].includes(error.status)
      ? "Auto-reply is not available yet on this system."
      : `Not saved: ${error.message}`;
  }
}

// --- my own away state: a banner on my board while an auto-reply or a coverage is on ------------
let awaySeq = 0;
async function refreshAwayBanner() {
  const mine = ++awaySeq;
  const [replies, coverage] = await Promise.all([
    get("/api/v1/auto-replies/me").catch(() => null), // auto-reply down: no banner for it
    get("/api/v1/board/coverage").catch(() => null),
  ]);
  if (mine !== awaySeq || $("#app").hidden) return;
  const until = (iso) => (iso ? ` until ${fullTime(iso)}` : "");
  const lines = [];
  if (replies && replies.staff && replies.staff.active) lines.push(`Your Staff Auto-Reply is on${until(replies.staff.ends_at)}.`);
  if (replies && replies.patient && replies.patient.active) lines.push(`Your ${term()} Auto-Reply is on${until(replies.patient.ends_at)}.`);
  const c = coverage && coverage.coverage;
  if (c && c.status === "active") lines.push(`${c.coverer.name} covers for you${until(c.ends_at)}.`);
  else if (c && c.status === "scheduled") lines.push(`${c.coverer.name} will cover for you from ${fullTime(c.starts_at)}${until(c.ends_at)}.`);
  const banner = $("#away-banner");
  banner.replaceChildren(...lines.map((text) => h("p", { text })),
    lines.length ? h("button", { type: "button", onclick: () => openAutoReply("staff") }, "Change") : null);
  banner.hidden = lines.length === 0;
}

// --- narrow windows: the folder list behind a menu button ------------------------------------
function showFolders(open) {
  $("#folders").classList.toggle("open", open);
  $("#folders-toggle").setAttribute("aria-expanded", String(open));
  if (open && window.matchMedia("(max-width: 600px)").matches) $("#folders button")?.focus();
}

// --- keyboard shortcuts --------------------------------------------------------------------
// j/k: next/previous item; r, a, f: Reply, Reply All, Forward; ?: the list of shortcuts. Not while
// typing in a field, with a modifier held, or with a dialog open.
function shortcut(event) {
  if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey || $("#app").hidden) return;
  const target = event.target;
  if (target instanceof HTMLElement && (target.isContentEditable || target.closest("input, textarea, select, [contenteditable]"))) return;
  if (document.querySelector("dialog[open]")) return;
  const key = event.key;
  if (key === "?") {
    event.preventDefault();
    $("#help-dialog").showModal();
  } else if (key === "j" || key === "k") {
    event.preventDefault();
    stepItem(key === "j" ? 1 : -1);
  } else if (key === "x") {
    // Select (or clear) the open item's row for a bulk action.
    const box = state.selected && [...$("#items").children].find((li) => li.dataset.id === state.selected)?.querySelector(".pick");
    if (!box) return;
    event.preventDefault();
    box.click();
  } else if (key === "r" || key === "a" || key === "f") {
    const button = $(`#pane [data-answer="${key}"]`);
    if (!button || $("#pane").getAttribute("aria-busy") === "true") return;
    event.preventDefault();
    button.click();
  }
}

function stepItem(step) {
  if (!state.items.length) return;
  const at = state.items.findIndex((i) => i.id === state.selected);
  const next = at < 0 ? 0 : Math.min(state.items.length - 1, Math.max(0, at + step));
  if (at === next) return;
  const item = state.items[next];
  const row = [...$("#items").children].find((li) => li.dataset.id === item.id);
  if (row) row.querySelector(".row").focus();
  openItem(item);
}

// --- wiring --------------------------------------------------------------------------------
function wireStatic() {
  $("#signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const note = $("#signin-note");
    try {
      await signIn($("#signin-username").value.trim(), $("#signin-password").value);
    } catch (error) {
      note.hidden = false;
      note.textContent = error.status === 401 ? "Wrong username or password."
        : error.status === 429 ? "Too many attempts. Wait a minute, then try again."
          : `Sign-in failed: ${error.message}`;
      return;
    }
    state.firstPaint = false;
    await enter();
  });
  $("#signout").addEventListener("click", async () => { await signOut(); showSignIn("You have signed out."); });
  $("#compose").addEventListener("click", () => openCompose());
  $("#refresh").addEventListener("click", () => refreshBoard().then(() => announce("Refreshed")));
  $("#staff-auto-reply").addEventListener("click", () => openAutoReply("staff"));
  $("#patient-auto-reply").addEventListener("click", () => openAutoReply("patient"));
  $("#auto-reply-form").addEventListener("submit", saveAutoReply);
  $("#auto-reply-dialog").addEventListener("close", () => refreshAwayBanner());
  $("#auto-reply-cancel").addEventListener("click", () => $("#auto-reply-dialog").close());
  $("#compose-form").addEventListener("submit", submitCompose);
  $("#compose-cancel").addEventListener("click", () => $("#compose-dialog").close());
  $("#compose-kind").addEventListener("change", (e) => setComposeKind(e.target.value));
  $("#recipient-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); addRecipientFromInput(); }
  });
  $("#recipient-input").addEventListener("change", () => addRecipientFromInput());
  // Enter in a one-line field (the subject, a reference) does not send: only the Send button does.
  $("#compose-form").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.target instanceof HTMLInputElement && event.target.id !== "recipient-input") event.preventDefault();
  });
  $("#help").addEventListener("click", () => $("#help-dialog").showModal());
  $("#folders-toggle").addEventListener("click", () => showFolders(!$("#folders").classList.contains("open")));
  document.addEventListener("keydown", shortcut);
  $("#label-form").addEventListener("submit", submitLabel);
  $("#label-cancel").addEventListener("click", () => $("#label-dialog").close());
  // "Stay signed in" restarts the idle timers the moment it is pressed: the dialog's close event
  // comes later, in a task of its own, and until then the timers armed before the warning still run.
  // The close event restarts them when the warning is closed another way (Escape, another tab), but
  // only if the warning is still closed when it arrives: a late one must not restart the timers
  // under a new warning shown meanwhile, which would then never sign out.
  $("#idle-stay").addEventListener("click", () => { if (state.idle) state.idle.reset(); });
  $("#idle-dialog").addEventListener("close", () => {
    if (state.idle && !$("#idle-dialog").open) state.idle.reset();
  });
  wireCloudAddresses();
  wireTeamOverview();
  $("#retention").addEventListener("click", openRetention);
  $("#retention-close").addEventListener("click", () => $("#retention-dialog").close());
  wireCloud({
    me: () => state.me, agency: () => state.agency, term,
    refreshBoard: () => { if (state.board) refreshBoard(); },
  });
  wireErx({
    erxFolderOpen: () => state.view.type === "folder" && state.view.id === "erx",
    refreshBoard: () => { if (state.board) refreshBoard(); },
  });
  $("#unread-only").addEventListener("change", (e) => { state.unreadOnly = e.target.checked; loadList(); });
  wireSearch({
    state: () => state, term,
    open: () => openView({ type: "search" }),
    back: () => openView({ type: "folder", id: "messages" }),
  });
  $("#sort-order").addEventListener("change", (e) => {
    state.order = e.target.value;
    state.cursor = null;
    loadList();
  });
  $("#select-all").addEventListener("change", (e) => selectAll(e.target.checked));
  $("#bulk-actions").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-bulk]");
    if (button) runBulk(button.dataset.bulk);
  });
  $("#mark-all-read").addEventListener("click", markAllRead);
  $("#more").addEventListener("click", () => loadList(true));
  // Arrow keys move between the rows of the list (Tab leaves it; Enter or Space opens a row).
  $("#items").addEventListener("keydown", (event) => {
    if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
    const rows = [...document.querySelectorAll("#items .row")];
    const at = rows.indexOf(document.activeElement);
    if (at < 0) return;
    event.preventDefault();
    const next = rows[Math.min(rows.length - 1, Math.max(0, at + (event.key === "ArrowDown" ? 1 : -1)))];
    next.focus();
  });
  // The next page loads when "Load more" scrolls into view (the viewport, clipped by the list pane
  // where the list pane scrolls), one page at a time.
  let loadingMore = false;
  new IntersectionObserver((entries) => {
    if (!entries.some((e) => e.isIntersecting) || !state.cursor || loadingMore) return;
    loadingMore = true;
    loadList(true).finally(() => { loadingMore = false; });
  }).observe($("#more"));
}

start();
