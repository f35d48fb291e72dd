"""Webhooks: the outbox, Standard Webhooks signatures, and the sender over real HTTP on real databases."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Connection, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import webhooks
from gateway.api import webhooks as webhooks_api
from gateway.auth import ApiKeyAuthenticator, create_tenant_with_key
from gateway.errors import install_error_handlers
from gateway.outbound import NetworkPolicy
from gateway.storage import repo
from gateway.storage.db import open_database, session_factory, upgrade
from gateway.storage.models import Prediction, Tenant, WebhookDelivery, utcnow
from gateway.storage.writer import transact
from gateway.webhooks import MAX_ATTEMPTS, RETRY_SCHEDULE, WebhookSender, claim_deliveries, enqueue, tenant_secret
from tests.fakes.server import ServerThread, free_port

LOOPBACK = ["127.0.0.1/32"]
Sessions = async_sessionmaker[AsyncSession]


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes
    verified: bool


class Receiver:
    """A webhook endpoint on a loopback port: records and verifies every delivery, answers from a script.

    ``answers`` are the statuses of the next requests (then 200); a 3xx redirects to ``redirect_to``. With
    ``secret`` set, a delivery whose signature does not verify is answered 401.
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.answers: list[int] = []
        self.secret: str | None = None
        self.redirect_to = ""
        self.delay_s = 0.0
        self.server = ServerThread(Starlette(routes=[Route("/hook", self.hook, methods=["POST"])]))

    @property
    def url(self) -> str:
        return f"{self.server.url}/hook"

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        verified = False
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        self.calls.append(Call(headers, body, verified))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.secret is not None and not verified:
            return Response(status_code=401)
        status = self.answers.pop(0) if self.answers else 200
        return Response(status_code=status, headers={"location": self.redirect_to} if 300 <= status < 400 else {})

    def ids(self) -> list[str]:
        return [c.headers["webhook-id"] for c in self.calls]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    with r.server:
        yield r


@pytest.fixture
def second_receiver() -> Iterator[Receiver]:
    r = Receiver()
    with r.server:
        yield r


async def seed(sessions: Sessions, *, webhook: str | None, events: list[str] | None = None) -> Prediction:
    """A tenant with a key and one prediction of it."""
    async with sessions.begin() as session:
        tenant = await repo.create_tenant(session, name=f"acme-{secrets.token_hex(3)}")
        key = await repo.add_key(session, tenant_id=tenant.id, key_hash=secrets.token_hex(32), display_prefix="hdg_t")
        prediction = Prediction(
            tenant_id=tenant.id,
            api_key_id=key.id,
            model="hidream-i1-fast",
            status="starting",
            prompt="a red fox",
            params={},
            width=64,
            height=64,
            n=1,
            seed=7,
            webhook=webhook,
            webhook_events=events,
        )
        session.add(prediction)
    return prediction


async def emit(sessions: Sessions, prediction: Prediction, event: str, **payload: Any) -> None:
    body = {"id": prediction.id, **payload}
    await transact(sessions, lambda conn: enqueue(conn, prediction=prediction, event=event, payload=body))


async def secret_of(sessions: Sessions, prediction: Prediction) -> str:
    async with sessions.begin() as session:
        return await tenant_secret(session, tenant_id=prediction.tenant_id)


async def deliveries(sessions: Sessions) -> list[WebhookDelivery]:
    async with sessions() as session:
        stmt = select(WebhookDelivery).order_by(WebhookDelivery.created_at, WebhookDelivery.event)
        return list((await session.scalars(stmt)).all())


async def make_due(sessions: Sessions) -> None:
    """Move every pending delivery's next attempt into the past: the test's stand-in for waiting."""
    async with sessions.begin() as session:
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.status == "pending")
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


