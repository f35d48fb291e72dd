"""The least a Python proxy can do per request *with the gateway's durable work*, for
bench/gateway_overhead.py --durable-floor: bench/floor_proxy.py plus, written straight to sqlite3 with no framework,
ORM or httpx in between, what the gateway commits for one image on its own SQLite schema.

Per request, on one uvicorn process:
- the body is parsed as JSON and the key looked up in memory (a SHA-256 of the bearer token);
- the record: one transaction (the tenant's and the key's month reserved under the budget guard, an in-flight slot
  on each, the job's row with its JSON fields), committed before the upstream call;
- the worker call with aiohttp, its JSON read and the image's base64 decoded;
- the image saved by the gateway's own ``LocalFileStore`` (a new file, fsynced, renamed into place);
- the settle: one transaction (the job's row ended under its guard, the file's row, both months charged and the hold
  given back, the slots given back, the usage event), committed before the answer;
- a JSON answer with an HMAC-signed URL.

Transactions go to the gateway's own group writer (one thread that commits what is queued together), on a bare
sqlite3 connection, each piece in a savepoint, as the gateway's SQLite writer does. What is left out is what makes
the gateway a product rather than a floor: validation and error answers, routing, health and breakers, metrics,
idempotency, webhooks, failover, leases and recovery. So this prints how far below the gateway's CPU per request a
path built only for speed could go on this machine.

With ``HDG_FLOOR_DATABASE_URL`` (``postgresql+asyncpg://...``) the transactions go to that PostgreSQL database
instead, on the gateway's schema there (migrated if it is not), with its own tenant and key (the tenant is disabled
at shutdown). Each transaction is one round trip: the record and the settle are PL/pgSQL functions the floor
creates (``hdg_floor_record``, ``hdg_floor_settle``), called over a pool of asyncpg connections that go back to it
without a reset, each call its own transaction. They say the SQLite writer's statements and guards, and take the
ledger's advisory locks as the gateway does on PostgreSQL. The job's lease and deadline lie an hour ahead, so a
gateway on the same database leaves the floor's jobs alone, even one that failed half-way. That is the fewest round
trips a request can take on PostgreSQL; the gateway takes eighteen.

With ``HDG_FLOOR_FILES=none`` the image is hashed and written nowhere: not a design, a bound on what the floor would
cost if storing an image cost nothing.

Served as ``uvicorn bench.durable_floor:app`` with ``HDG_FLOOR_UPSTREAM`` (the upstream's base URL),
``HDG_FLOOR_DATA`` (a directory for the database and the files) and ``HDG_FLOOR_KEY`` (the bearer key it takes) set.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from sqlalchemy.engine import make_url

from gateway.storage.db import open_database
from gateway.storage.files import LocalFileStore, SavedFile
from gateway.storage.writer import GroupWriter

UPSTREAM = os.environ.get("HDG_FLOOR_UPSTREAM", "")
DATA = Path(os.environ.get("HDG_FLOOR_DATA", "durable-floor"))
KEY = os.environ.get("HDG_FLOOR_KEY", "hdg_durable_floor")  # the one key it takes
DATABASE_URL = os.environ.get("HDG_FLOOR_DATABASE_URL", "")  # PostgreSQL; unset: SQLite under DATA
# "none": the image is hashed but written nowhere. Not a design (an image the answer names must be stored): a bound,
# what the floor would cost if storing an image cost nothing.
FILES = os.environ.get("HDG_FLOOR_FILES", "store")
PRICE = 0.010486
PRICE_D = Decimal("0.010486")
ATTEMPT_LOG = json.dumps(
    [{"backend": "worker", "outcome": "succeeded", "status": None, "message": None, "detail": None}]
)
SECRET = secrets.token_bytes(32)


@dataclass(frozen=True)
class Owner:
    """One side of a hold (the tenant or its key): its statements, written out once for its tables, with the
    placeholders (SQLite's named parameters, or PL/pgSQL's variables) given."""

    reserve: str  # the month's reservation, under the budget guard
    take: str  # an in-flight slot, under the cap
    give: str  # the slot back
    apply: str  # the charge, and the hold given back
    open: str  # the month's row at zero


def _owner(table: str, column: str, owners: str, *, who: str, month: str, price: str, held: str) -> Owner:
    budget = f"(SELECT monthly_budget_usd FROM {owners} WHERE id = {who})"
    elsewhere = (
        f"(SELECT coalesce(sum(o.reserved_usd), 0) FROM {table} o WHERE o.{column} = {who} AND o.month <> {month})"
    )
    return Owner(
        reserve=f"UPDATE {table} SET reserved_usd = round(reserved_usd + {price}, 6) WHERE {column} = {who} "
        f"AND month = {month} AND ({budget} IS NULL OR "
        f"round(spent_usd + reserved_usd + {price} + {elsewhere}, 6) <= {budget})",
        take=f"UPDATE {owners} SET in_flight = in_flight + 1 WHERE id = {who} AND "
        "(max_in_flight IS NULL OR in_flight < max_in_flight)",
        give=f"UPDATE {owners} SET in_flight = in_flight - 1 WHERE id = {who}",
        apply=f"INSERT INTO {table} ({column}, month, spent_usd, reserved_usd) VALUES ({who}, {month}, {price}, "
        f"-{held}) ON CONFLICT ({column}, month) DO UPDATE SET spent_usd = round({table}.spent_usd + "
        f"excluded.spent_usd, 6), reserved_usd = round({table}.reserved_usd + excluded.reserved_usd, 6)",
        open=f"INSERT INTO {table} ({column}, month, spent_usd, reserved_usd) VALUES ({who}, {month}, 0, 0)",
    )


# The tenant's side, then the key's: the order every transaction here takes their rows in, as the ledger's does.
SIDES = (("tenant_spend", "tenant_id", "tenants"), ("key_spend", "api_key_id", "api_keys"))
_NAMED = {"who": ":who", "month": ":month", "price": ":price", "held": ":held"}
OWNERS = tuple(_owner(*side, **_NAMED) for side in SIDES)

INSERT_JOB = (
    "INSERT INTO predictions ("
    "id, tenant_id, api_key_id, model, status, prompt, params, width, height, n, seed, attempts, created_at, api, job, "
    "route, available_at, deadline_at, lease_owner, lease_expires_at, started_at, cancel_requested, logs, "
    "reserved_usd, reserved_month"
    ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
    "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SETTLE = (
    "UPDATE predictions SET status = 'succeeded', backend = 'worker', latency_ms = ?, completed_at = ?, attempts = 1, "
    "logs = ?, attempt_log = ?, lease_owner = NULL WHERE id = ? AND status IN ('starting', 'processing') AND "
    "lease_owner = ? RETURNING reserved_usd, reserved_month"
)
INSERT_FILE = (
    "INSERT INTO files (id, tenant_id, prediction_id, position, content_type, size_bytes, sha256, path, width, "
    "height, created_at) VALUES (?, ?, ?, 0, 'image/png', ?, ?, ?, 1024, 1024, ?)"
)
INSERT_USAGE = (
    "INSERT INTO usage_events (prediction_id, tenant_id, api_key_id, model, width, height, images, backend, "
    "price_usd, cost_usd, attempts, latency_ms, status, created_at) VALUES (?, ?, ?, 'hidream-i1-fast', 1024, 1024, "
    "1, 'worker', ?, 0.001, 1, ?, 'succeeded', ?)"
)


class Writer(GroupWriter[sqlite3.Connection]):
    """The gateway's group writer (one thread; what is queued goes in the next transaction) on a bare sqlite3
    connection, each piece in a savepoint."""

    what = "floor's writer"

    def __init__(self, path: Path) -> None:
        super().__init__("floor-writer")
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=30000"):
            self.db.execute(f"PRAGMA {pragma}")

    def _commit(self, group: list[Any]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        try:
            self.db.execute("BEGIN IMMEDIATE")
            for item in group:
                self.db.execute("SAVEPOINT piece")
                try:
                    outcomes.append((True, item.work(self.db)))
                    self.db.execute("RELEASE piece")
                except Exception as exc:
                    self.db.execute("ROLLBACK TO piece")
                    self.db.execute("RELEASE piece")
                    outcomes.append((False, exc))
            self.db.execute("COMMIT")
        except Exception as exc:  # BEGIN or COMMIT failed: none of the group is known to have landed
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            return [(False, exc)] * len(group)
        return outcomes


# -- PostgreSQL: each transaction one round trip, a function of the floor's own on the gateway's schema ---------------


def _pg_owner(side: tuple[str, str, str], who: str, space: int) -> tuple[str, str, str, str]:
    """PL/pgSQL for one side of the hold: (reserve, take, apply, give), the SQLite writer's statements and guards,
    with the owner's advisory lock before its reservation, as the gateway's ledger takes it on PostgreSQL."""
    owner = _owner(*side, who=who, month="p_month", price="p_price", held="held")
    reserve = (
        f"PERFORM pg_advisory_xact_lock({space}, hashtext({who}));\n  {owner.reserve};\n"
        "  IF NOT FOUND THEN RAISE EXCEPTION 'budget'; END IF;"
    )
    take = f"{owner.take};\n  IF NOT FOUND THEN RAISE EXCEPTION 'in flight'; END IF;"
    return reserve, take, f"{owner.apply};", f"{owner.give};"


_PG_OWNERS = (_pg_owner(SIDES[0], "p_tenant", 0x68640001), _pg_owner(SIDES[1], "p_key", 0x68640002))
PG_FUNCTIONS = (
    "CREATE OR REPLACE FUNCTION hdg_floor_record(p_tenant text, p_key text, p_job text, p_prompt text, "
    "p_params json, p_spec json, p_price numeric, p_month text, p_now timestamptz, p_lease text) "
    "RETURNS void LANGUAGE plpgsql AS $fn$\nBEGIN\n  "
    + "\n  ".join(o[0] for o in _PG_OWNERS)
    + "\n  "
    + "\n  ".join(o[1] for o in _PG_OWNERS)
    + "\n  INSERT INTO predictions ("
    "id, tenant_id, api_key_id, model, status, prompt, params, width, height, n, seed, attempts, created_at, api, "
    "job, route, available_at, deadline_at, lease_owner, lease_expires_at, started_at, cancel_requested, logs, "
    "reserved_usd, reserved_month) VALUES (p_job, p_tenant, p_key, 'hidream-i1-fast', 'processing', p_prompt, "
    "p_params, 1024, 1024, 1, 7, 0, p_now, 'openai', p_spec, 'cheapest', p_now, p_now + interval '1 hour', p_lease, "
    "p_now + interval '1 hour', p_now, "
    "false, '', p_price, p_month);\nEND\n$fn$",
    "CREATE OR REPLACE FUNCTION hdg_floor_settle(p_tenant text, p_key text, p_job text, p_lease text, "
    "p_file text, p_size integer, p_sha text, p_path text, p_log json, p_price numeric, p_month text, "
    "p_now timestamptz) RETURNS boolean LANGUAGE plpgsql AS $fn$\nDECLARE held numeric;\nBEGIN\n"
    "  UPDATE predictions SET status = 'succeeded', backend = 'worker', latency_ms = 3, completed_at = p_now, "
    "attempts = 1, logs = E'Succeeded on worker.\\n', attempt_log = p_log, lease_owner = NULL WHERE id = p_job "
    "AND status IN ('starting', 'processing') AND lease_owner = p_lease RETURNING reserved_usd INTO held;\n"
    "  IF NOT FOUND THEN RETURN false; END IF;\n  held := coalesce(held, 0);\n"
    "  INSERT INTO files (id, tenant_id, prediction_id, position, content_type, size_bytes, sha256, path, width, "
    "height, created_at) VALUES (p_file, p_tenant, p_job, 0, 'image/png', p_size, p_sha, p_path, 1024, 1024, "
    "p_now);\n  "
    + "\n  ".join(f"{o[2]}\n  {o[3]}" for o in _PG_OWNERS)
    + "\n  INSERT INTO usage_events (prediction_id, tenant_id, api_key_id, model, width, height, images, backend, "
    "price_usd, cost_usd, attempts, latency_ms, status, created_at) VALUES (p_job, p_tenant, p_key, "
    "'hidream-i1-fast', 1024, 1024, 1, 'worker', p_price, 0.001, 1, 3, 'succeeded', p_now);\n"
    "  RETURN true;\nEND\n$fn$",
)


async def _no_reset(conn: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is (see PgStore.open)."""


