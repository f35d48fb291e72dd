"""What both create endpoints share: Idempotency-Key handling and waiting on a job while the client is there."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from typing import Any

from fastapi import Request

from gateway.engine import Engine
from gateway.errors import InvalidRequest
from gateway.jobs import Finished

_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces: what Stripe-style keys look like


def fingerprint_of(path: str, payload: Any) -> str:
    """SHA-256 of an endpoint and its payload as canonical JSON: the same request in other whitespace or key order
    has the same fingerprint.
    """
    canonical = json.dumps([path, payload], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def idempotency(request: Request, key: str | None, *, fingerprint: str | None = None) -> tuple[str, str] | None:
    """(key, fingerprint of this endpoint and body, unless the caller made its own), or None without a key.

    The body is fingerprinted as canonical JSON, so the same request sent with other whitespace or key order
    is the same request.
    """
    if key is None:
        return None
    if not _KEY.match(key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters without spaces.", param="Idempotency-Key"
        )
    if fingerprint is not None:
        return key, fingerprint
    try:
        body: Any = json.loads(await request.body() or b"null")
    except ValueError:
        body = None  # FastAPI has already refused a body that is not JSON
    return key, fingerprint_of(request.url.path, body)


async def _hung_up(request: Request) -> None:
    """Return once the client has gone away (the body has already been read, so only a disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def wait_while_connected(
    request: Request, engine: Engine, *, tenant_id: str, prediction_id: str, timeout: float, keep_going: bool
) -> Finished | None:
    """Wait for the job; None if the client hung up first.

    A client that hangs up without an Idempotency-Key can never collect the result, so its job is canceled (and
    not billed); with a key, the job goes on and a retry with the key re-attaches to it.
    """
    waiter = asyncio.create_task(engine.wait(prediction_id, timeout=timeout))
    gone = asyncio.create_task(_hung_up(request))
    try:
        await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not waiter.done():
            waiter.cancel()
    if waiter.done() and not waiter.cancelled():
        return waiter.result()
    if not keep_going:
        await asyncio.shield(engine.cancel(tenant_id=tenant_id, prediction_id=prediction_id))
    return None
