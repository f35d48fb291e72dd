"""Replicate-compatible predictions: create (with ``Prefer: wait`` and ``Cancel-After``), get, cancel, list, models.

The official ``replicate`` client works unchanged with its base URL pointed at the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.api.deps import PrincipalDep, SessionDep, StateDep, public_base_url
from gateway.api.images import MAX_SEED, _check_text, resolve_route
from gateway.api.serialize import Text
from gateway.api.submit import idempotency
from gateway.auth import Principal
from gateway.backends.base import ImageJob
from gateway.engine import JobSpec
from gateway.errors import InvalidRequest, ModelNotFound, NotFound
from gateway.outbound import UnsafeUrl
from gateway.predictions import MODELS, VERSIONS, iso, prediction_json, resolve
from gateway.state import AppState
from gateway.storage import queue, repo
from gateway.storage.models import Prediction, StoredFile, is_id
from inference.variants import RESOLUTIONS, Variant, nearest_resolution

router = APIRouter(tags=["predictions"])

_WAIT = re.compile(r"^\s*wait(?:\s*=\s*(\d{1,7}))?\s*$")
_DURATION = re.compile(r"^(?:(\d{1,7})h)?(?:(\d{1,7})m)?(?:(\d{1,7})s)?$")
_RATIO = re.compile(r"^(\d{1,2}):(\d{1,2})$")
PAGE_SIZE = 100
MAX_CANCEL_AFTER = 7 * 24 * 3600


class PredictionInput(BaseModel):
    """The HiDream model's input. Unknown fields are refused: silently ignoring one would make a different image."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(min_length=1)
    negative_prompt: Text | None = None
    width: StrictInt | None = Field(default=None, ge=64, le=4096)
    height: StrictInt | None = Field(default=None, ge=64, le=4096)
    aspect_ratio: str | None = None
    seed: StrictInt | None = Field(default=None, ge=-1, le=MAX_SEED)  # -1 or absent: random, as on Replicate
    num_outputs: StrictInt = Field(default=1, ge=1, le=4)
    output_format: Literal["png", "jpg", "jpeg", "webp"] = "png"
    output_quality: StrictInt = Field(default=90, ge=0, le=100)
    num_inference_steps: StrictInt | None = Field(default=None, ge=1, le=100)
    guidance_scale: StrictFloat | None = Field(default=None, ge=0.0, le=20.0)


class CreatePrediction(BaseModel):
    """``POST /v1/predictions`` and ``POST /v1/models/{owner}/{name}/predictions``."""

    model_config = ConfigDict(extra="ignore")

    version: str | None = None
    input: PredictionInput
    webhook: str | None = Field(default=None, max_length=2000)
    webhook_events_filter: list[Literal["start", "output", "logs", "completed"]] | None = None
    stream: bool | None = None


def _size(i: PredictionInput) -> tuple[int, int]:
    if i.aspect_ratio is not None:
        if i.width is not None or i.height is not None:
            raise InvalidRequest("Give either width and height or aspect_ratio, not both.", param="aspect_ratio")
        match = _RATIO.match(i.aspect_ratio)
        if not match or int(match[1]) == 0 or int(match[2]) == 0:
            raise InvalidRequest(
                f"Invalid aspect_ratio '{i.aspect_ratio}': expected W:H, e.g. 16:9.", param="aspect_ratio"
            )
        return nearest_resolution(int(match[1]) * 1000, int(match[2]) * 1000)
    if (i.width is None) != (i.height is None):
        raise InvalidRequest("Give both width and height.", param="width" if i.width is None else "height")
    if i.width is None or i.height is None:
        return RESOLUTIONS[0]
    return nearest_resolution(i.width, i.height)


