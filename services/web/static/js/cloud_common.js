// Shared by the Cloud Communications modules (cloud.js, cloud_send.js, cloud_triage.js): the page's
// hooks, times in the agency's time zone, refusals in words, the signed-in person's linked Direct
// addresses and fax numbers, and files fetched with the bearer token (a plain link to the API would
// carry none) handed to the browser as Blob URLs.
import { ApiError, get, getBlob } from "./api.js";

// hooks: { me(), agency(), term(), refreshBoard() } from app.js. generation changes on sign-out:
// answers and polls for the earlier person are dropped.
export const ctx = { hooks: null, generation: 0 };

export const isCurrent = (generation, node) => generation === ctx.generation && (!node || node.isConnected);

// --- times ------------------------------------------------------------------------------------
function zone() {
  const agency = ctx.hooks && ctx.hooks.agency();
  return (agency && agency.time_zone) || undefined;
}

function valid(iso) {
  const date = iso ? new Date(iso) : null;
  return date && !Number.isNaN(date.getTime()) ? date : null;
}

// "Mar 3, 2025, 10:42 AM CST": the agency's zone, named.
export function longTime(iso) {
  const date = valid(iso);
  if (!date) return "";
  return date.toLocaleString([], {
    timeZone: zone(), year: "numeric", month: "short", day: "numeric", hour: "numeric", minute: "2-digit", timeZoneName: "short",
  });
}

// "10:42 AM" today (in the agency's zone), else "Mar 3, 10:42 AM".
export function shortTime(iso) {
  const date = valid(iso);
  if (!date) return "";
  const day = (d) => d.toLocaleDateString("en-CA", { timeZone: zone() });
  const today = day(date) === day(new Date());
  return date.toLocaleString([], {
    timeZone: zone(), hour: "numeric", minute: "2-digit", ...(today ? {} : { month: "short", day: "numeric" }),
  });
}

// A date of birth ("1984-03-12", no time and no zone) in the browser's date format: "03/12/1984".
export function birthDate(ymd) {
  const match = /^(\d{4})-(\d{2})-(\d{2})$/.exec(ymd || "");
  if (!match) return ymd || "";
  const date = new Date(Date.UTC(Number(match[1]), Number(match[2]) - 1, Number(match[3])));
  return date.toLocaleDateString([], { timeZone: "UTC", year: "numeric", month: "2-digit", day: "2-digit" });
}

