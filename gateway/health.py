"""Backend health: a circuit breaker per backend, recent latency, in-flight count, throttling.

Only real traffic moves a breaker: a half-open breaker lets one real request through as its trial, so
probing never costs a paid generation that nobody asked for.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["closed", "open", "half_open"]
MAX_THROTTLE_SECONDS = 10.0


@dataclass
class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``open_seconds`` admits one trial."""

    failure_threshold: int = 3
    open_seconds: float = 30.0
    state: State = "closed"
    consecutive_failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False

    def current(self, now: float) -> State:
        """The state at ``now`` (open turns half-open once its time is up)."""
        if self.state == "open" and now - self.opened_at >= self.open_seconds:
            self.state = "half_open"
        return self.state

    def admits(self, now: float) -> bool:
        state = self.current(now)
        return state == "closed" or (state == "half_open" and not self.trial_in_flight)

    def on_start(self, now: float) -> None:
        if self.current(now) == "half_open":
            self.trial_in_flight = True

    def on_success(self) -> None:
        self.state, self.consecutive_failures, self.trial_in_flight = "closed", 0, False

    def on_failure(self, now: float) -> None:
        self.consecutive_failures += 1
        if self.state == "half_open" or self.consecutive_failures >= self.failure_threshold:
            self.state, self.opened_at = "open", now
        self.trial_in_flight = False


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


@dataclass
class HealthBoard:
    """Health of every backend, updated by the job runner as attempts start and end."""

    failure_threshold: int = 3
    open_seconds: float = 30.0
    clock: Any = time.monotonic
    backends: dict[str, BackendHealth] = field(default_factory=dict)

    def register(self, name: str, *, max_in_flight: int) -> None:
        self.backends[name] = BackendHealth(CircuitBreaker(self.failure_threshold, self.open_seconds), max_in_flight)

    def admits(self, name: str) -> bool:
        return self.backends[name].breaker.admits(self.clock())

    def has_capacity(self, name: str) -> bool:
        h = self.backends[name]
        return h.in_flight < h.max_in_flight and self.clock() >= h.throttled_until

    @contextmanager
    def attempt(self, name: str) -> Iterator[None]:
        """Count an attempt in flight for its duration (and take a half-open breaker's trial slot)."""
        h = self.backends[name]
        h.breaker.on_start(self.clock())
        h.in_flight += 1
        try:
            yield
        finally:
            h.in_flight -= 1
            # No verdict (cancelled, or the caller has not judged the answer yet): free the trial slot so
            # the breaker cannot stay half-open with its only slot taken forever.
            h.breaker.trial_in_flight = False

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
        h.last_error = error[:300]

    def throttled(self, name: str, retry_after: float) -> None:
        """The backend said "not now": skip it until Retry-After passes (at most MAX_THROTTLE_SECONDS).

        The cap keeps one pessimistic Retry-After (a queue estimate, a provider's long back-off) from idling
        a backend for minutes; asking again early costs only one refused request.
        """
        h = self.backends[name]
        h.throttled_until = max(h.throttled_until, self.clock() + min(retry_after, MAX_THROTTLE_SECONDS))
        h.breaker.trial_in_flight = False

    def retry_after(self, name: str) -> int:
        """A guess at when a saturated or throttled backend frees up, for Retry-After."""
        h = self.backends[name]
        throttled = h.throttled_until - self.clock()
        return max(1, int(throttled) + 1 if throttled > 0 else int(h.latency_s or 5))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """What /admin/backends shows."""
        now = self.clock()
        return {
            name: {
                "circuit": h.breaker.current(now),
                "consecutive_failures": h.breaker.consecutive_failures,
                "in_flight": h.in_flight,
                "max_in_flight": h.max_in_flight,
                "latency_ms": None if h.latency_s is None else round(h.latency_s * 1000, 1),
                "throttled_for_s": round(max(0.0, h.throttled_until - now), 1),
                "successes": h.successes,
                "failures": h.failures,
                "last_error": h.last_error,
            }
            for name, h in self.backends.items()
        }
