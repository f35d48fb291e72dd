"""The console in a real browser: Debian's Chromium, headless, driven through Playwright against a live gateway.

One gateway (the tiny model on the local backend, plus fal played by tests/fakes/fal.py) and one browser serve the
whole module; each test makes its own tenant. Every view is saved under ``test-artifacts/console/``; with
``HDG_UPDATE_SCREENSHOTS=1`` the README's images under ``docs/console/`` are written too.

Chromium is ``/usr/bin/chromium`` (``HDG_TEST_CHROMIUM`` names another). Without it the tests skip, naming the
command that installs it, unless ``CI`` is set: then they fail.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.backends.fal import FalBackend
from gateway.backends.local import LocalBackend
from gateway.settings import Settings
from inference.runner import HiDreamRunner
from inference.variants import VARIANTS
from tests.conftest import ADMIN_TOKEN, Gateway
from tests.fakes.fal import FakeFal
from tests.fakes.server import ServerThread

try:
    from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
except ImportError:  # the dev extra is not installed: the browser fixture says so
    sync_playwright = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "console"
DOCS = ROOT / "docs" / "console"
CHROMIUM = os.environ.get("HDG_TEST_CHROMIUM", "/usr/bin/chromium")
INSTALL = "apt-get install chromium chromium-driver"
WIDE, NARROW = 1280, 390
OPEN_SECONDS = 6.0  # fal's breaker, once open, stays open this long: long enough to see it, short to wait out
SESSION_ENDED = "Your session ended: this key was revoked."


def _missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if sync_playwright is None:
        return "playwright is not installed: pip install -e '.[dev]'"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM}: {INSTALL} (or point HDG_TEST_CHROMIUM at one)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module (each test opens its own context: its own cookies)."""
    if (reason := _missing()) is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the console's browser tests cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


class Live(Gateway):
    """The module's gateway, plus the fake fal behind its second backend."""

    fal: FakeFal

    def __init__(self, fal: FakeFal, **fields: Any) -> None:
        super().__init__(**fields)
        self.fal = fal

    def readyz_backends(self) -> dict[str, str]:
        backends: dict[str, str] = self.client.get("/readyz").json()["checks"]["backends"]
        return backends


async def _close(local: LocalBackend, outbound: httpx.AsyncClient) -> None:
    await local.aclose()
    await outbound.aclose()


