"""Routing policy, pure: (job's variant, route, tenant's allowed backends, backend states) -> ordered candidates.

No I/O and no clocks: the caller takes a snapshot of every backend's state and passes it in.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

RouteKind = Literal["cheapest", "fastest", "explicit"]
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_ROUTE_CHARS = 200  # what a job's row keeps of it (predictions.route)


@dataclass(frozen=True)
class Route:
    """How to order eligible backends: by estimated cost, by recent latency, or in a given order."""

    kind: RouteKind
    order: tuple[str, ...] = ()

    @staticmethod
    def parse(text: str) -> Route:
        """``cheapest``, ``fastest``, or a comma-separated list of backend names such as ``fal,replicate``."""
        if len(text) > MAX_ROUTE_CHARS:  # before the cache: a client's header text must not be kept at any size
            raise ValueError(f"invalid route: longer than {MAX_ROUTE_CHARS} characters")
        return _parse_route(text)

    def __str__(self) -> str:
        return ",".join(self.order) if self.kind == "explicit" else self.kind


@functools.lru_cache(maxsize=256)  # twice per request (the API, then the runner), from a handful of texts
def _parse_route(text: str) -> Route:
    value = text.strip().lower()
    if value in ("cheapest", "fastest"):
        return Route(value)  # type: ignore[arg-type]
    names = tuple(part.strip() for part in value.split(","))
    if not names or not all(_NAME.match(n) for n in names):
        raise ValueError(f"invalid route {text!r}: use cheapest, fastest, or backend names separated by commas")
    return Route("explicit", names)


@dataclass(frozen=True)
class BackendView:
    """One backend as routing sees it at one instant."""

    name: str
    kind: str  # worker, replicate, fal, local: what tenants' allow-lists and routes may also name
    variants: frozenset[str]
    admits: bool  # the circuit breaker lets a request through (closed, or half-open with its trial free)
    has_capacity: bool  # below its in-flight limit and not throttled
    cost_usd: Decimal  # estimated cost to us of this job on this backend
    latency_s: float | None  # recent latency; None until measured


def names_match(entry: str, view: BackendView) -> bool:
    """A name in a route or an allow-list matches a backend by its name or by its kind (``worker``)."""
    return entry in (view.name, view.kind)


def eligible(view: BackendView, *, variant: str, allowed: Collection[str] | None, route: Route | None = None) -> bool:
    """Whether a backend may take the job at all (before ordering)."""
    if allowed is not None and not any(names_match(a, view) for a in allowed):
        return False
    if route is not None and route.kind == "explicit" and not any(names_match(n, view) for n in route.order):
        return False
    return variant in view.variants and view.admits and view.has_capacity


def plan(*, variant: str, route: Route, allowed: Collection[str] | None, views: Sequence[BackendView]) -> list[str]:
    """Names of the backends to try, in order. Empty when none can serve."""
    candidates = [v for v in views if eligible(v, variant=variant, allowed=allowed, route=route)]
    if route.kind == "cheapest":
        # Unknown latency sorts as zero so a new backend gets traffic and a measurement.
        candidates.sort(key=lambda v: (v.cost_usd, v.latency_s or 0.0, v.name))
    elif route.kind == "fastest":
        candidates.sort(key=lambda v: (v.latency_s or 0.0, v.cost_usd, v.name))
    else:
        rank = {name: i for i, name in enumerate(route.order)}

        def position(v: BackendView) -> tuple[int, str]:
            return (min(rank.get(v.name, len(rank)), rank.get(v.kind, len(rank))), v.name)

        candidates.sort(key=position)
    return [v.name for v in candidates]
