// Retention and legal holds (admins): the agency's policy as its message options say it, a dry run
// and a real run of the retention job, and the legal holds that keep a staff member's or a patient's
// messages whole. Routes: /api/v1/board/agency-options, /api/v1/board/retention/run,
// /api/v1/board/legal-holds (services/inbox/README.md, "Retention and legal holds").
import { del, get, post } from "./api.js";
import { announce, fullTime, h } from "./dom.js";

const HOLDS = "/api/v1/board/legal-holds";
const RUN = "/api/v1/board/retention/run";
const OPTIONS = "/api/v1/board/agency-options";

// One line for a run's report: "would archive 3 item(s); would delete the content of 2 message(s), 1 held".
export function reportLine(report) {
  const archive = report.archive_read_after_days
    ? `${report.dry_run ? "would archive" : "archived"} ${report.archived} item(s)`
    : "archiving off";
  const remove = report.delete_content_after_years
    ? `${report.dry_run ? "would delete" : "deleted"} the content of ${report.deleted} message(s), ${report.held} held`
    : "content kept";
  return `${archive}; ${remove}`;
}

// The admin's panel: policy, dry run / run, holds. `staff`: [{id, display_name}] of the agency.
export function retentionPanel({ staff }) {
  const names = new Map((staff || []).map((s) => [s.id, s.display_name]));
  const section = h("section", { class: "retention", "aria-labelledby": "retention-title" },
    h("h3", { id: "retention-title", text: "Retention and legal holds" }));
  const policy = h("p", { class: "meta" });
  const result = h("p", { role: "status" });
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const holdsList = h("ul", { class: "legal-holds" });

  const fail = (failure) => {
    error.textContent = failure.message;
    error.hidden = false;
  };

  const run = async (dryRun) => {
    error.hidden = true;
    try {
      const report = await post(RUN, { dry_run: dryRun });
      result.textContent = reportLine(report);
      announce(dryRun ? "Dry run finished" : "Retention applied");
    } catch (failure) {
      fail(failure);
    }
  };

  const release = async (hold) => {
    try {
      await del(`${HOLDS}/${encodeURIComponent(hold.id)}`);
      announce("Legal hold released");
      load();
    } catch (failure) {
      fail(failure);
    }
  };

  const holdRow = (hold) => {
    const who = hold.kind === "staff" ? (names.get(hold.staff_id) || hold.staff_id) : `Patient ${hold.patient_id}`;
    return h("li", {},
      h("span", { text: `${who}, since ${fullTime(hold.placed_at)}${hold.reason ? `: ${hold.reason}` : ""} ` }),
      h("button", { type: "button", onclick: () => release(hold) }, "Release"));
  };

  const holdForm = () => {
    const person = h("select", { id: "hold-staff" },
      h("option", { value: "", text: "A staff member" }),
      (staff || []).map((s) => h("option", { value: s.id, text: s.display_name })));
    const patient = h("input", { id: "hold-patient", placeholder: "or a patient id", maxlength: 64 });
    const reason = h("input", { id: "hold-reason", maxlength: 500 });
    const submit = async (event) => {
      event.preventDefault();
      error.hidden = true;
      const body = person.value ? { staff_id: person.value } : { patient_id: patient.value.trim() };
      if (reason.value.trim()) body.reason = reason.value.trim();
      try {
        await post(HOLDS, body);
        announce("Legal hold placed");
        load();
      } catch (failure) {
        fail(failure);
      }
    };
    return h("form", { class: "hold-form", onsubmit: submit },
      h("label", { for: "hold-staff", text: "Hold the messages of" }), person,
      h("label", { for: "hold-patient", text: "Patient id" }), patient,
      h("label", { for: "hold-reason", text: "Reason" }), reason,
      h("button", { type: "submit" }, "Place legal hold"));
  };

  const load = async () => {
    try {
      const options = await get(OPTIONS);
      const days = options.retention_archive_read_after_days;
      const years = options.retention_delete_content_after_years;
      policy.textContent = `Read items are ${days ? `archived after ${days} day(s)` : "never archived"}; `
        + `message content is ${years ? `deleted after ${years} year(s)` : "kept"}.`;
      const holds = await get(`${HOLDS}?limit=200`);
      holdsList.replaceChildren(...holds.holds.map(holdRow));
      if (!holds.holds.length) holdsList.append(h("li", { class: "meta", text: "No legal holds." }));
    } catch (failure) {
      fail(failure);
    }
  };

  section.append(policy,
    h("div", { class: "retention-actions" },
      h("button", { type: "button", onclick: () => run(true) }, "Dry run"),
      h("button", { type: "button", onclick: () => run(false) }, "Apply now")),
    result, error, h("h4", { text: "Legal holds" }), holdsList, holdForm());
  load();
  return section;
}
