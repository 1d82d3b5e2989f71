// Coverage while away: who covers for the user (a colleague receives copies of what is addressed to
// them during a window), the "Covering for …" mark on those copies, and the owner's summary of what
// came in and what the coverer did with it. Routes: /api/v1/board/coverage (services/inbox/README.md).
import { del, get, put } from "./api.js";
import { announce, fullTime, h, isoToLocalInput, localInputToIso } from "./dom.js";

const PATH = "/api/v1/board/coverage";
const STATUS_TEXT = { scheduled: "Scheduled", active: "In force", ended: "Ended", cleared: "Ended early" };

// The mark on a list row or in the reading pane of a copy (null for anything else).
export function coverageBadge(item) {
  const cover = item && item.covering_for;
  if (!cover) return null;
  const text = cover.ended ? `Covered for ${cover.name} (coverage ended)` : `Covering for ${cover.name}`;
  return h("span", { class: `badge coverage${cover.ended ? " ended" : ""}`, title: text, text });
}

// The coverage panel (for the auto-reply dialog or a settings page): the coverage in force or
// scheduled, a form to set one, "End coverage now", and the history with each one's summary.
// `staff`: [{id, display_name}] of the agency; `me`: the user's staff id.
export function coveragePanel({ staff, me }) {
  const section = h("section", { class: "coverage", "aria-labelledby": "coverage-title" },
    h("h3", { id: "coverage-title", text: "Coverage while away" }));
  const colleagues = (staff || []).filter((s) => s.id !== me);

  const draw = (current, history) => {
    section.replaceChildren(section.firstChild);
    section.append(currentLine(current), form(current), historyList(history));
  };

  const currentLine = (c) => {
    if (!c) return h("p", { class: "meta", text: "Nobody covers for you." });
    return h("div", { class: "coverage-current" },
      h("p", { text: `${c.coverer.name} covers for you from ${fullTime(c.starts_at)} until ${fullTime(c.ends_at)} (${STATUS_TEXT[c.status] || c.status}).` }),
      h("button", { type: "button", onclick: () => clear() }, "End coverage now"));
  };

  const form = (c) => {
    const coverer = h("select", { id: "coverage-coverer", required: true },
      h("option", { value: "", text: "Choose a colleague" }),
      colleagues.map((s) => h("option", { value: s.id, text: s.display_name, selected: c && c.coverer.staff_id === s.id })));
    const starts = h("input", { id: "coverage-starts", type: "datetime-local", value: c ? isoToLocalInput(c.starts_at) : "" });
    const ends = h("input", { id: "coverage-ends", type: "datetime-local", required: true, value: c ? isoToLocalInput(c.ends_at) : "" });
    const error = h("p", { class: "error", role: "alert", hidden: true });
    const submit = async (event) => {
      event.preventDefault();
      error.hidden = true;
      const body = { coverer_id: coverer.value, ends_at: localInputToIso(ends.value) };
      if (starts.value) body.starts_at = localInputToIso(starts.value);
      try {
        await put(PATH, body);
        announce("Coverage saved");
        load();
      } catch (failure) {
        error.textContent = failure.message;
        error.hidden = false;
      }
    };
    return h("form", { class: "coverage-form", onsubmit: submit },
      h("label", { for: "coverage-coverer", text: "Covering colleague" }), coverer,
      h("label", { for: "coverage-starts", text: "From (empty: now)" }), starts,
      h("label", { for: "coverage-ends", text: "Until" }), ends,
      error,
      h("button", { type: "submit" }, "Save coverage"));
  };

  const historyList = (items) => {
    if (!items.length) return null;
    return h("details", { class: "coverage-history" }, h("summary", { text: "Earlier coverage" }),
      h("ul", {}, items.map((c) => h("li", {},
        h("span", { text: `${c.coverer.name}, ${fullTime(c.starts_at)} – ${fullTime(c.ends_at)}: ${STATUS_TEXT[c.status] || c.status}, ${c.copies} item(s) ` }),
        h("button", { type: "button", onclick: (event) => showSummary(c.id, event.target.parentNode) }, "What came in")))));
  };

  const showSummary = async (id, where) => {
    where.querySelector(".coverage-summary")?.remove();
    try {
      where.append(summaryList(await get(`${PATH}/${encodeURIComponent(id)}/summary?limit=100`)));
    } catch (failure) {
      where.append(h("p", { class: "error coverage-summary", role: "alert", text: failure.message }));
    }
  };

  const clear = async () => {
    try {
      await del(PATH);
      announce("Coverage ended");
      load();
    } catch (failure) {
      announce(failure.message, { error: true });
    }
  };

  const load = async () => {
    section.setAttribute("aria-busy", "true");
    try {
      const [current, history] = await Promise.all([get(PATH), get(`${PATH}/history?limit=10`)]);
      draw(current.coverage, history.items.filter((c) => !current.coverage || c.id !== current.coverage.id));
    } catch (failure) {
      section.append(h("p", { class: "error", role: "alert", text: `Coverage could not be shown: ${failure.message}` }));
    }
    section.removeAttribute("aria-busy");
  };

  load();
  return section;
}

// One coverage's summary: each item that came in, whether the coverer read it and answered it.
export function summaryList(body) {
  if (!body.items.length) return h("p", { class: "meta coverage-summary", text: "Nothing came in." });
  return h("ul", { class: "coverage-summary", "aria-label": "What came in while covered" },
    body.items.map((entry) => h("li", { dataset: { kind: entry.kind } },
      h("span", { class: "coverage-title", text: entry.title || entry.kind }), " ",
      h("span", { class: "meta", text: `${entry.sender.name || ""} ${fullTime(entry.sent_at)}` }), " ",
      h("span", { class: `badge ${entry.read_by_coverer ? "read" : "unread"}`, text: entry.read_by_coverer ? "Read" : "Not read" }),
      entry.answered_by_coverer === null ? null
        : h("span", { class: "badge", text: entry.answered_by_coverer ? `Answered ${fullTime(entry.answered_at)}` : "Not answered" }))));
}