@asynccontextmanager
async def sending(url: str, *, policy: NetworkPolicy | None = None, **kwargs: Any) -> AsyncIterator[WebhookSender]:
    """A sender on its own engine and HTTP client, as one replica has."""
    async with open_database(url) as engine, httpx.AsyncClient() as client:
        yield WebhookSender(
            sessions=session_factory(engine),
            client=client,
            policy=policy or NetworkPolicy(LOOPBACK),
            owner=f"test-{secrets.token_hex(3)}",
            **kwargs,
        )


# -- signatures and the schedule ----------------------------------------------------------------------------------


def test_signature_matches_the_standard_webhooks_vector_and_library() -> None:
    # The Standard Webhooks specification's own example.
    secret, msg_id, ts, body = (
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert webhooks.sign(secret, msg_id, ts, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

    fresh = webhooks.new_secret()
    assert fresh.startswith("whsec_") and len(fresh) <= 64 and fresh != webhooks.new_secret()
    now = int(time.time())
    signed = webhooks.headers(fresh, "msg_1", now, b'{"a":1}')
    assert signed["content-type"] == "application/json"
    assert signed["user-agent"] == "hidream-gateway-webhooks/1"
    assert Webhook(fresh).verify(b'{"a":1}', signed) == {"a": 1}
    with pytest.raises(WebhookVerificationError):
        Webhook(fresh).verify(b'{"a":2}', signed)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(b'{"a":1}', signed)


def test_retry_schedule_doubles_caps_and_covers_an_hour() -> None:
    assert RETRY_SCHEDULE[0] == 5 and max(RETRY_SCHEDULE) == 900
    assert all(b == min(2 * a, 900) for a, b in itertools.pairwise(RETRY_SCHEDULE))
    assert sum(RETRY_SCHEDULE) >= 3600
    assert webhooks.next_wait(1) == 5 and webhooks.next_wait(MAX_ATTEMPTS - 1) == 900
    assert webhooks.next_wait(MAX_ATTEMPTS) is None


def test_default_filter_is_output_and_completed() -> None:
    assert [e for e in webhooks.EVENTS if webhooks.wants(None, e)] == ["output", "completed"]
    assert webhooks.wants(["start"], "start") and not webhooks.wants(["start"], "completed")
    assert not webhooks.wants([], "completed")


# -- the outbox ---------------------------------------------------------------------------------------------------


def test_enqueue_honours_the_filter_and_the_transaction(database_url: str) -> None:
    async def scenario() -> None:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            default = await seed(sessions, webhook="https://hooks.example.com/a")
            chosen = await seed(sessions, webhook="https://hooks.example.com/b", events=["start", "logs"])
            silent = await seed(sessions, webhook=None, events=list(webhooks.EVENTS))
            for p in (default, chosen, silent):
                for event in webhooks.EVENTS:
                    await emit(sessions, p, event, status=event)

            with pytest.raises(RuntimeError):  # the caller's transaction rolls back: its event goes with it

                def enqueue_then_fail(conn: Connection) -> None:
                    enqueue(conn, prediction=default, event="completed", payload={"id": "rolled back"})
                    raise RuntimeError

                await transact(sessions, enqueue_then_fail)

            rows = await deliveries(sessions)
            assert sorted((r.prediction_id, r.event) for r in rows) == sorted(
                [(default.id, "output"), (default.id, "completed"), (chosen.id, "start"), (chosen.id, "logs")]
            )
            assert {r.url for r in rows if r.prediction_id == chosen.id} == {"https://hooks.example.com/b"}
            assert all(r.status == "pending" and r.attempts == 0 and r.id.startswith("msg_") for r in rows)
            assert all(r.tenant_id == default.tenant_id for r in rows if r.prediction_id == default.id)
            assert '"rolled back"' not in "".join(r.payload for r in rows)

    asyncio.run(scenario())


def test_output_and_logs_are_throttled_but_completed_never(database_url: str) -> None:
    async def scenario() -> None:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            p = await seed(sessions, webhook="https://hooks.example.com/a", events=list(webhooks.EVENTS))
            await emit(sessions, p, "output", output=["1"])
            await emit(sessions, p, "output", output=["1", "2"])  # within 500 ms: the unsent one takes this body
            await emit(sessions, p, "logs", logs="a")
            await emit(sessions, p, "logs", logs="ab")
            await emit(sessions, p, "completed", status="succeeded")
            await emit(sessions, p, "completed", status="succeeded")
            rows = await deliveries(sessions)
            assert Counter(r.event for r in rows) == {"output": 1, "logs": 1, "completed": 2}
            (output,) = [r for r in rows if r.event == "output"]
            assert output.payload == f'{{"id":"{p.id}","output":["1","2"]}}'  # compact JSON, the latest state

            async with sessions.begin() as session:  # a sender takes it: it is no longer rewritten
                await claim_deliveries(session, lease_seconds=30, limit=10)
            await emit(sessions, p, "output", output=["1", "2", "3"])
            rows = await deliveries(sessions)
            assert [r.payload for r in rows if r.event == "output"] == [output.payload]

            async with sessions.begin() as session:  # 500 ms later, a new output goes out again
                await session.execute(update(WebhookDelivery).values(created_at=utcnow() - timedelta(seconds=1)))
            await emit(sessions, p, "output", output=["1", "2", "3", "4"])
            assert Counter(r.event for r in await deliveries(sessions))["output"] == 2

    asyncio.run(scenario())


def test_tenant_secret_is_made_once_even_when_replicas_race(database_url: str) -> None:
    async def scenario() -> None:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            p = await seed(sessions, webhook=None)
            found = await asyncio.gather(*(secret_of(sessions, p) for _ in range(6)))
            assert len(set(found)) == 1 and found[0].startswith("whsec_")
            assert await secret_of(sessions, p) == found[0]
            other = await seed(sessions, webhook=None)
            assert await secret_of(sessions, other) != found[0]

    asyncio.run(scenario())


# -- the sender ---------------------------------------------------------------------------------------------------


def test_deliveries_are_signed_and_verified_by_the_receiver(database_url: str, receiver: Receiver) -> None:
    async def scenario() -> None:
        async with sending(database_url) as sender:
            p = await seed(sender.sessions, webhook=receiver.url, events=["start", "completed"])
            receiver.secret = await secret_of(sender.sessions, p)  # what GET /v1/webhooks/default/secret returns
            await emit(sender.sessions, p, "start", status="starting")
            await emit(sender.sessions, p, "completed", status="succeeded")
            assert await sender.run_once() == 2
            assert await sender.run_once() == 0  # nothing is sent twice
            rows = await deliveries(sender.sessions)

        assert sorted(receiver.ids()) == sorted(r.id for r in rows)
        assert all(c.verified for c in receiver.calls)
        assert all(r.status == "delivered" and r.attempts == 1 and r.last_status == 200 for r in rows)
        assert all(r.delivered_at is not None and r.last_error is None for r in rows)
        by_id = {c.headers["webhook-id"]: c for c in receiver.calls}
        for row in rows:
            call = by_id[row.id]
            assert call.body == row.payload.encode()
            assert call.headers["user-agent"] == "hidream-gateway-webhooks/1"
            assert abs(int(call.headers["webhook-timestamp"]) - time.time()) < 60
            with pytest.raises(WebhookVerificationError):  # a tampered body does not verify
                Webhook(receiver.secret or "").verify(call.body.replace(b'"status":"', b'"status":"not '), call.headers)

    asyncio.run(scenario())


def test_failures_are_retried_on_schedule_with_the_same_webhook_id(database_url: str, receiver: Receiver) -> None:
    receiver.answers = [500, 503]

    async def attempt(sender: WebhookSender) -> tuple[WebhookDelivery, float, float]:
        before = utcnow()
        assert await sender.run_once() == 1
        after = utcnow()
        (row,) = await deliveries(sender.sessions)
        return row, (row.next_attempt_at - after).total_seconds(), (row.next_attempt_at - before).total_seconds()

    async def scenario() -> None:
        async with sending(database_url) as sender:
            p = await seed(sender.sessions, webhook=receiver.url)
            receiver.secret = await secret_of(sender.sessions, p)
            await emit(sender.sessions, p, "completed", status="succeeded")

            row, low, high = await attempt(sender)
            assert (row.status, row.attempts, row.last_status, row.last_error) == ("pending", 1, 500, "answered 500")
            assert low <= RETRY_SCHEDULE[0] <= high and row.lease_expires_at is None
            assert await sender.run_once() == 0  # not due for another 5 s

            await make_due(sender.sessions)
            row, low, high = await attempt(sender)
            assert (row.status, row.attempts, row.last_status) == ("pending", 2, 503)
            assert low <= RETRY_SCHEDULE[1] <= high

            await make_due(sender.sessions)
            row, _, _ = await attempt(sender)
            assert (row.status, row.attempts, row.last_status, row.last_error) == ("delivered", 3, 200, None)

        assert receiver.ids() == [row.id] * 3  # the receiver can dedupe on it
        assert all(c.verified for c in receiver.calls)  # each attempt signed afresh, each one valid

    asyncio.run(scenario())


def test_redirects_are_not_followed(sqlite_url: str, receiver: Receiver, second_receiver: Receiver) -> None:
    receiver.answers = [302, 307]
    receiver.redirect_to = second_receiver.url

    async def scenario() -> None:
        async with sending(sqlite_url) as sender:
            p = await seed(sender.sessions, webhook=receiver.url)
            await emit(sender.sessions, p, "completed")
            for status in (302, 307):
                await make_due(sender.sessions)
                assert await sender.run_once() == 1
                (row,) = await deliveries(sender.sessions)
                assert (row.status, row.last_status) == ("pending", status)
                assert row.last_error == f"answered {status}; redirects are not followed"

        assert len(receiver.calls) == 2 and second_receiver.calls == []

    asyncio.run(scenario())


def test_addresses_outside_the_policy_are_never_contacted(sqlite_url: str, receiver: Receiver) -> None:
    async def scenario() -> None:
        async with sending(sqlite_url, policy=NetworkPolicy()) as sender:  # loopback is not public
            p = await seed(sender.sessions, webhook=receiver.url)
            await emit(sender.sessions, p, "completed")
            assert await sender.run_once() == 1
            (row,) = await deliveries(sender.sessions)
            assert (row.status, row.attempts, row.last_status) == ("pending", 1, None)
            assert row.last_error is not None and "127.0.0.1" in row.last_error
            assert row.last_error.startswith("address refused:") and "not a public address" in row.last_error
            for _ in range(MAX_ATTEMPTS - 1):
                await make_due(sender.sessions)
                await sender.run_once()
            (row,) = await deliveries(sender.sessions)
            assert (row.status, row.attempts) == ("failed", MAX_ATTEMPTS)

        assert receiver.calls == []

    asyncio.run(scenario())


def test_timeouts_and_refused_connections_are_retried(sqlite_url: str, receiver: Receiver) -> None:
    receiver.delay_s = 1.0

    async def scenario() -> None:
        async with sending(sqlite_url, timeout=0.3) as sender:
            slow = await seed(sender.sessions, webhook=receiver.url)
            closed = await seed(sender.sessions, webhook=f"http://127.0.0.1:{free_port()}/hook")
            await emit(sender.sessions, slow, "completed")
            await emit(sender.sessions, closed, "completed")
            assert await sender.run_once() == 2
            rows = {r.prediction_id: r for r in await deliveries(sender.sessions)}

        assert (rows[slow.id].status, rows[slow.id].attempts) == ("pending", 1)
        assert rows[slow.id].last_error == "no answer within 0.3 s"
        assert (rows[closed.id].status, rows[closed.id].attempts) == ("pending", 1)
        assert (rows[closed.id].last_error or "").startswith("ConnectError")

    asyncio.run(scenario())


def test_exhausting_the_schedule_ends_in_failed_and_410_stops_at_once(sqlite_url: str, receiver: Receiver) -> None:
    receiver.answers = [500] * MAX_ATTEMPTS + [410]

    async def scenario() -> None:
        async with sending(sqlite_url) as sender:
            p = await seed(sender.sessions, webhook=receiver.url)
            await emit(sender.sessions, p, "completed")
            for _ in range(MAX_ATTEMPTS):
                await make_due(sender.sessions)
                assert await sender.run_once() == 1
            await make_due(sender.sessions)
            assert await sender.run_once() == 0  # failed for good: never claimed again
            (row,) = await deliveries(sender.sessions)
            assert (row.status, row.attempts, row.last_status, row.delivered_at) == ("failed", MAX_ATTEMPTS, 500, None)

            gone = await seed(sender.sessions, webhook=receiver.url)
            await emit(sender.sessions, gone, "completed")
            assert await sender.run_once() == 1
            (row,) = [r for r in await deliveries(sender.sessions) if r.prediction_id == gone.id]
            assert (row.status, row.attempts, row.last_status) == ("failed", 1, 410)

        assert len(receiver.calls) == MAX_ATTEMPTS + 1

    asyncio.run(scenario())


def test_pending_and_orphaned_deliveries_survive_a_restart(database_url: str, receiver: Receiver) -> None:
    async def before_crash() -> Prediction:
        async with open_database(database_url) as engine:
            sessions = session_factory(engine)
            p = await seed(sessions, webhook=receiver.url, events=["start", "completed"])
            await emit(sessions, p, "start")
            async with sessions.begin() as session:  # a sender claims it, then its process dies before sending
                assert len(await claim_deliveries(session, lease_seconds=30, limit=10)) == 1
            await emit(sessions, p, "completed")
            return p

    async def after_restart(p: Prediction) -> list[WebhookDelivery]:
        async with sending(database_url) as sender:
            receiver.secret = await secret_of(sender.sessions, p)
            assert await sender.run_once() == 1  # the pending one; the orphan's lease still holds
            assert await sender.run_once() == 0
            async with sender.sessions.begin() as session:  # 30 s later, the dead sender's lease has run out
                await session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.lease_expires_at.is_not(None))
                    .values(lease_expires_at=utcnow() - timedelta(seconds=1))
                )
            assert await sender.run_once() == 1  # taken over
            return await deliveries(sender.sessions)

    p = asyncio.run(before_crash())
    rows = asyncio.run(after_restart(p))  # a new engine, a new sender, a new event loop
    assert all(r.status == "delivered" for r in rows) and len(rows) == 2
    assert sorted(receiver.ids()) == sorted(r.id for r in rows)
    assert all(c.verified for c in receiver.calls)


