"""OpenAI-compatible image generation: ``POST /v1/images/generations``."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from gateway.api.deps import PrincipalDep, SessionDep, StateDep, get_principal, get_state, public_base_url
from gateway.api.serialize import Text
from gateway.api.submit import idempotency, json_body, wait_while_connected
from gateway.auth import Principal
from gateway.backends.base import ImageJob
from gateway.engine import JobSpec
from gateway.errors import GenerationTimeout, InvalidRequest, ModelNotFound, NotFound, tenant_attempts
from gateway.jobs import Finished, error_from
from gateway.limits import Decision
from gateway.routing import Route
from gateway.state import AppState
from gateway.storage import repo
from gateway.storage.files import FileMissing
from gateway.storage.models import Prediction, StoredFile
from inference.variants import MODEL_IDS, nearest_resolution, variant_for_model

router = APIRouter(tags=["images"])

DEFAULT_MODEL = "hidream-i1-fast"
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MIN_SIDE, MAX_SIDE = 64, 4096
MAX_SEED = 2**32 - 1


class ImageGenerationRequest(BaseModel):
    """The OpenAI images API body, plus HiDream's own knobs; unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: Text = Field(min_length=1)
    model: str = DEFAULT_MODEL
    n: StrictInt = Field(default=1, ge=1, le=4)
    size: str | None = None
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: StrictInt | None = Field(default=None, ge=0, le=100)
    user: Text | None = Field(default=None, max_length=256)
    stream: bool | None = None
    negative_prompt: Text | None = None
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    num_inference_steps: StrictInt | None = Field(default=None, ge=1, le=100)
    guidance_scale: StrictFloat | None = Field(default=None, ge=0.0, le=20.0)


def parse_size(size: str | None) -> tuple[int, int]:
    """``WxH`` (or ``auto``) mapped to the nearest supported HiDream resolution."""
    if size is None or size == "auto":
        return 1024, 1024
    match = _SIZE.match(size)
    if not match:
        raise InvalidRequest(f"Invalid size '{size}': expected WIDTHxHEIGHT, e.g. 1024x1024.", param="size")
    width, height = int(match[1]), int(match[2])
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise InvalidRequest(f"Invalid size '{size}': each side must be {MIN_SIDE}-{MAX_SIDE}.", param="size")
    return nearest_resolution(width, height)


def _check_text(value: str | None, param: str, limit: int) -> None:
    if value is not None and len(value) > limit:
        raise InvalidRequest(
            f"'{param}' is {len(value)} characters long; the limit is {limit}.",
            param=param,
            code="string_above_max_length",
        )


def _created(at: datetime) -> int:
    return int(at.timestamp())


def _file_entry(f: StoredFile, *, base_url: str, state: StateDep, b64: bytes | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"b64_json": base64.b64encode(b64).decode()} if b64 is not None else {}
    if b64 is None:
        entry["url"] = state.signer.sign(base_url, f.id)
    entry["revised_prompt"] = None
    entry["file_id"] = f.id
    return entry


def _prediction_body(p: Prediction, data: list[dict[str, Any]], output_format: str) -> dict[str, Any]:
    return {
        "id": p.id,
        "created": _created(p.created_at),
        "model": p.model,
        "status": p.status,
        "size": f"{p.width}x{p.height}",
        "output_format": output_format,
        "seed": p.seed,
        "backend": p.backend,
        "attempts": p.attempts,
        "data": data,
    }


def resolve_route(header: str | None, default: str, state: StateDep) -> Route:
    """The request's ``X-HDG-Route`` if given, else the tenant's or the gateway's default."""
    text = header if header is not None else default
    param = "X-HDG-Route" if header is not None else "route"
    try:
        route = Route.parse(text)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param) from None
    known = {b.name for b in state.backends} | {b.kind for b in state.backends}
    unknown = [name for name in route.order if name not in known]
    if unknown:
        raise InvalidRequest(f"Unknown backend(s) {unknown} in route; enabled: {sorted(known)}.", param=param)
    return route


class StillRunning(GenerationTimeout):
    """The wait ran out while the job goes on (it may still succeed, and be billed): ``prediction_id`` is where
    to look for it. The API answers 504 as for any timeout; the console shows the job's own page instead.
    """

    def __init__(self, message: str, *, prediction_id: str) -> None:
        super().__init__(message)
        self.prediction_id = prediction_id


@dataclass(frozen=True)
class Generated:
    """A generation that succeeded, as ``generate_image`` hands it to the route (or the console) that asked."""

    done: Finished
    replayed: bool  # an earlier request with the same Idempotency-Key made it
    rate: Decision | None  # the rpm window after this request, when a limit applies
    base_url: str


