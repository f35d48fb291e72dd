"""The routing policy (pure) and the circuit breaker, including property-based checks."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.health import CircuitBreaker, HealthBoard
from gateway.routing import BackendView, Route, eligible, plan

VARIANT_SETS = st.sets(st.sampled_from(["full", "dev", "fast"]), min_size=0, max_size=3).map(frozenset)


@st.composite
def views(draw: st.DrawFn) -> list[BackendView]:
    names = draw(st.lists(st.sampled_from(["local", "worker-1", "worker-2", "replicate", "fal"]), unique=True))
    return [
        BackendView(
            name=name,
            kind=name.split("-")[0],
            variants=draw(VARIANT_SETS),
            admits=draw(st.booleans()),
            has_capacity=draw(st.booleans()),
            cost_usd=Decimal(draw(st.integers(min_value=0, max_value=100_000))) / Decimal(1_000_000),
            latency_s=draw(st.none() | st.floats(min_value=0.01, max_value=60)),
        )
        for name in names
    ]


ALLOWED = st.none() | st.lists(st.sampled_from(["local", "worker", "worker-1", "replicate", "fal"]), max_size=3)
ROUTES = st.sampled_from([Route("cheapest"), Route("fastest"), Route("explicit", ("fal", "worker", "replicate"))])


@given(views(), st.sampled_from(["full", "dev", "fast"]), ALLOWED, ROUTES)
def test_never_picks_an_open_circuit_or_disallowed_backend(
    vs: list[BackendView], variant: str, allowed: list[str] | None, route: Route
) -> None:
    picked = plan(variant=variant, route=route, allowed=allowed, views=vs)
    by_name = {v.name: v for v in vs}
    for name in picked:
        v = by_name[name]
        assert v.admits and v.has_capacity and variant in v.variants
        assert allowed is None or any(a in (v.name, v.kind) for a in allowed)
    # Completeness: every eligible backend is a candidate, so one healthy allowed backend is always found.
    assert set(picked) == {v.name for v in vs if eligible(v, variant=variant, allowed=allowed, route=route)}


@given(views(), st.sampled_from(["full", "dev", "fast"]), ALLOWED)
def test_cheapest_really_is_cheapest_among_the_eligible(
    vs: list[BackendView], variant: str, allowed: list[str] | None
) -> None:
    picked = plan(variant=variant, route=Route("cheapest"), allowed=allowed, views=vs)
    costs = [next(v.cost_usd for v in vs if v.name == n) for n in picked]
    assert costs == sorted(costs)
    if picked:
        eligible_costs = [v.cost_usd for v in vs if eligible(v, variant=variant, allowed=allowed)]
        assert costs[0] == min(eligible_costs)


@given(views(), st.sampled_from(["full", "dev", "fast"]))
def test_fastest_orders_by_recent_latency(vs: list[BackendView], variant: str) -> None:
    picked = plan(variant=variant, route=Route("fastest"), allowed=None, views=vs)
    latencies = [next(v.latency_s or 0.0 for v in vs if v.name == n) for n in picked]
    assert latencies == sorted(latencies)


def _view(name: str, cost: str, **kw: object) -> BackendView:
    fields: dict[str, object] = {
        "kind": name.split("-")[0],
        "variants": frozenset({"fast"}),
        "admits": True,
        "has_capacity": True,
        "cost_usd": Decimal(cost),
        "latency_s": None,
    } | kw
    return BackendView(name=name, **fields)  # type: ignore[arg-type]


def test_explicit_route_keeps_the_given_order_and_only_those_backends() -> None:
    vs = [_view("worker-1", "0.001"), _view("worker-2", "0.002"), _view("fal", "0.01"), _view("replicate", "0.02")]
    route = Route.parse("replicate, worker")
    assert plan(variant="fast", route=route, allowed=None, views=vs) == ["replicate", "worker-1", "worker-2"]


@pytest.mark.parametrize("text", ["", "fal,,replicate", "FAL;drop table", "x" * 40, "1abc"])
def test_route_parse_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="invalid route"):
        Route.parse(text)


def test_route_parse() -> None:
    assert Route.parse(" Cheapest ") == Route("cheapest")
    assert Route.parse("fastest") == Route("fastest")
    assert str(Route.parse("fal,replicate")) == "fal,replicate"


def test_breaker_opens_after_threshold_then_admits_one_trial() -> None:
    b = CircuitBreaker(failure_threshold=2, open_seconds=10)
    b.on_failure(now=0)
    assert b.admits(now=0) and b.current(0) == "closed"
    b.on_failure(now=1)
    assert b.current(1) == "open" and not b.admits(now=5)
    assert b.admits(now=11) and b.current(11) == "half_open"
    assert b.claim(now=11) and not b.claim(now=11)
    assert not b.admits(now=11)  # only one trial at a time
    b.on_failure(now=12)
    assert b.current(12) == "open" and not b.admits(now=15)  # a failed trial reopens at once
    b.release()  # the trial's attempt ended
    assert b.admits(now=22)
    assert b.claim(now=22)
    b.on_success()
    assert b.current(22) == "closed" and b.consecutive_failures == 0


def test_health_board_tracks_throttling_latency_and_in_flight() -> None:
    now = [100.0]
    board = HealthBoard(failure_threshold=3, open_seconds=30, clock=lambda: now[0])
    board.register("fal", max_in_flight=1)
    with board.attempt("fal"):
        assert not board.has_capacity("fal")
    assert board.has_capacity("fal")
    board.throttled("fal", 5)
    assert not board.has_capacity("fal") and board.retry_after("fal") == 6
    now[0] += 5
    assert board.has_capacity("fal")
    board.success("fal", 2.0)
    board.success("fal", 4.0)
    assert board.snapshot()["fal"]["latency_ms"] == pytest.approx(2400.0)


def test_a_cancelled_trial_frees_the_half_open_slot() -> None:
    now = [0.0]
    board = HealthBoard(failure_threshold=1, open_seconds=5, clock=lambda: now[0])
    board.register("worker", max_in_flight=4)
    board.failure("worker", "down")
    now[0] = 6.0
    assert board.admits("worker")
    with pytest.raises(asyncio.CancelledError), board.attempt("worker"):
        raise asyncio.CancelledError  # the client went away mid-trial: no verdict
    assert board.admits("worker") and board.backends["worker"].in_flight == 0