def _seconds(header: str, name: str) -> int:
    match = _DURATION.match(header.strip())
    if not header.strip() or not match:
        raise InvalidRequest(f"Invalid {name} header '{header}': use e.g. 30s, 5m or 1h30m.", param=name)
    h, m, s = (int(g) if g else 0 for g in match.groups())
    seconds = h * 3600 + m * 60 + s
    if seconds > MAX_CANCEL_AFTER:
        raise InvalidRequest(f"{name} is at most {MAX_CANCEL_AFTER // 3600} hours.", param=name)
    return seconds


def _wait_seconds(prefer: str | None) -> int | None:
    """``Prefer: wait`` (60 s) or ``wait=N`` (1-60 s); None when the client does not want to wait."""
    if prefer is None:
        return None
    for part in prefer.split(","):
        match = _WAIT.match(part)
        if match:
            n = int(match[1]) if match[1] else 60
            if not 1 <= n <= 60:
                raise InvalidRequest("Prefer: wait=N takes N from 1 to 60 seconds.", param="Prefer")
            return n
    return None


@dataclass
class Creation:
    """What a create call brings besides its body: who, where, and Replicate's request headers."""

    principal: PrincipalDep
    state: StateDep
    request: Request
    response: Response
    prefer: Annotated[str | None, Header(alias="Prefer")] = None
    cancel_after: Annotated[str | None, Header(alias="Cancel-After")] = None
    key: Annotated[str | None, Header(alias="Idempotency-Key")] = None
    arrived: float = field(init=False)  # not a parameter: FastAPI reads __init__ to find what to inject

    def __post_init__(self) -> None:
        self.arrived = time.monotonic()


CreationDep = Annotated[Creation, Depends()]


async def _create(c: Creation, body: CreatePrediction, variant: Variant) -> dict[str, Any]:
    state, principal, request, response = c.state, c.principal, c.request, c.response
    prefer, cancel_after, key, arrived = c.prefer, c.cancel_after, c.key, c.arrived
    i = body.input
    if body.stream:
        raise InvalidRequest("Streaming output is not supported for image models.", param="stream")
    if not i.prompt.strip():
        raise InvalidRequest("'prompt' must not be blank.", param="prompt")
    _check_text(i.prompt, "prompt", state.settings.max_prompt_chars)
    _check_text(i.negative_prompt, "negative_prompt", state.settings.max_prompt_chars)
    if body.webhook is not None:  # refused now with a clear error; checked again (DNS can change) at each send
        state.outbound.check_syntax(body.webhook)
        try:
            async with asyncio.timeout(3):
                await state.outbound.resolve(body.webhook)
        except TimeoutError:
            raise UnsafeUrl("The webhook's host did not resolve within 3 s.") from None
    wait = _wait_seconds(prefer)
    after = _seconds(cancel_after, "Cancel-After") if cancel_after is not None else None
    if after is not None and after < 5:
        raise InvalidRequest("Cancel-After must be at least 5 seconds.", param="Cancel-After")
    width, height = _size(i)
    idem = await idempotency(request, key)
    rate = await state.limits.check(principal)
    if rate is not None:
        response.headers.update(rate.headers())
    seed = i.seed if i.seed is not None and i.seed >= 0 else secrets.randbelow(MAX_SEED + 1)
    job = ImageJob(
        variant=variant.name,
        prompt=i.prompt,
        width=width,
        height=height,
        seed=seed,
        n=i.num_outputs,
        negative_prompt=i.negative_prompt,
        num_inference_steps=i.num_inference_steps,
        guidance_scale=i.guidance_scale,
        output_format="jpeg" if i.output_format == "jpg" else i.output_format,
        quality=i.output_quality,
    )
    route = resolve_route(None, principal.tenant.route or state.settings.route, state)
    params = {
        "input": i.model_dump(exclude_none=True),
        "seed": seed,
        "size": f"{width}x{height}",
        "output_format": job.output_format,
        "route": str(route),
    }
    base_url = public_base_url(request, state)
    spec = JobSpec(
        model=variant.model_id,
        job=job,
        params=params,
        route=route,
        api="replicate",
        base_url=base_url,
        webhook=body.webhook,
        webhook_events=list(body.webhook_events_filter) if body.webhook_events_filter is not None else None,
        cancel_after=after,
        timeout=state.settings.prediction_timeout_seconds,
    )
    submitted = await state.jobs.submit(principal=principal, spec=spec, idempotency=idem)
    p = submitted.prediction
    status = None
    if wait is not None:
        # Answer a little before the N seconds are up, counted from arrival: the official client's read timeout
        # is N + 0.5 s, and it does not retry a POST.
        done = await state.jobs.wait(p.id, timeout=max(0.0, wait - 1.0 - (time.monotonic() - arrived)))
        p = done.prediction
        response.headers["Preference-Applied"] = f"wait={wait}"
        if p.status not in queue.TERMINAL:
            status = "starting"  # what Replicate answers when the wait ran out, and its client polls on
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return await _render(state, p, base_url, status=status)