async def generate_image(
    body: ImageGenerationRequest,
    *,
    principal: Principal,
    state: AppState,
    request: Request,
    route_header: str | None = None,
    idempotency_key: str | None = None,
    fingerprint: str | None = None,
    payload: Any = None,
) -> Generated | None:
    """Check, submit and wait on one image request: the path every generation takes (limits, budgets, routing,
    billing), whether it came as JSON or from the console's playground.

    ``fingerprint`` is what an ``idempotency_key`` is bound to when the caller made it (the playground's form is
    not JSON: it fingerprints ``body``); by default, the JSON body's (``payload``, when the caller has parsed it).
    Returns None when the client hung up first;
    raises the job's error when it did not succeed, StillRunning when the wait ran out first.
    """
    variant = variant_for_model(body.model)
    if variant is None:
        raise ModelNotFound(
            f"The model '{body.model}' does not exist. Available: {', '.join(sorted(MODEL_IDS))}.",
            param="model",
        )
    if body.stream:
        raise InvalidRequest("Streaming image generation is not supported.", param="stream")
    limit = state.settings.max_prompt_chars
    if not body.prompt.strip():
        raise InvalidRequest("'prompt' must not be blank.", param="prompt")
    _check_text(body.prompt, "prompt", limit)
    _check_text(body.negative_prompt, "negative_prompt", limit)
    width, height = parse_size(body.size)
    idem = await idempotency(request, idempotency_key, fingerprint=fingerprint, payload=payload)

    rate = await state.limits.check(principal)

    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    job = ImageJob(
        variant=variant.name,
        prompt=body.prompt,
        width=width,
        height=height,
        seed=seed,
        n=body.n,
        negative_prompt=body.negative_prompt,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        output_format=body.output_format,
        quality=body.output_compression if body.output_compression is not None else 90,
    )
    route = resolve_route(route_header, principal.tenant.route or state.settings.route, state)
    given = body.model_dump(exclude_none=True)
    params = {k: v for k, v in given.items() if k != "prompt"} | {
        "seed": seed,
        "size": f"{width}x{height}",
        "route": str(route),
        "input": given,
    }
    base_url = public_base_url(request, state)
    spec = JobSpec(model=variant.model_id, job=job, params=params, route=route, api="openai", base_url=base_url)
    allowed = principal.tenant.allowed_backends
    submitted = await state.jobs.submit(
        principal=principal,
        spec=spec,
        idempotency=idem,
        # Fail fast (503 with Retry-After) rather than queue a synchronous call no backend can take now.
        precheck=lambda: state.runner.candidates(job, route, allowed),
    )
    done = await wait_while_connected(
        request,
        state.jobs,
        tenant_id=principal.tenant.id,
        prediction_id=submitted.prediction.id,
        timeout=state.settings.request_timeout_seconds + 5,
        keep_going=idem is not None,
    )
    if done is None:  # the client is gone; nobody reads this
        return None
    p = done.prediction
    if p.status != "succeeded":
        if p.status in ("starting", "processing"):
            raise StillRunning(f"Generation {p.id} did not finish in time.", prediction_id=p.id)
        raise done.error or error_from(p)
    return Generated(done=done, replayed=submitted.replayed, rate=rate, base_url=base_url)


# The body and headers are read here rather than declared: FastAPI's dependency and validation machinery cost
# more than the rest of this route's own work on the event loop (issue 12). They are declared for the schema.
_CREATE_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ImageGenerationRequest.model_json_schema()}},
    },
    "parameters": [
        {"name": "X-HDG-Route", "in": "header", "required": False, "schema": {"type": "string"}},
        {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}},
    ],
}


@router.post("/v1/images/generations", openapi_extra=_CREATE_DOCS)
async def create_image(request: Request) -> Response:
    """Generate ``n`` images and answer in OpenAI's shape (plus ``id``, ``size``, ``seed`` extensions).

    The job is committed before it runs; this call waits on it. With an ``Idempotency-Key``, a retry after a
    timeout or a dropped connection gets the same job (and one charge) instead of a second one.
    """
    state = await get_state(request)
    given = request.headers
    principal = await get_principal(state, given.get("authorization"))
    payload, body = await json_body(request, ImageGenerationRequest)
    generated = await generate_image(
        body,
        principal=principal,
        state=state,
        request=request,
        route_header=given.get("x-hdg-route"),
        idempotency_key=given.get("idempotency-key"),
        payload=payload,
    )
    if generated is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    done, base_url = generated.done, generated.base_url
    p = done.prediction
    b64 = body.response_format == "b64_json"
    images = done.images
    if b64 and images is None:  # made by another replica, or an earlier request with the same key
        try:
            images = list(await asyncio.gather(*(state.files.read(f.path) for f in done.files)))
        except FileMissing:  # e.g. replicas with separate local directories: HDG_STORAGE=s3 shares them
            raise NotFound("The generation's image content is no longer stored.") from None
    data = [
        _file_entry(f, base_url=base_url, state=state, b64=images[i] if b64 and images is not None else None)
        for i, f in enumerate(done.files)
    ]
    headers = generated.rate.headers() if generated.rate is not None else {}
    headers |= {"X-HDG-Backend": p.backend or "", "X-HDG-Attempts": str(p.attempts), "X-HDG-Prediction-Id": p.id}
    if generated.replayed:
        headers["Idempotent-Replayed"] = "true"
    # JSON types only, so straight to the response (FastAPI's encoder would walk it again for nothing).
    return JSONResponse(_prediction_body(p, data, p.params.get("output_format", body.output_format)), headers=headers)


@router.get("/v1/images/generations/{prediction_id}")
async def get_generation(
    prediction_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    state: StateDep,
    request: Request,
) -> dict[str, Any]:
    """A past generation of the caller's, with fresh signed URLs; another tenant's id is a 404."""
    p = await repo.get_prediction(session, tenant_id=principal.tenant.id, prediction_id=prediction_id)
    if p is None:
        raise NotFound(f"No generation with id '{prediction_id}'.", param="id")
    files = await repo.list_files(session, prediction_id=p.id)
    base_url = public_base_url(request, state)
    body = _prediction_body(
        p,
        [_file_entry(f, base_url=base_url, state=state, b64=None) for f in files],
        p.params.get("output_format", "png"),
    )
    if p.error:
        body["error"] = p.error
    # Every backend tried, once it has ended ("attempts" is their count), without the admins' ``detail``.
    body["attempt_log"] = tenant_attempts(p.attempt_log)
    return body
