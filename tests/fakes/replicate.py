"""A fake of Replicate's HTTP API v1 for the HiDream models, served on a real loopback port.

It speaks the predictions API (create, get, cancel, list) the way api.replicate.com does, validates inputs the way
the ``prunaai/hidream-l1-*`` models do, serves the output images itself and can be made to fail through ``faults``.

Example::

    with FakeReplicate() as fake:
        client = replicate.Client(api_token=fake.token, base_url=fake.url)
        url = client.run("prunaai/hidream-l1-fast", input={"prompt": "a lighthouse at dusk"})
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.server import Faults, ServerThread, make_image

MODELS: dict[str, str] = {f"prunaai/hidream-l1-{variant}": variant for variant in ("full", "dev", "fast")}
# One stable 64-hex version id per model, so `owner/name:<id>` and bare-id references can be tested.
VERSIONS: dict[str, str] = {model: hashlib.sha256(model.encode()).hexdigest() for model in MODELS}
RESOLUTIONS: dict[str, tuple[int, int]] = {  # (width, height); the separator is U+00D7, as on Replicate
    "1024 × 1024 (Square)": (1024, 1024),
    "768 × 1360 (Portrait)": (768, 1360),
    "1360 × 768 (Landscape)": (1360, 768),
    "880 × 1168 (Portrait)": (880, 1168),
    "1168 × 880 (Landscape)": (1168, 880),
    "1248 × 832 (Landscape)": (1248, 832),
    "832 × 1248 (Portrait)": (832, 1248),
}
DEFAULT_RESOLUTION = "1024 × 1024 (Square)"
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
PAGE_SIZE = 100
DATA_TTL_S = 3600.0  # API predictions lose their inputs and outputs after about an hour
MIN_CANCEL_AFTER_S = 5
WEB = "https://replicate.com"
FAILURE = "RuntimeError: CUDA error: an illegal memory access was encountered"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?")
_BODY_KEYS = {"input", "webhook", "webhook_events_filter", "stream"}
_WEBHOOK_EVENTS = {"start", "output", "logs", "completed"}
_STRING_INPUTS = {"prompt", "model_type", "speed_mode", "resolution", "output_format"}
_INTEGER_INPUTS = {"seed", "output_quality"}
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
_INPUT_ENUMS: dict[str, tuple[str, ...]] = {
    "model_type": ("full", "dev", "fast"),
    "resolution": tuple(RESOLUTIONS),
    "output_format": tuple(CONTENT_TYPES),
}


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    """An RFC 7807 error body, the shape Replicate answers errors with."""
    body = {"title": title, "detail": detail, "status": status, **extra}
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def _invalid(field: str, kind: str, description: str) -> dict[str, str]:
    return {"type": kind, "field": field, "description": description}


def validate_input(variant: str, data: dict[str, Any]) -> list[dict[str, str]]:
    """Check a HiDream model's input; returns Replicate-style ``invalid_fields`` (empty when valid).

    Unknown keys are ignored, as Replicate has always done (replicate/cog#2943), so a misspelt option silently
    falls back to its default there too; ``negative_prompt`` is only a declared (type-checked) input on fast.
    """
    strings = _STRING_INPUTS | ({"negative_prompt"} if variant == "fast" else set())
    problems = [] if "prompt" in data else [_invalid("input", "required", "prompt is required")]
    for key, value in data.items():
        field, expected = f"input.{key}", str if key in strings else int if key in _INTEGER_INPUTS else None
        if expected is None:
            continue
        if type(value) is not expected:  # JSON true is not an integer, and neither is 5.0
            want, given = _JSON_TYPES[expected], _JSON_TYPES.get(type(value), "null")
            problems.append(_invalid(field, "invalid_type", f"Invalid type. Expected: {want}, given: {given}"))
        elif key in _INPUT_ENUMS and value not in _INPUT_ENUMS[key]:
            choices = ", ".join(f'"{choice}"' for choice in _INPUT_ENUMS[key])
            problems.append(_invalid(field, "enum", f"{field} must be one of the following: {choices}"))
        elif key == "output_quality" and not 0 <= int(value) <= 100:
            problems.append(_invalid(field, "number_range", "Must be between 0 and 100"))
    return problems


def _validate_body(body: dict[str, Any], keys: set[str]) -> list[dict[str, str]]:
    """Check a create request against the spec's request schema (which forbids additional properties)."""
    problems = [_invalid("(root)", "required", f"{key} is required") for key in sorted(keys - body.keys() - _BODY_KEYS)]
    problems += [_invalid("(root)", "required", "input is required")] if "input" not in body else []
    for key in body.keys() - keys:
        problems.append(_invalid("(root)", "additional_property", f"Additional property {key} is not allowed"))
    checks = {"input": dict, "webhook": str, "version": str, "stream": bool, "webhook_events_filter": list}
    for key, expected in checks.items():
        if key in body and type(body[key]) is not expected:
            problems.append(_invalid(key, "invalid_type", f"Invalid type. Expected: {_JSON_TYPES[expected]}"))
    events = body.get("webhook_events_filter")
    if isinstance(events, list) and not set(events) <= _WEBHOOK_EVENTS:
        problems.append(_invalid("webhook_events_filter", "enum", f"must be among {sorted(_WEBHOOK_EVENTS)}"))
    return problems


def _validation_failed(problems: list[dict[str, str]]) -> JSONResponse:
    detail = "".join(f"- {p['field']}: {p['description']}\n" for p in problems)
    return problem(422, "Input validation failed", detail, invalid_fields=problems)


def parse_wait(prefer: str | None) -> int | None:
    """Seconds asked for by ``Prefer: wait`` / ``wait=N`` (1..60), or None; unknown preferences are ignored."""
    match = re.search(r"(?:^|,)\s*wait(?:=(\d+))?\s*(?:,|$)", prefer or "")
    seconds = int(match.group(1) or 60) if match else 0
    return seconds if 1 <= seconds <= 60 else None


def parse_duration(value: str) -> int | None:
    """Seconds in a ``Cancel-After`` value such as ``30``, ``90s``, ``5m`` or ``1h30m45s``; None if unparseable."""
    match = _DURATION.fullmatch(value.strip())
    if not match or not any(match.groups()):
        return None
    return sum(int(group or 0) * unit for group, unit in zip(match.groups(), (3600, 60, 1), strict=True))


def _timestamp(value: str | None, default: float) -> float:
    """An ISO 8601 query value as a Unix time (naive ones are taken as UTC)."""
    if value is None:
        return default
    parsed = datetime.fromisoformat(value)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Plan:
    """What will happen to one prediction, fixed at creation so later fault flips do not rewrite its history."""

    created: float
    started: float
    finish: float
    fails: bool
    deadline: float | None
    size: tuple[int, int]
    fmt: str
    seed: int
    image: bytes | None = None


class FakeReplicate:
    """Replicate's predictions API on a loopback port: create, get, cancel, list, and the output files.

    A prediction is ``starting`` for the first quarter of ``faults.processing_s``, then ``processing``, then
    ``succeeded`` (or ``failed`` under ``faults.fail_jobs``). State is derived from the fake's clock whenever it is
    read, so ``advance()`` can jump past a ``Cancel-After`` deadline or the one-hour data removal without sleeping.

    ``urls_base`` and ``output_base`` make new predictions name another host in ``urls`` and in ``output``, to play
    a provider whose answers point somewhere a gateway must not follow (the fake itself still serves the API).
    """

    def __init__(self, token: str = "r8_fake_token") -> None:  # noqa: S107 (a throwaway test token)
        self.token = token
        self.faults = Faults()
        self.creates = 0  # predictions created (each one is billed on Replicate, even if it fails)
        self.hanging = 0  # requests `faults.hang` is holding right now, so a test can wait until one is held
        self.urls_base: str | None = None
        self.output_base: str | None = None
        self._predictions: dict[str, dict[str, Any]] = {}
        self._plans: dict[str, _Plan] = {}
        self._lock = threading.Lock()  # the server thread and the test thread both touch predictions
        self._offset = 0.0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        api = self._api
        routes = [
            Route("/v1/models/{owner}/{name}/predictions", api(self._create_route), methods=["POST"]),
            Route("/v1/predictions", api(self._create_route), methods=["POST"]),
            Route("/v1/predictions", api(self._list), methods=["GET"]),
            Route("/v1/predictions/{pid}", api(self._get), methods=["GET"]),
            Route("/v1/predictions/{pid}/cancel", api(self._cancel), methods=["POST"]),
            Route("/files/{pid}.{ext}", self._file, methods=["GET"]),
        ]
        handlers = {HTTPException: self._http_error}
        app = Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)  # type: ignore[arg-type]
        self.server = ServerThread(app)

    @property
    def url(self) -> str:
        """Base URL without ``/v1``, as the official client's ``base_url`` wants it."""
        return self.server.url

    @property
    def predictions(self) -> dict[str, dict[str, Any]]:
        """Every prediction by id, brought up to date with the fake's clock."""
        with self._lock:
            for pid in self._predictions:
                self._refresh(pid)
        return self._predictions

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward (timestamps, processing, Cancel-After deadlines, data removal)."""
        self._offset += seconds

    def reset(self) -> None:
        """Forget every prediction and clear the faults and the clock, so one running fake can serve many tests."""
        with self._lock:
            self._predictions.clear()
            self._plans.clear()
            self.creates, self._offset = 0, 0.0
            self.urls_base = self.output_base = None
            self.faults.reset()
        deadline = time.monotonic() + 5
        while self.hanging and time.monotonic() < deadline:  # let requests held by a cleared hang go first
            time.sleep(0.01)

    def start(self) -> FakeReplicate:
        """Serve (again, on the same port after a stop); predictions survive a restart."""
        self.server.start()
        return self

    def stop(self) -> None:
        """Go down like a crashed host: open connections are dropped (no answer) and new ones are refused."""
        if self.server.server is not None and self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._drop_connections(self.server.server), self._loop).result(timeout=5)
        self.server.stop()
        self._stopping = False

    async def _drop_connections(self, server: Any) -> None:
        """Stop listening, then cut every open connection; uvicorn alone would let in-flight requests finish."""
        for listener in server.servers:
            listener.close()
        for connection in list(server.server_state.connections):
            connection.transport.abort()
        self._stopping = True  # releases requests held by `hang` or `Prefer: wait`, so uvicorn can shut down

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()  # stop() runs code on it
        yield

    def __enter__(self) -> FakeReplicate:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _now(self) -> float:
        return time.time() + self._offset

    def _api(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """Wrap an API route with the fault knobs and authentication, in the order a real request meets them."""

        async def endpoint(request: Request) -> Response:
            faults = self.faults
            if faults.latency_s:
                await asyncio.sleep(faults.latency_s)
            # faults.hang_while_set(), plus a way out on stop(): uvicorn waits for every request before it exits.
            if faults.hang:
                self.hanging += 1
                try:
                    while faults.hang and not self._stopping:  # noqa: ASYNC110 (flags flipped by the test thread)
                        await asyncio.sleep(0.05)
                finally:
                    self.hanging -= 1
            if not self._authorized(request.headers.get("authorization", "")):
                return problem(401, "Unauthenticated", "You did not pass a valid authentication token")
            if faults.throttle:
                wait_s = faults.retry_after_s
                detail = f"Request was throttled. Expected available in {wait_s} second{'' if wait_s == 1 else 's'}."
                headers = {"Retry-After": str(wait_s)}
                return JSONResponse({"detail": detail, "status": 429}, status_code=429, headers=headers)
            if faults.roll_error():
                return problem(500, "Internal Server Error", faults.error_text or "An unexpected error occurred.")
            if faults.malformed:
                # Truncated JSON under a JSON content type, so a client cannot dodge it by checking the header.
                return Response('{"id": "', media_type="application/json")
            return await handler(request)

        return endpoint

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")  # `Token` is the scheme the client used before 2024
        given, expected = token.strip().encode(), self.token.encode()  # bytes: non-ASCII must not raise
        return scheme.lower() in ("bearer", "token") and hmac.compare_digest(given, expected)

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        return problem(exc.status_code, "Not found" if exc.status_code == 404 else "Error", str(exc.detail))

    async def _create_route(self, request: Request) -> Response:
        """Both create routes: `/v1/models/{owner}/{name}/predictions` and `/v1/predictions` with a `version`."""
        try:
            body = await request.json()
        except ValueError:
            return problem(400, "Invalid JSON", "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return problem(400, "Invalid JSON", "The request body must be a JSON object.")
        by_model = "owner" in request.path_params
        if problems := _validate_body(body, _BODY_KEYS if by_model else _BODY_KEYS | {"version"}):
            return _validation_failed(problems)
        ref: str = "{owner}/{name}".format(**request.path_params) if by_model else body["version"]
        model, _, version_id = ref.partition(":")
        if _HEX64.fullmatch(ref):
            model, version_id = next(((m, v) for m, v in VERSIONS.items() if v == ref), ("", ref))
        elif model not in MODELS:
            return problem(404, "Model not found", f"The model {model} does not exist or you cannot use it.")
        if model not in MODELS or version_id not in ("", VERSIONS[model]):
            return problem(422, "Invalid version or not permitted", f"The version {ref} does not exist.")
        return await self._create(request, model, body)

    async def _create(self, request: Request, model: str, body: dict[str, Any]) -> Response:
        data: dict[str, Any] = body["input"]
        if problems := validate_input(MODELS[model], data):
            return _validation_failed(problems)
        cancel_after: int | None = None
        if (header := request.headers.get("cancel-after")) is not None:
            cancel_after = parse_duration(header)
            if cancel_after is None or cancel_after < MIN_CANCEL_AFTER_S:
                detail = f"Cancel-After must be a duration of at least {MIN_CANCEL_AFTER_S}s, got {header!r}"
                return problem(400, "Invalid Cancel-After", detail)
        seed = data.get("seed", -1)
        with self._lock:
            now, processing_s = self._now(), self.faults.processing_s
            pid = base64.b32encode(secrets.token_bytes(20)).decode().lower()[:26]  # Replicate ids look like this
            self._plans[pid] = _Plan(
                created=now,
                started=now + processing_s / 4,
                finish=now + processing_s,
                fails=self.faults.fail_jobs,
                deadline=None if cancel_after is None else now + cancel_after,
                size=RESOLUTIONS[data.get("resolution", DEFAULT_RESOLUTION)],
                fmt=data.get("output_format", "webp"),
                seed=random.randrange(2**32) if seed == -1 else seed,
            )
            prediction: dict[str, Any] = dict(
                id=pid, model=model, version=VERSIONS[model], input=data, logs="", output=None, error=None
            )
            prediction.update(status="starting", created_at=_iso(now), data_removed=False, source="api")
            urls = {"get": f"/v1/predictions/{pid}", "cancel": f"/v1/predictions/{pid}/cancel"}
            api = self.urls_base or self.url
            prediction["urls"] = {key: api + path for key, path in urls.items()} | {"web": f"{WEB}/p/{pid}"}
            if cancel_after is not None:
                prediction["deadline"] = _iso(now + cancel_after)
            self._predictions[pid] = prediction
            self.creates += 1
            answer = dict(prediction)  # without Prefer: wait, a create always answers with the starting state
        wait = parse_wait(request.headers.get("prefer"))
        if wait is None:
            return JSONResponse(answer, status_code=201)
        give_up = time.monotonic() + wait
        # Polling, not an Event: the state is derived from the clock, and advance() can move it from another thread.
        while self._snapshot(pid)["status"] not in TERMINAL and time.monotonic() < give_up and not self._stopping:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if (answer := self._snapshot(pid))["status"] not in TERMINAL:
            # Like the real API (and what replicate.run() relies on): a wait that runs out reports `starting`.
            answer = {key: value for key, value in answer.items() if key not in ("started_at", "metrics")}
            answer["status"] = "starting"
        return JSONResponse(answer, status_code=201, headers={"Preference-Applied": f"wait={wait}"})

    async def _get(self, request: Request) -> Response:
        pid = request.path_params["pid"]
        if pid not in self._predictions:
            return problem(404, "Not found", "The requested resource could not be found.")
        return JSONResponse(self._snapshot(pid))

    async def _cancel(self, request: Request) -> Response:
        pid = request.path_params["pid"]
        if pid not in self._predictions:
            return problem(404, "Not found", "The requested resource could not be found.")
        with self._lock:
            prediction = self._refresh(pid)
            if prediction["status"] not in TERMINAL:
                self._end(prediction, self._plans[pid], "canceled", self._now())
            return JSONResponse(dict(prediction))

    async def _list(self, request: Request) -> Response:
        """Newest first, 100 a page, linked by opaque cursors (a direction and the id at the page's edge)."""
        query = request.query_params
        with self._lock:
            rows = [(self._plans[pid].created, dict(self._refresh(pid))) for pid in reversed(self._predictions)]
        try:
            after, before = _timestamp(query.get("created_after"), -1.0), _timestamp(query.get("created_before"), 1e12)
            direction, _, mark = base64.urlsafe_b64decode(query.get("cursor", "")).decode().partition(":")
            sources = ("api", None)  # every prediction here came from the API, none from the web
            page = [row for created, row in rows if after <= created < before and query.get("source") in sources]
            edge = [row["id"] for row in page].index(mark) if direction else 0
        except ValueError:
            return problem(400, "Bad request", "Invalid created_after, created_before or cursor.")
        start = edge + 1 if direction == "n" else max(0, edge - PAGE_SIZE) if direction == "p" else 0
        results = page[start : start + PAGE_SIZE]

        def link(kind: str, row: dict[str, Any]) -> str:
            cursor = base64.urlsafe_b64encode(f"{kind}:{row['id']}".encode()).decode()
            return str(request.url.include_query_params(cursor=cursor))

        more = start + PAGE_SIZE < len(page)
        previous = link("p", results[0]) if start > 0 and results else None
        return JSONResponse(
            {"next": link("n", results[-1]) if more else None, "previous": previous, "results": results}
        )

    async def _file(self, request: Request) -> Response:
        pid, ext = request.path_params["pid"], request.path_params["ext"]
        prediction = self._snapshot(pid) if pid in self._predictions else None
        if self.faults.output_404 or prediction is None or prediction["output"] != f"{self.url}/files/{pid}.{ext}":
            return Response("Not Found", status_code=404, media_type="text/plain")
        plan = self._plans[pid]
        if plan.image is None:  # encoding a 1024² image takes a while; keep it off the event loop
            plan.image = await asyncio.to_thread(make_image, *plan.size, plan.fmt, plan.seed)
        return Response(plan.image, media_type=CONTENT_TYPES[plan.fmt])

    def _snapshot(self, pid: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._refresh(pid))

    def _refresh(self, pid: str) -> dict[str, Any]:
        """Bring one prediction up to the fake's clock. Call with the lock held."""
        prediction, plan, now = self._predictions[pid], self._plans[pid], self._now()
        if prediction["status"] in TERMINAL:
            if not prediction["data_removed"] and now >= plan.finish + DATA_TTL_S:
                prediction.update(data_removed=True, input={}, output=None, logs="")
        elif plan.deadline is not None and plan.deadline < plan.finish and now >= plan.deadline:
            # The spec: `aborted` if the deadline passed before the model started, `canceled` if while it ran.
            self._end(prediction, plan, "canceled" if plan.deadline >= plan.started else "aborted", plan.deadline)
        elif now >= plan.finish:
            self._end(prediction, plan, "failed" if plan.fails else "succeeded", plan.finish)
        elif now >= plan.started:
            prediction.update(status="processing", started_at=_iso(plan.started), logs=f"Using seed: {plan.seed}\n")
        return prediction

    def _end(self, prediction: dict[str, Any], plan: _Plan, status: str, at: float) -> None:
        """Put a prediction in a terminal state at time ``at``."""
        plan.finish = at  # the data-removal clock starts here
        prediction.update(status=status, completed_at=_iso(at), metrics={"total_time": at - plan.created})
        if status != "aborted" and at >= plan.started:
            prediction.update(started_at=_iso(plan.started), logs=f"Using seed: {plan.seed}\n")
            prediction["metrics"]["predict_time"] = at - plan.started
        if status == "succeeded":
            prediction["output"] = f"{self.output_base or self.url}/files/{prediction['id']}.{plan.fmt}"
        elif status == "failed":
            failure = self.faults.error_text or FAILURE
            prediction["error"] = failure
            prediction["logs"] += f"Traceback (most recent call last):\n{failure}\n"
