// "Link Staff Accounts to Addresses" (admins): the agency's Direct addresses and fax numbers and the
// staff each is linked to (directory's /api/v1/directory/cloud-addresses, through the gateway).
// Everything arriving at an address goes to each staff member linked to it. Text is set as text only.
import { ApiError, api, get } from "./api.js";
import { $, announce, h } from "./dom.js";

const PATH = "/api/v1/directory/cloud-addresses";
const KIND_NAMES = { direct: "Direct address", fax: "Fax number" };

let generation = 0;   // changes on sign-out and on each opening: older answers are dropped
let addresses = [];
let staff = [];       // the agency's active staff, for the picker
let busy = false;
let opener = null;

function note(text, { error = false } = {}) {
  const line = $("#cloud-addresses-note");
  line.classList.toggle("error", error);
  line.textContent = text;
}

function trouble(error) {
  if (!(error instanceof ApiError)) return error.message;
  if (error.status === 0) return "No connection to the server. Check the network and try again.";
  switch (error.code) {
    case "invalid_address": return "That is not a valid address: a Direct address looks like name@direct.example.org, a fax number like +15555550100.";
    case "address_taken": return "This address is already registered.";
    case "unknown_staff": return "That person is not an active staff member of your agency.";
    case "not_found": return "This address was removed meanwhile.";
    case "forbidden": return "Only administrators can change addresses.";
    default: return error.message;
  }
}

// --- the list --------------------------------------------------------------------------------
function staffName(id, address) {
  const linked = (address.staff || []).find((s) => s.id === id);
  if (linked) return linked.display_name;
  const known = staff.find((s) => s.id === id);
  return known ? known.display_name : id;
}

function addressItem(address) {
  const title = address.label ? `${address.label} (${address.address})` : address.address;
  const inputId = `cloud-link-${address.id}`;
  const chips = address.staff_ids.map((id) => {
    const name = staffName(id, address);
    return h("li", { class: "chip" }, h("span", { text: name }),
      h("button", { type: "button", "aria-label": `Unlink ${name} from ${address.address}`, onclick: () => unlink(address, id) }, "×"));
  });
  return h("li", { class: "cloud-address", dataset: { addressId: address.id } },
    h("h3", { text: title }),
    h("p", { class: "meta", text: KIND_NAMES[address.kind] || address.kind }),
    chips.length
      ? h("ul", { class: "chips", "aria-label": `Staff linked to ${address.address}` }, chips)
      : h("p", { class: "meta", text: "No staff linked: nothing arriving here reaches anyone." }),
    h("form", { class: "cloud-link", onsubmit: (event) => { event.preventDefault(); link(address, event.target); } },
      h("label", { for: inputId, text: `Link a staff member to ${address.address}` }),
      h("div", { class: "row-inline" },
        h("input", { id: inputId, list: "cloud-staff-options", autocomplete: "off", maxlength: "120", placeholder: "Type a name, then Enter" }),
        h("button", { type: "submit", text: "Link" }))),
    h("button", { type: "button", class: "danger", onclick: () => remove(address), text: `Remove ${address.address}` }));
}

function render(focusAddressId = null) {
  const list = $("#cloud-addresses-list");
  list.replaceChildren(...addresses.map(addressItem));
  $("#cloud-addresses-empty").hidden = addresses.length > 0;
  if (focusAddressId) {
    const input = document.getElementById(`cloud-link-${focusAddressId}`);
    if (input) input.focus();
  }
}

function replaceAddress(updated) {
  addresses = addresses.map((a) => (a.id === updated.id ? updated : a));
}

async function change(call, done) {
  if (busy) return;
  busy = true;
  const mine = generation;
  try {
    const answer = await call();
    if (mine !== generation) return;
    done(answer);
  } catch (error) {
    if (mine !== generation) return;
    note(trouble(error), { error: true });
    if (error instanceof ApiError && error.code === "not_found") await load();
  } finally {
    if (mine === generation) busy = false;
  }
}

function match(typed) {
  const text = typed.trim().toLowerCase();
  if (!text) return null;
  return staff.find((s) => s.display_name.toLowerCase() === text)
    || staff.filter((s) => s.display_name.toLowerCase().includes(text)).sort((a, b) => a.display_name.length - b.display_name.length)[0]
    || null;
}

function link(address, form) {
  const input = form.querySelector("input");
  const typed = input.value;
  if (!typed.trim()) { note("Type a staff member's name.", { error: true }); input.focus(); return; }
  const member = match(typed);
  if (!member) { note(`No staff member matches “${typed.trim()}”.`, { error: true }); input.focus(); return; }
  if (address.staff_ids.includes(member.id)) { note(`${member.display_name} is already linked to ${address.address}.`); input.value = ""; return; }
  change(() => api("PATCH", `${PATH}/${address.id}`, { staff_ids: [...address.staff_ids, member.id] }), (updated) => {
    replaceAddress(updated);
    render(updated.id);
    note(`${member.display_name} linked to ${updated.address}.`);
    announce(`${member.display_name} linked`);
  });
}

