// Search across the whole board: the search field above the list, its Filters panel, and the
// request for a page of results (GET /api/v1/board/search, services/inbox/README.md). Results are
// board items, and on the first page the matching announcements: the list draws and opens them like
// any folder's rows.
import { $, h } from "./dom.js";

const KINDS = [
  ["", "Any kind"], ["message", "Message"], ["portal_message", "{term} portal message"], ["notice", "Notification"],
  ["reminder", "Reminder"], ["signature_request", "Signature request"], ["signature_outcome", "Signature outcome"],
  ["announcement", "Announcement"],
];
const MAX_LIMIT = 50; // the most the search API answers in one page

let params = null; // the search shown (URLSearchParams without cursor and limit), or null
let ctx = null;

// A local date (YYYY-MM-DD from a date field) as the ISO time of its start, or of the next day's.
function dayStart(value, next = false) {
  const [y, m, d] = value.split("-").map(Number);
  return new Date(y, m - 1, d + (next ? 1 : 0)).toISOString();
}

function fillChoices() {
  const state = ctx.state();
  const term = ctx.term();
  $("#search-patient-label").textContent = term;
  const sender = $("#search-sender");
  const chosen = sender.value;
  sender.replaceChildren(h("option", { value: "", text: "Anyone" }),
    ...(state.staff || []).map((s) => h("option", { value: s.id, text: s.display_name, selected: s.id === chosen })));
  const label = $("#search-label");
  const picked = label.value;
  label.replaceChildren(h("option", { value: "", text: "Any label" }),
    ...((state.board && state.board.labels) || []).map((l) => h("option", { value: l.id, text: l.name, selected: l.id === picked })));
  const kind = $("#search-kind");
  const was = kind.value;
  kind.replaceChildren(...KINDS.map(([value, text]) => h("option", { value, text: text.replace("{term}", term), selected: value === was })));
}

// The Filters panel is in the page only while it is open (made from its template, removed on
// closing, which clears the filters): its fields never stand beside the compose dialog's or the
// list's own ("Kind", "Urgent", "Unread only") for anything that finds fields by their label.
function filtersOpen() { return Boolean(document.getElementById("search-filters")); }

function showFilters(open) {
  if (open && !filtersOpen()) {
    $("#search-filters-slot").append($("#search-filters-template").content.cloneNode(true));
    fillChoices();
  }
  if (!open) document.getElementById("search-filters")?.remove();
  $("#search-filters-toggle").setAttribute("aria-expanded", String(open));
}

function value(selector) {
  const field = document.querySelector(selector);
  return field ? field.value.trim() : "";
}

function ticked(selector) {
  const field = document.querySelector(selector);
  return Boolean(field && field.checked);
}

function fromForm() {
  const q = new URLSearchParams();
  const text = $("#search-q").value.trim();
  if (text) q.set("q", text);
  const fields = { sender_id: "#search-sender", patient: "#search-patient", kind: "#search-kind", label_id: "#search-label" };
  for (const [name, selector] of Object.entries(fields)) {
    if (value(selector)) q.set(name, value(selector));
  }
  if (value("#search-from")) q.set("from", dayStart(value("#search-from")));
  if (value("#search-to")) q.set("to", dayStart(value("#search-to"), true));
  if (ticked("#search-urgent")) q.set("urgent", "true");
  if (ticked("#search-unread")) q.set("unread", "true");
  return q;
}

// The page of results after `cursor` (the first page without one).
export function searchPath(cursor, limit) {
  const q = new URLSearchParams(params || undefined);
  q.set("limit", String(Math.min(limit, MAX_LIMIT)));
  if (cursor) q.set("cursor", cursor);
  return `/api/v1/board/search?${q}`;
}

// What a screen reader hears when a search's first page is drawn.
export function searchSummary(count, more) {
  if (!count) return more ? "No results yet: Load more searches further" : "No results";
  return `${count} ${count === 1 ? "result" : "results"}${more ? ", more to load" : ""}`;
}

// The list's note when a search found nothing.
export function searchNote(capped, more) {
  if (capped && more) return "No results in the part of the board searched so far. Load more searches further.";
  return "No items match the search.";
}

// The list head while results are shown: Clear search instead of the folder's own tools.
export function showSearching(searching) {
  $("#search-clear").hidden = !searching;
  $("#unread-only").closest("label").hidden = searching;
  if (!searching) params = null;
}

// Nothing of a signed-out person's search stays in the page.
export function clearSearch() {
  params = null;
  $("#search-form").reset();
  showFilters(false);
  $("#search-error").hidden = true;
}

// `state()`: the page's state (staff, board labels); `term()`: the agency's word for a patient;
// `open()`: show the results; `back()`: leave them (the Messages folder).
export function wireSearch(context) {
  ctx = context;
  $("#search-filters-toggle").addEventListener("click", () => showFilters(!filtersOpen()));
  $("#search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = fromForm();
    const error = $("#search-error");
    if (!q.has("q") && !q.has("sender_id") && !q.has("patient")) {
      error.textContent = `Type words to look for, or choose a sender or a ${ctx.term().toLowerCase()}.`;
      error.hidden = false;
      $("#search-q").focus();
      return;
    }
    error.hidden = true;
    params = q;
    ctx.open();
  });
  $("#search-clear").addEventListener("click", () => {
    clearSearch();
    ctx.back();
  });
}