@pytest.fixture(scope="module")
def live(browser: Browser, runner: HiDreamRunner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A gateway on SQLite whose backends are the tiny model (``local``) and the fake fal (``fal``)."""
    tmp = tmp_path_factory.mktemp("console")
    with FakeFal() as fal:
        settings = Settings(
            database_url=f"sqlite+aiosqlite:///{tmp / 'gateway.db'}",
            data_dir=tmp / "data",
            admin_token=ADMIN_TOKEN,
            backends=["local", "fal"],
            fal_key=fal.key,
            fal_base_url=fal.url,
            fal_output_hosts=[fal.url],
            provider_poll_seconds=0.05,
            breaker_open_seconds=OPEN_SECONDS,
        )
        local = LocalBackend(lambda: runner, variants=frozenset(VARIANTS), queue_size=8)
        local.start()
        # No idle connections are kept: the pool then holds nothing tied to the server thread's event loop.
        outbound = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
        remote = FalBackend(
            outbound,
            key=fal.key,
            apps=settings.fal_apps,
            base_url=fal.url,
            poll_seconds=0.05,
            output_hosts=[fal.url],
        )
        server = ServerThread(create_app(settings, backends=[local, remote])).start()
        url = f"http://127.0.0.1:{server.port}"
        client = httpx.Client(base_url=url, timeout=120)
        try:
            gw = Live(fal, url=url, settings=settings, backend=local, client=client)
            deadline = time.monotonic() + 60
            while gw.readyz_backends() != {"local": "up", "fal": "up"} and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gw.readyz_backends() == {"local": "up", "fal": "up"}
            yield gw
        finally:
            client.close()
            server.stop()
            # Playwright's sync API runs an event loop on this thread: close these on a thread of their own.
            closer = threading.Thread(target=lambda: asyncio.run(_close(local, outbound)))
            closer.start()
            closer.join(60)


@pytest.fixture
def page(browser: Browser, live: Live) -> Iterator[Page]:
    """A fresh browser context (no cookies) at 1280 px, its base URL the gateway.

    Afterwards, the page must have logged no script error and no Content-Security-Policy violation (an inline
    script or style the policy blocked): a page that works only with them broken is not what users see.
    """
    context = browser.new_context(base_url=live.url, viewport={"width": WIDE, "height": 800})
    context.set_default_timeout(30_000)
    problems: list[str] = []
    try:
        opened = context.new_page()
        opened.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        opened.on(
            "console",
            # A page answered 401, 403 or 404 (a refused sign-in, say) is logged too: that is no fault of the page.
            lambda msg: (
                problems.append(msg.text)
                if msg.type == "error" and not msg.text.startswith("Failed to load resource")
                else None
            ),
        )
        yield opened
    finally:
        context.close()
    assert problems == [], "the browser logged errors"


def shot(page: Page, name: str, *, readme: bool = False, readme_height: int = 2400) -> None:
    """Save the whole page as a test artefact; with HDG_UPDATE_SCREENSHOTS=1 a README image goes to docs/console/,
    the page's top ``readme_height`` pixels (long pages end in long tables that say little in a picture).
    """
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)
    if readme and os.environ.get("HDG_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        size = page.viewport_size or {"width": WIDE, "height": 800}
        tall: int = page.evaluate("() => document.documentElement.scrollHeight")
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(tall, readme_height)}
        page.screenshot(path=DOCS / f"{name}.png", full_page=True, clip=clip)  # type: ignore[arg-type]


def sign_in(page: Page, secret: str) -> None:
    page.goto("/console")
    page.get_by_label("API key or admin token").fill(secret)
    page.get_by_role("button", name="Sign in").click()


def heading(page: Page, text: str) -> None:
    expect(page.get_by_role("heading", level=1)).to_have_text(text)


def nav(page: Page, link: str) -> None:
    page.get_by_role("navigation", name="Console").get_by_role("link", name=link, exact=True).click()


def rows(table: Locator) -> list[dict[str, str]]:
    """A table's body rows as {column header: cell text}."""
    found: list[dict[str, str]] = table.evaluate(
        """t => {
            const heads = [...t.querySelectorAll('thead th')].map(th => th.innerText.trim());
            return [...t.querySelectorAll('tbody tr')].map(tr => Object.fromEntries(
                [...tr.children].map((cell, i) => [heads[i] ?? String(i), cell.innerText.trim()])));
        }"""
    )
    return found


def money(text: str) -> Decimal:
    """The first dollar amount in ``text`` ("$0.03 of $10.00 used" -> 0.03)."""
    found = re.search(r"\$\s*([0-9][0-9,]*(?:\.[0-9]+)?)", text)
    assert found is not None, f"no dollar amount in {text!r}"
    return Decimal(found.group(1).replace(",", ""))


def number(text: str) -> Decimal:
    found = re.search(r"-?[0-9][0-9,]*(?:\.[0-9]+)?", text)
    assert found is not None, f"no number in {text!r}"
    return Decimal(found.group(0).replace(",", ""))


def image_loaded(image: Locator) -> bool:
    expect(image).to_be_visible()
    loaded: bool = image.evaluate("img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0")
    return loaded


def overflow(page: Page) -> int:
    """How many pixels the page is wider than the viewport (0 when nothing scrolls sideways)."""
    wider: int = page.evaluate(
        "() => Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
        " - document.documentElement.clientWidth"
    )
    return wider


def broken_words(page: Page) -> list[str]:
    """Words in table cells split across lines (a squeezed table, where it should have scrolled sideways).

    Breaking at a hyphen is fine ("hidream-i1-" / "fast"); breaking an id or an amount mid-way is not.
    """
    found: list[str] = page.evaluate(
        """() => {
            const broken = [];
            for (const cell of document.querySelectorAll('td, th')) {
                const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
                for (let node = walker.nextNode(); node; node = walker.nextNode()) {
                    for (const word of node.data.matchAll(/[^\\s-]+/g)) {
                        const range = document.createRange();
                        range.setStart(node, word.index);
                        range.setEnd(node, word.index + word[0].length);
                        const lines = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
                        if (lines.size > 1) broken.push(word[0]);
                    }
                }
            }
            return broken;
        }"""
    )
    return found


def unlabelled(page: Page) -> list[str]:
    """Form fields without a label, buttons and links without a name, images without alt text."""
    found: list[str] = page.evaluate(
        """() => {
            const named = el => (el.getAttribute('aria-label') || '').trim() || el.getAttribute('aria-labelledby');
            const alts = el => [...el.querySelectorAll('img[alt]')].map(img => img.alt).join(' ');
            const text = el => (el.innerText || el.value || alts(el) || '').trim();
            const bad = [];
            for (const el of document.querySelectorAll('input, select, textarea')) {
                if (['hidden', 'submit', 'button', 'reset'].includes(el.type)) continue;
                const labels = [...(el.labels || [])].filter(l => l.innerText.trim());
                if (!labels.length && !named(el)) bad.push(el.outerHTML);
            }
            for (const el of document.querySelectorAll('button, input[type=submit], a[href]')) {
                if (!text(el) && !named(el)) bad.push(el.outerHTML);
            }
            for (const el of document.querySelectorAll('img')) {
                if (!el.hasAttribute('alt')) bad.push(el.outerHTML);
            }
            return bad;
        }"""
    )
    return found


def generate_in_playground(page: Page, prompt: str, *, seed: int) -> None:
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Seed").fill(str(seed))
    steps = page.get_by_label("Steps")
    if steps.count():
        steps.fill("2")
    page.get_by_role("button", name="Generate").click()


def tab_to(page: Page, target: Locator, *, presses: int = 15) -> None:
    """Press Tab until ``target`` has the focus (failing if it never gets it)."""
    for _ in range(presses):
        if target.evaluate("el => el === document.activeElement"):
            break
        page.keyboard.press("Tab")
    expect(target).to_be_focused()


def test_sign_in_with_the_keyboard_only(page: Page, live: Live) -> None:
    tenant = live.create_tenant("keyboard-co")
    page.goto("/console")
    heading(page, "Sign in")
    shot(page, "sign-in")

    field = page.get_by_label("API key or admin token")
    expect(field).to_have_attribute("type", "password")
    tab_to(page, field)  # from the top of the page
    page.keyboard.type("hdg_not-a-real-key")
    page.keyboard.press("Enter")
    expect(page.get_by_text("That key or token was not recognised.")).to_be_visible()
    assert [c["name"] for c in page.context.cookies()] == []  # a wrong key gets no session

    tab_to(page, page.get_by_label("API key or admin token"))  # the form again, the field empty
    expect(page.get_by_label("API key or admin token")).to_have_value("")
    page.keyboard.type(tenant["api_key"])
    page.keyboard.press("Enter")
    heading(page, "Overview")
    expect(page.get_by_role("banner")).to_contain_text("keyboard-co")
    assert tenant["api_key"] not in page.url

    # The first Tab reaches the skip link; the nav is then reachable and visibly focused.
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name=re.compile("skip to content", re.IGNORECASE))
    expect(skip).to_be_focused()
    keys_link = page.get_by_role("navigation", name="Console").get_by_role("link", name="Keys", exact=True)
    tab_to(page, keys_link)
    ring = keys_link.evaluate(
        "el => { const s = getComputedStyle(el); return [s.outlineStyle, s.outlineWidth, s.boxShadow]; }"
    )
    assert (ring[0] != "none" and ring[1] != "0px") or ring[2] != "none", f"no visible focus: {ring}"
    page.keyboard.press("Enter")
    heading(page, "API keys")