function unlink(address, staffId) {
  const name = staffName(staffId, address);
  change(() => api("PATCH", `${PATH}/${address.id}`, { staff_ids: address.staff_ids.filter((id) => id !== staffId) }), (updated) => {
    replaceAddress(updated);
    render(updated.id);
    note(`${name} unlinked from ${updated.address}.`);
  });
}

function confirmRemoval(address) {
  const dialog = $("#confirm-dialog");
  $("#confirm-title").textContent = "Remove address";
  $("#confirm-text").textContent = `Remove ${address.address}? Nothing arriving at it will reach your staff any more.`;
  $("#confirm-ok").textContent = "Remove";
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
}

async function remove(address) {
  if (busy || !(await confirmRemoval(address))) return;
  change(() => api("DELETE", `${PATH}/${address.id}`), () => {
    addresses = addresses.filter((a) => a.id !== address.id);
    render();
    note(`${address.address} removed.`);
    $("#cloud-address-value").focus();
  });
}

function addAddress(event) {
  event.preventDefault();
  const error = $("#cloud-address-error");
  const value = $("#cloud-address-value").value.trim();
  if (!value) { error.textContent = "Type the address."; error.hidden = false; $("#cloud-address-value").focus(); return; }
  const body = { kind: $("#cloud-address-kind").value, address: value, label: $("#cloud-address-label").value.trim() };
  change(async () => {
    try {
      return await api("POST", PATH, body);
    } catch (failure) {
      error.textContent = trouble(failure);
      error.hidden = false;
      $("#cloud-address-value").focus();
      return null;
    }
  }, (created) => {
    if (!created) return;
    error.hidden = true;
    $("#cloud-address-form").reset();
    addresses = [...addresses, created].sort((a, b) => (a.kind + a.address).localeCompare(b.kind + b.address));
    render(created.id);
    note(`${created.address} added. Link staff to it below.`);
  });
}

// --- opening and closing -----------------------------------------------------------------------
async function load() {
  const mine = generation;
  note("Loading…");
  $("#cloud-addresses-list").setAttribute("aria-busy", "true");
  try {
    const [listed, members] = await Promise.all([get(PATH), get("/api/v1/directory/staff")]);
    if (mine !== generation) return;
    addresses = listed.cloud_addresses;
    staff = members.staff.filter((s) => s.active);
    $("#cloud-staff-options").replaceChildren(...staff.map((s) => h("option", { value: s.display_name })));
    render();
    note(addresses.length ? `${addresses.length} address${addresses.length === 1 ? "" : "es"}.` : "");
  } catch (error) {
    if (mine === generation) note(`Could not load the addresses: ${trouble(error)}`, { error: true });
  } finally {
    if (mine === generation) $("#cloud-addresses-list").removeAttribute("aria-busy");
  }
}

async function open() {
  generation += 1;
  busy = false;
  opener = document.activeElement;
  addresses = [];
  $("#cloud-addresses-list").replaceChildren();
  $("#cloud-addresses-empty").hidden = true;
  $("#cloud-address-error").hidden = true;
  $("#cloud-address-form").reset();
  $("#cloud-addresses-dialog").showModal();
  $("#cloud-addresses-title").focus();
  await load();
}

export function wireCloudAddresses() {
  $("#cloud-addresses").addEventListener("click", open);
  $("#cloud-addresses-close").addEventListener("click", () => $("#cloud-addresses-dialog").close());
  $("#cloud-address-form").addEventListener("submit", addAddress);
  $("#cloud-address-kind").addEventListener("change", (event) => {
    $("#cloud-address-value").placeholder = event.target.value === "fax" ? "+15555550100" : "intake@direct.example.org";
  });
  $("#cloud-addresses-dialog").addEventListener("close", () => {
    generation += 1;  // answers still on their way are dropped
    busy = false;
    $("#cloud-addresses-list").replaceChildren();
    if (opener && opener.isConnected && !opener.hidden) opener.focus();
    opener = null;
  });
}

// Admins only (the API refuses changes to anyone else anyway).
export function showCloudAddresses(me) {
  $("#cloud-addresses").hidden = !(me && (me.roles || []).includes("admin"));
}

export function stopCloudAddresses() {
  generation += 1;
  busy = false;
  addresses = [];
  staff = [];
  $("#cloud-addresses").hidden = true;
  $("#cloud-addresses-list").replaceChildren();
  $("#cloud-staff-options").replaceChildren();
  $("#cloud-address-form").reset();
  note("");
}
