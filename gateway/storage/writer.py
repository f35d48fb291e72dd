"""The transactions on every generation's path (record a job, settle it) as one call each: ``transact``.

The work is a plain function of a SQLAlchemy ``Connection`` running Core statements; ``transact`` runs it in a
transaction and commits it.

- SQLite: on one thread of its own, with its own connection (``BEGIN IMMEDIATE``: the write lock is taken at the
  start, so a transaction never has to wait for it half-way), work that arrives together committed together (see
  SqliteWriter). One hand-off to that thread per piece of work, where the async driver takes three per statement: a
  statement costs about 15 µs there against about 250 µs through the async session, and the transactions no longer
  contend for SQLite's one writer lock among themselves.
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
import contextlib
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.sql import Executable

from gateway.storage.db import RAW_STATEMENTS, allow_raw, sqlite_pragmas

T = TypeVar("T")
C = TypeVar("C")  # what a group writer's work is handed: a connection
log = logging.getLogger("hidream_gateway.storage")


class GroupWriter(Generic[C]):
    """One thread that runs queued work in groups: work that arrives while a group runs waits for it, then all of it
    goes in the next one. What a group is (one transaction, savepoints around each piece) is ``_commit``'s, which
    answers each piece's outcome, in order; a piece's caller gets its value or its exception.

    Work is run once it is queued, even if its caller is cancelled before the group runs.
    """

    what = "group writer"  # its name in errors and logs

    def __init__(self, thread_name: str) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._closed = False
        self._lock = threading.Lock()
        self._pending: list[_Work[C, Any]] = []
        self._draining = False

    async def run(self, work: Callable[[C], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"The {self.what} is closed.")
            self._pending.append(_Work(work, future, loop))
            start, self._draining = not self._draining, True
        if start:
            self._thread.submit(self._drain)
        return await future

    def _drain(self) -> None:
        while True:
            with self._lock:
                group, self._pending = self._pending, []
                if not group:
                    self._draining = False
                    return
            try:
                outcomes = self._commit(group)
            except BaseException as exc:  # a piece raised what is no Exception: the group fails, the writer goes on
                log.exception("the %s failed a group of %d", self.what, len(group))
                error = exc if isinstance(exc, Exception) else RuntimeError(f"{type(exc).__name__} in the writer")
                outcomes = [(False, error)] * len(group)
            for item, outcome in zip(group, outcomes, strict=True):
                item.deliver(outcome)

    def _commit(self, group: list[_Work[C, Any]]) -> list[tuple[bool, Any]]:
        raise NotImplementedError

    def stop(self) -> None:
        """Run what was queued, then stop; work offered afterwards is refused (RuntimeError)."""
        with self._lock:
            self._closed = True
        self._thread.shutdown(wait=True)


class SqliteWriter(GroupWriter[Connection]):
    """One thread and one connection that commit write transactions on a SQLite file, in groups.

    Each group is one transaction: one BEGIN and one COMMIT, each piece of work inside its own SAVEPOINT, so one that
    raises is rolled back alone and the others commit. If the COMMIT itself fails, every piece in the group gets
    that error (as with any commit that errors, the caller cannot know more), and so does every piece when SQLite
    rolled the whole transaction back on its own (a full disk, an I/O error).
    """

    what = "SQLite writer"

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__("hdg-sqlite-writer")
        self.engine: Engine = create_sync_engine(
            engine.url.set(drivername="sqlite"),
            pool_size=1,
            max_overflow=0,
            # Python's sqlite3 begins transactions by itself, lazily and deferred; SQLAlchemy's begin does it here
            # (and SAVEPOINTs then work as SQLAlchemy expects).
            connect_args={"timeout": 30, "isolation_level": None, "check_same_thread": False},
        )
        event.listen(self.engine, "connect", sqlite_pragmas)
        event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        allow_raw(self.engine)
        # Kept checked out between groups (used on the writer's thread only): a checkout and a check-in per group
        # cost more than a small group's statements. One the driver reports broken, SQLAlchemy invalidates, and the
        # next group's begin opens a fresh one.
        self._conn: Connection | None = None

    def _commit(self, group: list[_Work[Connection, Any]]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        if self._conn is None:
            self._conn = self.engine.connect()
        conn = self._conn
        try:
            with conn.begin():
                if len(group) == 1:  # alone: no savepoint needed, the transaction is the unit
                    outcomes.append((True, group[0].work(conn)))
                else:
                    # Savepoints said to the driver: SQLAlchemy's begin_nested compiles its SAVEPOINT statements
                    # anew each time, which cost as much as the work in them.
                    raw = conn.connection.driver_connection
                    assert raw is not None
                    for item in group:
                        raw.execute("SAVEPOINT hdg_piece")
                        try:
                            value = item.work(conn)
                        except Exception as exc:
                            if not _in_transaction(conn):
                                # SQLite rolled the whole transaction back itself (a full disk, an I/O error): the
                                # pieces before this one are gone too, so the group fails as a whole.
                                raise
                            raw.execute("ROLLBACK TO SAVEPOINT hdg_piece")
                            raw.execute("RELEASE SAVEPOINT hdg_piece")
                            outcomes.append((False, exc))
                        else:
                            raw.execute("RELEASE SAVEPOINT hdg_piece")
                            outcomes.append((True, value))
        except Exception as exc:  # BEGIN or COMMIT failed, or the one piece raised: none of it is known to have landed
            return [(False, exc)] * len(group)
        return outcomes

    def close(self) -> None:
        """Commit what was queued, then stop; work offered afterwards is refused (RuntimeError)."""
        self.stop()
        if self._conn is not None:  # the thread has ended: nothing else uses the connection now
            with contextlib.suppress(Exception):
                self._conn.close()
        self.engine.dispose()


def _in_transaction(conn: Connection) -> bool:
    dbapi = conn.connection.dbapi_connection
    return bool(getattr(dbapi, "in_transaction", False))


@dataclass
class _Work(Generic[C, T]):
    work: Callable[[C], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop

    def deliver(self, outcome: tuple[bool, Any]) -> None:
        """Hand the outcome to the waiting coroutine, on its loop (from the writer thread)."""
        with contextlib.suppress(RuntimeError):  # its loop has closed: nobody is waiting
            self.loop.call_soon_threadsafe(_resolve, self.future, outcome)


def _resolve(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


# -- statements said to the driver ------------------------------------------------------------------------------
#
# On the SQLite writer's connection, SQLAlchemy's execution path (a context, parameter processing, a result object)
# costs several times what SQLite takes to run a statement, and the writer runs a dozen per generation. ``execute``
# compiles a prebuilt Core statement once, with SQLAlchemy's own compiler and its types' own parameter and result
# conversions, and then hands the SQL and the converted parameters to the driver. Statements that need more of
# SQLAlchemy (Python-side column defaults, expanding IN lists), and connections not marked for it (db.allow_raw: the
# writer's and PostgreSQL's are), take the usual way.


@dataclass
class _Plan:
    sql: str
    order: tuple[str, ...]  # the parameters' names, in the order of the SQL's placeholders
    convert: tuple[Callable[[Any], Any] | None, ...]  # each one's bind conversion
    literal: dict[str, Any]  # values the statement carries itself (a literal 0, round()'s 6)
    returning: tuple[Any, ...]  # the RETURNING columns (their conversions need the driver's column types)
    returns: tuple[Callable[[Any], Any] | None, ...] | None = None  # made at the first answer


@dataclass(frozen=True)
class Executed:
    """What a statement said to the driver answered: enough of SQLAlchemy's result for the callers here."""

    rowcount: int
    rows: list[tuple[Any, ...]]

    def first(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None


_PLANS: dict[tuple[int, str, frozenset[str]], tuple[Executable, _Plan | None]] = {}


def _plan(stmt: Any, keys: frozenset[str], dialect: Dialect) -> _Plan | None:
    compiled: Any = stmt.compile(dialect=dialect, column_keys=sorted(keys))
    binds = compiled.binds
    if compiled.insert_prefetch or compiled.update_prefetch or compiled.positiontup is None:
        return None  # Python-side defaults to compute, or not positional: SQLAlchemy's way
    if any(b.expanding for b in binds.values()):
        return None
    order = tuple(compiled.positiontup)
    convert = tuple(binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in order)
    literal = {name: b.effective_value for name, b in binds.items() if not b.required}
    return _Plan(compiled.string, order, convert, literal, tuple(compiled.effective_returning or ()))


def _values(plan: _Plan, params: dict[str, Any]) -> tuple[Any, ...]:
    out = []
    for name, convert in zip(plan.order, plan.convert, strict=True):
        value = params[name] if name in params else plan.literal[name]
        out.append(convert(value) if convert is not None else value)  # None too: JSON's None is 'null'
    return tuple(out)


def _rows(plan: _Plan, cursor: Any, dialect: Dialect) -> list[tuple[Any, ...]]:
    if not plan.returning:
        return []
    if plan.returns is None:
        plan.returns = tuple(
            c.type.dialect_impl(dialect).result_processor(dialect, described[1])
            for c, described in zip(plan.returning, cursor.description, strict=True)
        )
    return [
        tuple(c(v) if c is not None else v for c, v in zip(plan.returns, row, strict=True)) for row in cursor.fetchall()
    ]


def execute(conn: Connection, stmt: Executable, params: dict[str, Any] | list[dict[str, Any]]) -> Any:
    """``conn.execute(stmt, params)``, said straight to the driver's cursor on the connections that allow it (the
    SQLite writer's and PostgreSQL's, in ``transact``).

    ``stmt`` must be built once (module level or cached), as the plan is kept per statement object. Answers an
    ``Executed`` (rowcount, rows) there and SQLAlchemy's result elsewhere; raises SQLAlchemy's exceptions either way.
    """
    if not conn.info.get(RAW_STATEMENTS):
        return conn.execute(stmt, params)
    batch = params if isinstance(params, list) else [params]
    keys = frozenset(batch[0]) if batch else frozenset()
    if not batch or any(frozenset(p) != keys for p in batch):
        return conn.execute(stmt, params)
    dialect = conn.dialect
    key = (id(stmt), f"{dialect.name}+{dialect.driver}", keys)
    cached = _PLANS.get(key)
    if cached is None or cached[0] is not stmt:
        cached = _PLANS[key] = (stmt, _plan(stmt, keys, dialect))
    plan = cached[1]
    if plan is None:
        return conn.execute(stmt, params)
    dbapi_error = dialect.loaded_dbapi.Error
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        if isinstance(params, list):
            cursor.executemany(plan.sql, [_values(plan, p) for p in batch])
        else:
            cursor.execute(plan.sql, _values(plan, params))
        rows = _rows(plan, cursor, dialect)
        return Executed(cursor.rowcount, rows)
    except dbapi_error as exc:
        raise DBAPIError.instance(plan.sql, None, exc, dbapi_error) from exc
    finally:
        cursor.close()


_WRITERS: weakref.WeakKeyDictionary[Any, SqliteWriter | None] = weakref.WeakKeyDictionary()


def _writer(bind: AsyncEngine) -> SqliteWriter | None:
    if bind.dialect.name != "sqlite" or bind.url.database in (None, "", ":memory:"):
        return None
    key = bind.sync_engine
    if key in _WRITERS:
        return _WRITERS[key]
    writer = _WRITERS[key] = SqliteWriter(bind)
    # Disposing of the gateway's engine (at shutdown, or between tests) closes its writer too.
    event.listen(key, "engine_disposed", lambda _engine: _close(key))
    return writer


def _close(key: Any) -> None:
    # A transaction after the dispose (the engine reconnects when used again) takes the async engine's way rather
    # than starting a writer that nothing would close.
    writer, _WRITERS[key] = _WRITERS.get(key), None
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
