// Search across the whole board: the search field above the list, its Filters panel, and the
// request for a page of results (GET /api/v1/board/search, services/inbox/README.md). Results are
// board items: the list draws and opens them like any folder's rows.
import { $, h } from "./dom.js";

const KINDS = [
  ["", "Any kind"], ["message", "Message"], ["portal_message", "{term} portal message"], ["notice", "Notification"],
  ["reminder", "Reminder"], ["signature_request", "Signature request"], ["signature_outcome", "Signature outcome"],
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

function showFilters(open) {
  if (open) fillChoices();
  $("#search-filters").hidden = !open;
  $("#search-filters-toggle").setAttribute("aria-expanded", String(open));
}

function fromForm() {
  const q = new URLSearchParams();
  const text = $("#search-q").value.trim();
  if (text) q.set("q", text);
  const fields = { sender_id: "#search-sender", patient: "#search-patient", kind: "#search-kind", label_id: "#search-label" };
  for (const [name, selector] of Object.entries(fields)) {
    const value = $(selector).value.trim();
    if (value) q.set(name, value);
  }
  if ($("#search-from").value) q.set("from", dayStart($("#search-from").value));
  if ($("#search-to").value) q.set("to", dayStart($("#search-to").value, true));
  if ($("#search-urgent").checked) q.set("urgent", "true");
  if ($("#search-unread").checked) q.set("unread", "true");
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
  $("#search-filters-toggle").addEventListener("click", () => showFilters($("#search-filters").hidden));
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