def test_playground_makes_an_image_and_the_overview_shows_the_usage_and_spend(page: Page, live: Live) -> None:
    tenant = live.create_tenant("studio-north", monthly_budget_usd="10", allowed_backends=["local"])
    key = tenant["api_key"]
    for model in ("hidream-i1-dev", "hidream-i1-full"):  # some usage beforehand, so the chart has a stack
        assert live.generate(key, model=model, num_inference_steps=2, size="512x512").status_code == 200
    sign_in(page, key)
    heading(page, "Overview")
    budget = page.get_by_role("region", name="Budget this month")
    if not budget.count():
        budget = page.locator("section", has=page.get_by_role("heading", name="Budget this month"))
    expect(budget).to_contain_text("$10.00")
    spent_before = money(budget.inner_text())
    images_before = rows(page.get_by_role("table", name="Images per day"))
    assert sum(number(r["Total"]) for r in images_before) == 2

    nav(page, "Playground")
    heading(page, "Playground")
    expect(page.get_by_label("Model")).to_have_value("hidream-i1-fast")
    generate_in_playground(page, "a lighthouse at dusk, oil painting", seed=4242)
    image = page.get_by_role("img", name="Generated image")
    assert image_loaded(image)
    src = image.get_attribute("src") or ""
    assert key not in src and "/files/" in src
    main = page.get_by_role("main")
    expect(main).to_contain_text("4242")
    expect(main).to_contain_text("local")
    expect(page.get_by_role("heading", name="Same request as code")).to_be_visible()
    for title in ("curl", "Python (openai)", "Python (replicate)"):
        expect(page.get_by_text(title, exact=True).first).to_be_attached()
    assert key not in page.content()  # the samples read $HDG_API_KEY
    expect(main).to_contain_text("HDG_API_KEY")
    shot(page, "playground", readme=True)

    # The image's own bytes: what the page links to is a real PNG of the size asked for.
    fetched = httpx.get(live.url + src if src.startswith("/") else src, timeout=30)
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")

    # The result is a page of its own (POST-redirect-GET): reloading it shows the same image and bills nothing.
    expect(page).to_have_url(re.compile(r"/console/playground\?prediction=gen_[0-9a-f]+$"))
    page.reload()
    assert image_loaded(page.get_by_role("img", name="Generated image"))
    expect(page.get_by_label("Prompt")).to_have_value("a lighthouse at dusk, oil painting")

    nav(page, "Overview")
    heading(page, "Overview")
    spent_after = money(budget.inner_text())
    assert spent_after > spent_before
    images = rows(page.get_by_role("table", name="Images per day"))
    spend = rows(page.get_by_role("table", name="Spend per day (USD)"))
    assert sum(number(r["Total"]) for r in images) == 3
    report = live.client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    shown_spend = sum(number(r["Total"]) for r in spend)
    assert shown_spend > 0
    assert Decimal(report["total"]["price_usd"]).quantize(shown_spend) == shown_spend  # to the digits shown
    chart = page.get_by_role("img", name=re.compile("Images per day"))
    expect(chart).to_be_visible()
    tips = chart.locator("rect > title").all_text_contents()  # one stacked segment per model, each with its hover
    assert sorted(t.split(" ", 1)[1] for t in tips) == [
        "hidream-i1-dev: 1",
        "hidream-i1-fast: 1",
        "hidream-i1-full: 1",
    ]
    expect(page.get_by_role("img", name=re.compile(r"Spend per day"))).to_be_visible()
    shot(page, "overview", readme=True)

    page.get_by_role("link", name="By backend").click()
    expect(page).to_have_url(re.compile(r"by=backend"))
    header = page.get_by_role("table", name="Images per day").locator("thead").inner_text()
    assert "local" in header and "hidream-i1-dev" not in header

    nav(page, "Predictions")
    heading(page, "Predictions")
    listed = rows(page.get_by_role("table", name="Recent predictions"))
    assert len(listed) == 3 and all(r["Status"] == "succeeded" for r in listed)
    assert {r["Model"] for r in listed} == {"hidream-i1-fast", "hidream-i1-dev", "hidream-i1-full"}
    thumbs = page.get_by_role("img", name=re.compile("^Thumbnail of"))
    expect(thumbs).to_have_count(3)
    assert all(image_loaded(thumbs.nth(i)) for i in range(3))
    shot(page, "predictions", readme=True)


