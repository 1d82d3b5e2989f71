// Team overview, for agency admins: who is behind. Backlog by staff and by team, the oldest unread,
// response times, and the trends of the last 7 or 30 days, drawn from GET /api/v1/dashboards/...
// (aggregates only: no subject, body or patient). The staff table downloads as CSV.
//
// The page needs one element: a button with id "team-overview" (hidden; shown to admins). The
// dialog is built here. Charts are plain inline SVG, each with a text alternative and a table of
// the same figures, so nothing is said by the picture alone.
import { ApiError, get, getText } from "./api.js";
import { announce, fullTime, h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const DIALOG_ID = "team-overview-dialog";
let generation = 0;
let opener = null;
let days = 7;

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Seconds as a short duration: "45 s", "12 min", "3.5 h", "2.0 d"; "—" when there is none.
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

// In the agency's time zone, as the rest of the page shows times.
const when = (iso) => (iso && fullTime(iso)) || "—";

function dialog() {
  let node = document.getElementById(DIALOG_ID);
  if (node) return node;
  node = h(
    "dialog",
    { id: DIALOG_ID, class: "team-overview", "aria-labelledby": "team-overview-title" },
    h("div", { class: "dialog-head" },
      h("h2", { id: "team-overview-title", tabindex: "-1", text: "Team overview" }),
      h("button", { type: "button", class: "close", "aria-label": "Close team overview", onclick: () => node.close() }, "×")),
    h("form", { class: "team-overview-controls", onsubmit: (event) => event.preventDefault() },
      h("label", { for: "team-overview-days" }, "Period "),
      h("select", { id: "team-overview-days", onchange: (event) => { days = Number(event.target.value); load(); } },
        h("option", { value: "7" }, "Last 7 days"),
        h("option", { value: "30" }, "Last 30 days")),
      h("button", { type: "button", id: "team-overview-csv", onclick: downloadCsv }, "Download staff backlog (CSV)")),
    h("p", { id: "team-overview-status", role: "status", "aria-live": "polite" }),
    h("div", { id: "team-overview-body" }),
  );
  node.addEventListener("close", () => {
    generation += 1; // answers still on their way are dropped
    document.getElementById("team-overview-body").replaceChildren();
    if (opener && opener.isConnected && !opener.hidden) opener.focus();
    opener = null;
  });
  document.body.append(node);
  return node;
}

function table(caption, columns, rows) {
  return h("table", { class: "team-overview-table" },
    h("caption", { text: caption }),
    h("thead", {}, h("tr", {}, columns.map(([label]) => h("th", { scope: "col", text: label })))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([, cell], index) =>
      (index === 0 ? h("th", { scope: "row", text: cell(row) }) : h("td", { text: cell(row) })))))));
}

// A bar chart of one series (numbers, nulls drawn as gaps), labelled for assistive technology.
function barChart(title, points, value, format) {
  const width = 560;
  const height = 140;
  const pad = 24;
  const values = points.map(value);
  const max = Math.max(1, ...values.filter((v) => v !== null && v !== undefined));
  const step = (width - pad * 2) / Math.max(1, points.length);
  const titleId = `chart-${title.replace(/[^a-z0-9]+/gi, "-").toLowerCase()}`;
  const summary = points.map((p, i) => `${p.date}: ${values[i] === null ? "none" : format(values[i])}`).join("; ");
  const bars = points.map((p, i) => {
    const v = values[i];
    if (v === null || v === undefined) return null;
    const barHeight = Math.max(1, ((height - pad * 2) * v) / max);
    return svg("rect", {
      x: (pad + i * step + step * 0.15).toFixed(1),
      y: (height - pad - barHeight).toFixed(1),
      width: Math.max(1, step * 0.7).toFixed(1),
      height: barHeight.toFixed(1),
      class: "bar",
    }, svg("title", {}, `${p.date}: ${format(v)}`));
  });
  return h("figure", { class: "team-overview-chart" },
    svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": titleId, focusable: "false" },
      svg("title", { id: titleId }, `${title}. ${summary}`),
      svg("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, class: "axis" }),
      svg("text", { x: pad, y: pad - 8, class: "label" }, `max ${format(max)}`),
      svg("text", { x: pad, y: height - 6, class: "label" }, points.length ? points[0].date : ""),
      svg("text", { x: width - pad, y: height - 6, class: "label", "text-anchor": "end" },
        points.length ? points[points.length - 1].date : ""),
      ...bars),
    h("figcaption", { text: title }));
}

