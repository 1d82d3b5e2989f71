// Sending from the board: the Direct message dialog (new, Reply, Forward; POST
// /api/v1/cloud/direct/outbound) and the Send Fax dialog (this fax, a PDF attachment, or an uploaded
// PDF; POST /api/v1/cloud/faxes/outbound). From lists only the caller's linked addresses and numbers.
import { newIdempotencyKey, post } from "./api.js";
import { $, announce, h } from "./dom.js";
import { ctx, linkedAddresses, readBase64, size, templateDialog, trouble } from "./cloud_common.js";

const MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024;
const MAX_TEXT_BYTES = 100 * 1024;
const MAX_PDF_BYTES = 20 * 1024 * 1024;
const MAX_RECIPIENTS = 10;
const ADDRESS = /^[^\s@,;<>]+@[^\s@,;<>]+\.[^\s@,;<>]+$/;

// The open dialogs, each with one Idempotency-Key for as long as it is open (api.js).
let direct = null;   // { mode, original, files: File[], key } of the open Direct dialog
let fax = null;      // { documents, key } of the open fax dialog
let sending = false;
const opens = {};    // dialog name -> fills it from its template

function showError(id, text) {
  const line = $(id);
  if (!line) return;  // the dialog closed meanwhile
  line.hidden = !text;
  line.textContent = text || "";
  if (text) line.scrollIntoView({ block: "nearest" });
}

function addressOption(a, selected) {
  const text = a.label ? `${a.label} (${a.address})` : a.address;
  return h("option", { value: a.address, text, selected: a.address === selected });
}

async function sendWith(button, call) {
  if (sending) return;
  sending = true;
  const label = button.textContent;
  button.setAttribute("aria-disabled", "true");
  button.textContent = "Sending…";
  try {
    await call();
  } finally {
    sending = false;
    button.removeAttribute("aria-disabled");
    button.textContent = label;
  }
}

// --- Direct ---------------------------------------------------------------------------------------
const prefixed = (prefix, subject) => (new RegExp(`^${prefix}:`, "i").test(subject || "") ? subject : `${prefix}: ${subject || ""}`.trim());

function forwardedText(m) {
  return `\n\n---------- Forwarded message ----------\nFrom: ${m.from}\nTo: ${(m.to || []).join(", ")}\nSubject: ${m.subject || ""}\n\n${m.text || ""}`;
}

export async function openDirectCompose(context) {
  const generation = ctx.generation;
  const addresses = await linkedAddresses("direct");
  if (generation !== ctx.generation) return;
  if (!addresses.length) throw new Error("You are not linked to a Direct address. An administrator links staff to addresses.");
  const { mode, original: m } = context;
  const reply = (m && m.reply) || {};
  direct = { mode, original: m || null, files: [], key: newIdempotencyKey() };
  opens.direct();
  const from = mode === "reply" ? (reply.from || (m.to || [])[0]) : null;
  $("#direct-from").replaceChildren(...addresses.map((a) => addressOption(a, from)));
  $("#direct-title").textContent = { new: "New Direct message", reply: `Reply: ${m && m.subject}`, forward: `Forward: ${m && m.subject}` }[mode];
  if (mode === "reply") {
    $("#direct-to").value = (reply.to || [m.from]).join(", ");
    $("#direct-subject").value = reply.subject || prefixed("Re", m.subject);
  } else if (mode === "forward") {
    $("#direct-subject").value = prefixed("Fwd", m.subject);
    $("#direct-text").value = forwardedText(m);
  }
  const forwardable = mode === "forward" ? (m.attachments || []) : [];
  $("#direct-forwarded").hidden = !forwardable.length;
  $("#direct-forwarded-list").replaceChildren(...forwardable.map((a) => h("label", { class: "inline" },
    h("input", { type: "checkbox", checked: true, dataset: { index: String(a.index) } }), `${a.filename} (${size(a.size)})`)));
  $("#direct-dialog").showModal();
  const first = mode === "reply" ? $("#direct-text") : $("#direct-to");
  first.focus();
  if (mode === "reply") first.setSelectionRange(0, 0);
}

function renderFiles() {
  $("#direct-file-list").replaceChildren(...direct.files.map((file, n) => h("li", { class: "chip" },
    h("span", { text: `${file.name} (${size(file.size)})` }),
    h("button", {
      type: "button", "aria-label": `Remove ${file.name}`,
      onclick: () => { direct.files.splice(n, 1); renderFiles(); $("#direct-files").focus(); },
    }, "×"))));
}

function directProblem(to, subject, text, files) {
  if (!to.length) return "Type at least one Direct address to send to.";
  if (to.length > MAX_RECIPIENTS) return `At most ${MAX_RECIPIENTS} addresses.`;
  const bad = to.find((a) => !ADDRESS.test(a));
  if (bad) return `“${bad}” is not a Direct address (it looks like name@direct.example.org).`;
  if (!subject) return "Write a subject.";
  if (!text.trim() && !files.length) return "Write a message or attach a file.";
  if (new TextEncoder().encode(text).length > MAX_TEXT_BYTES) return "The message text is too long (100 KB at most).";
  if (files.reduce((n, f) => n + f.size, 0) > MAX_ATTACHMENT_BYTES) return "The attachments are too large: 10 MB in all at most.";
  return null;
}

