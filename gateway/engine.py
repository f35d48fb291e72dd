"""The durable job engine behind both APIs: submit (committed before answering), wait, cancel, and the runner loop.

A job is a ``predictions`` row. The process that accepts a job runs it at once when it has room (holding its
lease from the insert on); otherwise any replica's claim loop takes it. A heartbeat renews every lease this process
holds in one statement and brings back cancel requests; a process that dies stops renewing, and once its leases
expire another replica claims the jobs and re-attaches to any provider job already submitted.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway import webhooks
from gateway.auth import Principal
from gateway.backends.base import ImageJob
from gateway.errors import BudgetExceeded, ConcurrencyLimited, IdempotencyConflict
from gateway.jobs import Finished, JobRunner, Why, error_from
from gateway.metering import limited, price_usd
from gateway.predictions import prediction_json
from gateway.routing import Route
from gateway.storage import ledger, queue, repo
from gateway.storage.db import writing
from gateway.storage.files import UrlSigner
from gateway.storage.models import IdempotencyKey, Prediction, StoredFile, new_id, transient, utcnow
from gateway.storage.writer import transact

IDEMPOTENCY_KEYS = cast(Table, IdempotencyKey.__table__)

log = logging.getLogger("hidream_gateway.engine")

IDEMPOTENCY_TTL = timedelta(hours=24)


def at(seconds: float | None, *, now: datetime) -> datetime | None:
    """``seconds`` after ``now``, or None."""
    return None if seconds is None else now + timedelta(seconds=seconds)


@dataclass(frozen=True)
class JobSpec:
    """What an API asks the engine to run."""

    model: str  # hidream-i1-fast
    job: ImageJob
    params: dict[str, Any]
    route: Route
    api: str  # openai | replicate: which shape its clients read
    base_url: str  # where this gateway's file URLs point, for webhook bodies written without a request
    webhook: str | None = None
    webhook_events: list[str] | None = None
    cancel_after: float | None = None  # seconds; Replicate's Cancel-After
    timeout: float | None = None  # seconds it may wait and run before it fails; None: the engine's default


@dataclass(frozen=True)
class Submitted:
    prediction: Prediction
    replayed: bool  # an earlier request with the same Idempotency-Key made it


class Engine:
    """Submit, wait on and cancel jobs; run this process's share of them.

    Example::

        engine = Engine(sessions=sessions, runner=runner, signer=signer, timeout=300)
        await engine.start()
        submitted = await engine.submit(principal=p, spec=spec, idempotency=None)
        done = await engine.wait(submitted.prediction.id, timeout=60)
        await engine.stop()
    """

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        runner: JobRunner,
        signer: UrlSigner,
        timeout: float,
        lease_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        concurrency: int = 1000,
        owner: str | None = None,
    ) -> None:
        self.sessions = sessions
        self.runner = runner
        self.signer = signer
        self.timeout = timeout
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.concurrency = concurrency
        self.owner = owner or f"run_{secrets.token_hex(8)}"
        self.webhook_wake = asyncio.Event()  # set when a delivery was written, so the sender goes at once
        self._tasks: dict[str, asyncio.Task[Finished]] = {}
        self._spawned: dict[str, float] = {}
        self._why: dict[str, Why] = {}
        self._hooked: set[str] = set()  # jobs whose last transaction wrote a webhook delivery
        self._backlog = False  # jobs may be waiting for a free slot here
        self._background: set[asyncio.Task[None]] = set()  # lease releases in flight (kept so none is collected)
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        runner.on_settle = self._on_settle
        runner.on_log = self._on_log

    # -- the API side ------------------------------------------------------------------------------------------

    async def submit(
        self,
        *,
        principal: Principal,
        spec: JobSpec,
        idempotency: tuple[str, str] | None = None,
        precheck: Callable[[], object] | None = None,
    ) -> Submitted:
        """Commit a job (or find the one an earlier request with the same key made) and start it if there is room.

        ``precheck`` runs after an idempotent replay was ruled out and before anything is written; what it raises
        refuses the request.
        """
        now = utcnow()
        direct = not self._stopping and len(self._tasks) < self.concurrency
        p = transient(
            Prediction,
            {
                "id": new_id("gen"),
                "tenant_id": principal.tenant.id,
                "api_key_id": principal.key.id,
                "model": spec.model,
                "status": "processing" if direct else "starting",
                "prompt": spec.job.prompt,
                "params": spec.params
                | {"base_url": spec.base_url, "allowed_backends": principal.tenant.allowed_backends},
                "width": spec.job.width,
                "height": spec.job.height,
                "n": spec.job.n,
                "seed": spec.job.seed,
                "attempts": 0,
                "created_at": now,
                "api": spec.api,
                "job": spec.job.as_dict(),
                "route": str(spec.route),
                "available_at": now,
                # A Cancel-After beyond the timeout wins: the client asked for that long.
                "deadline_at": at(max(spec.timeout or self.timeout, spec.cancel_after or 0), now=now),
                "cancel_at": at(spec.cancel_after, now=now),
                "lease_owner": self.owner if direct else None,
                "lease_expires_at": at(self.lease_seconds, now=now) if direct else None,
                "started_at": now if direct else None,
                "cancel_requested": False,
                "logs": "",
                "webhook": spec.webhook,
                "webhook_events": spec.webhook_events,
            },
        )
        expired: datetime | None = None
        if idempotency is not None:
            async with self.sessions() as session:
                earlier, expired = await self._earlier(session, principal, idempotency)
            if earlier is not None:
                return Submitted(earlier, replayed=True)
        if precheck is not None:
            precheck()
        job = spec.job
        if limited(principal):
            amount = price_usd(self.runner.prices, model=spec.model, width=job.width, height=job.height, images=job.n)
            p.reserved_usd, p.reserved_month = amount, repo.month_key(now)
        start = self._body(p, "start", ())

        def record(conn: Connection) -> None:
            # One transaction: the reservation, the job it admits, its key and its start event. A refusal (or a
            # concurrent request with the same key) rolls all of it back.
            if p.reserved_usd is not None and p.reserved_month is not None:
                ledger.hold(
                    conn, tenant=principal.tenant, key=principal.key, month=p.reserved_month, amount=p.reserved_usd
                )
            queue.insert_job(conn, p)
            if idempotency is not None:
                key, fingerprint = idempotency
                if expired is not None:  # the key may be used again: its old row goes (unless replaced meanwhile)
                    queue.drop_idempotency(conn, tenant_id=p.tenant_id, key=key, before=expired)
                # A concurrent duplicate fails here, on the key's primary key.
                conn.execute(
                    insert(IDEMPOTENCY_KEYS),
                    {"tenant_id": p.tenant_id, "key": key, "fingerprint": fingerprint, "prediction_id": p.id}
                    | {"created_at": now},
                )
            if start is not None:
                webhooks.enqueue(conn, prediction=p, event="start", payload=start)

        recorded = asyncio.ensure_future(transact(self.sessions, record))
        try:
            # Shielded: a transaction that has started finishes (SQLite's writer thread cannot be stopped half-way),
            # and a job it committed holding this process's lease must then run here, not wait out the lease.
            await asyncio.shield(recorded)
        except asyncio.CancelledError:
            recorded.add_done_callback(lambda done: self._adopt(done, p, direct))
            raise
        except (IntegrityError, BudgetExceeded, ConcurrencyLimited):
            # A concurrent request with the same key may have committed first: this one then failed on the key's
            # primary key, or was refused by the hold the other one took (its own job), and is a replay of it.
            if idempotency is None:
                raise
            async with self.sessions() as session:
                earlier, _ = await self._earlier(session, principal, idempotency)
            if earlier is None:
                raise
            return Submitted(earlier, replayed=True)
        if start is not None:
            self._hooked.add(p.id)
        self._start(p, direct)
        return Submitted(p, replayed=False)

    def _adopt(self, recorded: asyncio.Future[None], p: Prediction, direct: bool) -> None:
        """A job whose submit was cancelled while its transaction ran: if that committed, start it as any other."""
        if not recorded.cancelled() and recorded.exception() is None:
            self._start(p, direct)

    def _start(self, p: Prediction, direct: bool) -> None:
        """Start a job just committed: here if it holds this process's lease, else by waking the claim loop."""
        self._wake_sender(p.id)
        if direct and not self._stopping:
            self._spawn(p)
        elif direct:  # shutting down since it was submitted: let another replica take it at once
            self._release_soon(p.id)
        else:
            self._backlog = True
            self._wake.set()

    async def _earlier(
        self, session: AsyncSession, principal: Principal, idempotency: tuple[str, str]
    ) -> tuple[Prediction | None, datetime | None]:
        """(The job an earlier request with this key made, or None; the cutoff its row was judged expired by, or
        None). Reads only: an expired row is deleted by the transaction that takes the key again, by that cutoff.
        """
        key, fingerprint = idempotency
        row = await queue.find_idempotency(session, tenant_id=principal.tenant.id, key=key)
        if row is None:
            return None, None
        cutoff = utcnow() - IDEMPOTENCY_TTL
        if row.created_at < cutoff:  # expired: the key may be used again
            return None, cutoff
        if row.fingerprint != fingerprint:
            raise IdempotencyConflict(
                "This Idempotency-Key was already used with a different request body; use a new key."
            )
        return await queue.load(session, prediction_id=row.prediction_id), None

    async def wait(self, prediction_id: str, *, timeout: float) -> Finished:
        """The job once it is terminal, or as it stands after ``timeout`` seconds."""
        finished = await self.wait_unless(prediction_id, timeout=timeout, gone=None)
        assert finished is not None  # only ``gone`` ends the wait without an answer
        return finished

    async def wait_unless(
        self, prediction_id: str, *, timeout: float, gone: asyncio.Future[Any] | None
    ) -> Finished | None:
        """``wait``, or None as soon as ``gone`` is done (the client hung up): one wait on both, no task of its own."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        also = {gone} if gone is not None else set()
        while True:
            remaining = deadline - time.monotonic()
            task = self._tasks.get(prediction_id)
            if task is not None and remaining > 0:
                done, _ = await asyncio.wait({task, *also}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if task in done and not task.cancelled() and task.exception() is None:
                    finished = task.result()
                    if finished.prediction.status in queue.TERMINAL:
                        return finished
                if gone is not None and gone.done():
                    return None
                if not done:
                    remaining = 0
            async with self.sessions() as session:
                row = await queue.load(session, prediction_id=prediction_id)
                if row is None:
                    raise LookupError(prediction_id)
                files = list(await repo.list_files(session, prediction_id=row.id)) if row.status == "succeeded" else []
            if row.status in queue.TERMINAL:
                return Finished(row, files, error=None if row.status == "succeeded" else error_from(row))
            if remaining <= 0 or deadline - time.monotonic() <= 0:
                return Finished(row, files)
            if prediction_id not in self._tasks:  # running elsewhere (or waiting to be claimed): poll
                pause = min(delay, max(0.0, deadline - time.monotonic()))
                if gone is not None:
                    await asyncio.wait({gone}, timeout=pause)
                    if gone.done():
                        return None
                else:
                    await asyncio.sleep(pause)
                delay = min(delay * 2, 1.0)

    async def cancel(self, *, tenant_id: str, prediction_id: str) -> Prediction | None:
        """Cancel a job wherever it runs; a finished one is returned unchanged. None if there is no such job."""
        async with writing(self.sessions) as session:
            flagged = await queue.request_cancel(session, tenant_id=tenant_id, prediction_id=prediction_id)
        if flagged:
            async with self.sessions() as session:
                row = await queue.load(session, prediction_id=prediction_id)
            if row is not None and row.status == "starting":
                await self.runner.cancel_waiting(row)
                self._wake_sender(row.id)
            task = self._tasks.get(prediction_id)
            if task is not None:  # running here; elsewhere, that replica's heartbeat brings back the flag
                if prediction_id not in self._why and not task.cancelling():
                    self._why[prediction_id] = "cancel"
                    task.cancel()
                await asyncio.wait({task}, timeout=10)
        async with self.sessions() as session:  # a new session: the row as it stands now
            return await repo.get_prediction(session, tenant_id=tenant_id, prediction_id=prediction_id)

    def running_here(self, prediction_id: str) -> bool:
        """Whether this process is running the job now."""
        return prediction_id in self._tasks

    # -- the runner side ---------------------------------------------------------------------------------------

    def _spawn(self, p: Prediction) -> None:
        allowed = p.params.get("allowed_backends")
        task = asyncio.create_task(
            self.runner.execute(p, owner=self.owner, allowed=allowed, why=lambda: self._why.get(p.id)),
            name=f"job {p.id}",
        )
        self._tasks[p.id] = task
        self._spawned[p.id] = time.monotonic()
        if self.runner.metrics is not None:
            self.runner.metrics.job_started()
        task.add_done_callback(lambda _: self._forget(p.id))

    def _wake_sender(self, prediction_id: str) -> None:
        if prediction_id in self._hooked:
            self._hooked.discard(prediction_id)
            self.webhook_wake.set()

    def _forget(self, prediction_id: str) -> None:
        self.runner.settling.discard(prediction_id)
        if self.runner.metrics is not None:
            self.runner.metrics.job_ended()
        self._wake_sender(prediction_id)
        task = self._tasks.get(prediction_id)
        if task is not None and self._why.get(prediction_id) not in ("shutdown", "lost") and not self._settled(task):
            # It ended without settling (an error, a cancel mid-way): let a runner take it over now.
            if not task.cancelled() and task.exception() is not None:
                log.error("job %s ended with an error", prediction_id, exc_info=task.exception())
            self._release_soon(prediction_id)
        self._tasks.pop(prediction_id, None)
        self._spawned.pop(prediction_id, None)
        self._why.pop(prediction_id, None)
        if self._backlog:  # a slot is free and jobs were waiting for one; otherwise the poll finds newcomers
            self._wake.set()

    @staticmethod
    def _settled(task: asyncio.Task[Finished]) -> bool:
        if task.cancelled() or task.exception() is not None:
            return False
        finished = task.result()
        return finished.deferred or finished.prediction.status in queue.TERMINAL

    def _release_soon(self, prediction_id: str) -> None:
        release = asyncio.get_running_loop().create_task(self._release(prediction_id))
        self._background.add(release)  # kept, so it is not collected before it ends
        release.add_done_callback(self._background.discard)

    async def _release(self, prediction_id: str) -> None:
        if prediction_id in self._tasks:  # claimed again here meanwhile: that task holds the lease now
            return
        try:
            async with writing(self.sessions) as session:
                await queue.release(session, owner=self.owner, ids=[prediction_id])
        except Exception:
            log.exception("could not release %s; it is taken over when its lease expires", prediction_id)

    async def start(self) -> None:
        """Start the claim loop, the lease heartbeat and the idempotency-key purge."""
        self._loops = [
            asyncio.create_task(self._claim_forever(), name="job claims"),
            asyncio.create_task(self._heartbeat_forever(), name="job leases"),
            asyncio.create_task(self._purge_forever(), name="idempotency purge"),
        ]

    async def stop(self) -> None:
        """Stop taking jobs; hand the running ones to other replicas (their provider jobs keep running)."""
        self._stopping = True
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        running = dict(self._tasks)
        for pid, task in running.items():
            self._why[pid] = "shutdown"
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
        try:
            async with writing(self.sessions) as session:
                await queue.release(session, owner=self.owner, ids=list(running))
        except Exception:
            log.exception("could not release %d jobs; they are taken over when their leases expire", len(running))

    async def claim_once(self) -> int:
        """Claim and start as many due jobs as there is room for; returns how many."""
        free = self.concurrency - len(self._tasks)
        if free <= 0 or self._stopping:
            return 0
        limit = min(free, 100)
        async with writing(self.sessions) as session:
            claimed = await queue.claim_due(session, owner=self.owner, lease_seconds=self.lease_seconds, limit=limit)
        # A full batch means more may be due; only then is a freed slot worth an immediate claim.
        self._backlog = len(claimed) == limit
        for p in claimed:
            if p.id in self._tasks:
                # Our own running job, whose lease lapsed before the heartbeat renewed it (a busy loop or a slow
                # database): the claim has just renewed it. A second task would submit it to the provider again.
                continue
            self._spawn(p)
        return len(claimed)

    async def _claim_forever(self) -> None:
        while True:
            try:
                await self.claim_once()
                if self._backlog and len(self._tasks) < self.concurrency:
                    continue  # more are due and there is room
            except Exception:
                log.exception("claiming jobs failed")
            self._wake.clear()
            try:
                async with asyncio.timeout(self.poll_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def heartbeat(self) -> None:
        """Renew this process's leases; stop jobs that were canceled or that another runner took over."""
        began = time.monotonic()
        running = [pid for pid, task in self._tasks.items() if not task.done()]
        if not running:
            return
        async with writing(self.sessions) as session:
            held = await queue.renew_leases(session, owner=self.owner, ids=running, lease_seconds=self.lease_seconds)
        # Not renewed: another runner took the job over (and may have finished it), or its own task settled it since
        # the list above was made (and is finishing now). Only the first is a lost lease.
        unrenewed = [pid for pid in running if pid not in held and self._spawned.get(pid, began) < began]
        ended = self.runner.settling
        for pid, task in list(self._tasks.items()):
            if task.done() or task.cancelling() or pid in self._why:
                continue  # already ending; cancelling it again would interrupt its clean-up
            if held.get(pid):
                self._why[pid] = "cancel"
                task.cancel()
            elif pid in unrenewed and pid not in ended:
                log.warning("lost the lease on %s; another runner has it", pid)
                self._why[pid] = "lost"
                task.cancel()

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.heartbeat()
            except Exception:
                log.exception("renewing job leases failed")

    async def _purge_forever(self) -> None:
        while True:
            try:
                async with writing(self.sessions) as session:
                    await queue.purge_idempotency(session, before=utcnow() - IDEMPOTENCY_TTL)
            except Exception:
                log.exception("purging idempotency keys failed")
            await asyncio.sleep(3600)

    # -- events ------------------------------------------------------------------------------------------------

    def _on_settle(self, p: Prediction, files: Sequence[StoredFile]) -> list[tuple[str, dict[str, Any]]]:
        """The webhook events a settle writes with its state change, rendered from ``p`` as settled."""
        events = [("output", self._body(p, "output", files))] if p.status == "succeeded" else []
        events.append(("completed", self._body(p, "completed", files)))
        written = [(event, body) for event, body in events if body is not None]
        if written:
            # The sender is woken once the settle has committed (in _forget), not now: woken before, it would find
            # nothing yet and sleep a whole idle period.
            self._hooked.add(p.id)
        return written

    async def _on_log(self, session: AsyncSession, p: Prediction, logs: str) -> None:
        # Not woken for: the sender's next poll (within a second) sends it, after this transaction has committed.
        before, p.logs = p.logs, logs  # the body shows the logs as written
        try:
            body = self._body(p, "logs", ())
        finally:
            p.logs = before
        if body is not None:
            conn = await session.connection()
            await conn.run_sync(lambda sync: webhooks.enqueue(sync, prediction=p, event="logs", payload=body))

    def _body(self, p: Prediction, event: str, files: Sequence[StoredFile]) -> dict[str, Any] | None:
        """The body of the ``event`` delivery for ``p`` as it stands, or None if its webhook did not ask for it."""
        if not p.webhook or not webhooks.wants(p.webhook_events, event):
            return None
        return prediction_json(p, files, signer=self.signer, base_url=p.params.get("base_url") or "")