def test_two_senders_on_postgresql_deliver_each_exactly_once(postgres_url: str, receiver: Receiver) -> None:
    receiver.delay_s = 0.02  # long enough for the senders' claims to interleave

    async def drain(sender: WebhookSender) -> int:
        total = 0
        while attempted := await sender.run_once():
            total += attempted
        return total

    async def scenario() -> list[int]:
        async with sending(postgres_url, batch=10) as one, sending(postgres_url, batch=10) as two:
            p = await seed(one.sessions, webhook=receiver.url, events=["start"])
            receiver.secret = await secret_of(one.sessions, p)
            for _ in range(50):
                await emit(one.sessions, p, "start")

            # SKIP LOCKED: a claim in flight (uncommitted) neither blocks another claim nor shares rows with it.
            async with one.sessions() as first, two.sessions() as second:
                held = await claim_deliveries(first, lease_seconds=30, limit=5)
                rest = await asyncio.wait_for(claim_deliveries(second, lease_seconds=30, limit=50), timeout=10)
                assert len(held) == 5 and len(rest) == 45 and not {d.id for d in held} & {d.id for d in rest}
                await first.rollback()
                await second.rollback()

            counts = await asyncio.gather(drain(one), drain(two))
            assert all(r.status == "delivered" for r in await deliveries(one.sessions))
            return list(counts)

    counts = asyncio.run(scenario())
    assert sum(counts) == 50 and min(counts) > 0  # both did work
    seen = Counter(receiver.ids())
    assert len(seen) == 50 and set(seen.values()) == {1}
    assert all(c.verified for c in receiver.calls)


