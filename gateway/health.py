"""Backend health as one state machine: a circuit breaker per backend that real traffic and health probes both move,
plus recent latency, in-flight count and throttling.

Real traffic opens a breaker (``failure_threshold`` consecutive failures) and closes it (a half-open trial that
succeeds). A backend with a free health check (a ``ProbedBackend``: a worker's /health, the local model's loader) is
probed as well: a failed probe opens its breaker at once. A good probe makes an open breaker half-open at once only
if a probe saw the backend down (or loading) since the breaker opened: that backend went away and came back, so the
next real request is its trial and it serves within one probe interval. A breaker that traffic opened while the
health check kept passing (the check is fine, generations fail) waits out its open period: a passing check says
nothing new there. Providers have no free check: their breakers move on traffic and time alone, so probing never
costs a paid generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.backends.base import Backend, Probe, ProbedBackend
from gateway.errors import redact_credentials

log = logging.getLogger("hidream_gateway.health")

State = Literal["closed", "open", "half_open"]
# What /readyz and /admin/backends call a backend: it takes jobs (up), takes them with recent failures or a trial
# pending (degraded), takes none until it recovers (open), is still loading its model, or never will (misconfigured).
Status = Literal["up", "degraded", "open", "loading", "misconfigured"]
SERVING: frozenset[Status] = frozenset({"up", "degraded"})
MAX_THROTTLE_SECONDS = 10.0
GUESSED_LATENCY_S = 5.0  # how long a job is expected to take before a backend has answered one


@dataclass
class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``open_seconds`` admits one trial."""

    failure_threshold: int = 3
    open_seconds: float = 30.0
    state: State = "closed"
    consecutive_failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False
    # A health probe found the backend down (or loading) since the breaker last opened: the only case in which a good
    # probe may end the open period early.
    seen_down: bool = False

    def current(self, now: float) -> State:
        """The state at ``now`` (open turns half-open once its time is up)."""
        if self.state == "open" and now - self.opened_at >= self.open_seconds:
            self.state = "half_open"
        return self.state

    def admits(self, now: float) -> bool:
        state = self.current(now)
        return state == "closed" or (state == "half_open" and not self.trial_in_flight)

    def claim(self, now: float) -> bool:
        """Take a half-open breaker's only trial slot if it is free; True if this call took it.

        The slot belongs to whoever took it until it calls ``release``: verdicts (``on_success``, ``on_failure``,
        ``trip``) move the state but never free it, since they may come from another attempt (one admitted while the
        breaker was closed, or a probe) while the trial still runs. Synchronous on purpose: with no await between the
        check and the take, two jobs cannot both see the slot free.
        """
        if self.current(now) != "half_open" or self.trial_in_flight:
            return False
        self.trial_in_flight = True
        return True

    def release(self) -> None:
        """The trial that ``claim`` gave ended (with a verdict or without one): the slot is free again."""
        self.trial_in_flight = False

    def on_success(self) -> None:
        self.state, self.consecutive_failures = "closed", 0

    def on_failure(self, now: float) -> None:
        self.consecutive_failures += 1
        if self.state == "half_open" or self.consecutive_failures >= self.failure_threshold:
            self.trip(now)

    def trip(self, now: float) -> None:
        """Open now (traffic failed ``failure_threshold`` times, or a trial failed), restarting the open period."""
        self.state, self.opened_at, self.seen_down = "open", now, False

    def down(self, now: float) -> None:
        """A health check says the backend cannot serve: open now, whatever the count, and remember it was seen down."""
        self.trip(now)
        self.seen_down = True

    def recovered(self, now: float) -> bool:
        """A good health check: half-open now, without waiting out the timer, if a check saw the backend down since
        the breaker opened. True if it did so. Otherwise the breaker keeps its open period: the check passing says
        nothing about the failures that opened it.
        """
        if self.current(now) == "open" and self.seen_down:
            self.state, self.seen_down = "half_open", False
            return True
        return False


@dataclass
class BackendHealth:
    breaker: CircuitBreaker
    max_in_flight: int
    in_flight: int = 0
    latency_s: float | None = None
    throttled_until: float = 0.0
    successes: int = 0
    failures: int = 0
    last_error: str | None = None
    problem: str | None = None  # its settings cannot work: never routed to (an optional backend, misconfigured)
    probe: Probe | None = None  # the last health check's answer; None before the first
    probed_at: float | None = None  # when (the board's clock) that answer came