class PgStore:
    """The record and the settle as one call each, over a pool of asyncpg connections (autocommit: each call is its
    own transaction, and one that raises leaves nothing behind)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.tenant: str | None = None

    @classmethod
    async def open(cls, url: str) -> PgStore:
        async with open_database(url):
            pass  # the gateway's own schema, by its migrations
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        # No reset on release: asyncpg's default says four statements (advisory unlock, CLOSE ALL, UNLISTEN, RESET
        # ALL) every time a connection goes back, a round trip the gateway's pool does not pay. The functions take
        # transaction-scoped locks only and set nothing on the session.
        pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10, reset=_no_reset)
        try:
            async with pool.acquire() as conn:
                for name in ("hdg_floor_record", "hdg_floor_settle"):  # an earlier run's, whatever its parameters
                    await conn.execute(f"DROP FUNCTION IF EXISTS {name}")
                for function in PG_FUNCTIONS:
                    await conn.execute(function)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def record(self, tenant: str, key: str, job_id: str, prompt: str, lease: str) -> None:
        params, job = _job_fields(prompt)
        now = datetime.now(UTC)
        month = now.strftime("%Y-%m")
        async with self.pool.acquire() as conn:
            await conn.execute(
                "SELECT hdg_floor_record($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                *(tenant, key, job_id, prompt, params, job, PRICE_D, month, now, lease),
            )

    async def settle(self, tenant: str, key: str, job_id: str, lease: str, saved: Any) -> bool:
        now = datetime.now(UTC)
        file_id = f"file_{secrets.token_hex(12)}"
        args = (tenant, key, job_id, lease, file_id, saved.size_bytes, saved.sha256, saved.path, ATTEMPT_LOG)
        async with self.pool.acquire() as conn:
            won = await conn.fetchval(
                "SELECT hdg_floor_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                *args,
                PRICE_D,
                now.strftime("%Y-%m"),
                now,
            )
        return bool(won)

    async def seed(self, tenant: str, key: str, digest: str) -> None:
        now = datetime.now(UTC)
        self.tenant = tenant
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO tenants (id, name, status, monthly_budget_usd, in_flight, created_at) "
                "VALUES ($1, $2, 'active', 1000000, 0, $3)",
                *(tenant, f"floor-{tenant}", now),
            )
            await conn.execute(
                "INSERT INTO api_keys (id, tenant_id, key_hash, display_prefix, created_at, in_flight) "
                "VALUES ($1, $2, $3, 'hdg_dura', $4, 0)",
                *(key, tenant, digest, now),
            )
            for side, owner_id in zip(SIDES, (tenant, key), strict=True):
                opened = _owner(*side, who="$1", month="$2", price="", held="").open
                await conn.execute(opened, owner_id, now.strftime("%Y-%m"))

    async def close(self) -> None:
        if self.tenant is not None:  # the database may be shared: the floor's tenant takes no more requests
            async with self.pool.acquire() as conn:
                await conn.execute("UPDATE tenants SET status = 'disabled' WHERE id = $1", self.tenant)
        await self.pool.close()


class SqliteStore:
    """The record and the settle as one piece each for the writer thread, on the floor's own SQLite file."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        async with open_database(f"sqlite+aiosqlite:///{path}"):
            pass  # the gateway's own schema, by its migrations
        return cls(Writer(path))

    async def record(self, tenant: str, key: str, job_id: str, prompt: str, lease: str) -> None:
        await self.writer.run(_record(tenant, key, job_id, prompt, lease))

    async def settle(self, tenant: str, key: str, job_id: str, lease: str, saved: Any) -> bool:
        return bool(await self.writer.run(_settle(tenant, key, job_id, lease, saved)))

    async def seed(self, tenant: str, key: str, digest: str) -> None:
        now, month = _now()
        db = self.writer.db
        db.execute(
            "INSERT INTO tenants (id, name, status, monthly_budget_usd, in_flight, created_at) VALUES (?, ?, "
            "'active', 1000000, 0, ?)",
            (tenant, f"floor-{tenant}", now),
        )
        db.execute(
            "INSERT INTO api_keys (id, tenant_id, key_hash, display_prefix, created_at, in_flight) VALUES (?, ?, ?, "
            "'hdg_dura', ?, 0)",
            (key, tenant, digest, now),
        )
        for owner, owner_id in zip(OWNERS, (tenant, key), strict=True):
            db.execute(owner.open, {"who": owner_id, "month": month})

    async def close(self) -> None:
        await asyncio.to_thread(self.writer.stop)