def test_the_code_samples_run_as_shown(page: Page, live: Live, tmp_path: Path) -> None:
    key = live.create_tenant("sample-runner", allowed_backends=["local"])["api_key"]
    sign_in(page, key)
    nav(page, "Playground")
    generate_in_playground(page, "a paper boat", seed=7)
    expect(page.get_by_role("img", name="Generated image")).to_be_visible()
    env = {**os.environ, "HDG_API_KEY": key}
    samples = {
        "curl": ["bash", "-c"],
        "Python (openai)": [sys.executable, "-c"],
        "Python (replicate)": [sys.executable, "-c"],
    }
    for title, command in samples.items():
        code = page.get_by_role("region", name=title, exact=True).locator("pre").inner_text()
        assert key not in code and "HDG_API_KEY" in code
        done = subprocess.run([*command, code], cwd=tmp_path, env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, f"{title}: {done.stderr.decode()}"
        assert live.url.encode() in done.stdout, f"{title} printed no image URL: {done.stdout!r}"
    usage = live.client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["total"]["images"] == 4  # the playground's image and one per sample
    events = live.client.get("/v1/usage/events", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert {(e["model"], e["width"], e["height"], e["status"]) for e in events} == {
        ("hidream-i1-fast", 1024, 1024, "succeeded")
    }  # the samples ask for what the playground did


def test_a_refused_generation_shows_the_apis_reason(page: Page, live: Live) -> None:
    key = live.create_tenant("no-budget-ltd", monthly_budget_usd="0", allowed_backends=["local"])["api_key"]
    api = live.generate(key)
    assert api.status_code == 402
    sign_in(page, key)
    nav(page, "Playground")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/console/playground")) as sent:
        generate_in_playground(page, "anything at all", seed=1)
    assert sent.value.status == 402
    expect(page.get_by_role("heading", name="The request was refused")).to_be_visible()
    expect(page.get_by_role("main")).to_contain_text(api.json()["error"]["message"])
    expect(page.get_by_role("img", name="Generated image")).to_have_count(0)
    expect(page.get_by_label("Prompt")).to_have_value("anything at all")  # nothing typed is lost


def test_a_new_key_is_shown_once_and_a_revoked_key_is_refused(page: Page, live: Live, browser: Browser) -> None:
    first = live.create_tenant("keys-and-co")["api_key"]
    sign_in(page, first)
    nav(page, "Keys")
    heading(page, "API keys")
    page.get_by_role("button", name="Create key").click()
    shown = page.get_by_label("New API key")
    expect(shown).to_be_visible()
    new_key = shown.inner_text().strip()
    assert new_key.startswith("hdg_") and new_key != first
    expect(page.get_by_text("Copy this key now: it will not be shown again.")).to_be_visible()
    assert new_key not in page.url
    shot(page, "keys", readme=True)

    ok = live.client.get("/v1/usage", headers={"Authorization": f"Bearer {new_key}"})
    assert ok.status_code == 200  # it works on the API (and is now in the API's key cache)

    nav(page, "Keys")
    assert new_key not in page.content()  # shown once
    table = page.get_by_role("table", name="Keys")
    listed = rows(table)
    assert len(listed) == 2 and all(r["Status"] == "active" for r in listed)
    new_row = table.locator("tbody tr").filter(has_text=new_key[:10])
    expect(new_row).to_have_count(1)
    new_row.get_by_role("button", name="Revoke").click()
    heading(page, "API keys")
    expect(table.locator("tbody tr").filter(has_text=new_key[:10])).to_contain_text("revoked")

    refused = live.client.get("/v1/usage", headers={"Authorization": f"Bearer {new_key}"})
    assert refused.status_code == 403  # at once, though the key was cached a moment ago
    assert refused.json()["error"]["code"] == "api_key_revoked"

    other = browser.new_context(base_url=live.url)
    try:
        elsewhere = other.new_page()
        sign_in(elsewhere, new_key)
        expect(elsewhere.get_by_text("This API key has been revoked.")).to_be_visible()
        assert other.cookies() == []
    finally:
        other.close()

    # Revoking the key this session signed in with ends the session.
    assert live.client.get("/v1/usage", headers={"Authorization": f"Bearer {first}"}).status_code == 200
    table.locator("tbody tr").filter(has_text=first[:10]).get_by_role("button", name="Revoke").click()
    heading(page, "Sign in")
    expect(page.get_by_text(SESSION_ENDED)).to_be_visible()
    page.goto("/console/overview")
    heading(page, "Sign in")
    assert live.client.get("/v1/usage", headers={"Authorization": f"Bearer {first}"}).status_code == 403


def test_the_webhooks_page_shows_the_signing_secret(page: Page, live: Live) -> None:
    key = live.create_tenant("hooks-inc")["api_key"]
    sign_in(page, key)
    nav(page, "Webhooks")
    heading(page, "Webhooks")
    secret = page.get_by_label("Webhook signing secret").inner_text().strip()
    api = live.client.get("/v1/webhooks/default/secret", headers={"Authorization": f"Bearer {key}"}).json()
    assert secret == api["key"] and secret.startswith("whsec_")
    for header in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        expect(page.get_by_role("main")).to_contain_text(header)
    shot(page, "webhooks", readme=True)


def _backend_row(page: Page, name: str) -> dict[str, str]:
    for row in rows(page.get_by_role("table", name="Backends")):
        if row["Name"] == name:
            return row
    raise AssertionError(f"no row for {name}")


def _refresh(page: Page) -> None:
    page.get_by_role("link", name="Refresh").click()
    heading(page, "Backends")


def test_admin_sees_a_backend_go_down_and_come_back(page: Page, live: Live) -> None:
    farm = live.create_tenant("render-farm", allowed_backends=["fal"])["api_key"]
    assert live.generate(farm).headers["X-HDG-Backend"] == "fal"

    sign_in(page, ADMIN_TOKEN)
    heading(page, "Tenants")
    expect(page.get_by_role("banner")).to_contain_text("Admin")
    tenants = {r["Name"]: r for r in rows(page.get_by_role("table", name="Tenants"))}
    assert "render-farm" in tenants and tenants["render-farm"]["Status"] == "active"
    shot(page, "admin-tenants", readme=True)

    nav(page, "Backends")
    heading(page, "Backends")
    assert _backend_row(page, "fal")["State"] == "up" and _backend_row(page, "local")["State"] == "up"
    assert _backend_row(page, "fal")["Kind"] == "fal"

    live.fal.faults.error_rate = 1.0  # fal answers every request 500 from now on
    for _ in range(10):
        failed = live.generate(farm)
        assert failed.status_code in (502, 503), failed.text
        if live.readyz_backends()["fal"] == "open":
            break
    _refresh(page)
    down = _backend_row(page, "fal")
    assert down["State"] == "open"
    assert number(down["Error rate"]) > 0
    assert _backend_row(page, "local")["State"] == "up"
    shot(page, "admin-backends-open")

    nav(page, "Failures")
    heading(page, "Recent failures")
    failures = rows(page.get_by_role("table", name="Recent failures"))
    assert failures and all(r["Tenant"] == "render-farm" and r["Backend"] == "fal" for r in failures)
    assert "Internal server error" in failures[0]["Error"]  # the provider's own words, for the admin
    shot(page, "admin-failures", readme=True)

    live.fal.faults.reset()  # fal is fine again; its breaker lets a trial through once it has waited
    deadline = time.monotonic() + OPEN_SECONDS + 20
    while (back := live.generate(farm)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert back.status_code == 200 and back.headers["X-HDG-Backend"] == "fal"
    nav(page, "Backends")
    heading(page, "Backends")
    assert _backend_row(page, "fal")["State"] == "up"
    shot(page, "admin-backends", readme=True)


TENANT_PAGES = {
    "overview": "Overview",
    "playground": "Playground",
    "predictions": "Predictions",
    "keys": "API keys",
    "webhooks": "Webhooks",
}
ADMIN_PAGES = {"admin/tenants": "Tenants", "admin/backends": "Backends", "admin/failures": "Recent failures"}


def test_every_view_fits_1280_and_390_pixels_and_labels_its_fields(page: Page, live: Live) -> None:
    key = live.create_tenant("narrow-screens", monthly_budget_usd="5", allowed_backends=["local"])["api_key"]
    assert live.generate(key, size="512x512").status_code == 200

    def check(name: str) -> None:
        for width in (WIDE, NARROW):
            page.set_viewport_size({"width": width, "height": 800})
            assert overflow(page) <= 0, f"{name} scrolls sideways at {width} px"
            assert broken_words(page) == [], f"{name} squeezes its tables at {width} px"
        assert unlabelled(page) == [], f"{name} has unlabelled elements"
        shot(page, f"{name}-mobile")
        page.set_viewport_size({"width": WIDE, "height": 800})

    page.goto("/console/sign-in")
    check("sign-in")
    sign_in(page, key)
    for path, title in TENANT_PAGES.items():
        page.goto(f"/console/{path}")
        heading(page, title)
        check(path)

    page.set_viewport_size({"width": NARROW, "height": 800})  # a phone fills in the playground
    page.goto("/console/playground")
    generate_in_playground(page, "a tiny robot watering plants", seed=11)
    assert image_loaded(page.get_by_role("img", name="Generated image"))
    assert overflow(page) <= 0, "the playground's result scrolls sideways at 390 px"
    shot(page, "playground-mobile", readme=True)
    page.set_viewport_size({"width": WIDE, "height": 800})
    assert overflow(page) <= 0 and unlabelled(page) == []

    page.get_by_role("button", name="Sign out").click()
    heading(page, "Sign in")
    page.goto("/console/overview")
    heading(page, "Sign in")  # signed out for real

    sign_in(page, ADMIN_TOKEN)
    for path, title in ADMIN_PAGES.items():
        page.goto(f"/console/{path}")
        heading(page, title)
        check(path.replace("/", "-"))
