// Critical results and unread urgent messages in the reading pane.
//
// A critical lab result (or an escalation copy of one) shows its trail: who it was delivered to,
// whom it was escalated to and when, who acknowledged it and when, and the next deadline; while it
// is not acknowledged, an "Acknowledge critical result" button (opening the item does not
// acknowledge it). The sender's "Urgent message not read" item shows who has still not read the
// message and offers a one-click re-route to the recipients' supervisors, or to a chosen colleague.
import { post } from "./api.js";
import { announce, fullTime, h } from "./dom.js";

const STAGE_TEXT = { supervisor: "Escalated to the supervisor / escalation team", admins: "Escalated to the agency admins" };

// Whether the pane shows a critical result's trail for the opened item `d`.
export function hasCriticalResult(d) {
  return d.kind === "notice" && Boolean(d.critical_result);
}

// Whether the pane offers a re-route for the opened item `d` (the sender's "not read" item).
export function hasUrgentUnread(d) {
  return d.kind === "notice" && Boolean(d.urgent_message);
}

function names(ids, nameOf) {
  return ids.length ? ids.map(nameOf).join(", ") : "nobody";
}

// The trail section for `d`. `nameOf(staffId)` names a colleague; `changed()` is called after an
// acknowledgement (the board may have moved).
export function criticalResultPanel(d, { nameOf, changed }) {
  const section = h("section", { class: "critical-result", "aria-labelledby": "critical-title" });

  const draw = (trail) => {
    const rows = [
      h("li", { text: `Delivered ${fullTime(trail.arrived_at)} to ${names(trail.delivered_to, nameOf)}` }),
      ...trail.escalations.map((e) => h("li", { dataset: { stage: e.stage } },
        `${STAGE_TEXT[e.stage] || "Escalated"} ${fullTime(e.at)}: `,
        [names(e.staff_ids, nameOf), ...e.team_ids.map((t) => `team ${t}`)].join(", "))),
    ];
    const ack = trail.acknowledged;
    if (ack) {
      rows.push(h("li", { class: "acknowledged",
        text: `Acknowledged by ${ack.by.name || nameOf(ack.by.id)} ${fullTime(ack.at)}${ack.on_escalation ? " (on an escalation)" : ""}` }));
    } else if (trail.next_escalation_at) {
      rows.push(h("li", { class: "next-escalation", text: `Escalates next ${fullTime(trail.next_escalation_at)} unless acknowledged` }));
    }
    const parts = [
      h("h3", { id: "critical-title", text: trail.escalation_level ? "Escalated critical result" : "Critical result" }),
      h("ol", { class: "critical-trail", "aria-label": "What happened to this result" }, rows),
    ];
    if (!ack) {
      parts.push(h("div", { class: "pane-actions" },
        h("button", { type: "button", class: "acknowledge-critical", onclick: () => acknowledge() }, "Acknowledge critical result")));
    }
    section.replaceChildren(...parts);
  };

  const acknowledge = async () => {
    section.setAttribute("aria-busy", "true");
    try {
      const answer = await post(`/api/v1/board/items/${encodeURIComponent(d.id)}/acknowledge`);
      draw(answer.critical_result);
      announce("Critical result acknowledged.");
      changed?.();
    } catch (error) {
      section.querySelector(".ack-error")?.remove();
      section.append(h("p", { class: "error ack-error", role: "alert", text: `Not acknowledged: ${error.message}` }));
    } finally {
      section.removeAttribute("aria-busy");
    }
  };

  draw(d.critical_result);
  return section;
}

// The "not read" section for `d`, with the re-route. `pickStaff()` (optional) answers a promise of
// a staff id chosen by the user (or null); without it only the supervisors' re-route is offered.
export function urgentUnreadPanel(d, { nameOf, changed, pickStaff }) {
  const state = d.urgent_message;
  const section = h("section", { class: "urgent-unread", "aria-labelledby": "urgent-unread-title" });
  const result = h("p", { class: "meta reroute-result", role: "status" });

  const reroute = async (body) => {
    section.setAttribute("aria-busy", "true");
    try {
      const answer = await post(`/api/v1/board/items/${encodeURIComponent(d.id)}/reroute`, body);
      result.textContent = `Forwarded as urgent to ${names(answer.recipient_ids, nameOf)}.`;
      announce(result.textContent);
      changed?.();
    } catch (error) {
      result.textContent = error.code === "no_supervisor"
        ? "None of the recipients who have not read it has a supervisor: choose a colleague."
        : `Not re-routed: ${error.message}`;
    } finally {
      section.removeAttribute("aria-busy");
    }
  };

  const choose = async () => {
    const staffId = await pickStaff();
    if (staffId) await reroute({ staff_ids: [staffId] });
  };

  section.append(
    h("h3", { id: "urgent-unread-title", text: "Urgent message not read" }),
    h("p", { text: `Not read yet by ${names(state.unread_recipient_ids, nameOf)}.` }),
    ...(state.rerouted || []).map((r) => h("p", { class: "meta", text: `Re-routed ${fullTime(r.at)} to ${names(r.staff_ids, nameOf)}` })),
    h("div", { class: "pane-actions" },
      h("button", { type: "button", class: "reroute-supervisors", onclick: () => reroute({ to: "supervisors" }) },
        "Re-route to their supervisors"),
      pickStaff ? h("button", { type: "button", class: "reroute-choose", onclick: () => choose() }, "Re-route to…") : null),
    result,
  );
  return section;
}