async def _render(
    state: AppState, p: Prediction, base_url: str, *, status: str | None = None, session: AsyncSession | None = None
) -> dict[str, Any]:
    files: list[StoredFile] = []
    if p.status == "succeeded":
        if session is not None:  # the request's own: one connection per request, not two
            files = list(await repo.list_files(session, prediction_id=p.id))
        else:
            async with state.sessions() as own:
                files = list(await repo.list_files(own, prediction_id=p.id))
    return prediction_json(p, files, signer=state.signer, base_url=base_url, status=status)


def _model(owner: str, name: str) -> tuple[str, Variant]:
    found = resolve(f"{owner}/{name}")
    if found is None:
        raise ModelNotFound(f"Model {owner}/{name} not found. Available: {', '.join(sorted(MODELS))}.")
    return found


@router.post("/v1/predictions", status_code=201)
async def create_prediction(body: CreatePrediction, creation: CreationDep) -> dict[str, Any]:
    """Create a prediction; ``version`` names the model (``owner/name``, ``owner/name:<id>`` or a bare id)."""
    if body.version is None:
        raise InvalidRequest("'version' is required here.", param="version")
    found = resolve(body.version)
    if found is None:
        raise InvalidRequest(f"Unknown version '{body.version}'. Models: {', '.join(sorted(MODELS))}.", param="version")
    return await _create(creation, body, found[1])


@router.post("/v1/models/{owner}/{name}/predictions", status_code=201)
async def create_model_prediction(
    owner: str, name: str, body: CreatePrediction, creation: CreationDep
) -> dict[str, Any]:
    """Create a prediction of the model's latest version."""
    return await _create(creation, body, _model(owner, name)[1])


async def _own(session: SessionDep, principal: Principal, prediction_id: str) -> Prediction:
    p = await repo.get_prediction(session, tenant_id=principal.tenant.id, prediction_id=prediction_id)
    if p is None:  # another tenant's prediction reads exactly like a missing one
        raise NotFound(f"Prediction {prediction_id} not found.")
    return p


@router.get("/v1/predictions/{prediction_id}")
async def get_prediction(
    prediction_id: str, principal: PrincipalDep, session: SessionDep, state: StateDep, request: Request
) -> dict[str, Any]:
    """A prediction as it stands now."""
    p = await _own(session, principal, prediction_id)
    return await _render(state, p, public_base_url(request, state), session=session)


@router.post("/v1/predictions/{prediction_id}/cancel")
async def cancel_prediction(
    prediction_id: str, principal: PrincipalDep, session: SessionDep, state: StateDep, request: Request
) -> dict[str, Any]:
    """Cancel a prediction (and the provider's job, where the provider allows it); a finished one is unchanged."""
    await _own(session, principal, prediction_id)
    p = await state.jobs.cancel(tenant_id=principal.tenant.id, prediction_id=prediction_id)
    if p is None:
        raise NotFound(f"Prediction {prediction_id} not found.")
    return await _render(state, p, public_base_url(request, state))