class State:
    session: aiohttp.ClientSession
    store: SqliteStore | PgStore
    files: LocalFileStore
    keys: dict[str, tuple[str, str]]  # sha256 of a key -> (tenant id, key id)


state = State()


async def _start() -> None:
    await asyncio.to_thread(DATA.mkdir, parents=True, exist_ok=True)
    if DATABASE_URL:
        state.store = await PgStore.open(DATABASE_URL)
    else:
        state.store = await SqliteStore.open(DATA / "floor.sqlite")
    state.files = LocalFileStore(DATA / "files")
    state.session = aiohttp.ClientSession()
    tenant, key = f"ten_{secrets.token_hex(12)}", f"key_{secrets.token_hex(12)}"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    await state.store.seed(tenant, key, digest)
    state.keys = {digest: (tenant, key)}


def _now() -> tuple[str, str]:
    """The time as the gateway stores it on SQLite, and its month."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%d %H:%M:%S.%f"), now.strftime("%Y-%m")


def _job_fields(prompt: str) -> tuple[str, str]:
    """The job's JSON fields as the gateway writes them: its params and its spec."""
    params = json.dumps(
        {"model": "hidream-i1-fast", "n": 1, "size": "1024x1024", "response_format": "url", "seed": 7}
        | {"route": "cheapest", "input": {"prompt": prompt}, "base_url": "http://127.0.0.1/"}
    )
    job = json.dumps(
        {"variant": "fast", "prompt": prompt, "width": 1024, "height": 1024, "seed": 7, "n": 1}
        | {"output_format": "png", "quality": 90}
    )
    return params, job


