"""Requests-per-minute limits in Redis: shared by every app that points at it, and a documented fallback when
Redis goes away (the gateway keeps serving, counts per process, says so in /readyz, and goes back once it can).
"""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from gateway.auth import Principal
from gateway.errors import RateLimited
from gateway.limits import RateLimits
from gateway.storage.models import ApiKey, Tenant
from tests.conftest import Gateway, GatewayFactory, fal_only
from tests.fakes.fal import FakeFal
from tests.fakes.tcp_proxy import TcpProxy
from tests.s3 import SilentServer

REDIS = "redis://127.0.0.1:6379/0"
CREATE = "/v1/models/hidream-ai/hidream-i1-fast/predictions"


def principal(*, tenant_rpm: int | None, key_rpm: int | None = None) -> Principal:
    tenant = Tenant(id=f"ten_{secrets.token_hex(12)}", name="t", rpm=tenant_rpm)
    return Principal(tenant=tenant, key=ApiKey(id=f"key_{secrets.token_hex(12)}", tenant_id=tenant.id, rpm=key_rpm))


async def _count_allowed(limits: RateLimits, who: Principal, attempts: int) -> int:
    allowed = 0
    for _ in range(attempts):
        try:
            await limits.check(who)
            allowed += 1
        except RateLimited:
            pass
    return allowed


def test_two_limiters_on_one_redis_share_the_window() -> None:
    async def main() -> None:
        a, b = RateLimits(REDIS), RateLimits(REDIS)
        try:
            who = principal(tenant_rpm=4)
            assert await _count_allowed(a, who, 3) == 3
            assert await _count_allowed(b, who, 3) == 1  # the other process already used three of the four
            with pytest.raises(RateLimited) as refused:
                await a.check(who)
            headers = refused.value.headers
            assert headers["x-ratelimit-limit"] == "4" and headers["x-ratelimit-remaining"] == "0"
            assert 1 <= int(headers["Retry-After"]) <= 60 and a.mode == b.mode == "redis"
            # A key's own limit: its refusals do not use up the tenant's places.
            keyed = principal(tenant_rpm=3, key_rpm=1)
            assert await _count_allowed(a, keyed, 3) == 1
            tenant_only = Principal(tenant=keyed.tenant, key=principal(tenant_rpm=None).key)
            assert await _count_allowed(b, tenant_only, 5) == 2
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


def test_a_burst_in_one_process_is_counted_in_redis_not_dropped_to_the_fallback() -> None:
    async def main() -> None:
        limits = RateLimits(REDIS, max_connections=20)
        try:
            who = principal(tenant_rpm=50)
            outcomes = await asyncio.gather(*(_count_allowed(limits, who, 1) for _ in range(300)))
            assert sum(outcomes) == 50 and limits.mode == "redis"  # more calls than connections wait their turn
        finally:
            await limits.aclose()

    asyncio.run(main())


def test_a_redis_that_hangs_costs_one_timeout_not_a_queue_of_them() -> None:
    async def main() -> None:
        with SilentServer() as silent:  # accepts connections, never answers
            limits = RateLimits(f"redis://127.0.0.1:{silent.port}/0", max_connections=5)
            try:
                began = time.monotonic()
                allowed = await asyncio.gather(
                    *(_count_allowed(limits, principal(tenant_rpm=10), 1) for _ in range(200))
                )
                # The first five time out (0.25 s); the 195 waiting behind them count here at once.
                assert time.monotonic() - began < 1.5 and sum(allowed) == 200
                assert limits.mode == "local-fallback" and silent.accepted <= 5
            finally:
                await limits.aclose()

    asyncio.run(main())


def test_without_redis_configured_the_limits_are_per_process() -> None:
    async def main() -> None:
        limits = RateLimits(None)
        who = principal(tenant_rpm=2)
        assert limits.mode == "local" and not limits.configured
        assert await _count_allowed(limits, who, 5) == 2
        assert await limits.check(principal(tenant_rpm=None)) is None

    asyncio.run(main())


def test_a_redis_outage_falls_back_to_per_process_limits_and_recovers(
    make_gateway: GatewayFactory, sqlite_url: str, fal: FakeFal
) -> None:
    with TcpProxy("127.0.0.1", 6379) as proxy:
        gw: Gateway = make_gateway(
            sqlite_url, from_settings=True, **fal_only(fal), redis_url=f"redis://127.0.0.1:{proxy.port}/0"
        )
        tenant = gw.create_tenant(rpm=3)
        auth = {"Authorization": f"Bearer {tenant['api_key']}"}

        def create() -> int:
            return gw.client.post(CREATE, json={"input": {"prompt": "a fox"}}, headers=auth).status_code

        first = gw.client.post(CREATE, json={"input": {"prompt": "a fox"}}, headers=auth)
        assert first.status_code == 201 and first.headers["x-ratelimit-remaining"] == "2"
        assert create() == 201
        ready = gw.client.get("/readyz").json()
        assert ready["checks"]["redis"] == "ok"

        proxy.cut()
        began = time.monotonic()
        # Still serving: counted in this process from zero, so three more, then refused.
        assert [create() for _ in range(4)] == [201, 201, 201, 429]
        assert time.monotonic() - began < 5, "an unreachable Redis must not stall requests"
        ready = gw.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["redis"].startswith("unreachable")

        proxy.restore()
        time.sleep(5.2)  # the limiter tries Redis again five seconds after it failed
        # Back on Redis, whose window still holds the two requests made before the outage: one place left.
        assert [create() for _ in range(2)] == [201, 429]
        assert gw.client.get("/readyz").json()["checks"]["redis"] == "ok"
