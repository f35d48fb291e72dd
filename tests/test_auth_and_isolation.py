"""API keys, admin access and tenant isolation, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.auth import generate_key, hash_key
from gateway.storage.files import UrlSigner
from tests.conftest import ADMIN_TOKEN, Gateway, GatewayFactory
from tests.test_storage_and_settings import _signing_key


def _error(resp: object) -> dict[str, object]:
    body = resp.json()  # type: ignore[attr-defined]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


def test_keys_are_random_prefixed_and_only_hashed() -> None:
    a, b = generate_key(), generate_key()
    assert a.plaintext.startswith("hdg_") and len(a.plaintext) >= 4 + 43  # 32 random bytes in base64
    assert a.plaintext != b.plaintext
    assert a.key_hash == hash_key(a.plaintext) and a.plaintext not in a.key_hash
    assert a.plaintext.startswith(a.display_prefix) and len(a.display_prefix) == 12


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer hdg_not-a-real-key"}, "invalid_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key"),
        ({"Authorization": "Bearer"}, "invalid_api_key"),
    ],
)
def test_missing_or_bad_key_is_401(sqlite_gateway: Gateway, headers: dict[str, str], code: str) -> None:
    resp = sqlite_gateway.client.post("/v1/images/generations", json={"prompt": "x"}, headers=headers)
    assert resp.status_code == 401
    assert _error(resp)["code"] == code


def test_revoked_key_and_disabled_tenant_are_403(gateway: Gateway) -> None:
    created = gateway.create_tenant()
    tenant_id, key = created["tenant_id"], created["api_key"]
    second = gateway.admin("POST", f"/admin/tenants/{tenant_id}/keys").json()

    revoked = gateway.admin("POST", f"/admin/keys/{created['key_id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    resp = gateway.generate(key)
    assert resp.status_code == 403 and _error(resp)["code"] == "api_key_revoked"
    assert gateway.generate(second["api_key"]).status_code == 200  # the tenant's other key still works

    assert gateway.admin("PATCH", f"/admin/tenants/{tenant_id}", json={"status": "disabled"}).status_code == 200
    resp = gateway.generate(second["api_key"])
    assert resp.status_code == 403 and _error(resp)["code"] == "tenant_disabled"
    assert gateway.admin("PATCH", f"/admin/tenants/{tenant_id}", json={"status": "active"}).status_code == 200
    assert gateway.generate(second["api_key"]).status_code == 200


def test_admin_api_needs_the_admin_token(make_gateway: GatewayFactory, sqlite_url: str) -> None:
    gw = make_gateway(sqlite_url)
    assert gw.client.get("/admin/tenants").status_code == 401
    wrong = gw.client.get("/admin/tenants", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and _error(wrong)["code"] == "invalid_admin_token"
    key = gw.create_tenant()["api_key"]
    # A tenant's key is not an admin token.
    assert gw.client.get("/admin/tenants", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    ok = gw.client.get("/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert ok.status_code == 200 and [t["name"] for t in ok.json()["data"]] == ["acme"]

    closed = make_gateway(sqlite_url, admin_token=None)
    resp = closed.client.get("/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.status_code == 403


def test_key_listing_never_shows_secrets(sqlite_gateway: Gateway) -> None:
    created = sqlite_gateway.create_tenant()
    listing = sqlite_gateway.admin("GET", f"/admin/tenants/{created['tenant_id']}/keys")
    text = listing.text
    assert created["api_key"] not in text and hash_key(created["api_key"]) not in text
    assert listing.json()["data"][0]["display_prefix"] == created["api_key"][:12]


def test_tenants_never_see_each_others_generations_or_files(gateway: Gateway) -> None:
    alice = gateway.create_tenant("alice")["api_key"]
    bob = gateway.create_tenant("bob")["api_key"]
    made = gateway.generate(alice).json()
    file_id = made["data"][0]["file_id"]
    as_bob = {"Authorization": f"Bearer {bob}"}
    as_alice = {"Authorization": f"Bearer {alice}"}

    for path in (f"/v1/images/generations/{made['id']}", f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        resp = gateway.client.get(path, headers=as_bob)
        assert resp.status_code == 404, path
        assert _error(resp)["code"] == "not_found"
        assert gateway.client.get(path, headers=as_alice).status_code == 200, path

    content = gateway.client.get(f"/v1/files/{file_id}/content", headers=as_alice)
    assert content.headers["content-type"] == "image/png" and content.content[:8] == b"\x89PNG\r\n\x1a\n"
    for path in ("/v1/usage", "/v1/usage/events"):  # the report and the raw events
        assert gateway.client.get(path, headers=as_bob).json()["data"] == [], path
        assert gateway.client.get(path, headers=as_alice).json()["data"] != [], path


def test_tampered_or_expired_file_urls_are_403(sqlite_gateway: Gateway) -> None:
    key = sqlite_gateway.create_tenant()["api_key"]
    url = sqlite_gateway.generate(key).json()["data"][0]["url"]
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    file_id = parts.path.rsplit("/", 1)[1]

    assert sqlite_gateway.client.get(url).status_code == 200
    later = {**query, "expires": str(int(query["expires"]) + 3600)}
    forged = {**query, "signature": query["signature"][:-2] + ("AA" if query["signature"][-2:] != "AA" else "BB")}
    for params in (later, forged, {}, {"expires": "x", "signature": "y"}):
        resp = sqlite_gateway.client.get(f"/files/{file_id}", params=params)
        assert resp.status_code in (400, 403), params
    assert sqlite_gateway.client.get(f"/files/{file_id}", params=later).status_code == 403

    signer = UrlSigner(_signing_key(sqlite_gateway.settings), ttl_seconds=60)
    expired = signer.sign(sqlite_gateway.url, file_id, now=time.time() - 120)
    resp = sqlite_gateway.client.get(expired)
    assert resp.status_code == 403 and _error(resp)["code"] == "invalid_signature"
    assert sqlite_gateway.client.get(signer.sign(sqlite_gateway.url, file_id)).status_code == 200
