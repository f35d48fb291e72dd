"""The web console over real HTTP: sign-in and sessions, CSRF, every page, the playground's one billed image."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import html
import io
import logging
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from PIL import Image

from gateway.console.pages import CSP
from tests.conftest import ADMIN_TOKEN, Gateway, GatewayFactory, fal_only
from tests.fakes.fal import FakeFal

CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')
NEW_KEY = re.compile(r'aria-label="New API key">(hdg_[A-Za-z0-9_-]+)<')


def browser(gw: Gateway) -> httpx.Client:
    """A client with its own cookie jar, like one browser; redirects are left to the test, to see them."""
    return httpx.Client(base_url=gw.url, timeout=120, follow_redirects=False)


def sign_in(gw: Gateway, token: str) -> httpx.Client:
    client = browser(gw)
    resp = client.post("/console/sign-in", data={"token": token})
    assert resp.status_code == 303, resp.text
    return client


def csrf_of(client: httpx.Client, path: str = "/console/keys") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    match = CSRF.search(page.text)
    assert match is not None
    return match[1]


def text_of(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()


def table(page: str, caption: str) -> tuple[list[str], list[list[str]]]:
    """The header and body rows (as cell text) of the table with ``caption``."""
    body = page.split(f"<caption>{caption}</caption>", 1)[1].split("</table>", 1)[0]
    head, rows = body.split("</thead>", 1)
    header = [text_of(c) for c in re.findall(r"<th[^>]*>(.*?)</th>", head, re.S)]
    cells = [
        [text_of(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r, re.S)]
        for r in re.findall(r"<tr>(.*?)</tr>", rows, re.S)
    ]
    return header, cells


def playground_form(client: httpx.Client, **fields: str) -> dict[str, str]:
    return {
        "csrf": csrf_of(client, "/console/playground"),
        "model": "hidream-i1-fast",
        "size": "1024x1024",
        "steps": "2",
    } | fields


def generate(client: httpx.Client, **fields: str) -> httpx.Response:
    """Generate in the playground: a 303 to the result's own page (POST-redirect-GET), and that page."""
    made = client.post("/console/playground", data=playground_form(client, **fields))
    assert made.status_code == 303, made.text
    where = made.headers["location"]
    assert re.fullmatch(r"/console/playground\?prediction=gen_[0-9a-f]+", where), where
    result = client.get(where)
    assert result.status_code == 200, result.text
    return result


def ended_page(client: httpx.Client, path: str, reason: str) -> str:
    """Follow a page that must end the session: to the sign-in page, cookie cleared, with why."""
    resp = client.get(path)
    assert resp.status_code == 303 and resp.headers["location"] == f"/console/sign-in?ended={reason}", resp.text
    assert 'hdg_console=""' in resp.headers["set-cookie"] and "Max-Age=0" in resp.headers["set-cookie"]
    page = client.get(resp.headers["location"])
    assert page.status_code == 200 and "<h1>Sign in</h1>" in page.text
    return page.text


# -- sign-in, cookies and headers ----------------------------------------------------------------------------------


