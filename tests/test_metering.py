"""Prices, rate limits and budgets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from gateway.errors import RateLimited
from gateway.metering import RateLimiter, price_usd
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


def test_rate_limiter_slides_and_says_when_to_retry() -> None:
    limiter = RateLimiter(window_seconds=60)
    limiter.check("t", 2, now=0.0)
    limiter.check("t", 2, now=10.0)
    with pytest.raises(RateLimited) as exc:
        limiter.check("t", 2, now=20.0)
    assert exc.value.headers["Retry-After"] == "40"
    limiter.check("other", 2, now=20.0)  # per tenant
    limiter.check("t", 2, now=60.5)  # the first hit has left the window
    limiter.check("t", None, now=61.0)  # no limit set


def test_rpm_limit_answers_429_with_retry_after(gateway: Gateway) -> None:
    key = gateway.create_tenant(rpm=2)["api_key"]
    assert gateway.generate(key).status_code == 200
    assert gateway.generate(key).status_code == 200
    resp = gateway.generate(key)
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "rate_limit_exceeded" and int(resp.headers["Retry-After"]) >= 1


def test_monthly_budget_stops_new_work_once_spent(gateway: Gateway) -> None:
    key = gateway.create_tenant(monthly_budget_usd="0.01")["api_key"]
    assert gateway.generate(key).status_code == 200  # $0.010486: crosses the budget
    resp = gateway.generate(key)
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "insufficient_quota"
    usage = gateway.client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["summary"] == {"requests": 1, "images": 1, "price_usd": "0.010486"}
