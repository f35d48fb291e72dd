"""The ledger's rules, on the database itself (SQLite, then PostgreSQL): holds, settles across a month boundary,
the cap on a charge, and holds raced by concurrent transactions.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Connection, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.auth import create_tenant_with_key
from gateway.errors import BudgetExceeded, ConcurrencyLimited
from gateway.reconcile import reconcile
from gateway.storage import ledger, queue, repo
from gateway.storage.db import open_database, session_factory, upgrade
from gateway.storage.models import ApiKey, KeySpend, Prediction, Tenant, TenantSpend, UsageEvent, new_id, utcnow
from gateway.storage.writer import transact


async def _tenant(
    sessions: async_sessionmaker[AsyncSession], budget: str | None = None, cap: int | None = None
) -> tuple[Tenant, ApiKey]:
    async with sessions.begin() as session:
        tenant, key, _ = await create_tenant_with_key(
            session, name="t", monthly_budget_usd=Decimal(budget) if budget else None
        )
        tenant.max_in_flight = cap
    return tenant, key


async def _job(
    sessions: async_sessionmaker[AsyncSession], tenant: Tenant, key: ApiKey, amount: str, month: str
) -> Prediction:
    """A processing job holding ``amount`` in ``month``, created as the engine creates one."""
    p = Prediction(
        id=new_id("gen"), tenant_id=tenant.id, api_key_id=key.id, model="hidream-i1-fast", status="processing",
        prompt="p", params={}, width=1024, height=1024, n=1, seed=1, attempts=0, created_at=utcnow(), job={},
        available_at=utcnow(), cancel_requested=False, logs="", reserved_usd=Decimal(amount), reserved_month=month,
    )  # fmt: skip

    def record(conn: Connection) -> None:
        ledger.hold(conn, tenant=tenant, key=key, month=month, amount=Decimal(amount))
        queue.insert_job(conn, p)

    await transact(sessions, record)
    return p


async def _finish(sessions: async_sessionmaker[AsyncSession], p: Prediction, price: str) -> bool:
    return await transact(
        sessions,
        lambda conn: repo.finish_prediction(
            conn, prediction=p, status="succeeded", backend="fal", latency_ms=1, price_usd=Decimal(price),
            images=0, width=1024, height=1024,
        ),
    )  # fmt: skip


async def _rows(
    sessions: async_sessionmaker[AsyncSession], model: type[TenantSpend] | type[KeySpend]
) -> dict[str, tuple[Decimal, Decimal]]:
    async with sessions() as session:
        rows = (await session.scalars(select(model))).all()
        return {r.month: (r.spent_usd, r.reserved_usd) for r in rows}


def test_a_job_held_in_one_month_and_settled_in_the_next(database_url: str) -> None:
    async def main() -> None:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            tenant, key = await _tenant(sessions, budget="1")
            p = await _job(sessions, tenant, key, "0.30", month="2020-01")  # held in a month long past
            assert await _rows(sessions, TenantSpend) == {"2020-01": (Decimal(0), Decimal("0.30"))}
            # It ends now: charged to this month (as its usage event is dated), its hold given back to January.
            assert await _finish(sessions, p, "0.25")
            this_month = repo.month_key(utcnow())
            expected = {"2020-01": (Decimal(0), Decimal(0)), this_month: (Decimal("0.25"), Decimal(0))}
            assert await _rows(sessions, TenantSpend) == expected
            assert await _rows(sessions, KeySpend) == expected
            assert not await _finish(sessions, p, "0.25")  # settled once: a second settle changes nothing
            assert await _rows(sessions, TenantSpend) == expected
            async with sessions() as session:
                assert (await reconcile(session)).mismatches == []

    asyncio.run(main())


def test_holds_still_open_from_an_earlier_month_count_against_this_one(database_url: str) -> None:
    async def main() -> None:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            tenant, key = await _tenant(sessions, budget="1.00")
            await _job(sessions, tenant, key, "0.60", month="2020-01")  # still running; it will be charged now
            this_month = repo.month_key(utcnow())
            with pytest.raises(BudgetExceeded):
                await _job(sessions, tenant, key, "0.50", month=this_month)
            await _job(sessions, tenant, key, "0.40", month=this_month)  # exactly the rest
            # A replica whose clock is behind holds into last month: this month's holds count there too.
            with pytest.raises(BudgetExceeded):
                await _job(sessions, tenant, key, "0.01", month="2019-12")

    asyncio.run(main())


def test_a_budget_lowered_elsewhere_holds_at_once(database_url: str) -> None:
    async def main() -> None:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            tenant, key = await _tenant(sessions, budget="1.00")  # ``tenant`` now plays a cached, stale copy
            async with sessions.begin() as session:
                row = await session.get(Tenant, tenant.id)
                assert row is not None
                row.monthly_budget_usd = Decimal("0.10")  # another replica's admin API
            with pytest.raises(BudgetExceeded):
                await _job(sessions, tenant, key, "0.25", month=repo.month_key(utcnow()))

    asyncio.run(main())


def test_a_charge_is_never_more_than_the_hold(database_url: str) -> None:
    async def main() -> None:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            tenant, key = await _tenant(sessions, budget="0.10")
            month = repo.month_key(utcnow())
            p = await _job(sessions, tenant, key, "0.10", month=month)
            assert await _finish(sessions, p, "0.40")  # say, a provider returned more pixels than asked for
            async with sessions() as session:
                event = (await session.scalars(select(UsageEvent))).one()
                assert event.price_usd == Decimal("0.10")
            assert await _rows(sessions, TenantSpend) == {month: (Decimal("0.10"), Decimal(0))}

    asyncio.run(main())


@pytest.mark.parametrize("limit", ["budget", "cap"])
def test_concurrent_holds_take_exactly_what_is_left(database_url: str, limit: str) -> None:
    async def main() -> None:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            tenant, key = await _tenant(
                sessions, budget="1.00" if limit == "budget" else None, cap=3 if limit == "cap" else None
            )
            month = repo.month_key(utcnow())

            async def attempt() -> bool:
                try:
                    await _job(sessions, tenant, key, "0.25", month)
                except (BudgetExceeded, ConcurrencyLimited):
                    return False
                return True

            results = await asyncio.gather(*(attempt() for _ in range(12)))
            assert results.count(True) == (4 if limit == "budget" else 3)
            async with sessions() as session:
                row = await session.get(TenantSpend, (tenant.id, month))
                assert row is not None and row.reserved_usd == Decimal("0.25") * results.count(True)
                assert (await session.get(Tenant, tenant.id)).in_flight == results.count(True)  # type: ignore[union-attr]
            async with sessions() as session:
                assert (await reconcile(session)).mismatches == []

    asyncio.run(main())


def test_migrating_an_older_database_puts_its_spend_on_the_ledger(database_url: str) -> None:
    """Usage billed before revision 0002 (no monthly row) and before 0004 (no key rows) reconciles after 0004."""

    async def main() -> None:
        async with open_database(database_url, migrate=False) as engine:
            await upgrade(engine, "0003")
            async with engine.begin() as conn:
                for statement in (
                    "INSERT INTO tenants (id, name, status, created_at) VALUES ('ten_old', 'old', 'active', :at)",
                    "INSERT INTO api_keys (id, tenant_id, key_hash, display_prefix, created_at) "
                    "VALUES ('key_old', 'ten_old', 'h', 'hdg_x', :at)",
                    "INSERT INTO predictions (id, tenant_id, api_key_id, model, status, prompt, params, width, height, "
                    "n, seed, created_at) VALUES ('gen_old', 'ten_old', 'key_old', 'hidream-i1-fast', 'succeeded', "
                    "'p', '{}', 1024, 1024, 1, 1, :at)",
                    "INSERT INTO usage_events (prediction_id, tenant_id, api_key_id, model, width, height, images, "
                    "price_usd, latency_ms, status, created_at) VALUES ('gen_old', 'ten_old', 'key_old', "
                    "'hidream-i1-fast', 1024, 1024, 0, 0.25, 1, 'succeeded', :at)",
                ):
                    await conn.execute(text(statement), {"at": datetime(2025, 7, 31, 23, 30, tzinfo=UTC)})
            await upgrade(engine, "head")
            sessions = session_factory(engine)
            assert await _rows(sessions, TenantSpend) == {"2025-07": (Decimal("0.25"), Decimal(0))}
            assert await _rows(sessions, KeySpend) == {"2025-07": (Decimal("0.25"), Decimal(0))}
            async with sessions() as session:
                assert (await reconcile(session)).mismatches == []

    asyncio.run(main())
