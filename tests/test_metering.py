"""Prices, rate limits and budgets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from gateway.limits import LocalWindows
from gateway.metering import price_usd
from gateway.settings import DEFAULT_PRICES
from gateway.storage.repo import month_key
from tests.conftest import Gateway


def test_price_is_per_megapixel_per_image_rounded_to_micro_dollars() -> None:
    assert price_usd(DEFAULT_PRICES, model="hidream-i1-full", width=1024, height=1024, images=2) == Decimal("0.104858")
    assert price_usd(DEFAULT_PRICES, model="hidream-i1-fast", width=1360, height=768, images=1) == Decimal("0.010445")
    assert price_usd({}, model="hidream-i1-fast", width=1024, height=1024, images=1) == Decimal("0.000000")


def test_budgets_are_per_utc_calendar_month() -> None:
    assert month_key(datetime(2026, 3, 31, 23, 30, tzinfo=UTC)) == "2026-03"
    assert month_key(datetime(2026, 4, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))) == "2026-03"


def test_rate_windows_slide_and_say_when_to_retry() -> None:
    windows = LocalWindows(window_seconds=60)
    assert windows.hit({"t": 2}, now=0.0).remaining == 1
    assert windows.hit({"t": 2}, now=10.0).remaining == 0
    refused = windows.hit({"t": 2}, now=20.0)
    assert not refused.allowed and refused.headers()["Retry-After"] == "40"
    assert refused.headers()["x-ratelimit-reset"] == "40" and refused.headers()["x-ratelimit-limit"] == "2"
    assert windows.hit({"other": 2}, now=20.0).allowed  # per scope
    assert windows.hit({"t": 2}, now=60.5).allowed  # the first hit has left the window
    # Tenant and key together: the key's refusal does not use up a place of the tenant's.
    assert windows.hit({"t2": 5, "k": 1}, now=0.0).allowed
    assert not windows.hit({"t2": 5, "k": 1}, now=1.0).allowed
    assert windows.hit({"t2": 5}, now=2.0).remaining == 3


def test_rpm_limit_answers_429_with_retry_after(gateway: Gateway) -> None:
    key = gateway.create_tenant(rpm=2)["api_key"]
    assert gateway.generate(key).status_code == 200
    assert gateway.generate(key).status_code == 200
    resp = gateway.generate(key)
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "rate_limit_exceeded" and int(resp.headers["Retry-After"]) >= 1


def test_monthly_budget_stops_new_work_once_spent(gateway: Gateway) -> None:
    key = gateway.create_tenant(monthly_budget_usd="0.015")["api_key"]
    assert gateway.generate(key).status_code == 200  # $0.010486 of $0.015
    resp = gateway.generate(key)  # another $0.010486 would pass the budget: refused before any work
    assert resp.status_code == 402 and resp.json()["error"]["code"] == "budget_exceeded"
    assert resp.json()["error"]["type"] == "insufficient_quota" and "$0.015" in resp.json()["error"]["message"]
    usage = gateway.client.get("/v1/usage/events", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["summary"] == {"requests": 1, "images": 1, "price_usd": "0.010486"}