async function directBody(to, subject, text) {
  const { mode, original, files } = direct;
  const attachments = await Promise.all(files.map(async (file) => ({
    filename: file.name, content_type: file.type || "application/octet-stream", content_base64: await readBase64(file),
  })));
  const forwarded = [...$("#direct-forwarded-list").querySelectorAll("input:checked")]
    .map((box) => ({ message: original.id, index: Number(box.dataset.index) }));
  return {
    from: $("#direct-from").value, to, subject, text,
    ...(mode === "reply" ? { in_reply_to: original.id } : {}),
    ...(attachments.length ? { attachments } : {}),
    ...(forwarded.length ? { forward_attachments: forwarded } : {}),
  };
}

async function submitDirect(event) {
  event.preventDefault();
  if (!direct) return;
  const to = $("#direct-to").value.split(/[\s,;]+/).filter(Boolean);
  const subject = $("#direct-subject").value.trim();
  const text = $("#direct-text").value;
  const problem = directProblem(to, subject, text, direct.files);
  if (problem) { showError("#direct-error", problem); return; }
  const generation = ctx.generation;
  await sendWith($("#direct-send"), async () => {
    try {
      await post("/api/v1/cloud/direct/outbound", await directBody(to, subject, text), { idempotencyKey: direct.key });
    } catch (error) {
      if (generation === ctx.generation) showError("#direct-error", trouble(error, "Not sent"));
      return;
    }
    if (generation !== ctx.generation) return;
    $("#direct-dialog").close();
    announce(`Direct message to ${to[0]}${to.length > 1 ? ` and ${to.length - 1} more` : ""} queued for sending`);
    ctx.hooks.refreshBoard();
  });
}

// --- fax --------------------------------------------------------------------------------------------
export async function openFaxDialog(context) {
  const generation = ctx.generation;
  const numbers = await linkedAddresses("fax");
  if (generation !== ctx.generation) return;
  if (!numbers.length) throw new Error("You are not linked to a fax number. An administrator links staff to fax numbers.");
  fax = { documents: context.documents || [], key: newIdempotencyKey() };
  opens.fax();
  $("#fax-from").replaceChildren(...numbers.map((a) => addressOption(a, numbers[0].address)));
  const choices = fax.documents.map((d, n) => h("label", { class: "inline" },
    h("input", { type: "radio", name: "fax-document", value: String(n), checked: n === 0 }), d.label));
  choices.push(h("label", { class: "inline" },
    h("input", { type: "radio", name: "fax-document", value: "upload", id: "fax-upload", checked: !fax.documents.length }), "Upload a PDF"));
  $("#fax-documents").replaceChildren(...choices);
  $("#fax-dialog").showModal();
  $("#fax-to").focus();
}

// "+15555550123", "(555) 555-0123", "555.555.0123" → "+15555550123" or "5555550123"; null if neither.
function faxNumber(typed) {
  const compact = typed.replace(/[\s().-]/g, "");
  return /^(\+[1-9]\d{6,14}|\d{10})$/.test(compact) ? compact : null;
}

async function faxDocument() {
  const chosen = $("#fax-documents input:checked");
  if (chosen && chosen.value !== "upload") return { document: fax.documents[Number(chosen.value)].document };
  const file = $("#fax-file").files[0];
  if (!file) throw new Error("Choose the PDF to fax.");
  if (!(file.type === "application/pdf" || /\.pdf$/i.test(file.name))) throw new Error("Only PDF documents can be faxed.");
  if (file.size > MAX_PDF_BYTES) throw new Error("That PDF is too large to fax (20 MB at most).");
  return { pdf_base64: await readBase64(file), filename: file.name };
}

async function submitFax(event) {
  event.preventDefault();
  if (!fax) return;
  const to = faxNumber($("#fax-to").value);
  if (!to) { showError("#fax-error", "That is not a valid fax number: type +1 and 10 digits, or a 10-digit US number."); $("#fax-to").focus(); return; }
  const generation = ctx.generation;
  await sendWith($("#fax-send"), async () => {
    try {
      const document = await faxDocument();
      await post("/api/v1/cloud/faxes/outbound", { to, from_number: $("#fax-from").value, ...document },
        { idempotencyKey: fax.key });
    } catch (error) {
      if (generation === ctx.generation) showError("#fax-error", trouble(error, "Not sent"));
      return;
    }
    if (generation !== ctx.generation) return;
    $("#fax-dialog").close();
    announce(`Fax to ${to} queued for sending`);
    ctx.hooks.refreshBoard();
  });
}

// --- wiring -------------------------------------------------------------------------------------------
// The dialogs' contents come and go with each opening: their events are taken at the dialog.
function wireDialog(name, { submit, change }) {
  const dialog = $(`#${name}-dialog`);
  opens[name] = templateDialog(dialog, `${name}-template`, () => {
    if (name === "direct") direct = null;
    else fax = null;
  });
  dialog.addEventListener("submit", submit);
  dialog.addEventListener("click", (event) => { if (event.target.id === `${name}-cancel`) dialog.close(); });
  // A refusal is about what was typed: it goes once something is changed.
  dialog.addEventListener("input", () => showError(`#${name}-error`, ""));
  dialog.addEventListener("change", change);
}

export function wireSend() {
  wireDialog("direct", {
    submit: submitDirect,
    change: (event) => {
      if (event.target.id !== "direct-files" || !direct) return;
      direct.files.push(...event.target.files);
      event.target.value = "";
      renderFiles();
    },
  });
  wireDialog("fax", {
    submit: submitFax,
    change: (event) => { if (event.target.id === "fax-file") { const upload = $("#fax-upload"); if (upload) upload.checked = true; } },
  });
}

export function stopSend() {
  sending = false;
  ["#direct-dialog", "#fax-dialog"].forEach((selector) => { if ($(selector).open) $(selector).close(); });
}
