"""The ``local`` backend: the HiDream runner in this process, one generation at a time, bounded queue."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

from gateway.backends.base import ImageJob, ImageResult
from gateway.errors import BackendBusy, BackendFailed, BackendUnavailable, GenerationTimeout
from inference.runner import GenerateParams
from inference.serving import GenerationQueue, NotLoaded, QueueFull

if TYPE_CHECKING:
    from inference.runner import HiDreamRunner

log = logging.getLogger("hidream_gateway.local")


class LocalBackend:
    """Runs jobs on a HiDreamRunner in this process: one generation at a time, a bounded queue.

    Past ``queue_size`` waiting jobs, ``generate`` raises BackendBusy with a Retry-After estimated from
    recent generation times.

    Example::

        backend = LocalBackend(lambda: HiDreamRunner.load(path), variants=frozenset({"fast"}))
        backend.start()  # loads the model in the worker thread
        result = await backend.generate(job, timeout=120)
    """

    name = "local"
    kind = "local"

    def __init__(self, loader: Callable[[], HiDreamRunner], *, variants: frozenset[str], queue_size: int = 8) -> None:
        self.variants = variants
        self.queue = GenerationQueue(loader, queue_size=queue_size)

    def start(self) -> None:
        """Begin loading the model."""
        self.queue.start()

    @property
    def capacity(self) -> int:
        """Jobs it takes at once: the running one and the queue."""
        return self.queue.capacity

    @property
    def pending(self) -> int:
        """Jobs running or queued."""
        return self.queue.pending

    async def ready(self) -> bool:
        """True once the model has loaded."""
        return self.queue.ready

    async def generate(self, job: ImageJob, *, timeout: float) -> ImageResult:
        """Queue the job on the worker thread and wait for it, at most ``timeout`` seconds."""
        try:
            gen = await self.queue.submit(GenerateParams.of(**asdict(job)), timeout=timeout)
        except QueueFull as exc:
            raise BackendBusy("The local backend's queue is full; retry later.", retry_after=exc.retry_after) from exc
        except NotLoaded as exc:
            raise BackendUnavailable(f"The local model is not available: {exc}") from exc
        except TimeoutError as exc:
            raise GenerationTimeout(f"The generation did not finish within {timeout:.0f} s.") from exc
        except Exception as exc:
            log.exception("local generation failed")
            raise BackendFailed(f"The local backend failed: {type(exc).__name__}") from exc
        return ImageResult(gen.images, gen.content_type, gen.width, gen.height, gen.seed, gen.timings)

    async def aclose(self) -> None:
        """Stop accepting jobs; queued ones are dropped, a running one finishes in the background."""
        self.queue.close()
