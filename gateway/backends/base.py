"""The one interface every backend implements, and the job and result types it speaks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeGuard, runtime_checkable

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

    def as_dict(self) -> dict[str, Any]:
        """Its fields (all plain values) as a dict: ``dataclasses.asdict`` without its deep copy, on every request."""
        return dict(self.__dict__)


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


@dataclass(frozen=True)
class Probe:
    """What a backend's own health check said: ``up``, ``loading`` (answers, model not loaded yet), ``down``
    (no answer, an error, or a model that failed to load; ``detail`` says which) or ``unchecked`` (no free check).
    """

    status: Literal["up", "loading", "down", "unchecked"]
    detail: str | None = None


@runtime_checkable
class ProbedBackend(Backend, Protocol):
    """A backend with a free health check, so a recovery is seen before a real request is risked on it.

    Example::

        probe = await backend.probe()  # Probe("down", "worker-1 cannot be reached (ConnectError)")
    """

    async def probe(self) -> Probe: ...


@runtime_checkable
class ProviderBackend(Backend, Protocol):
    """A backend whose jobs live at the provider, so a restarted gateway can re-attach to them.

    Example::

        ref = await backend.submit(job, timeout=120)  # returns as soon as the provider accepted it
        # ...commit ref (JSON) with the job...
        result = await backend.collect(job, ref, timeout=120)

    ``submit`` only creates the provider job(s) and returns a small JSON-serialisable reference; if it raises, it
    has cancelled whatever it created. ``collect`` waits, downloads and decodes; it never cancels the provider job,
    whatever happens to it (another replica may pick the job up), and raises the same errors as ``generate``.
    ``cancel`` is best effort: it never raises, and cancelling a finished job is harmless. ``generate`` is
    ``submit`` then ``collect``, cancelling the provider job if collecting fails or is cancelled.
    """

    async def submit(self, job: ImageJob, *, timeout: float) -> dict[str, Any]: ...

    async def collect(self, job: ImageJob, ref: dict[str, Any], *, timeout: float) -> ImageResult: ...

    async def cancel(self, ref: dict[str, Any]) -> None: ...


_PROVIDER_TYPES: dict[type, bool] = {}


def is_provider(backend: object) -> TypeGuard[ProviderBackend]:
    """``isinstance(backend, ProviderBackend)``, answered once per class: a runtime protocol check looks up every
    method of the protocol each time, and the job path asks it on every attempt."""
    kind = type(backend)
    known = _PROVIDER_TYPES.get(kind)
    if known is None:
        known = _PROVIDER_TYPES[kind] = isinstance(backend, ProviderBackend)
    return known