def test_run_forever_survives_errors_and_wakes_on_notify(
    sqlite_url: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # The gateway's own records at every level, everyone else's (httpx's request lines) from INFO: a driver's DEBUG
    # trace prints SQL parameters, secrets included, and is never on in a deployment.
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="hidream_gateway")

    async def wait_for(condition: Any, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        # No tables yet: every pass fails, and the loop carries on.
        async with open_database(sqlite_url, migrate=False) as engine, httpx.AsyncClient() as client:
            sessions = session_factory(engine)
            sender = WebhookSender(sessions=sessions, client=client, policy=NetworkPolicy(LOOPBACK), owner="solo")
            loop = asyncio.create_task(sender.run_forever(idle_seconds=0.05))
            await wait_for(lambda: sum("a pass failed" in r.getMessage() for r in caplog.records) >= 2)
            assert not loop.done()

            await upgrade(engine)
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            wake = asyncio.Event()
            loop = asyncio.create_task(sender.run_forever(wake, idle_seconds=60))
            await asyncio.sleep(0.1)  # it has found nothing and is waiting out its 60 s
            p = await seed(sessions, webhook=receiver.url)
            receiver.secret = await secret_of(sessions, p)
            await emit(sessions, p, "completed", status="succeeded")
            started = time.monotonic()
            sender.notify()
            await wait_for(lambda: len(receiver.calls) == 1)
            assert time.monotonic() - started < 5

            await emit(sessions, p, "output")  # the caller's own event wakes it too
            wake.set()
            await wait_for(lambda: len(receiver.calls) == 2)
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)

        assert all(c.verified for c in receiver.calls)
        signatures = [c.headers["webhook-signature"].split(",", 1)[1] for c in receiver.calls]
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert receiver.secret and receiver.secret.removeprefix("whsec_") not in logged
        assert not any(s in logged for s in signatures)
        assert "delivered" in logged  # the outcome is logged, without the secret or the signature

    asyncio.run(scenario())


