"""Browser journeys: Debian's chromium driven by Playwright, through the gateway of a whole stack
started as `make run` starts it. One stack and one browser for the module; a fresh context per person."""

from __future__ import annotations

import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright

from services.launcher import Ports, Stack, StackConfig
from tests.browser.chromium import CHROMIUM, launch
from tests.conftest import AMQP_BASE, _rabbitmqctl, delete_vhost, vhost_url
from tests.e2e.conftest import signed_in_once
from tests.helpers import DEMO_PASSWORD

REPO = Path(__file__).resolve().parents[2]
AXE_SOURCE = REPO / ".tools" / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = REPO / "artifacts" / "screenshots"
# Records every CSP violation the page reports, for the tests to assert there were none.
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/browser/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.browser)


# Module scope: Playwright's sync API keeps an event loop running in this thread while it is open,
# which would break asyncio.run() in the tests collected after these.
@pytest.fixture(scope="module")
def browser_amqp_url() -> Iterator[str]:
    """A vhost of this stack's own: two stacks on one vhost would share inbox's consumer queues."""
    vhost = f"clinic-browser-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, urllib.parse.urlsplit(AMQP_BASE).username or "guest", ".*", ".*", ".*")
    yield vhost_url(vhost)
    delete_vhost(vhost)  # and the broker users the stack made for it


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    """Settings a test module adds to its stack's (a module overrides this fixture)."""
    return {}


@pytest.fixture(scope="module")
def web_stack(tmp_path_factory, mongo_uri, browser_amqp_url, stack_env) -> Iterator[Stack]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (see the Makefile)")
    if not AXE_SOURCE.exists():
        pytest.fail(f"{AXE_SOURCE} is missing: `make test` installs axe-core from npm into .tools")
    prefix = f"web{uuid.uuid4().hex[:6]}_"
    config = StackConfig(
        run_dir=tmp_path_factory.mktemp("web-run"),
        ports=Ports.free(),
        mongo_uri=mongo_uri,
        amqp_url=browser_amqp_url,
        # Short heartbeats: streams of pages the tests closed are noticed (and freed) within seconds.
        extra_env={
            "MONGO_DB_PREFIX": prefix,
            "PASSWORD_HASH_PROFILE": "fast",
            "WEB_EVENTS_HEARTBEAT_S": "2",
            **stack_env,
        },
    )
    system = Stack(config)
    try:
        system.start()
    except Exception:
        system.stop()
        raise
    yield system
    system.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def api(web_stack):
    """A staff member's API session through the gateway (setting up and checking what the page did)."""
    return signed_in_once(web_stack.gateway_url)


class Person:
    """One staff member's browser context and page."""

    def __init__(self, context: BrowserContext, page: Page, base_url: str):
        self.context, self.page, self.base_url = context, page, base_url

    def sign_in(self, username: str, fake_clock: bool = False) -> Person:
        page = self.page
        page.goto(f"{self.base_url}/")
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(DEMO_PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#app")).to_be_visible()
        if not fake_clock:  # a fake clock holds animation frames, so the paint mark waits for it
            page.wait_for_function("() => performance.getEntriesByName('board-first-page').length > 0")
        expect(page.locator("#live-state")).to_have_text("Live")
        return self

    def folder(self, folder_id: str):
        return self.page.locator(f'#folders [data-folder="{folder_id}"]')

    def unread_count(self, folder_id: str):
        return self.folder(folder_id).locator(".count .num")

    def row(self, text: str):
        return self.page.locator("#items li", has_text=text)

    def open_row(self, text: str) -> None:
        self.row(text).locator(".row").click()
        expect(self.page.locator("#pane article h2")).to_contain_text(text)

    def more_options(self, action: str) -> None:
        # After a change the page draws the open item again, with the actions it now allows: the menu
        # of the earlier drawing may lack the action, or be replaced while open.
        expect(self.page.locator("#pane")).not_to_have_attribute("aria-busy", "true")
        self.page.get_by_role("button", name="More options").click()
        self.page.get_by_role("menuitem", name=action, exact=True).click()

    def csp_violations(self) -> list[str]:
        return self.page.evaluate("window.__cspViolations")


@pytest.fixture
def people(browser, web_stack):
    """people(n, viewport) -> Persons in separate contexts (separate cookie jars); closed afterwards."""
    contexts: list[BrowserContext] = []

    def _make(viewport: dict | None = None) -> Person:
        context = browser.new_context(viewport=viewport or {"width": 1280, "height": 800})
        context.add_init_script(RECORD_CSP_VIOLATIONS)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        return Person(context, page, web_stack.gateway_url)

    yield _make
    for context in contexts:
        context.close()


def held_request(page: Page, url: str, action: Callable[[], object], timeout_s: float = 10.0) -> Route:
    """Runs `action` with the requests to `url` held at the network, and returns the first one's Route
    (to continue or fulfil; the others stay held). Playwright's sync API runs route callbacks only
    inside its own calls, so this waits with Playwright: for the request event, then for the callback."""
    held: list[Route] = []

    def hold(route: Route) -> None:  # Playwright needs a function of its own here, not a bound builtin
        held.append(route)

    page.route(url, hold)
    with page.expect_request(url, timeout=timeout_s * 1000):
        action()
    deadline = time.monotonic() + timeout_s
    while not held:  # the route callback runs with the request event or just after it, on Playwright's loop
        assert time.monotonic() < deadline, f"{url} was requested but its route callback never ran"
        page.wait_for_timeout(10)  # a Playwright call: its callbacks run meanwhile
    return held[0]


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path


@pytest.fixture(scope="module")
def deliver(web_stack):
    """deliver(request) -> DeliverItem on the stack's inbox as the notifications service (as a producer
    of lab, compliance and schedule items delivers them)."""
    from clinic.inbox.v1 import inbox_pb2_grpc
    from services.kit.service_identity import ServiceTokens

    secret = (web_stack.run_dir / "secrets" / "service-notifications.secret").read_text().strip()
    from services.kit.transport import open_channel

    tls = web_stack.grpc_tls  # the stack's service certificate: its gRPC is mutual TLS
    tokens = ServiceTokens(f"127.0.0.1:{web_stack.config.ports.directory_grpc}", "notifications", secret, tls=tls)
    channel = open_channel(f"127.0.0.1:{web_stack.config.ports.inbox_grpc}", tls=tls)
    stub = inbox_pb2_grpc.InboxServiceStub(channel)

    def _deliver(request):
        metadata = [("authorization", f"Bearer {tokens.token('agy_riverbend')}")]
        return stub.DeliverItem(request, metadata=metadata, timeout=10)

    yield _deliver
    channel.close()
    tokens.close()
