// Cloud Communications in the reading pane: Direct messages and faxes, received and sent, drawn from
// cloud-comms' views (the board item links to them) with their actions (Reply, Forward, Send Fax,
// the triage suggestion), and the Cloud Communications folder's "New Direct message" and "Send a
// fax". Attachments and PDFs are fetched with the bearer token. Text is set as text only.
import { get } from "./api.js";
import { $, announce, h } from "./dom.js";
import { ctx, isCurrent, linkedAddresses, longTime, openPdf, saveFile, shortTime, size, trouble } from "./cloud_common.js";
import { openDirectCompose, openFaxDialog, stopSend, wireSend } from "./cloud_send.js";
import { stopTriage, triagePanel, wireTriage } from "./cloud_triage.js";

const ID = "([A-Za-z0-9_-]+)";
const VIEWS = [
  [new RegExp(`^/api/v1/cloud/direct/outbound/${ID}$`), "direct-out"],
  [new RegExp(`^/api/v1/cloud/faxes/outbound/${ID}$`), "fax-out"],
  [new RegExp(`^/api/v1/cloud/direct/${ID}$`), "direct"],
  [new RegExp(`^/api/v1/cloud/faxes/${ID}$`), "fax"],
];
const POLL_MS = 3000;
const POLL_TIMES = 40;  // about two minutes; the item's own status keeps changing on the board after that
const DIRECT_WORDS = { queued: "Queued", sent: "Sent", processed: "Received by their system", dispatched: "Delivered", failed: "Failed" };
const FAX_WORDS = {
  queued: "Queued", sending: "Sending", inprogress: "Sending", success: "Delivered", failure: "Failed",
  test: "Test mode: not transmitted",
};
const DIRECT_OPEN = ["queued", "sent", "processed"];
const FAX_OPEN = ["queued", "sending", "inprogress"];
const NAMES = { direct: "Direct message", "direct-out": "Sent Direct message", fax: "Fax", "fax-out": "Sent fax" };

// The cloud-comms view an item's link points to (by its path, whatever its host), or null.
function cloudView(link) {
  let path;
  try { path = new URL(String((link && link.url) || link || ""), window.location.origin).pathname; } catch { return null; }
  for (const [pattern, kind] of VIEWS) {
    const match = pattern.exec(path);
    if (match) return { kind, id: match[1], path };
  }
  return null;
}

// The panel for a delivered item that links to a cloud-comms view; null for any other item.
export function cloudPanel(item) {
  const view = (item.links || []).map(cloudView).find(Boolean);
  if (!view) return null;
  const section = h("section", { class: "cloud", "aria-label": NAMES[view.kind], "aria-busy": "true" },
    h("p", { class: "meta", text: "Loading…" }));
  load(section, view, ctx.generation, 0, "");
  return section;
}

// Asked again while a sent message or fax is on its way; drawn again only when the answer changed,
// with the keyboard focus kept on the same button.
async function load(section, view, generation, polls, before) {
  let answer;
  try {
    answer = await get(view.path);
  } catch (error) {
    if (!isCurrent(generation, section)) return;
    section.removeAttribute("aria-busy");
    if (polls === 0) section.replaceChildren(h("p", { class: "error", role: "alert", text: trouble(error, "Could not open it") }));
    return;
  }
  if (!isCurrent(generation, section)) return;
  const seen = JSON.stringify(answer);
  if (seen !== before) draw(section, view.kind, answer);
  const open = view.kind === "direct-out" ? stillMoving(answer) : view.kind === "fax-out" && FAX_OPEN.includes(answer.status);
  if (open && polls < POLL_TIMES) setTimeout(() => load(section, view, generation, polls + 1, seen), POLL_MS);
}

