"""The one interface every backend implements, and the job and result types it speaks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from gateway.errors import InvalidRequest


@dataclass(frozen=True)
class ImageJob:
    """What the gateway asks a backend to make; sizes are already one of HiDream's resolutions."""

    variant: str  # full | dev | fast
    prompt: str
    width: int
    height: int
    seed: int
    n: int = 1
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = 90


@dataclass
class ImageResult:
    """Encoded images as the backend returned them, with their real size."""

    images: list[bytes]
    content_type: str
    width: int
    height: int
    seed: int
    timings: dict[str, float] = field(default_factory=dict)


class BackendInputError(InvalidRequest):
    """The backend refused the job because of its input: return it to the client, never retry elsewhere."""


@runtime_checkable
class Backend(Protocol):
    """Something that turns an ImageJob into images.

    Example::

        backend = LocalBackend(loader, variants={"fast"})
        result = await backend.generate(job, timeout=60)
        await backend.aclose()

    ``generate`` raises BackendBusy when it has no capacity, GenerationTimeout past ``timeout`` seconds,
    BackendInputError for bad input and BackendFailed or BackendUnavailable for everything else.
    """

    name: str  # unique: what routing, health and usage events call it
    kind: str  # local, worker, replicate or fal: what the price book and allow-lists may also name
    variants: frozenset[str]

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult: ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...