def test_sign_in_sets_a_strict_http_only_cookie_and_stores_only_its_hash(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    tenant = gw.create_tenant()
    client = browser(gw)
    assert client.get("/console").headers["location"] == "/console/sign-in"
    resp = client.post("/console/sign-in", data={"token": tenant["api_key"]})
    assert resp.status_code == 303 and resp.headers["location"] == "/console/overview"
    cookie = resp.headers["set-cookie"]
    value = client.cookies["hdg_console"]
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")[1:]}
    assert set(flags) == {"httponly", "max-age", "path", "samesite"}  # no Secure on plain http
    assert flags["max-age"] == "Max-Age=43200" and flags["path"] == "Path=/console"
    assert flags["samesite"].lower() == "samesite=strict"
    assert tenant["api_key"] not in cookie and len(value) >= 43
    db = sqlite3.connect(str(gw.settings.resolved_database_url).split("///", 1)[1])
    rows = db.execute("SELECT token_hash, role, tenant_id, api_key_id FROM console_sessions").fetchall()
    assert rows == [(hashlib.sha256(value.encode()).hexdigest(), "tenant", tenant["tenant_id"], tenant["key_id"])]
    assert client.get("/console").headers["location"] == "/console/overview"
    assert client.get("/console/sign-in").headers["location"] == "/console/overview"  # already signed in

    admin = sign_in(gw, ADMIN_TOKEN)
    assert admin.get("/console").headers["location"] == "/console/admin"
    assert admin.get("/console/overview").headers["location"] == "/console/admin"  # the admin has no tenant pages
    refused = client.get("/console/admin/backends")
    assert refused.status_code == 403 and "<h1>Forbidden</h1>" in refused.text

    # Signing out deletes the row: the old cookie is worth nothing afterwards.
    out = client.post("/console/sign-out", data={"csrf": csrf_of(client)})
    assert out.headers["location"] == "/console/sign-in?ended=signed-out" and "Max-Age=0" in out.headers["set-cookie"]
    again = httpx.get(f"{gw.url}/console/keys", cookies={"hdg_console": value})
    assert again.status_code == 303 and again.headers["location"] == "/console/sign-in"
    assert db.execute("SELECT count(*) FROM console_sessions WHERE role = 'tenant'").fetchone() == (0,)


def test_the_cookie_is_secure_when_configured(make_gateway: GatewayFactory, sqlite_url: str) -> None:
    gw = make_gateway(sqlite_url, console_secure_cookie=True, console_session_hours=1)
    resp = browser(gw).post("/console/sign-in", data={"token": ADMIN_TOKEN})
    assert "; secure" in resp.headers["set-cookie"].lower() and "Max-Age=3600" in resp.headers["set-cookie"]


def test_wrong_revoked_and_blank_credentials_get_the_form_again_and_failures_are_throttled(
    make_gateway: GatewayFactory, sqlite_url: str
) -> None:
    gw = make_gateway(sqlite_url, console_sign_in_failures=3)
    tenant, revoked = gw.create_tenant(), gw.create_tenant()
    gw.admin("POST", f"/admin/keys/{revoked['key_id']}/revoke")
    client = browser(gw)
    blank = client.post("/console/sign-in", data={"token": "  "})
    assert blank.status_code == 400 and "Enter an API key or the admin token." in blank.text
    wrong = client.post("/console/sign-in", data={"token": "hdg_not-a-key"})
    assert wrong.status_code == 401 and "That key or token was not recognised." in wrong.text
    assert 'aria-describedby="token-error"' in wrong.text and "set-cookie" not in wrong.headers
    gone = client.post("/console/sign-in", data={"token": revoked["api_key"]})
    assert (
        gone.status_code == 403 and "This API key has been revoked." in gone.text and "set-cookie" not in gone.headers
    )
    client.post("/console/sign-in", data={"token": "wrong-admin-token"})
    # Three failures from this address in a minute: even the right key waits now.
    throttled = client.post("/console/sign-in", data={"token": tenant["api_key"]})
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
    assert "Too many failed sign-ins" in throttled.text and "set-cookie" not in throttled.headers


def test_every_console_answer_carries_the_security_headers(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    client = sign_in(gw, gw.create_tenant()["api_key"])
    page = client.get("/console/overview")
    css_url = re.search(r'href="(/console/static/console\.css\?v=[0-9a-f]+)"', page.text)
    assert css_url is not None
    answers = {
        "page": page,
        "sign-in": browser(gw).get("/console/sign-in"),
        "redirect": browser(gw).get("/console/keys"),
        "unknown page": client.get("/console/no-such-page"),
        "bad query": client.get("/console/overview?by=tenant"),
        "static": client.get(css_url[1]),
    }
    for name, resp in answers.items():
        assert resp.headers["content-security-policy"] == CSP, name
        assert resp.headers["x-frame-options"] == "DENY", name
        assert resp.headers["referrer-policy"] == "same-origin", name
        assert resp.headers["x-content-type-options"] == "nosniff", name
    assert answers["unknown page"].status_code == 404 and "<h1>Not found</h1>" in answers["unknown page"].text
    assert answers["bad query"].status_code == 400
    assert page.headers["cache-control"] == "no-store"
    assert answers["static"].headers["cache-control"] == "public, max-age=31536000, immutable"
    assert answers["static"].headers["content-type"].startswith("text/css") and b"--accent" in answers["static"].content
    assert client.get("/console/static/console.js").headers["cache-control"] == "no-cache"  # no hash: revalidate
    assert client.get("/console/static/..%2Fsessions.py").status_code == 404
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline: the CSP forbids it
    assert "/console" not in httpx.get(f"{gw.url}/openapi.json").text  # not part of the API's schema


# -- CSRF ----------------------------------------------------------------------------------------------------------


def test_forms_without_this_sessions_csrf_token_or_from_another_site_change_nothing(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    tenant = gw.create_tenant()
    client, other = sign_in(gw, tenant["api_key"]), sign_in(gw, tenant["api_key"])
    token, others = csrf_of(client), csrf_of(other)
    assert token != others  # bound to the session's cookie
    attempts = [
        ({}, {}),
        ({"csrf": "0" * 64}, {}),
        ({"csrf": others}, {}),
        ({"csrf": token}, {"Origin": "https://evil.example"}),
        ({"csrf": token}, {"Sec-Fetch-Site": "cross-site"}),
    ]
    for form, headers in attempts:
        resp = client.post("/console/keys", data=form, headers=headers)
        assert resp.status_code == 403 and "<h1>Forbidden</h1>" in resp.text, (form, headers)
        resp = client.post(f"/console/keys/{tenant['key_id']}/revoke", data=form, headers=headers)
        assert resp.status_code == 403, (form, headers)
    assert len(gw.admin("GET", f"/admin/tenants/{tenant['tenant_id']}/keys").json()["data"]) == 1
    assert client.get("/console/keys").status_code == 200  # not revoked: the session goes on
    cross = browser(gw).post(
        "/console/sign-in", data={"token": ADMIN_TOKEN}, headers={"Origin": "https://evil.example"}
    )
    assert cross.status_code == 403 and "set-cookie" not in cross.headers
    made = client.post(
        "/console/keys", data={"csrf": token}, headers={"Origin": gw.url, "Sec-Fetch-Site": "same-origin"}
    )
    assert made.status_code == 201
    assert len(gw.admin("GET", f"/admin/tenants/{tenant['tenant_id']}/keys").json()["data"]) == 2
    not_a_form = client.post("/console/keys", json={"csrf": token})
    assert not_a_form.status_code == 400 and "application/x-www-form-urlencoded" in not_a_form.text


# -- sessions end at once ------------------------------------------------------------------------------------------


def test_a_revoked_key_ends_its_sessions_at_once_and_is_refused_by_the_api(gateway: Gateway) -> None:
    gw = gateway
    tenant = gw.create_tenant()
    client = sign_in(gw, tenant["api_key"])
    created = client.post("/console/keys", data={"csrf": csrf_of(client)})
    assert created.status_code == 201 and "Copy this key now: it will not be shown again." in created.text
    match = NEW_KEY.search(created.text)
    assert match is not None
    new_key = match[1]
    assert new_key not in client.get("/console/keys").text  # shown once
    bearer = {"Authorization": f"Bearer {new_key}"}
    assert gw.client.get("/v1/usage", headers=bearer).status_code == 200  # cached by the API's authenticator now
    second = sign_in(gw, new_key)
    assert second.get("/console/overview").status_code == 200

    header, rows = table(client.get("/console/keys").text, "Keys")
    assert header[:4] == ["Prefix", "Created", "Last used", "Status"]
    row = next(r for r in rows if r[0].startswith(new_key[:12]))
    assert row[2:4] == ["never", "active"]
    key_id = re.search(r"/console/keys/(key_[0-9a-f]+)/revoke", client.get("/console/keys").text.split(new_key[:12])[1])
    assert key_id is not None
    revoked = client.post(f"/console/keys/{key_id[1]}/revoke", data={"csrf": csrf_of(client)})
    assert revoked.status_code == 303 and revoked.headers["location"] == "/console/keys"
    assert gw.client.get("/v1/usage", headers=bearer).status_code == 403  # at once, despite the key cache
    rows = table(client.get("/console/keys").text, "Keys")[1]
    assert next(r for r in rows if r[0].startswith(new_key[:12]))[3] == "revoked"
    assert "Your session ended: this key was revoked." in ended_page(second, "/console/keys", "revoked")

    # The key this session signed in with, revoked through the admin API: the very next page is the sign-in page.
    gw.admin("POST", f"/admin/keys/{tenant['key_id']}/revoke")
    assert "Your session ended: this key was revoked." in ended_page(client, "/console/overview", "revoked")
    assert client.get("/console/overview").headers["location"] == "/console/sign-in"  # the row is gone


def test_a_disabled_tenant_ends_its_sessions(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    tenant = gw.create_tenant()
    client = sign_in(gw, tenant["api_key"])
    gw.admin("PATCH", f"/admin/tenants/{tenant['tenant_id']}", json={"status": "disabled"})
    assert "Your session ended: this tenant is disabled." in ended_page(client, "/console/keys", "disabled")
    refused = browser(gw).post("/console/sign-in", data={"token": tenant["api_key"]})
    assert refused.status_code == 403 and "set-cookie" not in refused.headers


def test_an_admin_session_works_on_every_replica_and_ends_when_the_admin_token_changes(
    make_gateway: GatewayFactory, database_url: str
) -> None:
    first = make_gateway(database_url)
    value = sign_in(first, ADMIN_TOKEN).cookies["hdg_console"]
    cookie = {"hdg_console": value}
    replica = make_gateway(database_url)  # another process on the same database and token
    assert httpx.get(f"{replica.url}/console/admin/backends", cookies=cookie).status_code == 200
    changed = make_gateway(database_url, admin_token="a-new-admin-token")
    resp = httpx.get(f"{changed.url}/console/admin", cookies=cookie)
    assert resp.status_code == 303 and resp.headers["location"] == "/console/sign-in?ended=admin"
    assert "Your session ended: the admin token changed." in httpx.get(f"{changed.url}{resp.headers['location']}").text
    # The session's row went with it: the old token's gateway no longer knows the cookie either.
    assert httpx.get(f"{first.url}/console/admin", cookies=cookie).headers["location"] == "/console/sign-in"


def test_an_expired_session_ends(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    client = sign_in(gw, ADMIN_TOKEN)
    db = sqlite3.connect(str(gw.settings.resolved_database_url).split("///", 1)[1])
    past = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with db:
        db.execute("UPDATE console_sessions SET expires_at = ?", (past,))
    assert "Your session expired." in ended_page(client, "/console/admin", "expired")
    sign_in(gw, ADMIN_TOKEN)  # a sign-in purges expired rows
    assert db.execute("SELECT count(*) FROM console_sessions WHERE expires_at < ?", (past,)).fetchone() == (0,)


# -- tenant pages --------------------------------------------------------------------------------------------------


def test_tenants_see_only_their_own_keys_and_predictions(gateway: Gateway) -> None:
    gw = gateway
    mine, theirs = gw.create_tenant(), gw.create_tenant()
    assert gw.generate(theirs["api_key"], prompt="their secret lighthouse").status_code == 200
    client = sign_in(gw, mine["api_key"])
    resp = client.post(f"/console/keys/{theirs['key_id']}/revoke", data={"csrf": csrf_of(client)})
    assert resp.status_code == 404 and "<h1>Not found</h1>" in resp.text
    for bad in ("key_nonsense", "%00", "key_" + "0" * 24):
        assert client.post(f"/console/keys/{bad}/revoke", data={"csrf": csrf_of(client)}).status_code == 404
    assert gw.generate(theirs["api_key"]).status_code == 200  # still active
    predictions = client.get("/console/predictions").text
    assert "lighthouse" not in predictions and "No predictions yet" in predictions
    overview = client.get("/console/overview").text
    assert "No monthly budget." in overview and "No billed images in the last 30 days." in overview
    keys = client.get("/console/keys").text
    assert theirs["key_id"] not in keys and mine["key_id"] in keys
    assert (
        gw.client.get("/v1/webhooks/default/secret", headers={"Authorization": f"Bearer {theirs['api_key']}"}).json()[
            "key"
        ]
        not in client.get("/console/webhooks").text
    )


def test_the_playground_makes_one_billed_png_through_the_api_path(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = gateway
    tenant = gw.create_tenant(monthly_budget_usd="10")
    urls: list[str] = []
    client = sign_in(gw, tenant["api_key"])
    client.event_hooks["response"] = [lambda r: urls.extend([str(r.request.url), r.headers.get("location", "")])]
    before = client.get("/console/overview").text
    assert "$0.00 of $10.00 used." in before
    resp = generate(client, prompt="a paper boat", seed="42")
    page = resp.text
    src = re.search(r'<img src="(/files/file_[^"]+)" alt="Generated image"', page)
    assert src is not None
    png = client.get(html.unescape(src[1]))
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(png.content)).size == (1024, 1024)
    assert "<dt>Seed</dt><dd>42</dd>" in page and "<dt>Backend</dt><dd>local</dd>" in page
    assert "Same request as code" in page
    for title in ("curl", "Python (openai)", "Python (replicate)"):
        assert f">{title}</h3>" in page
    assert "$HDG_API_KEY" in page and tenant["api_key"] not in page

    bearer = {"Authorization": f"Bearer {tenant['api_key']}"}
    events = gw.client.get("/v1/usage/events", headers=bearer).json()
    assert events["summary"] == {"requests": 1, "images": 1, "price_usd": "0.010486"}
    assert events["data"][0]["api_key_id"] == tenant["key_id"]
    # The result is a page of its own: reloading it reads the stored prediction and bills nothing more.
    again = client.get(str(resp.url))
    file_path = src[1].split("?", 1)[0]  # the signed query's expiry moves with the clock
    assert again.status_code == 200 and f'<img src="{file_path}?' in again.text
    assert "<dt>Seed</dt><dd>42</dd>" in again.text
    assert ">a paper boat</textarea>" in again.text and 'value="42"' in again.text  # the form as it was sent
    assert gw.client.get("/v1/usage/events", headers=bearer).json()["summary"]["requests"] == 1
    assert "$0.010486 of $10.00 used." in client.get("/console/overview").text
    header, rows = table(client.get("/console/predictions").text, "Recent predictions")
    assert header == ["Created", "Status", "Model", "Backend", "Latency (ms)", "Image"]
    assert [r[1:4] for r in rows] == [["succeeded", "hidream-i1-fast", "local"]] and int(rows[0][4]) > 0
    assert 'alt="Thumbnail of a paper boat"' in client.get("/console/predictions").text
    assert rows == table(client.get("/console/predictions").text, "Recent predictions")[1]
    _, key_rows = table(client.get("/console/keys").text, "Keys")
    assert key_rows[0][2] != "never"  # last used: just now
    # The key never travelled in a URL, a redirect or a log line.
    assert urls and not any(tenant["api_key"] in u for u in urls)
    assert tenant["api_key"] not in caplog.text


def test_a_playground_result_is_a_page_of_the_tenants_own_prediction(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    mine, theirs = gw.create_tenant(), gw.create_tenant()
    assert gw.generate(theirs["api_key"], prompt="their secret lighthouse").status_code == 200
    client = sign_in(gw, mine["api_key"])
    page = generate(client, prompt="a quiet harbour").text  # a random seed: the form keeps it empty
    own_id = re.search(r"<code>(gen_[0-9a-f]+)</code>", page)
    assert own_id is not None and 'placeholder="random" value=""' in page
    db = sqlite3.connect(str(gw.settings.resolved_database_url).split("///", 1)[1])
    (other,) = db.execute("SELECT id FROM predictions WHERE tenant_id = ?", (theirs["tenant_id"],)).fetchone()
    for wrong in (other, "gen_" + "0" * 24, "nonsense", "'; DROP TABLE predictions"):
        resp = client.get("/console/playground", params={"prediction": wrong})
        assert resp.status_code == 404 and "There is no such prediction." in resp.text, wrong
        assert "lighthouse" not in resp.text

    # A job still running shows its status, and the page to reload for its image.
    far = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with db:
        db.execute(
            "UPDATE predictions SET status = 'processing', lease_owner = 'elsewhere', lease_expires_at = ?"
            " WHERE id = ?",
            (far, own_id[1]),
        )
    running = client.get("/console/playground", params={"prediction": own_id[1]})
    assert running.status_code == 200 and "Still running" in running.text
    assert f'href="/console/playground?prediction={own_id[1]}"' in running.text
    assert 'alt="Generated image"' not in running.text and ">a quiet harbour</textarea>" in running.text
    with db:
        db.execute("UPDATE predictions SET status = 'failed', error = 'The backend failed.' WHERE id = ?", (own_id[1],))
    failed = client.get("/console/playground", params={"prediction": own_id[1]})
    assert "The request failed" in failed.text and "The backend failed." in failed.text


def test_the_playground_code_samples_run_as_shown(sqlite_gateway: Gateway, tmp_path: Any) -> None:
    gw = sqlite_gateway
    tenant = gw.create_tenant()
    client = sign_in(gw, tenant["api_key"])
    page = generate(client, prompt='it\'s a "quoted" fox', seed="7").text
    samples = {
        title: html.unescape(code)
        for title, code in re.findall(
            r'<h3 id="sample-\d">(.*?)</h3>\s*<pre><code id="code-\d">(.*?)</code></pre>', page, re.S
        )
    }
    assert set(samples) == {"curl", "Python (openai)", "Python (replicate)"}
    env = {"HDG_API_KEY": tenant["api_key"], "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for title in ("Python (openai)", "Python (replicate)"):
        done = subprocess.run(
            [sys.executable, "-c", samples[title]], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (title, done.stderr)
        assert f"{gw.url}/files/file_" in done.stdout, (title, done.stdout)
    curl = subprocess.run(["bash", "-c", samples["curl"]], env=env, capture_output=True, text=True, timeout=120)
    assert curl.returncode == 0 and '"seed":7' in curl.stdout.replace(" ", ""), curl.stdout
    bearer = {"Authorization": f"Bearer {tenant['api_key']}"}
    seeds = {e["prediction_id"]: e for e in gw.client.get("/v1/usage/events", headers=bearer).json()["data"]}
    assert len(seeds) == 4  # the playground's image and the three samples'


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prompt", "   ", "Enter a prompt."),
        ("seed", "abc", "The seed must be a whole number"),
        ("seed", "-1", "The seed must be a whole number"),
        ("steps", "0", "Steps must be a whole number"),
        ("size", "13x13", "Choose one of the listed sizes."),
        ("model", "dall-e-3", "Choose one of the listed models."),
        ("prompt", "x" * 2001, "the limit is 2000"),
    ],
)
def test_bad_playground_input_is_shown_next_to_its_field_and_creates_nothing(
    sqlite_gateway: Gateway, field: str, value: str, message: str
) -> None:
    gw = sqlite_gateway
    tenant = gw.create_tenant()
    client = sign_in(gw, tenant["api_key"])
    resp = client.post("/console/playground", data=playground_form(client, prompt="a fox") | {field: value})
    assert resp.status_code == 400 and message in resp.text
    assert f'aria-describedby="{field}-error"' in resp.text and f'id="{field}-error"' in resp.text
    bearer = {"Authorization": f"Bearer {tenant['api_key']}"}
    assert gw.client.get("/v1/usage/events", headers=bearer).json()["summary"]["requests"] == 0
    assert "No predictions yet" in client.get("/console/predictions").text


def test_a_refused_playground_request_shows_the_apis_message_and_status(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    tenant = gw.create_tenant(monthly_budget_usd="0.000001")
    client = sign_in(gw, tenant["api_key"])
    resp = client.post("/console/playground", data=playground_form(client, prompt="a fox"))
    api = gw.generate(tenant["api_key"])
    assert resp.status_code == api.status_code == 402
    assert "The request was refused" in resp.text and api.json()["error"]["message"] in html.unescape(resp.text)
    assert 'alt="Generated image"' not in resp.text and "No predictions yet" in client.get("/console/predictions").text


NONCE = re.compile(r'name="nonce" value="([A-Za-z0-9_-]+)"')


def prediction_ids(gw: Gateway) -> list[str]:
    db = sqlite3.connect(str(gw.settings.resolved_database_url).split("///", 1)[1])
    return [row[0] for row in db.execute("SELECT id FROM predictions ORDER BY created_at")]


def test_the_same_playground_form_sent_twice_makes_one_job(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    tenant = gw.create_tenant()
    client = sign_in(gw, tenant["api_key"])
    page = client.get("/console/playground").text
    nonce, fresh = NONCE.search(page), NONCE.search(client.get("/console/playground").text)
    assert nonce is not None and fresh is not None and nonce[1] != fresh[1]  # a new one with every form
    form = playground_form(client, prompt="a red kite", seed="5") | {"nonce": nonce[1]}
    first = client.post("/console/playground", data=form)
    again = client.post("/console/playground", data=form)  # a double click, or a reload of the POST
    assert first.status_code == again.status_code == 303
    assert first.headers["location"] == again.headers["location"]
    assert len(prediction_ids(gw)) == 1
    bearer = {"Authorization": f"Bearer {tenant['api_key']}"}
    assert gw.client.get("/v1/usage/events", headers=bearer).json()["summary"]["requests"] == 1

    # The same form sent back with other values (the browser's Back restored its nonce): a fresh form, no job.
    edited = client.post("/console/playground", data=form | {"prompt": "a blue kite"})
    assert edited.status_code == 409 and "already sent with other values" in edited.text
    assert ">a blue kite</textarea>" in edited.text
    renewed = NONCE.search(edited.text)
    assert renewed is not None and renewed[1] != nonce[1]
    assert len(prediction_ids(gw)) == 1
    resent = client.post("/console/playground", data=form | {"prompt": "a blue kite", "nonce": renewed[1]})
    assert resent.status_code == 303 and len(prediction_ids(gw)) == 2

    for bad in ("short", "x" * 65, "has space in it!!"):
        refused = client.post("/console/playground", data=form | {"nonce": bad})
        assert refused.status_code == 400 and "Reload the page" in refused.text, bad
    assert len(prediction_ids(gw)) == 2


class StuckBackend:
    """A backend that ignores cancellation until the test lets go (a provider call stuck past every deadline), or
    fails with an upstream error."""

    name = kind = "local"
    variants = frozenset({"fast", "dev", "full"})

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.started, self.release = threading.Event(), threading.Event()

    async def generate(self, job: Any, *, timeout: float) -> Any:
        from gateway.backends.base import ImageResult
        from gateway.errors import BackendFailed

        if self.fail:
            raise BackendFailed("local answered 500: upstream broke", upstream_status=500)
        self.started.set()
        while not self.release.is_set():
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                continue  # it will not stop
        buf = io.BytesIO()
        Image.new("RGB", (job.width, job.height), (20, 90, 160)).save(buf, format="PNG")
        return ImageResult([buf.getvalue()], "image/png", job.width, job.height, job.seed)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        self.release.set()


def test_a_playground_job_still_running_when_the_wait_ends_goes_to_its_page(
    make_gateway: GatewayFactory, sqlite_url: str
) -> None:
    stuck = StuckBackend()
    gw = make_gateway(sqlite_url, backend=stuck, request_timeout_seconds=0.5)
    try:
        client = sign_in(gw, gw.create_tenant()["api_key"])
        form = playground_form(client, prompt="a slow glacier")
        form["nonce"] = NONCE.findall(client.get("/console/playground").text)[0]
        sent = client.post("/console/playground", data=form)
        # Not a 504 form to send again (a second job, a second bill): the running job's own page.
        assert sent.status_code == 303, sent.text
        [only] = prediction_ids(gw)
        assert sent.headers["location"] == f"/console/playground?prediction={only}"
        running = client.get(sent.headers["location"])
        assert running.status_code == 200 and "Still running" in running.text
        assert client.post("/console/playground", data=form).headers["location"] == sent.headers["location"]
        assert prediction_ids(gw) == [only]
    finally:
        stuck.release.set()


def test_a_failed_playground_job_is_shown_and_only_a_limits_refusal_is_counted_as_one(
    make_gateway: GatewayFactory, sqlite_url: str
) -> None:
    gw = make_gateway(sqlite_url, backend=StuckBackend(fail=True))
    tenant, poor = gw.create_tenant(), gw.create_tenant(monthly_budget_usd="0.000001")

    def refusals() -> str:
        return " ".join(line for line in gw.client.get("/metrics").text.splitlines() if "hdg_refusals_total{" in line)

    client = sign_in(gw, tenant["api_key"])
    failed = client.post("/console/playground", data=playground_form(client, prompt="a fox"))
    assert failed.status_code == 502 and "The request was refused" in failed.text
    assert "upstream broke" not in failed.text  # the tenant's fixed phrase, not the backend's words
    assert refusals() == ""
    broke = sign_in(gw, poor["api_key"])
    assert broke.post("/console/playground", data=playground_form(broke, prompt="a fox")).status_code == 402
    assert refusals() == 'hdg_refusals_total{reason="budget"} 1.0'


def test_an_empty_prediction_shows_the_playground_form(sqlite_gateway: Gateway) -> None:
    client = sign_in(sqlite_gateway, sqlite_gateway.create_tenant()["api_key"])
    resp = client.get("/console/playground?prediction=")
    assert resp.status_code == 200 and "<h1>Playground</h1>" in resp.text
    assert "There is no such prediction." not in resp.text and NONCE.search(resp.text) is not None


def test_a_services_error_under_console_is_a_page_and_elsewhere_json() -> None:
    from fastapi import FastAPI

    from gateway.api import console
    from gateway.console.pages import ConsoleHeadersMiddleware
    from gateway.errors import BackendBusy, NotFound, install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/v1/thing")
    @app.get("/console/thing")
    async def thing() -> None:
        raise NotFound("Unknown tenant ten_1.")

    @app.get("/console/busy")
    async def busy() -> None:
        raise BackendBusy("Every backend is busy.", retry_after=7)

    console.install(app)
    app.add_middleware(ConsoleHeadersMiddleware)

    async def fetch() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return [await client.get(path) for path in ("/console/thing", "/v1/thing", "/console/busy")]

    page, api, busy_page = asyncio.run(fetch())
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "<h1>Not found</h1>" in page.text and "Unknown tenant ten_1." in page.text
    assert page.headers["content-security-policy"] == CSP
    assert api.status_code == 404 and api.json()["error"]["code"] == "not_found"
    assert busy_page.status_code == 503 and busy_page.headers["retry-after"] == "7"
    assert "<h1>Not available right now</h1>" in busy_page.text


def test_names_and_prompts_are_escaped_everywhere(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    tenant = gw.create_tenant(name="<script>alert(1)</script>")
    client = sign_in(gw, tenant["api_key"])
    prompt = '<img src=x onerror="alert(2)">'
    result = generate(client, prompt=prompt).text
    admin = sign_in(gw, ADMIN_TOKEN)
    pages = [result, client.get("/console/overview").text, client.get("/console/predictions").text]
    pages.append(admin.get("/console/admin").text)
    for page in pages:
        assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[1] and "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[3]
    assert 'alt="Thumbnail of &lt;img src=x onerror=&#34;alert(2)&#34;&gt;"' in pages[2]


def test_usage_tables_show_the_same_numbers_as_the_usage_api(gateway: Gateway) -> None:
    gw = gateway
    tenant = gw.create_tenant()
    for model in ("hidream-i1-fast", "hidream-i1-fast", "hidream-i1-dev"):
        assert gw.generate(tenant["api_key"], model=model).status_code == 200
    assert gw.generate(tenant["api_key"], model="hidream-i1-fast", n=2).status_code == 200
    client = sign_in(gw, tenant["api_key"])
    today = datetime.now(UTC).date()
    since = (today - timedelta(days=29)).isoformat()
    report = gw.client.get(f"/v1/usage?since={since}", headers={"Authorization": f"Bearer {tenant['api_key']}"}).json()
    for by in ("model", "backend"):
        images: dict[str, int] = defaultdict(int)
        spend: dict[str, Decimal] = defaultdict(Decimal)
        for line in report["data"]:
            images[line[by]] += line["images"]
            spend[line[by]] += Decimal(line["price_usd"])
        page = client.get(f"/console/overview?by={by}").text
        for caption, expected, total in (
            ("Images per day", {k: str(v) for k, v in images.items()}, str(report["total"]["images"])),
            ("Spend per day (USD)", {k: f"{v:.6f}" for k, v in spend.items()}, report["total"]["price_usd"]),
        ):
            header, rows = table(page, caption)
            assert header[0] == "Day" and header[-1] == "Total"
            assert [r[0] for r in rows] == [today.isoformat()]  # the days with anything billed: today
            assert dict(zip(header[1:-1], rows[0][1:-1], strict=True)) == expected
            assert rows[0][-1] == total
        assert 'role="img"' in page and "total 5" in page
    assert set(table(client.get("/console/overview").text, "Images per day")[0][1:-1]) == {
        "hidream-i1-dev",
        "hidream-i1-fast",
    }


# -- admin pages ---------------------------------------------------------------------------------------------------


def test_admin_pages_show_tenants_backends_and_failures_with_their_raw_error_text(
    make_gateway: GatewayFactory, sqlite_url: str, fal: FakeFal
) -> None:
    gw = make_gateway(sqlite_url, from_settings=True, breaker_failures=1, **fal_only(fal))
    tenant = gw.create_tenant(name="Globex", rpm=60, monthly_budget_usd="5", max_in_flight=2)
    assert gw.generate(tenant["api_key"]).status_code == 200
    fal.faults.fail_jobs = True
    fal.faults.error_text = "CUDA error: device-side assert <triggered>"
    failed = gw.generate(tenant["api_key"])
    assert failed.status_code == 502
    admin = sign_in(gw, ADMIN_TOKEN)

    header, rows = table(admin.get("/console/admin/tenants").text, "Tenants")
    assert header == [
        "Name", "Id", "Status", "RPM", "Monthly budget", "Max in flight", "Spent this month", "Reserved", "Keys"
    ]  # fmt: skip
    assert rows == [["Globex", tenant["tenant_id"], "active", "60", "$5.00", "2", "$0.010486", "$0.00", "1"]]

    header, rows = table(admin.get("/console/admin/backends").text, "Backends")
    assert header[:4] == ["Name", "Kind", "State", "In flight"]
    (fal_row,) = rows
    assert fal_row[:3] == ["fal", "fal", "open"]  # one failure opens it here (HDG_BREAKER_FAILURES=1)
    assert fal_row[5].startswith("50.0%") and "(1 of 2)" in fal_row[5]
    assert fal_row[6:] == ["$0.010486", "$0.010486", "$0.010486"]  # price, cost, spend this month

    page = admin.get("/console/admin/failures").text
    header, rows = table(page, "Recent failures")
    assert header == ["When", "Tenant", "Model", "Backend", "Code", "Error"]
    assert rows[0][1:3] == ["Globex", "hidream-i1-fast"] and rows[0][4] == "backend_error"
    assert "CUDA error: device-side assert &lt;triggered&gt;" in page  # the provider's words, escaped
    tenant_view = sign_in(gw, tenant["api_key"]).get("/console/predictions").text
    assert "failed" in tenant_view and failed.json()["error"]["message"][:40] in html.unescape(tenant_view)


# -- who may manage keys -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [{"rpm": 60}, {"monthly_budget_usd": "2"}, {"max_in_flight": 1}])
def test_a_key_with_limits_of_its_own_cannot_create_or_revoke_keys(
    sqlite_gateway: Gateway, limit: dict[str, Any]
) -> None:
    gw = sqlite_gateway
    tenant = gw.create_tenant()
    made = gw.admin("POST", f"/admin/tenants/{tenant['tenant_id']}/keys", json=limit)
    assert made.status_code == 201, made.text
    limited, owner = sign_in(gw, made.json()["api_key"]), sign_in(gw, tenant["api_key"])

    page = limited.get("/console/keys").text
    assert "This key has its own limits, so it cannot create or revoke keys; an admin can." in page
    assert ">Create key</button>" not in page and ">Revoke</button>" not in page
    assert len(table(page, "Keys")[1]) == 2  # still listed, read-only
    token = csrf_of(limited)
    refused = limited.post("/console/keys", data={"csrf": token})
    assert refused.status_code == 403 and "This key has its own limits" in refused.text
    for key_id in (tenant["key_id"], made.json()["key_id"]):
        refused = limited.post(f"/console/keys/{key_id}/revoke", data={"csrf": token})
        assert refused.status_code == 403 and "This key has its own limits" in refused.text
    keys = gw.admin("GET", f"/admin/tenants/{tenant['tenant_id']}/keys").json()["data"]
    assert len(keys) == 2 and all(k["revoked_at"] is None for k in keys)  # nothing made, nothing revoked

    # The tenant's own key (no limits of its own) can do both.
    assert ">Create key</button>" in owner.get("/console/keys").text
    assert owner.post("/console/keys", data={"csrf": csrf_of(owner)}).status_code == 201
    revoked = owner.post(f"/console/keys/{made.json()['key_id']}/revoke", data={"csrf": csrf_of(owner)})
    assert revoked.status_code == 303
    keys = gw.admin("GET", f"/admin/tenants/{tenant['tenant_id']}/keys").json()["data"]
    assert len(keys) == 3 and [k["id"] for k in keys if k["revoked_at"]] == [made.json()["key_id"]]


def test_the_overview_shows_the_signed_in_keys_own_budget(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    tenant = gw.create_tenant(monthly_budget_usd="10")
    made = gw.admin("POST", f"/admin/tenants/{tenant['tenant_id']}/keys", json={"monthly_budget_usd": "2"}).json()
    assert gw.generate(made["api_key"]).status_code == 200
    page = html.unescape(sign_in(gw, made["api_key"]).get("/console/overview").text)
    assert "$0.010486 of $10.00 used." in page  # the tenant's
    assert "This key's own budget" in page and "$0.010486 of $2.00 used." in text_of(page)
    assert "This key's own budget" not in sign_in(gw, tenant["api_key"]).get("/console/overview").text


# -- sign-in: throttling, Origin: null, sessions per key, the admin fingerprint --------------------------------------


def test_sign_ins_sent_all_at_once_are_throttled_like_one_after_another(
    make_gateway: GatewayFactory, sqlite_url: str
) -> None:
    gw = make_gateway(sqlite_url, console_sign_in_failures=3)
    barrier = threading.Barrier(12)

    def guess(i: int) -> int:
        with browser(gw) as client:
            barrier.wait()
            return client.post("/console/sign-in", data={"token": f"hdg_wrong-guess-{i}"}).status_code

    with ThreadPoolExecutor(12) as pool:
        codes = sorted(pool.map(guess, range(12)))
    assert codes == [401] * 3 + [429] * 9


def test_failed_sign_ins_remember_few_addresses_cheaply() -> None:
    from gateway.console.sessions import FailedSignIns

    throttle = FailedSignIns(2, window_seconds=60, max_clients=100)
    assert throttle.attempt("10.0.0.1", now=0) == 0 and throttle.attempt("10.0.0.1", now=1) == 0
    assert throttle.attempt("10.0.0.1", now=2) == 59  # two failures in the minute: wait for the first to age
    throttle.forgive("10.0.0.2")  # an address never seen: nothing to forget, nothing remembered
    assert len(throttle) == 1
    assert throttle.attempt("10.0.0.3", now=3) == 0
    throttle.forgive("10.0.0.3")  # its key was right: the address is forgotten
    assert len(throttle) == 1
    assert throttle.attempt("10.0.0.1", now=61) == 0  # the first failure has aged out
    started = time.perf_counter()
    for i in range(20_000):
        throttle.attempt(f"192.0.2.{i}", now=100 + i / 1000)
    assert time.perf_counter() - started < 1.0 and len(throttle) == 100  # bounded, and O(1) per call
    assert throttle.attempt("192.0.2.19999", now=121) == 0  # still remembered: it was seen last
    assert throttle.attempt("192.0.2.19999", now=121) == 59


PUBLIC = "https://console.example.com"


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, True),  # not a browser: the cookie and the CSRF token guard what follows
        ({"Sec-Fetch-Site": "same-origin"}, True),
        # Behind a proxy uvicorn does not trust, the browser's real origin matches nothing uvicorn sees: the
        # browser's own word that the page is this origin's is enough.
        ({"Sec-Fetch-Site": "same-origin", "Origin": "https://proxy-only-knows.example"}, True),
        ({"Sec-Fetch-Site": "same-origin", "Origin": "null"}, True),
        ({"Sec-Fetch-Site": "cross-site"}, False),
        ({"Sec-Fetch-Site": "cross-site", "Origin": "SELF"}, False),
        ({"Sec-Fetch-Site": "same-site", "Origin": "https://other.example.com"}, False),
        ({"Sec-Fetch-Site": "same-site"}, False),
        ({"Sec-Fetch-Site": "same-site", "Origin": PUBLIC}, True),
        ({"Sec-Fetch-Site": "none", "Origin": "https://evil.example"}, False),
        ({"Origin": "SELF"}, True),
        ({"Origin": PUBLIC}, True),
        ({"Origin": "https://console.example.com:443"}, True),  # the default port is no other origin
        ({"Origin": "HTTPS://Console.Example.COM"}, True),
        ({"Origin": "https://console.example.com:8443"}, False),
        ({"Origin": "http://console.example.com"}, False),
        ({"Origin": "null"}, False),  # a sandboxed frame of any site
        ({"Origin": "https://evil.example"}, False),
        ({"Origin": "not an origin"}, False),
    ],
)
def test_console_posts_are_refused_only_when_another_site_sent_them(
    make_gateway: GatewayFactory,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str],
    allowed: bool,
) -> None:
    gw = make_gateway(sqlite_url, public_url=PUBLIC)
    tenant = gw.create_tenant()
    headers = {name: gw.url if value == "SELF" else value for name, value in headers.items()}
    signed_in = browser(gw).post("/console/sign-in", data={"token": ADMIN_TOKEN}, headers=headers)
    client = sign_in(gw, tenant["api_key"])
    made = client.post("/console/keys", data={"csrf": csrf_of(client)}, headers=headers)
    keys = len(gw.admin("GET", f"/admin/tenants/{tenant['tenant_id']}/keys").json()["data"])
    if allowed:
        assert signed_in.status_code == 303 and "hdg_console=" in signed_in.headers["set-cookie"]
        assert made.status_code == 201 and keys == 2
        return
    assert signed_in.status_code == 403 and "set-cookie" not in signed_in.headers
    assert made.status_code == 403 and "<h1>Forbidden</h1>" in made.text and keys == 1
    refusals = [r.getMessage() for r in caplog.records if "refused a console POST" in r.getMessage()]
    assert len(refusals) == 2 and f"'{PUBLIC}'" in refusals[0] and "HDG_PUBLIC_URL" in refusals[0]
    assert repr(headers.get("Origin")) in refusals[0] and ADMIN_TOKEN not in caplog.text


def test_signing_in_again_replaces_the_session_and_each_key_keeps_at_most_twenty(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    tenant = gw.create_tenant()
    db = sqlite3.connect(str(gw.settings.resolved_database_url).split("///", 1)[1])

    def count(column: str, value: str) -> int:
        queries = {
            "role": "SELECT count(*) FROM console_sessions WHERE role = ?",
            "key": "SELECT count(*) FROM console_sessions WHERE api_key_id = ?",
        }
        found: int = db.execute(queries[column], (value,)).fetchone()[0]
        return found

    client = sign_in(gw, tenant["api_key"])
    first = client.cookies["hdg_console"]
    assert client.post("/console/sign-in", data={"token": tenant["api_key"]}).status_code == 303
    assert client.cookies["hdg_console"] != first and count("role", "tenant") == 1  # replaced, not added
    assert httpx.get(f"{gw.url}/console/keys", cookies={"hdg_console": first}).status_code == 303
    assert client.post("/console/sign-in", data={"token": ADMIN_TOKEN}).status_code == 303
    assert count("role", "tenant") == 0 and count("role", "admin") == 1  # the same browser, now the admin

    browsers = [sign_in(gw, tenant["api_key"]) for _ in range(22)]
    assert count("key", tenant["key_id"]) == 20
    for ended in browsers[:2]:  # the oldest two went
        assert ended.get("/console/overview").headers["location"] == "/console/sign-in"
    assert all(b.get("/console/overview").status_code == 200 for b in browsers[2:])
    admins = [sign_in(gw, ADMIN_TOKEN) for _ in range(21)]
    assert count("role", "admin") == 20 and admins[0].get("/console/admin").status_code == 303


def test_the_admin_session_keeps_an_scrypt_of_the_token(make_gateway: GatewayFactory, sqlite_url: str) -> None:
    secret = "a-url-signing-secret-of-32-chars!"
    gw = make_gateway(sqlite_url, url_signing_secret=secret)
    sign_in(gw, ADMIN_TOKEN)
    db = sqlite3.connect(str(gw.settings.resolved_database_url).split("///", 1)[1])
    (kept,) = db.execute("SELECT admin_fingerprint FROM console_sessions").fetchone()
    console_key = hmac.new(secret.encode(), b"hdg-console-csrf", hashlib.sha256).digest()
    salt = b"hdg-console-admin:" + console_key
    assert kept == hashlib.scrypt(ADMIN_TOKEN.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32).hex()
    assert kept != hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()


# -- error pages ---------------------------------------------------------------------------------------------------


def test_a_dead_cookie_is_cleared_by_the_sign_in_page(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    page = httpx.get(f"{gw.url}/console/sign-in", cookies={"hdg_console": "no-such-session"})
    assert page.status_code == 200 and "<h1>Sign in</h1>" in page.text
    assert 'hdg_console=""' in page.headers["set-cookie"] and "Max-Age=0" in page.headers["set-cookie"]
    assert 'autocomplete="off"' in page.text
    assert "set-cookie" not in httpx.get(f"{gw.url}/console/sign-in").headers  # no cookie, nothing to clear


def test_console_errors_are_pages_and_api_errors_stay_json(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    client = sign_in(gw, gw.create_tenant()["api_key"])
    wrong = client.post("/console/overview", data={"csrf": csrf_of(client)})
    assert wrong.status_code == 405 and wrong.headers["content-type"].startswith("text/html")
    assert "<h1>Method not allowed</h1>" in wrong.text and wrong.headers["allow"] == "GET"
    assert wrong.headers["content-security-policy"] == CSP
    api = gw.client.post("/readyz")
    assert api.status_code == 405 and api.json()["error"]["code"] == "method_not_allowed"

    db = sqlite3.connect(str(gw.settings.resolved_database_url).split("///", 1)[1])
    with db:
        db.execute("ALTER TABLE console_sessions RENAME TO console_sessions_gone")
    broken = client.get("/console/overview")
    assert broken.status_code == 500 and broken.headers["content-type"].startswith("text/html")
    assert "<h1>Something went wrong</h1>" in broken.text
    assert f"request id {broken.headers['x-request-id']}" in broken.text
    assert broken.headers["content-security-policy"] == CSP and broken.headers["cache-control"] == "no-store"
    with db:
        db.execute("ALTER TABLE console_sessions_gone RENAME TO console_sessions")
    # Back again (on a new connection: the server closes one an unexpected error went through).
    assert httpx.get(f"{gw.url}/console/overview", cookies=dict(client.cookies)).status_code == 200


def test_app_state_has_no_console_defaults_to_ignore_settings_with() -> None:
    from gateway.state import AppState

    fields = {f.name: f for f in dataclasses.fields(AppState)}
    for name in ("console_key", "admin_fingerprint", "sign_ins"):
        assert fields[name].default is dataclasses.MISSING, name
        assert fields[name].default_factory is dataclasses.MISSING, name


def test_money_is_written_as_the_api_writes_it_and_steps_are_bounded_like_the_api() -> None:
    from gateway.api.console import MAX_STEPS
    from gateway.api.images import ImageGenerationRequest
    from gateway.api.serialize import usd_text
    from gateway.console.views import usd

    for amount in (Decimal("10"), Decimal("0.1"), Decimal("0.010486"), Decimal("100.5"), Decimal("0.000001")):
        assert usd(amount) == f"${usd_text(amount)}"
    assert usd(15_000, micros=True) == "$0.015" and usd(10_000_000, micros=True) == "$10.00" and usd(None) == ""
    field = ImageGenerationRequest.model_fields["num_inference_steps"]
    assert next(rule.le for rule in field.metadata if hasattr(rule, "le")) == MAX_STEPS


def test_backend_statistics_count_every_attempt_of_the_day_in_sql_and_sample_the_latency(database_url: str) -> None:
    from sqlalchemy import insert, inspect, null

    from gateway.console.views import LATENCY_SAMPLE, backend_stats
    from gateway.storage import repo
    from gateway.storage.db import create_engine, session_factory, upgrade
    from gateway.storage.models import new_id

    now = datetime.now(UTC)
    recent, earlier, old = now - timedelta(hours=1), now - timedelta(hours=3), now - timedelta(hours=25)

    async def check() -> None:
        engine = create_engine(database_url)
        try:
            await upgrade(engine)
            async with engine.connect() as conn:
                indexes = await conn.run_sync(lambda c: inspect(c).get_indexes("predictions"))
            assert {"name": "ix_predictions_completed_at", "columns": ["completed_at"]} in [
                {"name": i["name"], "columns": i["column_names"]} for i in indexes
            ]
            sessions = session_factory(engine)
            async with sessions.begin() as session:
                tenant = await repo.create_tenant(session, name="stats")
                key = await repo.add_key(session, tenant_id=tenant.id, key_hash="1" * 64, display_prefix="hdg_x")

            def job(*, created: datetime, completed: datetime, latency: int, outcome: str, log: Any = ()) -> Any:
                entry = {"backend": "fal", "outcome": outcome, "status": None, "message": ""}
                return {
                    "id": new_id("gen"),
                    "tenant_id": tenant.id,
                    "api_key_id": key.id,
                    "model": "hidream-i1-fast",
                    "status": "succeeded" if outcome == "succeeded" else "failed",
                    "prompt": "p",
                    "params": {},
                    "width": 1024,
                    "height": 1024,
                    "n": 1,
                    "seed": 1,
                    "backend": "fal",
                    "latency_ms": latency,
                    "created_at": created,
                    "completed_at": completed,
                    "available_at": created,
                    "attempt_log": [entry] if log == () else log,
                }

            # The latest 1000 successes took 100 ms, the 1200 before them (still within the day) 9 s: the median
            # is of the latest. Every attempt of the day counts for the error rate: one failed job created 30 h
            # ago but completed within the day too; the three completed 25 h ago do not; logs that are JSON null
            # or NULL (rows from before attempt logs), or entries that are not objects, count as no attempts.
            rows = [job(created=earlier, completed=earlier, latency=9000, outcome="succeeded") for _ in range(1200)]
            rows += [job(created=recent, completed=recent, latency=100, outcome="succeeded") for _ in range(1000)]
            rows.append(job(created=now - timedelta(hours=30), completed=recent, latency=100, outcome="failed"))
            rows.append(job(created=recent, completed=recent, latency=5, outcome="failed", log=None))
            rows.append(job(created=recent, completed=recent, latency=5, outcome="failed", log=null()))
            # A list holding things that are not attempts (a string, a number) is no attempts either, not a 500.
            rows.append(job(created=recent, completed=recent, latency=5, outcome="failed", log=["x", 3]))
            rows += [job(created=old, completed=old, latency=9000, outcome="failed") for _ in range(3)]
            async with sessions.begin() as session:
                await session.execute(insert(repo.PREDICTIONS), rows)
            async with sessions() as session:
                stats = await backend_stats(session, names=["fal", "local"], now=now)
            fal = stats["fal"]
            assert (fal.attempts, fal.errors, fal.latency_p50_ms, fal.latency_sample) == (2201, 1, 100, LATENCY_SAMPLE)
            local = stats["local"]
            assert (local.attempts, local.errors, local.latency_p50_ms, local.error_rate) == (0, 0, None, None)
        finally:
            await engine.dispose()

    asyncio.run(check())


# -- charts --------------------------------------------------------------------------------------------------------


def test_charts_stack_each_days_series_to_scale_and_escape_names() -> None:
    from gateway.console.charts import nice_ceiling, stacked_bars

    assert [nice_ceiling(v) for v in (0, 1, 3, 7, 11, 0.0104, 260)] == [1, 1, 5, 10, 20, 0.02, 500]
    days = [datetime(2026, 1, d, tzinfo=UTC).date() for d in (1, 2)]
    counts = {(days[0], "a"): 1, (days[0], "<b>"): 3, (days[1], "a"): 2}
    svg = str(
        stacked_bars(
            title="Images per day",
            days=days,
            series=["a", "<b>"],
            value=lambda day, name: counts.get((day, name), 0),
            label=lambda v: f"{v:g}",
            whole=True,
        )
    )
    assert 'aria-label="Images per day, 2026-01-01 to 2026-01-02: total 6"' in svg
    heights = [float(h) for h in re.findall(r'height="([0-9.]+)"', svg)]
    assert heights == [40.0, 120.0, 80.0]  # 1, 3 and 2 on a scale topped at 5 (the nice ceiling of 4), 200 units tall
    assert "<title>2026-01-01 &lt;b&gt;: 3</title>" in svg and "<b>" not in svg