function render(summary, staff, teams, trends) {
  const body = document.getElementById("team-overview-body");
  const folders = Object.entries(summary.folders || {}).filter(([, f]) => f.total || f.waiting);
  const count = (n) => String(n ?? 0);
  body.replaceChildren(
    h("section", { "aria-labelledby": "team-overview-summary" },
      h("h3", { id: "team-overview-summary", text: "Waiting now" }),
      h("p", {}, `${summary.waiting} items waiting across ${summary.staff_count} staff. `,
        `Time to first read: p50 ${duration(summary.time_to_first_read.p50_s)}, p90 ${duration(summary.time_to_first_read.p90_s)}. `,
        `Time to reply: p50 ${duration(summary.time_to_reply.p50_s)}, p90 ${duration(summary.time_to_reply.p90_s)}. `,
        `Auto-replies sent: ${summary.auto_replies_sent}.`),
      table("Backlog by folder", [
        ["Folder", ([id]) => id],
        ["Waiting", ([, f]) => count(f.waiting)],
        ["Unread age p50", ([, f]) => duration(f.unread_age_p50_s)],
        ["Unread age p90", ([, f]) => duration(f.unread_age_p90_s)],
        ["Oldest unread", ([, f]) => when(f.oldest_unread_at)],
      ], folders)),
    h("section", { "aria-labelledby": "team-overview-staff" },
      h("h3", { id: "team-overview-staff", text: "Backlog by staff" }),
      table(`Staff, most waiting first (${days} days of response times)`, [
        ["Staff member", (r) => r.name || r.staff_id],
        ["Waiting", (r) => count(r.waiting)],
        ["Oldest unread", (r) => when(r.oldest_unread_at)],
        ["Unread age p90", (r) => duration(r.unread_age_p90_s)],
        ["First read p50", (r) => duration(r.first_read_p50_s)],
        ["Reply p50", (r) => duration(r.reply_p50_s)],
      ], [...staff.staff].sort((a, b) => b.waiting - a.waiting))),
    h("section", { "aria-labelledby": "team-overview-teams" },
      h("h3", { id: "team-overview-teams", text: "Backlog by team" }),
      teams.teams.length
        ? table("Teams, most waiting first", [
          ["Team", (t) => teamNames.get(t.team_id) || t.team_id],
          ["Members", (t) => count(t.members)],
          ["Waiting", (t) => count(t.waiting)],
          ["Oldest unread", (t) => when(t.oldest_unread_at)],
          ["First read p50", (t) => duration(t.first_read_p50_s)],
          ["Reply p50", (t) => duration(t.reply_p50_s)],
        ], [...teams.teams].sort((a, b) => b.waiting - a.waiting))
        : h("p", { text: "No teams in this agency." })),
    h("section", { "aria-labelledby": "team-overview-trends" },
      h("h3", { id: "team-overview-trends", text: `Trends, last ${days} days` }),
      barChart("First reads per day", trends.days_series, (p) => p.first_read_count, count),
      barChart("Time to first read per day (p50)", trends.days_series, (p) => p.first_read_p50_s, duration),
      barChart("Replies per day", trends.days_series, (p) => p.reply_count, count),
      barChart("Time to reply per day (p50)", trends.days_series, (p) => p.reply_p50_s, duration)),
  );
}

let teamNames = new Map();

async function load() {
  const mine = ++generation;
  const status = document.getElementById("team-overview-status");
  status.textContent = "Loading…";
  try {
    const [summary, staff, teams, trends, names] = await Promise.all([
      ...["summary", "staff", "teams", "trends"].map((view) => get(`/api/v1/dashboards/${view}?days=${days}`)),
      get("/api/v1/directory/teams").catch(() => ({ teams: [] })), // names only: ids stand in without them
    ]);
    if (mine !== generation) return;
    teamNames = new Map((names.teams || []).map((t) => [t.id, t.name]));
    render(summary, staff, teams, trends);
    status.textContent = `Updated ${when(summary.generated_at)}.`;
  } catch (error) {
    if (mine !== generation) return;
    const text = error instanceof ApiError && error.status === 403
      ? "Only agency admins can see the team overview."
      : "The team overview could not be loaded. Try again.";
    status.textContent = text;
    announce(text, { error: true });
  }
}

async function downloadCsv() {
  try {
    const { text } = await getText(`/api/v1/dashboards/staff?days=${days}&format=csv`);
    const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    const link = h("a", { href: url, download: `staff-backlog-${days}d.csv`, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch {
    announce("The staff backlog could not be downloaded. Try again.", { error: true });
  }
}

export async function openTeamOverview(event) {
  opener = (event && event.currentTarget) || document.activeElement;
  const node = dialog();
  node.showModal();
  document.getElementById("team-overview-title").focus();
  await load();
}

export function wireTeamOverview() {
  const button = document.getElementById("team-overview");
  if (button) button.addEventListener("click", openTeamOverview);
}

// Admins only (the API refuses anyone else anyway).
export function showTeamOverview(me) {
  const button = document.getElementById("team-overview");
  if (button) button.hidden = !(me && (me.roles || []).includes("admin"));
}

export function stopTeamOverview() {
  generation += 1;
  const node = document.getElementById(DIALOG_ID);
  if (node && node.open) node.close();
  const button = document.getElementById("team-overview");
  if (button) button.hidden = true;
}