function draw(section, kind, answer) {
  const focused = section.contains(document.activeElement) ? document.activeElement.textContent : null;
  const parts = { direct: directIn, "direct-out": directOut, fax: faxIn, "fax-out": faxOut }[kind](answer);
  section.replaceChildren(...parts.filter(Boolean));
  section.removeAttribute("aria-busy");
  if (focused) [...section.querySelectorAll("button")].find((b) => b.textContent === focused)?.focus();
}

function stillMoving(message) {
  const recipients = message.recipients || [];
  return DIRECT_OPEN.includes(message.status) || recipients.some((r) => DIRECT_OPEN.includes(r.status));
}

// --- pieces -------------------------------------------------------------------------------------
function meta(label, value) {
  return value ? h("p", { class: "meta" }, h("strong", { text: `${label}: ` }), value) : null;
}

function actionButton(text, run, primary = false) {
  const button = h("button", { type: "button", class: primary ? "primary" : null, text });
  button.addEventListener("click", async () => {
    const row = button.closest(".cloud");
    row?.querySelector(".cloud-error")?.remove();
    try {
      await run(button);
    } catch (error) {
      row?.prepend(h("p", { class: "error cloud-error", role: "alert", text: trouble(error, `${text}: not done`) }));
    }
  });
  return button;
}

const isPdf = (a) => /pdf/i.test(a.content_type || "") || /\.pdf$/i.test(a.filename || "");

function attachmentList(attachments) {
  if (!(attachments || []).length) return [];
  return [
    h("h3", { text: `Attachments (${attachments.length})` }),
    h("ul", { class: "attachments" }, attachments.map((a) => h("li", {},
      actionButton(`Download ${a.filename}`, () => saveFile(a.url, a.filename)),
      isPdf(a) ? actionButton(`View ${a.filename}`, () => openPdf(a.url)) : null,
      h("span", { class: "meta", text: [a.content_type, size(a.size)].filter(Boolean).join(" · ") })))),
  ];
}

function statusWords(words, status, detail) {
  const said = words[status] || status || "";
  return detail && (status === "failed" || status === "failure") ? `${said}: ${detail}` : said;
}

// rows: [time, state in words, what else is known (recipient, detail)].
function history(title, rows) {
  if (!rows.length) return [];
  return [h("h3", { text: title }), h("ol", { class: "trail" }, rows.map(([at, state, more]) =>
    h("li", {}, h("time", { datetime: at || "", text: longTime(at) }), h("strong", { class: "state", text: state }),
      more ? h("span", { class: "more", text: ` · ${more}` }) : null))),
  ];
}

// --- Direct ---------------------------------------------------------------------------------------
function directIn(m) {
  const pdfs = (m.attachments || []).filter(isPdf);
  const actions = h("div", { class: "pane-actions" },
    actionButton("Reply", () => openDirectCompose({ mode: "reply", original: m }), true),
    actionButton("Forward", () => openDirectCompose({ mode: "forward", original: m })),
    pdfs.length ? actionButton("Send Fax", () => openFaxDialog({
      documents: pdfs.map((a) => ({ label: a.filename, document: { kind: "direct", id: m.id, index: a.index } })),
    })) : null);
  return [
    meta("From", m.from), meta("To", (m.to || []).join(", ")), meta("Subject", m.subject),
    meta("Date", longTime(m.date || m.received_at)), meta("Received", m.date ? longTime(m.received_at) : null),
    actions,
    h("div", { class: "body", text: m.text || "" }),
    ...attachmentList(m.attachments),
    triagePanel(m.id),
  ];
}

