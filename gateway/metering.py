"""Prices, and which callers are limited (the limits themselves: gateway/storage/ledger.py and gateway/limits.py)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal

from gateway.auth import Principal
from gateway.settings import Cost

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


def limited(principal: Principal) -> bool:
    """Whether a job of this caller holds a reservation and a slot: its tenant or key has a budget or a cap."""
    t, k = principal.tenant, principal.key
    return any(v is not None for v in (t.monthly_budget_usd, t.max_in_flight, k.monthly_budget_usd, k.max_in_flight))