def _cursor(direction: str, p: Prediction) -> str:
    raw = json.dumps([direction, p.created_at.isoformat(), p.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_cursor(cursor: str) -> tuple[str, tuple[datetime, str]]:
    if len(cursor) > 200:  # ours are about 110 characters; anything longer is not one
        raise InvalidRequest("Invalid cursor.", param="cursor")
    try:
        direction, at, pid = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if direction not in ("b", "a") or not isinstance(pid, str) or not is_id(pid, "gen"):
            raise ValueError(direction)
        moment = datetime.fromisoformat(at)
        if moment.tzinfo is None:
            raise ValueError(at)
        return direction, (moment, pid)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidRequest("Invalid cursor.", param="cursor") from exc


@router.get("/v1/predictions")
async def list_predictions(
    principal: PrincipalDep,
    session: SessionDep,
    state: StateDep,
    request: Request,
    cursor: str | None = None,
    page_size: Annotated[int, Query(ge=1, le=PAGE_SIZE)] = PAGE_SIZE,
) -> dict[str, Any]:
    """The caller's predictions, newest first, ``page_size`` (at most 100) a page; ``next``/``previous`` are URLs."""
    before = after = None
    if cursor is not None:
        direction, position = _parse_cursor(cursor)
        before, after = (position, None) if direction == "b" else (None, position)
    rows = list(
        await queue.list_page(session, tenant_id=principal.tenant.id, limit=page_size + 1, before=before, after=after)
    )
    more = len(rows) > page_size
    # Walking backwards the extra row is the newest one (first); forwards, the oldest (last).
    rows = rows[-page_size:] if after is not None else rows[:page_size]
    base = public_base_url(request, state).rstrip("/")

    def link(direction: str, p: Prediction) -> str:
        return f"{base}/v1/predictions?cursor={_cursor(direction, p)}" + (
            f"&page_size={page_size}" if page_size != PAGE_SIZE else ""
        )

    older = rows and (more if after is None else True)
    newer = rows and (cursor is not None if after is None else more)
    results = [await _render(state, p, base, session=session) for p in rows]
    return {
        "next": link("b", rows[-1]) if older else None,
        "previous": link("a", rows[0]) if newer else None,
        "results": results,
    }


def _version(name: str) -> dict[str, Any]:
    schema = {
        "openapi": "3.0.2",
        "info": {"title": "HiDream-I1", "version": "1"},
        "paths": {},
        "components": {
            "schemas": {
                "Input": PredictionInput.model_json_schema(),
                "Output": {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"},
            }
        },
    }
    # The client reads cog_version to interpret the schema: before cog 0.3.9 an array output meant an iterator.
    created = iso(datetime(2025, 4, 7, tzinfo=UTC))
    return {"id": VERSIONS[name], "created_at": created, "cog_version": "0.14.0", "openapi_schema": schema}


@router.get("/v1/models/{owner}/{name}")
async def get_model(owner: str, name: str, principal: PrincipalDep) -> dict[str, Any]:
    """A model, with its one version's input and output schema."""
    model, variant = _model(owner, name)
    return {
        "url": f"https://huggingface.co/{variant.repo_id}",
        "owner": model.split("/")[0],
        "name": model.split("/")[1],
        "description": f"HiDream-I1 {variant.name}: {variant.steps} steps by default.",
        "visibility": "public",
        "run_count": 0,
        "default_example": None,
        "latest_version": _version(model),
    }


@router.get("/v1/models/{owner}/{name}/versions/{version_id}")
async def get_model_version(owner: str, name: str, version_id: str, principal: PrincipalDep) -> dict[str, Any]:
    """The model's version (the official client reads it when a run names one)."""
    model, _ = _model(owner, name)
    if version_id != VERSIONS[model]:
        raise NotFound(f"Version {version_id} of {model} not found.")
    return _version(model)
