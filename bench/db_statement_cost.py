"""What one database statement costs through SQLAlchemy's async layer, against the bare driver.

Run: .venv/bin/python bench/db_statement_cost.py [--database-url URL] [--n 2000]

Explains most of the gateway's per-request overhead (bench/gateway_overhead.py): a generation makes about
six statements in two transactions.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from gateway.storage.db import create_engine, session_factory


async def run(url: str, n: int) -> None:
    engine = create_engine(url)
    sessions = session_factory(engine)
    async with sessions() as warm:
        await warm.execute(text("SELECT 1"))

    start = time.perf_counter()
    for _ in range(n):
        async with sessions.begin() as session:
            await session.execute(text("SELECT 1"))
    per_tx = (time.perf_counter() - start) / n * 1000

    async with sessions.begin() as session:
        start = time.perf_counter()
        for _ in range(n):
            await session.execute(text("SELECT 1"))
        per_stmt = (time.perf_counter() - start) / n * 1000
        raw = (await (await session.connection()).get_raw_connection()).driver_connection
        start = time.perf_counter()
        for _ in range(n):
            if url.startswith("sqlite"):
                await (await raw.execute("SELECT 1")).fetchall()
            else:
                await raw.fetch("SELECT 1")
        per_raw = (time.perf_counter() - start) / n * 1000
    await engine.dispose()
    print(f"database: {url.split('://')[0]}")
    print(f"  session + BEGIN + SELECT 1 + COMMIT via SQLAlchemy: {per_tx:.3f} ms")
    print(f"  SELECT 1 via SQLAlchemy, inside a transaction:      {per_stmt:.3f} ms")
    print(f"  SELECT 1 on the bare driver connection:             {per_raw:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args.database_url or f"sqlite+aiosqlite:///{tmp}/bench.db", args.n))


if __name__ == "__main__":
    main()
