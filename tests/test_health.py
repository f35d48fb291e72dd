"""Liveness and readiness."""

from __future__ import annotations

import time

import httpx

from tests.conftest import Gateway


def ready_checks(client: httpx.Client, *, timeout: float = 60) -> httpx.Response:
    """GET /readyz until it answers 200 (a local model loads and warms up first), or give up after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (resp := client.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    return resp


def test_healthz_and_readyz(sqlite_gateway: Gateway) -> None:
    assert sqlite_gateway.client.get("/healthz").json() == {"status": "ok"}
    ready = ready_checks(sqlite_gateway.client)
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "database": "ok",
        "backends": {"local": "up"},
        "redis": "not configured",
        "storage": "ok",
    }
