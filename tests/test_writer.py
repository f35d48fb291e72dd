"""storage.writer.transact: work committed as a whole, raised errors returned to their own caller, and on SQLite the
work that queues while a commit runs committed together, each piece in its own savepoint."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import Connection, event, text

from gateway.storage.db import open_database, session_factory
from gateway.storage.writer import _WRITERS, transact


class Refused(Exception):
    pass


def test_pieces_commit_or_roll_back_alone_whatever_they_share(database_url: str) -> None:
    async def main() -> None:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            await transact(sessions, lambda conn: conn.execute(text("CREATE TABLE t_writer (n INTEGER PRIMARY KEY)")))
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
                        if n == 20:  # a duplicate key: the database refuses it, and only it
                            conn.execute(text("INSERT INTO t_writer (n) VALUES (0)"))
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
                assert landed == {-1} | set(range(40)) - refused - {20}
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