function directOut(m) {
  const by = m.created_by && m.created_by.name;
  const status = statusWords(DIRECT_WORDS, m.status, m.status_detail);
  const recipients = (m.recipients || []).map((r) => h("li", {},
    h("span", { class: "address", text: r.address }), " — ",
    h("strong", { text: statusWords(DIRECT_WORDS, r.status, r.status === "failed" ? (r.detail || m.status_detail) : "") }),
    r.updated_at ? h("span", { class: "meta", text: ` (${shortTime(r.updated_at)})` }) : null));
  const trail = (m.trail || []).map((t) => [t.at, DIRECT_WORDS[t.state] || t.state, [t.recipient, t.detail].filter(Boolean).join(" · ")]);
  return [
    meta("From", m.from), meta("To", (m.to || []).join(", ")), meta("Subject", m.subject),
    meta("Sent", `${longTime(m.created_at)}${by ? ` by ${by}` : ""}`),
    h("p", { class: `cloud-status ${m.status === "failed" ? "failed" : ""}`, role: "status" },
      h("strong", { text: "Status: " }), status),
    recipients.length ? h("h3", { text: "Recipients" }) : null,
    recipients.length ? h("ul", { class: "recipients" }, recipients) : null,
    h("div", { class: "body", text: m.text || "" }),
    ...attachmentList(m.attachments),
    ...history("History", trail),
  ];
}

// --- faxes ----------------------------------------------------------------------------------------
function faxIn(f) {
  const caller = [f.from_number, f.caller_name].filter(Boolean).join(" · ");
  const pages = f.pages ? `${f.pages} page${f.pages === 1 ? "" : "s"}` : "";
  return [
    meta("From", caller), meta("To", f.to_number), meta("Pages", f.pages ? String(f.pages) : null), meta("Received", longTime(f.received_at)),
    h("div", { class: "pane-actions" },
      actionButton("View PDF", () => openPdf(f.pdf_url), true),
      actionButton("Download PDF", () => saveFile(f.pdf_url, `fax-${f.id}.pdf`)),
      actionButton("Send Fax", () => openFaxDialog({
        documents: [{ label: `This fax${pages ? ` (${pages})` : ""}`, document: { kind: "fax", id: f.id } }],
      }))),
    triagePanel(f.id),
  ];
}

function faxOut(f) {
  const by = f.created_by && f.created_by.name;
  const rows = (f.history || []).map((s) => [s.at, FAX_WORDS[s.status] || s.status, s.detail]);
  return [
    meta("To", f.to_number), meta("From", f.from_number),
    meta("Pages", f.pages ? String(f.pages) : null),
    meta("Sent", `${longTime(f.created_at)}${by ? ` by ${by}` : ""}`),
    h("p", { class: `cloud-status ${f.status === "failure" ? "failed" : ""}`, role: "status" },
      h("strong", { text: "Status: " }), statusWords(FAX_WORDS, f.status, f.failure_reason)),
    f.pdf_url ? h("div", { class: "pane-actions" }, actionButton("View PDF", () => openPdf(f.pdf_url))) : null,
    ...history("History", rows),
  ];
}

// --- the folder's buttons ---------------------------------------------------------------------------
// Shown in the Cloud Communications folder, each only to staff linked to an address of its kind.
export async function showCloudFolderActions(on) {
  const bar = $("#cloud-folder-actions");
  if (!on) { bar.hidden = true; return; }
  const generation = ctx.generation;
  let direct = [];
  let fax = [];
  try {
    [direct, fax] = await Promise.all([linkedAddresses("direct"), linkedAddresses("fax")]);
  } catch { /* no buttons: nothing to send from */ }
  if (generation !== ctx.generation) return;
  $("#cloud-new-direct").hidden = !direct.length;
  $("#cloud-new-fax").hidden = !fax.length;
  bar.hidden = !(direct.length || fax.length);
}

export function wireCloud(hooks) {
  ctx.hooks = hooks;
  wireSend();
  wireTriage();
  const opening = (open) => () => open().catch((error) => announce(trouble(error, "Cannot send"), { error: true }));
  $("#cloud-new-direct").addEventListener("click", opening(() => openDirectCompose({ mode: "new" })));
  $("#cloud-new-fax").addEventListener("click", opening(() => openFaxDialog({ documents: [] })));
}

export function stopCloud() {
  ctx.generation += 1;
  $("#cloud-folder-actions").hidden = true;
  stopSend();
  stopTriage();
}
