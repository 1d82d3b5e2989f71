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

export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  const now = new Date();
  const sameDay = date.toDateString() === now.toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: "numeric", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric", year: date.getFullYear() === now.getFullYear() ? undefined : "numeric" });
}

export function fullTime(iso) { return iso ? new Date(iso).toLocaleString() : ""; }

// A datetime-local value (the browser's local time) as ISO-8601 with its UTC offset.
export function localInputToIso(value) {
  if (!value) return null;
  const date = new Date(value);
  if (Number.isNaN(date.getTime())) return null;
  const offset = -date.getTimezoneOffset();
  const sign = offset >= 0 ? "+" : "-";
  const pad = (n) => String(Math.floor(Math.abs(n))).padStart(2, "0");
  return `${value.length === 16 ? `${value}:00` : value}${sign}${pad(offset / 60)}:${pad(offset % 60)}`;
}

export function isoToLocalInput(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}`;
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
