"""The browser UI in a real browser: Debian's Chromium, headless, driven by Playwright
against two real site services on loopback (alpha protects VM vm1 to beta).

In order, over one pair of sites: a wrong token is refused and the right one logs in; a
state-changing request without the CSRF token is a 403; a VPG created in the browser
protects its VM; a running QEMU's VM is added by its QMP socket and node (a wrong node
refused with the API's reason); the RPO chart fills while writes run; a checkpoint tagged in the
browser is found in the recovery site's picker; screenshots of every page at phone and
desktop width (under $ZCORE_UI_SCREENSHOTS, else the test's temporary directory); a
failover test started and stopped; an alert (a test period run out) acknowledged; an
operation the state forbids shows the API's reason; a failover to the tagged checkpoint,
committed; reverse protection and failback.  Any console error the flow did not expect
fails the test it happened in.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from helpers.browser import Console, chromium_path, playwright_module, screenshot_dir
from helpers.failover import MiB, pair, qemu_io
from helpers.qsd import QemuStorageDaemon
from helpers.site import SiteProcess, init_site_dir, ok, wait_for

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")

DISK = 16 * MiB
WIDTHS = (375, 1280)
TIMEOUT_MS = 30_000


@dataclass
class Flow:
    """What the tests of this module share, in their order."""

    a: SiteProcess
    b: SiteProcess
    page_a: Any
    page_b: Any
    browser: Any
    console: Console
    shots: Path
    tagged: dict[str, int] = field(default_factory=dict)

    def go(self, page: Any, site: SiteProcess, route: str = "") -> Any:
        page.goto(f"{site.api_url}/#{route}" if route else f"{site.api_url}/")
        return page


def _login(page: Any, site: SiteProcess, token: str) -> None:
    page.goto(f"{site.api_url}/")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Log in").click()


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    sync_api = playwright_module()
    executable = chromium_path()
    tmp = tmp_path_factory.mktemp("ui")
    init_site_dir(tmp / "a", "alpha")
    init_site_dir(tmp / "b", "beta")
    a, b = SiteProcess(tmp / "a"), SiteProcess(tmp / "b")
    try:
        a.spawn(), b.spawn()
        a.wait_ready(), b.wait_ready()
        pair(a, b)
        disk = tmp / "disk0.img"
        with open(disk, "wb") as f:
            f.truncate(DISK)
        ok(a.client().post("/vms", json={"name": "vm1", "volumes": [
            {"name": "disk0", "size": DISK, "path": str(disk)}]}), 201)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable,
                                        args=["--no-sandbox", "--disable-dev-shm-usage"])
            console = Console()
            pages = []
            for _ in (a, b):
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                context.set_default_timeout(TIMEOUT_MS)
                pages.append(console.watch(context.new_page()))
            yield Flow(a, b, pages[0], pages[1], browser, console,
                       screenshot_dir(tmp / "screenshots"))
            browser.close()
    finally:
        a.close()
        b.close()


@pytest.fixture(autouse=True)
def no_console_errors(flow: Flow) -> Iterator[None]:
    yield
    assert flow.console.take() == []


def _points(page: Any, chart: str, at_least: int, timeout: float = 60.0) -> int:
    """Wait until the chart `chart` (a selector) draws `at_least` points; how many it
    draws.  Polled from here: the page's CSP forbids the evaluated predicates of
    Playwright's wait_for_function."""
    deadline = time.monotonic() + timeout
    while True:
        n = int(page.locator(f"{chart} svg").get_attribute("data-points") or 0)
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.5)


def _wizard(page: Any, name: str) -> Any:
    return page.locator(f"#{name}-wizard")


def _run(page: Any, wizard: str, button: str, timeout: float = 60_000) -> str:
    """Press `button` of a wizard; the text of its outcome (succeeded, or the refusal)."""
    w = _wizard(page, wizard)
    w.get_by_role("button", name=button, exact=True).click()
    outcome = w.locator(".message")
    outcome.first.wait_for(timeout=timeout)
    return str(outcome.first.inner_text())