@dataclass
class HealthBoard:
    """Health of every backend, moved by the job runner's attempts and by health probes."""

    failure_threshold: int = 3
    open_seconds: float = 30.0
    clock: Any = time.monotonic
    probe_seconds: float = 2.0  # how often doubtful backends are probed (``probe_forever``)
    backends: dict[str, BackendHealth] = field(default_factory=dict)

    def register(self, name: str, *, max_in_flight: int, problem: str | None = None) -> None:
        """Track ``name``; with ``problem``, as misconfigured (shown, never admitted)."""
        breaker = CircuitBreaker(self.failure_threshold, self.open_seconds)
        self.backends[name] = BackendHealth(breaker, max_in_flight, problem=problem, last_error=problem)

    def admits(self, name: str) -> bool:
        h = self.backends[name]
        return h.problem is None and h.breaker.admits(self.clock())

    def has_capacity(self, name: str) -> bool:
        """Below its in-flight limit and not throttled."""
        h = self.backends[name]
        return h.in_flight < h.max_in_flight and self.clock() >= h.throttled_until

    def status(self, name: str) -> Status:
        """The one word /readyz shows for ``name``."""
        h = self.backends[name]
        if h.problem is not None:
            return "misconfigured"
        if h.probe is not None and h.probe.status == "loading":
            return "loading"
        breaker = h.breaker.current(self.clock())
        if breaker == "open":
            return "open"
        if breaker == "half_open" or h.breaker.consecutive_failures > 0:
            return "degraded"
        return "up"

    def doubtful(self, name: str, *, fresh_seconds: float = 0.0) -> bool:
        """Worth probing again: never probed, not up at its last probe, or its breaker is open; and not probed in
        the last ``fresh_seconds`` (a request that probes leaves a backend just probed to the next round).
        """
        h = self.backends[name]
        if h.problem is not None:
            return False
        if h.probed_at is not None and self.clock() - h.probed_at < fresh_seconds:
            return False
        if h.probe is None or h.probe.status in ("loading", "down"):
            return True
        return h.breaker.current(self.clock()) == "open"

    @contextmanager
    def attempt(self, name: str, *, admitted: bool = False) -> Iterator[bool]:
        """Admit an attempt on ``name`` and count it in flight for the block; yields whether it was admitted.

        Admitted: not misconfigured, the breaker admits it, and the backend has capacity (routing saw it had, but
        earlier attempts of the job awaited since). The check and the taking of a half-open breaker's only trial slot
        are one synchronous step, so concurrent jobs cannot both get the trial. ``admitted=True`` skips the check
        (re-attaching to a provider job already running there, which must be waited on whatever the breaker says);
        it takes the trial slot only if the breaker is half-open and the slot is free. Only the attempt that took
        the slot frees it, when its block ends, verdict or not (a cancelled trial must not hold the slot forever).
        """
        h = self.backends[name]
        now = self.clock()
        if not admitted and not (self.admits(name) and self.has_capacity(name)):
            yield False
            return
        trial = h.breaker.claim(now)
        h.in_flight += 1
        try:
            yield True
        finally:
            h.in_flight -= 1
            if trial:
                h.breaker.release()

    def success(self, name: str, seconds: float | None) -> None:
        """A good answer (an input error counts: the backend itself is fine)."""
        h = self.backends[name]
        h.breaker.on_success()
        h.successes += 1
        if seconds is not None:
            h.latency_s = seconds if h.latency_s is None else 0.8 * h.latency_s + 0.2 * seconds

    def failure(self, name: str, error: str) -> None:
        h = self.backends[name]
        h.breaker.on_failure(self.clock())
        h.failures += 1
        h.last_error = redact_credentials(error)[:300]

    def probed(self, name: str, probe: Probe) -> None:
        """Take a health check's answer: ``down`` opens the breaker now; ``up`` makes an open one half-open now if a
        probe saw the backend down or loading since it opened (a recovered backend), else leaves its timer running.
        """
        h = self.backends[name]
        now = self.clock()
        h.probe, h.probed_at = probe, now
        if probe.status == "down":
            # A worker's load error is its own text, and may quote the URL or token it failed with.
            why = redact_credentials(probe.detail or "its health check failed")[:300]
            if h.breaker.current(now) != "open":
                log.warning("%s is down: %s", name, why)
            h.breaker.down(now)
            h.last_error = why
        elif probe.status == "loading" and h.breaker.current(now) == "open":
            h.breaker.seen_down = True  # restarting: once it is up, it is a recovered backend
        elif probe.status == "up" and h.breaker.recovered(now):
            log.info("%s answers its health check again: half-open, the next request is its trial", name)

    def throttled(self, name: str, retry_after: float) -> None:
        """The backend said "not now": skip it until Retry-After passes (at most MAX_THROTTLE_SECONDS).

        The cap keeps one pessimistic Retry-After (a queue estimate, a provider's long back-off) from idling
        a backend for minutes; asking again early costs only one refused request.
        """
        h = self.backends[name]
        h.throttled_until = max(h.throttled_until, self.clock() + min(retry_after, MAX_THROTTLE_SECONDS))

    def recovery_in(self, name: str) -> float | None:
        """Seconds until ``name`` can likely take a job (0: now), or None if it cannot until it is reconfigured.

        The longest of what holds it back: an open breaker (for a backend a probe saw down, the next probe, which can
        make it half-open; else the breaker's timer), a trial in flight, a model loading, a throttle, a full slot.
        """
        h = self.backends[name]
        if h.problem is not None:
            return None
        now = self.clock()
        waits = [0.0]
        breaker = h.breaker.current(now)
        if breaker == "open":
            left = h.breaker.open_seconds - (now - h.breaker.opened_at)
            waits.append(min(left, self.probe_seconds) if h.breaker.seen_down else left)  # seen by a probe
        elif breaker == "half_open" and h.breaker.trial_in_flight:
            waits.append(h.latency_s or GUESSED_LATENCY_S)
        if h.probe is not None and h.probe.status == "loading":
            waits.append(self.probe_seconds)
        if h.throttled_until > now:
            waits.append(h.throttled_until - now)
        elif h.in_flight >= h.max_in_flight:
            waits.append(h.latency_s or GUESSED_LATENCY_S)
        return max(waits)

    def retry_after(self, name: str) -> int:
        """Whole seconds for Retry-After: when ``name`` is expected to take a job again."""
        return self.soonest([name])

    def soonest(self, names: Iterable[str]) -> int:
        """Whole seconds for Retry-After: the soonest any of ``names`` is expected to take a job again.

        Rounded up with a second to spare, so a client does not come back a moment too early. With none that can
        recover (none configured, or all misconfigured), the breaker's open time: a guess that nothing will change.
        """
        waits = [w for name in names if (w := self.recovery_in(name)) is not None]
        return int(min(waits, default=self.open_seconds)) + 1

    def describe(self, names: Iterable[str]) -> str:
        """Why none of ``names`` takes a job now, for a 503's message: ``fal is open (fal cannot be reached...)``."""
        reasons = []
        now = self.clock()
        for name in names:
            h, status = self.backends[name], self.status(name)
            if status == "misconfigured":  # the setting's name is for the operator, not the tenant
                reasons.append(f"{name} is misconfigured")
            elif status in ("open", "degraded") and not h.breaker.admits(now):
                # Not why (last_error): that came from another tenant's job, and may quote it or the provider.
                reasons.append(f"{name} is {status}")
            elif status == "loading":
                reasons.append(f"{name} is loading its model")
            elif h.throttled_until > now:
                reasons.append(f"{name} is throttled")
            else:
                reasons.append(f"{name} is at capacity")
        return "; ".join(reasons)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """What /admin/backends shows."""
        now = self.clock()
        return {
            name: {
                "state": self.status(name),
                "circuit": h.breaker.current(now),
                "consecutive_failures": h.breaker.consecutive_failures,
                "in_flight": h.in_flight,
                "max_in_flight": h.max_in_flight,
                "latency_ms": None if h.latency_s is None else round(h.latency_s * 1000, 1),
                "throttled_for_s": round(max(0.0, h.throttled_until - now), 1),
                "probe": None if h.probe is None else h.probe.status,
                "successes": h.successes,
                "failures": h.failures,
                "last_error": h.last_error,
            }
            for name, h in self.backends.items()
        }


