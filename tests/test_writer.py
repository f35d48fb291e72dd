"""storage.writer.transact: work committed as a whole, raised errors returned to their own caller, and on SQLite the
work that queues while a commit runs committed together, each piece in its own savepoint."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import Connection, event, text

from gateway.storage.db import create_engine, open_database, session_factory
from gateway.storage.writer import _WRITERS, SqliteWriter, transact


class Refused(Exception):
    pass


@asynccontextmanager
async def sqlite_writer(path: Path) -> AsyncIterator[SqliteWriter]:
    """A writer of its own on the SQLite file ``path``, closed with its engine at the end."""
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    writer = SqliteWriter(engine)
    try:
        yield writer
    finally:
        writer.close()
        await engine.dispose()


def test_pieces_commit_or_roll_back_alone_whatever_they_share(database_url: str) -> None:
    async def main() -> None:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            await transact(sessions, lambda conn: conn.execute(text("CREATE TABLE t_writer (n INTEGER PRIMARY KEY)")))
            await transact(sessions, lambda conn: conn.execute(text("INSERT INTO t_writer (n) VALUES (999)")))
            try:
                gate = threading.Event()
                commits: list[int] = []
                sqlite = engine.dialect.name == "sqlite"
                if sqlite:
                    writer = _WRITERS[engine.sync_engine]
                    event.listen(writer.engine, "commit", lambda _conn: commits.append(1))

                def blocker(conn: Connection) -> None:  # holds the writer while the others queue behind it
                    gate.wait(10)
                    conn.execute(text("INSERT INTO t_writer (n) VALUES (-1)"))

                def piece(n: int) -> Callable[[Connection], int]:
                    def work(conn: Connection) -> int:
                        conn.execute(text("INSERT INTO t_writer (n) VALUES (:n)"), {"n": n})
                        if n % 7 == 3:
                            raise Refused(n)  # after its insert: that insert must not land
                        if n == 20:  # a duplicate of a row committed before: the database refuses it, and only it
                            conn.execute(text("INSERT INTO t_writer (n) VALUES (999)"))
                        return n * 10

                    return work

                first = asyncio.ensure_future(transact(sessions, blocker))
                await asyncio.sleep(0.2)
                results = asyncio.gather(*(transact(sessions, piece(n)) for n in range(40)), return_exceptions=True)
                await asyncio.sleep(0.2)
                gate.set()
                outcomes = await results
                await first

                refused = {n for n in range(40) if n % 7 == 3}
                for n, outcome in enumerate(outcomes):
                    if n in refused:
                        assert isinstance(outcome, Refused) and outcome.args == (n,)
                    elif n == 20:
                        assert isinstance(outcome, Exception) and "UNIQUE" in str(outcome).upper()
                    else:
                        assert outcome == n * 10
                async with sessions() as session:
                    landed = set((await session.scalars(text("SELECT n FROM t_writer"))).all())
                assert landed == {-1, 999} | set(range(40)) - refused - {20}
                if sqlite:  # the blocker alone, then the 40 that queued behind it in one or two groups
                    assert 2 <= len(commits) <= 3, commits
            finally:
                await transact(sessions, lambda conn: conn.execute(text("DROP TABLE t_writer")))

    asyncio.run(main())


def test_a_cancelled_caller_does_not_stop_a_sqlite_commit_it_started(sqlite_url: str) -> None:
    async def main() -> None:
        async with open_database(sqlite_url) as engine:
            sessions = session_factory(engine)
            await transact(sessions, lambda conn: conn.execute(text("CREATE TABLE t_cancel (n INTEGER)")))
            started, finish = threading.Event(), threading.Event()

            def slow(conn: Connection) -> None:
                started.set()
                finish.wait(10)
                conn.execute(text("INSERT INTO t_cancel (n) VALUES (1)"))

            call = asyncio.ensure_future(transact(sessions, slow))
            await asyncio.to_thread(started.wait, 10)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            finish.set()
            # The next piece of work runs after it: by then the cancelled caller's insert has committed.
            count = await transact(sessions, lambda conn: conn.execute(text("SELECT count(*) FROM t_cancel")).scalar())
            assert count == 1

    asyncio.run(main())


class Escaped(BaseException):
    """Raised by a piece of work: no Exception, so nothing on its way catches it."""


def test_a_group_that_sqlite_rolled_back_whole_fails_whole_and_the_writer_goes_on(tmp_path: Path) -> None:
    async def main() -> None:
        async with sqlite_writer(tmp_path / "w.db") as writer:
            await writer.run(lambda c: c.exec_driver_sql("CREATE TABLE t (n INTEGER PRIMARY KEY, pad BLOB)"))
            pages = await writer.run(lambda c: c.exec_driver_sql("PRAGMA page_count").scalar())

            async def group(*pieces: Callable[[Connection], object]) -> list[object]:
                gate = threading.Event()
                first = asyncio.ensure_future(writer.run(lambda _c: gate.wait(10)))  # the others queue behind it
                await asyncio.sleep(0.2)
                outcomes = asyncio.gather(*(writer.run(p) for p in pieces), return_exceptions=True)
                await asyncio.sleep(0.2)
                gate.set()
                await first
                return list(await outcomes)

            def row(n: int) -> Callable[[Connection], object]:
                return lambda c: c.execute(text("INSERT INTO t (n) VALUES (:n)"), {"n": n}).rowcount

            def too_big(c: Connection) -> None:  # the disk is full: SQLite rolls the whole transaction back
                c.exec_driver_sql(f"PRAGMA max_page_count={pages + 3}")
                c.execute(text("INSERT INTO t (n, pad) VALUES (1000, zeroblob(200000))"))

            outcomes = await group(row(1), too_big, row(2), row(3))
            assert all(isinstance(o, Exception) for o in outcomes), outcomes  # none is told it committed
            landed = await writer.run(lambda c: c.exec_driver_sql("SELECT n FROM t").scalars().all())
            assert landed == []

            def escapes(_c: Connection) -> None:
                raise Escaped

            outcomes = await group(row(4), escapes, row(5))
            assert all(isinstance(o, Exception) for o in outcomes), outcomes
            assert await writer.run(row(6)) == 1  # and the writer still takes work
            landed = await writer.run(lambda c: c.exec_driver_sql("SELECT n FROM t").scalars().all())
            assert landed == [6]

    asyncio.run(main())


def test_statements_said_to_the_driver_store_what_sqlalchemy_would(database_url: str) -> None:
    # writer.execute skips SQLAlchemy's execution but not its conversions: the same statement, run both ways, stores
    # the same values (Decimals, aware datetimes through UTCDateTime, JSON including a None, which JSON stores as
    # 'null', not as SQL NULL) and answers the same RETURNING row.
    from datetime import UTC, datetime
    from decimal import Decimal

    from sqlalchemy import Column, DateTime, Integer, MetaData, Numeric, String, Table, bindparam, insert, update
    from sqlalchemy.types import JSON

    from gateway.storage.models import UTCDateTime
    from gateway.storage.writer import Executed, execute

    table = Table(
        "t_raw",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("amount", Numeric(14, 6)),
        Column("at", UTCDateTime()),
        Column("doc", JSON),
        Column("note", String(20)),
        Column("plain_at", DateTime(timezone=True)),
    )
    put = insert(table)
    values = {"amount": bindparam("v_amount"), "doc": bindparam("v_doc")}
    change = update(table).where(table.c.id == bindparam("g_id")).values(values)
    change = change.returning(table.c.amount, table.c.at)
    at = datetime(2026, 12, 6, 21, 30, 15, 123456, tzinfo=UTC)
    row = {"amount": Decimal("12.345678"), "at": at, "doc": {"é": [1, None]}, "note": None, "plain_at": at}

    async def main() -> None:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            await transact(sessions, lambda conn: table.create(conn))

            def both(conn: Connection) -> list[object]:
                answers = []
                for n, run in ((1, execute), (2, Connection.execute)):
                    run(conn, put, row | {"id": n})
                    given = {"g_id": n, "v_amount": Decimal("-0.000001"), "v_doc": None}
                    result = run(conn, change, given)
                    assert isinstance(result, Executed) is (run is execute)  # the driver's way, on both databases
                    answers.append(tuple(result.first()))
                stored = conn.execute(text("SELECT amount, at, doc, note, plain_at FROM t_raw ORDER BY id")).all()
                return [*answers, *[tuple(str(v) for v in r) for r in stored]]

            raw_answer, sa_answer, raw_row, sa_row = await transact(sessions, both)
            assert raw_answer == sa_answer == (Decimal("-0.000001"), at)
            assert raw_row == sa_row

    asyncio.run(main())


def test_work_after_the_engine_is_disposed_starts_no_writer_that_nothing_would_close(sqlite_url: str) -> None:
    # The writer's thread and connection close with the engine. The engine itself may be used again after a dispose
    # (SQLAlchemy reconnects): that work still commits, on the async engine, and leaves no writer thread behind.
    async def main() -> None:
        engine = create_engine(sqlite_url)
        sessions = session_factory(engine)
        await transact(sessions, lambda conn: conn.execute(text("CREATE TABLE t_after (n INTEGER)")))
        assert isinstance(_WRITERS[engine.sync_engine], SqliteWriter)
        await engine.dispose()
        await transact(sessions, lambda conn: conn.execute(text("INSERT INTO t_after (n) VALUES (7)")))
        assert _WRITERS[engine.sync_engine] is None  # no new writer: the disposed one is not replaced
        async with sessions() as session:
            assert (await session.scalars(text("SELECT n FROM t_after"))).all() == [7]
        await engine.dispose()

    asyncio.run(main())


def test_a_begin_that_finds_the_database_locked_fails_as_sqlalchemys_error_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    # Another process holds SQLite's write lock past the busy timeout: the caller gets SQLAlchemy's OperationalError
    # (the job engine retries those as transient), and the writer takes the next work once the lock is free.
    import sqlite3

    from sqlalchemy.exc import OperationalError

    async def main() -> None:
        async with sqlite_writer(tmp_path / "locked.db") as writer:
            other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
            try:
                await writer.run(lambda c: c.exec_driver_sql("CREATE TABLE t (n INTEGER)"))
                await writer.run(lambda c: c.exec_driver_sql("PRAGMA busy_timeout=50"))
                other.execute("BEGIN IMMEDIATE")
                with pytest.raises(OperationalError, match="locked"):
                    await writer.run(lambda c: c.exec_driver_sql("INSERT INTO t (n) VALUES (1)"))
                other.execute("ROLLBACK")
                assert await writer.run(lambda c: c.exec_driver_sql("INSERT INTO t (n) VALUES (2)").rowcount) == 1
                assert await writer.run(lambda c: c.exec_driver_sql("SELECT n FROM t").scalars().all()) == [2]
            finally:
                other.close()

    asyncio.run(main())


def test_a_broken_connection_is_replaced_and_a_closed_writer_refuses_work(tmp_path: Path) -> None:
    # The writer keeps its connection between groups: one that broke is replaced by the next group's.
    # Once closed, the writer refuses work at once (it does not queue it for a thread that is gone).
    from sqlalchemy.exc import DBAPIError

    async def main() -> None:
        async with sqlite_writer(tmp_path / "broken.db") as writer:
            await writer.run(lambda c: c.exec_driver_sql("CREATE TABLE t (n INTEGER)"))

            def breaks(c: Connection) -> None:
                raw = c.connection.driver_connection
                assert raw is not None
                raw.close()  # as if the connection had died under it

            with pytest.raises(DBAPIError):
                await writer.run(breaks)
            assert await writer.run(lambda c: c.exec_driver_sql("INSERT INTO t (n) VALUES (1)").rowcount) == 1
            assert await writer.run(lambda c: c.exec_driver_sql("SELECT n FROM t").scalars().all()) == [1]
        for _ in range(2):
            with pytest.raises(RuntimeError, match="closed"):
                await asyncio.wait_for(writer.run(lambda c: None), 5)

    asyncio.run(main())
