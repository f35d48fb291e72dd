"""Requests-per-minute limits per tenant and per API key: in Redis when HDG_REDIS_URL is set, so every process
and replica counts against the same window; in this process otherwise.

If Redis stops answering, the gateway keeps serving and counts in each process until Redis is back (so a tenant
may get up to its limit per process meanwhile); ``mode`` says which is in force, and /readyz and /metrics show it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.auth import Principal
from gateway.errors import RateLimited

log = logging.getLogger("hidream_gateway.limits")

WINDOW_SECONDS = 60.0

# A sliding window per scope (a sorted set of request times), all scopes checked and counted in one atomic step:
# a request refused by its key's limit must not use up its tenant's. Times come from the Redis server, so replicas
# with skewed clocks share one window. Returns, per scope, {requests in the window, ms until the oldest leaves}.
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local out = {}
local allowed = 1
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count >= tonumber(ARGV[i + 2]) then allowed = 0 end
  out[i] = count
end
local result = {allowed}
for i, key in ipairs(KEYS) do
  if allowed == 1 then
    redis.call('ZADD', key, now, ARGV[2] .. ':' .. i)
    redis.call('PEXPIRE', key, window)
    out[i] = out[i] + 1
  end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local reset = 0
  if oldest[2] then reset = tonumber(oldest[2]) + window - now end
  table.insert(result, out[i])
  table.insert(result, reset)
end
return result
"""


@dataclass(frozen=True)
class Decision:
    """The outcome for the tightest limit that applied: what the ``x-ratelimit-*`` headers report."""

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int  # until the window has a free place again

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-limit``, ``-remaining`` and ``-reset`` (seconds), plus ``Retry-After`` on a refusal."""
        out = {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(self.remaining),
            "x-ratelimit-reset": str(self.reset_seconds),
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, self.reset_seconds))
        return out


def _decide(allowed: bool, scopes: list[tuple[int, int, float]]) -> Decision:
    """Pick the scope with the fewest places left; ``scopes`` is (limit, count, seconds to reset) each."""
    limit, count, reset = min(scopes, key=lambda s: (s[0] - s[1], -s[2]))
    return Decision(allowed, limit, max(0, limit - count), max(0, math.ceil(reset)))


class LocalWindows:
    """The same sliding windows in this process's memory: the embedded default and the fallback."""

    def __init__(self, window_seconds: float = WINDOW_SECONDS) -> None:
        self.window = window_seconds
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, limits: dict[str, int], *, now: float | None = None) -> Decision:
        """Count one request against every scope in ``limits`` if all have room; report the tightest."""
        now = time.monotonic() if now is None else now
        with self._lock:
            windows = []
            for scope in limits:
                hits = self._hits.setdefault(scope, deque())
                while hits and hits[0] <= now - self.window:
                    hits.popleft()
                windows.append(hits)
            allowed = all(len(h) < limit for h, limit in zip(windows, limits.values(), strict=True))
            scopes = []
            for hits, limit in zip(windows, limits.values(), strict=True):
                if allowed:
                    hits.append(now)
                scopes.append((limit, len(hits), hits[0] + self.window - now if hits else 0.0))
            if len(self._hits) > 100_000:  # bounded: drop scopes whose windows are empty
                for scope in [s for s, h in self._hits.items() if not h or h[-1] <= now - self.window]:
                    del self._hits[scope]
            return _decide(allowed, scopes)


class RateLimits:
    """Checks a caller's tenant and key rpm limits together; raises RateLimited (429) with the headers.

    Example::

        limits = RateLimits("redis://127.0.0.1:6379/0")
        decision = await limits.check(principal)  # None when neither the tenant nor the key has a limit
        await limits.aclose()
    """

    def __init__(
        self,
        redis_url: str | None,
        *,
        window_seconds: float = WINDOW_SECONDS,
        timeout: float = 0.25,
        retry_seconds: float = 5.0,
        prefix: str = "hdg:rpm:",
        max_connections: int = 50,
    ) -> None:
        self.window = window_seconds
        self.local = LocalWindows(window_seconds)
        self.prefix = prefix
        self.retry_seconds = retry_seconds
        self._down_since: float | None = None
        self._redis: aioredis.Redis | None = None
        self._slots = asyncio.Semaphore(max_connections)
        if redis_url:
            # Short timeouts: while Redis is unreachable a request waits at most this long before the fallback.
            # No retries inside the client either (its default retries three times): the fallback is the retry.
            self._redis = aioredis.from_url(
                redis_url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
                max_connections=max_connections,
            )
            self._script = self._redis.register_script(_SLIDING_WINDOW)

    @property
    def configured(self) -> bool:
        """Whether HDG_REDIS_URL is set."""
        return self._redis is not None

    @property
    def mode(self) -> str:
        """``redis`` (shared), ``local`` (no Redis configured) or ``local-fallback`` (Redis unreachable)."""
        if self._redis is None:
            return "local"
        return "redis" if self._down_since is None else "local-fallback"

    async def check(self, principal: Principal) -> Decision | None:
        """Count one request of ``principal``; None when no limit applies. Raises RateLimited when over."""
        limits: dict[str, int] = {}
        # Both keys carry the tenant in a hash tag ({...}), so on Redis Cluster they live in one slot and the one
        # script may touch both.
        tag = f"{{{principal.tenant.id}}}"
        if principal.tenant.rpm is not None:
            limits[f"{tag}:t"] = principal.tenant.rpm
        if principal.key.rpm is not None:
            limits[f"{tag}:k:{principal.key.id}"] = principal.key.rpm
        if not limits:
            return None
        decision = await self._hit(limits)
        if not decision.allowed:
            raise RateLimited(
                f"Rate limit of {decision.limit} requests per minute reached; retry in "
                f"{max(1, decision.reset_seconds)} s.",
                headers=decision.headers(),
            )
        return decision

    def _resting(self) -> bool:
        """Redis failed a moment ago: count here until it is time to try it again."""
        return self._down_since is not None and time.monotonic() - self._down_since < self.retry_seconds

    async def _hit(self, limits: dict[str, int]) -> Decision:
        if self._redis is None or self._resting():
            return self.local.hit(limits)
        # At most ``max_connections`` calls at once: past the client pool's size redis-py raises an error that looks
        # like an outage, and a burst would switch this process to per-process counting. A call that can't get a
        # place within a second counts here (Redis is not marked down for it).
        try:
            async with asyncio.timeout(1.0):
                await self._slots.acquire()
        except TimeoutError:
            return self.local.hit(limits)
        try:
            if self._resting():  # it failed while this call waited for its place
                return self.local.hit(limits)
            reply = await self._script(
                keys=[self.prefix + scope for scope in limits],
                args=[int(self.window * 1000), secrets.token_hex(8), *limits.values()],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            if self._down_since is None:
                log.warning("Redis is unreachable (%s): rate limits are per process until it is back", exc)
            self._down_since = time.monotonic()
            return self.local.hit(limits)
        finally:
            self._slots.release()
        if self._down_since is not None:
            log.warning("Redis is back: rate limits are shared again")
            self._down_since = None
        scopes = [
            (limit, int(reply[1 + 2 * i]), int(reply[2 + 2 * i]) / 1000) for i, limit in enumerate(limits.values())
        ]
        return _decide(bool(reply[0]), scopes)

    async def ping(self) -> bool:
        """Whether Redis answers now (False when it is not configured)."""
        if self._redis is None:
            return False
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def aclose(self) -> None:
        """Close the Redis connections."""
        if self._redis is not None:
            await self._redis.aclose()