async def probe(backend: Backend) -> Probe:
    """Ask ``backend``'s health check; one without a free check says only whether it is still loading."""
    try:
        if isinstance(backend, ProbedBackend):
            return await backend.probe()
        return Probe("unchecked") if await backend.ready() else Probe("loading")
    except Exception as exc:  # a check that raises is a check that failed; the loop that asked must go on
        log.warning("probing %s raised", backend.name, exc_info=True)
        return Probe("down", f"{backend.name}'s health check failed ({type(exc).__name__}).")


async def probe_all(board: HealthBoard, backends: Sequence[Backend], *, fresh_seconds: float = 0.0) -> None:
    """Probe the doubtful ``backends`` at once (not those probed in the last ``fresh_seconds``) and move their
    breakers by the answers. A backend whose probe says up and whose breaker is closed is left to real traffic.
    """
    chosen = [b for b in backends if board.doubtful(b.name, fresh_seconds=fresh_seconds)]
    answers = await asyncio.gather(*(probe(b) for b in chosen))
    for backend, answer in zip(chosen, answers, strict=True):
        board.probed(backend.name, answer)


async def probe_forever(board: HealthBoard, backends: Sequence[Backend]) -> None:
    """Every ``board.probe_seconds``, probe the backends worth it: not yet probed, down, loading, or open.

    A backend that probed up and whose breaker is closed is left alone: real traffic is watching it.
    """
    while True:
        try:
            await probe_all(board, backends)
        except Exception:  # never let one bad round stop recovery for good
            log.exception("probing backends failed")
        await asyncio.sleep(board.probe_seconds)