def test_a_wrong_token_is_refused_and_the_right_one_logs_in(flow: Flow) -> None:
    flow.console.expect("/ui/login", 401)
    page = flow.page_a
    _login(page, flow.a, "zc_not-a-token")
    page.get_by_text("That token is not valid on this site.").wait_for()
    assert page.locator("#nav").is_hidden()
    _login(page, flow.a, flow.a.token)
    page.get_by_role("heading", name="Dashboard").wait_for()
    assert page.locator("#nav").is_visible()
    _login(flow.page_b, flow.b, flow.b.token)
    flow.page_b.get_by_role("heading", name="Dashboard").wait_for()
    cookies = page.context.cookies()
    assert cookies and all(c["httpOnly"] and c["sameSite"] == "Strict" for c in cookies)


def test_a_state_changing_request_without_the_csrf_token_is_refused(flow: Flow) -> None:
    request = flow.page_a.context.request  # the browser's cookies, no page script
    refused = request.post(f"{flow.a.api_url}/api/v1/vms", data={"name": "csrf-probe"})
    assert refused.status == 403 and refused.json()["error"]["code"] == "csrf_failed"
    assert request.get(f"{flow.a.api_url}/api/v1/vms/csrf-probe").status == 404
    assert request.get(f"{flow.a.api_url}/api/v1/vms").status == 200  # reads need none


def test_a_vpg_created_in_the_browser_protects_its_vm(flow: Flow) -> None:
    page = flow.go(flow.page_a, flow.a, "/create")
    page.get_by_label("VPG name").fill("g1")
    page.get_by_label(re.compile(r"^vm1: disk0")).check()
    page.get_by_label("Checkpoint interval seconds").fill("1")
    page.get_by_role("button", name="Create VPG").click()
    page.get_by_text("VPG g1 created.").wait_for(timeout=60_000)
    flow.go(page, flow.a, "/")
    page.locator("tr[data-vpg=g1]", has_text="protecting").wait_for()
    cb = flow.b.client()
    wait_for("g1 at the recovery site", lambda: any(
        v["name"] == "g1" for v in ok(cb.get("/vpgs"))))
    flow.go(flow.page_b, flow.b, "/")
    flow.page_b.locator("tr[data-vpg=g1]", has_text="recovery").wait_for()


