"""The job engine alone (no HTTP): how fast it commits jobs, starts them, holds them in flight and ends them.

Run: .venv/bin/python bench/job_engine.py [--jobs 10000] [--claim-jobs 1000] [--database-url URL] [--provider held]
(about 3 minutes on 2 cores at the defaults, on SQLite).

One process builds what the gateway's lifespan builds (a migrated database, HealthBoard, JobRunner, Engine) with
one slow provider, and then, each phase for a tenant of its own:

1. direct: submits ``--jobs`` jobs through ``Engine.submit`` from ``--clients`` concurrent callers, with room
   for all of them, so each starts at once (submitted to the provider, its job id committed, then waited on).
   Prints committed submits/s, how long until every job was in flight, RSS before and with all of them waiting
   (and per job), then lets the provider finish every job at once and prints jobs ended per second (image
   stored, prediction and usage event written) and the outcome: how many succeeded, failed (and why), or are
   still running.
2. claimed: submits ``--claim-jobs`` jobs through an engine with no room (so each is only committed, as when
   every runner is busy), then starts an engine that has room and prints how fast its claim loop claims and
   starts them, then the same release and outcome.

``--provider held`` (the default) is an in-process ProviderBackend whose ``collect`` waits on an event, so the
figures are the engine's and the database's own. ``--provider fal`` is the real FalBackend against the fake fal
(tests/fakes/fal.py) in this process: the real code path, but the fake's HTTP work shares this process's CPU with
the engine and dominates (about a quarter of the submit rate at 1,000 jobs), so use it with fewer jobs
(e.g. --jobs 1000 --claim-jobs 0). SQLite by default (a file in a temporary directory);
``--database-url postgresql+asyncpg://...`` to use an existing, empty PostgreSQL database (it is migrated; the
jobs are left in it). Counting is done through a connection pool of its own, so watching does not take the
engine's connections.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from gateway.auth import Principal, create_tenant_with_key
from gateway.backends.base import ImageJob, ImageResult, ProviderBackend
from gateway.backends.fal import FalBackend
from gateway.engine import Engine, JobSpec
from gateway.health import HealthBoard
from gateway.jobs import JobRunner
from gateway.routing import Route
from gateway.settings import DEFAULT_PRICES, default_backend_costs
from gateway.storage.db import create_engine, session_factory, upgrade
from gateway.storage.files import LocalFileStore, UrlSigner
from gateway.storage.models import Prediction, UsageEvent
from tests.fakes.fal import FakeFal


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 80, 40)).save(buf, format="PNG")
    return buf.getvalue()


LEASE_S = 10.0  # short, so a job whose task ended without settling it is taken over within the run


class HeldProvider:
    """A provider whose jobs all finish when ``release`` is set: submit returns at once, collect waits.

    Results claim the job's size (so pricing is as for a real 1024x1024 image) but carry an 8x8 PNG, so the
    figures are not about image bytes.
    """

    name = "held"
    kind = "fal"  # priced from fal's book
    variants = frozenset({"fast"})

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.submitted = 0
        self._image = _tiny_png()

    async def submit(self, job: ImageJob, *, timeout: float) -> dict[str, Any]:
        self.submitted += 1
        return {"request_id": f"held-{self.submitted}"}

    async def collect(self, job: ImageJob, ref: dict[str, Any], *, timeout: float) -> ImageResult:
        await self.release.wait()
        return ImageResult([self._image], "image/png", job.width, job.height, job.seed)

    async def cancel(self, ref: dict[str, Any]) -> None:
        return None

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        return await self.collect(job, await self.submit(job, timeout=timeout), timeout=timeout)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    current = int(fields["VmRSS"].split()[0]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return current, peak


class Observer:
    """Counts one tenant's jobs through a connection pool of its own, so watching never takes the engine's."""

    def __init__(self, db: AsyncEngine, principal: Principal) -> None:
        self.db = db
        self.tenant_id = principal.tenant.id
        self.ids: list[str] = []  # as submitted

    async def count(self, *where: Any) -> int:
        async with self.db.connect() as conn:
            stmt = select(func.count()).select_from(Prediction).where(Prediction.tenant_id == self.tenant_id, *where)
            return int(await conn.scalar(stmt) or 0)

    async def in_flight(self) -> int:
        """Jobs running with their provider job id committed (what a restarted gateway would re-attach to)."""
        return await self.count(Prediction.status == "processing", Prediction.provider_ref.is_not(None))

    async def ended(self) -> int:
        return await self.count(Prediction.status.in_(("succeeded", "failed", "canceled")))

    async def tally(self) -> str:
        """Jobs by status, usage events, and the commonest errors."""
        where = Prediction.tenant_id == self.tenant_id
        async with self.db.connect() as conn:
            by_status = (
                await conn.execute(select(Prediction.status, func.count()).where(where).group_by(Prediction.status))
            ).all()
            usage = await conn.scalar(
                select(func.count()).select_from(UsageEvent).where(UsageEvent.tenant_id == self.tenant_id)
            )
            errors = (
                await conn.execute(
                    select(Prediction.error, func.count())
                    .where(where, Prediction.error.is_not(None))
                    .group_by(Prediction.error)
                )
            ).all()
        text = ", ".join(f"{n} {status}" for status, n in sorted(by_status)) + f"; {usage} usage events"
        return text + "".join(f"\n    {n} x {error}" for error, n in sorted(errors, key=lambda e: -e[1])[:3])


async def until(what: str, done: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Seconds until ``done()`` holds (polled every 0.1 s)."""
    start = time.perf_counter()
    while not await done():
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)
    return time.perf_counter() - start


