"""What a budget costs the create path: job-creating transactions per second with and without a hold.

Each transaction is what ``Engine.submit`` commits for a job: the hold on the ledger rows (only for a limited
caller) and the job's row. Runs on a throwaway PostgreSQL database; one tenant without limits, one limited tenant
(every job takes turns on its ledger row), and eight limited tenants sharing the load.

    .venv/bin/python bench/ledger_contention.py [--jobs 1500] [--concurrency 30]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
from sqlalchemy import Connection

from gateway.auth import create_tenant_with_key
from gateway.storage import ledger, queue, repo
from gateway.storage.db import open_database, session_factory
from gateway.storage.models import ApiKey, Prediction, Tenant, new_id, utcnow
from gateway.storage.writer import transact

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PRICE = Decimal("0.010486")


@dataclass
class Caller:
    tenant: Tenant
    key: ApiKey


def job(caller: Caller, *, held: bool, month: str) -> Prediction:
    now = utcnow()
    return Prediction(
        id=new_id("gen"), tenant_id=caller.tenant.id, api_key_id=caller.key.id, model="hidream-i1-fast",
        status="starting", prompt="a fox", params={}, width=1024, height=1024, n=1, seed=1, attempts=0,
        created_at=now, job={}, available_at=now, cancel_requested=False, logs="",
        reserved_usd=PRICE if held else None, reserved_month=month if held else None,
    )  # fmt: skip


async def run(url: str, jobs: int, concurrency: int) -> None:
    async with open_database(url) as engine:
        sessions = session_factory(engine)
        month = repo.month_key(utcnow())

        async def callers(count: int, budget: str | None) -> list[Caller]:
            made = []
            async with sessions.begin() as session:
                for _ in range(count):
                    t, k, _key = await create_tenant_with_key(
                        session, name=new_id("bench"), monthly_budget_usd=Decimal(budget) if budget else None
                    )
                    made.append(Caller(t, k))
            return made

        for label, group in (
            ("1 tenant, no limits", await callers(1, None)),
            ("1 tenant with a budget", await callers(1, "1000000")),
            ("8 tenants with a budget", await callers(8, "1000000")),
        ):
            gate = asyncio.Semaphore(concurrency)
            held = group[0].tenant.monthly_budget_usd is not None

            async def one(
                i: int, group: list[Caller] = group, held: bool = held, gate: asyncio.Semaphore = gate
            ) -> None:
                caller = group[i % len(group)]
                p = job(caller, held=held, month=month)

                def record(conn: Connection, p: Prediction = p) -> None:  # as the engine records a job
                    if held:
                        ledger.hold(conn, tenant=caller.tenant, key=caller.key, month=month, amount=PRICE)
                    queue.insert_job(conn, p)

                async with gate:
                    await transact(sessions, record)

            began = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(jobs)))
            print(f"{label:26s} {jobs / (time.perf_counter() - began):7.0f} jobs created/s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=30)
    args = parser.parse_args()
    name = f"hdg_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        await run(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}", args.jobs, args.concurrency)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
