// Building the page: text is always set as text (textContent), never parsed as HTML.
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

// Only http and https links become clickable, and they open without access to this page.
// A link is a URL string (messages) or {label, url} (delivered notifications).
export function safeLink(link) {
  const url = typeof link === "string" ? link : String((link && link.url) || "");
  const label = typeof link === "string" ? link : String((link && (link.label || link.url)) || "");
  let parsed;
  try { parsed = new URL(url); } catch { return h("span", { text: label }); }
  if (parsed.protocol !== "http:" && parsed.protocol !== "https:") return h("span", { text: label });
  return h("a", { href: parsed.href, target: "_blank", rel: "noopener noreferrer", text: label });
}

// Dates everywhere in one style, in the agency's time zone (its directory setting; the browser's
// zone until the agency is known or when it names none): "Mar 3, 2025, 10:42 AM CST" in full,
// "10:42 AM" today and "Mar 3" (or "Mar 3, 2024") in lists.
let timeZone;
const formats = new Map();
export function setTimeZone(zone) {
  try {
    timeZone = zone ? new Intl.DateTimeFormat([], { timeZone: zone }).resolvedOptions().timeZone : undefined;
  } catch {
    timeZone = undefined; // an unknown zone: the browser's
  }
  formats.clear();
}
export const displayTimeZone = () => timeZone || Intl.DateTimeFormat().resolvedOptions().timeZone;

function format(key, options) {
  if (!formats.has(key)) formats.set(key, new Intl.DateTimeFormat([], { ...options, timeZone }));
  return formats.get(key);
}

function validDate(iso) {
  if (!iso) return null;
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? null : date;
}

export function when(iso) {
  const date = validDate(iso);
  if (!date) return "";
  const day = format("day", { year: "numeric", month: "2-digit", day: "2-digit" });
  const now = new Date();
  if (day.format(date) === day.format(now)) return format("time", { hour: "numeric", minute: "2-digit" }).format(date);
  const year = format("year", { year: "numeric" });
  return year.format(date) === year.format(now)
    ? format("date", { month: "short", day: "numeric" }).format(date)
    : format("dateYear", { month: "short", day: "numeric", year: "numeric" }).format(date);
}

export function fullTime(iso) {
  const date = validDate(iso);
  if (!date) return "";
  return format("full", {
    year: "numeric", month: "short", day: "numeric", hour: "numeric", minute: "2-digit", timeZoneName: "short",
  }).format(date);
}

// ISO-8601 times inside a text (a forwarded message's "Sent:" line, a notice) in the same style.
const ISO_IN_TEXT = /\b\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:\d{2})/g;
export function humanizeTimes(text) {
  return String(text || "").replace(ISO_IN_TEXT, (iso) => fullTime(iso) || iso);
}

// A time zone's offset from UTC (minutes) at the instant `ms`.
function offsetMinutes(ms) {
  const parts = Object.fromEntries(format("parts", {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
  }).formatToParts(new Date(ms)).map((p) => [p.type, p.value]));
  const wall = Date.UTC(Number(parts.year), Number(parts.month) - 1, Number(parts.day), Number(parts.hour), Number(parts.minute), Number(parts.second));
  return Math.round((wall - Math.floor(ms / 1000) * 1000) / 60000);
}

// A datetime-local value (a wall time in the display time zone: the agency's) as ISO-8601 with
// its UTC offset.
export function localInputToIso(value) {
  const match = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2}))?$/.exec(value || "");
  if (!match) return null;
  const [, y, mo, d, hh, mi, ss] = match.map(Number);
  const wall = Date.UTC(y, mo - 1, d, hh, mi, ss || 0);
  let offset = offsetMinutes(wall);
  offset = offsetMinutes(wall - offset * 60000); // the offset at that instant (across a DST change)
  const sign = offset >= 0 ? "+" : "-";
  const pad = (n) => String(Math.floor(Math.abs(n))).padStart(2, "0");
  return `${value.length === 16 ? `${value}:00` : value}${sign}${pad(offset / 60)}:${pad(offset % 60)}`;
}

export function isoToLocalInput(iso) {
  const date = validDate(iso);
  if (!date) return "";
  const parts = Object.fromEntries(format("parts", {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
  }).formatToParts(date).map((p) => [p.type, p.value]));
  return `${parts.year}-${parts.month}-${parts.day}T${parts.hour}:${parts.minute}`;
}

// What just happened, said to screen readers and shown for a few seconds at the foot of the page
// (errors longer, in red).
let toastTimer = null;
export function announce(text, { error = false } = {}) {
  const status = document.getElementById("status");
  clearTimeout(toastTimer);
  status.textContent = "";
  status.classList.toggle("error", error);
  toastTimer = setTimeout(() => {
    status.textContent = text;
    toastTimer = setTimeout(() => { status.textContent = ""; }, error ? 10000 : 4000);
  }, 30);
}
