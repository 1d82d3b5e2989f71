// The triage suggestion on a received Direct message or fax (GET /api/v1/cloud/triage/<document id>):
// the suggested patient and document type with "Confirm" (one click) and "Correct…" (a dialog with a
// patient search, GET /api/v1/cloud/patients?q=, and the document type), then who confirmed it and
// when, or that it was filed automatically, and the team it was routed to. "Patient" is the agency's
// own word for it (its terminology). While the document is still being read it says "Analysing…".
import { ApiError, get, post } from "./api.js";
import { $, announce, h } from "./dom.js";
import { birthDate, ctx, isCurrent, shortTime, templateDialog, trouble } from "./cloud_common.js";

const TYPES = {
  referral: "Referral", lab_report: "Lab report", records_request: "Records request",
  prescription_request: "Prescription request", other: "Other",
};
const MATCHED = { name: "name", birth_date: "date of birth", mrn: "MRN" };
const PENDING_POLLS = 5;
const PENDING_MS = 2000;

let correcting = null;   // { section, documentId, generation } of the open Correct dialog
let fillDialog = () => {};
let busy = false;

const term = () => ctx.hooks.term();
const path = (documentId) => `/api/v1/cloud/triage/${encodeURIComponent(documentId)}`;

export function patientText(p) {
  if (!p) return "";
  return [p.name, p.birth_date ? `DOB ${birthDate(p.birth_date)}` : "", p.mrn ? `MRN ${p.mrn}` : ""].filter(Boolean).join(" · ");
}

export function triagePanel(documentId) {
  const headingId = `triage-heading-${documentId}`;
  const section = h("section", { class: "triage", "aria-labelledby": headingId, "aria-busy": "true", dataset: { document: documentId } },
    h("h3", { id: headingId, text: "Triage" }), h("p", { class: "meta", text: "Loading the suggestion…" }));
  load(section, documentId, ctx.generation, 0);
  return section;
}

async function load(section, documentId, generation, polls) {
  let view;
  try {
    view = await get(path(documentId));
  } catch (error) {
    if (!isCurrent(generation, section)) return;
    // Not triaged for this person (or no triage on this system): no panel.
    if (error instanceof ApiError && error.status === 404) { section.remove(); return; }
    fill(section, [h("p", { class: "error", text: trouble(error, "Could not load the suggestion") })]);
    return;
  }
  if (isCurrent(generation, section)) render(section, view, generation, polls);
}

function fill(section, parts) {
  section.replaceChildren(section.querySelector("h3"), ...parts.filter(Boolean));
  section.removeAttribute("aria-busy");
}

function typeLine(type, confidence) {
  if (!type) return null;
  const sure = confidence !== undefined && confidence !== null && type !== "other" ? ` (${Math.round(confidence * 100)}%)` : "";
  return h("p", { class: "triage-type" }, h("strong", { text: "Document type: " }), `${TYPES[type] || type}${sure}`);
}

// Why a suggestion waits for a person (triage/README.md, "Review reasons"), in words.
const REASONS = {
  multiple_patients: "More than one patient is named in this document: check which one it is about.",
  partly_read: "Part of this document could not be read: check the pages before confirming.",
  suffix_not_in_roster: "The document gives a Jr./Sr. suffix that the record lacks: it may be a parent or child.",
  test_fax: "This is a test fax from the provider: it is not filed or routed.",
};

function reasonsNote(reasons) {
  const said = (reasons || []).map((r) => REASONS[r] || r);
  return said.length ? h("ul", { class: "triage-reasons", "aria-label": "Check before confirming" },
    ...said.map((text) => h("li", { text }))) : null;
}

function button(text, run, primary = false) {
  return h("button", { type: "button", class: primary ? "primary" : null, text, onclick: (event) => run(event.currentTarget) });
}

function render(section, view, generation, polls) {
  const id = view.document_id || section.dataset.document;
  const s = view.suggestion;
  const word = term().toLowerCase();
  const correct = (text) => button(text, () => openCorrect(section, id, view));
  if (view.state === "pending") {
    if (polls < PENDING_POLLS) {
      fill(section, [h("p", { class: "meta", role: "status", text: "Analysing…" })]);
      setTimeout(() => { if (isCurrent(generation, section)) load(section, id, generation, polls + 1); }, PENDING_MS);
    } else {
      fill(section, [h("p", { class: "meta", role: "status", text: "Still analysing." }),
        h("div", { class: "pane-actions" }, button("Check again", () => load(section, id, generation, 0)))]);
    }
    return;
  }
  if (view.state === "confirmed" && view.confirmed) {
    const c = view.confirmed;
    const who = c.automatic || !c.by
      ? `Filed automatically${c.at ? ` at ${shortTime(c.at)}` : ""}`
      : `Confirmed by ${c.by.name}${c.at ? ` at ${shortTime(c.at)}` : ""}`;
    fill(section, [
      h("p", {}, h("strong", { text: `${term()}: ` }), patientText(c.patient)),
      typeLine(c.document_type),
      h("p", { class: "triage-outcome", tabindex: "-1", text: who }),
      view.routed_to ? h("p", { class: "meta", text: `Routed to ${view.routed_to.team_name || view.routed_to.team_id}` }) : null,
      h("div", { class: "pane-actions" }, correct("Correct…")),
    ]);
    return;
  }
  if (s && s.patient) {
    const percent = Math.round((s.confidence || 0) * 100);
    const on = (s.matched_on || []).map((m) => MATCHED[m] || m).join(", ");
    fill(section, [
      h("p", { class: "triage-suggestion" }, h("strong", { text: `Suggested ${word}: ` }),
        `${patientText(s.patient)} — ${percent}% match${on ? ` (${on})` : ""}`),
      typeLine(s.document_type, s.document_type_confidence),
      reasonsNote(s.reasons),
      h("div", { class: "pane-actions" },
        button("Confirm", (b) => confirm(section, id, { patient_id: s.patient.id, document_type: s.document_type || "other" }, b)
          .catch(() => { /* said beside the button */ }), true),
        correct("Correct…")),
    ]);
    return;
  }
  fill(section, [
    h("p", {}, `No matching ${word} found.`),
    s ? typeLine(s.document_type, s.document_type_confidence) : null,
    h("div", { class: "pane-actions" }, correct(`Choose ${word}…`)),
  ]);
}

