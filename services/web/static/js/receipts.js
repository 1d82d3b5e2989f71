// Read receipts and Recall in the reading pane of a message the user sent (a Sent item): each
// recipient delivered or read (with the time), or, for a team or the whole agency, the counts and
// the list page by page; a Recall button while the agency's recall window is open, with a
// confirmation first and the outcome shown after.
import { get, post } from "./api.js";
import { announce, fullTime, h } from "./dom.js";

const PAGE = 50;
const STATUS_TEXT = { delivered: "Delivered", read: "Read", recalled: "Recalled", pending: "Sending" };

// Whether the pane shows receipts for this item: a staff message in the user's Sent folder.
export function hasReceipts(d) {
  return d.kind === "message" && (d.folder === "sent" || d.archived_from === "sent") && Boolean(d.message_id);
}

// The receipts section for `d` (drawn empty, filled when the answer comes). `nameOf(staffId)` names
// a colleague; `confirm(title, text, ok)` answers a promise of true/false; `changed()` is called
// after a recall (the board's counts moved).
export function receiptsPanel(d, { nameOf, confirm, changed }) {
  const section = h("section", { class: "receipts", "aria-labelledby": "receipts-title", "aria-busy": "true" },
    h("h3", { id: "receipts-title", text: "Delivery and read receipts" }));
  const path = `/api/v1/messages/${encodeURIComponent(d.message_id)}`;
  let shown = [];

  const draw = (body, { append = false } = {}) => {
    shown = append ? shown.concat(body.recipients) : body.recipients;
    section.replaceChildren(section.firstChild);
    section.append(countsLine(body), recallLine(body));
    section.append(h("ul", { class: "receipt-list", "aria-label": "Recipients", tabindex: "0" },
      shown.map((entry) => h("li", { dataset: { status: entry.status } },
        h("span", { class: "receipt-name", text: nameOf(entry.staff_id) }), " ",
        h("span", { class: `badge receipt ${entry.status}`, text: STATUS_TEXT[entry.status] || entry.status }),
        entry.read_at ? h("span", { class: "receipt-time", text: ` ${fullTime(entry.read_at)}` }) : null))));
    if (body.next_cursor) {
      section.append(h("button", { type: "button", onclick: () => load(body.next_cursor) }, "Show more recipients"));
    }
    section.removeAttribute("aria-busy");
  };

  const countsLine = (body) => {
    const c = body.counts;
    const parts = [`${c.delivered} of ${c.recipients} delivered`];
    if (body.receipts) parts.push(`${c.read} read`);
    if (c.recalled) parts.push(`${c.recalled} recalled`);
    return h("p", { class: "meta receipt-counts", text: parts.join(", ") + (body.receipts ? "" : " (read receipts are off in this agency)") });
  };

  const recallLine = (body) => {
    if (body.recall) {
      const r = body.recall;
      return h("p", { class: "meta recall-state", text: `Recalled ${fullTime(r.recalled_at)}: ${r.recalled} taken back, ${r.already_read} had already read it.` });
    }
    if (!body.recallable_until) return null;
    return h("div", { class: "pane-actions" },
      h("button", { type: "button", class: "recall", onclick: () => recall() }, "Recall"),
      h("span", { class: "meta", text: ` until ${fullTime(body.recallable_until)}` }));
  };

  const load = async (cursor) => {
    section.setAttribute("aria-busy", "true");
    try {
      const query = cursor ? `?limit=${PAGE}&cursor=${encodeURIComponent(cursor)}` : `?limit=${PAGE}`;
      draw(await get(`${path}/receipts${query}`), { append: Boolean(cursor) });
    } catch (error) {
      section.removeAttribute("aria-busy");
      section.append(h("p", { class: "error", role: "alert", text: `Receipts could not be shown: ${error.message}` }));
    }
  };

  const recall = async () => {
    const ok = await confirm("Recall this message?",
      "It is taken off the board of every recipient who has not read it yet. Those who already read it keep it.", "Recall");
    if (!ok) return;
    section.setAttribute("aria-busy", "true");
    let result;
    try {
      result = await post(`${path}/recall`);
    } catch (error) {
      section.removeAttribute("aria-busy");
      section.querySelector(".recall-error")?.remove();
      section.append(h("p", { class: "error recall-error", role: "alert", text: `Not recalled: ${error.message}` }));
      return;
    }
    const names = (ids) => ids.map(nameOf).join(", ");
    const said = `Recalled from ${result.recalled.length}` + (result.already_read.length ? `; already read by ${names(result.already_read)}` : "");
    announce(said);
    await load();
    section.append(h("p", { class: "recall-result", role: "status" },
      h("span", { text: result.recalled.length ? `Taken back from: ${names(result.recalled)}.` : "Nobody was left to take it back from." }),
      result.already_read.length ? h("span", { text: ` Already read by: ${names(result.already_read)}.` }) : null));
    changed();
  };

  load();
  return section;
}