def test_a_running_qemu_vm_is_added_in_the_browser(flow: Flow, tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon")
    with QemuStorageDaemon(tmp_path, tmp_path / "q.qcow2", fmt="qcow2", size=8 * MiB) as d:
        page = flow.go(flow.page_a, flow.a, "/create")
        form = page.locator("#qemu-vm-form")
        form.get_by_label("QEMU VM name").fill("qvm")
        form.get_by_label("QMP socket").fill(str(d.qmp_path))
        form.get_by_label("Block node").fill("nope")
        flow.console.expect("/vms", 422)
        form.get_by_role("button", name="Add QEMU VM").click()
        refused = form.locator(".message")
        refused.first.wait_for()
        assert "no block node 'nope'" in refused.first.inner_text()
        form.get_by_label("Block node").fill(d.node)
        form.get_by_role("button", name="Add QEMU VM").click()
        form.get_by_text("VM qvm added: 8.0 MiB in QEMU.").wait_for()
        page.get_by_label(re.compile(r"^qvm: disk0 8\.0 MiB")).wait_for()
    vm = ok(flow.a.client().get("/vms/qvm"))
    assert vm["volumes"][0]["path"].startswith("qemu:")


def test_the_rpo_chart_fills_while_writes_run(flow: Flow) -> None:
    stop = threading.Event()

    def writes() -> None:
        n = 0
        while not stop.is_set():
            qemu_io(f"{flow.a.nbd}/g1/vm1/disk0", f"write -P {n % 250 + 1} {n % 8}M 256k")
            n += 1
            time.sleep(0.5)

    writer = threading.Thread(target=writes, daemon=True)
    writer.start()
    try:
        page = flow.go(flow.page_a, flow.a, "/vpg/g1")
        page.get_by_role("heading", name="VPG g1").wait_for()
        first = _points(page, "#rpo-chart", 0)
        want = max(first + 2, 3)
        assert _points(page, "#rpo-chart", want) >= want
        assert page.locator("#rpo-chart polyline").count() == 1
        assert _points(page, "#throughput-chart", 1) >= 1
    finally:
        stop.set()
        writer.join(30)


def test_settings_edited_in_the_browser_are_saved(flow: Flow) -> None:
    page = flow.go(flow.page_a, flow.a, "/vpg/g1")
    form = page.locator("#settings-form")
    form.get_by_label("RPO alert seconds").fill("120")
    form.get_by_role("button", name="Save settings").click()
    form.get_by_text("Saved: rpo_alert_seconds.").wait_for()
    assert ok(flow.a.client().get("/vpgs/g1"))["settings"]["rpo_alert_seconds"] == 120
    flow.console.expect("/api/v1/vpgs/g1", 422)
    form.get_by_label("History seconds").fill("5")  # under its minimum: the API says so
    form.get_by_role("button", name="Save settings").click()
    form.get_by_text(re.compile(r"Refused \(422 invalid_request\)")).wait_for()


def test_a_checkpoint_tagged_in_the_browser_is_found_in_the_picker(flow: Flow) -> None:
    page = flow.go(flow.page_a, flow.a, "/vpg/g1")
    page.get_by_label("Tag a checkpoint now").fill("before-upgrade")
    page.get_by_role("button", name="Tag", exact=True).click()
    page.get_by_text(re.compile(r'Checkpoint \d+ tagged "before-upgrade"')).wait_for()
    picker = flow.go(flow.page_b, flow.b, "/vpg/g1/checkpoints")
    picker.get_by_label("Tag (exact)").fill("before-upgrade")
    picker.get_by_role("button", name="Search", exact=True).click()
    # the caption and the list change together: once it names the tag, the list is searched
    picker.get_by_text(re.compile(r'[1-9]\d* checkpoints tagged "before-upgrade"')).wait_for()
    row = picker.locator("#checkpoint-table tr[data-id]", has_text="before-upgrade")
    row.wait_for()
    assert picker.locator("#checkpoint-table tr[data-id]").count() == 1
    assert "tagged" in row.inner_text()
    flow.tagged["before-upgrade"] = int(row.get_attribute("data-id") or -1)
    picker.get_by_role("button", name="Show the last 1 minute").click()
    picker.get_by_text(re.compile(r"1 min shown, [1-9]\d* checkpoints")).wait_for()


PAGES = (("a", "login", None), ("a", "dashboard", "/"), ("a", "vpg", "/vpg/g1"),
         ("a", "create", "/create"), ("a", "alerts", "/alerts"),
         ("b", "dashboard", "/"), ("b", "vpg", "/vpg/g1"), ("b", "checkpoints",
         "/vpg/g1/checkpoints"), ("b", "operations", "/vpg/g1/operations"),
         ("b", "alerts", "/alerts"))


# every control a person can reach has a name: a label, or aria-label for the icon-like
UNLABELLED = """[...document.querySelectorAll('input, select, textarea, button')]
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
    && !(el.tagName === 'BUTTON' && el.textContent.trim()))
  .map((el) => el.outerHTML.slice(0, 80))"""


def test_every_page_fits_phone_and_desktop_widths_screenshots(flow: Flow) -> None:
    fresh = flow.browser.new_context()  # logged out: the login page
    login_page = flow.console.watch(fresh.new_page())
    try:
        for width in WIDTHS:
            for which, name, route in PAGES:
                site = flow.a if which == "a" else flow.b
                page = login_page if route is None else (
                    flow.page_a if which == "a" else flow.page_b)
                page.set_viewport_size({"width": width, "height": 800})
                page.goto(f"{site.api_url}/#{route or '/'}")
                if route is None:
                    page.get_by_label("API token").wait_for()
                else:
                    page.locator("main[data-ready]").wait_for()  # the page is drawn
                overflow = page.evaluate("document.documentElement.scrollWidth")
                assert overflow <= width, (which, name, width, overflow)
                unlabelled = page.evaluate(UNLABELLED)
                assert unlabelled == [], (which, name, unlabelled)
                page.screenshot(path=str(flow.shots / f"{which}-{name}-{width}.png"),
                                full_page=True)
    finally:
        fresh.close()
    assert len(list(flow.shots.glob("*.png"))) >= len(PAGES) * len(WIDTHS)
    print(f"screenshots in {flow.shots}")


def test_a_failover_test_starts_and_stops(flow: Flow) -> None:
    page = flow.go(flow.page_b, flow.b, "/vpg/g1/checkpoints")
    cid = flow.tagged["before-upgrade"]
    page.get_by_label("Tag (exact)").fill("before-upgrade")
    page.get_by_role("button", name="Search", exact=True).click()
    page.get_by_role("link", name=f"Recover checkpoint {cid}").click()
    page.get_by_role("heading", name="Operations on g1").wait_for()
    assert "succeeded" in _run(page, "test", "Start test")
    page.locator("#operation-state", has_text="testing").wait_for()
    page.get_by_text(re.compile(f"Failover test running at checkpoint {cid}")).wait_for()
    _wizard(page, "test").get_by_label("Note").fill("booted, app answers")
    assert "succeeded" in _run(page, "test", "Stop test")
    page.locator("#operation-state", has_text="replicating").wait_for()


def test_an_alert_raised_by_a_short_test_period_is_acknowledged(flow: Flow) -> None:
    page = flow.go(flow.page_b, flow.b, "/vpg/g1")
    form = page.locator("#settings-form")
    form.get_by_label("Test period days").fill("0.00001")  # overdue in a second
    form.get_by_role("button", name="Save settings").click()
    form.get_by_text("Saved: test_period_days.").wait_for()
    flow.go(page, flow.b, "/")
    page.locator("tr[data-vpg=g1]", has_text="test overdue").wait_for()
    flow.go(page, flow.b, "/alerts")
    row = page.locator("#alert-table tr[data-alert]", has_text="run a failover test")
    row.get_by_role("button", name=re.compile(r"^Acknowledge alert \d+$")).click()
    page.get_by_text(re.compile(r"^Alert \d+ acknowledged\.$")).wait_for()
    row.filter(has_text="acknowledged").wait_for()
    assert row.get_by_role("button").count() == 0
    page.locator("#event-table", has_text="test_overdue").wait_for()
    ok(flow.b.client().patch("/vpgs/g1/recovery-settings", json={"test_period_days": 3650}))


def test_an_operation_the_state_forbids_shows_its_reason(flow: Flow) -> None:
    flow.console.expect("/vpgs/g1/failover/commit", 409)
    page = flow.go(flow.page_b, flow.b, "/vpg/g1/operations")
    text = _run(page, "commit", "Commit")
    assert "Refused (409" in text and "no recovery operation running" in text, text


def test_a_failover_to_the_tagged_checkpoint_is_committed(flow: Flow) -> None:
    cid = flow.tagged["before-upgrade"]
    page = flow.go(flow.page_b, flow.b, f"/vpg/g1/operations?checkpoint={cid}")
    page.get_by_role("heading", name="Operations on g1").wait_for()
    assert "succeeded" in _run(page, "failover", "Fail over")
    page.locator("#failover-state", has_text=f"failed_over at checkpoint {cid}").wait_for()
    assert "succeeded" in _run(page, "commit", "Commit")
    status = ok(flow.b.client().get("/vpgs/g1/failover"))
    assert status["state"] == "committed" and status["checkpoint_id"] == cid, status
    page.locator("#failover-state", has_text="committed").wait_for()


def test_reverse_protection_and_failback_from_the_browser(flow: Flow) -> None:
    pair(flow.b, flow.a)  # beta learns alpha's replication address, to protect back to it
    page = flow.go(flow.page_b, flow.b, "/vpg/g1/operations")
    page.get_by_role("heading", name="Operations on g1").wait_for()
    assert "succeeded" in _run(page, "reverse", "Reverse", timeout=120_000)
    ca, cb = flow.a.client(), flow.b.client()
    wait_for("beta protecting g1", lambda: ok(cb.get("/vpgs/g1"))["role"] == "protected"
             and ok(cb.get("/vpgs/g1"))["state"] == "protecting", timeout=120)
    flow.go(page, flow.b, "/")
    page.locator("tr[data-vpg=g1]", has_text="protected").wait_for()
    page = flow.go(flow.page_b, flow.b, "/vpg/g1/operations")
    assert "succeeded" in _run(page, "failback", "Fail back", timeout=180_000)
    wait_for("alpha protecting g1 again", lambda: ok(ca.get("/vpgs/g1"))["role"] == "protected"
             and ok(ca.get("/vpgs/g1"))["state"] == "protecting", timeout=120)
    flow.go(flow.page_a, flow.a, "/")
    flow.page_a.locator("tr[data-vpg=g1]", has_text="protecting").wait_for()