async def all_in_flight(observer: Observer, n: int, timeout: float) -> float:
    async def done() -> bool:
        return await observer.in_flight() >= n

    return await until("every job to be in flight", done, timeout)


async def all_ended(engine: Engine, observer: Observer, timeout: float) -> tuple[float, int]:
    """(seconds to the last job's end, jobs ended) once every job has ended, or none has for a while.

    A job whose task ended without settling it is taken over once its lease lapses, so the wait only gives up
    after a lease and a claim poll with no task running and no job ending: what is left then is stuck.
    """
    start = time.perf_counter()
    last_end, ended = start, 0
    idle_since: float | None = None
    while (now := time.perf_counter()) - start < timeout:
        count = await observer.ended()
        if count > ended:
            last_end, ended = now, count
        if ended >= len(observer.ids):
            break
        running = any(map(engine.running_here, observer.ids))
        idle_since = None if running else (idle_since or now)
        if idle_since is not None and now - idle_since > LEASE_S + engine.poll_seconds + 2:
            break
        await asyncio.sleep(0.1)
    return last_end - start, ended


async def submit_all(
    engine: Engine, principal: Principal, spec: Callable[[int], JobSpec], n: int, clients: int, ids: list[str]
) -> float:
    """Submit ``n`` jobs from ``clients`` concurrent callers, adding their ids to ``ids``; seconds taken."""
    next_index = iter(range(n))

    async def caller() -> None:
        for i in next_index:
            submitted = await engine.submit(principal=principal, spec=spec(i))
            ids.append(submitted.prediction.id)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    return time.perf_counter() - start


def build_engine(
    sessions: async_sessionmaker[AsyncSession], backend: ProviderBackend, root: Path, concurrency: int
) -> Engine:
    """The JobRunner and Engine as gateway/app.py builds them, with room for ``concurrency`` jobs."""
    health = HealthBoard()
    health.register(backend.name, max_in_flight=1_000_000)
    runner = JobRunner(
        sessions=sessions,
        backends=[backend],
        files=LocalFileStore(root / "files"),
        prices=DEFAULT_PRICES,
        costs=default_backend_costs(),
        gpu_usd_per_second=Decimal("0.001097"),
        health=health,
        attempt_timeout=3600,
    )
    signer = UrlSigner(b"bench-signing-key", ttl_seconds=3600)
    return Engine(
        sessions=sessions, runner=runner, signer=signer, timeout=3600, lease_seconds=LEASE_S, concurrency=concurrency
    )


def build_backend(
    args: argparse.Namespace, client: httpx.AsyncClient
) -> tuple[ProviderBackend, Callable[[], None], FakeFal | None]:
    """The slow provider, a function that lets every job it holds finish now, and the fake fal if one runs."""
    if args.provider == "held":
        held = HeldProvider()
        return held, held.release.set, None
    fal = FakeFal().start()
    fal.faults.processing_s = 3600  # until released

    def release() -> None:
        for job in list(fal._jobs.values()):
            job.processing_s = 0.0  # done: the next status poll says COMPLETED

    backend = FalBackend(
        client,
        key=fal.key,
        apps={"fast": "fal-ai/hidream-i1-fast"},
        base_url=fal.url,
        poll_seconds=args.fal_poll_seconds,
        output_hosts=[fal.url],
    )
    return backend, release, fal


