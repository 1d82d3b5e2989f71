// Team queues in the Message Board: a message (or portal message) addressed to a team is one shared
// item. List rows show "Claimed by Jordan Kim, RN" or "Done"; the reading pane shows the state with
// Claim, Release and Mark done. A claim another member won first is refused by the server (409
// already_claimed, its message naming who); `act` shows that above the item.
import { post } from "./api.js";
import { fullTime, h } from "./dom.js";

// Whether the item is a team's shared item (the server adds `queue` to those only).
export function hasQueue(d) {
  return Boolean(d && d.queue && d.queue.state);
}

function claimedText(queue, meId) {
  const by = queue.claimed_by;
  if (!by) return "";
  return by.id === meId ? "Claimed by you" : `Claimed by ${by.name || by.id}`;
}

// A badge for a list row: claimed (by you or whom) or done; nothing for an open item or another kind.
export function queueBadge(item, meId) {
  if (!hasQueue(item)) return null;
  if (item.queue.state === "done") return h("span", { class: "badge queue done", text: "Done" });
  if (item.queue.state === "claimed") return h("span", { class: "badge queue claimed", text: claimedText(item.queue, meId) });
  return h("span", { class: "badge queue open", text: "Team" });
}

// The queue section of the reading pane for `d` (a message the user received). `meId`: the signed-in
// staff id; `act(call, doneText)`: app.js's action runner (busy pane, error shown, item drawn again).
export function queuePanel(d, { meId, act }) {
  const queue = d.queue;
  const messageId = d.message_id || d.ref_id || d.id;
  const path = `/api/v1/messages/${encodeURIComponent(messageId)}`;
  const lines = [];
  if (queue.state === "open") {
    lines.push(h("p", { class: "meta queue-state", text: "Team item: not claimed yet." }));
  } else if (queue.state === "claimed") {
    const at = queue.claimed_at ? ` (${fullTime(queue.claimed_at)})` : "";
    lines.push(h("p", { class: "meta queue-state", text: `${claimedText(queue, meId)}${at}.` }));
  } else {
    const by = queue.done_by ? ` by ${queue.done_by.id === meId ? "you" : queue.done_by.name}` : "";
    const how = queue.handled_by_reply ? " (answered)" : "";
    const at = queue.done_at ? ` ${fullTime(queue.done_at)}` : "";
    lines.push(h("p", { class: "meta queue-state", text: `Done${by}${how}${at}.` }));
  }
  const buttons = [];
  const mine = queue.claimed_by && queue.claimed_by.id === meId;
  if (queue.state === "open") {
    buttons.push(h("button", { type: "button", class: "primary", onclick: () => act(() => post(`${path}/claim`), "Claimed") }, "Claim"));
  }
  if (queue.state === "claimed" && mine) {
    buttons.push(h("button", { type: "button", onclick: () => act(() => post(`${path}/release`), "Released") }, "Release"));
  }
  if (queue.state === "open" || (queue.state === "claimed" && mine)) {
    buttons.push(h("button", { type: "button", onclick: () => act(() => post(`${path}/done`), "Marked done") }, "Mark done"));
  }
  return h("section", { class: "team-queue", "aria-label": "Team item" },
    ...lines, buttons.length ? h("div", { class: "pane-actions" }, ...buttons) : null);
}