def _record(tenant: str, key: str, job_id: str, prompt: str, lease: str) -> Any:
    now, month = _now()
    params, job = _job_fields(prompt)

    def work(db: sqlite3.Connection) -> None:
        for owner, owner_id in zip(OWNERS, (tenant, key), strict=True):
            if db.execute(owner.reserve, {"who": owner_id, "month": month, "price": PRICE}).rowcount != 1:
                raise RuntimeError("budget")
        for owner, owner_id in zip(OWNERS, (tenant, key), strict=True):
            if db.execute(owner.take, {"who": owner_id}).rowcount != 1:
                raise RuntimeError("in flight")
        row = (job_id, tenant, key, "hidream-i1-fast", "processing", prompt, params, 1024, 1024, 1, 7, 0, now)
        row += ("openai", job, "cheapest", now, now, lease, now, now, 0, "", PRICE, month)
        db.execute(INSERT_JOB, row)

    return work


def _settle(tenant: str, key: str, job_id: str, lease: str, saved: Any) -> Any:
    now, month = _now()

    def work(db: sqlite3.Connection) -> bool:
        won = db.execute(SETTLE, (3, now, "Succeeded on worker.\n", ATTEMPT_LOG, job_id, lease)).fetchone()
        if won is None:
            return False
        held = won[0] or 0
        file_id = f"file_{secrets.token_hex(12)}"
        db.execute(INSERT_FILE, (file_id, tenant, job_id, saved.size_bytes, saved.sha256, saved.path, now))
        for owner, owner_id in zip(OWNERS, (tenant, key), strict=True):
            db.execute(owner.apply, {"who": owner_id, "month": month, "price": PRICE, "held": held})
            db.execute(owner.give, {"who": owner_id})
        db.execute(INSERT_USAGE, (job_id, tenant, key, PRICE, 3, now))
        return True

    return work


