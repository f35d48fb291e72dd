"""Liveness and readiness."""

from __future__ import annotations

from tests.conftest import Gateway


def test_healthz_and_readyz(sqlite_gateway: Gateway) -> None:
    assert sqlite_gateway.client.get("/healthz").json() == {"status": "ok"}
    ready = sqlite_gateway.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "database": "ok",
        "backends": {"local": "ready"},
        "redis": "not configured",
        "storage": "ok",
    }
