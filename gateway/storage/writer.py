"""The transactions on every generation's path (record a job, settle it) as one call each: ``transact``.

The work is a plain function of a SQLAlchemy ``Connection`` running Core statements; ``transact`` runs it in a
transaction and commits it.

- SQLite: on one thread of its own, with its own connection, one transaction after another (``BEGIN IMMEDIATE``:
  the write lock is taken at the start, so a transaction never has to wait for it half-way). One hand-off to that
  thread per transaction, where the async driver takes three per statement: a statement costs about 15 µs there
  against about 250 µs through the async session, and the transactions no longer contend for SQLite's one writer
  lock among themselves.
- PostgreSQL: on a pooled connection of the async engine (``run_sync``); each statement is still one round trip.
  (An in-memory SQLite database, which the gateway never uses, goes this way too; its one shared connection does
  not keep concurrent transactions apart.)

Either way the work commits or rolls back as a whole, and what it raises reaches the caller. A caller cancelled
while the SQLite thread runs its transaction does not stop it: it commits or rolls back on its own, as if the
caller had crashed a moment after sending it (Engine.submit shields it and runs a job that committed).

Example::

    def record(conn: Connection) -> None:
        queue.insert_job(conn, prediction)

    await transact(sessions, record)
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.storage.db import sqlite_pragmas

T = TypeVar("T")


class SqliteWriter:
    """One thread and one connection that run write transactions on a SQLite file, one at a time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine: Engine = create_sync_engine(
            engine.url.set(drivername="sqlite"),
            pool_size=1,
            max_overflow=0,
            # Python's sqlite3 begins transactions by itself, lazily and deferred; SQLAlchemy's begin does it here.
            connect_args={"timeout": 30, "isolation_level": None, "check_same_thread": False},
        )
        event.listen(self.engine, "connect", sqlite_pragmas)
        event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hdg-sqlite-writer")

    def _transact(self, work: Callable[[Connection], T]) -> T:
        with self.engine.begin() as conn:
            return work(conn)

    async def run(self, work: Callable[[Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._transact, work)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.engine.dispose()


_WRITERS: weakref.WeakKeyDictionary[Any, SqliteWriter] = weakref.WeakKeyDictionary()


def _writer(bind: AsyncEngine) -> SqliteWriter | None:
    if bind.dialect.name != "sqlite" or bind.url.database in (None, "", ":memory:"):
        return None
    key = bind.sync_engine
    writer = _WRITERS.get(key)
    if writer is None:
        writer = _WRITERS[key] = SqliteWriter(bind)
        # Disposing of the gateway's engine (at shutdown, or between tests) closes its writer too.
        event.listen(key, "engine_disposed", lambda _engine: _close(key))
    return writer


def _close(key: Any) -> None:
    writer = _WRITERS.pop(key, None)
    if writer is not None:
        writer.close()


async def transact(sessions: async_sessionmaker[AsyncSession], work: Callable[[Connection], T]) -> T:
    """Run ``work`` in a write transaction and commit it; returns what ``work`` returns, raises what it raises."""
    bind: AsyncEngine = sessions.kw["bind"]
    writer = _writer(bind)
    if writer is not None:
        return await writer.run(work)
    async with bind.begin() as conn:
        return await conn.run_sync(work)
