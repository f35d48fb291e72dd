"""Engine creation and schema migrations (Alembic, shipped inside the package)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same for every replica running migrations.
_MIGRATION_LOCK_ID = 0x4844_4757


RAW_STATEMENTS = "hdg_raw_statements"  # in a connection's info: writer.execute may go to its driver


def allow_raw(engine: Engine) -> None:
    """Let ``writer.execute`` say its statements straight to the driver on ``engine``'s connections."""
    event.listen(engine, "engine_connect", lambda conn: conn.info.__setitem__(RAW_STATEMENTS, True))


def sqlite_pragmas(dbapi_conn: Any, _record: Any = None) -> None:
    """WAL mode, a busy timeout and enforced foreign keys: every SQLite connection the gateway opens gets these."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit survives a crash of the process, not necessarily a power cut; use
    # PostgreSQL where that matters. FULL would fsync on every commit (two per generation).
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def create_engine(url: str) -> AsyncEngine:
    """An async engine; SQLite gets WAL mode, a busy timeout and enforced foreign keys."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", sqlite_pragmas)
        return engine
    # No pool_pre_ping: it costs a round trip on every checkout; pool_recycle retires idle connections instead.
    engine = create_async_engine(url, pool_size=10, max_overflow=20, pool_recycle=300)
    if engine.dialect.name == "postgresql":
        allow_raw(engine.sync_engine)
    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


_WRITERS: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


@asynccontextmanager
async def writing(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """``sessions.begin()`` for a write transaction; on SQLite, one at a time in this process.

    SQLite has one writer. Left to contend, concurrent transactions wait in SQLite's busy handler, which sleeps and
    polls (in steps of up to 100 ms): under a burst that, not the work, makes the tail. Queued here instead, each
    starts the moment the one before it commits, in order of arrival.
    """
    bind = sessions.kw.get("bind")
    if bind is None or bind.dialect.name != "sqlite":
        async with sessions.begin() as session:
            yield session
        return
    lock = _WRITERS.get(bind.sync_engine)
    if lock is None:
        lock = _WRITERS[bind.sync_engine] = asyncio.Lock()
    async with lock, sessions.begin() as session:
        yield session


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged migrations; no alembic.ini needed."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _upgrade(conn: Connection, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, revision)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to run from several replicas at once on PostgreSQL."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Serialise concurrent upgrades: the lock is released when this transaction ends.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        await conn.run_sync(_upgrade, revision)


@asynccontextmanager
async def open_database(url: str, *, migrate: bool = True) -> AsyncIterator[AsyncEngine]:
    """Create an engine (migrating it first unless told not to) and dispose of it on exit."""
    engine = create_engine(url)
    try:
        if migrate:
            await upgrade(engine)
        yield engine
    finally:
        await engine.dispose()