export function size(bytes) {
  if (!(bytes >= 0)) return "";
  if (bytes < 1024) return `${bytes} bytes`;
  if (bytes < 1024 * 1024) return `${Math.round(bytes / 1024)} KB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

// --- refusals in words ------------------------------------------------------------------------
const WORDS = {
  recipient_certificate_unknown: "No trusted certificate for that address: it cannot receive encrypted Direct messages from us.",
  not_linked: "You are not linked to that address or number. An administrator links staff to addresses.",
  invalid_address: "That is not a valid Direct address (it looks like name@direct.example.org).",
  direct_message_not_found: "The original message is no longer available to you.",
  fax_not_found: "That fax is no longer available to you.",
  document_not_found: "That document is no longer available to you.",
  attachment_not_found: "That attachment is no longer available.",
  invalid_number: "That is not a valid fax number: type +1 and 10 digits, or a 10-digit US number.",
  not_a_pdf: "Only PDF documents can be faxed.",
  encrypted_pdf: "That PDF is password-protected: save it without a password, then fax it.",
  destination_not_allowed: "That number cannot be faxed from here (premium-rate, service or international numbers are blocked).",
  from_number_required: "Choose the fax number to send from.",
  payload_too_large: "Too large to send: attachments may be 10 MB in all, a faxed PDF 20 MB.",
  fax_too_large: "That PDF is too large to fax (20 MB at most).",
  too_many: "Too many recipients: 10 at most.",
  patient_not_found: "That patient is no longer on the roster.",
  invalid_document_type: "Choose one of the listed document types.",
};

// What went wrong, in words staff can act on; `what` names the action ("Not sent").
export function trouble(error, what = "") {
  const lead = what ? `${what}: ` : "";
  if (!(error instanceof ApiError)) return `${lead}${error.message}`;
  if (error.status === 0) return `${lead}No connection to the server. Check the network and try again.`;
  if (error.code && WORDS[error.code]) {
    const detail = error.code === "recipient_certificate_unknown" ? certificateDetail(error) : "";
    return `${lead}${WORDS[error.code]}${detail}`;
  }
  if (error.status === 413) return `${lead}${WORDS.payload_too_large}`;
  if (error.status === 404 && !error.code) return `${lead}This is not available yet on this system.`;
  if (error.status >= 500) return `${lead}Something went wrong on the server (${error.message}). Try again.`;
  return `${lead}${error.message}`;
}

function certificateDetail(error) {
  const details = (error.data && error.data.details) || {};
  const address = details.address || (Array.isArray(details.addresses) ? details.addresses.join(", ") : "");
  return address ? ` (${address})` : "";
}

// --- the signed-in person's addresses -----------------------------------------------------------
// Admins are answered every address of the agency: only those linked to them count here.
export async function linkedAddresses(kind) {
  const me = ctx.hooks.me();
  const listed = await get("/api/v1/directory/cloud-addresses");
  return (listed.cloud_addresses || []).filter((a) => a.kind === kind && (a.staff_ids || []).includes(me.id));
}

// --- files fetched with the token -----------------------------------------------------------------
const BLOB_LIFETIME_MS = 60000;
const FILE_PATH = /^\/api\/v1\/cloud\/[A-Za-z0-9_/-]+$/;

// The token goes only with a path of cloud-comms' own files on this origin, whatever a view says.
function ownFile(path) {
  if (!FILE_PATH.test(path || "")) throw new Error("That file is not served by this system.");
  return path;
}

function blobUrl(blob) {
  const url = URL.createObjectURL(blob);
  setTimeout(() => URL.revokeObjectURL(url), BLOB_LIFETIME_MS);
  return url;
}

// Saves an attachment under its own name.
export async function saveFile(path, filename) {
  const url = blobUrl(await getBlob(ownFile(path)));
  const link = document.createElement("a");
  link.href = url;
  link.download = filename || "download";
  document.body.append(link);
  link.click();
  link.remove();
}

// Opens a PDF in a new tab (the browser's own viewer). The tab opens within the click, so pop-up
// blockers allow it, cut off from this page, and is sent to the file once it has arrived.
export async function openPdf(path) {
  ownFile(path);
  const tab = window.open("about:blank", "_blank");
  if (!tab) throw new Error("The browser blocked the new tab. Allow pop-ups for this site, then try again.");
  try {
    tab.opener = null;
    tab.document.title = "Opening…";
    tab.document.body.textContent = "Opening the document…";
  } catch { /* a tab the browser already took elsewhere: nothing to write */ }
  let blob;
  try {
    blob = await getBlob(path);
  } catch (error) {
    tab.close();
    throw error;
  }
  tab.location.replace(blobUrl(new Blob([blob], { type: "application/pdf" })));
}

// A picked file as base64 (no data: prefix).
export function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ""));
    reader.onerror = () => reject(new Error(`Could not read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

// A dialog is filled from its <template> when it opens and emptied when it closes, so nothing typed
// or shown in it stays in the page (and its fields exist only while it is open). Answers a function
// to call when opening; `closed` runs after the dialog was emptied.
export function templateDialog(dialog, templateId, closed = () => {}) {
  let opener = null;
  dialog.addEventListener("close", () => {
    dialog.replaceChildren();
    closed();
    if (opener && opener.isConnected && !opener.closest("[hidden]")) opener.focus();
    opener = null;
  });
  return () => {
    opener = document.activeElement;
    dialog.replaceChildren(document.getElementById(templateId).content.cloneNode(true));
  };
}
