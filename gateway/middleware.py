"""Pure ASGI middleware: request ids, the request body size limit, and the busiest routes' direct dispatch."""

from __future__ import annotations

import inspect
import re
import secrets
from collections.abc import Mapping
from typing import Any

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import PayloadTooLarge, error_response

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Echo a sane client ``X-Request-Id`` or make one; it goes on the response and on request.state."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else f"req_{secrets.token_hex(12)}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, before the app parses anything.

    The body is read (up to the limit) and replayed to the app, so an oversized chunked upload is cut
    off as soon as it crosses the limit rather than after it has all arrived.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"The request body is larger than {self.max_bytes} bytes.")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(too_large, scope["path"])(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await error_response(too_large, scope["path"])(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class DirectRoutes:
    """Hand the busiest routes' requests straight to their endpoint, past Starlette's router and exception layer.

    Routing and those layers are a wrapper, a scope copy and an exit stack per request: about a sixth of the event
    loop's work on ``POST /v1/images/generations``, more than the endpoint spends before it waits on the job. Only
    endpoints that take the bare ``Request`` (no dependencies, no path parameters) can be named. What is kept is what
    the router gave them: ``scope["route"]`` (the metrics label it by its template), and the app's exception
    handlers for what they raise (the catch-all one, for ``Exception``, is the outermost middleware's, as before).
    """

    def __init__(self, app: ASGIApp, *, routes: list[APIRoute], handlers: Mapping[Any, Any]) -> None:
        self.app = app
        for route in routes:
            d = route.dependant
            if d.dependencies or d.path_params or d.query_params or d.header_params or d.body_params or d.cookie_params:
                raise ValueError(f"{route.path}: only an endpoint of a bare Request can be dispatched directly")
        self.routes = {(method, route.path): route for route in routes for method in route.methods or ()}
        self.handlers = {k: v for k, v in handlers.items() if isinstance(k, type) and k is not Exception}
        self.status_handlers = {k: v for k, v in handlers.items() if isinstance(k, int)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http" and not scope.get("root_path"):
            route = self.routes.get((scope["method"], scope["path"]))
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"], scope["endpoint"], scope["path_params"] = route, route.endpoint, {}
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except Exception as exc:  # answered as Starlette's exception middleware would
            handler = self.status_handlers.get(exc.status_code) if isinstance(exc, HTTPException) else None
            if handler is None:
                handler = next((self.handlers[c] for c in type(exc).__mro__ if c in self.handlers), None)
            if handler is None:
                raise
            response = handler(request, exc)
            if inspect.isawaitable(response):  # the app's handlers are coroutines; a plain function answers at once
                response = await response
            exc.__traceback__ = None  # as Starlette does: a reused exception would gather tracebacks
            if response is None:
                return
        await response(scope, receive, send)
