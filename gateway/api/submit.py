"""What both create endpoints share: Idempotency-Key handling and waiting on a job while the client is there."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from gateway.engine import Engine
from gateway.errors import InvalidRequest
from gateway.jobs import Finished

M = TypeVar("M", bound=BaseModel)

_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces: what Stripe-style keys look like


def fingerprint_of(path: str, payload: Any) -> str:
    """SHA-256 of an endpoint and its payload as canonical JSON: the same request in other whitespace or key order
    has the same fingerprint.
    """
    canonical = json.dumps([path, payload], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def idempotency(
    request: Request, key: str | None, *, fingerprint: str | None = None, payload: Any = None
) -> tuple[str, str] | None:
    """(key, fingerprint of this endpoint and body, unless the caller made its own), or None without a key.

    The body is fingerprinted as canonical JSON, so the same request sent with other whitespace or key order
    is the same request. ``payload``: the body already parsed, when the caller has it.
    """
    if key is None:
        return None
    if not _KEY.match(key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters without spaces.", param="Idempotency-Key"
        )
    if fingerprint is not None:
        return key, fingerprint
    if payload is not None:
        return key, fingerprint_of(request.url.path, payload)
    try:
        body: Any = json.loads(await request.body() or b"null")
    except ValueError:
        body = None  # FastAPI has already refused a body that is not JSON
    return key, fingerprint_of(request.url.path, body)


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    maintype, _, subtype = media.partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


async def json_body(request: Request, model: type[M]) -> tuple[Any, M]:
    """The request's JSON body, parsed and validated as ``model``: (the JSON, the model).

    What FastAPI does for a body parameter, for a route that skips its machinery: a body that is not JSON (by its
    Content-Type, which is required) or not valid, and a value ``model`` refuses, raise RequestValidationError
    with FastAPI's error shapes, so the installed handler answers them as it answers every other route's.
    """
    raw = await request.body()
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    if not _is_json(request.headers.get("content-type", "")):
        # Not read as JSON: the handler answers 415 for a named media type, and "not a JSON object" without one.
        error = {"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be a valid dictionary"}
        raise RequestValidationError([error | {"input": raw}])
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, nested too deep to parse
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {}}]
        ) from None
    try:
        return payload, model.model_validate(payload, from_attributes=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError([e | {"loc": ("body", *e["loc"])} for e in errors]) from None


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
    gone = asyncio.create_task(_hung_up(request))
    try:
        finished = await engine.wait_unless(prediction_id, timeout=timeout, gone=gone)
    finally:
        gone.cancel()
    if finished is not None:
        return finished
    if not keep_going:
        await asyncio.shield(engine.cancel(tenant_id=tenant_id, prediction_id=prediction_id))
    return None
