"""The "Link Staff Accounts to Addresses" dialog: an admin links a colleague to the intake Direct
address and unlinks them again, adds and removes an address; keyboard, Escape, axe-core, CSP; staff
who are not admins have no such button."""

from __future__ import annotations

import uuid

from playwright.sync_api import expect

from tests.browser.test_message_board import axe_violations

INTAKE = "intake@direct.riverbend.example"
BUTTON = "Link Staff Accounts to Addresses"


def open_dialog(page):
    page.get_by_role("button", name=BUTTON).click()
    dialog = page.locator("#cloud-addresses-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator(".cloud-address").first).to_be_visible()
    return dialog


def address_item(dialog, address: str):
    return dialog.locator(".cloud-address", has=dialog.page.get_by_role("heading", name=address))


def test_an_admin_links_a_staff_member_to_the_intake_address(people, api):
    person = people().sign_in("admin")
    page = person.page
    opener = page.get_by_role("button", name=BUTTON)
    dialog = open_dialog(page)
    intake = address_item(dialog, INTAKE)
    expect(intake.locator(".chip", has_text="Chris Wilson")).to_be_visible()
    expect(intake.locator(".chip", has_text="Dana Thompson")).to_be_visible()
    assert axe_violations(page) == []

    picker = intake.get_by_label(f"Link a staff member to {INTAKE}")
    picker.fill("Jamie Davis")
    picker.press("Enter")
    expect(intake.locator(".chip", has_text="Jamie Davis")).to_be_visible()
    expect(dialog.locator("#cloud-addresses-note")).to_have_text(f"Jamie Davis linked to {INTAKE}.")
    expect(picker).to_be_focused()
    listed = {a["address"]: a for a in api("admin").get("/api/v1/directory/cloud-addresses").json()["cloud_addresses"]}
    assert "stf_riverbend_davis" in listed[INTAKE]["staff_ids"]

    # Unlinking puts it back as it was (the shared stack's other tests see the demo links).
    intake.get_by_role("button", name=f"Unlink Jamie Davis from {INTAKE}").click()
    expect(intake.locator(".chip", has_text="Jamie Davis")).to_have_count(0)
    listed = {a["address"]: a for a in api("admin").get("/api/v1/directory/cloud-addresses").json()["cloud_addresses"]}
    assert listed[INTAKE]["staff_ids"] == ["stf_riverbend_wilson", "stf_riverbend_thompson"]

    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(opener).to_be_focused()
    assert person.csp_violations() == []


def test_an_admin_adds_and_removes_an_address_and_text_stays_text(people):
    person = people().sign_in("admin")
    page = person.page
    dialog = open_dialog(page)
    dialog.get_by_label("Address", exact=True).fill("not an address")
    dialog.get_by_role("button", name="Add address").click()
    expect(dialog.locator("#cloud-address-error")).to_contain_text("not a valid address")

    address = f"b{uuid.uuid4().hex[:6]}@direct.riverbend.example"
    label = "<img src=x onerror=alert(1)>"
    dialog.get_by_label("Address", exact=True).fill(address)
    dialog.get_by_label("Label (optional)").fill(label)
    dialog.get_by_role("button", name="Add address").click()
    item = address_item(dialog, f"{label} ({address})")
    expect(item).to_be_visible()
    expect(item.locator("img")).to_have_count(0)
    expect(item.get_by_label(f"Link a staff member to {address}")).to_be_focused()

    item.get_by_role("button", name=f"Remove {address}").click()
    confirm = page.locator("#confirm-dialog")
    expect(confirm).to_be_visible()
    confirm.get_by_role("button", name="Remove").click()
    expect(dialog.locator(".cloud-address", has_text=address)).to_have_count(0)
    expect(dialog).to_be_visible()
    assert person.csp_violations() == []


def test_staff_who_are_not_admins_have_no_button(people):
    page = people().sign_in("intake.wilson").page
    expect(page.get_by_role("button", name="Refresh")).to_be_visible()
    expect(page.get_by_role("button", name=BUTTON)).to_have_count(0)