async def new_principal(sessions: async_sessionmaker[AsyncSession], name: str) -> Principal:
    async with sessions.begin() as session:
        tenant, key, _ = await create_tenant_with_key(session, name=f"bench-{name}-{time.time_ns()}")
    return Principal(tenant=tenant, key=key)


async def run(args: argparse.Namespace, root: Path) -> None:
    url = args.database_url or f"sqlite+aiosqlite:///{root / 'bench.db'}"
    db = create_engine(url)
    await upgrade(db)
    sessions = session_factory(db)
    watching = create_engine(url)
    client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0), limits=httpx.Limits(max_connections=256))
    backend, release, fal = build_backend(args, client)
    side = 1024 if fal is None else 64  # the fake draws every image it serves; keep that cheap

    def spec(i: int) -> JobSpec:
        job = ImageJob(variant="fast", prompt=f"bench job {i}", width=side, height=side, seed=i)
        route = Route.parse("cheapest")
        return JobSpec(model="hidream-i1-fast", job=job, params={}, route=route, api="replicate", base_url="http://b")

    print(f"machine: {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"database: {db.dialect.name}; provider: {args.provider}; concurrent submitters: {args.clients}")

    # 1. direct: room for every job, so each starts in the call that commits it.
    n = args.jobs
    principal = first = await new_principal(sessions, "direct")
    observer = Observer(watching, principal)
    engine = build_engine(sessions, backend, root, concurrency=n)
    await engine.start()
    before, _ = rss_mib()
    took = await submit_all(engine, principal, spec, n, args.clients, observer.ids)
    print(f"\ndirect: {n} jobs")
    print(f"  submit (committed):       {n / took:7.0f} jobs/s  ({took:.1f} s)")
    started = took + await all_in_flight(observer, n, args.timeout)
    print(f"  all in flight after:      {started:7.1f} s     ({n / started:.0f} jobs/s to the provider, id committed)")
    waiting, peak = rss_mib()
    print(f"  RSS before / all waiting: {before:7.0f} / {waiting:.0f} MiB (peak {peak:.0f} MiB)")
    print(f"  RSS per in-flight job:    {(waiting - before) * 1024 / n:7.1f} KiB")
    release()
    finished, ended = await all_ended(engine, observer, args.timeout)
    print(f"  ended after release:      {ended / finished:7.0f} jobs/s  ({ended} in {finished:.1f} s)")
    print(f"  outcome: {await observer.tally()}")
    await engine.stop()

    # 2. claimed: committed while no runner had room, then claimed by one that has.
    if m := args.claim_jobs:
        if isinstance(backend, HeldProvider):
            backend.release.clear()
        principal = await new_principal(sessions, "claimed")
        observer = Observer(watching, principal)
        queued = build_engine(sessions, backend, root, concurrency=0)  # never starts a job itself
        took = await submit_all(queued, principal, spec, m, args.clients, observer.ids)
        print(f"\nclaimed: {m} jobs")
        print(f"  submit (committed only):  {m / took:7.0f} jobs/s  ({took:.1f} s)")
        # Room for these and for any job of the first phase still waiting to be taken over.
        leftover = await Observer(watching, first).count(Prediction.status.in_(("starting", "processing")))
        engine = build_engine(sessions, backend, root, concurrency=m + leftover)
        await engine.start()
        claimed = await all_in_flight(observer, m, args.timeout)
        print(f"  claimed + started:        {m / claimed:7.0f} jobs/s  ({claimed:.1f} s)")
        release()
        finished, ended = await all_ended(engine, observer, args.timeout)
        print(f"  ended after release:      {ended / finished:7.0f} jobs/s  ({ended} in {finished:.1f} s)")
        print(f"  outcome: {await observer.tally()}")
        await engine.stop()

    print(f"\npeak RSS over the run: {rss_mib()[1]:.0f} MiB")
    await client.aclose()
    if fal is not None:
        fal.stop()
    await watching.dispose()
    await db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs in the direct phase")
    parser.add_argument("--claim-jobs", type=int, default=1_000, help="jobs in the claimed phase (0 to skip)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent callers of Engine.submit")
    parser.add_argument("--database-url", default=None, help="SQLAlchemy async URL (default: SQLite in a temp dir)")
    parser.add_argument("--provider", choices=["held", "fal"], default="held")
    parser.add_argument("--fal-poll-seconds", type=float, default=5.0, help="status poll interval with --provider fal")
    parser.add_argument("--timeout", type=float, default=600, help="give up on a phase after this many seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hdg-bench-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