def test_default_secret_endpoint(sqlite_url: str) -> None:
    async def make_tenants() -> list[str]:
        async with open_database(sqlite_url) as engine, session_factory(engine).begin() as session:
            keys = []
            for name in ("acme", "globex"):
                _, _, plaintext = await create_tenant_with_key(session, name=name)
                keys.append(plaintext)
            return keys

    keys = asyncio.run(make_tenants())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_database(sqlite_url) as engine:
            app.state.hdg = SimpleNamespace(sessions=session_factory(engine), authenticator=ApiKeyAuthenticator())
            yield

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(webhooks_api.router)
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as http:

        def secret(key: str) -> str:
            resp = http.get("/v1/webhooks/default/secret", headers={"Authorization": f"Bearer {key}"})
            assert resp.status_code == 200, resp.text
            value: str = resp.json()["key"]
            return value

        first = secret(keys[0])
        assert first.startswith("whsec_") and secret(keys[0]) == first  # made once, then kept
        assert secret(keys[1]) != first
        Webhook(first)  # a secret the Standard Webhooks library accepts
        assert http.get("/v1/webhooks/default/secret").status_code == 401

    async def stored() -> set[str | None]:
        async with open_database(sqlite_url) as engine, session_factory(engine)() as session:
            return set((await session.scalars(select(Tenant.webhook_secret))).all())

    assert first in asyncio.run(stored())