async def _respond(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                await _start()
                await send({"type": "lifespan.startup.complete"})
        await state.session.close()
        await state.store.close()
        await send({"type": "lifespan.shutdown.complete"})
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.loads(b"".join(chunks))
    authorization = dict(scope["headers"]).get(b"authorization", b"").decode()
    caller = state.keys.get(hashlib.sha256(authorization.removeprefix("Bearer ").encode()).hexdigest())
    if caller is None or not isinstance(body.get("prompt"), str):
        await _respond(send, 401 if caller is None else 400, b'{"error": "refused"}')
        return
    tenant, key = caller
    job_id, lease = f"gen_{secrets.token_hex(12)}", "floor"
    await state.store.record(tenant, key, job_id, body["prompt"], lease)
    call = {"variant": "fast", "prompt": body["prompt"], "width": 1024, "height": 1024, "seed": 7, "n": 1}
    async with state.session.post(f"{UPSTREAM}/generate", json=call) as upstream:
        answer = await upstream.json()
    image = base64.b64decode(answer["images"][0], validate=True)
    if not image.startswith(b"\x89PNG\r\n\x1a\n"):
        await _respond(send, 502, b'{"error": "not a png"}')
        return
    if FILES == "none":
        saved = SavedFile(f"{tenant}/{job_id}.png", len(image), hashlib.sha256(image).hexdigest())
    else:
        saved = await state.files.save(tenant_id=tenant, file_id=job_id, content_type="image/png", data=image)
    if not await state.store.settle(tenant, key, job_id, lease, saved):
        await _respond(send, 409, b'{"error": "not ours"}')
        return
    expires = 3600
    signature = hmac.digest(SECRET, f"{job_id}:{expires}".encode(), "sha256").hex()
    url = f"http://127.0.0.1/v1/files/{job_id}?expires={expires}&signature={signature}"
    await _respond(send, 200, json.dumps({"created": 0, "id": job_id, "data": [{"url": url}]}).encode())