async function confirm(section, documentId, choice, control, done = "Filing confirmed") {
  if (busy) return null;
  busy = true;
  control?.setAttribute("aria-disabled", "true");
  const generation = ctx.generation;
  try {
    const view = await post(`${path(documentId)}/confirm`, choice);
    if (!isCurrent(generation, section)) return view;
    render(section, view, generation, 0);
    section.querySelector(".triage-outcome")?.focus();
    announce(done);
    return view;
  } catch (error) {
    if (!isCurrent(generation)) return null;
    control?.removeAttribute("aria-disabled");
    if (control) {
      section.querySelector(".triage-error")?.remove();
      section.append(h("p", { class: "error triage-error", role: "alert", text: trouble(error, "Not confirmed") }));
    }
    throw error;
  } finally {
    busy = false;
  }
}

// --- Correct… ---------------------------------------------------------------------------------------
function patientChoice(p, checked) {
  return h("label", { class: "inline choice" },
    h("input", { type: "radio", name: "triage-patient", value: p.id, checked }), patientText(p));
}

function showChoices(patients, chosenId) {
  $("#triage-results").replaceChildren(...patients.map((p, n) => patientChoice(p, chosenId ? p.id === chosenId : n === 0)));
}

function openCorrect(section, documentId, view) {
  correcting = { section, documentId, generation: ctx.generation };
  const word = term().toLowerCase();
  fillDialog();
  $("#triage-type").replaceChildren(...Object.entries(TYPES).map(([value, text]) => h("option", { value, text })));
  $("#triage-search-label").textContent = `Find a ${word} (name or MRN)`;
  $("#triage-results-legend").textContent = term();
  const s = view.suggestion || {};
  const current = (view.confirmed && view.confirmed.patient) || s.patient || null;
  const known = [current, s.patient, ...(view.candidates || []).map((c) => c.patient || c)].filter(Boolean);
  const unique = known.filter((p, n) => known.findIndex((q) => q.id === p.id) === n);
  showChoices(unique, current && current.id);
  $("#triage-results-note").textContent = unique.length ? "" : `Search for the ${word} above.`;
  $("#triage-type").value = (view.confirmed && view.confirmed.document_type) || s.document_type || "other";
  $("#triage-dialog").showModal();
  $("#triage-search").focus();
}

async function search() {
  const q = $("#triage-search").value.trim();
  const note = $("#triage-results-note");
  if (!q) { note.textContent = "Type a name or an MRN."; return; }
  note.textContent = "Searching…";
  const generation = ctx.generation;
  let answer;
  try {
    answer = await get(`/api/v1/cloud/patients?${new URLSearchParams({ q })}`);
  } catch (error) {
    if (generation === ctx.generation) note.textContent = trouble(error, "Could not search");
    return;
  }
  if (generation !== ctx.generation || !correcting) return;
  const patients = answer.patients || [];
  showChoices(patients, null);
  const word = term().toLowerCase();
  note.textContent = patients.length ? `${patients.length} found.` : `No ${word} matches “${q}”.`;
}

async function submitCorrect(event) {
  event.preventDefault();
  if (!correcting) return;
  const chosen = $("#triage-results input:checked");
  const say = (text) => {
    const error = $("#triage-error");
    if (error) { error.hidden = false; error.textContent = text; }
  };
  if (!chosen) { say(`Choose the ${term().toLowerCase()}.`); return; }
  const { section, documentId } = correcting;
  try {
    await confirm(section, documentId, { patient_id: chosen.value, document_type: $("#triage-type").value }, null, "Filing saved");
  } catch (failure) {
    say(trouble(failure, "Not saved"));
    return;
  }
  $("#triage-dialog").close();
  section.querySelector(".triage-outcome")?.focus();
}

// The dialog's contents come and go with each opening: its events are taken at the dialog.
export function wireTriage() {
  const dialog = $("#triage-dialog");
  fillDialog = templateDialog(dialog, "triage-template", () => { correcting = null; });
  dialog.addEventListener("submit", submitCorrect);
  dialog.addEventListener("click", (event) => {
    if (event.target.id === "triage-cancel") dialog.close();
    if (event.target.id === "triage-search-go") search();
  });
  dialog.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.target.id === "triage-search") { event.preventDefault(); search(); }
  });
}

export function stopTriage() {
  busy = false;
  if ($("#triage-dialog").open) $("#triage-dialog").close();
}
