"""Prices, per-tenant request rate limits and monthly budgets."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import BudgetExceeded, RateLimited
from gateway.settings import Cost
from gateway.storage import repo
from gateway.storage.models import Tenant

MICRO_USD = Decimal("0.000001")


def price_usd(prices: Mapping[str, Decimal], *, model: str, width: int, height: int, images: int) -> Decimal:
    """The tenant's price: USD per megapixel of output for the model, times pixels, times images."""
    per_mp = prices.get(model, Decimal(0))
    megapixels = Decimal(width * height) / Decimal(1_000_000)
    return (per_mp * megapixels * images).quantize(MICRO_USD, rounding=ROUND_HALF_UP)


def backend_cost_usd(
    cost: Cost | None, *, gpu_usd_per_second: Decimal, width: int, height: int, images: int, gpu_seconds: float | None
) -> Decimal:
    """What a backend charges us: flat and per-megapixel prices per image, plus GPU time at the GPU rate.

    ``gpu_seconds`` is the measured time for the whole job when the backend reports it; otherwise the
    price book's expected seconds per image are used (that is also the estimate routing compares).
    """
    if cost is None:
        return Decimal(0)
    megapixels = Decimal(width * height) / Decimal(1_000_000)
    per_image = cost.per_image + cost.per_megapixel * megapixels
    seconds = Decimal(str(gpu_seconds)) if gpu_seconds is not None else cost.gpu_seconds * images
    total = per_image * images + seconds * gpu_usd_per_second
    return total.quantize(MICRO_USD, rounding=ROUND_HALF_UP)


class RateLimiter:
    """A per-tenant sliding one-minute window, in this process.

    Each replica counts on its own; a limit shared across replicas (Redis) replaces this later.
    """

    def __init__(self, window_seconds: float = 60.0) -> None:
        self.window = window_seconds
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, tenant_id: str, rpm: int | None, *, now: float | None = None) -> None:
        """Count one request, or raise RateLimited (with Retry-After) if the tenant is over ``rpm``."""
        if rpm is None:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits.setdefault(tenant_id, deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= rpm:
                retry = max(1, math.ceil(hits[0] + self.window - now))
                raise RateLimited(
                    f"Rate limit of {rpm} requests per minute reached; retry in {retry} s.",
                    headers={"Retry-After": str(retry)},
                )
            hits.append(now)


async def check_budget(session: AsyncSession, *, tenant: Tenant, now: datetime) -> None:
    """Refuse new work once this month's billed usage has reached the tenant's budget."""
    if tenant.monthly_budget_usd is None:
        return
    spent = await repo.month_spend(session, tenant_id=tenant.id, month=repo.month_key(now))
    if spent >= tenant.monthly_budget_usd:
        raise BudgetExceeded(f"Monthly budget of ${tenant.monthly_budget_usd} reached (spent ${spent:.6f} this month).")
